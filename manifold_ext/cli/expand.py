"""``manifold-ext expand``: grow a saved model by Widen/Deepen specs, check that a preserving
expansion preserves the function, and save the grown model with its report."""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import models
from ..builtin import spec_to_dict
from ..expand import DEPTH_INITS, WIDTH_INITS, Deepen, Widen
from ..expand import expand as grow
from ._args import CommandError, add_device_argument, resolve_device
from ._load import (ALLOW_PICKLE_HELP, CHECKPOINT_HELP, DATA_HELP, MODEL_EPILOG, MODEL_HELP, expected_input,
                    first_layer, load_data, read_checkpoint)

WIDEN_SYNTAX = "TARGET[:FACTOR|=SIZE][@INIT[+NOISE]]"
DEEPEN_SYNTAX = "AFTER[:COUNT][@INIT[+NOISE]]"
_RANDOM_ROWS = 64  # random check inputs when no --data is given

_EPILOG = f"""\
growth specs (applied in the order given, --widen and --deepen interleaved; each path refers to
the model as the previous specs left it):
  --widen {WIDEN_SYNTAX}
      TARGET   a module path or fnmatch glob: '0' (a Linear/Conv2d of an nn.Sequential),
               '*' (every hidden layer), 'stages.0.0.conv1' or 'stages.1' (ResNetCNN),
               'blocks.*.ff1', 'blocks.0.qkv' (heads), 'tok' (residual width) (TinyTransformer)
      :FACTOR  new width round(width * FACTOR), FACTOR >= 1 (default :2)
      =SIZE    new width SIZE (heads, for 'blocks.<i>.qkv')
      @INIT    {' | '.join(WIDTH_INITS)} (default net2net; net2net and zero preserve the function)
      +NOISE   std of Gaussian noise on the new weights (default 0; > 0 is not preserving)
  --deepen {DEEPEN_SYNTAX}
      AFTER    where the new blocks go: '1' (after that module of an nn.Sequential),
               'stages.0' (ResNetCNN stage), 'blocks.0' (TinyTransformer block), or a glob
      :COUNT   how many blocks (default :1)
      @INIT    {' | '.join(DEPTH_INITS)} (default: identity for an nn.Sequential, zero for
               ResNetCNN and TinyTransformer: the preserving ones)
      +NOISE   as for --widen

examples:
  manifold-ext expand base.pt --model mlp:64-32-10 --widen '*:2' --deepen 1 --out grown.pt
  manifold-ext expand grown.pt --widen 0=96@zero --out grown2.pt
  manifold-ext expand resnet.pt --model resnet --widen 'stages.*.0.conv1:1.5' --deepen stages.1:2@zero --out big.pt

OUT holds data only, loadable with torch.load(weights_only=True): torch.save({{"state_dict":
grown weights, "report": report dict, "base_model": the base's --model SPEC, "specs": [the
growth specs as dicts, those CHECKPOINT was grown by first]}}). probe and expand rebuild the
grown model from it (the base architecture grown by the specs, the weights loaded): no --model
or --allow-pickle needed. When CHECKPOINT is a pickled module (--allow-pickle), its architecture
is not known as data: base_model is None, and loading OUT needs the grown model's architecture
(--model SPEC, or in Python load_state_dict(torch.load(OUT, weights_only=True)["state_dict"])
into it). The ExpansionReport also goes next to OUT as JSON (OUT with .json).

When the expansion claims to preserve the function, max |grown(x) - base(x)| (eval mode) must
be <= --tolerance on the check inputs (the --data inputs, else {_RANDOM_ROWS} random inputs of
the model's input shape), otherwise nothing is written and the exit status is 1.
"""


