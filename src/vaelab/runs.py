"""Open a finished (or interrupted) run directory: its config, model and checkpoint meta."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import models
from .errors import CheckpointError

__all__ = ["Run", "open_run", "CHECKPOINT_NAMES"]

CHECKPOINT_NAMES = ("best", "last")


@dataclass
class Run:
    """A run directory with one checkpoint loaded: ``model`` is in eval mode."""

    directory: Path
    config: config_mod.RunConfig
    model: nn.Module
    checkpoint: str
    meta: dict[str, Any]

    @property
    def epoch(self) -> int | None:
        """The epoch the checkpoint was written after."""
        return (self.meta.get("train_state") or {}).get("epoch")


def open_run(
    run_dir: str | Path, checkpoint: str = "best", device: torch.device | str = "cpu",
    model: nn.Module | None = None,
) -> Run:
    """Rebuild the model of ``run_dir`` and load ``checkpoint`` (``best`` or ``last``) into it.

    Args:
        model: your own model, if the run trained one (``train_and_evaluate(model=...)``);
            default: the model the run's config describes.

    Raises:
        CheckpointError: the directory, or the checkpoint in it, is missing or unusable.
    """
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINT_NAMES:
        raise CheckpointError(
            f"unknown checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINT_NAMES)}"
        )
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist: give the --out directory of a vaelab train run"
        )
    path = run_dir / "checkpoints" / checkpoint
    if not path.with_suffix(".json").is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoints/{checkpoint}.json: is it a vaelab run directory "
            "that finished at least one epoch?"
        )
    meta = ckpt.read_meta(path)
    try:
        cfg = config_mod.from_dict(meta["config"], saved=True)
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}.json has no valid config: it was not written by vaelab") from None
    event_shape = tuple(meta.get("event_shape") or ())
    if not event_shape:
        raise CheckpointError(f"{path}.json records no event_shape: re-run training")
    if model is None:
        model = models.build_from_config(cfg, event_shape)
    model = model.to(device)
    ckpt.load_checkpoint(path, model=model, map_location=device, expect_config=meta["config"])
    model.eval()
    return Run(directory=run_dir, config=cfg, model=model, checkpoint=checkpoint, meta=meta)
