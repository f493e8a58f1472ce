"""The `manifold-ext` command line (info, demo) and the built-in digits data."""

import csv
import json
import math

import pytest
import torch

from manifold_ext.cli import main
from manifold_ext.data import load_digits


def _demo(out, *extra):
    return main(["demo", "--points", "9", "--epochs", "5", "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert _demo(out, "--no-plot") == 0
    return out


def test_demo_json(demo_dir):
    result = json.loads((demo_dir / "line.json").read_text())
    pts = result["points"]
    assert len(pts) == 9
    assert [p["t"] for p in pts] == pytest.approx([-0.25 + 1.5 * i / 8 for i in range(9)])
    for p in pts:
        assert math.isfinite(p["loss"]) and p["loss"] > 0
        assert 0 <= p["accuracy"] <= 1
        assert abs(p["loss"] - p["naive_loss"]) <= 1e-4
    ends = result["endpoints"]
    assert [e["t"] for e in ends] == [0.0, 1.0]
    assert all(e["accuracy"] > 0.8 for e in ends)
    assert result["agreement"]["max_abs_loss_diff"] <= 1e-4
    assert result["barrier"]["height"] >= -1e-6
    assert result["timings"]["fused_s"] > 0 and result["timings"]["naive_s"] > 0
    assert result["config"]["points"] == 9 and result["config"]["plot"] is False
    assert "kernels" in result["build_info"]
    assert not (demo_dir / "line.png").exists()


def test_demo_csv(demo_dir):
    with open(demo_dir / "line.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["t", "loss", "accuracy", "naive_loss", "naive_accuracy"]
    assert len(rows) == 1 + 9


def test_demo_deterministic(demo_dir, tmp_path):
    assert main(["demo", "--points", "9", "--epochs", "5", "--out", str(tmp_path), "--quiet",
                 "--no-plot"]) == 0
    first = json.loads((demo_dir / "line.json").read_text())["points"]
    again = json.loads((tmp_path / "line.json").read_text())["points"]
    assert [p["loss"] for p in again] == [p["loss"] for p in first]


def test_demo_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--points", "3", "--epochs", "1", "--hidden", "4", "--out", str(tmp_path),
                 "--quiet", "--plot"]) == 0
    png = tmp_path / "line.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_table(tmp_path, capsys):
    assert main(["demo", "--points", "3", "--epochs", "1", "--hidden", "4", "--out", str(tmp_path),
                 "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "barrier height" in out and "speed-up" in out and "model A" in out


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "cpu" in info["kernels"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--points", "1", "argument --points: must be >= 2, got 1"),
        ("--hidden", "0", "argument --hidden: must be >= 1, got 0"),
        ("--epochs", "0", "argument --epochs: must be >= 1, got 0"),
        ("--points", "many", "argument --points: expected an integer, got 'many'"),
    ],
)
def test_demo_argument_errors(option, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["demo", option, value, "--out", str(tmp_path)])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_command(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_load_digits():
    d = load_digits()
    assert d.x_train.shape == (1078, 64) and d.x_test.shape == (719, 64)
    assert d.y_train.shape == (1078,) and d.y_test.shape == (719,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10))
    # Standardised with the training split's statistics: mean 0, std 1 (constant pixels: 0).
    torch.testing.assert_close(d.x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    std = d.x_train.std(0)
    assert ((std - 1).abs() < 1e-4).logical_or(std == 0).all()
    assert (std > 0).sum() > 50

    again = load_digits()
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    other = load_digits(seed=1)
    assert not torch.equal(other.y_train, d.y_train)
    assert load_digits(dtype=torch.float64).x_test.dtype == torch.float64
    assert len(load_digits(test_fraction=0.25).y_test) == 450  # ceil(0.25 * 1797)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, 0.99999])
def test_load_digits_bad_test_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=bad)
