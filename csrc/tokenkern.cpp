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
  // x: (B, N, D), keep_idx: (B, K) ascending -> merged (B, K, D), mass (B, K) float32.
  m.def(
      "merge_tokens(Tensor x, Tensor keep_idx, Tensor? metric=None, Tensor? weight=None, int topm=1, "
      "float temperature=0.0, str combine=\"mean\", Tensor? query_metric=None, str assign=\"dropped\") "
      "-> (Tensor merged, Tensor mass)");
  // ToMe bipartite soft matching: x, metric: (B, N, *) -> merged (B, N - r, D), size (B, N - r) float32.
  m.def(
      "bipartite_merge(Tensor x, Tensor metric, int r, Tensor? size=None, bool protect_first=False) "
      "-> (Tensor merged, Tensor size)");
}
