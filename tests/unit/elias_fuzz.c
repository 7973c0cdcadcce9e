/* Fuzz nuq_elias_decode under AddressSanitizer (test_elias.py builds and runs it): random
 * streams, truncated and bit-flipped valid streams, each in a buffer of exactly its size, so
 * any read past a chunk is reported. Prints how many decoded and how many were refused. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
int nuq_elias_decode(const uint8_t *stream, const uint32_t *ends, int64_t count, int64_t B, const float *r,
                     const float *signed_values, int k, float scale, float *acc, int first);
int64_t nuq_elias_encode(const float *x, int64_t n, int64_t B, const float *r, const float *lv, int k,
                         int uniform, uint64_t key, int64_t cap, uint8_t *out, uint32_t *ends);
int main(int argc, char **argv) {
  if (argc < 2) return 2;
  if (argc == 4) {  /* decode one stream from a file (argv[2]) of argv[3] codes, k = 3, one chunk */
    FILE *f = fopen(argv[2], "rb"); if (!f) return 2;
    uint8_t *s = malloc(1 << 20); int64_t bytes = (int64_t)fread(s, 1, 1 << 20, f); fclose(f);
    uint8_t *exact = malloc(bytes ? bytes : 1); memcpy(exact, s, bytes); free(s);
    int64_t count = atoll(argv[3]); uint32_t ends = (uint32_t)bytes;
    float *r = calloc(count, 4), *acc = malloc(4 * count); float sv[7] = {0};
    int bad = nuq_elias_decode(exact, &ends, count, count, r, sv, 3, 1.0f, acc, 1);
    printf("decoded %d, refused %d\n", !bad, bad);
    free(exact); free(r); free(acc); return 0;
  }
  srand(1); int okc = 0, badc = 0;
  const int k = 3; float sv[7] = {-1,-2./3,-1./3,0,1./3,2./3,1}; float lv[4] = {0, 1./3, 2./3, 1};
  for (int trial = 0; trial < atoi(argv[1]); trial++) {
    int64_t count = 1 + rand() % 200, B = 64, nb = (count + B - 1) / B; count = nb * B;
    float *r = malloc(4 * nb); for (int i = 0; i < nb; i++) r[i] = 1.0f;
    float *acc = malloc(4 * count);
    int64_t bytes = rand() % 64;
    uint8_t *s = malloc(bytes ? bytes : 1);
    if (trial % 2) {  /* a valid stream, then truncated or bit-flipped */
      float *x = malloc(4 * count); for (int i = 0; i < count; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
      uint8_t *full = malloc(4096); uint32_t e; float rr[8]; for (int i = 0; i < 8; i++) rr[i] = 8.0f;
      int64_t t = nuq_elias_encode(x, count, B, rr, lv, k, 1, trial, 4000, full, &e);
      free(s); bytes = trial % 4 == 1 ? rand() % (t + 1) : t; s = malloc(bytes ? bytes : 1);
      memcpy(s, full, bytes); if (trial % 4 == 3 && bytes) s[rand() % bytes] ^= 1 << (rand() % 8);
      free(full); free(x);
    } else for (int i = 0; i < bytes; i++) s[i] = rand();
    uint32_t ends = (uint32_t)bytes;
    int bad = nuq_elias_decode(s, &ends, count, B, r, sv, k, 1.0f, acc, 1);
    bad ? badc++ : okc++;
    free(s); free(acc); free(r);
  }
  printf("decoded %d, refused %d\n", okc, badc); return 0;
}
