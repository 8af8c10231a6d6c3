"""CIFAR-10, binary version (Krizhevsky, 2009), read from ``cifar-10-binary.tar.gz`` in memory.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 binary version")
holds ``cifar-10-batches-bin/`` with ``data_batch_1.bin`` .. ``data_batch_5.bin`` (the
50,000 training images) and ``test_batch.bin`` (10,000), each a sequence of 3,073-byte
records: the label (0..9), then 1,024 red, 1,024 green and 1,024 blue values of a 32x32
image in row-major order, i.e. exactly one ``(3, 32, 32)`` uint8 image. No pickle is
involved (the "python version" of the dataset is pickled; vaelab never reads it).

Nothing is extracted to disk. The needed members are read from the decompressed archive in
memory, so a hostile archive cannot write anywhere (no path traversal, no links followed).
Every member name must be relative without ``..``; a needed member must be a regular file
whose size is a whole number of records, at most :data:`MAX_MEMBER_BYTES`; an archive with
more than :data:`MAX_MEMBERS` entries is refused.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DataError

__all__ = ["CLASSES", "MEMBERS", "PREFIX", "RECORD_BYTES", "MAX_MEMBERS", "MAX_MEMBER_BYTES",
           "parse_batch", "read_archive", "write_archive"]

RECORD_BYTES = 1 + 3 * 32 * 32
PREFIX = "cifar-10-batches-bin/"
MEMBERS = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
"""Label names, in label order (``batches.meta.txt`` of the archive)."""
MAX_MEMBERS = 64
MAX_MEMBER_BYTES = 10_000 * RECORD_BYTES
_REFETCH = "delete it and download it again"


def parse_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` of one batch file's bytes.

    Raises:
        DataError: a size that is not a whole number of records, or a label above 9.
    """
    if not data or len(data) % RECORD_BYTES:
        raise DataError(f"{source} holds {len(data)} bytes, not a whole number of "
                        f"{RECORD_BYTES}-byte CIFAR-10 records: {_REFETCH}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{source} holds label {labels.max()} (CIFAR-10 labels are 0..9): "
                        f"{_REFETCH}")
    return np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32), labels


def _check_name(name: str, archive: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise DataError(f"{archive} holds a member with an unsafe path {name!r}: it is not the "
                        f"official archive; {_REFETCH}")


def read_archive(tar_bytes: bytes, source: str | Path,
                 part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``part`` (``"train"`` or ``"test"``) from the decompressed tar.

    Raises:
        DataError: not a tar archive, unsafe or unexpected members, missing batches.
    """
    wanted = {PREFIX + name: name for name in MEMBERS[part]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as archive:
            for count, member in enumerate(archive, start=1):
                if count > MAX_MEMBERS:
                    raise DataError(f"{source} holds more than {MAX_MEMBERS} entries; the "
                                    f"official archive holds 8: {_REFETCH}")
                _check_name(member.name, str(source))
                if member.name not in wanted:
                    continue
                if not member.isreg():
                    raise DataError(f"{source}: {member.name} is not a regular file (a link "
                                    f"or device): {_REFETCH}")
                if member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{source}: {member.name} has {member.size} bytes, more "
                                    f"than a CIFAR-10 batch ({MAX_MEMBER_BYTES}): {_REFETCH}")
                handle = archive.extractfile(member)
                assert handle is not None  # a regular file
                found[member.name] = handle.read(member.size)
    except tarfile.TarError as exc:
        raise DataError(f"{source} is not a readable tar archive ({exc}): {_REFETCH}") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{source} lacks {', '.join(missing)}: it is not the CIFAR-10 binary "
                        f"archive (cifar-10-binary.tar.gz); {_REFETCH}")
    parts = [parse_batch(found[name], f"{source}:{name}") for name in wanted]
    return (np.concatenate([images for images, _ in parts]),
            np.concatenate([labels for _, labels in parts]))


def write_archive(path: str | Path, batches: dict[str, tuple[np.ndarray, np.ndarray]],
                  extra: dict[str, bytes] | None = None) -> Path:
    """Write a gzip'ed tar in the official layout, for tests.

    Args:
        path: the ``.tar.gz`` to write.
        batches: member name (e.g. ``"data_batch_1.bin"``) -> (uint8 ``(N, 3, 32, 32)``
            images, labels 0..9).
        extra: more members by full name (e.g. an unsafe ``"../x"``), raw bytes.
    """
    path = Path(path)
    members = {PREFIX + "batches.meta.txt": ("\n".join(CLASSES) + "\n\n").encode()}
    for name, (images, labels) in batches.items():
        records = np.concatenate([np.asarray(labels, np.uint8)[:, None],
                                  np.asarray(images, np.uint8).reshape(len(labels), -1)], axis=1)
        members[PREFIX + name] = records.tobytes()
    members.update(extra or {})
    with tarfile.open(path, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
