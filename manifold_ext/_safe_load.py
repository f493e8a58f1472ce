"""Loading ``torch.save`` files without unpickling Python objects (``weights_only=True``).

A file that holds anything but tensors and plain containers (dicts, lists, tuples, strings,
numbers, None) needs a real unpickling, which runs whatever code the file carries; such a file
is reported as :class:`PickledObjectsError` instead of being loaded.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

_GLOBAL = re.compile(r"Unsupported (?:global|class):?\s*(?:GLOBAL\s+)?([\w.<>]+)")


class PickledObjectsError(ValueError):
    """A file holds pickled Python objects, not just tensors: loading it with
    ``weights_only=True`` refused the global ``name`` (a class or function it would call)."""

    def __init__(self, path: Union[str, Path], name: str):
        super().__init__(f"{path}: holds pickled Python objects, not just tensors (it calls {name}, which "
                         f"loading with weights_only=True refuses)")
        self.path = str(path)
        self.name = name


def refused_global(err: BaseException) -> Optional[str]:
    """The global that a ``weights_only=True`` load refused, or None when ``err`` is another
    failure (a corrupt or truncated file)."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    m = _GLOBAL.search(str(err))
    return m.group(1) if m else None


def reason(err: BaseException) -> str:
    """Why a load failed, in one short line: ``Type: the first line of its message`` (for a
    ``weights_only`` failure, the unpickler's own words, not torch's advice around them)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(err).__name__}: {line[:200]}"


def load_tensors(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    Raises :class:`PickledObjectsError` when the file holds other pickled objects (nothing in it
    is run); any other failure (a corrupt file) propagates as torch raises it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is None:
            raise
        raise PickledObjectsError(path, name) from None
