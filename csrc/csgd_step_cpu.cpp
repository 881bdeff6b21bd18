// CPU kernel of csgd_ext::csgd_step_: one pass over every tensor of the step.
//
// Work is cut into tiles: an unclustered tensor into flat element ranges, a clustered tensor into
// (cluster range x column block) tiles. Tiles run in parallel on ATen's OpenMP pool (at::parallel_for,
// dynamic pick-up of tiles through an atomic counter). Inside a clustered tile, each cluster's member
// rows are read once to form the column sums of g and w (fixed member order: deterministic), then every
// member is updated while its rows are still in cache, so the memory traffic per element is that of fused
// momentum SGD (read w, g, b; write w, b). The inner loops run over contiguous columns and vectorise.
// fp16/bf16 are computed in fp32 and rounded once when stored; fp64 in fp64.
#include "csgd_plan.h"
#include "csgd_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>

namespace csgd_ext {
namespace {

constexpr int64_t kTileElems = 16384;  // target elements per tile (~64 KiB of w for fp32)
constexpr int64_t kMinCols = 64;       // smallest column block of a big cluster
constexpr int64_t kVec = 16;           // columns of one cluster chunk held in registers

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Tile {
  int32_t t;        // tensor index
  bool clustered;
  int64_t a0, a1;   // flat element range (unclustered) or cluster range (clustered)
  int64_t j0, j1;   // column range (clustered)
};

template <typename A>
struct Coefs {
  A lr, wd, mom, damp1, cp;  // damp1 = 1 - dampening
  A sign;                    // -1 when maximizing (negation is exact), else +1
};

// Update `len` elements of one row. CLUSTER: `mg`/`mw` hold the cluster means of g (sign applied) and w.
// Otherwise (singleton cluster or unclustered tensor) the mean gradient is the row's own gradient and the
// centripetal term vanishes.
template <typename T, bool CLUSTER, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void update_row(T* __restrict w, const T* __restrict g, T* __restrict b, const acc_t<T>* __restrict mg,
                       const acc_t<T>* __restrict mw, int64_t len, const Coefs<acc_t<T>>& c) {
  using A = acc_t<T>;
  const A lr = c.lr, wd = c.wd, mom = c.mom, damp1 = c.damp1, cp = c.cp, sign = c.sign;
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) {
    const A wj = static_cast<A>(w[j]);
    A d;
    if constexpr (CLUSTER) {
      d = mg[j];
    } else {
      d = sign * static_cast<A>(g[j]);
    }
    if constexpr (WD) d = d + wd * wj;
    if constexpr (CLUSTER && CP) d = d + cp * (wj - mw[j]);
    if constexpr (MOM) {
      A bj;
      if constexpr (FIRST) {
        bj = d;
      } else {
        bj = mom * static_cast<A>(b[j]) + damp1 * d;
      }
      b[j] = static_cast<T>(bj);
      if constexpr (NEST) {
        d = d + mom * bj;
      } else {
        d = bj;
      }
    }
    w[j] = static_cast<T>(wj - lr * d);
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
  for (int64_t k = 0; k < n; ++k) {
    sg[k] = sg[k] * sinv;
    sw[k] = sw[k] * inv;
  }
  for (int64_t q = 0; q < s; ++q) {
    const int64_t o = mem[q] * cols + j;
    update_row<T, true, MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, sg, sw, n, c);
  }
}

// fp32 fast path of cluster_chunk for kVec = 16 columns: GCC vector extensions (two AVX2 registers per
// value) keep the sums in registers; the auto-vectoriser leaves that member loop scalar. Same operations
// in the same order as the generic version.
typedef float f32x8 __attribute__((vector_size(32)));
static_assert(kVec == 16, "the fp32 fast path holds 16 columns (two 8-wide vectors)");

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline void update8(float* __restrict w, float* __restrict b, f32x8 mg, f32x8 mw, const Coefs<float> c) {
  const f32x8 wj = load8(w);
  f32x8 d = mg;
  if constexpr (WD) d = d + c.wd * wj;
  if constexpr (CP) d = d + c.cp * (wj - mw);
  if constexpr (MOM) {
    f32x8 bj;
    if constexpr (FIRST) {
      bj = d;
    } else {
      bj = c.mom * load8(b) + c.damp1 * d;
    }
    store8(b, bj);
    if constexpr (NEST) {
      d = d + c.mom * bj;
    } else {
      d = bj;
    }
  }
  store8(w, wj - c.lr * d);
}

// Columns [j0, j1) of one cluster in chunks of 16; returns the first column not done (the tail < 16).
// Software prefetch, each measured to help a little (5-10 %) on ResNet-50 shapes:
// * each chunk prefetches the same columns of the next cluster's members (`nmem`, `ns`; ns = 0 for none):
//   their rows are anywhere in the tensor, so the hardware prefetcher cannot see them coming;
// * rows of kPrefetchMin+ columns also prefetch each member's g, w and b kPrefetchAhead columns ahead: a
//   cluster reads 3 x s row streams at once, more than the hardware prefetcher keeps ahead of.
constexpr int64_t kPrefetchAhead = 64;  // columns (256 bytes of fp32)
constexpr int64_t kPrefetchMin = 256;

template <int S, bool PF, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
inline int64_t cluster_cols16_impl(float* __restrict w, const float* __restrict g, float* __restrict b,
                                   const int64_t* __restrict mem, int64_t s_dyn, int64_t cols, int64_t j0, int64_t j1,
                                   const Coefs<float> c, const int64_t* __restrict nmem, int64_t ns) {
  const int64_t s = S > 0 ? S : s_dyn;  // S > 0: the member loops are unrolled
  const float inv = 1.0f / static_cast<float>(s), sinv = c.sign * inv;  // multiply: no vector divisions
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    f32x8 sg0 = {}, sg1 = {}, sw0 = {}, sw1 = {};
    for (int64_t q = 0; q < ns; ++q) {
      const int64_t o = nmem[q] * cols + j;
      __builtin_prefetch(g + o);
      __builtin_prefetch(w + o);
      if constexpr (MOM && !FIRST) __builtin_prefetch(b + o);
    }
    for (int64_t q = 0; q < s; ++q) {
      const int64_t o = mem[q] * cols + j;
      if constexpr (PF) {  // may run past the row: prefetches never fault
        __builtin_prefetch(g + o + kPrefetchAhead);
        __builtin_prefetch(w + o + kPrefetchAhead);
        if constexpr (MOM && !FIRST) __builtin_prefetch(b + o + kPrefetchAhead);
      }
      sg0 += load8(g + o);
      sg1 += load8(g + o + 8);
      sw0 += load8(w + o);
      sw1 += load8(w + o + 8);
    }
    const f32x8 mg0 = sg0 * sinv, mg1 = sg1 * sinv;
    const f32x8 mw0 = sw0 * inv, mw1 = sw1 * inv;
    for (int64_t q = 0; q < s; ++q) {
      const int64_t o = mem[q] * cols + j;
      update8<MOM, FIRST, NEST, WD, CP>(w + o, MOM ? b + o : nullptr, mg0, mw0, c);
      update8<MOM, FIRST, NEST, WD, CP>(w + o + 8, MOM ? b + o + 8 : nullptr, mg1, mw1, c);
    }
  }
  return j;
}

