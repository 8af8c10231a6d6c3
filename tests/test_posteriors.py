"""Posterior flows (vaelab.posteriors): log-determinants against autograd Jacobians in
float64, the density against a change-of-variables reference, the invertibility
constraint, and every estimator on a flow posterior against pPCA's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ppca import PPCA, D, L
from vaelab import config, estimators, metrics, objectives
from vaelab.errors import ConfigError
from vaelab.models import build_from_config
from vaelab.posteriors import FLOWS, FlowPosterior, PlanarFlow, build_flow

#: One row per registered flow: its options and the number of parameters per example for a
#: latent space of L = 3.
FLOW_EXAMPLES = {
    "none": ({}, 0),
    "planar": ({"length": 4}, 4 * (2 * 3 + 1)),
}


def test_every_flow_has_an_example():
    assert sorted(FLOW_EXAMPLES) == FLOWS.names()
    for name, (options, params) in FLOW_EXAMPLES.items():
        assert build_flow(name, **options).num_params(3) == params


def _params(batch, latent, length, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, length * (2 * latent + 1), generator=g,
                               dtype=torch.float64)


@pytest.mark.parametrize("latent, length", [(1, 1), (2, 3), (5, 10)])
def test_planar_log_det_equals_the_autograd_jacobian(latent, length):
    flow = PlanarFlow(length)
    params = _params(4, latent, length)
    z = torch.randn(1, 4, latent, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    _, log_det = flow(z, params)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: flow(v.view(1, 1, latent), params[b:b + 1])[0].view(latent), z[0, b])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0  # invertible and orientation-preserving
        assert float(log_det[0, b]) == pytest.approx(float(logabs), abs=1e-12)


def test_planar_maps_are_invertible_even_for_adversarial_parameters():
    """w^T u_hat > -1 (Rezende & Mohamed, appendix A.1) whatever u and w are: with
    u = -10 w the raw map would fold; the constrained one stays strictly increasing, with a
    finite log-determinant (at least log 1e-6: the margin kept in floating point)."""
    length = 1  # one map on a 1-D latent
    w, b = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)
    params = torch.cat([-10 * w, w, b], -1)
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64).view(-1, 1, 1)
    out, log_det = PlanarFlow(length)(z, params)
    assert (out.diff(dim=0) > 0).all() and (log_det >= math.log(1e-6) - 1e-6).all()


def _density_1d(flow, params, loc, scale, points):
    """q(z) of a 1-D flow by inverting the monotone map with bisection (float64)."""
    lo = torch.full_like(points, -60.0)
    hi = torch.full_like(points, 60.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = flow(mid.view(-1, 1, 1), params)[0].view(-1) > points
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    z0 = (lo + hi) / 2
    _, log_det = flow(z0.view(-1, 1, 1), params)
    base = Normal(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    return base.log_prob(z0) - log_det.view(-1)


def test_the_density_is_the_change_of_variables_and_integrates_to_one():
    flow = PlanarFlow(3)
    params = _params(1, 1, 3, seed=4)
    loc = torch.tensor([[0.4]], dtype=torch.float64)
    scale = torch.tensor([[0.8]], dtype=torch.float64)
    q = FlowPosterior(loc, scale, flow, params)
    eps = torch.randn(64, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z, log_q = q.push(eps)
    ref = _density_1d(flow, params, 0.4, 0.8, z.view(-1))
    torch.testing.assert_close(log_q.view(-1), ref, rtol=0, atol=1e-10)
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    mass = torch.trapezoid(_density_1d(flow, params, 0.4, 0.8, grid).exp(), grid)
    assert float(mass) == pytest.approx(1.0, abs=1e-8)
    with pytest.raises(ConfigError, match="exact at its own samples"):
        q.log_prob(z)


class FlowPPCA(PPCA):
    """pPCA whose encoder is a planar flow with fixed random parameters: any proposal gives
    unbiased weights, so every estimator must reach the closed form."""

    def __init__(self) -> None:
        super().__init__(width=1.3, shift=0.1)
        self.flow = PlanarFlow(2)

    def encode(self, x):
        base = super().encode(x)
        # per map: u, w, b; a unit-scale w keeps the constrained u_hat small (a tiny w would
        # make u_hat = u + (m(w^T u) - w^T u) w / |w|^2 large: a poor proposal)
        g = torch.Generator().manual_seed(7)
        maps = [torch.cat([0.1 * torch.randn(x.shape[0], L, generator=g, dtype=x.dtype),
                           torch.randn(x.shape[0], L, generator=g, dtype=x.dtype),
                           0.5 * torch.randn(x.shape[0], 1, generator=g, dtype=x.dtype)], -1)
                for _ in range(2)]
        return FlowPosterior(base.base_dist.loc, base.base_dist.scale, self.flow,
                             torch.cat(maps, -1))


@pytest.mark.parametrize("name, options", [("is", {"samples": 4000}),
                                           ("ais", {"steps": 40, "chains": 32,
                                                    "leapfrog_steps": 5})])
def test_every_estimator_reaches_the_closed_form_with_a_flow_posterior(name, options):
    torch.set_num_threads(1)
    model = FlowPPCA()
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = estimators.get(name, **options)
    result = metrics.nll_metrics(model, x, estimator=est, batch_size=8, seed=0)
    truth = -float(model.log_px(x).mean())
    assert abs(result["nll"] - truth) < 3 * result["nll_mc_stderr"] + 1e-3
    assert result["nll_mc_stderr"] < 0.05  # the check has power


def test_the_elbo_of_a_flow_is_below_log_px_and_the_iwae_bound_between():
    model = FlowPPCA()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    terms = objectives.elbo_terms(model, x, num_samples=2000,
                                  generator=torch.Generator().manual_seed(0))
    assert terms.kl_per_dim is None  # a flow has no per-dimension KL
    log_px = model.log_px(x)
    assert (terms.elbo < log_px).all()
    iwae = objectives.iwae_bound(model, x, 100, generator=torch.Generator().manual_seed(1))
    assert (iwae.mean() > terms.elbo.mean()) and (iwae.mean() < log_px.mean() + 0.05)


def test_a_planar_flow_model_from_the_config():
    cfg = config.resolve(overrides=["posterior.flow=planar", "posterior.planar.length=3",
                                    "model.hidden=16", "model.latent_dim=2"])
    model = build_from_config(cfg, (1, 4, 4))
    assert model.encoder[-1].out_features == 2 * 2 + 3 * (2 * 2 + 1)
    x = (torch.rand(3, 1, 4, 4) > 0.5).float()
    assert isinstance(model.encode(x), FlowPosterior)
    terms = objectives.elbo_terms(model, x, generator=torch.Generator().manual_seed(0))
    terms.elbo.sum().backward()  # the flow's parameters come from the encoder: it trains
    assert model.encoder[-1].weight.grad[4:].abs().sum() > 0
    with pytest.raises(ConfigError, match="the VampPrior is a mixture of q"):
        build_from_config(config.resolve(overrides=[
            "posterior.flow=planar", "prior.name=vampprior", "model.hidden=16"]), (1, 4, 4))
    with pytest.raises(ConfigError, match="posterior.planar.length must be positive"):
        config.resolve(overrides=["posterior.flow=planar", "posterior.planar.length=0"])
    assert math.isfinite(float(objectives.log_likelihood(
        model, x, num_samples=30, generator=torch.Generator().manual_seed(0)).mean))
