"""Safe files: nothing vaelab loads is ever unpickled, and no path escapes the run directory.

A malicious pickle (unpickling it creates a marker directory) is disguised as every kind of
file vaelab reads; the command that reads it must refuse it with one error line, and the
marker must never appear. ``pickle.load``/``pickle.loads``/``torch.load`` are replaced by
tripwires during each load, and every ``np.load`` call must pass ``allow_pickle=False``.
Both a text pickle (protocol 0, valid UTF-8) and a binary one (protocol 4) are tried.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FASHION_DIR, tiny_overrides, train
from vaelab import config, plots
from vaelab.cli import main

pytestmark = pytest.mark.usefixtures("fashion_available")

_REAL_LOADS = pickle.loads  # the tripwires replace pickle.loads during the tests
FAST = ["--no-report", "--epochs", "1", "--batch-size", "8", "--latent-dim", "2",
        "--set", "model.hidden=16", "--set", "train.threads=1", "--set", "data.validation_size=2"]


class Payload:
    """Unpickling this creates ``marker`` (a directory): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run (hidden 16, latent size 2)."""
    threads = torch.get_num_threads()
    directory = tmp_path_factory.mktemp("run")
    cfg = config.resolve(overrides=tiny_overrides(**{
        "data.train_limit": 128, "data.validation_size": 32, "train.epochs": 1,
        "model.hidden": 16, "model.latent_dim": 2, "train.threads": 1}))
    try:
        train(cfg, directory, progress=False, report=False, echo=lambda _line: None)
    finally:
        torch.set_num_threads(threads)
    return directory


@pytest.fixture
def tripwires(monkeypatch):
    """Fail on any unpickling; record every np.load call's allow_pickle."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called while loading user files")
        return call

    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    calls = []
    real_np_load = np.load

    def np_load(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", "default (unsafe before numpy 1.16.3)"))
        return real_np_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", np_load)
    return calls


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_dir()  # so a missing marker below means: never unpickled


# --------------------------------------------------------------------------- disguises


def _tensor_file(run: Path, name: str) -> Path:
    record = json.loads((run / "checkpoints" / f"{name}.json").read_text())
    return run / "checkpoints" / record["tensor_file"]


def as_checkpoint_json(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "run" / "checkpoints" / "best.json").write_bytes(payload)
    return ["eval", "{run}"]


def as_tensor_file(tmp: Path, payload: bytes) -> list[str]:
    _tensor_file(tmp / "run", "best").write_bytes(payload)
    return ["eval", "{run}"]


def as_vouched_tensor_file(tmp: Path, payload: bytes) -> list[str]:
    """The tensor file replaced and its JSON edited to vouch for it (size and sha256)."""
    path = tmp / "run" / "checkpoints" / "best.json"
    record = json.loads(path.read_text())
    _tensor_file(tmp / "run", "best").write_bytes(payload)
    record.update(tensor_bytes=len(payload), tensor_sha256=hashlib.sha256(payload).hexdigest())
    path.write_text(json.dumps(record))
    return ["eval", "{run}"]


def as_run_config(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "run" / "config.toml").write_bytes(payload)
    return ["train", "--resume", "{run}", "--no-report"]


def as_config_file(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "evil.toml").write_bytes(payload)
    return ["train", "--config", "{tmp}/evil.toml", *FAST, "--out", "{tmp}/out"]


def as_metrics(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "run" / "metrics.jsonl").write_bytes(payload)
    return ["plot", "{run}"]


def as_report(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "run" / "report.json").write_bytes(payload)
    return ["plot", "{run}"]


def as_npz_member(tmp: Path, payload: bytes) -> list[str]:
    """An .npz whose 'images' array holds Python objects (stored as a pickle)."""
    np.savez(tmp / "x.npz", images=np.array([_Raw(payload), None], dtype=object))
    return ["train", "--dataset", "{tmp}/x.npz", *FAST, "--out", "{tmp}/out"]


def as_npy_array(tmp: Path, payload: bytes) -> list[str]:
    np.save(tmp / "x.npy", np.array([_Raw(payload), None], dtype=object), allow_pickle=True)
    return ["train", "--dataset", "{tmp}/x.npy", *FAST, "--out", "{tmp}/out"]


def named(name: str) -> Callable[[Path, bytes], list[str]]:
    """The raw pickle saved under a data file's name."""
    def disguise(tmp: Path, payload: bytes) -> list[str]:
        (tmp / name).write_bytes(payload)
        return ["train", "--dataset", f"{{tmp}}/{name}", *FAST, "--out", "{tmp}/out"]
    return disguise


def as_png(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "pngs").mkdir()
    (tmp / "pngs" / "00.png").write_bytes(payload)
    return ["train", "--dataset", "{tmp}/pngs", *FAST, "--out", "{tmp}/out"]


def as_idx(compress: bool) -> Callable[[Path, bytes], list[str]]:
    """The pickle as Fashion-MNIST's training images in --data-dir (next to genuine labels)."""
    def disguise(tmp: Path, payload: bytes) -> list[str]:
        folder = tmp / "data" / "fashion-mnist"
        folder.mkdir(parents=True)
        shutil.copy(FASHION_DIR / "train-labels-idx1-ubyte.gz", folder)
        data = gzip.compress(payload, mtime=0) if compress else payload
        (folder / "train-images-idx3-ubyte.gz").write_bytes(data)
        return ["train", "--data-dir", "{tmp}/data", *FAST, "--set", "data.train_limit=64",
                "--out", "{tmp}/out"]
    return disguise


def as_amat(tmp: Path, payload: bytes) -> list[str]:
    (tmp / "data").mkdir()
    (tmp / "data" / "binarized_mnist_train.amat").write_bytes(payload)
    return ["train", "--dataset", "binarized-mnist", "--binarize", "static", "--data-dir",
            "{tmp}/data", *FAST, "--out", "{tmp}/out"]


class _Raw:
    """Pickles as the given payload's reduction (so object arrays embed the live payload)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        return (_REAL_LOADS, (self.payload,))


DISGUISES = {
    # name: (disguise, fragment of the error line (or one per protocol 0, 4), marks for
    # the binary pickle)
    "checkpoint JSON": (as_checkpoint_json, "is not a vaelab checkpoint", []),
    "tensor file": (as_tensor_file, "it is truncated or was replaced", []),
    "tensor file vouched for by its JSON": (as_vouched_tensor_file,
                                            "is not a readable safetensors file", []),
    "run config.toml": (as_run_config, "is not valid TOML", []),
    "--config file": (as_config_file, "is not valid TOML", []),
    "metrics.jsonl": (as_metrics, ("metrics.jsonl line 1 is not JSON",
                                   "metrics.jsonl is not text"), []),
    "report.json": (as_report, "report.json", []),
    ".npz with an object array": (as_npz_member, "which vaelab never loads", []),
    ".npy with an object array": (as_npy_array, "which vaelab never loads", []),
    "pickle named .npy": (named("x.npy"), ("not a readable .npy/.npz file",
                                            "is a Python pickle, which vaelab never loads"), []),
    "pickle named .npz": (named("x.npz"), ("not a readable .npy/.npz file",
                                            "is a Python pickle, which vaelab never loads"), []),
    "PNG": (as_png, "is not a readable PNG image", []),
    "idx file": (as_idx(compress=False), "does not match fashion-mnist's published checksum",
                 []),
    "gzip'ed idx file": (as_idx(compress=True),
                         "does not match fashion-mnist's published checksum", []),
    "amat file": (as_amat, "does not match binarized-mnist's published checksum", []),
}


def _cases():
    for name, (_, _, binary_marks) in DISGUISES.items():
        # protocol 0 is ASCII text (reaches the JSON/TOML parsers), 4 is binary
        for protocol in (0, 4):
            marks = binary_marks if protocol == 4 else []
            if name == "report.json":
                continue  # not JSON (text or binary): ignored (see the test below)
            yield pytest.param(name, protocol, marks=marks, id=f"{name}-protocol{protocol}")


@pytest.mark.parametrize(("name", "protocol"), list(_cases()))
def test_a_pickle_disguised_as_each_file_is_refused(name, protocol, trained, tmp_path,
                                                    tripwires, capsys, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9/")
    disguise, fragment, _ = DISGUISES[name]
    if isinstance(fragment, tuple):
        fragment = fragment[protocol == 4]
    shutil.copytree(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker), protocol=protocol)
    argv = [a.replace("{run}", str(tmp_path / "run")).replace("{tmp}", str(tmp_path))
            for a in disguise(tmp_path, payload)]
    threads = torch.get_num_threads()
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert not marker.exists()  # never unpickled
    assert all(flag is False for flag in tripwires), tripwires
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: ") and fragment in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("protocol", [0, 4])
def test_a_report_json_that_is_not_json_is_ignored(protocol, trained, tmp_path, tripwires):
    """report.json is optional: one that is not JSON is not used (the KL is recomputed)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    (run / "report.json").write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    written = plots.plot_run(run, figures=["kl_per_dim"])
    assert [p.name for p in written] == ["kl_per_dim.png"] and not marker.exists()
    assert all(flag is False for flag in tripwires)


def test_np_load_is_only_ever_called_without_pickles(tmp_path, tripwires):
    """A good .npz and .npy load (so the tripwire saw the real calls) with allow_pickle=False."""
    from vaelab.data import load

    grey = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=grey, labels=np.arange(6))
    np.save(tmp_path / "x.npy", grey)
    for path in ("x.npz", "x.npy"):
        assert load(tmp_path / path, split="all").images.shape == (6, 1, 8, 8)
    assert tripwires == [False, False]


