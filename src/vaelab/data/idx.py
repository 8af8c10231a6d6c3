"""Strict readers and writers for the MNIST idx format and Larochelle's ``.amat`` text format.

The idx format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <dtype code> <number of dimensions>``, then one big-endian uint32 per dimension,
then the values in C order. vaelab reads only dtype code ``0x08`` (unsigned byte), which is
what MNIST, Fashion-MNIST and KMNIST use. Files may be gzip-compressed (detected from the
content, not the name). Every inconsistency is an error naming the file and the problem:
a truncated or padded file is never read "as far as it goes".

``.amat`` (binarized MNIST of Larochelle & Murray, 2011): one example per line, 784 values
``0``/``1`` separated by single spaces, lines ending in ``\\n``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = [
    "IDX_UBYTE",
    "GZIP_MAGIC",
    "MAX_DECOMPRESSED_BYTES",
    "decompress",
    "describe_start",
    "parse_idx",
    "read_idx",
    "write_idx",
    "parse_amat",
    "read_amat",
    "write_amat",
]

IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
#: Compressions a dataset file may come in, by magic number: (name, opener, its errors).
COMPRESSIONS = (
    (GZIP_MAGIC, "gzip", lambda f: gzip.GzipFile(fileobj=f), (EOFError, OSError, zlib.error)),
    (XZ_MAGIC, "xz", lzma.LZMAFile, (EOFError, OSError, lzma.LZMAError)),
    (BZIP2_MAGIC, "bzip2", bz2.BZ2File, (EOFError, OSError, ValueError)),
)
#: Suffixes of a compressed copy of a file stored beside its official name.
COMPRESSED_SUFFIXES = (".gz", ".xz", ".bz2")
MAX_DECOMPRESSED_BYTES = 1 << 30
"""Largest decompressed size accepted (MNIST's training images are 47,040,016 bytes)."""
_DTYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_REFETCH = "delete it and download again or place the official file there"


def describe_start(data: bytes) -> str:
    """Describe the first bytes of ``data`` for an error message, e.g. ``starts with '<htm'``."""
    head = data[:4]
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in head)
    hint = " — an HTML page?" if data.lstrip()[:1] == b"<" else ""
    return f"starts with {text!r}{hint}"


def decompress(data: bytes, source: str | Path) -> bytes:
    """Decompress ``data`` if it starts with the magic number of gzip, xz or bzip2, else
    return it unchanged.

    At most :data:`MAX_DECOMPRESSED_BYTES` are produced, so a bomb (a small file that
    expands to gigabytes) is refused instead of exhausting memory.

    Raises:
        DataError: a damaged or truncated stream, or one that expands too far.
    """
    found = next((c for c in COMPRESSIONS if data.startswith(c[0])), None)
    if found is None:
        return data
    _, name, opener, errors = found
    limit = MAX_DECOMPRESSED_BYTES
    try:
        with opener(io.BytesIO(data)) as stream:
            out = stream.read(limit + 1)
    except errors as exc:
        raise DataError(
            f"{source} is a damaged or truncated {name} file ({exc}): {_REFETCH}"
        ) from None
    if len(out) > limit:
        raise DataError(
            f"{source} decompresses to more than {limit} bytes, far more than any dataset "
            f"file vaelab reads (a {name} bomb?): {_REFETCH}"
        )
    return out


