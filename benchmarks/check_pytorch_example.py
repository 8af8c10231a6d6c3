"""Check: the ``pytorch-example`` preset matches an independent plain-PyTorch loop.

Issue 4, "Numbers that must hold": the ``pytorch-example`` preset on Fashion-MNIST
(grey levels), 10 epochs, has a per-epoch test NELBO within 1 nat of an independent
plain-PyTorch loop of the same model and data with the same seed.

Two models are trained on the same 60,000 training images (``validation_size=0``, as in
the PyTorch example, which has no validation split):

- **vaelab**: ``vaelab.cli.run_training`` with ``resolve(preset="pytorch-example")``.
- **plain**: a loop written like ``examples/vae/main.py`` of the PyTorch examples
  repository: ``fc1/fc21/fc22/fc3/fc4``, ``reparameterize`` with ``torch.randn_like``,
  ``F.binary_cross_entropy(recon, x, reduction="sum") + KLD`` summed over the batch
  (the example's loss is a batch *sum*, vaelab's a batch *mean*; Adam is almost invariant
  to that scale), Adam(1e-3), batch 128, reshuffled every epoch.

Both use seed 0, but their initial weights differ: vaelab draws its layers in another
order and sets the decoder's output bias to the logit of the training pixel means; the
plain loop uses PyTorch's default initialisation throughout.

After every epoch (and before the first) one independent evaluation function, written
here and applied to both models, gives the test NELBO per example
(sum over the 10,000 test images / 10,000, in float64):

- ``sampled``: BCE summed over pixels at one ``z = mu + sigma * eps`` plus the analytic
  KL, with the *same* ``eps`` (fixed seed) for both models and every epoch;
- ``at_mean``: the same with ``z = mu`` (deterministic; not an ELBO estimate, a
  low-noise companion).

These are BCE-on-grey-levels values, the training objective of the example: *not*
likelihoods, and not comparable with NELBO/NLL numbers on binarised data.

Run: ``python benchmarks/check_pytorch_example.py [--epochs 10] [--out DIR]``; prints JSON
and writes ``benchmarks/results/check_pytorch_example.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vaelab
from vaelab import config as config_mod
from vaelab import data as vdata
from vaelab import metrics, models, runs
from vaelab.cli import run_training
from vaelab.data import load_split
from vaelab.rng import Purpose, seeded_generator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "check_pytorch_example.json"
TOLERANCE_NATS = 1.0
EVAL_SEED = 1234
SEED = 0
D, H, L = 784, 400, 20

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (mu, sigma)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # z -> logits (N, 784)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def test_nelbo(encode: Encoder, logits: Decoder, x: torch.Tensor, eps: torch.Tensor,
               chunk: int = 1000) -> dict[str, float]:
    r"""Per-example test NELBO (nats) of one model, the same way for every model.

    ``x`` is ``(N, 784)`` in [0, 1]; ``eps`` ``(N, L)`` is the fixed noise.
    NELBO(x) = BCE-sum(x, logits(z)) + KL(N(mu, sigma^2) || N(0, I)), analytic KL.
    Returns split means (sum / N) and standard errors for ``z = mu + sigma eps`` and ``z = mu``.
    """
    n = x.shape[0]
    sampled, at_mean, kls = [], [], []
    for start in range(0, n, chunk):
        xb, eb = x[start:start + chunk], eps[start:start + chunk]
        mu, sigma = encode(xb)
        mu, sigma = mu.double(), sigma.double()
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * sigma.log()).sum(1)
        for z, out in ((mu + sigma * eb.double(), sampled), (mu, at_mean)):
            lg = logits(z.float()).double()
            bce = F.binary_cross_entropy_with_logits(lg, xb.double(), reduction="none").sum(1)
            out.append(bce + kl)
        kls.append(kl)
    result: dict[str, float] = {}
    for name, values in (("sampled", torch.cat(sampled)), ("at_mean", torch.cat(at_mean))):
        result[name] = float(values.sum() / n)
        result[name + "_stderr"] = float(values.std() / math.sqrt(n))
    result["kl"] = float(torch.cat(kls).sum() / n)
    return result


def vaelab_functions(model: nn.Module) -> tuple[Encoder, Decoder]:
    """``(encode, logits)`` of a vaelab VAE (its decoder output *is* the Bernoulli logits)."""

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = model.encode(x.view(-1, 1, 28, 28)).base_dist
        return q.loc, q.scale

    def logits(z: torch.Tensor) -> torch.Tensor:
        return model.decoder(z).reshape(-1, D)

    return encode, logits


# --------------------------------------------------------------------------- plain PyTorch


class PlainVAE(nn.Module):
    """The PyTorch examples repository's ``vae/main.py`` model, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.fc21 = nn.Linear(H, L)
        self.fc22 = nn.Linear(H, L)
        self.fc3 = nn.Linear(L, H)
        self.fc4 = nn.Linear(H, D)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode_logits(self, z):
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z):
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, D))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """The example's loss: BCE summed over pixels and batch, plus the summed KL."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, D), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


@torch.no_grad()
def copy_vaelab_weights(source: nn.Module, target: PlainVAE) -> None:
    """vaelab MLP (encoder: Flatten, Linear, ReLU, Linear(400, 2L) = [loc; log-variance];
    decoder: Linear, ReLU, Linear, Unflatten) -> fc1, fc21, fc22, fc3, fc4."""
    enc = [m for m in source.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in source.decoder if isinstance(m, nn.Linear)]
    head_w, head_b = enc[1].weight.chunk(2, 0), enc[1].bias.chunk(2, 0)
    pairs = [(target.fc1, enc[0].weight, enc[0].bias), (target.fc21, head_w[0], head_b[0]),
             (target.fc22, head_w[1], head_b[1]), (target.fc3, dec[0].weight, dec[0].bias),
             (target.fc4, dec[1].weight, dec[1].bias)]
    for layer, weight, bias in pairs:
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def plain_functions(model: PlainVAE) -> tuple[Encoder, Decoder]:
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = model.encode(x)
        return mu, torch.exp(0.5 * logvar)

    return encode, model.decode_logits


def train_plain(x_train: torch.Tensor, x_test: torch.Tensor, eps: torch.Tensor, epochs: int,
                seed: int = SEED, bias_at_data_mean: bool = False, label: str = "plain",
                twin_of: nn.Module | None = None, batch_size: int = 128) -> dict[str, Any]:
    """Train the plain model; evaluate the test NELBO before training and after each epoch.

    Diagnostics (not the example): ``bias_at_data_mean`` sets ``fc4.bias`` as vaelab sets
    its output bias, ``logit(clamp(train pixel mean, 1e-3, 1 - 1e-3))``; ``twin_of`` (a
    vaelab VAE before training) copies its initial weights and draws the shuffles and the
    noise from vaelab's training generators, so only the loss code differs (batch sum of
    sigmoid + BCE here, batch mean of BCE-with-logits in vaelab) and float rounding.
    """
    torch.manual_seed(seed)
    model = PlainVAE()
    if bias_at_data_mean:
        with torch.no_grad():
            model.fc4.bias.copy_(torch.logit(x_train.mean(0).clamp(1e-3, 1 - 1e-3)))
    if twin_of is not None:
        copy_vaelab_weights(twin_of, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = x_train.shape[0]
    per_epoch = [{"epoch": 0, **test_nelbo(*plain_functions(model), x_test, eps)}]
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        train_loss = 0.0
        perm = torch.randperm(n)  # the example's DataLoader(shuffle=True), in memory
        noise = None
        if twin_of is not None:  # vaelab's streams: (seed, epoch, purpose) generators
            perm = torch.randperm(n, generator=seeded_generator(seed, epoch - 1,
                                                                Purpose.PERMUTATION))
            noise = seeded_generator(seed, epoch - 1, Purpose.NOISE)
        for start in range(0, n, batch_size):
            data = x_train[perm[start:start + batch_size]]
            optimizer.zero_grad()
            if noise is None:
                recon_batch, mu, logvar = model(data)
            else:
                mu, logvar = model.encode(data)
                draw = torch.randn(mu.shape, generator=noise)
                recon_batch = model.decode(mu + draw * torch.exp(0.5 * logvar))
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        seconds = time.perf_counter() - started
        model.eval()
        record = {"epoch": epoch, "train_loss": train_loss / n, "seconds": round(seconds, 2)}
        record.update(test_nelbo(*plain_functions(model), x_test, eps))
        per_epoch.append(record)
        print(f"{label} epoch {epoch}: train {record['train_loss']:.2f} test nelbo "
              f"{record['sampled']:.2f} ({seconds:.1f} s)", file=sys.stderr)
    return {"per_epoch": per_epoch}


# --------------------------------------------------------------------------- vaelab


def train_vaelab(run_dir: Path, x_test: torch.Tensor, eps: torch.Tensor, epochs: int,
                 test_set, seed: int = SEED, label: str = "vaelab") -> dict[str, Any]:
    """Train as ``vaelab train`` does; evaluate ``checkpoints/last`` after every epoch.

    The trainer calls ``echo`` once per epoch, right after writing ``checkpoints/last``, so the
    echo callback below evaluates each epoch's weights from the checkpoint (read-only: the
    training loop draws all its randomness from its own seeded generators, and the model
    evaluated is a separate copy loaded from disk).
    """
    cfg = config_mod.resolve(
        preset="pytorch-example",
        overrides=[f"train.epochs={epochs}", "data.validation_size=0", f"train.seed={seed}",
                   "train.device=cpu"],
    )
    per_epoch: list[dict[str, Any]] = []
    own: list[dict[str, Any]] = []

    def evaluate_last(line: str) -> None:
        print(f"{label} {line}", file=sys.stderr)
        if not line.startswith("epoch "):
            return
        run = runs.open_run(run_dir, "last")
        epoch = int(run.meta["train_state"]["epoch"])
        per_epoch.append({"epoch": epoch, **test_nelbo(*vaelab_functions(run.model), x_test, eps)})
        # vaelab's own evaluator on the same weights (different noise): a cross-check.
        mine = metrics.elbo_metrics(run.model, test_set, batch_size=1000, seed=0)
        own.append({"epoch": epoch, "nelbo": mine["nelbo"], "nelbo_stderr": mine["nelbo_stderr"]})

    # Epoch 0: the initial weights, built exactly as train() builds them.
    torch.manual_seed(seed)
    train_set = load_split(cfg.data, "train", cfg.train.seed)
    init = models.build_from_config(cfg, tuple(train_set.images.shape[1:]))
    init.init_output_bias(train_set.pixel_mean())
    init.eval()
    per_epoch.append({"epoch": 0, **test_nelbo(*vaelab_functions(init), x_test, eps)})

    started = time.perf_counter()
    run_training(cfg, run_dir, report=False, echo=evaluate_last)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "config": config_mod.to_dict(cfg),
        "per_epoch": per_epoch,
        "vaelab_elbo_metrics": own,
        "metrics_jsonl": records,
        "train_wall_seconds_including_per_epoch_eval": round(wall, 1),
    }


# --------------------------------------------------------------------------- diagnostics


def _curve(run: dict[str, Any]) -> list[float]:
    return [round(r["sampled"], 3) for r in run["per_epoch"]]


def _diffs(a: list[float], b: list[float]) -> dict[str, Any]:
    d = [round(x - y, 3) for x, y in zip(a, b)]
    return {"per_epoch": d, "max_abs_epochs_1_on": max(abs(v) for v in d[1:])}


def run_diagnostics(args, x_train, x_test, eps, test_set, lab, plain) -> dict[str, Any]:
    """Where a difference comes from: initialisation, and run-to-run (seed) noise."""
    cfg = config_mod.resolve(preset="pytorch-example", overrides=["data.validation_size=0"])
    torch.manual_seed(SEED)  # vaelab's initial weights, built exactly as train() builds them
    initial = models.build_from_config(cfg, (1, 28, 28))
    initial.init_output_bias(load_split(cfg.data, "train", cfg.train.seed).pixel_mean())
    twin = train_plain(x_train, x_test, eps, args.epochs, twin_of=initial, label="plain-twin")
    biased = train_plain(x_train, x_test, eps, args.epochs, bias_at_data_mean=True,
                         label="plain+bias")
    plain1 = train_plain(x_train, x_test, eps, args.epochs, seed=1, label="plain-seed1")
    out = Path(tempfile.mkdtemp(prefix="vaelab-check-pytorch-example-seed1-"))
    lab1 = train_vaelab(out, x_test, eps, args.epochs, test_set, seed=1, label="vaelab-seed1")
    curves = {"vaelab_seed0": _curve(lab), "plain_seed0": _curve(plain),
              "plain_twin_of_vaelab_seed0": _curve(twin),
              "plain_seed0_bias_at_data_mean": _curve(biased), "plain_seed1": _curve(plain1),
              "vaelab_seed1": _curve(lab1)}
    return {
        "what": "test NELBO (sampled, nats) per epoch 0..E of extra runs; diffs are a - b",
        "curves": curves,
        "vaelab_minus_plain_twin": _diffs(curves["vaelab_seed0"],
                                          curves["plain_twin_of_vaelab_seed0"]),
        "vaelab_minus_plain_with_bias_init": _diffs(curves["vaelab_seed0"],
                                                    curves["plain_seed0_bias_at_data_mean"]),
        "plain_seed0_minus_plain_seed1": _diffs(curves["plain_seed0"], curves["plain_seed1"]),
        "vaelab_seed0_minus_vaelab_seed1": _diffs(curves["vaelab_seed0"],
                                                  curves["vaelab_seed1"]),
        "vaelab_seed1_minus_plain_seed1": _diffs(curves["vaelab_seed1"], curves["plain_seed1"]),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: temp)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--diagnostics", action="store_true",
                        help="also train: the plain loop with vaelab's initial weights and "
                             "random streams, with vaelab's output-bias init, with seed 1, "
                             "and vaelab with seed 1 (about 2.5x the time)")
    args = parser.parse_args(argv)
    digest = common.source_digest()
    torch.set_num_threads(2)
    started = time.perf_counter()

    train_set = vdata.load("fashion-mnist", "train", validation_size=0)
    test_set = vdata.load("fashion-mnist", "test")
    x_train = train_set.images.reshape(-1, D).float() / 255.0
    x_test = test_set.images.reshape(-1, D).float() / 255.0
    eps = torch.randn(x_test.shape[0], L, generator=torch.Generator().manual_seed(EVAL_SEED))

    plain = train_plain(x_train, x_test, eps, args.epochs)
    out = args.out or Path(tempfile.mkdtemp(prefix="vaelab-check-pytorch-example-"))
    lab = train_vaelab(out, x_test, eps, args.epochs, test_set)

    rows = []
    for a, b in zip(lab["per_epoch"], plain["per_epoch"]):
        rows.append({
            "epoch": a["epoch"],
            "vaelab_nelbo": round(a["sampled"], 3),
            "plain_nelbo": round(b["sampled"], 3),
            "diff": round(a["sampled"] - b["sampled"], 3),
            "vaelab_nelbo_at_mean": round(a["at_mean"], 3),
            "plain_nelbo_at_mean": round(b["at_mean"], 3),
            "diff_at_mean": round(a["at_mean"] - b["at_mean"], 3),
            "vaelab_kl": round(a["kl"], 3),
            "plain_kl": round(b["kl"], 3),
        })
    trained = [r for r in rows if r["epoch"] >= 1]
    max_diff = max(abs(r["diff"]) for r in trained)
    max_diff_mean = max(abs(r["diff_at_mean"]) for r in trained)
    cross = [
        {"epoch": o["epoch"], "vaelab_evaluate": round(o["nelbo"], 3),
         "this_script": round(p["sampled"], 3), "stderr": round(o["nelbo_stderr"], 3)}
        for o, p in zip(lab["vaelab_elbo_metrics"], lab["per_epoch"][1:])
    ]
    diagnostics = None
    if args.diagnostics:
        diagnostics = run_diagnostics(args, x_train, x_test, eps, test_set, lab, plain)
    result = {
        "check": "pytorch-example preset vs plain PyTorch loop (issue 4)",
        "requirement": f"|test NELBO(vaelab) - test NELBO(plain)| < {TOLERANCE_NATS} nat "
                       "at every epoch 1..E",
        "passed": bool(max_diff < TOLERANCE_NATS and max_diff_mean < TOLERANCE_NATS),
        "passed_with_vaelab_initial_weights_and_streams (--diagnostics)": None if diagnostics
        is None else diagnostics["vaelab_minus_plain_twin"]["max_abs_epochs_1_on"]
        < TOLERANCE_NATS,
        "max_abs_diff_nats": max_diff,
        "max_abs_diff_at_mean_nats": max_diff_mean,
        "epochs_over_tolerance": [r["epoch"] for r in trained if abs(r["diff"]) >= TOLERANCE_NATS
                                  or abs(r["diff_at_mean"]) >= TOLERANCE_NATS],
        "max_abs_diff_epochs_4_on": max((abs(r["diff"]) for r in trained if r["epoch"] >= 4),
                                        default=None),
        "final_epoch_diff": rows[-1]["diff"],
        "final_epoch_diff_at_mean": rows[-1]["diff_at_mean"],
        "final_test_nelbo": {"vaelab": rows[-1]["vaelab_nelbo"],
                             "plain": rows[-1]["plain_nelbo"]},
        "units": "nats per test example; BCE summed over 784 grey-level pixels + KL: NOT a "
                 "likelihood (Bernoulli on grey levels is unnormalised)",
        "dataset": "fashion-mnist, grey levels /255; train = all 60000 (validation_size=0), "
                   "test = 10000",
        "epochs": args.epochs,
        "seed": SEED,
        "initialisation": "same seed, different initial weights: vaelab sets the decoder "
                          "output bias to logit(clamped train pixel mean) and builds its "
                          "layers in another order; the plain loop uses PyTorch defaults",
        "evaluation": "one function for both models: sum over test examples / N of "
                      "BCE-sum(x, decoder(z)) + analytic KL; 'nelbo' at z = mu + sigma*eps "
                      f"with fixed eps (seed {EVAL_SEED}, same for both models and all "
                      "epochs), 'at_mean' at z = mu",
        "per_epoch": rows,
        "cross_check_vaelab_evaluate_elbo_metrics": cross,
        "diagnostics": diagnostics,
        "vaelab": lab,
        "plain": plain,
        "run_dir": str(out),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "python": platform.python_version(), "vaelab": vaelab.__version__,
                    "vaelab_source_sha256_16 (at start)": digest,
                    "platform": platform.platform(),
                    "load_average_1_5_15min_at_end": [round(v, 2) for v in os.getloadavg()],
                    "note": "2 cores shared with other processes: wall times vary"},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/check_pytorch_example.py",
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    args.results.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
