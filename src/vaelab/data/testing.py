"""Helpers for testing code that reads datasets: tiny registered-style datasets (idx, amat,
CIFAR-10 binary archive, SVHN MAT-files) and a local HTTP mirror on 127.0.0.1 (standard
library only).

Example::

    spec, arrays = write_idx_dataset(tmp_path / "src", name="tiny")
    with LocalHTTPServer() as server:
        server.serve_directory(tmp_path / "src")
        monkeypatch.setenv("VAELAB_MIRRORS_TINY", server.url())
        ...
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cifar
from .idx import write_amat, write_idx
from .registry import DatasetSpec, RemoteFile
from .svhn import write_svhn

__all__ = ["write_idx_dataset", "write_amat_dataset", "write_cifar10_dataset",
           "write_svhn_dataset", "Route", "LocalHTTPServer"]

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _remote(path: Path, content: bytes | None) -> RemoteFile:
    raw = path.read_bytes()
    content_hash = hashlib.sha256(content).hexdigest() if content is not None else None
    return RemoteFile(path.name, len(raw), hashlib.sha256(raw).hexdigest(), content_hash,
                      "written by vaelab.data.testing")


def write_idx_dataset(
    directory: str | Path,
    name: str = "tiny",
    n_train: int = 30,
    n_test: int = 10,
    image_shape: tuple[int, int] = (4, 4),
    seed: int = 0,
    mirrors: tuple[str, ...] = (),
) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    """Write four gzip idx files of random grey images and labels 0..9 into ``directory``.

    Returns:
        The matching :class:`DatasetSpec` (real sizes and SHA-256s) and the arrays by file name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = _IDX_NAMES[part]
        arrays[images_name] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        arrays[labels_name] = rng.integers(0, 10, n, dtype=np.uint8)
    files = []
    for file_name, array in arrays.items():
        path = write_idx(directory / file_name, array)
        header = bytes([0, 0, 8, array.ndim]) + b"".join(
            int(s).to_bytes(4, "big") for s in array.shape
        )
        files.append(_remote(path, header + array.tobytes()))
    spec = DatasetSpec(name=name, format="idx", files=tuple(files), parts=dict(_IDX_NAMES),
                       mirrors=mirrors, image_shape=(1, *image_shape))
    return spec, arrays


def write_amat_dataset(
    directory: str | Path,
    name: str = "tiny-binary",
    sizes: tuple[int, int, int] = (20, 6, 8),
    image_shape: tuple[int, int] = (4, 4),
    seed: int = 0,
) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    """Write ``<name>_{train,valid,test}.amat`` files of random 0/1 images (binarized-MNIST layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = image_shape[0] * image_shape[1]
    arrays, files, parts = {}, [], {}
    for part, n in zip(("train", "valid", "test"), sizes):
        file_name = f"{name}_{part}.amat"
        arrays[file_name] = rng.integers(0, 2, (n, width), dtype=np.uint8)
        files.append(_remote(write_amat(directory / file_name, arrays[file_name]), None))
        parts[part] = (file_name,)
    spec = DatasetSpec(name=name, format="amat", files=tuple(files), parts=parts, mirrors=(),
                       image_shape=(1, *image_shape), levels=2)
    return spec, arrays


def write_cifar10_dataset(
    directory: str | Path,
    name: str = "tiny-cifar",
    per_batch: int = 4,
    seed: int = 0,
    mirrors: tuple[str, ...] = (),
) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    """Write ``cifar-10-binary.tar.gz`` in the official layout, ``per_batch`` random images
    per batch file (five training batches, one test batch).

    Returns:
        The matching spec and ``{"train_images", "train_labels", "test_images",
        "test_labels"}`` in file order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for member in (*cifar.MEMBERS["train"], *cifar.MEMBERS["test"]):
        batches[member] = (rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8),
                           rng.integers(0, 10, per_batch, dtype=np.uint8))
    path = cifar.write_archive(directory / "cifar-10-binary.tar.gz", batches)
    arrays = {}
    for part in ("train", "test"):
        arrays[f"{part}_images"] = np.concatenate([batches[m][0] for m in cifar.MEMBERS[part]])
        arrays[f"{part}_labels"] = np.concatenate([batches[m][1] for m in cifar.MEMBERS[part]])
    spec = DatasetSpec(name=name, format="cifar10-bin", files=(_remote(path, None),),
                       parts={"train": (path.name,), "test": (path.name,)}, mirrors=mirrors,
                       image_shape=(3, 32, 32), classes=cifar.CLASSES)
    return spec, arrays


def write_svhn_dataset(
    directory: str | Path,
    name: str = "tiny-svhn",
    n_train: int = 12,
    n_test: int = 5,
    seed: int = 0,
    mirrors: tuple[str, ...] = (),
) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    """Write ``train_32x32.mat`` and ``test_32x32.mat`` (SVHN format 2) of random images and
    digits 0..9 (stored as 1..10).

    Returns:
        The matching spec and ``{"train_images", "train_labels", "test_images",
        "test_labels"}`` (labels as digits 0..9).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays, files = {}, []
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(n) % 10  # every digit, 0 (stored as 10) included
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
        files.append(_remote(write_svhn(directory / f"{part}_32x32.mat", images, labels), None))
    spec = DatasetSpec(name=name, format="svhn-mat", files=tuple(files),
                       parts={"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
                       mirrors=mirrors, image_shape=(3, 32, 32),
                       classes=tuple(str(d) for d in range(10)))
    return spec, arrays


@dataclass
class Route:
    """What the server answers for one path.

    ``declared_length`` larger than ``len(body)`` simulates an interrupted transfer: the
    server announces that many bytes, sends ``body`` and closes the connection.
    """

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    declared_length: int | None = None


class LocalHTTPServer:
    """A threaded HTTP server on ``127.0.0.1`` (ephemeral port) serving :class:`Route` s.

    Use as a context manager; unknown paths get 404. ``requests`` records every path asked.
    Server-side socket operations time out after ``timeout`` seconds.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                self.timeout = timeout
                super().setup()

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server.requests.append(self.path)
                route = server.routes.get(self.path, Route(b"not found", 404, "text/plain"))
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                length = route.declared_length or len(route.body)
                self.send_header("Content-Length", str(length))
                if length != len(route.body):
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(route.body)
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, prefix: str = "") -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{prefix}"

    def serve_directory(self, directory: str | Path, prefix: str = "") -> None:
        """Serve every file of ``directory`` at ``<prefix>/<file name>``."""
        for path in sorted(Path(directory).iterdir()):
            if path.is_file():
                self.routes[f"{prefix}/{path.name}"] = Route(path.read_bytes())

    def __enter__(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
