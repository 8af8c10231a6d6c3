"""Benchmark: vaelab's trainer against pythae 0.1.2's own trainer, same model, data and batch.

Issue 13, "speed against the peer". Both libraries train the ``mnist-vae`` protocol
(Rezende & Mohamed 2015 as pythae's ``examples/scripts/reproducibility/vae.py`` runs it) for
``--epochs`` epochs (default 3), each in a fresh subprocess, alternating
(pythae, vaelab, vaelab, pythae, ...; ``--repeats`` runs of each, default 3), with the same
torch thread count (``--threads``, default 1: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``torch.set_num_threads``) and the same data. Repetition ``r`` uses seed ``--seed + r``
(default 0, 1, 2) for both libraries: vaelab's validation split and binarisation draw, the
initial weights (``torch.manual_seed`` before each model is built) and, through them, the
runs' RNG streams (pythae's trainer then seeds its own with its default 8).

- Data: the preset's splits (:func:`vaelab.data.load_split` with its ``[data]`` section:
  Larochelle's binarised MNIST, 50,000 train / 10,000 validation, the files pythae's vae.py
  reads; ``--data-dir`` names their folder), read once here. pythae gets these 0/1
  pixels as a float32 ``(N, 784)`` array through ``DataProcessor().process_data(...)``,
  reshaped to ``(N, 1, 28, 28)`` and ``DataProcessor.to_dataset`` (as vae.py does); vaelab
  loads the same splits with the same config (the SHA-256 of both splits is recorded).
- pythae: ``VAE(VAEConfig(input_dim=(784,), latent_dim=40, reconstruction_loss="bce"))`` with
  vae.py's ``Encoder`` (Linear(784, 400), ReLU; Linear(400, 40) for the mean and for
  log_var) and ``Decoder`` (Linear(40, 400), ReLU, Linear(400, 784), Sigmoid), trained by
  ``pythae.trainers.BaseTrainer`` with vae.py's ``BaseTrainerConfig`` (batch 100 for
  training and evaluation, Adam lr 1e-4, MultiStepLR milestones 200/350/500/750/1000, gamma
  10^(-1/5); ``"verbose": True`` dropped from the scheduler's arguments: torch 2.13 refuses
  it; ``no_cuda=True``), its default progress bar and console printer callbacks included.
- vaelab: :func:`vaelab.train.train_and_evaluate` with ``--preset mnist-vae`` and
  ``train.epochs=E``, ``train.threads=T``, ``train.device=cpu`` (784-400-40, Bernoulli
  logits, the same optimizer and schedule; its own evaluation batch of 1000).

What is timed (``time.perf_counter``, in the worker process, model and data already built):

- ``train_seconds``: pythae's ``BaseTrainer.train_step(epoch)`` (its DataLoader loop over
  the 50,000 training images: forward, backward, Adam) / vaelab's ``train_epoch`` (its
  batch loop; within a few ms of the ``seconds`` it records in ``metrics.jsonl``, which is
  kept as ``record_seconds``).
- ``eval_seconds``: pythae's ``BaseTrainer.eval_step(epoch)`` / vaelab's
  ``vaelab.train.evaluate`` (both one pass over the 10,000 validation images).
- ``epoch_seconds``: the whole epoch as each trainer runs it, from the start of the
  training pass to the end of the epoch's bookkeeping: pythae's ``on_epoch_begin`` to its
  ``on_log`` callback (train, eval, scheduler step, ``deepcopy`` of the best model);
  vaelab's ``train_epoch`` start to its per-epoch line (train, eval, best/last checkpoints,
  ``metrics.jsonl``, the sample grid PNG).

The quoted ratio is ``median(pythae train + eval) / median(vaelab train + eval)`` per epoch
(target: at least 3 on this CPU); the train-only and whole-epoch ratios are given too, and
per-repetition ratios (each pythae run against the vaelab run next to it). Eval losses:
pythae's ``epoch_eval_loss`` (the mean over its 100-image eval batches of the batch-mean
single-sample negative ELBO: summed BCE of the sigmoid output + analytic KL) and vaelab's
``val_nelbo`` (single-sample NELBO summed over the validation examples / their number,
Bernoulli from logits, seeded noise); different initial weights and RNG streams, so equal
only up to seed noise (the per-repetition differences show its size).

The roofline (as ``train.py``): the epoch's matrix-multiply FLOPs (``FlopCounterMode`` on
vaelab's training step: 3.42 MFLOP per training example, 1.35 MFLOP forward per validation
example; pythae runs the same products) divided by the float32 matmul rate measured in this
process with the same thread count, before, between and after the runs. No trainer beats it,
so ``1 / (pythae's roofline fraction)`` bounds the ratio any trainer could reach.

pythae is not a vaelab dependency: install it in a scratch venv (``pip install
pythae==0.1.2``; never into vaelab's environment) and pass its interpreter with
``--pythae-python`` (or ``PYTHAE_PYTHON``); it is used directly when importable here.

``--vaelab-set KEY=VALUE`` (repeatable) changes vaelab's runs only: ``--vaelab-set
train.precision=bf16 --vaelab-set train.compile=true`` times vaelab in bfloat16, compiled,
against pythae's float32 trainer (compilation falls in each run's first epoch: the
``train_plus_eval_steady`` figures leave the first epochs out).

Run: ``python benchmarks/pythae_compare.py [--epochs 3] [--threads 1] [--repeats 3]``; writes
``benchmarks/results/pythae_compare.json``. ``--smoke`` (CI): 200 training and 40 validation
images, 1 epoch, 1 repetition (``--dataset FILE.npz`` for synthetic 28x28 images).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path("/work/shared/data/binarized-mnist")
PRESET = "mnist-vae"
NAME = "pythae_compare"
#: pythae's vae.py trainer settings (examples/scripts/reproducibility/vae.py).
PYTHAE_MILESTONES = [200, 350, 500, 750, 1000]
PYTHAE_GAMMA = 10 ** (-1 / 5)
TARGET_RATIO = 3.0
SMOKE_TRAIN, SMOKE_VALIDATION = 200, 40


# --------------------------------------------------------------------------- pythae worker
# Runs in pythae's interpreter: imports numpy, torch and pythae only (not vaelab).


def _pythae_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train vae.py's model with pythae's BaseTrainer for ``spec["epochs"]`` epochs."""
    import importlib.metadata

    import numpy as np
    import torch
    import torch.nn as nn
    from pythae.data.preprocessors import DataProcessor
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    torch.set_num_threads(spec["threads"])

    class Encoder(BaseEncoder):  # vae.py's Encoder (one hidden layer of 400)
        def __init__(self, args):
            BaseEncoder.__init__(self)
            self.input_dim, self.latent_dim = args.input_dim, args.latent_dim
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(int(np.prod(args.input_dim)),
                                                                 400), nn.ReLU())])
            self.depth = 1
            self.embedding = nn.Linear(400, self.latent_dim)
            self.log_var = nn.Linear(400, self.latent_dim)

        def forward(self, x, output_layer_levels=None):
            output = ModelOutput()
            out = self.layers[0](x.reshape(-1, int(np.prod(self.input_dim))))
            output["embedding"] = self.embedding(out)
            output["log_covariance"] = self.log_var(out)
            return output

    class Decoder(BaseDecoder):  # vae.py's Decoder
        def __init__(self, args):
            BaseDecoder.__init__(self)
            self.input_dim = args.input_dim
            self.layers = nn.ModuleList([
                nn.Sequential(nn.Linear(args.latent_dim, 400), nn.ReLU()),
                nn.Sequential(nn.Linear(400, int(np.prod(args.input_dim))), nn.Sigmoid())])
            self.depth = 2

        def forward(self, z, output_layer_levels=None):
            output = ModelOutput()
            out = self.layers[1](self.layers[0](z))
            output["reconstruction"] = out.reshape((z.shape[0],) + self.input_dim)
            return output

    epochs: list[dict[str, Any]] = []

    class Clock(TrainingCallback):
        """Whole epoch: on_epoch_begin -> on_log (the last hook of pythae's epoch loop)."""

        def on_epoch_begin(self, training_config, **kwargs):
            epochs.append({"epoch": kwargs["epoch"], "_start": time.perf_counter()})

        def on_log(self, training_config, logs, **kwargs):
            rec = epochs[-1]
            rec["epoch_seconds"] = time.perf_counter() - rec.pop("_start")

    class TimedTrainer(BaseTrainer):
        """pythae's BaseTrainer unchanged; its train_step and eval_step timed."""

        def train_step(self, epoch):
            lr = self.optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            loss = super().train_step(epoch)
            epochs[-1].update(train_seconds=time.perf_counter() - started, lr=lr,
                              train_loss=float(loss))
            return loss

        def eval_step(self, epoch):
            started = time.perf_counter()
            loss = super().eval_step(epoch)
            epochs[-1].update(eval_seconds=time.perf_counter() - started, eval_loss=float(loss))
            return loss

    setup_started = time.perf_counter()
    data = {}
    processor = DataProcessor()
    for split in ("train", "validation"):
        pixels = np.load(Path(spec["data"]) / f"{split}.npy")  # uint8 0/1, (N, 784)
        tensor = processor.process_data(pixels.astype(np.float32)).reshape(-1, 1, 28, 28)
        data[split] = processor.to_dataset(tensor)
    torch.manual_seed(spec["seed"])  # the initial weights
    model_config = VAEConfig(input_dim=(784,), latent_dim=40, reconstruction_loss="bce")
    model = VAE(model_config=model_config, encoder=Encoder(model_config),
                decoder=Decoder(model_config))
    training_config = BaseTrainerConfig(
        output_dir=spec["workdir"], per_device_train_batch_size=100,
        per_device_eval_batch_size=100, num_epochs=spec["epochs"], learning_rate=1e-4,
        steps_saving=None, steps_predict=None, no_cuda=True, scheduler_cls="MultiStepLR",
        scheduler_params={"milestones": PYTHAE_MILESTONES, "gamma": PYTHAE_GAMMA})
    trainer = TimedTrainer(model=model, train_dataset=data["train"],
                           eval_dataset=data["validation"], training_config=training_config,
                           callbacks=[Clock()])
    setup_seconds = time.perf_counter() - setup_started
    started = time.perf_counter()
    trainer.train()
    return {
        "library": "pythae",
        "version": importlib.metadata.version("pythae"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "n_train": len(data["train"]), "n_validation": len(data["validation"]),
        "optimizer": type(trainer.optimizer).__name__,
        "scheduler": type(trainer.scheduler).__name__,
        "setup_seconds": round(setup_seconds, 3),
        "train_call_seconds": round(time.perf_counter() - started, 3),
        "epochs": [_rounded(e) for e in epochs],
    }


# --------------------------------------------------------------------------- vaelab worker


def _vaelab_config(spec: dict[str, Any]):
    """The ``mnist-vae`` preset with the benchmark's epochs, threads and data (and the smoke
    sizes)."""
    from vaelab import config

    overrides = [f"train.epochs={spec['epochs']}", f"train.threads={spec['threads']}",
                 "train.device=cpu", f"train.seed={spec['seed']}"]
    if spec.get("dataset"):
        overrides.append(f"data.dataset={spec['dataset']}")
        if Path(spec["dataset"]).suffix in (".npz", ".npy"):
            overrides.append("data.test_size=0")
    if spec.get("data_dir"):
        overrides.append(f"data.data_dir={spec['data_dir']}")
    if spec.get("smoke"):
        overrides += [f"data.train_limit={SMOKE_TRAIN}",
                      f"data.validation_size={SMOKE_VALIDATION}"]
    overrides += spec.get("vaelab_set") or []  # --vaelab-set: e.g. train.precision=bf16
    return config.resolve(preset=PRESET, overrides=overrides)


def _vaelab_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the preset with :func:`vaelab.train.train_and_evaluate`; time each epoch's
    training pass, validation and whole epoch."""
    import torch

    import vaelab
    from vaelab import train as vtrain

    torch.set_num_threads(spec["threads"])
    cfg = _vaelab_config(spec)
    epochs: list[dict[str, Any]] = []
    train_epoch, evaluate = vtrain.train_epoch, vtrain.evaluate

    def timed_train_epoch(loop, epoch, state):
        started = time.perf_counter()
        record = train_epoch(loop, epoch, state)
        epochs.append({"epoch": epoch + 1, "_start": started,
                       "train_seconds": time.perf_counter() - started,
                       "record_seconds": record["seconds"], "lr": record["lr"],
                       "train_loss": record["train_nelbo"]})
        return record

    def timed_evaluate(loop):
        started = time.perf_counter()
        out = evaluate(loop)
        epochs[-1].update(eval_seconds=time.perf_counter() - started,
                          eval_loss=out.get("val_nelbo"), eval_recon=out.get("val_recon"),
                          eval_kl=out.get("val_kl"))
        return out

    def echo(_line: str) -> None:  # the per-epoch line: the epoch's files are written
        rec = epochs[-1]
        rec["epoch_seconds"] = time.perf_counter() - rec.pop("_start")

    vtrain.train_epoch, vtrain.evaluate = timed_train_epoch, timed_evaluate
    started = time.perf_counter()
    try:
        summary = vtrain.train_and_evaluate(cfg, Path(spec["workdir"]) / "run", progress=False,
                                            echo=echo)
    finally:
        vtrain.train_epoch, vtrain.evaluate = train_epoch, evaluate
    return {
        "library": "vaelab",
        "version": getattr(vaelab, "__version__", None),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "optimizer": "Adam (fused)" if cfg.train.optimizer == "adam" else cfg.train.optimizer,
        "eval_batch_size": cfg.train.eval_batch_size,
        "train_and_evaluate_seconds": round(time.perf_counter() - started, 3),
        "best_epoch": summary["best_epoch"],
        "epochs": [_rounded(e) for e in epochs],
    }


# --------------------------------------------------------------------------- the benchmark


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


def _sha256(array) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def _export_data(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """vaelab's train and validation splits of the preset as uint8 0/1 ``(N, 784)`` .npy files
    for pythae; returns their sizes, digests and vaelab's provenance."""
    import numpy as np

    from vaelab.data import load_split

    cfg = _vaelab_config(spec)
    out: dict[str, Any] = {"dataset": cfg.data.dataset, "binarize": cfg.data.binarize,
                           "validation_size": cfg.data.validation_size,
                           "train_limit": cfg.data.train_limit, "seed": cfg.train.seed}
    for split in ("train", "validation"):
        images = load_split(cfg.data, split, cfg.train.seed, progress=False)
        if images.levels != 2:
            raise SystemExit(f"expected binarised {split} images, got levels={images.levels}")
        pixels = images.images.reshape(len(images), -1).numpy().astype(np.uint8)
        np.save(directory / f"{split}.npy", pixels)
        out[split] = {"n": int(pixels.shape[0]), "pixel_mean": round(float(pixels.mean()), 6),
                      "sha256": _sha256(pixels)}
    return out


def _training_flops(spec: dict[str, Any], batch_size: int = 100) -> dict[str, int]:
    """Matrix-multiply FLOPs per example of the preset's model (784-400-40; pythae's vae.py
    model runs the same products: its two 400 -> 40 heads are vaelab's one 400 -> 80):
    forward, and forward + backward as torch runs them (``FlopCounterMode``)."""
    import torch

    import common
    from vaelab import objectives
    from vaelab.models import build_from_config

    cfg = _vaelab_config(spec)
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 28, 28))
    x = torch.bernoulli(torch.full((batch_size, 1, 28, 28), 0.5))

    def forward():
        return objectives.elbo_terms(model, x)

    def step():
        (-forward().elbo).mean().backward()

    return {"forward": common.linear_matmul_flops(forward) // batch_size,
            "training_executed": common.linear_matmul_flops(step) // batch_size}


def _pythae_python(requested: str | None) -> str:
    if requested:
        return requested
    if importlib.util.find_spec("pythae") is not None:
        return sys.executable
    raise SystemExit("pythae is not importable here: install pythae==0.1.2 in a scratch venv "
                     "(not vaelab's) and pass its interpreter with --pythae-python PATH "
                     "(or set PYTHAE_PYTHON)")


def _run_worker(python: str, library: str, spec: dict[str, Any], threads: int,
                log: Path) -> dict[str, Any]:
    """Run one library's training in a fresh process; return its result."""
    result_path = Path(spec["workdir"]) / "result.json"
    spec_path = Path(spec["workdir"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [python, str(Path(__file__).resolve()), "--worker", library, "--spec",
           str(spec_path), "--result", str(result_path)]
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              cwd=spec["workdir"])
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"the {library} worker failed (status {done.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def _per_epoch(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [e[key] for run in runs for e in run["epochs"]]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    import common

    out: dict[str, Any] = {}
    train, evals = _per_epoch(runs, "train_seconds"), _per_epoch(runs, "eval_seconds")
    out["train"] = common.summarize(train)
    out["eval"] = common.summarize(evals)
    out["train_plus_eval"] = common.summarize([t + e for t, e in zip(train, evals)])
    out["epoch"] = common.summarize(_per_epoch(runs, "epoch_seconds"))
    steady = [e["train_seconds"] + e["eval_seconds"] for run in runs for e in run["epochs"][1:]]
    if steady:  # from each run's second epoch on: without train.compile's compilation
        out["train_plus_eval_steady"] = common.summarize(steady)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    import common

    parser = common.base_parser(__doc__.splitlines()[0], NAME)
    parser.set_defaults(threads=1)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default 3; smoke 1)")
    parser.add_argument("--dataset", default=None,
                        help="default: the preset's (binarized-mnist); a .npz of 28x28 images for tests")
    parser.add_argument("--data-dir", default=None,
                        help=f"the dataset's files (default {DEFAULT_DATA_DIR} when it exists)")
    parser.add_argument("--pythae-python", default=os.environ.get("PYTHAE_PYTHON"),
                        help="an interpreter that can import pythae 0.1.2 (default: this one "
                             "if it can, else $PYTHAE_PYTHON)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first repetition; repetition r uses seed + r")
    parser.add_argument("--vaelab-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for vaelab's runs only, repeatable (e.g. "
                             "train.precision=bf16, train.compile=true); pythae trains as "
                             "its vae.py does")
    args = parser.parse_args(argv)
    smoke = args.smoke
    epochs = args.epochs or (1 if smoke else 3)
    repeats = args.repeats or (1 if smoke else 3)
    data_dir = args.data_dir or (str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir()
                                 and args.dataset is None else None)
    pythae_python = _pythae_python(args.pythae_python)
    import torch

    from vaelab import config as vconfig

    torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    base = {"epochs": epochs, "threads": args.threads, "seed": args.seed, "smoke": smoke,
            "dataset": args.dataset, "data_dir": data_dir, "vaelab_set": args.vaelab_set}
    runs: dict[str, list[dict[str, Any]]] = {"pythae": [], "vaelab": []}
    order: list[str] = []
    loads: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vaelab-pythae-") as tmp:
        data_info: list[dict[str, Any]] = []
        flops = _training_flops(base)
        mm_n, mm_seconds = (256, 0.05) if smoke else (1024, 0.5)
        rates = common.matmul_rate(mm_n, 1 if smoke else 3, mm_seconds)["all_gflops"]
        paired_rates: dict[str, list[float]] = {"pythae": [], "vaelab": []}
        log = Path(tmp) / "workers.log"
        for rep in range(repeats):
            # Repetition r uses seed + r (data split and draw, initial weights, RNG streams)
            # for both libraries: the timings repeat, and the eval losses show seed noise.
            seeded = {**base, "seed": args.seed + rep}
            data_path = Path(tmp) / f"data-{rep}"
            data_path.mkdir()
            data_info.append(_export_data(seeded, data_path))
            pair = ["pythae", "vaelab"] if rep % 2 == 0 else ["vaelab", "pythae"]
            for library in pair:
                workdir = Path(tmp) / f"{library}-{rep}"
                workdir.mkdir()
                spec = {**seeded, "workdir": str(workdir), "data": str(data_path)}
                python = pythae_python if library == "pythae" else sys.executable
                paired_rates[library].append(common.matmul_rate(mm_n, 1, mm_seconds)["gflops"])
                before = common.load_average()
                print(f"repetition {rep + 1}/{repeats}: {library} ({epochs} epochs)",
                      file=sys.stderr, flush=True)
                result = _run_worker(python, library, spec, args.threads, log)
                result["repetition"], result["seed"] = rep + 1, seeded["seed"]
                runs[library].append(result)
                order.append(library)
                loads.append({"repetition": rep + 1, "library": library,
                              "load_average_before": before,
                              "load_average_after": common.load_average()})
        worker_log_tail = log.read_text().splitlines()[-5:]
        rates += common.matmul_rate(mm_n, 1 if smoke else 3, mm_seconds)["all_gflops"]

    timings = {lib: _summary(r) for lib, r in runs.items()}
    ratio = {key: round(timings["pythae"][key]["seconds"] / timings["vaelab"][key]["seconds"], 3)
             for key in ("train", "eval", "train_plus_eval", "epoch", "train_plus_eval_steady")
             if key in timings["vaelab"]}

    def rep_median(run: dict[str, Any]) -> float:
        return common.median([e["train_seconds"] + e["eval_seconds"] for e in run["epochs"]])

    paired = [round(rep_median(p) / rep_median(v), 3)
              for p, v in zip(runs["pythae"], runs["vaelab"])]
    gflops = common.median(rates)
    n_train, n_val = data_info[0]["train"]["n"], data_info[0]["validation"]["n"]
    roofline_train = n_train * flops["training_executed"] / (gflops * 1e9)
    roofline_eval = n_val * flops["forward"] / (gflops * 1e9)
    roofline = {
        "matmul": {"gflops": round(gflops, 3), "all_gflops": rates, "n": mm_n,
                   "threads": args.threads,
                   "before_each_run": paired_rates},
        "flops_per_example": flops,
        "train_seconds": round(roofline_train, 4),
        "eval_seconds": round(roofline_eval, 4),
        "note": "the epoch's matmul FLOPs / the float32 matmul rate measured in this run with "
                "the same threads: no trainer can beat it; fraction = roofline / median "
                "measured seconds. A ratio pythae / vaelab above 1 / pythae's "
                "train_plus_eval fraction is out of reach.",
    }
    for lib in ("pythae", "vaelab"):
        roofline[f"{lib}_train_fraction"] = round(
            roofline_train / timings[lib]["train"]["seconds"], 3)
        roofline[f"{lib}_train_plus_eval_fraction"] = round(
            (roofline_train + roofline_eval) / timings[lib]["train_plus_eval"]["seconds"], 3)
    roofline["max_ratio_pythae_over_vaelab"] = round(
        1 / roofline["pythae_train_plus_eval_fraction"], 3)
    losses = []
    for e in range(epochs):
        row: dict[str, Any] = {"epoch": e + 1}
        for lib in ("pythae", "vaelab"):
            row[lib] = [run["epochs"][e]["eval_loss"] for run in runs[lib]]
        diffs = [round(p - v, 3) for p, v in zip(row["pythae"], row["vaelab"])]
        row["difference_pythae_minus_vaelab"] = diffs  # per repetition (seed)
        row["mean_difference"] = round(sum(diffs) / len(diffs), 3)
        losses.append(row)
    result = {
        "benchmark": NAME,
        "smoke": smoke,
        "preset": PRESET,
        "epochs_per_run": epochs,
        "repeats": repeats,
        "threads": args.threads,
        "vaelab_set": args.vaelab_set,
        "order": order,
        "data": data_info,
        "timed": {
            "train_seconds": "pythae BaseTrainer.train_step(epoch) / vaelab train_epoch: "
                             "one pass over the training split (forward, backward, Adam)",
            "eval_seconds": "pythae BaseTrainer.eval_step(epoch), batch 100 / vaelab "
                            "train.evaluate (metrics.elbo_metrics), batch 1000: one pass "
                            "over the validation split",
            "epoch_seconds": "the whole epoch: pythae on_epoch_begin -> on_log (train, "
                             "eval, scheduler, deepcopy of the best model) / vaelab "
                             "train_epoch start -> the epoch line (train, eval, checkpoints, "
                             "metrics.jsonl, sample grid)",
            "quoted": "ratio.train_plus_eval = median over epochs of pythae (train + eval) / "
                      "the same for vaelab",
            "steady": "ratio.train_plus_eval_steady: the same over each run's second and "
                      "later epochs (without train.compile's compilation in the first)",
        },
        "pythae": {"median": timings["pythae"], "runs": runs["pythae"]},
        "vaelab": {"median": timings["vaelab"], "runs": runs["vaelab"]},
        "ratio_pythae_over_vaelab": ratio,
        "paired_ratios_train_plus_eval": paired,
        "roofline": roofline,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio["train_plus_eval"] >= TARGET_RATIO,
        "eval_loss": {
            "definition": "pythae: epoch_eval_loss, the mean over 100-image eval batches of "
                          "the batch-mean single-sample negative ELBO (summed BCE of sigmoid "
                          "outputs + analytic KL); vaelab: val_nelbo, the single-sample "
                          "negative ELBO summed over validation examples / their number "
                          "(Bernoulli logits, seeded noise); nats per example, one value per "
                          "repetition (seeds seed, seed + 1, ...; the same seed for both "
                          "libraries in a repetition)",
            "per_epoch": losses,
        },
        "loads": loads,
        "versions": {"pythae": runs["pythae"][0]["version"],
                     "pythae_python": runs["pythae"][0]["python"],
                     "pythae_torch": runs["pythae"][0]["torch"],
                     "vaelab": runs["vaelab"][0]["version"],
                     "vaelab_source": common.source_digest(),
                     "pythae_interpreter": pythae_python},
        "config": vconfig.to_dict(_vaelab_config(base)),
        "command": "python benchmarks/pythae_compare.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "worker_log_tail": worker_log_tail,
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, NAME, smoke, note=args.note)
    return result


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("pythae", "vaelab"), required=True)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    out = _pythae_worker(spec) if args.worker == "pythae" else _vaelab_worker(spec)
    args.result.write_text(json.dumps(out))


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        _worker_main(sys.argv[1:])
    else:
        main()
