r"""Variational objectives: ELBO terms, beta / warm-up / free bits, the IWAE bound and
the importance-sampled log-likelihood with its standard error.

All per-example quantities are ``(B,)`` tensors in nats; ``elbo`` and
``log_likelihood`` are log-scale (usually negative). The batch is reduced once, in
:func:`training_loss`. beta, warm-up and free bits change the training objective
only: :class:`ELBOTerms` always holds the beta = 1 ELBO.

The functions take any ``model`` with this duck-typed interface:

- ``model.encode(x)`` -> ``q(z|x)``: ideally ``Independent(Normal(loc (B, L), scale (B, L)), 1)``;
  any distribution with ``rsample`` and ``log_prob`` (returning ``(..., B)``) works.
- ``model.decode(z)`` for ``z`` of shape ``(N, L)`` -> an object whose ``log_prob(x)`` takes
  ``x`` of shape ``(N, *event_shape)`` and returns ``(N,)``.
- ``model.prior(device)`` -> ``p(z)``, usually ``Independent(Normal(0, 1), 1)`` over ``L`` dims.
  A base ``Normal`` with the attribute ``standard = True`` (as :meth:`vaelab.models.VAE.prior`
  sets) promises loc 0 and scale 1: the analytic KL then uses the shorter closed form
  :math:`\tfrac12(\sigma^2 + \mu^2 - 1) - \log\sigma` (the same value to float rounding).

Random draws (one rule for every function here). Importance sample ``s`` (``s = 0, 1, ...``)
uses the ``s``-th call ``torch.randn((B, L), generator=generator)`` and
``z_s = loc + scale * eps_s`` (the reparameterisation trick, Kingma & Welling 2014). So the
same generator state gives the same ``z_s`` in :func:`elbo_terms`, :func:`iwae_bound` and
:func:`log_likelihood`, whatever the chunk size. When ``q`` is not a diagonal Gaussian,
each call (each chunk in :func:`log_likelihood`) draws a seed from ``generator`` and runs
``q.rsample`` under it in a forked RNG: reproducible, but the draws then depend on the
chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from .errors import ConfigError, DataError
from .psis import WeightDiagnostics
from .registry import Registry

__all__ = [
    "DECODED_PER_CHUNK",
    "OUTPUTS_PER_CHUNK",
    "OBJECTIVES",
    "ELBOTerms",
    "LogLikelihood",
    "Objective",
    "ELBOObjective",
    "IWAEObjective",
    "bits_per_dim",
    "build_objective",
    "decodes_per_chunk",
    "default_chunk",
    "elbo_terms",
    "iwae_bound",
    "kl_weight",
    "log_likelihood",
    "mean_and_stderr",
    "per_example_loss",
    "training_loss",
]

#: How the KL term is computed (:func:`elbo_terms`); the config's ``objective.kl`` rule.
KL_MODES = ("auto", "analytic", "mc")

#: Default bound on ``chunk_size * B`` (decoded examples per chunk) in :func:`log_likelihood`.
#: 2**12 keeps a chunk's decoder outputs (4096 x 784 floats, 12.8 MB) in the CPU's L3 cache:
#: 1.5x faster than 2**14 on a 2-core EPYC (benchmarks/eval.py), and memory stays flat in S.
DECODED_PER_CHUNK = 2**12
#: The same budget in decoder output values (a decoder with more outputs per example, e.g.
#: a 10-component mixture on 32x32 colour images, 157 times an MNIST Bernoulli's, decodes
#: proportionally fewer examples per chunk).
OUTPUTS_PER_CHUNK = DECODED_PER_CHUNK * 784


@dataclass(frozen=True)
class ELBOTerms:
    r"""Per-example ELBO terms, in nats, with beta = 1.

    Attributes:
        recon: ``(B,)`` Monte-Carlo estimate of :math:`E_q \log p(x|z)`, averaged over samples.
        kl: ``(B,)`` :math:`KL(q(z|x) \| p(z))`, analytic or Monte-Carlo.
        kl_per_dim: ``(B, L)`` per-latent-dimension KL (sums to ``kl``), or ``None`` when
            ``q`` or ``p`` does not factorise over latent dimensions.
        elbo: ``(B,)`` ``recon - kl``.
    """

    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor | None
    elbo: torch.Tensor


@dataclass(frozen=True)
class LogLikelihood:
    r"""Importance-sampled :math:`\log p(x)` per example, and split-level summaries.

    Attributes:
        per_example: ``(B,)`` float64 estimates of :math:`\log p(x)` in nats.
        mean: sum of ``per_example`` / B.
        stderr: standard error of ``mean`` over examples, ``std(per_example, ddof=1) / sqrt(B)``.
            It measures how the mean would vary with another sample of examples and does
            **not** include the Monte-Carlo error of each estimate (see ``mc_stderr``).
        mc_stderr: ``(B,)`` delta-method estimate of the Monte-Carlo standard error of each
            ``per_example`` value, :math:`\sqrt{(S \sum w^2 / (\sum w)^2 - 1)/(S - 1)}`
            (NaN for S = 1). It is unreliable when the weights are heavy-tailed: read
            ``pareto_k``.
        num_samples: S, the number of importance samples per example.
        pareto_k: ``(B,)`` float64 PSIS k-hat of each example's S weights
            (:mod:`vaelab.psis`): above 0.7 the estimate is unreliable (biased low, with a
            standard error that looks too small); ``nan`` for S < 25, ``-inf`` for constant
            weights (an exact posterior).
        ess: ``(B,)`` float64 effective sample size :math:`(\sum w)^2 / \sum w^2` in [1, S].
    """

    per_example: torch.Tensor
    mean: float
    stderr: float
    mc_stderr: torch.Tensor
    num_samples: int
    pareto_k: torch.Tensor
    ess: torch.Tensor

    @property
    def mc_stderr_of_mean(self) -> float:
        """Monte-Carlo standard error of ``mean`` (estimates are independent across examples)."""
        return float(self.mc_stderr.pow(2).sum().sqrt() / self.mc_stderr.numel())


# --------------------------------------------------------------------------- sampling


def _is_diagonal_normal(dist: Distribution) -> bool:
    """True for ``Independent(Normal(...), 1)``: a Gaussian factorised over the last dim."""
    return (
        isinstance(dist, Independent)
        and isinstance(dist.base_dist, Normal)
        and dist.reinterpreted_batch_ndims == 1
    )


def _factorises(dist: Distribution) -> bool:
    """True when ``dist.base_dist.log_prob`` gives per-latent-dimension terms."""
    return isinstance(dist, Independent) and dist.reinterpreted_batch_ndims == 1


def _standard_normal(num: int, shape: torch.Size, like: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
    """``(num, *shape)`` noise; block ``s`` is the ``s``-th ``randn(shape)`` call."""
    device = generator.device if generator is not None else like.device
    if num == 1:  # the training case: no stack copy
        eps = torch.randn(shape, generator=generator, dtype=like.dtype, device=device)
        return eps.unsqueeze(0).to(like.device)
    out = torch.empty((num, *shape), dtype=like.dtype, device=device)
    for block in out:  # block s is the s-th randn(shape) call, written in place
        block.normal_(generator=generator)
    return out.to(like.device)


def _sample(q: Distribution, num: int, generator: torch.Generator | None,
            eps: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised ``(num, B, L)`` draws from ``q`` (see the module docstring).

    ``eps`` (``(num, B, L)`` standard-normal noise drawn by the caller) replaces the
    draws: ``z_s = loc + scale * eps[s]``. Only for a diagonal Gaussian ``q``.
    """
    return _draw(q, num, generator, eps)[0]


