"""The C kernels bit for bit: their random draws replayed from the key, their codes against
reference.quantize for the same draws, and the same bits from 1 and 2 OpenMP threads.

The statistical tests only see a kernel bug that moves a mean or a variance; these see any
code that differs from the NumPy oracle's for the same uniforms (a wrong rounding threshold,
a wrong level, a packing slip, a vector path that disagrees with the scalar one).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from _helpers import rounding_terms

from horovod_nuq import codec, kernels, reference, schemes, wire

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C compiler for the fused kernels")
_SCALE_MODES = {"l2": 0, "max": 1, "laplace": 2}
M32 = np.uint64(0xFFFFFFFF)

# (scheme name, options): every scheme; odd bit widths (SWAR packing), 2/4/8-bit fast paths,
# uniform and non-uniform levels, k > 15 (the portable level search instead of AVX2 tables)
SCHEMES = [("qsgd", {"bits": 4}), ("qsgd", {"bits": 3}), ("qsgd", {"bits": 8}),
           ("qsgdinf", {"bits": 2}), ("nuqsgd", {"bits": 4}), ("nuqsgd", {"bits": 6}),
           ("nuqsgd", {"bits": 5}), ("tnqsgd", {"bits": 4}), ("tnqsgd", {"bits": 7}),
           ("globalqsgd", {"bits": 4}), ("globalqsgd", {"bits": 3, "spacing": "exponential"})]
# (numel, bucket size): single elements, odd sizes, partial buckets, buckets that are not a
# multiple of 8 (AVX2 body plus scalar tail), several 2048-element blocks
SIZES = [(1, 64), (7, 64), (300, 100), (513, 512), (4100, 100), (5000, 512)]


def _sid(v):
    return v[0] + "".join(f"-{k}{val}" for k, val in v[1].items()) if isinstance(v, tuple) else str(v)


def _scheme(spec, bucket_size):
    name, opts = spec
    return schemes.make_scheme(name, bucket_size=bucket_size, **opts)


def _hash_uniforms(key: int, idx: np.ndarray) -> np.ndarray:
    """NumPy re-statement of the kernels' draw: murmur3's 32-bit finalizer of
    i * golden ^ salt, salt = low(key) ^ (high(key) + high(i) * c1); top 24 bits / 2^24."""
    i = idx.astype(np.uint64)
    key = np.uint64(key)
    c1 = np.uint64(0x85EBCA6B)
    salt = (key & M32) ^ (((key >> np.uint64(32)) + (i >> np.uint64(32)) * c1) & M32)
    h = ((i & M32) * np.uint64(0x9E3779B9) & M32) ^ salt
    h ^= h >> np.uint64(16)
    h = h * c1 & M32
    h ^= h >> np.uint64(13)
    h = h * np.uint64(0xC2B2AE35) & M32
    h ^= h >> np.uint64(16)
    return (h >> np.uint64(8)).astype(np.float64) / 2.0**24


def _data(n: int, seed: int) -> np.ndarray:
    """Gaussians of varied magnitude with zeros, signed zeros and bucket maxima repeated."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.random(n) ** 3).astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    x[rng.random(n) < 0.02] = -0.0
    if n > 4:
        x[1] = -np.abs(x).max()  # ties the max: exactly on the top level (QSGDinf)
        x[3] = np.abs(x).max()
    return x


