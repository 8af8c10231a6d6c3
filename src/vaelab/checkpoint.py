"""Checkpoints: tensors in safetensors, everything else in JSON, atomic, never unpickled.

A checkpoint named ``run/checkpoints/last`` is two files::

    last.json                                  the commit point: format marker, versions,
                                               tensor file name + sha256 + size, the
                                               optimizer's non-tensor state, caller's meta
    last-00001234-0123456789abcdef.safetensors model.*, optimizer.*, rng.* tensors

The tensor file name carries the step (``meta["step"]``, when an int) and the
first 16 hex digits of its sha256, so a new save never overwrites the file the
current JSON references. Write order: tensors (temp file, fsync, rename, fsync
directory), then the JSON the same way, then tensor files of the same
checkpoint name that nothing references any more are deleted. A process killed
at any moment therefore leaves the previous checkpoint loadable.

Loading validates everything first (format marker, plain tensor file name in
the same directory, byte size, sha256, every listed tensor present, state-dict
keys and shapes, optimizer groups, generator state sizes) and only then
changes the model, optimizer and generators; if applying still fails, their
previous state is put back. Nothing is ever unpickled: ``torch.load`` is not
used anywhere.

Tensor names: ``model.<state_dict key>``; ``optimizer.state.<param index>.<key>``
(and ``optimizer.param_groups.<i>.<key>`` for tensor-valued group options);
``rng.torch``; ``rng.cuda.<i>``; ``rng.gen.<name>`` for named generators.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from . import __version__
from ._io import atomic_write_bytes, atomic_write_text, fsync_dir
from .errors import CheckpointError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "save_weights",
    "load_weights",
    "weights_fingerprint",
    "read_meta",
    "checkpoint_exists",
    "config_diff",
    "atomic_write_text",
    "atomic_write_bytes",
    "fsync_dir",
]

FORMAT = "vaelab-checkpoint"
FORMAT_VERSION = 1
_SYSTEM_KEYS = (
    "format", "format_version", "vaelab_version", "torch_version", "created",
    "tensor_file", "tensor_sha256", "tensor_bytes",
)
_TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- paths


def _split_path(path: str | Path) -> tuple[Path, str]:
    """``run/checkpoints/last`` (or ``.../last.json``) -> (directory, name)."""
    p = Path(path)
    name = p.name[:-5] if p.name.endswith(".json") else p.name
    if not name or name.startswith("."):
        raise CheckpointError(
            f"bad checkpoint path {str(path)!r}: name a checkpoint such as run/checkpoints/last"
        )
    return p.parent, name


def _json_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def checkpoint_exists(path: str | Path) -> bool:
    """True if the checkpoint's JSON file exists (it may still be invalid)."""
    directory, name = _split_path(path)
    return _json_path(directory, name).is_file()


def _is_plain_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and os.path.basename(name) == name
    )


def _tensor_file_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(name)}-(\d{{8,}}-)?[0-9a-f]{{16}}\.safetensors$")


def _temp_file_re(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"^\.{re.escape(name)}(-(\d{{8,}}-)?[0-9a-f]{{16}}\.safetensors|\.json)\.[^/]*\.tmp$"
    )


# ----------------------------------------------------------------------------- encoding


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares storage with nothing (safetensors needs both)."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of an optimizer state value; tensors go to ``tensors[key]``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = _cpu_copy(value)
        return {_TENSOR_REF: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"cannot save optimizer value {key} of type {type(value).__name__}: "
        "only tensors, numbers, strings, lists, tuples and str-keyed dicts are supported"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            key = value[_TENSOR_REF]
            if key not in tensors:
                raise CheckpointError(
                    f"{where} references tensor {key!r}, which is not in the tensor file: "
                    "the checkpoint is damaged; use another checkpoint"
                )
            return tensors[key]
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors, where) for v in value[_TUPLE])
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    return value


