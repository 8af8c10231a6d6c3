"""``vaelab.allocator.keep_freed_memory``: glibc keeps freed tensor memory for the next batch
instead of faulting it in again (each case in a fresh interpreter: the setting is
process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="mallopt thresholds are glibc's (Linux)")

#: Allocates six tensors of 4 MB, frees them, then six of 12 MB and six of 28 MB, 10 times:
#: blocks that grow within a batch, as an estimator's do. Prints what keep_freed_memory
#: returned and the minor page faults of the 10 timed cycles. Arm "initial": glibc's
#: starting thresholds (128 KiB each) held fixed; glibc's own default moves them with the
#: blocks freed, so whether it faults depends on what the process freed before (it did in
#: 4 runs of 5 here): a deterministic baseline needs them fixed.
CYCLES = """
import ctypes, json, resource, sys
from vaelab import allocator
kept = None
if sys.argv[1] == "on":
    kept = allocator.keep_freed_memory()
elif sys.argv[1] == "initial":
    mallopt = ctypes.CDLL(None).mallopt
    kept = mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1
import torch

def cycle():
    for n in (1_000_000, 3_000_000, 7_000_000):  # float32: 4, 12 and 28 MB, pages written
        tensors = [torch.ones(n) for _ in range(6)]
        del tensors

for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""

PAGES_PER_CYCLE = 6 * 4 * (1_000_000 + 3_000_000 + 7_000_000) // 4096


def _cycles(arm: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", CYCLES, arm], env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    on = _cycles("on")
    assert on["kept"] is True
    assert on["faults"] < 0.05 * 10 * PAGES_PER_CYCLE, on
    initial = _cycles("initial")  # every block mapped afresh and unmapped when freed
    assert initial["kept"] is True
    assert initial["faults"] > 0.9 * 10 * PAGES_PER_CYCLE, (on, initial)


def test_your_own_malloc_settings_are_left_alone():
    assert _cycles("on", MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert _cycles("on", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")["kept"] is False
