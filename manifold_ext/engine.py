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
import math
import copy
import functools
import time
import warnings
from dataclasses import dataclass, field
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
from ._data import Inputs, check_data, chunks
from .outputs import logits as logits_of
from .training import evaluating

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Evaluation:
    """Per-point results of :func:`evaluate`: mean loss and accuracy over the data, shape (B,)."""

    loss: Tensor
    accuracy: Tensor
    n_examples: int
    seconds: float
    engine: str = "fused"  # the engine that evaluated the points ("fused" or "loop")


def _check_coeffs(coeffs: Tensor, K: int) -> Tensor:
    if not isinstance(coeffs, Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != K:
        shape = tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__
        raise ValueError(f"expected coeffs of shape (B, K) with K = {K} (the number of vertices), got {shape}")
    if not coeffs.is_floating_point():
        raise ValueError(f"expected floating-point coeffs, got {coeffs.dtype}")
    return coeffs


def _check_names(lay: P.Layout, stacked: P.State) -> None:
    for name in lay.names:
        if name not in stacked:
            raise ValueError(f"the vertices have no tensor {name!r}, which the model has: are they "
                             f"of another architecture?")


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


@dataclass
class _Call:
    """The state of one fused pass that the replaced forwards read: the point's coefficients
    (set by vmap for each point), whether BatchNorm layers apply their statistics or collect the
    chunk's, and the statistics collected. Every pass makes its own, so no state outlives a call."""

    mode: str
    coeffs: Optional[Tensor] = None
    collected: List[Tensor] = field(default_factory=list)


def _private_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree of ``model`` whose modules are new objects holding the same
    parameter and buffer tensors (no data is copied): the fused engine replaces forwards on it,
    never on the caller's modules, so concurrent and nested evaluations of one model cannot meet.
    A module used twice in the tree is one module in the copy; tied tensors stay tied."""
    made: Dict[int, nn.Module] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) not in made:
            c = copy.copy(m)
            made[id(m)] = c
            c.__dict__["_parameters"] = m._parameters.copy()
            c.__dict__["_buffers"] = m._buffers.copy()
            c.__dict__["_modules"] = type(m._modules)((k, None if v is None else copy_of(v))
                                                      for k, v in m._modules.items())
        return made[id(m)]

    return copy_of(model)


@contextlib.contextmanager
def _patched(patches: Dict[nn.Module, Callable], call: _Call):
    """Replace the forward of some modules of a private copy (:func:`_private_copy`) by
    ``patch(call, inp)`` for the duration of one pass, restoring any forward the instance itself
    carried."""
    saved = {m: m.__dict__.get("forward") for m in patches}
    try:
        for m, fn in patches.items():
            m.forward = functools.partial(fn, call)
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


def _linear_forward(W: Tensor, b: Optional[Tensor], call: _Call, inp: Tensor) -> Tensor:
    flat = inp.reshape(-1, inp.shape[-1])
    out = interp_linear(flat, W, b, call.coeffs)
    return out.reshape(*inp.shape[:-1], W.shape[1])


def _embedding_forward(W: Tensor, call: _Call, ids: Tensor) -> Tensor:
    """An embedding at the point: the K vertices' rows for the tokens, mixed (exact: a lookup is
    linear in the table), so no point's table is ever built."""
    rows = W[:, ids]  # (K, *ids.shape, dim)
    return torch.tensordot(call.coeffs.to(rows.dtype), rows, dims=1)


def _head_forward(call: _Call, inp: Tensor) -> Tensor:
    """The classifier head of a fused loss: hands its input on untouched (the model's 'logits'
    are then the head's inputs) and the loss applies the head inside the fused cross-entropy."""
    return inp


class _TooFewValues(ValueError):
    """A chunk too small to recompute a BatchNorm's statistics from (both engines raise it)."""


def _check_bn_values(name: str, inp: Tensor) -> None:
    """Recomputing statistics needs more than one value per channel, as BatchNorm in training mode
    does; both engines apply this rule, so they refuse the same chunks."""
    if inp.dim() >= 2 and inp.numel() // max(inp.shape[1], 1) <= 1:
        raise _TooFewValues(
            f"bn='recompute': BatchNorm {name!r} cannot recompute its statistics from one value per channel "
            f"(a chunk of input shape {tuple(inp.shape)}); pass a batch_size that leaves at least 2 examples "
            f"in every chunk, or bn='interpolate'")


