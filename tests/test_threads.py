"""The CPU thread rule (vaelab.threads): a table of machines -> thread counts, the override
precedence, the one-line message, the cgroup/affinity/load readers (monkeypatched, no
timing), the registry of vaelab runs, and the CLI setting the wait policy before torch is
imported. The torchrun per-rank split is tested in test_distributed.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vaelab import runtime
from vaelab import threads as T
from vaelab.errors import ConfigError

SRC = Path(T.__file__).resolve().parents[1]
HINT = "set --set train.threads=N or OMP_NUM_THREADS to override"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private registry, no OpenMP or torchrun variables, fresh module state, and torch's
    thread count put back afterwards."""
    monkeypatch.setenv(T.REGISTRY_ENV, str(tmp_path / "registry"))
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    T.reset()
    yield
    T.reset()
    torch.set_num_threads(before)


def machine(cores=2, machine_cores=None, quota=None, busy=0.0, load=None, own=0.0):
    return T.Machine(cores=cores, machine_cores=machine_cores or cores, quota=quota,
                     busy=busy, load=load, own_load=own)


# --------------------------------------------------------------------------- the rule

# (machine, peers, expected threads, shared)
AUTO = [
    (machine(2, busy=0.0), T.Peers(), 2, False),        # idle: torch's old default
    (machine(2, busy=0.3), T.Peers(), 2, False),        # noise: free 1.7 -> 2
    (machine(2, busy=0.6), T.Peers(), 1, True),         # free 1.4 -> 1
    (machine(2, busy=1.9), T.Peers(), 1, True),         # the issue: another training
    (machine(2, busy=5.0), T.Peers(), 1, True),         # never below 1
    (machine(8, busy=2.0), T.Peers(), 6, True),
    (machine(8, quota=2.5), T.Peers(), 2, False),       # cgroup quota: floor(2.5)
    (machine(8, quota=0.5), T.Peers(), 1, False),       # at least 1
    (machine(4, 64, busy=32.0), T.Peers(), 2, True),    # pinned to 4 of 64 CPUs: 32 * 4/64
    (machine(64, quota=2.0, busy=30.0), T.Peers(), 2, True),  # quota on a big host: 34 free
    (machine(2, busy=None, load=1.5, own=0.5), T.Peers(), 1, True),  # load fallback - own
    (machine(2, busy=None, load=2.1, own=2.0), T.Peers(), 2, False),  # only itself
    (machine(2, busy=None, load=None), T.Peers(), 2, False),  # nothing measurable
    (machine(2), T.Peers(pending=1), 1, True),          # two runs started together
    (machine(2), T.Peers(chosen=(1,)), 1, True),        # ... the second to decide
    (machine(2), T.Peers(chosen=(2,)), 1, True),        # beside a run that took all
    (machine(2), T.Peers(pending=2), 1, True),          # three runs on two cores
    (machine(4), T.Peers(pending=1), 2, True),
    (machine(4), T.Peers(chosen=(2,)), 2, True),
    (machine(4), T.Peers(chosen=(1,), pending=1), 2, True),  # (4 - 1) / 2 = 1.5 -> 2
    (machine(4, busy=1.0), T.Peers(chosen=(1,)), 2, True),
]


@pytest.mark.parametrize("m, peers, expected, shared", AUTO)
def test_automatic_choice(m, peers, expected, shared):
    choice = T.choose(m, peers=peers)
    assert (choice.threads, choice.source, choice.shared) == (expected, "auto", shared)
    # the written rule, independently
    free = min(m.limit, m.cores - m.others) - peers.threads
    assert choice.threads == min(m.limit, max(1, math.floor(free / (1 + peers.pending) + 0.5)))


@pytest.mark.parametrize("kwargs, expected, source", [
    (dict(threads=3, omp="1"), 3, "train.threads"),      # train.threads wins over everything
    (dict(threads=3, processes_on_node=2), 3, "train.threads"),
    (dict(omp="4"), 4, "OMP_NUM_THREADS"),               # even on a busy machine
    (dict(omp=" 2,1 "), 2, "OMP_NUM_THREADS"),           # a nested list: the outer level
    (dict(omp="", processes_on_node=1), 1, "auto"),      # empty = unset
    (dict(processes_on_node=2), 1, "torchrun"),          # 2 cores // 2 ranks
    (dict(omp="1", processes_on_node=2), 1, "OMP_NUM_THREADS"),  # what torchrun sets
])
def test_override_precedence(kwargs, expected, source):
    choice = T.choose(machine(2, busy=1.9), **kwargs)
    assert (choice.threads, choice.source) == (expected, source)


