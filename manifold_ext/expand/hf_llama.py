"""Growth operators for Hugging Face LLaMA models (``LlamaForCausalLM``, ``LlamaModel``).

The family matches by class name and ``type(model).__module__`` (``transformers.*``): this module
never imports ``transformers``. Paths are those of the model: ``model.layers.<i>`` for a
``LlamaForCausalLM``, ``layers.<i>`` for a ``LlamaModel`` (``fnmatch`` globs allowed, e.g.
``"model.layers.*.mlp"``). A decoder layer is pre-norm: ``x + self_attn(input_layernorm(x))``, then
``x + mlp(post_attention_layernorm(x))``, with RMSNorm, SwiGLU ``down(silu(gate(x)) * up(x))`` and
grouped-query attention (``num_key_value_heads`` k/v heads, each shared by
``g = num_attention_heads / num_key_value_heads`` consecutive query heads; rotary embeddings
act within a head, on ``head_dim``, which never changes here).

* ``Widen("model.layers.<i>.mlp", factor|size)``: the feed-forward width (``intermediate_size``,
  counted in units). Hidden unit ``j`` contributes ``down[:, j] * silu(gate_j(x)) * up_j(x)``, so:
  ``net2net``: new units copy existing ones (their ``gate_proj`` and ``up_proj`` rows, and biases),
  drawn at random without replacement in rounds (``_units.plan_new_units``, copy counts differ
  by at most one); each source's ``down_proj`` column is divided by its number of copies
  (itself included): every copy computes the same product, so the sum is unchanged: exact.
  ``zero``: fresh ``gate``/``up`` rows (``nn.Linear``'s default init, fan-in = hidden size), zero
  ``down_proj`` columns: exact. ``random``: fresh ``down_proj`` columns too: not preserving.
* ``Widen("model.layers.<i>.self_attn", size|factor)``: the number of *query* heads, with
  ``head_dim`` and the group size ``g`` fixed: heads grow by whole key-value groups (a new k/v
  head and its ``g`` query heads, appended after the existing ones), so the new number of heads
  must be a multiple of ``g`` (else ValueError); ``num_key_value_heads`` becomes ``heads / g``.
  ``LlamaConfig`` also requires ``hidden_size % num_attention_heads == 0`` (its
  ``validate_architecture``; ``from_pretrained`` fails otherwise), so a head count that does not
  divide the hidden size is refused (ValueError). ``zero``: fresh q/k/v rows, zero ``o_proj``
  columns: exact. ``net2net``: new groups copy existing groups (their k, v and g q heads' rows),
  drawn in rounds as above; each copied query head's ``o_proj`` columns are divided by its
  group's copy count: exact (a copied head attends exactly as its source). ``random``: fresh
  ``o_proj`` columns: not preserving.
* ``Deepen(after="model.layers.<i>", count, init)``: inserts decoder layers after layer ``i`` (the
  ``nn.ModuleList`` is renumbered; every layer's ``self_attn.layer_idx``, used by the KV cache, is
  reset to its index, and ``config.layer_types`` is extended where the config has one). ``zero``:
  a fresh layer (q/k/v/gate/up ~ N(0, initializer_range) as Hugging Face initialises them, RMSNorm
  weights 1) whose ``o_proj`` and ``down_proj`` (and biases) are zero: both residual branches add
  0: exact. ``random``: the same without the zeros: not preserving. ``copy``: a copy of layer
  ``i`` (stacking): not preserving. ``identity``: refused (use ``zero``).

``noise > 0`` adds N(0, noise^2) to the new weights (new rows and columns; every weight matrix of a
new layer) and makes the change non-preserving.

The config (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``num_hidden_layers``, ``head_dim``) is brought up to date after every spec (``finish``), so the
grown model saves with ``save_pretrained``, reloads with ``from_pretrained`` and generates. These
are single numbers in ``LlamaConfig``: a width spec must select *every* layer (a glob such as
``"model.layers.*.mlp"``), else it is refused with a ValueError, since a model whose layers differ
in width cannot be described by its config (it would not reload).

* ``Widen("model.embed_tokens", factor|size)`` (exact path only; globs do not select it; ``embed_tokens``
  for a ``LlamaModel``): the residual width ``hidden_size`` D -> m (``head_dim`` and the heads are
  kept; m must be a multiple of ``num_attention_heads``, which ``LlamaConfig`` requires, else
  ValueError). Writers of the stream (``embed_tokens`` columns, ``o_proj``/``down_proj`` rows),
  every RMSNorm (both per layer and the final ``norm``) and readers (q/k/v/gate/up and ``lm_head``
  columns) grow together; ``config.hidden_size`` and ``config.rms_norm_eps`` follow.
  RMSNorm divides by ``sqrt(mean(x^2) + eps)`` over the hidden units, so plain zero padding is
  *not* exact: the mean of squares shrinks by ``D/m`` and every norm's output grows by about
  ``sqrt(m/D)``. Since the shrink is a constant (RMSNorm subtracts no mean, unlike LayerNorm),
  multiplying every ``eps`` by ``s = k*D/m`` and every gain by ``sqrt(s)`` undoes it exactly:
  ``zero``: ``m - D`` zero units (zero embedding columns and writer rows, so they stay 0 in the
  stream; RMSNorm gain 1; reader columns fresh N(0, initializer_range): they read 0, so exact, and
  give the writers a gradient): exact, tied embeddings included. ``net2net``: ``m = k*D + r``:
  every unit copied ``k`` times (writers copied, readers' columns divided by ``k``; the mean of
  squares over the copies is unchanged) plus ``r`` zero units as above: exact; refused for tied
  embeddings when ``k > 1`` (the tied ``lm_head`` columns would have to be divided while the
  embedding columns are copied; use ``zero``). ``random``: fresh units everywhere, eps and
  gains unchanged: not preserving.

For a ``LlamaModel`` (no LM head) ``report.preservation_error`` compares ``last_hidden_state``.

"Exact" means equal up to float rounding (the grown model sums in another order):
tests/test_expand_llama.py checks 1e-5 on the logits and the LM loss in float32, with tied and
untied embeddings and random RMSNorm weights.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import _layers as L
from ._claims import deepen_claim, width_claim
from ._insert import insert_after, refuse_identity
from ._residual import ResidualPlan, residual_claim, residual_plan
from ._units import (append_head_rows, copy_sources, grow_head_columns, grow_inputs, grow_outputs, head_copies,
                     plan_new_units)
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen

_CLASSES = ("LlamaForCausalLM", "LlamaModel")


def _matches(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face LLaMA (by class name and module, without importing transformers)."""
    t = type(model)
    return t.__name__ in _CLASSES and t.__module__.startswith("transformers.")


