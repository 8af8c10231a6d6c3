"""SVHN cropped digits (Netzer et al., 2011), format 2: ``train_32x32.mat`` and ``test_32x32.mat``.

Each file (http://ufldl.stanford.edu/housenumbers/) is a level-5 MAT-file read by
:mod:`vaelab.data.matfile` (no SciPy, nothing unpickled) with two variables:

- ``X``: uint8 of MATLAB shape ``(32, 32, 3, N)`` = (row, column, RGB, image); returned as
  ``(N, 3, 32, 32)``, i.e. ``X.transpose(3, 2, 0, 1)``;
- ``y``: ``(N, 1)`` labels 1..10, where 10 stands for the digit 0. vaelab maps 10 to 0 so
  that a label is the digit shown (as tensorflow-datasets and torchvision do).

The 531,131 "extra" images (``extra_32x32.mat``, 1.3 GB) are not part of this entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .matfile import parse_mat, write_mat

__all__ = ["CLASSES", "parse_svhn", "write_svhn"]

CLASSES = tuple(str(d) for d in range(10))
_REFETCH = "delete it and download it again"


def parse_svhn(data: bytes, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` (digits 0..9) of one file.

    Raises:
        DataError: not a MAT-file, missing ``X``/``y``, wrong shapes or dtypes, labels
            outside 1..10.
    """
    variables = parse_mat(data, source)
    if "X" not in variables or "y" not in variables:
        raise DataError(f"{source} holds variables {sorted(variables)}, not SVHN's 'X' and "
                        f"'y': {_REFETCH}")
    x, y = variables["X"], variables["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{source}: X is {x.dtype} of shape {x.shape}, expected uint8 "
                        f"(32, 32, 3, N): {_REFETCH}")
    n = x.shape[3]
    if y.shape not in ((n, 1), (1, n)) or not np.all(np.isin(y, np.arange(1, 11))):
        raise DataError(f"{source}: y of shape {y.shape} is not one label 1..10 for each of "
                        f"the {n} images: {_REFETCH}")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def write_svhn(path: str | Path, images: np.ndarray, labels: np.ndarray,
               label_storage: type | None = np.uint8) -> Path:
    """Write uint8 ``(N, 3, 32, 32)`` images and digit labels 0..9 in SVHN's format, for
    tests: ``X`` (32, 32, 3, N), ``y`` doubles 1..10 (stored as ``label_storage``)."""
    x = np.asarray(images, np.uint8).transpose(2, 3, 1, 0)
    y = np.where(np.asarray(labels) == 0, 10, labels).astype(np.float64).reshape(-1, 1)
    stored = {"y": np.dtype(label_storage)} if label_storage is not None else None
    return write_mat(path, {"X": x, "y": y}, compress=True, stored=stored)
