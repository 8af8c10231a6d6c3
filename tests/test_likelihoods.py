"""Numbers for vaelab.likelihoods: float64 / mpmath / scipy references, torch.distributions,
normalisation, extremes, validation messages and properties over shapes."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special
from torch import distributions as td

from likelihood_examples import (
    CASES,
    CHANNEL_COUPLED,
    EVENT_SHAPES,
    EXAMPLES,
    IDS,
    arr,
    make,
    ref_gaussian,
    ref_laplace,
    ref_logistic_log_mass,
    ref_mixture,
    reference,
)
from vaelab import likelihoods as L
from vaelab.errors import ConfigError, DataError
from vaelab.likelihoods.continuous_bernoulli import _CB_SERIES as CB_SERIES


def test_every_registered_family_has_an_example():
    assert sorted(L.LIKELIHOODS) == sorted(EXAMPLES)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_log_prob_matches_float64_reference(name, i):
    fam, params, x = make(name, i, dtype=torch.float64)
    got = fam(params).log_prob(x)
    assert got.shape == (3,) and got.dtype == torch.float64
    np.testing.assert_allclose(arr(got), reference(name, i, fam, params, x), rtol=1e-12)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_float32_log_prob_within_1e5_of_float64(name, i):
    fam, params, x = make(name, i, dtype=torch.float32)
    px = fam(params)
    ref_elem = EXAMPLES[name][i].reference(fam, params.double().numpy(), x.double().numpy())
    np.testing.assert_allclose(arr(px.elementwise_log_prob(x)), ref_elem,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arr(px.log_prob(x)), reference(name, i, fam, params, x),
                               rtol=1e-5, atol=1e-5 * x[0].numel())


@pytest.mark.parametrize("name,i", [c for c in CASES if EXAMPLES[c[0]][c[1]].torch_dist],
                         ids=[f"{n}-{i}" for n, i in CASES if EXAMPLES[n][i].torch_dist])
def test_log_prob_matches_torch_distributions(name, i):
    fam, params, x = make(name, i, dtype=torch.float64)
    ref = EXAMPLES[name][i].torch_dist(fam, params).log_prob(x if x.is_floating_point()
                                                             else x.long())
    torch.testing.assert_close(fam(params).log_prob(x), ref.flatten(1).sum(1),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_extreme_parameters_give_finite_values_and_gradients(name, i):
    fam, _, x = make(name, i, batch=4, dtype=torch.float32)
    p = fam.params_per_channel
    g = torch.Generator().manual_seed(1)
    values = torch.tensor([1e4, -1e4, 100.0, -100.0, 0.0, 1e-4])
    idx = torch.randint(0, len(values), (4, p * 2, 3, 3), generator=g)
    params = values[idx].requires_grad_()
    lp = fam(params).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all()
    assert all(torch.isfinite(q.grad).all() for q in fam.parameters())


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_fixed_scales_from_1e6_to_1e6_are_finite_and_exact(name, scale):
    fam = L.get(name, scale=scale)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    params = torch.tensor([[0.5, -1e4, 1e4, 0.0, 1.0]]).repeat(2, 1).requires_grad_()
    lp = fam(params).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all()
    ref = (ref_gaussian if name == "gaussian" else ref_laplace)(
        fam, params.detach().double().numpy(), x.double().numpy()).sum(1)
    np.testing.assert_allclose(lp.detach().double().numpy(), ref, rtol=1e-6)


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), batch=st.integers(1, 4),
       event=st.sampled_from(EVENT_SHAPES), seed=st.integers(0, 2**31 - 1))
def test_properties_over_shapes_and_values(case, batch, event, seed):
    name, i = case
    fam, params, x = make(name, i, batch=batch, event=event, seed=seed)
    lp = fam(params).log_prob(x)
    # exact against float64 reference math
    np.testing.assert_allclose(arr(lp), reference(name, i, fam, params, x), rtol=1e-12)
    # per-example values do not depend on the rest of the batch (or its order)
    singles = torch.cat([fam(params[b : b + 1]).log_prob(x[b : b + 1]) for b in range(batch)])
    torch.testing.assert_close(lp, singles, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(fam(params[perm]).log_prob(x[perm]), lp[perm],
                               rtol=1e-12, atol=1e-12)
    # the flat layout (B, D) with params (B, P*D) gives the same numbers; channel-coupled
    # families keep the channel dim and flatten the rest, (B, C, H*W)
    p, c = fam.params_per_channel, event[0]
    if name in CHANNEL_COUPLED:
        flat_params, flat_x = params.reshape(batch, p * c, -1), x.reshape(batch, c, -1)
    else:
        flat_params, flat_x = params.unflatten(1, (p, c)).flatten(2).flatten(1), x.flatten(1)
    torch.testing.assert_close(fam(flat_params).log_prob(flat_x), lp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
def test_mean_and_samples(name, i):
    """``mean`` against its definition; sample averages within 4 standard errors of it."""
    fam, params, x = make(name, i, batch=1, event=(2,), seed=3)
    px = fam(params)
    mean = px.mean
    assert mean.shape == x.shape
    if name in CHANNEL_COUPLED:  # mean is a plug-in value (tested below); samples: exact mean
        mean = exact_mixture_mean(fam, params)
    elif fam.data_kind == "uint8":  # sum_k k/255 p(k) over all 256 values
        k = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 2)
        probs = fam(params.expand(256, -1)).elementwise_log_prob(k).exp()
        torch.testing.assert_close(mean[0], (probs * k / 255).sum(0), rtol=1e-9, atol=1e-12)
    elif name == "bernoulli":
        torch.testing.assert_close(mean, torch.sigmoid(params))
    elif name in ("gaussian", "laplace"):
        torch.testing.assert_close(mean, params[:, :2])
    n = 20000
    draws = fam(params.expand(n, -1)).sample(torch.Generator().manual_seed(7))
    assert draws.dtype == (torch.uint8 if fam.data_kind == "uint8" else torch.float64)
    if name not in ("gaussian", "laplace"):
        fam.validate(draws)  # samples are in the support
    draws = draws.double() / (255 if fam.data_kind == "uint8" else 1)
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - mean[0]).abs() <= 4 * se + 1e-12).all()


# --------------------------------------------------------------------------- continuous Bernoulli

CB_LOGITS = [0.0, 1e-8, -1e-8, 1e-4, -1e-4, 1e-3, -1e-3, 0.01, -0.01, 0.0999, 0.1, 1.0, -1.0,
             10.0, -10.0, 100.0, -100.0, 1e4, -1e4]


def mp_log_c(lg: float) -> mpmath.mpf:
    lg = mpmath.mpf(lg)
    return mpmath.log(2) if lg == 0 else mpmath.log(lg / mpmath.tanh(lg / 2))


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 4e-16), (torch.float32, 2.4e-7)])
def test_cb_log_normalizer_against_mpmath(dtype, rtol):
    mpmath.mp.dps = 50
    lg = torch.tensor(CB_LOGITS, dtype=dtype, requires_grad=True)
    got = L.continuous_bernoulli_log_normalizer(lg)
    got.sum().backward()
    ref = [float(mp_log_c(v)) for v in lg.detach().tolist()]
    np.testing.assert_allclose(got.detach().double().numpy(), ref, rtol=rtol)
    # d/dl log C(l) = 1/l - 1/sinh(l), 0 at l = 0
    dref = [0.0 if v == 0 else float(1 / mpmath.mpf(v) - 1 / mpmath.sinh(mpmath.mpf(v)))
            for v in lg.detach().tolist()]
    # float32: the gradient is O(1e-2) near |l| = 0.1 and exact to ~1e-7 absolute
    np.testing.assert_allclose(lg.grad.double().numpy(), dref, rtol=1e-6 if dtype == torch.float32
                               else 1e-12, atol=2e-7 if dtype == torch.float32 else 1e-15)


def test_cb_taylor_coefficients_against_mpmath():
    mpmath.mp.dps = 40
    coef = mpmath.taylor(mp_log_c, 0, 10)[::2]
    np.testing.assert_allclose([float(c) for c in coef], CB_SERIES, rtol=1e-15)
    assert CB_SERIES[2] == -7 / 1440  # not -1/360


@pytest.mark.parametrize("lg", [-100.0, -10.0, -1.0, -1e-3, 0.0, 1e-4, 0.05, 1.0, 10.0, 100.0])
def test_cb_density_integrates_to_one_and_mean_matches(lg):
    fam = L.get("continuous-bernoulli").double()
    px = fam(torch.tensor([[lg]], dtype=torch.float64))

    def density(x: float) -> float:
        return math.exp(px.log_prob(torch.tensor([[x]], dtype=torch.float64)).item())

    points = [1e-3, 1e-2, 0.1, 0.9, 0.99, 0.999]
    total, _ = integrate.quad(density, 0, 1, points=points, epsabs=1e-13, epsrel=1e-12)
    first, _ = integrate.quad(lambda x: x * density(x), 0, 1, points=points, epsabs=1e-13,
                              epsrel=1e-12)
    assert abs(total - 1) < 1e-10
    assert abs(first - px.mean.item()) < 1e-10


def test_cb_matches_torch_over_its_well_conditioned_range():
    lg = torch.cat([torch.linspace(-20, -0.05, 60), torch.linspace(0.05, 20, 60)]).double()
    x = torch.rand(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fam = L.get("continuous-bernoulli")
    ref = td.ContinuousBernoulli(logits=lg).log_prob(x)
    torch.testing.assert_close(fam(lg[:, None]).log_prob(x[:, None]), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fam(lg[:, None]).mean[:, 0], td.ContinuousBernoulli(logits=lg).mean,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lg", [-30.0, -5.0, -0.5, 0.0, 5e-5, 2.0, 30.0])
def test_cb_samples_follow_the_cdf(lg):
    """Empirical CDF at 0.1, 0.5, 0.9 within 4 standard errors of expm1(l x) / expm1(l)."""
    n = 20000
    fam = L.get("continuous-bernoulli").double()
    draws = fam(torch.full((n, 1), lg, dtype=torch.float64)).sample(
        torch.Generator().manual_seed(11))
    for q in (0.1, 0.5, 0.9):
        cdf = q if lg == 0 else float(mpmath.expm1(lg * q) / mpmath.expm1(lg))
        emp = (draws <= q).double().mean().item()
        assert abs(emp - cdf) <= 4 * math.sqrt(max(cdf * (1 - cdf), 1e-12) / n) + 1e-12


def test_cb_output_bias_inverts_the_mean_then_clips():
    fam = L.get("continuous-bernoulli")
    m = torch.tensor([0.2, 0.35, 0.5, 0.7, 0.85, 0.01, 0.999], dtype=torch.float64)
    bias = fam.output_bias(m)
    torch.testing.assert_close(L.continuous_bernoulli_mean(bias[:5]), m[:5], rtol=0, atol=1e-12)
    bound = math.log(999)
    torch.testing.assert_close(bias[5:], torch.tensor([-bound, bound], dtype=torch.float64))


# --------------------------------------------------------------------------- 8-bit families


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_discretized_logistic_sums_to_one(dtype, tol):
    fam = L.get("discretized-logistic")
    locs = [-1e4, -1.5, -1.0, -0.99, -0.3, 0.0, 0.5, 1.0, 1.5, 1e4]
    log_scales = [-1e4, -7.0, -5.0, -2.0, 0.0, 3.0, 7.0, 1e4]
    grid = torch.tensor([[a, b] for a in locs for b in log_scales], dtype=dtype)  # (N, 2)
    k = torch.arange(256)[:, None, None].expand(256, len(grid), 1)
    params = grid.expand(256, -1, -1)
    lp = fam(params.reshape(-1, 2)).log_prob(k.reshape(-1, 1)).reshape(256, -1)
    assert torch.isfinite(lp).all()
    assert torch.logsumexp(lp.double(), 0).abs().max().item() < tol


def mp_logistic_bin(k: int, loc: float, log_s: float) -> float:
    mpmath.mp.dps = 60
    s = mpmath.exp(mpmath.mpf(log_s))
    y = mpmath.mpf(2 * k) / 255 - 1
    a, b = (y + mpmath.mpf(1) / 255 - loc) / s, (y - mpmath.mpf(1) / 255 - loc) / s
    # sigma(a) - sigma(b) = (e^a - e^b) / ((1 + e^a)(1 + e^b)): no cancellation when a - b > 1
    return float(mpmath.log((mpmath.exp(a) - mpmath.exp(b))
                            / ((1 + mpmath.exp(a)) * (1 + mpmath.exp(b)))))


def test_discretized_logistic_far_tail_bins_against_mpmath():
    """Where float64 sigmoid differences round to 0 (PixelCNN++ falls back to the pdf),
    the exact formula still matches mpmath."""
    fam = L.get("discretized-logistic").double()
    cases = [(200, -1.0, -5.0), (10, 1.0, -5.0), (128, -0.9, -6.0), (254, -1.0, -7.0),
             (1, 0.99, -7.0), (100, 0.0, 5.0), (129, 0.0, -7.0)]
    params = torch.tensor([[loc, ls] for _, loc, ls in cases], dtype=torch.float64)
    x = torch.tensor([[k] for k, _, _ in cases])
    got = fam(params).log_prob(x)
    ref = [mp_logistic_bin(*c) for c in cases]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    assert got[0] < -30  # the float64 difference sigma(a) - sigma(b) would be 0 here


def test_categorical_output_bias_matches_the_mean_with_a_uniform_floor():
    fam = L.get("categorical-256")
    m = torch.tensor([[0.0, 0.01, 0.05, 0.3], [0.5, 0.8, 0.95, 1.0]], dtype=torch.float64)
    bias = fam.output_bias(m)  # (256*2, 4)
    assert bias.shape == (512, 4)
    px = fam(bias[None])
    torch.testing.assert_close(px.mean[0, :, 1:3], m[:, 1:3], rtol=0, atol=1e-9)
    logp = bias.unflatten(0, (256, 2)).log_softmax(0)
    assert logp.min() >= math.log(0.01 / 256) - 1e-12
    assert torch.logsumexp(logp, 0).abs().max() < 1e-12


def test_discretized_logistic_output_bias():
    fam = L.get("discretized-logistic")
    m = torch.tensor([[0.0, 0.1, 0.5, 0.9]], dtype=torch.float64)
    bias = fam.output_bias(m)
    torch.testing.assert_close(bias[0], 2 * m[0] - 1)
    s = bias[1].exp()
    torch.testing.assert_close(s[1:] ** 2 * math.pi**2 / 3, 4 * m[0, 1:] * (1 - m[0, 1:]))
    assert s[0].item() == pytest.approx(1 / 255)


# --------------------------------------------------------------------------- logistic mixture

DLM = "discretized-logistic-mixture"


def mixture_params(k: int, c: int, seed: int = 0, batch: int = 1, rest=(),
                   loc=(-1.2, 1.2), log_s=(-5.0, 1.0), coef: float = 1.5) -> torch.Tensor:
    """Float64 params (batch, 4*k*c, *rest): logit slots, locations, log-scales, raw coefs."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, k, c, *rest)
    u = [torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    groups = [2 * torch.randn(shape, generator=g, dtype=torch.float64),
              loc[0] + (loc[1] - loc[0]) * u[0], log_s[0] + (log_s[1] - log_s[0]) * u[1],
              coef * torch.randn(shape, generator=g, dtype=torch.float64)]
    return torch.stack(groups, 1).flatten(1, 3)


def grid(c: int) -> torch.Tensor:
    """All 256**c values of one pixel with c channels, (256**c, c) int64."""
    axes = torch.meshgrid(*[torch.arange(256)] * c, indexing="ij")
    return torch.stack([a.flatten() for a in axes], 1)


def exact_mixture_mean(fam, params: torch.Tensor) -> torch.Tensor:
    """E[x] / 255 of one pixel (params (1, 4KC), C <= 2) by summing the float64 reference
    joint over all 256**C values."""
    c = params.shape[1] // fam.params_per_channel
    xs = grid(c)
    log_p = ref_mixture(fam, params.double().expand(len(xs), -1).numpy(), xs.numpy()).sum(1)
    return torch.as_tensor(np.exp(log_p) @ xs.numpy() / 255)[None]


def pixelcnnpp_log_prob(x: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Salimans et al. (2017)'s ``discretized_mix_logistic_loss`` (pixel_cnn_pp/nn.py), with
    TensorFlow translated to numpy: x (B, H, W, 3) on [-1, 1], out (B, H, W, 10 K) the
    network output (``l`` there).
    Returns (log p per image, whether its mid-bin fallback for cdf_delta <= 1e-5 was used)."""
    xs = x.shape
    nr_mix = out.shape[-1] // 10
    logit_probs = out[..., :nr_mix]
    out = out[..., nr_mix:].reshape(*xs, nr_mix * 3)
    means = out[..., :nr_mix]
    log_scales = np.maximum(out[..., nr_mix:2 * nr_mix], -7.0)
    coeffs = np.tanh(out[..., 2 * nr_mix:3 * nr_mix])
    x = x[..., None] + np.zeros(xs + (nr_mix,))
    m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
    m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
    means = np.stack([means[..., 0, :], m2, m3], axis=3)
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = special.expit(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = special.expit(min_in)
    log_cdf_plus = plus_in - np.logaddexp(0, plus_in)
    log_one_minus_cdf_min = -np.logaddexp(0, min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * np.logaddexp(0, mid_in)
    interior = (x >= -0.999) & (x <= 0.999)
    log_probs = np.where(x < -0.999, log_cdf_plus, np.where(
        x > 0.999, log_one_minus_cdf_min, np.where(
            cdf_delta > 1e-5, np.log(np.maximum(cdf_delta, 1e-12)),
            log_pdf_mid - np.log(127.5))))
    log_probs = log_probs.sum(3) + special.log_softmax(logit_probs, axis=-1)
    fallback = bool((interior & (cdf_delta <= 1e-5)).any())
    return special.logsumexp(log_probs, axis=-1).sum((1, 2)), fallback


def test_mixture_matches_the_pixelcnnpp_code():
    """Same coupling, clamp and parameter roles as PixelCNN++'s own loss (where it does not
    use its mid-bin fallback), after mapping its (K logits | per channel: K means, K
    log-scales, K coefficients) layout to vaelab's parameter-major (4, K, C) one."""
    k, b, h, w = 5, 3, 4, 4
    ours = mixture_params(k, 3, seed=4, batch=b, rest=(h, w), log_s=(-0.3, 1.0), coef=0.7)
    q = ours.unflatten(1, (4, k, 3))
    q[:, 0] = q[:, 0, :, :1]  # equal logit slots: their mean is PixelCNN++'s one logit
    per_channel = torch.cat([q[:, 1], q[:, 2], q[:, 3]], 1)  # (B, 3K, C, H, W)
    out = torch.cat([q[:, 0, :, 0], per_channel.transpose(1, 2).flatten(1, 2)], 1)
    x = torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(5))
    x[0, :, 0, 0], x[1, :, 0, 0] = 0, 255
    fam = L.get(DLM, components=k).double()
    ref, fallback = pixelcnnpp_log_prob((x.movedim(1, -1).double().numpy() - 127.5) / 127.5,
                                        out.movedim(1, -1).numpy())
    assert not fallback
    np.testing.assert_allclose(fam(q.flatten(1, 3)).log_prob(x).numpy(), ref, rtol=1e-9)


