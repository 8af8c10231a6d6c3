"""Benchmark: one run alone and two runs at once, with torch's old thread defaults and vaelab's.

Issue 17's table in one script. Each run is the child process

    vaelab train --preset pytorch-example --dataset fashion-mnist --epochs 1
                 --set data.train_limit=20000 --set data.validation_size=0 --no-report

in four set-ups:

- ``alone_old``: one run with torch's old defaults: ``OMP_NUM_THREADS`` = torch's default
  thread count (measured in a clean child process) and ``OMP_WAIT_POLICY`` unset. An
  explicit ``OMP_NUM_THREADS`` turns vaelab's rule off, so this is exactly the old
  behaviour.
- ``alone_new``: one run with vaelab's rule (neither variable set).
- ``two_old`` / ``two_new``: two runs started at the same moment, old or new defaults.

Per run, throughput is the epoch's ``examples_per_second`` from ``metrics.jsonl`` (the
batch loop only, not start-up or data loading); a trial's total is the sum over its runs.
Two runs started together do not start their loops at exactly the same time, so every
two-run trial reports ``overlap``: the time both loops ran / the shorter loop's time
(a loop ends at its ``metrics.jsonl`` write and lasted ``seconds``); below
:data:`MIN_OVERLAP` the trial is flagged. The runs use a private registry of vaelab runs
(``VAELAB_THREADS_REGISTRY``), so other vaelab processes on the machine are not counted
as the other run.

Repetitions are interleaved: repetition ``r`` runs the four set-ups in an order rotated
by ``r``, with ``--pause`` seconds between trials; medians over repetitions are quoted
(per run and for the totals) and every trial is kept.

Target (issue 17): two runs at once with the new defaults deliver at least
:data:`TARGET_TWO_VS_ONE` x the total throughput of one run alone, and one run alone is no
slower than with the old defaults (``alone_new / alone_old >= 1 - ALONE_TOLERANCE``).

Only meaningful on an otherwise idle machine (``cpu_load.machine_busy`` must be false).
Run: ``python benchmarks/threads.py [--repeats 5]``; writes
``benchmarks/results/threads.json``. ``--smoke`` (CI): ``--dataset FILE.npz`` of a few
hundred images, one repetition, no pause; its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["SETUPS", "overlap", "run_trial", "summarize_setup", "main"]

#: Issue 17's targets.
TARGET_TWO_VS_ONE = 1.1
ALONE_TOLERANCE = 0.05
#: Two-run trials whose loops overlapped less than this are flagged.
MIN_OVERLAP = 0.8

#: name -> (runs started together, old defaults?)
SETUPS: dict[str, tuple[int, bool]] = {
    "alone_old": (1, True),
    "alone_new": (1, False),
    "two_old": (2, True),
    "two_new": (2, False),
}
LABELS = {
    "alone_old": "one run alone, old defaults",
    "alone_new": "one run alone, vaelab's rule",
    "two_old": "two runs at once, old defaults",
    "two_new": "two runs at once, vaelab's rule",
}
_CHOSEN = re.compile(r"vaelab: using (\d+) CPU thread")


def _vaelab() -> list[str]:
    script = shutil.which("vaelab")
    return [script] if script else [sys.executable, "-m", "vaelab"]


def torch_default_threads(env: dict[str, str]) -> int:
    """torch's own default thread count on this machine (a child process, nothing set)."""
    code = "import torch; print(torch.get_num_threads())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip())


def overlap(loops: list[tuple[float, float]]) -> float:
    """Time all ``(start, end)`` loops ran together / the shortest loop's time (1.0 for one)."""
    if len(loops) < 2:
        return 1.0
    together = min(end for _, end in loops) - max(start for start, _ in loops)
    shortest = min(end - start for start, end in loops)
    return round(max(0.0, together) / shortest, 3) if shortest > 0 else 0.0


def run_trial(args_for: list[list[str]], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Start one ``vaelab train`` per argument list at the same moment; wait for all; return
    each run's examples/s, epoch seconds, chosen-thread line and wall time, their total and
    the loops' overlap."""
    procs = []
    for i, extra in enumerate(args_for):
        out_dir = workdir / f"run{i}"
        log = (workdir / f"run{i}.log").open("w")
        cmd = [*_vaelab(), "train", *extra, "--out", str(out_dir)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                      out_dir, log, time.perf_counter()))
    runs, loops = [], []
    for proc, out_dir, log, started in procs:
        code = proc.wait()
        wall = time.perf_counter() - started
        log.close()
        text = Path(log.name).read_text()
        if code != 0:
            raise SystemExit(f"vaelab train failed (exit {code}):\n{text[-2000:]}")
        metrics = out_dir / "metrics.jsonl"
        record = json.loads(metrics.read_text().strip().splitlines()[-1])
        end = metrics.stat().st_mtime
        loops.append((end - record["seconds"], end))
        chosen = _CHOSEN.search(text)
        runs.append({
            "examples_per_second": record["examples_per_second"],
            "seconds": record["seconds"],
            "wall_seconds": round(wall, 2),
            "chosen_threads": int(chosen.group(1)) if chosen else None,
            "thread_message": next((line for line in text.splitlines()
                                    if line.startswith("vaelab: using")), None),
        })
    total = round(sum(r["examples_per_second"] for r in runs), 1)
    return {"runs": runs, "total_examples_per_second": total, "overlap": overlap(loops)}


