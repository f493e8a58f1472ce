"""Depth growth for ``manifold_ext.models.ResNetCNN``: insert residual BasicBlocks into a stage.

``Deepen(after="stages.<i>", count=k, init=...)`` appends ``k`` new ``BasicBlock(w, w)`` (stride 1,
identity shortcut, ``w`` the stage's width) at the end of stage ``i``; ``after`` may also be a glob
over the stage paths (``"stages.*"``). Initialisations:

* ``zero``: fresh 3x3 convolutions (``nn.Conv2d``'s default init), default BatchNorms, and the
  block's last BatchNorm weight (gamma) and bias zeroed. Its residual branch then outputs 0 (in
  eval *and* train mode), so the block computes ``relu(x + 0) = x`` because its input ``x`` is
  the previous block's ReLU output (``x >= 0``): exact. Measured max error: 0 (float32, eval,
  random BatchNorm statistics; see tests/test_models_expand.py).
* ``random``: fresh convolutions and default BatchNorms: not preserving.
* ``copy``: a copy of the stage's last block (progressive stacking), made stride 1 with an
  identity shortcut; that block's first convolution must keep the channel count: not preserving.
* ``identity``: refused (a residual block is preserved by ``zero``, not by an identity layer).

``noise > 0`` adds N(0, noise^2) to the new convolution weights; with ``zero`` the branch is
still multiplied by gamma = 0, so the block stays exact.

``Widen("stages.<i>.<j>.conv1", ...)`` (or a glob such as ``"*"``) widens a block's inner channels,
see ``widen_resnet``; the stem, the shortcuts and the stage widths cannot be widened.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import List, Optional

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .specs import Deepen


def stage_paths(model) -> List[str]:
    return [f"stages.{name}" for name in model.stages._modules]


def _new_block(stage_path: str, stage: nn.Sequential, spec: Deepen, generator):
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
    if spec.init == "identity":
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='identity' inserts a plain layer, which ResNetCNN does not take; "
            "use init='zero' (a residual BasicBlock with zero last-BatchNorm gamma: function-preserving), "
            "'random' or 'copy'"
        )
    paths = stage_paths(model)
    hits = [p for p in paths if p == spec.after] or [p for p in paths if fnmatch.fnmatchcase(p, spec.after)]
    if not hits:
        mods = dict(model.named_modules())
        if spec.after in mods:
            m = mods[spec.after]
            raise TypeError(
                f"Deepen.after={spec.after!r}: module {spec.after!r} ({L.kind(m)}) is not a stage of ResNetCNN; "
                f"blocks can only be appended to a stage: {paths}"
            )
        raise ValueError(f"Deepen.after={spec.after!r} matches no stage of ResNetCNN; its stages are {paths}")
    changes = []
    for p in hits:
        stage = model.stages._modules[p.split(".", 1)[1]]
        for t in range(spec.count):
            block, w = _new_block(p, stage, spec, generator)
            name = str(len(stage))
            stage.add_module(name, block)
            if spec.init == "zero":
                exact, note = True, "zero: residual branch scaled by gamma = 0, relu(x + 0) = x on a ReLU output: exact"
            else:
                exact, note = False, f"{spec.init} block: not preserving"
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
    The block's output channels (its residual width) are unchanged. Measured max error (float32,
    eval, random BatchNorm statistics, 40 models, every block, factor 1.5): net2net 1.8e-7, zero 0. Returns ``(conv1, LayerChange)`` pairs.
    """
    from collections import OrderedDict

    from .conv import widen_conv
    from .transformer import select

    cands = [(f"stages.{s}.{b}.conv1", "inner") for s, st in model.stages._modules.items() for b in st._modules]
    hits = select(model, spec, cands, "BasicBlock inner channels")
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
