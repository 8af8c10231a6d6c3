"""A strict reader (and a writer, for tests) of MATLAB level-5 MAT-files holding numeric arrays.

Enough of the format (MathWorks, "MAT-File Format", R2018 PDF, chapter 1) for SVHN's
``train_32x32.mat`` / ``test_32x32.mat``, without SciPy and without anything that could run
code: a 128-byte header (text starting ``MATLAB 5.0 MAT-file``, version ``0x0100``, endian
indicator ``IM`` or ``MI``), then data elements. Each element has an 8-byte tag (type and
byte count, both uint32) or, when the upper half of the type word is not zero, a 4-byte
"small element" tag with up to 4 bytes of data; elements are padded to 8 bytes (compressed
ones are not). Read:

- ``miCOMPRESSED`` (15): a zlib stream holding one element, inflated with a size cap of
  :data:`MAX_ELEMENT_BYTES` (a zlib bomb is refused, a truncated stream is an error);
- ``miMATRIX`` (14) of a numeric class (double, single, int8..uint64), real, not sparse:
  array flags, dimensions, name, real part. The real part may be stored in a smaller type
  than its class (MATLAB writes small integers held in doubles as ``miUINT8``); it is
  converted to the class's dtype. Values are in column-major order, so the array is
  returned with ``order="F"`` indexing: ``a[i, j, ...]`` is MATLAB's ``a(i+1, j+1, ...)``.

Everything else (cells, structs, objects, characters, sparse or complex arrays, v7.3 HDF5
files, trailing or truncated data) is an error naming the file and what was found.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["MAX_ELEMENT_BYTES", "MAX_VARIABLES", "parse_mat", "write_mat"]

MAX_ELEMENT_BYTES = 1 << 30
"""Largest inflated element accepted (SVHN's training images are 225 MB)."""
MAX_VARIABLES = 64

MI_MATRIX, MI_COMPRESSED = 14, 15
_MI_TYPES = {  # miTYPE -> numpy dtype code
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
}
_MX_CLASSES = {  # mxCLASS -> numpy dtype code
    6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8",
    15: "u8",
}
_MX_NAMES = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse"}
_FLAG_COMPLEX = 0x0800
_HEADER = b"MATLAB 5.0 MAT-file"
_REFETCH = "delete it and download it again"


def _fail(source: str | Path, what: str) -> DataError:
    return DataError(f"{source} is not a MAT-file vaelab can read ({what}): {_REFETCH}")


class _Reader:
    """Data elements of one buffer, in the file's byte order."""

    def __init__(self, data: bytes | memoryview, endian: str, source: str | Path) -> None:
        self.data = memoryview(data)
        self.endian = endian
        self.source = source
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def element(self) -> tuple[int, memoryview]:
        """The next element's type and data; moves past its padding."""
        if self.pos + 4 > len(self.data):
            raise _fail(self.source, f"truncated element tag at byte {self.pos}")
        (word,) = struct.unpack_from(self.endian + "I", self.data, self.pos)
        if word >> 16:  # small data element: 2-byte count, 2-byte type, 4 bytes of data
            count, kind = word >> 16, word & 0xFFFF
            if count > 4 or self.pos + 8 > len(self.data):
                raise _fail(self.source, f"bad small element at byte {self.pos}")
            payload = self.data[self.pos + 4 : self.pos + 4 + count]
            self.pos += 8
            return kind, payload
        if self.pos + 8 > len(self.data):
            raise _fail(self.source, f"truncated element tag at byte {self.pos}")
        (count,) = struct.unpack_from(self.endian + "I", self.data, self.pos + 4)
        start, end = self.pos + 8, self.pos + 8 + count
        if end > len(self.data):
            raise _fail(self.source, f"element at byte {self.pos} declares {count} bytes but "
                                     f"only {len(self.data) - start} follow (truncated file)")
        self.pos = end if word == MI_COMPRESSED else start + (-count % 8) + count
        if self.pos > len(self.data):
            self.pos = len(self.data)
        return word, self.data[start:end]


def _inflate(payload: memoryview, source: str | Path) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_ELEMENT_BYTES + 1)
    except zlib.error as exc:
        raise _fail(source, f"damaged compressed element: {exc}") from None
    if len(out) > MAX_ELEMENT_BYTES:
        raise _fail(source, f"a compressed element inflates to more than {MAX_ELEMENT_BYTES} "
                            f"bytes (a zlib bomb?)")
    if not inflater.eof:
        raise _fail(source, "a compressed element is truncated")
    return out


