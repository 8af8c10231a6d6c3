"""Location-scale densities on [0, 1] data (the decoder gives the location): the shared
machinery of :class:`~vaelab.likelihoods.gaussian.Gaussian` and
:class:`~vaelab.likelihoods.laplace.Laplace`, and their options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..options import non_negative, option, optional, positive, validate
from .base import LikelihoodFamily, _softplus

__all__ = ["LocationScaleOptions"]

def _scale_rule(scale: Any) -> str | None:
    if scale in ("learned", "per-pixel"):
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) \
            and scale > 0:
        return None
    return "must be a positive number (a fixed sigma), 'learned' or 'per-pixel'"


@dataclass(frozen=True)
class LocationScaleOptions:
    """``likelihood.gaussian`` and ``likelihood.laplace``: see :class:`_LocationScale`."""

    scale: float | str = option("learned", _scale_rule,
                                "a positive number (fixed sigma), learned or per-pixel")
    init_scale: float | None = option(None, optional(positive),
                                      "learned/per-pixel: the starting sigma (default 1)")
    min_scale: float | None = option(None, optional(non_negative),
                                     "learned/per-pixel: a floor on sigma (default 1e-3)")

    def check(self, where: str) -> None:
        """A fixed scale takes no init/min; otherwise init_scale > min_scale >= 0 (> 0 for
        per-pixel, whose softplus needs a positive floor)."""
        if isinstance(self.scale, str):
            init = 1.0 if self.init_scale is None else self.init_scale
            low = 1e-3 if self.min_scale is None else self.min_scale
            floor = 0.0 if self.scale == "learned" else 1e-12
            if not init > low >= floor:
                raise ConfigError(
                    f"{where} needs init_scale > min_scale >= 0 (min_scale > 0 for per-pixel), "
                    f"got init_scale={init}, min_scale={low}")
        elif self.init_scale is not None or self.min_scale is not None:
            raise ConfigError(f"{where} options init_scale and min_scale apply only to "
                              f"scale='learned' or 'per-pixel', not to a fixed scale {self.scale}")


class _LocationScale(LikelihoodFamily):
    r"""Shared machinery for :class:`Gaussian` and :class:`Laplace` (location = decoder output).

    ``scale`` is one of

    - a positive number: fixed scale (``P = 1``);
    - ``"learned"`` (default): one scalar shared by all pixels, as in the optimal
      sigma-VAE (Rybkin et al. 2021). The parameter ``log_scale`` gives
      :math:`\sigma = \text{min\_scale} + e^{\text{log\_scale}}`, initialised so that
      :math:`\sigma = \text{init\_scale}`; the soft floor keeps gradients finite;
    - ``"per-pixel"``: ``P = 2``, the decoder gives the location then a raw scale ``r``,
      :math:`\sigma = \mathrm{softplus}(r) + \text{min\_scale}` (linear for large ``r``, so no
      overflow; finite gradients everywhere; ``min_scale`` must be > 0).

    ``init_scale`` (default 1.0) and ``min_scale`` (default 1e-3) apply to the last two only.
    Data are [0, 1] floats (``data_kind`` "unit"); samples are not clipped to [0, 1].
    """

    Options = LocationScaleOptions
    data_kind = "unit"
    elementwise = True  # with a fixed or learned scalar scale (P == 1)

    def __init__(self, scale: float | str = "learned", init_scale: float | None = None,
                 min_scale: float | None = None) -> None:
        super().__init__()
        where = f"likelihood.{self.name}"
        options = LocationScaleOptions(scale, init_scale, min_scale)
        validate(options, where)
        self.scale = float(scale) if not isinstance(scale, str) else scale
        self.init_scale: float | None = None
        self.min_scale: float | None = None
        if isinstance(self.scale, float):
            return
        self.init_scale = 1.0 if init_scale is None else float(init_scale)
        self.min_scale = 1e-3 if min_scale is None else float(min_scale)
        if self.scale == "learned":
            self.log_scale = nn.Parameter(torch.tensor(math.log(self.init_scale - self.min_scale)))
        else:
            self.params_per_channel = 2

    def _loc_scale(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loc, scale, log_scale)``; the last two are scalars unless per-pixel."""
        if isinstance(self.scale, float):
            s = torch.tensor(self.scale, dtype=params.dtype, device=params.device)
            return params, s, s.log()
        if self.scale == "learned":
            log_s = self.log_scale
            if self.min_scale > 0:
                log_s = torch.logaddexp(log_s, log_s.new_tensor(math.log(self.min_scale)))
            log_s = log_s.to(params.dtype)
            return params, log_s.exp(), log_s
        loc, raw = self._split(params)
        s = _softplus(raw) + self.min_scale
        return loc, s, s.log()

    def _mean(self, params: Tensor) -> Tensor:
        return self._loc_scale(params)[0]

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        """The mean itself; per-pixel: then the raw scale that gives ``init_scale``."""
        if self.scale != "per-pixel":
            return pixel_mean.clone()
        d = self.init_scale - self.min_scale  # inverse softplus: d + log(1 - e^-d)
        raw = d + math.log(-math.expm1(-d))
        return torch.cat([pixel_mean, torch.full_like(pixel_mean, raw)])

    def config(self) -> dict[str, Any]:
        if isinstance(self.scale, float):
            return {"scale": self.scale}
        return {"scale": self.scale, "init_scale": self.init_scale, "min_scale": self.min_scale}

