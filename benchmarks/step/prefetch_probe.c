/* What this machine charges for rows read out of order, and what software prefetch buys back: a standalone
 * momentum-SGD update (read w, g, b; write w, b: fused SGD's traffic) over three arrays of MB megabytes each, in
 * rows of COLS floats, visited in row order or in a shuffled order, without prefetch or prefetching the row
 * D visits ahead, one 64-byte line per line of work, into L1 (prefetcht0) or into L2 (prefetcht1). No torch and
 * none of csgd_ext's code: the memory system alone. Built and run by prefetch_probe.py.
 *
 *   prefetch_probe COLS MB ROUNDS
 *
 * Prints one line per way of walking: its name and the median ns per element over ROUNDS interleaved rounds. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float* p) { v16 v; memcpy(&v, p, 64); return v; }
static inline void st(float* p, v16 v) { memcpy(p, &v, 64); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* hint: 0 none, 1 prefetcht0, 2 prefetcht1 */
static void walk(float* w, const float* g, float* b, const long* ord, long rows, long cols, int hint, long d) {
  v16 lr, mom, wd;
  for (int k = 0; k < 16; ++k) { lr[k] = -1e-3f; mom[k] = 0.9f; wd[k] = 1e-4f; }
  for (long i = 0; i < rows; ++i) {
    const long o = ord[i] * cols, on = i + d < rows ? ord[i + d] * cols : -1;
    for (long j = 0; j < cols; j += 16) {
      if (hint == 1 && on >= 0) {
        _mm_prefetch((const char*)(g + on + j), _MM_HINT_T0);
        _mm_prefetch((const char*)(w + on + j), _MM_HINT_T0);
        _mm_prefetch((const char*)(b + on + j), _MM_HINT_T0);
      } else if (hint == 2 && on >= 0) {
        _mm_prefetch((const char*)(g + on + j), _MM_HINT_T1);
        _mm_prefetch((const char*)(w + on + j), _MM_HINT_T1);
        _mm_prefetch((const char*)(b + on + j), _MM_HINT_T1);
      }
      v16 wv = ld(w + o + j), dv = ld(g + o + j) + wv * wd, bv = ld(b + o + j) * mom + dv;
      dv = dv + bv * mom;
      st(b + o + j, bv);
      st(w + o + j, wv + dv * lr);
    }
  }
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  if (argc < 4) { fprintf(stderr, "usage: prefetch_probe COLS MB ROUNDS\n"); return 2; }
  const long cols = atol(argv[1]) / 16 * 16, bytes = atol(argv[2]) << 20, rounds = atol(argv[3]);
  if (cols < 16 || bytes < cols * 4 || rounds < 1) { fprintf(stderr, "prefetch_probe: bad arguments\n"); return 2; }
  const long rows = bytes / 4 / cols, n = rows * cols;
  float *w = aligned_alloc(4096, bytes), *g = aligned_alloc(4096, bytes), *b = aligned_alloc(4096, bytes);
  long *seq = malloc(rows * sizeof(long)), *shuf = malloc(rows * sizeof(long));
  for (long i = 0; i < n; ++i) { w[i] = 1.0f; g[i] = 0.01f; b[i] = 0.0f; }
  for (long i = 0; i < rows; ++i) seq[i] = shuf[i] = i;
  srand(1);
  for (long i = rows - 1; i > 0; --i) { long j = rand() % (i + 1), t = shuf[i]; shuf[i] = shuf[j]; shuf[j] = t; }
  struct { const char* name; const long* ord; int hint; long d; } ways[] = {
      {"in order", seq, 0, 0},          {"shuffled", shuf, 0, 0},
      {"shuffled, prefetcht0 1 row ahead", shuf, 1, 1}, {"shuffled, prefetcht0 4 rows ahead", shuf, 1, 4},
      {"shuffled, prefetcht1 1 row ahead", shuf, 2, 1}, {"shuffled, prefetcht1 4 rows ahead", shuf, 2, 4}};
  enum { K = sizeof(ways) / sizeof(ways[0]) };
  double* t = malloc(sizeof(double) * K * rounds);
  for (int k = 0; k < K; ++k) walk(w, g, b, ways[k].ord, rows, cols, ways[k].hint, ways[k].d);  /* warm-up */
  for (long r = 0; r < rounds; ++r) {
    for (int q = 0; q < K; ++q) {
      const int k = (int)((r + q) % K);
      const double t0 = now();
      walk(w, g, b, ways[k].ord, rows, cols, ways[k].hint, ways[k].d);
      t[k * rounds + r] = (now() - t0) / n * 1e9;
    }
  }
  for (int k = 0; k < K; ++k) {
    qsort(t + k * rounds, rounds, sizeof(double), cmp);
    printf("%s\t%.4f\n", ways[k].name, t[k * rounds + rounds / 2]);
  }
  return 0;
}
