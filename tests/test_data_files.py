"""User data: .npz / .npy arrays and PNG folders, and every refusal."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import load, read_array_file, read_png_folder, validation_indices
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


def test_user_splits(tmp_path):
    path = _npz(tmp_path, images=GREY, labels=LABELS)
    train = load(path, split="train", validation_size=4, seed=2)
    validation = load(path, split="validation", validation_size=4, seed=2)
    held_out = validation_indices(12, 4, seed=2).numpy()
    np.testing.assert_array_equal(validation.images[:, 0].numpy(), GREY[held_out])
    assert len(train) == 8 and validation.metadata["validation"]["seed"] == 2
    with pytest.raises(ConfigError, match=r"a single file has no test split: load your test "
                                          r"file itself with split='all'"):
        load(path, split="test")
    static = load(path, split="all", binarize="static")
    assert static.levels == 2 and set(static.images.unique().tolist()) <= {0, 1}


ARRAY_ERRORS = {
    # name: (arrays saved in the .npz, regex of the error)
    "wrong keys": ({"pixels": GREY, "target": LABELS},
                   r"no images: expected an array named 'images' or 'x', found 'pixels', "
                   r"'target'"),
    "wrong dtype": ({"images": GREY.astype(np.complex64)}, r"dtype complex64 are not supported"),
    "length mismatch": ({"images": GREY, "labels": LABELS[:5]},
                        r"5 labels for 12 images: they must match one to one"),
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
    with pytest.raises(DataError, match="neither a .npz/.npy file nor a folder"):
        load(other, split="all")


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_png_folder_sorted_unlabelled(tmp_path):
    folder = tmp_path / "pngs"
    names = ["b.png", "a.png", "c.PNG"]
    for i, name in enumerate(names):
        _png(folder / name, GREY[i])
    (folder / "notes.txt").write_text("ignored")
    data = load(folder, split="all")
    assert data.labels is None and data.images.shape == (3, 1, 5, 6)
    order = [1, 0, 2]  # a.png, b.png, c.PNG
    np.testing.assert_array_equal(data.images[:, 0].numpy(), GREY[order])
    assert list(data.checksums) == ["pngs/"] and data.metadata["num_files"] == 3


def test_png_folder_with_class_subfolders_and_rgb(tmp_path):
    folder = tmp_path / "classes"
    rgb = RNG.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    _png(folder / "dog" / "1.png", rgb[0])
    _png(folder / "cat" / "2.png", rgb[1])
    _png(folder / "cat" / "1.png", rgb[2])
    data = read_png_folder(folder)
    assert data.metadata["classes"] == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(data.images, rgb[[2, 1, 0]].transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty", r"holds no .png images"),
        ("mixed sizes", r"b.png is 7x5 with 1 channel but a.png is 6x5 with 1 channel: all "
                        r"images must have the same size and mode"),
        ("mixed modes", r"b.png is 6x5 with 3 channels but a.png is 6x5 with 1 channel"),
        ("mixed layout", r"holds both PNG files and class sub-folders"),
        ("16-bit", r"has PIL mode 'I;16'"),
        ("not a png", r"a.png is not a readable PNG image"),
    ],
)
def test_png_folder_errors(tmp_path, layout, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if layout != "empty" and layout != "not a png":
        _png(folder / "a.png", GREY[0])
    if layout == "mixed sizes":
        _png(folder / "b.png", RNG.integers(0, 256, (5, 7), dtype=np.uint8))
    elif layout == "mixed modes":
        _png(folder / "b.png", RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    elif layout == "mixed layout":
        _png(folder / "cls" / "c.png", GREY[1])
    elif layout == "16-bit":
        (folder / "a.png").unlink()
        Image.fromarray(GREY[0].astype(np.uint16) * 200).save(folder / "a.png")
    elif layout == "not a png":
        (folder / "a.png").write_bytes(b"<html></html>")
    with pytest.raises(DataError, match=message):
        load(folder, split="all")
