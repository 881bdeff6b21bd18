// CPU kernel of csgd_ext::csgd_step_: one pass over every tensor of the step (the ATen glue).
//
// Work is cut into tiles: an unclustered tensor (or one whose every row is its own cluster: the same update)
// into flat element ranges, a clustered tensor into (cluster range x column block) tiles. Tiles run in parallel
// on ATen's OpenMP pool (at::parallel_for, dynamic pick-up of tiles through an atomic counter). The compute code
// of a tile is csgd_cpu_kernel_impl.h, compiled for AVX2 + FMA and for the build's baseline; the copy is picked
// once from the CPU's features.
#include "csgd_cpu_kernel.h"
#include "csgd_step.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace csgd_ext {
namespace cpu {

Isa pick_isa() {
  static const Isa isa = [] {
    const char* force = std::getenv("CSGD_EXT_CPU_ISA");
    if (force != nullptr && std::strcmp(force, "base") == 0) return Isa::base;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::base;
  }();
  return isa;
}

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2+fma" : "base"; }

}  // namespace cpu

namespace {

using cpu::Tile;

constexpr int64_t kTileElems = 16384;  // target elements per tile (~64 KiB of w for fp32)
constexpr int64_t kMinCols = 64;       // smallest column block of a big cluster

void run_tiles(const std::vector<Tile>& tiles, const cpu::Job& job, const std::vector<Geom>& geoms) {
  const cpu::TileFn fn = cpu::pick_isa() == cpu::Isa::avx2 ? cpu::cpu_avx2::pick(job) : cpu::cpu_base::pick(job);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  int64_t total = 0;
  for (const Geom& geo : geoms) total += geo.rows * geo.cols;
  if (total <= 2 * kTileElems || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (const Tile& tl : tiles) fn(job, tl);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= ntiles) break;
      fn(job, tiles[i]);
    }
  });
}

// The clusters of a validated layout in the order of their first (lowest) member row. Visiting them in this
// order walks singletons and first members through memory front to back; in layout order (cluster id order,
// which k-means leaves random) every cluster is a jump, and rows visited in random order cost up to twice
// as much as the same rows in order (benchmarks/README.md). Clusters are independent, so the order does not
// change any result.
std::vector<int64_t> first_row_order(const int64_t* lay, const Geom& geo) {
  const int64_t* off = lay;
  const int64_t* perm = lay + geo.clusters + 1;
  std::vector<int64_t> at(geo.rows, -1);  // row -> the cluster whose first member it is
  for (int64_t c = 0; c < geo.clusters; ++c) {
    int64_t r = perm[off[c]];
    for (int64_t q = off[c] + 1; q < off[c + 1]; ++q) r = std::min(r, perm[q]);
    at[r] = c;
  }
  std::vector<int64_t> order;
  order.reserve(geo.clusters);
  for (int64_t r = 0; r < geo.rows; ++r) {
    if (at[r] >= 0) order.push_back(at[r]);
  }
  return order;
}

// Cut every tensor into tiles of about kTileElems elements.
std::vector<Tile> cut_tiles(const std::vector<Geom>& geoms) {
  std::vector<Tile> tiles;
  for (size_t t = 0; t < geoms.size(); ++t) {
    const Geom& geo = geoms[t];
    const int64_t numel = geo.rows * geo.cols;
    if (numel == 0) continue;
    if (geo.clusters == 0 || geo.clusters == geo.rows) {  // unclustered, or every row its own cluster: plain SGD
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
    for (int64_t c0 = 0; c0 < geo.clusters; c0 += per_tile) {
      const int64_t c1 = std::min(geo.clusters, c0 + per_tile);
      for (int64_t j0 = 0; j0 < geo.cols; j0 += block) {
        tiles.push_back({static_cast<int32_t>(t), true, c0, c1, j0, std::min(geo.cols, j0 + block)});
      }
    }
  }
  return tiles;
}

void run_cpu(const StepArgs& a) {
  const at::TensorList params = a.params;
  const std::vector<Geom>& geoms = a.geoms;
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(params[i].scalar_type() == params[0].scalar_type(), "csgd_step_: params[", i, "] is ",
                     params[i].scalar_type(), " but params[0] is ", params[0].scalar_type(),
                     "; group tensors by dtype (the Python wrapper does)");
  }
  std::vector<const int64_t*> lay(params.size(), nullptr);
  for (size_t i = 0; i < params.size(); ++i) {
    if (geoms[i].clusters > 0) {
      lay[i] = a.layouts.get(i)->const_data_ptr<int64_t>();
      validate_layout(lay[i], geoms[i].clusters, geoms[i].rows, static_cast<int64_t>(i));  // before any write
    }
  }
  const std::vector<Tile> tiles = cut_tiles(geoms);
  // each clustered tensor's clusters in the order of their first member row (tiles are ranges of it)
  std::vector<std::vector<int64_t>> orders(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Geom& geo = geoms[i];
    if (geo.clusters > 0 && geo.clusters < geo.rows && geo.cols > 1) orders[i] = first_row_order(lay[i], geo);
  }
  std::vector<cpu::Tensor> ts(params.size());
  const Hyper& h = a.h;
  const bool mom = h.momentum != 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    ts[i] = cpu::Tensor{params[i].data_ptr(), a.grads[i].const_data_ptr(), mom ? a.bufs[i].data_ptr() : nullptr,
                        lay[i], orders[i].empty() ? nullptr : orders[i].data(),
                        geoms[i].rows, geoms[i].cols, geoms[i].clusters};
  }
  cpu::Dtype dt;
  switch (params[0].scalar_type()) {
    case at::kFloat: dt = cpu::Dtype::f32; break;
    case at::kDouble: dt = cpu::Dtype::f64; break;
    case at::kHalf: dt = cpu::Dtype::f16; break;
    case at::kBFloat16: dt = cpu::Dtype::bf16; break;
    default: TORCH_CHECK_TYPE(false, "csgd_step_: unsupported dtype ", params[0].scalar_type());
  }
  const cpu::Job job{ts.data(), dt, h.lr, h.weight_decay, h.momentum, h.dampening, h.centripetal, h.nesterov,
                     h.maximize, h.first};
  run_tiles(tiles, job, geoms);
}

std::string cpu_isa() { return cpu::isa_name(cpu::pick_isa()); }

}  // namespace
}  // namespace csgd_ext

TORCH_LIBRARY_IMPL(csgd_ext, CPU, m) {
  m.impl("csgd_step_", &csgd_ext::step_entry<c10::DeviceType::CPU, &csgd_ext::run_cpu>);
}

// Which copy of the CPU kernel this process runs ("avx2+fma" or "base").
TORCH_LIBRARY_FRAGMENT(csgd_ext, m) { m.def("cpu_kernel_isa() -> str", &csgd_ext::cpu_isa); }
