"""Benchmark: vaelab's training step in float32 and in bf16, interleaved in one process.

On a shared machine an epoch's speed moves by tens of percent between repetitions, so
per-epoch ratios of fp32 and bf16 runs carry that noise. This times blocks of steps of
each arm in turn, round after round, and quotes the median step and the median of the
per-round ratios to float32:

- ``fp32``: ``train.precision=fp32``;
- ``bf16``: ``train.precision=bf16`` (autocast: products in bfloat16, casts around them);
- ``fp32, oneDNN bf16 products``: float32 tensors throughout, but
  ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` lets oneDNN round the products'
  inputs to bfloat16 itself (CPU only; TF32's counterpart), no casts in the graph.

Run: ``python benchmarks/precision_step.py --threads 2 --presets default mnist-vampprior
[--batch-size 128]``; writes ``benchmarks/results/precision_step.json``. ``--smoke``:
a 160-image ``--dataset`` file, a few steps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from profile_step import _loop  # noqa: E402
from train import _config  # noqa: E402

__all__ = ["main"]

#: arm name -> (train.precision, oneDNN's float32 matmul precision)
ARMS = {"fp32": ("fp32", "ieee"), "bf16": ("bf16", "ieee"),
        "fp32, oneDNN bf16 products": ("fp32", "bf16")}


def time_arms(preset: str, batch_size: int | None, dataset: str, threads: int | None,
              steps: int, rounds: int, limit: int | None) -> dict[str, Any]:
    """The batch size and each arm's median ms per step over ``rounds`` interleaved blocks
    of ``steps``, with the median of its per-round speed-ups over ``fp32``."""
    from vaelab.data import Splits

    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    configs = {name: _config(batch_size, dataset, limit, threads, (), preset, precision)
               for name, (precision, _) in ARMS.items()}
    fp32 = configs["fp32"]  # the arms differ in precision only: one copy of the data
    images_set = Splits(fp32.data, fp32.train.seed, "cpu")["train"]
    loops = {name: _loop(cfg, images_set) for name, cfg in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    try:
        for name, step in loops.items():  # warm-up, each arm in its own mode
            matmul.fp32_precision = ARMS[name][1]
            for i in range(5):
                step(i)
        for _ in range(rounds):
            for name, step in loops.items():
                matmul.fp32_precision = ARMS[name][1]
                started = time.perf_counter()
                for i in range(steps):
                    step(i)
                times[name].append((time.perf_counter() - started) / steps * 1e3)
    finally:
        matmul.fp32_precision = before
    base = times["fp32"]
    arms = {name: {"step_ms": round(common.median(ms), 4), "all_step_ms": ms,
                   "speedup_vs_fp32": round(common.median([b / t for b, t in zip(base, ms)]), 3)}
            for name, ms in times.items()}
    return {"batch_size": fp32.train.batch_size, "arms": arms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "precision_step")
    parser.add_argument("--presets", nargs="+", default=["default"],
                        choices=["default", "pytorch-example", "keras-example", "mnist-vae",
                                 "mnist-vampprior", "conv"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: each preset's own)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per block (default 100, 30 for the VampPrior; smoke 3)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="registered name or .npz file of 28x28 images (smoke tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.smoke else args.rounds
    monitor = common.CpuMonitor()
    results = {}
    for preset in args.presets:
        steps = 3 if args.smoke else args.steps or (30 if preset == "mnist-vampprior" else 100)
        results[preset] = {"steps_per_block": steps,
                           **time_arms(preset, args.batch_size, args.dataset, args.threads,
                                       steps, rounds, 512 if args.smoke else None)}
    result = {"benchmark": "precision_step", "smoke": args.smoke, "rounds": rounds,
              "dataset": args.dataset, "results": results, "machine": common.machine(),
              "cpu_load": monitor.report()}
    common.write_result(result, args.out, "precision_step", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
