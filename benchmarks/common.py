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
import math
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
    "run_test_nelbo",
    "mean_sd",
    "compare_over_seeds",
    "comparison_table",
    "agreement_chance",
    "run_vaelab_train",
    "run_worker",
    "summarize_source_check",
    "SPREAD_DEFINITION",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Environment variables that change how torch's OpenMP threads behave (recorded).
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
              "KMP_BLOCKTIME")

#: Share of the machine's CPU time used by other processes above which figures are flagged.
BUSY_OTHER_SHARE = 0.1


def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Arguments shared by every benchmark: ``--smoke``, ``--repeats``, ``--out``, ``--threads``,
    ``--note`` (pass it on to :func:`write_result`)."""
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
    p.add_argument("--note", default=None,
                   help="a sentence kept in the JSON: how the run was made when that is not the "
                        "default (e.g. what else ran on the CPU)")
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

    from vaelab.runtime import describe_machine

    described = describe_machine()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "kernel_flags": described["kernel_flags"],
        "blas": described["blas_library"],
        "mkl_cbwr": described["mkl_cbwr"],
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
    disturbed by the rest of the machine; the median is the figure quoted. Times are kept
    unrounded, so that every ratio computed from them can be checked exactly (a smoke run's
    milliseconds rounded to 0.1 ms would be off by several percent on a fast machine)."""
    out: dict[str, Any] = {"seconds": median(seconds), "best_seconds": min(seconds),
                           "all_seconds": list(seconds)}
    if examples is not None:
        out["examples_per_second"] = examples / median(seconds)
    return out


def matmul_rate(n: int = 2048, repeats: int = 5, min_seconds: float = 0.3,
                dtype: Any = None, *, shape: tuple[int, int, int] | None = None,
                device: Any = "cpu", per_read: int | None = None) -> dict[str, Any]:
    r"""The machine's matrix-multiply rate, GFLOP/s (``2 m k n`` FLOPs per ``(m, k) @ (k, n)``
    product; ``(n, n) @ (n, n)`` unless ``shape`` gives ``(m, k, n)``), in float32 (``dtype``
    None) or another torch dtype (``torch.bfloat16``), on ``device``.

    Each repetition times enough products to take ``min_seconds``, after three warm-up
    products, with the current torch thread setting; the median of ``repeats`` repetitions
    is quoted. The clock is read after every ``per_read`` products (default 1 on a CPU; 10
    on a GPU, where each read waits for the device: ``torch.cuda.synchronize``).
    """
    import torch

    device = torch.device(device)
    dtype = dtype or torch.float32
    m, k, n_out = shape or (n, n, n)
    per_read = per_read or (1 if device.type == "cpu" else 10)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b = torch.randn(k, n_out, generator=gen, device=device).to(dtype)
    out = torch.empty(m, n_out, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    flops = 2.0 * m * k * n_out
    rates = []
    for _ in range(repeats):
        count, started = 0, time.perf_counter()
        while True:
            for _ in range(per_read):
                torch.mm(a, b, out=out)
            count += per_read
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        rates.append(flops * count / elapsed / 1e9)
    size = {"n": n} if shape is None else {"shape": list(shape)}
    return {"gflops": round(median(rates), 3), "all_gflops": [round(r, 3) for r in rates],
            **size, "dtype": str(dtype).removeprefix("torch.")}


def linear_matmul_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs executed by ``fn()`` (forward and, if it calls it, backward),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def write_result(result: dict[str, Any], out: Path | None, name: str, smoke: bool,
                 echo: bool = True, note: str | None = None) -> Path | None:
    """Print ``result`` as JSON (unless ``echo`` is False: a partial result written between
    runs) and write it to ``out`` (default ``results/<name>.json``; smoke runs write only
    when ``out`` is given). ``note`` (``--note``), when given, is kept as ``result["note"]``."""
    if note:
        result["note"] = note
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if out is None and smoke:
        return None
    path = out if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    if echo:
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
    metrics record)``. The record gains ``step_seconds``: the time spent inside
    :func:`vaelab.train.train_step` (forward, backward, optimizer), the rest of the epoch's
    seconds being the loop's bookkeeping (batches, running sums, schedules)."""
    import vaelab.train as trainer

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    step, inside = trainer.train_step, [0.0]

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - started

    trainer.train_step = timed_step  # the loop looks it up by name at every step
    try:
        trainer.train_and_evaluate(cfg, run_dir, progress=False, echo=lambda _line: None)
    finally:
        trainer.train_step = step
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    record["step_seconds"] = inside[0]
    return float(record["seconds"]), record


