"""The mixture of discretised logistics of PixelCNN++ with its colour coupling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..options import option, positive, validate
from .base import LIKELIHOODS, MEAN_CLAMP, LikelihoodFamily, ObservationDistribution, _rand
from .logistic import DiscretizedLogistic, _logistic_bin_log_mass, _logistic_bin_mean

__all__ = ["DiscretizedLogisticMixture", "MixtureOptions"]


@dataclass(frozen=True)
class MixtureOptions:
    """``likelihood.discretized-logistic-mixture``: see :class:`DiscretizedLogisticMixture`."""

    components: int = option(10, positive, "mixture components K per pixel")


#: Coupled channel pairs ``(i, j)`` (the mean of channel ``i`` moves with observed channel
#: ``j``), in coefficient-slot order: PixelCNN++'s alpha (G|R), beta (B|R), gamma (B|G).
_COUPLED_PAIRS = ((1, 0), (2, 0), (2, 1))


@LIKELIHOODS.register("discretized-logistic-mixture")
class DiscretizedLogisticMixture(LikelihoodFamily):
    r"""Mixture of ``components`` (:math:`K`, default 10) discretised logistics per pixel with
    PixelCNN++ colour coupling (Salimans et al. 2017, sec. 2.1-2.2), ``P = 4K``.

    For a pixel with channels :math:`x_0, \dots, x_{C-1}` (values 0..255, :math:`C \le 3`) and
    :math:`y_c = (2 x_c - 255)/255` on the [-1, 1] scale,

    .. math::
        p(x) = \sum_k \pi_k \prod_c \mathrm{DL}(x_c;\ \tilde\mu_{k,c}, s_{k,c}),\qquad
        \tilde\mu_{k,0} = \mu_{k,0},\quad \tilde\mu_{k,1} = \mu_{k,1} + \alpha_k y_0,\quad
        \tilde\mu_{k,2} = \mu_{k,2} + \beta_k y_0 + \gamma_k y_1,

    where :math:`\mathrm{DL}` is :class:`DiscretizedLogistic`'s bin mass (computed with its
    exact formula: no mid-bin fallback, stable at 0 and 255) and
    :math:`\alpha, \beta, \gamma \in (-1, 1)`.

    **Colour coupling (the choice).** One set of mixture weights per pixel, shared by its
    channels, and the means of G and B move linearly with the *observed* R (and G), as in
    PixelCNN++. Given ``z`` a pixel's colour channels err together (mostly in brightness);
    independent channels given the component could express that only through the mixture
    weights, the linear terms express it with 3 numbers per component. It is also the
    likelihood of the VAEs whose CIFAR-10 bits/dim are usually quoted (NVAE, VDVAE), so
    numbers are comparable. It stays exactly normalised: for each component the joint is
    :math:`p(x_0 \mid k)\, p(x_1 \mid x_0, k)\, p(x_2 \mid x_0, x_1, k)`, each factor a
    discretised logistic over 256 values whose location depends only on channels already
    fixed, so it sums to 1; a convex combination of normalised joints is normalised. Costs:
    data must have 1, 2 or 3 channels (a flat ``(B, D)`` layout counts ``D`` channels and is
    refused), and :attr:`~ObservationDistribution.mean` is a plug-in approximation for
    coupled channels (below). Grey images (``C = 1``) are a plain mixture.

    **Layout.** ``params (B, 4*K*C, *rest)``, viewed as ``params.unflatten(1, (4, K, C))``;
    group ``[g, k, c]`` is

    - ``g = 0``: a mixture-logit slot :math:`w_{k,c}`; the pixel's mixture logits are
      :math:`\frac{1}{C}\sum_c w_{k,c}`, :math:`\pi = \mathrm{softmax}_k` of them (every
      output is used; for RGB PixelCNN++ has ``K`` logits instead of ``3K`` slots);
    - ``g = 1``: location :math:`\mu_{k,c}` on the [-1, 1] scale;
    - ``g = 2``: :math:`\log s_{k,c}`, clamped to [-7, 7] as in :class:`DiscretizedLogistic`;
    - ``g = 3``: a raw coupling coefficient :math:`r_{k,c}`; slot ``c`` holds
      :math:`\tanh(r)` = alpha (G|R), beta (B|R), gamma (B|G) for ``c = 0, 1, 2`` (PixelCNN++'s
      order). Unused for ``C = 1`` and slot 1 unused for ``C = 2`` (zero gradient).

    The decoder thus outputs ``4 K C`` channels (120 for RGB with K = 10).

    **Per-sub-pixel values.** :meth:`~ObservationDistribution.elementwise_log_prob` gives the
    chain-rule conditionals :math:`\log p(x_c \mid x_{<c})` (the component posterior given
    the earlier channels mixes the component conditionals), each normalised over the 256
    values of :math:`x_c`; they sum over ``c`` to :math:`\log p(x)` of the pixel, which is
    what ``log_prob`` adds up (nats, ``(B,)``).

    **Mean** (for figures, [0, 1] units): :math:`\sum_k \pi_k m_{k,c}` with
    :math:`m_{k,c}` the exact mean of component ``k``'s channel ``c`` when the coupled
    channels are replaced by their component means,
    :math:`y_j \to 2 m_{k,j} - 1`. Exact for ``C = 1`` and whenever the coefficients are 0;
    otherwise off by the curvature of the clipped mean near 0 and 255 (measured: under one
    grey level for scales up to 17 grey levels; a few grey levels for broad components
    piled up at 0 or 255). The exact value needs sums over :math:`256^{C-1}` values per
    pixel. **Samples** are exact: a component by Gumbel-max, then the channels in order,
    uint8.
    """

    name = "discretized-logistic-mixture"
    Options = MixtureOptions
    data_kind = "uint8"
    LOG_SCALE_MIN = DiscretizedLogistic.LOG_SCALE_MIN
    LOG_SCALE_MAX = DiscretizedLogistic.LOG_SCALE_MAX
    MAX_CHANNELS = 3

    def __init__(self, components: int = 10) -> None:
        """Args: components: K >= 1. Raises: ConfigError."""
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int):
            raise ConfigError(f"likelihood.{self.name}.components must be a positive integer, "
                              f"got {components!r}")
        validate(MixtureOptions(components), f"likelihood.{self.name}")
        self.components = components
        self.params_per_channel = 4 * self.components

    def config(self) -> dict[str, Any]:
        return {"components": self.components}

    def forward(self, params: Tensor, validate: bool | None = None) -> ObservationDistribution:
        """As :meth:`LikelihoodFamily.forward`; DataError unless C is 1, 2 or 3."""
        px = super().forward(params, validate)
        self._check_channels(params)
        return px

    def _check_channels(self, params: Tensor) -> int:
        c = params.shape[1] // self.params_per_channel
        if not 1 <= c <= self.MAX_CHANNELS:
            raise DataError(
                f"{self.name} couples the channels of a pixel and takes data (B, C, *rest) with "
                f"1, 2 or 3 channels, but params of shape {tuple(params.shape)} give C = {c} "
                "(a flat (B, D) layout counts D channels): keep the channel dim, or use "
                "discretized-logistic or categorical-256"
            )
        return c

    def _unpack(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""``(log_pi (B, K, 1, *rest), loc, log_s (B, K, C, *rest), coef (B, K, C(C-1)/2,
        *rest))``: log mixture weights, locations, clamped log-scales, tanh'd coefficients."""
        c = self._check_channels(params)
        w, loc, log_s, raw = params.unflatten(1, (4, self.components, c)).unbind(1)
        log_pi = w.mean(2, keepdim=True).log_softmax(1)
        log_s = log_s.clamp(self.LOG_SCALE_MIN, self.LOG_SCALE_MAX)
        return log_pi, loc, log_s, torch.tanh(raw[:, :, : c * (c - 1) // 2])

    @staticmethod
    def _shift(loc: Tensor, coef: Tensor, y: list[Tensor], i: int) -> Tensor:
        r"""Location of channel ``i`` given the earlier channels' values ``y[j]`` ([-1, 1]):
        :math:`\mu_i + \sum_{j<i} \mathrm{coef}_{(i,j)} y_j`, shaped ``(B, K, *rest)``."""
        out = loc[:, :, i]
        for slot, (a, j) in enumerate(_COUPLED_PAIRS):
            if a == i:
                out = out + coef[:, :, slot] * y[j]
        return out

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        log_pi, loc, log_s, coef = self._unpack(params)
        c = loc.shape[2]
        xk = x.unsqueeze(1)  # (B, 1, C, *rest): broadcast over components
        xf = xk.to(loc.dtype)
        if c > 1:
            y = ((2 * xf - 255) / 255).unbind(2)
            loc = torch.stack([self._shift(loc, coef, y, i) for i in range(c)], 2)
        lp = _logistic_bin_log_mass(xk, xf, loc, torch.exp(-log_s))  # (B, K, C, *rest)
        # log pi_k + log p(x_{<c} | k), shifted by its max over k (no cancellation of large
        # magnitudes); then log p(x_c | x_<c) = lse_k(d + lp_c) - lse_k(d).
        prev = torch.cat([log_pi, log_pi + lp[:, :, :-1].cumsum(2)], 2) if c > 1 else log_pi
        d = prev - prev.detach().amax(1, keepdim=True)
        return torch.logsumexp(d + lp, 1) - d.exp().sum(1).log()

    def _mean(self, params: Tensor) -> Tensor:
        log_pi, loc, log_s, coef = self._unpack(params)
        inv_s = torch.exp(-log_s)
        y: list[Tensor] = []
        means = []
        for i in range(loc.shape[2]):
            m = _logistic_bin_mean(self._shift(loc, coef, y, i), inv_s[:, :, i])
            means.append(m)
            y.append(2 * m - 1)
        return (log_pi.exp() * torch.stack(means, 2)).sum(1)

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        log_pi, loc, log_s, coef = self._unpack(params)
        gumbel = -torch.log(-torch.log(_rand(log_pi, generator)))
        k = (log_pi + gumbel).argmax(1, keepdim=True)  # (B, 1, 1, *rest)

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, k.expand(-1, -1, t.shape[2], *t.shape[3:]))

        loc, scale, coef = pick(loc), pick(log_s).exp(), pick(coef)
        y: list[Tensor] = []
        draws = []
        for i in range(loc.shape[2]):
            u = _rand(scale[:, :, i], generator)  # u = 0 gives -inf, which lands in bin 0
            v = self._shift(loc, coef, y, i) + scale[:, :, i] * (torch.log(u) - torch.log1p(-u))
            v = ((v + 1) * 127.5).round().clamp(0, 255)
            draws.append(v)
            y.append((2 * v - 255) / 255)
        return torch.stack(draws, 2)[:, 0].to(torch.uint8)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        r"""All ``K`` components equal (the decoder's random output weights break the tie),
        equal weights, coefficients 0; per sub-pixel the scale of
        :meth:`DiscretizedLogistic.output_bias` (variance :math:`4m(1-m)` on the [-1, 1]
        scale, at least one bin) and the location, by bisection, whose *exact* mean is the
        data mean ``m`` clamped to [1e-3, 1 - 1e-3]. So a decoder that outputs only this bias
        predicts the data mean (to 1e-12 in float64). Returns ``(4*K*C, *rest)``."""
        m = pixel_mean.double().clamp(MEAN_CLAMP, 1 - MEAN_CLAMP)
        s = ((12 * m * (1 - m)).sqrt() / math.pi).clamp_min(1 / 255)
        lo, hi = -1 - 40 * s, 1 + 40 * s  # means within 1e-15 of 0 and of 1
        for _ in range(64):
            mid = (lo + hi) / 2
            above = _logistic_bin_mean(mid, 1 / s) > m
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        groups = torch.stack([torch.zeros_like(m), (lo + hi) / 2, s.log(), torch.zeros_like(m)])
        bias = groups.unsqueeze(1).expand(4, self.components, *m.shape)
        return bias.flatten(0, 2).to(pixel_mean.dtype)
