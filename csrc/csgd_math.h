// The SGD / C-SGD update arithmetic of one element, written once for every native path:
//
// * the CPU kernel (csgd_cpu_kernel.h), on scalars and on 8-wide fp32 vectors;
// * the CUDA device code (csgd_device.h), on the GPU and in its host emulation (cuda_emulated);
// * the Triton kernels (csgd_ext/ops/triton_kernels.py) mirror it operation for operation with tl.fma.
//
// csgd_ext/ops/reference.py is the spec of the rule; this file fixes its rounding. It is torch.optim.SGD's
// own arithmetic: ATen's SGD (single-tensor, foreach and fused: they agree bitwise on AVX2/AVX-512 CPUs and
// on CUDA) rounds a fused multiply-add once at exactly these places, and so does this code:
//
//   maximize        d = -g                                  (exact)
//   weight decay    d = fma(w, wd, d)                       grad.add(param, alpha=weight_decay)
//   centripetal     d = fma(fma(sum_w, -1/size, w), cp, d)  (C-SGD's own term: clustered rows only; w minus
//                                                           the cluster's mean weight, rounded once)
//   momentum        b = fma(d, 1 - dampening, b * mom)      buf.mul_(momentum).add_(grad, alpha=1 - dampening)
//   nesterov        d = fma(b, mom, d)                      grad.add(buf, alpha=momentum)
//   parameter       w = fma(d, -lr, w)                      param.add_(grad, alpha=-lr)
//
// Every product that meets a sum is written as an explicit fmadd() (std::fma semantics: one rounding), and
// no other product meets a sum (a compiler may contract across statements: the mean weight is therefore never
// formed as a product and then subtracted; the mean gradient only ever enters an fmadd() as an operand), so
// the result does not depend on the compiler's contraction flags in either direction. fmadd() is the hardware instruction where the target has one (CUDA always; the CPU kernel's
// AVX2+FMA variant, picked at run time); on a host target without FMA it is the correctly rounded library
// call, slower but the same bits.
//
// V is the compute type: float, double, or a vector type with +, -, * and an fmadd() overload found by
// argument-dependent lookup (the CPU kernel's 8-wide fp32 vector).
#pragma once

#if defined(__CUDACC__)
#define CSGD_MATH_HD __host__ __device__ __forceinline__
#else
// internal linkage: the CPU kernel is compiled once per instruction set, and each copy must keep its own
// (an FMA-instruction fmadd must never be linked into the baseline copy)
#define CSGD_MATH_HD static inline __attribute__((always_inline))
#endif

namespace csgd_ext {
namespace math {

CSGD_MATH_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

CSGD_MATH_HD double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// Which terms of the rule are on. Callers with compile-time flags pass a constant: the branches fold.
struct Flags {
  bool wd, cp, mom, first, nesterov;
};

// The hyperparameters in the compute type (lr negated: -lr is exact).
template <typename V>
struct Coefs {
  V neg_lr, wd, mom, damp1, cp;  // damp1 = 1 - dampening (formed in double, then rounded, as torch does)
};

// One element: `d` is the direction so far (the row's gradient, or its cluster's mean gradient, with the
// maximize sign applied: a product that only ever enters an fmadd() as an operand), `w` the weight, `sw` the
// cluster's sum of weights and `ninv` = -1/size (used when CLUSTER and f.cp), `bold` the old momentum buffer
// (unused on the first step). Returns the new weight; writes the new buffer to *bnew when f.mom.
template <bool CLUSTER, typename V>
CSGD_MATH_HD V update(V w, V d, V sw, V ninv, V bold, V* bnew, const Flags& f, const Coefs<V>& c) {
  if (f.wd) d = fmadd(w, c.wd, d);
  if (CLUSTER && f.cp) d = fmadd(fmadd(sw, ninv, w), c.cp, d);
  if (f.mom) {
    const V b = f.first ? d : fmadd(d, c.damp1, bold * c.mom);
    *bnew = b;
    d = f.nesterov ? fmadd(b, c.mom, d) : b;
  }
  return fmadd(d, c.neg_lr, w);
}

// The coefficients from the op's double arguments, rounded to the compute type once.
template <typename A>
CSGD_MATH_HD Coefs<A> coefs(double lr, double weight_decay, double momentum, double dampening,
                            double centripetal) {
  return Coefs<A>{static_cast<A>(-lr), static_cast<A>(weight_decay), static_cast<A>(momentum),
                  static_cast<A>(1.0 - dampening), static_cast<A>(centripetal)};
}

}  // namespace math
}  // namespace csgd_ext
