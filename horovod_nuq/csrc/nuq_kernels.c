/* Fused CPU kernels for horovod_nuq: one pass per stage over float32 buckets.
 *
 * The same math as codec.py / wire.py, with the per-element uniform draw taken from a
 * counter-based hash (SplitMix64 of key + index), so each element still gets its own
 * independent U[0,1) (24-bit) draw without a separate random pass. Threads: OpenMP.
 */
#include <math.h>
#include <stdint.h>

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

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

/* Per-bucket scale: mode 0 = L2 norm, 1 = max |v|, 2 = min(trunc * mean|v|, max|v|).
 * A bucket holding NaN or Inf gets +inf, so it decodes to non-finite values. */
void nuq_scales(const float *x, int64_t n, int64_t B, int mode, float trunc, float *r) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * B, hi = lo + B < n ? lo + B : n;
        double s = 0.0, a = 0.0;
        float m = 0.0f;
        int bad = 0;
        for (int64_t i = lo; i < hi; i++) {
            float v = x[i], av = fabsf(v);
            if (!isfinite(v)) bad = 1;
            s += (double)v * v;
            a += av;
            if (av > m) m = av;
        }
        float out;
        if (mode == 0) out = (float)sqrt(s);
        else if (mode == 1) out = m;
        else {
            float t = hi > lo ? trunc * (float)(a / (double)(hi - lo)) : 0.0f;
            out = t < m ? t : m;
        }
        r[b] = bad ? INFINITY : out;
    }
}

static inline float inverse(float r) { return r > 0.0f ? 1.0f / r : 1.0f; }

/* Work is split into chunks of whole words; inside a chunk the bucket index advances
 * incrementally (no per-element division), and one 64-bit hash feeds two draws. */
#define CHUNK_WORDS 4096
#define QBLOCK 256

/* Signed level indices of x[i0, i1) (0 for padding past n) by stochastic rounding of |x| / r,
 * one bucket at a time with branch-free inner loops the compiler can vectorize. */
static void quant_range(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                        int uniform, uint64_t key, int64_t i0, int64_t i1, int *idx) {
    for (int64_t b = i0 / B; b * B < i1; b++) {
        int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
        int64_t real = hi < n ? hi : (lo < n ? n : lo);
        float inv = inverse(r[b]);
        int *out = idx + (lo - i0);
        const float *xs = x + lo;
        const uint32_t salt = salt_for(key, lo), base = (uint32_t)lo;
        const int len = (int)(real - lo);
        /* a < 1 ? a : 1 also maps NaN (from a non-finite bucket, r = inf) to a valid level */
        if (uniform) {
            const float fk = (float)k;
            for (int t = 0; t < len; t++) {
                float a = fabsf(xs[t]) * inv;
                a = a < 1.0f ? a : 1.0f;
                float xk = a * fk;
                int j = (int)xk;
                j = j < k - 1 ? j : k - 1;
                int id = j + (draw(salt, base + (uint32_t)t) < xk - (float)j);
                out[t] = xs[t] < 0.0f ? -id : id;
            }
        } else {  /* level search as k - 1 vectorized compare passes over an L1-resident block */
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
                for (int t = 0; t < m_len; t++) {
                    float l0 = lv[j[t]], l1 = lv[j[t] + 1];
                    int id = j[t] + (draw(salt, base + (uint32_t)(t0 + t)) * (l1 - l0) < a[t] - l0);
                    out[t0 + t] = xs[t0 + t] < 0.0f ? -id : id;
                }
            }
        }
        for (int64_t i = real; i < hi; i++) out[i - lo] = 0;
    }
}

/* Allgather format: codes idx + k packed `bits` per code, 8 codes per `bits` bytes. */
void nuq_encode_codes(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                      int uniform, uint64_t key, int bits, uint8_t *out) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1, groups = (nb * B + 7) / 8;
    int64_t chunks = (groups + CHUNK_WORDS - 1) / CHUNK_WORDS;
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int idx[8 * CHUNK_WORDS];
        int64_t g0 = c * CHUNK_WORDS, g1 = g0 + CHUNK_WORDS < groups ? g0 + CHUNK_WORDS : groups;
        int64_t i1 = 8 * g1 < nb * B ? 8 * g1 : nb * B;
        quant_range(x, n, B, r, lv, k, uniform, key, 8 * g0, i1, idx);
        for (int64_t i = i1; i < 8 * g1; i++) idx[i - 8 * g0] = 0;  /* tail of the last group */
        const int len = (int)(8 * (g1 - g0));
        uint8_t *o = out + g0 * bits;
        if (bits == 8) {          /* byte-aligned widths: simple loops the compiler vectorizes */
            for (int t = 0; t < len; t++) o[t] = (uint8_t)(idx[t] + k);
        } else if (bits == 4) {
            for (int t = 0; t < len / 2; t++)
                o[t] = (uint8_t)((idx[2 * t] + k) | (idx[2 * t + 1] + k) << 4);
        } else if (bits == 2) {
            for (int t = 0; t < len / 4; t++)
                o[t] = (uint8_t)((idx[4 * t] + k) | (idx[4 * t + 1] + k) << 2 |
                                 (idx[4 * t + 2] + k) << 4 | (idx[4 * t + 3] + k) << 6);
        } else {
            for (int64_t g = 0; g < g1 - g0; g++) {
                uint64_t word = 0;
                for (int t = 0; t < 8; t++) word |= (uint64_t)(idx[8 * g + t] + k) << (bits * t);
                for (int j = 0; j < bits; j++) o[g * bits + j] = (uint8_t)(word >> (8 * j));
            }
        }
    }
}

