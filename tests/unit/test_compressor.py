"""The Compressor end to end on one rank (numpy, torch and tf inputs; horovod_nuq.local)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from _helpers import FRAMEWORKS, SimulatedRank, fw_dtype_name, to_fw, to_np, unbiasedness_check

import horovod_nuq as H
from horovod_nuq import codec, reference, wire
from horovod_nuq.backends import backend_for

KINDS = {"qsgd": H.QSGDCompressor, "qsgdinf": H.QSGDInfCompressor, "nuqsgd": H.NUQCompressor,
         "tnqsgd": H.TNQCompressor, "globalqsgd": H.GlobalQSGDCompressor}
PROTOCOLS = ("allreduce", "allgather")
COMBOS = [(n, p) for n in KINDS for p in PROTOCOLS if not (n == "globalqsgd" and p == "allgather")]


def roundtrip(c, t):
    if c.protocol == "allreduce":
        p, ctx = c.compress(t)
        return p, ctx, c.decompress(p, ctx)
    p, ctx = c.compress_for_allgather(t)
    return p, ctx, c.decompress_gathered(p, ctx)


def assert_on_level_grid(x, y, scheme, atol_rel=1e-5):
    """y must be, coordinate by coordinate, one of the two signed levels that bracket x
    (times the bucket's scale): the only values stochastic rounding can produce."""
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    if x.size == 0:
        return
    r = np.repeat(reference.bucket_scales(x, scheme), scheme.bucket_size)[: x.size]
    lv = scheme.levels.values
    safe = np.where(r > 0, r, 1.0)
    xn = np.minimum(np.abs(x) / safe, 1.0)
    j = np.clip(np.searchsorted(lv, xn, side="right") - 1, 0, len(lv) - 2)
    yn = np.abs(y) / safe
    ok = (np.abs(yn - lv[j]) <= atol_rel) | (np.abs(yn - lv[j + 1]) <= atol_rel)
    ok &= (y == 0) | (np.sign(y) == np.sign(x))
    ok |= (r == 0) & (y == 0)
    assert ok.all(), f"{(~ok).sum()} coordinates off the level grid"


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", COMBOS)
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (100,), (700,), (2, 3, 128), (0,), (4, 0)],
                         ids=str)
def test_shapes(fw, name, protocol, shape):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    c = KINDS[name](bits=4, bucket_size=512, seed=3, protocol=protocol)
    _, _, y = roundtrip(c, to_fw(fw, x))
    assert tuple(y.shape) == shape
    assert fw_dtype_name(y) == "float32"
    y = to_np(y)
    assert np.isfinite(y).all()
    assert_on_level_grid(x, y, c.scheme)


DTYPES = {"numpy": ["float16", "float32", "float64"],
          "torch": ["float16", "bfloat16", "float32", "float64"],
          "tensorflow": ["float16", "bfloat16", "float32", "float64"]}


@pytest.mark.parametrize("fw,dtype", [(f, d) for f in FRAMEWORKS for d in DTYPES[f]])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dtype_preserved(fw, dtype, protocol):
    x = np.random.default_rng(0).standard_normal((7, 100)).astype(np.float32)
    t = to_fw(fw, x, dtype)
    c = H.NUQCompressor(bits=4, bucket_size=256, seed=0, protocol=protocol)
    _, _, y = roundtrip(c, t)
    assert fw_dtype_name(y) == dtype
    assert tuple(y.shape) == (7, 100)
    xin = to_np(t).astype(np.float64)  # what the compressor actually saw
    tol = {"float16": 2e-3, "bfloat16": 1e-2}.get(dtype, 1e-5)
    assert_on_level_grid(xin, to_np(y), c.scheme, atol_rel=tol)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", COMBOS)
def test_zeros_decode_to_exact_zeros(fw, name, protocol):
    c = KINDS[name](bits=3, bucket_size=64, seed=1, protocol=protocol)
    for shape in [(200,), (64,), (1,)]:
        _, _, y = roundtrip(c, to_fw(fw, np.zeros(shape, np.float32)))
        y = to_np(y)
        assert y.shape == shape and np.all(y == 0)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", COMBOS)
