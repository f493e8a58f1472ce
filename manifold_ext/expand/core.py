"""``expand``: apply growth specs to a copy of a model and report what changed."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..outputs import logits as logits_of
from ..training import evaluating
from . import _layers as L
from .registry import family_of
from .report import ExpansionReport
from .specs import Deepen, Widen


def expand(
    model: nn.Module,
    *specs,
    generator: Optional[torch.Generator] = None,
    check_inputs: Optional[Tensor] = None,
) -> Tuple[nn.Module, ExpansionReport]:
    """Grow a deep copy of ``model`` by the ``Widen``/``Deepen`` specs, applied in order.

    ``model`` is never modified (its parameters, buffers and train/eval mode are as before).
    Paths in a spec refer to the model as the previous specs left it. Random draws (net2net
    choices, fresh weights, noise) come from ``generator`` (a CPU ``torch.Generator``), or from
    the global RNG when it is None.

    The operators come from the model's family (:func:`manifold_ext.expand.registry.family_of`).
    The preservation error ``max |expanded(x) - base(x)|`` is measured in eval mode on
    ``check_inputs``; when None, on the family's default inputs, drawn from a fixed seed (so the
    caller's RNG is untouched): for an ``nn.Sequential`` starting with an ``nn.Linear``,
    standard-normal inputs; for a ``ResNetCNN``, 8x8 images; for a ``TinyTransformer``, random
    token ids of its full ``length``. Another convolutional model has no default (its input's
    spatial size is unknown): pass ``check_inputs`` to measure it. Returns
    ``(expanded_model, ExpansionReport)``.
    """
    family = family_of(model)  # the type check, before any work
    for s in specs:
        if not isinstance(s, (Widen, Deepen)):
            raise TypeError(f"expand: each spec must be a Widen or Deepen, got {type(s).__name__}: {s!r}")
    new = copy.deepcopy(model)
    changes, touched = [], []
    origin = {id(m): name for name, m in new.named_modules()}  # module -> its path in the base
    for s in specs:
        widened = isinstance(s, Widen)
        before = dict(new.named_modules())
        shapes = {n: list(p.shape) for n, p in new.named_parameters()}
        step = (family.widen if widened else family.deepen)(new, s, generator)
        if family.finish is not None:
            family.finish(new)
        now = {id(m): name for name, m in new.named_modules()}
        for m, c in step:
            c.weights = _weight_shapes(shapes if widened else {}, now[id(m)], m)
        touched += [m for m, _ in step]
        changes += [c for _, c in step]
        _track_origin(origin, before, new, widened)
    # A later Deepen renumbers the Sequential: report every change under its final path.
    final = {id(m): name for name, m in new.named_modules()}
    for c, m in zip(changes, touched):
        c.path = final[id(m)]
        c.base_path = origin.get(id(m))
    if check_inputs is None:
        check_inputs = family.default_inputs(model)
    err = None if check_inputs is None else preservation_error(model, new, check_inputs)
    report = ExpansionReport(
        params_before=L.n_params(model),
        params_after=L.n_params(new),
        changes=changes,
        specs=[{"type": type(s).__name__, **asdict(s)} for s in specs],
        preserving=all(c.exact for c in changes),
        preservation_error=err,
        check_inputs_shape=None if check_inputs is None else list(check_inputs.shape),
    )
    return new, report


def _track_origin(origin: dict, before: dict, new: nn.Module, widened: bool) -> None:
    """Carry each module's base path across one growth step. A widening step may replace a
    module by a larger one at the same path: the new object inherits the old one's origin. A
    deepening step renumbers existing modules (same objects) and inserts new ones (no origin)."""
    for name, m in new.named_modules():
        if id(m) not in origin and widened and name in before and id(before[name]) in origin:
            origin[id(m)] = origin[id(before[name])]


def _weight_shapes(shapes: dict, path: str, module: nn.Module) -> dict:
    """``{name: [shape before the step, shape after]}`` of the module's parameters (names relative
    to it) whose shape the step changed, as torch stores them (``nn.Linear``: ``(out, in)``; a
    Hugging Face ``Conv1D``: ``(in, out)``). ``shapes``: every parameter's shape before the step,
    by full name (empty for a deepening step: each of its modules is new, with ``[]`` before)."""
    out = {}
    for n, p in module.named_parameters():
        old = shapes.get(f"{path}.{n}" if path else n, [])
        if old != list(p.shape):
            out[n] = [old, list(p.shape)]
    return out


@torch.no_grad()
def preservation_error(base: nn.Module, expanded: nn.Module, inputs: Tensor) -> float:
    """``max |expanded(inputs) - base(inputs)|`` over the logits (a tensor, or a Hugging Face
    ``ModelOutput``'s ``.logits``; a headless model's ``last_hidden_state``), in eval mode; both
    models' modes are restored."""
    with evaluating(base, expanded):
        return (_output(expanded(inputs)) - _output(base(inputs))).abs().max().item()


def _output(out) -> Tensor:
    """What a model's output is compared on: its logits, or a headless Hugging Face model's
    ``last_hidden_state``."""
    hidden = getattr(out, "last_hidden_state", None)
    if getattr(out, "logits", None) is None and isinstance(hidden, Tensor):
        return hidden.float()
    return logits_of(out).float()
