"""What ``probe`` and ``expand`` share: architecture specs (``--model``), checkpoints and data.

Files are read with ``torch.load(weights_only=True)``, which never runs code from the file;
only checkpoints, and only with ``--allow-pickle``, may be unpickled in full.

Every bad input is a :class:`CommandError` naming the argument, what was expected and what was
found, so that ``main`` reports it in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import models
from .._safe_load import PickledObjectsError, load_tensors, reason
from ..training import evaluating
from ._args import CommandError

# ----------------------------------------------------------------------------- --model

MODEL_SYNTAX = ("mlp:W0-W1-...-Wn[,act=A][,norm=N], resnet[:W1-W2-...][,blocks=B1-B2-...][,in=C][,classes=N] "
                "or transformer:vocab=V,length=T,width=W,heads=H,classes=N[,depth=D][,ff=F]")

MODEL_HELP = "the architecture of checkpoints that hold a state dict, e.g. mlp:64-32-10 (see 'model specs' below)"

MODEL_EPILOG = f"""\
model specs (--model SPEC: the architecture of checkpoints that hold a state dict; a file written
by 'manifold-ext expand' or a whole model (--allow-pickle) needs none, and must match it when it
is given):
  mlp:W0-W1-...-Wn[,act=A][,norm=N]
      manifold_ext.models.mlp: W0 inputs, hidden widths, Wn outputs (e.g. mlp:64-32-10);
      act: {', '.join(models.ACTIVATIONS)} (default relu); norm: none (default), batch or layer
  resnet[:W1-W2-...][,blocks=B1-B2-...][,in=C][,classes=N]
      manifold_ext.models.ResNetCNN: stage widths (default 16-32), blocks per stage (default 1
      each), input channels (default 1), classes (default 10)
  transformer:vocab=V,length=T,width=W,heads=H,classes=N[,depth=D][,ff=F]
      manifold_ext.models.TinyTransformer (depth default 1, feed-forward width ff default 4*W)
"""


def _ints(value: str, key: str, spec: str, low: int = 1) -> List[int]:
    try:
        out = [int(v) for v in value.split("-")]
    except ValueError:
        raise CommandError(f"--model {spec!r}: {key} must be integers joined by '-' (e.g. 16-32), "
                           f"got {value!r}") from None
    if any(v < low for v in out):
        raise CommandError(f"--model {spec!r}: {key} must be integers >= {low}, got {value!r}")
    return out


def _int(value: str, key: str, spec: str, low: int = 1) -> int:
    try:
        v = int(value)
    except ValueError:
        raise CommandError(f"--model {spec!r}: {key} must be an integer >= {low}, got {value!r}") from None
    if v < low:
        raise CommandError(f"--model {spec!r}: {key} must be an integer >= {low}, got {value!r}")
    return v


def build_model(spec: str) -> nn.Module:
    """A freshly initialised model of the architecture ``spec`` (see :data:`MODEL_SYNTAX`); the
    caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _build_model(spec)