class _Kernels:
    """Direct kernel calls for one scheme (the arguments engines.FusedEngine passes)."""

    def __init__(self, scheme):
        self.lib, self.s = kernels.load(), scheme
        self.t = codec.Tables(scheme)
        host = self.t._host
        self.levels = np.ascontiguousarray(host["levels"], np.float32)
        self.signed_num = np.ascontiguousarray(host["signed_numerators"], np.int64)
        self.signed_values = np.ascontiguousarray(host["signed_values"], np.float32)

    def scales(self, x):
        s = self.s
        r = np.empty(codec.n_buckets(x.size, s.bucket_size), np.float32)
        self.lib.nuq_scales(kernels.ptr(x), x.size, s.bucket_size, _SCALE_MODES[s.scale],
                            float(s.truncation or 0.0), kernels.ptr(r))
        return r

    def encode_codes(self, x, r, key, bits=None):
        s = self.s
        bits = bits or s.code_bits
        out = np.zeros(wire.packed_code_bytes(r.size * s.bucket_size, bits), np.uint8)
        self.lib.nuq_encode_codes(kernels.ptr(x), x.size, s.bucket_size, kernels.ptr(r),
                                  kernels.ptr(self.levels), self.t.k, int(self.t.uniform), key, bits,
                                  kernels.ptr(out))
        return out

    def encode_sums(self, x, r, key, layout):
        s = self.s
        out = np.zeros(layout.words(r.size * s.bucket_size), np.float64)
        self.lib.nuq_encode_sums(kernels.ptr(x), x.size, s.bucket_size, kernels.ptr(r),
                                 kernels.ptr(self.levels), kernels.ptr(self.signed_num), self.t.k,
                                 int(self.t.uniform), key, layout.width, layout.per_word, layout.bound,
                                 kernels.ptr(out))
        return out

    def decode_codes(self, codes, r, bits, scale, acc):
        s = self.s
        out = np.zeros(r.size * s.bucket_size, np.float32) if acc is None else acc
        bad = self.lib.nuq_decode_codes(kernels.ptr(codes), out.size, s.bucket_size, kernels.ptr(r),
                                        kernels.ptr(self.signed_values), self.t.k, bits, np.float32(scale),
                                        kernels.ptr(out), int(acc is None))
        return out, bad

    def decode_sums(self, words, r, layout, factor):
        s = self.s
        count = r.size * s.bucket_size
        out = np.zeros(count, np.float32)
        bad = self.lib.nuq_decode_sums(kernels.ptr(words), count, s.bucket_size, factor, layout.width,
                                       layout.per_word, layout.bound * layout.ranks, kernels.ptr(r),
                                       np.float32(1.0 / self.t.denominator), kernels.ptr(out))
        return out, bad


def _unpack_bitstream(payload: np.ndarray, bits: int) -> np.ndarray:
    """Codes from the packed format read as one little-endian bit stream of `bits`-bit fields
    (8 codes per `bits` bytes is exactly that), independently of wire.py and the C unpacker."""
    b = np.unpackbits(payload, bitorder="little").reshape(-1, bits).astype(np.int64)
    return b @ (1 << np.arange(bits, dtype=np.int64))


def _unpack_words(words: np.ndarray, layout) -> np.ndarray:
    """Field values (offset included) of summable words, lowest field first."""
    w = words.astype(np.uint64)
    shifts = (np.arange(layout.per_word) * layout.width).astype(np.uint64)
    mask = np.uint64((1 << layout.width) - 1)
    return ((w[:, None] >> shifts) & mask).astype(np.int64).reshape(-1)


def _reference_indices(x, scheme, r, u):
    """Signed level indices of reference.quantize(x) with scales r and uniforms u; r as the
    kernels use them (float32), so the comparison isolates the rounding."""
    r64 = r.astype(np.float64)
    q = reference.quantize(x.astype(np.float64), scheme, u, scales=r64).reshape(-1)
    lv = scheme.levels.values
    rc = np.repeat(r64, scheme.bucket_size)[: x.size]
    level = np.where(rc > 0, np.abs(q) / np.where(rc > 0, rc, 1.0), 0.0)
    idx = np.abs(level[:, None] - lv[None, :]).argmin(1)
    return (np.sign(q) * idx).astype(np.int64)


def _allowed_mismatches(x, scheme, r, u):
    """Elements where float32 (kernels) and float64 (reference) may round differently. The
    kernels form a = |x| * (1/r) and compare in float32: a few roundings of 2^-24 relative,
    so |a - |x|/r| <= 2^-21 hi (hi: the level above) and the rounding probability p moves by
    at most eps = 2^-20 hi / (hi - lo). Allowed: u within eps of p; or |x|/r within 2^-20 hi
    of a level (the two may bracket it differently) and u within eps of 0 or 1."""
    rc = np.repeat(r.astype(np.float64), scheme.bucket_size)[: x.size]
    xn, lo, hi, p = rounding_terms(x.astype(np.float64), rc, scheme.levels.values)
    eps = 2.0**-20 * hi / (hi - lo)
    uu = np.asarray(u, np.float64).reshape(-1)[: x.size]
    dist = np.minimum(np.abs(xn - lo), np.abs(hi - xn))
    # exactly on a level (e.g. 0) is exact in float32 too
    near_level = (dist > 0) & (dist <= 2.0**-20 * hi) & ((uu <= eps) | (uu >= 1 - eps))
    return (np.abs(uu - p) <= eps) | near_level


