"""What the subcommands share: argument types, the one-line error, --device, optional matplotlib."""

from __future__ import annotations

import argparse
from typing import Callable

import torch


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


DEVICES = ("auto", "cpu", "cuda")

DEVICE_HELP = ("where to compute: cpu, cuda (the current CUDA device) or auto (cuda when "
               "torch.cuda.is_available(), else cpu) (default: auto)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda|auto`` (default auto), resolved by :func:`resolve_device`."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def resolve_device(choice: str) -> torch.device:
    """The device ``--device choice`` names: ``auto`` is cuda when ``torch.cuda.is_available()``,
    else cpu; ``cuda`` is the current CUDA device (under torchrun, the rank's own). ``cuda``
    without a CUDA device is a CommandError."""
    if choice not in DEVICES:
        raise CommandError(f"--device must be one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    elif choice == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                           "use --device cpu or auto")
    if choice == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def have_matplotlib() -> bool:
    """Whether the optional plotting extra is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
