"""Continuous Bernoulli: a normalised density for grey levels in [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import _LOG2, LIKELIHOODS, MEAN_CLAMP, LikelihoodFamily, _rand

__all__ = ["ContinuousBernoulli", "continuous_bernoulli_log_normalizer",
           "continuous_bernoulli_mean"]

#: Taylor coefficients of log C(l) in powers of l^2 (checked against mpmath in the tests).
_CB_SERIES = (_LOG2, 1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400)


def continuous_bernoulli_log_normalizer(logits: Tensor) -> Tensor:
    r""":math:`\log C(l)` of the continuous Bernoulli, :math:`C(l) = l / \tanh(l/2)`, ``C(0) = 2``.

    Loaiza-Ganem & Cunningham (2019), eq. 7 with :math:`\lambda = \sigma(l)`. Even in ``l``.
    For :math:`|l| < 0.1` the Taylor series :math:`\log 2 + l^2/12 - 7l^4/1440 + 31l^6/90720
    - 127l^8/4838400 + 73l^{10}/34214400`; otherwise
    :math:`\log(|l| / (1 - e^{-|l|})) + \log(1 + e^{-|l|})`.
    Accurate to a few ulps everywhere, with finite gradients.
    """
    a = logits.abs()
    small = a < 0.1
    # Each branch is evaluated on inputs where it is finite: torch.where passes a zero
    # gradient to the unused branch, but 0 * inf = NaN, so the series must not see large
    # logits (l^10 overflows float32 beyond |l| ~ 7e3) nor the log form l = 0.
    l2 = torch.where(small, logits, torch.zeros_like(logits)).square()
    series = torch.zeros_like(l2)
    for c in reversed(_CB_SERIES):
        series = series * l2 + c
    safe = torch.where(small, torch.ones_like(a), a)
    large = torch.log(safe / -torch.expm1(-safe)) + torch.log1p(torch.exp(-safe))
    return torch.where(small, series, large)


def continuous_bernoulli_mean(logits: Tensor) -> Tensor:
    r"""Mean of the continuous Bernoulli: :math:`\tfrac12 + \tfrac12 L(l/2)`, with the Langevin
    function :math:`L(u) = \coth u - 1/u` (Taylor series for :math:`|u| < 0.5`)."""
    u = logits / 2
    small = u.abs() < 0.5
    u2 = torch.where(small, u, torch.zeros_like(u)).square()  # finite in the unused branch
    coef = (1 / 3, -1 / 45, 2 / 945, -1 / 4725, 2 / 93555, -1382 / 638512875)
    series = torch.zeros_like(u)
    for c in reversed(coef):
        series = series * u2 + c
    safe = torch.where(small, torch.ones_like(u), u)
    langevin = torch.where(small, u * series, 1 / torch.tanh(safe) - 1 / safe)
    return 0.5 + 0.5 * langevin


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulli(LikelihoodFamily):
    r"""Continuous Bernoulli on [0, 1] with logits :math:`l` (Loaiza-Ganem & Cunningham 2019):
    :math:`\log p(x) = x l - \mathrm{softplus}(l) + \log C(l)`, a normalised density for
    grey-level data. See :func:`continuous_bernoulli_log_normalizer`.
    """

    name = "continuous-bernoulli"
    data_kind = "unit"
    elementwise = True

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        x = x.to(params.dtype)
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return continuous_bernoulli_log_normalizer(params) - bce

    def _mean(self, params: Tensor) -> Tensor:
        return continuous_bernoulli_mean(params)

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        # Inverse CDF: x = log1p(u expm1(l)) / l for l < 0; x(l, u) = 1 - x(-l, 1 - u).
        u = _rand(params, generator)
        neg = params < 0
        a = params.abs().clamp_min(1e-30)
        v = torch.where(neg, u, 1 - u)
        t = torch.log1p(v * torch.expm1(-a)) / -a
        x = torch.where(neg, t, 1 - t)
        x = torch.where(a < 1e-4, u + 0.5 * params * u * (1 - u), x)  # O(l^2) near l = 0
        return x.clamp(0, 1)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        """The logit whose continuous-Bernoulli *mean* equals the data mean (bisection),
        clipped to the Bernoulli init's range ``|l| <= logit(1 - 1e-3)`` = 6.91: means
        outside [0.144, 0.856] would otherwise need logits up to ~1000, which saturate."""
        bound = math.log((1 - MEAN_CLAMP) / MEAN_CLAMP)
        m = pixel_mean.double()
        lo, hi = torch.full_like(m, -bound), torch.full_like(m, bound)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = continuous_bernoulli_mean(mid) > m
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        return ((lo + hi) / 2).to(pixel_mean.dtype)

