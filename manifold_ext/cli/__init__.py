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
import difflib
import os
import sys
from typing import Optional, Sequence

from .. import distributed as D
from . import bench, compare, demo, expand, info, probe
from ._args import CommandError

_COMMANDS = (compare, info, demo, probe, expand, bench)
# What counts as the user's bad input rather than a bug: reported in one line.
_USER_ERRORS = (CommandError, ValueError, TypeError, KeyError, FileNotFoundError, IsADirectoryError,
                PermissionError)


class _Parser(argparse.ArgumentParser):
    """argparse, but an unknown option is reported by the subcommand it was given to, with the
    closest valid option suggested."""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommand(getattr(namespace, "command", None))
            target = command or self
            unknown = extras[0]
            options = [o for a in target._actions for o in a.option_strings]
            close = difflib.get_close_matches(unknown.split("=")[0], options, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            target.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace

    def _subcommand(self, name):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix such as --seed is never taken for --seeds.
    parser = _Parser(prog="manifold-ext", description="Rank model expansions by the size of their low-loss manifold.",
                     allow_abbrev=False)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub, common)
    for p in sub.choices.values():
        p.allow_abbrev = False
    return parser


def _resume_hint(args) -> str:
    if args.command != "compare":
        return ""
    return (" finished work is kept: run the same command with --out DIR --resume (DIR: the output directory it "
            "printed) to continue")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``manifold-ext`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 when a check the command makes fails, 2 for bad
    input (one line on stderr; the traceback with ``--debug``), 3 when another rank of a
    distributed run failed, 130 after Ctrl-C (one line; for compare, how to resume), 2 also when
    a file cannot be written or read (a full or read-only disk: one line), 141 when
    the reader of its output has gone (``| head``). Invalid arguments raise ``SystemExit(2)``
    with argparse's message, from the subcommand, suggesting the closest valid option; an
    option is never abbreviated.
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
    except KeyboardInterrupt:
        D.shutdown(wait=False)
        if args.debug:
            raise
        print(f"manifold-ext {args.command}: interrupted;{_resume_hint(args) or ' nothing was saved'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone: stop quietly, and keep Python's own flush at exit quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as err:  # not the user's input: the disk or the system (a full disk, a read-only one)
        D.shutdown(wait=False)
        if args.debug or err.strerror is None:
            raise
        where = f" {err.filename}" if err.filename else ""
        hint = _resume_hint(args)
        print(f"manifold-ext {args.command}: error: cannot write or read{where}: {err.strerror}"
              f"{';' + hint if hint else ''}", file=sys.stderr)
        return 2
    except D.DistributedError as err:
        D.shutdown(wait=False)
        if args.debug:
            raise
        print(f"manifold-ext {args.command}: error: {err}", file=sys.stderr)
        return 3
