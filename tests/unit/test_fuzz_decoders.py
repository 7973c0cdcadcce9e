"""Fuzz the decoders: random or truncated payloads raise a clear ValueError, never a wrongly
sized tensor or an out-of-bounds read."""
import numpy as np
import pytest
import torch

import horovod_nuq as H
from horovod_nuq import wire
from horovod_nuq.backends import backend_for


@pytest.mark.parametrize("cls", [H.QSGDCompressor, H.NUQCompressor, H.TNQCompressor])
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_random_and_truncated_allgather_payloads(cls, as_torch):
    comp = cls(bits=3, bucket_size=64, protocol="allgather", seed=0)
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    good, ctx = comp.compress_for_allgather(torch.from_numpy(x) if as_torch else x)
    good = np.asarray(good)
    rng = np.random.default_rng(1)
    for trial in range(300):
        kind = trial % 3
        if kind == 0:
            bad = rng.integers(0, 256, good.size * rng.integers(1, 4), dtype=np.uint8)
        elif kind == 1:
            bad = good[: rng.integers(0, good.size)]
        else:
            bad = good.copy()
            bad[rng.integers(0, bad.size, 3)] ^= rng.integers(1, 256, 3, dtype=np.uint8)
        payload = torch.from_numpy(bad) if as_torch else bad
        if kind == 1:  # a truncated payload is never a whole rank's: it must raise
            with pytest.raises(ValueError, match="payload"):
                comp.decompress_gathered(payload, ctx)
            continue
        try:
            out = comp.decompress_gathered(payload, ctx)
        except ValueError as e:
            assert any(w in str(e) for w in ("payload", "codes", "settings")), str(e)
            continue
        # only payloads that still look valid decode, and then to the right shape and dtype
        assert tuple(out.shape) == (300,) and backend_for(out).dtype_name(out) == "float32"


def test_random_summable_payloads():
    comp = H.QSGDInfCompressor(bits=4, bucket_size=64)
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    good, ctx = comp.compress(x)
    rng = np.random.default_rng(2)
    layout = comp.codec.layout(1)
    for _ in range(100):
        bad = good * rng.uniform(0.3, 3.0) + rng.standard_normal(good.size) * 0.4
        with pytest.raises(ValueError, match="summable payload"):
            comp.decompress(bad, ctx)
    with pytest.raises(ValueError, match="expected"):
        comp.decompress(good[:-2], ctx)
    neg = good.copy()
    neg[-1] = -1.0
    with pytest.raises(ValueError, match="sentinel"):
        wire.unpack_sums(backend_for(neg), neg, layout, ctx.tensor.n_buckets * 64)


@pytest.mark.parametrize("fused", [None, False], ids=["default-engine", "generic"])
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_every_truncation_raises(fused, as_torch):
    """Every proper prefix of a payload raises ValueError, on both engines: allgather payloads
    of one or two ranks (except the prefix that is exactly one whole rank), summable words."""
    x = np.random.default_rng(3).standard_normal(300).astype(np.float32)
    xt = torch.from_numpy(x) if as_torch else x
    conv = (lambda a: torch.from_numpy(np.ascontiguousarray(a))) if as_torch else (lambda a: a)
    g = H.NUQCompressor(bits=3, bucket_size=64, protocol="allgather", seed=0, fused=fused)
    one, ctx = g.compress_for_allgather(xt)
    one = np.asarray(one)
    two = np.concatenate([one, np.asarray(g.compress_for_allgather(xt)[0])])
    for payload in (one, two):
        for size in range(payload.size):
            if size == one.size:
                continue
            with pytest.raises(ValueError, match="payload"):
                g.decompress_gathered(conv(payload[:size]), ctx)
    a = H.QSGDCompressor(bits=4, bucket_size=64, protocol="allreduce", seed=0, fused=fused)
    words, actx = a.compress(xt)
    words = np.asarray(words)
    for size in range(words.size):
        with pytest.raises(ValueError, match="summable payload"):
            a.decompress(conv(words[:size]), actx)
