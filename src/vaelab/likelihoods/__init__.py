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

Registered families, one file each (adding one: its file, its import below, its row in
``tests/likelihood_examples.py``): ``bernoulli``, ``continuous-bernoulli``, ``gaussian``,
``laplace``, ``categorical-256``, ``discretized-logistic``, ``discretized-logistic-mixture``.
Each declares its options as a frozen dataclass with their constraints (``Options``, e.g.
:class:`~vaelab.likelihoods.bernoulli.BernoulliOptions`): the run config's
``[likelihood.<name>]`` section, checked by :func:`vaelab.options.build`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..options import build
from .base import LIKELIHOODS, MEAN_CLAMP, LikelihoodFamily, ObservationDistribution
from .bernoulli import Bernoulli, BernoulliOptions
from .categorical import Categorical256
from .continuous_bernoulli import (
    ContinuousBernoulli,
    continuous_bernoulli_log_normalizer,
    continuous_bernoulli_mean,
)
from .gaussian import Gaussian
from .laplace import Laplace
from .location_scale import LocationScaleOptions
from .logistic import DiscretizedLogistic
from .logistic_mixture import DiscretizedLogisticMixture, MixtureOptions

__all__ = [
    "LIKELIHOODS",
    "MEAN_CLAMP",
    "get",
    "LikelihoodFamily",
    "ObservationDistribution",
    "Bernoulli",
    "BernoulliOptions",
    "ContinuousBernoulli",
    "Gaussian",
    "Laplace",
    "LocationScaleOptions",
    "Categorical256",
    "DiscretizedLogistic",
    "DiscretizedLogisticMixture",
    "MixtureOptions",
    "continuous_bernoulli_log_normalizer",
    "continuous_bernoulli_mean",
]


def get(name: str, **options: Any) -> LikelihoodFamily:
    """Build the registered family ``name`` with ``options`` (e.g. ``scale=0.1``; strings
    from a command line are converted as the config does).

    Raises:
        ConfigError: unknown family, unknown option (the message lists the valid ones)
            or an invalid option value.
    """
    cls = LIKELIHOODS[name]
    chosen = build(LIKELIHOODS.options(name), options, f"likelihood.{name}")
    return cls(**dataclasses.asdict(chosen))
