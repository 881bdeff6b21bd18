/* What this machine charges for rows read out of order, and what software prefetch buys back: a standalone
 * momentum-SGD update (read w, g, b; write w, b: fused SGD's traffic) over three arrays of MB megabytes each, in
 * rows of COLS floats, visited in row order or in a shuffled order, without prefetch or prefetching the row
 * D visits ahead, one 64-byte line per line of work, into L1 (prefetcht0) or into L2 (prefetcht1); and the cluster
 * walk's pattern on adjacent pairs of rows: both rows of a pair in lockstep, 16 columns of one, then of the other
 * (the update only, no cluster sums), without prefetch or prefetching the next pair into L2. No torch and none of
 * csgd_ext's code: the memory system alone. Built and run by prefetch_probe.py.
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

static inline void pf(const float* w, const float* g, const float* b, long o, int hint) {
  if (hint == 1) {
    _mm_prefetch((const char*)(g + o), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + o), _MM_HINT_T0);
    _mm_prefetch((const char*)(b + o), _MM_HINT_T0);
  } else if (hint == 2) {
    _mm_prefetch((const char*)(g + o), _MM_HINT_T1);
    _mm_prefetch((const char*)(w + o), _MM_HINT_T1);
    _mm_prefetch((const char*)(b + o), _MM_HINT_T1);
  }
}

/* hint: 0 none, 1 prefetcht0, 2 prefetcht1; d: rows ahead; group: rows walked together (1, or 2 in lockstep) */
static void walk(float* w, const float* g, float* b, const long* ord, long rows, long cols, int hint, long d,
                 int group) {
  v16 lr, mom, wd;
  for (int k = 0; k < 16; ++k) { lr[k] = -1e-3f; mom[k] = 0.9f; wd[k] = 1e-4f; }
  for (long i = 0; i + group <= rows; i += group) {
    for (long j = 0; j < cols; j += 16) {
      for (int m = 0; m < group; ++m) {
        if (hint && i + d + m < rows) pf(w, g, b, ord[i + d + m] * cols + j, hint);
      }
      for (int m = 0; m < group; ++m) {
        const long o = ord[i + m] * cols + j;
        v16 wv = ld(w + o), dv = ld(g + o) + wv * wd, bv = ld(b + o) * mom + dv;
        dv = dv + bv * mom;
        st(b + o, bv);
        st(w + o, wv + dv * lr);
      }
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
  struct { const char* name; const long* ord; int hint; long d; int group; } ways[] = {
      {"in order", seq, 0, 0, 1},          {"shuffled", shuf, 0, 0, 1},
      {"shuffled, prefetcht0 1 row ahead", shuf, 1, 1, 1}, {"shuffled, prefetcht0 4 rows ahead", shuf, 1, 4, 1},
      {"shuffled, prefetcht1 1 row ahead", shuf, 2, 1, 1}, {"shuffled, prefetcht1 4 rows ahead", shuf, 2, 4, 1},
      {"adjacent pairs in lockstep", seq, 0, 0, 2}, {"adjacent pairs in lockstep, prefetcht1 next pair", seq, 2, 2, 2}};
  enum { K = sizeof(ways) / sizeof(ways[0]) };
  double* t = malloc(sizeof(double) * K * rounds);
  for (int k = 0; k < K; ++k) walk(w, g, b, ways[k].ord, rows, cols, ways[k].hint, ways[k].d, ways[k].group);  /* warm-up */
  for (long r = 0; r < rounds; ++r) {
    for (int q = 0; q < K; ++q) {
      const int k = (int)((r + q) % K);
      const double t0 = now();
      walk(w, g, b, ways[k].ord, rows, cols, ways[k].hint, ways[k].d, ways[k].group);
      t[k * rounds + r] = (now() - t0) / n * 1e9;
    }
  }
  for (int k = 0; k < K; ++k) {
    qsort(t + k * rounds, rounds, sizeof(double), cmp);
    printf("%s\t%.4f\n", ways[k].name, t[k * rounds + rounds / 2]);
  }
  return 0;
}
