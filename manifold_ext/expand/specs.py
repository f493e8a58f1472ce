"""Growth specifications: what to grow, by how much, and how to initialise the new weights.

Specs are validated when they are built, so a bad argument fails where it is written rather than
halfway through an expansion.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

WIDTH_INITS = ("net2net", "zero", "random")
DEPTH_INITS = ("identity", "zero", "random", "copy")


def _is_number(value, kind) -> bool:
    """Whether ``value`` is a ``kind`` (``numbers.Real`` or ``numbers.Integral``) and not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_noise(cls: str, noise) -> None:
    """ValueError unless ``noise`` is a real number >= 0."""
    if not _is_number(noise, numbers.Real) or not noise >= 0:
        raise ValueError(f"{cls}: noise must be a real number >= 0 (the std of the Gaussian noise), got {noise!r}")


def _check_init(spec: str, init, inits: tuple) -> None:
    """ValueError unless ``init`` is one of ``inits`` (``spec`` names the spec in the message)."""
    if init not in inits:
        raise ValueError(f"{spec}: init must be one of {inits}, got {init!r}")


def _check_path(cls: str, arg: str, value) -> None:
    """TypeError unless ``value`` is a non-empty str."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{cls}: {arg} must be a non-empty module path or glob pattern (str), got {value!r}")


@dataclass(frozen=True)
class Widen:
    """Widen the hidden layer after each selected ``nn.Linear``, or the channels of an ``nn.Conv2d``;
    in the other families (:mod:`manifold_ext.expand.registry`), the module the family widens at
    that path: a ``TinyTransformer`` block's feed-forward width, heads or residual width, a
    ``ResNetCNN`` or torchvision ResNet's block or stage channels, a Hugging Face GPT-2's or
    LLaMA's feed-forward width (``"transformer.h.*.mlp"``, ``"model.layers.*.mlp"``), heads
    (``"...attn"``, ``"...self_attn"``) or residual width (``"transformer.wte"``,
    ``"model.embed_tokens"``); each family module's docstring lists its paths and operators.

    For an ``nn.Sequential``, ``target`` is a child name (``"0"``) or an ``fnmatch`` glob (``"*"``).
    An exact path must name a hidden Linear (one followed by another Linear) or a Conv2d read by a
    later Conv2d or (through an ``nn.Flatten``) Linear, see ``conv``; a glob silently skips
    modules that are neither, so ``"*"`` means "every hidden layer and channel set".
    Give exactly one of ``factor`` (new width ``round(width * factor)``, ``factor >= 1``) or
    ``size`` (the new width, ``>=`` the current one).
    ``init``: ``"net2net"`` or ``"zero"`` (function-preserving, see ``width.widen``) or
    ``"random"`` (not preserving). ``noise``: std of Gaussian noise added to the new weights
    (symmetry breaking); with ``noise > 0`` preservation is not claimed.
    """

    target: str
    factor: Optional[float] = None
    size: Optional[int] = None
    init: str = "net2net"
    noise: float = 0.0

    def __post_init__(self):
        """Validate the fields (TypeError/ValueError), so a bad spec fails where it is written."""
        _check_path("Widen", "target", self.target)
        if (self.factor is None) == (self.size is None):
            raise ValueError(
                f"Widen({self.target!r}): give exactly one of factor or size, got factor={self.factor!r}, size={self.size!r}"
            )
        if self.factor is not None:
            f = self.factor
            if not _is_number(f, numbers.Real) or not f >= 1:
                raise ValueError(f"Widen({self.target!r}): factor must be a real number >= 1, got {f!r}")
        if self.size is not None:
            s = self.size
            if not _is_number(s, numbers.Integral) or s < 1:
                raise ValueError(f"Widen({self.target!r}): size must be a positive integer, got {s!r}")
        _check_init(f"Widen({self.target!r})", self.init, WIDTH_INITS)
        _check_noise("Widen", self.noise)

    def new_width(self, path: str, kind: str, width: int) -> int:
        """The width this spec asks for, given the current one; ValueError if it would shrink."""
        if self.size is not None:
            if self.size < width:
                raise ValueError(
                    f"Widen: module {path!r} ({kind}) has width {width}; size must be >= {width}, got {self.size}"
                )
            return int(self.size)
        return int(round(width * float(self.factor)))


@dataclass(frozen=True)
class Deepen:
    """Insert ``count`` new blocks after the selected module(s) of an ``nn.Sequential``.

    A block is ``nn.Linear(w, w)`` followed by a copy of the activation that follows the nearest
    Linear at or before ``after`` (none if that Linear has no activation after it); ``w`` is that
    Linear's output width. ``init``: ``"identity"`` (preserving for ReLU networks, see
    ``depth.deepen``), ``"random"`` (fresh ``nn.Linear`` init) or ``"copy"`` (a copy of that
    Linear, which must be square). ``"zero"`` (a residual block with a zero output projection) is
    accepted here for models with residual blocks; ``expand`` refuses it on a plain
    ``nn.Sequential``, which has no residual path for a zero block to sit on. On a
    ``manifold_ext.models.ResNetCNN``, ``after`` names a stage (``"stages.0"``, or a glob) and
    ``init`` is ``"zero"`` (preserving), ``"random"`` or ``"copy"``, see ``resnet``.
    On a ``manifold_ext.models.TinyTransformer``, ``after`` names a block (``"blocks.0"``, or a glob)
    and new pre-LN blocks go right after it; ``init`` is ``"zero"`` (preserving), ``"random"`` or
    ``"copy"``, see ``transformer.deepen_transformer``. On a Hugging Face GPT-2 or LLaMA, ``after``
    names a block (``"transformer.h.1"``, ``"model.layers.1"``); on a torchvision ResNet, a stage
    (``"layer2"``); ``init`` as for the TinyTransformer (see ``hf_gpt2``, ``hf_llama``,
    ``tv_resnet``).
    """

    after: str
    count: int = 1
    init: str = "identity"
    noise: float = 0.0

    def __post_init__(self):
        """Validate the fields (TypeError/ValueError), so a bad spec fails where it is written."""
        _check_path("Deepen", "after", self.after)
        c = self.count
        if not _is_number(c, numbers.Integral) or c < 1:
            raise ValueError(f"Deepen({self.after!r}): count must be an integer >= 1, got {c!r}")
        _check_init(f"Deepen({self.after!r})", self.init, DEPTH_INITS)
        _check_noise("Deepen", self.noise)
