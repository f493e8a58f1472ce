// The CPU kernels, called through the dispatcher as Python calls them, against float64 ATen
// references that materialise each point's weights. Exits non-zero if any check fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using CE = std::tuple<Tensor, Tensor, Tensor>;  // (loss_sum, correct count, lse)

int n_checks = 0, n_failures = 0;

void check(bool ok, const std::string& what) {
  ++n_checks;
  if (!ok) {
    ++n_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void check_close(const Tensor& out, const Tensor& ref, at::ScalarType dt, const std::string& what) {
  const double tol = dt == at::kDouble ? 1e-9 : 1e-4;
  if (out.sizes() != ref.sizes()) return check(false, what + ": shape mismatch");
  const Tensor o = out.to(at::kDouble);
  const bool ok = at::allclose(o, ref, tol, tol);
  const double err = o.numel() ? (o - ref).abs().max().item<double>() : 0.0;
  check(ok, what + " (max abs error " + std::to_string(err) + ")");
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Looked up on first use rather than at static initialisation, so that a missing registration
// is reported by main instead of terminating the program.
auto& interp_linear() {
  static auto op = find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&)>(
      "manifold_ext::interp_linear");
  return op;
}
auto& interp_linear_ce() {
  static auto op =
      find_op<CE(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&)>(
          "manifold_ext::interp_linear_cross_entropy");
  return op;
}
auto& batched_ce() {
  static auto op =
      find_op<CE(const Tensor&, const Tensor&)>("manifold_ext::batched_cross_entropy");
  return op;
}

// One problem: B points mixing K vertices of an (out x in) linear layer, N rows each.
// shared: x is (N, in) for every point; single: coeffs (K,), x (N, in), no B dimension.
struct Case {
  int64_t B, N, in, out, K;
  bool shared = false, single = false;
};

std::string describe(const Case& c, at::ScalarType dt, bool bias) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "B=%ld N=%ld in=%ld out=%ld K=%ld%s%s %s %s", long(c.B),
                long(c.N), long(c.in), long(c.out), long(c.K), c.shared ? " shared-x" : "",
                c.single ? " single" : "", dt == at::kDouble ? "float64" : "float32",
                bias ? "bias" : "no-bias");
  return buf;
}

struct Inputs {
  Tensor x, weight, coeffs;
  OptTensor bias;
};

Inputs make_inputs(const Case& c, at::ScalarType dt, bool bias) {
  const auto o = at::TensorOptions().dtype(dt);
  Inputs in;
  in.x = c.shared || c.single ? at::randn({c.N, c.in}, o) : at::randn({c.B, c.N, c.in}, o);
  // Scaled so that logits stay O(1) and the softmax is not one-hot.
  in.weight = at::randn({c.K, c.out, c.in}, o) / std::sqrt(double(c.in));
  const Tensor w = at::rand({c.B, c.K}, o) + 0.1;
  in.coeffs = w / w.sum(1, /*keepdim=*/true);
  if (c.single) in.coeffs = in.coeffs[0];
  if (bias) in.bias = at::randn({c.K, c.out}, o);
  return in;
}

// y[b] = x[b] @ W_b^T + bias_b with W_b = sum_k coeffs[b,k] weight[k] (likewise bias_b), in
// float64, shaped (B, N, out) even for single.
Tensor reference_linear(const Case& c, const Inputs& in) {
  const Tensor coeffs = in.coeffs.to(at::kDouble).reshape({c.B, c.K});
  const Tensor weight = in.weight.to(at::kDouble);
  Tensor W = at::zeros({c.B, c.out, c.in}, weight.options());
  for (int64_t k = 0; k < c.K; ++k) W += coeffs.select(1, k).view({c.B, 1, 1}) * weight[k];
  const Tensor x = in.x.to(at::kDouble).expand({c.B, c.N, c.in});
  Tensor y = at::bmm(x, W.transpose(1, 2));
  if (in.bias) y += at::mm(coeffs, in.bias->to(at::kDouble)).unsqueeze(1);
  return y;
}

void test_interp_linear(const Case& c, at::ScalarType dt, bool bias) {
  const std::string name = "interp_linear " + describe(c, dt, bias);
  const Inputs in = make_inputs(c, dt, bias);
  const Tensor y = interp_linear().call(in.x, in.weight, in.bias, in.coeffs);
  check(y.scalar_type() == dt, name + ": dtype");
  const Tensor ref = reference_linear(c, in);
  check_close(y, c.single ? ref[0] : ref, dt, name);
}

// (loss_sum, correct, lse) per point from float64 logits (B, N, C) and target (B, N), with
// at::cross_entropy_loss, plus how many rows per point have a near-tie for the maximum, where the
// kernel's argmax may legitimately differ from the reference's.
std::tuple<Tensor, Tensor, Tensor, Tensor> reference_ce(const Tensor& z, const Tensor& t,
                                                        at::ScalarType dt) {
  const int64_t B = z.size(0), N = z.size(1), C = z.size(2);
  const Tensor loss =
      at::cross_entropy_loss(z.reshape({B * N, C}), t.reshape({B * N}), {}, at::Reduction::None);
  const Tensor correct = (z.argmax(-1) == t).sum(1);
  Tensor ties = at::zeros({B}, t.options());
  if (C > 1) {
    const Tensor top = std::get<0>(z.topk(2, -1));
    const double eps = dt == at::kDouble ? 1e-9 : 1e-4;
    ties = ((top.select(-1, 0) - top.select(-1, 1)) < eps).sum(1);
  }
  return {loss.view({B, N}).sum(1), correct, at::logsumexp(z, -1), ties};
}

