"""Benchmark: importance-sampled log-likelihood, speed against the roofline and peak memory.

Model: the ``pytorch-example`` architecture (784-400-20 ReLU MLP) with the normalised
``bernoulli`` likelihood, freshly initialised (seed 0, decoder output bias at the data
mean; the time does not depend on the weights). Data: the first ``--examples`` (default
500) images of the Fashion-MNIST test set, binarised once (``binarize="static"``, the
seed-0 draw vaelab uses for test numbers). :func:`vaelab.objectives.log_likelihood` runs
over them in batches of ``--batch-size`` (default 100, ``EvalConfig.batch_size``) with its
default chunking, exactly as :func:`vaelab.metrics.nll_metrics` calls it.

- Speed, for K = 1000 and 5000: seconds (median of ``--repeats``), decoded samples per
  second, and ``roofline_fraction`` = roofline time / measured time, where the roofline
  time is the matmul FLOPs of the call (counted by ``FlopCounterMode``: one encoder pass per
  example plus one decoder pass per sample, about 0.64 MFLOP each) divided by the float32
  matmul rate measured in the same run.
- Peak memory, for K = 100, 1000, 5000: a fresh subprocess per K loads the model and data,
  records its resident set (``VmRSS``), resets the kernel's peak mark (``clear_refs``),
  runs the evaluation once and reads the peak (``VmHWM``). ``peak_rss_mb`` is the process
  peak (``ru_maxrss``: torch, data loading and all); ``eval_increase_mb`` is the
  evaluation's own peak above the memory held before it. Flat in K
  means ``eval_increase_mb`` does not grow with K: ``memory_flat_in_k`` is true when the
  largest and smallest increase differ by at most 16 MB or 10%. The memory runs are made
  twice: with glibc's default allocator settings (``memory``), and with its mmap threshold
  fixed at 1 MB (``memory_fixed_mmap_threshold``), which separates the tensors the
  evaluation holds from heap fragmentation that builds up over many chunks; and a third
  time with the settings ``vaelab`` commands run with (``memory_keep_freed``:
  :func:`vaelab.allocator.keep_freed_memory`'s thresholds, given through the environment).

Run: ``python benchmarks/eval.py [--repeats 3] [--examples 500]``; writes
``benchmarks/results/eval.json``. ``--smoke`` (CI): 20 examples, K = 10 and 50 (memory: K = 50 only).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vaelab import allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["build", "evaluate", "main"]


def build(dataset: str, examples: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The benchmark's model and its ``(examples, 1, 28, 28)`` 0/1 float inputs."""
    from vaelab import config, data
    from vaelab.models import build_from_config

    cfg = config.resolve(preset="pytorch-example",
                         overrides=["likelihood.unnormalized=false", "data.binarize=static"])
    user_file = Path(dataset).suffix.lower() in (".npz", ".npy")
    images = data.load(dataset, "all" if user_file else "test", binarize="static",
                       validation_size=0 if user_file else 5000)
    images = images.subset(torch.arange(min(examples, len(images))))
    torch.manual_seed(seed)
    model = build_from_config(cfg, tuple(images.images.shape[1:]))
    model.init_output_bias(images.pixel_mean())
    model.eval()
    return model, images.batch(torch.arange(len(images)))


def evaluate(model: torch.nn.Module, x: torch.Tensor, k: int, batch_size: int,
             seed: int = 0) -> torch.Tensor:
    """``log_likelihood`` over ``x`` in batches, as ``metrics.nll_metrics`` does: ``(N,)``."""
    from vaelab import objectives

    out = []
    for number, start in enumerate(range(0, len(x), batch_size)):
        gen = torch.Generator().manual_seed(seed * 100003 + number)
        result = objectives.log_likelihood(model, x[start:start + batch_size], num_samples=k,
                                           generator=gen)
        out.append(result.per_example)
    return torch.cat(out)