def run_test_nelbo(run_dir: Path, cfg, checkpoint: str = "last", batch: int = 500):
    """The test split's NELBO per example (nats, float64 ``(N,)``) of a run's checkpoint,
    evaluated on the CPU in float32 (beta = 1, one draw) with noise that depends only on the
    batch's position: two runs of one config see the same examples and the same noise, so
    their per-example differences are paired."""
    import torch

    from vaelab import objectives, runs
    from vaelab.data import Splits

    model = runs.open_run(run_dir, checkpoint).model.eval()
    test = Splits(cfg.data, cfg.train.seed, "cpu")["test"]
    values = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, len(test), batch):
            index = torch.arange(start, min(start + batch, len(test)))
            x = test.inputs(index, model.likelihood.data_kind, gen)
            noise = torch.Generator().manual_seed(start)
            values.append(-objectives.elbo_terms(model, x, generator=noise).elbo.double())
    return torch.cat(values)


# --------------------------------------------------------------------------- source checks


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def compare_over_seeds(source: Sequence[Sequence[float]], ours: Sequence[Sequence[float]]
                       ) -> list[dict[str, Any]]:
    r"""Per-epoch agreement of two systems trained with several seeds each (issue 16).

    ``source[i][e]`` and ``ours[j][e]``: the value after epoch ``e + 1`` of seed ``i`` / ``j``
    (at least two seeds each, the same number of epochs). For every epoch:

    - ``source_mean``, ``source_sd``, ``ours_mean``, ``ours_sd``: mean and sample standard
      deviation (ddof 1) over seeds;
    - ``diff`` = ours_mean - source_mean;
    - ``spread`` = the pooled seed-to-seed standard deviation
      :math:`s_p = \sqrt{((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)}`: how far one
      run moves when only its seed changes, estimated from both systems (``n_a + n_b - 2``
      degrees of freedom; if they agree they share one such standard deviation);
    - ``agree`` = ``|diff| < spread`` (the issue's criterion);
    - ``se_diff`` = :math:`s_p \sqrt{1/n_a + 1/n_b}` and ``t`` = diff / se_diff: the
      standard error of the difference of means and the two-sample t statistic (a
      systematic offset smaller than the spread shows as a large ``|t|``).
    """
    n_a, n_b = len(source), len(ours)
    if n_a < 2 or n_b < 2:
        raise ValueError(f"need at least 2 seeds per system, got {n_a} and {n_b}")
    epochs = len(source[0])
    if any(len(c) != epochs for c in (*source, *ours)):
        raise ValueError("every curve needs the same number of epochs")
    rows = []
    for e in range(epochs):
        ma, sa = mean_sd([c[e] for c in source])
        mb, sb = mean_sd([c[e] for c in ours])
        pooled = math.sqrt(((n_a - 1) * sa**2 + (n_b - 1) * sb**2) / (n_a + n_b - 2))
        se = pooled * math.sqrt(1 / n_a + 1 / n_b)
        diff = mb - ma
        rows.append({
            "epoch": e + 1, "source_mean": round(ma, 3), "source_sd": round(sa, 3),
            "ours_mean": round(mb, 3), "ours_sd": round(sb, 3), "diff": round(diff, 3),
            "spread": round(pooled, 3), "agree": bool(abs(diff) < pooled),
            "se_diff": round(se, 3), "t": round(diff / se, 2) if se > 0 else None,
        })
    return rows


