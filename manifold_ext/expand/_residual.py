"""Growing the residual width of a transformer: the units every writer, norm and reader of the stream share.

The residual width D grows to ``m = k*D + r``: unit ``j < k*D`` copies unit ``j mod D`` (writers
copy, readers divide by k, so every read sum is unchanged); the r other units are *mean units*
(writers write the mean of the existing units), *zero units* (writers write 0) or *fresh* (for
``init="random"``). A norm's statistic over the units then shrinks by the constant ``shrink =
k*D / (k*D + mean or zero units)``, which the families undo by scaling eps by it and the gains by
its square root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

from . import _layers as L
from ._claims import Claim, with_noise

Fill = Callable[[tuple], Tensor]


@dataclass
class ResidualPlan:
    """How the residual width D grows to m, and the random draws (noise, generator) it makes."""

    D: int
    m: int
    k: int
    n_mean: int = 0
    n_zero: int = 0
    n_fresh: int = 0
    noise: float = 0.0
    generator: Optional[torch.Generator] = None
    src: Tensor = field(init=False)

    def __post_init__(self):
        """Compute ``src``, the source of every copied unit."""
        self.src = torch.arange(self.k * self.D) % self.D  # source of every copied unit (the D originals first)

    @property
    def extra(self) -> int:
        """The number of units that are not copies."""
        return self.m - self.k * self.D

    @property
    def shrink(self) -> float:
        """The factor a norm's statistic over the units shrinks by (mean and zero units add nothing to it)."""
        return (self.k * self.D) / (self.k * self.D + self.n_mean + self.n_zero)

    def write(self, t: Tensor, dim: int, fresh: Fill) -> Tensor:
        """A writer's ``t`` grown along ``dim``: the copies, then mean, zero or ``fresh(shape)``
        units, then noise on every new unit."""
        t = t.detach()
        parts = [t.index_select(dim, self.src.to(t.device))]
        shape = list(t.shape)
        if self.n_mean:
            shape[dim] = self.n_mean
            parts.append(t.mean(dim, keepdim=True).expand(shape))
        if self.n_zero:
            shape[dim] = self.n_zero
            parts.append(t.new_zeros(shape))
        if self.n_fresh:
            shape[dim] = self.n_fresh
            parts.append(fresh(tuple(shape)))
        return self.add_noise(torch.cat(parts, dim).clone(), dim)

    def read(self, w: Tensor, dim: int, new: Fill) -> Tensor:
        """A reader's weight ``w`` grown along ``dim``: the copies divided by k, then ``new(shape)``
        for the other units, then noise on every new unit."""
        w = w.detach()
        shape = list(w.shape)
        shape[dim] = self.extra
        parts = [w.index_select(dim, self.src.to(w.device)) / self.k, new(tuple(shape))]
        return self.add_noise(torch.cat(parts, dim), dim)

    def add_noise(self, out: Tensor, dim: int) -> Tensor:
        """``out`` with N(0, noise^2) added to every unit past D along ``dim`` (in place)."""
        if self.noise and self.m > self.D:
            sl = [slice(None)] * out.dim()
            sl[dim] = slice(self.D, None)
            out[tuple(sl)] += L.gaussian(out[tuple(sl)].shape, self.noise, out, self.generator)
        return out


def residual_plan(D: int, m: int, init: str, new_units: str, noise: float, generator) -> ResidualPlan:
    """The plan for ``init``: net2net copies every unit ``m // D`` times, zero copies it once; the
    rest are ``new_units`` ("mean" or "zero"); random adds ``m - D`` fresh units."""
    if init == "random":
        return ResidualPlan(D, m, 1, n_fresh=m - D, noise=noise, generator=generator)
    k = m // D if init == "net2net" else 1
    rest = {"n_mean": m - k * D} if new_units == "mean" else {"n_zero": m - k * D}
    return ResidualPlan(D, m, k, noise=noise, generator=generator, **rest)


def residual_claim(plan: ResidualPlan, init: str, random_note: str, parts: List[str], gain_ok: bool = True) -> Claim:
    """The claim for a residual widening: ``random_note`` for fresh units, else exact when every
    norm took the rescale (``parts`` say how the units grew); noise makes it not preserving."""
    if init == "random" and plan.m > plan.D:
        exact, note = False, random_note
    else:
        exact = gain_ok
        note = f"{init}: " + ("; ".join(parts) or "unchanged width") + (
            ": exact" if exact else ": a LayerNorm without gain: not preserving")
    return with_noise(exact, note, plan.noise if plan.m > plan.D else 0.0)
