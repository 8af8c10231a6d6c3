"""Pareto k-hat and ESS (vaelab.psis) against ArviZ's values on fixed inputs.

The reference numbers below were produced with ArviZ 0.23.4 (numpy 2.4.6) in a scratch
virtual environment:

    lw = _cases(K, seed=K).numpy()            # the torch draws below, saved as .npy
    _, k = arviz.psislw(lw.T.copy(), reff=1.0)  # samples on the last axis for ArviZ

vaelab runs the same algorithm in float64 (same tail, same grid, same prior); the only
differences are summation order (torch vs numpy reductions over at most 213 values) and
the softmax form of the grid weights, which change results by a few ulps: the largest
difference seen was 2.9e-15, so 1e-12 is a tolerance with a thousandfold margin that
still catches any change to the algorithm (a different tail length or grid moves k-hat by
more than 1e-3).
"""

from __future__ import annotations

import math

import pytest
import torch

from vaelab.errors import ConfigError
from vaelab.psis import (
    MIN_SAMPLES,
    WeightDiagnostics,
    effective_sample_size,
    pareto_k,
    pareto_k_threshold,
    tail_length,
)

ARVIZ_TOL = 1e-12


def _cases(num: int, seed: int) -> torch.Tensor:
    """``(K, 6)`` log-weights: uniform weights (k = -1), lognormal with sigma 0.5 and 2,
    and Pareto weights log w = k E, E ~ Exp(1), with true k = 0.3, 0.8, 1.5."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num, generator=g, dtype=torch.float64)
    n = torch.randn(num, generator=g, dtype=torch.float64)
    e = torch.empty(num, dtype=torch.float64).exponential_(generator=g)
    return torch.stack([u.log(), 0.5 * n, 2.0 * n, 0.3 * e, 0.8 * e, 1.5 * e], 1)


def _ties() -> torch.Tensor:
    """``(1000, 3)`` log-weights with ties in the tail and at the cutoff, and zero weights."""
    g = torch.Generator().manual_seed(7)
    n = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    return torch.stack([
        torch.round(2 * n[:, 0]) / 2,
        torch.round(4 * n[:, 1]) / 4 * 1.5,
        torch.where(n[:, 2] < -1.0, -torch.inf, n[:, 2]),
    ], 1)


# arviz.psislw(...)[1], ArviZ 0.23.4 (see the module docstring)
ARVIZ_KHAT = {
    100: [-0.7151358953771716, 0.18838451775207654, 0.6118552538106001,
          0.5524512054947773, 0.8750639105461248, 1.3254220510646482],
    1000: [-0.9860449028578694, 0.1602153452759318, 0.6522450302589473,
           0.22708433811571854, 0.6100044470047646, 1.1470483802475429],
    5000: [-0.8579112599859224, 0.1533694813338659, 0.733251937885856,
           0.29978157766937424, 0.8234679442466848, 1.538950484453846],
}
ARVIZ_KHAT_TIES = [0.1920492921185799, 0.43088703076177415, 0.2481662553621379]


@pytest.mark.parametrize("num", sorted(ARVIZ_KHAT))
def test_pareto_k_equals_arviz(num):
    khat = pareto_k(_cases(num, seed=num))
    expected = torch.tensor(ARVIZ_KHAT[num], dtype=torch.float64)
    torch.testing.assert_close(khat, expected, rtol=0, atol=ARVIZ_TOL)
    assert khat.shape == (6,) and khat.dtype == torch.float64


def test_pareto_k_equals_arviz_with_ties_and_zero_weights():
    # ties shorten the tail (values equal to the cutoff are not in it), as in ArviZ
    khat = pareto_k(_ties())
    expected = torch.tensor(ARVIZ_KHAT_TIES, dtype=torch.float64)
    torch.testing.assert_close(khat, expected, rtol=0, atol=ARVIZ_TOL)


def test_pareto_k_recovers_known_tail_shapes_and_separates_them():
    # with K = 5000 the estimates sit near the true k (0.3, 0.8, 1.5) and in order
    khat = pareto_k(_cases(5000, seed=5000))
    assert khat[3] == pytest.approx(0.3, abs=0.05)
    assert khat[4] == pytest.approx(0.8, abs=0.05)
    assert khat[5] == pytest.approx(1.5, abs=0.1)
    assert khat[0] < 0  # bounded weights
    assert khat[1] < 0.5 < khat[4] and khat[4] > pareto_k_threshold(5000)


def test_pareto_k_is_invariant_to_shift_and_order():
    lw = _cases(1000, seed=1)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    base = pareto_k(lw)
    torch.testing.assert_close(pareto_k(lw[perm]), base, rtol=0, atol=0)
    # a shift moves the log-weights by an exactly representable 1024: rounding only
    torch.testing.assert_close(pareto_k(lw + 1024.0), base, rtol=0, atol=1e-9)


def test_constant_weights_give_minus_inf_and_full_ess():
    lw = torch.full((200, 3), -12.5, dtype=torch.float64)
    lw[:, 1] += 1e-9 * torch.randn(200, generator=torch.Generator().manual_seed(0))
    khat = pareto_k(lw)
    assert torch.equal(khat, torch.full((3,), -math.inf, dtype=torch.float64))
    torch.testing.assert_close(effective_sample_size(lw), torch.full((3,), 200.0,
                               dtype=torch.float64), rtol=1e-12, atol=0)
    # a spread above the tolerance is fitted (rounding-level noise is bounded: k < 0)
    lw[:, 2] += 1e-3 * torch.rand(200, generator=torch.Generator().manual_seed(1))
    khat = pareto_k(lw)
    assert khat[2] < 0 and khat[0] == -math.inf
    assert pareto_k(lw, constant_tol=1e-2)[2] == -math.inf


def test_tiny_k_gives_nan_and_the_threshold_follows_the_paper():
    g = torch.Generator().manual_seed(3)
    small = torch.randn(MIN_SAMPLES - 1, 4, generator=g, dtype=torch.float64)
    assert torch.isnan(pareto_k(small)).all()
    ess = effective_sample_size(small)  # still defined
    assert ((ess >= 1) & (ess <= MIN_SAMPLES - 1)).all()
    enough = torch.randn(MIN_SAMPLES, 4, generator=g, dtype=torch.float64)
    assert torch.isfinite(pareto_k(enough)).all()
    assert tail_length(MIN_SAMPLES) == 5 and tail_length(100) == 20
    assert tail_length(5000) == 213  # ceil(3 sqrt(5000))
    assert math.isnan(pareto_k_threshold(MIN_SAMPLES - 1))
    assert pareto_k_threshold(100) == pytest.approx(0.5)
    assert pareto_k_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert pareto_k_threshold(5000) == 0.7


def test_effective_sample_size_by_hand():
    lw = _cases(1000, seed=2)
    w = (lw - lw.max(0).values).exp()
    expected = w.sum(0) ** 2 / w.square().sum(0)
    torch.testing.assert_close(effective_sample_size(lw), expected, rtol=1e-12, atol=0)
    assert effective_sample_size(lw)[0] > 700 > effective_sample_size(lw)[2]


def test_one_dimensional_input_gives_a_scalar():
    lw = _cases(1000, seed=1000)
    assert pareto_k(lw[:, 4]).shape == ()
    assert float(pareto_k(lw[:, 4])) == pytest.approx(ARVIZ_KHAT[1000][4], abs=ARVIZ_TOL)
    assert effective_sample_size(lw[:, 4]).shape == ()


def test_unusable_weights_give_nan():
    lw = _cases(100, seed=100)[:, :3].clone()
    lw[5, 0] = math.nan
    lw[7, 1] = math.inf
    lw[:, 2] = -math.inf  # every weight zero
    assert torch.isnan(pareto_k(lw)).all()
    assert torch.isnan(effective_sample_size(lw)).all()


@pytest.mark.parametrize("chunks", [[1000], [1, 999], [7, 300, 193, 500], [250] * 4])
def test_streaming_equals_all_at_once(chunks):
    lw = torch.cat([_cases(1000, seed=1000), _ties()], 1)
    acc = WeightDiagnostics(1000, lw.shape[1])
    start = 0
    for size in chunks:
        acc.update(lw[start:start + size].float().double())  # float32 chunks are converted
        start += size
    lw = lw.float().double()
    diag = acc.result()
    # the top M + 1 values are the same numbers, so k-hat is bitwise equal
    torch.testing.assert_close(diag.pareto_k, pareto_k(lw), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(diag.ess, effective_sample_size(lw), rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.log_sum_w, torch.logsumexp(lw, 0), rtol=0, atol=1e-12)
    torch.testing.assert_close(acc.log_sum_w2, torch.logsumexp(2 * lw, 0), rtol=0, atol=1e-12)
    assert diag.num_samples == 1000 and diag.threshold == pytest.approx(1 - 1 / 3)


def test_streaming_refuses_wrong_use():
    acc = WeightDiagnostics(10, 3)
    with pytest.raises(ConfigError, match=r"must be \(k, 3\)"):
        acc.update(torch.zeros(4, 2))
    acc.update(torch.zeros(6, 3))
    with pytest.raises(ConfigError, match="6 of the 10 log-weights"):
        acc.result()
    with pytest.raises(ConfigError, match="got 11 log-weights per example"):
        acc.update(torch.zeros(5, 3))
    with pytest.raises(ConfigError, match="num_samples must be a positive integer"):
        WeightDiagnostics(0, 3)
    with pytest.raises(ConfigError, match="constant_tol must be >= 0"):
        WeightDiagnostics(10, 3, constant_tol=-1.0)
    with pytest.raises(ConfigError, match=r"must be \(K, B\) or \(K,\)"):
        pareto_k(torch.zeros(2, 3, 4))
