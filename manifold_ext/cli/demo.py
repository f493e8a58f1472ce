"""``manifold-ext demo``: the fused ops on a line between two trained MLPs, checked against a
naive per-point loop and timed."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import build_info, interp_linear, interp_linear_cross_entropy
from ..data import Digits, load_digits
from ..training import train
from ._args import CommandError, add_device_argument, have_matplotlib, int_at_least, resolve_device

# Full-batch Adam at this rate reaches ~96% test accuracy on digits in 30 steps and >80% in 5,
# so the demo stays a few seconds long and the tests can train with --epochs 5.
_LR = 0.02
_T_MIN, _T_MAX = -0.25, 1.25  # a little beyond both ends of the segment
_TOLERANCE = 1e-4  # max abs difference allowed between fused and naive mean losses
_REPEATS = 3  # timings are the best of this many runs


def add_parser(sub, common) -> None:
    """Register ``demo`` on the subcommand parsers ``sub``."""
    demo = sub.add_parser(
        "demo", parents=[common],
        help="loss along the line between two trained MLPs: fused ops vs a naive loop",
        description="Train two 64-H-10 MLPs on the built-in digits data from different seeds, "
        "evaluate test loss and accuracy on the line between them (t in [-0.25, 1.25]) in one "
        "batched pass of the fused ops, check it against a naive per-point loop, and time both.",
    )
    demo.add_argument("--points", type=int_at_least(2), default=33,
                      help="evenly spaced points on t in [-0.25, 1.25] (default: 33)")
    demo.add_argument("--hidden", type=int_at_least(1), default=64,
                      help="hidden width of the MLPs (default: 64)")
    demo.add_argument("--epochs", type=int_at_least(1), default=30,
                      help="full-batch Adam steps per model (default: 30)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the data split and the two models (seed, seed+1) (default: 0)")
    demo.add_argument("--out", type=Path, default=Path("results/demo"),
                      help="output directory for line.json, line.csv, line.png (default: results/demo)")
    add_device_argument(demo)
    demo.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                      help="write line.png (default: on when matplotlib is installed)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """0 on success, 1 when the fused and naive results disagree."""
    if args.plot is None:
        args.plot = have_matplotlib()
    elif args.plot and not have_matplotlib():
        raise CommandError("--plot needs matplotlib (pip install matplotlib), or pass --no-plot")
    return _demo(args, resolve_device(args.device))


# ----------------------------------------------------------------------------- demo


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _train(data: Digits, hidden: int, epochs: int, seed: int) -> nn.Sequential:
    # fork_rng keeps the caller's global RNG untouched (main() is also called from Python); the
    # model is initialised on the CPU, so it starts the same on every device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _mlp(hidden).to(data.x_train.device)
    # One batch of all the data a step: the demo's figures come from full-batch Adam.
    train(model, data.x_train, data.y_train, epochs=epochs, lr=_LR, batch_size=len(data.x_train), seed=seed)
    return model


@torch.no_grad()
def _fused(vertices: dict[str, Tensor], coeffs: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy at every row of coeffs, in one batched pass of the fused ops."""
    # The first layer sees the same x at every point: the shared-input form costs K, not B, GEMMs.
    h = torch.relu(interp_linear(x, vertices["0.weight"], vertices["0.bias"], coeffs))
    loss_sum, correct = interp_linear_cross_entropy(h, vertices["2.weight"], vertices["2.bias"], coeffs, y)
    return loss_sum / len(y), correct.double() / len(y)


@torch.no_grad()
def _naive(vertices: dict[str, Tensor], coeffs: Tensor, x: Tensor, y: Tensor, hidden: int,
           progress) -> tuple[Tensor, Tensor]:
    """The same, one interpolated model at a time: the baseline the fused pass replaces."""
    model = _mlp(hidden).to(x.device).eval()
    losses, accs = [], []
    for c in coeffs:
        model.load_state_dict({k: torch.einsum("k,k...->...", c, v) for k, v in vertices.items()})
        logits = model(x)
        losses.append(F.cross_entropy(logits, y))
        accs.append((logits.argmax(1) == y).double().mean())
        progress.update()
    return torch.stack(losses), torch.stack(accs)


def _best_time(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(_REPEATS):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)  # CUDA kernels run asynchronously: time them to completion
        best = min(best, time.perf_counter() - start)
    return best, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(t: Tensor, loss: Tensor, loss0: float, loss1: float) -> tuple[float, float]:
    """Largest excess of loss(t) over the chord between the endpoint losses, for t in [0, 1].

    The endpoints themselves count (excess 0 there), so the height is >= 0 up to rounding.
    """
    height, where = 0.0, 0.0
    for ti, li in zip(t.tolist(), loss.tolist()):
        if 0.0 <= ti <= 1.0 and li - ((1 - ti) * loss0 + ti * loss1) > height:
            height, where = li - ((1 - ti) * loss0 + ti * loss1), ti
    return height, where


