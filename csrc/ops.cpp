#include "ops.h"

#include <algorithm>

#include "checks.h"

namespace manifold_ext {

namespace {

// Elements of logits the cross-entropy backward recomputes at a time (64 MiB in float32).
constexpr int64_t kLogitChunkElems = int64_t(1) << 24;

Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

// Inputs normalised to the batched form every kernel takes: coeffs (B, K) in opmath dtype,
// weight with each vertex contiguous, and whether x is one input shared by all points.
struct Interp {
  bool single;  // coeffs (K,): one point, x (N, in), outputs without the B dimension
  bool shared;  // coeffs (B, K) with x (N, in): every point sees the same input
  at::ScalarType op_t;
  Tensor c, w, x;  // x: (B, N, in) contiguous, or (N, in) contiguous when shared
  int64_t B, N, K, J, R;
};

Interp normalise(const Tensor& x, const Tensor& weight, const Tensor& coeffs) {
  Interp p;
  p.single = coeffs.dim() == 1;
  p.shared = !p.single && x.dim() == 2;
  p.op_t = opmath_type(x.scalar_type());
  p.c = (p.single ? coeffs.unsqueeze(0) : coeffs).to(p.op_t).contiguous();
  p.w = weight.contiguous();
  p.x = (p.single ? x.unsqueeze(0) : x).contiguous();
  p.B = p.c.size(0);
  p.K = weight.size(0);
  p.J = weight.size(1);
  p.R = weight.size(2);
  p.N = p.shared ? x.size(0) : p.x.size(1);
  return p;
}

Tensor mix_bias(const Interp& p, const OptTensor& bias) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  return at::mm(p.c, bias->to(p.op_t)).contiguous();  // (B, out)
}

// The K vertex outputs x @ W_k^T (+ bias_k) of a shared input, laid out (K, N * out) for mixing.
Tensor vertex_outputs(const Interp& p, const OptTensor& bias = c10::nullopt) {
  Tensor z = (bias.has_value() && bias->defined())
                 ? at::addmm(bias->reshape({p.K * p.J}), p.x, p.w.view({p.K * p.J, p.R}).t())
                 : at::mm(p.x, p.w.view({p.K * p.J, p.R}).t());
  // contiguous: for out = 1 the reshape is a strided view, and the mixing reads rows densely.
  return z.view({p.N, p.K, p.J}).permute({1, 0, 2}).reshape({p.K, p.N * p.J}).to(p.op_t).contiguous();
}

Tensor per_point_x(const Interp& p) {
  return p.shared ? p.x.unsqueeze(0).expand({p.B, p.N, p.R}) : p.x;
}

}  // namespace

