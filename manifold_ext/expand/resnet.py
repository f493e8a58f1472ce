"""Depth growth for ``manifold_ext.models.ResNetCNN``: insert residual BasicBlocks into a stage.

``Deepen(after="stages.<i>", count=k, init=...)`` appends ``k`` new ``BasicBlock(w, w)`` (stride 1,
identity shortcut, ``w`` the stage's width) at the end of stage ``i``; ``after`` may also be a glob
over the stage paths (``"stages.*"``). Initialisations:

* ``zero``: fresh 3x3 convolutions (``nn.Conv2d``'s default init), default BatchNorms, and the
  block's last BatchNorm weight (gamma) and bias zeroed. Its residual branch then outputs 0 (in
  eval *and* train mode), so the block computes ``relu(x + 0) = x`` because its input ``x`` is
  the previous block's ReLU output (``x >= 0``): exact (tests/test_models_expand.py checks it
  with random BatchNorm statistics).
* ``random``: fresh convolutions and default BatchNorms: not preserving.
* ``copy``: a copy of the stage's last block (progressive stacking), made stride 1 with an
  identity shortcut; that block's first convolution must keep the channel count: not preserving.
* ``identity``: refused (a residual block is preserved by ``zero``, not by an identity layer).

``noise > 0`` adds N(0, noise^2) to the new convolution weights; with ``zero`` the branch is
still multiplied by gamma = 0, so the block stays exact.

``Widen("stages.<i>.<j>.conv1", ...)`` (or a glob such as ``"*"``) widens a block's inner channels,
see ``widen_resnet``.

``Widen("stages.<i>", factor=... or size=..., init=...)`` (exact path only; globs do not select
it) widens the residual width of stage ``i``, see ``_widen_stage``: every channel on the stage's
residual path grows consistently. *Producers* (output channels): every block's ``conv2``/``bn2``,
the stage's shortcut ``Conv2d``/``BatchNorm2d`` (block 0, when it has one) and, when block 0's
shortcut is the identity (stage 0 with the stem as wide as the stage), the stem's Conv2d and
BatchNorm2d. *Consumers* (input channels): ``conv1`` of every later block of the stage (and of
block 0 when the stem is a producer), the next stage's first block's ``conv1`` and shortcut
Conv2d, or the ``head`` Linear after the last stage. Initialisations:

* ``net2net``: new channels copy existing ones, drawn without replacement in rounds (counts differ
  by at most one): producers' kernels and BatchNorm2d entries (affine parameters and running
  statistics) are copied, consumers' kernels / columns for every copy are divided by its source's
  count. Each copy equals its source through every residual addition and ReLU: exact.
* ``zero``: new producer kernels fresh (``nn.Conv2d``'s default init), the new BatchNorm2d entries
  (``bn2``, the shortcut BN, the stem BN) gamma 0, beta 0, mean 0, var 1, so every new channel
  is exactly 0 after each BatchNorm, hence after each addition ``0 + 0`` and ReLU; consumers' new
  columns are zero: exact. Noise (on the new kernels and consumer columns) keeps it exact, as the
  channels stay 0; to let them train, perturb the new gammas afterwards.
* ``random``: fresh producer kernels, default BatchNorm2d entries (1, 0, 0, 1), fresh consumer
  columns (fan-in of the widened input): not preserving.

"Exact" means equal up to float rounding: tests/test_expand_resnet_width.py checks 1e-5 in
float32, in train mode too for net2net (copies have identical batch statistics).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List, Optional

import torch
from torch import nn

from . import _layers as L
from ._claims import deepen_claim, stage_claim
from ._insert import refuse_identity
from ._units import widen_channel_set
from .conv import widen_conv
from .report import LayerChange
from .registry import Family
from .specs import Deepen


def stage_paths(model) -> List[str]:
    """The paths of the model's stages, ``stages.<i>``."""
    return [f"stages.{name}" for name in model.stages._modules]


def _new_block(stage_path: str, stage: nn.Sequential, spec: Deepen, generator):
    """A stride-1 BasicBlock as wide as the stage (fresh, or a copy of its last block), and that width."""
    from ..models import BasicBlock

    last_name, last = list(stage._modules.items())[-1]
    w = last.bn2.num_features
    like = last.conv2.weight
    if spec.init == "copy":
        if last.conv1.in_channels != last.conv1.out_channels:
            raise ValueError(
                f"Deepen.after={spec.after!r}: init='copy' copies module '{stage_path}.{last_name}' (BasicBlock), "
                f"whose first convolution changes the channels ({last.conv1.in_channels} -> {last.conv1.out_channels}); "
                "add a block to the stage first (init='zero' or 'random') or use another init"
            )
        block = copy.deepcopy(last)
        block.conv1.stride = (1, 1)
        block.shortcut = nn.Identity()
    else:
        block = BasicBlock(w, w).to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            for conv in (block.conv1, block.conv2):
                bound = L.fresh_bound(conv.weight[0].numel())
                conv.weight.copy_(L.uniform(conv.weight.shape, bound, conv.weight, generator))
            if spec.init == "zero":
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
        block.train(last.training)
    if spec.noise:
        with torch.no_grad():
            for conv in (block.conv1, block.conv2):
                conv.weight.add_(L.gaussian(conv.weight.shape, spec.noise, conv.weight, generator))
    return block, w