def _encode_optimizer(optimizer: torch.optim.Optimizer, tensors: dict) -> dict:
    sd = optimizer.state_dict()
    state = {
        str(idx): {k: _encode(v, f"optimizer.state.{idx}.{k}", tensors) for k, v in s.items()}
        for idx, s in sd["state"].items()
    }
    groups = [
        {k: _encode(v, f"optimizer.param_groups.{i}.{k}", tensors) for k, v in g.items()}
        for i, g in enumerate(sd["param_groups"])
    ]
    return {"class": type(optimizer).__name__, "state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    meta: Mapping[str, Any],
) -> None:
    """Save ``model`` (and optimizer, RNG states, ``meta``) atomically under ``path``.

    Args:
        path: the checkpoint, e.g. ``run/checkpoints/last``; its directory is created.
        model: its ``state_dict`` is saved as ``model.<key>`` tensors.
        optimizer: state tensors in the tensor file, hyper-parameters in the JSON.
        generators: named ``torch.Generator``s whose states are saved (with the
            global torch RNG, and CUDA's when available).
        meta: JSON-able dict (config, epoch, step, scheduler state, ...). An int
            ``meta["step"]`` goes into the tensor file name. Keys in
            ``_SYSTEM_KEYS`` are reserved.

    Raises:
        CheckpointError: meta is not JSON-able, a reserved key is used, or the
            write failed (disk full, permissions); the previous checkpoint is
            then unchanged.
    """
    directory, name = _split_path(path)
    meta = dict(meta)
    reserved = sorted(set(meta) & set(_SYSTEM_KEYS))
    if reserved:
        raise CheckpointError(f"meta key {reserved[0]!r} is reserved by the checkpoint format: "
                              "rename it")
    tensors = {f"model.{k}": _cpu_copy(v) for k, v in model.state_dict().items()}
    opt_record = _encode_optimizer(optimizer, tensors) if optimizer is not None else None
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    generators = dict(generators or {})
    for gen_name, gen in generators.items():
        tensors[f"rng.gen.{gen_name}"] = gen.get_state()

    data = _st_save(tensors, metadata={"format": "pt", "vaelab": FORMAT})
    digest = hashlib.sha256(data).hexdigest()
    step = meta.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        tensor_file = f"{name}-{step:08d}-{digest[:16]}.safetensors"
    else:
        tensor_file = f"{name}-{digest[:16]}.safetensors"
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vaelab_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensor_file": tensor_file,
        "tensor_sha256": digest,
        "tensor_bytes": len(data),
        "tensors": sorted(tensors),
        "generators": sorted(generators),
        "optimizer": opt_record,
        "meta": meta,
    }
    try:
        text = json.dumps(record, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable ({err}): "
                              "store plain numbers, strings, lists and dicts") from err

    json_path = _json_path(directory, name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / tensor_file, data)  # 1. tensors, durable
        atomic_write_text(json_path, text + "\n")  # 2. the commit point
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {directory / name} ({err.strerror or err}); the previous "
            "checkpoint is unchanged: free disk space or make the directory writable"
        ) from err
    _remove_unreferenced(directory, name, keep=tensor_file)


def _remove_unreferenced(directory: Path, name: str, keep: str) -> None:
    """Delete this checkpoint's old tensor files and stale temp files (best effort)."""
    referenced = {keep}
    for other in directory.glob("*.json"):
        try:
            referenced.add(json.loads(other.read_text("utf-8")).get("tensor_file"))
        except (OSError, ValueError, AttributeError):
            continue
    tensor_re, temp_re = _tensor_file_re(name), _temp_file_re(name)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if entry.name in referenced:
            continue
        if tensor_re.match(entry.name) or temp_re.match(entry.name):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


# ----------------------------------------------------------------------------- read


