r"""How many CPU threads torch should use, decided before torch is imported (torch-free).

Several trainings on one machine (a sweep, two seeds, a training beside an evaluation)
collapse with torch's defaults: every process starts one OpenMP thread per core, and the
threads spin while they wait for each other, so two runs on two cores did less than half
the work of one (issue 17). This module chooses the intra-op thread count, and whether
OpenMP threads sleep instead of spinning when idle, from the cores that are free.

The rule (:func:`choose`), in order of precedence:

1. ``train.threads`` (``threads=``) when given;
2. else ``OMP_NUM_THREADS`` when set (a positive integer; ``abc`` is a :class:`ConfigError`);
3. else, under torchrun with ``P`` processes on this node, ``limit // P`` (at least 1);
4. else (one process, nothing set)::

       cores   = CPUs in this process's affinity mask (os.sched_getaffinity)
       limit   = min(cores, floor(cgroup CPU quota))                     at least 1
       others  = other processes' runnable threads, machine-wide, * cores / machine CPUs
       free    = min(limit, cores - others) - threads chosen by other vaelab runs
       threads = round_half_up(free / (1 + other vaelab runs not yet decided)),
                 clamped to [1, limit]

``others`` is measured at start-up, before this process loads the CPU: the number of
runnable tasks (``/proc/loadavg``, 4th field) averaged over :data:`SAMPLES` reads
:data:`SAMPLE_INTERVAL` seconds apart, minus this process's own and registered vaelab
runs' runnable threads. Where that is not readable (not Linux), the 1-minute load average
minus this process's own share (:func:`own_load_share`) stands in.

OpenMP wait policy: when the machine is shared (``others`` plus other vaelab runs' threads
reach :data:`SHARED_CORES`), ``OMP_WAIT_POLICY=PASSIVE`` is put in the environment so that
idle OpenMP threads sleep instead of spinning. libgomp reads it once, when torch is
imported, so only :func:`startup` (the CLI calls it before any handler imports torch) can
set it; it is left alone when ``OMP_WAIT_POLICY`` or ``OMP_NUM_THREADS`` is set (you manage
OpenMP yourself) and under torchrun.

Other vaelab runs: every CLI command that computes registers its process id and chosen
thread count in a per-user directory (:func:`registry_dir`) until it exits, under a file
lock, so runs started together split the cores instead of each taking all of them. A
training follows the registry (:func:`follow`, called between steps, a ``stat`` every
:data:`FOLLOW_SECONDS`): it gives threads back when another run starts and takes them
again when it ends.

Limits, stated plainly: ``others`` is a 50 ms snapshot taken when the command starts. A
non-vaelab job that starts later is not seen (set ``train.threads`` or
``OMP_WAIT_POLICY=PASSIVE`` for a long run on a machine that will get busy); a bursty job
may be caught in a burst or a pause. The 1-minute load average is not used on Linux
because it lags both ways (an EWMA with a 60 s time constant): a job that started 10 s ago
shows as 15% of the cores it uses, one that ended 30 s ago still as 61% of what it used
(a benchmark's previous trial would pass for a busy machine). Other users' vaelab runs
use their own registry and count as other processes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "SHARED_CORES",
    "SAMPLES",
    "SAMPLE_INTERVAL",
    "FOLLOW_SECONDS",
    "REGISTRY_ENV",
    "Machine",
    "Peers",
    "Choice",
    "choose",
    "parse_omp_num_threads",
    "parse_cpu_max",
    "parse_cfs_quota",
    "cgroup_cpu_quota",
    "affinity_cores",
    "machine_cores",
    "load_average",
    "own_load_share",
    "busy_elsewhere",
    "measure",
    "registry_dir",
    "startup",
    "decide",
    "decide_fixed",
    "follow",
    "report",
    "withdraw",
    "reset",
]

#: Cores kept busy by other processes (and other vaelab runs' threads) from which the
#: machine counts as shared: OpenMP threads then sleep when idle (``OMP_WAIT_POLICY=PASSIVE``).
SHARED_CORES = 0.5
#: Time constant of the kernel's 1-minute load average, seconds (an EWMA updated every 5 s).
LOAD_TAU_SECONDS = 60.0
#: Start-up snapshot of the machine's runnable tasks: this many reads, this many seconds apart.
SAMPLES = 25
SAMPLE_INTERVAL = 0.002
#: A training looks at the registry directory's mtime at most this often (seconds) ...
FOLLOW_SECONDS = 0.5
#: ... and reads it whole at least this often (a killed run leaves no mtime change).
REREAD_SECONDS = 10.0
#: Environment variable naming the registry directory (default: per-user, in the temp dir).
REGISTRY_ENV = "VAELAB_THREADS_REGISTRY"

_HINT_API = "set train.threads or OMP_NUM_THREADS to override"


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Machine:
    """What the machine offers this process, measured at start-up.

    Attributes:
        cores: CPUs in this process's affinity mask (``os.sched_getaffinity``).
        machine_cores: online CPUs (``os.cpu_count``): what the load is spread over.
        quota: the cgroup CPU quota in CPUs (quota / period), None when unlimited.
        busy: runnable threads of other processes, machine-wide, averaged over the
            start-up snapshot (None where ``/proc`` is not readable).
        load: the 1-minute load average (None where unavailable).
        own_load: this process's estimated share of ``load`` (:func:`own_load_share`).
    """

    cores: int
    machine_cores: int
    quota: float | None = None
    busy: float | None = None
    load: float | None = None
    own_load: float = 0.0

    @property
    def limit(self) -> int:
        """The most threads worth running: ``min(cores, floor(quota))``, at least 1."""
        cap = self.cores if self.quota is None else min(self.cores, math.floor(self.quota + 1e-9))
        return max(1, cap)

    @property
    def others(self) -> float:
        """Cores of this process's CPUs that other processes keep busy: the machine-wide
        busy count (else the load average minus our share) times ``cores / machine_cores``
        (the load is assumed spread evenly over the machine's CPUs)."""
        if self.busy is not None:
            wide = self.busy
        elif self.load is not None:
            wide = self.load - self.own_load
        else:
            wide = 0.0
        return max(0.0, wide) * self.cores / max(self.machine_cores, self.cores)


@dataclass(frozen=True)
class Peers:
    """The other vaelab runs on this machine (from the registry).

    Attributes:
        chosen: the thread counts of the runs that have decided.
        pending: runs that have started but not decided yet (each will want a share).
    """

    chosen: tuple[int, ...] = ()
    pending: int = 0

    @property
    def threads(self) -> int:
        """Threads the other runs have taken."""
        return sum(self.chosen)

    @property
    def runs(self) -> int:
        """How many other vaelab runs there are."""
        return len(self.chosen) + self.pending


@dataclass(frozen=True)
class Choice:
    """The intra-op thread count and why.

    Attributes:
        threads: the count for ``torch.set_num_threads``.
        source: ``"train.threads"``, ``"OMP_NUM_THREADS"``, ``"torchrun"``, ``"auto"`` (from
            the load) or ``"cores"`` (every usable core, whatever the load: ``fixed``).
        machine: the measurement it came from.
        peers: the other vaelab runs it made room for.
        shared: whether the machine counts as shared (the wait policy should be PASSIVE).
    """

    threads: int
    source: str
    machine: Machine
    peers: Peers = field(default_factory=Peers)
    shared: bool = False

    def message(self, hint: str = _HINT_API, wait_policy: str | None = None) -> str | None:
        """One line saying what was chosen, or None when vaelab chose nothing unusual (the
        count was given explicitly, or it equals the core count and the wait policy was
        left alone). ``wait_policy`` is what :func:`startup` put in the environment."""
        m = self.machine
        if self.source == "cores":
            if m.others < SHARED_CORES and not self.peers.runs:
                return None
            return (f"vaelab: using {self.threads} CPU thread{'s' if self.threads != 1 else ''}"
                    f" although the machine is busy: this model's results depend on the "
                    f"thread count, so it does not follow the load ({hint})")
        if self.source != "auto" or (self.threads == self.machine.cores and not wait_policy):
            return None
        what = f"{self.threads} CPU thread{'s' if self.threads != 1 else ''}"
        if wait_policy:
            what += f" and OMP_WAIT_POLICY={wait_policy}"
        why = [f"{m.cores} core{'s' if m.cores != 1 else ''}"]
        if m.quota is not None and m.limit < m.cores:
            why.append(f"CPU quota {m.quota:g}")
        if m.others >= 0.05:
            why.append(f"load {m.others:.1f} from other processes")
        if self.peers.runs:
            why.append(f"{self.peers.runs} other vaelab run{'s' if self.peers.runs != 1 else ''}")
        return f"vaelab: using {what} ({', '.join(why)}; {hint})"


def parse_omp_num_threads(value: str | None) -> int | None:
    """``OMP_NUM_THREADS`` as a thread count: None when unset or empty; the first entry of
    a nested list such as ``4,2``.

    Raises:
        ConfigError: not a positive integer (e.g. ``abc`` or ``0``).
    """
    if value is None or not value.strip():
        return None
    first = value.split(",")[0].strip()
    if not first.isdigit() or int(first) <= 0:
        raise ConfigError(f"OMP_NUM_THREADS={value!r} is not a positive integer: set e.g. "
                          "OMP_NUM_THREADS=2, or unset it to let vaelab choose")
    return int(first)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def choose(machine: Machine, *, threads: int | None = None, omp: str | None = None,
           processes_on_node: int = 1, peers: Peers = Peers(), fixed: bool = False) -> Choice:
    """The thread count for this process (the rule in the module docstring).

    With ``fixed`` the count does not depend on the load or on other vaelab runs (rule 4
    becomes ``limit``): for computations whose results depend on the thread count.

    Args:
        machine: the measurement (:func:`measure`).
        threads: ``train.threads``; wins when given.
        omp: the value of ``OMP_NUM_THREADS`` (None when unset); next in precedence.
        processes_on_node: processes of this job on this node (torchrun's local world size).
        peers: the other vaelab runs (:func:`startup` and :func:`decide` read them).

    Raises:
        ConfigError: ``omp`` is not a positive integer.
    """
    omp_threads = parse_omp_num_threads(omp)
    shared = machine.others + peers.threads + peers.pending >= SHARED_CORES
    if threads:
        return Choice(int(threads), "train.threads", machine, peers, shared)
    if omp_threads is not None:
        return Choice(omp_threads, "OMP_NUM_THREADS", machine, peers, shared)
    if processes_on_node > 1:
        return Choice(max(1, machine.limit // processes_on_node), "torchrun", machine, peers,
                      shared)
    if fixed:
        return Choice(machine.limit, "cores", machine, peers, shared)
    free = min(machine.limit, machine.cores - machine.others) - peers.threads
    share = _round_half_up(free / (1 + peers.pending))
    return Choice(min(machine.limit, max(1, share)), "auto", machine, peers, shared)


# --------------------------------------------------------------------------- the machine


def _read(path: str | Path) -> str | None:
    """A small text file's content, None when it cannot be read (the cgroup file reader)."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def affinity_cores() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that
    does not exist), never more than ``os.cpu_count``."""
    total = os.cpu_count() or 1
    try:
        return max(1, min(len(os.sched_getaffinity(0)), total))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return total


def machine_cores() -> int:
    """Online CPUs of the machine (``os.cpu_count``)."""
    return os.cpu_count() or 1


def parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"`` in microseconds, or ``"max PERIOD"``) as
    CPUs; None when unlimited or unreadable."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs_quota(quota: str | None, period: str | None) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` as CPUs (quota -1 means
    unlimited: None)."""
    try:
        q, p = float((quota or "").strip()), float((period or "").strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _ancestors(mount: Path, path: str) -> Iterator[Path]:
    """``mount/path`` and each of its parents up to ``mount`` (a quota anywhere above a
    cgroup limits it too)."""
    parts = [p for p in path.strip("/").split("/") if p]
    for i in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:i])


_V1_MOUNTS = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu")


def cgroup_cpu_quota(read: Callable[[str | Path], str | None] | None = None) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (the smallest along its path),
    None when there is none.

    cgroup v2: ``/sys/fs/cgroup/<path>/cpu.max``; v1: ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us`` under the ``cpu`` controller's mount. ``<path>`` comes from
    ``/proc/self/cgroup``; inside a container (where that path is not mounted) the mount
    root is what counts. ``read(path) -> text or None`` reads the files (default: the
    file system). Sources: the kernel's cgroup-v2 and sched-bwc documentation.
    """
    read = _read if read is None else read
    lines = (read("/proc/self/cgroup") or "0::/").splitlines()
    found: list[float] = []
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            for d in _ancestors(Path("/sys/fs/cgroup"), path):
                found.append(parse_cpu_max(read(d / "cpu.max")) or 0.0)
        elif "cpu" in controllers.split(","):
            for mount in _V1_MOUNTS:
                for d in _ancestors(Path(mount), path):
                    found.append(parse_cfs_quota(read(d / "cpu.cfs_quota_us"),
                                                 read(d / "cpu.cfs_period_us")) or 0.0)
    limits = [q for q in found if q > 0]
    return min(limits) if limits else None


def load_average() -> float | None:
    """The 1-minute load average (``os.getloadavg``), None where unavailable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return None


def own_load_share(cpu_seconds: float, age_seconds: float,
                   tau: float = LOAD_TAU_SECONDS) -> float:
    r"""This process's part of the 1-minute load average, if it ran at its average rate
    since it started: ``cpu / age * (1 - exp(-age / tau))`` (the load average is an EWMA
    with time constant ``tau`` = 60 s). A CLI command that has just started contributes
    almost nothing (about ``cpu / 60``); a process that trained for ten minutes, its
    threads."""
    if age_seconds <= 0 or cpu_seconds <= 0:
        return 0.0
    return cpu_seconds / age_seconds * (1.0 - math.exp(-age_seconds / tau))


_IMPORTED_AT = time.time()


def _own_cpu_and_age() -> tuple[float, float]:
    """This process's CPU seconds (all threads) and age in seconds (from ``/proc``; where
    that is missing, the time since this module was imported)."""
    times = os.times()
    cpu = times.user + times.system
    start = _start_ticks(os.getpid())
    uptime = _read("/proc/uptime")
    if start is not None and uptime:
        with contextlib.suppress(ValueError, IndexError):
            age = float(uptime.split()[0]) - start / os.sysconf("SC_CLK_TCK")
            return cpu, max(age, 1e-3)
    return cpu, max(time.time() - _IMPORTED_AT, 1e-3)


def _stat_fields(pid: int | str, task: str | None = None) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name), None when unreadable."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    text = _read(path)
    if not text or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of ``/proc/<pid>/stat``)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _running_threads(pid: int) -> int:
    """Threads of ``pid`` that are runnable now (state ``R`` in ``/proc/<pid>/task``)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    count = 0
    for tid in tasks:
        fields = _stat_fields(pid, tid)
        count += bool(fields and fields[0] == "R")
    return count


