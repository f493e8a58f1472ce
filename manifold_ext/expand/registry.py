"""Which growth operators serve which model: one :class:`Family` per kind of network.

``expand`` asks :func:`family_of` for the first family of :func:`families` whose ``matches``
accepts the model, and applies its ``widen``/``deepen`` step to each spec. Adding a family (a
Hugging Face or torchvision architecture, say) is one module that defines a ``FAMILY`` and its
name in ``_MODULES``; the more specific families come first, and the ``nn.Sequential`` family,
which takes any model and refuses what is not an ``nn.Sequential``, comes last. A family's
``matches`` must not import an optional library (it tests the model's class by name and module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .report import LayerChange

# A step grows the model in place (it is already a copy) by one spec and returns, per change, the
# module that changed and the LayerChange (whose path ``expand`` re-resolves at the end).
Step = Callable[[nn.Module, object, Optional[torch.Generator]], List[Tuple[nn.Module, LayerChange]]]


@dataclass(frozen=True)
class Family:
    """The growth operators of one kind of network.

    Attributes:
        name: for messages and reports.
        matches: whether a model belongs to the family.
        widen, deepen: the steps for a ``Widen`` and a ``Deepen`` spec.
        default_inputs: inputs the preservation error is measured on when the caller gives
            none (None: no default, e.g. an unknown image size).
        finish: called on the grown model after every spec (e.g. to bring a Hugging Face
            config up to date with the new shapes); None for nothing.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    widen: Step
    deepen: Step
    default_inputs: Callable[[nn.Module], Optional[Tensor]]
    finish: Optional[Callable[[nn.Module], None]] = None


# The family modules, most specific first; the nn.Sequential family takes any model, so it is last.
_MODULES = ("hf_gpt2", "hf_llama", "tv_resnet", "resnet", "transformer", "sequential")


def families() -> Tuple[Family, ...]:
    """Every family, in the order :func:`family_of` tries them (imported here: the family modules
    import this one)."""
    return tuple(importlib.import_module(f".{name}", __package__).FAMILY for name in _MODULES)


def family_of(model: nn.Module) -> Family:
    """The first family of :func:`families` that takes ``model``."""
    return next(fam for fam in families() if fam.matches(model))