def _read_record(directory: Path, name: str) -> dict:
    """Parse and validate ``<name>.json``; CheckpointError for anything off."""
    json_path = _json_path(directory, name)
    try:
        raw = json_path.read_bytes()
    except FileNotFoundError:
        names = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
        hint = f"checkpoints there: {', '.join(names)}" if names else "check the run directory"
        raise CheckpointError(f"no checkpoint {directory / name}: {json_path} does not exist; "
                              f"{hint}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {json_path}: {err.strerror or err}") from err
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{json_path} is not a vaelab checkpoint (no 'format': '{FORMAT}' marker): "
            "pass a checkpoint written by vaelab, e.g. RUN_DIR/checkpoints/last"
        )
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CheckpointError(f"{json_path} has format version {version}, written by a "
                                  f"newer vaelab: upgrade vaelab to load it")
        raise CheckpointError(f"{json_path} has unknown format version {version!r}")
    checks = {
        "tensor_file": isinstance(record.get("tensor_file"), str),
        "tensor_sha256": isinstance(record.get("tensor_sha256"), str)
        and bool(_SHA_RE.match(record["tensor_sha256"])),
        "tensor_bytes": type(record.get("tensor_bytes")) is int,
        "tensors": isinstance(record.get("tensors"), list)
        and all(isinstance(k, str) for k in record["tensors"]),
        "generators": isinstance(record.get("generators"), list),
        "optimizer": record.get("optimizer") is None or isinstance(record["optimizer"], dict),
        "meta": isinstance(record.get("meta"), dict),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise CheckpointError(f"{json_path} is damaged: field {bad[0]!r} is missing or invalid; "
                              "restore the file or use another checkpoint")
    return record


def _public_meta(record: dict) -> dict:
    meta = dict(record["meta"])
    meta.update({k: record[k] for k in _SYSTEM_KEYS})
    return meta


def read_meta(path: str | Path) -> dict:
    """The caller's meta plus ``format``, versions, ``created`` and tensor file fields.

    Reads only the JSON (the tensor file is not verified; :func:`load_checkpoint` does).
    """
    return _public_meta(_read_record(*_split_path(path)))


def _verified_bytes(fpath: Path, expected_bytes: int, sha256: str, *, what: str,
                    owner: str, fix: str, follow_links: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``fpath`` after checking it is a regular file of ``expected_bytes``
    bytes whose sha256 is ``sha256``; CheckpointError (ending with ``fix``) otherwise.
    ``follow_links``: accept a symlink to a regular file (the Hugging Face cache's
    snapshots are links into its blob store)."""
    try:
        st = os.stat(fpath) if follow_links else os.lstat(fpath)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {fpath} is missing: the {owner} is incomplete; "
                              f"{fix}") from None
    if not stat.S_ISREG(st.st_mode):
        links = "" if follow_links else " (symlinks are refused)"
        raise CheckpointError(f"{what} {fpath} is not a regular file{links}: replace it with "
                              "the real file")
    if st.st_size != expected_bytes:
        raise CheckpointError(
            f"{what} {fpath} has {st.st_size} bytes but the {owner} says {expected_bytes}: "
            f"it is truncated or was replaced; {fix}"
        )
    data = fpath.read_bytes()
    if len(data) != expected_bytes or hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{what} {fpath} does not match its sha256 on record: it was modified "
            f"or damaged; {fix}"
        )
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{what} {fpath} is not a readable safetensors file ({err}): "
                              f"{fix}") from err


def _read_tensors(directory: Path, record: dict) -> dict[str, torch.Tensor]:
    """Load the tensor file after checking its name, size and sha256."""
    fname = record["tensor_file"]
    if not _is_plain_file_name(fname):
        raise CheckpointError(
            f"checkpoint in {directory} names tensor file {fname!r}, which is not a plain "
            ".safetensors file name in the same directory: refusing to load it; restore the "
            "checkpoint's JSON or use another checkpoint"
        )
    fpath = directory / fname
    tensors = _verified_bytes(
        fpath, record["tensor_bytes"], record["tensor_sha256"], what="tensor file",
        owner="checkpoint", fix="restore it or use another checkpoint (e.g. best instead of last)")
    missing = [k for k in record["tensors"] if k not in tensors]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} listed in the checkpoint is not in {fpath} "
            f"({len(missing)} missing): the checkpoint is damaged; use another checkpoint"
        )
    return {k: tensors[k] for k in sorted(tensors)}  # safetensors' order is not stable


# ----------------------------------------------------------------------------- load


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for k, v in config.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: config}


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["model.hidden: [400] in the checkpoint, [200] now", ...]`` for differing entries.

    Nested dicts are compared by dotted key; tuples and lists compare equal.
    """
    a = _flatten(json.loads(json.dumps(saved, default=str)))
    b = _flatten(json.loads(json.dumps(current, default=str)))
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            sa = "absent" if va is missing else json.dumps(va)
            sb = "absent" if vb is missing else json.dumps(vb)
            out.append(f"{key}: {sa} in the checkpoint, {sb} now")
    return out


def _model_state(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], record: dict,
    expect_config: Mapping[str, Any] | None, where: str,
) -> dict[str, torch.Tensor]:
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    current = model.state_dict()
    problem = None
    for key, value in current.items():
        if key not in saved:
            problem = f"{key} is missing from the checkpoint (model has {tuple(value.shape)})"
        elif tuple(saved[key].shape) != tuple(value.shape):
            problem = (f"{key} is {tuple(saved[key].shape)} in the checkpoint but "
                       f"{tuple(value.shape)} in the model")
        if problem:
            break
    if problem is None:
        extra = sorted(k for k in saved if k not in current)
        if extra:
            problem = f"{extra[0]} is in the checkpoint but not in the model"
    if problem is None:
        return saved
    message = (f"checkpoint {where} does not fit this model: {problem}; it was written by a "
               "different model config")
    saved_config = record["meta"].get("config")
    if expect_config is not None and isinstance(saved_config, Mapping):
        diffs = config_diff(saved_config, expect_config)
        if diffs:
            message += " (" + "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "") + ")"
    raise CheckpointError(message + ": load it with the config it was saved with")


