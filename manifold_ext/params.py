"""Parameter space: states of one architecture as dicts of tensors, and geometry on them.

A *state* is a dict ``name -> tensor`` holding a model's parameters and buffers (what
``state_of`` returns for a module or a state dict). K vertices of one architecture stack into
``(K, *shape)`` tensors; points are affine combinations ``sum_k c[k] * vertex_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

State = Dict[str, Tensor]
Vertex = Union[nn.Module, Mapping[str, Tensor]]


def state_of(vertex: Vertex) -> State:
    """Parameters and buffers of a module (or a state dict's tensors), detached, in module order.

    A tensor that appears under several names (tied parameters: a module lists it once, a state
    dict under every name) is kept once, under its first name, so both forms agree."""
    if isinstance(vertex, nn.Module):
        out = {n: p.detach() for n, p in vertex.named_parameters()}
        out.update({n: b.detach() for n, b in vertex.named_buffers()})
        return out
    if isinstance(vertex, Mapping):
        out, seen = {}, set()
        for n, t in vertex.items():
            if not isinstance(t, Tensor):
                continue
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
            if key is not None and key in seen:
                continue
            seen.add(key)
            out[n] = t.detach()
        return out
    raise TypeError(f"expected a vertex to be an nn.Module or a state dict, got {type(vertex).__name__}")


@dataclass(frozen=True)
class Layout:
    """How a model names its tensors.

    Attributes:
        names: the canonical names, in :func:`state_of`'s order (parameters, then buffers).
        aliases: every other name of a tied tensor, mapped to its canonical name (e.g. GPT-2's
            ``lm_head.weight`` -> ``transformer.wte.weight``).
        non_persistent: canonical names of buffers that state dicts never hold (e.g. rotary
            ``inv_freq``); they are taken from the model.
    """

    names: Tuple[str, ...]
    aliases: Dict[str, str]
    non_persistent: Tuple[str, ...]

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` (itself unless it is an alias)."""
        return self.aliases.get(name, name)


def layout(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model``: ties found by identity, as ``named_parameters`` does."""
    canon: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for n, t in named:
        if id(t) in canon:
            aliases[n] = canon[id(t)]
        else:
            canon[id(t)] = n
    non_persistent = []
    for mod_name, m in model.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            full = f"{mod_name}.{b}" if mod_name else b
            if getattr(m, b, None) is not None:
                non_persistent.append(aliases.get(full, full))
    return Layout(names=tuple(state_of(model)), aliases=aliases,
                  non_persistent=tuple(dict.fromkeys(non_persistent)))


def conform(state: State, model: nn.Module, *, lay: Optional[Layout] = None,
            stacked: Optional[int] = None) -> State:
    """``state`` (a vertex's state, or a stack of ``stacked`` vertices) named as ``model`` names
    its tensors: a tie under any of its names becomes its canonical name (one tensor everywhere),
    and non-persistent buffers the state lacks are taken from the model (repeated ``stacked``
    times). Other names pass through unchanged, so that a mismatch is still reported."""
    lay = lay or layout(model)
    out = dict(state)
    for alias, name in lay.aliases.items():
        if alias in out:
            value = out.pop(alias)
            out.setdefault(name, value)
    if lay.non_persistent:
        buffers = dict(model.named_buffers())
        for name in lay.non_persistent:
            if name not in out:
                b = buffers[name].detach()
                out[name] = b if stacked is None else torch.stack([b] * stacked)
    order = {n: i for i, n in enumerate(lay.names)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def check_same_architecture(states: Sequence[State]) -> None:
    """Raise ValueError naming the first parameter on which the states disagree (name, shape or
    dtype), with both values."""
    if len(states) == 0:
        raise ValueError("expected at least one vertex, got none")
    ref = states[0]
    for k, st in enumerate(states[1:], start=1):
        for name, t in ref.items():  # in module order, so the first difference is named
            if name not in st:
                raise ValueError(f"vertex {k} has no parameter {name!r} (vertex 0 has it, shape {tuple(t.shape)})")
            u = st[name]
            if u.shape != t.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(u.shape)} in vertex {k} but {tuple(t.shape)} in vertex 0")
            if u.dtype != t.dtype:
                raise ValueError(f"parameter {name!r} has dtype {u.dtype} in vertex {k} but {t.dtype} in vertex 0")
        for name in st:
            if name not in ref:
                raise ValueError(f"vertex {k} has a parameter {name!r} that vertex 0 lacks (shape {tuple(st[name].shape)})")


def stack(vertices: Sequence[Vertex], model: Optional[nn.Module] = None) -> State:
    """K vertices of one architecture as ``name -> (K, *shape)`` tensors (checked first). With
    ``model``, each vertex is first named as the model names its tensors (:func:`conform`)."""
    states = [state_of(v) for v in vertices]
    if model is not None:
        lay = layout(model)
        states = [conform(st, model, lay=lay) for st in states]
    check_same_architecture(states)
    return {n: torch.stack([st[n] for st in states]) for n in states[0]}


def combine(stacked: State, coeffs: Tensor) -> State:
    """The point ``sum_k coeffs[k] * vertex_k`` for coeffs of shape (K,). Integer buffers (e.g.
    BatchNorm's batch counter) are taken from the first vertex."""
    out = {}
    for n, t in stacked.items():
        if t.is_floating_point():
            out[n] = torch.tensordot(coeffs.to(t.dtype), t, dims=1)
        else:
            out[n] = t[0]
    return out


def flatten(state: State, names: Optional[Iterable[str]] = None) -> Tensor:
    """One vector of the floating-point tensors of ``state`` (all, or ``names``), in order."""
    names = [n for n in (names if names is not None else state) if state[n].is_floating_point()]
    if not names:
        raise ValueError("expected at least one floating-point tensor to flatten, got none")
    return torch.cat([state[n].reshape(-1) for n in names])


def unflatten(vector: Tensor, like: State, names: Optional[Iterable[str]] = None) -> State:
    """Inverse of :func:`flatten`: tensors shaped like ``like``'s (all floating ones, or ``names``)."""
    names = [n for n in (names if names is not None else like) if like[n].is_floating_point()]
    sizes = [like[n].numel() for n in names]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"expected vector of shape ({sum(sizes)},), got {tuple(vector.shape)}")
    return {n: chunk.view_as(like[n]) for n, chunk in zip(names, vector.split(sizes))}


def parameter_names(model: nn.Module) -> list:
    """Names of the trainable parameters (directions move these; buffers stay)."""
    return [n for n, _ in model.named_parameters()]


def random_direction(
    center: State,
    *,
    names: Optional[Iterable[str]] = None,
    kind: str = "filter",
    ignore: str = "biasbn",
    generator: Optional[torch.Generator] = None,
) -> State:
    """A random direction at ``center``, as in Li et al. 2018 ("Visualizing the loss landscape").

    Args:
        center: the state the direction starts from.
        names: the tensors to move (default: every floating tensor; pass
            :func:`parameter_names` to leave buffers alone). Others get zero.
        kind: ``"gaussian"`` (i.i.d. N(0, 1)) or ``"filter"`` (each filter, i.e. each slice along
            dim 0, rescaled to the norm of the same filter of ``center``).
        ignore: ``"biasbn"`` zeroes 1-D tensors (biases, normalisation parameters), as Li et al.
            do; ``"none"`` keeps them (filter-normalised as a whole when kind is "filter").
        generator: for determinism (drawn on the CPU, then moved).
    """
    if kind not in ("gaussian", "filter"):
        raise ValueError(f"kind must be 'gaussian' or 'filter', got {kind!r}")
    if ignore not in ("biasbn", "none"):
        raise ValueError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    move = set(names) if names is not None else {n for n, t in center.items() if t.is_floating_point()}
    out = {}
    for n, w in center.items():
        if n not in move or not w.is_floating_point() or (ignore == "biasbn" and w.dim() <= 1):
            out[n] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.device)
        if kind == "filter":
            wf = w.double().reshape(w.shape[0], -1) if w.dim() > 1 else w.double().reshape(1, -1)
            df = d.reshape(wf.shape)
            df = df * (wf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-12))
            d = df.reshape(w.shape)
        out[n] = d.to(w.dtype)
    return out


def distance(a: State, b: State, *, names: Optional[Iterable[str]] = None,
             scale: Optional[State] = None) -> float:
    """Euclidean distance between two states (float64), over ``names`` (default: all floating
    tensors). With ``scale``, each tensor's difference is divided by the norm of ``scale``'s same
    tensor (layer-normalised units, so models of different widths can be compared)."""
    names = [n for n in (names if names is not None else a) if a[n].is_floating_point()]
    total = 0.0
    for n in names:
        diff = (a[n].double() - b[n].double()).pow(2).sum().item()
        if scale is not None:
            diff /= max(scale[n].double().pow(2).sum().item(), 1e-300)
        total += diff
    return math.sqrt(total)


def _edges(vertices: Sequence[State], names: Optional[Iterable[str]]) -> Tensor:
    """The (k, P) float64 edge vectors ``E[i] = v[i+1] - v[0]``."""
    if len(vertices) < 2:
        raise ValueError(f"expected at least 2 vertices for a simplex, got {len(vertices)}")
    names = list(names) if names is not None else None
    v0 = flatten(vertices[0], names).double()
    return torch.stack([flatten(v, names).double() - v0 for v in vertices[1:]])


def gram(vertices: Sequence[State], *, names: Optional[Iterable[str]] = None) -> Tensor:
    """Gram matrix ``E E^T`` (float64, k x k) of the edge vectors ``E[i] = v[i+1] - v[0]``."""
    E = _edges(vertices, names)
    return E @ E.T


def simplex_log_volume(vertices: Sequence[State], *, names: Optional[Iterable[str]] = None) -> float:
    """log of the k-volume of the simplex with these k+1 vertices:
    ``0.5 * logdet(E E^T) - log(k!)``, computed in float64 (``-inf`` when degenerate).

    Computed as ``sum log |R_ii|`` from a QR factorisation of ``E^T`` rather than from the Gram
    matrix, whose forming squares the condition number (slivers lost half their digits, and
    numerically collinear vertices came out finite). Degenerate: some ``|R_ii|`` at most
    ``max(P, k) * eps`` times the longest edge (the usual rank tolerance)."""
    E = _edges(vertices, names)
    k, P = E.shape
    if k > P:
        return -math.inf
    d = torch.linalg.qr(E.T, mode="r").R.diagonal().abs()
    longest = E.norm(dim=1).max().item()
    if d.min().item() <= max(P, k) * torch.finfo(torch.float64).eps * longest:
        return -math.inf
    return d.log().sum().item() - math.lgamma(k + 1)


def simplex_weights(n: int, k: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``(n, k)`` float64 barycentric weights drawn uniformly from the (k-1)-simplex
    (Dirichlet(1): normalised standard exponentials)."""
    e = -torch.log(torch.rand(n, k, generator=generator, dtype=torch.float64))
    return e / e.sum(1, keepdim=True)


def filter_norms(center: State, names: Iterable[str]) -> State:
    """The norm of every filter of ``center`` (each slice along dim 0 of a tensor of two or more
    dimensions; the whole tensor for one of fewer), shaped to broadcast against the tensor:
    ``(rows, 1, ...)`` or ``()``. Float64.

    A norm below 1e-6 of its tensor's RMS filter norm (the zero-initialised units of an
    expansion) is replaced by that RMS, and a tensor that is zero throughout takes the median
    filter norm of the others, so that every unit has a finite, positive scale."""
    out, zero = {}, []
    for n in names:
        w = center[n].double()
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        norms = rows.norm(dim=1)
        rms = norms.pow(2).mean().sqrt()
        if rms.item() == 0.0:
            zero.append(n)
        norms = torch.where(norms < 1e-6 * rms, rms, norms)
        out[n] = norms.reshape([-1] + [1] * (w.dim() - 1)) if w.dim() > 1 else norms.reshape(())
    if zero:
        nonzero = [t.reshape(-1) for n, t in out.items() if n not in zero]
        if not nonzero:
            raise ValueError("every tensor of center is zero: filter units are undefined; use raw units")
        fill = torch.cat(nonzero).median()
        for n in zero:
            out[n] = torch.full_like(out[n], fill.item())
    return out
