"""Folders of images: layout and labels, colour and size options, refusals, the cache."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelab.data import folders, load, read_image_folder
from vaelab.data.progress import Progress
from vaelab.errors import ConfigError, DataError

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (12, 5, 6), dtype=np.uint8)
RGB = RNG.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root of this test's own (never the user's)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(root))
    return root


def _png(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kwargs).save(path)
    return path


def _tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): (
        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
        else "link" if p.is_symlink() else "dir")
        for p in sorted(directory.rglob("*"))} if directory.exists() else {}


def test_unlabelled_folder_is_read_recursively_in_path_order(tmp_path, caplog):
    folder = tmp_path / "pics"
    for name, i in [("b.png", 0), ("a.png", 1), ("sub/c.PNG", 2), ("sub/deeper/a.png", 3),
                    ("c.jpeg", 4)]:
        if name.endswith("jpeg"):
            Image.fromarray(GREY[i]).save(folder / name, quality=100)
        else:
            _png(folder / name, GREY[i])
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "sub" / "._a.png").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        data = load(folder, split="all")
    assert data.labels is None and data.images.shape == (5, 1, 5, 6)
    for row, i in enumerate([1, 0, 4, 2, 3]):  # a, b, c.jpeg, sub/c, sub/deeper/a
        if i != 4:
            np.testing.assert_array_equal(data.images[row, 0].numpy(), GREY[i])
    assert "skipped 1 files that are not images (.txt: 1)" in caplog.text  # hidden: silent
    assert "no labels (the top level holds images" in caplog.text
    meta = data.metadata
    assert meta["num_files"] == 5 and meta["formats"] == {"PNG": 4, "JPEG": 1}
    assert meta["skipped"] == {"hidden": 2, ".txt": 1} and "classes" not in meta
    assert list(data.checksums) == ["pics/"] and json.loads(json.dumps(meta)) == meta


def test_class_subfolders_give_labels_and_names(tmp_path):
    folder = tmp_path / "animals"
    _png(folder / "dog" / "1.png", RGB[0])
    _png(folder / "cat" / "b" / "2.png", RGB[1])
    _png(folder / "cat" / "a.png", RGB[2])
    _png(folder / "Zebra" / "z.png", RGB[3])
    (folder / "README.md").write_text("the top level holds no images: sub-folders are classes")
    read = read_image_folder(folder)
    data = read.data
    assert data.metadata["classes"] == ["Zebra", "cat", "dog"]  # sorted like ImageFolder
    assert data.labels.tolist() == [0, 1, 1, 2]
    np.testing.assert_array_equal(data.images, RGB[[3, 2, 1, 0]].transpose(0, 3, 1, 2))
    assert data.metadata["skipped"] == {".md": 1}
    assert read.save_cache() is False  # no cache root given: nothing to write


def test_grey_and_colour_mixed(tmp_path, caplog):
    folder = tmp_path / "mixed"
    _png(folder / "a.png", GREY[0])
    _png(folder / "b.png", RGB[1])
    with caplog.at_level(logging.WARNING, logger="vaelab.data"):
        auto = load(folder, split="all")
    assert "1 grey and 1 colour images: the grey ones are repeated into 3 channels" in caplog.text
    assert auto.images.shape == (2, 3, 5, 6)
    for c in range(3):
        np.testing.assert_array_equal(auto.images[0, c].numpy(), GREY[0])
    grey = load(folder, split="all", channels=1)
    np.testing.assert_array_equal(grey.images[1, 0].numpy(),
                                  np.asarray(Image.fromarray(RGB[1]).convert("L")))
    np.testing.assert_array_equal(grey.images[0, 0].numpy(), GREY[0])
    assert grey.metadata["channels"] == {"requested": 1, "chosen": 1, "grey_images": 1,
                                         "colour_images": 1}
    only_grey = tmp_path / "grey"
    _png(only_grey / "a.png", GREY[2])
    assert load(only_grey, split="all").images.shape[1] == 1
    assert load(only_grey, split="all", channels=3).images.shape[1] == 3


def test_sixteen_bit_alpha_and_palette_images_in_one_folder(tmp_path, caplog):
    folder = tmp_path / "modes"
    _png(folder / "a16.png", GREY[0].astype(np.uint16) * 257)  # exact 8-bit values
    _png(folder / "b_rgba.png", np.dstack([RGB[1], np.full((5, 6), 7, np.uint8)]), mode="RGBA")
    Image.fromarray(RGB[2]).quantize(8).save(folder / "c_palette.png")
    with caplog.at_level(logging.WARNING, logger="vaelab.data"):
        data = load(folder, split="all")
    np.testing.assert_array_equal(data.images[0, 1].numpy(), GREY[0])
    np.testing.assert_array_equal(data.images[1].numpy(), RGB[1].transpose(2, 0, 1))
    assert data.metadata["conversions"] == {"16-bit": 1, "alpha dropped": 1, "palette": 1}
    assert "1 images had an alpha channel (transparency), dropped" in caplog.text
    assert "e.g. b_rgba.png" in caplog.text


def test_mixed_sizes_need_image_size(tmp_path):
    folder = tmp_path / "sizes"
    _png(folder / "a.png", RGB[0])
    _png(folder / "b.png", RNG.integers(0, 256, (9, 4, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"sizes: images differ in size: a.png is 5x6 but b.png "
                                        r"is 9x4 \(height x width\): pass --image-size N or HxW "
                                        r"\(data.image_size\) to resize them"):
        load(folder, split="all")
    data = load(folder, split="all", image_size="4x4")
    assert data.images.shape == (2, 3, 4, 4)
    assert data.metadata["image_size"]["original_sizes"] == {"5x6": 1, "9x4": 1}
    assert data.metadata["image_size"]["resizing"].startswith("LANCZOS with reducing_gap=3.0")


def _bomb(folder: Path) -> None:
    from test_data_images import _png_header_only

    _png(folder / "a.png", GREY[0])
    (folder / "b.png").write_bytes(_png_header_only(30_000, 30_000))


def _loop(folder: Path) -> None:
    _png(folder / "a" / "x.png", GREY[0])
    os.symlink("..", folder / "a" / "up")


def _self_link(folder: Path) -> None:
    _png(folder / "x.png", GREY[0])
    os.symlink("me", folder / "me")


def _broken_link(folder: Path) -> None:
    _png(folder / "x.png", GREY[0])
    os.symlink("missing.png", folder / "gone.png")


def _twice(folder: Path) -> None:
    _png(folder / "a" / "x.png", GREY[0])
    os.symlink("a", folder / "b")


def _corrupt(folder: Path) -> None:
    _png(folder / "a.png", GREY[0])
    data = (folder / "a.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])


def _empty_class(folder: Path) -> None:
    _png(folder / "cat" / "x.png", GREY[0])
    (folder / "dog").mkdir()
    (folder / "dog" / "notes.txt").write_text("x")


BAD_FOLDERS = {
    # name: (how to make the folder's contents, regex of the one-line error)
    "empty folder": (lambda f: None, r"pics holds no images \(.png, .jpg, .jpeg, .bmp, .gif, "
                                     r".webp, .ppm, .pgm, .pbm, .pnm\), directly or in "
                                     r"sub-folders: put the images there"),
    "only other files": (lambda f: [(f / n).write_text("x") for n in ("a.txt", "b.txt", "c.csv")],
                         r"pics holds no images .*; skipped .txt: 2, .csv: 1: put the images"),
    "corrupt image": (_corrupt, r"pics/b.png is not a readable PNG image \(.*\): replace it "
                                r"with a valid PNG file or remove it"),
    "decompression bomb": (_bomb, r"pics/b.png is 30000x30000 pixels, more than the 89,478,485 "
                                  r"vaelab accepts per image"),
    "symlink loop": (_loop, r"pics/a/up is a symbolic link back to .*pics, a folder that "
                            r"contains it \(a loop\): remove the link"),
    "self link": (_self_link, r"pics/me is a symbolic link loop \(it leads back to itself\): "
                              r"remove the link"),
    "broken link": (_broken_link, r"pics/gone.png is a broken symbolic link \(to missing.png\): "
                                  r"remove it or fix its target"),
    "same folder twice": (_twice, r"pics/b and .*pics/a are the same folder \(a symbolic link\), "
                                  r"so its images would be read twice: remove one"),
    "empty class folder": (_empty_class, r"class folder .*pics/dog holds no images \(each "
                                         r"sub-folder of .*pics is a class\): add images to it "
                                         r"or remove it"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_are_one_line_errors_and_write_nothing(tmp_path, case, cache):
    folder = tmp_path / "pics"
    folder.mkdir()
    make, message = BAD_FOLDERS[case]
    make(folder)
    before = _tree(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load(folder, split="train", validation_size=0)
    assert "\n" not in str(info.value)
    assert _tree(tmp_path) == before and not cache.exists()


def test_chunks_keep_the_order_and_the_first_bad_file_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "many"
    for i in range(12):
        _png(folder / f"{i:02d}.png", GREY[i])
    monkeypatch.setattr(folders, "CHUNK", 5)
    np.testing.assert_array_equal(load(folder, split="all", cache=False).images[:, 0].numpy(),
                                  GREY)
    for name in ("09.png", "05.png"):
        (folder / name).write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"many/05.png is not a readable PNG image"):
        load(folder, split="all", cache=False)


def test_the_cache_is_reused_and_invalidated(tmp_path, cache, caplog):
    folder = tmp_path / "animals"
    for i in range(6):
        _png(folder / ("cat" if i % 2 else "dog") / f"{i}.png", RGB[i])
    (folder / "x.txt").write_text("x")
    first = load(folder, split="all")
    assert first.metadata["cache"]["hit"] is False
    entries = sorted(p.name for p in (cache / "decoded").iterdir())
    assert len(entries) == 3 and entries[0].endswith(".json")  # json, labels.npy, npy
    with caplog.at_level(logging.WARNING, logger="vaelab.data"):
        second = load(folder, split="all")
    assert second.metadata["cache"]["hit"] is True
    assert "skipped 1 files that are not images" in caplog.text  # notes repeat from the cache
    assert torch_equal(first, second) and second.checksums == first.checksums
    strip = ("cache",)
    assert {k: v for k, v in second.metadata.items() if k not in strip} == \
        {k: v for k, v in first.metadata.items() if k not in strip}
    # other options: another entry; a changed file: decoded again
    assert load(folder, split="all", channels=1).metadata["cache"]["hit"] is False
    assert len(list((cache / "decoded").iterdir())) == 6
    path = folder / "cat" / "1.png"
    _png(path, RGB[7])
    os.utime(path, ns=(1, 1))
    changed = load(folder, split="all")
    assert changed.metadata["cache"]["hit"] is False
    np.testing.assert_array_equal(changed.images[0].numpy(), RGB[7].transpose(2, 0, 1))
    assert changed.checksums != first.checksums
    assert load(folder, split="all").metadata["cache"]["hit"] is True


def torch_equal(a, b) -> bool:
    return bool((a.images == b.images).all()) and bool((a.labels == b.labels).all())


def test_a_damaged_cache_entry_is_never_trusted(tmp_path, cache, caplog):
    folder = tmp_path / "pics"
    for i in range(3):
        _png(folder / f"{i}.png", GREY[i])
    load(folder, split="all")
    (images,) = (cache / "decoded").glob("*[0-9a-f].npy")
    array = np.load(images)
    array[0, 0, 0, 0] ^= 1
    np.save(images, array)
    with caplog.at_level(logging.WARNING, logger="vaelab.data"):
        again = load(folder, split="all")
    assert "ignoring the damaged cache entry" in caplog.text
    assert "the images do not match their recorded SHA-256" in caplog.text
    assert again.metadata["cache"]["hit"] is False
    np.testing.assert_array_equal(again.images[:, 0].numpy(), GREY[:3])
    (cache / "decoded" / images.with_suffix(".json").name).write_text("{not json")
    assert load(folder, split="all").metadata["cache"]["hit"] is False


def test_cache_off_overridden_or_unwritable(tmp_path, cache, caplog):
    folder = tmp_path / "pics"
    for i in range(3):
        _png(folder / f"{i}.png", GREY[i])
    assert load(folder, split="all", cache=False).metadata["cache"] is None
    assert not cache.exists()
    elsewhere = tmp_path / "elsewhere"
    assert load(folder, split="all", cache_dir=elsewhere).metadata["cache"]["path"].startswith(
        str(elsewhere))
    assert not cache.exists() and len(list(elsewhere.iterdir())) == 2
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="vaelab.data"):
        data = load(folder, split="all", cache_dir=blocked)
    assert len(data) == 3 and "could not write the decoded-image cache" in caplog.text


def test_no_cache_is_written_when_a_later_check_refuses_the_data(tmp_path, cache):
    folder = tmp_path / "pics"
    for i in range(10):
        _png(folder / f"{i}.png", GREY[i])
    with pytest.raises(ConfigError, match=r"validation_size 5000 leaves no training data .*: "
                                          r"choose a smaller value, e\.g\. --set "
                                          r"data.validation_size=1"):
        load(folder, split="train")
    assert not cache.exists()
    load(folder, split="train", validation_size=2)
    assert len(list((cache / "decoded").iterdir())) == 2


def test_progress_shows_lines_when_not_a_terminal_and_nothing_when_quick():
    stream = io.StringIO()
    with Progress(100, "reading pics", stream=stream, delay=0.0) as bar:
        for _ in range(20):
            bar.update(5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 9  # 10%, 20%, ..., 90% (not 100%: that is the end)
    assert lines[0].startswith("vaelab: reading pics: 10/100 images (10%), 0 s, about ")
    quiet = io.StringIO()
    with Progress(100, "reading pics", stream=quiet, delay=60.0) as bar:
        bar.update(100)
    assert quiet.getvalue() == ""
    off = io.StringIO()
    with Progress(100, "x", enabled=False, stream=off, delay=0.0) as bar:
        bar.update(50)
    assert off.getvalue() == ""
