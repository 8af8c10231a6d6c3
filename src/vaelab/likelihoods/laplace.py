"""Laplace with its normalising constant (fixed, learned or per-pixel scale)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import _LOG2, LIKELIHOODS, _rand
from .location_scale import _LocationScale

__all__ = ["Laplace"]


@LIKELIHOODS.register("laplace")
class Laplace(_LocationScale):
    r"""Laplace: :math:`\log p(x) = -|x-\mu|/b - \log b - \log 2` per sub-pixel.
    Default ``scale="learned"``; see :class:`_LocationScale`."""

    name = "laplace"

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, s, log_s = self._loc_scale(params)
        return -(x.to(loc.dtype) - loc).abs() / s - log_s - _LOG2

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        loc, s, _ = self._loc_scale(params)
        e1 = -torch.log1p(-_rand(loc, generator))  # Exp(1); rand < 1 keeps it finite
        e2 = -torch.log1p(-_rand(loc, generator))
        return loc + s * (e1 - e2)

