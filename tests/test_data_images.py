"""Decoding one image file: formats, colour modes, 16 bits, alpha, bombs, resizing, luma."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vaelab.data.images import (
    MAX_PIXELS,
    decode_image,
    grey_to_rgb,
    resize,
    rgb_to_grey,
)
from vaelab.data.options import held_out_count, parse_channels, parse_image_size, parse_layout
from vaelab.errors import ConfigError, DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (6, 8), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _decode(data: bytes, fmt: str = "PNG", size=None):
    return decode_image(data, "x." + fmt.lower(), fmt, size)


def test_grey_and_rgb_png_are_exact():
    grey = _decode(_encode(Image.fromarray(GREY)))
    rgb = _decode(_encode(Image.fromarray(RGB)))
    np.testing.assert_array_equal(grey.pixels, GREY)
    np.testing.assert_array_equal(rgb.pixels, RGB)
    assert grey.original_size == (6, 8) and grey.notes == frozenset() == rgb.notes


def test_sixteen_bit_grey_is_rounded_not_clipped():
    values = np.array([[0, 1, 128, 129, 257, 32767], [32768, 65277, 65278, 65534, 65535, 300]],
                      dtype=np.uint16)
    decoded = _decode(_encode(Image.fromarray(values)))
    assert Image.open(io.BytesIO(_encode(Image.fromarray(values)))).mode == "I;16"
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.pixels[0, 4] == 1 and decoded.pixels[1, 5] == 1  # Pillow's convert: 255
    assert decoded.notes == {"16-bit"}


def test_alpha_is_dropped_keeping_the_stored_colour():
    rgba = np.dstack([RGB, np.zeros((6, 8), np.uint8)])  # fully transparent
    decoded = _decode(_encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(decoded.pixels, RGB)
    assert decoded.notes == {"alpha dropped"}
    la = _decode(_encode(Image.fromarray(np.dstack([GREY, GREY]), "LA")))
    np.testing.assert_array_equal(la.pixels, GREY)
    assert la.notes == {"alpha dropped"}


def test_palette_images_become_rgb_or_grey():
    colour = Image.fromarray(RGB).quantize(16)
    decoded = _decode(_encode(colour))
    np.testing.assert_array_equal(decoded.pixels, np.asarray(colour.convert("RGB")))
    assert decoded.notes == {"palette"}
    grey = Image.fromarray(np.dstack([GREY] * 3)).quantize(8)
    decoded = _decode(_encode(grey))
    assert decoded.pixels.shape == (6, 8)  # every palette colour used is grey
    np.testing.assert_array_equal(decoded.pixels, np.asarray(grey.convert("L")))
    assert decoded.notes == {"palette", "grey stored as colour"}
    transparent = _decode(_encode(colour, transparency=0))
    assert transparent.notes == {"palette", "alpha dropped"} and transparent.pixels.ndim == 3


def test_bilevel_is_grey_0_or_255():
    bits = GREY > 127
    decoded = _decode(_encode(Image.fromarray(bits)))
    np.testing.assert_array_equal(decoded.pixels, bits.astype(np.uint8) * 255)
    assert decoded.notes == {"bilevel"}


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF", "WEBP", "PPM"])
def test_other_formats(fmt):
    image = Image.fromarray(RGB)
    data = _encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    decoded = _decode(data, fmt)
    assert decoded.pixels.shape[:2] == (6, 8)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if decoded.pixels.ndim == 2:  # a GIF whose palette is grey
        reference = reference[..., 0]
    np.testing.assert_array_equal(decoded.pixels, reference)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_orientation_is_applied(fmt):
    """Stored 8x16, left half black, right half white, EXIF orientation 6 (shown turned 90
    degrees clockwise): shown 16x8, top half black, bottom half white."""
    stored = np.zeros((8, 16), np.uint8)
    stored[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), quality=100)
    decoded = _decode(data, fmt)
    assert decoded.pixels.shape == (16, 8) and decoded.original_size == (16, 8)  # grey
    assert decoded.pixels[:6].max() < 40 and decoded.pixels[10:].min() > 215
    assert "rotated" in decoded.notes
    plain = _decode(_encode(Image.fromarray(stored), fmt, quality=100), fmt)
    assert plain.pixels.shape == (8, 16) and "rotated" not in plain.notes
    resized = _decode(data, fmt, size=(4, 2))
    assert resized.pixels.shape == (4, 2) and resized.pixels[0].max() < 60


def test_grey_content_stored_as_rgb_is_grey():
    decoded = _decode(_encode(Image.fromarray(np.dstack([GREY] * 3))))
    np.testing.assert_array_equal(decoded.pixels, GREY)
    assert decoded.notes == {"grey stored as colour"}
    almost = np.dstack([GREY] * 3)
    almost[2, 3, 1] ^= 1  # one pixel with a trace of colour: a colour image
    assert _decode(_encode(Image.fromarray(almost))).pixels.shape == (6, 8, 3)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    decoded = _decode(_encode(cmyk, "JPEG"), "JPEG")
    assert decoded.pixels.shape == (6, 8, 3) and decoded.notes == {"cmyk"}


def test_a_file_is_only_handed_to_the_decoder_its_suffix_names():
    jpeg = _encode(Image.fromarray(RGB), "JPEG")
    with pytest.raises(DataError, match=r"x.png is not a readable PNG image \(.*\): replace it "
                                        r"with a valid PNG file or remove it"):
        _decode(jpeg, "PNG")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x89PNG\r\n\x1a\n" + bytes(10), _encode(Image.fromarray(RGB))[:-40],
     b"<html>not an image</html>"],
    ids=["empty", "header only", "truncated", "html"],
)
def test_corrupt_images_are_one_line_errors(data):
    with pytest.raises(DataError, match=r"x.png is not a readable PNG image") as info:
        _decode(data)
    assert "\n" not in str(info.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height grey pixels with one tiny IDAT: a decompression bomb's
    header (decoding it would need width * height bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 30_000], ids=["above vaelab's limit", "pillow error"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_before_decoding(side):
    assert side * side > MAX_PIXELS
    with pytest.raises(DataError, match=rf"x.png is {side}x{side} pixels, more than the "
                                        rf"89,478,485 vaelab accepts per image \(a "
                                        rf"decompression bomb\?\): downscale it or remove it"):
        _decode(_png_header_only(side, side))


def test_resize_is_shorter_side_then_centre_crop_in_one_lanczos_pass():
    wide = RNG.integers(0, 256, (20, 60, 3), dtype=np.uint8)
    out = resize(wide, (10, 10))
    expected = Image.fromarray(wide).resize((10, 10), Image.Resampling.LANCZOS,
                                            box=(20, 0, 40, 20), reducing_gap=3.0)
    np.testing.assert_array_equal(out, np.asarray(expected))
    # as in "resize, then crop": the cut-off thirds reach in only as far as the kernel
    # (3 lobes x 2 source pixels per output pixel = 3 output columns)
    striped = np.zeros((20, 60), np.uint8)
    striped[:, 20:40] = 200
    np.testing.assert_array_equal(resize(striped, (10, 10))[:, 3:-3], 200)
    assert resize(striped, (20, 60)) is striped  # same size: untouched
    tall = resize(RNG.integers(0, 256, (30, 12), dtype=np.uint8), (5, 4))
    assert tall.shape == (5, 4)


def test_decode_with_size_notes_upscaling_and_uses_jpeg_draft():
    small = _decode(_encode(Image.fromarray(GREY)), size=(12, 16))
    assert small.pixels.shape == (12, 16) and "upscaled" in small.notes
    big = RNG.integers(0, 256, (512, 640, 3), dtype=np.uint8)
    decoded = _decode(_encode(Image.fromarray(big), "JPEG", quality=95), "JPEG", size=(32, 32))
    assert decoded.pixels.shape == (32, 32, 3) and decoded.original_size == (512, 640)
    full = resize(np.asarray(Image.open(io.BytesIO(_encode(Image.fromarray(big), "JPEG",
                                                           quality=95)))), (32, 32))
    # the reduced DCT decode is close to decoding in full and resizing (noise image)
    assert np.abs(decoded.pixels.astype(int) - full.astype(int)).mean() < 8


def test_colour_conversions_are_exactly_pillows():
    images = RNG.integers(0, 256, (5, 3, 7, 9), dtype=np.uint8)
    grey = rgb_to_grey(images)
    pillow = np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0)).convert("L"))
                       for im in images])
    np.testing.assert_array_equal(grey[:, 0], pillow)
    rgb = grey_to_rgb(grey)
    assert rgb.shape == (5, 3, 7, 9) and all(np.array_equal(rgb[:, c], grey[:, 0])
                                             for c in range(3))


@pytest.mark.parametrize(("value", "expected"),
                         [(None, None), (32, (32, 32)), ("32", (32, 32)), ("64x48", (64, 48)),
                          (" 64X48 ", (64, 48)), ((28, 32), (28, 32)), ([5, 6], (5, 6))])
def test_image_size_values(value, expected):
    assert parse_image_size(value) == expected


@pytest.mark.parametrize("value", [0, -3, "32x", "x32", "3x4x5", "big", 2.5, True, (32,),
                                   (0, 4)])
def test_bad_image_size_values(value):
    with pytest.raises(ConfigError, match=r"image_size must be N or HxW with positive integers"):
        parse_image_size(value)


def test_channels_layout_and_test_count_values():
    assert [parse_channels(v) for v in ("auto", 1, 3, "1", "3")] == ["auto", 1, 3, 1, 3]
    for bad in (2, 4, True, "rgb", None):
        with pytest.raises(ConfigError, match=r"channels must be 'auto', 1 \(grey\) or 3"):
            parse_channels(bad)
    assert [parse_layout(v) for v in ("auto", "NCHW", "nhwc")] == ["auto", "nchw", "nhwc"]
    with pytest.raises(ConfigError, match=r"layout must be one of auto, nchw, nhwc"):
        parse_layout("chw")
    assert [held_out_count(n, None) for n in (1, 12, 30, 500, 100_000, 10**6)] == \
        [1, 2, 3, 50, 10_000, 10_000]
    assert [held_out_count(30, 0.1), held_out_count(12, 0.25), held_out_count(7, 0.0), held_out_count(9, 4)] == \
        [3, 3, 0, 4]
