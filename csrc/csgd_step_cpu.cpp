// CPU kernel of csgd_ext::csgd_step_: one pass over every tensor of the step (the ATen glue).
//
// Work is cut into tiles (csgd_cpu_tiles.h): an unclustered tensor (or one whose every row is its own cluster:
// the same update) into flat element ranges, a clustered tensor into (cluster range x column block) tiles. Tiles
// run in parallel on ATen's OpenMP pool (at::parallel_for, dynamic pick-up of tiles through an atomic counter).
// The compute code of a tile is csgd_cpu_kernel_impl.h, compiled for AVX2 + FMA and for the build's baseline;
// the copy is picked once from the CPU's features.
#include "csgd_cpu_kernel.h"
#include "csgd_cpu_tiles.h"
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

// Tiles a thread takes at a time (consecutive, so that it walks memory in runs of about 512 KiB of w, not one
// tile of 64 KiB of every two). Two threads on ResNet-50's shapes, step_ab.py in two runs: 5/8 scattered 1.18x to
// 1.22x fused SGD with 1 -> 1.11x to 1.13x with 8 (16: the same), and without the slow rounds of 2.4x.
constexpr int64_t kTilesPerGrab = 8;

void run_tiles(const std::vector<Tile>& tiles, const cpu::Job& job, const std::vector<Geom>& geoms) {
  const cpu::TileFn fn = cpu::pick_isa() == cpu::Isa::avx2 ? cpu::cpu_avx2::pick(job) : cpu::cpu_base::pick(job);
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  int64_t total = 0;
  for (const Geom& geo : geoms) total += geo.rows * geo.cols;
  if (total <= 2 * cpu::kTileElems || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (const Tile& tl : tiles) fn(job, tl);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i0 = next.fetch_add(kTilesPerGrab, std::memory_order_relaxed);
      if (i0 >= ntiles) break;
      for (int64_t i = i0; i < std::min(ntiles, i0 + kTilesPerGrab); ++i) fn(job, tiles[i]);
    }
  });
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
  const std::vector<Tile> tiles = cpu::cut_tiles(geoms);
  // each clustered tensor's clusters in the order of their first member row (tiles are ranges of it)
  std::vector<std::vector<int64_t>> orders(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Geom& geo = geoms[i];
    if (geo.clusters > 0 && geo.clusters < geo.rows && geo.cols > 1) {
      orders[i] = cpu::first_row_order(lay[i], geo.rows, geo.clusters);
    }
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
