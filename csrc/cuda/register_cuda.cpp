// CUDA registration: the CUDA kernel table and the public ops under the CUDA dispatch key.
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "kernels_cuda.h"

namespace manifold_ext {
namespace {
const int registered = (set_kernels(c10::DeviceType::CUDA,
                                    Kernels{interp_mm_cuda, outer_mix_cuda, linear_ce_rows_cuda,
                                            ce_rows_cuda}),
                        0);
}  // namespace
}  // namespace manifold_ext

TORCH_LIBRARY_IMPL(manifold_ext, CUDA, m) { MANIFOLD_EXT_IMPL_ALL(m); }
