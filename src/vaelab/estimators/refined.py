r"""Importance sampling with a per-example refined proposal (semi-amortised; Kim et al. 2018,
"Semi-Amortized Variational Autoencoders"; Krishnan et al. 2018).

The encoder's :math:`q(z|x)` is a poor proposal for a trained VAE (a Pareto k-hat above 0.7
on nearly every MNIST test image): it is narrower than the posterior and off-centre. Here,
for each example, the Gaussian :math:`r(z) = \mathcal N(\mu, \sigma^2)` starts at q's
location and scale and takes ``refine_steps`` Adam steps (learning rate ``refine_lr``) on
the example's ELBO :math:`\mathbb E_r[\log p(x, z)] + H[r]`, reparameterised with
``refine_samples`` draws per step. Then

.. math::
    \log \hat p(x) = \log \frac1K \sum_k \frac{p(x, z_k)}{\rho(z_k)},\qquad
    \rho = (1 - \alpha)\, r_w + \alpha\, q(z|x),

with :math:`r_w` the refined Gaussian with its scale multiplied by ``widen`` (or, with
``proposal = "student-t"``, a multivariate Student-t with ``df`` degrees of freedom at the
same location and scale), :math:`\alpha` = ``defensive`` (a defensive mixture: a fixed
:math:`(1-\alpha) K` draws from :math:`r_w` and :math:`\alpha K` from q, weighted by the
mixture density, the balance heuristic of multiple importance sampling, Veach & Guibas
1995). Only the proposal changes, and it is fixed before the K draws, so each weight is
still an unbiased estimate of p(x): the estimate is a stochastic lower bound of
:math:`\log p(x)` that converges as K grows, exactly as with q.

The refinement differentiates with respect to :math:`\mu, \log\sigma` only
(:func:`torch.autograd.grad`): the model's parameters and their ``.grad`` are untouched.
Cost per example: K decoder forward passes plus ``refine_steps x refine_samples`` forward
and backward passes (counted as 3 forward passes each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..objectives import (
    _decoder_log_prob,
    _delta_method_stderr,
    _is_diagonal_normal,
    _standard_normal,
    default_chunk,
)
from ..options import non_negative, one_of, option, positive
from ..psis import WeightDiagnostics
from ..rng import Purpose
from .base import ESTIMATORS, Estimate

__all__ = ["RefinedImportanceSampling", "RefinedImportanceSamplingOptions", "refine"]

#: Decoder forward passes one forward-and-backward pass is counted as.
BACKWARD_COST = 3.0


def _below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


_below_one.fix = "give a value in [0, 1), e.g. 0.1"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RefinedImportanceSamplingOptions:
    """``eval.is-refined``: see :mod:`vaelab.estimators.refined`."""

    samples: int = option(1000, positive, "importance samples K per example")
    refine_steps: int = option(20, non_negative, "Adam steps on each example's ELBO before "
                               "sampling (0: q(z|x) itself)")
    refine_samples: int = option(4, positive, "reparameterised draws per refinement step")
    refine_lr: float = option(0.05, positive, "Adam's learning rate on the location and the "
                              "log-scale")
    proposal: str = option("normal", one_of("normal", "student-t"), "the refined proposal's "
                           "family at the refined location and scale")
    df: int = option(5, positive, "degrees of freedom of the student-t proposal")
    widen: float = option(1.2, positive, "the refined scale is multiplied by this")
    defensive: float = option(0.1, _below_one, "share of the K draws taken from q(z|x), "
                              "weighted by the mixture density (balance heuristic)")


def refine(model, x: Tensor, loc: Tensor, log_scale: Tensor, steps: int, samples: int,
           lr: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""``(loc, log_scale)``, both ``(B, L)`` and detached: ``steps`` Adam steps from the
    given ones on each example's ELBO :math:`\frac1S \sum_s \log p(x, \mu + \sigma
    \epsilon_s) + \sum_j \log \sigma_j` (+ const), ``samples`` = S fresh draws per step from
    ``generator``. Adam acts elementwise and the loss is a sum over examples, so each
    example's result depends only on its own draws. Examples whose values become non-finite
    keep the starting ones."""
    start_loc, start_log_scale = loc.detach(), log_scale.detach()
    if steps == 0:
        return start_loc, start_log_scale
    loc = start_loc.clone().requires_grad_(True)
    log_scale = start_log_scale.clone().requires_grad_(True)
    prior = model.prior(x.device)
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            eps = _standard_normal(samples, loc.shape, loc, generator)
            z = loc + log_scale.exp() * eps
            joint = _decoder_log_prob(model, x, z, None if step == 0 else False)
            joint = joint + prior.log_prob(z)
            loss = -(joint.mean(0) + log_scale.sum(-1)).sum()
            loc.grad, log_scale.grad = torch.autograd.grad(loss, [loc, log_scale])
            optimizer.step()
    loc, log_scale = loc.detach(), log_scale.detach()
    ok = (loc.isfinite() & log_scale.isfinite()).all(-1, keepdim=True)
    return torch.where(ok, loc, start_loc), torch.where(ok, log_scale, start_log_scale)