def test_seeds(fw, name, protocol):
    x = to_fw(fw, np.random.default_rng(2).standard_normal(3000).astype(np.float32))
    cls = KINDS[name]
    a = to_np(roundtrip(cls(bits=4, seed=5, protocol=protocol), x)[2])
    b = to_np(roundtrip(cls(bits=4, seed=5, protocol=protocol), x)[2])
    d = to_np(roundtrip(cls(bits=4, seed=6, protocol=protocol), x)[2])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, d)
    # the stream advances: a second call on the same compressor draws new uniforms
    c = cls(bits=4, seed=5, protocol=protocol)
    first = to_np(roundtrip(c, x)[2])
    second = to_np(roundtrip(c, x)[2])
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)
    # no seed: fresh entropy per compressor
    e = to_np(roundtrip(cls(bits=4, protocol=protocol), x)[2])
    f = to_np(roundtrip(cls(bits=4, protocol=protocol), x)[2])
    assert not np.array_equal(e, f)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", COMBOS)
@pytest.mark.parametrize("numel", [0, 1, 100, 512, 1500, 4096])
def test_stats_and_payload_sizes(fw, name, protocol, numel):
    bits = 4
    c = KINDS[name](bits=bits, bucket_size=512, seed=0, protocol=protocol)
    x = to_fw(fw, np.random.default_rng(1).standard_normal(numel).astype(np.float32))
    p, ctx, _ = roundtrip(c, x)
    xp = backend_for(p)
    nb = codec.n_buckets(numel, 512)
    assert (ctx.tensor.numel, ctx.tensor.n_buckets) == (numel, nb)
    assert c.stats.total_bytes == c.payload_bytes(numel)
    assert c.stats.total_float32_bytes == 4 * numel and c.stats.tensors == 1
    if protocol == "allgather":
        assert xp.dtype_name(p) == "uint8"
        assert xp.numel(p) == c.payload_bytes(numel) == 4 + 4 * nb + wire.packed_code_bytes(nb * 512, bits)
        if numel >= 512:
            assert xp.numel(p) < 4 * numel
    else:
        assert xp.dtype_name(p) == "float64"
        # the stats also count the float32 scale agreement (nb scales + 2 config ids)
        assert 8 * xp.numel(p) == c.payload_bytes(numel) - 4 * (nb + 2)
        if name == "qsgd" and numel >= 512:
            assert 8 * xp.numel(p) < 4 * numel
            assert c.payload_bytes(numel) < 4 * numel
    roundtrip(c, x)
    assert c.stats.total_bytes == 2 * c.payload_bytes(numel) and c.stats.tensors == 2
    assert c.stats.mark_step() == 2 * c.payload_bytes(numel)


