// With M_b = g[b]^T x[b]: grad_weight[k] = sum_b coeffs[b,k] M_b and
// grad_coeffs[b,k] = <weight[k], M_b>, without materialising the B matrices M_b.
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

constexpr int kWarps = kThreads / 32;

// Sum over the block in a fixed order, so that results are bitwise reproducible; the total is
// returned to thread 0 only.
template <typename T>
__device__ T block_sum(T v, T* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

// partials[b][k][tile] = <weight[k], M_b> restricted to one (J, R) tile of M_b. Block
// (tile, b) computes its tile of M_b once and dots it with all K vertices.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    coeff_grad_partials_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ weight,
                               at::opmath_type<scalar_t>* __restrict__ partials, int64_t B,
                               int64_t N, int64_t J, int64_t R, int64_t K, int64_t w_sk,
                               int64_t r_tiles) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t gs[kDepth][kTile];  // gs[n][j] = g[b][n0 + n][j0 + j]
  __shared__ opmath_t xs[kDepth][kTile];  // xs[n][r] = x[b][n0 + n][r0 + r]
  __shared__ opmath_t warp_sums[kWarps];

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t tile = blockIdx.x, tiles = gridDim.x;
  const int64_t j0 = (tile / r_tiles) * kTile, r0 = (tile % r_tiles) * kTile;

  // gridDim.y is capped at kMaxGridYZ, so blocks stride over what is left of B.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    opmath_t acc[kPer][kPer] = {};
    // The tile of M_b: the reduction runs over n, and both operands are contiguous in their
    // tile's column (j or r), along which consecutive threads load.
    const scalar_t* gb = g + b * N * J;
    const scalar_t* xb = x + b * N * R;
    accumulate_tiles(N, gs, xs, acc, [&](int64_t n0) {
      load_tile<false>(gs, gb, J, n0, N, j0, J);
      load_tile<false>(xs, xb, R, n0, N, r0, R);
    });

    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* wk = weight + k * w_sk;
      opmath_t dot = opmath_t(0);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t j = j0 + ty + i * kSide;
        if (j >= J) continue;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          const int64_t r = r0 + tx + q * kSide;
          if (r < R) dot += acc[i][q] * static_cast<opmath_t>(wk[j * R + r]);
        }
      }
      dot = block_sum(dot, warp_sums);
      if (tid == 0) partials[(b * K + k) * tiles + tile] = dot;
    }
  }
}

}  // namespace

void outer_mix(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
               const at::Tensor& coeffs, at::Tensor& grad_weight, at::Tensor& grad_coeffs) {
  const int64_t B = g.size(0), N = g.size(1), J = g.size(2);
  const int64_t R = x.size(2), K = weight.size(0);
  const c10::cuda::CUDAGuard guard(g.device());

  if (grad_weight.defined()) {
    // grad_weight[k] = (coeffs[:,k] * g)^T x with B*N as the reduction dimension: one cuBLAS
    // GEMM per vertex. The coefficient goes on the narrower operand, the cheaper one to scale;
    // the product is formed in opmath and rounded once to the operand dtype.
    const bool scale_g = J <= R;
    const at::Tensor g2 = g.reshape({B * N, J}), x2 = x.reshape({B * N, R});
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor ck = coeffs.select(1, k).reshape({B, 1, 1});
      at::Tensor out = grad_weight.select(0, k);
      if (scale_g) {
        at::mm_out(out, (g * ck).to(g.scalar_type()).reshape({B * N, J}).t(), x2);
      } else {
        at::mm_out(out, g2.t(), (x * ck).to(x.scalar_type()).reshape({B * N, R}));
      }
    }
  }

  if (grad_coeffs.defined()) {
    const int64_t r_tiles = (R + kTile - 1) / kTile;
    const int64_t tiles = (J + kTile - 1) / kTile * r_tiles;
    // One partial per (b, k, tile), summed by ATen afterwards: deterministic, unlike atomics.
    at::Tensor partials = at::empty({B, K, tiles}, coeffs.options());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(B, kMaxGridYZ)));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, g.scalar_type(), "outer_mix_cuda", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          coeff_grad_partials_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              weight.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<opmath_t>(), B, N, J,
              R, K, weight.stride(0), r_tiles);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    at::sum_out(grad_coeffs, partials, at::IntArrayRef{2});
  }
}

}  // namespace manifold_ext::cuda
