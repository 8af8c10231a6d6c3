"""``load``: a registered dataset, an array file or a PNG folder -> one :class:`ImageSet` split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .files import UserData, read_array_file, read_png_folder
from .idx import parse_amat, parse_idx
from .imageset import (
    BINARIZE_MODES,
    ImageSet,
    bernoulli_binarize,
    derive_seed,
    indices_digest,
    split_indices,
)
from .registry import DATASETS, DatasetSpec
from .sources import Resolution, resolve

__all__ = ["load", "load_split", "REGISTERED_SPLITS", "USER_SPLITS", "TEST_BINARIZATION_SEED"]

REGISTERED_SPLITS = ("train", "validation", "test")
USER_SPLITS = ("all", "train", "validation")
TEST_BINARIZATION_SEED = 0
_ARRAY_SUFFIXES = (".npz", ".npy")


def load(
    name_or_path: str | os.PathLike,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    validation_size: int = 5000,
    seed: int = 0,
) -> ImageSet:
    r"""Load one split of a dataset as uint8 images.

    Args:
        name_or_path: a registered name (``mnist``, ``fashion-mnist``, ``kmnist``,
            ``binarized-mnist``), a ``.npz``/``.npy`` file or a folder of PNG images
            (registered names win: write ``./mnist`` for a folder called ``mnist``).
        split: registered datasets: ``"train"`` (the official training set minus the
            validation examples), ``"validation"`` or ``"test"``. User data (one file, no
            official split): ``"all"``, ``"train"`` or ``"validation"``; evaluate on a test
            file by loading that file with ``split="all"``.
        data_dir: a folder holding the dataset's files (directly or in ``<name>/``); see
            :mod:`vaelab.data.sources` for the full resolution order.
        binarize: ``"none"``; ``"dynamic"`` (train/validation keep grey levels and
            :meth:`ImageSet.batch` draws :math:`\mathrm{Bernoulli}(\text{grey}/255)` afresh;
            the test split is binarised once with the fixed seed
            ``TEST_BINARIZATION_SEED = 0``, i.e. exactly as ``binarize="static", seed=0``,
            so test numbers are comparable between runs); ``"static"`` (one draw per
            official part from ``seed``, via :func:`derive_seed`\ ``(seed, "static:<part>")``).
            ``binarized-mnist`` is already binary (Larochelle's official draw): ``"none"`` and
            ``"static"`` both give it unchanged (recorded as ``"static"``); ``"dynamic"`` is
            refused.
        validation_size: examples held out from the official training set (or the user
            file): ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))``\
            ``[:validation_size]``, sorted. 0 is allowed (the validation split is then empty
            and cannot be loaded). Ignored for ``binarized-mnist``, whose validation split is
            the official 10,000 examples.
        seed: seed of the validation split and of static binarisation.

    Returns:
        An :class:`ImageSet` whose ``checksums`` and ``metadata`` record the verified files,
        the validation indices' digest and the binarisation.

    Raises:
        ConfigError: unknown dataset, split or binarize value; bad validation_size.
        DataError: missing, damaged or unverifiable files, bad user data, empty split.
    """
    if binarize not in BINARIZE_MODES:
        raise ConfigError(f"unknown binarize {binarize!r}: choose one of "
                          f"{', '.join(BINARIZE_MODES)}")
    if isinstance(validation_size, bool) or not isinstance(validation_size, int) \
            or validation_size < 0:
        raise ConfigError(f"validation_size must be an integer >= 0, got {validation_size!r}")
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        return _load_registered(DATASETS[name_or_path], split, data_dir, binarize,
                                validation_size, seed)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_user(path, str(name_or_path), split, binarize, validation_size, seed)
    text = str(name_or_path)
    if path.suffix.lower() in _ARRAY_SUFFIXES or "/" in text or os.sep in text:
        raise DataError(f"{text} does not exist: give an existing .npz/.npy file or PNG folder")
    raise ConfigError(
        f"unknown dataset {text!r}: choose one of {', '.join(DATASETS.names())}, or give a "
        f".npz/.npy file or a folder of PNG images"
    )


def load_split(cfg: DataConfig, split: str, seed: int) -> ImageSet:
    """One split of the dataset a run's ``[data]`` section describes.

    :func:`load` with the section's dataset, data_dir, binarize and validation_size, and
    ``seed`` (the run's ``train.seed``); then ``train_limit`` / ``test_limit`` keep the
    first examples of the train / test split.
    """
    images = load(cfg.dataset, split=split, data_dir=cfg.data_dir, binarize=cfg.binarize,
                  validation_size=cfg.validation_size, seed=seed)
    limit = {"train": cfg.train_limit, "test": cfg.test_limit}.get(split)
    if limit is not None and limit < len(images):
        images = images.subset(torch.arange(limit))
    return images


def _check_split(split: str, valid: tuple[str, ...], what: str) -> None:
    if split in valid:
        return
    hint = ""
    if split == "test" and what == "user data":
        hint = "; a single file has no test split: load your test file itself with split='all'"
    raise ConfigError(f"unknown split {split!r} for {what}: choose one of "
                      f"{', '.join(valid)}{hint}")


def _official_part(spec: DatasetSpec, split: str) -> str:
    if split == "validation" and "valid" in spec.parts:
        return "valid"
    return "test" if split == "test" else "train"


def _parse_part(spec: DatasetSpec, part: str, resolution: Resolution):
    """uint8 images ``(N, C, H, W)`` and int64 labels (or None) as writable tensors."""
    files = [resolution.files[name] for name in spec.parts[part]]
    c, h, w = spec.image_shape
    if spec.format == "amat":
        (images_file,) = files
        bits = parse_amat(bytearray(images_file.data), images_file.path, width=c * h * w)
        return torch.from_numpy(bits.reshape(-1, c, h, w)), None
    images_file, labels_file = files
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


def _binarize(
    images: torch.Tensor,
    levels: int,
    binarize: str,
    split: str,
    seed: int,
    part: str,
    official_binary: bool,
) -> tuple[torch.Tensor, int, str, dict[str, Any]]:
    """Apply the binarisation that happens at load time; return images, levels, mode, metadata."""
    if levels == 2:
        if binarize == "dynamic":
            raise ConfigError(
                "this data is already binary (0/1): dynamic binarisation would change nothing; "
                "use binarize='static' or 'none'"
            )
        if official_binary:
            return images, 2, "static", {
                "mode": "static", "requested": binarize,
                "draw": "the dataset's official fixed binarisation (for binarized-mnist: "
                        "Larochelle & Murray, 2011)"}
        return images, 2, binarize, {"mode": binarize, "draw": "data stored as 0/1"}
    if binarize == "none":
        return images, 256, "none", {"mode": "none"}
    if binarize == "dynamic" and split != "test":
        return images, 256, "dynamic", {
            "mode": "dynamic",
            "draw": "u < images / 255, u ~ U[0, 1) drawn from the run's generator at every batch()"}
    draw_seed = seed if binarize == "static" else TEST_BINARIZATION_SEED
    generator_seed = derive_seed(draw_seed, f"static:{part}")
    meta = {
        "mode": "static", "requested": binarize, "seed": draw_seed, "part": part,
        "generator_seed": generator_seed,
        "draw": f"bernoulli_binarize(official {part} part, derive_seed({draw_seed}, "
                f"'static:{part}')): one fixed draw u < grey/255",
    }
    if binarize == "dynamic":
        meta["note"] = ("dynamic binarisation: test data binarised once with the fixed seed "
                        f"{TEST_BINARIZATION_SEED} (same as binarize='static', seed=0)")
    return bernoulli_binarize(images, generator_seed), 2, "static", meta


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
                          f"{name} ({n} examples): choose a smaller value")
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
    images, labels = _parse_part(spec, part, resolution)
    part_size = int(images.shape[0])
    images, levels, mode, binarization = _binarize(
        images, spec.levels, binarize, split, seed, part, official_binary=spec.levels == 2)
    if part == "train" and "valid" not in spec.parts:
        images, labels, validation = _select(images, labels, split, validation_size, seed,
                                             spec.name, f"official train part ({part_size})")
    else:
        validation = None
        if "valid" in spec.parts and split != "test":
            validation = {"official": True, "part": "valid",
                          "note": "the official validation part; validation_size is ignored"}
    files = [resolution.files[name] for name in spec.parts[part]]
    metadata = {
        "dataset": spec.name, "split": split, "num_examples": int(images.shape[0]),
        "image_shape": list(images.shape[1:]), "levels": levels,
        "official_part": part, "official_part_size": part_size,
        "found_in": {"step": resolution.step, "directory": str(resolution.directory)},
        "files": [f.describe() for f in files],
        "validation": validation, "binarization": binarization,
        "homepage": spec.homepage, "citation": spec.citation,
    }
    return ImageSet(images, labels, spec.name, split, mode, levels,
                    {f.key: f.sha256 for f in files}, metadata)


def _load_user(
    path: Path, name: str, split: str, binarize: str, validation_size: int, seed: int
) -> ImageSet:
    _check_split(split, USER_SPLITS, "user data")
    if path.is_dir():
        data: UserData = read_png_folder(path)
    elif path.suffix.lower() in _ARRAY_SUFFIXES:
        data = read_array_file(path)
    else:
        raise DataError(f"{path} is neither a .npz/.npy file nor a folder of PNG images: "
                        f"convert the data with np.save or np.savez")
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels) if data.labels is not None else None
    size = int(images.shape[0])
    images, levels, mode, binarization = _binarize(
        images, data.levels, binarize, split, seed, "all", official_binary=False)
    images, labels, validation = _select(images, labels, split, validation_size, seed, name,
                                         f"the whole file ({size})")
    metadata = {
        "dataset": name, "split": split, "num_examples": int(images.shape[0]),
        "image_shape": list(images.shape[1:]), "levels": levels, "file_size": size,
        **data.metadata, "validation": validation, "binarization": binarization,
    }
    return ImageSet(images, labels, name, split, mode, levels, dict(data.checksums), metadata)
