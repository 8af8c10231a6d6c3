"""Splits of data a user brings: train / validation / test, disjoint and seeded; test_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import DATASETS, load
from vaelab.data.options import UserOptions
from vaelab.data.testing import write_idx_dataset
from vaelab.data.user import user_splits
from vaelab.errors import ConfigError, DataError

N = 40
RNG = np.random.default_rng(0)
# each image is its own index in pixel (0, 0), so a split's images name their rows
IMAGES = RNG.integers(0, 256, (N, 4, 5), dtype=np.uint8)
IMAGES[:, 0, 0] = np.arange(N)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def npz(tmp_path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, images=IMAGES, labels=np.arange(N) % 3)
    return path


def _rows(data) -> list[int]:
    return data.images[:, 0, 0, 0].tolist()


def test_splits_are_disjoint_cover_the_data_and_are_seeded(npz):
    splits = {s: load(npz, split=s, validation_size=6, seed=3) for s in ("train", "validation",
                                                                         "test")}
    rows = {s: _rows(d) for s, d in splits.items()}
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [30, 6, 4]  # 10% test
    assert sorted(rows["train"] + rows["validation"] + rows["test"]) == list(range(N))
    assert all(r == sorted(r) for r in rows.values())  # file order kept
    assert _rows(load(npz, split="all")) == list(range(N))
    for s, d in splits.items():  # labels follow their images
        assert d.labels.tolist() == [r % 3 for r in rows[s]]
    again = {s: _rows(load(npz, split=s, validation_size=6, seed=3)) for s in rows}
    assert again == rows
    other_seed = {s: _rows(load(npz, split=s, validation_size=6, seed=4)) for s in rows}
    assert other_seed["test"] == rows["test"]  # test_seed, not seed, places the test split
    assert other_seed["validation"] != rows["validation"]
    other_test = _rows(load(npz, split="test", test_seed=1))
    assert other_test != rows["test"] and len(other_test) == 4
    record = splits["train"].metadata["test_split"]
    assert record["source"] == "held out" and record["size"] == 4 and record["seed"] == 0
    assert record == splits["test"].metadata["test_split"]
    assert splits["train"].metadata["validation"]["taken_from"] == \
        "the 36 examples left after the test split, in file order"


@pytest.mark.parametrize(("test_size", "count"), [(None, 4), (0.25, 10), (7, 7), (0, 0)])
def test_test_size_as_fraction_or_count(npz, test_size, count):
    splits = user_splits(N, 5, 0, UserOptions(test_size=test_size), "data")
    test = splits.test if splits.test is not None else torch.empty(0, dtype=torch.long)
    assert test.numel() == count
    assert splits.train.numel() + splits.validation.numel() == N - count
    union = torch.cat([splits.train, splits.validation, test])
    assert union.unique().numel() == N  # disjoint and complete


def test_default_test_split_is_capped_at_10000():
    splits = user_splits(150_000, 5000, 0, UserOptions(), "big", with_validation=False)
    assert splits.test.numel() == 10_000 and splits.train is None


def test_too_little_training_data_names_the_setting(npz):
    with pytest.raises(ConfigError, match=r"validation_size 36 leaves no training data in "
                                          r".*data.npz \(36 examples left after the test "
                                          r"split\): choose a smaller value, e\.g\. --set "
                                          r"data.validation_size=3"):
        load(npz, split="train", validation_size=36)
    with pytest.raises(ConfigError, match=r"validation_size 20 leaves only 16 training examples "
                                          r"in .* \(36 examples left after the test split\), "
                                          r"fewer than it holds out: choose a smaller value, "
                                          r"e\.g\. --set data.validation_size=3"):
        load(npz, split="validation", validation_size=20)
    with pytest.raises(ConfigError, match=r"test_size 40 holds out 40 of the 40 examples of "
                                          r".*, leaving none to train on: choose a smaller "
                                          r"value \(--set data.test_size=0.1\) or give a "
                                          r"separate test set \(--test-dataset PATH\)"):
        load(npz, split="train", test_size=40)
    assert len(load(npz, split="test", validation_size=5000)) == 4  # test ignores validation


def test_options_that_contradict_each_other_or_the_dataset(npz, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"give either test_path .* or test_size .*, not both"):
        load(npz, split="test", test_path=npz, test_size=0.2)
    for bad in ({"test_size": 1.0}, {"test_size": -1}, {"test_size": True}):
        with pytest.raises(ConfigError, match=r"test_size must be a fraction in \[0, 1\) or a "
                                              r"number of examples >= 0"):
            load(npz, split="test", **bad)
    with pytest.raises(ConfigError, match=r"unknown split 'extra' for user data: choose one of "
                                          r"all, train, validation, test"):
        load(npz, split="extra")
    spec, _ = write_idx_dataset(tmp_path / "tiny", name="tiny")
    monkeypatch.setitem(DATASETS._entries, "tiny", spec)
    with pytest.raises(ConfigError, match=r"image_size, test_path apply to your own data; tiny "
                                          r"is used as published \(1x4x4 images, official test "
                                          r"set\): leave them unset"):
        load("tiny", split="test", data_dir=tmp_path / "tiny", image_size=8, test_path=npz)
    with pytest.raises(ConfigError, match=r"channels applies to your own data"):
        load("tiny", split="test", data_dir=tmp_path / "tiny", channels=3)
    same = load("tiny", split="test", data_dir=tmp_path / "tiny", image_size=4, channels=1)
    assert same.images.shape == (10, 1, 4, 4)


def _folder(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    for name, images in classes.items():
        for i, image in enumerate(images):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return root


def test_a_separate_test_folder(tmp_path):
    colour = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    train = _folder(tmp_path / "train", {"cat": list(colour[:3]), "dog": list(colour[3:])})
    grey = RNG.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    test_dir = _folder(tmp_path / "test", {"dog": [grey[0]], "cat": [grey[1]]})
    test = load(train, split="test", test_path=test_dir)
    assert test.images.shape == (2, 3, 8, 8)  # grey test images repeated to match colour
    for c in range(3):
        np.testing.assert_array_equal(test.images[0, c].numpy(), grey[1])  # cat/0.png first
    assert test.labels.tolist() == [0, 1]  # numbered by the training folder's classes
    assert test.metadata["classes"] == ["cat", "dog"]
    assert test.metadata["test_split"] == {"source": "test_path", "path": str(test_dir)}
    assert test.metadata["test_of"]["dataset"] == str(train)
    everything = load(train, split="train", validation_size=1, test_path=test_dir)
    assert len(everything) == 5  # nothing held out when a test set is given
    again = load(train, split="test", test_path=test_dir)  # from the cache, same numbering
    assert again.metadata["cache"]["hit"] is True and again.labels.tolist() == [0, 1]
    assert torch.equal(again.images, test.images)
    only_dog = _folder(tmp_path / "test2", {"dog": [colour[0]]})
    for hit in (False, True):  # the cache holds the test folder as decoded, not renumbered
        dog = load(train, split="test", test_path=only_dog)
        assert dog.metadata["cache"]["hit"] is hit and dog.labels.tolist() == [1]
        assert dog.metadata["test_classes"] == ["dog"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _folder(p, {"cat": [RNG.integers(0, 256, (6, 6), dtype=np.uint8)]}),
         r"test data .*test holds 6x6 images but .*train holds 8x8 \(height x width\): pass "
         r"--image-size N or HxW"),
        (lambda p: _folder(p, {"bird": [RNG.integers(0, 256, (8, 8), dtype=np.uint8)]}),
         r"test data .*test has class folder 'bird', which .*train does not have \(its "
         r"classes: cat\): rename or remove it"),
        (lambda p: p, r"test data .*test does not exist"),
    ],
    ids=["size", "unknown class", "missing"],
)
def test_a_test_folder_that_does_not_fit(tmp_path, make, message, cache):
    train = _folder(tmp_path / "train", {"cat": list(RNG.integers(0, 256, (2, 8, 8),
                                                                   dtype=np.uint8))})
    test_dir = make(tmp_path / "test")
    with pytest.raises(DataError, match=message):
        load(train, split="test", test_path=test_dir)
    assert not cache.exists()  # nothing cached for a refused pair


def test_colour_test_data_for_grey_training_data_is_refused(tmp_path):
    train = _folder(tmp_path / "train", {"a": [RNG.integers(0, 256, (8, 8), dtype=np.uint8)]})
    test_dir = _folder(tmp_path / "test", {"a": [RNG.integers(0, 256, (8, 8, 3), np.uint8)]})
    with pytest.raises(DataError, match=r"test data .* is colour but .*train is grey: set "
                                        r"data.channels=1 to read both as grey"):
        load(train, split="test", test_path=test_dir)
    assert load(train, split="test", test_path=test_dir, channels=1).images.shape[1] == 1


def test_binarisation_of_user_splits(npz):
    static = {s: load(npz, split=s, binarize="static", seed=1, validation_size=6)
              for s in ("all", "train", "test")}
    rows = {s: torch.tensor(_rows(load(npz, split=s, seed=1, validation_size=6)))
            for s in static}
    # one draw over the whole file: every split shows the same bits for the same example
    for s in ("train", "test"):
        assert torch.equal(static[s].images, static["all"].images[rows[s]])
    dynamic_test = load(npz, split="test", binarize="dynamic")
    assert dynamic_test.levels == 2 and dynamic_test.binarize == "static"
    assert torch.equal(dynamic_test.images,  # the test split does not depend on seed
                       load(npz, split="all", binarize="static", seed=0).images[rows["test"]])
    assert load(npz, split="train", binarize="dynamic", validation_size=6).levels == 256
