"""What the result dataclasses of the probes, estimators and baselines share: a JSON round trip
(``to_json(path)``/``from_json``) and the figure their ``plot()`` draws on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from ._io import write_text


class Result:
    """JSON round trip shared by the result dataclasses."""

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps({"type": type(self).__name__, **dataclasses.asdict(self)}, indent=1)
        if path is not None:
            write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]):
        """Inverse of :meth:`to_json` (JSON text or a path to a file holding it)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        data = json.loads(text)
        kind = data.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"expected JSON of a {cls.__name__}, got a {kind}")
        return cls(**data)


def figure(ncols: int = 1, title: Optional[str] = None):
    """A matplotlib ``Figure`` (not attached to pyplot) with ``ncols`` axes side by side, and
    ``title`` above them when given."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot() needs matplotlib: pip install 'manifold_ext[plot]'") from err
    fig = Figure(figsize=(5 * ncols, 3.6 if title is None else 3.9), layout="constrained")
    if title is not None:
        fig.suptitle(title, fontsize=10)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
