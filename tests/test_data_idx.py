"""The strict idx and .amat readers: exact round-trips and one error per malformed case."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from vaelab.data import parse_amat, read_amat, read_idx, write_amat, write_idx
from vaelab.errors import DataError


def _header(code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "shape", [(7,), (5, 3, 4), (2, 1, 3, 3), (0, 28, 28)], ids=["labels", "images", "4d", "empty"]
)
def test_idx_round_trip_is_exact(tmp_path, suffix, shape):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path / f"data-idx{len(shape)}-ubyte{suffix}", array)
    raw = path.read_bytes()
    assert raw.startswith(b"\x1f\x8b") == (suffix == ".gz")
    payload = gzip.decompress(raw) if suffix else raw
    # the bytes are the documented layout: magic 0x0000080n, big-endian dims, C-order data
    assert payload == _header(0x08, shape) + array.tobytes()
    back = read_idx(path, ndim=len(shape))
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_gzip_output_is_reproducible(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    first = write_idx(tmp_path / "a.gz", array).read_bytes()
    second = write_idx(tmp_path / "b.gz", array).read_bytes()
    assert first == second  # mtime 0 in the gzip header


def test_the_format_is_detected_from_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw_named_gz = tmp_path / "raw.gz"
    raw_named_gz.write_bytes(_header(0x08, (3, 4)) + array.tobytes())
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


def test_writer_refuses_non_uint8(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.float32))


_GOOD = _header(0x08, (2, 2, 2)) + bytes(range(8))
MALFORMED = {
    # name: (file bytes, regex the error must match)
    "html page": (
        b"<html><body>404 Not Found</body></html>",
        r"not an idx file \(magic 0x3c68746d, starts with '<htm' — an HTML page\?\)",
    ),
    "wrong magic": (b"\x12\x34\x08\x03" + _GOOD[4:], r"not an idx file \(magic 0x12340803"),
    "wrong dtype code": (
        _header(0x0D, (2, 2, 2)) + bytes(32),
        r"dtype code 0x0d \(float32\); vaelab reads only 0x08",
    ),
    "wrong number of dims": (
        _header(0x08, (8,)) + bytes(range(8)),
        r"has 1 dimensions \(magic 0x00000801\) but 3 were expected",
    ),
    "truncated header": (_GOOD[:9], r"truncated inside its header \(9 of 16 bytes\)"),
    "truncated data": (_GOOD[:-3], r"truncated: the header promises shape \(2, 2, 2\) \(24 bytes\) "
                       r"but the file holds 21 bytes"),
    "trailing bytes": (_GOOD + b"\x00\x00", r"has 2 trailing bytes after the shape \(2, 2, 2\)"),
    "too short": (b"\x00\x00", r"too short to be an idx file \(2 bytes\)"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_idx_file_gets_its_error(tmp_path, case, compress):
    data, message = MALFORMED[case]
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)  # the error names the file
    assert "\n" not in str(info.value)


def test_html_page_saved_as_gz_names_file_and_fix(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"<!DOCTYPE html><html>Moved</html>")
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not an idx file (magic 0x3c21444f, starts with '<!DO'")
    assert "an HTML page?" in message and "delete it and download again" in message


def test_damaged_gzip_is_reported(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_header(0x08, (100,)) + bytes(100))[:-12])
    with pytest.raises(DataError, match=r"damaged or truncated gzip file"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_amat_round_trip_and_exact_layout(tmp_path, suffix):
    bits = np.random.default_rng(2).integers(0, 2, (5, 16), dtype=np.uint8)
    path = write_amat(tmp_path / "x.amat", bits)
    text = path.read_bytes()
    assert len(text) == 5 * 16 * 2 and text.splitlines()[0] == " ".join(map(str, bits[0])).encode()
    if suffix:
        path = tmp_path / "x.amat.gz"
        path.write_bytes(gzip.compress(text))
    back = read_amat(path, width=16)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, bits)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"0 1 1\n", r"not a 4-column .* 6 bytes is not a multiple of 8"),
        (b"0 1 2 1\n", r"line 1 value 3 is '2', not 0 or 1"),
        (b"0 1 1 1 ", "single spaces"),
        (b"0,1,1,1\n", "single spaces"),
        (b"<htm" + b"l>..", r"line 1 value 1 is '<'"),
    ],
)
def test_malformed_amat(data, message):
    with pytest.raises(DataError, match=message):
        parse_amat(data, "binarized_mnist_test.amat", width=4)