def _bn_forward(module: _BN, name: str, call: _Call, inp: Tensor) -> Tensor:
    dims = [0] + list(range(2, inp.dim()))
    if call.mode == "collect":  # train-mode normalisation, as torch.optim.swa_utils.update_bn
        _check_bn_values(name, inp)
        mean = inp.mean(dims)
        var = inp.var(dims, unbiased=False)
        n = inp.numel() // inp.shape[1]
        call.collected.extend([mean, var * n / max(n - 1, 1)])
    else:
        mean, var = module.running_mean, module.running_var
    shape = [1, -1] + [1] * (inp.dim() - 2)
    out = (inp - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
    if module.affine:
        out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
    return out


def _mse_sum(out: Tensor, y: Tensor) -> Tensor:
    """Squared error summed over examples and averaged over outputs, so that its mean over the
    examples is ``F.mse_loss``'s mean over all elements."""
    out = out.reshape(len(y), -1)
    return (out - y.reshape(out.shape).to(out.dtype)).pow(2).mean(1).sum()


def _is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is Linear's own (subclasses that change it are not)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer storing its weight as ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor) \
        and m.weight.dim() == 2


def _is_embedding(m: nn.Module) -> bool:
    return type(m) is nn.Embedding and m.max_norm is None


def find_head(model: nn.Module, loss: str, head: Optional[str] = None) -> Optional[str]:
    """The module path of the classifier head that a fused loss applies itself, or None.

    ``head`` names it explicitly. Otherwise: for ``loss="lm"``, the model's output embeddings
    (``get_output_embeddings()``, as Hugging Face models have) or its last ``nn.Linear``; for
    ``loss="cross_entropy"``, the last layer of an ``nn.Sequential`` when it is an ``nn.Linear``.
    The head's output must be the model's logits unchanged (no scaling or capping after it)."""
    names = {m: n for n, m in model.named_modules()}
    if head is not None:
        try:
            m = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"head {head!r} is not a module of {type(model).__name__}") from None
        if not _is_linear(m):
            raise ValueError(f"head {head!r} must be an nn.Linear, got {type(m).__name__}")
        return head
    if loss == "lm":
        get = getattr(model, "get_output_embeddings", None)
        m = get() if callable(get) else None
        if m is not None and _is_linear(m) and m in names:
            return names[m]
        linears = [n for n, m in model.named_modules() if _is_linear(m)]
        return linears[-1] if linears else None
    if loss == "cross_entropy" and isinstance(model, nn.Sequential) and len(model) > 0 \
            and _is_linear(model[-1]):
        return list(model._modules)[-1]  # its name: an index, or the user's own name
    return None


@torch.no_grad()
def _check_head(model: nn.Module, head: str, x: Tensor, kwargs) -> None:
    """Raise ValueError unless the model's logits are its head's output unchanged, as the fused
    loss assumes (checked on one example, in eval mode, with the model's own weights)."""
    seen = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with evaluating(model):
            out = logits_of(model(x[:1].clone(), **_rows_of(kwargs, 0, 1)))
    finally:
        hook.remove()
    if len(seen) != 1 or seen[0].shape != out.shape or not torch.allclose(seen[0], out, rtol=1e-5, atol=1e-6):
        raise ValueError(f"the model's logits are not the output of its head {head!r} (called "
                         f"{len(seen)} times, or changed after it): pass head= naming the layer "
                         "whose output is the logits")


class _Unsupported(RuntimeError):
    """The fused engine cannot run this model (it does not run under vmap)."""


