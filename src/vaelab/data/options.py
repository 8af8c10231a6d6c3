"""The options of :func:`vaelab.data.load` for data a user brings, parsed and checked once.

Each parser accepts what a TOML file or a command line naturally gives (``32``, ``"32"``,
``"64x48"``, ``"auto"``, ``"3"``) and raises a one-line :class:`ConfigError` naming the
option and the accepted values otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "LAYOUTS",
    "CHANNELS",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_TEST_MAX",
    "UserOptions",
    "parse_image_size",
    "parse_channels",
    "parse_layout",
    "parse_test_size",
    "held_out_count",
]

LAYOUTS = ("auto", "nchw", "nhwc")
CHANNELS = ("auto", 1, 3)
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_TEST_MAX = 10_000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_image_size(value: object) -> tuple[int, int] | None:
    """``None``, ``N``, ``"N"``, ``"HxW"`` or ``(H, W)`` -> ``(H, W)`` (height, width) or None."""
    if value is None:
        return None
    sides: list[object] = []
    if _is_int(value):
        sides = [value, value]
    elif isinstance(value, str):
        parts = value.strip().lower().split("x")
        sides = [int(p) if p.strip().isdigit() else -1 for p in parts]
        sides = sides * 2 if len(sides) == 1 else sides
    elif isinstance(value, (tuple, list)):
        sides = list(value)
    if len(sides) != 2 or not all(_is_int(s) and s > 0 for s in sides):  # type: ignore[operator]
        raise ConfigError(f"image_size must be N or HxW with positive integers (e.g. 32 or "
                          f"64x48, height x width), got {value!r}")
    return int(sides[0]), int(sides[1])  # type: ignore[call-overload]


def parse_channels(value: object) -> str | int:
    """``"auto"``, 1 or 3 (also ``"1"`` / ``"3"``)."""
    if isinstance(value, str) and value.strip() in ("1", "3"):
        return int(value)
    if value == "auto" or (_is_int(value) and value in (1, 3)):
        return value  # type: ignore[return-value]
    raise ConfigError(f"channels must be 'auto', 1 (grey) or 3 (colour), got {value!r}")


def parse_layout(value: object) -> str:
    """``"auto"``, ``"nchw"`` or ``"nhwc"`` (any case)."""
    if isinstance(value, str) and value.lower() in LAYOUTS:
        return value.lower()
    raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)} (the axes of a 4-D image "
                      f"array), got {value!r}")


def parse_test_size(value: object) -> int | float | None:
    """None (the default rule), a fraction in [0, 1) or a count >= 0."""
    if value is None or (_is_int(value) and value >= 0):  # type: ignore[operator]
        return value  # type: ignore[return-value]
    if isinstance(value, float) and 0.0 <= value < 1.0:
        return value
    raise ConfigError(f"test_size must be a fraction in [0, 1) or a number of examples >= 0 "
                      f"(default: 10%, at most {DEFAULT_TEST_MAX:,}), got {value!r}")


def held_out_count(n: int, test_size: int | float | None) -> int:
    r"""Examples held out for the test split out of ``n``.

    None: :math:`\min(\lceil 0.1 n \rceil, 10000)`; a fraction :math:`f`:
    :math:`\lceil f n \rceil` (computed on :math:`f n` rounded to 6 decimals, so that
    0.1 x 30 is 3, not 4); a count: itself.
    """
    if test_size is None:
        return min(math.ceil(round(DEFAULT_TEST_FRACTION * n, 6)), DEFAULT_TEST_MAX)
    if isinstance(test_size, float):
        return math.ceil(round(test_size * n, 6))
    return int(test_size)


@dataclass(frozen=True)
class UserOptions:
    """How to read data a user brings (see :func:`vaelab.data.load` for each field)."""

    image_size: tuple[int, int] | None = None
    channels: str | int = "auto"
    layout: str = "auto"
    test_size: int | float | None = None
    test_path: Path | None = None
    test_seed: int = 0
    cache: bool = True
    cache_dir: Path | None = None
    progress: bool = True

    @classmethod
    def parse(
        cls,
        image_size: object = None,
        channels: object = "auto",
        layout: object = "auto",
        test_size: object = None,
        test_path: str | os.PathLike | None = None,
        test_seed: object = 0,
        cache: object = True,
        cache_dir: str | os.PathLike | None = None,
        progress: object = True,
    ) -> UserOptions:
        """Check every option; raise :class:`ConfigError` for the first bad one."""
        if not _is_int(test_seed):
            raise ConfigError(f"test_seed must be an integer, got {test_seed!r}")
        for name, flag in (("cache", cache), ("progress", progress)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be true or false, got {flag!r}")
        size = parse_test_size(test_size)
        path = Path(test_path).expanduser() if test_path is not None else None
        if path is not None and size is not None:
            raise ConfigError("give either test_path (a separate test set) or test_size (a "
                              "held-out part of the data), not both")
        return cls(parse_image_size(image_size), parse_channels(channels), parse_layout(layout),
                   size, path, int(test_seed), bool(cache),  # type: ignore[arg-type]
                   Path(cache_dir).expanduser() if cache_dir is not None else None,
                   bool(progress))

    def for_registered(self) -> list[str]:
        """The options set here that a registered dataset cannot take (image_size and
        channels are checked against the dataset's own shape by the loader)."""
        return [name for name, value, default in (
            ("layout", self.layout, "auto"),
            ("test_size", self.test_size, None), ("test_path", self.test_path, None),
        ) if value != default]
