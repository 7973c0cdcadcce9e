/* Fused CPU kernels for horovod_nuq: one pass per stage over float32 buckets.
 *
 * The same math as codec.py / wire.py, with the per-element uniform draw taken from a
 * counter-based hash (murmur3's finalizer of key and index), so each element still gets its
 * own independent U[0,1) (24-bit) draw without a separate random pass. Threads: OpenMP.
 *
 * Encoding quantizes a block of BLOCK elements into one byte per code (idx + k, in [0, 2k])
 * and packs it while it is still in L1; decoding unpacks a block the same way. Plain loops
 * are written so gcc vectorizes them (they are also the fallback without AVX2); AVX2
 * intrinsics are used where gcc cannot: lookups in small tables held in registers (levels,
 * decoded values; gcc would emit slow gathers), the quantization loop (gcc's version
 * narrows to bytes early and spills), and packing fields into or out of 64-bit words.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PAR_MIN 32768  /* elements below which a stage stays on one thread (fork/join > gain) */
#define BLOCK 2048     /* elements whose codes are staged at once; a multiple of 8 */

/* U[0,1) with 24 random bits for element i: a 32-bit avalanche hash (murmur3's finalizer)
 * of the element index and the per-call key. `salt` carries the key and the index's high
 * bits (constant over a bucket), so the inner loops stay 32-bit and vectorize. */
static inline uint32_t salt_for(uint64_t key, int64_t i) {
    return (uint32_t)key ^ ((uint32_t)(key >> 32) + (uint32_t)((uint64_t)i >> 32) * 0x85ebca6bu);
}

static inline float draw(uint32_t salt, uint32_t i) {
    uint32_t h = i * 0x9e3779b9u ^ salt;
    h ^= h >> 16; h *= 0x85ebca6bu;
    h ^= h >> 13; h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

#ifdef __AVX2__
/* draw() of 8 elements, from their index times 0x9e3779b9 (kept as a running sum) and salt. */
static inline __m256 draw8(__m256i ig, __m256i salt) {
    __m256i h = _mm256_xor_si256(ig, salt);
    h = _mm256_mullo_epi32(_mm256_xor_si256(h, _mm256_srli_epi32(h, 16)), _mm256_set1_epi32((int)0x85ebca6bu));
    h = _mm256_mullo_epi32(_mm256_xor_si256(h, _mm256_srli_epi32(h, 13)), _mm256_set1_epi32((int)0xc2b2ae35u));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

/* t[j] for 8 indices j in [0, 16), the 16-entry table held in two registers (lo, hi). */
static inline __m256 lut16(__m256 lo, __m256 hi, __m256i j) {
    __m256 a = _mm256_permutevar8x32_ps(lo, j), b = _mm256_permutevar8x32_ps(hi, j);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(j, 28)));  /* bit 3 of j */
}

/* The low bytes of 8 int32 lanes (values in [0, 255]) stored to out[0..8). */
static inline void store_bytes8(uint8_t *out, __m256i v) {
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(w, w));
}

/* The same for 32 lanes, a .. d in order. */
static inline void store_bytes32(uint8_t *out, __m256i a, __m256i b, __m256i c, __m256i d) {
    /* the packs interleave 128-bit lanes: dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 ... */
    __m256i v = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

/* Per-bucket scale: mode 0 = L2 norm, 1 = max |v|, 2 = min(trunc * mean|v|, max|v|).
 * A bucket holding NaN or Inf gets +inf, so it decodes to non-finite values. The sums are
 * double and so are finite exactly when every element is (squares or absolute values of
 * finite floats cannot overflow them). `omp simd reduction` lets gcc split them into vector
 * lanes (results differ from a sequential sum only by rounding order). */
void nuq_scales(const float *x, int64_t n, int64_t B, int mode, float trunc, float *r) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1;
    #pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * B, hi = lo + B < n ? lo + B : n;
        double s = 0.0;  /* sum of squares (mode 0) or of |v| (modes 1, 2) */
        float m = 0.0f, out;
        if (mode == 0) {
            #pragma omp simd reduction(+ : s)
            for (int64_t i = lo; i < hi; i++) s += (double)x[i] * x[i];
            out = (float)sqrt(s);
        } else {
            #pragma omp simd reduction(+ : s) reduction(max : m)
            for (int64_t i = lo; i < hi; i++) {
                float av = fabsf(x[i]);
                s += av;
                m = av > m ? av : m;
            }
            float t = hi > lo ? trunc * (float)(s / (double)(hi - lo)) : 0.0f;
            out = mode == 1 ? m : (t < m ? t : m);
        }
        r[b] = isfinite(s) ? out : INFINITY;
    }
}

/* The uniform the encoders draw for each element i0 .. i0 + n - 1 under `key`, written to
 * out[0, n): exported so tests can replay a call's draws through the NumPy reference. */
void nuq_uniforms(uint64_t key, int64_t i0, int64_t n, float *out) {
    for (int64_t t = 0; t < n; t++) {
        int64_t i = i0 + t;
        out[t] = draw(salt_for(key, i), (uint32_t)i);
    }
}

static inline float inverse(float r) { return r > 0.0f ? 1.0f / r : 1.0f; }

