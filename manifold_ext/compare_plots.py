"""The figures of a compare run (matplotlib, the ``plot`` extra): every metric against the gains,
the loss along the path from each expanded model to its adapted one, and a 2-D slice through a
grown simplex. Each ``*_figure`` function returns a matplotlib Figure; the function of the same
name without the suffix writes it as one PNG and returns its path."""

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
_KIND_LABELS = {"width": "width (units, heads, channels)", "depth": "depth (layers, blocks)", "other": "other",
                "control": "control (the base, not grown)"}
_SEED_MARKERS = "os^DvP*Xph"

# Every metric's readable name and what its axis shows ({units}: the estimate's distance units),
# for the figures; results.json and results.csv keep the code names (the keys).
METRIC_LABELS = {
    "size_radius": ("manifold size: radius", "mean ln radius ({units} units)"),
    "size_simplex": ("manifold size: grown simplex", "(1/k) ln volume ({units} units)"),
    "size_minima": ("manifold size: simplex of minima", "(1/k) ln volume ({units} units)"),
    "parameters": ("parameter count", "trainable parameters"),
    "loss": ("loss after adaptation", "probe-set loss"),
    "accuracy": ("accuracy after adaptation", "probe-set accuracy (%)"),
    "grad_norm": ("gradient norm", "||grad L||"),
    "snip": ("SNIP", "sum |theta · grad L|"),
    "synflow": ("SynFlow (data-free)", "score"),
    "fisher": ("Fisher information (trace)", "(1/N) sum ||grad l_i||²"),
    "jacob_cov": ("Jacobian covariance (NASWOT)", "score"),
    "hessian_trace": ("Hessian trace", "tr H (Hutchinson estimate)"),
    "hessian_top_eig": ("largest Hessian eigenvalue", "lambda_max(H)"),
    "sam_sharpness": ("SAM sharpness", "loss rise at a worst-case step"),
    "perturbation_flatness": ("loss rise under random perturbation", "mean loss rise"),
}


def metric_label(name: str) -> str:
    """The readable name of metric ``name`` (``jacob_cov``: "Jacobian covariance (NASWOT)")."""
    return METRIC_LABELS.get(name, (name,))[0]


def _gain_label(settings: dict) -> str:
    what = "next-token-accuracy" if settings.get("loss") == "lm" else "test-accuracy"
    return f"gain over base ({what} points)"


def metrics_vs_gain(result: CompareResult, path: Path) -> Path:
    """:func:`metrics_vs_gain_figure`, written to ``path``."""
    metrics_vs_gain_figure(result).savefig(path, dpi=110)
    return Path(path)