def summarize_setup(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions: per run (by launch order) and of the totals."""
    n_runs = len(trials[0]["runs"])
    per_run = [common.median([t["runs"][i]["examples_per_second"] for t in trials])
               for i in range(n_runs)]
    totals = [t["total_examples_per_second"] for t in trials]
    return {
        "per_run_examples_per_second": [round(v, 1) for v in per_run],
        "total_examples_per_second": round(common.median(totals), 1),
        "all_totals": totals,
        "min_overlap": min(t["overlap"] for t in trials),
        "trials": trials,
    }


def _table(settings: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| set-up | examples/s per run | total |", "| --- | --- | --- |"]
    for name, row in settings.items():
        runs = " and ".join(f"{v:,.0f}" for v in row["per_run_examples_per_second"])
        lines.append(f"| {LABELS[name]} | {runs} | {row['total_examples_per_second']:,.0f} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "threads")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="data.train_limit (default 20000; smoke: all of --dataset)")
    parser.add_argument("--pause", type=float, default=None,
                        help="seconds between trials (default 3; smoke 0)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="further config overrides for every run")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    pause = args.pause if args.pause is not None else (0.0 if args.smoke else 3.0)
    limit = args.train_limit or (None if args.smoke else 20000)
    train_args = ["--preset", "pytorch-example", "--dataset", args.dataset, "--epochs", "1"]
    for item in ([f"data.train_limit={limit}"] if limit else []) + [
            "data.validation_size=0", *args.set]:
        train_args += ["--set", item]
    train_args.append("--no-report")

    monitor = common.CpuMonitor()
    with tempfile.TemporaryDirectory(prefix="vaelab-threads-") as tmp:
        base = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        base.update(PYTHONUNBUFFERED="1", VAELAB_THREADS_REGISTRY=str(Path(tmp) / "registry"))
        default_threads = torch_default_threads(base)
        envs = {False: base, True: {**base, "OMP_NUM_THREADS": str(default_threads)}}
        trials: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
        order = list(SETUPS)
        for rep in range(repeats):
            for name in order[rep % len(order):] + order[:rep % len(order)]:
                n_runs, old = SETUPS[name]
                workdir = Path(tmp) / f"{name}-{rep}"
                workdir.mkdir()
                load = common.load_average()
                trial = run_trial([train_args] * n_runs, envs[old], workdir)
                trial.update(repeat=rep, load_average_before=load)
                trials[name].append(trial)
                shutil.rmtree(workdir, ignore_errors=True)
                time.sleep(pause)
    settings = {name: summarize_setup(trials[name]) for name in SETUPS}
    total = {name: row["total_examples_per_second"] for name, row in settings.items()}
    ratios = {
        "two_new_total_vs_alone_new": round(total["two_new"] / total["alone_new"], 3),
        "two_new_total_vs_alone_old": round(total["two_new"] / total["alone_old"], 3),
        "alone_new_vs_alone_old": round(total["alone_new"] / total["alone_old"], 3),
        "two_new_total_vs_two_old_total": round(total["two_new"] / total["two_old"], 3),
        "two_old_total_vs_alone_old": round(total["two_old"] / total["alone_old"], 3),
    }
    result = {
        "benchmark": "threads",
        "smoke": args.smoke,
        "argv": ["vaelab", "train", *train_args],
        "repeats": repeats,
        "pause_seconds": pause,
        "torch_default_threads": default_threads,
        "old_defaults_env": {"OMP_NUM_THREADS": str(default_threads), "OMP_WAIT_POLICY": None},
        "settings": settings,
        "ratios": ratios,
        "target": {"two_new_total_vs_alone_new": TARGET_TWO_VS_ONE,
                   "alone_new_vs_alone_old_at_least": 1 - ALONE_TOLERANCE},
        "meets_target": (ratios["two_new_total_vs_alone_new"] >= TARGET_TWO_VS_ONE
                         and ratios["alone_new_vs_alone_old"] >= 1 - ALONE_TOLERANCE),
        "overlap_ok": all(row["min_overlap"] >= MIN_OVERLAP for row in settings.values()),
        "table": _table(settings),
        "vaelab_source": common.source_digest(),
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "threads", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
