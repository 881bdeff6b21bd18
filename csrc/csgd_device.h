// The per-thread code of the CUDA C-SGD kernel, written once for two compilers:
//
// * nvcc builds it into the device kernel (csgd_step_cuda.cu);
// * the host C++ compiler builds the very same functions into the "cuda_emulated" backend
//   (csgd_step_emulated.cpp), which walks every block and every thread of the real work table in order on
//   CPU tensors, so CI checks what the kernel computes, not only that it compiles.
//
// Only a small shim differs between the two: the qualifiers (CSGD_HD), and the 16-byte vector loads and
// stores (the host versions check the alignment the GPU would fault on, and report every store to an
// optional write counter used by the tests).
//
// Work items (built on the host by csgd_worktable.cpp, one table per set of layouts):
// * kElem:  a flat element range of one tensor (unclustered tensors, all-singleton layouts, long runs of
//           singleton rows): 16-byte vectors, kIlp<T> vectors in flight per thread, scalar head and tail.
// * kSmall: clusters of at most kMaxSmall rows (singletons included) on a range of column vectors. A thread
//           owns one (cluster, column vector): it reads each member's g and w once (the w of the first kKeep
//           members stays in registers; later members read theirs again, from cache), forms the means, then
//           reads b and writes w and b of every member. Several clusters share a block
//           when rows are short (one-column tensors: one cluster per thread).
// * kPacked: several small unclustered tensors (norm vectors, biases) as one run of elements: the block's
//           threads stride over their concatenation, so a 64-element vector does not hold a block alone.
// * kLarge: one cluster of more than kMaxSmall rows on up to kThreads column vectors. Members are split
//           across the block's threads; partial sums go through shared memory and are reduced in a fixed
//           order after a barrier (phase 0 | barrier | phase 1), so there is no serial walk over a big cluster.
//
// Arithmetic is IEEE and deterministic: no atomics, fixed summation orders, means by multiplying with the
// reciprocal of the size, and the update of one element is csgd_math.h's, shared with the CPU kernel
// (csgd_cpu_kernel.h): explicit fused multiply-adds exactly where torch's SGD fuses, no reliance on
// contraction flags. So the two agree bitwise wherever the summation order is the same (every cluster of up
// to kMaxSmall rows), and unclustered tensors get torch SGD's bits. fp16/bf16 are computed in fp32 and
// rounded once; fp64 in fp64.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "csgd_math.h"

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define CSGD_HD __host__ __device__ __forceinline__
#else
#define CSGD_HD inline
#include <cstring>
#include <stdexcept>
#include <string>
#endif

#if defined(__CUDA_ARCH__)
#define CSGD_UNROLL _Pragma("unroll")
#else
#define CSGD_UNROLL
#endif