def test_mixture_of_one_component_is_the_discretized_logistic():
    g = torch.Generator().manual_seed(0)
    one, dl = L.get(DLM, components=1), L.get("discretized-logistic")
    params = torch.randn(6, 4, 5, 5, generator=g) * torch.tensor([5.0, 1.0, 3.0, 5.0])[:, None,
                                                                                        None]
    x = torch.randint(0, 256, (6, 1, 5, 5), generator=g)
    assert torch.equal(one(params).log_prob(x), dl(params[:, 1:3]).log_prob(x))  # same bits
    assert torch.equal(one(params).mean, dl(params[:, 1:3]).mean)
    # three channels with zero coefficients: independent channels, the same sum
    rgb = torch.randn(6, 12, 5, 5, generator=g, dtype=torch.float64)
    rgb[:, 9:] = 0
    x3 = torch.randint(0, 256, (6, 3, 5, 5), generator=g)
    torch.testing.assert_close(one.double()(rgb).log_prob(x3), dl(rgb[:, 3:9]).log_prob(x3),
                               rtol=1e-14, atol=0)


MIXTURE_EXTREMES = [1e4, -1e4, 100.0, -100.0, 0.0, 1e-4]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("c", [1, 2, 3])
def test_mixture_conditionals_sum_to_one(dtype, tol, c):
    """For fixed earlier channels, exp(log p(x_c | x_<c)) sums to 1 over the 256 values of
    x_c: at random and at extreme parameters (every group includes +-1e4)."""
    k = 3
    fam = L.get(DLM, components=k).to(dtype)
    g = torch.Generator().manual_seed(c)
    random = mixture_params(k, c, seed=c, batch=4)
    idx = torch.randint(0, len(MIXTURE_EXTREMES), (4, 4 * k * c), generator=g)
    extreme = torch.tensor(MIXTURE_EXTREMES, dtype=torch.float64)[idx]
    params = torch.cat([random, extreme]).to(dtype)  # (8, 4KC)
    prefix = torch.randint(0, 256, (8, c), generator=g)
    prefix[0], prefix[1] = 0, 255
    for ch in range(c):
        x = prefix[:, None].repeat(1, 256, 1)  # (8, 256, C): vary channel ch
        x[:, :, ch] = torch.arange(256)
        lp = fam(params.repeat_interleave(256, 0)).elementwise_log_prob(x.reshape(-1, c))
        lp = lp.reshape(8, 256, c)
        assert torch.isfinite(lp).all()
        total = torch.logsumexp(lp[:, :, ch].double(), 1)
        assert total.abs().max().item() < tol


