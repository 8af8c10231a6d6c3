r"""Importance sampling on every example, its bias measured by AIS on a random subsample.

Importance sampling with q(z|x) is cheap but biased high in NLL when its weights are
heavy-tailed (the report's Pareto k-hat says when); AIS converges but costs far more per
example. The two-phase estimate spends a fraction of the importance-sampling cost on AIS
and reports the mean NLL corrected for the importance-sampling bias:

1. importance sampling with K = ``samples`` on every example: :math:`\hat n_i`, its
   proposal q(z|x) refined per example by ``refine_steps`` Adam steps on the example's ELBO
   (:mod:`vaelab.estimators.refined`; ``refine_steps = 0``: q(z|x) itself);
2. AIS (``check_steps`` x ``check_chains``, ``check_leapfrog_steps`` leapfrog steps per
   transition) on ``check_examples`` examples drawn at random (a seeded permutation):
   :math:`a_i`, on exactly the inputs of phase 1; while the correction's standard error is
   above ``check_stderr``, the next examples of the permutation, a batch at a time, up to
   ``max_check_examples``;
3. :math:`\widehat{NLL} = \frac1N \sum_i \hat n_i - \frac1m \sum_{i \in S} (\hat n_i - a^*_i)`.

AIS itself is biased high in NLL by an amount that falls as 1/T for long runs (its bias is
about half the variance of the log-weights, which falls as 1/T), so the check also runs
with T/2 steps on the same examples, and :math:`a^*_i = a^T_i - (a^{T/2}_i - a^T_i)`
(Richardson extrapolation; ``extrapolate = false`` takes :math:`a^*_i = a^T_i`). The
*drift*, the mean of :math:`a^{T/2}_i - a^T_i`, is the bias removed; the verdict calls AIS
unconverged when it is above :data:`vaelab.evaluate.DRIFT_NATS` (0.05 without
extrapolation). The correction's standard error, :math:`\mathrm{sd}(\hat n_i - a^*_i)/\sqrt
m`, joins the Monte-Carlo standard error of phase 1 in ``nll_mc_stderr``. On the MNIST VAE
(200 hard test images) AIS gave 102.879, 102.831 and 102.782 nats with 500, 1,000 and
4,000 steps: the extrapolation from 500 and 1,000 steps, 102.783, is the 4,000-step value.

Defaults (measured in docs/estimators.md): K = 750 with q refined by 20 Adam steps (about
the cost of K = 1,000 with q; on the MNIST VAE it leaves a 3.6x smaller bias to correct and
paired differences that spread 30% less, so the check reaches its 0.05 nats with 400
examples where q's did not with 500); 400 examples, then up to 500; AIS 1,000 steps x 4
chains x 1 leapfrog step, which on the default model is 4x cheaper than 100 steps x 16
chains x 10 leapfrog steps and closer to converged AIS. ``auto`` (the default estimator)
is this estimate, or exact quadrature when the latent space has at most 2 dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..objectives import _is_diagonal_normal
from ..options import boolean, non_negative, option, positive
from ..rng import Purpose
from .ais import AIS, AISOptions
from .base import ESTIMATORS, Estimate
from .importance import ImportanceSampling, ImportanceSamplingOptions
from .quadrature import MAX_LATENT_DIM, Quadrature, QuadratureOptions
from .refined import (
    BACKWARD_COST,
    RefinedImportanceSampling,
    RefinedImportanceSamplingOptions,
)

__all__ = ["TwoPhase", "TwoPhaseOptions", "Auto", "AutoOptions", "decoder_flops"]


@dataclass(frozen=True)
class TwoPhaseOptions:
    """``eval.is-ais`` (and ``eval.auto``): see :mod:`vaelab.estimators.two_phase`."""

    samples: int = option(750, positive, "importance samples K on every example (with the "
                          "refinement about the cost of K = 1,000 with q(z|x))")
    check_examples: int = option(400, non_negative, "examples checked by AIS (0: none, plain "
                                 "importance sampling)")
    max_check_examples: int = option(500, non_negative, "more examples are checked, a batch "
                                     "at a time, while the correction's standard error is "
                                     "above check_stderr, up to this many")
    check_stderr: float = option(0.05, positive, "the correction's standard error (nats) "
                                 "that ends the check before max_check_examples")
    check_steps: int = option(1000, positive, "AIS annealing steps of the check (it runs "
                              "again with half as many to measure AIS's own convergence)")
    check_chains: int = option(4, positive, "AIS chains per checked example")
    check_leapfrog_steps: int = option(1, positive, "leapfrog steps per HMC transition of "
                                       "the check")
    extrapolate: bool = option(True, boolean, "remove AIS's own bias, extrapolated in 1/T "
                               "from check_steps / 2 and check_steps (Richardson)")
    refine_steps: int = option(20, non_negative, "phase 1's proposal: q(z|x) refined per "
                               "example by this many Adam steps on its ELBO, widened and mixed "
                               "with q as eval.is-refined's defaults (0: q(z|x) itself, the "
                               "default before; with samples = 1000)")
    refine_samples: int = option(4, positive, "reparameterised draws per refinement step")


@ESTIMATORS.register("is-ais")
class TwoPhase:
    """Importance sampling on every example, corrected by AIS on a random subsample."""

    name = "is-ais"
    Options = TwoPhaseOptions
    purpose = Purpose.EVAL_IW

    def __init__(self, options: TwoPhaseOptions) -> None:
        self.options = options
        self.first: Any = ImportanceSampling(ImportanceSamplingOptions(options.samples))
        if options.refine_steps:
            self.first = RefinedImportanceSampling(RefinedImportanceSamplingOptions(
                samples=options.samples, refine_steps=options.refine_steps,
                refine_samples=options.refine_samples))
        self.check = self._ais(options.check_steps)
        self.check_half = self._ais(max(1, options.check_steps // 2))
        #: when ``auto`` scaled K and the check down for a costly decoder: what it chose from
        self.scaled_for: dict[str, Any] | None = None

    def _ais(self, steps: int) -> AIS:
        return AIS(AISOptions(steps=steps, chains=self.options.check_chains,
                              leapfrog_steps=self.options.check_leapfrog_steps))

    @property
    def samples(self) -> int:
        return self.options.samples

    @property
    def check_examples(self) -> int:
        return self.options.check_examples

    @property
    def max_check_examples(self) -> int:
        return max(self.options.check_examples, self.options.max_check_examples)

    @property
    def check_stderr(self) -> float:
        return self.options.check_stderr

    def cost_for(self, examples: int) -> float:
        """Decoder passes per example of a split of ``examples`` (phase 2 spread over it; at
        most: the check may stop at ``check_examples``)."""
        checked = min(self.max_check_examples if self.check_examples else 0, examples)
        check = self.check.cost + self.check_half.cost
        return self.first.cost + check * checked / max(examples, 1)

    @property
    def cost(self) -> float:
        return self.cost_for(10_000)

    def describe(self) -> str:
        o = self.options
        first = self.first.describe()
        if not o.check_examples:
            return first
        extrapolated = f", extrapolated in 1/T from {o.check_steps // 2}" if o.extrapolate else ""
        text = (f"{first}, corrected by AIS ({o.check_steps} steps x {o.check_chains} "
                f"chains x {o.check_leapfrog_steps} leapfrog{extrapolated}) on "
                f"{o.check_examples} examples")
        if self.max_check_examples > o.check_examples:
            text += (f" (up to {self.max_check_examples} until its standard error is "
                     f"{o.check_stderr:g} nats)")
        scaled = self.scaled_for
        if scaled:
            refined = (f" with q refined by {scaled['refine_steps']} x "
                       f"{scaled['refine_samples']} steps" if scaled.get("refine_steps") else "")
            text += (f"; scaled down from K={scaled['samples']}{refined} and "
                     f"{scaled['check_examples']} examples checked with "
                     f"{scaled['check_steps']} steps for a {scaled['decoder_mflop']:.1f} MFLOP "
                     f"decoder (eval.auto.budget_gflop = {scaled['budget_gflop']:g})")
        return text

    def estimate(self, model, x: Tensor, generator: torch.Generator | None) -> Estimate:
        if isinstance(self.first, RefinedImportanceSampling):
            with torch.no_grad():
                diagonal = _is_diagonal_normal(model.encode(x))
            if not diagonal:  # a flow posterior: q itself, with phase 1's decoder passes
                plain = ImportanceSampling(ImportanceSamplingOptions(round(self.first.cost)))
                got = plain.estimate(model, x, generator)
                return dataclasses.replace(got, extras={"unrefined": int(x.shape[0])})
        return self.first.estimate(model, x, generator)

    def report(self, extras: list[dict]) -> dict:
        out = {"scaled_for": self.scaled_for} if self.scaled_for else {}
        unrefined = sum(e.get("unrefined", 0) for e in extras)
        if not unrefined:
            return out
        return {**out, "unrefined_examples": unrefined, "unrefined_why": (
            "q(z|x) is not a diagonal Gaussian (a flow), so phase 1 is importance sampling "
            f"with q itself, K = {round(self.first.cost)} (the refined proposal's cost)")}

    def correction(self, is_nll: Tensor, ais_nll: Tensor, ais_half_nll: Tensor) -> dict[str, Any]:
        """The correction from the checked examples' paired values: phase 1's, AIS's, and
        AIS's with half the steps (the drift; with ``extrapolate``, AIS extrapolated to
        infinitely many steps, ``2 a^T - a^{T/2}``). Means and standard errors in nats."""
        def paired(a: Tensor, b: Tensor) -> tuple[float, float]:
            d = (a - b).double()
            m = d.numel()
            return float(d.mean()), float(d.std() / math.sqrt(m)) if m > 1 else math.inf

        o = self.options
        ais_nll, ais_half_nll = ais_nll.double(), ais_half_nll.double()
        reference = 2 * ais_nll - ais_half_nll if o.extrapolate else ais_nll
        mean, stderr = paired(is_nll, reference)
        drift, drift_stderr = paired(ais_half_nll, ais_nll)
        return {"examples": is_nll.numel(), "mean": mean, "stderr": stderr,
                "is_nll": float(is_nll.double().mean()), "ais_nll": float(ais_nll.mean()),
                "extrapolated": o.extrapolate, "reference_nll": float(reference.mean()),
                "target_stderr": o.check_stderr, "max_examples": self.max_check_examples,
                "ais": {"steps": o.check_steps, "chains": o.check_chains,
                        "leapfrog_steps": o.check_leapfrog_steps},
                "drift": {"steps": self.check_half.options.steps, "mean": drift,
                          "stderr": drift_stderr}}


#: The fewest importance samples and checked examples ``auto`` scales down to.
MIN_SAMPLES, MIN_CHECKED = 100, 50

#: ``auto`` budgets its decoder FLOPs for a split of this many examples.
BUDGET_EXAMPLES = 10_000

#: For a costly decoder: K after the refinement with one draw per step (20 x 1 = 60
#: passes, 100 in all), and the check's AIS steps. Measured on the 28x28 conv model (first
#: 100 Fashion-MNIST test images, against AIS 2000/1000 x 4 extrapolated): q with K = 100
#: is 0.90 nats too high with paired differences that spread 2.35 nats; refined 20 x 1 with
#: K = 40, the same cost, 0.09 and 0.67; AIS 250/125 extrapolated is 0.03 from the
#: reference at a quarter of the 1000/500 check's cost (docs/estimators.md).
COSTLY_SAMPLES, COSTLY_REFINE_SAMPLES, COSTLY_CHECK_STEPS = 40, 1, 250


@dataclass(frozen=True)
class AutoOptions(TwoPhaseOptions):
    """``eval.auto``: the two-phase options, and how they shrink for a costly decoder."""

    quadrature_tolerance: float = option(0.01, positive, "nats: the quadrature of a 1-2-D "
                                         "latent space stops refining at this (0.01: about "
                                         "5x the cost of K = 1,000 on a ReLU decoder)")
    costly_max_check_examples: int = option(800, non_negative, "a costly decoder's check "
                                            "goes on, while the budget allows, up to this "
                                            "many examples")
    budget_gflop: float = option(7.0, positive, "decoder GFLOP per test example (importance "
                                 "sampling and the check together, for a 10,000-example "
                                 "split); a decoder that needs more gets the costly-decoder "
                                 "plan: the refinement with one draw per step and K = 40, and "
                                 "a 250-step check on as many examples as the rest buys "
                                 "(at least 50; 7: about 10 minutes for the 28x28 conv model "
                                 "on 2 cores)")


def decoder_flops(model) -> int | None:
    """FLOPs of one decoder pass (one latent vector; matmuls and convolutions, counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`), or None for a model without a
    ``decode`` or whose decoder the counter cannot run."""
    from torch.utils.flop_counter import FlopCounterMode

    if not hasattr(model, "decode") or not hasattr(model, "parameters"):
        return None
    try:
        param = next(model.parameters())
        z = torch.zeros(1, int(model.latent_dim), device=param.device, dtype=param.dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.decode(z)
    except (StopIteration, RuntimeError, TypeError, AttributeError):
        return None
    return int(counter.get_total_flops()) or None


@ESTIMATORS.register("auto")
class Auto(TwoPhase):
    """The default: exact quadrature when the latent space has at most 2 dimensions, else
    the two-phase estimate (:class:`TwoPhase`) with these options, K and the checked
    examples scaled down when the decoder needs more than ``budget_gflop`` per example."""

    name = "auto"
    Options = AutoOptions

    def for_model(self, model) -> Any:
        """The estimator this model gets: :class:`Quadrature` or the two-phase one.

        A decoder whose unscaled estimate needs more than ``budget_gflop`` per example
        (counted for a 10,000-example split) gets the cheaper plan its budget buys: phase
        1 refines q with one draw per step and K = :data:`COSTLY_SAMPLES` (or, when even
        that does not fit in half the budget, q itself with K scaled to it, at least
        :data:`MIN_SAMPLES`); the check runs AIS with :data:`COSTLY_CHECK_STEPS` steps on
        as many examples as the rest of the budget buys (at least :data:`MIN_CHECKED`, at
        most ``costly_max_check_examples``).
        Values the user set below these are kept."""
        if int(getattr(model, "latent_dim", MAX_LATENT_DIM + 1)) <= MAX_LATENT_DIM:
            return Quadrature(QuadratureOptions(tolerance=self.options.quadrature_tolerance))
        o = self.options
        base = {k: getattr(o, k) for k in TwoPhaseOptions.__dataclass_fields__}
        flops = decoder_flops(model)
        unscaled = TwoPhase(TwoPhaseOptions(**base))
        budget = o.budget_gflop * 1e9
        if flops is None or flops * unscaled.cost_for(BUDGET_EXAMPLES) <= budget:
            unscaled.name = "auto"
            return unscaled
        passes = budget / flops  # decoder passes per example the budget buys
        refine_cost = BACKWARD_COST * o.refine_steps * COSTLY_REFINE_SAMPLES
        if o.refine_steps and refine_cost + min(o.samples, COSTLY_SAMPLES) <= passes / 2:
            base.update(samples=min(o.samples, COSTLY_SAMPLES),
                        refine_samples=COSTLY_REFINE_SAMPLES)
        else:  # q itself, K scaled to half the budget (a K the user set below the floor kept)
            base["refine_steps"] = 0
            if o.samples > MIN_SAMPLES:
                base["samples"] = min(round(unscaled.first.cost),
                                      max(MIN_SAMPLES, round(passes / 2)))
        base["check_steps"] = min(o.check_steps, COSTLY_CHECK_STEPS)
        plan = TwoPhase(TwoPhaseOptions(**base))
        per_check = plan.check.cost + plan.check_half.cost
        affordable = (passes - plan.first.cost) * BUDGET_EXAMPLES / per_check
        most = max(MIN_CHECKED, round(affordable))
        base["check_examples"] = min(o.check_examples, most)
        base["max_check_examples"] = min(max(o.max_check_examples, o.costly_max_check_examples),
                                         most)
        two = TwoPhase(TwoPhaseOptions(**base))
        two.name = "auto"
        two.scaled_for = {
            "decoder_mflop": flops / 1e6, "budget_gflop": o.budget_gflop,
            "samples": o.samples, "refine_steps": o.refine_steps,
            "refine_samples": o.refine_samples, "check_examples": o.check_examples,
            "max_check_examples": o.max_check_examples, "check_steps": o.check_steps}
        return two
