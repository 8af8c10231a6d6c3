"""Verified downloads against a local HTTP server on 127.0.0.1 (no internet).

A test-only dataset ``tiny`` (tiny idx files with their real SHA-256s) is registered with
monkeypatch; mirrors point at :class:`LocalHTTPServer`. Client and server time out after a
few seconds, so no test can hang.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import socket
from pathlib import Path

import numpy as np
import pytest

from vaelab.data import DATASETS, RemoteFile, load, sources
from vaelab.data.testing import LocalHTTPServer, Route, write_idx_dataset
from vaelab.errors import DataError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache, no system/data dirs, no proxies, short timeouts, dataset 'tiny'."""
    for var in ("VAELAB_DATA_DIR", "VAELAB_MIRRORS", "VAELAB_MIRRORS_TINY", "HTTP_PROXY",
                "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VAELAB_SYSTEM_DATA_DIRS", "")
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 5.0)
    spec, arrays = write_idx_dataset(tmp_path / "origin", name="tiny")
    monkeypatch.setitem(DATASETS._entries, "tiny", spec)
    with LocalHTTPServer(timeout=5.0) as server:
        server.serve_directory(tmp_path / "origin", prefix="/good")
        yield {"spec": spec, "arrays": arrays, "server": server, "cache": tmp_path / "cache",
               "origin": tmp_path / "origin", "monkeypatch": monkeypatch}


def _mirrors(env, *urls):
    env["monkeypatch"].setenv("VAELAB_MIRRORS_TINY", ",".join(urls))


def _cached_files(env):
    return sorted(p.relative_to(env["cache"]).as_posix() for p in env["cache"].rglob("*")
                  if p.is_file())


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_download_success_verifies_checksums_and_caches(env, caplog):
    server = env["server"]
    _mirrors(env, server.url("/good"))
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        test = load("tiny", split="test")
    assert _cached_files(env) == [f"tiny/{name}" for name in TEST_FILES]
    for name in TEST_FILES:
        cached = (env["cache"] / "tiny" / name).read_bytes()
        assert cached == (env["origin"] / name).read_bytes()
        assert test.checksums[name] == hashlib.sha256(cached).hexdigest()
        assert test.checksums[name] == env["spec"].file(name).sha256
    np.testing.assert_array_equal(test.images[:, 0].numpy(), env["arrays"][TEST_FILES[0]])
    np.testing.assert_array_equal(test.labels.numpy(), env["arrays"][TEST_FILES[1]])
    assert test.metadata["found_in"]["step"] == "download"
    assert server.requests == [f"/good/{name}" for name in TEST_FILES]  # only the test part
    assert "tiny: downloading t10k-images-idx3-ubyte.gz from " in caplog.text
    # a second load finds the verified files in the cache and downloads nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        load("tiny", split="test")
    assert len(server.requests) == 2 and "(user cache) ... found" in caplog.text


def test_checksum_mismatch_is_rejected_and_nothing_is_cached(env):
    server = env["server"]
    name = TEST_FILES[0]
    good = (env["origin"] / name).read_bytes()
    payload = gzip.decompress(good)
    other = gzip.compress(payload[:-1] + bytes([payload[-1] ^ 1]), mtime=0)  # one pixel changed
    assert len(other) == len(good) and other != good  # same size: only the hash can tell
    server.routes[f"/bad/{name}"] = Route(other)
    _mirrors(env, server.url("/bad"))
    with pytest.raises(DataError) as info:
        load("tiny", split="test")
    message = str(info.value)
    assert f"could not download tiny file {name}" in message
    assert f"{server.url('/bad')}/{name}: SHA-256 mismatch (got " \
           f"{hashlib.sha256(other).hexdigest()})" in message
    assert _cached_files(env) == []  # pooch's temporary file was removed, nothing moved in


def test_first_mirrors_down_then_next_one_used(env, caplog):
    server = env["server"]
    refused = f"http://127.0.0.1:{_closed_port()}"
    _mirrors(env, refused, server.url("/missing"), server.url("/good"))
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        test = load("tiny", split="test")
    assert len(test) == 10 and _cached_files(env) == [f"tiny/{n}" for n in TEST_FILES]
    assert "failed: connection failed ([Errno 111] Connection refused)" in caplog.text
    assert "failed: HTTP 404 Not Found" in caplog.text
    assert f"from {server.url('/good')}/t10k-images-idx3-ubyte.gz into" in caplog.text


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksum", "no-checksum"])
def test_html_page_instead_of_gzip_is_rejected(env, with_checksum, monkeypatch):
    server = env["server"]
    name = TEST_FILES[0]
    if not with_checksum:  # even an entry without a published hash refuses HTML
        spec = env["spec"]
        files = tuple(RemoteFile(f.name, None, None) if f.name == name else f for f in spec.files)
        monkeypatch.setitem(DATASETS._entries, "tiny", dataclasses.replace(spec, files=files))
    server.routes[f"/portal/{name}"] = Route(
        b"<!DOCTYPE html><html><body>Please log in</body></html>", content_type="text/html")
    _mirrors(env, server.url("/portal"))
    with pytest.raises(DataError, match=r"the server sent an HTML page, not "
                                        r"t10k-images-idx3-ubyte.gz \(starts with '<!DO'"):
        load("tiny", split="test")
    assert _cached_files(env) == []


