// Every C++ op schema of the tokenkern namespace, in one place. Ops whose kernels are
// written in Python/Triton are declared in tokenkern/ops.py with torch.library.custom_op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The extension is loaded for its op registrations; Python only needs a module object.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "tokenkern C++/CUDA ops (see torch.ops.tokenkern)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tokenkern, m) {
  // scores: (B, N) float32, x: (B, N, D) -> kept (B, k, D), indices (B, k) int64 ascending.
  m.def("topk_gather(Tensor scores, Tensor x, int k) -> (Tensor kept, Tensor indices)");
}
