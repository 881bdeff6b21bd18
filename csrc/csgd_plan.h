// Launch planning of the CUDA C-SGD kernel (host side), shared by the CUDA backend, its CPU emulation
// ("cuda_emulated") and the performance model (benchmarks/perf_model.py, through the cuda_plan_stats op).
//
// A plan turns the tensors of one dtype (their geometry and cluster layouts) into a work table
// (csgd_device.h: items, a cluster table and a member table) and a list of launches (at most
// dev::kMaxSlots tensors each). It depends only on the shapes and layouts, so it is built once per set of
// layouts and cached: a step then only fills the kernel parameters (tensor addresses) and launches.
// Building it validates every layout (offsets from 0 to rows, strictly increasing; perm a permutation of the
// rows), so the kernel can trust the table.
#pragma once

#include "csgd_device.h"
#include "csgd_step.h"

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace csgd_ext {

// Where the plan will run: the grid is min(items, sm_count * blocks_per_sm).
struct PlanTarget {
  int64_t sm_count = 132;      // an H200 (the emulation's default)
  int64_t blocks_per_sm = 4;   // resident blocks of kThreads threads per multiprocessor
};

struct PlanLaunch {
  int64_t item0 = 0, item1 = 0;    // its items in the plan's item table
  int64_t grid = 0;                // blocks
  std::vector<int64_t> tensors;    // slot -> index into the tensors the plan was built for
};

struct Plan {
  std::vector<dev::Item> items;
  std::vector<dev::Cluster> clusters;
  std::vector<int32_t> members;
  std::vector<PlanLaunch> launches;
};

// Checks layout `i` ([offsets (k + 1) | perm (rows)], host memory): offsets from 0 to rows, strictly
// increasing; perm a permutation of the rows. Throws a ValueError naming layouts[i].
void validate_layout(const int64_t* lay, int64_t k, int64_t rows, int64_t i);

// Builds the plan of tensors `idx` (indices into geoms / host_layouts). host_layouts[i] points to the host
// copy of layout i ([offsets | perm], int64) or is nullptr for an unclustered tensor. Throws a clear
// ValueError on a malformed layout.
Plan build_plan(const std::vector<int64_t>& idx, const std::vector<Geom>& geoms,
                const std::vector<const int64_t*>& host_layouts, int64_t elem_size, const PlanTarget& target);

// build_plan for tensors and layouts on any device: the layouts are copied to the host first (a device-to-host
// copy when they live on a GPU).
Plan plan_from_tensors(const std::vector<int64_t>& idx, at::TensorList params,
                       const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
                       const PlanTarget& target);

// Statistics of a plan, as "key=value;..." (the performance model's input).
std::string plan_stats(const Plan& plan, const std::vector<Geom>& geoms, int64_t elem_size);

// A plan with its work table in one byte tensor on the device it runs on ([items | clusters | members]).
struct CachedPlan {
  Plan plan;
  at::Tensor table;
  std::vector<at::Tensor> layouts;  // kept alive, so a cache key's addresses cannot be reused by new layouts
  const dev::Item* items() const;
  const dev::Cluster* clusters() const;
  const int32_t* members() const;
};

// The cached plan of tensors `idx` of a step (one dtype), building it on a miss: the layouts are copied to
// the host (one device-to-host copy per new set of layouts, never per step), validated and planned, and the
// table is handed to `upload` (host byte tensor -> the same bytes on the tensors' device). `on_miss` runs
// before any of that (the CUDA backend refuses to build a plan while a CUDA graph is being captured).
std::shared_ptr<const CachedPlan> cached_plan(const std::vector<int64_t>& idx, at::TensorList params,
                                              const c10::List<std::optional<at::Tensor>>& layouts,
                                              const std::vector<Geom>& geoms, const PlanTarget& target,
                                              const std::function<void()>& on_miss,
                                              const std::function<at::Tensor(const at::Tensor&)>& upload);

// cached_plan for every dtype group of a step (group_by_dtype), all built before anything runs: every layout
// is validated before the first write. `target(dtype)` is where that dtype's kernel runs.
std::vector<std::shared_ptr<const CachedPlan>> cached_plans(
    const std::vector<std::vector<int64_t>>& groups, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
    const std::function<PlanTarget(at::ScalarType)>& target, const std::function<void()>& on_miss,
    const std::function<at::Tensor(const at::Tensor&)>& upload);

// Fills the kernel parameters of one launch: tensor addresses, row lengths, hyperparameters.
template <typename T>
void fill_launch(dev::Launch<T>* L, const CachedPlan& cp, const PlanLaunch& pl, at::TensorList params,
                 at::TensorList grads, at::TensorList bufs, const Hyper& h) {
  using A = dev::acc_t<T>;
  L->items = cp.items() + pl.item0;
  L->clusters = cp.clusters();
  L->members = cp.members();
  L->n_items = pl.item1 - pl.item0;
  auto& c = L->c;
  c.k = math::coefs<A>(h.lr, h.weight_decay, h.momentum, h.dampening, h.centripetal);
  c.f = math::Flags{h.weight_decay != 0.0, h.centripetal != 0.0, h.momentum != 0.0, h.first, h.nesterov};
  c.sign = static_cast<A>(h.maximize ? -1.0 : 1.0);
  for (size_t s = 0; s < pl.tensors.size(); ++s) {
    const int64_t i = pl.tensors[s];
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

}  // namespace csgd_ext
