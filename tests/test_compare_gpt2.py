"""The built-in language-model benchmark: ``manifold-ext compare --model gpt2`` (a small Hugging Face
GPT-2 learning the bytes of Python's standard-library source, loss "lm")."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from manifold_ext import builtin  # noqa: E402
from manifold_ext import compare as C  # noqa: E402
from manifold_ext.cli import main  # noqa: E402
from manifold_ext.expand import expand  # noqa: E402

from _cli import error  # noqa: E402


def test_python_source_task():
    t = builtin.python_source()
    again = builtin.python_source()
    assert t.name == "python-source" and t.x_train.shape[1] == 64 and t.x_train.dtype == torch.int64
    assert torch.equal(t.x_train, again.x_train) and torch.equal(t.x_test, again.x_test)  # deterministic
    assert torch.equal(t.x_train, t.y_train)  # next-token prediction on the sequences themselves
    both = torch.cat([t.x_train, t.x_test])
    assert both.min() >= 0 and both.max() < 256
    assert len(t.x_test) == math.ceil(0.25 * len(both)) and len(both) > 2000
    # real text: mostly printable ASCII, spaces the most frequent byte
    assert torch.bincount(both.reshape(-1), minlength=256).argmax().item() == ord(" ")
    short = builtin.python_source(length=16, per_file=64)
    assert short.x_train.shape[1] == 16


def test_unigram_loss():
    ids = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]] * 5)
    t = builtin.Task("t", ids, ids, ids, ids)
    # two tokens, equally frequent: add-one smoothing keeps them at 1/2 each
    assert C.unigram_loss(t) == pytest.approx(math.log(2))
    skew = torch.tensor([[0, 0, 0, 1]] * 10)
    t = builtin.Task("t", skew, skew, skew, skew)
    p0, p1 = (20 + 1) / (30 + 2), (10 + 1) / (30 + 2)
    assert C.unigram_loss(t) == pytest.approx(-(2 / 3 * math.log(p0) + 1 / 3 * math.log(p1)))


def test_benchmark_candidates_sizes_and_preservation():
    b = builtin.benchmark("gpt2")
    assert (b.model, b.task.name, b.settings["loss"]) == ("gpt2", "python-source", "lm")
    base = b.make_base()
    assert type(base).__name__ == "GPT2LMHeadModel" and base.config.vocab_size == 256
    sizes = {}
    for c in b.candidates:
        if not c.specs:
            sizes[c.name] = sum(p.numel() for p in base.parameters())
            continue
        grown, rep = expand(base, *c.specs, generator=torch.Generator().manual_seed(0))
        sizes[c.name] = rep.params_after
        if rep.preserving:
            assert rep.preservation_error <= 1e-5, c.name
        assert grown(b.task.x_test[:2]).logits.shape == (2, 64, 256)
    assert sizes["heads +2 zero"] == sizes["heads +2 net2net"] == sizes["residual width x1.5 zero (= heads +2)"]
    assert sizes["ff width x2 zero"] == sizes["ff width x2 net2net"] == sizes["ff width x2 random"]
    near = next(n for n in sizes if n.endswith("(~ depth +1)"))
    assert sizes[near] != sizes["depth +1 zero"] and C.equal_size(sizes[near], sizes["depth +1 zero"])
    assert not C.equal_size(sizes["control"], sizes["depth +1 zero"])
    quick = b.quick_version()
    assert [c.name for c in quick.candidates] == [n for n in sizes if n in builtin.GPT2_QUICK_CANDIDATES]
    assert len(quick.candidates) == len(builtin.GPT2_QUICK_CANDIDATES) == 8


def test_settings_for_layers_benchmark_quick_and_overrides():
    b = builtin.benchmark("gpt2")
    s = C.settings_for(b)
    assert (s.loss, s.base_epochs, s.lr, s.probe_examples, s.seeds) == ("lm", 4, 3e-3, 64, 3)
    q = C.settings_for(b, quick=True)
    assert (q.loss, q.seeds, q.probe_examples) == ("lm", 2, 32)  # QUICK, then the benchmark's quick settings
    assert q.estimator_options["radius"]["directions"] == 8
    assert C.settings_for(b, quick=True, seeds=4).seeds == 4
    assert C.settings_for(builtin.benchmark("mlp")) == C.Settings()
    # estimator_options merge per estimator: the defaults, the benchmark's, --quick's, then overrides.
    assert s.estimator_options["minima"] == {**C.DEFAULT_ESTIMATOR_OPTIONS["minima"], "m": 4, "samples": 64}
    o = C.settings_for(b, estimator_options={"minima": {"lr": 0.01}, "simplex": {"k": 1}})
    assert o.estimator_options["minima"] == {"lr": 0.01, "epochs": 3, "units": "raw", "m": 4, "samples": 64}
    assert o.estimator_options["simplex"] == {"k": 1} and o.estimator_options["radius"]["directions"] == 16


def test_the_default_estimator_is_minima_when_it_runs():
    assert C.Settings().default_estimator == "minima" and C.Settings().estimators == ("radius", "minima")
    assert C.Settings(estimators=["radius", "simplex"]).default_estimator == "radius"
    assert C.Settings(estimators=["radius", "minima"], default_estimator="radius").default_estimator == "radius"


def test_cli_errors(tmp_path, capsys):
    assert error(capsys, "compare", "--model", "transformer") == (
        "--model transformer: needs --data FILE holding token ids X and labels y: it has no built-in task (the "
        "modular-addition benchmark was removed: its base stayed at chance level); the built-in language-model "
        "benchmark is --model gpt2")
    import numpy as np
    np.savez(tmp_path / "d.npz", X=np.zeros((20, 64), np.float32), y=np.zeros(20, np.int64))
    assert error(capsys, "compare", "--model", "gpt2", "--data", tmp_path / "d.npz").startswith(
        f"--data {tmp_path / 'd.npz'}: not with --model gpt2 (it learns the built-in python task)")
    assert error(capsys, "compare", "--model", "mlp", "--task", "python").startswith(
        "--model mlp: no built-in benchmark for model 'mlp' on task 'python'; valid pairs are")


def test_quick_run(tmp_path, capsys):
    """``manifold-ext compare --model gpt2 --quick`` as a user runs it: the base learns beyond the
    unigram model, every preserving candidate preserves, and the results say so."""
    out = tmp_path / "run"
    assert main(["compare", "--model", "gpt2", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gpt2 on python-source, 8 candidates, 2 seeds" in printed
    assert "(unigram model " in printed
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["loss"] == "lm" and len(res["units"]) == 16
    for b in res["bases"]:
        assert b["test_loss"] < b["unigram_loss"] - 0.3  # learned from context
        assert b["threshold"] < b["chance_loss"]
    assert not any("unigram" in w or "chance" in w for w in res["warnings"])
    assert sorted(r["candidate"] for r in res["ranking"]) == sorted(builtin.GPT2_QUICK_CANDIDATES)
    for u in res["units"]:
        if u["candidate"] in ("control", "ff width x2 zero", "depth +1 zero", "heads +2 zero"):
            assert u["preservation_error"] <= 1e-5
    names = {c["metric"] for c in res["correlations"]}
    assert {"size_radius", "size_minima", "parameters"} <= names
    sizes = {r["candidate"]: r["parameters"] for r in res["ranking"]}
    assert sizes["heads +2 zero"] == sizes["residual width x1.5 zero (= heads +2)"]
    assert (out / "metrics_vs_gain.png").is_file() and (out / "paths.png").is_file()