def _check_indices(got, x, scheme, r, u):
    want = _reference_indices(x, scheme, r, u)
    diff = got != want
    if diff.any():
        allowed = _allowed_mismatches(x, scheme, r, u)
        bad = np.flatnonzero(diff & ~allowed)
        assert bad.size == 0, (f"{bad.size} of {x.size} codes differ from reference.quantize "
                               f"(first at {bad[:5]}: kernel {got[bad[:5]]}, reference {want[bad[:5]]})")
        assert diff.sum() <= max(2, x.size // 1000), f"{diff.sum()} boundary mismatches of {x.size}"


def test_exported_uniforms_are_the_documented_hash():
    """kernels.uniforms (what the tests replay) is the murmur3-finalizer draw, for element
    indices below and above 2^32 (where the index's high bits enter the salt)."""
    rng = np.random.default_rng(0)
    for key in [0, 1, 0xFFFFFFFFFFFFFFFF, *rng.integers(0, 2**63, 3).tolist()]:
        for start in (0, 5, 2**32 - 3, 3 * 2**32 + 11):
            got = kernels.uniforms(key, 1000, start)
            want = _hash_uniforms(key, start + np.arange(1000, dtype=np.int64))
            np.testing.assert_array_equal(got.astype(np.float64), want)
    u = kernels.uniforms(12345, 1 << 16)
    assert 0 <= u.min() and u.max() < 1
    # a gross sanity check of uniformity: mean of 2^16 U(0,1) within 6 standard errors
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / u.size)


