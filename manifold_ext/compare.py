"""The compare workflow: which expansion of a base model will pay off?

For every seed: train the base (or copy the user's trained base, given as ``base=``); for every
candidate expansion, grow the base, adapt it briefly, measure the manifold size (every estimator,
under one threshold set from the base) and every baseline metric on the adapted model, then
fine-tune it for a fixed budget (the adaptation is its first epochs) and record the gain in test
accuracy over the base and over the control (the base trained on for the same budget). Finally,
correlate every metric with the gains (Spearman and Kendall, with bootstrap intervals that
resample whole candidates).

The models are classifiers by default; with ``Settings(loss="lm")`` they are language models on
token sequences (:func:`manifold_ext.builtin.task_from_tokens`): trained and measured by their
next-token loss, the gains in points of next-token accuracy.

Each (seed, candidate) unit is written to ``OUT/units/`` atomically as it finishes, so a run that
is killed and started again with ``resume=True`` loses nothing and recomputes nothing that had
finished. Under ``torchrun``, the units are spread across the ranks (:func:`compare`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .baselines import BASELINES, compute_baselines
from . import distributed as D
from . import manifold as M
from ._io import save_state, write_text
from .run_dir import check_config, check_out, load_unit, safe_name, unit_path, write_unit
from ._safe_load import PickledObjectsError, load_tensors, reason
from .builtin import Benchmark, Candidate, Task
from .expand import Widen, expand, preservation_error
from .outputs import logits
from .training import IGNORE, accuracy, evaluating, mean_loss, train
# The run's statistics are part of compare's public names (C.SIGNAL_P, C.equal_size_order, ...).
from .compare_stats import (CHANCE_MARGIN, EQUAL_SIZE_TOLERANCE, PRESERVING, SIGNAL_P, UNIGRAM_MARGIN,  # noqa: F401
                            add_gains, correlation_row, equal_size, equal_size_order, metric_names,
                            metric_value, warnings_of)
from .compare_stats import ranking as ranking_of
from .stats import gain_signal

ESTIMATOR_NAMES = tuple(M.ESTIMATORS)
# The estimators a run measures, and their options, unless told otherwise: chosen on the suite
# (docs/suite.md). simplex is opt-in: it cost more than the rest of a unit on the CNN and GPT-2.
DEFAULT_ESTIMATORS = ("radius", "minima")
# minima's runs train at the training learning rate for 3 epochs, long enough to move the end
# points apart but not out of S for a preserving expansion; their simplex is measured in raw
# parameter units, in which a model's extra parameters count as extra room, as they do for what
# it can learn (filter units normalise that away; docs/suite.md).
DEFAULT_ESTIMATOR_OPTIONS = {"minima": {"lr": 1e-3, "epochs": 3, "units": "raw"}}
CHANCE_CAP = 0.5  # the threshold lies at most this fraction of the way from the base's loss to ln K
LOSSES = ("cross_entropy", "lm")  # Settings.loss: classification, or next-token prediction
PRESERVATION_ROWS = 64  # training inputs the preservation error is measured on when expand has no default


# Old names of settings keys, read under their current names so that config files and run
# directories that use them still load. A key is named for what it holds: ``threshold_multiple``
# is a multiple of the base's loss, while every "threshold" in the package is a loss.
RENAMED_SETTINGS = {"threshold": "threshold_multiple"}


@dataclass
class Settings:
    """Everything a compare run depends on (a TOML config sets any of these by name).

    Attributes:
        seeds: seeds 0 .. seeds-1; each trains its own base and repeats every candidate.
        base_epochs: the base's training (Adam, ``lr``, ``batch_size``); unused when
            :func:`compare` is given a trained ``base``.
        adapt_epochs: the candidates' short adaptation before the metrics are measured.
        finetune_epochs: the fixed budget of the ground truth (including the adaptation).
        lr, batch_size: all training.
        probe_examples: training examples the estimators and baselines see (the probe set); for
            ``loss="lm"``, training sequences.
        threshold_multiple: sets the common loss threshold: this multiple of the base's loss on the probe set,
            capped at halfway from that loss to the chance-level loss ln(K) (uniform predictions
            over the base's K classes, or its vocabulary for ``loss="lm"``), so it never reaches
            chance: see :func:`loss_threshold` (each base in the results records its threshold
            and whether the cap applied).
        estimators: which manifold-size estimators to run (default radius and minima; simplex
            is opt-in, see docs/suite.md).
        estimator_options: per estimator, keyword arguments (e.g. ``{"radius": {"directions": 8}}``);
            default :data:`DEFAULT_ESTIMATOR_OPTIONS`. Given here, they replace the defaults;
            :func:`settings_for` (and so ``--config``) merges them into the defaults per estimator.
        baselines: which baseline metrics to compute (names of :data:`manifold_ext.baselines.BASELINES`).
        default_estimator: the estimator whose size the ranking table shows (default minima when
            it runs, else the first estimator).
        n_boot: bootstrap resamples for the correlation intervals.
        loss: ``"cross_entropy"`` (default): classification, targets of shape (N,) class indices;
            or ``"lm"``: next-token prediction on token sequences, inputs and targets of shape
            (N, T) (targets usually equal to the inputs; position t predicts ``y[:, t + 1]``,
            targets of -100 do not count; see :func:`manifold_ext.builtin.task_from_tokens`).
            Training, the estimators, the baselines and the test loss use it; the accuracy is
            then the next-token accuracy (gains in its points).
    """

    seeds: int = 3
    base_epochs: int = 15
    adapt_epochs: int = 1
    finetune_epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    probe_examples: int = 512
    threshold_multiple: float = 2.0
    estimators: Tuple[str, ...] = DEFAULT_ESTIMATORS
    estimator_options: Dict[str, dict] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ESTIMATOR_OPTIONS))
    baselines: Tuple[str, ...] = tuple(BASELINES)
    default_estimator: Optional[str] = None
    n_boot: int = 2000
    loss: str = "cross_entropy"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"settings: loss must be one of {list(LOSSES)} (classification, or next-token "
                             f"prediction on token sequences), got {self.loss!r}")
        self.estimators = tuple(self.estimators)
        self.baselines = tuple(self.baselines)
        if self.default_estimator is None and self.estimators:
            self.default_estimator = "minima" if "minima" in self.estimators else self.estimators[0]
        for name in ("seeds", "base_epochs", "adapt_epochs", "finetune_epochs", "batch_size",
                     "probe_examples", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"settings: {name} must be an integer >= 1, got {v!r}")
        if self.adapt_epochs > self.finetune_epochs:
            raise ValueError(f"settings: adapt_epochs ({self.adapt_epochs}) must not exceed "
                             f"finetune_epochs ({self.finetune_epochs}): the adaptation is part of the budget")
        for name in ("lr", "threshold_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"settings: {name} must be a positive number, got {v!r}")
        unknown = [e for e in self.estimators if e not in M.ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(f"settings: unknown estimator(s) {unknown}; valid are {list(M.ESTIMATORS)}")
        self._check_estimator_options()
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"settings: unknown baseline(s) {unknown}; valid are {list(BASELINES)}")
        if self.default_estimator not in self.estimators:
            raise ValueError(f"settings: default_estimator must be one of the estimators run "
                             f"{list(self.estimators)}, got {self.default_estimator!r}")

    def _check_estimator_options(self) -> None:
        """estimator_options: a table per estimator, of options that estimator takes (checked
        here, before any training, against :func:`manifold_ext.manifold.option_names`)."""
        options = self.estimator_options
        if not isinstance(options, dict):
            raise ValueError(f"settings: estimator_options must be a table of tables, one per estimator (e.g. "
                             f"{{'radius': {{'directions': 8}}}}), got {options!r}")
        bad = [e for e in options if e not in M.ESTIMATORS]
        if bad:
            raise ValueError(f"settings: estimator_options for unknown estimator(s) {bad}; valid are {list(M.ESTIMATORS)}")
        for name, opts in options.items():
            if not isinstance(opts, dict):
                raise ValueError(f"settings: estimator_options.{name} must be a table of {name}'s options, "
                                 f"got {opts!r}")
            if "loss" in opts:
                raise ValueError(f"settings: estimator_options {[name]} set loss; set loss at the top level (it "
                                 f"applies to training, every estimator and every baseline)")
            fixed = sorted(set(opts) & {"tau", "seed", "quiet"})
            if fixed:
                raise ValueError(f"settings: estimator_options.{name} sets {fixed}, which compare sets itself (the "
                                 f"threshold from threshold_multiple, the seed from the run's seed); drop them")
            valid = [o for o in M.option_names(name)
                     if o not in ("loss", "tau", "seed", "quiet", "return_vertices", "train_data")]
            unknown = sorted(set(opts) - set(valid))
            if unknown:
                close = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
                hint = "; ".join(f"did you mean {c[0]!r} for {u!r}?" for u, c in close.items() if c)
                raise ValueError(f"settings: estimator_options.{name}: unknown option(s) {unknown}"
                                 f"{' (' + hint + ')' if hint else ''}; valid are {valid}")

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Settings from a dict (a TOML config's top level, or a run's results.json); unknown keys
        are a ValueError. Keys of earlier versions (:data:`RENAMED_SETTINGS`) are read under their
        new names."""
        names = [f.name for f in fields(cls)]
        both = [old for old, new in RENAMED_SETTINGS.items() if old in d and new in d]
        if both:
            raise ValueError(f"settings: {both[0]!r} is the old name of {RENAMED_SETTINGS[both[0]]!r}; give one of them")
        d = {RENAMED_SETTINGS.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"settings: unknown key(s) {unknown}; valid keys are {names}")
        return cls(**d)



QUICK = dict(seeds=2, finetune_epochs=3, probe_examples=256, n_boot=500,
             estimator_options={"radius": {"directions": 8, "grid": (1e-3, 10.0, 10), "bisect": 8},
                                "simplex": {"k": 1, "steps": 40, "samples": 64},
                                "minima": {"m": 3, "samples": 64}})


def settings_for(bench: Benchmark, *, quick: bool = False, **overrides) -> Settings:
    """The settings of a run on ``bench``, as ``manifold-ext compare`` builds them: the defaults
    of :class:`Settings`, then the benchmark's own (``bench.settings``, e.g. ``loss="lm"`` for the
    GPT-2 benchmark), then with ``quick`` :data:`QUICK` and ``bench.quick``, then ``overrides``.
    ``estimator_options`` are merged per estimator, starting from :data:`DEFAULT_ESTIMATOR_OPTIONS`
    (a layer setting ``{"radius": {"directions": 8}}`` keeps every other option).
    With ``quick``, run it on ``bench.quick_version()`` (the candidates a quick run keeps)."""
    d, options = {}, copy.deepcopy(DEFAULT_ESTIMATOR_OPTIONS)
    for layer in (bench.settings, QUICK if quick else {}, bench.quick if quick else {}, overrides):
        for key, value in layer.items():
            if key == "estimator_options" and isinstance(value, dict):
                for name, opts in value.items():  # merged per estimator: a layer adds or changes options
                    merge = isinstance(opts, dict) and isinstance(options.get(name), dict)
                    options[name] = {**options[name], **opts} if merge else copy.deepcopy(opts)
            else:
                d[key] = value
    if not isinstance(d.get("estimator_options", {}), dict):
        return Settings.from_dict(d)  # refused there, naming the value
    d["estimator_options"] = options
    return Settings.from_dict(d)


# ----------------------------------------------------------------------------- units


def _fresh_base(bench: Benchmark, seed: int, base: Optional[nn.Module] = None) -> nn.Module:
    """An untrained base of the seed: a copy of ``base`` when given, else ``bench.make_base()``
    under ``torch.manual_seed(seed)`` (the caller's RNG untouched), on the CPU."""
    if base is not None:
        return copy.deepcopy(base).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return bench.make_base()


def load_base(bench: Benchmark, out, seed: int = 0, *, base: Optional[nn.Module] = None,
              device=None) -> nn.Module:
    """The trained base of seed ``seed`` of the compare run in ``out``, in eval mode.

    ``OUT/bases/seed<seed>.pt`` holds its state dict; it is read with
    ``torch.load(weights_only=True)``, which never runs code from the file, and loaded strictly
    into a fresh model of the benchmark's architecture (``bench.make_base()`` under the seed, or
    a copy of ``base`` when the run's base was given to :func:`compare` as ``base=``), on
    ``device`` (default: the CPU).

    Raises:
        FileNotFoundError: the run has no base for that seed.
        ValueError: the file holds pickled objects, not just tensors, or does not fit the
            architecture (naming the file).
    """
    path = Path(out) / "bases" / f"seed{seed}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the compare run in {out} has no base for seed {seed})")
    try:
        state = load_tensors(path)
    except PickledObjectsError as err:
        raise ValueError(f"{err}; compare saves each base as a state dict and never unpickles one: delete the "
                         f"file to train that base again (its training is seeded), or start afresh in another "
                         f"directory") from None
    except Exception as err:  # noqa: BLE001 - a torn or corrupt file
        raise ValueError(f"{path}: torch.load cannot read it ({reason(err)}); delete the file to train that "
                         f"base again") from err
    model = _fresh_base(bench, seed, base)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the benchmark's base architecture: "
                         f"{(str(err).splitlines() or [''])[0]}") from None
    return model.to(torch.device("cpu") if device is None else device).eval()


