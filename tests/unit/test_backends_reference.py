"""Every backend's codec decodes to the float64 reference quantizer's values for the same uniforms."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from _helpers import FIGURES, FRAMEWORKS, codec_roundtrip, to_fw, to_np

from horovod_nuq import codec, reference, schemes, wire
from horovod_nuq.backends import backend_for

CASES = [  # (scheme name, options)
    ("qsgd", {"bits": 2}), ("qsgd", {"bits": 4}), ("qsgd", {"bits": 8}), ("qsgd", {"levels": 5}),
    ("qsgdinf", {"bits": 3}), ("qsgdinf", {"bits": 8}),
    ("nuqsgd", {"bits": 2}), ("nuqsgd", {"bits": 4}), ("nuqsgd", {"bits": 6}),
    ("tnqsgd", {"bits": 2}), ("tnqsgd", {"bits": 4}), ("tnqsgd", {"bits": 8}),
    ("globalqsgd", {"bits": 4}), ("globalqsgd", {"bits": 4, "spacing": "exponential"}),
]
B = 128


def _data(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 5 * B + 37  # a partial last bucket
    x = rng.standard_normal(n) * np.exp(rng.normal(0, 1.5, n))  # mixed magnitudes
    x[rng.random(n) < 0.1] = 0.0
    x[: B // 2] = rng.laplace(0, 1, B // 2)
    x[B: 2 * B] = 0.0  # an all-zero bucket
    x[2 * B + 3] = 1e3  # an outlier (clipped by TNQ)
    return x.astype(np.float32)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_backend_matches_reference(fw, name, opts):
    scheme = schemes.make_scheme(name, bucket_size=B, **opts)
    x = _data(zlib.crc32(repr((name, opts)).encode()) % 1000)
    nb = codec.n_buckets(x.size, B)
    u = np.random.default_rng(7).random((nb, B), dtype=np.float32)
    y, r = codec_roundtrip(fw, x, scheme, u)
    r_ref = reference.bucket_scales(x.astype(np.float64), scheme)
    np.testing.assert_allclose(r, r_ref, rtol=2e-6, atol=0)
    ref = reference.quantize(x.astype(np.float64), scheme, u)
    assert y.shape == ref.shape == x.shape
    r_coord = np.repeat(r_ref, B)[: x.size]
    close = np.abs(y - ref) <= 1e-6 * r_coord + 1e-6 * np.abs(ref)
    mismatch = 1 - close.mean()
    # float32 vs float64 only matters when u falls between the two rounding probabilities
    assert mismatch < 1e-3, f"{mismatch:.2e} of coordinates differ"
    # a mismatch must still be one of the two levels around x (never arbitrary)
    lv = scheme.levels.values
    bad = np.flatnonzero(~close)
    for i in bad:
        cand = np.sign(x[i]) * lv * r_coord[i]
        assert np.min(np.abs(cand - y[i])) <= 1e-5 * r_coord[i]
    key = "backend vs reference: mismatched coordinates (all cases)"
    done, total = map(int, FIGURES.get(key, "0/0").split("/"))
    FIGURES[key] = f"{done + bad.size}/{total + x.size}"


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,opts", [("qsgdinf", {"levels": 4}),
                                       ("globalqsgd", {"bits": 4, "spacing": "exponential"}),
                                       ("qsgdinf", {"levels": 8})])
def test_values_on_the_level_grid_are_exact_for_any_u(fw, name, opts):
    """With a max-norm scale that is a power of two and dyadic levels, x = +-l_j * M is
    representable exactly, so Q(x) = x whatever the uniforms (u = 0 and u -> 1 included)."""
    scheme = schemes.make_scheme(name, bucket_size=64, **opts)
    lv = scheme.levels.values
    rng = np.random.default_rng(3)
    M = 4.0
    x = (rng.choice(lv, 256) * rng.choice([-1.0, 1.0], 256) * M).astype(np.float32)
    x[::64] = M  # every bucket reaches the scale M
    for u_val in (0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))):
        u = np.full((4, 64), u_val, np.float32)
        y, _ = codec_roundtrip(fw, x, scheme, u)
        np.testing.assert_array_equal(y, x.astype(np.float64))


@pytest.mark.parametrize("fw", ["torch", "tensorflow"])
def test_backends_agree_exactly_with_numpy_on_indices(fw):
    """Same float32 inputs and uniforms: torch/tf level indices equal numpy's (same float32 math)."""
    rng = np.random.default_rng(11)
    for name in ("qsgd", "nuqsgd", "tnqsgd"):
        scheme = schemes.make_scheme(name, bits=4, bucket_size=256)
        x = rng.standard_normal(1000).astype(np.float32)
        u = rng.random((4, 256), dtype=np.float32)
        out = []
        for f in ("numpy", fw):
            t = to_fw(f, x)
            xp = backend_for(t)
            tab = codec.Tables(scheme)
            v = codec.to_buckets(xp, t, 256)
            r = codec.local_scale(xp, v, scheme, 1000)
            idx = codec.quantize(xp, v, r, tab, to_fw(f, u))
            out.append(to_np(idx))
        frac = np.mean(out[0] != out[1])
        assert frac < 1e-3, (name, frac)
        assert out[1].dtype == np.int64


def test_tf_codec_inside_tf_function_matches_eager():
    tf = pytest.importorskip("tensorflow")
    scheme = schemes.make_scheme("nuqsgd", bits=4, bucket_size=64)
    tab = codec.Tables(scheme)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.standard_normal(300).astype(np.float32))
    u = tf.constant(rng.random((5, 64), dtype=np.float32))
    layout = wire.SumLayout(scheme.levels.denominator, 1).check()

    def pipeline(x, u):
        xp = backend_for(x)
        v = codec.to_buckets(xp, x, 64)
        r = codec.local_scale(xp, v, scheme, 300)
        idx = codec.quantize(xp, v, r, tab, u)
        codes = wire.pack_codes(xp, idx, tab.k, scheme.code_bits)
        back = wire.unpack_codes(xp, codes, tab.k, scheme.code_bits, 5 * 64)
        sums, _ = wire.unpack_sums(xp, wire.pack_sums(xp, codec.numerators(xp, idx, tab), layout),
                                   layout, 5 * 64)
        q = codec.dequantize(xp, tf.reshape(back, [5, 64]), r, tab)
        q2 = codec.from_numerator_sums(xp, tf.reshape(sums, [5, 64]), r, tab)
        return (codec.from_buckets(xp, q, 300, (300,), "float32"),
                codec.from_buckets(xp, q2, 300, (300,), "float32"))

    eager = pipeline(x, u)
    graph = tf.function(pipeline)(x, u)
    for a, b in zip(eager, graph):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(eager[0].numpy(), eager[1].numpy(), rtol=1e-6, atol=0)
