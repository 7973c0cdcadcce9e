"""PyTorch under real Horovod collectives: unbiasedness, variance, agreement, training, edge cases."""
import types

import horovod.torch as hvd
import numpy as np
import pytest
import torch
from harness import (
    assert_hsq_average,
    check_near,
    check_unbiased,
    check_variance,
    digest,
    exact_variance_of_average,
    rank_gradient,
    run_rounds,
)

import horovod_nuq.torch as nuq
from horovod_nuq import bounds
from horovod_nuq.torch.collectives import COLLECTIVES

hvd.init()
N, RANK = hvd.size(), hvd.rank()
D, ROUNDS = 3000, 150

ALL = [nuq.QSGDCompressor, nuq.QSGDInfCompressor, nuq.NUQCompressor, nuq.TNQCompressor,
       nuq.GlobalQSGDCompressor]
UNBIASED = [c for c in ALL if c is not nuq.TNQCompressor]
# every value test runs on both engines: the fused C kernels (host tensors' default) and the
# generic codec (what CUDA tensors use); fused=False forces the generic one on the CPU
ENGINES = {"fused": None, "generic": False}
PER_RANK = [nuq.QSGDCompressor, nuq.QSGDInfCompressor, nuq.NUQCompressor, nuq.TNQCompressor]


PAPER_BOUNDS = {("qsgd", "allgather"): bounds.qsgd, ("qsgdinf", "allgather"): bounds.qsgd_inf,
                ("nuqsgd", "allgather"): bounds.nuq}


def all_same(t: torch.Tensor) -> bool:
    """True when every rank holds bit-identical contents of `t`."""
    d = torch.from_numpy(digest(t.detach().cpu().numpy()))
    gathered = hvd.allgather(d.unsqueeze(0), name="digest").numpy()
    return bool((gathered == gathered[0]).all())


def reducer(comp, g: torch.Tensor, op=hvd.Average):
    """One compressed reduction of g across ranks, by the compressor's protocol."""
    if comp.protocol == "allreduce":
        return lambda: hvd.allreduce(g, compression=comp, op=op).double().numpy()

    def gather():
        payload, ctx = comp.compress_for_allgather(g)
        return comp.decompress_gathered(hvd.allgather(payload), ctx, op == hvd.Average).double().numpy()
    return gather


def cases():
    for c in UNBIASED:
        yield c, "allreduce"
    for c in PER_RANK:
        if c is not nuq.TNQCompressor:
            yield c, "allgather"


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("cls,protocol", list(cases()), ids=lambda x: getattr(x, "__name__", x))
def test_unbiased_and_variance_across_ranks(cls, protocol, engine):
    comp = cls(seed=11, protocol=protocol, fused=engine)
    grads = [rank_gradient(r, D) for r in range(N)]
    true = np.mean(grads, axis=0, dtype=np.float64)
    var = exact_variance_of_average(grads, comp.scheme, shared=protocol == "allreduce")
    mean, outs = run_rounds(reducer(comp, torch.from_numpy(grads[RANK])), ROUNDS)
    z2 = check_unbiased(mean, true, var, ROUNDS)
    measured, expected = check_variance(outs, true, var)
    alone = np.mean([exact_variance_of_average([g], comp.scheme, shared=False).sum() for g in grads])
    coefficient = PAPER_BOUNDS.get((comp.scheme.name, protocol))
    if coefficient:  # the paper's per-worker bound, divided by N: independent ranks average it down
        b, k = comp.scheme.bucket_size, comp.scheme.levels.k
        norms = sum(np.sum(np.pad(g.astype(np.float64), (0, -len(g) % b)).reshape(-1, b) ** 2) for g in grads)
        bound = coefficient(b, k) * norms / N**2
        assert measured <= bound, f"variance {measured:.4g} above the paper's bound / N = {bound:.4g}"
    if RANK == 0:
        print(f"\n{cls.__name__}/{protocol} N={N}: mean z^2={z2:.3f}; E||avg-true||^2 measured "
              f"{measured:.4g}, exact {expected:.4g}; a rank alone {alone:.4g} (ratio {measured / alone:.3f})")


