"""Loss-landscape probes on the batched engine: lines, barriers, planes, simplexes and rays.

Every probe evaluates all its points in batched passes of :func:`manifold_ext.engine.evaluate`
(keyword arguments such as ``bn``, ``engine``, ``batch_size`` and ``quiet`` pass through), returns
a dataclass with ``to_json``/``from_json`` and a ``plot()``, and is deterministic given ``seed``.
Vertices and centres are modules or state dicts; ``model`` (the architecture) defaults to the
first of them when that is a module.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import params as P
from ._results import Result, figure
from .engine import evaluate

Grid = Union[int, Sequence[float], Tuple[float, float, int]]


def _model_of(model: Optional[nn.Module], first) -> nn.Module:
    if model is not None:
        return model
    if isinstance(first, nn.Module):
        return first
    raise ValueError("model is required when the vertices are state dicts (it gives the architecture)")


def _grid(grid: Grid, name: str) -> List[float]:
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"{name} must have at least 2 points, got {grid}")
        return torch.linspace(0, 1, grid, dtype=torch.float64).tolist()
    if isinstance(grid, tuple) and len(grid) == 3 and isinstance(grid[2], int):
        lo, hi, n = grid
        if n < 2:
            raise ValueError(f"{name} must have at least 2 points, got {n}")
        return torch.linspace(lo, hi, n, dtype=torch.float64).tolist()
    values = [float(v) for v in grid]
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    return values


def _eval(model, vertices, coeffs: Tensor, data, kw):
    dtype = next(iter(P.state_of(vertices[0]).values())).dtype
    return evaluate(model, vertices, coeffs.to(dtype), data, **kw)


# ----------------------------------------------------------------------------- line


@dataclass
class PathResult(Result):
    """Loss and accuracy at positions t along ``(1 - t) * a + t * b``."""

    t: List[float]
    loss: List[float]
    accuracy: List[float]
    seconds: float = 0.0

    def plot(self):
        """Loss and accuracy against t (a matplotlib Figure)."""
        fig, (ax1, ax2) = figure(2)
        ax1.plot(self.t, self.loss, ".-")
        ax1.set(xlabel="t", ylabel="loss")
        ax2.plot(self.t, self.accuracy, ".-")
        ax2.set(xlabel="t", ylabel="accuracy")
        for ax in (ax1, ax2):
            ax.axvspan(0, 1, color="0.93", zorder=0)
        return fig


def linear_path(a, b, data, *, steps: Grid = 33, model: Optional[nn.Module] = None, **kw) -> PathResult:
    """Loss and accuracy along the segment from ``a`` (t=0) to ``b`` (t=1).

    ``steps``: a number of evenly spaced points on [0, 1], a tuple ``(lo, hi, n)`` (t outside
    [0, 1] extrapolates), or explicit positions.
    """
    start = time.perf_counter()
    t = _grid(steps, "steps")
    tt = torch.tensor(t, dtype=torch.float64)
    ev = _eval(_model_of(model, a), [a, b], torch.stack([1 - tt, tt], 1), data, kw)
    return PathResult(t=t, loss=ev.loss.tolist(), accuracy=ev.accuracy.tolist(),
                      seconds=time.perf_counter() - start)


@dataclass
class BarrierResult(Result):
    """The loss barrier between two models (Frankle et al. 2020; Entezari et al. 2022): the largest
    excess of the path's loss over the straight line between the endpoint losses."""

    t_max: float
    barrier_loss: float
    t_max_error: float
    barrier_error: float
    path: dict = field(default_factory=dict)  # a PathResult of every point evaluated, as a dict

    def plot(self):
        """The path, with the barrier marked (a matplotlib Figure)."""
        p = PathResult(**self.path)
        fig = p.plot()
        ax = fig.axes[0]
        l0, l1 = p.loss[0], p.loss[-1]
        ax.plot([0, 1], [l0, l1], "--", color="0.5")
        ax.axvline(self.t_max, color="C3", lw=0.8)
        ax.set_title(f"barrier {self.barrier_loss:.4g} at t={self.t_max:.3f}")
        return fig


