"""``expand``: apply growth specs to a copy of a model and report what changed."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _layers as L
from .depth import deepen_all
from .resnet import deepen_resnet, widen_resnet
from .report import ExpansionReport
from .specs import Deepen, Widen
from .transformer import deepen_transformer, widen_transformer
from .width import widen_all

DEFAULT_CHECK_BATCH = 64


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

    The preservation error ``max |expanded(x) - base(x)|`` is measured in eval mode on
    ``check_inputs``; when None and the first module is an ``nn.Linear``, on
    ``DEFAULT_CHECK_BATCH`` standard-normal inputs drawn from a fixed seed (so the caller's RNG
    is untouched); for a ``ResNetCNN``, on 8x8 images drawn the same way; for a ``TinyTransformer``,
    on random token ids of its full ``length``. Another convolutional
    model has no default (its input's spatial size is unknown):
    pass ``check_inputs`` to measure it. Returns ``(expanded_model, ExpansionReport)``.
    """
    from ..models import ResNetCNN, TinyTransformer

    resnet = isinstance(model, ResNetCNN)
    transformer = isinstance(model, TinyTransformer)
    if not (resnet or transformer):
        L.children(model)  # the type check, before any work
    for s in specs:
        if not isinstance(s, (Widen, Deepen)):
            raise TypeError(f"expand: each spec must be a Widen or Deepen, got {type(s).__name__}: {s!r}")
    new = copy.deepcopy(model)
    changes, touched = [], []
    for s in specs:
        if resnet or transformer:
            if transformer:
                step = (widen_transformer if isinstance(s, Widen) else deepen_transformer)(new, s, generator)
            else:
                step = (widen_resnet if isinstance(s, Widen) else deepen_resnet)(new, s, generator)
            touched += [m for m, _ in step]
            changes += [c for _, c in step]
            continue
        step = (widen_all if isinstance(s, Widen) else deepen_all)(new, s, generator)
        changes += step
        touched += [new._modules[c.path] for c in step]
    # A later Deepen renumbers the Sequential: report every change under its final path.
    final = {id(m): name for name, m in new.named_modules()}
    for c, m in zip(changes, touched):
        c.path = final[id(m)]
    if check_inputs is None:
        check_inputs = _default_inputs(model)
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


def _default_inputs(model: nn.Module) -> Optional[Tensor]:
    from ..models import ResNetCNN, TinyTransformer

    if isinstance(model, TinyTransformer):  # token ids of the full length
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, model.tok.num_embeddings, (DEFAULT_CHECK_BATCH, model.length), generator=g)
        return x.to(model.tok.weight.device)
    if isinstance(model, ResNetCNN):  # built for small images: check on 8x8 ones
        w = model.stem[0].weight
        g = torch.Generator().manual_seed(0)
        x = torch.randn(DEFAULT_CHECK_BATCH, model.in_channels, 8, 8, generator=g)
        return x.to(device=w.device, dtype=w.dtype)
    kids = list(model.children())
    if not kids or not isinstance(kids[0], nn.Linear):
        return None
    w = kids[0].weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(DEFAULT_CHECK_BATCH, kids[0].in_features, generator=g)
    return x.to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def preservation_error(base: nn.Module, expanded: nn.Module, inputs: Tensor) -> float:
    """``max |expanded(inputs) - base(inputs)|`` in eval mode; both models' modes are restored."""
    modes = [(m, m.training) for net in (base, expanded) for m in net.modules()]
    try:
        base.eval()
        expanded.eval()
        return (expanded(inputs).float() - base(inputs).float()).abs().max().item()
    finally:
        for m, t in modes:
            m.train(t)
