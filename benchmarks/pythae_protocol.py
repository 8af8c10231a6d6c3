"""Benchmark: pythae 0.1.2's own ``vae.py`` protocol for 500 epochs, resumable, scored by vaelab.

Issue 24 §2. pythae reports 89.78 nats (K = 200) for Rezende & Mohamed (2015) with its
``examples/scripts/reproducibility/vae.py`` (clementchadebec/benchmark_VAE at tag v0.1.2,
identical to the newest main). This script runs that protocol, unmodified in everything that
affects the result, and then scores the model it selects with vaelab's estimators.

What runs (in pythae's interpreter, ``--pythae-python``; pythae is never installed into
vaelab's environment):

- Data: Larochelle's binarised MNIST, read as vae.py reads it: ``np.loadtxt`` of
  ``binarized_mnist_{train,valid,test}.amat`` in ``--data-dir`` (50,000 / 10,000 / 10,000
  rows of 784 0/1 values), ``DataProcessor().process_data(...)``, reshaped to
  ``(N, 1, 28, 28)``, ``DataProcessor.to_dataset``; train = the train file, eval = the valid
  file, test = the test file (float32, ``(N, 784)``) for the final NLL.
- Model: vae.py's ``Encoder`` (Linear(784, 400), ReLU; Linear(400, 40) ``embedding`` and
  Linear(400, 40) ``log_var``) and ``Decoder`` (Linear(40, 400), ReLU, Linear(400, 784),
  Sigmoid) in ``VAE(VAEConfig(input_dim=(784,), latent_dim=40, reconstruction_loss="bce"))``:
  BCE summed over pixels + analytic KL, batch mean. Built before any seeding, in vae.py's
  order: its initial weights come from torch's default generator, which torch seeds at
  random in every process, as in a fresh ``python vae.py``. That seed
  (``torch.initial_seed()``, checked to be the generator's state untouched until the model is
  built) is recorded, and ``--init-seed SEED`` sets it, to repeat a run. Then
  ``torch.manual_seed(123)``, the trainer built, and pythae's ``prepare_training`` seeds 8.
- Training: ``pythae.trainers.BaseTrainer`` with vae.py's ``BaseTrainerConfig`` (batch 100
  for training and evaluation, Adam lr 1e-4, MultiStepLR milestones 200/350/500/750/1000,
  gamma 10^(-1/5) stepped once per epoch, ``--epochs`` epochs, default 500). The epoch loop
  of ``BaseTrainer.train()`` is run here epoch by epoch with the trainer's own calls in its
  order: ``train_step``, ``eval_step``, ``_schedulers_step``, ``deepcopy`` of the model when
  the eval loss is strictly below the best so far, the callbacks. After every epoch the
  resume state is written atomically to ``--state-dir``.
- At the end (pythae side): the selected model's per-example NELBO on 100 test images with
  fixed noise (float32 and float64), the range of its test log-variances, and vae.py's own
  NLL: ``get_nll(test, n_samples=200)`` five times (``--smoke``: once, 20 images).

Then (vaelab side, this interpreter): the selected model's weights are copied into vaelab's
``mnist-vae`` architecture, ``build_model("mlp", (1, 28, 28), 40, bernoulli, hidden=(400,),
encoder_scale="exp")`` (encoder head rows 0-39 = pythae's ``embedding``, rows 40-79 = its
``log_var``; ``exp`` scale = exp(raw / 2), raw clamped to [-30, 30]; decoder logits = the
input of pythae's Sigmoid), checked against pythae's per-example NELBO with the same noise
(vaelab with ``output="torch-probs"``, pythae's sigmoid + clamped BCE, against pythae in
float32; vaelab's exact logits form against pythae in float64; both must agree within
2^-16 relative, a float32 sum's rounding), and scored on the 10,000 test images with
``vaelab.evaluate.evaluate(model, test, iw_samples=K)`` for K = 200 and 5000 (NLL by
importance sampling with q(z|x), NELBO, standard errors; seed 0) and with vaelab's default
estimator (``auto``: K = 1,000 corrected by AIS on 400 random test images, with its
verdict).

Resume state (``--state-dir``, default ``benchmarks/resume/pythae-vae/``; about 11 MB):
``state.pt`` (tensors and plain values only, ``torch.load(weights_only=True)``: epoch, model,
Adam and scheduler states, best model, its epoch and eval loss, torch/numpy/random RNG
states, the per-epoch curve, the sessions), ``curve.jsonl`` (train loss, eval loss, lr,
seconds per epoch), ``protocol.json``, and cached results of the final steps
(``pythae_eval.json``, ``pythae_check.pt``, ``vaelab_k{K}.json``). Running the same command
again continues from the saved epoch (bitwise: the RNG states are restored) and a finished
run is not retrained; a lock stops two runs sharing a state directory.

Deviations from vae.py, none affecting the result: MultiStepLR's ``"verbose": True`` is
dropped (torch 2.13 has no such argument; it only printed the lr); progress bars are off
(``TQDM_DISABLE=1``); the best model's weights stay in the state instead of pythae's
``final_model`` folder and ``AutoModel`` reload (same weights); ``output_dir`` is
``STATE_DIR/pythae_output`` (only empty folders: no checkpoints are saved). CPU (vae.py uses
CUDA when present: its noise then comes from the CUDA generator) with ``--threads`` threads.

Run: ``python benchmarks/pythae_protocol.py --pythae-python VENV/bin/python`` (1 thread,
5-7 s an epoch on a shared 2-core machine, so about an hour, then the scoring); writes
``benchmarks/results/pythae_protocol.json``. ``--smoke``: 300 / 100 / 100 images, 2 epochs,
a temporary state directory unless ``--state-dir`` is given, no result file unless ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
NAME = "pythae_protocol"
DEFAULT_DATA_DIR = Path("/work/data/binarized-mnist")
DEFAULT_STATE_DIR = BENCH / "resume" / "pythae-vae"
FILES = {"train": "binarized_mnist_train.amat", "validation": "binarized_mnist_valid.amat",
         "test": "binarized_mnist_test.amat"}
#: vae.py's settings.
LATENT, HIDDEN, BATCH, LR, EPOCHS = 40, 400, 100, 1e-4, 500
MILESTONES = [200, 350, 500, 750, 1000]
GAMMA = 10 ** (-1 / 5)
VAE_PY_SEED = 123
GET_NLL_SAMPLES, GET_NLL_ROUNDS = 200, 5
#: The vaelab scores and the mapping check.
K_VALUES = (200, 5000)
CHECK_N, CHECK_SEED = 100, 2024
CHECK_RTOL = 2.0 ** -16
#: --smoke sizes.
SMOKE_ROWS = {"train": 300, "validation": 100, "test": 100}
SMOKE_EPOCHS, SMOKE_NLL_N = 2, 20
PYTHAE_REPORTED = {"nll": 89.78, "iw_samples": 200,
                   "source": "pythae README, reproducibility table (VAE, binary MNIST)"}


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(handle)`` into ``path.tmp``, fsync, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda h: h.write(text.encode()))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _array_sha256(array) -> str:
    """SHA-256 of the 0/1 pixels as contiguous uint8 ``(N, 784)`` bytes."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def _rounded(record: dict[str, Any], digits: int = 6) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in record.items()}