namespace csgd_ext {
namespace dev {

constexpr int kThreads = 256;   // threads per block
constexpr int kMaxSmall = 8;    // largest cluster one thread updates alone (larger: split across threads)
// Register budget (the kernel is built for kMinBlocks blocks per SM, 128 registers a thread, and ptxas must
// not spill; the CUDA compile test checks its report):
// members whose w a thread keeps in registers between its two passes (the others re-read theirs, from L1)
constexpr int kKeep = 2;
// vectors of each of w, g, b in flight per thread in the elementwise path (fp16/bf16 vectors widen to 16
// registers each)
template <typename T>
constexpr int kIlp = sizeof(T) == 2 ? 1 : 2;
constexpr int kMinBlocks = 2;   // resident blocks per SM the kernel is compiled for (<= 128 registers a thread)
constexpr int kVecBytes = 16;

// Kernel parameters: one slot per tensor of a launch. CUDA 12.1+ accepts 32 KB of kernel parameters on
// Volta and later; older toolkits get 4 KB and so fewer tensors per launch.
#if !defined(__CUDACC__) || (defined(CUDART_VERSION) && CUDART_VERSION >= 12010)
constexpr int kMaxSlots = 1000;
#else
constexpr int kMaxSlots = 112;
#endif

enum ItemKind : int32_t { kElem = 0, kSmall = 1, kLarge = 2, kPacked = 3 };

// One work item (a block's unit of work; 32 bytes).
struct Item {
  int32_t kind;
  int32_t slot;   // tensor slot of the launch (kPacked: the first of v1 consecutive slots)
  int64_t a0;     // kElem: first element; kSmall/kLarge: first cluster (index into the cluster table);
                  // kPacked: where the tensors' element counts start in the member table
  int64_t a1;     // kElem: end element;   kSmall/kLarge: end cluster; kPacked: total elements
  int32_t v0;     // kSmall/kLarge: column-vector range [v0, v1) (a column vector = kVecBytes of one row)
  int32_t v1;     // kPacked: number of tensors
};
static_assert(sizeof(Item) == 32, "Item is 32 bytes");

// A cluster: members mem[m0 .. m0 + size) of the launch's member table (row indices of its tensor).
struct Cluster {
  int32_t m0;
  int32_t size;
};

struct Slot {
  void* w;
  const void* g;
  void* b;        // momentum buffer (nullptr without momentum)
  int64_t cols;   // elements per row
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr int kVec = kVecBytes / static_cast<int>(sizeof(T));  // 4 fp32, 8 fp16/bf16, 2 fp64

// Hyperparameters in the compute type, and the flags of the rule (csgd_math.h).
template <typename A>
struct Coef {
  math::Coefs<A> k;
  math::Flags f;
  A sign;  // -1 when maximizing (negation is exact)
};

template <typename T>
struct Launch {
  const Item* items;
  const Cluster* clusters;
  const int32_t* members;
  int64_t n_items;
  Coef<acc_t<T>> c;
  Slot slots[kMaxSlots];
};

// Shared memory of one block: partial sums of g and w of a kLarge item (kThreads x kVec accumulators each).
template <typename T>
struct Smem {
  acc_t<T> g[kThreads * kVec<T>];
  acc_t<T> w[kThreads * kVec<T>];
};

// ---------------------------------------------------------------------------------------------------------
// Shim: W elements of T (W = kVec<T>: one aligned 16-byte access; W = 1: a scalar).

template <typename T, int W>
struct alignas(W * sizeof(T)) Pack {
  T v[W];
};

#if !defined(__CUDA_ARCH__)
// Host emulation: a store observer for the tests (counts every element written), and the alignment check
// the GPU would enforce with a misaligned-address fault.
using StoreHook = void (*)(const void* p, int bytes, int elem_bytes);
inline StoreHook& store_hook() {
  static StoreHook hook = nullptr;
  return hook;
}
inline void check_aligned(const void* p, int bytes) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) {
    throw std::runtime_error("cuda_emulated: misaligned " + std::to_string(bytes) + "-byte access");
  }
}
#endif

template <typename T, int W>
CSGD_HD Pack<T, W> load(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<T, W>*>(p);
#else
  check_aligned(p, W * static_cast<int>(sizeof(T)));
  Pack<T, W> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
#endif
}

template <typename T, int W>
CSGD_HD void store(T* p, const Pack<T, W>& x) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<T, W>*>(p) = x;
#else
  check_aligned(p, W * static_cast<int>(sizeof(T)));
  if (store_hook() != nullptr) store_hook()(p, static_cast<int>(sizeof(x)), static_cast<int>(sizeof(T)));
  std::memcpy(p, &x, sizeof(x));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The update rule (csgd_ext/ops/reference.py is the spec), on one element in the compute type.

// d (mean gradient, sign applied) -> new w, new b. `sw` is the cluster's sum of w and `ninv` = -1/size
// (clusters only).
template <typename A, bool CLUSTER>
CSGD_HD void update(A wj, A d, A sw, A ninv, A bold, A* wnew, A* bnew, const Coef<A>& c) {
  *wnew = math::update<CLUSTER, A>(wj, d, sw, ninv, bold, bnew, c.f, c.k);
}

// W elements at offset o of an unclustered row (or singleton cluster): d = sign * g.
template <typename T, int W>
CSGD_HD void elem_pack(T* w, const T* g, T* b, int64_t o, const Coef<acc_t<T>>& c) {
  using A = acc_t<T>;
  const Pack<T, W> wv = load<T, W>(w + o), gv = load<T, W>(g + o);
  Pack<T, W> bv{};
  if (c.f.mom && !c.f.first) bv = load<T, W>(b + o);
  Pack<T, W> wn, bn;
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) {
    A wk, bk = A(0);
    update<A, false>(static_cast<A>(wv.v[k]), c.sign * static_cast<A>(gv.v[k]), A(0), A(0), static_cast<A>(bv.v[k]),
                     &wk, &bk, c);
    wn.v[k] = static_cast<T>(wk);
    bn.v[k] = static_cast<T>(bk);
  }
  store<T, W>(w + o, wn);
  if (c.f.mom) store<T, W>(b + o, bn);
}

