"""Writing result files atomically: a reader (or a resumed run) sees the old file or the new one,
never half of one, and a failed write (a full disk, an error while serialising) leaves no
temporary file behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill ``PATH.tmp``, then rename it to ``path``; on any failure the
    temporary file is removed and the error raised, ``path`` untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """``text`` to ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_state(path, state: dict) -> None:
    """A state dict (its tensors moved to the CPU) to ``path`` with ``torch.save``, atomically."""
    cpu = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    atomic_write(path, lambda tmp: torch.save(cpu, tmp))
