"""User data: ``.npz`` / ``.npy`` image arrays and folders of PNG images.

Accepted arrays and how they are read:

- keys (``.npz``): images under ``images`` or ``x``; optional labels under ``labels`` or
  ``y`` (integers, one per image). A ``.npy`` file holds images only. Nothing is unpickled.
- shapes: ``(N, H, W)`` -> ``(N, 1, H, W)``; ``(N, C, H, W)`` with ``C`` in {1, 3, 4} as is;
  ``(N, H, W, C)`` with ``C`` in {1, 3, 4} (and ``H`` not) -> ``(N, C, H, W)``.
- values: ``uint8`` are grey levels 0..255 (``levels=256``). Other integer types must lie in
  0..255. ``bool``, or floats that are all exactly 0 or 1, are binary data (``levels=2``).
  Other floats must be 8-bit grey levels scaled to [0, 1], i.e. multiples of 1/255 (to
  within 1e-4 / 255), and become uint8 ``round(255 x)``; any other float is refused rather
  than silently quantised (the likelihoods treat data as 8-bit, so rounding would change
  the numbers you report): quantise it yourself if that is what you want.

A PNG folder holds either ``*.png`` files (unlabelled; read in sorted name order) or one
sub-folder of PNGs per class (label = index of the sub-folder in sorted order; the class
names are kept in the metadata). All images must share size and mode: ``L`` (grey, 1
channel), ``RGB`` (3) or ``RGBA`` (4); ``1`` (bilevel) is read as grey 0/255 and ``P``
(palette) is converted to RGB/RGBA.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, describe_bad_values
from .idx import describe_start

__all__ = ["UserData", "read_array_file", "read_png_folder"]

log = logging.getLogger("vaelab.data")

IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
_CHANNELS = (1, 3, 4)
_FLOAT_TOLERANCE = 1e-4  # in units of one grey level
# What np.load and reading an .npz member raise for damaged or refused files.
_NUMPY_LOAD_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class UserData:
    """Images read from a user file: uint8 ``(N, C, H, W)``, labels int64 ``(N,)`` or None."""

    images: np.ndarray
    labels: np.ndarray | None
    levels: int
    checksums: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_nchw(images: np.ndarray, source: Path) -> np.ndarray:
    shape = images.shape
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and shape[1] in _CHANNELS:
        return images
    if images.ndim == 4 and shape[3] in _CHANNELS:
        return images.transpose(0, 3, 1, 2)
    raise DataError(
        f"{source}: images have shape {shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) "
        f"with C in 1, 3, 4: reshape them (e.g. x.reshape(-1, 28, 28) for flat MNIST vectors)"
    )


def _to_levels(images: np.ndarray, source: Path) -> tuple[np.ndarray, int]:
    """Convert values to uint8 and return them with their number of levels (256 or 2)."""
    kind = images.dtype.kind
    if images.dtype == np.uint8:
        return images, 256
    if kind == "b":
        return images.astype(np.uint8), 2
    if kind in "iu":
        bad = (images < 0) | (images > 255)
        if bad.any():
            raise DataError(
                f"{source}: integer images must be grey levels 0..255 "
                f"({describe_bad_values(bad, images)} are not): rescale them to uint8"
            )
        return images.astype(np.uint8), 256
    if kind != "f":
        raise DataError(f"{source}: images of dtype {images.dtype} are not supported: use "
                        f"uint8 grey levels, bool, or floats in [0, 1]")
    nonfinite = ~np.isfinite(images)
    if nonfinite.any():
        raise DataError(
            f"{source}: float images must lie in [0, 1] but hold NaN/Inf "
            f"({describe_bad_values(nonfinite, images)}): fix the step that made them "
            f"(e.g. a division by zero in a normalisation) and save the file again"
        )
    bad = (images < 0) | (images > 1)
    if bad.any():
        raise DataError(
            f"{source}: float images must lie in [0, 1] ({describe_bad_values(bad, images)} "
            f"do not): divide grey levels by 255 or save them as uint8"
        )
    if np.all((images == 0) | (images == 1)):
        return images.astype(np.uint8), 2
    scaled = images.astype(np.float64) * 255.0
    rounded = np.rint(scaled)
    bad = np.abs(scaled - rounded) > _FLOAT_TOLERANCE
    if bad.any():
        raise DataError(
            f"{source}: float images are not 8-bit grey levels (multiples of 1/255): "
            f"{describe_bad_values(bad, images)}; vaelab does not quantise silently: save "
            f"np.rint(x * 255).astype(np.uint8) if 8-bit data is what you want"
        )
    return rounded.astype(np.uint8), 256


def _labels(labels: np.ndarray, n: int, source: Path) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be one integer per image, shape ({n},), "
                        f"got {labels.shape}")
    if labels.shape[0] != n:
        raise DataError(f"{source}: {labels.shape[0]} labels for {n} images: they must match "
                        f"one to one")
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels) & (labels % 1 == 0)):
            raise DataError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _check_images(images: np.ndarray, source: Path) -> tuple[np.ndarray, int]:
    if images.ndim < 1 or images.shape[0] == 0:
        raise DataError(f"{source}: holds no images (shape {images.shape}): save a non-empty "
                        f"array of images")
    nchw = _to_nchw(images, source)
    if 0 in nchw.shape:
        raise DataError(f"{source}: images have an empty dimension (shape {images.shape})")
    values, levels = _to_levels(nchw, source)
    if levels == 256 and values.max() <= 1:
        log.warning("%s: uint8 images hold only 0 and 1, read as grey levels 0/255 and 1/255; "
                    "save binary data as bool or float 0/1", source)
    return np.ascontiguousarray(values), levels


def read_array_file(path: str | Path) -> UserData:
    """Read images (and labels) from a ``.npz`` or ``.npy`` file; see the module docstring.

    Raises:
        DataError: missing keys (the keys found are listed), bad dtype, shape or values,
            labels/images length mismatch, no images.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except _NUMPY_LOAD_ERRORS as exc:
        raise _unreadable(path, exc) from None
    labels = None
    if isinstance(loaded, np.ndarray):
        images = loaded
        keys = {"images": "(.npy array)"}
    else:
        with loaded:
            found = list(loaded.files)
            image_key = next((k for k in IMAGE_KEYS if k in found), None)
            if image_key is None:
                raise DataError(
                    f"{path} has no images: expected an array named 'images' or 'x', found "
                    f"{', '.join(repr(k) for k in found) or 'no arrays'}: save it with "
                    f"np.savez(path, images=..., labels=...)"
                )
            label_key = next((k for k in LABEL_KEYS if k in found), None)
            try:  # the arrays of an .npz are read (and checked for pickles) only here
                images = loaded[image_key]
                labels = loaded[label_key] if label_key else None
            except _NUMPY_LOAD_ERRORS as exc:
                raise _unreadable(path, exc) from None
            keys = {"images": image_key, "labels": label_key}
    values, levels = _check_images(images, path)
    label_array = _labels(labels, values.shape[0], path) if labels is not None else None
    return UserData(
        values,
        label_array,
        levels,
        {path.name: _file_sha256(path)},
        {"source": "array file", "path": str(path.resolve()), "keys": keys,
         "original_dtype": str(images.dtype), "original_shape": list(images.shape)},
    )


