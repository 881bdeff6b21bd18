// The CPU kernel's compute code, compiled once per instruction set (see csgd_cpu_kernel.h): include it with
// CSGD_CPU_NS set to the copy's namespace and CSGD_CPU_FMA to 1 where the copy may use FMA instructions.
//
// A clustered tile visits its clusters in the tensor's visiting order (csgd_step_cpu.cpp: by each cluster's
// first member row, so singletons and first members go through memory in row order). Each cluster's member
// rows are read once to form the column sums of g and w (fixed member order: deterministic, the order of the
// CUDA device code), then every member is updated while its rows are still in cache, so the memory traffic
// per element is that of fused momentum SGD (read w, g, b; write w, b). How a cluster's rows are walked
// depends on where they lie (benchmarks/README.md has the measurements):
//   * members in consecutive rows, rows up to kAdjacentMaxCols: whole rows, two passes (cluster_rows_f32):
//     the cluster is one block of memory, read front to back;
//   * otherwise: all members in lockstep, 16 columns at a time (cluster_cols16), so that the rows of a
//     scattered cluster are fetched concurrently.
// Rows that the visiting order reaches out of row order (a cluster's members after its first, unless they follow
// the member before) are prefetched into L2 a few clusters ahead, one line per line of work (prefetch_late).
// The update of one element is csgd_math.h's (torch SGD's fused multiply-adds). fp16/bf16 are computed in
// fp32 and rounded once when stored; fp64 in fp64.
#include "csgd_cpu_kernel.h"
#include "csgd_math.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#if CSGD_CPU_FMA
#include <immintrin.h>
#endif