// kIlp<T> vector packs per thread in flight: load all, then compute and store (the elementwise body).
template <typename T>
CSGD_HD void elem_vectors(T* w, const T* g, T* b, int64_t base, int64_t nvec, int tid, const Coef<acc_t<T>>& c) {
  constexpr int V = kVec<T>;
  for (int64_t i0 = tid; i0 < nvec; i0 += static_cast<int64_t>(kThreads) * kIlp<T>) {
    Pack<T, V> wv[kIlp<T>], gv[kIlp<T>], bv[kIlp<T>];
    CSGD_UNROLL
    for (int u = 0; u < kIlp<T>; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
      if (i < nvec) {
        wv[u] = load<T, V>(w + base + i * V);
        gv[u] = load<T, V>(g + base + i * V);
        if (c.f.mom && !c.f.first) bv[u] = load<T, V>(b + base + i * V);
      }
    }
    CSGD_UNROLL
    for (int u = 0; u < kIlp<T>; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
      if (i < nvec) {
        Pack<T, V> wn, bn;
        CSGD_UNROLL
        for (int k = 0; k < V; ++k) {
          using A = acc_t<T>;
          A wk, bk = A(0);
          const A bold = (c.f.mom && !c.f.first) ? static_cast<A>(bv[u].v[k]) : A(0);
          update<A, false>(static_cast<A>(wv[u].v[k]), c.sign * static_cast<A>(gv[u].v[k]), A(0), A(0), bold, &wk, &bk,
                           c);
          wn.v[k] = static_cast<T>(wk);
          bn.v[k] = static_cast<T>(bk);
        }
        store<T, V>(w + base + i * V, wn);
        if (c.f.mom) store<T, V>(b + base + i * V, bn);
      }
    }
  }
}

template <typename T>
CSGD_HD int misalign(const void* p) {  // elements past the last 16-byte boundary
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) % kVecBytes) / sizeof(T));
}

// kElem: elements [e0, e1) of one tensor. Vectors when w, g and b share their alignment (scalar head up to
// the first 16-byte boundary, scalar tail), else scalars.
template <typename T>
CSGD_HD void elem_item(const Slot& s, int64_t e0, int64_t e1, int tid, const Coef<acc_t<T>>& c) {
  T* w = static_cast<T*>(s.w);
  const T* g = static_cast<const T*>(s.g);
  T* b = static_cast<T*>(s.b);
  constexpr int V = kVec<T>;
  const int mw = misalign<T>(w + e0);
  const bool vec = mw == misalign<T>(g + e0) && (!c.f.mom || mw == misalign<T>(b + e0));
  int64_t head = vec ? (V - mw) % V : e1 - e0;
  if (head > e1 - e0) head = e1 - e0;
  for (int64_t e = e0 + tid; e < e0 + head; e += kThreads) elem_pack<T, 1>(w, g, b, e, c);
  const int64_t base = e0 + head;
  const int64_t nvec = (e1 - base) / V;
  if (nvec > 0) elem_vectors<T>(w, g, b, base, nvec, tid, c);
  for (int64_t e = base + nvec * V + tid; e < e1; e += kThreads) elem_pack<T, 1>(w, g, b, e, c);
}