/* Non-uniform levels, portable: level search as k - 1 vectorized compare passes over a
 * small L1-resident block, then stochastic rounding between lv[j] and lv[j + 1]. */
#define QBLOCK 256
static void quant_levels(const float *xs, int len, float inv, const float *lv, int k, uint32_t salt,
                         uint32_t base, uint8_t *code) {
    for (int t0 = 0; t0 < len; t0 += QBLOCK) {
        int m_len = len - t0 < QBLOCK ? len - t0 : QBLOCK;
        float a[QBLOCK];
        int j[QBLOCK];
        for (int t = 0; t < m_len; t++) {
            float v = fabsf(xs[t0 + t]) * inv;
            a[t] = v < 1.0f ? v : 1.0f;
            j[t] = 0;
        }
        for (int m = 1; m < k; m++) {
            const float l = lv[m];
            for (int t = 0; t < m_len; t++) j[t] += a[t] >= l;
        }
        for (int t = 0; t < m_len; t++) {  /* (an int result lets gcc vectorize the gathers) */
            float l0 = lv[j[t]], l1 = lv[j[t] + 1];
            int id = j[t] + (draw(salt, base + (uint32_t)(t0 + t)) * (l1 - l0) < a[t] - l0);
            j[t] = k + (signbit(xs[t0 + t]) ? -id : id);
        }
        for (int t = 0; t < m_len; t++) code[t0 + t] = (uint8_t)j[t];
    }
}

/* Uniform levels l_j = j / k: j = floor(a * k), no search. */
static void quant_uniform(const float *xs, int len, float inv, int k, uint32_t salt, uint32_t base,
                          uint8_t *code) {
    const float fk = (float)k;
    for (int t = 0; t < len; t++) {
        float a = fabsf(xs[t]) * inv;
        a = a < 1.0f ? a : 1.0f;  /* also maps NaN (r = inf) to a valid level */
        float xk = a * fk;
        int j = (int)xk;
        j = j < k - 1 ? j : k - 1;
        int id = j + (draw(salt, base + (uint32_t)t) < xk - (float)j);
        code[t] = (uint8_t)(k + (signbit(xs[t]) ? -id : id));
    }
}

#ifdef __AVX2__
/* Both of the above 8 elements at a time with the same arithmetic (so the same codes), for
 * uniform levels or k <= 15: then lv[j], lv[j + 1] come from a table in registers instead
 * of gathers, and j counts the levels <= a in registers. (gcc's own vectorization of those
 * loops narrows to bytes too early and spills.) */
typedef struct {
    __m256 lo, hi, inv, fk;  /* levels lv[min(j, k)] for j < 16; 1 / r; k */
    __m256i salt, k, km1;
    const float *lv;
    int nk;
} quant8_t;

#define INLINE static inline __attribute__((always_inline))

INLINE __m256i quant8(const quant8_t *q, const float *xs, __m256i ig, const int uniform) {
    const __m256 v = _mm256_loadu_ps(xs), one = _mm256_set1_ps(1.0f);
    /* min(a, 1) returns 1 when a is NaN (non-finite bucket): a valid level */
    __m256 a = _mm256_min_ps(_mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), q->inv), one);
    __m256i j;
    __m256 up;
    if (uniform) {
        __m256 xk = _mm256_mul_ps(a, q->fk);
        j = _mm256_min_epi32(_mm256_cvttps_epi32(xk), q->km1);
        up = _mm256_cmp_ps(draw8(ig, q->salt), _mm256_sub_ps(xk, _mm256_cvtepi32_ps(j)), _CMP_LT_OQ);
    } else {
        j = _mm256_setzero_si256();
        for (int m = 1; m < q->nk; m++)
            j = _mm256_sub_epi32(j, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_broadcast_ss(q->lv + m), _CMP_GE_OQ)));
        __m256i j1 = _mm256_sub_epi32(j, _mm256_set1_epi32(-1));
        __m256 l0, l1;
        if (q->nk < 8) {  /* all levels in one register */
            l0 = _mm256_permutevar8x32_ps(q->lo, j), l1 = _mm256_permutevar8x32_ps(q->lo, j1);
        } else {
            l0 = lut16(q->lo, q->hi, j), l1 = lut16(q->lo, q->hi, j1);
        }
        up = _mm256_cmp_ps(_mm256_mul_ps(draw8(ig, q->salt), _mm256_sub_ps(l1, l0)), _mm256_sub_ps(a, l0), _CMP_LT_OQ);
    }
    /* k + id, or k - id where v's sign bit is set: like signbit() in the loops above (id = 0
     * for +-0; only a NaN's sign differs from v < 0, and its bucket decodes non-finite anyway) */
    __m256i id = _mm256_sub_epi32(j, _mm256_castps_si256(up));
    return _mm256_add_epi32(_mm256_sign_epi32(id, _mm256_castps_si256(v)), q->k);
}

/* The loop over x[0, len) for a constant `uniform`; returns how many elements it did (a
 * multiple of 8). */
