"""Priors: log_prob against float64 reference math and torch.distributions, the VampPrior's
construction, an example per registry entry, training, checkpoints and resume with each."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from conftest import tiny_overrides, train
from vaelab import config, likelihoods, objectives
from vaelab.models import build_model
from vaelab.priors import PRIORS, GaussianMixture, VampPrior, build_prior


def reference_mixture_log_prob(logits, loc, scale, z):
    """float64, elementwise: log sum_k pi_k prod_j N(z_j; loc_kj, scale_kj)."""
    logits, loc, scale, z = (t.double() for t in (logits, loc, scale, z))
    log_pi = logits - torch.logsumexp(logits, 0)
    diff = (z.unsqueeze(-2) - loc) / scale  # (..., K, L)
    log_comp = (-0.5 * diff**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(log_comp + log_pi, -1)


def _mixture(k=7, latent=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen, dtype=dtype)
    loc = 3 * torch.randn(k, latent, generator=gen, dtype=dtype)
    scale = torch.exp(torch.randn(k, latent, generator=gen, dtype=dtype) - 1)
    return logits, loc, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_mixture_matches_float64_reference_and_torch(dtype):
    logits, loc, scale = _mixture(dtype=dtype)
    z = 3 * torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = GaussianMixture(logits, loc, scale).log_prob(z)
    assert got.shape == (4, 6) and got.dtype == dtype
    want = reference_mixture_log_prob(logits, loc, scale, z)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch_mix = MixtureSameFamily(Categorical(logits=logits.double()),
                                  Independent(Normal(loc.double(), scale.double()), 1))
    torch.testing.assert_close(got.double(), torch_mix.log_prob(z.double()), rtol=tol, atol=tol)


def test_gaussian_mixture_keeps_precision_near_a_sharp_component():
    # z within 1e-3 of a component mean of 30 with scale 0.05: the naive float32 expansion
    # z^2/s^2 - 2 z m/s^2 + m^2/s^2 cancels 3.6e5-sized terms; the float64 path does not
    loc = torch.full((1, 3), 30.0)
    scale = torch.full((1, 3), 0.05)
    z = loc + 1e-3
    got = GaussianMixture(torch.zeros(1), loc, scale).log_prob(z)
    want = reference_mixture_log_prob(torch.zeros(1), loc, scale, z)
    assert abs(float(got) - float(want)) < 1e-5


def test_gaussian_mixture_samples_have_the_mixture_moments():
    logits, loc, scale = _mixture(k=3, latent=2)
    mix = GaussianMixture(logits, loc, scale)
    torch.manual_seed(0)
    draws = mix.sample((40000,)).double()
    weights = torch.softmax(logits.double(), 0)
    mean = (weights[:, None] * loc.double()).sum(0)
    second = (weights[:, None] * (scale.double() ** 2 + loc.double() ** 2)).sum(0)
    se = (second - mean**2).sqrt() / math.sqrt(len(draws))
    assert ((draws.mean(0) - mean).abs() < 4 * se).all()
    torch.testing.assert_close(mix.mean.double(), mean, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the registry


def _model(prior, components=None):
    torch.manual_seed(0)
    return build_model("mlp", (1, 4, 4), 3, likelihoods.get("bernoulli"), hidden=(8,),
                       prior=prior,
                       prior_options={"components": components} if components else None
                       ).double()


def _normal_example(model):
    dist = model.prior("cpu", torch.float64)
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = Independent(Normal(torch.zeros(3, dtype=torch.float64),
                              torch.ones(3, dtype=torch.float64)), 1).log_prob(z)
    torch.testing.assert_close(dist.log_prob(z), want, rtol=1e-12, atol=1e-12)
    assert dist.base_dist.standard is True  # the short closed-form KL


def _vampprior_example(model):
    prior = model.prior_module
    assert isinstance(prior, VampPrior) and prior.pseudo_inputs.shape == (4, 1, 4, 4)
    u = prior.pseudo_inputs.clamp(0, 1)  # hardtanh(0, 1)
    out = model.encoder(u)
    loc, raw = out.chunk(2, -1)
    scale = torch.nn.functional.softplus(raw) + 1e-6
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = reference_mixture_log_prob(torch.zeros(4, dtype=torch.float64), loc, scale, z)
    torch.testing.assert_close(model.prior().log_prob(z), want, rtol=1e-10, atol=1e-10)


def _mog_example(model):
    prior = model.prior_module
    scale = torch.nn.functional.softplus(prior.raw_scale) + 1e-4
    torch.testing.assert_close(scale, torch.ones_like(scale), rtol=1e-6, atol=1e-6)
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = reference_mixture_log_prob(prior.logits, prior.loc, scale, z)
    torch.testing.assert_close(model.prior().log_prob(z), want, rtol=1e-10, atol=1e-10)


PRIOR_EXAMPLES = {"normal": (None, _normal_example), "vampprior": (4, _vampprior_example),
                  "mog": (5, _mog_example)}


def test_every_prior_has_an_example():
    assert sorted(PRIOR_EXAMPLES) == PRIORS.names()


@pytest.mark.parametrize("name", sorted(PRIOR_EXAMPLES))
def test_prior_log_prob(name):
    components, check = PRIOR_EXAMPLES[name]
    check(_model(name, components))


@pytest.mark.parametrize("name", sorted(PRIOR_EXAMPLES))
def test_every_prior_works_with_every_objective(name):
    components = PRIOR_EXAMPLES[name][0]
    model = _model(name, components)
    x = (torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5).double()
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    terms = objectives.elbo_terms(model, x, num_samples=3, generator=gen())
    assert (terms.kl_per_dim is None) == (name != "normal")
    # the MC KL of a mixture prior is log q - log p at the same draws
    if name != "normal":
        q = model.encode(x)
        z = objectives._sample(q, 3, gen())
        want = (q.log_prob(z) - model.prior().log_prob(z)).mean(0)
        torch.testing.assert_close(terms.kl, want, rtol=1e-10, atol=1e-10)
    bound = objectives.iwae_bound(model, x, 4, generator=gen())
    loss = objectives.training_loss(terms)
    grads = torch.autograd.grad(loss + bound.sum(), list(model.parameters()), allow_unused=True)
    prior_params = dict(model.prior_module.named_parameters())
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    if prior_params:  # the prior's own parameters learn from the objective
        index = [i for i, (n, _) in enumerate(model.named_parameters())
                 if n.startswith("prior_module.")]
        assert all(grads[i] is not None and grads[i].abs().sum() > 0 for i in index)
    ll = objectives.log_likelihood(model, x, num_samples=50, generator=gen())
    assert torch.isfinite(ll.per_example).all()


def test_vampprior_initialisation_follows_the_paper():
    torch.manual_seed(0)
    prior = build_prior("vampprior", 40, (1, 28, 28))
    u = prior.pseudo_inputs.detach()
    assert u.shape == (500, 1, 28, 28)
    assert float(u.mean()) == pytest.approx(0.05, abs=1e-3)
    assert float(u.std()) == pytest.approx(0.01, rel=0.02)


@pytest.mark.parametrize("name, options, message", [
    ("normal", {"components": 3}, r"unknown config key prior.normal.components: valid keys in "
                                  r"\[prior.normal\] are none \(it takes no options\)"),
    ("vampprior", {"components": 0}, "prior.vampprior.components must be positive, got 0"),
    ("mog", {"components": "many"}, "prior.mog.components = 'many' is not a valid int"),
    ("flat", {}, "unknown prior 'flat': choose one of mog, normal, vampprior"),
])
def test_bad_prior_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_prior(name, 3, (1, 4, 4), **options)


@pytest.mark.usefixtures("fashion_available")
def test_vampprior_trains_reports_and_resumes_bitwise(tmp_path):
    """Training, the report (no per-dimension KL), the figures and a bitwise resume."""
    from safetensors.torch import load_file

    from vaelab import checkpoint

    settings = {"prior.name": "vampprior", "prior.components": 6,
                "objective.warmup_epochs": 2, "train.optimizer": "rmsprop"}
    full = config.resolve(overrides=tiny_overrides(**settings, **{"train.epochs": 2}))
    half = config.resolve(overrides=tiny_overrides(**settings, **{"train.epochs": 1}))
    summary = train(full, tmp_path / "straight")
    report = summary["report"]
    assert report["kl_per_dim"] is None and report["nll"] < report["nelbo"] + 1
    assert (tmp_path / "straight" / "figures" / "manifold.png").is_file()
    train(half, tmp_path / "split", report=False)
    train(full, tmp_path / "split", resume=True, report=False)

    def weights(run):
        meta = checkpoint.read_meta(run / "checkpoints" / "last")
        return load_file(run / "checkpoints" / meta["tensor_file"])

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert "model.prior_module.pseudo_inputs" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