class _Fused:
    """The model prepared once for fused evaluation: which modules are interpolated how.

    Linear layers (and Hugging Face ``Conv1D``) go through ``interp_linear``, embeddings mix the
    vertices' rows, the head of a fused loss goes into ``interp_linear_cross_entropy``; every
    other tensor is materialised per point. A tied tensor is one stacked tensor for all its users,
    and it is materialised unless every module that uses it is interpolated on the fly."""

    def __init__(self, model: nn.Module, stacked: P.State, loss: str, *, lay: P.Layout,
                 head: Optional[str] = None, ignore_index: int = -100):
        self.model = model
        self.loss = loss
        self.stacked = stacked
        self.ignore_index = ignore_index
        self.head = find_head(model, loss, head)
        # The passes run a private copy in eval mode: its forwards are replaced, the caller's never.
        work = _private_copy(model).eval()
        patches, on_the_fly, users = {}, set(), {}
        mha = {id(c) for m in work.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}
        for name, m in work.named_modules():
            pre = f"{name}." if name else ""
            own = {lay.canonical(pre + n) for n, _ in m.named_parameters(recurse=False, remove_duplicate=False)}
            patch = None
            if id(m) in mha:
                patch = None  # nn.MultiheadAttention reads its projections' tensors itself
            elif name == self.head:
                patch = _head_forward
            elif _is_linear(m):
                W, b = stacked[lay.canonical(pre + "weight")], \
                    stacked.get(lay.canonical(pre + "bias")) if m.bias is not None else None
                patch = functools.partial(_linear_forward, W, b)
            elif _is_conv1d(m):
                W = stacked[lay.canonical(pre + "weight")].transpose(1, 2).contiguous()
                b = stacked.get(lay.canonical(pre + "bias"))
                patch = functools.partial(_linear_forward, W, b)
            elif _is_embedding(m):
                patch = functools.partial(_embedding_forward, stacked[lay.canonical(pre + "weight")])
            elif isinstance(m, _BN):
                if not m.track_running_stats:
                    raise ValueError(f"BatchNorm {name!r} keeps no running statistics; not supported")
                patches[m] = functools.partial(_bn_forward, m, name)
            for n in own:
                users.setdefault(n, []).append(patch is not None and not isinstance(m, _BN))
            if patch is not None:
                patches[m] = patch
                on_the_fly |= own
        self.patches = patches
        # Tensors every user of which builds them on the fly are never materialised.
        self.linear_names = {n for n in on_the_fly if all(users.get(n, [False]))}
        self.bn_names = [n for n, m in model.named_modules() if isinstance(m, _BN)]
        if self.head is not None:
            pre = f"{self.head}."
            m = model.get_submodule(self.head)
            self.head_weight = stacked[lay.canonical(pre + "weight")]
            self.head_bias = stacked.get(lay.canonical(pre + "bias")) if m.bias is not None else None
        self.body = work[:-1] if self.head is not None and loss == "cross_entropy" \
            and isinstance(work, nn.Sequential) else work

    def materialise(self, coeffs: Tensor) -> P.State:
        """Per-point values (B, ...) of everything not built on the fly."""
        out = {}
        for n, t in self.stacked.items():
            if n in self.linear_names:
                continue
            if t.is_floating_point():
                out[n] = torch.einsum("bk,k...->b...", coeffs.to(t.dtype), t)
            else:
                out[n] = t[0].expand(coeffs.shape[0], *t.shape[1:])
        return out

    def _loss(self, h, c, y, rows):
        """(loss_sum, correct) of one point from the model's output ``h``."""
        if self.loss == "mse":
            return _mse_sum(h, y), torch.zeros((), dtype=torch.int64, device=h.device)
        if self.loss == "lm":
            h = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)
            y = y[:, 1:].reshape(-1).index_select(0, rows)
        else:
            h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        if self.head is not None:
            return interp_linear_cross_entropy(h, self.head_weight, self.head_bias, c, y)
        return batched_cross_entropy(h, y)

    def run(self, coeffs: Tensor, mat: P.State, x: Tensor, y: Tensor, mode: str, kwargs=None):
        """One vmapped pass over the points of a chunk: (loss_sum, correct) or BN statistics."""
        call = _Call(mode)
        kwargs = kwargs or {}
        x = x.clone()  # one call of the model for every point: a copy it may change in place
        rows = _lm_rows(y, self.ignore_index) if self.loss == "lm" else None

        def one_point(c, p):
            call.coeffs = c
            call.collected.clear()
            out = functional_call(self.body, p, (x,), kwargs, strict=False)
            if mode == "collect":
                return tuple(call.collected)
            return self._loss(logits_of(out), c, y, rows)

        try:
            with _patched(self.patches, call), warnings.catch_warnings():
                # vmap's per-point fallback for an op without a batching rule (e.g. CPU flash
                # attention) is slower, which engine="auto" measures and weighs itself.
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet "
                                        "implemented the batching rule", category=UserWarning)
                return vmap(one_point)(coeffs, mat)
        except (torch.OutOfMemoryError, MemoryError, _TooFewValues):
            raise
        except Exception as err:  # noqa: BLE001 - rethrown with its real cause
            cause = self.plain_error(x, kwargs)
            if cause is not None:  # the model fails without vmap too: the loop cannot help
                raise cause from None
            raise _Unsupported(
                f"the fused engine could not evaluate {type(self.model).__name__} under "
                f"torch.func.vmap ({type(err).__name__}: {err}); use evaluate(..., "
                "engine='loop'), which runs any model one point at a time") from err

    @torch.no_grad()
    def plain_error(self, x: Tensor, kwargs=None) -> Optional[Exception]:
        """The error of the model itself, without vmap, on a copy of one example in eval mode:
        what it raises, or a ValueError when its logits do not have the shape the loss needs;
        None when it runs and fits (then only vmap failed)."""
        try:
            with evaluating(self.model):
                out = logits_of(self.model(x[:1].clone(), **_rows_of(kwargs or {}, 0, 1)))
        except Exception as err:  # noqa: BLE001 - handed back as the cause
            return err
        want = {"lm": "(1, T, vocab)", "cross_entropy": "(1, classes)"}.get(self.loss)
        if want is not None and (out.dim() != len(want.split(",")) or out.shape[0] != 1):
            return ValueError(f"the model's output does not fit loss={self.loss!r}: logits of shape "
                              f"{tuple(out.shape)} for 1 example of shape {tuple(x[:1].shape)}, expected {want}")
        return None

    def recompute_bn(self, coeffs: Tensor, mat: P.State, x: Tensor, y: Tensor, ex_chunks,
                     kwargs=None) -> None:
        """Replace the running statistics in ``mat`` by those of the data, per point, as
        ``update_bn`` computes them: each chunk normalised by its own statistics, the running
        statistics their plain average."""
        if not self.bn_names:
            return
        sums = None
        for e0, e1 in ex_chunks:
            stats = self.run(coeffs, mat, x[e0:e1], y[e0:e1], "collect", _rows_of(kwargs, e0, e1))
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

