"""ExpansionReport: what an expansion changed, and whether (and how well) it preserved the function."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .._io import write_text


@dataclass
class LayerChange:
    """One growth step on one layer.

    ``op``: "widen" or "deepen". ``path``: the Linear's path in the final expanded model (for
    "deepen", the inserted Linear). ``before``/``after``: ``[in_features, out_features]`` of that Linear
    (``before`` is empty for an inserted layer);
    ``[in_channels, out_channels]`` for a widened Conv2d (``kind="Conv2d"``);
    ``[residual width, heads]`` for added attention heads (``kind="Attention"``, path ``blocks.<i>.qkv``). ``[residual width]`` for the TinyTransformer embedding width (``kind="Embedding"``, path ``tok``);
    ``[residual width, heads]`` of an inserted block for ``kind="TransformerBlock"`` (path ``blocks.<i>``). ``exact``: the operator preserves the function
    exactly (up to float rounding) for this layer; ``note`` says why or why not. ``detail``:
    operator-specific counts (copied, mean and fresh units; the Sequential index of insertion).
    ``base_path``: the module's path in the base model (None for an inserted module).
    ``weights``: ``{parameter name (relative to the module): [shape before, shape after]}`` for
    each of the module's parameters whose shape this step changed (every parameter of an
    inserted module, with ``[]`` before), as torch stores them: ``(out, in)`` for an
    ``nn.Linear``, ``(out, in, kh, kw)`` for a Conv2d, ``(in, out)`` for a Hugging Face ``Conv1D``.
    """

    op: str
    path: str
    kind: str
    init: str
    before: List[int]
    after: List[int]
    exact: bool
    note: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)
    base_path: Optional[str] = None
    weights: Dict[str, List[List[int]]] = field(default_factory=dict)


@dataclass
class ExpansionReport:
    """The result of ``expand``: parameter counts, per-layer changes and the measured preservation.

    ``preserving`` is the claim (every change exact); ``preservation_error`` is the measured
    ``max |expanded(x) - base(x)|`` on the check inputs in eval mode (None when there were none).
    ``specs`` records the specs applied, as dicts with a "type" key.
    """

    params_before: int
    params_after: int
    changes: List[LayerChange]
    specs: List[Dict[str, Any]]
    preserving: bool
    preservation_error: Optional[float] = None
    check_inputs_shape: Optional[List[int]] = None

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict of JSON types."""
        return asdict(self)

    def to_json(self, path: Optional[Union[str, Path]] = None, **kwargs) -> str:
        """The report as JSON text; also written to ``path`` when given (atomically), as the
        other result classes do (:class:`manifold_ext.probes.PathResult` and the rest).

        ``kwargs`` go to ``json.dumps``, e.g. ``indent=2``; ``to_json()`` and
        ``to_json(indent=2)`` return the same text as before ``path`` was accepted.
        """
        text = json.dumps(self.to_dict(), **kwargs)
        if path is not None:
            write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExpansionReport":
        """Inverse of ``to_dict``."""
        d = dict(d)
        d["changes"] = [LayerChange(**c) for c in d["changes"]]
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "ExpansionReport":
        """Inverse of :meth:`to_json`: JSON text, or a path to a file holding it."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """One line per change plus the totals, for logs."""
        lines = [
            f"{c.op} {c.path}{_was(c)} ({c.kind}, {c.init}): {c.before} -> {c.after}, "
            f"{'exact' if c.exact else 'not exact'}: {c.note}"
            for c in self.changes
        ]
        err = "not measured" if self.preservation_error is None else f"{self.preservation_error:.3g}"
        lines.append(f"params {self.params_before} -> {self.params_after}; preserving={self.preserving}; max error {err}")
        return "\n".join(lines)


def _was(change: LayerChange) -> str:
    """`` (base: PATH)`` where the module's base path differs from its grown one, `` (new)`` for
    an inserted module."""
    if change.base_path is None:
        return " (new)"
    return "" if change.base_path == change.path else f" (base: {change.base_path})"