def test_mixture_joint_sums_to_one():
    """C = 2: the joint over all 256**2 values. C = 3: p(r, g) over all 256**2 values (the
    first two chain terms), and p(b | r, g) over b for 64 random (r, g); with the per-(r, g)
    normalisation of the conditional, the joint over 256**3 sums to 1 by factorisation
    (brute force: the slow test below)."""
    fam = L.get(DLM, components=2).double()
    xs = grid(2)
    lp = fam(mixture_params(2, 2, seed=1).expand(len(xs), -1)).log_prob(xs)
    assert abs(torch.logsumexp(lp, 0).item()) < 1e-12
    params = mixture_params(2, 3, seed=2)
    x = torch.cat([xs, torch.full((len(xs), 1), 77)], 1)
    lp = fam(params.expand(len(x), -1)).elementwise_log_prob(x)
    assert abs(torch.logsumexp(lp[:, :2].sum(1), 0).item()) < 1e-12
    rg = torch.randint(0, 256, (64, 1, 2), generator=torch.Generator().manual_seed(3))
    x = torch.cat([rg.expand(64, 256, 2), torch.arange(256)[None, :, None].expand(64, 256, 1)],
                  2).reshape(-1, 3)
    lp = fam(params.expand(len(x), -1)).elementwise_log_prob(x)[:, 2].reshape(64, 256)
    assert torch.logsumexp(lp, 1).abs().max().item() < 1e-12


