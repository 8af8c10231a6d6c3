"""AIS, BDMC and the weight diagnostics checked on probabilistic PCA, where log p(x) is exact.

pPCA (Tipping & Bishop 1999): z ~ N(0, I_L), x | z ~ N(W z + mu, sigma^2 I_D), so
p(x) = N(mu, W W^T + sigma^2 I) and the posterior is N(M^-1 W^T (x - mu), sigma^2 M^-1),
M = W^T W + sigma^2 I. With orthogonal columns of W (scaled 2, 1, 0.5) the posterior is a
diagonal Gaussian with standard deviations 0.24, 0.45 and 0.71, so encoders that are
exact, too wide, too narrow or shifted are easy to build. Everything is float64; every
Monte-Carlo check states its seed and compares with the estimator's own standard error.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from ppca import PPCA, D
from vaelab import likelihoods, rng
from vaelab.errors import ConfigError
from vaelab.estimators import (
    SCHEDULES,
    AISEstimate,
    ais,
    bdmc,
    linear_schedule,
    sigmoid_schedule,
)
from vaelab.models import build_model
from vaelab.objectives import _draw, _log_weights, log_likelihood, mean_and_stderr
from vaelab.psis import effective_sample_size, pareto_k


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor ops: a second intra-op thread only adds synchronisation
    (4.5x slower on a loaded 2-core machine), so these tests run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=gen(seed), dtype=torch.float64)


def importance_log_weights(model, x, num: int, seed: int) -> torch.Tensor:
    """``(num, B)`` log-weights of importance sampling with q, by objectives' draw rule."""
    q = model.encode(x)
    z, eps = _draw(q, num, gen(seed))
    return _log_weights(model, x, q, model.prior("cpu"), z, eps)


# --------------------------------------------------------------------------- AIS


def test_ais_matches_the_closed_form_within_its_standard_error():
    # encoder 1.5x too wide and shifted by 0.2 (0.8 posterior sd in dim 1); seed 0
    model, x = PPCA(width=1.5, shift=0.2), data(10)
    est = ais(model, x, steps=50, chains=16, generator=gen(0), leapfrog_steps=5)
    err = est.per_example - model.log_px(x)
    assert (err.abs() < 3 * est.mc_stderr).all()
    assert abs(est.mean - float(model.log_px(x).mean())) < 3 * est.mc_stderr_of_mean
    assert (est.mc_stderr < 0.2).all()  # the check has power
    # 16 annealed chains beat 16 importance samples by a factor > 2 in standard error
    is16 = log_likelihood(model, x, num_samples=16, generator=gen(0))
    assert est.mc_stderr_of_mean < is16.mc_stderr_of_mean / 2
    assert isinstance(est, AISEstimate) and est.per_example.dtype == torch.float64
    assert est.num_samples == est.chains == 16 and est.steps == 50
    assert est.mean == pytest.approx(float(est.per_example.mean()), abs=1e-12)
    assert est.stderr == pytest.approx(mean_and_stderr(est.per_example)[1], rel=1e-12)
    assert ((est.acceptance > 0.4) & (est.acceptance < 0.95)).all()  # adapted towards 0.65


def test_ais_weights_are_unbiased_with_pilot_adapted_step_sizes():
    # E[w] = p(x) exactly: with 1000 chains the log of the mean weight has a small
    # Monte-Carlo error, so a bias from the step-size adaptation would show (seed 0)
    model, x = PPCA(width=1.5, shift=0.2), data(5)
    est = ais(model, x, steps=5, chains=1000, generator=gen(0), leapfrog_steps=5)
    err = est.per_example - model.log_px(x)
    assert (err.abs() < 3 * est.mc_stderr).all()
    assert (est.mc_stderr < 0.03).all()
    assert (est.pareto_k < 0.5).all()  # the weights have a finite variance: the SE holds


