"""HSQ (hyper-sphere quantization): codebook, codec against the NumPy oracle (float32 and
quantized scalars), payload size, decoder robustness, protocol routing, simulated ranks, its
(predicted) bias and the unbiased rounding of its scalars."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import FRAMEWORKS, GatheringRank, framework, to_fw, to_np

import horovod_nuq as H
from horovod_nuq import hsq, reference, wire
from horovod_nuq.backends import backend_for
from horovod_nuq.hsq_codec import HSQCodec

SETTINGS = [(256, 16), (64, 8), (300, 8), (16, 16), (200, 12)]  # (K, dim); 300: 9-bit indices
# (K, dim, scalar_bits): every setting with float32 and the default 6-bit scalars, and a few
# other scalar widths (1 bit: min or max only; 16: the widest, packed in two parts)
ORACLE_CASES = ([(k, d, 32) for k, d in SETTINGS] + [(k, d, 6) for k, d in SETTINGS]
                + [(256, 16, 1), (64, 8, 3), (256, 16, 12), (300, 8, 16)])


class FixedDraws:
    """Stands in for a codec's random stream: hands out the given uniforms."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self.uniforms = np.asarray(uniforms, np.float32)

    def uniform(self, xp, like):
        return xp.constant(self.uniforms, like)


def _fix_draws(tc: HSQCodec, uniforms: np.ndarray) -> None:
    tc.draws = lambda coll: FixedDraws(uniforms)


def _gradient(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n) * (1 + seed)
    g[rng.random(n) < 0.05] *= 10.0
    return g.astype(np.float32)


def _oracle(x: np.ndarray, scheme: hsq.HSQScheme, uniforms: np.ndarray | None = None) -> reference.HSQOracle:
    return reference.hsq(x, hsq.codebook(scheme.codebook_size, scheme.dim, scheme.codebook_seed), scheme.dim,
                         scheme.scalar_bits, uniforms)


def _split(raw: np.ndarray, scheme: hsq.HSQScheme, nc: int):
    """A numpy payload's (scalar bytes, packed indices)."""
    sb = hsq.scalar_bytes(scheme, nc)
    return raw[4:4 + sb], raw[4 + sb:]


# ---- codebook ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,dim", SETTINGS)
def test_codebook_is_unit_vectors_rebuilt_identically_from_the_seed(k, dim):
    c = hsq.codebook(k, dim, 808)
    assert c.shape == (k, dim) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c.astype(np.float64), axis=1), 1.0, atol=1e-6)
    rebuilt = hsq.codebook.__wrapped__(k, dim, 808)  # not the cached object: built again
    assert rebuilt.tobytes() == c.tobytes()
    assert hsq.codebook.__wrapped__(k, dim, 809).tobytes() != c.tobytes()
    if k == dim:  # the authors' orthonormal basis
        np.testing.assert_allclose(c.astype(np.float64) @ c.T, np.eye(k), atol=1e-6)
    else:  # no codeword repeated or antipodal: all 2K directions +-c distinct
        cos = np.abs(c.astype(np.float64) @ c.T) - 2 * np.eye(k)
        assert cos.max() < 1 - 1e-6


