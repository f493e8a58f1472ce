"""Baseline metrics that manifold-size estimators compete with, for classifiers trained with
cross-entropy.

A model maps inputs (N, ...) to logits (N, classes); ``data`` is a pair ``(x, y)`` with ``y``
int64 class indices. The loss is the mean cross-entropy over the whole data
(``L(theta) = (1/N) sum_i CE(f(x_i; theta), y_i)``), computed in float64 from the logits.

Every metric
* evaluates the model in eval mode (BatchNorm uses its running statistics, dropout is off) and
  restores every module's train/eval flag afterwards;
* never modifies the model: parameters enter through :func:`torch.func.functional_call` (or a
  copy, for SynFlow), and nothing is written to their ``.grad``;
* processes the data in chunks of ``batch_size`` examples (default: all at once); results do not
  depend on the chunking beyond float rounding (chunk losses and gradients are summed, then
  divided by the number of targets);
* is deterministic given ``seed`` where it is random (a local :class:`torch.Generator`, never the
  global RNG).

"Trainable parameters" are those with ``requires_grad``; frozen parameters and buffers are held
fixed. :func:`compute_baselines` runs any subset of them by name (:data:`BASELINES`) and returns a
:class:`BaselineReport`.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from . import params as P
from ._checks import int_at_least, positive
from ._data import check_data, chunks
from ._results import Result
from .engine import evaluate
from .outputs import logits as logits_of
from .training import evaluating

Data = Tuple[Tensor, Tensor]

# Per-example gradients (Fisher) are formed for at most this many bytes' worth of examples at a
# time, whatever batch_size says, so that N x P gradients are never held at once.
_PER_EXAMPLE_BYTES = 256 << 20
# Hutchinson probes go through one vmapped backward in blocks of up to this many parameters'
# worth: only small models batch them, where the overhead of each product dominates its work; a
# large model's products are each big enough to run one at a time.
_PROBE_BLOCK_ELEMS = 1 << 16


# ----------------------------------------------------------------------------- checks


def _math_attention(fn):
    """Run ``fn`` with ``scaled_dot_product_attention`` on PyTorch's math backend: the fused CPU
    kernels have neither a double backward (Hessian-vector products) nor a vmap rule for
    per-example gradients."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]):
            return fn(*args, **kwargs)
    return wrapped


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def _check_data(data) -> Data:
    inp = check_data(data)
    return inp.x, inp.y


def _check_batch_size(batch_size) -> Optional[int]:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be None (all at once) or an integer >= 1, got {batch_size!r}")
    return batch_size


def _check_input_shape(input_shape) -> Tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive integers (one example's shape), "
                         f"got {input_shape!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a sequence of positive integers (one example's shape), "
                         f"got {input_shape!r}")
    return shape


# ----------------------------------------------------------------------------- helpers


