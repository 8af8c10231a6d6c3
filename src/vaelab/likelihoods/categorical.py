"""A 256-way softmax per sub-pixel for 8-bit data."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LIKELIHOODS, MEAN_CLAMP, LikelihoodFamily

__all__ = ["Categorical256"]


@LIKELIHOODS.register("categorical-256")
class Categorical256(LikelihoodFamily):
    """A 256-way softmax per sub-pixel (van den Oord et al. 2016, PixelRNN).

    ``params`` ``(B, 256*C, *rest)`` is viewed as ``(B, 256, C, *rest)``; data are integers
    0..255. Mean in [0, 1] units, samples uint8.
    """

    name = "categorical-256"
    params_per_channel = 256
    data_kind = "uint8"
    #: Uniform mass mixed into the initial output distribution (see :meth:`output_bias`).
    BIAS_UNIFORM = 0.01

    def _log_probs(self, params: Tensor) -> Tensor:
        return params.unflatten(1, (256, params.shape[1] // 256)).log_softmax(1)

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return self._log_probs(params).gather(1, x.long().unsqueeze(1)).squeeze(1)

    def _mean(self, params: Tensor) -> Tensor:
        probs = self._log_probs(params).exp()
        k = torch.arange(256, dtype=probs.dtype, device=probs.device) / 255
        return (probs * k.view(1, 256, *([1] * (probs.dim() - 2)))).sum(1)

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        probs = self._log_probs(params).exp().movedim(1, -1)
        draws = torch.multinomial(probs.reshape(-1, 256), 1, generator=generator)
        return draws.reshape(probs.shape[:-1]).to(torch.uint8)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        r"""Logits of ``(1 - eps) * q + eps * uniform`` with ``eps = 0.01``, where ``q`` is the
        maximum-entropy distribution on 0..255 with the mean that makes the mixture's mean
        equal ``pixel_mean`` (:math:`q_k \propto e^{\theta k / 255}`, :math:`\theta` by
        bisection). Exact for means in about [0.006, 0.994]; the uniform part keeps every
        initial log-probability >= log(eps / 256) = -10.15."""
        eps = self.BIAS_UNIFORM
        m = pixel_mean.double().flatten()
        target = ((m - eps / 2) / (1 - eps)).clamp(MEAN_CLAMP, 1 - MEAN_CLAMP)
        k = torch.arange(256, dtype=torch.float64, device=m.device) / 255
        lo, hi = torch.full_like(m, -3000.0), torch.full_like(m, 3000.0)
        for _ in range(60):
            theta = (lo + hi) / 2
            mean = (torch.softmax(theta[:, None] * k, dim=1) * k).sum(1)
            lo, hi = torch.where(mean > target, lo, theta), torch.where(mean > target, theta, hi)
        q = torch.log_softmax(((lo + hi) / 2)[:, None] * k, dim=1)
        logits = torch.logaddexp(q + math.log1p(-eps), q.new_tensor(math.log(eps / 256)))
        logits = logits.T.reshape(256, *pixel_mean.shape)  # parameter-major (256, C, *rest)
        return logits.flatten(0, 1).to(pixel_mean.dtype)