Tensor interp_linear(const Kernels& k, const Tensor& x, const Tensor& weight,
                     const OptTensor& bias, const Tensor& coeffs) {
  check_interp_args("interp_linear", x, weight, bias, coeffs);
  const Interp p = normalise(x, weight, coeffs);
  const Tensor bias_mix = mix_bias(p, bias);
  Tensor y;
  if (p.B == 0 || p.N == 0 || p.J == 0 || p.R == 0) {
    y = at::zeros({p.B, p.N, p.J}, x.options());
    if (bias_mix.defined()) y.add_(bias_mix.unsqueeze(1).to(x.scalar_type()));
  } else if (p.shared) {
    // Exact for a linear layer: K products instead of B, and sum_k c[b,k] bias_k = bias_b.
    y = at::empty({p.B, p.N, p.J}, x.options());
    Tensor y2 = y.view({p.B, p.N * p.J});
    k.mix(p.c, vertex_outputs(p, bias), y2);
  } else {
    y = at::empty({p.B, p.N, p.J}, x.options());
    k.interp_mm(p.x, p.w, p.c, bias_mix, /*transpose=*/false, y);
  }
  return p.single ? y.squeeze(0) : y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& coeffs, std::array<bool, 4> mask) {
  check_interp_args("interp_linear_backward", x, weight, bias, coeffs);
  const Interp p = normalise(x, weight, coeffs);
  const bool has_bias = bias.has_value() && bias->defined();
  check_grad_input("interp_linear_backward", "grad_y", grad_y, -1, "(B, N, out)", x.device());
  const Tensor g = (p.single ? grad_y.unsqueeze(0) : grad_y).contiguous();
  MX_CHECK(g.dim() == 3 && g.size(0) == p.B && g.size(1) == p.N && g.size(2) == p.J,
           "interp_linear_backward", "expected grad_y to have shape (B, N, out) = (", p.B, ", ",
           p.N, ", ", p.J, "), but got shape ", shape_str(grad_y));
  Tensor gx, gw, gb, gc;
  const bool empty = g.numel() == 0 || p.R == 0;
  if (empty) {
    if (mask[0]) gx = at::zeros_like(p.x);
    if (mask[1]) gw = at::zeros_like(p.w);
    if (mask[3]) gc = at::zeros({p.B, p.K}, p.c.options());
  } else if (p.shared) {
    // sum_b c[b,k] grad_y[b] carries everything the K vertices need.
    const Tensor G = at::mm(p.c.t(), g.view({p.B, p.N * p.J}).to(p.op_t)).view({p.K, p.N, p.J});
    if (mask[0]) {
      gx = at::mm(G.permute({1, 0, 2}).reshape({p.N, p.K * p.J}),
                  p.w.view({p.K * p.J, p.R}).to(p.op_t))
               .to(x.scalar_type());
    }
    if (mask[1]) {
      gw = at::bmm(G.transpose(1, 2), p.x.to(p.op_t).unsqueeze(0).expand({p.K, p.N, p.R}))
               .to(weight.scalar_type());
    }
    if (mask[3]) gc = at::mm(g.view({p.B, p.N * p.J}).to(p.op_t), vertex_outputs(p).t());
  } else {
    if (mask[0]) {
      gx = at::empty_like(p.x);
      k.interp_mm(g, p.w, p.c, Tensor(), /*transpose=*/true, gx);
    }
    if (mask[1] || mask[3]) {
      if (mask[1]) gw = at::empty_like(p.w);
      if (mask[3]) gc = at::empty({p.B, p.K}, p.c.options());
      k.outer_mix(g, p.x, p.w, p.c, gw, gc);
    }
  }
  if (mask[2] || (mask[3] && has_bias)) {
    const Tensor gsum = g.sum(1, /*keepdim=*/false, p.op_t);  // (B, out)
    if (mask[2] && has_bias) gb = at::mm(p.c.t(), gsum).to(bias->scalar_type());
    if (mask[3] && has_bias) gc.add_(at::mm(gsum, bias->to(p.op_t).t()));
  }
  if (p.single) {
    if (gx.defined()) gx = gx.squeeze(0);
    if (gc.defined()) gc = gc.squeeze(0);
  }
  return {mask[0] ? gx : empty_grad(x), mask[1] ? gw : empty_grad(weight),
          (mask[2] && has_bias) ? gb : empty_grad(weight),
          mask[3] ? gc.to(coeffs.scalar_type()) : empty_grad(coeffs)};
}