# Points per pass of a chain are capped so that one layer's activations for the chunk stay near
# the caches: past that, each layer streams them through memory again (the sweep behind the value
# is in docs/benchmarks.md, "Measurements behind the engine's constants").
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
    h = x[:1].clone()
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
            if not owned and getattr(m, "inplace", False):
                h, owned = h.clone(), True  # an in-place module must not change the caller's data
            out = m(h)
            # Flatten, Identity and Dropout in eval mode return the caller's data itself.
            owned = owned or out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
            h = out
    n_points = coeffs.shape[0]
    if fused.loss == "mse":
        out = h.reshape(n_points, len(y), -1)
        err = (out - y.reshape(1, *out.shape[1:]).to(out.dtype)).pow(2).mean(2).sum(1)
        return err, torch.zeros(n_points, dtype=torch.int64, device=h.device)
    return batched_cross_entropy(h, y.reshape(-1))


# Points per pass are also capped so that one pass's activations stay near the caches: B points
# at once stream B times one point's activations through memory between layers (the sweep behind
# the value is in docs/benchmarks.md, "Measurements behind the engine's constants").
_PASS_BYTES = 128 << 20


def _activation_bytes(fused: _Fused, x: Tensor, n_examples: int, kwargs=None) -> int:
    """Bytes of the activations one point's forward pass over ``n_examples`` examples produces,
    from a forward pass on a few examples (every leaf module's output; a fused head's output is
    never held, so it is not counted)."""
    acts = []
    head = fused.model.get_submodule(fused.head) if fused.head is not None else None

    def count(m, i, o):
        if isinstance(o, Tensor) and m is not head:
            acts.append(o.numel() * o.element_size())

    hooks = [m.register_forward_hook(count) for m in fused.model.modules() if len(list(m.children())) == 0]
    probe = x[: min(len(x), 8)].clone()  # the model may change its input in place
    try:
        # eval mode: no running-statistics updates on the caller's model
        with evaluating(fused.model), torch.no_grad():
            fused.model(probe, **_rows_of(kwargs, 0, len(probe)))
    finally:
        for h in hooks:
            h.remove()
    return sum(acts) * n_examples // max(1, len(probe))


