"""Where the computation runs: the device, and how many CPU threads torch uses.

Thread counts and reproducibility. vaelab picks torch's CPU thread count from the machine's
load (:mod:`vaelab.threads`), so the count must not change a run's numbers. Float32 matrix
products go through MKL, whose conditional numerical reproducibility (``MKL_CBWR=AUTO,STRICT``,
set by ``import vaelab``) makes them bitwise independent of the thread count. What it does not
cover changes with the count: oneDNN convolutions (their weight gradients) and float32
reductions long enough to be split between threads. :func:`threads_change_results` says when
a model is in that case; training then uses a count that does not depend on the load and
keeps it for the whole run, resumes included (:func:`training_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

import torch
from torch import nn

from . import threads as cpu_threads
from .errors import ConfigError

__all__ = [
    "select_device",
    "configure_threads",
    "follow_threads",
    "blas_reproducibility",
    "threads_change_results",
    "training_threads",
    "describe_machine",
]

#: CPU flags that change which float32/bf16 kernels MKL and oneDNN pick.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

#: MKL's ``mkl_cbwr_get`` arguments and results (mkl_service.h).
_MKL_CBWR_ALL, _MKL_CBWR_STRICT = -1, 0x10000
_MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSE4_1",
                 7: "SSE4_2", 8: "AVX", 9: "AVX2", 10: "AVX512_MIC", 11: "AVX512",
                 12: "AVX512_MIC_E1", 13: "AVX512_E1"}


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


def _mkl_cbwr_mode() -> int | None:
    """MKL's current CBWR mode (``mkl_cbwr_get(MKL_CBWR_ALL)``), None when torch has no MKL.

    torch links MKL statically into ``libtorch_cpu`` and exports MKL's service functions
    under their internal names (``mkl_serv_cbwr_get``)."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for candidate in (None, *(os.path.join(lib_dir, n) for n in ("libtorch_cpu.so",
                                                                    "libtorch_cpu.dylib"))):
        with contextlib.suppress(OSError, AttributeError):
            get = ctypes.CDLL(candidate).mkl_serv_cbwr_get
            get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
            return int(get(_MKL_CBWR_ALL))
    return None


def blas_reproducibility() -> dict[str, Any]:
    """Whether this process's float32 matrix products are independent of the thread count.

    Returns:
        ``{"blas": "mkl" | "other", "mkl_cbwr": "AUTO,STRICT" | "OFF" | ... | None,
        "thread_invariant_matmul": bool}``: MKL's conditional numerical reproducibility
        mode as MKL reports it (None when it cannot be read), and whether it is strict
        (bitwise equal results for any thread count).
    """
    if not torch.backends.mkl.is_available():
        return {"blas": "other", "mkl_cbwr": None, "thread_invariant_matmul": False}
    mode = _mkl_cbwr_mode()
    if mode is None:
        return {"blas": "mkl", "mkl_cbwr": None, "thread_invariant_matmul": False}
    strict = bool(mode & _MKL_CBWR_STRICT)
    name = _MKL_BRANCHES.get(mode & 0xFFFF, str(mode & 0xFFFF)) + (",STRICT" if strict else "")
    return {"blas": "mkl", "mkl_cbwr": name, "thread_invariant_matmul": strict}


def threads_change_results(model: nn.Module, device: torch.device,
                           compiled: bool = False) -> str | None:
    """Why the CPU thread count can change ``model``'s float32 results (None: it cannot).

    On CUDA the CPU threads do not compute. On the CPU the count is harmless when MKL is
    strict (:func:`blas_reproducibility`), the model has no convolutions and the step is not
    compiled (``compiled``: torch.compile's CPU kernels split their loops and reductions for
    the thread count they were compiled for); otherwise the returned reason names what
    depends on it.
    """
    if device.type != "cpu":
        return None
    if compiled:
        return "kernels compiled by torch.compile (train.compile)"
    blas = blas_reproducibility()
    if not blas["thread_invariant_matmul"]:
        return (f"MKL's conditional numerical reproducibility is {blas['mkl_cbwr'] or 'unknown'}"
                if blas["blas"] == "mkl" else "the BLAS is not MKL")
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return "oneDNN convolutions"
    return None


def training_threads(requested: int | None, model: nn.Module, device: torch.device,
                     processes_on_node: int = 1, recorded: int | None = None,
                     compiled: bool = False) -> dict[str, Any]:
    """Set the thread count of a training run once its model is built; return what to
    record in its checkpoints.

    When the count cannot change the results (:func:`threads_change_results`), vaelab's
    load-following choice stays (:func:`configure_threads`). Otherwise the count must not
    depend on the load: ``requested`` (``train.threads``) or ``OMP_NUM_THREADS`` when set,
    else the count ``recorded`` by the run being resumed, else the cores this process may
    use; it is kept for the whole run.

    Returns:
        ``{"threads", "fixed", "why", **blas_reproducibility()}``.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    why = threads_change_results(model, device, compiled)
    if why is None:
        threads = configure_threads(requested, device, processes_on_node)
    else:
        threads = cpu_threads.decide_fixed(requested or recorded, processes_on_node).threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return {"threads": threads, "fixed": why is not None, "why": why, **blas_reproducibility()}


def describe_machine() -> dict[str, Any]:
    """What computed this process's numbers: the CPU model and the flags that choose its
    kernels (:data:`KERNEL_FLAGS`), torch's version, CPU capability and BLAS, and MKL's
    reproducibility mode. CI prints it first, so that a log says what it ran on."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    config = torch.__config__.show()
    blas = next((line.strip(" -") for line in config.splitlines()
                 if "Math Kernel Library" in line or "OpenBLAS" in line), "unknown")
    return {"cpu": model, "cores": os.cpu_count(),
            "kernel_flags": [f for f in KERNEL_FLAGS if f in flags],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas_library": blas, **blas_reproducibility(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