def _machine_running() -> int | None:
    """Runnable tasks on the machine now (``/proc/loadavg``, 4th field ``running/total``)."""
    text = _read("/proc/loadavg")
    try:
        return int(text.split()[3].split("/")[0]) if text else None
    except (IndexError, ValueError):
        return None


def busy_elsewhere(exclude: Callable[[], Iterable[int]] = tuple, samples: int = SAMPLES,
                   interval: float = SAMPLE_INTERVAL) -> float | None:
    """Runnable threads of other processes, machine-wide, averaged over ``samples`` reads
    ``interval`` seconds apart: the kernel's count of runnable tasks minus those of this
    process and of the processes ``exclude()`` names (registered vaelab runs, counted
    separately). None where ``/proc/loadavg`` is not readable."""
    me = os.getpid()
    values: list[int] = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        total = _machine_running()
        if total is None:
            return None
        ours = sum(_running_threads(pid) for pid in {me, *exclude()})
        values.append(max(0, total - ours))
    return sum(values) / len(values)


def measure(exclude: Callable[[], Iterable[int]] = tuple) -> Machine:
    """Measure the machine now (a :data:`SAMPLES` x :data:`SAMPLE_INTERVAL` snapshot)."""
    cpu, age = _own_cpu_and_age()
    return Machine(cores=affinity_cores(), machine_cores=machine_cores(),
                   quota=cgroup_cpu_quota(), busy=busy_elsewhere(exclude),
                   load=load_average(), own_load=own_load_share(cpu, age))


