r"""Estimators of :math:`\log p(x)` (a registry): importance sampling, annealed importance
sampling and, for checking AIS itself, bidirectional Monte Carlo.

==========  ===========================================================================
``is``      importance sampling with :math:`q(z|x)` (``[eval.is] samples``; the default)
``ais``     annealed importance sampling with HMC (``[eval.ais] steps, chains, ...``)
==========  ===========================================================================

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

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "get",
    "ImportanceSampling",
    "ImportanceSamplingOptions",
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
