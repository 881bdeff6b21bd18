// How the CPU glue (csgd_step_cpu.cpp) cuts a step into tiles and orders a clustered tensor's clusters. Plain C++
// (no ATen), so that benchmarks/step/kernel_ab.cpp runs two revisions of the kernel through the same tiles.
#pragma once

#include "csgd_cpu_kernel.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace csgd_ext {
namespace cpu {

constexpr int64_t kTileElems = 16384;  // target elements per tile (~64 KiB of w for fp32)
constexpr int64_t kMinCols = 64;       // smallest column block of a big cluster

// The clusters of a validated layout ([offsets | perm] of a tensor with `rows` rows in `clusters` clusters) in the
// order of their first (lowest) member row. Visiting them in this order walks singletons and first members
// through memory front to back; in layout order (cluster id order, which k-means leaves random) every cluster is
// a jump, and rows visited in random order cost up to twice as much as the same rows in order
// (benchmarks/README.md). Clusters are independent, so the order does not change any result.
inline std::vector<int64_t> first_row_order(const int64_t* lay, int64_t rows, int64_t clusters) {
  const int64_t* off = lay;
  const int64_t* perm = lay + clusters + 1;
  std::vector<int64_t> at(rows, -1);  // row -> the cluster whose first member it is
  for (int64_t c = 0; c < clusters; ++c) {
    int64_t r = perm[off[c]];
    for (int64_t q = off[c] + 1; q < off[c + 1]; ++q) r = std::min(r, perm[q]);
    at[r] = c;
  }
  std::vector<int64_t> order;
  order.reserve(clusters);
  for (int64_t r = 0; r < rows; ++r) {
    if (at[r] >= 0) order.push_back(at[r]);
  }
  return order;
}

// Cuts every tensor (G: anything with rows, cols and clusters; clusters = 0: unclustered) into tiles of about
// kTileElems elements: an unclustered tensor, or one whose every row is its own cluster (the same update), into
// flat element ranges; a clustered tensor into (cluster range x column block) tiles.
template <typename G>
std::vector<Tile> cut_tiles(const std::vector<G>& geoms) {
  std::vector<Tile> tiles;
  for (size_t t = 0; t < geoms.size(); ++t) {
    const G& geo = geoms[t];
    const int64_t numel = geo.rows * geo.cols;
    if (numel == 0) continue;
    if (geo.clusters == 0 || geo.clusters == geo.rows) {
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

}  // namespace cpu
}  // namespace csgd_ext
