"""Benchmark: one training epoch of the ``pytorch-example`` preset, three ways, one process.

For batch 128 and 512 on the Fashion-MNIST training set (all 60,000 images:
``data.validation_size=0``, as in the PyTorch example, which has no validation split):

- ``vaelab``: :func:`vaelab.train.train_and_evaluate` with ``train.epochs=1, report=False``; the epoch
  time is the ``seconds`` the trainer records in ``metrics.jsonl`` (the batch loop only:
  not data loading, checkpoints or figures).
- ``dataloader_loop``: a loop written like ``examples/vae/main.py`` of the PyTorch examples
  repository: a per-item ``Dataset`` over the uint8 images (``images[i].float() / 255``),
  ``DataLoader(batch_size, shuffle=True)``, the same 784-400-20 ReLU model
  (``fc1, fc21, fc22, fc3, fc4``), sigmoid + ``F.binary_cross_entropy(..., reduction="sum")``
  + the analytic KL, Adam(1e-3).
- ``roofline``: the epoch's matrix-multiply FLOPs divided by the float32 matmul rate
  measured in the same run (:func:`common.matmul_rate`, before and after the epochs; the
  median of all repetitions; ``paired_roofline_fractions`` use the rate measured just
  before each epoch instead). FLOPs per example follow the issue's convention,
  3 x the forward matmul FLOPs (forward + two backward products per layer; 3.91 MFLOP for
  784-400-20); ``roofline_fraction_executed`` uses the FLOPs torch really runs
  (``FlopCounterMode`` over a training step: the first layer needs no input gradient).

Repetitions are interleaved (vaelab, loop, vaelab, loop, ...) so a change in machine load
hits both; medians are quoted. ``roofline_fraction = roofline_seconds / vaelab seconds``,
``speedup_vs_dataloader_loop = loop seconds / vaelab seconds``.

Run: ``python benchmarks/train.py [--repeats 5] [--batch-sizes 128 512]``; writes
``benchmarks/results/train.json``. ``--smoke`` (CI) uses 512 images and one repetition.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["ExampleVAE", "ItemDataset", "dataloader_epoch", "main"]

PRESET = "pytorch-example"


class ExampleVAE(nn.Module):
    """The model of PyTorch's ``examples/vae/main.py`` (784-400-20, ReLU, sigmoid output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def example_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                 logvar: torch.Tensor) -> torch.Tensor:
    """The example's loss: BCE summed over pixels and batch, plus the summed analytic KL."""
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


class ItemDataset(Dataset):
    """Per-item access to uint8 images ``(N, 1, 28, 28)``: ``(float image in [0, 1], 0)``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, 0


def dataloader_epoch(images: torch.Tensor, batch_size: int, seed: int = 0) -> float:
    """Seconds for one epoch of the example-style loop (model built outside the timing)."""
    torch.manual_seed(seed)
    model = ExampleVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(ItemDataset(images), batch_size=batch_size, shuffle=True)
    model.train()
    started = time.perf_counter()
    for x, _ in loader:
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        loss = example_loss(recon, x, mu, logvar)
        loss.backward()
        optimizer.step()
        loss.item()  # the example logs loss.item() every step
    return time.perf_counter() - started


def _config(batch_size: int, dataset: str, train_limit: int | None, threads: int | None,
            extra: list[str] | tuple[str, ...] = ()):
    from vaelab import config

    overrides = [
        "train.epochs=1", f"train.batch_size={batch_size}", "data.validation_size=0",
        "train.device=cpu", f"data.dataset={dataset}",
        # the epoch alone: no per-epoch test evaluation
        "train.validation_split=validation", "train.select=best",
    ]
    if Path(dataset).suffix in (".npz", ".npy"):
        overrides.append("data.test_size=0")  # every example of a file is a training example
    if train_limit is not None:
        overrides.append(f"data.train_limit={train_limit}")
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    return config.resolve(preset=PRESET, overrides=[*overrides, *extra])


def model_flops(batch_size: int) -> dict[str, float]:
    """Matmul FLOPs per example of the preset's model: forward, 3 x forward, executed."""
    from vaelab import objectives
    from vaelab.models import build_from_config

    cfg = _config(batch_size, "fashion-mnist", None, None)
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 28, 28))
    x = torch.rand(batch_size, 1, 28, 28)

    def forward():
        return objectives.elbo_terms(model, x)

    def step():
        terms = forward()
        (-terms.elbo).mean().backward()

    fwd = common.linear_matmul_flops(forward) / batch_size
    executed = common.linear_matmul_flops(step) / batch_size
    return {"forward": fwd, "training_3x_forward": 3 * fwd, "training_executed": executed}