def agreement_chance(n_a: int, n_b: int) -> float | None:
    r"""The probability that two *identical* systems meet ``|diff| < spread`` at one epoch
    with ``n_a`` and ``n_b`` seeds (normal run-to-run noise): :math:`P(|T| < 1 /
    \sqrt{1/n_a + 1/n_b})` for Student's t with ``n_a + n_b - 2`` degrees of freedom.
    None without scipy."""
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is in the dev extra
        return None
    bound = 1 / math.sqrt(1 / n_a + 1 / n_b)
    return round(float(2 * stats.t.cdf(bound, n_a + n_b - 2) - 1), 3)


def comparison_table(rows: Sequence[dict[str, Any]], source: str, ours: str = "vaelab") -> str:
    """A Markdown table of :func:`compare_over_seeds` rows (means +- sample SD over seeds)."""
    lines = [f"| epoch | {source} | {ours} | {ours} - {source} | spread (pooled SD) | "
             "t | agree |", "| ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['source_mean']:.2f} ± {r['source_sd']:.2f} | "
                     f"{r['ours_mean']:.2f} ± {r['ours_sd']:.2f} | {r['diff']:+.2f} | "
                     f"{r['spread']:.2f} | {r['t'] if r['t'] is not None else '-'} | "
                     f"{'yes' if r['agree'] else '**no**'} |")
    return "\n".join(lines)


