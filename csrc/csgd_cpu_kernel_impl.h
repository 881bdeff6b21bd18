// The CPU kernel's compute code, compiled once per instruction set (see csgd_cpu_kernel.h): include it with
// CSGD_CPU_NS set to the copy's namespace and CSGD_CPU_FMA to 1 where the copy may use FMA instructions.
//
// A clustered tile visits its clusters in the tensor's visiting order (csgd_cpu_tiles.h: by each cluster's first
// member row, so singletons and first members go through memory in row order). Each cluster is walked 16 columns
// at a time across all its members (cluster_cols16): the column sums of g and w over the members, in a fixed member
// order (deterministic, the order of the CUDA device code), then every member's update while its chunk is still
// in registers, so the memory traffic per element is that of fused momentum SGD (read w, g, b; write w, b). While
// it works, every member row of the next visited cluster is prefetched into L2, one line per line of work
// (prefetch_ahead): the hardware prefetcher does not follow 3 x (members) row streams that jump around the tensor
// (benchmarks/README.md has the measurements).
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
// FV, kW lanes, for the 16-column cluster chunks.
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

// fp32 fast path of cluster_chunk for kVec = 16 columns: the sums held in registers, as kNV vectors of kW lanes
// (one AVX-512 register per value where the copy is compiled for it, two AVX2 registers otherwise); the
// auto-vectoriser leaves that member loop scalar. Same operations in the same order as the generic version.
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
// * each chunk prefetches, into L2 (prefetcht1), the same columns of `ahead` (na row offsets): the member rows of
//   the next visited cluster. A prefetch into L1 (prefetcht0, __builtin_prefetch's default) waits on L1's few
//   miss slots: on the development VM, shuffled 2 KB rows took 2.3x the in-order time, 2.0x with prefetcht0 and
//   1.3x to 1.45x with prefetcht1 (benchmarks/step/prefetch_probe.py); on ResNet-50's shapes, prefetching all
//   rows of the next cluster beat prefetching only out-of-order rows, and rows further ahead (kernel_ab.py);
// * nothing else: prefetching each member's own rows 64 columns ahead into L1 as well made no difference.
constexpr int kMaxAhead = 8;  // rows of the next cluster prefetched (its first 8 members)

// One 64-byte line (16 fp32 columns from column j) of g, w and (B) b of each row in `ahead` (offsets of row
// starts), into L2 (prefetcht1).
template <bool B>
inline void prefetch_ahead(const float* w, const float* g, const float* b, const int64_t* __restrict ahead,
                           int64_t na, int64_t j) {
  for (int64_t q = 0; q < na; ++q) {
    __builtin_prefetch(g + ahead[q] + j, 0, 2);
    __builtin_prefetch(w + ahead[q] + j, 0, 2);
    if constexpr (B) __builtin_prefetch(b + ahead[q] + j, 0, 2);
  }
}

// A singleton cluster's row on columns [0, len) (its own gradient), prefetching `ahead` on the same columns as it
// goes (prefetch_ahead; w0, g0, b0 are the tensor's, j0 the row's first column); the arithmetic is update_row's.
template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void single_row_f32(float* __restrict w, const float* __restrict g, float* __restrict b, int64_t len,
                           const Coefs<float>& c, const float* w0, const float* g0, const float* b0,
                           const int64_t* __restrict ahead, int64_t na, int64_t j0) {
  int64_t j = 0;
  if (na > 0) {
    for (; j + kVec <= len; j += kVec) {
      prefetch_ahead<MOM && !FIRST>(w0, g0, b0, ahead, na, j0 + j);
      update_row<float, false, MOM, FIRST, NEST, WD, CP>(w + j, g + j, MOM ? b + j : nullptr, nullptr, nullptr,
                                                         0.0f, kVec, c);
    }
  }
  update_row<float, false, MOM, FIRST, NEST, WD, CP>(w + j, g + j, MOM ? b + j : nullptr, nullptr, nullptr, 0.0f,
                                                     len - j, c);
}

