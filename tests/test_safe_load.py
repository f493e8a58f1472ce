"""Files are loaded without running code from them (torch.load(weights_only=True)): checkpoints
of probe and expand unless --allow-pickle, --data FILE.pt always, compare's saved bases always.
What expand writes is data only and loads back without --allow-pickle. And --device."""

import json
import pathlib
import re

import pytest
import torch

from manifold_ext import compare as C
from manifold_ext import models, probes
from manifold_ext.builtin import Candidate, benchmark, spec_from_dict
from manifold_ext.cli import main
from manifold_ext.cli._args import resolve_device
from manifold_ext.cli._load import load_checkpoint
from manifold_ext.expand import Widen, expand

from _cli import error as _error, run as _run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOML = """
seeds = 1
base_epochs = 1
adapt_epochs = 1
finetune_epochs = 1
probe_examples = 32
n_boot = 10
estimators = ["radius"]
baselines = ["parameters", "loss"]

[estimator_options.radius]
directions = 2
grid = [0.001, 10.0, 4]
bisect = 1

[[candidates]]
name = "control"

[[candidates]]
name = "wide"
specs = [{type = "widen", target = "*", factor = 2, init = "zero"}]
"""


class Payload:
    """Unpickling this writes ``marker``: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def _hostile(tmp_path, name="evil.pt"):
    """A torch.save file whose unpickling writes tmp_path/marker; (file, marker)."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / name)
    return tmp_path / name, marker


def _pickled(head, tail):
    """The message for a file of pickled objects: ``head``, the refused global, ``tail``."""
    return re.compile(re.escape(head + ": holds pickled Python objects, not just tensors (it calls ")
                      + r"[\w.]+" + re.escape(", which loading with weights_only=True refuses)" + tail))


CHECKPOINT_TAIL = ("; unpickling runs any code a file carries: pass --allow-pickle only for a file you trust, "
                   "or save a state dict (torch.save(model.state_dict(), FILE)) and load it with --model SPEC")
DATA_TAIL = ("; a .pt data file is never unpickled: save torch tensors as a dict {'X': X, 'y': y} or a tuple "
             "(X, y) (numpy arrays: torch.from_numpy them, or save FILE.npz)")
BASE_TAIL = ("; compare saves each base as a state dict and never unpickles one: delete the file to train "
             "that base again (its training is seeded), or start afresh in another directory")


def _mlp(seed, widths=(64, 8, 10)):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.mlp(widths).eval()


