"""Benchmark: peak resident memory of a full default ``vaelab train`` run.

Runs ``vaelab train --out RUN_DIR`` (the default preset: Fashion-MNIST, dynamically
binarised, 784-512-256-16 MLP, 10 epochs, then the final test report with K = 1000
importance samples on all 10,000 test images) as a child process and reads its peak
resident set size from the kernel (``os.wait4`` -> ``ru_maxrss``: the true high-water
mark, not a sample). RSS is also sampled every ``--interval`` seconds from
``/proc/PID/status`` to show *when* the peak happens (training or the final report).
``--epochs N`` shortens training (the peak does not depend on the epoch count; say so
when quoting); ``--set`` passes further config overrides.

Run: ``python benchmarks/memory.py``; writes ``benchmarks/results/memory.json``.
``--smoke`` (CI): a tiny run (1 epoch, small sizes; with ``--dataset FILE.npz`` add
``--no-report``: a single user file has no test split).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["run_with_peak_rss", "main"]

#: Target from issue 5.
TARGET_MB = 1024

SMOKE_SETTINGS = [
    "data.validation_size=64", "data.test_limit=32", "train.batch_size=64",
    "train.eval_batch_size=64", "eval.is.samples=10", "model.hidden=32", "model.latent_dim=4",
]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def run_with_peak_rss(cmd: list[str], interval: float = 0.5) -> dict[str, Any]:
    """Run ``cmd``; return its exit code, wall time, ``ru_maxrss`` peak (MB), an RSS
    timeline ``[[seconds, MB], ...]`` and the last lines of its output."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline: list[list[float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            rss = _rss_mb(proc.pid)
            if rss is not None:
                timeline.append([round(time.perf_counter() - started, 1), round(rss, 1)])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_at = max(timeline, key=lambda p: p[1])[0] if timeline else None
    return {
        "returncode": proc.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "sampled_peak_at_seconds": peak_at,
        "rss_timeline": timeline,
        "output_tail": output.strip().splitlines()[-25:],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "memory")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the preset's 10; smoke 1)")
    parser.add_argument("--dataset", default=None, help="default: the preset's fashion-mnist")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling period (s)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the final test report (user .npz data has no test split)")
    args = parser.parse_args(argv)
    monitor = common.CpuMonitor()
    script = shutil.which("vaelab")
    base = [script] if script else [sys.executable, "-m", "vaelab"]
    settings = list(args.set) + (SMOKE_SETTINGS if args.smoke else [])
    epochs = args.epochs or (1 if args.smoke else None)
    with tempfile.TemporaryDirectory(prefix="vaelab-memory-") as tmp:
        cmd = [*base, "train", "--out", str(Path(tmp) / "run")]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        if args.dataset:
            cmd += ["--dataset", args.dataset]
        if args.threads:
            cmd += ["--set", f"train.threads={args.threads}"]
        for item in settings:
            cmd += ["--set", item]
        if args.no_report:
            cmd.append("--no-report")
        run = run_with_peak_rss(cmd, args.interval)
    if run["returncode"] != 0:
        print("\n".join(run["output_tail"]), file=sys.stderr)
        raise SystemExit(f"vaelab train failed with exit code {run['returncode']}")
    result = {
        "benchmark": "memory",
        "smoke": args.smoke,
        "argv": ["vaelab", *cmd[len(base):]],
        "epochs": epochs or 10,
        "final_report": not args.no_report,
        "peak_rss_mb": run["peak_rss_mb"],
        "target_mb": TARGET_MB,
        "meets_target": run["peak_rss_mb"] < TARGET_MB,
        "method": "os.wait4 ru_maxrss of the child (kernel high-water mark); timeline sampled "
                  "from /proc/PID/status VmRSS",
        **{k: v for k, v in run.items() if k not in ("peak_rss_mb", "returncode")},
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "memory", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
