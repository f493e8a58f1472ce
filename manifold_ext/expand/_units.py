"""Growing a set of units (hidden units, channels, heads) in the layers that write and read them.

Every width operator works the same way: choose a source for each new unit (``plan_new_units``),
grow the writers' outputs (``grow_outputs``) and the per-unit norms between (``grow_batchnorm``,
``grow_layernorm``), then the readers' inputs (``grow_inputs``), each copy's share divided by its
source's copy count so that the copies sum to the original. ``grow_channels`` does all of it for
channels summed along a residual path; ``append_head_rows`` and ``grow_head_columns`` do it for
attention heads (units of ``head_dim`` rows).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _layers as L


def plan_new_units(n: int, m: int, init: str, ln_direct: bool, generator) -> Tuple[Tensor, int, int]:
    """Sources of the m - n new units: (copied indices, number of mean units, number of fresh units)."""
    if init == "net2net":
        k, r = divmod(m, n)
        # Whole rounds first, then r distinct units: copy counts differ by at most one.
        rounds = [torch.arange(n)] * (k - 1)
        if r and ln_direct:
            return torch.cat(rounds + [torch.zeros(0, dtype=torch.long)]), r, 0
        extra = torch.randperm(n, generator=generator)[:r]
        return torch.cat(rounds + [extra]), 0, 0
    if init == "zero" and ln_direct:
        return torch.zeros(0, dtype=torch.long), m - n, 0
    return torch.zeros(0, dtype=torch.long), 0, m - n


def copy_sources(n: int, copies: Tensor) -> Tuple[Tensor, Tensor]:
    """The source of every kept or copied unit (the n originals, then ``copies``) and each
    original's copy count (itself included)."""
    src = torch.cat([torch.arange(n), copies])
    return src, torch.bincount(src, minlength=n)


def head_copies(n: int, m: int, init: str, generator) -> Tensor:
    """The heads (or key-value groups) the m - n new ones copy: drawn in rounds for net2net, none otherwise."""
    if init == "net2net":
        return plan_new_units(n, m, "net2net", False, generator)[0]
    return torch.zeros(0, dtype=torch.long)


