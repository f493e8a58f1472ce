"""Growth operators for Hugging Face GPT-2 models (``GPT2LMHeadModel``, ``GPT2Model``).

The family matches by class name and ``type(model).__module__`` (``transformers.*``): this module
never imports ``transformers`` (it works on the model's modules and config only).
Paths are those of the model: ``transformer.h.<i>`` for a ``GPT2LMHeadModel``, ``h.<i>`` for a
``GPT2Model`` (``fnmatch`` globs allowed, e.g. ``"transformer.h.*.mlp"``). A block is pre-LN:
``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; its ``Conv1D`` layers store their weights as
``(in, out)``: ``attn.c_attn`` ``(D, 3D)``, ``attn.c_proj`` ``(D, D)``, ``mlp.c_fc`` ``(D, inner)``,
``mlp.c_proj`` ``(inner, D)``.

* ``Widen("transformer.h.<i>.mlp", factor|size)``: the feed-forward width (``n_inner``, counted in
  units): ``c_fc``'s outputs and ``mlp.c_proj``'s inputs, grown by ``width.widen`` (the code that
  grows an MLP's hidden layer; the Conv1D weights are handed to it transposed, as ``nn.Linear``
  ones, and written back as ``(in, out)``). ``net2net``: new units copy existing ones (their
  ``c_fc`` columns and biases), drawn without replacement in rounds (copy counts differ by at most
  one); each source's ``c_proj`` row is divided by its number of copies: exact (the activation,
  ``gelu_new`` by default, is elementwise). ``zero``: fresh ``c_fc`` columns (``nn.Linear``'s
  default U(+-1/sqrt(D)) init, as ``width.widen`` draws them), zero ``c_proj`` rows: exact.
  ``random``: fresh ``c_proj`` rows too: not preserving. ``noise > 0`` adds N(0, noise^2) to the
  new weights: not preserving. ``GPT2Config.n_inner`` is one number for every block, so a width
  spec must leave every block with the same width: widen all blocks at once (``"transformer.h.*.mlp"``);
  widening a subset is refused with a ValueError (the grown model would not reload).
* ``Widen("transformer.h.*.attn", size|factor, init)`` (more attention heads, counted in heads;
  every block at once: ``n_head`` is one number, else ValueError; ``GPT2LMHeadModel`` only).
  ``GPT2Attention`` ties the attention width to the residual width (``head_dim = n_embd //
  n_head``, no ``head_dim`` in ``GPT2Config``), so adding ``a`` heads at the same ``head_dim`` grows
  ``n_embd`` by ``a * head_dim``: the residual growth below, with ``k = 1`` (every new residual
  unit a mean unit: exact), and the new heads appended after the existing ones in ``c_attn``'s
  q, k and v columns and ``attn.c_proj``'s rows. ``net2net``: new heads copy existing ones
  (drawn without replacement in rounds), each source's ``c_proj`` rows divided by its number of
  copies: exact. ``zero``: fresh q/k/v columns N(0, initializer_range), zero ``c_proj`` rows:
  exact. ``random``: fresh ``c_proj`` rows and fresh residual units: not preserving. ``n_head``
  and ``n_embd`` in the config follow. A glob (``"transformer.h.*"``, ``"*"``) selects the
  feed-forward modules only; a target that selects only attention modules grows heads.
* ``Deepen(after="transformer.h.<i>", count, init)``: inserts blocks after block ``i`` (the
  ``nn.ModuleList`` ``h`` is renumbered; every block's ``attn.layer_idx``, used by the KV cache,
  is reset to its index; ``config.n_layer`` follows). ``zero``: a fresh block (``Conv1D`` weights
  N(0, initializer_range), biases 0, LayerNorms gain 1 bias 0, as Hugging Face initialises them)
  whose ``attn.c_proj`` and ``mlp.c_proj`` weights and biases are zero: both residual branches add
  0, the block is the identity: exact. ``random``: the same, with ``c_proj`` weights
  N(0, initializer_range / sqrt(2 * n_layer)) (GPT-2's scaled init): not preserving. ``copy``: a
  copy of block ``i`` (progressive stacking, G_stack): not preserving. ``identity``: refused (use
  ``zero``). With ``config.scale_attn_by_inverse_layer_idx`` (attention scaled by
  ``1 / (layer_idx + 1)``, fixed when a block is built), inserting before an existing block would
  change that block's scale: refused (ValueError) unless the new blocks go after the last one.
  ``noise > 0`` adds N(0, noise^2) to every Conv1D weight of a new block: not preserving.

``finish`` brings the config up to date after every spec (``n_inner``, ``n_layer``; ``n_head``
never changes), so the grown model saves with ``save_pretrained``, reloads with
``from_pretrained`` and generates. The preservation check's default inputs are 64 random token
sequences of length ``min(n_positions, 16)`` from a fixed seed (a headless ``GPT2Model`` is
compared on its ``last_hidden_state``).

* ``Widen("transformer.wte", factor|size, init)`` (exact path only; globs such as ``"*"`` do not
  select it; ``GPT2LMHeadModel`` only): the residual width ``n_embd`` D -> m, as
  ``transformer._widen_embedding`` does for TinyTransformer. Since GPT-2's attention width *is*
  ``n_embd`` (``head_dim = n_embd // n_head``), it grows too: ``n_head`` is kept and ``head_dim``
  grows from ``D / n_head`` to ``m / n_head`` (so m must be a multiple of ``n_head``, else
  ValueError). Writers of the stream (``wte``/``wpe`` columns, every ``c_proj``'s output columns and
  bias), every LayerNorm (``ln_1``, ``ln_2``, ``ln_f``) and readers (the input rows of ``c_attn``
  and ``c_fc``; ``lm_head``) grow together. ``net2net``: ``m = k*D + r``: unit ``j < k*D`` copies
  unit ``j mod D`` (writers copied, reader rows divided by k), the r remainder units are *mean
  units* (writer columns the mean of the existing ones, reader rows zero); the LayerNorm variance
  then shrinks by the constant ``s = k*D/m``, undone by ``eps * s`` (``config.layer_norm_epsilon``
  follows) and gains ``* sqrt(s)``; mean units normalise to 0 (gain 1, bias 0). ``lm_head`` is tied
  to ``wte`` (its columns are the copied writer columns, not divided): instead ``ln_f``'s gain and
  bias are divided by k (``ln_f`` feeds only ``lm_head``); an untied ``lm_head`` is a reader.
  Each head gets ``m/n - D/n`` new dimensions: zero q, k and v columns in ``c_attn`` (and bias)
  and zero ``attn.c_proj`` rows, so the scores ``q.k`` and the outputs are unchanged; the q
  columns are multiplied by ``sqrt(head_dim'/head_dim)`` to undo the new ``1/sqrt(head_dim')``
  scale (not with ``scale_attn_weights=False``): exact. ``zero``: k = 1, all new units are mean
  units: exact. ``random``: fresh units and head dimensions, N(0, initializer_range): not
  preserving. Refused for a ``GPT2Model`` (its output is the residual stream: the output shape
  would change) and with ``add_cross_attention`` (the encoder's width is ``n_embd`` too).
  ``config.n_embd`` and ``layer_norm_epsilon`` are updated. (Adding heads at a fixed ``head_dim``
  instead grows ``n_embd`` by the new heads' dimensions: ``Widen("transformer.h.*.attn")`` above.)

"Exact" means equal up to float rounding (the grown model sums in another order):
tests/test_expand_gpt2.py checks 1e-5 on the logits and the LM loss in float32, with random
LayerNorm parameters and Conv1D biases, and that greedy ``generate`` gives the base's tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _layers as L
from ._claims import deepen_claim
from ._insert import insert_after, refuse_identity
from ._residual import ResidualPlan, residual_claim, residual_plan
from ._units import copy_sources, grow_layernorm, head_copies
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen
from .width import widen

_CLASSES = ("GPT2LMHeadModel", "GPT2Model")


def _matches(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face GPT-2 (by class name and module, without importing transformers)."""
    t = type(model)
    return t.__name__ in _CLASSES and t.__module__.startswith("transformers.")


