"""vaelab.keras on Keras 3's torch backend: each term against float64 math and
torch.distributions, the metrics' weighting of a short last batch, the NLL against closed
form (PPCA) and against vaelab's estimator, the Keras example trained here and handed to
vaelab, bad inputs; the JAX backend in a subprocess when jax is installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 not installed: pip install 'vaelab[keras]'")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, not torch: set KERAS_BACKEND=torch",
                allow_module_level=True)

from keras import layers, ops  # noqa: E402

from ppca import PPCA, SIGMA, D  # noqa: E402
from vaelab import compat, config, hub, objectives, plots, runs  # noqa: E402
from vaelab import keras as vk  # noqa: E402
from vaelab.audit import explain  # noqa: E402
from vaelab.cli import main  # noqa: E402
from vaelab.errors import CheckpointError, ConfigError, DataError  # noqa: E402

# Keras' torch backend converts tensors with np.array(x), which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _np(t) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(t))


def _t(a) -> object:
    return ops.convert_to_tensor(np.asarray(a))


# --------------------------------------------------------------------------- the terms


def test_bernoulli_from_logits_is_torch_bernoulli_summed_over_every_data_dim():
    g = np.random.default_rng(0)
    x = (g.random((5, 3, 4)) < 0.5).astype(np.float64)
    logits = g.normal(0.0, 4.0, (5, 3, 4))
    logits[0, 0, 0], logits[1, 0, 0], x[0, 0, 0], x[1, 0, 0] = 60.0, -60.0, 0.0, 1.0
    got = _np(vk.bernoulli_log_likelihood(_t(x), _t(logits)))
    ref = torch.distributions.Bernoulli(logits=torch.tensor(logits)).log_prob(
        torch.tensor(x)).sum((1, 2)).numpy()
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-10)  # exact at logit +-60
    # mixed precision: float16 outputs are summed in float32
    half = vk.bernoulli_log_likelihood(x.astype(np.float16), logits.astype(np.float16))
    assert keras.backend.standardize_dtype(half.dtype) == "float32"
    ref16 = torch.distributions.Bernoulli(logits=torch.tensor(logits.astype(np.float16),
                                                              dtype=torch.float64))
    np.testing.assert_allclose(_np(half), ref16.log_prob(torch.tensor(x)).sum((1, 2)).numpy(),
                               rtol=1e-6)


def test_bernoulli_from_probabilities_is_keras_own_clipped_bce_times_d():
    g = np.random.default_rng(1)
    x = (g.random((4, 6)) < 0.5).astype(np.float32)
    p = g.random((4, 6)).astype(np.float32)
    x[0, :2], p[0, :2] = [1.0, 0.0], [0.0, 1.0]  # hopeless: clipped at 1e-7
    got = -_np(vk.bernoulli_log_likelihood(x, p, from_logits=False))
    keras_loss = 6 * _np(keras.losses.binary_crossentropy(x, p))  # Keras' mean over 6
    np.testing.assert_allclose(got, keras_loss, rtol=2e-6)
    np.testing.assert_allclose(got, 6 * compat.keras_binary_crossentropy(x, p).numpy(),
                               rtol=2e-6)
    one = -_np(vk.bernoulli_log_likelihood(np.ones((1, 1), np.float32),
                                           np.zeros((1, 1), np.float32), from_logits=False))
    assert one[0] == pytest.approx(-math.log(1e-7), abs=1e-4)  # 16.118: the clip's cost


def test_gaussian_fixed_learned_and_per_pixel_are_torch_normal_with_the_constant():
    g = np.random.default_rng(2)
    x, mean, raw = (g.random((3, 5)) for _ in range(3))
    raw = raw * 4 - 2
    tx, tm = torch.tensor(x), torch.tensor(mean)

    def ref(sigma):
        return torch.distributions.Normal(tm, sigma).log_prob(tx).sum(1).numpy()

    got = _np(vk.gaussian_log_likelihood(_t(x), _t(mean), sigma=0.3))
    np.testing.assert_allclose(got, ref(0.3), rtol=1e-12)
    sigma = torch.tensor(g.random((3, 5)) + 0.1)
    got = _np(vk.gaussian_log_likelihood(_t(x), _t(mean), log_sigma=_t(sigma.log().numpy())))
    np.testing.assert_allclose(got, ref(sigma), rtol=1e-12)
    # "MSE" is a Gaussian with sigma^2 = 1/2 without its constant D/2 log(pi)
    sse = ((x - mean) ** 2).sum(1)
    got = _np(vk.gaussian_log_likelihood(_t(x), _t(mean), sigma=math.sqrt(0.5)))
    np.testing.assert_allclose(-got, sse + 5 / 2 * math.log(math.pi), rtol=1e-12)

    learned = vk.Gaussian("learned", init_scale=0.3, min_scale=1e-3)
    assert learned.sigma() == pytest.approx(0.3)
    learned.log_scale.assign(math.log(0.2))
    assert learned.sigma() == pytest.approx(0.201)
    np.testing.assert_allclose(_np(learned.log_prob(x.astype(np.float32),
                                                    mean.astype(np.float32))),
                               ref(0.201), rtol=1e-5)
    per_pixel = vk.Gaussian("per-pixel", min_scale=1e-2)
    outputs = np.concatenate([mean, raw], axis=1)  # the means, then the raw scales
    np.testing.assert_allclose(_np(per_pixel.log_prob(_t(x), _t(outputs))),
                               ref(torch.nn.functional.softplus(torch.tensor(raw)) + 1e-2),
                               rtol=1e-12)
    # the same parameterisations as vaelab's gaussian likelihood (what to_vaelab relies on)
    for lik, out in ((learned, mean), (per_pixel, outputs)):
        family = lik.vaelab_family()
        ours = _np(lik.log_prob(x.astype(np.float32), out.astype(np.float32)))
        theirs = family(torch.tensor(out, dtype=torch.float32)).log_prob(
            torch.tensor(x, dtype=torch.float32)).detach().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_gaussian_kl_is_torch_kl_summed_over_latent_dims():
    g = np.random.default_rng(3)
    mean, log_var = g.normal(size=(4, 3)), g.normal(size=(4, 3))
    got = _np(vk.gaussian_kl(_t(mean), _t(log_var)))
    q = torch.distributions.Normal(torch.tensor(mean), torch.tensor(log_var / 2).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12)


def _batch(seed: int = 4, b: int = 6, d: int = 8, latent: int = 3):
    g = np.random.default_rng(seed)
    x = (g.random((b, d)) < 0.4).astype(np.float32)
    return (x, g.normal(size=(b, d)).astype(np.float32),
            g.normal(size=(b, latent)).astype(np.float32),
            g.normal(size=(b, latent)).astype(np.float32))


def test_elbo_loss_adds_the_warmed_up_objective_and_logs_the_beta_one_terms():
    x, logits, z_mean, z_log_var = _batch()
    layer = vk.ELBOLoss(vk.Bernoulli(), beta=2.0, warmup_steps=4)
    terms = vk.nelbo_terms(x, logits, z_mean, z_log_var, layer.likelihood)
    recon, kl = _np(terms.recon), _np(terms.kl)
    np.testing.assert_allclose(_np(terms.nelbo), recon + kl, rtol=1e-6)
    for step in range(6):  # vaelab's kl_weight: beta * min(1, step / warmup_steps)
        loss = _np(layer.objective(x, logits, z_mean, z_log_var, training=True))
        weight = objectives.kl_weight(step, 2.0, 4)
        assert loss == pytest.approx(np.mean(recon + weight * kl), rel=1e-6), step
    assert _np(layer.objective(x, logits, z_mean, z_log_var, training=False)) == \
        pytest.approx(np.mean(recon + 2.0 * kl), rel=1e-6)  # evaluation does not count
    assert float(_np(layer.step)) == 6
    # the metrics are the beta = 1 terms, per example
    assert float(_np(layer.nelbo_metric.result())) == pytest.approx(np.mean(recon + kl), 1e-6)
    assert float(_np(layer.kl_metric.result())) == pytest.approx(np.mean(kl), rel=1e-6)
    out = layer([x, logits, z_mean, z_log_var])
    np.testing.assert_array_equal(_np(out), logits)  # the outputs pass through


# --------------------------------------------------------------------------- metrics


def test_per_example_mean_weighs_a_short_last_batch_by_its_examples():
    values = np.array([1.0, 2.0, 3.0, 4.0, 20.0], np.float32)
    metric = vk.PerExampleMean(name="nelbo")
    metric.update_state(values[:4])
    metric.update_state(values[4:])
    assert float(_np(metric.result())) == pytest.approx(6.0)  # 30 / 5
    assert (values[:4].mean() + values[4]) / 2 == pytest.approx(11.25)  # batch means: wrong
    with pytest.raises(DataError, match=r"one value per example, \(B,\), not a batch mean"):
        metric.update_state(np.float32(3.0))


def _deterministic_parts():
    """x (5 examples, the last unlike the others) and a model whose z is its mean: the
    NELBO of each example is known without noise."""
    x = np.zeros((5, 4), np.float32)
    x[4] = 1.0
    inputs = keras.Input((4,))
    z_mean = layers.Dense(2, kernel_initializer="zeros", bias_initializer="zeros")(inputs)
    z_log_var = layers.Dense(2, kernel_initializer="zeros",
                             bias_initializer=keras.initializers.Constant(-0.5))(inputs)
    logits = layers.Dense(4, bias_initializer=keras.initializers.Constant(-3.0))(z_mean)
    return x, inputs, logits, z_mean, z_log_var


def test_fit_and_evaluate_average_over_examples_functional_and_mixin():
    x, inputs, logits, z_mean, z_log_var = _deterministic_parts()
    per_example = _np(vk.nelbo_terms(x, np.full((5, 4), -3.0, np.float32),
                                     np.zeros((5, 2), np.float32),
                                     np.full((5, 2), -0.5, np.float32), vk.Bernoulli()).nelbo)
    assert abs(per_example[:4].mean() / 2 + per_example[4] / 2 - per_example.mean()) > 3

    class VAE(vk.ELBOMixin, keras.Model):
        pass

    out = vk.ELBOLoss(vk.Bernoulli())([inputs, logits, z_mean, z_log_var])
    for model in (keras.Model(inputs, out),
                  VAE(inputs, [logits, z_mean, z_log_var], likelihood=vk.Bernoulli())):
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        result = model.evaluate(x, batch_size=4, return_dict=True, verbose=0)
        assert result["nelbo"] == pytest.approx(per_example.mean(), rel=1e-6)
        assert result["loss"] == pytest.approx(per_example.mean(), rel=1e-6)
        history = model.fit(x, batch_size=4, epochs=1, verbose=0).history
        assert history["nelbo"][0] == pytest.approx(per_example.mean(), rel=1e-6)


def test_mixin_subclassed_model_trains_with_beta():
    x = (np.random.default_rng(5).random((40, 12)) < 0.3).astype(np.float32)

    class VAE(vk.ELBOMixin, keras.Model):
        def __init__(self):
            super().__init__(likelihood=vk.Bernoulli(), beta=2.0)
            self.hidden = layers.Dense(8, activation="tanh")
            self.z_mean, self.z_log_var = layers.Dense(2), layers.Dense(2)
            self.sampling = vk.Sampling(seed=1)
            self.decoder = keras.Sequential([layers.Dense(8, activation="tanh"),
                                             layers.Dense(12)])

        def call(self, inputs):
            h = self.hidden(inputs)
            z_mean, z_log_var = self.z_mean(h), self.z_log_var(h)
            return self.decoder(self.sampling([z_mean, z_log_var])), z_mean, z_log_var

    keras.utils.set_random_seed(0)
    vae = VAE()
    vae.compile(optimizer="adam")
    logs = vae.fit(x, batch_size=16, epochs=2, verbose=0).history
    for e in range(2):  # the objective uses beta = 2; the reported NELBO beta = 1
        assert logs["loss"][e] == pytest.approx(logs["recon"][e] + 2 * logs["kl"][e], rel=1e-5)
        assert logs["nelbo"][e] == pytest.approx(logs["recon"][e] + logs["kl"][e], rel=1e-5)
    assert isinstance(vae.likelihood, vk.Bernoulli) and set(logs) == {"loss", "nelbo", "recon",
                                                                       "kl"}
    vae.compile(optimizer="adam", loss="mse")
    with pytest.raises(ConfigError, match="compiled with a loss"):
        vae.fit(x, batch_size=16, epochs=1, verbose=0)


def test_a_model_with_the_loss_layer_saves_and_loads(tmp_path):
    vae, _, _, likelihood = _example().build_vae(20, 8, 2, likelihood=vk.Gaussian("learned"),
                                                  seed=0)
    vae.compile(optimizer="adam")
    x = np.random.default_rng(0).random((32, 20)).astype(np.float32)
    vae.fit(x, epochs=1, verbose=0)
    assert likelihood.sigma() != pytest.approx(1.0)  # the learned sigma moved
    vae.save(tmp_path / "vae.keras")
    loaded = keras.models.load_model(tmp_path / "vae.keras")
    (layer,) = [la for la in loaded.layers if isinstance(la, vk.ELBOLoss)]
    assert isinstance(layer.likelihood, vk.Gaussian)
    assert layer.likelihood.sigma() == pytest.approx(likelihood.sigma(), rel=1e-6)
    assert set(loaded.evaluate(x, verbose=0, return_dict=True)) == {"loss", "nelbo", "recon",
                                                                     "kl"}


# --------------------------------------------------------------------------- the NLL


def _ppca_parts(ppca: PPCA):
    def encoder(x):
        mean, cov = ppca.posterior(torch.as_tensor(x).double())
        log_var = cov.diagonal().log().expand_as(mean)
        return mean.float(), log_var.float()

    def decoder(z):
        return (torch.as_tensor(z).double() @ ppca.w.T + ppca.mu).float()

    return encoder, decoder


def test_nll_is_exact_with_the_exact_posterior_ppca():
    ppca = PPCA("exact")
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    encoder, decoder = _ppca_parts(ppca)
    result = vk.importance_sampled_nll(encoder, decoder, x.numpy().astype(np.float32), 7,
                                       likelihood=vk.Gaussian(SIGMA), batch_size=8)
    exact = -ppca.log_px(x).numpy()
    np.testing.assert_allclose(result.nll, exact, atol=2e-4)  # float32 weights, any K
    np.testing.assert_allclose(result.ess, 7.0, rtol=1e-3)
    assert result.mean == pytest.approx(exact.mean(), abs=2e-4)
    assert result.stderr == pytest.approx(exact.std(ddof=1) / math.sqrt(30), rel=1e-3)
    assert result.num_examples == 30 and "K = 7, 30 examples" in str(result)


# --------------------------------------------------------------------------- the example


def _example():
    spec = importlib.util.spec_from_file_location("keras_vae_example",
                                                  ROOT / "examples" / "keras_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained():
    """The example, trained by Keras (torch backend) for 2 epochs on 512 statically
    binarised Fashion-MNIST images (hidden 64 instead of 512). To keep the test short only
    the test split is decoded: the first 200 images are the test data (as ``vaelab eval``
    of the saved run reads them), the next 512 the training data."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed in {FASHION} "
                    "(apt-get install dataset-fashion-mnist)")
    from vaelab.data import load

    example = _example()
    test = load("fashion-mnist", split="test", binarize="static", seed=0, progress=False)
    x = test.batch(torch.arange(712)).reshape(712, -1).numpy()
    x_train, x_test = x[200:], x[:200]
    keras.utils.set_random_seed(0)
    vae, encoder, decoder, likelihood = example.build_vae(784, 64, 2, seed=0)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    nll = vk.ImportanceSampledNLL(x_test[:50], encoder=encoder, decoder=decoder,
                                  likelihood=likelihood, num_samples=20, print_fn=None)
    history = vae.fit(x_train, epochs=2, batch_size=64, validation_data=(x_test, None),
                      callbacks=[nll], verbose=0)
    return dict(x_test=x_test, encoder=encoder, decoder=decoder, likelihood=likelihood,
                history=history, nll=nll.result,
                model=vk.to_vaelab(encoder, decoder, likelihood, event_shape=(1, 28, 28)))


