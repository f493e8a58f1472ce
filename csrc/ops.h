// The public ops, composed from a device's primitives (kernels.h). One definition serves every
// device: the primitives come in as the first argument, and each device file binds its own table
// and registers the ops under its dispatch key with register_ops.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>

#include "kernels.h"

namespace manifold_ext {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

Tensor interp_linear(const Kernels& k, const Tensor& x, const Tensor& weight,
                     const OptTensor& bias, const Tensor& coeffs);
std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& coeffs, std::array<bool, 4> output_mask);
std::tuple<Tensor, Tensor, Tensor> interp_linear_cross_entropy(
    const Kernels& k, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const Tensor& coeffs, const Tensor& target);
std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_cross_entropy_backward(
    const Kernels& k, const Tensor& grad_loss, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& coeffs, const Tensor& target, const Tensor& lse,
    std::array<bool, 4> output_mask);
std::tuple<Tensor, Tensor, Tensor> batched_cross_entropy(const Kernels& k, const Tensor& logits,
                                                         const Tensor& target);
Tensor batched_cross_entropy_backward(const Kernels& k, const Tensor& grad_loss,
                                      const Tensor& logits, const Tensor& target,
                                      const Tensor& lse);

namespace detail {

// Op with the primitives kKernels bound to its first parameter: a plain function with the
// signature of the op's schema, which is what the dispatcher registers.
template <const Kernels& kKernels, auto Op>
struct WithKernels;

template <const Kernels& kKernels, typename Ret, typename... Args,
          Ret (*Op)(const Kernels&, Args...)>
struct WithKernels<kKernels, Op> {
  static Ret call(Args... args) { return Op(kKernels, std::forward<Args>(args)...); }
};

}  // namespace detail

// Registers every public op under the dispatch key of `m` (a TORCH_LIBRARY_IMPL block), computed
// with the primitives kKernels. Each op is registered under the name of its C++ function, so the
// schema (TORCH_LIBRARY in manifold_ext.cpp), the Python wrapper and the C++ op share one name.
template <const Kernels& kKernels>
void register_ops(torch::Library& m) {
#define MANIFOLD_EXT_IMPL(op) m.impl(#op, &detail::WithKernels<kKernels, &op>::call)
  MANIFOLD_EXT_IMPL(interp_linear);
  MANIFOLD_EXT_IMPL(interp_linear_backward);
  MANIFOLD_EXT_IMPL(interp_linear_cross_entropy);
  MANIFOLD_EXT_IMPL(interp_linear_cross_entropy_backward);
  MANIFOLD_EXT_IMPL(batched_cross_entropy);
  MANIFOLD_EXT_IMPL(batched_cross_entropy_backward);
#undef MANIFOLD_EXT_IMPL
}

}  // namespace manifold_ext
