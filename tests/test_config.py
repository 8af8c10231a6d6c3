"""Configuration: layering, coercion, validation, round trips, components that own their
options, presets as files, and configs and runs of the old flat layout."""

import json
import shutil
from pathlib import Path

import pytest

from vaelab import config as c
from vaelab.errors import ConfigError


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "pytorch-example"\n[train]\nepochs = 3\nlr = 0.01\n')
    cfg = c.resolve(file=path, extra={"train": {"epochs": 5}}, overrides=["train.epochs=7"])
    assert cfg.preset == "pytorch-example"
    assert cfg.model.options.hidden == (400,) and cfg.model.latent_dim == 20  # the preset
    assert cfg.train.lr == 0.01  # from the file
    assert cfg.train.epochs == 7  # --set wins over named flags and the file


def test_presets_describe_the_published_setups():
    pt = c.resolve(preset="pytorch-example")
    assert (pt.model.options.hidden, pt.model.latent_dim, pt.model.activation) == (
        (400,), 20, "relu")
    assert (pt.train.batch_size, pt.train.lr) == (128, 1e-3)
    assert pt.likelihood.options.unnormalized and pt.data.binarize == "none"
    keras = c.resolve(preset="keras-example")
    assert (keras.model.options.hidden, keras.model.latent_dim) == ((512,), 2)
    iwae = c.resolve(preset="iwae-paper")
    assert (iwae.model.options.hidden, iwae.model.latent_dim, iwae.model.activation) == (
        (200, 200), 50, "tanh")
    assert (iwae.train.batch_size, iwae.train.lr_schedule, iwae.data.binarize) == (
        20, "iwae", "dynamic")


