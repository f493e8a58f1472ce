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
  divided by the source's count: exact (up to float rounding; tests/test_expand_conv.py checks
  1e-5 in float32).
* ``zero``: new channels get fresh incoming kernels (``nn.Conv2d``'s default init, fan-in of A)
  and zero weights in B: exact.
* ``random``: new incoming kernels and B's new weights as fresh layers would have them (fan-in of
  A, and of B's new input size): not preserving.

New BatchNorm2d entries for non-copied channels are fresh (mean 0, var 1, weight 1, bias 0).
``noise > 0`` adds N(0, noise^2) to the new kernels of A and B's new weights.
"""

from __future__ import annotations

from torch import nn

from . import _layers as L
from ._claims import width_claim
from ._units import copy_sources, grow_batchnorm, grow_inputs, grow_outputs, plan_new_units
from .report import LayerChange


def widen_conv(model: nn.Sequential, i: int, m: int, init: str, noise: float, generator=None) -> LayerChange:
    """Widen child ``i`` (an nn.Conv2d) of ``model`` to ``m`` output channels, in place."""
    kids = L.children(model)
    path_a, a = kids[i]
    L.check_conv(path_a, a, "a widening target")
    j = L.next_consumer(kids, i)
    path_b, b = kids[j]
    n = a.out_channels
    hw = L.check_per_channel(kids, i + 1, j, n, f"between {path_a!r} and {path_b!r} when widening")
    copies, _, n_fresh = plan_new_units(n, m, init, False, generator)
    src, counts = copy_sources(n, copies)  # the source channel of every non-fresh channel
    sidx = src.to(a.weight.device)
    bias = None if a.bias is None else a.bias.detach()
    L.resize_conv(a, *grow_outputs(a.weight.detach(), bias, sidx, 0, n_fresh, noise, generator))
    for _, mod in kids[i + 1 : j]:
        if isinstance(mod, nn.BatchNorm2d):
            grow_batchnorm(mod, sidx, m)
    _grow_consumer(b, n, m, hw, sidx, counts, n_fresh, init, noise, generator)
    exact, note = width_claim(init, noise, "random new channels: not preserving", f"{init}: exact", f"{init}: exact")
    return LayerChange(
        op="widen", path=path_a, kind="Conv2d", init=init,
        before=[a.in_channels, n], after=[a.in_channels, m], exact=exact, note=note,
        detail={"copied": int(len(copies)), "mean_units": 0, "fresh": int(n_fresh),
                "consumer": L.kind(b), "features_per_channel": int(hw)},
    )


def _grow_consumer(b: nn.Module, n: int, m: int, hw: int, sidx, counts, n_fresh: int, init: str, noise: float,
                   generator) -> None:
    """Grow the inputs of B, a Conv2d or a Linear after a Flatten, for the widened channels."""
    # B's weights as (out, channel, per-channel inputs): kernels for a Conv2d, H*W blocks for a Linear.
    wb = b.weight.detach()
    v = wb.reshape(wb.shape[0], n, hw) if isinstance(b, nn.Linear) else wb
    new_v = grow_inputs(v, sidx, counts, n_fresh, init, noise, generator)
    if isinstance(b, nn.Linear):
        L.resize_linear(b, new_v.reshape(v.shape[0], m * hw), b.bias)
    else:
        L.resize_conv(b, new_v, b.bias)