NEGATIVE_CONTROLS = {  # per engine, a realistic randomness bug the harness must catch
    "generic": lambda coll: types.SimpleNamespace(uniform=lambda xp, v: torch.full(v.shape, 0.5)),
    "fused": lambda coll: types.SimpleNamespace(key=lambda: 12345),  # the same draws every call
}


@pytest.mark.parametrize("engine", ENGINES, ids=ENGINES.keys())
@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_negative_control_deterministic_rounding_is_caught(engine, protocol):
    """Rounding to the nearest level (u = 0.5), or reusing one draw every call, is biased
    over repeated reductions; the harness must say so."""
    comp = nuq.QSGDCompressor(seed=3, fused=ENGINES[engine], protocol=protocol)
    comp.codec.draws = NEGATIVE_CONTROLS[engine]
    grads = [rank_gradient(r, D) for r in range(N)]
    true = np.mean(grads, axis=0, dtype=np.float64)
    var = exact_variance_of_average(grads, comp.scheme, shared=protocol == "allreduce")
    mean, _ = run_rounds(reducer(comp, torch.from_numpy(grads[RANK])), 20)
    with pytest.raises(AssertionError, match="biased"):
        check_unbiased(mean, true, var, 20)


def test_independent_streams_across_ranks():
    """Same seed on every rank, yet ranks' rounding errors are uncorrelated."""
    comp = nuq.QSGDInfCompressor(seed=5, protocol="allgather")
    g = torch.from_numpy(rank_gradient(0, D))  # same input on every rank
    payload, ctx = comp.compress_for_allgather(g)
    parts = hvd.allgather(payload).view(N, -1)
    errs = [comp.decompress_gathered(p, ctx, average=False).numpy() - g.numpy() for p in parts]
    if N > 1:
        c = np.corrcoef(errs[0], errs[1])[0, 1]
        assert abs(c) < 6 / np.sqrt(D), f"rounding errors of ranks 0 and 1 correlate: {c:.3f}"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_every_rank_decodes_identical_tensor(cls, protocol):
    if protocol == "allgather" and cls is nuq.GlobalQSGDCompressor:
        pytest.skip("Global-QSGD is shared-scale only")
    comp = cls(protocol=protocol)
    out = reducer(comp, torch.from_numpy(rank_gradient(RANK, 1000)))()
    assert all_same(torch.from_numpy(out))


REDUCTIONS = {"average": {"op": hvd.Average}, "sum": {"op": hvd.Sum},
              "scaled": {"op": hvd.Sum, "prescale_factor": 0.5, "postscale_factor": 3.0},
              "predivided": {"op": hvd.Average, "prescale_factor": 0.25, "postscale_factor": 4.0}}


