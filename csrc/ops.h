// The public ops, composed from the per-device primitives of kernels.h. They are the same for every
// device; cpu/ and cuda/ register them under their dispatch keys.
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <tuple>

namespace manifold_ext {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

Tensor interp_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                     const Tensor& coeffs);
std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const Tensor& coeffs, std::array<bool, 4> output_mask);
std::tuple<Tensor, Tensor, Tensor> interp_linear_cross_entropy(const Tensor& x,
                                                               const Tensor& weight,
                                                               const OptTensor& bias,
                                                               const Tensor& coeffs,
                                                               const Tensor& target);
std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_cross_entropy_backward(
    const Tensor& grad_loss, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const Tensor& coeffs, const Tensor& target, const Tensor& lse, std::array<bool, 4> output_mask);
std::tuple<Tensor, Tensor, Tensor> batched_cross_entropy(const Tensor& logits,
                                                         const Tensor& target);
Tensor batched_cross_entropy_backward(const Tensor& grad_loss, const Tensor& logits,
                                      const Tensor& target, const Tensor& lse);

}  // namespace manifold_ext

#define MANIFOLD_EXT_IMPL_ALL(m)                                                             \
  m.impl("interp_linear", &manifold_ext::interp_linear);                                     \
  m.impl("interp_linear_backward", &manifold_ext::interp_linear_backward);                   \
  m.impl("interp_linear_cross_entropy", &manifold_ext::interp_linear_cross_entropy);         \
  m.impl("interp_linear_cross_entropy_backward",                                             \
         &manifold_ext::interp_linear_cross_entropy_backward);                               \
  m.impl("batched_cross_entropy", &manifold_ext::batched_cross_entropy);                     \
  m.impl("batched_cross_entropy_backward", &manifold_ext::batched_cross_entropy_backward)
