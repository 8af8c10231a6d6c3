"""The loss audit: the documented cases, and the decomposition checked against losses
computed literally the way users write them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

from vaelab.audit import Audit, explain
from vaelab.compat import keras_binary_crossentropy
from vaelab.errors import ConfigError

# --------------------------------------------------------------------------- documented cases


def test_keras_blog_mean_bce_and_mean_kl_is_beta_392():
    a = explain("bce", "mean", kl_reduction="mean", data_shape=(784,), latent_dim=2)
    assert a.scale == pytest.approx(1 / 784, rel=1e-15)
    assert a.beta_effective == pytest.approx(392, rel=1e-15)
    assert a.missing_constant_nats == 0.0 and a.normalized and a.gaussian_sigma is None
    assert a.sigma_at_beta_one is None and a.data == "binary"
    assert "1/784 x [ -log p(x|z) + 392 x KL" in a.text and "beta = 392" in a.text


def test_keras_example_784_times_mean_bce_plus_summed_kl_is_the_elbo():
    a = explain("bce", "mean", recon_multiplier=784, kl_reduction="sum", data_shape=(784,))
    assert a.scale == pytest.approx(1.0, rel=1e-15)
    assert a.beta_effective == pytest.approx(1.0, rel=1e-15)
    assert a.missing_constant_nats == 0.0 and a.normalized
    assert "beta = 1: this is the ELBO" in a.text


def test_784_times_mean_mse_plus_summed_kl_is_a_gaussian_with_variance_one_half():
    a = explain("mse", "mean", recon_multiplier=784, kl_reduction="sum", data_shape=(784,))
    assert a.gaussian_sigma**2 == pytest.approx(0.5, rel=1e-15)
    assert a.beta_effective == pytest.approx(1.0, rel=1e-15) and a.scale == pytest.approx(1.0)
    assert a.missing_constant_nats == pytest.approx(784 / 2 * math.log(math.pi), rel=1e-15)
    assert a.missing_constant_nats == pytest.approx(448.7341, abs=1e-4)
    assert a.sigma_at_beta_one**2 == pytest.approx(0.5, rel=1e-15)
    assert a.normalized and "784/2 x log(pi) = 448.7341 nats" in a.text


def test_mean_mse_plus_small_kl_weight_on_64x64x3_images():
    a = explain("mse", "mean", kl_weight=0.00025, kl_reduction="sum", data_shape=(64, 64, 3))
    assert a.data_dims == 12288
    assert a.scale == pytest.approx(1 / 12288, rel=1e-15)
    assert a.beta_effective == pytest.approx(0.00025 * 12288, rel=1e-12)
    assert a.beta_effective == pytest.approx(3.072, rel=1e-12)
    assert a.sigma_at_beta_one**2 == pytest.approx(1.536, rel=1e-12)
    assert a.missing_constant_nats == pytest.approx(6144 * math.log(math.pi), rel=1e-15)
    assert "1/12288" in a.text and "3.072" in a.text and "sigma^2 = beta/2 = 1.536" in a.text


@pytest.mark.parametrize(
    "kwargs, scale, beta",
    [
        # PyTorch example: BCE(reduction="sum") + summed KL, both summed over the batch
        (dict(recon="bce", recon_reduction="sum", batch_reduction="sum", batch_size=128,
              latent_dim=20), 128.0, 1.0),
        (dict(recon="sse", kl_weight=0.5), 1.0, 0.5),
        (dict(recon="mse", recon_reduction="sum", kl_weight=0.5), 1.0, 0.5),
        (dict(recon="bce", kl_reduction="mean", latent_dim=10, recon_multiplier=2.0,
              data_shape=(1, 28, 28)), 2 / 784, 0.1 / (2 / 784)),
        (dict(recon="mse", batch_reduction="sum", batch_size=32, data_shape=(3, 32, 32)),
         32 / 3072, 3072.0),
        (dict(recon="bce", batch_reduction="mean", batch_size=64), 1 / 784, 784.0),  # ignored B
    ],
)
def test_scale_and_beta_table(kwargs, scale, beta):
    a = explain(**kwargs)
    assert a.scale == pytest.approx(scale, rel=1e-12)
    assert a.beta_effective == pytest.approx(beta, rel=1e-12)


def test_data_kind_decides_whether_the_likelihood_is_normalised():
    grey = explain("bce", data="grey")
    assert not grey.normalized and grey.missing_constant_nats is None
    assert "not a negative log-likelihood" in grey.text and "not an ELBO" not in grey.text
    assert "beta = 1, but without a likelihood this is not an ELBO" in explain(
        "bce", "sum", data="continuous").text
    binary_gauss = explain("mse", data="binary")
    assert not binary_gauss.normalized and "Use Bernoulli" in binary_gauss.text
    assert explain("mse", data="grey").normalized and "dequantisation" in explain(
        "mse", data="grey").text
    assert explain("mse").data == "continuous" and explain("bce").data == "binary"


def test_zero_kl_weight_is_an_autoencoder():
    a = explain("mse", kl_weight=0.0)
    assert a.beta_effective == 0.0 and a.sigma_at_beta_one is None
    assert "plain autoencoder" in a.text


def test_to_dict_is_json_ready_and_complete():
    a = explain("mse", kl_weight=0.00025, data_shape=(64, 64, 3))
    d = json.loads(json.dumps(a.to_dict()))
    assert d["data_shape"] == [64, 64, 3] and d["beta_effective"] == pytest.approx(3.072)
    assert d["text"] == a.text and d["batch_size"] is None
    assert set(d) == set(Audit.__dataclass_fields__)
    assert len(a.text.splitlines()) >= 5


# --------------------------------------------------------------------------- the decomposition


def latent_stats(batch: int, latent: int, g: torch.Generator):
    mu = torch.randn(batch, latent, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, latent, generator=g, dtype=torch.float64) * 0.5
    reference_kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    return mu, logvar, reference_kl


def keras_kl(mu, logvar, reduce):  # the Keras VAE examples' KL, literally
    return -0.5 * reduce(1 + logvar - mu.square() - logvar.exp(), -1)


def test_keras_blog_loss_decomposes_as_reported():
    g = torch.Generator().manual_seed(0)
    batch, latent = 16, 2
    x = (torch.rand(batch, 784, generator=g) > 0.6).double()
    x_hat = torch.rand(batch, 784, generator=g, dtype=torch.float64) * 0.9 + 0.05
    mu, logvar, kl = latent_stats(batch, latent, g)
    user = (keras_binary_crossentropy(x, x_hat) + keras_kl(mu, logvar, torch.mean)).mean()
    a = explain("bce", "mean", kl_reduction="mean", data_shape=(784,), latent_dim=latent)
    nll = -Bernoulli(probs=x_hat).log_prob(x).sum(-1)
    expected = a.scale * (nll + a.beta_effective * kl - a.missing_constant_nats).mean()
    torch.testing.assert_close(user, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(user, a.predicted_loss(nll, kl), rtol=1e-12, atol=0)


def test_pytorch_example_summed_over_the_batch_decomposes_as_reported():
    g = torch.Generator().manual_seed(1)
    batch, latent = 8, 20
    x = (torch.rand(batch, 1, 28, 28, generator=g) > 0.5).double()
    x_hat = torch.rand(batch, 1, 28, 28, generator=g, dtype=torch.float64) * 0.9 + 0.05
    mu, logvar, kl = latent_stats(batch, latent, g)
    user = F.binary_cross_entropy(x_hat, x, reduction="sum") + keras_kl(mu, logvar, torch.sum).sum()
    a = explain("bce", "sum", batch_reduction="sum", batch_size=batch, data_shape=(1, 28, 28),
                latent_dim=latent)
    nll = -Bernoulli(probs=x_hat).log_prob(x).flatten(1).sum(-1)
    torch.testing.assert_close(user, a.scale * (nll + a.beta_effective * kl).mean(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(user, a.predicted_loss(nll, kl), rtol=1e-12, atol=0)


@pytest.mark.parametrize("multiplier, kl_weight, shape", [(784.0, 1.0, (784,)),
                                                         (1.0, 0.00025, (64, 64, 3)),
                                                         (10.0, 2.0, (5,))])
def test_mse_losses_decompose_against_the_gaussian_nll(multiplier, kl_weight, shape):
    g = torch.Generator().manual_seed(2)
    batch, latent = 4, 3
    x = torch.rand(batch, *shape, generator=g, dtype=torch.float64)
    x_hat = torch.rand(batch, *shape, generator=g, dtype=torch.float64)
    mu, logvar, kl = latent_stats(batch, latent, g)
    recon = F.mse_loss(x_hat, x, reduction="none").flatten(1).mean(-1)
    user = (multiplier * recon + kl_weight * keras_kl(mu, logvar, torch.sum)).mean()
    a = explain("mse", "mean", recon_multiplier=multiplier, kl_weight=kl_weight,
                data_shape=shape, latent_dim=latent)
    nll = -Normal(x_hat, a.gaussian_sigma).log_prob(x).flatten(1).sum(-1)
    expected = a.scale * (nll + a.beta_effective * kl - a.missing_constant_nats).mean()
    torch.testing.assert_close(user, expected, rtol=1e-10, atol=0)
    # the same loss is (KL weight) x a beta = 1 NELBO under sigma = sigma_at_beta_one
    sigma = a.sigma_at_beta_one
    nll_one = -Normal(x_hat, sigma).log_prob(x).flatten(1).sum(-1)
    constant = a.data_dims / 2 * math.log(2 * math.pi * sigma**2)
    kl_factor = kl_weight  # summed KL
    torch.testing.assert_close(user, kl_factor * (nll_one + kl - constant).mean(),
                               rtol=1e-10, atol=0)


def test_bce_on_grey_levels_misses_a_non_constant_normaliser():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 784, generator=g, dtype=torch.float64)  # grey levels in [0, 1]
    x_hat = torch.rand(6, 784, generator=g, dtype=torch.float64) * 0.9 + 0.05
    bce = F.binary_cross_entropy(x_hat, x, reduction="none").sum(-1)
    a = explain("bce", "sum", data="grey")
    kl = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(bce.mean(), a.predicted_loss(bce, kl), rtol=1e-12, atol=0)
    # BCE = -log CB(x; mu) + log C(mu): the gap depends on the outputs, so no constant fixes it
    gap = bce - (-ContinuousBernoulli(probs=x_hat).log_prob(x).sum(-1))
    assert gap.std() > 0.1 and a.missing_constant_nats is None and not a.normalized


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(recon="l1"), "unknown reconstruction loss 'l1': choose one of bce, mse, sse"),
        (dict(recon_reduction="max"), "unknown recon_reduction 'max'"),
        (dict(recon="sse", recon_reduction="mean"), "use recon='mse' for a mean"),
        (dict(kl_reduction="batchmean"), "unknown kl_reduction 'batchmean'"),
        (dict(batch_reduction="batchmean"), "unknown batch_reduction 'batchmean'"),
        (dict(batch_reduction="sum", batch_size=0), "batch_size must be a positive integer"),
        (dict(data="ternary"), "unknown data kind 'ternary'"),
        (dict(recon_multiplier=0), "recon_multiplier must be a finite number > 0"),
        (dict(recon_multiplier=float("inf")), "recon_multiplier must be a finite number"),
        (dict(kl_weight=-0.1), "kl_weight must be a finite number >= 0"),
        (dict(data_shape=(28, 0)), "every data_shape entry"),
        (dict(data_shape=()), "data_shape is empty"),
        (dict(latent_dim=0), "latent_dim must be a positive integer"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        explain(**kwargs)


# --------------------------------------------------------------------------- what probe() adds


def test_per_example_losses_are_audited_like_a_batch_mean():
    a = explain("bce", "mean", kl_reduction="mean", batch_reduction="none", latent_dim=2)
    assert a.batch_reduction == "none" and a.scale == pytest.approx(1 / 784)
    assert "returned per example" in a.text
    nll, kl = torch.tensor([10.0, 20.0]), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(a.predicted_loss(nll, kl), a.scale * (nll + 392 * kl))


@pytest.mark.parametrize("kwargs, words", [
    (dict(from_logits=True, epsilon_where="stable"), "computed stably: exact at any logit"),
    (dict(epsilon=1e-7, epsilon_where="clip"), "clipped to [eps, 1 - eps] with eps = 1e-07: "
                                               "a wrong pixel costs at most 16.12 nats"),
    (dict(epsilon=1e-7, epsilon_where="log"), "added inside the logs"),
    (dict(epsilon=1e-7, epsilon_where="clip+log"), "at most 15.42 nats"),
    (dict(epsilon=math.exp(-100), epsilon_where="log-clamp"), "clamped at log(eps) = -100"),
    (dict(epsilon_where="none"), "nothing guarding log(0)"),
])
def test_the_guard_against_log_zero_is_explained(kwargs, words):
    a = explain("bce", **kwargs)
    assert words in a.text and a.epsilon_where == kwargs["epsilon_where"]
    assert ("BCE with logits" in a.text) == (kwargs["epsilon_where"] != "stable")


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon_where="clip"), "epsilon_where='clip' needs an epsilon"),
    (dict(epsilon=1e-7, epsilon_where="none"), "epsilon_where='none' has no epsilon"),
    (dict(epsilon_where="stable"), "pass from_logits=True"),
    (dict(epsilon=0.7, epsilon_where="clip"), "epsilon must be below 0.5"),
    (dict(epsilon_where="sometimes"), "unknown epsilon_where 'sometimes'"),
    (dict(recon="mse", epsilon=1e-7, epsilon_where="clip"), "recon 'mse' has none"),
    (dict(from_logits=1), "from_logits must be True or False"),
    (dict(kl_term=False), "kl_weight must be 0"),
])
def test_bad_guard_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        explain(**({"recon": "bce"} | kwargs))


def test_text_ends_with_the_vaelab_command_for_the_same_objective():
    blog = explain("bce", "mean", kl_reduction="mean", latent_dim=2).text.splitlines()
    assert blog[-4:-2] == ["  the same objective: vaelab train --likelihood bernoulli "
                           "--latent-dim 2 --beta 392",
                           "  the ELBO: vaelab train --likelihood bernoulli --latent-dim 2"]
    # ... and ends with the vaelab.keras line that replaces the loss in a Keras model
    assert blog[-2].startswith("In Keras 3 (docs/keras.md): from vaelab.keras import "
                               "ELBOLoss, Bernoulli;") and "beta=392) would keep" in blog[-2]
    assert blog[-1] == '  x_hat = ELBOLoss(Bernoulli(output="probs"))([x, x_hat, z_mean, z_log_var])'
    gauss = explain("mse", kl_weight=0.00025, data_shape=(64, 64, 3), latent_dim=128).text
    assert "--likelihood gaussian --scale 0.707107 --latent-dim 128 --beta 3.072" in gauss
    assert "--likelihood gaussian --scale 1.23935 --latent-dim 128" in gauss  # sqrt(1.536)
    assert gauss.splitlines()[-1] == ('  x_hat = ELBOLoss(Gaussian(scale="learned"))([x, x_hat, '
                                      'z_mean, z_log_var])')
    grey = explain("bce", data="grey", from_logits=True).text
    assert "--likelihood continuous-bernoulli" in grey
    assert "binarise x first" in grey.splitlines()[-2]
    assert grey.splitlines()[-1] == "  x_hat = ELBOLoss(Bernoulli())([x, x_hat, z_mean, z_log_var])"
    binary_mse = explain("mse", data="binary").text.splitlines()
    assert "Bernoulli" in binary_mse[-1] and "Bernoulli, not a Gaussian" in binary_mse[-2]


def test_reconstruction_only_loss():
    a = explain("bce", "mean", kl_weight=0.0, kl_term=False, batch_reduction="none")
    assert "no KL term" in a.text.splitlines()[0] and "plain autoencoder" not in a.text
    assert "the ELBO needs w = 1/784" in a.text
    assert a.text.splitlines()[-3] == "  the ELBO: vaelab train --likelihood bernoulli --latent-dim 2"
    assert a.text.splitlines()[-1].startswith("  x_hat = ELBOLoss(Bernoulli(")