def _gaussian_log_density(t: Tensor, log_scale: Tensor) -> Tensor:
    """log N(z; loc, scale^2) summed over the last dim, from t = (z - loc) / scale."""
    dim = t.shape[-1]
    return -0.5 * t.square().sum(-1) - log_scale.sum(-1) - 0.5 * dim * math.log(2 * math.pi)


def _student_log_density(t: Tensor, log_scale: Tensor, df: int) -> Tensor:
    """log of the multivariate Student-t (``df`` degrees of freedom, diagonal scale) from
    t = (z - loc) / scale."""
    dim = t.shape[-1]
    const = (math.lgamma((df + dim) / 2) - math.lgamma(df / 2)
             - 0.5 * dim * math.log(df * math.pi))
    return const - log_scale.sum(-1) - 0.5 * (df + dim) * torch.log1p(t.square().sum(-1) / df)


@ESTIMATORS.register("is-refined")
class RefinedImportanceSampling:
    r"""Importance sampling with q(z|x) refined per example by a few Adam steps on its ELBO
    (optionally widened, Student-t, or mixed with q): see :mod:`vaelab.estimators.refined`.
    Needs a diagonal Gaussian q(z|x)."""

    name = "is-refined"
    Options = RefinedImportanceSamplingOptions
    purpose = Purpose.EVAL_IW

    def __init__(self, options: RefinedImportanceSamplingOptions) -> None:
        self.options = options

    @property
    def samples(self) -> int:
        return self.options.samples

    @property
    def cost(self) -> float:
        """Decoder forward passes per example (a backward pass counted as two)."""
        o = self.options
        return float(o.samples + BACKWARD_COST * o.refine_steps * o.refine_samples)

    def describe(self) -> str:
        o = self.options
        family = "Gaussian" if o.proposal == "normal" else f"Student-t (df={o.df})"
        text = (f"K={o.samples}, proposal: {family} refined by {o.refine_steps} Adam steps "
                f"(lr {o.refine_lr:g}, {o.refine_samples} draws)" if o.refine_steps else
                f"K={o.samples}, proposal: {family} at q(z|x)")
        if o.widen != 1.0:
            text += f", scale x{o.widen:g}"
        if o.defensive:
            text += f", mixed with q(z|x) ({o.defensive:g} of the draws)"
        return text

    def estimate(self, model, x: Tensor, generator: torch.Generator | None) -> Estimate:
        o = self.options
        with torch.no_grad():
            q = model.encode(x)
        if not _is_diagonal_normal(q):
            raise ConfigError(f"the is-refined estimator needs a diagonal Gaussian q(z|x), got "
                              f"{type(q).__name__}: use estimator = \"is\" or \"ais\"")
        q_loc, q_scale = q.base_dist.loc.detach(), q.base_dist.scale.detach()
        q_log_scale = q_scale.log()
        loc, log_scale = refine(model, x, q_loc, q_log_scale, o.refine_steps,
                                o.refine_samples, o.refine_lr, generator)
        log_scale = log_scale + math.log(o.widen)
        scale = log_scale.exp()
        from_q = round(o.defensive * o.samples)
        from_r = o.samples - from_q
        log_share_r = math.log(from_r / o.samples) if from_r else -math.inf
        log_share_q = math.log(from_q / o.samples) if from_q else -math.inf

        def log_r(t: Tensor) -> Tensor:
            if o.proposal == "student-t":
                return _student_log_density(t, log_scale, o.df)
            return _gaussian_log_density(t, log_scale)

        with torch.no_grad():
            prior = model.prior(x.device)
            weights = WeightDiagnostics(o.samples, x.shape[0], device=x.device)
            chunk, validate = default_chunk(model, x, o.samples), None
            for component, count_all in (("r", from_r), ("q", from_q)):
                for start in range(0, count_all, chunk):
                    count = min(chunk, count_all - start)
                    eps = _standard_normal(count, loc.shape, loc, generator)
                    if component == "r":
                        t = eps
                        if o.proposal == "student-t":  # t = eps / sqrt(u / df), u ~ chi2(df)
                            u = _standard_normal(o.df, (count, *loc.shape[:-1]), loc,
                                                 generator).square().sum(0)
                            t = eps * (o.df / u).sqrt().unsqueeze(-1)
                        z = loc + scale * t
                        log_rz = log_r(t)
                        log_qz = (_gaussian_log_density((z - q_loc) / q_scale, q_log_scale)
                                  if from_q else None)
                    else:
                        z = q_loc + q_scale * eps
                        log_qz = _gaussian_log_density(eps, q_log_scale)
                        log_rz = log_r((z - loc) / scale)
                    log_mix = log_share_r + log_rz
                    if from_q:
                        log_mix = torch.logaddexp(log_mix, log_share_q + log_qz)
                    log_w = (_decoder_log_prob(model, x, z, validate)
                             + prior.log_prob(z) - log_mix)
                    validate = False  # x is checked with the first chunk only
                    weights.update(log_w)
        per_example = weights.log_sum_w - math.log(o.samples)
        diagnostics = weights.result()
        mc = _delta_method_stderr(weights.log_sum_w, weights.log_sum_w2, o.samples)
        return Estimate(per_example, mc, diagnostics.pareto_k, diagnostics.ess)

    def report(self, extras: list[dict]) -> dict:
        return {}
