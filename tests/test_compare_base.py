"""compare on a user's own trained base: --base/--arch, Hugging Face directories, the checks made
before any training, the base's accuracy and chance level, the warnings, and --data's
standardisation."""

import copy
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from manifold_ext import builtin, compare as C
from manifold_ext.builtin import Benchmark, Candidate, task_from_arrays
from manifold_ext.cli import main
from manifold_ext.cli._load import build_model
from manifold_ext.expand import Deepen, Widen

SETTINGS = """
seeds = 2
adapt_epochs = 1
finetune_epochs = 2
probe_examples = 64
n_boot = 50
estimators = ["radius"]
baselines = ["parameters", "loss"]

[estimator_options.radius]
directions = 3
grid = [0.001, 10.0, 6]
bisect = 3
"""

CANDIDATES = """
[[candidates]]
name = "wide"
specs = [{type = "widen", target = "0", factor = 2, init = "net2net"}]

[[candidates]]
name = "deep"
specs = [{type = "deepen", after = "1", init = "identity"}]
"""

API_SETTINGS = dict(seeds=2, adapt_epochs=1, finetune_epochs=2, probe_examples=64, n_boot=50,
                    estimators=("radius",), baselines=("parameters", "loss"),
                    estimator_options={"radius": {"directions": 3, "grid": (1e-3, 10.0, 6), "bisect": 3}})


def _trained(model, epochs=2):
    t = builtin.digits()
    C.train(model, t.x_train, t.y_train, epochs=epochs, lr=1e-3, batch_size=64, seed=0)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    model = _trained(build_model("mlp:64-32-10"))
    torch.save(model.state_dict(), d / "ckpt.pt")
    torch.save(model, d / "whole.pt")
    (d / "cands.toml").write_text(SETTINGS + CANDIDATES)
    (d / "settings.toml").write_text(SETTINGS)
    (d / "bad_target.toml").write_text(SETTINGS + CANDIDATES.replace('target = "0"', 'target = "fc9"'))
    g = np.random.default_rng(0)
    X = g.normal(size=(100, 20)).astype(np.float32)
    np.savez(d / "d20.npz", X=X, y=(X[:, 0] > 0).astype(np.int64))
    X = g.normal(size=(100, 64)).astype(np.float32)
    np.savez(d / "y12.npz", X=X, y=np.arange(100) % 12)
    return d, model


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("something was trained before the checks failed")

    monkeypatch.setattr(C, "train", boom)


