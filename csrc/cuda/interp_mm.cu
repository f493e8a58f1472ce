// y[b] = x[b] @ A_b + bias_mix[b] with A_b = sum_k coeffs[b,k] * A_k. Each block assembles the
// tile of A_b it needs in shared memory from the K vertex tiles, so the B mixed weight matrices
// are never materialised in global memory.
#include "cuda/kernels_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace manifold_ext {
namespace {

constexpr int kTileN = 64;  // rows of y per block
constexpr int kTileJ = 64;  // columns of y per block
constexpr int kTileR = 16;  // reduction slice held in shared memory at a time
constexpr int kSide = 16;   // the block is kSide x kSide threads ...
constexpr int kPer = 4;     // ... each accumulating a kPer x kPer block of y
constexpr int kThreads = kSide * kSide;
constexpr int64_t kMaxGridYZ = 65535;

static_assert(kSide * kPer == kTileN && kSide * kPer == kTileJ, "threads must cover the tile");
static_assert(kTileR * kTileN == kPer * kThreads && kTileR * kTileJ == kPer * kThreads,
              "each thread loads kPer elements of each operand tile");

template <typename scalar_t, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
    interp_mm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                     const at::opmath_type<scalar_t>* __restrict__ coeffs,
                     const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ y,
                     int64_t B, int64_t N, int64_t R, int64_t J, int64_t K, int64_t x_sb,
                     int64_t x_sn, int64_t w_sk, int64_t bias_sb, int64_t bias_sj) {
  using opmath_t = at::opmath_type<scalar_t>;
  // The loads write these tiles column-wise; the +1 pad puts consecutive rows in distinct banks.
  __shared__ opmath_t xs[kTileR][kTileN + 1];  // xs[r][n] = x[b][n0 + n][r0 + r]
  __shared__ opmath_t as[kTileR][kTileJ + 1];  // as[r][j] = A_b[r0 + r][j0 + j]

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t j0 = int64_t(blockIdx.x) * kTileJ;
  const int64_t n_tiles = (N + kTileN - 1) / kTileN;

  // gridDim.y and gridDim.z are capped at 65535, so blocks stride over what is left.
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    const opmath_t* cb = coeffs + b * K;
    for (int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
      const int64_t n0 = nt * kTileN;
      opmath_t acc[kPer][kPer] = {};

      for (int64_t r0 = 0; r0 < R; r0 += kTileR) {
        // x is contiguous in r: consecutive threads read consecutive r.
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int e = tid + i * kThreads;
          const int rr = e % kTileR, nn = e / kTileR;
          const int64_t n = n0 + nn, r = r0 + rr;
          xs[rr][nn] = (n < N && r < R) ? static_cast<opmath_t>(x[b * x_sb + n * x_sn + r])
                                        : opmath_t(0);
        }

        // Mix kPer elements of the A_b tile per thread; the vertex loop is outermost so that
        // the kPer loads of one vertex are independent and in flight together. Consecutive
        // threads follow weight[k]'s contiguous dimension: j when transposed, r otherwise.
        int rr[kPer], jj[kPer];
        int64_t off[kPer];
        bool inside[kPer];
        opmath_t mixed[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int e = tid + i * kThreads;
          rr[i] = kTranspose ? e / kTileJ : e % kTileR;
          jj[i] = kTranspose ? e % kTileJ : e / kTileR;
          const int64_t r = r0 + rr[i], j = j0 + jj[i];
          inside[i] = r < R && j < J;
          off[i] = kTranspose ? r * J + j : j * R + r;
          mixed[i] = opmath_t(0);
        }
        for (int64_t k = 0; k < K; ++k) {
          const opmath_t c = cb[k];
          const scalar_t* wk = weight + k * w_sk;
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
            if (inside[i]) mixed[i] += c * static_cast<opmath_t>(wk[off[i]]);
          }
        }
#pragma unroll
        for (int i = 0; i < kPer; ++i) as[rr[i]][jj[i]] = mixed[i];
        __syncthreads();

#pragma unroll
        for (int r = 0; r < kTileR; ++r) {
          opmath_t a[kPer], w[kPer];
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
            a[i] = xs[r][ty + i * kSide];
            w[i] = as[r][tx + i * kSide];
          }
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
#pragma unroll
            for (int q = 0; q < kPer; ++q) acc[i][q] += a[i] * w[q];
          }
        }
        __syncthreads();
      }

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

void interp_mm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
                    const at::Tensor& bias_mix, bool transpose, at::Tensor& y) {
  const int64_t B = y.size(0), N = y.size(1), J = y.size(2);
  const int64_t R = x.size(2), K = weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((J + kTileJ - 1) / kTileJ),
                  static_cast<unsigned>(std::min((N + kTileN - 1) / kTileN, kMaxGridYZ)),
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

}  // namespace manifold_ext