# --------------------------------------------------------------------------- pythae worker
# Runs in pythae's interpreter: numpy, torch and pythae only (never vaelab).


def _rng_state() -> dict[str, Any]:
    """torch (CPU), numpy and ``random`` generator states as tensors and plain values."""
    import random

    import numpy as np
    import torch

    # pythae's set_seed seeds numpy's legacy global generator: that is the state to keep
    _, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, mt, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "random": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss": gauss}}


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32),  # noqa: NPY002
                         n["pos"], n["has_gauss"], n["cached_gaussian"]))
    r = state["random"]
    random.setstate((r["version"], tuple(int(v) for v in r["state"].tolist()), r["gauss"]))


def _scheduler_state(scheduler) -> dict[str, Any]:
    """MultiStepLR's state with its ``milestones`` Counter as a dict (weights_only-loadable)."""
    state = dict(scheduler.state_dict())
    state["milestones"] = dict(state["milestones"])
    return state


def _load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    from collections import Counter

    scheduler.load_state_dict({**state, "milestones": Counter(state["milestones"])})


def _clone_state_dict(module) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _pythae_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train vae.py's model with pythae's BaseTrainer to ``spec["epochs"]``, resuming from
    the state directory; then the pythae-side checks of the selected model."""
    import fcntl
    import importlib.metadata
    import logging
    from copy import deepcopy

    import numpy as np
    import torch
    import torch.nn as nn

    # vae.py's imports (AutoModel too: the same modules are imported before the model is built)
    from pythae.data.preprocessors import DataProcessor
    from pythae.models import VAE, AutoModel, VAEConfig  # noqa: F401
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    state_dir = Path(spec["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "lock", "w")  # held until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another run holds {state_dir / 'lock'}: one run per state "
                         "directory") from None
    torch.set_num_threads(spec["threads"])
    session = {"started": _now(), "pid": os.getpid(), "threads": torch.get_num_threads()}
    setup_started = time.perf_counter()

    class Encoder(BaseEncoder):  # vae.py's Encoder, verbatim up to formatting
        def __init__(self, args: dict):
            BaseEncoder.__init__(self)
            self.input_dim = args.input_dim
            self.latent_dim = args.latent_dim
            layers = nn.ModuleList()
            layers.append(nn.Sequential(nn.Linear(np.prod(args.input_dim), 400), nn.ReLU()))
            self.layers = layers
            self.depth = len(layers)
            self.embedding = nn.Linear(400, self.latent_dim)
            self.log_var = nn.Linear(400, self.latent_dim)

        def forward(self, x, output_layer_levels=None):
            output = ModelOutput()
            max_depth = self.depth
            if output_layer_levels is not None:
                max_depth = self.depth if -1 in output_layer_levels else max(output_layer_levels)
            out = x.reshape(-1, np.prod(self.input_dim))
            for i in range(max_depth):
                out = self.layers[i](out)
                if output_layer_levels is not None and i + 1 in output_layer_levels:
                    output[f"embedding_layer_{i+1}"] = out
                if i + 1 == self.depth:
                    output["embedding"] = self.embedding(out)
                    output["log_covariance"] = self.log_var(out)
            return output

    class Decoder(BaseDecoder):  # vae.py's Decoder, verbatim up to formatting
        def __init__(self, args: dict):
            BaseDecoder.__init__(self)
            self.input_dim = args.input_dim
            layers = nn.ModuleList()
            layers.append(nn.Sequential(nn.Linear(args.latent_dim, 400), nn.ReLU()))
            layers.append(nn.Sequential(nn.Linear(400, np.prod(args.input_dim)), nn.Sigmoid()))
            self.layers = layers
            self.depth = len(layers)

        def forward(self, z, output_layer_levels=None):
            output = ModelOutput()
            max_depth = self.depth
            if output_layer_levels is not None:
                max_depth = self.depth if -1 in output_layer_levels else max(output_layer_levels)
            out = z
            for i in range(max_depth):
                out = self.layers[i](out)
                if output_layer_levels is not None and i + 1 in output_layer_levels:
                    output[f"reconstruction_layer_{i+1}"] = out
                if i + 1 == self.depth:
                    output["reconstruction"] = out.reshape((z.shape[0],) + self.input_dim)
            return output

    # --- vae.py's main(), in its order
    rows = spec["rows"]  # None: whole files (--smoke: the first rows of each)
    raw = {split: np.loadtxt(Path(spec["data_dir"]) / name, max_rows=rows and rows[split])
           for split, name in FILES.items()}
    data_info = {split: {"file": FILES[split], "n": int(a.shape[0]), "sha256": _array_sha256(a),
                         "pixel_mean": round(float(a.mean()), 6),
                         "binary": bool(np.isin(a, (0.0, 1.0)).all())}
                 for split, a in raw.items()}
    data_input_dim = tuple(raw["train"].shape[1:])
    if spec["init_seed"] is not None:  # vae.py: none (torch seeds the generator at random)
        torch.manual_seed(spec["init_seed"])
    init = {"seed": torch.initial_seed(), "set_by": "--init-seed" if spec["init_seed"]
            is not None else "torch at process start (vae.py sets none)",
            "generator_untouched_before_model": bool(torch.equal(
                torch.get_rng_state(), torch.Generator().manual_seed(torch.initial_seed())
                .get_state()))}
    model_config = VAEConfig(input_dim=data_input_dim, latent_dim=LATENT,
                             reconstruction_loss="bce")
    model = VAE(model_config=model_config, encoder=Encoder(model_config),
                decoder=Decoder(model_config))
    training_config = BaseTrainerConfig(
        output_dir=str(state_dir / "pythae_output"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        num_epochs=spec["epochs"],
        learning_rate=LR,
        steps_saving=None,
        steps_predict=None,
        no_cuda=False,
        scheduler_cls="MultiStepLR",
        scheduler_params={"milestones": MILESTONES, "gamma": GAMMA},  # "verbose" dropped
    )
    data_processor = DataProcessor()
    train_data = data_processor.process_data(raw["train"]).reshape(-1, 1, 28, 28)
    train_dataset = data_processor.to_dataset(train_data)
    eval_data = data_processor.process_data(raw["validation"]).reshape(-1, 1, 28, 28)
    eval_dataset = data_processor.to_dataset(eval_data)
    torch.manual_seed(VAE_PY_SEED)
    torch.cuda.manual_seed_all(VAE_PY_SEED)
    trainer = BaseTrainer(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          training_config=training_config, callbacks=None)
    if trainer.device != "cpu":
        raise SystemExit(f"pythae chose device {trainer.device}: this driver saves CPU RNG "
                         "state only; use a CPU build of torch in pythae's venv")
    trainer.prepare_training()  # set_seed(8), Adam, MultiStepLR, output dir, callbacks

    # --- resume
    protocol = {"data": data_info, "smoke": spec["smoke"], "rows": rows,
                "pythae": importlib.metadata.version("pythae")}
    state_path = state_dir / "state.pt"
    best_eval_loss, best_epoch, start = 1e10, None, 0
    curve: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    best_model = None
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if state["protocol"] != protocol:
            raise SystemExit(f"{state_path} is another protocol's state (data, sizes or "
                             f"pythae differ): {state['protocol']} != {protocol}")
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        _load_scheduler_state(trainer.scheduler, state["scheduler"])
        best_model = deepcopy(trainer.model)
        best_model.load_state_dict(state["best_model"])
        trainer._best_model = best_model
        best_eval_loss, best_epoch = state["best_eval_loss"], state["best_epoch"]
        start, curve, sessions = state["epoch"], state["curve"], state["sessions"]
        first = sessions[0]["initial_weights"]["seed"]
        if spec["init_seed"] is not None and spec["init_seed"] != first:
            raise SystemExit(f"{state_path} started from --init-seed {first}, not "
                             f"{spec['init_seed']}")
        _set_rng_state(state["rng"])
        print(f"resuming {state_path} at epoch {start} (best epoch {best_epoch}, eval loss "
              f"{best_eval_loss:.4f})", flush=True)
        del state
    else:
        _atomic_write_text(state_dir / "protocol.json", json.dumps({
            "protocol": protocol, "initial_weights": init,
            "created": _now()}, indent=2) + "\n")
    session.update(start_epoch=start, setup_seconds=round(time.perf_counter() - setup_started, 3))
    sessions.append(session)
    base_logger = logging.getLogger("pythae.trainers.base_trainer.base_trainer")

    def save(epoch: int) -> None:
        state = {"epoch": epoch, "protocol": protocol,
                 "model": _clone_state_dict(trainer.model),
                 "optimizer": trainer.optimizer.state_dict(),
                 "scheduler": _scheduler_state(trainer.scheduler),
                 "best_model": _clone_state_dict(best_model), "best_epoch": best_epoch,
                 "best_eval_loss": best_eval_loss, "rng": _rng_state(), "curve": curve,
                 "sessions": sessions}
        _atomic_write_bytes(state_path, lambda h: torch.save(state, h))
        _atomic_write_text(state_dir / "curve.jsonl",
                           "".join(json.dumps(r) + "\n" for r in curve))

    if not start:
        session["initial_weights"] = init
    if start < spec["epochs"]:
        trainer.callback_handler.on_train_begin(training_config=trainer.training_config,
                                                model_config=trainer.model_config)
    for epoch in range(start + 1, spec["epochs"] + 1):  # BaseTrainer.train()'s loop body
        epoch_started = time.perf_counter()
        trainer.callback_handler.on_epoch_begin(
            training_config=trainer.training_config, epoch=epoch,
            train_loader=trainer.train_loader, eval_loader=trainer.eval_loader)
        metrics = {}
        lr = trainer.optimizer.param_groups[0]["lr"]
        epoch_train_loss = trainer.train_step(epoch)
        train_seconds = time.perf_counter() - epoch_started
        metrics["train_epoch_loss"] = epoch_train_loss
        epoch_eval_loss = trainer.eval_step(epoch)
        eval_seconds = time.perf_counter() - epoch_started - train_seconds
        metrics["eval_epoch_loss"] = epoch_eval_loss
        trainer._schedulers_step(epoch_eval_loss)
        if (epoch_eval_loss < best_eval_loss
                and not trainer.training_config.keep_best_on_train):
            best_eval_loss = epoch_eval_loss
            best_model = deepcopy(trainer.model)
            trainer._best_model = best_model
            best_epoch = epoch
        trainer.callback_handler.on_epoch_end(training_config=trainer.training_config)
        trainer.callback_handler.on_log(trainer.training_config, metrics, logger=base_logger,
                                        global_step=epoch, rank=trainer.rank)
        seconds = time.perf_counter() - epoch_started
        curve.append(_rounded({"epoch": epoch, "train_loss": float(epoch_train_loss),
                               "eval_loss": float(epoch_eval_loss), "lr": lr,
                               "train_seconds": train_seconds,
                               "eval_seconds": eval_seconds, "seconds": seconds,
                               "best_epoch": best_epoch, "finished": _now()}, 8))
        session["end_epoch"] = epoch
        save(epoch)
        print(f"epoch {epoch}/{spec['epochs']}: train {epoch_train_loss:.4f} eval "
              f"{epoch_eval_loss:.4f} lr {lr:.3g} best {best_epoch} ({best_eval_loss:.4f}) "
              f"{seconds:.1f} s (saved {time.perf_counter() - epoch_started - seconds:.2f} s)",
              flush=True)
    end_epoch = max(start, len(curve))
    versions = {"pythae": importlib.metadata.version("pythae"), "torch": torch.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0]}
    result = {"epoch": end_epoch, "done": end_epoch >= spec["epochs"], "data": data_info,
              "versions": versions, "initial_weights": sessions[0].get("initial_weights"),
              "best_epoch": best_epoch,
              "best_eval_loss": best_eval_loss}
    if result["done"]:
        result["pythae_eval"] = _pythae_final(spec, state_dir, best_model, raw["test"],
                                              end_epoch, best_epoch)
    return result


def _pythae_final(spec, state_dir: Path, best_model, test_array, epoch: int,
                  best_epoch: int) -> dict[str, Any]:
    """pythae-side checks of the selected model (cached in ``pythae_eval.json``): the
    fixed-noise per-example NELBO on the first test images, the test log-variance range,
    and vae.py's ``get_nll`` rounds."""
    from copy import deepcopy

    import numpy as np
    import torch

    cache = state_dir / "pythae_eval.json"
    key = {"epoch": epoch, "best_epoch": best_epoch, "n_test": int(test_array.shape[0]),
           "smoke": spec["smoke"]}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            print(f"pythae checks: reusing {cache}", flush=True)
            return cached
    started = time.perf_counter()
    model = best_model.eval()
    test_data = torch.tensor(test_array).type(torch.float)  # as vae.py
    out: dict[str, Any] = {"key": key}
    with torch.no_grad():
        enc = model.encoder(test_data)
        out["test_log_var_range"] = [float(enc.log_covariance.min()),
                                     float(enc.log_covariance.max())]
        out["test_mu_abs_max"] = float(enc.embedding.abs().max())

        # per-example NELBO with fixed noise: pythae's forward and loss, one example at a time
        n = min(CHECK_N, len(test_data))
        eps = torch.randn((n, LATENT), generator=torch.Generator().manual_seed(CHECK_SEED))
        x = test_data[:n].reshape(n, 1, 28, 28)

        def per_example(net, x, eps):
            values = []
            for i in range(len(x)):
                e = eps[i:i + 1]
                net._sample_gauss = lambda mu, std, e=e: (mu + e * std, e)
                o = net({"data": x[i:i + 1]})
                values.append([float(o.loss), float(o.recon_loss), float(o.reg_loss)])
            del net._sample_gauss
            return torch.tensor(values, dtype=torch.float64)

        f32 = per_example(model, x, eps)
        f64 = per_example(deepcopy(model).double(), x.double(), eps.double())
        torch.save({"eps": eps, "n": n, "float32": f32, "float64": f64,
                    "columns": ["nelbo", "recon", "kl"]}, state_dir / "pythae_check.pt")
        out["check"] = {"n": n, "noise_seed": CHECK_SEED, "file": "pythae_check.pt",
                        "mean_nelbo_float32": float(f32[:, 0].mean()),
                        "mean_nelbo_float64": float(f64[:, 0].mean())}

        # vae.py's NLL: get_nll(test, n_samples=200), five rounds, from the RNG state the
        # training left (vae.py runs it after training, in the same process)
        rounds = 1 if spec["smoke"] else GET_NLL_ROUNDS
        nll_data = test_data[:SMOKE_NLL_N] if spec["smoke"] else test_data
        values, seconds = [], []
        for i in range(rounds):
            t = time.perf_counter()
            values.append(float(model.get_nll(nll_data, n_samples=GET_NLL_SAMPLES)))
            seconds.append(round(time.perf_counter() - t, 2))
            print(f"pythae get_nll round {i + 1}/{rounds}: {values[-1]:.4f} "
                  f"({seconds[-1]} s)", flush=True)
    out["get_nll"] = {
        "n_samples": GET_NLL_SAMPLES, "n_test": len(nll_data), "rounds": values,
        "seconds": seconds, "mean_log_p": float(np.mean(values)),
        "std_log_p": float(np.std(values)), "nll": -float(np.mean(values)),
        "note": "get_nll returns the mean over test images of log p(x) estimated with "
                "n_samples importance samples (two batches of 100); vae.py logs it as "
                "mean_nll; nll = -mean_log_p is the nats figure pythae reports"}
    out["seconds"] = round(time.perf_counter() - started, 2)
    _atomic_write_text(cache, json.dumps(out, indent=2) + "\n")
    return out


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    out = _pythae_worker(json.loads(args.spec.read_text()))
    args.result.write_text(json.dumps(out))


