"""Benchmark: where the time of vaelab's training step goes, per op (``torch.profiler``).

For each ``--presets`` model and ``--precision``, the steps of vaelab's training loop as
:func:`vaelab.train.train_epoch` runs them (a ``randperm`` batch of the training images in
the likelihood's units, dynamic binarisation where the preset has it,
:func:`vaelab.train.train_step` with the run's optimizer and ``train.precision``'s
autocast, and the float64 running sums), first timed without the profiler, then under
``torch.profiler.profile`` (CPU activities). Ops are ranked by their *self* CPU time (the
time in the op itself, not in the ops it calls), with the share of the profiled total;
``aten::*`` ops of the forward and backward are listed as torch names them
(``autograd::engine::evaluate_function: AddmmBackward0`` is the autograd node that calls
the backward's ``aten::mm``). The profiler adds a few microseconds per op, so shares of
cheap ops are inflated: ``step_ms`` without the profiler is the step's real time.

Run: ``python benchmarks/profile_step.py --threads 1 [--presets default pytorch-example]
[--precision fp32 bf16] [--steps 200]``; writes ``benchmarks/results/profile_step.json``.
``--smoke`` (CI): 10 steps of a 160-image ``--dataset`` file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train import _config  # noqa: E402

__all__ = ["main", "profile_steps"]


def _loop(cfg, images_set):
    """The trainer's objects for ``cfg`` (model, objective, optimizer, autocast dtype) and a
    function running step ``i`` as ``train_epoch`` does."""
    from vaelab import models, objectives
    from vaelab import train as trainer
    from vaelab.rng import Purpose, seeded_generator

    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = models.build_from_config(cfg, images_set.event_shape).to(device).train()
    if cfg.model.output_bias == "data-mean":
        model.init_output_bias(images_set.pixel_mean())
    objective = objectives.build_objective(model, cfg.objective)
    optimizer = trainer.make_optimizer(model, cfg.train, device)
    amp = trainer.autocast_dtype(cfg.train.precision, device)
    kind = model.likelihood.data_kind
    n, batch = len(images_set), cfg.train.batch_size
    perm = torch.randperm(n, generator=seeded_generator(0, 0, Purpose.PERMUTATION))
    binarize = seeded_generator(0, 0, Purpose.BINARIZE)
    noise = seeded_generator(0, 0, Purpose.NOISE)
    sums = torch.zeros(4, dtype=torch.float64)
    steps = -(-n // batch)
    model.likelihood.validate_data = False  # checked once, as the trainer does

    def step(i: int) -> None:
        index = perm[(i % steps) * batch:(i % steps + 1) * batch]
        x = images_set.inputs(index, kind, binarize)
        per_example, terms = trainer.train_step(objective, optimizer, x, kl_weight=1.0,
                                                generator=noise, autocast=amp)
        with torch.no_grad():
            sums.add_(torch.stack((per_example, terms.elbo, terms.recon, terms.kl)
                                  ).sum(1, dtype=torch.float64))

    return step


def profile_steps(cfg, images_set, steps: int, top: int) -> dict[str, Any]:
    """``step_ms`` (median of 5 timings of ``steps`` steps, no profiler) and the ``top`` ops
    by self CPU time over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    step = _loop(cfg, images_set)
    for i in range(10):  # warm-up
        step(i)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        timings.append((time.perf_counter() - started) / steps * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    ops = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 4),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls_per_step": round(e.count / steps, 2)} for e in events[:top]]
    return {"step_ms": round(common.median(timings), 4), "all_step_ms": timings,
            "profiled_step_ms": round(total / 1e3 / steps, 4),
            "ops_per_step": round(sum(e.count for e in events) / steps, 1), "top_ops": ops}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "profile_step")
    parser.add_argument("--presets", nargs="+", default=["default", "pytorch-example"],
                        choices=["default", "pytorch-example", "keras-example", "mnist-vae",
                                 "mnist-vampprior", "conv"])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="profiled steps (default 200; smoke 10)")
    parser.add_argument("--top", type=int, default=15, help="ops listed (default 15)")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="registered name or .npz file of 28x28 images (smoke tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vaelab.data import Splits

    steps = args.steps or (10 if args.smoke else 200)
    monitor = common.CpuMonitor()
    results = {}
    for preset in args.presets:
        for precision in args.precision:
            cfg = _config(args.batch_size, args.dataset, 512 if args.smoke else None,
                          args.threads, (), preset, precision)
            images_set = Splits(cfg.data, cfg.train.seed, "cpu")["train"]
            results[f"{preset} {precision}"] = {
                "preset": preset, "precision": precision, "batch_size": args.batch_size,
                **profile_steps(cfg, images_set, steps, args.top)}
    result = {"benchmark": "profile_step", "smoke": args.smoke, "steps": steps,
              "dataset": args.dataset, "results": results, "machine": common.machine(),
              "cpu_load": monitor.report()}
    common.write_result(result, args.out, "profile_step", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
