"""Resolution order, on-disk verification, overrides, and the dataset registry's table."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil

import platformdirs
import pytest

from vaelab.data import (
    DATASETS,
    SYSTEM_DATA_DIRS,
    cache_dir,
    load,
    mirror_env_var,
    mirrors_for,
    sources,
    system_data_dirs,
)
from vaelab.data.testing import LocalHTTPServer, write_idx_dataset
from vaelab.errors import ConfigError, DataError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Dataset 'tiny' registered; isolated cache, system dir and data dirs (all empty)."""
    for var in ("VAELAB_DATA_DIR", "VAELAB_MIRRORS", "VAELAB_MIRRORS_TINY", "http_proxy",
                "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    dirs = {k: tmp_path / k for k in ("explicit", "env", "cache", "system")}
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(dirs["cache"]))
    monkeypatch.setenv("VAELAB_SYSTEM_DATA_DIRS", str(dirs["system"]))
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 5.0)
    spec, arrays = write_idx_dataset(tmp_path / "origin", name="tiny")
    monkeypatch.setitem(DATASETS._entries, "tiny", spec)
    return {"spec": spec, "arrays": arrays, "origin": tmp_path / "origin", "mp": monkeypatch,
            **dirs}


def _place(tiny, directory, names=TEST_FILES):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(tiny["origin"] / name, directory / name)
    return directory


def _steps(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "vaelab.data"]


def test_resolution_order_explicit_env_cache_system_download(tiny, caplog):
    explicit = _place(tiny, tiny["explicit"] / "tiny")
    env = _place(tiny, tiny["env"] / "tiny")
    cache = _place(tiny, tiny["cache"] / "tiny")
    system = _place(tiny, tiny["system"] / "tiny")
    tiny["mp"].setenv("VAELAB_DATA_DIR", str(tiny["env"]))
    expected = [
        ("data_dir argument", explicit, {"data_dir": tiny["explicit"]}),
        ("VAELAB_DATA_DIR", env, {}),
        ("user cache", cache, {}),
        ("system directory", system, {}),
    ]
    for step, directory, kwargs in expected:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vaelab.data"):
            test = load("tiny", split="test", **kwargs)
        assert test.metadata["found_in"] == {"step": step, "directory": str(directory)}
        assert test.metadata["files"][0]["path"] == str(directory / TEST_FILES[0])
        assert _steps(caplog)[-1] == f"tiny: looking in {directory} ({step}) ... found " \
                                     f"(sha256 of the file)"
        # remove this location so that the next one is used
        shutil.rmtree(directory)
        if step == "VAELAB_DATA_DIR":
            tiny["mp"].delenv("VAELAB_DATA_DIR")
    # nothing on disk any more: step 5 downloads into the cache
    with LocalHTTPServer(timeout=5.0) as server:
        server.serve_directory(tiny["origin"])
        tiny["mp"].setenv("VAELAB_MIRRORS", server.url())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vaelab.data"):
            test = load("tiny", split="test")
    assert test.metadata["found_in"]["step"] == "download"
    assert _steps(caplog) == [
        "tiny: data_dir argument: not given",
        "tiny: VAELAB_DATA_DIR: not set",
        f"tiny: looking in {cache} (user cache) ... no such directory",
        f"tiny: looking in {system} (system directory) ... no such directory",
        f"tiny: downloading {TEST_FILES[0]} from {server.url()}/{TEST_FILES[0]} into {cache} "
        f"... done",
        f"tiny: downloading {TEST_FILES[1]} from {server.url()}/{TEST_FILES[1]} into {cache} "
        f"... done",
    ]


def test_files_directly_in_data_dir_or_in_named_subfolder(tiny):
    flat = _place(tiny, tiny["explicit"])
    assert load("tiny", split="test", data_dir=flat).metadata["found_in"]["directory"] == str(flat)
    nested = _place(tiny, tiny["explicit"] / "tiny")
    assert load("tiny", split="test", data_dir=flat).metadata["found_in"]["directory"] == \
        str(nested)  # <dir>/<name>/ is looked at first


def test_incomplete_location_is_skipped_with_a_log_line(tiny, caplog):
    _place(tiny, tiny["explicit"], names=TEST_FILES[:1])
    system = _place(tiny, tiny["system"] / "tiny")
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        test = load("tiny", split="test", data_dir=tiny["explicit"])
    assert test.metadata["found_in"]["directory"] == str(system)
    assert f"tiny: looking in {tiny['explicit']} (data_dir argument) ... incomplete, missing " \
           f"{TEST_FILES[1]}" in _steps(caplog)


