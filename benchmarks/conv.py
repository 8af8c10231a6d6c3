"""Benchmark: one training epoch of the conv models, three ways, one process, interleaved.

Two models, batch 128 (``--batch-size``):

- ``colour``: the ``cifar10`` preset's model (32x32 RGB; stages of 32, 64, 128 channels with
  two residual blocks each; the 10-component discretised logistic mixture, 120 output
  channels) on a synthetic uint8 ``.npz`` of ``--colour-images`` random 32x32x3 images
  written to a temporary directory (default 10,000; the figures are also scaled to a
  50,000-image epoch, CIFAR-10's training set, under ``epoch_seconds_50000``).
- ``grey28``: ``--model conv`` with the default settings (channels 32, 64, no residual
  blocks, dense 512-256, latent 16, Bernoulli on dynamically binarised images) on
  Fashion-MNIST's 60,000 training images (``--grey-dataset``: another registered name or a
  28x28 ``.npz``).

Each is timed three ways:

- ``vaelab``: :func:`vaelab.train.train_and_evaluate` with ``train.epochs=1`` and
  ``data.validation_size=0``; the epoch time is the ``seconds`` the trainer records in
  ``metrics.jsonl`` (the batch loop only: not data loading, checkpoints or figures).
- ``plain_loop``: a plain PyTorch loop over the same modules and the same loss: the model
  vaelab builds (same seed, same data-mean output bias), a ``TensorDataset`` of the uint8
  images in a ``DataLoader(batch_size, shuffle=True)``, ``x.float() / 255`` (and
  ``torch.bernoulli`` for the binarised model), the ELBO written out as
  ``model.decode(qz.rsample()).log_prob(x) - kl_divergence(qz, model.prior())``, its
  negative mean, ``torch.optim.Adam`` with its defaults but the rate.
- ``roofline``: the FLOPs of a real forward pass (encoder, decoder and likelihood on one
  batch, counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions, transposed
  convolutions and matrix products, 2 per multiply-add) x 3 for forward + backward, over
  the float32 matmul rate measured in the same run (2048 x 2048, before and after the
  epochs; the median of all repetitions).

Repetitions are interleaved (colour vaelab, colour loop, grey vaelab, grey loop, ...) so a
change in machine load hits all of them; medians are quoted.
``roofline_fraction = roofline_seconds / vaelab seconds``,
``speedup_vs_plain_loop = loop seconds / vaelab seconds``.

Run: ``python benchmarks/conv.py [--repeats 3] [--colour-images 10000]``; writes
``benchmarks/results/conv.json`` (about 12 minutes on a quiet 2-core machine). ``--smoke``
(CI) uses 64 synthetic images per model and one repetition.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import kl_divergence
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["MODELS", "make_config", "plain_loop_epoch", "model_flops", "main"]

#: name -> (preset, [model] overrides, event shape)
MODELS: dict[str, tuple[str | None, list[str], tuple[int, int, int]]] = {
    "colour": ("cifar10", [], (3, 32, 32)),
    "grey28": (None, ["model.kind=conv"], (1, 28, 28)),
}

CIFAR10_TRAIN_IMAGES = 50_000


def write_colour_npz(directory: Path, count: int, seed: int = 0) -> Path:
    """``count`` random uint8 32x32x3 images (NHWC, as CIFAR-10 arrays are usually saved)."""
    rng = np.random.default_rng(seed)
    path = directory / f"colour-{count}.npz"
    np.savez(path, images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))
    return path


def write_grey_npz(directory: Path, count: int, seed: int = 0) -> Path:
    """``count`` random uint8 28x28 grey images (for smoke runs without Fashion-MNIST)."""
    rng = np.random.default_rng(seed)
    path = directory / f"grey-{count}.npz"
    np.savez(path, images=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    return path


def make_config(name: str, dataset: str, batch_size: int, threads: int | None,
                limit: int | None = None):
    """The run configuration of model ``name`` for one epoch on ``dataset`` (its first
    ``limit`` training images)."""
    from vaelab import config

    preset, model_overrides, _ = MODELS[name]
    overrides = [*model_overrides, "train.epochs=1", f"train.batch_size={batch_size}",
                 "data.validation_size=0", "train.device=cpu", f"data.dataset={dataset}"]
    if dataset.endswith((".npz", ".npy")):
        overrides.append("data.test_size=0")  # every image is a training image
    if limit is not None:
        overrides.append(f"data.train_limit={limit}")
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    return config.resolve(preset=preset, overrides=overrides)


def _build(cfg, images: torch.Tensor):
    """The model vaelab's trainer builds for ``cfg`` (same seed, same output bias)."""
    from vaelab.models import build_from_config

    torch.manual_seed(cfg.train.seed)
    model = build_from_config(cfg, tuple(images.shape[1:]))
    if cfg.model.output_bias == "data-mean":
        model.init_output_bias(images.double().mean(0).float() / 255)
    return model