def barrier(a, b, data, *, steps: int = 17, refine: int = 2, model: Optional[nn.Module] = None,
            **kw) -> BarrierResult:
    """The loss barrier on [0, 1]: a grid of ``steps`` points, refined ``refine`` times with
    ``steps`` more points between the neighbours of the current maximum. Reports where the excess
    loss is largest and its height, and the same for the error (1 - accuracy)."""
    if steps < 3:
        raise ValueError(f"steps must be at least 3, got {steps}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    start = time.perf_counter()
    seen = {}
    grid = _grid(steps, "steps")
    for level in range(refine + 1):
        new = [t for t in grid if t not in seen]
        if new:
            r = linear_path(a, b, data, steps=new, model=model, **kw)
            seen.update({t: (l, acc) for t, l, acc in zip(r.t, r.loss, r.accuracy)})
        ts = sorted(seen)
        losses = [seen[t][0] for t in ts]
        excess = [l - ((1 - t) * losses[0] + t * losses[-1]) for t, l in zip(ts, losses)]
        i = max(range(len(ts)), key=lambda j: excess[j])
        lo, hi = ts[max(0, i - 1)], ts[min(len(ts) - 1, i + 1)]
        grid = torch.linspace(lo, hi, steps, dtype=torch.float64).tolist()
    ts = sorted(seen)
    loss = [seen[t][0] for t in ts]
    acc = [seen[t][1] for t in ts]
    excess = [l - ((1 - t) * loss[0] + t * loss[-1]) for t, l in zip(ts, loss)]
    err = [1 - v for v in acc]
    err_excess = [e - ((1 - t) * err[0] + t * err[-1]) for t, e in zip(ts, err)]
    i = max(range(len(ts)), key=lambda j: excess[j])
    j = max(range(len(ts)), key=lambda j: err_excess[j])
    path = PathResult(t=ts, loss=loss, accuracy=acc, seconds=time.perf_counter() - start)
    return BarrierResult(t_max=ts[i], barrier_loss=excess[i], t_max_error=ts[j],
                         barrier_error=err_excess[j], path=dataclasses.asdict(path))


# ----------------------------------------------------------------------------- plane


@dataclass
class PlaneResult(Result):
    """Loss and accuracy on the plane ``center + alpha * d1 + beta * d2``; grids indexed
    ``[i_alpha][i_beta]``."""

    alpha: List[float]
    beta: List[float]
    loss: List[List[float]]
    accuracy: List[List[float]]
    seconds: float = 0.0

    def plot(self, levels: int = 20):
        """Contours of the loss over the plane (a matplotlib Figure)."""
        fig, (ax,) = figure(1)
        cs = ax.contourf(self.alpha, self.beta, torch.tensor(self.loss).T.numpy(), levels=levels)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "k+")
        ax.set(xlabel="alpha (d1)", ylabel="beta (d2)")
        return fig


def plane(center, data, *, d1: Optional[P.State] = None, d2: Optional[P.State] = None,
          grid: Grid = (-1.0, 1.0, 21), model: Optional[nn.Module] = None, seed: int = 0,
          **kw) -> PlaneResult:
    """A 2-D surface through ``center`` along ``d1`` and ``d2`` (random filter-normalised
    directions of the trainable parameters when not given, as in Li et al. 2018)."""
    start = time.perf_counter()
    model = _model_of(model, center)
    c = P.state_of(center)
    names = P.parameter_names(model)
    g = torch.Generator().manual_seed(seed)
    d1 = d1 if d1 is not None else P.random_direction(c, names=names, generator=g)
    d2 = d2 if d2 is not None else P.random_direction(c, names=names, generator=g)
    vertices = [c, _shift(c, d1), _shift(c, d2)]
    alpha = _grid(grid, "grid")
    A = torch.tensor(alpha, dtype=torch.float64)
    a, b = torch.meshgrid(A, A, indexing="ij")
    coeffs = torch.stack([1 - a - b, a, b], -1).reshape(-1, 3)
    ev = _eval(model, vertices, coeffs, data, kw)
    n = len(alpha)
    return PlaneResult(alpha=alpha, beta=alpha, loss=ev.loss.reshape(n, n).tolist(),
                       accuracy=ev.accuracy.reshape(n, n).tolist(),
                       seconds=time.perf_counter() - start)


def _shift(c: P.State, d: P.State, scale: float = 1.0) -> P.State:
    return {n: (t + scale * d[n].to(t.dtype)) if t.is_floating_point() else t for n, t in c.items()}


# ----------------------------------------------------------------------------- simplex


