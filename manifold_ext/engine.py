"""Evaluate a model at B interpolated parameter points in one batched pass.

Point b has parameters ``theta_b = sum_k coeffs[b, k] * theta_k`` for K vertices of one
architecture. The fused engine runs the model once under ``torch.func.vmap`` over the points:
``nn.Linear`` layers go through :func:`manifold_ext.interp_linear` (K weight copies, never B; the
first layer in its shared-input form), a final ``nn.Linear`` of an ``nn.Sequential`` and the
cross-entropy through :func:`manifold_ext.interp_linear_cross_entropy`, and every other parameter
(convolutions, normalisation, embeddings) is materialised for one chunk of points at a time
(convolutions then run as grouped convolutions). An ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations (an MLP) skips vmap altogether: the ops take all points of a chunk at once.
``engine="loop"`` evaluates one point at a time by loading its state dict: the reference, and the
fallback for models that cannot run under vmap.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules import module as _module
from tqdm.auto import tqdm

from . import distributed as D
from . import params as P
from .ops import batched_cross_entropy, interp_linear, interp_linear_cross_entropy

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Evaluation:
    """Per-point results of :func:`evaluate`: mean loss and accuracy over the data, shape (B,)."""

    loss: Tensor
    accuracy: Tensor
    n_examples: int
    seconds: float


def _check_coeffs(coeffs: Tensor, K: int) -> Tensor:
    if not isinstance(coeffs, Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != K:
        shape = tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__
        raise ValueError(f"expected coeffs of shape (B, K) with K = {K} (the number of vertices), got {shape}")
    if not coeffs.is_floating_point():
        raise ValueError(f"expected floating-point coeffs, got {coeffs.dtype}")
    return coeffs


def _check_names(model: nn.Module, stacked: P.State) -> None:
    for name in P.state_of(model):
        if name not in stacked:
            raise ValueError(f"the vertices have no tensor {name!r}, which the model has: are they "
                             f"of another architecture?")


def _check_data(data) -> Tuple[Tensor, Tensor]:
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError("expected data to be a pair (inputs, targets) of tensors") from None
    if len(x) == 0:
        raise ValueError(f"data is empty: expected at least one example, got inputs of shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"inputs and targets disagree on the number of examples: {len(x)} vs {len(y)}")
    return x, y


def _non_finite(stacked: P.State, coeffs: Tensor) -> Tensor:
    """Mark the points that put non-zero weight on a vertex holding NaN or Inf (and warn, naming
    the parameter); such vertices are zeroed in ``stacked`` so that other points are unaffected."""
    bad = torch.zeros(coeffs.shape[0], dtype=torch.bool, device=coeffs.device)
    floats = [t for t in stacked.values() if t.is_floating_point()]
    # One synchronisation for the common case: a float64 sum is finite exactly when every term is
    # (for float64 parameters it can also overflow; then the exact check below finds nothing).
    if not floats or bool(torch.stack([t.sum(dtype=torch.float64) for t in floats]).isfinite().all()):
        return bad
    for name, t in stacked.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        for k in (~finite).nonzero().flatten().tolist():
            warnings.warn(f"vertex {k} has non-finite values in parameter {name!r}: points that "
                          f"use it get a NaN loss", RuntimeWarning, stacklevel=3)
            bad |= coeffs[:, k] != 0
            t[k] = torch.where(torch.isfinite(t[k]), t[k], torch.zeros_like(t[k]))
    return bad


# ----------------------------------------------------------------------------- fused engine


@contextlib.contextmanager
def _patched(modules: Dict[nn.Module, Callable]):
    """Temporarily replace the forward of some module instances (restoring any forward the
    instance itself carried)."""
    saved = {m: m.__dict__.get("forward") for m in modules}
    try:
        for m, fwd in modules.items():
            m.forward = fwd
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                del m.forward
            else:
                m.forward = old


def _linear_forward(W: Tensor, b: Optional[Tensor], coeffs_ref: List[Tensor]):
    def forward(inp: Tensor) -> Tensor:
        flat = inp.reshape(-1, inp.shape[-1])
        out = interp_linear(flat, W, b, coeffs_ref[0])
        return out.reshape(*inp.shape[:-1], W.shape[1])
    return forward


def _bn_forward(module: _BN, mode_ref: List[str], collected: List[Tensor]):
    def forward(inp: Tensor) -> Tensor:
        dims = [0] + list(range(2, inp.dim()))
        if mode_ref[0] == "collect":  # train-mode normalisation, as torch.optim.swa_utils.update_bn
            mean = inp.mean(dims)
            var = inp.var(dims, unbiased=False)
            n = inp.numel() // inp.shape[1]
            collected.extend([mean, var * n / max(n - 1, 1)])
        else:
            mean, var = module.running_mean, module.running_var
        shape = [1, -1] + [1] * (inp.dim() - 2)
        out = (inp - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
        if module.affine:
            out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
        return out
    return forward


def _mse_sum(out: Tensor, y: Tensor) -> Tensor:
    """Squared error summed over examples and averaged over outputs, so that its mean over the
    examples is ``F.mse_loss``'s mean over all elements."""
    out = out.reshape(len(y), -1)
    return (out - y.reshape(out.shape).to(out.dtype)).pow(2).mean(1).sum()


