"""Datasets for vaelab: verified registered datasets (MNIST family, CIFAR-10, SVHN), a user's
arrays and folders of images, splits, binarisation.

Entry point::

    from vaelab.data import load
    train = load("fashion-mnist", split="train", binarize="dynamic")   # 55,000 images
    x = train.batch(torch.arange(128), generator=g)                    # float32 (128, 1, 28, 28)
    pets = load("~/pets", split="test", image_size=64)                 # a folder, one class per
                                                                       # sub-folder, 10% held out

A user's data: :mod:`vaelab.data.files` (arrays), :mod:`vaelab.data.folders` (folders),
:mod:`vaelab.data.images` (decoding, resizing, colour), :mod:`vaelab.data.user` (splits),
:mod:`vaelab.data.cache` (the decoded-image cache).

Where the files come from (data_dir, ``$VAELAB_DATA_DIR``, the user cache, system
directories such as Debian's ``/usr/share/datasets/fashion-mnist``, then verified downloads)
is described in :mod:`vaelab.data.sources`; the checksums and their sources in
:mod:`vaelab.data.registry`.
"""

from __future__ import annotations

from .files import UserData, read_array_file
from .folders import read_image_folder
from .idx import parse_amat, parse_idx, read_amat, read_idx, write_amat, write_idx
from .images import IMAGE_FORMATS
from .imageset import (
    BINARIZE_MODES,
    ImageSet,
    bernoulli_binarize,
    derive_seed,
    dynamic_binarize,
    indices_digest,
    random_bytes,
    split_indices,
    validation_indices,
)
from .loader import REGISTERED_SPLITS, TEST_BINARIZATION_SEED, USER_SPLITS, load, load_split
from .options import UserOptions
from .registry import DATASETS, DatasetSpec, RemoteFile
from .sources import (
    SYSTEM_DATA_DIRS,
    Resolution,
    VerifiedFile,
    cache_dir,
    mirror_env_var,
    mirrors_for,
    resolve,
    system_data_dirs,
    verify_file,
)
from .splits import Splits

__all__ = [
    "load",
    "load_split",
    "Splits",
    "ImageSet",
    "BINARIZE_MODES",
    "REGISTERED_SPLITS",
    "USER_SPLITS",
    "TEST_BINARIZATION_SEED",
    "DATASETS",
    "DatasetSpec",
    "RemoteFile",
    "read_idx",
    "parse_idx",
    "write_idx",
    "read_amat",
    "parse_amat",
    "write_amat",
    "UserData",
    "read_array_file",
    "read_image_folder",
    "IMAGE_FORMATS",
    "UserOptions",
    "validation_indices",
    "split_indices",
    "indices_digest",
    "derive_seed",
    "bernoulli_binarize",
    "dynamic_binarize",
    "random_bytes",
    "SYSTEM_DATA_DIRS",
    "Resolution",
    "VerifiedFile",
    "cache_dir",
    "system_data_dirs",
    "mirrors_for",
    "mirror_env_var",
    "resolve",
    "verify_file",
]
