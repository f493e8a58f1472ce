"""Manifold-size estimators against a loss whose low-loss set is known in closed form.

Linear regression ``f(x) = w . x`` with the mean squared error ``L(w) = |X w - y|^2 / n``:
* over-parameterised (n < d): S is a flat affine subspace times an ellipsoid, and the largest
  step along a direction d from an anchor inside S solves a quadratic exactly;
* with ``X^T X / n = a I`` (n >= d): S is a ball of radius ``rho = sqrt((tau - L_min) / a)``
  about the least-squares solution, and a k-simplex in it with one vertex at the centre has
  ``Vol_k <= rho^k / k!`` (Hadamard), with equality for orthogonal edges of length rho. S is
  convex, so a simplex lies in S exactly when its vertices do.
"""

import math

import pytest
import torch
from torch import nn

from manifold_ext import manifold as M
from manifold_ext import params as P

from _models import mlp

DT = torch.float64


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(len(w), 1, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(w[None])
    return lin


class ScaledLinear(nn.Module):
    """The same function as a linear model, with its parameter stored multiplied by ``s``."""

    def __init__(self, w: torch.Tensor, s: float):
        super().__init__()
        self.s = s
        self.p = nn.Parameter(w[None].clone() * s)

    def forward(self, x):
        return x @ (self.p / self.s).T


def _overparameterised(n=8, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    w_min = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]  # loss 0
    anchor = w_min + 0.05 * X.T @ torch.randn(n, generator=g, dtype=DT)  # inside, loss > 0
    return X, y, anchor


def _ball(n=12, d=6, a=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=DT))
    X = math.sqrt(n * a) * Q
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    centre = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    return X, y, centre


def _loss(X, y, w):
    return ((X @ w - y) ** 2).mean().item()


def _exact_radius(X, y, anchor, d, tau):
    """Largest t with L(anchor + s d) <= tau for all s in [0, t] (a convex quadratic in t)."""
    n = len(y)
    r, q = X @ anchor - y, X @ d
    a, b, c = (q @ q).item() / n, 2 * (r @ q).item() / n, (r @ r).item() / n - tau
    if a == 0:
        return math.inf
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


# ----------------------------------------------------------------------------- radius


@pytest.mark.parametrize("units", ["raw", "filter"])
def test_radius_recovers_exact_radii(units):
    X, y, anchor = _overparameterised()
    model = _linear(anchor)
    g = torch.Generator().manual_seed(1)
    dirs = [{"weight": torch.randn(1, 20, generator=g, dtype=DT)} for _ in range(6)]
    est = M.radius(model, (X, y), directions=dirs, epsilon=0.5, units=units, loss="mse", quiet=True)
    tau = _loss(X, y, anchor) * 1.5
    assert est.threshold == pytest.approx(tau, rel=1e-12)
    scale = 1.0 if units == "raw" else anchor.norm().item()  # one filter: its norm is the unit
    exact = []
    for d in dirs:
        unit = d["weight"][0] / (d["weight"].norm().item() / scale)
        exact.append(_exact_radius(X, y, anchor, unit, tau))
    # 12 bisection rounds shrink a grid bracket (ratio 10^(4/15)) to a ratio of 1 + 1.6e-4.
    torch.testing.assert_close(torch.tensor(est.details["radii"]), torch.tensor(exact), rtol=3e-4, atol=0)
    assert all(r <= e for r, e in zip(est.details["radii"], exact))  # the lower end: inside S
    assert est.size == pytest.approx(sum(math.log(e) for e in exact) / 6, abs=3e-4)
    assert est.spread == pytest.approx(torch.tensor(exact).log().std().item(), abs=3e-4)
    assert est.dimension == 1 and est.details["censored"] == 0


def test_radius_flat_direction_is_censored():
    X, y, anchor = _overparameterised()
    null = torch.linalg.svd(X, full_matrices=True).Vh[-1]  # X @ null == 0: the flat subspace
    dirs = [{"weight": null[None].clone()}, {"weight": X[0][None].clone()}]
    est = M.radius(_linear(anchor), (X, y), directions=dirs, epsilon=0.5, units="raw", loss="mse",
                   grid=(1e-3, 1.0, 8), extend=1, quiet=True)
    assert est.details["censored"] == 1
    reach = 10 * 1.0 * anchor.norm().item()  # hi times the anchor's length, extended once by 10
    assert est.details["radii"][0] >= reach * 0.99
    assert est.details["radii"][1] < reach / 10


