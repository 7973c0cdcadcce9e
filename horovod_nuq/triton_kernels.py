"""Fused Triton kernels for tensors on a GPU: one pass per stage, same arithmetic as csrc/nuq_kernels.c.

Stages: per-bucket scales; encode to packed codes (allgather); encode to summable float64
words (allreduce); decode one rank's codes, storing or accumulating r * scale * level; decode
reduced words. Random draws are counter-based, the C kernels' hash of (key, element index),
so no random tensor is materialized. Decoding mirrors the C float32 operation order
(rb = r[bucket] * scale first, then value * rb; accumulation by one fma), so a payload decodes
to the same bits on the GPU as on the CPU. Importing this module imports triton.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(4503599627370496.0)  # 2^52: y + 2^52 - 2^52 rounds 0 <= y < 2^52 to the nearest integer (ties even)
INF = tl.constexpr(float("inf"))


@triton.jit
def _draw(salt, i):
    """U[0,1) with 24 bits from a uint32 element index and the uint32 salt (C: draw)."""
    h = (i * 0x9E3779B9) ^ salt
    h ^= h >> 16
    h = h * 0x85EBCA6B
    h ^= h >> 13
    h = h * 0xC2B2AE35
    h ^= h >> 16
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _quantize(x, inv, salt, idx, lv_ptr, num_ptr, K: tl.constexpr, UNIFORM: tl.constexpr,
              NUM: tl.constexpr, EXP2: tl.constexpr):
    """Signed level index and signed level numerator (NUM; else the index again) of x by
    stochastic rounding of |x| * inv (C: quant_uniform / quant_levels, same arithmetic).
    EXP2 (levels 0, 2^(1-k), .., 1/2, 1): the bracket from a's exponent bits. Other non-uniform
    levels: the bracketing levels are selected while counting, no table gathers."""
    a = tl.abs(x) * inv
    a = tl.where(a < 1.0, a, 1.0)  # also maps NaN (r = inf) to the top level, as the C code does
    u = _draw(salt, idx.to(tl.uint32))
    if UNIFORM:
        xk = a * (K * 1.0)
        j = tl.minimum(xk.to(tl.int32), K - 1)
        ident = j + (u < xk - j.to(tl.float32)).to(tl.int32)
        num = ident
    elif EXP2:  # j = #{m in 1..k-1: a >= 2^(m-k)} = clamp(exponent(a) + k, 0, k - 1)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        j = tl.minimum(tl.maximum(e + K, 0), K - 1)
        l1 = ((j + 1 - K + 127) << 23).to(tl.float32, bitcast=True)  # 2^(j+1-k), exact
        l0 = tl.where(j > 0, ((j - K + 127) << 23).to(tl.float32, bitcast=True), 0.0)
        up = u * (l1 - l0) < a - l0
        ident = j + up.to(tl.int32)
        num = ident
        if NUM:  # numerators 0, 1, 2, 4, .., 2^(k-1)
            num = tl.where(ident > 0, 1 << tl.maximum(ident - 1, 0), 0)
    else:
        j = tl.zeros(x.shape, tl.int32)
        l0 = tl.zeros(x.shape, tl.float32)  # levels[0] = 0
        l1 = l0 + tl.load(lv_ptr + 1)
        n0 = j
        n1 = j + tl.load(num_ptr + 1)
        for m in tl.static_range(1, K):
            ge = a >= tl.load(lv_ptr + m)
            j += ge.to(tl.int32)
            l0 = tl.where(ge, tl.load(lv_ptr + m), l0)
            l1 = tl.where(ge, tl.load(lv_ptr + m + 1), l1)
            if NUM:
                n0 = tl.where(ge, tl.load(num_ptr + m), n0)
                n1 = tl.where(ge, tl.load(num_ptr + m + 1), n1)
        up = u * (l1 - l0) < a - l0
        ident = j + up.to(tl.int32)
        num = ident
        if NUM:
            num = tl.where(up, n1, n0)
    neg = x.to(tl.int32, bitcast=True) < 0  # signbit, like the C code
    return tl.where(neg, -ident, ident), tl.where(neg, -num, num)


@triton.jit(do_not_specialize=["nb"])
def inverse_kernel(r_ptr, inv_ptr, nb, BLOCK: tl.constexpr):
    """inv[b] = 1 / r[b] (correctly rounded), or 1 where r <= 0 (C: inverse)."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(r_ptr + b, mask=b < nb, other=1.0)
    tl.store(inv_ptr + b, tl.where(r > 0.0, tl.div_rn(tl.full(r.shape, 1.0, tl.float32), r), 1.0), mask=b < nb)


