"""Where the computation runs: the device, and how many CPU threads torch uses."""

from __future__ import annotations

import torch

from . import threads as cpu_threads
from .errors import ConfigError

__all__ = ["select_device", "configure_threads", "follow_threads"]


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; otherwise the named device (``cpu``, ``cuda:1``).

    Raises:
        ConfigError: not a device name, or CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available: use cpu or auto")
    return device


def configure_threads(threads: int | None = None, device: torch.device | None = None,
                      processes_on_node: int = 1) -> int:
    """Set torch's intra-op CPU threads by vaelab's rule and return the number.

    The rule is :func:`vaelab.threads.choose`: ``threads`` (``train.threads``) wins, then
    ``OMP_NUM_THREADS``; with several processes on this node (torchrun) each gets
    ``cores // processes_on_node``; one process gets the cores that are free (affinity,
    cgroup quota, other processes' load measured at start-up, other vaelab runs). When it
    differs from the core count, one line says so (:func:`vaelab.threads.report`: at the
    first training step, or when a CLI command ends), once per process, on rank 0.

    From the Python API (``train_and_evaluate`` without the CLI) the thread count is
    applied here, but the OpenMP wait policy cannot change any more: libgomp read
    ``OMP_WAIT_POLICY`` when torch was imported. Call :func:`vaelab.threads.startup`
    before ``import torch`` (or set ``OMP_WAIT_POLICY=PASSIVE``) for that.

    ``device`` is accepted for compatibility; the rule does not depend on it.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    choice = cpu_threads.decide(threads, processes_on_node)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return torch.get_num_threads()


def follow_threads() -> None:
    """Between training steps: give threads back when another vaelab run starts, take them
    again when it ends (:func:`vaelab.threads.follow`; a clock read unless something
    changed), and say once what was chosen. Call it from the thread that computes."""
    choice = cpu_threads.follow()
    if choice is not None:
        torch.set_num_threads(choice.threads)
    cpu_threads.report()
