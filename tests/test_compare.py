"""The compare workflow and its command line: results, gains, resume after SIGKILL, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from manifold_ext import builtin, compare as C, manifold as M
from manifold_ext.builtin import Benchmark, Candidate
from manifold_ext.cli import main
from manifold_ext.expand import Deepen, Widen

TINY = dict(seeds=2, base_epochs=2, adapt_epochs=1, finetune_epochs=2, probe_examples=64, n_boot=50,
            estimator_options={"radius": {"directions": 3, "grid": [1e-3, 10.0, 6], "bisect": 3},
                               "simplex": {"k": 1, "steps": 4, "samples": 16, "line_search": 2},
                               "minima": {"m": 2, "samples": 16}})

TINY_TOML = """
seeds = 2
base_epochs = 2
adapt_epochs = 1
finetune_epochs = 2
probe_examples = 64
n_boot = 50

[estimator_options.radius]
directions = 3
grid = [0.001, 10.0, 6]
bisect = 3

[estimator_options.simplex]
k = 1
steps = 4
samples = 16
line_search = 2

[estimator_options.minima]
m = 2
samples = 16

[[candidates]]
name = "control"

[[candidates]]
name = "wide"
specs = [{type = "widen", target = "*", factor = 2, init = "zero"}]

[[candidates]]
name = "deep random"
specs = [{type = "deepen", after = "3", init = "random"}]
"""


def _tiny_bench():
    b = builtin.benchmark("mlp")
    b.candidates = [Candidate("control"), Candidate("wide", (Widen("*", factor=2, init="zero"),)),
                    Candidate("deep random", (Deepen(after="3", init="random"),))]
    return b


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    result = C.compare(_tiny_bench(), C.Settings(**TINY), out, quiet=True)
    return out, result


def test_results_gains_and_tables(tiny_run):
    out, result = tiny_run
    assert (out / "results.json").exists() and len(list((out / "units").rglob("*.json"))) == 6
    saved = json.loads((out / "results.json").read_text())
    assert saved["ranking"] == json.loads(json.dumps(result.ranking))
    bench = _tiny_bench()
    for seed in range(2):
        base = C.load_base(bench, out, seed)
        base_acc = C.accuracy(base, bench.task.x_test, bench.task.y_test)
        assert result.bases[seed]["test_accuracy"] == base_acc
        probe_loss = C.mean_loss(base, bench.task.x_train[:64], bench.task.y_train[:64])
        assert result.bases[seed]["threshold"] == pytest.approx(C.loss_threshold(2.0, probe_loss, math.log(10)))
        units = {u["candidate"]: u for u in result.units if u["seed"] == seed}
        for u in units.values():
            assert u["gain_over_base"] == pytest.approx(100 * (u["test_accuracy"] - base_acc))
            assert u["gain_over_control"] == pytest.approx(
                100 * (u["test_accuracy"] - units["control"]["test_accuracy"]))
        assert units["wide"]["parameters"] == 2166 and units["control"]["parameters"] == 967
        assert units["wide"]["preservation_error"] < 1e-6  # zero-init widening preserves the function
    assert [r["rank"] for r in result.ranking] == [1, 2, 3]
    sizes = [r["size"] for r in result.ranking]
    assert sizes == sorted(sizes, reverse=True)
    metrics = [c["metric"] for c in result.correlations]
    assert metrics == C.metric_names(C.Settings(**TINY)) and len(metrics) == len(C.DEFAULT_ESTIMATORS) + 12
    for c in result.correlations:
        assert c["n"] == 6


def test_a_unit_is_reproducible(tiny_run):
    out, result = tiny_run
    bench = _tiny_bench()
    base = C.load_base(bench, out, 1)
    unit = C.run_unit(base, bench.candidates[1], bench.task, C.Settings(**TINY), 1,
                      result.bases[1]["threshold"])
    saved = json.loads((out / "units" / "seed1" / "wide.json").read_text())
    assert unit["test_accuracy"] == saved["test_accuracy"]
    assert unit["sizes"] == pytest.approx(saved["sizes"])


def test_resume_recomputes_nothing_and_refuses_other_settings(tiny_run, monkeypatch):
    out, result = tiny_run

    def boom(*a, **k):
        raise AssertionError("a finished unit was recomputed")

    monkeypatch.setattr(C, "run_unit", boom)
    again = C.compare(_tiny_bench(), C.Settings(**TINY), out, resume=True, quiet=True)
    assert again.units == result.units
    with pytest.raises(ValueError, match="already holds a compare run; pass resume=True"):
        C.compare(_tiny_bench(), C.Settings(**TINY), out, quiet=True)
    with pytest.raises(ValueError, match=r"cannot resume .*: setting lr: 0.001 in the run, 0.01 now; resume with the "
                                         r"run's settings, or choose another output directory$"):
        C.compare(_tiny_bench(), C.Settings(**{**TINY, "lr": 0.01}), out, resume=True, quiet=True)
    with pytest.raises(ValueError, match=r"setting lr: 0.001 in the run, 0.01 now; setting seeds: 2 in the run, 3 now"):
        C.compare(_tiny_bench(), C.Settings(**{**TINY, "lr": 0.01, "seeds": 3}), out, resume=True, quiet=True)
    other = _tiny_bench()
    other.candidates = other.candidates[:2]
    with pytest.raises(ValueError, match=r"cannot resume .*: candidates: \['control', 'wide', .*\] in the run, "
                                         r"\['control', 'wide'\] now"):
        C.compare(other, C.Settings(**TINY), out, resume=True, quiet=True)


def test_a_run_measured_by_an_earlier_minima_does_not_resume(tiny_run, tmp_path):
    out, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((old / "config.json").read_text())
    assert config["minima_batches"] == M.MINIMA_BATCHES
    del config["minima_batches"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"cannot resume .*: minima's runs took batches of 64 \(an earlier version of "
                                         r"minima\) in the run, batches of ceil\(N / 8\) of its N training examples now"):
        C.compare(_tiny_bench(), C.Settings(**TINY), old, resume=True, quiet=True)
    # A batch given outright is a setting like any other: no rule to record.
    fixed = C.Settings(**{**TINY, "estimator_options": {**TINY["estimator_options"], "minima": {"m": 2, "batch_size": 8}}})
    assert "minima_batches" not in C._run_config(_tiny_bench(), fixed, None)


@pytest.mark.parametrize("kwargs,msg", [
    ({"seeds": 0}, "settings: seeds must be an integer >= 1, got 0"),
    ({"lr": -1.0}, "settings: lr must be a positive number, got -1.0"),
    ({"adapt_epochs": 6}, r"adapt_epochs \(6\) must not exceed finetune_epochs \(5\)"),
    ({"estimators": ("radius", "volume")}, r"unknown estimator\(s\) \['volume'\]"),
    ({"baselines": ("snip", "magic")}, r"unknown baseline\(s\) \['magic'\]"),
    ({"estimators": ("simplex",), "default_estimator": "radius"},
     r"default_estimator must be one of the estimators run \['simplex'\], got 'radius'"),
    ({"estimator_options": {"volume": {}}}, r"estimator_options for unknown estimator\(s\) \['volume'\]"),
    ({"estimator_options": 5}, r"^settings: estimator_options must be a table of tables, one per estimator \(e.g. "
                               r"\{'radius': \{'directions': 8\}\}\), got 5$"),
    ({"estimator_options": {"radius": 3}}, r"^settings: estimator_options.radius must be a table of radius's options, got 3$"),
    ({"estimator_options": {"radius": {"directons": 3}}},
     r"^settings: estimator_options.radius: unknown option\(s\) \['directons'\] \(did you mean 'directions' for "
     r"'directons'\?\); valid are \['directions', "),
    ({"estimator_options": {"minima": {"tau": 1.0, "seed": 2}}},
     r"^settings: estimator_options.minima sets \['seed', 'tau'\], which compare sets itself"),
])
def test_settings_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        C.Settings(**kwargs)


def test_every_estimator_option_compare_can_pass_is_accepted():
    import inspect

    from manifold_ext import manifold as M

    for name, fn in M.ESTIMATORS.items():
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        opts = {p.name: p.default for p in own if p.name not in ("tau", "seed", "quiet", "return_vertices", "train_data")}
        C.Settings(estimators=[name], default_estimator=name, estimator_options={name: opts})
    C.Settings(estimator_options={"minima": {"eval_batch_size": 8, "engine": "loop", "bn": "recompute"}})


def test_a_bad_estimator_option_is_refused_before_training(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[estimator_options.radius]\ndirectons = 5\n")
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-plot"]) == 2
    assert "unknown option(s) ['directons'] (did you mean 'directions'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_settings_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"settings: unknown key\(s\) \['epochs'\]; valid keys are"):
        C.Settings.from_dict({"epochs": 3})


def test_candidate_round_trip_and_spec_errors():
    c = Candidate("x", (Widen("*", factor=2, init="zero"), Deepen(after="3", count=2)))
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="a spec's type must be 'widen' or 'deepen', got 'grow'"):
        builtin.spec_from_dict({"type": "grow"})
    with pytest.raises(ValueError, match=r"Widen: invalid keys \['width'\]"):
        builtin.spec_from_dict({"type": "widen", "target": "*", "width": 3})


def test_loss_threshold_never_reaches_the_chance_level_loss():
    assert C.loss_threshold(2.0, 0.3, math.log(10)) == pytest.approx(0.6)  # a good base: the multiple
    assert C.loss_threshold(2.0, 1.5, math.log(10)) == pytest.approx(1.5 + 0.5 * (math.log(10) - 1.5))  # capped
    assert C.loss_threshold(2.0, 3.0, math.log(10)) == 3.0  # a base above chance: its own loss
    for loss in (0.01, 0.5, 1.0, 2.0, 2.29):
        assert C.loss_threshold(5.0, loss, math.log(10)) < math.log(10)


def test_builtin_benchmarks_have_equal_size_pairs_and_enough_candidates():
    b = builtin.benchmark("mlp")
    assert len(b.candidates) >= 12 and b.candidates[0].name == "control"
    from manifold_ext.expand import expand
    base = b.make_base()
    size = {c.name: sum(p.numel() for p in (expand(base, *c.specs)[0] if c.specs else base).parameters())
            for c in b.candidates}
    assert size["depth +1 identity"] == size["width +6 net2net (= depth +1)"] == 967 + 132
    assert size["depth +2 identity"] == size["width +12 zero (= depth +2)"] == 967 + 264
    b = builtin.benchmark("cnn", "digits")
    base = b.make_base()
    for c in b.candidates:  # every candidate grows and runs on its task
        grown = expand(base, *c.specs)[0] if c.specs else base
        assert grown(b.task.x_test[:3]).shape == (3, int(b.task.y_train.max()) + 1)
    with pytest.raises(ValueError, match=r"no built-in benchmark for model 'cnn' on task 'python'; valid pairs"):
        builtin.benchmark("cnn", "python")
    with pytest.raises(ValueError, match=r"model 'transformer' \(the transformer on modular addition was removed: "
                                         r"its base stayed at chance level"):
        builtin.benchmark("transformer")


# ----------------------------------------------------------------------------- command line


def _cli(tmp_path, *args):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    return main(["compare", "--config", str(cfg), "--no-plot", "--quiet", *args])


def test_cli_writes_json_csv_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "Ranking by manifold size (minima" in printed and "size_radius" in printed
    for name in ("results.json", "results.csv", "metrics_vs_gain.png", "paths.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "simplex_slice.png").exists()  # drawn only when the run measures simplex (not by default)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    header = rows[0].split(",")
    assert "size_radius" in header and "hessian_top_eig" in header and "gain_over_control_pct_points" in header
    _check_csv_units(out)


def _check_csv_units(out):
    """results.csv: one unit per column, named in the header; counts written as integers."""
    import csv

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header[:8] == ["seed", "candidate", "parameters", "test_accuracy_pct", "gain_over_base_pct_points",
                          "gain_over_control_pct_points", "adapted_probe_loss", "seconds"]
    assert header.count("parameters") == 1 and "accuracy_pct" in header
    assert not {"test_accuracy", "gain_over_base", "gain_over_control", "accuracy"} & set(header)
    units = {(u["seed"], u["candidate"]): u for u in json.loads((out / "results.json").read_text())["units"]}
    for row in rows:
        assert row["seed"].isdigit() and row["parameters"].isdigit(), row  # integers: 967, not 967.0
        u = units[(int(row["seed"]), row["candidate"])]
        assert int(row["parameters"]) == u["parameters"]
        assert float(row["test_accuracy_pct"]) == pytest.approx(100 * u["test_accuracy"])  # percent
        assert float(row["accuracy_pct"]) == pytest.approx(100 * u["baselines"]["accuracy"])
        assert float(row["gain_over_base_pct_points"]) == pytest.approx(u["gain_over_base"])  # points
        assert 0 <= float(row["test_accuracy_pct"]) <= 100


def test_cli_user_data(tmp_path):
    g = np.random.default_rng(0)
    X = g.normal(size=(120, 20)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    (tmp_path / "tiny.toml").write_text(TINY_TOML.replace('after = "3"', 'after = "3"'))
    out = tmp_path / "run"
    assert _cli(tmp_path, "--data", str(tmp_path / "d.npz"), "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["bases"][0]["parameters"] == 20 * 11 + 11 + 11 * 11 + 11 + 11 * 4 + 4


@pytest.mark.parametrize("setup,args,msg", [
    (None, ["--config", "missing.toml"], "--config: no such file 'missing.toml'"),
    ("bad.toml:seeds = [", ["--config", "bad.toml"], "--config: 'bad.toml' is not valid TOML"),
    ("k.toml:epochs = 3", ["--config", "k.toml"], r"--config: settings: unknown key\(s\) \['epochs'\]"),
    ("v.toml:seeds = 0", ["--config", "v.toml"], "--config: settings: seeds must be an integer >= 1, got 0"),
    ("e.toml:estimators = ['volume']", ["--config", "e.toml"], r"unknown estimator\(s\) \['volume'\]"),
    ("c.toml:[[candidates]]\nname = 'x'\nspecs = [{type = 'grow'}]", ["--config", "c.toml"],
     "a spec's type must be 'widen' or 'deepen', got 'grow'"),
    (None, ["--data", "none.npz"], "--data none.npz: no such file"),
    ("d.npz", ["--data", "d.npz"], r"--data: the mlp takes X of 2 dimensions \(\(N, features\)\), got \(12, 2, 3\)"),
    ("bad.npz:not a zip", ["--data", "bad.npz"], r"--data bad.npz: not a .npz file \(a zip archive of arrays, as "
     r"numpy.savez writes it\): it starts with the bytes b'not '"),
    ("rand.npz:\xbf\x00\xff\x93NUMPY", ["--data", "rand.npz"], r"--data rand.npz: not a .npz file .*: it starts with "
     r"the bytes b'\\xc2\\xbf\\x00\\xc3'"),
    ("zip.npz:PK\x03\x04 truncated", ["--data", "zip.npz"], "--data zip.npz: numpy cannot read it as .npz"),
    (None, ["--resume"], "--resume needs --out: the directory of the run to continue"),
    (None, ["--resume", "--out", "."], "--resume: '.' holds no compare run"),
])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, setup, args, msg):
    monkeypatch.chdir(tmp_path)
    if setup == "d.npz":
        np.savez("d.npz", X=np.zeros((12, 2, 3), np.float32), y=np.zeros(12, np.int64))
    elif setup:
        name, text = setup.split(":", 1)
        Path(name).write_text(text)
    assert main(["compare", "--no-plot", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("manifold-ext compare: error: ") and len(err.strip().splitlines()) == 1
    import re
    assert re.search(msg, err), err


def test_sigkill_then_resume_loses_and_recomputes_nothing(tmp_path):
    """Kill a run with SIGKILL after some candidates finished; --resume must keep those files
    untouched (not recomputed) and complete the rest."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML.replace("seeds = 2", "seeds = 3"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "manifold_ext", "compare", "--config", str(cfg), "--out", str(out),
           "--no-plot", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "units").rglob("*.json"))) < 3:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "units").rglob("*.json")}
    bases = {p: p.stat().st_mtime_ns for p in (out / "bases").glob("*.pt")}
    assert 3 <= len(done) < 9, "the kill came too late to test anything"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for p, (mtime, data) in done.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, f"{p} was recomputed"
    for p, mtime in bases.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was retrained"
    res = json.loads((out / "results.json").read_text())
    assert len(res["units"]) == 9 and not list(out.rglob("*.tmp"))


