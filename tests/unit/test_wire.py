"""Wire formats: bit-packed codes and summable float64 words."""
from __future__ import annotations

import numpy as np
import pytest
from _helpers import FRAMEWORKS, to_fw, to_np

from horovod_nuq import wire
from horovod_nuq.backends import backend_for

LENGTHS = (0, 1, 7, 8, 9, 1000)


def _codes(k: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(-k, k + 1, n)
    if n >= 2:
        idx[0], idx[-1] = -k, k  # both extremes
    return idx.astype(np.int64)


def _independent_pack(idx: np.ndarray, k: int, bits: int) -> bytes:
    """The documented format, written independently: code c = idx + k; group i of 8 codes is the
    little-endian integer sum_j c_j << (bits*j), stored in `bits` bytes; zero-padded."""
    codes = [int(c) + k for c in idx] + [0] * (-len(idx) % 8)
    out = bytearray()
    for g in range(0, len(codes), 8):
        word = sum(c << (bits * j) for j, c in enumerate(codes[g:g + 8]))
        out += word.to_bytes(bits, "little")
    return bytes(out)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_codes_roundtrip(fw, bits):
    k = (1 << (bits - 1)) - 1
    for n in LENGTHS:
        idx = _codes(k, n, seed=bits * 100 + n)
        t = to_fw(fw, idx)
        xp = backend_for(t)
        packed = wire.pack_codes(xp, t, k, bits)
        assert xp.dtype_name(packed) == "uint8"
        assert xp.numel(packed) == wire.packed_code_bytes(n, bits) == -(-n // 8) * bits
        assert to_np(packed).tobytes() == _independent_pack(idx, k, bits)
        back = wire.unpack_codes(xp, packed, k, bits, n)
        np.testing.assert_array_equal(to_np(back), idx)


@pytest.mark.parametrize("src,dst", [("numpy", "torch"), ("torch", "tensorflow"),
                                     ("tensorflow", "numpy")])
def test_pack_codes_cross_backend(src, dst):
    for bits in (3, 4, 8):
        k = (1 << (bits - 1)) - 1
        idx = _codes(k, 77, bits)
        packed = to_np(wire.pack_codes(backend_for(to_fw(src, idx)), to_fw(src, idx), k, bits))
        t = to_fw(dst, packed)
        back = wire.unpack_codes(backend_for(t), t, k, bits, 77)
        np.testing.assert_array_equal(to_np(back), idx)


def test_pack_codes_with_fewer_levels_than_bits_allow():
    """levels=5 -> k=5, codes in [0, 10] in 4 bits; a code 11..15 is detected as corrupt."""
    xp = backend_for(np.zeros(1))
    idx = _codes(5, 100, 0)
    packed = wire.pack_codes(xp, idx, 5, 4)
    np.testing.assert_array_equal(wire.unpack_codes(xp, packed, 5, 4, 100), idx)
    bad = packed.copy()
    bad[3] |= 0xF0
    with pytest.raises(ValueError, match="corrupt"):
        wire.unpack_codes(xp, bad, 5, 4, 100)


# ---- summable words ------------------------------------------------------------------------
def _reduce(payloads, op: str, f: float = 1.0):
    """What Horovod's allreduce hands back: op Sum or Average, prescale 1/f, postscale f.

    Sum accumulates in rank order in float64 like a reduction would; Average divides the sum.
    """
    n = len(payloads)
    acc = None
    for p in payloads:
        q = p * (1.0 / f) if f != 1.0 else p
        acc = q if acc is None else acc + q
    if op == "average":
        acc = acc / n
    elif op == "average_prescaled":  # average done as a prescale by 1/n before summing
        acc = None
        for p in payloads:
            q = p * (1.0 / (n * f)) if f != 1.0 else p * (1.0 / n)
            acc = q if acc is None else acc + q
    if f != 1.0:
        acc = acc * f
    return acc


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("ranks", [1, 2, 4, 7])
@pytest.mark.parametrize("bound", [1, 7, 56, 127])
def test_pack_sums_exact_under_sum_and_average(fw, ranks, bound):
    rng = np.random.default_rng(ranks * 1000 + bound)
    layout = wire.SumLayout(bound, ranks).check()
    count = 1000
    values = [rng.integers(-bound, bound + 1, count) for _ in range(ranks)]
    for v in values:
        v[:3] = [-bound, bound, 0]
    values[0][3:20] = bound  # all ranks at the extremes: the largest field sums
    for v in values[1:]:
        v[3:20] = bound
    values[0][20:40] = -bound
    for v in values[1:]:
        v[20:40] = -bound
    expected = np.sum(values, axis=0)
    xp = None
    payloads = []
    for v in values:
        t = to_fw(fw, v.astype(np.int64))
        xp = backend_for(t)
        p = wire.pack_sums(xp, t, layout)
        assert xp.dtype_name(p) == "float64"
        assert 8 * xp.numel(p) == layout.payload_bytes(count)
        payloads.append(to_np(p))
    for op, f, sentinel in [("sum", 1.0, ranks), ("average", 1.0, 1.0),
                            ("average_prescaled", 1.0, 1.0), ("sum", 3.7, ranks),
                            ("average", 3.7, 1.0), ("average_prescaled", 3.7, 1.0)]:
        red = _reduce(payloads, op, f)
        sums, s = wire.unpack_sums(xp, to_fw(fw, red), layout, count)
        np.testing.assert_array_equal(to_np(sums), expected, err_msg=f"{op} f={f}")
        assert to_np(s)[0] == pytest.approx(sentinel, rel=1e-12)


def test_pack_sums_exact_at_layout_edges():
    """Layouts that only just pass check(): the word sums are as large as the budget allows."""
    xp = backend_for(np.zeros(1))
    for ranks in (1, 3, 7, 16, 64):
        budget = wire.word_budget(ranks)
        width = budget // 3
        bound = ((1 << width) - 1) // (2 * ranks)  # largest bound with 3 fields per word
        layout = wire.SumLayout(bound, ranks).check()
        assert layout.per_word == 3
        with pytest.raises(ValueError, match="fit a 64-bit word"):
            wire.SumLayout(bound + (1 << width) // (2 * ranks), ranks).check()
        rng = np.random.default_rng(ranks)
        values = [np.where(rng.random(30) < 0.8, bound, rng.integers(-bound, bound + 1, 30))
                  for _ in range(ranks)]
        payloads = [wire.pack_sums(xp, v.astype(np.int64), layout) for v in values]
        for op, f in [("sum", 1.0), ("average", 1.0), ("average_prescaled", 3.7)]:
            sums, _ = wire.unpack_sums(xp, _reduce(payloads, op, f), layout, 30)
            np.testing.assert_array_equal(sums, np.sum(values, axis=0), err_msg=f"{ranks} {op}")


@pytest.mark.parametrize("count", [0, 1, 5, 6, 7])
def test_pack_sums_small_counts(count):
    xp = backend_for(np.zeros(1))
    layout = wire.SumLayout(7, 1).check()
    v = np.arange(count, dtype=np.int64) % 15 - 7
    p = wire.pack_sums(xp, v, layout)
    assert p.size == layout.words(count) + 1 and p[-1] == 1.0
    sums, _ = wire.unpack_sums(xp, p, layout, count)
    np.testing.assert_array_equal(sums, v)


def test_nonlinear_reduction_is_detected():
    xp = backend_for(np.zeros(1))
    layout = wire.SumLayout(7, 3).check()
    rng = np.random.default_rng(0)
    payloads = [wire.pack_sums(xp, rng.integers(-7, 8, 500), layout) for _ in range(3)]
    red = _reduce(payloads, "sum")
    bad = red.copy()
    bad[5] += 0.5
    with pytest.raises(ValueError, match="not integer"):
        wire.unpack_sums(xp, bad, layout, 500)
    bad = red.copy()
    bad[:-1] *= 1.0 + 1e-9  # words scaled but not the sentinel (e.g. an Adasum-like combine)
    with pytest.raises(ValueError, match="not integer"):
        wire.unpack_sums(xp, bad, layout, 500)
    # summed over 2 ranks but decoded as 3: the sentinel reads 2, words rescale by 3/2
    two = _reduce(payloads[:2], "sum")
    with pytest.raises(ValueError, match="not integer"):
        wire.unpack_sums(xp, two, layout, 500)


def test_sum_layout_check_refuses_fewer_than_three_fields():
    with pytest.raises(ValueError, match="only 2 fit"):
        wire.SumLayout(1 << 20, 1).check()
    with pytest.raises(ValueError, match="only 1 fit"):
        wire.SumLayout(1 << 30, 1).check()
    with pytest.raises(ValueError, match="only 0 fit"):
        wire.SumLayout(1 << 60, 1).check()
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        wire.SumLayout(7, 0).check()
    assert wire.SumLayout(7, 1).check().per_word == 11  # 4-bit fields in 47 bits


def test_summable_payload_is_smaller_than_float32():
    for bound, ranks in [(1, 1), (7, 1), (7, 64), (127, 8), (56, 16)]:
        layout = wire.SumLayout(bound, ranks).check()
        assert layout.payload_bytes(4096) < 4 * 4096
