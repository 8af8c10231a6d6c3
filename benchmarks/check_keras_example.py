"""Check: ``--preset keras-example`` follows the Keras VAE example within seed-to-seed noise.

Issue 16. The source is the MLP VAE of the Keras example ``examples/variational_autoencoder.py``
(Keras 2.2.4; keras-team/keras at 33c4e162e3^), rewritten for Keras 3 without changing what
it computes, and run by Keras 3 itself on its torch backend (``KERAS_BACKEND=torch``):

- x = MNIST / 255 (float32, 784 values), all 60,000 training images, the test set as
  ``validation_data``;
- encoder ``Dense(512, relu)`` -> ``z_mean = Dense(2)``, ``z_log_var = Dense(2)``;
  ``z = z_mean + exp(z_log_var / 2) * eps`` (sampled at evaluation too); decoder
  ``Dense(512, relu)`` -> ``Dense(784, sigmoid)``; Keras' default initialisation
  (glorot-uniform kernels, zero biases);
- loss = mean over the batch of ``784 * binary_crossentropy(x, x_hat)`` (Keras' mean over
  pixels, probabilities clipped to [1e-7, 1 - 1e-7]) ``- 0.5 * sum(1 + z_log_var - z_mean^2 -
  exp(z_log_var))``, attached with ``add_loss`` (Keras 3: from a layer, as symbolic
  ``Model.add_loss`` is gone);
- ``vae.compile(optimizer='adam')`` (lr 1e-3, eps 1e-7), ``vae.fit(x_train, epochs=E,
  batch_size=128, validation_data=(x_test, None))`` (reshuffled every epoch), after
  ``keras.utils.set_random_seed(seed)``. Keras' ``loss`` and ``val_loss`` are the epoch's
  batch-size-weighted means: sums over examples / their number.

The preset runs as a user runs it: ``vaelab train --preset keras-example --data-dir DIR
--epochs E --seed S --out RUN --no-report`` (its ``metrics.jsonl`` has ``train_nelbo`` and
``test_nelbo`` per epoch: the same two quantities). Both use the same images (vaelab's reader,
SHA-256 verified), one thread each, one run at a time, Keras and vaelab interleaved.

Agreement (the issue): at every epoch from the first, the means over seeds differ by less
than the seed-to-seed spread, defined here as the pooled sample standard deviation of one run
over seeds (:func:`common.compare_over_seeds`, which also gives the t statistic).

The twin (``--twin``, default on): Keras' model, loss and optimizer started from vaelab's
initial weights for the first seed, shown the batches in vaelab's order, with vaelab's noise
(training and evaluation). It differs from vaelab only in the code that computes: Keras'
layers, loss and Adam (eps added to the uncorrected sqrt(v)) against vaelab's. Its distance
to vaelab's run with that seed measures everything except the random-number streams.

The hybrids (``--hybrids N``, for the first N seeds): Keras' code from vaelab's initial
weights with Keras' own shuffles and noise (one ``fit``, as the example), and from Keras'
initial weights with vaelab's shuffles and noise. With the source and vaelab they make the
four combinations of (initial weights, random streams): whichever source of randomness
carries a difference in the seed-to-seed spread shows in their per-epoch SDs and in a
Brown-Forsythe test grouped by initial weights and by streams.

Run: ``python benchmarks/check_keras_example.py --data-dir /path/to/mnist [--seeds 8]
[--epochs 10] [--hybrids N]``; prints JSON and writes
``benchmarks/results/check_keras_example.json``. The committed result: ``--seeds 16
--hybrids 8``.
Needs ``keras>=3`` (``pip install 'vaelab[keras]'``; installed with pip when missing);
``--smoke``: 2 seeds, 2 epochs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "check_keras_example"
PRESET = "keras-example"
BATCH = 128


# --------------------------------------------------------------------------- data


def _flat(images) -> Any:
    """uint8 ``(N, 1, 28, 28)`` -> float32 ``(N, 784)`` numpy in [0, 1]: the example's
    ``x.astype('float32') / 255.`` and ``reshape``."""
    x = images.images.reshape(len(images), -1).numpy()
    return x.astype("float32") / 255.0


# --------------------------------------------------------------------------- Keras


def build_keras_vae(keras, original_dim: int, intermediate_dim: int = 512, latent_dim: int = 2):
    """The example's model in Keras 3: ``(vae, layers by name, noise holder)``.

    ``noise.gen``: None draws ``eps`` with ``keras.random.normal`` (the example's
    ``K.random_normal``); a ``torch.Generator`` draws it there instead (the twin)."""
    import torch
    from keras import layers, ops

    class Noise:
        gen: torch.Generator | None = None

    noise = Noise()

    class Sampling(layers.Layer):
        """The example's ``Lambda(sampling)``: z = z_mean + exp(z_log_var / 2) * eps."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed_generator = keras.random.SeedGenerator()

        def call(self, inputs):
            z_mean, z_log_var = inputs
            if noise.gen is None:
                eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
            else:
                eps = torch.randn(tuple(z_mean.shape), generator=noise.gen)
            return z_mean + ops.exp(0.5 * z_log_var) * eps

        def compute_output_shape(self, input_shape):
            return input_shape[0]

    class VAELoss(layers.Layer):
        """The example's ``vae.add_loss(vae_loss)``, from a layer (Keras 3)."""

        def call(self, inputs):
            x, outputs, z_mean, z_log_var = inputs
            reconstruction_loss = keras.losses.binary_crossentropy(x, outputs)
            reconstruction_loss = reconstruction_loss * original_dim
            kl_loss = 1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var)
            kl_loss = ops.sum(kl_loss, axis=-1)
            kl_loss = kl_loss * -0.5
            self.add_loss(ops.mean(reconstruction_loss + kl_loss))
            return outputs

        def compute_output_shape(self, input_shape):
            return input_shape[1]

    inputs = keras.Input(shape=(original_dim,), name="encoder_input")
    x = layers.Dense(intermediate_dim, activation="relu", name="encoder_hidden")(inputs)
    z_mean = layers.Dense(latent_dim, name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
    z = Sampling(name="z")([z_mean, z_log_var])
    encoder = keras.Model(inputs, [z_mean, z_log_var, z], name="encoder")
    latent_inputs = keras.Input(shape=(latent_dim,), name="z_sampling")
    x = layers.Dense(intermediate_dim, activation="relu", name="decoder_hidden")(latent_inputs)
    outputs = layers.Dense(original_dim, activation="sigmoid", name="decoder_output")(x)
    decoder = keras.Model(latent_inputs, outputs, name="decoder")
    z_mean_out, z_log_var_out, z_out = encoder(inputs)
    outputs = VAELoss(name="vae_loss")([inputs, decoder(z_out), z_mean_out, z_log_var_out])
    vae = keras.Model(inputs, outputs, name="vae_mlp")
    named = {layer.name: layer for m in (encoder, decoder) for layer in m.layers}
    return vae, named, noise


def _copy_vaelab_weights(model, named) -> None:
    """vaelab's MLP (:func:`common.one_layer_mlp_weights`) -> the Keras layers (kernels are
    W^T)."""
    names = ("encoder_hidden", "z_mean", "z_log_var", "decoder_hidden", "decoder_output")
    for name, (w, b) in zip(names, common.one_layer_mlp_weights(model), strict=True):
        named[name].set_weights([w.detach().T.numpy().copy(), b.detach().numpy().copy()])


def keras_run(dataset: str, data_dir: str | None, seed: int, epochs: int, threads: int,
              init: str = "keras", streams: str = "keras") -> dict[str, Any]:
    """Train the Keras example for ``epochs`` in Keras' code.

    ``init``: ``keras`` (the example's own initial weights for the seed) or ``vaelab``
    (vaelab's for the seed, as ``vaelab train`` draws them). ``streams``: ``keras`` (Keras'
    own shuffles and noise, one ``fit`` call: the example) or ``vaelab`` (vaelab's batch order
    and noise, training and evaluation, one ``fit`` per epoch). Both ``vaelab``: the twin;
    one of each: the hybrids (``--hybrids``)."""
    if init not in ("keras", "vaelab") or streams not in ("keras", "vaelab"):
        raise ValueError(f"init and streams are keras or vaelab, got {init!r}, {streams!r}")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import torch

    torch.set_num_threads(threads)
    import keras

    if keras.backend.backend() != "torch":
        raise SystemExit(f"KERAS_BACKEND must be torch, got {keras.backend.backend()}")
    from vaelab import models
    from vaelab.data import load_split
    from vaelab.rng import Purpose, seeded_generator

    cfg = common.preset_config(PRESET, dataset, data_dir, seed, epochs)
    train_set = load_split(cfg.data, "train", seed, progress=False)
    test_set = load_split(cfg.data, "test", seed, progress=False)
    x_train, x_test = _flat(train_set), _flat(test_set)

    keras.utils.set_random_seed(seed)
    vae, named, noise = build_keras_vae(keras, x_train.shape[1])
    vae.compile(optimizer="adam")
    ours = streams == "vaelab"
    label = {("keras", "keras"): "keras", ("vaelab", "vaelab"): "keras twin",
             ("vaelab", "keras"): "keras with vaelab's init",
             ("keras", "vaelab"): "keras with vaelab's streams"}[init, streams]
    records: list[dict[str, Any]] = []

    class Record(keras.callbacks.Callback):
        """Per-epoch times (training, then the evaluation on the test set); with vaelab's
        streams, vaelab's noise generators."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.t_test = None
            if ours:
                noise.gen = seeded_generator(seed, epoch, Purpose.NOISE)

        def on_test_begin(self, logs=None):
            self.t_test = time.perf_counter()

        def on_test_batch_begin(self, batch, logs=None):
            if ours:
                noise.gen = seeded_generator(seed, batch, Purpose.EVAL_NOISE)

        def on_epoch_end(self, epoch, logs=None):
            end = time.perf_counter()
            t_test = self.t_test or end
            records.append({"epoch": epoch + 1, "train_loss": float(logs["loss"]),
                            "test_loss": float(logs["val_loss"]),
                            "train_seconds": round(t_test - self.t0, 3),
                            "epoch_seconds": round(end - self.t0, 3)})
            print(f"{label} seed {seed} epoch {epoch + 1}/{epochs}: "
                  f"loss {logs['loss']:.2f} val_loss {logs['val_loss']:.2f} "
                  f"({end - self.t0:.1f} s)", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if init == "vaelab":
        torch.manual_seed(seed)  # vaelab's initial weights, built as `vaelab train` does
        _copy_vaelab_weights(models.build_from_config(cfg, train_set.event_shape), named)
    if not ours:  # the example's call
        vae.fit(x_train, epochs=epochs, batch_size=BATCH, validation_data=(x_test, None),
                callbacks=[Record()], verbose=0)
    else:
        for epoch in range(epochs):  # vaelab's order of the batches, one fit per epoch
            perm = torch.randperm(len(x_train), generator=seeded_generator(
                seed, epoch, Purpose.PERMUTATION)).numpy()
            vae.fit(x_train[perm], initial_epoch=epoch, epochs=epoch + 1, batch_size=BATCH,
                    shuffle=False, validation_data=(x_test, None),
                    validation_batch_size=cfg.train.eval_batch_size, callbacks=[Record()],
                    verbose=0)
    return {"seed": seed, "twin": init == streams == "vaelab", "init": init,
            "streams": streams, "keras": keras.__version__,
            "backend": keras.backend.backend(), "adam_epsilon": float(vae.optimizer.epsilon),
            "per_epoch": records, "wall_seconds": round(time.perf_counter() - started, 2),
            "n_train": len(x_train), "n_test": len(x_test)}


#: The two hybrids of ``--hybrids``: Keras' code with one of vaelab's random sources.
HYBRIDS = {"vaelab-init": ("vaelab", "keras"), "vaelab-streams": ("keras", "vaelab")}


def run_hybrids(args, seeds: Sequence[int], work: Path, env: dict[str, str]
                ) -> dict[str, list[dict[str, Any]]]:
    """The hybrids for the first ``args.hybrids`` seeds, each in its own worker process
    (reused when found in ``work``): ``{name: [run per seed]}``."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in HYBRIDS}
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    for seed in seeds[:args.hybrids]:
        for name, (init, streams) in HYBRIDS.items():
            cli = ["--worker-seed", str(seed), "--epochs", str(args.epochs), "--dataset",
                   args.dataset, "--threads", str(args.threads), "--init", init,
                   "--streams", streams, *data]
            runs[name].append(common.run_worker(Path(__file__).resolve(), cli,
                                                work / f"keras-hybrid-{name}-{seed}.json", env))
    return runs


def summarize_hybrids(source_runs: Sequence[dict[str, Any]], lab_runs: Sequence[dict[str, Any]],
                      hybrids: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Test loss mean and seed-to-seed SD per epoch of the four combinations of (initial
    weights, random streams) x (Keras', vaelab's), and a test of equal spread after the last
    epoch between the runs that start from Keras' weights and those from vaelab's. When the
    source ran more seeds than the hybrids, the same test between its own first seeds and the
    rest: how far two sets of seeds of one system differ by chance."""
    n = len(hybrids["vaelab-init"])  # the seeds the hybrids ran for: the first n

    def test_losses(runs: Sequence[dict[str, Any]]) -> list[list[float]]:  # Keras' records
        return [[r["test_loss"] for r in run["per_epoch"]] for run in runs]

    curves = {
        "Keras (its init, its streams)": test_losses(source_runs[:n]),
        "Keras code, vaelab's init": test_losses(hybrids["vaelab-init"]),
        "Keras code, vaelab's streams": test_losses(hybrids["vaelab-streams"]),
        "vaelab (its init, its streams)": [[r["test_nelbo"] for r in run["metrics"]]
                                           for run in lab_runs[:n]],
    }
    rows = []
    for e in range(len(next(iter(curves.values()))[0])):
        row: dict[str, Any] = {"epoch": e + 1}
        for name, c in curves.items():
            mean, sd = common.mean_sd([v[e] for v in c])
            row[name] = {"mean": round(mean, 3), "sd": round(sd, 3)}
        rows.append(row)
    names = list(curves)
    lines = ["| epoch | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    lines += [f"| {r['epoch']} | " + " | ".join(f"{r[name]['mean']:.2f} ± {r[name]['sd']:.2f}"
                                                for name in names) + " |" for r in rows]
    # after the last epoch, per combination (in the order of ``curves``)
    keras, keras_vaelab_init, keras_vaelab_streams, vaelab = ([v[-1] for v in c]
                                                             for c in curves.values())
    keras_init, vaelab_init = keras + keras_vaelab_streams, keras_vaelab_init + vaelab
    out: dict[str, Any] = {
        "what": "test loss (mean ± SD over seeds) of Keras' code from Keras' or vaelab's "
                "initial weights with Keras' or vaelab's shuffles and noise, beside vaelab",
        "seeds": [run["seed"] for run in hybrids["vaelab-init"]],
        "rows": rows, "table": "\n".join(lines),
        "last_epoch_sd_keras_init": round(common.mean_sd(keras_init)[1], 3),
        "last_epoch_sd_vaelab_init": round(common.mean_sd(vaelab_init)[1], 3)}
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is in the dev extra
        return out
    for key, (a, b) in {"init": (keras_init, vaelab_init),
                        "streams": (keras + keras_vaelab_init,
                                    keras_vaelab_streams + vaelab)}.items():
        out[f"last_epoch_equal_spread_p_by_{key}"] = round(float(
            stats.levene(a, b, center="median").pvalue), 6)
    rest = [curve[-1] for curve in test_losses(source_runs[n:])]
    if len(rest) > 1:  # the source alone: its first n seeds against the others
        out["source_other_seeds"] = [run["seed"] for run in source_runs[n:]]
        out["source_last_epoch_sd_hybrid_seeds"] = round(common.mean_sd(keras)[1], 3)
        out["source_last_epoch_sd_other_seeds"] = round(common.mean_sd(rest)[1], 3)
        out["source_last_epoch_equal_spread_p_hybrid_vs_other_seeds"] = round(float(
            stats.levene(keras, rest, center="median").pvalue), 6)
    out["test"] = ("Brown-Forsythe (Levene, median-centred) test of equal variance after the "
                   "last epoch, runs grouped by whose initial weights (or streams) they used")
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.source_check_parser(__doc__.split("\n")[0], NAME, first_seed=0)
    parser.add_argument("--hybrids", type=int, default=0, metavar="N",
                        help="also run Keras' code from vaelab's initial weights with Keras' "
                             "streams, and from Keras' weights with vaelab's streams, for the "
                             "first N seeds: which random source carries the spread")
    parser.add_argument("--init", choices=("keras", "vaelab"), default="keras",
                        help=argparse.SUPPRESS)
    parser.add_argument("--streams", choices=("keras", "vaelab"), default="keras",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or 1
    args.epochs = args.epochs or (2 if args.smoke else 10)
    if args.worker_seed is not None:  # one Keras run, in its own process
        init, streams = ("vaelab", "vaelab") if args.twin else (args.init, args.streams)
        result = keras_run(args.dataset, args.data_dir, args.worker_seed, args.epochs,
                           args.threads, init=init, streams=streams)
        args.worker_out.write_text(json.dumps(result))
        return result
    if importlib.util.find_spec("keras") is None:  # an optional dependency: install it here
        print("installing keras>=3 (pip), which this check runs", file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, "-m", "pip", "install", "-q", "keras>=3"]).returncode:
            raise SystemExit("could not install keras>=3: pip install 'vaelab[keras]' and rerun")
    return common.run_source_check(
        args, script=Path(__file__).resolve(), name=NAME, preset=PRESET, source="keras",
        label="Keras", first_seed=0, worker_env={"KERAS_BACKEND": "torch"},
        hybrids=(run_hybrids, summarize_hybrids) if args.hybrids else None, info={
            "units": "nats per example: 784 x Keras' binary_crossentropy + KL (BCE on grey "
                     "levels: not a likelihood)",
            "source": "keras-team/keras examples/variational_autoencoder.py (Keras 2.2.4, "
                      "MLP) rewritten for Keras 3, run by Keras on the torch backend",
            "command": "vae.fit(x_train, epochs=E, batch_size=128, validation_data=(x_test, "
                       "None)) after keras.utils.set_random_seed(seed)"})


if __name__ == "__main__":
    main()