def test_example_logs_nats_per_example_and_learns(trained):
    logs = trained["history"].history
    for prefix in ("", "val_"):
        for e in range(2):
            assert logs[f"{prefix}nelbo"][e] == pytest.approx(
                logs[f"{prefix}recon"][e] + logs[f"{prefix}kl"][e], rel=1e-5)
            assert logs[f"{prefix}loss"][e] == pytest.approx(logs[f"{prefix}nelbo"][e], 1e-5)
    assert logs["val_nelbo"][1] < logs["val_nelbo"][0]
    assert trained["nll"].num_samples == 20 and trained["nll"].num_examples == 50


def test_example_nelbo_equals_vaelab_nelbo_for_the_same_weights_and_noise(trained):
    x, encoder, decoder = trained["x_test"], trained["encoder"], trained["decoder"]
    eps = np.random.default_rng(7).standard_normal((len(x), 2)).astype(np.float32)
    z_mean, z_log_var, _ = encoder(x)
    z = z_mean + ops.exp(0.5 * z_log_var) * ops.convert_to_tensor(eps)
    ours = _np(vk.nelbo_terms(x, decoder(z), z_mean, z_log_var, trained["likelihood"]).nelbo)
    with torch.no_grad():
        terms = objectives.elbo_terms(trained["model"], torch.from_numpy(x).view(-1, 1, 28, 28),
                                      eps=torch.from_numpy(eps)[None])
    theirs = (-terms.elbo).numpy()
    assert np.max(np.abs(ours - theirs)) <= 2e-6 * np.max(np.abs(theirs))  # float32 rounding


