"""Folders of images a user brings: listing, labels from sub-folders, parallel decoding, cache.

Layout (as torchvision's ``ImageFolder``):

- when the folder's top level holds sub-folders and no images, each sub-folder is a class:
  label = index of its name in sorted order (Python string order), names kept in
  ``metadata["classes"]``; each class folder is searched recursively, and one with no
  images is an error (the labels of the others would shift);
- otherwise every image under the folder, searched recursively, is read, unlabelled.

Images are the suffixes of :data:`vaelab.data.images.IMAGE_FORMATS` (case-insensitive),
read in sorted order of their relative paths. Other files are skipped and counted in one
warning; hidden entries (names starting with ``.``, e.g. ``.DS_Store``, ``.git`` or macOS
``._x.jpg`` resource forks) are skipped too, counted only in ``metadata["skipped"]``. Symbolic links are followed; a link loop, a folder reached
twice or a broken link is an error naming it.

Decoding (:mod:`vaelab.data.images`) runs in one thread with a progress display for long
reads: 50,000 32x32 PNGs take 10-25 s on the shared 2-core machine. A thread pool was
measured and dropped: with 4 threads it was 15-70% slower there (32x32 PNGs: 340 vs
200-250 us per image; 1024x768 JPEGs resized to 64: 9.3-9.8 vs 7.0-7.7 ms), because for
small images most of the time is Python in Pillow's ``open`` (under the GIL) and a busy
machine has no idle core for big ones. All images must have one size unless
``image_size`` is given. Colour:
``channels="auto"`` gives RGB when any image is colour (grey ones repeated into three
channels, with a note) and grey otherwise; ``1`` or ``3`` force it.

The decoded array is cached (:mod:`vaelab.data.cache`); the entry is written only when the
caller calls :attr:`FolderRead.save_cache`, i.e. once everything downstream accepted the
data, so a refused input leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError
from .cache import cache_key, entry_path, read_entry, write_entry
from .files import UserData
from .images import (
    IMAGE_FORMATS,
    REDUCING_GAP,
    RESAMPLING,
    Decoded,
    decode_image,
    format_size,
    rgb_to_grey,
)
from .progress import Progress

__all__ = ["CHUNK", "ImageFile", "FolderListing", "FolderRead", "list_image_folder",
           "read_image_folder"]

log = logging.getLogger("vaelab.data")

CHUNK = 256
"""Files decoded between two progress updates."""


class ImageFile(NamedTuple):
    """One image file of a folder: where it is and what identifies its content. (A tuple of
    plain strings and ints: 50,000 ``Path`` or dataclass objects cost a good part of a
    second, which the cached read cannot afford.)"""

    path: str
    relative: str
    image_format: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FolderListing:
    """The image files of a folder in reading order, their labels and what was skipped."""

    root: Path
    files: tuple[ImageFile, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class FolderRead:
    """A decoded folder, and how to cache it once the caller has accepted it.

    ``save_cache()`` writes the cache entry (a no-op when the data came from the cache or
    caching is off) and returns whether an entry was written.
    """

    data: UserData
    save_cache: Callable[[], bool]


# --------------------------------------------------------------------------- listing


def _describe_skipped(skipped: dict[str, int]) -> str:
    parts = [f"{name}: {count}" for name, count in sorted(skipped.items(),
                                                         key=lambda kv: (-kv[1], kv[0]))]
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


_Entry = tuple[str, str, str, "os.stat_result | None"]


def _entry_error(path: str, exc: OSError, is_link: bool) -> DataError:
    if is_link and exc.errno == errno.ELOOP:
        return DataError(f"{path} is a symbolic link loop (it leads back to itself): remove the "
                         f"link")
    if is_link:
        return DataError(f"{path} is a broken symbolic link (to {os.readlink(path)}): remove it "
                         f"or fix its target")
    return DataError(f"{path} cannot be read ({exc.strerror or exc}): check its permissions")


def _list_dir(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(f"{directory} cannot be listed ({exc.strerror or exc}): check that it "
                        f"exists and that you may read it") from None


def _scan(directory: str) -> list[_Entry]:
    """Entries of ``directory`` sorted by name, as ``(name, path, kind, stat)``, kind in
    ``dir``, ``file``, ``hidden``, ``other``; symbolic links are followed and a broken or
    looping one is an error."""
    out: list[_Entry] = []
    for entry in sorted(_list_dir(directory), key=lambda e: e.name):
        if entry.name.startswith("."):
            out.append((entry.name, entry.path, "hidden", None))
            continue
        try:
            info = entry.stat()  # follows symbolic links
        except OSError as exc:
            raise _entry_error(entry.path, exc, entry.is_symlink()) from None
        kind = ("dir" if stat.S_ISDIR(info.st_mode) else
                "file" if stat.S_ISREG(info.st_mode) else "other")
        out.append((entry.name, entry.path, kind, info))
    return out


def _suffix(name: str) -> str:
    """``"a.PNG"`` -> ``".png"``; ``""`` without a dot (hidden names are skipped earlier)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _key(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _walk(start: str, prefix: str, seen: dict[tuple[int, int], str], skipped: Counter,
          parents: tuple[tuple[int, int], ...] = ()) -> list[ImageFile]:
    """Every image under ``start`` (recursively), sorted by relative path; relative paths
    begin with ``prefix``; ``parents`` are the (device, inode) keys of the folders above
    ``start``. The inner loop is kept lean: it runs once per file."""
    key = _key(os.stat(start))
    seen.setdefault(key, start)
    stack: list[tuple[str, str, tuple[tuple[int, int], ...]]] = [(start, prefix, (*parents, key))]
    files: list[ImageFile] = []
    formats = IMAGE_FORMATS
    is_reg, is_dir = stat.S_ISREG, stat.S_ISDIR
    while stack:
        directory, relative, ancestors = stack.pop()
        folders_here = []
        for entry in _list_dir(directory):
            name = entry.name
            if name[0] == ".":
                skipped["hidden"] += 1
                continue
            try:
                info = entry.stat()  # follows symbolic links
            except OSError as exc:
                raise _entry_error(entry.path, exc, entry.is_symlink()) from None
            mode = info.st_mode
            if is_reg(mode):
                suffix = _suffix(name)
                image_format = formats.get(suffix)
                if image_format is None:
                    skipped[suffix or "no suffix"] += 1
                else:
                    files.append(ImageFile(entry.path, relative + name, image_format,
                                           info.st_size, info.st_mtime_ns))
            elif is_dir(mode):
                folders_here.append((name, entry.path, _key(info)))
            else:
                skipped["not a regular file"] += 1
        for name, path, key in sorted(folders_here):
            if key in ancestors:
                raise DataError(f"{path} is a symbolic link back to {seen[key]}, a folder that "
                                f"contains it (a loop): remove the link")
            if key in seen:
                raise DataError(f"{path} and {seen[key]} are the same folder (a symbolic link), "
                                f"so its images would be read twice: remove one")
            seen[key] = path
            stack.append((path, f"{relative}{name}/", (*ancestors, key)))
    files.sort(key=itemgetter(1))
    return files


def list_image_folder(folder: str | Path) -> FolderListing:
    """List the images of ``folder`` (see the module docstring for the layout).

    Raises:
        DataError: no images, an empty class folder, a link loop, a broken link or an
            unreadable folder.
    """
    root = Path(folder)
    top = _scan(str(root))
    skipped: Counter = Counter()
    seen: dict[tuple[int, int], str] = {}
    class_dirs = [(name, path) for name, path, kind, _ in top if kind == "dir"]
    has_images = any(kind == "file" and _suffix(name) in IMAGE_FORMATS
                     for name, _, kind, _ in top)
    if has_images or not class_dirs:
        files = _walk(str(root), "", seen, skipped)
        if not files:
            known = ", ".join(dict.fromkeys(IMAGE_FORMATS))
            other = f"; skipped {_describe_skipped(skipped)}" if skipped else ""
            raise DataError(f"{root} holds no images ({known}), directly or in sub-folders"
                            f"{other}: put the images there or give the folder that holds them")
        if class_dirs:
            log.info("%s: no labels (the top level holds images, so its sub-folders are not "
                     "classes)", root)
        return FolderListing(root, tuple(files), None, None, dict(skipped))
    root_key = _key(os.stat(root))
    seen[root_key] = str(root)
    for name, _, kind, _ in top:
        if kind == "hidden":
            skipped["hidden"] += 1
        elif kind == "other":
            skipped["not a regular file"] += 1
        elif kind == "file":
            skipped[_suffix(name) or "no suffix"] += 1
    files, labels = [], []
    for label, (name, path) in enumerate(class_dirs):
        key = _key(os.stat(path))
        if key in seen:
            raise DataError(f"{path} and {seen[key]} are the same folder (a symbolic link), so "
                            f"its images would be read twice: remove one")
        class_files = _walk(path, f"{name}/", seen, skipped, (root_key,))
        if not class_files:
            raise DataError(f"class folder {path} holds no images (each sub-folder of {root} "
                            f"is a class): add images to it or remove it")
        files += class_files
        labels += [label] * len(class_files)
    return FolderListing(root, tuple(files), tuple(labels),
                         tuple(name for name, _ in class_dirs), dict(skipped))


# --------------------------------------------------------------------------- decoding


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}): check its "
                        f"permissions") from None


