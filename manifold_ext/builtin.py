"""The built-in benchmarks of ``manifold-ext compare``: a task (data), a small base model and the
candidate expansions to rank (:data:`SUITE` lists those ``--suite`` runs).

* ``mlp`` on ``digits``: an MLP 64-11-11-10. Eleven units make pairs of width and depth
  expansions of exactly equal size possible: a block inserted after the second hidden layer adds
  11 * 12 = 132 parameters, and widening that layer by 6 units adds 6 * (11 + 1 + 10) = 132.
* ``mlp`` on ``teacher`` (Gaussian inputs labelled by a random wider MLP) and on ``clusters``
  (scikit-learn's ``make_classification``): MLPs 16-15-15-8 and 20-9-9-5, the same candidate
  kinds from :func:`mlp_candidates`.
* ``cnn`` on ``digits`` (8x8 images): a ResNetCNN with stages of :data:`CNN_WIDTHS` channels.
* ``gpt2`` on ``python``: a small Hugging Face GPT-2 (width 32, 2 blocks, 4 heads, feed-forward 128,
  byte vocabulary) learning the bytes of Python's standard-library source, ``loss="lm"``.

Every base is trained briefly on purpose: a base trained to convergence leaves every candidate a
gain below the spread between seeds, and then there is nothing to rank. The lengths were chosen by
measurement (``python -m benchmarks.base_choice``; the tables are in docs/benchmarks.md).
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import models, real_models
from .data import load_digits
from .expand import Deepen, Widen


@dataclass(frozen=True)
class Candidate:
    """One expansion to rank: a name and the specs that grow the base (none: the control, the
    base trained on for the same budget)."""

    name: str
    specs: Tuple = ()

    def to_dict(self) -> dict:
        """Plain JSON types: ``{"name": ..., "specs": [{"type": "Widen", ...}, ...]}``."""
        return {"name": self.name, "specs": [spec_to_dict(s) for s in self.specs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        """Inverse of :meth:`to_dict`."""
        return cls(name=d["name"], specs=tuple(spec_from_dict(s) for s in d.get("specs", [])))


def spec_to_dict(spec) -> dict:
    """A Widen or Deepen as ``{"type": "Widen"|"Deepen", field: value, ...}``."""
    return {"type": type(spec).__name__, **{k: v for k, v in spec.__dict__.items()}}


def spec_from_dict(d: dict):
    """Inverse of :func:`spec_to_dict`; also accepts ``{"widen": {...}}``-free configs where the
    type is given by a ``type`` key of ``"widen"`` or ``"deepen"`` (any case)."""
    d = dict(d)
    kind = str(d.pop("type", "")).lower()
    if kind not in ("widen", "deepen"):
        raise ValueError(f"a spec's type must be 'widen' or 'deepen', got {kind!r}")
    cls = Widen if kind == "widen" else Deepen
    try:
        return cls(**d)
    except TypeError as err:
        names = list(cls.__dataclass_fields__)
        raise ValueError(f"{cls.__name__}: invalid keys {sorted(set(d) - set(names))}; valid keys are {names}") from err


@dataclass
class Task:
    """Data of a benchmark: training and test splits, and the shape of one input."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        """Where the task's tensors are."""
        return self.x_train.device

    def to(self, device) -> "Task":
        """The same task with every tensor on ``device`` (itself when they already are)."""
        device = torch.device(device)
        if all(t.device == device for t in (self.x_train, self.y_train, self.x_test, self.y_test)):
            return self
        return Task(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                    self.y_test.to(device))