INLINE int quant_avx2_loop(const quant8_t *q, const float *xs, int len, uint32_t base, uint8_t *code,
                           const int uniform) {
    const __m256i g8 = _mm256_set1_epi32((int)(8u * 0x9e3779b9u));
    __m256i ig = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                    _mm256_set1_epi32((int)0x9e3779b9u));
    int t = 0;
    for (; t + 32 <= len; t += 32) {
        __m256i c0 = quant8(q, xs + t, ig, uniform), c1, c2, c3;
        ig = _mm256_add_epi32(ig, g8), c1 = quant8(q, xs + t + 8, ig, uniform);
        ig = _mm256_add_epi32(ig, g8), c2 = quant8(q, xs + t + 16, ig, uniform);
        ig = _mm256_add_epi32(ig, g8), c3 = quant8(q, xs + t + 24, ig, uniform);
        ig = _mm256_add_epi32(ig, g8);
        store_bytes32(code + t, c0, c1, c2, c3);
    }
    for (; t + 8 <= len; t += 8, ig = _mm256_add_epi32(ig, g8)) store_bytes8(code + t, quant8(q, xs + t, ig, uniform));
    return t;
}

/* Returns how many elements it did; the portable loops finish the rest. */
static int quant_avx2(const float *xs, int len, float inv, const float *lv, int k, int uniform,
                      uint32_t salt, uint32_t base, uint8_t *code) {
    float t16[16];
    for (int j = 0; j < 16; j++) t16[j] = lv[j < k ? j : k];
    const quant8_t q = {_mm256_loadu_ps(t16), _mm256_loadu_ps(t16 + 8), _mm256_set1_ps(inv), _mm256_set1_ps((float)k),
                        _mm256_set1_epi32((int)salt), _mm256_set1_epi32(k), _mm256_set1_epi32(k - 1), lv, k};
    return uniform ? quant_avx2_loop(&q, xs, len, base, code, 1) : quant_avx2_loop(&q, xs, len, base, code, 0);
}
#endif

/* Codes (idx + k) of x[i0, i1) by stochastic rounding of |x| / r, k for padding past n;
 * one bucket segment at a time. */
static void quant_range(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                        int uniform, uint64_t key, int64_t i0, int64_t i1, uint8_t *code) {
    for (int64_t b = i0 / B; b * B < i1; b++) {
        int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
        int64_t real = hi < n ? hi : (lo < n ? n : lo);
        float inv = inverse(r[b]);
        uint8_t *out = code + (lo - i0);
        const float *xs = x + lo;
        const uint32_t salt = salt_for(key, lo), base = (uint32_t)lo;
        const int len = (int)(real - lo);
        int t = 0;
#ifdef __AVX2__
        if (uniform || k <= 15) t = quant_avx2(xs, len, inv, lv, k, uniform, salt, base, out);
#endif
        if (uniform) quant_uniform(xs + t, len - t, inv, k, salt, base + (uint32_t)t, out + t);
        else quant_levels(xs + t, len - t, inv, lv, k, salt, base + (uint32_t)t, out + t);
        memset(out + len, k, (size_t)(hi - real));
    }
}

/* Other widths, little-endian hosts: the 8 codes of a group as one 64-bit word, whose bytes
 * become `bits`-bit fields (or back) in three shift-and-mask steps (pairs, quads, halves).
 * UNITS(w, s): the low w bits of every s-bit unit of a 64-bit word. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SWAR_CODES 1
#define UNITS(w, s) ((~0ULL / ((1ULL << (s)) - 1)) * ((1ULL << (w)) - 1))

static inline uint64_t bytes_to_fields(uint64_t x, int bits) {  /* bytes < 2^bits */
    x = (x & UNITS(8, 16)) | (x >> 8 & UNITS(8, 16)) << bits;
    x = (x & UNITS(16, 32)) | (x >> 16 & UNITS(16, 32)) << 2 * bits;
    return (x & 0xffffffffULL) | (x >> 32) << 4 * bits;
}

static inline uint64_t fields_to_bytes(uint64_t x, int bits) {  /* bits past 8 * bits ignored */
    const uint64_t low4 = (1ULL << 4 * bits) - 1;
    x = (x & low4) | (x >> 4 * bits & low4) << 32;
    x = (x & UNITS(2 * bits, 32)) | (x >> 2 * bits & UNITS(2 * bits, 32)) << 16;
    return (x & UNITS(bits, 16)) | (x >> bits & UNITS(bits, 16)) << 8;
}
#endif

/* Pack `len` codes (a multiple of 8) `bits` each, 8 codes per `bits` bytes, little-endian. */
static void pack_codes(const uint8_t *c, int len, int bits, uint8_t *o) {
    if (bits == 8) {
        memcpy(o, c, (size_t)len);
    } else if (bits == 4) {
        for (int t = 0; t < len / 2; t++) o[t] = (uint8_t)(c[2 * t] | c[2 * t + 1] << 4);
    } else if (bits == 2) {
        for (int t = 0; t < len / 4; t++)
            o[t] = (uint8_t)(c[4 * t] | c[4 * t + 1] << 2 | c[4 * t + 2] << 4 | c[4 * t + 3] << 6);
    } else {
        const int ng = len / 8;
        int g = 0;
#ifdef SWAR_CODES
        for (; g * bits + 8 <= ng * bits; g++) {  /* 8-byte stores; the next group's overwrite the excess */
            uint64_t x;
            memcpy(&x, c + 8 * g, 8);
            x = bytes_to_fields(x, bits);
            memcpy(o + g * bits, &x, 8);
        }
#endif
        for (; g < ng; g++) {
            uint64_t word = 0;
            for (int t = 0; t < 8; t++) word |= (uint64_t)c[8 * g + t] << (bits * t);
            for (int j = 0; j < bits; j++) o[g * bits + j] = (uint8_t)(word >> (8 * j));
        }
    }
}

