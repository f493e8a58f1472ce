// The CPU primitives of kernels.h, and the public ops registered with them under the CPU dispatch
// key. Each point's weights are built from the K vertices, a block at a time, in a scratch buffer
// and handed to the BLAS that PyTorch ships; B weight copies are never held.
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <limits>

#include "../kernels.h"
#include "../ops.h"

namespace manifold_ext::cpu {
namespace {

using at::Tensor;

// One point's block of combined weights, at most. Large rather than cache-sized: a smaller block
// splits the point's product into narrower ones, which cost BLAS more than the cache saves, and at
// 2 MiB a 512x512 float32 layer is built whole (docs/benchmarks.md has the sizes tried).
constexpr int64_t kScratchBytes = int64_t(1) << 21;
// Points whose weights are built in one pass over the vertices: the combination is memory-bound,
// and reading the vertex rows once for two points cuts its traffic from 3 to 2 blocks per point.
constexpr int64_t kPointsPerPass = 2;
// Per-point products of fewer flops than this are too small for BLAS threads to pay off, so the
// threads take whole points instead; larger ones are split over the threads by BLAS.
constexpr double kSerialFlops = double(1 << 26);

// The shared-input output is a fresh allocation that mix writes first, with a few flops per
// element, so its first-touch page faults cost more than the arithmetic; transparent huge pages
// fault a 2 MiB page at a time instead of 4 KiB. A hint only: without THP, or off Linux, nothing
// changes. Only for mix: where the arithmetic dominates (interp_mm) there is little to gain, and
// the hint can stall a call while the kernel compacts memory for the huge pages.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto nbytes = static_cast<uintptr_t>(t.numel() * t.element_size());
  if (nbytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

template <typename F>
void for_each_point(int64_t B, double flops_per_point, const F& f) {
  if (B == 1 || flops_per_point >= kSerialFlops || at::get_num_threads() == 1) {
    f(0, B);
  } else {
    at::parallel_for(0, B, 1, f);
  }
}

int64_t rows_per_chunk(int64_t row_elems, int64_t elem_bytes, int64_t total_rows) {
  const int64_t fit = kScratchBytes / std::max<int64_t>(1, row_elems * elem_bytes);
  return std::clamp<int64_t>(fit, 16, std::max<int64_t>(16, total_rows));
}

// d[i] = sum_k c[k] * s_k[i] in one pass. target_clones compiles AVX-512 and AVX2 copies next to
// the portable one and picks at load time: with wide vectors the combination runs at memory speed,
// while the portable SSE2 copy is bound by its arithmetic, and the combination is a large part of
// each per-point layer.
template <typename scalar_t>
__attribute__((target_clones("avx512f", "avx2", "default"))) void combine_row(
    const scalar_t* __restrict__ s0, int64_t K, int64_t vstride, int64_t cols,
    const scalar_t* __restrict__ c, scalar_t* __restrict__ d) {
  if (K == 2) {
    const scalar_t c0 = c[0], c1 = c[1];
    const scalar_t* __restrict__ s1 = s0 + vstride;
    for (int64_t i = 0; i < cols; ++i) d[i] = c0 * s0[i] + c1 * s1[i];
    return;
  }
  const scalar_t c0 = c[0];
  for (int64_t i = 0; i < cols; ++i) d[i] = c0 * s0[i];
  for (int64_t k = 1; k < K; ++k) {
    const scalar_t* __restrict__ sk = s0 + k * vstride;
    const scalar_t ck = c[k];
    for (int64_t i = 0; i < cols; ++i) d[i] += ck * sk[i];
  }
}

// For each of G points g: dst_g (rows, cols), contiguous, at dst + g * gstride, equals
// sum_k c[g*K + k] * src_k, where row r of src_k starts at src + k * vstride + r * rstride and is
// contiguous. Rows outermost, so each source row is read from memory once for all G points and
// from L1 after that. Threaded over rows when called outside a parallel region (inside one,
// at::parallel_for runs inline), so cores do not idle while BLAS threads wait for the weights.
template <typename scalar_t>
void combine(const scalar_t* src, int64_t K, int64_t vstride, int64_t rstride, int64_t rows,
             int64_t cols, const scalar_t* c, scalar_t* dst, int64_t G = 1, int64_t gstride = 0) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        combine_row(src + r * rstride, K, vstride, cols, c + g * K, dst + g * gstride + r * cols);
      }
    }
  });
}