def _matrix(body: memoryview, endian: str, source: str | Path) -> tuple[str, np.ndarray]:
    sub = _Reader(body, endian, source)
    kind, flags_data = sub.element()
    if kind != 6 or len(flags_data) != 8:
        raise _fail(source, "a matrix without array flags")
    flags = struct.unpack_from(endian + "I", flags_data)[0]
    mx_class = flags & 0xFF
    kind, dims_data = sub.element()
    if kind != 5 or len(dims_data) < 8 or len(dims_data) % 4:
        raise _fail(source, "a matrix without valid dimensions")
    dims = tuple(int(d) for d in np.frombuffer(dims_data, endian + "i4"))
    kind, name_data = sub.element()
    if kind not in (1, 2):
        raise _fail(source, "a matrix without a name")
    name = bytes(name_data).decode("ascii", errors="replace")
    if mx_class not in _MX_CLASSES:
        what = _MX_NAMES.get(mx_class, f"class {mx_class}")
        raise _fail(source, f"variable {name!r} is a {what} array; only numeric arrays are read")
    if flags & _FLAG_COMPLEX:
        raise _fail(source, f"variable {name!r} is complex")
    if any(d < 0 for d in dims):
        raise _fail(source, f"variable {name!r} has negative dimensions {dims}")
    count = int(np.prod(dims, dtype=np.int64))
    kind, real = sub.element()
    if kind not in _MI_TYPES:
        raise _fail(source, f"variable {name!r} stores its values as type {kind}")
    stored = np.dtype(endian + _MI_TYPES[kind])
    if len(real) != count * stored.itemsize:
        raise _fail(source, f"variable {name!r} of shape {dims} holds {len(real)} bytes of "
                            f"{stored.name}, expected {count * stored.itemsize}")
    if not sub.at_end():
        raise _fail(source, f"variable {name!r} has data after its real part")
    values = np.frombuffer(real, dtype=stored).reshape(dims, order="F")
    target = np.dtype(_MX_CLASSES[mx_class])
    if values.dtype != target:
        values = values.astype(target)
    return name, values


def parse_mat(data: bytes, source: str | Path) -> dict[str, np.ndarray]:
    """The numeric variables of a level-5 MAT-file held in ``data``, by name.

    Returns arrays with MATLAB's shape (read-only views of ``data`` or of inflated copies).

    Raises:
        DataError: not a level-5 MAT-file (a v7.3 HDF5 file is named as such), an
            unsupported variable, damaged, truncated or oversized data.
    """
    if len(data) < 128 or not bytes(data[:19]) == _HEADER:
        if bytes(data[:19]) == b"MATLAB 7.3 MAT-file":
            raise _fail(source, "a v7.3 (HDF5) MAT-file; vaelab reads level-5 files such as "
                                "SVHN's format 2")
        start = bytes(data[:12]).decode("ascii", errors="replace")
        raise _fail(source, f"no 'MATLAB 5.0 MAT-file' header; starts with {start!r}")
    indicator = bytes(data[126:128])
    if indicator not in (b"IM", b"MI"):
        raise _fail(source, f"endian indicator {indicator!r}")
    endian = "<" if indicator == b"IM" else ">"
    (version,) = struct.unpack_from(endian + "H", data, 124)
    if version != 0x0100:
        raise _fail(source, f"version 0x{version:04x}, expected 0x0100")
    reader = _Reader(memoryview(data)[128:], endian, source)
    variables: dict[str, np.ndarray] = {}
    while not reader.at_end():
        if len(variables) >= MAX_VARIABLES:
            raise _fail(source, f"more than {MAX_VARIABLES} variables")
        kind, body = reader.element()
        if kind == MI_COMPRESSED:
            inner = _Reader(_inflate(body, source), endian, source)
            kind, body = inner.element()
            if not inner.at_end():
                raise _fail(source, "a compressed element holds more than one element")
        if kind != MI_MATRIX:
            raise _fail(source, f"a top-level element of type {kind}, expected a matrix")
        name, values = _matrix(body, endian, source)
        if name in variables:
            raise _fail(source, f"variable {name!r} appears twice")
        variables[name] = values
    return variables


# --------------------------------------------------------------------------- writing


def _element(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload + bytes(-len(payload) % 8)


def _matrix_bytes(name: str, array: np.ndarray, stored: np.dtype | None) -> bytes:
    mx_class = {v: k for k, v in _MX_CLASSES.items()}[array.dtype.str[1:]]
    stored = np.dtype(stored or array.dtype).newbyteorder("<")
    mi_type = {v: k for k, v in _MI_TYPES.items()}[stored.str[1:]]
    body = _element(6, struct.pack("<II", mx_class, 0))
    body += _element(5, np.asarray(array.shape, "<i4").tobytes())
    body += _element(1, name.encode("ascii"))
    body += _element(mi_type, np.asarray(array, dtype=stored).tobytes(order="F"))
    return struct.pack("<II", MI_MATRIX, len(body)) + body


def write_mat(path: str | Path, variables: dict[str, np.ndarray], compress: bool = True,
              stored: dict[str, np.dtype] | None = None) -> Path:
    """Write numeric arrays as a little-endian level-5 MAT-file (what MATLAB's ``save`` and
    ``scipy.io.savemat`` write). ``stored`` gives a smaller storage type for some variables
    (e.g. ``uint8`` for a double array of small integers, as MATLAB does)."""
    path = Path(path)
    text = b"MATLAB 5.0 MAT-file, written by vaelab.data.matfile"
    out = [text.ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0100) + b"IM"]
    for name, array in variables.items():
        matrix = _matrix_bytes(name, np.asarray(array), (stored or {}).get(name))
        if compress:
            packed = zlib.compress(matrix)
            out.append(struct.pack("<II", MI_COMPRESSED, len(packed)) + packed)
        else:
            out.append(matrix)
    path.write_bytes(b"".join(out))
    return path