@pytest.mark.slow
def test_mixture_joint_over_all_256_cubed_colours_sums_to_one():
    """Brute force: all 16.8 million colours of one pixel (about a minute)."""
    fam = L.get(DLM, components=2).double()
    params = mixture_params(2, 3, seed=6)
    total = 0.0
    for r in range(0, 256, 16):
        x = torch.cat([torch.arange(r, r + 16).repeat_interleave(65536)[:, None],
                       grid(2).repeat(16, 1)], 1)
        total += fam(params.expand(len(x), -1), validate=False).log_prob(x).exp().sum().item()
    assert abs(total - 1) < 1e-9


def test_mixture_far_tails_against_mpmath():
    """Components whose bins are far in the tails (float64 differences of sigmoids would be
    0): the mixture is the log-sum-exp of exact per-component values."""
    fam = L.get(DLM, components=2).double()
    # (x, loc, log_s) for each of the two components, one channel
    cases = [((200, -1.0, -5.0), (10, 1.0, -5.0)), ((254, -1.0, -7.0), (254, 0.9, -6.0)),
             ((1, 0.99, -7.0), (1, 0.5, -6.5))]
    for (k0, loc0, ls0), (_, loc1, ls1) in cases:
        params = torch.tensor([[0.3, -0.2, loc0, loc1, ls0, ls1, 0.0, 0.0]], dtype=torch.float64)
        got = fam(params).log_prob(torch.tensor([[k0]])).item()
        log_pi = special.log_softmax([0.3, -0.2])
        ref = special.logsumexp([log_pi[0] + mp_logistic_bin(k0, loc0, ls0),
                                 log_pi[1] + mp_logistic_bin(k0, loc1, ls1)])
        assert got == pytest.approx(ref, rel=1e-12)
        assert got < -30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1, 3])