def _base(bench: Benchmark, settings: Settings, seed: int, out: Path, task: Optional[Task] = None) -> nn.Module:
    """The seed's trained base on the device of ``task`` (default ``bench.task``), cached in
    ``OUT/bases`` as a state dict so that a resumed run does not retrain."""
    t = bench.task if task is None else task
    path = out / "bases" / f"seed{seed}.pt"
    if path.exists():
        return load_base(bench, out, seed, device=t.device)
    model = _fresh_base(bench, seed).to(t.device)  # initialised on the CPU: the same on every device
    train(model, t.x_train, t.y_train, epochs=settings.base_epochs, lr=settings.lr,
          batch_size=settings.batch_size, seed=seed, loss=settings.loss)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(path, model.state_dict())
    return model


def grow_and_adapt(base: nn.Module, candidate: Candidate, task: Task, settings: Settings, seed: int):
    """``(expanded, adapted, optimiser, preservation_error)``: the candidate grown from the base
    (seeded) and a copy adapted for ``adapt_epochs``; deterministic given the seed.

    The preservation error is the one :func:`manifold_ext.expand.expand` measures on its default
    inputs; where it has none (e.g. a model that takes token ids), on the first
    ``PRESERVATION_ROWS`` training inputs."""
    if candidate.specs:
        grown, report = expand(base, *candidate.specs, generator=torch.Generator().manual_seed(seed))
        preservation = report.preservation_error
        if preservation is None:
            preservation = preservation_error(base, grown, task.x_train[:PRESERVATION_ROWS])
    else:
        grown, preservation = copy.deepcopy(base), 0.0
    expanded = copy.deepcopy(grown)
    opt = train(grown, task.x_train, task.y_train, epochs=settings.adapt_epochs, lr=settings.lr,
                batch_size=settings.batch_size, seed=1000 + seed, loss=settings.loss)
    return expanded, grown, opt, preservation