def _optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], record: dict, where: str
) -> dict:
    saved = record["optimizer"]
    if saved is None:
        raise CheckpointError(f"checkpoint {where} has no optimizer state: load the model only")
    if saved.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint {where} holds {saved.get('class')} state, the "
                              f"optimizer is {type(optimizer).__name__}: use the same optimizer")
    groups = _decode(saved.get("param_groups"), tensors, where)
    state = _decode(saved.get("state"), tensors, where)
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where} has damaged optimizer state")
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    if ours != theirs:
        raise CheckpointError(f"checkpoint {where} has optimizer groups of sizes {theirs}, the "
                              f"optimizer has {ours}: it was written for a different model")
    try:
        state = {int(k): v for k, v in state.items()}
    except ValueError:
        raise CheckpointError(f"checkpoint {where} has damaged optimizer state") from None
    return {"state": state, "param_groups": groups}


def _rng_states(
    generators: Mapping[str, torch.Generator], restore_global: bool,
    tensors: Mapping[str, torch.Tensor], where: str,
) -> list[tuple[Any, torch.Tensor]]:
    """``[(target, state)]`` where target is a Generator, "torch" or a CUDA index."""
    out: list[tuple[Any, torch.Tensor]] = []
    wanted: list[tuple[Any, str, int]] = [
        (g, f"rng.gen.{n}", g.get_state().numel()) for n, g in generators.items()
    ]
    if restore_global:
        wanted.append(("torch", "rng.torch", torch.get_rng_state().numel()))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"rng.cuda.{i}" in tensors:
                    wanted.append((i, f"rng.cuda.{i}", torch.cuda.get_rng_state(i).numel()))
    for target, key, size in wanted:
        state = tensors.get(key)
        if state is None:
            raise CheckpointError(f"checkpoint {where} has no random state {key!r}: it was saved "
                                  "without that generator")
        if state.dtype != torch.uint8 or state.numel() != size:
            raise CheckpointError(f"checkpoint {where} has a damaged random state {key!r}")
        out.append((target, state))
    return out


