r"""Observation models :math:`p(x \mid z)`: the families a decoder's outputs parameterise.

A family is an ``nn.Module`` (a learned scale is one of its parameters) that turns the
decoder output ``params`` into an :class:`ObservationDistribution`::

    family = likelihoods.get("gaussian", scale="learned")
    px = family(params)              # params (B, P*C, *rest), parameter-major
    log_px = px.log_prob(x)          # (B,) nats, summed over all event dims, constants kept

Layout: ``params.unflatten(1, (P, C))[:, p]`` is parameter ``p``, shaped like ``x``; for
``P == 1`` ``params`` has the shape of ``x``. ``x`` is ``(B, C, *rest)``, e.g.
``(B, 1, 28, 28)``, or flat ``(B, D)`` (then ``C = D``).

Data units (``data_kind``): ``"binary"`` float 0/1, ``"unit"`` float in [0, 1], ``"uint8"``
integers 0..255 (a uint8 or int64 tensor). ``log_prob`` checks ``x`` against them and raises
:class:`~vaelab.errors.DataError` with a one-line fix. The check costs a few passes over
``x``; a trainer that validated its data once may skip it with ``family(params,
validate=False)``, ``px.log_prob(x, validate=False)`` or ``family.validate_data = False``.
Shapes are always checked.

Registered families: ``bernoulli``, ``continuous-bernoulli``, ``gaussian``, ``laplace``,
``categorical-256``, ``discretized-logistic``, ``discretized-logistic-mixture``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .registry import Registry

__all__ = [
    "LIKELIHOODS",
    "get",
    "LikelihoodFamily",
    "ObservationDistribution",
    "Bernoulli",
    "ContinuousBernoulli",
    "Gaussian",
    "Laplace",
    "Categorical256",
    "DiscretizedLogistic",
    "DiscretizedLogisticMixture",
    "continuous_bernoulli_log_normalizer",
    "continuous_bernoulli_mean",
]

LIKELIHOODS: Registry[type[LikelihoodFamily]] = Registry("likelihood")

#: Means are clamped to [MEAN_CLAMP, 1 - MEAN_CLAMP] before taking logits in ``output_bias``.
MEAN_CLAMP = 1e-3
_LOG2 = math.log(2.0)


def get(name: str, **options: Any) -> LikelihoodFamily:
    """Build the registered family ``name`` with ``options`` (e.g. ``scale=0.1``).

    Raises:
        ConfigError: unknown family, unknown option (the message lists the valid ones)
            or an invalid option value.
    """
    cls = LIKELIHOODS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none (it takes no options)"
        raise ConfigError(
            f"unknown option {unknown[0]!r} for likelihood {name!r}: valid options are {choices}"
        )
    return cls(**options)


# --------------------------------------------------------------------------- validation


def _example(mask: Tensor, x: Tensor) -> tuple[str, str]:
    """``("<n> value(s)", "<first offending value>")`` for a boolean ``mask`` over ``x``."""
    n = int(mask.sum())
    v = x[mask].flatten()[0].item()
    return f"{n} value{'s' if n != 1 else ''}", (f"{v:.4g}" if isinstance(v, float) else str(v))


def _noun(n: str, adjective: str) -> str:
    """``_noun("3 values", "NaN/Inf")`` -> ``"3 NaN/Inf values"``."""
    count, noun = n.split()
    return f"{count} {adjective} {noun}"


def _check_unit(name: str, x: Tensor) -> None:
    """Float data in [0, 1]: finite, and not 0..255 pixels."""
    if not x.is_floating_point():
        raise DataError(
            f"{name} needs floating-point data in [0, 1] but got {x.dtype} data: "
            "convert 8-bit images with x.float() / 255 (ImageSet.batch() does this)"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        n, e = _example(bad, x)
        raise DataError(
            f"{name} got {_noun(n, 'NaN/Inf')}, e.g. {e}: fix the data pipeline "
            "(look for a division by zero or a bad normalisation) before computing likelihoods"
        )
    outside = (x < 0) | (x > 1)
    if outside.any():
        n, e = _example(outside, x)
        if bool((x >= 0).all()) and float(x.max()) <= 255:
            raise DataError(
                f"{name} needs data in [0, 1] but got {n} above 1, e.g. {e}; the data look "
                "like 0..255 pixel values: divide by 255"
            )
        raise DataError(
            f"{name} needs data in [0, 1] but got {n} outside it, e.g. {e}: "
            "rescale the data to [0, 1]"
        )


def _check_binary(name: str, x: Tensor) -> None:
    """Exactly 0/1 (after :func:`_check_unit`)."""
    grey = (x > 0) & (x < 1)
    if grey.any():
        n, e = _example(grey, x)
        raise DataError(
            f"{name} needs 0/1 data but got {n} strictly between 0 and 1, e.g. {e}: "
            "binarise the data (--binarize dynamic) or use the continuous-bernoulli likelihood "
            "(or pass unnormalized=True to reproduce BCE-on-grey-levels examples; "
            "it is not a likelihood)"
        )


_INT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_eight_bit(name: str, x: Tensor) -> None:
    """Integer pixel values 0..255."""
    if x.dtype not in _INT_DTYPES:
        raise DataError(
            f"{name} needs integer pixel values 0..255 (a uint8 or int64 tensor) but got "
            f"{x.dtype} data: pass the uint8 images (ImageSet.batch_uint8()), or use a family "
            "for [0, 1] data such as bernoulli, continuous-bernoulli or gaussian"
        )
    if x.dtype != torch.uint8:
        outside = (x < 0) | (x > 255)
        if outside.any():
            n, e = _example(outside, x)
            raise DataError(
                f"{name} needs pixel values 0..255 but got {n} outside that range, e.g. {e}: "
                "pass the uint8 images (ImageSet.batch_uint8())"
            )


# --------------------------------------------------------------------------- base classes


class ObservationDistribution:
    r""":math:`p(x \mid z)` for a batch: the family applied to decoder outputs ``params``.

    Attributes:
        family: the :class:`LikelihoodFamily`.
        params: decoder outputs ``(B, P*C, *rest)``.
        event_shape: ``(C, *rest)``, the shape of one example.
        validate: whether :meth:`log_prob` checks ``x`` by default.
    """

    def __init__(self, family: LikelihoodFamily, params: Tensor, validate: bool = True) -> None:
        p = family.params_per_channel
        if params.dim() < 2 or params.shape[1] % p:
            raise ConfigError(
                f"{family.name} needs {p} decoder outputs per data channel but got params of "
                f"shape {tuple(params.shape)}, whose dim 1 is not a multiple of {p}: build the "
                "decoder with likelihood.params_per_channel outputs per channel"
            )
        self.family = family
        self.params = params
        self.validate = validate
        self.event_shape = torch.Size((params.shape[1] // p, *params.shape[2:]))

    @property
    def shape(self) -> torch.Size:
        """The shape ``(B, C, *rest)`` of ``x``."""
        return torch.Size((self.params.shape[0], *self.event_shape))

    def _check_shape(self, x: Tensor) -> None:
        if x.shape != self.shape:
            fam = self.family
            raise DataError(
                f"{fam.name} params of shape {tuple(self.params.shape)} "
                f"({fam.params_per_channel} per data channel) fit data of shape "
                f"{tuple(self.shape)} but x has shape {tuple(x.shape)}: make the decoder output "
                f"(B, {fam.params_per_channel}*C, *rest) for data (B, C, *rest)"
            )

    def elementwise_log_prob(self, x: Tensor, validate: bool | None = None) -> Tensor:
        """Log-probability (nats) of each sub-pixel, shaped like ``x``."""
        self._check_shape(x)
        if self.validate if validate is None else validate:
            self.family.validate(x)
        return self.family._log_prob(self.params, x)

    def log_prob(self, x: Tensor, validate: bool | None = None) -> Tensor:
        """Exact per-example log-probability (nats), summed over all event dims: ``(B,)``.

        Args:
            x: ``(B, C, *rest)`` in the family's data units.
            validate: check ``x`` (None: use ``self.validate``).

        Raises:
            DataError: wrong shape, or (when validating) data outside the family's support.
        """
        lp = self.elementwise_log_prob(x, validate)
        return lp.sum(dim=tuple(range(1, lp.dim())))

    def log_prob_samples(self, x: Tensor, num_samples: int,
                         validate: bool | None = None) -> Tensor:
        r""":math:`\log p(x_b \mid z_{s,b})` for ``S = num_samples`` latent draws per example.

        ``params`` must have been decoded from ``z`` of shape ``(S*B, L)``, sample-major
        (row ``s*B + b`` is draw ``s`` of example ``b``); ``x`` is ``(B, C, *rest)``. The
        result ``(S, B)`` equals ``log_prob(x repeated S times).reshape(S, B)``, but ``x``
        is validated once and, for elementwise families, broadcast instead of copied.

        Raises:
            DataError: the shapes do not fit, or (when validating) bad data.
        """
        n, b = self.params.shape[0], x.shape[0]
        if num_samples < 1 or n != num_samples * b or x.shape[1:] != self.event_shape:
            fam = self.family
            raise DataError(
                f"{fam.name} params of shape {tuple(self.params.shape)} do not hold "
                f"{num_samples} draws for each of the {b} examples of x with shape "
                f"{tuple(x.shape)}: decode z of shape (S*B, L), sample-major"
            )
        if self.validate if validate is None else validate:
            self.family.validate(x)
        lp = self.family._log_prob_samples(self.params, x, num_samples)
        return lp.sum(dim=tuple(range(2, lp.dim())))

    @property
    def mean(self) -> Tensor:
        """The mean of ``x``, shaped like ``x``, in [0, 1] units (8-bit families divide by 255)."""
        return self.family._mean(self.params)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One draw per example in data units (uint8 for 8-bit families); no gradient."""
        with torch.no_grad():
            return self.family._sample(self.params, generator)


