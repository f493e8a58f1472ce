"""Manifold size: how large a region of linearly connected low-loss points surrounds a model.

Notation (``../shared/DESIGN.md`` section 5): anchor ``theta*`` (the model passed in), ``L`` the
mean loss on a fixed probe set ``data``, threshold ``tau = L(theta*) + epsilon`` (absolute) or
``L(theta*) * (1 + epsilon)`` (relative), or a ``tau`` given outright (candidates that are
compared share one). The low-loss region is ``S = {theta : L(theta) <= tau}``. Three estimators:

* :func:`radius` (no training): the largest step along each of many random directions with the
  whole segment in S; size = mean log step.
* :func:`simplex` (after Benton et al. 2021): grow a k-simplex in S anchored at theta*, one
  trained connector at a time; size = ``(1/k) log Vol_k``.
* :func:`minima`: short training runs from theta* with different data orders; the largest
  subset of their end points whose simplex lies in S; size as for ``simplex``.

Distances are measured in ``units="raw"`` parameter units or ``"filter"`` units, in which every
filter's displacement is divided by the norm of the same filter of theta* and by ``sqrt(F)``
(F filters in all): the distance is the RMS relative displacement of the filters, so models of
different widths can be compared, and a displacement of every filter by its own norm has length
1. Only trainable parameters move; buffers stay at the anchor's values. These estimators are this
project's reconstruction of Malviya et al. 2024, whose exact recipe is not public.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import params as P
from ._checks import int_at_least, positive
from .engine import evaluate, point_losses
from .training import train
from ._results import Result, figure

Data = Tuple[Tensor, Tensor]


@dataclass
class ManifoldEstimate(Result):
    """One estimate of the size of the low-loss manifold around a model.

    Attributes:
        estimator: ``"radius"``, ``"simplex"`` or ``"minima"``.
        size: the log-size (mean log radius, or ``(1/k) log Vol_k``), in ``units``; ``-inf``
            when the region is empty (the anchor's loss is above the threshold, or no simplex
            was accepted).
        spread: standard deviation over directions (radius), accepted subsets (minima) or
            repeats (simplex); None where there is only one value.
        dimension: the simplex dimension k reached (1 for radius: segments).
        threshold: the loss threshold tau.
        anchor_loss: the anchor's loss on the probe set.
        units: ``"raw"`` or ``"filter"``.
        n_evaluations: loss evaluations (one point over the whole probe set, or one training
            step's point over a minibatch) spent.
        seconds: wall time.
        trace: one record per step (grid, bisection round, connector step, line-search round, run).
        details: what is particular to the estimator (per-direction radii, vertex losses, ...).
    """

    estimator: str
    size: float
    spread: Optional[float]
    dimension: int
    threshold: float
    anchor_loss: float
    units: str
    n_evaluations: int
    seconds: float
    trace: List[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def plot(self):
        """What the estimate rests on (a matplotlib Figure): radius, the histogram of the log
        radii of the directions; simplex, the training loss of each connector against the
        threshold; minima, the loss of each run's end point, those in the chosen simplex marked."""
        what = {"radius": "radius along random directions", "simplex": "grown simplex",
                "minima": "simplex of short training runs"}.get(self.estimator, self.estimator)
        size = "empty (-inf)" if self.size == -math.inf else f"{self.size:.3g}"
        k = "" if self.estimator == "radius" else f", k={self.dimension}"
        fig, (ax,) = figure(1, f"Manifold size, {what}: {size}{k} ({self.units} units)")
        if self.estimator == "radius":
            logs = [math.log(t) for t in self.details.get("radii", []) if t > 0]
            ax.hist(logs, bins=max(5, len(logs) // 3), label=f"directions ({len(logs)})")
            if math.isfinite(self.size):
                ax.axvline(self.size, color="C1", label=f"size: mean log radius {self.size:.3g}")
            ax.set(xlabel=f"log radius: ln(largest step below the threshold), {self.units} units", ylabel="directions")
        elif self.estimator == "minima" and "vertex_losses" in self.details:
            losses = self.details["vertex_losses"]
            chosen = set(self.details.get("subset", []))
            colors = ["C0" if i in chosen else "0.7" for i in range(len(losses))]
            ax.bar(range(len(losses)), losses, color=colors)
            ax.bar([], [], color="C0", label=f"in the chosen simplex ({len(chosen)} of {len(losses)})")
            if len(chosen) < len(losses):
                ax.bar([], [], color="0.7", label="left out")
            ax.set_xticks(range(len(losses)))
            ax.set(xlabel="training run (its end point)", ylabel="loss")
        else:
            steps = [r for r in self.trace if r.get("kind") == "train"]
            runs: List[List[int]] = []  # consecutive steps of one connector (repeats start anew)
            for i, r in enumerate(steps):
                if not runs or r.get("connector") != steps[i - 1].get("connector") or r.get("step") == 0:
                    runs.append([])
                runs[-1].append(i)
            labelled = set()
            for at in runs:
                c = steps[at[0]].get("connector", 0)
                ax.plot(at, [steps[i]["loss"] for i in at], lw=0.8, color=f"C{c % 10}",
                        label=None if c in labelled else f"connector {c}: mean loss on the simplex")
                labelled.add(c)
            ax.set(xlabel="training step (all connectors in turn)", ylabel="loss")
        if self.estimator != "radius":
            ax.axhline(self.threshold, color="C3", ls="--", label=f"threshold τ {self.threshold:.4g}")
            ax.axhline(self.anchor_loss, color="k", ls=":", label=f"anchor's loss {self.anchor_loss:.4g}")
        if self.details.get("empty"):
            ax.text(0.5, 0.5, self.details["empty"], ha="center", va="center", fontsize=8, transform=ax.transAxes)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
        return fig


# ----------------------------------------------------------------------------- shared parts


def threshold(anchor_loss: float, *, epsilon: float = 0.1, relative: bool = True) -> float:
    """The loss threshold ``L + epsilon`` (absolute) or ``L * (1 + epsilon)`` (relative)."""
    epsilon = positive("epsilon", epsilon)
    return anchor_loss * (1 + epsilon) if relative else anchor_loss + epsilon


def _training_data(data: Data, train_data: Optional[Data]) -> Data:
    """What the estimators that train train on: ``train_data``, by default the probe set."""
    train_set = data if train_data is None else train_data
    if len(train_set[0]) == 0:
        raise ValueError("train_data is empty: expected at least one example")
    return train_set


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


class _Space:
    """The anchor with its metric (``units``) and the coordinates connectors train in.

    Training coordinates u are per element, scaled by the RMS element of the element's filter
    in theta* (``delta = rms * u``): an Adam step then moves every filter by about the same
    fraction of its own size, whatever the parameterisation's scale, which makes the trained
    simplex equivariant under rescaling the parameters."""

    def __init__(self, model: nn.Module, units: str):
        if units not in ("raw", "filter"):
            raise ValueError(f"units must be 'raw' or 'filter', got {units!r}")
        self.units = units
        self.anchor = {n: t.clone() for n, t in P.state_of(model).items()}
        self.names = [n for n in P.parameter_names(model) if self.anchor[n].is_floating_point()]
        if not self.names:
            raise ValueError("the model has no trainable floating-point parameters to move")
        self.norms = P.filter_norms(self.anchor, self.names)
        n_filters = sum(t.numel() for t in self.norms.values())
        self.metric = {n: (self.norms[n] * math.sqrt(n_filters)) if units == "filter"
                       else torch.ones((), dtype=torch.float64, device=self.anchor[n].device) for n in self.names}
        self.rms = {}
        for n in self.names:
            t = self.anchor[n]
            per_filter = t[0].numel() if t.dim() > 1 else t.numel()
            self.rms[n] = (self.norms[n] / math.sqrt(max(per_filter, 1))).to(t.dtype)

    def in_units(self, state: P.State) -> P.State:
        """Displacement from the anchor, in units (float64)."""
        return {n: (state[n].double() - self.anchor[n].double()) / self.metric[n] for n in self.names}

    def norm(self, displacement: P.State) -> float:
        """Length of a displacement (not a state) in units."""
        return math.sqrt(sum((displacement[n].double() / self.metric[n]).pow(2).sum().item()
                             for n in self.names))

    def log_volume(self, vertices: Sequence[P.State]) -> float:
        return P.simplex_log_volume([self.in_units(v) for v in vertices], names=self.names)

    def moved(self, displacement: P.State, scale: float = 1.0) -> P.State:
        """The anchor moved by ``scale * displacement`` (buffers unchanged)."""
        out = dict(self.anchor)
        for n in self.names:
            out[n] = self.anchor[n] + scale * displacement[n].to(self.anchor[n].dtype)
        return out


def _losses(model, vertices, coeffs: Tensor, data: Data, ev_kw: dict) -> Tensor:
    """Mean loss at every row of ``coeffs`` (float64, NaN as inf), on the CPU whatever the
    model's device: the searches that use them mix them with CPU bookkeeping."""
    first = vertices[0][next(iter(vertices[0]))]
    ev = evaluate(model, vertices, coeffs.to(device=first.device, dtype=first.dtype), data, quiet=True, **ev_kw)
    return torch.nan_to_num(ev.loss.double(), nan=math.inf).cpu()


def _setup(model, data, units, tau, epsilon, relative, ev_kw) -> Tuple[_Space, float, float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the anchor), got {type(model).__name__}")
    space = _Space(model, units)
    anchor_loss = _losses(model, [space.anchor], torch.ones(1, 1), data, ev_kw)[0].item()
    tau = threshold(anchor_loss, epsilon=epsilon, relative=relative) if tau is None else float(tau)
    return space, anchor_loss, tau


def _evaluation_options(kw: dict) -> dict:
    """The engine's options for estimators that train (their own ``batch_size`` is the training
    minibatch, so the evaluation's chunk size comes as ``eval_batch_size``)."""
    out = {"loss": "cross_entropy", "bn": "recompute", **kw}
    if "eval_batch_size" in out:
        out["batch_size"] = out.pop("eval_batch_size")
    return out


def _bar(total: int, quiet: bool, desc: str):
    return tqdm(total=total, desc=desc, leave=False, disable=quiet or not sys.stderr.isatty())


def _empty(estimator, space, anchor_loss, tau, n_eval, start) -> ManifoldEstimate:
    return ManifoldEstimate(estimator=estimator, size=-math.inf, spread=None, dimension=0,
                            threshold=tau, anchor_loss=anchor_loss, units=space.units,
                            n_evaluations=n_eval, seconds=time.perf_counter() - start,
                            details={"empty": "the anchor's loss is above the threshold"})


def _std(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2 or len(finite) != len(values):
        return None
    return float(torch.tensor(finite, dtype=torch.float64).std().item())


# ----------------------------------------------------------------------------- radius


def _directions(space: _Space, n: int, kind: str, ignore: str, seed: int) -> List[P.State]:
    if kind not in ("filter", "gaussian"):
        raise ValueError(f"kind must be 'filter' or 'gaussian', got {kind!r}")
    if ignore not in ("biasbn", "none"):
        raise ValueError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = {}
        for name in space.names:
            w = space.anchor[name]
            # Drawn on the CPU (the same directions on every device), then moved to the anchor's.
            r = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.device)
            if ignore == "biasbn" and w.dim() <= 1:
                r.zero_()
            elif kind == "filter":  # each filter as long as the anchor's (Li et al. 2018)
                rows = r.reshape(w.shape[0], -1) if w.dim() > 1 else r.reshape(1, -1)
                rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
                r = rows.reshape(w.shape) * space.norms[name]
            d[name] = r
        out.append(d)
    return out


def radius(
    model: nn.Module,
    data: Data,
    *,
    directions: Union[int, Sequence[P.State]] = 32,
    tau: Optional[float] = None,
    epsilon: float = 0.1,
    relative: bool = True,
    units: str = "filter",
    kind: str = "filter",
    ignore: str = "biasbn",
    grid: Tuple[float, float, int] = (1e-3, 10.0, 16),
    bisect: int = 12,
    extend: int = 2,
    seed: int = 0,
    quiet: bool = False,
    **kw,
) -> ManifoldEstimate:
    """Mean log radius of the low-loss region along random directions (no training).

    For each direction d (unit length in ``units``), the largest t such that the whole segment
    ``theta* + s d, s in [0, t]`` has loss <= tau, found on a geometric grid (all directions and
    grid points in one batched evaluation) and refined by ``bisect`` rounds of bisection within
    the first grid interval that leaves S (every direction in one batch per round). Between grid
    points the segment is assumed to stay in S; a finer grid tightens that.

    Args:
        model: the anchor theta* (and the architecture).
        data: the probe set ``(inputs, targets)`` that defines L.
        directions: how many random directions, or the directions themselves (state dicts over
            the trainable parameters; each is normalised to unit length in ``units``).
        tau, epsilon, relative: the threshold (see :func:`threshold`; ``tau`` overrides).
        units: ``"filter"`` (default) or ``"raw"``; radii are lengths in these units.
        kind: random directions ``"filter"``-normalised (Li et al. 2018; zero-initialised
            filters get their tensor's RMS filter norm, so they move too) or ``"gaussian"``.
        ignore: ``"biasbn"`` (default) leaves biases and normalisation parameters (1-D tensors)
            alone, as Li et al. do; ``"none"`` moves them too.
        grid: ``(lo, hi, n)``: n geometric steps from lo to hi times the anchor's own length in
            ``units`` (1 in filter units). Directions still in S at the end are extended
            ``extend`` times by a factor 10; those in S even then are reported at the last
            step and counted as ``censored`` in ``details``.
        bisect: bisection rounds (the bracket shrinks by 2**bisect).
        seed: seeds the directions.
        quiet: no progress bar.
        **kw: passed to :func:`manifold_ext.engine.evaluate` (``loss``, ``bn``, ``batch_size``,
            ``max_memory``, ``engine``).

    Returns:
        :class:`ManifoldEstimate` with ``size = mean log t``, ``spread`` the standard deviation
        of log t over directions, and ``details["radii"]`` every t.
    """
    start = time.perf_counter()
    lo, hi, n_grid = grid
    if not 0 < lo < hi:
        raise ValueError(f"grid must be (lo, hi, n) with 0 < lo < hi, got {grid}")
    int_at_least("grid's number of points", n_grid, 2)
    int_at_least("bisect", bisect, 0)
    int_at_least("extend", extend, 0)
    space, anchor_loss, tau = _setup(model, data, units, tau, epsilon, relative, kw)
    dirs = _unit_directions(space, directions, kind, ignore, seed)
    R = len(dirs)
    if not anchor_loss <= tau:
        return _empty("radius", space, anchor_loss, tau, 1, start)
    vertices = [space.anchor] + [space.moved(d) for d in dirs]
    scale = space.norm({n: space.anchor[n] for n in space.names})
    steps = torch.logspace(math.log10(lo), math.log10(hi), n_grid, dtype=torch.float64) * scale

    def outside(rays: Tensor, ts: Tensor) -> Tensor:
        """Whether the loss at anchor + ts[i] * d[rays[i]] exceeds tau."""
        c = torch.zeros(len(rays), R + 1, dtype=torch.float64)
        c[:, 0] = 1 - ts
        c[torch.arange(len(rays)), rays + 1] = ts
        return _losses(model, vertices, c, data, kw) > tau

    bar = _bar(1 + extend + bisect, quiet, "radius")
    trace: List[dict] = []
    low, high, n_grid_eval = _bracket(outside, R, steps, extend, bar, trace)
    censored = int(torch.isinf(high).sum())
    n_eval = 1 + n_grid_eval + _bisect(outside, low, high, bisect, bar, trace)
    bar.close()
    logs = [math.log(t) if t > 0 else -math.inf for t in low.tolist()]
    return ManifoldEstimate(
        estimator="radius", size=sum(logs) / R, spread=_std(logs), dimension=1, threshold=tau,
        anchor_loss=anchor_loss, units=space.units, n_evaluations=n_eval,
        seconds=time.perf_counter() - start, trace=trace,
        details={"radii": low.tolist(), "censored": censored, "directions": R})


def _unit_directions(space: _Space, directions, kind: str, ignore: str, seed: int) -> List[P.State]:
    """The directions of :func:`radius` (``directions`` random ones, or those given), each scaled
    to unit length in the space's units."""
    if isinstance(directions, int):
        int_at_least("directions", directions)
        dirs = _directions(space, directions, kind, ignore, seed)
    else:
        dirs = [{n: d[n].to(device=space.anchor[n].device, dtype=torch.float64) for n in space.names}
                for d in directions]
        if not dirs:
            raise ValueError("directions must not be empty")
    for i, d in enumerate(dirs):
        length = space.norm(d)
        if not length > 0:
            raise ValueError(f"direction {i} has zero length")
        for n in space.names:
            d[n] = d[n] / length
    return dirs


def _bracket(outside: Callable[[Tensor, Tensor], Tensor], R: int, steps: Tensor, extend: int, bar,
             trace: List[dict]) -> Tuple[Tensor, Tensor, int]:
    """``(low, high, evaluations)``: for each of the R directions the last grid step inside S and
    the first outside (inf when none), all directions' grid points in one evaluation a round;
    directions still inside after the grid go further out by a factor 10 a round, ``extend``
    times."""
    ratio = (steps[1] / steps[0]).item()
    low = torch.zeros(R, dtype=torch.float64)
    high = torch.full((R,), math.inf, dtype=torch.float64)
    pending, n_eval = torch.arange(R), 0
    for round_ in range(1 + extend):
        if len(pending) == 0:
            break
        if round_ > 0:
            steps = steps[-1] * ratio ** torch.arange(1, math.ceil(math.log(10) / math.log(ratio)) + 1,
                                                     dtype=torch.float64)
        rays = pending.repeat_interleave(len(steps))
        out = outside(rays, steps.repeat(len(pending))).reshape(len(pending), len(steps))
        n_eval += len(rays)
        for i, r in enumerate(pending.tolist()):
            bad = out[i].nonzero().flatten()
            if len(bad):
                j = bad[0].item()
                high[r] = steps[j]
                low[r] = steps[j - 1] if j > 0 else low[r]
            else:
                low[r] = steps[-1]
        pending = torch.isinf(high).nonzero().flatten()
        trace.append({"kind": "grid", "points": len(rays), "inside": len(pending)})
        bar.update()
    return low, high, n_eval


def _bisect(outside: Callable[[Tensor, Tensor], Tensor], low: Tensor, high: Tensor, rounds: int, bar,
            trace: List[dict]) -> int:
    """Narrow every finite bracket ``[low, high]`` in place by ``rounds`` geometric bisections,
    all directions in one evaluation a round; returns the evaluations spent."""
    active, n_eval = torch.isfinite(high).nonzero().flatten(), 0
    for _ in range(rounds):
        if len(active) == 0:
            break
        l, h = low[active], high[active]
        mid = torch.where(l > 0, (l * h).sqrt(), h / 2)
        out = outside(active, mid)
        n_eval += len(active)
        high[active] = torch.where(out, mid, h)
        low[active] = torch.where(out, l, mid)
        trace.append({"kind": "bisect", "points": len(active),
                      "max_ratio": (high[active] / low[active].clamp_min(1e-300)).max().item()})
        bar.update()
    return n_eval


# ----------------------------------------------------------------------------- simplexes


def _flat_units(space: _Space, state: P.State) -> Tensor:
    u = space.in_units(state)
    return torch.cat([u[n].reshape(-1) for n in space.names])


def _log_height(space: _Space, basis: Optional[Tensor], new: Dict[str, Tensor], origin: Tensor) -> Tensor:
    """log of the distance (in units, differentiable in ``new``) from the vertex ``new`` to the
    affine hull of the earlier vertices: ``origin`` (the first, flattened, in units) plus the span
    of the orthonormal ``basis`` columns. ``Vol_k = Vol_{k-1} * height / k``."""
    e = torch.cat([((new[n].double() - space.anchor[n].double()) / space.metric[n]).reshape(-1)
                   for n in space.names]) - origin
    if basis is not None:
        e = e - basis @ (basis.T @ e)
    return e.norm().clamp_min(1e-300).log()


def _accepts(vertex_losses: Tensor, sample_losses: Tensor, tau: float, quantile: float) -> bool:
    """A simplex is in S when its vertices are and the ``quantile`` of its sampled points'
    losses is at most tau."""
    return bool((vertex_losses <= tau).all()) and torch.quantile(sample_losses, quantile).item() <= tau


def _line_search(accepted: Callable[[float], bool], *, rounds: int, doublings: int) -> float:
    """The largest accepted scale: 1, doubled while accepted (at most ``doublings`` times) or
    bisected towards 0 when not, then ``rounds`` bisections of the bracket; 0.0 if none."""
    lo, hi = 0.0, None
    alpha = 1.0
    for _ in range(doublings + 1):
        if not accepted(alpha):
            hi = alpha
            break
        lo = alpha
        alpha *= 2
    if hi is None:
        return lo
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if accepted(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _grow(model, space: _Space, data: Data, train: Data, tau: float, *, k, steps, points, batch_size,
          lr, lam, objective, init, samples, quantile, line_search, doublings, seed, loss, bn, kw, bar,
          trace):
    """One run of the simplex estimator: the accepted vertices and the loss evaluations spent.
    Vertex i is trained as a direction from the centroid of the accepted ones, then scaled to the
    largest extent at which the simplex is accepted; the run stops at the first rejected vertex."""
    g = torch.Generator().manual_seed(seed)
    vertices = [space.anchor]
    n_eval = 0
    for i in range(1, k + 1):
        centroid = {n: sum(v[n] for v in vertices) / len(vertices) for n in space.names}
        new = _train_connector(model, space, vertices, centroid, train, tau, i=i, steps=steps, points=points,
                               batch_size=batch_size, lr=lr, lam=lam, objective=objective, init=init,
                               loss=loss, bn=bn, g=g, bar=bar, trace=trace)
        n_eval += steps * points
        alpha, spent = _extent(model, space, vertices, centroid, new, data, tau, i=i, samples=samples,
                               quantile=quantile, line_search=line_search, doublings=doublings, g=g, kw=kw,
                               trace=trace)
        n_eval += spent
        if alpha == 0.0:
            trace.append({"kind": "rejected", "connector": i})
            break
        vertices.append({**space.anchor, **{n: centroid[n] + alpha * (new[n] - centroid[n]) for n in space.names}})
    return vertices, n_eval


def _train_connector(model, space: _Space, vertices, centroid, train: Data, tau: float, *, i, steps, points,
                     batch_size, lr, lam, objective, init, loss, bn, g, bar, trace) -> P.State:
    """The new vertex i, ``centroid + rms * u``, with ``u`` trained for ``steps`` steps on
    mini-batches of ``train`` to enlarge the simplex (its height over the others' hull) while its
    sampled points stay under tau (``objective="threshold"``) or at low mean loss (``"benton"``)."""
    x, y = train
    u = {n: (init * torch.randn(space.anchor[n].shape, generator=g, dtype=torch.float64))
         .to(device=space.anchor[n].device, dtype=space.anchor[n].dtype).requires_grad_() for n in space.names}
    opt = torch.optim.Adam(list(u.values()), lr=lr)
    flat = [_flat_units(space, v) for v in vertices]
    origin = flat[0]
    basis = None
    if len(flat) > 1:
        basis = torch.linalg.qr(torch.stack([f - origin for f in flat[1:]], 1)).Q
    frozen = P.stack(vertices)
    for step in range(steps):
        new = {n: centroid[n] + space.rms[n] * u[n] for n in space.names}
        stacked = {n: torch.cat([frozen[n], new[n][None]]) if n in new
                   else torch.cat([frozen[n], frozen[n][:1]]) for n in frozen}
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        ref = frozen[space.names[0]]
        w = P.simplex_weights(points, i + 1, generator=g).to(device=ref.device, dtype=ref.dtype)
        losses = point_losses(model, stacked, w, (x[idx], y[idx]), loss=loss, bn=bn)
        mean_loss = losses.mean()
        log_h = _log_height(space, basis, new, origin)
        if objective == "benton":
            value = mean_loss - lam * log_h
        else:  # the volume under the constraint: only points above tau push back
            value = (torch.relu(losses - tau).mean() / max(tau, 1e-12)) / lam - log_h
        opt.zero_grad()
        value.backward()
        opt.step()
        trace.append({"kind": "train", "connector": i, "step": step, "loss": mean_loss.item(),
                      "log_height": log_h.item()})
        bar.update()
    with torch.no_grad():
        return {n: centroid[n] + space.rms[n] * u[n] for n in space.names}


def _extent(model, space: _Space, vertices, centroid, new, data: Data, tau: float, *, i, samples, quantile,
            line_search, doublings, g, kw, trace) -> Tuple[float, int]:
    """``(alpha, evaluations)``: the largest scale alpha of the new vertex about the centroid at
    which the simplex is accepted (0 when none is). The training set the direction, the threshold
    sets the extent; one fixed sample of points serves every alpha (common random numbers)."""
    weights = torch.cat([torch.eye(i + 1, dtype=torch.float64), P.simplex_weights(samples, i + 1, generator=g)])
    n_eval = 0

    def accepted(alpha: float) -> bool:
        nonlocal n_eval
        moved = {n: centroid[n] + alpha * (new[n] - centroid[n]) for n in space.names}
        losses = _losses(model, vertices + [{**space.anchor, **moved}], weights, data, kw)
        n_eval += len(weights)
        ok = _accepts(losses[: i + 1], losses[i + 1:], tau, quantile)
        trace.append({"kind": "line_search", "connector": i, "alpha": alpha, "accepted": ok,
                      "vertex_loss": losses[i].item(),
                      "quantile_loss": torch.quantile(losses[i + 1:], quantile).item()})
        return ok

    return _line_search(accepted, rounds=line_search, doublings=doublings), n_eval


def simplex(
    model: nn.Module,
    data: Data,
    *,
    k: int = 2,
    train_data: Optional[Data] = None,
    steps: int = 150,
    points: int = 8,
    batch_size: int = 256,
    lr: float = 0.05,
    lam: float = 0.05,
    objective: str = "threshold",
    init: float = 0.05,
    samples: int = 128,
    quantile: float = 0.95,
    line_search: int = 6,
    doublings: int = 8,
    repeats: int = 1,
    tau: Optional[float] = None,
    epsilon: float = 0.1,
    relative: bool = True,
    units: str = "filter",
    seed: int = 0,
    quiet: bool = False,
    return_vertices: bool = False,
    **kw,
):
    """Size of a low-loss k-simplex grown around the model (after Benton et al. 2021,
    "Loss surface simplexes for mode connecting volumes and fast ensembling").

    Connectors are added one at a time. Each starts at the centroid of the current vertices plus
    a small filter-normalised perturbation (``init`` times each filter's RMS element), and only
    the newest trains: ``steps`` Adam steps on the mean loss over ``points`` uniformly sampled
    simplex points (Dirichlet(1) weights) of a ``batch_size`` minibatch of ``train_data``, minus
    ``lam * log Vol`` (in ``units``). Gradients flow through the fused ops. The connector is then
    placed at the largest scale about the centroid at which the simplex lies in S: its vertices'
    losses and the ``quantile`` of the losses at ``samples`` uniform points of the whole simplex,
    on the probe set ``data``, are at most tau. The scale is searched from 1, doubling (at most
    ``doublings`` times) or halving, then bisected ``line_search`` times, so that the training
    sets the direction and the threshold the extent. A connector accepted at no positive scale
    ends the growth. Size = ``(1/k) log Vol_k`` of the final simplex, ``Vol_k = sqrt(det(E^T E)) / k!``.

    Args:
        model: the anchor theta* (vertex 0, never moved) and the architecture.
        data: the probe set that defines L and S.
        k: connectors to add (the simplex dimension sought).
        train_data: the connectors' training data (default: the probe set).
        steps, points, batch_size, lr: each connector's training (lr in the per-element
            coordinates above: 0.05 moves every element by about 5% of its filter's RMS).
        lam: weight of the volume term.
        init: the starting perturbation's size.
        samples, quantile: the acceptance test.
        line_search, doublings: the search for the accepted scale.
        repeats: independent runs (seeds ``seed, seed + 1, ...``); size is their mean and
            spread their standard deviation (None for one run).
        tau, epsilon, relative, units: as in :func:`radius`.
        **kw: ``loss`` and ``bn`` (training and evaluation), and for the evaluations
            ``batch_size`` is ``eval_batch_size``, ``max_memory``, ``engine``.

    Returns:
        :class:`ManifoldEstimate`; ``details["log_volumes"]`` per repeat, ``details["vertex_losses"]``
        the accepted vertices' losses (first repeat). With ``return_vertices``, the pair
        ``(estimate, vertices)``: the first repeat's vertices as states (the anchor first).
    """
    start = time.perf_counter()
    for name, v in (("k", k), ("steps", steps), ("points", points), ("batch_size", batch_size),
                    ("samples", samples), ("repeats", repeats)):
        int_at_least(name, v)
    int_at_least("line_search", line_search, 0)
    int_at_least("doublings", doublings, 0)
    _check_fraction("quantile", quantile)
    for name, v in (("lr", lr), ("lam", lam), ("init", init)):
        positive(name, v)
    if objective not in ("threshold", "benton"):
        raise ValueError(f"objective must be 'threshold' or 'benton', got {objective!r}")
    ev_kw = _evaluation_options(kw)
    space, anchor_loss, tau = _setup(model, data, units, tau, epsilon, relative, ev_kw)
    train_set = _training_data(data, train_data)
    trace: List[dict] = []
    n_eval = 1
    if not anchor_loss <= tau:
        empty = _empty("simplex", space, anchor_loss, tau, n_eval, start)
        return (empty, [space.anchor]) if return_vertices else empty
    bar = _bar(repeats * k * steps, quiet, "simplex")
    grown = []
    for r in range(repeats):
        vertices, spent = _grow(model, space, data, train_set, tau, k=k, steps=steps, points=points,
                                batch_size=batch_size, lr=lr, lam=lam, objective=objective,
                                init=init, samples=samples,
                                quantile=quantile, line_search=line_search, doublings=doublings,
                                seed=seed + r, loss=ev_kw["loss"], bn=ev_kw["bn"],
                                kw=ev_kw, bar=bar, trace=trace)
        n_eval += spent
        grown.append(vertices)
    bar.close()
    first = grown[0]
    dims = [len(v) - 1 for v in grown]
    log_volumes = [space.log_volume(v) if len(v) > 1 else -math.inf for v in grown]
    sizes = [lv / d if d > 0 else -math.inf for lv, d in zip(log_volumes, dims)]
    vertex_losses = _losses(model, first, torch.eye(len(first)), data, ev_kw).tolist()
    n_eval += len(first)
    est = ManifoldEstimate(
        estimator="simplex", size=sum(sizes) / len(sizes), spread=_std(sizes),
        dimension=min(dims), threshold=tau, anchor_loss=anchor_loss, units=space.units,
        n_evaluations=n_eval, seconds=time.perf_counter() - start, trace=trace,
        details={"log_volumes": log_volumes, "dimensions": dims, "vertex_losses": vertex_losses})
    return (est, first) if return_vertices else est


# ----------------------------------------------------------------------------- minima


MINIMA_BATCHES = 8  # minima's default batches per epoch


def _runs_batch_size(batch_size: Optional[int], n: int) -> int:
    """minima's minibatch over ``n`` training examples. One batch of all of them would give every
    run the same gradients, whatever the data order: the end points would differ by rounding."""
    if batch_size is None:
        batch_size = max(1, math.ceil(n / MINIMA_BATCHES))
    int_at_least("batch_size", batch_size)
    if batch_size >= n:
        raise ValueError(f"batch_size must be less than the {n} training examples of minima's runs, got "
                         f"{batch_size}: with one batch per epoch every run takes the same steps, and the end "
                         f"points differ only by rounding")
    return batch_size


def _train_copy(model: nn.Module, data: Data, *, epochs: int, lr: float, batch_size: int, seed: int,
                loss: str, optimizer: str = "adam") -> P.State:
    """The state of a copy of ``model`` trained for ``epochs`` epochs in a seeded data order."""
    m = copy.deepcopy(model)
    # With SGD the runs differ by their data order alone. A fresh Adam's first steps move every
    # coordinate by about lr whatever its gradient, a perturbation of its own, so its lr must stay
    # small enough for the end points to remain in S.
    train(m, *data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, optimizer=optimizer, loss=loss)
    return {n: t.detach().clone() for n, t in P.state_of(m).items()}


@dataclass
class SubsetChoice:
    """What :func:`largest_simplex` found.

    Attributes:
        indices: the chosen subset (``[i]`` when only single vertices lie in S, ``[]`` when none).
        log_volume: its log k-volume in units (``-inf`` for fewer than two vertices).
        accepted: every accepted subset with its log-volume.
        vertex_losses: each vertex's loss.
        evaluations: loss evaluations spent.
    """

    indices: List[int]
    log_volume: float
    accepted: List[Tuple[List[int], float]]
    vertex_losses: List[float]
    evaluations: int


def largest_simplex(
    model: nn.Module,
    vertices: Sequence[P.Vertex],
    data: Data,
    *,
    tau: float,
    units: str = "filter",
    samples: int = 128,
    quantile: float = 0.95,
    seed: int = 0,
    **kw,
) -> SubsetChoice:
    """The largest subset of ``vertices`` whose simplex lies in ``S = {L <= tau}``.

    Every subset of two or more vertices is tested at once (one batched evaluation): it is in S
    when its vertices and the ``quantile`` of the losses at ``samples`` uniform points of its
    simplex are at most tau. Among the largest accepted subsets, the one of largest volume wins. Distances are in
    ``units`` about ``model`` (the anchor); ``kw`` goes to :func:`manifold_ext.engine.evaluate`.
    """
    int_at_least("samples", samples)
    _check_fraction("quantile", quantile)
    space = _Space(model, units)
    states = [P.state_of(v) for v in vertices]
    m = len(states)
    if m == 0:
        raise ValueError("vertices must not be empty")
    g = torch.Generator().manual_seed(seed)
    subsets = [list(c) for j in range(m, 1, -1) for c in itertools.combinations(range(m), j)]
    rows = [torch.eye(m, dtype=torch.float64)]
    for sub in subsets:
        w = torch.zeros(samples, m, dtype=torch.float64)
        w[:, sub] = P.simplex_weights(samples, len(sub), generator=g)
        rows.append(w)
    losses = _losses(model, states, torch.cat(rows), data, kw)
    vertex_losses = losses[:m].tolist()
    sampled = losses[m:].reshape(len(subsets), samples)
    accepted = [(sub, space.log_volume([states[j] for j in sub])) for i, sub in enumerate(subsets)
                if _accepts(losses[sub], sampled[i], tau, quantile)]
    if accepted:
        top = max(len(sub) for sub, _ in accepted)
        best, best_logv = max(((sub, v) for sub, v in accepted if len(sub) == top), key=lambda e: e[1])
    else:
        best, best_logv = [i for i in range(m) if vertex_losses[i] <= tau][:1], -math.inf
    return SubsetChoice(indices=best, log_volume=best_logv, accepted=accepted,
                        vertex_losses=vertex_losses, evaluations=len(losses))


def minima(
    model: nn.Module,
    data: Data,
    *,
    train_data: Optional[Data] = None,
    m: int = 4,
    epochs: int = 1,
    optimizer: str = "adam",
    lr: float = 1e-4,
    batch_size: Optional[int] = None,
    samples: int = 128,
    quantile: float = 0.95,
    tau: Optional[float] = None,
    epsilon: float = 0.1,
    relative: bool = True,
    units: str = "filter",
    seed: int = 0,
    quiet: bool = False,
    **kw,
) -> ManifoldEstimate:
    """Size of the simplex spanned by short training runs from the model.

    ``m`` copies of the model are trained for ``epochs`` epochs with ``optimizer`` (``"adam"``
    or ``"sgd"``; ``lr``, ``batch_size``) on ``train_data``, each in its own seeded data order; the largest subset of
    their end points whose simplex lies in S (:func:`largest_simplex`) gives the size
    ``(1/k) log Vol_k`` (k = subset size - 1), in ``units`` about the model.

    The runs differ by their data order alone, so an epoch must take more than one batch: by
    default its N examples go in batches of ``ceil(N / MINIMA_BATCHES)``, :data:`MINIMA_BATCHES`
    of them when N is a multiple, which also keeps a run's number of steps the same whatever the
    size of the training set.

    Unlike the other estimators, an anchor above tau does not make the region empty: the runs
    may still end in S.

    Args:
        model: the starting point of the runs (the anchor for units and the threshold).
        data: the probe set that defines L and S.
        train_data: the runs' training data (default: the probe set).
        m, epochs, optimizer, lr: the runs.
        batch_size: the runs' minibatch, less than the training set (default: ``ceil(N /
            MINIMA_BATCHES)`` of its N examples).
        samples, quantile: the acceptance test of :func:`largest_simplex`.
        tau, epsilon, relative, units: as in :func:`radius`.
        **kw: ``loss`` (training and evaluation), ``bn`` and other evaluation options; the
            evaluation's chunk size is ``eval_batch_size``.

    Returns:
        :class:`ManifoldEstimate`; ``spread`` is the standard deviation of the size over every
        accepted subset of the chosen dimension (None when only one), ``details`` the subset,
        every end point's loss and the pairwise distances in units.
    """
    start = time.perf_counter()
    for name, v in (("m", m), ("epochs", epochs)):
        int_at_least(name, v)
    if m < 2:
        raise ValueError(f"m must be at least 2 (a simplex needs two end points), got {m}")
    positive("lr", lr)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    train_set = _training_data(data, train_data)
    batch_size = _runs_batch_size(batch_size, len(train_set[0]))
    ev_kw = _evaluation_options(kw)
    space, anchor_loss, tau = _setup(model, data, units, tau, epsilon, relative, ev_kw)
    bar = _bar(m, quiet, "minima")
    ends, trace = [], []
    for i in range(m):
        ends.append(_train_copy(model, train_set, epochs=epochs, lr=lr, batch_size=batch_size,
                                seed=seed + i, loss=ev_kw["loss"], optimizer=optimizer))
        trace.append({"kind": "run", "run": i})
        bar.update()
    bar.close()
    choice = largest_simplex(model, ends, data, tau=tau, units=units, samples=samples,
                             quantile=quantile, seed=seed, **ev_kw)
    k = len(choice.indices) - 1
    size = choice.log_volume / k if k > 0 else -math.inf
    sizes = [v / k for sub, v in choice.accepted if len(sub) == k + 1] if k > 0 else []
    dists = [[space.norm({n: ends[a][n].double() - ends[b][n].double() for n in space.names})
              for b in range(m)] for a in range(m)]
    return ManifoldEstimate(
        estimator="minima", size=size, spread=_std(sizes), dimension=max(k, 0),
        threshold=tau, anchor_loss=anchor_loss, units=space.units,
        n_evaluations=1 + choice.evaluations, seconds=time.perf_counter() - start, trace=trace,
        details={"subset": choice.indices, "vertex_losses": choice.vertex_losses, "distances": dists,
                 "batch_size": batch_size, "train_steps": m * epochs * math.ceil(len(train_set[0]) / batch_size)})


ESTIMATORS: Dict[str, Callable[..., ManifoldEstimate]] = {"radius": radius, "simplex": simplex, "minima": minima}

# The engine's options an estimator passes on to manifold_ext.engine.evaluate.
_ENGINE_OPTIONS = ("loss", "bn", "engine", "batch_size", "max_memory", "points_per_chunk", "head", "ignore_index")


def option_names(estimator: str) -> Tuple[str, ...]:
    """The keyword arguments ``ESTIMATORS[estimator]`` takes besides the model and the data: its
    own and the engine's evaluation options (``eval_batch_size`` for the estimators that train,
    whose ``batch_size`` is the training minibatch)."""
    fn = ESTIMATORS[estimator]
    own = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY]
    extra = [o for o in _ENGINE_OPTIONS if o not in own]
    if "batch_size" in own:
        extra.append("eval_batch_size")
    return tuple(own + extra)