def metrics_vs_gain_figure(result: CompareResult):
    """One panel per metric, titled with its readable name (:data:`METRIC_LABELS`): its value
    against the gain over the base, every (seed, candidate) unit a point, coloured by the kind of
    expansion (width blue, depth red, the control black, others green), its marker the seed (an
    empty manifold, -inf, drawn hollow at the panel's left edge; a metric undefined for the
    inputs, NaN, is said so in its panel), the within-seed Spearman rho in the title."""
    settings = Settings.from_dict(result.settings)
    names = metric_names(settings)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = _figure(rows, cols, 3.2 * cols, 2.8 * rows + 0.4)
    rho = {c["metric"]: c["spearman"] for c in result.correlations}
    seeds = sorted({u["seed"] for u in result.units})
    marker = {s: _SEED_MARKERS[i % len(_SEED_MARKERS)] for i, s in enumerate(seeds)}
    empty = False
    for ax, name in zip(axes.flat, names):
        scale = 100.0 if name == "accuracy" else 1.0  # a fraction, drawn in % as in results.csv
        xs = [scale * (u["sizes"][name[5:]] if name.startswith("size_") else u["baselines"][name])
              for u in result.units]
        finite = [x for x in xs if math.isfinite(x)]
        left = min(finite) if finite else 0.0
        for u, x in zip(result.units, xs):
            c = _COLORS[_kind(u["candidate"])]
            if math.isfinite(x):
                ax.plot(x, u["gain_over_base"], marker[u["seed"]], ms=3.5, color=c, alpha=0.7)
            elif not math.isnan(x):
                ax.plot(left, u["gain_over_base"], marker[u["seed"]], ms=5, color=c, mfc="none")
                empty = True
        if all(math.isnan(x) for x in xs):
            ax.text(0.5, 0.5, "not defined for these inputs (NaN)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        title, axis = METRIC_LABELS.get(name, (name, "value"))
        if name.startswith("size_"):
            units = next((u["estimates"][name[5:]]["units"] for u in result.units
                          if name[5:] in u.get("estimates", {})), "filter")
            axis = axis.format(units=units)
        ax.set_title(f"{title}\nSpearman rho {rho.get(name, math.nan):.2f}", fontsize=9)
        column = "accuracy_pct" if name == "accuracy" else name  # its column in results.csv
        ax.set_xlabel(f"{axis}   [{column}]", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(_gain_label(result.settings), fontsize=8)
    from matplotlib.lines import Line2D

    present = {_kind(u["candidate"]) for u in result.units}
    handles = [Line2D([], [], ls="", marker="o", color=_COLORS[k], label=_KIND_LABELS[k])
               for k in ("width", "depth", "other", "control") if k in present]
    handles += [Line2D([], [], ls="", marker=marker[s], color="0.3", label=f"seed {s}") for s in seeds]
    if empty:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="0.3",
                              label="hollow: empty manifold (-inf), at the left edge"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8,
               ncols=len(handles) if len(handles) <= 7 else math.ceil(len(handles) / 2),
               title="colour: kind of expansion; marker: seed", title_fontsize=8)
    n_cands = len({u["candidate"] for u in result.units})
    fig.suptitle(f"Each metric against the gain of each candidate and seed ({len(result.units)} points: {n_cands} "
                 f"candidates x {len(seeds)} seeds; rho: Spearman within seeds, averaged)", fontsize=10)
    return fig


def paths(bench: Benchmark, settings: Settings, base, path: Path, *, steps: int = 17,
          tau: Optional[float] = None) -> Path:
    """:func:`paths_figure`, written to ``path``."""
    paths_figure(bench, settings, base, steps=steps, tau=tau).savefig(path, dpi=110)
    return Path(path)


_LINE_STYLES = ("-", "--", "-.", ":")
_LINE_MARKERS = "os^vDP"


def _init(cand) -> str:
    """How a candidate's new weights start: its specs' common ``init``, else ``mixed``."""
    inits = {getattr(spec, "init", "?") for spec in cand.specs}
    return inits.pop() if len(inits) == 1 else "mixed"


def paths_figure(bench: Benchmark, settings: Settings, base, *, steps: int = 17, tau: Optional[float] = None):
    """Probe-set loss on the segment from each candidate as expanded (t=0) to the same model
    after its adaptation (t=1), for the seed-0 base, against the common threshold ``tau`` (the
    run's, ``result.bases[0]["threshold"]``; None: ``settings.threshold_multiple`` x the base's
    probe loss, uncapped). One row of panels per kind of expansion (width, depth, other), one
    panel per initialisation of the new weights, each with the control as a black reference;
    within a panel every candidate has its own colour, line style and marker."""
    task = bench.task
    probe = (task.x_train[:settings.probe_examples], task.y_train[:settings.probe_examples])
    curves = {}
    for cand in bench.candidates:
        expanded, adapted, _, _ = grow_and_adapt(base, cand, task, settings, seed=0)
        curves[cand.name] = probes.linear_path(expanded, adapted, probe, steps=steps, quiet=True, loss=settings.loss)
    if tau is None:
        tau = settings.threshold_multiple * probes.linear_path(base, base, probe, steps=2, quiet=True,
                                                               loss=settings.loss).loss[0]
    groups = {}  # kind -> init -> candidate names, in the order of the candidates
    control = []
    for cand in bench.candidates:
        kind = _kind(cand.name)
        if kind == "control" or not cand.specs:
            control.append(cand.name)
        else:
            groups.setdefault(kind, {}).setdefault(_init(cand), []).append(cand.name)
    panels = [[(k, init, names) for init, names in groups[k].items()] for k in ("width", "depth", "other")
              if k in groups] or [[("control", None, [])]]
    cols = max(len(row) for row in panels)
    fig, axes = _figure(len(panels), cols, 4.6 * cols, 0.8 + 3.6 * len(panels))
    for ax in axes.flat:
        ax.set_visible(False)
    for r, row in enumerate(panels):
        for c, (kind, init, members) in enumerate(row):
            ax = axes[r, c]
            ax.set_visible(True)
            for i, name in enumerate(members):
                res = curves[name]
                ax.plot(res.t, res.loss, _LINE_STYLES[i % len(_LINE_STYLES)], lw=1.2, color=f"C{i % 10}",
                        marker=_LINE_MARKERS[i % len(_LINE_MARKERS)], ms=3.5, markevery=max(1, steps // 4),
                        label=name)
            for name in control:
                ax.plot(curves[name].t, curves[name].loss, "-", lw=2, color="k", label=f"{name} (reference)")
            ax.axhline(tau, color="0.4", ls=":", lw=1.2, label=f"loss threshold tau {tau:.3g}")
            ax.set_yscale("log")
            ax.set_title(f"{kind} expansions, new weights: {init}" if init else "control", fontsize=9)
            ax.set_xlabel("t: as grown (0) to adapted (1)", fontsize=8)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("probe-set loss (log scale)")
    fig.suptitle("Probe-set loss on the segment from each candidate as grown (t=0) to its weights after "
                 "adaptation (t=1), seed 0", fontsize=10)
    return fig


def simplex_slice(bench: Benchmark, settings: Settings, base, candidate_name: str, path: Path,
                  *, grid=(-0.5, 1.5, 25), tau: Optional[float] = None) -> Path:
    """:func:`simplex_slice_figure`, written to ``path``."""
    simplex_slice_figure(bench, settings, base, candidate_name, grid=grid, tau=tau).savefig(path, dpi=110)
    return Path(path)


def simplex_slice_figure(bench: Benchmark, settings: Settings, base, candidate_name: str,
                         *, grid=(-0.5, 1.5, 25), tau: Optional[float] = None):
    """The loss on the plane of a 2-simplex grown around the adapted candidate (seed 0), with the
    simplex and the threshold's contour drawn on it (``tau`` as in :func:`paths_figure`)."""
    task = bench.task
    probe = (task.x_train[:settings.probe_examples], task.y_train[:settings.probe_examples])
    cand = next(c for c in bench.candidates if c.name == candidate_name)
    _, adapted, _, _ = grow_and_adapt(base, cand, task, settings, seed=0)
    if tau is None:
        tau = settings.threshold_multiple * probes.linear_path(base, base, probe, steps=2, quiet=True, loss=settings.loss).loss[0]
    opts = dict(settings.estimator_options.get("simplex", {}))
    opts["k"] = 2
    est, vertices = M.simplex(adapted, probe, tau=tau, seed=0, quiet=True, return_vertices=True,
                              loss=settings.loss, **opts)
    fig, axes = _figure(1, 1, 6, 5.2)
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
        fig.colorbar(cs, ax=ax, label="log10 probe-set loss (capped at 10 tau)")
        ax.contour(res.alpha, res.beta, torch.tensor(res.loss).T.numpy(), levels=[tau], colors="w")
        ax.plot([0, 1, 0, 0], [0, 0, 1, 0], "r-", lw=1.5, label="the grown 2-simplex")
        ax.plot([0], [0], "r*", ms=10, label="anchor: the adapted candidate")
        ax.plot([], [], "w-", label=f"loss threshold tau {tau:.3g} (contour)")
        fig.legend(loc="outside lower center", ncols=2, fontsize=7, facecolor="0.55", labelcolor="w")
    ax.set(xlabel="along vertex 1 - anchor (1: vertex 1)", ylabel="along vertex 2 - anchor (1: vertex 2)")
    fig.suptitle(f"Loss on the plane of a 2-simplex grown around {candidate_name!r}\n(seed 0; size "
                 f"{est.size:.3g}, (1/k) ln volume, {est.units} units)", fontsize=10)
    return fig


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