@pytest.mark.parametrize("kind", ["filter", "gaussian"])
def test_radius_scaling_the_parameterisation_shifts_raw_size_by_log_s(kind):
    X, y, anchor = _overparameterised()
    s = 3.0
    base = dict(directions=8, epsilon=0.5, kind=kind, ignore="none", loss="mse", quiet=True, seed=3)
    plain = M.radius(ScaledLinear(anchor, 1.0), (X, y), units="raw", **base)
    scaled = M.radius(ScaledLinear(anchor, s), (X, y), units="raw", **base)
    assert scaled.size - plain.size == pytest.approx(math.log(s), abs=1e-6)
    f_plain = M.radius(ScaledLinear(anchor, 1.0), (X, y), units="filter", **base)
    f_scaled = M.radius(ScaledLinear(anchor, s), (X, y), units="filter", **base)
    assert f_scaled.size == pytest.approx(f_plain.size, abs=1e-6)


# ----------------------------------------------------------------------------- simplex


@pytest.mark.parametrize("k", [1, 2, 3])
def test_simplex_reaches_the_largest_simplex_in_a_ball(k):
    X, y, centre = _ball()
    eps = 1.0  # absolute: S is the ball of radius 1 about the centre (a = 1)
    est = M.simplex(_linear(centre), (X, y), k=k, epsilon=eps, relative=False, units="raw",
                    loss="mse", steps=150, quiet=True)
    bound = -math.lgamma(k + 1) / k  # log rho - log(k!)/k with rho = 1
    assert est.dimension == k
    assert all(v <= est.threshold for v in est.details["vertex_losses"])
    assert est.size <= bound + 1e-9  # every vertex is in S, and S is convex
    assert est.size >= bound - 0.05  # stated tolerance: Vol^(1/k) within 5% of the maximum


def test_simplex_benton_objective_also_reaches_the_bound():
    X, y, centre = _ball()
    est = M.simplex(_linear(centre), (X, y), k=2, epsilon=1.0, relative=False, units="raw", loss="mse",
                    objective="benton", lam=1.0, quiet=True)
    assert -math.log(2) / 2 - 0.05 <= est.size <= -math.log(2) / 2 + 1e-9


def test_simplex_scaling_the_parameterisation_shifts_raw_size_by_log_s():
    X, y, centre = _ball()
    s = 3.0
    kw = dict(k=2, epsilon=1.0, relative=False, loss="mse", steps=60, quiet=True)
    plain = M.simplex(ScaledLinear(centre, 1.0), (X, y), units="raw", **kw)
    scaled = M.simplex(ScaledLinear(centre, s), (X, y), units="raw", **kw)
    assert scaled.size - plain.size == pytest.approx(math.log(s), abs=1e-6)
    f_plain = M.simplex(ScaledLinear(centre, 1.0), (X, y), units="filter", **kw)
    f_scaled = M.simplex(ScaledLinear(centre, s), (X, y), units="filter", **kw)
    assert f_scaled.size == pytest.approx(f_plain.size, abs=1e-6)


# ----------------------------------------------------------------------------- minima


def test_largest_simplex_picks_the_points_inside():
    X, y, centre = _ball()
    model = _linear(centre)
    tau = _loss(X, y, centre) + 1.0  # the unit ball
    g = torch.Generator().manual_seed(0)
    units = [v / v.norm() for v in torch.randn(5, 6, generator=g, dtype=DT)]
    radii = [0.9, 0.5, 1.3, 0.8, 2.0]  # points 2 and 4 lie outside
    points = [{"weight": (centre + r * u)[None]} for r, u in zip(radii, units)]
    choice = M.largest_simplex(model, points, (X, y), tau=tau, units="raw", loss="mse")
    assert choice.indices == [0, 1, 3]
    expected = P.simplex_log_volume([points[i] for i in (0, 1, 3)])
    assert choice.log_volume == pytest.approx(expected, abs=1e-9)
    accepted_sets = {tuple(s) for s, _ in choice.accepted}
    assert accepted_sets == {(0, 1, 3), (0, 1), (0, 3), (1, 3)}
    torch.testing.assert_close(torch.tensor(choice.vertex_losses),
                               torch.tensor([_loss(X, y, p["weight"][0]) for p in points]))


