r"""Diagnostics of importance weights: the Pareto k-hat and the effective sample size.

An importance-sampled :math:`\log \hat p(x) = \log \frac1K \sum_s w_s` (``w_s = p(x, z_s) /
q(z_s|x)``) has a finite variance, and a meaningful standard error, only when the weights
do. The shape :math:`k` of the generalized Pareto distribution fitted to the upper tail of
the weights says how many moments they have (:math:`1/k` of them): Vehtari, Simpson,
Gelman, Yao & Gabry, "Pareto smoothed importance sampling", JMLR 25(72), 2024 (PSIS),
Section 3. How to read it:

- :math:`\hat k < 0.5`: finite variance; the central limit theorem and the standard error
  hold.
- :math:`0.5 \le \hat k < \kappa(K) = \min(1 - 1/\log_{10} K,\ 0.7)`: infinite variance, but
  the estimate still converges at a usable rate (:func:`pareto_k_threshold`).
- :math:`\hat k \ge 0.7`: the estimate is unreliable (typically biased low with a standard
  error that looks too small); draw many more samples, improve ``q(z|x)`` or use AIS.

The fit is the paper's: the tail is the :math:`M = \lceil \min(K/5,\ 3\sqrt{K}) \rceil`
largest weights (independent draws, relative efficiency 1), shifted by the
:math:`(M+1)`-th largest; the shape is the empirical-Bayes estimate of Zhang & Stephens
(2009, "A new and efficient estimation method for the generalized Pareto distribution",
Technometrics 51(3)) with ``30 + floor(sqrt(M))`` grid points and the weakly informative
prior that pulls it towards 0.5 with the weight of 10 observations,
:math:`\hat k = (M \hat k_{ZS} + 5) / (M + 10)`. Every step follows ArviZ's ``psislw``
(0.23.4) and R's ``loo``, and tests/test_psis.py checks the values against ArviZ's.

Special cases (documented values, never an exception):

- fewer than :data:`MIN_SAMPLES` (25) weights: ``nan``. Their tail has at most 4 points,
  too few to fit (ArviZ and ``loo`` return ``inf`` there, which a report would count as a
  failure of the proposal rather than of the sample size).
- weights whose log-values all lie within ``constant_tol`` nats (default
  :data:`CONSTANT_TOL`) of each other, e.g. ``q(z|x)`` equal to the exact posterior:
  ``-inf``. The weights have no tail, and every estimate is within ``constant_tol`` nats
  of the others. (ArviZ returns ``inf`` for exactly equal weights, since their tail is
  empty.)
- a tail with at most 4 values strictly above the cutoff although the weights are not
  constant (many ties at the top): ``inf``, as ArviZ.
- an example with a NaN or +inf log-weight, or with every weight 0 (all ``-inf``): ``nan``
  k-hat and ESS (the estimate itself is NaN or infinite then). A log-weight of ``-inf``
  (weight 0) among finite ones is allowed.

The effective sample size :math:`(\sum_s w_s)^2 / \sum_s w_s^2` (Kong 1992) is in
:math:`[1, K]`; it equals K for constant weights. It is itself estimated from the weights,
so it looks good exactly when the tail is too heavy to have been sampled: read it together
with :math:`\hat k`.

Layout: ``log_weights`` is ``(K, B)`` (samples first, as everywhere in vaelab) or ``(K,)``;
results are ``(B,)`` (or 0-d) float64. :class:`WeightDiagnostics` gives the same numbers when
the K weights arrive in chunks, keeping only ``O(sqrt(K) B)`` numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "CONSTANT_TOL",
    "MIN_SAMPLES",
    "PSISDiagnostics",
    "WeightDiagnostics",
    "effective_sample_size",
    "pareto_k",
    "pareto_k_threshold",
    "tail_length",
]

#: Smallest K for which k-hat is estimated: M = ceil(K/5) = 5 tail points, one more than
#: the 4 below which ArviZ and loo give up.
MIN_SAMPLES = 25

#: Log-weights within this many nats of each other count as constant (k-hat = -inf).
CONSTANT_TOL = 1e-6

_PRIOR_K = 10.0  # weight, in observations, of the prior pulling k towards 0.5 (PSIS, App. C)
_PRIOR_BS = 3.0  # Zhang & Stephens' prior scale for the grid of b = -k / sigma
_LOG_TINY = math.log(torch.finfo(torch.float64).tiny)  # smallest cutoff, as ArviZ
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class PSISDiagnostics:
    r"""Per-example diagnostics of K importance weights.

    Attributes:
        pareto_k: ``(B,)`` float64 k-hat (``nan`` for K < 25, ``-inf`` for constant weights).
        ess: ``(B,)`` float64 effective sample size :math:`(\sum w)^2 / \sum w^2`, in [1, K].
        num_samples: K.
    """

    pareto_k: Tensor
    ess: Tensor
    num_samples: int

    @property
    def threshold(self) -> float:
        """k-hat above which the estimate is unreliable for this K (:func:`pareto_k_threshold`)."""
        return pareto_k_threshold(self.num_samples)


def tail_length(num_samples: int) -> int:
    r"""Number of weights in the fitted tail, :math:`M = \lceil \min(K/5, 3\sqrt{K}) \rceil`.

    PSIS (Vehtari et al. 2024), Section 3, with relative efficiency 1 (independent draws).

    Raises:
        ConfigError: ``num_samples < 1``.
    """
    _check_count("num_samples", num_samples)
    return int(math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples))))


def pareto_k_threshold(num_samples: int) -> float:
    r"""The sample-size dependent k-hat threshold :math:`\min(1 - 1/\log_{10} K,\ 0.7)`.

    Above it the estimate is unreliable (PSIS, Vehtari et al. 2024, Section 3.2.2); it is
    0.7 from K = 2155 on, 0.5 at K = 100. ``nan`` for K < :data:`MIN_SAMPLES`.

    Raises:
        ConfigError: ``num_samples < 1``.
    """
    _check_count("num_samples", num_samples)
    if num_samples < MIN_SAMPLES:
        return math.nan
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def pareto_k(log_weights: Tensor, constant_tol: float = CONSTANT_TOL) -> Tensor:
    r"""PSIS k-hat of the importance weights of each example.

    Args:
        log_weights: ``(K, B)`` (or ``(K,)``) log importance weights, e.g.
            :math:`\log p(x, z_s) - \log q(z_s|x)`; any additive constant per example.
        constant_tol: nats; log-weights spanning at most this count as constant (``-inf``).

    Returns:
        ``(B,)`` (or 0-d) float64 k-hat; see the module docstring for ``nan``/``-inf``/``inf``.

    Raises:
        ConfigError: ``log_weights`` is not 1-D or 2-D.
    """
    return _diagnose(log_weights, constant_tol).pareto_k


def effective_sample_size(log_weights: Tensor) -> Tensor:
    r"""Effective sample size :math:`(\sum_s w_s)^2 / \sum_s w_s^2` per example (Kong 1992).

    Args:
        log_weights: ``(K, B)`` (or ``(K,)``) log importance weights.

    Returns:
        ``(B,)`` (or 0-d) float64 in [1, K].

    Raises:
        ConfigError: ``log_weights`` is not 1-D or 2-D.
    """
    return _diagnose(log_weights, CONSTANT_TOL).ess


def _diagnose(log_weights: Tensor, constant_tol: float) -> PSISDiagnostics:
    """Both diagnostics of ``(K, B)`` or ``(K,)`` log-weights (one pass of the accumulator)."""
    if log_weights.dim() not in (1, 2):
        raise ConfigError(
            f"log_weights must be (K, B) or (K,), got shape {tuple(log_weights.shape)}: "
            "put the samples on dim 0"
        )
    flat = log_weights.unsqueeze(1) if log_weights.dim() == 1 else log_weights
    acc = WeightDiagnostics(flat.shape[0], flat.shape[1], device=flat.device,
                            constant_tol=constant_tol)
    acc.update(flat)
    out = acc.result()
    if log_weights.dim() == 1:
        return PSISDiagnostics(out.pareto_k[0], out.ess[0], out.num_samples)
    return out


class WeightDiagnostics:
    r"""k-hat and ESS of K log-weights per example that arrive in chunks.

    Keeps, per example, the running :math:`\log\sum w`, :math:`\log\sum w^2`, the smallest
    log-weight and the :math:`M + 1` largest (merged per chunk with ``torch.topk``): memory
    ``O((sqrt(K) + 4) B)`` float64, whatever the chunking. The result equals
    :func:`pareto_k` / :func:`effective_sample_size` on all K log-weights at once (the top
    values are the same numbers; sums differ by float rounding).

    Example::

        acc = WeightDiagnostics(num_samples=5000, batch=x.shape[0], device=x.device)
        for chunk in chunks:            # log_w (k, B), k summing to 5000
            acc.update(log_w)
        diag = acc.result()             # diag.pareto_k, diag.ess: (B,)

    Args:
        num_samples: K, the total number of log-weights per example (M depends on it).
        batch: B.
        device: where the state lives (that of the log-weights).
        constant_tol: see :func:`pareto_k`.

    Raises:
        ConfigError: ``num_samples`` or ``batch`` < 1, or a negative ``constant_tol``.
    """

    def __init__(self, num_samples: int, batch: int, device: torch.device | str | None = None,
                 constant_tol: float = CONSTANT_TOL) -> None:
        _check_count("num_samples", num_samples)
        _check_count("batch", batch)
        if not constant_tol >= 0:
            raise ConfigError(f"constant_tol must be >= 0 nats, got {constant_tol!r}")
        self.num_samples, self.batch, self.constant_tol = num_samples, batch, constant_tol
        self._keep = min(tail_length(num_samples) + 1, num_samples)
        kw = {"dtype": torch.float64, "device": device}
        self._top = torch.full((self._keep, batch), -math.inf, **kw)
        self._min = torch.full((batch,), math.inf, **kw)
        self._lse_w = torch.full((batch,), -math.inf, **kw)
        self._lse_w2 = torch.full((batch,), -math.inf, **kw)
        self._bad = torch.zeros(batch, dtype=torch.bool, device=device)
        self._seen = 0

    @property
    def log_sum_w(self) -> Tensor:
        r"""``(B,)`` float64 :math:`\log \sum_s w_s` of the log-weights added so far."""
        return self._lse_w

    @property
    def log_sum_w2(self) -> Tensor:
        r"""``(B,)`` float64 :math:`\log \sum_s w_s^2` of the log-weights added so far."""
        return self._lse_w2

    def update(self, log_weights: Tensor) -> None:
        """Add a chunk of ``(k, B)`` log-weights (converted to float64).

        Raises:
            ConfigError: a chunk not shaped ``(k, B)``, or more than K log-weights in all.
        """
        lw = self._check_chunk(log_weights)
        self._seen += lw.shape[0]
        self._bad |= (torch.isnan(lw) | (lw == math.inf)).any(0)
        self._lse_w = torch.logaddexp(self._lse_w, torch.logsumexp(lw, 0))
        self._lse_w2 = torch.logaddexp(self._lse_w2, torch.logsumexp(2 * lw, 0))
        self._min = torch.minimum(self._min, lw.min(0).values)
        both = torch.cat([self._top, lw])
        self._top = torch.topk(both, self._keep, dim=0, sorted=True).values

    def _check_chunk(self, log_weights: Tensor) -> Tensor:
        if log_weights.dim() != 2 or log_weights.shape[1] != self.batch:
            raise ConfigError(
                f"a chunk of log-weights must be (k, {self.batch}), got shape "
                f"{tuple(log_weights.shape)}: samples on dim 0, one column per example"
            )
        if self._seen + log_weights.shape[0] > self.num_samples:
            raise ConfigError(
                f"got {self._seen + log_weights.shape[0]} log-weights per example but "
                f"num_samples is {self.num_samples}: pass the total K when constructing"
            )
        return log_weights.detach().to(dtype=torch.float64, device=self._top.device)

    def result(self) -> PSISDiagnostics:
        """k-hat and ESS of the K log-weights seen.

        Raises:
            ConfigError: fewer than K log-weights were added.
        """
        if self._seen != self.num_samples:
            raise ConfigError(
                f"{self._seen} of the {self.num_samples} log-weights per example were added: "
                "call update with every chunk before result"
            )
        ess = torch.exp(2 * self._lse_w - self._lse_w2)
        khat = _khat_from_top(self._top, self._min, self.num_samples, self.constant_tol)
        unusable = self._bad | (self._top[0] == -math.inf)  # NaN/+inf, or every weight 0
        ess = torch.where(unusable, math.nan, ess)
        khat = torch.where(unusable, math.nan, khat)
        return PSISDiagnostics(pareto_k=khat, ess=ess, num_samples=self.num_samples)


# --------------------------------------------------------------------------- the fit


def _khat_from_top(top: Tensor, smallest: Tensor, num_samples: int, constant_tol: float) -> Tensor:
    """k-hat ``(B,)`` from the ``M + 1`` largest log-weights ``(M + 1, B)`` (descending)
    and the smallest ``(B,)``."""
    batch = top.shape[1]
    khat = torch.full((batch,), math.nan, dtype=torch.float64, device=top.device)
    if num_samples < MIN_SAMPLES:
        return khat
    constant = (top[0] - smallest) <= constant_tol  # NaN (unusable columns) compares False
    shifted = top - top[0]  # the largest is 0, as ArviZ
    cutoff = shifted[-1].clamp(min=_LOG_TINY)
    in_tail = shifted[:-1] > cutoff  # (M, B): the tail is the values above the cutoff
    counts = in_tail.sum(0)
    khat[~constant & (counts <= 4)] = math.inf  # ties at the top: as ArviZ
    khat[constant] = -math.inf
    fit = ~constant & (counts > 4)
    for n in counts[fit].unique().tolist():  # one group unless ties shorten some tails
        cols = torch.nonzero(fit & (counts == n)).flatten()
        # the n largest, ascending, as exp(x) - exp(cutoff): the tail's exceedances
        tail = shifted[:n, cols].flip(0).exp() - cutoff[cols].exp()
        khat[cols] = _gpd_shape(tail)
    return khat


def _gpd_shape(tail: Tensor) -> Tensor:
    r"""Regularised Zhang & Stephens (2009) estimate of the GPD shape, per column.

    Args:
        tail: ``(n, G)`` positive exceedances, ascending in each column, float64.

    Returns:
        ``(G,)`` :math:`\hat k = (n \hat k_{ZS} + 10 \cdot 0.5) / (n + 10)`.

    With :math:`b = -k/\sigma`, the profile log-likelihood of b is
    :math:`\ell(b) = n(\log(-b/k(b)) - k(b) - 1)`, :math:`k(b) = \frac1n \sum_i \log(1 - b y_i)`;
    the posterior mean of b over the grid
    :math:`b_j = 1/y_{(n)} + (1 - \sqrt{m/(j - 1/2)}) / (3 y_{(\lfloor n/4 + 1/2 \rfloor)})`,
    :math:`j = 1..m`, :math:`m = 30 + \lfloor\sqrt n\rfloor`, weighs each by
    :math:`\operatorname{softmax}(\ell)_j` (grid weights under :math:`10\epsilon` dropped, as
    ArviZ); then :math:`\hat k_{ZS} = k(\bar b)`.
    """
    n = tail.shape[0]
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=torch.float64, device=tail.device)
    quartile = tail[int(n / 4 + 0.5) - 1]  # (G,)
    b = (1 - torch.sqrt(m / (j - 0.5)))[:, None] / (_PRIOR_BS * quartile) + 1 / tail[-1]  # (m, G)
    k = torch.log1p(-b[:, None, :] * tail[None]).mean(1)  # (m, G)
    profile = n * (torch.log(-(b / k)) - k - 1)
    weights = torch.softmax(profile, dim=0)
    weights = torch.where(weights >= 10 * _EPS, weights, torch.zeros_like(weights))
    b_post = (b * weights).sum(0) / weights.sum(0)
    k_post = torch.log1p(-b_post * tail).mean(0)
    return (n * k_post + _PRIOR_K * 0.5) / (n + _PRIOR_K)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