def test_interrupted_transfer_is_not_cached(env):
    server = env["server"]
    name = TEST_FILES[0]
    body = (env["origin"] / name).read_bytes()
    server.routes[f"/flaky/{name}"] = Route(body[: len(body) // 2], declared_length=len(body))
    _mirrors(env, server.url("/flaky"))
    with pytest.raises(DataError, match=r"transfer interrupted"):
        load("tiny", split="test")
    assert _cached_files(env) == []
    # the next run with a working mirror is not poisoned by the failed one
    _mirrors(env, server.url("/good"))
    assert len(load("tiny", split="test")) == 10


def test_failure_on_every_mirror_explains_offline_placement(env):
    server = env["server"]
    _mirrors(env, server.url("/a"), server.url("/b"))
    with pytest.raises(DataError) as info:
        load("tiny", split="train", validation_size=5)
    message = str(info.value)
    cache = env["cache"] / "tiny"
    assert "train-images-idx3-ubyte.gz" in message
    assert f"{server.url('/a')}/train-images-idx3-ubyte.gz: HTTP 404 Not Found" in message
    assert f"{server.url('/b')}/train-images-idx3-ubyte.gz: HTTP 404 Not Found" in message
    assert (f"copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz into {cache}/"
            in message)
    assert "--data-dir" in message and "VAELAB_MIRRORS_TINY=URL1,URL2" in message
    assert "\n" not in message


def test_partial_cache_is_completed_by_download(env):
    server = env["server"]
    (env["cache"] / "tiny").mkdir(parents=True)
    name = TEST_FILES[1]
    (env["cache"] / "tiny" / name).write_bytes((env["origin"] / name).read_bytes())
    _mirrors(env, server.url("/good"))
    test = load("tiny", split="test")
    assert server.requests == [f"/good/{TEST_FILES[0]}"]
    assert set(test.checksums) == set(TEST_FILES)


def test_entry_without_published_checksum_downloads_with_size_check(env, monkeypatch, caplog):
    server = env["server"]
    spec = env["spec"]
    files = tuple(RemoteFile(f.name, f.size, None) for f in spec.files)
    monkeypatch.setitem(DATASETS._entries, "tiny", dataclasses.replace(spec, files=files))
    name = TEST_FILES[0]
    body = (env["origin"] / name).read_bytes()
    short = gzip.compress(b"\x00\x00\x08\x01" + bytes(4))  # a valid gzip, wrong size
    server.routes[f"/short/{name}"] = Route(short)
    _mirrors(env, server.url("/short"), server.url("/good"))
    with caplog.at_level(logging.INFO, logger="vaelab.data"):
        test = load("tiny", split="test")
    assert f"failed: got {len(short)} bytes, expected {len(body)} (interrupted transfer?)" in caplog.text
    assert test.metadata["files"][0]["verified"] == sources.UNVERIFIED
    assert test.checksums[name] == hashlib.sha256(body).hexdigest()


def test_download_goes_to_a_temporary_file_moved_into_place_after_verification(env, monkeypatch):
    server = env["server"]
    _mirrors(env, server.url("/good"))
    seen = []
    original = sources._CheckedDownloader.__call__

    def spy(self, url, output_file, pooch_obj):
        original(self, url, output_file, pooch_obj)
        final = env["cache"] / "tiny" / self.remote.name
        seen.append((Path(output_file).parent, Path(output_file).name, final.exists()))

    monkeypatch.setattr(sources._CheckedDownloader, "__call__", spy)
    load("tiny", split="test")
    assert [(parent, exists) for parent, _, exists in seen] == [(env["cache"] / "tiny", False)] * 2
    assert all(name not in TEST_FILES for _, name, _ in seen)  # a temporary name
    assert _cached_files(env) == [f"tiny/{n}" for n in TEST_FILES]  # no temporary files left
