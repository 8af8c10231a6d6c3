r"""What every :math:`\log p(x)` estimator returns, and the registry of estimators.

A registered estimator is a class with

- ``name`` and ``Options``, a frozen dataclass of its options with their constraints
  (the run config's ``[eval.<name>]`` section, :mod:`vaelab.options`);
- ``purpose``: the :class:`~vaelab.rng.Purpose` of its random draws (batch ``n`` of a split
  draws from ``seeded_generator(seed, n, purpose)``);
- ``__init__(options)``, ``samples`` (weights per example, for the Pareto k-hat threshold),
  ``cost`` (decoder passes per example, to say how long an evaluation takes),
  ``describe()`` (one line for the report's table), ``estimate(model, x, generator) ->``
  :class:`Estimate` for one batch, and ``report(extras) -> dict`` (what the batches'
  ``extras`` add to the report's ``estimator`` field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..registry import Registry

__all__ = ["ESTIMATORS", "Estimate"]

ESTIMATORS: Registry[type] = Registry("estimator")


@dataclass(frozen=True)
class Estimate:
    r"""One batch's estimates of :math:`\log p(x)`, all ``(B,)``.

    Attributes:
        log_likelihood: the estimate per example, nats (float64).
        mc_stderr: its Monte-Carlo standard error (NaN where it cannot be estimated).
        pareto_k: the PSIS k-hat of the example's weights (NaN for fewer than 25).
        ess: the effective sample size of the weights.
        extras: JSON-able numbers the estimator reports per batch (e.g. AIS acceptance).
    """

    log_likelihood: Tensor
    mc_stderr: Tensor
    pareto_k: Tensor
    ess: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