// Adds g and w of members q = q0, q0 + step, ... < size (rows mem[q], W columns from `col`) to the sums.
template <typename T, int W>
CSGD_HD void add_members(const T* g, const T* w, const int32_t* mem, int q0, int size, int step, int64_t cols,
                         int64_t col, acc_t<T>* sg, acc_t<T>* sw) {
  using A = acc_t<T>;
  for (int q = q0; q < size; q += step) {
    const int64_t o = static_cast<int64_t>(mem[q]) * cols + col;
    const Pack<T, W> gq = load<T, W>(g + o), wq = load<T, W>(w + o);
    CSGD_UNROLL
    for (int k = 0; k < W; ++k) {
      sg[k] = sg[k] + static_cast<A>(gq.v[k]);
      sw[k] = sw[k] + static_cast<A>(wq.v[k]);
    }
  }
}

// A cluster member's update at offset o, from its w (already loaded), the cluster's mean gradient mg (sign
// applied), its sum of weights sw and ninv = -1/size.
template <typename T, int W>
CSGD_HD void member_update(T* w, T* b, int64_t o, const Pack<T, W>& wq, const acc_t<T>* mg, const acc_t<T>* sw,
                           acc_t<T> ninv, const Coef<acc_t<T>>& c) {
  using A = acc_t<T>;
  Pack<T, W> bv{}, wn, bn;
  if (c.f.mom && !c.f.first) bv = load<T, W>(b + o);
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) {
    A wk, bk = A(0);
    update<A, true>(static_cast<A>(wq.v[k]), mg[k], sw[k], ninv, static_cast<A>(bv.v[k]), &wk, &bk, c);
    wn.v[k] = static_cast<T>(wk);
    bn.v[k] = static_cast<T>(bk);
  }
  store<T, W>(w + o, wn);
  if (c.f.mom) store<T, W>(b + o, bn);
}

// One cluster of `size` <= kMaxSmall members (rows mem[0..size)) on W columns starting at `col`: every
// member's g and w read once; the w of the first kKeep members stays in registers until the update (members
// past kKeep, rare in practice, read their w again, from cache).
template <typename T, int W>
CSGD_HD void small_cluster(const Slot& s, const int32_t* mem, int size, int64_t col, const Coef<acc_t<T>>& c) {
  using A = acc_t<T>;
  T* w = static_cast<T*>(s.w);
  const T* g = static_cast<const T*>(s.g);
  T* b = static_cast<T*>(s.b);
  if (size == 1) {  // a singleton is plain SGD on its row (no mean, no centripetal term)
    elem_pack<T, W>(w, g, b, static_cast<int64_t>(mem[0]) * s.cols + col, c);
    return;
  }
  // pass 1: sums of g and w; the first kKeep members unrolled (their w stays in registers), the rest in a
  // loop (bounded register use: at most kKeep members' loads in flight)
  Pack<T, W> wv[kKeep];
  A sg[W], sw[W];
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) sg[k] = sw[k] = A(0);
  CSGD_UNROLL
  for (int q = 0; q < kKeep; ++q) {
    if (q < size) {
      const int64_t o = static_cast<int64_t>(mem[q]) * s.cols + col;
      const Pack<T, W> gq = load<T, W>(g + o);
      wv[q] = load<T, W>(w + o);
      CSGD_UNROLL
      for (int k = 0; k < W; ++k) {
        sg[k] = sg[k] + static_cast<A>(gq.v[k]);
        sw[k] = sw[k] + static_cast<A>(wv[q].v[k]);
      }
    }
  }
  add_members<T, W>(g, w, mem, kKeep, size, 1, s.cols, col, sg, sw);
  const A inv = A(1) / static_cast<A>(size), sinv = c.sign * inv;
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) sg[k] = sg[k] * sinv;
  // pass 2: every member's update (members past kKeep read their w again, from cache)
  CSGD_UNROLL
  for (int q = 0; q < kKeep; ++q) {
    if (q < size) member_update<T, W>(w, b, static_cast<int64_t>(mem[q]) * s.cols + col, wv[q], sg, sw, -inv, c);
  }
  for (int q = kKeep; q < size; ++q) {
    const int64_t o = static_cast<int64_t>(mem[q]) * s.cols + col;
    member_update<T, W>(w, b, o, load<T, W>(w + o), sg, sw, -inv, c);
  }
}