def call_flops(model: torch.nn.Module, x: torch.Tensor, k: int, batch_size: int) -> float:
    """Matmul FLOPs of :func:`evaluate` for K = ``k``, from counts at two small K."""
    small = x[: min(len(x), batch_size)]
    f1 = common.linear_matmul_flops(lambda: evaluate(model, small, 1, batch_size))
    f2 = common.linear_matmul_flops(lambda: evaluate(model, small, 3, batch_size))
    per_sample, per_example = (f2 - f1) / 2 / len(small), (f1 - (f2 - f1) / 2) / len(small)
    return len(x) * (per_example + k * per_sample)


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB, None if absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(args) -> None:
    """Subprocess body: resident memory before, and peak during, one evaluation with
    K = ``args.memory_k``. The peak mark is reset just before the evaluation, so the
    increase is the evaluation's own, not data loading's; without ``clear_refs`` it falls
    back to ``ru_maxrss`` (then a peak from loading can hide the evaluation's)."""
    model, x = build(args.dataset, args.examples)
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before reset
    rss_before = _status_mb("VmRSS")
    reset = rss_before is not None and _reset_peak()
    evaluate(model, x, args.memory_k, args.batch_size)
    peak_process = max(peak_loading, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if reset:
        peak_eval, before = _status_mb("VmHWM") or peak_process, rss_before
    else:
        peak_eval, before = peak_process, peak_process  # no finer measure available
    print(json.dumps({"k": args.memory_k, "peak_rss_mb": round(peak_process, 1),
                      "rss_before_eval_mb": round(before, 1),
                      "peak_during_eval_mb": round(peak_eval, 1),
                      "eval_increase_mb": round(peak_eval - before, 1),
                      "method": "VmHWM after clear_refs" if reset else "ru_maxrss"}))


#: glibc setting for the second memory measurement: blocks of 1 MB and more are mmapped and
#: go back to the system when freed, so the peak shows the evaluation's own tensors without
#: the heap fragmentation that glibc's default (a threshold that rises to the size of the
#: largest block freed, up to 32 MB) lets build up over many chunks.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

#: What ``vaelab`` commands set (:func:`vaelab.allocator.keep_freed_memory`; the variables
#: set the same two glibc parameters as its ``mallopt`` calls).
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
              "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD)}


def peak_memory(args, k: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`_memory_child` in a fresh interpreter (ru_maxrss is a process-wide peak),
    with ``env`` added to the environment."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-k", str(k),
           "--dataset", args.dataset, "--examples", str(args.examples),
           "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def flat_in_k(memory: dict[str, dict[str, Any]]) -> bool:
    """The evaluation's own peak (``eval_increase_mb``) varies by at most 16 MB or 10%."""
    increases = [m["eval_increase_mb"] for m in memory.values()]
    return max(increases) - min(increases) <= max(16.0, 0.1 * min(increases))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "eval")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="registered name (test split) or .npz file (all of it)")
    parser.add_argument("--examples", type=int, default=None,
                        help="first N test images (default 500, smoke 20)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="timed K values (default 1000 5000)")
    parser.add_argument("--memory-samples", type=int, nargs="+", default=None,
                        help="K values for peak memory (default 100 1000 5000)")
    parser.add_argument("--memory-k", type=int, default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.examples = args.examples or (20 if smoke else 500)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_k is not None:
        _memory_child(args)
        return {}
    timed_k = args.samples or ([10, 50] if smoke else [1000, 5000])
    memory_k = args.memory_samples or ([50] if smoke else [100, 1000, 5000])
    repeats = args.repeats or (1 if smoke else 3)
    monitor = common.CpuMonitor()

    model, x = build(args.dataset, args.examples)
    mm_n = 256 if smoke else 2048
    rates = common.matmul_rate(mm_n, 1 if smoke else repeats)["all_gflops"]
    evaluate(model, x[: args.batch_size], timed_k[0], args.batch_size)  # warm-up
    speed: dict[str, Any] = {}
    times: dict[int, list[float]] = {k: [] for k in timed_k}
    means: dict[int, float] = {}
    for _ in range(repeats):
        for k in timed_k:
            started = time.perf_counter()
            values = evaluate(model, x, k, args.batch_size)
            times[k].append(time.perf_counter() - started)
            means[k] = float(values.mean())
    rates += common.matmul_rate(mm_n, 1 if smoke else repeats)["all_gflops"]
    gflops = common.median(rates)
    for k in timed_k:
        flops = call_flops(model, x, k, args.batch_size)
        summary = common.summarize(times[k])
        roofline = flops / (gflops * 1e9)
        speed[f"k_{k}"] = {
            "k": k,
            **summary,
            "decoded_samples_per_second": round(len(x) * k / summary["seconds"], 1),
            "matmul_flops": int(round(flops)),
            "roofline_seconds": roofline,
            "roofline_fraction": round(roofline / summary["seconds"], 3),
            "roofline_fraction_best": round(roofline / summary["best_seconds"], 3),
            "mean_log_likelihood": round(means[k], 4),
        }
    memory = {f"k_{k}": peak_memory(args, k) for k in memory_k}
    memory_fixed = {f"k_{k}": peak_memory(args, k, FIXED_MMAP_THRESHOLD) for k in memory_k}
    memory_kept = {f"k_{k}": peak_memory(args, k, KEEP_FREED) for k in memory_k}
    result = {
        "benchmark": "eval",
        "smoke": smoke,
        "model": "pytorch-example architecture (784-400-20 ReLU), bernoulli likelihood, "
                 "untrained (seed 0)",
        "dataset": args.dataset,
        "examples": len(x),
        "batch_size": args.batch_size,
        "repeats": repeats,
        "matmul": {"gflops": round(gflops, 3), "all_gflops": rates, "n": mm_n},
        "speed": speed,
        "memory": memory,
        "memory_method": "fresh subprocess per K; VmRSS before, VmHWM after resetting it "
                         "with /proc/self/clear_refs (ru_maxrss where unavailable)",
        "memory_flat_in_k": flat_in_k(memory),
        # the same with glibc's mmap threshold fixed at 1 MB (no effect off glibc)
        "memory_fixed_mmap_threshold": memory_fixed,
        "memory_flat_in_k_fixed_mmap_threshold": flat_in_k(memory_fixed),
        # the same with the thresholds vaelab commands set (vaelab.allocator)
        "memory_keep_freed": memory_kept,
        "memory_flat_in_k_keep_freed": flat_in_k(memory_kept),
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "eval", smoke, note=args.note)
    return result


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