class LikelihoodFamily(nn.Module):
    """Base class: a decoder output family. Subclasses set the class attributes below and
    implement ``_log_prob(params, x)`` (elementwise, shaped like ``x``), ``_mean``, ``_sample``
    and :meth:`output_bias`; :class:`ObservationDistribution` does the shape checks,
    validation and the sum over event dims.

    Attributes:
        name: registry name.
        params_per_channel: decoder outputs per data channel, ``P``.
        data_kind: ``"binary"``, ``"unit"`` or ``"uint8"`` (see the module docstring).
        normalized: False only for bernoulli with ``unnormalized=True``.
        validate_data: default for ``validate`` in :meth:`forward` (True).
    """

    name: ClassVar[str] = ""
    params_per_channel: int = 1
    data_kind: str = "unit"
    normalized: bool = True
    #: ``_log_prob`` is a pure elementwise function of ``(params, x)`` when ``P == 1``, so it
    #: broadcasts over extra leading dims (lets :meth:`_log_prob_samples` skip a copy of x).
    elementwise: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.validate_data = True

    def forward(self, params: Tensor, validate: bool | None = None) -> ObservationDistribution:
        """Wrap decoder outputs ``(B, P*C, *rest)``; ``validate=False`` skips data checks."""
        return ObservationDistribution(
            self, params, self.validate_data if validate is None else validate
        )

    def validate(self, x: Tensor) -> None:
        """Raise :class:`DataError` unless ``x`` is in this family's data units and support."""
        if self.data_kind == "uint8":
            _check_eight_bit(self.name, x)
            return
        _check_unit(self.name, x)
        if self.data_kind == "binary":
            _check_binary(self.name, x)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        """Initial decoder output bias ``(P*C, *rest)`` from the per-sub-pixel data mean
        ``pixel_mean`` ``(C, *rest)`` in [0, 1]."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Options that rebuild this family: ``get(name, **family.config())``."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def _split(self, params: Tensor) -> list[Tensor]:
        """The ``P`` parameters, each shaped like ``x``."""
        p = self.params_per_channel
        if p == 1:
            return [params]
        return list(params.unflatten(1, (p, params.shape[1] // p)).unbind(1))

    # Subclass hooks: elementwise log-density (shaped like x), mean, sample.
    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_prob_samples(self, params: Tensor, x: Tensor, num: int) -> Tensor:
        """Elementwise log-density ``(S, B, C, *rest)`` for ``params (S*B, P*C, *rest)``
        (sample-major) and ``x (B, C, *rest)``: broadcast ``x`` when :attr:`elementwise` and
        ``P == 1``, else repeat it ``S`` times (one copy)."""
        x_rep = x.unsqueeze(0).expand(num, *x.shape)
        if self.elementwise and self.params_per_channel == 1:
            return self._log_prob(params.unflatten(0, (num, -1)), x_rep)
        return self._log_prob(params, x_rep.reshape(-1, *x.shape[1:])).unflatten(0, (num, -1))

    def _mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


#: dtypes whose softplus may use the threshold 40 (e^40 does not overflow; float16 would).
_EXACT_SOFTPLUS = (torch.float32, torch.float64)


def _softplus(x: Tensor) -> Tensor:
    """Exact ``log(1 + e^x)`` (``F.softplus`` returns ``x`` itself above 20, off by e^-20)."""
    return -F.logsigmoid(-x)


def _rand(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- 0/1 and [0,1]


@LIKELIHOODS.register("bernoulli")
class Bernoulli(LikelihoodFamily):
    r"""Bernoulli with logits :math:`l`: :math:`\log p(x) = x l - \mathrm{softplus}(l)`.

    Data must be exactly 0/1 floats. ``unnormalized=True`` also accepts grey levels in
    [0, 1]: that is binary cross-entropy on grey levels (the classic PyTorch VAE example),
    which is *not* a likelihood (``normalized`` becomes False, ``data_kind`` "unit").

    ``output`` says how the decoder's outputs become probabilities, to reproduce code that
    applies a sigmoid and then a cross-entropy on probabilities:

    - ``"logits"`` (default): the exact, stable log-sigmoid form above;
    - ``"keras-probs"``: :math:`p = \mathrm{clip}(\sigma(l), 10^{-7}, 1 - 10^{-7})` and the
      cross-entropy on ``p`` (Keras 3's ``binary_crossentropy`` with ``from_logits=False``
      on the torch backend: ``keras/src/backend/torch/nn.py``); the clip stops the gradient
      where :math:`\sigma(l)` leaves the interval;
    - ``"torch-probs"``: :math:`p = \sigma(l)` and ``F.binary_cross_entropy`` (PyTorch's
      examples/vae), whose log is clamped at -100 where :math:`\sigma(l)` rounds to 0 or 1.

    The clipped and clamped forms still sum to 1 over {0, 1}, so they stay normalised on
    0/1 data; they only lose precision (and gradient) for saturated outputs.
    """

    name = "bernoulli"
    data_kind = "binary"
    elementwise = True
    OUTPUTS = ("logits", "keras-probs", "torch-probs")
    KERAS_EPSILON = 1e-7  # keras.backend.epsilon()

    def __init__(self, unnormalized: bool = False, output: str = "logits") -> None:
        super().__init__()
        if not isinstance(unnormalized, bool):
            raise ConfigError(f"bernoulli option unnormalized must be true or false, "
                              f"got {unnormalized!r}")
        if output not in self.OUTPUTS:
            raise ConfigError(f"bernoulli option output must be one of {', '.join(self.OUTPUTS)}"
                              f", got {output!r}")
        self.unnormalized = unnormalized
        self.normalized = not unnormalized
        self.data_kind = "unit" if unnormalized else "binary"
        self.output = output

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        x = x.to(params.dtype)
        if self.output != "logits":
            p = torch.sigmoid(params)
            if self.output == "keras-probs":
                p = torch.clip(p, self.KERAS_EPSILON, 1.0 - self.KERAS_EPSILON)
            return -F.binary_cross_entropy(p, x, reduction="none")
        if params.dtype in _EXACT_SOFTPLUS and not (torch.is_grad_enabled()
                                                    and params.requires_grad):
            # No autograd (evaluation): x l - softplus(l) in one buffer, written in place;
            # 1.3x faster than the composite below (benchmarks/eval.py). softplus(l) = l
            # above the threshold 40, where log1p(e^-l) < 5e-18 is below float64 rounding.
            out = F.softplus(params, threshold=40.0)
            return out.addcmul_(x, params, value=-1).neg_()
        # max(l, 0) - l x + log1p(exp(-|l|)): no cancellation for large |l|; its fused
        # backward (sigmoid(l) - x) makes it the faster form under autograd.
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none")

    def _mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def _sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)

    def output_bias(self, pixel_mean: Tensor) -> Tensor:
        """``logit(clamp(mean, 1e-3, 1 - 1e-3))``."""
        return torch.logit(pixel_mean.clamp(MEAN_CLAMP, 1 - MEAN_CLAMP))

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unnormalized": self.unnormalized}
        if self.output != "logits":
            out["output"] = self.output
        return out


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


# --------------------------------------------------------------------------- location-scale


def _parse_scale(name: str, scale: Any) -> float | str:
    if scale in ("learned", "per-pixel"):
        return scale
    try:
        value = float(scale) if not isinstance(scale, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{name} scale must be a positive number (a fixed sigma), 'learned' or "
            f"'per-pixel', got {scale!r}"
        )
    return value


def _number(name: str, key: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} option {key} must be a number, got {value!r}") from None


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

    data_kind = "unit"
    elementwise = True  # with a fixed or learned scalar scale (P == 1)

    def __init__(self, scale: float | str = "learned", init_scale: float | None = None,
                 min_scale: float | None = None) -> None:
        super().__init__()
        self.scale = _parse_scale(self.name, scale)
        self.init_scale: float | None = None
        self.min_scale: float | None = None
        if isinstance(self.scale, float):
            if init_scale is not None or min_scale is not None:
                raise ConfigError(
                    f"{self.name} options init_scale and min_scale apply only to "
                    f"scale='learned' or 'per-pixel', not to a fixed scale {self.scale}"
                )
            return
        init_scale = 1.0 if init_scale is None else init_scale
        min_scale = 1e-3 if min_scale is None else min_scale
        self.init_scale = _number(self.name, "init_scale", init_scale)
        self.min_scale = _number(self.name, "min_scale", min_scale)
        floor = 0.0 if self.scale == "learned" else 1e-12  # per-pixel needs a positive floor
        if not (math.isfinite(self.init_scale) and self.init_scale > self.min_scale >= floor):
            raise ConfigError(
                f"{self.name} needs init_scale > min_scale >= 0 (min_scale > 0 for per-pixel), "
                f"got init_scale={self.init_scale}, min_scale={self.min_scale}"
            )
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


def _positive_int(name: str, key: str, value: Any) -> int:
    """``value`` as an int >= 1 (an int or a string of one), else a one-line ConfigError."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{name} option {key} must be a positive integer, got {value!r}")
    return number


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
    data_kind = "uint8"
    LOG_SCALE_MIN = DiscretizedLogistic.LOG_SCALE_MIN
    LOG_SCALE_MAX = DiscretizedLogistic.LOG_SCALE_MAX
    MAX_CHANNELS = 3

    def __init__(self, components: int = 10) -> None:
        """Args: components: K >= 1 (an int or a string of one). Raises: ConfigError."""
        super().__init__()
        self.components = _positive_int(self.name, "components", components)
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