@dataclass
class SimplexResult(Result):
    """Losses at points drawn uniformly from a simplex, or a complex of simplices."""

    weights: List[List[float]]  # (n, K): the coefficients of each point over all vertices
    simplex: List[int]  # which simplex of the complex each point came from
    loss: List[float]
    accuracy: List[float]
    log_volumes: List[float]
    seconds: float = 0.0

    def plot(self):
        """Histogram of the losses (a matplotlib Figure)."""
        fig, (ax,) = figure(1)
        ax.hist([v for v in self.loss if math.isfinite(v)], bins=30)
        ax.set(xlabel="loss", ylabel="points")
        return fig


def simplex(vertices: Sequence, data, *, n: int = 256, complex: Optional[Sequence[Sequence[int]]] = None,
            model: Optional[nn.Module] = None, seed: int = 0, **kw) -> SimplexResult:
    """Losses at ``n`` points drawn uniformly from the simplex of ``vertices`` (Dirichlet(1)
    weights), or from a complex of simplices (lists of vertex indices), each chosen in proportion
    to its volume (Benton et al. 2021)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    start = time.perf_counter()
    model = _model_of(model, vertices[0])
    K = len(vertices)
    simplices = [list(range(K))] if complex is None else [list(s) for s in complex]
    for s in simplices:
        if not s or min(s) < 0 or max(s) >= K:
            raise ValueError(f"complex entries must index the {K} vertices, got {s}")
    states = [P.state_of(v) for v in vertices]
    names = P.parameter_names(model)
    logv = [P.simplex_log_volume([states[i] for i in s], names=names) if len(s) > 1 else 0.0
            for s in simplices]
    g = torch.Generator().manual_seed(seed)
    if len(simplices) > 1:
        finite = torch.tensor(logv, dtype=torch.float64)
        probs = torch.softmax(torch.where(torch.isfinite(finite), finite, torch.tensor(-1e300)), 0)
        which = torch.multinomial(probs, n, replacement=True, generator=g)
    else:
        which = torch.zeros(n, dtype=torch.long)
    W = torch.zeros(n, K, dtype=torch.float64)
    for j, s in enumerate(simplices):
        rows = (which == j).nonzero().flatten()
        W[rows[:, None], torch.tensor(s)] = P.simplex_weights(len(rows), len(s), generator=g)
    ev = _eval(model, vertices, W, data, kw)
    return SimplexResult(weights=W.tolist(), simplex=which.tolist(), loss=ev.loss.tolist(),
                         accuracy=ev.accuracy.tolist(), log_volumes=logv,
                         seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------- rays


@dataclass
class RaysResult(Result):
    """Loss and accuracy along rays ``center + r * d_i``; grids indexed ``[direction][radius]``."""

    radii: List[float]
    loss: List[List[float]]
    accuracy: List[List[float]]
    seconds: float = 0.0

    def plot(self):
        """Every ray's loss against the radius (a matplotlib Figure)."""
        fig, (ax,) = figure(1)
        for row in self.loss:
            ax.plot(self.radii, row, color="C0", alpha=0.4)
        ax.set(xlabel="radius (filter-normalised units)", ylabel="loss")
        return fig


def random_directions(center, data, *, n: int = 16, radii: Grid = (0.0, 1.0, 11),
                      model: Optional[nn.Module] = None, seed: int = 0, kind: str = "filter",
                      **kw) -> RaysResult:
    """Losses along ``n`` random directions (filter-normalised by default) at every radius, all
    rays in one batched evaluation (the K = n + 1 vertices are the centre and centre + d_i)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    start = time.perf_counter()
    model = _model_of(model, center)
    c = P.state_of(center)
    names = P.parameter_names(model)
    g = torch.Generator().manual_seed(seed)
    dirs = [P.random_direction(c, names=names, kind=kind, generator=g) for _ in range(n)]
    vertices = [c] + [_shift(c, d) for d in dirs]
    r = _grid(radii, "radii")
    R = torch.tensor(r, dtype=torch.float64)
    coeffs = torch.zeros(n, len(r), n + 1, dtype=torch.float64)
    coeffs[:, :, 0] = 1 - R
    for i in range(n):
        coeffs[i, :, i + 1] = R
    ev = _eval(model, vertices, coeffs.reshape(-1, n + 1), data, kw)
    return RaysResult(radii=r, loss=ev.loss.reshape(n, len(r)).tolist(),
                      accuracy=ev.accuracy.reshape(n, len(r)).tolist(),
                      seconds=time.perf_counter() - start)
