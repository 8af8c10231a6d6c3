"""Shared helpers for the benchmark scripts: the machine, its matrix-multiply rate, matmul
FLOP counts, medians and JSON output.

Conventions (all scripts):

- Compare in one run: every script measures its reference (a plain loop, the machine's
  float32 matmul rate) in the same process as the thing it times, so the ratios hold even
  when the absolute speed of a shared machine drifts.
- Several repetitions, medians quoted; every repetition is kept in the JSON.
- The load average is recorded before and after: a figure taken while other processes
  competed for the cores is flagged ``"machine_busy": true``.
- ``--smoke`` runs a seconds-long version on tiny sizes (for CI); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "base_parser",
    "machine",
    "load_average",
    "median",
    "summarize",
    "matmul_rate",
    "linear_matmul_flops",
    "write_result",
    "CpuMonitor",
    "vaelab_epoch",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Environment variables that change how torch's OpenMP threads behave (recorded).
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
              "KMP_BLOCKTIME")

#: Share of the machine's CPU time used by other processes above which figures are flagged.
BUSY_OTHER_SHARE = 0.1


def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Arguments shared by every benchmark: ``--smoke``, ``--repeats``, ``--out``, ``--threads``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a few seconds (CI): checks the script, not the speed")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions (median quoted; default 5, smoke 1)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default: benchmarks/results/{name}.json; "
                   f"smoke: not written unless given)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default, the core count)")
    return p


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where unavailable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on POSIX
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures came from: CPU, cores, memory, Python, torch and its threads."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": {k: os.environ.get(k) for k in THREAD_ENV if os.environ.get(k) is not None},
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    return info


def source_digest() -> str:
    """SHA-256 over the vaelab package's .py files (which code produced these numbers)."""
    import hashlib

    import vaelab

    root = Path(vaelab.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (at least one)."""
    return float(statistics.median(values))


def summarize(seconds: Sequence[float], examples: int | None = None) -> dict[str, Any]:
    """``{"seconds": median, "best_seconds": min, "all_seconds": [...],
    "examples_per_second": ...}`` (from the median). The minimum is the repetition least
    disturbed by the rest of the machine; the median is the figure quoted."""
    out: dict[str, Any] = {"seconds": round(median(seconds), 4),
                           "best_seconds": round(min(seconds), 4),
                           "all_seconds": [round(s, 4) for s in seconds]}
    if examples is not None:
        out["examples_per_second"] = round(examples / median(seconds), 1)
    return out


def matmul_rate(n: int = 2048, repeats: int = 5, min_seconds: float = 0.3) -> dict[str, Any]:
    r"""The machine's float32 matrix-multiply rate, GFLOP/s (``2 n^3`` FLOPs per product).

    Each repetition times enough ``(n, n) @ (n, n)`` products to take ``min_seconds``,
    after two warm-up products, with the current torch thread setting; the median of
    ``repeats`` repetitions is quoted.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    flops = 2.0 * n**3
    rates = []
    for _ in range(repeats):
        count, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        rates.append(flops * count / elapsed / 1e9)
    return {"gflops": round(median(rates), 3), "all_gflops": [round(r, 3) for r in rates],
            "n": n, "dtype": "float32"}


def linear_matmul_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs executed by ``fn()`` (forward and, if it calls it, backward),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def write_result(result: dict[str, Any], out: Path | None, name: str, smoke: bool) -> Path | None:
    """Print ``result`` as JSON and write it to ``out`` (default ``results/<name>.json``;
    smoke runs write only when ``out`` is given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is None and smoke:
        return None
    path = out if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return path


def _busy_jiffies() -> float | None:
    """CPU time (seconds) all processes have spent busy since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:  # pragma: no cover - not Linux
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(f) for f in fields)
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuMonitor:
    """How much of the machine *other* processes used while we measured.

    ``other_cpu_share`` = (CPU time of all processes - our own, incl. our children) /
    (cores * wall time), from /proc/stat (steal time counts as other). Above
    :data:`BUSY_OTHER_SHARE` the figures are flagged ``machine_busy``: another process took
    a core from torch's threads, and the timings (not only the ratios) suffer.
    """

    def __init__(self) -> None:
        self.load_before = load_average()
        self.busy0 = _busy_jiffies()
        self.own0 = _own_cpu_seconds()
        self.wall0 = time.perf_counter()

    def report(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        out: dict[str, Any] = {"load_average_before": self.load_before,
                               "load_average_after": load_average()}
        busy1 = _busy_jiffies()
        if self.busy0 is None or busy1 is None or wall <= 0:
            out["other_cpu_share"], out["machine_busy"] = None, None
            return out
        other = max(0.0, (busy1 - self.busy0) - (_own_cpu_seconds() - self.own0))
        share = other / ((os.cpu_count() or 1) * wall)
        out["other_cpu_share"] = round(share, 3)
        out["machine_busy"] = share > BUSY_OTHER_SHARE
        return out


def vaelab_epoch(cfg, workdir: Path) -> tuple[float, dict[str, Any]]:
    """Train one epoch with :func:`vaelab.train.train_and_evaluate`; ``(epoch seconds,
    metrics record)``."""
    from vaelab.train import train_and_evaluate

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    train_and_evaluate(cfg, run_dir, progress=False, echo=lambda _line: None)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return float(record["seconds"]), record
