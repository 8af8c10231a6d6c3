"""Benchmark: does bf16 training end where fp32 training ends? (issue 27: within 0.5 nats)

Trains the same config (the ``default`` preset unless ``--preset``) at the same seed twice,
``train.precision=fp32`` and ``bf16``, and evaluates both final models in float32 on the
test split: the NELBO (beta = 1, the same noise for both) with its standard error, and the
per-epoch training objective and validation NELBO from ``metrics.jsonl``. The difference
of the two test NELBOs is the figure; the standard error of that difference is not the
split's standard error (the two models see the same examples and noise), so the paired
per-example differences give it.

Run: ``python benchmarks/precision_accuracy.py --threads 1 [--epochs 3] [--train-limit
10000] [--preset mnist-vampprior --data-dir DIR]``; writes
``benchmarks/results/precision_accuracy.json``. ``--smoke``: 256 images, one epoch.
"""

from __future__ import annotations

import json
import math
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
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the preset's dataset files (data.data_dir)")
    parser.add_argument("--note", default=None, help="a sentence recorded in the JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vaelab import config
    from vaelab.train import train_and_evaluate

    epochs, limit = (1, 256) if args.smoke else (args.epochs, args.train_limit)
    monitor = common.CpuMonitor()
    out: dict[str, Any] = {}
    per_example = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-precision-") as tmp:
        for precision in ("fp32", "bf16"):
            overrides = [f"train.precision={precision}", f"train.epochs={epochs}",
                         f"data.train_limit={limit}", "train.device=cpu"]
            if args.threads:
                overrides.append(f"train.threads={args.threads}")
            if args.data_dir:
                overrides.append(f"data.data_dir={args.data_dir}")
            if args.smoke:
                overrides += ["data.validation_size=128", "data.test_limit=200"]
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
    result = {
        "benchmark": "precision_accuracy", "smoke": args.smoke,
        "preset": args.preset or "default", "epochs": epochs, "train_limit": limit,
        "runs": out,
        "test_nelbo_bf16_minus_fp32": float(diff.mean()),
        "paired_stderr": float(diff.std() / math.sqrt(len(diff))),
        "target_nats": 0.5,
        "machine": common.machine(), "cpu_load": monitor.report(),
    }
    if args.note:
        result["note"] = args.note
    common.write_result(result, args.out, "precision_accuracy", args.smoke)
    return result


if __name__ == "__main__":
    main()
