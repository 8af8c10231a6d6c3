"""Objectives checked on probabilistic PCA, whose posterior and log p(x) are closed-form.

pPCA (Tipping & Bishop 1999): z ~ N(0, I_L), x | z ~ N(W z + mu, sigma^2 I_D), so
p(x) = N(mu, W W^T + sigma^2 I) and q*(z|x) = N(M^-1 W^T (x - mu), sigma^2 M^-1) with
M = W^T W + sigma^2 I. Everything is float64; Monte-Carlo checks use fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from ppca import PPCA, D, L
from vaelab.errors import ConfigError, DataError
from vaelab.objectives import (
    ELBOTerms,
    bits_per_dim,
    elbo_terms,
    iwae_bound,
    kl_weight,
    log_likelihood,
    mean_and_stderr,
    training_loss,
)

B = 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(seed: int = 1, n: int = B) -> torch.Tensor:
    return torch.randn(n, D, generator=gen(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- ELBO


def test_analytic_kl_matches_monte_carlo_per_dimension():
    model, x = PPCA("wrong", orthogonal=False), data()
    analytic = elbo_terms(model, x, kl="analytic")
    torch.testing.assert_close(analytic.kl, analytic.kl_per_dim.sum(-1))
    # reference: the closed form 0.5 * (mu^2 + s^2 - 1 - log s^2) per dimension
    q = model.encode(x).base_dist
    ref = 0.5 * (q.loc**2 + q.scale**2 - 1 - 2 * q.scale.log())
    torch.testing.assert_close(analytic.kl_per_dim, ref, rtol=1e-12, atol=1e-12)
    # 40 independent MC estimates with 250 draws each -> mean and its standard error
    g = gen(7)
    runs = torch.stack([elbo_terms(model, x, 250, "mc", g).kl_per_dim for _ in range(40)])
    mc_mean, mc_se = runs.mean(0), runs.std(0) / math.sqrt(40)
    assert ((mc_mean - analytic.kl_per_dim).abs() < 4 * mc_se).all()
    assert (mc_se < 0.05).all()  # the check has power


def test_auto_kl_is_analytic_for_diagonal_gaussians_and_mc_otherwise():
    x = data()
    diag, full = PPCA("wrong", orthogonal=False), PPCA("full", orthogonal=False)
    auto = elbo_terms(diag, x, kl="auto", generator=gen(0))
    analytic = elbo_terms(diag, x, kl="analytic", generator=gen(0))
    torch.testing.assert_close(auto.kl, analytic.kl, rtol=0, atol=0)
    torch.testing.assert_close(auto.recon, analytic.recon, rtol=0, atol=0)
    terms = elbo_terms(full, x, num_samples=3, kl="auto", generator=gen(0))
    assert terms.kl_per_dim is None  # a full-covariance q has no per-dimension split
    mc = elbo_terms(full, x, num_samples=3, kl="mc", generator=gen(0))
    torch.testing.assert_close(terms.kl, mc.kl, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no analytic KL between MultivariateNormal"):
        elbo_terms(full, x, kl="analytic")


@pytest.mark.parametrize("encoder", ["exact", "full"])
@pytest.mark.parametrize("num_samples", [1, 4])
def test_exact_posterior_gives_log_px_for_every_draw(encoder, num_samples):
    # log p(x, z) - log q*(z|x) = log p(x) for every z, so every estimate is exact
    model, x = PPCA(encoder, orthogonal=encoder == "exact"), data()
    expected = model.log_px(x)
    terms = elbo_terms(model, x, num_samples, kl="mc", generator=gen(3))
    torch.testing.assert_close(terms.elbo, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(terms.elbo, terms.recon - terms.kl, rtol=0, atol=0)
    torch.testing.assert_close(iwae_bound(model, x, 7, gen(4)), expected, rtol=0, atol=1e-10)
    ll = log_likelihood(model, x, num_samples=9, chunk_size=4, generator=gen(5))
    torch.testing.assert_close(ll.per_example, expected, rtol=0, atol=1e-10)


def test_elbo_terms_follow_the_documented_draws():
    # sample s is the s-th randn((B, L)) call: rebuild recon and the MC KL by hand
    model, x, num = PPCA("wrong", orthogonal=False), data(), 3
    terms = elbo_terms(model, x, num, kl="mc", generator=gen(11))
    g, q = gen(11), model.encode(x)
    z = torch.stack([q.base_dist.loc + q.base_dist.scale *
                     torch.randn(B, L, generator=g, dtype=torch.float64) for _ in range(num)])
    recon = torch.stack([model.decode(zs).log_prob(x) for zs in z]).mean(0)
    kl = (q.log_prob(z) - model.prior("cpu").log_prob(z)).mean(0)
    torch.testing.assert_close(terms.recon, recon, rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.kl, kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.kl_per_dim.sum(-1), kl, rtol=0, atol=1e-12)
    assert terms.recon.shape == (B,) and terms.kl_per_dim.shape == (B, L)


def test_draws_are_reproducible_with_a_generator_and_differ_across_seeds():
    for encoder in ["wrong", "full"]:
        model, x = PPCA(encoder, orthogonal=False), data()
        a = elbo_terms(model, x, 2, kl="mc", generator=gen(1)).recon
        b = elbo_terms(model, x, 2, kl="mc", generator=gen(1)).recon
        c = elbo_terms(model, x, 2, kl="mc", generator=gen(2)).recon
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_expected_elbo_equals_log_px_minus_kl_to_the_posterior():
    # E_q[ELBO] = log p(x) - KL(q || q*): compare a 4000-draw estimate with the closed form
    model, x = PPCA("wrong", orthogonal=False), data()
    q = model.encode(x).base_dist
    post_mean, post_cov = model.posterior(x)
    gap = torch.distributions.kl_divergence(
        MultivariateNormal(q.loc, scale_tril=torch.diag_embed(q.scale)),
        MultivariateNormal(post_mean, covariance_matrix=post_cov),
    )
    runs = torch.stack([elbo_terms(model, x, 400, generator=gen(s)).elbo for s in range(10)])
    se = runs.std(0) / math.sqrt(10)
    assert ((runs.mean(0) - (model.log_px(x) - gap)).abs() < 4 * se).all()
    assert (gap > 0.3).all()  # the wrong encoder is really wrong


# --------------------------------------------------------------------------- IWAE, log p(x)


def test_log_likelihood_matches_closed_form_within_its_monte_carlo_error():
    model, x, num = PPCA("wrong", orthogonal=False), data(), 2000
    ll = log_likelihood(model, x, num_samples=num, generator=gen(21))
    expected = model.log_px(x)
    # per-example MC standard error from independent importance weights drawn here
    q, prior = model.encode(x), model.prior("cpu")
    z = q.sample((num,))
    log_w = model.decode(z.reshape(-1, L)).log_prob(x.repeat(num, 1)).reshape(num, B)
    log_w = log_w + prior.log_prob(z) - q.log_prob(z)
    w = (log_w - log_w.max(0).values).exp()
    se = (w.std(0) / math.sqrt(num)) / w.mean(0)  # delta method for log(mean w)
    assert ((ll.per_example - expected).abs() < 3 * se).all()
    # the library's own estimate of the same error agrees within a factor 1.5
    assert ((ll.mc_stderr / se - 1).abs() < 0.5).all()
    # importance sampling with many draws beats the ELBO (gap >= 0.3 nats here)
    elbo = elbo_terms(model, x, num, generator=gen(22)).elbo
    assert (ll.per_example > elbo + 0.2).all()
    assert ll.mean == pytest.approx(float(ll.per_example.mean()), abs=1e-12)
    assert ll.stderr == pytest.approx(float(ll.per_example.std() / math.sqrt(B)), rel=1e-12)
    assert ll.num_samples == num and ll.per_example.dtype == torch.float64


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50, None])
def test_log_likelihood_does_not_depend_on_chunk_size(chunk_size):
    model, x = PPCA("wrong", orthogonal=False), data()
    ref = log_likelihood(model, x, num_samples=50, chunk_size=50, generator=gen(8))
    got = log_likelihood(model, x, num_samples=50, chunk_size=chunk_size, generator=gen(8))
    torch.testing.assert_close(got.per_example, ref.per_example, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.mc_stderr, ref.mc_stderr, rtol=0, atol=1e-10)


def test_log_likelihood_uses_exactly_num_samples():
    model, x = PPCA("wrong", orthogonal=False), data()
    chunked = log_likelihood(model, x, num_samples=7, chunk_size=3, generator=gen(9))
    whole = log_likelihood(model, x, num_samples=7, chunk_size=7, generator=gen(9))
    six = log_likelihood(model, x, num_samples=6, chunk_size=3, generator=gen(9))
    torch.testing.assert_close(chunked.per_example, whole.per_example, rtol=0, atol=1e-12)
    assert not torch.allclose(chunked.per_example, six.per_example)
    # the same 7 draws as the 7-sample IWAE bound, and the logsumexp rebuilt by hand
    iwae = iwae_bound(model, x, 7, gen(9))
    torch.testing.assert_close(chunked.per_example, iwae, rtol=0, atol=1e-12)
    g, q = gen(9), model.encode(x)
    z = torch.stack([q.base_dist.loc + q.base_dist.scale *
                     torch.randn(B, L, generator=g, dtype=torch.float64) for _ in range(7)])
    log_w = torch.stack([model.decode(zs).log_prob(x) for zs in z])
    log_w = log_w + model.prior("cpu").log_prob(z) - q.log_prob(z)
    by_hand = torch.logsumexp(log_w, 0) - math.log(7)
    torch.testing.assert_close(chunked.per_example, by_hand, rtol=0, atol=1e-12)


def test_log_likelihood_alone_or_in_a_batch_agrees_within_monte_carlo_error():
    # draws depend on the batch layout (documented), so compare estimates statistically
    model, x = PPCA("wrong", orthogonal=False), data(n=8)
    batch = log_likelihood(model, x, num_samples=500, generator=gen(30))
    for i in [0, 5]:
        alone = log_likelihood(model, x[i : i + 1], num_samples=500, generator=gen(31 + i))
        se = math.hypot(float(alone.mc_stderr[0]), float(batch.mc_stderr[i]))
        assert abs(float(alone.per_example[0] - batch.per_example[i])) < 4 * se
        assert math.isnan(alone.stderr)  # one example: no between-example spread


def test_iwae_bound_grows_with_k_and_stays_below_log_px():
    model, reps = PPCA("wrong", orthogonal=False), 400
    x = data(n=2)
    xs = x.repeat(reps, 1)  # row r*2 + i is example i: 400 independent draws of each bound
    stats = {}
    for k in [1, 5, 50]:
        values = iwae_bound(model, xs, k, gen(k)).reshape(reps, 2)
        stats[k] = (values.mean(0), values.std(0) / math.sqrt(reps))
    log_px = model.log_px(x)
    for small, large in [(1, 5), (5, 50)]:
        (m1, s1), (m2, s2) = stats[small], stats[large]
        assert (m2 - m1 > 4 * torch.sqrt(s1**2 + s2**2)).all()
    m50, s50 = stats[50]
    assert (m50 < log_px + 4 * s50).all()
    # k = 1 is the ELBO in expectation (analytic KL reference)
    elbo = elbo_terms(model, x, 4000, kl="analytic", generator=gen(99)).elbo
    m1, s1 = stats[1]
    assert ((m1 - elbo).abs() < 4 * s1 + 0.01).all()


def test_iwae_bound_is_differentiable_and_its_gradient_is_the_bounds():
    model, x = PPCA("wrong", orthogonal=False), data(n=2)
    model.offset.requires_grad_(True)
    iwae_bound(model, x, 5, gen(40)).sum().backward()
    grad = model.offset.grad.clone()
    model.offset.requires_grad_(False)
    for j in range(L):  # central differences of the same bound with the same draws
        step = torch.zeros(L, dtype=torch.float64)
        step[j] = 1e-6
        model.offset += step
        up = iwae_bound(model, x, 5, gen(40)).sum()
        model.offset -= 2 * step
        down = iwae_bound(model, x, 5, gen(40)).sum()
        model.offset += step
        assert float(grad[j]) == pytest.approx(float(up - down) / 2e-6, rel=1e-6, abs=1e-8)


# --------------------------------------------------------------------------- loss, weights


def hand_terms(kl_per_dim=True) -> ELBOTerms:
    recon = torch.tensor([-10.0, -20.0])
    per_dim = torch.tensor([[1.0, 2.0], [4.0, 1.0]])
    return ELBOTerms(recon=recon, kl=per_dim.sum(-1),
                     kl_per_dim=per_dim if kl_per_dim else None, elbo=recon - per_dim.sum(-1))


@pytest.mark.parametrize(
    "beta, free_bits, expected",
    [
        (1.0, 0.0, (13 + 25) / 2),  # -(recon - KL), mean over the batch
        (0.5, 0.0, (11.5 + 22.5) / 2),
        (0.0, 0.0, 15.0),
        # free bits 2: batch-mean KL per dim [2.5, 1.5] -> max(2, .) = [2.5, 2] -> 4.5
        (1.0, 2.0, 15 + 4.5),
        (0.5, 2.0, 15 + 2.25),
        (1.0, 1.0, 15 + 4.0),  # below both per-dim means: same as no free bits
    ],
)
def test_training_loss_by_hand(beta, free_bits, expected):
    loss = training_loss(hand_terms(), beta=beta, free_bits=free_bits)
    assert loss.shape == () and float(loss) == pytest.approx(expected, abs=1e-6)


def test_free_bits_block_the_kl_gradient_of_dimensions_below_the_threshold():
    per_dim = torch.tensor([[1.0, 2.0], [4.0, 1.0]], requires_grad=True)
    terms = ELBOTerms(torch.zeros(2), per_dim.sum(-1), per_dim, -per_dim.sum(-1))
    training_loss(terms, beta=1.0, free_bits=2.0).backward()
    torch.testing.assert_close(per_dim.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


@pytest.mark.parametrize(
    "step, beta, warmup, expected",
    [(0, 2.0, 10, 0.0), (5, 2.0, 10, 1.0), (10, 2.0, 10, 2.0), (25, 2.0, 10, 2.0),
     (0, 0.5, 0, 0.5), (3, 1.0, 4, 0.75)],
)
def test_kl_weight_warm_up(step, beta, warmup, expected):
    assert kl_weight(step, beta, warmup) == pytest.approx(expected, abs=1e-15)


# --------------------------------------------------------------------------- reporting


def test_mean_and_stderr_over_examples():
    values = torch.tensor([1.0, 2.0, 4.0, 9.0])
    mean, se = mean_and_stderr(values)
    assert mean == 4.0
    assert se == pytest.approx(math.sqrt(((9 + 4 + 0 + 25) / 3) / 4), rel=1e-12)
    assert mean_and_stderr([3.0])[0] == 3.0 and math.isnan(mean_and_stderr([3.0])[1])
    # float64 throughout: float32 would round 1e8 + 1.5 to 1e8 + 2
    assert mean_and_stderr([1e8 + 1, 1e8 + 2]) == (1e8 + 1.5, 0.5)
    with pytest.raises(DataError, match="zero values"):
        mean_and_stderr([])


@pytest.mark.parametrize(
    "nats, dims, eight_bit, expected",
    [
        (784 * math.log(2) * 1.5, 784, False, 1.5),
        (0.0, 3072, True, 8.0),  # D ln 256 / (D ln 2) = 8 bits per dimension
        (3072 * math.log(2) * -4.0, 3072, True, 4.0),  # a density above 1 on [0,1)^D
        (100.0, 10, False, 100 / (10 * math.log(2))),
    ],
)
def test_bits_per_dim(nats, dims, eight_bit, expected):
    assert bits_per_dim(nats, dims, eight_bit) == pytest.approx(expected, rel=1e-12)
    as_tensor = bits_per_dim(torch.tensor([nats], dtype=torch.float64), dims, eight_bit)
    assert float(as_tensor[0]) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x: elbo_terms(m, x, num_samples=0), "num_samples must be a positive"),
        (lambda m, x: elbo_terms(m, x, kl="exact"), "unknown kl mode 'exact'"),
        (lambda m, x: iwae_bound(m, x, k=0), "k must be a positive"),
        (lambda m, x: log_likelihood(m, x, num_samples=0), "num_samples must be"),
        (lambda m, x: log_likelihood(m, x, chunk_size=0), "chunk_size must be"),
        (lambda m, x: training_loss(hand_terms(), beta=-1.0), "beta must be >= 0"),
        (lambda m, x: training_loss(hand_terms(), free_bits=-0.1), "free_bits must be >= 0"),
        (lambda m, x: training_loss(hand_terms(False), free_bits=1.0), "per-dimension KL"),
        (lambda m, x: kl_weight(-1), "step must be >= 0"),
        (lambda m, x: kl_weight(0, -1.0), "beta must be >= 0"),
        (lambda m, x: kl_weight(0, 1.0, -5), "warmup_steps must be >= 0"),
        (lambda m, x: bits_per_dim(1.0, 0), "num_dims must be a positive"),
    ],
)
def test_bad_options_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call(PPCA("wrong", orthogonal=False), data())