/* Inverse of pack_codes: the codes of `len` (a multiple of 8) packed codes; for 8 bits
 * the input itself. */
static const uint8_t *unpack_codes(const uint8_t *p, int len, int bits, uint8_t *c) {
    const uint64_t mask = (1ULL << bits) - 1;
    if (bits == 8) return p;
    if (bits == 4) {
        for (int t = 0; t < len / 2; t++) { c[2 * t] = p[t] & 15; c[2 * t + 1] = p[t] >> 4; }
    } else if (bits == 2) {
        for (int t = 0; t < len / 4; t++)
            for (int j = 0; j < 4; j++) c[4 * t + j] = (p[t] >> (2 * j)) & 3;
    } else {
        const int ng = len / 8;
        int g = 0;
#ifdef SWAR_CODES
        for (; g * bits + 8 <= ng * bits; g++) {  /* 8-byte loads within this block's bytes */
            uint64_t x;
            memcpy(&x, p + g * bits, 8);
            x = fields_to_bytes(x, bits);
            memcpy(c + 8 * g, &x, 8);
        }
#endif
        for (; g < ng; g++) {
            uint64_t word = 0;
            for (int j = 0; j < bits; j++) word |= (uint64_t)p[g * bits + j] << (8 * j);
            for (int t = 0; t < 8; t++) c[8 * g + t] = (uint8_t)((word >> (bits * t)) & mask);
        }
    }
    return c;
}

/* Allgather format: codes idx + k packed `bits` per code, 8 codes per `bits` bytes. */
void nuq_encode_codes(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                      int uniform, uint64_t key, int bits, uint8_t *out) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1, count = nb * B, padded = (count + 7) / 8 * 8;
    int64_t blocks = (padded + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static) if (count > PAR_MIN)
    for (int64_t c = 0; c < blocks; c++) {
        uint8_t code[BLOCK];
        int64_t i0 = c * BLOCK, i1 = i0 + BLOCK < count ? i0 + BLOCK : count;
        int len = (int)((i0 + BLOCK < padded ? i0 + BLOCK : padded) - i0);
        quant_range(x, n, B, r, lv, k, uniform, key, i0, i1, code);
        memset(code + (i1 - i0), k, (size_t)(len - (i1 - i0)));  /* tail of the last group */
        pack_codes(code, len, bits, out + i0 / 8 * bits);
    }
}

#ifdef __AVX2__
/* 16-bit fields f_0, f_1, .. (< 2^w, w <= 14) summed in fours with two exact multiply-adds:
 * qword q of the result is f_4q + f_4q+1 << w + f_4q+2 << 2w + f_4q+3 << 3w. */
static inline __m256i fields_to_quads(__m256i f16, int w) {
    __m256i p = _mm256_madd_epi16(f16, _mm256_set1_epi32(1 | 1 << (16 + w)));  /* f_2j + f_2j+1 << w */
    return _mm256_add_epi64(_mm256_blend_epi32(p, _mm256_setzero_si256(), 0xaa),
                            _mm256_mul_epu32(_mm256_srli_epi64(p, 32), _mm256_set1_epi64x(1LL << 2 * w)));
}

/* Integers in [0, 2^52) held in 64-bit lanes as exact doubles. */
static inline __m128d u52_to_pd(__m128i v) {
    const __m128d magic = _mm_set1_pd(4503599627370496.0);  /* 2^52 */
    return _mm_sub_pd(_mm_castsi128_pd(_mm_or_si128(v, _mm_castpd_si128(magic))), magic);
}
#endif

/* Allreduce format: the field values fv[c] of `per` codes in `width`-bit fields of one
 * float64 word; the padding code 255 past `count` has field value 0. `small`: codes and
 * field values fit a 16-entry byte table. Reads up to 16 codes past the last word. */
