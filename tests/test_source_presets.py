"""The ingredients that make a preset follow its source: probability outputs as Keras and
PyTorch compute them, evaluating on the test split every epoch with the last epoch kept, and
the keras-example / pytorch-example presets themselves."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides, train
from vaelab import compat, config, likelihoods
from vaelab.errors import ConfigError
from vaelab.evaluate import format_markdown


def _outputs():
    logits = torch.tensor([[-40.0, -17.0, -3.0, 0.0, 2.5, 16.5, 40.0]] * 2)
    x = torch.tensor([[0.0, 1.0, 0.25, 0.5, 1.0, 0.0, 1.0], [1.0, 0.0, 0.75, 0.5, 0.0, 1.0, 0.0]])
    return logits, x


def test_keras_probs_equal_keras_binary_crossentropy_times_d():
    logits, x = _outputs()
    family = likelihoods.get("bernoulli", unnormalized=True, output="keras-probs")
    got = family(logits).log_prob(x)
    # Keras 3: clip(sigmoid), BCE per element, mean over the last axis; the example x 784
    want = -logits.shape[1] * compat.keras_binary_crossentropy(x, torch.sigmoid(logits))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_torch_probs_equal_the_pytorch_example_loss():
    logits, x = _outputs()
    family = likelihoods.get("bernoulli", unnormalized=True, output="torch-probs")
    got = family(logits).log_prob(x)
    want = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # saturated outputs: log clamped at -100 (torch's rule), where logits give the exact value
    exact = likelihoods.get("bernoulli", unnormalized=True)(logits).log_prob(x)
    assert float((exact - got).abs().max()) > 1.0


def test_probability_outputs_stay_normalised_on_binary_data():
    logits = torch.linspace(-30, 30, 13).view(13, 1)  # 13 examples of one pixel
    for output in ("keras-probs", "torch-probs"):
        px = likelihoods.get("bernoulli", output=output)(logits)
        log_p0 = px.log_prob(torch.zeros(13, 1), validate=False)
        log_p1 = px.log_prob(torch.ones(13, 1), validate=False)
        total = torch.logaddexp(log_p0, log_p1)  # log (p(0) + p(1)) per example
        assert total.abs().max() < 1e-6, (output, total)


def test_unknown_output_is_a_one_line_error():
    with pytest.raises(ConfigError, match="likelihood.bernoulli.output must be one of logits, "
                                          "keras-probs, torch-probs, got 'probs'"):
        likelihoods.get("bernoulli", output="probs")


def test_selecting_on_test_data_is_refused():
    with pytest.raises(ConfigError, match="would be chosen on test data: set train.select=last"):
        config.resolve(overrides=["train.validation_split=test"])
    config.resolve(overrides=["train.validation_split=test", "train.select=last"])


@pytest.mark.parametrize("name, output, init, eps", [
    ("pytorch-example", "torch-probs", "torch", 1e-8),
    ("keras-example", "keras-probs", "glorot", 1e-7),
])
def test_example_presets_follow_their_sources(name, output, init, eps):
    cfg = config.resolve(preset=name)
    assert cfg.data.dataset == "mnist" and cfg.data.validation_size == 0
    assert (cfg.likelihood.options.output, cfg.model.init, cfg.model.output_bias) == (output, init, "none")
    assert cfg.train.adam_eps == eps and cfg.train.batch_size == 128
    assert (cfg.train.validation_split, cfg.train.select) == ("test", "last")


def test_every_preset_names_its_source():
    assert set(config.PRESET_SOURCES) == set(config.PRESETS)
    assert all(source.strip() for source in config.PRESET_SOURCES.values())


@pytest.mark.usefixtures("fashion_available")
def test_test_split_every_epoch_and_last_kept(tmp_path):
    cfg = config.resolve(overrides=tiny_overrides(**{
        "data.validation_size": 0, "train.validation_split": "test", "train.select": "last",
        "train.epochs": 3}))
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all("test_nelbo" in r and "val_nelbo" not in r for r in rows)
    assert summary["best_epoch"] == 3
    report = summary["report"]
    assert report["model_selection"] == "the last epoch" and report["checkpoint_epoch"] == 3
    assert (report["preset"], report["preset_source"]) == ("default", "vaelab's own defaults")
    assert "| preset | default (follows vaelab's own defaults) |" in format_markdown(report)
    # the report's test NELBO is the last epoch's per-epoch test NELBO (same z, same images;
    # other batch sizes, so float32 products may be blocked differently: 2^-20 relative, see
    # test_distributed.RTOL)
    assert report["nelbo"] == pytest.approx(rows[-1]["test_nelbo"], rel=2.0**-20)