def _split(model: nn.Module) -> Tuple[List[str], List[Tensor], Dict[str, Tensor]]:
    """Names and detached values of the trainable parameters, and everything else (frozen
    parameters and buffers) as a fixed state."""
    names, values, fixed = [], [], {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.append(n)
            values.append(p.detach())
        else:
            fixed[n] = p.detach()
    fixed.update({n: b.detach() for n, b in model.named_buffers()})
    if not names:
        raise ValueError("model must have at least one trainable parameter (requires_grad), got 0")
    return names, values, fixed


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy in float64 (logits (..., classes), targets (...)), as
    ``logsumexp(z) - z_y``: the same value as ``F.cross_entropy``, but its first and second
    derivatives are plain elementwise ops, which vmap batches (``log_softmax``'s double backward
    falls back to a per-sample loop under vmap, hundreds of times slower for small models)."""
    z = logits.reshape(-1, logits.shape[-1]).double()
    t = y.reshape(-1, 1)
    return (torch.logsumexp(z, 1) - z.gather(1, t).squeeze(1)).sum()


def _loss_sum(model: nn.Module, names: Sequence[str], values: Sequence[Tensor], fixed: Dict[str, Tensor],
              x: Tensor, y: Tensor) -> Tensor:
    logits = functional_call(model, (dict(zip(names, values)), fixed), (x,))
    return _ce_sum(logits, y)


def _mean_loss(model, names, values, fixed, x, y, batch_size) -> float:
    total = 0.0
    with torch.no_grad():
        for e0, e1 in chunks(len(x), batch_size):
            total += _loss_sum(model, names, values, fixed, x[e0:e1], y[e0:e1]).item()
    return total / y.numel()


def _gradient(model, names, values, fixed, x, y, batch_size) -> Tuple[float, List[Tensor]]:
    """Mean loss and its gradient (float64) over the trainable parameters."""
    leaves = [t.detach().requires_grad_() for t in values]
    total = 0.0
    acc = [torch.zeros_like(v, dtype=torch.float64) for v in values]
    for e0, e1 in chunks(len(x), batch_size):
        s = _loss_sum(model, names, leaves, fixed, x[e0:e1], y[e0:e1])
        gs = torch.autograd.grad(s, leaves, allow_unused=True, materialize_grads=True)
        for a, g in zip(acc, gs):
            a += g.double()
        total += s.item()
    n = y.numel()
    return total / n, [a / n for a in acc]


# ----------------------------------------------------------------------------- results


@dataclass
class Estimate:
    """A Monte Carlo estimate: the mean of ``samples`` draws and its standard error (the sample
    standard deviation, ddof=1, over sqrt(samples); NaN for a single draw). ``float(estimate)``
    is the value."""

    value: float
    stderr: float
    samples: int

    def __float__(self) -> float:
        return float(self.value)


def _estimate(draws: Tensor) -> Estimate:
    draws = draws.double()
    n = draws.numel()
    se = (draws.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return Estimate(value=draws.mean().item(), stderr=se, samples=n)


class LossAccuracy(NamedTuple):
    """Mean cross-entropy and accuracy over the data."""

    loss: float
    accuracy: float


# ----------------------------------------------------------------------------- metrics


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), each shared tensor counted once."""
    _check_model(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_and_accuracy(model: nn.Module, data: Data, *, batch_size: Optional[int] = None) -> LossAccuracy:
    """Mean cross-entropy ``(1/N) sum_i CE(f(x_i), y_i)`` and accuracy ``(1/N) sum_i
    [argmax_c f_c(x_i) = y_i]`` of the model in eval mode: the "loss/accuracy after adaptation"
    baseline when given the adapted model.

    Returns:
        :class:`LossAccuracy` ``(loss, accuracy)``, floats.
    """
    _check_model(model)
    x, y = _check_data(data)
    batch_size = _check_batch_size(batch_size)
    loss, correct = 0.0, 0
    with evaluating(model), torch.no_grad():
        for e0, e1 in chunks(len(x), batch_size):
            logits = model(x[e0:e1])
            t = y[e0:e1]
            loss += _ce_sum(logits, t).item()
            correct += (logits.reshape(-1, logits.shape[-1]).argmax(-1) == t.reshape(-1)).sum().item()
    return LossAccuracy(loss=loss / y.numel(), accuracy=correct / y.numel())


def _full_gradient(model: nn.Module, data: Data, batch_size: Optional[int]):
    """The trainable parameters' values and the gradient of the mean loss over all of ``data``
    (checked inputs, eval mode)."""
    _check_model(model)
    x, y = _check_data(data)
    batch_size = _check_batch_size(batch_size)
    with evaluating(model):
        names, values, fixed = _split(model)
        _, g = _gradient(model, names, values, fixed, x, y, batch_size)
    return values, g


def gradient_norm(model: nn.Module, data: Data, *, batch_size: Optional[int] = None) -> float:
    """Euclidean norm of the gradient of the mean loss, ``||grad_theta L(theta)||_2``, over all
    trainable parameters together (the "grad_norm" zero-cost proxy of Abdelfattah et al. 2021,
    "Zero-Cost Proxies for Lightweight NAS", which sums per-layer norms instead; here it is the
    norm of the one full gradient vector)."""
    _, g = _full_gradient(model, data, batch_size)
    return math.sqrt(sum(t.pow(2).sum().item() for t in g))


def snip(model: nn.Module, data: Data, *, batch_size: Optional[int] = None) -> float:
    """SNIP connection sensitivity summed over the network, ``sum_j |theta_j * dL/dtheta_j|``
    (Lee, Ajanthan and Torr 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR; summed as a NAS proxy by Abdelfattah et al. 2021).

    ``theta_j * dL/dtheta_j`` is the derivative of the loss with respect to a multiplicative mask
    on parameter j at 1. The sum runs over every trainable parameter, biases and normalisation
    parameters included (the zero-cost-proxy code sums only convolution and linear weights);
    the gradient is that of the mean loss over the whole data.
    """
    values, g = _full_gradient(model, data, batch_size)
    return sum((v.double() * gi).abs().sum().item() for v, gi in zip(values, g))


def synflow(model: nn.Module, *, input_shape: Sequence[int]) -> float:
    """SynFlow (Tanaka, Kunin, Yamins and Ganguli 2020, "Pruning neural networks without any
    data by iteratively conserving synaptic flow", NeurIPS): data-free.

    On a float64 copy of the model in eval mode, every floating tensor of the state dict is
    replaced by its absolute value (parameters and buffers, as the reference implementation's
    ``linearize`` does, so BatchNorm in eval mode computes ``(x - |mu|) / sqrt(var + eps) *
    |gamma| + |beta|``); the input is all ones of shape ``(1, *input_shape)``; ``R = sum of the
    outputs``; the score is ``sum_j |theta_j| * dR/d|theta_j|`` over every trainable parameter
    (biases included; all terms are non-negative). For a bias-free linear network of depth D
    without nonlinearity, R is homogeneous of degree 1 in each layer's weights, so the score is
    ``D * R``. Needs floating-point inputs; can overflow to inf for very deep networks.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    m = copy.deepcopy(model).double()
    m.eval()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    params = [p for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model must have at least one trainable parameter (requires_grad), got 0")
    device = params[0].device
    R = m(torch.ones((1, *shape), dtype=torch.float64, device=device)).sum()
    g = torch.autograd.grad(R, params, allow_unused=True, materialize_grads=True)
    return sum((p.detach() * gi).sum().item() for p, gi in zip(params, g))


@_math_attention
def fisher(model: nn.Module, data: Data, *, batch_size: Optional[int] = None) -> float:
    """Trace of the empirical Fisher information, ``(1/N) sum_i ||grad_theta l_i(theta)||^2``,
    with ``l_i`` the cross-entropy of example i at its true label (Kunstner, Balles and Hennig
    2019, "Limitations of the empirical Fisher approximation", NeurIPS, call this the empirical
    Fisher; its trace is ``tr(F_emp) = (1/N) sum_i ||g_i||^2``).

    This is the parameter-space variant; the "fisher" zero-cost proxy of Turner et al. 2020
    (BlockSwap) and Abdelfattah et al. 2021 is a different quantity (per-channel
    ``(sum activation * gradient)^2``, after Theis et al. 2018). Per-example gradients come from
    ``torch.func.vmap`` over ``torch.func.grad`` with ``functional_call``, in chunks of
    ``batch_size`` examples, further split so that at most about 256 MiB of per-example gradients
    exist at once.
    """
    _check_model(model)
    x, y = _check_data(data)
    batch_size = _check_batch_size(batch_size)
    with evaluating(model):
        names, values, fixed = _split(model)
        per_example = max(1, _PER_EXAMPLE_BYTES // max(1, sum(v.numel() * v.element_size() for v in values)))
        size = min(batch_size or len(x), per_example)

        def loss_i(vals, xi, yi):
            return _loss_sum(model, names, vals, fixed, xi.unsqueeze(0), yi.unsqueeze(0)) / yi.numel()

        per_grad = vmap(grad(loss_i), in_dims=(None, 0, 0))
        total = 0.0
        for e0, e1 in chunks(len(x), size):
            gs = per_grad(list(values), x[e0:e1], y[e0:e1])
            total += sum(g.double().pow(2).sum().item() for g in gs)
    return total / len(x)


def jacob_cov(model: nn.Module, data: Data, *, n: int = 128, seed: int = 0,
              batch_size: Optional[int] = None) -> float:
    """Jacobian covariance score of Mellor, Turner, Storkey and Crowley, "Neural Architecture
    Search without Training" (arXiv:2006.04647 v1, 2020; the ICML 2021 version replaced it by a
    ReLU-code kernel). Higher is better.

    The examples are ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n]``
    (all N when n >= N). For each, ``J_i = d(sum_c f_c(x_i)) / dx_i``, flattened; in eval mode
    examples do not interact, so one backward of the summed outputs gives every J_i. With ``C``
    the correlation matrix of the rows J_i (``np.corrcoef(J)``) and ``sigma`` its eigenvalues
    (``eigvalsh``, float64, round-off negatives clipped to 0), the score is
    ``-sum_j [log(sigma_j + k) + 1 / (sigma_j + k)]``, ``k = 1e-5``.

    Degenerate rows: a Jacobian with no variance across its entries (a zero Jacobian, or all
    entries equal, up to round-off) has no defined correlation (``np.corrcoef`` gives NaN). Such
    a row gets zero correlation with everything, itself included, so it contributes an
    eigenvalue 0: the worst term, ``-(log k + 1/k)``, as for a network that maps that example to
    no information, consistent with the limit of a network whose Jacobians all coincide. The
    score is always finite. Needs floating-point inputs.
    """
    _check_model(model)
    x, y = _check_data(data)
    int_at_least("n", n)
    batch_size = _check_batch_size(batch_size)
    if not x.is_floating_point():
        raise ValueError(f"jacob_cov needs floating-point inputs (it differentiates by them), "
                         f"got dtype {x.dtype}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: min(n, len(x))].to(x.device)
    xs = x[idx]
    rows = []
    with evaluating(model):
        state = P.state_of(model)
        for e0, e1 in chunks(len(xs), batch_size):
            xc = xs[e0:e1].detach().clone().requires_grad_()
            out = functional_call(model, state, (xc,))
            (J,) = torch.autograd.grad(out.sum(), xc, allow_unused=True, materialize_grads=True)
            rows.append(J.reshape(len(xc), -1).double())
    return _jacob_cov_score(torch.cat(rows))


def _jacob_cov_score(J: Tensor, k: float = 1e-5) -> float:
    centred = J - J.mean(1, keepdim=True)
    norms = centred.norm(dim=1)
    degenerate = norms <= 64 * torch.finfo(torch.float64).eps * J.norm(dim=1)
    unit = centred / torch.where(degenerate, torch.ones_like(norms), norms)[:, None]
    unit[degenerate] = 0
    sigma = torch.linalg.eigvalsh(unit @ unit.T).clamp_min(0)
    return -(torch.log(sigma + k) + 1 / (sigma + k)).sum().item()


class _Curvature:
    """Hessian-vector products of the mean loss over the trainable parameters (float64 flat
    vectors), by double backward through ``functional_call``, chunk by chunk. With one chunk the
    first-order graph is built once and reused for every product."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: Optional[int]):
        self.model, self.x, self.y = model, x, y
        self.names, values, self.fixed = _split(model)
        self.leaves = [v.detach().requires_grad_() for v in values]
        self.size = sum(v.numel() for v in values)
        self.chunks = chunks(len(x), batch_size)
        self.total = y.numel()
        self._cached = None

    def gradient_graph(self, e0: int, e1: int) -> List[Tensor]:
        """The chunk's summed-loss gradient, with its graph (for a second differentiation)."""
        if len(self.chunks) == 1 and self._cached is not None:
            return self._cached
        s = _loss_sum(self.model, self.names, self.leaves, self.fixed, self.x[e0:e1], self.y[e0:e1])
        g = list(torch.autograd.grad(s, self.leaves, create_graph=True, allow_unused=True,
                                     materialize_grads=True))
        if len(self.chunks) == 1:
            self._cached = g
        return g

    def product(self, g: List[Tensor], v: Tensor) -> Tensor:
        """``H_chunk v`` (flat, float64) for the chunk whose gradient graph is ``g``; ``v`` is one
        vector (P,) or a block (b, P) of them, multiplied in one vmapped backward."""
        live = [i for i, t in enumerate(g) if t.requires_grad]
        if not live:
            return torch.zeros_like(v)
        lead = tuple(v.shape[:-1])
        parts = v.split([t.numel() for t in self.leaves], dim=-1)
        vs = [p.reshape(*lead, *t.shape).to(t.dtype) for p, t in zip(parts, self.leaves)]
        hv = torch.autograd.grad([g[i] for i in live], self.leaves, [vs[i] for i in live],
                                 retain_graph=True, allow_unused=True, is_grads_batched=bool(lead))
        return torch.cat([(h if h is not None else torch.zeros_like(t)).reshape(*lead, -1).double()
                          for h, t in zip(hv, vs)], -1)

    def hvp(self, v: Tensor) -> Tensor:
        """``H v`` for the mean loss over the whole data."""
        out = torch.zeros(self.size, dtype=torch.float64, device=v.device)
        for e0, e1 in self.chunks:
            out += self.product(self.gradient_graph(e0, e1), v)
        return out / self.total