def _strip(obj, keys=("seconds", "baseline_seconds")):
    if isinstance(obj, dict):
        return {k: _strip(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_strip(v, keys) for v in obj]
    return obj


# ----------------------------------------------------------------------------- hostile files


def test_the_hostile_file_runs_code_when_unpickled(tmp_path):
    """The payload the other tests refuse does write its marker under a full unpickling."""
    path, marker = _hostile(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_probe_refuses_a_hostile_checkpoint(tmp_path, capsys):
    path, marker = _hostile(tmp_path)
    msg = _error(capsys, "probe", "plane", path, "--out", tmp_path / "p", "--no-plot")
    assert _pickled(f"CHECKPOINT {path}", CHECKPOINT_TAIL).fullmatch(msg), msg
    assert not marker.exists() and not (tmp_path / "p").exists()


def test_expand_refuses_a_hostile_checkpoint(tmp_path, capsys):
    path, marker = _hostile(tmp_path)
    msg = _error(capsys, "expand", path, "--widen", "0", "--model", "mlp:64-8-10", "--out", tmp_path / "g.pt")
    assert _pickled(f"CHECKPOINT {path}", CHECKPOINT_TAIL).fullmatch(msg), msg
    assert not marker.exists() and not (tmp_path / "g.pt").exists()


def test_data_pt_is_never_unpickled(tmp_path, capsys):
    """compare --data and probe --data: not even with --allow-pickle (which is for checkpoints)."""
    path, marker = _hostile(tmp_path, "data.pt")
    msg = _error(capsys, "compare", "--data", path, "--out", tmp_path / "run", "--no-plot", "--quiet")
    assert _pickled(f"--data {path}", DATA_TAIL).fullmatch(msg), msg
    assert not (tmp_path / "run").exists()
    torch.save(_mlp(0).state_dict(), tmp_path / "sd.pt")
    msg = _error(capsys, "probe", "plane", tmp_path / "sd.pt", "--model", "mlp:64-8-10", "--data", path,
                 "--allow-pickle", "--out", tmp_path / "p", "--no-plot")
    assert _pickled(f"--data {path}", DATA_TAIL).fullmatch(msg), msg
    assert not marker.exists()


def test_data_pt_of_numpy_arrays_says_what_is_accepted(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    torch.save({"X": np.zeros((20, 64), np.float32), "y": np.zeros(20, np.int64)}, tmp_path / "np.pt")
    msg = _error(capsys, "compare", "--data", tmp_path / "np.pt", "--no-plot")
    assert _pickled(f"--data {tmp_path / 'np.pt'}", DATA_TAIL).fullmatch(msg), msg
    # Tensors in a dict or a tuple load fine.
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    torch.save({"X": x, "y": y}, tmp_path / "dict.pt")
    torch.save((x, y), tmp_path / "tuple.pt")
    torch.save(_mlp(0).state_dict(), tmp_path / "sd.pt")
    for data in ("dict.pt", "tuple.pt"):
        code, _, err = _run(capsys, "probe", "plane", tmp_path / "sd.pt", "--model", "mlp:64-8-10", "--data",
                            tmp_path / data, "--steps", 2, "--out", tmp_path / data[:-3], "--no-plot", "--quiet")
        assert code == 0, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished compare run (1 seed, 2 candidates, radius only) through the CLI."""
    d = tmp_path_factory.mktemp("cmp")
    (d / "tiny.toml").write_text(TOML)
    out = d / "run"
    assert main(["compare", "--config", str(d / "tiny.toml"), "--out", str(out), "--no-plot", "--quiet"]) == 0
    return d / "tiny.toml", out


def _tiny_bench():
    bench = benchmark("mlp")
    bench.candidates = [Candidate("control"), Candidate("wide", (Widen("*", factor=2, init="zero"),))]
    return bench


def test_compare_resume_refuses_a_hostile_base(tiny_run, tmp_path, capsys):
    cfg, finished = tiny_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes((finished / "config.json").read_bytes())
    (out / "bases").mkdir()
    _, marker = _hostile(out / "bases", "seed0.pt")
    msg = _error(capsys, "compare", "--config", cfg, "--out", out, "--resume", "--no-plot", "--quiet")
    assert _pickled(str(out / "bases" / "seed0.pt"), BASE_TAIL).fullmatch(msg), msg
    assert not marker.exists() and not (out / "units").exists()
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        C.load_base(_tiny_bench(), out, 0)
    assert not marker.exists()


def test_bases_are_state_dicts_and_resume_reproduces_the_base(tiny_run, tmp_path):
    """OUT/bases/seed0.pt is a plain state dict; load_base rebuilds the trained base from it, and a
    resumed run (on another device setting: not part of the resume check) recomputes units
    identical to the first run's from it."""
    _, finished = tiny_run
    state = torch.load(finished / "bases" / "seed0.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    bench = _tiny_bench()
    base = C.load_base(bench, finished, 0)
    assert not base.training and {k: v for k, v in base.state_dict().items()}.keys() == state.keys()
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), k
    settings = C.Settings.from_dict({k: v for k, v in json.loads((finished / "config.json").read_text())
                                     ["settings"].items()})
    again = C._base(bench, settings, 0, tmp_path / "fresh")  # trained afresh: the same weights
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k

    first = json.loads((finished / "results.json").read_text())
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("config.json", "bases/seed0.pt"):
        (resumed / name).parent.mkdir(parents=True, exist_ok=True)
        (resumed / name).write_bytes((finished / name).read_bytes())
    result = C.compare(bench, settings, resumed, resume=True, quiet=True, device="cpu")
    assert result.bases == first["bases"]
    assert _strip(json.loads(json.dumps(result.units))) == _strip(first["units"])
    with pytest.raises(FileNotFoundError, match="has no base for seed 1"):
        C.load_base(bench, finished, 1)


# ----------------------------------------------------------------------------- --allow-pickle


def test_allow_pickle_loads_a_whole_module(tmp_path, capsys):
    model = _mlp(0)
    torch.save(model, tmp_path / "m.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    msg = _error(capsys, "probe", "plane", tmp_path / "m.pt", "--out", tmp_path / "a", "--no-plot")
    assert _pickled(f"CHECKPOINT {tmp_path / 'm.pt'}", CHECKPOINT_TAIL).fullmatch(msg), msg
    assert "torch.nn.modules.container.Sequential" in msg
    code, _, err = _run(capsys, "probe", "plane", tmp_path / "m.pt", "--allow-pickle", "--steps", 3,
                        "--out", tmp_path / "a", "--no-plot", "--quiet")
    assert code == 0, err
    code, _, err = _run(capsys, "probe", "plane", tmp_path / "sd.pt", "--model", "mlp:64-8-10", "--steps", 3,
                        "--out", tmp_path / "b", "--no-plot", "--quiet")
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "plane.json").read_text())
    b = json.loads((tmp_path / "b" / "plane.json").read_text())
    assert _strip(a) == _strip(b)

    # expand of a pickled module: the weights and the report, without an architecture.
    code, _, err = _run(capsys, "expand", tmp_path / "m.pt", "--allow-pickle", "--widen", "0", "--out",
                        tmp_path / "g.pt")
    assert code == 0, err
    assert err == (f"manifold-ext expand: note: {tmp_path / 'g.pt'} holds the grown weights without their "
                   f"architecture (CHECKPOINT is a pickled module, not a state dict with --model SPEC): load it "
                   f"with --model SPEC of the grown model, or load its 'state_dict' into that architecture in "
                   f"Python\n")
    saved = torch.load(tmp_path / "g.pt", weights_only=True)
    assert saved["base_model"] is None and saved["specs"][0]["type"] == "Widen"
    msg = _error(capsys, "probe", "plane", tmp_path / "g.pt", "--out", tmp_path / "c", "--no-plot")
    assert msg == (f"CHECKPOINT {tmp_path / 'g.pt'} holds a grown model's weights without their architecture "
                   f"(its base was a pickled module): give the grown model's architecture with --model SPEC")
    grown = load_checkpoint(tmp_path / "g.pt", "mlp:64-16-10")
    api, _ = expand(model, Widen("0", factor=2.0), generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(grown(x), api(x))


# ----------------------------------------------------------------------------- expand's files


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # attention under vmap on the CPU
@pytest.mark.parametrize("spec, make, first, second, x", [
    ("mlp:64-8-10", lambda: models.mlp((64, 8, 10)), ["--widen", "0:2", "--deepen", "1"], ["--widen", "0=24@zero"],
     lambda: torch.randn(6, 64)),
    ("resnet:2-4", lambda: models.ResNetCNN(widths=(2, 4)), ["--deepen", "stages.0"], ["--widen", "stages.1"],
     lambda: torch.randn(6, 1, 8, 8)),
    ("transformer:vocab=7,length=4,width=8,heads=2,classes=3", lambda: models.TinyTransformer(7, 4, 8, 2, 3),
     ["--widen", "blocks.0.ff1"], ["--deepen", "blocks.0"], lambda: torch.randint(0, 7, (6, 4))),
], ids=["mlp", "resnet", "transformer"])
def test_expand_output_round_trips_without_allow_pickle(spec, make, first, second, x, tmp_path, capsys):
    """expand's file is data only (weights_only=True), loads back (probe, expand) without
    --model or --allow-pickle, and computes what the API's grown model computes; expanding it
    again composes the recipe."""
    torch.manual_seed(0)
    base = make().eval()
    torch.save(base.state_dict(), tmp_path / "sd.pt")
    x = x()
    code, _, err = _run(capsys, "expand", tmp_path / "sd.pt", "--model", spec, *first, "--out", tmp_path / "g.pt",
                        "--quiet")
    assert code == 0, err
    saved = torch.load(tmp_path / "g.pt", weights_only=True)
    assert set(saved) == {"state_dict", "report", "base_model", "specs"}
    assert saved["base_model"] == spec and saved["specs"] == saved["report"]["specs"]
    grown = load_checkpoint(tmp_path / "g.pt", None)
    # The API's own expansion, by the specs the file records.
    api, _ = expand(base, *[spec_from_dict(d) for d in saved["specs"]], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown(x), api.eval()(x))

    # expand it again: no --model, no --allow-pickle; the recipe grows by the new specs.
    code, _, err = _run(capsys, "expand", tmp_path / "g.pt", *second, "--out", tmp_path / "g2.pt", "--quiet")
    assert code == 0, err
    saved2 = torch.load(tmp_path / "g2.pt", weights_only=True)
    assert saved2["base_model"] == spec and saved2["specs"][:len(saved["specs"])] == saved["specs"]
    assert len(saved2["specs"]) == len(saved["specs"]) + 1
    grown2 = load_checkpoint(tmp_path / "g2.pt", None)
    api2, _ = expand(api, spec_from_dict(saved2["specs"][-1]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown2(x), api2.eval()(x))

    # probe reads it as any checkpoint, and gets what the API's model gives.
    if not spec.startswith("mlp"):
        return
    xy = (torch.randn(30, 64), torch.randint(0, 10, (30,)))
    torch.save({"X": xy[0], "y": xy[1]}, tmp_path / "data.pt")
    code, _, err = _run(capsys, "probe", "plane", tmp_path / "g2.pt", "--data", tmp_path / "data.pt", "--steps", 3,
                        "--out", tmp_path / "p", "--no-plot", "--quiet")
    assert code == 0, err
    written = json.loads((tmp_path / "p" / "plane.json").read_text())
    expected = json.loads(probes.plane(api2.eval(), xy, grid=(-1.0, 1.0, 3)).to_json())
    assert _strip(written) == _strip(expected)


def test_expand_output_must_match_a_given_model_spec(tmp_path, capsys):
    torch.save(_mlp(0).state_dict(), tmp_path / "sd.pt")
    assert main(["expand", str(tmp_path / "sd.pt"), "--model", "mlp:64-8-10", "--widen", "0:2", "--out",
                 str(tmp_path / "g.pt"), "--quiet"]) == 0
    capsys.readouterr()
    assert load_checkpoint(tmp_path / "g.pt", "mlp:64-16-10") is not None
    msg = _error(capsys, "probe", "plane", tmp_path / "g.pt", "--model", "mlp:64-8-10", "--out", tmp_path / "p",
                 "--no-plot")
    assert msg.startswith(f"CHECKPOINT {tmp_path / 'g.pt'} does not match --model mlp:64-8-10: parameter "
                          f"'0.weight' has shape (16, 64)")


# ----------------------------------------------------------------------------- --device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_cpu_gives_the_same_results_as_no_flag(tmp_path, capsys):
    torch.save(_mlp(0).state_dict(), tmp_path / "sd.pt")
    torch.save(_mlp(1).state_dict(), tmp_path / "sd1.pt")
    for flags, name in (([], "default"), (["--device", "cpu"], "cpu")):
        code, _, err = _run(capsys, "probe", "line", tmp_path / "sd.pt", tmp_path / "sd1.pt", "--model", "mlp:64-8-10",
                            "--steps", 5, "--out", tmp_path / name, "--no-plot", "--quiet", *flags)
        assert code == 0, err
        code, _, err = _run(capsys, "expand", tmp_path / "sd.pt", "--model", "mlp:64-8-10", "--widen", "0@random",
                            "--out", tmp_path / name / "g.pt", "--quiet", *flags)
        assert code == 0, err
    a, b = (json.loads((tmp_path / n / "line.json").read_text()) for n in ("default", "cpu"))
    assert _strip(a) == _strip(b)
    a, b = (torch.load(tmp_path / n / "g.pt", weights_only=True) for n in ("default", "cpu"))
    assert a["report"] == b["report"] and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("argv", [
    ["probe", "plane", "missing.pt", "--no-plot", "--out", "{tmp}/p"],
    ["expand", "missing.pt", "--widen", "0", "--out", "{tmp}/g.pt"],
    ["demo", "--no-plot", "--out", "{tmp}/d"],
    ["compare", "--no-plot", "--out", "{tmp}/c"],
])
def test_device_cuda_without_cuda_is_one_line(argv, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    msg = _error(capsys, argv[0], *argv[1:], "--device", "cuda")
    assert msg == ("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                   "use --device cpu or auto")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["probe", "plane", "a.pt"], ["expand", "a.pt", "--out", "g.pt"], ["demo"],
                                     ["compare"]])
def test_device_bogus_is_rejected_by_argparse(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([*command, "--device", "bogus"])
    assert err.value.code == 2
    assert "argument --device: invalid choice: 'bogus' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["probe", "expand", "demo", "compare"])
def test_device_is_in_the_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--device {auto,cpu,cuda}" in out
    if command in ("probe", "expand"):
        assert "--allow-pickle" in out and "use this only for files you trust" in " ".join(out.split())


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_cuda
def test_probe_and_expand_on_cuda_match_cpu(tmp_path, capsys):
    torch.save(_mlp(0).state_dict(), tmp_path / "sd.pt")
    torch.save(_mlp(1).state_dict(), tmp_path / "sd1.pt")
    for device in ("cpu", "cuda"):
        code, _, err = _run(capsys, "probe", "line", tmp_path / "sd.pt", tmp_path / "sd1.pt", "--model", "mlp:64-8-10",
                            "--steps", 5, "--out", tmp_path / device, "--no-plot", "--quiet", "--device", device)
        assert code == 0, err
        code, _, err = _run(capsys, "expand", tmp_path / "sd.pt", "--model", "mlp:64-8-10", "--widen", "0:2",
                            "--data", "digits", "--out", tmp_path / device / "g.pt", "--quiet", "--device", device)
        assert code == 0, err
    a, b = (json.loads((tmp_path / d / "line.json").read_text()) for d in ("cpu", "cuda"))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    a, b = (torch.load(tmp_path / d / "g.pt", weights_only=True) for d in ("cpu", "cuda"))
    assert all(t.device.type == "cpu" for t in b["state_dict"].values())  # saved from the CPU
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k])


@pytest.mark.cuda
@needs_cuda
def test_demo_on_cuda(tmp_path):
    assert main(["demo", "--points", "5", "--epochs", "5", "--out", str(tmp_path), "--quiet", "--no-plot",
                 "--device", "cuda"]) == 0
    result = json.loads((tmp_path / "line.json").read_text())
    assert result["config"]["device"].startswith("cuda")
    assert result["agreement"]["max_abs_loss_diff"] <= result["agreement"]["tolerance"]


@pytest.mark.cuda
@needs_cuda
def test_compare_on_cuda_then_resume_on_cpu(tmp_path):
    """Every estimator and baseline runs with the model on the GPU; the run resumes on the CPU
    (the device is not part of the resume check) from the bases saved on the CPU."""
    bench = _tiny_bench()
    settings = C.Settings(seeds=1, base_epochs=1, adapt_epochs=1, finetune_epochs=1, probe_examples=32, n_boot=10,
                          estimator_options={"radius": {"directions": 2, "grid": (1e-3, 10.0, 4), "bisect": 1},
                                             "simplex": {"k": 1, "steps": 2, "samples": 8, "line_search": 1},
                                             "minima": {"m": 2, "samples": 8}})
    out = tmp_path / "run"
    result = C.compare(bench, settings, out, quiet=True, device="cuda")
    assert all(u["candidate"] for u in result.units) and len(result.units) == 2
    state = torch.load(out / "bases" / "seed0.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    for p in (out / "units").rglob("*.json"):
        p.unlink()
    again = C.compare(bench, settings, out, resume=True, quiet=True, device="cpu")
    assert again.bases[0]["parameters"] == result.bases[0]["parameters"]
    assert again.bases[0]["test_accuracy"] == pytest.approx(result.bases[0]["test_accuracy"], abs=2e-3)
