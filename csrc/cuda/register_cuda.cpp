// The CUDA table of primitives, and the public ops registered with it under the CUDA dispatch key.
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "kernels_cuda.h"

namespace manifold_ext::cuda {
namespace {

// cuBLAS does the mixing GEMM well; only the output dtype needs care.
void mix(const at::Tensor& coeffs, const at::Tensor& z, at::Tensor& y) {
  if (y.scalar_type() == z.scalar_type()) {
    at::mm_out(y, coeffs, z);
  } else {
    y.copy_(at::mm(coeffs, z));
  }
}

}  // namespace

constexpr Kernels kKernels{interp_mm, outer_mix, linear_ce_rows, ce_rows, mix};

}  // namespace manifold_ext::cuda

TORCH_LIBRARY_IMPL(manifold_ext, CUDA, m) {
  manifold_ext::register_ops<manifold_ext::cuda::kKernels>(m);
}