def grow_outputs(w: Tensor, b: Optional[Tensor], sidx: Tensor, n_mean: int, n_fresh: int, noise: float,
                 generator, fresh_bias: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """A writer's weight (outputs first) and bias grown: copies of outputs ``sidx``, ``n_mean``
    mean outputs, ``n_fresh`` fresh ones (the default init for its fan-in; zero biases unless
    ``fresh_bias``), and N(0, noise^2) added to every weight past the original outputs."""
    n, tail = w.shape[0], tuple(w.shape[1:])
    # nn.Linear and nn.Conv2d reset_parameters: weight and bias bounds both reduce to 1/sqrt(fan_in).
    bound = L.fresh_bound(w[0].numel())
    rows = [w[sidx]]
    if n_mean:
        rows.append(w.mean(0, keepdim=True).expand((n_mean,) + tail))
    rows.append(L.uniform((n_fresh,) + tail, bound, w, generator))
    new_w = torch.cat(rows)
    if noise:
        new_w[n:] += L.gaussian(new_w[n:].shape, noise, w, generator)
    if b is None:
        return new_w, None
    entries = [b[sidx]]
    if n_mean:
        entries.append(b.mean().expand(n_mean))
    entries.append(L.uniform((n_fresh,), bound, b, generator) if fresh_bias else b.new_zeros(n_fresh))
    return new_w, torch.cat(entries)


def grow_inputs(v: Tensor, sidx: Tensor, counts: Tensor, n_new: int, init: str, noise: float,
                generator) -> Tensor:
    """A reader's weight ``v`` (out, n units, per-unit inputs...) grown along dim 1: each copy's
    slice divided by its source's count (so the copies sum to the original), then ``n_new``
    slices, fresh for ``init="random"`` (fan-in of the new width) else zero; N(0, noise^2) added
    to every slice past the original n."""
    n, m = v.shape[1], len(sidx) + n_new
    scale = counts.to(v.device, v.dtype)[sidx].view(1, -1, *([1] * (v.dim() - 2)))
    extra = (v.shape[0], n_new) + tuple(v.shape[2:])
    if init == "random":
        fresh = L.uniform(extra, L.fresh_bound(m * v[0, 0].numel()), v, generator)
    else:
        fresh = v.new_zeros(extra)
    new_v = torch.cat([v[:, sidx] / scale, fresh], 1)
    if noise:
        new_v[:, n:] += L.gaussian(new_v[:, n:].shape, noise, v, generator)
    return new_v


def grow_vector(old: Optional[Tensor], sidx: Tensor, m: int, fill: float) -> Optional[Tensor]:
    """A per-unit vector of length m: the sources' entries, then ``fill`` for the other units."""
    if old is None:
        return None
    new = old.detach().new_full((m,), fill)
    new[: len(sidx)] = old.detach()[sidx.to(old.device)]
    return new


def grow_batchnorm(bn: nn.Module, sidx: Tensor, m: int, gamma: float = 1.0) -> None:
    """Grow a BatchNorm1d/2d to m units in place: copies keep their source's statistics and affine
    parameters; the other units get mean 0, var 1, bias 0 and weight ``gamma``."""
    for name, fill in (("weight", gamma), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        L.replace_param(bn, name, grow_vector(getattr(bn, name), sidx, m, fill))
    bn.num_features = m


def grow_layernorm(ln: nn.LayerNorm, sidx: Tensor, m: int, shrink: float, scale: float = 1.0) -> bool:
    """Grow a LayerNorm to m units in place, its variance over them shrunk by ``shrink``: eps
    times ``shrink``, copied gains times ``sqrt(shrink) * scale``, copied biases times ``scale``;
    the other units gain 1, bias 0. Returns False when the LayerNorm has no gain to rescale and
    the rescale is not 1."""
    # Mean units add no deviation from the mean, so the variance shrinks by exactly ``shrink``
    # for every input: the eps and gain rescale undo it.
    weight = grow_vector(ln.weight, sidx, m, 1.0)
    if weight is not None:
        weight[: len(sidx)] *= math.sqrt(shrink) * scale
    bias = grow_vector(ln.bias, sidx, m, 0.0)
    if bias is not None and scale != 1.0:
        bias[: len(sidx)] *= scale
    L.replace_param(ln, "weight", weight)
    L.replace_param(ln, "bias", bias)
    ln.normalized_shape = (m,)
    ln.eps = ln.eps * shrink
    return weight is not None or (shrink == 1.0 and scale == 1.0)


def grow_channels(producers, bns, consumers, src: Tensor, counts: Tensor, n_fresh: int, init: str, noise: float,
                  generator) -> None:
    """Grow a set of channels everywhere at once, in place: the output channels of ``producers``
    (convolutions whose outputs are summed, e.g. along a residual path; new biases zero), ``bns``
    (BatchNorm2d over them; new gammas 0 for ``init="zero"``, so new channels stay 0) and the
    inputs of ``consumers`` (Conv2d or Linear). Channel ``i < len(src)`` copies channel
    ``src[i]``; the ``n_fresh`` others are fresh."""
    m = len(src) + n_fresh
    with torch.no_grad():
        for conv in producers:
            w = conv.weight.detach()
            bias = None if conv.bias is None else conv.bias.detach()
            sidx = src.to(w.device)
            L.resize_conv(conv, *grow_outputs(w, bias, sidx, 0, n_fresh, noise, generator, fresh_bias=False))
        for bn in bns:
            grow_batchnorm(bn, src.to(bn.running_mean.device), m, gamma=0.0 if init == "zero" else 1.0)
        for c in consumers:
            w = c.weight.detach()
            new_w = grow_inputs(w, src.to(w.device), counts, n_fresh, init, noise, generator)
            if isinstance(c, nn.Linear):
                L.resize_linear(c, new_w, c.bias)
            else:
                L.resize_conv(c, new_w, c.bias)


def widen_channel_set(producers, bns, consumers, n: int, m: int, init: str, noise: float,
                      generator) -> Tuple[Tensor, int]:
    """Grow the n channels that ``producers`` write, ``bns`` normalise and ``consumers`` read to
    m (see ``grow_channels``). Returns the copied channels' sources and the number of fresh ones."""
    copies, _, n_fresh = plan_new_units(n, m, init, False, generator)
    src, counts = copy_sources(n, copies)
    grow_channels(producers, bns, consumers, src, counts, n_fresh, init, noise, generator)
    return copies, n_fresh


def append_head_rows(w, b, idx, heads: int, hd: int, init: str, noise: float, generator):
    """A q, k or v projection's weight ``w`` and bias ``b`` (heads of ``hd`` rows) with new heads
    appended up to ``heads``: copies of heads ``idx[old:]`` for net2net, else fresh (``nn.Linear``'s
    default init); N(0, noise^2) added to the new rows. Returns ``(weight, bias or None)``."""
    D = w.shape[1]
    old = w.shape[0] // hd
    extra = (heads - old) * hd
    bound = L.fresh_bound(D)
    if init == "net2net":
        new_w = w.reshape(old, hd, D)[idx[old:]].reshape(extra, D).clone()
    else:
        new_w = L.uniform((extra, D), bound, w, generator)
    if noise:
        new_w += L.gaussian(new_w.shape, noise, w, generator)
    if b is None:
        return torch.cat([w, new_w]), None
    if init == "net2net":
        new_b = b.reshape(old, hd)[idx[old:]].reshape(extra)
    else:
        new_b = L.uniform((extra,), bound, b, generator)
    return torch.cat([w, new_w]), torch.cat([b, new_b])


def grow_head_columns(w, hsrc, head_counts, m: int, hd: int, init: str, noise: float, generator):
    """An output projection's weight ``w`` (reading n heads of ``hd`` columns) grown to ``m``
    heads: for net2net each head ``hsrc[j]``'s columns divided by its copy count
    (``head_counts[j]``); else the new heads' columns fresh (random) or zero. N(0, noise^2) is
    added to the new columns."""
    rows, n = w.shape[0], w.shape[1] // hd
    if init == "net2net":
        full = (w.reshape(rows, n, hd)[:, hsrc] / head_counts.view(1, -1, 1)).reshape(rows, m * hd)
        old_cols, cols = full[:, : n * hd], full[:, n * hd:].clone()
    else:
        old_cols = w
        extra = (m - n) * hd
        if init == "random":
            cols = L.uniform((rows, extra), L.fresh_bound(m * hd), w, generator)
        else:
            cols = w.new_zeros(rows, extra)
    if noise:
        cols = cols + L.gaussian(cols.shape, noise, w, generator)
    return torch.cat([old_cols, cols], 1)
