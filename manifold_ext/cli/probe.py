"""``manifold-ext probe``: a loss-landscape probe (line, barrier, plane, simplex) of saved models,
written as JSON and a plot."""

from __future__ import annotations

import argparse
import statistics
import textwrap
from pathlib import Path
from typing import Callable

from .. import distributed as D
from .. import probes
from ._args import CommandError, add_device_argument, have_matplotlib, int_at_least, resolve_device
from ._load import (ALLOW_PICKLE_HELP, CHECKPOINT_HELP, DATA_HELP, MODEL_EPILOG, MODEL_HELP, fmt, load_checkpoints,
                    load_data)

# KIND -> (checkpoints wanted as (min, max), what they are, default --steps, what --steps means)
KINDS = {
    "line": ((2, 2), "the ends of the segment, t=0 and t=1", 33, "evenly spaced points on t in [0, 1]"),
    "barrier": ((2, 2), "the ends of the segment, t=0 and t=1", 17,
                "grid points per refinement (>= 3; refined twice around the maximum)"),
    "plane": ((1, 1), "the centre of the plane", 21, "grid points per axis on [-1, 1]"),
    "simplex": ((2, None), "the vertices of the simplex", 256, "points drawn uniformly from the simplex"),
}


def add_parser(sub, common) -> None:
    """Register ``probe`` on the subcommand parsers ``sub``."""
    steps_help = "; ".join(f"{k}: {v[3]} (default {v[2]})" for k, v in KINDS.items())
    p = sub.add_parser(
        "probe", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="loss and accuracy of saved models along a line, across a barrier, on a plane or in a simplex",
        description=textwrap.fill(
            "Evaluate loss and accuracy at interpolated parameter points of saved models in batched "
            "passes of the fused engine (manifold_ext.probes): 'line' along the segment between two "
            "checkpoints, 'barrier' the loss barrier between them (Frankle et al. 2020), 'plane' a "
            "2-D surface through one checkpoint along two random filter-normalised directions (Li et "
            "al. 2018), 'simplex' points drawn uniformly from the simplex of two or more checkpoints. "
            "Writes OUT/KIND.json (the result's to_json) and OUT/KIND.png, and prints a summary. "
            "Checkpoints are loaded with torch.load(weights_only=True), which never runs code from "
            "the file; a whole pickled nn.Module needs --allow-pickle (only for files you trust).", 90),
        epilog=MODEL_EPILOG + """
examples:
  manifold-ext probe barrier a.pt b.pt --model mlp:64-32-10 --out results/ab
  manifold-ext probe plane grown.pt --steps 11 --seed 1   (grown.pt: written by 'manifold-ext expand')
  manifold-ext probe simplex a.pt b.pt c.pt --model mlp:64-32-10 --data test.npz
""",
    )
    p.add_argument("kind", metavar="KIND", help="line, barrier, plane or simplex")
    p.add_argument("checkpoints", metavar="CHECKPOINT", nargs="+", type=Path,
                   help=CHECKPOINT_HELP + "; line and barrier take 2, plane 1, simplex 2 or more, all of "
                   "one architecture")
    p.add_argument("--data", default="digits", metavar="FILE|digits",
                   help="the probe data: " + DATA_HELP + " (default: digits)")
    p.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    add_device_argument(p)
    p.add_argument("--out", type=Path, default=Path("results/probe"), metavar="DIR",
                   help="output directory for KIND.json and KIND.png (default: results/probe)")
    p.add_argument("--steps", type=int_at_least(2), metavar="N", help=steps_help)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds plane's random directions and simplex's points (default: 0)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write KIND.png (default: on when matplotlib is installed)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.kind not in KINDS:
        raise CommandError(f"KIND must be one of {', '.join(KINDS)}, got {args.kind!r}")
    (low, high), what, default_steps, _ = KINDS[args.kind]
    n = len(args.checkpoints)
    if n < low or (high is not None and n > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        raise CommandError(f"CHECKPOINT: {args.kind} needs {want} checkpoint{'s' if low > 1 else ''} "
                           f"({what}), got {n}")
    steps = default_steps if args.steps is None else args.steps
    if args.kind == "barrier" and steps < 3:
        raise CommandError(f"--steps: barrier needs at least 3 grid points, got {steps}")
    if args.plot is None:
        args.plot = have_matplotlib()
    elif args.plot and not have_matplotlib():
        raise CommandError("--plot needs matplotlib (pip install matplotlib), or pass --no-plot")

    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out}: is a file, expected a directory (for {args.kind}.json and "
                           f"{args.kind}.png)")
    device = resolve_device(args.device)
    vertices = [m.to(device) for m in load_checkpoints(args.checkpoints, args.model, args.allow_pickle)]
    data = load_data(args.data, vertices[0])
    xy = (data.x, data.y)
    kw = {"quiet": args.quiet}
    if args.kind == "line":
        result = probes.linear_path(vertices[0], vertices[1], xy, steps=steps, **kw)
    elif args.kind == "barrier":
        result = probes.barrier(vertices[0], vertices[1], xy, steps=steps, **kw)
    elif args.kind == "plane":
        result = probes.plane(vertices[0], xy, grid=(-1.0, 1.0, steps), seed=args.seed, **kw)
    else:
        result = probes.simplex_losses(vertices, xy, n=steps, seed=args.seed, **kw)

    if not D.is_main():  # under torchrun every rank has the result; rank 0 reports it
        return 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--out {args.out}: cannot create the directory ({err.strerror or err})") from err
    json_path, png_path = args.out / f"{args.kind}.json", args.out / f"{args.kind}.png"
    result.to_json(json_path)
    written = [json_path]
    if args.plot:
        result.plot().savefig(png_path, dpi=120)
        written.append(png_path)
    if not args.quiet:
        _SUMMARIES[args.kind](result, args, data.label, print)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