def _base(model: nn.Module) -> Tuple[nn.Module, str]:
    """The ``LlamaModel`` holding the layers, and the path prefix of its layers."""
    if type(model).__name__ == "LlamaModel":
        return model, "layers"
    return model.model, "model.layers"


def _configs(model: nn.Module) -> list:
    """Every distinct config object the model and its submodules hold (normally one, shared)."""
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "num_hidden_layers"):
            seen.add(id(c))
            out.append(c)
    return out


def _widenable(prefix: str, n: int) -> List[Tuple[str, str]]:
    """The widenable ``(path, kind)`` pairs: every layer's ``mlp`` ("mlp") and ``self_attn`` ("heads")."""
    out = []
    for i in range(n):
        out += [(f"{prefix}.{i}.mlp", "mlp"), (f"{prefix}.{i}.self_attn", "heads")]
    return out


WHAT = ("<layers>.<i>.mlp (feed-forward units: intermediate_size), <layers>.<i>.self_attn (query heads, "
        "grown by whole key-value groups), and by exact path only: embed_tokens (the residual width, hidden_size)")


def _shapes(**mods) -> dict:
    """``{name: weight shape}`` of the named modules."""
    return {k: list(m.weight.shape) for k, m in mods.items()}


def widen_llama(model: nn.Module, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec in place (the model is already a copy); ``(module, LayerChange)``
    pairs, the module being the ``mlp`` or ``self_attn`` grown."""
    base, prefix = _base(model)
    emb_path = prefix[: -len("layers")] + "embed_tokens"
    if spec.target == emb_path:
        return [(base.embed_tokens, _widen_residual(model, emb_path, spec, generator))]
    layers = list(base.layers)
    hits = L.select_widen_targets(model, spec, _widenable(prefix, len(layers)), WHAT)
    what = _selected_kind(spec, hits, len(layers), prefix)
    out = []
    for path, _ in hits:
        layer = layers[int(path.split(".")[-2])]
        if what == "mlp":
            out.append((layer.mlp, _widen_mlp(path, layer.mlp, spec, generator)))
        else:
            out.append((layer.self_attn, _add_heads(path, layer.self_attn, spec, generator)))
    return out


def _selected_kind(spec: Widen, hits, n_layers: int, prefix: str) -> str:
    """What the hits widen ("mlp" or "heads"); ValueError unless they are one kind in every layer
    (the config holds one width for all layers, else the model would not reload)."""
    kinds = {w for _, w in hits}
    if len(kinds) > 1:
        raise ValueError(f"Widen.target={spec.target!r} selects both feed-forward and attention modules; "
                         f"widen '{prefix}.*.mlp' and '{prefix}.*.self_attn' in separate specs")
    what = kinds.pop()
    if len(hits) != n_layers:
        field = "intermediate_size" if what == "mlp" else "num_attention_heads"
        raise ValueError(
            f"Widen.target={spec.target!r} selects {len(hits)} of the {n_layers} decoder layers; LlamaConfig.{field} "
            f"is one number for all layers, so a model whose layers differ in width could not be saved and reloaded: "
            f"widen every layer at once ('{prefix}.*.{'mlp' if what == 'mlp' else 'self_attn'}')"
        )
    return what


# --- feed-forward width ---------------------------------------------------------------------------

def _widen_mlp(path: str, mlp: nn.Module, spec: Widen, generator) -> LayerChange:
    """Grow a SwiGLU feed-forward width (``gate_proj``/``up_proj`` rows, ``down_proj`` columns)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    n, D = gate.out_features, gate.in_features
    m = spec.new_width(path, "LlamaMLP", n)
    before = _shapes(gate_proj=gate, up_proj=up, down_proj=down)
    copies, _, n_fresh = plan_new_units(n, m, spec.init, False, generator)
    src, counts = copy_sources(n, copies)
    sidx = src.to(gate.weight.device)
    with torch.no_grad():
        for lin in (gate, up):
            bias = None if lin.bias is None else lin.bias.detach()
            L.resize_linear(lin, *grow_outputs(lin.weight.detach(), bias, sidx, 0, n_fresh, spec.noise, generator))
        # Each copy computes the same silu(gate) * up product: its down_proj column shares the source's.
        new_wd = grow_inputs(down.weight.detach(), sidx, counts, n_fresh, spec.init, spec.noise, generator)
        L.resize_linear(down, new_wd, down.bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = m
    exact, note = width_claim(
        spec.init, spec.noise, "random: fresh gate/up rows and down_proj columns: not preserving",
        "net2net: new units copy gate_proj and up_proj rows, each source's down_proj column divided among its "
        "copies (each copy computes the same silu(gate)*up product): exact",
        "zero: fresh gate/up rows, zero down_proj columns: exact", grew=m > n)
    return LayerChange(
        op="widen", path=path, kind="LlamaMLP", init=spec.init, before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"intermediate_size": [n, m], "copied": int(len(copies)), "fresh": int(n_fresh),
                "weights_before": before, "weights_after": _shapes(gate_proj=gate, up_proj=up, down_proj=down)},
    )


# --- attention heads ------------------------------------------------------------------------------

def _head_counts(path: str, attn: nn.Module, spec: Widen) -> Tuple[int, int, int, int]:
    """``(n, kv, g, m)``: query heads, key-value heads, group size and the new number of query
    heads; ValueError unless m is whole groups and divides the hidden size."""
    hd, D = attn.head_dim, attn.q_proj.in_features
    n = attn.q_proj.out_features // hd
    kv = attn.k_proj.out_features // hd
    g = n // kv
    m = spec.new_width(path, "attention heads", n)
    if m % g:
        raise ValueError(
            f"Widen({path!r}): grouped-query attention with {n} query heads and {kv} key-value heads (groups of "
            f"{g} query heads): heads grow by whole key-value groups, so the new number of heads must be a multiple "
            f"of {g}, got {m}"
        )
    if D % m:
        raise ValueError(
            f"Widen({path!r}): LlamaConfig requires hidden_size ({D}) to be a multiple of num_attention_heads "
            f"(its validate_architecture; from_pretrained would fail), got {m} heads"
        )
    return n, kv, g, m


def _add_heads(path: str, attn: nn.Module, spec: Widen, generator) -> LayerChange:
    """Grow the query heads by whole key-value groups (``head_dim`` and the group size kept)."""
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    hd, D = attn.head_dim, q.in_features
    n, kv, g, m = _head_counts(path, attn, spec)
    kv_new = m // g
    before = _shapes(q_proj=q, k_proj=k, v_proj=v, o_proj=o)
    copies = head_copies(kv, kv_new, spec.init, generator)
    gsrc, counts = copy_sources(kv, copies)  # the source group of every group
    dev = q.weight.device
    gidx = gsrc.to(dev)
    hsrc = (gsrc.repeat_interleave(g) * g + torch.arange(len(gsrc) * g) % g).to(dev)  # source of each q head
    with torch.no_grad():
        for lin, heads, idx in ((q, m, hsrc), (k, kv_new, gidx), (v, kv_new, gidx)):
            bias = None if lin.bias is None else lin.bias.detach()
            L.resize_linear(lin, *append_head_rows(lin.weight.detach(), bias, idx, heads, hd, spec.init, spec.noise,
                                                   generator))
        wo = o.weight.detach()
        # A copied q head attends exactly as its source: its o_proj columns share the source's.
        head_counts = counts.to(dev, wo.dtype)[gidx].repeat_interleave(g)
        L.resize_linear(o, grow_head_columns(wo, hsrc, head_counts, m, hd, spec.init, spec.noise, generator), o.bias)
    for name, val in (("num_heads", m), ("num_key_value_heads", kv_new)):
        if hasattr(attn, name):
            setattr(attn, name, val)
    attn.num_key_value_groups = g
    exact, note = width_claim(
        spec.init, spec.noise, "random new heads (fresh o_proj columns): not preserving",
        f"net2net: new key-value groups copy existing ones (k, v and their {g} q heads), each copied q head's "
        "o_proj columns divided among its copies: exact",
        "zero: new heads' o_proj columns are zero: exact", grew=m > n)
    return LayerChange(
        op="widen", path=path, kind="Attention", init=spec.init, before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"heads_before": n, "heads_after": m, "kv_heads_before": kv, "kv_heads_after": kv_new,
                "group_size": g, "head_dim": hd, "copied_groups": [int(i) for i in copies],
                "fresh_groups": 0 if spec.init == "net2net" else kv_new - kv,
                "weights_before": before, "weights_after": _shapes(q_proj=q, k_proj=k, v_proj=v, o_proj=o)},
    )


