// The CPU kernel's AVX2 + FMA copy (csgd_cpu_kernel.h): its functions are compiled for AVX2 and FMA whatever
// the build's flags, and csgd_step_cpu.cpp runs it only on CPUs that have both. Everything included before the
// pragma keeps the build's flags.
#include "csgd_cpu_kernel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <utility>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
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
