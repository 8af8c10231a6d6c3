"""The presets of widely copied losses: each probed, each against the numbers it is known
for, and each checked against the source's arithmetic written out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vaelab.audit import explain
from vaelab.audit.presets import LOSS_PRESETS, audit_preset
from vaelab.cli import main
from vaelab.errors import ConfigError

PT_EPS = math.exp(-100)  # PyTorch's binary_cross_entropy clamps log at -100

#: name -> (scale, beta, batch_reduction, recon family, from_logits, epsilon, epsilon_where)
EXPECTED = {
    "keras-blog-2016": (1 / 784, 392.0, "none", "bce", False, 1e-7, "clip"),
    "keras-example-2018-bce": (1.0, 1.0, "mean", "bce", False, 1e-7, "clip"),
    "keras-example-2018-mse": (1.0, 1.0, "mean", "sse", False, None, None),
    "keras-io-vae": (1.0, 1.0, "mean", "bce", False, 1e-7, "clip"),
    "pytorch-examples-vae": (128.0, 1.0, "sum", "bce", False, PT_EPS, "log-clamp"),
    "antixk-kld-weight": (1 / 12288, 3.072, "mean", "mse", False, None, None),
    "antixk-m-n": (1 / 12288, 144 / 162770 * 12288, "mean", "mse", False, None, None),
    "pythae-mse": (1.0, 1.0, "mean", "sse", False, None, None),
    "pythae-bce": (1.0, 1.0, "mean", "bce", False, PT_EPS, "log-clamp"),
    "pytorch-port-784-mean-bce-sum-kl": (1.0, 128.0, "mean", "bce", False, PT_EPS, "log-clamp"),
    "disentanglement-lib-bernoulli": (1.0, 1.0, "mean", "bce", True, None, "stable"),
    "disentanglement-lib-gaussian": (1.0, 1.0, "mean", "sse", True, None, None),
    "seeds-784-mean-bce-sum-kl": (1.0, 1.0, "mean", "bce", False, 1e-7, "clip"),
}


def test_every_preset_has_an_expected_row():
    assert set(EXPECTED) == set(LOSS_PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_audit(name):
    scale, beta, batch, recon, logits, eps, where = EXPECTED[name]
    preset = LOSS_PRESETS[name]
    a = audit_preset(name)
    assert a.scale == pytest.approx(scale, rel=1e-9)
    assert a.beta_effective == pytest.approx(beta, rel=1e-9)
    assert (a.batch_reduction, a.recon, a.from_logits, a.epsilon_where) == (
        batch, recon, logits, where)
    assert a.epsilon == (None if eps is None else pytest.approx(eps, rel=1e-5))
    assert a.data_shape == preset.data_shape and a.latent_dim == preset.latent_dim
    # cited: a URL, or the same source as the preset above it, or (the two composite
    # questions) what is written out, term by term
    assert "https://" in preset.source or "same" in preset.source or (
        name in {"seeds-784-mean-bce-sum-kl", "pytorch-port-784-mean-bce-sum-kl"}
        and "784 *" in preset.source)
    assert len(a.observations) >= 6


def test_known_consequences_are_in_the_text():
    assert "beta = 392" in audit_preset("keras-blog-2016").text
    antixk = audit_preset("antixk-kld-weight")
    assert antixk.sigma_at_beta_one**2 == pytest.approx(1.536)
    assert antixk.missing_constant_nats == pytest.approx(6144 * math.log(math.pi))
    grey = audit_preset("pytorch-examples-vae")
    assert not grey.normalized and "continuous-bernoulli" in grey.text
    assert audit_preset("keras-example-2018-mse").missing_constant_nats == pytest.approx(448.7341,
                                                                                        abs=1e-4)


def _batch(shape, latent, g):
    x = (torch.rand(3, *shape, generator=g, dtype=torch.float64) > 0.5).double()
    x_hat = torch.rand(3, *shape, generator=g, dtype=torch.float64) * 0.9 + 0.05
    mu = torch.randn(3, latent, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, latent, generator=g, dtype=torch.float64) * 0.5
    return x, x_hat, mu, logvar


@pytest.mark.parametrize("name", ["keras-blog-2016", "keras-io-vae", "pytorch-examples-vae",
                                  "antixk-kld-weight", "pythae-bce",
                                  "disentanglement-lib-bernoulli"])
def test_preset_value_equals_its_audit_on_random_inputs(name):
    """The audit's decomposition rebuilds the preset's value on inputs it never saw."""
    preset = LOSS_PRESETS[name]
    a = audit_preset(name)
    g = torch.Generator().manual_seed(0)
    x, x_hat, mu, logvar = _batch(preset.data_shape, preset.latent_dim, g)
    args = {"x": x, "x_hat": x_hat, "mu": mu, "logvar": logvar, "z": torch.zeros_like(mu)}
    if name.startswith("disentanglement"):  # NumPy code that reads x_hat as logits
        args = {k: v.numpy() for k, v in args.items()}
        args["x_hat"] = np.log(args["x_hat"] / (1 - args["x_hat"]))
    value = preset.fn(*(args[r] for r in preset.roles), **preset.fixed_kwargs)
    value = value["loss"] if isinstance(value, dict) else value
    value = value[0] if isinstance(value, tuple) else value
    value = torch.as_tensor(value, dtype=torch.float64)
    flat = lambda t: t.flatten(1)  # noqa: E731
    if a.recon == "bce":
        nll = torch.nn.functional.binary_cross_entropy(flat(x_hat), flat(x), reduction="none")
        nll = nll.sum(-1)
    else:
        nll = ((flat(x) - flat(x_hat)) ** 2).sum(-1) + a.missing_constant_nats
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum(-1)
    expected = a.predicted_loss(nll, kl)  # a summed batch: the sum over this batch
    torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-9, atol=0)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ConfigError, match="unknown loss preset 'keras'.*keras-blog-2016"):
        audit_preset("keras")


def test_cli_preset_prints_the_source_the_measurements_and_the_fix(capsys):
    assert main(["audit", "--preset", "keras-blog-2016"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Preset keras-blog-2016: https://blog.keras.io/")
    assert "What was measured:" in out and "beta = 392" in out
    assert "  the ELBO: vaelab train --likelihood bernoulli --latent-dim 2\n" in out
    assert out.rstrip().endswith(
        '  x_hat = ELBOLoss(Bernoulli(output="probs"))([x, x_hat, z_mean, z_log_var])')


def test_cli_preset_list_and_json(capsys):
    assert main(["audit", "--preset", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(LOSS_PRESETS) and lines[0].startswith("antixk-kld-weight: ")
    assert main(["audit", "--preset", "antixk-m-n", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["preset"] == "antixk-m-n" and "af3f9a5" in d["source"]
    assert d["beta_effective"] == pytest.approx(144 / 162770 * 12288)


def test_explain_and_preset_agree_on_the_keras_blog_case():
    a = audit_preset("keras-blog-2016")
    e = explain("bce", "mean", kl_reduction="mean", batch_reduction="none", data_shape=(784,),
                latent_dim=2, epsilon=1e-7, epsilon_where="clip")
    assert a.text == e.text