def _draw(q: Distribution, num: int, generator: torch.Generator | None,
          eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, eps)``: the draws of :func:`_sample` and, for a diagonal Gaussian ``q``, the
    standard-normal noise behind them (None otherwise)."""
    if eps is not None:
        z = _sample_from_noise(q, num, eps)  # refuses a non-Gaussian q
        return z, eps.to(z)
    if _is_diagonal_normal(q):
        loc, scale = q.base_dist.loc, q.base_dist.scale
        eps = _standard_normal(num, loc.shape, loc, generator)
        return loc + scale * eps, eps
    return _sample_other(q, num, generator), None


def _draw_log_q(q: Distribution, num: int, generator: torch.Generator | None,
                eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(z, eps, log q(z|x))``: :func:`_draw`, and for a posterior that pushes noise through a
    flow (``q.push(eps) -> (z, log_q)``, :class:`vaelab.posteriors.FlowPosterior`) the exact
    ``(num, B)`` log-density of its draws, known only there (None for other ``q``: the
    callers compute it from ``eps`` or ``q.log_prob``). The flow's base noise follows the
    draw rule of a diagonal Gaussian (block ``s`` is the ``s``-th ``randn((B, L))``)."""
    if not hasattr(q, "push"):
        return (*_draw(q, num, generator, eps), None)
    if eps is None:
        eps = _standard_normal(num, q.loc.shape, q.loc, generator)
    elif tuple(eps.shape) != (num, *q.loc.shape):
        raise ConfigError(
            f"eps has shape {tuple(eps.shape)} but {num} samples of q(z|x) with loc "
            f"{tuple(q.loc.shape)} need {(num, *q.loc.shape)}: draw one (B, L) block per sample")
    eps = eps.to(device=q.loc.device, dtype=q.loc.dtype)
    z, log_q = q.push(eps)
    return z, eps, log_q