# --------------------------------------------------------------------------- vaelab side


def _vaelab_model(pythae_state: dict[str, Any], output: str = "logits"):
    """vaelab's ``mnist-vae`` model holding pythae's weights (strict load; shapes checked)."""
    import torch

    from vaelab import likelihoods, models

    model = models.build_model("mlp", (1, 28, 28), LATENT,
                               likelihoods.get("bernoulli", output=output), hidden=(HIDDEN,),
                               encoder_scale="exp")
    p = pythae_state
    mapped = {
        "encoder.1.weight": p["encoder.layers.0.0.weight"],
        "encoder.1.bias": p["encoder.layers.0.0.bias"],
        # one Linear(400, 80): rows 0-39 the mean, rows 40-79 the raw log-variance
        "encoder.3.weight": torch.cat([p["encoder.embedding.weight"],
                                       p["encoder.log_var.weight"]]),
        "encoder.3.bias": torch.cat([p["encoder.embedding.bias"], p["encoder.log_var.bias"]]),
        "decoder.0.weight": p["decoder.layers.0.0.weight"],
        "decoder.0.bias": p["decoder.layers.0.0.bias"],
        "decoder.2.weight": p["decoder.layers.1.0.weight"],  # logits: Sigmoid's input
        "decoder.2.bias": p["decoder.layers.1.0.bias"],
    }
    own = model.state_dict()
    if set(own) != set(mapped) or any(own[k].shape != mapped[k].shape for k in own):
        raise SystemExit(f"vaelab's model has {[(k, tuple(v.shape)) for k, v in own.items()]}"
                         ": update the mapping")
    unused = set(p) - {k for k in p if k.startswith(("encoder.", "decoder."))}
    if unused or len(p) != len(own) + 2:  # pythae's two heads are vaelab's one
        raise SystemExit(f"unexpected pythae parameters: {sorted(p)}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def _mapping_check(state_dir: Path, best: dict[str, Any], test) -> dict[str, Any]:
    """vaelab's per-example NELBO against pythae's, same weights and noise."""
    import torch

    from vaelab import objectives

    saved = torch.load(state_dir / "pythae_check.pt", weights_only=True)
    n, eps = saved["n"], saved["eps"]
    x = test.images[:n].to(torch.float32)
    out: dict[str, Any] = {"n": n, "rtol": CHECK_RTOL}

    def compare(vaelab_values, pythae_values) -> dict[str, Any]:
        diff = (vaelab_values - pythae_values).abs()
        rel = diff / pythae_values.abs().clamp_min(1e-12)
        return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
                "mean_abs_diff": float(diff.mean()),
                "agrees": bool((rel <= CHECK_RTOL).all())}

    with torch.no_grad():
        for output, reference in (("torch-probs", "float32"), ("logits", "float64")):
            model = _vaelab_model(best, output)
            terms = objectives.elbo_terms(model, x, eps=eps.unsqueeze(0))
            ours = torch.stack([-terms.elbo, -terms.recon, terms.kl], 1).double()
            pythae = saved[reference]
            key = f"vaelab_{output.replace('-', '_')}_vs_pythae_{reference}"
            out[key] = {name: compare(ours[:, i], pythae[:, i])
                        for i, name in enumerate(("nelbo", "recon", "kl"))}
            if output == "logits":  # reported: pythae's float32 rounding of saturated sigmoids
                out["vaelab_logits_vs_pythae_float32"] = {
                    name: compare(ours[:, i], saved["float32"][:, i])
                    for i, name in enumerate(("nelbo", "recon", "kl"))}
            out[f"mean_nelbo_vaelab_{output.replace('-', '_')}"] = float(ours[:, 0].mean())
    out["mean_nelbo_pythae_float32"] = float(saved["float32"][:, 0].mean())
    out["mean_nelbo_pythae_float64"] = float(saved["float64"][:, 0].mean())
    out["passed"] = (out["vaelab_torch_probs_vs_pythae_float32"]["nelbo"]["agrees"]
                     and out["vaelab_logits_vs_pythae_float64"]["nelbo"]["agrees"])
    out["definition"] = (
        "per-example NELBO (summed BCE / -log p(x|z) + analytic KL, one z = mu + sigma * eps "
        f"with eps ~ N(0, I) from torch.Generator().manual_seed({CHECK_SEED})) on the first "
        f"{n} test images; pythae: its VAE.forward and loss_function one image at a time "
        "(float32, and the model in float64), vaelab: objectives.elbo_terms(model, x, eps); "
        "agrees: |diff| <= rtol * |pythae| for every image; passed needs vaelab's torch-probs "
        "form (sigmoid + clamped BCE, as pythae) to agree with pythae in float32 and vaelab's "
        "logits form (the scored model) to agree with pythae in float64")
    return out