def plain_loop_epoch(cfg, images: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Seconds for one epoch of a plain PyTorch loop over the model and loss of ``cfg``
    (model built outside the timing); ``(seconds, mean loss)``."""
    model = _build(cfg, images)
    model.likelihood.validate_data = False  # vaelab checks the data once, before its loop
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(images), batch_size=cfg.train.batch_size, shuffle=True,
                        generator=generator)
    uint8 = model.likelihood.data_kind == "uint8"
    binarize = cfg.data.binarize == "dynamic"
    model.train()
    total, count = 0.0, 0
    started = time.perf_counter()
    for (x,) in loader:
        if not uint8:
            x = x.float() / 255
            if binarize:
                x = torch.bernoulli(x)
        qz = model.encode(x)
        elbo = model.decode(qz.rsample()).log_prob(x) - kl_divergence(qz, model.prior())
        loss = -elbo.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    return time.perf_counter() - started, total / count


def model_flops(cfg, images: torch.Tensor) -> dict[str, float]:
    """FLOPs per example of a real forward pass (encode, decode, log-likelihood) on one
    batch, counted by ``FlopCounterMode`` (convolutions and matrix products), and 3 x that
    for a training step."""
    from vaelab import objectives

    model = _build(cfg, images)
    x = images[: cfg.train.batch_size]
    if model.likelihood.data_kind != "uint8":
        x = (x.float() / 255 > 0.5).float()
    with torch.no_grad():
        fwd = common.linear_matmul_flops(lambda: objectives.elbo_terms(model, x)) / x.shape[0]
    return {"forward": fwd, "training_3x_forward": 3 * fwd}


def _train_images(cfg) -> torch.Tensor:
    """The uint8 training images ``(N, C, H, W)`` the trainer uses for ``cfg``."""
    from vaelab.data import load_split

    return load_split(cfg.data, "train", cfg.train.seed).images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "conv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--colour-images", type=int, default=10_000,
                        help="synthetic 32x32 RGB images per colour epoch (default 10,000; "
                        "figures are also scaled to 50,000)")
    parser.add_argument("--grey-dataset", default="fashion-mnist",
                        help="registered name or .npz of 28x28 images for the grey28 model")
    parser.add_argument("--grey-images", type=int, default=None,
                        help="use only the first N grey images (default: all)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    smoke = args.smoke
    repeats = args.repeats or (1 if smoke else 3)
    batch = 32 if smoke and args.batch_size == 128 else args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    mm_n, mm_reps = (256, 1) if smoke else (2048, repeats)

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-conv-") as tmp:
        workdir = Path(tmp)
        colour_n = 64 if smoke else args.colour_images
        datasets = {"colour": str(write_colour_npz(workdir, colour_n))}
        grey = args.grey_dataset
        if smoke and grey == "fashion-mnist":
            grey = str(write_grey_npz(workdir, 64))
        datasets["grey28"] = grey
        limits = {"colour": None, "grey28": 64 if smoke else args.grey_images}
        names = args.models
        configs = {n: make_config(n, datasets[n], batch, args.threads, limits[n])
                   for n in names}
        images = {n: _train_images(configs[n]) for n in names}
        flops = {n: model_flops(configs[n], images[n]) for n in names}
        rates = common.matmul_rate(mm_n, mm_reps)["all_gflops"]
        times: dict[str, dict[str, list[float]]] = {n: {"vaelab": [], "loop": []} for n in names}
        records: dict[str, dict[str, Any]] = {}
        loop_loss: dict[str, float] = {}
        for n in names if not smoke else []:  # warm-up: first allocations, oneDNN kernels
            common.vaelab_epoch(configs[n], workdir)
        for _ in range(repeats):
            for n in names:
                seconds, records[n] = common.vaelab_epoch(configs[n], workdir)
                times[n]["vaelab"].append(seconds)
                seconds, loop_loss[n] = plain_loop_epoch(configs[n], images[n])
                times[n]["loop"].append(seconds)
    rates += common.matmul_rate(mm_n, mm_reps)["all_gflops"]
    gflops = common.median(rates)

    results: dict[str, Any] = {}
    for n in names:
        count = int(images[n].shape[0])
        ours = common.summarize(times[n]["vaelab"], count)
        loop = common.summarize(times[n]["loop"], count)
        roofline = count * flops[n]["training_3x_forward"] / (gflops * 1e9)
        cfg = configs[n]
        row = {
            "model": {"kind": cfg.model.kind, "channels": list(cfg.model.options.channels),
                      "blocks": cfg.model.options.blocks,
                      "hidden": list(cfg.model.options.hidden),
                      "latent_dim": cfg.model.latent_dim, "likelihood": cfg.likelihood.name,
                      "likelihood_options": dataclasses.asdict(cfg.likelihood.options),
                      "binarize": cfg.data.binarize, "event_shape": list(MODELS[n][2])},
            "dataset": ("synthetic uint8 npz (random bytes)" if n == "colour"
                        else "synthetic uint8 npz" if smoke else args.grey_dataset),
            "examples_per_epoch": count,
            "batch_size": batch,
            "flops_per_example": {k: round(v) for k, v in flops[n].items()},
            "vaelab": ours,
            "plain_loop": loop,
            "roofline_seconds": roofline,
            "roofline_fraction": round(roofline / ours["seconds"], 3),
            "roofline_fraction_best": round(roofline / ours["best_seconds"], 3),
            "speedup_vs_plain_loop": round(loop["seconds"] / ours["seconds"], 3),
            "vaelab_train_objective": records[n]["train_objective"],
            "plain_loop_objective": loop_loss[n],
        }
        if n == "colour":
            scale = CIFAR10_TRAIN_IMAGES / count
            row["epoch_seconds_50000"] = {"vaelab": round(ours["seconds"] * scale, 1),
                                          "plain_loop": round(loop["seconds"] * scale, 1)}
        results[n] = row
    result = {
        "benchmark": "conv",
        "smoke": smoke,
        "repeats": repeats,
        "matmul": {"gflops": round(gflops, 3), "all_gflops": rates, "n": mm_n},
        "results": results,
        "source": common.source_digest(),
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "conv", smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
