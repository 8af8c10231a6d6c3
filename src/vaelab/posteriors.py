r"""Posteriors q(z|x) beyond the diagonal Gaussian: normalizing flows (a registry).

A flow pushes the encoder's diagonal Gaussian :math:`z_0 \sim N(\mu(x), \sigma(x)^2)`
through K invertible maps, :math:`z = f_K \circ \dots \circ f_1(z_0)`, whose parameters the
encoder also outputs (amortised, as Rezende & Mohamed 2015 and Kingma et al. 2016 do), so

.. math:: \log q(z|x) = \log N(z_0; \mu, \sigma^2) - \sum_k \log |\det \partial f_k / \partial z_{k-1}|

exactly, at every sample drawn. The ELBO, the IWAE bound, importance sampling and its
k-hat use that value (:func:`vaelab.objectives._draw_log_q`); AIS runs in the base space
(the pulled-back posterior :math:`p(x, f(z_0)) |\det J_f(z_0)|` has the same normaliser
:math:`p(x)`). A planar flow cannot be inverted in closed form, and inverting an IAF step
takes L sequential MADE passes (vaelab does not do it), so their density is known only at
their own samples: :meth:`FlowPosterior.log_prob` of another point is an error.

==========  ==================================================================================
``none``    the diagonal Gaussian itself (no flow)
``planar``  :math:`f(z) = z + \hat u \tanh(w^\top z + b)` (Rezende & Mohamed 2015, eq. 10),
            with :math:`\hat u = u + (m(w^\top u) - w^\top u) w / \|w\|^2`,
            :math:`m(a) = -1 + \log(1 + e^a)` (at least :math:`-1 + 10^{-6}`), so that
            :math:`w^\top \hat u > -1` and each map is invertible (their appendix A.1);
            :math:`\log|\det| = \log(1 + \hat u^\top w\, \tanh'(w^\top z + b))`
``iaf``     inverse autoregressive flow (Kingma et al. 2016, "Improved variational inference
            with inverse autoregressive flow", NeurIPS, section 4 and Algorithm 1): T steps
            :math:`[m, s] = \mathrm{MADE}_t(z, h)`, :math:`\sigma = \mathrm{sigmoid}(s + 2)`,
            :math:`z \leftarrow \sigma \odot z + (1 - \sigma) \odot m`,
            :math:`\log|\det| = \sum_i \log \sigma_i`; each MADE (Germain et al. 2015) is
            masked so that :math:`m_i, s_i` depend only on the dimensions before i in that
            step's order (reversed from step to step) and on the per-example context h, the
            encoder's only flow output; the MADE weights are the flow's own parameters
==========  ==================================================================================

Adding a flow: a class with ``name``, ``Options``, an ``__init__`` taking its options and
``latent_dim`` (keywords), ``num_params(latent_dim)`` (how many numbers per example the
encoder outputs for it) and ``forward(z, params) -> (z', log_det)`` on ``z (S, B, L)`` and
``params (B, P)``, registered in :data:`FLOWS`, and its row in ``tests/test_posteriors.py``.
Weights a flow holds itself (the IAF's MADEs) are parameters of the model like any other:
trained, saved in checkpoints and restored.
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
from .options import build, option, positive, positive_sizes
from .registry import Registry

__all__ = ["FLOWS", "FlowPosterior", "PlanarFlow", "PlanarOptions", "IAFFlow", "IAFOptions",
           "MADE", "build_flow"]

FLOWS: Registry[type] = Registry("posterior flow")

#: Smallest |det| of a planar map: w^T u_hat >= MIN_DET - 1, so each map stays invertible
#: in floating point (where softplus(a) underflows to 0 for very negative a).
MIN_DET = 1e-6

_LOG_2PI = math.log(2 * math.pi)


class NoFlow(nn.Module):
    """``none``: the encoder's diagonal Gaussian is q(z|x)."""

    name = "none"

    def __init__(self, latent_dim: int | None = None) -> None:
        super().__init__()

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
    no_inverse = "the map has no closed-form inverse"

    def __init__(self, length: int = 10, latent_dim: int | None = None) -> None:
        super().__init__()
        self.length = int(length)  # its parameters are per example: no size to know here

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