def test_torchrun_split_uses_the_quota_and_affinity():
    assert T.choose(machine(8, quota=4.0), processes_on_node=2).threads == 2
    assert T.choose(machine(8), processes_on_node=3).threads == 2
    assert T.choose(machine(2), processes_on_node=4).threads == 1


@pytest.mark.parametrize("value", ["abc", "0", "-2", "2.5", ",4"])
def test_bad_omp_num_threads_is_a_one_line_config_error(value):
    with pytest.raises(ConfigError) as info:
        T.choose(machine(), omp=value)
    message = str(info.value)
    assert "\n" not in message and f"OMP_NUM_THREADS={value!r}" in message
    assert "positive integer" in message


# --------------------------------------------------------------------------- the message


def test_the_one_line_message():
    choice = T.choose(machine(2, busy=1.9))
    assert choice.message(HINT) == ("vaelab: using 1 CPU thread (2 cores, load 1.9 from "
                                    "other processes; " + HINT + ")")
    assert choice.message(HINT, "PASSIVE").startswith(
        "vaelab: using 1 CPU thread and OMP_WAIT_POLICY=PASSIVE (2 cores, load 1.9")
    assert T.choose(machine(8, quota=2.0)).message("x") == (
        "vaelab: using 2 CPU threads (8 cores, CPU quota 2; x)")
    assert T.choose(machine(2), peers=T.Peers(chosen=(1,), pending=1)).message("x") == (
        "vaelab: using 1 CPU thread (2 cores, 2 other vaelab runs; x)")


def test_no_message_when_nothing_unusual_was_chosen():
    assert T.choose(machine(2)).message() is None                  # all the cores
    assert T.choose(machine(2, busy=1.9), threads=1).message() is None  # the user's choice
    assert T.choose(machine(2), omp="1").message() is None
    assert T.choose(machine(2), processes_on_node=2).message() is None  # torchrun


def test_report_prints_once_per_process_on_rank_0(monkeypatch, capsys):
    fixed_machine(monkeypatch, cores=2, busy=1.9)
    T.report()  # nothing decided yet
    assert runtime.configure_threads() == 1
    assert capsys.readouterr().err == ""  # not yet: bad input may still stop the command
    T.report()
    T.report()
    T.decide()
    T.report()
    err = capsys.readouterr().err
    assert err.count("vaelab: using 1 CPU thread") == 1 and err.endswith(")\n")
    T.reset()
    monkeypatch.setenv("RANK", "1")
    T.decide()
    T.report()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the readers


@pytest.mark.parametrize("text, cpus", [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("50000 100000", 0.5),
    ("", None), (None, None), ("max", None), ("abc 100000", None),
])
def test_parse_cpu_max(text, cpus):
    assert T.parse_cpu_max(text) == cpus


def test_parse_cfs_quota():
    assert T.parse_cfs_quota("-1\n", "100000\n") is None
    assert T.parse_cfs_quota("150000\n", "100000\n") == 1.5
    assert T.parse_cfs_quota(None, "100000") is None


def fake_reader(files: dict[str, str]):
    def read(path):
        return files.get(str(path))
    return read


@pytest.mark.parametrize("files, cpus", [
    ({"/proc/self/cgroup": "0::/user.slice/job\n",
      "/sys/fs/cgroup/user.slice/job/cpu.max": "max 100000",
      "/sys/fs/cgroup/user.slice/cpu.max": "300000 100000"}, 3.0),   # a parent's quota
    ({"/proc/self/cgroup": "0::/a\n", "/sys/fs/cgroup/a/cpu.max": "150000 100000",
      "/sys/fs/cgroup/cpu.max": "400000 100000"}, 1.5),              # the smallest wins
    ({"/proc/self/cgroup": "0::/docker/abc\n",                       # container: mount root
      "/sys/fs/cgroup/cpu.max": "200000 100000"}, 2.0),
    ({"/proc/self/cgroup": "4:memory:/x\n2:cpu,cpuacct:/x\n",
      "/sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us": "250000",
      "/sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us": "100000"}, 2.5),  # cgroup v1
    ({"/proc/self/cgroup": "1:cpu:/\n", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
      "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, None),      # v1, unlimited
    ({}, None),                                                      # nothing readable
])
def test_cgroup_quota(files, cpus):
    assert T.cgroup_cpu_quota(fake_reader(files)) == cpus


def test_own_share_of_the_load_average():
    # a command that has just started: about its CPU seconds / 60
    assert T.own_load_share(0.2, 0.3) == pytest.approx(0.2 / 60, rel=0.01)
    # ten minutes on two threads: two
    assert T.own_load_share(1200.0, 600.0) == pytest.approx(2.0, rel=1e-4)
    # one minute at one core: 1 - 1/e of it is in the 1-minute average
    assert T.own_load_share(60.0, 60.0) == pytest.approx(1 - math.exp(-1))
    assert T.own_load_share(0.0, 10.0) == 0.0 and T.own_load_share(1.0, 0.0) == 0.0


def test_measure_reads_affinity_cgroup_and_running_tasks(monkeypatch):
    files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/cpu.max": "300000 100000",
             "/proc/loadavg": "1.90 1.20 0.80 3/211 4242\n"}
    monkeypatch.setattr(T, "_read", fake_reader(files))  # no /proc/<pid>/task states either
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.2, 0.8))
    m = T.measure()
    assert (m.cores, m.machine_cores, m.quota, m.busy, m.load) == (4, 8, 3.0, 3.0, 1.9)
    assert m.others == pytest.approx(3.0 * 4 / 8)  # spread evenly over the 8 CPUs
    assert T.choose(m).threads == 3  # limit floor(3.0) = 3; free min(3, 4 - 1.5) = 2.5 -> 3
    # without the running count (not Linux), the load average minus this process's share
    del files["/proc/loadavg"]
    m = T.measure()
    assert m.busy is None and m.load == 1.9 and 0 <= m.own_load < 1.9
    assert m.others == pytest.approx((1.9 - m.own_load) * 4 / 8)