def test_decompressed_and_recompressed_copies_verify_by_content(tiny):
    directory = tiny["explicit"]
    directory.mkdir()
    images, labels = TEST_FILES
    # a gunzip-ed copy under the name without .gz, and a differently compressed .gz copy
    raw = gzip.decompress((tiny["origin"] / images).read_bytes())
    (directory / images[:-3]).write_bytes(raw)
    recompressed = gzip.compress(gzip.decompress((tiny["origin"] / labels).read_bytes()),
                                 compresslevel=1, mtime=12345)
    assert recompressed != (tiny["origin"] / labels).read_bytes()
    (directory / labels).write_bytes(recompressed)
    test = load("tiny", split="test", data_dir=directory)
    spec = tiny["spec"]
    assert test.checksums == {images[:-3]: spec.file(images).content_sha256,
                              labels[:-3]: spec.file(labels).content_sha256}
    assert {f["verified"] for f in test.metadata["files"]} == {sources.VERIFIED_CONTENT}
    assert test.images[:, 0].numpy().tolist() == tiny["arrays"][images].tolist()


@pytest.mark.parametrize("where", ["explicit", "cache"])
def test_wrong_file_is_refused_never_trusted_or_deleted(tiny, where):
    directory = tiny[where] if where == "explicit" else tiny["cache"] / "tiny"
    _place(tiny, directory)
    images = directory / TEST_FILES[0]
    tampered = gzip.compress(gzip.decompress(images.read_bytes())[:-1] + b"\x07", mtime=0)
    images.write_bytes(tampered)
    _place(tiny, tiny["system"] / "tiny")  # a good copy later in the order is NOT used instead
    kwargs = {"data_dir": tiny["explicit"]} if where == "explicit" else {}
    with pytest.raises(DataError) as info:
        load("tiny", split="test", **kwargs)
    message = str(info.value)
    remote = tiny["spec"].file(TEST_FILES[0])
    assert message.startswith(f"{images} does not match tiny's published checksum for "
                              f"{TEST_FILES[0]} (expected sha256 {remote.sha256} or "
                              f"decompressed sha256 {remote.content_sha256}; got sha256 ")
    assert re.search(r"got sha256 [0-9a-f]{64}, decompressed sha256 [0-9a-f]{64}\)", message)
    assert "delete it (vaelab will download it again)" in message
    assert images.read_bytes() == tampered  # left in place for the user to inspect


def test_html_page_on_disk_is_refused(tiny):
    directory = _place(tiny, tiny["explicit"])
    (directory / TEST_FILES[1]).write_bytes(b"<html><body>Error 403</body></html>")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz is not a tiny data file "
                                        r"\(starts with '<htm' — an HTML page\?\)"):
        load("tiny", split="test", data_dir=directory)


def test_missing_explicit_data_dir_is_an_error(tiny):
    with pytest.raises(DataError, match=r"data_dir .*nowhere is not a directory"):
        load("tiny", split="test", data_dir=tiny["explicit"] / "nowhere")


def test_overrides_of_cache_system_dirs_and_mirrors(tiny, monkeypatch):
    assert cache_dir() == tiny["cache"]
    monkeypatch.delenv("VAELAB_CACHE_DIR")
    assert cache_dir() == type(cache_dir())(platformdirs.user_cache_dir("vaelab"))
    assert system_data_dirs() == (tiny["system"],)
    monkeypatch.setenv("VAELAB_SYSTEM_DATA_DIRS", os.pathsep.join(["/a", "", "/b"]))
    assert [str(p) for p in system_data_dirs()] == ["/a", "/b"]
    monkeypatch.delenv("VAELAB_SYSTEM_DATA_DIRS")
    assert [str(p) for p in system_data_dirs()] == list(SYSTEM_DATA_DIRS)
    assert SYSTEM_DATA_DIRS[0] == "/usr/share/datasets"
    spec = DATASETS["fashion-mnist"]
    assert mirror_env_var("fashion-mnist") == "VAELAB_MIRRORS_FASHION_MNIST"
    assert mirrors_for(spec) == spec.mirrors
    monkeypatch.setenv("VAELAB_MIRRORS", "http://all.example/, http://b.example")
    assert mirrors_for(spec) == ("http://all.example/", "http://b.example")
    monkeypatch.setenv("VAELAB_MIRRORS_FASHION_MNIST", "http://one.example")
    assert mirrors_for(spec) == ("http://one.example",)  # the per-dataset variable wins


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar100': choose one of "
                                          r"binarized-mnist, cifar10, fashion-mnist, kmnist, "
                                          r"mnist, svhn, or give a .npz/.npy file or a folder "
                                          r"of images"):
        load("cifar100")
    with pytest.raises(DataError, match=r"missing.npz does not exist"):
        load("missing.npz")


# One row per registered dataset: (number of files, levels, size of the training images
# file in bytes as published). A new registry entry without a row fails the first test.
REGISTRY_EXAMPLES = {
    "mnist": (4, 256, 9912422),
    "fashion-mnist": (4, 256, 26421880),
    "kmnist": (4, 256, 18165135),
    "binarized-mnist": (3, 2, 78400000),
    "cifar10": (1, 256, 170052171),
    "svhn": (2, 256, 182040794),
}


def test_every_registered_dataset_has_an_example_row():
    assert sorted(DATASETS) == sorted(REGISTRY_EXAMPLES)


