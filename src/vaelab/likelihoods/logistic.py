"""The discretised logistic of PixelCNN++ for 8-bit data, and its exact bin masses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LIKELIHOODS, LikelihoodFamily, _rand

__all__ = ["DiscretizedLogistic"]


# --------------------------------------------------------------------------- 8-bit


def _logistic_bin_log_mass(x: Tensor, xf: Tensor, loc: Tensor, inv_s: Tensor) -> Tensor:
    r"""Log-mass of pixel value ``x`` (0..255) under a discretised logistic: exact and stable.

    ``loc`` is on the [-1, 1] scale, ``inv_s`` is :math:`1/s`; ``xf`` is ``x`` in the
    parameters' float dtype. All four broadcast (``x`` may have size-1 dims, e.g. one
    component dim shared by a mixture); the result has the broadcast shape, in nats.
    See :class:`DiscretizedLogistic` for the formula.
    """
    # Bin edges from integer numerators, so the upper edge of bin k and the lower edge of
    # bin k + 1 round identically and the masses telescope (sum to 1) in float32 too.
    a = inv_s * ((2 * xf - 254) / 255 - loc)
    b = inv_s * ((2 * xf - 256) / 255 - loc)
    log_cdf_upper = F.logsigmoid(a)  # log sigma(a): the whole left tail, bin 0
    log_sf_lower = F.logsigmoid(-b)  # log (1 - sigma(b)): the whole right tail, bin 255
    log_bin = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(inv_s * (-2 / 255)))
    return torch.where(x == 0, log_cdf_upper, torch.where(x == 255, log_sf_lower, log_bin))


def _logistic_bin_mean(loc: Tensor, inv_s: Tensor) -> Tensor:
    r"""Mean of a discretised logistic in [0, 1] units: :math:`E[k]/255` with
    :math:`E[k] = \sum_{j=1}^{255} P(k \ge j)`; the lower edge of bin ``j`` is
    :math:`(2j - 1)/255 - 1`. ``loc`` and ``inv_s`` as in :func:`_logistic_bin_log_mass`."""
    loc, inv_s = torch.broadcast_tensors(loc, inv_s)
    if torch.compiler.is_exporting():  # one vectorised op, not a graph of 255 unrolled steps
        edges = torch.arange(1, 256, dtype=loc.dtype, device=loc.device) * (2 / 255) - 256 / 255
        return torch.sigmoid(inv_s.unsqueeze(-1) * (loc.unsqueeze(-1) - edges)).sum(-1) / 255
    total = torch.zeros_like(loc)
    if torch.is_grad_enabled() and (loc.requires_grad or inv_s.requires_grad):
        for k in range(1, 256):
            total = total + torch.sigmoid(inv_s * (loc - ((2 * k - 1) / 255 - 1)))
        return total / 255
    buf = torch.empty_like(total)  # the same operations in place: 1.3x faster, same bits
    for k in range(1, 256):
        torch.sub(loc, (2 * k - 1) / 255 - 1, out=buf).mul_(inv_s).sigmoid_()
        total.add_(buf)
    return total / 255


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogistic(LikelihoodFamily):
    r"""Discretised logistic per sub-pixel (Salimans et al. 2017, PixelCNN++), ``P = 2``.

    Parameters: location :math:`\mu` on the [-1, 1] data scale, then :math:`\log s`
    (clamped to [-7, 7]; -7 as in PixelCNN++, +7 keeps the bin mass above 0 in float32).
    Pixel :math:`k` maps to :math:`y = 2k/255 - 1` with bin :math:`[y - 1/255, y + 1/255]`;
    bins 0 and 255 take the tails. With :math:`a, b` the standardised upper/lower bin edges,
    the interior mass is computed exactly, with no PixelCNN++ mid-bin fallback, as
    :math:`\log(\sigma(a) - \sigma(b)) = \log\sigma(a) + \log(1-\sigma(b)) +
    \log(1 - e^{-(a-b)})`, :math:`a - b = 2/(255 s)`, each term stable via log-sigmoid.
    """

    name = "discretized-logistic"
    params_per_channel = 2
    data_kind = "uint8"
    LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0

    def _loc_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_s = self._split(params)
        return loc, log_s.clamp(self.LOG_SCALE_MIN, self.LOG_SCALE_MAX)

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_s = self._loc_log_scale(params)
        return _logistic_bin_log_mass(x, x.to(loc.dtype), loc, torch.exp(-log_s))

    def _mean(self, params: Tensor) -> Tensor:
        loc, log_s = self._loc_log_scale(params)
        return _logistic_bin_mean(loc, torch.exp(-log_s))

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        loc, log_s = self._loc_log_scale(params)
        u = _rand(loc, generator).clamp(1e-6, 1 - 1e-6)
        y = loc + log_s.exp() * (torch.log(u) - torch.log1p(-u))
        return ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        r"""Location ``2 m - 1``; scale chosen so the logistic variance :math:`s^2\pi^2/3`
        equals :math:`4 m (1 - m)`, the largest variance of a [0, 1] variable with mean
        ``m`` (on the [-1, 1] scale), floored at one bin (``s >= 1/255``)."""
        m = pixel_mean
        s = (12 * m * (1 - m)).sqrt() / math.pi
        return torch.cat([2 * m - 1, s.clamp_min(1 / 255).log()])