# --------------------------------------------------------------------------- registry


def fixed_machine(monkeypatch, **kwargs):
    m = machine(**kwargs)
    monkeypatch.setattr(T, "measure", lambda exclude=tuple: m)
    return m


def register(directory: Path, pid: int, threads: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"pid": pid, "start": T._start_ticks(pid), "threads": threads, "time": 0}
    (directory / f"{pid}.json").write_text(json.dumps(entry))


def test_runs_started_together_split_the_cores(monkeypatch, tmp_path):
    fixed_machine(monkeypatch, cores=2)
    registry = tmp_path / "registry"
    register(registry, os.getppid(), None)  # another run, still starting
    environ: dict[str, str] = {}
    first = T.startup(HINT, environ)
    assert first.shared and first.peers == T.Peers(pending=1)
    assert environ == {}  # torch is imported in this process: too late for the wait policy
    assert T.decide().threads == 1
    mine = json.loads((registry / f"{os.getpid()}.json").read_text())
    assert mine["threads"] == 1 and mine["start"] == T._start_ticks(os.getpid())
    T.withdraw()
    assert not (registry / f"{os.getpid()}.json").exists()


def test_dead_runs_are_forgotten(monkeypatch, tmp_path):
    fixed_machine(monkeypatch, cores=2)
    registry = tmp_path / "registry"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    register(registry, gone.pid, 2)
    (registry / "123.json").write_text("not json")
    parent = os.getppid()
    register(registry, parent, 1)
    entry = json.loads((registry / f"{parent}.json").read_text())
    entry["start"] = -1  # the pid was reused by another process
    (registry / f"{parent}.json").write_text(json.dumps(entry))
    assert T.decide().threads == 2 and T.decide().peers == T.Peers()
    assert not (registry / f"{gone.pid}.json").exists()
    assert not (registry / f"{parent}.json").exists()


def test_a_training_follows_the_other_runs(monkeypatch, tmp_path):
    fixed_machine(monkeypatch, cores=2)
    registry = tmp_path / "registry"
    T.startup(HINT, {})
    assert runtime.configure_threads() == 2 and T.follow() is None  # alone
    register(registry, os.getppid(), None)  # another run starts
    T._STATE.next_follow = 0.0
    runtime.follow_threads()
    assert torch.get_num_threads() == 1
    assert json.loads((registry / f"{os.getpid()}.json").read_text())["threads"] == 1
    (registry / f"{os.getppid()}.json").unlink()  # ... and ends
    T._STATE.next_follow = 0.0
    runtime.follow_threads()
    assert torch.get_num_threads() == 2
    T._STATE.next_follow = 0.0
    assert T.follow() is None  # nothing changed: no new decision


def test_explicit_counts_do_not_follow(monkeypatch, tmp_path):
    fixed_machine(monkeypatch, cores=2)
    assert runtime.configure_threads(2) == 2
    register(tmp_path / "registry", os.getppid(), None)
    T._STATE.next_follow = 0.0
    assert T.follow() is None and torch.get_num_threads() == 2


def test_configure_threads_applies_the_choice_from_the_python_api(monkeypatch, capsys):
    fixed_machine(monkeypatch, cores=2, busy=1.9)
    assert runtime.configure_threads(None, torch.device("cpu")) == 1
    runtime.follow_threads()  # the first training step says what was chosen
    assert "vaelab: using 1 CPU thread (2 cores, load 1.9 from other processes; set " \
           "train.threads or OMP_NUM_THREADS to override)" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.configure_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='abc'"):
        runtime.configure_threads()


