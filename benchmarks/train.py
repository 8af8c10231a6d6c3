"""Benchmark: one training epoch of vaelab's trainer against plain PyTorch loops, one process.

For each preset model (``--presets``: the MLP presets ``default``, ``pytorch-example``,
``keras-example``, ``mnist-vae``, and ``conv``, the default config with ``model.kind=conv``),
each ``--precision`` (``fp32``, ``bf16``: ``train.precision``) and each batch size (the
preset's own with ``--batch-sizes preset``), on the Fashion-MNIST training set
(``data.validation_size=0``: every image trains; ``--train-limit``/``--conv-limit`` the
first N images), in one process:

- ``vaelab``: :func:`vaelab.train.train_and_evaluate` with ``train.epochs=1``; the epoch
  time is the ``seconds`` the trainer records in ``metrics.jsonl`` (the batch loop only:
  not data loading, checkpoints or figures). ``vaelab_in_step`` splits it: the time inside
  :func:`vaelab.train.train_step` (forward, backward, optimizer) and the loop's bookkeeping
  around it (batches, the float64 running sums of the reported terms, schedules), medians
  over the repetitions (the epoch's seconds are the record's, rounded to 1 ms).
- ``plain_loop``: the fastest plain loop we could write (:func:`plain_epoch`): the images
  as one float tensor on the device (made before the timing), ``randperm`` batches,
  the preset's own encoder and decoder modules (the same layers and initialisation as
  vaelab's model), the loss written out (the preset's Bernoulli form summed over pixels,
  the analytic KL, the batch mean), fused Adam and ``zero_grad(set_to_none=True)``, no
  host sync in the loop; under bf16 the same autocast as vaelab's step.
- ``dataloader_loop`` (``pytorch-example`` at fp32 only): a loop written like
  ``examples/vae/main.py`` of the PyTorch examples repository: a per-item ``Dataset``
  over the uint8 images (``images[i].float() / 255``), ``DataLoader(batch_size,
  shuffle=True)``, the same 784-400-20 ReLU model (``fc1, fc21, fc22, fc3, fc4``), sigmoid
  + ``F.binary_cross_entropy(..., reduction="sum")`` + the analytic KL, Adam(1e-3).
- ``keras_fit`` (``--keras``, ``keras-example`` at fp32 only): the seeds' own system, the
  Keras example's model and loss in Keras 3 on its torch backend
  (:func:`check_keras_example.build_keras_vae`: 784-512-2, ``784 * binary_crossentropy``
  + KL via ``add_loss``, Adam) in this process with the same torch threads, the same images
  as float32 ``(N, 784)`` in [0, 1]; the time of one ``fit(x, epochs=1, batch_size=B,
  shuffle=True, verbose=0)`` call, which is what a Keras user's epoch costs (the model is
  built and compiled once, before the timing, with a warm-up epoch).
- ``roofline``: the epoch's FLOPs of matrix products and convolutions divided by the
  float32 matmul rate measured in the same run (:func:`common.matmul_rate`, before and
  after the epochs; the median of all repetitions; ``paired_roofline_fractions`` use the
  rate measured just before each epoch instead), also for bf16 rows (the target is the
  float32 roofline; the bf16 matmul rate is recorded beside it). FLOPs per example follow
  the issue's convention, 3 x the forward FLOPs (forward + two backward products per
  layer; 3.91 MFLOP for 784-400-20); ``roofline_fraction_executed`` uses the FLOPs torch
  really runs (``FlopCounterMode`` over a training step: the first layer needs no input
  gradient).

Repetitions are interleaved (for each repetition: every preset, precision and batch size,
vaelab then the loops) so a change in machine load hits all; medians are quoted.
``roofline_fraction = roofline_seconds / vaelab seconds``, ``vaelab_vs_plain_loop = plain
loop seconds / vaelab seconds`` (above 1: vaelab is faster), ``speedup_vs_dataloader_loop
= loop seconds / vaelab seconds``.

Run: ``python benchmarks/train.py [--repeats 5] [--batch-sizes 128 512]`` (the
``pytorch-example`` preset in float32: ``results`` keyed ``batch_<B>``; writes
``benchmarks/results/train.json``) or, e.g., ``python benchmarks/train.py --threads 1
--presets default pytorch-example keras-example mnist-vae conv --precision fp32 bf16
--batch-sizes preset --train-limit 20000 --conv-limit 2000 --out
benchmarks/results/train-precision-amd.json`` (``results`` keyed ``<preset> <precision>
batch <B>``). ``--smoke`` (CI) uses 512 images and one repetition.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["ExampleVAE", "ItemDataset", "dataloader_epoch", "main", "plain_epoch"]

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


def _config(batch_size: int | None, dataset: str, train_limit: int | None, threads: int | None,
            extra: list[str] | tuple[str, ...] = (), preset: str = PRESET,
            precision: str = "fp32"):
    """The run config of one timed epoch (``preset`` ``conv``: the default config with
    ``model.kind=conv``; ``batch_size`` None: the preset's own)."""
    from vaelab import config

    overrides = [
        "train.epochs=1", "data.validation_size=0", f"train.precision={precision}",
        "train.device=cpu", f"data.dataset={dataset}",
        # the epoch alone: no per-epoch test evaluation
        "train.validation_split=validation", "train.select=best",
    ]
    if batch_size is not None:
        overrides.append(f"train.batch_size={batch_size}")
    if preset == "conv":
        overrides.append("model.kind=conv")
    if Path(dataset).suffix in (".npz", ".npy"):
        overrides.append("data.test_size=0")  # every example of a file is a training example
    if train_limit is not None:
        overrides.append(f"data.train_limit={train_limit}")
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    name = None if preset in ("default", "conv") else preset
    return config.resolve(preset=name, overrides=[*overrides, *extra])


def model_flops(batch_size: int, cfg=None) -> dict[str, float]:
    """FLOPs per example of matrix products and convolutions of ``cfg``'s model (default:
    the ``pytorch-example`` preset's): forward, 3 x forward, executed in a training step."""
    from vaelab import objectives
    from vaelab.models import build_from_config

    cfg = cfg if cfg is not None else _config(batch_size, "fashion-mnist", None, None)
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 28, 28))
    x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0)).round()

    def forward():
        return objectives.elbo_terms(model, x)

    def step():
        terms = forward()
        (-terms.elbo).mean().backward()

    fwd = common.linear_matmul_flops(forward) / batch_size
    executed = common.linear_matmul_flops(step) / batch_size
    return {"forward": fwd, "training_3x_forward": 3 * fwd, "training_executed": executed}


