// CUDA kernel of csgd_ext::csgd_step_ (compiled only when torch is a CUDA build).
//
// Multi-tensor apply, as PyTorch's multi_tensor_apply / apex: the tensors of a step (grouped by dtype)
// are packed into a kernel-argument struct of pointers and sizes, together with a table that gives every
// CUDA block its work item, and launched in as few launches as the argument size allows. Nothing is
// copied host-to-device and nothing synchronises: the cluster layouts are device tensors cached by the
// Python side, their cluster counts are known on the host from the tensors' sizes.
//
// Work items: an unclustered tensor is cut into chunks of kChunk elements (elementwise SGD, grid-stride);
// a clustered tensor into (cluster range x column block) items. A thread owns one (cluster, column) pair:
// it sums g and w over the cluster's members in CSR order (fixed order, no atomics: deterministic), then
// writes every member's new weight and momentum buffer. Consecutive threads take consecutive columns of
// the same rows, so loads and stores coalesce. fp16/bf16 are computed in fp32; fp64 in fp64.
#include "csgd_step.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace csgd_ext {
namespace {

constexpr int kMaxTensors = 24;   // tensors per launch
constexpr int kMaxBlocks = 96;    // work items (CUDA blocks) per launch; keeps the argument struct < 4 KiB
constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per unclustered work item
constexpr int64_t kColBlock = 256; // columns per clustered work item
constexpr int64_t kItemElems = 65536;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct LaunchArgs {
  void* w[kMaxTensors];
  const void* g[kMaxTensors];
  void* b[kMaxTensors];
  const int64_t* lay[kMaxTensors];  // nullptr: unclustered
  int64_t rows[kMaxTensors];
  int64_t cols[kMaxTensors];
  int64_t clusters[kMaxTensors];
  // work item of each block: tensor slot; for a clustered tensor clusters [a0, a1) and column block j;
  // for an unclustered one elements [a0 * kChunk, min(numel, a1 * kChunk)).
  unsigned char slot[kMaxBlocks];
  int a0[kMaxBlocks];
  int a1[kMaxBlocks];
  int j[kMaxBlocks];
};
static_assert(sizeof(LaunchArgs) + 64 <= 4096, "kernel arguments must fit in 4 KiB");

template <typename A>
struct Coefs {
  A lr, wd, mom, damp1, cp, sign;
  bool momentum, first, nesterov;
};

template <typename T, typename A>
__device__ __forceinline__ void update(T* w, T* b, A d, A wj, const Coefs<A>& c) {
  if (c.momentum) {
    A bj = c.first ? d : c.mom * static_cast<A>(*b) + c.damp1 * d;
    *b = static_cast<T>(bj);
    d = c.nesterov ? d + c.mom * bj : bj;
  }
  *w = static_cast<T>(wj - c.lr * d);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) csgd_step_kernel(const LaunchArgs args,
                                                            const Coefs<acc_type<T>> c) {
  using A = acc_type<T>;
  const int item = blockIdx.x;
  const int t = args.slot[item];
  T* __restrict__ w = static_cast<T*>(args.w[t]);
  const T* __restrict__ g = static_cast<const T*>(args.g[t]);
  T* __restrict__ b = c.momentum ? static_cast<T*>(args.b[t]) : nullptr;
  const int64_t* __restrict__ lay = args.lay[t];
  const A wd = c.wd, cp = c.cp;
  if (lay == nullptr) {
    const int64_t numel = args.rows[t] * args.cols[t];
    const int64_t e0 = static_cast<int64_t>(args.a0[item]) * kChunk;
    const int64_t e1 = min(numel, static_cast<int64_t>(args.a1[item]) * kChunk);
    for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
      const A wj = static_cast<A>(w[e]);
      A d = c.sign * static_cast<A>(g[e]);
      if (wd != A(0)) d = d + wd * wj;
      update<T, A>(w + e, b == nullptr ? nullptr : b + e, d, wj, c);
    }
    return;
  }
  const int64_t cols = args.cols[t];
  const int64_t k = args.clusters[t];
  const int64_t* __restrict__ perm = lay + k + 1;
  const int64_t j0 = static_cast<int64_t>(args.j[item]) * kColBlock;
  const int64_t ncols = min(kColBlock, cols - j0);
  const int64_t c0 = args.a0[item];
  const int64_t pairs = (static_cast<int64_t>(args.a1[item]) - c0) * ncols;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t cl = c0 + p / ncols;
    const int64_t col = j0 + p % ncols;
    const int64_t m0 = lay[cl], m1 = lay[cl + 1];
    A sg = A(0), sw = A(0);
    for (int64_t q = m0; q < m1; ++q) {
      const int64_t o = perm[q] * cols + col;
      sg += static_cast<A>(g[o]);
      sw += static_cast<A>(w[o]);
    }
    const A size = static_cast<A>(m1 - m0);
    const bool single = (m1 - m0) == 1;
    const A mg = c.sign * (sg / size);
    const A mw = sw / size;
    for (int64_t q = m0; q < m1; ++q) {
      const int64_t o = perm[q] * cols + col;
      const A wj = static_cast<A>(w[o]);
      A d = single ? c.sign * static_cast<A>(g[o]) : mg;
      if (wd != A(0)) d = d + wd * wj;
      if (cp != A(0) && !single) d = d + cp * (wj - mw);
      update<T, A>(w + o, b == nullptr ? nullptr : b + o, d, wj, c);
    }
  }
}