def _factor(kw):
    """What the reduction multiplies the ranks' sum by."""
    return kw.get("prescale_factor", 1.0) * kw.get("postscale_factor", 1.0) / (N if kw["op"] == hvd.Average else 1)


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=REDUCTIONS.keys())
@pytest.mark.parametrize("cls,protocol", [(nuq.QSGDInfCompressor, "allreduce"), (nuq.NUQCompressor, "allgather"),
                                          (nuq.TNQCompressor, "allgather"), (nuq.GlobalQSGDCompressor, "allreduce")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_stock_allreduce_values(cls, protocol, reduction, engine):
    """hvd.allreduce(compression=...) returns exactly the reduction's factor times the sum of
    the ranks' quantized tensors: the same draws decoded by the papers' gathered form (per-rank
    scales), or by the summable form on agreed scales, give the expected value."""
    kw = REDUCTIONS[reduction]
    g = torch.from_numpy(rank_gradient(RANK, 2100))
    out = hvd.allreduce(g, compression=cls(seed=4, protocol=protocol, fused=engine), **kw).double().numpy()
    twin = cls(seed=4, protocol=protocol, fused=engine)  # same seed and rank: the same draws
    if protocol == "allgather":
        payload, ctx = twin.compress_for_allgather(g)
        total = twin.decompress_gathered(hvd.allgather(payload), ctx, average=False).double().numpy()
    else:
        payload, ctx = twin.compress(g, scale=twin.agree_scales([g])[0])
        total = twin.decompress(hvd.allreduce(payload, op=hvd.Sum), ctx).double().numpy()
    np.testing.assert_allclose(out, _factor(kw) * total, rtol=2e-6, atol=1e-6 * np.abs(total).max())
    if cls is not nuq.TNQCompressor:  # and, unbiased, near the exact sum (TNQ clips the tails)
        grads = [rank_gradient(r, 2100) for r in range(N)]
        var = exact_variance_of_average(grads, twin.scheme, protocol == "allreduce") * N**2
        check_near(total, np.sum(grads, axis=0), var)


def test_adasum_is_refused_clearly():
    if N & (N - 1):
        pytest.skip("Adasum needs a power-of-two number of ranks")
    with pytest.raises(Exception, match="(Adasum|not integer|sentinel)"):
        hvd.allreduce(torch.from_numpy(rank_gradient(RANK, 512)), compression=nuq.QSGDCompressor(),
                      op=hvd.Adasum)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (1000,), (513,), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_shapes_and_dtypes(shape, dtype):
    def grad(rank):
        return torch.randn(shape, generator=torch.Generator().manual_seed(rank)).to(dtype)

    g = grad(RANK)
    want = torch.stack([grad(r).double() for r in range(N)]).mean(0).numpy()
    for comp in (nuq.NUQCompressor(), nuq.QSGDCompressor(protocol="allgather"), nuq.QSGDInfCompressor(bits=8)):
        if comp.protocol == "allgather":
            payload, ctx = comp.compress_for_allgather(g)
            out = comp.decompress_gathered(hvd.allgather(payload), ctx)
        else:
            out = hvd.allreduce(g, compression=comp)
        assert out.shape == g.shape and out.dtype == dtype
        assert torch.isfinite(out.float()).all()
        if comp.scheme.code_bits == 8 and want.size:  # fine codes: near the exact average
            assert np.abs(out.double().numpy() - want).max() <= 0.04 * np.abs(want).max() + 1e-6


def test_all_zero_gradients_decode_to_zero():
    for comp in (nuq.TNQCompressor(), nuq.NUQCompressor(protocol="allgather")):
        out = reducer(comp, torch.zeros(700))()
        assert not np.any(out)


@pytest.mark.parametrize("protocol", ["auto", "allreduce", "allgather"])
def test_payload_is_smaller_than_float32(protocol):
    """The bytes a stock hvd.allreduce moves shrink, and are what the byte model says
    (NUQ's wider sum fields reach float16's size at 4 ranks in the allreduce protocol)."""
    g = torch.from_numpy(rank_gradient(RANK, 100_000))
    for cls in ALL:
        if cls is nuq.GlobalQSGDCompressor and protocol == "allgather":
            continue
        comp = cls(protocol=protocol)
        hvd.allreduce(g, compression=comp)
        chosen = comp.protocol_for(N)  # either way, a 3-word sentinel rides Horovod's allreduce
        assert comp.stats.total_bytes == comp.payload_bytes(g.numel(), N, chosen) + 24
        limit = 0.55 if chosen == "allreduce" and cls in (nuq.NUQCompressor, nuq.TNQCompressor) else 0.4
        assert comp.stats.total_bytes < limit * g.numel() * 4, cls.__name__


def test_same_size_gradients_in_different_orders_are_refused():
    """Gathers are paired by size and submission order. Ranks that submit two same-size
    gradients in different orders would average the wrong tensors together: every rank
    must raise instead (the reduced sentinel tags disagree)."""
    if N < 2:
        pytest.skip("needs 2 ranks")
    comp = nuq.QSGDCompressor(protocol="allgather", seed=1)
    grads = {"a": torch.from_numpy(rank_gradient(RANK, 600)), "b": torch.ones(600)}
    order = ["a", "b"] if RANK % 2 == 0 else ["b", "a"]
    sent = {k: comp.compress(grads[k]) for k in order}  # gathers named by size and order
    handles = {k: hvd.allreduce_async(sent[k][0], name=f"pairing.{k}", op=hvd.Average) for k in "ab"}
    for k in "ab":
        with pytest.raises(ValueError, match="different orders"):
            comp.decompress(hvd.synchronize(handles[k]), sent[k][1])
    same = {k: comp.compress(grads[k]) for k in "ab"}  # the same order everywhere decodes
    for k in "ab":
        out = comp.decompress(hvd.allreduce(same[k][0], name=f"pairing.ok.{k}"), same[k][1])
        assert all_same(out)


def _build():
    """A small classifier plus a layer that never gets a gradient; same init on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    unused = torch.nn.Linear(3, 3)
    return model, list(model.named_parameters()) + [("unused." + k, v) for k, v in unused.named_parameters()]


def _model_params():
    return [p for _, p in _build()[1]]


def _train(opt_factory, steps=25):
    model, params = _build()
    opt = opt_factory(torch.optim.SGD([p for _, p in params], lr=0.5, momentum=0.9), params)
    hvd.broadcast_parameters(dict(params), root_rank=0)
    gen = torch.Generator().manual_seed(100 + RANK)
    w_true = torch.randn(20, 4, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 20, generator=gen)
        y = (x @ w_true).argmax(1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(hvd.allreduce(loss.detach(), name="loss")))
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])
    return losses, flat


@pytest.mark.parametrize("protocol", ["auto", "allreduce"])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_training_stock_horovod_optimizer(cls, protocol):
    """Horovod's own optimizer, the compressor line only: at these sizes "auto" gathers the
    packed codes beside a sentinel; "allreduce" agrees on scales without blocking the hooks."""
    comp = cls(seed=1, protocol=protocol)
    losses, flat = _train(lambda o, ps: hvd.DistributedOptimizer(o, named_parameters=ps, compression=comp))
    assert all_same(flat), "ranks' weights drifted apart"
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    params = [p for p in _model_params() if p.requires_grad]
    per_step = sum(comp.payload_bytes(p.numel(), N) + 24 for p in params)
    assert comp.stats.total_bytes == 25 * per_step


@pytest.mark.parametrize("cls", PER_RANK, ids=lambda c: c.__name__)
def test_training_allgather_optimizer(cls):
    comp = cls(seed=1, protocol="allgather")
    losses, flat = _train(lambda o, ps: nuq.DistributedOptimizer(o, named_parameters=ps, compression=comp))
    assert all_same(flat)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert len(comp.stats.steps) == 25 and comp.stats.steps[-1] > 0
    per_tensor = comp.stats.step_tensors  # (elements, bytes) of each gradient of the last step
    assert sorted(n for n, _ in per_tensor) == sorted(p.numel() for p in _model_params())
    assert sum(b for _, b in per_tensor) == comp.stats.steps[-1]


@pytest.mark.parametrize("cls", [nuq.QSGDCompressor, nuq.NUQCompressor, nuq.GlobalQSGDCompressor],
                         ids=lambda c: c.__name__)
def test_training_default_protocol_auto(cls):
    """The default protocol "auto": horovod_nuq's optimizer routes whichever protocol
    protocol_for(N) picks (fewer bytes per link), and what is sent matches that choice."""
    comp = cls(seed=1)
    assert comp.protocol == "auto"
    losses, flat = _train(lambda o, ps: nuq.DistributedOptimizer(o, named_parameters=ps, compression=comp))
    assert all_same(flat)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    chosen = comp.protocol_for(N)
    params = _model_params()
    expected = sum(comp.payload_bytes(p.numel(), N, chosen) for p in params)
    if chosen == "allreduce":  # one agreement per step: the 8 bytes of config ids once, not per tensor
        expected -= 8 * (len(params) - 1)
    assert comp.stats.steps[-1] == expected, (chosen, comp.stats.steps[-1], expected)
    if cls is nuq.GlobalQSGDCompressor or N == 1:
        assert chosen == "allreduce"


def _rank_inputs(rank: int) -> np.ndarray:
    return (np.random.default_rng(50 + rank).standard_normal((1, 40)) * (1 + rank)).astype(np.float32)


OPTIONS = {"average": {}, "sum": {"op": hvd.Sum}, "predivide": {"gradient_predivide_factor": 2.0},
           "groups": {"num_groups": 2}, "groups_sum": {"groups": 1, "op": hvd.Sum}}


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("optimizer", ["stock", "nuq"])
def test_optimizer_reduces_to_the_expected_values(optimizer, options, protocol):
    """One backward pass with known per-rank gradients; after synchronize() every parameter's
    gradient is the ranks' average (or sum, for op Sum), within 8-bit rounding, on every rank.
    A layer with no gradient on this step still takes part (zeros)."""
    factory = hvd.DistributedOptimizer if optimizer == "stock" else nuq.DistributedOptimizer
    torch.manual_seed(0)
    model, unused = torch.nn.Linear(40, 3), torch.nn.Linear(2, 2)
    params = list(model.named_parameters()) + [("unused." + k, v) for k, v in unused.named_parameters()]
    comp = nuq.QSGDInfCompressor(bits=8, seed=RANK, protocol=protocol)
    opt = factory(torch.optim.SGD([p for _, p in params], lr=1.0), named_parameters=params,
                  compression=comp, **options)
    model(torch.from_numpy(_rank_inputs(RANK))).sum().backward()
    opt.synchronize()
    xs = np.concatenate([_rank_inputs(r) for r in range(N)])
    factor = 1.0 if options.get("op") == hvd.Sum else 1.0 / N
    want = {"weight": np.repeat(xs.sum(0, keepdims=True), 3, axis=0) * factor, "bias": np.full(3, N * factor)}
    for name, p in model.named_parameters():
        got = p.grad.numpy()
        assert np.abs(got - want[name]).max() <= 0.03 * np.abs(want[name]).max(), (name, got, want[name])
        assert all_same(p.grad)
    assert all(not p.grad.any() for p in unused.parameters())


@pytest.mark.parametrize("optimizer,op,scalar_bits", [
    ("stock", hvd.Average, 6), ("stock", hvd.Sum, 6), ("nuq", hvd.Average, 6), ("nuq", hvd.Sum, 6),
    ("stock", hvd.Average, 32), ("nuq", hvd.Sum, 32)],
    ids=["stock-average", "stock-sum", "nuq-average", "nuq-sum", "stock-average-float32", "nuq-sum-float32"])
def test_hsq_optimizer_decodes_the_ranks_oracle_average(optimizer, op, scalar_bits):
    """HSQ through Horovod's own optimizer (sentinel + gather) and horovod_nuq's (allgather),
    with the default 6-bit scalars (each rank rounds its own) and float32 ones: every rank
    holds the same gradient, the average (or sum) of the ranks' oracle reconstructions (to
    within the scalars' rounding); the bytes sent are the computed payload (plus the sentinel)."""
    factory = hvd.DistributedOptimizer if optimizer == "stock" else nuq.DistributedOptimizer
    w = torch.nn.Parameter(torch.zeros(37, 29))  # 1073 elements: a zero-padded tail chunk
    comp = nuq.HSQCompressor(scalar_bits=scalar_bits)
    opt = factory(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)], compression=comp, op=op)
    grads = [rank_gradient(r, w.numel()) for r in range(N)]
    (w * torch.from_numpy(grads[RANK].reshape(w.shape))).sum().backward()
    opt.synchronize()
    assert_hsq_average(w.grad.numpy(), grads, comp.scheme, 1.0 if op == hvd.Sum else 1.0 / N)
    assert all_same(w.grad)
    assert comp.stats.total_bytes == comp.payload_bytes(w.numel()) + (24 if optimizer == "stock" else 0)


