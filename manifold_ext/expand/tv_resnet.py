"""Growth operators for torchvision ResNets (``torchvision.models.ResNet`` with ``BasicBlock`` or
``Bottleneck`` blocks: resnet18/34/50/101/152, wide_resnet, and small ones built with
``torchvision.models.resnet.ResNet(block, layers, ...)``). torchvision is never imported here
until a step needs it; ``matches`` tests the class by name and module.

Paths are the model's own: stages ``layer1`` .. ``layer4``, blocks ``layer<s>.<b>``.

``Widen("layer<s>.<b>.conv1", factor=... or size=..., init=...)`` (or a glob such as
``"layer1.*.conv1"`` or ``"*"``; for a Bottleneck also ``.conv2``) widens a block's inner channels:
``conv1 -> bn1 -> ReLU -> conv2`` (and for a Bottleneck ``conv2 -> bn2 -> ReLU -> conv3``) is a
conv -> BN -> ReLU -> conv chain, grown by ``conv.widen_conv`` (the block's output channels are
unchanged): ``net2net`` and ``zero`` exact, ``random`` not. Grouped convolutions (ResNeXt) are
refused (``widen_conv`` takes groups=1 only).

``Widen("layer<s>", ...)`` (exact path only; globs never select a stage) widens the stage's output
(residual) channels. *Producers* (output channels, each followed by a BatchNorm2d): every block's
last convolution (``conv2``/``bn2`` for a BasicBlock, ``conv3``/``bn3`` for a Bottleneck), block
0's ``downsample`` (Conv2d, BatchNorm2d) or, when block 0 has none (``layer1`` of resnet18/34),
the stem (``conv1``/``bn1``, then ReLU and max-pooling, channel by channel). *Consumers* (input
channels): ``conv1`` of every later block (and of block 0 when the stem is a producer), the next
stage's first ``conv1`` and its ``downsample`` convolution, or ``fc`` after the last stage. A later
stage whose block 0 has no downsample shares its input channels with the previous stage and is
refused. Initialisations, as for ``resnet._widen_stage``:

* ``net2net``: new channels copy existing ones (drawn without replacement in rounds); producers'
  kernels and BatchNorm2d entries (affine parameters and running statistics) are copied and
  every consumer's kernels/columns for a copy are divided by its source's count. Each copy equals
  its source through every residual addition and ReLU: exact.
* ``zero``: fresh producer kernels, new BatchNorm2d entries gamma 0, beta 0, mean 0, var 1, so
  each new channel is 0 after every BatchNorm and addition; consumers' new columns are zero: exact.
* ``random``: fresh producer kernels, default BatchNorm2d entries, fresh consumer columns: not
  preserving.

``Deepen(after="layer<s>", count=c, init=...)`` appends ``c`` blocks to the stage;
``after="layer<s>.<b>"`` inserts them right after block ``b`` (the later blocks are renumbered);
``after`` may be a glob (matched against the stages first, then the blocks). A new block has the
class of the block it follows, stride 1, no downsample, as many input as output channels (the
stage's output width), and, for a Bottleneck, that block's inner width, groups and dilation.

* ``zero``: fresh convolutions (``nn.Conv2d``'s default init), default BatchNorms, and the last
  BatchNorm (``bn2``, or ``bn3`` for a Bottleneck) with weight (gamma) 0 and bias 0: the residual
  branch adds 0, and the block computes ``relu(x) = x`` on ``x``, the previous block's ReLU output:
  exact (in train mode too).
* ``copy``: a copy of the block it follows (for ``after="layer<s>"`` the stage's last block),
  which must have no downsample: not preserving.
* ``random``: fresh convolutions and default BatchNorms: not preserving.
* ``identity``: refused (a residual block is preserved by ``zero``).

``noise > 0`` adds N(0, noise^2) to new weights (with a ``zero`` block, or ``zero`` stage
widening, the new parts stay multiplied by 0, so they stay exact).

Every LayerChange's ``detail["weights"]`` lists each module whose parameters changed (or that
was created) as ``{"path", "kind", "before", "after"}`` with the weight shapes as torch stores
them (``(out, in, kh, kw)`` for a Conv2d, ``(out, in)`` for a Linear, ``(C,)`` for a BatchNorm2d;
``before`` is ``[]`` for a new module); the paths are those of the final expanded model.

Default check inputs: 8 standard-normal 32x32 images (channels of ``conv1``) from a fixed seed.
"Exact" means equal up to float rounding: tests/test_expand_tv_resnet.py checks 1e-5 on the logits
in float32, with random BatchNorm weights, biases and running statistics. A deep model with large
logits (a full-size resnet50) can exceed 1e-5 in absolute terms: float32 rounding grows with the
size of the logits, so compare such models relative to it, or in float64.
"""