def _set_rng(target: Any, state: torch.Tensor) -> None:
    if isinstance(target, torch.Generator):
        target.set_state(state)
    elif target == "torch":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, target)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of ``model``'s state dict: every key, dtype, shape and the tensor's bytes, in
    key order. Equal for the same weights on any device or machine; a report records it
    (``weights_sha256``) so that an export can check the report is of the weights it ships."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = _cpu_copy(value)
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_weights(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Write ``model``'s state dict alone (tensors only, keys as in ``state_dict()``) to the
    safetensors file ``path``, atomically; return ``{"file", "sha256", "bytes"}`` to record
    beside it (:func:`load_weights` checks them)."""
    tensors = {k: _cpu_copy(v) for k, v in model.state_dict().items()}
    data = _st_save(tensors, metadata={"format": "pt", "vaelab": "vaelab-model"})
    atomic_write_bytes(Path(path), data)
    return {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data)}


def load_weights(path: str | Path, model: nn.Module, *, sha256: str, size: int,
                 map_location: str | torch.device | None = "cpu",
                 follow_links: bool = False) -> None:
    """Load the safetensors file ``path`` written by :func:`save_weights` into ``model``:
    its size and sha256 must be the recorded ones and its tensors exactly the model's state
    dict (same keys, same shapes); nothing is changed unless everything fits.

    Raises:
        CheckpointError: missing, tampered, unreadable, or written for another model.
    """
    if not (isinstance(sha256, str) and _SHA_RE.match(sha256)) or type(size) is not int:
        raise CheckpointError(f"the record of {path} has no valid sha256/bytes: export the "
                              "model again with vaelab export")
    tensors = _verified_bytes(Path(path), size, sha256, what="weight file",
                              owner="exported model", fix="download or export the model again",
                              follow_links=follow_links)
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = _model_state(model, {f"model.{k}": v for k, v in tensors.items()},
                         {"meta": {}}, None, str(path))
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    map_location: str | torch.device | None = "cpu",
    expect_config: Mapping[str, Any] | None = None,
    restore_global_rng: bool = False,
) -> dict:
    """Verify and load a checkpoint; return its meta (as :func:`read_meta`).

    Everything is checked before anything is changed: either the model, optimizer
    and generators all get the checkpoint's state, or none of them changes.

    Args:
        path: the checkpoint, e.g. ``run/checkpoints/last``.
        model: receives the saved ``state_dict`` (keys and shapes must match).
        optimizer: receives the saved optimizer state (same class and group sizes).
        generators: named generators whose saved states are restored.
        map_location: device for model and optimizer tensors before loading.
        expect_config: the config the caller built the model from; on a
            mismatch the error lists how it differs from ``meta["config"]``.
        restore_global_rng: also restore ``torch``'s global (and CUDA) RNG state,
            for exact resumption; off by default so evaluation has no side effect.

    Raises:
        CheckpointError: missing, not a vaelab checkpoint, damaged, truncated,
            tampered, path escape, or written for a different model/optimizer.
    """
    directory, name = _split_path(path)
    where = str(directory / name)
    record = _read_record(directory, name)
    tensors = _read_tensors(directory, record)
    if map_location is not None:
        tensors = {k: v if k.startswith("rng.") else v.to(map_location)
                   for k, v in tensors.items()}

    model_sd = None
    if model is not None:
        model_sd = _model_state(model, tensors, record, expect_config, where)
    opt_sd = None
    if optimizer is not None:
        opt_sd = _optimizer_state(optimizer, tensors, record, where)
    rng = _rng_states(dict(generators or {}), restore_global_rng, tensors, where)

    # Everything is validated; apply, putting the old state back if anything still fails.
    backup_model = None if model is None else {k: v.clone() for k, v in model.state_dict().items()}
    backup_opt = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    backup_rng = [(t, t.get_state() if isinstance(t, torch.Generator) else None) for t, _ in rng]
    try:
        if model is not None:
            model.load_state_dict(model_sd, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(opt_sd)
        for target, state in rng:
            _set_rng(target, state)
    except Exception as err:
        if model is not None:
            model.load_state_dict(backup_model)
        if optimizer is not None:
            optimizer.load_state_dict(backup_opt)
        for target, state in backup_rng:
            if state is not None:
                target.set_state(state)
        raise CheckpointError(f"cannot load checkpoint {where}: {err}") from err
    return _public_meta(record)
