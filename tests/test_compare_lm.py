"""compare on language models: Settings(loss="lm"), task_from_tokens, token files as --data.

The base is a user's bigram language model (tests/_models.py: bigram_lm, an nn.Sequential of an
Embedding, Linear fc1, ReLU and the output Linear) trained briefly here on bytes of real text (the
source of a few Python standard-library modules, bytes as tokens, V = 256, sequences of 32)."""

import json
import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manifold_ext import compare as C
from manifold_ext.builtin import Benchmark, Candidate, Task, task_from_tokens
from manifold_ext.cli import main
from manifold_ext.expand import Deepen, Widen, expand

from _models import bigram_lm

V, T, SEQUENCES = 256, 32, 300

SETTINGS = dict(seeds=2, adapt_epochs=1, finetune_epochs=2, batch_size=32, probe_examples=32, n_boot=50,
                estimators=("radius",), baselines=("parameters", "loss", "grad_norm"),
                estimator_options={"radius": {"directions": 3, "grid": (1e-3, 10.0, 6), "bisect": 3}})

SETTINGS_TOML = """
seeds = 2
adapt_epochs = 1
finetune_epochs = 2
batch_size = 32
probe_examples = 32
n_boot = 50
estimators = ["radius"]
baselines = ["parameters", "loss", "grad_norm"]

[estimator_options.radius]
directions = 3
grid = [0.001, 10.0, 6]
bisect = 3
"""

CANDIDATES_TOML = """
[[candidates]]
name = "wide"
specs = [{type = "widen", target = "fc1", factor = 2, init = "net2net"}]

[[candidates]]
name = "deep"
specs = [{type = "deepen", after = "act", init = "identity"}]
"""

CANDIDATES = [Candidate("control"), Candidate("wide", (Widen("fc1", factor=2, init="net2net"),)),
              Candidate("deep", (Deepen(after="act", init="identity"),))]