OPTIMIZERS = {"stock": hvd.DistributedOptimizer,  # per-tensor scale agreement inside compress()
              "nuq": nuq.DistributedOptimizer}    # one agreement per step, in synchronize()


@pytest.mark.parametrize("cls", [nuq.NUQCompressor, nuq.GlobalQSGDCompressor], ids=lambda c: c.__name__)
def test_allreduce_protocol_agrees_once_per_step(cls):
    """horovod_nuq's optimizer agrees on all gradients' scales in one Max allreduce per step
    (Horovod's own makes one per gradient); training and agreement across ranks are unchanged."""
    calls = []

    class Counting(type(COLLECTIVES)):
        def allreduce_max(self, x, process_set=None, name=None):
            calls.append(1)
            return super().allreduce_max(x, process_set, name)

    comp = cls(seed=1, protocol="allreduce", collectives=Counting(hvd, stable_names=True))
    losses, flat = _train(lambda o, ps: nuq.DistributedOptimizer(o, named_parameters=ps, compression=comp))
    assert len(calls) == 25, len(calls)
    assert all_same(flat)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    params = _model_params()
    expected = sum(comp.payload_bytes(p.numel(), N, "allreduce") for p in params) - 8 * (len(params) - 1)
    assert comp.stats.steps[-1] == expected


