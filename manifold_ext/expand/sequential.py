"""The ``nn.Sequential`` family: MLPs and plain convolutional stacks (see ``width``, ``conv``
and ``depth``). It takes any model and refuses, by name, one that is not an ``nn.Sequential``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import _layers as L
from .depth import deepen_all
from .registry import Family
from .width import widen_all

DEFAULT_CHECK_BATCH = 64


def _paired(step):
    """The family step for ``step``, which returns LayerChanges: ``(module, LayerChange)`` pairs."""
    def run(model, spec, generator):
        """Apply ``step`` and pair each change with the module at its path."""
        changes = step(model, spec, generator)
        return [(model._modules[c.path], c) for c in changes]
    return run


def _default_inputs(model: nn.Module) -> Optional[Tensor]:
    """Standard-normal inputs of a first ``nn.Linear``'s width, from a fixed seed; None for a
    model that starts otherwise (a convolution's image size is unknown)."""
    kids = list(model.children())
    if not kids or not isinstance(kids[0], nn.Linear):
        return None
    return L.fixed_seed_normal((DEFAULT_CHECK_BATCH, kids[0].in_features), kids[0].weight)


def _matches(model: nn.Module) -> bool:
    """True for an ``nn.Sequential``; TypeError, by name, for anything else (the last family)."""
    L.children(model)  # refuses, by name, anything but an nn.Sequential
    return True


FAMILY = Family(name="nn.Sequential (MLPs and convolutional stacks)", matches=_matches,
                widen=_paired(widen_all), deepen=_paired(deepen_all), default_inputs=_default_inputs)