def run_unit(base: nn.Module, candidate: Candidate, task: Task, settings: Settings, seed: int,
             tau: float) -> dict:
    """One candidate at one seed: grow, adapt, measure every metric, fine-tune, record."""
    start = time.perf_counter()
    _, grown, opt, preservation = grow_and_adapt(base, candidate, task, settings, seed)
    kw = dict(lr=settings.lr, batch_size=settings.batch_size, loss=settings.loss)
    probe = (task.x_train[:settings.probe_examples], task.y_train[:settings.probe_examples])
    sizes, estimates = {}, {}
    for name in settings.estimators:
        opts = settings.estimator_options.get(name, {})
        est = M.ESTIMATORS[name](grown, probe, tau=tau, seed=seed, quiet=True, loss=settings.loss, **opts)
        sizes[name] = est.size
        estimates[name] = {k: v for k, v in asdict(est).items() if k not in ("trace",)}
    report = compute_baselines(grown, probe, seed=seed, include=settings.baselines, quiet=True,
                                 loss=settings.loss)
    adapted_loss = mean_loss(grown, *probe, settings.loss)
    # The rest of the budget, continuing the adaptation's optimiser.
    train(grown, task.x_train, task.y_train, epochs=settings.finetune_epochs - settings.adapt_epochs,
          seed=2000 + seed, optimizer=opt, **kw)
    return {
        "seed": seed, "candidate": candidate.name,
        "parameters": sum(p.numel() for p in grown.parameters()),
        "preservation_error": preservation,
        "adapted_probe_loss": adapted_loss,
        "test_accuracy": accuracy(grown, task.x_test, task.y_test, settings.loss),
        "test_loss": mean_loss(grown, task.x_test, task.y_test, settings.loss),
        "sizes": sizes, "baselines": report.values, "baseline_seconds": report.seconds,
        "estimates": estimates, "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- a given base


def fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of the model's state dict: every tensor's name, dtype, shape and bytes, in
    the state dict's order. Two models share a fingerprint exactly when their state dicts are
    equal bit for bit (and name their tensors alike); the resume check of :func:`compare`
    records it for a base given as ``base=``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _targets(y: torch.Tensor, loss: str) -> torch.Tensor:
    """Every target, flat: the labels, or for ``"lm"`` the tokens of positions 1.. but -100."""
    if loss != "lm":
        return y.reshape(-1)
    y = y[:, 1:]
    return y[y != IGNORE]


def loss_threshold(multiple: float, base_loss: float, chance_loss: float) -> float:
    """The common loss threshold of a run: ``multiple`` x the base's probe loss, but never more
    than ``CHANCE_CAP`` (half) of the way from the base's loss to the chance-level loss ``ln K``
    (uniform predictions over K outputs), so that the low-loss region never takes in a model no
    better than chance; a base at or above chance gets its own loss."""
    if base_loss >= chance_loss:
        return min(multiple * base_loss, base_loss)
    return min(multiple * base_loss, base_loss + CHANCE_CAP * (chance_loss - base_loss))


def unigram_loss(task: Task) -> float:
    """For ``loss="lm"``: the test loss of the unigram model, which predicts every token from the
    training targets' frequencies alone (add-one smoothed over ``max id + 1`` tokens), the loss a
    language model must beat to have learned anything from context."""
    train, test = _targets(task.y_train.cpu(), "lm"), _targets(task.y_test.cpu(), "lm")
    n = int(max(train.max(), test.max())) + 1
    logp = (torch.bincount(train, minlength=n).double() + 1).log() - math.log(len(train) + n)
    return -logp[test].mean().item()


def chance_accuracy(task: Task, loss: str = "cross_entropy") -> float:
    """The test accuracy of always predicting the most frequent training class; for
    ``loss="lm"``, the next-token accuracy of always predicting the most frequent training target
    token (the frequency of that token among the test targets)."""
    mode = torch.bincount(_targets(task.y_train.cpu(), loss)).argmax()
    return (_targets(task.y_test.cpu(), loss) == mode).double().mean().item()


@torch.no_grad()
def check_data(base: nn.Module, task: Task, rows: int = 8, *, loss: str = "cross_entropy") -> int:
    """Check that ``task`` fits ``base`` before anything is trained: a forward pass (eval mode, the
    base's modes restored) on the first ``rows`` training inputs gives logits of shape
    ``(rows, classes)`` (read by :func:`manifold_ext.outputs.logits`), and every label of both
    splits lies in ``[0, classes)``. For integer inputs (token ids) and a base with an
    ``nn.Embedding``, every id of both splits lies within the first embedding (in module order:
    the token embedding of the usual language models).

    For ``loss="lm"`` (a language model): both splits hold integer token sequences, inputs and
    targets of the same shape ``(N, T)`` with ``T >= 2``; the logits have shape
    ``(rows, T, vocab)``, and every target token (but -100) lies in ``[0, vocab)``.

    Returns:
        the number of the base's outputs: its classes, or its vocabulary for ``"lm"``.

    Raises:
        ValueError: saying what does not fit.
    """
    lm = loss == "lm"
    if lm:
        for split, xs, ys in (("training", task.x_train, task.y_train), ("test", task.x_test, task.y_test)):
            if xs.is_floating_point() or xs.is_complex() or xs.dim() != 2 or xs.shape[1] < 2 or ys.shape != xs.shape:
                raise ValueError(f"a language model (loss 'lm') takes token sequences: integer inputs of shape "
                                 f"(N, T), T >= 2, and targets of the same shape (usually the inputs); the {split} "
                                 f"split has inputs {tuple(xs.shape)} ({xs.dtype}) and targets {tuple(ys.shape)}")
    emb = next((m for m in base.modules() if isinstance(m, nn.Embedding)), None)
    if emb is not None and not task.x_train.is_floating_point():
        ids = torch.cat([task.x_train.reshape(-1), task.x_test.reshape(-1)])
        if len(ids) and (ids.min() < 0 or ids.max() >= emb.num_embeddings):
            raise ValueError(f"the token ids lie in [{ids.min().item()}, {ids.max().item()}], but the base's "
                             f"embedding has {emb.num_embeddings} entries (expected ids in "
                             f"[0, {emb.num_embeddings}))")
    x = task.x_train[:rows].to(_device_of(base))
    try:
        with evaluating(base):
            out = logits(base(x))
    except Exception as err:  # noqa: BLE001 - whatever the model raises on inputs it cannot take
        why = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"the data do not fit the base: a forward pass on inputs of shape "
                         f"{tuple(x.shape)} ({x.dtype}) raised {type(err).__name__}: {why}") from None
    if lm and (out.dim() != 3 or out.shape[:2] != x.shape):
        raise ValueError(f"a language model (loss 'lm') must output logits of shape (N, T, vocab); on inputs "
                         f"of shape {tuple(x.shape)} it output {tuple(out.shape)}")
    if not lm and (out.dim() != 2 or out.shape[0] != len(x)):
        raise ValueError(f"the base must output logits of shape (N, classes); on inputs of shape "
                         f"{tuple(x.shape)} it output {tuple(out.shape)}")
    classes = out.shape[-1]
    y = torch.cat([_targets(task.y_train, loss), _targets(task.y_test, loss)])
    if len(y) and (y.min() < 0 or y.max() >= classes):
        if lm:
            raise ValueError(f"the target token ids lie in [{y.min().item()}, {y.max().item()}], but the base "
                             f"predicts a vocabulary of {classes} (expected ids in [0, {classes}))")
        raise ValueError(f"the labels lie in [{y.min().item()}, {y.max().item()}], but the base has {classes} "
                         f"outputs (expected labels in [0, {classes}))")
    return classes