def test_mixture_extreme_parameters_give_finite_values_and_gradients(dtype, c):
    k = 3
    g = torch.Generator().manual_seed(c)
    idx = torch.randint(0, len(MIXTURE_EXTREMES), (16, 4 * k * c, 2), generator=g)
    params = torch.tensor(MIXTURE_EXTREMES, dtype=dtype)[idx].requires_grad_()
    x = torch.randint(0, 256, (16, c, 2), generator=g)
    x[:4], x[4:8] = 0, 255
    lp = L.get(DLM, components=k)(params).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all()


def test_mixture_gradients_match_finite_differences():
    params = mixture_params(2, 3, seed=8, log_s=(-3.0, 0.5))
    x = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(8))
    fam = L.get(DLM, components=2).double()
    assert torch.autograd.gradcheck(lambda p: fam(p).elementwise_log_prob(x),
                                    params.requires_grad_())


def test_mixture_mean_is_exact_without_coupling_and_close_with_it():
    """Exact for C = 1 and for zero coefficients; with coupling (C = 2) a plug-in value, here
    within one grey level of the exact mean for scales up to e^-2 (17 grey levels)."""
    fam = L.get(DLM, components=3).double()
    grey = mixture_params(3, 1, seed=9)
    xs = torch.arange(256)[:, None]
    probs = fam(grey.expand(256, -1)).log_prob(xs).exp()
    torch.testing.assert_close(fam(grey).mean[0, 0], (probs * xs[:, 0] / 255).sum(),
                               rtol=1e-12, atol=0)
    uncoupled = mixture_params(3, 2, seed=10).unflatten(1, (4, 3, 2))
    uncoupled[:, 3] = 0
    uncoupled = uncoupled.flatten(1, 3)
    torch.testing.assert_close(fam(uncoupled).mean, exact_mixture_mean(fam, uncoupled),
                               rtol=1e-12, atol=0)
    worst = 0.0
    for seed in range(10):
        p = mixture_params(3, 2, seed=seed, loc=(-0.9, 0.9), log_s=(-5.0, -2.0), coef=1.0)
        worst = max(worst, (fam(p).mean - exact_mixture_mean(fam, p)).abs().max().item())
    assert 1e-3 < worst * 255 < 1  # measured: 0.85 grey levels