def _load_images(dataset: str, limit: int | None) -> torch.Tensor:
    from vaelab import data

    user_file = Path(dataset).suffix in (".npz", ".npy")
    images = data.load(dataset, "all" if user_file else "train", validation_size=0).images
    return images[:limit].contiguous() if limit is not None else images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "train")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="further config overrides of vaelab's run (e.g. "
                             "likelihood.output=logits); recorded in the JSON")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="registered name or .npz file of 28x28 images (smoke tests)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    repeats = args.repeats or (1 if smoke else 5)
    limit = 512 if smoke else None
    batch_sizes = [32, 128] if smoke and args.batch_sizes == [128, 512] else args.batch_sizes
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    mm_n, mm_reps = (256, 1) if smoke else (2048, repeats)

    images = _load_images(args.dataset, limit)
    n = int(images.shape[0])
    flops = model_flops(batch_sizes[0])
    rates = common.matmul_rate(mm_n, mm_reps)["all_gflops"]
    times: dict[int, dict[str, list[float]]] = {b: {"vaelab": [], "loop": []} for b in batch_sizes}
    records: dict[int, dict[str, Any]] = {}
    paired: dict[int, list[float]] = {b: [] for b in batch_sizes}  # matmul rate before each
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        for b in batch_sizes if not smoke else []:  # warm-up: first allocations, matplotlib
            common.vaelab_epoch(_config(b, args.dataset, limit, args.threads, args.set), Path(tmp))
        for _ in range(repeats):
            for b in batch_sizes:
                cfg = _config(b, args.dataset, limit, args.threads, args.set)
                paired[b].append(common.matmul_rate(mm_n, 1, 0.2)["gflops"])
                seconds, records[b] = common.vaelab_epoch(cfg, Path(tmp))
                times[b]["vaelab"].append(seconds)
                times[b]["loop"].append(dataloader_epoch(images, b))
    rates += common.matmul_rate(mm_n, mm_reps)["all_gflops"]
    gflops = common.median(rates)

    results: dict[str, Any] = {}
    for b in batch_sizes:
        ours, loop = common.summarize(times[b]["vaelab"], n), common.summarize(times[b]["loop"], n)
        roofline = n * flops["training_3x_forward"] / (gflops * 1e9)
        executed = n * flops["training_executed"] / (gflops * 1e9)
        results[f"batch_{b}"] = {
            "batch_size": b,
            "vaelab": ours,
            "dataloader_loop": loop,
            "roofline_seconds": roofline,
            "speedup_vs_dataloader_loop": round(loop["seconds"] / ours["seconds"], 3),
            "roofline_fraction": round(roofline / ours["seconds"], 3),
            "roofline_fraction_best": round(roofline / ours["best_seconds"], 3),
            "roofline_fraction_executed": round(executed / ours["seconds"], 3),
            # per repetition, against the matmul rate measured just before that epoch: the
            # machine's speed drifts, and this pairing shows how much of the spread is drift
            "paired_roofline_fractions": [
                round(n * flops["training_3x_forward"] / (g * 1e9) / t, 3)
                for g, t in zip(paired[b], times[b]["vaelab"])],
            "vaelab_train_objective": records[b]["train_objective"],
        }
    result = {
        "benchmark": "train",
        "smoke": smoke,
        "preset": PRESET,
        "overrides": args.set,
        "dataset": args.dataset,
        "examples_per_epoch": n,
        "repeats": repeats,
        "matmul": {"gflops": round(gflops, 3), "all_gflops": rates, "n": mm_n},
        "flops_per_example": {k: round(v) for k, v in flops.items()},
        "results": results,
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "train", smoke)
    return result


if __name__ == "__main__":
    main()
