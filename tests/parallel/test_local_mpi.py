"""Local SGD and CSER under real Horovod collectives: the communication rounds follow the
schedule, the ranks agree after every synchronisation, one-shot averaging equals the hand-made
average of independently trained models, CSER matches a hand simulation of Algorithm 1, a
rank on another schedule is caught, and a state dict resumes a run bit for bit."""
import copy

import horovod.torch as hvd
import pytest
import torch
from harness import digest

import horovod_nuq.torch as nuq
from horovod_nuq.schedules import GrowingIntervals

hvd.init()
N, RANK = hvd.size(), hvd.rank()
LR = 0.05


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s data at `step` (1-based): different on every rank, reproducible anywhere."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True) * (1.0 + 0.2 * rank) + 0.1 * torch.randn(8, 1, generator=g)


def local_step(model, opt, rank: int, step: int) -> None:
    x, y = batch(rank, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def agree(t: torch.Tensor) -> bool:
    """True when every rank holds bit-identical contents of `t`."""
    gathered = hvd.allgather(torch.from_numpy(digest(t.detach().numpy())).unsqueeze(0),
                             name="test_local.digest").numpy()
    return bool((gathered == gathered[0]).all())


class Recorder:
    """Counts the collectives horovod_nuq's wrappers start, by step and by name prefix."""

    def __init__(self, monkeypatch):
        self.step, self.calls = 0, []
        for fn in ("allreduce_async", "allgather_async", "allgather"):
            original = getattr(hvd, fn)

            def counted(*args, _original=original, **kwargs):
                name = kwargs.get("name") or ""
                if name.startswith("horovod_nuq."):
                    self.calls.append((self.step, name))
                return _original(*args, **kwargs)
            monkeypatch.setattr(hvd, fn, counted)

    def steps_with(self, prefix: str) -> list[int]:
        return sorted({s for s, n in self.calls if n.startswith(prefix)})

    def count(self, step: int, prefix: str) -> int:
        return sum(1 for s, n in self.calls if s == step and n.startswith(prefix))


def compressions():
    return {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
            "nuq4": nuq.NUQCompressor(bits=4, seed=3), "globalqsgd": nuq.GlobalQSGDCompressor(bits=4, seed=3),
            "tnq2_ef": nuq.TNQCompressor(bits=2, seed=3, error_feedback=True)}


# ---- Local SGD ---------------------------------------------------------------------------
@pytest.mark.parametrize("comp", ["none", "fp16", "nuq4", "globalqsgd", "tnq2_ef"])
def test_rounds_follow_the_schedule_and_ranks_agree_after_each(comp, monkeypatch):
    T = 15
    model = make_model()
    opt = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                       model.named_parameters(), compression=compressions()[comp], total_steps=T)
    rec = Recorder(monkeypatch)
    want = GrowingIntervals(total_steps=T, rounds=N).times(T)
    assert len(want) == N and want[-1] == T
    for t in range(1, T + 1):
        rec.step = t
        local_step(model, opt, RANK, t)
        rec.step = 0
        # identical after every average; between averages the ranks' data pull them apart
        assert agree(flat(model)) == (t in want), f"step {t}: averaged at {want}"
    assert rec.steps_with("horovod_nuq.local_sgd.check") == want
    params = len(list(model.parameters()))
    averaging = [s for s, n in rec.calls if not n.endswith(".check")]
    assert sorted(set(averaging)) == want
    assert all(rec.count(t, "horovod_nuq.local_sgd.") == params + 1 for t in want)
    assert opt.rounds_done == N and opt.local_step == T


def test_one_shot_equals_the_average_of_independently_trained_models(monkeypatch):
    T = 12
    model = make_model()
    opt = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                       model.named_parameters(), total_steps=T, rounds=1)
    rec = Recorder(monkeypatch)
    for t in range(1, T + 1):
        rec.step = t
        local_step(model, opt, RANK, t)
    assert rec.steps_with("horovod_nuq.") == [T]
    # every rank's model trained alone with the plain optimizer, averaged by hand
    alone = []
    for r in range(N):
        m = make_model()
        o = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
        for t in range(1, T + 1):
            local_step(m, o, r, t)
        alone.append(flat(m))
    by_hand = torch.stack(alone).mean(0)
    assert not torch.allclose(alone[0], alone[-1], atol=1e-3) or N == 1
    torch.testing.assert_close(flat(model), by_hand, rtol=1e-6, atol=1e-6)
    assert agree(flat(model))


