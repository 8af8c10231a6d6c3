"""The Keras VAE example, fixed with vaelab.keras: the ELBO as its loss, nats per example, an NLL.

The source is the MLP VAE of Keras' ``examples/variational_autoencoder.py`` (keras-team/keras,
Keras 2.2.4; the ``keras-example`` preset reproduces it in PyTorch). Its model is kept:
784-512-2 with ReLU, ``z = z_mean + exp(z_log_var / 2) * eps``, Adam with Keras' defaults,
batch 128. What changes, and why (``docs/keras.md``):

- the loss: ``784 * binary_crossentropy(x, x_decoded_mean) + kl_loss`` written by hand
  becomes ``ELBOLoss(Bernoulli())``: the reconstruction summed over the pixels, the KL
  summed over the latent dimensions, the batch averaged once;
- the decoder outputs logits (no sigmoid), read exactly (no clipping at 1e-7);
- the data are binarised once (vaelab's ``binarize = "static"``): Bernoulli is a likelihood
  of 0/1 pixels only (on MNIST / 255 it is not one, and no NLL could be claimed);
- ``fit`` logs ``nelbo``, ``recon`` and ``kl`` (and ``val_*``) in nats per example;
- at the end, the test NLL by importance sampling with its standard error, and the model
  written as a vaelab run directory for ``vaelab eval`` / ``vaelab plot``.

Run (any Keras 3 backend; torch by default here)::

    KERAS_BACKEND=torch python examples/keras_vae.py --dataset mnist --epochs 50 --out runs/keras-vae
    vaelab eval runs/keras-vae
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from keras import layers  # noqa: E402

from vaelab.keras import (  # noqa: E402
    Bernoulli,
    ELBOLoss,
    ImportanceSampledNLL,
    Likelihood,
    Sampling,
    save_run,
)


def build_vae(original_dim: int = 784, intermediate_dim: int = 512, latent_dim: int = 2,
              likelihood: Likelihood | None = None, seed: int | None = None):
    """The example's MLP VAE with vaelab's loss: ``(vae, encoder, decoder, likelihood)``.

    ``vae`` is compiled-ready (``vae.compile(optimizer=...)``, no loss); ``encoder`` maps
    ``x (B, original_dim)`` to ``[z_mean, z_log_var, z]``, ``decoder`` maps ``z`` to the
    logits of the pixels."""
    likelihood = likelihood if likelihood is not None else Bernoulli()
    inputs = keras.Input(shape=(original_dim,), name="encoder_input")
    x = layers.Dense(intermediate_dim, activation="relu", name="encoder_hidden")(inputs)
    z_mean = layers.Dense(latent_dim, name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
    z = Sampling(seed=seed, name="z")([z_mean, z_log_var])
    encoder = keras.Model(inputs, [z_mean, z_log_var, z], name="encoder")

    latent_inputs = keras.Input(shape=(latent_dim,), name="z_sampling")
    x = layers.Dense(intermediate_dim, activation="relu", name="decoder_hidden")(latent_inputs)
    logits = layers.Dense(original_dim, name="decoder_output")(x)  # no sigmoid: logits
    decoder = keras.Model(latent_inputs, logits, name="decoder")

    z_mean, z_log_var, z = encoder(inputs)
    # The example's `vae.add_loss(vae_loss)`, in one line: the per-example NELBO
    outputs = ELBOLoss(likelihood)([inputs, decoder(z), z_mean, z_log_var])
    vae = keras.Model(inputs, outputs, name="vae_mlp")
    return vae, encoder, decoder, likelihood


def load_data(dataset: str = "mnist", data_dir: str | None = None, seed: int = 0,
              train_limit: int | None = None, test_limit: int | None = None):
    """``(x_train, x_test)``: float32 ``(N, 784)`` 0/1 pixels, vaelab's static binarisation
    of ``dataset`` with ``seed`` (what ``save_run(data={"dataset": dataset, "binarize":
    "static"}, seed=seed)`` tells ``vaelab eval``)."""
    import torch

    from vaelab.data import load

    out = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images = load(dataset, split=split, data_dir=data_dir, binarize="static",
                      validation_size=0, seed=seed, progress=False)
        count = len(images) if limit is None else min(limit, len(images))
        x = images.batch(torch.arange(count))
        out.append(x.reshape(count, -1).numpy())
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, ...")
    parser.add_argument("--data-dir", default=None, help="where the dataset's files are")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iw-samples", type=int, default=1000,
                        help="importance samples per example for the test NLL")
    parser.add_argument("--nll-examples", type=int, default=1000,
                        help="test examples the NLL is estimated on")
    parser.add_argument("--out", default=None, help="write a vaelab run directory here")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x_train, x_test = load_data(args.dataset, args.data_dir, args.seed)
    vae, encoder, decoder, likelihood = build_vae(x_train.shape[1], seed=args.seed)
    vae.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3))  # no loss: ELBOLoss's
    nll = ImportanceSampledNLL(x_test[:args.nll_examples], encoder=encoder, decoder=decoder,
                               likelihood=likelihood, num_samples=args.iw_samples,
                               seed=args.seed)
    history = vae.fit(x_train, epochs=args.epochs, batch_size=args.batch_size,
                      validation_data=(x_test, None), callbacks=[nll], verbose=2)
    last = {k: round(v[-1], 3) for k, v in history.history.items()}
    print(f"last epoch, nats per example: {last}")
    if args.out:
        save_run(encoder, decoder, likelihood, args.out, event_shape=(1, 28, 28),
                 data={"dataset": args.dataset, "binarize": "static",
                       "data_dir": args.data_dir}, history=history,
                 validation_split="test", seed=args.seed)
        print(f"vaelab run directory: {args.out} (vaelab eval {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
