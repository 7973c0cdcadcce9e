"""The fused C kernels: same wire formats as the generic codec, unbiased, exact variance."""
import numpy as np
import pytest
from _helpers import unbiasedness_check

import horovod_nuq as H
from horovod_nuq import kernels, reference

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C compiler for the fused kernels")
CLASSES = [H.QSGDCompressor, H.QSGDInfCompressor, H.NUQCompressor, H.TNQCompressor, H.GlobalQSGDCompressor]


def _cases():
    for cls in CLASSES:
        yield cls, "allreduce"
        if cls is not H.GlobalQSGDCompressor:
            yield cls, "allgather"


def _roundtrip(comp, x, decoder=None):
    decoder = decoder or comp
    if comp.protocol == "allreduce":
        p, ctx = comp.compress(x)
        return decoder.decompress(p, ctx)
    p, ctx = comp.compress_for_allgather(x)
    return decoder.decompress_gathered(p, ctx)


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.random(n) ** 3).astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    return x


@pytest.mark.parametrize("cls,protocol", list(_cases()), ids=lambda v: getattr(v, "__name__", v))
def test_fused_payload_decodes_identically_with_the_generic_codec(cls, protocol):
    x = _data()
    fused = cls(seed=1, protocol=protocol, fused=True, bucket_size=300)
    generic = cls(seed=1, protocol=protocol, fused=False, bucket_size=300)
    if protocol == "allreduce":
        p, ctx = fused.compress(x)
        a, b = fused.decompress(p, ctx), generic.decompress(p, ctx)
        p2, ctx2 = generic.compress(x)
        np.testing.assert_allclose(fused.decompress(p2, ctx2), generic.decompress(p2, ctx2), rtol=1e-6, atol=1e-7)
    else:
        p, ctx = fused.compress_for_allgather(x)
        a, b = fused.decompress_gathered(p, ctx), generic.decompress_gathered(p, ctx)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert a.shape == x.shape and a.dtype == x.dtype


def _targets(x, scheme):
    """Per coordinate: the float32 scale r the encoder uses (as float64) and E[Q(x)]: x for
    the unbiased schemes, x clipped to [-r, r] for TNQ (unbiased for the clipped input)."""
    r = np.repeat(reference.bucket_scales(x, scheme).astype(np.float32), scheme.bucket_size)[: x.size]
    r = r.astype(np.float64)
    x64 = x.astype(np.float64)
    return r, (x64 if scheme.unbiased else np.clip(x64, -r, r))


@pytest.mark.parametrize("cls,protocol", list(_cases()), ids=lambda v: getattr(v, "__name__", v))
def test_fused_is_unbiased_with_the_exact_variance(cls, protocol):
    """E[Q(x)] = x by the derived z^2 check (_helpers.unbiasedness_check), and the mean
    squared error matches the exact variance within 5 standard errors."""
    x, T = _data(), 400
    comp = cls(seed=7, protocol=protocol, fused=True)
    outs = np.stack([_roundtrip(comp, x) for _ in range(T)]).astype(np.float64)
    r, target = _targets(x, comp.scheme)
    res = unbiasedness_check(outs, target, r, comp.scheme.levels.values)
    assert res["ok"], res
    var = reference.coordinate_variance(x, comp.scheme)
    err = ((outs - target) ** 2).sum(1)
    assert abs(err.mean() - var.sum()) < 5 * err.std(ddof=1) / np.sqrt(T)


def test_fused_seeded_runs_repeat_and_calls_differ():
    x = _data()
    a, b = H.NUQCompressor(seed=3), H.NUQCompressor(seed=3)
    first = [_roundtrip(a, x), _roundtrip(a, x)]
    again = [_roundtrip(b, x), _roundtrip(b, x)]
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])


def test_fused_handles_tiny_odd_and_nonfinite_tensors():
    for n in (1, 7, 513):
        x = _data(n)
        for cls, protocol in _cases():
            y = _roundtrip(cls(protocol=protocol, fused=True), x)
            assert y.shape == x.shape and np.isfinite(y).all()
    x = _data(1024)
    x[5] = np.nan
    y = _roundtrip(H.QSGDCompressor(fused=True), x)
    assert not np.isfinite(y[:512]).any() and np.isfinite(y[512:]).all()


@pytest.mark.parametrize("protocol", ["allreduce", "allgather"])
def test_fused_inside_tf_function_is_unbiased(protocol):
    """The graph-fused engine (kernels through tf.numpy_function) decodes to an unbiased Q(x),
    traced once."""
    tf = pytest.importorskip("tensorflow")
    x, T = _data(), 300
    comp = H.NUQCompressor(seed=2, protocol=protocol, fused=True)
    if protocol == "allreduce":
        step = tf.function(lambda t: comp.decompress(*comp.compress(t)))
    else:
        step = tf.function(lambda t: comp.decompress_gathered(*comp.compress_for_allgather(t)))
    xt = tf.constant(x)
    outs = np.stack([step(xt).numpy() for _ in range(T)]).astype(np.float64)
    assert step.experimental_get_tracing_count() == 1
    r, target = _targets(x, comp.scheme)
    res = unbiasedness_check(outs, target, r, comp.scheme.levels.values)
    assert res["ok"], res
