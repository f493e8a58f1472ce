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
  drawn at random without replacement in rounds (``width._plan``, copy counts differ by at most
  one); each source's ``down_proj`` column is divided by its number of copies (itself
  included): every copy computes the same product, so the sum is unchanged: exact.
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
  ``sqrt(m/D)`` (measured max logit error 0.27 to 0.33 at factor 2 on the test configs). Since
  the shrink is a constant (RMSNorm subtracts no mean, unlike LayerNorm), multiplying every
  ``eps`` by ``s = k*D/m`` and every gain by ``sqrt(s)`` undoes it exactly:
  ``zero``: ``m - D`` zero units (zero embedding columns and writer rows, so they stay 0 in the
  stream; RMSNorm gain 1; reader columns fresh N(0, initializer_range): they read 0, so exact, and
  give the writers a gradient): exact, tied embeddings included. ``net2net``: ``m = k*D + r``:
  every unit copied ``k`` times (writers copied, readers' columns divided by ``k``; the mean of
  squares over the copies is unchanged) plus ``r`` zero units as above: exact; refused for tied
  embeddings when ``k > 1`` (the tied ``lm_head`` columns would have to be divided while the
  embedding columns are copied; use ``zero``). ``random``: fresh units everywhere, eps and
  gains unchanged: not preserving.

For a ``LlamaModel`` (no LM head) ``report.preservation_error`` compares ``last_hidden_state``.

Measured max errors (float32, eval, 30 random models: 3 configs (width/heads/kv 32/4/2 untied,
24/6/2 tied, 32/4/1 tied, 2-3 layers) x 10 seeds, random RMSNorm weights, 64 x 16 token ids),
logits / LM loss: ff net2net (x1.5, x2) 2.4e-7 / 4.8e-7; ff zero 0 / 0; heads net2net 3.0e-7 /
4.8e-7; heads zero 0 / 0; deepen zero 0 / 0; residual (5 seeds) zero 3.0e-7 / 4.8e-7, net2net
(x2, x3, 2D + heads) 2.4e-7 / 0. Not preserving: ff random 1.1 / 0.014, heads random 1.4 / 0.012,
deepen copy 0.36 / 0.0024, residual random 0.91 / 0.021. tests/test_expand_llama.py checks 1e-5.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import _layers as L
from .registry import Family
from .report import LayerChange
from .specs import Deepen, Widen
from .width import _plan

_CLASSES = ("LlamaForCausalLM", "LlamaModel")


def _matches(model: nn.Module) -> bool:
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
    out = []
    for i in range(n):
        out += [(f"{prefix}.{i}.mlp", "mlp"), (f"{prefix}.{i}.self_attn", "heads")]
    return out


WHAT = ("<layers>.<i>.mlp (feed-forward units: intermediate_size), <layers>.<i>.self_attn (query heads, "
        "grown by whole key-value groups), and by exact path only: embed_tokens (the residual width, hidden_size)")


def _select(model, spec: Widen, cands) -> List[Tuple[str, str]]:
    paths = [p for p, _ in cands]
    hits = [c for c in cands if c[0] == spec.target] or [c for c in cands if fnmatch.fnmatchcase(c[0], spec.target)]
    if hits:
        return hits
    mods = dict(model.named_modules())
    if spec.target in mods:
        raise TypeError(
            f"Widen.target={spec.target!r}: module {spec.target!r} ({L.kind(mods[spec.target])}) cannot be widened on "
            f"{type(model).__name__}; widenable: {WHAT}: {paths}"
        )
    raise ValueError(f"Widen.target={spec.target!r} matches no widenable module of {type(model).__name__}; "
                     f"widenable: {WHAT}: {paths}")


def _shapes(**mods) -> dict:
    return {k: list(m.weight.shape) for k, m in mods.items()}