def test_python_api_with_own_model_data_and_candidates(tmp_path):
    """A user's own task, base-model factory and candidates through the Python API."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(150, 7, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long()
    task = builtin.Task("mine", X[:100], y[:100], X[100:], y[100:])

    def make():
        return torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))

    bench = Benchmark("mine", task, make, [Candidate("control"),
                                           Candidate("wider", (Widen("0", size=6, init="net2net"),))])
    settings = C.Settings(**{**TINY, "estimators": ("radius",), "baselines": ("parameters", "loss")})
    result = C.compare(bench, settings, tmp_path / "run", quiet=True)
    assert [c["metric"] for c in result.correlations] == ["size_radius", "parameters", "loss"]
    params = {u["candidate"]: u["parameters"] for u in result.units}
    assert params == {"control": 7 * 3 + 3 + 3 * 2 + 2, "wider": 7 * 6 + 6 + 6 * 2 + 2}
    assert all(math.isfinite(u["sizes"]["radius"]) for u in result.units)


def test_capped_threshold_is_reported(capsys):
    from types import SimpleNamespace

    from manifold_ext.cli.compare import _base_summary

    bases = [{"test_accuracy": 0.5, "test_loss": 1.0, "chance_accuracy": 0.1, "chance_loss": math.log(10),
              "outputs": 10, "threshold": 1.65, "threshold_capped": True},
             {"test_accuracy": 0.6, "test_loss": 0.5, "chance_accuracy": 0.1, "chance_loss": math.log(10),
              "outputs": 10, "threshold": 1.0, "threshold_capped": False}]
    _base_summary(SimpleNamespace(bases=bases, settings={"threshold_multiple": 2.0}, warnings=[]), print)
    assert ("threshold: 2 x the base's probe loss would lie more than halfway to the chance-level loss ln(10) = "
            "2.3 for 1 of the 2 seeds' bases: capped halfway (1.65)") in capsys.readouterr().out


def test_candidate_names_that_share_a_unit_file_are_refused(tmp_path, capsys):
    bench = builtin.benchmark("mlp")
    bench.candidates = [builtin.Candidate("control"), builtin.Candidate("a/b", (Widen("*", factor=2),)),
                        builtin.Candidate("a_b", (Widen("*", factor=3),))]
    with pytest.raises(ValueError, match=r"^candidate names 'a/b' and 'a_b' would share the unit file "
                                         r"units/seed\*/a_b.json \(characters other than letters, digits"):
        C.compare(bench, C.Settings(seeds=1), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[candidates]]\nname = "a/b"\nspecs = [{type = "widen", target = "*", factor = 2}]\n'
                   '[[candidates]]\nname = "a_b"\nspecs = [{type = "widen", target = "*", factor = 3}]\n')
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cli"), "--no-plot"]) == 2
    assert "candidate names 'a/b' and 'a_b' would share the unit file" in capsys.readouterr().err


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    assert main(["compare", "--quick", "--out", str(f), "--no-plot"]) == 2
    assert capsys.readouterr().err == (f"manifold-ext compare: error: --out: {str(f)!r} exists and is not a directory "
                                       f"(a run writes a directory of results)\n")
    assert main(["compare", "--quick", "--out", str(f / "run"), "--no-plot"]) == 2
    assert capsys.readouterr().err == (f"manifold-ext compare: error: --out: {str(f / 'run')!r} cannot be created: "
                                       f"{str(f)!r} is a file, not a directory\n")
    assert main(["compare", "--suite", "--out", str(f), "--no-plot"]) == 2
    assert capsys.readouterr().err.startswith(f"manifold-ext compare: error: --out: {str(f)!r} exists and is not")
    with pytest.raises(ValueError, match="^out: .* exists and is not a directory"):
        C.compare(_tiny_bench(), C.Settings(**TINY), f, quiet=True)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("content,problem", [
    (b"\xbf\x00\xff random bytes", "cannot be read (UnicodeDecodeError)"),
    (b"{", "cannot be read (JSONDecodeError)"),
    (b"{}", "lacks ['seed', 'candidate', 'parameters'"),
    (b"[1, 2]", "holds a JSON list, not a unit"),
])
def test_a_corrupt_unit_is_recomputed_with_one_line(tiny_run, tmp_path, capsys, content, problem):
    import shutil

    src, result = tiny_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    path = out / "units" / "seed1" / "wide.json"
    path.write_bytes(content)
    again = C.compare(_tiny_bench(), C.Settings(**TINY), out, resume=True, quiet=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"compare: {path} {problem}")
    assert err[0].endswith(": computing that unit again")
    assert json.loads(path.read_text())["candidate"] == "wide"
    assert [u["test_accuracy"] for u in again.units] == [u["test_accuracy"] for u in result.units]


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    real = Path.write_text

    def full(self, text, *a, **k):
        if self.name == "results.json.tmp":
            real(self, text[:10])  # the disk fills halfway through
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY_TOML)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--no-plot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"manifold-ext compare: error: cannot write or read {out / 'results.json.tmp'}: No space left on "
                   f"device; finished work is kept: run the same command with --out DIR --resume (DIR: the output "
                   f"directory it printed) to continue\n")
    assert not list(out.rglob("*.tmp")) and not (out / "results.json").exists()
    assert len(list((out / "units").rglob("*.json"))) == 6  # the finished units are kept for --resume


def test_atomic_write_removes_its_temporary_file_on_any_failure(tmp_path):
    from manifold_ext._io import atomic_write

    path = tmp_path / "r.json"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("serialising failed")

    with pytest.raises(RuntimeError, match="serialising failed"):
        atomic_write(path, fails)
    assert path.read_text() == "old" and not (tmp_path / "r.json.tmp").exists()


def test_settings_read_the_old_name_of_threshold_multiple_and_refuse_both():
    assert C.Settings.from_dict({"threshold": 1.5}).threshold_multiple == 1.5
    assert C.Settings.from_dict({"threshold_multiple": 3}).threshold_multiple == 3
    with pytest.raises(ValueError, match=r"settings: 'threshold' is the old name of 'threshold_multiple'; give one of them"):
        C.Settings.from_dict({"threshold": 1.5, "threshold_multiple": 2.0})
    with pytest.raises(ValueError, match=r"settings: threshold_multiple must be a positive number, got 0"):
        C.Settings(threshold_multiple=0)
