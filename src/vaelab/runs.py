"""Open a finished (or interrupted) run directory, or a model folder written by
``vaelab export``: its config, model and checkpoint meta.

An exported folder (:mod:`vaelab.hub`) holds ``config.json`` (format ``vaelab-model``, the
run's resolved config, the event shape and the weights' sha256) and ``model.safetensors``
(the state dict alone). It is opened with the same strict checks as a checkpoint: the
recorded size and sha256, exactly the model's state-dict keys and shapes, nothing unpickled;
and a folder that holds code or pickles is refused before anything is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import models
from .errors import CheckpointError

__all__ = ["Run", "open_run", "is_exported", "read_export_record", "CHECKPOINT_NAMES",
           "EXPORT_FORMAT", "EXPORT_FILES"]

CHECKPOINT_NAMES = ("best", "last")

#: ``config.json``'s format marker and version in an exported model folder.
EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "vaelab-model", 1
#: The files an exported folder may hold (ONNX graphs and the curve are optional).
EXPORT_FILES = ("config.json", "model.safetensors", "report.json", "README.md",
                "metrics.jsonl", "train-config.toml", "encoder.onnx", "decoder.onnx",
                ".gitattributes")
#: ``config.json``'s keys: any other (``auto_map``, ``_target_``, ...) is refused.
_EXPORT_KEYS = frozenset({"format", "format_version", "vaelab_version", "torch_version",
                          "created", "event_shape", "latent_dim", "checkpoint", "epoch",
                          "weights", "config", "run_name"})
#: Files vaelab never opens in a model folder: code, and pickles (``torch.load`` runs code).
_REFUSED_SUFFIXES = {".py": "Python code", ".pyc": "Python code", ".bin": "a pickle",
                     ".pt": "a pickle", ".pth": "a pickle", ".pkl": "a pickle",
                     ".pickle": "a pickle", ".ckpt": "a pickle", ".joblib": "a pickle"}


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
    if is_exported(run_dir):
        return _open_exported(run_dir, checkpoint, device, model)
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


def is_exported(folder: str | Path) -> bool:
    """True for a folder written by ``vaelab export``: no ``checkpoints/``, and a
    ``config.json`` with the ``vaelab-model`` marker (another library's model folder, which
    also has a ``config.json``, is not one)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file() or (folder / "checkpoints").exists():
        return False
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == EXPORT_FORMAT


def refused_file(name: str) -> str | None:
    """What a file of this name is when vaelab never opens it in a model folder ("Python
    code", "a pickle"), else None."""
    return _REFUSED_SUFFIXES.get(Path(name).suffix.lower())


def framework_text(trained_with: dict[str, Any]) -> str:
    """``Keras 3.15.1 (torch backend)`` from a checkpoint meta's ``trained_with`` (weights
    another framework trained, e.g. :func:`vaelab.keras.save_run`)."""
    name = str(trained_with.get("framework", "another framework"))
    version = trained_with.get(f"{name}_version") or trained_with.get("version")
    backend = trained_with.get("backend")
    return " ".join([name.capitalize() if name == "keras" else name,
                     *([str(version)] if version else []),
                     *([f"({backend} backend)"] if backend else [])])


def read_export_record(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of an exported folder, checked: its format marker and version, only
    known keys, and no code or pickle files in the folder.

    Raises:
        CheckpointError: anything else (one line naming the file and the fix).
    """
    folder = Path(folder)
    for entry in sorted(folder.rglob("*")):
        kind = refused_file(entry.name)
        if kind:
            raise CheckpointError(
                f"{folder} holds {entry.relative_to(folder)}, {kind}: vaelab never runs code "
                "or unpickles files from a model folder; export it with vaelab export "
                "(safetensors + JSON) instead")
    path = folder / "config.json"
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}): export the model "
                              "again with vaelab export") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a vaelab model (no 'format': '{EXPORT_FORMAT}' "
                              "marker): give a folder written by vaelab export")
    version = record.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        newer = isinstance(version, int) and version > EXPORT_FORMAT_VERSION
        raise CheckpointError(f"{path} has format version {version!r}" + (
            ", written by a newer vaelab: upgrade vaelab" if newer else ": not one vaelab "
            "reads; export the model again"))
    unknown = sorted(set(record) - _EXPORT_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path} has the key {unknown[0]!r}, which vaelab does not know: a vaelab model "
            "is described by data only (no code to import); remove it or export again")
    weights = record.get("weights")
    if not (isinstance(weights, dict) and weights.get("file") == "model.safetensors"
            and isinstance(record.get("config"), dict)
            and isinstance(record.get("event_shape"), list)
            and record.get("checkpoint") in CHECKPOINT_NAMES):
        raise CheckpointError(f"{path} is damaged: it needs 'weights' naming "
                              "model.safetensors, 'config', 'event_shape' and 'checkpoint'; "
                              "export the model again")
    return record


def _open_exported(folder: Path, checkpoint: str, device: torch.device | str,
                   model: nn.Module | None) -> Run:
    record = read_export_record(folder)
    if checkpoint != record["checkpoint"]:
        raise CheckpointError(
            f"{folder} holds the {record['checkpoint']!r} checkpoint only (epoch "
            f"{record.get('epoch')}): ask for --checkpoint {record['checkpoint']}")
    try:
        cfg = config_mod.from_dict(record["config"], saved=True)
    except (KeyError, TypeError):
        raise CheckpointError(f"{folder}/config.json has no valid run config: export the "
                              "model again") from None
    shape = record["event_shape"]
    if not (shape and all(type(v) is int and 0 < v <= 1 << 16 for v in shape)):
        raise CheckpointError(f"{folder}/config.json has event_shape {shape!r}, not a list of "
                              "positive sizes: export the model again")
    event_shape = tuple(shape)
    weights, path = record["weights"], folder / "model.safetensors"
    if model is None:
        # The config comes from elsewhere: compare the architecture it describes with the
        # weight file's header on the meta device (no memory) before building it for real.
        with torch.device("meta"):
            _same_architecture(models.build_from_config(cfg, event_shape), path, folder)
        model = models.build_from_config(cfg, event_shape)
    model = model.to(device)
    ckpt.load_weights(path, model, sha256=weights.get("sha256"), size=weights.get("bytes"),
                      map_location=device, follow_links=True)
    model.eval()
    meta = {"config": record["config"], "event_shape": list(event_shape),
            "train_state": {"epoch": record.get("epoch")}, "exported": True,
            "vaelab_version": record.get("vaelab_version")}
    return Run(directory=folder, config=cfg, model=model, checkpoint=checkpoint, meta=meta)


def _same_architecture(model: nn.Module, path: Path, folder: Path) -> None:
    """CheckpointError unless the safetensors header of ``path`` lists exactly ``model``'s
    state-dict keys with the same shapes (only the header is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the exported model is incomplete; download "
                              "or export it again") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}): download "
                              "or export it again") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(expected.keys() | saved.keys()):
        if expected.get(key) != saved.get(key):
            raise CheckpointError(
                f"{folder}'s config.json describes another model than its weights: {key} is "
                f"{saved.get(key, 'absent')} in model.safetensors but "
                f"{expected.get(key, 'absent')} in the model of config.json; the folder was "
                "edited or mixed up: download or export it again")