def test_mixture_samples_follow_the_colour_coupling():
    """RGB draws of one pixel: the means of R, G, B and of RG, RB, GB within 4 standard
    errors of exact values (sums over all (r, g) and, for B, its exact conditional mean)."""
    k = 2
    fam = L.get(DLM, components=k).double()
    params = mixture_params(k, 3, seed=11, loc=(-0.6, 0.6), log_s=(-3.0, -1.0))
    q = params.unflatten(1, (4, k, 3))[0].numpy()
    q[3] = [[1.5, -1.0, 0.8], [-1.2, 0.6, 1.0]]  # strong coupling
    params = torch.as_tensor(q).flatten()[None]
    log_pi = special.log_softmax(q[0].mean(1))
    loc, log_s, (alpha, beta, gamma) = q[1], q[2], np.tanh(q[3]).T
    v = np.arange(256)
    y = 2 * v / 255 - 1
    lp_r = ref_logistic_log_mass(loc[:, 0, None], log_s[:, 0, None], v)  # (K, r)
    lp_g = ref_logistic_log_mass((loc[:, 1, None] + alpha[:, None] * y)[:, :, None],
                                 log_s[:, 1, None, None], v)  # (K, r, g)
    joint = np.exp(log_pi[:, None, None] + lp_r[:, :, None] + lp_g)  # p(k, r, g)
    loc_b = loc[:, 2, None, None] + beta[:, None, None] * y[:, None] + gamma[:, None, None] * y
    inv_s = np.exp(-log_s[:, 2, None, None])
    mean_b = sum(special.expit(inv_s * (loc_b - ((2 * j - 1) / 255 - 1))) for j in range(1, 256))
    r, g = np.meshgrid(v, v, indexing="ij")
    stats_exact = [(joint * f).sum() for f in (r, g, mean_b, r * g, r * mean_b, g * mean_b)]
    n = 40000
    draws = fam(params.expand(n, -1)).sample(torch.Generator().manual_seed(12)).double().numpy()
    dr, dg, db = draws.T
    for f, exact in zip((dr, dg, db, dr * dg, dr * db, dg * db), stats_exact):
        assert abs(f.mean() - exact) <= 4 * f.std() / math.sqrt(n)


@pytest.mark.parametrize("c", [1, 3])
def test_mixture_output_bias_predicts_the_data_mean(c):
    k = 4
    fam = L.get(DLM, components=k).double()
    m = torch.tensor([0.0, 1e-4, 0.02, 0.3, 0.5, 0.97, 1.0], dtype=torch.float64)
    m = m.expand(c, 7) if c == 1 else torch.stack([m, m.flip(0), m.roll(1)])
    bias = fam.output_bias(m)
    assert bias.shape == (4 * k * c, 7)
    q = bias.unflatten(0, (4, k, c))
    assert (q[0] == 0).all() and (q[3] == 0).all()  # equal weights, no coupling
    assert (q[1:3] == q[1:3, :1]).all()  # the components start equal
    target = m.clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(fam(bias[None]).mean[0], target, rtol=0, atol=1e-12)
    scale = ((12 * target * (1 - target)).sqrt() / math.pi).clamp_min(1 / 255)
    torch.testing.assert_close(q[2, 0].exp(), scale, rtol=1e-14, atol=0)
    b32 = fam.float().output_bias(m.float())
    assert b32.dtype == torch.float32
    torch.testing.assert_close(fam(b32[None]).mean[0], target.float(), rtol=0, atol=2e-6)


def test_mixture_refuses_more_than_three_channels_in_one_line():
    fam = L.get(DLM, components=2)
    with pytest.raises(DataError) as info:
        fam(torch.zeros(2, 32, 5))
    assert str(info.value) == (
        "discretized-logistic-mixture couples the channels of a pixel and takes data "
        "(B, C, *rest) with 1, 2 or 3 channels, but params of shape (2, 32, 5) give C = 4 "
        "(a flat (B, D) layout counts D channels): keep the channel dim, or use "
        "discretized-logistic or categorical-256")
    with pytest.raises(DataError, match=r"give C = 12 \(a flat"):
        fam(torch.zeros(2, 96))
    with pytest.raises(DataError, match="2 values outside that range, e.g. 300"):
        fam(torch.zeros(1, 24)).log_prob(torch.tensor([[3, 300, -1]]))
    assert fam.params_per_channel == 8 and L.get(DLM).params_per_channel == 40


# --------------------------------------------------------------------------- output bias


@pytest.mark.parametrize("name,i", CASES, ids=IDS)
@pytest.mark.parametrize("event", EVENT_SHAPES)
def test_output_bias_shape_and_mean(name, i, event):
    """Bias (P*C, *rest); a decoder that outputs only the bias predicts the data mean."""
    fam = L.get(name, **EXAMPLES[name][i].options).double()
    m = 0.2 + 0.6 * torch.rand(event, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    bias = fam.output_bias(m)
    assert bias.shape == (fam.params_per_channel * event[0], *event[1:])
    if name != "discretized-logistic":  # its tails pull the mean towards 1/2; tested above
        atol = 1e-9 if name != "bernoulli" else 1e-12
        torch.testing.assert_close(fam(bias[None]).mean[0], m, rtol=0, atol=atol)
    if fam.params_per_channel == 2 and name != "discretized-logistic":
        scale = F.softplus(bias[event[0]:]) + fam.min_scale
        torch.testing.assert_close(scale, torch.full_like(m, fam.init_scale))


def test_bernoulli_output_bias_clamps_means():
    bias = L.get("bernoulli").output_bias(torch.tensor([0.0, 1e-4, 0.5, 1.0]))
    torch.testing.assert_close(torch.sigmoid(bias), torch.tensor([1e-3, 1e-3, 0.5, 1 - 1e-3]))


# --------------------------------------------------------------------------- learned scales


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
def test_learned_scale_is_a_trained_parameter_with_the_right_gradient(name):
    fam = L.get(name, scale="learned", init_scale=0.3, min_scale=1e-3).double()
    (param,) = list(fam.parameters())
    assert param is fam.log_scale and param.requires_grad and param.shape == ()
    assert fam.min_scale + param.exp().item() == pytest.approx(0.3, rel=1e-7)  # float32 init
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64)
    loc = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64)
    fam(loc).log_prob(x).sum().backward()
    # d/dtheta sum log p with sigma = min + e^theta: (e^theta / sigma) * sum(dlogp/dlog sigma)
    sigma = 1e-3 + math.exp(param.item())
    r = (x - loc).abs().numpy()
    dlog = (r**2 / sigma**2 - 1) if name == "gaussian" else (r / sigma - 1)
    expected = (sigma - 1e-3) / sigma * dlog.sum()
    assert param.grad.item() == pytest.approx(expected, rel=1e-12)
    assert not list(L.get(name, scale=0.1).parameters())
    assert not list(L.get(name, scale="per-pixel").parameters())