def _demo(args: argparse.Namespace, device: torch.device) -> int:
    from tqdm import tqdm

    say = (lambda *a: None) if args.quiet else print
    d = load_digits(seed=args.seed)
    data = Digits(d.x_train.to(device), d.y_train.to(device), d.x_test.to(device), d.y_test.to(device))
    models = [_train(data, args.hidden, args.epochs, args.seed + i) for i in range(2)]
    # K=2 vertices: every parameter stacked along a new leading dimension.
    states = [m.state_dict() for m in models]
    vertices = {k: torch.stack([s[k] for s in states]) for k in states[0]}

    # The grid need not contain t=0 and t=1, so the endpoints ride along as two extra points.
    t_grid = torch.linspace(_T_MIN, _T_MAX, args.points)
    t_all = torch.cat([t_grid, torch.tensor([0.0, 1.0])])
    coeffs = torch.stack([1 - t_all, t_all], dim=1).to(device)
    x, y = data.x_test, data.y_test

    fused_s, (loss, acc) = _best_time(lambda: _fused(vertices, coeffs, x, y), device)
    show = not args.quiet and sys.stderr.isatty()
    with tqdm(total=_REPEATS * len(t_all), desc="naive loop", disable=not show, leave=False) as bar:
        naive_s, (naive_loss, naive_acc) = _best_time(
            lambda: _naive(vertices, coeffs, x, y, args.hidden, bar), device)

    diff = (loss - naive_loss).abs().max().item()
    n = args.points
    loss0, loss1 = loss[n].item(), loss[n + 1].item()
    height, where = _barrier(t_grid, loss[:n], loss0, loss1)
    result = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if not callable(v)}, "device": str(device)},
        "build_info": build_info(),
        "data": {"train": len(data.y_train), "test": len(y)},
        "points": [
            {"t": t, "loss": l, "accuracy": a, "naive_loss": nl, "naive_accuracy": na}
            for t, l, a, nl, na in zip(t_grid.tolist(), loss[:n].tolist(), acc[:n].tolist(),
                                       naive_loss[:n].tolist(), naive_acc[:n].tolist())
        ],
        "endpoints": [{"t": float(i), "loss": loss[n + i].item(), "accuracy": acc[n + i].item()}
                      for i in range(2)],
        "agreement": {"max_abs_loss_diff": diff, "tolerance": _TOLERANCE},
        "barrier": {"height": height, "t": where},
        "timings": {"fused_s": fused_s, "naive_s": naive_s, "speedup": naive_s / fused_s,
                    "repeats": _REPEATS, "points_evaluated": len(t_all)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "line.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out / "line.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["points"][0]))
        writer.writeheader()
        writer.writerows(result["points"])
    if args.plot:
        _plot(result, args.out / "line.png")

    _print_summary(result, say, args.out)
    if diff > _TOLERANCE:
        print(f"manifold-ext demo: fused and naive mean losses differ by {diff:.3g} "
              f"(> {_TOLERANCE:g}); the kernels disagree with PyTorch", file=sys.stderr)
        return 1
    return 0


def _print_summary(result: dict, say: Callable[..., None], out: Path) -> None:
    pts, ends = result["points"], result["endpoints"]
    # A handful of grid rows (evenly picked) plus the two trained models, in order of t.
    picks = sorted({round(i * (len(pts) - 1) / 6) for i in range(7)})
    rows = [(p["t"], p["loss"], p["accuracy"], "") for p in (pts[i] for i in picks)]
    rows += [(e["t"], e["loss"], e["accuracy"], f"model {'AB'[i]}") for i, e in enumerate(ends)]
    say(f"{'t':>7}  {'loss':>8}  {'accuracy':>8}")
    for t, l, a, note in sorted(rows):
        say(f"{t:7.3f}  {l:8.4f}  {a:8.4f}  {note}".rstrip())
    tm, b = result["timings"], result["barrier"]
    say(f"barrier height: {b['height']:.4f} (at t={b['t']:.3f}; grid points in [0, 1])")
    say(f"fused vs naive: max |mean loss difference| {result['agreement']['max_abs_loss_diff']:.2e}")
    say(f"time for {tm['points_evaluated']} points: fused {tm['fused_s'] * 1e3:.2f} ms, "
        f"naive loop {tm['naive_s'] * 1e3:.2f} ms, speed-up {tm['speedup']:.1f}x")
    say(f"wrote {out}/line.json, line.csv" + (", line.png" if result["config"]["plot"] else ""))


def _plot(result: dict, path: Path) -> None:
    # Figure + Agg canvas directly, not pyplot: no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = [p["t"] for p in result["points"]]
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                              ("test cross-entropy", "test accuracy")):
        ax.axvspan(0, 1, color="0.93", zorder=0)
        ax.plot(t, [p[key] for p in result["points"]], "o-", ms=3, label="interpolated")
        ax.plot([e["t"] for e in result["endpoints"]], [e[key] for e in result["endpoints"]],
                "s", color="C3", ms=7, label="trained models (t=0, 1)")
        ax.set_xlabel("t  (parameters = (1-t)·A + t·B)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # One legend for both panels, below them, where it cannot hide the curves.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"Digits MLP 64-{result['config']['hidden']}-10: line between two minima, "
                 f"barrier {result['barrier']['height']:.3f}", fontsize=10)
    fig.savefig(path, dpi=120)