def test_ais_from_the_exact_posterior_is_exact():
    # log p(x, z) - log q*(z|x) = log p(x) for every z: every weight is exact
    model, x = PPCA(), data(4)
    for steps in [1, 7]:
        est = ais(model, x, steps=steps, chains=30, generator=gen(2), leapfrog_steps=2)
        torch.testing.assert_close(est.per_example, model.log_px(x), rtol=0, atol=1e-10)
        assert (est.pareto_k == -math.inf).all()  # constant weights
        torch.testing.assert_close(est.ess, torch.full((4,), 30.0, dtype=torch.float64))
    sim = bdmc(model, 4, steps=5, chains=3, generator=gen(3), leapfrog_steps=2)
    torch.testing.assert_close(sim.lower, model.log_px(sim.x), rtol=0, atol=1e-10)
    torch.testing.assert_close(sim.upper, model.log_px(sim.x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 7, 20])
def test_one_step_is_importance_sampling_with_the_same_draws(chunk_size):
    model, x = PPCA(width=1.5, shift=0.2), data(5)
    est = ais(model, x, steps=1, chains=20, generator=gen(4), chunk_size=chunk_size)
    ref = log_likelihood(model, x, num_samples=20, generator=gen(4))
    torch.testing.assert_close(est.per_example, ref.per_example, rtol=0, atol=1e-10)
    torch.testing.assert_close(est.mc_stderr, ref.mc_stderr, rtol=0, atol=1e-10)
    assert torch.isnan(est.acceptance).all()  # no transitions


def test_ais_is_reproducible_and_chunking_keeps_it_correct():
    model, x = PPCA(width=1.5, shift=0.2), data(4)
    a = ais(model, x, steps=10, chains=6, generator=gen(5), leapfrog_steps=2)
    b = ais(model, x, steps=10, chains=6, generator=gen(5), leapfrog_steps=2)
    c = ais(model, x, steps=10, chains=6, generator=gen(6), leapfrog_steps=2)
    assert torch.equal(a.per_example, b.per_example)
    assert not torch.allclose(a.per_example, c.per_example)
    # chunks of 2 chains (a pilot each): other draws, the same answer within the errors
    d = ais(model, x, steps=10, chains=6, generator=gen(5), leapfrog_steps=2, chunk_size=2)
    se = torch.hypot(a.mc_stderr, d.mc_stderr)
    assert ((a.per_example - d.per_example).abs() < 4 * se).all()
    assert not torch.equal(a.per_example, d.per_example)


def test_ais_runs_on_a_vaelab_vae_under_no_grad():
    # float32 MLP VAE with a Bernoulli likelihood; binary data simulated by bdmc
    torch.manual_seed(0)
    vae = build_model("mlp", (12,), 2, likelihoods.get("bernoulli"), hidden=(16,)).eval()
    sim = bdmc(vae, 5, steps=4, chains=3, generator=gen(7), leapfrog_steps=2)
    assert sim.x.shape == (5, 12) and set(sim.x.unique().tolist()) <= {0.0, 1.0}
    assert sim.z.dtype == torch.float32 and sim.lower.dtype == torch.float64
    with torch.no_grad():
        est = ais(vae, sim.x, steps=4, chains=3, generator=gen(8), leapfrog_steps=2)
    assert torch.isfinite(est.per_example).all() and (est.per_example < 0).all()
    assert all(p.grad is None for p in vae.parameters())  # gradients in z only
    again = bdmc(vae, 5, steps=4, chains=3, generator=gen(7), leapfrog_steps=2)
    assert torch.equal(sim.x, again.x) and torch.equal(sim.gap, again.gap)


# --------------------------------------------------------------------------- BDMC


def test_bdmc_brackets_log_px_and_the_gap_closes_as_steps_grow():
    # start at the prior (a poor proposal), 50 simulated examples, 8 chains, seed 5: the
    # same generator simulates the same data for every number of steps
    model, runs = PPCA(width=1.5, shift=0.2), {}
    for steps in [2, 10, 50]:
        runs[steps] = bdmc(model, 50, steps=steps, chains=8, generator=gen(5),
                           leapfrog_steps=3, start="prior")
        sim = runs[steps]
        truth = model.log_px(sim.x)
        low, low_se = mean_and_stderr(sim.lower - truth)
        up, up_se = mean_and_stderr(sim.upper - truth)
        assert low < 3 * low_se and up > -3 * up_se  # bounds in expectation
        assert sim.gap_mean == pytest.approx(sim.upper_mean - sim.lower_mean, abs=1e-12)
    sim, truth = runs[2], model.log_px(runs[2].x)
    assert sim.lower_mean < float(truth.mean()) < sim.upper_mean  # a wide, clear bracket
    assert torch.equal(runs[2].x, runs[50].x)
    for few, many in [(2, 10), (10, 50)]:
        shrink, se = mean_and_stderr(runs[few].gap - runs[many].gap)  # paired by example
        assert shrink > 3 * se
    assert runs[50].gap_mean < 0.3


