"""Widely copied VAE losses, re-implemented faithfully, for ``vaelab audit --preset NAME``.

Each preset is the loss as its source computes it (the same reductions, clipping and
argument order; Keras' numerics through :mod:`vaelab.compat`; TensorFlow code in NumPy),
with the source cited. :func:`audit_preset` probes it with :func:`vaelab.audit.probe`, so
a preset's audit is measured, not written down; ``tests/test_audit_presets.py`` checks
each against the numbers stated here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..compat import keras_binary_crossentropy, keras_mse
from ..registry import Registry
from .explain import Audit, probe

__all__ = ["LOSS_PRESETS", "LossPreset", "audit_preset"]


@dataclass(frozen=True)
class LossPreset:
    """A copied loss and how it is called.

    Attributes:
        name: the preset's name.
        fn: the re-implemented loss.
        source: where it comes from (a URL and the function), and what it does.
        optimises: one line: what the audit finds (checked by the tests).
        data_shape, latent_dim, roles, batch_size, fixed_kwargs, data: the arguments of
            :func:`vaelab.audit.probe`, as the source uses the loss.
    """

    name: str
    fn: Callable[..., Any]
    source: str
    optimises: str
    data_shape: tuple[int, ...]
    latent_dim: int
    roles: tuple[str, ...] = ("x", "x_hat", "mu", "logvar")
    batch_size: int | None = None
    fixed_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None


LOSS_PRESETS: Registry[LossPreset] = Registry("loss preset")


def _add(preset: LossPreset) -> None:
    LOSS_PRESETS.register(preset.name)(preset)


def _keras_kl(mu: torch.Tensor, logvar: torch.Tensor, reduce) -> torch.Tensor:
    """``-0.5 * K.<reduce>(1 + z_log_var - K.square(z_mean) - K.exp(z_log_var), axis=-1)``."""
    return -0.5 * reduce(1 + logvar - mu.square() - logvar.exp(), dim=-1)


# --------------------------------------------------------------------------- Keras


def keras_blog_2016(x, x_decoded_mean, z_mean, z_log_sigma):
    """``vae_loss`` of the Keras blog (2016): a Keras loss function, one value per example."""
    xent_loss = keras_binary_crossentropy(x, x_decoded_mean, flavor="keras_legacy")
    kl_loss = _keras_kl(z_mean, z_log_sigma, torch.mean)
    return xent_loss + kl_loss


def keras_example_2018(inputs, outputs, z_mean, z_log_var, mse=False, original_dim=784):
    """``examples/variational_autoencoder.py`` of Keras 2.2.4 (``--mse`` for ``mse=True``)."""
    if mse:
        reconstruction_loss = keras_mse(inputs, outputs)
    else:
        reconstruction_loss = keras_binary_crossentropy(inputs, outputs, flavor="keras_legacy")
    reconstruction_loss = reconstruction_loss * original_dim
    kl_loss = 1 + z_log_var - z_mean.square() - z_log_var.exp()
    kl_loss = -0.5 * kl_loss.sum(dim=-1)
    return (reconstruction_loss + kl_loss).mean()


def keras_io_vae(data, reconstruction, z_mean, z_log_var):
    """``VAE.train_step`` of keras-io ``examples/generative/vae.py``: images (B, 28, 28, 1)."""
    reconstruction_loss = keras_binary_crossentropy(data, reconstruction, flavor="keras3")
    reconstruction_loss = reconstruction_loss.sum(dim=(1, 2)).mean()
    kl_loss = -0.5 * (1 + z_log_var - z_mean.square() - z_log_var.exp())
    kl_loss = kl_loss.sum(dim=1).mean()
    return reconstruction_loss + kl_loss


_add(LossPreset(
    "keras-blog-2016", keras_blog_2016,
    "https://blog.keras.io/building-autoencoders-in-keras.html, section 'Variational "
    "autoencoder (VAE)' as published in May 2016 (later edited): vae_loss(x, x_decoded_mean) "
    "= objectives.binary_crossentropy(x, x_decoded_mean) (Keras 1: mean over the 784 pixels; "
    "TensorFlow backend: clip to [1e-7, 1 - 1e-7], back to logits, sigmoid cross-entropy) "
    "- 0.5 * K.mean(1 + z_log_sigma - K.square(z_mean) - K.exp(z_log_sigma), axis=-1) (a mean "
    "over the 2 latent dims); returned per example, Keras averages over the batch",
    "scale 1/784, beta 392: a heavily over-regularised beta-VAE",
    (784,), 2))

_add(LossPreset(
    "keras-example-2018-bce", keras_example_2018,
    "https://github.com/keras-team/keras/blob/2.2.4/examples/variational_autoencoder.py: "
    "reconstruction_loss = binary_crossentropy(inputs, outputs) (mean over the last axis, "
    "clipped to [1e-7, 1 - 1e-7]); reconstruction_loss *= original_dim (784); kl_loss = "
    "-0.5 * K.sum(1 + z_log_var - K.square(z_mean) - K.exp(z_log_var), axis=-1); vae_loss = "
    "K.mean(reconstruction_loss + kl_loss)",
    "the ELBO (scale 1, beta 1, Bernoulli): x 784 undoes Keras' mean over pixels",
    (784,), 2))

_add(LossPreset(
    "keras-example-2018-mse", keras_example_2018,
    "same file with --mse: reconstruction_loss = mse(inputs, outputs) (mean over the last "
    "axis) * original_dim (784), then the same KL and batch mean",
    "beta 1 with a Gaussian of sigma^2 = 1/2 and 448.73 nats of constant missing",
    (784,), 2, fixed_kwargs={"mse": True}))

_add(LossPreset(
    "keras-io-vae", keras_io_vae,
    "https://github.com/keras-team/keras-io/blob/master/examples/generative/vae.py, "
    "VAE.train_step: reconstruction_loss = mean(sum(keras.losses.binary_crossentropy(data, "
    "reconstruction), axis=(1, 2))) on (B, 28, 28, 1) images (the BCE averages the last axis, "
    "of size 1); kl_loss = mean(sum(-0.5 * (1 + z_log_var - square(z_mean) - exp(z_log_var)), "
    "axis=1)); total_loss = reconstruction_loss + kl_loss",
    "the ELBO (scale 1, beta 1, Bernoulli), probabilities clipped at 1e-7",
    (28, 28, 1), 2))


# --------------------------------------------------------------------------- PyTorch


def pytorch_examples_vae(recon_x, x, mu, logvar):
    """``loss_function`` of pytorch/examples ``vae/main.py``: sums over pixels and batch."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def antixk_vanilla_vae(*args, **kwargs) -> dict:
    """``VanillaVAE.loss_function`` of AntixK/PyTorch-VAE: ``args = (recons, input, mu,
    log_var)``, ``kwargs['M_N']`` weighs the KL; returns a dict."""
    recons, input, mu, log_var = args[0], args[1], args[2], args[3]
    kld_weight = kwargs["M_N"]
    recons_loss = F.mse_loss(recons, input)
    kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)
    loss = recons_loss + kld_weight * kld_loss
    return {"loss": loss, "Reconstruction_Loss": recons_loss.detach(), "KLD": -kld_loss.detach()}