@pytest.mark.parametrize("name", sorted(REGISTRY_EXAMPLES))
def test_registry_entries_are_complete(name):
    spec = DATASETS[name]
    n_files, levels, train_size = REGISTRY_EXAMPLES[name]
    assert spec.name == name and len(spec.files) == n_files and spec.levels == levels
    assert spec.files_for("train")[0].size == train_size
    assert {n for names in spec.parts.values() for n in names} == {f.name for f in spec.files}
    for remote in spec.files:
        assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote.name  # all verified
        assert remote.content_sha256 is None or re.fullmatch(r"[0-9a-f]{64}",
                                                              remote.content_sha256)
        assert remote.size > 0 and "tensorflow/datasets" in remote.source
    assert len(spec.mirrors) >= 1 and all(m.startswith("http") for m in spec.mirrors)
    if spec.format == "idx":
        assert len(spec.mirrors) >= 2  # several mirrors tried in order
        assert {p: len(n) for p, n in spec.parts.items()} == {"train": 2, "test": 2}


def test_decompressed_copy_without_content_checksum_is_refused_with_a_hint(tiny, monkeypatch):
    import dataclasses

    spec = tiny["spec"]
    files = tuple(dataclasses.replace(f, content_sha256=None) for f in spec.files)
    monkeypatch.setitem(DATASETS._entries, "tiny", dataclasses.replace(spec, files=files))
    directory = _place(tiny, tiny["explicit"], names=TEST_FILES[1:])
    raw = gzip.decompress((tiny["origin"] / TEST_FILES[0]).read_bytes())
    (directory / TEST_FILES[0][:-3]).write_bytes(raw)
    with pytest.raises(DataError, match=r"a decompressed copy of tiny cannot be verified: keep "
                                        r"the .gz file"):
        load("tiny", split="test", data_dir=directory)


# --------------------------------------------------------------------------- compressed copies

COMPRESSORS = {".gz": gzip.compress, ".xz": lambda b: __import__("lzma").compress(b),
               ".bz2": lambda b: __import__("bz2").compress(b)}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_registered_file_may_sit_compressed_beside_its_name(tmp_path, monkeypatch, suffix):
    """Issue 24: Larochelle's files are shipped as binarized_mnist_*.amat.gz; the registry
    pins the SHA-256 of the .amat files. A compressed copy (.gz, .xz, .bz2) beside the
    official name is read, verified by its decompressed content, and gives the same images;
    a copy whose content differs is refused with both hashes."""
    from vaelab.data.testing import write_amat_dataset

    spec, arrays = write_amat_dataset(tmp_path / "plain", name="tiny-binary")
    monkeypatch.setitem(DATASETS._entries, "tiny-binary", spec)
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in arrays:
        raw = (tmp_path / "plain" / name).read_bytes()
        (packed / (name + suffix)).write_bytes(COMPRESSORS[suffix](raw))
    for split in ("train", "validation", "test"):
        want = load("tiny-binary", split=split, data_dir=tmp_path / "plain")
        got = load("tiny-binary", split=split, data_dir=packed)
        assert (got.images == want.images).all() and got.checksums == want.checksums
        info = got.metadata["files"][0]
        assert info["verified"] == sources.VERIFIED_CONTENT
        assert info["path"].endswith(suffix) and info["checksum_name"].endswith(".amat")
    bad = packed / f"tiny-binary_test.amat{suffix}"
    raw = bytearray((tmp_path / "plain" / "tiny-binary_test.amat").read_bytes())
    raw[0] = ord("1") if raw[0] == ord("0") else ord("0")  # one pixel flipped
    bad.write_bytes(COMPRESSORS[suffix](bytes(raw)))
    with pytest.raises(DataError, match="does not match tiny-binary's published checksum"):
        load("tiny-binary", split="test", data_dir=packed)
    bad.write_bytes(COMPRESSORS[suffix](bytes(raw))[:-20])  # truncated
    with pytest.raises(DataError, match="damaged or truncated"):
        load("tiny-binary", split="test", data_dir=packed)


LAROCHELLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                          "binarized-mnist")


@pytest.mark.skipif(not os.path.isfile(os.path.join(LAROCHELLE, "binarized_mnist_test.amat.gz")),
                    reason="Larochelle's binarized MNIST (.amat.gz) is not in ../shared/data")
def test_larochelles_compressed_files_verify_against_the_registry():
    sizes = {"train": 50_000, "validation": 10_000, "test": 10_000}
    for split, n in sizes.items():
        images = load("binarized-mnist", split=split, data_dir=LAROCHELLE)
        assert images.images.shape == (n, 1, 28, 28) and images.levels == 2
        info = images.metadata["files"][0]
        assert info["verified"] == sources.VERIFIED_CONTENT and info["path"].endswith(".gz")
        assert images.metadata["binarization"]["draw"].startswith(
            "the dataset's official fixed binarisation")