def _reconstruction(output: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """-log p(x|z) summed over pixels and batch, written as a plain loop writes it for the
    Bernoulli ``output`` form (logits, sigmoid + BCE, Keras' clipped sigmoid + BCE)."""
    if output == "logits":
        return lambda logits, x: F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    if output == "torch-probs":
        return lambda logits, x: F.binary_cross_entropy(torch.sigmoid(logits), x,
                                                        reduction="sum")
    eps = 1e-7  # keras.backend.epsilon()
    return lambda logits, x: F.binary_cross_entropy(
        torch.sigmoid(logits).clamp(eps, 1 - eps), x, reduction="sum")


def _vampprior_kl(model, latent: int, scale_of: Callable) -> Callable:
    """``kl(z, loc, scale)``: log q(z|x) - log p(z) summed over the batch, for the VampPrior
    written out in float32: the K pseudo-inputs through the encoder, each component's
    log-density by the expanded square (one product with z instead of a (B, K, L) tensor),
    logsumexp over components."""
    log_2pi = math.log(2 * math.pi)

    def kl(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        pseudo = F.hardtanh(model.prior_module.pseudo_inputs, 0.0, 1.0)
        out = model.encoder(pseudo).float()
        mu, sigma = out[:, :latent], scale_of(out[:, latent:2 * latent])  # (K, L)
        precision = sigma.pow(-2)
        quadratic = ((z * z) @ precision.T - 2 * z @ (precision * mu).T
                     + (precision * mu * mu).sum(1))
        log_components = -0.5 * quadratic - sigma.log().sum(1) - 0.5 * latent * log_2pi
        log_p = torch.logsumexp(log_components, 1) - math.log(mu.shape[0])
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log()).sum(1) - 0.5 * latent * log_2pi
        return (log_q - log_p).sum()

    return kl


def plain_epoch(cfg, images: torch.Tensor, seed: int = 0,
                device: torch.device | str = "cpu") -> tuple[float, float]:
    """The fastest plain loop we could write for ``cfg``'s model; ``(seconds, mean loss)``.

    ``images``: uint8 ``(N, 1, 28, 28)``. Before the timing: the model (vaelab's encoder and
    decoder modules, seeded as vaelab seeds them, its output bias at the data mean when the
    preset says so), the preset's optimizer (fused Adam, or RMSprop with torch's foreach
    implementation), and the images as one float tensor in [0, 1] (binarised once for
    ``binarize = static``). In the loop: a ``randperm`` batch (``index_select``), dynamic
    binarisation as ``uniform_`` + ``lt_``, the forward (under autocast for bf16, the
    encoder's and decoder's outputs cast to float32 as vaelab does), the loss (the analytic
    KL of a standard normal prior; for the VampPrior, Monte Carlo, see
    :func:`_vampprior_kl`; weighted as vaelab weighs it in the first epoch), backward,
    ``step``; the loss is summed on the device and read once, after the timing (on CUDA
    the clock stops after a ``synchronize``: no host sync inside the loop).
    """
    from vaelab.models import ENCODER_SCALES, build_from_config
    from vaelab.objectives import kl_weight
    from vaelab.train import autocast_dtype, precision_context

    if cfg.likelihood.name != "bernoulli" or cfg.prior.name not in ("normal", "vampprior"):
        raise ValueError(f"plain_epoch writes Bernoulli losses with a standard normal or "
                         f"VampPrior prior, not {cfg.likelihood.name} / {cfg.prior.name}")
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    model = build_from_config(cfg, tuple(images.shape[1:])).to(device).train()
    x_all = images.to(device).float().div_(255)
    if cfg.model.output_bias == "data-mean":
        model.init_output_bias(x_all.mean(0))
    gen = torch.Generator(device=device).manual_seed(seed)
    if cfg.data.binarize == "static":
        x_all = torch.bernoulli(x_all, generator=gen)
    dynamic = cfg.data.binarize == "dynamic"
    encoder, decoder = model.encoder, model.decoder
    scale_of = ENCODER_SCALES[cfg.model.encoder_scale]
    recon = _reconstruction(cfg.likelihood.options.output)
    latent = cfg.model.latent_dim
    if cfg.train.optimizer == "adam":
        eps = cfg.train.adam_eps if cfg.train.adam_eps is not None else 1e-8
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, eps=eps, fused=True)
    else:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.train.lr, foreach=True)
    vamp_kl = _vampprior_kl(model, latent, scale_of) if cfg.prior.name == "vampprior" else None
    objective = cfg.objective  # its KL weight in the first epoch, step by step as vaelab's
    amp = autocast_dtype(cfg.train.precision, device)
    n, batch = x_all.shape[0], cfg.train.batch_size
    total = torch.zeros((), device=device)
    started = time.perf_counter()
    perm = torch.randperm(n, generator=gen, device=device)
    for step, i in enumerate(range(0, n, batch)):
        weight = kl_weight(step, objective.beta, objective.warmup_steps,
                           warmup_epochs=objective.warmup_epochs)
        x = x_all.index_select(0, perm[i:i + batch])
        if dynamic:
            x = torch.empty_like(x).uniform_(generator=gen).lt_(x)
        with precision_context(device, amp):
            out = encoder(x).float()
            loc, scale = out[:, :latent], scale_of(out[:, latent:2 * latent])
            z = loc + scale * torch.randn(loc.shape, generator=gen, device=device)
            logits = decoder(z).float().view_as(x)
            if vamp_kl is not None:
                kl = vamp_kl(z, loc, scale)
        if vamp_kl is None:
            kl = 0.5 * (loc.square() + scale.square() - 1).sum() - scale.log().sum()
        loss = (recon(logits, x) + (kl if weight == 1.0 else weight * kl)) / x.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return seconds, float(total) / math.ceil(n / batch)