def parse_idx(data: bytes, source: str | Path, ndim: int | None = None) -> np.ndarray:
    """Parse an (uncompressed) uint8 idx file held in ``data``.

    Args:
        data: the file's bytes after decompression.
        source: the file name used in error messages.
        ndim: the required number of dimensions (3 for images, 1 for labels), or None.

    Returns:
        A read-only uint8 array viewing ``data`` (no copy), shaped as the header says.

    Raises:
        DataError: wrong magic number, dtype code or number of dimensions, truncated
            header or data, or trailing bytes.
    """
    if len(data) < 4:
        raise DataError(f"{source} is too short to be an idx file ({len(data)} bytes): {_REFETCH}")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source} is not an idx file (magic 0x{magic:08x}, {describe_start(data)}): "
            f"{_REFETCH}"
        )
    code, dims = data[2], data[3]
    if code != IDX_UBYTE:
        name = _DTYPE_NAMES.get(code, "unknown")
        raise DataError(
            f"{source} has idx dtype code 0x{code:02x} ({name}); vaelab reads only 0x08 "
            f"(uint8) files such as MNIST's: {_REFETCH}"
        )
    if ndim is not None and dims != ndim:
        raise DataError(
            f"{source} has {dims} dimensions (magic 0x{magic:08x}) but {ndim} were expected "
            f"({'images N x H x W' if ndim == 3 else 'labels N'}): is it the right file?"
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(
            f"{source} is truncated inside its header ({len(data)} of {header} bytes): {_REFETCH}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) < expected:
        raise DataError(
            f"{source} is truncated: the header promises shape {shape} ({expected} bytes) "
            f"but the file holds {len(data)} bytes: {_REFETCH}"
        )
    if len(data) > expected:
        raise DataError(
            f"{source} has {len(data) - expected} trailing bytes after the shape {shape} its "
            f"header declares ({expected} bytes): {_REFETCH}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read a uint8 idx file (raw or gzip-compressed); see :func:`parse_idx`."""
    path = Path(path)
    return parse_idx(decompress(path.read_bytes(), path), path, ndim)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array (any number of dimensions) as an idx file.

    The file is gzip-compressed (reproducibly, mtime 0) when ``path`` ends in ``.gz``.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"write_idx writes uint8 arrays only, got {array.dtype}: convert first")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"write_idx needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def parse_amat(data: bytes, source: str | Path, width: int = 784) -> np.ndarray:
    """Parse Larochelle's ``.amat`` text (lines of ``width`` space-separated 0/1 digits).

    Returns:
        uint8 array ``(N, width)`` of 0/1 values.

    Raises:
        DataError: anything other than the exact layout ``"d d ... d\\n"`` per line.
    """
    line = 2 * width
    if not data:
        raise DataError(f"{source} is empty: {_REFETCH}")
    if len(data) % line:
        raise DataError(
            f"{source} is not a {width}-column binarized-MNIST .amat file: {len(data)} bytes "
            f"is not a multiple of {line} ({describe_start(data)}): {_REFETCH}"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, line)
    digits, separators = rows[:, 0::2], rows[:, 1::2]
    bad = (digits != ord("0")) & (digits != ord("1"))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{source} line {row + 1} value {col + 1} is {chr(digits[row, col])!r}, not 0 or 1 "
            f"({int(bad.sum())} such values): {_REFETCH}"
        )
    spaces_ok = (separators[:, :-1] == ord(" ")).all() and (separators[:, -1] == 10).all()
    if not spaces_ok:
        raise DataError(
            f"{source} does not separate values by single spaces with one line per example: "
            f"{_REFETCH}"
        )
    return digits - np.uint8(ord("0"))


def read_amat(path: str | Path, width: int = 784) -> np.ndarray:
    """Read a ``.amat`` file; see :func:`parse_amat`."""
    path = Path(path)
    return parse_amat(decompress(path.read_bytes(), path), path, width)


def write_amat(path: str | Path, array: np.ndarray) -> Path:
    """Write a 0/1 array ``(N, D)`` in Larochelle's ``.amat`` layout (used by tests)."""
    array = np.asarray(array)
    if array.ndim != 2 or not np.isin(array, (0, 1)).all():
        raise DataError("write_amat needs a 2-D array of 0/1 values")
    text = "\n".join(" ".join(str(int(v)) for v in row) for row in array) + "\n"
    path = Path(path)
    path.write_bytes(text.encode("ascii"))
    return path