def test_growing_rounds_equal_averaging_by_hand():
    """Uncompressed Local SGD = train alone between the schedule's steps, average by hand."""
    T = 10
    model = make_model()
    opt = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(), total_steps=T)
    models = [make_model() for _ in range(N)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    times = GrowingIntervals(total_steps=T, rounds=N).times(T)
    for t in range(1, T + 1):
        local_step(model, opt, RANK, t)
        for r in range(N):
            local_step(models[r], opts[r], r, t)
        if t in times:
            mean = torch.stack([flat(m) for m in models]).mean(0)
            for m in models:
                torch.nn.utils.vector_to_parameters(mean.clone(), m.parameters())
        torch.testing.assert_close(flat(model), flat(models[RANK]), rtol=1e-5, atol=1e-6)


def test_lr_schedulers_before_or_after_wrapping_keep_the_averages():
    T = 10
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=LR)
    before = torch.optim.lr_scheduler.StepLR(plain, step_size=3, gamma=0.5)
    opt = nuq.LocalSGD(plain, model.named_parameters(), total_steps=T)
    after = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for t in range(1, T + 1):
        local_step(model, opt, RANK, t)
        before.step()
        after.step()
    assert opt.rounds_done == N and agree(flat(model))
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 3 * 0.5 ** 2)


def test_divergent_schedule_is_caught_on_every_rank():
    T = 12
    model = make_model()
    rounds = 2 if RANK == 0 else 3  # rank 0 averages after step 4, the others after step 2
    opt = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                       total_steps=T, rounds=rounds)
    with pytest.raises(RuntimeError, match="settings differ.*rank 0: LocalSGD.*rounds=2.*rank 1: .*rounds=3"):
        for t in range(1, T + 1):
            local_step(model, opt, RANK, t)
    assert opt.rounds_done == 0


def test_different_starting_models_are_caught():
    model = make_model(seed=RANK)  # no broadcast: every rank starts elsewhere
    opt = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                       total_steps=6, rounds=1)
    with pytest.raises(RuntimeError, match="synchronised models differ.*broadcast_parameters"):
        for t in range(1, 7):
            local_step(model, opt, RANK, t)


def _resume(make_opt, T: int, stop: int, after_load=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(model after T steps straight, model after `stop` steps, save, fresh objects, load, rest)."""
    model = make_model()
    opt = make_opt(model)
    for t in range(1, stop + 1):
        local_step(model, opt, RANK, t)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for t in range(stop + 1, T + 1):
        local_step(model, opt, RANK, t)
    fresh = make_model(seed=99)
    fresh.load_state_dict(saved_model)
    opt2 = make_opt(fresh)
    opt2.load_state_dict(saved_opt)
    for t in range(stop + 1, T + 1):
        local_step(fresh, opt2, RANK, t)
    return flat(model), flat(fresh)


def test_local_sgd_state_dict_resumes_identically():
    def make(m):
        return nuq.LocalSGD(torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9), m.named_parameters(),
                            total_steps=12, rounds=2)  # averages after steps 4 and 12
    straight, resumed = _resume(make, T=12, stop=6)  # mid-round: the last average matters
    assert torch.equal(straight, resumed)


def test_state_dict_from_other_settings_is_refused():
    model = make_model()
    a = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), total_steps=12, rounds=2)
    b = nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), total_steps=12, rounds=3)
    with pytest.raises(ValueError, match="resume with the same settings"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not saved by"):
        b.load_state_dict(torch.optim.SGD(model.parameters(), lr=LR).state_dict())


# ---- CSER --------------------------------------------------------------------------------
@pytest.mark.parametrize("c1", ["nuq2", "qsgd4"])
def test_cser_reset_restores_agreement(c1, monkeypatch):
    H, T = 3, 9
    comp = {"nuq2": nuq.NUQCompressor(bits=2, seed=5), "qsgd4": nuq.QSGDCompressor(bits=4, seed=5)}[c1]
    model = make_model()
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model.named_parameters(),
                   compression=comp, period=H)
    rec = Recorder(monkeypatch)
    for t in range(1, T + 1):
        rec.step = t
        local_step(model, opt, RANK, t)
        rec.step = 0
        x_hat = torch.cat([x.reshape(-1) for x in opt.synchronized_model])
        assert agree(x_hat), f"step {t}: the synchronised part differs across ranks"
        # the local model differs by the residual, which the reset empties every H steps
        assert agree(flat(model)) == (t % H == 0), f"step {t}"
        err = torch.cat([e.reshape(-1) for e in opt.residuals])
        assert (float(err.abs().max()) == 0.0) == (t % H == 0)
    # every step: the check and one C1 op per parameter; every H-th: one C2 op per parameter more
    params = len(list(model.parameters()))
    assert [rec.count(t, "horovod_nuq.cser.") for t in range(1, T + 1)] == [
        1 + params + (params if t % H == 0 else 0) for t in range(1, T + 1)]


def test_cser_matches_algorithm_1_by_hand():
    """Simulate every rank's CSER with C1 = fp16 (whose C(v) each rank can compute for all)."""
    H, T = 2, 7
    model = make_model()
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                   compression=hvd.Compression.fp16, period=H)
    x_hat = flat(make_model())
    e = [torch.zeros_like(x_hat) for _ in range(N)]
    sim = make_model()
    for t in range(1, T + 1):
        local_step(model, opt, RANK, t)
        p, c = [], []
        for r in range(N):  # the update p_r of rank r's local model x_hat - e_r
            torch.nn.utils.vector_to_parameters(x_hat - e[r], sim.parameters())
            x, y = batch(r, t)
            sim.zero_grad()
            torch.nn.functional.mse_loss(sim(x), y).backward()
            p.append(LR * torch.cat([q.grad.reshape(-1) for q in sim.parameters()]))
            c.append(p[-1].half().float())
        x_hat = x_hat - torch.stack(c).mean(0)
        e = [e[r] + p[r] - c[r] for r in range(N)]
        if t % H == 0:
            x_hat = x_hat - torch.stack(e).mean(0)
            e = [torch.zeros_like(x_hat) for _ in range(N)]
        torch.testing.assert_close(flat(model), x_hat - e[RANK], rtol=2e-3, atol=2e-4)


