"""User data held in .npz / .npy arrays: layouts, values, colour, size, and every refusal.

Folders of images are tested in test_data_folders.py, the splits in test_data_splits.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import load, read_array_file, validation_indices
from vaelab.errors import ConfigError, DataError

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (12, 5, 6), dtype=np.uint8)
LABELS = RNG.integers(0, 10, 12)


def _npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_images_and_labels(tmp_path):
    path = _npz(tmp_path, images=GREY, labels=LABELS.astype(np.int32))
    data = load(path, split="all")
    assert data.images.shape == (12, 1, 5, 6) and data.images.dtype == torch.uint8
    np.testing.assert_array_equal(data.images[:, 0].numpy(), GREY)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == LABELS.tolist()
    assert (data.levels, data.binarize, data.split, data.name) == (256, "none", "all", str(path))
    assert data.checksums == {"data.npz": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert data.metadata["keys"] == {"images": "images", "labels": "labels"}
    assert json.loads(json.dumps(data.metadata)) == data.metadata


def test_npz_x_y_keys_and_channels_last(tmp_path):
    rgb = RNG.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    data = load(_npz(tmp_path, x=rgb, y=np.arange(4)), split="all")
    assert data.images.shape == (4, 3, 5, 6) and data.images.is_contiguous()
    np.testing.assert_array_equal(data.images.numpy(), rgb.transpose(0, 3, 1, 2))
    assert data.labels.tolist() == [0, 1, 2, 3]
    nchw = RNG.integers(0, 256, (4, 1, 5, 6), dtype=np.uint8)
    np.testing.assert_array_equal(load(_npz(tmp_path, "b.npz", images=nchw), split="all")
                                  .images.numpy(), nchw)


def test_npy_float_grey_levels_become_exact_uint8(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, GREY.astype(np.float32) / 255)
    data = load(path, split="all")
    np.testing.assert_array_equal(data.images[:, 0].numpy(), GREY)
    assert data.levels == 256 and data.labels is None


@pytest.mark.parametrize(
    ("values", "levels"),
    [(np.array([[[0.0, 1.0]], [[1.0, 1.0]]]), 2), (np.array([[[True, False]]]), 2)],
    ids=["float01", "bool"],
)
def test_binary_arrays_are_levels_2(tmp_path, values, levels):
    path = tmp_path / "b.npy"
    np.save(path, values)
    data = load(path, split="all")
    assert data.levels == levels
    np.testing.assert_array_equal(data.images[:, 0].numpy(), values.astype(np.uint8))
    with pytest.raises(ConfigError, match="already binary"):
        load(path, split="all", binarize="dynamic")


def test_user_splits_without_a_test_part_match_the_old_validation_rule(tmp_path):
    """test_size=0: validation is randperm(N, seed)[:size] of the whole file, as before."""
    path = _npz(tmp_path, images=GREY, labels=LABELS)
    train = load(path, split="train", validation_size=4, seed=2, test_size=0)
    validation = load(path, split="validation", validation_size=4, seed=2, test_size=0)
    held_out = validation_indices(12, 4, seed=2).numpy()
    np.testing.assert_array_equal(validation.images[:, 0].numpy(), GREY[held_out])
    assert len(train) == 8 and validation.metadata["validation"]["seed"] == 2
    with pytest.raises(DataError, match=r"has no test split \(test_size=0\): give a separate "
                                        r"test set \(--test-dataset PATH\)"):
        load(path, split="test", test_size=0)
    static = load(path, split="all", binarize="static")
    assert static.levels == 2 and set(static.images.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("shape", "layout", "read_as"),
    [((4, 3, 5, 6), "auto", "nchw"), ((4, 5, 6, 3), "auto", "nhwc"), ((4, 5, 6, 1), "auto", "nhwc"),
     ((4, 3, 4, 4), "nchw", "nchw"), ((4, 4, 4, 3), "nhwc", "nhwc"), ((4, 5, 6), "nhwc", "nhw")],
)
def test_layouts_detected_or_given(tmp_path, shape, layout, read_as):
    array = RNG.integers(0, 256, shape, dtype=np.uint8)
    data = read_array_file(_npz(tmp_path, images=array), layout=layout)
    expected = {"nchw": array, "nhwc": array.transpose(0, 3, 1, 2) if array.ndim == 4 else None,
                "nhw": array[:, None]}[read_as]
    np.testing.assert_array_equal(data.images, expected)
    assert data.metadata["layout"] == {"requested": layout, "read_as": read_as}


@pytest.mark.parametrize(
    ("shape", "layout", "message"),
    [((4, 3, 4, 4), "auto", r"images of shape \(4, 3, 4, 4\) could be NCHW \(3 channels of "
                            r"4x4\) or NHWC \(4 channels of 3x4\): set data.layout to 'nchw' "
                            r"or 'nhwc'"),
     ((4, 1, 8, 3), "auto", r"could be NCHW \(1 channels of 8x3\) or NHWC"),
     ((4, 28, 28, 1), "nchw", r"read as layout 'nchw' have 28 channels, not 1, 3 or 4: set "
                              r"data.layout to the layout the array has")],
)
def test_ambiguous_or_wrong_layout_is_refused(tmp_path, shape, layout, message):
    path = _npz(tmp_path, images=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=message) as info:
        load(path, split="all", layout=layout)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_array_colour_options(tmp_path, caplog):
    rgba = RNG.integers(0, 256, (3, 5, 6, 4), dtype=np.uint8)
    path = _npz(tmp_path, images=rgba)
    with caplog.at_level("WARNING", logger="vaelab.data"):
        colour = load(path, split="all")
    assert "the 4th (alpha, transparency) is dropped" in caplog.text
    np.testing.assert_array_equal(colour.images.numpy(), rgba[..., :3].transpose(0, 3, 1, 2))
    grey = load(path, split="all", channels=1)
    pillow = np.stack([np.asarray(Image.fromarray(image[..., :3]).convert("L")) for image in rgba])
    np.testing.assert_array_equal(grey.images[:, 0].numpy(), pillow)
    repeated = load(_npz(tmp_path, "g.npz", images=GREY), split="all", channels="3")
    assert repeated.images.shape == (12, 3, 5, 6)
    for c in range(3):
        np.testing.assert_array_equal(repeated.images[:, c].numpy(), GREY)


def test_array_image_size_resizes_like_pillow(tmp_path):
    rgb = RNG.integers(0, 256, (2, 10, 20, 3), dtype=np.uint8)
    data = load(_npz(tmp_path, images=rgb), split="all", image_size="4x4")
    assert data.images.shape == (2, 3, 4, 4)
    expected = np.asarray(Image.fromarray(rgb[1]).resize((4, 4), Image.Resampling.LANCZOS,
                                                         box=(5, 0, 15, 10), reducing_gap=3.0))
    np.testing.assert_array_equal(data.images[1].numpy(), expected.transpose(2, 0, 1))
    assert data.metadata["image_size"] == {"requested": [4, 4], "original": [10, 20]}


def test_binary_arrays_cannot_be_resized_or_turned_grey(tmp_path):
    path = _npz(tmp_path, images=np.ones((2, 6, 6, 3), bool))
    with pytest.raises(DataError, match=r"0/1 data cannot be resized from 6x6 to 2x2 without "
                                        r"making grey levels"):
        load(path, split="all", image_size=2)
    with pytest.raises(DataError, match=r"0/1 data cannot be turned grey"):
        load(path, split="all", channels=1)
    assert load(path, split="all", image_size=6).levels == 2  # same size: nothing to do


ARRAY_ERRORS = {
    # name: (arrays saved in the .npz, regex of the error)
    "wrong keys": ({"pixels": GREY, "target": LABELS},
                   r"no images: expected an array named 'images' or 'x', found 'pixels', "
                   r"'target'"),
    "wrong dtype": ({"images": GREY.astype(np.complex64)}, r"dtype complex64 are not supported"),
    "length mismatch": ({"images": GREY, "labels": LABELS[:5]},
                        r"5 labels for 12 images: they must match one to one"),
    "too many labels": ({"x": GREY, "y": np.arange(13)},
                        r"13 labels for 12 images: they must match one to one"),
    "labels not 1-D": ({"images": GREY, "labels": LABELS.reshape(12, 1)},
                       r"labels must be one integer per image, shape \(12,\), got \(12, 1\)"),
    "non-integer labels": ({"images": GREY, "labels": LABELS + 0.5},
                           r"labels must be integers, got dtype float64"),
    "empty": ({"images": np.zeros((0, 5, 6), np.uint8)}, r"holds no images \(shape \(0, 5, 6\)\)"),
    "flat vectors": ({"images": GREY.reshape(12, 30)},
                     r"images have shape \(12, 30\); expected \(N, H, W\)"),
    "out of range ints": ({"images": GREY.astype(np.int64) * 2},
                          r"integer images must be grey levels 0..255 \(\d+ values, e\.g\. \d+"),
    "floats above 1": ({"images": GREY.astype(np.float32)},
                       r"float images must lie in \[0, 1\] \(\d+ values, e\.g\. "),
    "nan": ({"images": np.full((2, 3, 3), np.nan)}, r"float images must lie in \[0, 1\]"),
    "not 8-bit floats": ({"images": np.full((2, 3, 3), 0.3)},
                         r"not 8-bit grey levels \(multiples of 1/255\): 18 values, e\.g\. 0\.3; "
                         r"vaelab does not quantise silently"),
}


@pytest.mark.parametrize("case", sorted(ARRAY_ERRORS))
def test_array_file_errors(tmp_path, case):
    arrays, message = ARRAY_ERRORS[case]
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        read_array_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_unknown_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"<html>not numpy</html>")
    with pytest.raises(DataError, match="not a readable .npy/.npz file"):
        load(bad, split="all")
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(DataError, match="neither a .npz/.npy file nor a folder of images"):
        load(other, split="all")