def pythae_vae(recon_x, x, mu, log_var, z, reconstruction_loss="mse"):
    """``VAE.loss_function`` of pythae: per-example sums, batch mean; returns a tuple."""
    if reconstruction_loss == "mse":
        recon_loss = F.mse_loss(recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1),
                                reduction="none").sum(dim=-1)
    else:
        recon_loss = F.binary_cross_entropy(recon_x.reshape(x.shape[0], -1),
                                            x.reshape(x.shape[0], -1),
                                            reduction="none").sum(dim=-1)
    KLD = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
    return (recon_loss + KLD).mean(dim=0), recon_loss.mean(dim=0), KLD.mean(dim=0)


def pytorch_port_of_keras_example(recon_x, x, mu, logvar):
    """The Keras example ported literally to PyTorch: ``784 * F.binary_cross_entropy`` (a
    mean over pixels *and* batch) plus ``torch.sum`` of the KL (over latents *and* batch)."""
    bce = 784 * F.binary_cross_entropy(recon_x, x)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


_add(LossPreset(
    "pytorch-examples-vae", pytorch_examples_vae,
    "https://github.com/pytorch/examples/blob/main/vae/main.py, loss_function(recon_x, x, mu, "
    "logvar): BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction='sum') (log "
    "clamped at -100); KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()); BCE + "
    "KLD, summed over the batch of 128; MNIST grey levels, not binarised",
    "beta 1 at scale 128 (a batch sum), but BCE on grey levels is not a likelihood",
    (784,), 20, roles=("x_hat", "x", "mu", "logvar"), batch_size=128, data="grey"))

