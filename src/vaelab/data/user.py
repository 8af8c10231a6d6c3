r"""Data a user brings (an ``.npz``/``.npy`` file or a folder of images) and its splits.

The splits, all disjoint and each a pure function of its seed:

- ``test``: from ``test_path`` (a separate file or folder, read with the same options) when
  given; else ``k`` examples held out of the data: :math:`k` = ``held_out_count(N, test_size)``
  (default :math:`\min(\lceil 0.1 N \rceil, 10000)`), the first ``k`` of
  ``torch.randperm(N, generator=Generator().manual_seed(derive_seed(test_seed,
  "user-test")))``, sorted. ``test_seed`` (default 0) is not the run's seed, so runs with
  different seeds are evaluated on the same examples and never train on one another's test
  examples (as with the official test set of a registered dataset).
- ``validation``: ``validation_size`` examples of the remaining ``N - k``, chosen with the
  run's ``seed`` exactly as for registered datasets (:func:`vaelab.data.split_indices` on
  the remaining examples, in file order); refused when the training part would be smaller
  than the validation part.
- ``train``: the rest. ``all``: every example of the data (the test file excluded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .binarize import binarize_images
from .files import UserData, read_array_file
from .folders import FolderRead, read_image_folder
from .images import format_size, grey_to_rgb
from .imageset import ImageSet, derive_seed, indices_digest, split_indices
from .options import UserOptions, held_out_count
from .sources import cache_dir

__all__ = ["USER_SPLITS", "ARRAY_SUFFIXES", "UserSplits", "user_splits", "read_user_data",
           "load_user"]

USER_SPLITS = ("all", "train", "validation", "test")
ARRAY_SUFFIXES = (".npz", ".npy")


def read_user_data(path: Path, options: UserOptions,
                   channels: str | int | None = None) -> FolderRead:
    """Read a folder of images or an array file with ``options`` (``channels`` overrides
    ``options.channels``)."""
    channels = options.channels if channels is None else channels
    if path.is_dir():
        root = None
        if options.cache:
            root = options.cache_dir or cache_dir() / "decoded"
        return read_image_folder(path, options.image_size, channels, cache_root=root,
                                 progress=options.progress)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        data = read_array_file(path, options.layout, channels, options.image_size)
        return FolderRead(data, lambda: False)
    raise DataError(f"{path} is neither a .npz/.npy file nor a folder of images: convert the "
                    f"data with np.save or np.savez, or put the images in a folder")


@dataclass(frozen=True)
class UserSplits:
    """Sorted int64 index tensors into the data, and JSON-able records of how they were made."""

    train: torch.Tensor | None
    validation: torch.Tensor | None
    test: torch.Tensor | None
    test_record: dict[str, Any]
    validation_record: dict[str, Any] | None


def _suggest(remaining: int) -> int:
    return max(1, remaining // 10) if remaining >= 2 else 0


def user_splits(n: int, validation_size: int, seed: int, options: UserOptions,
                name: str, with_validation: bool = True) -> UserSplits:
    """Split ``n`` examples into train / validation / held-out test (see the module docstring).

    ``with_validation=False`` makes only the test part (train and validation are None), so
    loading the test split does not depend on ``validation_size``.

    Raises:
        ConfigError: a test or validation part that leaves too little training data; the
            message names the setting to change and a value that works.
    """
    if options.test_path is not None:
        test = None
        rest = torch.arange(n)
        test_record: dict[str, Any] = {"source": "test_path", "path": str(options.test_path)}
    else:
        k = held_out_count(n, options.test_size)
        if k >= n:
            raise ConfigError(
                f"test_size {options.test_size!r} holds out {k} of the {n} examples of {name}, "
                f"leaving none to train on: choose a smaller value (--set data.test_size=0.1) "
                f"or give a separate test set (--test-dataset PATH)"
            )
        generator_seed = derive_seed(options.test_seed, "user-test")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(generator_seed))
        test = order[:k].sort().values
        keep = torch.ones(n, dtype=torch.bool)
        keep[test] = False
        rest = keep.nonzero().squeeze(1)
        requested = ("default: 10%, at most 10,000" if options.test_size is None
                     else options.test_size)
        test_record = {
            "source": "held out", "size": k, "of": n, "test_size": requested,
            "seed": options.test_seed, "generator_seed": generator_seed,
            "method": f"torch.randperm({n}, generator=torch.Generator().manual_seed("
                      f"derive_seed({options.test_seed}, 'user-test')))[:{k}], sorted",
            "indices_sha256": indices_digest(test),
        }
    if not with_validation:
        return UserSplits(None, None, test, test_record, None)
    remaining = int(rest.numel())
    after_test = " left after the test split" if test is not None else ""
    if validation_size >= remaining:
        raise ConfigError(
            f"validation_size {validation_size} leaves no training data in {name} ({remaining} "
            f"examples{after_test}): choose a smaller value, e.g. --set "
            f"data.validation_size={_suggest(remaining)}"
        )
    if remaining - validation_size < validation_size:
        raise ConfigError(
            f"validation_size {validation_size} leaves only {remaining - validation_size} "
            f"training examples in {name} ({remaining} examples{after_test}), fewer than it "
            f"holds out: choose a smaller value, e.g. --set "
            f"data.validation_size={_suggest(remaining)}"
        )
    train_position, validation_position = split_indices(remaining, validation_size, seed)
    validation = rest[validation_position]
    validation_record = {
        "size": validation_size, "seed": seed,
        "taken_from": f"the {remaining} examples{after_test}, in file order",
        "method": f"torch.randperm({remaining}, generator=torch.Generator().manual_seed({seed}))"
                  f"[:{validation_size}], sorted, of those examples",
        "indices_sha256": indices_digest(validation),
    }
    return UserSplits(rest[train_position], validation, test, test_record, validation_record)


def _test_source(main: UserData, main_name: str,
                 options: UserOptions) -> tuple[UserData, FolderRead]:
    """The separate test set in the main data's colour mode, size and class numbering, and
    its read as decoded (what its cache entry holds: never the adjusted copy)."""
    assert options.test_path is not None
    path = options.test_path
    if not path.exists():
        raise DataError(f"test data {path} does not exist: give an existing .npz/.npy file or "
                        f"folder of images (--test-dataset PATH)")
    read = read_user_data(path, options)
    test = dataclasses.replace(read.data, metadata=dict(read.data.metadata))
    c, h, w = main.images.shape[1:]
    if test.images.shape[1] != c:
        if test.images.shape[1] == 1 and c == 3:
            test.images = grey_to_rgb(test.images)
            test.metadata["channels"] = {**test.metadata.get("channels", {}), "chosen": 3,
                                         "note": "grey repeated to match the training data"}
        else:
            raise DataError(
                f"test data {path} is colour but {main_name} is grey: set data.channels=1 to "
                f"read both as grey (or 3 for colour)"
            )
    if tuple(test.images.shape[2:]) != (h, w):
        raise DataError(
            f"test data {path} holds {format_size(test.images.shape[2:])} images but "
            f"{main_name} holds {format_size((h, w))} (height x width): pass --image-size N "
            f"or HxW (data.image_size) to bring both to one size"
        )
    main_classes = main.metadata.get("classes")
    test_classes = test.metadata.get("classes")
    if main_classes and test_classes and test.labels is not None:
        unknown = [name for name in test_classes if name not in main_classes]
        if unknown:
            raise DataError(
                f"test data {path} has class folder {unknown[0]!r}, which {main_name} does not "
                f"have (its classes: {', '.join(main_classes)}): rename or remove it"
            )
        mapping = np.asarray([main_classes.index(name) for name in test_classes], np.int64)
        test.labels = mapping[test.labels]
        test.metadata["classes"] = list(main_classes)
        test.metadata["test_classes"] = list(test_classes)
    return test, read


def load_user(path: Path, name: str, split: str, binarize: str, validation_size: int,
              seed: int, options: UserOptions) -> ImageSet:
    """One split of a user's file or folder (see the module docstring and
    :func:`vaelab.data.load`)."""
    if split not in USER_SPLITS:
        raise ConfigError(f"unknown split {split!r} for user data: choose one of "
                          f"{', '.join(USER_SPLITS)}")
    main = read_user_data(path, options)
    data = main.data
    n = int(data.images.shape[0])
    splits = None if split == "all" else user_splits(n, validation_size, seed, options, name,
                                                     with_validation=split != "test")
    reads = [main]
    if split == "test" and options.test_path is not None:
        source, test_read = _test_source(data, name, options)
        reads.append(test_read)
        index, part = None, "test"
    else:
        source, part = data, "all"
        index = None if splits is None else {
            "train": splits.train, "validation": splits.validation, "test": splits.test}[split]
        if split == "test" and (index is None or index.numel() == 0):
            raise DataError(
                f"{name} has no test split (test_size=0): give a separate test set "
                f"(--test-dataset PATH) or hold out part of the data (--set data.test_size=0.1)"
            )
        if split == "validation" and validation_size == 0:
            raise DataError(f"{name}: the validation split is empty (validation_size=0): pass "
                            f"validation_size > 0 or evaluate on another split")
    grey = torch.from_numpy(source.images)
    labels = torch.from_numpy(source.labels) if source.labels is not None else None
    images, levels, mode, binarization = binarize_images(
        grey, source.levels, binarize, split, seed, part, official_binary=False)
    drawn = levels == 2 and source.levels == 256  # a draw made now: keep what it was made of
    if index is not None:
        images = images.index_select(0, index)  # 2x faster than images[index] (one copy)
        labels = labels.index_select(0, index) if labels is not None else None
        grey = grey.index_select(0, index) if drawn else None
    metadata = {
        "dataset": name, "split": split, "num_examples": int(images.shape[0]),
        "image_shape": list(images.shape[1:]), "levels": levels, "file_size": n,
        **source.metadata,
        "test_split": splits.test_record if splits is not None else None,
        "validation": splits.validation_record if splits is not None else None,
        "binarization": binarization,
    }
    if source is not data:
        metadata["test_of"] = {"dataset": name, "path": data.metadata.get("path"),
                               "checksums": dict(data.checksums)}
    result = ImageSet(images, labels, name, split, mode, levels, dict(source.checksums),
                      metadata, grey=grey if drawn else None)
    for read in reads:  # only now that every check passed: a refused input leaves nothing
        read.save_cache()
    return result