def deepen_resnet(model, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec to a ResNetCNN in place (it is already a copy); return LayerChanges
    (their ``path`` is the new block's path right after insertion; ``expand`` re-resolves it)."""
    refuse_identity(spec, "ResNetCNN", "a residual BasicBlock with zero last-BatchNorm gamma")
    hits = L.match_insertion_points(
        model, spec.after, stage_paths(model),
        not_one="a stage of ResNetCNN; blocks can only be appended to a stage",
        listing="stage of ResNetCNN; its stages are")
    # Noise on a zero block's convolutions stays multiplied by gamma = 0: the claim ignores it.
    exact, note = deepen_claim(spec.init, 0.0,
                               "zero: residual branch scaled by gamma = 0, relu(x + 0) = x on a ReLU output: exact")
    changes = []
    for p in hits:
        stage = model.stages._modules[p.split(".", 1)[1]]
        for t in range(spec.count):
            block, w = _new_block(p, stage, spec, generator)
            name = str(len(stage))
            stage.add_module(name, block)
            changes.append((block, LayerChange(
                op="deepen", path=f"{p}.{name}", kind="BasicBlock", init=spec.init, before=[], after=[w, w],
                exact=exact, note=note, detail={"after": p, "block": t, "params": L.n_params(block)},
            )))
    return changes


def widen_resnet(model, spec, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to a ResNetCNN in place: widen the block-internal channels
    (``conv1``'s outputs, ``bn1``, ``conv2``'s inputs) of each selected ``stages.<i>.<j>.conv1``.

    ``conv1 -> bn1 -> ReLU -> conv2`` is a conv -> BN -> ReLU -> conv chain, grown by
    ``conv.widen_conv``: ``net2net`` and ``zero`` are exact, ``random`` is not (see ``conv``).
    The block's output channels (its residual width) are unchanged. Returns ``(conv1,
    LayerChange)`` pairs.
    """
    if spec.target in stage_paths(model):
        return _widen_stage(model, spec, generator)
    cands = [(f"stages.{s}.{b}.conv1", "inner") for s, st in model.stages._modules.items() for b in st._modules]
    hits = L.select_widen_targets(model, spec, cands, "BasicBlock inner channels (or, by exact path, a stage's "
                                                      "residual width 'stages.<i>')")
    out = []
    for path, _ in hits:
        _, s, b, _ = path.split(".")
        blk = model.stages._modules[s]._modules[b]
        seq = nn.Sequential(OrderedDict(conv1=blk.conv1, bn1=blk.bn1, relu=nn.ReLU(), conv2=blk.conv2))
        m = spec.new_width(path, "Conv2d", blk.conv1.out_channels)
        change = widen_conv(seq, 0, m, spec.init, spec.noise, generator)
        change.path = path
        change.detail["consumer"] = path[: -len("conv1")] + "conv2"
        out.append((blk.conv1, change))
    return out


def _stage_channels(model, path: str, names: List[str], si: int):
    """The modules that write (convolutions), normalise (BatchNorm2d) and read (convolutions or
    the head Linear) the residual channels of stage ``si``; see the module docstring."""
    blocks = list(model.stages._modules[names[si]])
    producers, bns, consumers = [], [], []
    first = blocks[0]
    if isinstance(first.shortcut, nn.Identity):
        if si != 0:
            raise ValueError(f"Widen.target={path!r}: block 0 of a later stage has an identity shortcut; "
                             "its input width cannot be widened")
        producers.append(model.stem[0])
        bns.append(model.stem[1])
        consumers.append(first.conv1)
    else:
        producers.append(first.shortcut[0])
        bns.append(first.shortcut[1])
    for j, blk in enumerate(blocks):
        producers.append(blk.conv2)
        bns.append(blk.bn2)
        if j > 0:
            consumers.append(blk.conv1)
    if si + 1 < len(names):
        nxt = list(model.stages._modules[names[si + 1]])[0]
        consumers.append(nxt.conv1)
        if not isinstance(nxt.shortcut, nn.Identity):
            consumers.append(nxt.shortcut[0])
    else:
        consumers.append(model.head)
    return producers, bns, consumers


def _widen_stage(model, spec, generator: Optional[torch.Generator]) -> list:
    """Widen the residual width of stage ``spec.target`` (see the module docstring); returns one
    ``(stage, LayerChange)`` pair."""
    path = spec.target
    names = list(model.stages._modules)
    si = names.index(path.split(".", 1)[1])
    stage = model.stages._modules[names[si]]
    n = list(stage)[-1].bn2.num_features
    m = spec.new_width(path, "stage residual width", n)
    producers, bns, consumers = _stage_channels(model, path, names, si)
    copies, n_fresh = widen_channel_set(producers, bns, consumers, n, m, spec.init, spec.noise, generator)
    exact, note = stage_claim(spec.init, spec.noise, "residual channels")
    where = {id(mod): k for k, mod in model.named_modules()}
    return [(stage, LayerChange(
        op="widen", path=path, kind="Stage", init=spec.init, before=[n], after=[m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "fresh": int(n_fresh), "sources": [int(i) for i in copies],
                "producers": [where[id(x)] for x in producers], "batchnorms": [where[id(x)] for x in bns],
                "consumers": [where[id(x)] for x in consumers]},
    ))]


def _is_resnet(model: nn.Module) -> bool:
    """Whether ``model`` is a ``manifold_ext.models.ResNetCNN``."""
    from ..models import ResNetCNN

    return isinstance(model, ResNetCNN)


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """Standard-normal 8x8 images (what the ResNetCNN is built for), from a fixed seed."""
    return L.fixed_seed_normal((64, model.in_channels, 8, 8), model.stem[0].weight)


FAMILY = Family(name="manifold_ext.models.ResNetCNN", matches=_is_resnet, widen=widen_resnet,
                deepen=deepen_resnet, default_inputs=_default_inputs)