# --------------------------------------------------------------------------- the registry


def registry_dir() -> Path:
    """Where running vaelab commands register: ``$VAELAB_THREADS_REGISTRY``, else
    ``<temp dir>/vaelab-<uid>/runs``."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    import tempfile  # not at module level: `vaelab --help` stays fast

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"vaelab-{uid}" / "runs"


def _alive(entry: dict[str, Any]) -> bool:
    """The registered process still runs (same pid and the same start time: no reuse)."""
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if Path("/proc").is_dir():
        start = _start_ticks(pid)
        return start is not None and entry.get("start") in (None, start)
    try:  # pragma: no cover - not Linux
        os.kill(pid, 0)
    except PermissionError:  # pragma: no cover
        return True
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[bool]:
    """Hold the registry's lock (``flock``); yields False when there is no usable registry
    (read-only temp dir, no ``fcntl``): vaelab then decides without it."""
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except (ImportError, OSError):
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _entries(directory: Path) -> list[dict[str, Any]]:
    """Live entries of other processes; stale ones (a killed run) are removed."""
    me, live = os.getpid(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name == f"{me}.json":
            continue
        try:
            entry = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and _alive(entry):
            live.append(entry)
        else:
            with contextlib.suppress(OSError):
                (directory / name).unlink()
    return live


def _registered_pids(directory: Path) -> list[int]:
    """Process ids with an entry in the registry (from the file names; no parsing)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]


