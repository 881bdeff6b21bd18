// Schema of the C-SGD step op and the argument checks shared by every device kernel.
#include "csgd_step.h"

#include <torch/library.h>

#include <algorithm>
#include <string>

namespace csgd_ext {
namespace {

// A row-dense tensor stores row i (index i along axis 0) in the contiguous element range
// [i * cols, (i + 1) * cols); the order of elements inside a row is free (channels_last conv weights
// qualify). Dimensions of size 1 do not matter.
bool row_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) * t.size(0) == t.numel();
}

// Two tensors of the same shape visit memory in the same element order (strides agree on every
// dimension of size > 1).
bool same_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

std::string where(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

}  // namespace

std::vector<Geom> check_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  const c10::List<std::optional<at::Tensor>>& layouts, const Hyper& h,
                                  c10::DeviceType expected_device) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "csgd_step_: grads has ", grads.size(), " tensors but params has ", n);
  TORCH_CHECK_VALUE(layouts.size() == n, "csgd_step_: layouts has ", layouts.size(), " entries but params has ", n);
  const bool use_momentum = h.momentum != 0.0;
  TORCH_CHECK_VALUE(use_momentum ? bufs.size() == n : bufs.empty(), "csgd_step_: momentum_buffers has ",
                    bufs.size(), " tensors; expected ", use_momentum ? n : 0, " (one per param when momentum != 0, "
                    "none when momentum == 0)");
  TORCH_CHECK_VALUE(!h.nesterov || (use_momentum && h.dampening == 0.0),
                    "csgd_step_: nesterov requires momentum > 0 and zero dampening");
  std::vector<Geom> geoms(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(p.device().type() == expected_device, "csgd_step_: ", where("params", i), " is on ",
                      p.device(), " but this kernel runs on ", c10::DeviceTypeName(expected_device));
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "csgd_step_: ", where("params", i), " is on ", p.device(),
                      " but params[0] is on ", params[0].device(), "; all tensors of one call share a device");
    TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble ||
                         p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                     "csgd_step_: ", where("params", i), " has dtype ", p.scalar_type(),
                     "; supported: float32, float64, float16, bfloat16");
    TORCH_CHECK_VALUE(row_dense(p), "csgd_step_: ", where("params", i), " (shape ", p.sizes(), ", strides ",
                      p.strides(), ") is not row-dense: each output channel (index along axis 0) must be one "
                      "dense block of memory (contiguous and channels_last tensors are); pass a contiguous copy");
    TORCH_CHECK_VALUE(g.device() == p.device() && g.scalar_type() == p.scalar_type() && same_order(g, p),
                      "csgd_step_: ", where("grads", i), " (", g.scalar_type(), ", shape ", g.sizes(), ", strides ",
                      g.strides(), ", ", g.device(), ") must match ", where("params", i), " (", p.scalar_type(),
                      ", shape ", p.sizes(), ", strides ", p.strides(), ", ", p.device(), ")");
    if (use_momentum) {
      const at::Tensor& b = bufs[i];
      TORCH_CHECK_VALUE(b.device() == p.device() && b.scalar_type() == p.scalar_type() && same_order(b, p),
                        "csgd_step_: ", where("momentum_buffers", i), " (", b.scalar_type(), ", shape ", b.sizes(),
                        ", strides ", b.strides(), ") must match ", where("params", i), " (", p.scalar_type(),
                        ", shape ", p.sizes(), ", strides ", p.strides(), ")");
    }
    Geom& geo = geoms[i];
    geo.rows = p.dim() == 0 ? 1 : p.size(0);
    geo.cols = geo.rows == 0 ? 0 : p.numel() / geo.rows;
    const std::optional<at::Tensor> lay = layouts.get(i);
    if (lay.has_value()) {
      const at::Tensor& l = *lay;
      TORCH_CHECK_VALUE(p.dim() >= 1, "csgd_step_: ", where("params", i), " is 0-dim and cannot be clustered");
      TORCH_CHECK_VALUE(l.scalar_type() == at::kLong && l.dim() == 1 && l.is_contiguous() && l.device() == p.device(),
                        "csgd_step_: ", where("layouts", i), " must be a contiguous 1-D int64 tensor on ", p.device(),
                        " ([offsets | perm]), got ", l.scalar_type(), " of shape ", l.sizes(), " on ", l.device());
      const int64_t k = l.numel() - geo.rows - 1;
      TORCH_CHECK_VALUE(k >= (geo.rows > 0 ? 1 : 0) && k <= geo.rows, "csgd_step_: ", where("layouts", i), " has ",
                        l.numel(), " entries, which is not (clusters + 1) + rows for ", geo.rows,
                        " rows: was it built for another parameter?");
      geo.clusters = geo.rows == 0 ? 0 : k;
    }
  }
  return geoms;
}