@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_backward_passes_per_step(factory):
    comp = nuq.QSGDInfCompressor(bits=8, protocol="allreduce")
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1)
    opt = factory(torch.optim.SGD(model.parameters(), lr=0.05),
                  named_parameters=model.named_parameters(), compression=comp,
                  backward_passes_per_step=2)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for _ in range(3):
        opt.zero_grad()
        for i in range(2):  # the two passes' gradients add up locally, then reduce once
            model(torch.from_numpy(_rank_inputs(RANK)[:, :10] * (i + 1))).sum().backward()
        opt.synchronize()
        want = 3 * np.mean([_rank_inputs(r)[:, :10] for r in range(N)], axis=0)
        got = model.weight.grad.numpy()
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max(), (got, want)
        with opt.skip_synchronize():
            opt.step()
    assert all_same(model.weight.detach())


@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_sparse_as_dense_embedding(factory):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    comp = nuq.QSGDInfCompressor(bits=8, protocol="allreduce")
    opt = factory(torch.optim.SGD(emb.parameters(), lr=0.1),
                  named_parameters=emb.named_parameters(), compression=comp, sparse_as_dense=True)
    hvd.broadcast_parameters(emb.state_dict(), root_rank=0)

    def rows(rank):
        return torch.from_numpy(np.random.default_rng(rank).integers(0, 50, 16))

    want = np.mean([np.bincount(rows(r).numpy(), minlength=50) for r in range(N)], axis=0)[:, None] * np.ones(8)
    for _ in range(3):
        opt.zero_grad()
        emb(rows(RANK)).sum().backward()
        opt.synchronize()
        assert np.abs(emb.weight.grad.to_dense().numpy() - want).max() <= 0.03 * want.max()
        with opt.skip_synchronize():
            opt.step()
    assert all_same(emb.weight.detach())


