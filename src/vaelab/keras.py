r"""vaelab for Keras 3 users: the ELBO, metrics in nats per example and the NLL, in Keras.

Everything that runs inside a Keras model is written in ``keras.ops``, so it runs on every
Keras 3 backend (torch, JAX, TensorFlow). Conventions are vaelab's (``docs/design.md``):
per-example quantities are ``(B,)`` tensors in nats, summed over every data dimension (the
reconstruction) or every latent dimension (the KL); the batch is reduced once; ``nelbo``,
``recon`` (:math:`-E_q \log p(x|z)`) and ``nll`` are positive; beta and KL warm-up shape
the training objective (Keras' ``loss``) only, never the reported NELBO.

The Keras example's loss (``784 * binary_crossentropy(x, x_decoded_mean)`` plus the summed
KL) becomes one import and one line::

    from vaelab.keras import Bernoulli, ELBOLoss
    outputs = ELBOLoss(Bernoulli(output="probs"))([inputs, outputs, z_mean, z_log_var])
    vae = keras.Model(inputs, outputs)        # compile(optimizer=...) without a loss

and ``fit`` then logs ``nelbo``, ``recon`` and ``kl`` (and ``val_*``) in nats per example,
averaged over examples. The pieces:

- terms: :func:`bernoulli_log_likelihood`, :func:`gaussian_log_likelihood`,
  :func:`gaussian_kl` and :func:`nelbo_terms`, with the likelihood layers
  :class:`Bernoulli` (logits, or probabilities clipped as Keras clips them) and
  :class:`Gaussian` (fixed, learned or per-pixel sigma, normalising constant included);
- :class:`ELBOLoss`, a layer that adds the loss (``add_loss``, as the Keras example does)
  and updates the metrics; :class:`ELBOMixin`, the same for ``compute_loss``, which the
  ``train_step`` of every backend calls (functional or subclassed models, JAX included);
- :class:`PerExampleMean`: a metric of per-example values (sum / number of examples);
- :func:`importance_sampled_nll` and the callback :class:`ImportanceSampledNLL`;
- :func:`to_vaelab` (a :class:`vaelab.models.VAE` with the Keras weights) and
  :func:`save_run` (a run directory that ``vaelab eval`` and ``vaelab plot`` open).

Keras picks its backend when it is first imported: set ``KERAS_BACKEND`` before that.
See ``docs/keras.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compat import EPSILON
from .errors import CheckpointError, ConfigError, DataError

try:
    import keras
    from keras import ops
except ImportError as _err:  # no Keras, or Keras' default backend is not installed
    raise ImportError(
        f"vaelab.keras could not import Keras 3 ({_err}): pip install 'vaelab[keras]' and set "
        "KERAS_BACKEND to an installed backend (torch, jax or tensorflow) before importing it"
    ) from None
if int(str(getattr(keras, "__version__", "0")).split(".")[0]) < 3:
    raise ImportError(f"vaelab.keras needs Keras 3, found keras {keras.__version__}: "
                      "pip install -U 'keras>=3'")

__all__ = [
    "EPSILON",
    "bernoulli_log_likelihood",
    "gaussian_log_likelihood",
    "gaussian_kl",
    "NELBOTerms",
    "nelbo_terms",
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "Sampling",
    "PerExampleMean",
    "ELBOLoss",
    "ELBOMixin",
    "NLLEstimate",
    "importance_sampled_nll",
    "ImportanceSampledNLL",
    "to_vaelab",
    "save_run",
]

_LOG_2PI = math.log(2.0 * math.pi)
_PACKAGE = "vaelab"


# --------------------------------------------------------------------------- checks


def _shape(t: Any) -> tuple:
    return tuple(t.shape)


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"


def _rank_at_least_two(name: str, t: Any) -> None:
    if len(_shape(t)) < 2:
        raise DataError(f"{name} has shape {_shape_text(_shape(t))}: pass a batch shaped "
                        f"(B, *event_shape), e.g. (B, 784); one example is x[None]")


def _same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    sa, sb = _shape(a), _shape(b)
    if len(sa) != len(sb) or any(x is not None and y is not None and x != y
                                 for x, y in zip(sa, sb)):
        raise DataError(f"{name_a} has shape {_shape_text(sa)} but {name_b} has shape "
                        f"{_shape_text(sb)}: they must match (flatten both, or reshape the "
                        "decoder's output to the data's shape)")


def _float(t: Any) -> Any:
    """``t`` as a floating tensor; float16/bfloat16 (mixed precision) computed in float32, so
    the sums over hundreds of pixels and the reported nats keep float32 precision."""
    t = ops.convert_to_tensor(t)
    dtype = keras.backend.standardize_dtype(t.dtype)
    if dtype in ("float16", "bfloat16") or not dtype.startswith("float"):
        return ops.cast(t, "float32")
    return t


def _event_sum(values: Any) -> Any:
    """``(B, ...) -> (B,)``: the sum over every axis but the first."""
    rank = len(_shape(values))
    return values if rank == 1 else ops.sum(values, axis=tuple(range(1, rank)))


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it has no values yet (symbolic, traced)."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # a KerasTensor, a JAX tracer, a TF graph tensor, a meta tensor
        return None


def _check_unit(name: str, x: Any) -> np.ndarray:
    """``x`` as a NumPy array of floats in [0, 1], or a :class:`DataError` with the fix."""
    values = np.asarray(x)
    if values.dtype.kind != "f":
        raise DataError(f"{name} needs floating-point data in [0, 1], got {values.dtype}: "
                        "convert 8-bit images with x.astype('float32') / 255")
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{name} got {int(bad.sum())} NaN/Inf values: fix the data pipeline "
                        "(look for a division by zero) before computing likelihoods")
    outside = (values < 0) | (values > 1)
    if outside.any():
        example = values[outside].flat[0]
        if values.min() >= 0 and values.max() <= 255:
            raise DataError(f"{name} needs data in [0, 1] but got {int(outside.sum())} values "
                            f"above 1, e.g. {example:.4g}; they look like 0..255 pixel values: "
                            "divide by 255")
        raise DataError(f"{name} needs data in [0, 1] but got {int(outside.sum())} values "
                        f"outside it, e.g. {example:.4g}: rescale the data to [0, 1]")
    return values


def _check_weight(beta: float, warmup_steps: int) -> tuple[float, int]:
    from . import objectives

    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ConfigError(f"beta must be a finite number >= 0 (the KL weight), got {beta!r}")
    objectives.kl_weight(0, beta, warmup_steps)  # negative values: vaelab's ConfigError
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise ConfigError(f"warmup_steps must be a whole number of training steps, got "
                          f"{warmup_steps!r}: e.g. warmup_steps=10 * steps_per_epoch")
    return float(beta), int(warmup_steps)


# --------------------------------------------------------------------------- the terms


def bernoulli_log_likelihood(x: Any, outputs: Any, from_logits: bool = True) -> Any:
    r""":math:`\log p(x|z)` of a Bernoulli, summed over every data dimension: ``(B,)`` nats.

    - ``from_logits=True``: ``outputs`` are logits :math:`l` and
      :math:`\log p = x l - \mathrm{softplus}(l)`, exact at any logit;
    - ``from_logits=False``: ``outputs`` are probabilities, clipped to
      :math:`[\epsilon, 1 - \epsilon]` with :math:`\epsilon = 10^{-7}` before the logs, as
      Keras 3's ``binary_crossentropy`` does (:data:`vaelab.compat.EPSILON`; a wrong pixel
      then costs at most 16.1 nats and gets no gradient beyond the clip).

    This is ``-784 * keras.losses.binary_crossentropy(x, outputs)`` for 784 pixels: Keras'
    loss averages over the last axis, this sums over all of them.

    Args:
        x: ``(B, *event_shape)`` 0/1 data (grey levels give BCE, not a likelihood).
        outputs: the decoder's output, shaped like ``x``.
        from_logits: whether ``outputs`` are logits (default) or probabilities.

    Returns:
        ``(B,)`` log-likelihoods (negative), in the floating dtype of ``outputs``.

    Raises:
        DataError: ``x`` and ``outputs`` differ in shape, or are not batches.
    """
    _rank_at_least_two("x", x)
    _same_shape("x", x, "outputs", outputs)
    outputs = _float(outputs)
    x = ops.cast(x, outputs.dtype)
    if from_logits:
        values = x * outputs - ops.softplus(outputs)
    else:
        p = ops.clip(outputs, EPSILON, 1.0 - EPSILON)
        values = x * ops.log(p) + (1.0 - x) * ops.log(1.0 - p)
    return _event_sum(values)


def gaussian_log_likelihood(x: Any, mean: Any, sigma: Any = None, *,
                            log_sigma: Any = None) -> Any:
    r""":math:`\log N(x; \mu, \sigma^2)` summed over every data dimension, with its constant:
    ``(B,)`` nats.

    .. math:: \sum_d -\tfrac12 ((x_d - \mu_d)/\sigma_d)^2 - \log\sigma_d - \tfrac12\log 2\pi

    "MSE" is this with :math:`\sigma^2 = 1/2` and the constant
    :math:`\tfrac D2 \log(2\pi\sigma^2)` dropped; here nothing is dropped.

    Args:
        x: ``(B, *event_shape)`` data.
        mean: the decoder's mean, shaped like ``x``.
        sigma: the standard deviation: a positive number (fixed), a scalar tensor (learned)
            or a tensor shaped like ``x`` (per pixel). Give it or ``log_sigma``, not both.
        log_sigma: :math:`\log\sigma` instead (better for a learned or per-pixel scale).

    Raises:
        DataError: shapes that differ; ConfigError: both or neither of ``sigma`` and
            ``log_sigma``, or a fixed ``sigma <= 0``.
    """
    _rank_at_least_two("x", x)
    _same_shape("x", x, "mean", mean)
    if (sigma is None) == (log_sigma is None):
        raise ConfigError("give sigma or log_sigma (not both): e.g. sigma=0.1, or the "
                          "log_sigma the decoder outputs")
    mean = _float(mean)
    x = ops.cast(x, mean.dtype)
    if sigma is not None and isinstance(sigma, (int, float)):
        if isinstance(sigma, bool) or not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"sigma must be a positive number, got {sigma!r}")
        log_sigma = math.log(sigma)
    elif sigma is not None:
        log_sigma = ops.log(ops.cast(sigma, mean.dtype))
    if isinstance(log_sigma, float):
        z = (x - mean) * math.exp(-log_sigma)
        values = -0.5 * ops.square(z) - (log_sigma + 0.5 * _LOG_2PI)
    else:
        log_sigma = ops.cast(log_sigma, mean.dtype)
        z = (x - mean) * ops.exp(-log_sigma)
        values = -0.5 * ops.square(z) - log_sigma - 0.5 * _LOG_2PI
    return _event_sum(values)


def gaussian_kl(z_mean: Any, z_log_var: Any) -> Any:
    r""":math:`KL(N(\mu, \mathrm{diag}\,\sigma^2) \| N(0, I))` summed over the latent
    dimensions: ``(B,)`` nats.

    .. math:: \tfrac12 \sum_j \big(\sigma_j^2 + \mu_j^2 - 1 - \log\sigma_j^2\big)

    (Kingma & Welling 2014, appendix B; the Keras example's ``kl_loss`` with the sum, not a
    mean, over the latent dimensions.)

    Args:
        z_mean: ``(B, L)``; z_log_var: ``(B, L)``, :math:`\log\sigma^2`.

    Raises:
        DataError: shapes that differ or are not ``(B, L)``.
    """
    _same_shape("z_mean", z_mean, "z_log_var", z_log_var)
    if len(_shape(z_mean)) != 2:
        raise DataError(f"z_mean has shape {_shape_text(_shape(z_mean))}: the KL needs "
                        "(B, L) means and log-variances")
    z_mean = _float(z_mean)
    z_log_var = ops.cast(z_log_var, z_mean.dtype)
    values = ops.exp(z_log_var) + ops.square(z_mean) - 1.0 - z_log_var
    return 0.5 * ops.sum(values, axis=-1)


@dataclass(frozen=True)
class NELBOTerms:
    r"""Per-example terms of the negative ELBO (beta = 1), all ``(B,)`` in nats, positive.

    Attributes:
        nelbo: ``recon + kl``.
        recon: :math:`-\log p(x|z)` at the decoded ``z`` (one sample: the Monte-Carlo
            estimate of :math:`-E_q \log p(x|z)`).
        kl: :math:`KL(q(z|x) \| p(z))`, analytic.
    """

    nelbo: Any
    recon: Any
    kl: Any


def nelbo_terms(x: Any, outputs: Any, z_mean: Any, z_log_var: Any,
                likelihood: Likelihood) -> NELBOTerms:
    """The per-example negative ELBO of a batch: ``likelihood``'s :math:`-\\log p(x|z)` of the
    decoder's ``outputs`` plus the Gaussian KL of ``(z_mean, z_log_var)``.

    Args:
        x: ``(B, *event_shape)``.
        outputs: the decoder's output for ``z`` drawn from ``(z_mean, z_log_var)``.
        z_mean, z_log_var: ``(B, L)``.
        likelihood: a :class:`Bernoulli` or :class:`Gaussian`.

    Returns:
        :class:`NELBOTerms` of ``(B,)`` tensors.
    """
    _check_likelihood(likelihood)
    recon = -likelihood.log_prob(x, outputs)
    kl = ops.cast(gaussian_kl(z_mean, z_log_var), recon.dtype)
    return NELBOTerms(nelbo=recon + kl, recon=recon, kl=kl)


# --------------------------------------------------------------------------- likelihoods


def _check_likelihood(likelihood: Any) -> None:
    if not isinstance(likelihood, Likelihood):
        raise ConfigError(f"likelihood must be a vaelab.keras Bernoulli or Gaussian, got "
                          f"{type(likelihood).__name__}: e.g. likelihood=Bernoulli()")


class Likelihood(keras.layers.Layer):
    """The base of :class:`Bernoulli` and :class:`Gaussian`: p(x|z) of the decoder's outputs.

    Attributes:
        family: vaelab's name of the family (``"bernoulli"``, ``"gaussian"``).
        normalized: whether ``log_prob`` is a normalised log-likelihood (False for BCE on
            grey levels, ``Bernoulli(unnormalized=True)``); no NLL is claimed otherwise.
    """

    family = ""
    normalized = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.built = True  # no lazily created state

    def log_prob(self, x: Any, outputs: Any) -> Any:
        """``(B,)`` log-likelihoods in nats, summed over every data dimension."""
        raise NotImplementedError

    def check(self, x: Any) -> None:
        """Raise :class:`~vaelab.errors.DataError` (one line with the fix) unless the data
        ``x`` fit this family: call it once on the training data (under ``jit`` a model
        cannot look at values)."""
        raise NotImplementedError

    def vaelab_family(self) -> Any:
        """The same family as a :mod:`vaelab.likelihoods` object (a learned scale copied)."""
        raise NotImplementedError

    def call(self, inputs: Any) -> Any:
        x, outputs = inputs
        return self.log_prob(x, outputs)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0],)


BERNOULLI_OUTPUTS = {"logits": "logits", "probs": "keras-probs"}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Bernoulli(Likelihood):
    r"""Bernoulli p(x|z) for 0/1 data: :func:`bernoulli_log_likelihood`.

    Args:
        output: ``"logits"`` (default: the decoder's last layer has no activation; exact)
            or ``"probs"`` (a sigmoid output, clipped to :math:`[10^{-7}, 1 - 10^{-7}]` as
            Keras' ``binary_crossentropy`` does: vaelab's ``output = "keras-probs"``).
        unnormalized: accept grey levels in [0, 1]: BCE on grey levels, which is *not* a
            likelihood (the Keras example on MNIST / 255): no NLL is claimed for it.
    """

    family = "bernoulli"

    def __init__(self, output: str = "logits", unnormalized: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        if output not in BERNOULLI_OUTPUTS:
            raise ConfigError(f"unknown Bernoulli output {output!r}: choose logits (no "
                              "activation on the decoder's last layer) or probs (a sigmoid)")
        from . import likelihoods

        # vaelab's family checks the options; only its options are kept (a torch module set
        # on a layer would be wrapped by Keras' torch backend)
        self._options = likelihoods.get("bernoulli", unnormalized=unnormalized,
                                        output=BERNOULLI_OUTPUTS[output]).config()
        self.output_kind = output  # (a Layer's ``output`` is Keras' own attribute)
        self.from_logits = output == "logits"
        self.unnormalized = bool(unnormalized)
        self.normalized = not self.unnormalized

    def log_prob(self, x: Any, outputs: Any) -> Any:
        return bernoulli_log_likelihood(x, outputs, from_logits=self.from_logits)

    def check(self, x: Any) -> None:
        values = _check_unit("Bernoulli", x)
        if self.unnormalized:
            return
        grey = (values > 0) & (values < 1)
        if grey.any():
            raise DataError(
                f"Bernoulli needs 0/1 data but got {int(grey.sum())} values strictly between "
                f"0 and 1, e.g. {values[grey].flat[0]:.4g}: binarise x once, e.g. x = "
                "(np.random.default_rng(0).random(x.shape) < x).astype('float32'), or pass "
                "Bernoulli(unnormalized=True) for BCE on grey levels (not a likelihood: no NLL)")

    def vaelab_family(self) -> Any:
        from . import likelihoods

        return likelihoods.get("bernoulli", **self._options)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "output": self.output_kind,
                "unnormalized": self.unnormalized}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gaussian(Likelihood):
    r"""Gaussian p(x|z) with its normalising constant: :func:`gaussian_log_likelihood`.

    The decoder's output is the mean (no activation on its last layer). ``scale`` is

    - a positive number: fixed sigma (``scale=0.7071`` is what "MSE" assumes, but with the
      constant :math:`\tfrac D2\log(2\pi\sigma^2)` kept);
    - ``"learned"`` (default): one trainable sigma for all pixels (Rybkin et al. 2021's
      optimal sigma-VAE), :math:`\sigma = \text{min\_scale} + e^{\text{log\_scale}}`, a
      weight of this layer, starting at ``init_scale``;
    - ``"per-pixel"``: the decoder outputs twice the data's last axis, the means then raw
      scales :math:`r`, :math:`\sigma = \mathrm{softplus}(r) + \text{min\_scale}`.

    These are vaelab's ``gaussian`` likelihood and its parameterisations exactly
    (``init_scale`` 1 and ``min_scale`` 1e-3 by default), so :func:`to_vaelab` carries a
    learned scale over. The check accepts any finite data.
    """

    family = "gaussian"

    def __init__(self, scale: float | str = "learned", init_scale: float | None = None,
                 min_scale: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        from . import likelihoods

        family = likelihoods.get("gaussian", scale=scale, init_scale=init_scale,
                                 min_scale=min_scale)  # checks the options
        self._options = family.config()
        self.scale = family.scale
        self.init_scale = family.init_scale
        self.min_scale = family.min_scale
        self.log_scale = None
        if self.scale == "learned":
            start = math.log(self.init_scale - self.min_scale)
            self.log_scale = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(start), name="log_scale")

    def _mean_log_sigma(self, outputs: Any, x: Any) -> tuple[Any, Any]:
        outputs = _float(outputs)
        if isinstance(self.scale, float):
            return outputs, math.log(self.scale)
        if self.scale == "learned":
            log_s = ops.cast(self.log_scale, outputs.dtype)
            if self.min_scale > 0:
                log_s = ops.logaddexp(log_s, math.log(self.min_scale))
            return outputs, log_s
        channels = _shape(x)[-1]
        if _shape(outputs)[-1] != 2 * channels:
            raise DataError(f"Gaussian(scale='per-pixel') needs the decoder's last axis to "
                            f"hold means then raw scales, 2 x {channels}, got outputs "
                            f"{_shape_text(_shape(outputs))} for x {_shape_text(_shape(x))}")
        mean, raw = outputs[..., :channels], outputs[..., channels:]
        return mean, ops.log(ops.softplus(raw) + self.min_scale)

    def log_prob(self, x: Any, outputs: Any) -> Any:
        mean, log_sigma = self._mean_log_sigma(outputs, x)
        return gaussian_log_likelihood(x, mean, log_sigma=log_sigma)

    def sigma(self) -> float | None:
        """The fixed or learned sigma now (None per pixel)."""
        if isinstance(self.scale, float):
            return self.scale
        if self.scale == "learned":
            return self.min_scale + math.exp(float(ops.convert_to_numpy(self.log_scale)))
        return None

    def check(self, x: Any) -> None:
        values = np.asarray(x)
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"Gaussian got {int(bad.sum())} NaN/Inf values, e.g. "
                            f"{values[bad].flat[0]}: fix the data pipeline (look for a "
                            "division by zero) before computing likelihoods")

    def vaelab_family(self) -> Any:
        import torch

        from . import likelihoods

        family = likelihoods.get("gaussian", **self._options)
        if self.scale == "learned":
            with torch.no_grad():
                family.log_scale.fill_(float(ops.convert_to_numpy(self.log_scale)))
        return family

    def get_config(self) -> dict[str, Any]:
        scale = self.scale if isinstance(self.scale, str) else float(self.scale)
        return {**super().get_config(), "scale": scale, "init_scale": self.init_scale,
                "min_scale": self.min_scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Sampling(keras.layers.Layer):
    r""":math:`z = \mu + e^{\log\sigma^2 / 2} \epsilon`, :math:`\epsilon \sim N(0, I)`: the
    reparameterisation trick (the Keras example's ``sampling``), seeded by ``seed``.

    Called on ``[z_mean, z_log_var]`` ``(B, L)`` each; returns ``z (B, L)``.
    """

    def __init__(self, seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any) -> Any:
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), dtype=z_mean.dtype,
                                  seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


# --------------------------------------------------------------------------- metrics


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerExampleMean(keras.metrics.Mean):
    """The mean of per-example values over every example seen: their sum / their number.

    ``update_state(values)`` takes one value per example, ``(B,)``, so a last, smaller batch
    counts for its own examples only (a mean of batch means would weigh each of its examples
    more). A scalar (a batch mean already) is refused.
    """

    def update_state(self, values: Any, sample_weight: Any = None) -> Any:
        if len(_shape(values)) != 1:
            raise DataError(
                f"metric {self.name!r} got values shaped {_shape_text(_shape(values))}: pass "
                "one value per example, (B,), not a batch mean or an unreduced tensor")
        return super().update_state(values, sample_weight=sample_weight)


# --------------------------------------------------------------------------- the loss


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ELBOLoss(keras.layers.Layer):
    r"""Adds the VAE's loss to the model and logs the NELBO, in nats per example.

    Called on ``[x, outputs, z_mean, z_log_var]`` (data, decoder output, encoder's means and
    log-variances), it returns ``outputs`` unchanged and ``add_loss``\ es the batch mean of
    the per-example objective

    .. math:: -\log p(x|z) + w\,KL(q(z|x) \| p(z)),\qquad
              w = \beta \min(1, \text{step} / \text{warmup\_steps})

    (``step``: training steps done so far, counted by the layer; vaelab's
    :func:`~vaelab.objectives.kl_weight`). Its metrics ``nelbo``, ``recon`` and ``kl``
    (:class:`PerExampleMean`, beta = 1) appear in ``fit``'s logs, with ``val_`` for the
    validation data. Compile the model with an optimizer and no loss.

    On the JAX backend a layer cannot update metrics inside a training step (Keras runs
    the forward pass stateless): there, use :class:`ELBOMixin`, or ``metrics=False``.

    Args:
        likelihood: :class:`Bernoulli` or :class:`Gaussian`.
        beta: the KL weight of the objective (1: the ELBO).
        warmup_steps: linear KL warm-up from 0 to ``beta`` over this many training steps.
        metrics: log ``nelbo``, ``recon`` and ``kl``.

    Raises:
        ConfigError: a negative beta or warm-up, or not a vaelab.keras likelihood.
    """

    def __init__(self, likelihood: Likelihood, beta: float = 1.0, warmup_steps: int = 0,
                 metrics: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        _check_likelihood(likelihood)
        self.likelihood = likelihood
        self.beta, self.warmup_steps = _check_weight(beta, warmup_steps)
        self.track_metrics = bool(metrics)
        self.step = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                    name="step", dtype="float32")
        self.built = True  # no lazily created state
        if self.track_metrics:
            self.nelbo_metric = PerExampleMean(name="nelbo")
            self.recon_metric = PerExampleMean(name="recon")
            self.kl_metric = PerExampleMean(name="kl")
        self._data_checked = False

    def kl_weight(self) -> Any:
        """The KL weight of the next training step (a scalar tensor)."""
        if not self.warmup_steps:
            return ops.convert_to_tensor(self.beta)
        return self.beta * ops.minimum(1.0, self.step / float(self.warmup_steps))

    def objective(self, x: Any, outputs: Any, z_mean: Any, z_log_var: Any,
                  training: bool | None = None) -> Any:
        """The batch mean of the per-example objective (a scalar), updating the metrics
        (and, when ``training``, the step count)."""
        if not self._data_checked:
            values = _concrete(x)
            if values is not None:
                self.likelihood.check(values)
                self._data_checked = True
        terms = nelbo_terms(x, outputs, z_mean, z_log_var, self.likelihood)
        if self.track_metrics:
            self.nelbo_metric.update_state(terms.nelbo)
            self.recon_metric.update_state(terms.recon)
            self.kl_metric.update_state(terms.kl)
        weight = ops.cast(self.kl_weight(), terms.kl.dtype)
        loss = ops.mean(terms.recon + weight * terms.kl)
        if training and self.warmup_steps:
            self.step.assign_add(1.0)
        return loss

    def call(self, inputs: Sequence[Any], training: bool | None = None) -> Any:
        if len(inputs) != 4:
            raise ConfigError(f"ELBOLoss is called on [x, outputs, z_mean, z_log_var], got "
                              f"{len(inputs)} tensors")
        if self.track_metrics and keras.backend.backend() == "jax":
            raise ConfigError(
                "ELBOLoss cannot update metrics inside a JAX training step (Keras runs the "
                "forward pass stateless): use vaelab.keras.ELBOMixin (the model outputs "
                "[outputs, z_mean, z_log_var]) or ELBOLoss(..., metrics=False)")
        x, outputs, z_mean, z_log_var = inputs
        self.add_loss(self.objective(x, outputs, z_mean, z_log_var, training))
        return outputs

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[1]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta, "warmup_steps": self.warmup_steps,
                "metrics": self.track_metrics,
                "likelihood": keras.saving.serialize_keras_object(self.likelihood)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ELBOLoss:
        config = dict(config)
        config["likelihood"] = keras.saving.deserialize_keras_object(config["likelihood"])
        return cls(**config)


class ELBOMixin:
    r"""The VAE's loss and metrics for a Keras model whose outputs are
    ``(outputs, z_mean, z_log_var)``: put it before ``keras.Model``.

    It overrides ``compute_loss``, which the ``train_step`` and ``test_step`` of every
    backend call (``GradientTape``, ``loss.backward()`` and ``jax.grad`` stay Keras'), so
    the model trains with the :class:`ELBOLoss` objective on torch, JAX and TensorFlow,
    and logs ``nelbo``, ``recon`` and ``kl`` in nats per example. Works for a subclassed
    model (``call`` returns the three tensors) and a functional one::

        class VAE(ELBOMixin, keras.Model):
            pass

        vae = VAE(inputs, [outputs, z_mean, z_log_var], likelihood=Bernoulli())
        vae.compile(optimizer="adam")          # no loss: the NELBO is the loss

    Keyword args: ``likelihood``, ``beta``, ``warmup_steps`` (as :class:`ELBOLoss`); the
    rest go to ``keras.Model``. Losses added by layers (regularizers) are added too.

    Raises:
        ConfigError: a loss given to ``compile`` or sample weights given to ``fit``.
    """

    def __init__(self, *args: Any, likelihood: Likelihood, beta: float = 1.0,
                 warmup_steps: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.elbo = ELBOLoss(likelihood, beta, warmup_steps, name="elbo")

    @property
    def likelihood(self) -> Likelihood:
        """The :class:`Likelihood` of the objective."""
        return self.elbo.likelihood

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None,
                     sample_weight: Any = None, training: bool = True) -> Any:
        if sample_weight is not None:
            raise ConfigError("ELBOMixin got sample weights: the NELBO weighs every example "
                              "once; fit without sample_weight / class_weight")
        if getattr(self, "_compile_loss", None) is not None:
            raise ConfigError("the model was compiled with a loss: ELBOMixin's loss is the "
                              "NELBO; compile(optimizer=...) without loss=")
        if isinstance(y_pred, dict):
            y_pred = [y_pred.get(k) for k in ("outputs", "z_mean", "z_log_var")]
        if not isinstance(y_pred, (list, tuple)) or len(y_pred) != 3:
            raise ConfigError("an ELBOMixin model returns (outputs, z_mean, z_log_var), got "
                              f"{type(y_pred).__name__}: return the three tensors from call")
        outputs, z_mean, z_log_var = y_pred
        loss = self.elbo.objective(x, outputs, z_mean, z_log_var, training)
        for extra in self.losses:
            loss = loss + ops.cast(ops.sum(extra), loss.dtype)
        return loss


# --------------------------------------------------------------------------- the NLL


@dataclass(frozen=True)
class NLLEstimate:
    r"""Importance-sampled :math:`-\log p(x)`, per example and over the examples.

    Attributes:
        nll: ``(N,)`` float64 :math:`-\log \hat p(x)` per example, nats.
        mean: ``nll.sum() / N``.
        stderr: standard error of ``mean`` over examples, ``std(nll, ddof=1) / sqrt(N)``;
            it excludes the Monte-Carlo error of each estimate (``mc_stderr``).
        mc_stderr: ``(N,)`` delta-method Monte-Carlo standard error of each value (vaelab's
            :class:`~vaelab.objectives.LogLikelihood`); unreliable for heavy-tailed weights.
        ess: ``(N,)`` effective sample size of each example's weights, in [1, K].
        num_samples: K, importance samples per example.
    """

    nll: np.ndarray
    mean: float
    stderr: float
    mc_stderr: np.ndarray
    ess: np.ndarray
    num_samples: int

    @property
    def num_examples(self) -> int:
        return int(self.nll.shape[0])

    def __str__(self) -> str:
        return (f"NLL {self.mean:.2f} +- {self.stderr:.2f} nats per example (importance "
                f"sampling, K = {self.num_samples}, {self.num_examples} examples)")


def _run(model: Callable[..., Any], x: Any) -> Any:
    """``model(x, training=False)`` for a Keras model or layer, ``model(x)`` for a function."""
    if isinstance(model, keras.layers.Layer):
        return model(x, training=False)
    return model(x)


def _encode(encoder: Callable[..., Any], x: Any) -> tuple[Any, Any]:
    out = _run(encoder, x)
    if isinstance(out, dict):
        out = [out.get("z_mean"), out.get("z_log_var")]
    if not isinstance(out, (list, tuple)) or len(out) < 2:
        raise ConfigError("the encoder must return (z_mean, z_log_var[, z]), got "
                          f"{type(out).__name__}: build it as keras.Model(inputs, [z_mean, "
                          "z_log_var, z])")
    return out[0], out[1]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _log_weights(encoder, decoder, likelihood, x, count: int, seed) -> Any:
    """``(count, B)`` log importance weights for one batch ``x``, in keras.ops."""
    z_mean, z_log_var = _encode(encoder, x)
    batch, latent = _shape(z_mean)
    eps = keras.random.normal((count, batch, latent), dtype=z_mean.dtype, seed=seed)
    z = ops.expand_dims(z_mean, 0) + ops.expand_dims(ops.exp(0.5 * z_log_var), 0) * eps
    outputs = _run(decoder, ops.reshape(z, (count * batch, latent)))
    x_rep = ops.reshape(ops.broadcast_to(ops.expand_dims(x, 0), (count, *_shape(x))),
                        (count * batch, *_shape(x)[1:]))
    log_px = ops.reshape(likelihood.log_prob(x_rep, outputs), (count, batch))
    log_pz = -0.5 * ops.sum(ops.square(z), axis=-1)
    log_qz = (-0.5 * ops.sum(ops.square(eps), axis=-1)
              - 0.5 * ops.expand_dims(ops.sum(z_log_var, axis=-1), 0))
    return log_px + ops.cast(log_pz - log_qz, log_px.dtype)  # the 2 pi terms cancel


def importance_sampled_nll(encoder: Callable[..., Any], decoder: Callable[..., Any], x: Any,
                           num_samples: int = 1000, *, likelihood: Likelihood,
                           batch_size: int = 100, decoded_per_chunk: int = 4096,
                           seed: int = 0) -> NLLEstimate:
    r""":math:`-\log p(x)` by importance sampling with :math:`q(z|x)` as the proposal (Burda
    et al. 2016), per example, with its mean and standard error over the examples.

    .. math::
        -\log \hat p(x) = -\operatorname{logsumexp}_{k=1}^{K}
            \big[\log p(x|z_k) + \log p(z_k) - \log q(z_k|x)\big] + \log K,
        \qquad z_k \sim q(z|x)

    (vaelab's :func:`~vaelab.objectives.log_likelihood` in ``keras.ops``; biased high for
    finite K, converging as K grows.) The weights of each chunk are computed by the backend
    in the model's dtype; their log-sum-exp is accumulated in float64.

    Args:
        encoder: ``x -> (z_mean, z_log_var[, z])`` (the Keras example's encoder).
        decoder: ``z (N, L) -> outputs`` the likelihood reads.
        x: ``(N, *event_shape)`` data (a NumPy array or a tensor).
        num_samples: K >= 1.
        likelihood: the :class:`Bernoulli` or :class:`Gaussian` the model was trained with
            (the same object, for a learned scale).
        batch_size: examples per encoder call.
        decoded_per_chunk: at most this many decoder rows (samples x examples) at a time.
        seed: seed of the draws (``keras.random.SeedGenerator``).

    Returns:
        :class:`NLLEstimate`.

    Raises:
        ConfigError: bad counts or an unnormalised likelihood (BCE on grey levels has no
            NLL); DataError: data the likelihood does not accept (``likelihood.check``).
    """
    _check_likelihood(likelihood)
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    decoded_per_chunk = _positive_int("decoded_per_chunk", decoded_per_chunk)
    if not likelihood.normalized:
        raise ConfigError("Bernoulli(unnormalized=True) is BCE on grey levels, not a "
                          "likelihood, so it has no NLL: binarise the data and train with "
                          "Bernoulli(), or use a Gaussian")
    data = _concrete(x)
    if data is None:
        raise DataError("importance_sampled_nll needs data with values (a NumPy array or an "
                        "eager tensor), not a symbolic tensor")
    _rank_at_least_two("x", data)
    likelihood.check(data)
    generator = keras.random.SeedGenerator(seed)
    dtype = keras.backend.floatx()
    log_sum_w, log_sum_w2 = [], []
    for start in range(0, data.shape[0], batch_size):
        xb = ops.convert_to_tensor(data[start:start + batch_size].astype(dtype))
        batch = int(_shape(xb)[0])
        per_chunk = max(1, decoded_per_chunk // batch)
        lse = np.full(batch, -np.inf)
        lse2 = np.full(batch, -np.inf)
        for done in range(0, num_samples, per_chunk):
            count = min(per_chunk, num_samples - done)
            log_w = np.asarray(ops.convert_to_numpy(
                _log_weights(encoder, decoder, likelihood, xb, count, generator)), np.float64)
            lse = np.logaddexp(lse, _logsumexp(log_w))
            lse2 = np.logaddexp(lse2, _logsumexp(2.0 * log_w))
        log_sum_w.append(lse)
        log_sum_w2.append(lse2)
    lse, lse2 = np.concatenate(log_sum_w), np.concatenate(log_sum_w2)
    nll = -(lse - math.log(num_samples))
    count = nll.shape[0]
    if not np.all(np.isfinite(nll)):
        bad = int((~np.isfinite(nll)).sum())
        raise DataError(f"{bad} examples got a non-finite NLL: the decoder's outputs or the "
                        "encoder's log-variances overflowed; check the model on those examples")
    stderr = float(nll.std(ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    ratio = np.exp(lse2 - 2.0 * lse)  # sum w^2 / (sum w)^2, in [1/K, 1]
    if num_samples > 1:
        mc = np.sqrt(np.maximum(num_samples * ratio - 1.0, 0.0) / (num_samples - 1))
    else:
        mc = np.full(count, math.nan)
    return NLLEstimate(nll=nll, mean=float(nll.sum() / count), stderr=stderr, mc_stderr=mc,
                       ess=1.0 / ratio, num_samples=num_samples)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """Log-sum-exp over axis 0, float64."""
    top = values.max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(np.exp(values - top).sum(axis=0))


class ImportanceSampledNLL(keras.callbacks.Callback):
    """Reports :func:`importance_sampled_nll` on ``x`` when training ends.

    The estimate is kept in :attr:`result` (an :class:`NLLEstimate`) and its line printed
    with ``print_fn`` (default :func:`print`): ``NLL m +- s nats per example (...)``.

    Args:
        x: the examples to estimate (e.g. the test set).
        encoder, decoder, likelihood, num_samples, batch_size, seed: as
            :func:`importance_sampled_nll`; ``encoder`` and ``decoder`` default to the
            model's attributes of those names, ``likelihood`` to the model's (an
            :class:`ELBOMixin` model has one).
    """

    def __init__(self, x: Any, *, encoder: Any = None, decoder: Any = None,
                 likelihood: Likelihood | None = None, num_samples: int = 1000,
                 batch_size: int = 100, seed: int = 0,
                 print_fn: Callable[[str], Any] | None = print):
        super().__init__()
        self.x = x
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.num_samples = _positive_int("num_samples", num_samples)
        self.batch_size, self.seed, self.print_fn = batch_size, seed, print_fn
        self.result: NLLEstimate | None = None

    def _part(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            value = getattr(self.model, name, None)
        if value is None:
            raise ConfigError(f"ImportanceSampledNLL has no {name}: pass {name}=... (the "
                              f"model has no attribute {name!r})")
        return value

    def on_train_end(self, logs: dict | None = None) -> None:
        self.result = importance_sampled_nll(
            self._part("encoder"), self._part("decoder"), self.x, self.num_samples,
            likelihood=self._part("likelihood"), batch_size=self.batch_size, seed=self.seed)
        if self.print_fn is not None:
            self.print_fn(str(self.result))


# --------------------------------------------------------------------------- to vaelab

#: Keras activation names -> vaelab's (:data:`vaelab.models.ACTIVATIONS`), where both
#: compute the same function (Keras' leaky_relu has slope 0.2, torch's 0.01: not listed).
ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "elu": "elu", "gelu": "gelu", "silu": "silu",
               "swish": "silu", "softplus": "softplus"}


def _activation_name(layer: Any) -> str:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", str(fn))


def _dense_chain(tensor: Any, what: str) -> list[Any]:
    """The Dense layers from the model's input to ``tensor``, in order; only Dense,
    Flatten and the input may be on the way."""
    chain = []
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise ConfigError(f"the {what} is not a functional Keras model: build it with "
                              "keras.Model(inputs, outputs) so vaelab can read its layers")
        layer = history.operation
        kind = type(layer).__name__
        if kind == "InputLayer" or layer is None:
            return chain[::-1]
        if kind == "Dense":
            chain.append(layer)
        elif kind != "Flatten":
            raise ConfigError(f"the {what} has a {kind} layer ({layer.name}): vaelab's MLP "
                              "reads Dense layers (and a Flatten after the input) only")
        node = layer._inbound_nodes[history.node_index]
        inputs = node.input_tensors
        if len(inputs) != 1:
            raise ConfigError(f"the {what}'s layer {layer.name} takes {len(inputs)} inputs: "
                              "vaelab's MLP is a chain of Dense layers")
        tensor = inputs[0]


def _kernel(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """A Dense layer's ``(weight (out, in), bias (out,))`` as nn.Linear holds them."""
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel), np.float32)
    if layer.bias is not None:
        bias = np.asarray(ops.convert_to_numpy(layer.bias), np.float32)
    else:
        bias = np.zeros(kernel.shape[1], np.float32)
    return kernel.T.copy(), bias


def _hidden_activation(layers_: list[Any], what: str, found: set[str]) -> None:
    for layer in layers_:
        name = _activation_name(layer)
        if name not in ACTIVATIONS:
            raise ConfigError(f"the {what}'s layer {layer.name} has activation {name!r}: "
                              f"vaelab's MLP takes one of {', '.join(sorted(ACTIVATIONS))}")
        found.add(ACTIVATIONS[name])


def _event_shape(encoder: Any, event_shape: Sequence[int] | None, dims: int) -> tuple:
    if event_shape is not None:
        shape = tuple(int(s) for s in event_shape)
        if math.prod(shape) != dims:
            raise ConfigError(f"event_shape {shape} has {math.prod(shape)} values but the "
                              f"encoder reads {dims}: give the shape of one example")
        return shape
    keras_shape = tuple(encoder.inputs[0].shape[1:])
    if len(keras_shape) == 1:
        return keras_shape
    if len(keras_shape) == 2 or (len(keras_shape) == 3 and keras_shape[-1] == 1):
        return (1, *keras_shape[:2])  # channels-last grey images: the same flat order
    raise ConfigError(f"the encoder reads examples shaped {keras_shape}: vaelab's MLP reads "
                      "flat or one-channel images; pass event_shape=(1, H, W) or flatten")


def to_vaelab(encoder: Any, decoder: Any, likelihood: Likelihood, *,
              event_shape: Sequence[int] | None = None) -> Any:
    r"""A :class:`vaelab.models.VAE` (eval mode) computing what the Keras model computes.

    The Keras model is an MLP VAE as the Keras example builds it: the encoder a functional
    model ``x -> Dense... -> (z_mean = Dense(L), z_log_var = Dense(L)[, z])``, the decoder
    ``z -> Dense... -> Dense(out)`` with the encoder's hidden sizes reversed, one hidden
    activation (:data:`ACTIVATIONS`), and a last activation that fits the likelihood
    (sigmoid for ``Bernoulli(output="probs")``, none otherwise). vaelab's MLP is built with
    those sizes, ``encoder_scale = "exp"`` (:math:`\sigma = e^{\log\sigma^2/2}`, the
    log-variance clamped to [-30, 30]) and the likelihood's vaelab twin, and the Keras
    weights are copied (kernels transposed; the two heads stacked into vaelab's one
    ``Linear(H, 2 L)``, means first). Both models are then run on the same random inputs:
    a difference above 1e-4 is an error, so an unsupported model is never converted
    silently.

    Args:
        encoder, decoder: the Keras sub-models.
        likelihood: the :class:`Bernoulli` or :class:`Gaussian` it was trained with.
        event_shape: one example's shape for vaelab (e.g. ``(1, 28, 28)`` for flat MNIST);
            default: the encoder's input shape, ``(1, H, W)`` for grey images.

    Returns:
        The :class:`vaelab.models.VAE`, on the CPU, in eval mode.

    Raises:
        ConfigError: a model vaelab's MLP does not express (the message says what).
    """
    return _convert(encoder, decoder, likelihood, event_shape)[0]


def _convert(encoder: Any, decoder: Any, likelihood: Likelihood,
             event_shape: Sequence[int] | None) -> tuple[Any, str, tuple[int, ...]]:
    """:func:`to_vaelab`: ``(model, activation, hidden sizes)``."""
    import torch

    from .models import build_model

    _check_likelihood(likelihood)
    outputs = list(getattr(encoder, "outputs", None) or [])
    if len(outputs) < 2:
        raise ConfigError("the encoder must be a functional keras.Model with outputs "
                          "[z_mean, z_log_var(, z)]")
    mean_chain = _dense_chain(outputs[0], "encoder")
    var_chain = _dense_chain(outputs[1], "encoder")
    if len(mean_chain) < 1 or mean_chain[:-1] != var_chain[:-1] or len(var_chain) < 1:
        raise ConfigError("the encoder's z_mean and z_log_var must be two Dense heads on the "
                          "same hidden layers")
    enc_hidden, head_mean, head_var = mean_chain[:-1], mean_chain[-1], var_chain[-1]
    dec_chain = _dense_chain((getattr(decoder, "outputs", None) or [None])[0], "decoder")
    dec_hidden, dec_out = dec_chain[:-1], dec_chain[-1]
    hidden = tuple(int(layer.units) for layer in enc_hidden)
    if tuple(int(layer.units) for layer in dec_hidden) != hidden[::-1]:
        raise ConfigError(
            f"the decoder's hidden sizes {[int(la.units) for la in dec_hidden]} are not the "
            f"encoder's {list(hidden)} reversed: vaelab's MLP decoder mirrors its encoder")
    activations: set[str] = set()
    _hidden_activation(enc_hidden + dec_hidden, "model", activations)
    if len(activations) > 1:
        raise ConfigError(f"the hidden layers use {sorted(activations)}: vaelab's MLP uses "
                          "one activation for all of them")
    for head in (head_mean, head_var):
        if _activation_name(head) != "linear":
            raise ConfigError(f"the encoder head {head.name} has activation "
                              f"{_activation_name(head)!r}: z_mean and z_log_var need none")
    last = _activation_name(dec_out)
    probs = not getattr(likelihood, "from_logits", True)
    wanted = "sigmoid" if probs else "linear"
    if last != wanted:
        raise ConfigError(f"the decoder's last layer has activation {last!r} but "
                          f"{type(likelihood).__name__} reads {wanted} outputs: match the "
                          "likelihood to the decoder (Bernoulli(output='probs') for a sigmoid)")
    latent = int(head_mean.units)
    dims = int(enc_hidden[0].kernel.shape[0] if enc_hidden else head_mean.kernel.shape[0])
    shape = _event_shape(encoder, event_shape, dims)
    family = likelihood.vaelab_family()
    activation = activations.pop() if activations else "relu"  # no hidden layer: unused
    model = build_model("mlp", shape, latent, family, activation=activation,
                        encoder_scale="exp", hidden=hidden)
    enc_linear = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    dec_linear = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    pairs = [(lin, _kernel(layer)) for lin, layer in zip(enc_linear[:-1], enc_hidden)]
    (wm, bm), (wv, bv) = _kernel(head_mean), _kernel(head_var)
    pairs.append((enc_linear[-1], (np.concatenate([wm, wv]), np.concatenate([bm, bv]))))
    pairs += [(lin, _kernel(layer)) for lin, layer in zip(dec_linear, dec_chain)]
    with torch.no_grad():
        for linear, (weight, bias) in pairs:
            if tuple(linear.weight.shape) != weight.shape:
                raise ConfigError(f"a Dense kernel of shape {weight.shape[::-1]} does not fit "
                                  f"vaelab's layer {tuple(linear.weight.shape)[::-1]}: the "
                                  "model is not a plain MLP chain")
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
    model.eval()
    _compare(encoder, decoder, model, likelihood, latent)
    return model, activation, hidden


def _compare(encoder: Any, decoder: Any, model: Any, likelihood: Likelihood,
             latent: int) -> None:
    """Run both models on the same random inputs; raise if they differ."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.random((4, *tuple(encoder.inputs[0].shape[1:]))).astype(np.float32)
    z = rng.standard_normal((4, latent)).astype(np.float32)
    z_mean, z_log_var = (np.asarray(ops.convert_to_numpy(t)) for t in _encode(encoder, x))
    keras_out = np.asarray(ops.convert_to_numpy(_run(decoder, z)))
    with torch.no_grad():
        raw = model.encoder(torch.from_numpy(x.reshape(4, *model.event_shape))).numpy()
        params = model.decoder(torch.from_numpy(z))
        if not getattr(likelihood, "from_logits", True):
            params = torch.sigmoid(params)
        params = params.reshape(4, -1).numpy()
    found = {"z_mean": (z_mean, raw[:, :latent]), "z_log_var": (z_log_var, raw[:, latent:]),
             "decoder output": (keras_out.reshape(4, -1), params)}
    for name, (ours, theirs) in found.items():
        gap = float(np.max(np.abs(ours - theirs)))
        if not gap <= 1e-4 * (1.0 + float(np.max(np.abs(ours)))):
            raise ConfigError(f"vaelab's MLP does not reproduce the Keras model's {name} "
                              f"(largest difference {gap:.3g}): the model has parts vaelab's "
                              "MLP does not express; use it in Keras only")


def save_run(encoder: Any, decoder: Any, likelihood: Likelihood, run_dir: str | Path, *,
             data: dict[str, Any], event_shape: Sequence[int] | None = None,
             history: Any = None, validation_split: str = "validation",
             seed: int = 0) -> Path:
    """Write the Keras model as a vaelab run directory that ``vaelab eval``, ``vaelab plot``
    and :func:`vaelab.runs.open_run` open.

    The directory holds what ``vaelab train`` writes for a run: ``config.toml`` (the MLP of
    :func:`to_vaelab`, the likelihood, ``data`` and ``train.select = "last"``),
    ``checkpoints/best`` (the weights; its meta records ``trained_with``: Keras, its
    version and backend) and, from ``history`` (what ``fit`` returned), ``metrics.jsonl``
    with ``train_nelbo``/``train_recon``/``train_kl`` and ``val_*`` per epoch. There is no
    ``last`` checkpoint (no optimizer state): it cannot be resumed with ``vaelab train``.

    Args:
        encoder, decoder, likelihood, event_shape: as :func:`to_vaelab`.
        run_dir: the directory (created; an existing ``checkpoints/best`` is refused).
        data: the run's ``[data]`` section: where ``vaelab eval`` finds the examples, e.g.
            ``{"dataset": "mnist", "binarize": "static"}`` (the data the model was trained
            on, binarised as it was; ``validation_size`` defaults to 0).
        history: ``fit``'s :class:`keras.callbacks.History` (or its ``.history`` dict).
        validation_split: what ``fit``'s ``validation_data`` was: ``"validation"`` (held-out
            training data) or ``"test"`` (the test set, as in the Keras example); its
            ``val_*`` logs become ``val_*`` or ``test_*`` rows (vaelab's
            ``train.validation_split``).
        seed: the run's ``train.seed`` (static binarisation and splits are drawn from it).

    Returns:
        ``run_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: the model (:func:`to_vaelab`) or ``data`` is not valid;
            CheckpointError: the directory already holds a run.
    """
    from . import checkpoint, config
    from ._io import atomic_write_text

    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "best.json").exists():
        raise CheckpointError(f"{run_dir} already holds a run: choose a new directory")
    if not isinstance(data, dict) or "dataset" not in data:
        raise ConfigError("save_run needs data={'dataset': ...}: the dataset (a name or a "
                          "file) vaelab evaluates the model on, as it was binarised")
    model, activation, hidden = _convert(encoder, decoder, likelihood, event_shape)
    if validation_split not in config.VALIDATION_SPLITS:
        raise ConfigError(f"validation_split must be one of "
                          f"{', '.join(config.VALIDATION_SPLITS)}, got {validation_split!r}")
    records = _history_records(history, "test" if validation_split == "test" else "val")
    family = likelihood.vaelab_family()
    raw = {
        "data": {"validation_size": 0, **{k: v for k, v in data.items() if v is not None}},
        "likelihood": {"name": family.name, family.name: family.config()},
        "model": {"kind": "mlp", "latent_dim": model.latent_dim,
                  "activation": activation, "encoder_scale": "exp",
                  "init": "glorot", "output_bias": "none", "mlp": {"hidden": list(hidden)}},
        "train": {"select": "last", "seed": int(seed), "validation_split": validation_split,
                  "epochs": max(1, len(records))},
    }
    cfg = config.from_dict(raw)
    meta = {"config": config.to_dict(cfg), "event_shape": list(model.event_shape),
            "train_state": {"epoch": len(records) or None},
            "trained_with": {"framework": "keras", "keras_version": keras.__version__,
                             "backend": keras.backend.backend()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", (
        f"# Weights trained by Keras {keras.__version__} ({keras.backend.backend()} backend) "
        "and written by vaelab.keras.save_run:\n# [model], [likelihood] and [data] describe "
        "them; [train] is vaelab's default, not how Keras trained them.\n"
        + config.to_toml(cfg)))
    if records:
        atomic_write_text(run_dir / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in records))
    checkpoint.save_checkpoint(run_dir / "checkpoints" / "best", model=model, meta=meta)
    return run_dir


def _history_records(history: Any, prefix: str) -> list[dict[str, Any]]:
    """Keras' per-epoch logs as vaelab's ``metrics.jsonl`` rows (``val_*`` logs as
    ``{prefix}_*``)."""
    if history is None:
        return []
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict):
        raise ConfigError("history must be what fit returned (a History) or its .history dict")
    epochs = max((len(v) for v in logs.values()), default=0)
    names = {"loss": "train_objective", "nelbo": "train_nelbo", "recon": "train_recon",
             "kl": "train_kl", "val_nelbo": f"{prefix}_nelbo", "val_recon": f"{prefix}_recon",
             "val_kl": f"{prefix}_kl"}
    rows = []
    for epoch in range(epochs):
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key, name in names.items():
            values = logs.get(key)
            if values is not None and epoch < len(values):
                row[name] = float(values[epoch])
        rows.append(row)
    return rows
