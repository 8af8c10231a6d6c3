"""Check: ``--preset pytorch-example`` follows the PyTorch VAE example within seed-to-seed noise.

Issue 16. The source is ``vae/main.py`` of pytorch/examples (at 77f55b9, August 2025), copied
here line for line except for what cannot run here: torchvision's ``datasets.MNIST`` +
``ToTensor`` is replaced by the same images as float32 tensors / 255 in a ``TensorDataset``
(the same ``DataLoader(batch_size=128, shuffle=True)`` for training and ``shuffle=False`` for
the test set, so the random-number stream is the example's), and no images are saved (the
per-epoch ``torch.randn(64, 20)`` sample is still drawn). That is:

- ``torch.manual_seed(seed)`` (the example's default seed is 1), 784-400-20 ReLU MLP
  ``fc1, fc21, fc22, fc3, fc4`` with PyTorch's default initialisation, ``z = mu + eps *
  exp(logvar / 2)`` with ``torch.randn_like`` (sampled at evaluation too), ``sigmoid``
  outputs;
- loss = ``F.binary_cross_entropy(recon, x, reduction='sum')`` + the summed KL (a batch
  *sum*), Adam(lr=1e-3), 10 epochs;
- reported: ``train_loss / 60000`` and ``test_loss / 10000`` (sums over examples / their
  number), the test set evaluated after every epoch.

The preset runs as a user runs it: ``vaelab train --preset pytorch-example --data-dir DIR
--seed S --out RUN --no-report`` (``metrics.jsonl``: ``train_nelbo`` and ``test_nelbo`` per
epoch). Both read the same images (vaelab's reader, SHA-256 verified), with one thread, one run
at a time, the example and vaelab interleaved. Agreement: at every epoch from the first, the
means over seeds differ by less than the seed-to-seed spread (the pooled sample standard
deviation of one run over seeds; :func:`common.compare_over_seeds`).

The twin (default on): the example's model, loss and optimizer started from vaelab's initial
weights for the first seed, shown the batches in vaelab's order, with vaelab's noise in
training and evaluation. It differs from vaelab only in the code that computes (a batch sum
vs vaelab's batch mean, which Adam sees through its epsilon; float rounding), so its distance
to vaelab's run with that seed measures everything except the random-number streams.

Run: ``python benchmarks/check_pytorch_example.py --data-dir /path/to/mnist [--seeds 8]
[--epochs 10]``; prints JSON and writes ``benchmarks/results/check_pytorch_example.json``.
``--smoke``: 2 seeds, 2 epochs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.data
from torch import nn, optim

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "check_pytorch_example"
PRESET = "pytorch-example"
BATCH = 128


# --------------------------------------------------------------------------- the example


class VAE(nn.Module):
    """``vae/main.py``'s model, unchanged."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """``vae/main.py``'s loss: reconstruction + KL divergence summed over all elements and
    the batch."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def example_run(x_train: torch.Tensor, x_test: torch.Tensor, seed: int, epochs: int
                ) -> list[dict[str, Any]]:
    """``vae/main.py`` with ``--seed seed --epochs epochs`` on these images (float32
    ``(N, 1, 28, 28)`` in [0, 1], what ``ToTensor`` gives); per-epoch records."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, torch.zeros(len(x_train), dtype=torch.long)),
        batch_size=BATCH, shuffle=True)
    test_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_test, torch.zeros(len(x_test), dtype=torch.long)),
        batch_size=BATCH, shuffle=False)
    model = VAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)

    def train(epoch):
        model.train()
        train_loss = 0
        for _batch_idx, (data, _) in enumerate(train_loader):
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        return train_loss / len(train_loader.dataset)

    def test(epoch):
        model.eval()
        test_loss = 0
        with torch.no_grad():
            for _i, (data, _) in enumerate(test_loader):
                data = data.to(device)
                recon_batch, mu, logvar = model(data)
                test_loss += loss_function(recon_batch, data, mu, logvar).item()
        test_loss /= len(test_loader.dataset)
        return test_loss

    records = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_loss = train(epoch)
        t1 = time.perf_counter()
        test_loss = test(epoch)
        with torch.no_grad():
            sample = torch.randn(64, 20).to(device)
            sample = model.decode(sample).cpu()
        records.append(_record(epoch, train_loss, test_loss, t0, t1, "example", seed))
    return records


def _record(epoch, train_loss, test_loss, t0, t1, label, seed) -> dict[str, Any]:
    end = time.perf_counter()
    print(f"{label} seed {seed} epoch {epoch}: train {train_loss:.2f} test {test_loss:.2f} "
          f"({end - t0:.1f} s)", file=sys.stderr, flush=True)
    return {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
            "train_seconds": round(t1 - t0, 3), "epoch_seconds": round(end - t0, 3)}


# --------------------------------------------------------------------------- the twin


@torch.no_grad()
def copy_vaelab_weights(source: nn.Module, target: VAE) -> None:
    """vaelab's MLP (:func:`common.one_layer_mlp_weights`) -> fc1, fc21, fc22, fc3, fc4."""
    layers = (target.fc1, target.fc21, target.fc22, target.fc3, target.fc4)
    for layer, (weight, bias) in zip(layers, common.one_layer_mlp_weights(source), strict=True):
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def twin_run(cfg, x_train: torch.Tensor, x_test: torch.Tensor, seed: int, epochs: int
             ) -> list[dict[str, Any]]:
    """The example's model, loss and Adam from vaelab's initial weights, with vaelab's
    batch order and noise (``vaelab.rng`` streams of this seed) and vaelab's evaluation
    batches and noise."""
    from vaelab import models
    from vaelab.rng import Purpose, seeded_generator

    torch.manual_seed(seed)  # vaelab's initial weights, built as `vaelab train` does
    initial = models.build_from_config(cfg, tuple(x_train.shape[1:]))
    model = VAE()
    copy_vaelab_weights(initial, model)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    n, records = len(x_train), []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=seeded_generator(seed, epoch, Purpose.PERMUTATION))
        noise = seeded_generator(seed, epoch, Purpose.NOISE)
        train_loss = 0.0
        for start in range(0, n, BATCH):
            data = x_train[perm[start:start + BATCH]]
            optimizer.zero_grad()
            mu, logvar = model.encode(data.view(-1, 784))
            z = mu + torch.randn(mu.shape, generator=noise) * torch.exp(0.5 * logvar)
            loss = loss_function(model.decode(z), data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        t1 = time.perf_counter()
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for number, start in enumerate(range(0, len(x_test), cfg.train.eval_batch_size)):
                data = x_test[start:start + cfg.train.eval_batch_size]
                mu, logvar = model.encode(data.view(-1, 784))
                gen = seeded_generator(seed, number, Purpose.EVAL_NOISE)
                z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
                test_loss += loss_function(model.decode(z), data, mu, logvar).item()
        records.append(_record(epoch + 1, train_loss / n, test_loss / len(x_test), t0, t1,
                               "twin", seed))
    return records


# --------------------------------------------------------------------------- runs



def worker(args) -> dict[str, Any]:
    """One run of the example (or its twin) in this process."""
    from vaelab.data import load_split

    torch.set_num_threads(args.threads)
    seed = args.worker_seed
    cfg = common.preset_config(PRESET, args.dataset, args.data_dir, seed, args.epochs)
    train_set = load_split(cfg.data, "train", seed, progress=False)
    test_set = load_split(cfg.data, "test", seed, progress=False)
    # ToTensor: uint8 (H, W) -> float32 (1, H, W) / 255
    x_train = train_set.images.to(torch.float32).div_(255.0)
    x_test = test_set.images.to(torch.float32).div_(255.0)
    started = time.perf_counter()
    if args.twin:
        records = twin_run(cfg, x_train, x_test, seed, args.epochs)
    else:
        records = example_run(x_train, x_test, seed, args.epochs)
    return {"seed": seed, "twin": args.twin, "per_epoch": records,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "n_train": len(x_train), "n_test": len(x_test)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # the example's default seed is 1
    parser = common.source_check_parser(__doc__.split("\n")[0], NAME, first_seed=1)
    args = parser.parse_args(argv)
    args.threads = args.threads or 1
    args.epochs = args.epochs or (2 if args.smoke else 10)
    if args.worker_seed is not None:  # one run of the example, in its own process
        result = worker(args)
        args.worker_out.write_text(json.dumps(result))
        return result
    return common.run_source_check(
        args, script=Path(__file__).resolve(), name=NAME, preset=PRESET, source="example",
        label="example", first_seed=1, worker_env={}, info={
            "units": "nats per example: BCE summed over 784 grey-level pixels + KL (not a "
                     "likelihood)",
            "source": "pytorch/examples vae/main.py at 77f55b9 (plain PyTorch, copied here)",
            "command": "python vae/main.py --seed S (copied: example_run)"})


if __name__ == "__main__":
    main()