def _build_model(spec: str) -> nn.Module:
    family, _, rest = spec.partition(":")
    parts = rest.split(",") if rest else []
    positional, options = None, {}
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if i != 0:
                raise CommandError(f"--model {spec!r}: expected key=value after the first ',', got {part!r} "
                                   f"(syntax: {MODEL_SYNTAX})")
            positional = part
        elif key in options:
            raise CommandError(f"--model {spec!r}: {key} given twice")
        else:
            options[key] = value

    def check_keys(allowed):
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise CommandError(f"--model {spec!r}: unknown option {unknown[0]!r} for {family}; "
                               f"expected one of {', '.join(allowed)}")

    if family == "mlp":
        check_keys(("widths", "act", "norm"))
        widths = positional if positional is not None else options.get("widths")
        if widths is None:
            raise CommandError(f"--model {spec!r}: mlp needs its widths, e.g. mlp:64-32-10")
        w = _ints(widths, "widths", spec)
        if len(w) < 2:
            raise CommandError(f"--model {spec!r}: mlp needs at least 2 widths (inputs and outputs), got {widths!r}")
        act = options.get("act", "relu")
        if act not in models.ACTIVATIONS:
            raise CommandError(f"--model {spec!r}: act must be one of {', '.join(models.ACTIVATIONS)}, got {act!r}")
        norm = options.get("norm", "none")
        norm = None if norm == "none" else norm
        if norm is not None and norm not in models.NORMS:
            raise CommandError(f"--model {spec!r}: norm must be none or one of {', '.join(models.NORMS)}, got {norm!r}")
        return models.mlp(w, act=act, norm=norm)
    if family == "resnet":
        check_keys(("widths", "blocks", "in", "classes"))
        widths = positional if positional is not None else options.get("widths", "16-32")
        w = _ints(widths, "widths", spec)
        b = _ints(options["blocks"], "blocks", spec) if "blocks" in options else [1] * len(w)
        if len(b) != len(w):
            raise CommandError(f"--model {spec!r}: blocks must give one count per stage width "
                               f"({len(w)}), got {options['blocks']!r}")
        return models.ResNetCNN(in_channels=_int(options.get("in", "1"), "in", spec), widths=w, blocks=b,
                                classes=_int(options.get("classes", "10"), "classes", spec))
    if family == "transformer":
        check_keys(("vocab", "length", "width", "heads", "classes", "depth", "ff"))
        if positional is not None:
            raise CommandError(f"--model {spec!r}: transformer takes key=value options only, got {positional!r}")
        missing = [k for k in ("vocab", "length", "width", "heads", "classes") if k not in options]
        if missing:
            raise CommandError(f"--model {spec!r}: transformer needs {', '.join(k + '=' for k in missing)} "
                               f"(syntax: transformer:vocab=V,length=T,width=W,heads=H,classes=N[,depth=D][,ff=F])")
        kw = {k: _int(options[k], k, spec) for k in ("vocab", "length", "width", "heads", "classes")}
        width, heads = kw["width"], kw["heads"]
        if width % heads:
            raise CommandError(f"--model {spec!r}: width must be divisible by heads, got width={width}, heads={heads}")
        return models.TinyTransformer(kw["vocab"], kw["length"], width, heads, kw["classes"],
                                      depth=_int(options.get("depth", "1"), "depth", spec),
                                      ff_width=_int(options["ff"], "ff", spec) if "ff" in options else None)
    raise CommandError(f"--model {spec!r}: unknown architecture {family!r}; expected {MODEL_SYNTAX}")


# ----------------------------------------------------------------------------- checkpoints


def _state(model: nn.Module) -> Dict[str, Tensor]:
    out = dict(model.state_dict())
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def compare_states(ref: Mapping, ref_name: str, other: Mapping, other_name: str) -> Optional[str]:
    """None when the two states have the same tensor names and shapes, else why not (naming
    the first parameter that differs, in ``ref``'s order)."""
    for name, t in ref.items():
        if name not in other:
            return f"{other_name} has no parameter {name!r} ({ref_name} has it, shape {tuple(t.shape)})"
        if other[name].shape != t.shape:
            return (f"parameter {name!r} has shape {tuple(other[name].shape)} in {other_name} but "
                    f"{tuple(t.shape)} in {ref_name}")
    for name, t in other.items():
        if name not in ref:
            return f"{other_name} has a parameter {name!r} that {ref_name} lacks (shape {tuple(t.shape)})"
    return None


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:5]]
        more = ", ..." if len(obj) > 5 else ""
        return f"a dict with keys [{', '.join(keys)}{more}]"
    return f"a {type(obj).__name__}"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _is_recipe(obj) -> bool:
    """What ``manifold-ext expand`` writes: the grown weights and how to rebuild their architecture."""
    return (isinstance(obj, Mapping) and {"state_dict", "base_model", "specs"} <= set(obj)
            and _is_state_dict(obj["state_dict"]))