from __future__ import annotations

import copy
import fnmatch
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from torch import nn

from . import _layers as L
from ._claims import deepen_claim, stage_claim
from ._insert import refuse_identity
from ._units import widen_channel_set
from .conv import widen_conv
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen

# Per grown model: (module, record) pairs whose record["path"] ``_finish`` brings up to date after
# every spec (a later Deepen may renumber the blocks of a stage).
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _is_tv_resnet(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ResNet (by class name and module, without importing torchvision)."""
    t = type(model)
    return t.__name__ == "ResNet" and t.__module__.startswith("torchvision.")


def _block_kind(blk: nn.Module) -> str:
    """"BasicBlock" or "Bottleneck"; TypeError for any other block."""
    t = type(blk)
    if t.__module__.startswith("torchvision.") and t.__name__ in ("BasicBlock", "Bottleneck"):
        return t.__name__
    raise TypeError(f"expected a torchvision BasicBlock or Bottleneck, got {t.__module__}.{t.__name__}")


def _last(blk: nn.Module):
    """The block's last (conv, bn): the residual branch's output."""
    return (blk.conv3, blk.bn3) if _block_kind(blk) == "Bottleneck" else (blk.conv2, blk.bn2)


def _stages(model) -> "OrderedDict[str, nn.Sequential]":
    """The model's stages ``layer<s>`` by name."""
    return OrderedDict((n, m) for n, m in model.named_children()
                       if n.startswith("layer") and isinstance(m, nn.Sequential))


def _check_bn(path: str, mod) -> None:
    """TypeError unless ``mod`` is an ``nn.BatchNorm2d``."""
    if type(mod) is not nn.BatchNorm2d:
        raise TypeError(f"module {path!r} ({L.kind(mod)}) is not supported: the torchvision ResNet growth operators "
                        "need nn.BatchNorm2d normalisation layers")


def _shape(mod: nn.Module) -> List[int]:
    """The module's weight shape (a BatchNorm without affine parameters: its number of features)."""
    w = getattr(mod, "weight", None)
    if w is None:
        return [int(mod.running_mean.shape[0])]
    return [int(s) for s in w.shape]


def _record(model, recs: list, mod: nn.Module, before: List[int]) -> dict:
    """A weights record for ``mod`` (its shape now is ``after``), tracked for path updates."""
    where = {id(m): n for n, m in model.named_modules()}
    rec = {"path": where[id(mod)], "kind": L.kind(mod), "before": list(before), "after": _shape(mod)}
    _RECORDS.setdefault(model, []).append((mod, rec))
    recs.append(rec)
    return rec


def _records(model, mods: list, before: dict) -> list:
    """Weights records for ``mods`` (``before``: their shapes before the step, by id)."""
    recs: list = []
    for x in mods:
        _record(model, recs, x, before[id(x)])
    return recs


def _finish(model: nn.Module) -> None:
    """Bring every weights record's path up to date with the model's current paths."""
    where = {id(m): n for n, m in model.named_modules()}
    for mod, rec in _RECORDS.get(model, []):
        if id(mod) in where:
            rec["path"] = where[id(mod)]


# ----------------------------------------------------------------------------- widen


def _candidates(model) -> List[str]:
    """The widenable inner convolutions: every block's ``conv1``, and a Bottleneck's ``conv2``."""
    out = []
    for s, stage in _stages(model).items():
        for b, blk in stage._modules.items():
            out.append(f"{s}.{b}.conv1")
            if _block_kind(blk) == "Bottleneck":
                out.append(f"{s}.{b}.conv2")
    return out


WIDENABLE = ("block inner channels 'layer<s>.<b>.conv1' (and '.conv2' of a Bottleneck), or, by exact path, "
             "a stage's output width 'layer<s>'")


def widen_tv_resnet(model, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec in place (the model is already a copy); returns ``(module,
    LayerChange)`` pairs: per widened inner convolution, or one for a stage."""
    if spec.target in _stages(model):
        return _widen_stage(model, spec, generator)
    hits = L.select_widen_targets(model, spec, [(p, "inner") for p in _candidates(model)], WIDENABLE)
    mods = dict(model.named_modules())
    return [_widen_inner(model, mods, path, spec, generator) for path, _ in hits]


def _widen_inner(model, mods: dict, path: str, spec: Widen, generator):
    """Widen one inner convolution's output channels (``path``); returns ``(conv, LayerChange)``."""
    bpath, name = path.rsplit(".", 1)
    blk = mods[bpath]
    # conv1 -> bn1 -> ReLU -> conv2, or (Bottleneck) conv2 -> bn2 -> ReLU -> conv3
    idx, nxt = ("1", "conv2") if name == "conv1" else ("2", "conv3")
    a, bn, c = getattr(blk, name), getattr(blk, f"bn{idx}"), getattr(blk, nxt)
    _check_bn(f"{bpath}.bn{idx}", bn)
    before = {id(x): _shape(x) for x in (a, bn, c)}
    seq = nn.Sequential(OrderedDict([(name, a), (f"bn{idx}", bn), ("relu", nn.ReLU()), (nxt, c)]))
    m = spec.new_width(path, "Conv2d", a.out_channels)
    change = widen_conv(seq, 0, m, spec.init, spec.noise, generator)
    change.path = path
    change.detail["consumer"] = f"{bpath}.{nxt}"
    change.detail["block"] = _block_kind(blk)
    change.detail["weights"] = _records(model, [a, bn, c], before)
    return a, change


def _stage_channels(model, path: str, names: List[str], si: int):
    """The modules that write (convolutions), normalise (BatchNorm2d) and read (convolutions or
    ``fc``) the output channels of stage ``si``; see the module docstring."""
    stages = _stages(model)
    blocks = list(stages[path])
    producers, bns, consumers = [], [], []
    first = blocks[0]
    if first.downsample is None:
        if si != 0:
            raise ValueError(f"Widen.target={path!r}: the first block of {path!r} has no downsample, so the stage's "
                             f"input channels are {names[si - 1]!r}'s output; widen that stage instead")
        producers.append(model.conv1)
        bns.append(model.bn1)
        consumers.append(first.conv1)
    else:
        ds = first.downsample
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)):
            raise TypeError(f"module '{path}.0.downsample' ({L.kind(ds)}) is not supported: expected "
                            "nn.Sequential(Conv2d, BatchNorm2d)")
        producers.append(ds[0])
        bns.append(ds[1])
    for j, blk in enumerate(blocks):
        c, b = _last(blk)
        producers.append(c)
        bns.append(b)
        if j > 0:
            consumers.append(blk.conv1)
    if si + 1 < len(names):
        nxt = list(stages[names[si + 1]])[0]
        consumers.append(nxt.conv1)
        if nxt.downsample is not None:
            consumers.append(nxt.downsample[0])
    else:
        consumers.append(model.fc)
    return producers, bns, consumers