template <typename T>
void launch_all(const std::vector<int64_t>& idx, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                const c10::List<std::optional<at::Tensor>>& layouts, const std::vector<Geom>& geoms,
                const Coefs<acc_type<T>>& c, cudaStream_t stream) {
  LaunchArgs args;
  int ntensors = 0, nblocks = 0;
  auto flush = [&]() {
    if (nblocks > 0) {
      csgd_step_kernel<T><<<nblocks, kThreads, 0, stream>>>(args, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ntensors = 0;
    nblocks = 0;
  };
  for (int64_t i : idx) {
    const Geom& geo = geoms[i];
    const int64_t numel = geo.rows * geo.cols;
    if (numel == 0) continue;
    if (ntensors == kMaxTensors) flush();
    const int s = ntensors++;
    args.w[s] = params[i].data_ptr();
    args.g[s] = grads[i].const_data_ptr();
    args.b[s] = c.momentum ? bufs[i].data_ptr() : nullptr;
    args.lay[s] = geo.clusters > 0 ? layouts.get(i)->const_data_ptr<int64_t>() : nullptr;
    args.rows[s] = geo.rows;
    args.cols[s] = geo.cols;
    args.clusters[s] = geo.clusters;
    auto add_item = [&](int64_t a0, int64_t a1, int64_t j) {
      if (nblocks == kMaxBlocks) {
        // keep the current tensor in the next launch: re-pack it as slot 0
        void* w = args.w[s];
        const void* g = args.g[s];
        void* b = args.b[s];
        const int64_t* l = args.lay[s];
        const int64_t r = args.rows[s], cc = args.cols[s], k = args.clusters[s];
        flush();
        ntensors = 1;
        args.w[0] = w; args.g[0] = g; args.b[0] = b; args.lay[0] = l;
        args.rows[0] = r; args.cols[0] = cc; args.clusters[0] = k;
      }
      const int slot = ntensors - 1;
      args.slot[nblocks] = static_cast<unsigned char>(slot);
      args.a0[nblocks] = static_cast<int>(a0);
      args.a1[nblocks] = static_cast<int>(a1);
      args.j[nblocks] = static_cast<int>(j);
      ++nblocks;
    };
    if (geo.clusters == 0) {
      const int64_t nchunks = (numel + kChunk - 1) / kChunk;
      for (int64_t a = 0; a < nchunks; ++a) add_item(a, a + 1, 0);
    } else {
      const int64_t avg = std::max<int64_t>(1, geo.rows / geo.clusters);
      const int64_t ncb = (geo.cols + kColBlock - 1) / kColBlock;
      const int64_t width = std::min(geo.cols, kColBlock);
      const int64_t per_item = std::max<int64_t>(1, kItemElems / (avg * width));
      for (int64_t c0 = 0; c0 < geo.clusters; c0 += per_item) {
        const int64_t c1 = std::min(geo.clusters, c0 + per_item);
        for (int64_t j = 0; j < ncb; ++j) add_item(c0, c1, j);
      }
    }
  }
  flush();
}

void csgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                    const c10::List<std::optional<at::Tensor>>& layouts, double lr, double weight_decay,
                    double momentum, double dampening, bool nesterov, bool maximize, double centripetal,
                    bool is_first_step) {
  if (params.empty()) return;
  const Hyper h{lr, weight_decay, momentum, dampening, centripetal, nesterov, maximize, is_first_step};
  const std::vector<Geom> geoms = check_step_args(params, grads, bufs, layouts, h, c10::DeviceType::CUDA);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].numel() < (int64_t(1) << 31) * kChunk, "csgd_step_: params[", i, "] is too large");
    TORCH_CHECK_VALUE(geoms[i].clusters < (int64_t(1) << 31), "csgd_step_: layouts[", i, "] has too many clusters");
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  // one launch sequence per dtype
  std::vector<at::ScalarType> dtypes;
  for (const auto& p : params) {
    if (std::find(dtypes.begin(), dtypes.end(), p.scalar_type()) == dtypes.end()) dtypes.push_back(p.scalar_type());
  }
  for (at::ScalarType dt : dtypes) {
    std::vector<int64_t> idx;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() == dt) idx.push_back(static_cast<int64_t>(i));
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "csgd_step_cuda", [&] {
      using A = acc_type<scalar_t>;
      Coefs<A> c;
      c.lr = static_cast<A>(lr);
      c.wd = static_cast<A>(weight_decay);
      c.mom = static_cast<A>(momentum);
      c.damp1 = static_cast<A>(1.0 - dampening);
      c.cp = static_cast<A>(centripetal);
      c.sign = static_cast<A>(maximize ? -1.0 : 1.0);
      c.momentum = momentum != 0.0;
      c.first = is_first_step;
      c.nesterov = nesterov;
      launch_all<scalar_t>(idx, params, grads, bufs, layouts, geoms, c, stream);
    });
  }
}

}  // namespace
}  // namespace csgd_ext

TORCH_LIBRARY_IMPL(csgd_ext, CUDA, m) { m.impl("csgd_step_", &csgd_ext::csgd_step_cuda); }
