// The "cuda_emulated" backend: the CUDA kernel's own device code (csgd_device.h), built for the host and run
// on CPU tensors. It uses the real work table and launches (csgd_worktable.cpp) and walks every block of
// every launch, every item of a block in grid-stride order, and every thread of the block in order, one phase
// at a time (a phase ends where the device kernel has a barrier). It exists so that CI checks what the GPU
// kernel computes; it is slow and not meant for training.
//
// Also here, for tests and the performance model:
//   cuda_emulated_trace_writes(bool on)               start (or stop) counting every element the emulation
//                                                     writes
//   cuda_emulated_write_counts(Tensor[] ts)           per-element write counts (int32, shaped like each tensor)
//   cuda_emulated_set_target(sms, bps)                the emulated GPU's multiprocessors and resident blocks per
//                                                     multiprocessor (default: an H200, 132 x 4); a small grid
//                                                     makes every block walk many items
//   cuda_work_table_stats(params, layouts, sms, bps)  the work table's statistics per dtype group
//                                                     ("key=value;...")
#include "csgd_worktable.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <unordered_map>

namespace csgd_ext {
namespace {

std::mutex g_target_mutex;
GridTarget g_target;  // the emulated GPU

void set_target(int64_t sm_count, int64_t blocks_per_sm) {
  TORCH_CHECK_VALUE(sm_count > 0 && blocks_per_sm > 0, "cuda_emulated_set_target: both must be > 0");
  std::lock_guard<std::mutex> lock(g_target_mutex);
  g_target = GridTarget{sm_count, blocks_per_sm};
}

GridTarget target() {
  std::lock_guard<std::mutex> lock(g_target_mutex);
  return g_target;
}

std::mutex g_trace_mutex;
std::unordered_map<uintptr_t, int32_t> g_writes;  // element address -> stores seen

void count_store(const void* p, int bytes, int elem_bytes) {
  std::lock_guard<std::mutex> lock(g_trace_mutex);
  for (int o = 0; o < bytes; o += elem_bytes) g_writes[reinterpret_cast<uintptr_t>(p) + o] += 1;
}

void trace_writes(bool on) {
  std::lock_guard<std::mutex> lock(g_trace_mutex);
  g_writes.clear();
  dev::store_hook() = on ? &count_store : nullptr;
}

std::vector<at::Tensor> write_counts(at::TensorList ts) {
  std::lock_guard<std::mutex> lock(g_trace_mutex);
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "cuda_emulated_write_counts: tensors must be on the CPU");
    at::Tensor c = at::zeros(t.sizes(), t.options().dtype(at::kInt));
    // element e of t (in t's memory order) counts at address data + e * itemsize: map through the strides
    at::Tensor offsets = at::zeros(t.sizes(), t.options().dtype(at::kLong));
    for (int64_t d = 0; d < t.dim(); ++d) {
      std::vector<int64_t> shape(t.dim(), 1);
      shape[d] = t.size(d);
      offsets = offsets + at::arange(t.size(d), at::kLong).mul(t.stride(d)).view(shape);
    }
    const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const int64_t* off = offsets.contiguous().const_data_ptr<int64_t>();
    int32_t* cp = c.data_ptr<int32_t>();
    for (int64_t e = 0; e < t.numel(); ++e) {
      const auto it = g_writes.find(base + static_cast<uintptr_t>(off[e] * t.element_size()));
      cp[e] = it == g_writes.end() ? 0 : it->second;
    }
    out.push_back(c);
  }
  return out;
}

// One launch: blocks in order; each block's items in grid-stride order; each phase for every thread.
template <typename T>
void emulate_launch(const dev::Launch<T>& L, int64_t grid) {
  auto sm = std::make_unique<dev::Smem<T>>();
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t i = block; i < L.n_items; i += grid) {
      const dev::Item it = L.items[i];
      const int phases = dev::item_phases<T>(L, it);
      for (int ph = 0; ph < phases; ++ph) {
        for (int tid = 0; tid < dev::kThreads; ++tid) dev::run_item<T>(L, it, ph, tid, sm.get());
      }
    }
  }
}

void run_emulated(const StepArgs& a) {
  const GridTarget t = target();
  run_work_tables(
      a, [&](at::ScalarType) { return t; }, [] {}, [](const at::Tensor& bytes) { return bytes; },
      [](const auto& L, int64_t grid) { emulate_launch(L, grid); });
}

std::vector<std::string> cuda_work_table_stats(at::TensorList params,
                                               const c10::List<std::optional<at::Tensor>>& layouts, int64_t sm_count,
                                               int64_t blocks_per_sm) {
  TORCH_CHECK_VALUE(sm_count > 0 && blocks_per_sm > 0,
                    "cuda_work_table_stats: sm_count and blocks_per_sm must be > 0");
  const Hyper h{0.0, 0.0, 0.0, 0.0, 0.0, false, false, false};
  const std::vector<Geom> geoms =
      params.empty() ? std::vector<Geom>{} : check_step_args(params, params, {}, layouts, h, params[0].device().type());
  std::vector<std::string> out;
  for (const std::vector<int64_t>& idx : group_by_dtype(params)) {
    const WorkTable t = work_table_from_tensors(idx, params, layouts, geoms, GridTarget{sm_count, blocks_per_sm});
    const int64_t esize = params[idx[0]].element_size();
    out.push_back("dtype=" + std::string(c10::toString(params[idx[0]].scalar_type())) + ";" +
                  work_table_stats(t, geoms, esize));
  }
  return out;
}

}  // namespace
}  // namespace csgd_ext

TORCH_LIBRARY_FRAGMENT(csgd_ext, m) {
  m.def("cuda_emulated_trace_writes(bool on) -> ()", &csgd_ext::trace_writes);
  m.def("cuda_emulated_set_target(int sm_count, int blocks_per_sm) -> ()", &csgd_ext::set_target);
  m.def("cuda_emulated_write_counts(Tensor[] tensors) -> Tensor[]", &csgd_ext::write_counts);
  m.def("cuda_work_table_stats(Tensor[] params, Tensor?[] layouts, int sm_count, int blocks_per_sm) -> str[]",
        &csgd_ext::cuda_work_table_stats);
}

TORCH_LIBRARY_IMPL(csgd_ext, CPU, m) {
  m.impl("csgd_step_cuda_emulated_", &csgd_ext::step_entry<c10::DeviceType::CPU, &csgd_ext::run_emulated>);
}