def _check_stage_channels(where: dict, path: str, n: int, producers, bns, consumers) -> None:
    """TypeError/ValueError unless every module on the stage's channels is supported and ``n`` wide."""
    for b in bns:
        _check_bn(where[id(b)], b)
        if b.num_features != n:
            raise ValueError(f"module {where[id(b)]!r} (BatchNorm2d) has num_features={b.num_features}, expected {n}")
    for c in producers + consumers:
        if isinstance(c, nn.Conv2d):
            L.check_conv(where[id(c)], c, "a stage-width producer or consumer")
    for c in producers:
        if c.out_channels != n:
            raise ValueError(f"module {where[id(c)]!r} (Conv2d) has out_channels={c.out_channels}, expected {n}")
    for c in consumers:
        got = c.in_features if isinstance(c, nn.Linear) else c.in_channels
        if got != n:
            raise ValueError(f"module {where[id(c)]!r} ({L.kind(c)}) has {got} inputs, expected {n}")


def _widen_stage(model, spec: Widen, generator) -> list:
    """Widen stage ``spec.target``'s output (residual) channels; returns one ``(stage, LayerChange)`` pair."""
    path = spec.target
    names = list(_stages(model))
    si = names.index(path)
    where = {id(x): k for k, x in model.named_modules()}
    last_bn = _last(list(_stages(model)[path])[-1])[1]
    _check_bn(where[id(last_bn)], last_bn)
    n = last_bn.num_features
    m = spec.new_width(path, "stage output width", n)
    producers, bns, consumers = _stage_channels(model, path, names, si)
    if si + 1 == len(names) and (not isinstance(model.fc, nn.Linear) or model.fc.in_features != n):
        raise TypeError(f"module 'fc' ({L.kind(model.fc)}) is not supported: expected an nn.Linear reading the "
                        f"{n} channels of {path!r}")
    _check_stage_channels(where, path, n, producers, bns, consumers)
    modules = producers + bns + consumers
    before = {id(x): _shape(x) for x in modules}
    copies, n_fresh = widen_channel_set(producers, bns, consumers, n, m, spec.init, spec.noise, generator)
    exact, note = stage_claim(spec.init, spec.noise, "output channels", "copied across the residual sums")
    return [(_stages(model)[path], LayerChange(
        op="widen", path=path, kind="Stage", init=spec.init, before=[n], after=[m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "fresh": int(n_fresh), "sources": [int(i) for i in copies],
                "producers": [where[id(x)] for x in producers], "batchnorms": [where[id(x)] for x in bns],
                "consumers": [where[id(x)] for x in consumers], "weights": _records(model, modules, before)},
    ))]


