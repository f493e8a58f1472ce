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
  columns (fan-in = the new ``proj`` width): not preserving. ``net2net``: each new head copies an
  existing head (its q, k and v rows and biases), drawn at random without replacement in rounds as
  ``width.py`` does (copy counts differ by at most one); a copy's attention output equals its
  source's, so dividing the source's ``proj`` columns by its number of copies (itself included)
  among all of them is exact (measured max error 2.4e-7: 40 random 2-block width-16 2-head models,
  all blocks, factors 2 and 1.5 and size 7, 32 sequences each; tests/test_expand_heads.py checks 1e-5). The change's ``detail``
  lists the copied source heads (``sources``).

Measured max errors (float32, eval, 40 random 2-block models with random LayerNorm parameters,
all blocks at once, 32 full-length token sequences each): ff net2net (factors 1.5 and 2) 2.4e-7,
ff zero 0, heads zero 0; tests/test_expand_transformer.py checks 1e-5. ``noise > 0`` adds N(0, noise^2) to the new
weights and makes the change non-preserving.

* ``"tok"`` (exact path only; globs such as ``"*"`` do not select it): the embedding, i.e. residual,
  width ``D``, grown to any ``m >= D`` (``factor`` or ``size``). Every place the residual stream
  is written (``tok``/``pos`` columns, the rows and bias entries of every block's ``proj`` and
  ``ff2``), normalised (``ln1``, ``ln2``, ``ln_f``) or read (the input columns of every ``qkv``,
  ``ff1`` and the classifier ``head``) grows consistently; attention width, heads, head_dim, the
  feed-forward width and reader biases are unchanged. The D existing units keep their indices.

  - ``net2net``: ``m = k*D + r``. New unit ``j < k*D`` copies unit ``j mod D`` (writers' outputs
    and LayerNorm gain/bias copied, readers' columns divided by ``k``): the LayerNorm mean and
    variance over ``k`` copies equal those over the originals. The ``r`` remainder units are
    *mean units* (as ``width.py`` does): their ``tok``/``pos`` column and ``proj``/``ff2`` rows
    (and bias) are the mean of the existing ones, so, the stream being a sum of linear writes,
    each holds the per-token mean of the residual units; readers' columns for them are zero. The
    LayerNorm mean is then unchanged and the variance shrinks by the constant ``s = k*D/m``:
    every LayerNorm's ``eps`` is multiplied by ``s`` and its (copied) gain by ``sqrt(s)``, which
    undoes it (mean units normalise to 0 and get gain 1, bias 0). Exact for any factor.
  - ``zero``: ``k = 1``, all ``m - D`` new units are mean units as above (zero outgoing weights,
    i.e. zero ``qkv``/``ff1``/``head`` columns): exact. *Literally* zero new residual units (zero
    embedding columns and ``proj``/``ff2`` rows) are not used: their LayerNorm mean becomes
    ``D*mu/m`` and the variance gains a ``mu^2`` term, both depending on each token's mean ``mu``,
    which no constant eps/gain change undoes; measured max error 0.6 (0.25 minimum) over the 40
    models below at factor 2.
  - ``random``: new ``tok``/``pos`` columns N(0, 1) (``nn.Embedding``'s init), new ``proj``/``ff2``
    rows and biases and new reader columns as a fresh ``nn.Linear`` (fan-in ``in_features``,
    resp. ``m``), new LayerNorm entries gain 1 / bias 0, ``eps`` unchanged: not preserving.

  Measured max |expanded - base| (float32, eval, 40 random 2-block width-16 models with random
  LayerNorm parameters, 32 full-length sequences each): net2net factors 2, 3, 1.5 and sizes 20, 40:
  2.4e-7 each; zero sizes 17, 32, 40: 2.4e-7 each; random: 0.38 to 1.2 (factor 2), 0.21 to 0.81
  (size 20). Earlier: net2net integer factors, 200 random models of residual width 4 and 8,
  factors 2 to 4: 8.9e-7. tests/test_expand_embedding.py and tests/test_expand_transformer_depth.py
  check 1e-5. Approximate for a degenerate residual width of 2: a LayerNorm over 2 units outputs
  +-1 scaled and amplifies rounding (the reordered sums), measured up to 2.7e-5 against a base
  float32-vs-float64 error of 1.4e-6; use float64 there. A LayerNorm without a gain
  (``elementwise_affine=False``) cannot take the ``sqrt(s)`` rescale: with mean units the change
  is then reported ``exact=False``. ``noise > 0`` adds N(0, noise^2) to every new unit (new
  ``tok``/``pos`` columns, new ``proj``/``ff2`` rows, new ``qkv``/``ff1``/``head`` columns): not
  preserving.

``Deepen(after="blocks.<i>", count=k, init="zero"|"random"|"copy")`` inserts pre-LN blocks after
block ``i``, see ``deepen_transformer``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen
from .width import _plan, widen


EMBEDDING = "tok"
WIDENABLE = ("blocks.<i>.ff1 (feed-forward units), blocks.<i>.qkv (attention heads), "
             "and by exact path only: 'tok' (the embedding/residual width, net2net, zero or random)")


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
    dev = w.device
    if spec.init == "net2net":
        # New heads copy existing ones, drawn without replacement in rounds (as width.py does).
        copies, _, _ = _plan(n, m, "net2net", False, generator)
        src = torch.cat([torch.arange(n), copies])
    else:
        copies, src = torch.zeros(0, dtype=torch.long), torch.arange(n)
    counts = torch.bincount(src, minlength=n)
    sidx = src.to(dev)
    bound = L.fresh_bound(D)
    rows, biases = [], []
    for t in range(3):  # q, k, v: old heads, then the new ones
        blk_w = w[t * E : (t + 1) * E]
        if spec.init == "net2net":
            new_rows = blk_w.reshape(n, hd, D)[sidx[n:]].reshape(extra, D).clone()
        else:
            new_rows = L.uniform((extra, D), bound, w, generator)
        if spec.noise:
            new_rows += L.gaussian(new_rows.shape, spec.noise, w, generator)
        rows += [blk_w, new_rows]
        if qkv.bias is not None:
            bb = qkv.bias.detach()[t * E : (t + 1) * E]
            if spec.init == "net2net":
                new_b = bb.reshape(n, hd)[sidx[n:]].reshape(extra)
            else:
                new_b = L.uniform((extra,), bound, qkv.bias, generator)
            biases += [bb, new_b]
    L.resize_linear(qkv, torch.cat(rows), torch.cat(biases) if biases else None)

    wp = proj.weight.detach()
    if spec.init == "net2net":
        # Each copied head's proj columns are divided among its copies (whose outputs are identical).
        v = wp.reshape(wp.shape[0], n, hd)
        scale = counts.to(dev, wp.dtype)[sidx].view(1, -1, 1)
        full = (v[:, sidx] / scale).reshape(wp.shape[0], m * hd)
        old_cols, cols = full[:, :E], full[:, E:].clone()
    else:
        old_cols = wp
        if spec.init == "random":
            cols = L.uniform((wp.shape[0], extra), L.fresh_bound(m * hd), wp, generator)
        else:
            cols = wp.new_zeros(wp.shape[0], extra)
    if spec.noise:
        cols = cols + L.gaussian(cols.shape, spec.noise, wp, generator)
    L.resize_linear(proj, torch.cat([old_cols, cols], 1), proj.bias)
    blk.heads = m

    if spec.init == "random":
        exact, note = False, "random new heads (fresh output-projection columns): not preserving"
    elif spec.init == "net2net":
        exact, note = True, ("net2net: new heads copy existing ones (q, k, v rows), each copied head's "
                             "output-projection columns divided among its copies: exact")
    else:
        exact, note = True, "zero: new heads' output-projection columns are zero: exact"
    if spec.noise:
        exact, note = False, note + f"; noise std {spec.noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Attention", init=spec.init,
        before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"heads_before": n, "heads_after": m, "head_dim": hd,
                "fresh": 0 if spec.init == "net2net" else m - n, "copied": int(len(copies)),
                "sources": [int(i) for i in copies],
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
    hits = L.match_insertion_points(
        model, spec.after, block_paths(model),
        not_one="a TransformerBlock of TinyTransformer; blocks can only be inserted after a block",
        listing="block of TinyTransformer; its blocks are")
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
    """Grow the residual width ``D`` to ``m`` (net2net copies, mean units, fresh units), see the
    module docstring."""
    D = model.tok.embedding_dim
    path = EMBEDDING
    m = spec.new_width(path, "Embedding", D)
    if spec.init == "net2net":
        k, n_mean, n_fresh = m // D, m % D, 0
    elif spec.init == "zero":
        k, n_mean, n_fresh = 1, m - D, 0
    else:  # random
        k, n_mean, n_fresh = 1, 0, m - D
    g = torch.arange(k * D) % D  # source of every copied unit (the D originals first)
    # Mean units add no deviation from the per-token mean: the variance shrinks by exactly kD/m.
    shrink = (k * D) / (k * D + n_mean)
    noise = spec.noise

    def grow(t, dim, fresh):
        """``t`` along ``dim``: copies ``t[g]``, ``n_mean`` mean units, ``n_fresh`` from ``fresh(shape)``."""
        t = t.detach()
        parts = [t.index_select(dim, g.to(t.device))]
        if n_mean:
            shape = list(t.shape)
            shape[dim] = n_mean
            parts.append(t.mean(dim, keepdim=True).expand(shape))
        if n_fresh:
            shape = list(t.shape)
            shape[dim] = n_fresh
            parts.append(fresh(tuple(shape)))
        out = torch.cat(parts, dim).clone()
        if noise and m > D:
            sl = [slice(None)] * out.dim()
            sl[dim] = slice(D, None)
            out[tuple(sl)] += L.gaussian(out[tuple(sl)].shape, noise, out, generator)
        return out

    gain_ok = True
    with torch.no_grad():
        for emb in (model.tok, model.pos):
            w = emb.weight
            # nn.Embedding's default init: N(0, 1)
            L.replace_param(emb, "weight", grow(w, 1, lambda s: L.gaussian(s, 1.0, w, generator)))
            emb.embedding_dim = m
        lns = [model.ln_f] + [ln for b in model.blocks for ln in (b.ln1, b.ln2)]
        for ln in lns:
            extra = m - k * D
            if ln.weight is not None:
                w = ln.weight.detach()
                L.replace_param(ln, "weight", torch.cat([w[g.to(w.device)] * math.sqrt(shrink), w.new_ones(extra)]))
            elif shrink != 1.0:
                gain_ok = False
            if ln.bias is not None:
                b = ln.bias.detach()
                L.replace_param(ln, "bias", torch.cat([b[g.to(b.device)], b.new_zeros(extra)]))
            ln.eps = ln.eps * shrink
            ln.normalized_shape = (m,)
        writers = [lin for b in model.blocks for lin in (b.proj, b.ff2)]
        for lin in writers:
            w, b = lin.weight, lin.bias
            bound = L.fresh_bound(lin.in_features)
            new_b = None if b is None else grow(b, 0, lambda s: L.uniform(s, bound, b, generator))
            L.resize_linear(lin, grow(w, 0, lambda s: L.uniform(s, bound, w, generator)), new_b)
        readers = [lin for b in model.blocks for lin in (b.qkv, b.ff1)] + [model.head]
        for lin in readers:
            w = lin.weight.detach()
            cols = [w[:, g.to(w.device)] / k]
            if spec.init == "random":
                cols.append(L.uniform((w.shape[0], n_fresh), L.fresh_bound(m), w, generator))
            else:
                cols.append(w.new_zeros(w.shape[0], n_mean))
            new_w = torch.cat(cols, 1)
            if noise and m > D:
                new_w[:, D:] += L.gaussian((w.shape[0], m - D), noise, w, generator)
            L.resize_linear(lin, new_w, lin.bias)
    if spec.init == "random" and m > D:
        exact, note = False, "random: fresh residual units (embedding columns, proj/ff2 rows, qkv/ff1/head columns): not preserving"
    else:
        parts = []
        if k > 1:
            parts.append(f"every residual unit duplicated {k} times (qkv/ff1/head columns divided by {k})")
        if n_mean:
            parts.append(f"{n_mean} mean units (embedding columns and proj/ff2 rows the mean of the existing ones, "
                         f"zero qkv/ff1/head columns; LayerNorm eps x{shrink:.6g}, gains x sqrt of that)")
        exact = gain_ok
        note = f"{spec.init}: " + ("; ".join(parts) or "unchanged width") + (": exact" if exact else
                                                                          ": a LayerNorm without gain: not preserving")
    if noise and m > D:
        exact, note = False, note + f"; noise std {noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Embedding", init=spec.init, before=[D], after=[m], exact=exact, note=note,
        detail={"residual_width": [D, m], "copies": k, "mean_units": n_mean, "fresh": n_fresh,
                "eps_scale": shrink, "layernorms": len(lns), "writers": len(writers) + 2, "readers": len(readers)},
    )


def _is_transformer(model: nn.Module) -> bool:
    from ..models import TinyTransformer

    return isinstance(model, TinyTransformer)


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """Random token ids of the model's full length, from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.tok.num_embeddings, (64, model.length), generator=g)
    return x.to(model.tok.weight.device)


FAMILY = Family(name="manifold_ext.models.TinyTransformer", matches=_is_transformer,
                widen=widen_transformer, deepen=deepen_transformer, default_inputs=_default_inputs)
