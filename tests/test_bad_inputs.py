"""The bad-input table: every row is one mistake a user can make, driven through the CLI.

Each row must give exit status 2 and one line ``vaelab: error: ...`` that names the
problem and the fix (the row lists fragments of both), no traceback, and write nothing:
every file under the test's directory (inputs, a copied run, the would-be ``--out``) is
hashed before and after. Rows marked ``subprocess`` also run as ``python -m vaelab``.

Library-level tests of the same checks (more variants, exact messages) live in
tests/test_config.py, tests/test_data_*.py, tests/test_checkpoint.py and
tests/test_likelihoods.py; this table checks the user's path end to end.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FASHION_DIR, tiny_overrides, train
from vaelab import config
from vaelab.cli import main
from vaelab.data import DATASETS
from vaelab.data.registry import DatasetSpec, RemoteFile
from vaelab.data.testing import write_idx_dataset

pytestmark = pytest.mark.usefixtures("fashion_available")

# Would-be training runs: tiny and one thread, in case a row wrongly gets that far.
FAST = ["--no-report", "--epochs", "1", "--batch-size", "8", "--latent-dim", "2",
        "--set", "model.hidden=16", "--set", "train.threads=1"]
FASHION = [*FAST, "--set", "data.train_limit=64", "--set", "data.validation_size=16"]
USER = [*FAST, "--set", "data.validation_size=2"]
TINY = "tiny-idx"  # a dataset registered by the idx rows


@dataclass
class Row:
    """One bad input: ``argv`` ({tmp}, {run}, {out} are filled in), the fragments the error
    line must contain (problem first, then the fix), and how to make the input files."""

    argv: list[str]
    expect: tuple[str, ...]
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    run: str | None = None  # copy this trained run to {run} first ("a" or "b")
    subprocess: bool = False
    marks: list = field(default_factory=list)


# --------------------------------------------------------------------------- input makers

GREY = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)


def npy(name: str, array: np.ndarray) -> Callable:
    def make(tmp: Path, _mp) -> None:
        np.save(tmp / name, array)
    return make


def npz(name: str, **arrays: np.ndarray) -> Callable:
    def make(tmp: Path, _mp) -> None:
        np.savez(tmp / name, **arrays)
    return make


def raw(name: str, data: bytes) -> Callable:
    def make(tmp: Path, _mp) -> None:
        (tmp / name).write_bytes(data)
    return make


def png_folder(*sizes: tuple[int, int]) -> Callable:
    def make(tmp: Path, _mp) -> None:
        folder = tmp / "pngs"
        folder.mkdir()
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(GREY[i, :h, :w]).save(folder / f"{i:02d}.png")
    return make


def png_bomb(side: int) -> bytes:
    """A PNG that declares side x side pixels but holds one tiny IDAT (a decompression bomb's
    header: decoding it would need side**2 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)


