// The CPU kernel's AVX2 + FMA copy (csgd_cpu_kernel.h): its functions are compiled for AVX2 and FMA whatever
// the build's flags, and csgd_step_cpu.cpp runs it only on CPUs that have both. Everything included before the
// pragma keeps the build's flags.
//
// prefer-vector-width=256: the compiler's own vector loops (the unclustered update, singleton rows, tails) use
// 256-bit registers even where the build allows AVX-512, as ATen's fused SGD loop does on the development VM (an
// AMD Zen 4). There the same loop in 512-bit registers took 1.054x [1.048 to 1.061] the time of torch._fused_sgd_
// on the same tensors, and 0.988x [0.978 to 0.992] in 256-bit ones (ResNet-50's shapes, one thread, 5 processes:
// python benchmarks/step/flat_vs_aten.py). The cluster walk's explicit 16-column vectors (kW in
// csgd_cpu_kernel_impl.h) are not affected. benchmarks/step/kernel_ab.cpp compiles the kernel under the same
// pragma (test_benchmarks_smoke.py checks that they agree).
#include "csgd_cpu_kernel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <utility>

#pragma GCC push_options
#pragma GCC target("avx2,fma,prefer-vector-width=256")
#define CSGD_CPU_NS cpu_avx2
#define CSGD_CPU_FMA 1
#include "csgd_cpu_kernel_impl.h"
#pragma GCC pop_options

#else
// not x86: one copy only
namespace csgd_ext {
namespace cpu {
namespace cpu_avx2 {
TileFn pick(const Job& job) { return cpu_base::pick(job); }
}  // namespace cpu_avx2
}  // namespace cpu
}  // namespace csgd_ext
#endif