ALLOW_PICKLE_HELP = (
    "also load checkpoints that hold pickled Python objects (a whole nn.Module, as torch.save(model) "
    "writes). Unpickling runs any code the file carries: use this only for files you trust. Without "
    "it, checkpoints are loaded with torch.load(weights_only=True), which reads tensors only: a state "
    "dict (with --model SPEC) or a file written by 'manifold-ext expand'"
)

CHECKPOINT_HELP = (
    "a file saved with torch.save holding a state dict (then give --model SPEC) or written by "
    "'manifold-ext expand'; a whole nn.Module or a dict {'model': nn.Module} needs --allow-pickle"
)


def _read(path: Path, label: str, allow_pickle: bool):
    try:
        return load_tensors(path)
    except PickledObjectsError as err:
        if not allow_pickle:
            raise CommandError(
                f"{label}: holds pickled Python objects, not just tensors (it calls {err.name}, which loading "
                f"with weights_only=True refuses); unpickling runs any code a file carries: pass --allow-pickle "
                f"only for a file you trust, or save a state dict (torch.save(model.state_dict(), FILE)) and "
                f"load it with --model SPEC") from None
    except Exception as err:  # noqa: BLE001 - any other failure to load is a bad file
        raise CommandError(f"{label}: torch.load cannot read it ({reason(err)}); "
                           f"expected a file written by torch.save") from err
    # --allow-pickle: a full unpickling, which runs whatever code the file carries.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise CommandError(f"{label}: torch.load cannot read it ({reason(err)}); "
                           f"expected a file written by torch.save") from err


def _load_state(model: nn.Module, state: Mapping, label: str, arch: str, path: Path) -> nn.Module:
    """``model`` (of the architecture ``arch``, in words) with ``state`` loaded strictly, in the
    state's floating dtype when it has one."""
    why = compare_states(_state(model), arch, state, str(path))
    if why:
        raise CommandError(f"{label} does not match {arch}: {why}")
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    model.load_state_dict(state)
    return model


def _rebuild(recipe: Mapping, label: str, path: Path) -> nn.Module:
    """The grown model a recipe describes: its base architecture grown by its specs (whatever
    the initialisation: the saved weights replace it)."""
    from ..builtin import spec_from_dict
    from ..expand import expand

    spec, raw = recipe["base_model"], recipe["specs"]
    if not isinstance(spec, str):
        raise CommandError(f"{label}: its base_model must be a --model spec string, got {_describe(spec)}")
    try:
        base = build_model(spec)
    except CommandError as err:
        raise CommandError(f"{label}: its base_model is not an architecture ({err})") from None
    try:
        specs = [spec_from_dict(d) for d in raw]
        grown, _ = expand(base, *specs, generator=torch.Generator().manual_seed(0)) if specs else (base, None)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CommandError(f"{label}: its specs do not grow its base_model {spec} ({type(err).__name__}: "
                           f"{(str(err).splitlines() or [''])[0][:200]})") from None
    arch = f"its recipe ({spec}" + (f" grown by {len(specs)} spec{'s' if len(specs) > 1 else ''})" if specs else ")")
    return _load_state(grown, recipe["state_dict"], label, arch, path)


