r"""Pixels of one image file, and the size / colour conversions shared by folders and arrays.

What is read (Pillow, each file opened only by the decoder its suffix names, so a file is
never handed to another plug-in such as EPS, which would run Ghostscript):

- formats (:data:`IMAGE_FORMATS`): PNG, JPEG, BMP, GIF (first frame), WebP and the PPM
  family. TIFF is not read (many modes, multi-page files and a large decoder surface):
  convert such files to PNG.
- colour modes, each turned into 8-bit grey ``(H, W)`` or RGB ``(H, W, 3)``:
  ``L`` grey as is; ``1`` (bilevel) as grey 0/255; ``I;16*`` / ``I`` (16-bit grey PNG) as
  :math:`\operatorname{round}(v \cdot 255 / 65535)` (Pillow's own ``convert("L")`` would clip
  every value above 255 to white); 16-bit colour PNGs come from Pillow already reduced to
  8 bits by keeping the high byte (exact for 8-bit values stored as :math:`257 v`);
  ``P`` (palette) as RGB; ``RGB`` as is;
  ``CMYK`` / ``YCbCr`` (some JPEGs) converted to RGB by Pillow; alpha (``LA``, ``RGBA``,
  ``PA``, a palette's transparency) is dropped: the colour values under transparent
  pixels are kept as stored (composite the images onto a background first if that
  matters). Whatever the mode, an image whose pixels all have R == G == B (a grey
  picture stored as colour, as WebP always does) is returned as grey ``(H, W)``: "colour"
  means colour content, so a folder of such files gives one channel, losslessly (repeating
  grey, or the luma of R == G == B, gives back the same values). Each conversion is
  reported in :attr:`Decoded.notes`.
- orientation: a JPEG or WebP whose EXIF data says the camera was turned is turned back
  (``ImageOps.exif_transpose``), so the pixels are the picture as a viewer shows it.
- size: at most :data:`MAX_PIXELS` pixels per image (Pillow's default limit); a larger
  one is refused before it is decoded, as a possible decompression bomb.

Resizing (:func:`resize`) scales the image so that its shorter side matches the target
(the other side is then at least as large) and keeps the centre: one resampling of the
centred source box onto the target grid (``Image.resize(size, LANCZOS, box=...,
reducing_gap=3.0)``). Pillow's LANCZOS widens its kernel by the reduction factor, so the
reduction is antialiased; ``reducing_gap=3.0`` first shrinks by an integer factor with a
box filter while the image stays at least 3x the target (Pillow's documentation: the result
is then indistinguishable from a full LANCZOS pass), and JPEGs are decoded at a reduced DCT
scale (``Image.draft``) under the same 3x rule. This matches ``torchvision``'s
``Resize(min side) + CenterCrop`` except that no intermediate size is rounded.

Colour conversions (:func:`grey_to_rgb`, :func:`rgb_to_grey`) are exact integer maps:
grey is repeated into three channels; RGB becomes ITU-R 601-2 luma
``(19595 R + 38470 G + 7471 B + 32768) >> 16``, the formula of Pillow's ``convert("L")``
(tests/test_data_images.py checks that the two agree).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .idx import describe_start

__all__ = [
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "RESAMPLING",
    "REDUCING_GAP",
    "Decoded",
    "decode_image",
    "resize",
    "grey_to_rgb",
    "rgb_to_grey",
    "format_size",
]

IMAGE_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
    ".pnm": "PPM",
}
"""File suffix (lower case) -> the only Pillow plug-in allowed to open such a file."""

MAX_PIXELS = 89_478_485
"""Largest image accepted, in pixels (Pillow's default ``Image.MAX_IMAGE_PIXELS``)."""

RESAMPLING = "LANCZOS"
REDUCING_GAP = 3.0

_GREY_MODES = ("L", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = {"LA": "L", "La": "L", "RGBA": "RGB", "RGBa": "RGB", "PA": "RGBA"}
_TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_EXIF_FORMATS = ("JPEG", "WEBP")
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class Decoded:
    """One decoded image.

    Attributes:
        pixels: uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB), after any resizing.
        original_size: ``(height, width)`` as shown (after the EXIF orientation).
        notes: conversions made: ``"alpha dropped"``, ``"16-bit"``, ``"palette"``,
            ``"bilevel"``, ``"cmyk"`` (any mode Pillow converted to RGB), ``"animated"``
            (frames after the first ignored), ``"rotated"`` (EXIF orientation applied),
            ``"upscaled"``.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    notes: frozenset[str] = frozenset()


def format_size(size: tuple[int, int]) -> str:
    """``(height, width)`` -> ``"HxW"``, the order of ``--image-size``."""
    return f"{size[0]}x{size[1]}"


def _bomb(path: str | Path, width: int, height: int) -> DataError:
    return DataError(
        f"{path} is {height}x{width} pixels, more than the {MAX_PIXELS:,} vaelab accepts per "
        f"image (a decompression bomb?): downscale it or remove it"
    )


def _sixteen_bit_to_uint8(values: np.ndarray, path: str | Path) -> np.ndarray:
    wide = values.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise DataError(f"{path} holds grey values outside 0..65535 (min {wide.min()}, max "
                        f"{wide.max()}): save it as an 8- or 16-bit PNG")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def _to_pixels(image, path: str | Path) -> tuple[np.ndarray, set[str]]:
    """A loaded Pillow image -> uint8 ``(H, W)`` or ``(H, W, 3)`` and the conversions made."""
    notes: set[str] = set()
    mode = image.mode
    if mode == "P":
        notes.add("palette")
        if "transparency" in image.info:
            notes.add("alpha dropped")
            return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[..., :3]), notes
        return np.asarray(image.convert("RGB")), notes
    if mode in _ALPHA_MODES:
        notes.add("alpha dropped")
        if mode == "PA":
            notes.add("palette")
        image = image.convert(_ALPHA_MODES[mode])
        pixels = np.asarray(image)
        return np.ascontiguousarray(pixels[..., :3] if pixels.ndim == 3 else pixels), notes
    if mode in _GREY_MODES:
        if mode == "1":
            notes.add("bilevel")
            return np.asarray(image.convert("L")), notes
        if mode == "L":
            return np.asarray(image), notes
        notes.add("16-bit")
        return _sixteen_bit_to_uint8(np.asarray(image), path), notes
    if mode == "RGB":
        return np.asarray(image), notes
    if mode in _TO_RGB_MODES:
        notes.add("cmyk")
        return np.asarray(image.convert("RGB")), notes
    raise DataError(f"{path} has Pillow mode {mode!r}, which vaelab does not read (it reads "
                    f"grey, palette and RGB images of 8 or 16 bits): convert it to an 8-bit "
                    f"PNG")


def _box(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred source box whose shorter side maps onto ``size`` = (H, W)."""
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    box_w, box_h = target_w / scale, target_h / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return left, top, left + box_w, top + box_h


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale uint8 ``(H, W)`` / ``(H, W, 3)`` pixels so the shorter side fits ``size`` = (H, W)
    and keep the centre (see the module docstring); unchanged if already that size."""
    from PIL import Image

    height, width = pixels.shape[:2]
    if (height, width) == tuple(size):
        return pixels
    image = Image.fromarray(pixels)
    out = image.resize((size[1], size[0]), Image.Resampling.LANCZOS,
                       box=_box(width, height, size), reducing_gap=REDUCING_GAP)
    return np.asarray(out)


def decode_image(data: bytes, path: str | Path, image_format: str,
                 size: tuple[int, int] | None = None) -> Decoded:
    """Decode the bytes of one image file (read from ``path``) with Pillow's ``image_format``
    plug-in only; resize to ``size`` = (H, W) if given.

    Raises:
        DataError: a file that is not a readable image of that format, too many pixels,
            or an unsupported colour mode; the message names ``path``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=(image_format,)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise _bomb(path, width, height)
            if width == 0 or height == 0:
                raise DataError(f"{path} is an empty image ({height}x{width}): remove it")
            animated = bool(getattr(image, "is_animated", False))
            orientation = (image.getexif().get(_EXIF_ORIENTATION, 1)
                           if image.format in _EXIF_FORMATS else 1)
            if orientation in _QUARTER_TURNS:  # shown rotated by 90 degrees
                width, height = height, width
            if size is not None and image.format == "JPEG":
                scale = max(size[0] / height, size[1] / width)
                stored_w, stored_h = image.size
                image.draft(None, (int(stored_w * scale * REDUCING_GAP) + 1,
                                   int(stored_h * scale * REDUCING_GAP) + 1))
            image.load()
            rotated = orientation not in (1, None)
            if rotated:
                image = ImageOps.exif_transpose(image)
            pixels, notes = _to_pixels(image, path)
            if rotated:
                notes.add("rotated")
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise _bomb(path, *_declared_size(data)) from None
    except UnidentifiedImageError:
        what = describe_start(data) if data else "an empty file"
        raise DataError(f"{path} is not a readable {image_format} image (not a "
                        f"{image_format} file: {what}): replace it with a valid "
                        f"{image_format} file or remove it") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError,
            TypeError) as exc:
        raise DataError(f"{path} is not a readable {image_format} image ({_reason(exc)}): "
                        f"replace it with a valid {image_format} file or remove it") from None
    if animated:
        notes.add("animated")
    if size is not None:
        if size[0] > height or size[1] > width:
            notes.add("upscaled")
        pixels = resize(pixels, size)
    if pixels.ndim == 3 and _all_grey(pixels):
        pixels = pixels[..., 0]
        notes.add("grey stored as colour")
    return Decoded(np.ascontiguousarray(pixels), (height, width), frozenset(notes))


def _all_grey(rgb: np.ndarray) -> bool:
    """Whether every pixel of uint8 ``(H, W, 3)`` has R == G == B."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1])
                and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header, for the message about a refused bomb; (0, 0) else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return 0, 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    text = text.split("\n")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def grey_to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 1, H, W)`` -> ``(N, 3, H, W)`` by repeating the grey channel."""
    return np.ascontiguousarray(np.repeat(images, 3, axis=1))


def rgb_to_grey(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 3, H, W)`` -> ``(N, 1, H, W)``: ITU-R 601-2 luma, exactly Pillow's
    ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``."""
    out = np.empty((images.shape[0], 1, *images.shape[2:]), dtype=np.uint8)
    step = 4096
    for start in range(0, images.shape[0], step):
        chunk = images[start : start + step].astype(np.uint32)
        luma = chunk[:, 0] * 19595 + chunk[:, 1] * 38470 + chunk[:, 2] * 7471 + 32768
        out[start : start + step, 0] = (luma >> 16).astype(np.uint8)
    return out