def tiny_idx(**replace: bytes) -> Callable:
    """Register dataset 'tiny-idx' (4x4 images) whose files are in {tmp}/tiny, with some
    files replaced by ``replace[name]`` (uncompressed idx bytes, gzip'ed here). The
    registry's checksums vouch for the replaced bytes, so the parser must catch them."""

    def make(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        spec, _ = write_idx_dataset(tmp / "tiny", name=TINY, n_train=30, n_test=10)
        files = []
        for remote in spec.files:
            path = tmp / "tiny" / remote.name
            if remote.name in replace:
                path.write_bytes(gzip.compress(replace[remote.name], mtime=0))
            data = path.read_bytes()
            files.append(RemoteFile(remote.name, len(data), hashlib.sha256(data).hexdigest(),
                                    None, "test"))
        mp.setitem(DATASETS._entries, TINY, DatasetSpec(
            name=TINY, format="idx", files=tuple(files), parts=spec.parts, mirrors=(),
            image_shape=spec.image_shape))
    return make


TINY_IMAGES = "train-images-idx3-ubyte.gz"
TINY_LABELS = "train-labels-idx1-ubyte.gz"
TINY_OK = _idx_header((30, 4, 4)) + bytes(480)


def fashion_file(where: str, name: str, data: bytes) -> Callable:
    """Put ``data`` as fashion-mnist's ``name`` (and a genuine copy of the other train file)
    into the user cache ({tmp}/cache) or a --data-dir ({tmp}/data)."""

    def make(tmp: Path, _mp) -> None:
        folder = tmp / where / "fashion-mnist"
        folder.mkdir(parents=True)
        for other in (TINY_IMAGES, TINY_LABELS):
            if other != name:
                shutil.copy(FASHION_DIR / other, folder / other)
        (folder / name).write_bytes(data)
    return make


def edit_json(name: str, **changes) -> Callable:
    """Edit ``{run}/checkpoints/<name>.json`` (top level, or meta.config with 'config')."""

    def make(tmp: Path, _mp) -> None:
        path = tmp / "run" / "checkpoints" / f"{name}.json"
        record = json.loads(path.read_text())
        for key, value in changes.items():
            if key == "hidden":
                record["meta"]["config"]["model"]["mlp"]["hidden"] = value
            elif key == "add_tensor":
                record["tensors"].append(value)
            else:
                record[key] = value
        path.write_text(json.dumps(record))
    return make


def tensor_file(name: str, how: str) -> Callable:
    def make(tmp: Path, _mp) -> None:
        directory = tmp / "run" / "checkpoints"
        path = directory / json.loads((directory / f"{name}.json").read_text())["tensor_file"]
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        elif how == "flip":
            data[-100] ^= 0xFF
        elif how == "delete":
            path.unlink()
            return
        path.write_bytes(bytes(data))
    return make


def replace_file(relative: str, data: bytes) -> Callable:
    def make(tmp: Path, _mp) -> None:
        (tmp / "run" / relative).write_bytes(data)
    return make


def foreign_checkpoints(tmp: Path, _mp) -> None:
    """Run b's checkpoints (hidden 24) copied over run a's (hidden 16)."""
    shutil.rmtree(tmp / "run" / "checkpoints")
    shutil.copytree(tmp / "run-b" / "checkpoints", tmp / "run" / "checkpoints")


def outside_tensor_file(tmp: Path, _mp) -> None:
    """best.json names a genuine tensor file (right size and sha256) outside the run."""
    directory = tmp / "run" / "checkpoints"
    record = json.loads((directory / "best.json").read_text())
    shutil.copy(directory / record["tensor_file"], tmp / "elsewhere.safetensors")
    record["tensor_file"] = "../../elsewhere.safetensors"
    (directory / "best.json").write_text(json.dumps(record))


def bad_toml(tmp: Path, _mp) -> None:
    (tmp / "bad.toml").write_text("[model\nlatent_dim = 4\n")


def config_with_unknown_key(tmp: Path, _mp) -> None:
    path = tmp / "run" / "config.toml"
    path.write_text(path.read_text().replace("[model]\n", "[model]\ndepth = 3\n"))


# --------------------------------------------------------------------------- the table

ROWS: dict[str, Row] = {
    # ---- pixel values
    "pixels 0..255 as floats to a [0,1] family": Row(
        ["train", "--dataset", "{tmp}/x.npy", "--likelihood", "gaussian", "--scale", "0.1",
         "--binarize", "none", *USER, "--out", "{out}"],
        ("float images must lie in [0, 1]", "divide grey levels by 255"),
        npy("x.npy", GREY.astype(np.float32)), subprocess=True),
    "grey levels to bernoulli without opt-in (Fashion-MNIST)": Row(
        ["train", "--binarize", "none", "--likelihood", "bernoulli", *FASHION, "--out", "{out}"],
        ("bernoulli needs 0/1 data", "strictly between 0 and 1",
         "binarise the data (--binarize dynamic) or use the continuous-bernoulli")),
    "grey levels to bernoulli without opt-in (.npz)": Row(
        ["train", "--dataset", "{tmp}/x.npz", "--binarize", "none", *USER, "--out", "{out}"],
        ("bernoulli needs 0/1 data", "binarise the data"), npz("x.npz", images=GREY)),
    "NaN pixels": Row(
        ["train", "--dataset", "{tmp}/x.npy", *USER, "--out", "{out}"],
        ("hold NaN/Inf", "e.g. nan", "fix the step that made them"),
        npy("x.npy", np.where(GREY > 250, np.nan, GREY / 255).astype(np.float32)),
        subprocess=True),
    "Inf pixels": Row(
        ["train", "--dataset", "{tmp}/x.npy", *USER, "--out", "{out}"],
        ("hold NaN/Inf", "e.g. inf", "fix the step that made them"),
        npy("x.npy", np.where(GREY > 250, np.inf, GREY / 255).astype(np.float32))),
    "negative float pixels": Row(
        ["train", "--dataset", "{tmp}/x.npy", *USER, "--out", "{out}"],
        ("float images must lie in [0, 1]", "e.g. -"),
        npy("x.npy", (GREY / 255 - 0.5).astype(np.float32))),
    "floats that are not 8-bit grey levels": Row(
        ["train", "--dataset", "{tmp}/x.npy", *USER, "--out", "{out}"],
        ("not 8-bit grey levels", "does not quantise silently: save np.rint(x * 255)"),
        npy("x.npy", np.full((12, 28, 28), 0.3, np.float32))),
    "integers above 255": Row(
        ["train", "--dataset", "{tmp}/x.npy", *USER, "--out", "{out}"],
        ("integer images must be grey levels 0..255", "rescale them to uint8"),
        npy("x.npy", GREY.astype(np.int16) * 2)),
    # ---- shapes and sizes
    "wrong image shape for a conv model": Row(
        ["train", "--dataset", "{tmp}/x.npz", "--model", "conv", *USER, "--out", "{out}"],
        ("H and W must be divisible by 4, got 26x26", "--image-size 28",
         "use model.kind = 'mlp'"),
        npz("x.npz", images=GREY[:, :26, :26])),
    "flat vectors instead of images": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("images have shape (12, 784)", "reshape them"),
        npz("x.npz", images=GREY.reshape(12, 784))),
    "empty dataset": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("holds no images", "save a non-empty array"),
        npz("x.npz", images=GREY[:0])),
    "labels and images of different lengths (.npz)": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("5 labels for 12 images", "must match one to one"),
        npz("x.npz", images=GREY, labels=np.arange(5))),
    "validation split larger than the data": Row(
        ["train", "--dataset", "{tmp}/x.npz", *FAST, "--set", "data.validation_size=12",
         "--out", "{out}"],
        ("validation_size 12 leaves no training data", "choose a smaller value"),
        npz("x.npz", images=GREY)),
    # ---- array files
    ".npz with the wrong keys": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("expected an array named 'images' or 'x', found 'pixels'",
         "np.savez(path, images=..., labels=...)"),
        npz("x.npz", pixels=GREY)),
    ".npz with the wrong dtype": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("images of dtype complex64 are not supported", "use uint8 grey levels"),
        npz("x.npz", images=GREY.astype(np.complex64))),
    ".npz holding pickled objects": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("holds arrays of Python objects (pickles), which vaelab never loads",
         "save the images as a numeric array"),
        npz("x.npz", images=np.array([{"a": 1}, None], dtype=object))),
    "an HTML page saved as .npz": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("is not a readable .npy/.npz file", "an HTML page?", "save the images with np.save"),
        raw("x.npz", b"<!DOCTYPE html><html>Moved</html>")),
    "a truncated .npz": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("is not a readable .npy/.npz file", "save the images with np.save"),
        raw("x.npz", b"PK\x03\x04" + bytes(40))),
    "a file of another kind": Row(
        ["train", "--dataset", "{tmp}/x.csv", *USER, "--out", "{out}"],
        ("neither a .npz/.npy file nor a folder of images", "np.save or np.savez"),
        raw("x.csv", b"1,2,3\n")),
    "a data file that does not exist": Row(
        ["train", "--dataset", "{tmp}/missing.npz", *USER, "--out", "{out}"],
        ("does not exist", "give an existing .npz/.npy file or folder of images")),
    # ---- PNG folders
    "a folder with no images": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("holds no images (.png, .jpg", "put the images there"), png_folder()),
    "a folder of images of mixed sizes": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("images differ in size: 00.png is 28x28 but 02.png is 28x20",
         "pass --image-size N or HxW"),
        png_folder((28, 28), (28, 28), (28, 20))),
    "a .png that is not a PNG": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("01.png is not a readable PNG image", "replace it with a valid PNG file"),
        lambda tmp, mp: (png_folder((28, 28))(tmp, mp),
                         (tmp / "pngs" / "01.png").write_bytes(b"GIF89a" + bytes(20)))),
    "a truncated image in a folder": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("pngs/01.png is not a readable PNG image", "replace it with a valid PNG file"),
        lambda tmp, mp: (png_folder((28, 28), (28, 28))(tmp, mp),
                         (tmp / "pngs" / "01.png").write_bytes(
                             (tmp / "pngs" / "01.png").read_bytes()[:60]))),
    "a folder of non-image files only": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("holds no images (.png, .jpg", "skipped .txt: 2", "put the images there"),
        lambda tmp, mp: (png_folder()(tmp, mp), (tmp / "pngs" / "a.txt").write_text("x"),
                         (tmp / "pngs" / "b.txt").write_text("y"))),
    "a decompression bomb in a folder": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("pngs/01.png is 30000x30000 pixels", "a decompression bomb?", "downscale it"),
        lambda tmp, mp: (png_folder((28, 28))(tmp, mp),
                         (tmp / "pngs" / "01.png").write_bytes(png_bomb(30_000)))),
    "a symbolic link loop in a folder": Row(
        ["train", "--dataset", "{tmp}/pngs", *USER, "--out", "{out}"],
        ("pngs/loop is a symbolic link back to", "(a loop): remove the link"),
        lambda tmp, mp: (png_folder((28, 28))(tmp, mp), os.symlink(".", tmp / "pngs" / "loop"))),
    "an .npz whose layout is ambiguous": Row(
        ["train", "--dataset", "{tmp}/x.npz", *USER, "--out", "{out}"],
        ("images of shape (12, 3, 4, 4) could be NCHW", "set data.layout to 'nchw' or 'nhwc'"),
        npz("x.npz", images=np.zeros((12, 3, 4, 4), np.uint8))),
    # ---- idx files (registered datasets)
    "idx file with a wrong magic number": Row(
        ["train", "--dataset", TINY, "--data-dir", "{tmp}/tiny", *USER, "--out", "{out}"],
        ("is not an idx file (magic 0x12340803", "delete it and download again"),
        tiny_idx(**{TINY_IMAGES: b"\x12\x34" + TINY_OK[2:]})),
    "idx file with wrong dimensions": Row(
        ["train", "--dataset", TINY, "--data-dir", "{tmp}/tiny", *USER, "--out", "{out}"],
        ("has 2 dimensions (magic 0x00000802) but 3 were expected", "is it the right file?"),
        tiny_idx(**{TINY_IMAGES: _idx_header((30, 16)) + bytes(480)})),
    "idx file with truncated data": Row(
        ["train", "--dataset", TINY, "--data-dir", "{tmp}/tiny", *USER, "--out", "{out}"],
        ("is truncated: the header promises shape (30, 4, 4)", "delete it and download again"),
        tiny_idx(**{TINY_IMAGES: TINY_OK[:-7]})),
    "idx labels and images of different lengths": Row(
        ["train", "--dataset", TINY, "--data-dir", "{tmp}/tiny", *USER, "--out", "{out}"],
        ("holds 30 images but", "holds 29 labels", "replace them with the official pair"),
        tiny_idx(**{TINY_LABELS: _idx_header((29,)) + bytes(29)})),
    "an HTML page saved as .gz": Row(
        ["train", "--data-dir", "{tmp}/data", *FASHION, "--out", "{out}"],
        ("is not a fashion-mnist data file", "an HTML page?", "delete it and download again"),
        fashion_file("data", TINY_IMAGES, b"<!DOCTYPE html><html>Moved</html>")),
    "a tampered cache file": Row(
        ["train", *FASHION, "--out", "{out}"],
        ("does not match fashion-mnist's published checksum for train-images-idx3-ubyte.gz",
         "damaged, tampered with or a different dataset", "delete it"),
        fashion_file("cache", TINY_IMAGES, gzip.compress(TINY_OK, mtime=0)), subprocess=True),
    "another dataset's file in --data-dir": Row(
        ["train", "--data-dir", "{tmp}/data", *FASHION, "--out", "{out}"],
        ("does not match fashion-mnist's published checksum for train-labels-idx1-ubyte.gz",
         "replace it with the official file"),
        fashion_file("data", TINY_LABELS, gzip.compress(_idx_header((60000,)) + bytes(60000),
                                                        mtime=0))),
    "a gzip bomb as a dataset file": Row(
        ["train", "--data-dir", "{tmp}/data", *FASHION, "--out", "{out}"],
        ("decompresses to more than 1000000 bytes", "a gzip bomb?"),
        lambda tmp, mp: (mp.setattr("vaelab.data.idx.MAX_DECOMPRESSED_BYTES", 1_000_000),
                         fashion_file("data", TINY_IMAGES,
                                      gzip.compress(bytes(3_000_000), mtime=0))(tmp, mp))),
    # ---- names and config keys
    "unknown dataset": Row(
        ["train", "--dataset", "nope-mnist", *FAST, "--out", "{out}"],
        ("unknown dataset 'nope-mnist'", "choose one of", "fashion-mnist")),
    "unknown likelihood": Row(
        ["train", "--likelihood", "poisson", *FAST, "--out", "{out}"],
        ("unknown likelihood 'poisson'", "choose one of", "bernoulli"), subprocess=True),
    "unknown model": Row(
        ["train", "--model", "resnet", *FAST, "--out", "{out}"],
        ("unknown model 'resnet'", "choose one of", "mlp")),
    "unknown config key": Row(
        ["train", "--set", "model.depth=3", *FAST, "--out", "{out}"],
        ("unknown config key model.depth", "valid keys in [model] are")),
    "unknown config section": Row(
        ["train", "--set", "optim.lr=3", *FAST, "--out", "{out}"],
        ("unknown config section [optim]", "valid sections are")),
    "unknown preset": Row(
        ["train", "--preset", "vq-vae", *FAST, "--out", "{out}"],
        ("unknown preset 'vq-vae'", "choose one of")),
    "override without '='": Row(
        ["train", "--set", "model.latent_dim", *FAST, "--out", "{out}"],
        ("is not of the form section.key=value", "e.g. model.latent_dim=32")),
    "a number that is not a number": Row(
        ["train", "--set", "train.lr=fast", *FAST, "--out", "{out}"],
        ("train.lr = 'fast' is not a valid float", "give e.g. train.lr=0.5")),
    "a config file that is not TOML": Row(
        ["train", "--config", "{tmp}/bad.toml", *FAST, "--out", "{out}"],
        ("is not valid TOML", "fix the syntax"), bad_toml),
    "a config file that does not exist": Row(
        ["train", "--config", "{tmp}/missing.toml", *FAST, "--out", "{out}"],
        ("does not exist", "check the path given to --config")),
    "a CUDA device on a machine without CUDA": Row(
        ["train", "--device", "cuda", *FAST, "--out", "{out}"],
        ("CUDA is not available", "use cpu or auto"),
        marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")]),
    # ---- impossible sizes
    "zero batch size": Row(["train", *FAST, "--batch-size", "0", "--out", "{out}"],
                           ("train.batch_size must be positive, got 0", "give a value > 0")),
    "negative batch size": Row(["train", *FAST, "--batch-size", "-8", "--out", "{out}"],
                               ("train.batch_size must be positive, got -8", "> 0")),
    "zero epochs": Row(["train", *FAST, "--epochs", "0", "--out", "{out}"],
                       ("train.epochs must be positive, got 0", "> 0")),
    "negative epochs": Row(["train", *FAST, "--epochs", "-1", "--out", "{out}"],
                           ("train.epochs must be positive, got -1", "> 0")),
    "zero latent size": Row(["train", *FAST, "--latent-dim", "0", "--out", "{out}"],
                            ("model.latent_dim must be positive, got 0", "> 0")),
    "negative latent size": Row(["train", *FAST, "--latent-dim", "-3", "--out", "{out}"],
                                ("model.latent_dim must be positive, got -3", "> 0")),
    "zero hidden size": Row(["train", *FAST, "--set", "model.hidden=0", "--out", "{out}"],
                            ("model.mlp.hidden sizes must be positive, got [0]",
                             "give layer sizes > 0, e.g. 512,256")),
    "zero samples per example": Row(["train", *FAST, "--samples", "0", "--out", "{out}"],
                                    ("objective.samples must be positive, got 0", "> 0")),
    "zero importance samples (train)": Row(
        ["train", *FAST, "--iw-samples", "0", "--out", "{out}"],
        ("eval.auto.samples must be positive, got 0", "> 0")),
    "negative importance samples (eval)": Row(
        ["eval", "{run}", "--iw-samples", "-5"],
        ("samples must be positive, got -5", "give a value > 0"), run="a"),
    "beta < 0": Row(["train", *FAST, "--beta", "-0.5", "--out", "{out}"],
                    ("objective.beta must be >= 0, got -0.5", "give a value >= 0")),
    "zero learning rate": Row(["train", *FAST, "--lr", "0", "--out", "{out}"],
                              ("train.lr must be positive, got 0.0", "> 0")),
    "iwae with beta": Row(
        ["train", *FAST, "--objective", "iwae", "--beta", "2", "--out", "{out}"],
        ("iwae does not use beta or free bits", "leave them at 1 and 0")),
    "a density on binarised data": Row(
        ["train", *FAST, "--likelihood", "continuous-bernoulli", "--out", "{out}"],
        ("is a density on [0, 1] but the data are binarised", "--binarize none",
         "--likelihood bernoulli")),
    "a negative likelihood scale": Row(
        ["train", *FAST, "--likelihood", "gaussian", "--scale", "-1", "--out", "{out}"],
        ("likelihood.gaussian.scale must be a positive number", "'learned' or 'per-pixel'")),
    "zero samples to draw": Row(["sample", "{run}", "--n", "0"],
                                ("--n must be positive, got 0", "e.g. --n 64"), run="a"),
    # ---- checkpoints and run directories
    "a checkpoint from another model config": Row(
        ["train", "--resume", "{run}", "--no-report"],
        ("cannot change model.mlp.hidden from [24] to [16] when resuming",
         "start a new run with --out"), foreign_checkpoints, run="a"),
    "a checkpoint whose config does not match its tensors": Row(
        ["eval", "{run}"],
        ("does not fit this model", "is (16, 784) in the checkpoint but (24, 784)",
         "load it with the config it was saved with"), edit_json("best", hidden=[24]), run="a"),
    "a truncated checkpoint": Row(
        ["eval", "{run}"],
        ("the checkpoint says", "it is truncated or was replaced",
         "restore it or use another checkpoint"), tensor_file("best", "truncate"), run="a",
        subprocess=True),
    "a tampered checkpoint (same size)": Row(
        ["eval", "{run}", "--checkpoint", "last"],
        ("does not match its sha256", "restore it or use another checkpoint"),
        tensor_file("last", "flip"), run="a"),
    "a truncated checkpoint JSON": Row(
        ["eval", "{run}"], ("is not a vaelab checkpoint", "pass a checkpoint written by vaelab"),
        lambda tmp, mp: (tmp / "run/checkpoints/best.json").write_bytes(
            (tmp / "run/checkpoints/best.json").read_bytes()[:300]), run="a"),
    "a file that is not a checkpoint": Row(
        ["eval", "{run}"], ("is not a vaelab checkpoint", "pass a checkpoint written by vaelab"),
        replace_file("checkpoints/best.json", b"\x89PNG\r\n\x1a\n" + bytes(64)), run="a"),
    "JSON edited to reference a missing tensor": Row(
        ["eval", "{run}"],
        ("tensor 'model.encoder.extra' listed in the checkpoint is not in",
         "use another checkpoint"), edit_json("best", add_tensor="model.encoder.extra"),
        run="a"),
    "a checkpoint whose tensor file is missing": Row(
        ["eval", "{run}"], ("is missing: the checkpoint is incomplete", "use another checkpoint"),
        tensor_file("best", "delete"), run="a"),
    "a tensor file outside the run directory": Row(
        ["eval", "{run}"],
        ("names tensor file '../../elsewhere.safetensors'",
         "not a plain .safetensors file name in the same directory: refusing to load it",
         "use another checkpoint"),
        outside_tensor_file, run="a"),
    "a run directory without that checkpoint": Row(
        ["eval", "{run}", "--checkpoint", "last"],
        ("has no checkpoints/last.json", "finished at least one epoch"),
        lambda tmp, mp: (tmp / "run/checkpoints/last.json").unlink(), run="a"),
    "a directory that is not a run": Row(["eval", "{tmp}"],
                                         ("has no checkpoints/best.json",
                                          "is it a vaelab run directory")),
    "a run directory that does not exist": Row(
        ["plot", "{tmp}/nothing"], ("does not exist", "give the --out directory")),
    "resuming with a changed model": Row(
        ["train", "--resume", "{run}", "--latent-dim", "3", "--no-report"],
        ("cannot change model.latent_dim from 2 to 3 when resuming",
         "start a new run with --out"), run="a"),
    "resuming with --preset": Row(
        ["train", "--resume", "{run}", "--preset", "default"],
        ("--resume takes its config from the run", "drop --preset/--config"), run="a"),
    "resuming a run whose config.toml was edited badly": Row(
        ["train", "--resume", "{run}", "--no-report"],
        ("unknown config key model.depth", "valid keys in [model] are"),
        config_with_unknown_key, run="a"),
    "training into an existing run": Row(
        ["train", *FASHION, "--out", "{run}"],
        ("already holds a run", "continue it with --resume"), run="a"),
    "metrics.jsonl damaged": Row(
        ["plot", "{run}"], ("metrics.jsonl line 1 is not JSON", "re-run or resume training"),
        replace_file("metrics.jsonl", b"{oops\n"), run="a"),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two finished one-epoch runs: a (hidden 16) and b (hidden 24), latent size 2."""
    threads = torch.get_num_threads()
    out = {}
    try:
        for name, hidden in (("a", 16), ("b", 24)):
            directory = tmp_path_factory.mktemp(f"run-{name}")
            cfg = config.resolve(overrides=tiny_overrides(**{
                "data.train_limit": 128, "data.validation_size": 32, "train.epochs": 1,
                "model.hidden": hidden, "model.latent_dim": 2, "train.threads": 1}))
            train(cfg, directory, progress=False, report=False, echo=lambda _line: None)
            out[name] = directory
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No dataset location or mirror from the environment; downloads would fail at once."""
    for var in ("VAELAB_DATA_DIR", "VAELAB_MIRRORS_FASHION_MNIST", "VAELAB_SYSTEM_DATA_DIRS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9/")  # the discard port: refused
    return tmp_path


def _tree(directory: Path) -> dict[str, str]:
    """Every file and directory under ``directory``, with the sha256 of each file."""
    return {p.relative_to(directory).as_posix(): (
        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(directory.rglob("*"))}


def _prepare(row: Row, tmp: Path, monkeypatch, trained) -> list[str]:
    if row.run is not None:
        shutil.copytree(trained[row.run], tmp / "run")
        shutil.copytree(trained["b"], tmp / "run-b")
    if row.setup is not None:
        row.setup(tmp, monkeypatch)
    fill = {"{tmp}": str(tmp), "{run}": str(tmp / "run"), "{out}": str(tmp / "out")}
    argv = []
    for arg in row.argv:
        for key, value in fill.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    return argv


def _check_error_line(stderr: str, row: Row) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vaelab: error: "), stderr
    for fragment in row.expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def _params(subprocess_only: bool = False):
    return [pytest.param(name, marks=row.marks, id=name) for name, row in ROWS.items()
            if row.subprocess or not subprocess_only]


def test_the_table_has_at_least_30_rows():
    assert len(ROWS) >= 30


@pytest.mark.parametrize("name", _params())
def test_bad_input(name, isolated, monkeypatch, capsys, trained):
    row = ROWS[name]
    argv = _prepare(row, isolated, monkeypatch, trained)
    before = _tree(isolated)
    threads = torch.get_num_threads()
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    _check_error_line(captured.err, row)
    assert _tree(isolated) == before  # nothing written, created or overwritten
    assert not (isolated / "out").exists()


@pytest.mark.parametrize("name", _params(subprocess_only=True))
def test_bad_input_in_a_real_process(name, isolated, monkeypatch, trained):
    row = ROWS[name]
    argv = _prepare(row, isolated, monkeypatch, trained)
    before = _tree(isolated)
    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run([sys.executable, "-m", "vaelab", *argv], capture_output=True,
                            text=True, env=env, cwd=isolated, timeout=120)
    assert result.returncode == 2, result.stderr
    _check_error_line(result.stderr, row)
    assert _tree(isolated) == before