def _score(state_dir: Path, best: dict[str, Any], test, k: int | None, key: dict[str, Any],
           threads: int) -> dict[str, Any]:
    """``vaelab.evaluate.evaluate`` at ``iw_samples=k``, or with vaelab's default estimator
    (``auto``) for ``k=None`` (cached in ``vaelab_k{k}.json`` / ``vaelab_default.json``)."""
    from vaelab import evaluate as veval

    what = f"K={k}" if k else "default"
    if not k:  # the default's settings are part of what a cached score depends on
        import dataclasses

        from vaelab import estimators

        key = {**key, "auto": dataclasses.asdict(estimators.get("auto").options)}
    cache = state_dir / (f"vaelab_k{k}.json" if k else "vaelab_default.json")
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            print(f"vaelab {what}: reusing {cache}", flush=True)
            return cached
    print(f"vaelab {what}: scoring {len(test)} test images", flush=True)
    started = time.perf_counter()
    how = {"iw_samples": k} if k else {"estimator": "auto"}
    report = veval.evaluate(_vaelab_model(best), test, seed=0, batch_size=100, **how)
    out = {"key": key, "seconds": round(time.perf_counter() - started, 2), "threads": threads,
           "report": report}
    _atomic_write_text(cache, json.dumps(out, indent=2) + "\n")
    print(f"vaelab {what}: nll {report['nll']:.4f} +- {report['nll_stderr']:.4f}, nelbo "
          f"{report['nelbo']:.4f} ({out['seconds']} s)", flush=True)
    return out


