r"""Estimators of :math:`\log p(x)` (a registry): importance sampling, annealed importance
sampling and, for checking AIS itself, bidirectional Monte Carlo.

==============  =======================================================================
``auto``        the default: ``quadrature`` for latent spaces of 1 or 2 dimensions, else
                ``is-ais`` (``[eval.auto]``: the options of ``is-ais``)
``quadrature``  exact log p(x) by nested trapezoid quadrature (latent dimension <= 2)
``is-ais``      importance sampling on every example, its bias measured by AIS on a
                random subsample and subtracted
``is``          importance sampling with :math:`q(z|x)` (``[eval.is] samples``)
``is-refined``  importance sampling with q(z|x) refined per example by a few Adam steps
                on its ELBO (``[eval.is-refined]``)
``ais``         annealed importance sampling with HMC (``[eval.ais] steps, chains, ...``)
==============  =======================================================================

Each is a class in its own file with its ``Options`` (see :mod:`.base` for the interface);
adding one: its file, its import here, its row in ``tests/test_estimators.py``'s example
table. :func:`get` builds one from its name and options; :func:`vaelab.metrics.nll_metrics`
runs it over a split.
"""

from __future__ import annotations

from typing import Any

from ..options import build
from .ais import (
    AIS,
    SCHEDULES,
    STARTS,
    AISEstimate,
    AISOptions,
    BDMCResult,
    ais,
    bdmc,
    linear_schedule,
    sigmoid_schedule,
)
from .base import ESTIMATORS, Estimate
from .importance import ImportanceSampling, ImportanceSamplingOptions
from .quadrature import MAX_LATENT_DIM, Quadrature, QuadratureOptions
from .refined import RefinedImportanceSampling, RefinedImportanceSamplingOptions
from .two_phase import Auto, AutoOptions, TwoPhase, TwoPhaseOptions, decoder_flops

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "get",
    "ImportanceSampling",
    "ImportanceSamplingOptions",
    "RefinedImportanceSampling",
    "RefinedImportanceSamplingOptions",
    "Quadrature",
    "QuadratureOptions",
    "MAX_LATENT_DIM",
    "TwoPhase",
    "TwoPhaseOptions",
    "Auto",
    "AutoOptions",
    "decoder_flops",
    "AIS",
    "AISOptions",
    "SCHEDULES",
    "STARTS",
    "AISEstimate",
    "BDMCResult",
    "ais",
    "bdmc",
    "linear_schedule",
    "sigmoid_schedule",
]


def get(name: str, options: Any = None, **values: Any) -> Any:
    """The registered estimator ``name`` with ``options`` (its Options dataclass, or None for
    the defaults) updated by ``values`` (e.g. ``samples=5000``).

    Raises:
        ConfigError: an unknown name (the valid ones listed), option or value.
    """
    cls = ESTIMATORS[name]
    return cls(build(ESTIMATORS.options(name), values, f"eval.{name}", base=options))
