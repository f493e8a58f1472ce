"""What ``probe`` and ``expand`` share: architecture specs (``--model``), checkpoints and data.

Every bad input is a :class:`CommandError` naming the argument, what was expected and what was
found, so that ``main`` reports it in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .. import models
from ._args import CommandError

# ----------------------------------------------------------------------------- --model

MODEL_SYNTAX = ("mlp:W0-W1-...-Wn[,act=A][,norm=N], resnet[:W1-W2-...][,blocks=B1-B2-...][,in=C][,classes=N] "
                "or transformer:vocab=V,length=T,width=W,heads=H,classes=N[,depth=D][,ff=F]")

MODEL_HELP = "the architecture of checkpoints that hold a state dict, e.g. mlp:64-32-10 (see 'model specs' below)"

MODEL_EPILOG = f"""\
model specs (--model SPEC: the architecture of checkpoints that hold a state dict; a checkpoint
holding a whole model needs none, and must match it when it is given):
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


def load_checkpoint(path: Path, model_spec: Optional[str]) -> nn.Module:
    """The model a checkpoint holds: a whole ``nn.Module``, a dict ``{"model": nn.Module}``
    (what ``manifold-ext expand`` writes), or a state dict (also under ``"model"`` or
    ``"state_dict"``) loaded into ``--model``'s architecture. In eval mode, on the CPU."""
    label = f"CHECKPOINT {str(path)}"
    if not path.exists():
        raise CommandError(f"{label}: no such file")
    if path.is_dir():
        raise CommandError(f"{label}: is a directory, expected a file written by torch.save")
    try:
        # Whole modules are pickled objects, so weights_only=False: load only files you trust.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is a bad file
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise CommandError(f"{label}: torch.load cannot read it ({type(err).__name__}: {why}); "
                           f"expected a file written by torch.save") from err
    if isinstance(obj, Mapping) and "model" in obj and not _is_state_dict(obj):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        model = obj
        if model_spec is not None:
            why = compare_states(_state(build_model(model_spec)), f"--model {model_spec}", _state(model), str(path))
            if why:
                raise CommandError(f"{label} does not match --model {model_spec}: {why}")
        return model.eval()
    if not _is_state_dict(obj):
        raise CommandError(f"{label}: expected an nn.Module, a dict {{'model': nn.Module}} or a state dict "
                           f"(a dict of tensors), got {_describe(obj)}")
    if model_spec is None:
        raise CommandError(f"{label} holds a state dict, which has no architecture: give it with --model "
                           f"(e.g. --model mlp:64-32-10; see --help)")
    model = build_model(model_spec)
    why = compare_states(_state(model), f"--model {model_spec}", obj, str(path))
    if why:
        raise CommandError(f"{label} does not match --model {model_spec}: {why}")
    dtypes = {t.dtype for t in obj.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    model.load_state_dict(obj)
    return model.eval()


def load_checkpoints(paths: List[Path], model_spec: Optional[str]) -> List[nn.Module]:
    """Every checkpoint's model; all of one architecture (else a CommandError naming the files)."""
    out = [load_checkpoint(p, model_spec) for p in paths]
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
    "holding a dict with tensors X and y or a tuple (X, y); y holds integer class labels"
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
    label = str(path)
    if not path.exists():
        raise CommandError(f"--data {label}: no such file")
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as arrays:
                found = {k: arrays[k] for k in arrays.files}
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--data {label}: numpy cannot read it as .npz ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0][:200]})") from err
        missing = [k for k in ("X", "y") if k not in found]
        if missing:
            raise CommandError(f"--data {label}: expected arrays X and y, got arrays [{', '.join(map(repr, found))}]")
        return found["X"], found["y"]
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--data {label}: torch.load cannot read it ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0][:200]})") from err
        if isinstance(obj, Mapping) and "X" in obj and "y" in obj:
            return obj["X"], obj["y"]
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return obj[0], obj[1]
        raise CommandError(f"--data {label}: expected a dict with X and y or a tuple (X, y), got {_describe(obj)}"
                           + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    raise CommandError(f"--data: expected 'digits', FILE.npz or FILE.pt, got {label!r}")


@torch.no_grad()
def load_data(source: str, model: nn.Module, *, check_rows: int = 256) -> Data:
    """The data ``source`` names, checked against ``model``: as many labels as inputs, inputs of
    the shape and type the model takes (tried on the first ``check_rows``), labels within its
    outputs."""
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
    was_training = model.training
    model.eval()
    try:
        out = model(x[:check_rows])
    except Exception as err:  # noqa: BLE001 - whatever the model raises on inputs it cannot take
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise CommandError(f"--data {label}: X of shape {tuple(x.shape)} does not fit the model: it takes "
                           f"{expected_input(model)} ({type(err).__name__}: {why})") from err
    finally:
        model.train(was_training)
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
