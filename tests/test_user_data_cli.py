"""A user's folder of images, end to end through the command line: training with the
defaults chosen from the data, the report, eval on every split, the figures; and the
choices the defaults make for 0/1 data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.cli import main


def _folder(root, size=(20, 24), colour=False, binary=False, per_class=12):
    rng = np.random.default_rng(0)
    for cls in ("circles", "squares"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            shape = (*size, 3) if colour else size
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            if binary:
                pixels = (pixels > 127).astype(np.uint8) * 255
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


#: the default estimator's AIS check kept small (its cost is not what these tests test)
_SMALL_CHECK = ("--set", "eval.auto.check_steps=5", "--set", "eval.auto.check_chains=2")


def _vaelab(*args, capsys):
    """``vaelab ARGS`` in this process: (exit status, stdout, stderr)."""
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_folder_trains_reports_evaluates_every_split_and_plots(tmp_path, capsys):
    folder = _folder(tmp_path / "pics", colour=True)
    run = tmp_path / "run"
    code, out, err = _vaelab("train", "--dataset", str(folder), "--image-size", "16", "--epochs", "1",
                  "--set", "data.validation_size=4", "--set", "train.batch_size=8",
                  "--set", "train.threads=1", "--set", "likelihood.discretized-logistic-mixture.components=2",
                  "--set", "model.latent_dim=4", "--iw-samples", "30", *_SMALL_CHECK, "--out", str(run),
                  capsys=capsys)
    assert code == 0, err
    assert ("vaelab: 8-bit colour images: no binarisation, the discretized-logistic-mixture "
            "likelihood, a conv model sized for 16x16") in out
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "test" and report["n_examples"] == 3  # 10% of 24, held out
    assert report["likelihood"] == "discretized-logistic-mixture"
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (3 * 16 * 16 * np.log(2)))
    sizes = {}
    for split in ("train", "validation", "test", "all"):
        code, _, err = _vaelab("eval", str(run), "--split", split, "--iw-samples", "5",
                               *_SMALL_CHECK, "--json", str(tmp_path / f"{split}.json"),
                               capsys=capsys)
        assert code == 0, (split, err)
        sizes[split] = json.loads((tmp_path / f"{split}.json").read_text())["n_examples"]
    assert sizes == {"train": 17, "validation": 4, "test": 3, "all": 24}
    code, out, err = _vaelab("plot", str(run), capsys=capsys)
    assert code == 0, err
    assert len(out.split()) == 7
    assert (run / "figures" / "latent_scatter.png").stat().st_size > 1000


def test_black_and_white_images_get_a_bernoulli_likelihood(tmp_path, capsys):
    folder = _folder(tmp_path / "bits", size=(8, 8), binary=True)
    code, out, err = _vaelab("train", "--dataset", str(folder), "--epochs", "1", "--set",
                  "data.validation_size=4", "--set", "model.hidden=8", "--set",
                  "model.latent_dim=2", "--set", "train.threads=1", "--no-report",
                  "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    assert "vaelab: 0/1 images: a Bernoulli likelihood, no binarisation" in out
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'binarize = "none"' in config and 'name = "bernoulli"' in config


def test_a_chosen_likelihood_is_kept(tmp_path, capsys):
    folder = _folder(tmp_path / "grey", size=(8, 8))
    code, out, err = _vaelab("train", "--dataset", str(folder), "--likelihood", "bernoulli",
                             "--binarize", "dynamic", "--epochs",
                  "1", "--set", "data.validation_size=4", "--set", "model.hidden=8",
                  "--set", "train.threads=1", "--no-report", "--out", str(tmp_path / "run"),
                  capsys=capsys)
    assert code == 0, err
    assert "vaelab: 8-bit" not in out  # the user chose; nothing is changed


def test_each_split_is_loaded_once_per_command(tmp_path, capsys, monkeypatch):
    """Issue 22: ``vaelab train --dataset DIR --image-size 32`` listed the folder six times,
    built the model three times and read a checkpoint twice. Now one pipeline object
    carries config, data, model and session: each split is read once per command, the
    model built once, and a checkpoint read only when its weights are not in memory."""
    from vaelab import checkpoint, models
    from vaelab.data import loader, user

    counts: dict[str, list] = {"load": [], "folder": [], "build": [], "ckpt": []}

    def counting(module, name, key, what=lambda *a, **k: None):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key].append(what(*args, **kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(loader, "load", "load", lambda *a, **k: k["split"])
    counting(user, "read_image_folder", "folder")
    counting(models, "build_from_config", "build")
    counting(checkpoint, "_read_tensors", "ckpt")
    folder = _folder(tmp_path / "pics", colour=True)
    run = tmp_path / "run"
    code, _, err = _vaelab("train", "--dataset", str(folder), "--image-size", "32",
                           "--epochs", "1", "--set", "data.validation_size=4",
                           "--set", "train.batch_size=8", "--set", "train.threads=1",
                           "--set", "model.latent_dim=4", "--iw-samples", "5", *_SMALL_CHECK,
                           "--set", "likelihood.discretized-logistic-mixture.components=2",
                           "--out", str(run), capsys=capsys)
    assert code == 0, err
    assert sorted(counts["load"]) == ["test", "train", "validation"]
    assert len(counts["folder"]) == 3  # one listing per split (the decode is cached)
    assert len(counts["build"]) == 1 and counts["ckpt"] == []  # best is the epoch in memory
    for command in (["eval", str(run), "--iw-samples", "5", *_SMALL_CHECK], ["plot", str(run)]):
        for values in counts.values():
            values.clear()
        code, _, err = _vaelab(*command, capsys=capsys)
        assert code == 0, err
        assert counts["load"] == ["test"], command
        assert len(counts["build"]) == 1 and len(counts["ckpt"]) == 1, command