template <int S, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline int64_t cluster_cols16_impl(float* __restrict w, const float* __restrict g, float* __restrict b,
                                   const int64_t* __restrict mem, int64_t s_dyn, int64_t cols, int64_t j0, int64_t j1,
                                   const Coefs<float>& c, const int64_t* __restrict ahead, int64_t na) {
  const int64_t s = S > 0 ? S : s_dyn;  // S > 0: the member loops are unrolled
  const float inv = 1.0f / static_cast<float>(s), sinv = c.sign * inv;  // multiply: no vector divisions
  // splat here, in registers (read through a reference, they would be reloaded after every store)
  const math::Coefs<FV> k{splat(c.k.neg_lr), splat(c.k.wd), splat(c.k.mom), splat(c.k.damp1), splat(c.k.cp)};
  const FV vninv = splat(-inv), vsinv = splat(sinv);
  int64_t j = j0;
  for (; j + kVec <= j1; j += kVec) {
    FV sg[kNV], sw[kNV];
    for (int v = 0; v < kNV; ++v) sg[v] = sw[v] = FV{};
    prefetch_ahead<MOM && !FIRST>(w, g, b, ahead, na, j);
    for (int64_t q = 0; q < s; ++q) {
      const int64_t o = mem[q] * cols + j;
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

// Inlined into run_tile (it was noinline: kernel_ab.py --base HEAD --processes 5, inlined / noinline 0.987x,
// 0.984x and 0.982x at 5/8 scattered, 1/2 scattered and 5/8 adjacent, every process below 1).
template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline int64_t cluster_cols16(float* __restrict w, const float* __restrict g, float* __restrict b,
                              const int64_t* __restrict mem, int64_t s, int64_t cols, int64_t j0, int64_t j1,
                              const Coefs<float>& c, const int64_t* ahead, int64_t na) {
  // the common cluster sizes get unrolled member loops (a dynamic trip count costs ~1.5x in cache)
#define CSGD_COLS16(S) cluster_cols16_impl<S, MOM, FIRST, NEST, WD, CP>(w, g, b, mem, s, cols, j0, j1, c, ahead, na)
  switch (s) {
    case 2: return CSGD_COLS16(2);
    case 3: return CSGD_COLS16(3);
    case 4: return CSGD_COLS16(4);
    default: return CSGD_COLS16(0);
  }
#undef CSGD_COLS16
}

// The member range [m0, m1) of cluster `cl` (layouts are validated before the step starts).
inline std::pair<int64_t, int64_t> members_of(const int64_t* __restrict off, int64_t cl) { return {off[cl], off[cl + 1]}; }

// The member rows of the cluster at visiting position `pos` (its first kMaxAhead), as row offsets (row * cols)
// into `out`; returns how many.
inline int64_t rows_at(const int64_t* __restrict off, const int64_t* __restrict perm, const int64_t* ord, int64_t pos,
                       int64_t cols, int64_t* out) {
  const auto [m0, m1] = members_of(off, ord ? ord[pos] : pos);
  const int64_t n = std::min<int64_t>(m1 - m0, kMaxAhead);
  for (int64_t q = 0; q < n; ++q) out[q] = perm[m0 + q] * cols;
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
    constexpr bool kF32 = std::is_same_v<T, float>;
    // fp32: the rows of the next visited cluster, prefetched as this one is walked (past the tile too: tiles
    // run in order)
    [[maybe_unused]] int64_t ahead[kMaxAhead];
    int64_t na = 0;
    if constexpr (kF32) na = i + 1 < ts.clusters ? rows_at(off, perm, ord, i + 1, cols, ahead) : 0;
    if (m1 - m0 == 1) {
      const int64_t o = perm[m0] * cols + tl.j0;
      if constexpr (kF32) {
        single_row_f32<MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, len, c, w, g, b, ahead, na,
                                                 tl.j0);
      } else {
        update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, nullptr, nullptr, A(0),
                                                       len, c);
      }
      continue;
    }
    int64_t j = tl.j0;
    if constexpr (kF32) {
      j = cluster_cols16<MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, tl.j0, tl.j1, c, ahead, na);
    } else {
      for (; j + kVec <= tl.j1; j += kVec) {
        cluster_chunk<T, kVec, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, kVec, c);
      }
    }
    if (j < tl.j1) {
      cluster_chunk<T, 0, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, tl.j1 - j, c);
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