def test_kmeans_codebook_beats_random_unit_vectors():
    """The codebook's purpose: a smaller error than K random directions on isotropic chunks."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20000, 16))
    def rel_err(c):
        u = np.abs(x @ c.T.astype(np.float64)).max(axis=1)
        return np.sqrt(1 - np.sum(u * u) / np.sum(x * x))
    random = rng.standard_normal((256, 16))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    assert rel_err(hsq.codebook(256, 16, 808)) < rel_err(random)


# ---- codec against the oracle ------------------------------------------------------------
@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("k,dim,scalar_bits", ORACLE_CASES)
def test_round_trip_matches_the_oracle(fw, k, dim, scalar_bits):
    """Payload indices and scalars equal the oracle's (float64, chunk by chunk; quantized
    scalars from the same uniforms), except at near ties that float32 may break the other
    way: of |c . x| between codewords, or of a uniform and the fraction it is compared with.
    The decode equals (sent scalar) c_k."""
    framework(fw)
    scheme = hsq.HSQScheme(k, dim, scalar_bits=scalar_bits)
    tc = HSQCodec(scheme)
    x = _gradient(1000, k)  # 1000 is no multiple of 16 or 12: a padded tail chunk
    nc = hsq.n_chunks(x.size, dim)
    uniforms = np.random.default_rng(scalar_bits).random(nc, dtype=np.float32)
    _fix_draws(tc, uniforms)
    payload, ctx = tc.encode_codes(to_fw(fw, x))
    ref = _oracle(x, scheme, uniforms)
    raw = to_np(payload)
    assert raw.size == hsq.payload_bytes(scheme, x.size)
    scalars, packed = _split(raw, scheme, nc)
    idx = to_np(hsq.unpack_indices(*_xp("numpy", packed), scheme.index_bits, nc, k)).astype(np.int64)
    clear = ref.gap > 1e-5 * np.abs(ref.u)  # ties closer than float32 can resolve
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(idx[clear], ref.idx[clear])
    if scalar_bits == 32:
        u = scalars.view(np.float32).astype(np.float64)
        np.testing.assert_allclose(u[clear], ref.u[clear], rtol=1e-5, atol=1e-6 * np.abs(ref.u).max())
    else:
        bounds = scalars[:8].view(np.float32).astype(np.float64)
        np.testing.assert_allclose(bounds, [ref.u.min(), ref.u.max()], rtol=1e-5, atol=1e-6 * np.abs(ref.u).max())
        codes = to_np(hsq.unpack_indices(*_xp("numpy", scalars[8:]), scalar_bits, nc, 1 << scalar_bits))
        _, ref_codes, _ = reference.hsq_scalars(ref.u, scalar_bits, uniforms)
        clear &= ref.margin > 2e-6 * (1 << scalar_bits) + 1e-5  # float32's x vs float64's
        assert clear.mean() > (0.99 if scalar_bits <= 8 else 0.6)
        np.testing.assert_array_equal(codes[clear], ref_codes[clear])
    out = to_np(tc.decode_codes(payload, ctx, 1.0)).astype(np.float64)
    assert out.shape == x.shape
    per_chunk = np.repeat(clear, dim)[:x.size]
    np.testing.assert_allclose(out[per_chunk], ref.q[per_chunk], rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_blocked_encoder_equals_one_block(fw, monkeypatch):
    """Large tensors are encoded block by block (bounded memory): same payload as one block."""
    framework(fw)
    tc = HSQCodec(hsq.HSQScheme())
    _fix_draws(tc, np.random.default_rng(1).random(hsq.n_chunks(5000, 16)))  # the same draws twice
    x = to_fw(fw, _gradient(5000, 2))
    whole = to_np(tc.encode_codes(x)[0])
    monkeypatch.setattr(hsq, "BLOCK_SCORES", 256 * 7)  # blocks of 7 chunks, a shorter last one
    np.testing.assert_array_equal(to_np(tc.encode_codes(x)[0]), whole)


@pytest.mark.parametrize("scalar_bits", [32, 6])
def test_tf_function_encodes_and_decodes_like_eager(scalar_bits):
    """Inside tf.function as eagerly: float32 scalars give the same payload; quantized ones
    the same header, bounds and indices, and scalar codes one rounding apart at most (the
    graph draws its own uniforms); each payload decodes in the graph as in NumPy."""
    tf = framework("tensorflow")
    scheme = hsq.HSQScheme(scalar_bits=scalar_bits)
    tc = HSQCodec(scheme, seed=4)
    x = tf.constant(_gradient(777, 3).reshape(21, 37))

    @tf.function
    def graph(t):
        payload, ctx = tc.encode_codes(t)
        return payload, tc.decode_codes(tf.concat([payload, payload], 0), ctx)

    payload, out = graph(x)
    eager_payload, ctx = tc.encode_codes(x)
    # to the last bit at float32 scalars; the min-max interpolation may round 1 ulp apart
    np.testing.assert_allclose(out.numpy(), tc.decode_codes(np.concatenate([payload.numpy()] * 2), ctx),
                               rtol=0 if scalar_bits == 32 else 1e-6, atol=0)
    assert out.shape == x.shape
    if scalar_bits == 32:
        np.testing.assert_array_equal(payload.numpy(), eager_payload.numpy())
        return
    nc = ctx.n_buckets
    (s_graph, i_graph), (s_eager, i_eager) = (_split(p.numpy(), scheme, nc) for p in (payload, eager_payload))
    np.testing.assert_array_equal(payload.numpy()[:4], eager_payload.numpy()[:4])
    np.testing.assert_array_equal(i_graph, i_eager)
    np.testing.assert_array_equal(s_graph[:8], s_eager[:8])
    codes = [to_np(hsq.unpack_indices(*_xp("numpy", s[8:]), 6, nc, 64)) for s in (s_graph, s_eager)]
    assert np.abs(codes[0] - codes[1]).max() == 1  # stochastic: some differ, by one level at most
    # with the same uniforms, the graph's payload is the oracle's (as eagerly, test above)
    uniforms = np.random.default_rng(8).random(nc, dtype=np.float32)
    _fix_draws(tc, uniforms)
    graph_payload = tf.function(lambda t: tc.encode_codes(t)[0])(x).numpy()
    ref = _oracle(x.numpy(), scheme, uniforms)
    _, ref_codes, _ = reference.hsq_scalars(ref.u, 6, uniforms)
    got = to_np(hsq.unpack_indices(*_xp("numpy", _split(graph_payload, scheme, nc)[0][8:]), 6, nc, 64))
    clear = (ref.gap > 1e-5 * np.abs(ref.u)) & (ref.margin > 2e-4)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], ref_codes[clear])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_and_shape_are_restored(dtype):
    torch = framework("torch")
    tc = HSQCodec(hsq.HSQScheme())
    x = to_fw("torch", _gradient(60, 1).reshape(3, 4, 5), dtype)
    payload, ctx = tc.encode_codes(x)
    out = tc.decode_codes(payload, ctx)
    assert out.dtype == getattr(torch, dtype) and tuple(out.shape) == (3, 4, 5)


# ---- payload size ------------------------------------------------------------------------
@pytest.mark.parametrize("scalar_bits", [6, 32, 1, 16])
@pytest.mark.parametrize("k,dim", SETTINGS)
@pytest.mark.parametrize("numel", [1, 15, 16, 1000, 16 * 8192])
def test_payload_size_is_the_computed_bits_per_coordinate(k, dim, numel, scalar_bits):
    """Bytes handed to the allgather = header + the scalars (float32 each, or the float32
    min and max and scalar_bits bits per chunk) + ceil(log2 K) bits per chunk (in whole
    groups of 8), and the byte model and WireStats say the same."""
    comp = H.HSQCompressor(k, dim, scalar_bits=scalar_bits, collectives=GatheringRank(0, 1, {}))
    payload, _ = comp.compress_for_allgather(_gradient(numel, 1))
    nc = -(-numel // dim)
    bits = int(np.ceil(np.log2(k)))
    scalars = 4 * nc if scalar_bits == 32 else 8 + -(-nc // 8) * scalar_bits
    expected = 4 + scalars + -(-nc // 8) * bits
    assert payload.size == expected == comp.payload_bytes(numel) == comp.stats.total_bytes
    if numel == 16 * 8192:  # large tensors: (scalar bits + log2 K) / dim bits per coordinate
        assert abs(8 * payload.size / numel - (scalar_bits + bits) / dim) < 3e-3  # padding, bounds


def test_defaults_send_the_papers_bits_per_coordinate():
    """The authors' setting (K = 256, dim = 16, 6-bit scalars): 14 bits per chunk of 16,
    0.875 bits per coordinate plus 12 bytes of header and bounds per tensor."""
    comp = H.HSQCompressor(collectives=GatheringRank(0, 1, {}))
    assert (comp.scheme.codebook_size, comp.scheme.dim, comp.scheme.scalar_bits) == (256, 16, 6)
    n = 1 << 20
    assert 8 * comp.compress_for_allgather(_gradient(n, 2))[0].size == 0.875 * n + 8 * 12


@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize("bits", range(1, 17))
def test_index_packing_round_trips(fw, bits):
    framework(fw)
    rng = np.random.default_rng(bits)
    for k in {1 << bits, max(2, (1 << bits) - 3)}:
        idx = rng.integers(0, k, 1003)
        idx[:2] = [0, k - 1]
        packed = hsq.pack_indices(*_xp(fw, idx), bits)
        assert to_np(packed).size == wire.packed_code_bytes(1003, bits)
        out = hsq.unpack_indices(*_xp(fw, to_np(packed)), bits, 1003, k)
        np.testing.assert_array_equal(to_np(out), idx)


def _xp(fw, a):
    t = to_fw(fw, a)
    return backend_for(t), t


# ---- decoder robustness ------------------------------------------------------------------
def _payload(k=256, dim=16, n=1000, seed=808, scalar_bits=hsq.DEFAULT_SCALAR_BITS):
    tc = HSQCodec(hsq.HSQScheme(k, dim, seed, scalar_bits))
    payload, ctx = tc.encode_codes(_gradient(n, 0))
    return tc, np.array(payload), ctx


def test_truncated_payload_raises_clearly():
    tc, payload, ctx = _payload()
    for cut in (1, 5, payload.size - 1):
        with pytest.raises(ValueError, match="not a whole number of .*truncated"):
            tc.decode_codes(payload[:-cut], ctx)
    with pytest.raises(ValueError, match="not a whole number"):
        tc.decode_codes(payload[:0], ctx)


@pytest.mark.parametrize("scalar_bits", [6, 32])
@pytest.mark.parametrize("k,dim", [(200, 16), (300, 8), (5, 4)])  # 8, 9 and 3 index bits
def test_out_of_range_codeword_index_raises(k, dim, scalar_bits):
    tc, payload, ctx = _payload(k, dim, scalar_bits=scalar_bits)
    nc = ctx.n_buckets
    bits = tc.scheme.index_bits
    bad = payload.copy()
    bad[4 + hsq.scalar_bytes(tc.scheme, nc):] = 255  # every index all ones: 2^bits - 1 >= K
    with pytest.raises(ValueError, match="index is >= the codebook size"):
        tc.decode_codes(bad, ctx)
    assert (1 << bits) - 1 >= k


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_corrupt_scalar_bounds_raise_clearly(fw):
    """Quantized scalars: a payload whose minimum exceeds its maximum is refused."""
    framework(fw)
    tc, payload, ctx = _payload()
    bad = payload.copy()
    bad[4:8], bad[8:12] = payload[8:12], payload[4:8]  # max, min
    with pytest.raises(ValueError, match="minimum exceeds their maximum"):
        tc.decode_codes(to_fw(fw, bad), ctx)


@pytest.mark.parametrize("scalar_bits", [6, 32])
def test_random_bytes_raise_clearly_or_decode_finite_sizes(scalar_bits):
    """Fuzz: random payloads of the right length fail the header check; with a valid header,
    random bodies either decode (any float32 bits) or raise for an index >= K or (quantized
    scalars) a minimum above the maximum, never anything but ValueError."""
    tc, payload, ctx = _payload(200, 16, scalar_bits=scalar_bits)
    rng = np.random.default_rng(0)
    header_rejects = index_rejects = bound_rejects = 0
    for trial in range(60):
        bad = rng.integers(0, 256, payload.size, dtype=np.uint8)
        if trial % 2:
            bad[:4] = payload[:4]
        try:
            with np.errstate(all="ignore"):  # random float32 bits: inf, NaN, overflow
                out = tc.decode_codes(bad, ctx)
            assert out.shape == (1000,)
        except ValueError as e:
            header_rejects += "another codebook" in str(e)
            index_rejects += "codebook size" in str(e)
            bound_rejects += "minimum exceeds" in str(e)
    assert header_rejects == 30  # 63 indices of 8 bits: some >= 200 in every body
    assert index_rejects + bound_rejects == 30 and (bound_rejects > 5) == (scalar_bits < 32)


def test_payload_of_other_settings_or_codebook_raises():
    _, payload, ctx = _payload()
    for other in (HSQCodec(hsq.HSQScheme(256, 16, 809)), HSQCodec(hsq.HSQScheme(128, 16)),
                  HSQCodec(hsq.HSQScheme(scalar_bits=7)), HSQCodec(hsq.HSQScheme(scalar_bits=32))):
        with pytest.raises(ValueError, match="not a whole number|other settings"):
            other.decode_codes(payload, ctx)
    ids = {HSQCodec(hsq.HSQScheme(scalar_bits=b)).settings_id(1000) for b in (1, 6, 7, 16, 32)}
    assert len(ids) == 5  # the header tells scalar widths apart too
    other = HSQCodec(hsq.HSQScheme(256, 16, 809))
    same_size = other.context(*_xp("numpy", np.zeros(1000, np.float32)))
    with pytest.raises(ValueError, match="other settings, another codebook"):
        other.decode_codes(payload, same_size)


# ---- configuration and protocol ----------------------------------------------------------
def test_allgather_only():
    comp = H.HSQCompressor()
    assert [comp.protocol_for(n) for n in (1, 2, 4, 64)] == ["allgather"] * 4
    with pytest.raises(ValueError, match="allgather protocol only"):
        H.HSQCompressor(protocol="allreduce")
    with pytest.raises(ValueError, match="allgather protocol only"):
        comp.payload_bytes(1000, 4, "allreduce")
    with pytest.raises(ValueError, match="allgather protocol only"):
        comp.agree_scales([np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="allgather protocol only"):
        comp.compress(np.zeros(10, np.float32), scale=np.ones(1, np.float32))


@pytest.mark.parametrize("kw,match", [({"bits": 4}, "has no bits"), ({"bucket_size": 512}, "has no bucket_size"),
                                      ({"codebook_size": 1}, "codebook_size must be an int >= 2"),
                                      ({"codebook_size": 1 << 17}, "at most 65536"),
                                      ({"dim": 0}, "dim must be an int >= 1"), ({"fused": True}, "no fused"),
                                      ({"scalar_bits": 0}, "scalar_bits must be an int from 1 to 16"),
                                      ({"scalar_bits": 17}, "scalar_bits must be an int from 1 to 16"),
                                      ({"scalar_bits": 31}, "or 32"), ({"scalar_bits": 6.0}, "got 6.0"),
                                      ({"scalar_bits": True}, "scalar_bits must be an int"),
                                      ({"seed": -1}, "seed"),
                                      ({"protocol": "gather"}, "protocol must be one of")])
def test_bad_configuration_is_refused_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        H.HSQCompressor(**kw)


def test_registered_name():
    assert H.COMPRESSORS["hsq"] is H.HSQCompressor
    assert "codebook 256 x 16, seed 808, 6-bit scalars" in repr(H.HSQCompressor())
    assert "float32 scalars" in repr(H.HSQCompressor(scalar_bits=32))


# ---- simulated ranks through the sentinel transport --------------------------------------
@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("ranks,k,scalar_bits,numel", [(2, 256, 6, 900), (4, 256, 6, 900), (2, 256, 32, 900),
                                                       (2, 256, 6, 1073), (2, 300, 32, 1073)])
def test_sentinel_transport_decodes_the_average_of_the_oracle(fw, ranks, k, scalar_bits, numel):
    """Each rank compresses its own gradient (rounding its scalars with its own uniforms);
    Horovod averages the sentinels; every rank decodes the same tensor, the average of the
    ranks' oracle reconstructions. 1073 elements: rank payloads of a length that is no
    multiple of 4 (138 and 357 bytes), so later ranks' float32 fields start unaligned."""
    framework(fw)
    world = {}
    comps = [H.HSQCompressor(k, scalar_bits=scalar_bits, collectives=GatheringRank(i, ranks, world))
             for i in range(ranks)]
    draws = [np.random.default_rng(50 + i).random(hsq.n_chunks(numel, 16), dtype=np.float32) for i in range(ranks)]
    for c, d in zip(comps, draws):
        _fix_draws(c.codec, d)
    xs = [_gradient(numel, i) for i in range(ranks)]
    sent = [c.compress(to_fw(fw, x)) for c, x in zip(comps, xs)]
    reduced = np.mean([to_np(s) for s, _ in sent], axis=0)
    outs = [to_np(c.decompress(to_fw(fw, reduced), ctx)) for c, (_, ctx) in zip(comps, sent)]
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()
    want = np.mean([_oracle(x, comps[0].scheme, d).q for x, d in zip(xs, draws)], axis=0)
    np.testing.assert_allclose(outs[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert comps[0].stats.total_bytes == comps[0].payload_bytes(numel) + 24  # payload + sentinel


# ---- bias ----------------------------------------------------------------------------------
def test_hsq_is_biased_by_the_predicted_amount():
    """HSQ is deterministic, so it cannot be unbiased: averaged over many rounds the decoded
    4-rank average stays at avg_i Q(g_i), whose distance from the true average the oracle
    predicts exactly; it is far outside what sampling noise could explain (there is none).
    The prediction for isotropic chunks, ||v - Q(v)||^2 / ||v||^2 = 1 - E[max_i cos^2], is
    checked against an independent sample with its standard error."""
    ranks, rounds, n = 4, 30, 4096
    world = {}
    comps = [H.HSQCompressor(scalar_bits=32, collectives=GatheringRank(i, ranks, world)) for i in range(ranks)]
    xs = [np.random.default_rng(100 + i).standard_normal(n).astype(np.float32) for i in range(ranks)]
    true = np.mean(xs, axis=0, dtype=np.float64)
    outs = []
    for _ in range(rounds):
        sent = [c.compress(x) for c, x in zip(comps, xs)]
        reduced = np.mean([s for s, _ in sent], axis=0)
        decoded = [c.decompress(reduced, ctx) for c, (_, ctx) in zip(comps, sent)]
        outs.append(decoded[0].astype(np.float64))
    outs = np.array(outs)
    assert np.ptp(outs, axis=0).max() == 0  # no randomness: every round decodes the same
    mean = outs.mean(axis=0)
    predicted = np.mean([_oracle(x, comps[0].scheme).q for x in xs], axis=0) - true
    measured = mean - true
    assert abs(np.linalg.norm(measured) - np.linalg.norm(predicted)) < 1e-4 * np.linalg.norm(predicted)
    relative_bias = np.linalg.norm(measured) / np.linalg.norm(true)
    # per rank ||Q(v) - v|| / ||v|| = sqrt(1 - E[max cos^2]); independent ranks' errors add in
    # quadrature like their gradients, so the average's relative bias is about the same
    c = hsq.codebook(256, 16, 808).astype(np.float64)
    sample = np.random.default_rng(7).standard_normal((40000, 16))
    cos2 = np.max((sample @ c.T) ** 2, axis=1) / np.sum(sample * sample, axis=1)
    expected = np.sqrt(1 - cos2.mean())
    tol = 4 * cos2.std() / np.sqrt(cos2.size) / (2 * expected) + 4 * expected / np.sqrt(2 * n)
    assert abs(relative_bias - expected) < tol, (relative_bias, expected, tol)
    assert relative_bias > 0.5  # about 0.72 at K = 256, dim = 16


# ---- the quantized scalars -----------------------------------------------------------------
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_quantized_scalars_are_rounded_without_bias(fw):
    """The scalars' stochastic rounding is unbiased: the mean of R decodes of one tensor
    approaches its decode with float32 scalars, its squared distance R times smaller than the
    exact rounding variance sum_i step^2 f_i (1 - f_i) c_ki^2 (f_i: the scalar's fraction
    between grid points, from the oracle). Rounding to the nearest or down would stay put;
    sending the scalars unrounded would leave no distance at all."""
    framework(fw)
    x = _gradient(2048, 4)
    rounds = 300
    comp = H.HSQCompressor(seed=9, collectives=GatheringRank(0, 1, {}))
    exact = H.HSQCompressor(scalar_bits=32, collectives=GatheringRank(0, 1, {}))
    t = to_fw(fw, x)
    base = to_np(exact.decompress_gathered(*exact.compress_for_allgather(t))).astype(np.float64)
    mean = np.mean([to_np(comp.decompress_gathered(*comp.compress_for_allgather(t))).astype(np.float64)
                    for _ in range(rounds)], axis=0)
    ref = _oracle(x, exact.scheme)
    step = (ref.u.max() - ref.u.min()) / 63
    frac = (ref.u - ref.u.min()) / step % 1.0
    c = hsq.codebook(256, 16, 808).astype(np.float64)[ref.idx]
    variance = float(np.sum((step * step * frac * (1 - frac))[:, None] * c * c))
    distance = float(np.sum((mean - base) ** 2))
    assert variance / rounds / 4 < distance < 3 * variance / rounds, (distance, variance / rounds)


def test_rounding_streams_follow_seed_and_rank():
    """Same seed and rank: the same payload; another rank or another seed: other codes."""
    x = _gradient(4000, 6)
    def payload(seed, rank):
        comp = H.HSQCompressor(seed=seed, collectives=GatheringRank(rank, 2, {}))
        return comp.compress_for_allgather(x)[0]
    a = payload(3, 0)
    assert a.tobytes() == payload(3, 0).tobytes()
    assert a.tobytes() != payload(3, 1).tobytes() and a.tobytes() != payload(4, 0).tobytes()
    assert H.HSQCompressor(seed=3).seed == 3


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_constant_and_non_finite_tensors(fw):
    """Scalars all equal (max = min) decode exactly; a non-finite gradient decodes to a
    non-finite tensor (NaN bounds), as a float reduction would not hide it either."""
    framework(fw)
    comp = H.HSQCompressor(collectives=GatheringRank(0, 1, {}))
    for x in (np.zeros(100, np.float32), np.tile(hsq.codebook(256, 16, 808)[3] * 2.5, 8)):
        out = to_np(comp.decompress_gathered(*comp.compress_for_allgather(to_fw(fw, x))))
        np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)
    for bad in (np.inf, -np.inf, np.nan):
        x = _gradient(100, 1)
        x[37] = bad
        with np.errstate(invalid="ignore"):  # NumPy warns of the inf * 0 that makes the NaN
            out = to_np(comp.decompress_gathered(*comp.compress_for_allgather(to_fw(fw, x))))
        assert out.shape == (100,) and not np.isfinite(out).any(), bad