#: The IAF's forget-gate bias: sigma = sigmoid(s + FORGET_BIAS). Kingma et al. (2016,
#: section 4) make s "sufficiently positive, such as close to +1 or +2" before training, so
#: that each step starts near the identity (sigmoid(2) = 0.88) and the flow is stable in
#: early training; +2 is the larger of their two values.
FORGET_BIAS = 2.0


def _hidden_sizes(value: tuple[int, ...]) -> str | None:
    return "needs at least one hidden layer" if not value else positive_sizes(value)


_hidden_sizes.fix = "give layer sizes > 0, e.g. 320,320"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class IAFOptions:
    """``posterior.iaf``: see :class:`IAFFlow`."""

    length: int = option(2, positive, "IAF steps T (Kingma et al. 2016 use 2, 4 and 8 on "
                         "MNIST, Table 1)")
    hidden: tuple[int, ...] = option((320, 320), _hidden_sizes, "hidden sizes of each "
                                     "step's MADE (Germain et al. 2015); 320 is the narrower "
                                     "of the paper's two MNIST widths (320, 1920), two masked "
                                     "layers as a deep MADE")
    context: int = option(16, positive, "size of the context h the encoder outputs per "
                          "example, fed unmasked into every MADE's first hidden layer; h "
                          "only specialises the shared MADE weights to x, so a few numbers "
                          "per latent dimension of a small latent space suffice")


