"""The suite: the candidate generator's equal-size pairs, the generated tasks, the cross-task
table (checked against values computed by hand) and ``manifold-ext compare --suite``."""

import csv
import json
import math

import pytest
import torch

from manifold_ext import builtin, compare as C, models
from manifold_ext import suite as S
from manifold_ext.builtin import Benchmark, Candidate
from manifold_ext.expand import Widen, expand
from _cli import error

from test_compare import TINY


def _size(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the generator


def test_equal_size_widths_by_hand():
    # Six more units in the last hidden layer of 64-11-11-10: 6 * (11 + 1 + 10) = 132 = 11 * 12.
    assert builtin.equal_size_widths((64, 11, 11, 10), 132) == (11, 17)
    # 2-12-12-3 plus one 12x12 layer (156): (+2, +7) adds 2*15 + 7*16 + 2*7 = 156 (9 units; (+6, +3) also
    # adds 156 with 9 units, but the last layer grows more in the first).
    assert builtin.equal_size_widths((2, 12, 12, 3), 156) == (14, 19)
    assert builtin.equal_size_widths((16, 12, 12, 8), 156) is None
    # One hidden layer: 5-6-3 gains 5 + 1 + 3 = 9 per unit.
    assert builtin.equal_size_widths((5, 6, 3), 27) == (9,)
    assert builtin.equal_size_widths((5, 6, 3), 28) is None


def test_equal_size_widths_needs_a_hidden_layer():
    with pytest.raises(ValueError, match=r"equal_size_widths: widths needs at least one hidden layer, got \(4, 3\)"):
        builtin.equal_size_widths((4, 3), 10)


def test_builtin_mlp_candidates_are_the_generator_s():
    names = [c.name for c in builtin.benchmark("mlp").candidates]
    assert names == ["control"] + [f"width x{f} {i}" for f in ("1.5", "2", "4") for i in ("net2net", "zero", "random")] + [
        "depth +1 identity", "depth +1 random", "depth +1 copy", "width +6 net2net (= depth +1)",
        "width +6 zero (= depth +1)", "depth +2 identity", "depth +2 random", "depth +2 copy",
        "width +12 net2net (= depth +2)", "width +12 zero (= depth +2)"]


@pytest.mark.parametrize("widths", [(64, 11, 11, 10), (16, 15, 15, 8), (20, 9, 9, 5), (2, 12, 12, 3), (5, 6, 3),
                                    (7, 8, 9, 10, 4)])
def test_generated_pairs_are_exactly_equal_in_size(widths):
    torch.manual_seed(0)
    base = models.mlp(widths)
    cands = builtin.mlp_candidates(widths)
    grown = {c.name: expand(base, *c.specs)[0] if c.specs else base for c in cands}
    pairs = [c.name for c in cands if "(= depth" in c.name]
    for name in pairs:
        depth = name.split("(= ")[1].rstrip(")")
        assert _size(grown[name]) == _size(grown[f"{depth} identity"]), name
    x = torch.randn(9, widths[0])
    for c in cands:  # the preserving ones preserve the function
        if c.specs and c.specs[0].init in ("net2net", "zero", "identity"):
            torch.testing.assert_close(grown[c.name](x), base(x), atol=1e-5, rtol=0)
    exact = [d for d in (1, 2) if builtin.equal_size_widths(widths, d * widths[-2] * (widths[-2] + 1))]
    assert len(pairs) == 2 * len(exact)


def test_generator_errors():
    with pytest.raises(ValueError, match=r"mlp_candidates: widths must be positive with at least one hidden layer, "
                                         r"got \(4, 3\)"):
        builtin.mlp_candidates((4, 3))


# ----------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("make,features,classes", [(builtin.teacher, 16, 8), (builtin.clusters, 20, 5)])
def test_generated_tasks_are_deterministic_and_use_every_class(make, features, classes):
    a, b = make(), make()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (1800, features) and a.x_test.shape == (1200, features)
    assert set(a.y_train.tolist()) == set(range(classes))
    assert not torch.equal(make(seed=1).x_train, a.x_train)


def test_suite_names_and_unknown_pairs():
    assert [b.name for b in builtin.suite()] == ["mlp-digits", "mlp-teacher", "mlp-clusters", "cnn-digits",
                                                 "gpt2-python-source"]
    with pytest.raises(ValueError, match=r"no built-in benchmark for model 'mlp' on task 'python'; valid pairs are "
                                         r"\[\('cnn', 'digits'\), \('gpt2', 'python'\)"):
        builtin.benchmark("mlp", "python")


# ----------------------------------------------------------------------------- the table


def _result(rhos: dict, orders: dict, p, seconds=1.0):
    return C.CompareResult(settings={"default_estimator": "radius"}, candidates=[], bases=[], units=[], ranking=[],
                           correlations=[{"metric": m, "spearman": rhos[m], "equal_size_order": orders[m]}
                                         for m in rhos],
                           seconds=seconds, signal={"friedman_p": p})


def test_summarise_suite_by_hand():
    results = {
        "a": _result({"size_radius": 0.8, "parameters": 0.2}, {"size_radius": 1.0, "parameters": 0.5}, 0.01, 3.0),
        "b": _result({"size_radius": 0.4, "parameters": 0.6}, {"size_radius": None, "parameters": 0.25}, 0.04),
        "c": _result({"size_radius": -0.9, "parameters": 0.9}, {"size_radius": 0.0, "parameters": 1.0}, 0.5),
    }
    s = S.summarise_suite(results)
    assert s.tasks == ["a", "b", "c"] and s.default_estimator == "radius"
    assert [s.signal[t]["has_signal"] for t in s.tasks] == [True, True, False]
    rows = {r["metric"]: r for r in s.rows}
    # c has no signal: out of the averages. radius: (0.8 + 0.4) / 2; its order: b has no pairs.
    assert rows["size_radius"]["average"] == pytest.approx(0.6)
    assert rows["size_radius"]["equal_size_average"] == pytest.approx(1.0)
    assert rows["parameters"]["average"] == pytest.approx(0.4)
    assert rows["parameters"]["equal_size_average"] == pytest.approx(0.375)
    assert [r["metric"] for r in s.rows] == ["size_radius", "parameters"]
    assert s.seconds == {"a": 3.0, "b": 1.0, "c": 1.0}
    text = S.format_table(s)
    assert "c*" in text and "* no signal (Friedman p > 0.05): shown, left out of the averages" in text
    assert "+0.60" in text.splitlines()[1] and "1.00" in text.splitlines()[1]


def test_summarise_suite_keeps_only_common_metrics_and_needs_a_result():
    s = S.summarise_suite({"a": _result({"x": 0.1, "y": 0.2}, {"x": None, "y": None}, 0.01),
                           "b": _result({"y": 0.3}, {"y": None}, None)})
    assert [r["metric"] for r in s.rows] == ["y"] and s.signal["b"]["has_signal"] is False
    assert s.rows[0]["average"] == pytest.approx(0.2) and s.rows[0]["equal_size_average"] is None
    with pytest.raises(ValueError, match="summarise_suite: expected at least one compare result, got none"):
        S.summarise_suite({})


def _tiny_suite():
    out = []
    for task, widths in ((builtin.teacher(n=300), (16, 6, 8)), (builtin.clusters(n=300), (20, 5, 5))):
        out.append(Benchmark("mlp", task, lambda w=widths: models.mlp(w),
                             [Candidate("control"), Candidate("wide", (Widen("*", factor=2, init="zero"),)),
                              Candidate("wider", (Widen("*", factor=4, init="random"),))]))
    return out


def test_run_suite_writes_the_table(tmp_path):
    s = S.run_suite(_tiny_suite(), tmp_path, overrides=dict(TINY, estimators=["radius"], baselines=["parameters"]),
                    quiet=True)
    assert s.tasks == ["mlp-teacher", "mlp-clusters"]
    data = json.loads((tmp_path / "suite.json").read_text())
    assert data["tasks"] == s.tasks and len(data["rows"]) == 2
    for t in s.tasks:
        assert (tmp_path / t / "results.json").exists()
    with open(tmp_path / "suite.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows] == [r["metric"] for r in s.rows]
    assert set(rows[0]) == {"metric", "spearman mlp-teacher", "spearman mlp-clusters", "spearman average",
                            "equal-size order mlp-teacher", "equal-size order mlp-clusters",
                            "equal-size order average"}
    # Every seed's base and candidate of each task: the table's value is that run's correlation.
    run = json.loads((tmp_path / "mlp-teacher" / "results.json").read_text())
    rho = next(c["spearman"] for c in run["correlations"] if c["metric"] == "size_radius")
    got = float(rows[[r["metric"] for r in rows].index("size_radius")]["spearman mlp-teacher"])
    assert got == pytest.approx(rho) or (math.isnan(rho) and math.isnan(got))


def test_run_suite_refuses_duplicate_names_and_bad_overrides(tmp_path):
    b = _tiny_suite()[0]
    with pytest.raises(ValueError, match=r"run_suite: benchmark names must be unique, got \['mlp-teacher', 'mlp-teacher'\]"):
        S.run_suite([b, b], tmp_path)
    with pytest.raises(ValueError, match="settings: seeds must be an integer >= 1, got 0"):
        S.run_suite(_tiny_suite(), tmp_path, overrides={"seeds": 0})
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv,message", [
    (["--suite", "--model", "cnn"], "--model: not with --suite (the suite runs every built-in benchmark on its own data)"),
    (["--suite", "--task", "digits"], "--task: not with --suite (the suite runs every built-in benchmark on its own data)"),
    (["--suite", "--resume"], "--resume needs --out: the directory of the suite run to continue"),
])
def test_cli_suite_errors(capsys, argv, message):
    assert error(capsys, "compare", *argv) == message


def test_cli_suite_refuses_candidates_and_bad_settings_before_training(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[candidates]]\nname = "x"\n')
    assert error(capsys, "compare", "--suite", "--config", cfg, "--out", tmp_path / "o") == (
        f"--config {cfg}: candidates is not used with --suite (each benchmark has its own); set only settings")
    cfg.write_text("lr = -1\n")
    assert error(capsys, "compare", "--suite", "--config", cfg, "--out", tmp_path / "o") == (
        "--config: settings: lr must be a positive number, got -1")
    assert not (tmp_path / "o").exists()