@_math_attention
def hessian_trace(model: nn.Module, data: Data, *, probes: int = 64, seed: int = 0,
                  batch_size: Optional[int] = None) -> Estimate:
    """Trace of the Hessian of the mean loss by Hutchinson's estimator (Hutchinson 1990; as a
    flatness measure e.g. Yao et al. 2020, "PyHessian"): ``tr(H) ~ mean_p v_p^T H v_p`` over
    ``probes`` Rademacher vectors ``v_p`` (entries +-1, drawn from
    ``torch.Generator().manual_seed(seed)``). Lower is flatter.

    Hessian-vector products by double backward through ``functional_call`` (for small models,
    several probes per backward, vmapped); the product for the mean loss is the size-weighted sum
    of the chunks' products, so every chunk sees the same probes. Each draw has variance
    ``2 sum_{i != j} H_ij^2``.

    Returns:
        :class:`Estimate` (``value``, ``stderr`` from the draws' sample standard deviation,
        ``samples = probes``); ``float()`` of it is the value.
    """
    _check_model(model)
    x, y = _check_data(data)
    int_at_least("probes", probes)
    batch_size = _check_batch_size(batch_size)
    with evaluating(model):
        curv = _Curvature(model, x, y, batch_size)
        device = curv.leaves[0].device
        block = max(1, min(probes, _PROBE_BLOCK_ELEMS // curv.size))
        draws = torch.zeros(probes, dtype=torch.float64)
        for e0, e1 in curv.chunks:
            g = curv.gradient_graph(e0, e1)
            gen = torch.Generator().manual_seed(seed)  # the same probes for every chunk
            for p0 in range(0, probes, block):
                b = min(block, probes - p0)
                V = torch.randint(0, 2, (b, curv.size), generator=gen, dtype=torch.float64).to(device) * 2 - 1
                HV = curv.product(g, V) if b > 1 else curv.product(g, V[0])[None]
                draws[p0:p0 + b] += (V * HV).sum(1).cpu()
            del g
        curv._cached = None
    return _estimate(draws / curv.total)


@_math_attention
def hessian_top_eigenvalue(model: nn.Module, data: Data, *, iters: int = 50, tol: float = 1e-4,
                           seed: int = 0, batch_size: Optional[int] = None) -> float:
    """The largest (algebraic) eigenvalue of the Hessian of the mean loss: the usual sharpness
    measure (Keskar et al. 2017; Cohen et al. 2021, "Gradient descent on neural networks typically
    occurs at the edge of stability"). Lower is flatter.

    Lanczos iteration with full reorthogonalisation on Hessian-vector products (double backward
    through ``functional_call``), from a Gaussian start vector drawn from
    ``torch.Generator().manual_seed(seed)``. Unlike plain power iteration it returns the largest
    algebraic eigenvalue even when a negative eigenvalue is larger in magnitude, and it converges
    faster. It stops after ``iters`` products or once the top Ritz pair's residual
    ``||H u - lambda u||`` is at most ``tol * |lambda|`` (which bounds the eigenvalue's error);
    when ``iters`` runs out first it warns (RuntimeWarning) and returns the current estimate.
    Memory: ``iters`` float64 vectors of the parameter count, for the Lanczos basis.
    """
    _check_model(model)
    x, y = _check_data(data)
    int_at_least("iters", iters)
    positive("tol", tol)
    batch_size = _check_batch_size(batch_size)
    with evaluating(model):
        curv = _Curvature(model, x, y, batch_size)
        device = curv.leaves[0].device
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(curv.size, generator=gen, dtype=torch.float64).to(device)
        q /= q.norm()
        basis: List[Tensor] = []
        alphas: List[float] = []
        betas: List[float] = []
        for it in range(iters):
            basis.append(q)
            w = curv.hvp(q)
            alphas.append(torch.dot(w, q).item())
            Q = torch.stack(basis)
            for _ in range(2):  # classical Gram-Schmidt, twice, against the whole basis
                w = w - Q.T @ (Q @ w)
            beta = w.norm().item()
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                T += torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(T)
            top = evals[-1].item()
            residual = beta * abs(evecs[-1, -1].item())
            if residual <= tol * abs(top) or beta == 0.0 or it + 1 == curv.size:
                break
            betas.append(beta)
            q = w / beta
        else:
            warnings.warn(f"hessian_top_eigenvalue did not converge in iters={iters} Hessian-vector "
                          f"products: residual {residual:.3g} > tol * |lambda| = {tol * abs(top):.3g}",
                          RuntimeWarning, stacklevel=2)
        curv._cached = None
    return top


def sam_sharpness(model: nn.Module, data: Data, *, rho: float = 0.05,
                  batch_size: Optional[int] = None) -> float:
    """SAM sharpness (Foret, Kleiner, Mobahi and Neyshabur 2021, "Sharpness-Aware Minimization
    for Efficiently Improving Generalization", ICLR): ``L(theta + rho * g / ||g||) - L(theta)``
    with ``g = grad L(theta)`` over all trainable parameters and the whole data: the first-order
    solution of ``max_{||eps|| <= rho} L(theta + eps)``, one ascent step (not the per-batch
    m-sharpness). 0 where the gradient is zero. Lower is flatter.
    """
    _check_model(model)
    x, y = _check_data(data)
    rho = positive("rho", rho)
    batch_size = _check_batch_size(batch_size)
    with evaluating(model):
        names, values, fixed = _split(model)
        loss, g = _gradient(model, names, values, fixed, x, y, batch_size)
        norm = math.sqrt(sum(t.pow(2).sum().item() for t in g))
        if norm == 0.0:
            return 0.0
        moved = [(v.double() + (rho / norm) * gi).to(v.dtype) for v, gi in zip(values, g)]
        return _mean_loss(model, names, moved, fixed, x, y, batch_size) - loss


def perturbation_flatness(model: nn.Module, data: Data, *, sigma: float = 0.05, n: int = 16,
                          seed: int = 0, kind: str = "filter", batch_size: Optional[int] = None,
                          engine: str = "fused") -> Estimate:
    """Random-perturbation flatness (Keskar et al. 2017, "On Large-Batch Training for Deep
    Learning"; Jiang et al. 2020, "Fantastic Generalization Measures and Where to Find Them"):
    ``mean_i [L(theta + sigma * d_i) - L(theta)]`` over ``n`` random directions. Lower is flatter.

    The directions are :func:`manifold_ext.params.random_direction` of the trainable parameters,
    drawn in turn from one ``torch.Generator().manual_seed(seed)``: ``kind="filter"`` rescales
    each filter to the norm of the same filter of theta (Li et al. 2018, so sigma is relative to
    the weights' scale), ``"gaussian"`` is i.i.d. N(0, 1) (sigma in raw parameter units); both
    leave 1-D tensors (biases, normalisation parameters) unperturbed, as Li et al. do. All n + 1
    points are evaluated in one batched call of :func:`manifold_ext.engine.evaluate` (vertices
    theta and theta + sigma d_i, identity coefficients) with ``bn="interpolate"``: each point keeps
    theta's BatchNorm running statistics, so L matches the eval-mode loss (``bn="recompute"``
    would re-estimate them from the data). L(theta) is the engine's own value at theta, so both
    terms are computed alike. ``engine="loop"`` serves models that cannot run under vmap.

    Returns:
        :class:`Estimate` over the n directions (``float()`` of it is the value).
    """
    _check_model(model)
    x, y = _check_data(data)
    sigma = positive("sigma", sigma)
    int_at_least("n", n)
    batch_size = _check_batch_size(batch_size)
    if kind not in ("filter", "gaussian"):
        raise ValueError(f"kind must be 'filter' or 'gaussian', got {kind!r}")
    names, _, _ = _split(model)
    center = P.state_of(model)
    g = torch.Generator().manual_seed(seed)
    vertices = [center]
    for _ in range(n):
        d = P.random_direction(center, names=names, kind=kind, generator=g)
        vertices.append({k: (t + sigma * d[k]) if t.is_floating_point() else t for k, t in center.items()})
    dtype = next(t for t in center.values() if t.is_floating_point()).dtype
    coeffs = torch.eye(n + 1, dtype=dtype, device=next(iter(center.values())).device)
    with evaluating(model):
        ev = evaluate(model, vertices, coeffs, (x, y), bn="interpolate", engine=engine,
                      batch_size=batch_size, quiet=True)
    loss = ev.loss.double()
    return _estimate(loss[1:] - loss[0])


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: what it measures, and which way it is expected to point
    (``+1``: larger values are expected to predict a larger gain; ``-1``: smaller ones)."""

    description: str
    orientation: int


BASELINES: "OrderedDict[str, Baseline]" = OrderedDict([
    ("parameters", Baseline("trainable parameter count", +1)),
    ("loss", Baseline("mean cross-entropy of the given (adapted) model", -1)),
    ("accuracy", Baseline("accuracy of the given (adapted) model", +1)),
    ("grad_norm", Baseline("||grad L||_2 over all trainable parameters", +1)),
    ("snip", Baseline("SNIP, sum |theta * grad L| (Lee et al. 2019)", +1)),
    ("synflow", Baseline("SynFlow, data-free (Tanaka et al. 2020)", +1)),
    ("fisher", Baseline("trace of the empirical Fisher, (1/N) sum ||grad l_i||^2", +1)),
    ("jacob_cov", Baseline("NASWOT v1 Jacobian covariance score (Mellor et al.)", +1)),
    ("hessian_trace", Baseline("Hutchinson estimate of tr(H); lower is flatter", -1)),
    ("hessian_top_eig", Baseline("largest Hessian eigenvalue (Lanczos); lower is flatter", -1)),
    ("sam_sharpness", Baseline("L(theta + rho g/||g||) - L(theta) (Foret et al. 2021)", -1)),
    ("perturbation_flatness", Baseline("mean L(theta + sigma d) - L(theta), random d", -1)),
])


# Metrics defined through real-valued inputs (an all-ones input, or gradients with respect to the
# input): NaN for integer inputs such as token ids.
_NEEDS_REAL_INPUTS = ("synflow", "jacob_cov")


@dataclass
class BaselineReport(Result):
    """Values of the baselines computed (name -> float, in :data:`BASELINES` order), the seconds
    each took, and the standard errors of the Monte Carlo ones (``hessian_trace``,
    ``perturbation_flatness``). ``loss`` and ``accuracy`` come from one evaluation; both report
    its time."""

    values: Dict[str, float]
    seconds: Dict[str, float]
    stderr: Dict[str, float] = field(default_factory=dict)


class _Classifier(nn.Module):
    """A model seen as the classifier the metrics expect: its logits as a tensor (from a Hugging
    Face ``ModelOutput`` or a tuple), and for a language model the logits of every position but
    the last, each predicting the next token."""

    def __init__(self, model: nn.Module, next_token: bool):
        super().__init__()
        self.model = model
        self.next_token = next_token

    def forward(self, x: Tensor) -> Tensor:
        out = logits_of(self.model(x))
        return out[:, :-1] if self.next_token else out


def _as_classifier(model: nn.Module, data: Data, loss: str) -> Tuple[nn.Module, Data]:
    """``(model, data)`` in the form every metric takes: for ``loss="lm"``, token sequences
    ``(input_ids, labels)`` become per-position targets ``labels[:, 1:]``; a model whose output
    is not a tensor is wrapped to return its logits."""
    if loss not in ("cross_entropy", "lm"):
        raise ValueError(f"loss must be 'cross_entropy' or 'lm' for the baselines, got {loss!r}")
    x, y = _check_data(data)
    if loss == "lm":
        if x.dim() != 2 or y.shape != x.shape or x.shape[1] < 2:
            raise ValueError(f"loss='lm' expects input_ids and labels of one shape (N, T), T >= 2, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if (y < 0).any():
            raise ValueError("the baselines take no ignored labels (negative, e.g. -100): pass "
                             "sequences without padding")
        return _Classifier(model, True), (x, y[:, 1:])
    with evaluating(model), torch.no_grad():
        out = model(x[:1])
    return (model if isinstance(out, Tensor) else _Classifier(model, False)), (x, y)


def compute_baselines(model: nn.Module, data: Data, *, input_shape: Optional[Sequence[int]] = None,
                      seed: int = 0, batch_size: Optional[int] = None, loss: str = "cross_entropy",
                      include: Optional[Iterable[str]] = None, quiet: bool = False) -> BaselineReport:
    """Every baseline of :data:`BASELINES` (or those named in ``include``) with default settings.

    Args:
        model: the classifier (in the compare workflow, the adapted candidate).
        data: (inputs, targets), the probe set.
        input_shape: one example's input shape, for SynFlow (default: ``data[0].shape[1:]``).
        seed: for the random metrics (jacob_cov, hessian_trace, hessian_top_eig,
            perturbation_flatness).
        batch_size: examples per chunk for every data-dependent metric (default all).
        include: names to compute (any order; reported in registry order); unknown names are a
            ValueError listing the valid ones.
        loss: ``"cross_entropy"`` (default), or ``"lm"`` for a language model on token
            sequences ``(input_ids, labels)``: every position but the last is an example whose
            target is the next label. Models returning a Hugging Face ``ModelOutput`` work with
            either.
        quiet: no progress bar (there is none either when stderr is not a terminal).

    Returns:
        :class:`BaselineReport`. An exception from a metric propagates with a note naming it.
        ``synflow`` and ``jacob_cov`` are NaN for integer inputs (token ids): both need
        real-valued inputs.
    """
    _check_model(model)
    model, (x, y) = _as_classifier(model, data, loss)
    batch_size = _check_batch_size(batch_size)
    shape = _check_input_shape(x.shape[1:] if input_shape is None else input_shape)
    if include is None:
        names = list(BASELINES)
    else:
        wanted = [include] if isinstance(include, str) else list(include)
        unknown = [w for w in wanted if w not in BASELINES]
        if unknown:
            raise ValueError(f"include has unknown baseline names {unknown}; valid names are "
                             f"{list(BASELINES)}")
        names = [n for n in BASELINES if n in wanted]
    d = (x, y)
    runners = {
        "parameters": lambda: parameter_count(model),
        "grad_norm": lambda: gradient_norm(model, d, batch_size=batch_size),
        "snip": lambda: snip(model, d, batch_size=batch_size),
        "synflow": lambda: synflow(model, input_shape=shape),
        "fisher": lambda: fisher(model, d, batch_size=batch_size),
        "jacob_cov": lambda: jacob_cov(model, d, seed=seed, batch_size=batch_size),
        "hessian_trace": lambda: hessian_trace(model, d, seed=seed, batch_size=batch_size),
        "hessian_top_eig": lambda: hessian_top_eigenvalue(model, d, seed=seed, batch_size=batch_size),
        "sam_sharpness": lambda: sam_sharpness(model, d, batch_size=batch_size),
        "perturbation_flatness": lambda: perturbation_flatness(model, d, seed=seed, batch_size=batch_size),
    }
    values: Dict[str, float] = {}
    seconds: Dict[str, float] = {}
    stderr: Dict[str, float] = {}
    shared: List[Tuple[LossAccuracy, float]] = []  # loss and accuracy: one evaluation
    bar = tqdm(names, desc="baselines", unit="metric", leave=False, disable=quiet or not sys.stderr.isatty())
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            if name in ("loss", "accuracy"):
                if not shared:
                    result = loss_and_accuracy(model, d, batch_size=batch_size)
                    shared.append((result, time.perf_counter() - start))
                values[name] = float(getattr(shared[0][0], name))
                seconds[name] = shared[0][1]
                continue
            if name in _NEEDS_REAL_INPUTS and not x.is_floating_point():
                values[name], seconds[name] = math.nan, 0.0  # no gradient w.r.t. token ids
                continue
            result = runners[name]()
        except Exception as err:
            err.add_note(f"while computing baseline {name!r}")
            raise
        seconds[name] = time.perf_counter() - start
        values[name] = float(result)
        if isinstance(result, Estimate):
            stderr[name] = result.stderr
    bar.close()
    return BaselineReport(values=values, seconds=seconds, stderr=stderr)


__all__ = [
    "BASELINES", "Baseline", "BaselineReport", "Estimate", "LossAccuracy", "compute_baselines",
    "parameter_count", "loss_and_accuracy", "gradient_norm", "snip", "synflow", "fisher",
    "jacob_cov", "hessian_trace", "hessian_top_eigenvalue", "sam_sharpness", "perturbation_flatness",
]
