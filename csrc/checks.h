// Argument checks shared by the public ops. Every message names the op, the argument, what was
// expected and what was given, so a user can fix the call without reading the source.
#pragma once
#include <ATen/ATen.h>
#include <sstream>
#include <string>

namespace manifold_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

#define MX_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

inline at::ScalarType opmath_type(at::ScalarType t) {
  return (t == at::kDouble) ? at::kDouble : at::kFloat;
}

void check_interp_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& coeffs);

void check_target(const char* op, const at::Tensor& target, int64_t B, int64_t N, int64_t C,
                  bool single, const at::Device& device);

// Materialised logits: (B, N, classes) or (N, classes), floating point.
void check_logits(const char* op, const at::Tensor& logits);

// A backward op's gradient or saved input: on `device`, floating point, `numel` elements
// (`shape` names the expected shape in the message; a negative `numel`: the caller checks the shape).
void check_grad_input(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                      const char* shape, const at::Device& device);

}  // namespace manifold_ext