@triton.jit(do_not_specialize=["n", "nb"])
def scales_kernel(x_ptr, r_ptr, inv_ptr, n, nb, trunc, B: tl.constexpr, MODE: tl.constexpr,
                  ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """r[b]: L2 norm (MODE 0), max |x| (1) or min(trunc * mean|x|, max|x|) (2); +inf if non-finite;
    and inv[b] as inverse_kernel (the encoders read it)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, CHUNK)
    s = tl.zeros([ROWS, CHUNK], tl.float64)
    m = tl.zeros([ROWS, CHUNK], tl.float32)
    for c0 in range(0, B, CHUNK):
        col = c0 + cols
        idx = rows[:, None] * B + col[None, :]
        x = tl.load(x_ptr + idx, mask=(col[None, :] < B) & (idx < n), other=0.0).to(tl.float32)
        if MODE == 0:
            xd = x.to(tl.float64)
            s += xd * xd
        else:
            av = tl.abs(x)
            s += av.to(tl.float64)
            m = tl.where(av > m, av, m)
    tot = tl.sum(s, axis=1)
    if MODE == 0:
        out = tl.sqrt(tot).to(tl.float32)  # float64 sqrt is correctly rounded
    else:
        mx = tl.max(m, axis=1)
        cnt = tl.minimum(n - rows * B, B)
        mean = (tot / tl.maximum(cnt, 1).to(tl.float64)).to(tl.float32)
        t = tl.where(cnt > 0, trunc * mean, 0.0)
        if MODE == 1:
            out = mx
        else:
            out = tl.where(t < mx, t, mx)
    finite = (tot - tot) == 0.0
    r = tl.where(finite, out, INF)
    tl.store(r_ptr + rows, r, mask=rows < nb)
    tl.store(inv_ptr + rows, tl.where(r > 0.0, tl.div_rn(tl.full(r.shape, 1.0, tl.float32), r), 1.0),
             mask=rows < nb)


@triton.jit(do_not_specialize=["n", "count", "salt"])
def encode_codes_kernel(x_ptr, inv_ptr, lv_ptr, out_ptr, n, count, salt, B: tl.constexpr,
                        K: tl.constexpr, UNIFORM: tl.constexpr, EXP2: tl.constexpr,
                        BITS: tl.constexpr, GROUPS: tl.constexpr):
    """Packed codes: 8 codes of BITS bits per BITS bytes, little-endian; code k past n."""
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    t = tl.arange(0, 8)
    idx = g[:, None] * 8 + t[None, :]
    real = idx < n
    x = tl.load(x_ptr + idx, mask=real, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + idx // B, mask=real, other=1.0)
    sid, _ = _quantize(x, inv, salt.to(tl.uint32, bitcast=True), idx, lv_ptr, lv_ptr, K, UNIFORM, False,
                       EXP2)
    c = tl.where(real, K + sid, K)
    groups = (count + 7) // 8
    gm = g < groups
    if BITS == 8:
        tl.store(out_ptr + idx, c.to(tl.uint8), mask=gm[:, None])
    elif BITS == 4:  # one group is one little-endian int32
        word = tl.sum(c << (t * 4)[None, :], axis=1)
        tl.store(out_ptr.to(tl.pointer_type(tl.int32)) + g, word, mask=gm)
    elif BITS == 2:
        word = tl.sum(c << (t * 2)[None, :], axis=1)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + g, word.to(tl.int16), mask=gm)
    else:
        word = tl.sum(c.to(tl.int64) << (t * BITS).to(tl.int64)[None, :], axis=1)
        byte = (word[:, None] >> (t * 8).to(tl.int64)[None, :]) & 255
        tl.store(out_ptr + g[:, None] * BITS + t[None, :], byte.to(tl.uint8),
                 mask=(t[None, :] < BITS) & gm[:, None])


@triton.jit(do_not_specialize=["n", "count", "nw", "salt", "bound"])
def encode_sums_kernel(x_ptr, inv_ptr, lv_ptr, num_ptr, out_ptr, n, count, nw, salt, bound,
                       B: tl.constexpr, K: tl.constexpr, UNIFORM: tl.constexpr, EXP2: tl.constexpr,
                       WIDTH: tl.constexpr,
                       PER: tl.constexpr, PERP: tl.constexpr, WORDS: tl.constexpr):
    """Summable words: PER fields bound + signed numerator, WIDTH bits each, per float64 word (0
    past count; bound past n), then the sentinel 1.0 at out[nw]."""
    pid = tl.program_id(0)
    w = pid * WORDS + tl.arange(0, WORDS)
    t = tl.arange(0, PERP)
    idx = w[:, None] * PER + t[None, :]
    live = (t[None, :] < PER) & (idx < count)
    real = live & (idx < n)
    x = tl.load(x_ptr + idx, mask=real, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + idx // B, mask=real, other=1.0)
    _, snum = _quantize(x, inv, salt.to(tl.uint32, bitcast=True), idx, lv_ptr, num_ptr, K, UNIFORM,
                        not UNIFORM, EXP2)
    f = tl.where(live, bound + tl.where(real, snum, 0), 0).to(tl.int64)
    word = tl.sum(f << (t * WIDTH).to(tl.int64)[None, :], axis=1)
    tl.store(out_ptr + w, word.to(tl.float64), mask=w < nw)
    tl.store(out_ptr + nw + tl.arange(0, 1), tl.full([1], 1.0, tl.float64), mask=(tl.arange(0, 1) + pid) == 0)


@triton.jit(do_not_specialize=["count"])
def decode_codes_kernel(in_ptr, r_ptr, tab_ptr, out_ptr, flag_ptr, count, scale, B: tl.constexpr,
                        K: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out = (or +=, by one fma) tab[code] * (r[bucket] * scale); flag |= 1 if a code > 2k."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    padded = (count + 7) // 8 * 8
    inside = idx < padded
    bit = (idx % 8) * BITS
    if BITS == 8:
        c = tl.load(in_ptr + idx, mask=inside, other=0).to(tl.int32)
    elif BITS == 4:  # the group's little-endian int32
        word = tl.load(in_ptr.to(tl.pointer_type(tl.int32)) + idx // 8, mask=inside, other=0)
        c = (word >> bit) & 15
    elif BITS == 2:
        word = tl.load(in_ptr.to(tl.pointer_type(tl.int16)) + idx // 8, mask=inside, other=0).to(tl.int32)
        c = (word >> bit) & 3
    else:
        byte0 = (idx // 8) * BITS + bit // 8
        word = tl.load(in_ptr + byte0, mask=inside, other=0).to(tl.int32)
        spill = inside & ((bit % 8) + BITS > 8)  # the code continues into the next byte
        word |= tl.load(in_ptr + byte0 + 1, mask=spill, other=0).to(tl.int32) << 8
        c = (word >> (bit % 8)) & ((1 << BITS) - 1)
    bad = tl.sum((inside & (c > 2 * K)).to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr + tl.arange(0, 1), tl.full([1], 1, tl.int32), mask=(tl.arange(0, 1) + bad) > 0)
    live = idx < count
    v = tl.load(tab_ptr + c)
    rb = tl.load(r_ptr + idx // B, mask=live, other=0.0) * scale
    if FIRST:
        o = v * rb
    else:
        o = tl.fma(v, rb, tl.load(out_ptr + idx, mask=live, other=0.0))
    tl.store(out_ptr + idx, o, mask=live)


@triton.jit(do_not_specialize=["count", "nw", "ranks", "denominator", "offset"])
def decode_sums_kernel(p_ptr, r_ptr, out_ptr, flag_ptr, count, nw, ranks, denominator, offset,
                       B: tl.constexpr, WIDTH: tl.constexpr, PER: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out = (field sum - offset) * (r[bucket] * scale) from words * ranks / sentinel, which must
    be integers in [0, 2^53) (else flag |= 1, word read as 0); flag |= 2 for a bad sentinel.

    Rounding without conversions: for 0 <= y < 2^52 the low 52 bits of y + 2^52 are round(y)
    (ties even, as nearbyint); fields below 2^23 become floats as bits of 2^23 + field."""
    pid = tl.program_id(0)
    one = tl.arange(0, 1)
    sent = tl.load(p_ptr + nw + one)
    rk = ranks.to(tl.float64)
    factor = tl.sum(rk / sent, axis=0)
    scale = tl.sum((sent / rk / denominator.to(tl.float64)).to(tl.float32), axis=0)
    bad_sent = ~((sent > 0.0) & ((sent - sent) == 0.0))
    tl.atomic_or(flag_ptr + one, tl.full([1], 2, tl.int32), mask=bad_sent & ((one + pid) == 0))
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    w = idx // PER
    t = idx - w * PER
    live = idx < count
    y = tl.load(p_ptr + w, mask=live, other=0.0) * factor
    big = y >= MAGIC
    shifted = y + MAGIC
    ry = shifted - MAGIC
    ok = tl.where(big, y < 2.0 * MAGIC, (ry >= 0.0) & (tl.abs(y - ry) < 0.25))
    bits = tl.where(big, y, shifted).to(tl.int64, bitcast=True) & 0xFFFFFFFFFFFFF
    bad = tl.sum((live & (t == 0) & ~ok).to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr + one, tl.full([1], 1, tl.int32), mask=(one + bad) > 0)
    field = (tl.where(ok, bits, 0) >> (t * WIDTH).to(tl.int64)) & ((1 << WIDTH) - 1)
    if WIDTH <= 23:  # offset < 2^23 too: the difference of two exact floats is exact
        v = (field.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        s = v - offset.to(tl.float32)
    else:
        s = (field - offset).to(tl.float32)
    rb = tl.load(r_ptr + idx // B, mask=live, other=0.0) * scale
    tl.store(out_ptr + idx, s * rb, mask=live)


@triton.jit(do_not_specialize=["count", "nw", "ranks", "denominator", "offset"])
def decode_sums_words_kernel(p_ptr, r_ptr, out_ptr, flag_ptr, count, nw, ranks, denominator, offset,
                             B: tl.constexpr, WIDTH: tl.constexpr, PER: tl.constexpr,
                             PERP: tl.constexpr, WORDS: tl.constexpr):
    """decode_sums_kernel with the float64 checks once per word: a [words, fields] tile."""
    pid = tl.program_id(0)
    one = tl.arange(0, 1)
    sent = tl.load(p_ptr + nw + one)
    rk = ranks.to(tl.float64)
    factor = tl.sum(rk / sent, axis=0)
    scale = tl.sum((sent / rk / denominator.to(tl.float64)).to(tl.float32), axis=0)
    bad_sent = ~((sent > 0.0) & ((sent - sent) == 0.0))
    tl.atomic_or(flag_ptr + one, tl.full([1], 2, tl.int32), mask=bad_sent & ((one + pid) == 0))
    w = pid * WORDS + tl.arange(0, WORDS)
    wm = w < nw
    y = tl.load(p_ptr + w, mask=wm, other=0.0) * factor
    big = y >= MAGIC
    shifted = y + MAGIC
    ry = shifted - MAGIC
    ok = tl.where(big, y < 2.0 * MAGIC, (ry >= 0.0) & (tl.abs(y - ry) < 0.25))
    bits = tl.where(big, y, shifted).to(tl.int64, bitcast=True) & 0xFFFFFFFFFFFFF
    bad = tl.sum((wm & ~ok).to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr + one, tl.full([1], 1, tl.int32), mask=(one + bad) > 0)
    t = tl.arange(0, PERP)
    field = (tl.where(ok, bits, 0)[:, None] >> (t * WIDTH).to(tl.int64)[None, :]) & ((1 << WIDTH) - 1)
    if WIDTH <= 23:
        v = (field.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        s = v - offset.to(tl.float32)
    else:
        s = (field - offset).to(tl.float32)
    idx = w[:, None] * PER + t[None, :]
    live = (t[None, :] < PER) & (idx < count)
    rb = tl.load(r_ptr + idx // B, mask=live, other=0.0) * scale
    tl.store(out_ptr + idx, s * rb, mask=live)
