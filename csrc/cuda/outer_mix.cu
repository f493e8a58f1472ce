// With M_b = g[b]^T x[b]: grad_weight[k] = sum_b coeffs[b,k] M_b and
// grad_coeffs[b,k] = <weight[k], M_b>, without materialising the B matrices M_b.
#include "cuda/kernels_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace manifold_ext {
namespace {

constexpr int kTileJ = 64;  // rows of M_b per block
constexpr int kTileR = 64;  // columns of M_b per block
constexpr int kTileN = 16;  // reduction slice held in shared memory at a time
constexpr int kSide = 16;   // the block is kSide x kSide threads ...
constexpr int kPer = 4;     // ... each accumulating a kPer x kPer block of M_b
constexpr int kThreads = kSide * kSide;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;

static_assert(kSide * kPer == kTileJ && kSide * kPer == kTileR, "threads must cover the tile");
static_assert(kTileN * kTileJ == kPer * kThreads && kTileN * kTileR == kPer * kThreads,
              "each thread loads kPer elements of each operand tile");

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
  __shared__ opmath_t gs[kTileN][kTileJ];  // gs[n][j] = g[b][n0 + n][j0 + j]
  __shared__ opmath_t xs[kTileN][kTileR];  // xs[n][r] = x[b][n0 + n][r0 + r]
  __shared__ opmath_t warp_sums[kWarps];

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t tile = blockIdx.x, tiles = gridDim.x;
  const int64_t j0 = (tile / r_tiles) * kTileJ, r0 = (tile % r_tiles) * kTileR;

  // gridDim.y is capped at 65535, so blocks stride over what is left of B.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    opmath_t acc[kPer][kPer] = {};
    for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
      // Both operands are contiguous in their tile's column: consecutive threads, consecutive
      // columns.
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = tid + i * kThreads;
        const int nn = e / kTileJ, cc = e % kTileJ;
        const int64_t n = n0 + nn, j = j0 + cc, r = r0 + cc;
        gs[nn][cc] = (n < N && j < J) ? static_cast<opmath_t>(g[(b * N + n) * J + j])
                                      : opmath_t(0);
        xs[nn][cc] = (n < N && r < R) ? static_cast<opmath_t>(x[(b * N + n) * R + r])
                                      : opmath_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int n = 0; n < kTileN; ++n) {
        opmath_t a[kPer], v[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          a[i] = gs[n][ty + i * kSide];
          v[i] = xs[n][tx + i * kSide];
        }
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
#pragma unroll
          for (int q = 0; q < kPer; ++q) acc[i][q] += a[i] * v[q];
        }
      }
      __syncthreads();
    }

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

void outer_mix_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
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
    const int64_t r_tiles = (R + kTileR - 1) / kTileR;
    const int64_t tiles = (J + kTileJ - 1) / kTileJ * r_tiles;
    // One partial per (b, k, tile), summed by ATen afterwards: deterministic, unlike atomics.
    at::Tensor partials = at::empty({B, K, tiles}, coeffs.options());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(B, kMaxGridY)));
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

}  // namespace manifold_ext