static void pack_sums(const uint8_t *c, int64_t words, int per, int width, const int64_t *fv,
                      int small, double *out) {
    int64_t w = 0;
#ifdef __AVX2__
    if (small && per <= 16 && width <= 14 && per * width <= 52) {
        /* codes -> field bytes with one byte shuffle (a set high bit, ORed into the bytes past
         * `per`, gives 0), widened to 16 bits and summed by fields_to_quads; then the quads
         * are shifted into place and added: two words per step when per <= 8, else one */
        const int two = per <= 8;
        uint8_t t16[16], pad[16];
        for (int j = 0; j < 16; j++) t16[j] = (uint8_t)fv[j], pad[j] = (two ? j % 8 : j) < per ? 0 : 0x80;
        const __m128i tab = _mm_loadu_si128((const __m128i *)t16), hib = _mm_loadu_si128((const __m128i *)pad);
        const __m256i sh = two ? _mm256_setr_epi64x(0, 4 * width, 0, 4 * width)
                               : _mm256_setr_epi64x(0, 4 * width, 8 * width, 12 * width);
        for (; w + 2 <= words; w += 1 + two) {
            const uint8_t *cw = c + w * per;
            __m128i x = two ? _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)cw),
                                                 _mm_loadl_epi64((const __m128i *)(cw + per)))
                            : _mm_loadu_si128((const __m128i *)cw);
            x = _mm_shuffle_epi8(tab, _mm_or_si128(x, hib));
            __m256i q = _mm256_sllv_epi64(fields_to_quads(_mm256_cvtepu8_epi16(x), width), sh);
            q = _mm256_add_epi64(q, _mm256_shuffle_epi32(q, 0x4e));  /* + the other quad of the lane */
            if (two) {
                _mm_storeu_pd(out + w, u52_to_pd(_mm256_castsi256_si128(_mm256_permute4x64_epi64(q, 0x08))));
            } else {
                __m128i s = _mm_add_epi64(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_store_sd(out + w, u52_to_pd(s));
            }
        }
    }
#else
    (void)small;
#endif
    for (; w < words; w++) {
        uint64_t word = 0;
        for (int t = 0; t < per; t++) word += (uint64_t)fv[c[w * per + t]] << (width * t);
        out[w] = (double)word;
    }
}

void nuq_encode_sums(const float *x, int64_t n, int64_t B, const float *r, const float *lv,
                     const int64_t *signed_num, int k, int uniform, uint64_t key, int width, int per,
                     int64_t bound, double *out) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1, count = nb * B, words = (count + per - 1) / per;
    const int64_t wpb = BLOCK / per;  /* words per block (per <= 24) */
    int64_t blocks = (words + wpb - 1) / wpb;
    int64_t fv[256] = {0};  /* field value of each code; 0 for the padding code 255 */
    for (int c = 0; c <= 2 * k; c++) fv[c] = (uniform ? c - k : signed_num[c]) + bound;
    const int small = 2 * k < 16 && 2 * bound < 256;
    #pragma omp parallel for schedule(static) if (count > PAR_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t code[BLOCK + 32];
        int64_t w0 = b * wpb, w1 = w0 + wpb < words ? w0 + wpb : words;
        int64_t i0 = w0 * per, i1 = w1 * per < count ? w1 * per : count;
        quant_range(x, n, B, r, lv, k, uniform, key, i0, i1, code);
        memset(code + (i1 - i0), 255, 32 + (size_t)(w1 * per - i1));  /* past count: field 0 */
        pack_sums(code, w1 - w0, per, width, fv, small, out + w0);
    }
}

/* out[i0..i1) = (or +=) tab[c[i - i0]] * r[bucket] * scale, one bucket segment at a time;
 * `small`: all codes are < 16. */
static void scale_range(const uint8_t *c, const float *tab, int small, const float *r, float scale,
                        int64_t B, int64_t i0, int64_t i1, float *out, int first) {
    for (int64_t b = i0 / B; b * B < i1; b++) {
        int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
        const float rb = r[b] * scale;
        const uint8_t *cs = c + (lo - i0);
        float *o = out + lo;
        const int len = (int)(hi - lo);
        int t = 0;
#ifdef __AVX2__
        if (small) {  /* the table in two registers; fma as gcc contracts o[t] += tab[c] * rb */
            const __m256 vr = _mm256_set1_ps(rb), tl = _mm256_loadu_ps(tab), th = _mm256_loadu_ps(tab + 8);
            for (; t + 8 <= len; t += 8) {
                __m256 v = lut16(tl, th, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cs + t))));
                _mm256_storeu_ps(o + t, first ? _mm256_mul_ps(v, vr) : _mm256_fmadd_ps(v, vr, _mm256_loadu_ps(o + t)));
            }
        } else {  /* 8 table loads: faster than a gather here */
            const __m256 vr = _mm256_set1_ps(rb);
            for (; t + 8 <= len; t += 8) {
                const uint8_t *q = cs + t;
                __m256 v = _mm256_setr_ps(tab[q[0]], tab[q[1]], tab[q[2]], tab[q[3]], tab[q[4]], tab[q[5]], tab[q[6]], tab[q[7]]);
                _mm256_storeu_ps(o + t, first ? _mm256_mul_ps(v, vr) : _mm256_fmadd_ps(v, vr, _mm256_loadu_ps(o + t)));
            }
        }
#else
        (void)small;
#endif
        if (first) for (; t < len; t++) o[t] = tab[cs[t]] * rb;
        else for (; t < len; t++) o[t] += tab[cs[t]] * rb;
    }
}

/* Decode one rank's allgather codes and add r * level into acc (or store when first).
 * Returns 1 if a code exceeded 2k (corrupt payload); such codes decode as 0. */