def _peers(entries: list[dict[str, Any]]) -> Peers:
    chosen = tuple(int(e["threads"]) for e in entries if isinstance(e.get("threads"), int))
    return Peers(chosen=chosen, pending=len(entries) - len(chosen))


def _write_entry(directory: Path, threads: int | None) -> None:
    """Write this process's entry atomically (tmp + rename: the directory's mtime moves,
    which is what :func:`follow` watches)."""
    pid = os.getpid()
    entry = {"pid": pid, "start": _start_ticks(pid), "threads": threads, "time": time.time()}
    tmp = directory / f".{pid}.tmp"
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, directory / f"{pid}.json")


# --------------------------------------------------------------------------- this process


@dataclass
class _State:
    """What this process decided (one command at a time)."""

    machine: Machine | None = None  # the start-up measurement of the current CLI command
    choice: Choice | None = None
    request: tuple[int | None, int] = (None, 1)  # (train.threads, processes_on_node)
    registry: Path | None = None  # set while this process is registered
    wait_policy: str | None = None  # what startup() put in the environment
    hint: str = _HINT_API
    printed: bool = False
    reported: Choice | None = None  # the last choice report() looked at
    next_follow: float = 0.0
    next_reread: float = 0.0
    seen_mtime: int | None = None
    written: int | None = None  # the thread count in our entry (None: pending)
    atexit_done: bool = False