def _unreadable(path: Path, exc: BaseException) -> DataError:
    """The error for a file ``np.load(allow_pickle=False)`` refused (never the advice to
    load it unsafely that numpy's message gives)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        head = b""
    pickled = "pickle" in str(exc).lower()
    if pickled and head.startswith((b"\x93NUMPY", b"PK")):
        return DataError(
            f"{path} holds arrays of Python objects (pickles), which vaelab never loads "
            f"(unpickling can run code): save the images as a numeric array, e.g. "
            f"np.savez(path, images=x.astype(np.uint8))"
        )
    if head[:1] == b"\x80":
        return DataError(
            f"{path} is a Python pickle, which vaelab never loads (unpickling can run code): "
            f"save the images with np.save or np.savez"
        )
    detail = describe_start(head) if pickled else f"{describe_start(head)}; {exc}"
    return DataError(f"{path} is not a readable .npy/.npz file ({detail}): save the images "
                     f"with np.save or np.savez")


def _png_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    def pngs(directory: Path) -> list[Path]:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".png")

    direct = pngs(folder)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and pngs(p))
    if direct and classes:
        raise DataError(
            f"{folder} holds both PNG files and class sub-folders ({classes[0].name}/, ...): "
            f"use one layout (all PNGs directly, or one sub-folder per class)"
        )
    if direct:
        return direct, None, None
    if not classes:
        raise DataError(f"{folder} holds no .png images (directly or in class sub-folders): "
                        f"put the images there or give the folder that holds them")
    files, labels = [], []
    for label, directory in enumerate(classes):
        for path in pngs(directory):
            files.append(path)
            labels.append(label)
    return files, labels, [d.name for d in classes]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # formats=("PNG",): never hand the file to another decoder (EPS would run Ghostscript)
        with Image.open(path, formats=("PNG",)) as image:
            image.load()
            if image.mode == "1":
                image = image.convert("L")
            elif image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode not in ("L", "RGB", "RGBA"):
                raise DataError(f"{path} has PIL mode {image.mode!r}; vaelab reads 8-bit L, RGB "
                                f"or RGBA images: convert it")
            return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as exc:
        raise DataError(f"{path} is not a readable PNG image ({exc}): replace it with an "
                        f"8-bit PNG file") from None


def read_png_folder(folder: str | Path) -> UserData:
    """Read a folder of PNG images (optionally one sub-folder per class).

    Raises:
        DataError: no images, images of different sizes or modes, unreadable files.
    """
    folder = Path(folder)
    files, labels, classes = _png_files(folder)
    arrays = []
    digest = hashlib.sha256()
    for path in files:
        array = _read_png(path)
        if arrays and array.shape != arrays[0].shape:
            raise DataError(
                f"{path} is {_describe(array)} but {files[0].name} is {_describe(arrays[0])}: "
                f"all images must have the same size and mode (resize or convert them)"
            )
        arrays.append(array)
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{_file_sha256(path)}\n".encode())
    images = np.stack(arrays)
    if images.ndim == 4:  # (N, H, W, C) from PIL, whatever H is
        images = images.transpose(0, 3, 1, 2)
    values, levels = _check_images(images, folder)
    label_array = np.asarray(labels, dtype=np.int64) if labels is not None else None
    metadata: dict[str, Any] = {"source": "png folder", "path": str(folder.resolve()),
                                "num_files": len(files),
                                "checksum": "sha256 over sorted 'relative path\\0sha256\\n' lines"}
    if classes is not None:
        metadata["classes"] = classes
    return UserData(values, label_array, levels, {folder.name + "/": digest.hexdigest()},
                    metadata)


def _describe(array: np.ndarray) -> str:
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    return f"{width}x{height} with {channels} channel{'s' if channels != 1 else ''}"