int nuq_decode_codes(const uint8_t *in, int64_t count, int64_t B, const float *r, const float *signed_values,
                     int k, int bits, float scale, float *acc, int first) {
    int64_t padded = (count + 7) / 8 * 8, blocks = (padded + BLOCK - 1) / BLOCK;
    float tab[256] = {0};
    memcpy(tab, signed_values, sizeof(float) * (size_t)(2 * k + 1));
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad) if (count > PAR_MIN)
    for (int64_t ch = 0; ch < blocks; ch++) {
        uint8_t buf[BLOCK];
        int64_t i0 = ch * BLOCK, i1 = i0 + BLOCK < count ? i0 + BLOCK : count;
        int len = (int)((i0 + BLOCK < padded ? i0 + BLOCK : padded) - i0);
        const uint8_t *c = unpack_codes(in + i0 / 8 * bits, len, bits, buf);
        uint8_t hi = 0;
        for (int t = 0; t < len; t++) hi = c[t] > hi ? c[t] : hi;
        bad |= hi > 2 * k;
        scale_range(c, tab, bits <= 4, r, scale, B, i0, i1, acc, first);
    }
    return bad;
}

/* words[0, nw) * factor as integers W; returns 1 (and uses 0) for any that is not an
 * integer in [0, 2^53). */
static int words_to_int(const double *words, int64_t nw, double factor, uint64_t *W) {
    int bad = 0;
    int64_t w = 0;
#ifdef __AVX2__
    /* 4 at a time while all are integers below 2^52, where adding 2^52 makes the integer
     * the low bits of the double; anything else ends this loop and goes to the scalar one */
    const __m256d f = _mm256_set1_pd(factor), magic = _mm256_set1_pd(4503599627370496.0), zero = _mm256_setzero_pd();
    const __m256d quarter = _mm256_set1_pd(0.25), sign = _mm256_set1_pd(-0.0);
    for (; w + 4 <= nw; w += 4) {
        __m256d y = _mm256_mul_pd(_mm256_loadu_pd(words + w), f);
        __m256d ry = _mm256_round_pd(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256d ok = _mm256_and_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, _mm256_sub_pd(y, ry)), quarter, _CMP_LT_OQ),
                                   _mm256_and_pd(_mm256_cmp_pd(ry, zero, _CMP_GE_OQ), _mm256_cmp_pd(ry, magic, _CMP_LT_OQ)));
        if (_mm256_movemask_pd(ok) != 15) break;
        _mm256_storeu_si256((__m256i *)(W + w), _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(ry, magic)),
                                                                _mm256_castpd_si256(magic)));
    }
#endif
    for (; w < nw; w++) {
        double y = words[w] * factor, ry = nearbyint(y);
        if (!(fabs(y - ry) < 0.25) || ry < 0.0 || ry >= 9007199254740992.0) { bad = 1; ry = 0.0; }
        W[w] = (uint64_t)ry;
    }
    return bad;
}

/* The `per` fields of `width` bits of each of W[0, nw), minus offset, as floats to s. */
static void unpack_fields(const uint64_t *W, int64_t nw, int per, int width, int64_t offset, float *s) {
    const uint64_t mask = (1ULL << width) - 1;
    int64_t w = 0;
#ifdef __AVX2__
    /* 8 fields at a time (int32 is exact for them), writing up to 7 floats past the word (the
     * next word overwrites them; s has room for them after the last): fields 0 1 4 5 and
     * 2 3 6 7 shifted down in 64-bit lanes, whose low halves one shuffle puts in order */
    if (width <= 30 && offset < (1 << 30) && per <= 24) {
        const __m256i vm = _mm256_set1_epi32((int)mask), off = _mm256_set1_epi32((int)offset);
        const __m256i w8 = _mm256_set1_epi64x(8LL * width);
        const __m256i sa0 = _mm256_setr_epi64x(0, width, 4 * width, 5 * width);
        const __m256i sb0 = _mm256_setr_epi64x(2 * width, 3 * width, 6 * width, 7 * width);
        for (; w < nw; w++) {
            const __m256i vw = _mm256_set1_epi64x((long long)W[w]);
            __m256i sa = sa0, sb = sb0;
            for (int t = 0; t < per; t += 8, sa = _mm256_add_epi64(sa, w8), sb = _mm256_add_epi64(sb, w8)) {
                __m256 f = _mm256_shuffle_ps(_mm256_castsi256_ps(_mm256_srlv_epi64(vw, sa)),
                                             _mm256_castsi256_ps(_mm256_srlv_epi64(vw, sb)), 0x88);
                __m256i fi = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(f), vm), off);
                _mm256_storeu_ps(s + w * per + t, _mm256_cvtepi32_ps(fi));
            }
        }
    }
#endif
    for (; w < nw; w++)
        for (int t = 0; t < per; t++) s[w * per + t] = (float)((int64_t)((W[w] >> (width * t)) & mask) - offset);
}

/* Decode reduced summable words: words * factor must be integers (else returns 1); field
 * sums minus offset, times r[bucket] * scale, are written to out[0..count). */
int nuq_decode_sums(const double *words, int64_t count, int64_t B, double factor, int width, int per,
                    int64_t offset, const float *r, float scale, float *out) {
    int64_t nw = (count + per - 1) / per;
    const int64_t wpb = BLOCK / per;
    int64_t blocks = (nw + wpb - 1) / wpb;
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad) if (count > PAR_MIN)
    for (int64_t ch = 0; ch < blocks; ch++) {
        float s[BLOCK + 8];
        uint64_t W[BLOCK];
        int64_t w0 = ch * wpb, w1 = w0 + wpb < nw ? w0 + wpb : nw;
        int64_t i0 = w0 * per, i1 = w1 * per < count ? w1 * per : count;
        bad |= words_to_int(words + w0, w1 - w0, factor, W);
        unpack_fields(W, w1 - w0, per, width, offset, s);
        for (int64_t b = i0 / B; b * B < i1; b++) {
            int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
            const float rb = r[b] * scale;
            for (int64_t i = lo; i < hi; i++) out[i] = s[i - i0] * rb;
        }
    }
    return bad;
}