// Rows of a slot can be read as whole 16-byte vectors: the row length is a multiple of the vector and every
// base pointer is 16-byte aligned (checked per step: gradients may be re-allocated).
template <typename T>
CSGD_HD bool rows_vectorizable(const Slot& s, bool use_mom) {
  return (s.cols * static_cast<int64_t>(sizeof(T))) % kVecBytes == 0 && misalign<T>(s.w) == 0 &&
         misalign<T>(s.g) == 0 && (!use_mom || misalign<T>(s.b) == 0);
}

// The columns of column vector v: [v * kVec, min(cols, (v + 1) * kVec)).
template <typename T>
CSGD_HD int64_t vector_end(const Slot& s, int64_t v) {
  const int64_t e = (v + 1) * kVec<T>;
  return e < s.cols ? e : s.cols;
}

// kSmall: clusters [a0, a1) x column vectors [v0, v1). Threads form (clusters per pass) x (vectors per pass).
template <typename T>
CSGD_HD void small_item(const Launch<T>& L, const Item& it, int tid) {
  const Slot& s = L.slots[it.slot];
  const int span = it.v1 - it.v0;
  const int nvv = span < kThreads ? span : kThreads;
  const int cpp = kThreads / nvv;
  const int lc = tid / nvv;
  if (lc >= cpp) return;
  const bool vec = rows_vectorizable<T>(s, L.c.f.mom);
  for (int64_t cl = it.a0 + lc; cl < it.a1; cl += cpp) {
    const Cluster cd = L.clusters[cl];
    const int32_t* mem = L.members + cd.m0;
    for (int64_t v = it.v0 + tid % nvv; v < it.v1; v += nvv) {
      if (vec) {
        small_cluster<T, kVec<T>>(s, mem, cd.size, v * kVec<T>, L.c);
      } else {
        for (int64_t j = v * kVec<T>; j < vector_end<T>(s, v); ++j) small_cluster<T, 1>(s, mem, cd.size, j, L.c);
      }
    }
  }
}

// kLarge, one cluster (it.a0) on column vectors [v0, v1), v1 - v0 <= kThreads. Thread (r, t) with
// t = tid % span and r = tid / span < R = kThreads / span takes members r, r + R, r + 2R, ...
// Phase 0: partial sums of g and w over its members -> shared memory.  Phase 1 (after a barrier): the R
// partials of its column reduced in order r = 0..R-1, then its members updated.
template <typename T, int W>
CSGD_HD void large_cols(const Slot& s, const int32_t* mem, int size, int64_t col, int phase, int r, int R, int t,
                        int span, Smem<T>* sm, const Coef<acc_t<T>>& c) {
  using A = acc_t<T>;
  T* w = static_cast<T*>(s.w);
  const T* g = static_cast<const T*>(s.g);
  T* b = static_cast<T*>(s.b);
  A* pg = sm->g + static_cast<int64_t>(r * span + t) * kVec<T>;
  A* pw = sm->w + static_cast<int64_t>(r * span + t) * kVec<T>;
  if (phase == 0) {
    A sg[W], sw[W];
    CSGD_UNROLL
    for (int k = 0; k < W; ++k) sg[k] = sw[k] = A(0);
    add_members<T, W>(g, w, mem, r, size, R, s.cols, col, sg, sw);
    CSGD_UNROLL
    for (int k = 0; k < W; ++k) {
      pg[k] = sg[k];
      pw[k] = sw[k];
    }
    return;
  }
  A mg[W], sw[W];
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) mg[k] = sw[k] = A(0);
  for (int rr = 0; rr < R; ++rr) {
    const A* qg = sm->g + static_cast<int64_t>(rr * span + t) * kVec<T>;
    const A* qw = sm->w + static_cast<int64_t>(rr * span + t) * kVec<T>;
    CSGD_UNROLL
    for (int k = 0; k < W; ++k) {
      mg[k] = mg[k] + qg[k];
      sw[k] = sw[k] + qw[k];
    }
  }
  const A inv = A(1) / static_cast<A>(size), sinv = c.sign * inv;
  CSGD_UNROLL
  for (int k = 0; k < W; ++k) mg[k] = mg[k] * sinv;
  for (int q = r; q < size; q += R) {
    const int64_t o = static_cast<int64_t>(mem[q]) * s.cols + col;
    member_update<T, W>(w, b, o, load<T, W>(w + o), mg, sw, -inv, c);
  }
}