@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_sparse_gradients_without_sparse_as_dense(factory):
    """Sparse gradients without sparse_as_dense take Horovod's own sparse path, which never
    calls compress: decompress must pass them through. The allgather protocol asks for
    sparse_as_dense instead."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    hvd.broadcast_parameters(emb.state_dict(), root_rank=0)
    opt = factory(torch.optim.SGD(emb.parameters(), lr=0.1), named_parameters=emb.named_parameters(),
                  compression=nuq.QSGDCompressor(protocol="allreduce"))
    for _ in range(3):
        opt.zero_grad()
        emb(torch.randint(0, 50, (16,))).sum().backward()
        opt.step()
    assert all_same(emb.weight.detach())
    emb2 = torch.nn.Embedding(50, 8, sparse=True)
    opt = nuq.DistributedOptimizer(torch.optim.SGD(emb2.parameters(), lr=0.1),
                                   named_parameters=emb2.named_parameters(),
                                   compression=nuq.QSGDCompressor(protocol="allgather"))
    with pytest.raises(ValueError, match="sparse_as_dense=True"):
        emb2(torch.randint(0, 50, (16,))).sum().backward()


def test_registered_with_horovod():
    for name in ("qsgd", "qsgdinf", "nuq", "tnq", "globalqsgd"):
        comp = getattr(hvd.Compression, name)
        out = hvd.allreduce(torch.ones(6000), compression=comp)
        assert out.shape == (6000,) and abs(float(out.mean()) - 1.0) < 0.1, name
    comp = hvd.Compression.hsq  # biased: compared with its oracle, not with the input
    assert isinstance(comp, nuq.HSQCompressor)
    out = hvd.allreduce(torch.arange(6000.0), compression=comp).numpy()
    assert_hsq_average(out, [np.arange(6000, dtype=np.float32)] * N, comp.scheme, 1.0 / N)


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_grouped_allreduce(protocol):
    comp = nuq.QSGDInfCompressor(bits=8, protocol=protocol)
    sizes = (10, 600, 1500)
    ts = [torch.from_numpy(rank_gradient(RANK, n)) for n in sizes]
    outs = hvd.grouped_allreduce(ts, compression=comp)
    for n, t, o in zip(sizes, ts, outs):
        want = np.mean([rank_gradient(r, n) for r in range(N)], axis=0)
        assert o.shape == t.shape and all_same(o)
        assert np.abs(o.numpy() - want).max() <= 0.03 * np.abs(want).max()


# ---- error feedback -------------------------------------------------------------------
EF_OPTIMIZERS = {
    "stock": lambda o, ps, c: hvd.DistributedOptimizer(o, named_parameters=ps, compression=c),
    "stock-grouped": lambda o, ps, c: hvd.DistributedOptimizer(o, named_parameters=ps, compression=c,
                                                               num_groups=1),
    "horovod_nuq": lambda o, ps, c: nuq.DistributedOptimizer(o, named_parameters=ps, compression=c),
}


@pytest.mark.parametrize("optimizer", EF_OPTIMIZERS)
@pytest.mark.parametrize("protocol", ["allgather", "allreduce"])
@pytest.mark.parametrize("cls", [nuq.TNQCompressor, nuq.QSGDCompressor], ids=lambda c: c.__name__)
def test_error_feedback_sends_every_gradient(cls, protocol, optimizer):
    """Over T steps: sum of the decoded averages + the ranks' mean residual = the ranks' mean
    summed gradient (lr 0 keeps the weights, so each step's local gradient is known)."""
    if cls is nuq.TNQCompressor and protocol == "allreduce":
        pytest.skip("TNQ's allreduce protocol is covered by the unit tests; allgather is its default")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    params = list(model.named_parameters())
    comp = cls(bits=2, seed=4, protocol=protocol, error_feedback=True)
    opt = EF_OPTIMIZERS[optimizer](torch.optim.SGD(model.parameters(), lr=0.0), params, comp)
    gen = torch.Generator().manual_seed(100 + RANK)
    sent = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    true = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    for _ in range(12):
        opt.zero_grad()
        x = torch.randn(16, 40, generator=gen)
        model(x).square().mean().backward()
        for n, p in params:
            true[n] += p.grad.double()
        opt.step()
        for n, p in params:
            sent[n] += p.grad.double()
    assert sorted(comp.memory.state_dict()) == sorted(n for n, _ in params)  # keyed by parameter
    for n, _ in params:
        e = comp.memory.residual(n).double()
        lhs = sent[n] + hvd.allreduce(e, op=hvd.Average, name=f"ef.e.{n}")
        rhs = hvd.allreduce(true[n], op=hvd.Average, name=f"ef.g.{n}")
        assert torch.allclose(lhs, rhs, rtol=0, atol=1e-5 * float(rhs.abs().max()) + 1e-6), n
        assert float((sent[n] - rhs).abs().max()) > 1e-3 * float(rhs.abs().max())  # e mattered


def test_error_feedback_state_dict_round_trip():
    model = torch.nn.Linear(10, 3)
    comp = nuq.TNQCompressor(bits=2, seed=1, protocol="allgather", error_feedback=True)
    opt = nuq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=comp)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    state = opt.state_dict()
    saved = state["horovod_nuq_error_feedback"]
    assert sorted(saved) == ["bias", "weight"]
    assert torch.equal(saved["weight"], comp.memory.residual("weight"))
    comp.memory.reset()
    opt.load_state_dict(state)
    assert torch.equal(comp.memory.compensate("weight", torch.zeros(3, 10)), saved["weight"])
    plain = nuq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(),
                                     compression=nuq.TNQCompressor(protocol="allgather"))
    with pytest.raises(ValueError, match="error_feedback off"):
        plain.load_state_dict(state)