# --------------------------------------------------------------------------- k-hat, ESS


def test_khat_and_ess_tell_a_wide_encoder_from_a_too_narrow_one():
    # K = 2000 importance samples, 5 examples, seed 9. Tail shape of the weights: bounded
    # (k < 0) for q wider than the posterior; k = 1 - width^2 = 0.94 for width 1/4
    x, num = data(5), 2000
    wide = importance_log_weights(PPCA(width=1.2), x, num, seed=9)
    narrow = importance_log_weights(PPCA(width=0.25), x, num, seed=9)
    assert (pareto_k(wide) < 0.5).all()
    assert (pareto_k(narrow) > 0.7).all()
    assert (effective_sample_size(wide) / num > 0.8).all()
    assert (effective_sample_size(narrow) / num < 0.1).all()
    # and the narrow encoder's estimate is biased low, as k-hat warns
    biased = torch.logsumexp(narrow, 0) - math.log(num) - PPCA().log_px(x)
    assert (biased < 0).all()


# --------------------------------------------------------------------------- options


def test_schedules_run_from_zero_to_one():
    for steps in [1, 2, 50]:
        for betas in [sigmoid_schedule(steps), linear_schedule(steps)]:
            assert betas.shape == (steps + 1,) and betas[0] == 0 and betas[-1] == 1
            assert (betas.diff() > 0).all()
    mid = sigmoid_schedule(100)
    assert mid.diff()[0] < mid.diff()[50] / 5  # small steps at the ends
    assert SCHEDULES.names() == ["linear", "sigmoid"]