/* ---- QSGD's Elias coding (Alistarh et al., arXiv 1610.02132, Section 3.2) ----------------
 * An entropy-coding pass over the same codes (idx + k) the fixed-width encoder makes from the
 * same draws. The count = nb * B codes are cut into chunks of ELIAS_CHUNK (the unit of
 * parallel work); each chunk is a byte-aligned bit stream, most significant bit first, of one
 * triple per non-zero code: Elias omega (recursive) code of the gap to it (the position of the
 * first non-zero counting from 1, then the distance from the previous one), a sign bit (1 =
 * negative), the Elias omega code of its level index in [1, k]; then the gap that lands one
 * past the chunk's end (the terminator) and zero bits to the byte boundary. */
#define ELIAS_CHUNK 65536

typedef struct { uint8_t *p; uint64_t acc; int n; } bitw_t;  /* acc: n pending bits (n < 8) */

static inline void bitw_put(bitw_t *w, uint64_t v, int len) {  /* len <= 32 */
    w->acc = (w->acc << len) | v;
    w->n += len;
    while (w->n >= 8) { w->n -= 8; *w->p++ = (uint8_t)(w->acc >> w->n); }
}

/* Elias omega code of N >= 1 (N < 2^26): its length; the code in the low bits of *code. */
static inline int omega_code(uint64_t N, uint64_t *code) {
    uint64_t c = 0;
    int len = 1;  /* the final 0 */
    while (N > 1) {
        int nb = 64 - __builtin_clzll(N);
        c |= N << len;
        len += nb;
        N = (uint64_t)(nb - 1);
    }
    *code = c;
    return len;
}

static inline void bitw_omega(bitw_t *w, uint64_t N) {
    uint64_t c;
    int len = omega_code(N, &c);
    if (len > 32) { bitw_put(w, c >> 32, len - 32); len = 32; c &= 0xffffffffULL; }
    bitw_put(w, c, len);
}

/* Encode: chunk c's stream is written at out + c * cap (cap bytes may hold its worst case),
 * then the streams are moved together; ends[c] = end of chunk c's bytes. Returns the bytes. */
int64_t nuq_elias_encode(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                         int uniform, uint64_t key, int64_t cap, uint8_t *out, uint32_t *ends) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1, count = nb * B;
    int64_t chunks = (count + ELIAS_CHUNK - 1) / ELIAS_CHUNK;
    #pragma omp parallel for schedule(dynamic, 1) if (count > PAR_MIN)
    for (int64_t c = 0; c < chunks; c++) {
        uint8_t code[BLOCK];
        int64_t c0 = c * ELIAS_CHUNK, c1 = c0 + ELIAS_CHUNK < count ? c0 + ELIAS_CHUNK : count;
        bitw_t w = {out + c * cap, 0, 0};
        int64_t last = -1;  /* position of the previous non-zero, relative to c0 */
        for (int64_t i0 = c0; i0 < c1; i0 += BLOCK) {
            int64_t i1 = i0 + BLOCK < c1 ? i0 + BLOCK : c1;
            quant_range(x, n, B, r, lv, k, uniform, key, i0, i1, code);
            for (int t = 0; t < (int)(i1 - i0); t++) {
                if (code[t] == k) continue;
                int64_t p = i0 - c0 + t;
                bitw_omega(&w, (uint64_t)(p - last));
                bitw_put(&w, code[t] < k, 1);
                bitw_omega(&w, (uint64_t)(code[t] < k ? k - code[t] : code[t] - k));
                last = p;
            }
        }
        bitw_omega(&w, (uint64_t)(c1 - c0 - last));  /* lands on c1: the end */
        if (w.n) *w.p++ = (uint8_t)(w.acc << (8 - w.n));
        ends[c] = (uint32_t)(w.p - (out + c * cap));
    }
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; c++) {
        int64_t len = ends[c];
        if (total != c * cap) memmove(out + total, out + c * cap, (size_t)len);
        total += len;
        ends[c] = (uint32_t)total;
    }
    return total;
}

/* A bit reader over bytes [0, nbytes): `buf` holds the next `cnt` bits at its top. */
typedef struct { const uint8_t *p; int64_t byte, nbytes; uint64_t buf; int cnt; } bitr_t;