def test_unusable_registry_is_not_an_error(monkeypatch, tmp_path):
    fixed_machine(monkeypatch, cores=2)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(T.REGISTRY_ENV, str(blocker / "registry"))  # cannot be created
    assert T.startup(HINT, {}).threads == 2 and T.decide().threads == 2


# --------------------------------------------------------------------------- the CLI

PROBE = textwrap.dedent("""
    import json, os, sys
    from vaelab import threads
    threads.busy_elsewhere = lambda exclude=tuple, **kw: {busy}
    seen = {{}}

    class Hook:  # records the environment at the moment torch is first imported
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "env" not in seen:
                seen["env"] = os.environ.get("OMP_WAIT_POLICY")
            return None

    sys.meta_path.insert(0, Hook())
    from vaelab.cli import main
    code = main(["eval", {run!r}])
    print(json.dumps({{"code": code, "at_torch_import": seen.get("env"),
                      "torch": "torch" in sys.modules}}))
""")


def _probe(tmp_path, busy: float, **env: str) -> tuple[dict, str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(busy=busy, run=str(tmp_path / "no-such-run")))
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    environ.update(PYTHONPATH=str(SRC), **env)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=environ, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("busy, env, policy", [
    (1.9, {}, "PASSIVE"),                          # shared: set before torch is imported
    (0.0, {}, None),                               # idle: torch's default
    (1.9, {"OMP_NUM_THREADS": "2"}, None),         # the user manages OpenMP
    (1.9, {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
])
def test_cli_sets_the_wait_policy_before_torch_is_imported(tmp_path, busy, env, policy):
    result, stderr = _probe(tmp_path, busy, **env)
    assert result["torch"] and result["code"] == 2  # the run does not exist: a clean error
    assert result["at_torch_import"] == policy
    assert "vaelab: error:" in stderr


def test_cli_bad_omp_num_threads_is_a_clean_error(tmp_path):
    result, stderr = _probe(tmp_path, 0.0, OMP_NUM_THREADS="abc")
    assert result["code"] == 2 and not result["torch"]
    assert stderr.strip().splitlines()[-1].startswith("vaelab: error: OMP_NUM_THREADS='abc'")


def test_help_and_the_thread_module_do_not_import_torch():
    code = ("import sys; import vaelab.threads; from vaelab.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.stderr.strip() == "False" and "usage: vaelab" in done.stdout


# --------------------------------------------------------------------------- training runs


def test_a_model_whose_results_depend_on_the_count_keeps_one_count(monkeypatch, capsys):
    """Convolutions (oneDNN) change their weight gradients with the thread count, so their
    runs do not follow the load: every usable core, or the count the run recorded."""
    from torch import nn

    fixed_machine(monkeypatch, cores=2, busy=1.9)  # another job keeps a core busy
    mlp = nn.Sequential(nn.Linear(4, 4))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    cpu = torch.device("cpu")
    assert runtime.threads_change_results(conv, cpu) == "oneDNN convolutions"
    assert runtime.threads_change_results(conv, torch.device("cuda")) is None
    if runtime.blas_reproducibility()["thread_invariant_matmul"]:
        assert runtime.threads_change_results(mlp, cpu) is None
        assert runtime.training_threads(None, mlp, cpu)["threads"] == 1  # follows the load
    T.reset()
    numerics = runtime.training_threads(None, conv, cpu)
    assert numerics["threads"] == torch.get_num_threads() == 2
    assert numerics["fixed"] and numerics["why"] == "oneDNN convolutions"
    T._STATE.next_follow = 0.0
    assert T.follow() is None  # never follows
    T.report()
    assert "does not follow the load" in capsys.readouterr().err
    T.reset()
    assert runtime.training_threads(None, conv, cpu, recorded=1)["threads"] == 1  # a resume
    T.reset()
    assert runtime.training_threads(2, conv, cpu, recorded=1)["threads"] == 2  # train.threads


def test_without_strict_mkl_every_model_keeps_one_count(monkeypatch):
    fixed_machine(monkeypatch, cores=2, busy=1.9)
    monkeypatch.setattr(runtime, "blas_reproducibility", lambda: {
        "blas": "mkl", "mkl_cbwr": "AUTO", "thread_invariant_matmul": False})
    from torch import nn

    mlp = nn.Sequential(nn.Linear(4, 4))
    why = runtime.threads_change_results(mlp, torch.device("cpu"))
    assert why == "MKL's conditional numerical reproducibility is AUTO"
    assert runtime.training_threads(None, mlp, torch.device("cpu"))["threads"] == 2