def read_checkpoint(path: Path, model_spec: Optional[str], *,
                    allow_pickle: bool = False) -> Tuple[nn.Module, Optional[dict]]:
    """The model a checkpoint holds, and its recipe when its architecture is known as data.

    Without ``allow_pickle`` the file is loaded with ``torch.load(weights_only=True)``, which
    never runs code from the file: a state dict (also under ``"model"`` or ``"state_dict"``)
    loaded into ``model_spec``'s architecture, or a recipe that ``manifold-ext expand`` writes
    (``{"state_dict", "report", "base_model", "specs"}``: ``base_model`` a ``--model`` spec,
    ``specs`` the growth specs as dicts, rebuilt with :func:`manifold_ext.expand.expand`). A
    file that holds other pickled objects is a CommandError naming ``--allow-pickle``; with
    it, a whole ``nn.Module`` or a dict ``{"model": nn.Module}`` loads too (unpickling runs
    any code the file carries). A ``model_spec`` given for a module or a recipe must match it.

    Returns ``(model, recipe)``: the model in eval mode on the CPU, and ``{"base_model": spec,
    "specs": [dict, ...]}`` that rebuilds its architecture, or None when it came from a pickled
    module (or a recipe without a base_model, loaded into ``model_spec``).
    """
    label = f"CHECKPOINT {str(path)}"
    if not path.exists():
        raise CommandError(f"{label}: no such file")
    if path.is_dir():
        raise CommandError(f"{label}: is a directory, expected a file written by torch.save")
    obj = _read(path, label, allow_pickle)
    recipe = None
    if _is_recipe(obj) and obj["base_model"] is not None:
        model = _rebuild(obj, label, path)
        recipe = {"base_model": obj["base_model"], "specs": [dict(d) for d in obj["specs"]]}
        if model_spec is not None:
            why = compare_states(_state(build_model(model_spec)), f"--model {model_spec}", _state(model), str(path))
            if why:
                raise CommandError(f"{label} does not match --model {model_spec}: {why}")
        return model.eval(), recipe
    if _is_recipe(obj):
        if model_spec is None:
            raise CommandError(f"{label} holds a grown model's weights without their architecture (its base was "
                               f"a pickled module): give the grown model's architecture with --model SPEC")
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and not _is_state_dict(obj):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        model = obj
        if model_spec is not None:
            why = compare_states(_state(build_model(model_spec)), f"--model {model_spec}", _state(model), str(path))
            if why:
                raise CommandError(f"{label} does not match --model {model_spec}: {why}")
        return model.eval(), None
    if not _is_state_dict(obj):
        raise CommandError(f"{label}: expected a state dict (a dict of tensors), a file written by 'manifold-ext "
                           f"expand', or with --allow-pickle an nn.Module or a dict {{'model': nn.Module}}, "
                           f"got {_describe(obj)}")
    if model_spec is None:
        raise CommandError(f"{label} holds a state dict, which has no architecture: give it with --model "
                           f"(e.g. --model mlp:64-32-10; see --help)")
    model = _load_state(build_model(model_spec), obj, label, f"--model {model_spec}", path)
    return model.eval(), {"base_model": model_spec, "specs": []}


def load_checkpoint(path: Path, model_spec: Optional[str], allow_pickle: bool = False) -> nn.Module:
    """The model a checkpoint holds (see :func:`read_checkpoint`), in eval mode, on the CPU.

    Loaded with ``torch.load(weights_only=True)`` unless ``allow_pickle`` (only for files you
    trust: unpickling runs any code the file carries)."""
    return read_checkpoint(path, model_spec, allow_pickle=allow_pickle)[0]


def load_checkpoints(paths: List[Path], model_spec: Optional[str], allow_pickle: bool = False) -> List[nn.Module]:
    """Every checkpoint's model; all of one architecture (else a CommandError naming the files)."""
    out = [load_checkpoint(p, model_spec, allow_pickle) for p in paths]
    ref = _state(out[0])
    for p, m in zip(paths[1:], out[1:]):
        st = _state(m)
        why = compare_states(ref, str(paths[0]), st, str(p))
        if why is None:
            bad = [n for n in ref if st[n].dtype != ref[n].dtype]
            if bad:
                why = (f"parameter {bad[0]!r} has dtype {st[bad[0]].dtype} in {p} but "
                       f"{ref[bad[0]].dtype} in {paths[0]}")
        if why:
            raise CommandError(f"CHECKPOINT: {paths[0]} and {p} are of different architectures: {why}")
    return out


# ----------------------------------------------------------------------------- data

DATA_HELP = (
    "'digits' (the built-in digits test split, 719 examples of 64 features; "
    "reshaped to (N, 1, 8, 8) for convolutional models), FILE.npz with arrays X and y, or FILE.pt "
    "holding torch tensors as a dict with X and y or a tuple (X, y) (read with weights_only=True: "
    "never unpickled, so no numpy arrays); y holds integer class labels"
)