template <bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
__attribute__((noinline)) int64_t cluster_cols16(float* __restrict w, const float* __restrict g, float* __restrict b,
                                                 const int64_t* __restrict mem, int64_t s, int64_t cols, int64_t j0,
                                                 int64_t j1, const Coefs<float>& c, const int64_t* nmem, int64_t ns) {
  const bool pf = j1 - j0 >= kPrefetchMin;
  // the common cluster sizes get unrolled member loops (a dynamic trip count costs ~1.5x in cache)
#define CSGD_COLS16(S, PF) cluster_cols16_impl<S, PF, MOM, FIRST, NEST, WD, CP>(w, g, b, mem, s, cols, j0, j1, c, nmem, ns)
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
      update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + r, g + r, MOM ? b + r : nullptr, nullptr, nullptr, 1, c);
      continue;
    }
    A sg = A(0), sw = A(0);
    for (int64_t q = m0; q < m1; ++q) {
      sg += static_cast<A>(g[perm[q]]);
      sw += static_cast<A>(w[perm[q]]);
    }
    const A inv = A(1) / static_cast<A>(m1 - m0), sinv = c.sign * inv;
    const A mg = sg * sinv, mw = sw * inv;
    for (int64_t q = m0; q < m1; ++q) {
      const int64_t r = perm[q];
      update_row<T, true, MOM, FIRST, NEST, WD, CP>(w + r, g + r, MOM ? b + r : nullptr, &mg, &mw, 1, c);
    }
  }
}

