"""A suite of benchmarks: one compare run per benchmark, then one cross-task table of every
metric's within-seed Spearman correlation with the gains, per task and on average, and its
equal-size order.

A task whose gains carry no signal (Friedman p above :data:`manifold_ext.compare.SIGNAL_P`) is
shown but left out of the averages: its correlations rank noise.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import compare as C
from ._io import atomic_write, write_text
from .builtin import Benchmark


@dataclass
class SuiteResult:
    """What a suite run produced.

    Attributes:
        tasks: the benchmarks' names (``MODEL-TASK``), in run order.
        signal: per task, :func:`manifold_ext.stats.gain_signal` of its gains plus ``has_signal``
            (Friedman p at most :data:`manifold_ext.compare.SIGNAL_P`).
        rows: one per metric (the metrics every task measured): ``spearman`` and
            ``equal_size_order`` per task, and their ``average`` and ``equal_size_average`` over
            the tasks with signal (None where no such task has a value); strongest ``|average|``
            first (a metric that falls as the gains rise predicts as well as one that rises).
        seconds: per task, the run's wall-clock time.
        default_estimator: the estimator the runs ranked by (``size_<name>`` in ``rows``).
    """

    tasks: List[str]
    signal: Dict[str, dict]
    rows: List[dict]
    seconds: Dict[str, float] = field(default_factory=dict)
    default_estimator: Optional[str] = None

    def to_json(self, path: Optional[Path] = None) -> str:
        """The result as JSON text, also written to ``path`` when given (atomically)."""
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            write_text(path, text)
        return text

    def to_csv(self, path: Path) -> None:
        """One row per metric: ``spearman <task>`` and ``equal-size order <task>`` columns, then the averages."""
        header = (["metric"] + [f"spearman {t}" for t in self.tasks] + ["spearman average"]
                  + [f"equal-size order {t}" for t in self.tasks] + ["equal-size order average"])

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                for r in self.rows:
                    w.writerow([r["metric"]] + [r["spearman"].get(t) for t in self.tasks] + [r["average"]]
                               + [r["equal_size_order"].get(t) for t in self.tasks] + [r["equal_size_average"]])

        atomic_write(path, write)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def summarise_suite(results: Dict[str, C.CompareResult]) -> SuiteResult:
    """The cross-task table of finished compare runs, keyed by task name (in run order)."""
    if not results:
        raise ValueError("summarise_suite: expected at least one compare result, got none")
    tasks = list(results)
    signal = {}
    for t, r in results.items():
        p = r.signal.get("friedman_p")
        signal[t] = dict(r.signal, has_signal=p is not None and p <= C.SIGNAL_P)
    by_task = {t: {c["metric"]: c for c in r.correlations} for t, r in results.items()}
    metrics = [m for m in by_task[tasks[0]] if all(m in by_task[t] for t in tasks)]
    with_signal = [t for t in tasks if signal[t]["has_signal"]]
    rows = []
    for m in metrics:
        rho = {t: by_task[t][m]["spearman"] for t in tasks}
        order = {t: by_task[t][m]["equal_size_order"] for t in tasks}
        rows.append({"metric": m, "spearman": rho, "average": _mean([rho[t] for t in with_signal]),
                     "equal_size_order": order, "equal_size_average": _mean([order[t] for t in with_signal])})
    # By strength, whatever the sign: a metric that falls as the gains rise (the loss) predicts too.
    rows.sort(key=lambda r: -(abs(r["average"]) if r["average"] is not None else -math.inf))
    defaults = {r.settings.get("default_estimator") for r in results.values()}
    return SuiteResult(tasks=tasks, signal=signal, rows=rows, seconds={t: r.seconds for t, r in results.items()},
                       default_estimator=defaults.pop() if len(defaults) == 1 else None)


def run_suite(benches: Sequence[Benchmark], out: Path, *, quick: bool = False, overrides: Optional[dict] = None,
              resume: bool = False, quiet: bool = False, device=None, on_task=None) -> SuiteResult:
    """Run :func:`manifold_ext.compare.compare` on each benchmark, in ``OUT/<benchmark name>``, with
    its own settings (:func:`manifold_ext.compare.settings_for`, ``quick`` and ``overrides`` on
    top), then write the cross-task table to ``OUT/suite.json`` and ``OUT/suite.csv``.

    Every benchmark's settings are built before any training, so a bad override fails at once.
    ``on_task(name, result)`` is called after each run (e.g. to print progress)."""
    out = Path(out)
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"run_suite: benchmark names must be unique, got {names}")
    plan = []
    for b in benches:
        b = b.quick_version() if quick else b
        plan.append((b, C.settings_for(b, quick=quick, **(overrides or {}))))
    results = {}
    for b, s in plan:
        results[b.name] = C.compare(b, s, out / b.name, resume=resume, quiet=quiet, device=device)
        if on_task is not None:
            on_task(b.name, results[b.name])
    suite = summarise_suite(results)
    out.mkdir(parents=True, exist_ok=True)
    suite.to_json(out / "suite.json")
    suite.to_csv(out / "suite.csv")
    return suite


def format_table(suite: SuiteResult, digits: int = 2) -> str:
    """The cross-task table as text: a row per metric, a column per task, the average, and the
    equal-size order (average over tasks with signal); tasks without signal are marked."""
    def f(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}f}"

    short = [t + ("*" if not suite.signal[t]["has_signal"] else "") for t in suite.tasks]
    width = max(12, *(len(s) for s in short))
    lines = [f"{'metric':22s}" + "".join(f"{s:>{width + 1}}" for s in short) + f"{'average':>9}{'equal-size':>11}"]
    for r in suite.rows:
        order = r["equal_size_average"]
        lines.append(f"{r['metric']:22s}" + "".join(f"{f(r['spearman'][t]):>{width + 1}}" for t in suite.tasks)
                     + f"{f(r['average']):>9}{('-' if order is None else f'{order:.2f}'):>11}")
    if any(not s["has_signal"] for s in suite.signal.values()):
        lines.append(f"* no signal (Friedman p > {C.SIGNAL_P:g}): shown, left out of the averages")
    return "\n".join(lines)