// Few examples per point: building each point's weights costs more than the product itself, so
// instead one large product gives every vertex's output for every point, Z = x @ [A_1 .. A_K]
// (K times the arithmetic, no per-point work), and each point mixes its K outputs.
// Per weight element and point, that route adds N(K-1) multiply-adds, and building the point's
// weights moves K+1 elements (K read, one written); it pays while N(K-1) < 12(K+1): about 12
// multiply-adds cost as much as moving one element, as the crossover of the two routes
// on a 512x512 layer shows (docs/benchmarks.md). The route needs x contiguous (an expanded shared
// input is not).
bool vertex_route_pays(const Tensor& x, int64_t N, int64_t K) {
  return x.is_contiguous() && (K == 1 || N * (K - 1) < 12 * (K + 1));
}

void interp_mm_by_vertex(const Tensor& x, const Tensor& weight, const Tensor& coeffs,
                         const Tensor& bias_mix, bool transpose, Tensor& y) {
  const int64_t B = x.size(0), N = x.size(1), R = x.size(2), J = y.size(2), K = weight.size(0);
  // (R, K*J): the K matrices A_k side by side.
  const Tensor A = transpose ? weight.permute({1, 0, 2}).reshape({R, K * J})
                             : weight.reshape({K * J, R}).t();
  const int64_t budget = (int64_t(64) << 20) / x.element_size();
  const int64_t step = std::max<int64_t>(1, budget / std::max<int64_t>(1, N * K * J));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "interp_mm_by_vertex", [&] {
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    const scalar_t* bias = bias_mix.defined() ? bias_mix.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t b0 = 0; b0 < B; b0 += step) {
      const int64_t bc = std::min(step, B - b0);
      const Tensor Z = at::mm(x.narrow(0, b0, bc).reshape({bc * N, R}), A);  // (bc*N, K*J)
      const scalar_t* zp = Z.const_data_ptr<scalar_t>();
      at::parallel_for(0, bc * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, J)),
                       [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = b0 + r / N;
          scalar_t* out = yp + (b0 * N + r) * J;
          combine_row(zp + r * K * J, K, J, J, c + b * K, out);
          if (bias != nullptr) {
            for (int64_t j = 0; j < J; ++j) out[j] += bias[b * J + j];
          }
        }
      });
    }
  });
}

// Whole weights of a group of points, built together and handed to one batched product: ATen's
// bmm gives each core whole points, where a product per point splits every product over the
// cores and synchronises them after each. A group holds at most 4 MiB of weights, so that they
// are still in cache when bmm reads them (docs/benchmarks.md has the sizes tried).
constexpr int64_t kGroupBytes = int64_t(4) << 20;

bool group_route_pays(const Tensor& x, int64_t J, int64_t R) {
  return x.stride(0) != 0 && J * R * x.element_size() <= kGroupBytes;
}

// The group's weights, kept per thread from call to call: the allocator maps a fresh block this
// large anew on every call, and its page faults would cost about as much as building it.
Tensor group_scratch(int64_t numel, const at::TensorOptions& options) {
  thread_local Tensor kept;
  if (!kept.defined() || kept.scalar_type() != options.dtype().toScalarType() ||
      kept.numel() < numel) {
    kept = at::empty({numel}, options);
  }
  return kept.narrow(0, 0, numel);
}