class _Fused:
    """The model prepared once for fused evaluation: which modules are interpolated how."""

    def __init__(self, model: nn.Module, stacked: P.State, loss: str):
        self.model = model
        self.loss = loss
        self.stacked = stacked
        self.coeffs_ref: List[Tensor] = [torch.empty(0)]
        self.mode_ref = ["apply"]
        self.collected: List[Tensor] = []
        self.linear_names = set()
        patches = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                pre = f"{name}." if name else ""
                W, b = stacked[pre + "weight"], stacked.get(pre + "bias")
                patches[m] = _linear_forward(W, b, self.coeffs_ref)
                self.linear_names.update({pre + "weight", pre + "bias"})
            elif isinstance(m, _BN):
                if not m.track_running_stats:
                    raise ValueError(f"BatchNorm {name!r} keeps no running statistics; not supported")
                patches[m] = _bn_forward(m, self.mode_ref, self.collected)
        self.patches = patches
        self.bn_names = [n for n, m in model.named_modules() if isinstance(m, _BN)]
        self.head = None
        if loss == "cross_entropy" and isinstance(model, nn.Sequential) and len(model) > 0 \
                and isinstance(model[-1], nn.Linear):
            self.head = str(len(model) - 1)
        self.body = model[:-1] if self.head is not None else model

    def materialise(self, coeffs: Tensor) -> P.State:
        """Per-point values (B, ...) of everything that is not a Linear layer's weight or bias."""
        out = {}
        for n, t in self.stacked.items():
            if n in self.linear_names:
                continue
            if t.is_floating_point():
                out[n] = torch.einsum("bk,k...->b...", coeffs.to(t.dtype), t)
            else:
                out[n] = t[0].expand(coeffs.shape[0], *t.shape[1:])
        return out

    def run(self, coeffs: Tensor, mat: P.State, x: Tensor, y: Tensor, mode: str):
        """One vmapped pass over the points of a chunk: (loss_sum, correct) or BN statistics."""
        self.mode_ref[0] = mode

        def one_point(c, p):
            self.coeffs_ref[0] = c
            self.collected.clear()
            h = functional_call(self.body, p, (x,), strict=False)
            if mode == "collect":
                return tuple(self.collected)
            if self.loss == "mse":
                return _mse_sum(h, y), torch.zeros((), dtype=torch.int64, device=h.device)
            if self.head is not None:
                W = self.stacked[f"{self.head}.weight"]
                b = self.stacked.get(f"{self.head}.bias")
                return interp_linear_cross_entropy(h.reshape(-1, h.shape[-1]), W, b, c, y.reshape(-1))
            return batched_cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1))

        try:
            with _patched(self.patches):
                return vmap(one_point)(coeffs, mat)
        except Exception as err:  # noqa: BLE001 - rethrown with the fallback named
            raise RuntimeError(
                f"the fused engine could not evaluate {type(self.model).__name__} under "
                f"torch.func.vmap ({type(err).__name__}: {err}); use evaluate(..., "
                "engine='loop'), which runs any model one point at a time") from err


    def recompute_bn(self, coeffs: Tensor, mat: P.State, x: Tensor, y: Tensor, ex_chunks) -> None:
        """Replace the running statistics in ``mat`` by those of the data, per point, as
        ``update_bn`` computes them: each chunk normalised by its own statistics, the running
        statistics their plain average."""
        if not self.bn_names:
            return
        sums = None
        for e0, e1 in ex_chunks:
            stats = self.run(coeffs, mat, x[e0:e1], y[e0:e1], "collect")
            sums = list(stats) if sums is None else [s + t for s, t in zip(sums, stats)]
        for i, name in enumerate(self.bn_names):
            pre = f"{name}." if name else ""
            mat[pre + "running_mean"] = sums[2 * i] / len(ex_chunks)
            mat[pre + "running_var"] = sums[2 * i + 1] / len(ex_chunks)


