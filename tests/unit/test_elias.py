"""QSGD's Elias encoding (elias.py, nuq_elias_* kernels): code words, the C coder against the
bit-by-bit oracle, decode equal to the fixed-width decode of the same draws, payload sizes,
the paper's bound, fuzzed payloads, and the option's errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernel_bits import _check_indices, _data, _Kernels

import horovod_nuq as H
from horovod_nuq import bounds, elias, kernels, policy, schemes, wire

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C compiler for the fused kernels")


def test_omega_code_words():
    """The code words the issue lists, and lengths that follow the recursive definition."""
    for n, word in [(1, "0"), (2, "100"), (21, "10100101010"), (100, "1011011001000")]:
        assert elias.omega(n) == word
        assert elias.omega_length(n) == len(word)
    for n in range(1, 3000):
        assert elias.omega_length(n) == len(elias.omega(n))
    with pytest.raises(ValueError, match="positive"):
        elias.omega(0)


def test_decoder_table_of_short_code_words():
    """nuq_elias_decode's lookup table: for every byte, the omega word of value < 16 that
    starts it (its length and value), or 0 where the word is longer."""
    table = np.zeros(256, np.uint16)
    kernels.load().nuq_omega8(kernels.ptr(table))
    for byte in range(256):
        bits = f"{byte:08b}"
        match = [v for v in range(1, 16) if bits.startswith(elias.omega(v))]
        want = (len(elias.omega(match[0])) << 8 | match[0]) if match else 0
        assert table[byte] == want, (bits, table[byte], want)


def _oracle_bits(idx: np.ndarray) -> int:
    """Bytes of the streams of signed indices `idx`, counted from the paper's description."""
    total = 0
    for c0 in range(0, idx.size, elias.CHUNK):
        part, last, bits = idx[c0: c0 + elias.CHUNK], -1, 0
        for p in np.flatnonzero(part):
            bits += elias.omega_length(int(p - last)) + 1 + elias.omega_length(int(abs(part[p])))
            last = int(p)
        bits += elias.omega_length(part.size - last)
        total += -(-bits // 8)
    return total


@pytest.mark.parametrize("density,k,count", [(0.0, 1, 10), (0.03, 1, 70000), (0.6, 22, 3000),
                                              (1.0, 127, 500), (0.2, 4, 131072)])
def test_oracle_round_trip(density, k, count):
    rng = np.random.default_rng(int(density * 100) + k)
    idx = np.where(rng.random(count) < density, rng.integers(1, k + 1, count), 0)
    idx = idx * np.where(rng.random(count) < 0.5, -1, 1)
    ends, stream = elias.encode_stream(idx, k)
    assert len(stream) == ends[-1] == _oracle_bits(idx)
    np.testing.assert_array_equal(elias.decode_stream(ends, stream, count, k), idx)


SCHEMES = [1, 2, 4, 22, 127]  # s (levels); 22 ~ sqrt(512)
SIZES = [(1, 64), (7, 64), (300, 100), (5000, 512), (70000, 512), (70000, 70000), (140000, 8192)]


@pytest.mark.parametrize("n,B", SIZES, ids=str)
@pytest.mark.parametrize("s", SCHEMES)
def test_kernel_streams_are_the_oracle_of_the_fixed_codes(s, n, B):
    """nuq_elias_encode writes exactly the oracle's bytes for the codes nuq_encode_codes makes
    from the same key (the reference quantizer's, up to float32 ties), and nuq_elias_decode
    returns exactly what nuq_decode_codes returns for them."""
    scheme = schemes.make_scheme("qsgd", levels=s, bucket_size=B)
    kern = _Kernels(scheme)
    x = _data(n, seed=n + s)
    r = kern.scales(x)
    key = 0x1234_5678_9ABC_DEF0 + s
    count = r.size * B
    fixed = kern.encode_codes(x, r, key)
    codes = wire.unpack_codes(H.backends.backend_for(fixed), fixed, s, scheme.code_bits, count)
    _check_indices(codes[:n], x, scheme, r, kernels.uniforms(key, count))
    assert not codes[n:].any()  # padding past n: zero
    want_ends, want_stream = elias.encode_stream(codes, s)

    cap = elias.chunk_capacity(elias.CHUNK, s)
    buf = np.zeros(elias.chunks(count) * cap, np.uint8)
    ends = np.zeros(elias.chunks(count), np.uint32)
    total = kern.lib.nuq_elias_encode(kernels.ptr(x), n, B, kernels.ptr(r), kernels.ptr(kern.levels), s, 1,
                                      key, cap, kernels.ptr(buf), kernels.ptr(ends))
    assert total == len(want_stream)
    np.testing.assert_array_equal(ends, want_ends)
    assert bytes(buf[:total]) == want_stream

    want, bad = kern.decode_codes(fixed, r, scheme.code_bits, 0.5, None)
    assert not bad
    stream = buf[:max(total, 1)].copy()
    got = np.full(count, np.nan, np.float32)
    assert kern.lib.nuq_elias_decode(kernels.ptr(stream), kernels.ptr(ends), count, B, kernels.ptr(r),
                                     kernels.ptr(kern.signed_values), s, np.float32(0.5),
                                     kernels.ptr(got), 1) == 0
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("s,B,n", [(1, 512, 100_000), (4, 8192, 20_000), (22, 512, 3001), (3, 70_000, 70_001)])
def test_elias_decode_equals_fixed_decode_of_the_same_draws(s, B, n, as_torch):
    """Same seed -> same draws -> same codes: the Elias compressor's decode of one and of
    three ranks' payloads is bit for bit the fixed-width compressor's; the stats count the
    payload's actual bytes, which the frame and the oracle's stream size predict."""
    x = np.random.default_rng(s).standard_normal(n).astype(np.float32)
    xt = torch.from_numpy(x) if as_torch else x
    fixed = H.QSGDCompressor(levels=s, bucket_size=B, seed=9, protocol="allgather")
    coded = H.QSGDCompressor(levels=s, bucket_size=B, seed=9, encoding="elias")
    pf, pe = [], []
    for _ in range(3):
        pf.append(np.asarray(fixed.compress_for_allgather(xt)[0]))
        p, ctx = coded.compress_for_allgather(xt)
        pe.append(np.asarray(p))
    ctxf = fixed.compress_for_allgather(xt)[1]
    for ranks in (1, 3):
        cat_f, cat_e = np.concatenate(pf[:ranks]), np.concatenate(pe[:ranks])
        conv = torch.from_numpy if as_torch else (lambda a: a)
        for average in (True, False):
            want = np.asarray(fixed.decompress_gathered(conv(cat_f), ctxf, average))
            got = np.asarray(coded.decompress_gathered(conv(cat_e), ctx, average))
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        assert coded.codec.ranks_in(conv(cat_e), ctx.tensor) == ranks
    nb = -(-n // B)
    for p, pfix in zip(pe, pf):
        idx = wire.unpack_codes(H.backends.backend_for(pfix), pfix[4 + 4 * nb:], s, coded.scheme.code_bits, nb * B)
        assert p.size == elias.prefix_bytes(nb, nb * B) + _oracle_bits(idx)
        assert int(p[4:8].view("<u4")[0]) == p.size
    assert coded.stats.total_bytes == sum(p.size for p in pe)
    assert coded.stats.total_bytes < fixed.stats.total_bytes


@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("d", [512, 8192])
def test_measured_bits_below_the_papers_bound(s, d):
    """Theorem 3.2 of arXiv 1610.02132 (expected bits per vector, o(1) dropped) holds on
    average over Gaussian buckets: the payload's bits per bucket (code plus its float32 norm;
    not the settings id, length and chunk offsets) stay below it."""
    assert bounds.qsgd_elias_applies(d, s)
    nb = max(8, 65536 // d)
    x = np.random.default_rng(d + s).standard_normal(nb * d).astype(np.float32)
    comp = H.QSGDCompressor(levels=s, bucket_size=d, seed=1, encoding="elias")
    p, _ = comp.compress_for_allgather(x)
    per_bucket = 8 * (p.size - 8 - 4 * elias.chunks(nb * d)) / nb
    bound = bounds.qsgd_elias_bits(d, s)
    assert per_bucket <= bound, f"{per_bucket:.1f} bits per bucket above the bound {bound:.1f}"
    fixed_bits = 32 + d * comp.scheme.code_bits
    assert per_bucket < fixed_bits
    estimate = policy.elias_payload_bytes(comp.codec, x.size)
    assert p.size <= estimate  # the byte model uses the bound: an overestimate on average


def test_bound_formula_and_condition():
    # s = 1, d = 512: s(s + sqrt d) = 23.627; (3 + 1.5 log2(1026 / 23.627)) 23.627 + 32 = 295.70
    assert bounds.qsgd_elias_bits(512, 1) == pytest.approx(295.697, abs=1e-3)
    # s = 4, d = 8192: 4 (4 + 90.51) = 378.04; (3 + 1.5 log2(2 * 8208 / 378.04)) 378.04 + 32
    assert bounds.qsgd_elias_bits(8192, 4) == pytest.approx(4251.153, abs=1e-3)
    assert bounds.qsgd_elias_applies(512, 15) and not bounds.qsgd_elias_applies(512, 16)
    with pytest.raises(ValueError):
        bounds.qsgd_elias_bits(0, 1)


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_fuzzed_payloads_raise_clear_errors(as_torch):
    """Random bytes, truncations, flipped bytes and every proper prefix (one and two ranks)
    raise ValueError naming the payload; whatever still decodes has the right shape."""
    comp = H.QSGDCompressor(levels=2, bucket_size=64, seed=0, encoding="elias")
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    conv = (lambda a: torch.from_numpy(np.ascontiguousarray(a))) if as_torch else (lambda a: a)
    one, ctx = comp.compress_for_allgather(conv(x))
    one = np.asarray(one)
    two = np.concatenate([one, np.asarray(comp.compress_for_allgather(conv(x))[0])])
    rng = np.random.default_rng(1)
    decoded = 0
    for trial in range(600):
        kind = trial % 4
        if kind == 0:
            bad = rng.integers(0, 256, one.size * rng.integers(1, 4), dtype=np.uint8)
        elif kind == 1:
            bad = one[: rng.integers(0, one.size)]
        elif kind == 2:
            bad = two.copy()
            bad[rng.integers(0, bad.size, 3)] ^= rng.integers(1, 256, 3, dtype=np.uint8)
        else:  # flipped bits in the streams only, past the header, scales and chunk offsets
            bad = one.copy()
            at = rng.integers(elias.prefix_bytes(ctx.tensor.n_buckets, 320), bad.size, 2)
            bad[at] ^= (1 << rng.integers(0, 8, 2)).astype(np.uint8)
        try:
            out = comp.decompress_gathered(conv(bad), ctx)
        except ValueError as e:
            assert "payload" in str(e), str(e)
            continue
        assert kind != 1, "a truncated payload decoded"
        decoded += 1
        assert tuple(out.shape) == (300,)
    for payload in (one, two):
        for size in range(payload.size):
            if size == one.size:
                continue
            with pytest.raises(ValueError, match="payload"):
                comp.decompress_gathered(conv(payload[:size]), ctx)
    assert decoded < 300  # most corruptions are caught


def test_option_errors_and_protocol_choice():
    with pytest.raises(ValueError, match="cannot be summed"):
        H.QSGDCompressor(encoding="elias", protocol="allreduce")
    with pytest.raises(ValueError, match="QSGDCompressor"):
        H.NUQCompressor(encoding="elias")
    with pytest.raises(ValueError, match="fused=False"):
        H.QSGDCompressor(encoding="elias", fused=False)
    with pytest.raises(ValueError, match="encoding must be"):
        H.QSGDCompressor(encoding="huffman")
    comp = H.QSGDCompressor(levels=1, encoding="elias")
    assert all(comp.protocol_for(n) == "allgather" for n in (1, 2, 4, 64))
    with pytest.raises(ValueError, match="gathered, not summed"):
        comp.compress(np.ones(10, np.float32), scale=np.ones(1, np.float32))
    with pytest.raises(ValueError, match="allgather only"):
        comp.payload_bytes(1000, 4, "allreduce")
    assert "encoding='elias'" in repr(comp)
    # a fixed-width rank's payload is refused by name, not mis-decoded
    x = np.ones(100, np.float32)
    p = H.QSGDCompressor(levels=1, protocol="allgather").compress_for_allgather(x)[0]
    with pytest.raises(ValueError, match="settings"):
        comp.decompress_gathered(p, comp.compress_for_allgather(x)[1])


def test_without_kernels_elias_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    with pytest.raises(RuntimeError, match="C kernels"):
        H.QSGDCompressor(encoding="elias")


def test_decoder_reads_nothing_out_of_bounds_under_asan(tmp_path):
    """elias_fuzz.c feeds nuq_elias_decode random, truncated and bit-flipped streams in
    buffers of exactly their size, built with AddressSanitizer and UBSan: any read past a
    chunk or undefined shift aborts the program."""
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "fuzz"
    build = subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                            str(kernels.SOURCE), str(Path(__file__).with_name("elias_fuzz.c")), "-o", str(exe),
                            "-lm"], capture_output=True, text=True, check=False)
    if build.returncode:
        pytest.skip(f"the compiler cannot build with sanitizers: {build.stderr.strip()[-200:]}")
    run = subprocess.run([str(exe), "40000"], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    decoded, refused = (int(w) for w in run.stdout.replace(",", "").split() if w.isdigit())
    assert decoded > 0 and refused > 0
    # a full chunk whose first gap lands past its end (CHUNK + 1 is the end), then a sign and a
    # level: a decoder whose gap check were off by one would write past its chunk buffer
    bits = elias.omega(elias.CHUNK + 2) + "0" + elias.omega(1) + elias.omega(1)
    bits += "0" * (-len(bits) % 8)
    (tmp_path / "stream").write_bytes(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    run = subprocess.run([str(exe), "1", str(tmp_path / "stream"), str(elias.CHUNK)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert run.returncode == 0 and "refused 1" in run.stdout, run.stderr[-2000:]


def _frame_with(comp, x, bits: str):
    """A one-rank payload of `x`'s frame (header, scales, one chunk) whose stream is `bits`."""
    p, ctx = comp.compress_for_allgather(x)
    nb = ctx.tensor.n_buckets
    prefix = elias.prefix_bytes(nb, nb * comp.scheme.bucket_size)
    stream = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    out = np.concatenate([np.asarray(p)[:prefix], np.frombuffer(stream, np.uint8)])
    out[4:8] = np.frombuffer(np.uint32(out.size).tobytes(), np.uint8)
    out[prefix - 4: prefix] = np.frombuffer(np.uint32(len(stream)).tobytes(), np.uint8)
    return out, ctx


W = elias.omega
VALID = W(1) + "0" + W(1) + W(3) + "1" + W(1) + W(5)  # +1 at 0, -1 at 3, the end (gap 5 -> 8)
STREAMS = {
    "valid": (VALID, True),
    "valid-empty": (W(9), True),  # no non-zero: the end gap 9 from position -1
    "level-above-k": (W(1) + "0" + W(2) + W(8), False),
    "padding-bit-set": (VALID + "1", False),
    "end-gap-past-chunk": (W(1) + "0" + W(1) + W(9), False),
    # a gap one past the end, then far away (a decoder that let the first pass would write there)
    "past-end-then-far": (W(1) + "0" + W(1) + W(9) + "0" + W(1) + W(1 << 30) + "0" + W(1) + W(1), False),
    "stray-byte": (VALID + "0" * (-len(VALID) % 8) + "00000001", False),
    "stops-inside-a-word": (W(1) + "0" + W(1) + "1", False),
    "no-end": (W(1) + "0" + W(1), False),
}


@pytest.mark.parametrize("name", STREAMS)
def test_malformed_streams_are_refused(name):
    """Hand-made chunk streams for 8 coordinates (one bucket, s = 1): well-formed ones decode
    to what they say; a level above k, set padding bits, a gap past the end, bytes after the
    end and a stream that stops inside a word or before its end raise ValueError."""
    bits, ok = STREAMS[name]
    comp = H.QSGDCompressor(levels=1, bucket_size=8, seed=0, encoding="elias")
    x = np.arange(1, 9, dtype=np.float32)
    bits = bits + "0" * (-len(bits) % 8)
    payload, ctx = _frame_with(comp, x, bits)
    if not ok:
        with pytest.raises(ValueError, match="payload"):
            comp.decompress_gathered(payload, ctx)
        return
    want = elias.decode_stream(np.array([len(bits) // 8], np.uint32), int(bits, 2).to_bytes(len(bits) // 8, "big"),
                               8, 1)
    got = np.asarray(comp.decompress_gathered(payload, ctx))
    r = np.float32(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    np.testing.assert_array_equal(got, want.astype(np.float32) * r)
    if name == "valid":
        assert list(want) == [1, 0, 0, -1, 0, 0, 0, 0]


def test_frame_errors_are_named():
    comp = H.QSGDCompressor(levels=1, bucket_size=64, seed=0, encoding="elias")
    x = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    p, ctx = comp.compress_for_allgather(x)
    p = np.asarray(p)
    longer = p.copy()
    longer[4:8] = np.frombuffer(np.uint32(p.size + 5).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="says .* bytes"):
        comp.decompress_gathered(longer, ctx)
    offsets = p.copy()
    at = elias.prefix_bytes(ctx.tensor.n_buckets, 256) - 4
    offsets[at: at + 4] = np.frombuffer(np.uint32(1).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="chunk offsets"):
        comp.decompress_gathered(offsets, ctx)
    with pytest.raises(ValueError, match="empty"):
        comp.decompress_gathered(p[:0], ctx)