template <typename T, bool MOM, bool FIRST, bool NEST, bool WD, bool CP>
void run_tiles(const std::vector<Tile>& tiles, at::TensorList params, at::TensorList grads, at::TensorList bufs,
               const std::vector<const int64_t*>& lay, const std::vector<Geom>& geoms, const Coefs<acc_t<T>>& c,
               int64_t max_block) {
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  std::vector<T*> W(params.size()), B(params.size(), nullptr);
  std::vector<const T*> G(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    W[i] = params[i].data_ptr<T>();
    G[i] = grads[i].const_data_ptr<T>();
    if (MOM) B[i] = bufs[i].data_ptr<T>();
  }
  auto do_tile = [&](const Tile& tl) {
    T* w = W[tl.t];
    const T* g = G[tl.t];
    T* b = B[tl.t];
    if (!tl.clustered) {
      update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + tl.a0, g + tl.a0, MOM ? b + tl.a0 : nullptr, nullptr,
                                                          nullptr, tl.a1 - tl.a0, c);
      return;
    }
    const int64_t cols = geoms[tl.t].cols;
    const int64_t* off = lay[tl.t];
    const int64_t* perm = off + geoms[tl.t].clusters + 1;
    const int64_t len = tl.j1 - tl.j0;
    if (cols == 1) {
      scalar_clusters<T, MOM, FIRST, NEST, WD, CP>(w, g, b, off, perm, tl.a0, tl.a1, c);
      return;
    }
    for (int64_t cl = tl.a0; cl < tl.a1; ++cl) {
      const auto [m0, m1] = members_of(off, cl);
      if (m1 - m0 == 1) {
        const int64_t o = perm[m0] * cols + tl.j0;
        update_row<T, false, MOM, FIRST, NEST, WD, CP>(w + o, g + o, MOM ? b + o : nullptr, nullptr, nullptr, len, c);
        continue;
      }
      int64_t j = tl.j0;
      if constexpr (std::is_same_v<T, float>) {
        // the next cluster's members, prefetched
        const int64_t n1 = cl + 1 < tl.a1 ? off[cl + 2] : m1;
        j = cluster_cols16<MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, tl.j0, tl.j1, c, perm + m1,
                                                     n1 - m1);
      } else {
        for (; j + kVec <= tl.j1; j += kVec) {
          cluster_chunk<T, kVec, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, kVec, c);
        }
      }
      if (j < tl.j1) {
        cluster_chunk<T, 0, MOM, FIRST, NEST, WD, CP>(w, g, b, perm + m0, m1 - m0, cols, j, tl.j1 - j, c);
      }
    }
  };
  int64_t total = 0;
  for (const Geom& geo : geoms) total += geo.rows * geo.cols;
  if (total <= 2 * kTileElems || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (const Tile& tl : tiles) do_tile(tl);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= ntiles) break;
      do_tile(tiles[i]);
    }
  });
}

// Turns the runtime flags into template arguments (5 momentum modes x weight decay x centripetal).
template <typename T, bool WD, bool CP>
void dispatch_momentum(const Hyper& h, const std::vector<Tile>& tiles, at::TensorList params, at::TensorList grads,
                       at::TensorList bufs, const std::vector<const int64_t*>& lay, const std::vector<Geom>& geoms,
                       const Coefs<acc_t<T>>& c, int64_t max_block) {
#define CSGD_RUN(MOM, FIRST, NEST) run_tiles<T, MOM, FIRST, NEST, WD, CP>(tiles, params, grads, bufs, lay, geoms, c, max_block)
  if (h.momentum == 0.0) {
    CSGD_RUN(false, false, false);
  } else if (h.first) {
    if (h.nesterov) CSGD_RUN(true, true, true); else CSGD_RUN(true, true, false);
  } else {
    if (h.nesterov) CSGD_RUN(true, false, true); else CSGD_RUN(true, false, false);
  }
#undef CSGD_RUN
}