# ----------------------------------------------------------------------------- MLP chains

# Modules that act elementwise on any shape and hold no parameters: between nn.Linear layers they
# apply to a chunk's (P, N, width) activations as they are, so an MLP needs no vmap.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout)

# Points per pass of a chain: one layer's activations for the chunk stay near the caches.
# Measured on the digits MLP 64-256-256-10 (2 cores, 32 MiB L3), B=64 points of a line: at N=1797
# 1, 2, 4 and 8 points per pass took 188, 158, 144 and 157 ms; at N=64 all 64 points in one pass
# 5.7 ms, 16 points 6.7 ms (the vmap path 8.3 ms).
_CHAIN_BYTES = 8 << 20


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` runs more than its class's forward (hooks, a replaced forward)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
                or _module._global_forward_hooks or _module._global_forward_pre_hooks)


def _chain(model: nn.Module, x: Tensor) -> Optional[List[Tuple[str, nn.Module]]]:
    """The layers of ``model`` if it is a plain ``nn.Sequential`` of ``nn.Linear`` layers and
    parameter-free elementwise modules (with ``nn.Flatten`` only before the first Linear, and
    inputs that reach the first Linear as ``(N, in)``); None otherwise."""
    if type(model) is not nn.Sequential or _hooked(model):
        return None
    layers = list(model.named_children())
    first = next((i for i, (_, m) in enumerate(layers) if type(m) is nn.Linear), None)
    if first is None:
        return None
    for i, (_, m) in enumerate(layers):
        allowed = (nn.Linear,) + _ELEMENTWISE + ((nn.Flatten,) if i < first else ())
        if type(m) not in allowed or _hooked(m):
            return None
    h = x[:1]
    with torch.no_grad():
        for _, m in layers[:first]:
            h = m(h)
    return layers if h.dim() == 2 else None


def _chain_points(layers, x: Tensor, n_examples: int, max_memory: int) -> int:
    """Points per pass of a chain: its widest layer's activations under _CHAIN_BYTES, and the
    per-point parameters and activations of all layers under max_memory."""
    widths = [m.out_features for _, m in layers if isinstance(m, nn.Linear)]
    row = x.element_size() * n_examples
    cache = _CHAIN_BYTES // max(1, max(widths) * row)
    budget = max_memory // max(1, 2 * sum(widths) * row)
    return max(1, int(min(cache, budget)))


def _run_chain(layers, fused: "_Fused", coeffs: Tensor, x: Tensor, y: Tensor, inplace: bool):
    """(loss_sum, correct) per point of ``coeffs`` for a chain, all points in one pass of ops."""
    stacked = fused.stacked
    h, owned = x, False
    for i, (name, m) in enumerate(layers):
        if type(m) is nn.Linear:
            W, b = stacked[f"{name}.weight"], stacked.get(f"{name}.bias")
            if fused.head is not None and i == len(layers) - 1:
                return interp_linear_cross_entropy(h, W, b, coeffs, y.reshape(-1))
            h, owned = interp_linear(h, W, b, coeffs), True  # (P, N, out); (N, in) input shared
        elif type(m) is nn.ReLU and owned and inplace:
            h.relu_()  # a fresh output of an earlier module: no one else holds it
        else:
            out = m(h)
            # Flatten, Identity and Dropout in eval mode return the caller's data itself.
            owned = owned or out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
            h = out
    P = coeffs.shape[0]
    if fused.loss == "mse":
        out = h.reshape(P, len(y), -1)
        err = (out - y.reshape(1, *out.shape[1:]).to(out.dtype)).pow(2).mean(2).sum(1)
        return err, torch.zeros(P, dtype=torch.int64, device=h.device)
    return batched_cross_entropy(h, y.reshape(-1))


def _chunks(n: int, size: Optional[int]):
    size = n if not size else size
    return [(i, min(n, i + size)) for i in range(0, n, size)]


# Points per pass are also capped so that one pass's activations stay near the caches: B points
# at once stream B times one point's activations through memory between layers. Measured on the
# digits MLP 64-256-256-10 at N=1797 (2 cores, 32 MB L3): 64 points per pass 245 ms, 8 points
# 175 ms, 2 points 209 ms; at N=64 all 64 points in one pass are fastest.
_PASS_BYTES = 128 << 20


def _points_per_chunk(fused: _Fused, x: Tensor, n_examples: int, max_memory: int) -> int:
    """Points whose materialised parameters and activations fit in max_memory bytes (and in
    _PASS_BYTES)."""
    per_point = sum(t[0].numel() * t.element_size() for n, t in fused.stacked.items()
                    if n not in fused.linear_names)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.numel() * o.element_size())
                                     if isinstance(o, Tensor) else None)
             for m in fused.model.modules() if len(list(m.children())) == 0]
    was_training = fused.model.training
    try:
        fused.model.eval()  # no running-statistics updates on the caller's model
        with torch.no_grad():
            probe = x[: min(len(x), 8)]
            fused.model(probe)
    finally:
        fused.model.train(was_training)
        for h in hooks:
            h.remove()
    per_point += 2 * sum(acts) * n_examples // max(1, len(probe))
    return max(1, int(min(max_memory, _PASS_BYTES) // max(1, per_point)))


def _chunk_size(fused: _Fused, chain, x: Tensor, n_examples: int, max_memory: int) -> int:
    if chain is not None:
        return _chain_points(chain, x, n_examples, max_memory)
    return _points_per_chunk(fused, x, n_examples, max_memory)


def _progress(total: int, quiet: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="pt", leave=False,
                disable=quiet or not sys.stderr.isatty())


def _check_options(loss: str, bn: str) -> None:
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
    if bn not in ("recompute", "interpolate"):
        raise ValueError(f"bn must be 'recompute' or 'interpolate', got {bn!r}")


def _evaluate_fused(model, stacked, coeffs, x, y, *, loss, bn, batch_size, max_memory,
                    points_per_chunk, quiet):
    fused = _Fused(model, stacked, loss)
    B = coeffs.shape[0]
    n_ex = len(x)
    ex_chunks = _chunks(n_ex, batch_size)
    chain = _chain(model, x)
    if points_per_chunk is None:
        points_per_chunk = _chunk_size(fused, chain, x, ex_chunks[0][1] - ex_chunks[0][0], max_memory)
    loss_sum = torch.zeros(B, dtype=torch.float64, device=coeffs.device)
    correct = torch.zeros(B, dtype=torch.int64, device=coeffs.device)
    was_training = model.training
    model.eval()
    try:
        bar = _progress(B, quiet, "points")
        for p0, p1 in _chunks(B, points_per_chunk):
            c = coeffs[p0:p1]
            mat = fused.materialise(c)
            if bn == "recompute":
                fused.recompute_bn(c, mat, x, y, ex_chunks)
            for e0, e1 in ex_chunks:
                if chain is not None:
                    with torch.no_grad():
                        ls, cor = _run_chain(chain, fused, c, x[e0:e1], y[e0:e1], inplace=True)
                else:
                    ls, cor = fused.run(c, mat, x[e0:e1], y[e0:e1], "apply")
                loss_sum[p0:p1] += ls.double()
                correct[p0:p1] += cor
            bar.update(p1 - p0)
        bar.close()
    finally:
        model.train(was_training)
    return loss_sum, correct


# ----------------------------------------------------------------------------- loop engine


def _evaluate_loop(model, stacked, coeffs, x, y, *, loss, bn, batch_size, quiet):
    m = copy.deepcopy(model)
    keys = set(m.state_dict().keys())
    has_bn = any(isinstance(mod, _BN) for mod in m.modules())
    B = coeffs.shape[0]
    loss_sum = torch.zeros(B, dtype=torch.float64, device=coeffs.device)
    correct = torch.zeros(B, dtype=torch.int64, device=coeffs.device)
    chunks = _chunks(len(x), batch_size)
    bar = _progress(B, quiet, "points")
    for b in range(B):
        bar.update()
        state = P.combine(stacked, coeffs[b])
        m.load_state_dict({k: v for k, v in state.items() if k in keys})
        if bn == "recompute" and has_bn:
            torch.optim.swa_utils.update_bn([x[e0:e1] for e0, e1 in chunks], m)
        m.eval()
        with torch.no_grad():
            for e0, e1 in chunks:
                logits = m(x[e0:e1])
                if loss == "mse":
                    loss_sum[b] += _mse_sum(logits.double(), y[e0:e1])
                    continue
                logits = logits.reshape(-1, logits.shape[-1])
                t = y[e0:e1].reshape(-1)
                loss_sum[b] += F.cross_entropy(logits.double(), t, reduction="sum")
                correct[b] += (logits.argmax(-1) == t).sum()
    return loss_sum, correct


# ----------------------------------------------------------------------------- public


def evaluate(
    model: nn.Module,
    vertices: Sequence[P.Vertex],
    coeffs: Tensor,
    data: Tuple[Tensor, Tensor],
    *,
    loss: str = "cross_entropy",
    bn: str = "recompute",
    engine: str = "fused",
    batch_size: Optional[int] = None,
    max_memory: int = 1 << 30,
    points_per_chunk: Optional[int] = None,
    quiet: bool = False,
) -> Evaluation:
    """Mean loss and accuracy of ``model`` at every point ``sum_k coeffs[b, k] * vertices[k]``.

    Args:
        model: the architecture (its own parameters are not used); any module that runs under
            ``torch.func.functional_call`` and ``vmap`` for ``engine="fused"``, any at all for
            ``engine="loop"``. It must map inputs (N, ...) to logits (N, classes).
        vertices: K modules or state dicts of that architecture (a mismatch is a ValueError
            naming the first offending parameter).
        coeffs: (B, K) coefficients; values outside [0, 1] extrapolate.
        data: (inputs, targets), evaluated in chunks of ``batch_size`` examples (default all).
        loss: ``"cross_entropy"`` (targets are class indices), or ``"mse"`` (targets are
            ``(N, outputs)`` floats, or ``(N,)`` for one output; the loss is ``F.mse_loss``'s
            mean over all elements, and accuracy is NaN).
        bn: ``"recompute"`` (default): BatchNorm statistics of every point recomputed from the
            data, as ``torch.optim.swa_utils.update_bn`` does; ``"interpolate"``: the vertices'
            running statistics mixed like every other buffer.
        engine: ``"fused"`` (one batched pass over the points: vmapped, or for an MLP op by op)
            or ``"loop"`` (one point at a time; on CPU the faster one for convolutional models
            on many examples per point, e.g. 2x for a small CNN at N=1797).
        max_memory: bytes the fused engine may use for per-point parameters and activations;
            points are processed in chunks under it. Results do not depend on the chunking.
        points_per_chunk: overrides the chunk size derived from ``max_memory``.
        quiet: no progress bar (there is none either when stderr is not a terminal, or on a
            rank other than 0).

    Under ``torch.distributed`` (:mod:`manifold_ext.distributed`), the rows of ``coeffs`` are
    sharded across the ranks in blocks of whole chunks of points and every rank returns all the
    results, equal to a single process's.

    Returns:
        :class:`Evaluation` with ``loss`` and ``accuracy`` of shape (B,). A point that puts
        non-zero weight on a vertex holding NaN or Inf gets NaN (with a warning naming the
        parameter); the other points are unaffected.
    """
    _check_options(loss, bn)
    if engine not in ("fused", "loop"):
        raise ValueError(f"engine must be 'fused' or 'loop', got {engine!r}")
    start = time.perf_counter()
    stacked = P.stack(vertices)
    _check_names(model, stacked)
    first = next(iter(stacked.values()))
    coeffs = _check_coeffs(coeffs, first.shape[0]).to(first.device)
    x, y = _check_data(data)
    bad = _non_finite(stacked, coeffs)  # P.stack made new tensors: the caller's stay untouched
    if engine == "fused" and points_per_chunk is None and D.sharding():
        # Fixed here, so that every rank's chunks are the ones a single process would use.
        ex_rows = _chunks(len(x), batch_size)[0]
        points_per_chunk = _chunk_size(_Fused(model, stacked, loss), _chain(model, x), x,
                                       ex_rows[1] - ex_rows[0], max_memory)
    r0, r1 = D.shard(len(coeffs), points_per_chunk or 1) if D.sharding() else (0, len(coeffs))
    quiet = quiet or not D.is_main()
    if engine == "fused":
        loss_sum, correct = _evaluate_fused(model, stacked, coeffs[r0:r1], x, y, loss=loss, bn=bn,
                                            batch_size=batch_size,
                                            max_memory=max_memory, points_per_chunk=points_per_chunk,
                                            quiet=quiet)
    else:
        loss_sum, correct = _evaluate_loop(model, stacked, coeffs[r0:r1], x, y, loss=loss, bn=bn,
                                           batch_size=batch_size,
                                           quiet=quiet)
    if D.sharding():
        loss_sum, correct = D.gather_rows(loss_sum), D.gather_rows(correct)
    n_rows = len(y) if loss == "mse" else y.numel()
    mean = loss_sum / n_rows
    acc = correct.double() / n_rows
    mean[bad] = float("nan")
    acc[bad] = float("nan")
    if loss == "mse":
        acc[:] = float("nan")
    return Evaluation(loss=mean, accuracy=acc, n_examples=len(x),
                      seconds=time.perf_counter() - start)


def point_losses(
    model: nn.Module,
    stacked: P.State,
    coeffs: Tensor,
    data: Tuple[Tensor, Tensor],
    *,
    loss: str = "cross_entropy",
    bn: str = "recompute",
) -> Tensor:
    """Differentiable mean loss at every point ``sum_k coeffs[b, k] * vertex_k``, shape (B,).

    The training-time counterpart of :func:`evaluate`: one fused pass over all B points and the
    whole of ``data`` (a minibatch), no chunking, no NaN screening, and gradients flow to any
    tensor of ``stacked`` (``name -> (K, *shape)``, e.g. from :func:`manifold_ext.params.stack`
    with some vertices replaced by tensors that require grad) and to ``coeffs``, through the
    fused ops' backward. ``loss`` and ``bn`` are as in :func:`evaluate`.
    """
    _check_options(loss, bn)
    _check_names(model, stacked)
    first = next(iter(stacked.values()))
    coeffs = _check_coeffs(coeffs, first.shape[0]).to(first.device)
    x, y = _check_data(data)
    fused = _Fused(model, stacked, loss)
    chain = _chain(model, x)
    was_training = model.training
    model.eval()
    try:
        if chain is not None:
            loss_sum, _ = _run_chain(chain, fused, coeffs, x, y, inplace=False)
            return loss_sum / (len(y) if loss == "mse" else y.numel())
        mat = fused.materialise(coeffs)
        if bn == "recompute":
            fused.recompute_bn(coeffs, mat, x, y, [(0, len(x))])
        loss_sum, _ = fused.run(coeffs, mat, x, y, "apply")
    finally:
        model.train(was_training)
    return loss_sum / (len(y) if loss == "mse" else y.numel())