def test_error_feedback_needs_a_name_in_plain_allreduce():
    comp = nuq.TNQCompressor(bits=2, error_feedback=True)
    with pytest.raises(ValueError, match="name="):
        hvd.allreduce(torch.ones(100), compression=comp)
    out = hvd.allreduce(torch.ones(100), compression=comp, name="ef.named")
    assert comp.memory.residual("ef.named") is not None and out.shape == (100,)


# ---- QSGD's Elias encoding: per-rank payload lengths, through every gathering path --------
def _elias_pair(levels=2, bucket_size=512):
    """An Elias-coded compressor and a fixed-width one with the same seed: the same draws on
    each rank, so the same codes and (the test's claim) the same decoded tensor."""
    return (nuq.QSGDCompressor(levels=levels, bucket_size=bucket_size, seed=21, encoding="elias"),
            nuq.QSGDCompressor(levels=levels, bucket_size=bucket_size, seed=21, protocol="allgather"))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and bool(torch.equal(a.contiguous().view(torch.int32 if a.element_size() == 4
                                                                       else torch.int16), b.contiguous().view(
        torch.int32 if b.element_size() == 4 else torch.int16)))


def test_elias_payload_lengths_differ_and_decode_like_fixed():
    """Direct allgather and Horovod's allreduce(compression=) (sentinel + gather): ranks'
    payloads differ in length, every rank decodes the same tensor, bit for bit the
    fixed-width decode of the same draws, for op Average and Sum."""
    coded, fixed = _elias_pair()
    g = torch.from_numpy(rank_gradient(RANK, 5000))
    payload, ctx = coded.compress_for_allgather(g)
    sizes = hvd.allgather(torch.tensor([payload.numel()])).tolist()
    if N > 1:
        assert len(set(sizes)) > 1, f"ranks' Elias payloads should differ in length here: {sizes}"
    got = coded.decompress_gathered(hvd.allgather(payload, name="elias.direct"), ctx)
    fp, fctx = fixed.compress_for_allgather(g)
    want = fixed.decompress_gathered(hvd.allgather(fp, name="fixed.direct"), fctx)
    assert _bits_equal(got, want) and all_same(got)
    assert coded.stats.total_bytes == payload.numel()
    for op in (hvd.Average, hvd.Sum):
        got = hvd.allreduce(g, compression=coded, op=op, name="elias.sentinel")
        want = hvd.allreduce(g, compression=fixed, op=op, name="fixed.sentinel")
        assert _bits_equal(got, want) and all_same(got)


@pytest.mark.parametrize("optimizer", ["stock", "nuq"])
def test_elias_training_equals_fixed_training(optimizer):
    """Horovod's own DistributedOptimizer (sentinel + gather) and horovod_nuq's (direct
    allgather) with encoding="elias" train to bit-identical weights on every rank, equal to
    the fixed-width code's with the same seed; the stats count the bytes actually sent."""
    factory = hvd.DistributedOptimizer if optimizer == "stock" else nuq.DistributedOptimizer
    runs = {}
    for comp in _elias_pair(levels=1, bucket_size=128):
        losses, flat = _train(lambda o, ps, c=comp: factory(o, named_parameters=ps, compression=c), steps=8)
        runs[comp.encoding] = (losses, flat, comp)
    (_, flat_e, coded), (_, flat_f, fixed) = runs["elias"], runs["fixed"]
    assert _bits_equal(flat_e, flat_f), "Elias-coded training diverged from the fixed-width code's"
    assert all_same(flat_e)
    assert 0 < coded.stats.total_bytes < fixed.stats.total_bytes  # small tensors: frames and sentinels weigh
