r"""Posteriors q(z|x) beyond the diagonal Gaussian: normalizing flows (a registry).

A flow pushes the encoder's diagonal Gaussian :math:`z_0 \sim N(\mu(x), \sigma(x)^2)`
through K invertible maps, :math:`z = f_K \circ \dots \circ f_1(z_0)`, whose parameters the
encoder also outputs (amortised, as Rezende & Mohamed 2015 and Kingma et al. 2016 do), so

.. math:: \log q(z|x) = \log N(z_0; \mu, \sigma^2) - \sum_k \log |\det \partial f_k / \partial z_{k-1}|

exactly, at every sample drawn. The ELBO, the IWAE bound, importance sampling and its
k-hat use that value (:func:`vaelab.objectives._draw_log_q`); AIS runs in the base space
(the pulled-back posterior :math:`p(x, f(z_0)) |\det J_f(z_0)|` has the same normaliser
:math:`p(x)`). A planar flow cannot be inverted in closed form, so its density is known
only at its own samples: :meth:`FlowPosterior.log_prob` of another point is an error.

==========  ==================================================================================
``none``    the diagonal Gaussian itself (no flow)
``planar``  :math:`f(z) = z + \hat u \tanh(w^\top z + b)` (Rezende & Mohamed 2015, eq. 10),
            with :math:`\hat u = u + (m(w^\top u) - w^\top u) w / \|w\|^2`,
            :math:`m(a) = -1 + \log(1 + e^a)` (at least :math:`-1 + 10^{-6}`), so that
            :math:`w^\top \hat u > -1` and each map is invertible (their appendix A.1);
            :math:`\log|\det| = \log(1 + \hat u^\top w\, \tanh'(w^\top z + b))`
==========  ==================================================================================

Adding a flow: a class with ``name``, ``Options``, ``num_params(latent_dim)`` (how many
numbers per example the encoder outputs for it) and ``forward(z, params) -> (z', log_det)``
on ``z (S, B, L)`` and ``params (B, P)``, registered in :data:`FLOWS`, and its row in
``tests/test_posteriors.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .errors import ConfigError
from .options import build, option, positive
from .registry import Registry

__all__ = ["FLOWS", "FlowPosterior", "PlanarFlow", "PlanarOptions", "build_flow"]

FLOWS: Registry[type] = Registry("posterior flow")

#: Smallest |det| of a planar map: w^T u_hat >= MIN_DET - 1, so each map stays invertible
#: in floating point (where softplus(a) underflows to 0 for very negative a).
MIN_DET = 1e-6

_LOG_2PI = math.log(2 * math.pi)


class NoFlow(nn.Module):
    """``none``: the encoder's diagonal Gaussian is q(z|x)."""

    name = "none"

    def num_params(self, latent_dim: int) -> int:
        return 0


FLOWS.register("none")(NoFlow)


@dataclass(frozen=True)
class PlanarOptions:
    """``posterior.planar``: see :class:`PlanarFlow`."""

    length: int = option(10, positive, "planar maps K (Rezende & Mohamed: 10, 20, 40, 80)")


@FLOWS.register("planar")
class PlanarFlow(nn.Module):
    """K planar maps with per-example parameters ``u, w (L)``, ``b`` from the encoder."""

    name = "planar"
    Options = PlanarOptions

    def __init__(self, length: int = 10) -> None:
        super().__init__()
        self.length = int(length)

    def num_params(self, latent_dim: int) -> int:
        return self.length * (2 * latent_dim + 1)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``z (S, B, L)``, ``params (B, K (2L + 1))`` -> ``(f(z) (S, B, L), log|det| (S, B))``."""
        latent = z.shape[-1]
        log_det = z.new_zeros(z.shape[:-1])
        for u, w, b in _planar_parameters(params, self.length, latent):
            wz = (z * w).sum(-1, keepdim=True) + b  # (S, B, 1)
            h = torch.tanh(wz)
            z = z + u * h
            psi_u = (1 - h.square()) * (w * u).sum(-1, keepdim=True)  # h'(.) w^T u_hat
            log_det = log_det + torch.log1p(psi_u.squeeze(-1))
        return z, log_det


def _planar_parameters(params: Tensor, length: int, latent: int):
    """``(u_hat, w, b)`` per map, each broadcastable against ``z (S, B, L)``."""
    per = params.unflatten(-1, (length, 2 * latent + 1))
    for k in range(length):
        u, w, b = per[:, k, :latent], per[:, k, latent:2 * latent], per[:, k, 2 * latent:]
        wu = (w * u).sum(-1, keepdim=True)
        # u_hat = u + (m(w^T u) - w^T u) w / |w|^2 gives w^T u_hat = m(w^T u) > -1, with
        # m(a) = -1 + softplus(a) kept MIN_DET above -1 (softplus underflows for a << 0)
        m = (F.softplus(wu) - 1).clamp_min(MIN_DET - 1)
        u_hat = u + (m - wu) * w / w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        yield u_hat, w, b


def build_flow(name: str, **options: Any) -> nn.Module:
    """The registered flow ``name`` with its options (``[posterior.<name>]``).

    Raises:
        ConfigError: an unknown name (the valid ones listed), option or value.
    """
    chosen = build(FLOWS.options(name), options, f"posterior.{name}")
    return FLOWS[name](**{k: getattr(chosen, k) for k in chosen.__dataclass_fields__})


class FlowPosterior(Distribution):
    r"""q(z|x) of a flow: a diagonal Gaussian base ``N(loc, scale)`` ``(B, L)`` pushed through
    ``flow`` with the per-example parameters ``params (B, P)``.

    :meth:`push` maps base noise to ``(z, log q(z|x))`` exactly; :meth:`rsample` draws with
    torch's global generator (the objectives draw the noise themselves, from seeded
    generators, and call :meth:`push`). :attr:`mean` is the flow applied to the base mean
    (the figures' latent summary), not E[z].
    """

    arg_constraints: dict[str, Any] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, flow: nn.Module, params: Tensor) -> None:
        self.loc, self.scale, self.flow, self.params = loc, scale, flow, params
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    def push(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Standard-normal ``eps (S, B, L)`` -> ``(z (S, B, L), log q(z|x) (S, B))``."""
        z0 = self.loc + self.scale * eps
        log_base = (-0.5 * eps.square() - self.scale.log() - 0.5 * _LOG_2PI).sum(-1)
        z, log_det = self.flow(z0, self.params)
        return z, log_base - log_det

    def push_base(self, z0: Tensor) -> tuple[Tensor, Tensor]:
        """Base-space points ``z0 (S, B, L)`` -> ``(f(z0), log|det J_f(z0)|)``."""
        return self.flow(z0, self.params)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        eps = torch.randn((*shape, *self.loc.shape), dtype=self.loc.dtype,
                          device=self.loc.device)
        flat = eps.reshape(-1, *self.loc.shape)
        return self.push(flat)[0].reshape(eps.shape)

    def log_prob(self, value: Tensor) -> Tensor:
        raise ConfigError(
            f"the {self.flow.name} flow's log q(z|x) is exact at its own samples but cannot be "
            "evaluated at other points (the map has no closed-form inverse): draw z with it")

    @property
    def mean(self) -> Tensor:
        return self.flow(self.loc.unsqueeze(0), self.params)[0][0]

    @property
    def stddev(self) -> Tensor:
        return self.scale
