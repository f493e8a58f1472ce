// y[b] = x[b] @ A_b + bias_mix[b] with A_b = sum_k coeffs[b,k] * A_k. Each block assembles the
// tile of A_b it needs in shared memory from the K vertex tiles, so the B mixed weight matrices
// are never materialised in global memory.
#include "cuda/kernels_cuda.h"
#include "cuda/tile.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace manifold_ext::cuda {
namespace {

// Block (j tile, n tile, b) computes the kTile x kTile tile of y at rows n0 and columns j0.
template <typename scalar_t, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
    interp_mm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                     const at::opmath_type<scalar_t>* __restrict__ coeffs,
                     const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ y,
                     int64_t B, int64_t N, int64_t R, int64_t J, int64_t K, int64_t x_sb,
                     int64_t x_sn, int64_t w_sk, int64_t bias_sb, int64_t bias_sj) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t xs[kDepth][kTile + 1];  // xs[r][n] = x[b][n0 + n][r0 + r]
  __shared__ opmath_t as[kDepth][kTile + 1];  // as[r][j] = A_b[r0 + r][j0 + j]

  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t j0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_tiles = (N + kTile - 1) / kTile;

  // gridDim.y and gridDim.z are capped at kMaxGridYZ, so blocks stride over what is left.
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
      const int64_t n0 = nt * kTile;
      opmath_t acc[kPer][kPer] = {};
      mixed_product_tile<kTranspose>(xs, as, x + b * x_sb, x_sn, n0, N, weight, w_sk,
                                     coeffs + b * K, K, j0, J, R, acc);

      // Threads of a half-warp hold consecutive columns, so the stores coalesce.
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t n = n0 + ty + i * kSide;
        if (n >= N) continue;
        scalar_t* yrow = y + (b * N + n) * J;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          const int64_t j = j0 + tx + q * kSide;
          if (j >= J) continue;
          opmath_t v = acc[i][q];
          if (bias != nullptr) v += bias[b * bias_sb + j * bias_sj];
          yrow[j] = static_cast<scalar_t>(v);
        }
      }
    }
  }
}

}  // namespace

void interp_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
               const at::Tensor& bias_mix, bool transpose, at::Tensor& y) {
  const int64_t B = y.size(0), N = y.size(1), J = y.size(2);
  const int64_t R = x.size(2), K = weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((J + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min((N + kTile - 1) / kTile, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_bias = bias_mix.defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "interp_mm_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto kernel =
            transpose ? interp_mm_kernel<scalar_t, true> : interp_mm_kernel<scalar_t, false>;
        kernel<<<grid, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            coeffs.const_data_ptr<opmath_t>(),
            has_bias ? bias_mix.const_data_ptr<opmath_t>() : nullptr,
            y.mutable_data_ptr<scalar_t>(), B, N, R, J, K, x.stride(0), x.stride(1),
            weight.stride(0), has_bias ? bias_mix.stride(0) : 0,
            has_bias ? bias_mix.stride(1) : 0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace manifold_ext::cuda