def test_the_decoded_image_cache_is_never_unpickled(tmp_path, tripwires, monkeypatch):
    """A folder's cache entry is written and read with allow_pickle=False; a pickle put in
    its place is refused (the folder is decoded again) and never runs."""
    from PIL import Image

    from vaelab.data import load

    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), 60 * i, np.uint8)).save(folder / f"{i}.png")
    assert load(folder, split="all").metadata["cache"]["hit"] is False
    assert load(folder, split="all").metadata["cache"]["hit"] is True
    assert tripwires and all(flag is False for flag in tripwires)
    (images,) = (tmp_path / "cache" / "decoded").glob("*[0-9a-f].npy")
    marker = tmp_path / "pwned"
    images.write_bytes(pickle.dumps(Payload(marker)))
    again = load(folder, split="all")
    assert again.metadata["cache"]["hit"] is False and not marker.exists()
    assert again.images[:, 0, 0, 0].tolist() == [0, 60, 120]
    assert all(flag is False for flag in tripwires)


# --------------------------------------------------------------------------- paths


def _escape(kind: str) -> Callable[[Path, Path], str]:
    """A tensor file name that points at a genuine copy of the tensor file elsewhere."""
    def make(run: Path, outside: Path) -> str:
        genuine = _tensor_file(run, "best")
        if kind == "parent":
            shutil.copy(genuine, run / "stolen.safetensors")
            return "../stolen.safetensors"
        if kind == "absolute":
            shutil.copy(genuine, outside / "stolen.safetensors")
            return str(outside / "stolen.safetensors")
        if kind == "subdirectory":
            (run / "checkpoints" / "sub").mkdir()
            shutil.copy(genuine, run / "checkpoints" / "sub" / "stolen.safetensors")
            return "sub/stolen.safetensors"
        if kind == "backslash":
            return "..\\stolen.safetensors"
        # a plain name, but a symbolic link to a file outside the run
        shutil.copy(genuine, outside / "stolen.safetensors")
        (run / "checkpoints" / "best-link.safetensors").symlink_to(outside / "stolen.safetensors")
        return "best-link.safetensors"
    return make