/* Allreduce format: signed numerators m + bound in `width`-bit fields, `per` per float64 word. */
void nuq_encode_sums(const float *x, int64_t n, int64_t B, const float *r, const float *lv,
                     const int64_t *signed_num, int k, int uniform, uint64_t key, int width, int per,
                     int64_t bound, double *out) {
    int64_t nb = n > 0 ? (n + B - 1) / B : 1, count = nb * B, words = (count + per - 1) / per;
    const int64_t cw = CHUNK_WORDS / 4;  /* per <= 24 (fields are >= 2 bits in < 50-bit words) */
    int64_t chunks = (words + cw - 1) / cw;
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int idx[32 * CHUNK_WORDS / 4];
        int64_t w0 = c * cw, w1 = w0 + cw < words ? w0 + cw : words;
        int64_t i0 = w0 * per, i1 = w1 * per < count ? w1 * per : count;
        quant_range(x, n, B, r, lv, k, uniform, key, i0, i1, idx);
        for (int64_t w = w0; w < w1; w++) {
            uint64_t word = 0;
            for (int t = 0; t < per; t++) {
                int64_t i = w * per + t;
                if (i >= i1) break;
                int v = idx[i - i0];
                word += (uint64_t)((uniform ? v : signed_num[v + k]) + bound) << (width * t);
            }
            out[w] = (double)word;
        }
    }
}

/* out[i0..i1) = (or +=) table[c[i - i0]] * r[bucket] * scale, one bucket segment at a time. */
static void scale_range(const int *c, const float *table, const float *r, float scale, int64_t B,
                        int64_t i0, int64_t i1, float *out, int first) {
    for (int64_t b = i0 / B; b * B < i1; b++) {
        int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
        const float rb = r[b] * scale;
        const int *cs = c + (lo - i0);
        float *o = out + lo;
        const int len = (int)(hi - lo);
        if (first) for (int t = 0; t < len; t++) o[t] = table[cs[t]] * rb;
        else for (int t = 0; t < len; t++) o[t] += table[cs[t]] * rb;
    }
}

/* Decode one rank's allgather codes and add r * level into acc (or store when first).
 * Returns 1 if a code exceeded 2k (corrupt payload). */
int nuq_decode_codes(const uint8_t *in, int64_t count, int64_t B, const float *r, const float *signed_values,
                     int k, int bits, float scale, float *acc, int first) {
    int64_t groups = (count + 7) / 8, chunks = (groups + CHUNK_WORDS - 1) / CHUNK_WORDS;
    const uint64_t mask = (1ULL << bits) - 1;
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int c[8 * CHUNK_WORDS];
        int64_t g0 = ch * CHUNK_WORDS, g1 = g0 + CHUNK_WORDS < groups ? g0 + CHUNK_WORDS : groups;
        int64_t i0 = 8 * g0, i1 = 8 * g1 < count ? 8 * g1 : count;
        const uint8_t *p = in + g0 * bits;
        const int len = (int)(8 * (g1 - g0));
        if (bits == 8) {
            for (int t = 0; t < len; t++) c[t] = p[t];
        } else if (bits == 4) {
            for (int t = 0; t < len / 2; t++) { c[2 * t] = p[t] & 15; c[2 * t + 1] = p[t] >> 4; }
        } else {
            for (int64_t g = 0; g < g1 - g0; g++) {
                uint64_t word = 0;
                for (int j = 0; j < bits; j++) word |= (uint64_t)p[g * bits + j] << (8 * j);
                for (int t = 0; t < 8; t++) c[8 * g + t] = (int)((word >> (bits * t)) & mask);
            }
        }
        for (int t = 0; t < len; t++) {
            bad |= c[t] > 2 * k;
            c[t] = c[t] > 2 * k ? k : c[t];
        }
        scale_range(c, signed_values, r, scale, B, i0, i1, acc, first);
    }
    return bad;
}

/* Decode reduced summable words: words * factor must be integers (else returns 1); field
 * sums minus offset, times r[bucket] * scale, are written to out[0..count). */
int nuq_decode_sums(const double *words, int64_t count, int64_t B, double factor, int width, int per,
                    int64_t offset, const float *r, float scale, float *out) {
    int64_t nw = (count + per - 1) / per;
    const int64_t cw = CHUNK_WORDS / 4;
    int64_t chunks = (nw + cw - 1) / cw;
    const uint64_t mask = (1ULL << width) - 1;
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t ch = 0; ch < chunks; ch++) {
        float s[32 * CHUNK_WORDS / 4];
        int64_t w0 = ch * cw, w1 = w0 + cw < nw ? w0 + cw : nw;
        int64_t i0 = w0 * per, i1 = w1 * per < count ? w1 * per : count;
        for (int64_t w = w0; w < w1; w++) {
            double y = words[w] * factor, ry = nearbyint(y);
            if (!(fabs(y - ry) < 0.25) || ry < 0.0 || ry >= 9007199254740992.0) { bad = 1; ry = 0.0; }
            uint64_t W = (uint64_t)ry;
            for (int t = 0; t < per; t++)
                s[(w - w0) * per + t] = (float)((int64_t)((W >> (width * t)) & mask) - offset);
        }
        for (int64_t b = i0 / B; b * B < i1; b++) {
            int64_t lo = b * B > i0 ? b * B : i0, hi = (b + 1) * B < i1 ? (b + 1) * B : i1;
            const float rb = r[b] * scale;
            for (int64_t i = lo; i < hi; i++) out[i] = s[i - i0] * rb;
        }
    }
    return bad;
}