# --------------------------------------------------------------------------- the driver


def _pythae_python(requested: str | None) -> str:
    if requested:
        return requested
    if importlib.util.find_spec("pythae") is not None:
        return sys.executable
    raise SystemExit("pythae is not importable here: install pythae==0.1.2 in a scratch venv "
                     "(not vaelab's; torch==2.13.0 first) and pass its interpreter with "
                     "--pythae-python PATH (or set PYTHAE_PYTHON)")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGTERM when the driver dies (the state stays consistent)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_worker(python: str, spec: dict[str, Any], threads: int) -> tuple[dict[str, Any], list]:
    """Train (or resume) in pythae's interpreter; its output goes to this process's."""
    with tempfile.TemporaryDirectory(prefix="pythae-protocol-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TQDM_DISABLE="1")
        cmd = [python, str(Path(__file__).resolve()), "--worker", "--spec", str(spec_path),
               "--result", str(result_path)]
        print(f"$ {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent)
        if done.returncode != 0:
            raise SystemExit(f"the pythae worker failed (status {done.returncode}); rerun the "
                             "same command to continue from the last saved epoch")
        return json.loads(result_path.read_text()), cmd


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    sys.path.insert(0, str(BENCH))
    import common

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} (smoke "
                   f"{SMOKE_EPOCHS})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"the three .amat files (default {DEFAULT_DATA_DIR})")
    p.add_argument("--pythae-python", default=os.environ.get("PYTHAE_PYTHON"),
                   help="an interpreter that imports pythae 0.1.2 (default: this one if it "
                        "can, else $PYTHAE_PYTHON)")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed of the initial weights (default: none, as vae.py: torch seeds "
                        "its generator at random; the seed is recorded)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="resume state (default benchmarks/resume/pythae-vae/; smoke: a new "
                        "temporary folder)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"result JSON (default benchmarks/results/{NAME}.json; smoke: none)")
    p.add_argument("--smoke", action="store_true",
                   help="300 / 100 / 100 images, 2 epochs: checks the script end to end")
    args = p.parse_args(argv)
    epochs = args.epochs or (SMOKE_EPOCHS if args.smoke else EPOCHS)
    state_dir = args.state_dir or (Path(tempfile.mkdtemp(prefix="pythae-protocol-smoke-"))
                                   if args.smoke else DEFAULT_STATE_DIR)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    python = _pythae_python(args.pythae_python)
    for name in FILES.values():
        if not (args.data_dir / name).is_file():
            raise SystemExit(f"missing {args.data_dir / name}: decompress Larochelle's files")
    started = time.perf_counter()
    rows = SMOKE_ROWS if args.smoke else None
    spec = {"epochs": epochs, "threads": args.threads, "data_dir": str(args.data_dir.resolve()),
            "state_dir": str(state_dir), "smoke": args.smoke, "rows": rows,
            "init_seed": args.init_seed}
    print(f"{_now()} pythae protocol: {epochs} epochs, state {state_dir}", flush=True)
    worker, worker_cmd = _run_worker(python, spec, args.threads)
    train_call_seconds = time.perf_counter() - started
    if not worker["done"]:  # pragma: no cover - the worker trains to the end or fails
        raise SystemExit(f"stopped at epoch {worker['epoch']} of {epochs}: rerun to continue")

    # --- vaelab side
    import torch

    import vaelab
    from vaelab import data as vdata

    torch.set_num_threads(args.threads)
    state = torch.load(state_dir / "state.pt", weights_only=True)
    best = state["best_model"]
    test = vdata.load("binarized-mnist", split="test", data_dir=args.data_dir, progress=False)
    if rows:
        import dataclasses

        test = dataclasses.replace(test, images=test.images[:rows["test"]], labels=None)
    test_sha = _array_sha256(test.images.reshape(len(test), -1).numpy())
    if test_sha != worker["data"]["test"]["sha256"]:
        raise SystemExit("vaelab's test images differ from the .amat rows pythae read")
    check = _mapping_check(state_dir, best, test)
    print(f"mapping check: {'passed' if check['passed'] else 'FAILED'} (torch-probs vs "
          f"pythae float32 max rel "
          f"{check['vaelab_torch_probs_vs_pythae_float32']['nelbo']['max_rel_diff']:.2e}, "
          "logits vs pythae float64 max rel "
          f"{check['vaelab_logits_vs_pythae_float64']['nelbo']['max_rel_diff']:.2e})",
          flush=True)
    key = {"epoch": state["epoch"], "best_epoch": state["best_epoch"], "n_test": len(test)}
    scores = {f"k{k}": _score(state_dir, best, test, k, key, args.threads) for k in K_VALUES}
    scores["default"] = _score(state_dir, best, test, None, key, args.threads)
    curve = state["curve"]
    best_row = next(r for r in curve if r["epoch"] == state["best_epoch"])
    reports = {k: s["report"] for k, s in scores.items()}
    result = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "what": "pythae 0.1.2's examples/scripts/reproducibility/vae.py (Rezende & Mohamed "
                "2015: 784-400-40 Gaussian encoder, 40-400-784 Bernoulli decoder) trained by "
                "pythae's BaseTrainer on Larochelle's binarised MNIST, its best-validation "
                "model scored by vaelab",
        "pythae_reported": PYTHAE_REPORTED,
        "protocol": {
            "data": "Larochelle's binarized_mnist_{train,valid,test}.amat read with "
                    "np.loadtxt; train 50,000, eval (model selection) 10,000, test 10,000",
            "model": "vae.py Encoder/Decoder, VAEConfig(input_dim=(784,), latent_dim=40, "
                     "reconstruction_loss='bce')",
            "trainer": "BaseTrainer, batch 100 (train and eval), Adam lr 1e-4, MultiStepLR "
                       f"milestones {MILESTONES} gamma 10^(-1/5) per epoch, {epochs} epochs, "
                       "best eval loss kept (strict <)",
            "seeds": "weights: torch's default generator, seeded at random by torch at "
                     "process start (vae.py sets no seed before the model; the seed is "
                     "recorded in initial_weights); "
                     f"torch.manual_seed({VAE_PY_SEED}) before the trainer; "
                     "pythae's set_seed(8) in prepare_training",
            "initial_weights": worker["initial_weights"],
            "deviations": [
                "MultiStepLR 'verbose': True dropped: torch 2.13 has no such argument (it "
                "only printed the lr)",
                "BaseTrainer.train()'s epoch loop run here epoch by epoch (the same calls "
                "in the same order) so the state can be saved and restored after every "
                "epoch: model, Adam, scheduler, best model and loss, torch/numpy/random "
                "RNG states (bitwise continuation)",
                "no final_model folder / AutoModel reload: the best model's weights are "
                "kept in the resume state (same weights)",
                "progress bars off (TQDM_DISABLE=1); pythae output_dir in the state dir",
                f"CPU, {args.threads} torch thread(s) (vae.py uses CUDA when present)",
                "get_nll run in the worker after restoring the final RNG state (vae.py runs "
                "it in the training process): other Monte-Carlo draws",
            ],
        },
        "data": {"dir": str(args.data_dir), "files_sha256": {
                     name: _file_sha256(args.data_dir / name) for name in FILES.values()},
                 "arrays": worker["data"], "vaelab_test_sha256": test_sha,
                 "vaelab_test_matches_amat": True},
        "epochs": epochs,
        "selected_epoch": state["best_epoch"],
        "selected_eval_loss": state["best_eval_loss"],
        "selected_train_loss": best_row["train_loss"],
        "final_epoch": {k: curve[-1][k] for k in ("epoch", "train_loss", "eval_loss", "lr")},
        "mapping_check": check,
        "vaelab": {
            k: {f: r.get(f) for f in ("nll", "nll_stderr", "nll_mc_stderr", "iw_samples",
                                       "nelbo", "nelbo_stderr", "recon", "kl", "gap",
                                       "active_units", "bits_per_dim", "pareto_k",
                                       "ess_median", "warnings", "n_examples",
                                       "verdict")}
            | {"seconds": scores[k]["seconds"]}
            for k, r in reports.items()},
        "vaelab_full_reports": reports,
        "pythae_own_nll": worker["pythae_eval"]["get_nll"],
        "pythae_checks": {k: v for k, v in worker["pythae_eval"].items()
                          if k not in ("get_nll", "key")},
        "curve": curve,
        "wall": {
            "training_seconds_sum_of_epochs": round(sum(r["seconds"] for r in curve), 1),
            "median_epoch_seconds": common.median([r["seconds"] for r in curve]),
            "sessions": state["sessions"],
            "pythae_checks_seconds": worker["pythae_eval"].get("seconds"),
            "this_invocation_seconds": round(time.perf_counter() - started, 1),
            "this_invocation_worker_seconds": round(train_call_seconds, 1),
        },
        "versions": {**{f"pythae_side_{k}": v for k, v in worker["versions"].items()},
                     "vaelab": getattr(vaelab, "__version__", None),
                     "vaelab_source": common.source_digest(), "torch": torch.__version__,
                     "pythae_interpreter": python},
        "commands": {"driver": " ".join([sys.executable, *sys.argv]) if argv is None
                     else " ".join(["python", "benchmarks/pythae_protocol.py", *argv]),
                     "worker": " ".join(worker_cmd[:2] + ["--worker", "--spec SPEC",
                                                          "--result RESULT"]),
                     "cwd": os.getcwd()},
        "state_dir": str(state_dir),
        "machine": common.machine(),
    }
    text = json.dumps(result, indent=2) + "\n"
    out = args.out if args.out is not None else (None if args.smoke
                                                  else common.RESULTS_DIR / f"{NAME}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out, text)
        print(f"wrote {out}", flush=True)
    summary = {k: result["vaelab"][k]["nll"] for k in result["vaelab"]}
    print(f"selected epoch {result['selected_epoch']}: vaelab NLL {summary}, pythae get_nll "
          f"{result['pythae_own_nll']['nll']:.4f}, mapping check "
          f"{'passed' if check['passed'] else 'FAILED'}", flush=True)
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        _worker_main(sys.argv[1:])
    else:
        main()
