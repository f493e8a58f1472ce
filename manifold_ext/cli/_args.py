"""What the subcommands share: argument types, the one-line error, optional matplotlib."""

from __future__ import annotations

import argparse
from typing import Callable


class CommandError(Exception):
    """Bad input to a subcommand: printed as one line, exit status 2 (traceback with --debug)."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def have_matplotlib() -> bool:
    """Whether the optional plotting extra is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