def test_largest_simplex_none_inside():
    X, y, centre = _ball()
    far = [{"weight": (centre + 3.0 * e)[None]} for e in torch.eye(6, dtype=DT)[:3]]
    choice = M.largest_simplex(_linear(centre), far, (X, y), tau=_loss(X, y, centre) + 1.0,
                               units="raw", loss="mse")
    assert choice.indices == [] and choice.log_volume == -math.inf and choice.accepted == []


def test_minima_size_is_the_volume_of_its_end_points():
    X, y, centre = _ball()
    start = centre + 0.3 * torch.ones(6, dtype=DT) / math.sqrt(6)
    model = _linear(start)
    kw = dict(m=3, epochs=2, lr=0.05, batch_size=4, seed=5, optimizer="sgd")
    est = M.minima(model, (X, y), tau=_loss(X, y, centre) + 1.0, units="raw", loss="mse", quiet=True, **kw)
    ends = [M._train_copy(model, (X, y), epochs=2, lr=0.05, batch_size=4, seed=5 + i, loss="mse",
                          optimizer="sgd") for i in range(3)]
    # SGD on a linear model moves only within the row space of X, here all of it (n >= d).
    assert est.details["subset"] == [0, 1, 2] and est.dimension == 2
    assert est.size == pytest.approx(P.simplex_log_volume(ends) / 2, abs=1e-9)
    assert all(v <= est.threshold for v in est.details["vertex_losses"])


def test_minima_runs_default_batch_is_an_eighth_of_the_training_set():
    X, y, centre = _ball(n=40)
    model = _linear(centre + 0.1)
    # ceil(n / 8): 8 steps per epoch when 8 divides n, whatever n; 7 for n = 13 (batches of 2).
    for n, batch, steps_per_epoch in ((40, 5, 8), (16, 2, 8), (13, 2, 7)):
        est = M.minima(model, (X[:n], y[:n]), m=2, epochs=3, samples=8, loss="mse", quiet=True)
        assert est.details["batch_size"] == batch == math.ceil(n / M.MINIMA_BATCHES)
        assert est.details["train_steps"] == 2 * 3 * steps_per_epoch
    # Runs in different data orders end apart; one batch of every example would give them one path.
    assert min(d for row in est.details["distances"] for d in row if d > 0) > 1e-6
    with pytest.raises(ValueError, match="batch_size must be less than the 13 training examples"):
        M.minima(model, (X[:13], y[:13]), m=2, batch_size=13, loss="mse", quiet=True)


# ----------------------------------------------------------------------------- shared behaviour


def test_threshold():
    assert M.threshold(2.0, epsilon=0.1) == pytest.approx(2.2)
    assert M.threshold(2.0, epsilon=0.1, relative=False) == pytest.approx(2.1)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got 0"):
        M.threshold(2.0, epsilon=0)


@pytest.mark.parametrize("name", ["radius", "simplex", "minima"])
def test_anchor_above_a_common_threshold_has_an_empty_manifold(name):
    X, y, centre = _ball()
    est = M.ESTIMATORS[name](_linear(centre + 5.0), (X, y), tau=_loss(X, y, centre) + 1.0, loss="mse",
                             quiet=True, **({"steps": 5} if name == "simplex" else {}))
    assert est.size == -math.inf and est.dimension == 0
    assert est.anchor_loss > est.threshold
    if name == "minima":  # its runs could have descended into S; from this far they do not
        assert all(v > est.threshold for v in est.details["vertex_losses"])