def _prefix(model) -> str:
    """The path prefix of the block list: ``"transformer.h"`` or ``"h"``."""
    return "transformer.h" if hasattr(model, "transformer") else "h"


def _base(model):
    """The ``GPT2Model`` (the model itself, or a ``GPT2LMHeadModel``'s ``transformer``)."""
    return model.transformer if hasattr(model, "transformer") else model


def _blocks(model) -> nn.ModuleList:
    """The model's list of blocks, ``h``."""
    return _base(model).h


def _widenable(model) -> str:
    """What a Widen spec may name on this model, for error messages."""
    p = _prefix(model)
    return (f"{p}.<i>.mlp (feed-forward units; every block at once, e.g. '{p}.*.mlp'); "
            f"by exact path only: '{p[:-1]}wte' (the residual width n_embd, GPT2LMHeadModel only); "
            f"attention heads: '{p}.*.attn' (every block at once; grows n_embd, GPT2LMHeadModel only)")


def _shape(t) -> list:
    """The shape of ``t`` as a list of ints."""
    return [int(s) for s in t.shape]


# --- feed-forward width ---------------------------------------------------------------------------

def _as_linear(conv) -> nn.Linear:
    """An ``nn.Linear`` computing what the Conv1D ``conv`` does (weight transposed, copied)."""
    w = conv.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


