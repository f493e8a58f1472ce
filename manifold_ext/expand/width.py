"""Width growth: more hidden units between two Linear layers of an nn.Sequential.

(Convolution channels: see ``conv``; ``widen_all`` dispatches Conv2d targets there.)

``widen`` grows the hidden layer between ``nn.Linear`` A (its output units) and the next
``nn.Linear`` B (its input columns), carrying along every BatchNorm1d, LayerNorm, Dropout and
elementwise activation in between. Unit order: the n existing units keep their indices; new
units follow.

What is exact (eval mode, ``noise=0``). Exact means "up to float rounding" (the tests check
1e-5 in float32): a LayerNorm over a few nearly equal units divides by a tiny standard deviation
(down to sqrt(eps)) and amplifies rounding, which widening (a re-ordered sum) changes, so such an
ill-conditioned base can differ by more, as it does from itself computed in float64. Use float64
where that matters.

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
  remainder copies change the layer statistics and the function is *not* preserved (the
  error is of the order of the outputs); the report says ``exact=False`` and records the
  error. Use an integer factor there for exactness.
* ``zero``: new units get zero outgoing weights and fresh incoming weights (``nn.Linear``'s
  default init, fan-in of A): exact without LayerNorm. With a LayerNorm acting directly on A's
  output, the new units are mean units as above (k = 1): exact, but their incoming weights are
  the mean row, not fresh ones (pass ``noise`` to break their symmetry). With a LayerNorm after
  an activation or BatchNorm: fresh units shift the statistics and the function is *not*
  preserved, ``exact=False``; use net2net with an integer factor there.
* ``random``: new units' incoming weights and B's new columns as a fresh ``nn.Linear`` would
  have them (fan-in of A, and of B's new width): not preserving.

New BatchNorm entries for non-copied units are fresh (mean 0, var 1, weight 1, bias 0), new
LayerNorm entries gain 1, bias 0. ``noise > 0`` adds N(0, noise^2) to the new rows of A and the
new columns of B.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _layers as L
from ._claims import with_noise
from .conv import widen_conv
from ._units import copy_sources, grow_batchnorm, grow_inputs, grow_layernorm, grow_outputs, plan_new_units
from .report import LayerChange
from .specs import Widen


def widen_all(model: nn.Sequential, spec: Widen, generator: Optional[torch.Generator]) -> list:
    """Apply one Widen spec to ``model`` in place (it is already a copy); return LayerChanges."""
    changes = []
    for path in _hidden_targets(model, spec):
        i = [n for n, _ in L.children(model)].index(path)
        a = model._modules[path]
        if isinstance(a, nn.Conv2d):
            m = spec.new_width(path, L.kind(a), a.out_channels)
            changes.append(widen_conv(model, i, m, spec.init, spec.noise, generator))
        else:
            m = spec.new_width(path, L.kind(a), a.out_features)
            changes.append(widen(model, i, m, spec.init, spec.noise, generator))
    return changes


def _hidden_targets(model: nn.Sequential, spec: Widen) -> list:
    """The paths of the hidden Linear and Conv2d layers ``spec.target`` selects; an exact path
    naming anything else is an error, a glob skips it."""
    kids = L.children(model)
    names = [n for n, _ in kids]
    targets = []
    for i in L.select(kids, spec.target, "Widen.target"):
        path, m = kids[i]
        hidden = (isinstance(m, nn.Linear) and L.next_linear(kids, i) is not None) or (
            isinstance(m, nn.Conv2d) and L.next_consumer(kids, i) is not None
        )
        if hidden:
            targets.append(path)
        elif not L.is_pattern(spec.target) or spec.target in names:
            _refuse_target(spec, path, m)
    if not targets:
        raise ValueError(
            f"Widen.target={spec.target!r} matches no hidden nn.Linear or nn.Conv2d; the model's paths are {names}"
        )
    return targets


def _refuse_target(spec: Widen, path: str, m: nn.Module) -> None:
    """Raise the error for an exactly named module that is not a hidden Linear or Conv2d."""
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


def _ln_direct(between) -> bool:
    """Whether a single LayerNorm with a gain acts directly on A's outputs (only pass-through
    modules before it): then mean units and an eps/gain rescale keep it exact."""
    lns = [mod for _, mod in between if isinstance(mod, nn.LayerNorm)]
    first_ln = next((t for t, (_, mod) in enumerate(between) if isinstance(mod, nn.LayerNorm)), None)
    return (
        len(lns) == 1
        and lns[0].weight is not None
        and all(isinstance(mod, L.PASSTHROUGH) for _, mod in between[:first_ln])
    )


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
    ln_direct = _ln_direct(between)
    copies, n_mean, n_fresh = plan_new_units(n, m, init, ln_direct, generator)
    src, counts = copy_sources(n, copies)  # the source unit of every non-extra unit
    sidx = src.to(a.weight.device)
    bias = None if a.bias is None else a.bias.detach()
    L.resize_linear(a, *grow_outputs(a.weight.detach(), bias, sidx, n_mean, n_fresh, noise, generator))
    # Mean units add no deviation from the mean, so the variance shrinks by exactly this much.
    shrink = (len(src) / m) if (n_mean and ln_direct) else 1.0
    for _, mod in between:
        if isinstance(mod, nn.BatchNorm1d):
            grow_batchnorm(mod, sidx, m)
        elif isinstance(mod, nn.LayerNorm):
            grow_layernorm(mod, sidx, m, shrink)
    L.resize_linear(b, grow_inputs(b.weight.detach(), sidx, counts, n_mean + n_fresh, init, noise, generator), b.bias)
    has_ln = any(isinstance(mod, nn.LayerNorm) for _, mod in between)
    exact, note = _widen_claim(init, noise, has_ln, ln_direct, m % n, n_mean, shrink)
    return LayerChange(
        op="widen", path=path_a, kind="Linear", init=init,
        before=[a.in_features, n], after=[a.in_features, m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "mean_units": int(n_mean), "fresh": int(n_fresh)},
    )


def _widen_claim(init: str, noise: float, has_ln: bool, ln_direct: bool, r: int, n_mean: int, shrink: float):
    """Whether widening a hidden layer preserves the function (``r``: the units past whole
    copies), and why."""
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
    return with_noise(exact, note, noise)
