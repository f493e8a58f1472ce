"""The figures explain themselves: titles, axis labels, legends for every colour, marker and line,
readable metric names, one panel per group of candidates, the seed stated. Checked on the
matplotlib Figure objects, not on pixels."""

import math

import pytest
import torch

pytest.importorskip("matplotlib")

from manifold_ext import builtin, compare as C, compare_plots, probes  # noqa: E402
from manifold_ext import manifold as M  # noqa: E402
from manifold_ext._results import figure  # noqa: E402
from manifold_ext.baselines import BASELINES  # noqa: E402
from manifold_ext.builtin import Candidate  # noqa: E402
from manifold_ext.data import load_digits  # noqa: E402
from manifold_ext.expand import Deepen, Widen  # noqa: E402

from _models import mlp  # noqa: E402

DIGITS = load_digits()
DATA = (DIGITS.x_test[:61], DIGITS.y_test[:61])
TINY = dict(seeds=2, base_epochs=2, adapt_epochs=1, finetune_epochs=2, probe_examples=64, n_boot=50,
            estimators=("radius", "minima", "simplex"),
            estimator_options={"radius": {"directions": 3, "grid": [1e-3, 10.0, 6], "bisect": 3},
                               "simplex": {"k": 1, "steps": 4, "samples": 16, "line_search": 2},
                               "minima": {"m": 2, "samples": 16}})


def _texts(legend):
    return [t.get_text() for t in legend.get_texts()]


