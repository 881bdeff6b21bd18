// CUDA kernel of csgd_ext::csgd_step_ (compiled only when torch is a CUDA build).
//
// Designed from a byte count: a C-SGD step with momentum must read w, g and b and write w and b once, like
// fused SGD (20 bytes per fp32 element), so the kernel is a streaming kernel and everything else is overhead
// to keep small:
// * one work table per set of layouts (csgd_worktable.cpp), built on the host once, uploaded without a sync and
//   cached; a step fills the kernel parameters (up to dev::kMaxSlots tensor addresses in 32 KB) and launches
//   one persistent grid per dtype (more launches only past kMaxSlots tensors). No per-step host work grows
//   with the number of clusters, nothing is allocated and nothing synchronises: a step can be captured in a
//   CUDA graph once its work table is cached (run one step before capturing);
// * the grid is sized from the multiprocessor count and the kernel's occupancy; blocks walk the items in
//   grid-stride order (costliest items first, so blocks finish together);
// * 16-byte loads and stores, several in flight per thread (csgd_device.h has the per-thread code, which
//   the cuda_emulated backend runs on the CPU in CI).
// Built without --use_fast_math: IEEE arithmetic. The update of one element is csgd_math.h's (explicit fused
// multiply-adds where torch's SGD fuses), so unclustered tensors get torch's fused SGD's bits and clusters the
// CPU kernel's wherever the summation order is the same.
#include "csgd_worktable.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <utility>

namespace csgd_ext {
namespace {

static_assert(sizeof(dev::Launch<double>) <= 32764 || dev::kMaxSlots < 200, "kernel parameters over 32 KB");

// Resident blocks per multiprocessor of the kernel for T on the current device (asked once per device).
template <typename T>
GridTarget target_for(int device) {
  static std::mutex mu;
  static std::map<int, GridTarget> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dev::csgd_step_kernel<T>, dev::kThreads, 0));
  GridTarget t{sms, std::max(1, per_sm)};
  known.emplace(device, t);
  return t;
}

template <typename T>
void launch_kernel(const dev::Launch<T>& L, int64_t grid, cudaStream_t stream) {
  dev::csgd_step_kernel<T><<<static_cast<unsigned>(grid), dev::kThreads, 0, stream>>>(L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_cuda(const StepArgs& a) {
  const c10::Device device = a.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto on_miss = [] {
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "csgd_step_: these cluster layouts have no cached work table yet, and building one needs a "
                "device-to-host copy, which a CUDA graph capture forbids: run one optimizer step before capturing");
  };
  auto upload = [&](const at::Tensor& bytes) {
    at::Tensor d = at::empty(bytes.sizes(), bytes.options().device(device));
    d.copy_(bytes.pin_memory(), /*non_blocking=*/true);  // the pinned source lives until the copy is done
    return d;
  };
  auto target = [&](at::ScalarType dt) {
    GridTarget t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "csgd_grid_target",
                                    [&] { t = target_for<scalar_t>(device.index()); });
    return t;
  };
  run_work_tables(a, target, on_miss, upload, [&](const auto& L, int64_t grid) { launch_kernel(L, grid, stream); });
}

}  // namespace
}  // namespace csgd_ext

TORCH_LIBRARY_IMPL(csgd_ext, CUDA, m) {
  m.impl("csgd_step_", &csgd_ext::step_entry<c10::DeviceType::CUDA, &csgd_ext::run_cuda>);
}