namespace csgd_ext {
namespace cpu {
namespace CSGD_CPU_NS {
namespace {

constexpr int64_t kVec = 16;  // columns of one cluster chunk held in registers

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
struct Coefs {
  math::Coefs<A> k;
  A sign;  // -1 when maximizing (negation is exact), else +1
};

template <bool WD, bool CP, bool MOM, bool FIRST, bool NEST>
constexpr math::Flags kFlags{WD, CP, MOM, FIRST, NEST};

// Update `len` elements of one row. CLUSTER: `mg` holds the cluster's mean of g (sign applied), `sw` its sum
// of w, `ninv` = -1/size. Otherwise (singleton cluster or unclustered tensor) the mean gradient is the row's
// own gradient and the centripetal term vanishes.
template <typename T, bool CLUSTER, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void update_row(T* __restrict w, const T* __restrict g, T* __restrict b, const acc_t<T>* __restrict mg,
                       const acc_t<T>* __restrict sw, acc_t<T> ninv, int64_t len, const Coefs<acc_t<T>>& c) {
  using A = acc_t<T>;
  const math::Coefs<A> k = c.k;
  const A sign = c.sign;
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) {
    const A d = CLUSTER ? mg[j] : sign * static_cast<A>(g[j]);
    const A bold = (MOM && !FIRST) ? static_cast<A>(b[j]) : A(0);
    A bj = A(0);
    const A wn = math::update<CLUSTER, A>(static_cast<A>(w[j]), d, CLUSTER ? sw[j] : A(0), ninv, bold, &bj,
                                          kFlags<WD, CP, MOM, FIRST, NEST>, k);
    if constexpr (MOM) b[j] = static_cast<T>(bj);
    w[j] = static_cast<T>(wn);
  }
}

// One cluster (members `mem[0..s)`) on columns [j, j + n): sums of g and w over the members in a fixed
// order (kept in registers: N = kVec is a compile-time width), then every member's update from the means.
// The members' chunks stay in L1 between the two loops, so memory traffic is that of fused SGD.
template <typename T, int64_t N, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void cluster_chunk(T* __restrict w, const T* __restrict g, T* __restrict b, const int64_t* __restrict mem,
                          int64_t s, int64_t cols, int64_t j, int64_t n_dyn, const Coefs<acc_t<T>>& c) {
  using A = acc_t<T>;
  constexpr int64_t kCap = N > 0 ? N : kVec;
  const int64_t n = N > 0 ? N : n_dyn;
  A sg[kCap], sw[kCap];
  for (int64_t k = 0; k < n; ++k) sg[k] = sw[k] = A(0);
  for (int64_t q = 0; q < s; ++q) {
    const int64_t o = mem[q] * cols + j;
    for (int64_t k = 0; k < n; ++k) {
      sg[k] += static_cast<A>(g[o + k]);
      sw[k] += static_cast<A>(w[o + k]);
    }
  }
  const A inv = A(1) / static_cast<A>(s), sinv = c.sign * inv;  // multiply: no divisions per chunk
  for (int64_t k = 0; k < n; ++k) sg[k] = sg[k] * sinv;
  for (int64_t q = 0; q < s; ++q) {
    const int64_t o = mem[q] * cols + j;
    update_row<T, true, MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, sg, sw, -inv, n, c);
  }
}

// fp32 vectors of kW lanes (GCC vector extensions): one AVX-512 register where the copy is compiled for it
// (a -march=native build on an AVX-512 CPU), else one AVX2 register (two SSE registers in the baseline copy).
#if defined(__AVX512F__)
constexpr int64_t kW = 16;
#else
constexpr int64_t kW = 8;
#endif
// One struct for every width (a struct, so that math::update finds fmadd below by argument-dependent lookup):
// FV, kW lanes, for the whole-row passes and the 16-column chunks of scattered members.
template <int N>
struct FVec {
  typedef float type __attribute__((vector_size(N * sizeof(float))));
  type v;
};
template <int N>
inline FVec<N> operator+(FVec<N> a, FVec<N> b) { return {a.v + b.v}; }
template <int N>
inline FVec<N> operator-(FVec<N> a, FVec<N> b) { return {a.v - b.v}; }
template <int N>
inline FVec<N> operator*(FVec<N> a, FVec<N> b) { return {a.v * b.v}; }
template <int N>
inline FVec<N> fmadd(FVec<N> a, FVec<N> b, FVec<N> c) {
#if CSGD_CPU_FMA && defined(__AVX512F__)
  if constexpr (N == 16)
    return {reinterpret_cast<decltype(a.v)>(
        _mm512_fmadd_ps(reinterpret_cast<__m512>(a.v), reinterpret_cast<__m512>(b.v), reinterpret_cast<__m512>(c.v)))};
#endif
#if CSGD_CPU_FMA
  if constexpr (N == 8)
    return {reinterpret_cast<decltype(a.v)>(
        _mm256_fmadd_ps(reinterpret_cast<__m256>(a.v), reinterpret_cast<__m256>(b.v), reinterpret_cast<__m256>(c.v)))};
#endif
  FVec<N> r;
  for (int k = 0; k < N; ++k) r.v[k] = __builtin_fmaf(a.v[k], b.v[k], c.v[k]);
  return r;
}
template <int N>
inline FVec<N> splatv(float x) { return {typename FVec<N>::type{} + x}; }
template <int N>
inline FVec<N> loadv(const float* p) {
  FVec<N> v;
  std::memcpy(&v.v, p, sizeof(v.v));
  return v;
}
template <int N>
inline void storev(float* p, FVec<N> v) { std::memcpy(p, &v.v, sizeof(v.v)); }

using FV = FVec<kW>;
inline FV splat(float x) { return splatv<kW>(x); }
inline FV loadv(const float* p) { return loadv<kW>(p); }

constexpr int64_t kBlk = 1024;  // columns of the row buffers of cluster_rows_f32 (4 KiB each: L1)

// One cluster (members mem[0..s), s >= 2) of an fp32 tensor on columns [j0, j1), in blocks of `blk` columns,
// each in two passes over whole member rows:
//   1. the sums of g and w over the members, in member order (0 + g_0 + g_1 + ...), into two row buffers
//      that stay in L1; the last member's pass also turns the g sum into the mean (times sign / size);
//   2. each member's update, one sequential sweep over its w and b (its g entered only through the mean).
// Every member row is walked from left to right, so at most 2 rows stream at once (g and w, then w and b),
// against 3 x s when the members were walked a few columns at a time. The arithmetic is cluster_chunk's:
// the same sums in the same order, the same update.
template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
__attribute__((noinline)) void cluster_rows_f32(float* __restrict w, const float* __restrict g, float* __restrict b,
                                                const int64_t* __restrict mem, int64_t s, int64_t cols, int64_t j0,
                                                int64_t j1, const Coefs<float>& c) {
  alignas(64) float sg[kBlk], sw[kBlk];
  constexpr int64_t blk = kBlk;
  const float inv = 1.0f / static_cast<float>(s), sinv = c.sign * inv;  // multiply: no vector divisions
  const math::Coefs<FV> k{splat(c.k.neg_lr), splat(c.k.wd), splat(c.k.mom), splat(c.k.damp1), splat(c.k.cp)};
  const FV vninv = splat(-inv), vsinv = splat(sinv), zero = splat(0.0f);
  for (int64_t jb = j0; jb < j1; jb += blk) {
    const int64_t n = std::min(blk, j1 - jb), nv = n / kW * kW;
    // pass 1: sums (the first member's plus 0, as the sums start at 0)
    {
      const int64_t o = mem[0] * cols + jb;
      for (int64_t j = 0; j < nv; j += kW) {
        if constexpr (MOM && !FIRST) __builtin_prefetch(b + o + j, 0, 2);
        storev(sg + j, zero + loadv(g + o + j));
        storev(sw + j, zero + loadv(w + o + j));
      }
      for (int64_t j = nv; j < n; ++j) {
        sg[j] = 0.0f + g[o + j];
        sw[j] = 0.0f + w[o + j];
      }
    }
    for (int64_t q = 1; q + 1 < s; ++q) {
      const int64_t o = mem[q] * cols + jb;
      for (int64_t j = 0; j < nv; j += kW) {
        if constexpr (MOM && !FIRST) __builtin_prefetch(b + o + j, 0, 2);
        storev(sg + j, loadv(sg + j) + loadv(g + o + j));
        storev(sw + j, loadv(sw + j) + loadv(w + o + j));
      }
      for (int64_t j = nv; j < n; ++j) {
        sg[j] += g[o + j];
        sw[j] += w[o + j];
      }
    }
    {  // the last member, and the mean
      const int64_t o = mem[s - 1] * cols + jb;
      for (int64_t j = 0; j < nv; j += kW) {
        if constexpr (MOM && !FIRST) __builtin_prefetch(b + o + j, 0, 2);
        storev(sg + j, (loadv(sg + j) + loadv(g + o + j)) * vsinv);
        storev(sw + j, loadv(sw + j) + loadv(w + o + j));
      }
      for (int64_t j = nv; j < n; ++j) {
        sg[j] = (sg[j] + g[o + j]) * sinv;
        sw[j] += w[o + j];
      }
    }
    // pass 2: each member's update
    for (int64_t q = 0; q < s; ++q) {
      const int64_t o = mem[q] * cols + jb;
      const int64_t on = (mem[s - 1] + 1 + q) * cols + jb;  // a row after the cluster's: most likely next
      float* wq = w + o;
      float* bq = MOM ? b + o : nullptr;
      for (int64_t j = 0; j < nv; j += kW) {
        __builtin_prefetch(g + on + j, 0, 2);
        __builtin_prefetch(w + on + j, 0, 2);
        FV bj{};
        const FV bold = (MOM && !FIRST) ? loadv(bq + j) : FV{};
        const FV wn = math::update<true, FV>(loadv(wq + j), loadv(sg + j), loadv(sw + j), vninv, bold, &bj,
                                             kFlags<WD, CP, MOM, FIRST, NEST>, k);
        if constexpr (MOM) storev(bq + j, bj);
        storev(wq + j, wn);
      }
      if (nv < n) {
        update_row<float, true, MOM, FIRST, NEST, WD, CP>(wq + nv, g + o + nv, MOM ? bq + nv : nullptr, sg + nv,
                                                          sw + nv, -inv, n - nv, c);
      }
    }
  }
}

// fp32 fast path of cluster_chunk for kVec = 16 columns on scattered members: the sums held in registers, as
// kNV vectors of kW lanes (one AVX-512 register per value where the copy is compiled for it, two AVX2
// registers otherwise); the auto-vectoriser leaves that member loop scalar. Same operations in the same order
// as the generic version.
static_assert(kVec % kW == 0, "a cluster chunk is whole vectors");
constexpr int kNV = static_cast<int>(kVec / kW);

template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void update_v(float* __restrict w, float* __restrict b, FV mg, FV sw, FV ninv, const math::Coefs<FV>& k) {
  FV bj{};
  const FV bold = (MOM && !FIRST) ? loadv(b) : FV{};
  const FV wn = math::update<true, FV>(loadv(w), mg, sw, ninv, bold, &bj, kFlags<WD, CP, MOM, FIRST, NEST>, k);
  if constexpr (MOM) storev(b, bj);
  storev(w, wn);
}

// Columns [j0, j1) of one cluster in chunks of 16; returns the first column not done (the tail < 16).
// Software prefetch:
// * each chunk prefetches, into L2, the same columns of `late` (nl row offsets): the member rows of a cluster a
//   few visits ahead that do not continue the row-order stream (csgd_step_cpu.cpp's late_rows). The hardware
//   prefetcher cannot see them coming, and a prefetch into L1 (prefetcht0) waits on L1's few miss slots: a
//   standalone update over 96 MB of shuffled 2 KB rows took 2.4x the in-order time, 2.2x with prefetcht0 and
//   1.4x with prefetcht1 (benchmarks/README.md);
// * rows of kPrefetchMin+ columns also prefetch each member's g, w and b kPrefetchAhead columns ahead: a
//   cluster reads 3 x s row streams at once, more than the hardware prefetcher keeps ahead of.
constexpr int64_t kPrefetchAhead = 64;  // columns (256 bytes of fp32)
constexpr int64_t kPrefetchMin = 256;
constexpr int64_t kAdjacentMaxCols = 1024;  // adjacent members on rows up to this long: whole-row passes
constexpr int64_t kLateAhead = 4;  // clusters between a late row's prefetch and its use
constexpr int kMaxLate = 8;        // late rows prefetched per visit

// One 64-byte line (16 fp32 columns from column j) of g, w and (B) b of each late row (offsets of row starts),
// into L2 (prefetcht1).
template <bool B>
inline void prefetch_late(const float* w, const float* g, const float* b, const int64_t* __restrict late, int64_t nl,
                          int64_t j) {
  for (int64_t q = 0; q < nl; ++q) {
    __builtin_prefetch(g + late[q] + j, 0, 2);
    __builtin_prefetch(w + late[q] + j, 0, 2);
    if constexpr (B) __builtin_prefetch(b + late[q] + j, 0, 2);
  }
}

// A singleton cluster's row (or any row with its own gradient) on columns [0, len), prefetching `late` on the
// same columns as it goes (prefetch_late); the arithmetic is update_row's.
template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void single_row_f32(float* __restrict w, const float* __restrict g, float* __restrict b, int64_t len,
                           const Coefs<float>& c, const float* w0, const float* g0, const float* b0,
                           const int64_t* __restrict late, int64_t nl, int64_t j0) {
  int64_t j = 0;
  if (nl > 0) {
    for (; j + kVec <= len; j += kVec) {
      prefetch_late<MOM && !FIRST>(w0, g0, b0, late, nl, j0 + j);
      update_row<float, false, MOM, FIRST, NEST, WD, CP>(w + j, g + j, MOM ? b + j : nullptr, nullptr, nullptr,
                                                         0.0f, kVec, c);
    }
  }
  update_row<float, false, MOM, FIRST, NEST, WD, CP>(w + j, g + j, MOM ? b + j : nullptr, nullptr, nullptr, 0.0f,
                                                     len - j, c);
}

template <int S, bool PF, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline int64_t cluster_cols16_impl(float* __restrict w, const float* __restrict g, float* __restrict b,
                                   const int64_t* __restrict mem, int64_t s_dyn, int64_t cols, int64_t j0, int64_t j1,
                                   const Coefs<float>& c, const int64_t* __restrict late, int64_t nl) {
  const int64_t s = S > 0 ? S : s_dyn;  // S > 0: the member loops are unrolled
  const float inv = 1.0f / static_cast<float>(s), sinv = c.sign * inv;  // multiply: no vector divisions
  // splat here, in registers (read through a reference, they would be reloaded after every store)
  const math::Coefs<FV> k{splat(c.k.neg_lr), splat(c.k.wd), splat(c.k.mom), splat(c.k.damp1), splat(c.k.cp)};
  const FV vninv = splat(-inv), vsinv = splat(sinv);
  int64_t j = j0;
  for (; j + kVec <= j1; j += kVec) {
    FV sg[kNV], sw[kNV];
    for (int v = 0; v < kNV; ++v) sg[v] = sw[v] = FV{};
    prefetch_late<MOM && !FIRST>(w, g, b, late, nl, j);
    for (int64_t q = 0; q < s; ++q) {
      const int64_t o = mem[q] * cols + j;
      if constexpr (PF) {  // may run past the row: prefetches never fault
        __builtin_prefetch(g + o + kPrefetchAhead);
        __builtin_prefetch(w + o + kPrefetchAhead);
        if constexpr (MOM && !FIRST) __builtin_prefetch(b + o + kPrefetchAhead);
      }
      for (int v = 0; v < kNV; ++v) {
        sg[v] = sg[v] + loadv(g + o + v * kW);
        sw[v] = sw[v] + loadv(w + o + v * kW);
      }
    }
    for (int v = 0; v < kNV; ++v) sg[v] = sg[v] * vsinv;
    if constexpr (S > 0) {
      // every load of the chunk before its first store: member rows lie a multiple of 4 KiB apart whenever
      // cols * 4 bytes is (cols = 1024, 2048, ...), and a load after a store to an address equal modulo 4 KiB
      // waits on a false store-forwarding match ("4K aliasing"): loads first took a 64 x 2048 tensor of
      // adjacent pairs, in cache, from 48 to 36 us per step (flat SGD on it: 27 us)
      FV wv[S][kNV], bv[S][kNV];
      for (int q = 0; q < S; ++q) {
        const int64_t o = mem[q] * cols + j;
        for (int v = 0; v < kNV; ++v) {
          wv[q][v] = loadv(w + o + v * kW);
          bv[q][v] = (MOM && !FIRST) ? loadv(b + o + v * kW) : FV{};
        }
      }
      for (int q = 0; q < S; ++q) {
        const int64_t o = mem[q] * cols + j;
        for (int v = 0; v < kNV; ++v) {
          FV bj{};
          const FV wn = math::update<true, FV>(wv[q][v], sg[v], sw[v], vninv, bv[q][v], &bj,
                                               kFlags<WD, CP, MOM, FIRST, NEST>, k);
          if constexpr (MOM) storev(b + o + v * kW, bj);
          storev(w + o + v * kW, wn);
        }
      }
    } else {
      for (int64_t q = 0; q < s; ++q) {
        const int64_t o = mem[q] * cols + j;
        for (int v = 0; v < kNV; ++v) {
          update_v<MOM, FIRST, NEST, WD, CP>(w + o + v * kW, MOM ? b + o + v * kW : nullptr, sg[v], sw[v], vninv, k);
        }
      }
    }
  }
  return j;
}

template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
__attribute__((noinline)) int64_t cluster_cols16(float* __restrict w, const float* __restrict g, float* __restrict b,
                                                 const int64_t* __restrict mem, int64_t s, int64_t cols, int64_t j0,
                                                 int64_t j1, const Coefs<float>& c, const int64_t* late, int64_t nl) {
  const bool pf = j1 - j0 >= kPrefetchMin;
  // the common cluster sizes get unrolled member loops (a dynamic trip count costs ~1.5x in cache)
#define CSGD_COLS16(S, PF) cluster_cols16_impl<S, PF, MOM, FIRST, NEST, WD, CP>(w, g, b, mem, s, cols, j0, j1, c, late, nl)
  if (pf) {
    switch (s) {
      case 2: return CSGD_COLS16(2, true);
      case 3: return CSGD_COLS16(3, true);
      case 4: return CSGD_COLS16(4, true);
      default: return CSGD_COLS16(0, true);
    }
  }
  switch (s) {
    case 2: return CSGD_COLS16(2, false);
    case 3: return CSGD_COLS16(3, false);
    case 4: return CSGD_COLS16(4, false);
    default: return CSGD_COLS16(0, false);
  }
#undef CSGD_COLS16
}

// The member range [m0, m1) of cluster `cl` (layouts are validated before the step starts).
inline std::pair<int64_t, int64_t> members_of(const int64_t* __restrict off, int64_t cl) { return {off[cl], off[cl + 1]}; }

// The late rows of the cluster at visiting position `pos`, as row offsets (row * cols) into `out` (at most
// kMaxLate): its members that do not continue the row-order stream, i.e. neither its first (lowest) row, which
// the visiting order reaches in row order, nor a row right after the member before it (an adjacent run).
inline int64_t late_rows(const int64_t* __restrict off, const int64_t* __restrict perm, const int64_t* ord,
                         int64_t pos, int64_t cols, int64_t* out) {
  const auto [m0, m1] = members_of(off, ord ? ord[pos] : pos);
  if (m1 - m0 < 2) return 0;
  int64_t lo = perm[m0];
  for (int64_t q = m0 + 1; q < m1; ++q) lo = std::min(lo, perm[q]);
  int64_t n = 0;
  for (int64_t q = m0; q < m1 && n < kMaxLate; ++q) {
    const int64_t r = perm[q];
    if (r != lo && !(q > m0 && r == perm[q - 1] + 1)) out[n++] = r * cols;
  }
  return n;
}

// Clusters [c0, c1) of a tensor with one element per row (norm weights and biases): a scalar loop, without
// the per-cluster set-up of the column-chunk path (same operations in the same order).
template <typename T, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
void scalar_clusters(T* __restrict w, const T* __restrict g, T* __restrict b, const int64_t* __restrict off,
                     const int64_t* __restrict perm, int64_t c0, int64_t c1, const Coefs<acc_t<T>>& c) {
  using A = acc_t<T>;
  for (int64_t cl = c0; cl < c1; ++cl) {
    const auto [m0, m1] = members_of(off, cl);
    if (m1 - m0 == 1) {
      const int64_t r = perm[m0];
      update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + r, g + r, MOM ? b + r : nullptr, nullptr, nullptr, A(0), 1,
                                                     c);
      continue;
    }
    A sg = A(0), sw = A(0);
    for (int64_t q = m0; q < m1; ++q) {
      sg += static_cast<A>(g[perm[q]]);
      sw += static_cast<A>(w[perm[q]]);
    }
    const A inv = A(1) / static_cast<A>(m1 - m0), sinv = c.sign * inv;
    const A mg = sg * sinv;
    for (int64_t q = m0; q < m1; ++q) {
      const int64_t r = perm[q];
      update_row<T, true, MOM, FIRST, NEST, WD, CP>(w + r, g + r, MOM ? b + r : nullptr, &mg, &sw, -inv, 1, c);
    }
  }
}

// One tile of a job, for a dtype and a set of flags.
template <typename T, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
void run_tile(const Job& job, const Tile& tl) {
  using A = acc_t<T>;
  const Coefs<A> c{math::coefs<A>(job.lr, job.weight_decay, job.momentum, job.dampening, job.centripetal),
                   static_cast<A>(job.maximize ? -1.0 : 1.0)};
  const Tensor& ts = job.tensors[tl.t];
  T* w = static_cast<T*>(ts.w);
  const T* g = static_cast<const T*>(ts.g);
  T* b = static_cast<T*>(ts.b);
  if (!tl.clustered) {
    update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + tl.a0, g + tl.a0, MOM ? b + tl.a0 : nullptr, nullptr,
                                                   nullptr, A(0), tl.a1 - tl.a0, c);
    return;
  }
  const int64_t cols = ts.cols;
  const int64_t* off = ts.lay;
  const int64_t* perm = off + ts.clusters + 1;
  const int64_t len = tl.j1 - tl.j0;
  if (cols == 1) {
    scalar_clusters<T, MOM, FIRST, NEST, WD, CP>(w, g, b, off, perm, tl.a0, tl.a1, c);
    return;
  }
  // clusters visited in the tensor's visiting order (ts.order: position -> cluster; nullptr: layout order)
  const int64_t* ord = ts.order;
  for (int64_t i = tl.a0; i < tl.a1; ++i) {
    const int64_t cl = ord ? ord[i] : i;
    const auto [m0, m1] = members_of(off, cl);
    if constexpr (std::is_same_v<T, float>) {
      // the late rows of the cluster kLateAhead visits ahead (past the tile too: tiles run in order)
      int64_t late[kMaxLate];
      const int64_t nl = i + kLateAhead < ts.clusters ? late_rows(off, perm, ord, i + kLateAhead, cols, late) : 0;
      if (m1 - m0 == 1) {
        const int64_t o = perm[m0] * cols + tl.j0;
        single_row_f32<MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, len, c, w, g, b, late, nl,
                                                 tl.j0);
        continue;
      }
      bool adjacent = len <= kAdjacentMaxCols;  // members in consecutive rows: one block of memory
      for (int64_t q = m0 + 1; adjacent && q < m1; ++q) adjacent = perm[q] == perm[q - 1] + 1;
      if (adjacent) {
        cluster_rows_f32<MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, tl.j0, tl.j1, c);
        continue;
      }
      int64_t j = cluster_cols16<MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, tl.j0, tl.j1, c,
                                                           late, nl);
      if (j < tl.j1) {
        cluster_chunk<T, 0, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, tl.j1 - j, c);
      }
    } else {
      if (m1 - m0 == 1) {
        const int64_t o = perm[m0] * cols + tl.j0;
        update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, nullptr, nullptr, A(0),
                                                       len, c);
        continue;
      }
      int64_t j = tl.j0;
      for (; j + kVec <= tl.j1; j += kVec) {
        cluster_chunk<T, kVec, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, kVec, c);
      }
      if (j < tl.j1) {
        cluster_chunk<T, 0, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, tl.j1 - j, c);
      }
    }
  }
}

