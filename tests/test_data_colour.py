"""CIFAR-10 (binary archive) and SVHN (MAT-files): readers on synthetic files of the same
format, refusals, and verified downloads from a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest

from vaelab.data import DATASETS, cifar, load, matfile, sources, svhn
from vaelab.data.testing import (
    LocalHTTPServer,
    Route,
    write_cifar10_dataset,
    write_svhn_dataset,
)
from vaelab.errors import DataError

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_record_layout():
    """A record is the label, then 1024 R, 1024 G, 1024 B values in row-major order."""
    record = np.zeros(cifar.RECORD_BYTES, np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 2 * 32 + 5] = 11  # red at row 2, column 5
    record[1 + 2 * 1024 + 31 * 32 + 0] = 22  # blue at row 31, column 0
    images, labels = cifar.parse_batch(record.tobytes() * 2, "batch")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [7, 7]
    assert images[1, 0, 2, 5] == 11 and images[1, 2, 31, 0] == 22 and images.sum() == 2 * 33
    assert images.flags.writeable


def test_cifar_archive_round_trip(tmp_path):
    spec, arrays = write_cifar10_dataset(tmp_path, per_batch=3)
    data = gzip.decompress((tmp_path / "cifar-10-binary.tar.gz").read_bytes())
    for part in ("train", "test"):
        images, labels = cifar.read_archive(data, "archive", part)
        np.testing.assert_array_equal(images, arrays[f"{part}_images"])
        np.testing.assert_array_equal(labels, arrays[f"{part}_labels"])
    assert len(arrays["train_images"]) == 15 and len(arrays["test_images"]) == 3


def _tar(members: dict[str, bytes], kind=tarfile.REGTYPE, link: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(data), kind, link
            if kind != tarfile.REGTYPE:
                info.size = 0
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


RECORD = bytes(cifar.RECORD_BYTES)
TEST_MEMBER = cifar.PREFIX + "test_batch.bin"


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (_tar({"../../etc/evil": b"x", TEST_MEMBER: RECORD}), r"holds a member with an unsafe "
                                                             r"path '../../etc/evil'"),
        (_tar({"/abs/path": b"x"}), r"unsafe path '/abs/path'"),
        (_tar({TEST_MEMBER: b""}, tarfile.SYMTYPE, "/etc/passwd"),
         r"test_batch.bin is not a regular file \(a link or device\)"),
        (_tar({TEST_MEMBER: RECORD[:-1]}), r"holds 3072 bytes, not a whole number of 3073-byte "
                                           r"CIFAR-10 records"),
        (_tar({TEST_MEMBER: b"\x0a" + RECORD[1:]}), r"holds label 10 \(CIFAR-10 labels are "
                                                    r"0..9\)"),
        (_tar({cifar.PREFIX + "data_batch_1.bin": RECORD}), r"lacks cifar-10-batches-bin/"
                                                            r"test_batch.bin: it is not the "
                                                            r"CIFAR-10 binary archive"),
        (_tar({f"f{i}": b"" for i in range(cifar.MAX_MEMBERS + 1)}), r"holds more than 64 "
                                                                     r"entries"),
        (b"<html>Moved</html>" + bytes(600), r"is not a readable tar archive"),
    ],
    ids=["traversal", "absolute", "symlink", "partial record", "bad label", "missing member",
         "too many members", "not a tar"],
)
def test_cifar_archive_refusals(tar, message):
    with pytest.raises(DataError, match=message) as info:
        cifar.read_archive(tar, "cifar-10-binary.tar.gz", "test")
    assert "\n" not in str(info.value) and "delete it and download it again" in str(info.value)


def test_an_oversized_member_is_refused_before_it_is_read(monkeypatch):
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", cifar.RECORD_BYTES)
    with pytest.raises(DataError, match=r"test_batch.bin has 6146 bytes, more than a CIFAR-10 "
                                        r"batch \(3073\)"):
        cifar.read_archive(_tar({TEST_MEMBER: RECORD * 2}), "a.tar.gz", "test")


# --------------------------------------------------------------------------- MAT-files / SVHN


def test_svhn_axes_and_label_ten_is_zero(tmp_path):
    images = RNG.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    path = svhn.write_svhn(tmp_path / "s.mat", images, np.array([0, 5, 9]))
    variables = matfile.parse_mat(path.read_bytes(), path)
    assert variables["X"].shape == (32, 32, 3, 3) and variables["y"].ravel().tolist() == [10, 5, 9]
    # MATLAB's X(row, column, channel, image) is vaelab's images[image, channel, row, column]
    assert variables["X"][4, 7, 2, 1] == images[1, 2, 4, 7]
    read, labels = svhn.parse_svhn(path.read_bytes(), path)
    np.testing.assert_array_equal(read, images)
    assert labels.tolist() == [0, 5, 9] and labels.dtype == np.int64


@pytest.mark.parametrize("compress", [True, False])
def test_mat_reader_agrees_with_scipy(tmp_path, compress):
    sio = pytest.importorskip("scipy.io")
    x = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10.0], [1.0], [3.0], [10.0]])
    path = tmp_path / "scipy.mat"
    sio.savemat(path, {"X": x, "y": y}, do_compression=compress)  # names as small elements
    variables = matfile.parse_mat(path.read_bytes(), path)
    np.testing.assert_array_equal(variables["X"], x)
    np.testing.assert_array_equal(variables["y"], y)
    assert variables["y"].dtype == np.float64
    ours = matfile.write_mat(tmp_path / "ours.mat", {"X": x, "y": y}, compress=compress,
                             stored={"y": np.dtype(np.uint8)})  # doubles stored as uint8
    back = sio.loadmat(ours, mat_dtype=True)
    np.testing.assert_array_equal(back["X"], x)
    np.testing.assert_array_equal(back["y"], y)


def _mat_header(text: bytes = b"MATLAB 5.0 MAT-file", indicator: bytes = b"IM") -> bytes:
    return text.ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0100) + indicator


def _compressed(payload: bytes) -> bytes:
    packed = zlib.compress(payload)
    return struct.pack("<II", matfile.MI_COMPRESSED, len(packed)) + packed


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html>" + bytes(200), r"no 'MATLAB 5.0 MAT-file' header; starts with '<html>"),
        (_mat_header(b"MATLAB 7.3 MAT-file") + bytes(8), r"a v7.3 \(HDF5\) MAT-file"),
        (_mat_header(indicator=b"XX"), r"endian indicator b'XX'"),
        (_mat_header() + struct.pack("<II", 14, 400) + bytes(16), r"declares 400 bytes but only "
                                                                   r"16 follow \(truncated"),
        (_mat_header() + struct.pack("<II", 15, 10) + b"not zlib..", r"damaged compressed "
                                                                     r"element"),
        (_mat_header() + struct.pack("<II", 15, 9) + zlib.compress(bytes(100))[:9],
         r"a compressed element is truncated"),
        (_mat_header() + struct.pack("<II", 9, 8) + bytes(8), r"a top-level element of type 9, "
                                                              r"expected a matrix"),
    ],
    ids=["html", "v7.3", "endian", "truncated", "bad zlib", "truncated zlib", "not a matrix"],
)
def test_mat_reader_refusals(data, message):
    with pytest.raises(DataError, match=message) as info:
        matfile.parse_mat(data, "train_32x32.mat")
    assert str(info.value).startswith("train_32x32.mat is not a MAT-file vaelab can read (")


def test_mat_reader_refuses_non_numeric_and_bombs(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    sio.savemat(tmp_path / "c.mat", {"X": np.array(["text"]), "y": np.ones((2, 1))})
    with pytest.raises(DataError, match=r"variable 'X' is a char array; only numeric arrays"):
        matfile.parse_mat((tmp_path / "c.mat").read_bytes(), "c.mat")
    sio.savemat(tmp_path / "z.mat", {"X": np.ones((2, 2)) + 1j})
    with pytest.raises(DataError, match=r"variable 'X' is complex"):
        matfile.parse_mat((tmp_path / "z.mat").read_bytes(), "z.mat")
    monkeypatch.setattr(matfile, "MAX_ELEMENT_BYTES", 1000)
    bomb = _mat_header() + _compressed(bytes(5000))
    with pytest.raises(DataError, match=r"inflates to more than 1000 bytes \(a zlib bomb\?\)"):
        matfile.parse_mat(bomb, "bomb.mat")


def test_svhn_file_with_wrong_variables(tmp_path):
    path = matfile.write_mat(tmp_path / "w.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8),
                                                   "y": np.ones((2, 1))})
    with pytest.raises(DataError, match=r"X is uint8 of shape \(28, 28, 1, 2\), expected uint8 "
                                        r"\(32, 32, 3, N\)"):
        svhn.parse_svhn(path.read_bytes(), path)
    path = matfile.write_mat(tmp_path / "v.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                   "y": np.zeros((2, 1))})
    with pytest.raises(DataError, match=r"y of shape \(2, 1\) is not one label 1..10"):
        svhn.parse_svhn(path.read_bytes(), path)
    path = matfile.write_mat(tmp_path / "k.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(DataError, match=r"holds variables \['images'\], not SVHN's 'X' and 'y'"):
        svhn.parse_svhn(path.read_bytes(), path)


# --------------------------------------------------------------------------- downloads


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache and locations, no proxies, short timeouts."""
    for var in ("VAELAB_DATA_DIR", "VAELAB_MIRRORS", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_SYSTEM_DATA_DIRS", "")
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 5.0)
    return tmp_path