namespace {

// off[0..k] strictly increasing (integer accumulators in registers: the loops vectorise).
bool offsets_increase(const int64_t* __restrict off, int64_t k) {
  int64_t bad = 0;
  for (int64_t c = 0; c < k; ++c) bad |= off[c + 1] <= off[c];
  return bad == 0;
}

// Every perm[q] in [0, rows), and together they mark every row of `mark` (rows bytes, zeroed).
bool marks_every_row(const int64_t* __restrict perm, int64_t rows, unsigned char* __restrict mark) {
  uint64_t out = 0;
  for (int64_t q = 0; q < rows; ++q) {
    const uint64_t r = static_cast<uint64_t>(perm[q]);
    const uint64_t here = r < static_cast<uint64_t>(rows);
    out |= here ^ 1;
    mark[here ? r : 0] = 1;
  }
  unsigned char all = 1;
  for (int64_t r = 0; r < rows; ++r) all &= mark[r];
  return out == 0 && all == 1;
}

}  // namespace

void validate_layout(const int64_t* lay, int64_t k, int64_t rows, int64_t i) {
  const int64_t* off = lay;
  const int64_t* perm = lay + k + 1;
  TORCH_CHECK_VALUE(off[0] == 0 && off[k] == rows, "csgd_step_: layouts[", i, "] offsets must start at 0 and end at ",
                    "the row count ", rows, " (got ", off[0], " and ", off[k], ")");
  TORCH_CHECK_VALUE(rows < (int64_t(1) << 31), "csgd_step_: params[", i, "] has too many rows (2^31 or more)");
  // the fast check, without data-dependent branches (a per-cluster member loop mispredicts its exit on every
  // cluster, which on norm-weight layouts cost as much as the step itself): offsets strictly increasing, every
  // row index in range, and every row marked. `rows` in-range indices that mark all `rows` rows are a
  // permutation, so marking needs stores only (no read-modify-write, no test per index). Only a layout that
  // fails is walked again below, cluster by cluster, for the first error in the order the message names.
  thread_local std::vector<unsigned char> seen;  // reused: one allocation per thread, not one per tensor and step
  seen.assign(rows, 0);
  const bool ok = offsets_increase(off, k) && marks_every_row(perm, rows, seen.data());
  if (ok) return;
  std::fill(seen.begin(), seen.end(), 0);
  for (int64_t c = 0; c < k; ++c) {
    TORCH_CHECK_VALUE(off[c + 1] > off[c], "csgd_step_: layouts[", i, "] offsets are not strictly increasing at cluster ",
                      c, " (", off[c], " then ", off[c + 1], ")");
    for (int64_t q = off[c]; q < off[c + 1]; ++q) {
      const int64_t r = perm[q];
      TORCH_CHECK_VALUE(r >= 0 && r < rows, "csgd_step_: layouts[", i, "] has row index ", r, " out of range [0, ",
                        rows, ")");
      TORCH_CHECK_VALUE(!seen[r], "csgd_step_: layouts[", i, "] lists row ", r, " twice: perm must be a permutation");
      seen[r] = 1;
    }
  }
}

}  // namespace csgd_ext

#define CSGD_STEP_ARGS                                                                                    \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] layouts, float lr, "    \
  "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, float centripetal, " \
  "bool is_first_step) -> ()"

TORCH_LIBRARY_FRAGMENT(csgd_ext, m) {
  // the step: CPU kernel (csgd_step_cpu.cpp) and CUDA kernel (csgd_step_cuda.cu)
  m.def("csgd_step_" CSGD_STEP_ARGS);
  // the CUDA kernel's device code run on CPU tensors (csgd_step_emulated.cpp): a testing backend
  m.def("csgd_step_cuda_emulated_" CSGD_STEP_ARGS);
}
