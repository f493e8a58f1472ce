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
weights and makes the change non-preserving.

* ``"tok"`` (exact path only; globs such as ``"*"`` do not select it): the embedding, i.e. residual,
  width ``D``, grown to ``k * D`` for an *integer* factor ``k`` (``factor=k``, or ``size`` a multiple
  of ``D``; anything else is a ValueError for now), ``init="net2net"`` only. Every residual unit
  ``u`` is duplicated: new unit ``j`` copies unit ``j mod D`` (the D existing units keep their
  indices; copies follow in order), consistently everywhere the residual stream is read or written:

  - writers get their *output* units copied: ``tok.weight`` and ``pos.weight`` columns, the rows
    (and bias entries) of every block's ``proj`` and ``ff2``; so the residual stream is ``h[g]``;
  - every LayerNorm (``ln1``, ``ln2`` of each block, ``ln_f``) gets gain and bias copied: the mean
    and (biased) variance over ``k`` copies of each unit equal those over the originals, so
    ``LN'(h[g]) = LN(h)[g]``: exact (``eps`` unchanged);
  - readers get their *input* columns copied and divided by ``k``: ``qkv`` and ``ff1`` of every
    block and the classifier ``head`` (``sum_j W[:, g(j)] x[g(j)] / k = W x``); their outputs, the
    attention width, heads and head_dim, the feed-forward width and the biases are unchanged.

  Exact up to float rounding; measured max error 3.0e-7 (float32, eval, 40 random 2-block width-16
  models with random LayerNorm parameters, factors 2 and 3, 32 full-length sequences each) and
  8.9e-7 (200 random 2-block models of residual width 4 and 8, factors 2 to 4);
  tests/test_expand_transformer_depth.py checks 1e-5. Approximate for a degenerate residual
  width of 2: a LayerNorm over 2 units outputs +-1 scaled and amplifies rounding (the reordered
  sums), measured up to 2.7e-5 against a base float32-vs-float64 error of 1.4e-6; use float64 there. ``noise > 0`` adds N(0, noise^2) to the
  copies (new ``tok``/``pos`` columns, new ``proj``/``ff2`` rows, new ``qkv``/``ff1``/``head``
  columns): not preserving.

``Deepen(after="blocks.<i>", count=k, init="zero"|"random"|"copy")`` inserts pre-LN blocks after
block ``i``, see ``deepen_transformer``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .specs import Deepen, Widen
from .width import widen


EMBEDDING = "tok"
WIDENABLE = ("blocks.<i>.ff1 (feed-forward units), blocks.<i>.qkv (attention heads), "
             "and by exact path only: 'tok' (the embedding/residual width, net2net, integer factor)")


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
    if spec.target == EMBEDDING:
        return [(model.tok, _widen_embedding(model, spec, generator))]
    hits = select(model, spec, _candidates(model), WIDENABLE)
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


# --- depth ---------------------------------------------------------------------------------------

def block_paths(model) -> list:
    return [f"blocks.{name}" for name in model.blocks._modules]


def _fresh_block(prev, spec, generator):
    """A new TransformerBlock shaped like ``prev`` (residual width, heads, head_dim, ff width)."""
    if spec.init == "copy":
        block = copy.deepcopy(prev)
    else:
        block = copy.deepcopy(prev)  # same shapes (added heads included), then fresh values
        with torch.no_grad():
            for lin in (block.qkv, block.proj, block.ff1, block.ff2):
                bound = L.fresh_bound(lin.in_features)
                lin.weight.copy_(L.uniform(lin.weight.shape, bound, lin.weight, generator))
                if lin.bias is not None:
                    lin.bias.copy_(L.uniform(lin.bias.shape, bound, lin.bias, generator))
            for ln in (block.ln1, block.ln2):
                if ln.weight is not None:
                    ln.weight.fill_(1.0)
                if ln.bias is not None:
                    ln.bias.zero_()
            if spec.init == "zero":
                for lin in (block.proj, block.ff2):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
    if spec.noise:
        with torch.no_grad():
            for lin in (block.qkv, block.proj, block.ff1, block.ff2):
                lin.weight.add_(L.gaussian(lin.weight.shape, spec.noise, lin.weight, generator))
    block.train(prev.training)
    return block


