// Per-device primitives behind the public ops. The public ops (csrc/ops.cpp) validate, normalise
// shapes and compose these with ATen calls; each device supplies one table of them, a constant in
// its registration file (cpu/kernels_cpu.cpp, cuda/register_cuda.cpp), and registers the public ops
// with that table under its dispatch key (register_ops in ops.h).
#pragma once
#include <ATen/ATen.h>

namespace manifold_ext {

struct Kernels {
  // y[b] = x[b] @ A_b + bias_mix[b], A_b = sum_k coeffs[b,k] * A_k, with
  //   transpose=false: A_k = weight[k]^T, weight (K, J, R), the forward of a linear layer;
  //   transpose=true:  A_k = weight[k],   weight (K, R, J), the input gradient of one.
  // x (B, N, R) with unit stride in R, stride N*R or 0 (one input shared by all points) in B.
  // weight[k] contiguous for every k (any stride between vertices), x's dtype. coeffs (B, K)
  // contiguous, opmath dtype. bias_mix (B, J) opmath or undefined. y (B, N, J) contiguous, x's
  // dtype, written.
  void (*interp_mm)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
                    const at::Tensor& bias_mix, bool transpose, at::Tensor& y);

  // With M_b = g[b]^T @ x[b] (J x R): grad_weight[k] = sum_b coeffs[b,k] * M_b and
  // grad_coeffs[b,k] = <weight[k], M_b>; either output may be undefined (not wanted).
  // g (B, N, J), x (B, N, R), both contiguous; weight (K, J, R) with weight[k] contiguous; coeffs
  // (B, K) opmath. grad_weight (K, J, R), x's dtype, grad_weight[k] contiguous, and grad_coeffs
  // (B, K) opmath contiguous are overwritten.
  void (*outer_mix)(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& coeffs, at::Tensor& grad_weight, at::Tensor& grad_coeffs);

  // Classifier and cross-entropy fused, per example row, never holding more than a chunk of
  // logits z[b,n,c] = x[b,n] . W_b[c] + bias_mix[b,c] (W_b as in interp_mm, transpose=false):
  // lse[b,n] = logsumexp_c z, loss[b,n] = lse - z[target], correct[b,n] = (argmax_c z == target),
  // argmax taking the first of equal maxima. x as in interp_mm; target (B, N) int64 with unit
  // stride in N and stride N or 0 in B, values in [0, C). lse and loss opmath, correct bool,
  // all (B, N) contiguous and written.
  void (*linear_ce_rows)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
                         const at::Tensor& bias_mix, const at::Tensor& target, at::Tensor& lse,
                         at::Tensor& loss, at::Tensor& correct);

  // The same per-row quantities from materialised logits (B, N, C), contiguous.
  void (*ce_rows)(const at::Tensor& logits, const at::Tensor& target, at::Tensor& lse,
                  at::Tensor& loss, at::Tensor& correct);

  // y[b] = sum_k coeffs[b,k] * z[k]: the points of a shared-input layer from its K vertex
  // outputs. coeffs (B, K) and z (K, M) opmath, contiguous; y (B, M) x's dtype, contiguous.
  void (*mix)(const at::Tensor& coeffs, const at::Tensor& z, at::Tensor& y);
};

// Every size (B, N, R, J, K, C) the public ops hand to these is at least 1.

}  // namespace manifold_ext
