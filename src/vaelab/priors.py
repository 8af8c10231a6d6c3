r"""Priors :math:`p(z)` (a registry): standard normal, VampPrior, mixture of Gaussians.

A prior is an ``nn.Module`` (its learned parameters train with the model and are saved in
its checkpoints) whose :meth:`Prior.distribution` returns a ``torch.distributions``
object over ``L`` latent dimensions: event shape ``(L,)``, ``log_prob(z)`` for ``z`` of any
shape ``(..., L)`` returns ``(...)`` in nats. The VAE calls it as ``model.prior(device)``.

==============  =========================================================================
``normal``      :math:`N(0, I)` (the default): the KL is analytic and per dimension
``vampprior``   :math:`\frac1K \sum_k q(z \mid u_k)`: the encoder's posterior at ``K``
                learned pseudo-inputs :math:`u_k` (Tomczak & Welling 2018, "VAE with a
                VampPrior", AISTATS)
``mog``         :math:`\sum_k \pi_k N(\mu_k, \mathrm{diag}\,\sigma_k^2)` with learned
                weights, means and scales
==============  =========================================================================

The mixtures have no closed-form KL with :math:`q(z|x)`: the objectives then use the
Monte-Carlo estimate :math:`\log q(z|x) - \log p(z)` at the same seeded draws of ``z``
(``objective.kl = auto``), and no per-dimension KL is reported.

:class:`GaussianMixture` computes every component's log-density with two matrix products
in float64, :math:`\sum_j a_{kj} z_j^2 - 2 \sum_j a_{kj} \mu_{kj} z_j + \sum_j a_{kj}
\mu_{kj}^2` with :math:`a = \sigma^{-2}`: memory ``(N, K)`` instead of ``(N, K, L)``, and no
float32 cancellation when :math:`|z - \mu| \ll |z|` and :math:`\sigma` is small.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, constraints

from .errors import ConfigError
from .options import build, option, positive
from .registry import Registry

__all__ = [
    "PRIORS",
    "Prior",
    "StandardNormal",
    "VampPrior",
    "MixtureOfGaussians",
    "GaussianMixture",
    "build_prior",
    "VampPriorOptions",
    "MixtureOfGaussiansOptions",
]

#: ``encode(u)`` of the model's encoder: pseudo-inputs ``(K, *event_shape)`` in [0, 1] ->
#: ``(loc (K, L), scale (K, L))``.
EncodeParams = Callable[[Tensor], tuple[Tensor, Tensor]]

PRIORS: Registry[type[Prior]] = Registry("prior")

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture(Distribution):
    r"""A mixture of ``K`` diagonal Gaussians over ``L`` dimensions (one shared set of
    components for every batch element).

    Args:
        logits: ``(K,)`` unnormalised log mixture weights.
        loc: ``(K, L)`` means.
        scale: ``(K, L)`` standard deviations, > 0.
        batch_shape: the batch shape (the components are shared by every element).
    """

    arg_constraints: dict[str, Any] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor,
                 batch_shape: tuple[int, ...] = ()) -> None:
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(batch_shape), torch.Size(loc.shape[-1:]),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None) -> GaussianMixture:
        return GaussianMixture(self.logits, self.loc, self.scale, torch.Size(batch_shape))

    @property
    def mean(self) -> Tensor:
        weights = torch.softmax(self.logits, 0)
        return (weights[:, None] * self.loc).sum(0).expand(*self.batch_shape, -1)

    def component_log_prob(self, z: Tensor) -> Tensor:
        """``(N, K)`` log-densities of ``z (N, L)`` under each component (float64)."""
        z = z.double()
        loc, scale = self.loc.double(), self.scale.double()
        precision = scale.pow(-2)  # (K, L)
        quadratic = (z * z) @ precision.T - 2 * z @ (precision * loc).T \
            + (precision * loc * loc).sum(1)
        # the expansion is exact algebra; rounding can make a tiny square negative
        quadratic = quadratic.clamp_min(0)
        return -0.5 * quadratic - scale.log().sum(1) - 0.5 * loc.shape[1] * _LOG_2PI

    def log_prob(self, value: Tensor) -> Tensor:
        flat = value.reshape(-1, value.shape[-1])
        log_weights = torch.log_softmax(self.logits.double(), 0)
        out = torch.logsumexp(self.component_log_prob(flat) + log_weights, 1)
        return out.reshape(value.shape[:-1]).to(value.dtype)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """Draws with the component chosen by ``torch.multinomial`` (not differentiable) and
        ``loc + scale * eps`` within it (differentiable in ``loc`` and ``scale``); from
        torch's global RNG (the objectives fork it under a seed drawn from their generator)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        count = max(1, math.prod(shape))
        weights = torch.softmax(self.logits.detach().float(), 0)
        component = torch.multinomial(weights, count, replacement=True)
        eps = torch.randn(count, self.loc.shape[1], dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc[component] + self.scale[component] * eps
        return z.reshape(*shape, self.loc.shape[1])

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


@dataclass(frozen=True)
class VampPriorOptions:
    """``prior.vampprior``: see :class:`VampPrior`."""

    components: int = option(500, positive, "pseudo-inputs K (the paper and pythae: 500)")


@dataclass(frozen=True)
class MixtureOfGaussiansOptions:
    """``prior.mog``: see :class:`MixtureOfGaussians`."""

    components: int = option(10, positive, "Gaussian components K")


class Prior(nn.Module):
    """Base class: ``distribution(encode, latent_dim, device, dtype)`` returns p(z)."""

    name: str = ""

    def distribution(self, encode: EncodeParams | None, latent_dim: int,
                     device: torch.device | str | None, dtype: torch.dtype) -> Distribution:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Options to save in reports."""
        return {}


@PRIORS.register("normal")
class StandardNormal(Prior):
    r""":math:`N(0, I)`. The base ``Normal`` carries ``standard = True``, which lets
    :mod:`vaelab.objectives` use the short closed-form KL
    :math:`\tfrac12(\sigma^2 + \mu^2 - 1) - \log\sigma`."""

    name = "normal"

    def __init__(self, latent_dim: int, event_shape: tuple[int, ...]) -> None:
        super().__init__()

    def distribution(self, encode, latent_dim, device, dtype):
        loc = torch.zeros(latent_dim, device=device, dtype=dtype)
        normal = Normal(loc, torch.ones_like(loc), validate_args=False)
        normal.standard = True
        return Independent(normal, 1, validate_args=False)


@PRIORS.register("vampprior")
class VampPrior(Prior):
    r"""The VampPrior :math:`p(z) = \frac1K \sum_k q(z \mid u_k)` (Tomczak & Welling 2018).

    The ``K`` pseudo-inputs :math:`u_k = \mathrm{hardtanh}_{[0,1]}(w_k)` are learned, with
    :math:`w_k \sim N(0.05, 0.01^2)` per pixel at the start: the paper's initialisation for
    MNIST (``pseudoinputs_mean = 0.05, pseudoinputs_std = 0.01`` in jmtomczak/vae_vampprior,
    ``load_data.py``; the Hardtanh(0, 1) non-linearity of its pseudo-input layer). The
    encoder is applied to them at every call, so the prior follows the encoder.

    Args:
        latent_dim: ``L``.
        event_shape: one example's shape, e.g. ``(1, 28, 28)``.
        components: ``K`` (default 500, as the paper and pythae's vamp.py).
    """

    name = "vampprior"
    Options = VampPriorOptions
    INIT_MEAN, INIT_STD = 0.05, 0.01

    def __init__(self, latent_dim: int, event_shape: tuple[int, ...],
                 components: int = 500) -> None:
        super().__init__()
        k = _components("vampprior", components)
        self.pseudo_inputs = nn.Parameter(
            torch.randn(k, *event_shape) * self.INIT_STD + self.INIT_MEAN)

    def distribution(self, encode, latent_dim, device, dtype):
        if encode is None:
            raise ConfigError("the VampPrior needs the model's encoder: use it through a VAE")
        loc, scale = encode(F.hardtanh(self.pseudo_inputs, 0.0, 1.0))
        logits = torch.zeros(loc.shape[0], device=loc.device, dtype=loc.dtype)
        return GaussianMixture(logits, loc, scale)

    def config(self):
        return {"components": self.pseudo_inputs.shape[0]}


@PRIORS.register("mog")
class MixtureOfGaussians(Prior):
    r"""A learned mixture :math:`\sum_k \pi_k N(\mu_k, \mathrm{diag}\,\sigma_k^2)`.

    Starts from uniform weights, unit scales and means drawn from :math:`N(0, I)` (so the
    components differ and the mixture is close to the standard normal's spread); the
    scales are ``softplus`` of a parameter, plus 1e-4.

    Args:
        latent_dim: ``L``.
        event_shape: unused.
        components: ``K`` (default 10).
    """

    name = "mog"
    Options = MixtureOfGaussiansOptions

    def __init__(self, latent_dim: int, event_shape: tuple[int, ...],
                 components: int = 10) -> None:
        super().__init__()
        k = _components("mog", components)
        self.logits = nn.Parameter(torch.zeros(k))
        self.loc = nn.Parameter(torch.randn(k, latent_dim))
        # softplus(raw) + 1e-4 = 1 at the start
        self.raw_scale = nn.Parameter(torch.full((k, latent_dim), math.log(math.expm1(1 - 1e-4))))

    def distribution(self, encode, latent_dim, device, dtype):
        return GaussianMixture(self.logits, self.loc, F.softplus(self.raw_scale) + 1e-4)

    def config(self):
        return {"components": self.logits.shape[0]}


def _components(name: str, components: int) -> int:
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ConfigError(f"prior.{name}.components must be a positive integer, got "
                          f"{components!r}")
    return components


def build_prior(name: str, latent_dim: int, event_shape: tuple[int, ...],
                **options: Any) -> Prior:
    """The registered prior ``name`` for ``latent_dim`` latents and examples of
    ``event_shape``, with its ``options`` (``[prior.<name>]``, e.g. ``components=500``).

    Raises:
        ConfigError: an unknown name (the message lists the registered ones), an option it
            does not take, or a bad value.
    """
    chosen = build(PRIORS.options(name), options, f"prior.{name}")
    return PRIORS[name](latent_dim, tuple(event_shape), **dataclasses.asdict(chosen))
