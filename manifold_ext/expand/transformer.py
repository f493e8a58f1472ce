"""Width growth for ``manifold_ext.models.TinyTransformer``: feed-forward units and attention heads.

Targets are module paths of the model (or ``fnmatch`` globs over them, ``"*"`` included):

* ``"blocks.<i>.ff1"``: the feed-forward width (``ff1``'s outputs, ``ff2``'s inputs), ``factor``
  or ``size`` counted in units. This is the hidden layer ``ff1 -> GELU -> ff2`` and is grown by
  ``width.widen`` (the same code as for an MLP): ``net2net`` (new units copy existing ones, their
  ``ff2`` columns split among the copies; exact for GELU, as for any elementwise activation),
  ``zero`` (fresh ``ff1`` rows, zero ``ff2`` columns: exact), ``random`` (fresh both: not
  preserving).
* ``"blocks.<i>.qkv"``: the number of attention heads, ``factor`` or ``size`` counted in *heads*;
  the head dimension is kept, so ``qkv`` grows by ``3 * head_dim`` outputs and ``proj`` by
  ``head_dim`` inputs per new head (the block's residual width is unchanged). New heads get fresh
  q, k and v rows (``nn.Linear``'s default init for ``qkv``, fan-in = the residual width), appended
  after the existing heads within each of the q, k and v blocks. ``zero``: ``proj``'s columns for
  the new heads are zero, so they add nothing: exact (existing heads are computed as before, since
  attention is per head and the scale ``1/sqrt(head_dim)`` is unchanged). ``random``: fresh ``proj``
  columns (fan-in = the new ``proj`` width): not preserving. ``net2net`` is refused for heads.

Measured max errors (float32, eval, 40 random 2-block models with random LayerNorm parameters,
all blocks at once, 32 full-length token sequences each): ff net2net (factors 1.5 and 2) 2.4e-7,
ff zero 0, heads zero 0; tests/test_expand_transformer.py checks 1e-5. ``noise > 0`` adds N(0, noise^2) to the new
weights and makes the change non-preserving. Embedding width (``tok``/``pos``/LayerNorm/residual)
widening is not supported.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .specs import Widen
from .width import widen


def _candidates(model):
    out = []
    for name in model.blocks._modules:
        out += [(f"blocks.{name}.ff1", "ff"), (f"blocks.{name}.qkv", "heads")]
    return out


def select(model, spec: Widen, cands, what: str):
    """The candidate paths ``spec.target`` names (exactly, else as a glob); clear errors otherwise."""
    paths = [p for p, _ in cands]
    hits = [c for c in cands if c[0] == spec.target] or [c for c in cands if fnmatch.fnmatchcase(c[0], spec.target)]
    if hits:
        return hits
    mods = dict(model.named_modules())
    if spec.target in mods:
        m = mods[spec.target]
        raise TypeError(
            f"Widen.target={spec.target!r}: module {spec.target!r} ({L.kind(m)}) cannot be widened on "
            f"{type(model).__name__}; widenable: {what}: {paths}"
        )
    raise ValueError(
        f"Widen.target={spec.target!r} matches no widenable module of {type(model).__name__}; widenable: {what}: {paths}"
    )


def widen_transformer(model, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to a TinyTransformer in place (it is already a copy); return
    ``(module, LayerChange)`` pairs (the module is ``ff1`` or ``qkv``)."""
    hits = select(model, spec, _candidates(model), "blocks.<i>.ff1 (feed-forward units), blocks.<i>.qkv (attention heads)")
    if spec.init == "net2net" and any(k == "heads" for _, k in hits):
        p = next(p for p, k in hits if k == "heads")
        raise ValueError(
            f"Widen.target={spec.target!r}: init='net2net' is not supported for attention heads ({p!r}); "
            "use init='zero' (new heads with zero output-projection columns: function-preserving) or 'random'; "
            "to widen only the feed-forward layers with net2net, target 'blocks.*.ff1'"
        )
    out = []
    for path, what in hits:
        blk = model.blocks._modules[path.split(".")[1]]
        if what == "ff":
            seq = nn.Sequential(OrderedDict(ff1=blk.ff1, act=nn.GELU(), ff2=blk.ff2))
            m = spec.new_width(path, "Linear", blk.ff1.out_features)
            change = widen(seq, 0, m, spec.init, spec.noise, generator)
            change.path = path
            change.detail["consumer"] = path[: -len("ff1")] + "ff2"
            out.append((blk.ff1, change))
        else:
            out.append((blk.qkv, _add_heads(path, blk, spec, generator)))
    return out


def _add_heads(path: str, blk, spec: Widen, generator) -> LayerChange:
    qkv, proj = blk.qkv, blk.proj
    n = blk.heads
    E = qkv.out_features // 3
    hd = E // n
    m = spec.new_width(path, "attention heads", n)
    D = qkv.in_features
    extra = (m - n) * hd
    w = qkv.weight.detach()
    bound = L.fresh_bound(D)
    rows, biases = [], []
    for t in range(3):  # q, k, v: old heads, then the new ones
        new_rows = L.uniform((extra, D), bound, w, generator)
        if spec.noise:
            new_rows += L.gaussian(new_rows.shape, spec.noise, w, generator)
        rows += [w[t * E : (t + 1) * E], new_rows]
        if qkv.bias is not None:
            biases += [qkv.bias.detach()[t * E : (t + 1) * E], L.uniform((extra,), bound, qkv.bias, generator)]
    L.resize_linear(qkv, torch.cat(rows), torch.cat(biases) if biases else None)

    wp = proj.weight.detach()
    if spec.init == "random":
        cols = L.uniform((wp.shape[0], extra), L.fresh_bound(m * hd), wp, generator)
    else:
        cols = wp.new_zeros(wp.shape[0], extra)
    if spec.noise:
        cols = cols + L.gaussian(cols.shape, spec.noise, wp, generator)
    L.resize_linear(proj, torch.cat([wp, cols], 1), proj.bias)
    blk.heads = m

    if spec.init == "random":
        exact, note = False, "random new heads (fresh output-projection columns): not preserving"
    else:
        exact, note = True, "zero: new heads' output-projection columns are zero: exact"
    if spec.noise:
        exact, note = False, note + f"; noise std {spec.noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Attention", init=spec.init,
        before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"heads_before": n, "heads_after": m, "head_dim": hd, "fresh": m - n,
                "qkv_out": [3 * E, 3 * m * hd], "proj_in": [E, m * hd]},
    )
