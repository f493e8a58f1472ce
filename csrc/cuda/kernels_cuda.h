// The CUDA implementations of the primitives of kernels.h, with the same names and contracts.
#pragma once
#include <ATen/ATen.h>

namespace manifold_ext::cuda {

void interp_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
               const at::Tensor& bias_mix, bool transpose, at::Tensor& y);

void outer_mix(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
               const at::Tensor& coeffs, at::Tensor& grad_weight, at::Tensor& grad_coeffs);

void linear_ce_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
                    const at::Tensor& bias_mix, const at::Tensor& target, at::Tensor& lse,
                    at::Tensor& loss, at::Tensor& correct);

void ce_rows(const at::Tensor& logits, const at::Tensor& target, at::Tensor& lse,
             at::Tensor& loss, at::Tensor& correct);

}  // namespace manifold_ext::cuda
