// The work table of the CUDA C-SGD kernel (host side), shared by the CUDA backend, its CPU emulation
// ("cuda_emulated") and the performance model (benchmarks/step/perf_model.py, through the cuda_work_table_stats op).
// ("Plan" in this package means the cluster plan of csgd_ext.plan only.)
//
// A work table turns the tensors of one dtype (their geometry and cluster layouts) into work items
// (csgd_device.h: items, a cluster table and a member table) and a list of launches (at most
// dev::kMaxSlots tensors each). It depends only on the shapes and layouts, so it is built once per set of
// layouts and cached: a step then only fills the kernel parameters (tensor addresses) and launches.
// Building it validates every layout (offsets from 0 to rows, strictly increasing; perm a permutation of the
// rows), so the kernel can trust the table.
#pragma once

#include "csgd_device.h"
#include "csgd_step.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace csgd_ext {

// Where the table's launches will run: the grid is min(items, sm_count * blocks_per_sm).
struct GridTarget {
  int64_t sm_count = 132;      // an H200 (the emulation's default)
  int64_t blocks_per_sm = 4;   // resident blocks of kThreads threads per multiprocessor
};

struct TableLaunch {
  int64_t item0 = 0, item1 = 0;    // its items in the table's items
  int64_t grid = 0;                // blocks
  std::vector<int64_t> tensors;    // slot -> index into the tensors the table was built for
};

struct WorkTable {
  std::vector<dev::Item> items;
  std::vector<dev::Cluster> clusters;
  std::vector<int32_t> members;
  std::vector<TableLaunch> launches;
};

// Builds the work table of tensors `idx` (indices into geoms / host_layouts). host_layouts[i] points to the
// host copy of layout i ([offsets | perm], int64) or is nullptr for an unclustered tensor. Throws a clear
// ValueError on a malformed layout.
WorkTable build_work_table(const std::vector<int64_t>& idx, const std::vector<Geom>& geoms,
                           const std::vector<const int64_t*>& host_layouts, int64_t elem_size,
                           const GridTarget& target);

// build_work_table for tensors and layouts on any device: the layouts are copied to the host first (a
// device-to-host copy when they live on a GPU).
WorkTable work_table_from_tensors(const std::vector<int64_t>& idx, at::TensorList params,
                                  const c10::List<std::optional<at::Tensor>>& layouts,
                                  const std::vector<Geom>& geoms, const GridTarget& target);

// Statistics of a work table, as "key=value;..." (the performance model's input).
std::string work_table_stats(const WorkTable& table, const std::vector<Geom>& geoms, int64_t elem_size);

// A work table with its items, clusters and members in one byte tensor on the device it runs on
// ([items | clusters | members]).
struct CachedWorkTable {
  WorkTable host;
  at::Tensor bytes;
  std::vector<at::Tensor> layouts;  // kept alive, so a cache key's addresses cannot be reused by new layouts
  const dev::Item* items() const;
  const dev::Cluster* clusters() const;
  const int32_t* members() const;
};

// The cached work table of tensors `idx` of a step (one dtype), building it on a miss: the layouts are copied
// to the host (one device-to-host copy per new set of layouts, never per step), validated and tabled, and the
// bytes are handed to `upload` (host byte tensor -> the same bytes on the tensors' device). `on_miss` runs
// before any of that (the CUDA backend refuses to build a table while a CUDA graph is being captured).
std::shared_ptr<const CachedWorkTable> cached_work_table(const std::vector<int64_t>& idx, at::TensorList params,
                                                         const c10::List<std::optional<at::Tensor>>& layouts,
                                                         const std::vector<Geom>& geoms, const GridTarget& target,
                                                         const std::function<void()>& on_miss,
                                                         const std::function<at::Tensor(const at::Tensor&)>& upload);

// cached_work_table for every dtype group of a step (group_by_dtype), all built before anything runs: every
// layout is validated before the first write. `target(dtype)` is where that dtype's kernel runs.
std::vector<std::shared_ptr<const CachedWorkTable>> cached_work_tables(
    const std::vector<std::vector<int64_t>>& groups, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
    const std::function<GridTarget(at::ScalarType)>& target, const std::function<void()>& on_miss,
    const std::function<at::Tensor(const at::Tensor&)>& upload);

// Fills the kernel parameters of one launch: tensor addresses, row lengths, hyperparameters.
template <typename T>
void fill_launch(dev::Launch<T>* L, const CachedWorkTable& ct, const TableLaunch& tl, at::TensorList params,
                 at::TensorList grads, at::TensorList bufs, const Hyper& h) {
  using A = dev::acc_t<T>;
  L->items = ct.items() + tl.item0;
  L->clusters = ct.clusters();
  L->members = ct.members();
  L->n_items = tl.item1 - tl.item0;
  auto& c = L->c;
  c.k = math::coefs<A>(h.lr, h.weight_decay, h.momentum, h.dampening, h.centripetal);
  c.f = math::Flags{h.weight_decay != 0.0, h.centripetal != 0.0, h.momentum != 0.0, h.first, h.nesterov};
  c.sign = static_cast<A>(h.maximize ? -1.0 : 1.0);
  for (size_t s = 0; s < tl.tensors.size(); ++s) {
    const int64_t i = tl.tensors[s];
    dev::Slot& slot = L->slots[s];
    slot.w = params[i].data_ptr();
    slot.g = grads[i].const_data_ptr();
    slot.b = c.f.mom ? bufs[i].data_ptr() : nullptr;
    const int64_t rows = params[i].dim() == 0 ? 1 : params[i].size(0);
    slot.cols = rows == 0 ? 0 : params[i].numel() / rows;
  }
}

// The indices of params grouped by dtype, in order of first appearance.
std::vector<std::vector<int64_t>> group_by_dtype(at::TensorList params);

// Every launch of a checked step through the CUDA kernel's device code (the CUDA backend and its emulation):
// the cached work table of each dtype group (all built, so every layout validated, before the first launch),
// then per launch its kernel parameters filled and `launch(const dev::Launch<T>&, int64_t grid)` called.
template <typename LaunchFn>
void run_work_tables(const StepArgs& a, const std::function<GridTarget(at::ScalarType)>& target,
                     const std::function<void()>& on_miss,
                     const std::function<at::Tensor(const at::Tensor&)>& upload, LaunchFn&& launch) {
  const auto groups = group_by_dtype(a.params);
  const auto tables = cached_work_tables(groups, a.params, a.layouts, a.geoms, target, on_miss, upload);
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const CachedWorkTable& ct = *tables[gi];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[groups[gi][0]].scalar_type(), "csgd_step_", [&] {
      for (const TableLaunch& tl : ct.host.launches) {
        auto L = std::make_unique<dev::Launch<scalar_t>>();
        fill_launch<scalar_t>(L.get(), ct, tl, a.params, a.grads, a.bufs, a.h);
        launch(*L, tl.grid);
      }
    });
  }
}

}  // namespace csgd_ext