def _points_per_chunk(fused: _Fused, x: Tensor, n_examples: int, max_memory: int, kwargs=None) -> int:
    """Points whose materialised parameters and activations fit in max_memory bytes (and in
    _PASS_BYTES)."""
    per_point = sum(t[0].numel() * t.element_size() for n, t in fused.stacked.items()
                    if n not in fused.linear_names)
    per_point += 2 * _activation_bytes(fused, x, n_examples, kwargs)
    return max(1, int(min(max_memory, _PASS_BYTES) // max(1, per_point)))


# On the CPU, convolutions with per-point weights run under vmap as grouped convolutions, which
# are slower than the loop's plain convolutions once a point's activations outgrow the caches
# (benchmarks/engine_models.py: the small CNN on all 1797 digits and ResNet-18 at 64 and 256
# examples); such models go to the loop without timing the fused engine.
_CONV_LOOP_BYTES = 8 << 20


def _conv_heavy(fused: _Fused, x: Tensor, n_examples: int, kwargs) -> bool:
    """Whether the model convolves and one point's activations exceed _CONV_LOOP_BYTES, on the CPU."""
    convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in fused.model.modules())
    return convs and x.device.type == "cpu" and \
        _activation_bytes(fused, x, n_examples, kwargs) > _CONV_LOOP_BYTES


def _progress(total: int, quiet: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="pt", leave=False,
                disable=quiet or not sys.stderr.isatty())


LOSSES = ("cross_entropy", "mse", "lm")
ENGINES = ("auto", "fused", "loop")


def _check_options(loss: str, bn: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if bn not in ("recompute", "interpolate"):
        raise ValueError(f"bn must be 'recompute' or 'interpolate', got {bn!r}")


def _rows_of(kwargs, e0: int, e1: int) -> dict:
    """Per-example keyword inputs (e.g. an attention mask) for examples e0:e1."""
    return {k: v[e0:e1] for k, v in (kwargs or {}).items()}


def _lm_rows(y: Tensor, ignore_index: int) -> Tensor:
    """Indices of the next-token targets that count: positions 1.. of every sequence, flattened,
    without those equal to ignore_index."""
    return (y[:, 1:].reshape(-1) != ignore_index).nonzero().flatten()


def _evaluate_fused(fused: _Fused, coeffs, inp: Inputs, *, bn, batch_size, max_memory,
                    points_per_chunk, quiet, times: Optional[List[float]] = None):
    model = fused.model
    x, y, kw = inp.x, inp.y, inp.kwargs
    B = coeffs.shape[0]
    ex_chunks = chunks(len(x), batch_size)
    chain = _chain(model, x) if fused.loss != "lm" and not kw else None
    if points_per_chunk is None:
        points_per_chunk = _chunk_size(fused, chain, x, ex_chunks[0][1] - ex_chunks[0][0], max_memory, kw)
    loss_sum = torch.zeros(B, dtype=torch.float64, device=coeffs.device)
    correct = torch.zeros(B, dtype=torch.int64, device=coeffs.device)
    with evaluating(model):
        bar = _progress(B, quiet, "points")
        for p0, p1 in chunks(B, points_per_chunk):
            t0 = time.perf_counter()
            c = coeffs[p0:p1]
            mat = fused.materialise(c)
            if bn == "recompute":
                fused.recompute_bn(c, mat, x, y, ex_chunks, kw)
            for e0, e1 in ex_chunks:
                if chain is not None:
                    with torch.no_grad():
                        ls, cor = _run_chain(chain, fused, c, x[e0:e1], y[e0:e1], inplace=True)
                else:
                    ls, cor = fused.run(c, mat, x[e0:e1], y[e0:e1], "apply", _rows_of(kw, e0, e1))
                loss_sum[p0:p1] += ls.double()
                correct[p0:p1] += cor
            if times is not None:
                times.extend([(time.perf_counter() - t0) / (p1 - p0)] * (p1 - p0))
            bar.update(p1 - p0)
        bar.close()
    return loss_sum, correct


def _chunk_size(fused: _Fused, chain, x: Tensor, n_examples: int, max_memory: int, kwargs=None) -> int:
    if chain is not None:
        return _chain_points(chain, x, n_examples, max_memory)
    return _points_per_chunk(fused, x, n_examples, max_memory, kwargs)


# ----------------------------------------------------------------------------- loop engine


def _direct_loss(out: Tensor, y: Tensor, loss: str, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(loss_sum, correct) of one point from its materialised output, in float64."""
    if loss == "mse":
        return _mse_sum(out.double(), y), torch.zeros((), dtype=torch.int64)
    if loss == "lm":
        out, y = out[:, :-1], y[:, 1:]
    logits = out.reshape(-1, out.shape[-1])
    t = y.reshape(-1)
    keep = t != ignore_index
    logits = logits.double()
    # The kernels' rule: a row whose log-sum-exp is not finite (a NaN or +inf logit, or every
    # logit -inf) has no defined loss (NaN) and is never correct.
    defined = torch.isfinite(torch.logsumexp(logits, -1)) | ~keep
    loss_sum = F.cross_entropy(logits, t, reduction="sum", ignore_index=ignore_index)
    if not bool(defined.all()):
        loss_sum = torch.full_like(loss_sum, float("nan"))
    return loss_sum, ((logits.argmax(-1) == t) & keep & defined).sum()


def _update_bn(m: nn.Module, x: Tensor, chunks, kwargs) -> None:
    """Running statistics of every BatchNorm recomputed from the data, as
    ``torch.optim.swa_utils.update_bn`` does (a cumulative average over the chunks)."""
    bns = {mod: name for name, mod in m.named_modules() if isinstance(mod, _BN)}
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    hooks = [bn.register_forward_pre_hook(lambda mod, args: _check_bn_values(bns[mod], args[0])) for bn in bns]
    m.train()
    try:
        with torch.no_grad():
            for e0, e1 in chunks:
                m(x[e0:e1].clone(), **_rows_of(kwargs, e0, e1))  # a copy: the model may change its input
    finally:
        for h in hooks:
            h.remove()
    for bn in bns:
        bn.momentum = momenta[bn]
    m.eval()


def _evaluate_loop(model, stacked, coeffs, inp: Inputs, *, lay: P.Layout, loss, bn, batch_size,
                   quiet, ignore_index=-100, times: Optional[List[float]] = None):
    m = copy.deepcopy(model)
    keys = list(m.state_dict().keys())
    has_bn = any(isinstance(mod, _BN) for mod in m.modules())
    x, y, kw = inp.x, inp.y, inp.kwargs
    B = coeffs.shape[0]
    loss_sum = torch.zeros(B, dtype=torch.float64, device=coeffs.device)
    correct = torch.zeros(B, dtype=torch.int64, device=coeffs.device)
    ex_chunks = chunks(len(x), batch_size)
    bar = _progress(B, quiet, "points")
    for b in range(B):
        t0 = time.perf_counter()
        bar.update()
        state = P.combine(stacked, coeffs[b])
        m.load_state_dict({k: state[lay.canonical(k)] for k in keys})
        for name in lay.non_persistent:
            m.get_buffer(name).copy_(state[name])
        if bn == "recompute" and has_bn:
            _update_bn(m, x, ex_chunks, kw)
        m.eval()
        with torch.no_grad():
            for e0, e1 in ex_chunks:
                # Every call gets a copy: a model that changes its input in place must change
                # neither the caller's data nor the next point's.
                out = logits_of(m(x[e0:e1].clone(), **_rows_of(kw, e0, e1)))
                ls, cor = _direct_loss(out, y[e0:e1], loss, ignore_index)
                loss_sum[b] += ls
                correct[b] += cor
        if times is not None:
            times.append(time.perf_counter() - t0)
    bar.close()
    return loss_sum, correct


# ----------------------------------------------------------------------------- public


def evaluate(
    model: nn.Module,
    vertices: Sequence[P.Vertex],
    coeffs: Tensor,
    data: Tuple[Tensor, ...],
    *,
    loss: str = "cross_entropy",
    bn: str = "recompute",
    engine: str = "auto",
    batch_size: Optional[int] = None,
    max_memory: int = 1 << 30,
    points_per_chunk: Optional[int] = None,
    head: Optional[str] = None,
    ignore_index: int = -100,
    quiet: bool = False,
    shard: Optional[bool] = None,
) -> Evaluation:
    """Mean loss and accuracy of ``model`` at every point ``sum_k coeffs[b, k] * vertices[k]``.

    Args:
        model: the architecture (its own parameters are not used; its non-persistent buffers,
            which state dicts never hold, are). Any module for ``engine="loop"``; for
            ``engine="fused"`` one that runs under ``torch.func.functional_call`` and ``vmap``
            (Hugging Face GPT-2 and LLaMA, torchvision ResNets and the zoo do). It maps inputs
            ``(N, ...)`` to logits ``(N, classes)`` (``(N, T, vocab)`` for ``loss="lm"``), as a
            tensor, a Hugging Face ``ModelOutput`` or a tuple starting with the logits. The fused
            engine runs a private copy of its module tree (sharing every tensor), so neither its
            modules nor their forwards are changed during a call, and a forward that sets an
            attribute on its module sets it on the copy.
        vertices: K modules or state dicts of that architecture (a mismatch is a ValueError
            naming the first offending parameter). Tied parameters (GPT-2's ``lm_head.weight``
            is ``transformer.wte.weight``) are one parameter under any of their names.
        coeffs: (B, K) coefficients; values outside [0, 1] extrapolate.
        data: ``(inputs, targets)``, evaluated in chunks of ``batch_size`` examples (default all).
            Inputs may be float features or integer token ids.
        loss: ``"cross_entropy"`` (targets are class indices), ``"mse"`` (targets are
            ``(N, outputs)`` floats, or ``(N,)`` for one output; the loss is ``F.mse_loss``'s
            mean over all elements, and accuracy is NaN), or ``"lm"``: next-token cross-entropy
            over every position of ``(N, T)`` token sequences, with ``data`` =
            ``(input_ids, labels)`` or ``(input_ids, labels, attention_mask)`` (labels are
            usually the input ids; position t's logits predict labels[t + 1]; labels equal to
            ``ignore_index`` and masked positions do not count; the mask is passed to the model
            as ``attention_mask=``). The mean is over the targets that count; accuracy is the
            share of them predicted by the argmax.
        bn: ``"recompute"`` (default): BatchNorm statistics of every point recomputed from the
            data, as ``torch.optim.swa_utils.update_bn`` does; ``"interpolate"``: the vertices'
            running statistics mixed like every other buffer.
        engine: ``"fused"`` (one batched pass over the points: vmapped, or for an MLP op by op),
            ``"loop"`` (one point at a time, loading its state dict), or ``"auto"`` (default):
            the fused engine for MLPs; the loop for convolutional models whose activations per
            point exceed 8 MiB, on the CPU; for other models, the first points by each engine,
            timed and checked against each other, and the rest by the faster (a model that cannot
            run under vmap, or on which the engines disagree, falls back to the loop, with a
            warning). The fused engine assumes that a parameter is read only by the module that
            owns it (a model that reads, say, an embedding table in another module's forward
            gets that table unmixed): ``"auto"`` catches this, ``"fused"`` does not. The engine used is in the result; the two agree to float32
            rounding, so pass ``"fused"`` or ``"loop"`` for bit-for-bit repeatable results.
        max_memory: bytes the fused engine may use for per-point parameters and activations;
            points are processed in chunks under it. Results do not depend on the chunking.
        points_per_chunk: overrides the chunk size derived from ``max_memory``.
        head: the module path of the classifier head the fused loss applies itself (never
            holding a point's logits); default: see :func:`find_head`.
        ignore_index: the label that does not count, for ``loss="lm"``.
        quiet: no progress bar (there is none either when stderr is not a terminal, or on a
            rank other than 0).
        shard: under ``torch.distributed`` (:mod:`manifold_ext.distributed`), whether the rows
            of ``coeffs`` are sharded across the ranks in blocks of whole chunks of points, every
            rank returning all the results, equal to a single process's (the fused engine is
            used). Default: shard unless inside :func:`manifold_ext.distributed.local`; False:
            this rank evaluates every point itself. Without a process group it has no effect.

    Returns:
        :class:`Evaluation` with ``loss`` and ``accuracy`` of shape (B,). A point that puts
        non-zero weight on a vertex holding NaN or Inf gets NaN (with a warning naming the
        parameter); the other points are unaffected.
    """
    _check_options(loss, bn)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    start = time.perf_counter()
    lay = P.layout(model)
    stacked = P.stack(vertices, model=model)
    _check_names(lay, stacked)
    first = next(iter(stacked.values()))
    coeffs = _check_coeffs(coeffs, first.shape[0]).to(first.device)
    inp = check_data(data, loss, ignore_index)
    bad = _non_finite(stacked, coeffs)  # P.stack made new tensors: the caller's stay untouched
    fused = _Fused(model, stacked, loss, lay=lay, head=head, ignore_index=ignore_index)
    if loss == "lm" and fused.head is not None and engine != "loop":
        engine = _head_rule(engine, model, fused.head, inp)
    chain = _chain(model, inp.x) if loss != "lm" and not inp.kwargs else None
    sharding = D.sharding() if shard is None else bool(shard) and D.active()
    if sharding:
        # The fused engine with a chunk size fixed here, so that every rank's chunks are the ones
        # a single process would use.
        engine = "fused" if engine == "auto" else engine
        if engine == "fused" and points_per_chunk is None:
            ex_rows = chunks(len(inp.x), batch_size)[0]
            points_per_chunk = _chunk_size(fused, chain, inp.x, ex_rows[1] - ex_rows[0], max_memory, inp.kwargs)
    r0, r1 = D.shard(len(coeffs), points_per_chunk or 1) if sharding else (0, len(coeffs))
    quiet = quiet or not D.is_main()
    run_fused = lambda c, q, times=None: _evaluate_fused(  # noqa: E731
        fused, c, inp, bn=bn, batch_size=batch_size, max_memory=max_memory,
        points_per_chunk=points_per_chunk, quiet=q, times=times)
    run_loop = lambda c, q, times=None: _evaluate_loop(  # noqa: E731
        model, stacked, c, inp, lay=lay, loss=loss, bn=bn, batch_size=batch_size, quiet=q,
        ignore_index=ignore_index, times=times)
    mine = coeffs[r0:r1]
    if engine == "auto" and chain is None and _conv_heavy(fused, inp.x, chunks(len(inp.x), batch_size)[0][1],
                                                            inp.kwargs):
        engine = "loop"
    if engine == "auto":
        loss_sum, correct, engine = _auto(mine, chain is not None, run_fused, run_loop, quiet)
    elif engine == "fused":
        loss_sum, correct = run_fused(mine, quiet)
    else:
        loss_sum, correct = run_loop(mine, quiet)
    if sharding:
        loss_sum, correct = D.gather_rows(loss_sum), D.gather_rows(correct)
    mean, acc = _means(loss_sum, correct, inp.n_targets, bad, loss)
    return Evaluation(loss=mean, accuracy=acc, n_examples=len(inp.x),
                      seconds=time.perf_counter() - start, engine=engine)


def _head_rule(engine: str, model: nn.Module, head: str, inp: Inputs) -> str:
    """The engine to use for a language model with a fused head: the loop when the model's logits
    are not its head's output (an error with ``engine="fused"``, a warning with ``"auto"``)."""
    try:
        _check_head(model, head, inp.x, inp.kwargs)
    except ValueError as err:
        if engine == "fused":
            raise
        warnings.warn(f"engine='auto': {err}; using the loop", RuntimeWarning, stacklevel=3)
        return "loop"
    return engine


def _means(loss_sum: Tensor, correct: Tensor, n_targets: int, bad: Tensor, loss: str) -> Tuple[Tensor, Tensor]:
    """Mean loss and accuracy per point from the sums; NaN at the points ``bad`` marks (and every
    accuracy for ``loss="mse"``, which has none)."""
    mean = loss_sum / n_targets
    acc = correct.double() / n_targets
    mean[bad] = float("nan")
    acc[bad] = float("nan")
    if loss == "mse":
        acc[:] = float("nan")
    return mean, acc


def _auto(coeffs: Tensor, is_chain: bool, run_fused, run_loop, quiet: bool):
    """(loss_sum, correct, engine): an MLP chain by the fused engine (the faster on every chain
    the engine benchmark measures); otherwise the loop and the fused engine timed per point
    (without their once-per-call setup) on the first points, and the rest by the faster.

    The loop runs point 0 and the fused engine points 0 and 1: if they disagree on point 0, the
    fused engine does not apply to the model and the loop runs the rest. If the fused engine is
    more than ``_CLEARLY_SLOWER`` times slower per point, the loop wins; if it is faster, it wins;
    in between, it also runs a chunk of a sixteenth of the points and is judged on that. Any
    error of the choice favours the loop, the engine that must never be beaten."""
    B = coeffs.shape[0]
    if is_chain or B == 0:
        return (*run_fused(coeffs, quiet), "fused")
    if B == 1:
        return (*run_loop(coeffs, quiet), "loop")
    t_loop, t_fused = [], []
    parts = [run_loop(coeffs[:1], True, t_loop)]
    try:
        both = run_fused(coeffs[:2], True, t_fused)
    except _Unsupported as err:
        warnings.warn(f"engine='auto': the fused engine cannot run this model ({err.__cause__}); "
                      "using the loop", RuntimeWarning, stacklevel=3)
        parts.append(run_loop(coeffs[1:], quiet))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), "loop"
    loop0, fused0 = parts[0][0][0].item(), both[0][0].item()
    if not math.isclose(loop0, fused0, rel_tol=_AGREE, abs_tol=_AGREE) and math.isfinite(loop0):
        warnings.warn(f"engine='auto': the fused engine disagrees with the loop on this model (loss sum "
                      f"{fused0:.6g} against {loop0:.6g} at the first point), e.g. because it reads a "
                      "parameter outside the module that owns it; using the loop", RuntimeWarning,
                      stacklevel=3)
        parts.append(run_loop(coeffs[1:], quiet))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), "loop"
    parts.append((both[0][1:], both[1][1:]))
    done = 2
    ratio = t_fused[0] / t_loop[0]
    m = min(B - done, (B - 1) // 16)
    if 1 <= ratio <= _CLEARLY_SLOWER and m >= 2:
        t_fused.clear()
        parts.append(run_fused(coeffs[done:done + m], True, t_fused))
        done += m
        ratio = sum(t_fused) / len(t_fused) / t_loop[0]
    engine = "fused" if ratio < 1 else "loop"
    if done < B:
        parts.append((run_fused if engine == "fused" else run_loop)(coeffs[done:], quiet))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), engine


# A fused engine this many times slower than the loop on one point is not probed further.
_CLEARLY_SLOWER = 3.0
# The engines agree to float32 rounding; a larger difference at the first point means the fused
# engine does not apply to the model.
_AGREE = 1e-4


def point_losses(
    model: nn.Module,
    stacked: P.State,
    coeffs: Tensor,
    data: Tuple[Tensor, ...],
    *,
    loss: str = "cross_entropy",
    bn: str = "recompute",
    head: Optional[str] = None,
    ignore_index: int = -100,
) -> Tensor:
    """Differentiable mean loss at every point ``sum_k coeffs[b, k] * vertex_k``, shape (B,).

    The training-time counterpart of :func:`evaluate`: one fused pass over all B points and the
    whole of ``data`` (a minibatch), no chunking, no NaN screening, and gradients flow to any
    tensor of ``stacked`` (``name -> (K, *shape)``, e.g. from :func:`manifold_ext.params.stack`
    with some vertices replaced by tensors that require grad) and to ``coeffs``, through the
    fused ops' backward. ``loss``, ``bn``, ``head`` and ``ignore_index`` are as in
    :func:`evaluate`.
    """
    _check_options(loss, bn)
    lay = P.layout(model)
    first = next(iter(stacked.values()))
    stacked = P.conform(stacked, model, lay=lay, stacked=first.shape[0])
    _check_names(lay, stacked)
    coeffs = _check_coeffs(coeffs, first.shape[0]).to(first.device)
    inp = check_data(data, loss, ignore_index)
    x, y = inp.x, inp.y
    fused = _Fused(model, stacked, loss, lay=lay, head=head, ignore_index=ignore_index)
    chain = _chain(model, x) if loss != "lm" and not inp.kwargs else None
    with evaluating(model):
        if chain is not None:
            loss_sum, _ = _run_chain(chain, fused, coeffs, x, y, inplace=False)
            return loss_sum / inp.n_targets
        mat = fused.materialise(coeffs)
        if bn == "recompute":
            fused.recompute_bn(coeffs, mat, x, y, [(0, len(x))], inp.kwargs)
        loss_sum, _ = fused.run(coeffs, mat, x, y, "apply", inp.kwargs)
    return loss_sum / inp.n_targets
