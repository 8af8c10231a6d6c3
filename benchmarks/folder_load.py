"""Benchmark: reading a folder of images, without and with the decoded-image cache.

Generates (once) a folder of ``--images`` (default 50,000) 32x32 RGB PNGs in 10 class
sub-folders under ``--folder`` (default ``/tmp/vaelab-folder-bench``; never inside the
repository), then times ``vaelab.data.load(folder, split="all")`` in fresh processes:

- ``decode``: no cache entry (the entry is deleted first): list, read, decode, assemble,
  and write the cache entry;
- ``cached``: the entry written by the previous run: list, check sizes and mtimes, read
  the entry and verify its SHA-256.

Each repetition is one ``decode`` run followed by one ``cached`` run; the medians of
``--repeats`` (default 3) repetitions are quoted, with the load average. The files are in
the page cache after generation (a cold disk would add its read time to ``decode``).
Issue 12's targets: decode under 30 s, cached under 2 s, on the 2-core CPU.

Run: ``python benchmarks/folder_load.py [--images 50000] [--repeats 3]``; writes
``benchmarks/results/folder_load.json``. ``--smoke``: 300 images, 1 repetition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["make_folder", "timed_load", "main"]

TARGET_DECODE_SECONDS = 30.0
TARGET_CACHED_SECONDS = 2.0

_CHILD = """
import json, sys, time
from vaelab.data import load
started = time.perf_counter()
data = load(sys.argv[1], split="all", cache_dir=sys.argv[2], progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "shape": list(data.images.shape),
                  "cache_hit": data.metadata["cache"]["hit"]}))
"""


def make_folder(folder: Path, images: int, seed: int = 0) -> None:
    """Write ``images`` 32x32 RGB PNGs (a smooth random base plus noise, about 3 KB each, as
    small photos compress) into ``folder/class<k>/<i>.png``, unless already there."""
    import numpy as np
    from PIL import Image

    marker = folder / f".complete-{images}-{seed}"
    if marker.is_file():
        return
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8) // 2
    for i in range(images):
        directory = folder / f"class{i % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        pixels = bases[i % 64] + rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i:06d}.png")
    marker.write_text("")


def timed_load(folder: Path, cache: Path) -> dict[str, Any]:
    """Run one ``load`` in a fresh interpreter; its in-process seconds and cache hit."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(cache)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "folder_load")
    parser.add_argument("--images", type=int, default=None, help="default 50000, smoke 300")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where to generate the images (default /tmp/vaelab-folder-bench)")
    args = parser.parse_args(argv)
    images = args.images or (300 if args.smoke else 50_000)
    repeats = args.repeats or (1 if args.smoke else 3)
    folder = args.folder or Path(tempfile.gettempdir()) / "vaelab-folder-bench" / str(images)
    make_folder(folder, images)
    cache = Path(tempfile.mkdtemp(prefix="vaelab-folder-cache-"))
    monitor = common.CpuMonitor()
    decode, cached = [], []
    try:
        for _ in range(repeats):
            shutil.rmtree(cache)
            cache.mkdir()
            first = timed_load(folder, cache)
            second = timed_load(folder, cache)
            if first["cache_hit"] or not second["cache_hit"]:
                raise RuntimeError(f"unexpected cache use: {first}, {second}")
            decode.append(first["seconds"])
            cached.append(second["seconds"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {
        "benchmark": "folder_load",
        "images": images,
        "image": "32x32 RGB PNG, 10 class folders",
        "shape": first["shape"],
        "decode": common.summarize(decode, images),
        "cached": common.summarize(cached, images),
        "targets_seconds": {"decode": TARGET_DECODE_SECONDS, "cached": TARGET_CACHED_SECONDS},
        "cpu_load": monitor.report(),
        "machine": common.machine(),
        "source": common.source_digest(),
    }
    common.write_result(result, args.out, "folder_load", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