template <typename T>
CSGD_HD void large_item(const Launch<T>& L, const Item& it, int phase, int tid, Smem<T>* sm) {
  const Slot& s = L.slots[it.slot];
  const int span = it.v1 - it.v0;  // <= kThreads (the planner's promise)
  const int R = kThreads / span;
  const int r = tid / span, t = tid % span;
  if (r >= R) return;
  const Cluster cd = L.clusters[it.a0];
  const int32_t* mem = L.members + cd.m0;
  const int64_t v = it.v0 + t;
  if (rows_vectorizable<T>(s, L.c.f.mom)) {
    large_cols<T, kVec<T>>(s, mem, cd.size, v * kVec<T>, phase, r, R, t, span, sm, L.c);
  } else {
    // scalar columns of the vector, one at a time; the shared partials hold one accumulator per column, so
    // the columns go one phase pair at a time: phase p covers column p / 2 of the vector
    const int64_t j = v * kVec<T> + phase / 2;
    if (j < vector_end<T>(s, v)) large_cols<T, 1>(s, mem, cd.size, j, phase % 2, r, R, t, span, sm, L.c);
  }
}

// kPacked: tensors slots [it.slot, it.slot + it.v1) with element counts members[it.a0 ...], elementwise over
// their concatenation (thread tid takes elements tid, tid + kThreads, ...; scalar accesses: the tensors are
// small and each starts anywhere).
template <typename T>
CSGD_HD void packed_item(const Launch<T>& L, const Item& it, int tid) {
  int t = 0;
  int64_t base = 0;
  for (int64_t c = tid; c < it.a1; c += kThreads) {
    while (c >= base + L.members[it.a0 + t]) base += L.members[it.a0 + t++];
    const Slot& s = L.slots[it.slot + t];
    elem_pack<T, 1>(static_cast<T*>(s.w), static_cast<const T*>(s.g), static_cast<T*>(s.b), c - base, L.c);
  }
}

// Phases an item needs (one barrier between consecutive phases): kLarge 2 per column of its vector when its
// rows are not vectorizable, else 2; others 1.
template <typename T>
CSGD_HD int item_phases(const Launch<T>& L, const Item& it) {
  if (it.kind != kLarge) return 1;
  return rows_vectorizable<T>(L.slots[it.slot], L.c.f.mom) ? 2 : 2 * kVec<T>;
}

// Everything thread `tid` of a block does for phase `phase` of item `it`.
template <typename T>
CSGD_HD void run_item(const Launch<T>& L, const Item& it, int phase, int tid, Smem<T>* sm) {
  switch (it.kind) {
    case kElem:
      elem_item<T>(L.slots[it.slot], it.a0, it.a1, tid, L.c);
      break;
    case kSmall:
      small_item<T>(L, it, tid);
      break;
    case kPacked:
      packed_item<T>(L, it, tid);
      break;
    default:
      large_item<T>(L, it, phase, tid, sm);
      break;
  }
}

#if defined(__CUDACC__)
// The kernel: a persistent grid walks the items in grid-stride order. An item's phases are separated by
// barriers (item_phases is the same for every thread of the block).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) csgd_step_kernel(const Launch<T> L) {
  __shared__ Smem<T> sm;
  for (int64_t i = blockIdx.x; i < L.n_items; i += gridDim.x) {
    const Item it = L.items[i];
    const int phases = item_phases<T>(L, it);
    if (phases == 1) {
      run_item<T>(L, it, 0, static_cast<int>(threadIdx.x), &sm);
      continue;
    }
    for (int ph = 0; ph < phases; ++ph) {
      __syncthreads();  // the previous phase (or item) is done with the shared partials
      run_item<T>(L, it, ph, static_cast<int>(threadIdx.x), &sm);
    }
  }
}
#endif

}  // namespace dev
}  // namespace csgd_ext