def _size_error(root: Path, first: ImageFile, first_size: tuple[int, int], other: ImageFile,
                other_size: tuple[int, int]) -> DataError:
    return DataError(
        f"{root}: images differ in size: {first.relative} is {format_size(first_size)} but "
        f"{other.relative} is {format_size(other_size)} (height x width): pass --image-size "
        f"N or HxW (data.image_size) to resize them (shorter side, then centre crop)"
    )


def _decode_chunk(files: tuple[ImageFile, ...], size: tuple[int, int] | None,
                  reference: tuple[ImageFile, tuple[int, int]] | None,
                  root: Path) -> list[tuple[Decoded, str]]:
    out = []
    for image_file in files:
        data = _read_bytes(image_file.path)
        decoded = decode_image(data, image_file.path, image_file.image_format, size)
        if reference is not None and decoded.original_size != reference[1]:
            raise _size_error(root, reference[0], reference[1], image_file,
                              decoded.original_size)
        out.append((decoded, hashlib.sha256(data).hexdigest()))
    return out


def _decode_all(listing: FolderListing, size: tuple[int, int] | None,
                progress: bool) -> list[tuple[Decoded, str]]:
    """Decode every file in order (see the module docstring for why in one thread)."""
    files = listing.files
    results = _decode_chunk(files[:1], size, None, listing.root)
    reference = None if size is not None else (files[0], results[0][0].original_size)
    with Progress(len(files), f"reading {listing.root}", enabled=progress) as bar:
        bar.update(1)
        for start in range(1, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            results += _decode_chunk(chunk, size, reference, listing.root)
            bar.update(len(chunk))
    return results


def _assemble(decoded: list[Decoded], channels: str | int) -> tuple[np.ndarray, int, int]:
    """Stack into uint8 ``(N, C, H, W)``; return it, the number of grey and of colour images."""
    colour = sum(1 for d in decoded if d.pixels.ndim == 3)
    grey = len(decoded) - colour
    c = 3 if channels == 3 or (channels == "auto" and colour) else 1
    height, width = decoded[0].pixels.shape[:2]
    images = np.empty((len(decoded), c, height, width), dtype=np.uint8)
    for i, d in enumerate(decoded):
        pixels = d.pixels
        if pixels.ndim == 2:
            images[i] = pixels
        elif c == 3:
            images[i] = pixels.transpose(2, 0, 1)
        else:
            images[i] = rgb_to_grey(pixels.transpose(2, 0, 1)[None])[0]
    return images, grey, colour


_NOTE_TEXT = {
    "alpha dropped": ("images had an alpha channel (transparency), dropped: the colour "
                      "under transparent pixels is kept as stored (composite them onto a "
                      "background first if that matters)"),
    "animated": "images are animated: only their first frame is read",
    "rotated": "images were turned upright as their EXIF orientation says",
    "upscaled": "images are smaller than image_size and were enlarged",
}


def _notes(root: Path, files: tuple[ImageFile, ...], decoded: list[Decoded], grey: int,
           colour: int, channels: str | int, skipped: dict[str, int]) -> list[str]:
    """The warnings about this folder (shown on every read, from the cache too)."""
    counts: Counter = Counter()
    example: dict[str, str] = {}
    for image_file, d in zip(files, decoded):
        for note in d.notes:
            counts[note] += 1
            example.setdefault(note, image_file.relative)
    lines = []
    shown = {kind: count for kind, count in skipped.items() if kind != "hidden"}
    if shown:  # hidden entries (.DS_Store, ._x.jpg, .git) are expected: metadata only
        lines.append(f"{root}: skipped {sum(shown.values())} files that are not images "
                     f"({_describe_skipped(shown)})")
    for note, text in _NOTE_TEXT.items():
        if counts[note]:
            lines.append(f"{root}: {counts[note]} {text}, e.g. {example[note]}")
    if channels == "auto" and grey and colour:
        lines.append(f"{root}: {grey} grey and {colour} colour images: the grey ones are "
                     f"repeated into 3 channels (channels=auto picks colour when any image is "
                     f"colour); set data.channels=1 to read them all as grey")
    return lines


def _decode_folder(listing: FolderListing, size: tuple[int, int] | None,
                   channels: str | int, progress: bool) -> tuple[UserData, list[str]]:
    results = _decode_all(listing, size, progress)
    decoded = [d for d, _ in results]
    images, grey, colour = _assemble(decoded, channels)
    digest = hashlib.sha256()
    for image_file, (_, sha) in zip(listing.files, results):
        digest.update(f"{image_file.relative}\0{sha}\n".encode())
    conversions: Counter = Counter(note for d in decoded for note in d.notes)
    original_sizes = Counter(format_size(d.original_size) for d in decoded)
    metadata: dict[str, Any] = {
        "source": "image folder",
        "path": str(listing.root.resolve()),
        "num_files": len(listing.files),
        "formats": dict(Counter(f.image_format for f in listing.files)),
        "skipped": dict(listing.skipped),
        "labels": "class sub-folders (sorted names)" if listing.classes else None,
        "channels": {"requested": channels, "chosen": int(images.shape[1]),
                     "grey_images": grey, "colour_images": colour},
        "image_size": {
            "requested": list(size) if size else None,
            "resizing": (f"{RESAMPLING} with reducing_gap={REDUCING_GAP}: shorter side to "
                         f"the target, centre crop" if size else None),
            "original_sizes": dict(original_sizes.most_common(5)),
            "distinct_original_sizes": len(original_sizes),
        },
        "conversions": dict(conversions),
        "checksum": "sha256 over sorted 'relative path\\0sha256\\n' lines",
    }
    if listing.classes is not None:
        metadata["classes"] = list(listing.classes)
    labels = (np.asarray(listing.labels, dtype=np.int64) if listing.labels is not None
              else None)
    data = UserData(images, labels, 256, {listing.root.name + "/": digest.hexdigest()},
                    metadata)
    notes = _notes(listing.root, listing.files, decoded, grey, colour, channels,
                   listing.skipped)
    return data, notes


def read_image_folder(
    folder: str | Path,
    image_size: tuple[int, int] | None = None,
    channels: str | int = "auto",
    *,
    cache_root: Path | None = None,
    progress: bool = True,
) -> FolderRead:
    """Read a folder of images into uint8 ``(N, C, H, W)`` (see the module docstring).

    Args:
        folder: the folder.
        image_size: ``(H, W)`` to resize every image to, or None (then all images must
            share one size).
        channels: ``"auto"``, 1 or 3.
        cache_root: directory of the decoded-image cache, or None for no cache.
        progress: show progress while decoding (only if it takes over a second).

    Returns:
        A :class:`FolderRead`; call its ``save_cache()`` once the data is accepted.

    Raises:
        DataError: no images, unreadable or corrupt images, images of different sizes
            without ``image_size``, link loops; the message names the file and the fix.
    """
    root = Path(folder)
    listing = list_image_folder(root)
    options = {"image_size": list(image_size) if image_size else None, "channels": channels}
    key = path = None
    if cache_root is not None:
        key = cache_key(root, options, ((f.relative, f.size, f.mtime_ns) for f in listing.files))
        path = entry_path(cache_root, root, options)
        hit = read_entry(path, key)
        if hit is not None:
            record = hit.record
            for line in record["notes"]:
                log.warning("%s", line)
            metadata = {**record["metadata"], "cache": {"path": str(path), "hit": True}}
            log.info("%s: %d images read from the cache %s", root, len(hit.images), path)
            data = UserData(hit.images, hit.labels, 256, record["checksums"], metadata)
            return FolderRead(data, lambda: False)
    data, notes = _decode_folder(listing, image_size, channels, progress)
    for line in notes:
        log.warning("%s", line)
    if key is None or path is None:
        data.metadata["cache"] = None
        return FolderRead(data, lambda: False)
    data.metadata["cache"] = {"path": str(path), "hit": False}
    record = {"metadata": {k: v for k, v in data.metadata.items() if k != "cache"},
              "checksums": data.checksums, "notes": notes}
    entry, entry_key = path, key

    def save() -> bool:
        return write_entry(entry, entry_key, data.images, data.labels, record)

    return FolderRead(data, save)
