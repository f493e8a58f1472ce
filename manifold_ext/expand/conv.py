"""Width growth for convolutions: more channels between an nn.Conv2d and the layer that reads them.

``widen_conv`` grows the output channels of ``nn.Conv2d`` A (groups=1) and the matching inputs
of its consumer B: the next ``nn.Conv2d`` (groups=1; its input channels) or an ``nn.Linear``
after an ``nn.Flatten(start_dim=1)``. Flattening an (N, C, H, W) map puts channel c at features
``c*H*W .. (c+1)*H*W - 1``, so there each channel is a block of ``H*W = in_features / C``
consecutive input columns of B (no spatial size needs to be known). Between A and B (eval
mode): BatchNorm2d (statistics and affine parameters copied along with the channels), elementwise
activations, Max/Avg pooling (plain and adaptive), Dropout/Dropout2d, Identity; after the Flatten
only elementwise activations, Dropout and Identity. All of these act channel by channel, so a
copied channel's map equals its source's. Unit order as for Linear: the n existing channels keep
their indices, new ones follow.

Initialisations, as for ``width.widen`` (there is no LayerNorm here, so no mean units):

* ``net2net``: new channels copy existing ones, drawn without replacement in rounds (counts
  differ by at most one); B's weights for each copy (a kernel slice, or an H*W column block) are
  divided by the source's count: exact. Measured max error on 600 random small CNNs (1-3 conv
  blocks, Conv or Flatten+Linear heads, float32, eval, random BatchNorm2d statistics, unit-scale
  outputs, one layer or all at once, factors 1.3 to 3): 5.4e-7; the tests check 1e-5.
* ``zero``: new channels get fresh incoming kernels (``nn.Conv2d``'s default init, fan-in of A)
  and zero weights in B: exact (measured max 2.4e-7 on the same CNNs).
* ``random``: new incoming kernels and B's new weights as fresh layers would have them (fan-in of
  A, and of B's new input size): not preserving.

New BatchNorm2d entries for non-copied channels are fresh (mean 0, var 1, weight 1, bias 0).
``noise > 0`` adds N(0, noise^2) to the new kernels of A and B's new weights.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _layers as L
from .report import LayerChange
from .width import _grow_bn, _plan


def widen_conv(model: nn.Sequential, i: int, m: int, init: str, noise: float, generator=None) -> LayerChange:
    """Widen child ``i`` (an nn.Conv2d) of ``model`` to ``m`` output channels, in place."""
    kids = L.children(model)
    path_a, a = kids[i]
    L.check_conv(path_a, a, "a widening target")
    j = L.next_consumer(kids, i)
    path_b, b = kids[j]
    n = a.out_channels
    hw = L.check_per_channel(kids, i + 1, j, n, f"between {path_a!r} and {path_b!r} when widening")
    copies, _, n_fresh = _plan(n, m, init, False, generator)
    src = torch.cat([torch.arange(n), copies])  # source channel of every non-fresh channel
    counts = torch.bincount(src, minlength=n)
    w = a.weight.detach()
    dev = w.device
    sidx = src.to(dev)

    # nn.Conv2d.reset_parameters: weight and bias bounds both reduce to 1/sqrt(in_channels*kh*kw).
    bound = L.fresh_bound(w[0].numel())
    new_w = torch.cat([w[sidx], L.uniform((n_fresh,) + tuple(w.shape[1:]), bound, w, generator)])
    if noise:
        new_w[n:] += L.gaussian(new_w[n:].shape, noise, w, generator)
    new_b = None
    if a.bias is not None:
        new_b = torch.cat([a.bias.detach()[sidx], L.uniform((n_fresh,), bound, a.bias, generator)])
    L.resize_conv(a, new_w, new_b)
    for _, mod in kids[i + 1 : j]:
        if isinstance(mod, nn.BatchNorm2d):
            _grow_bn(mod, sidx, m)

    # B's weights as (out, channel, per-channel inputs): kernels for a Conv2d, H*W blocks for a Linear.
    wb = b.weight.detach()
    v = wb.reshape(wb.shape[0], n, hw) if isinstance(b, nn.Linear) else wb
    scale = counts.to(dev, wb.dtype)[sidx].view(1, -1, *([1] * (v.dim() - 2)))
    extra = (v.shape[0], n_fresh) + tuple(v.shape[2:])
    if init == "random":
        fresh = L.uniform(extra, L.fresh_bound(m * v[0, 0].numel()), wb, generator)
    else:
        fresh = wb.new_zeros(extra)
    new_v = torch.cat([v[:, sidx] / scale, fresh], 1)
    if noise:
        new_v[:, n:] += L.gaussian(new_v[:, n:].shape, noise, wb, generator)
    if isinstance(b, nn.Linear):
        L.resize_linear(b, new_v.reshape(v.shape[0], m * hw), b.bias)
    else:
        L.resize_conv(b, new_v, b.bias)

    if init == "random":
        exact, note = False, "random new channels: not preserving"
    else:
        exact, note = True, f"{init}: exact"
    if noise:
        exact, note = False, note + f"; noise std {noise}: not preserving"
    return LayerChange(
        op="widen", path=path_a, kind="Conv2d", init=init,
        before=[a.in_channels, n], after=[a.in_channels, m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "mean_units": 0, "fresh": int(n_fresh),
                "consumer": L.kind(b), "features_per_channel": int(hw)},
    )
