"""The C allocator under torch's CPU tensors: keep freed memory for the next batch (glibc).

torch allocates CPU tensors with the C library's ``malloc``. By default glibc gives freed
memory at the top of its heap back to the kernel once it exceeds ``M_TRIM_THRESHOLD``
(twice the largest block freed so far) and serves blocks above ``M_MMAP_THRESHOLD`` with
fresh ``mmap`` calls, so a loop that frees a batch's intermediate tensors together and
allocates them again for the next batch (the estimators' ``(K, B, ...)`` decoder outputs)
faults every page in again: evaluating ``mnist-vampprior`` by importance sampling with
K = 5,000 spent a fifth of its CPU time in the kernel (3 million minor page faults for
100 images). :func:`keep_freed_memory` raises both thresholds with ``mallopt``.

Torch-free: the CLI calls it before a command's handler imports torch.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

#: Blocks up to this size come from the heap (bytes; glibc's largest allowed value on
#: 64-bit systems, 32 MiB). Larger blocks are still mapped and unmapped one by one.
MMAP_THRESHOLD = 32 * 2**20

#: Freed memory at the top of the heap is kept up to this size (bytes) instead of being
#: returned to the kernel: a process's resident size stays near its peak.
TRIM_THRESHOLD = 256 * 2**20

#: Environment variables through which you tune glibc's malloc yourself.
_YOURS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
          "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`MMAP_THRESHOLD` and
    :data:`TRIM_THRESHOLD` for this process (it applies to later allocations).

    ``vaelab`` commands call it at start; call it yourself before evaluating from the
    Python API. Leaves malloc alone (returns False) off glibc (macOS, Windows, musl) and
    when you tune it already (``MALLOC_*_`` variables or ``glibc.malloc`` tunables in
    ``GLIBC_TUNABLES``).

    Returns:
        Whether both thresholds were set.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _YOURS):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
