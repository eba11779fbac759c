// Module entry point of alterops._C. Loading the shared library runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every op family's file
// (csrc/cpu/*.cpp, csrc/cuda/*.cpp); this file only gives Python something to import.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "alterops compiled kernels (ops live in torch.ops.alterops)", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef ALTEROPS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  // The SIMD path the CPU kernels were compiled for (they choose it from -march at build time).
#if defined(__AVX512F__)
  PyModule_AddStringConstant(m, "CPU_SIMD", "avx512");
#elif defined(__AVX2__) && defined(__FMA__)
  PyModule_AddStringConstant(m, "CPU_SIMD", "avx2");
#else
  PyModule_AddStringConstant(m, "CPU_SIMD", "generic");
#endif
  return m;
}
}
