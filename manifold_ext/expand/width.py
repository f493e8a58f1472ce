"""Width growth: more hidden units between two Linear layers of an nn.Sequential.

(Convolution channels: see ``conv``; ``widen_all`` dispatches Conv2d targets there.)

``widen`` grows the hidden layer between ``nn.Linear`` A (its output units) and the next
``nn.Linear`` B (its input columns), carrying along every BatchNorm1d, LayerNorm, Dropout and
elementwise activation in between. Unit order: the n existing units keep their indices; new
units follow.

What is exact (float32, eval mode, ``noise=0``). Measured on 1500 random small MLPs (unit-scale
outputs): max error 3.6e-7 without LayerNorm, 2.7e-6 with one; the tests check 1e-5. Exact
means "up to float rounding": a LayerNorm over a few nearly equal units divides by a tiny
standard deviation (down to sqrt(eps)) and amplifies rounding, which widening (a re-ordered
sum) changes; for 4 such ill-conditioned bases of 1500 the error reached 1.6e-5 to 5.5e-5, within
10x the base model's own float32-vs-float64 error. Use float64 where that matters.

* ``net2net``: the new units copy existing ones, drawn at random *without replacement in
  rounds*, so replication counts differ by at most one (``m = k*n + r``: every unit appears k
  times, r random ones k+1 times); B's column of each unit is divided by its count. Exact
  through activations, Dropout and BatchNorm1d (its statistics and affine parameters are copied
  along). With a LayerNorm between: exact when ``r == 0`` (integer factor: the mean and variance
  over the copies are those over the originals). When ``r > 0`` and the LayerNorm acts directly
  on A's output (only Dropout/Identity between, a single LayerNorm with a gain): the r remainder
  units become *mean units* (incoming weights the mean of A's rows, so their pre-norm value is
  the layer mean, zero outgoing weights); the variance then shrinks by the constant ``k*n/m``,
  which rescaling the LayerNorm's ``eps`` by ``k*n/m`` and its gain by ``sqrt(k*n/m)``
  undoes: exact. Otherwise (an activation or BatchNorm before the LayerNorm and ``r > 0``): the
  remainder copies change the layer statistics and the function is *not* preserved: measured
  max errors median 0.4, up to 3.5, on the random MLPs above; the report says
  ``exact=False`` and records the error. Use an integer factor there for exactness.
* ``zero``: new units get zero outgoing weights and fresh incoming weights (``nn.Linear``'s
  default init, fan-in of A): exact without LayerNorm. With a LayerNorm acting directly on A's
  output, the new units are mean units as above (k = 1): exact, but their incoming weights are
  the mean row, not fresh ones (pass ``noise`` to break their symmetry). With a LayerNorm after
  an activation or BatchNorm: fresh units shift the statistics and the function is *not*
  preserved (measured max errors median 1.0, up to 3.4), ``exact=False``; use net2net with an integer
  factor there.
* ``random``: new units' incoming weights and B's new columns as a fresh ``nn.Linear`` would
  have them (fan-in of A, and of B's new width): not preserving.

New BatchNorm entries for non-copied units are fresh (mean 0, var 1, weight 1, bias 0), new
LayerNorm entries gain 1, bias 0. ``noise > 0`` adds N(0, noise^2) to the new rows of A and the
new columns of B.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .specs import Widen


def widen_all(model: nn.Sequential, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to ``model`` in place (it is already a copy); return LayerChanges."""
    kids = L.children(model)
    names = [n for n, _ in kids]
    hits = L.select(kids, spec.target, "Widen.target")
    from .conv import widen_conv  # here, not at the top: conv imports this module's helpers

    targets = []
    for i in hits:
        path, m = kids[i]
        hidden = (isinstance(m, nn.Linear) and L.next_linear(kids, i) is not None) or (
            isinstance(m, nn.Conv2d) and L.next_consumer(kids, i) is not None
        )
        if hidden:
            targets.append(path)
        elif not L.is_pattern(spec.target) or spec.target in names:
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise TypeError(
                    f"Widen.target={spec.target!r}: module {path!r} is {L.kind(m)}, expected nn.Linear or nn.Conv2d "
                    "(widen the layer whose outputs are the hidden units or channels)"
                )
            size = f"out_features={m.out_features}" if isinstance(m, nn.Linear) else f"out_channels={m.out_channels}"
            raise ValueError(
                f"Widen.target={spec.target!r}: module {path!r} ({L.kind(m)}, {size}) is the "
                "output layer; widening it would change the model's output shape"
            )
    if not targets:
        raise ValueError(
            f"Widen.target={spec.target!r} matches no hidden nn.Linear or nn.Conv2d; the model's paths are {names}"
        )
    changes = []
    for path in targets:
        i = [n for n, _ in L.children(model)].index(path)
        a = model._modules[path]
        if isinstance(a, nn.Conv2d):
            m = spec.new_width(path, L.kind(a), a.out_channels)
            changes.append(widen_conv(model, i, m, spec.init, spec.noise, generator))
        else:
            m = spec.new_width(path, L.kind(a), a.out_features)
            changes.append(widen(model, i, m, spec.init, spec.noise, generator))
    return changes


