"""A small model zoo: the three architecture families the engine and the growth operators handle.

* :func:`mlp`: an ``nn.Sequential`` of Linear (+ optional norm) + activation layers.
* :class:`ResNetCNN`: a ResNet-style CNN for small (e.g. 8x8 digit) images: a Conv-BN-ReLU stem,
  stages of residual :class:`BasicBlock` s, global average pooling and a Linear head.
* :class:`TinyTransformer`: a decoder-style (causal) transformer for sequence classification:
  token and position embeddings, pre-LN blocks (attention built from ``nn.Linear`` and
  ``F.scaled_dot_product_attention``, feed-forward), a final LayerNorm, mean pooling, Linear head.

All are built only from standard layers, so they run under ``torch.func.functional_call`` and
``vmap`` (``manifold_ext.engine``). ``manifold_ext.expand`` widens/deepens :func:`mlp` models
(they are ``nn.Sequential``), deepens :class:`ResNetCNN` stages (``Deepen("stages.0", init="zero")``)
widens their blocks' inner channels (``Widen("stages.0.0.conv1", ...)``) and a stage's residual width
(``Widen("stages.0", ...)``), and widens a
:class:`TinyTransformer`'s feed-forward width (``Widen("blocks.0.ff1", ...)``) and attention heads
(``Widen("blocks.0.qkv", size=heads, init="net2net"|"zero"|"random")``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mlp", "BasicBlock", "ResNetCNN", "TinyTransformer", "ACTIVATIONS", "NORMS"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}
NORMS = {"batch": nn.BatchNorm1d, "bn": nn.BatchNorm1d, "layer": nn.LayerNorm, "ln": nn.LayerNorm}


def mlp(widths: Sequence[int] = (64, 64, 10), act: Union[str, type] = "relu", norm: Optional[str] = None) -> nn.Sequential:
    """An MLP as an ``nn.Sequential``: ``widths[0]`` inputs, hidden layers ``widths[1:-1]``, ``widths[-1]`` outputs.

    Every hidden layer is ``Linear``, then the norm (``None``, ``"batch"``/``"bn"`` for
    BatchNorm1d, ``"layer"``/``"ln"`` for LayerNorm), then the activation (a name in
    :data:`ACTIVATIONS` or an ``nn.Module`` class). The output layer is a bare Linear.
    The default ``(64, 64, 10)`` suits flattened 8x8 digits.
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"mlp: widths must be at least two positive integers, got {tuple(widths)}")
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"mlp: act must be one of {sorted(ACTIVATIONS)} or an nn.Module class, got {act!r}")
        act = ACTIVATIONS[act]
    if norm is not None and norm not in NORMS:
        raise ValueError(f"mlp: norm must be None or one of {sorted(NORMS)}, got {norm!r}")
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if norm is not None:
                layers.append(NORMS[norm](b))
            layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    The shortcut is ``nn.Identity`` when the shape is kept (``stride == 1`` and
    ``in_channels == out_channels``), otherwise a 1x1 strided Conv2d + BatchNorm2d.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """A small ResNet: stem ``Conv2d(3x3)-BatchNorm2d-ReLU`` to ``widths[0]`` channels, then one
    stage per width (``stages.<i>``, an ``nn.Sequential`` of ``blocks[i]`` :class:`BasicBlock` s;
    every stage after the first halves the resolution in its first block), global average
    pooling and a ``Linear(widths[-1], classes)`` head. Input (N, in_channels, H, W), e.g. 8x8
    digits; output (N, classes) logits.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32), blocks: Sequence[int] = (1, 1),
                 classes: int = 10):
        super().__init__()
        widths, blocks = [int(w) for w in widths], [int(b) for b in blocks]
        if not widths or len(widths) != len(blocks) or min(widths) < 1 or min(blocks) < 1:
            raise ValueError(
                f"ResNetCNN: widths and blocks must be equally long sequences of positive integers, "
                f"got widths={tuple(widths)}, blocks={tuple(blocks)}"
            )
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.stages(self.stem(x)))
        return self.head(torch.flatten(h, 1))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``h + proj(attn(ln1(h)))``, then ``h + ff2(gelu(ff1(ln2(h))))``; causal attention.

    ``qkv`` outputs ``3 * heads * head_dim`` features (q, then k, then v; each head's ``head_dim``
    features contiguous) and ``proj`` reads ``heads * head_dim``; built with ``head_dim = width /
    heads``, but the forward only needs ``qkv.out_features / 3`` divisible by ``heads``, so
    ``manifold_ext.expand`` can add heads of the same ``head_dim`` (``Widen("blocks.0.qkv", ...)``).
    """

    def __init__(self, width: int, heads: int, ff_width: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, ff_width)
        self.ff2 = nn.Linear(ff_width, width)

    def forward(self, h: Tensor) -> Tensor:
        N, T, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        E = q.shape[-1]  # heads * head_dim: the residual width, unless heads were added (expand.transformer)
        split = lambda t: t.reshape(N, T, self.heads, E // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(N, T, E))
        return h + self.ff2(F.gelu(self.ff1(self.ln2(h))))


class TinyTransformer(nn.Module):
    """Sequence classifier: tokens (N, T) with ``T <= length`` and ids in ``[0, vocab)`` to (N, classes).

    Token + position embeddings (``tok``, ``pos``), ``depth`` pre-LN :class:`TransformerBlock` s
    (``blocks.<i>``; ``width`` must be divisible by ``heads``; feed-forward width ``ff_width``,
    default ``4 * width``), a final LayerNorm (``ln_f``), mean pooling over positions and a
    Linear head.
    """

    def __init__(self, vocab: int, length: int, width: int, heads: int, classes: int, depth: int = 1,
                 ff_width: Optional[int] = None):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"TinyTransformer: width={width} must be divisible by heads={heads}")
        if depth < 1:
            raise ValueError(f"TinyTransformer: depth must be >= 1, got {depth}")
        self.length = length
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, ff_width or 4 * width) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        if T > self.length:
            raise ValueError(f"TinyTransformer: sequence length {T} exceeds length={self.length}")
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(1))
