"""Inserting new residual blocks into a model's list of blocks (the Deepen step of every residual family)."""

from __future__ import annotations

from typing import Callable, List, Tuple

from torch import nn

from .specs import Deepen


def refuse_identity(spec: Deepen, model_name: str, zero_block: str) -> None:
    """ValueError for ``init='identity'`` on a residual model, which a ``zero`` block serves
    instead (``zero_block`` says what that block is)."""
    if spec.init == "identity":
        raise ValueError(
            f"Deepen.after={spec.after!r}: init='identity' inserts a plain layer, which {model_name} does not take; "
            f"use init='zero' ({zero_block}: function-preserving), 'random' or 'copy'"
        )


def insert_after(blocks: List[nn.Module], paths: List[str], hits: List[str], count: int,
                 make: Callable[[nn.Module], nn.Module]) -> Tuple[list, list]:
    """The new block list, with ``count`` blocks ``make(prev)`` right after each block whose path
    is in ``hits``, and per new block ``(block, path of the block it follows, t, its index)``."""
    new_list, added = [], []
    for prev, path in zip(blocks, paths):
        new_list.append(prev)
        if path not in hits:
            continue
        for t in range(count):
            block = make(prev)
            added.append((block, path, t, len(new_list)))
            new_list.append(block)
    return new_list, added
