"""The ``manifold-ext`` command line.

Subcommands (one module each):
  compare rank candidate expansions by manifold size and every baseline against their gains
  info   what the compiled kernels were built with, and the devices (JSON)
  demo   the fused ops on a line between two trained MLPs, checked against the naive loop
  probe  a loss-landscape probe (line, barrier, plane, simplex) of saved checkpoints: JSON and a plot
  expand grow a saved model (--widen, --deepen), check function preservation, save it and its report
  bench  run the repository's benchmark scripts by name (--list)

Bad input is reported as one line on stderr with exit status 2; ``--debug`` shows the traceback.
Under ``torchrun`` (``torchrun --nproc-per-node N -m manifold_ext.cli compare ...``) the work is
spread across the processes and rank 0 prints and writes; a failed or vanished rank ends the run
with exit status 3 and one line naming the failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import distributed as D
from . import bench, compare, demo, expand, info, probe
from ._args import CommandError

_COMMANDS = (compare, info, demo, probe, expand, bench)
# What counts as the user's bad input rather than a bug: reported in one line.
_USER_ERRORS = (CommandError, ValueError, TypeError, KeyError, FileNotFoundError, IsADirectoryError,
                PermissionError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manifold-ext",
        description="Rank model expansions by the size of their low-loss manifold.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``manifold-ext`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 when a check the command makes fails, 2 for bad
    input (one line on stderr; the traceback with ``--debug``), 3 when another rank of a
    distributed run failed. Invalid arguments raise
    ``SystemExit(2)`` with argparse's message.
    """
    args = _parser().parse_args(argv)
    try:
        D.init()  # under torchrun: join the process group (see manifold_ext.distributed)
        status = args.run(args)
        D.shutdown()
        return status
    except _USER_ERRORS as err:
        D.shutdown(wait=False)
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        where = f" (rank {D.rank()} of {D.world()})" if D.active() else ""
        print(f"manifold-ext {args.command}{where}: error: {message}", file=sys.stderr)
        return 2
    except D.DistributedError as err:
        D.shutdown(wait=False)
        if args.debug:
            raise
        print(f"manifold-ext {args.command}: error: {err}", file=sys.stderr)
        return 3
