r"""The VAE module: q(z|x) from an encoder, p(z) standard normal, p(x|z) from a family.

The model returns distributions, so the ELBO is one line (Kingma & Welling 2014)::

    qz = model.encode(x); z = qz.rsample()
    elbo = model.decode(z).log_prob(x) - kl_divergence(qz, model.prior(x.device))

Encoder scale. The encoder outputs ``2 L`` numbers per example: a location and
a raw scale ``r``. The default parameterisation is

.. math:: \sigma = \operatorname{softplus}(r) + 10^{-6},

which cannot overflow (softplus grows linearly), has a bounded gradient, and
keeps :math:`\log\sigma \ge \log 10^{-6}` finite. ``encoder_scale="exp"`` gives
the common log-variance form :math:`\sigma = \exp(r / 2)` with ``r`` clamped to
[-30, 30], as in PyTorch's ``examples/vae`` (for reproducing it exactly).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from .. import likelihoods
from ..errors import ConfigError, DataError
from ..options import boolean, build, non_negative, option, positive_sizes
from ..posteriors import FlowPosterior, NoFlow, build_flow
from ..priors import Prior, StandardNormal, build_prior
from ..registry import Registry
from .conv import ConvDecoder, ConvEncoder
from .init import INITS, initialise
from .mlp import MLPDecoder, MLPEncoder, check_sizes, make_activation

__all__ = ["MODELS", "ENCODER_SCALES", "VAE", "MLPOptions", "ConvOptions", "build_model",
           "from_config", "build_from_config", "num_parameters"]

MIN_SCALE = 1e-6
"""Smallest encoder standard deviation with the softplus parameterisation."""

ENCODER_SCALES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("encoder scale")


@ENCODER_SCALES.register("softplus")
def _softplus_scale(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw) + MIN_SCALE


@ENCODER_SCALES.register("exp")
def _exp_scale(raw: torch.Tensor) -> torch.Tensor:
    # hardtanh is clamp with a one-kernel backward (clamp's takes five small ops)
    return torch.exp(0.5 * F.hardtanh(raw, -30.0, 30.0))


@ENCODER_SCALES.register("logvar-hardtanh")
def _bounded_logvar_scale(raw: torch.Tensor) -> torch.Tensor:
    # Tomczak & Welling's VampPrior encoder: log-variance through Hardtanh(-6, 2)
    return torch.exp(0.5 * F.hardtanh(raw, -6.0, 2.0))


def _shape_str(shape: Sequence[int]) -> str:
    return "(B, " + ", ".join(str(s) for s in shape) + ")"


class VAE(nn.Module):
    """A VAE whose methods return ``torch.distributions`` objects.

    Args:
        encoder: module mapping ``x (B, *event_shape)`` floats to ``(B, 2 L)``.
        decoder: module mapping ``z (N, L)`` to ``(N, P * C, *rest)``, with
            ``set_output_bias(bias)``.
        likelihood: the observation family (a registered submodule, so a learned
            scale is in ``model.parameters()``).
        latent_dim: ``L``.
        event_shape: shape of one example, e.g. ``(1, 28, 28)``.
        encoder_scale: a name in :data:`ENCODER_SCALES`; see the module docstring.
        prior: the prior module (:mod:`vaelab.priors`); default :math:`N(0, I)`.
        flow: the posterior flow (:mod:`vaelab.posteriors`); default none: q(z|x) is the
            diagonal Gaussian. With one, the encoder outputs ``(B, 2 L + P)``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        event_shape: tuple[int, ...],
        encoder_scale: str = "softplus",
        prior: Prior | None = None,
        flow: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.encoder_scale = encoder_scale
        self._scale = ENCODER_SCALES[encoder_scale]
        self._uint8 = getattr(likelihood, "data_kind", None) == "uint8"
        self.prior_module = prior if prior is not None else StandardNormal(latent_dim, event_shape)
        self.flow = flow if flow is not None and not isinstance(flow, NoFlow) else None

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in data units -> floats for the encoder (uint8 data divided by 255)."""
        if tuple(x.shape[1:]) != self.event_shape or x.dim() != len(self.event_shape) + 1:
            raise DataError(
                f"the model expects x shaped {_shape_str(self.event_shape)}, got "
                f"{tuple(x.shape)}: use data of that shape or build the model for this data"
            )
        if self._uint8:
            return x.to(torch.get_default_dtype()) / 255.0
        if not x.is_floating_point():
            return x.to(torch.get_default_dtype())
        return x

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x): ``Independent(Normal(loc (B, L), scale (B, L)), 1)``, or with a flow a
        :class:`~vaelab.posteriors.FlowPosterior` (that Gaussian pushed through the flow
        with the parameters the encoder outputs for ``x``).

        Args:
            x: ``(B, *event_shape)`` in the likelihood's data units.

        Raises:
            DataError: ``x`` does not have the model's event shape.
        """
        loc, scale, params = self._encoded(self._float_input(x))
        if self.flow is not None:
            return FlowPosterior(loc, scale, self.flow, params)
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)

    def _encoded(self, inputs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder ``(loc (B, L), scale (B, L), flow parameters (B, P) or None)``."""
        out = self.encoder(inputs)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()  # under autocast: the KL and log q stay float32
        latent = self.latent_dim
        loc, raw = out[..., :latent], out[..., latent:2 * latent]
        params = out[..., 2 * latent:] if self.flow is not None else None
        return loc, self._scale(raw), params

    def _loc_scale(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder ``(loc (B, L), scale (B, L))`` of float inputs in [0, 1] units."""
        loc, scale, _ = self._encoded(inputs)
        return loc, scale

    def decode(self, z: torch.Tensor) -> Any:
        """p(x|z): the likelihood family's distribution for ``z (N, L)``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise DataError(
                f"decode expects z shaped (N, {self.latent_dim}), got {tuple(z.shape)}: "
                "flatten sample dimensions into N first"
            )
        params = self.decoder(z)
        if params.dtype in (torch.float16, torch.bfloat16):
            params = params.float()  # under autocast: log p(x|z) and its sums stay float32
        return self.likelihood(params)

    def prior(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Distribution:
        """p(z) over ``L`` dimensions from :attr:`prior_module` (:mod:`vaelab.priors`):
        ``Independent(Normal(0, 1), 1)`` for the default (its base ``Normal`` carries
        ``standard = True``: the short closed-form KL), a mixture for the others."""
        return self.prior_module.distribution(self._loc_scale, self.latent_dim, device,
                                              dtype or torch.get_default_dtype())

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """Start the decoder's output at the data mean.

        Args:
            pixel_mean: ``(C, *rest)`` per-sub-pixel mean of the training data in [0, 1];
                the family's ``output_bias`` turns it into ``(P * C, *rest)``.
        """
        if tuple(pixel_mean.shape) != self.event_shape:
            raise DataError(
                f"pixel_mean has shape {tuple(pixel_mean.shape)}, the model's event shape "
                f"is {self.event_shape}: compute it as images.float().mean(0) / 255"
            )
        if not hasattr(self.decoder, "set_output_bias"):
            raise ConfigError(
                f"the decoder {type(self.decoder).__name__} has no set_output_bias(bias): "
                "give it one or set model.output_bias = none"
            )
        ref = next(self.decoder.parameters())
        bias = self.likelihood.output_bias(pixel_mean.to(device=ref.device, dtype=ref.dtype))
        self.decoder.set_output_bias(bias.to(device=ref.device, dtype=ref.dtype))

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, event_shape={self.event_shape}, "
            f"encoder_scale={self.encoder_scale!r}"
        )


MODELS: Registry[Callable[..., tuple[nn.Module, nn.Module]]] = Registry("model")


def _channel_sizes(value: tuple[int, ...]) -> str | None:
    if not value:
        return "is empty: give at least one stage, e.g. 32,64"
    return positive_sizes(value)


@dataclass(frozen=True)
class MLPOptions:
    """``model.mlp``: a fully connected encoder and its mirror."""

    hidden: tuple[int, ...] = option((512, 256), positive_sizes,
                                     "hidden sizes of the encoder (the decoder mirrors them)")
    gated: bool = option(False, boolean, "gated dense layers h(x) * sigmoid(g(x)) (Dauphin et "
                         "al. 2017; the VampPrior paper's) instead of Linear + activation")


@dataclass(frozen=True)
class ConvOptions:
    """``model.conv``: stride-2 conv stages, residual blocks, dense layers, and the mirror."""

    channels: tuple[int, ...] = option((32, 64), _channel_sizes,
                                       "channels of the encoder's stride-2 stages (H and W "
                                       "must be divisible by 2 ** len(channels))")
    blocks: int = option(0, non_negative, "residual blocks (two 3x3 convs and a skip) per "
                         "stage; 0 = plain stride-2 convs")
    hidden: tuple[int, ...] = option((512, 256), positive_sizes,
                                     "dense layers between the convolutions and the latent")
    gated: bool = option(False, boolean, "gated dense layers")


@MODELS.register("mlp", options=MLPOptions)
def _mlp(event_shape, latent_dim, params_per_channel, activation, hidden, gated,
         memory_format="auto", extra=0):
    """Fully connected encoder/decoder (``memory_format`` is unused)."""
    encoder = MLPEncoder(event_shape, latent_dim, hidden, activation, gated, extra)
    decoder = MLPDecoder(event_shape, latent_dim, params_per_channel, hidden, activation, gated)
    return encoder, decoder


@MODELS.register("conv", options=ConvOptions)
def _conv(event_shape, latent_dim, params_per_channel, activation, channels, blocks, hidden,
          gated, memory_format="auto", extra=0):
    """Stride-2 conv stages with ``blocks`` residual blocks each, the transposed-conv mirror;
    ``hidden`` are dense layers between (see :mod:`vaelab.models.conv`)."""
    channels = check_sizes("channels", channels, allow_empty=False)
    encoder = ConvEncoder(event_shape, latent_dim, channels, hidden, activation, gated,
                          blocks, memory_format, extra)
    decoder = ConvDecoder(event_shape, latent_dim, params_per_channel, channels, hidden,
                          activation, gated, blocks, memory_format)
    return encoder, decoder


def build_model(
    kind: str,
    event_shape: Sequence[int],
    latent_dim: int,
    likelihood: nn.Module,
    *,
    activation: str = "relu",
    encoder_scale: str = "softplus",
    init: str = "torch",
    prior: str = "normal",
    prior_options: dict[str, Any] | None = None,
    flow: str = "none",
    flow_options: dict[str, Any] | None = None,
    memory_format: str = "auto",
    **options: Any,
) -> VAE:
    """A VAE with the ``kind`` architecture (:data:`MODELS`) for examples of ``event_shape``.

    Args:
        kind: ``"mlp"`` or ``"conv"``.
        event_shape: one example's shape, e.g. ``(1, 28, 28)``.
        latent_dim: ``L``.
        likelihood: family with ``params_per_channel`` (``P``) and ``data_kind``.
        activation: a name in :data:`~vaelab.models.mlp.ACTIVATIONS`.
        encoder_scale: a name in :data:`ENCODER_SCALES` (``softplus``, ``exp``,
            ``logvar-hardtanh``).
        init: a weight initialisation in :data:`~vaelab.models.init.INITS`.
        prior: a name in :data:`~vaelab.priors.PRIORS`; ``prior_options`` its options
            (``[prior.<name>]``, e.g. ``{"components": 500}``).
        flow: the posterior flow, a name in :data:`~vaelab.posteriors.FLOWS` (``none``: the
            diagonal Gaussian); ``flow_options`` its options (``[posterior.<flow>]``); the
            encoder outputs the flow's parameters after ``loc`` and the raw scale.
        memory_format: layout the convolutions run in: ``"auto"`` (channels_last on CPU,
            contiguous elsewhere), ``"channels_last"`` or ``"contiguous"`` (conv only; see
            :mod:`vaelab.models.conv`).
        **options: the architecture's own options (``[model.<kind>]``): :class:`MLPOptions`
            (``hidden``, ``gated``) or :class:`ConvOptions` (``channels``, ``blocks``,
            ``hidden``, ``gated``); unset ones take their defaults.

    Raises:
        ConfigError: unknown kind/activation/scale/option, bad sizes, or an image size the
            conv model's stages do not divide.
    """
    builder = MODELS[kind]
    chosen = build(MODELS.options(kind), options, f"model.{kind}")
    make_activation(activation)  # unknown names fail here, listing the valid ones
    ENCODER_SCALES[encoder_scale]
    event_shape = check_sizes("event_shape", event_shape, allow_empty=False)
    (latent_dim,) = check_sizes("latent_dim", (latent_dim,))
    p = getattr(likelihood, "params_per_channel", None)
    if not isinstance(p, int) or p < 1:
        raise ConfigError(f"likelihood {likelihood!r} has no positive int params_per_channel")
    INITS[init]  # unknown names fail before anything is built
    flow_module = build_flow(flow, latent_dim, **(flow_options or {}))
    if flow != "none" and prior == "vampprior":
        raise ConfigError("the VampPrior is a mixture of q(z|u_k), whose density a flow "
                          "posterior knows only at its own samples: use posterior.flow = none "
                          "with the VampPrior, or another prior with the flow")
    encoder, decoder = builder(event_shape, latent_dim, p, activation,
                               **dataclasses.asdict(chosen), memory_format=memory_format,
                               extra=flow_module.num_params(latent_dim))
    initialise(encoder, init)
    initialise(decoder, init)
    prior_module = build_prior(prior, latent_dim, event_shape, **(prior_options or {}))
    return VAE(encoder, decoder, likelihood, latent_dim, event_shape, encoder_scale,
               prior_module, flow_module)


def from_config(config: Any, event_shape: Sequence[int], likelihood: nn.Module,
                prior: Any = None, posterior: Any = None) -> VAE:
    """Build from a run config's ``[model]`` section (a
    :class:`~vaelab.config.ModelConfig`: ``kind``, ``latent_dim``, ``activation``,
    ``encoder_scale``, ``init`` and the kind's ``options``) and optionally its ``[prior]``
    section (``name`` and ``options``; default: the standard normal) and its
    ``[posterior]`` section (``flow`` and ``options``; default: no flow)."""
    return build_model(
        config.kind,
        event_shape,
        config.latent_dim,
        likelihood,
        activation=config.activation,
        encoder_scale=config.encoder_scale,
        init=config.init,
        prior=prior.name if prior is not None else "normal",
        prior_options=dataclasses.asdict(prior.options) if prior is not None else None,
        flow=posterior.flow if posterior is not None else "none",
        flow_options=dataclasses.asdict(posterior.options) if posterior is not None else None,
        memory_format=getattr(config, "memory_format", "auto"),
        **dataclasses.asdict(config.options),
    )


def build_from_config(cfg: Any, event_shape: Sequence[int]) -> VAE:
    """The VAE a run's configuration (a :class:`~vaelab.config.RunConfig`) describes, for
    examples of ``event_shape`` (C, H, W): the likelihood ``cfg.likelihood``, the model
    ``cfg.model`` and the prior ``cfg.prior``."""
    family = likelihoods.get(cfg.likelihood.name, **dataclasses.asdict(cfg.likelihood.options))
    return from_config(cfg.model, event_shape, family, cfg.prior, cfg.posterior)


def num_parameters(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)