def _plan(n, m, init, ln_direct, generator):
    """Sources of the new units: (copied indices, number of mean units, number of fresh units)."""
    if init == "net2net":
        k, r = divmod(m, n)
        rounds = [torch.arange(n)] * (k - 1)
        if r and ln_direct:
            return torch.cat(rounds + [torch.zeros(0, dtype=torch.long)]), r, 0
        extra = torch.randperm(n, generator=generator)[:r]
        return torch.cat(rounds + [extra]), 0, 0
    if init == "zero" and ln_direct:
        return torch.zeros(0, dtype=torch.long), m - n, 0
    return torch.zeros(0, dtype=torch.long), 0, m - n


def widen(model: nn.Sequential, i: int, m: int, init: str, noise: float, generator=None) -> LayerChange:
    """Widen the hidden layer after child ``i`` (an nn.Linear) of ``model`` to ``m`` units, in place.

    See the module docstring for what each ``init`` preserves. Returns the LayerChange, whose
    ``exact`` says whether the function is preserved exactly (up to float rounding).
    """
    kids = L.children(model)
    path_a, a = kids[i]
    j = L.next_linear(kids, i)
    path_b, b = kids[j]
    n = a.out_features
    L.check_per_feature(kids, i + 1, j, n, f"between {path_a!r} and {path_b!r} when widening")
    between = kids[i + 1 : j]
    lns = [mod for _, mod in between if isinstance(mod, nn.LayerNorm)]
    first_ln = next((t for t, (_, mod) in enumerate(between) if isinstance(mod, nn.LayerNorm)), None)
    ln_direct = (
        len(lns) == 1
        and lns[0].weight is not None
        and all(isinstance(mod, L.PASSTHROUGH) for _, mod in between[:first_ln])
    )
    copies, n_mean, n_fresh = _plan(n, m, init, ln_direct, generator)
    src = torch.cat([torch.arange(n), copies])  # source unit of every non-extra unit
    counts = torch.bincount(src, minlength=n)
    w, bias = a.weight.detach(), None if a.bias is None else a.bias.detach()
    dev = w.device
    sidx = src.to(dev)

    rows = [w[sidx], w.mean(0, keepdim=True).expand(n_mean, -1), L.uniform((n_fresh, w.shape[1]), L.fresh_bound(a.in_features), w, generator)]
    new_w = torch.cat(rows)
    if noise:
        new_w[n:] += L.gaussian((m - n, w.shape[1]), noise, w, generator)
    new_b = None
    if bias is not None:
        new_b = torch.cat([bias[sidx], bias.mean().expand(n_mean), L.uniform((n_fresh,), L.fresh_bound(a.in_features), bias, generator)])
    L.resize_linear(a, new_w, new_b)

    # Mean units add no deviation from the mean, so the variance shrinks by exactly this much.
    shrink = (len(src) / m) if (n_mean and ln_direct) else 1.0
    for path, mod in between:
        if isinstance(mod, nn.BatchNorm1d):
            _grow_bn(mod, sidx, m)
        elif isinstance(mod, nn.LayerNorm):
            _grow_ln(mod, sidx, m, shrink)

    wb = b.weight.detach()
    cols = [wb[:, sidx] / counts.to(dev, wb.dtype)[sidx]]
    if init == "random":
        cols.append(L.uniform((wb.shape[0], n_fresh), L.fresh_bound(m), wb, generator))
    else:
        cols.append(wb.new_zeros(wb.shape[0], n_mean + n_fresh))
    new_wb = torch.cat(cols, 1)
    if noise:
        new_wb[:, n:] += L.gaussian((wb.shape[0], m - n), noise, wb, generator)
    L.resize_linear(b, new_wb, b.bias)

    has_ln = bool(lns)
    r = m % n
    if init == "random":
        exact, note = False, "random new units: not preserving"
    elif not has_ln:
        exact, note = True, f"{init}: exact"
    elif init == "net2net" and r == 0:
        exact, note = True, "net2net, integer factor: LayerNorm statistics unchanged, exact"
    elif ln_direct:
        exact, note = True, f"{n_mean} mean units, LayerNorm eps and gain rescaled by {shrink:.6g}: exact"
    else:
        exact, note = False, "LayerNorm after a non-identity module: new units shift its statistics, approximate"
    if noise:
        exact, note = False, note + f"; noise std {noise}: not preserving"
    return LayerChange(
        op="widen", path=path_a, kind="Linear", init=init,
        before=[a.in_features, n], after=[a.in_features, m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "mean_units": int(n_mean), "fresh": int(n_fresh)},
    )


def _grow(old: Optional[torch.Tensor], sidx, m: int, fill: float) -> Optional[torch.Tensor]:
    """Per-unit vector for the widened layer: sources' entries, then ``fill`` for extra units."""
    if old is None:
        return None
    new = old.detach().new_full((m,), fill)
    new[: len(sidx)] = old.detach()[sidx]
    return new


def _grow_bn(bn: nn.BatchNorm1d, sidx, m: int) -> None:
    # Extra (non-copied) units get a fresh BatchNorm's state: mean 0, var 1, weight 1, bias 0.
    for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        L.replace_param(bn, name, _grow(getattr(bn, name), sidx, m, fill))
    bn.num_features = m


def _grow_ln(ln: nn.LayerNorm, sidx, m: int, shrink: float) -> None:
    weight = _grow(ln.weight, sidx, m, 1.0)
    if weight is not None:
        weight[: len(sidx)] *= math.sqrt(shrink)
    L.replace_param(ln, "weight", weight)
    L.replace_param(ln, "bias", _grow(ln.bias, sidx, m, 0.0))
    ln.normalized_shape = (m,)
    ln.eps = ln.eps * shrink
