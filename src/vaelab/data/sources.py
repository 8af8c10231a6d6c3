"""Where a registered dataset's files come from: discovery, verification and download.

Resolution order (the first location holding every needed file wins; each step is one
INFO line on the ``vaelab.data`` logger):

1. the explicit ``data_dir`` argument (``--data-dir``): files in ``<data_dir>/<name>/`` or
   directly in ``<data_dir>/``;
2. ``$VAELAB_DATA_DIR``, same two layouts;
3. the user cache, ``<cache>/<name>/`` where ``<cache>`` is ``$VAELAB_CACHE_DIR`` or
   ``platformdirs.user_cache_dir("vaelab")`` (``~/.cache/vaelab`` on Linux);
4. system directories ``<root>/<name>/`` for each root in :data:`SYSTEM_DATA_DIRS`
   (``/usr/share/datasets``, where Debian's ``dataset-fashion-mnist`` installs, and
   ``/usr/local/share/datasets``); ``$VAELAB_SYSTEM_DATA_DIRS`` (``os.pathsep``-separated)
   replaces the list;
5. download of the missing files into the cache from the dataset's mirrors, tried in order,
   with :func:`pooch.retrieve` and the SHA-256 as ``known_hash``: pooch writes to a
   temporary file next to the target and moves it into place only once the hash matches,
   so a partial, wrong or HTML download never lands in the cache. Mirrors are replaced by
   ``$VAELAB_MIRRORS_<NAME>`` (e.g. ``VAELAB_MIRRORS_FASHION_MNIST``) or ``$VAELAB_MIRRORS``,
   comma-separated base URLs.

Every file found on disk is verified before use, wherever it is: its SHA-256 must equal the
published one, or the SHA-256 of its decompressed bytes the published content hash (see
:mod:`vaelab.data.registry`). A file that fails is refused with an error naming it, both
hashes and the fix; vaelab never deletes or overwrites it (not even in the cache), so a
tampered or damaged file is never trusted silently and never removed behind your back.
A file may be stored gzip-compressed under its official name, decompressed under the name
without ``.gz``, or compressed beside its name (``NAME.gz``, ``NAME.xz``, ``NAME.bz2``,
e.g. ``binarized_mnist_train.amat.gz``); a compressed copy is verified by the SHA-256 of
its decompressed bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .idx import COMPRESSED_SUFFIXES, GZIP_MAGIC, decompress, describe_start
from .registry import DatasetSpec, RemoteFile

__all__ = [
    "SYSTEM_DATA_DIRS",
    "DOWNLOAD_TIMEOUT",
    "VerifiedFile",
    "Resolution",
    "cache_dir",
    "system_data_dirs",
    "mirrors_for",
    "mirror_env_var",
    "verify_file",
    "resolve",
]

log = logging.getLogger("vaelab.data")

SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")
DOWNLOAD_TIMEOUT: float = 60.0  # seconds to connect and between received bytes

VERIFIED_FILE = "sha256 of the file"
VERIFIED_CONTENT = "sha256 of the decompressed content"
UNVERIFIED = "not verified: no published checksum (size and format checked)"


@dataclass(frozen=True)
class VerifiedFile:
    """A dataset file found on disk and checked.

    Attributes:
        remote: the registry entry it was checked against.
        path: where it is.
        data: its content, decompressed (what the parsers read).
        key: the checksum's name: the file name when the file itself matched, the name
            without ``.gz`` when its decompressed content matched.
        sha256: the matching hash (or, for an unverifiable entry, the file's hash).
        verified: how it was verified (one of the ``VERIFIED_*`` / ``UNVERIFIED`` texts).
    """

    remote: RemoteFile
    path: Path
    data: bytes
    key: str
    sha256: str
    verified: str

    def describe(self) -> dict:
        """JSON-able description for run metadata."""
        return {
            "name": self.remote.name,
            "path": str(self.path),
            "checksum_name": self.key,
            "sha256": self.sha256,
            "verified": self.verified,
            "checksum_source": self.remote.source,
        }


@dataclass(frozen=True)
class Resolution:
    """The verified files of one dataset and where they were found."""

    files: dict[str, VerifiedFile]
    directory: Path
    step: str


def cache_dir() -> Path:
    """The user cache root: ``$VAELAB_CACHE_DIR`` or ``platformdirs.user_cache_dir("vaelab")``."""
    env = os.environ.get("VAELAB_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vaelab"))


def system_data_dirs() -> tuple[Path, ...]:
    """System dataset roots: ``$VAELAB_SYSTEM_DATA_DIRS`` if set, else :data:`SYSTEM_DATA_DIRS`."""
    env = os.environ.get("VAELAB_SYSTEM_DATA_DIRS")
    roots = env.split(os.pathsep) if env is not None else SYSTEM_DATA_DIRS
    return tuple(Path(root) for root in roots if root)


def mirror_env_var(name: str) -> str:
    """``"fashion-mnist"`` -> ``"VAELAB_MIRRORS_FASHION_MNIST"``."""
    return "VAELAB_MIRRORS_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def mirrors_for(spec: DatasetSpec) -> tuple[str, ...]:
    """Base URLs to try in order (environment overrides first, else the registry's)."""
    for var in (mirror_env_var(spec.name), "VAELAB_MIRRORS"):
        value = os.environ.get(var)
        if value:
            return tuple(url.strip() for url in value.split(",") if url.strip())
    return spec.mirrors


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_file(remote: RemoteFile, path: Path, dataset: str) -> VerifiedFile:
    """Check ``path`` against ``remote``'s published checksums and return its content.

    Raises:
        DataError: a damaged file, or one whose hashes match neither published value.
    """
    raw = path.read_bytes()
    file_hash = _sha256(raw)
    if remote.sha256 is not None and file_hash == remote.sha256:
        return VerifiedFile(remote, path, decompress(raw, path), remote.name, file_hash,
                            VERIFIED_FILE)
    if raw.lstrip()[:1] == b"<":
        raise DataError(
            f"{path} is not a {dataset} data file ({describe_start(raw)}): delete it and "
            f"download again or place the official {remote.name} there"
        )
    data = decompress(raw, path)
    content_hash = _sha256(data) if data is not raw else file_hash
    if remote.content_sha256 is not None and content_hash == remote.content_sha256:
        return VerifiedFile(remote, path, data, remote.stem, content_hash, VERIFIED_CONTENT)
    if data is not raw and remote.name == remote.stem and content_hash == remote.sha256:
        # a compressed copy of a file published uncompressed (NAME.gz beside NAME)
        return VerifiedFile(remote, path, data, remote.name, content_hash, VERIFIED_CONTENT)
    if not remote.verifiable:
        if path.name == remote.name and remote.size is not None and len(raw) != remote.size:
            raise DataError(
                f"{path} has {len(raw)} bytes but {dataset}'s {remote.name} has "
                f"{remote.size}: delete it and download again"
            )
        log.warning("%s: %s has no published checksum; accepted on size and format", dataset,
                    path)
        return VerifiedFile(remote, path, data, remote.name, file_hash, UNVERIFIED)
    expected = []
    if remote.sha256:
        expected.append(f"sha256 {remote.sha256}")
    if remote.content_sha256:
        expected.append(f"decompressed sha256 {remote.content_sha256}")
    actual = f"sha256 {file_hash}" + (
        f", decompressed sha256 {content_hash}" if data is not raw else ""
    )
    hint = ""
    if path.name != remote.name and remote.content_sha256 is None:
        hint = f" (a decompressed copy of {dataset} cannot be verified: keep the .gz file)"
    raise DataError(
        f"{path} does not match {dataset}'s published checksum for {remote.name} (expected "
        f"{' or '.join(expected)}; got {actual}){hint}: it is damaged, tampered with or a "
        f"different dataset; delete it (vaelab will download it again) or replace it with the "
        f"official file"
    )


def _find(remote: RemoteFile, directory: Path) -> Path | None:
    """The official name, the decompressed name, then a compressed copy beside it."""
    names = (remote.name, remote.stem, *(remote.stem + s for s in COMPRESSED_SUFFIXES))
    for name in dict.fromkeys(names):
        path = directory / name
        if path.is_file():
            return path
    return None


def _look(
    spec: DatasetSpec, needed: Sequence[RemoteFile], directory: Path, what: str
) -> dict[str, VerifiedFile] | None:
    """Verified files if ``directory`` holds all of ``needed``; otherwise log why not."""
    prefix = f"{spec.name}: looking in {directory} ({what}) ..."
    if not directory.is_dir():
        log.info("%s no such directory", prefix)
        return None
    paths = {remote.name: _find(remote, directory) for remote in needed}
    missing = [name for name, path in paths.items() if path is None]
    if len(missing) == len(needed):
        log.info("%s no %s files", prefix, spec.name)
        return None
    if missing:
        log.info("%s incomplete, missing %s", prefix, ", ".join(missing))
        return None
    files = {r.name: verify_file(r, paths[r.name], spec.name) for r in needed}  # type: ignore[arg-type]
    how = sorted({f.verified for f in files.values()})
    log.info("%s found (%s)", prefix, "; ".join(how))
    return files


def _data_dir_candidates(root: Path, name: str) -> list[Path]:
    return [root / name, root]


def resolve(
    spec: DatasetSpec, parts: Iterable[str], data_dir: str | os.PathLike | None = None
) -> Resolution:
    """Find, verify and if need be download the files of ``spec``'s official ``parts``.

    See the module docstring for the order. Raises :class:`DataError` for a refused file
    or when every mirror fails.
    """
    needed = [remote for part in parts for remote in spec.files_for(part)]
    if data_dir is None:
        log.info("%s: data_dir argument: not given", spec.name)
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not a directory: pass the folder that holds "
                            f"the {spec.name} files (or {spec.name}/ with them)")
        for directory in _data_dir_candidates(root, spec.name):
            if files := _look(spec, needed, directory, "data_dir argument"):
                return Resolution(files, directory, "data_dir argument")
    env = os.environ.get("VAELAB_DATA_DIR")
    if not env:
        log.info("%s: VAELAB_DATA_DIR: not set", spec.name)
    else:
        for directory in _data_dir_candidates(Path(env).expanduser(), spec.name):
            if files := _look(spec, needed, directory, "VAELAB_DATA_DIR"):
                return Resolution(files, directory, "VAELAB_DATA_DIR")
    cache = cache_dir() / spec.name
    if files := _look(spec, needed, cache, "user cache"):
        return Resolution(files, cache, "user cache")
    for root in system_data_dirs():
        directory = root / spec.name
        if files := _look(spec, needed, directory, "system directory"):
            return Resolution(files, directory, "system directory")
    return Resolution(_download(spec, needed, cache), cache, "download")


# -- downloads ---------------------------------------------------------------------------


class _CheckedDownloader:
    """A pooch downloader (HTTP via requests) that also rejects obviously wrong content.

    Runs inside pooch's temporary-file context: raising here deletes the temporary file.
    """

    def __init__(self, remote: RemoteFile, progressbar: bool) -> None:
        import pooch

        self.remote = remote
        self.http = pooch.HTTPDownloader(
            progressbar=progressbar, chunk_size=1 << 16, timeout=DOWNLOAD_TIMEOUT
        )

    def __call__(self, url: str, output_file: str, pooch_obj: object) -> None:
        self.http(url, output_file, pooch_obj)
        size = os.path.getsize(output_file)
        with open(output_file, "rb") as handle:
            head = handle.read(64)
        if head.lstrip()[:1] == b"<":
            raise DataError(f"the server sent an HTML page, not {self.remote.name} "
                            f"({describe_start(head)})")
        if self.remote.name.endswith(".gz") and not head.startswith(GZIP_MAGIC):
            raise DataError(f"not a gzip file ({describe_start(head)})")
        if self.remote.size is not None and size != self.remote.size:
            raise DataError(f"got {size} bytes, expected {self.remote.size} "
                            f"(interrupted transfer?)")


def _short_error(exc: BaseException) -> str:
    """A one-phrase description of a failed download attempt."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}".strip()
    if isinstance(exc, requests.Timeout):
        return f"timed out after {DOWNLOAD_TIMEOUT:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "transfer interrupted (connection closed before the end of the file)"
    if isinstance(exc, requests.ConnectionError):
        errno = re.search(r"\[Errno -?\d+\] [^'\")]*", text)
        return "connection failed" + (f" ({errno.group(0).strip()})" if errno else "")
    if match := re.search(r"does not match the known hash: expected \S+ but got (\w+)", text):
        return f"SHA-256 mismatch (got {match.group(1)})"
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Silence pooch's own INFO lines (vaelab logs each attempt itself)."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(
    spec: DatasetSpec, needed: Sequence[RemoteFile], cache: Path
) -> dict[str, VerifiedFile]:
    """Verify what the cache already holds and download the rest into it."""
    import pooch
    import requests

    mirrors = mirrors_for(spec)
    progressbar = sys.stderr.isatty()
    files: dict[str, VerifiedFile] = {}
    for remote in needed:
        if (path := _find(remote, cache)) is not None:
            files[remote.name] = verify_file(remote, path, spec.name)
            continue
        errors = []
        for base in mirrors:
            url = f"{base.rstrip('/')}/{remote.name}"
            known = f"sha256:{remote.sha256}" if remote.sha256 else None
            try:
                with _quiet_pooch():
                    pooch.retrieve(url, known_hash=known, fname=remote.name, path=cache,
                                   downloader=_CheckedDownloader(remote, progressbar))
            except (requests.RequestException, ValueError, OSError) as exc:
                errors.append(f"{url}: {_short_error(exc)}")
                log.info("%s: downloading %s from %s ... failed: %s", spec.name, remote.name,
                         url, _short_error(exc))
                continue
            log.info("%s: downloading %s from %s into %s ... done", spec.name, remote.name, url,
                     cache)
            files[remote.name] = verify_file(remote, cache / remote.name, spec.name)
            break
        else:
            raise DataError(_download_failure(spec, remote, needed, cache, errors))
    return files


def _download_failure(
    spec: DatasetSpec,
    remote: RemoteFile,
    needed: Sequence[RemoteFile],
    cache: Path,
    errors: list[str],
) -> str:
    tried = "; ".join(errors) if errors else "no mirrors configured"
    names = ", ".join(r.name for r in needed)
    return (
        f"could not download {spec.name} file {remote.name} from any mirror ({tried}). "
        f"On an offline machine copy {names} into {cache}/ (or into a folder passed as "
        f"data_dir / --data-dir, or named by VAELAB_DATA_DIR); other mirrors can be given "
        f"as {mirror_env_var(spec.name)}=URL1,URL2"
    )
