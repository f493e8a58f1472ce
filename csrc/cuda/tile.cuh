// The register-blocked tile product the CUDA kernels share. A block of kSide x kSide threads
// computes a kTile x kTile output tile, thread (ty, tx) = (tid / kSide, tid % kSide) holding rows
// ty + i * kSide and columns tx + q * kSide (i, q < kPer) in registers, while the reduction passes
// through shared memory kDepth at a time. Every kernel sums through multiply_accumulate, so all
// of them add the products of an output element in the same order: the reduction index ascending.
#pragma once
#include <cstdint>

namespace manifold_ext::cuda {

constexpr int kSide = 16;  // the block is kSide x kSide threads ...
constexpr int kPer = 4;    // ... each accumulating a kPer x kPer block of the output tile
constexpr int kThreads = kSide * kSide;
constexpr int kTile = kSide * kPer;  // rows and columns of the output tile
constexpr int kDepth = 16;           // reduction slice held in shared memory at a time
constexpr int64_t kMaxGridYZ = 65535;  // the largest gridDim.y and gridDim.z

static_assert(kDepth * kTile == kPer * kThreads,
              "each thread loads kPer elements of each operand tile");

// Operand tiles in shared memory are arrays T[kDepth][kTile + pad]: s[d][m] is element m of the
// tile at reduction index d. A tile loaded along d (load_tile<true>) takes pad 1, so that the
// consecutive d that consecutive threads write fall in distinct banks; one loaded along m, pad 0.

// Element i (< kPer) of this thread's share of a tile: consecutive threads take consecutive
// elements along the source's contiguous dimension (d when kAlongDepth, m otherwise), so that
// their global loads coalesce.
struct Slot {
  int d, m;
};

template <bool kAlongDepth>
__device__ __forceinline__ Slot load_slot(int i) {
  const int e = threadIdx.x + i * kThreads;
  return kAlongDepth ? Slot{e % kDepth, e / kDepth} : Slot{e / kTile, e % kTile};
}

// Offset of source element (d, m): contiguous along d when kAlongDepth, else along m; ld is the
// stride of the other dimension.
template <bool kAlongDepth>
__device__ __forceinline__ int64_t source_offset(int64_t d, int64_t m, int64_t ld) {
  return kAlongDepth ? m * ld + d : d * ld + m;
}

// s[d][m] = src(d0 + d, m0 + m) of a source with `depth` x `width` elements, 0 outside it.
template <bool kAlongDepth, typename T, int kWidth, typename scalar_t>
__device__ __forceinline__ void load_tile(T (&s)[kDepth][kWidth], const scalar_t* __restrict__ src,
                                          int64_t ld, int64_t d0, int64_t depth, int64_t m0,
                                          int64_t width) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const Slot p = load_slot<kAlongDepth>(i);
    const int64_t d = d0 + p.d, m = m0 + p.m;
    s[p.d][p.m] = (d < depth && m < width)
                      ? static_cast<T>(src[source_offset<kAlongDepth>(d, m, ld)])
                      : T(0);
  }
}

// s[d][m] = sum_v coeffs[v] * src_v(d0 + d, m0 + m), src_v at weight + v * vertex_stride, each
// addressed as in load_tile, 0 outside the source; v ascending. The vertex loop is outermost so
// that the kPer loads of one vertex are independent and in flight together.
template <bool kAlongDepth, typename T, int kWidth, typename scalar_t>
__device__ __forceinline__ void load_mixed_tile(T (&s)[kDepth][kWidth],
                                                const scalar_t* __restrict__ weight,
                                                int64_t vertex_stride,
                                                const T* __restrict__ coeffs, int64_t vertices,
                                                int64_t ld, int64_t d0, int64_t depth, int64_t m0,
                                                int64_t width) {
  Slot p[kPer];
  int64_t off[kPer];
  bool inside[kPer];
  T mixed[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    p[i] = load_slot<kAlongDepth>(i);
    const int64_t d = d0 + p[i].d, m = m0 + p[i].m;
    inside[i] = d < depth && m < width;
    off[i] = source_offset<kAlongDepth>(d, m, ld);
    mixed[i] = T(0);
  }
  for (int64_t v = 0; v < vertices; ++v) {
    const T c = coeffs[v];
    const scalar_t* wv = weight + v * vertex_stride;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (inside[i]) mixed[i] += c * static_cast<T>(wv[off[i]]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) s[p[i].d][p[i].m] = mixed[i];
}

// acc[i][q] += sum_d a[d][ty + i * kSide] * b[d][tx + q * kSide], d ascending.
template <typename T, int kWidthA, int kWidthB>
__device__ __forceinline__ void multiply_accumulate(const T (&a)[kDepth][kWidthA],
                                                    const T (&b)[kDepth][kWidthB],
                                                    T (&acc)[kPer][kPer]) {
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    T ra[kPer], rb[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      ra[i] = a[d][ty + i * kSide];
      rb[i] = b[d][tx + i * kSide];
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
#pragma unroll
      for (int q = 0; q < kPer; ++q) acc[i][q] += ra[i] * rb[q];
    }
  }
}

// acc += the product of the operand tiles a and b over the reduction [0, depth), a slice at a
// time: load(d0) fills a and b with the slice from d0 (load_tile, load_mixed_tile), and the block
// synchronises before the product reads them and before the next load overwrites them.
template <typename T, int kWidthA, int kWidthB, typename Load>
__device__ __forceinline__ void accumulate_tiles(int64_t depth, const T (&a)[kDepth][kWidthA],
                                                 const T (&b)[kDepth][kWidthB],
                                                 T (&acc)[kPer][kPer], const Load& load) {
  for (int64_t d0 = 0; d0 < depth; d0 += kDepth) {
    load(d0);
    __syncthreads();
    multiply_accumulate(a, b, acc);
    __syncthreads();
  }
}

// The tile product of interp_mm, also the logits of linear_ce_rows: acc[i][q] += rows
// n0 + ty + i * kSide of x times columns j0 + tx + q * kSide of A = sum_v coeffs[v] * A_v, over
// the reduction [0, R), where x (N, R) has unit stride in R and row stride x_sn, and A_v (R, J) is
// weight[v] (J, R) transposed, or weight[v] (R, J) itself when kTranspose. xs and as are the
// block's shared tiles; both are loaded along r except A_v when kTranspose (contiguous in j).
template <bool kTranspose, typename T, typename scalar_t>
__device__ __forceinline__ void mixed_product_tile(
    T (&xs)[kDepth][kTile + 1], T (&as)[kDepth][kTile + 1], const scalar_t* __restrict__ x,
    int64_t x_sn, int64_t n0, int64_t N, const scalar_t* __restrict__ weight, int64_t w_sk,
    const T* __restrict__ coeffs, int64_t K, int64_t j0, int64_t J, int64_t R,
    T (&acc)[kPer][kPer]) {
  accumulate_tiles(R, xs, as, acc, [&](int64_t r0) {
    load_tile<true>(xs, x, x_sn, r0, R, n0, N);
    load_mixed_tile<!kTranspose>(as, weight, w_sk, coeffs, K, kTranspose ? J : R, r0, R, j0, J);
  });
}

}  // namespace manifold_ext::cuda
