"""Configuration: layering, coercion, validation and round trips."""

import pytest

from vaelab import config as c
from vaelab.errors import ConfigError


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "pytorch-example"\n[train]\nepochs = 3\nlr = 0.01\n')
    cfg = c.resolve(file=path, extra={"train": {"epochs": 5}}, overrides=["train.epochs=7"])
    assert cfg.preset == "pytorch-example"
    assert cfg.model.hidden == (400,) and cfg.model.latent_dim == 20  # from the preset
    assert cfg.train.lr == 0.01  # from the file
    assert cfg.train.epochs == 7  # --set wins over named flags and the file


def test_presets_describe_the_published_setups():
    pt = c.resolve(preset="pytorch-example")
    assert (pt.model.hidden, pt.model.latent_dim, pt.model.activation) == ((400,), 20, "relu")
    assert (pt.train.batch_size, pt.train.lr) == (128, 1e-3)
    assert pt.likelihood.unnormalized and pt.data.binarize == "none"
    keras = c.resolve(preset="keras-example")
    assert (keras.model.hidden, keras.model.latent_dim) == ((512,), 2)
    iwae = c.resolve(preset="iwae-paper")
    assert (iwae.model.hidden, iwae.model.latent_dim, iwae.model.activation) == (
        (200, 200), 50, "tanh")
    assert (iwae.train.batch_size, iwae.train.lr_schedule, iwae.data.binarize) == (
        20, "iwae", "dynamic")


def test_toml_round_trip():
    cfg = c.resolve(preset="iwae-paper", overrides=["likelihood.scale=0.25", "train.patience=3"])
    text = c.to_toml(cfg)
    import tomllib

    assert c.from_dict(tomllib.loads(text)) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.width=3", r"unknown config key model.width: valid keys in \[model\] are kind"),
        ("optim.lr=3", r"unknown config section \[optim\]: valid sections are data"),
        ("train.epochs=0", "train.epochs must be positive, got 0"),
        ("train.batch_size=-4", "train.batch_size must be positive, got -4"),
        ("model.latent_dim=0", "model.latent_dim must be positive"),
        ("eval.iw_samples=0", "eval.iw_samples must be positive"),
        ("objective.samples=0", "objective.samples must be positive"),
        ("objective.beta=-0.5", r"objective.beta must be >= 0, got -0.5"),
        ("train.epochs=ten", "train.epochs = 'ten' is not a valid int"),
        ("train.lr=nan", "train.lr = 'nan' is not a valid float"),
        ("data.binarize=maybe", "data.binarize = 'maybe' is not one of none, dynamic, static"),
        ("model.hidden=400,-1", r"model.hidden sizes must be positive"),
        ("latent_dim=3", "is not of the form section.key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        c.resolve(overrides=[override])
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tf': choose one of default, "):
        c.resolve(preset="tf")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        c.resolve(file=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        c.resolve(file=bad)
