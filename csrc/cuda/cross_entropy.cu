// Per-row cross-entropy quantities (log-sum-exp, loss, whether the argmax is the target) of
// logits z[b,n,:], either computed tile by tile from the interpolated classifier without ever
// storing them (linear_ce_rows) or read from materialised logits (ce_rows).
#include "cuda/kernels_cuda.h"
#include "cuda/tile.cuh"

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace manifold_ext::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Online softmax statistics of part of a row: its maximum, the sum of exp(z - max), and the
// first index attaining the maximum; arg < 0 marks a part with no elements yet.
template <typename T>
struct RowStats {
  T max;
  T sum;
  int64_t arg;
};

template <typename T>
__device__ RowStats<T> empty_stats() {
  return {-std::numeric_limits<T>::infinity(), T(0), -1};
}

// NaN ranks above every number, as in torch.max/argmax, so a NaN logit propagates.
template <typename T>
__device__ bool greater(T a, T b) {
  return a > b || (at::_isnan(a) && !at::_isnan(b));
}

// exp(v - m), exactly 1 when v == m so that an infinite maximum gives 1 rather than NaN.
template <typename T>
__device__ T exp_from(T v, T m) {
  return v == m ? T(1) : std::exp(v - m);
}

// Elements must arrive in increasing index order: only a strictly greater value replaces the
// argmax, which keeps the first of equal maxima.
template <typename T>
__device__ void push(RowStats<T>& s, T v, int64_t index) {
  if (s.arg < 0) {
    s = {v, T(1), index};
  } else if (greater(v, s.max)) {
    s.sum = s.sum * exp_from(s.max, v) + T(1);
    s.max = v;
    s.arg = index;
  } else {
    s.sum += exp_from(v, s.max);
  }
}

// Parts may cover interleaved indices, so equal maxima go to the smaller index.
template <typename T>
__device__ RowStats<T> merge(const RowStats<T>& a, const RowStats<T>& b) {
  if (b.arg < 0) return a;
  if (a.arg < 0) return b;
  const bool b_wins = greater(b.max, a.max) || (!greater(a.max, b.max) && b.arg < a.arg);
  const T m = b_wins ? b.max : a.max;
  return {m, a.sum * exp_from(a.max, m) + b.sum * exp_from(b.max, m), b_wins ? b.arg : a.arg};
}

// Combines the stats (and the target logit, held by at most one lane, others holding 0) of the
// `lanes` consecutive lanes sharing a row; every lane ends with the row's totals.
template <typename T>
__device__ void reduce_lanes(RowStats<T>& s, T& z_target, int lanes) {
  for (int mask = lanes / 2; mask > 0; mask /= 2) {
    const RowStats<T> other{__shfl_xor_sync(kFullMask, s.max, mask),
                            __shfl_xor_sync(kFullMask, s.sum, mask),
                            __shfl_xor_sync(kFullMask, s.arg, mask)};
    s = merge(s, other);
    z_target += __shfl_xor_sync(kFullMask, z_target, mask);
  }
}

// A row whose log-sum-exp is not finite (a NaN or +inf logit, or every logit -inf) has no
// defined loss: NaN, and it is never correct. The CPU routes and the loop apply the same rule.
template <typename T>
__device__ void write_row(const RowStats<T>& s, T z_target, int64_t target, int64_t row, T* lse,
                          T* loss, bool* correct) {
  const T l = s.max + std::log(s.sum);
  const bool defined = isfinite(l);
  lse[row] = l;
  loss[row] = defined ? l - z_target : std::numeric_limits<T>::quiet_NaN();
  correct[row] = defined && s.arg == target;
}

// ---- linear_ce_rows: the logits GEMM of interp_mm (transpose=false) with a row epilogue ----

static_assert(kSide <= 32 && (kSide & (kSide - 1)) == 0,
              "reduce_lanes merges a row's kSide lanes by butterfly shuffles within a warp");

