"""Faults: kill -9 at many moments, a full disk, a NaN, two writers; nothing lost or mixed.

Every training process here is a real ``python -m vaelab train`` subprocess. To kill at
exact moments without test hooks in the library, the children get a ``sitecustomize``
module (on ``PYTHONPATH``, active only when ``VAELAB_FAULT_EVENTS`` is set) that wraps
``os.fsync`` and ``os.replace``: it prints one ``@<phase> <file> <n>`` line per call
(``fsync``: the temporary file is written, not yet durable; ``replace``: durable, not yet
renamed over the target; ``committed``: renamed) and, at the call named by
``VAELAB_FAULT_PAUSE`` (``phase:file:n``), stops until killed or released. It changes no
number: the killed-and-resumed run is compared bitwise with a run that has no hooks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import poison_reconstruction
from vaelab import checkpoint, objectives, runs
from vaelab.cli import main

pytestmark = pytest.mark.usefixtures("fashion_available")

EPOCHS = 10


def train_flags(epochs: int = EPOCHS) -> list[str]:
    """A seconds-long run: 384 Fashion-MNIST images, 6 steps per epoch."""
    return [
        "--no-report", "--epochs", str(epochs), "--batch-size", "64", "--latent-dim", "4",
        "--seed", "0", "--set", "model.hidden=32", "--set", "data.train_limit=384",
        "--set", "data.validation_size=128", "--set", "train.eval_batch_size=128",
        # One thread: results do not depend on it; two threads on two busy cores are slow.
        "--set", "train.threads=1",
    ]


FLAGS = train_flags()
CHILD_TIMEOUT = 120.0  # seconds: the most any one child may take

SITECUSTOMIZE = textwrap.dedent(
    r'''
    import os, re, time

    if os.environ.get("VAELAB_FAULT_EVENTS"):
        _pause = os.environ.get("VAELAB_FAULT_PAUSE", "")
        _release = os.environ.get("VAELAB_FAULT_RELEASE", "")
        _counts = {}
        _real_replace, _real_fsync = os.replace, os.fsync

        def _key(path):
            name = os.path.basename(os.fspath(path)).lstrip(".")
            if name.endswith(".tmp"):  # .<target>.<random>.tmp
                name = name.rsplit(".", 2)[0]
            match = re.match(r"^(last|best)-.*\.safetensors$", name)
            if match:
                return match.group(1) + ".safetensors"
            if re.match(r"^epoch-\d+\.png$", name):
                return "samples.png"
            return name

        def _event(phase, path):
            key = _key(path)
            n = _counts[(phase, key)] = _counts.get((phase, key), 0) + 1
            print(f"@{phase} {key} {n}", flush=True)
            if f"{phase}:{key}:{n}" == _pause:
                print(f"@pause {os.fspath(path)}", flush=True)
                end = time.monotonic() + 300
                while time.monotonic() < end and not (_release and os.path.exists(_release)):
                    time.sleep(0.01)

        def replace(src, dst, *args, **kwargs):
            _event("replace", dst)
            result = _real_replace(src, dst, *args, **kwargs)
            _event("committed", dst)
            return result

        def fsync(fd):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if path.endswith(".tmp"):
                _event("fsync", path)
            return _real_fsync(fd)

        os.replace, os.fsync = replace, fsync
    '''
)

# Runs the command after lowering RLIMIT_FSIZE: writing past it fails with EFBIG (Python
# ignores SIGXFSZ), as a full disk fails with ENOSPC.
_WITH_FILE_SIZE_LIMIT = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class Child:
    """``python -m vaelab ARGS`` in ``cwd``; a thread collects its stdout lines."""

    def __init__(self, args: list[str], cwd: Path, hook_dir: Path | None = None,
                 env: dict[str, str] | None = None, file_size_limit: int | None = None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VAELAB_FAULT")}
        full_env["PYTHONUNBUFFERED"] = "1"
        if hook_dir is not None:
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
            full_env["VAELAB_FAULT_EVENTS"] = "1"
        full_env.update(env or {})
        command = [sys.executable, "-m", "vaelab", *args]
        if file_size_limit is not None:
            command = [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(file_size_limit),
                       *command[1:]]
        self.args = args
        self.stderr_file = (cwd / f"stderr-{time.monotonic_ns()}.txt").open("w+")
        self.proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = CHILD_TIMEOUT) -> str | None:
        """The first new stdout line starting with ``prefix``; None at timeout or exit."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self._queue.put(None)
                return None
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._drain()

    def finish(self, timeout: float = CHILD_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"vaelab {' '.join(self.args)} did not finish in {timeout} s")
        self._drain()
        return code

    def _drain(self) -> None:
        self._thread.join(timeout=30)
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        self._queue.put(None)

    @property
    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def last_event(self) -> str:
        """The last fsync/replace/commit the child reported before it was killed."""
        events = [line for line in self.lines
                  if line.startswith("@") and not line.startswith("@pause")]
        return events[-1] if events else "(none: still starting)"


