"""HSQ (hyper-sphere quantization): codebook, codec against the NumPy oracle, payload size,
decoder robustness, protocol routing, simulated ranks, and its (predicted) bias."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import FRAMEWORKS, framework, to_fw, to_np

import horovod_nuq as H
from horovod_nuq import collectives, hsq, reference, wire
from horovod_nuq.hsq_codec import HSQCodec

SETTINGS = [(256, 16), (64, 8), (300, 8), (16, 16), (200, 12)]  # (K, dim); 300: 9-bit indices


class GatheringRank(collectives.LocalCollectives):
    """Rank `rank` of `ranks` whose allgathers return every rank's payload in rank order once
    all have submitted (collected in `world` by name)."""

    stable_names = True

    def __init__(self, rank: int, ranks: int, world: dict) -> None:
        super().__init__()
        self._rank, self._ranks, self.world = rank, ranks, world

    def rank(self) -> int:
        return self._rank

    def size(self, process_set=None) -> int:
        return self._ranks

    def allgather_async(self, x, name, process_set=None):
        self.world.setdefault(name, {})[self._rank] = x
        return name

    def wait(self, handle):
        return np.concatenate([self.world[handle][i] for i in range(self._ranks)])


def _gradient(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n) * (1 + seed)
    g[rng.random(n) < 0.05] *= 10.0
    return g.astype(np.float32)


def _oracle(x: np.ndarray, scheme: hsq.HSQScheme):
    return reference.hsq(x, hsq.codebook(scheme.codebook_size, scheme.dim, scheme.codebook_seed), scheme.dim)


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
@pytest.mark.parametrize("k,dim", SETTINGS)
def test_round_trip_matches_the_oracle(fw, k, dim):
    """Payload indices and scalars equal the oracle's (float64, chunk by chunk), except at
    near ties of |c . x| that float32 may break the other way; the decode equals u c_k."""
    framework(fw)
    scheme = hsq.HSQScheme(k, dim)
    tc = HSQCodec(scheme)
    x = _gradient(1000, k)  # 1000 is no multiple of 16 or 12: a padded tail chunk
    payload, ctx = tc.encode_codes(to_fw(fw, x))
    q_ref, idx_ref, u_ref, gap = _oracle(x, scheme)
    nc = hsq.n_chunks(x.size, dim)
    raw = to_np(payload)
    u = raw[4:4 + 4 * nc].view(np.float32).astype(np.float64)
    idx = to_np(hsq.unpack_indices(*_xp("numpy", raw[4 + 4 * nc:]), scheme.index_bits, nc, k)).astype(np.int64)
    clear = gap > 1e-5 * np.abs(u_ref)  # ties closer than float32 can resolve
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(idx[clear], idx_ref[clear])
    np.testing.assert_allclose(u[clear], u_ref[clear], rtol=1e-5, atol=1e-6 * np.abs(u_ref).max())
    out = to_np(tc.decode_codes(payload, ctx, 1.0)).astype(np.float64)
    assert out.shape == x.shape
    per_chunk = np.repeat(clear, dim)[:x.size]
    np.testing.assert_allclose(out[per_chunk], q_ref[per_chunk], rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_blocked_encoder_equals_one_block(fw, monkeypatch):
    """Large tensors are encoded block by block (bounded memory): same payload as one block."""
    framework(fw)
    tc = HSQCodec(hsq.HSQScheme())
    x = to_fw(fw, _gradient(5000, 2))
    whole = to_np(tc.encode_codes(x)[0])
    monkeypatch.setattr(hsq, "BLOCK_SCORES", 256 * 7)  # blocks of 7 chunks, a shorter last one
    np.testing.assert_array_equal(to_np(tc.encode_codes(x)[0]), whole)


def test_tf_function_encodes_and_decodes_like_eager():
    tf = framework("tensorflow")
    tc = HSQCodec(hsq.HSQScheme())
    x = tf.constant(_gradient(777, 3).reshape(21, 37))

    @tf.function
    def graph(t):
        payload, ctx = tc.encode_codes(t)
        return payload, tc.decode_codes(tf.concat([payload, payload], 0), ctx)

    payload, out = graph(x)
    eager_payload, ctx = tc.encode_codes(x)
    np.testing.assert_array_equal(payload.numpy(), eager_payload.numpy())
    np.testing.assert_array_equal(out.numpy(), tc.decode_codes(np.concatenate([eager_payload.numpy()] * 2), ctx))
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_and_shape_are_restored(dtype):
    torch = framework("torch")
    tc = HSQCodec(hsq.HSQScheme())
    x = to_fw("torch", _gradient(60, 1).reshape(3, 4, 5), dtype)
    payload, ctx = tc.encode_codes(x)
    out = tc.decode_codes(payload, ctx)
    assert out.dtype == getattr(torch, dtype) and tuple(out.shape) == (3, 4, 5)


# ---- payload size ------------------------------------------------------------------------
@pytest.mark.parametrize("k,dim", SETTINGS)
@pytest.mark.parametrize("numel", [1, 15, 16, 1000, 16 * 8192])
def test_payload_size_is_the_computed_bits_per_coordinate(k, dim, numel):
    """Bytes handed to the allgather = header + float32 per chunk + ceil(log2 K) bits per
    chunk (in whole groups of 8), and the byte model and WireStats say the same."""
    comp = H.HSQCompressor(k, dim, collectives=GatheringRank(0, 1, {}))
    payload, _ = comp.compress_for_allgather(np.zeros(numel, np.float32))
    nc = -(-numel // dim)
    bits = int(np.ceil(np.log2(k)))
    expected = 4 + 4 * nc + -(-nc // 8) * bits
    assert payload.size == expected == comp.payload_bytes(numel) == comp.stats.total_bytes
    if numel == 16 * 8192:  # large tensors: (32 + log2 K) / dim bits per coordinate
        assert abs(8 * payload.size / numel - (32 + bits) / dim) < 1e-3


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
    from horovod_nuq.backends import backend_for
    t = to_fw(fw, a)
    return backend_for(t), t


# ---- decoder robustness ------------------------------------------------------------------
def _payload(k=256, dim=16, n=1000, seed=808):
    tc = HSQCodec(hsq.HSQScheme(k, dim, seed))
    payload, ctx = tc.encode_codes(_gradient(n, 0))
    return tc, np.array(payload), ctx


def test_truncated_payload_raises_clearly():
    tc, payload, ctx = _payload()
    for cut in (1, 5, payload.size - 1):
        with pytest.raises(ValueError, match="not a whole number of .*truncated"):
            tc.decode_codes(payload[:-cut], ctx)
    with pytest.raises(ValueError, match="not a whole number"):
        tc.decode_codes(payload[:0], ctx)


@pytest.mark.parametrize("k,dim", [(200, 16), (300, 8), (5, 4)])  # 8, 9 and 3 index bits
def test_out_of_range_codeword_index_raises(k, dim):
    tc, payload, ctx = _payload(k, dim)
    nc = ctx.n_buckets
    bits = tc.scheme.index_bits
    bad = payload.copy()
    bad[4 + 4 * nc:] = 255  # every index all ones: 2^bits - 1 >= K
    with pytest.raises(ValueError, match="index is >= the codebook size"):
        tc.decode_codes(bad, ctx)
    assert (1 << bits) - 1 >= k


def test_random_bytes_raise_clearly_or_decode_finite_sizes():
    """Fuzz: random payloads of the right length fail the header check; with a valid header,
    random bodies either decode (any float32 bits) or raise for an index >= K, never
    anything but ValueError."""
    tc, payload, ctx = _payload(200, 16)
    rng = np.random.default_rng(0)
    header_rejects = index_rejects = 0
    for trial in range(60):
        bad = rng.integers(0, 256, payload.size, dtype=np.uint8)
        if trial % 2:
            bad[:4] = payload[:4]
        try:
            out = tc.decode_codes(bad, ctx)
            assert out.shape == (1000,)
        except ValueError as e:
            header_rejects += "another codebook" in str(e)
            index_rejects += "codebook size" in str(e)
    assert header_rejects == 30 and index_rejects == 30  # 63 indices of 8 bits: some >= 200


def test_payload_of_other_settings_or_codebook_raises():
    _, payload, ctx = _payload()
    for other in (HSQCodec(hsq.HSQScheme(256, 16, 809)), HSQCodec(hsq.HSQScheme(128, 16))):
        with pytest.raises(ValueError):
            other.decode_codes(payload, ctx)
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
                                      ({"protocol": "gather"}, "protocol must be one of")])
def test_bad_configuration_is_refused_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        H.HSQCompressor(**kw)


def test_registered_name():
    assert H.COMPRESSORS["hsq"] is H.HSQCompressor
    assert "codebook 256 x 16" in repr(H.HSQCompressor())


# ---- simulated ranks through the sentinel transport --------------------------------------
@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("ranks", [2, 4])
def test_sentinel_transport_decodes_the_average_of_the_oracle(fw, ranks):
    """Each rank compresses its own gradient; Horovod averages the sentinels; every rank
    decodes the same tensor, the average of the ranks' oracle reconstructions."""
    framework(fw)
    world = {}
    comps = [H.HSQCompressor(collectives=GatheringRank(i, ranks, world)) for i in range(ranks)]
    xs = [_gradient(900, i) for i in range(ranks)]
    sent = [c.compress(to_fw(fw, x)) for c, x in zip(comps, xs)]
    reduced = np.mean([to_np(s) for s, _ in sent], axis=0)
    outs = [to_np(c.decompress(to_fw(fw, reduced), ctx)) for c, (_, ctx) in zip(comps, sent)]
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()
    want = np.mean([_oracle(x, comps[0].scheme)[0] for x in xs], axis=0)
    np.testing.assert_allclose(outs[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert comps[0].stats.total_bytes == comps[0].payload_bytes(900) + 24  # payload + sentinel


# ---- bias ----------------------------------------------------------------------------------
def test_hsq_is_biased_by_the_predicted_amount():
    """HSQ is deterministic, so it cannot be unbiased: averaged over many rounds the decoded
    4-rank average stays at avg_i Q(g_i), whose distance from the true average the oracle
    predicts exactly; it is far outside what sampling noise could explain (there is none).
    The prediction for isotropic chunks, ||v - Q(v)||^2 / ||v||^2 = 1 - E[max_i cos^2], is
    checked against an independent sample with its standard error."""
    ranks, rounds, n = 4, 30, 4096
    world = {}
    comps = [H.HSQCompressor(collectives=GatheringRank(i, ranks, world)) for i in range(ranks)]
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
    predicted = np.mean([_oracle(x, comps[0].scheme)[0] for x in xs], axis=0) - true
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