def deepen_transformer(model, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec to a TinyTransformer in place (it is already a copy): insert
    ``spec.count`` pre-LN TransformerBlocks right after each selected ``blocks.<i>`` (an exact
    path or a glob over the block paths). Later blocks are renumbered (``nn.ModuleList``).

    * ``zero``: fresh block (``nn.Linear`` default init, LayerNorms at gain 1 / bias 0) whose
      attention output projection ``proj`` and second feed-forward layer ``ff2`` (weights and
      biases) are zero: both residual branches add exactly 0, so the block is the identity:
      exact (measured max error 0, float32, eval).
    * ``random``: fresh block: not preserving.
    * ``copy``: a copy of the block at ``after`` (progressive stacking): not preserving.
    * ``identity``: refused (a residual block is preserved by ``zero``).

    ``noise > 0`` adds N(0, noise^2) to all four weight matrices of every new block (the zeroed
    ``proj``/``ff2`` included, so ``zero`` with noise is *not* preserving and is reported so).
    Returns ``(block, LayerChange)`` pairs; the change's ``after`` is ``[residual width, heads]``
    and ``detail`` holds the block's parameter count, ``ff_width``, ``head_dim`` and the index.
    """
    if spec.init == "identity":
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='identity' inserts a plain layer, which TinyTransformer does not take; "
            "use init='zero' (a pre-LN block with zero proj and ff2: function-preserving), 'random' or 'copy'"
        )
    paths = block_paths(model)
    hits = [p for p in paths if p == spec.after] or [p for p in paths if fnmatch.fnmatchcase(p, spec.after)]
    if not hits:
        mods = dict(model.named_modules())
        if spec.after in mods:
            m = mods[spec.after]
            raise TypeError(
                f"Deepen.after={spec.after!r}: module {spec.after!r} ({L.kind(m)}) is not a TransformerBlock of "
                f"TinyTransformer; blocks can only be inserted after a block: {paths}"
            )
        raise ValueError(f"Deepen.after={spec.after!r} matches no block of TinyTransformer; its blocks are {paths}")
    old = list(model.blocks)
    new_list, out = [], []
    for i, prev in enumerate(old):
        new_list.append(prev)
        p = f"blocks.{i}"
        if p not in hits:
            continue
        for t in range(spec.count):
            block = _fresh_block(prev, spec, generator)
            new_list.append(block)
            if spec.init == "zero":
                exact, note = True, "zero: proj and ff2 (weights and biases) are zero, both residual branches add 0: exact"
            else:
                exact, note = False, f"{spec.init} block: not preserving"
            if spec.noise:
                exact, note = False, note.replace(": exact", "") + f"; noise std {spec.noise}: not preserving"
            width = block.ln1.normalized_shape[0]
            E = block.qkv.out_features // 3
            out.append((block, LayerChange(
                op="deepen", path="", kind="TransformerBlock", init=spec.init, before=[], after=[width, block.heads],
                exact=exact, note=note,
                detail={"after": p, "block": t, "params": L.n_params(block), "ff_width": block.ff1.out_features,
                        "head_dim": E // block.heads},
            )))
    model.blocks = nn.ModuleList(new_list)
    where = {id(m): k for k, m in enumerate(new_list)}
    for block, c in out:
        c.path = f"blocks.{where[id(block)]}"
        c.detail["index"] = where[id(block)]
    return out


def _widen_embedding(model, spec: Widen, generator) -> LayerChange:
    """net2net growth of the residual width by an integer factor, see the module docstring."""
    D = model.tok.embedding_dim
    path = EMBEDDING
    if spec.init != "net2net":
        raise ValueError(
            f"Widen.target={path!r}: the embedding (residual) width supports only init='net2net' "
            f"(every unit duplicated, exact through LayerNorm), got init={spec.init!r}"
        )
    if spec.factor is not None:
        f = float(spec.factor)
        if not f.is_integer():
            raise ValueError(
                f"Widen.target={path!r}: the embedding (residual) width needs an integer factor for now "
                f"(so every unit has the same number of copies and LayerNorm stays exact), got factor={spec.factor!r}"
            )
        m = int(f) * D
    else:
        m = spec.new_width(path, "Embedding", D)
        if m % D:
            raise ValueError(
                f"Widen.target={path!r}: the embedding (residual) width {D} can only grow to an integer multiple "
                f"of itself for now (non-integer factors are not supported), got size={spec.size}"
            )
    k = m // D
    g = torch.arange(m) % D
    noise = spec.noise

    def noisy(t, dim):  # noise on the copies (indices >= D along dim)
        if noise and k > 1:
            sl = [slice(None)] * t.dim()
            sl[dim] = slice(D, None)
            t[tuple(sl)] += L.gaussian(t[tuple(sl)].shape, noise, t, generator)
        return t

    with torch.no_grad():
        for emb in (model.tok, model.pos):
            L.replace_param(emb, "weight", noisy(emb.weight.detach()[:, g.to(emb.weight.device)].clone(), 1))
            emb.embedding_dim = m
        lns = [model.ln_f] + [ln for b in model.blocks for ln in (b.ln1, b.ln2)]
        for ln in lns:
            for name in ("weight", "bias"):
                t = getattr(ln, name)
                if t is not None:
                    L.replace_param(ln, name, t.detach()[g.to(t.device)].clone())
            ln.normalized_shape = (m,)
        writers = [lin for b in model.blocks for lin in (b.proj, b.ff2)]
        for lin in writers:
            w, b = lin.weight.detach(), lin.bias
            gi = g.to(w.device)
            L.resize_linear(lin, noisy(w[gi].clone(), 0), None if b is None else b.detach()[gi].clone())
        readers = [lin for b in model.blocks for lin in (b.qkv, b.ff1)] + [model.head]
        for lin in readers:
            w = lin.weight.detach()
            L.resize_linear(lin, noisy(w[:, g.to(w.device)] / k, 1), lin.bias)
    exact = not noise or k == 1
    note = ("net2net: every residual unit duplicated %d times (embeddings, LayerNorms, proj/ff2 rows; "
            "qkv/ff1/head columns divided by %d): exact" % (k, k))
    if not exact:
        note += f"; noise std {noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Embedding", init=spec.init, before=[D], after=[m], exact=exact, note=note,
        detail={"residual_width": [D, m], "copies": k, "layernorms": len(lns),
                "writers": len(writers) + 2, "readers": len(readers)},
    )