void interp_mm_grouped(const Tensor& x, const Tensor& weight, const Tensor& coeffs,
                       const Tensor& bias_mix, bool transpose, Tensor& y) {
  const int64_t B = x.size(0), R = x.size(2), J = y.size(2), K = weight.size(0);
  const int64_t G = std::clamp<int64_t>(kGroupBytes / (J * R * x.element_size()), 1, B);
  // Each point's W_k as stored: (J, R) rows of R, or (R, J) rows of J when transposed.
  const int64_t rows = transpose ? R : J, cols = transpose ? J : R;
  Tensor scratch = group_scratch(G * rows * cols, x.options()).view({G, rows, cols});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "interp_mm_grouped", [&] {
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    for (int64_t b0 = 0; b0 < B; b0 += G) {
      const int64_t g = std::min(G, B - b0);
      combine(weight.const_data_ptr<scalar_t>(), K, weight.stride(0), cols, rows, cols,
              c + b0 * K, scratch.data_ptr<scalar_t>(), g, rows * cols);
      const Tensor S = scratch.narrow(0, 0, g);
      const Tensor A = transpose ? S : S.transpose(1, 2);
      Tensor yg = y.narrow(0, b0, g);
      if (bias_mix.defined()) {
        at::baddbmm_out(yg, bias_mix.narrow(0, b0, g).unsqueeze(1), x.narrow(0, b0, g), A);
      } else {
        at::bmm_out(yg, x.narrow(0, b0, g), A);
      }
    }
  });
}

void interp_mm(const Tensor& x, const Tensor& weight, const Tensor& coeffs, const Tensor& bias_mix,
               bool transpose, Tensor& y) {
  const int64_t B = x.size(0), N = x.size(1), R = x.size(2), J = y.size(2), K = weight.size(0);
  if (vertex_route_pays(x, N, K)) {
    interp_mm_by_vertex(x, weight, coeffs, bias_mix, transpose, y);
    return;
  }
  if (group_route_pays(x, J, R)) {
    interp_mm_grouped(x, weight, coeffs, bias_mix, transpose, y);
    return;
  }
  const double flops = 2.0 * N * R * J;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "interp_mm_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t vs = weight.stride(0);
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    // A chunk is outputs [j0, j1): rows of each W_k (out x in) for transpose=false, contiguous;
    // columns of each W_k (R x J) for transpose=true, R row segments. Either way jc * R elements.
    const int64_t chunk = rows_per_chunk(R, sizeof(scalar_t), J);
    const int64_t block = std::min(chunk, J) * R;
    for_each_point(B, flops, [&](int64_t b0, int64_t b1) {
      Tensor scratch = at::empty({kPointsPerPass * block}, x.options());
      scalar_t* sp = scratch.data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; b += kPointsPerPass) {
        const int64_t G = std::min(kPointsPerPass, b1 - b);
        for (int64_t j0 = 0; j0 < J; j0 += chunk) {
          const int64_t jc = std::min(chunk, J - j0);
          if (!transpose) {
            combine(w + j0 * R, K, vs, R, jc, R, c + b * K, sp, G, block);
          } else {
            combine(w + j0, K, vs, J, R, jc, c + b * K, sp, G, block);
          }
          for (int64_t g = 0; g < G; ++g) {
            const Tensor Sg = scratch.narrow(0, g * block, jc * R);
            const Tensor S = transpose ? Sg.view({R, jc}) : Sg.view({jc, R}).t();
            Tensor yb = y[b + g].narrow(1, j0, jc);
            if (bias_mix.defined()) {
              at::addmm_out(yb, bias_mix[b + g].narrow(0, j0, jc), x[b + g], S);
            } else {
              at::mm_out(yb, x[b + g], S);
            }
          }
        }
      }
    });
  });
}

void outer_mix(const Tensor& g, const Tensor& x, const Tensor& weight, const Tensor& coeffs,
               Tensor& grad_weight, Tensor& grad_coeffs) {
  const int64_t B = x.size(0), R = x.size(2), J = g.size(2), K = weight.size(0);
  if (grad_weight.defined()) grad_weight.zero_();
  if (grad_coeffs.defined()) grad_coeffs.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "outer_mix_cpu", [&] {
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    const int64_t chunk = rows_per_chunk(R, sizeof(scalar_t), J);
    Tensor M = at::empty({std::min(chunk, J), R}, x.options());
    for (int64_t j0 = 0; j0 < J; j0 += chunk) {
      const int64_t jc = std::min(chunk, J - j0);
      Tensor Mc = M.narrow(0, 0, jc);
      // Vertex rows [j0, j1) as one (K, jc * R) matrix: each row of it is contiguous.
      const Tensor wk = weight.narrow(1, j0, jc).reshape({K, jc * R});
      for (int64_t b = 0; b < B; ++b) {
        at::mm_out(Mc, g[b].narrow(1, j0, jc).t(), x[b]);
        if (grad_coeffs.defined()) grad_coeffs[b].add_(at::mv(wk, Mc.view({jc * R})));
        if (grad_weight.defined()) {
          for (int64_t k = 0; k < K; ++k) grad_weight[k].narrow(0, j0, jc).add_(Mc, c[b * K + k]);
        }
      }
    }
  });
}

