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
  among all of them is exact. The change's ``detail`` lists the copied source heads (``sources``).

"Exact" means equal up to float rounding (the grown model sums in another order):
tests/test_expand_transformer.py and tests/test_expand_heads.py check 1e-5 in float32.
``noise > 0`` adds N(0, noise^2) to the new weights and makes the change non-preserving.

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
    which no constant eps/gain change undoes.
  - ``random``: new ``tok``/``pos`` columns N(0, 1) (``nn.Embedding``'s init), new ``proj``/``ff2``
    rows and biases and new reader columns as a fresh ``nn.Linear`` (fan-in ``in_features``,
    resp. ``m``), new LayerNorm entries gain 1 / bias 0, ``eps`` unchanged: not preserving.

  tests/test_expand_embedding.py and tests/test_expand_transformer_depth.py check 1e-5 in
  float32. Approximate for a degenerate residual width of 2: a LayerNorm over 2 units outputs
  +-1 scaled and amplifies rounding (the reordered sums) beyond that; use float64 there. A
  LayerNorm without a gain (``elementwise_affine=False``) cannot take the ``sqrt(s)`` rescale:
  with mean units the change is then reported ``exact=False``. ``noise > 0`` adds N(0, noise^2)
  to every new unit (new ``tok``/``pos`` columns, new ``proj``/``ff2`` rows, new
  ``qkv``/``ff1``/``head`` columns): not preserving.

``Deepen(after="blocks.<i>", count=k, init="zero"|"random"|"copy")`` inserts pre-LN blocks after
block ``i``, see ``deepen_transformer``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from ._claims import deepen_claim, width_claim
from ._insert import insert_after, refuse_identity
from ._residual import ResidualPlan, residual_claim, residual_plan
from ._units import append_head_rows, copy_sources, grow_head_columns, grow_layernorm, head_copies
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen
from .width import widen


EMBEDDING = "tok"
WIDENABLE = ("blocks.<i>.ff1 (feed-forward units), blocks.<i>.qkv (attention heads), "
             "and by exact path only: 'tok' (the embedding/residual width, net2net, zero or random)")


def _candidates(model):
    """The widenable ``(path, kind)`` pairs: every block's ``ff1`` ("ff") and ``qkv`` ("heads")."""
    out = []
    for name in model.blocks._modules:
        out += [(f"blocks.{name}.ff1", "ff"), (f"blocks.{name}.qkv", "heads")]
    return out


def widen_transformer(model, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to a TinyTransformer in place (it is already a copy); return
    ``(module, LayerChange)`` pairs (the module is ``ff1`` or ``qkv``)."""
    if spec.target == EMBEDDING:
        return [(model.tok, _widen_embedding(model, spec, generator))]
    hits = L.select_widen_targets(model, spec, _candidates(model), WIDENABLE)
    out = []
    for path, what in hits:
        blk = model.blocks._modules[path.split(".")[1]]
        if what == "ff":
            out.append((blk.ff1, _widen_ff(path, blk, spec, generator)))
        else:
            out.append((blk.qkv, _add_heads(path, blk, spec, generator)))
    return out


def _widen_ff(path: str, blk, spec: Widen, generator) -> LayerChange:
    """Grow a block's feed-forward width (``ff1 -> GELU -> ff2``) as ``width.widen`` grows an MLP."""
    seq = nn.Sequential(OrderedDict(ff1=blk.ff1, act=nn.GELU(), ff2=blk.ff2))
    m = spec.new_width(path, "Linear", blk.ff1.out_features)
    change = widen(seq, 0, m, spec.init, spec.noise, generator)
    change.path = path
    change.detail["consumer"] = path[: -len("ff1")] + "ff2"
    return change


# --- attention heads -----------------------------------------------------------------------------

def _add_heads(path: str, blk, spec: Widen, generator) -> LayerChange:
    """Grow a block's attention from n to m heads of the same ``head_dim``; see the module docstring."""
    qkv, proj = blk.qkv, blk.proj
    n = blk.heads
    E = qkv.out_features // 3
    hd = E // n
    m = spec.new_width(path, "attention heads", n)
    D = qkv.in_features
    copies = head_copies(n, m, spec.init, generator)
    src, counts = copy_sources(n, copies)
    w = qkv.weight.detach()
    sidx = src.to(w.device)
    rows, biases = [], []
    for t in range(3):  # q, k, v: old heads, then the new ones
        bias = None if qkv.bias is None else qkv.bias.detach()[t * E : (t + 1) * E]
        grown_w, grown_b = append_head_rows(w[t * E : (t + 1) * E], bias, sidx, m, hd, spec.init, spec.noise,
                                            generator)
        rows.append(grown_w)
        if grown_b is not None:
            biases.append(grown_b)
    L.resize_linear(qkv, torch.cat(rows), torch.cat(biases) if biases else None)
    wp = proj.weight.detach()
    # A copied head's attention output equals its source's: its proj columns share the source's.
    head_counts = counts.to(wp.device, wp.dtype)[sidx]
    L.resize_linear(proj, grow_head_columns(wp, sidx, head_counts, m, hd, spec.init, spec.noise, generator),
                    proj.bias)
    blk.heads = m
    exact, note = width_claim(
        spec.init, spec.noise, "random new heads (fresh output-projection columns): not preserving",
        "net2net: new heads copy existing ones (q, k, v rows), each copied head's output-projection columns "
        "divided among its copies: exact",
        "zero: new heads' output-projection columns are zero: exact")
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
    """The paths of the model's blocks, ``blocks.<i>``."""
    return [f"blocks.{name}" for name in model.blocks._modules]


def _fresh_block(prev, spec, generator):
    """A new TransformerBlock shaped like ``prev`` (residual width, heads, head_dim, ff width)."""
    block = copy.deepcopy(prev)  # same shapes (added heads included); fresh values unless init="copy"
    if spec.init != "copy":
        with torch.no_grad():
            _reset_block(block, zero=spec.init == "zero", generator=generator)
    if spec.noise:
        with torch.no_grad():
            for lin in (block.qkv, block.proj, block.ff1, block.ff2):
                lin.weight.add_(L.gaussian(lin.weight.shape, spec.noise, lin.weight, generator))
    block.train(prev.training)
    return block


def _reset_block(block, zero: bool, generator) -> None:
    """Give ``block`` fresh ``nn.Linear`` weights and LayerNorms at gain 1 / bias 0; with ``zero``,
    ``proj`` and ``ff2`` (the residual writers) zero."""
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
    if zero:
        for lin in (block.proj, block.ff2):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def deepen_transformer(model, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec to a TinyTransformer in place (it is already a copy): insert
    ``spec.count`` pre-LN TransformerBlocks right after each selected ``blocks.<i>`` (an exact
    path or a glob over the block paths). Later blocks are renumbered (``nn.ModuleList``).

    * ``zero``: fresh block (``nn.Linear`` default init, LayerNorms at gain 1 / bias 0) whose
      attention output projection ``proj`` and second feed-forward layer ``ff2`` (weights and
      biases) are zero: both residual branches add exactly 0, so the block is the identity:
      exact.
    * ``random``: fresh block: not preserving.
    * ``copy``: a copy of the block at ``after`` (progressive stacking): not preserving.
    * ``identity``: refused (a residual block is preserved by ``zero``).

    ``noise > 0`` adds N(0, noise^2) to all four weight matrices of every new block (the zeroed
    ``proj``/``ff2`` included, so ``zero`` with noise is *not* preserving and is reported so).
    Returns ``(block, LayerChange)`` pairs; the change's ``after`` is ``[residual width, heads]``
    and ``detail`` holds the block's parameter count, ``ff_width``, ``head_dim`` and the index.
    """
    refuse_identity(spec, "TinyTransformer", "a pre-LN block with zero proj and ff2")
    paths = block_paths(model)
    hits = L.match_insertion_points(
        model, spec.after, paths,
        not_one="a TransformerBlock of TinyTransformer; blocks can only be inserted after a block",
        listing="block of TinyTransformer; its blocks are")
    new_list, added = insert_after(list(model.blocks), paths, hits, spec.count,
                                   lambda prev: _fresh_block(prev, spec, generator))
    model.blocks = nn.ModuleList(new_list)
    exact, note = deepen_claim(spec.init, spec.noise,
                               "zero: proj and ff2 (weights and biases) are zero, both residual branches add 0: exact")
    out = []
    for block, after, t, index in added:
        E = block.qkv.out_features // 3
        out.append((block, LayerChange(
            op="deepen", path=f"blocks.{index}", kind="TransformerBlock", init=spec.init, before=[],
            after=[block.ln1.normalized_shape[0], block.heads], exact=exact, note=note,
            detail={"after": after, "block": t, "params": L.n_params(block), "ff_width": block.ff1.out_features,
                    "head_dim": E // block.heads, "index": index},
        )))
    return out


# --- residual width ------------------------------------------------------------------------------

def _widen_embedding(model, spec: Widen, generator) -> LayerChange:
    """Grow the residual width ``D`` to ``m`` (net2net copies, mean units, fresh units), see the
    module docstring."""
    D = model.tok.embedding_dim
    m = spec.new_width(EMBEDDING, "Embedding", D)
    plan = residual_plan(D, m, spec.init, "mean", spec.noise, generator)
    lns = [model.ln_f] + [ln for b in model.blocks for ln in (b.ln1, b.ln2)]
    writers = [lin for b in model.blocks for lin in (b.proj, b.ff2)]
    readers = [lin for b in model.blocks for lin in (b.qkv, b.ff1)] + [model.head]
    with torch.no_grad():
        _grow_embeddings(model, plan, generator)
        gain_ok = all([grow_layernorm(ln, plan.src, m, plan.shrink) for ln in lns])
        _grow_writers(writers, plan, generator)
        _grow_readers(readers, plan, spec.init, generator)
    exact, note = _embedding_claim(plan, spec.init, gain_ok)
    return LayerChange(
        op="widen", path=EMBEDDING, kind="Embedding", init=spec.init, before=[D], after=[m], exact=exact, note=note,
        detail={"residual_width": [D, m], "copies": plan.k, "mean_units": plan.n_mean, "fresh": plan.n_fresh,
                "eps_scale": plan.shrink, "layernorms": len(lns), "writers": len(writers) + 2,
                "readers": len(readers)},
    )


def _grow_embeddings(model, plan: ResidualPlan, generator) -> None:
    """Grow the ``tok`` and ``pos`` columns (fresh ones as ``nn.Embedding`` draws them: N(0, 1))."""
    for emb in (model.tok, model.pos):
        w = emb.weight
        L.replace_param(emb, "weight", plan.write(w, 1, lambda s: L.gaussian(s, 1.0, w, generator)))
        emb.embedding_dim = plan.m


def _grow_writers(writers, plan: ResidualPlan, generator) -> None:
    """Grow the output rows and biases of ``proj``/``ff2`` (fresh ones as a fresh ``nn.Linear``'s)."""
    for lin in writers:
        w, b = lin.weight, lin.bias
        bound = L.fresh_bound(lin.in_features)
        new_b = None if b is None else plan.write(b, 0, lambda s: L.uniform(s, bound, b, generator))
        L.resize_linear(lin, plan.write(w, 0, lambda s: L.uniform(s, bound, w, generator)), new_b)


def _grow_readers(readers, plan: ResidualPlan, init: str, generator) -> None:
    """Grow the input columns of ``qkv``/``ff1``/``head``: zero for mean units, fresh for random."""
    for lin in readers:
        w = lin.weight.detach()
        if init == "random":
            new = lambda s: L.uniform(s, L.fresh_bound(plan.m), w, generator)  # noqa: E731
        else:
            new = w.new_zeros
        L.resize_linear(lin, plan.read(w, 1, new), lin.bias)


def _embedding_claim(plan: ResidualPlan, init: str, gain_ok: bool):
    """Whether the residual widening preserves the function, and why."""
    parts = []
    if plan.k > 1:
        parts.append(f"every residual unit duplicated {plan.k} times (qkv/ff1/head columns divided by {plan.k})")
    if plan.n_mean:
        parts.append(f"{plan.n_mean} mean units (embedding columns and proj/ff2 rows the mean of the existing ones, "
                     f"zero qkv/ff1/head columns; LayerNorm eps x{plan.shrink:.6g}, gains x sqrt of that)")
    return residual_claim(plan, init, "random: fresh residual units (embedding columns, proj/ff2 rows, "
                          "qkv/ff1/head columns): not preserving", parts, gain_ok)


def _is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a ``manifold_ext.models.TinyTransformer``."""
    from ..models import TinyTransformer

    return isinstance(model, TinyTransformer)


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """Random token ids of the model's full length, from a fixed seed."""
    return L.fixed_seed_tokens(model.tok.num_embeddings, model.length, model.tok.weight.device)


FAMILY = Family(name="manifold_ext.models.TinyTransformer", matches=_is_transformer,
                widen=widen_transformer, deepen=deepen_transformer, default_inputs=_default_inputs)
