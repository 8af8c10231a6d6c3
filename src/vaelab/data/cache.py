"""A cache of decoded image folders: one entry per folder and set of options.

Reading 50,000 small PNGs takes seconds; reading back their decoded ``uint8`` array takes a
tenth of one. An entry is

- named by the folder's resolved path and the decoding options (image size, channels):
  ``<root>/<sha256(...)[:32]>`` + ``.npy`` (images), ``.labels.npy`` (labels, if any) and
  ``.json`` (what the entry is and how the images were read), so a changed folder
  overwrites its own stale entry;
- valid only for the exact listing it was made from: its ``key`` is the SHA-256 of every
  image's relative path, size in bytes and modification time (nanoseconds), the options,
  :data:`CACHE_VERSION` and the Pillow / libjpeg versions; any difference and the folder is
  decoded again;
- plain arrays (``.npy``, read with ``np.load(allow_pickle=False)``: never unpickled; a
  ``.npy`` reads 3x faster than the same array in an ``.npz``) and JSON;
- checked when read: shapes and dtypes against the JSON, and the SHA-256 of the images and
  labels (0.1 s for 150 MB), so a damaged or half-replaced entry is decoded again, never
  trusted;
- written file by file atomically (:func:`vaelab._io.atomic_write_bytes`: temporary file,
  fsync, rename), the JSON last: a reader sees the old entry, the new one, or arrays that
  do not match the JSON's hashes (which it then ignores).

A file changed without changing its size or modification time would go unnoticed (as
with ``make``); pass ``cache=False`` to :func:`vaelab.data.load` to decode afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_bytes

__all__ = ["CACHE_VERSION", "CachedImages", "cache_key", "entry_path", "read_entry",
           "write_entry"]

log = logging.getLogger("vaelab.data")

CACHE_VERSION = 1
"""Bump when decoding changes, so that old entries are never reused."""


@dataclass(frozen=True)
class CachedImages:
    """What an entry holds: the decoded images and the JSON record of how they were read."""

    images: np.ndarray
    labels: np.ndarray | None
    record: dict[str, Any]


def _decoder_versions() -> dict[str, str | None]:
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "libjpeg": features.version("jpg"),
            "zlib": features.version("zlib"), "webp": features.version("webp")}


def cache_key(folder: Path, options: dict[str, Any],
              files: Iterable[tuple[str, int, int]]) -> str:
    """SHA-256 identifying one decoding of ``folder``: the version, the decoders' versions,
    ``options`` and every ``(relative path, size, mtime_ns)``."""
    digest = hashlib.sha256()
    head = {"version": CACHE_VERSION, "decoders": _decoder_versions(),
            "folder": str(folder.resolve()), "options": options}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for relative, size, mtime_ns in files:
        digest.update(f"\n{relative}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()


def entry_path(root: Path, folder: Path, options: dict[str, Any]) -> Path:
    """The JSON file of the entry for ``folder`` decoded with ``options`` under ``root``
    (its arrays are next to it: :func:`_arrays`)."""
    name = json.dumps({"folder": str(folder.resolve()), "options": options}, sort_keys=True)
    return root / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def _arrays(path: Path) -> tuple[Path, Path]:
    """The images and labels files of the entry whose JSON is ``path``."""
    return path.with_suffix(".npy"), path.with_suffix(".labels.npy")


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def read_entry(path: Path, key: str) -> CachedImages | None:
    """The entry whose JSON is ``path`` if it exists, is intact and was made for ``key``."""
    if not path.is_file():
        return None
    images_path, labels_path = _arrays(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            log.info("cache %s is stale (the folder or the options changed): decoding again",
                     path)
            return None
        images = np.load(images_path, allow_pickle=False)
        labels = (np.load(labels_path, allow_pickle=False)
                  if meta.get("labels_sha256") is not None else None)
    except (OSError, ValueError, EOFError, UnicodeDecodeError, AttributeError) as exc:
        log.warning("ignoring the unreadable cache entry %s (%s): decoding again", path, exc)
        return None
    problem = None
    if images.dtype != np.uint8 or list(images.shape) != meta.get("shape"):
        problem = f"images {images.dtype} {images.shape}, expected uint8 {meta.get('shape')}"
    elif labels is not None and (labels.dtype != np.int64 or labels.shape != images.shape[:1]):
        problem = f"labels {labels.dtype} {labels.shape}"
    elif _sha256(images) != meta.get("images_sha256"):
        problem = "the images do not match their recorded SHA-256"
    elif labels is not None and _sha256(labels) != meta.get("labels_sha256"):
        problem = "the labels do not match their recorded SHA-256"
    if problem is not None:
        log.warning("ignoring the damaged cache entry %s (%s): decoding again", path, problem)
        return None
    return CachedImages(images, labels, meta["record"])


def _npy_bytes(array: np.ndarray) -> memoryview:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getbuffer()


def write_entry(path: Path, key: str, images: np.ndarray, labels: np.ndarray | None,
                record: dict[str, Any]) -> bool:
    """Write an entry (arrays first, the JSON ``path`` last, each atomically); return False
    (and log why) if it could not be written: a cache that cannot be written (read-only or
    full disk) never stops a run."""
    images = np.ascontiguousarray(images)
    labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
    meta = {"version": CACHE_VERSION, "key": key, "shape": list(images.shape),
            "images_sha256": _sha256(images),
            "labels_sha256": None if labels is None else _sha256(labels), "record": record}
    images_path, labels_path = _arrays(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(images_path, _npy_bytes(images), sync_dir=False)
        if labels is not None:
            atomic_write_bytes(labels_path, _npy_bytes(labels), sync_dir=False)
        atomic_write_bytes(path, json.dumps(meta).encode())
    except OSError as exc:
        log.warning("could not write the decoded-image cache %s (%s): the folder will be "
                    "decoded again next time", path, exc.strerror or exc)
        return False
    log.info("cached the decoded images in %s (%.0f MB)", images_path, images.nbytes / 1e6)
    return True
