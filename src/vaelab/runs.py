"""Open a finished (or interrupted) run directory: its config, model and checkpoint meta."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as config_mod
from .errors import CheckpointError

__all__ = ["Run", "open_run", "CHECKPOINT_NAMES"]

CHECKPOINT_NAMES = ("best", "last")


@dataclass
class Run:
    directory: Path
    config: config_mod.RunConfig
    model: nn.Module
    checkpoint: str
    meta: dict[str, Any]


def open_run(
    run_dir: str | Path, checkpoint: str = "best", device: torch.device | str = "cpu"
) -> Run:
    """Rebuild the model of ``run_dir`` and load ``checkpoint`` (``best`` or ``last``) into it.

    Raises:
        CheckpointError: the directory, or the checkpoint in it, is missing or unusable.
    """
    from . import checkpoint as ckpt
    from .train import build_from_config

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
        cfg = config_mod.from_dict(meta["config"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}.json has no valid config: it was not written by vaelab") from None
    event_shape = tuple(meta.get("event_shape") or ())
    if not event_shape:
        raise CheckpointError(f"{path}.json records no event_shape: re-run training")
    model = build_from_config(cfg, event_shape).to(device)
    ckpt.load_checkpoint(path, model=model, map_location=device, expect_config=meta["config"])
    model.eval()
    return Run(directory=run_dir, config=cfg, model=model, checkpoint=checkpoint, meta=meta)