def run_vaelab_train(args: Sequence[str], run_dir: Path, threads: int,
                     timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m vaelab train ARGS --out RUN_DIR --no-report`` as a user would, with
    ``OMP_NUM_THREADS=threads``; return its per-epoch records (``metrics.jsonl``), the wall
    time between successive epoch lines (training + the per-epoch evaluation + checkpoint;
    None for epoch 1, whose start is not printed), the process's wall time and the load
    average before and after. The result is also written to ``RUN_DIR.json``; when that file
    exists (a run finished by an earlier, interrupted invocation) it is returned instead.

    Raises:
        RuntimeError: the run failed (with the end of its output).
    """
    import subprocess

    summary = run_dir.with_name(run_dir.name + ".json")
    if summary.is_file():
        return {**json.loads(summary.read_text()), "reused": True}
    argv = ["vaelab", "train", *args, "--out", str(run_dir), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    load_before = load_average()
    started = time.perf_counter()
    stamps: list[float] = []
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("epoch "):
                stamps.append(time.perf_counter())
        code = proc.wait(timeout=timeout)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n" + "\n".join(lines[-30:]))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    between = [None] + [round(b - a, 3) for a, b in zip(stamps, stamps[1:])]
    result = {"argv": argv, "metrics": records, "epoch_wall_seconds": between,
              "wall_seconds": round(wall, 2), "load_average_before": load_before,
              "load_average_after": load_average(), "output_tail": lines[-5:]}
    summary.write_text(json.dumps(result))
    return result


def run_worker(script: Path, args: Sequence[str], out: Path,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python SCRIPT ARGS --worker-out OUT`` in a fresh process (one training of a
    source, sharing no global state with anything else) and return the JSON it wrote, with
    the load average before and after. An ``OUT`` that exists (a run finished by an earlier,
    interrupted invocation) is returned without running again.

    Raises:
        RuntimeError: the worker failed (with the end of its stderr).
    """
    import subprocess

    if out.is_file():
        return {**json.loads(out.read_text()), "reused": True}
    load_before = load_average()
    done = subprocess.run([sys.executable, str(script), *args, "--worker-out", str(out)],
                          env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    if lines:
        print(lines[-1], file=sys.stderr, flush=True)
    result = json.loads(out.read_text())
    result["load_average_before"], result["load_average_after"] = load_before, load_average()
    return result


#: What "seed-to-seed spread" means in the source checks, and why (recorded in their JSON).
SPREAD_DEFINITION = {
    "criterion": "at every epoch 1..E, |mean over seeds (vaelab) - mean over seeds (source)| "
                 "< spread, for the test loss and for the training loss; spread = the pooled "
                 "sample standard deviation of one run over seeds, sqrt(((n_s - 1) s_source^2 "
                 "+ (n_v - 1) s_vaelab^2) / (n_s + n_v - 2))",
    "why": "the issue's 'seed-to-seed spread' is how far one run moves when only its seed "
           "changes: a standard deviation of single runs, not the standard error of a mean. "
           "If the two systems agree they share that standard deviation, and pooling "
           "estimates it from both (n_s + n_v - 2 degrees of freedom) without favouring the "
           "noisier system, as the larger of the two SDs would. With the standard error of "
           "the difference as the bound, two identical systems would fail about one epoch in "
           "three; the t statistic (diff / standard error) is reported beside it and shows a "
           "systematic offset smaller than the spread",
}


def _median_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 3) if kept else None


def summarize_source_check(source: str, source_runs: Sequence[dict[str, Any]],
                           lab_runs: Sequence[dict[str, Any]], twin: dict[str, Any] | None
                           ) -> dict[str, Any]:
    """The comparison of a source with its preset over seeds (issue 16).

    ``source_runs``: one dict per seed with ``per_epoch`` records (``train_loss``,
    ``test_loss``, ``train_seconds``, ``epoch_seconds``); ``lab_runs``: what
    :func:`run_vaelab_train` returns, per seed; ``twin``: a source run started from vaelab's
    initial weights with vaelab's random streams, compared with ``lab_runs[0]`` (same seed).
    """
    out: dict[str, Any] = {}
    for split, key in (("test", "nelbo"), ("train", "nelbo")):
        a = [[r[f"{split}_loss"] for r in run["per_epoch"]] for run in source_runs]
        b = [[r[f"{split}_{key}"] for r in run["metrics"]] for run in lab_runs]
        rows = compare_over_seeds(a, b)
        out[f"{split}_loss"] = {
            "rows": rows, "agree_every_epoch": all(r["agree"] for r in rows),
            "epochs_not_agreeing": [r["epoch"] for r in rows if not r["agree"]],
            "max_abs_t": max(abs(r["t"]) for r in rows if r["t"] is not None),
            "table": comparison_table(rows, source)}
    out["passed"] = all(out[f"{s}_loss"]["agree_every_epoch"] for s in ("test", "train"))
    out["twin"] = None
    if twin is not None:
        lab = lab_runs[0]["metrics"]
        rows = [{"epoch": t["epoch"], "twin_test": round(t["test_loss"], 3),
                 "vaelab_test": round(v["test_nelbo"], 3),
                 "diff_test": round(v["test_nelbo"] - t["test_loss"], 3),
                 "twin_train": round(t["train_loss"], 3),
                 "vaelab_train": round(v["train_nelbo"], 3),
                 "diff_train": round(v["train_nelbo"] - t["train_loss"], 3)}
                for t, v in zip(twin["per_epoch"], lab)]
        out["twin"] = {
            "seed": twin["seed"],
            "what": f"{source}'s code started from vaelab's initial weights for this seed, "
                    "with vaelab's batch order and noise (training and evaluation); "
                    "diff = vaelab - twin",
            "per_epoch": rows,
            "max_abs_diff_test": max(abs(r["diff_test"]) for r in rows),
            "max_abs_diff_train": max(abs(r["diff_train"]) for r in rows)}
    timing: dict[str, Any] = {
        "source_train_seconds_per_epoch": _median_or_none(
            [r["train_seconds"] for run in source_runs for r in run["per_epoch"]]),
        "source_epoch_seconds_with_test_eval": _median_or_none(
            [r["epoch_seconds"] for run in source_runs for r in run["per_epoch"]]),
        "vaelab_train_seconds_per_epoch": _median_or_none(
            [r["seconds"] for run in lab_runs for r in run["metrics"]]),
        "vaelab_epoch_seconds_with_test_eval": _median_or_none(
            [s for run in lab_runs for s in run["epoch_wall_seconds"]]),
        "source_run_wall_seconds": [run["wall_seconds"] for run in source_runs],
        "vaelab_process_wall_seconds": [run["wall_seconds"] for run in lab_runs],
        "note": "medians over all seeds and epochs; one thread each, one run at a time, "
                "source and vaelab interleaved, on a shared 2-core machine (see cpu_load and "
                "each run's load averages); vaelab's epoch seconds are the time between its "
                "epoch lines (epochs 2..E); the source's run wall time excludes its start-up, "
                "vaelab's process wall time includes it"}
    if timing["source_train_seconds_per_epoch"] and timing["vaelab_train_seconds_per_epoch"]:
        timing["train_speedup_vaelab_vs_source"] = round(
            timing["source_train_seconds_per_epoch"]
            / timing["vaelab_train_seconds_per_epoch"], 2)
    out["timing"] = timing
    return out


def source_check_parser(description: str, name: str, first_seed: int) -> argparse.ArgumentParser:
    """The command line of a source check (``check_keras_example.py``,
    ``check_pytorch_example.py``), including the hidden options of its worker processes."""
    parser = base_parser(description, name)
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per system, {first_seed}.. (default 8; smoke 2)")
    parser.add_argument("--epochs", type=int, default=None, help="(default 10; smoke 2)")
    parser.add_argument("--dataset", default="mnist",
                        help="registered name or .npz file (default: mnist, the source's)")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are")
    parser.add_argument("--no-twin", action="store_true", help="skip the twin run")
    parser.add_argument("--work", type=Path, default=None,
                        help="directory for the runs (default: a new temporary one); finished "
                             "runs found there are reused")
    parser.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)
    return parser