@pytest.mark.parametrize("preset", sorted(c.PRESETS))
def test_toml_round_trip(preset):
    cfg = c.resolve(preset=preset, overrides=["likelihood.name=gaussian",
                                              "likelihood.scale=0.25", "train.patience=3"]
                    if preset in ("iwae-paper", "default") else [])
    assert c.from_dict(c.tomllib.loads(c.to_toml(cfg))) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.width=3", r"unknown config key model.width: valid keys in \[model\] are "
                          r"activation, encoder_scale, init, kind, latent_dim, output_bias and "
                          r"the \[model.<kind>\] options of each model"),
        ("optim.lr=3", r"unknown config section \[optim\]: valid sections are data"),
        ("train.epochs=0", "train.epochs must be positive, got 0: give a value > 0"),
        ("train.batch_size=-4", "train.batch_size must be positive, got -4"),
        ("model.latent_dim=0", "model.latent_dim must be positive"),
        ("eval.iw_samples=0", "eval.auto.samples must be positive, got 0"),
        ("eval.auto.samples=0", "eval.auto.samples must be positive, got 0"),
        ("objective.samples=0", "objective.samples must be positive"),
        ("objective.beta=-0.5", r"objective.beta must be >= 0, got -0.5: give a value >= 0"),
        ("train.epochs=ten", "train.epochs = 'ten' is not a valid int"),
        ("train.lr=nan", "train.lr = 'nan' is not a valid float"),
        ("data.binarize=maybe", "data.binarize must be one of none, dynamic, static, got "
                                "'maybe'"),
        ("model.hidden=400,-1", r"model.mlp.hidden sizes must be positive, got \[400, -1\]: "
                                "give layer sizes > 0"),
        ("prior.name=flat", "unknown prior 'flat': choose one of mog, normal, vampprior"),
        ("prior.components=5", "prior.components is an option of the mog and vampprior "
                               "priors, not of 'normal': set prior.mog.components"),
        ("prior.flat.components=5", r"\[prior.flat\]: unknown prior 'flat': choose one of "
                                    "mog, normal, vampprior"),
        ("prior.vampprior.componets=5", r"unknown config key prior.vampprior.componets: valid "
                                        r"keys in \[prior.vampprior\] are components"),
        ("model.options=3", "unknown config key model.options"),
        ("a.b.c.d=1", "give section.key=value or section.kind.key=value"),
        ("latent_dim=3", "is not of the form section.key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        c.resolve(overrides=[override])
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tf': choose one of cifar10, default, "):
        c.resolve(preset="tf")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        c.resolve(file=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        c.resolve(file=bad)


# --------------------------------------------------------------------------- components


def test_switching_a_components_kind_needs_no_unsetting():
    """Issue 22: --preset mnist-vampprior --set prior.name=normal (the README's standard-prior
    row) used to fail with 'the normal prior has no components: unset prior.components'."""
    cfg = c.resolve(preset="mnist-vampprior", overrides=["prior.name=normal"])
    assert cfg.prior.name == "normal" and cfg.prior.options == c.kind_options("prior", "normal")()
    assert "vampprior" not in c.to_dict(cfg)["prior"]  # only the chosen kind is saved
    back = c.resolve(preset="mnist-vampprior")
    assert back.prior.options.components == 500
    # and back again: the kind's options come from its own section
    cfg = c.resolve(preset="mnist-vampprior", overrides=["prior.name=mog"])
    assert cfg.prior.options.components == 10  # mog's default, not the VampPrior's 500
    cfg = c.resolve(overrides=["model.kind=conv", "model.mlp.hidden=7", "model.conv.blocks=1"])
    assert cfg.model.options.blocks == 1 and cfg.model.options.hidden == (512, 256)
    # only the chosen kind's values are checked (another's keys are, against typos)
    cfg = c.resolve(overrides=["prior.vampprior.components=0"])
    with pytest.raises(ConfigError, match="prior.vampprior.components must be positive"):
        c.resolve(overrides=["prior.vampprior.components=0", "prior.name=vampprior"])


def test_a_flat_option_is_the_chosen_kinds():
    cfg = c.resolve(overrides=["prior.name=vampprior", "prior.components=50",
                               "model.hidden=400", "eval.iw_samples=7"])
    assert cfg.prior.options.components == 50 and cfg.model.options.hidden == (400,)
    assert cfg.eval.options.samples == 7
    cfg = c.resolve(overrides=["model.kind=conv", "model.hidden=[]", "model.channels=8,16"])
    assert cfg.model.options.hidden == () and cfg.model.options.channels == (8, 16)


def test_every_preset_file_cites_its_source():
    assert set(c.PRESETS) == set(c.PRESET_SOURCES) == {
        p.stem for p in c.PRESETS_DIR.glob("*.toml")}
    for name in c.PRESETS:
        text = (c.PRESETS_DIR / f"{name}.toml").read_text()
        assert text.startswith("# ") and c.PRESET_SOURCES[name]
        c.resolve(preset=name)  # every preset resolves


def test_the_kl_modes_are_the_objectives():
    from vaelab import objectives

    assert c.KL_MODES == objectives.KL_MODES


#: A run's config.toml as vaelab 0.1.0 wrote it before components owned their options (flat
#: keys, every field written): it must still load, resume and evaluate.
OLD_FORMAT = """preset = "mnist-vampprior"

[data]
dataset = "mnist"
binarize = "static"
validation_size = 10000
channels = "auto"
layout = "auto"
cache = true

[likelihood]
name = "bernoulli"
unnormalized = false

[model]
kind = "mlp"
latent_dim = 40
hidden = [300, 300]
activation = "relu"
channels = [32, 64]
blocks = 0
encoder_scale = "logvar-hardtanh"
output_bias = "none"
init = "he"
gated = true

[prior]
name = "vampprior"
components = 500

[objective]
kind = "elbo"
samples = 1
beta = 1.0
warmup_steps = 0
warmup_epochs = 100
free_bits = 0.0
kl = "auto"

[train]
epochs = 2000
batch_size = 100
optimizer = "rmsprop"
lr = 0.0001
lr_schedule = "multistep"
lr_milestones = [200, 350, 500, 750, 1000]
lr_gamma = 0.6309573444801932
seed = 0
device = "auto"
eval_batch_size = 1000
validation_split = "validation"
select = "best"

[eval]
iw_samples = 5000
batch_size = 100
seed = 0
"""


def test_a_config_of_the_old_format_is_migrated_when_read():
    old = c.tomllib.loads(OLD_FORMAT)
    cfg = c.from_dict(old, saved=True)
    # (the preset trains on Larochelle's file now, and estimates with auto; this run used the
    # seeded draw of MNIST and importance sampling, as vaelab 0.1.0 did)
    assert cfg == c.resolve(preset="mnist-vampprior", overrides=[
        "data.dataset=mnist", "eval.estimator=is", "eval.is.samples=5000"])
    # a user's config in the old layout is read too, but an option the kind does not have
    # is an error there (it was one before: "the normal prior has no components")
    with pytest.raises(ConfigError, match="model.channels is an option of the conv model"):
        c.from_dict(old)


OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"


@pytest.mark.usefixtures("fashion_available")
def test_a_run_of_the_old_format_evaluates_and_resumes(tmp_path, capsys):
    """A run written by vaelab 0.1.0 before components owned their options (written by that
    version: tests/data/run-0.1.0, a 784-8-2 MLP after one epoch on 64 Fashion-MNIST
    images): its config is migrated when read, it evaluates, and it resumes."""
    from vaelab import cli

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    saved = (run / "config.toml").read_text()
    assert "hidden = [" in saved and "[model.mlp]" not in saved  # the old, flat layout
    assert cli.main(["eval", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_examples"] == 10_000 and report["checkpoint_epoch"] == 1
    assert report["estimator"]["name"] == "is" and report["iw_samples"] == 5  # eval.iw_samples
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-report"]) == 0
    assert "resumed" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    cfg = c.from_dict(c.tomllib.loads((run / "config.toml").read_text()))  # new layout
    assert cfg.model.options.hidden == (8,) and cfg.eval.options.samples == 5