void check_ce(const CE& out, const Tensor& z, const Tensor& t, at::ScalarType dt, bool single,
              const std::string& name) {
  auto [loss_sum, correct, lse, ties] = reference_ce(z, t.expand({z.size(0), z.size(1)}), dt);
  if (single) loss_sum = loss_sum[0], correct = correct[0], lse = lse[0], ties = ties[0];
  const auto& [o_loss, o_correct, o_lse] = out;
  check_close(o_loss, loss_sum, dt, name + ": loss_sum");
  check_close(o_lse, lse, dt, name + ": lse");
  check(o_correct.scalar_type() == at::kLong && o_correct.sizes() == correct.sizes() &&
            ((o_correct - correct).abs() <= ties).all().item<bool>(),
        name + ": correct count");
}

// Targets: the reference argmax in about half the rows (so "correct" is not always 0), random
// classes elsewhere; shape (N,) when target_1d, else (B, N).
Tensor make_target(const Tensor& z, bool target_1d) {
  Tensor t = at::where(at::rand(z.sizes().slice(0, 2)) < 0.5, z.argmax(-1),
                       at::randint(z.size(2), z.sizes().slice(0, 2), at::kLong));
  return target_1d ? t[0] : t;
}

void test_interp_linear_ce(const Case& c, at::ScalarType dt, bool bias, bool target_1d) {
  const std::string name = "interp_linear_cross_entropy " + describe(c, dt, bias) +
                           (target_1d ? " target (N,)" : "");
  const Inputs in = make_inputs(c, dt, bias);
  const Tensor z = reference_linear(c, in);
  const Tensor t = make_target(z, target_1d || c.single);
  check_ce(interp_linear_ce().call(in.x, in.weight, in.bias, in.coeffs, t), z, t, dt, c.single,
           name);
}

void test_batched_ce(at::IntArrayRef shape, at::ScalarType dt, bool target_1d) {
  const bool single = shape.size() == 2;
  std::string name = "batched_cross_entropy logits " + c10::str(shape) +
                     (dt == at::kDouble ? " float64" : " float32") +
                     (target_1d ? " target (N,)" : "");
  const Tensor logits = at::randn(shape, at::TensorOptions().dtype(dt)) * 3;
  const Tensor z = (single ? logits.unsqueeze(0) : logits).to(at::kDouble);
  const Tensor t = make_target(z, target_1d || single);
  check_ce(batched_ce().call(logits, t), z, t, dt, single, name);
}

void test_bad_coeffs() {
  const Tensor x = at::randn({2, 3, 5}), weight = at::randn({3, 4, 5});
  const Tensor coeffs = at::rand({2, 4});  // K = 4, but weight has 3 vertices
  try {
    interp_linear().call(x, weight, std::nullopt, coeffs);
    check(false, "interp_linear with coeffs of the wrong K: no error");
  } catch (const c10::Error& e) {
    check(e.msg().find("coeffs") != std::string::npos,
          "interp_linear with coeffs of the wrong K: message names coeffs: " + e.msg());
  }
}

}  // namespace

int main() try {
  at::manual_seed(0);
  const Case linear_cases[] = {
      {3, 5, 7, 9, 4},
      {2, 3, 5, 6, 1},                     // K = 1
      {1, 7, 11, 13, 3},                   // B = 1
      {4, 1, 3, 1, 2},                     // N = 1, out = 1
      {5, 4, 6, 3, 2, /*shared=*/true},    // one (N, in) input for all points
      {1, 6, 5, 7, 3, false, /*single=*/true},
      {3, 5, 300, 2000, 3},                // several weight chunks in the kernel
  };
  const Case ce_cases[] = {
      {3, 7, 300, 5000, 3},                // several class chunks
      {1, 4, 13, 17, 1},
      {4, 5, 9, 11, 2, /*shared=*/true},
      {1, 6, 8, 10, 3, false, /*single=*/true},
  };
  for (const auto dt : {at::kFloat, at::kDouble}) {
    for (const bool bias : {false, true}) {
      for (const Case& c : linear_cases) test_interp_linear(c, dt, bias);
      for (const Case& c : ce_cases) test_interp_linear_ce(c, dt, bias, /*target_1d=*/false);
    }
    test_interp_linear_ce({3, 4, 13, 17, 2}, dt, /*bias=*/true, /*target_1d=*/true);
    test_batched_ce({3, 5, 7}, dt, false);
    test_batched_ce({2, 4, 1000}, dt, true);
    test_batched_ce({1, 1, 1}, dt, false);
    test_batched_ce({6, 9}, dt, false);
  }
  test_bad_coeffs();
  std::printf("test_ops: %d checks, %d failed\n", n_checks, n_failures);
  return n_failures == 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "FAIL: uncaught exception (are the manifold_ext ops registered?): %s\n",
               e.what());
  return 1;
}