def _legend_texts(fig):
    """Every legend entry of the figure and its axes."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t for leg in legends for t in _texts(leg)]


def _suptitle(fig):
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


def test_figure_helper_takes_a_title():
    fig, axes = figure(2, "a title")
    assert _suptitle(fig) == "a title" and len(axes) == 2
    fig, _ = figure(1)
    assert fig._suptitle is None


# ----------------------------------------------------------------------------- probes


def test_path_plot_labels_end_points_and_extrapolation():
    a, b = mlp(0), mlp(1)
    fig = probes.linear_path(a, b, DATA, steps=(-0.5, 1.5, 9), quiet=True).plot()
    assert "along (1 - t)·a + t·b" in _suptitle(fig)
    ax1, ax2 = fig.axes
    assert ax1.get_ylabel() == "loss" and ax2.get_ylabel() == "accuracy (%)"
    assert ax1.get_xlabel().startswith("t (0: a, 1: b)")
    assert max(ax2.lines[0].get_ydata()) > 1  # percent, not a fraction
    texts = _legend_texts(fig)
    assert "end points a (t=0), b (t=1)" in texts
    assert any("extrapolated" in t for t in texts)  # the shading of [0, 1] is explained
    inside = probes.linear_path(a, b, DATA, steps=5, quiet=True).plot()
    assert not any("extrapolated" in t for t in _legend_texts(inside))  # no shading to explain


def test_barrier_plot_explains_the_dashed_line_and_the_barrier():
    res = probes.barrier(mlp(0), mlp(1), DATA, steps=5, refine=1, quiet=True)
    fig = res.plot()
    assert "Loss barrier" in _suptitle(fig) and f"{res.barrier_loss:.4g}" in _suptitle(fig)
    texts = _legend_texts(fig)
    assert "straight line between the end points" in texts
    assert any(t.startswith("loss barrier") for t in texts) and any(t.startswith("error barrier") for t in texts)
    assert all(ax.get_title() for ax in fig.axes)
    assert not any("extrapolated" in t for t in texts)


def test_plane_simplex_and_rays_plots_have_titles_labels_legends():
    plane = probes.plane(mlp(0), DATA, grid=(-0.5, 0.5, 4), seed=3, quiet=True).plot()
    assert "plane" in _suptitle(plane)
    assert plane.axes[0].get_xlabel().startswith("α") and plane.axes[0].get_ylabel().startswith("β")
    assert plane.axes[1].get_ylabel() == "loss"  # the colour bar
    assert "centre (α = β = 0)" in _legend_texts(plane)

    simplex = probes.simplex_losses([mlp(0), mlp(1), mlp(2)], DATA, n=6, seed=4, quiet=True).plot()
    assert _suptitle(simplex) == "Loss at 6 points drawn uniformly from the simplex of 3 vertices"
    assert simplex.axes[0].get_xlabel() == "loss" and simplex.axes[0].get_ylabel() == "points (of 6)"
    assert any(t.startswith("median") for t in _legend_texts(simplex))

    rays = probes.random_directions(mlp(0), DATA, n=3, radii=(0.0, 0.8, 3), seed=5, quiet=True).plot()
    assert _suptitle(rays) == "Loss along 3 random directions from the centre"
    assert rays.axes[0].get_xlabel().startswith("radius r") and rays.axes[0].get_ylabel() == "loss"
    assert _legend_texts(rays) == ["one direction", "mean over directions"]


@pytest.fixture(scope="module")
def digits_mlp():
    model = mlp(0, widths=(64, 16, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(DIGITS.x_train), DIGITS.y_train).backward()
        opt.step()
    return model, (DIGITS.x_train[:300], DIGITS.y_train[:300])


def test_estimate_plots_state_size_units_and_threshold(digits_mlp):
    model, data = digits_mlp
    radius = M.radius(model, data, directions=4, quiet=True)
    fig = radius.plot()
    assert "radius" in _suptitle(fig) and "filter units" in _suptitle(fig)
    assert fig.axes[0].get_xlabel().startswith("log radius") and fig.axes[0].get_ylabel() == "directions"
    assert any(t.startswith("size: mean log radius") for t in _legend_texts(fig))

    grown = M.simplex(model, data, k=2, steps=3, quiet=True)
    fig = grown.plot()
    assert "grown simplex" in _suptitle(fig) and "k=" in _suptitle(fig)
    texts = _legend_texts(fig)
    assert any(t.startswith("threshold τ") for t in texts) and any(t.startswith("anchor's loss") for t in texts)
    assert any(t.startswith("connector 1") for t in texts)

    runs = M.minima(model, data, m=3, samples=8, quiet=True)
    fig = runs.plot()
    assert "short training runs" in _suptitle(fig)
    assert len(fig.axes[0].patches) == 3  # one bar per run's end point
    assert any(t.startswith("in the chosen simplex") for t in _legend_texts(fig))
    assert any(t.startswith("threshold τ") for t in _legend_texts(fig))


def test_estimate_plot_of_an_empty_region_says_so(digits_mlp):
    model, data = digits_mlp
    empty = M.radius(model, data, directions=2, tau=1e-9, quiet=True)
    assert empty.size == -math.inf
    fig = empty.plot()
    assert "empty (-inf)" in _suptitle(fig)
    assert any("above the threshold" in t.get_text() for t in fig.axes[0].texts)


# ----------------------------------------------------------------------------- compare


def test_every_metric_has_a_readable_name():
    names = [f"size_{e}" for e in M.ESTIMATORS] + list(BASELINES)
    assert set(names) <= set(compare_plots.METRIC_LABELS)
    assert compare_plots.metric_label("jacob_cov") == "Jacobian covariance (NASWOT)"
    assert compare_plots.metric_label("not_a_metric") == "not_a_metric"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    bench = builtin.benchmark("mlp")
    bench.candidates = [Candidate("control"), Candidate("width x2 zero", (Widen("*", factor=2, init="zero"),)),
                        Candidate("width x2 random", (Widen("*", factor=2, init="random"),)),
                        Candidate("depth +1 random", (Deepen(after="3", init="random"),))]
    settings = C.Settings(**TINY)
    out = tmp_path_factory.mktemp("figures") / "run"
    result = C.compare(bench, settings, out, quiet=True)
    return bench, settings, result, C.load_base(bench, out, 0)


def test_metrics_vs_gain_names_panels_and_explains_colours_and_markers(tiny_run):
    _, settings, result, _ = tiny_run
    fig = compare_plots.metrics_vs_gain_figure(result)
    names = C.metric_names(settings)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == len(names)
    for ax, name in zip(shown, names):
        assert ax.get_title().startswith(compare_plots.metric_label(name) + "\nSpearman rho")
        assert ax.get_title().split("\n")[0] != name  # not the code name
    assert "Jacobian covariance (NASWOT)" in [ax.get_title().split("\n")[0] for ax in shown]
    assert "[accuracy_pct]" in shown[names.index("accuracy")].get_xlabel()
    assert shown[0].get_ylabel() == "gain over base (test-accuracy points)"
    (legend,) = fig.legends
    texts = _texts(legend)
    assert {"seed 0", "seed 1"} <= set(texts)
    assert any(t.startswith("width") for t in texts) and any(t.startswith("depth") for t in texts)
    assert any(t.startswith("control") for t in texts)
    assert legend.get_title().get_text() == "colour: kind of expansion; marker: seed"
    assert "4 candidates x 2 seeds" in _suptitle(fig)


def test_paths_one_panel_per_group_distinct_styles_and_the_seed(tiny_run):
    bench, settings, result, base = tiny_run
    fig = compare_plots.paths_figure(bench, settings, base, steps=3, tau=result.bases[0]["threshold"])
    assert "seed 0" in _suptitle(fig)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in shown]
    assert titles == ["width expansions, new weights: zero", "width expansions, new weights: random",
                      "depth expansions, new weights: random"]
    for ax in shown:
        texts = _texts(ax.get_legend())
        assert "control (reference)" in texts and any(t.startswith("loss threshold tau") for t in texts)
        styles = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
        assert len(set(styles)) == len(styles)  # every curve of a panel can be told apart
        assert ax.get_yscale() == "log"
    assert all(ax.get_xlabel() for ax in shown) and shown[0].get_ylabel().startswith("probe-set loss")


def test_simplex_slice_has_a_legend_and_title(tiny_run):
    bench, settings, result, base = tiny_run
    fig = compare_plots.simplex_slice_figure(bench, settings, base, "width x2 zero", grid=(-0.5, 1.5, 5),
                                             tau=result.bases[0]["threshold"])
    assert "'width x2 zero'" in _suptitle(fig) and "seed 0" in _suptitle(fig)
    texts = _legend_texts(fig)
    if texts:  # a 2-simplex was accepted
        assert texts[0] == "the grown 2-simplex" and any(t.startswith("loss threshold tau") for t in texts)
    else:
        assert any("no 2-simplex" in t.get_text() for t in fig.axes[0].texts)
