// The CPU kernel's compute code, as seen by its ATen glue (csgd_step_cpu.cpp).
//
// The code itself (csgd_cpu_kernel_impl.h) is compiled twice, each copy in its own namespace:
//   cpu_avx2  (csgd_cpu_avx2.cpp)  with AVX2 and FMA enabled for its functions only (#pragma GCC target);
//   cpu_base  (csgd_cpu_base.cpp)  with the build's own flags (baseline x86-64 in a portable build).
// The glue picks one at run time from the CPU's features (pick_isa), so a portable build
// (CSGD_EXT_NATIVE_ARCH=0) still runs hardware fused multiply-adds on any AVX2+FMA CPU, and both copies
// compute the same bits (csgd_math.h: one rounding per fmadd, in hardware or in the library call).
// No ATen here: plain pointers and sizes.
#pragma once

#include <cstdint>

namespace csgd_ext {
namespace cpu {

// A unit of work: an unclustered tensor's flat element range, or a clustered tensor's clusters x columns.
struct Tile {
  int32_t t;        // tensor index
  bool clustered;
  int64_t a0, a1;   // flat element range (unclustered) or cluster range (clustered)
  int64_t j0, j1;   // column range (clustered)
};

struct Tensor {
  void* w;
  const void* g;
  void* b;              // momentum buffer (nullptr without momentum)
  const int64_t* lay;   // [offsets (clusters + 1) | perm (rows)], validated; nullptr when unclustered
  const int64_t* order; // the clusters in visiting order (nullptr: layout order)
  int64_t rows, cols, clusters;
};

enum class Dtype : int32_t { f32, f64, f16, bf16 };

struct Job {
  const Tensor* tensors;
  Dtype dtype;
  double lr, weight_decay, momentum, dampening, centripetal;
  bool nesterov, maximize, first;
};

// Runs one tile of a job (the instantiation for the job's dtype and flags).
using TileFn = void (*)(const Job&, const Tile&);

namespace cpu_avx2 {
TileFn pick(const Job& job);
}
namespace cpu_base {
TileFn pick(const Job& job);
}

enum class Isa : int32_t { base, avx2 };

// The copy this CPU runs: avx2 when it has AVX2 and FMA, unless CSGD_EXT_CPU_ISA=base forces the baseline
// copy (tests compare the two). Read once per process.
Isa pick_isa();
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace csgd_ext