# ----------------------------------------------------------------------------- deepen


def _fresh_convs(block: nn.Module):
    """Every Conv2d of the block."""
    return [mod for mod in block.modules() if isinstance(mod, nn.Conv2d)]


def _new_block(where: str, src: nn.Module, spec: Deepen, generator) -> nn.Module:
    """A stride-1 block without downsample, as wide as ``src``'s output (``src`` is the block it follows)."""
    kind = _block_kind(src)
    for name in ("bn1", "bn2") + (("bn3",) if kind == "Bottleneck" else ()):
        _check_bn(f"{where}.{name}", getattr(src, name))
    if spec.init == "copy":
        if src.downsample is not None:
            raise ValueError(
                f"Deepen.after={spec.after!r}: init='copy' copies module {where!r} ({kind}), which has a downsample "
                f"(it changes the channels or the resolution); insert after a later block, add a block first "
                "(init='zero' or 'random'), or use another init")
        return copy.deepcopy(src)
    like = _last(src)[0].weight
    block = _empty_block(src).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for conv in _fresh_convs(block):
            bound = L.fresh_bound(conv.weight[0].numel())
            conv.weight.copy_(L.uniform(conv.weight.shape, bound, conv.weight, generator))
        if spec.init == "zero":
            _, last_bn = _last(block)
            last_bn.weight.zero_()
            last_bn.bias.zero_()
    block.train(src.training)
    return block


def _empty_block(src: nn.Module) -> nn.Module:
    """A freshly constructed block of ``src``'s class, as wide as its output, with its inner
    width, groups and dilation, and its BatchNorms' eps and momentum."""
    import torchvision.models.resnet as tvr

    w = _last(src)[1].num_features
    if _block_kind(src) == "BasicBlock":
        block = tvr.BasicBlock(w, w)
    else:
        inner, groups = src.conv2.out_channels, src.conv2.groups
        dil = src.conv2.dilation[0]
        # The constructor's widths follow planes, groups and base_width: build a tiny block and
        # set the exact layers (inner width, groups and dilation of ``src``, output w).
        block = tvr.Bottleneck(1, 1)
        block.conv1 = tvr.conv1x1(w, inner)
        block.bn1 = nn.BatchNorm2d(inner)
        block.conv2 = tvr.conv3x3(inner, inner, 1, groups, dil)
        block.bn2 = nn.BatchNorm2d(inner)
        block.conv3 = tvr.conv1x1(inner, w)
        block.bn3 = nn.BatchNorm2d(w)
    for bn in block.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps, bn.momentum = src.bn1.eps, src.bn1.momentum
    return block