@dataclass
class Benchmark:
    """A task, a factory for the (untrained) base model and the candidates.

    ``settings`` are the benchmark's own defaults of :class:`manifold_ext.compare.Settings` fields
    (e.g. ``loss="lm"`` and its training budget), ``quick`` what ``--quick`` changes on top of the
    common quick settings (:func:`manifold_ext.compare.settings_for` combines them), and
    ``quick_candidates`` the names of the candidates a quick run keeps (None: all).

    ``make_base`` may be None when the base is the user's own trained model, given to
    :func:`manifold_ext.compare.compare` as ``base=``; the candidates' specs then name that
    model's module paths, e.g.::

        task = task_from_arrays(X, y)
        bench = Benchmark("mine", task, candidates=[
            Candidate("control"),
            Candidate("wide", (Widen("fc1", factor=2, init="net2net"),)),
            Candidate("deep", (Deepen(after="act1", init="identity"),)),
        ])
        compare(bench, Settings(), "runs/mine", base=my_trained_model)
    """

    model: str
    task: Task
    make_base: Optional[Callable[[], nn.Module]] = None
    candidates: List[Candidate] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    quick_candidates: Optional[Tuple[str, ...]] = None

    @property
    def name(self) -> str:
        """``MODEL-TASK``, e.g. ``"mlp-digits"``: the benchmark's directory in a suite run."""
        task = self.task.name if self.task is not None else "custom"
        return f"{self.model}-{task}"

    def quick_version(self) -> "Benchmark":
        """The benchmark ``--quick`` runs: the candidates named in ``quick_candidates`` (all when
        None), in their order here."""
        if self.quick_candidates is None:
            return self
        keep = [c for c in self.candidates if c.name in self.quick_candidates]
        return Benchmark(self.model, self.task, self.make_base, keep, dict(self.settings), dict(self.quick), None)