def check_candidates(base: nn.Module, candidates: Sequence[Candidate], task: Task, rows: int = 8) -> None:
    """Grow a copy of ``base`` by every candidate, spec by spec, and run each grown model on the
    first ``rows`` training inputs, so that a target that names no module (or one that cannot be
    grown) fails before anything is trained. ``base`` is not modified.

    Raises:
        ValueError: ``candidate NAME, Widen target 'PATH': why`` (or ``Deepen after 'PATH'``).
    """
    x = task.x_train[:rows].to(_device_of(base))
    for cand in candidates:
        grown = base
        for spec in cand.specs:
            where = f"Widen target {spec.target!r}" if isinstance(spec, Widen) else f"Deepen after {spec.after!r}"
            try:
                grown, _ = expand(grown, spec, check_inputs=x)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as err:
                why = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"candidate {cand.name!r}, {where}: {why}") from None


def _given_base(bench: Benchmark, base: nn.Module, seed: int, out: Path) -> nn.Module:
    """The seed's copy of a base given to :func:`compare` (never trained here); its state dict is
    written to ``OUT/bases/seed<seed>.pt`` as a trained base's is, unless already there."""
    model = _fresh_base(bench, seed, base).eval()
    path = out / "bases" / f"seed{seed}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(path, model.state_dict())
    return model