template <typename T>
void dispatch_flags(const Hyper& h, const std::vector<Tile>& tiles, at::TensorList params, at::TensorList grads,
                    at::TensorList bufs, const std::vector<const int64_t*>& lay, const std::vector<Geom>& geoms,
                    const Coefs<acc_t<T>>& c, int64_t max_block) {
  const bool wd = h.weight_decay != 0.0, cp = h.centripetal != 0.0;
  if (wd && cp) dispatch_momentum<T, true, true>(h, tiles, params, grads, bufs, lay, geoms, c, max_block);
  else if (wd) dispatch_momentum<T, true, false>(h, tiles, params, grads, bufs, lay, geoms, c, max_block);
  else if (cp) dispatch_momentum<T, false, true>(h, tiles, params, grads, bufs, lay, geoms, c, max_block);
  else dispatch_momentum<T, false, false>(h, tiles, params, grads, bufs, lay, geoms, c, max_block);
}

// Cut every tensor into tiles of about kTileElems elements.
std::vector<Tile> plan_tiles(const std::vector<Geom>& geoms, int64_t* max_block) {
  std::vector<Tile> tiles;
  *max_block = 1;
  for (size_t t = 0; t < geoms.size(); ++t) {
    const Geom& geo = geoms[t];
    const int64_t numel = geo.rows * geo.cols;
    if (numel == 0) continue;
    if (geo.clusters == 0) {
      for (int64_t a = 0; a < numel; a += kTileElems) {
        tiles.push_back({static_cast<int32_t>(t), false, a, std::min(numel, a + kTileElems), 0, 0});
      }
      continue;
    }
    const int64_t avg = std::max<int64_t>(1, (geo.rows + geo.clusters - 1) / geo.clusters);
    int64_t block = geo.cols;
    int64_t per_tile = 1;
    if (avg * geo.cols > kTileElems) {
      block = std::max(kMinCols, (kTileElems / avg) / kMinCols * kMinCols);
      block = std::min(block, geo.cols);
    } else {
      per_tile = std::max<int64_t>(1, kTileElems / (avg * geo.cols));
    }
    *max_block = std::max(*max_block, block);
    for (int64_t c0 = 0; c0 < geo.clusters; c0 += per_tile) {
      const int64_t c1 = std::min(geo.clusters, c0 + per_tile);
      for (int64_t j0 = 0; j0 < geo.cols; j0 += block) {
        tiles.push_back({static_cast<int32_t>(t), true, c0, c1, j0, std::min(geo.cols, j0 + block)});
      }
    }
  }
  return tiles;
}

void csgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                   const c10::List<std::optional<at::Tensor>>& layouts, double lr, double weight_decay,
                   double momentum, double dampening, bool nesterov, bool maximize, double centripetal,
                   bool is_first_step) {
  if (params.empty()) return;
  const Hyper h{lr, weight_decay, momentum, dampening, centripetal, nesterov, maximize, is_first_step};
  const std::vector<Geom> geoms = check_step_args(params, grads, bufs, layouts, h, c10::DeviceType::CPU);
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(params[i].scalar_type() == params[0].scalar_type(), "csgd_step_: params[", i, "] is ",
                     params[i].scalar_type(), " but params[0] is ", params[0].scalar_type(),
                     "; group tensors by dtype (the Python wrapper does)");
  }
  std::vector<const int64_t*> lay(params.size(), nullptr);
  for (size_t i = 0; i < params.size(); ++i) {
    if (geoms[i].clusters > 0) {
      lay[i] = layouts.get(i)->const_data_ptr<int64_t>();
      validate_layout(lay[i], geoms[i].clusters, geoms[i].rows, static_cast<int64_t>(i));  // before any write
    }
  }
  int64_t max_block = 1;
  const std::vector<Tile> tiles = plan_tiles(geoms, &max_block);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "csgd_step_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Coefs<A> c{static_cast<A>(lr), static_cast<A>(weight_decay), static_cast<A>(momentum),
                     static_cast<A>(1.0 - dampening), static_cast<A>(centripetal), static_cast<A>(maximize ? -1.0 : 1.0)};
    dispatch_flags<scalar_t>(h, tiles, params, grads, bufs, lay, geoms, c, max_block);
  });
}

}  // namespace
}  // namespace csgd_ext

TORCH_LIBRARY_IMPL(csgd_ext, CPU, m) { m.impl("csgd_step_", &csgd_ext::csgd_step_cpu); }
