"""probe() on real Keras 3 code (torch backend), when the keras extra is installed."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 not installed: pip install 'vaelab[keras]'")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, not torch: set KERAS_BACKEND=torch",
                allow_module_level=True)

from keras import ops  # noqa: E402

from vaelab.audit import probe  # noqa: E402
from vaelab.audit.presets import audit_preset  # noqa: E402
from vaelab.cli import main  # noqa: E402


def keras_io_train_step_loss(data, reconstruction, z_mean, z_log_var):
    """keras-io examples/generative/vae.py, VAE.train_step, written with keras.ops."""
    reconstruction_loss = ops.mean(
        ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2)))
    kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
    kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
    return reconstruction_loss + kl_loss


def test_keras_io_code_audits_like_its_preset():
    a = probe(keras_io_train_step_loss, data_shape=(28, 28, 1), latent_dim=2)
    preset = audit_preset("keras-io-vae")
    for name in ("scale", "beta_effective", "batch_reduction", "from_logits", "epsilon",
                 "epsilon_where", "recon", "missing_constant_nats"):
        assert getattr(a, name) == getattr(preset, name), name
    assert a.observations[0].startswith("framework keras")
    # Keras 3's ops.mean computes float64 in float32: the probe says it matched to 1e-5
    assert any(o.startswith("precision: everything holds to 1e-05") for o in a.observations)


def test_keras_binary_crossentropy_alone_averages_the_last_axis():
    a = probe(keras.losses.binary_crossentropy, data_shape=(784,), latent_dim=2,
              roles=("x", "x_hat"))
    assert (a.batch_reduction, a.recon_reduction, a.recon_multiplier) == ("none", "mean", 1.0)
    assert a.epsilon == pytest.approx(1e-7) and a.epsilon_where == "clip" and not a.kl_term
    assert "the ELBO needs w = 1/784 (or: multiply this loss by 784" in a.text


def test_keras_from_logits_is_read_as_logits():
    a = probe(keras.losses.binary_crossentropy, data_shape=(10,), latent_dim=2,
              roles=("x", "x_hat"), from_logits=True)
    assert a.from_logits and a.epsilon_where == "stable" and a.epsilon is None


def test_cli_module_function_spec(capsys):
    assert main(["audit", "--loss", "keras.losses:binary_crossentropy"]) == 0
    out = capsys.readouterr().out
    assert "binary_crossentropy(x, x_hat) [roles from the parameter names]" in out
    assert "1 x binary cross-entropy averaged over 784 data dims, no KL term" in out


def test_keras_loss_on_images_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"returns shape \(4, 28\).*data_shape \(784,\)"):
        probe(keras.losses.mean_squared_error, data_shape=(28, 28), latent_dim=2,
              roles=("x", "x_hat"))
