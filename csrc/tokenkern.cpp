// Every C++ op schema of the tokenkern namespace, in one place. Ops whose kernels are
// written in Python/Triton, and the public merge ops, are declared in tokenkern/ops/<family>.py
// with torch.library.custom_op.
#include <Python.h>
#include <torch/library.h>

#ifdef TOKENKERN_WITH_CUDA
constexpr long kWithCuda = 1;  // setup.py built the CUDA kernels (csrc/cuda/*_cuda.cu) into _C
#else
constexpr long kWithCuda = 0;
#endif

extern "C" {
// The extension is loaded for its op registrations; Python only needs a module object, whose
// WITH_CUDA attribute says whether the C++ CUDA kernels were built in.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "tokenkern C++/CUDA ops (see torch.ops.tokenkern)",
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(tokenkern, m) {
  // Private CPU kernel of the public op tokenkern::topk_gather (a custom op in
  // tokenkern/ops/select.py, the single source of its argument checks).
  // scores: (B, N) float32, x: (B, N, D) -> kept (B, k, D), indices (B, k) int64 ascending.
  m.def("_topk_gather_kernel(Tensor scores, Tensor x, int k) -> (Tensor kept, Tensor indices)");
  // Private kernels of the public ops tokenkern::merge_tokens and tokenkern::bipartite_merge
  // (custom ops in tokenkern/ops/merge.py, the single source of their argument and value checks;
  // these kernels assert only the invariants of csrc/merge_args.h).
  // x: (B, N, D), keep_idx: (B, K) ascending -> merged (B, K, D), mass (B, K) float32.
  m.def(
      "_merge_tokens_kernel(Tensor x, Tensor keep_idx, Tensor? metric, Tensor? weight, int topm, "
      "float temperature, str combine, Tensor? query_metric, str assign) -> (Tensor merged, Tensor mass)");
  // ToMe bipartite soft matching: x, metric: (B, N, *) -> merged (B, N - r, D), size (B, N - r) float32.
  m.def(
      "_bipartite_merge_kernel(Tensor x, Tensor metric, int r, Tensor? size, bool protect_first) "
      "-> (Tensor merged, Tensor size)");
  // Private CPU ops for the static kernel report: the launch plan the CUDA merge launchers follow
  // (csrc/common/merge_plan.h) -> (7, 7) int64 rows (kernel id, grid x, y, z, threads, dynamic
  // shared bytes, chunks), unused rows with kernel id -1 (csrc/cpu/merge_plan_cpu.cpp).
  m.def(
      "_merge_tokens_launch_plan(int batch, int n, int d, int k, int c, int topm, bool kept_mode, bool cosine) "
      "-> Tensor");
  m.def("_bipartite_merge_launch_plan(int batch, int n, int d, int c, int r) -> Tensor");
  // Private CPU kernels of the diversity ops (custom ops in tokenkern/ops/diversity.py, the single
  // source of their argument and value checks; csrc/cpu/diversity_cpu.cpp): the greedy loops over
  // float32 cosine similarities sim (B, N, N) (exactly symmetric, S_ii = 1), mask (B, N) bool ->
  // (B, k) int64 ascending; x (B, N, D) float32/float16/bfloat16 -> that sim.
  m.def("_cosine_sim_kernel(Tensor x) -> Tensor");
  m.def("_maxmin_select_kernel(Tensor sim, Tensor? mask, int k) -> Tensor");
  m.def("_dpp_select_kernel(Tensor sim, Tensor relevance, Tensor? mask, int k) -> Tensor");
  m.def("_mmr_select_kernel(Tensor sim, Tensor importance, Tensor? mask, int k, float lam) -> Tensor");
  // sim (B, P, L): each pivot's cosine with every token, candidates (B, L) bool -> (B, P * per_pivot).
  m.def("_pivot_select_kernel(Tensor sim, Tensor candidates, int per_pivot) -> Tensor");
  // Private CPU kernel of attn_scores for few queries per key head (custom ops in
  // tokenkern/ops/attention.py, the single source of the argument checks; tokenkern/_cpu/attention.py
  // routes the calls; csrc/cpu/attention_cpu.cpp). q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d),
  // lse (B, Hq, Nq) float32; key j is visible to query i iff j <= i + causal_offset (None: all)
  // -> (B, key_end - key_start) float32.
  m.def(
      "_attn_scores_kernel(Tensor q, Tensor k, Tensor? lse, float scale, int key_start, int key_end, "
      "Tensor? query_mask, Tensor? key_mask, int? causal_offset, bool mean) -> Tensor");
}
