"""Readers of the registered datasets' file formats: one official part -> images and labels.

A registry keyed by :attr:`vaelab.data.DatasetSpec.format`; each reader takes the spec, the
part (``"train"``, ``"valid"``, ``"test"``) and the part's verified files, and returns uint8
images ``(N, C, H, W)`` and int64 labels ``(N,)`` (or None) as writable tensors. A new
format is one function and one ``@PART_READERS.register(...)`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..registry import Registry
from . import cifar, svhn
from .idx import parse_amat, parse_idx
from .registry import DatasetSpec
from .sources import VerifiedFile

__all__ = ["PART_READERS", "read_part"]

PartReader = Callable[[DatasetSpec, str, Sequence[VerifiedFile]],
                      tuple[torch.Tensor, "torch.Tensor | None"]]
PART_READERS: Registry[PartReader] = Registry("dataset format")


def _checked_shape(spec: DatasetSpec, images: np.ndarray, source: object) -> None:
    if tuple(images.shape[1:]) != tuple(spec.image_shape):
        raise DataError(f"{source} holds images of shape {tuple(images.shape[1:])}; "
                        f"{spec.name} images are {tuple(spec.image_shape)}: is it the right file?")


@PART_READERS.register("idx")
def _read_idx(spec: DatasetSpec, part: str, files: Sequence[VerifiedFile]):
    """MNIST-style pair of idx files (images N x H x W, labels N)."""
    images_file, labels_file = files
    c, h, w = spec.image_shape
    images = parse_idx(bytearray(images_file.data), images_file.path, ndim=3)
    labels = parse_idx(bytearray(labels_file.data), labels_file.path, ndim=1)
    if images.shape[1:] != (h, w):
        raise DataError(f"{images_file.path} holds {images.shape[1]}x{images.shape[2]} images; "
                        f"{spec.name} images are {h}x{w}: is it the right file?")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_file.path} holds {images.shape[0]} images but {labels_file.path} holds "
            f"{labels.shape[0]} labels: the files do not belong together; replace them with "
            f"the official pair"
        )
    return (torch.from_numpy(images.reshape(-1, c, h, w)),
            torch.from_numpy(labels.astype(np.int64)))


@PART_READERS.register("amat")
def _read_amat(spec: DatasetSpec, part: str, files: Sequence[VerifiedFile]):
    """Larochelle's binarized MNIST: one ``.amat`` text file of 0/1 values, no labels."""
    (images_file,) = files
    c, h, w = spec.image_shape
    bits = parse_amat(bytearray(images_file.data), images_file.path, width=c * h * w)
    return torch.from_numpy(bits.reshape(-1, c, h, w)), None


@PART_READERS.register("cifar10-bin")
def _read_cifar(spec: DatasetSpec, part: str, files: Sequence[VerifiedFile]):
    """CIFAR-10 binary version: batches of ``cifar-10-binary.tar.gz`` (:mod:`.cifar`)."""
    (archive,) = files
    images, labels = cifar.read_archive(archive.data, archive.path, part)
    _checked_shape(spec, images, archive.path)
    return torch.from_numpy(images), torch.from_numpy(labels)


@PART_READERS.register("svhn-mat")
def _read_svhn(spec: DatasetSpec, part: str, files: Sequence[VerifiedFile]):
    """SVHN cropped digits, format 2 (:mod:`.svhn`)."""
    (mat,) = files
    images, labels = svhn.parse_svhn(mat.data, mat.path)
    _checked_shape(spec, images, mat.path)
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_part(spec: DatasetSpec, part: str, files: Sequence[VerifiedFile]):
    """Images and labels of ``spec``'s official ``part`` from its verified ``files``."""
    return PART_READERS[spec.format](spec, part, files)