@pytest.mark.parametrize("n,B", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("spec", SCHEMES, ids=_sid)
def test_packed_codes_match_the_reference_quantizer(spec, n, B):
    """nuq_encode_codes's codes = k + reference.quantize's level indices for the same draws;
    padding past n decodes as code k (zero); the packed stream has the documented layout."""
    scheme = _scheme(spec, B)
    kern = _Kernels(scheme)
    x = _data(n, seed=n + B)
    r = kern.scales(x)
    np.testing.assert_allclose(r, reference.bucket_scales(x, scheme), rtol=2e-7, atol=0)
    key = 0x0123456789ABCDEF ^ n
    u = kernels.uniforms(key, r.size * B)
    codes = _unpack_bitstream(kern.encode_codes(x, r, key), scheme.code_bits)
    k = kern.t.k
    assert codes.size == -(-r.size * B // 8) * 8
    _check_indices(codes[:n] - k, x, scheme, r, u)
    assert np.all(codes[n:] == k), "padding codes must decode to zero"
    # the 8-bit format holds the same codes, one byte each
    np.testing.assert_array_equal(kern.encode_codes(x, r, key, bits=8).astype(np.int64), codes)


def _sum_cases():
    for spec in SCHEMES:
        for ranks in (1, 3):
            bound = _scheme(spec, 64).levels.denominator
            try:
                wire.SumLayout(bound, ranks).check()
            except ValueError:  # too wide for the allreduce protocol at this rank count
                continue
            for n, B in SIZES:
                yield spec, ranks, n, B


@pytest.mark.parametrize("spec,ranks,n,B", list(_sum_cases()), ids=lambda v: _sid(v) if isinstance(v, tuple) else str(v))
def test_summable_words_match_the_reference_quantizer(spec, ranks, n, B):
    """nuq_encode_sums's fields = signed numerators of reference.quantize's levels + bound,
    in the layout for `ranks` ranks; padding inside the last bucket is numerator 0, and the
    fields past the last bucket are 0."""
    scheme = _scheme(spec, B)
    kern = _Kernels(scheme)
    layout = wire.SumLayout(scheme.levels.denominator, ranks)
    x = _data(n, seed=7 * n + B)
    r = kern.scales(x)
    key = 0xFEDCBA9876543210 ^ (n * ranks)
    u = kernels.uniforms(key, r.size * B)
    fields = _unpack_words(kern.encode_sums(x, r, key, layout), layout)
    count = r.size * B
    assert np.all(fields[count:] == 0)
    num = fields[:count] - layout.bound
    assert np.all(num[n:] == 0)
    numerators = np.asarray(scheme.levels.numerators)
    got = np.sign(num[:n]) * np.searchsorted(numerators, np.abs(num[:n]))
    assert np.array_equal(numerators[np.abs(got)], np.abs(num[:n])), "fields that are no level's numerator"
    _check_indices(got, x, scheme, r, u)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("spec", [SCHEMES[0], SCHEMES[4], SCHEMES[7]], ids=_sid)
def test_nonfinite_bucket_codes_stay_valid_and_local(spec, bad):
    """A NaN/Inf bucket gets scale inf and codes in [0, 2k] (it decodes non-finite); every
    other bucket's codes are still the reference's."""
    B, n = 100, 450
    scheme = _scheme(spec, B)
    kern = _Kernels(scheme)
    x = _data(n, seed=3)
    x[[205, 250]] = bad  # bucket 2
    r = kern.scales(x)
    assert np.isinf(r[2]) and np.isfinite(np.delete(r, 2)).all()
    key = 99
    u = kernels.uniforms(key, r.size * B)
    codes = _unpack_bitstream(kern.encode_codes(x, r, key), scheme.code_bits)[: r.size * B]
    layout = wire.SumLayout(scheme.levels.denominator, 1)
    fields = _unpack_words(kern.encode_sums(x, r, key, layout), layout)[: r.size * B] - layout.bound
    k = kern.t.k
    assert codes.min() >= 0 and codes.max() <= 2 * k
    assert np.abs(fields).max() <= layout.bound
    keep = np.ones(n, bool)
    keep[200:300] = False
    clean, r_clean = x.copy(), r.copy()
    clean[~keep], r_clean[2] = 0.0, 1.0
    want = _reference_indices(clean, scheme, r_clean, u)
    np.testing.assert_array_equal((codes[:n] - k)[keep], want[keep])
    nums = np.asarray(scheme.levels.numerators)
    np.testing.assert_array_equal(fields[:n][keep], np.sign(want[keep]) * nums[np.abs(want[keep])])


def _omp_set_threads(lib):
    """omp_set_num_threads of the OpenMP runtime the kernels link (dlsym on the kernel library
    searches its dependencies); None when they were built without OpenMP."""
    try:
        return lib.omp_set_num_threads, lib.omp_get_max_threads
    except AttributeError:
        return None


@pytest.mark.parametrize("spec,n", [(SCHEMES[0], (1 << 23) + 3), (SCHEMES[4], 300_007), (SCHEMES[7], 300_007)],
                         ids=lambda v: _sid(v) if isinstance(v, tuple) else str(v))
def test_two_openmp_threads_give_the_same_bits_as_one(spec, n):
    """Every kernel split over 2 threads writes the same bits as on 1: a tensor far above the
    32K-element threshold, a bucket size that puts bucket edges inside the 2048-element
    blocks, and a few repeats. A data race (e.g. scratch shared by the threads) only shows
    when the threads overlap in time; with 8M elements (tens of ms per call; one scheme, as
    the kernels' threading does not depend on it) they do even on a busy 2-core machine."""
    lib = kernels.load()
    omp = _omp_set_threads(lib)
    if omp is None:
        pytest.skip("kernels built without OpenMP")
    set_threads, get_threads = omp
    set_threads.argtypes, get_threads.restype = [ctypes.c_int], ctypes.c_int
    B = 1000
    scheme = _scheme(spec, B)
    kern = _Kernels(scheme)
    x = np.resize(_data(100_003, seed=11), n)  # cheap to make; no two blocks alike
    layout = wire.SumLayout(scheme.levels.denominator, 3)
    before = get_threads()

    def run():
        r = kern.scales(x)
        codes = kern.encode_codes(x, r, key=5)
        words = kern.encode_sums(x, r, 6, layout)
        acc, bad1 = kern.decode_codes(codes, r, scheme.code_bits, 0.5, None)
        acc, bad2 = kern.decode_codes(codes, r, scheme.code_bits, 0.25, acc)
        summed, bad3 = kern.decode_sums(words * 3, r, layout, 1.0)  # 3 equal ranks, op Sum
        assert not (bad1 or bad2 or bad3)
        return r, codes, words, acc, summed

    try:
        set_threads(1)
        one = run()
        set_threads(2)
        assert get_threads() == 2
        for _ in range(3):
            two = run()
            for a, b, what in zip(one, two, ("scales", "codes", "words", "decoded codes", "decoded sums")):
                assert np.array_equal(a, b, equal_nan=True), f"{what} differ between 1 and 2 threads"
    finally:
        set_threads(before)