def one_layer_mlp_weights(model) -> list[tuple[Any, Any]]:
    """A vaelab MLP VAE with one hidden layer as the sources write it: ``(weight, bias)`` of
    the encoder's hidden layer, the mean head, the log-variance head (vaelab's one head
    ``Linear(H, 2 L)`` = [loc; log-variance], split), the decoder's hidden layer and its
    output layer; weights ``(out, in)`` as in ``nn.Linear``."""
    from torch import nn

    enc = [m for m in model.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in model.decoder if isinstance(m, nn.Linear)]
    head_w, head_b = enc[1].weight.chunk(2, 0), enc[1].bias.chunk(2, 0)
    return [(enc[0].weight, enc[0].bias), (head_w[0], head_b[0]), (head_w[1], head_b[1]),
            (dec[0].weight, dec[0].bias), (dec[1].weight, dec[1].bias)]


def preset_config(preset: str, dataset: str, data_dir: str | None, seed: int, epochs: int):
    """The config ``vaelab train --preset PRESET`` resolves for this data, seed and epochs."""
    from vaelab import config

    overrides = [f"data.dataset={dataset}", f"train.seed={seed}", f"train.epochs={epochs}"]
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    return config.resolve(preset=preset, overrides=overrides)


def run_source_check(args: argparse.Namespace, *, script: Path, name: str, preset: str,
                     source: str, label: str, first_seed: int, worker_env: dict[str, str],
                     info: dict[str, Any], hybrids: tuple[Callable[..., Any], Callable[..., Any]]
                     | None = None) -> dict[str, Any]:
    """Run a source and ``vaelab train --preset PRESET`` over seeds, interleaved (one
    thread each, one run at a time), then the twin; summarise (issue 16), print the tables
    and write the JSON.

    ``source`` names the source's runs (``runs[source]``, worker files ``SOURCE-SEED.json``);
    ``label`` heads its table column; ``info`` adds ``units``, ``source`` and the source's
    command to the result. ``hybrids``: ``(run, summarize)``, called as ``run(args, seeds,
    work, env)`` after the twin and ``summarize(source_runs, lab_runs, runs)``; the summary is
    the result's ``hybrids`` and the runs are kept under ``runs``.
    """
    n_seeds = args.seeds or (2 if args.smoke else 8)
    seeds = list(range(first_seed, first_seed + n_seeds))
    work = args.work or Path(tempfile.mkdtemp(prefix=f"vaelab-{name.replace('_', '-')}-"))
    work.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    env = {**worker_env, "OMP_NUM_THREADS": str(args.threads)}

    def source_run(seed: int, twin: bool) -> dict[str, Any]:
        cli = ["--worker-seed", str(seed), "--epochs", str(args.epochs), "--dataset",
               args.dataset, "--threads", str(args.threads), *data]
        return run_worker(script, cli + (["--twin"] if twin else []),
                          work / f"{source}-{'twin-' if twin else ''}{seed}.json", env)

    def vaelab_run(seed: int) -> dict[str, Any]:
        cli = ["--preset", preset, "--dataset", args.dataset, "--epochs", str(args.epochs),
               "--seed", str(seed), *data]
        run = run_vaelab_train(cli, work / f"vaelab-{seed}", args.threads)
        print(f"vaelab seed {seed}: {run['output_tail'][-1]}", file=sys.stderr, flush=True)
        return run

    monitor = CpuMonitor()
    started = time.perf_counter()
    source_runs, lab_runs = [], []
    for seed in seeds:  # interleaved, so that a change in the machine's load hits both
        source_runs.append(source_run(seed, False))
        lab_runs.append(vaelab_run(seed))
    twin = None if args.no_twin else source_run(seeds[0], True)
    hybrid_runs = hybrids[0](args, seeds, work, env) if hybrids else None
    summary = summarize_source_check(label, source_runs, lab_runs, twin)
    hybrid = hybrids[1](source_runs, lab_runs, hybrid_runs) if hybrids else None
    data_note = "--data-dir " + args.data_dir if args.data_dir else "vaelab's search"
    this = (f"python benchmarks/{script.name}" + (f" --data-dir {args.data_dir}" if data else "")
            + f" --seeds {n_seeds} --epochs {args.epochs}"
            + (f" --hybrids {args.hybrids}" if hybrids else ""))
    result = {
        "benchmark": name,
        "smoke": args.smoke,
        "issue": 16,
        "passed": summary["passed"],
        **SPREAD_DEFINITION,
        "identical_systems_agree_per_epoch_probability": agreement_chance(n_seeds, n_seeds),
        "seeds": seeds,
        "epochs": args.epochs,
        "dataset": f"{args.dataset} ({data_note}), grey levels / 255, all training images, "
                   "the test split evaluated after every epoch",
        "units": info["units"],
        "source": info["source"],
        "commands": {source: info["command"],
                     "vaelab": " ".join(lab_runs[0]["argv"]).replace(str(work), "RUN"),
                     "this": this},
        "test_loss": summary["test_loss"],
        "train_loss": summary["train_loss"],
        "twin": summary["twin"],
        **({"hybrids": hybrid} if hybrid else {}),
        "timing": summary["timing"],
        "runs": {source: source_runs, "vaelab": lab_runs, "twin": twin,
                 **({"hybrids": hybrid_runs} if hybrid_runs else {})},
        "work_dir": str(work),
        "threads": args.threads,
        "machine": {**machine(), "vaelab_source_sha256_16": source_digest()},
        "cpu_load": monitor.report(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print("test loss\n" + summary["test_loss"]["table"] + "\ntraining loss\n"
          + summary["train_loss"]["table"], file=sys.stderr)
    if hybrid:
        print("test loss by initial weights and random streams\n" + hybrid["table"],
              file=sys.stderr)
    write_result(result, args.out, name, args.smoke, note=args.note)
    return result