def test_example_nll_agrees_with_vaelab_importance_sampling(trained):
    x = trained["x_test"]
    ours = vk.importance_sampled_nll(trained["encoder"], trained["decoder"], x, 100,
                                     likelihood=trained["likelihood"], seed=1)
    ll = objectives.log_likelihood(trained["model"], torch.from_numpy(x).view(-1, 1, 28, 28),
                                   100, generator=torch.Generator().manual_seed(1))
    assert abs(ours.mean + ll.mean) <= math.hypot(ours.stderr, ll.stderr)
    # stricter: the same examples, so the paired difference is Monte-Carlo noise only
    diff = ours.nll + ll.per_example.numpy()
    assert abs(diff.mean()) <= 4 * diff.std(ddof=1) / math.sqrt(len(diff))


def test_save_run_opens_in_vaelab_eval(trained, tmp_path, capsys):
    run = vk.save_run(trained["encoder"], trained["decoder"], trained["likelihood"],
                      tmp_path / "keras-run", event_shape=(1, 28, 28),
                      data={"dataset": "fashion-mnist", "binarize": "static"},
                      history=trained["history"], validation_split="test")
    opened = runs.open_run(run)
    toml = (run / "config.toml").read_text()
    assert toml.startswith("# Weights trained by Keras") and "[train] is vaelab's default" in toml
    assert config.from_dict(config.load_toml(run / "config.toml")) == opened.config
    assert opened.meta["trained_with"]["framework"] == "keras" and opened.epoch == 2
    for key, value in trained["model"].state_dict().items():
        torch.testing.assert_close(opened.model.state_dict()[key], value, rtol=0, atol=0)
    records = plots.read_metrics(run)
    assert records[1]["test_nelbo"] == pytest.approx(trained["history"].history["val_nelbo"][1])
    assert records[1]["train_kl"] == pytest.approx(trained["history"].history["kl"][1])
    assert opened.config.train.validation_split == "test"
    out = tmp_path / "report.json"
    assert main(["eval", str(run), "--estimator", "is", "--iw-samples", "20", "--limit", "50",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # a Keras-trained run is not labelled with a vaelab preset or precision
    assert report["trained_with"]["framework"] == "keras"
    assert report["preset"] is None and report["training_precision"] is None
    table = capsys.readouterr().out
    assert re.search(rf"trained with +Keras {re.escape(keras.__version__)} \(torch backend\)",
                     table) and "\npreset " not in table
    card = (hub.export_run(run, tmp_path / "exported", report=out) / "README.md").read_text()
    assert f"trained with Keras {keras.__version__} (torch backend) and evaluated" in card
    assert "| preset |" not in card
    keras_nll = trained["nll"]  # the callback's: K = 20 on the same 50 test images
    assert abs(report["nll"] - keras_nll.mean) <= math.hypot(report["nll_stderr"],
                                                             keras_nll.stderr)
    with pytest.raises(CheckpointError, match="already holds a run"):
        vk.save_run(trained["encoder"], trained["decoder"], trained["likelihood"], run,
                    data={"dataset": "fashion-mnist"})


# --------------------------------------------------------------------------- to vaelab


def _tiny(likelihood, out_units: int, last: str | None = None, hidden=(8,), dec_hidden=None):
    inputs = keras.Input((6,))
    h = inputs
    for units in hidden:
        h = layers.Dense(units, activation="tanh")(h)
    z_mean, z_log_var = layers.Dense(2)(h), layers.Dense(2)(h)
    encoder = keras.Model(inputs, [z_mean, z_log_var])
    latent = keras.Input((2,))
    h = latent
    for units in (hidden[::-1] if dec_hidden is None else dec_hidden):
        h = layers.Dense(units, activation="tanh")(h)
    decoder = keras.Model(latent, layers.Dense(out_units, activation=last)(h))
    return encoder, decoder


@pytest.mark.parametrize("make, out, last", [
    (lambda: vk.Bernoulli(), 6, None),
    (lambda: vk.Bernoulli(output="probs"), 6, "sigmoid"),
    (lambda: vk.Gaussian(0.3), 6, None),
    (lambda: vk.Gaussian("learned", init_scale=0.4), 6, None),
    (lambda: vk.Gaussian("per-pixel"), 12, None),
], ids=["logits", "probs", "fixed", "learned", "per-pixel"])
def test_to_vaelab_keeps_the_nelbo_of_every_likelihood(make, out, last):
    keras.utils.set_random_seed(1)
    likelihood = make()
    encoder, decoder = _tiny(likelihood, out, last)
    if likelihood.family == "gaussian" and likelihood.scale == "learned":
        likelihood.log_scale.assign(-1.3)
    g = np.random.default_rng(8)
    x = g.random((5, 6)).astype(np.float32)
    if likelihood.family == "bernoulli":
        x = (x < 0.5).astype(np.float32)
    model = vk.to_vaelab(encoder, decoder, likelihood)
    eps = g.standard_normal((5, 2)).astype(np.float32)
    z_mean, z_log_var = encoder(x)
    z = z_mean + ops.exp(0.5 * z_log_var) * ops.convert_to_tensor(eps)
    ours = _np(vk.nelbo_terms(x, decoder(z), z_mean, z_log_var, likelihood).nelbo)
    with torch.no_grad():
        theirs = -objectives.elbo_terms(model, torch.from_numpy(x),
                                        eps=torch.from_numpy(eps)[None]).elbo.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_to_vaelab_refuses_what_its_mlp_does_not_express():
    enc, dec = _tiny(vk.Bernoulli(), 6, "sigmoid")
    with pytest.raises(ConfigError, match="activation 'sigmoid' but Bernoulli reads linear"):
        vk.to_vaelab(enc, dec, vk.Bernoulli())
    enc, dec = _tiny(vk.Bernoulli(), 6, None, hidden=(8,), dec_hidden=(5,))
    with pytest.raises(ConfigError, match="not the encoder's .* reversed"):
        vk.to_vaelab(enc, dec, vk.Bernoulli())
    inputs = keras.Input((6,))
    h = layers.BatchNormalization()(layers.Dense(8, activation="tanh")(inputs))
    enc = keras.Model(inputs, [layers.Dense(2)(h), layers.Dense(2)(h)])
    with pytest.raises(ConfigError, match="BatchNormalization layer"):
        vk.to_vaelab(enc, dec, vk.Bernoulli())


# --------------------------------------------------------------------------- the audit


def test_the_audit_ends_with_a_keras_line_that_computes_the_nelbo():
    x, logits, z_mean, z_log_var = _batch()
    probs = _np(ops.sigmoid(logits))
    text = explain("bce", "mean", kl_reduction="mean", latent_dim=3, data_shape=(8,)).text
    made = []

    class Recording(vk.ELBOLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    space = {"ELBOLoss": Recording, "Bernoulli": vk.Bernoulli, "x": x, "x_hat": probs,
             "z_mean": z_mean, "z_log_var": z_log_var}
    exec(text.splitlines()[-1].strip(), space)
    nelbo = _np(vk.nelbo_terms(x, probs, z_mean, z_log_var, vk.Bernoulli(output="probs")).nelbo)
    assert float(_np(made[0].nelbo_metric.result())) == pytest.approx(nelbo.mean(), rel=1e-6)
    # ... which is 784-style: D x Keras' mean BCE + the summed KL
    bce = 8 * _np(keras.losses.binary_crossentropy(x, probs))
    np.testing.assert_allclose(nelbo, bce + _np(vk.gaussian_kl(z_mean, z_log_var)), rtol=1e-5)


# --------------------------------------------------------------------------- bad inputs


BAD = [
    (lambda: vk.Bernoulli(output="sigmoid"), ConfigError, "choose logits .* or probs"),
    (lambda: vk.Gaussian(scale=-1.0), ConfigError, "likelihood.gaussian"),
    (lambda: vk.ELBOLoss(vk.Bernoulli(), beta=-1.0), ConfigError, "beta must be >= 0"),
    (lambda: vk.ELBOLoss(vk.Bernoulli(), beta="2"), ConfigError, "beta must be a finite"),
    (lambda: vk.ELBOLoss(vk.Bernoulli(), warmup_steps=2.5), ConfigError,
     "warmup_steps must be a whole number"),
    (lambda: vk.ELBOLoss("bernoulli"), ConfigError, "vaelab.keras Bernoulli or Gaussian"),
    (lambda: vk.bernoulli_log_likelihood(np.ones((2, 4), np.float32),
                                         np.ones((2, 5), np.float32)),
     DataError, r"x has shape \(2, 4\) but outputs has shape \(2, 5\)"),
    (lambda: vk.bernoulli_log_likelihood(np.ones(4, np.float32), np.ones(4, np.float32)),
     DataError, r"pass a batch shaped \(B, \*event_shape\)"),
    (lambda: vk.gaussian_kl(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)),
     DataError, "z_mean has shape"),
    (lambda: vk.gaussian_log_likelihood(np.ones((2, 3)), np.ones((2, 3))), ConfigError,
     "give sigma or log_sigma"),
    (lambda: vk.Gaussian("per-pixel").log_prob(np.ones((2, 3), np.float32),
                                               np.ones((2, 5), np.float32)),
     DataError, "means then raw scales, 2 x 3"),
    (lambda: vk.Bernoulli().check(np.full((2, 3), 0.5, np.float32)), DataError,
     "needs 0/1 data but got 6 values strictly between 0 and 1, e.g. 0.5: binarise x"),
    (lambda: vk.Bernoulli(unnormalized=True).check(np.full((2, 3), 128.0, np.float32)),
     DataError, "look like 0..255 pixel values: divide by 255"),
    (lambda: vk.Bernoulli().check(np.full((2, 3), 1, np.uint8)), DataError,
     r"got uint8: convert 8-bit images with x.astype\('float32'\) / 255"),
    (lambda: vk.Gaussian().check(np.array([[0.0, np.nan]])), DataError, "1 NaN/Inf values"),
    (lambda: vk.importance_sampled_nll(None, None, np.ones((2, 3), np.float32), 10,
                                       likelihood=vk.Bernoulli(unnormalized=True)),
     ConfigError, "not a likelihood, so it has no NLL"),
    (lambda: vk.importance_sampled_nll(None, None, np.ones((2, 3), np.float32), 0,
                                       likelihood=vk.Bernoulli()),
     ConfigError, "num_samples must be a positive integer"),
    (lambda: vk.save_run(None, None, vk.Bernoulli(), "unused", data={}), ConfigError,
     "save_run needs data="),
]


@pytest.mark.parametrize("call, error, message", BAD, ids=[m[:30] for _, _, m in BAD])
def test_bad_inputs_fail_with_one_line_naming_the_fix(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_grey_levels_with_a_bernoulli_are_refused_at_the_first_batch():
    x, inputs, logits, z_mean, z_log_var = _deterministic_parts()
    out = vk.ELBOLoss(vk.Bernoulli())([inputs, logits, z_mean, z_log_var])
    model = keras.Model(inputs, out)
    model.compile(optimizer="sgd")
    with pytest.raises(DataError, match="strictly between 0 and 1.*binarise x once"):
        model.fit(x * 0.5 + 0.25, batch_size=4, epochs=1, verbose=0)


# --------------------------------------------------------------------------- JAX

JAX_SCRIPT = r"""
import json, sys
import numpy as np
import keras
from keras import layers, ops
from vaelab import keras as vk
from vaelab.errors import ConfigError
assert keras.backend.backend() == "jax"
args = json.loads(sys.argv[1])
x, logits, z_mean, z_log_var = (np.asarray(a, np.float32) for a in args["batch"])
terms = vk.nelbo_terms(x, logits, z_mean, z_log_var, vk.Bernoulli())
out = {"nelbo": np.asarray(terms.nelbo).tolist()}

class VAE(vk.ELBOMixin, keras.Model):
    pass

keras.utils.set_random_seed(0)
inputs = keras.Input((8,))
h = layers.Dense(8, activation="tanh")(inputs)
m, v = layers.Dense(3)(h), layers.Dense(3)(h)
encoder = keras.Model(inputs, [m, v])
zin = keras.Input((3,))
decoder = keras.Model(zin, layers.Dense(8)(layers.Dense(8, activation="tanh")(zin)))
vae = VAE(inputs, [decoder(vk.Sampling(seed=0)([m, v])), m, v], likelihood=vk.Bernoulli(),
          warmup_steps=2)
vae.compile(optimizer="adam")
logs = vae.fit(x, batch_size=4, epochs=2, verbose=0).history
out["logs"] = {k: [float(a) for a in v] for k, v in logs.items()}
out["steps"] = float(vae.elbo.step.numpy())
out["nll"] = vk.importance_sampled_nll(encoder, decoder, x, 50, likelihood=vk.Bernoulli()).mean
loss_layer = vk.ELBOLoss(vk.Bernoulli())([inputs, decoder(m), m, v])
plain = keras.Model(inputs, loss_layer)
plain.compile(optimizer="adam")
try:
    plain.fit(x, batch_size=4, epochs=1, verbose=0)
except ConfigError as err:
    out["refused"] = str(err)
print(json.dumps(out))
"""


def test_jax_backend_computes_the_same_terms_and_trains():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install jax): the JAX backend is not tested")
    batch = _batch()
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", JAX_SCRIPT,
                           json.dumps({"batch": [a.tolist() for a in batch]})],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    ours = _np(vk.nelbo_terms(*batch, vk.Bernoulli()).nelbo)
    np.testing.assert_allclose(out["nelbo"], ours, rtol=1e-6)
    logs = out["logs"]
    for e in range(2):
        assert logs["nelbo"][e] == pytest.approx(logs["recon"][e] + logs["kl"][e], rel=1e-5)
    assert out["steps"] == 4  # 6 examples in batches of 4, 2 epochs: the warm-up's count
    assert math.isfinite(out["nll"]) and out["nll"] > 0
    assert "use vaelab.keras.ELBOMixin" in out["refused"]
