"""Where the computation runs: the device, and how many CPU threads torch uses."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["select_device", "configure_threads"]


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


def configure_threads(threads: int | None, device: torch.device,
                      processes_on_node: int = 1) -> int:
    """Set torch's CPU threads and return the number.

    ``threads`` (``train.threads``) wins when given. Otherwise, with several processes on
    this node (torchrun) and a CPU device, each process gets ``OMP_NUM_THREADS`` (which
    torchrun sets to 1 unless you set it) or ``cpu_count // processes_on_node`` threads, so
    that the ranks do not oversubscribe the cores. One process keeps torch's default.
    """
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and processes_on_node > 1:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        share = max(1, (os.cpu_count() or 1) // processes_on_node)
        torch.set_num_threads(int(omp) if omp.isdigit() and int(omp) > 0 else share)
    return torch.get_num_threads()