_add(LossPreset(
    "antixk-kld-weight", antixk_vanilla_vae,
    "https://github.com/AntixK/PyTorch-VAE/blob/master/models/vanilla_vae.py, "
    "VanillaVAE.loss_function: recons_loss = F.mse_loss(recons, input) (a mean over pixels and "
    "batch); kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), "
    "dim=1), dim=0); loss = recons_loss + kld_weight * kld_loss with kld_weight = "
    "kwargs['M_N'] = 0.00025 (configs/vae.yaml kld_weight, passed by experiment.py); CelebA "
    "64x64x3 in [-1, 1], latent 128",
    "scale 1/12288, beta 3.072 against the sigma^2 = 1/2 Gaussian (sigma^2 = 1.536 at beta 1)",
    (3, 64, 64), 128, fixed_kwargs={"M_N": 0.00025}))

_add(LossPreset(
    "antixk-m-n", antixk_vanilla_vae,
    "the same loss_function with M_N = batch_size / num_train_imgs = 144 / 162770, as "
    "experiment.py passed it before commit af3f9a5 (2021-12-22; configs/vae.yaml batch_size "
    "144, the CelebA training split of 162,770 images)",
    "beta 10.87: M_N = B/N makes the KL weight depend on the batch and dataset sizes",
    (3, 64, 64), 128, fixed_kwargs={"M_N": 144 / 162770}))

_add(LossPreset(
    "pythae-mse", pythae_vae,
    "https://github.com/clementchadebec/benchmark_VAE/blob/main/src/pythae/models/vae/"
    "vae_model.py, VAE.loss_function(recon_x, x, mu, log_var, z) with reconstruction_loss="
    "'mse': F.mse_loss(..., reduction='none').sum(dim=-1) + KLD summed over latents, mean "
    "over the batch",
    "beta 1 with a Gaussian of sigma^2 = 1/2; its normalising constant is missing",
    (1, 28, 28), 16, roles=("x_hat", "x", "mu", "logvar", "z")))

_add(LossPreset(
    "pythae-bce", pythae_vae,
    "the same loss_function with reconstruction_loss='bce': F.binary_cross_entropy(..., "
    "reduction='none').sum(dim=-1) (log clamped at -100) + KLD, mean over the batch",
    "the ELBO (scale 1, beta 1) on binary data",
    (1, 28, 28), 16, roles=("x_hat", "x", "mu", "logvar", "z"),
    fixed_kwargs={"reconstruction_loss": "bce"}))

_add(LossPreset(
    "pytorch-port-784-mean-bce-sum-kl", pytorch_port_of_keras_example,
    "a literal PyTorch port of the Keras example, as often posted: 784 * "
    "F.binary_cross_entropy(recon_x, x) (default reduction 'mean': over pixels and batch) + "
    "-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) (a sum over latents and batch)",
    "beta = B (128 here): the KL is summed over the batch, the reconstruction averaged",
    (784,), 2, roles=("x_hat", "x", "mu", "logvar"), batch_size=128))