@pytest.mark.parametrize("name", ["qsgd", "qsgdinf", "nuqsgd", "tnqsgd"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_allgather_payload_smaller_than_float32(name, bits):
    if name == "nuqsgd" and bits > 6:
        pytest.skip("NUQSGD supports at most 6 bits")
    c = KINDS[name](bits=bits, bucket_size=512, protocol="allgather", seed=0)
    p, _ = c.compress_for_allgather(np.random.default_rng(0).standard_normal(512).astype(np.float32))
    assert p.dtype == np.uint8
    assert p.nbytes == 4 + 4 + 512 * bits // 8 < 4 * 512  # settings id, one scale, codes


@pytest.mark.parametrize("name,protocol", COMBOS)
def test_repeated_compression_is_unbiased_end_to_end(name, protocol):
    """Cheap end-to-end sanity: the average of 200 decodes of the same tensor is close to it."""
    if name == "tnqsgd":
        pytest.skip("biased by design (see test_unbiased.py)")
    x = np.random.default_rng(4).standard_normal(1024).astype(np.float32)
    c = KINDS[name](bits=3, bucket_size=256, seed=9, protocol=protocol)
    ys = np.stack([to_np(roundtrip(c, x)[2]) for _ in range(200)]).astype(np.float64)
    r = np.repeat(reference.bucket_scales(x, c.scheme), 256)
    res = unbiasedness_check(ys, x.astype(np.float64), r, c.scheme.levels.values)
    assert res["ok"], res


# ---- simulated ranks: Sum / Average semantics through the Compressor -------------------------
def _decode_fields(payload, layout, count):
    """Independent decoder of one rank's summable payload (Python ints)."""
    out = []
    for w in payload[:-1]:
        w = int(w)
        out += [((w >> (layout.width * i)) & ((1 << layout.width) - 1)) - layout.bound
                for i in range(layout.per_word)]
    return np.array(out[:count])


@pytest.mark.parametrize("name", ["qsgd", "nuqsgd", "tnqsgd", "globalqsgd"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_simulated_ranks_allreduce(monkeypatch, name, ranks):
    B, n = 128, 300
    rng = np.random.default_rng(ranks)
    xs = [rng.standard_normal(n).astype(np.float32) * (i + 1) for i in range(ranks)]
    cls = KINDS[name]
    probe = cls(bits=4, bucket_size=B, seed=1)
    xp = backend_for(xs[0])
    local_r = [codec.local_scale(xp, codec.to_buckets(xp, x, B), probe.scheme, n) for x in xs]
    cid = np.array([probe.codec.settings_id(None), -probe.codec.settings_id(None)], np.float32)
    agreed = np.concatenate([np.max(local_r, axis=0), cid]).astype(np.float32)
    payloads, ctxs, comps = [], [], []
    for i, x in enumerate(xs):
        c = cls(bits=4, bucket_size=B, seed=1, protocol="allreduce",
                collectives=SimulatedRank(i, ranks, agreed))
        p, ctx = c.compress(x)
        payloads.append(p)
        ctxs.append(ctx)
        comps.append(c)
    np.testing.assert_array_equal(ctxs[0].scale, agreed[:-2])
    layout = comps[0].codec.layout(ranks)
    nb = codec.n_buckets(n, B)
    fields = [_decode_fields(p, layout, nb * B) for p in payloads]
    for f in fields:
        assert np.abs(f).max() <= probe.scheme.levels.denominator
    r = np.repeat(agreed[:-2].astype(np.float64), B)
    total = np.sum(fields, axis=0) * r / probe.scheme.levels.denominator
    total = total[:n]
    summed = payloads[0].copy()
    for p in payloads[1:]:
        summed = summed + p
    y_sum = comps[0].decompress(summed, ctxs[0])
    y_avg = comps[0].decompress(summed / ranks, ctxs[0])
    np.testing.assert_allclose(y_sum, total, rtol=1e-6, atol=1e-6 * r.max())
    np.testing.assert_allclose(y_avg, total / ranks, rtol=1e-6, atol=1e-6 * r.max())
    # each rank's quantized values sit on the shared grid, bracketing its input
    for x, f in zip(xs, fields):
        xn = np.minimum(np.abs(x) / r[:n], 1.0) * probe.scheme.levels.denominator
        lv_num = np.asarray(probe.scheme.levels.numerators)
        j = np.clip(np.searchsorted(lv_num, xn, side="right") - 1, 0, len(lv_num) - 2)
        fa = np.abs(f[:n])
        assert np.all((fa == lv_num[j]) | (fa == lv_num[j + 1]))


def test_simulated_config_mismatch_is_detected(monkeypatch):
    agreed = np.array([1.0, 1.0, 5.0, -3.0], np.float32)  # ranks disagree on the config id
    c = H.QSGDCompressor(bits=4, bucket_size=64, seed=0, protocol="allreduce",
                         collectives=SimulatedRank(0, 2, agreed, texts=["QSGDCompressor(other)"]))
    x = np.ones(100, np.float32)
    with pytest.raises(ValueError, match=r"different compressor settings \(rank 0: QSGDCompressor\(qsgd"
                                         r"\(bits=4.*rank 1: QSGDCompressor\(other\)"):
        c.compress(x)


@pytest.mark.parametrize("name", ["qsgd", "nuqsgd", "tnqsgd"])
def test_simulated_ranks_allgather(name):
    cls = KINDS[name]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(300).astype(np.float32) for _ in range(3)]
    singles, payloads = [], []
    for i, x in enumerate(xs):
        c = cls(bits=4, bucket_size=128, seed=i, protocol="allgather")
        p, ctx = c.compress_for_allgather(x)
        payloads.append(p)
        singles.append(c.decompress_gathered(p, ctx).astype(np.float64))
    gathered = np.concatenate(payloads)
    avg = c.decompress_gathered(gathered, ctx)
    tot = c.decompress_gathered(gathered, ctx, average=False)
    np.testing.assert_allclose(avg, np.mean(singles, axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tot, np.sum(singles, axis=0), rtol=1e-6, atol=1e-6)
    # Horovod-style decompress() with an allgather context (no agreed scale) routes the same way
    np.testing.assert_array_equal(c.decompress(gathered, ctx), avg)


# ---- NaN / Inf --------------------------------------------------------------------------------
def _nan_case(fw, name, protocol, bad, pos, n=2048, B=512):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    outs = []
    for val in (bad, 0.0):
        xx = x.copy()
        xx[pos] = val
        c = KINDS[name](bits=4, bucket_size=B, seed=1, protocol=protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            outs.append(to_np(roundtrip(c, to_fw(fw, xx))[2]).reshape(n // B, B))
    return outs


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", COMBOS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_stays_in_its_bucket(fw, name, protocol, bad):
    for pos in (0, 700, 2047):
        y_bad, y_ref = _nan_case(fw, name, protocol, bad, pos)
        b = pos // 512
        assert not np.isfinite(y_bad[b]).any(), "the bucket with a non-finite input must be non-finite"
        for i in range(y_bad.shape[0]):
            if i != b:
                np.testing.assert_array_equal(y_bad[i], y_ref[i])


def _straddling_position(per_word, B, n, right_after_first=False):
    """A coordinate that is the first field of a summable word whose other fields lie partly in
    the next bucket; with right_after_first, the bucket boundary falls right after it."""
    for p in range(0, n - per_word, per_word):
        last = p + per_word - 1
        if p // B != last // B and (not right_after_first or p % B == B - 1):
            return p
    raise AssertionError("no straddling word")


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name", ["qsgd", "qsgdinf", "globalqsgd"])
def test_nan_at_word_straddling_bucket_boundary_allreduce(fw, name):
    c = KINDS[name](bits=4, bucket_size=512)
    per = c.codec.layout(1).per_word  # 11 four-bit fields per word
    pos = _straddling_position(per, 512, 2048, right_after_first=True)
    assert pos == 1023  # word 93 holds coordinates 1023 (bucket 1) and 1024..1033 (bucket 2)
    y_bad, y_ref = _nan_case(fw, name, "allreduce", np.nan, pos)
    b = pos // 512
    assert not np.isfinite(y_bad[b]).any()
    for i in range(4):
        if i != b:
            np.testing.assert_array_equal(y_bad[i], y_ref[i])


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name,protocol", [("nuqsgd", "allreduce"), ("tnqsgd", "allreduce"),
                                           ("qsgd", "allgather")])
def test_nan_at_word_straddling_bucket_boundary_ok(fw, name, protocol):
    c = KINDS[name](bits=4, bucket_size=512)
    per = c.codec.layout(1).per_word
    pos = _straddling_position(per, 512, 2048)
    y_bad, y_ref = _nan_case(fw, name, protocol, np.nan, pos)
    b = pos // 512
    assert not np.isfinite(y_bad[b]).any()
    for i in range(4):
        if i != b:
            np.testing.assert_array_equal(y_bad[i], y_ref[i])


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_quantize_indices_in_range_for_nonfinite_bucket(fw):
    from horovod_nuq import schemes
    scheme = schemes.make_scheme("qsgd", bits=4, bucket_size=8)
    x = np.arange(16, dtype=np.float32) - 8
    x[3] = np.nan
    x[12] = np.inf
    t = to_fw(fw, x)
    xp = backend_for(t)
    tab = codec.Tables(scheme)
    v = codec.to_buckets(xp, t, 8)
    r = codec.local_scale(xp, v, scheme, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idx = to_np(codec.quantize(xp, v, r, tab, to_fw(fw, np.full((2, 8), 0.5, np.float32))))
    k = scheme.levels.k
    assert np.all((idx >= -k) & (idx <= k)), idx


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("name", ["qsgd", "nuqsgd", "globalqsgd"])
def test_agree_scales_batch_matches_per_tensor_agreement(fw, name):
    """One agreement for several tensors gives each tensor the scales (and so the payload)
    that compress() agrees on alone; the bytes count the shared config ids once."""
    rng = np.random.default_rng(3)
    xs = [to_fw(fw, rng.standard_normal(n).astype(np.float32)) for n in (700, 1, 4096)]
    alone, batched = KINDS[name](seed=4, protocol="allreduce"), KINDS[name](seed=4, protocol="allreduce")
    scales = batched.agree_scales(xs)
    for x, r in zip(xs, scales):
        p1, c1 = alone.compress(x)
        p2, c2 = batched.compress(x, scale=r)
        np.testing.assert_array_equal(to_np(c1.scale), to_np(c2.scale))
        np.testing.assert_array_equal(to_np(p1), to_np(p2))
        np.testing.assert_array_equal(to_np(alone.decompress(p1, c1)), to_np(batched.decompress(p2, c2)))
    assert batched.stats.total_bytes == alone.stats.total_bytes - 8 * (len(xs) - 1)
    assert batched.stats.tensors == alone.stats.tensors == len(xs)
    assert batched.agree_scales([]) == []
    with pytest.raises(ValueError, match="buckets: pass this tensor's entry of agree_scales"):
        batched.compress(xs[2], scale=scales[0])