# ----------------------------------------------------------------------------- the run


@dataclass
class CompareResult:
    """Everything a compare run produced.

    Attributes:
        settings: as run.
        candidates: the candidates, as dicts.
        bases: per seed, the base's test accuracy (next-token accuracy for ``loss="lm"``) and
            its chance level, test loss, probe loss, the common threshold, its number of outputs
            (classes or vocabulary) and the chance-level loss ln(outputs).
        units: one record per (seed, candidate): sizes, baselines, gains, timings.
        ranking: one row per candidate: mean gains, parameters, mean default size.
        correlations: one row per metric: Spearman and Kendall with the gains over the base,
            computed within each seed and averaged over the seeds, with bootstrap intervals over
            candidates (:func:`manifold_ext.stats.within_seed_correlation`); the same pooled over
            all units (``pooled_spearman``, secondary: seed-to-seed shifts of the base enter
            it); within-seed Spearman over the function-preserving expansions and the control
            alone; and the share of equal-size candidate pairs put in the right order.
        signal: whether the gains differ beyond the seed spread:
            :func:`manifold_ext.stats.gain_signal` of the gains over the base.
        warnings: what makes the ranking untrustworthy, in words (see :func:`summarise`).
        base_fingerprint: the :func:`fingerprint` of a base given to :func:`compare`, else None.
    """

    settings: dict
    candidates: List[dict]
    bases: List[dict]
    units: List[dict]
    ranking: List[dict]
    correlations: List[dict]
    seconds: float = 0.0
    signal: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    base_fingerprint: Optional[str] = None

    def to_json(self, path: Optional[Path] = None) -> str:
        text = json.dumps(asdict(self), indent=1, default=str)
        if path is not None:
            write_text(Path(path), text)
        return text


