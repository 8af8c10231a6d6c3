"""Benchmark: ``vaelab eval`` with and without :func:`vaelab.allocator.keep_freed_memory`.

Evaluation allocates and frees large ``(K, B, ...)`` tensors every batch; with glibc's
default thresholds the freed memory goes back to the kernel and every page faults in again
(:mod:`vaelab.allocator`). This runs ``vaelab eval RUN_DIR ARGS...`` in fresh processes,
alternating the two arms (``off``: ``keep_freed_memory`` replaced by a no-op before the CLI
starts; ``on``: the CLI as shipped), ``--repeats`` times each, with ``--threads`` torch
threads (``OMP_NUM_THREADS``), and records for each process its wall seconds, user and
system CPU seconds, minor page faults and peak resident memory (``os.wait4``), and the NLL
it printed (the two arms must print the same).

Run: ``python benchmarks/allocator.py --run-dir RUN --threads 2 --repeats 3 -- --split test
--estimator is --iw-samples 5000 --limit 200 --data-dir DIR``; writes
``benchmarks/results/allocator.json``. ``--smoke`` (CI): one repetition of each arm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "allocator"
ARMS = ("off", "on")
_OFF = "import vaelab.allocator as a; a.keep_freed_memory = lambda: False; "


def _one(arm: str, run_dir: str, eval_args: list[str], threads: int | None) -> dict[str, Any]:
    """One ``vaelab eval`` process; its resource use and the NLL line it printed."""
    code = (f"{_OFF if arm == 'off' else ''}from vaelab.cli import main; import sys; "
            "raise SystemExit(main(sys.argv[1:]))")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, "eval", run_dir, *eval_args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"vaelab eval failed ({arm}):\n{output[-2000:]}")
    nll = next((line.strip() for line in output.splitlines() if line.startswith("NLL")), None)
    return {"arm": arm, "wall_seconds": round(wall, 3), "user_seconds": round(usage.ru_utime, 3),
            "system_seconds": round(usage.ru_stime, 3), "minor_faults": usage.ru_minflt,
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "nll_line": nll}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = common.base_parser(__doc__.splitlines()[0], NAME)
    parser.add_argument("--run-dir", required=True, help="a trained run to evaluate")
    args = parser.parse_args(own)
    repeats = args.repeats or (1 if args.smoke else 3)
    monitor = common.CpuMonitor()
    runs: list[dict[str, Any]] = []
    for rep in range(repeats):  # alternate which arm goes first
        for arm in ARMS if rep % 2 == 0 else ARMS[::-1]:
            row = _one(arm, args.run_dir, eval_args, args.threads)
            row["repetition"] = rep + 1
            runs.append(row)
            print(row, file=sys.stderr, flush=True)
    medians = {arm: {key: common.median([r[key] for r in runs if r["arm"] == arm])
                     for key in ("wall_seconds", "user_seconds", "system_seconds",
                                 "minor_faults", "max_rss_mb")} for arm in ARMS}
    result = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "eval_args": eval_args,
        "threads": args.threads,
        "repeats": repeats,
        "runs": runs,
        "median": medians,
        "wall_speedup_on_vs_off": round(medians["off"]["wall_seconds"]
                                        / medians["on"]["wall_seconds"], 3),
        "same_nll": len({r["nll_line"] for r in runs}) == 1,
        "command": "python benchmarks/allocator.py " + " ".join(argv),
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, NAME, args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