@pytest.mark.parametrize("kind", ["parent", "absolute", "subdirectory", "backslash", "symlink"])
def test_checkpoint_paths_cannot_leave_the_checkpoint_directory(kind, trained, tmp_path,
                                                                capsys):
    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(trained, run)
    outside.mkdir()
    path = run / "checkpoints" / "best.json"
    record = json.loads(path.read_text())
    record["tensor_file"] = _escape(kind)(run, outside)  # size and sha256 stay right
    path.write_text(json.dumps(record))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refus" in err, err  # "refusing" / "are refused"


# Every string in a run config, set to a path that climbs out of the working directory.
STRING_KEYS = ["data.dataset", "data.data_dir", "data.binarize", "likelihood.name",
               "likelihood.scale", "model.kind", "model.activation", "model.encoder_scale",
               "objective.kind", "objective.kl", "train.lr_schedule", "train.device"]


@pytest.mark.parametrize("key", STRING_KEYS)
def test_config_strings_never_become_paths_outside_the_run(key, tmp_path, capsys,
                                                           monkeypatch):
    """Config values name inputs (datasets, data dirs) or choices; none becomes a place to
    write. With ``../`` values nothing is created anywhere but in RUN_DIR (here: nothing)."""
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "work" / "cache"))
    monkeypatch.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9/")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    value = "../../escaped/x"
    threads = torch.get_num_threads()
    try:
        code = main(["train", *FAST, "--set", f"{key}={value}", "--out", "run"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == before


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize("where", ["cache", "data_dir"])
@pytest.mark.parametrize(("how", "message"), [
    ("one byte flipped", "is a damaged or truncated gzip file (CRC check failed"),
    ("content altered and recompressed",
     "does not match fashion-mnist's published checksum for train-labels-idx1-ubyte.gz"),
])
def test_a_tampered_dataset_file_is_refused_and_left_in_place(where, how, message, tmp_path,
                                                               monkeypatch, capsys):
    """Refused by its checksum (or its gzip CRC), never used, deleted or rewritten."""
    for var in ("VAELAB_DATA_DIR", "VAELAB_SYSTEM_DATA_DIRS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9/")
    folder = tmp_path / ("cache" if where == "cache" else "data") / "fashion-mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_DIR / name, folder / name)
    labels = folder / "train-labels-idx1-ubyte.gz"
    if how == "one byte flipped":
        data = bytearray(labels.read_bytes())
        data[len(data) // 2] ^= 0x01
    else:  # a valid file with one label changed: only the checksum can tell
        content = bytearray(gzip.decompress(labels.read_bytes()))
        content[100] = (content[100] + 1) % 10
        data = gzip.compress(bytes(content), mtime=0)
    labels.write_bytes(bytes(data))
    argv = ["train", *FAST, "--set", "data.train_limit=64", "--out", str(tmp_path / "out")]
    if where == "data_dir":
        argv += ["--data-dir", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and str(labels) in err and err.count("\n") == 1, err
    assert labels.read_bytes() == bytes(data)  # left for the user to inspect
    assert not (tmp_path / "out").exists()