class _AppendSpec(argparse.Action):
    """--widen and --deepen append (option, text) to one list, so their order is kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        specs = list(getattr(namespace, self.dest) or [])
        specs.append((option_string, values))
        setattr(namespace, self.dest, specs)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_parser(sub, common) -> None:
    """Register ``expand`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "expand", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="grow a saved model (wider or deeper), check that it computes the same function, save it",
        description=textwrap.fill(
            "Load CHECKPOINT, grow a copy of it by the --widen/--deepen specs (manifold_ext.expand), "
            "check function preservation numerically where the expansion claims it, save the grown "
            "model and its ExpansionReport, and print a summary. Checkpoints are loaded with "
            "torch.load(weights_only=True), which never runs code from the file; a whole pickled "
            "nn.Module needs --allow-pickle (only for files you trust).", 90),
        epilog=_EPILOG + "\n" + MODEL_EPILOG,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path,
                   help=CHECKPOINT_HELP)
    p.add_argument("--widen", dest="specs", action=_AppendSpec, metavar="SPEC",
                   help=f"widen layers: {WIDEN_SYNTAX} (see below); repeatable")
    p.add_argument("--deepen", dest="specs", action=_AppendSpec, metavar="SPEC",
                   help=f"insert blocks: {DEEPEN_SYNTAX} (see below); repeatable")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.pt",
                   help="where to save the grown model; the report goes to FILE.json")
    p.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    add_device_argument(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the random choices of the expansion (net2net copies, fresh weights, noise) "
                   "(default: 0)")
    p.add_argument("--tolerance", type=_non_negative, default=1e-5, metavar="T",
                   help="largest max |grown(x) - base(x)| accepted for a preserving expansion (default: 1e-5)")
    p.add_argument("--data", metavar="FILE|digits",
                   help="check preservation on these inputs instead of random ones: " + DATA_HELP)
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run, specs=None)


# ----------------------------------------------------------------------------- spec syntax


def _number(text: str, what: str, bad, *, integer: bool, low: float) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not value >= low or (not integer and math.isinf(value)):
        kind = "an integer" if integer else "a number"
        raise bad(f"{what} must be {kind} >= {low:g}, got {text!r}")
    return value


def _split_init(text: str, bad, inits) -> Tuple[str, Optional[str], float]:
    head, at, tail = text.partition("@")
    if not at:
        return head, None, 0.0
    init, plus, noise = tail.partition("+")
    if init not in inits:
        raise bad(f"INIT must be one of {', '.join(inits)}, got {init!r}")
    return head, init, _number(noise, "NOISE", bad, integer=False, low=0) if plus else 0.0


def parse_widen(text: str) -> Tuple[str, dict]:
    """``--widen`` text -> ("widen", Widen keyword arguments); CommandError on bad syntax."""
    def bad(why):
        return CommandError(f"--widen {text!r}: {why} (expected {WIDEN_SYNTAX}, e.g. '0:2@net2net' or '*=48')")

    head, init, noise = _split_init(text, bad, WIDTH_INITS)
    m = re.fullmatch(r"([^:=]*)(?::(.*)|=(.*))?", head)
    target, factor, size = m.groups()
    if not target:
        raise bad("TARGET is empty")
    kw = {"target": target, "init": init or "net2net", "noise": noise}
    if size is not None:
        kw["size"] = _number(size, "SIZE", bad, integer=True, low=1)
    else:
        kw["factor"] = 2.0 if factor is None else _number(factor, "FACTOR", bad, integer=False, low=1)
    return "widen", kw


def parse_deepen(text: str) -> Tuple[str, dict]:
    """``--deepen`` text -> ("deepen", Deepen keyword arguments; init None for the default)."""
    def bad(why):
        return CommandError(f"--deepen {text!r}: {why} (expected {DEEPEN_SYNTAX}, e.g. '2' or 'stages.0:2@zero')")

    head, init, noise = _split_init(text, bad, DEPTH_INITS)
    after, colon, count = head.partition(":")
    if not after or "=" in after:
        raise bad("AFTER is empty" if not after else "AFTER must be a module path or glob, without '='")
    kw = {"after": after, "count": _number(count, "COUNT", bad, integer=True, low=1) if colon else 1,
          "init": init, "noise": noise}
    return "deepen", kw


def _specs(raw: List[Tuple[str, str]], model: nn.Module) -> list:
    out = []
    residual = isinstance(model, (models.ResNetCNN, models.TinyTransformer))
    for op, kw in raw:
        if op == "widen":
            out.append(Widen(**kw))
        else:
            out.append(Deepen(**{**kw, "init": kw["init"] or ("zero" if residual else "identity")}))
    return out


# ----------------------------------------------------------------------------- run


def _random_inputs(model: nn.Module) -> Optional[Tensor]:
    """Random inputs for the ``nn.Sequential`` models ``expand`` has no default for (those whose
    first child is not a Linear): (N, in_features) for a first Linear (e.g. after a Flatten), 8x8
    images (the size of the built-in digits) for a first Conv2d."""
    layer = first_layer(model)
    if not isinstance(model, nn.Sequential) or isinstance(next(iter(model.children()), None), nn.Linear):
        return None  # expand's defaults: MLPs, ResNetCNN, TinyTransformer
    g = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        x = torch.randn(_RANDOM_ROWS, layer.in_features, generator=g)
    elif isinstance(layer, nn.Conv2d):
        x = torch.randn(_RANDOM_ROWS, layer.in_channels, 8, 8, generator=g)
    else:
        return None
    x = x.to(device=layer.weight.device, dtype=layer.weight.dtype)
    try:
        with torch.no_grad():
            model.eval()(x[:2])
    except Exception as err:  # noqa: BLE001
        raise CommandError(f"--data: random inputs of shape {tuple(x.shape)} do not fit the model (it takes "
                           f"{expected_input(model)}; {type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                           f"pass --data FILE with inputs of its shape to check preservation") from err
    return x


def run(args: argparse.Namespace) -> int:
    """0 on success, 1 when a preserving expansion changed the function by more than --tolerance."""
    if not args.specs:
        raise CommandError(f"expected at least one --widen {WIDEN_SYNTAX} or --deepen {DEEPEN_SYNTAX}, got none")
    raw = [parse_widen(text) if option == "--widen" else parse_deepen(text) for option, text in args.specs]
    if args.out.suffix not in (".pt", ".pth"):
        raise CommandError(f"--out must name a .pt or .pth file (the report goes next to it as .json), "
                           f"got {str(args.out)!r}")
    if args.out.is_dir():
        raise CommandError(f"--out {args.out}: is a directory, expected a file name ending in .pt")
    ancestor = args.out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"--out {args.out}: {ancestor} is a file, expected a directory")

    device = resolve_device(args.device)
    base, recipe = read_checkpoint(args.checkpoint, args.model, allow_pickle=args.allow_pickle)
    base = base.to(device)
    specs = _specs(raw, base)
    if args.data is not None:
        data = load_data(args.data, base)
        inputs, where = data.x, f"the inputs of {data.label}"
    else:
        inputs = _random_inputs(base)
        where = None
    grown, report = grow(base, *specs, generator=torch.Generator().manual_seed(args.seed), check_inputs=inputs)
    if where is None and report.check_inputs_shape is not None:
        where = f"random inputs of shape {tuple(report.check_inputs_shape)}"

    err = report.preservation_error
    failed = report.preserving and (err is None or not err <= args.tolerance)
    say = (lambda *a: None) if args.quiet else print
    say(f"expanded {args.checkpoint} ({type(base).__name__}): parameters {report.params_before:,} -> "
        f"{report.params_after:,}")
    for c in report.changes:
        say(f"  {c.op} {c.path} ({c.kind}, {c.init}): {c.before} -> {c.after}, "
            f"{'exact' if c.exact else 'not exact'}")
    measured = "not measured" if err is None else f"{err:.3g}"
    if report.preserving and err is None:
        say("function-preserving: claimed; not measured (no check inputs for this model): FAILED")
    elif report.preserving:
        say(f"function-preserving: claimed; measured max |grown(x) - base(x)| = {measured} on {where} "
            f"(tolerance {args.tolerance:g}): {'FAILED' if failed else 'ok'}")
    else:
        inexact = [f"{c.op} {c.path}" for c in report.changes if not c.exact]
        say(f"function-preserving: no (not exact: {', '.join(inexact)}); measured max |grown(x) - base(x)| = "
            f"{measured} on {where} (not checked)")
    if failed and err is None:
        print("manifold-ext expand: the expansion claims to preserve the function, but there were no inputs to "
              "check it on (no default for this model): pass --data; nothing written", file=sys.stderr)
        return 1
    if failed:
        print(f"manifold-ext expand: the expansion claims to preserve the function, but max |grown(x) - base(x)| "
              f"= {measured} > --tolerance {args.tolerance:g} on {where}; nothing written", file=sys.stderr)
        return 1

    report_path = args.out.with_suffix(".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Data only (weights_only=True loads it): the weights, and the recipe that rebuilds their
    # architecture when the base's is known as a --model spec.
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in grown.state_dict().items()},
                "report": report.to_dict(),
                "base_model": recipe["base_model"] if recipe else None,
                "specs": (recipe["specs"] if recipe else []) + [spec_to_dict(s) for s in specs]}, args.out)
    report_path.write_text(report.to_json(indent=2) + "\n")
    say(f"wrote {args.out}, {report_path}")
    if recipe is None and not args.quiet:
        print(f"manifold-ext expand: note: {args.out} holds the grown weights without their architecture "
              f"(CHECKPOINT is a pickled module, not a state dict with --model SPEC): load it with --model SPEC "
              f"of the grown model, or load its 'state_dict' into that architecture in Python", file=sys.stderr)
    return 0
