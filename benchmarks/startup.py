"""Benchmark: wall time of CLI commands that should not wait for heavy imports.

Each command runs ``--repeats`` times (default 7) as a fresh process; the median wall
time (``time.perf_counter`` around ``subprocess.run``) is quoted. For context the same is
done for ``python -c pass`` (interpreter start) and ``python -c "import torch"`` (the cost
a command pays when it imports torch). ``imports_torch`` says whether the command loaded
torch, checked once by running the same arguments in-process
(``vaelab.cli.main(args)``, then ``"torch" in sys.modules``).

Commands: ``vaelab --help`` and ``vaelab audit --recon bce --recon-reduction mean
--latent-dim 2`` (the Keras-blog loss: mean BCE over pixels plus summed KL).

Run: ``python benchmarks/startup.py [--repeats 7]``; writes ``benchmarks/results/startup.json``.
``--smoke`` (CI): 1 repetition.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

__all__ = ["COMMANDS", "vaelab_command", "wall_time", "imports_torch", "main"]

#: name -> arguments after ``vaelab``.
COMMANDS: dict[str, list[str]] = {
    "vaelab --help": ["--help"],
    "vaelab audit": ["audit", "--recon", "bce", "--recon-reduction", "mean", "--latent-dim", "2"],
}

#: Target from issue 5.
HELP_TARGET_SECONDS = 0.5


def vaelab_command() -> list[str]:
    """The installed console script, or ``python -m vaelab`` when it is not on PATH."""
    script = shutil.which("vaelab")
    return [script] if script else [sys.executable, "-m", "vaelab"]


def wall_time(cmd: list[str], repeats: int) -> dict[str, Any]:
    """Median wall time of ``cmd`` as a fresh process (output discarded; must exit 0)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seconds.append(time.perf_counter() - started)
    return common.summarize(seconds)


def imports_torch(args: list[str]) -> bool:
    """Whether ``vaelab <args>`` imports torch (run in-process in a fresh interpreter)."""
    code = (
        "import sys, contextlib, io\n"
        "from vaelab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({args!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0], "startup")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 7)
    monitor = common.CpuMonitor()
    base = vaelab_command()
    commands: dict[str, Any] = {}
    for name, cmd_args in COMMANDS.items():
        if not args.smoke:
            wall_time(base + cmd_args, 1)  # warm the file cache
        commands[name] = {"argv": ["vaelab", *cmd_args], **wall_time(base + cmd_args, repeats),
                          "imports_torch": imports_torch(cmd_args)}
    reference = {
        "python -c pass": wall_time([sys.executable, "-c", "pass"], repeats),
        "python -c 'import torch'": wall_time([sys.executable, "-c", "import torch"], repeats),
    }
    help_seconds = commands["vaelab --help"]["seconds"]
    result = {
        "benchmark": "startup",
        "smoke": args.smoke,
        "repeats": repeats,
        "console_script": base[0],
        "commands": commands,
        "reference": reference,
        "help_target_seconds": HELP_TARGET_SECONDS,
        "help_meets_target": help_seconds < HELP_TARGET_SECONDS,
        "machine": common.machine(),
        "cpu_load": monitor.report(),
    }
    common.write_result(result, args.out, "startup", args.smoke, note=args.note)
    return result


if __name__ == "__main__":
    main()