# ----------------------------------------------------------------------------- summaries


def _line(r: probes.PathResult, args, data: str, say: Callable[..., None]) -> None:
    a, b = args.checkpoints
    i = max(range(len(r.t)), key=lambda j: r.loss[j])
    k = min(range(len(r.t)), key=lambda j: r.accuracy[j])
    say(f"line from {a} (t=0) to {b} (t=1): {len(r.t)} points on {data}")
    say(f"  loss {fmt(r.loss[0])} at t=0, {fmt(r.loss[-1])} at t=1; highest {fmt(r.loss[i])} at t={r.t[i]:.3f}")
    say(f"  accuracy {fmt(r.accuracy[0])} at t=0, {fmt(r.accuracy[-1])} at t=1; "
        f"lowest {fmt(r.accuracy[k])} at t={r.t[k]:.3f}")


def _barrier(r: probes.BarrierResult, args, data: str, say) -> None:
    a, b = args.checkpoints
    path = r.path
    say(f"barrier between {a} (t=0) and {b} (t=1): {len(path['t'])} points on {data}")
    say(f"  loss barrier {fmt(r.barrier_loss)} at t={r.t_max:.3f} "
        f"(endpoint losses {fmt(path['loss'][0])}, {fmt(path['loss'][-1])})")
    say(f"  error barrier {fmt(r.barrier_error)} at t={r.t_max_error:.3f}")


def _plane(r: probes.PlaneResult, args, data: str, say) -> None:
    flat = [v for row in r.loss for v in row]
    i = min(range(len(r.alpha)), key=lambda j: abs(r.alpha[j]))
    say(f"plane through {args.checkpoints[0]} along 2 random filter-normalised directions (seed {args.seed}): "
        f"{len(r.alpha)}x{len(r.beta)} grid on [-1, 1]^2, {data}")
    say(f"  loss {fmt(r.loss[i][i])} at ({r.alpha[i]:.3g}, {r.beta[i]:.3g}); "
        f"min {fmt(min(flat))}, max {fmt(max(flat))} over the grid")


def _simplex(r: probes.SimplexResult, args, data: str, say) -> None:
    finite = sorted(v for v in r.loss if v == v)
    q95 = finite[min(len(finite) - 1, int(0.95 * len(finite)))] if finite else float("nan")
    say(f"simplex of {len(args.checkpoints)} checkpoints: {len(r.loss)} uniform points (seed {args.seed}) "
        f"on {data}; log volume {fmt(r.log_volumes[0])}")
    if finite:
        say(f"  loss mean {fmt(statistics.fmean(finite))}, median {fmt(statistics.median(finite))}, "
            f"95% quantile {fmt(q95)}, max {fmt(finite[-1])}; accuracy mean {fmt(statistics.fmean(r.accuracy))}")


_SUMMARIES = {"line": _line, "barrier": _barrier, "plane": _plane, "simplex": _simplex}
