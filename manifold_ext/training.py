"""The one training loop of the package, the train/eval mode a measurement runs in, and a trained
model's accuracy and loss.

Base models, adaptation, fine-tuning (:mod:`manifold_ext.compare`), the ``minima`` estimator's
runs (:mod:`manifold_ext.manifold`) and the demo all train through :func:`train`, so a seed means
the same data order everywhere. Every measurement runs its model under :func:`evaluating`, which
restores each module's own flag afterwards: a model whose parts were deliberately left in eval
mode (a frozen BatchNorm) comes back as it was, not with the root's flag copied to every module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
from torch import nn

from .outputs import logits
from .outputs import mean_loss as output_loss

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
IGNORE = -100  # a target that does not count (the engine's ignore_index)


def train(model: nn.Module, x, y, *, epochs: int, lr: float, batch_size: int, seed: int,
          optimizer: Union[str, torch.optim.Optimizer] = "adam",
          loss: str = "cross_entropy") -> torch.optim.Optimizer:
    """Train ``model`` in place on ``(x, y)`` for ``epochs`` epochs of mini-batches of
    ``batch_size`` in the order a generator seeded with ``seed`` draws, and leave it in eval mode.

    Args:
        optimizer: ``"adam"`` or ``"sgd"`` (a new one at ``lr``), or an optimiser to continue
            with (``lr`` is then ignored).
        loss: as :func:`manifold_ext.outputs.mean_loss` (``"cross_entropy"``, ``"mse"``, ``"lm"``).

    Returns:
        The optimiser, so that training can continue where it stopped.
    """
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an optimiser, got {optimizer!r}")
        optimizer = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            optimizer.zero_grad()
            output_loss(model(x[idx]), y[idx], loss).backward()
            optimizer.step()
    model.eval()
    return optimizer


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode for the duration; afterwards each module's own
    train/eval flag is restored, whatever happened inside."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _aligned(out: torch.Tensor, y: torch.Tensor, loss: str):
    """``(logits, targets)`` paired position by position: for ``"lm"``, position t predicts
    ``y[:, t + 1]`` (the last position predicts nothing, the first target is never predicted)."""
    if loss == "lm":
        return out[:, :-1], y[:, 1:]
    return out, y


@torch.no_grad()
def accuracy(model: nn.Module, x, y, loss: str = "cross_entropy") -> float:
    """Accuracy in eval mode: the share of examples whose class is the argmax of the logits; for
    ``loss="lm"``, the next-token accuracy: the share of positions 1.. whose target is the argmax
    at the previous position (targets of -100 do not count)."""
    with evaluating(model):
        out, y = _aligned(logits(model(x)), y, loss)
    return (out.argmax(-1) == y)[y != IGNORE].double().mean().item()


@torch.no_grad()
def mean_loss(model: nn.Module, x, y, loss: str = "cross_entropy") -> float:
    """Mean loss in eval mode: the cross-entropy, or for ``loss="lm"`` the next-token
    cross-entropy over every predicted position."""
    with evaluating(model):
        return output_loss(model(x), y, loss).item()
