"""Splits, binarisation and batching of ImageSet (numbers against float64 references)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vaelab.data import (
    DATASETS,
    ImageSet,
    bernoulli_binarize,
    derive_seed,
    dynamic_binarize,
    indices_digest,
    load,
    random_bytes,
    split_indices,
    validation_indices,
)
from vaelab.data.testing import write_amat_dataset, write_idx_dataset
from vaelab.errors import ConfigError, DataError


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """'tiny' (30 train + 10 test 4x4 grey images) and 'tiny-binary' (amat 20/6/8) on disk."""
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_SYSTEM_DATA_DIRS", "")
    monkeypatch.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9")  # never used: files are local
    spec, arrays = write_idx_dataset(tmp_path / "data" / "tiny", name="tiny")
    monkeypatch.setitem(DATASETS._entries, "tiny", spec)
    bspec, barrays = write_amat_dataset(tmp_path / "data" / "tiny-binary", name="tiny-binary")
    monkeypatch.setitem(DATASETS._entries, "tiny-binary", bspec)
    return {"dir": tmp_path / "data", "arrays": arrays, "binary": barrays}


def _load(tiny, name="tiny", **kwargs):
    return load(name, data_dir=tiny["dir"], **kwargs)


def _grey_set(values: np.ndarray, **kwargs) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8))
    return ImageSet(images, None, "synthetic", "train", **kwargs)


# -- validation split ---------------------------------------------------------------------


def test_validation_indices_are_a_pure_function_of_the_seed():
    first = validation_indices(1000, 100, seed=3)
    assert torch.equal(first, validation_indices(1000, 100, seed=3))
    assert not torch.equal(first, validation_indices(1000, 100, seed=4))
    # the documented formula, spelled out
    reference = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:100]
    assert torch.equal(first, reference.sort().values)
    assert first.dtype == torch.int64 and len(first.unique()) == 100
    train, held_out = split_indices(1000, 100, seed=3)
    assert torch.equal(held_out, first) and len(train) == 900
    assert torch.equal(torch.cat([train, held_out]).sort().values, torch.arange(1000))
    assert indices_digest(first) == indices_digest(first.clone()) != indices_digest(train)


def test_train_and_validation_partition_the_official_train_set(tiny):
    train = _load(tiny, split="train", validation_size=8, seed=5)
    validation = _load(tiny, split="validation", validation_size=8, seed=5)
    assert (len(train), len(validation)) == (22, 8)
    original = tiny["arrays"]["train-images-idx3-ubyte.gz"]
    labels = tiny["arrays"]["train-labels-idx1-ubyte.gz"]
    held_out = validation_indices(30, 8, seed=5)
    np.testing.assert_array_equal(validation.images[:, 0].numpy(), original[held_out.numpy()])
    np.testing.assert_array_equal(validation.labels.numpy(), labels[held_out.numpy()])
    rest = np.setdiff1d(np.arange(30), held_out.numpy())
    np.testing.assert_array_equal(train.images[:, 0].numpy(), original[rest])
    for split_set in (train, validation):
        meta = split_set.metadata["validation"]
        assert meta["size"] == 8 and meta["seed"] == 5
        assert meta["indices_sha256"] == indices_digest(held_out)
        assert split_set.images.is_contiguous() and split_set.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert json.loads(json.dumps(train.metadata)) == train.metadata  # JSON-able as promised


def test_validation_size_zero_and_bad_sizes(tiny):
    assert len(_load(tiny, split="train", validation_size=0)) == 30
    with pytest.raises(DataError, match=r"validation split is empty \(validation_size=0\)"):
        _load(tiny, split="validation", validation_size=0)
    with pytest.raises(ConfigError, match=r"validation_size 30 leaves no training data in tiny "
                                          r"\(30 examples\): choose a smaller value, e\.g\. "
                                          r"--set data.validation_size=3"):
        _load(tiny, split="train", validation_size=30)
    with pytest.raises(ConfigError, match=r"validation_size must be an integer >= 0"):
        _load(tiny, validation_size=-1)
    with pytest.raises(ConfigError, match=r"unknown split 'valid' for tiny: choose one of "
                                          r"train, validation, test"):
        _load(tiny, split="valid")
    with pytest.raises(ConfigError, match=r"unknown binarize 'otsu': choose one of none, "
                                          r"dynamic, static"):
        _load(tiny, binarize="otsu")


def test_official_validation_part_of_binarized_dataset(tiny):
    validation = _load(tiny, "tiny-binary", split="validation", validation_size=3)
    assert len(validation) == 6  # the official part; validation_size ignored
    assert validation.metadata["validation"]["official"] is True
    assert len(_load(tiny, "tiny-binary", split="train", validation_size=3)) == 20
    test = _load(tiny, "tiny-binary", split="test")
    np.testing.assert_array_equal(test.images.reshape(8, 16).numpy(),
                                  tiny["binary"]["tiny-binary_test.amat"])
    assert (test.levels, test.binarize, test.labels) == (2, "static", None)
    with pytest.raises(ConfigError, match="already binary"):
        _load(tiny, "tiny-binary", binarize="dynamic")


# -- batches ------------------------------------------------------------------------------


def test_batch_is_grey_over_255_and_batch_uint8_is_exact():
    grey = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    images = _grey_set(grey)
    index = torch.tensor([3, 0, 3])
    x = images.batch(index)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 8, 8)
    reference = grey[[3, 0, 3]].astype(np.float64) / 255.0
    np.testing.assert_array_equal(x.numpy(), reference.astype(np.float32))
    assert x.min() == 0.0 and x.max() == 1.0 and torch.equal(images.batch(index), x)
    assert torch.equal(images.batch_uint8(index), torch.from_numpy(grey[[3, 0, 3]]))
    np.testing.assert_allclose(images.pixel_mean().numpy(), grey.mean(0) / 255.0, rtol=0,
                               atol=1e-7)
    assert images.to("cpu").images.data_ptr() == images.images.data_ptr()
    assert len(images) == 4 and images.event_shape == (1, 8, 8)


def test_binary_set_batches_zeros_and_ones_and_has_no_grey_levels():
    bits = np.random.default_rng(0).integers(0, 2, (5, 1, 3, 3), dtype=np.uint8)
    images = _grey_set(bits, levels=2, binarize="static")
    np.testing.assert_array_equal(images.batch(torch.arange(5)).numpy(), bits.astype(np.float32))
    np.testing.assert_allclose(images.pixel_mean().numpy(), bits.mean(0), atol=1e-7)
    with pytest.raises(DataError, match="binary 0/1 values, not grey levels"):
        images.batch_uint8(torch.arange(2))


def test_imageset_checks_its_fields():
    with pytest.raises(DataError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 3, 3), None, "x", "train")
    with pytest.raises(DataError, match="labels must be int64"):
        ImageSet(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                 "x", "train")
    with pytest.raises(DataError, match="dynamic binarisation needs grey-level data"):
        ImageSet(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), None, "x", "train",
                 binarize="dynamic", levels=2)


# -- binarisation -------------------------------------------------------------------------


def test_dynamic_draws_converge_to_grey_over_255():
    grey = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    images = _grey_set(grey, binarize="dynamic")
    generator = torch.Generator().manual_seed(1234)
    draws = 4000
    index = torch.zeros(draws, dtype=torch.long)  # the same image 4000 times, one call
    mean = images.batch(index, generator=generator).double().mean(0)[0].numpy()
    p = grey[0, 0] / 255.0
    stderr = np.sqrt(p * (1 - p) / draws)
    # every pixel within 4.5 standard errors (exact at p = 0 and p = 1)
    assert np.all(np.abs(mean - p) <= 4.5 * stderr + 1e-12)
    # and the 256 standardised errors look standard normal: chi-square with 254 dof
    inner = (p > 0) & (p < 1)
    chi2 = float((((mean - p)[inner] / stderr[inner]) ** 2).sum())
    assert abs(chi2 - 254) < 5 * math.sqrt(2 * 254)


def _documented_draw(grey: torch.Tensor, seed: int) -> tuple[torch.Tensor, int, int]:
    """The documented dynamic draw, written plainly: bytes of 64-bit draws in order; a 255
    is replaced, position by position in ascending order, by the bytes of the next draws.
    Returns the 0/1 draw, the number of rejected bytes and of rejection rounds."""
    generator = torch.Generator().manual_seed(seed)

    def draw(count):
        words = torch.empty((count + 7) // 8, dtype=torch.int64)
        return words.random_(-(2**63), None, generator=generator).view(torch.uint8).tolist()

    flat = grey.reshape(-1).tolist()
    draws = draw(len(flat))
    pending = [i for i, b in enumerate(draws) if b == 255]
    rejected, rounds = len(pending), 0
    while pending:
        rounds += 1
        fresh = draw(len(pending))
        for i, b in zip(pending, fresh):
            draws[i] = b
        pending = [i for i, b in zip(pending, fresh) if b == 255]
    bits = [float(b < g) for b, g in zip(draws, flat)]
    return torch.tensor(bits).reshape(grey.shape), rejected, rounds


def test_dynamic_draw_is_a_byte_below_grey_with_255_rejected():
    """The documented draw [b < grey], b uniform on 0..254 (the caller's generator's bytes,
    255 rejected): exactly Bernoulli(grey / 255); float 0./1., exactly 0 at grey 0 and
    exactly 1 at grey 255."""
    grey = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(64, 1, 32, 32)
    images = _grey_set(grey, binarize="dynamic")
    index = torch.arange(63, -1, -1)
    x = images.batch(index, generator=torch.Generator().manual_seed(11))
    expected, rejected, rounds = _documented_draw(torch.from_numpy(grey)[index], seed=11)
    assert rejected > 100 and rounds >= 2  # the rejection path ran, twice
    assert x.dtype == torch.float32
    assert torch.equal(x, expected)
    p = torch.from_numpy(grey)[index].float() / 255
    assert x.flatten()[p.flatten() == 0].eq(0).all() and x.flatten()[p.flatten() == 1].eq(1).all()
    assert dynamic_binarize(torch.zeros(0, 3, dtype=torch.uint8)).shape == (0, 3)


def test_random_bytes_cover_every_bit_pattern():
    """All 8 bytes of each 64-bit draw are uniform, the sign byte too (chi-square, 255
    degrees of freedom, 8 tests at 5 standard deviations)."""
    data = random_bytes(8 * 51_200, torch.Generator().manual_seed(3)).view(-1, 8)
    expected = len(data) / 256
    for byte in range(8):
        counts = torch.bincount(data[:, byte].long(), minlength=256).double()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert abs(chi2 - 255) < 5 * math.sqrt(2 * 255), (byte, chi2)


def test_dynamic_same_seed_same_draws_and_fresh_draw_each_call():
    grey = np.full((8, 1, 4, 4), 128, dtype=np.uint8)
    images = _grey_set(grey, binarize="dynamic")
    index = torch.arange(8)
    first = images.batch(index, generator=torch.Generator().manual_seed(7))
    again = images.batch(index, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(7)
    one, two = images.batch(index, generator=generator), images.batch(index, generator=generator)
    assert not torch.equal(one, two)
    assert set(one.unique().tolist()) <= {0.0, 1.0}


def test_static_binarisation_is_one_fixed_draw(tiny):
    first = _load(tiny, split="train", binarize="static", seed=3, validation_size=5)
    second = _load(tiny, split="train", binarize="static", seed=3, validation_size=5)
    assert torch.equal(first.images, second.images)
    assert (first.levels, first.binarize) == (2, "static")
    index = torch.arange(len(first))
    assert torch.equal(first.batch(index), first.batch(index))  # no draw at batch time
    other_seed = _load(tiny, split="train", binarize="static", seed=4, validation_size=5)
    assert not torch.equal(first.images, other_seed.images)
    # the draw is over the official part: rows do not depend on the validation size
    full = _load(tiny, split="train", binarize="static", seed=3, validation_size=0)
    kept = split_indices(30, 5, seed=3)[0]
    assert torch.equal(full.images[kept], first.images)
    # and it is exactly bernoulli_binarize with the documented derived seed
    grey = torch.from_numpy(tiny["arrays"]["train-images-idx3-ubyte.gz"][:, None].copy())
    expected = bernoulli_binarize(grey, derive_seed(3, "static:train"))
    assert torch.equal(full.images, expected)
    assert full.metadata["binarization"]["generator_seed"] == derive_seed(3, "static:train")


def test_static_draw_has_the_grey_level_mean():
    grey = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (200, 1, 10, 10),
                                                              dtype=np.uint8))
    bits = bernoulli_binarize(grey, 99)
    p = grey.double() / 255
    assert set(bits.unique().tolist()) <= {0, 1}
    stderr = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(float(bits.double().sum() - p.sum())) < 4 * stderr
    assert torch.equal(bits[grey == 0], torch.zeros_like(bits[grey == 0]))
    assert torch.equal(bits[grey == 255], torch.ones_like(bits[grey == 255]))


def test_dynamic_test_split_is_binarised_once_with_a_fixed_seed(tiny):
    dynamic_seed0 = _load(tiny, split="test", binarize="dynamic", seed=0)
    dynamic_seed9 = _load(tiny, split="test", binarize="dynamic", seed=9)
    static_seed0 = _load(tiny, split="test", binarize="static", seed=0)
    assert (dynamic_seed9.levels, dynamic_seed9.binarize) == (2, "static")
    assert torch.equal(dynamic_seed0.images, dynamic_seed9.images)  # independent of run seed
    assert torch.equal(dynamic_seed9.images, static_seed0.images)  # documented equivalence
    assert dynamic_seed9.metadata["binarization"]["requested"] == "dynamic"
    train = _load(tiny, split="train", binarize="dynamic", validation_size=5)
    assert (train.levels, train.binarize) == (256, "dynamic")
    np.testing.assert_array_equal(train.batch_uint8(torch.arange(3)).numpy()[:, 0],
                                  tiny["arrays"]["train-images-idx3-ubyte.gz"][
                                      split_indices(30, 5, 0)[0][:3].numpy()])


def test_derive_seed_is_documented_formula():
    import hashlib

    digest = hashlib.sha256(b"vaelab:static:test:0").digest()
    assert derive_seed(0, "static:test") == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert derive_seed(0, "static:train") != derive_seed(0, "static:test")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dynamic_batches_on_cuda_with_a_cuda_generator():
    grey = np.full((16, 1, 4, 4), 200, dtype=np.uint8)
    images = _grey_set(grey, binarize="dynamic").to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = images.batch(torch.arange(16), generator=generator)
    assert x.device.type == "cuda" and set(x.unique().tolist()) <= {0.0, 1.0}
