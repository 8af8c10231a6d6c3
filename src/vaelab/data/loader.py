"""``load``: a registered dataset, an array file or a folder of images -> one :class:`ImageSet` split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .binarize import TEST_BINARIZATION_SEED, binarize_images
from .formats import read_part
from .imageset import BINARIZE_MODES, ImageSet, indices_digest, split_indices
from .options import UserOptions
from .registry import DATASETS, DatasetSpec
from .sources import resolve
from .user import ARRAY_SUFFIXES, USER_SPLITS, load_user

__all__ = ["load", "load_split", "REGISTERED_SPLITS", "USER_SPLITS", "TEST_BINARIZATION_SEED"]

REGISTERED_SPLITS = ("train", "validation", "test")


def load(
    name_or_path: str | os.PathLike,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    validation_size: int = 5000,
    seed: int = 0,
    *,
    image_size: int | str | tuple[int, int] | None = None,
    channels: str | int = "auto",
    layout: str = "auto",
    test_size: int | float | None = None,
    test_path: str | os.PathLike | None = None,
    test_seed: int = 0,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ImageSet:
    r"""Load one split of a dataset as uint8 images ``(N, C, H, W)``.

    Args:
        name_or_path: a registered name (``mnist``, ``fashion-mnist``, ``kmnist``,
            ``binarized-mnist``, ``cifar10``, ``svhn``), a ``.npz``/``.npy`` file
            (:mod:`vaelab.data.files`) or a folder of images (:mod:`vaelab.data.folders`;
            registered names win: write ``./mnist`` for a folder called ``mnist``).
        split: ``"train"`` (the training data minus the validation examples),
            ``"validation"`` or ``"test"``; user data also has ``"all"`` (every example of
            the file or folder). A registered dataset's test split is its official test
            set; user data's is ``test_path`` or a held-out part (:mod:`vaelab.data.user`).
        data_dir: a folder holding a registered dataset's files (directly or in
            ``<name>/``); see :mod:`vaelab.data.sources` for the full resolution order.
        binarize: ``"none"``; ``"dynamic"`` (train/validation keep grey levels and
            :meth:`ImageSet.batch` draws :math:`\mathrm{Bernoulli}(\text{grey}/255)` afresh;
            the test split is binarised once with the fixed seed
            ``TEST_BINARIZATION_SEED = 0``, i.e. exactly as ``binarize="static", seed=0``,
            so test numbers are comparable between runs); ``"static"`` (one draw per
            official part, or per user file, from ``seed``, via :func:`derive_seed`\
            ``(seed, "static:<part>")``). ``binarized-mnist`` is already binary (Larochelle's
            official draw): ``"none"`` and ``"static"`` both give it unchanged (recorded as
            ``"static"``); ``"dynamic"`` is refused.
        validation_size: examples held out for validation from the official training set
            (or from the user data left after the test split):
            ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))``\
            ``[:validation_size]``, sorted. 0 is allowed (the validation split is then empty
            and cannot be loaded). Ignored for ``binarized-mnist``, whose validation split is
            the official 10,000 examples. For user data it may not exceed the training part.
        seed: seed of the validation split and of static binarisation.
        image_size: user data only: ``N``, ``"HxW"`` or ``(H, W)`` (height, width): every
            image is resized so that its shorter side fits, with antialiasing (Pillow
            LANCZOS, ``reducing_gap=3.0``), and centre-cropped (:mod:`vaelab.data.images`).
            None (default): images must all have one size. A registered dataset accepts only
            its own size.
        channels: ``"auto"`` (default: colour when any image is colour, else grey), ``1``
            (grey: ITU-R 601-2 luma, as Pillow) or ``3`` (grey repeated). Alpha is dropped.
        layout: ``.npy``/``.npz`` only: ``"auto"`` (detected when unambiguous), ``"nchw"``
            or ``"nhwc"``.
        test_size: user data without ``test_path``: the held-out test part, a fraction in
            [0, 1) (:math:`\lceil f N \rceil` examples) or a count; None (default) is 10%,
            at most 10,000; 0 means no test split.
        test_path: user data: a separate ``.npz``/``.npy`` file or folder for the test split,
            read with the same options (then nothing is held out).
        test_seed: seed of the held-out test part (default 0, independent of ``seed``).
        cache: folders: reuse (and write) the cache of decoded images (:mod:`.cache`).
        cache_dir: where that cache lives (default ``<user cache>/decoded``, see
            :func:`vaelab.data.cache_dir`).
        progress: show progress while decoding a folder (a bar on a terminal, else a line
            every 10%; nothing for reads under a second).

    Returns:
        An :class:`ImageSet` whose ``checksums`` and ``metadata`` record the files, the
        splits (``metadata["validation"]``, and for user data ``metadata["test_split"]``),
        the binarisation and, where known, the class names (``metadata["classes"]``).

    Raises:
        ConfigError: unknown dataset, split or option value; a split that leaves too
            little training data.
        DataError: missing, damaged or unverifiable files, bad user data, empty split.
    """
    if binarize not in BINARIZE_MODES:
        raise ConfigError(f"unknown binarize {binarize!r}: choose one of "
                          f"{', '.join(BINARIZE_MODES)}")
    if isinstance(validation_size, bool) or not isinstance(validation_size, int) \
            or validation_size < 0:
        raise ConfigError(f"validation_size must be an integer >= 0, got {validation_size!r}")
    options = UserOptions.parse(image_size, channels, layout, test_size, test_path, test_seed,
                                cache, cache_dir, progress)
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        spec = DATASETS[name_or_path]
        _check_registered_options(spec, options)
        return _load_registered(spec, split, data_dir, binarize, validation_size, seed)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return load_user(path, str(name_or_path), split, binarize, validation_size, seed,
                         options)
    text = str(name_or_path)
    if path.suffix.lower() in ARRAY_SUFFIXES or "/" in text or os.sep in text:
        raise DataError(f"{text} does not exist: give an existing .npz/.npy file or folder of "
                        f"images")
    raise ConfigError(
        f"unknown dataset {text!r}: choose one of {', '.join(DATASETS.names())}, or give a "
        f".npz/.npy file or a folder of images"
    )


def load_split(cfg: DataConfig, split: str, seed: int, progress: bool = True) -> ImageSet:
    """One split of the dataset a run's ``[data]`` section describes.

    :func:`load` with the section's options and ``seed`` (the run's ``train.seed``); then
    ``train_limit`` / ``test_limit`` keep the first examples of the train / test split.
    """
    test_size = cfg.test_size
    if test_size is not None and test_size >= 1 and float(test_size).is_integer():
        test_size = int(test_size)  # a count
    images = load(cfg.dataset, split=split, data_dir=cfg.data_dir, binarize=cfg.binarize,
                  validation_size=cfg.validation_size, seed=seed, image_size=cfg.image_size,
                  channels=cfg.channels, layout=cfg.layout, test_size=test_size,
                  test_path=cfg.test_dataset, cache=cfg.cache, progress=progress)
    limit = {"train": cfg.train_limit, "test": cfg.test_limit}.get(split)
    if limit is not None and limit < len(images):
        images = images.subset(torch.arange(limit))
    return images


def _check_registered_options(spec: DatasetSpec, options: UserOptions) -> None:
    """A registered dataset is used as published: user-data options are refused."""
    c, h, w = spec.image_shape
    bad = options.for_registered()
    if options.image_size is not None and options.image_size != (h, w):
        bad.insert(0, "image_size")
    if options.channels not in ("auto", c):
        bad.insert(0, "channels")
    if bad:
        raise ConfigError(
            f"{', '.join(bad)} {'apply' if len(bad) > 1 else 'applies'} to your own data; "
            f"{spec.name} is used as published ({c}x{h}x{w} images, official test set): "
            f"leave {'them' if len(bad) > 1 else 'it'} unset"
        )


def _check_split(split: str, valid: tuple[str, ...], what: str) -> None:
    if split in valid:
        return
    raise ConfigError(f"unknown split {split!r} for {what}: choose one of {', '.join(valid)}")


def _official_part(spec: DatasetSpec, split: str) -> str:
    if split == "validation" and "valid" in spec.parts:
        return "valid"
    return "test" if split == "test" else "train"


def _select(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    split: str,
    validation_size: int,
    seed: int,
    name: str,
    source_size: str,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any] | None]:
    """Carve ``train`` / ``validation`` out of ``images``; other splits take everything."""
    if split not in ("train", "validation"):
        return images, labels, None
    n = images.shape[0]
    if validation_size >= n:
        raise ConfigError(f"validation_size {validation_size} leaves no training data in "
                          f"{name} ({n} examples): choose a smaller value, e.g. --set "
                          f"data.validation_size={max(1, n // 10) if n >= 2 else 0}")
    if split == "validation" and validation_size == 0:
        raise DataError(f"{name}: the validation split is empty (validation_size=0): pass "
                        f"validation_size > 0 or evaluate on another split")
    train_index, validation_index = split_indices(n, validation_size, seed)
    index = train_index if split == "train" else validation_index
    meta = {
        "size": validation_size, "seed": seed, "taken_from": source_size,
        "method": f"torch.randperm({n}, generator=torch.Generator().manual_seed({seed}))"
                  f"[:{validation_size}], sorted",
        "indices_sha256": indices_digest(validation_index),
    }
    chosen_labels = labels[index] if labels is not None else None
    return images[index].contiguous(), chosen_labels, meta


def _load_registered(
    spec: DatasetSpec,
    split: str,
    data_dir: str | os.PathLike | None,
    binarize: str,
    validation_size: int,
    seed: int,
) -> ImageSet:
    _check_split(split, REGISTERED_SPLITS, spec.name)
    part = _official_part(spec, split)
    resolution = resolve(spec, [part], data_dir)
    files = [resolution.files[name] for name in spec.parts[part]]
    images, labels = read_part(spec, part, files)
    part_size = int(images.shape[0])
    grey = images
    images, levels, mode, binarization = binarize_images(
        images, spec.levels, binarize, split, seed, part, official_binary=spec.levels == 2)
    drawn = levels == 2 and spec.levels == 256  # a draw made now: keep what it was made of
    if part == "train" and "valid" not in spec.parts:
        if drawn:
            grey = _select(grey, None, split, validation_size, seed, spec.name, "")[0]
        images, labels, validation = _select(images, labels, split, validation_size, seed,
                                             spec.name, f"official train part ({part_size})")
    else:
        validation = None
        if "valid" in spec.parts and split != "test":
            validation = {"official": True, "part": "valid",
                          "note": "the official validation part; validation_size is ignored"}
    metadata = {
        "dataset": spec.name, "split": split, "num_examples": int(images.shape[0]),
        "image_shape": list(images.shape[1:]), "levels": levels,
        "official_part": part, "official_part_size": part_size,
        "found_in": {"step": resolution.step, "directory": str(resolution.directory)},
        "files": [f.describe() for f in files],
        "validation": validation, "binarization": binarization,
        "homepage": spec.homepage, "citation": spec.citation,
    }
    if spec.classes:
        metadata["classes"] = list(spec.classes)
    return ImageSet(images, labels, spec.name, split, mode, levels,
                    {f.key: f.sha256 for f in files}, metadata, grey=grey if drawn else None)
