"""Model expansion: width and depth growth operators, function-preserving and not.

``expand(model, Widen("*", factor=2), Deepen("1"))`` returns a grown copy of an ``nn.Sequential``
MLP (Linear, BatchNorm1d, LayerNorm, Dropout, elementwise activations) and an ``ExpansionReport``.
``Widen`` also grows the channels of ``nn.Conv2d`` layers of a convolutional ``nn.Sequential``
(BatchNorm2d, pooling, Dropout2d, Flatten + Linear head). ``Deepen("stages.<i>", init="zero")``
appends residual BasicBlocks to a stage of ``manifold_ext.models.ResNetCNN`` and
``Widen("stages.<i>.<j>.conv1")`` widens a block's inner channels (see ``resnet``).
On ``manifold_ext.models.TinyTransformer``, ``Widen("blocks.<i>.ff1")`` grows the feed-forward
width, ``Widen("blocks.<i>.qkv", size=heads, init="zero")`` adds attention heads and
``Deepen("blocks.<i>", init="zero")`` inserts function-preserving blocks (see ``transformer``).
See ``width``, ``conv``, ``depth`` and ``resnet`` for what each initialisation preserves.
"""

from .core import expand, preservation_error
from .report import ExpansionReport, LayerChange
from .specs import DEPTH_INITS, WIDTH_INITS, Deepen, Widen

__all__ = [
    "expand",
    "preservation_error",
    "Widen",
    "Deepen",
    "ExpansionReport",
    "LayerChange",
    "WIDTH_INITS",
    "DEPTH_INITS",
]