def first_layer(model: nn.Module) -> Optional[nn.Module]:
    """The first Linear, Conv or Embedding of ``model`` (in module order): what reads the input."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            return m
    return None


def expected_input(model: nn.Module) -> str:
    """The input shape ``model`` takes, in words."""
    layer = first_layer(model)
    if isinstance(layer, nn.Linear):
        return f"inputs of shape (N, {layer.in_features})"
    if isinstance(layer, nn.Conv2d):
        return f"images of shape (N, {layer.in_channels}, H, W)"
    if isinstance(layer, nn.Conv1d):
        return f"inputs of shape (N, {layer.in_channels}, L)"
    if isinstance(layer, nn.Embedding):
        length = getattr(model, "length", None)
        tail = f", T <= {length}" if isinstance(length, int) else ""
        return f"integer token ids of shape (N, T) in [0, {layer.num_embeddings}){tail}"
    return "inputs of the shape its first layer takes"


@dataclass
class Data:
    x: Tensor
    y: Tensor
    label: str  # for messages and summaries


def as_tensor(value, name: str, label: str) -> Tensor:
    """``value`` as a tensor, or a CommandError naming --data and what it holds."""
    try:
        return torch.as_tensor(value)
    except Exception:  # noqa: BLE001
        raise CommandError(f"--data {label}: {name} must be an array or tensor, got {_describe(value)}") from None


def read_arrays(path: Path):
    """The raw (X, y) of a .npz or .pt data file (CommandError naming --data otherwise)."""
    found = read_data(path)
    return found["X"], found["y"]


def read_data(path: Path, *, tokens: bool = False) -> dict:
    """The raw arrays of a .npz or .pt data file: ``{"X": X, "y": y}`` (a .npz with arrays X and
    y; a .pt holding a dict with X and y or a tuple (X, y)), or with ``tokens`` also
    ``{"tokens": tokens}``, a language model's token sequences (a .npz with an array tokens; a
    .pt holding a dict {'tokens': tensor}). A .pt file is read with ``weights_only=True``, never
    unpickled. CommandError naming --data otherwise."""
    label = str(path)
    if not path.exists():
        raise CommandError(f"--data {label}: no such file")
    if path.suffix == ".npz":
        import numpy as np

        with open(path, "rb") as f:
            magic = f.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise CommandError(f"--data {label}: not a .npz file (a zip archive of arrays, as numpy.savez writes it): "
                               f"it starts with the bytes {magic!r}")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                found = {k: arrays[k] for k in arrays.files}
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--data {label}: numpy cannot read it as .npz ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0][:200]})") from err
        if tokens and "tokens" in found:
            return _tokens_only(found, label, "arrays")
        missing = [k for k in ("X", "y") if k not in found]
        if missing:
            want = "an array tokens (token sequences) or arrays X and y" if tokens else "arrays X and y"
            raise CommandError(f"--data {label}: expected {want}, got arrays [{', '.join(map(repr, found))}]")
        return {"X": found["X"], "y": found["y"]}
    if path.suffix in (".pt", ".pth"):
        try:
            obj = load_tensors(path)  # weights_only=True, whatever the checkpoints' --allow-pickle
        except PickledObjectsError as err:
            raise CommandError(
                f"--data {label}: holds pickled Python objects, not just tensors (it calls {err.name}, which "
                f"loading with weights_only=True refuses); a .pt data file is never unpickled: save torch "
                f"tensors as a dict {{'X': X, 'y': y}} or a tuple (X, y) (numpy arrays: torch.from_numpy "
                f"them, or save FILE.npz)") from None
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--data {label}: torch.load cannot read it ({reason(err)})") from err
        if tokens and isinstance(obj, Mapping) and "tokens" in obj:
            return _tokens_only(obj, label, "keys")
        if isinstance(obj, Mapping) and "X" in obj and "y" in obj:
            return {"X": obj["X"], "y": obj["y"]}
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return {"X": obj[0], "y": obj[1]}
        want = "a dict {'tokens': tokens} (token sequences), a dict with X and y" if tokens else "a dict with X and y"
        raise CommandError(f"--data {label}: expected {want} or a tuple (X, y), got {_describe(obj)}"
                           + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    raise CommandError(f"--data: expected 'digits', FILE.npz or FILE.pt, got {label!r}")


def _tokens_only(found: Mapping, label: str, what: str) -> dict:
    """``{"tokens": ...}`` of a token file; one that also holds X or y is ambiguous."""
    also = [k for k in ("X", "y") if k in found]
    if also:
        raise CommandError(f"--data {label}: holds both tokens (token sequences) and {' and '.join(also)}; expected "
                           f"either {what} tokens or X and y")
    return {"tokens": found["tokens"]}


@torch.no_grad()
def load_data(source: str, model: nn.Module, *, check_rows: int = 256) -> Data:
    """The data ``source`` names, checked against ``model``: as many labels as inputs, inputs of
    the shape and type the model takes (tried on the first ``check_rows``), labels within its
    outputs; on the model's device."""
    layer = first_layer(model)
    if source == "digits":
        from ..data import load_digits

        if isinstance(layer, nn.Embedding):
            raise CommandError(f"--data digits: the built-in digits are 8x8 images, but the model takes "
                               f"{expected_input(model)}: pass --data FILE.npz or FILE.pt")
        d = load_digits()  # the default split (seed 0), as models trained on load_digits() use
        x, y = d.x_test, d.y_test
        label = "digits"
        if isinstance(layer, nn.Conv2d):
            x = x.reshape(-1, 1, 8, 8)
    else:
        label = source
        xv, yv = read_arrays(Path(source))
        x, y = as_tensor(xv, "X", label), as_tensor(yv, "y", label)
    if x.dim() == 0 or y.dim() != 1:
        raise CommandError(f"--data {label}: expected X with one row per example and y of shape (N,), got X of "
                           f"shape {tuple(x.shape)} and y of shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise CommandError(f"--data {label}: X has {len(x)} rows but y has {len(y)}; expected one label per row")
    if len(x) == 0:
        raise CommandError(f"--data {label}: expected at least one example, got none")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise CommandError(f"--data {label}: y must hold integer class labels, got dtype {y.dtype}")
    y = y.long()
    if isinstance(layer, nn.Embedding):
        if x.is_floating_point() or x.dtype == torch.bool:
            raise CommandError(f"--data {label}: the model takes {expected_input(model)}, got X of dtype {x.dtype}")
        x = x.long()
        if x.min() < 0 or x.max() >= layer.num_embeddings:
            raise CommandError(f"--data {label}: the model takes {expected_input(model)}, got token ids in "
                               f"[{x.min().item()}, {x.max().item()}]")
    else:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        x = x.to(param.dtype if param is not None else torch.get_default_dtype())
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    try:
        with evaluating(model):
            out = model(x[:check_rows])
    except Exception as err:  # noqa: BLE001 - whatever the model raises on inputs it cannot take
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise CommandError(f"--data {label}: X of shape {tuple(x.shape)} does not fit the model: it takes "
                           f"{expected_input(model)} ({type(err).__name__}: {why})") from err
    if out.dim() != 2:
        raise CommandError(f"--data {label}: expected the model to output logits of shape (N, classes), got "
                           f"{tuple(out.shape)}")
    classes = out.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise CommandError(f"--data {label}: y holds labels in [{y.min().item()}, {y.max().item()}], but the model "
                           f"has {classes} outputs (expected labels in [0, {classes}))")
    return Data(x=x, y=y, label=f"{label} ({len(y)} examples)")


def fmt(v: float) -> str:
    """A float for a summary line."""
    return "nan" if not math.isfinite(v) else f"{v:.4g}"
