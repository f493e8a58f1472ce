"""Every probe, fused, equals the same probe on the loop engine (each point's state dict loaded
into the model and evaluated alone), for the three model families and both BatchNorm modes."""

import math

import pytest
import torch

from manifold_ext import probes
from manifold_ext import params as P
from manifold_ext.data import load_digits

from _models import TinyTransformer, cnn, mlp, randomise_bn

DIGITS = load_digits()
DATA = {
    "mlp": (DIGITS.x_test[:61], DIGITS.y_test[:61]),
    "cnn_bn": (DIGITS.x_test[:61].reshape(-1, 1, 8, 8), DIGITS.y_test[:61]),
}
_tok = torch.randint(0, 13, (29, 6), generator=torch.Generator().manual_seed(0))
DATA["transformer"] = (_tok, _tok.sum(1) % 5)
MAKE = {
    "mlp": lambda s: mlp(s),
    "cnn_bn": lambda s: randomise_bn(cnn(s), s),
    "transformer": lambda s: TinyTransformer(seed=s),
}


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6, equal_nan=True)


def _run(probe, case, bn, engine, **kw):
    a, b, c = (MAKE[case](s) for s in range(3))
    d = DATA[case]
    common = dict(bn=bn, engine=engine, quiet=True)
    if probe == "linear_path":
        return probes.linear_path(a, b, d, steps=(-0.5, 1.5, 9), **common)
    if probe == "barrier":
        return probes.barrier(a, b, d, steps=5, refine=1, **common)
    if probe == "plane":
        return probes.plane(a, d, grid=(-0.5, 0.5, 4), seed=3, **common)
    if probe == "simplex":
        return probes.simplex_losses([a, b, c], d, n=6, seed=4, **common)
    return probes.random_directions(a, d, n=3, radii=(0.0, 0.8, 3), seed=5, **common)


PROBES = ["linear_path", "barrier", "plane", "simplex", "random_directions"]


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("case", list(MAKE))
@pytest.mark.parametrize("bn", ["recompute", "interpolate"])
def test_probe_fused_equals_loop(probe, case, bn):
    if bn == "interpolate" and case != "cnn_bn":
        bn = "recompute"  # without BatchNorm the modes coincide; one run covers them
    fused = _run(probe, case, bn, "fused")
    loop = _run(probe, case, bn, "loop")
    for key in ("loss", "accuracy"):
        if hasattr(fused, key):
            _close(getattr(fused, key), getattr(loop, key))
    if probe == "barrier":
        _close([fused.barrier_loss, fused.t_max], [loop.barrier_loss, loop.t_max])


def test_path_endpoints_are_the_models():
    a, b = mlp(0), mlp(1)
    r = probes.linear_path(a, b, DATA["mlp"], steps=3, quiet=True)
    x, y = DATA["mlp"]
    with torch.no_grad():
        la = torch.nn.functional.cross_entropy(a(x), y).item()
        lb = torch.nn.functional.cross_entropy(b(x), y).item()
    assert r.t == [0.0, 0.5, 1.0]
    assert math.isclose(r.loss[0], la, rel_tol=1e-5) and math.isclose(r.loss[2], lb, rel_tol=1e-5)


def test_barrier_matches_dense_path():
    a, b = mlp(0), mlp(1)
    d = DATA["mlp"]
    res = probes.barrier(a, b, d, steps=9, refine=2, quiet=True)
    dense = probes.linear_path(a, b, d, steps=401, quiet=True)
    l0, l1 = dense.loss[0], dense.loss[-1]
    dense_max = max(l - ((1 - t) * l0 + t * l1) for t, l in zip(dense.t, dense.loss))
    # The refined search lands within a fine-grid step of the dense maximum.
    assert res.barrier_loss == pytest.approx(dense_max, rel=1e-3, abs=1e-5)
    assert 0.0 <= res.t_max <= 1.0
    again = probes.linear_path(a, b, d, steps=[res.t_max], quiet=True)
    assert again.loss[0] - ((1 - res.t_max) * l0 + res.t_max * l1) == pytest.approx(res.barrier_loss, rel=1e-6)


def test_simplex_points_lie_in_the_simplex_and_complex_follows_volume():
    a, b, c = (mlp(s) for s in range(3))
    r = probes.simplex_losses([a, b, c], DATA["mlp"], n=64, seed=1, quiet=True)
    W = torch.tensor(r.weights, dtype=torch.float64)
    assert (W >= 0).all() and torch.allclose(W.sum(1), torch.ones(64, dtype=torch.float64))
    far = {n: t * 10 if t.is_floating_point() else t for n, t in P.state_of(c).items()}
    r2 = probes.simplex_losses([a, b, far], DATA["mlp"], n=200, complex=[[0, 1], [0, 2]], seed=2,
                        model=a, quiet=True)
    assert r2.log_volumes[1] > r2.log_volumes[0]
    share = sum(1 for s in r2.simplex if s == 1) / 200
    expect = 1 / (1 + math.exp(r2.log_volumes[0] - r2.log_volumes[1]))
    assert abs(share - expect) < 0.1


def test_rays_start_at_the_centre():
    a = mlp(0)
    r = probes.random_directions(a, DATA["mlp"], n=4, radii=[0.0, 0.5], seed=0, quiet=True)
    assert len(r.loss) == 4 and all(len(row) == 2 for row in r.loss)
    assert len({round(row[0], 10) for row in r.loss}) == 1  # radius 0 is the centre for every ray
    assert len({round(row[1], 10) for row in r.loss}) == 4  # distinct directions


@pytest.mark.parametrize("probe", PROBES)
def test_json_round_trip_and_plot(probe, tmp_path):
    res = _run(probe, "mlp", "recompute", "fused")
    path = tmp_path / "r.json"
    res.to_json(path)
    back = type(res).from_json(path)
    assert back == res
    assert type(res).from_json(res.to_json()) == res
    fig = res.plot()
    assert len(fig.axes) >= 1
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_deterministic_given_seed():
    r1 = _run("random_directions", "mlp", "recompute", "fused")
    r2 = _run("random_directions", "mlp", "recompute", "fused")
    assert r1.loss == r2.loss
    a = mlp(0)
    r3 = probes.random_directions(a, DATA["mlp"], n=3, radii=(0.0, 0.8, 3), seed=6, quiet=True)
    assert r3.loss != r1.loss


def test_probe_errors():
    a, b = mlp(0), mlp(1)
    d = DATA["mlp"]
    with pytest.raises(ValueError, match="steps must have at least 2 points, got 1"):
        probes.linear_path(a, b, d, steps=1)
    with pytest.raises(ValueError, match="steps must be at least 3, got 2"):
        probes.barrier(a, b, d, steps=2)
    with pytest.raises(ValueError, match=r"complex entries must index the 2 vertices, got \[0, 5\]"):
        probes.simplex_losses([a, b], d, complex=[[0, 5]])
    with pytest.raises(ValueError, match="model is required when the vertices are state dicts"):
        probes.linear_path(a.state_dict(), b.state_dict(), d)
    with pytest.raises(ValueError, match="expected JSON of a PathResult, got a RaysResult"):
        probes.PathResult.from_json(_run("random_directions", "mlp", "recompute", "fused").to_json())