# --- residual width -------------------------------------------------------------------------------

def _residual_plan(model: nn.Module, path: str, spec: Widen, generator) -> ResidualPlan:
    """The plan for ``hidden_size`` D -> m (copies, then zero or fresh units); ValueError for a
    width the config refuses, or net2net copies a tied embedding cannot take."""
    base, _ = _base(model)
    emb = base.embed_tokens
    D = emb.embedding_dim
    m = spec.new_width(path, "Embedding", D)
    heads = base.config.num_attention_heads
    if m % heads:
        raise ValueError(
            f"Widen({path!r}): LlamaConfig requires hidden_size to be a multiple of num_attention_heads ({heads}) "
            f"(its validate_architecture; from_pretrained would fail), got {m}"
        )
    head = getattr(model, "lm_head", None)
    if spec.init == "net2net" and m // D > 1 and head is not None and head.weight is emb.weight:
        raise ValueError(
            f"Widen({path!r}, init='net2net'): the embedding is tied to lm_head (tie_word_embeddings): net2net "
            "copies embedding columns but must divide lm_head's columns by the number of copies, which a tied "
            "weight cannot do; use init='zero' (exact) or untie the embeddings"
        )
    # Zero units keep the stream's sum of squares, so RMSNorm's mean of squares shrinks by exactly k*D/m.
    return residual_plan(D, m, spec.init, "zero", spec.noise, generator)


