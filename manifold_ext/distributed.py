"""Spread the work over the processes of ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Launch any entry point with ``torchrun`` (one node: ``torchrun --nproc-per-node N -m
manifold_ext.cli compare ...``; several: the usual ``--nnodes``/``--rdzv-*`` rendezvous) and call
:func:`init` first (the command line does). Then:

* :func:`manifold_ext.engine.evaluate`, and so every probe and estimator, shards the rows of its
  coefficients (the points) across the ranks in blocks aligned to its chunks of points, and every
  rank gets all the results: the same values, bitwise on the CPU, as one process evaluating the
  same chunks.
* :func:`manifold_ext.compare.compare` spreads the (seed, candidate) units across the ranks;
  inside a unit nothing is sharded (:func:`local`).

A rank that fails or vanishes makes the others' next collective fail within the process group's
timeout (and ``torchrun`` stops the others as soon as one exits with an error): a
:class:`DistributedError` then names the rank and the cause, never a hang.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# Whether evaluations shard their points, per context: a local() block in one thread or task does
# not reach evaluations running in another.
_SHARDING: contextvars.ContextVar[bool] = contextvars.ContextVar("manifold_ext_sharding", default=True)


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, vanished or timed out."""


def init(*, backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), once.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective waits for the other ranks before failing (default
            ``MANIFOLD_EXT_DIST_TIMEOUT`` seconds, else 300).

    Returns:
        True when running on more than one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(
            os.environ.get("MANIFOLD_EXT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return active()


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints, draws progress bars and writes the reports: rank 0."""
    return rank() == 0


def sharding() -> bool:
    """Whether evaluations now shard their points across the ranks."""
    return active() and _SHARDING.get()


@contextlib.contextmanager
def local():
    """Inside, evaluations do not shard their points: each rank works on its own task (the
    compare workflow's units)."""
    token = _SHARDING.set(False)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def shard(n: int, align: int = 1) -> Tuple[int, int]:
    """This rank's block ``[start, end)`` of ``n`` items, blocks made of whole groups of ``align``
    consecutive items (so that each rank's chunks are the single-process run's chunks)."""
    groups = -(-n // max(1, align))
    r, w = rank(), world()
    g0, g1 = groups * r // w, groups * (r + 1) // w
    return min(n, g0 * align), min(n, g1 * align)


def _collective(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - every backend failure becomes one clear error
        raise DistributedError(
            f"rank {rank()} of {world()}: {what} failed: another rank crashed, vanished or did not "
            f"arrive within the timeout ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def all_gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world()
    _collective("gathering results", dist.all_gather_object, out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _collective("sharing rank 0's data", dist.broadcast_object_list, box, 0)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    if active():
        _collective("waiting for the other ranks", dist.barrier)


def gather_rows(local_rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's block of rows (in rank order), on every rank."""
    if not active():
        return local_rows
    parts = all_gather(local_rows.cpu())
    return torch.cat(parts).to(local_rows.device)


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group (after waiting for every rank, unless ``wait`` is False: after a
    failure, when some rank may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if wait and active():
            barrier()
        dist.destroy_process_group()
