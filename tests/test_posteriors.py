"""Posterior flows (vaelab.posteriors): log-determinants against autograd Jacobians in
float64, the density against a change-of-variables reference, the invertibility
constraint (planar), the autoregressive masks (IAF), and every estimator on a flow
posterior against pPCA's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ppca import PPCA, D, L
from vaelab import config, estimators, metrics, objectives
from vaelab import train as trainer
from vaelab.checkpoint import load_checkpoint, save_checkpoint
from vaelab.errors import ConfigError
from vaelab.models import build_from_config
from vaelab.posteriors import FLOWS, FlowPosterior, IAFFlow, PlanarFlow, build_flow

#: One row per registered flow: its options and the number of parameters per example for a
#: latent space of L = 3 (the IAF's: its context h alone; its MADE weights are its own).
FLOW_EXAMPLES = {
    "none": ({}, 0),
    "planar": ({"length": 4}, 4 * (2 * 3 + 1)),
    "iaf": ({"length": 2, "hidden": (8,), "context": 5}, 5),
}


def test_every_flow_has_an_example():
    assert sorted(FLOW_EXAMPLES) == FLOWS.names()
    for name, (options, params) in FLOW_EXAMPLES.items():
        assert build_flow(name, 3, **options).num_params(3) == params


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
    """pPCA whose encoder is a flow with fixed random parameters (planar: per-example maps;
    iaf: random MADE weights and contexts): any proposal gives unbiased weights, so every
    estimator must reach the closed form."""

    def __init__(self, kind: str = "planar") -> None:
        super().__init__(width=1.3, shift=0.1)
        self.kind = kind
        # the IAF near its initialisation (little noise on the weights): a fair proposal
        self.flow = (PlanarFlow(2) if kind == "planar"
                     else _iaf(L, 2, (8,), 3, seed=7, spread=0.1))

    def encode(self, x):
        base = super().encode(x)
        g = torch.Generator().manual_seed(7)
        if self.kind == "iaf":
            params = torch.randn(x.shape[0], 3, generator=g, dtype=x.dtype)
        else:
            # per map: u, w, b; a unit-scale w keeps the constrained u_hat small (a tiny w
            # would make u_hat = u + (m(w^T u) - w^T u) w / |w|^2 large: a poor proposal)
            maps = [torch.cat([0.1 * torch.randn(x.shape[0], L, generator=g, dtype=x.dtype),
                               torch.randn(x.shape[0], L, generator=g, dtype=x.dtype),
                               0.5 * torch.randn(x.shape[0], 1, generator=g, dtype=x.dtype)],
                              -1)
                    for _ in range(2)]
            params = torch.cat(maps, -1)
        return FlowPosterior(base.base_dist.loc, base.base_dist.scale, self.flow, params)


@pytest.mark.parametrize("kind", ["planar", "iaf"])
@pytest.mark.parametrize("name, options", [("is", {"samples": 4000}),
                                           ("ais", {"steps": 40, "chains": 32,
                                                    "leapfrog_steps": 5})])
def test_every_estimator_reaches_the_closed_form_with_a_flow_posterior(name, options, kind):
    torch.set_num_threads(1)
    model = FlowPPCA(kind)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = estimators.get(name, **options)
    result = metrics.nll_metrics(model, x, estimator=est, batch_size=8, seed=0)
    truth = -float(model.log_px(x).mean())
    assert abs(result["nll"] - truth) < 3 * result["nll_mc_stderr"] + 1e-3
    assert result["nll_mc_stderr"] < 0.05  # the check has power


@pytest.mark.parametrize("kind", ["planar", "iaf"])
def test_the_elbo_of_a_flow_is_below_log_px_and_the_iwae_bound_between(kind):
    model = FlowPPCA(kind)
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


# --------------------------------------------------------------------------- IAF


def _iaf(latent, length, hidden, context, seed=0, spread=0.5):
    """A float64 IAF whose weights are torch's initialisation plus N(0, spread^2) noise, so
    that sigma = sigmoid(s + 2) ranges well away from its initial ~0.88 and m is not small:
    the checks below are not made at a near-identity map."""
    torch.manual_seed(seed)
    flow = IAFFlow(length, hidden, context, latent_dim=latent).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(spread * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.requires_grad_(False)  # fixed maps: the checks differentiate in z only


def _context(batch, context, seed=2):
    return torch.randn(batch, context, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


#: |log_det - log|det J_autograd|| allowed in float64 (the largest measured: 3.6e-15 here,
#: 7.1e-15 at torch's initialisation with L = 32, 8 steps, MADEs of 320, 320).
IAF_LOG_DET_TOLERANCE = 1e-12


@pytest.mark.parametrize("latent, length, hidden", [(1, 1, (4,)), (2, 3, (8, 8)),
                                                    (5, 4, (16,)), (7, 2, (12, 12))])
def test_iaf_log_det_equals_the_autograd_jacobian(latent, length, hidden):
    flow, h = _iaf(latent, length, hidden, 3), _context(4, 3)
    z = torch.randn(2, 4, latent, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    _, log_det = flow(z, h)
    assert log_det.shape == (2, 4)
    for s in range(2):
        for b in range(4):
            jac = torch.autograd.functional.jacobian(
                lambda v, b=b: flow(v.view(1, 1, latent), h[b:b + 1])[0].view(latent), z[s, b])
            sign, logabs = torch.linalg.slogdet(jac)
            assert sign > 0  # invertible and orientation-preserving
            assert abs(float(log_det[s, b]) - float(logabs)) <= IAF_LOG_DET_TOLERANCE


def test_each_iaf_step_is_autoregressive_in_its_order_reversed_between_steps():
    """Per step, output i depends only on the inputs before i in that step's order (its
    Jacobian is triangular with diagonal sigma, exactly: the masked weights are zero), the
    orders alternate (natural, reversed, natural), the masks allow every such dependence,
    every output depends on the context h, and across two steps every output depends on
    every input."""
    latent, length = 5, 3
    flow, h = _iaf(latent, length, (10, 10), 3), _context(1, 3)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    natural = torch.arange(latent)
    for t, order in enumerate(flow.orders()):
        assert torch.equal(order, natural if t % 2 == 0 else natural.flip(0))
        before = order[None, :] < order[:, None]  # [i, j]: j comes before i
        jac = torch.autograd.functional.jacobian(
            lambda v, t=t: flow.step(t, v.view(1, 1, latent), h)[0].view(latent), z)
        off = jac - torch.diag(jac.diagonal())
        assert (off[~before] == 0).all() and (off[before] != 0).all()
        m, s = flow.steps[t](z.view(1, 1, latent), h)
        torch.testing.assert_close(jac.diagonal(), torch.sigmoid(s.view(-1) + 2.0),
                                   rtol=0, atol=1e-14)
        # the masks' connectivity: a path from input j to output i iff j comes before i
        reach = torch.eye(latent, dtype=torch.float64)
        for mask in flow.steps[t].masks():
            reach = mask.double() @ reach
        reach = reach[:latent]  # the m outputs (the s outputs have the same mask)
        assert torch.equal(reach > 0, before)
        jac_h = torch.autograd.functional.jacobian(
            lambda c, t=t: torch.cat(flow.steps[t](z.view(1, 1, latent), c.view(1, 3)), -1)
            .view(-1), h[0])
        assert (jac_h.abs().sum(-1) > 0).all()  # m_i and s_i of every i, the first too
    full = torch.autograd.functional.jacobian(
        lambda v: flow(v.view(1, 1, latent), h)[0].view(latent), z)
    assert (full != 0).all()


def _iaf_inverse(flow, y, h):
    """f^{-1}(y) of an IAF, step by step from the last: a step's output i depends on its
    input i (through sigma_i, m_i of the inputs before it), so L fixed-point sweeps
    z <- (y - (1 - sigma(z)) m(z)) / sigma(z) make it exact, one more dimension per sweep."""
    for t in reversed(range(flow.length)):
        z = y.clone()
        for _ in range(flow.latent_dim):
            m, s = flow.steps[t](z, h)
            gate = torch.sigmoid(s + 2.0)
            z = (y - (1 - gate) * m) / gate
        y = z
    return y


def test_the_iaf_density_is_the_change_of_variables_and_integrates_to_one():
    """log q(z|x) at the flow's own samples equals log N(f^{-1}(z)) + log|det J_{f^{-1}}(z)|,
    with the inverse found by fixed-point sweeps and its Jacobian by autograd (float64); the
    density over a 2-D grid (through that inverse) integrates to 1."""
    latent = 2
    flow, h = _iaf(latent, 2, (8, 8), 3, seed=3), _context(1, 3)
    loc = torch.tensor([[0.4, -0.3]], dtype=torch.float64)
    scale = torch.tensor([[0.8, 0.6]], dtype=torch.float64)
    q = FlowPosterior(loc, scale, flow, h)
    base = Normal(loc[0], scale[0])
    eps = torch.randn(32, 1, latent, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64)
    z, log_q = q.push(eps)
    for s in range(32):
        z0 = _iaf_inverse(flow, z[s:s + 1], h).view(latent)
        torch.testing.assert_close(z0, (loc + scale * eps[s]).view(latent), rtol=0, atol=1e-12)
        jac = torch.autograd.functional.jacobian(
            lambda v: _iaf_inverse(flow, v.view(1, 1, latent), h).view(latent), z[s, 0])
        ref = base.log_prob(z0).sum() + torch.linalg.slogdet(jac)[1]
        assert float(log_q[s, 0]) == pytest.approx(float(ref), abs=1e-12)
    grid = torch.linspace(-7, 7, 561, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid).view(-1, 1, latent)
    with torch.no_grad():
        z0 = _iaf_inverse(flow, points, h)
        _, log_det = flow(z0, h)
        density = (base.log_prob(z0).sum(-1) - log_det).exp().view(561, 561)
    mass = torch.trapezoid(torch.trapezoid(density, grid), grid)
    assert float(mass) == pytest.approx(1.0, abs=1e-8)  # -7e-10 measured
    with pytest.raises(ConfigError, match="exact at its own samples.*sequential MADE passes"):
        q.log_prob(z)


def _iaf_config(*more):
    return config.resolve(overrides=["posterior.flow=iaf", "posterior.iaf.length=2",
                                     "posterior.iaf.hidden=8,8", "posterior.iaf.context=4",
                                     "model.hidden=16", "model.latent_dim=2", *more])


def test_an_iaf_model_from_the_config():
    cfg = _iaf_config()
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 4, 4))
    assert model.encoder[-1].out_features == 2 * 2 + 4  # loc, raw scale, the context h
    own = [k for k in model.state_dict() if k.startswith("flow.")]
    assert len(own) == 2 * 7  # per step: 2 masked layers (w, b), context w, output (w, b)
    x = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    assert isinstance(model.encode(x), FlowPosterior)
    terms = objectives.elbo_terms(model, x, generator=torch.Generator().manual_seed(0))
    terms.elbo.sum().backward()  # both the MADE weights and the encoder's h get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.flow.parameters())
    assert model.encoder[-1].weight.grad[4:].abs().sum() > 0
    assert math.isfinite(float(objectives.log_likelihood(
        model, x, num_samples=30, generator=torch.Generator().manual_seed(0)).mean))
    with pytest.raises(ConfigError, match="the VampPrior is a mixture of q"):
        build_from_config(_iaf_config("prior.name=vampprior"), (1, 4, 4))
    with pytest.raises(ConfigError) as err:
        config.resolve(overrides=["posterior.flow=iaf", "posterior.iaf.length=0"])
    assert str(err.value) == "posterior.iaf.length must be positive, got 0: give a value > 0"
    with pytest.raises(ConfigError, match=r"posterior.iaf.hidden needs at least one hidden "
                                          r"layer, got \[\]: give layer sizes > 0"):
        build_flow("iaf", 2, hidden=[])


def test_an_iaf_model_round_trips_through_a_checkpoint(tmp_path):
    """The MADE weights are model parameters: saved with the model and restored into a model
    built from the same config (but another seed), which then gives the same q(z|x)."""
    cfg = _iaf_config()
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 4, 4))
    save_checkpoint(tmp_path / "last", model=model, meta={})
    torch.manual_seed(1)
    other = build_from_config(cfg, (1, 4, 4))
    assert not torch.equal(other.flow.steps[0].out.weight, model.flow.steps[0].out.weight)
    load_checkpoint(tmp_path / "last", model=other)
    state, loaded = model.state_dict(), other.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    x = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    eps = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(model.encode(x).push(eps), other.encode(x).push(eps)):
            assert torch.equal(a, b)


def test_a_tiny_iaf_model_trains():
    """vaelab's optimizer holds the MADE weights, and 30 steps of its train_step on one
    batch of random pixels raise the ELBO by more than 0.5 nats (from 11.9 nats to about
    11.05; 16 ln 2 = 11.09 is what a model of independent fair pixels gets); a bf16
    autocast step keeps the objective float32."""
    cfg = _iaf_config("train.lr=0.003")
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 4, 4)).train()
    optimizer = trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in model.flow.parameters())
    objective = objectives.build_objective(model, cfg.objective)
    x = (torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def elbo():
        with torch.no_grad():
            return float(objectives.elbo_terms(model, x, num_samples=16, generator=torch.
                                               Generator().manual_seed(9)).elbo.mean())

    before, flow_before = elbo(), model.flow.steps[1].out.weight.detach().clone()
    for step in range(30):
        per_example, _ = trainer.train_step(objective, optimizer, x, kl_weight=1.0,
                                            generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(per_example).all()
    after = elbo()
    assert after > before + 0.5, (before, after)
    assert not torch.equal(model.flow.steps[1].out.weight, flow_before)
    per_example, terms = trainer.train_step(
        objective, optimizer, x, kl_weight=1.0, generator=torch.Generator().manual_seed(0),
        autocast=trainer.autocast_dtype("bf16", torch.device("cpu")))
    assert per_example.dtype == terms.elbo.dtype == torch.float32