def widen_llama(model: nn.Module, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec in place (the model is already a copy); ``(module, LayerChange)``
    pairs, the module being the ``mlp`` or ``self_attn`` grown."""
    base, prefix = _base(model)
    emb_path = prefix[: -len("layers")] + "embed_tokens"
    if spec.target == emb_path:
        return [(base.embed_tokens, _widen_residual(model, emb_path, spec, generator))]
    layers = list(base.layers)
    hits = _select(model, spec, _widenable(prefix, len(layers)))
    kinds = {w for _, w in hits}
    if len(kinds) > 1:
        raise ValueError(f"Widen.target={spec.target!r} selects both feed-forward and attention modules; "
                         f"widen '{prefix}.*.mlp' and '{prefix}.*.self_attn' in separate specs")
    what = kinds.pop()
    if len(hits) != len(layers):
        field = "intermediate_size" if what == "mlp" else "num_attention_heads"
        raise ValueError(
            f"Widen.target={spec.target!r} selects {len(hits)} of the {len(layers)} decoder layers; LlamaConfig.{field} "
            f"is one number for all layers, so a model whose layers differ in width could not be saved and reloaded: "
            f"widen every layer at once ('{prefix}.*.{'mlp' if what == 'mlp' else 'self_attn'}')"
        )
    out = []
    for path, _ in hits:
        layer = layers[int(path.split(".")[-2])]
        if what == "mlp":
            out.append((layer.mlp, _widen_mlp(path, layer.mlp, spec, generator)))
        else:
            out.append((layer.self_attn, _add_heads(path, layer.self_attn, spec, generator)))
    return out


def _widen_mlp(path: str, mlp: nn.Module, spec: Widen, generator) -> LayerChange:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    n, D = gate.out_features, gate.in_features
    m = spec.new_width(path, "LlamaMLP", n)
    before = _shapes(gate_proj=gate, up_proj=up, down_proj=down)
    copies, _, n_fresh = _plan(n, m, spec.init, False, generator)
    src = torch.cat([torch.arange(n), copies])
    counts = torch.bincount(src, minlength=n)
    dev = gate.weight.device
    sidx = src.to(dev)
    bound = L.fresh_bound(D)
    with torch.no_grad():
        for lin in (gate, up):
            w = lin.weight.detach()
            new_w = torch.cat([w[sidx], L.uniform((n_fresh, D), bound, w, generator)])
            if spec.noise:
                new_w[n:] += L.gaussian((m - n, D), spec.noise, w, generator)
            new_b = None
            if lin.bias is not None:
                b = lin.bias.detach()
                new_b = torch.cat([b[sidx], L.uniform((n_fresh,), bound, b, generator)])
            L.resize_linear(lin, new_w, new_b)
        wd = down.weight.detach()
        cols = [wd[:, sidx] / counts.to(dev, wd.dtype)[sidx]]
        if spec.init == "random":
            cols.append(L.uniform((wd.shape[0], n_fresh), L.fresh_bound(m), wd, generator))
        else:
            cols.append(wd.new_zeros(wd.shape[0], n_fresh))
        new_wd = torch.cat(cols, 1)
        if spec.noise:
            new_wd[:, n:] += L.gaussian((wd.shape[0], m - n), spec.noise, wd, generator)
        L.resize_linear(down, new_wd, down.bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = m
    if spec.init == "random" and m > n:
        exact, note = False, "random: fresh gate/up rows and down_proj columns: not preserving"
    elif spec.init == "net2net":
        exact, note = True, ("net2net: new units copy gate_proj and up_proj rows, each source's down_proj column "
                             "divided among its copies (each copy computes the same silu(gate)*up product): exact")
    else:
        exact, note = True, "zero: fresh gate/up rows, zero down_proj columns: exact"
    if spec.noise and m > n:
        exact, note = False, note + f"; noise std {spec.noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="LlamaMLP", init=spec.init, before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"intermediate_size": [n, m], "copied": int(len(copies)), "fresh": int(n_fresh),
                "weights_before": before, "weights_after": _shapes(gate_proj=gate, up_proj=up, down_proj=down)},
    )


def _add_heads(path: str, attn: nn.Module, spec: Widen, generator) -> LayerChange:
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    hd = attn.head_dim
    D = q.in_features
    n = q.out_features // hd
    kv = k.out_features // hd
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
    kv_new = m // g
    before = _shapes(q_proj=q, k_proj=k, v_proj=v, o_proj=o)
    if spec.init == "net2net":
        copies, _, _ = _plan(kv, kv_new, "net2net", False, generator)
        gsrc = torch.cat([torch.arange(kv), copies])
    else:
        copies, gsrc = torch.zeros(0, dtype=torch.long), torch.arange(kv)
    counts = torch.bincount(gsrc, minlength=kv)
    dev = q.weight.device
    gidx = gsrc.to(dev)
    hsrc = (gsrc.repeat_interleave(g) * g + torch.arange(len(gsrc) * g) % g).to(dev)  # source of each q head
    bound = L.fresh_bound(D)
    with torch.no_grad():
        for lin, heads, idx in ((q, m, hsrc), (k, kv_new, gidx), (v, kv_new, gidx)):
            w = lin.weight.detach()
            old = w.shape[0] // hd
            extra = (heads - old) * hd
            if spec.init == "net2net":
                new_w = w.reshape(old, hd, D)[idx[old:]].reshape(extra, D).clone()
            else:
                new_w = L.uniform((extra, D), bound, w, generator)
            if spec.noise:
                new_w += L.gaussian(new_w.shape, spec.noise, w, generator)
            new_b = None
            if lin.bias is not None:
                b = lin.bias.detach()
                nb = b.reshape(old, hd)[idx[old:]].reshape(extra) if spec.init == "net2net" else \
                    L.uniform((extra,), bound, b, generator)
                new_b = torch.cat([b, nb])
            L.resize_linear(lin, torch.cat([w, new_w]), new_b)
        wo = o.weight.detach()
        extra = (m - n) * hd
        if spec.init == "net2net":
            scale = counts.to(dev, wo.dtype)[gidx].repeat_interleave(g).view(1, -1, 1)
            full = (wo.reshape(wo.shape[0], n, hd)[:, hsrc] / scale).reshape(wo.shape[0], m * hd)
            old_cols, cols = full[:, : n * hd], full[:, n * hd:].clone()
        else:
            old_cols = wo
            cols = (L.uniform((wo.shape[0], extra), L.fresh_bound(m * hd), wo, generator) if spec.init == "random"
                    else wo.new_zeros(wo.shape[0], extra))
        if spec.noise:
            cols = cols + L.gaussian(cols.shape, spec.noise, wo, generator)
        L.resize_linear(o, torch.cat([old_cols, cols], 1), o.bias)
    for name, val in (("num_heads", m), ("num_key_value_heads", kv_new)):
        if hasattr(attn, name):
            setattr(attn, name, val)
    attn.num_key_value_groups = g
    if spec.init == "random" and m > n:
        exact, note = False, "random new heads (fresh o_proj columns): not preserving"
    elif spec.init == "net2net":
        exact, note = True, (f"net2net: new key-value groups copy existing ones (k, v and their {g} q heads), each "
                             "copied q head's o_proj columns divided among its copies: exact")
    else:
        exact, note = True, "zero: new heads' o_proj columns are zero: exact"
    if spec.noise and m > n:
        exact, note = False, note + f"; noise std {spec.noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Attention", init=spec.init, before=[D, n], after=[D, m], exact=exact, note=note,
        detail={"heads_before": n, "heads_after": m, "kv_heads_before": kv, "kv_heads_after": kv_new,
                "group_size": g, "head_dim": hd, "copied_groups": [int(i) for i in copies],
                "fresh_groups": 0 if spec.init == "net2net" else kv_new - kv,
                "weights_before": before, "weights_after": _shapes(q_proj=q, k_proj=k, v_proj=v, o_proj=o)},
    )


def _widen_residual(model: nn.Module, path: str, spec: Widen, generator) -> LayerChange:
    """Grow the residual width ``hidden_size`` D to m, see the module docstring."""
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
    tied = head is not None and head.weight is emb.weight
    if spec.init == "net2net":
        k = m // D
        if tied and k > 1:
            raise ValueError(
                f"Widen({path!r}, init='net2net'): the embedding is tied to lm_head (tie_word_embeddings): net2net "
                "copies embedding columns but must divide lm_head's columns by the number of copies, which a tied "
                "weight cannot do; use init='zero' (exact) or untie the embeddings"
            )
    else:
        k = 1
    n_zero = m - k * D if spec.init != "random" else 0
    n_fresh = m - k * D if spec.init == "random" else 0
    src = torch.arange(k * D) % D
    # Copies repeat the mean of squares, zero units add nothing to it: it shrinks by exactly k*D/m.
    shrink = (k * D) / m if spec.init != "random" else 1.0
    std = float(getattr(base.config, "initializer_range", 0.02))
    noise = spec.noise

    def grow(t, dim, fresh):
        t = t.detach()
        parts = [t.index_select(dim, src.to(t.device))]
        shape = list(t.shape)
        shape[dim] = m - k * D
        parts.append(fresh(tuple(shape)) if n_fresh else t.new_zeros(shape))
        out = torch.cat(parts, dim).clone()
        if noise and m > D:
            sl = [slice(None)] * out.dim()
            sl[dim] = slice(D, None)
            out[tuple(sl)] += L.gaussian(out[tuple(sl)].shape, noise, out, generator)
        return out

    layers = list(base.layers)
    norms = [base.norm] + [nm for layer in layers for nm in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        L.replace_param(emb, "weight", grow(emb.weight, 1, lambda sh: L.gaussian(sh, std, emb.weight, generator)))
        emb.embedding_dim = m
        for nm in norms:
            w = nm.weight.detach()
            L.replace_param(nm, "weight", torch.cat([w[src.to(w.device)] * shrink ** 0.5, w.new_ones(m - k * D)]))
            nm.variance_epsilon = nm.variance_epsilon * shrink
        writers = [lin for layer in layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        for lin in writers:
            w, b = lin.weight, lin.bias
            new_b = None if b is None else grow(b, 0, lambda sh: b.new_zeros(sh))
            L.resize_linear(lin, grow(w, 0, lambda sh: L.gaussian(sh, std, w, generator)), new_b)
        readers = [lin for layer in layers for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
        if head is not None and not tied:
            readers.append(head)
        for lin in readers:
            w = lin.weight.detach()
            cols = [w[:, src.to(w.device)] / k]
            extra = m - k * D
            # zero units read 0 (after any RMSNorm), so fresh columns keep exactness and give their writers a gradient
            cols.append(L.gaussian((w.shape[0], extra), std, w, generator))
            new_w = torch.cat(cols, 1)
            if noise and m > D:
                new_w[:, D:] += L.gaussian((w.shape[0], m - D), noise, w, generator)
            L.resize_linear(lin, new_w, lin.bias)
        if tied:
            head.weight = emb.weight
            head.in_features = m
    for layer in layers:
        if hasattr(layer, "hidden_size"):
            layer.hidden_size = m
        if hasattr(layer.mlp, "hidden_size"):
            layer.mlp.hidden_size = m
    for c in _configs(model):
        c.hidden_size = m
        c.rms_norm_eps = c.rms_norm_eps * shrink
    if spec.init == "random" and m > D:
        exact, note = False, "random: fresh residual units (embedding columns, writer rows, reader columns): not preserving"
    else:
        parts = []
        if k > 1:
            parts.append(f"every residual unit duplicated {k} times (reader columns divided by {k})")
        if n_zero:
            parts.append(f"{n_zero} zero units (zero embedding columns and o_proj/down_proj rows; fresh reader columns)")
        if shrink != 1.0:
            parts.append(f"RMSNorm eps x{shrink:.6g} and gains x sqrt of that")
        exact, note = True, f"{spec.init}: " + ("; ".join(parts) or "unchanged width") + ": exact"
    if noise and m > D:
        exact, note = False, note + f"; noise std {noise}: not preserving"
    return LayerChange(
        op="widen", path=path, kind="Embedding", init=spec.init, before=[D], after=[m], exact=exact, note=note,
        detail={"hidden_size": [D, m], "copies": k, "zero_units": n_zero, "fresh": n_fresh, "eps_scale": shrink,
                "tied": tied, "rmsnorms": len(norms), "writers": len(writers) + 1,
                "readers": len(readers) + int(tied)},
    )


# --- depth ---------------------------------------------------------------------------------------

def _new_layer(prev: nn.Module, spec: Deepen, config, generator) -> nn.Module:
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
    if spec.init == "identity":
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='identity' inserts a plain layer, which a LLaMA decoder does not take; "
            "use init='zero' (a decoder layer with zero o_proj and down_proj: function-preserving), 'random' or 'copy'"
        )
    base, prefix = _base(model)
    old = list(base.layers)
    paths = [f"{prefix}.{i}" for i in range(len(old))]
    hits = L.match_insertion_points(
        model, spec.after, paths,
        not_one="a LlamaDecoderLayer; layers can only be inserted after a decoder layer",
        listing="decoder layer of the LLaMA model; its layers are")
    config = base.config
    types = getattr(config, "layer_types", None)
    new_list, new_types, out = [], [], []
    for i, prev in enumerate(old):
        new_list.append(prev)
        if types is not None:
            new_types.append(types[i])
        if paths[i] not in hits:
            continue
        for t in range(spec.count):
            layer = _new_layer(prev, spec, config, generator)
            new_list.append(layer)
            if types is not None:
                new_types.append(types[i])
            if spec.init == "zero":
                exact, note = True, "zero: o_proj and down_proj are zero, both residual branches add 0: exact"
            else:
                exact, note = False, f"{spec.init} layer: not preserving"
            if spec.noise:
                exact, note = False, note.replace(": exact", "") + f"; noise std {spec.noise}: not preserving"
            a = layer.self_attn
            out.append((layer, LayerChange(
                op="deepen", path="", kind="LlamaDecoderLayer", init=spec.init, before=[],
                after=[a.q_proj.in_features, a.q_proj.out_features // a.head_dim], exact=exact, note=note,
                detail={"after": paths[i], "layer": t, "params": L.n_params(layer),
                        "intermediate_size": layer.mlp.gate_proj.out_features, "head_dim": a.head_dim,
                        "kv_heads": a.k_proj.out_features // a.head_dim},
            )))
    base.layers = nn.ModuleList(new_list)
    for j, layer in enumerate(new_list):
        layer.self_attn.layer_idx = j
    if types is not None:
        for c in _configs(model):
            c.layer_types = list(new_types)
    where = {id(m): j for j, m in enumerate(new_list)}
    for layer, c in out:
        c.path = f"{prefix}.{where[id(layer)]}"
        c.detail["index"] = where[id(layer)]
    return out


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
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (64, min(int(cfg.max_position_embeddings), 16)), generator=g)
    return x.to(base.embed_tokens.weight.device)


FAMILY = Family(name="Hugging Face LLaMA", matches=_matches, widen=widen_llama, deepen=deepen_llama,
                default_inputs=_default_inputs, finish=finish_llama)
