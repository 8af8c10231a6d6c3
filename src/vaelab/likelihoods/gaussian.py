"""Gaussian with its normalising constant (fixed, learned or per-pixel sigma)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LIKELIHOODS
from .location_scale import _LocationScale

__all__ = ["Gaussian"]


@LIKELIHOODS.register("gaussian")
class Gaussian(_LocationScale):
    r"""Normal: :math:`\log p(x) = -\tfrac12 ((x-\mu)/\sigma)^2 - \log\sigma - \tfrac12\log 2\pi`
    per sub-pixel (constants kept). Default ``scale="learned"``; see :class:`_LocationScale`.
    """

    name = "gaussian"

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, s, log_s = self._loc_scale(params)
        z = (x.to(loc.dtype) - loc) / s
        return -0.5 * z * z - log_s - 0.5 * math.log(2 * math.pi)

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        loc, s, _ = self._loc_scale(params)
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + s * eps

