"""The real Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).

CI installs the package; elsewhere the tests are skipped with the reason. Debian's .gz files
are recompressed (no file name in the gzip header), so they verify through the SHA-256 of
their decompressed content; this test also checks that content against the MD5s of the
uncompressed official files that the Fashion-MNIST community publishes.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import DATASETS, load, sources

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not SYSTEM_DIR.is_dir(),
    reason=f"{SYSTEM_DIR} is absent: install Debian's dataset-fashion-mnist "
    "(apt-get install dataset-fashion-mnist) to run these tests",
)

# MD5 of the uncompressed official files (torchvision-style FashionMNIST "raw_data" lists).
PUBLISHED_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.fixture(scope="module")
def fashion():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("VAELAB_DATA_DIR", "VAELAB_SYSTEM_DATA_DIRS", "VAELAB_CACHE_DIR"):
            mp.delenv(var, raising=False)
        mp.setenv("VAELAB_CACHE_DIR", "/nonexistent/vaelab-test-cache")
        mp.setenv("VAELAB_MIRRORS", "http://127.0.0.1:9")  # no network even if misconfigured
        yield {split: load("fashion-mnist", split=split)
               for split in ("train", "validation", "test")}


def test_sizes_shapes_and_split(fashion):
    train, validation, test = fashion["train"], fashion["validation"], fashion["test"]
    assert (len(train), len(validation), len(test)) == (55_000, 5_000, 10_000)
    for split_set in (train, validation, test):
        assert split_set.images.shape[1:] == (1, 28, 28)
        assert split_set.images.dtype == torch.uint8 and split_set.images.is_contiguous()
        assert split_set.labels.dtype == torch.int64
        assert split_set.metadata["found_in"] == {"step": "system directory",
                                                  "directory": str(SYSTEM_DIR)}
    # 6,000 training and 1,000 test images per class (Xiao et al., 2017)
    train_counts = torch.bincount(torch.cat([train.labels, validation.labels]), minlength=10)
    assert train_counts.tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert validation.metadata["validation"]["size"] == 5000
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


def test_checksums_are_the_published_ones(fashion):
    spec = DATASETS["fashion-mnist"]
    for split_set, part in ((fashion["train"], "train"), (fashion["test"], "test")):
        expected = {r.stem: r.content_sha256 for r in spec.files_for(part)}
        assert split_set.checksums == expected
        assert {f["verified"] for f in split_set.metadata["files"]} == {sources.VERIFIED_CONTENT}
    for path in sorted(SYSTEM_DIR.glob("*.gz")):
        content = gzip.decompress(path.read_bytes())
        stem = path.name[:-3]
        assert hashlib.md5(content).hexdigest() == PUBLISHED_RAW_MD5[stem]
        assert hashlib.sha256(content).hexdigest() == spec.file(path.name).content_sha256


def test_images_match_the_files_byte_for_byte(fashion):
    content = gzip.decompress((SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    reference = np.frombuffer(content, np.uint8, offset=16).reshape(10_000, 1, 28, 28)
    np.testing.assert_array_equal(fashion["test"].images.numpy(), reference)
    # mean grey level of the test set, float64 reference
    np.testing.assert_allclose(fashion["test"].pixel_mean().double().mean().item(),
                               reference.mean() / 255.0, rtol=1e-6)


def test_explicit_data_dir_logs_one_line_per_step(monkeypatch, caplog):
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        test = load("fashion-mnist", split="test", data_dir=SYSTEM_DIR)
    assert len(test) == 10_000
    assert f"fashion-mnist: looking in {SYSTEM_DIR} (data_dir argument) ... found (sha256 of " \
           f"the decompressed content)" in caplog.text