def test_bad_options_are_refused_with_the_rule():
    model, x = PPCA(), data(2)
    cases = [
        (dict(steps=0, chains=2), "steps must be a positive integer"),
        (dict(steps=2, chains=0), "chains must be a positive integer"),
        (dict(steps=2, chains=2, leapfrog_steps=0), "leapfrog_steps must be"),
        (dict(steps=2, chains=2, chunk_size=0), "chunk_size must be"),
        (dict(steps=2, chains=2, start="posterior"), "unknown AIS start 'posterior'"),
        (dict(steps=2, chains=2, schedule="cosine"),
         "unknown annealing schedule 'cosine': choose one of linear, sigmoid"),
        (dict(steps=2, chains=2, target_acceptance=1.0), r"target_acceptance must be in"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            ais(model, x, **kwargs)
    with pytest.raises(ConfigError, match="num_examples must be a positive integer"):
        bdmc(model, 0, steps=2, chains=2)
    with torch.inference_mode(), pytest.raises(ConfigError, match="not torch.inference_mode"):
        ais(model, x, steps=2, chains=2)


# --------------------------------------------------------------------------- the registry

class LinearGaussian(PPCA):
    """pPCA with a latent space of ``latent`` dimensions (1 or 2: quadrature's domain)."""

    def __init__(self, latent: int, width: float = 1.5, shift: float = 0.2) -> None:
        super().__init__(width=width, shift=shift)
        self.w = self.w[:, :latent].clone()
        self.latent_dim = latent
        self.offset = self.offset[:latent]

    def posterior(self, x):
        latent = self.latent_dim
        m = self.w.T @ self.w + 0.25 * torch.eye(latent, dtype=torch.float64)  # SIGMA = 0.5
        mean = torch.linalg.solve(m, self.w.T @ (x - self.mu).T).T
        return mean, 0.25 * torch.linalg.inv(m)

    def prior(self, device):
        zeros = torch.zeros(self.latent_dim, dtype=torch.float64, device=device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_px(self, x):
        cov = self.w @ self.w.T + 0.25 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.mu, covariance_matrix=cov).log_prob(x)


#: One row per registered estimator: its options, and the model it is checked on: pPCA with
#: an encoder 1.5x too wide and shifted by 0.2 (seed 0; the latent space quadrature takes
#: for quadrature). Through vaelab.metrics.nll_metrics (the path of every report), the split
#: mean must land within 3 of its stated standard errors of the closed form and every
#: example within 1 nat, with per-example errors below 0.2 nats (so the check has power).
ESTIMATOR_EXAMPLES = {
    "is": ({"samples": 2000}, lambda: PPCA(width=1.5, shift=0.2)),
    "ais": ({"steps": 50, "chains": 16, "leapfrog_steps": 5}, lambda: PPCA(width=1.5, shift=0.2)),
    "quadrature": ({}, lambda: LinearGaussian(2)),
    "is-refined": ({"samples": 500, "refine_steps": 20, "refine_lr": 0.05},
                   lambda: PPCA(width=1.5, shift=0.2)),
    "is-ais": ({"samples": 500, "check_examples": 6, "check_steps": 200, "check_chains": 8},
               lambda: PPCA(width=1.5, shift=0.2)),
    "auto": ({"samples": 500, "check_examples": 6, "check_steps": 200, "check_chains": 8},
             lambda: PPCA(width=1.5, shift=0.2)),
}


def test_every_estimator_has_an_example():
    from vaelab.estimators import ESTIMATORS

    assert sorted(ESTIMATOR_EXAMPLES) == ESTIMATORS.names()


@pytest.mark.parametrize("name", sorted(ESTIMATOR_EXAMPLES))
def test_every_estimator_matches_the_closed_form(name):
    from vaelab import estimators, metrics

    options, make = ESTIMATOR_EXAMPLES[name]
    model, x = make(), data(12)
    est = estimators.get(name, **options)
    result = metrics.nll_metrics(model, x, estimator=est, batch_size=6, seed=0,
                                 per_example=True)
    truth = -model.log_px(x)
    err = result["per_example_nll"] - truth
    one = (est.for_model(model) if hasattr(est, "for_model") else est).estimate(
        model, x[:6], gen(0))
    assert one.log_likelihood.shape == one.mc_stderr.shape == (6,)
    assert (one.mc_stderr < 0.2).all()  # the check has power
    assert abs(result["nll"] - float(truth.mean())) < 3 * result["nll_mc_stderr"] + 1e-3
    assert err.abs().max() < 1.0
    assert result["estimator"]["name"] == name and result["estimator"]["description"]
    assert est.cost >= est.samples >= 1


@pytest.mark.parametrize("latent", [1, 2])
def test_quadrature_is_exact_on_the_linear_gaussian_model(latent):
    """log p(x) of pPCA is closed form: quadrature must give it to 1e-8 nats (a smooth
    integrand), from an encoder that is far off (the locating grid finds the mass, not q)."""
    from vaelab import estimators

    model = LinearGaussian(latent, width=4.0, shift=2.5)
    x = data(5)
    result = estimators.get("quadrature", tolerance=1e-9).estimate(model, x, None)
    torch.testing.assert_close(result.log_likelihood, model.log_px(x), rtol=0, atol=1e-8)
    assert (result.mc_stderr < 1e-9).all() and result.extras["unconverged"] == 0
    assert torch.isnan(result.pareto_k).all()
    with pytest.raises(ConfigError, match="it takes at most 2"):
        estimators.get("quadrature").estimate(PPCA(), x, None)


def test_the_two_phase_estimate_corrects_a_biased_importance_sampler():
    """pPCA with an encoder 3x too narrow: importance sampling is biased high in NLL with a
    standard error that hides it; AIS on a subsample measures the bias, and the corrected
    mean lands on the closed form within the stated uncertainty."""
    from vaelab import estimators, metrics

    model, x = PPCA(width=0.3), data(40, seed=3)
    truth = -float(model.log_px(x).mean())
    plain = metrics.nll_metrics(model, x, estimator="is", samples=200, batch_size=10, seed=0)
    assert plain["nll"] - truth > 5 * plain["nll_mc_stderr"]  # the bias the issue measured
    est = estimators.get("is-ais", samples=200, check_examples=20, max_check_examples=20,
                         check_steps=800, check_chains=8, refine_steps=0)  # q as proposal
    fixed = metrics.nll_metrics(model, x, estimator=est, batch_size=10, seed=0)
    c = fixed["estimator"]["correction"]
    assert c["examples"] == 20 and c["mean"] > 0
    assert abs(fixed["nll"] - truth) < 3 * fixed["nll_mc_stderr"]
    assert abs(fixed["nll"] - truth) < abs(plain["nll"] - truth) / 3
    # AIS with half the steps: a drift that is small and stated with its standard error
    assert c["drift"]["steps"] == 400 and abs(c["drift"]["mean"]) < 0.05
    assert 0 < c["drift"]["stderr"] < 0.05
    # phase 1's values of the checked examples are the ones it reported for them
    per = metrics.nll_metrics(model, x, estimator=est, batch_size=10, seed=0, per_example=True)
    order = torch.randperm(40, generator=rng.seeded_generator(0, rng.Purpose.EVAL_CHECK))[:20]
    assert c["is_nll"] == pytest.approx(float(per["per_example_nll"][order].mean()), abs=1e-9)
    assert per["nll"] == fixed["nll"]  # and the whole is a function of the seed
    # the default proposal (q refined by 20 Adam steps, x1.2, 10% from q) leaves little to
    # correct: the same check finds a bias 10x smaller, and the estimate is as right
    refined = metrics.nll_metrics(model, x, estimator=estimators.get(
        "is-ais", samples=200, check_examples=20, max_check_examples=20, check_steps=800,
        check_chains=8), batch_size=10, seed=0)
    r = refined["estimator"]["correction"]
    assert abs(r["mean"]) < c["mean"] / 10 and r["stderr"] < c["stderr"]
    assert abs(refined["nll"] - truth) < 3 * refined["nll_mc_stderr"]
    assert "refined by 20 Adam steps" in refined["estimator"]["description"]


def test_the_correction_extrapolates_ais_in_one_over_t():
    """AIS's bias falls as 1/T: from T/2 and T steps, a* = 2 a^T - a^{T/2}; the correction is
    phase 1 minus a*, or minus a^T with extrapolate = false."""
    from vaelab import estimators

    is_nll = torch.tensor([10.0, 12.0, 11.0])
    ais, half = torch.tensor([9.0, 10.5, 10.0]), torch.tensor([9.2, 10.6, 10.3])
    on = estimators.get("is-ais").correction(is_nll, ais, half)
    assert on["extrapolated"] and on["reference_nll"] == pytest.approx((8.8 + 10.4 + 9.7) / 3)
    assert on["mean"] == pytest.approx(11.0 - (8.8 + 10.4 + 9.7) / 3)
    assert on["drift"]["mean"] == pytest.approx(0.2)
    off = estimators.get("is-ais", extrapolate=False).correction(is_nll, ais, half)
    assert off["mean"] == pytest.approx(11.0 - (9.0 + 10.5 + 10.0) / 3)
    assert off["reference_nll"] == off["ais_nll"] and not off["extrapolated"]


def test_the_check_goes_on_while_its_standard_error_is_above_the_target():
    """The first check_examples of the random order are checked, then a batch more at a time
    while the correction's standard error is above check_stderr, up to max_check_examples:
    the next examples of the same order, each group with its own draws."""
    from vaelab import estimators, metrics

    model, x = PPCA(width=0.3), data(40, seed=3)

    def check(**options):
        est = estimators.get("is-ais", samples=50, check_examples=10, max_check_examples=35,
                             check_steps=20, check_chains=2, **options)
        result = metrics.nll_metrics(model, x, estimator=est, batch_size=10, seed=0,
                                     per_example=True)
        return result, result["estimator"]["correction"]

    _, met = check(check_stderr=100.0)
    assert met["examples"] == 10 and met["max_examples"] == 35
    per, going = check(check_stderr=1e-6)  # never met: every candidate is checked
    assert going["examples"] == 35 and going["target_stderr"] == 1e-6
    order = torch.randperm(40, generator=rng.seeded_generator(0, rng.Purpose.EVAL_CHECK))
    assert going["is_nll"] == pytest.approx(float(per["per_example_nll"][order[:35]].mean()),
                                            abs=1e-9)
    assert "up to 35 until its standard error is 1e-06 nats" in per["estimator"]["description"]


def _verdict(**estimator):
    from vaelab import evaluate

    report = {"nll": 90.0, "latent_dim": 2, "estimator": estimator,
              "pareto_k": {"fraction_above": 0.2, "threshold": 0.7, "warn": True}}
    return evaluate.verdict(report)


def test_every_report_gets_a_verdict_that_says_how_vaelab_knows():
    from vaelab import evaluate

    exact = _verdict(name="quadrature", tolerance=1e-6, largest_change=3e-8, unconverged=0)
    assert exact["status"] == "exact" and "2-D latent space" in exact["text"]
    assert _verdict(name="quadrature", tolerance=1e-6, largest_change=0.1,
                    unconverged=3)["status"] == "not verified"

    def corrected(stderr, drift):
        return _verdict(name="auto", samples=1000, correction={
            "examples": 200, "mean": 0.3, "stderr": stderr,
            "ais": {"steps": 1000, "chains": 4, "leapfrog_steps": 1},
            "drift": {"steps": 500, "mean": drift, "stderr": 0.01}})

    ok = corrected(0.02, 0.01)
    assert ok["status"] == "converged"
    assert "corrected by -0.300 ± 0.020 nats" in ok["text"] and "200 random" in ok["text"]
    assert "max_check_examples" in corrected(0.2, 0.01)["text"]
    assert "budget_gflop" not in corrected(0.2, 0.01)["text"]
    assert corrected(0.2, 0.01)["status"] == "uncertain"
    costly = _verdict(name="auto", samples=40, scaled_for={"budget_gflop": 4.5}, correction={
        "examples": 413, "mean": 0.2, "stderr": 0.066,
        "ais": {"steps": 250, "chains": 4, "leapfrog_steps": 1},
        "drift": {"steps": 125, "mean": 0.08, "stderr": 0.04}})
    assert costly["status"] == "uncertain"
    assert "eval.auto.budget_gflop and max_check_examples" in costly["text"]
    assert "raise eval.auto.check_steps" in corrected(0.02, 0.3)["text"]
    def extrapolated(drift):
        return _verdict(name="auto", samples=1000, correction={
            "examples": 400, "mean": 0.3, "stderr": 0.02, "extrapolated": True,
            "ais": {"steps": 1000, "chains": 4, "leapfrog_steps": 1},
            "drift": {"steps": 500, "mean": drift, "stderr": 0.01}})

    # AIS's own bias extrapolated away: a drift of 0.1 is removed, one of 0.3 is too large
    assert corrected(0.02, 0.1)["status"] == "uncertain"
    assert extrapolated(0.1)["status"] == "converged"
    assert "extrapolated in 1/T from 500 and 1000 steps" in extrapolated(0.1)["text"]
    assert "raise eval.auto.check_steps" in extrapolated(0.3)["text"]
    plain = _verdict(name="is", samples=1000)
    assert plain["status"] == "unreliable" and "20.0%" in plain["text"]
    assert evaluate.verdict({"nll": None})["status"] == "no nll"


def test_auto_scales_its_samples_down_for_a_costly_decoder():
    """``auto`` budgets decoder FLOPs per example: an MLP decoder keeps K = 750 with the
    refined proposal (20 x 4) and the 400-example check; a conv decoder 13x as costly gets
    the refinement with one draw per step and K = 40, the check with 250 AIS steps on as
    many examples as the rest of the budget buys, says so in its description and keeps what
    the user asked below these; a decoder too costly even for that gets q itself."""
    from vaelab import estimators
    from vaelab.estimators import two_phase

    family = likelihoods.get("bernoulli")
    mlp = build_model("mlp", (1, 28, 28), 16, family, hidden=[512, 256])
    # the counted FLOPs are the decoder's matmuls: 2 * (16*256 + 256*512 + 512*784)
    assert estimators.decoder_flops(mlp) == 2 * (16 * 256 + 256 * 512 + 512 * 784)
    kept = estimators.get("auto").for_model(mlp)
    assert (kept.samples, kept.check_examples, kept.scaled_for) == (750, 400, None)
    assert kept.options.refine_steps == 20 and kept.first.name == "is-refined"
    assert kept.first.options.refine_samples == 4 and kept.options.check_steps == 1000

    conv = build_model("conv", (1, 28, 28), 16, family, channels=[32, 64])
    flops = estimators.decoder_flops(conv)
    assert flops > 10 * 2 * (16 * 256 + 256 * 512 + 512 * 784)
    scaled = estimators.get("auto").for_model(conv)
    assert scaled.first.name == "is-refined" and scaled.samples == two_phase.COSTLY_SAMPLES
    assert (scaled.options.refine_steps, scaled.first.options.refine_samples) == (20, 1)
    assert scaled.options.check_steps == two_phase.COSTLY_CHECK_STEPS
    # the check gets what phase 1 leaves of the budget: (passes - 100) per example
    passes = 7e9 / flops
    per_check = scaled.check.cost + scaled.check_half.cost
    affordable = round((passes - scaled.first.cost) * 10_000 / per_check)
    assert scaled.check_examples == min(400, max(50, affordable))
    assert scaled.max_check_examples == min(800, max(50, affordable))
    assert flops * scaled.cost_for(10_000) <= 7e9 * 1.01
    text = scaled.describe()
    assert "scaled down from K=750 with q refined by 20 x 4 steps and 400 examples checked " \
           "with 1000 steps" in text and "budget_gflop" in text
    small = estimators.get("auto", samples=10, check_examples=0).for_model(conv)
    assert (small.samples, small.check_examples) == (10, 0)
    generous = estimators.get("auto", budget_gflop=1e6).for_model(conv)
    assert (generous.samples, generous.check_examples, generous.scaled_for) == (750, 400, None)
    # a budget that cannot pay for the refinement in half of it: q, K scaled, the floors
    tight = estimators.get("auto", budget_gflop=0.5).for_model(conv)
    assert tight.first.name == "is" and tight.options.refine_steps == 0
    assert (tight.samples, tight.check_examples) == (100, 50)


# --------------------------------------------------------------------------- refined proposal


def test_a_refined_proposal_converges_to_the_exact_posterior_on_ppca():
    """pPCA with an encoder 3x too narrow and shifted by 0.5: importance sampling with q is
    biased high in NLL; 300 Adam steps (learning rate 0.01, 16 draws) on each example's ELBO
    move the Gaussian to the exact posterior (diagonal here; Adam's constant step leaves it
    jittering by about 0.1 posterior sd), and importance sampling with K = 200 from it is then
    within 0.02 nats on every example (seeds 0, 1)."""
    from vaelab import estimators
    from vaelab.estimators.refined import refine

    model, x = PPCA(width=0.3, shift=0.5), data(8, seed=3)
    q = model.encode(x)
    loc, log_scale = refine(model, x, q.base_dist.loc, q.base_dist.scale.log(), steps=300,
                            samples=16, lr=0.01, generator=gen(0))
    mean, cov = model.posterior(x)  # posterior sd 0.24, 0.45, 0.71; q starts 0.5 away
    torch.testing.assert_close(loc, mean, rtol=0, atol=0.08)
    torch.testing.assert_close(log_scale.exp(), cov.diagonal().sqrt().expand_as(mean),
                               rtol=0.1, atol=0)
    truth = model.log_px(x)
    plain = estimators.get("is", samples=200).estimate(model, x, gen(1))
    assert (plain.log_likelihood - truth).mean() < -0.5  # the bias the refinement removes
    est = estimators.get("is-refined", samples=200, refine_steps=300, refine_samples=16,
                         refine_lr=0.01, widen=1.0, defensive=0.0)
    got = est.estimate(model, x, gen(1))
    assert got.log_likelihood.shape == got.mc_stderr.shape == got.pareto_k.shape == (8,)
    err = got.log_likelihood - truth
    assert (err.abs() < 0.02).all() and (err.abs() < 4 * got.mc_stderr).all()
    assert (got.mc_stderr < 0.02).all() and (got.pareto_k < 0.5).all()


def test_without_refinement_it_is_importance_sampling_with_q_and_the_same_draws():
    from vaelab import estimators

    model, x = PPCA(width=1.5, shift=0.2), data(5)
    plain = estimators.get("is", samples=300).estimate(model, x, gen(4))
    same = estimators.get("is-refined", samples=300, refine_steps=0, widen=1.0,
                          defensive=0.0).estimate(model, x, gen(4))
    torch.testing.assert_close(same.log_likelihood, plain.log_likelihood, rtol=0, atol=1e-10)
    torch.testing.assert_close(same.pareto_k, plain.pareto_k, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", [{"widen": 1.0, "defensive": 0.0}, {},
                                     {"proposal": "student-t", "df": 5},
                                     {"widen": 1.5, "defensive": 0.3, "proposal": "student-t",
                                      "df": 3}])
def test_widened_student_t_and_defensive_proposals_are_unbiased(options):
    """Every variant (the defaults: x1.2 and 10% from q) is importance sampling with a fixed
    proposal: with an encoder 3x too narrow and 30 refinement steps (not converged), the
    estimate lands on the closed form within 4 of its standard errors, per example and on
    the mean (seed 2)."""
    from vaelab import estimators

    model, x = PPCA(width=0.3, shift=0.3), data(10, seed=5)
    est = estimators.get("is-refined", samples=2000, refine_steps=30, **options)
    got = est.estimate(model, x, gen(2))
    err = got.log_likelihood - model.log_px(x)
    assert (err.abs() < 4 * got.mc_stderr + 1e-3).all()
    assert (got.mc_stderr < 0.1).all() and (got.pareto_k < 0.7).all()
    assert abs(float(err.mean())) < 4 * float(got.mc_stderr.square().mean().sqrt()) / math.sqrt(10)


def test_refined_sampling_is_deterministic_and_leaves_the_model_alone():
    """On a float32 VAE under no_grad: the same seed gives the same values, another seed
    other ones; the model's parameters are unchanged and get no .grad."""
    from vaelab import estimators

    torch.manual_seed(0)
    vae = build_model("mlp", (12,), 3, likelihoods.get("bernoulli"), hidden=(16,)).eval()
    x = (torch.rand(6, 12, generator=gen(9)) < 0.5).float()
    before = [p.detach().clone() for p in vae.parameters()]
    est = estimators.get("is-refined", samples=100, refine_steps=5, defensive=0.1)
    with torch.no_grad():
        a = est.estimate(vae, x, gen(3))
        b = est.estimate(vae, x, gen(3))
        c = est.estimate(vae, x, gen(4))
    assert a.log_likelihood.shape == (6,) and a.log_likelihood.dtype == torch.float64
    assert torch.equal(a.log_likelihood, b.log_likelihood)
    assert not torch.equal(a.log_likelihood, c.log_likelihood)
    assert torch.isfinite(a.log_likelihood).all() and (a.log_likelihood < 0).all()
    assert all(p.grad is None for p in vae.parameters())
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), before))
    with pytest.raises(ConfigError, match="defensive"):
        estimators.get("is-refined", defensive=1.0)
    with pytest.raises(ConfigError, match="proposal"):
        estimators.get("is-refined", proposal="cauchy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refined_sampling_runs_on_cuda():
    from vaelab import estimators, rng

    torch.manual_seed(0)
    vae = build_model("mlp", (12,), 3, likelihoods.get("bernoulli"), hidden=(16,)).cuda().eval()
    x = (torch.rand(6, 12, generator=gen(9)) < 0.5).float().cuda()
    est = estimators.get("is-refined", samples=100, refine_steps=5, defensive=0.1,
                         proposal="student-t")
    g = rng.seeded_generator(0, 0, rng.Purpose.EVAL_IW, device=x.device)
    got = est.estimate(vae, x, g)
    assert got.log_likelihood.device.type == "cuda" and got.log_likelihood.shape == (6,)
    assert torch.isfinite(got.log_likelihood).all()


def test_the_default_keeps_q_for_a_flow_posterior_and_says_so():
    """A flow's q(z|x) is no diagonal Gaussian to refine: the two-phase estimate's phase 1 is
    then importance sampling with q itself at the refined proposal's cost (K = 990), still on
    the closed form, and the report says how many examples it covered."""
    from test_posteriors import FlowPPCA
    from vaelab import estimators, metrics

    model = FlowPPCA()
    x = torch.randn(8, D, generator=gen(3), dtype=torch.float64)
    est = estimators.get("is-ais", check_examples=4, check_steps=20, check_chains=4)
    result = metrics.nll_metrics(model, x, estimator=est, batch_size=8, seed=0)
    assert result["estimator"]["unrefined_examples"] == 8
    assert "K = 990" in result["estimator"]["unrefined_why"]
    assert abs(result["nll"] + float(model.log_px(x).mean())) < 3 * result["nll_mc_stderr"] + 1e-3
    with pytest.raises(ConfigError, match="diagonal Gaussian"):
        estimators.get("is-refined").estimate(model, x, gen(0))
