"""torch.distributed glue: process-group setup under ``torchrun``, rank helpers, sums.

vaelab runs unchanged in one process or under ``torchrun --nproc_per_node=N``
(which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). Backend: NCCL on CUDA, gloo on CPU.

Failure handling, so that no rank waits forever:

- Every collective has a timeout: ``VAELAB_DIST_TIMEOUT`` seconds (default
  :data:`DEFAULT_TIMEOUT_SECONDS`). A rank that is stuck (or on a vanished node)
  makes the others fail after that long instead of hanging.
- :func:`agree` wraps the setup phase (checks, data, model, resume): an error on
  any rank is exchanged, and every rank stops with a one-line message naming the
  rank that failed, before any rank enters the training collectives.
- :func:`lost_contact` turns a communication failure inside the training loop
  (peer closed the connection, timeout) into a :class:`~vaelab.errors.VaelabError`
  that says which rank noticed and where to look. On one node ``torchrun`` also
  stops the surviving ranks as soon as one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, VaelabError

__all__ = [
    "Context",
    "DEFAULT_TIMEOUT_SECONDS",
    "DistributedError",
    "agree",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "lost_contact",
    "rank_device",
    "setup",
    "sum_over_ranks",
    "teardown",
    "timeout_seconds",
]

#: Collective timeout when ``VAELAB_DIST_TIMEOUT`` is not set (seconds).
DEFAULT_TIMEOUT_SECONDS = 600.0


class DistributedError(VaelabError):
    """Another rank failed, stopped answering, or disagreed: this rank stops too."""


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world_size``; rank 0 writes files.

    ``local_rank`` / ``local_world_size`` count the processes on this node (GPU index,
    CPU threads). ``owns_group`` is True when :func:`setup` created the default process
    group (so :func:`teardown` destroys it). ``side_group`` is a second gloo/NCCL group
    for collectives issued inside autograd (see :func:`sum_over_ranks`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False
    side_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout_seconds() -> float:
    """The collective timeout: ``VAELAB_DIST_TIMEOUT`` (seconds, > 0) or the default."""
    raw = os.environ.get("VAELAB_DIST_TIMEOUT")
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(
            f"VAELAB_DIST_TIMEOUT = {raw!r} is not a positive number of seconds: "
            f"unset it (default {DEFAULT_TIMEOUT_SECONDS:g} s) or set e.g. 600"
        )
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {raw!r} is not an integer: "
                          "launch with torchrun, which sets it") from None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device this rank uses: ``cuda:<local_rank>`` for CUDA, ``device`` otherwise."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def setup(device: torch.device) -> Context:
    """Join the process group when launched by torchrun; a one-process context otherwise.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. If the default
    process group already exists (the caller initialised it), it is used as is. Backend:
    NCCL for CUDA devices, gloo otherwise; timeout :func:`timeout_seconds`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if world_size <= 1:
        return Context()
    timeout = datetime.timedelta(seconds=timeout_seconds())
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    owns = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError(f"WORLD_SIZE is {world_size} but RANK is not set: launch "
                              "with torchrun --nproc_per_node=N, which sets both")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(rank_device(device, local_rank))
        dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank, local_world_size=local_world,
                   owns_group=owns, side_group=_side_group(timeout))


_SIDE_GROUPS: dict[int, Any] = {}


def _side_group(timeout: datetime.timedelta) -> Any:
    """One extra group per default group (created collectively, on first use, then reused)."""
    key = id(dist.group.WORLD)
    if key not in _SIDE_GROUPS:
        _SIDE_GROUPS.clear()
        _SIDE_GROUPS[key] = dist.new_group(timeout=timeout)
    return _SIDE_GROUPS[key]


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it (safe to call twice)."""
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        _SIDE_GROUPS.clear()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place and returned); identity in one process.

    Every rank gets the same bits, so decisions made from the result agree.
    """
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint)."""
    if ctx.enabled:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum whose gradient is the all-reduced sum of the upstream gradients."""

    @staticmethod
    def forward(fn_ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D401
        fn_ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=fn_ctx.group)
        return grad, None


def sum_over_ranks(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    r"""Differentiable sum over ranks: ``S = \sum_r t_r`` with ``dS/dt_r = 1``.

    Use it for a batch statistic that must be global (e.g. the batch-mean KL per
    dimension that free bits clamp): each rank's gradient then carries every rank's
    use of ``S``, and DDP's gradient average gives the one-process gradient. Runs on
    ``ctx.side_group`` so it never interleaves with DDP's own all-reduces. Identity
    in one process.
    """
    if not ctx.enabled:
        return tensor
    return _SumOverRanks.apply(tensor, ctx.side_group)


def _describe(exc: BaseException) -> str:
    """One line: a VaelabError's message, else ``Type: first sentence`` (no source paths)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, VaelabError):
        return text
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo prefixes "[.../pair.cc:553] "
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def agree(ctx: Context, stage: str) -> Iterator[None]:
    """Run a block on every rank; if it fails on any rank, fail on all of them.

    After the block each rank tells the others whether it failed (one small
    all-gather, so the block itself must not run collectives). The failing rank
    re-raises its own exception; the others raise :class:`DistributedError` naming it.
    """
    if not ctx.enabled:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # exchanged below, then re-raised
        error = exc
    reports: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(reports, None if error is None else _describe(error))
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(reports) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise DistributedError(
            f"rank {rank} failed during {stage}, so rank {ctx.rank} stops too: {msg}"
        )


_COMM_MARKERS = ("gloo", "nccl", "timed out", "connection closed", "connection reset",
                 "broken pipe")


def _is_communication_error(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMM_MARKERS)


@contextlib.contextmanager
def lost_contact(ctx: Context, stage: str) -> Iterator[None]:
    """Turn a failed collective (peer gone, timeout) into a one-line :class:`DistributedError`."""
    try:
        yield
    except Exception as exc:
        if not ctx.enabled or not _is_communication_error(exc):
            raise
        raise DistributedError(
            f"rank {ctx.rank} lost contact with the other ranks during {stage} "
            f"({_describe(exc)}): another rank failed or stopped answering within "
            f"{timeout_seconds():g} s (VAELAB_DIST_TIMEOUT); its error is in the log above"
        ) from exc