def compare(bench: Benchmark, settings: Settings, out: Path, *, base: Optional[nn.Module] = None,
            resume: bool = False, quiet: bool = False, device=None) -> CompareResult:
    """Run the whole workflow on ``bench`` (see the module docstring) and write
    ``OUT/results.json``; every unit is also kept in ``OUT/units``, and each seed's base in
    ``OUT/bases``.

    Under ``torch.distributed`` (:mod:`manifold_ext.distributed`), rank 0 trains the bases and
    sends them to every rank, the units are dealt round-robin across the ranks (each writes its
    own unit files as they finish: give every rank the same ``out``, e.g. a shared file system),
    and rank 0 gathers them, writes any unit file it lacks and the results. Every rank returns
    the same result, equal to a single process's.

    ``device`` (default: the device of the task's tensors) is where everything is computed: the
    task's tensors and the bases are moved there, so training, the estimators and the baselines
    run there. It is not part of the settings a resumed run must match: a run started on one
    device may be resumed on another (the bases are saved on the CPU).

    ``base``: your own trained model. No base is trained then (``bench.make_base`` may be None
    and ``settings.base_epochs`` is unused): every seed starts from a copy of it (``base`` itself
    is never modified), and the seeds differ in the candidates' growth initialisation and data
    orders. The candidates' specs name its module paths. Its :func:`fingerprint` is part of the
    run's ``config.json``, so a run is never resumed with another base.

    Before anything is trained, the data are checked against the base (:func:`check_data`) and
    every candidate is grown once from it (:func:`check_candidates`): a ValueError says what
    does not fit. ``result.warnings`` (also in ``results.json``) flags a base at chance level,
    a threshold at or above the chance-level loss and gains that do not differ beyond the seed
    spread (see :func:`summarise`).

    ``settings.loss="lm"``: the task holds token sequences (:func:`manifold_ext.builtin.task_from_tokens`)
    and the base is a language model mapping ids (N, T) to logits (N, T, vocab); the accuracies
    are next-token accuracies and the gains their points."""
    start = time.perf_counter()
    out = Path(out)
    check_out(out)
    _check_candidate_names(bench.candidates)
    outputs = _check_inputs(bench, settings, base)
    config = _run_config(bench, settings, base)
    t = bench.task.to(bench.task.device if device is None else device)
    probe = (t.x_train[:settings.probe_examples], t.y_train[:settings.probe_examples])
    base_models = _shared_bases(bench, settings, base, out, t, config, resume)
    bases = [_base_record(seed, model, t, probe, settings, outputs) for seed, model in enumerate(base_models)]
    jobs = [(seed, cand) for seed in range(settings.seeds) for cand in bench.candidates]
    units = _run_units(jobs, base_models, bases, t, settings, out, resume, quiet)
    result = summarise(bench, settings, bases, units)
    result.seconds = time.perf_counter() - start
    result.base_fingerprint = config.get("base")
    if D.is_main():
        for (seed, cand), unit in zip(jobs, units):  # another node's units, without a shared disk
            if not unit_path(out, seed, cand.name).exists():
                write_unit(unit_path(out, seed, cand.name), unit)
        result.to_json(out / "results.json")
    D.barrier()
    return result


