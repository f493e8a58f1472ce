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

    def plot(self, title: Optional[str] = None):
        """Loss and accuracy (in %) against t, the end points marked, t outside [0, 1] (an
        extrapolation) set apart by shading [0, 1] (a matplotlib Figure)."""
        fig, (ax1, ax2) = figure(2, title or f"Loss and accuracy along (1 - t)·a + t·b ({len(self.t)} points)")
        acc = [100 * v for v in self.accuracy]
        ends = [i for i, t in enumerate(self.t) if min(abs(t), abs(t - 1)) < 1e-9]
        extrapolates = any(t < 0 or t > 1 for t in self.t)
        for ax, ys, label in ((ax1, self.loss, "loss"), (ax2, acc, "accuracy (%)")):
            ax.plot(self.t, ys, ".-", ms=4, label="interpolated points")
            if ends:
                ax.plot([self.t[i] for i in ends], [ys[i] for i in ends], "s", color="C3", ms=6,
                        label="end points a (t=0), b (t=1)")
            if extrapolates:
                ax.axvspan(0, 1, color="0.93", zorder=0, label="between a and b (outside: extrapolated)")
            ax.set(xlabel="t (0: a, 1: b)", ylabel=label)
            ax.grid(alpha=0.3)
        fig.legend(*ax1.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
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
        """The path, with the barriers marked: the straight line between the end points' values
        (dashed), where the path rises furthest above it (the vertical line) and by how much
        (a matplotlib Figure)."""
        p = PathResult(**self.path)
        fig = p.plot(title=f"Loss barrier between a (t=0) and b (t=1): {self.barrier_loss:.4g} at "
                           f"t={self.t_max:.3f} ({len(p.t)} points, refined around the maximum)")
        ax1, ax2 = fig.axes[:2]
        acc = [100 * v for v in p.accuracy]
        for ax, ys, t_max, height, what in (
                (ax1, p.loss, self.t_max, self.barrier_loss, f"loss barrier {self.barrier_loss:.4g}"),
                (ax2, acc, self.t_max_error, -100 * self.barrier_error,
                 f"error barrier {100 * self.barrier_error:.3g} points")):
            line = (1 - t_max) * ys[0] + t_max * ys[-1]
            ax.plot([0, 1], [ys[0], ys[-1]], "--", color="0.5", label="straight line between the end points")
            ax.plot([t_max, t_max], [line, line + height], color="C3", lw=2.5, label=f"{what} at t={t_max:.3f}")
        for legend in list(fig.legends):
            legend.remove()
        handles, labels = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        fig.legend(handles + h2[-1:], labels + l2[-1:], loc="outside lower center", ncols=3, fontsize=7)
        ax1.set_title("loss: excess over the straight line", fontsize=9)
        ax2.set_title("accuracy: shortfall below the straight line", fontsize=9)
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
        """Contours of the loss over the plane, the centre marked (a matplotlib Figure)."""
        fig, (ax,) = figure(1, "Loss on the plane centre + α·d1 + β·d2")
        cs = ax.contourf(self.alpha, self.beta, torch.tensor(self.loss).T.numpy(), levels=levels)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "w+", ms=10, mew=2, label="centre (α = β = 0)")
        ax.set(xlabel="α (multiples of direction d1)", ylabel="β (multiples of direction d2)")
        ax.legend(fontsize=7, loc="upper right")
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
        """Histogram of the losses, their median marked (a matplotlib Figure)."""
        n, k = len(self.loss), len(self.weights[0]) if self.weights else 0
        where = (f"the simplex of {k} vertices" if len(self.log_volumes) <= 1
                 else f"a complex of {len(self.log_volumes)} simplices over {k} vertices")
        fig, (ax,) = figure(1, f"Loss at {n} points drawn uniformly from {where}")
        finite = [v for v in self.loss if math.isfinite(v)]
        ax.hist(finite, bins=30, color="C0", label="sampled points")
        if finite:
            median = sorted(finite)[len(finite) // 2]
            ax.axvline(median, color="C3", ls="--", label=f"median {median:.4g}")
        if len(finite) < n:
            ax.plot([], [], " ", label=f"{n - len(finite)} non-finite losses left out")
        ax.set(xlabel="loss", ylabel=f"points (of {n})")
        ax.legend(fontsize=7)
        return fig


def simplex_losses(vertices: Sequence, data, *, n: int = 256, complex: Optional[Sequence[Sequence[int]]] = None,
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
        """Every ray's loss against the radius, and their mean (a matplotlib Figure)."""
        fig, (ax,) = figure(1, f"Loss along {len(self.loss)} random directions from the centre")
        for i, row in enumerate(self.loss):
            ax.plot(self.radii, row, color="C0", alpha=0.4, lw=1, label="one direction" if i == 0 else None)
        if self.loss:
            mean = torch.tensor(self.loss, dtype=torch.float64).mean(0).tolist()
            ax.plot(self.radii, mean, color="k", lw=2, label="mean over directions")
        ax.set(xlabel="radius r (multiples of each direction,\nfilter-normalised by default)", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
