// CUDA registration: the CUDA kernel table and the public ops under the CUDA dispatch key.
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "kernels_cuda.h"

namespace manifold_ext {
namespace {

// cuBLAS does the mixing GEMM well; only the output dtype needs care.
void mix_cuda(const at::Tensor& coeffs, const at::Tensor& z, at::Tensor& y) {
  if (y.scalar_type() == z.scalar_type()) {
    at::mm_out(y, coeffs, z);
  } else {
    y.copy_(at::mm(coeffs, z));
  }
}

const int registered = (set_kernels(c10::DeviceType::CUDA,
                                    Kernels{interp_mm_cuda, outer_mix_cuda, linear_ce_rows_cuda,
                                            ce_rows_cuda, mix_cuda}),
                        0);
}  // namespace
}  // namespace manifold_ext

TORCH_LIBRARY_IMPL(manifold_ext, CUDA, m) { MANIFOLD_EXT_IMPL_ALL(m); }