def _check_candidate_names(candidates: Sequence[Candidate]) -> None:
    """ValueError unless the names are unique and no two share a unit file."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got duplicates "
                         f"{sorted({n for n in names if names.count(n) > 1})}")
    files = {}
    for n in names:  # each candidate's unit file is named after it: two names must not share one
        other = files.setdefault(safe_name(n), n)
        if other != n:
            raise ValueError(f"candidate names {other!r} and {n!r} would share the unit file units/seed*/{safe_name(n)}.json "
                             f"(characters other than letters, digits, '-', '_' and '.' become '_'): rename one")


def _check_inputs(bench: Benchmark, settings: Settings, base: Optional[nn.Module]) -> int:
    """Before any training: there is a base, the data fit it, and every candidate grows from it.
    Returns the base's number of outputs (classes, or the vocabulary)."""
    if base is None and bench.make_base is None:
        raise ValueError("compare: the benchmark has no make_base; pass your trained model as base=")
    if base is not None and not isinstance(base, nn.Module):
        raise TypeError(f"compare: base must be an nn.Module, got {type(base).__name__}")
    reference = _fresh_base(bench, 0, base)
    outputs = check_data(reference, bench.task, loss=settings.loss)
    if settings.loss == "lm" and settings.baselines and (bench.task.y_train[:settings.probe_examples] == IGNORE).any():
        raise ValueError(f"the probe set (the first probe_examples={settings.probe_examples} training sequences) "
                         f"holds ignored targets ({IGNORE}), which the baselines do not take: pass sequences "
                         f"without padding, or baselines = []")
    check_candidates(reference, bench.candidates, bench.task)
    return outputs


def _run_config(bench: Benchmark, settings: Settings, base: Optional[nn.Module]) -> dict:
    """What a resumed run must match (``config.json``), as JSON values."""
    config = {"model": bench.model, "task": bench.task.name, "settings": asdict(settings),
              "candidates": [c.to_dict() for c in bench.candidates]}
    if settings.loss == LOSSES[0]:  # absent for the default loss, so that older run directories still resume
        del config["settings"]["loss"]
    if base is not None:  # absent for a trained base, so that older run directories still resume
        config["base"] = fingerprint(base)
    if "minima" in settings.estimators and "batch_size" not in settings.estimator_options.get("minima", {}):
        # minima's default batch is a rule, not a setting: a run measured under another rule must not resume.
        config["minima_batches"] = M.MINIMA_BATCHES
    return json.loads(json.dumps(config, default=str))


def _shared_bases(bench: Benchmark, settings: Settings, base: Optional[nn.Module], out: Path, t: Task,
                  config: dict, resume: bool) -> List[nn.Module]:
    """Every seed's base on ``t``'s device: rank 0 checks the directory and trains (or loads) them,
    then every rank has the same ones, or the same error."""
    failure, base_models = None, None
    if D.is_main():
        try:
            check_config(out, config, resume, asdict(Settings()))
            base_models = [_base(bench, settings, seed, out, task=t) if base is None
                           else _given_base(bench, base, seed, out) for seed in range(settings.seeds)]
        except ValueError as err:
            failure = str(err)
    if D.active() and base_models is not None:
        # Sent from the CPU: a pickled CUDA tensor would arrive on rank 0's device.
        base_models = [m.cpu() for m in base_models]
    failure, base_models = D.broadcast((failure, base_models))
    if failure is not None:
        raise ValueError(failure)
    return [m.to(t.device) for m in base_models]