// Few classes (a classifier head of 10): per-point work is a handful of tiny ops whose overhead
// outweighs the arithmetic, so one product gives every vertex's logits for every example of every
// point, each point mixes its K, and the row reductions run vectorised over all rows at once.
// A row whose log-sum-exp is not finite (a NaN or +inf logit, or every logit -inf) has no
// defined loss: NaN, and it is never correct. The CUDA kernels and the loop apply the same rule.
void write_rows(const Tensor& lse, const Tensor& z_target, const Tensor& hit, Tensor loss, Tensor correct) {
  const Tensor defined = at::isfinite(lse);
  loss.copy_(at::where(defined, lse - z_target, at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                         lse.options())));
  correct.copy_(hit & defined);
}

bool ce_by_vertex_pays(const Tensor& x, const Tensor& weight, int64_t K, int64_t C) {
  return K * C <= 128 && x.is_contiguous() && weight.is_contiguous();
}

void linear_ce_rows_by_vertex(const Tensor& x, const Tensor& weight, const Tensor& coeffs,
                              const Tensor& bias_mix, const Tensor& target, Tensor& lse,
                              Tensor& loss, Tensor& correct) {
  const int64_t B = x.size(0), N = x.size(1), R = x.size(2), C = weight.size(1),
                K = weight.size(0);
  const Tensor A = weight.reshape({K * C, R}).t();
  const int64_t budget = (int64_t(64) << 20) / x.element_size();
  const int64_t step = std::max<int64_t>(1, budget / std::max<int64_t>(1, N * K * C));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_ce_rows_by_vertex", [&] {
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    const scalar_t* bias = bias_mix.defined() ? bias_mix.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t b0 = 0; b0 < B; b0 += step) {
      const int64_t bc = std::min(step, B - b0);
      const Tensor Z = at::mm(x.narrow(0, b0, bc).reshape({bc * N, R}), A);  // (bc*N, K*C)
      Tensor logits = at::empty({bc * N, C}, x.options());
      const scalar_t* zp = Z.const_data_ptr<scalar_t>();
      scalar_t* lp = logits.data_ptr<scalar_t>();
      at::parallel_for(0, bc * N, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = b0 + r / N;
          scalar_t* out = lp + r * C;
          combine_row(zp + r * K * C, K, C, C, c + b * K, out);
          if (bias != nullptr) {
            for (int64_t j = 0; j < C; ++j) out[j] += bias[b * C + j];
          }
        }
      });
      const Tensor t = target.narrow(0, b0, bc).reshape({bc * N});
      const Tensor l = at::logsumexp(logits, 1);
      lse.narrow(0, b0, bc).copy_(l.view({bc, N}));
      write_rows(l, logits.gather(1, t.unsqueeze(1)).squeeze(1), logits.argmax(1) == t,
                 loss.narrow(0, b0, bc).view({bc * N}), correct.narrow(0, b0, bc).view({bc * N}));
    }
  });
}

