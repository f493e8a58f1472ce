"""``manifold-ext compare``: rank candidate expansions of a base model by manifold size and every
baseline, against the gains that fine-tuning them actually brings."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import compare as C
from .. import distributed as D
from .._io import atomic_write
from ..builtin import (CNN_WIDTHS, SUITE, Benchmark, Candidate, Task, benchmark, suite, task_from_arrays,
                       task_from_tokens, transformer_candidates)
from ._args import CommandError, add_device_argument, have_matplotlib, int_at_least, resolve_device
from ._load import _load_state as load_state
from ._load import _read as read_file
from ._load import as_tensor, expected_input, first_layer, load_checkpoint, read_data


def add_parser(sub, common) -> None:
    """Register ``compare`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "compare", parents=[common],
        help="rank candidate expansions of a base model; correlate every metric with the gains",
        description=textwrap.fill(
            "Pre-train a small base model, grow it into candidate expansions, adapt each "
            "briefly, measure its manifold size (radius and minima by default; minima ranks) and 12 "
            "baseline metrics, fine-tune it for a fixed budget, and correlate every metric with the "
            "gains over several seeds. "
            "With no arguments: the MLP on the built-in digits data, 20 candidates, 3 seeds; "
            "--model gpt2: a small GPT-2 language model on Python source, 12 candidates; --suite: every "
            "built-in benchmark and one cross-task table. "
            "With --base: your own trained network is the base (not retrained), grown by the "
            "candidates of --config; with --base and a token file as --data, a language model "
            "(next-token prediction, loss lm).", 88),
        epilog="your own base (--base):\n"
        "  manifold-ext compare --base model.pt --arch mlp:64-32-10 --config cands.toml\n"
        "  manifold-ext compare --base model.pt --arch mypackage.models:build --config cands.toml --data d.npz\n"
        "  manifold-ext compare --base hf_dir/ --config cands.toml --data data.npz\n"
        "a language model (--data holding token sequences: loss lm, next-token accuracy):\n"
        "  manifold-ext compare --base lm.pt --arch mypackage.models:build_lm --config cands.toml --data tokens.npz\n"
        "cands.toml lists [[candidates]] whose specs name the base's module paths, e.g.\n"
        "  [[candidates]]\n"
        "  name = \"wide\"\n"
        "  specs = [{type = \"widen\", target = \"2\", factor = 2, init = \"net2net\"}]\n"
        "Everything is checked before any training: the data fit the base, the labels lie within its\n"
        "outputs, and every candidate grows from it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=("mlp", "cnn", "gpt2", "transformer"), default=None,
                   help="the built-in base model: mlp (default) or cnn on the digits, gpt2 (a small "
                   "Hugging Face GPT-2 language model, needs transformers) on the bytes of Python's "
                   "standard-library source; transformer (a TinyTransformer classifier) only with "
                   "--data holding token ids")
    p.add_argument("--task", choices=("digits", "teacher", "clusters", "python"), default=None,
                   help="built-in data: digits (8x8 images of handwritten digits; for mlp and cnn), "
                   "teacher (Gaussian inputs labelled by a random wider MLP; for mlp), clusters "
                   "(scikit-learn's make_classification, 5 classes of 3 clusters; for mlp) or "
                   "python (byte-level text of the standard library's source, sequences of 64 "
                   "bytes; for gpt2, or a language model given as --base)")
    p.add_argument("--suite", action="store_true",
                   help="run every built-in benchmark (" + ", ".join(f"{m}-{t}" for m, t in SUITE) + "), each "
                   "in OUT/MODEL-TASK, and print one cross-task table: each metric's within-seed Spearman "
                   "per task and on average, and its equal-size order (suite.json, suite.csv); --config "
                   "may set settings for every task, not candidates")
    p.add_argument("--data", type=Path, default=None,
                   help="your own data: FILE.npz with arrays X and y, or FILE.pt with a dict "
                   "{'X': tensor, 'y': tensor} or a tuple (X, y) of torch tensors (read with "
                   "weights_only=True: never unpickled); split 60/40 into train and test (seeded). "
                   "Float features are standardised (see --standardize); integer token ids (for a "
                   "transformer, or a base whose first layer is an embedding) are kept as they are. "
                   "A token file, for a language model: FILE.npz with an integer array tokens of "
                   "shape (N, T) (N sequences of T >= 2 token ids in [0, vocab) of the base), or "
                   "FILE.pt with a dict {'tokens': tensor} (weights_only=True, as above). It "
                   "selects loss lm (next-token cross-entropy: position t predicts token t + 1; "
                   "the accuracy is next-token accuracy); its sequences are split 60/40 (seeded), "
                   "none cut. It needs --base, your language model (the built-in one, --model gpt2, learns "
                   "the built-in python text)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise --data's float features: subtract each feature's mean and divide "
                   "by its standard deviation, both from the training split only (a constant feature is "
                   "only centred). Default: on, except with --base (a trained base takes the data as "
                   "it was trained on them)")
    p.add_argument("--base", type=Path, default=None, metavar="PATH",
                   help="your own trained base, grown as it is (not retrained): a FILE written by "
                   "torch.save holding a state dict (give its architecture with --arch), or a "
                   "Hugging Face model directory written by save_pretrained (config.json and "
                   "safetensors weights; needs transformers). Needs --config with [[candidates]] "
                   "naming its module paths; the data: --data, or the built-in digits")
    p.add_argument("--arch", default=None, metavar="SPEC",
                   help="with --base FILE: the architecture its state dict fits: a model spec "
                   "(mlp:W0-W1-...-Wn[,act=A][,norm=N], resnet[:W1-W2-...][,...] or "
                   "transformer:vocab=V,..., as --model of probe and expand take) or "
                   "package.module:factory, a callable (importable from the current directory or "
                   "sys.path) that takes no arguments and returns the untrained nn.Module")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --base FILE: also load a file holding pickled Python objects (a whole "
                   "nn.Module, as torch.save(model) writes); unpickling runs any code the file "
                   "carries: only for files you trust")
    p.add_argument("--config", type=Path, default=None,
                   help="a TOML file: any setting (see manifold_ext.compare.Settings) at the top "
                   "level, and [[candidates]] tables with name and specs, e.g. "
                   "specs = [{type = 'widen', target = '*', factor = 2, init = 'zero'}]")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, a shorter budget and cheaper estimators (on 2 CPU cores: the MLP about 10 s, "
                   "gpt2 (8 of its candidates) about 4 minutes, --suite about 5 minutes)")
    p.add_argument("--seeds", type=int_at_least(1), default=None, help="override the number of seeds")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: a fresh results/compare-MODEL-TIME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished candidates are not recomputed")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write the PNG figures (default: on when matplotlib is installed)")
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- inputs


def _load_config(path: Path) -> dict:
    import tomllib

    if not path.is_file():
        raise CommandError(f"--config: no such file {str(path)!r}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CommandError(f"--config: {str(path)!r} is not valid TOML: {err}") from None


def _load_data(path: Path) -> dict:
    """--data's tensors: ``{"tokens": (N, T)}`` for a token file, else ``{"X": X, "y": y}``."""
    return {k: as_tensor(v, k, str(path)) for k, v in read_data(path, tokens=True).items()}


def _token_task(path: Path, tokens: torch.Tensor) -> Task:
    try:
        return task_from_tokens(tokens, name="custom tokens")
    except ValueError as err:
        raise CommandError(f"--data {path}: {err}") from None


def _user_task(X: torch.Tensor, y: torch.Tensor, model: str, standardize: bool) -> Task:
    """--data for a built-in model: token ids for the transformer, float features otherwise."""
    want = {"mlp": 2, "cnn": 4, "transformer": 2}[model]
    if X.dim() >= 2 and X.dim() != want:
        raise CommandError(f"--data: the {model} takes X of {want} dimensions "
                           f"({'(N, features)' if model == 'mlp' else '(N, channels, H, W)' if model == 'cnn' else '(N, tokens)'}), "
                           f"got {tuple(X.shape)}")
    if model == "transformer" and X.is_floating_point():
        X = X.long()  # the built-in transformer takes ids however they were stored
    return _task(X, y, tokens=model == "transformer", standardize=standardize)


def _task(X: torch.Tensor, y: torch.Tensor, *, tokens: bool, standardize: bool) -> Task:
    name = "custom, standardised" if standardize and not tokens else "custom"
    try:
        return task_from_arrays(X, y, name=name, standardize=standardize, tokens=tokens)
    except ValueError as err:
        raise CommandError(f"--data: {err}") from None


def _candidates(raw) -> list:
    if not isinstance(raw, list) or not raw:
        raise CommandError("--config: candidates must be a non-empty array of tables")
    try:
        out = [Candidate.from_dict(c) for c in raw]
    except KeyError as err:
        raise CommandError(f"--config: every candidate needs a {err.args[0]!r}") from None
    if not any(c.name == "control" for c in out):
        out.insert(0, Candidate("control"))
    return out


def _setup(args) -> tuple:
    """``(bench, settings, base)``: ``base`` is the model of --base, else None."""
    if args.base is None:
        for flag, value in (("--arch", args.arch), ("--allow-pickle", args.allow_pickle or None)):
            if value is not None:
                raise CommandError(f"{flag}: only used with --base (the architecture or loading of your own base)")
    elif args.model is not None:
        raise CommandError("--model chooses a built-in base; with --base, give the base's architecture with --arch")
    cfg = _load_config(args.config) if args.config else {}
    model = args.model or cfg.pop("model", None) or ("gpt2" if args.task == "python" and args.base is None else "mlp")
    task = args.task or cfg.pop("task", None)
    cfg.pop("model", None)
    cfg.pop("task", None)
    candidates = cfg.pop("candidates", None)
    standardize = args.standardize if args.standardize is not None else args.base is None
    data = _load_data(args.data) if args.data is not None else None
    tokens = data is not None and "tokens" in data
    if tokens and args.base is None:
        raise CommandError(f"--data {args.data}: a token file (language modelling) needs --base PATH, your trained "
                           f"language model (the built-in one, --model gpt2, learns the built-in python text)")
    lm_task = tokens or (args.base is not None and task == "python")
    bench = None
    if args.base is None:
        bench = _builtin(model, task, data, args.data)
        if args.quick:
            bench = bench.quick_version()
    elif tokens and task is not None:
        raise CommandError(f"--task {task}: not with --data {args.data} (the data are --data's token sequences)")
    settings = _settings(args, cfg, lm_task, bench)
    if settings.loss == "lm" and not lm_task and (bench is None or bench.settings.get("loss") != "lm"):
        raise CommandError(f"--config {args.config}: loss 'lm' (a language model) needs token sequences: --data FILE "
                           f"holding them (an array tokens of shape (N, T)) or --task python, and --base PATH, "
                           f"your trained language model (or --model gpt2, the built-in one)")
    base = None
    if args.base is not None:
        candidates = _candidates(candidates) if candidates is not None else None
        if candidates is None or not any(c.specs for c in candidates):
            example = ("their specs naming the base's module paths (e.g. specs = [{type = 'widen', target = '2', "
                       "factor = 2}]): the built-in candidates target the built-in architectures")
            if args.config is None:
                raise CommandError(f"--base needs --config FILE listing [[candidates]], {example}")
            raise CommandError(f"--config {args.config} lists no [[candidates]] expansion; with --base they are "
                               f"required, {example}")
        base = _load_base(args.base, args.arch, args.allow_pickle)
        bench = Benchmark(_safe_name(args.base), _base_task(args, data, base, standardize), None, candidates)
        _check_base(args, base, bench, settings.loss)
    else:
        if data is not None:
            bench = _with_data(bench, _user_task(data["X"], data["y"], model, standardize))
        if candidates is not None:
            bench.candidates = _candidates(candidates)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                reference = bench.make_base()
            try:
                C.check_candidates(reference, bench.candidates, bench.task)
            except ValueError as err:
                raise CommandError(f"--config {args.config}: {err}") from None
    return bench, settings, base


def _builtin(model: str, task: Optional[str], data: Optional[dict], data_path: Optional[Path]) -> Benchmark:
    """The built-in benchmark of --model and --task (the TinyTransformer: only with --data)."""
    if model == "transformer":
        if data is None:
            raise CommandError("--model transformer: needs --data FILE holding token ids X and labels y: it has no "
                               "built-in task (the modular-addition benchmark was removed: its base stayed at chance "
                               "level); the built-in language-model benchmark is --model gpt2")
        if task is not None:
            raise CommandError(f"--task {task}: not with --model transformer (its data are --data's)")
        return Benchmark("transformer", None, None, transformer_candidates())
    if model == "gpt2" and data is not None:
        raise CommandError(f"--data {data_path}: not with --model gpt2 (it learns the built-in python task); "
                           f"for your own language model and tokens give --base PATH and --data")
    try:
        return benchmark(model, task)
    except (ValueError, ImportError) as err:
        raise CommandError(f"--model {model}: {err}") from None


def _settings(args, cfg: dict, tokens: bool, bench: Optional[Benchmark] = None) -> C.Settings:
    """The settings of the benchmark, --quick, --config's top level and --seeds (as
    :func:`manifold_ext.compare.settings_for` combines them); token sequences as the data select
    loss lm (a config that sets another loss is an error)."""
    settings = dict(cfg)
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    if tokens:
        if settings.get("loss") == "cross_entropy":
            source = f"--data {args.data}, a token file" if args.data is not None else "--task python"
            raise CommandError(f"--config {args.config}: loss = 'cross_entropy' does not fit {source} (token "
                               f"sequences: a language model's next-token prediction, loss 'lm'); "
                               f"drop loss or set loss = \"lm\"")
        settings.setdefault("loss", "lm")
    try:
        return C.settings_for(bench or Benchmark("custom", None), quick=args.quick, **settings)
    except ValueError as err:
        raise CommandError(f"{'--config: ' if args.config else ''}{err}") from None


# ----------------------------------------------------------------------------- --base


_FAMILIES = ("mlp", "resnet", "transformer")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _safe_name(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "base"


def _one_line(err: BaseException) -> str:
    line = next((t.strip() for t in str(err).splitlines() if t.strip()), "")
    return f"{type(err).__name__}: {line[:200]}"


def _as_base_error(err: CommandError, path: Path) -> CommandError:
    """A checkpoint error in compare's words: the file is --base, its architecture --arch."""
    text = str(err).replace(f"CHECKPOINT {path}", f"--base {path}").replace("--model", "--arch")
    return CommandError(text)


def _factory_model(spec: str) -> nn.Module:
    """The untrained architecture ``package.module:factory`` returns (the global RNG untouched)."""
    module_name, _, attr = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:  # as `python -m` does: modules in the current directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise CommandError(f"--arch {spec!r}: no module named {err.name!r} (it must be importable: "
                                   f"from the current directory or sys.path)") from None
            raise CommandError(f"--arch {spec!r}: importing {module_name!r} failed ({_one_line(err)})") from None
        except Exception as err:  # noqa: BLE001 - whatever the user's module raises
            raise CommandError(f"--arch {spec!r}: importing {module_name!r} failed ({_one_line(err)})") from None
        factory = module
        for part in attr.split("."):
            if not hasattr(factory, part):
                raise CommandError(f"--arch {spec!r}: module {module_name!r} has no attribute {attr!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise CommandError(f"--arch {spec!r}: {attr} is a {type(factory).__name__}, not a callable that "
                               f"returns the architecture")
        try:
            with torch.random.fork_rng(devices=[]):
                model = factory()
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--arch {spec!r}: calling {attr}() failed ({_one_line(err)}); the factory must "
                               f"take no arguments and return the untrained architecture") from None
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
    if not isinstance(model, nn.Module):
        raise CommandError(f"--arch {spec!r}: {attr}() returned a {type(model).__name__}, expected an nn.Module "
                           f"(the untrained architecture)")
    return model


def _load_base_file(path: Path, arch: Optional[str], allow_pickle: bool) -> nn.Module:
    family = (arch or "").partition(":")[0]
    if arch is None or family in _FAMILIES or not _FACTORY.fullmatch(arch):
        try:
            return load_checkpoint(path, arch, allow_pickle=allow_pickle)
        except CommandError as err:
            raise _as_base_error(err, path) from None
    label = f"--base {path}"
    if path.is_dir():
        raise CommandError(f"{label}: is a directory without config.json; expected a file written by torch.save "
                           f"or a Hugging Face model directory")
    model = _factory_model(arch)
    obj = read_file(path, label, allow_pickle)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), (Mapping, nn.Module)):
        obj = obj["model"].state_dict() if isinstance(obj["model"], nn.Module) else obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CommandError(f"{label}: expected a state dict (a dict of tensors), got a {type(obj).__name__}")
    return load_state(model, obj, label, f"--arch {arch}", path).eval()


def _load_pretrained(path: Path, arch: Optional[str]) -> nn.Module:
    """A Hugging Face model directory: its class from config.json, safetensors weights only."""
    label = f"--base {path}"
    if arch is not None:
        raise CommandError(f"--arch: not used with a Hugging Face directory ({path} names its architecture "
                           f"in config.json); drop --arch")
    try:
        import transformers
    except ImportError:
        raise CommandError(f"{label}: a Hugging Face model directory needs transformers: "
                           f"pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable or unknown config
        raise CommandError(f"{label}: transformers cannot read its config.json ({_one_line(err)})") from None
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise CommandError(f"{label}: its config.json names no architectures (save_pretrained records the "
                           f"model's class there)")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CommandError(f"{label}: its config.json names the architecture {names[0]!r}, which transformers "
                           f"{transformers.__version__} does not have")
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CommandError(f"{label}: no model.safetensors: only safetensors weights are loaded (they carry no "
                           f"code); save the model with save_pretrained(DIR) (safetensors by default)")
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except Exception as err:  # noqa: BLE001
        raise CommandError(f"{label}: {names[0]}.from_pretrained failed ({_one_line(err)})") from None
    return model.eval()


def _load_base(path: Path, arch: Optional[str], allow_pickle: bool) -> nn.Module:
    """The model of --base PATH (see --help), in eval mode on the CPU."""
    if not path.exists():
        raise CommandError(f"--base {path}: no such file or directory")
    if path.is_dir() and (path / "config.json").is_file():
        return _load_pretrained(path, arch)
    return _load_base_file(path, arch, allow_pickle)


def _base_task(args, data: Optional[dict], base: nn.Module, standardize: bool) -> Task:
    """The data for a given base: --data (``data``, as :func:`_load_data` read it: token sequences
    for a language model; token ids when its first layer is an embedding, else features in its
    dtype), or the built-in data of --task (digits: as images for a convolutional base)."""
    if data is not None and "tokens" in data:
        return _token_task(args.data, data["tokens"])
    layer = first_layer(base)
    tokens = isinstance(layer, nn.Embedding)
    if data is not None:
        X, y = data["X"], data["y"]
        if tokens and X.is_floating_point():
            raise CommandError(f"--data {args.data}: the base takes {expected_input(base)}, got X of dtype {X.dtype}")
        task = _task(X, y, tokens=tokens, standardize=standardize)
    elif tokens and args.task is None:
        raise CommandError(f"--data: required: the base takes {expected_input(base)}, not the built-in digits")
    elif args.task == "python":
        from ..builtin import python_source

        task = python_source()
    else:
        from ..builtin import digits

        task = digits(image=isinstance(layer, (nn.Conv2d,)))
    if not tokens:
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
        if dtype is not None and task.x_train.is_floating_point() and task.x_train.dtype != dtype:
            task = Task(task.name, task.x_train.to(dtype), task.y_train, task.x_test.to(dtype), task.y_test)
    return task


def _check_base(args, base: nn.Module, bench: Benchmark, loss: str) -> None:
    """Before any training: the data fit the base and every candidate grows from it."""
    if args.data is not None:
        source = f"--data {args.data}"
    elif args.task is not None:
        source = f"--task {args.task}"
    else:
        source = "--data: not given, and the built-in digits"
    try:
        C.check_data(base, bench.task, loss=loss)
    except ValueError as err:
        takes = f"; the base takes {expected_input(base)}" if str(err).startswith("the data do not fit") else ""
        tail = "" if args.data is not None or args.task is not None else "; give the base's data with --data FILE"
        raise CommandError(f"{source}: {err}{takes}{tail}") from None
    try:
        C.check_candidates(base, bench.candidates, bench.task)
    except ValueError as err:
        raise CommandError(f"--config {args.config}: {err}") from None


# Above this many class indices, labels that are mostly unused are refused (one output per index).
MAX_SPARSE_CLASSES = 10_000


def _with_data(bench: Benchmark, task: Task) -> Benchmark:
    """The benchmark's base and candidates sized for the user's data."""
    from .. import models

    classes = int(max(task.y_train.max(), task.y_test.max())) + 1
    distinct = len(torch.unique(torch.cat([task.y_train, task.y_test])))
    if classes > MAX_SPARSE_CLASSES and classes > 10 * distinct:
        raise CommandError(f"--data: the labels run up to {classes - 1}, but only {distinct} distinct values occur; the "
                           f"built-in {bench.model} gets one output per class index 0..{classes - 1}: relabel y to "
                           f"0..{distinct - 1}")
    if bench.model == "mlp":
        make = lambda: models.mlp((task.x_train.shape[1], 11, 11, classes))  # noqa: E731
    elif bench.model == "cnn":
        make = lambda: models.ResNetCNN(task.x_train.shape[1], CNN_WIDTHS, (1, 1), classes)  # noqa: E731
    else:
        vocab = int(max(task.x_train.max(), task.x_test.max())) + 1
        make = lambda: models.TinyTransformer(vocab, task.x_train.shape[1], 16, 2, classes)  # noqa: E731
    return dataclasses.replace(bench, task=task, make_base=make)


# ----------------------------------------------------------------------------- outputs


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-inf" if v == -math.inf else "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _pct(v: Optional[float]) -> Optional[float]:
    """A fraction in percent (None stays None: an empty cell)."""
    return None if v is None else 100 * v


def _write_csv(result: C.CompareResult, path: Path) -> None:
    """results.csv: one row per (seed, candidate), one unit per column: counts (seed,
    parameters) as integers, accuracies in percent and gains in percentage points (the unit in
    the column's name: ``test_accuracy_pct``, ``gain_over_base_pct_points``, ``accuracy_pct``),
    times in seconds, then every metric under its name in results.json (the ``parameters``
    baseline is the ``parameters`` column)."""
    settings = C.Settings.from_dict(result.settings)
    names = C.metric_names(settings)
    rows = []
    for u in result.units:
        row = {"seed": int(u["seed"]), "candidate": u["candidate"], "parameters": int(u["parameters"]),
               "test_accuracy_pct": _pct(u["test_accuracy"]), "gain_over_base_pct_points": u["gain_over_base"],
               "gain_over_control_pct_points": u["gain_over_control"],
               "adapted_probe_loss": u["adapted_probe_loss"], "seconds": u["seconds"]}
        for n in names:
            if n == "parameters":
                continue  # the same count as the parameters column
            if n == "accuracy":
                row["accuracy_pct"] = _pct(u["baselines"][n])
            else:
                row[n] = u["sizes"][n[5:]] if n.startswith("size_") else u["baselines"][n]
        rows.append(row)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _tables(result: C.CompareResult, say) -> None:
    default = result.settings["default_estimator"]
    what = "next-token-accuracy" if result.settings.get("loss") == "lm" else "test-accuracy"
    say(f"\nRanking by manifold size ({default}; mean over {result.settings['seeds']} seeds, "
        f"gains in {what} points):")
    say(f"{'rank':>4}  {'candidate':34s} {'params':>7} {'size':>8} {'gain':>7} {'± sd':>6} {'vs control':>10}")
    for r in result.ranking:
        say(f"{r['rank']:>4}  {r['candidate'][:34]:34s} {r['parameters']:>7} {_fmt(r['size']):>8} "
            f"{_fmt(r['gain_over_base'], 2):>7} {_fmt(r['gain_std'], 2):>6} {_fmt(r['gain_over_control'], 2):>10}")
    seeds = result.settings["seeds"]
    say(f"\nCorrelation of each metric with the gain over the base, within each seed and averaged over the "
        f"{seeds} seed{'s' if seeds > 1 else ''} ({len(result.units)} units; 95% intervals resample candidates):")
    say(f"{'metric':24s} {'Spearman':>9} {'interval':>15} {'Kendall':>8} {'pooled':>7} "
        f"{'preserving only':>16} {'interval':>15} {'equal-size order':>16}")
    for c in sorted(result.correlations, key=lambda c: -abs(c["spearman"]) if not math.isnan(c["spearman"]) else 0):
        ci = lambda t: f"[{_fmt(t[0], 2)}, {_fmt(t[1], 2)}]"  # noqa: E731
        say(f"{c['metric']:24s} {_fmt(c['spearman'], 3):>9} {ci(c['spearman_ci']):>15} "
            f"{_fmt(c['kendall'], 3):>8} {_fmt(c['pooled_spearman'], 2):>7} {_fmt(c['preserving_spearman'], 3):>16} "
            f"{ci(c['preserving_spearman_ci']):>15} {_fmt(c['equal_size_order'], 2):>16}")
    say("(pooled: Spearman over all units at once, which seed-to-seed shifts of the base enter; preserving "
        "only: the control and the expansions that preserve the function; equal-size order: share of "
        "same-size candidate pairs put in the order of their gains)")


def _base_summary(result: C.CompareResult, say) -> None:
    """The base's test accuracy, chance level and test loss, then every warning."""
    bases = result.bases
    acc = sum(b["test_accuracy"] for b in bases) / len(bases)
    loss = sum(b["test_loss"] for b in bases) / len(bases)
    mean = f" (mean over {len(bases)} seeds)" if len({b["test_accuracy"] for b in bases}) > 1 else ""
    what = "next-token accuracy" if result.settings.get("loss") == "lm" else "accuracy"
    unigram = bases[0].get("unigram_loss")
    against = f" (unigram model {unigram:.3g}, uniform {bases[0]['chance_loss']:.3g})" if unigram is not None else ""
    say(f"\nbase{mean}: test {what} {100 * acc:.1f}% (chance {100 * bases[0]['chance_accuracy']:.1f}%), "
        f"test loss {loss:.3g}{against}")
    capped = [b for b in bases if b.get("threshold_capped")]
    if capped:
        values = ", ".join(f"{b['threshold']:.3g}" for b in capped)
        say(f"threshold: {result.settings['threshold_multiple']:g} x the base's probe loss would lie more than halfway to the "
            f"chance-level loss ln({bases[0]['outputs']}) = {bases[0]['chance_loss']:.3g} for {len(capped)} of the "
            f"{len(bases)} seeds' bases: capped halfway ({values})")
    for w in result.warnings:
        say(f"warning: {w}")


def _check_out(out: Optional[Path]) -> None:
    """--out names a directory that can be written (before anything is trained)."""
    if out is not None:
        try:
            C.check_out(out)
        except ValueError as err:
            raise CommandError(f"--{err}") from None


def _run_suite(args, say) -> int:
    """--suite: every built-in benchmark, then the cross-task table."""
    from .. import suite as S

    for flag, value in (("--model", args.model), ("--task", args.task), ("--data", args.data),
                        ("--base", args.base), ("--arch", args.arch)):
        if value is not None:
            raise CommandError(f"{flag}: not with --suite (the suite runs every built-in benchmark on its own data)")
    cfg = _load_config(args.config) if args.config else {}
    for key in ("model", "task", "candidates"):
        if key in cfg:
            raise CommandError(f"--config {args.config}: {key} is not used with --suite (each benchmark has its own); "
                               f"set only settings")
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.resume and args.out is None:
        raise CommandError("--resume needs --out: the directory of the suite run to continue")
    _check_out(args.out)
    try:
        benches = suite()
        for b in benches:  # every task's settings, before any training
            C.settings_for(b.quick_version() if args.quick else b, quick=args.quick, **cfg)
    except (ValueError, ImportError) as err:
        raise CommandError(f"{'--config: ' if args.config else ''}{err}") from None
    out = args.out or Path("results") / f"suite-{time.strftime('%Y%m%d-%H%M%S')}"
    say(f"manifold-ext compare --suite: {len(benches)} benchmarks ({', '.join(b.name for b in benches)}) -> {out}")

    def done(name, result):
        p = result.signal.get("friedman_p")
        say(f"  {name}: {len(result.units)} units, {result.seconds:.0f} s, Friedman p = "
            f"{'-' if p is None else f'{p:.2g}'}")
        if args.plot:
            from .. import compare_plots

            bench = next(b for b in benches if b.name == name)
            bench = bench.quick_version() if args.quick else bench
            settings = C.Settings.from_dict(result.settings)
            base = C.load_base(bench, out / name, 0, device=resolve_device(args.device))
            compare_plots.all_figures(bench, settings, result, base, out / name)

    result = S.run_suite(benches, out, quick=args.quick, overrides=cfg, resume=args.resume, quiet=args.quiet,
                         device=resolve_device(args.device), on_task=done)
    say("\nWithin-seed Spearman of each metric with the gains over the base, per task and averaged over the "
        "tasks with signal; equal-size order: share of same-size candidate pairs in the order of their gains "
        "(average over those tasks):")
    say(S.format_table(result))
    say(f"\n{sum(result.seconds.values()):.0f} s; wrote suite.json, suite.csv and one run directory per task in {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    say = (lambda *a: None) if args.quiet or not D.is_main() else print
    if args.suite:
        if args.plot and not have_matplotlib():
            raise CommandError("--plot needs matplotlib (pip install matplotlib), or pass --no-plot")
        return _run_suite(args, say)
    if args.plot is None:
        args.plot = have_matplotlib()
    elif args.plot and not have_matplotlib():
        raise CommandError("--plot needs matplotlib (pip install matplotlib), or pass --no-plot")
    device = resolve_device(args.device)
    bench, settings, given = _setup(args)
    if args.resume and args.out is None:
        raise CommandError("--resume needs --out: the directory of the run to continue")
    _check_out(args.out)
    if args.out is not None and args.resume and not (args.out / "config.json").exists():
        raise CommandError(f"--resume: {str(args.out)!r} holds no compare run (no config.json)")
    # Under torchrun, rank 0 names the fresh directory for every rank.
    out = args.out or D.broadcast(Path("results") / f"compare-{bench.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    what = f"base {args.base}" if given is not None else bench.model
    say(f"manifold-ext compare: {what} on {bench.task.name}, {len(bench.candidates)} candidates, "
        f"{settings.seeds} seeds -> {out}")
    result = C.compare(bench, settings, out, base=given, resume=args.resume, quiet=args.quiet, device=device)
    if not D.is_main():
        return 0
    _base_summary(result, say)
    _write_csv(result, out / "results.csv")
    written = ["results.json", "results.csv"]
    if args.plot:
        from .. import compare_plots

        base = C.load_base(bench, out, 0, base=given, device=device)
        bench = dataclasses.replace(bench, task=bench.task.to(device))
        with D.local():  # rank 0 alone draws: its probes must not wait for the other ranks
            written += [p.name for p in compare_plots.all_figures(bench, settings, result, base, out)]
    _tables(result, say)
    say(f"\n{result.seconds:.0f} s; wrote {', '.join(written)} in {out}")
    return 0