_STATE = _State()


def _local_world_size(environ: MutableMapping[str, str]) -> int:
    value = environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def startup(hint: str = _HINT_API, environ: MutableMapping[str, str] | None = None) -> Choice:
    """What the CLI does first, before any handler imports torch: measure the machine,
    register this process for the other vaelab runs, and put ``OMP_WAIT_POLICY=PASSIVE``
    in ``environ`` (default ``os.environ``) when the machine is shared (not when
    ``OMP_WAIT_POLICY`` or ``OMP_NUM_THREADS`` is set, under torchrun, or once torch is
    imported: libgomp reads it only when it loads). The thread count is applied later by
    :func:`vaelab.runtime.configure_threads` (which knows ``train.threads``).

    A Python script can call it before ``import torch`` for the same wait policy.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS")
    explicit = parse_omp_num_threads(omp)
    processes = _local_world_size(environ)
    _STATE.hint = hint
    directory = registry_dir()
    with _locked(directory) as ok:
        if ok:
            _write_entry(directory, explicit)
            _STATE.registry, _STATE.written = directory, explicit
            if not _STATE.atexit_done:
                atexit.register(withdraw)
                _STATE.atexit_done = True
        peers = _peers(_entries(directory)) if ok else Peers()
    machine = _measure(processes, lambda: _registered_pids(directory))
    _STATE.machine = machine
    choice = choose(machine, omp=omp, processes_on_node=processes, peers=peers)
    if (choice.shared and explicit is None and processes == 1
            and "OMP_WAIT_POLICY" not in environ and "torch" not in sys.modules):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _STATE.wait_policy = "PASSIVE"
    return choice


def _measure(processes: int, exclude: Callable[[], Iterable[int]]) -> Machine:
    """The measurement; under torchrun only the cores (the per-rank split needs no more)."""
    if processes > 1:
        return Machine(cores=affinity_cores(), machine_cores=machine_cores(),
                       quota=cgroup_cpu_quota())
    return measure(exclude)


def decide(threads: int | None = None, processes_on_node: int = 1) -> Choice:
    """The thread count for this process now, from the start-up measurement of the current
    CLI command (from the Python API, without :func:`startup`: a measurement taken now)
    and the other vaelab runs registered now. A registered process's entry is updated.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    if _STATE.registry is None:  # Python API: measure now (the machine may have changed)
        directory = registry_dir()
        _STATE.machine = _measure(processes_on_node, lambda: _registered_pids(directory))
    return _decide(threads, processes_on_node)


