"""A compare run's directory: ``config.json`` (what a resumed run must match), ``units/`` (one
file per finished unit, written as it finishes, so that ``--resume`` continues a killed run) and
the checks of ``out`` before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, List, Optional

from ._io import write_text

UNIT_KEYS = ("seed", "candidate", "parameters", "preservation_error", "test_accuracy", "test_loss", "sizes",
             "baselines", "estimates")


def safe_name(name: str) -> str:
    """A candidate's name as a file name: characters other than letters, digits, '-', '_' and '.'
    become '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def check_out(out: Path) -> None:
    """ValueError (``out: ...``) when ``out`` cannot be a run's output directory: it is a file, or
    a file stands where one of its parents must be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory (a run writes a directory of results)")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"out: {str(out)!r} cannot be created: {str(blocker)!r} is a file, not a directory")


def differences(old: dict, new: dict, keys: List[str], default_settings: dict) -> str:
    """What differs between a run's config and this one, by name, with both values (a setting
    absent from either counts as its default)."""
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if k == "settings" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                va, vb = a.get(name, default_settings.get(name)), b.get(name, default_settings.get(name))
                if json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
                    parts.append(f"setting {name}: {va!r} in the run, {vb!r} now")
        elif k == "candidates" and isinstance(a, list) and isinstance(b, list):
            names_a, names_b = [c.get("name") for c in a], [c.get("name") for c in b]
            parts.append(f"candidates: {names_a} in the run, {names_b} now" if names_a != names_b
                         else "candidates: the same names with other specs")
        elif k == "minima_batches":
            def rule(n):
                return ("batches of 64 (an earlier version of minima)" if n is None
                        else f"batches of ceil(N / {n}) of its N training examples")
            parts.append(f"minima's runs took {rule(a)} in the run, {rule(b)} now")
        else:
            parts.append(f"{k}: {a!r} in the run, {b!r} now")
    return "; ".join(parts) or "its config differs"


def check_config(out: Path, config: dict, resume: bool, default_settings: dict) -> None:
    """Start the run directory ``out`` with ``config``, or, with ``resume``, check that the run
    there was made with the same config (a ValueError names what differs)."""
    path = out / "config.json"
    if path.exists():
        if not resume:
            raise ValueError(f"{out} already holds a compare run; pass resume=True (--resume) to "
                             "continue it, or choose another output directory")
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is corrupt ({err}); remove the directory to start afresh") from None
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff == ["base"]:
                raise ValueError(f"cannot resume {out}: it was run from another base (its base: "
                                 f"{old.get('base') or 'trained by compare'}; this one: "
                                 f"{config.get('base') or 'trained by compare'})")
            raise ValueError(f"cannot resume {out}: "
                             f"{differences(old, json.loads(json.dumps(config)), diff, default_settings)}; "
                             f"resume with the run's settings, or choose another output directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(config, indent=1, sort_keys=True, default=str))


def unit_path(out: Path, seed: int, candidate: str) -> Path:
    """Where the unit of ``candidate`` (a name) at ``seed`` is kept."""
    return out / "units" / f"seed{seed}" / f"{safe_name(candidate)}.json"


def write_unit(path: Path, unit: dict) -> None:
    """A finished unit to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(unit, indent=1))


def load_unit(path: Path, seed: int, candidate: str, estimators: Iterable[str],
              baselines: Iterable[str]) -> Optional[dict]:
    """The finished unit in ``path``, or None when it must be computed: absent, or unreadable
    (torn, corrupt, not this seed's and candidate's unit, or without one of the run's metrics),
    which is reported in one line on stderr naming the file."""
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        problem = None
        if not isinstance(unit, dict):
            problem = f"holds a JSON {type(unit).__name__}, not a unit"
        elif any(k not in unit for k in UNIT_KEYS):
            problem = f"lacks {[k for k in UNIT_KEYS if k not in unit]}"
        elif unit["seed"] != seed or unit["candidate"] != candidate:
            problem = f"holds seed {unit['seed']!r}, candidate {unit['candidate']!r}"
        elif not isinstance(unit["sizes"], dict) or any(e not in unit["sizes"] for e in estimators) \
                or not isinstance(unit["baselines"], dict) or any(b not in unit["baselines"] for b in baselines):
            problem = "lacks some of the run's metrics"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"cannot be read ({type(err).__name__})"
    if problem is None:
        return unit
    print(f"compare: {path} {problem}: computing that unit again", file=sys.stderr)
    return None