static inline void bitr_refill(bitr_t *b) {
    if (b->byte + 8 <= b->nbytes) {  /* whole bytes while they fit: cnt becomes 56..63 */
        uint64_t w;
        memcpy(&w, b->p + b->byte, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        b->buf |= w >> b->cnt;
        b->byte += (63 - b->cnt) >> 3;
        b->cnt |= 56;
    } else {
        while (b->cnt <= 56 && b->byte < b->nbytes) {
            b->buf |= (uint64_t)b->p[b->byte++] << (56 - b->cnt);
            b->cnt += 8;
        }
    }
}

/* The next len (1 <= len <= 56) bits as an integer; 0 (and nothing read) past the end. */
static inline int bitr_get(bitr_t *b, int len, uint64_t *v) {
    if (len > b->cnt) {
        bitr_refill(b);
        if (len > b->cnt) return 0;
    }
    *v = b->buf >> (64 - len);
    b->buf <<= len;
    b->cnt -= len;
    return 1;
}

/* OMEGA8[byte]: (length << 8 | value) of the omega code word (values 1..15, at most 7 bits)
 * that starts the byte, or 0 if the word is longer (test_elias.py checks it against omega_code). */
static const uint16_t OMEGA8[256] = {
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101, 0x101,
    0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302,
    0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302, 0x302,
    0x604, 0x604, 0x604, 0x604, 0x000, 0x000, 0x000, 0x000, 0x605, 0x605, 0x605, 0x605, 0x000, 0x000, 0x000, 0x000,
    0x606, 0x606, 0x606, 0x606, 0x000, 0x000, 0x000, 0x000, 0x607, 0x607, 0x607, 0x607, 0x000, 0x000, 0x000, 0x000,
    0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303,
    0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303, 0x303,
    0x708, 0x708, 0x000, 0x000, 0x709, 0x709, 0x000, 0x000, 0x70a, 0x70a, 0x000, 0x000, 0x70b, 0x70b, 0x000, 0x000,
    0x70c, 0x70c, 0x000, 0x000, 0x70d, 0x70d, 0x000, 0x000, 0x70e, 0x70e, 0x000, 0x000, 0x70f, 0x70f, 0x000, 0x000,
};

/* An Elias omega code word; 0 when the stream ends inside it or its value exceeds 2^40.
 * Words of up to 7 bits (values < 16: most gaps and levels) come from one table lookup. */
static inline uint64_t bitr_omega(bitr_t *b) {
    if (b->cnt < 8) bitr_refill(b);
    if (b->cnt >= 8) {
        const uint16_t e = OMEGA8[b->buf >> 56];
        if (e) {
            b->buf <<= e >> 8;
            b->cnt -= e >> 8;
            return e & 255;
        }
    }
    uint64_t N = 1, bit, rest;
    for (;;) {
        if (!bitr_get(b, 1, &bit)) return 0;
        if (!bit) return N;
        if (N > 40 || !bitr_get(b, (int)N, &rest)) return 0;
        N = (1ULL << N) | rest;
    }
}

/* Decode one chunk's stream into codes (idx + k) of its `len` positions; 0 if malformed. */
static int elias_chunk(const uint8_t *s, int64_t bytes, int64_t len, int k, uint8_t *code) {
    bitr_t b = {s, 0, bytes, 0, 0};
    memset(code, k, (size_t)len);
    int64_t pos = -1;
    for (;;) {
        uint64_t gap = bitr_omega(&b), sign, level;
        if (gap == 0 || gap > (uint64_t)(len - pos)) return 0;
        pos += (int64_t)gap;
        if (pos == len) break;
        if (!bitr_get(&b, 1, &sign)) return 0;
        level = bitr_omega(&b);
        if (level == 0 || level > (uint64_t)k) return 0;
        code[pos] = (uint8_t)(sign ? k - (int)level : k + (int)level);
    }
    /* the rest up to the byte boundary: zero bits, and nothing after */
    bitr_refill(&b);
    return b.byte == b.nbytes && b.cnt < 8 && (b.cnt == 0 || (b.buf >> (64 - b.cnt)) == 0);
}

/* Decode one rank's Elias streams (chunk c: stream[ends[c-1], ends[c]); the caller checked
 * the ends are non-decreasing and within `bytes`) and add r * level * scale into acc (or
 * store when first), exactly as nuq_decode_codes does for the same codes. Returns 1 if a
 * chunk is malformed (then acc is incomplete). */
int nuq_elias_decode(const uint8_t *stream, const uint32_t *ends, int64_t count, int64_t B, const float *r,
                     const float *signed_values, int k, float scale, float *acc, int first) {
    int64_t chunks = (count + ELIAS_CHUNK - 1) / ELIAS_CHUNK;
    float tab[256] = {0};
    memcpy(tab, signed_values, sizeof(float) * (size_t)(2 * k + 1));
    int bad = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(| : bad) if (count > PAR_MIN)
    for (int64_t c = 0; c < chunks; c++) {
        uint8_t code[ELIAS_CHUNK];
        int64_t c0 = c * ELIAS_CHUNK, c1 = c0 + ELIAS_CHUNK < count ? c0 + ELIAS_CHUNK : count;
        uint32_t lo = c ? ends[c - 1] : 0;
        if (!elias_chunk(stream + lo, (int64_t)(ends[c] - lo), c1 - c0, k, code)) { bad = 1; continue; }
        scale_range(code, tab, 2 * k < 16, r, scale, B, c0, c1, acc, first);
    }
    return bad;
}

/* The decoder's table of short omega code words (for tests). */
void nuq_omega8(uint16_t *out) { memcpy(out, OMEGA8, sizeof OMEGA8); }