def _digits_mlp():
    from manifold_ext.data import load_digits
    d = load_digits()
    model = mlp(0, widths=(64, 16, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(d.x_train), d.y_train).backward()
        opt.step()
    return model, (d.x_train[:300], d.y_train[:300])


def test_estimators_on_a_classifier_stay_in_s_and_are_deterministic():
    model, data = _digits_mlp()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    s1 = M.simplex(model, data, k=2, steps=30, quiet=True)
    s2 = M.simplex(model, data, k=2, steps=30, quiet=True)
    assert s1.size == s2.size and math.isfinite(s1.size) and s1.dimension == 2
    assert all(v <= s1.threshold for v in s1.details["vertex_losses"])
    searches = [r for r in s1.trace if r["kind"] == "line_search"]
    assert s1.n_evaluations == 1 + 2 * 30 * 8 + sum(r["connector"] + 1 + 128 for r in searches) + 3
    twice = M.simplex(model, data, k=2, steps=30, repeats=2, quiet=True)
    searches = [r for r in twice.trace if r["kind"] == "line_search"]
    assert twice.n_evaluations == 1 + 2 * 2 * 30 * 8 + sum(r["connector"] + 1 + 128 for r in searches) + 3
    assert twice.details["log_volumes"][0] == pytest.approx(s1.size * 2)
    assert twice.spread == pytest.approx(abs(twice.details["log_volumes"][0] - twice.details["log_volumes"][1])
                                         / 2 / math.sqrt(2))
    r = M.radius(model, data, directions=4, quiet=True)
    dirs = M._directions(M._Space(model, "filter"), 4, "filter", "biasbn", 0)
    space = M._Space(model, "filter")
    for d, t in zip(dirs, r.details["radii"]):
        length = space.norm(d)
        end = space.moved({n: v / length for n, v in d.items()}, t)
        ev = M.evaluate(model, [end], torch.ones(1, 1), data).loss.item()
        assert ev <= r.threshold
    assert r.size == M.radius(model, data, directions=4, quiet=True).size
    assert r.size != M.radius(model, data, directions=4, quiet=True, seed=1).size
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_estimate_json_round_trip():
    model, data = _digits_mlp()
    est = M.radius(model, data, directions=3, quiet=True)
    back = M.ManifoldEstimate.from_json(est.to_json())
    assert back == est
    fig = est.plot()
    assert fig.axes[0].get_xlabel().startswith("log radius")
    grown = M.simplex(model, data, k=1, steps=5, quiet=True)
    assert M.ManifoldEstimate.from_json(grown.to_json()) == grown
    ax = grown.plot().axes[0]
    assert ax.get_ylabel() == "loss" and len(ax.lines[0].get_ydata()) == 5  # one point per step


@pytest.mark.parametrize("fn,kwargs,msg", [
    ("radius", {"units": "metres"}, "units must be 'raw' or 'filter', got 'metres'"),
    ("radius", {"epsilon": -1.0}, "epsilon must be a finite number > 0, got -1.0"),
    ("radius", {"directions": 0}, "directions must be an integer >= 1, got 0"),
    ("radius", {"directions": []}, "directions must not be empty"),
    ("radius", {"kind": "uniform"}, "kind must be 'filter' or 'gaussian', got 'uniform'"),
    ("radius", {"grid": (1.0, 0.5, 4)}, r"grid must be \(lo, hi, n\) with 0 < lo < hi, got \(1.0, 0.5, 4\)"),
    ("simplex", {"k": 0}, "k must be an integer >= 1, got 0"),
    ("simplex", {"quantile": 1.5}, r"quantile must be in \(0, 1\], got 1.5"),
    ("simplex", {"objective": "max"}, "objective must be 'threshold' or 'benton', got 'max'"),
    ("simplex", {"lam": 0.0}, "lam must be a finite number > 0, got 0.0"),
    ("minima", {"m": 1}, r"m must be at least 2 \(a simplex needs two end points\), got 1"),
    ("minima", {"lr": 0}, "lr must be a finite number > 0, got 0"),
    ("minima", {"optimizer": "lbfgs"}, "optimizer must be 'adam' or 'sgd', got 'lbfgs'"),
    ("minima", {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ("minima", {"batch_size": 12}, "batch_size must be less than the 12 training examples of minima's runs, got 12: "
                                   "with one batch per epoch every run takes the same steps"),
])
def test_errors_name_the_argument(fn, kwargs, msg):
    X, y, centre = _ball()
    with pytest.raises(ValueError, match=msg):
        M.ESTIMATORS[fn](_linear(centre), (X, y), loss="mse", quiet=True, **kwargs)


def test_zero_direction_and_non_module_errors():
    X, y, centre = _ball()
    with pytest.raises(ValueError, match="direction 0 has zero length"):
        M.radius(_linear(centre), (X, y), directions=[{"weight": torch.zeros(1, 6, dtype=DT)}], loss="mse")
    with pytest.raises(TypeError, match="model must be an nn.Module \\(the anchor\\), got dict"):
        M.radius({"weight": centre[None]}, (X, y), loss="mse")
