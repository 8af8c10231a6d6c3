"""The command line: help, audit output, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vaelab.cli import main


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; from vaelab.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for command in ["train", "eval", "plot", "sample", "audit"]:
        result = subprocess.run([sys.executable, "-m", "vaelab", command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage: vaelab " + command in result.stdout


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: fashion-mnist)" in out and "(default: bernoulli)" in out


def test_audit_keras_blog_case(capsys):
    assert main(["audit", "--recon", "bce", "--recon-reduction", "mean", "--kl-reduction",
                 "mean", "--data-shape", "784", "--latent-dim", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scale"] == pytest.approx(1 / 784)
    assert result["beta_effective"] == pytest.approx(392)
    assert main(["audit", "--recon", "mse", "--recon-multiplier", "784"]) == 0
    text = capsys.readouterr().out
    assert "sigma" in text.lower()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--dataset", "nope-mnist", "--out", "{tmp}/r"], "unknown dataset 'nope-mnist'"),
        (["train", "--likelihood", "poisson", "--out", "{tmp}/r"], "unknown likelihood 'poisson'"),
        (["train", "--model", "resnet", "--out", "{tmp}/r"], "unknown model 'resnet'"),
        (["train", "--set", "model.depth=3", "--out", "{tmp}/r"], "unknown config key model.depth"),
        (["train", "--batch-size", "0", "--out", "{tmp}/r"], "train.batch_size must be positive"),
        (["train", "--epochs", "-1", "--out", "{tmp}/r"], "train.epochs must be positive"),
        (["train", "--latent-dim", "0", "--out", "{tmp}/r"], "model.latent_dim must be positive"),
        (["train", "--beta", "-1", "--out", "{tmp}/r"], "objective.beta must be >= 0"),
        (["train", "--resume", "{tmp}/missing"], "nothing to resume in"),
        (["eval", "{tmp}/missing"], "does not exist"),
        (["eval", "{tmp}"], "has no checkpoints/best.json"),
        (["plot", "{tmp}/missing"], "does not exist"),
        (["sample", "{tmp}/missing"], "does not exist"),
        (["audit", "--data-shape", "28,x"], "is not a list of integers"),
        (["audit", "--latent-dim", "0"], "latent"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_error_from_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vaelab", "eval", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("vaelab: error:")