def _one_line_error(capsys, argv, pattern):
    assert main(["compare", "--no-plot", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("manifold-ext compare: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("arch", ["mlp:64-32-10", "_models:mlp"])
def test_cli_state_dict_base_is_grown_not_retrained(arch, files, tmp_path, capsys):
    d, model = files
    ckpt = d / "ckpt.pt"
    if arch == "_models:mlp":  # the factory of tests/_models.py: an MLP 64-32-24-10
        from _models import mlp

        model = _trained(mlp())
        ckpt = tmp_path / "factory.pt"
        torch.save(model.state_dict(), ckpt)
    out = tmp_path / "run"
    from manifold_ext.cli._args import have_matplotlib

    plot = arch == "mlp:64-32-10" and have_matplotlib()  # the figures start from the given base
    assert main(["compare", "--base", str(ckpt), "--arch", arch, "--config", str(d / "cands.toml"),
                 "--out", str(out), "--plot" if plot else "--no-plot"]) == 0
    if plot:
        assert (out / "paths.png").stat().st_size > 0
        assert not (out / "simplex_slice.png").exists()  # drawn only when the run measures simplex
    printed = capsys.readouterr().out
    t = builtin.digits()
    acc, loss = C.accuracy(model, t.x_test, t.y_test), C.mean_loss(model, t.x_test, t.y_test)
    chance = C.chance_accuracy(t)
    assert f"base: test accuracy {100 * acc:.1f}% (chance {100 * chance:.1f}%), test loss {loss:.3g}" in printed
    assert printed.index("base: test accuracy") < printed.index("Ranking by manifold size")
    res = json.loads((out / "results.json").read_text())
    saved = torch.load(ckpt, weights_only=True)
    for seed, b in enumerate(res["bases"]):
        # The base as saved: never trained (its accuracy and its copy in OUT are the checkpoint's).
        assert b["test_accuracy"] == acc and b["test_loss"] == pytest.approx(loss)
        assert b["chance_accuracy"] == chance
        copy_in_out = torch.load(out / "bases" / f"seed{seed}.pt", weights_only=True)
        assert copy_in_out.keys() == saved.keys()
        assert all(torch.equal(copy_in_out[k], saved[k]) for k in saved)
    assert res["base_fingerprint"] == C.fingerprint(model)
    assert json.loads((out / "config.json").read_text())["base"] == C.fingerprint(model)
    assert {u["candidate"] for u in res["units"]} == {"control", "wide", "deep"}
    assert set(res["signal"]) == {"friedman_p", "friedman_min_p", "candidate_spread", "seed_spread"}
    assert isinstance(res["warnings"], list)


def test_python_api_named_sequential_base_resume_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    net = _trained(nn.Sequential(OrderedDict(fc1=nn.Linear(64, 16), act1=nn.ReLU(), fc2=nn.Linear(16, 10))))
    before = copy.deepcopy(net.state_dict())
    bench = Benchmark("mine", builtin.digits(), candidates=[
        Candidate("control"), Candidate("wide", (Widen("fc1", factor=2),)),
        Candidate("deep", (Deepen(after="act1"),))])
    settings = C.Settings(**API_SETTINGS)
    result = C.compare(bench, settings, tmp_path / "run", base=net, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the base is untouched
    t = builtin.digits()
    assert [b["test_accuracy"] for b in result.bases] == [C.accuracy(net, t.x_test, t.y_test)] * 2
    assert {u["parameters"] for u in result.units} == {1210, 64 * 32 + 32 + 32 * 10 + 10, 1210 + 16 * 17}
    assert all(u["preservation_error"] < 1e-5 for u in result.units)
    # Resuming: the same base recomputes nothing; another base or none is refused.
    again = C.compare(bench, settings, tmp_path / "run", base=copy.deepcopy(net), resume=True, quiet=True)
    assert again.units == result.units
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.fc1.bias[0] += 1
    assert C.fingerprint(other) != C.fingerprint(net) == C.fingerprint(copy.deepcopy(net))
    with pytest.raises(ValueError, match=r"cannot resume .*: it was run from another base \(its base: sha256:"):
        C.compare(bench, settings, tmp_path / "run", base=other, resume=True, quiet=True)
    with pytest.raises(ValueError, match="the benchmark has no make_base; pass your trained model as base="):
        C.compare(bench, settings, tmp_path / "run2", quiet=True)


# ----------------------------------------------------------------------------- warnings


def test_a_base_at_chance_is_flagged(files, tmp_path, capsys):
    d, _ = files
    model = build_model("mlp:64-32-10")
    with torch.no_grad():  # constant logits: always class 0
        model[2].weight.zero_()
        model[2].bias.zero_()
    torch.save(model.state_dict(), tmp_path / "chance.pt")
    out = tmp_path / "run"
    assert main(["compare", "--base", str(tmp_path / "chance.pt"), "--arch", "mlp:64-32-10",
                 "--config", str(d / "cands.toml"), "--out", str(out), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    t = builtin.digits()
    acc, chance = (t.y_test == 0).double().mean().item(), C.chance_accuracy(t)
    warning = (f"the base is at chance level (test accuracy {100 * acc:.1f}% vs chance {100 * chance:.1f}%): "
               f"the gains below measure noise, not expansion")
    assert f"warning: {warning}" in printed
    assert warning in json.loads((out / "results.json").read_text())["warnings"]


def test_identical_candidates_carry_no_signal(files, tmp_path):
    _, model = files
    bench = Benchmark("same", builtin.digits(), candidates=[
        Candidate("control"), Candidate("control again"), Candidate("control once more")])
    result = C.compare(bench, C.Settings(**API_SETTINGS), tmp_path / "run", base=model, quiet=True)
    assert result.signal["friedman_p"] == 1.0 and result.signal["candidate_spread"] == 0.0
    assert result.signal["seed_spread"] >= 0.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["signal"] == result.signal
    assert any(w.startswith("the candidates' gains do not differ beyond the seed spread (Friedman p = 1): "
                            "no ranking conclusion can be drawn") for w in saved["warnings"])


def test_gain_signal_detects_a_consistent_ranking():
    from manifold_ext.stats import gain_signal

    consistent = [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 5, 4], [1, 0, 2, 3, 4, 5]]
    s = gain_signal(consistent)
    assert s["friedman_p"] < 0.05 and s["candidate_spread"] == pytest.approx(14 / 3 - 1 / 3)
    assert gain_signal([[1, 2, 3], [1, 2, 3]])["friedman_min_p"] > 0.05  # 2 seeds, 3 candidates: never
    assert gain_signal([[1, 2]])["friedman_p"] is None


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d / "model")
    g = np.random.default_rng(0)
    X = g.integers(1, 30, size=(60, 8))
    np.savez(d / "tok.npz", X=X, y=X[:, 0] % 3)
    np.savez(d / "tok_big.npz", X=X + 10, y=X[:, 0] % 3)
    (d / "hf.toml").write_text(SETTINGS + '[[candidates]]\nname = "ff wide"\nspecs = [{type = "widen", '
                               'target = "bert.encoder.layer.0.intermediate.dense", factor = 2}]\n')
    return d


def test_hugging_face_directory_loads_and_its_data_fit(hf_dir, monkeypatch, capsys):
    """The directory loads (BertForSequenceClassification, from safetensors) and the token data
    pass the checks; expand has no growth operator for it yet, so the run stops, before any
    training, on the candidate, naming its target."""
    _no_training(monkeypatch)
    d = hf_dir
    _one_line_error(capsys, ["--base", str(d / "model"), "--config", str(d / "hf.toml"), "--data", str(d / "tok.npz")],
                    r"--config .*hf\.toml: candidate 'ff wide', Widen target "
                    r"'bert\.encoder\.layer\.0\.intermediate\.dense': expand: model must be an nn\.Sequential .*"
                    r"got BertForSequenceClassification")
    _one_line_error(capsys, ["--base", str(d / "model"), "--config", str(d / "hf.toml"), "--data", str(d / "tok_big.npz")],
                    r"--data .*tok_big\.npz: the token ids lie in \[11, 39\], but the base's embedding has 30 "
                    r"entries \(expected ids in \[0, 30\)\)")
    _one_line_error(capsys, ["--base", str(d / "model"), "--config", str(d / "hf.toml")],
                    r"--data: required: the base takes integer token ids of shape \(N, T\) in \[0, 30\), "
                    r"not the built-in digits")
    _one_line_error(capsys, ["--base", str(d / "model"), "--arch", "mlp:64-10", "--config", str(d / "hf.toml")],
                    r"--arch: not used with a Hugging Face directory \(.* names its architecture in config\.json\)")


def test_hugging_face_logits_are_read_from_model_outputs(hf_dir):
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(hf_dir / "model")
    data = np.load(hf_dir / "tok.npz")
    task = task_from_arrays(data["X"], data["y"])
    C.check_data(model, task)
    acc = C.accuracy(model, task.x_test, task.y_test)
    want = (model(task.x_test).logits.argmax(-1) == task.y_test).double().mean().item()
    assert acc == want and C.mean_loss(model, task.x_test, task.y_test) > 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv,pattern", [
    (["--base", "{d}/ckpt.pt", "--config", "{d}/cands.toml"],
     r"--base .*ckpt\.pt holds a state dict, which has no architecture: give it with --arch \(e\.g\. --arch "
     r"mlp:64-32-10"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-16-10", "--config", "{d}/cands.toml"],
     r"--base .*ckpt\.pt does not match --arch mlp:64-16-10: parameter '0\.weight' has shape \(32, 64\)"),
    (["--base", "{d}/ckpt.pt", "--arch", "no_such_module_xyz:build", "--config", "{d}/cands.toml"],
     r"--arch 'no_such_module_xyz:build': no module named 'no_such_module_xyz' \(it must be importable"),
    (["--base", "{d}/ckpt.pt", "--arch", "_models:no_such_factory", "--config", "{d}/cands.toml"],
     r"--arch '_models:no_such_factory': module '_models' has no attribute 'no_such_factory'"),
    (["--base", "{d}/ckpt.pt", "--arch", "os:getcwd", "--config", "{d}/cands.toml"],
     r"--arch 'os:getcwd': getcwd\(\) returned a str, expected an nn\.Module \(the untrained architecture\)"),
    (["--base", "{d}/ckpt.pt", "--arch", "_models:randomise_bn", "--config", "{d}/cands.toml"],
     r"--arch '_models:randomise_bn': calling randomise_bn\(\) failed \(TypeError: .*\); the factory must take "
     r"no arguments"),
    (["--base", "{d}/whole.pt", "--config", "{d}/cands.toml"],
     r"--base .*whole\.pt: holds pickled Python objects, not just tensors .*--allow-pickle"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10"],
     r"--base needs --config FILE listing \[\[candidates\]\], their specs naming the base's module paths"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10", "--config", "{d}/settings.toml"],
     r"--config .*settings\.toml lists no \[\[candidates\]\] expansion; with --base they are required.*the "
     r"built-in candidates target the built-in architectures"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10", "--config", "{d}/bad_target.toml"],
     r"--config .*bad_target\.toml: candidate 'wide', Widen target 'fc9': Widen\.target='fc9' matches no "
     r"module; the model's paths are \['0', '1', '2'\]"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10", "--config", "{d}/cands.toml", "--data", "{d}/d20.npz"],
     r"--data .*d20\.npz: the data do not fit the base: a forward pass on inputs of shape \(8, 20\) .*raised "
     r"RuntimeError: .*; the base takes inputs of shape \(N, 64\)"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10", "--config", "{d}/cands.toml", "--data", "{d}/y12.npz"],
     r"--data .*y12\.npz: the labels lie in \[0, 11\], but the base has 10 outputs \(expected labels in "
     r"\[0, 10\)\)$"),
    (["--base", "{d}/nothing.pt", "--config", "{d}/cands.toml"], r"--base .*nothing\.pt: no such file or directory"),
    (["--base", "{d}/ckpt.pt", "--arch", "mlp:64-32-10", "--model", "mlp", "--config", "{d}/cands.toml"],
     r"--model chooses a built-in base; with --base, give the base's architecture with --arch"),
    (["--arch", "mlp:64-32-10"], r"--arch: only used with --base"),
    (["--config", "{d}/bad_target.toml"],  # the built-in base's candidates are checked alike
     r"--config .*bad_target\.toml: candidate 'wide', Widen target 'fc9': Widen\.target='fc9' matches no module"),
])
def test_errors_are_one_line_and_come_before_any_training(argv, pattern, files, monkeypatch, capsys):
    d, _ = files
    _no_training(monkeypatch)
    _one_line_error(capsys, [a.format(d=d) for a in argv], pattern)


# ----------------------------------------------------------------------------- --data standardisation


class _Stop(Exception):
    """Raised by a patched step to stop a run once what the test inspects has been captured."""


def _task_of(monkeypatch, argv):
    """The task that `manifold-ext compare ARGV` would run on."""
    seen = {}

    def capture(bench, *a, **k):
        seen["task"] = bench.task
        raise _Stop

    monkeypatch.setattr(C, "compare", capture)
    with pytest.raises(_Stop):
        main(["compare", "--no-plot", "--quiet", *argv])
    return seen["task"]


def test_data_features_are_standardised_by_default(tmp_path, monkeypatch, files):
    g = np.random.default_rng(1)
    X = (5 + 3 * g.normal(size=(200, 6))).astype(np.float32)
    X[:, 5] = 7.0  # a constant feature: centred, not scaled
    y = (X[:, 0] > 5).astype(np.int64)
    np.savez(tmp_path / "f.npz", X=X, y=y)
    task = _task_of(monkeypatch, ["--data", str(tmp_path / "f.npz")])
    assert task.x_train[:, :5].mean(0).abs().max() < 1e-5
    assert (task.x_train[:, :5].std(0) - 1).abs().max() < 1e-5
    assert task.x_train[:, 5].abs().max() == 0 and task.name == "custom, standardised"
    raw = task_from_arrays(X, y, standardize=False)
    # The test split is standardised with the training split's statistics.
    mean, std = raw.x_train.double().mean(0), raw.x_train.double().std(0)
    std[5] = 1
    assert torch.allclose(task.x_test.double(), (raw.x_test.double() - mean) / std, atol=1e-5)
    plain = _task_of(monkeypatch, ["--data", str(tmp_path / "f.npz"), "--no-standardize"])
    assert torch.equal(plain.x_train, raw.x_train) and torch.equal(plain.x_test, raw.x_test)
    assert plain.name == "custom"
    # Integer features for the MLP are features too.
    np.savez(tmp_path / "i.npz", X=np.rint(X).astype(np.int64), y=y)
    assert _task_of(monkeypatch, ["--data", str(tmp_path / "i.npz")]).x_train[:, 0].std() == pytest.approx(1, abs=1e-4)
    # A given base takes the data as they are unless asked.
    d, _ = files
    np.savez(tmp_path / "f64.npz", X=np.repeat(X, 11, axis=1)[:, :64], y=y)
    base = ["--base", str(d / "ckpt.pt"), "--arch", "mlp:64-32-10", "--config", str(d / "cands.toml"),
            "--data", str(tmp_path / "f64.npz")]
    assert _task_of(monkeypatch, base).x_train.mean() > 4
    assert _task_of(monkeypatch, base + ["--standardize"]).x_train[:, :5].mean(0).abs().max() < 1e-5


def test_token_data_are_never_standardised(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    X = g.integers(0, 23, size=(100, 2))  # the TinyTransformer with your own token data
    np.savez(tmp_path / "t.npz", X=X, y=(X.sum(1) % 23))
    task = _task_of(monkeypatch, ["--model", "transformer", "--data", str(tmp_path / "t.npz"), "--standardize"])
    raw = task_from_arrays(X, X.sum(1) % 23)
    assert task.x_train.dtype == torch.int64 and torch.equal(task.x_train, raw.x_train)
    assert task.name == "custom"


def test_task_from_arrays_split_and_errors():
    X, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 3
    t = task_from_arrays(X, y, standardize=False)
    assert len(t.x_test) == 8 and len(t.x_train) == 12  # ceil(0.4 * 20) for testing
    assert sorted(torch.cat([t.x_train, t.x_test])[:, 0].tolist()) == X[:, 0].tolist()
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    with pytest.raises(ValueError, match=r"expected X of shape \(N, \.\.\.\) and y of shape \(N,\)"):
        task_from_arrays(X[:, 0], y)
    with pytest.raises(ValueError, match=r"y must hold class indices \(non-negative integers\)"):
        task_from_arrays(X, -y)
    with pytest.raises(ValueError, match="expected at least 10 examples, got 5"):
        task_from_arrays(X[:5], y[:5])
    with pytest.raises(ValueError, match="token ids must be integers, got X of dtype torch.float32"):
        task_from_arrays(X, y, tokens=True)


def test_huge_sparse_labels_are_refused_before_building_the_model(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(30, 64)).astype(np.float32)
    y = np.zeros(30, np.int64)
    y[0] = 10 ** 9
    np.savez(tmp_path / "big.npz", X=X, y=y)
    assert main(["compare", "--data", str(tmp_path / "big.npz"), "--no-plot", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "manifold-ext compare: error: --data: the labels run up to 1000000000, but only 2 distinct values occur; "
        "the built-in mlp gets one output per class index 0..1000000000: relabel y to 0..1\n")