def _write_back(conv, lin: nn.Linear) -> None:
    """Store ``lin``'s parameters into the Conv1D ``conv`` as ``(in, out)``."""
    L.replace_param(conv, "weight", lin.weight.detach().t().contiguous())
    if conv.bias is not None:
        L.replace_param(conv, "bias", lin.bias.detach())
    conv.nx, conv.nf = conv.weight.shape


def _widen_mlp(path: str, mlp, m: int, spec: Widen, generator) -> LayerChange:
    """Grow one block's feed-forward width to ``m`` with ``width.widen`` (on Linear stand-ins)."""
    fc, proj = mlp.c_fc, mlp.c_proj
    before = {"c_fc": _shape(fc.weight), "c_proj": _shape(proj.weight)}
    D, n = fc.weight.shape
    # nn.GELU stands for the (elementwise) activation: width.widen only needs it to act per unit.
    seq = nn.Sequential(OrderedDict(c_fc=_as_linear(fc), act=nn.GELU(), c_proj=_as_linear(proj)))
    change = widen(seq, 0, m, spec.init, spec.noise, generator)
    _write_back(fc, seq.c_fc)
    _write_back(proj, seq.c_proj)
    return LayerChange(
        op="widen", path=path, kind="GPT2MLP", init=spec.init, before=[int(D), int(n)], after=[int(D), m],
        exact=change.exact, note=change.note.replace("random new units", "random new units (fresh c_proj rows)"),
        detail={**change.detail, "n_inner": [int(n), m], "weights_before": before,
                "weights_after": {"c_fc": _shape(fc.weight), "c_proj": _shape(proj.weight)}},
    )