# --------------------------------------------------------------------------- validation messages


def raises_one_line(x, name="bernoulli", **options) -> str:
    fam = L.get(name, **options)
    p = fam.params_per_channel
    params = torch.zeros(x.shape[0], p * x.shape[1], *x.shape[2:])
    with pytest.raises(DataError) as info:
        fam(params).log_prob(x)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_grey_levels_to_bernoulli_are_refused_with_the_fix():
    x = torch.zeros(2, 1, 5, 5)
    x[0, 0, 0, :3] = torch.tensor([0.3412, 0.5, 0.7])
    assert raises_one_line(x) == (
        "bernoulli needs 0/1 data but got 3 values strictly between 0 and 1, e.g. 0.3412: "
        "binarise the data (--binarize dynamic) or use the continuous-bernoulli likelihood "
        "(or pass unnormalized=True to reproduce BCE-on-grey-levels examples; "
        "it is not a likelihood)")


def test_unnormalized_bernoulli_accepts_grey_levels_and_says_so():
    fam = L.get("bernoulli", unnormalized=True)
    assert not fam.normalized and fam.data_kind == "unit"
    x = torch.full((1, 4), 0.25)
    lg = torch.tensor([[-2.0, 0.0, 1.0, 3.0]])
    torch.testing.assert_close(fam(lg).log_prob(x),
                               -F.binary_cross_entropy(torch.sigmoid(lg), x, reduction="sum")[None])


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian", "laplace"])
def test_nan_and_inf_are_counted(name):
    x = torch.rand(2, 3)
    x[0, 1], x[1, 2] = float("nan"), float("inf")
    assert raises_one_line(x, name) == (
        f"{name} got 2 NaN/Inf values, e.g. nan: fix the data pipeline (look for a division by "
        "zero or a bad normalisation) before computing likelihoods")


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_0_to_255_data_to_a_unit_family_suggests_dividing_by_255(name):
    x = torch.tensor([[0.0, 255.0, 128.0, 1.0]])
    assert raises_one_line(x, name) == (
        f"{name} needs data in [0, 1] but got 2 values above 1, e.g. 255; the data look like "
        "0..255 pixel values: divide by 255")


def test_negative_data_to_a_unit_family():
    msg = raises_one_line(torch.tensor([[-0.5, 0.5]]), "laplace")
    assert msg == ("laplace needs data in [0, 1] but got 1 value outside it, e.g. -0.5: "
                   "rescale the data to [0, 1]")


def test_integer_data_to_a_unit_family():
    msg = raises_one_line(torch.tensor([[0, 255]], dtype=torch.uint8), "continuous-bernoulli")
    assert msg.startswith("continuous-bernoulli needs floating-point data in [0, 1] but got "
                          "torch.uint8 data: convert 8-bit images with x.float() / 255")


@pytest.mark.parametrize("name", ["categorical-256", "discretized-logistic",
                                  "discretized-logistic-mixture"])
def test_float_data_to_an_eight_bit_family(name):
    msg = raises_one_line(torch.tensor([[0.0, 0.5]]), name)
    assert msg == (
        f"{name} needs integer pixel values 0..255 (a uint8 or int64 tensor) but got "
        "torch.float32 data: pass the uint8 images (ImageSet.batch_uint8()), or use a family "
        "for [0, 1] data such as bernoulli, continuous-bernoulli or gaussian")


@pytest.mark.parametrize("name", ["categorical-256", "discretized-logistic"])
def test_out_of_range_integers_to_an_eight_bit_family(name):
    msg = raises_one_line(torch.tensor([[3, 300, -1, 255]]), name)
    assert msg == (f"{name} needs pixel values 0..255 but got 2 values outside that range, "
                   "e.g. 300: pass the uint8 images (ImageSet.batch_uint8())")


def test_shape_mismatch_names_both_shapes():
    fam = L.get("gaussian", scale="per-pixel")
    with pytest.raises(DataError) as info:
        fam(torch.zeros(4, 2, 28, 28)).log_prob(torch.zeros(4, 1, 32, 32))
    assert str(info.value) == (
        "gaussian params of shape (4, 2, 28, 28) (2 per data channel) fit data of shape "
        "(4, 1, 28, 28) but x has shape (4, 1, 32, 32): make the decoder output "
        "(B, 2*C, *rest) for data (B, C, *rest)")
    with pytest.raises(ConfigError, match=r"shape \(4, 3, 5\), whose dim 1 is not a multiple"):
        fam(torch.zeros(4, 3, 5))


EDGE_VALUES = [0.0, -0.0, 1.0, 0.5, 2.0**-149, 1 - 2.0**-24, 1 + 2.0**-23, -(2.0**-149),
               2.0, 255.0, -1.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["binary", "unit"])