// Block (n tile, b). Thread (ty, tx) keeps running stats for rows ty + i*kSide over classes
// tx + q*kSide of every tile; the kSide threads of a row are consecutive lanes of one warp and
// merge at the end.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) linear_ce_rows_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
    const at::opmath_type<scalar_t>* __restrict__ coeffs,
    const at::opmath_type<scalar_t>* __restrict__ bias, const int64_t* __restrict__ target,
    at::opmath_type<scalar_t>* __restrict__ lse, at::opmath_type<scalar_t>* __restrict__ loss,
    bool* __restrict__ correct, int64_t B, int64_t N, int64_t R, int64_t C, int64_t K,
    int64_t x_sb, int64_t x_sn, int64_t w_sk, int64_t bias_sb, int64_t bias_sc, int64_t t_sb) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t xs[kDepth][kTile + 1];  // xs[r][n] = x[b][n0 + n][r0 + r]
  __shared__ opmath_t ws[kDepth][kTile + 1];  // ws[r][c] = W_b[c0 + c][r0 + r]

  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t n0 = int64_t(blockIdx.x) * kTile;

  // gridDim.y is capped at kMaxGridYZ, so blocks stride over what is left of B.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    int64_t tgt[kPer];
    RowStats<opmath_t> stats[kPer];
    opmath_t z_target[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t n = n0 + ty + i * kSide;
      tgt[i] = -1;
      if (n < N) {
        tgt[i] = target[b * t_sb + n];
        CUDA_KERNEL_ASSERT(tgt[i] >= 0 && tgt[i] < C);
      }
      stats[i] = empty_stats<opmath_t>();
      z_target[i] = opmath_t(0);
    }

    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      opmath_t acc[kPer][kPer] = {};
      mixed_product_tile<false>(xs, ws, x + b * x_sb, x_sn, n0, N, weight, w_sk, coeffs + b * K,
                                K, c0, C, R, acc);

      // A thread's classes ascend within the tile (q) and across tiles (c0), as push needs.
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int64_t c = c0 + tx + q * kSide;
        if (c >= C) continue;
        const opmath_t bias_c = bias != nullptr ? bias[b * bias_sb + c * bias_sc] : opmath_t(0);
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const opmath_t z = acc[i][q] + bias_c;
          push(stats[i], z, c);
          if (c == tgt[i]) z_target[i] = z;
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      reduce_lanes(stats[i], z_target[i], kSide);
      const int64_t n = n0 + ty + i * kSide;
      if (tx == 0 && n < N) write_row(stats[i], z_target[i], tgt[i], b * N + n, lse, loss, correct);
    }
  }
}

// ---- ce_rows: one warp per row of materialised logits ----

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    ce_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                   at::opmath_type<scalar_t>* __restrict__ lse,
                   at::opmath_type<scalar_t>* __restrict__ loss, bool* __restrict__ correct,
                   int64_t rows, int64_t N, int64_t C, int64_t t_sb) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  // The grid covers at most one wave of blocks; warps stride over the remaining rows.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t tgt = target[(row / N) * t_sb + row % N];
    CUDA_KERNEL_ASSERT(tgt >= 0 && tgt < C);
    const scalar_t* z = logits + row * C;
    RowStats<opmath_t> stats = empty_stats<opmath_t>();
    opmath_t z_target = opmath_t(0);
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const opmath_t v = static_cast<opmath_t>(z[c]);
      push(stats, v, c);
      if (c == tgt) z_target = v;
    }
    reduce_lanes(stats, z_target, kWarpSize);
    if (lane == 0) write_row(stats, z_target, tgt, row, lse, loss, correct);
  }
}

}  // namespace

void linear_ce_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& coeffs,
                    const at::Tensor& bias_mix, const at::Tensor& target, at::Tensor& lse,
                    at::Tensor& loss, at::Tensor& correct) {
  const int64_t B = x.size(0), N = x.size(1), R = x.size(2);
  const int64_t K = weight.size(0), C = weight.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_bias = bias_mix.defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "linear_ce_rows_cuda",
      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        linear_ce_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            coeffs.const_data_ptr<opmath_t>(),
            has_bias ? bias_mix.const_data_ptr<opmath_t>() : nullptr,
            target.const_data_ptr<int64_t>(), lse.mutable_data_ptr<opmath_t>(),
            loss.mutable_data_ptr<opmath_t>(), correct.mutable_data_ptr<bool>(), B, N, R, C, K,
            x.stride(0), x.stride(1), weight.stride(0), has_bias ? bias_mix.stride(0) : 0,
            has_bias ? bias_mix.stride(1) : 0, target.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void ce_rows(const at::Tensor& logits, const at::Tensor& target, at::Tensor& lse,
             at::Tensor& loss, at::Tensor& correct) {
  const int64_t B = logits.size(0), N = logits.size(1), C = logits.size(2);
  const int64_t rows = B * N;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t wave = int64_t(prop->multiProcessorCount) *
                       (prop->maxThreadsPerMultiProcessor / kRowThreads);
  const int64_t blocks = std::min((rows + kRowsPerBlock - 1) / kRowsPerBlock, wave);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, logits.scalar_type(), "ce_rows_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        ce_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
            lse.mutable_data_ptr<opmath_t>(), loss.mutable_data_ptr<opmath_t>(),
            correct.mutable_data_ptr<bool>(), rows, N, C, target.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace manifold_ext::cuda