def task_from_arrays(X, y, *, name: str = "custom", standardize: bool = True,
                     tokens: Optional[bool] = None, test_fraction: float = 0.4, seed: int = 0,
                     min_examples: int = 10) -> Task:
    """A :class:`Task` from your own arrays: ``X`` of shape ``(N, ...)`` (features, images or
    token ids) and ``y`` of shape ``(N,)`` (class indices), numpy arrays or tensors.

    The examples are shuffled with ``seed`` and split: ``ceil(test_fraction * N)`` for testing,
    the rest for training (the 60/40 split of ``manifold-ext compare --data``).

    Args:
        tokens: whether ``X`` holds integer token ids (kept as int64 and never standardised) or
            features (cast to float32). None: token ids when ``X`` has an integer dtype.
        standardize: features only: subtract each feature's mean and divide by its standard
            deviation, both from the training split alone and applied to both splits (so no test
            statistics leak in). A feature that is constant in the training split (its standard
            deviation at most 1e-10 times its magnitude) is only centred. Statistics are
            per feature: per element of ``X[i]``, e.g. per pixel for images.
        name: the task's name (results and the resume check of a compare run record it).
        min_examples: fewer examples than this is a ValueError.

    Raises:
        ValueError: for shapes that do not match, labels that are not non-negative integers,
            token ids given as floats, or fewer than ``min_examples`` examples.
    """
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.dim() < 2 or y.dim() != 1 or len(X) != len(y):
        raise ValueError(f"expected X of shape (N, ...) and y of shape (N,), got X {tuple(X.shape)} "
                         f"and y {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or (len(y) and y.min() < 0):
        raise ValueError("y must hold class indices (non-negative integers)")
    if len(X) < min_examples:
        raise ValueError(f"expected at least {min_examples} examples, got {len(X)}")
    _check_fraction(test_fraction)
    integer = not (X.is_floating_point() or X.is_complex() or X.dtype == torch.bool)
    tokens = integer if tokens is None else tokens
    if tokens and not integer:
        raise ValueError(f"token ids must be integers, got X of dtype {X.dtype}")
    tr, te = _split(len(X), test_fraction, seed, "examples")
    if tokens:
        return Task(name, X[tr].long(), y[tr].long(), X[te].long(), y[te].long())
    x_train, x_test = X[tr].double(), X[te].double()  # statistics in float64, then cast
    if standardize:
        mean = x_train.mean(0)
        std = x_train.std(0) if len(tr) > 1 else torch.zeros_like(mean)
        constant = std <= 1e-10 * mean.abs().clamp_min(1.0)
        std = torch.where(constant, torch.ones_like(std), std)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Task(name, x_train.float(), y[tr].long(), x_test.float(), y[te].long())


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _split(n: int, test_fraction: float, seed: int, what: str) -> Tuple[Tensor, Tensor]:
    """``(train, test)`` indices: ``n`` items shuffled with ``seed``, ``ceil(test_fraction * n)``
    of them for testing, the rest for training (ValueError when none is left for training)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(test_fraction * n)
    te, tr = perm[:n_test], perm[n_test:]
    if not len(tr):
        raise ValueError(f"test_fraction={test_fraction!r} leaves no training {what} (of {n})")
    return tr, te


def task_from_tokens(tokens, *, name: str, test_fraction: float = 0.4, seed: int = 0) -> Task:
    """A language-modelling :class:`Task` from token sequences: ``tokens`` of shape ``(N, T)``
    (integer ids, a numpy array or tensor; ``T >= 2``), for ``Settings(loss="lm")`` of
    :mod:`manifold_ext.compare`.

    Inputs and targets are the sequences themselves (``x = y = tokens``, int64): position t of a
    sequence predicts its token t + 1. The sequences are shuffled with ``seed`` and split as
    :func:`task_from_arrays` splits examples: ``ceil(test_fraction * N)`` for testing, the rest
    for training; no sequence is cut across the splits.

    Args:
        name: the task's name (results and the resume check of a compare run record it).

    Raises:
        ValueError: for tokens that are not a 2-D array of non-negative integers with ``T >= 2``,
            or too few sequences to leave one for training.
    """
    x = torch.as_tensor(tokens)
    if x.dim() != 2:
        raise ValueError(f"expected tokens of shape (N, T): N sequences of T token ids, got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got tokens of dtype {x.dtype}")
    if x.shape[1] < 2:
        raise ValueError(f"expected sequences of at least 2 tokens (position t predicts token t + 1), "
                         f"got tokens of shape {tuple(x.shape)}")
    if x.numel() and x.min() < 0:
        raise ValueError(f"token ids must be non-negative, got ids down to {x.min().item()}")
    _check_fraction(test_fraction)
    tr, te = _split(len(x), test_fraction, seed, "sequences")
    x = x.long()
    return Task(name, x[tr], x[tr], x[te], x[te])


def digits(image: bool = False) -> Task:
    """The built-in digits split (1078 training, 719 test examples), as vectors or 1x8x8 images."""
    d = load_digits()
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return Task("digits", d.x_train.reshape(shape), d.y_train, d.x_test.reshape(shape), d.y_test)


def python_source(length: int = 64, per_file: int = 2048, test_fraction: float = 0.25) -> Task:
    """Byte-level language modelling of real text: the source of the running interpreter's
    standard library (its top-level ``*.py`` modules in sorted order, the first ``per_file`` bytes
    of each), cut into sequences of ``length`` bytes (token ids 0..255), split as
    :func:`task_from_tokens` splits (seeded, whole sequences). Nothing is downloaded; the text
    is that of the installed Python version, so it differs slightly between versions.

    Raises:
        FileNotFoundError: the interpreter has no standard-library sources (e.g. a frozen build).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python standard-library sources under {root} (the python task reads them)")
    text = b"".join(f.read_bytes()[:per_file] for f in files)
    n = len(text) // length
    tokens = torch.frombuffer(bytearray(text[:n * length]), dtype=torch.uint8).long().reshape(n, length)
    return task_from_tokens(tokens, name="python-source", test_fraction=test_fraction)


MLP_WIDTHS = (64, 11, 11, 10)


def teacher(n: int = 3000, dim: int = 16, classes: int = 8, hidden: int = 64, seed: int = 0) -> Task:
    """A generated classification task: ``n`` Gaussian inputs of ``dim`` features, each labelled by
    the largest output of a fixed random teacher MLP ``dim-hidden-hidden-classes`` (tanh), split
    60/40 as :func:`task_from_arrays` splits. A student narrower than the teacher is limited by its
    capacity, so width and depth can pay off. Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    h = x
    for a, b in ((dim, hidden), (hidden, hidden)):
        h = torch.tanh(h @ (torch.randn(a, b, generator=g) * (2.0 / a) ** 0.5))
    y = (h @ torch.randn(hidden, classes, generator=g)).argmax(1)
    return task_from_arrays(x, y, name="teacher", seed=seed)


def clusters(n: int = 3000, features: int = 20, classes: int = 5, seed: int = 0) -> Task:
    """A generated classification task: scikit-learn's ``make_classification`` (``n`` examples of
    ``features`` features, 10 informative and 4 redundant, ``classes`` classes of 3 Gaussian
    clusters each, class separation 1.5, no label noise), split 60/40 as :func:`task_from_arrays`
    splits. Deterministic given ``seed``."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=features, n_informative=10, n_redundant=4,
                               n_classes=classes, n_clusters_per_class=3, class_sep=1.5, flip_y=0.0,
                               random_state=seed)
    return task_from_arrays(x, y, name="clusters", seed=seed)


