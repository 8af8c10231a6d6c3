"""User data held in arrays: ``.npz`` / ``.npy`` files, and the :class:`UserData` record.

Accepted arrays and how they are read:

- keys (``.npz``): images under ``images`` or ``x``; optional labels under ``labels`` or
  ``y`` (integers, one per image; any other number is an error). A ``.npy`` file holds
  images only. Nothing is unpickled (``np.load(allow_pickle=False)``).
- shapes: ``(N, H, W)`` -> ``(N, 1, H, W)``; ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)``
  (NHWC, transposed) with ``C`` in {1, 3, 4}. The layout is detected when only one reading
  gives 1, 3 or 4 channels; when both do (e.g. ``(N, 3, 4, 4)``) it is an error asking for
  ``layout`` (``data.layout``): ``"nchw"`` or ``"nhwc"``.
- values: ``uint8`` are grey levels 0..255 (``levels=256``). Other integer types must lie in
  0..255. ``bool``, or floats that are all exactly 0 or 1, are binary data (``levels=2``).
  Other floats must be 8-bit levels scaled to [0, 1], i.e. multiples of 1/255 (to within
  1e-4 / 255), and become uint8 ``round(255 x)``; any other float is refused rather than
  silently quantised (the likelihoods treat data as 8-bit, so rounding would change the
  numbers you report): quantise it yourself (``np.rint(x * 255).astype(np.uint8)``) if that
  is what you want.
- colour: 4 channels are RGB + alpha, and the alpha channel is dropped with a warning.
  ``channels`` = ``"auto"`` keeps grey or RGB; 1 converts RGB to grey (ITU-R 601-2 luma, as
  Pillow's ``convert("L")``); 3 repeats grey into three channels.
- size: ``image_size`` = (H, W) resizes every image (shorter side, then centre crop, see
  :mod:`vaelab.data.images`); 0/1 data cannot be resized or turned grey (that would make
  grey levels) and is refused.
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
from .images import format_size, grey_to_rgb, resize, rgb_to_grey
from .options import parse_channels, parse_layout

__all__ = ["UserData", "read_array_file", "conform"]

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


def _to_nchw(images: np.ndarray, source: Path, layout: str) -> tuple[np.ndarray, str]:
    """``images`` as ``(N, C, H, W)`` (a view) and the layout read (``nhw``, ``nchw``, ``nhwc``)."""
    shape = images.shape
    if images.ndim == 3:
        return images[:, None], "nhw"
    if images.ndim == 4:
        first, last = shape[1] in _CHANNELS, shape[3] in _CHANNELS
        if layout == "nchw" and not first or layout == "nhwc" and not last:
            c = shape[1] if layout == "nchw" else shape[3]
            raise DataError(
                f"{source}: images of shape {shape} read as layout {layout!r} have {c} "
                f"channels, not 1, 3 or 4: set data.layout to the layout the array has"
            )
        if layout == "auto" and first and last:
            raise DataError(
                f"{source}: images of shape {shape} could be NCHW ({shape[1]} channels of "
                f"{shape[2]}x{shape[3]}) or NHWC ({shape[3]} channels of {shape[1]}x"
                f"{shape[2]}): set data.layout to 'nchw' or 'nhwc'"
            )
        if layout == "nchw" or layout == "auto" and first:
            return images, "nchw"
        if layout == "nhwc" or last:
            return images.transpose(0, 3, 1, 2), "nhwc"
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


def _check_images(images: np.ndarray, source: Path,
                  layout: str) -> tuple[np.ndarray, int, str]:
    if images.ndim < 1 or images.shape[0] == 0:
        raise DataError(f"{source}: holds no images (shape {images.shape}): save a non-empty "
                        f"array of images")
    nchw, read_as = _to_nchw(images, source, layout)
    if 0 in nchw.shape:
        raise DataError(f"{source}: images have an empty dimension (shape {images.shape})")
    values, levels = _to_levels(nchw, source)
    if levels == 256 and values.max() <= 1:
        log.warning("%s: uint8 images hold only 0 and 1, read as grey levels 0/255 and 1/255; "
                    "save binary data as bool or float 0/1", source)
    return np.ascontiguousarray(values), levels, read_as


def conform(images: np.ndarray, levels: int, source: Path, channels: str | int = "auto",
            image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the colour and size options to uint8 ``(N, C, H, W)`` images, C in {1, 3, 4}.

    Returns the images and a JSON-able record of what was done.

    Raises:
        DataError: 0/1 data that would have to be resized or turned grey.
    """
    record: dict[str, Any] = {"channels": {"requested": channels,
                                           "found": int(images.shape[1])}}
    binary_hint = ("0/1 data cannot be {what} without making grey levels: {fix}")
    if images.shape[1] == 4:
        log.warning("%s: the images have 4 channels: the 4th (alpha, transparency) is dropped "
                    "and the colour under transparent pixels kept as stored", source)
        images = np.ascontiguousarray(images[:, :3])
        record["alpha_dropped"] = True
    if channels == 1 and images.shape[1] == 3:
        if levels == 2:
            raise DataError(f"{source}: " + binary_hint.format(
                what="turned grey", fix="save it with one channel or set data.channels=3"))
        images = rgb_to_grey(images)
        log.info("%s: colour images converted to grey (ITU-R 601-2 luma)", source)
    elif channels == 3 and images.shape[1] == 1:
        images = grey_to_rgb(images)
    record["channels"]["chosen"] = int(images.shape[1])
    if image_size is not None and tuple(images.shape[2:]) != tuple(image_size):
        if levels == 2:
            raise DataError(f"{source}: " + binary_hint.format(
                what=f"resized from {format_size(images.shape[2:])} to "
                     f"{format_size(image_size)}", fix="drop image_size or resize it yourself"))
        out = np.empty((images.shape[0], images.shape[1], *image_size), dtype=np.uint8)
        for i, image in enumerate(images):
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            resized = resize(np.ascontiguousarray(pixels), image_size)
            out[i] = resized if resized.ndim == 2 else resized.transpose(2, 0, 1)
        record["image_size"] = {"requested": list(image_size),
                                "original": list(images.shape[2:])}
        images = out
    return images, record


def read_array_file(path: str | Path, layout: str = "auto", channels: str | int = "auto",
                    image_size: tuple[int, int] | None = None) -> UserData:
    """Read images (and labels) from a ``.npz`` or ``.npy`` file; see the module docstring.

    Args:
        path: the file.
        layout: ``"auto"``, ``"nchw"`` or ``"nhwc"`` (for 4-D arrays).
        channels: ``"auto"``, 1 or 3.
        image_size: ``(H, W)`` to resize to, or None.

    Raises:
        ConfigError: an unknown layout or channels value.
        DataError: missing keys (the keys found are listed), bad dtype, shape or values,
            an ambiguous layout, labels/images length mismatch, no images.
    """
    path = Path(path)
    layout, channels = parse_layout(layout), parse_channels(channels)
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
    values, levels, read_as = _check_images(images, path, layout)
    label_array = _labels(labels, values.shape[0], path) if labels is not None else None
    values, record = conform(values, levels, path, channels, image_size)
    return UserData(
        np.ascontiguousarray(values),
        label_array,
        levels,
        {path.name: _file_sha256(path)},
        {"source": "array file", "path": str(path.resolve()), "keys": keys,
         "original_dtype": str(images.dtype), "original_shape": list(images.shape),
         "layout": {"requested": layout, "read_as": read_as}, **record},
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
