"""Every command in the README and the manual (docs/*.md) must run as written.

The fenced blocks are extracted: ``sh`` blocks line by line, ``python`` blocks, ``toml``
blocks (and the README's indented install commands). For each ``vaelab ...`` command,
vaelab's own argument parser must accept it, and the config it describes must resolve:
every flag, preset, config key and value it names exists (``--preset X --set k=v`` is
resolved as ``vaelab train`` would). ``python benchmarks/X.py`` commands must name a script
whose ``--help`` lists their flags. Python blocks must compile and every ``vaelab`` name
they import must exist; blocks marked ``python run`` are executed, and so are the cheap
commands (``--help``, ``--preset list``, the audit of a preset or of flags).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from vaelab import cli, config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(info string, body)`` of every fenced block, the README's indented commands, and
    the commands written as inline code in prose and tables (``sh``)."""
    text = page.read_text(encoding="utf-8")
    found = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    indented = re.findall(r"^    (\S.*)$", prose, re.M)
    found += [("sh", line + "\n") for line in indented if "vaelab" in line or "pytest" in line]
    inline = re.findall(r"`((?:vaelab|python3? benchmarks/)[^`]*)`", prose)
    found += [("sh", " ".join(span.split()) + "\n") for span in inline
              if len(span.split()) > 2 or span.startswith("python")]  # not "vaelab eval"
    return found


def shell_lines(body: str) -> list[str]:
    """Logical lines (``\\`` continuations joined), comments and prompts removed; in a
    block with ``$`` prompts (a command and its output) only the prompted lines."""
    prompted = any(raw.startswith("$ ") for raw in body.splitlines())
    out, current = [], ""
    for raw in body.splitlines():
        if prompted and not raw.startswith("$ ") and not current:
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        line = (current + line).strip()
        current = ""
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


#: Placeholders for numbers in the docs' commands (``--bdmc N``), read as 1.
NUMBER_PLACEHOLDERS = {"N", "K", "T", "C", "LR", "B"}