# --------------------------------------------------------------------------- helpers


def _start_or_resume(run: Path) -> list[str]:
    """``--resume`` once the run has saved its config; the original command before that."""
    if (run / "config.toml").is_file():
        return ["train", "--resume", run.name, "--no-report"]
    return ["train", "--out", run.name, *FLAGS]


def _epoch(run: Path, name: str = "last") -> int:
    if not (run / "checkpoints" / f"{name}.json").is_file():
        return 0
    return checkpoint.read_meta(run / "checkpoints" / name)["train_state"]["epoch"]


def _tensors(run: Path, name: str) -> dict[str, torch.Tensor]:
    meta = checkpoint.read_meta(run / "checkpoints" / name)
    return load_file(run / "checkpoints" / meta["tensor_file"])


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # timing is the only thing allowed to differ
        row.pop("seconds")
        row.pop("examples_per_second")
    return rows


def _differences(run: Path, ref: Path) -> list[str]:
    """What differs between two finished runs (empty: bitwise identical)."""
    out = []
    for name in ("last", "best"):
        a, b = _tensors(run, name), _tensors(ref, name)
        if a.keys() != b.keys():
            out.append(f"{name}: tensor names differ: {sorted(a.keys() ^ b.keys())[:3]}")
            continue
        out += [f"{name}: {k} differs" for k in sorted(a) if not torch.equal(a[k], b[k])]
    if _metrics(run) != _metrics(ref):
        out.append("metrics.jsonl differs")
    return out


def _temp_files(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob(".*.tmp"))


