// Check helpers for the C++ ops (CPU and CUDA glue). TOKENKERN_CHECK: a user-facing argument
// check, with the Python side's message form "tokenkern.<op>: <argument> must ..., got ...",
// raised as ValueError. TOKENKERN_ASSERT: an invariant of a private kernel op whose public op
// checks the arguments first (see merge_args.h), raised as RuntimeError.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace tokenkern {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

}  // namespace tokenkern

#define TOKENKERN_CHECK(op, cond, ...) TORCH_CHECK_VALUE(cond, "tokenkern." op ": ", __VA_ARGS__)
#define TOKENKERN_ASSERT(op, cond)                                                   \
  TORCH_CHECK(cond, "tokenkern::" op ": kernel invariant violated: " #cond           \
              " (a private kernel op: call the public op, which checks its arguments)")
