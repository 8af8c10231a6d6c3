r"""Importance sampling with the encoder's :math:`q(z|x)` as proposal (Burda et al. 2016):
:func:`vaelab.objectives.log_likelihood` as a registered estimator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..objectives import log_likelihood
from ..options import option, positive
from ..rng import Purpose
from .base import ESTIMATORS, Estimate

__all__ = ["ImportanceSampling", "ImportanceSamplingOptions"]


@dataclass(frozen=True)
class ImportanceSamplingOptions:
    """``eval.is``: see :class:`ImportanceSampling`."""

    samples: int = option(1000, positive, "importance samples K per example (5000: the IWAE "
                          "paper's protocol)")


@ESTIMATORS.register("is")
class ImportanceSampling:
    r""":math:`\log \frac1K \sum_k p(x, z_k) / q(z_k|x)`, :math:`z_k \sim q(z|x)`: a stochastic
    lower bound of :math:`\log p(x)` that converges as K grows (slowly when the weights are
    heavy-tailed: see the report's Pareto k-hat)."""

    name = "is"
    Options = ImportanceSamplingOptions
    purpose = Purpose.EVAL_IW

    def __init__(self, options: ImportanceSamplingOptions) -> None:
        self.options = options

    @property
    def samples(self) -> int:
        return self.options.samples

    @property
    def cost(self) -> float:
        """Decoder forward passes per example."""
        return float(self.options.samples)

    def describe(self) -> str:
        return f"K={self.options.samples}"

    def estimate(self, model, x: Tensor, generator: torch.Generator | None) -> Estimate:
        result = log_likelihood(model, x, num_samples=self.options.samples, generator=generator)
        return Estimate(result.per_example, result.mc_stderr, result.pareto_k, result.ess)

    def report(self, extras: list[dict]) -> dict:
        return {}