// The flags as template arguments (5 momentum modes x weight decay x centripetal).
template <typename T, bool WD, bool CP>
TileFn pick_momentum(const Job& job) {
  if (job.momentum == 0.0) return &run_tile<T, false, false, false, WD, CP>;
  if (job.first) return job.nesterov ? &run_tile<T, true, true, true, WD, CP> : &run_tile<T, true, true, false, WD, CP>;
  return job.nesterov ? &run_tile<T, true, false, true, WD, CP> : &run_tile<T, true, false, false, WD, CP>;
}

template <typename T>
TileFn pick_flags(const Job& job) {
  const bool wd = job.weight_decay != 0.0, cp = job.centripetal != 0.0;
  if (wd && cp) return pick_momentum<T, true, true>(job);
  if (wd) return pick_momentum<T, true, false>(job);
  if (cp) return pick_momentum<T, false, true>(job);
  return pick_momentum<T, false, false>(job);
}

}  // namespace

TileFn pick(const Job& job) {
  switch (job.dtype) {
    case Dtype::f32: return pick_flags<float>(job);
    case Dtype::f64: return pick_flags<double>(job);
    case Dtype::f16: return pick_flags<c10::Half>(job);
    default: return pick_flags<c10::BFloat16>(job);
  }
}

}  // namespace CSGD_CPU_NS
}  // namespace cpu
}  // namespace csgd_ext