def _sample_other(q: Distribution, num: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """``rsample`` of a non-Gaussian ``q``, under a seed drawn from ``generator``."""
    if generator is None:
        return q.rsample((num,))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return q.rsample((num,))


def _sample_from_noise(q: Distribution, num: int, eps: torch.Tensor) -> torch.Tensor:
    """``loc + scale * eps`` for a diagonal Gaussian ``q``; checks ``eps`` is ``(num, B, L)``."""
    if not _is_diagonal_normal(q):
        raise ConfigError(
            f"pre-drawn noise (eps) needs a diagonal Gaussian q(z|x), got {type(q).__name__}: "
            "pass a generator instead"
        )
    loc, scale = q.base_dist.loc, q.base_dist.scale
    if tuple(eps.shape) != (num, *loc.shape):
        raise ConfigError(
            f"eps has shape {tuple(eps.shape)} but {num} samples of q(z|x) with loc "
            f"{tuple(loc.shape)} need {(num, *loc.shape)}: draw one (B, L) block per sample"
        )
    return loc + scale * eps.to(device=loc.device, dtype=loc.dtype)


def _decoder_log_prob(model, x: torch.Tensor, z: torch.Tensor,
                      validate: bool | None = None) -> torch.Tensor:
    r""":math:`\log p(x|z_s)` for ``z`` of shape ``(S, B, L)`` -> ``(S, B)``.

    ``z`` is decoded as one flat batch of ``S*B``. When the decoder's distribution has
    ``log_prob_samples(x, S)`` (vaelab's :class:`~vaelab.likelihoods.ObservationDistribution`)
    ``x`` is validated once (``validate=False`` skips that, for data already checked;
    None: the family's default) and broadcast; otherwise it is repeated ``S`` times (a copy
    when ``S > 1``) for ``log_prob``.
    """
    num, batch = z.shape[:2]
    px = model.decode(z.reshape(num * batch, z.shape[-1]))
    if hasattr(px, "log_prob_samples"):
        return px.log_prob_samples(x, num, validate=validate)
    x_rep = x.unsqueeze(0).expand(num, *x.shape).reshape(num * batch, *x.shape[1:])
    return px.log_prob(x_rep).reshape(num, batch)


def _log_weights(model, x: torch.Tensor, q: Distribution, prior: Distribution,
                 z: torch.Tensor, eps: torch.Tensor | None = None,
                 validate: bool | None = None,
                 log_q: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`\log p(x|z) + \log p(z) - \log q(z|x)` for ``z`` ``(S, B, L)`` -> ``(S, B)``.

    With the noise ``eps`` behind ``z = loc + scale * eps`` (diagonal Gaussian ``q``),
    :math:`\log q = \sum_j -\tfrac12 \epsilon_j^2 - \log \sigma_j - \tfrac12 \log 2\pi`
    is computed from ``eps`` itself: ``q.log_prob(z)`` would recover ``eps`` as
    ``(z - loc) / scale``, which float32 cancellation ruins when ``|loc| / scale`` is large.
    Values and gradients are the same in exact arithmetic. ``log_q`` (a flow's exact
    log-density of its own draws, :func:`_draw_log_q`) is used as given.
    """
    if log_q is not None:
        pass
    elif eps is not None:
        scale = q.base_dist.scale
        log_q = (-0.5 * eps.square() - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    else:
        log_q = q.log_prob(z)
    return _decoder_log_prob(model, x, z, validate) + prior.log_prob(z) - log_q


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- ELBO


def _analytic_kl(q: Distribution, prior: Distribution) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form KL ``(B,)`` and, for diagonal Gaussians, its ``(B, L)`` split."""
    if _is_diagonal_normal(q) and _is_diagonal_normal(prior):
        if getattr(prior.base_dist, "standard", False):
            loc, scale = q.base_dist.loc, q.base_dist.scale
            per_dim = 0.5 * (scale * scale + loc * loc - 1) - scale.log()
        else:
            per_dim = kl_divergence(q.base_dist, prior.base_dist)
        if per_dim.shape != q.base_dist.loc.shape:  # a broadcast prior; skip a no-op node
            per_dim = per_dim.expand(q.base_dist.loc.shape)
        return per_dim.sum(-1), per_dim
    try:
        return kl_divergence(q, prior), None
    except NotImplementedError:
        raise ConfigError(
            f"no analytic KL between {type(q).__name__} and {type(prior).__name__}: "
            "use kl='mc' or kl='auto'"
        ) from None


def _mc_kl(q: Distribution, prior: Distribution,
           z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Monte-Carlo KL ``(B,)`` from the draws ``z`` ``(S, B, L)``; per dim when both factorise."""
    if _factorises(q) and _factorises(prior):
        per_dim = (q.base_dist.log_prob(z) - prior.base_dist.log_prob(z)).mean(0)
        return per_dim.sum(-1), per_dim
    return (q.log_prob(z) - prior.log_prob(z)).mean(0), None


def elbo_terms(model, x: torch.Tensor, num_samples: int = 1, kl: str = "auto",
               generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None, posterior=None) -> ELBOTerms:
    r"""ELBO terms per example (Kingma & Welling 2014), beta = 1, in nats.

    .. math::
        \mathrm{ELBO}(x) = E_{q(z|x)}[\log p(x|z)] - KL(q(z|x) \| p(z))

    The expectation is a mean over ``num_samples`` reparameterised draws
    ``z`` of shape ``(S, B, L)``, decoded as one batch of ``S*B``.

    Args:
        model: see the module docstring.
        x: ``(B, *event_shape)`` data.
        num_samples: S >= 1 draws of ``z`` per example.
        kl: ``"analytic"`` (closed form; raises when torch has none for ``q, p``), ``"mc"``
            (``log q(z|x) - log p(z)`` at the same draws, averaged), or ``"auto"``
            (analytic when ``q`` and ``p`` are both diagonal Gaussians, else Monte Carlo).
        generator: optional ``torch.Generator`` for reproducible draws.
        eps: optional ``(S, B, L)`` standard-normal noise to use instead of drawing
            (diagonal Gaussian ``q`` only): ``z_s = loc + scale * eps[s]``. Drawing the
            noise for a larger batch and passing slices of it gives every example the
            draws it would get in the larger batch (data-parallel training does this).
        posterior: ``model.encode(x)`` when the caller has it already (it also needs ``q``'s
            mean, say): the encoder then runs once, not twice.

    Returns:
        :class:`ELBOTerms` with ``(B,)`` tensors (``kl_per_dim`` ``(B, L)`` or ``None``).

    Raises:
        ConfigError: ``num_samples < 1``, an unknown ``kl`` mode, no analytic KL, or an
            ``eps`` of the wrong shape or with a non-Gaussian ``q``.
    """
    _check_count("num_samples", num_samples)
    if kl not in KL_MODES:
        raise ConfigError(f"unknown kl mode {kl!r}: choose one of {', '.join(KL_MODES)}")
    q = model.encode(x) if posterior is None else posterior
    prior = model.prior(x.device)
    z, _, log_q = _draw_log_q(q, num_samples, generator, eps)
    log_px = _decoder_log_prob(model, x, z)
    recon = log_px[0] if num_samples == 1 else log_px.mean(0)  # same value, one op less
    analytic = kl == "analytic" or (
        kl == "auto" and _is_diagonal_normal(q) and _is_diagonal_normal(prior)
    )
    if log_q is not None:  # a flow: its exact log q at the draws, no per-dimension split
        kl_value, kl_per_dim = (log_q - prior.log_prob(z)).mean(0), None
    else:
        kl_value, kl_per_dim = _analytic_kl(q, prior) if analytic else _mc_kl(q, prior, z)
    return ELBOTerms(recon=recon, kl=kl_value, kl_per_dim=kl_per_dim, elbo=recon - kl_value)


# --------------------------------------------------------------------------- training loss


def kl_weight(step: int, beta: float = 1.0, warmup_steps: int = 0, *, epoch: int = 0,
              warmup_epochs: int = 0) -> float:
    r"""KL weight of the training objective: ``beta`` after a linear warm-up from 0.

    - ``warmup_steps > 0``: :math:`\beta \min(1, \text{step} / \text{warmup\_steps})` at
      optimizer step ``step`` (0-based; Bowman et al. 2016; Sønderby et al. 2016).
    - ``warmup_epochs > 0``: :math:`\beta \min(1, (\text{epoch} + 1) / \text{warmup\_epochs})`
      during 0-based epoch ``epoch``, constant within the epoch: Tomczak & Welling's VampPrior
      code (``beta = epoch / warmup`` with 1-based epochs) and pythae's ``linear_scheduling``.
    - neither: ``beta`` at every step.

    Raises:
        ConfigError: negative arguments, or both warm-ups at once.
    """
    for name, value in (("step", step), ("beta", beta), ("warmup_steps", warmup_steps),
                        ("epoch", epoch), ("warmup_epochs", warmup_epochs)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
    if warmup_steps and warmup_epochs:
        raise ConfigError("KL warm-up is in steps or in epochs, not both: set "
                          "objective.warmup_steps or objective.warmup_epochs to 0")
    if warmup_steps:
        return float(beta) * min(1.0, step / warmup_steps)
    if warmup_epochs:
        return float(beta) * min(1.0, (epoch + 1) / warmup_epochs)
    return float(beta)


def per_example_loss(terms: ELBOTerms, kl_weight: float | torch.Tensor = 1.0,
                     free_bits: float = 0.0,
                     kl_per_dim_mean: torch.Tensor | None = None) -> torch.Tensor:
    r"""The per-example training objective ``(B,)`` whose batch mean is minimised.

    Without free bits: :math:`w\,\mathrm{KL}_b - \mathrm{recon}_b` (``w`` is beta times the
    warm-up factor). With free bits :math:`\lambda > 0` (Kingma et al. 2016, "Improved
    variational inference with inverse autoregressive flow", one group per latent
    dimension) the KL term of the batch is :math:`\sum_j \max(\lambda, \overline{\mathrm{KL}}_j)`
    with :math:`\overline{\mathrm{KL}}_j` the batch-mean KL of dimension ``j``; each example
    carries :math:`\mathrm{KL}_b + \sum_j (\max(\lambda, \overline{\mathrm{KL}}_j) -
    \overline{\mathrm{KL}}_j)`, so the batch mean is exactly that KL term and dimensions below
    :math:`\lambda` get no KL gradient.

    Args:
        terms: the beta = 1 terms of :func:`elbo_terms`.
        kl_weight: ``w`` >= 0; a 0-d tensor (the compiled training step passes one, so that
            a warm-up does not recompile) is used as it is, unchecked, and always multiplies
            (the same values: ``1.0 * kl`` is ``kl``).
        free_bits: :math:`\lambda` >= 0, nats per latent dimension.
        kl_per_dim_mean: ``(L,)`` batch-mean KL per dimension to clamp instead of
            ``terms.kl_per_dim.mean(0)`` (data parallelism passes the mean over the global
            batch, so the objective does not depend on the number of ranks).

    Raises:
        ConfigError: ``kl_weight < 0``, ``free_bits < 0``, or free bits without ``kl_per_dim``.
    """
    weight_is_tensor = isinstance(kl_weight, torch.Tensor)
    if not weight_is_tensor and kl_weight < 0:
        raise ConfigError(f"beta must be >= 0 (the weight of the KL), got {kl_weight!r}")
    if free_bits < 0:
        raise ConfigError(f"free_bits must be >= 0 nats per latent dimension, got {free_bits!r}")
    kl = terms.kl
    if free_bits > 0:
        if terms.kl_per_dim is None:
            raise ConfigError(
                "free bits need a per-dimension KL, but q(z|x) or p(z) does not factorise: "
                "set free_bits=0"
            )
        mean = terms.kl_per_dim.mean(0) if kl_per_dim_mean is None else kl_per_dim_mean
        kl = kl + (mean.clamp(min=free_bits) - mean).sum()
    # kl - recon is -(recon - kl) bit for bit, in one op instead of three
    weighted = kl if not weight_is_tensor and kl_weight == 1.0 else kl_weight * kl
    return weighted - terms.recon


def training_loss(terms: ELBOTerms, beta: float = 1.0, free_bits: float = 0.0) -> torch.Tensor:
    r"""Scalar training loss: the batch mean of :func:`per_example_loss`.

    The batch is reduced exactly once, here. Report ``terms.elbo``, not this value.
    """
    return per_example_loss(terms, beta, free_bits).mean()


# --------------------------------------------------------------------------- the objective


#: A differentiable sum over the processes sharing a batch (identity in one process).
GlobalSum = Callable[[torch.Tensor], torch.Tensor]

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


class Objective(nn.Module):
    r"""The training objective as a module: ``forward`` returns the per-example loss.

    ``forward(x, kl_weight, generator=None, eps=None, batch_total=None)`` returns
    ``(loss (B,), terms)``; the trainer minimises the mean of ``loss`` over the (global)
    batch. ``terms`` are the beta = 1 :class:`ELBOTerms` where the objective computes them
    (else None). The model is a submodule, so DistributedDataParallel can wrap the whole
    objective and synchronise gradients through its ``forward``.

    Under data parallelism each process passes its shard ``x`` of the global batch, the
    global batch size ``batch_total`` and, as ``eps``, its slice of the noise drawn for the
    global batch, so every example gets the ``z`` a one-process run gives it;
    ``global_sum`` sums a batch statistic over the processes (for free bits).

    Subclasses are registered in :data:`OBJECTIVES` under ``objective.kind``.
    """

    def __init__(self, model: nn.Module, cfg: Any,
                 global_sum: GlobalSum | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.global_sum = global_sum

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                batch_total: int | None = None) -> tuple[torch.Tensor, ELBOTerms | None]:
        raise NotImplementedError


@OBJECTIVES.register("elbo")
class ELBOObjective(Objective):
    """The (beta-weighted) negative ELBO with ``cfg.samples`` draws of z, free bits and the
    KL weight of :func:`kl_weight`; see :func:`per_example_loss`."""

    def forward(self, x, kl_weight=1.0, generator=None, eps=None, batch_total=None):
        terms = elbo_terms(self.model, x, num_samples=self.cfg.samples, kl=self.cfg.kl,
                           generator=generator, eps=eps)
        mean = None
        if self.cfg.free_bits > 0 and self.global_sum is not None and terms.kl_per_dim is not None:
            total = batch_total if batch_total is not None else x.shape[0]
            mean = self.global_sum(terms.kl_per_dim.sum(0)) / total
        return per_example_loss(terms, kl_weight, self.cfg.free_bits, mean), terms


@OBJECTIVES.register("iwae")
class IWAEObjective(Objective):
    """The negative importance-weighted bound with ``k = cfg.samples`` (Burda et al. 2016);
    no beta, warm-up or free bits."""

    def forward(self, x, kl_weight=1.0, generator=None, eps=None, batch_total=None):
        return -iwae_bound(self.model, x, self.cfg.samples, generator=generator, eps=eps), None


def build_objective(model: nn.Module, cfg: Any,
                    global_sum: GlobalSum | None = None) -> Objective:
    """The objective ``cfg.kind`` for ``model``.

    Raises:
        ConfigError: an unknown kind (the message lists the registered ones).
    """
    return OBJECTIVES[cfg.kind](model, cfg, global_sum)


# --------------------------------------------------------------------------- IWAE and log p(x)


def iwae_bound(model, x: torch.Tensor, k: int,
               generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
    r"""The importance-weighted bound (Burda et al. 2016) per example, in nats.

    .. math::
        \mathcal{L}_k(x) = \log \frac1k \sum_{s=1}^k \frac{p(x, z_s)}{q(z_s|x)},
        \quad z_s \sim q(z|x)

    The returned value *is* the bound (log it), and it is differentiable through the
    reparameterised draws: its gradient is the IWAE gradient. ``k = 1`` is the ELBO
    with a Monte-Carlo KL; :math:`\mathcal{L}_k` is non-decreasing in ``k`` in expectation
    and at most :math:`\log p(x)`.

    Args:
        model: see the module docstring.
        x: ``(B, *event_shape)``.
        k: number of importance samples, >= 1.
        generator: optional ``torch.Generator``.
        eps: optional ``(k, B, L)`` standard-normal noise used instead of drawing
            (diagonal Gaussian ``q`` only), as in :func:`elbo_terms`.

    Returns:
        ``(B,)`` tensor.

    Raises:
        ConfigError: ``k < 1``, or an ``eps`` of the wrong shape or with a non-Gaussian ``q``.
    """
    _check_count("k", k)
    q = model.encode(x)
    prior = model.prior(x.device)
    z, noise, log_q = _draw_log_q(q, k, generator, eps)
    log_w = _log_weights(model, x, q, prior, z, noise, log_q=log_q)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def decodes_per_chunk(model, x: torch.Tensor) -> int:
    """How many examples one chunk may decode: :data:`OUTPUTS_PER_CHUNK` over the decoder's
    outputs per example (``x``'s size per example times the likelihood's
    ``params_per_channel``, 1 when the model has no ``likelihood``), at least 1."""
    per_example = x[0].numel() * getattr(getattr(model, "likelihood", None),
                                         "params_per_channel", 1)
    return max(1, OUTPUTS_PER_CHUNK // max(per_example, 1))


def default_chunk(model, x: torch.Tensor, num_samples: int) -> int:
    """Samples per chunk for ``x`` ``(B, ...)``: as many as :func:`decodes_per_chunk` allows
    for B examples, between 1 and ``num_samples``."""
    return max(1, min(num_samples, decodes_per_chunk(model, x) // max(x.shape[0], 1)))


def log_likelihood(model, x: torch.Tensor, num_samples: int = 1000,
                   chunk_size: int | None = None,
                   generator: torch.Generator | None = None) -> LogLikelihood:
    r"""Importance-sampled :math:`\log p(x)` with ``q(z|x)`` as proposal (Burda et al. 2016).

    .. math::
        \log \hat p(x) = \operatorname{logsumexp}_{s=1}^{S}
            \big[\log p(x|z_s) + \log p(z_s) - \log q(z_s|x)\big] - \log S

    This is :math:`\mathcal{L}_S` of :func:`iwae_bound`: a consistent estimate of
    :math:`\log p(x)` that is biased low for finite S (Jensen). Runs under ``no_grad``.
    The S samples are drawn in chunks of ``chunk_size`` (the last one may be smaller) and
    combined with a running float64 logsumexp, so memory does not grow with S. The draws
    do not depend on ``chunk_size`` (see the module docstring), so neither does the result.
    They do depend on the batch: example ``i`` evaluated alone gets different draws than
    inside a batch (the estimates agree within their Monte-Carlo errors).

    Args:
        model: see the module docstring.
        x: ``(B, *event_shape)``.
        num_samples: S >= 1 importance samples per example, used exactly.
        chunk_size: samples per chunk; default :func:`default_chunk`: a chunk decodes at
            most ``DECODED_PER_CHUNK`` (2**12) MNIST-sized examples, fewer when the decoder
            has more outputs per example (:data:`OUTPUTS_PER_CHUNK`).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        :class:`LogLikelihood`; ``stderr`` is over examples and excludes Monte-Carlo error,
        which is reported separately per example in ``mc_stderr``.

    Raises:
        ConfigError: ``num_samples < 1`` or ``chunk_size < 1``.
    """
    _check_count("num_samples", num_samples)
    if chunk_size is None:
        chunk_size = default_chunk(model, x, num_samples)
    _check_count("chunk_size", chunk_size)
    with torch.no_grad():
        q = model.encode(x)
        prior = model.prior(x.device)
        # running log sum w, log sum w^2 and the largest weights (for k-hat): flat in S
        weights = WeightDiagnostics(num_samples, x.shape[0], device=x.device)
        for start in range(0, num_samples, chunk_size):
            count = min(chunk_size, num_samples - start)
            z, noise, log_q = _draw_log_q(q, count, generator)
            # x is checked against the likelihood with the first chunk only
            weights.update(_log_weights(model, x, q, prior, z, noise,
                                        validate=None if start == 0 else False, log_q=log_q))
    per_example = weights.log_sum_w - math.log(num_samples)
    mean, stderr = mean_and_stderr(per_example)
    diagnostics = weights.result()
    return LogLikelihood(
        per_example=per_example,
        mean=mean,
        stderr=stderr,
        mc_stderr=_delta_method_stderr(weights.log_sum_w, weights.log_sum_w2, num_samples),
        num_samples=num_samples,
        pareto_k=diagnostics.pareto_k,
        ess=diagnostics.ess,
    )


def _delta_method_stderr(lse_w: torch.Tensor, lse_w2: torch.Tensor, num: int) -> torch.Tensor:
    r"""Standard error of :math:`\log \bar w` from :math:`\log\sum w` and :math:`\log\sum w^2`."""
    if num < 2:
        return torch.full_like(lse_w, math.nan)
    ratio = torch.exp(lse_w2 - 2 * lse_w)  # sum w^2 / (sum w)^2, in [1/S, 1]
    return ((num * ratio - 1).clamp(min=0) / (num - 1)).sqrt()


# --------------------------------------------------------------------------- reporting


def mean_and_stderr(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Split-level mean (sum over examples / N) and its standard error, in float64.

    ``stderr = std(values, ddof=1) / sqrt(N)``; NaN when N = 1. Pass per-example values,
    never batch means.

    Raises:
        DataError: no values.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().double().flatten().cpu()
    else:  # never through float32: Python floats keep their precision
        values = torch.tensor(list(values), dtype=torch.float64)
    count = values.numel()
    if count == 0:
        raise DataError("cannot average zero values: evaluate at least one example")
    mean = float(values.sum() / count)
    if count == 1:
        return mean, math.nan
    return mean, float(values.std(correction=1) / math.sqrt(count))


def bits_per_dim(nats, num_dims: int, eight_bit_density: bool = False):
    r"""Convert a per-example negative log-likelihood (nats) to bits per dimension.

    ``nats / (D ln 2)``. ``nats`` must be a *negative* log-likelihood (``nll`` or
    ``nelbo``, usually positive), per example or averaged over examples.

    ``eight_bit_density=True`` is the convention of Theis et al. (2016) and Dinh et al.
    (2017) for 8-bit images: the model is a *density* on ``y = (x + u) / 256`` in
    ``[0, 1)^D``, where ``x`` in {0..255} and ``u ~ U[0, 1)^D`` is dequantisation noise.
    The density of ``x + u`` on ``[0, 256)^D`` is ``p(y) / 256^D``, so ``D ln 256`` nats
    (8 bits per dimension) are added: ``(nats + D ln 256) / (D ln 2)``. The result is then
    an upper bound (in expectation) on the discrete model's bits/dim. If the density was
    fitted to ``x / 255`` instead, the exact correction is ``D ln 255``; do not use this
    flag then.

    Args:
        nats: float or tensor, per-example NLL in nats.
        num_dims: D, the number of data dimensions (e.g. 3*32*32).
        eight_bit_density: add the ``D ln 256`` change-of-scale correction.

    Raises:
        ConfigError: ``num_dims < 1``.
    """
    _check_count("num_dims", num_dims)
    if eight_bit_density:
        nats = nats + num_dims * math.log(256.0)
    return nats / (num_dims * math.log(2.0))
