// Shared declarations of the csgd_ext::csgd_step_ op: its one entry point (step_entry), argument checks and
// per-tensor geometry, used by the CPU (csgd_step_cpu.cpp) and CUDA (csgd_step_cuda.cu) kernels and by the CUDA
// kernel's emulation (csgd_step_emulated.cpp).
//
// Op (registered in csgd_step.cpp):
//   csgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] layouts,
//              float lr, float weight_decay, float momentum, float dampening, bool nesterov,
//              bool maximize, float centripetal, bool is_first_step) -> ()
//
// layouts[i] is None (plain SGD on params[i]) or the cached "native" form of a ClusterLayout: one 1-D
// int64 tensor  [offsets (k + 1) | perm (n)]  on the parameter's device, n = params[i].size(0). Cluster c
// is rows perm[offsets[c] : offsets[c + 1]]; k is recovered on the host from the tensor's numel, so no
// device-to-host copy is ever needed. momentum_buffers is empty when momentum == 0; otherwise one buffer
// per param, overwritten with the new buffer when is_first_step (its old contents are ignored).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace csgd_ext {

struct Hyper {
  double lr, weight_decay, momentum, dampening, centripetal;
  bool nesterov, maximize, first;
};

// Geometry of one tensor of the step: a [rows x cols] matrix whose rows (axis 0) are dense blocks.
struct Geom {
  int64_t rows = 0;      // params[i].size(0) (1 for a 0-dim tensor)
  int64_t cols = 0;      // numel / rows
  int64_t clusters = 0;  // 0 = unclustered (plain SGD over the flat range)
};

// Checks every argument (lengths, devices, dtypes, strides, layout sizes) and returns each tensor's
// geometry. Errors name the offending list and index.
std::vector<Geom> check_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  const c10::List<std::optional<at::Tensor>>& layouts, const Hyper& h,
                                  c10::DeviceType expected_device);

// Checks layout `i` ([offsets (k + 1) | perm (rows)], host memory): offsets from 0 to rows, strictly
// increasing; perm a permutation of the rows. Throws a ValueError naming layouts[i].
void validate_layout(const int64_t* lay, int64_t k, int64_t rows, int64_t i);

// A checked, non-empty step: what a kernel's body runs from.
struct StepArgs {
  at::TensorList params, grads, bufs;
  const c10::List<std::optional<at::Tensor>>& layouts;
  Hyper h;
  std::vector<Geom> geoms;  // check_step_args's
};

// The one entry point of every csgd_step_ kernel (CPU, CUDA, the CUDA kernel's emulation), registered as
// m.impl(name, &step_entry<device type, body>): an empty step does nothing; otherwise every argument is
// checked (check_step_args, for a kernel on `Device`) before `Body` runs.
template <c10::DeviceType Device, void (*Body)(const StepArgs&)>
void step_entry(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                const c10::List<std::optional<at::Tensor>>& layouts, double lr, double weight_decay, double momentum,
                double dampening, bool nesterov, bool maximize, double centripetal, bool is_first_step) {
  if (params.empty()) return;
  const Hyper h{lr, weight_decay, momentum, dampening, centripetal, nesterov, maximize, is_first_step};
  Body(StepArgs{params, grads, bufs, layouts, h, check_step_args(params, grads, bufs, layouts, h, Device)});
}

}  // namespace csgd_ext