void linear_ce_rows(const Tensor& x, const Tensor& weight, const Tensor& coeffs,
                    const Tensor& bias_mix, const Tensor& target, Tensor& lse, Tensor& loss,
                    Tensor& correct) {
  const int64_t B = x.size(0), N = x.size(1), R = x.size(2), C = weight.size(1),
                K = weight.size(0);
  if (ce_by_vertex_pays(x, weight, K, C)) {
    linear_ce_rows_by_vertex(x, weight, coeffs, bias_mix, target, lse, loss, correct);
    return;
  }
  const double flops = 2.0 * N * R * C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_ce_rows_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t vs = weight.stride(0);
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    const int64_t chunk = std::min<int64_t>(rows_per_chunk(R, sizeof(scalar_t), C), 4096);
    for_each_point(B, flops, [&](int64_t b0, int64_t b1) {
      Tensor scratch = at::empty({std::min(chunk, C) * R}, x.options());
      Tensor z = at::empty({N, std::min(chunk, C)}, x.options());
      for (int64_t b = b0; b < b1; ++b) {
        const Tensor xb = x[b], tb = target[b];
        Tensor run_max = at::full({N}, -std::numeric_limits<double>::infinity(), x.options());
        Tensor run_sum = at::zeros({N}, x.options());
        Tensor arg = at::zeros({N}, tb.options());
        Tensor zt = at::zeros({N}, x.options());
        for (int64_t c0 = 0; c0 < C; c0 += chunk) {
          const int64_t cc = std::min(chunk, C - c0);
          combine(w + c0 * R, K, vs, R, cc, R, c + b * K, scratch.data_ptr<scalar_t>());
          const Tensor S = scratch.narrow(0, 0, cc * R).view({cc, R}).t();
          Tensor zc = z.narrow(1, 0, cc);
          if (bias_mix.defined()) {
            at::addmm_out(zc, bias_mix[b].narrow(0, c0, cc), xb, S);
          } else {
            at::mm_out(zc, xb, S);
          }
          const Tensor hit = (tb >= c0) & (tb < c0 + cc);
          const Tensor picked = zc.gather(1, (tb - c0).clamp(0, cc - 1).unsqueeze(1)).squeeze(1);
          zt = at::where(hit, picked, zt);
          auto [cmax, carg] = zc.max(1);
          const Tensor new_max = at::maximum(run_max, cmax);
          // In place: a temporary as large as the chunk would cost page faults on every chunk.
          zc.sub_(new_max.unsqueeze(1)).exp_();
          run_sum.mul_((run_max - new_max).exp_()).add_(zc.sum(1));
          // Strictly greater only: the first of equal maxima wins, as torch.argmax does.
          arg = at::where(cmax > run_max, carg + c0, arg);
          run_max = new_max;
        }
        Tensor l = run_max + run_sum.log();
        lse[b].copy_(l);
        write_rows(l, zt, arg == tb, loss[b], correct[b]);
      }
    });
  });
}

void ce_rows(const Tensor& logits, const Tensor& target, Tensor& lse, Tensor& loss,
             Tensor& correct) {
  const int64_t B = logits.size(0), N = logits.size(1), C = logits.size(2);
  // logsumexp holds a temporary as large as its input: go a few points at a time.
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, N * C));
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t bc = std::min(step, B - b0);
    const Tensor l = logits.narrow(0, b0, bc), t = target.narrow(0, b0, bc);
    const Tensor s = at::logsumexp(l, -1);
    lse.narrow(0, b0, bc).copy_(s);
    Tensor loss_part = loss.narrow(0, b0, bc), correct_part = correct.narrow(0, b0, bc);
    write_rows(s, l.gather(2, t.unsqueeze(-1)).squeeze(-1), l.argmax(-1) == t, loss_part, correct_part);
  }
}

void mix(const Tensor& coeffs, const Tensor& z, Tensor& y) {
  // A GEMM with an inner dimension of K is all memory traffic; one pass per point is cheaper.
  const int64_t B = y.size(0), M = y.size(1), K = z.size(0);
  advise_huge_pages(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mix_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t block = 16384;  // elements of one point per task: fills both cores for B = 1
    const int64_t nblocks = (M + block - 1) / block;
    at::parallel_for(0, B * nblocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nblocks, m0 = (t % nblocks) * block;
        combine_row(zp + m0, K, M, std::min(block, M - m0), c + b * K, yp + b * M + m0);
      }
    });
  });
}

}  // namespace

constexpr Kernels kKernels{interp_mm, outer_mix, linear_ce_rows, ce_rows, mix};

}  // namespace manifold_ext::cpu

TORCH_LIBRARY_IMPL(manifold_ext, CPU, m) {
  manifold_ext::register_ops<manifold_ext::cpu::kKernels>(m);
}