def vaelab_argv(line: str) -> list[str] | None:
    """The arguments after ``vaelab`` in a shell line (any launcher), or None; number
    placeholders become 1."""
    for part in re.split(r"&&|;", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word in ("vaelab", "$(which", "$(pyenv") or word.endswith("/vaelab"):
                rest = words[i + 1:]
                if word.startswith("$("):
                    rest = rest[1:]  # "vaelab)"
                if rest and not rest[0].startswith("[") and rest[0] not in ("-e", "."):
                    return ["1" if w in NUMBER_PLACEHOLDERS else w for w in rest]
    return None


COMMANDS = sorted({(page.name, line) for page in PAGES for info, body in blocks(page)
                   if info.split()[:1] in (["sh"], ["text"]) for line in shell_lines(body)
                   if vaelab_argv(line) is not None
                   and (info == "sh" or line.startswith("vaelab "))})
PYTHON = [(page.name, info, body) for page in PAGES for info, body in blocks(page)
          if info.split()[:1] == ["python"]]
TOML = [(page.name, body) for page in PAGES for info, body in blocks(page) if info == "toml"]
BENCH = sorted({(page.name, line) for page in PAGES for info, body in blocks(page)
                if info.split()[:1] == ["sh"] for line in shell_lines(body)
                if re.match(r"python3? benchmarks/", line)})


def test_the_manual_has_its_pages_and_commands():
    names = {p.name for p in PAGES}
    assert {"cli.md", "data.md", "audit.md", "estimators.md", "reproductions.md",
            "performance.md", "reliability.md", "distributed.md", "design.md"} <= names
    assert len(COMMANDS) >= 30 and len(PYTHON) >= 4 and BENCH
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 260, f"the README is {len(readme)} lines: move detail to docs/"
    for page in names - {"README.md"}:
        assert f"docs/{page}" in "\n".join(readme), f"the README does not link docs/{page}"


def _placeholder(word: str) -> bool:
    return word.isupper() or word in ("...", "FILE.py:FUNCTION")


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{line[:60]}" for p, line in COMMANDS])
def test_every_vaelab_command_parses_and_its_config_resolves(page, line):
    argv = vaelab_argv(line)
    if "|" in argv or any(w.startswith("[") for w in argv) or "..." in argv:
        pytest.skip("a usage synopsis, not a command")
    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if argv in (["--help"], ["--version"]) or argv[-1:] == ["--help"]:
            return
        raise AssertionError(f"{page}: vaelab {' '.join(argv)}: rejected by the parser") from exc
    if args.command == "train" and args.preset != "list":
        flags = cli._train_flags(args)
        if args.resume:
            config.from_dict(config.merge(flags, *[config.parse_override(o) for o in args.set]))
        else:
            file = args.config if args.config and Path(args.config).is_file() else None
            config.resolve(preset=args.preset, file=file, overrides=args.set, extra=flags)
    elif args.command == "eval":
        config.from_dict(cli._eval_layer(args))
    elif args.command == "audit" and args.preset and args.preset != "list" \
            and not _placeholder(args.preset):
        from vaelab.audit.presets import LOSS_PRESETS

        assert args.preset in LOSS_PRESETS, f"{page}: unknown audit preset {args.preset}"


#: Commands cheap enough to run here as written (no training, no data).
CHEAP = ("--help", "train --preset list", "audit --preset", "audit --recon")


@pytest.mark.parametrize("page, line", [(p, line) for p, line in COMMANDS
                                        if " ".join(vaelab_argv(line)).startswith(CHEAP)
                                        and not any(map(_placeholder, vaelab_argv(line)))],
                         ids=lambda v: v if isinstance(v, str) and v.endswith(".md") else None)
def test_the_cheap_commands_run(page, line, capsys):
    argv = vaelab_argv(line)
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        return
    assert cli.main(argv) == 0, capsys.readouterr().err


#: Runs each script given as an argument with ``--help`` as its ``__main__`` in this one
#: process (torch is imported once, not once per script) and prints ``{script: help}``.
_HELPS = """
import contextlib, io, json, runpy, sys
helps = {}
for script in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
    helps[script] = out.getvalue()
print(json.dumps(helps))
"""


@cache
def _helps() -> dict[str, str]:
    """``--help`` of every benchmark script the docs name, from one child process."""
    scripts = sorted({shlex.split(line)[1] for _, line in BENCH
                      if (ROOT / shlex.split(line)[1]).is_file()})
    out = subprocess.run([sys.executable, "-c", _HELPS, *scripts], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-500:]
    return json.loads(out.stdout)


def _help(script: str) -> str:
    return _helps()[script]


@pytest.mark.parametrize("page, line", BENCH, ids=[f"{p}:{line[:50]}" for p, line in BENCH])
def test_every_benchmark_command_names_a_script_and_its_flags(page, line):
    words = shlex.split(line)
    script = words[1]
    assert (ROOT / script).is_file(), f"{page}: {script} does not exist"
    text = _help(script)
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in text, f"{page}: {script} has no flag {word}"


@pytest.mark.parametrize("page, info, body", PYTHON, ids=[p for p, _, _ in PYTHON])
def test_every_python_block_compiles_and_names_what_exists(page, info, body, tmp_path,
                                                          monkeypatch):
    tree = ast.parse(body)
    imported: dict[str, object] = {}  # names the block binds to vaelab modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vaelab"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    module = importlib.import_module(f"{node.module}.{alias.name}")
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):  # module.name.name chains on those names must exist
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in imported and chain:
            target = imported[node.id]
            for attr in reversed(chain):
                if not hasattr(type(target), "__module__") or not str(
                        getattr(target, "__name__", "")).startswith("vaelab"):
                    break  # a value, not a module or class of vaelab: stop checking
                assert hasattr(target, attr), f"{page}: {node.id}.{'.'.join(reversed(chain))}"
                target = getattr(target, attr)
    if info.split()[1:2] == ["run"]:
        monkeypatch.chdir(tmp_path)
        exec(compile(tree, page, "exec"), {"__name__": "docs"})


@pytest.mark.parametrize("page, body", TOML, ids=[p for p, _ in TOML])
def test_every_toml_block_is_a_valid_config(page, body):
    config.from_dict(config.tomllib.loads(body))
