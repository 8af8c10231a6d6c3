"""The splits of one run's dataset, each loaded at most once per command."""

from __future__ import annotations

from typing import Any

import torch

from ..config import DataConfig
from .imageset import ImageSet
from .loader import load_split

__all__ = ["Splits"]


class Splits:
    """The splits a run's ``[data]`` section describes, loaded on first use and kept (on
    ``device``): training, per-epoch validation, the report and the figures all read the
    same objects (nanoGPT's "prepare once").

    Args:
        cfg: the run's data section.
        seed: the run's ``train.seed`` (validation split and static draws).
        device: where the images live (uint8; floats are made per batch).
        progress: show progress while decoding a folder.

    Attributes:
        loads: how many times each split was read from its source (1 at most; tests count).
    """

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device | str = "cpu",
                 progress: bool = True) -> None:
        self.cfg, self.seed, self.device, self.progress = cfg, seed, torch.device(device), progress
        self._sets: dict[str, ImageSet] = {}
        self.loads: dict[str, int] = {}

    def __getitem__(self, split: str) -> ImageSet:
        """The split, loaded now if it was not (ConfigError/DataError as :func:`load`)."""
        if split not in self._sets:
            images = load_split(self.cfg, split, self.seed, progress=self.progress)
            self.loads[split] = self.loads.get(split, 0) + 1
            self._sets[split] = images.to(self.device)
        return self._sets[split]

    def loaded(self, split: str) -> bool:
        return split in self._sets

    def with_config(self, cfg: DataConfig) -> Splits:
        """These splits under the ``[data]`` section ``cfg``: the ones already loaded are
        kept when ``cfg`` is the section they were loaded with, else loaded again when used."""
        out = Splits(cfg, self.seed, self.device, self.progress)
        out.loads = self.loads
        if cfg == self.cfg:
            out._sets = dict(self._sets)
        return out

    def describe(self) -> dict[str, Any]:
        return {split: images.metadata for split, images in self._sets.items()}