WRITERS = {"tiny-cifar": (write_cifar10_dataset, "VAELAB_MIRRORS_TINY_CIFAR"),
           "tiny-svhn": (write_svhn_dataset, "VAELAB_MIRRORS_TINY_SVHN")}


@pytest.mark.parametrize("name", list(WRITERS))
def test_verified_download_and_splits(env, monkeypatch, name):
    write, variable = WRITERS[name]
    spec, arrays = write(env / "origin", name=name)
    monkeypatch.setitem(DATASETS._entries, name, spec)
    with LocalHTTPServer(timeout=5.0) as server:
        server.serve_directory(env / "origin", prefix="/m")
        monkeypatch.setenv(variable, server.url("/m"))
        test = load(name, split="test")
        train = load(name, split="train", validation_size=4, seed=1)
        validation = load(name, split="validation", validation_size=4, seed=1)
    np.testing.assert_array_equal(test.images.numpy(), arrays["test_images"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test_labels"])
    n = len(arrays["train_images"])
    assert len(train) == n - 4 and len(validation) == 4
    together = np.concatenate([train.images.numpy(), validation.images.numpy()])
    assert sorted(map(bytes, together)) == sorted(map(bytes, arrays["train_images"]))
    assert test.metadata["classes"] == list(spec.classes) and test.event_shape == (3, 32, 32)
    for remote in spec.files:
        cached = env / "cache" / name / remote.name
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == remote.sha256
    assert test.metadata["found_in"]["step"] == "download"
    assert validation.metadata["found_in"]["step"] == "user cache"  # downloaded once
    assert len(server.requests) == len(spec.files)  # CIFAR-10: one archive for both parts


def test_a_tampered_archive_is_refused_and_not_cached(env, monkeypatch):
    spec, _ = write_cifar10_dataset(env / "origin", name="tiny-cifar")
    monkeypatch.setitem(DATASETS._entries, "tiny-cifar", spec)
    good = (env / "origin" / "cifar-10-binary.tar.gz").read_bytes()
    evil = gzip.compress(_tar({"../escape": b"x", TEST_MEMBER: RECORD}), mtime=0)
    with LocalHTTPServer(timeout=5.0) as server:
        server.routes["/bad/cifar-10-binary.tar.gz"] = Route(evil)
        monkeypatch.setenv("VAELAB_MIRRORS_TINY_CIFAR", server.url("/bad"))
        with pytest.raises(DataError, match=r"could not download tiny-cifar file "
                                            r"cifar-10-binary.tar.gz from any mirror .*got "
                                            rf"{len(evil)} bytes, expected {len(good)}"):
            load("tiny-cifar", split="test")
    assert not (env / "cache" / "tiny-cifar" / "cifar-10-binary.tar.gz").exists()
    assert not (env / "escape").exists()


def test_registered_entries_name_their_catalogue():
    cifar10, svhn_spec = DATASETS["cifar10"], DATASETS["svhn"]
    assert cifar10.format == "cifar10-bin" and cifar10.files[0].size == 170052171
    assert cifar10.files[0].sha256 == ("c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a"
                                       "59bca1dd")
    assert cifar10.classes == cifar.CLASSES and cifar10.image_shape == (3, 32, 32)
    assert [f.size for f in svhn_spec.files] == [182040794, 64275384]
    assert svhn_spec.file("test_32x32.mat").sha256.startswith("cdce80dfb2a2c4c6")
    for spec in (cifar10, svhn_spec):
        assert all("url_checksums" in f.source for f in spec.files)