def _base_record(seed: int, model: nn.Module, t: Task, probe, settings: Settings, outputs: int) -> dict:
    """A base's entry in the results: its accuracy and losses, the run's threshold and chance levels."""
    base_loss = mean_loss(model, *probe, settings.loss)
    tau = loss_threshold(settings.threshold_multiple, base_loss, math.log(outputs))
    return {"seed": seed, "test_accuracy": accuracy(model, t.x_test, t.y_test, settings.loss),
            "test_loss": mean_loss(model, t.x_test, t.y_test, settings.loss),
            "chance_accuracy": chance_accuracy(t, settings.loss),
            "probe_loss": base_loss, "threshold": tau, "threshold_capped": tau < settings.threshold_multiple * base_loss,
            "chance_loss": math.log(outputs), "outputs": outputs,
            "unigram_loss": unigram_loss(t) if settings.loss == "lm" else None,
            "parameters": sum(p.numel() for p in model.parameters())}


def _run_units(jobs, base_models: List[nn.Module], bases: List[dict], t: Task, settings: Settings, out: Path,
               resume: bool, quiet: bool) -> List[dict]:
    """Every (seed, candidate) unit, in the order of ``jobs``: this rank's are run (or read back
    with ``resume``) and written as they finish, then all ranks' are gathered."""
    mine = [i for i in range(len(jobs)) if i % D.world() == D.rank()]
    bar = tqdm(total=len(jobs), desc="compare", unit="candidate", leave=False,
               disable=quiet or not sys.stderr.isatty() or not D.is_main())
    done = {}
    with D.local():
        for i in mine:
            seed, cand = jobs[i]
            path = unit_path(out, seed, cand.name)
            unit = load_unit(path, seed, cand.name, settings.estimators, settings.baselines) if resume else None
            if unit is None:
                unit = run_unit(base_models[seed], cand, t, settings, seed, bases[seed]["threshold"])
                write_unit(path, unit)
            done[i] = unit
            bar.update(D.world())
            bar.set_postfix_str(f"seed {seed}: {cand.name}")
    bar.close()
    for part in D.all_gather(done):
        done.update(part)
    return [done[i] for i in range(len(jobs))]


# ----------------------------------------------------------------------------- summary


def summarise(bench: Benchmark, settings: Settings, bases: List[dict], units: List[dict]) -> CompareResult:
    """Gains, the ranking, the correlation tables and the warnings from the units.

    Four warnings can be raised (``CompareResult.warnings``):

    * the base is at chance level: its test accuracy (mean over the seeds' bases) is less than
      ``CHANCE_MARGIN`` (5 points) above the chance level, the test accuracy of always predicting
      the most frequent training class (token, for ``loss="lm"``);
    * for ``loss="lm"``, the base's test loss (mean over the seeds) is less than
      ``UNIGRAM_MARGIN`` (0.1 nats) below the unigram model's (:func:`unigram_loss`);
    * the threshold is not below the chance-level loss ln(K), the loss of uniform predictions
      over the base's K outputs (classes, or its vocabulary for ``loss="lm"``), for some seed's
      base: the low-loss region then takes in models no better than chance;
    * the gains carry no signal: with at least 2 seeds and 3 candidates, Friedman's test of the
      gains over the base (seeds as blocks, candidates as treatments) gives ``p > SIGNAL_P``
      (0.05). ``CompareResult.signal`` holds the p-value, the spread of the candidates' mean gains
      and the mean spread across seeds.
    """
    add_gains(units, bases)
    seeds = sorted({u["seed"] for u in units})
    by_unit = {(u["seed"], u["candidate"]): u["gain_over_base"] for u in units}
    signal = gain_signal([[by_unit[(s, c.name)] for c in bench.candidates] for s in seeds])
    ranking = ranking_of(bench.candidates, units, settings.default_estimator)
    correlations = [correlation_row(name, units, settings.n_boot) for name in metric_names(settings)]
    warnings = warnings_of(bases, signal, len(seeds), len(bench.candidates), settings.threshold_multiple)
    return CompareResult(settings=json.loads(json.dumps(asdict(settings), default=str)),
                         candidates=[c.to_dict() for c in bench.candidates], bases=bases,
                         units=units, ranking=ranking, correlations=correlations, signal=signal,
                         warnings=warnings)
