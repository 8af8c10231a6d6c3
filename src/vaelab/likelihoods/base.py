"""The base of every likelihood family: the registry, data checks, :class:`ObservationDistribution`
and :class:`LikelihoodFamily` (see :mod:`vaelab.likelihoods` for the conventions)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..registry import Registry

__all__ = ["LIKELIHOODS", "MEAN_CLAMP", "LikelihoodFamily", "ObservationDistribution"]

LIKELIHOODS: Registry[type[LikelihoodFamily]] = Registry("likelihood")

#: Means are clamped to [MEAN_CLAMP, 1 - MEAN_CLAMP] before taking logits in ``output_bias``.
MEAN_CLAMP = 1e-3
_LOG2 = math.log(2.0)


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


def _in_units(x: Tensor, binary: bool) -> bool:
    """Whether floating-point ``x`` is finite and in [0, 1] (exactly 0 or 1 where ``binary``)
    in one or two passes and one host sync: the fast path of
    :meth:`LikelihoodFamily.validate` (10x faster than the checks below, which find and name
    the offending values when it says False)."""
    if x.numel() == 0:
        return True
    with torch.no_grad():
        low, high = torch.aminmax(x)
        inside = (low >= 0) & (high <= 1)  # False for NaN too
        if binary:  # x - x^2 > 0 in float arithmetic for every x in (0, 1)
            inside &= torch.addcmul(x, x, x, value=-1).amax() <= 0
        return bool(inside)


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
        self._check_shape(x)
        if self.validate if validate is None else validate:
            self.family.validate(x)
        return self.family._log_prob_sum(self.params, x, tuple(range(1, x.dim())))

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
        return self.family._log_prob_samples(self.params, x, num_samples)

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
        if x.is_floating_point() and _in_units(x, self.data_kind == "binary"):
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

    # Subclass hooks: elementwise log-density (shaped like x), mean, sample. _log_prob_sum
    # and _log_prob_samples return per-example sums (the latter (S, B)); a family overrides
    # _log_prob_sum only to reduce before a last elementwise op (Bernoulli's negation).
    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_prob_sum(self, params: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        """``_log_prob(params, x)`` summed over ``dims``; a family whose log-density is a
        negated loss overrides it to negate the sums rather than every sub-pixel."""
        return self._log_prob(params, x).sum(dims)

    def _log_prob_samples(self, params: Tensor, x: Tensor, num: int) -> Tensor:
        """Per-example log-density ``(S, B)`` for ``params (S*B, P*C, *rest)`` (sample-major)
        and ``x (B, C, *rest)``: broadcast ``x`` when :attr:`elementwise` and ``P == 1``,
        else repeat it ``S`` times (one copy)."""
        x_rep = x.unsqueeze(0).expand(num, *x.shape)
        dims = tuple(range(2, x_rep.dim()))
        if self.elementwise and self.params_per_channel == 1:
            return self._log_prob_sum(params.unflatten(0, (num, -1)), x_rep, dims)
        flat = self._log_prob_sum(params, x_rep.reshape(-1, *x.shape[1:]),
                                  tuple(d - 1 for d in dims))
        return flat.unflatten(0, (num, -1))

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


