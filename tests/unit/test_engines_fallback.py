"""Engine choice and the decode semantics every engine must share.

- No kernels (HOROVOD_NUQ_KERNELS=0, or no working C compiler): compressors fall back to the
  generic engine with the same results; fused=True refuses.
- Op Sum vs Average over simulated ranks, for the allreduce and the allgather protocols, on
  the generic engine, the fused engine and the graph-fused one (inside tf.function): a
  decoder that ignores the sentinel or the 1/n average is caught whichever engine runs.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from _helpers import SimulatedRank

import horovod_nuq as H
from horovod_nuq import engines, kernels, reference
from horovod_nuq.backends import backend_for

HAVE_KERNELS = kernels.load() is not None
ENGINES = [pytest.param(True, id="fused", marks=pytest.mark.skipif(not HAVE_KERNELS, reason="no kernels")),
           pytest.param(False, id="generic")]
B, N, RANKS = 128, 300, 3


@pytest.fixture
def no_kernels(monkeypatch):
    """kernels.load() as on a machine with HOROVOD_NUQ_KERNELS=0 (restored afterwards)."""
    monkeypatch.setenv("HOROVOD_NUQ_KERNELS", "0")
    monkeypatch.setattr(kernels, "_lib", False)  # not tried yet: load() reads the variable
    yield
    assert kernels._lib is None


def _engine_name(c, x):
    return type(c.codec.engine(backend_for(x), x)).__name__


def _x(seed=0, n=N):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_kernels_disabled_falls_back_to_the_generic_engine(no_kernels, protocol):
    """Default compressors run the generic engine, with bit-identical results to fused=False."""
    x = _x()
    auto = H.NUQCompressor(seed=4, bucket_size=B, protocol=protocol)
    generic = H.NUQCompressor(seed=4, bucket_size=B, protocol=protocol, fused=False)
    assert kernels.load() is None
    assert _engine_name(auto, x) == "GenericEngine"
    if protocol == "allreduce":
        a, b = (c.decompress(*c.compress(x)) for c in (auto, generic))
    else:
        a, b = (c.decompress_gathered(*c.compress_for_allgather(x)) for c in (auto, generic))
    np.testing.assert_array_equal(a, b)


def test_fused_true_without_kernels_raises(no_kernels):
    c = H.QSGDCompressor(fused=True)
    with pytest.raises(RuntimeError, match="fused=True, but no fused kernels can run here"):
        c.compress(_x())


def test_a_failing_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    """No usable C compiler: load() warns once and returns None; compressors still work."""
    monkeypatch.setenv("HOROVOD_NUQ_CACHE", str(tmp_path))  # nothing compiled there yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.delenv("HOROVOD_NUQ_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_lib", False)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        assert kernels.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.load() is None  # remembered: no second attempt, no second warning
        c = H.QSGDCompressor(seed=1, bucket_size=B)
        x = _x()
        assert _engine_name(c, x) == "GenericEngine"
        y = c.decompress(*c.compress(x))
    assert y.shape == x.shape


# ---- simulated ranks ---------------------------------------------------------------------------
def _rank_payloads(cls, fused, xs, **kw):
    """Each simulated rank's summable payload, with the scales agreed (Max) over the ranks."""
    probe = cls(bucket_size=B, **kw)
    local_r = [reference.bucket_scales(x, probe.scheme).astype(np.float32) for x in xs]
    cid = np.array([probe.codec.settings_id(None), -probe.codec.settings_id(None)], np.float32)
    agreed = np.concatenate([np.max(local_r, axis=0), cid])
    out = []
    for i, x in enumerate(xs):
        c = cls(bucket_size=B, seed=i, fused=fused, protocol="allreduce",
                collectives=SimulatedRank(i, len(xs), agreed), **kw)
        out.append(c.compress(x))
    return out, agreed[:-2]


def _expected_sum(payloads, scheme, r, ranks, n):
    """Sum over ranks of r * m / D, from an independent decode of each rank's fields."""
    from horovod_nuq import wire
    layout = wire.SumLayout(scheme.levels.denominator, ranks)
    total = np.zeros(len(r) * B)
    for p in payloads:
        w = np.asarray(p)[:-1].astype(np.uint64)
        f = (w[:, None] >> (np.arange(layout.per_word) * layout.width).astype(np.uint64)) \
            & np.uint64((1 << layout.width) - 1)
        total += f.astype(np.int64).reshape(-1)[: total.size] - layout.bound
    return (total * np.repeat(r.astype(np.float64), B) / scheme.levels.denominator)[:n]


def _decoder(cls, fused, ranks, **kw):
    kw.setdefault("protocol", "allreduce")
    return cls(bucket_size=B, seed=0, fused=fused, collectives=SimulatedRank(0, ranks), **kw)


