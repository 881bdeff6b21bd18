// The CPU kernel's baseline copy (csgd_cpu_kernel.h): the build's own flags (baseline x86-64 in a portable
// build, where its fused multiply-adds are the correctly rounded library call), for CPUs without AVX2 + FMA.
#define CSGD_CPU_NS cpu_base
#define CSGD_CPU_FMA 0
#include "csgd_cpu_kernel_impl.h"
