"""Benchmark: does bf16 training end where fp32 training ends? (issue 27: within 0.5 nats)

Trains the same config (the ``default`` preset unless ``--preset``) at the same seed twice,
``train.precision=fp32`` and ``bf16``, and evaluates both final models in float32 on the
test split: the NELBO (beta = 1, the same noise for both) with its standard error, and the
per-epoch training objective and validation NELBO from ``metrics.jsonl``. The difference
of the two test NELBOs is the figure; the standard error of that difference is not the
split's standard error (the two models see the same examples and noise), so the paired
per-example differences give it. That error says nothing of training's own chaos: one
rounding apart, two runs drift to different (equally good) weights. ``--seeds 0 1 2``
repeats the pair per seed and sets the mean difference beside the float32 runs' spread
across seeds, the noise any change of arithmetic (threads, CPU) would show.

Run: ``python benchmarks/precision_accuracy.py --threads 1 [--epochs 3] [--train-limit
10000 | 0 for all] [--seeds 0 1 2] [--preset mnist-vampprior --data-dir DIR]``; writes
``benchmarks/results/precision_accuracy.json``. ``--smoke``: 256 images, one epoch.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "precision_accuracy")
    parser.add_argument("--preset", default=None, help="a preset (default: the defaults)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10000,
                        help="train on the first N images (0: all; default 10000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train.seed of each fp32/bf16 pair (default 0)")
    parser.add_argument("--dataset", default=None,
                        help="registered name or .npz file (default: the preset's)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the preset's dataset files (data.data_dir)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs, limit = (1, 256) if args.smoke else (args.epochs, args.train_limit or None)
    monitor = common.CpuMonitor()
    pairs = {f"seed {seed}": _pair(args, seed, epochs, limit) for seed in args.seeds}
    result = {
        "benchmark": "precision_accuracy", "smoke": args.smoke,
        "preset": args.preset or "default", "epochs": epochs, "train_limit": limit,
        "seeds": args.seeds, "pairs": pairs, **_across_seeds(pairs),
        "target_nats": 0.5,
        "machine": common.machine(), "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "precision_accuracy", args.smoke, note=args.note)
    return result


def _pair(args, seed: int, epochs: int, limit: int | None) -> dict[str, Any]:
    """Train fp32 and bf16 at ``seed``; both test NELBOs and their paired difference."""
    from vaelab import config
    from vaelab.train import train_and_evaluate

    out: dict[str, Any] = {}
    per_example = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-precision-") as tmp:
        for precision in ("fp32", "bf16"):
            overrides = [f"train.precision={precision}", f"train.epochs={epochs}",
                         f"train.seed={seed}", "train.device=cpu"]
            if limit is not None:
                overrides.append(f"data.train_limit={limit}")
            if args.threads:
                overrides.append(f"train.threads={args.threads}")
            if args.data_dir:
                overrides.append(f"data.data_dir={args.data_dir}")
            if args.dataset:
                overrides.append(f"data.dataset={args.dataset}")
            if args.smoke:
                overrides += ["data.validation_size=32", "data.test_limit=200"]
            cfg = config.resolve(preset=args.preset, overrides=overrides)
            run_dir = Path(tmp) / precision
            started = time.perf_counter()
            train_and_evaluate(cfg, run_dir, progress=False, echo=lambda _line: None)
            seconds = time.perf_counter() - started
            rows = [json.loads(line) for line in
                    (run_dir / "metrics.jsonl").read_text().splitlines()]
            nelbo = common.run_test_nelbo(run_dir, cfg)
            per_example[precision] = nelbo
            out[precision] = {
                "test_nelbo": float(nelbo.mean()),
                "test_nelbo_stderr": float(nelbo.std() / math.sqrt(len(nelbo))),
                "test_examples": len(nelbo),
                "train_objective_per_epoch": [r["train_objective"] for r in rows],
                "val_nelbo_per_epoch": [r.get("val_nelbo") for r in rows],
                "epoch_seconds": [r["seconds"] for r in rows],
                "wall_seconds": round(seconds, 1),
                "precision_recorded": [r["precision"] for r in rows],
            }
    diff = per_example["bf16"] - per_example["fp32"]
    fp32_epoch, bf16_epoch = (statistics.median(out[p]["epoch_seconds"]) for p in ("fp32", "bf16"))
    return {**out,
            "test_nelbo_bf16_minus_fp32": float(diff.mean()),
            "paired_stderr": float(diff.std() / math.sqrt(len(diff))),
            "median_epoch_speedup": round(fp32_epoch / bf16_epoch, 3)}


def _across_seeds(pairs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean bf16 - fp32 difference over seeds, its standard error over seeds, and the
    float32 test NELBO's standard deviation across seeds (training's own noise); the
    last two need two seeds or more."""
    diffs = [p["test_nelbo_bf16_minus_fp32"] for p in pairs.values()]
    fp32 = [p["fp32"]["test_nelbo"] for p in pairs.values()]
    summary: dict[str, Any] = {"test_nelbo_bf16_minus_fp32": statistics.fmean(diffs)}
    if len(pairs) > 1:
        summary["seeds_stderr"] = statistics.stdev(diffs) / math.sqrt(len(diffs))
        summary["fp32_test_nelbo_sd_across_seeds"] = statistics.stdev(fp32)
    return summary


if __name__ == "__main__":
    main()