@pytest.mark.parametrize("fused_enc", [False, True] if HAVE_KERNELS else [False], ids=["enc-generic", "enc-fused"][: 1 + HAVE_KERNELS])
@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize("cls", [H.QSGDCompressor, H.NUQCompressor, H.GlobalQSGDCompressor])
def test_allreduce_sum_and_average_over_ranks(cls, fused, fused_enc):
    """Words summed over 3 ranks decode to the sum (op Sum: sentinel 3) or the average (op
    Average: everything / 3), whichever engine encoded and whichever decodes."""
    xs = [_x(i) * (i + 1) for i in range(RANKS)]
    payloads, r = _rank_payloads(cls, fused_enc, xs)
    dec = _decoder(cls, fused, RANKS)
    want = _expected_sum([p for p, _ in payloads], dec.scheme, r, RANKS, N)
    summed = sum(np.asarray(p) for p, _ in payloads)
    ctx = payloads[0][1]
    tol = 1e-6 * np.abs(want).max()
    np.testing.assert_allclose(dec.decompress(summed, ctx), want, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(dec.decompress(summed / RANKS, ctx), want / RANKS, rtol=1e-6, atol=tol)
    # a linear prescale (Horovod's prescale_factor 0.5) scales words and sentinel alike
    np.testing.assert_allclose(dec.decompress(summed * 0.5, ctx), want * 0.5, rtol=1e-6, atol=tol)


@pytest.mark.parametrize("fused", ENGINES)
@pytest.mark.parametrize("cls", [H.QSGDCompressor, H.NUQCompressor, H.TNQCompressor])
def test_allgather_sum_and_average_over_ranks(cls, fused):
    """Three ranks' gathered payloads decode to the mean (average=True) or the sum of what
    each decodes to alone."""
    xs = [_x(i) * (i + 1) for i in range(RANKS)]
    comps = [cls(bucket_size=B, seed=i, fused=fused, protocol="allgather") for i in range(RANKS)]
    parts = [c.compress_for_allgather(x) for c, x in zip(comps, xs)]
    singles = np.stack([comps[0].decompress_gathered(p, ctx) for p, ctx in parts]).astype(np.float64)
    gathered = np.concatenate([np.asarray(p) for p, _ in parts])
    ctx = parts[0][1]
    tol = 1e-6 * np.abs(singles).max()
    np.testing.assert_allclose(comps[0].decompress_gathered(gathered, ctx), singles.mean(0), rtol=1e-6, atol=tol)
    np.testing.assert_allclose(comps[0].decompress_gathered(gathered, ctx, average=False), singles.sum(0),
                               rtol=1e-6, atol=tol)


@pytest.mark.parametrize("fused", ENGINES)
def test_tf_function_decodes_like_eager(fused):
    """Inside tf.function (graph-fused engine when kernels exist) the 3-rank Sum and Average
    decodes and the 3-rank allgather decodes equal the eager ones."""
    tf = pytest.importorskip("tensorflow")
    xs = [_x(i) * (i + 1) for i in range(RANKS)]
    payloads, r = _rank_payloads(H.NUQCompressor, fused, xs)
    summed = sum(np.asarray(p) for p, _ in payloads)
    ctx = payloads[0][1]
    dec = _decoder(H.NUQCompressor, fused, RANKS)
    want = _expected_sum([p for p, _ in payloads], dec.scheme, r, RANKS, N).astype(np.float32)
    ctx_tf = dataclasses.replace(ctx, scale=tf.constant(ctx.scale))
    step = tf.function(lambda p: dec.decompress(p, ctx_tf))
    tol = 1e-6 * np.abs(want).max()
    np.testing.assert_allclose(step(tf.constant(summed)).numpy(), want, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(step(tf.constant(summed / RANKS)).numpy(), want / RANKS, rtol=1e-6, atol=tol)
    if fused and HAVE_KERNELS:
        xp = backend_for(tf.constant(summed))
        assert isinstance(dec.codec._engines.get((xp.name, engines.GraphFusedEngine)), engines.GraphFusedEngine)

    g = H.NUQCompressor(bucket_size=B, seed=0, fused=fused, protocol="allgather")
    parts = [H.NUQCompressor(bucket_size=B, seed=i, fused=fused, protocol="allgather").compress_for_allgather(x)
             for i, x in enumerate(xs)]
    gathered = np.concatenate([np.asarray(p) for p, _ in parts])
    gctx = parts[0][1]
    avg = tf.function(lambda p: g.decompress_gathered(p, gctx))
    tot = tf.function(lambda p: g.decompress_gathered(p, gctx, average=False))
    singles = np.stack([g.decompress_gathered(p, gctx) for p, _ in parts]).astype(np.float64)
    tol = 1e-6 * np.abs(singles).max()
    np.testing.assert_allclose(avg(tf.constant(gathered)).numpy(), singles.mean(0), rtol=1e-6, atol=tol)
    np.testing.assert_allclose(tot(tf.constant(gathered)).numpy(), singles.sum(0), rtol=1e-6, atol=tol)