def _tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line_error(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hooks")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


@pytest.fixture
def one_thread():
    """In-process runs with train.threads=1 change torch's global setting: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- kill -9

# Kill moments, in order, each in a fresh process on the same run directory. "pause": stop
# at that call (counted within the process) and kill there; "random": kill after a random
# delay (seconds), optionally counted from the first stdout line starting with "after".
# Random kills stop at the second last.json commit of their process at the latest (and are
# killed there if still alive), so each process advances at most one epoch and the run
# never reaches its final epoch before the final resume. Per epoch the trainer writes best,
# metrics.jsonl and the sample grid, then last (the resume point) last of all.
SCHEDULE = [
    {"kind": "random", "delay": (0.3, 2.5), "what": "start-up (imports, data, model)"},
    {"kind": "pause", "at": "fsync:config.toml:1", "what": "writing config.toml"},
    {"kind": "pause", "at": "replace:last.safetensors:1", "second writers": True,
     "what": "first checkpoint: tensor file durable, not yet renamed"},
    {"kind": "pause", "at": "fsync:last.json:1",
     "what": "first checkpoint: tensor file in place, JSON (commit point) being written"},
    {"kind": "random", "after": "@committed last.json 1", "delay": (0.0, 0.12),
     "what": "random moment after a checkpoint commit"},
    {"kind": "pause", "at": "replace:best.safetensors:1",
     "what": "best tensor file not yet renamed (this epoch's last not yet written)"},
    {"kind": "pause", "at": "replace:best.json:1", "what": "best JSON not yet renamed"},
    {"kind": "pause", "at": "fsync:metrics.jsonl:1", "what": "writing metrics.jsonl"},
    {"kind": "pause", "at": "replace:samples.png:1", "what": "writing the epoch sample grid"},
    {"kind": "random", "after": "epoch ", "delay": (0.0, 0.1),
     "what": "random moment after an epoch line"},
    {"kind": "random", "after": "@committed config.toml", "delay": (0.0, 0.15),
     "what": "random moment in the first epoch of a process"},
]


def _second_writers(run: Path, cwd: Path) -> dict:
    """While a paused process holds ``run``'s lock, try to write to it twice more: the
    same command in another process, and ``--resume`` in this (pytest's) process."""
    before = _tree(run)
    again = Child(["train", "--out", run.name, *FLAGS], cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        resumed = _resume_here(run)
    return {"same command": (again.finish(), again.stderr), "--resume": (resumed, err.getvalue()),
            "unchanged": _tree(run) == before}


def _kill_once(plan: dict, run: Path, cwd: Path, hook_dir: Path, rng: random.Random) -> dict:
    """Start (or resume) ``run``, kill it at the planned moment, check what survived."""
    before, temp_before = _epoch(run), set(_temp_files(run))
    pause = plan.get("at", "replace:last.json:2")  # random kills: at most one commit
    command = _start_or_resume(run)
    child = Child(command, cwd, hook_dir, {"VAELAB_FAULT_PAUSE": pause})
    try:
        if plan["kind"] == "pause":
            paused = child.wait_for("@pause")
            assert paused, f"never reached {pause}: {child.lines[-5:]} {child.stderr[-500:]}"
            if plan.get("second writers"):
                plan["second writers"] = _second_writers(run, cwd)
        else:
            if "after" in plan:
                assert child.wait_for(plan["after"]), (plan, child.lines[-5:], child.stderr)
            child.wait_for("@pause", timeout=rng.uniform(*plan["delay"]))
    finally:
        child.kill()
    commits = sum(line.startswith("@committed last.json") for line in child.lines)
    after = _epoch(run)
    record = {"what": plan["what"], "command": command[1], "last event": child.last_event(),
              "epoch before": before,
              "epoch after": after,
              "temp files left": sorted(set(_temp_files(run)) - temp_before)}
    # Nothing but the work since the last completed checkpoint is lost: every commit the
    # process finished is there (a random kill may land between a rename and its "@"
    # line), and the checkpoint verifies completely (sha256, tensors, config).
    if plan["kind"] == "pause":
        assert after == before + commits, record
        assert record["temp files left"], record  # the kill landed inside a write
    else:
        assert before + commits <= after <= before + commits + 1, record
    if after:
        for name in ("last", "best"):
            if (run / "checkpoints" / f"{name}.json").is_file():
                runs.open_run(run, name)
    return record


def _resume_here(run: Path) -> int:
    """``vaelab train --resume RUN`` in this process (no kill needed: saves a start-up)."""
    threads = torch.get_num_threads()
    try:
        return main(["train", "--resume", str(run), "--no-report"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, hook_dir):
    """A run killed at every moment of SCHEDULE, then resumed to the end, and a reference."""
    root = tmp_path_factory.mktemp("faults")
    reference = Child(["train", "--out", "ref", *FLAGS], root)  # no hooks, never killed
    rng = random.Random(20240611)
    run = root / "run"
    schedule = [dict(plan) for plan in SCHEDULE]
    try:
        records = [_kill_once(plan, run, root, hook_dir, rng) for plan in schedule]
        snapshot = root / "snapshot"
        shutil.copytree(run, snapshot)
        code = _resume_here(run)
        assert reference.finish() == 0, reference.stderr
    finally:
        reference.kill()
    writers = next(plan["second writers"] for plan in schedule if "second writers" in plan)
    return {"root": root, "run": run, "ref": root / "ref", "snapshot": snapshot,
            "records": records, "final_code": code, "second writers": writers}


def test_kill_9_at_many_moments_then_resume_gives_the_uninterrupted_run(killed_run):
    records = killed_run["records"]
    print("\n" + "\n".join(json.dumps(r) for r in records))
    assert killed_run["final_code"] == 0
    assert len(records) >= 10
    # the kills were spread over the run and several landed inside a write
    assert len({r["last event"] for r in records}) >= 8
    pauses = sum(plan["kind"] == "pause" for plan in SCHEDULE)
    assert sum(bool(r["temp files left"]) for r in records) >= pauses
    assert {r["epoch after"] for r in records} >= {0, 1, 2}
    # --resume of a run killed before its first checkpoint starts it again from epoch 0
    assert any(r["command"] == "--resume" and r["epoch before"] == 0 for r in records)
    run, ref = killed_run["run"], killed_run["ref"]
    assert _epoch(run) == EPOCHS
    assert _differences(run, ref) == []
    assert (run / "config.toml").read_bytes() == (ref / "config.toml").read_bytes()
    # stale tensor files and temporary checkpoint files of killed saves are gone
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    expected = sorted(["last.json", "best.json", checkpoint.read_meta(run / "checkpoints/last")[
        "tensor_file"], checkpoint.read_meta(run / "checkpoints/best")["tensor_file"]])
    assert names == expected


def test_kill_after_the_final_epochs_commit_keeps_best_and_metrics(killed_run, hook_dir):
    root = killed_run["root"]
    run = root / "final-kill"
    shutil.copytree(killed_run["snapshot"], run)
    remaining = EPOCHS - _epoch(run)
    child = Child(_start_or_resume(run), root, hook_dir,
                  {"VAELAB_FAULT_PAUSE": f"replace:best.safetensors:{remaining}"})
    try:
        assert child.wait_for("@pause"), child.stderr
    finally:
        child.kill()
    # best is written before last (the resume point), so the final epoch is not committed
    # yet; resuming re-runs it and rewrites best and the metrics bitwise
    assert _epoch(run) == EPOCHS - 1
    assert _resume_here(run) == 0
    assert _differences(run, killed_run["ref"]) == []


# --------------------------------------------------------------------------- full disk


def test_file_size_limit_during_a_checkpoint_write(killed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_run["snapshot"], run)
    epoch, temp_before = _epoch(run), _temp_files(run)
    before = _tree(run / "checkpoints")
    # 300 kB: best's tensor file (~210 kB) fits, last's (~620 kB, with Adam's moments) not
    child = Child(["train", "--resume", "run", "--no-report"], tmp_path,
                  file_size_limit=300_000)
    assert child.finish() == 2
    _one_line_error(child.stderr, "cannot write checkpoint", "File too large",
                    "previous checkpoint is unchanged", "free disk space")
    # best (written before last) may have advanced; last, the resume point, is untouched
    after = _tree(run / "checkpoints")
    assert {k: v for k, v in after.items() if k.startswith("last")} == {
        k: v for k, v in before.items() if k.startswith("last")}
    # no temp file of the failed write is left (stale checkpoint temps of earlier kills
    # may be cleaned up by the resumed run's first checkpoint write)
    assert set(_temp_files(run)) <= set(temp_before)
    assert runs.open_run(run, "last").meta["train_state"]["epoch"] == epoch
    # with space again, the run continues to exactly the uninterrupted result
    assert _resume_here(run) == 0
    assert _differences(run, killed_run["ref"]) == []


@pytest.mark.parametrize(("target", "code", "message"), [
    ("last.json", 2, "cannot write checkpoint"),
    ("metrics.jsonl", 1, "No space left on device"),
])
def test_no_space_left_is_one_line_and_keeps_the_checkpoint(
    killed_run, tmp_path, monkeypatch, capsys, one_thread, target, code, message
):
    run = tmp_path / "run"
    shutil.copytree(killed_run["snapshot"], run)
    epoch, temp_before = _epoch(run), _temp_files(run)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and f".{target}." in \
                os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["train", "--resume", str(run), "--no-report"]) == code
    monkeypatch.undo()
    err = capsys.readouterr().err
    _one_line_error(err, message, "free")
    # no temp file of the failed write is left (stale checkpoint temps of earlier kills
    # may be cleaned up by the resumed run's first checkpoint write)
    assert set(_temp_files(run)) <= set(temp_before)
    loaded = runs.open_run(run, "last").meta["train_state"]["epoch"]
    assert loaded == epoch  # metrics.jsonl is written before last, the resume point


# --------------------------------------------------------------------------- two writers


def test_a_second_writer_is_refused_and_the_first_run_is_untouched(killed_run):
    """Measured inside the kill chain: while a process (paused in its first checkpoint
    write) holds the run, two more writers start; the chain's end result is checked
    against the reference in the test above, so the first run was not disturbed."""
    writers = killed_run["second writers"]
    assert writers["unchanged"]  # every file of the run, byte for byte
    for code, stderr in (writers["same command"], writers["--resume"]):
        assert code == 2
        _one_line_error(stderr, "is in use by another vaelab process",
                        "wait for it to finish or choose another --out")


# --------------------------------------------------------------------------- NaN


def test_nan_mid_run_from_the_cli_then_resume_with_a_lower_lr(tmp_path, monkeypatch, capsys,
                                                              one_thread):
    """The CLI variant of tests/test_train.py::test_nan_guard_names_term_step_and_batch..."""
    # epoch 2 (6 steps per epoch), batch 1
    real = poison_reconstruction(monkeypatch, 6 + 2, slice(0, 3), float("inf"))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *train_flags(epochs=3)]) == 2
    _one_line_error(capsys.readouterr().err, "training diverged at step 7 (epoch 2, batch 1)",
                    "reconstruction term is NaN/Inf for 3 of 64 examples",
                    f"vaelab train --resume {run} --set train.lr=1e-4")
    assert _epoch(run) == 1  # last is the last good state
    runs.open_run(run, "last")
    monkeypatch.setattr(objectives, "elbo_terms", real)
    assert main(["train", "--resume", str(run), "--no-report", "--set", "train.lr=1e-4"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["lr"] for r in rows] == [1e-3, 1e-4,
                                                                                   1e-4]


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    # A shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "train", *train_flags(200),
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not (run / "checkpoints" / "last.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("vaelab: interrupted; the last checkpoint is "
                           f"{run / 'checkpoints' / 'last'} (epoch "), line
    assert line.endswith(f"resume with vaelab train --resume {run}")
    assert "Traceback" not in err
