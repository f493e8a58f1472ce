"""Checks of the ``data`` argument every measurement takes, and how examples are cut into chunks.

The engine, the probes, the estimators and the baselines all take data through
:func:`check_data`, so they accept and refuse the same inputs with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class Inputs:
    """The checked data of one call: inputs, targets, per-example keyword inputs, and the number
    of targets a mean is taken over."""

    x: Tensor
    y: Tensor
    kwargs: dict
    n_targets: int


def check_data(data, loss: str = "cross_entropy", ignore_index: int = -100) -> Inputs:
    """``data`` checked for ``loss``: a pair ``(inputs, targets)`` of tensors with as many targets
    as inputs, at least one example, and for ``"cross_entropy"`` integer class indices (returned
    as int64); for ``"lm"`` also a triple ``(input_ids, labels, attention_mask)`` of ``(N, T)``
    tensors, the masked positions' labels set to ``ignore_index``.

    Raises:
        ValueError: naming what was expected and what was given.
    """
    what = ("a pair (input_ids, labels) or a triple (input_ids, labels, attention_mask) of (N, T) "
            "tensors" if loss == "lm" else "a pair (inputs, targets) of tensors")
    if not isinstance(data, (tuple, list)) or len(data) not in ((2, 3) if loss == "lm" else (2,)) \
            or not all(isinstance(t, Tensor) for t in data):
        got = f"a {type(data).__name__}" + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        if isinstance(data, (tuple, list)) and len(data) == 2:
            got += f" ({type(data[0]).__name__}, {type(data[1]).__name__})"
        raise ValueError(f"expected data to be {what}, got {got}")
    x, y = data[0], data[1]
    if x.dim() == 0 or len(x) == 0:
        raise ValueError(f"data is empty: expected at least one example, got inputs of shape {tuple(x.shape)}")
    if y.dim() == 0 or len(x) != len(y):
        raise ValueError(f"inputs and targets disagree on the number of examples: {len(x)} inputs and "
                         f"targets of shape {tuple(y.shape)}")
    if loss == "cross_entropy":
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"loss='cross_entropy' expects integer class indices as targets, got dtype {y.dtype}")
        return Inputs(x, y.long(), {}, y.numel())
    if loss != "lm":
        return Inputs(x, y, {}, len(y))
    if x.is_floating_point() or y.is_floating_point() or x.dim() != 2 or y.shape != x.shape:
        raise ValueError(f"loss='lm' expects integer input_ids and labels of one shape (N, T), got "
                         f"input_ids {tuple(x.shape)} {x.dtype} and labels {tuple(y.shape)} {y.dtype}")
    if x.shape[1] < 2:
        raise ValueError(f"loss='lm' needs sequences of at least 2 tokens, got T = {x.shape[1]}")
    y, kwargs = y.long(), {}
    if len(data) == 3:
        mask = data[2]
        if mask.shape != x.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(x.shape)}, got "
                             f"{tuple(mask.shape)}")
        kwargs["attention_mask"] = mask
        y = torch.where(mask.bool(), y, torch.full_like(y, ignore_index))
    n = int((y[:, 1:] != ignore_index).sum())
    if n == 0:
        raise ValueError(f"loss='lm': every next-token target is ignored (ignore_index = {ignore_index} "
                         "or masked): nothing to evaluate")
    return Inputs(x, y, kwargs, n)


def chunks(n: int, size: Optional[int]) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of ``size`` (all at once when
    ``size`` is None or 0)."""
    size = n if not size else size
    return [(i, min(n, i + size)) for i in range(0, n, size)]
