"""Benchmark: one batch's dynamic binarisation, torch's uniforms against vaelab's bytes.

Both draw a fresh 0/1 batch from uint8 grey levels with a seeded CPU generator, as the
trainer does before every step, timed in alternating blocks in one process (medians):

- ``uniform``: ``[u < grey / 255]`` with ``u = torch.empty_like(p).uniform_(generator)``
  (vaelab's draw until 2026-12-08; the plain loop of ``train.py`` still draws this way);
- ``bytes``: :func:`vaelab.data.dynamic_binarize`, ``[b < grey]`` with ``b`` a byte uniform
  on 0..254 from 64-bit ``random_`` draws (255 rejected): exactly Bernoulli(grey / 255).

The images are random grey levels (the draw's cost does not depend on them); the draws'
distribution is tested in ``tests/test_data_imageset.py``.

Run: ``python benchmarks/binarize.py --threads 1 [--batch-size 128]``; writes
``benchmarks/results/binarize.json``. ``--smoke``: a few rounds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["main"]


def _uniform(grey: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    p = grey.to(torch.float32).div_(255.0)
    return torch.empty_like(p).uniform_(generator=generator).lt_(p)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vaelab.data import dynamic_binarize

    parser = common.base_parser(__doc__.splitlines()[0], "binarize")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=None,
                        help="draws per timed block (default 200; smoke 5)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.repeats or (2 if args.smoke else 15)
    calls = args.calls or (5 if args.smoke else 200)
    grey = torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    arms = {"uniform": _uniform, "bytes": dynamic_binarize}
    generators = {name: torch.Generator().manual_seed(1) for name in arms}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    monitor = common.CpuMonitor()
    for name, draw in arms.items():  # warm-up
        draw(grey, generators[name])
    for _ in range(rounds):
        for name, draw in arms.items():
            started = time.perf_counter()
            for _ in range(calls):
                draw(grey, generators[name])
            seconds[name].append((time.perf_counter() - started) / calls)
    ms = {name: [t * 1e3 for t in times] for name, times in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "binarize", "smoke": args.smoke, "batch_size": args.batch_size,
        "pixels_per_batch": grey.numel(), "rounds": rounds, "calls_per_round": calls,
        "threads": torch.get_num_threads(),
        "arms": {name: {"ms_per_batch": common.median(ms[name]), "all_ms_per_batch": ms[name]}
                 for name in arms},
        "machine": common.machine(), "cpu_load": monitor.report(),
    }
    result["bytes_speedup"] = round(
        common.median([u / b for u, b in zip(ms["uniform"], ms["bytes"])]), 3)
    common.write_result(result, args.out, "binarize", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