def test_the_fast_data_check_agrees_with_the_full_one(kind, dtype):
    """validate's one-pass gate passes exactly the data the full checks pass, for every edge
    value (denormals, the floats next to 0 and 1, NaN/Inf), so only errors take the slow path."""
    from vaelab.likelihoods.base import _check_binary, _check_unit, _in_units

    for value in EDGE_VALUES:
        x = torch.zeros(3, 5, dtype=dtype)
        x[1, 2] = value
        x[2, 4] = 1.0
        try:
            _check_unit("f", x)
            if kind == "binary":
                _check_binary("f", x)
            full = True
        except DataError:
            full = False
        assert _in_units(x, kind == "binary") == full, (value, dtype)
    assert _in_units(torch.zeros(0, 4), binary=True)


def test_validation_can_be_skipped_by_the_trainer():
    fam = L.get("bernoulli")
    x, lg = torch.full((1, 2), 0.5), torch.zeros(1, 2)
    expected = torch.tensor([2 * math.log(0.5)])
    torch.testing.assert_close(fam(lg, validate=False).log_prob(x), expected)
    torch.testing.assert_close(fam(lg).log_prob(x, validate=False), expected)
    fam.validate_data = False
    torch.testing.assert_close(fam(lg).log_prob(x), expected)
    with pytest.raises(DataError):
        fam(lg).log_prob(x, validate=True)
    with pytest.raises(DataError, match="x has shape"):  # shapes are always checked
        fam(lg).log_prob(x[:, :1])


# --------------------------------------------------------------------------- registry and options

ATTRIBUTES = {  # name: (options, P, data_kind, normalized, config())
    "bernoulli": ({}, 1, "binary", True, {"unnormalized": False}),
    "continuous-bernoulli": ({}, 1, "unit", True, {}),
    "gaussian": ({}, 1, "unit", True, {"scale": "learned", "init_scale": 1.0, "min_scale": 1e-3}),
    "laplace": ({"scale": "0.5"}, 1, "unit", True, {"scale": 0.5}),
    "categorical-256": ({}, 256, "uint8", True, {}),
    "discretized-logistic": ({}, 2, "uint8", True, {}),
    "discretized-logistic-mixture": ({"components": "4"}, 16, "uint8", True, {"components": 4}),
}


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_family_attributes_and_config_round_trip(name):
    options, p, kind, normalized, config = ATTRIBUTES[name]
    fam = L.get(name, **options)
    assert (fam.name, fam.params_per_channel, fam.data_kind, fam.normalized) == (
        name, p, kind, normalized)
    assert fam.config() == config
    assert L.get(name, **fam.config()).config() == config
    assert isinstance(fam, torch.nn.Module)


def test_per_pixel_gaussian_has_two_params_and_round_trips():
    fam = L.get("gaussian", scale="per-pixel", init_scale=0.5, min_scale=0.01)
    assert fam.params_per_channel == 2
    assert L.get("gaussian", **fam.config()).config() == {
        "scale": "per-pixel", "init_scale": 0.5, "min_scale": 0.01}


@pytest.mark.parametrize("name,options,message", [
    ("gausian", {}, "unknown likelihood 'gausian': choose one of bernoulli, categorical-256, "
                    "continuous-bernoulli, discretized-logistic, discretized-logistic-mixture, "
                    "gaussian, laplace"),
    ("gaussian", {"sigma": 1}, "unknown config key likelihood.gaussian.sigma: valid keys in "
                               "[likelihood.gaussian] are scale, init_scale, min_scale"),
    ("categorical-256", {"scale": 1}, "unknown config key likelihood.categorical-256.scale: "
                                      "valid keys in [likelihood.categorical-256] are none (it "
                                      "takes no options)"),
    ("laplace", {"scale": -1.0}, "likelihood.laplace.scale must be a positive number (a fixed "
                                 "sigma), 'learned' or 'per-pixel', got -1.0"),
    ("gaussian", {"scale": "fixed"}, "likelihood.gaussian.scale must be a positive number (a "
                                     "fixed sigma), 'learned' or 'per-pixel', got 'fixed'"),
    ("gaussian", {"scale": 0.1, "min_scale": 0.01}, "likelihood.gaussian options init_scale and "
                                                    "min_scale apply only to scale='learned' or "
                                                    "'per-pixel'"),
    ("gaussian", {"scale": "per-pixel", "min_scale": 0.0}, "min_scale > 0 for per-pixel"),
    ("laplace", {"init_scale": 1e-4}, "likelihood.laplace needs init_scale > min_scale"),
    ("bernoulli", {"unnormalized": "maybe"}, "likelihood.bernoulli.unnormalized = 'maybe' is "
                                             "not a valid bool"),
    ("bernoulli", {"output": "probs"}, "likelihood.bernoulli.output must be one of logits, "
                                       "keras-probs, torch-probs, got 'probs'"),
    ("laplace", {"init_scale": "big"}, "likelihood.laplace.init_scale = 'big' is not a valid "
                                       "float | None"),
    *[("discretized-logistic-mixture", {"components": bad},
       f"likelihood.discretized-logistic-mixture.components must be positive, got {bad!r}")
      for bad in (0, -3)],
    *[("discretized-logistic-mixture", {"components": bad},
       f"likelihood.discretized-logistic-mixture.components = {bad!r} is not a valid int")
      for bad in (2.5, True, "ten")],
    ("discretized-logistic-mixture", {"components": None},
     "likelihood.discretized-logistic-mixture.components cannot be empty"),
    ("discretized-logistic-mixture", {"mixtures": 5}, "unknown config key "
     "likelihood.discretized-logistic-mixture.mixtures: valid keys in "
     "[likelihood.discretized-logistic-mixture] are components"),
])
def test_bad_names_and_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError) as info:
        L.get(name, **options)
    assert message in str(info.value) and "\n" not in str(info.value)