def decide_fixed(threads: int | None = None, processes_on_node: int = 1) -> Choice:
    """Like :func:`decide`, but the count does not depend on the load (``choose(fixed=True)``)
    and never follows other runs: for computations whose results depend on it.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    return _decide(threads, processes_on_node, fixed=True)


def _decide(threads: int | None, processes_on_node: int, fixed: bool = False) -> Choice:
    directory = _STATE.registry or registry_dir()
    with _locked(directory) as ok:
        entries = _entries(directory) if ok else []
        if _STATE.machine is None:
            _STATE.machine = _measure(processes_on_node, lambda: _registered_pids(directory))
        choice = choose(_STATE.machine, threads=threads,
                        omp=os.environ.get("OMP_NUM_THREADS"),
                        processes_on_node=processes_on_node, peers=_peers(entries), fixed=fixed)
        if ok and _STATE.registry is not None and _STATE.written != choice.threads:
            _write_entry(directory, choice.threads)  # only on change: no ping-pong
            _STATE.written = choice.threads
        _STATE.seen_mtime = _mtime(directory)
    _STATE.choice, _STATE.request = choice, (threads, processes_on_node)
    _STATE.next_follow = time.monotonic() + FOLLOW_SECONDS
    _STATE.next_reread = time.monotonic() + REREAD_SECONDS
    return choice


def _mtime(directory: Path) -> int | None:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return None


def follow() -> Choice | None:
    """Between training steps: a new choice when other vaelab runs started or ended since
    the last decision and the count changes; else None. Costs a clock read; a ``stat``
    every :data:`FOLLOW_SECONDS`. Only an automatic choice follows (not ``train.threads``,
    ``OMP_NUM_THREADS`` or torchrun)."""
    choice = _STATE.choice
    if choice is None or choice.source != "auto":
        return None
    now = time.monotonic()
    if now < _STATE.next_follow:
        return None
    _STATE.next_follow = now + FOLLOW_SECONDS
    directory = _STATE.registry or registry_dir()
    mtime = _mtime(directory)
    if mtime == _STATE.seen_mtime and now < _STATE.next_reread:
        return None
    threads, processes = _STATE.request
    new = _decide(threads, processes)  # the same start-up measurement, today's peers
    return new if new.threads != choice.threads else None


def report(stream: Any = None) -> None:
    """Print the current choice's :meth:`Choice.message` (to stderr), once per process and
    on rank 0 only. Called when the work has started (the first training step) or is done
    (the end of a CLI command), so that a command stopped by bad input still prints its
    one error line only."""
    choice = _STATE.choice
    if choice is None or _STATE.printed or choice is _STATE.reported:
        return
    _STATE.reported = choice
    if os.environ.get("RANK", "0") != "0":
        return
    line = choice.message(_STATE.hint, _STATE.wait_policy)
    if line:
        print(line, file=stream or sys.stderr, flush=True)
        _STATE.printed = True


def withdraw() -> None:
    """The command is over: remove this process's registry entry (also at exit) and forget
    the start-up measurement (the next command measures again)."""
    directory = _STATE.registry
    _STATE.registry, _STATE.machine, _STATE.choice, _STATE.written = None, None, None, None
    if directory is not None:
        with contextlib.suppress(OSError):
            (directory / f"{os.getpid()}.json").unlink()


def reset() -> None:
    """Forget everything this process decided (tests)."""
    global _STATE
    withdraw()
    _STATE = _State(atexit_done=_STATE.atexit_done)