def mlp_parameters(widths: Sequence[int]) -> int:
    """Parameters of :func:`manifold_ext.models.mlp` ``(widths)`` without norms: weights and biases."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def equal_size_widths(widths: Sequence[int], added: int, *, layers: int = 2) -> Optional[Tuple[int, ...]]:
    """Hidden widths that add exactly ``added`` parameters to the MLP of ``widths``, widening only
    its last ``layers`` hidden layers (each by 0 or more units, the last by at least 1), or None
    when no such widths exist. Fewest added units win; ties go to widening the last layer most.

    Example: ``equal_size_widths((64, 11, 11, 10), 132)`` is ``(11, 17)``: six more units in the
    last hidden layer add 6 * (11 + 1 + 10) = 132, the size of one inserted 11x11 layer."""
    widths = [int(w) for w in widths]
    hidden = len(widths) - 2
    if hidden < 1:
        raise ValueError(f"equal_size_widths: widths needs at least one hidden layer, got {tuple(widths)}")
    free = list(range(max(0, hidden - layers), hidden))
    base, best = mlp_parameters(widths), None
    limit = max(widths[1:-1]) * 4 + 8

    def search(i: int, chosen: Tuple[int, ...]):
        nonlocal best
        if i == len(free):
            if not chosen[-1]:
                return
            grown = list(widths)
            for layer, u in zip(free, chosen):
                grown[1 + layer] += u
            if mlp_parameters(grown) - base == added:
                key = (sum(chosen), tuple(-u for u in reversed(chosen)))
                if best is None or key < best[0]:
                    best = (key, tuple(grown[1:-1]))
            return
        for u in range(limit + 1):
            search(i + 1, chosen + (u,))

    search(0, ())
    return None if best is None else best[1]


def mlp_candidates(widths: Sequence[int], *, factors: Sequence[float] = (1.5, 2, 4),
                   depths: Sequence[int] = (1, 2), width_inits: Sequence[str] = ("net2net", "zero", "random"),
                   depth_inits: Sequence[str] = ("identity", "random", "copy"),
                   pair_inits: Sequence[str] = ("net2net", "zero")) -> List[Candidate]:
    """The candidates for ``models.mlp(widths)`` (any widths with at least one hidden layer): the
    control; every hidden layer widened by each of ``factors`` with each of ``width_inits``;
    ``count`` layers inserted after the last hidden layer (for each of ``depths``, with each of
    ``depth_inits``; ``"copy"`` only where the last hidden layer's Linear is square); and for each depth, the width expansion of exactly the same parameter count
    (:func:`equal_size_widths`: the last one or two hidden layers widened) with each of
    ``pair_inits``, named ``"width +U INIT (= depth +C)"`` (``+U1/+U2`` when two layers grow).
    A depth with no exactly equal width expansion gets no pair. Every initialisation of one
    expansion has the same size, so those are equal-size pairs too.

    Example: ``mlp_candidates((64, 11, 11, 10))`` are the 20 candidates of the built-in MLP."""
    widths = tuple(int(w) for w in widths)
    hidden = len(widths) - 2
    if hidden < 1 or min(widths) < 1:
        raise ValueError(f"mlp_candidates: widths must be positive with at least one hidden layer, got {widths}")
    last, h = 2 * (hidden - 1), widths[-2]
    out = [Candidate("control")]
    for f in factors:
        for init in width_inits:
            out.append(Candidate(f"width x{f:g} {init}", (Widen("*", factor=f, init=init),)))
    square = widths[-3] == h  # a copy duplicates the last hidden Linear, which must be square
    for count in depths:
        for init in (i for i in depth_inits if i != "copy" or square):
            out.append(Candidate(f"depth +{count} {init}", (Deepen(after=str(last + 1), count=count, init=init),)))
        grown = equal_size_widths(widths, count * h * (h + 1))
        if grown is None:
            continue
        changed = [(2 * i, g - w) for i, (w, g) in enumerate(zip(widths[1:-1], grown)) if g != w]
        label = "/".join(f"+{u}" for _, u in changed)
        for init in pair_inits:
            specs = tuple(Widen(str(layer), size=widths[1 + layer // 2] + u, init=init) for layer, u in changed)
            out.append(Candidate(f"width {label} {init} (= depth +{count})", specs))
    return out


def _cnn_candidates() -> List[Candidate]:
    out = [Candidate("control")]
    for f in (1.5, 2):
        for init in ("net2net", "zero", "random"):
            out.append(Candidate(f"block width x{f:g} {init}", (Widen("stages.*", factor=f, init=init),)))
    for init in ("net2net", "zero"):
        out.append(Candidate(f"stage 1 width x2 {init}", (Widen("stages.1", factor=2, init=init),)))
    for init in ("zero", "random"):
        out.append(Candidate(f"depth +1 per stage {init}", (Deepen(after="stages.*", init=init),)))
    # A copy needs a block whose channels do not change: only the first stage has one.
    out.append(Candidate("depth +1 in stage 0 copy", (Deepen(after="stages.0", init="copy"),)))
    return out


def transformer_candidates() -> List[Candidate]:
    """The candidates for a :class:`manifold_ext.models.TinyTransformer` classifier (``manifold-ext
    compare --model transformer --data FILE``): feed-forward width, residual width and depth."""
    out = [Candidate("control")]
    for f in (2, 4):
        for init in ("net2net", "zero", "random"):
            out.append(Candidate(f"ff width x{f} {init}", (Widen("blocks.*.ff1", factor=f, init=init),)))
    for init in ("net2net", "zero"):
        out.append(Candidate(f"width x2 {init}", (Widen("tok", factor=2, init=init),)))
    for init in ("zero", "random", "copy"):
        out.append(Candidate(f"depth +1 {init}", (Deepen(after="blocks.*", init=init),)))
    return out


GPT2 = dict(vocab=256, positions=64, width=32, layers=2, heads=4, inner=128)


def _gpt2_candidates() -> List[Candidate]:
    h, last = "transformer.h", f"transformer.h.{GPT2['layers'] - 1}"
    head_dim = GPT2["width"] // GPT2["heads"]
    out = [Candidate("control")]
    for init in ("net2net", "zero", "random"):
        out.append(Candidate(f"ff width x2 {init}", (Widen(f"{h}.*.mlp", factor=2, init=init),)))
    for init in ("zero", "copy", "random"):
        out.append(Candidate(f"depth +1 {init}", (Deepen(after=last, init=init),)))
    # GPT-2's blocks have biases, so no feed-forward width matches one block exactly: the nearest.
    out.append(Candidate(f"ff width +{_GPT2_UNITS} zero (~ depth +1)",
                         (Widen(f"{h}.*.mlp", size=GPT2["inner"] + _GPT2_UNITS, init="zero"),)))
    # Two more heads grow n_embd by 2 * head_dim: the same size as residual width x1.5 (larger heads).
    for init in ("net2net", "zero"):
        out.append(Candidate(f"heads +2 {init}", (Widen(f"{h}.*.attn", size=GPT2["heads"] + 2, init=init),)))
    out.append(Candidate("residual width x1.5 zero (= heads +2)",
                         (Widen("transformer.wte", size=GPT2["width"] + 2 * head_dim, init="zero"),)))
    out.append(Candidate("residual width x2 net2net", (Widen("transformer.wte", factor=2, init="net2net"),)))
    return out


def _gpt2_units() -> int:
    """Feed-forward units (added to every block) nearest in parameter count to one more block."""
    d, inner, layers = GPT2["width"], GPT2["inner"], GPT2["layers"]
    block = 4 * d * d + 9 * d + inner * (2 * d + 1)
    return round(block / (layers * (2 * d + 1)))


_GPT2_UNITS = _gpt2_units()

# simplex is left out: on this model it cost more than the rest of a unit together.
GPT2_SETTINGS = dict(loss="lm", base_epochs=4, adapt_epochs=1, finetune_epochs=3, lr=3e-3, batch_size=32,
                     probe_examples=64, estimators=("radius", "minima"),
                     estimator_options={"radius": {"directions": 16, "grid": (1e-3, 10.0, 10), "bisect": 8},
                                        "minima": {"m": 4, "samples": 64}})
GPT2_QUICK = dict(probe_examples=32, estimator_options={"radius": {"directions": 8, "grid": (1e-3, 10.0, 10),
                                                                   "bisect": 8},
                                                        "minima": {"m": 3, "samples": 64}})
GPT2_QUICK_CANDIDATES = ("control", "ff width x2 zero", "ff width x2 random", "depth +1 zero", "depth +1 copy",
                         f"ff width +{_GPT2_UNITS} zero (~ depth +1)", "heads +2 zero",
                         "residual width x1.5 zero (= heads +2)")


TEACHER_SETTINGS: dict = {}
CLUSTERS_SETTINGS: dict = {}
CNN_SETTINGS = dict(base_epochs=10, probe_examples=256)
TEACHER_WIDTHS = (16, 15, 15, 8)
CLUSTERS_WIDTHS = (20, 9, 9, 5)
CNN_WIDTHS = (4, 8)

# (model, task) of every built-in benchmark; the first task of a model is its default.
BENCHMARKS = (("mlp", "digits"), ("mlp", "teacher"), ("mlp", "clusters"), ("cnn", "digits"), ("gpt2", "python"))
# What ``manifold-ext compare --suite`` runs: every built-in benchmark.
SUITE = BENCHMARKS


def _mlp(task: Task, widths: Tuple[int, ...], **settings) -> Benchmark:
    return Benchmark("mlp", task, lambda: models.mlp(widths), mlp_candidates(widths), settings=settings)


def benchmark(model: str = "mlp", task: Optional[str] = None) -> Benchmark:
    """The built-in benchmark of ``model`` on ``task`` (one of :data:`BENCHMARKS`): ``"mlp"`` on
    ``"digits"`` (default), ``"teacher"`` (:func:`teacher`) or ``"clusters"`` (:func:`clusters`);
    ``"cnn"`` on ``"digits"``; ``"gpt2"`` (a small Hugging Face GPT-2 language model, needs
    ``transformers``) on ``"python"`` (byte-level text of Python's standard library,
    :func:`python_source`). ``task`` defaults to the model's first task."""
    models_ = dict.fromkeys(m for m, _ in BENCHMARKS)
    if model not in models_:
        extra = (" (the transformer on modular addition was removed: its base stayed at chance level; the "
                 "TinyTransformer still takes your own token data with --data)") if model == "transformer" else ""
        raise ValueError(f"no built-in benchmark for model {model!r}{extra}; valid models are {sorted(models_)}")
    task = next(t for m, t in BENCHMARKS if m == model) if task is None else task
    if (model, task) not in BENCHMARKS:
        raise ValueError(f"no built-in benchmark for model {model!r} on task {task!r}; valid pairs are "
                         f"{sorted(BENCHMARKS)}")
    if model == "mlp":
        if task == "digits":
            return _mlp(digits(), MLP_WIDTHS)
        if task == "teacher":
            return _mlp(teacher(), TEACHER_WIDTHS, **TEACHER_SETTINGS)
        return _mlp(clusters(), CLUSTERS_WIDTHS, **CLUSTERS_SETTINGS)
    if model == "cnn":
        return Benchmark("cnn", digits(image=True), lambda: models.ResNetCNN(1, CNN_WIDTHS, (1, 1), 10),
                         _cnn_candidates(), settings=dict(CNN_SETTINGS))
    return Benchmark("gpt2", python_source(GPT2["positions"]), lambda: real_models.gpt2(seed=None, **GPT2),
                     _gpt2_candidates(), settings=dict(GPT2_SETTINGS), quick=dict(GPT2_QUICK),
                     quick_candidates=GPT2_QUICK_CANDIDATES)


def suite() -> List[Benchmark]:
    """The benchmarks of ``manifold-ext compare --suite`` (:data:`SUITE`), in that order."""
    return [benchmark(m, t) for m, t in SUITE]