def widen_gpt2(model, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to a GPT-2 in place (it is already a copy); return ``(mlp, LayerChange)``
    pairs. See the module docstring."""
    p = _prefix(model)
    if spec.target == p[:-1] + "wte":
        return [(_base(model).wte, _widen_residual(model, spec, generator))]
    blocks = _blocks(model)
    cands = []
    for name in blocks._modules:
        cands += [(f"{p}.{name}.mlp", "ff"), (f"{p}.{name}.attn", "heads")]
    hits = L.select_widen_targets(model, spec, cands, _widenable(model))
    ff = [path for path, what in hits if what == "ff"]
    if not ff:  # only attention modules were named: more heads
        return _widen_all_heads(model, spec, [path for path, _ in hits], generator)
    new = _new_ff_widths(model, spec, ff)
    out = []
    for path in ff:
        mlp = blocks._modules[path[len(p) + 1:].split(".")[0]].mlp
        out.append((mlp, _widen_mlp(path, mlp, new[path], spec, generator)))
    return out


def _new_ff_widths(model, spec: Widen, ff: list) -> dict:
    """The new feed-forward width of each selected ``mlp`` path; ValueError unless every block
    would end with the same width (``GPT2Config.n_inner`` is one number)."""
    p, blocks = _prefix(model), _blocks(model)
    new = {}
    for path in ff:
        fc = blocks._modules[path[len(p) + 1:].split(".")[0]].mlp.c_fc
        new[path] = spec.new_width(path, "GPT2MLP", fc.weight.shape[1])
    widths = {}
    for name, blk in blocks._modules.items():
        path = f"{p}.{name}.mlp"
        widths[path] = new.get(path, int(blk.mlp.c_fc.weight.shape[1]))
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"Widen.target={spec.target!r}: GPT2Config.n_inner is one feed-forward width for every block, so "
            f"all blocks must keep the same width (this spec would leave {widths}); widen every block at once, "
            f"e.g. Widen('{p}.*.mlp', ...)"
        )
    return new


def _widen_all_heads(model, spec: Widen, paths: list, generator) -> list:
    """Add heads to every block's attention (``paths`` must name them all); one change per block."""
    blocks = _blocks(model)
    if len(paths) != len(blocks):
        raise ValueError(
            f"Widen.target={spec.target!r} selects {len(paths)} of the {len(blocks)} blocks' attention; "
            f"GPT2Config.n_head is one number for all blocks (and adding heads grows n_embd): widen every "
            f"block's heads at once ('{_prefix(model)}.*.attn')")
    change = _widen_residual(model, spec, generator, heads=True)
    return [(blk.attn, dataclasses.replace(change, detail=dict(change.detail))) for blk in blocks]


# --- residual width -------------------------------------------------------------------------------

@dataclass
class _Heads:
    """How each block's attention grows: n heads of ``hd`` dims to n2 heads of ``hd2`` dims (one
    of the two changes), and the draws that make the new heads or head dims."""

    n: int
    n2: int
    hd: int
    hd2: int
    init: str
    copies: Tensor
    counts: Tensor
    std: float
    noise: float
    generator: Optional[torch.Generator]

    def pad(self, t: Tensor, dim: int, parts_n: int, q_scale: float, fill_std: float) -> Tensor:
        """Along ``dim`` (``parts_n`` blocks of n heads of hd): every head gets hd2 - hd new dims
        (zero, or N(0, fill_std) for random), the q block (block 0) scaled by ``q_scale``."""
        t = t.detach()
        shape = list(t.shape)
        shape[dim:dim + 1] = [parts_n, self.n, self.hd]
        v = t.reshape(shape)
        if q_scale != 1.0:
            v = v.clone()
            v.select(dim, 0).mul_(q_scale)
        pad = list(shape)
        pad[dim + 2] = self.hd2 - self.hd
        extra = L.gaussian(tuple(pad), fill_std, t, self.generator) if fill_std else t.new_zeros(pad)
        out = torch.cat([v, extra], dim + 2)
        new_shape = list(t.shape)
        new_shape[dim] = parts_n * self.n * self.hd2
        return out.reshape(new_shape)

    def add(self, t: Tensor, dim: int, parts_n: int, rows: bool) -> Tensor:
        """Along ``dim`` (``parts_n`` blocks of n heads of hd): n2 - n new heads. q/k/v columns
        (``rows`` False): copies of their source heads (net2net) or fresh N(0, std); c_proj rows
        (``rows`` True): each source head's rows and its copies' divided by its copy count
        (net2net), zero (zero) or fresh (random)."""
        n, n2 = self.n, self.n2
        t = t.detach()
        shape = list(t.shape)
        shape[dim:dim + 1] = [parts_n, n, self.hd]
        v = t.reshape(shape)
        if self.init == "net2net":
            src = torch.cat([torch.arange(n), self.copies]).to(t.device)
            out = v.index_select(dim + 1, src)
            if rows:
                view = [1] * len(shape)
                view[dim + 1] = n2
                out = out / self.counts.to(t.device, t.dtype)[src].view(view)
        else:
            pad = list(shape)
            pad[dim + 1] = n2 - n
            zero = rows and self.init == "zero"
            fill = t.new_zeros(pad) if zero else L.gaussian(tuple(pad), self.std, t, self.generator)
            out = torch.cat([v, fill], dim + 1)
        if self.noise and not rows:
            sl = [slice(None)] * out.dim()
            sl[dim + 1] = slice(n, None)
            out[tuple(sl)] += L.gaussian(out[tuple(sl)].shape, self.noise, out, self.generator)
        new_shape = list(t.shape)
        new_shape[dim] = parts_n * n2 * self.hd
        return out.reshape(new_shape)


def _residual_sizes(model, spec: Widen, heads: bool) -> Tuple[int, int, int, int]:
    """``(D, n, n2, m)``: n_embd and n_head before and after; ValueError where GPT-2 cannot take them."""
    cfg, path = model.config, spec.target
    D = int(_base(model).wte.weight.shape[1])
    n = int(cfg.n_head)
    if heads:
        n2 = spec.new_width(path, "GPT2Attention", n)
        m = D + (n2 - n) * (D // n)
    else:
        n2, m = n, spec.new_width(path, "Embedding", D)
    if not hasattr(model, "lm_head"):
        what = "more heads grow n_embd, which" if heads else "the residual width of a GPT2Model"
        raise ValueError(f"Widen.target={path!r}: {what} is its output (last_hidden_state) width; "
                         f"grow a GPT2LMHeadModel instead")
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"Widen.target={path!r}: a GPT-2 with cross-attention (add_cross_attention) reads an "
                         "encoder's hidden states of width n_embd; its residual width is not grown")
    if m % n2:
        raise ValueError(f"Widen.target={path!r}: GPT-2's attention width is n_embd and head_dim = n_embd // n_head, "
                         f"so the new width must be a multiple of n_head={n}, got {m}")
    return D, n, n2, m


def _plans(model, spec: Widen, generator, heads: bool) -> Tuple[ResidualPlan, _Heads]:
    """The residual plan and the attention plan for growing n_embd (or, with ``heads``, n_head)."""
    D, n, n2, m = _residual_sizes(model, spec, heads)
    std = float(getattr(model.config, "initializer_range", 0.02))
    if heads:
        # No residual unit is copied (k = 1): the new ones are mean units (fresh for random), as
        # "zero" makes them; the new heads, not the new units, carry the copied signal.
        copies = head_copies(n, n2, spec.init, generator)
        plan = residual_plan(D, m, "random" if spec.init == "random" else "zero", "mean", spec.noise, generator)
    else:
        copies = torch.zeros(0, dtype=torch.long)
        plan = residual_plan(D, m, spec.init, "mean", spec.noise, generator)
    counts = copy_sources(n, copies)[1]
    attn = _Heads(n, n2, D // n, m // n2, spec.init, copies, counts, std, spec.noise, generator)
    return plan, attn


def _widen_residual(model, spec: Widen, generator, heads: bool = False) -> LayerChange:
    """Grow ``n_embd`` D -> m (and with it the attention width and ``head_dim``); with ``heads``,
    grow ``n_head`` instead, ``n_embd`` with it by the new heads' dimensions (``head_dim`` kept).
    See the module docstring."""
    base, cfg = _base(model), model.config
    plan, attn = _plans(model, spec, generator, heads)
    tied = model.lm_head.weight is base.wte.weight
    lns = [base.ln_f] + [ln for b in base.h for ln in (b.ln_1, b.ln_2)]
    with torch.no_grad():
        for emb in (base.wte, base.wpe):
            w = emb.weight
            L.replace_param(emb, "weight", plan.write(w, 1, lambda s: L.gaussian(s, attn.std, w, generator)))
            emb.embedding_dim = plan.m
        # ln_f feeds only the tied lm_head, whose copied columns are not divided: ln_f divides instead.
        gain_ok = all([grow_layernorm(ln, plan.src, plan.m, plan.shrink,
                                      1.0 / plan.k if (ln is base.ln_f and tied) else 1.0) for ln in lns])
        for blk in base.h:
            _grow_block_attention(blk.attn, plan, attn, heads, cfg)
            _grow_block_mlp(blk.mlp, plan, attn.std)
        _grow_lm_head(model.lm_head, base, plan, attn.std, tied)
        base.embed_dim = plan.m
    for c in {id(model.config): model.config, id(base.config): base.config}.values():
        c.n_embd = plan.m
        c.n_head = attn.n2
        c.layer_norm_epsilon = c.layer_norm_epsilon * plan.shrink
    if heads:
        return _heads_change(spec, plan, attn, gain_ok)
    return _residual_change(spec, base, plan, attn, gain_ok, tied, len(lns))


def _read(plan: ResidualPlan, w: Tensor, dim: int, std: float) -> Tensor:
    """A reader's weight along the residual dim: copies divided by k, then zero (mean units) or
    N(0, std) (fresh units)."""
    return plan.read(w, dim, lambda s: L.gaussian(s, std, w, plan.generator) if plan.n_fresh else w.new_zeros(s))


def _write(plan: ResidualPlan, t: Tensor, dim: int, std: float) -> Tensor:
    """A writer's weight or bias along the residual dim: copies, mean units, N(0, std) fresh units."""
    return plan.write(t, dim, lambda s: L.gaussian(s, std, t, plan.generator))


def _grow_block_attention(att, plan: ResidualPlan, attn: _Heads, heads: bool, cfg) -> None:
    """Grow one block's attention: ``c_attn`` reads the wider stream and gets the new heads (or
    head dims), ``c_proj`` reads them and writes the wider stream."""
    scaled = getattr(cfg, "scale_attn_weights", True)
    fresh_dims = attn.std if attn.init == "random" else 0.0
    # c_attn (D, 3D): residual rows read, then every head padded to hd2 (q scaled for the new 1/sqrt(hd2))
    if heads:
        w = attn.add(_read(plan, att.c_attn.weight, 0, attn.std), 1, 3, False)
        L.replace_param(att.c_attn, "bias", attn.add(att.c_attn.bias, 0, 3, False))
    else:
        qs = math.sqrt(attn.hd2 / attn.hd) if attn.hd2 != attn.hd and scaled else 1.0
        w = attn.pad(_read(plan, att.c_attn.weight, 0, attn.std), 1, 3, qs, fresh_dims)
        L.replace_param(att.c_attn, "bias", attn.pad(att.c_attn.bias, 0, 3, qs, fresh_dims))
    L.replace_param(att.c_attn, "weight", w)
    att.c_attn.nx, att.c_attn.nf = w.shape
    # attn c_proj (D, D): new head dims' rows zero (fresh for random), residual columns written
    if heads:
        w = attn.add(att.c_proj.weight, 0, 1, True)
    else:
        w = attn.pad(att.c_proj.weight, 0, 1, 1.0, fresh_dims)
    L.replace_param(att.c_proj, "weight", _write(plan, w, 1, attn.std))
    L.replace_param(att.c_proj, "bias", _write(plan, att.c_proj.bias, 0, 0.0))
    att.c_proj.nx, att.c_proj.nf = att.c_proj.weight.shape
    att.embed_dim = att.split_size = plan.m
    att.head_dim = attn.hd2
    att.num_heads = attn.n2
    if scaled:
        att.scaling = att.scaling * math.sqrt(attn.hd / attn.hd2)


def _grow_block_mlp(mlp, plan: ResidualPlan, std: float) -> None:
    """Grow one block's mlp along the residual stream: ``c_fc`` reads it, ``c_proj`` writes it."""
    L.replace_param(mlp.c_fc, "weight", _read(plan, mlp.c_fc.weight, 0, std))
    mlp.c_fc.nx = plan.m
    L.replace_param(mlp.c_proj, "weight", _write(plan, mlp.c_proj.weight, 1, std))
    L.replace_param(mlp.c_proj, "bias", _write(plan, mlp.c_proj.bias, 0, 0.0))
    mlp.c_proj.nf = plan.m


def _grow_lm_head(head, base, plan: ResidualPlan, std: float, tied: bool) -> None:
    """Re-tie ``lm_head`` to the grown ``wte``, or grow an untied one as a reader."""
    if tied:
        head.weight = base.wte.weight
    else:
        L.replace_param(head, "weight", _read(plan, head.weight, 1, std))
    head.in_features = plan.m


def _residual_change(spec: Widen, base, plan: ResidualPlan, attn: _Heads, gain_ok: bool, tied: bool,
                     n_lns: int) -> LayerChange:
    """The LayerChange for growing ``n_embd`` (and ``head_dim``)."""
    hd, hd2, k = attn.hd, attn.hd2, plan.k
    parts = [f"head_dim {hd} -> {hd2} (new q/k/v dims and their c_proj rows zero, q scaled by sqrt({hd2}/{hd}))"]
    if k > 1:
        parts.append(f"every residual unit duplicated {k} times (reader rows divided by {k}"
                     + (", ln_f scaled by 1/k for the tied lm_head" if tied else "") + ")")
    if plan.n_mean:
        parts.append(f"{plan.n_mean} mean units (LayerNorm eps x{plan.shrink:.6g}, gains x its sqrt)")
    exact, note = residual_claim(plan, spec.init, "random: fresh residual units (wte/wpe columns, c_proj columns, "
                                 "c_attn/c_fc rows) and head dims: not preserving", parts, gain_ok)
    blk = base.h[0]
    return LayerChange(
        op="widen", path=spec.target, kind="Embedding", init=spec.init, before=[plan.D], after=[plan.m],
        exact=exact, note=note,
        detail={"n_embd": [plan.D, plan.m], "head_dim": [hd, hd2], "copies": k, "mean_units": plan.n_mean,
                "fresh": plan.n_fresh, "eps_scale": plan.shrink, "tied": tied, "layernorms": n_lns,
                "weights_after": {"wte": _shape(base.wte.weight), "wpe": _shape(base.wpe.weight),
                                  "c_attn": _shape(blk.attn.c_attn.weight),
                                  "attn.c_proj": _shape(blk.attn.c_proj.weight),
                                  "c_fc": _shape(blk.mlp.c_fc.weight),
                                  "mlp.c_proj": _shape(blk.mlp.c_proj.weight)}},
    )


def _heads_change(spec: Widen, plan: ResidualPlan, attn: _Heads, gain_ok: bool) -> LayerChange:
    """The LayerChange for adding heads (``n_embd`` grown by their dimensions)."""
    n, n2, D, m, noise = attn.n, attn.n2, plan.D, plan.m, spec.noise
    if spec.init == "random" and n2 > n:
        exact, note = False, "random: fresh heads (q/k/v columns and c_proj rows) and residual units: not preserving"
    else:
        how = ("copy existing heads (q/k/v columns; each source's c_proj rows divided among its copies)"
               if spec.init == "net2net" else "are fresh (q/k/v columns) with zero c_proj rows")
        exact = gain_ok and not (noise and n2 > n)
        note = (f"{spec.init}: {n2 - n} new heads of head_dim {attn.hd} {how}; n_embd {D} -> {m} by "
                f"{plan.n_mean} mean units (LayerNorm eps x{plan.shrink:.6g}, gains x its sqrt)"
                + ("" if gain_ok else "; a LayerNorm without gain: not preserving")
                + (f"; noise std {noise}: not preserving" if noise and n2 > n else "")
                + (": exact" if exact else ""))
    return LayerChange(
        op="widen", path=spec.target, kind="GPT2Attention", init=spec.init, before=[D, n], after=[m, n2],
        exact=exact, note=note,
        detail={"n_head": [n, n2], "n_embd": [D, m], "head_dim": attn.hd, "sources": [int(i) for i in attn.copies],
                "mean_units": plan.n_mean, "eps_scale": plan.shrink})


# --- depth ----------------------------------------------------------------------------------------

def _conv1ds(block) -> list:
    """Every Conv1D layer of the block."""
    return [m for m in block.modules() if type(m).__name__ == "Conv1D"]


def _projections(block) -> list:
    """The Conv1D layers writing to the residual stream: every attention's and the mlp's c_proj."""
    out = [block.attn.c_proj, block.mlp.c_proj]
    if hasattr(block, "crossattention"):
        out.append(block.crossattention.c_proj)
    return out


def _fresh_block(prev, spec: Deepen, config, n_layer: int, generator):
    """A block shaped like ``prev``: a copy, or fresh as Hugging Face initialises one (the
    residual projections zero for ``zero``, GPT-2's scaled init for ``random``)."""
    block = copy.deepcopy(prev)
    if spec.init != "copy":
        with torch.no_grad():
            _reset_block(block, spec.init, float(getattr(config, "initializer_range", 0.02)), n_layer, generator)
    if spec.noise:
        with torch.no_grad():
            for conv in _conv1ds(block):
                conv.weight.add_(L.gaussian(conv.weight.shape, spec.noise, conv.weight, generator))
    block.train(prev.training)
    return block


def _reset_block(block, init: str, std: float, n_layer: int, generator) -> None:
    """Give ``block`` fresh Conv1D weights N(0, std) and zero biases, LayerNorms at gain 1 / bias 0,
    and its residual projections zero (``zero``) or N(0, std / sqrt(2 * n_layer))."""
    for conv in _conv1ds(block):
        L.replace_param(conv, "weight", L.gaussian(conv.weight.shape, std, conv.weight, generator))
        if conv.bias is not None:
            conv.bias.zero_()
    for conv in _projections(block):
        if init == "zero":
            conv.weight.zero_()
        else:  # GPT-2's scaled init of the residual projections
            conv.weight.copy_(L.gaussian(conv.weight.shape, std / math.sqrt(2 * n_layer), conv.weight, generator))
    for ln in block.modules():
        if isinstance(ln, nn.LayerNorm):
            if ln.weight is not None:
                ln.weight.fill_(1.0)
            if ln.bias is not None:
                ln.bias.zero_()


def _set_layer_idx(blocks, config) -> None:
    """Number every attention by its block's index (the KV cache's ``layer_idx``), rescaling it
    where ``scale_attn_by_inverse_layer_idx`` ties its scale to that index."""
    for i, blk in enumerate(blocks):
        for att in (getattr(blk, "attn", None), getattr(blk, "crossattention", None)):
            if att is None:
                continue
            att.layer_idx = i
            if getattr(config, "scale_attn_by_inverse_layer_idx", False):
                scaling = att.head_dim ** -0.5 if getattr(att, "scale_attn_weights", True) else 1.0
                att.scaling = scaling / float(i + 1)


def _insertion_points(model, spec: Deepen, paths: list) -> list:
    """The block paths ``spec.after`` names; ValueError where inserting there would rescale an
    existing block's attention."""
    hits = L.match_insertion_points(
        model, spec.after, paths,
        not_one=f"a GPT2Block of {type(model).__name__}; blocks can only be inserted after a block",
        listing=f"block of {type(model).__name__}; its blocks are")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and any(h != paths[-1] for h in hits):
        raise ValueError(
            f"Deepen.after={spec.after!r}: config.scale_attn_by_inverse_layer_idx is set, so every block's "
            "attention is scaled by 1 / (layer_idx + 1): inserting blocks before an existing block would renumber "
            f"and rescale it (not preserving, and from_pretrained would do the same); insert after the last "
            f"block ({paths[-1]!r}) only"
        )
    return hits


def deepen_gpt2(model, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec to a GPT-2 in place (it is already a copy): insert ``spec.count``
    blocks after each selected block; see the module docstring. Returns ``(block, LayerChange)``
    pairs; the change's ``after`` is ``[n_embd, n_head]`` and ``detail`` holds the weight shapes."""
    p = _prefix(model)
    refuse_identity(spec, "GPT-2", "a block with zero attn.c_proj and mlp.c_proj")
    old = list(_blocks(model))
    paths = [f"{p}.{name}" for name in _blocks(model)._modules]
    hits = _insertion_points(model, spec, paths)
    config = model.config
    n_layer = len(old) + spec.count * len(hits)
    new_list, added = insert_after(old, paths, hits, spec.count,
                                   lambda prev: _fresh_block(prev, spec, config, n_layer, generator))
    _base(model).h = nn.ModuleList(new_list)
    _set_layer_idx(new_list, config)
    exact, note = deepen_claim(spec.init, spec.noise, "zero: attn.c_proj and mlp.c_proj (weights and biases) are "
                                                      "zero, both residual branches add 0: exact")
    return [(block, LayerChange(
        op="deepen", path="", kind="GPT2Block", init=spec.init, before=[],
        after=[int(block.ln_1.normalized_shape[0]), int(block.attn.num_heads)], exact=exact, note=note,
        detail={"after": after, "block": t, "params": L.n_params(block),
                "n_inner": int(block.mlp.c_fc.weight.shape[1]), "head_dim": int(block.attn.head_dim),
                "weights": {name: _shape(mod.weight) for name, mod in block.named_modules()
                            if type(mod).__name__ == "Conv1D"},
                "index": index},
    )) for block, after, t, index in added]


# --- config, inputs -------------------------------------------------------------------------------

def _finish(model) -> None:
    """Bring the config (shared by the model and its ``transformer``) up to date with the shapes."""
    blocks = _blocks(model)
    configs = {id(model.config): model.config, id(_base(model).config): _base(model).config}
    inner = {int(b.mlp.c_fc.weight.shape[1]) for b in blocks}
    if len(inner) > 1:  # widen_gpt2 refuses this; a guard against hand-edited models
        raise ValueError(f"GPT-2 blocks have different feed-forward widths {sorted(inner)}: GPT2Config.n_inner "
                         "cannot describe them")
    width = next(iter(inner), None)
    for cfg in configs.values():
        cfg.n_layer = len(blocks)
        if width is not None:
            if cfg.n_inner is not None or width != 4 * cfg.n_embd:
                cfg.n_inner = width
        if hasattr(cfg, "layer_types") and getattr(cfg, "layer_types", None) is not None:
            lt = list(cfg.layer_types)
            cfg.layer_types = (lt + [lt[-1]] * len(blocks))[: len(blocks)]


def _default_inputs(model) -> Optional[torch.Tensor]:
    """64 random token sequences of length ``min(n_positions, 16)``, from a fixed seed (a headless
    ``GPT2Model`` is compared on its ``last_hidden_state``)."""
    cfg = model.config
    return L.fixed_seed_tokens(cfg.vocab_size, min(int(cfg.n_positions), 16), _base(model).wte.weight.device)


FAMILY = Family(name="Hugging Face GPT-2", matches=_matches, widen=widen_gpt2, deepen=deepen_gpt2,
                default_inputs=_default_inputs, finish=_finish)
