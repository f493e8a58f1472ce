"""Depth growth: insert Linear(+activation) blocks into an nn.Sequential.

Each block is ``nn.Linear(w, w)`` plus a copy of the activation that follows the nearest Linear at
or before the insertion point (``w`` is that Linear's output width; no activation if it has
none before the next Linear). Initialisations:

* ``identity``: identity weight, zero bias. Exact (float32 error 0 in the tests: an identity
  product is exact) when the block's activation ``act`` satisfies ``act(h) == h`` on what it
  sees: no activation or ``nn.Identity``; or ``nn.ReLU`` when the block's input is already a
  ReLU output (``relu(h) = h`` for ``h >= 0``) or its output goes straight into a ReLU
  (``relu(relu(h)) = relu(h)``), Dropout/Identity modules being skipped over (eval mode).
  Anything else (GELU, Tanh, a ReLU block before a BatchNorm...) is not preserving and is
  reported ``exact=False``.
* ``random``: ``nn.Linear``'s default init: not preserving.
* ``copy``: a copy of that Linear, which must be square (progressive stacking): not preserving.
* ``zero``: refused for nn.Sequential (no residual path; a zero layer outputs zeros).

``noise > 0`` adds N(0, noise^2) to the new weight matrices.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from ._claims import with_noise
from .report import LayerChange
from .specs import Deepen


def _neighbour(kids, start, step):
    """The first child from ``start`` in direction ``step`` that is not a pass-through, or None."""
    k = start
    while 0 <= k < len(kids):
        if not isinstance(kids[k][1], L.PASSTHROUGH):
            return kids[k][1]
        k += step
    return None


def _identity_exact(kids, idx, act) -> tuple:
    """``(exact, note)`` for an identity layer with activation ``act`` inserted after child ``idx``."""
    if act is None or type(act) is nn.Identity:
        return True, "identity layer, no activation: exact"
    if type(act) is nn.ReLU:
        before, after = _neighbour(kids, idx, -1), _neighbour(kids, idx + 1, 1)
        if type(before) is nn.ReLU:
            return True, "identity + ReLU after a ReLU output (relu(h) = h for h >= 0): exact"
        if type(after) is nn.ReLU:
            return True, "identity + ReLU followed by a ReLU (relu(relu(h)) = relu(h)): exact"
        return False, "identity + ReLU on inputs that may be negative: not preserving"
    return False, f"identity + {L.kind(act)}: the activation is not the identity on its inputs, not preserving"


def _blocks(kids, idx: int, spec: Deepen, generator):
    """The new (Linear, activation-or-None) blocks to insert after child ``idx``, and their claim."""
    path, mod = kids[idx]
    p = next((k for k in range(idx, -1, -1) if isinstance(kids[k][1], nn.Linear)), None)
    if p is None:
        raise ValueError(
            f"Deepen.after={spec.after!r}: no nn.Linear at or before module {path!r} ({L.kind(mod)}) "
            "to take the inserted layer's width from"
        )
    prev_path, prev = kids[p]
    w = prev.out_features
    L.check_per_feature(kids, p + 1, idx + 1, w, f"between {prev_path!r} and the insertion point {path!r}")
    stop = L.next_linear(kids, p) or len(kids)
    act = next((m for _, m in kids[p + 1 : stop] if isinstance(m, L.ACTIVATIONS)), None)
    _check_init(spec, prev_path, prev)
    blocks = [(_new_layer(prev, w, spec, generator), None if act is None else copy.deepcopy(act))
              for _ in range(spec.count)]
    if spec.init == "identity":
        exact, note = _identity_exact(kids, idx, act)
    else:
        exact, note = False, f"{spec.init} layer: not preserving"
    exact, note = with_noise(exact, note, spec.noise)
    return blocks, exact, note, w, act


def _check_init(spec: Deepen, prev_path: str, prev: nn.Linear) -> None:
    """ValueError for an init an nn.Sequential cannot take: ``zero`` (no residual path), or
    ``copy`` of a Linear that is not square."""
    if spec.init == "zero":
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='zero' needs a residual block, and an nn.Sequential has no "
            "residual path (a zero Linear would output zeros); use init='identity' for a function-preserving insertion"
        )
    if spec.init == "copy" and prev.in_features != prev.out_features:
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='copy' copies module {prev_path!r} (Linear), which must be square; "
            f"its shape is in_features={prev.in_features}, out_features={prev.out_features}"
        )


def _new_layer(prev: nn.Linear, w: int, spec: Deepen, generator) -> nn.Linear:
    """A new ``Linear(w, w)``: the identity, fresh, or a copy of ``prev``; noise added to its weight."""
    like = prev.weight.detach()
    has_bias = prev.bias is not None
    if spec.init == "identity":
        weight, bias = torch.eye(w, device=like.device, dtype=like.dtype), like.new_zeros(w)
    elif spec.init == "random":
        bound = L.fresh_bound(w)
        weight, bias = L.uniform((w, w), bound, like, generator), L.uniform((w,), bound, like, generator)
    else:  # copy
        weight = like.clone()
        bias = prev.bias.detach().clone() if has_bias else like.new_zeros(w)
    if spec.noise:
        weight = weight + L.gaussian((w, w), spec.noise, like, generator)
    return L.new_linear(prev, weight, bias if has_bias else None)


def deepen_all(model: nn.Sequential, spec: Deepen, generator: Optional[torch.Generator]) -> list:
    """Apply one Deepen spec to ``model`` in place (it is already a copy); return LayerChanges.

    With a glob, blocks go after every matching child. Children named by integers are renumbered
    afterwards (as nn.Sequential numbers them); other names are kept, and inserted modules are
    named ``<after>_grow<t>`` and ``<after>_grow<t>_act``.
    """
    kids = L.children(model)
    hits = set(L.select(kids, spec.after, "Deepen.after"))
    numbered = all(n.isdigit() for n, _ in kids)
    used = {n for n, _ in kids}
    out, inserted = [], []
    for idx, (name, mod) in enumerate(kids):
        out.append((name, mod))
        if idx not in hits:
            continue
        blocks, exact, note, w, act = _blocks(kids, idx, spec, generator)
        for t, (lin, a) in enumerate(blocks):
            for suffix, m in (("", lin), ("_act", a)):
                if m is None:
                    continue
                nm = f"{name}_grow{t}{suffix}"
                while nm in used:
                    nm += "_"
                used.add(nm)
                out.append((nm, m))
            inserted.append((lin, name, t, exact, note, w, act))
    if numbered:
        out = [(str(k), m) for k, (_, m) in enumerate(out)]
    model._modules.clear()
    for nm, m in out:
        model._modules[nm] = m
    where = {id(m): (nm, k) for k, (nm, m) in enumerate(out)}
    changes = []
    for lin, after_name, t, exact, note, w, act in inserted:
        nm, k = where[id(lin)]
        changes.append(LayerChange(
            op="deepen", path=nm, kind="Linear", init=spec.init, before=[], after=[w, w], exact=exact, note=note,
            detail={"after": after_name, "block": t, "index": k, "activation": None if act is None else L.kind(act)},
        ))
    return changes