def _widen_residual(model: nn.Module, path: str, spec: Widen, generator) -> LayerChange:
    """Grow the residual width ``hidden_size`` D to m, see the module docstring."""
    base, _ = _base(model)
    plan = _residual_plan(model, path, spec, generator)
    emb = base.embed_tokens
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is emb.weight
    std = float(getattr(base.config, "initializer_range", 0.02))
    layers = list(base.layers)
    norms = [base.norm] + [nm for layer in layers for nm in (layer.input_layernorm, layer.post_attention_layernorm)]
    writers = [lin for layer in layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    readers = [lin for layer in layers for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                    layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
    if head is not None and not tied:
        readers.append(head)
    with torch.no_grad():
        L.replace_param(emb, "weight", plan.write(emb.weight, 1, lambda sh: L.gaussian(sh, std, emb.weight,
                                                                                          plan.generator)))
        emb.embedding_dim = plan.m
        for nm in norms:
            _grow_rmsnorm(nm, plan)
        _grow_writers(writers, plan, std)
        for lin in readers:
            w = lin.weight.detach()
            # Zero units read 0 (after any RMSNorm): fresh columns keep it exact and give their writers a gradient.
            L.resize_linear(lin, plan.read(w, 1, lambda sh: L.gaussian(sh, std, w, plan.generator)), lin.bias)
        if tied:
            head.weight = emb.weight
            head.in_features = plan.m
    _set_hidden_size(model, layers, plan)
    exact, note = _residual_claim(plan, spec.init)
    return LayerChange(
        op="widen", path=path, kind="Embedding", init=spec.init, before=[plan.D], after=[plan.m], exact=exact,
        note=note,
        detail={"hidden_size": [plan.D, plan.m], "copies": plan.k, "zero_units": plan.n_zero, "fresh": plan.n_fresh,
                "eps_scale": plan.shrink, "tied": tied, "rmsnorms": len(norms), "writers": len(writers) + 1,
                "readers": len(readers) + int(tied)},
    )


def _grow_rmsnorm(nm: nn.Module, plan: ResidualPlan) -> None:
    """Grow an RMSNorm: copied gains times ``sqrt(shrink)``, new gains 1, eps times ``shrink``."""
    w = nm.weight.detach()
    L.replace_param(nm, "weight", torch.cat([w[plan.src.to(w.device)] * plan.shrink ** 0.5, w.new_ones(plan.extra)]))
    nm.variance_epsilon = nm.variance_epsilon * plan.shrink


def _grow_writers(writers, plan: ResidualPlan, std: float) -> None:
    """Grow the output rows of ``o_proj``/``down_proj`` (fresh ones N(0, std)) and their biases."""
    for lin in writers:
        w, b = lin.weight, lin.bias
        new_b = None if b is None else plan.write(b, 0, lambda sh: b.new_zeros(sh))
        L.resize_linear(lin, plan.write(w, 0, lambda sh: L.gaussian(sh, std, w, plan.generator)), new_b)


def _set_hidden_size(model: nn.Module, layers, plan: ResidualPlan) -> None:
    """Record the new hidden size on the layers, their mlps and every config; eps follows the shrink."""
    for layer in layers:
        if hasattr(layer, "hidden_size"):
            layer.hidden_size = plan.m
        if hasattr(layer.mlp, "hidden_size"):
            layer.mlp.hidden_size = plan.m
    for c in _configs(model):
        c.hidden_size = plan.m
        c.rms_norm_eps = c.rms_norm_eps * plan.shrink


def _residual_claim(plan: ResidualPlan, init: str):
    """Whether the residual widening preserves the function, and why."""
    parts = []
    if plan.k > 1:
        parts.append(f"every residual unit duplicated {plan.k} times (reader columns divided by {plan.k})")
    if plan.n_zero:
        parts.append(f"{plan.n_zero} zero units (zero embedding columns and o_proj/down_proj rows; fresh reader "
                     "columns)")
    if plan.shrink != 1.0:
        parts.append(f"RMSNorm eps x{plan.shrink:.6g} and gains x sqrt of that")
    return residual_claim(plan, init, "random: fresh residual units (embedding columns, writer rows, reader "
                          "columns): not preserving", parts)


# --- depth ---------------------------------------------------------------------------------------

def _new_layer(prev: nn.Module, spec: Deepen, config, generator) -> nn.Module:
    """A decoder layer shaped like ``prev``: a copy, or fresh (``o_proj``/``down_proj`` zero for ``zero``)."""
    # Share the model's config (deepcopy would give the new layer its own, stale copy).
    memo = {id(c): c for c in {id(getattr(mm, "config", None)): getattr(mm, "config", None)
                               for mm in prev.modules()}.values() if c is not None}
    memo[id(config)] = config
    layer = copy.deepcopy(prev, memo)
    a, f = layer.self_attn, layer.mlp
    lins = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)
    with torch.no_grad():
        if spec.init != "copy":
            std = float(getattr(config, "initializer_range", 0.02))
            for lin in lins:
                lin.weight.copy_(L.gaussian(lin.weight.shape, std, lin.weight, generator))
                if lin.bias is not None:
                    lin.bias.zero_()
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.fill_(1.0)
            if spec.init == "zero":
                for lin in (a.o_proj, f.down_proj):
                    lin.weight.zero_()
        if spec.noise:
            for lin in lins:
                lin.weight.add_(L.gaussian(lin.weight.shape, spec.noise, lin.weight, generator))
    layer.train(prev.training)
    return layer


def deepen_llama(model: nn.Module, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Insert ``spec.count`` decoder layers after each selected layer, see the module docstring."""
    refuse_identity(spec, "a LLaMA decoder", "a decoder layer with zero o_proj and down_proj")
    base, prefix = _base(model)
    old = list(base.layers)
    paths = [f"{prefix}.{i}" for i in range(len(old))]
    hits = L.match_insertion_points(
        model, spec.after, paths,
        not_one="a LlamaDecoderLayer; layers can only be inserted after a decoder layer",
        listing="decoder layer of the LLaMA model; its layers are")
    config = base.config
    new_list, added = insert_after(old, paths, hits, spec.count, lambda prev: _new_layer(prev, spec, config,
                                                                                         generator))
    base.layers = nn.ModuleList(new_list)
    for j, layer in enumerate(new_list):
        layer.self_attn.layer_idx = j
    types = getattr(config, "layer_types", None)
    if types is not None:
        # A new layer takes the type of the layer it follows.
        new_types = [types[i] for i, p in enumerate(paths) for _ in range(1 + spec.count * (p in hits))]
        for c in _configs(model):
            c.layer_types = list(new_types)
    exact, note = deepen_claim(spec.init, spec.noise,
                               "zero: o_proj and down_proj are zero, both residual branches add 0: exact", "layer")
    return [(layer, _layer_change(prefix, layer, spec, after, t, index, exact, note))
            for layer, after, t, index in added]


def _layer_change(prefix: str, layer: nn.Module, spec: Deepen, after: str, t: int, index: int, exact: bool,
                  note: str) -> LayerChange:
    """The LayerChange for a new decoder layer at ``index``."""
    a = layer.self_attn
    return LayerChange(
        op="deepen", path=f"{prefix}.{index}", kind="LlamaDecoderLayer", init=spec.init, before=[],
        after=[a.q_proj.in_features, a.q_proj.out_features // a.head_dim], exact=exact, note=note,
        detail={"after": after, "layer": t, "params": L.n_params(layer),
                "intermediate_size": layer.mlp.gate_proj.out_features, "head_dim": a.head_dim,
                "kv_heads": a.k_proj.out_features // a.head_dim, "index": index},
    )


def finish_llama(model: nn.Module) -> None:
    """Bring the config(s) up to date with the layers' shapes (after every spec)."""
    base, _ = _base(model)
    layers = list(base.layers)
    a0 = layers[0].self_attn
    hd = a0.head_dim
    sizes = {(l.mlp.gate_proj.out_features, l.self_attn.q_proj.out_features // hd,
              l.self_attn.k_proj.out_features // hd) for l in layers}
    if len(sizes) != 1:
        raise ValueError(f"LLaMA layers differ in (intermediate_size, heads, kv_heads): {sorted(sizes)}; "
                         "LlamaConfig holds one value of each")
    inter, heads, kv = sizes.pop()
    for c in _configs(model):
        c.intermediate_size = inter
        c.num_attention_heads = heads
        c.num_key_value_heads = kv
        c.num_hidden_layers = len(layers)
        c.head_dim = hd


def _default_inputs(model: nn.Module) -> Optional[torch.Tensor]:
    """Random token ids, 64 x min(max_position_embeddings, 16), from a fixed seed (a headless
    ``LlamaModel`` is compared on its ``last_hidden_state``)."""
    base, _ = _base(model)
    cfg = base.config
    return L.fixed_seed_tokens(cfg.vocab_size, min(int(cfg.max_position_embeddings), 16),
                               base.embed_tokens.weight.device)


FAMILY = Family(name="Hugging Face LLaMA", matches=_matches, widen=widen_llama, deepen=deepen_llama,
                default_inputs=_default_inputs, finish=finish_llama)