def _insertion_points(model, after: str) -> list:
    """``(stage name, stage, block, path)`` for each place ``after`` names: a stage (its last
    block) or a block; exact paths first, then globs over the stages, then over the blocks."""
    stages = _stages(model)
    stage_paths = list(stages)
    block_paths = [f"{s}.{b}" for s, st in stages.items() for b in st._modules]
    hits = ([p for p in stage_paths + block_paths if p == after]
            or [p for p in stage_paths if fnmatch.fnmatchcase(p, after)]
            or [p for p in block_paths if fnmatch.fnmatchcase(p, after)])
    if not hits:
        L.match_insertion_points(
            model, after, stage_paths + block_paths,
            not_one="a stage 'layer<s>' or a block 'layer<s>.<b>' of the torchvision ResNet",
            listing="stage or block of the torchvision ResNet; they are")
    # Resolve every insertion point to (stage, block object) before any insertion renumbers.
    points = []
    for p in hits:
        if p in stages:
            points.append((p, stages[p], list(stages[p])[-1], p))
        else:
            s, b = p.split(".")
            points.append((s, stages[s], stages[s]._modules[b], p))
    return points


def _insert_into_stage(stage: nn.Sequential, new: nn.Module, at: int) -> None:
    """Insert ``new`` at position ``at`` of ``stage``, renumbering the blocks after it."""
    mods = list(stage)
    mods.insert(at, new)
    for k in list(stage._modules):
        del stage._modules[k]
    for i, x in enumerate(mods):
        stage.add_module(str(i), x)


def deepen_tv_resnet(model, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec in place; returns one ``(new block, LayerChange)`` pair per new block."""
    refuse_identity(spec, "a torchvision ResNet", "a residual block with zero last-BatchNorm gamma and beta")
    # Noise on a zero block's convolutions stays multiplied by gamma = 0: the claim ignores it.
    exact, note = deepen_claim(spec.init, 0.0, "zero: last BatchNorm gamma = beta = 0, the residual branch adds 0 "
                                               "and relu(x + 0) = x on a ReLU output: exact")
    changes = []
    for s, stage, blk, p in _insertion_points(model, spec.after):
        for t in range(spec.count):
            src_path = dict((id(x), k) for k, x in model.named_modules())[id(blk)]
            new = _new_block(src_path, blk, spec, generator)
            if spec.noise:
                with torch.no_grad():
                    for conv in _fresh_convs(new):
                        conv.weight.add_(L.gaussian(conv.weight.shape, spec.noise, conv.weight, generator))
            at = next(i for i, x in enumerate(stage) if x is blk) + 1 + t
            _insert_into_stage(stage, new, at)
            w = _last(new)[1].num_features
            recs: list = []
            for mod in new.modules():
                if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                    _record(model, recs, mod, [])
            changes.append((new, LayerChange(
                op="deepen", path=f"{s}.{at}", kind=_block_kind(blk), init=spec.init, before=[], after=[w, w],
                exact=exact, note=note,
                detail={"after": p, "block": t, "params": L.n_params(new), "weights": recs},
            )))
    return changes


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """8 standard-normal 32x32 images (channels of ``conv1``), from a fixed seed."""
    return L.fixed_seed_normal((8, model.conv1.in_channels, 32, 32), model.conv1.weight)


FAMILY = Family(name="torchvision ResNet", matches=_is_tv_resnet, widen=widen_tv_resnet, deepen=deepen_tv_resnet,
                default_inputs=_default_inputs, finish=_finish)
