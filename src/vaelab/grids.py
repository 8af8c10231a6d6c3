"""Image grids as PNG files, with Pillow only (no matplotlib): the per-epoch sample grids
the trainer writes, ``vaelab sample``, and the tiles of the analysis figures."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._io import atomic_write_bytes
from .errors import VaelabError

__all__ = ["make_grid", "save_image_grid", "grid_columns", "to_uint8", "write_png_bytes"]


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``images (N, C, H, W)`` in [0, 1] into one image ``(C, H', W')``.

    Images fill rows of ``nrow`` left to right, top to bottom (the last row may be
    short; empty cells keep ``pad_value``). With ``r = ceil(N / nrow)`` rows and
    ``c = min(N, nrow)`` columns, ``H' = r (H + padding) + padding`` and
    ``W' = c (W + padding) + padding``; image ``i`` starts at row
    ``padding + (i // nrow) (H + padding)`` and column ``padding + (i % nrow) (W + padding)``.

    Raises:
        VaelabError: wrong shape, channel count not 1 or 3, NaN/Inf values, ``nrow < 1``
            or ``padding < 0``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise VaelabError(
            f"an image grid needs images shaped (N, C, H, W) with N >= 1 and C in (1, 3), got "
            f"{tuple(images.shape)}: reshape the batch (e.g. x.view(-1, 1, 28, 28))"
        )
    if nrow < 1 or padding < 0:
        raise VaelabError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, "
                          f"padding={padding}")
    images = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).sum())
        raise VaelabError(f"cannot draw {bad} NaN/Inf pixel values: check the decoder output")
    n, channels, height, width = images.shape
    cols = min(n, nrow)
    rows = math.ceil(n / nrow)
    grid = torch.full(
        (channels, rows * (height + padding) + padding, cols * (width + padding) + padding),
        float(pad_value),
    )
    for i in range(n):
        top = padding + (i // nrow) * (height + padding)
        left = padding + (i % nrow) * (width + padding)
        grid[:, top:top + height, left:left + width] = images[i]
    return grid.clamp(0.0, 1.0)


def to_uint8(grid: Tensor) -> np.ndarray:
    """``(C, H, W)`` floats in [0, 1] -> ``(H, W)`` or ``(H, W, 3)`` uint8 (round to nearest)."""
    array = (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    return array.numpy()


def write_png_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating its directory; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, sync_dir=False)
    return path


def save_image_grid(
    images: Tensor,
    path: str | Path,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write ``images (N, C, H, W)`` in [0, 1] as one PNG grid (see :func:`make_grid`).

    Pixels are ``round(255 * x)``; C = 1 gives a greyscale PNG, C = 3 an RGB one. The
    file is written atomically and its directory is created.

    Returns:
        the path written.
    """
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(grid)).save(buffer, format="PNG")
    return write_png_bytes(Path(path), buffer.getvalue())


def grid_columns(n: int) -> int:
    """Columns of a near-square grid of ``n`` images."""
    return max(1, math.ceil(math.sqrt(n)))