namespace {

void check_classes(const char* op, int64_t C, const Tensor& weight_or_logits) {
  MX_CHECK(C >= 1, op, "expected at least one class, but got ", weight_or_logits.sizes());
}

Tensor batched_target(const Tensor& target, int64_t B, int64_t N) {
  return target.dim() == 1 ? target.contiguous().unsqueeze(0).expand({B, N})
                           : target.contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> interp_linear_cross_entropy(
    const Kernels& k, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const Tensor& coeffs, const Tensor& target) {
  const char* op = "interp_linear_cross_entropy";
  check_interp_args(op, x, weight, bias, coeffs);
  check_classes(op, weight.size(1), weight);
  const Interp p = normalise(x, weight, coeffs);
  check_target(op, target, p.B, p.N, p.J, p.single, x.device());
  const Tensor bias_mix = mix_bias(p, bias);
  auto fopts = x.options().dtype(p.op_t);
  Tensor lse = at::empty({p.B, p.N}, fopts), loss = at::empty({p.B, p.N}, fopts);
  Tensor correct = at::empty({p.B, p.N}, x.options().dtype(at::kBool));
  if (p.B > 0 && p.N > 0) {
    if (p.R == 0) {  // logits are the bias alone
      Tensor logits = bias_mix.defined() ? bias_mix.unsqueeze(1).expand({p.B, p.N, p.J})
                                         : at::zeros({p.B, p.N, p.J}, fopts);
      k.ce_rows(logits.contiguous(), batched_target(target, p.B, p.N), lse, loss, correct);
    } else {
      k.linear_ce_rows(per_point_x(p), p.w, p.c, bias_mix, batched_target(target, p.B, p.N), lse,
                       loss, correct);
    }
  }
  Tensor loss_sum = loss.sum(1), n_correct = correct.sum(1, false, at::kLong);
  if (p.single) return {loss_sum.squeeze(0), n_correct.squeeze(0), lse.squeeze(0)};
  return {loss_sum, n_correct, lse};
}

namespace {

// The gradients of interp_linear_cross_entropy, accumulated one class chunk at a time; a tensor
// is undefined when its gradient is not wanted.
struct CeGrads {
  Tensor gx, gw, gb, gc;
};

// d loss / d logits of one class chunk [c0, c0 + cc), (B, N, cc) in opmath: the chunk's logits
// recomputed (the forward stores only the log-sum-exp), softmax minus the one-hot target, scaled
// by each point's grad_loss.
Tensor chunk_logit_grad(const Kernels& k, const Interp& p, const Tensor& xb, const Tensor& wc,
                        const Tensor& bc, const Tensor& lse, const Tensor& t, const Tensor& gl,
                        int64_t c0, int64_t cc, const at::TensorOptions& x_opts) {
  Tensor z;
  if (p.R == 0) {
    z = bc.defined() ? bc.unsqueeze(1).expand({p.B, p.N, cc}).clone()
                     : at::zeros({p.B, p.N, cc}, x_opts.dtype(p.op_t));
  } else {
    z = at::empty({p.B, p.N, cc}, x_opts);
    k.interp_mm(xb, wc, p.c, bc, /*transpose=*/false, z);
  }
  Tensor dz = (z.to(p.op_t) - lse.unsqueeze(-1)).exp_();
  const Tensor in_chunk = ((t >= c0) & (t < c0 + cc)).to(p.op_t).unsqueeze(-1);
  dz.scatter_add_(2, (t - c0).clamp(0, cc - 1).unsqueeze(-1), -in_chunk);
  return dz.mul_(gl.view({p.B, 1, 1}));
}

// A shared input: sum_b c[b,k] dz[b] carries everything the K vertices need, so K products
// replace B.
void add_shared_grads(const Interp& p, const Tensor& dz, const Tensor& wc, int64_t c0, int64_t cc,
                      CeGrads& g) {
  const Tensor G = at::mm(p.c.t(), dz.view({p.B, p.N * cc})).view({p.K, p.N, cc});
  if (g.gx.defined()) {
    g.gx.add_(at::mm(G.permute({1, 0, 2}).reshape({p.N, p.K * cc}),
                     wc.reshape({p.K * cc, p.R}).to(p.op_t)));
  }
  if (g.gw.defined()) {
    g.gw.narrow(1, c0, cc).copy_(
        at::bmm(G.transpose(1, 2), p.x.to(p.op_t).unsqueeze(0).expand({p.K, p.N, p.R})));
  }
  if (g.gc.defined()) {
    const Tensor zk = at::mm(p.x, wc.reshape({p.K * cc, p.R}).t())
                          .view({p.N, p.K, cc})
                          .permute({1, 0, 2})
                          .reshape({p.K, p.N * cc})
                          .to(p.op_t);
    g.gc.add_(at::mm(dz.view({p.B, p.N * cc}), zk.t()));
  }
}

// Per-point inputs: the device's interp_mm (transposed) and outer_mix primitives.
void add_per_point_grads(const Kernels& k, const Interp& p, const Tensor& dz, const Tensor& wc,
                         int64_t c0, int64_t cc, at::ScalarType xt, CeGrads& g) {
  const Tensor dzx = dz.to(xt);
  if (g.gx.defined()) {
    Tensor part = at::empty_like(p.x);
    k.interp_mm(dzx, wc, p.c, Tensor(), /*transpose=*/true, part);
    g.gx.add_(part);
  }
  if (g.gw.defined() || g.gc.defined()) {
    Tensor gwc = g.gw.defined() ? g.gw.narrow(1, c0, cc) : Tensor();
    Tensor gcc = g.gc.defined() ? at::empty({p.B, p.K}, p.c.options()) : Tensor();
    k.outer_mix(dzx, p.x, wc, p.c, gwc, gcc);
    if (g.gc.defined()) g.gc.add_(gcc);
  }
}

// The bias terms: grad_bias[k] = sum_b c[b,k] sum_n dz[b,n], and the bias's share of grad_coeffs.
void add_bias_grads(const Interp& p, const Tensor& dz, const OptTensor& bias, int64_t c0, int64_t cc,
                    CeGrads& g) {
  const bool coeff_part = g.gc.defined() && bias.has_value() && bias->defined();
  if (!g.gb.defined() && !coeff_part) return;
  const Tensor dsum = dz.sum(1);  // (B, cc)
  if (g.gb.defined()) g.gb.narrow(1, c0, cc).copy_(at::mm(p.c.t(), dsum));
  if (coeff_part) g.gc.add_(at::mm(dsum, bias->narrow(1, c0, cc).to(p.op_t).t()));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> interp_linear_cross_entropy_backward(
    const Kernels& k, const Tensor& grad_loss, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& coeffs, const Tensor& target, const Tensor& lse_in,
    std::array<bool, 4> mask) {
  const char* op = "interp_linear_cross_entropy_backward";
  check_interp_args(op, x, weight, bias, coeffs);
  const Interp p = normalise(x, weight, coeffs);
  check_target(op, target, p.B, p.N, p.J, p.single, x.device());
  check_grad_input(op, "grad_loss", grad_loss, p.B, "(B,)", x.device());
  check_grad_input(op, "lse", lse_in, p.B * p.N, "(B, N)", x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor gl = grad_loss.reshape({p.B}).to(p.op_t);
  const Tensor lse = lse_in.reshape({p.B, p.N}).to(p.op_t);
  const Tensor t = batched_target(target, p.B, p.N);
  const Tensor bias_mix = mix_bias(p, bias);
  const auto xt = x.scalar_type();
  CeGrads g;
  if (mask[0]) g.gx = at::zeros_like(p.x, p.x.options().dtype(p.op_t));
  if (mask[1]) g.gw = at::zeros_like(p.w);
  if (mask[2] && has_bias) g.gb = at::zeros({p.K, p.J}, weight.options().dtype(p.op_t));
  if (mask[3]) g.gc = at::zeros({p.B, p.K}, p.c.options());
  const Tensor xb = per_point_x(p);
  // The logits are recomputed a chunk of classes at a time, so that at most kLogitChunkElems of
  // them exist at once.
  const int64_t rows = std::max<int64_t>(1, p.B * p.N);
  const int64_t chunk = std::clamp<int64_t>(kLogitChunkElems / rows, 1, std::max<int64_t>(1, p.J));
  for (int64_t c0 = 0; p.B > 0 && p.N > 0 && c0 < p.J; c0 += chunk) {
    const int64_t cc = std::min(chunk, p.J - c0);
    const Tensor wc = p.w.narrow(1, c0, cc);
    const Tensor bc = bias_mix.defined() ? bias_mix.narrow(1, c0, cc).contiguous() : Tensor();
    const Tensor dz = chunk_logit_grad(k, p, xb, wc, bc, lse, t, gl, c0, cc, x.options());
    if (p.R > 0 && (mask[0] || mask[1] || mask[3])) {
      if (p.shared) {
        add_shared_grads(p, dz, wc, c0, cc, g);
      } else {
        add_per_point_grads(k, p, dz, wc, c0, cc, xt, g);
      }
    }
    add_bias_grads(p, dz, bias, c0, cc, g);
  }
  if (g.gx.defined()) {
    g.gx = g.gx.to(xt);
    if (p.single) g.gx = g.gx.squeeze(0);
  }
  if (g.gc.defined() && p.single) g.gc = g.gc.squeeze(0);
  return {mask[0] ? g.gx : empty_grad(x), mask[1] ? g.gw : empty_grad(weight),
          g.gb.defined() ? g.gb.to(bias->scalar_type()) : empty_grad(weight),
          mask[3] ? g.gc.to(coeffs.scalar_type()) : empty_grad(coeffs)};
}

std::tuple<Tensor, Tensor, Tensor> batched_cross_entropy(const Kernels& k, const Tensor& logits,
                                                         const Tensor& target) {
  const char* op = "batched_cross_entropy";
  check_logits(op, logits);
  const bool single = logits.dim() == 2;
  const Tensor l = (single ? logits.unsqueeze(0) : logits).contiguous();
  const int64_t B = l.size(0), N = l.size(1), C = l.size(2);
  check_classes(op, C, logits);
  check_target(op, target, B, N, C, single, logits.device());
  const auto op_t = opmath_type(logits.scalar_type());
  auto fopts = logits.options().dtype(op_t);
  Tensor lse = at::empty({B, N}, fopts), loss = at::empty({B, N}, fopts);
  Tensor correct = at::empty({B, N}, logits.options().dtype(at::kBool));
  if (B > 0 && N > 0) k.ce_rows(l, batched_target(target, B, N), lse, loss, correct);
  Tensor loss_sum = loss.sum(1), n_correct = correct.sum(1, false, at::kLong);
  if (single) return {loss_sum.squeeze(0), n_correct.squeeze(0), lse.squeeze(0)};
  return {loss_sum, n_correct, lse};
}

// Only ATen calls: no primitive is needed.
Tensor batched_cross_entropy_backward(const Kernels&, const Tensor& grad_loss,
                                      const Tensor& logits, const Tensor& target,
                                      const Tensor& lse) {
  const char* op = "batched_cross_entropy_backward";
  check_logits(op, logits);
  const bool single = logits.dim() == 2;
  const Tensor l = single ? logits.unsqueeze(0) : logits;
  const int64_t B = l.size(0), N = l.size(1);
  check_target(op, target, B, N, l.size(2), single, logits.device());
  check_grad_input(op, "grad_loss", grad_loss, B, "(B,)", logits.device());
  check_grad_input(op, "lse", lse, B * N, "(B, N)", logits.device());
  const auto op_t = opmath_type(logits.scalar_type());
  Tensor g = (l.to(op_t) - lse.reshape({B, N, 1}).to(op_t)).exp_();
  if (B > 0 && N > 0) {
    g.scatter_add_(2, batched_target(target, B, N).unsqueeze(-1),
                   at::full({B, N, 1}, -1.0, g.options()));
  }
  g.mul_(grad_loss.reshape({B, 1, 1}).to(op_t));
  g = g.to(logits.scalar_type());
  return single ? g.squeeze(0) : g;
}

}  // namespace manifold_ext