def text_tokens(n=SEQUENCES, length=T) -> np.ndarray:
    """``n`` sequences of ``length`` bytes of Python source (int64 ids in [0, 256))."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    raw = b"".join((stdlib / name).read_bytes() for name in ("textwrap.py", "string.py", "fnmatch.py", "glob.py"))
    assert len(raw) >= n * length
    return np.frombuffer(raw[:n * length], dtype=np.uint8).reshape(n, length).astype(np.int64)


def next_token(model, x):
    """Next-token accuracy and loss of ``model`` on sequences ``x``, computed here by hand."""
    with torch.no_grad():
        out = model.eval()(x)
    pred, target = out[:, :-1], x[:, 1:]
    acc = (pred.argmax(-1) == target).double().mean().item()
    return acc, F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1)).item()


@pytest.fixture(scope="module")
def lm():
    """``(model, tokens, task)``: the bigram model trained 5 epochs on the task's training split
    (next-token accuracy about 37% against a chance level of 29%: Python source is full of spaces)."""
    tokens = text_tokens()
    task = task_from_tokens(tokens, name="text")
    model = bigram_lm()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for idx in torch.randperm(len(task.x_train), generator=g).split(32):
            x = task.x_train[idx]
            out = model(x)[:, :-1]
            opt.zero_grad()
            F.cross_entropy(out.reshape(-1, V), x[:, 1:].reshape(-1)).backward()
            opt.step()
    return model.eval(), tokens, task


@pytest.fixture(scope="module")
def files(lm, tmp_path_factory):
    model, tokens, _ = lm
    d = tmp_path_factory.mktemp("lm")
    torch.save(model.state_dict(), d / "model.pt")
    np.savez(d / "tokens.npz", tokens=tokens)
    torch.save({"tokens": torch.from_numpy(tokens)}, d / "tokens.pt")
    big = tokens.copy()
    big[5, 3] = 300
    np.savez(d / "big.npz", tokens=big)
    np.savez(d / "xy.npz", X=tokens, y=tokens[:, 0] % 3)
    (d / "cands.toml").write_text(SETTINGS_TOML + CANDIDATES_TOML)
    (d / "lm.toml").write_text('loss = "lm"\n' + SETTINGS_TOML + CANDIDATES_TOML)
    (d / "ce.toml").write_text('loss = "cross_entropy"\n' + SETTINGS_TOML + CANDIDATES_TOML)
    (d / "nll.toml").write_text('loss = "nll"\n' + SETTINGS_TOML + CANDIDATES_TOML)
    return d


# ----------------------------------------------------------------------------- the model and the data


def test_expand_grows_the_bigram_model(lm):
    """Widen("fc1") widens fc1 and the output layer's inputs and leaves the Embedding as it is;
    expand has no default inputs for a model that takes token ids, so it measures the
    preservation only on inputs it is given."""
    model, _, task = lm
    x = task.x_train[:8]
    grown, report = expand(model, Widen("fc1", factor=2, init="net2net"), generator=torch.Generator().manual_seed(0))
    assert grown.fc1.weight.shape == (64, 16) and grown.out.weight.shape == (V, 64)
    assert torch.equal(grown.emb.weight, model.emb.weight)
    assert report.preservation_error is None
    _, checked = expand(model, Widen("fc1", factor=2, init="net2net"), check_inputs=x)
    assert checked.preservation_error < 1e-5
    deep, report = expand(model, Deepen(after="act", init="identity"), check_inputs=x)
    assert report.preservation_error < 1e-5 and deep(x).shape == (8, T, V)


def test_task_from_tokens_split_and_errors():
    tokens = text_tokens(20, 8)
    t = task_from_tokens(tokens, name="bytes")
    assert t.name == "bytes" and len(t.x_test) == 8 and len(t.x_train) == 12  # ceil(0.4 * 20) for testing
    assert t.x_train.dtype == torch.int64 and torch.equal(t.x_train, t.y_train) and torch.equal(t.x_test, t.y_test)
    rows = sorted(map(tuple, torch.cat([t.x_train, t.x_test]).tolist()))
    assert rows == sorted(map(tuple, tokens.tolist()))  # whole sequences, none cut across the splits
    other = task_from_tokens(tokens, name="bytes", seed=1, test_fraction=0.25)
    assert len(other.x_test) == 5 and not torch.equal(other.x_train[:5], t.x_train[:5])
    with pytest.raises(ValueError, match=r"expected tokens of shape \(N, T\): N sequences of T token ids, "
                                         r"got shape \(160,\)"):
        task_from_tokens(tokens.reshape(-1), name="x")
    with pytest.raises(ValueError, match="token ids must be integers, got tokens of dtype torch.float32"):
        task_from_tokens(tokens.astype(np.float32), name="x")
    with pytest.raises(ValueError, match=r"expected sequences of at least 2 tokens .*got tokens of shape \(20, 1\)"):
        task_from_tokens(tokens[:, :1], name="x")
    negative = tokens.copy()
    negative[3, 4] = -1
    with pytest.raises(ValueError, match="token ids must be non-negative, got ids down to -1"):
        task_from_tokens(negative, name="x")
    with pytest.raises(ValueError, match=r"test_fraction=0.99 leaves no training sequences \(of 1\)"):
        task_from_tokens(tokens[:1], name="x", test_fraction=0.99)


def test_next_token_accuracy_loss_and_chance(lm):
    model, _, task = lm
    acc, loss = next_token(model, task.x_test)
    assert C.accuracy(model, task.x_test, task.y_test, "lm") == pytest.approx(acc, abs=1e-12)
    assert C.mean_loss(model, task.x_test, task.y_test, "lm") == pytest.approx(loss, rel=1e-6)
    mode = torch.bincount(task.x_train[:, 1:].reshape(-1)).argmax()
    chance = (task.x_test[:, 1:] == mode).double().mean().item()
    assert C.chance_accuracy(task, "lm") == chance and acc > chance + 0.05  # the base learnt something
    # Ignored targets (-100) count in neither.
    y = task.y_test.clone()
    y[:, 10:] = -100
    short_acc, short_loss = next_token(model, task.x_test[:, :10])
    assert C.accuracy(model, task.x_test, y, "lm") == pytest.approx(short_acc, abs=1e-12)
    assert C.mean_loss(model, task.x_test, y, "lm") == pytest.approx(short_loss, rel=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_python_api_language_model_end_to_end(lm, tmp_path):
    model, _, task = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = Benchmark("bigram", task, candidates=CANDIDATES)
    settings = C.Settings(loss="lm", **SETTINGS)
    result = C.compare(bench, settings, tmp_path / "run", base=model, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is untouched
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["settings"]["loss"] == "lm"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["loss"] == "lm"
    acc, loss = next_token(model, task.x_test)
    _, probe_loss = next_token(model, task.x_train[:32])
    mode = torch.bincount(task.x_train[:, 1:].reshape(-1)).argmax()
    chance = (task.x_test[:, 1:] == mode).double().mean().item()
    for seed, b in enumerate(saved["bases"]):  # never retrained: every seed's base is the model given
        assert b["seed"] == seed
        assert b["test_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert b["test_loss"] == pytest.approx(loss, rel=1e-6)
        assert b["probe_loss"] == pytest.approx(probe_loss, rel=1e-6)
        tau = min(2.0 * probe_loss, probe_loss + 0.5 * (math.log(V) - probe_loss))  # never reaches ln V
        assert b["threshold"] == pytest.approx(tau, rel=1e-6) and b["threshold"] < math.log(V)
        assert b["threshold_capped"] == (2.0 * probe_loss > tau)
        assert b["chance_accuracy"] == chance
        assert b["outputs"] == V and b["chance_loss"] == pytest.approx(math.log(V))
        copy_in_out = torch.load(tmp_path / "run" / "bases" / f"seed{seed}.pt", weights_only=True)
        assert all(torch.equal(copy_in_out[k], before[k]) for k in before)
    units = {(u["seed"], u["candidate"]): u for u in saved["units"]}
    assert len(units) == 6
    n = sum(p.numel() for p in model.parameters())
    for seed in range(2):
        control, wide, deep = (units[seed, c] for c in ("control", "wide", "deep"))
        assert control["parameters"] == n and wide["parameters"] == n + 32 * (16 + 1 + V)
        assert deep["parameters"] == n + 32 * 33
        assert control["preservation_error"] == 0.0
        # Measured on the training sequences (expand has no default inputs for token ids).
        assert wide["preservation_error"] < 1e-5 and deep["preservation_error"] < 1e-5
        for u in (control, wide, deep):
            assert u["gain_over_base"] == pytest.approx(100 * (u["test_accuracy"] - acc))
            assert u["baselines"]["parameters"] == u["parameters"]
            # The loss baseline is the next-token loss on the probe set, as the adapted probe loss.
            assert u["baselines"]["loss"] == pytest.approx(u["adapted_probe_loss"], rel=1e-5)
            assert math.isfinite(u["baselines"]["grad_norm"]) and u["baselines"]["grad_norm"] > 0
            assert u["estimates"]["radius"]["threshold"] == pytest.approx(saved["bases"][0]["threshold"], rel=1e-6)
            assert 0.0 <= u["test_accuracy"] <= 1.0 and math.isfinite(u["sizes"]["radius"])
    assert [c["metric"] for c in saved["correlations"]] == ["size_radius", "parameters", "loss", "grad_norm"]
    assert not any("chance-level loss" in w for w in saved["warnings"])  # the cap keeps it below
    assert not any("at chance level" in w for w in saved["warnings"])
    # Resuming recomputes nothing.
    again = C.compare(bench, settings, tmp_path / "run", base=model, resume=True, quiet=True)
    assert again.units == result.units


def test_threshold_above_the_chance_level_loss_is_flagged(lm):
    model, _, task = lm
    _, probe_loss = next_token(model, task.x_train[:32])
    bases = [{"seed": 0, "test_accuracy": 0.5, "chance_accuracy": 0.1, "probe_loss": probe_loss,
              "threshold": 10 * probe_loss, "outputs": V, "chance_loss": math.log(V)}]
    units = [{"seed": 0, "candidate": "control", "parameters": 1, "preservation_error": 0.0, "test_accuracy": 0.5,
              "sizes": {"radius": 0.0}, "baselines": {}}]
    settings = C.Settings(loss="lm", threshold_multiple=10, estimators=("radius",), baselines=(), n_boot=10)
    result = C.summarise(Benchmark("b", task, candidates=[Candidate("control")]), settings, bases, units)
    want = (f"the loss threshold is not below the chance-level loss: 10 x the base's probe loss {probe_loss:.3g} = "
            f"{10 * probe_loss:.3g} >= ln(256) = 5.55, the loss of uniform predictions over its 256 outputs; the "
            f"manifold sizes take in models no better than chance: set threshold_multiple below {math.log(V) / probe_loss:.3g}")
    assert want in result.warnings
    bases[0]["threshold"] = 1.5 * probe_loss
    assert not any("chance-level loss" in w for w in C.summarise(
        Benchmark("b", task, candidates=[Candidate("control")]), settings, bases, units).warnings)


def test_base_no_better_than_unigram_is_flagged(lm):
    _, _, task = lm
    bases = [{"seed": 0, "test_accuracy": 0.5, "chance_accuracy": 0.1, "test_loss": 3.05, "unigram_loss": 3.1,
              "probe_loss": 2.0, "threshold": 4.0, "outputs": V, "chance_loss": math.log(V)}]
    units = [{"seed": 0, "candidate": "control", "parameters": 1, "preservation_error": 0.0, "test_accuracy": 0.5,
              "sizes": {"radius": 0.0}, "baselines": {}}]
    settings = C.Settings(loss="lm", estimators=("radius",), baselines=(), n_boot=10)
    bench = Benchmark("b", task, candidates=[Candidate("control")])
    want = ("the base has not learned beyond token frequencies (test loss 3.05 vs 3.1 of the unigram model): the "
            "gains below measure noise, not expansion")
    assert want in C.summarise(bench, settings, bases, units).warnings
    bases[0]["test_loss"] = 2.9
    assert not any("token frequencies" in w for w in C.summarise(bench, settings, bases, units).warnings)


def _one_line_error(capsys, argv, pattern):
    assert main(["compare", "--no-plot", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("manifold-ext compare: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_cli_token_file_runs_a_language_model(lm, files, tmp_path, capsys):
    model, tokens, _ = lm
    d = files
    out = tmp_path / "run"
    assert main(["compare", "--base", str(d / "model.pt"), "--arch", "_models:bigram_lm", "--data",
                 str(d / "tokens.npz"), "--config", str(d / "cands.toml"), "--out", str(out), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["loss"] == "lm"
    task = task_from_tokens(tokens, name="custom tokens")  # --data's split: 60/40, seed 0
    acc, loss = next_token(model, task.x_test)
    assert all(b["test_accuracy"] == pytest.approx(acc, abs=1e-12) for b in res["bases"])
    assert all(b["test_loss"] == pytest.approx(loss, rel=1e-6) for b in res["bases"])
    assert f"base: test next-token accuracy {100 * acc:.1f}%" in printed
    assert "gains in next-token-accuracy points" in printed
    assert {u["candidate"] for u in res["units"]} == {"control", "wide", "deep"}
    assert (out / "results.csv").exists()


class _Stop(Exception):
    """Raised by a patched step to stop a run once what the test inspects has been captured."""


def _captured(monkeypatch, argv):
    """The benchmark and settings that `manifold-ext compare ARGV` would run."""
    seen = {}

    def capture(bench, settings, *a, **k):
        seen.update(bench=bench, settings=settings)
        raise _Stop

    monkeypatch.setattr(C, "compare", capture)
    with pytest.raises(_Stop):
        main(["compare", "--no-plot", "--quiet", *argv])
    return seen["bench"], seen["settings"]


@pytest.mark.parametrize("data,config", [("tokens.pt", "cands.toml"), ("tokens.npz", "lm.toml")])
def test_token_file_formats_and_explicit_loss(data, config, lm, files, monkeypatch):
    _, tokens, _ = lm
    d = files
    bench, settings = _captured(monkeypatch, ["--base", str(d / "model.pt"), "--arch", "_models:bigram_lm",
                                              "--data", str(d / data), "--config", str(d / config)])
    want = task_from_tokens(tokens, name="custom tokens")
    assert settings.loss == "lm" and bench.task.name == "custom tokens"
    assert torch.equal(bench.task.x_train, want.x_train) and torch.equal(bench.task.y_test, want.y_test)


# ----------------------------------------------------------------------------- errors


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("something was trained before the checks failed")

    monkeypatch.setattr(C, "train", boom)


BASE = ["--base", "{d}/model.pt", "--arch", "_models:bigram_lm"]


@pytest.mark.parametrize("argv,pattern", [
    (["--data", "{d}/tokens.npz", "--config", "{d}/cands.toml"],
     r"--data .*tokens\.npz: a token file \(language modelling\) needs --base PATH, your trained language model "
     r"\(the built-in one, --model gpt2, learns the built-in python text\)$"),
    (BASE + ["--data", "{d}/big.npz", "--config", "{d}/cands.toml"],
     r"--data .*big\.npz: the token ids lie in \[\d+, 300\], but the base's embedding has 256 entries "
     r"\(expected ids in \[0, 256\)\)$"),
    (BASE + ["--data", "{d}/tokens.npz", "--config", "{d}/nll.toml"],
     r"--config: settings: loss must be one of \['cross_entropy', 'lm'\] .*got 'nll'$"),
    (BASE + ["--data", "{d}/tokens.npz", "--config", "{d}/ce.toml"],
     r"--config .*ce\.toml: loss = 'cross_entropy' does not fit --data .*tokens\.npz, a token file"),
    (BASE + ["--data", "{d}/xy.npz", "--config", "{d}/lm.toml"],
     r"--config .*lm\.toml: loss 'lm' \(a language model\) needs token sequences: --data FILE holding them"),
    (["--config", "{d}/lm.toml"],
     r"--config .*lm\.toml: loss 'lm' \(a language model\) needs token sequences: --data FILE holding them"),
])
def test_cli_errors_are_one_line_and_come_before_any_training(argv, pattern, files, monkeypatch, capsys):
    _no_training(monkeypatch)
    _one_line_error(capsys, [a.format(d=files) for a in argv], pattern)


def test_api_errors(lm, tmp_path, monkeypatch):
    model, tokens, task = lm
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"settings: loss must be one of \['cross_entropy', 'lm'\] .*got 'nll'"):
        C.Settings(loss="nll")
    with pytest.raises(ValueError, match=r"estimator_options \['radius'\] set loss; set loss at the top level"):
        C.Settings(loss="lm", estimator_options={"radius": {"loss": "lm"}})
    settings = C.Settings(loss="lm", **SETTINGS)
    big = tokens.copy()
    big[0, 5] = 300
    bench = Benchmark("bigram", task_from_tokens(big, name="big"), candidates=CANDIDATES)
    with pytest.raises(ValueError, match=r"the token ids lie in \[\d+, 300\], but the base's embedding has 256 entries"):
        C.compare(bench, settings, tmp_path / "a", base=model, quiet=True)
    # A vocabulary the embedding takes but the output layer does not predict.
    wide_emb = bigram_lm(vocab=V)
    wide_emb.emb = torch.nn.Embedding(301, 16)
    with pytest.raises(ValueError, match=r"the target token ids lie in \[\d+, 300\], but the base predicts a "
                                         r"vocabulary of 256 \(expected ids in \[0, 256\)\)"):
        C.compare(bench, settings, tmp_path / "b", base=wide_emb, quiet=True)
    # A classifier (pooled logits (N, classes)) is not a language model.
    from _models import TinyTransformer

    clf = TinyTransformer(vocab=V, length=T)
    with pytest.raises(ValueError, match=r"a language model \(loss 'lm'\) must output logits of shape \(N, T, vocab\); "
                                         r"on inputs of shape \(8, 32\) it output \(8, 5\)"):
        C.compare(Benchmark("clf", task, candidates=[Candidate("control")]), settings, tmp_path / "c", base=clf,
                  quiet=True)
    # Token sequences as targets are not class labels: classification data under loss="lm".
    labels = Benchmark("labels", Task("l", task.x_train, task.y_train[:, 0], task.x_test, task.y_test[:, 0]),
                       candidates=CANDIDATES)
    with pytest.raises(ValueError, match=r"a language model \(loss 'lm'\) takes token sequences: .*the training split "
                                         r"has inputs \(180, 32\) \(torch.int64\) and targets \(180,\)"):
        C.compare(labels, settings, tmp_path / "d", base=model, quiet=True)
    assert not (tmp_path / "a").exists()