# --------------------------------------------------------------------------- NumPy


def _sigmoid_cross_entropy_with_logits(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``tf.nn.sigmoid_cross_entropy_with_logits``."""
    return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def _dlib_kl(z_mean: np.ndarray, z_logvar: np.ndarray) -> np.ndarray:
    """disentanglement_lib's ``compute_gaussian_kl``: batch mean of the per-example sum."""
    return np.mean(0.5 * np.sum(np.square(z_mean) + np.exp(z_logvar) - z_logvar - 1, axis=1))


def disentanglement_lib_vae(true_images, reconstructed_images, z_mean, z_logvar,
                            loss_fn="bernoulli", beta=1.0):
    """``BaseVAE.model_fn`` loss of disentanglement_lib (``BetaVAE``), activation 'logits'."""
    batch = true_images.shape[0]
    if loss_fn == "bernoulli":
        flat = true_images.reshape(batch, -1), reconstructed_images.reshape(batch, -1)
        per_sample_loss = np.sum(_sigmoid_cross_entropy_with_logits(*flat), axis=1)
    else:  # l2_loss
        sigmoid = 1 / (1 + np.exp(-reconstructed_images))
        per_sample_loss = np.sum(np.square(true_images - sigmoid), axis=(1, 2, 3))
    reconstruction_loss = np.mean(per_sample_loss)
    return reconstruction_loss + beta * _dlib_kl(z_mean, z_logvar)


def seeds_question(x, x_hat, mu, logvar, original_dim=784):
    """"784 * mean BCE + summed KL", per example, averaged over the batch (NumPy)."""
    p = np.clip(x_hat, 1e-7, 1 - 1e-7)
    mean_bce = -np.mean(x * np.log(p) + (1 - x) * np.log(1 - p), axis=-1)
    kl = -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=-1)
    return np.mean(original_dim * mean_bce + kl)


_add(LossPreset(
    "disentanglement-lib-bernoulli", disentanglement_lib_vae,
    "https://github.com/google-research/disentanglement_lib: methods/shared/losses.py "
    "bernoulli_loss with activation='logits' (sigmoid_cross_entropy_with_logits summed over "
    "the flattened image) and methods/unsupervised/vae.py BaseVAE.model_fn + BetaVAE "
    "(reduce_mean over the batch + beta * compute_gaussian_kl, a batch mean of the KL summed "
    "over latents), beta = 1; dSprites 64x64x1, 10 latents",
    "the ELBO (scale 1, beta 1) with logits computed stably",
    (64, 64, 1), 10))

_add(LossPreset(
    "disentanglement-lib-gaussian", disentanglement_lib_vae,
    "the same model_fn with l2_loss, activation='logits': sum over (1, 2, 3) of "
    "(true_images - sigmoid(reconstructed_images))^2; 64x64x3 images",
    "beta 1 with a Gaussian of sigma^2 = 1/2 around sigmoid(x_hat); constant missing",
    (64, 64, 3), 10, fixed_kwargs={"loss_fn": "l2"}))

_add(LossPreset(
    "seeds-784-mean-bce-sum-kl", seeds_question,
    "the question the audit started from, 'why is the cross-entropy multiplied by "
    "original_dim?': 784 * (BCE averaged over the 784 pixels, clipped at 1e-7) + KL summed "
    "over latents, averaged over the batch (NumPy)",
    "the ELBO (scale 1, beta 1): x 784 turns the mean over pixels back into the sum",
    (784,), 2))


def audit_preset(name: str) -> Audit:
    """Probe the preset ``name`` (see :data:`LOSS_PRESETS`) and return its audit.

    Raises:
        ConfigError: an unknown name (the valid ones are listed).
    """
    preset = LOSS_PRESETS[name]
    return probe(preset.fn, data_shape=preset.data_shape, latent_dim=preset.latent_dim,
                 roles=preset.roles, batch_size=preset.batch_size, data=preset.data,
                 **preset.fixed_kwargs)
