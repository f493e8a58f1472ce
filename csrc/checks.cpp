#include "checks.h"

namespace manifold_ext {

static void check_dtype_device(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& ref) {
  MX_CHECK(t.scalar_type() == ref.scalar_type(), op, "expected ", name, " to have dtype ",
           ref.scalar_type(), " (the dtype of x), but got ", t.scalar_type());
  MX_CHECK(t.device() == ref.device(), op, "expected ", name, " on device ", ref.device(),
           " (the device of x), but got ", t.device());
}

static void check_supported_dtype(const char* op, const at::Tensor& x) {
  const auto dt = x.scalar_type();
  if (x.is_cuda()) {
    MX_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
             "expected x to have dtype float32, float64, float16 or bfloat16 on CUDA, but got ", dt);
  } else {
    MX_CHECK(dt == at::kFloat || dt == at::kDouble, op, "expected x to have dtype float32 or ",
             "float64 on ", x.device(), ", but got ", dt);
  }
}

void check_interp_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& coeffs) {
  MX_CHECK(weight.dim() == 3, op, "expected weight to have shape (K, out, in), but got shape ",
           shape_str(weight));
  const int64_t K = weight.size(0), out = weight.size(1), in = weight.size(2);
  MX_CHECK(K >= 1, op, "expected weight to hold at least one vertex (K >= 1), but got shape ",
           shape_str(weight));
  MX_CHECK(coeffs.dim() == 1 || coeffs.dim() == 2, op,
           "expected coeffs to have shape (B, K) or (K,), but got shape ", shape_str(coeffs));
  MX_CHECK(coeffs.size(-1) == K, op, "expected coeffs to have shape (B, K) with K = ", K,
           " (the vertices in weight), but got shape ", shape_str(coeffs));
  MX_CHECK(at::isFloatingType(coeffs.scalar_type()), op,
           "expected coeffs to have a floating-point dtype, but got ", coeffs.scalar_type());
  MX_CHECK(coeffs.device() == x.device(), op, "expected coeffs on device ", x.device(),
           " (the device of x), but got ", coeffs.device());
  check_dtype_device(op, "weight", weight, x);
  check_supported_dtype(op, x);
  if (coeffs.dim() == 1) {
    MX_CHECK(x.dim() == 2, op, "expected x to have shape (N, in) = (N, ", in,
             ") for coeffs of shape (K,), but got shape ", shape_str(x));
  } else {
    MX_CHECK(x.dim() == 2 || x.dim() == 3, op, "expected x to have shape (B, N, in) = (",
             coeffs.size(0), ", N, ", in, ") or (N, in) = (N, ", in, "), but got shape ",
             shape_str(x));
    if (x.dim() == 3) {
      MX_CHECK(x.size(0) == coeffs.size(0), op, "expected x to have shape (B, N, in) with B = ",
               coeffs.size(0), " (the rows of coeffs), but got shape ", shape_str(x));
    }
  }
  MX_CHECK(x.size(-1) == in, op, "expected the last dimension of x to be in = ", in,
           " (weight has shape ", shape_str(weight), "), but got x of shape ", shape_str(x));
  if (bias.has_value() && bias->defined()) {
    MX_CHECK(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == out, op,
             "expected bias to have shape (K, out) = (", K, ", ", out, "), but got shape ",
             shape_str(*bias));
    check_dtype_device(op, "bias", *bias, x);
  }
}

void check_target(const char* op, const at::Tensor& target, int64_t B, int64_t N, int64_t C,
                  bool single, const at::Device& device) {
  MX_CHECK(target.scalar_type() == at::kLong, op,
           "expected target to have dtype int64 (class indices), but got ", target.scalar_type());
  MX_CHECK(target.device() == device, op, "expected target on device ", device,
           " (the device of x), but got ", target.device());
  if (single) {
    MX_CHECK(target.dim() == 1 && target.size(0) == N, op, "expected target to have shape (N,) = (",
             N, "), but got shape ", shape_str(target));
  } else {
    MX_CHECK((target.dim() == 1 && target.size(0) == N) ||
                 (target.dim() == 2 && target.size(0) == B && target.size(1) == N),
             op, "expected target to have shape (N,) = (", N, ") or (B, N) = (", B, ", ", N,
             "), but got shape ", shape_str(target));
  }
  // On the host, before any kernel runs: an out-of-range index in a CUDA kernel would be a
  // device-side assert, which leaves the CUDA context unusable. One synchronisation per call.
  if (target.numel() > 0) {
    const auto range = at::aminmax(target);
    const at::Tensor both = at::stack({std::get<0>(range), std::get<1>(range)}).cpu();
    const int64_t lo = both[0].item<int64_t>(), hi = both[1].item<int64_t>();
    MX_CHECK(lo >= 0 && hi < C, op, "expected target values in [0, ", C, ") (the classes in ",
             "weight or logits), but got values in [", lo, ", ", hi, "]");
  }
}

void check_logits(const char* op, const at::Tensor& logits) {
  MX_CHECK(logits.dim() == 2 || logits.dim() == 3, op,
           "expected logits to have shape (B, N, classes) or (N, classes), but got shape ",
           shape_str(logits));
  MX_CHECK(at::isFloatingType(logits.scalar_type()), op,
           "expected logits to have a floating-point dtype, but got ", logits.scalar_type());
}

void check_grad_input(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                      const char* shape, const at::Device& device) {
  MX_CHECK(t.device() == device, op, "expected ", name, " on device ", device,
           " (the device of the other inputs), but got ", t.device());
  MX_CHECK(at::isFloatingType(t.scalar_type()), op, "expected ", name,
           " to have a floating-point dtype, but got ", t.scalar_type());
  MX_CHECK(numel < 0 || t.numel() == numel, op, "expected ", name, " to have shape ", shape, " (", numel,
           " elements), but got shape ", shape_str(t));
}

}  // namespace manifold_ext
