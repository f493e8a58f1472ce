"""``manifold-ext compare``: rank candidate expansions of a base model by manifold size and every
baseline, against the gains that fine-tuning them actually brings."""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .. import compare as C
from .. import distributed as D
from ..builtin import Benchmark, Candidate, Task, benchmark
from ._args import CommandError, have_matplotlib, int_at_least
from ._load import as_tensor, read_arrays


def add_parser(sub, common) -> None:
    """Register ``compare`` on the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "compare", parents=[common],
        help="rank candidate expansions of a base model; correlate every metric with the gains",
        description="Pre-train a small base model, grow it into candidate expansions, adapt each "
        "briefly, measure its manifold size (three estimators) and 12 baseline metrics, fine-tune "
        "it for a fixed budget, and correlate every metric with the gains over several seeds. "
        "With no arguments: the MLP on the built-in digits data, 20 candidates, 3 seeds.",
    )
    p.add_argument("--model", choices=("mlp", "cnn", "transformer"), default=None,
                   help="the built-in base model (default: mlp; transformer with --task modular)")
    p.add_argument("--task", choices=("digits", "modular"), default=None,
                   help="built-in data: digits (default) or modular addition (a + b) mod 23")
    p.add_argument("--data", type=Path, default=None,
                   help="your own data: FILE.npz with arrays X and y, or FILE.pt with a dict "
                   "{'X': tensor, 'y': tensor} or a tuple (X, y); split 60/40 into train and test")
    p.add_argument("--config", type=Path, default=None,
                   help="a TOML file: any setting (see manifold_ext.compare.Settings) at the top "
                   "level, and [[candidates]] tables with name and specs, e.g. "
                   "specs = [{type = 'widen', target = '*', factor = 2, init = 'zero'}]")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, a shorter budget and cheaper estimators (about a minute)")
    p.add_argument("--seeds", type=int_at_least(1), default=None, help="override the number of seeds")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: a fresh results/compare-MODEL-TIME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished candidates are not recomputed")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write the PNG figures (default: on when matplotlib is installed)")
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


def _load_data(path: Path) -> tuple:
    X, y = read_arrays(path)
    return as_tensor(X, "X", str(path)), as_tensor(y, "y", str(path))


def _user_task(X: torch.Tensor, y: torch.Tensor, model: str) -> Task:
    if X.dim() < 2 or len(X) != len(y) or y.dim() != 1:
        raise CommandError(f"--data: expected X of shape (N, ...) and y of shape (N,), got X "
                           f"{tuple(X.shape)} and y {tuple(y.shape)}")
    if y.is_floating_point() or y.min() < 0:
        raise CommandError("--data: y must hold class indices (non-negative integers)")
    want = {"mlp": 2, "cnn": 4, "transformer": 2}[model]
    if X.dim() != want:
        raise CommandError(f"--data: the {model} takes X of {want} dimensions "
                           f"({'(N, features)' if model == 'mlp' else '(N, channels, H, W)' if model == 'cnn' else '(N, tokens)'}), "
                           f"got {tuple(X.shape)}")
    if len(X) < 10:
        raise CommandError(f"--data: expected at least 10 examples, got {len(X)}")
    X = X.long() if model == "transformer" else X.float()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    n_test = math.ceil(0.4 * len(X))
    te, tr = perm[:n_test], perm[n_test:]
    return Task("custom", X[tr], y[tr].long(), X[te], y[te].long())


def _setup(args) -> tuple:
    cfg = _load_config(args.config) if args.config else {}
    model = args.model or cfg.pop("model", None) or ("transformer" if args.task == "modular" else "mlp")
    task = args.task or cfg.pop("task", None) or ("modular" if model == "transformer" else "digits")
    cfg.pop("model", None)
    cfg.pop("task", None)
    candidates = cfg.pop("candidates", None)
    bench = benchmark(model, task)
    if args.data is not None:
        bench = _with_data(bench, _user_task(*_load_data(args.data), model))
    if candidates is not None:
        if not isinstance(candidates, list) or not candidates:
            raise CommandError("--config: candidates must be a non-empty array of tables")
        try:
            bench.candidates = [Candidate.from_dict(c) for c in candidates]
        except KeyError as err:
            raise CommandError(f"--config: every candidate needs a {err.args[0]!r}") from None
        if not any(c.name == "control" for c in bench.candidates):
            bench.candidates.insert(0, Candidate("control"))
    settings = dict(C.QUICK) if args.quick else {}
    settings.update(cfg)
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    try:
        return bench, C.Settings.from_dict(settings)
    except ValueError as err:
        raise CommandError(f"{'--config: ' if args.config else ''}{err}") from None


def _with_data(bench: Benchmark, task: Task) -> Benchmark:
    """The benchmark's base and candidates sized for the user's data."""
    from .. import models

    classes = int(max(task.y_train.max(), task.y_test.max())) + 1
    if bench.model == "mlp":
        make = lambda: models.mlp((task.x_train.shape[1], 11, 11, classes))  # noqa: E731
    elif bench.model == "cnn":
        make = lambda: models.ResNetCNN(task.x_train.shape[1], (8, 16), (1, 1), classes)  # noqa: E731
    else:
        vocab = int(max(task.x_train.max(), task.x_test.max())) + 1
        make = lambda: models.TinyTransformer(vocab, task.x_train.shape[1], 16, 2, classes)  # noqa: E731
    return Benchmark(bench.model, task, make, bench.candidates)


# ----------------------------------------------------------------------------- outputs


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-inf" if v == -math.inf else "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _write_csv(result: C.CompareResult, path: Path) -> None:
    settings = C.Settings.from_dict(result.settings)
    names = C.metric_names(settings)
    rows = []
    for u in result.units:
        row = {k: u[k] for k in ("seed", "candidate", "parameters", "test_accuracy", "gain_over_base",
                                 "gain_over_control", "adapted_probe_loss", "seconds")}
        for n in names:
            row[n] = u["sizes"][n[5:]] if n.startswith("size_") else u["baselines"][n]
        rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _tables(result: C.CompareResult, say) -> None:
    default = result.settings["default_estimator"]
    say(f"\nRanking by manifold size ({default}; mean over {result.settings['seeds']} seeds, "
        f"gains in test-accuracy points):")
    say(f"{'rank':>4}  {'candidate':34s} {'params':>7} {'size':>8} {'gain':>7} {'± sd':>6} {'vs control':>10}")
    for r in result.ranking:
        say(f"{r['rank']:>4}  {r['candidate'][:34]:34s} {r['parameters']:>7} {_fmt(r['size']):>8} "
            f"{_fmt(r['gain_over_base'], 2):>7} {_fmt(r['gain_std'], 2):>6} {_fmt(r['gain_over_control'], 2):>10}")
    say(f"\nCorrelation of each metric with the gain over the base ({len(result.units)} units; "
        f"95% intervals resample candidates):")
    say(f"{'metric':24s} {'Spearman':>9} {'interval':>15} {'Kendall':>8} {'interval':>15} "
        f"{'preserving only':>16} {'interval':>15} {'equal-size order':>16}")
    for c in sorted(result.correlations, key=lambda c: -abs(c["spearman"]) if not math.isnan(c["spearman"]) else 0):
        ci = lambda t: f"[{_fmt(t[0], 2)}, {_fmt(t[1], 2)}]"  # noqa: E731
        say(f"{c['metric']:24s} {_fmt(c['spearman'], 3):>9} {ci(c['spearman_ci']):>15} "
            f"{_fmt(c['kendall'], 3):>8} {ci(c['kendall_ci']):>15} {_fmt(c['preserving_spearman'], 3):>16} "
            f"{ci(c['preserving_spearman_ci']):>15} {_fmt(c['equal_size_order'], 2):>16}")
    say("(preserving only: the control and the expansions that preserve the function; equal-size "
        "order: share of same-size candidate pairs put in the order of their gains)")


def run(args: argparse.Namespace) -> int:
    say = (lambda *a: None) if args.quiet or not D.is_main() else print
    if args.plot is None:
        args.plot = have_matplotlib()
    elif args.plot and not have_matplotlib():
        raise CommandError("--plot needs matplotlib (pip install matplotlib), or pass --no-plot")
    bench, settings = _setup(args)
    if args.resume and args.out is None:
        raise CommandError("--resume needs --out: the directory of the run to continue")
    if args.out is not None and args.resume and not (args.out / "config.json").exists():
        raise CommandError(f"--resume: {str(args.out)!r} holds no compare run (no config.json)")
    # Under torchrun, rank 0 names the fresh directory for every rank.
    out = args.out or D.broadcast(Path("results") / f"compare-{bench.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    say(f"manifold-ext compare: {bench.model} on {bench.task.name}, {len(bench.candidates)} candidates, "
        f"{settings.seeds} seeds -> {out}")
    result = C.compare(bench, settings, out, resume=args.resume, quiet=args.quiet)
    if not D.is_main():
        return 0
    _write_csv(result, out / "results.csv")
    written = ["results.json", "results.csv"]
    if args.plot:
        from .. import compare_plots

        base = torch.load(out / "bases" / "seed0.pt", weights_only=False)
        with D.local():  # rank 0 alone draws: its probes must not wait for the other ranks
            written += [p.name for p in compare_plots.all_figures(bench, settings, result, base, out)]
    _tables(result, say)
    say(f"\n{result.seconds:.0f} s; wrote {', '.join(written)} in {out}")
    return 0