def keras_fitter(images: torch.Tensor, batch_size: int) -> Callable[[], float]:
    """A function timing one Keras ``fit`` epoch of the example's model on ``images``
    (uint8 ``(N, 1, 28, 28)``); the model is built, compiled and warmed up here."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    from check_keras_example import build_keras_vae

    if keras.backend.backend() != "torch":
        raise SystemExit(f"--keras times Keras on its torch backend; KERAS_BACKEND is "
                         f"{keras.backend.backend()!r}: unset it or set it to torch")
    x = images.reshape(len(images), -1).numpy().astype("float32") / 255.0
    keras.utils.set_random_seed(0)
    vae, _, _ = build_keras_vae(keras, x.shape[1])
    vae.compile(optimizer="adam")
    vae.fit(x[:2048], epochs=1, batch_size=batch_size, verbose=0)  # warm-up

    def epoch() -> float:
        started = time.perf_counter()
        vae.fit(x, epochs=1, batch_size=batch_size, shuffle=True, verbose=0)
        return time.perf_counter() - started

    return epoch


def _load_images(dataset: str, limit: int | None) -> torch.Tensor:
    from vaelab import data

    user_file = Path(dataset).suffix in (".npz", ".npy")
    images = data.load(dataset, "all" if user_file else "train", validation_size=0).images
    return images[:limit].contiguous() if limit is not None else images


def _keras_versions() -> dict[str, str]:
    import keras

    return {"keras": keras.__version__, "backend": keras.backend.backend()}


def _key(preset: str, precision: str, batch: int, legacy: bool) -> str:
    return f"batch_{batch}" if legacy else f"{preset} {precision} batch {batch}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "train")
    parser.add_argument("--batch-sizes", nargs="+", default=["128", "512"],
                        help="batch sizes, or 'preset' for each preset's own (default 128 512)")
    parser.add_argument("--presets", nargs="+", default=[PRESET],
                        choices=["default", "pytorch-example", "keras-example", "mnist-vae",
                                 "mnist-vampprior", "conv"],
                        help="the models to time (default pytorch-example; conv: the default "
                             "config with model.kind=conv)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="train.precision of vaelab's run and the plain loop's autocast "
                             "(default fp32)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="time epochs of the first N training images (default: all)")
    parser.add_argument("--conv-limit", type=int, default=None,
                        help="the same for the conv model (default: --train-limit)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="further config overrides of vaelab's run (e.g. "
                             "likelihood.output=logits); recorded in the JSON")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="registered name or .npz file of 28x28 images (smoke tests)")
    parser.add_argument("--compile", action="store_true",
                        help="also time vaelab with train.compile=true (compiled in the "
                             "warm-up, on a whole epoch, so the timed epochs reuse the graphs)")
    parser.add_argument("--keras", action="store_true",
                        help="also time Keras 3's fit of the example's model beside the "
                             "keras-example preset (needs keras)")
    args = parser.parse_args(argv)
    if args.keras and "keras-example" not in args.presets:
        parser.error("--keras times the keras-example preset: add it to --presets")
    smoke = args.smoke
    repeats = args.repeats or (1 if smoke else 5)
    own_batch = args.batch_sizes == ["preset"]
    sizes = [] if own_batch else [int(b) for b in args.batch_sizes]
    if smoke and sizes == [128, 512]:
        sizes = [32, 128]
    legacy = args.presets == [PRESET] and args.precision == ["fp32"] and not own_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    mm_n, mm_reps = (256, 1) if smoke else (2048, repeats)

    limits = {p: 512 if smoke else (args.conv_limit or args.train_limit if p == "conv"
                                    else args.train_limit) for p in args.presets}
    images = {p: _load_images(args.dataset, limits[p]) for p in args.presets}
    runs = []  # (preset, precision, batch size)
    for preset in args.presets:
        batches = [_config(None, args.dataset, None, None, args.set, preset).train.batch_size
                   ] if own_batch else sizes
        runs += [(preset, precision, b) for precision in args.precision for b in batches]
    # per example, at the run's batch size (the VampPrior's pseudo-input pass is per batch)
    flops = {(p, b): model_flops(b, _config(b, args.dataset, None, None, args.set, p))
             for p, _, b in runs}
    rates = common.matmul_rate(mm_n, mm_reps)["all_gflops"]
    bf16_rates = (common.matmul_rate(mm_n, mm_reps, dtype=torch.bfloat16)["all_gflops"]
                  if "bf16" in args.precision else [])
    names = ("vaelab", "vaelab_step", "plain", "compiled", "loop", "keras")
    keras_runs = {r: keras_fitter(images[r[0]], r[2]) for r in runs
                  if args.keras and r[0] == "keras-example" and r[1] == "fp32"}
    times: dict[tuple, dict[str, list[float]]] = {r: {k: [] for k in names} for r in runs}
    records: dict[tuple, dict[str, Any]] = {}
    plain_loss: dict[tuple, float] = {}
    paired: dict[tuple, list[float]] = {r: [] for r in runs}  # matmul rate before each

    def compiled_config(cfg) -> Any:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))

    def config_of(run: tuple) -> Any:
        preset, precision, b = run
        return _config(b, args.dataset, limits[preset], args.threads, args.set, preset,
                       precision)

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        for preset, precision, b in runs if not smoke else []:  # warm-up: allocations, imports
            warm = _config(b, args.dataset, 2048, args.threads, args.set, preset, precision)
            common.vaelab_epoch(warm, Path(tmp))
            plain_epoch(warm, images[preset][:2048])
            if args.compile:  # every batch shape of the timed epochs: a whole epoch
                common.vaelab_epoch(compiled_config(config_of((preset, precision, b))), Path(tmp))
        timed = ("vaelab", "plain", "compiled") if args.compile else ("vaelab", "plain")
        for repetition in range(repeats):
            for run in runs:
                cfg = config_of(run)
                paired[run].append(common.matmul_rate(mm_n, 1, 0.2)["gflops"])
                # Counterbalanced: the epoch right after the matrix-product probe and the
                # data loading starts with cold caches and a fresh heap, so the loops take
                # turns going first.
                shift = repetition % len(timed)
                for name in timed[shift:] + timed[:shift]:
                    if name == "vaelab":
                        seconds, records[run] = common.vaelab_epoch(cfg, Path(tmp))
                        times[run]["vaelab_step"].append(records[run]["step_seconds"])
                    elif name == "compiled":
                        seconds, _ = common.vaelab_epoch(compiled_config(cfg), Path(tmp))
                    else:
                        seconds, plain_loss[run] = plain_epoch(cfg, images[run[0]])
                    times[run][name].append(seconds)
                if run[0] == PRESET and run[1] == "fp32":
                    times[run]["loop"].append(dataloader_epoch(images[run[0]], run[2]))
                if run in keras_runs:
                    times[run]["keras"].append(keras_runs[run]())
    rates += common.matmul_rate(mm_n, mm_reps)["all_gflops"]
    gflops = common.median(rates)

    results: dict[str, Any] = {}
    for run in runs:
        preset, precision, b = run
        n = int(images[preset].shape[0])
        per_example = flops[preset, b]
        ours = common.summarize(times[run]["vaelab"], n)
        plain = common.summarize(times[run]["plain"], n)
        roofline = n * per_example["training_3x_forward"] / (gflops * 1e9)
        in_step = common.median(times[run]["vaelab_step"])
        executed = n * per_example["training_executed"] / (gflops * 1e9)
        row: dict[str, Any] = {
            "preset": preset,
            "precision": precision,
            "batch_size": b,
            "examples": n,
            "vaelab": ours,
            "plain_loop": plain,
            "roofline_seconds": roofline,
            "vaelab_vs_plain_loop": round(plain["seconds"] / ours["seconds"], 3),
            "vaelab_vs_plain_loop_best": round(plain["best_seconds"] / ours["best_seconds"], 3),
            "roofline_fraction": round(roofline / ours["seconds"], 3),
            "roofline_fraction_best": round(roofline / ours["best_seconds"], 3),
            "roofline_fraction_executed": round(executed / ours["seconds"], 3),
            "plain_loop_roofline_fraction": round(roofline / plain["seconds"], 3),
            # per repetition, against the matmul rate measured just before that epoch: the
            # machine's speed drifts, and this pairing shows how much of the spread is drift
            "paired_roofline_fractions": [
                round(n * per_example["training_3x_forward"] / (g * 1e9) / t, 3)
                for g, t in zip(paired[run], times[run]["vaelab"])],
            "vaelab_in_step": {
                "step_seconds": in_step,
                "outside_step_seconds": common.median(
                    [t - s for t, s in zip(times[run]["vaelab"], times[run]["vaelab_step"])]),
                "step_vs_plain_loop": round(plain["seconds"] / in_step, 3)},
            "vaelab_train_objective": records[run]["train_objective"],
            "plain_loop_train_objective": plain_loss[run],
        }
        if times[run]["compiled"]:
            compiled = common.summarize(times[run]["compiled"], n)
            row["vaelab_compiled"] = compiled
            row["compiled_vs_eager"] = round(ours["seconds"] / compiled["seconds"], 3)
            row["compiled_vs_plain_loop"] = round(plain["seconds"] / compiled["seconds"], 3)
            row["compiled_roofline_fraction"] = round(roofline / compiled["seconds"], 3)
        if times[run]["loop"]:
            loop = common.summarize(times[run]["loop"], n)
            row["dataloader_loop"] = loop
            row["speedup_vs_dataloader_loop"] = round(loop["seconds"] / ours["seconds"], 3)
        if times[run]["keras"]:
            peer = common.summarize(times[run]["keras"], n)
            row["keras_fit"] = peer
            row["vaelab_vs_keras"] = round(peer["seconds"] / ours["seconds"], 3)
            row["keras_versions"] = _keras_versions()
        results[_key(preset, precision, b, legacy)] = row
    for run in runs:  # bf16 against fp32 of the same preset and batch
        preset, precision, b = run
        base = (preset, "fp32", b)
        if precision != "fp32" and base in times:
            row = results[_key(preset, precision, b, legacy)]
            fp32 = results[_key(*base, legacy)]
            row["speedup_vs_fp32"] = round(fp32["vaelab"]["seconds"] / row["vaelab"]["seconds"], 3)
            row["plain_loop_speedup_vs_fp32"] = round(
                fp32["plain_loop"]["seconds"] / row["plain_loop"]["seconds"], 3)
    result = {
        "benchmark": "train",
        "smoke": smoke,
        "preset": PRESET if args.presets == [PRESET] else args.presets,
        "presets": args.presets,
        "precisions": args.precision,
        "overrides": args.set,
        "dataset": args.dataset,
        "examples_per_epoch": int(images[args.presets[0]].shape[0]),
        "repeats": repeats,
        "matmul": {"gflops": round(gflops, 3), "all_gflops": rates, "n": mm_n},
        "flops_per_example": {k: round(v) for k, v in flops[runs[0][0], runs[0][2]].items()},
        "flops_per_example_by_preset": {f"{p} batch {b}": {k: round(v) for k, v in f.items()}
                                        for (p, b), f in flops.items()},
        "results": results,
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    if bf16_rates:
        result["matmul_bf16"] = {"gflops": round(common.median(bf16_rates), 3),
                                 "all_gflops": bf16_rates, "n": mm_n}
    common.write_result(result, args.out, args.out.stem if args.out else "train", smoke,
                        note=args.note)
    return result


if __name__ == "__main__":
    main()