class MADE(nn.Module):
    r"""A masked autoencoder (Germain et al. 2015) with a context input: ``(z, h) -> (m, s)``.

    ``order[i]`` is the position of dimension i in the autoregressive order (0-based), so
    the input degrees are ``order + 1`` (1..L). Hidden unit k of every layer gets degree
    ``k mod L`` (0..L-1, each used about equally often); a connection is kept from an input
    or unit of degree a to a hidden unit of degree b when :math:`b \ge a`, and to an output
    of degree d (that of its dimension) when :math:`d > b`. So :math:`m_i, s_i` depend only
    on the dimensions before i in the order (strictly: the Jacobian of each is zero on and
    after i). The context ``h`` enters the first hidden layer unmasked; degree-0 units see
    only h, so even the first dimension's ``m, s`` depend on x (Germain et al. use degrees
    1..L-1 because they have no context).

    Args:
        order: ``(L,)`` a permutation of ``0..L-1``.
        hidden: sizes of the hidden layers (ELU after each).
        context: size of h.
    """

    def __init__(self, order: Tensor, hidden: tuple[int, ...], context: int) -> None:
        super().__init__()
        latent = int(order.numel())
        degree_in = order.long() + 1
        self.layers = nn.ModuleList()
        previous, size_in = degree_in, latent
        for i, width in enumerate(hidden):
            degree = torch.arange(width) % latent
            self.layers.append(nn.Linear(size_in, width))
            self.register_buffer(f"mask{i}", (degree[:, None] >= previous[None, :]).float(),
                                 persistent=False)
            previous, size_in = degree, width
        self.context = nn.Linear(context, hidden[0], bias=False)
        self.out = nn.Linear(size_in, 2 * latent)  # [m, s]
        self.register_buffer("mask_out", (degree_in[:, None] > previous[None, :]).float()
                             .repeat(2, 1), persistent=False)

    def masks(self) -> list[Tensor]:
        """The masks of the hidden layers and of the output layer, in order."""
        return [getattr(self, f"mask{i}") for i in range(len(self.layers))] + [self.mask_out]

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``z (..., B, L)``, ``h (B, C)`` -> ``(m, s)``, each ``(..., B, L)``."""
        masks = self.masks()
        a = z
        for i, layer in enumerate(self.layers):
            a = F.linear(a, layer.weight * masks[i], layer.bias)
            if i == 0:
                a = a + self.context(h)
            a = F.elu(a)
        out = F.linear(a, self.out.weight * masks[-1], self.out.bias)
        return out.chunk(2, dim=-1)


@FLOWS.register("iaf")
class IAFFlow(nn.Module):
    r"""Inverse autoregressive flow (Kingma et al. 2016), the numerically stable step of
    their section 4 (Algorithm 1): per step t,

    .. math::
        [m, s] = \mathrm{MADE}_t(z, h), \quad \sigma = \mathrm{sigmoid}(s + 2), \quad
        z \leftarrow \sigma \odot z + (1 - \sigma) \odot m, \quad
        \log|\det| \mathrel{+}= \textstyle\sum_i \log \sigma_i

    (``+ 2``: :data:`FORGET_BIAS`; :math:`\log\sigma` by ``logsigmoid``, finite for any
    s). Each step's Jacobian is triangular in its order with diagonal :math:`\sigma`; the
    order is reversed from one step to the next (step 0: dimension 0 first; step 1:
    dimension L-1 first), as in the paper, so across steps every dimension depends on all
    others. The encoder outputs only the context ``h (B, C)`` per example; the MADE weights
    are this module's parameters, shared by all examples.

    Args:
        length: steps T.
        hidden: hidden sizes of each MADE.
        context: C, the size of h.
        latent_dim: L (the MADE masks depend on it).
    """

    name = "iaf"
    Options = IAFOptions
    no_inverse = "inverting it takes L sequential MADE passes per step, which vaelab does not do"

    def __init__(self, length: int = 2, hidden: tuple[int, ...] = (320, 320),
                 context: int = 16, latent_dim: int | None = None) -> None:
        super().__init__()
        if latent_dim is None or int(latent_dim) < 1:
            raise ConfigError(f"the iaf flow's MADE masks depend on the latent size: build it "
                              f"with latent_dim = L >= 1, got {latent_dim!r}")
        if not hidden:
            raise ConfigError("the iaf flow's MADE needs at least one hidden layer: give e.g. "
                              "hidden = (320, 320)")
        self.length, self.context_size = int(length), int(context)
        self.latent_dim = int(latent_dim)
        self.steps = nn.ModuleList(MADE(order, tuple(hidden), self.context_size)
                                   for order in self.orders())

    def num_params(self, latent_dim: int) -> int:
        return self.context_size

    def orders(self) -> list[Tensor]:
        """Each step's ``order`` (position of each dimension in its autoregressive order)."""
        natural = torch.arange(self.latent_dim)
        return [natural if t % 2 == 0 else natural.flip(0) for t in range(self.length)]

    def step(self, t: int, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Step ``t`` alone: ``z (..., B, L)``, ``h (B, C)`` -> ``(z', log|det| (..., B))``."""
        m, s = self.steps[t](z, h)
        # under autocast the MADE's products come back in half precision: the update and
        # the log-determinant's sum stay in z's dtype (float32)
        s = s.to(z.dtype) + FORGET_BIAS
        gate = torch.sigmoid(s)
        z = gate * z + torch.sigmoid(-s) * m.to(z.dtype)  # 1 - sigmoid(s) = sigmoid(-s)
        return z, F.logsigmoid(s).sum(-1)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``z (S, B, L)``, ``params`` = h ``(B, C)`` -> ``(f(z) (S, B, L), log|det| (S, B))``."""
        log_det = z.new_zeros(z.shape[:-1])
        for t in range(self.length):
            z, step_log_det = self.step(t, z, params)
            log_det = log_det + step_log_det
        return z, log_det


def build_flow(name: str, latent_dim: int, **options: Any) -> nn.Module:
    """The registered flow ``name`` for a latent space of ``latent_dim`` dimensions, with its
    options (``[posterior.<name>]``).

    Raises:
        ConfigError: an unknown name (the valid ones listed), option or value.
    """
    chosen = build(FLOWS.options(name), options, f"posterior.{name}")
    return FLOWS[name](**{k: getattr(chosen, k) for k in chosen.__dataclass_fields__},
                       latent_dim=latent_dim)


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
        why = getattr(self.flow, "no_inverse", "vaelab does not invert it")
        raise ConfigError(
            f"the {self.flow.name} flow's log q(z|x) is exact at its own samples but cannot be "
            f"evaluated at other points ({why}): draw z with it")

    @property
    def mean(self) -> Tensor:
        return self.flow(self.loc.unsqueeze(0), self.params)[0][0]

    @property
    def stddev(self) -> Tensor:
        return self.scale
