r"""Independent estimators of :math:`\log p(x)`: annealed importance sampling and BDMC.

Annealed importance sampling (AIS; Neal 2001, "Annealed importance sampling", Statistics
and Computing 11) moves each chain through the geometric path

.. math::
    f_t(z) = f_0(z)^{1 - \beta_t}\, p(x, z)^{\beta_t}, \qquad
    0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

from a normalised start :math:`f_0` (``start="q"``: the encoder's :math:`q(z|x)`, the
default; ``start="prior"``: :math:`p(z)`) to the unnormalised posterior :math:`p(x, z)`,
whose normaliser is :math:`p(x)`. A chain starts at :math:`z_0 \sim f_0`; for
:math:`t = 1..T` it adds :math:`(\beta_t - \beta_{t-1})\, h(z_{t-1})`,
:math:`h = \log p(x, z) - \log f_0(z)`, to its log-weight, then (for :math:`t < T`) moves
with an HMC transition that leaves :math:`f_t` invariant. (The transition at
:math:`\beta_T` would not change the weight and is skipped: T steps cost T - 1
transitions.) Each weight is an unbiased estimate of :math:`p(x)`; the log of the mean of
C chains' weights is a stochastic lower bound (Jensen), exact as T grows. ``steps = 1`` is
plain importance sampling with ``q`` (or the prior) as proposal.

Bidirectional Monte Carlo (BDMC; Grosse, Ghahramani & Adams 2015, "Sandwiching the
marginal likelihood using bidirectional Monte Carlo"; for VAEs Wu, Burda, Salakhutdinov &
Grosse 2017, "On the quantitative analysis of decoder-based generative models") simulates
:math:`z \sim p(z)`, :math:`x \sim p(x|z)`, so that :math:`z` is an exact posterior
sample for :math:`x`. Forward AIS gives a stochastic lower bound of :math:`\log p(x)`; AIS
run backwards from :math:`z` (:math:`\beta` from 1 to 0) gives weights whose mean is an
unbiased estimate of :math:`1/p(x)`, so minus its log is a stochastic upper bound. The gap
bounds the error of AIS with these settings on data like the model's.

Annealing schedule (``schedule``): ``"sigmoid"`` (default; Grosse et al. 2015, used by Wu
et al. 2017) :math:`\beta_t = (\sigma(\tilde t) - \sigma(-4)) / (\sigma(4) - \sigma(-4))`,
:math:`\tilde t = -4 + 8t/T`: small steps at both ends, where the path changes fastest;
``"linear"``: :math:`\beta_t = t/T`.

HMC transitions (Neal 2011, "MCMC using Hamiltonian dynamics"): ``leapfrog_steps``
leapfrog steps (default 10, as Wu et al. 2017) and a Metropolis test. The mass matrix is
diagonal and fixed: the inverse mass at :math:`\beta` is
:math:`s_\beta^2 = 1 / ((1-\beta)/s_0^2 + \beta/\sigma_q^2)`, the variance of the geometric
mean of the start (standard deviations :math:`s_0`) and a diagonal Gaussian ``q``
(:math:`\sigma_q`; 1 when ``q`` or the prior is not a diagonal Gaussian); with
``start="q"`` it is :math:`\sigma_q^2` throughout. In these whitened units the step size
starts at :math:`L^{-1/4}` (the leapfrog energy error grows as :math:`L \epsilon^4`;
Beskos et al. 2013, "Optimal tuning of the hybrid Monte Carlo algorithm").

Step-size adaptation, without bias. Adapting a chain's step size from its own history
breaks the invariance argument behind AIS (the kernel at step t would depend on earlier
states of the same chain). So each chunk of chains carries one extra *pilot* chain per
example, simulated in lockstep: after every transition the pilot's Metropolis acceptance
probability :math:`a` moves the example's step size,
:math:`\log\epsilon \leftarrow \log\epsilon + 0.2\,(a - a^*)` (:math:`a^*` =
``target_acceptance``, default 0.65 as Wu et al. 2017; clamped to [1e-4, 4]), and the
counted chains use, at each transition, the step size the pilot used there. Their kernels
depend only on the pilot's random numbers, which are independent of theirs, so their
weights are exactly unbiased; the pilot's weight is discarded. Cost: one chain more per
example per chunk.

Random draws: per chunk of ``c`` counted chains (``c + 1`` rows, pilot last), the start
uses the draw rule of :mod:`vaelab.objectives` for ``c + 1`` samples of :math:`f_0`
(``steps = 1``: ``c`` samples, no pilot, so the weights are exactly those of
:func:`~vaelab.objectives.log_likelihood` with the same generator); then every transition
draws ``randn((c + 1, B, L))`` momenta and ``rand((c + 1, B))`` Metropolis uniforms from
``generator``. The result is a function of the generator's state, ``x``, ``chains`` and
``chunk_size``.

Memory: one chunk's states and one decoder pass with its backward graph; flat in
``steps`` and ``chains`` (plus :class:`~vaelab.psis.WeightDiagnostics`' ``O(sqrt(C) B)``).
Cost: about ``(steps - 1) * leapfrog_steps * (chains + pilots)`` decoder forward and
backward passes, against ``K`` forward passes for importance sampling with K samples.

Models: the duck-typed interface of :mod:`vaelab.objectives` (``encode``, ``decode``,
``prior``). ``decode(z).log_prob`` must be differentiable in ``z``. Put the model in
``eval()`` mode first; the functions may run under ``torch.no_grad()`` (they enable
gradients for ``z`` only) but not under ``torch.inference_mode()``. Per batch with a given
generator: a distributed evaluation seeds each batch's generator and gathers the
per-example results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from ..errors import ConfigError
from ..objectives import (
    _check_count,
    _decoder_log_prob,
    _delta_method_stderr,
    _draw,
    _is_diagonal_normal,
    decodes_per_chunk,
    mean_and_stderr,
)
from ..options import fraction, one_of, option, positive
from ..psis import WeightDiagnostics
from ..registry import Registry
from ..rng import Purpose
from .base import ESTIMATORS, Estimate

__all__ = [
    "SCHEDULES",
    "STARTS",
    "AIS",
    "AISOptions",
    "AISEstimate",
    "BDMCResult",
    "ais",
    "bdmc",
    "linear_schedule",
    "sigmoid_schedule",
]

STARTS = ("q", "prior")

#: Gain of the pilot's Robbins-Monro update of log(step size) per transition.
ADAPT_GAIN = 0.2
#: Bounds of the step size, in whitened units (standard deviations of the mass matrix).
STEP_SIZE_RANGE = (1e-4, 4.0)

SCHEDULES: Registry[Callable[[int], Tensor]] = Registry("annealing schedule")


@SCHEDULES.register("sigmoid")
def sigmoid_schedule(steps: int, radius: float = 4.0) -> Tensor:
    r"""``(steps + 1,)`` float64 inverse temperatures from 0 to 1 on a sigmoid.

    :math:`\beta_t = (\sigma(r(2t/T - 1)) - \sigma(-r)) / (\sigma(r) - \sigma(-r))`,
    :math:`r` = ``radius`` (Grosse et al. 2015; Wu et al. 2017 use r = 4).

    Raises:
        ConfigError: ``steps < 1`` or ``radius <= 0``.
    """
    _check_count("steps", steps)
    if not radius > 0:
        raise ConfigError(f"radius must be > 0, got {radius!r}")
    s = torch.sigmoid(torch.linspace(-radius, radius, steps + 1, dtype=torch.float64))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0  # exactly, whatever the rounding
    return betas


@SCHEDULES.register("linear")
def linear_schedule(steps: int) -> Tensor:
    r"""``(steps + 1,)`` float64 inverse temperatures :math:`\beta_t = t / T`.

    Raises:
        ConfigError: ``steps < 1``.
    """
    _check_count("steps", steps)
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AISEstimate:
    r"""AIS estimate of :math:`\log p(x)` per example (the fields of
    :class:`~vaelab.objectives.LogLikelihood`, plus the sampler's diagnostics).

    Attributes:
        per_example: ``(B,)`` float64 :math:`\log \frac1C \sum_c w_c` in nats (forward AIS);
            for reverse AIS (in :class:`BDMCResult`) :math:`-\log \frac1C \sum_c w_c`.
        mean: sum of ``per_example`` / B.
        stderr: standard error of ``mean`` over examples (excludes Monte-Carlo error).
        mc_stderr: ``(B,)`` delta-method Monte-Carlo standard error of each value over the
            C chains, as in ``LogLikelihood`` (NaN for C = 1); trust it when ``pareto_k``
            is below 0.5 (or NaN for small C, then the chains' spread is the only guide).
            For reverse AIS the chains share their start ``z``, so it measures the spread
            given ``z`` only and understates the error of the upper bound.
        num_samples: C, the number of AIS weights per example (= ``chains``).
        pareto_k: ``(B,)`` PSIS k-hat of the C weights (NaN for C < 25; :mod:`vaelab.psis`).
        ess: ``(B,)`` effective sample size of the C weights, in [1, C].
        acceptance: ``(B,)`` mean Metropolis acceptance probability of the counted chains'
            transitions (NaN for ``steps = 1``).
        steps: T, the number of annealing steps.
        chains: C.
        leapfrog_steps: leapfrog steps per HMC transition.
        schedule: name in :data:`SCHEDULES`.
        start: ``"q"`` or ``"prior"``.
    """

    per_example: Tensor
    mean: float
    stderr: float
    mc_stderr: Tensor
    num_samples: int
    pareto_k: Tensor
    ess: Tensor
    acceptance: Tensor
    steps: int
    chains: int
    leapfrog_steps: int
    schedule: str
    start: str

    @property
    def mc_stderr_of_mean(self) -> float:
        """Monte-Carlo standard error of ``mean`` (estimates are independent across examples)."""
        return float(self.mc_stderr.pow(2).sum().sqrt() / self.mc_stderr.numel())


@dataclass(frozen=True)
class BDMCResult:
    r"""Bidirectional Monte Carlo bounds on :math:`\log p(x)` for data simulated from the model.

    Attributes:
        x: ``(B, *event_shape)`` the simulated data.
        z: ``(B, L)`` the latents that generated it (exact posterior samples).
        forward: AIS from the start to the posterior; ``forward.per_example`` is ``lower``.
        reverse: AIS from ``z`` back to the start; ``reverse.per_example`` is ``upper``.
    """

    x: Tensor
    z: Tensor
    forward: AISEstimate
    reverse: AISEstimate

    @property
    def lower(self) -> Tensor:
        r"""``(B,)`` stochastic lower bounds of :math:`\log p(x)` (nats)."""
        return self.forward.per_example

    @property
    def upper(self) -> Tensor:
        r"""``(B,)`` stochastic upper bounds of :math:`\log p(x)` (nats)."""
        return self.reverse.per_example

    @property
    def gap(self) -> Tensor:
        """``(B,)`` ``upper - lower`` in nats per example: >= 0 in expectation."""
        return self.upper - self.lower

    @property
    def lower_mean(self) -> float:
        """Mean lower bound over examples (nats)."""
        return self.forward.mean

    @property
    def upper_mean(self) -> float:
        """Mean upper bound over examples (nats)."""
        return self.reverse.mean

    @property
    def gap_mean(self) -> float:
        """Mean gap over examples (nats per example)."""
        return mean_and_stderr(self.gap)[0]

    @property
    def gap_stderr(self) -> float:
        """Standard error of ``gap_mean`` over examples."""
        return mean_and_stderr(self.gap)[1]


# --------------------------------------------------------------------------- the path


class _State(NamedTuple):
    """Chains at ``z`` ``(S, B, L)`` with the two log-densities of the path and gradients."""

    z: Tensor
    log_start: Tensor  # (S, B) log f_0(z)
    h: Tensor  # (S, B) log p(x, z) - log f_0(z)
    grad_start: Tensor  # (S, B, L)
    grad_h: Tensor  # (S, B, L)

    def log_target(self, beta: float) -> Tensor:
        """``(S, B)`` :math:`\\log f_\\beta = \\log f_0 + \\beta h`."""
        return self.log_start + beta * self.h

    def grad(self, beta: float) -> Tensor:
        """``(S, B, L)`` gradient of :math:`\\log f_\\beta` in ``z``."""
        return self.grad_start + beta * self.grad_h


class _Path:
    """The geometric path for one batch ``x``: start ``f_0``, target ``p(x, z)``."""

    def __init__(self, model, x: Tensor, start: str) -> None:
        self.model, self.x = model, x
        with torch.no_grad():
            q = model.encode(x)
        self.prior = model.prior(x.device)
        batch = x.shape[0]
        # A flow posterior (vaelab.posteriors): with start="q", anneal in its base space,
        # from its Gaussian N(loc, scale) to p(x, f(z0)) |det J_f(z0)|, whose normaliser is
        # p(x) too; the chains' states are then base points z0.
        self.flow = q if start == "q" and hasattr(q, "push_base") else None
        if self.flow is not None:
            q = Independent(Normal(q.loc, q.scale, validate_args=False), 1,
                            validate_args=False)
        self.start = q if start == "q" else self.prior.expand(torch.Size([batch]))
        start_std = _diagonal_std(self.start, batch, x)
        q_std = _diagonal_std(q, batch, x)
        self._start_precision = start_std.pow(-2)
        self._q_precision = q_std.pow(-2)
        self._validated = False

    def evaluate(self, z: Tensor) -> _State:
        """Log-densities and gradients at ``z`` ``(S, B, L)``; x is validated the first time."""
        validate = None if not self._validated else False
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_start = self.start.log_prob(z)
            point, log_det = (self.flow.push_base(z) if self.flow is not None
                              else (z, 0.0))
            log_joint = (_decoder_log_prob(self.model, self.x, point, validate)
                         + self.prior.log_prob(point) + log_det)
            (grad_start,) = torch.autograd.grad(log_start.sum(), z)
            (grad_joint,) = torch.autograd.grad(log_joint.sum(), z)
        self._validated = True
        log_start, log_joint = log_start.detach(), log_joint.detach()
        return _State(z.detach(), log_start, log_joint - log_start, grad_start,
                      grad_joint - grad_start)

    def scale(self, beta: float) -> Tensor:
        r"""``(B, L)`` standard deviations of the mass matrix at :math:`\beta` (whitening)."""
        return ((1 - beta) * self._start_precision + beta * self._q_precision).rsqrt()


def _diagonal_std(dist: Distribution, batch: int, x: Tensor) -> Tensor:
    """``(B, L)`` standard deviations of a diagonal Gaussian ``dist``; ones otherwise."""
    if _is_diagonal_normal(dist):
        base = dist.base_dist
        return base.scale.detach().expand(base.loc.shape).expand(batch, -1)
    return torch.ones((batch, *dist.event_shape), dtype=dist.mean.dtype, device=x.device)


# --------------------------------------------------------------------------- HMC


def _noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None,
           uniform: bool = False) -> Tensor:
    """Standard normal (or uniform [0, 1)) draws from ``generator``, moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    draw = torch.rand if uniform else torch.randn
    return draw(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def _hmc(path: _Path, state: _State, beta: float, step: Tensor, leapfrog: int,
         generator: torch.Generator | None) -> tuple[_State, Tensor]:
    r"""One HMC transition leaving :math:`f_\beta` invariant, in whitened units.

    Args:
        step: ``(B, L)`` leapfrog step in ``z`` units: step size times mass-matrix scale.

    Returns:
        the new state and the ``(S, B)`` Metropolis acceptance probabilities.
    """
    momentum = _noise(tuple(state.z.shape), state.z, generator)  # r ~ N(0, I), whitened
    r = momentum + 0.5 * step * state.grad(beta)
    proposal = state
    for i in range(leapfrog):
        proposal = path.evaluate(proposal.z + step * r)
        r = r + (0.5 if i == leapfrog - 1 else 1.0) * step * proposal.grad(beta)
    log_ratio = (proposal.log_target(beta) - 0.5 * r.square().sum(-1)
                 - state.log_target(beta) + 0.5 * momentum.square().sum(-1))
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)  # a diverged leapfrog is rejected
    accept_prob = log_ratio.clamp(max=0).exp()
    uniform = _noise(tuple(log_ratio.shape), log_ratio, generator, uniform=True)
    accept = uniform < accept_prob
    return _select(accept, proposal, state), accept_prob


def _select(accept: Tensor, proposal: _State, current: _State) -> _State:
    """Per chain ``(S, B)``: the proposal where accepted, else the current state."""
    def pick(new: Tensor, old: Tensor) -> Tensor:
        mask = accept if new.dim() == accept.dim() else accept.unsqueeze(-1)
        return torch.where(mask, new, old)

    return _State(*(pick(new, old) for new, old in zip(proposal, current)))


# --------------------------------------------------------------------------- annealing


@dataclass(frozen=True)
class _Settings:
    betas: Tensor  # (T + 1,) in the direction of travel
    leapfrog: int
    target_acceptance: float


def _anneal_chunk(path: _Path, z0: Tensor, settings: _Settings, pilot: bool,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""Run rows ``z0`` ``(R, B, L)`` along ``settings.betas``; the last row is the pilot
    when ``pilot``.

    Returns:
        ``(R', B)`` float64 log-weights and ``(B,)`` summed acceptance probabilities of the
        ``R'`` counted rows (``R' = R - 1`` with a pilot).
    """
    betas = settings.betas.tolist()
    counted = z0.shape[0] - 1 if pilot else z0.shape[0]
    state = path.evaluate(z0)
    log_w = torch.zeros(state.h.shape, dtype=torch.float64, device=state.h.device)
    log_step = torch.full((z0.shape[1], 1), -0.25 * math.log(z0.shape[-1]),
                          dtype=z0.dtype, device=z0.device)  # (B, 1): L^(-1/4)
    accepted = torch.zeros(z0.shape[1], dtype=torch.float64, device=z0.device)
    for t in range(1, len(betas)):
        log_w += (betas[t] - betas[t - 1]) * state.h.double()
        if t == len(betas) - 1:
            break
        step = log_step.exp() * path.scale(betas[t]).to(z0)
        state, accept_prob = _hmc(path, state, betas[t], step, settings.leapfrog, generator)
        accepted += accept_prob[:counted].double().sum(0)
        if pilot:
            log_step = _adapt(log_step, accept_prob[-1], settings.target_acceptance)
    return log_w[:counted], accepted


def _adapt(log_step: Tensor, accept_prob: Tensor, target: float) -> Tensor:
    """Robbins-Monro step on ``log_step`` ``(B, 1)`` from the pilot's acceptance ``(B,)``."""
    low, high = (math.log(v) for v in STEP_SIZE_RANGE)
    moved = log_step + ADAPT_GAIN * (accept_prob.unsqueeze(-1).to(log_step) - target)
    return moved.clamp(low, high)


def _run(path: _Path, start_rows: Callable[[int], Tensor], chains: int, chunk: int,
         settings: _Settings, generator: torch.Generator | None
         ) -> tuple[WeightDiagnostics, Tensor]:
    """All chains in chunks; returns the weights' accumulator and mean acceptance ``(B,)``."""
    batch = path.x.shape[0]
    pilot = len(settings.betas) > 2  # steps = 1 has no transition to adapt
    acc = WeightDiagnostics(chains, batch, device=path.x.device)
    accepted = torch.zeros(batch, dtype=torch.float64, device=path.x.device)
    for first in range(0, chains, chunk):
        count = min(chunk, chains - first)
        z0 = start_rows(count + int(pilot))
        log_w, acc_sum = _anneal_chunk(path, z0, settings, pilot, generator)
        acc.update(log_w)
        accepted += acc_sum
    transitions = chains * (len(settings.betas) - 2)
    acceptance = accepted / transitions if transitions else accepted * math.nan
    return acc, acceptance


def _estimate(acc: WeightDiagnostics, acceptance: Tensor, sign: float, settings: _Settings,
              schedule: str, start: str) -> AISEstimate:
    """The :class:`AISEstimate` of accumulated weights; ``sign = -1`` for reverse AIS."""
    chains = acc.num_samples
    diag = acc.result()
    per_example = sign * (acc.log_sum_w - math.log(chains))
    mean, stderr = mean_and_stderr(per_example)
    return AISEstimate(
        per_example=per_example, mean=mean, stderr=stderr,
        mc_stderr=_delta_method_stderr(acc.log_sum_w, acc.log_sum_w2, chains),
        num_samples=chains, pareto_k=diag.pareto_k, ess=diag.ess, acceptance=acceptance,
        steps=len(settings.betas) - 1, chains=chains, leapfrog_steps=settings.leapfrog,
        schedule=schedule, start=start,
    )


def _check_options(steps: int, chains: int, leapfrog_steps: int, target_acceptance: float,
                   start: str, schedule: str, chunk_size: int | None) -> None:
    _check_count("steps", steps)
    _check_count("chains", chains)
    _check_count("leapfrog_steps", leapfrog_steps)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size)
    if not 0 < target_acceptance < 1:
        raise ConfigError(f"target_acceptance must be in (0, 1), got {target_acceptance!r}")
    if start not in STARTS:
        raise ConfigError(f"unknown AIS start {start!r}: choose one of {', '.join(STARTS)}")
    SCHEDULES[schedule]  # an unknown name lists the valid ones
    if torch.is_inference_mode_enabled():
        raise ConfigError(
            "AIS needs gradients in z for its HMC moves: call it under torch.no_grad(), "
            "not torch.inference_mode()"
        )


def _default_chunk(model, x: Tensor, chains: int) -> int:
    return max(1, min(chains, decodes_per_chunk(model, x) // max(x.shape[0], 1)))


# --------------------------------------------------------------------------- public API


def ais(model, x: Tensor, *, steps: int, chains: int,
        generator: torch.Generator | None = None, start: str = "q",
        schedule: str = "sigmoid", leapfrog_steps: int = 10,
        target_acceptance: float = 0.65, chunk_size: int | None = None) -> AISEstimate:
    r"""Annealed importance sampling estimate of :math:`\log p(x)` per example (Neal 2001).

    .. math::
        \log \hat p(x) = \log \frac1C \sum_{c=1}^C w_c, \qquad
        \log w_c = \sum_{t=1}^T (\beta_t - \beta_{t-1})
            \big[\log p(x, z^c_{t-1}) - \log f_0(z^c_{t-1})\big]

    with HMC transitions between the steps; see the module docstring for the path, the
    schedule, the unbiased step-size adaptation and the draw rule.

    Args:
        model: ``encode``, ``decode``, ``prior`` (see :mod:`vaelab.objectives`), in eval mode.
        x: ``(B, *event_shape)`` data.
        steps: T >= 1 annealing steps (T - 1 HMC transitions; T = 1 is importance sampling).
        chains: C >= 1 independent chains per example.
        generator: optional ``torch.Generator`` for reproducible draws.
        start: ``"q"`` (start at the encoder's ``q(z|x)``) or ``"prior"``.
        schedule: a name in :data:`SCHEDULES` (``"sigmoid"`` or ``"linear"``).
        leapfrog_steps: leapfrog steps per HMC transition.
        target_acceptance: the pilot chains' target Metropolis acceptance probability.
        chunk_size: counted chains per chunk (plus one pilot); default
            as :func:`vaelab.objectives.default_chunk`, capped at ``chains``.

    Returns:
        :class:`AISEstimate`, float64, per example and over examples.

    Raises:
        ConfigError: a count < 1, an unknown ``start`` or ``schedule``, a target acceptance
            outside (0, 1), or a call under ``torch.inference_mode()``.
    """
    _check_options(steps, chains, leapfrog_steps, target_acceptance, start, schedule,
                   chunk_size)
    settings = _Settings(SCHEDULES[schedule](steps), leapfrog_steps, target_acceptance)
    path = _Path(model, x, start)
    chunk = chunk_size or _default_chunk(model, x, chains)

    def start_rows(rows: int) -> Tensor:
        return _draw(path.start, rows, generator)[0].detach()

    acc, acceptance = _run(path, start_rows, chains, chunk, settings, generator)
    return _estimate(acc, acceptance, 1.0, settings, schedule, start)


def bdmc(model, num_examples: int, *, steps: int, chains: int,
         generator: torch.Generator | None = None, start: str = "q",
         schedule: str = "sigmoid", leapfrog_steps: int = 10,
         target_acceptance: float = 0.65, chunk_size: int | None = None,
         device: torch.device | str | None = None) -> BDMCResult:
    r"""Bidirectional Monte Carlo bounds on :math:`\log p(x)` for data simulated from the model.

    Draws :math:`z_b \sim p(z)`, :math:`x_b \sim p(x|z_b)` for ``b < num_examples``, then runs
    forward AIS on ``x`` (a stochastic lower bound) and reverse AIS from :math:`z_b`, an exact
    posterior sample (a stochastic upper bound): Grosse et al. 2015; Wu et al. 2017. All
    reverse chains of an example start at the same :math:`z_b`; each one's weight still has
    expectation :math:`1/p(x_b)`, but they are not independent, so ``reverse.mc_stderr``
    understates the upper bound's error: judge the bounds over many examples
    (``gap_mean``, ``gap_stderr``). Both directions use the same schedule and settings, so
    the gap measures these settings. Draws, in order: ``z`` (the prior, by the draw rule of
    :mod:`vaelab.objectives`), ``x`` (``decode(z).sample(generator)``, or under a seed drawn
    from ``generator`` for a ``torch.distributions`` decoder), forward AIS, reverse AIS.

    Args:
        model: as for :func:`ais`; ``decode(z)`` must also have ``sample``.
        num_examples: B >= 1 examples to simulate.
        steps, chains, generator, start, schedule, leapfrog_steps, target_acceptance,
            chunk_size: as for :func:`ais`, for both directions.
        device: where to simulate; default the model's parameters' device (CPU without any).

    Returns:
        :class:`BDMCResult` with ``lower``, ``upper``, ``gap`` per example and their means.

    Raises:
        ConfigError: as :func:`ais`, or ``num_examples < 1``.
    """
    _check_count("num_examples", num_examples)
    _check_options(steps, chains, leapfrog_steps, target_acceptance, start, schedule,
                   chunk_size)
    z, x = _simulate(model, num_examples, device, generator)
    if start == "q" and hasattr(model.encode(x), "push_base"):
        raise ConfigError("BDMC's reverse chains start at the exact posterior sample z, which "
                          "a flow posterior would need to invert: use start='prior' "
                          "(--set eval.ais.start=prior)")
    forward = ais(model, x, steps=steps, chains=chains, generator=generator, start=start,
                  schedule=schedule, leapfrog_steps=leapfrog_steps,
                  target_acceptance=target_acceptance, chunk_size=chunk_size)
    settings = _Settings(SCHEDULES[schedule](steps).flip(0), leapfrog_steps, target_acceptance)
    path = _Path(model, x, start)
    chunk = chunk_size or _default_chunk(model, x, chains)

    def start_rows(rows: int) -> Tensor:
        return z.unsqueeze(0).expand(rows, *z.shape).clone()

    acc, acceptance = _run(path, start_rows, chains, chunk, settings, generator)
    reverse = _estimate(acc, acceptance, -1.0, settings, schedule, start)
    return BDMCResult(x=x, z=z, forward=forward, reverse=reverse)


def _model_parameter(model) -> Tensor | None:
    """The model's first parameter (its device and dtype), or None."""
    params = getattr(model, "parameters", None)
    return next(iter(params()), None) if callable(params) else None


def _simulate(model, num: int, device: torch.device | str | None,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(z (B, L), x (B, *event_shape))`` with z ~ p(z), x ~ p(x|z), on ``device`` (default:
    the model's parameters', else CPU); z in the parameters' dtype."""
    param = _model_parameter(model)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        prior = model.prior(device).expand(torch.Size([num]))
        z = _draw(prior, 1, generator)[0][0]
        if param is not None and param.is_floating_point():
            z = z.to(param.dtype)
        px = model.decode(z)
        x = _sample_torch(px, generator) if isinstance(px, Distribution) else \
            px.sample(generator=generator)
    return z, x


def _sample_torch(dist: Distribution, generator: torch.Generator | None) -> Tensor:
    """``dist.sample()`` under a seed drawn from ``generator`` (torch.distributions take none)."""
    if generator is None:
        return dist.sample()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return dist.sample()


# --------------------------------------------------------------------------- the registered kind


@dataclass(frozen=True)
class AISOptions:
    """``eval.ais``: see :func:`ais`."""

    steps: int = option(100, positive, "annealing steps T (T - 1 HMC transitions)")
    chains: int = option(32, positive, "chains per example (>= 25 for its Pareto k-hat)")
    leapfrog_steps: int = option(10, positive, "leapfrog steps per HMC transition")
    schedule: str = option("sigmoid", one_of("sigmoid", "linear"), "the annealing schedule")
    start: str = option("q", one_of(*STARTS), "where chains start: q(z|x) or the prior")
    target_acceptance: float = option(0.65, fraction, "the pilot chains' target Metropolis "
                                      "acceptance probability")


@ESTIMATORS.register("ais")
class AIS:
    """Annealed importance sampling with HMC (:func:`ais`): ``steps`` x ``chains``."""

    name = "ais"
    Options = AISOptions
    purpose = Purpose.EVAL_AIS

    def __init__(self, options: AISOptions) -> None:
        self.options = options
        self._acceptance: list[float] = []

    @property
    def samples(self) -> int:
        """Weights per example (for the k-hat threshold)."""
        return self.options.chains

    @property
    def cost(self) -> float:
        """Decoder forward passes per example, counting a backward pass as two: every
        leapfrog step decodes and differentiates each chain (and one pilot per chunk)."""
        o = self.options
        return (o.chains + 1) * (1 + 3 * (o.steps - 1) * o.leapfrog_steps)

    def describe(self) -> str:
        return f"AIS, {self.options.steps} steps x {self.options.chains} chains"

    def estimate(self, model, x: Tensor, generator: torch.Generator | None) -> Estimate:
        o = self.options
        result = ais(model, x, steps=o.steps, chains=o.chains, generator=generator,
                     start=o.start, schedule=o.schedule, leapfrog_steps=o.leapfrog_steps,
                     target_acceptance=o.target_acceptance)
        return Estimate(result.per_example, result.mc_stderr, result.pareto_k, result.ess,
                        {"acceptance": float(result.acceptance.nanmean())})

    def report(self, extras: list[dict]) -> dict:
        accepted = [e["acceptance"] for e in extras]
        return {"mean_acceptance": sum(accepted) / len(accepted) if accepted else None}
