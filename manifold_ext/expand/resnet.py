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

Measured max |expanded - base| (float32, eval, random BatchNorm statistics, 20 seeds x 3
architectures ((8, 16) x 2 blocks, (4, 8, 8) x (1, 2, 1), (6,) x 3 blocks), every stage, factors 2
and 1.5 and size width + 1, 32 8x8 images): net2net 2.4e-7, zero 1.2e-7; tests/test_expand_resnet_width.py
checks 1e-5 (train mode too for net2net: copies have identical batch statistics).
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .registry import Family
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
    hits = L.match_insertion_points(
        model, spec.after, stage_paths(model),
        not_one="a stage of ResNetCNN; blocks can only be appended to a stage",
        listing="stage of ResNetCNN; its stages are")
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

    if spec.target in stage_paths(model):
        return _widen_stage(model, spec, generator)
    cands = [(f"stages.{s}.{b}.conv1", "inner") for s, st in model.stages._modules.items() for b in st._modules]
    hits = select(model, spec, cands, "BasicBlock inner channels (or, by exact path, a stage's residual width "
                                      "'stages.<i>')")
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


def grow_channels(producers, bns, consumers, src: torch.Tensor, counts: torch.Tensor, n: int, m: int,
                  n_fresh: int, init: str, noise: float, generator) -> None:
    """Grow a set of channels from ``n`` to ``m`` everywhere at once, in place: the output
    channels of ``producers`` (convolutions whose outputs are summed, e.g. along a residual
    path), ``bns`` (BatchNorm2d over them) and the inputs of ``consumers`` (Conv2d or Linear).
    Channel ``i < len(src)`` copies channel ``src[i]``; the ``n_fresh`` others are fresh. A
    consumer's weights for the copies of a channel are divided by its copy count (``counts``), so
    net2net copies sum to the original; fresh inputs are zero unless ``init`` is "random"."""
    zero = init == "zero"
    with torch.no_grad():
        for conv in producers:
            w = conv.weight.detach()
            sidx = src.to(w.device)
            fresh = L.uniform((n_fresh,) + tuple(w.shape[1:]), L.fresh_bound(w[0].numel()), w, generator)
            new_w = torch.cat([w[sidx], fresh])
            if noise:
                new_w[n:] += L.gaussian(new_w[n:].shape, noise, w, generator)
            new_b = None
            if conv.bias is not None:
                new_b = torch.cat([conv.bias.detach()[sidx], conv.bias.new_zeros(n_fresh)])
            L.resize_conv(conv, new_w, new_b)
        for bn in bns:
            sidx = src.to(bn.running_mean.device)
            fills = (("weight", 0.0 if zero else 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
            for name, fill in fills:
                old = getattr(bn, name)
                if old is None:
                    continue
                new = old.detach().new_full((m,), fill)
                new[: len(src)] = old.detach()[sidx]
                L.replace_param(bn, name, new)
            bn.num_features = m
        for c in consumers:
            w = c.weight.detach()
            sidx = src.to(w.device)
            scale = counts.to(w.device, w.dtype)[sidx].view(1, -1, *([1] * (w.dim() - 2)))
            extra = (w.shape[0], n_fresh) + tuple(w.shape[2:])
            if init == "random":
                fresh = L.uniform(extra, L.fresh_bound(m * w[0, 0].numel()), w, generator)
            else:
                fresh = w.new_zeros(extra)
            new_w = torch.cat([w[:, sidx] / scale, fresh], 1)
            if noise:
                new_w[:, n:] += L.gaussian(new_w[:, n:].shape, noise, w, generator)
            if isinstance(c, nn.Linear):
                L.resize_linear(c, new_w, c.bias)
            else:
                L.resize_conv(c, new_w, c.bias)



def _widen_stage(model, spec, generator: Optional[torch.Generator]) -> list:
    """Widen the residual width of stage ``spec.target`` (see the module docstring); returns one
    ``(stage, LayerChange)`` pair."""
    from .width import _plan

    path = spec.target
    names = list(model.stages._modules)
    si = names.index(path.split(".", 1)[1])
    stage = model.stages._modules[names[si]]
    blocks = list(stage)
    n = blocks[-1].bn2.num_features
    m = spec.new_width(path, "stage residual width", n)
    init = spec.init
    copies, _, n_fresh = _plan(n, m, init, False, generator)
    src = torch.cat([torch.arange(n), copies])
    counts = torch.bincount(src, minlength=n)
    noise = spec.noise

    producers, bns, consumers = [], [], []  # convs (output channels), BatchNorm2d, convs/Linear (inputs)
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

    grow_channels(producers, bns, consumers, src, counts, n, m, n_fresh, init, noise, generator)

    if init == "random":
        exact, note = False, "random new residual channels: not preserving"
    elif init == "net2net":
        exact, note = True, "net2net: residual channels copied (BatchNorm2d copied, consumers divided by the copy count): exact"
        if noise:
            exact, note = False, note + f"; noise std {noise}: not preserving"
    else:
        exact, note = True, "zero: new residual channels are 0 after every BatchNorm (gamma = beta = 0), zero consumer columns: exact"
        if noise:
            note += f"; noise std {noise} on new kernels and consumer columns (channels stay 0): exact"
    where = {id(mod): k for k, mod in model.named_modules()}
    return [(stage, LayerChange(
        op="widen", path=path, kind="Stage", init=init, before=[n], after=[m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "fresh": int(n_fresh), "sources": [int(i) for i in copies],
                "producers": [where[id(x)] for x in producers], "batchnorms": [where[id(x)] for x in bns],
                "consumers": [where[id(x)] for x in consumers]},
    ))]


def _is_resnet(model: nn.Module) -> bool:
    from ..models import ResNetCNN

    return isinstance(model, ResNetCNN)


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """Standard-normal 8x8 images (what the ResNetCNN is built for), from a fixed seed."""
    w = model.stem[0].weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, model.in_channels, 8, 8, generator=g)
    return x.to(device=w.device, dtype=w.dtype)


FAMILY = Family(name="manifold_ext.models.ResNetCNN", matches=_is_resnet, widen=widen_resnet,
                deepen=deepen_resnet, default_inputs=_default_inputs)
