// Python module entry point and build information for csgd_ext._C.
//
// The C-SGD ops themselves are registered with TORCH_LIBRARY in their own files; importing the module
// (csgd_ext._C) is what loads those registrations into torch.ops.csgd_ext.
#include <torch/library.h>
#include <Python.h>

#include <string>

#ifndef CSGD_EXT_WITH_CUDA
#define CSGD_EXT_WITH_CUDA 0
#endif

namespace csgd_ext {

std::string build_info() {
  std::string s;
  s += "cuda=" + std::to_string(CSGD_EXT_WITH_CUDA);
#ifdef _OPENMP
  s += ";openmp=" + std::to_string(_OPENMP);
#else
  s += ";openmp=0";
#endif
#if defined(__AVX512F__)
  s += ";simd=avx512";
#elif defined(__AVX2__)
  s += ";simd=avx2";
#elif defined(__SSE2__)
  s += ";simd=sse2";
#else
  s += ";simd=none";
#endif
#ifdef __VERSION__
  s += std::string(";compiler=") + __VERSION__;
#endif
  return s;
}

}  // namespace csgd_ext

TORCH_LIBRARY_FRAGMENT(csgd_ext, m) {
  m.def("build_info() -> str", &csgd_ext::build_info);
}

// A plain C module with no methods: the registrations above run when the shared library is loaded.
static struct PyModuleDef csgd_ext_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&csgd_ext_module); }
