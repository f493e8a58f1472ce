"""The `manifold-ext probe`, `expand` and `bench` subcommands: what they write (checked against the
Python API) and the one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from manifold_ext import models, probes
from manifold_ext.cli import bench, main
from manifold_ext.cli._load import load_checkpoint
from manifold_ext.expand import Deepen, ExpansionReport, Widen, expand

from _cli import error as _error, run as _run

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _assert_close(a, b, path="result"):
    """Nested JSON values equal, floats to 1e-6 relative (NaN equals NaN): the default engine
    times both engines and may evaluate a point by either, which agree to float32 rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_close(u, v, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _mlp(seed, widths=(64, 8, 10)):
    torch.manual_seed(seed)
    return models.mlp(widths).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three MLPs 64-8-10 saved whole and as state dicts, one of another width, small data."""
    d = tmp_path_factory.mktemp("ckpt")
    f = {}
    for i in range(3):
        m = _mlp(i)
        torch.save(m, d / f"m{i}.pt")
        torch.save(m.state_dict(), d / f"sd{i}.pt")
        f[f"m{i}"], f[f"sd{i}"] = d / f"m{i}.pt", d / f"sd{i}.pt"
    torch.save({"model": _mlp(0)}, d / "wrapped.pt")
    torch.save(_mlp(5, (64, 6, 10)), d / "other.pt")
    (d / "corrupt.pt").write_text("not a checkpoint\n")
    torch.save({"weights": [1, 2]}, d / "junk.pt")
    g = np.random.default_rng(0)
    x = g.standard_normal((40, 64)).astype(np.float32)
    y = g.integers(0, 10, 40)
    np.savez(d / "data.npz", X=x, y=y)
    np.savez(d / "rows.npz", X=x, y=y[:30])
    np.savez(d / "features.npz", X=x[:, :10], y=y)
    np.savez(d / "nokeys.npz", inputs=x, labels=y)
    np.savez(d / "floaty.npz", X=x, y=y.astype(np.float32))
    np.savez(d / "classes.npz", X=x, y=y + 10)
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), d / "data.pt")
    (d / "data.csv").write_text("1,2\n")
    for name in ("wrapped.pt", "other.pt", "corrupt.pt", "junk.pt", "data.npz", "rows.npz", "features.npz",
                 "nokeys.npz", "floaty.npz", "classes.npz"):
        f[name.split(".")[0]] = d / name
    f["data_pt"], f["csv"] = d / "data.pt", d / "data.csv"
    f["xy"] = (torch.from_numpy(x), torch.from_numpy(y).long())
    return f


# ----------------------------------------------------------------------------- probe


def _api_probe(kind, f, steps, seed=0):
    ms = [torch.load(f[f"m{i}"], weights_only=False) for i in range(3)]
    if kind == "line":
        return probes.linear_path(ms[0], ms[1], f["xy"], steps=steps)
    if kind == "barrier":
        return probes.barrier(ms[0], ms[1], f["xy"], steps=steps)
    if kind == "plane":
        return probes.plane(ms[0], f["xy"], grid=(-1.0, 1.0, steps), seed=seed)
    return probes.simplex_losses(ms, f["xy"], n=steps, seed=seed)


@pytest.mark.parametrize("kind, names, steps", [
    ("line", ["m0", "m1"], 5),
    ("barrier", ["m0", "m1"], 5),
    ("plane", ["m0"], 4),
    ("simplex", ["m0", "m1", "m2"], 16),
])
def test_probe_json_matches_api(kind, names, steps, files, tmp_path, capsys):
    code, out, err = _run(capsys, "probe", kind, *[files[n] for n in names], "--data", files["data"],
                          "--steps", steps, "--seed", 3, "--out", tmp_path, "--no-plot", "--quiet", "--allow-pickle")
    assert (code, out, err) == (0, "", "")
    written = json.loads((tmp_path / f"{kind}.json").read_text())
    expected = json.loads(_api_probe(kind, files, steps, seed=3).to_json())
    assert written["type"] == expected["type"]
    _assert_close(_strip_seconds(written), _strip_seconds(expected))
    assert not (tmp_path / f"{kind}.png").exists()


def test_probe_state_dicts_and_data_pt_give_the_same(files, tmp_path, capsys):
    """State dicts + --model, a {'model': module} dict and a (X, y) .pt file: the same line."""
    code, _, _ = _run(capsys, "probe", "line", files["sd0"], files["sd1"], "--model", "mlp:64-8-10",
                      "--data", files["data_pt"], "--steps", 5, "--out", tmp_path / "a", "--no-plot")
    assert code == 0
    code, _, _ = _run(capsys, "probe", "line", files["wrapped"], files["m1"], "--data", files["data"],
                      "--steps", 5, "--out", tmp_path / "b", "--no-plot", "--allow-pickle")
    assert code == 0
    a = json.loads((tmp_path / "a" / "line.json").read_text())
    b = json.loads((tmp_path / "b" / "line.json").read_text())
    expected = json.loads(_api_probe("line", files, 5).to_json())
    _assert_close(_strip_seconds(a), _strip_seconds(expected))
    _assert_close(_strip_seconds(b), _strip_seconds(expected))


def test_probe_barrier_summary_and_plot(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, _ = _run(capsys, "probe", "barrier", files["m0"], files["m1"], "--data", files["data"],
                        "--steps", 3, "--out", tmp_path, "--plot", "--allow-pickle")
    assert code == 0
    result = json.loads((tmp_path / "barrier.json").read_text())
    assert f"loss barrier {result['barrier_loss']:.4g} at t={result['t_max']:.3f}" in out
    assert f"wrote {tmp_path / 'barrier.json'}, {tmp_path / 'barrier.png'}" in out
    assert (tmp_path / "barrier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_digits_default_and_conv_reshape(tmp_path, capsys):
    """No --data: the digits test split, flat for an MLP and (N, 1, 8, 8) for a ResNetCNN."""
    torch.manual_seed(0)
    torch.save(models.ResNetCNN(widths=(2, 2), blocks=(1, 1)), tmp_path / "res.pt")
    code, out, _ = _run(capsys, "probe", "plane", tmp_path / "res.pt", "--steps", 2, "--out", tmp_path,
                        "--no-plot", "--allow-pickle")
    assert code == 0
    assert "digits (719 examples)" in out
    result = json.loads((tmp_path / "plane.json").read_text())
    assert len(result["loss"]) == 2 and all(math.isfinite(v) for row in result["loss"] for v in row)


# ----------------------------------------------------------------------------- probe errors


@pytest.mark.parametrize("argv, message", [
    (["cube", "{m0}"], "KIND must be one of line, barrier, plane, simplex, got 'cube'"),
    (["line", "{m0}"], "CHECKPOINT: line needs exactly 2 checkpoints (the ends of the segment, t=0 and t=1), got 1"),
    (["barrier", "{m0}", "{m1}", "{m2}"], "CHECKPOINT: barrier needs exactly 2 checkpoints"),
    (["plane", "{m0}", "{m1}"], "CHECKPOINT: plane needs exactly 1 checkpoint (the centre of the plane), got 2"),
    (["simplex", "{m0}"], "CHECKPOINT: simplex needs at least 2 checkpoints (the vertices of the simplex), got 1"),
    (["line", "{dir}/missing.pt", "{m1}"], "CHECKPOINT {dir}/missing.pt: no such file"),
    (["line", "{corrupt}", "{m1}"], "CHECKPOINT {corrupt}: torch.load cannot read it (UnpicklingError: "),
    (["plane", "{junk}"], "CHECKPOINT {junk}: expected a state dict (a dict of tensors), a file written by "
                          "'manifold-ext expand', or with --allow-pickle an nn.Module or a dict "
                          "{{'model': nn.Module}}, got a dict with keys ['weights']"),
    (["line", "{sd0}", "{sd1}"], "CHECKPOINT {sd0} holds a state dict, which has no architecture: give it with "
                                 "--model"),
    (["line", "{m0}", "{other}"], "CHECKPOINT: {m0} and {other} are of different architectures: parameter "
                                  "'0.weight' has shape (6, 64) in {other} but (8, 64) in {m0}"),
    (["plane", "{sd0}", "--model", "mlp:64-6-10"], "CHECKPOINT {sd0} does not match --model mlp:64-6-10: parameter "
                                                   "'0.weight' has shape (8, 64) in {sd0} but (6, 64) in --model"),
    (["plane", "{m0}", "--model", "mlp:64-6-10"], "CHECKPOINT {m0} does not match --model mlp:64-6-10"),
    (["plane", "{sd0}", "--model", "vgg:16"], "--model 'vgg:16': unknown architecture 'vgg'; expected mlp:"),
    (["plane", "{sd0}", "--model", "mlp:64-x-10"], "--model 'mlp:64-x-10': widths must be integers joined by '-'"),
    (["plane", "{sd0}", "--model", "mlp:64-8-10,act=swish"], "act must be one of relu, gelu, tanh, silu, identity, "
                                                             "got 'swish'"),
    (["plane", "{sd0}", "--model", "transformer:vocab=5"], "transformer needs length=, width=, heads=, classes="),
    (["plane", "{m0}", "--data", "{rows}"], "--data {rows}: X has 40 rows but y has 30; expected one label per row"),
    (["plane", "{m0}", "--data", "{features}"], "--data {features}: X of shape (40, 10) does not fit the model: "
                                                "it takes inputs of shape (N, 64) (RuntimeError: "),
    (["plane", "{m0}", "--data", "{nokeys}"], "--data {nokeys}: expected arrays X and y, got arrays ['inputs', "
                                              "'labels']"),
    (["plane", "{m0}", "--data", "{floaty}"], "--data {floaty}: y must hold integer class labels, got dtype "
                                              "torch.float32"),
    (["plane", "{m0}", "--data", "{classes}"], "--data {classes}: y holds labels in [10, 19], but the model has 10 "
                                               "outputs (expected labels in [0, 10))"),
    (["plane", "{m0}", "--data", "{csv}"], "--data: expected 'digits', FILE.npz or FILE.pt, got '{csv}'"),
    (["plane", "{m0}", "--data", "{corrupt}"], "--data {corrupt}: torch.load cannot read it"),
    (["barrier", "{m0}", "{m1}", "--steps", "2"], "--steps: barrier needs at least 3 grid points, got 2"),
])
def test_probe_errors(argv, message, files, tmp_path, capsys):
    fmt = {k: v for k, v in files.items() if isinstance(v, Path)}
    fmt["dir"] = files["m0"].parent
    argv = [a.format(**fmt) for a in argv]
    msg = _error(capsys, "probe", *argv, "--out", tmp_path, "--no-plot", "--allow-pickle")
    assert message.format(**fmt) in msg
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # attention under vmap on the CPU
def test_probe_transformer_state_dict_with_model_spec(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.TinyTransformer(13, 6, 8, 2, 5).eval()
    torch.save(model.state_dict(), tmp_path / "t.pt")
    x, y = torch.randint(0, 13, (8, 6)), torch.randint(0, 5, (8,))
    torch.save({"X": x, "y": y}, tmp_path / "ids.pt")
    code, _, err = _run(capsys, "probe", "plane", tmp_path / "t.pt", "--model",
                        "transformer:vocab=13,length=6,width=8,heads=2,classes=5", "--data", tmp_path / "ids.pt",
                        "--steps", 2, "--out", tmp_path, "--no-plot", "--quiet")
    assert code == 0, err
    written = json.loads((tmp_path / "plane.json").read_text())
    expected = json.loads(probes.plane(model, (x, y), grid=(-1.0, 1.0, 2)).to_json())
    _assert_close(_strip_seconds(written), _strip_seconds(expected))


def test_probe_token_data_errors(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(models.TinyTransformer(13, 6, 8, 2, 5), tmp_path / "t.pt")
    torch.save({"X": torch.randint(0, 20, (8, 6)), "y": torch.zeros(8, dtype=torch.long)}, tmp_path / "ids.pt")
    msg = _error(capsys, "probe", "plane", tmp_path / "t.pt", "--no-plot", "--out", tmp_path, "--allow-pickle")
    assert msg.startswith("--data digits: the built-in digits are 8x8 images, but the model takes integer token "
                          "ids of shape (N, T) in [0, 13), T <= 6")
    msg = _error(capsys, "probe", "plane", tmp_path / "t.pt", "--data", tmp_path / "ids.pt", "--no-plot",
                 "--allow-pickle")
    assert "got token ids in [0, 19]" in msg


def test_argparse_errors(files, tmp_path, capsys):
    for argv, message in [
        (["probe", "plane", files["m0"], "--steps", "1"], "argument --steps: must be >= 2, got 1"),
        (["expand", files["m0"], "--widen", "0", "--out", tmp_path / "g.pt", "--tolerance", "-1"],
         "argument --tolerance: must be a finite number >= 0, got -1"),
        (["bench", "ops", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as err:
            main([str(a) for a in argv])
        assert err.value.code == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- expand


def _load_grown(path):
    """The grown model (None when its base was a pickled module: no architecture saved) and
    the report of a file that `expand` wrote; it holds data only."""
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"state_dict", "report", "base_model", "specs"}
    model = load_checkpoint(path, None) if saved["base_model"] is not None else None
    return model, saved["report"]


def test_expand_preserving_saves_a_model_that_reloads(files, tmp_path, capsys):
    out = tmp_path / "grown.pt"
    code, stdout, err = _run(capsys, "expand", files["sd0"], "--model", "mlp:64-8-10", "--widen", "0:2",
                             "--deepen", "1:2", "--out", out)
    assert code == 0, err
    grown, report = _load_grown(out)
    assert json.loads(out.with_suffix(".json").read_text()) == report

    base = _mlp(0)
    api_grown, api_report = expand(base, Widen("0", factor=2.0), Deepen("1", count=2, init="identity"),
                                   generator=torch.Generator().manual_seed(0))
    assert report == api_report.to_dict()
    assert ExpansionReport.from_dict(report).preserving and report["preservation_error"] <= 1e-5
    assert report["params_before"] == sum(p.numel() for p in base.parameters())
    assert report["params_after"] == sum(p.numel() for p in grown.parameters())
    x = files["xy"][0]
    with torch.no_grad():
        torch.testing.assert_close(grown(x), base(x), atol=1e-5, rtol=0)
        assert torch.equal(grown(x), api_grown(x))
    assert f"parameters {report['params_before']:,} -> {report['params_after']:,}" in stdout
    assert "function-preserving: claimed" in stdout and ": ok" in stdout
    assert f"wrote {out}, {out.with_suffix('.json')}" in stdout

    # The grown model is a checkpoint like any other: probe it (no --model, no --allow-pickle).
    code, _, _ = _run(capsys, "probe", "plane", out, "--data", files["data"], "--steps", 2, "--out", tmp_path,
                      "--no-plot")
    assert code == 0


def test_expand_specs_in_order_state_dict_and_data(files, tmp_path, capsys):
    """--deepen before --widen stays in that order; a state dict with --model; checked on --data."""
    out = tmp_path / "g.pt"
    code, _, err = _run(capsys, "expand", files["sd1"], "--model", "mlp:64-8-10", "--deepen", "0",
                        "--widen", "0=12@zero", "--data", files["data"], "--seed", 4, "--out", out, "--quiet")
    assert code == 0, err
    _, report = _load_grown(out)
    assert [s["type"] for s in report["specs"]] == ["Deepen", "Widen"]
    assert report["specs"][1] == {"type": "Widen", "target": "0", "factor": None, "size": 12, "init": "zero",
                                  "noise": 0.0}
    assert report["check_inputs_shape"] == [40, 64]
    base = torch.load(files["m1"], weights_only=False)
    _, api_report = expand(base, Deepen("0"), Widen("0", size=12, init="zero"),
                           generator=torch.Generator().manual_seed(4), check_inputs=files["xy"][0])
    assert report == api_report.to_dict()


def test_expand_not_preserving_is_reported_not_checked(files, tmp_path, capsys):
    out = tmp_path / "g.pt"
    code, stdout, _ = _run(capsys, "expand", files["m0"], "--widen", "0@net2net+0.5", "--out", out, "--allow-pickle")
    assert code == 0
    _, report = _load_grown(out)
    assert report["preserving"] is False and report["preservation_error"] > 1e-3
    assert report["specs"][0]["noise"] == 0.5
    assert "function-preserving: no (not exact: widen 0)" in stdout and "(not checked)" in stdout


def test_expand_tolerance_exceeded(files, tmp_path, capsys):
    base = torch.load(files["m0"], weights_only=False)
    _, api_report = expand(base, Widen("0", factor=3.0), generator=torch.Generator().manual_seed(0))
    assert api_report.preserving and api_report.preservation_error > 0  # net2net splits round
    out = tmp_path / "g.pt"
    code, _, err = _run(capsys, "expand", files["m0"], "--widen", "0:3", "--out", out, "--tolerance", "0",
                        "--allow-pickle")
    assert code == 1
    assert ("the expansion claims to preserve the function, but max |grown(x) - base(x)| = "
            f"{api_report.preservation_error:.3g} > --tolerance 0") in err
    assert "nothing written" in err and not out.exists() and not out.with_suffix(".json").exists()


def test_expand_resnet_and_conv_sequential(tmp_path, capsys):
    """A ResNetCNN state dict with --model, deepened with the default init for a ResNetCNN (the
    preserving 'zero'); a conv Sequential, which expand has no default check inputs for, is
    checked on random 8x8 images."""
    torch.manual_seed(0)
    torch.save(models.ResNetCNN(widths=(2, 4)).state_dict(), tmp_path / "res.pt")
    code, _, err = _run(capsys, "expand", tmp_path / "res.pt", "--model", "resnet:2-4", "--deepen", "stages.0",
                        "--out", tmp_path / "r.pt")
    assert code == 0, err
    _, report = _load_grown(tmp_path / "r.pt")
    assert [c["init"] for c in report["changes"]] == ["zero"] and report["preserving"]

    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 64, 10))
    torch.save(cnn, tmp_path / "cnn.pt")
    code, _, err = _run(capsys, "expand", tmp_path / "cnn.pt", "--widen", "0", "--out", tmp_path / "c.pt",
                        "--allow-pickle")
    assert code == 0, err
    _, report = _load_grown(tmp_path / "c.pt")
    assert report["check_inputs_shape"] == [64, 1, 8, 8] and report["preservation_error"] <= 1e-5
    assert torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]["0.weight"].shape[0] == 6


def test_expand_check_inputs_for_other_sequentials(tmp_path, capsys):
    """A Sequential that starts with a Flatten is checked on random (N, in_features) inputs; one
    that starts with an Embedding has no random inputs: a preserving expansion fails unchecked."""
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)), tmp_path / "f.pt")
    code, _, err = _run(capsys, "expand", tmp_path / "f.pt", "--widen", "1", "--out", tmp_path / "g.pt",
                        "--allow-pickle")
    assert code == 0, err
    assert _load_grown(tmp_path / "g.pt")[1]["check_inputs_shape"] == [64, 64]

    torch.save(nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 10)),
               tmp_path / "e.pt")
    code, out, err = _run(capsys, "expand", tmp_path / "e.pt", "--widen", "2", "--out", tmp_path / "h.pt",
                          "--allow-pickle")
    assert code == 1
    assert "not measured (no check inputs for this model): FAILED" in out
    assert "there were no inputs to check it on (no default for this model): pass --data; nothing written" in err
    assert not (tmp_path / "h.pt").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "expected at least one --widen TARGET[:FACTOR|=SIZE][@INIT[+NOISE]] or --deepen AFTER[:COUNT]"),
    (["--widen", "0:x"], "--widen '0:x': FACTOR must be a number >= 1, got 'x' (expected "
                         "TARGET[:FACTOR|=SIZE][@INIT[+NOISE]]"),
    (["--widen", "0:0.5"], "--widen '0:0.5': FACTOR must be a number >= 1, got '0.5'"),
    (["--widen", "0=0"], "--widen '0=0': SIZE must be an integer >= 1, got '0'"),
    (["--widen", ":2"], "--widen ':2': TARGET is empty"),
    (["--widen", "0@copy"], "--widen '0@copy': INIT must be one of net2net, zero, random, got 'copy'"),
    (["--widen", "0@zero+-1"], "--widen '0@zero+-1': NOISE must be a number >= 0, got '-1'"),
    (["--deepen", "1:0"], "--deepen '1:0': COUNT must be an integer >= 1, got '0' (expected AFTER[:COUNT][@INIT"),
    (["--deepen", "1@net2net"], "--deepen '1@net2net': INIT must be one of identity, zero, random, copy, "
                                "got 'net2net'"),
    (["--deepen", "a=1"], "--deepen 'a=1': AFTER must be a module path or glob, without '='"),
    (["--widen", "7"], "Widen.target='7' matches no module; the model's paths are ['0', '1', '2']"),
    (["--widen", "1"], "Widen.target='1': module '1' is ReLU, expected nn.Linear or nn.Conv2d"),
    (["--deepen", "1@zero"], "init='zero' needs a residual block"),
    (["--widen", "0", "--data", "{features}"], "--data {features}: X of shape (40, 10) does not fit the model"),
    (["--widen", "0", "--model", "mlp:64-9-10"], "CHECKPOINT {m0} does not match --model mlp:64-9-10"),
])
def test_expand_errors(argv, message, files, tmp_path, capsys):
    fmt = {k: v for k, v in files.items() if isinstance(v, Path)}
    argv = [a.format(**fmt) for a in argv]
    msg = _error(capsys, "expand", files["m0"], *argv, "--out", tmp_path / "g.pt", "--allow-pickle")
    assert message.format(**fmt) in msg
    assert not list(tmp_path.iterdir())


def test_out_and_checkpoint_errors(files, tmp_path, capsys):
    msg = _error(capsys, "expand", files["m0"], "--widen", "0", "--out", tmp_path / "g.json")
    assert msg == (f"--out must name a .pt or .pth file (the report goes next to it as .json), "
                   f"got '{tmp_path / 'g.json'}'")
    msg = _error(capsys, "expand", files["sd0"], "--widen", "0", "--out", tmp_path / "g.pt")
    assert msg.startswith(f"CHECKPOINT {files['sd0']} holds a state dict, which has no architecture")
    msg = _error(capsys, "expand", tmp_path / "nope.pt", "--widen", "0", "--out", tmp_path / "g.pt")
    assert msg == f"CHECKPOINT {tmp_path / 'nope.pt'}: no such file"
    (tmp_path / "file").write_text("")
    msg = _error(capsys, "expand", files["m0"], "--widen", "0", "--out", tmp_path / "file" / "sub" / "g.pt")
    assert msg == f"--out {tmp_path / 'file' / 'sub' / 'g.pt'}: {tmp_path / 'file'} is a file, expected a directory"
    msg = _error(capsys, "probe", "plane", files["m0"], "--out", tmp_path / "file")
    assert msg == f"--out {tmp_path / 'file'}: is a file, expected a directory (for plane.json and plane.png)"


# ----------------------------------------------------------------------------- bench


def test_bench_list(capsys):
    code, out, _ = _run(capsys, "bench", "--list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["ops", "engine", "estimators", "expansion", "distributed"]
    assert all(len(line.split()) > 3 for line in lines)  # a description on each line


@pytest.mark.parametrize("argv, message", [
    (["fast"], "NAME must be one of ops, engine, estimators, expansion, distributed, got 'fast' (see --list)"),
    (["ops", "nope", "--list"], "got 'nope'"),
    (["estimators", "expansion", "--rounds", "3"], "--rounds applies to ops, engine, distributed only, got benchmarks "
                                                   "estimators, expansion"),
])
def test_bench_errors(argv, message, capsys):
    assert message in _error(capsys, "bench", *argv)


def test_bench_without_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "repo_root", lambda: tmp_path)
    msg = _error(capsys, "bench", "ops")
    assert msg.startswith(f"the benchmarks are not installed with the package: expected the repository's "
                          f"benchmarks/ directory at {tmp_path / 'benchmarks'}, found none")


def test_bench_runs_scripts_from_the_root(tmp_path, monkeypatch, capfd):
    """Stand-in scripts (the real ones take minutes): run as `python -m` from the root, --rounds
    passed on where it applies, a failing script gives exit status 1."""
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ratios.py").write_text("import os, sys\nprint('ops ran', sys.argv[1:], os.getcwd())\n")
    (pkg / "expansion_preservation.py").write_text("import sys\nprint('expansion ran', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(bench, "repo_root", lambda: tmp_path)
    assert main(["bench", "ops", "expansion", "--rounds", "2"]) == 1
    out, err = capfd.readouterr()
    assert f"ops ran ['--rounds', '2'] {tmp_path}" in out
    assert "expansion ran []" in out
    assert "--rounds does not apply to expansion" in err
    assert "manifold-ext bench: failed: expansion (exit status 3)" in err

    assert main(["bench", "engine"]) == 2  # its script is missing here
    assert "NAME engine: expected the script" in capfd.readouterr().err


def test_real_benchmarks_are_found():
    root = bench.repo_root()
    assert (root / "benchmarks" / "__init__.py").is_file()
    for module, _, _ in bench.BENCHMARKS.values():
        assert (root / (module.replace(".", "/") + ".py")).is_file(), module


# ----------------------------------------------------------------------------- python -m


def test_python_m_error_has_no_traceback_unless_debug(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
    argv = [sys.executable, "-m", "manifold_ext", "probe", "line", str(tmp_path / "missing.pt"), str(files["m1"])]
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert plain.returncode == 2
    assert plain.stderr == f"manifold-ext probe: error: CHECKPOINT {tmp_path / 'missing.pt'}: no such file\n"
    assert plain.stdout == ""
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "CommandError: CHECKPOINT" in debug.stderr


# ----------------------------------------------------------------------------- argparse edges


@pytest.mark.parametrize("argv,want", [
    (["compare", "--seed", "1"], "manifold-ext compare: error: unrecognized arguments: --seed 1; did you mean --seeds?"),
    (["compare", "--quik"], "manifold-ext compare: error: unrecognized arguments: --quik; did you mean --quick?"),
    (["info", "--zzzzzz"], "manifold-ext info: error: unrecognized arguments: --zzzzzz"),
])
def test_unknown_options_never_abbreviate_and_suggest(argv, want, capsys):
    from manifold_ext.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == want


def test_ctrl_c_in_compare_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    from manifold_ext import compare as C
    from manifold_ext.cli import main as cli_main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "compare", interrupted)
    assert cli_main(["compare", "--quick", "--no-plot", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == ("manifold-ext compare: interrupted; finished work is kept: run the same command with --out DIR "
                   "--resume (DIR: the output directory it printed) to continue\n")


def test_closed_pipe_is_quiet():
    """``manifold-ext info | true``: the reader has gone before the output is written."""
    r = subprocess.run(f"'{sys.executable}' -m manifold_ext info | true; echo ${{PIPESTATUS[0]}}", shell=True,
                       capture_output=True, text=True, executable="/bin/bash")
    assert r.stderr == "" and r.stdout.strip() in ("0", "141")  # 0: the output fit the pipe before it closed
