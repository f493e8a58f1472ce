"""The figures of a compare run (matplotlib, the ``plot`` extra): every metric against the gains,
the loss along the path from each expanded model to its adapted one, and a 2-D slice through a
grown simplex. Each function writes one PNG and returns its path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import torch

from . import manifold as M
from . import probes
from .builtin import Benchmark
from .compare import CompareResult, Settings, grow_and_adapt, metric_names


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _kind(name: str) -> str:
    """``control``, ``width`` (units, channels, heads) or ``depth``: the first of those words in the
    candidate's name (so "ff width +98 (~ depth +1)" is a width expansion), else ``other``."""
    hits = {}
    for kind, word in (("control", "control"), ("width", "width"), ("width", "heads"), ("depth", "depth")):
        at = name.find(word)
        if at >= 0 and (kind not in hits or at < hits[kind]):
            hits[kind] = at
    return min(hits, key=hits.get) if hits else "other"


_COLORS = {"control": "k", "width": "C0", "depth": "C3", "other": "C2"}


def metrics_vs_gain(result: CompareResult, path: Path) -> Path:
    """One panel per metric: its value against the gain over the base, every (seed, candidate)
    unit a point (width expansions blue, depth red, the control black, others green; an empty
    manifold, -inf, drawn as an x at the panel's left edge; a metric undefined for the inputs,
    NaN, is said so in its panel), the within-seed Spearman rho in the title."""
    settings = Settings.from_dict(result.settings)
    names = metric_names(settings)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = _figure(rows, cols, 3.2 * cols, 2.6 * rows)
    rho = {c["metric"]: c["spearman"] for c in result.correlations}
    for ax, name in zip(axes.flat, names):
        xs = [(u["sizes"][name[5:]] if name.startswith("size_") else u["baselines"][name]) for u in result.units]
        finite = [x for x in xs if math.isfinite(x)]
        left = min(finite) if finite else 0.0
        for u, x in zip(result.units, xs):
            c = _COLORS[_kind(u["candidate"])]
            if math.isfinite(x):
                ax.plot(x, u["gain_over_base"], "o", ms=3.5, color=c, alpha=0.7)
            elif not math.isnan(x):
                ax.plot(left, u["gain_over_base"], "x", ms=5, color=c)
        if all(math.isnan(x) for x in xs):
            ax.text(0.5, 0.5, "not defined for these inputs (NaN)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        ax.set_title(f"{name}  (rho {rho.get(name, math.nan):.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("gain over base (points)", fontsize=8)
    from matplotlib.lines import Line2D

    present = {_kind(u["candidate"]) for u in result.units}
    handles = [Line2D([], [], ls="", marker="o", color=_COLORS[k], label=label)
               for k, label in (("width", "width (units, heads, channels)"), ("depth", "depth"),
                                ("other", "other"), ("control", "control")) if k in present]
    if any(u["sizes"].get(n[5:]) == -math.inf for u in result.units for n in names if n.startswith("size_")):
        handles.append(Line2D([], [], ls="", marker="x", color="0.3", label="empty manifold (-inf), at the left edge"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"Each metric against the gain of each candidate and seed ({len(result.units)} units; rho: "
                 f"Spearman within seeds, averaged)", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def paths(bench: Benchmark, settings: Settings, base, path: Path, *, steps: int = 17,
          tau: Optional[float] = None) -> Path:
    """Probe-set loss on the segment from each candidate as expanded (t=0) to the same model
    after its adaptation (t=1), for the seed-0 base, against the common threshold ``tau`` (the
    run's, ``result.bases[0]["threshold"]``; None: ``settings.threshold`` x the base's probe
    loss, uncapped)."""
    task = bench.task
    probe = (task.x_train[:settings.probe_examples], task.y_train[:settings.probe_examples])
    fig, axes = _figure(1, 1, 10, 4.2)
    ax = axes[0, 0]
    for i, cand in enumerate(bench.candidates):
        expanded, adapted, _, _ = grow_and_adapt(base, cand, task, settings, seed=0)
        res = probes.linear_path(expanded, adapted, probe, steps=steps, quiet=True, loss=settings.loss)
        style = "-" if _kind(cand.name) != "depth" else "--"
        ax.plot(res.t, res.loss, style, lw=1, label=cand.name, color=f"C{i % 10}")
    if tau is None:
        tau = settings.threshold * probes.linear_path(base, base, probe, steps=2, quiet=True, loss=settings.loss).loss[0]
    ax.axhline(tau, color="k", ls=":", lw=1, label="threshold")
    ax.set_yscale("log")
    ax.set(xlabel="t: expanded (0) to adapted (1)", ylabel="probe loss (log)")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    fig.savefig(path, dpi=110)
    return Path(path)


def simplex_slice(bench: Benchmark, settings: Settings, base, candidate_name: str, path: Path,
                  *, grid=(-0.5, 1.5, 25), tau: Optional[float] = None) -> Path:
    """The loss on the plane of a 2-simplex grown around the adapted candidate (seed 0), with the
    simplex and the threshold's contour drawn on it (``tau`` as in :func:`paths`)."""
    task = bench.task
    probe = (task.x_train[:settings.probe_examples], task.y_train[:settings.probe_examples])
    cand = next(c for c in bench.candidates if c.name == candidate_name)
    _, adapted, _, _ = grow_and_adapt(base, cand, task, settings, seed=0)
    if tau is None:
        tau = settings.threshold * probes.linear_path(base, base, probe, steps=2, quiet=True, loss=settings.loss).loss[0]
    opts = dict(settings.estimator_options.get("simplex", {}))
    opts["k"] = 2
    est, vertices = M.simplex(adapted, probe, tau=tau, seed=0, quiet=True, return_vertices=True,
                              loss=settings.loss, **opts)
    fig, axes = _figure(1, 1, 5.5, 4.5)
    ax = axes[0, 0]
    if len(vertices) < 3:
        ax.text(0.5, 0.5, f"no 2-simplex was accepted for {candidate_name}", ha="center", transform=ax.transAxes)
    else:
        v0, v1, v2 = vertices
        d1 = {n: v1[n] - v0[n] for n in v0 if v0[n].is_floating_point()}
        d2 = {n: v2[n] - v0[n] for n in v0 if v0[n].is_floating_point()}
        res = probes.plane(v0, probe, d1=d1, d2=d2, grid=grid, model=adapted, quiet=True, loss=settings.loss)
        z = torch.tensor(res.loss).T.clamp_max(10 * tau).log10().numpy()
        cs = ax.contourf(res.alpha, res.beta, z, levels=20)
        fig.colorbar(cs, ax=ax, label="log10 probe loss")
        ax.contour(res.alpha, res.beta, torch.tensor(res.loss).T.numpy(), levels=[tau], colors="w")
        ax.plot([0, 1, 0, 0], [0, 0, 1, 0], "r-", lw=1.5)
        ax.plot([0], [0], "r*", ms=10)
    ax.set(xlabel="along vertex 1 - anchor", ylabel="along vertex 2 - anchor",
           title=f"{candidate_name}: simplex (red), threshold (white)")
    fig.savefig(path, dpi=110)
    return Path(path)


def all_figures(bench: Benchmark, settings: Settings, result: CompareResult, base, out: Path) -> List[Path]:
    """The figures of a run, into ``out``: the metrics against the gains, the loss along each
    candidate's adaptation path, and (when the run measures ``simplex``) a simplex's loss plane."""
    out = Path(out)
    top = result.ranking[0]["candidate"]
    tau = result.bases[0]["threshold"]
    figures = [metrics_vs_gain(result, out / "metrics_vs_gain.png"),
               paths(bench, settings, base, out / "paths.png", tau=tau)]
    if "simplex" in settings.estimators:
        figures.append(simplex_slice(bench, settings, base, top, out / "simplex_slice.png", tau=tau))
    return figures