def test_cser_without_compression_is_synchronous_sgd():
    model = make_model()
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                   compression=hvd.Compression.none, period=4)
    ref = make_model()
    for t in range(1, 6):
        local_step(model, opt, RANK, t)
        grads = []
        for r in range(N):
            x, y = batch(r, t)
            ref.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            grads.append(torch.cat([q.grad.reshape(-1) for q in ref.parameters()]))
        torch.nn.utils.vector_to_parameters(flat(ref) - LR * torch.stack(grads).mean(0), ref.parameters())
        torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)
        assert agree(flat(model))


def test_cser_divergent_period_is_caught_at_the_first_step():
    model = make_model()
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                   compression=hvd.Compression.fp16, period=4 if RANK == 0 else 5)
    with pytest.raises(RuntimeError, match="settings differ.*period=4.*period=5"):
        local_step(model, opt, RANK, 1)


def test_cser_different_starting_models_are_caught_at_the_first_step():
    model = make_model(seed=RANK)
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), model.named_parameters(),
                   compression=hvd.Compression.fp16, period=50)
    with pytest.raises(RuntimeError, match="synchronised models differ"):
        local_step(model, opt, RANK, 1)


def test_cser_state_dict_resumes_identically():
    def make(m):
        return nuq.CSER(torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9), m.named_parameters(),
                        compression=hvd.Compression.fp16, period=4)
    straight, resumed = _resume(make, T=10, stop=6)  # residuals and x_hat are mid-period
    assert torch.equal(straight, resumed)


def test_cser_default_period_is_the_ratio_of_the_compressions():
    model = make_model()
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), compression=hvd.Compression.fp16)
    assert opt.period == 2  # fp16 halves the bytes of the float32 reset
    two = nuq.NUQCompressor(bits=2)
    per_coord = two.payload_bytes(1 << 20, N, "allgather") / (1 << 20)
    opt = nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), compression=two)
    assert opt.period == round(4 / per_coord) and opt.period >= 12


def test_cser_refuses_a_shared_scale_compressor():
    model = make_model()
    with pytest.raises(ValueError, match="own C.v."):
        nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR), compression=nuq.GlobalQSGDCompressor())
    with pytest.raises(ValueError, match="error feedback, which would send CSER's residual"):
        nuq.CSER(torch.optim.SGD(model.parameters(), lr=LR),
                 compression=nuq.TNQCompressor(bits=2, error_feedback=True))


def test_wrapping_a_distributed_optimizer_is_refused():
    model = make_model()
    dist = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                    named_parameters=model.named_parameters())
    with pytest.raises(TypeError, match="plain torch optimizer"):
        nuq.LocalSGD(dist, total_steps=40)
    with pytest.raises(TypeError, match="plain torch optimizer"):
        nuq.CSER(nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), total_steps=40),
                 compression=hvd.Compression.fp16)
    with pytest.raises(TypeError, match="compression must be a Horovod compressor"):
        nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), compression="fp16", total_steps=40)
    with pytest.raises(ValueError, match="give total_steps"):
        nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="total_steps=2 is too few for rounds="):
        nuq.LocalSGD(torch.optim.SGD(model.parameters(), lr=LR), total_steps=2, rounds=2)
