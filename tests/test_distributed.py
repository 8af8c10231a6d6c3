"""Data-parallel training and evaluation under torchrun (CPU, gloo, 2 processes).

The 2-process tests launch real ``torchrun`` jobs (``python -m torch.distributed.run
--standalone``, which picks a free port) on a Fashion-MNIST subset and compare them
with a one-process run of the same config:

- per-epoch metrics of 2 processes = 1 process within ``RTOL`` (both draw the same
  permutation, binarisation and z-noise for the global batch; only float32 rounding of
  half-batches, the gradient all-reduce and thread counts differ: measured about 2e-8
  relative);
- each rank trains on a disjoint shard of every global batch, and the shards of a step
  are exactly the batch the one-process run used (bitwise);
- resume under torchrun, only rank 0 writes, every rank ends with the best weights;
- ``vaelab eval`` with 2 processes = 1 process up to float32 rounding (``EVAL_RTOL``);
- a rank that fails or hangs ends the job with a clear message (bounded by timeouts).

Each launch costs about 8-12 s on 2 cores (torchrun and two interpreters importing
torch); the file runs 5 launches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from vaelab import checkpoint, cli, config, distributed, experiment, models, objectives, runtime
from vaelab import train as train_mod
from vaelab.errors import ConfigError
from vaelab.rng import seeded_generator

#: 2-process vs 1-process numbers, relative. Every per-example value is a float32 result,
#: and torchrun gives each rank one thread where the one-process run has two: where the
#: thread count changes how a product is blocked (oneDNN, or MKL without strict CNR), a value
#: moves by a few float32 units in the last place (2^-24 relative each). A split's mean of
#: such values, and a training curve made of them, stay within 16 of them (2^-20, about
#: 1e-6; measured: 2e-8 for training, 5e-10 for ``vaelab eval`` on an Intel Xeon without
#: strict CNR, 0 up to float64 summation order with it). Losing or repeating one example of
#: the 1200 evaluated moves the mean by about 1e-3, a thousand times more.
RTOL = 2.0**-20
EVAL_RTOL = RTOL
LAUNCH_TIMEOUT = 180  # seconds; a hang fails the test instead of blocking CI

# 449 = 7 * 64 + 1: the last global batch has one example, so rank 1's shard is empty.
# Free bits are active (objective > NELBO), so the global batch-mean KL per dimension
# must be summed over ranks for 2 processes to match 1.
CFG = {"data.train_limit": 449, "train.eval_batch_size": 64, "objective.free_bits": 0.25}
STEPS_PER_EPOCH = math.ceil(449 / 64)

WORKER = r'''
"""torchrun worker for tests/test_distributed.py: a vaelab command with probes per rank."""
import hashlib, json, os, sys, time

import torch

from vaelab import checkpoint, cli, distributed, evaluate, experiment, grids, objectives
from vaelab import train as train_mod
from vaelab.errors import DataError

RANK = int(os.environ["RANK"])
PROBE = os.path.join(os.environ["PROBE_DIR"], f"rank{RANK}.json")
FAULT = os.environ.get("FAULT", "")  # "nan:<rank>:<training call>"
log = {"rank": RANK, "writes": [], "rows": [], "threads": None}


def dump():
    with open(PROBE, "w") as handle:
        json.dump(log, handle)


def recorded(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        log["writes"].append(name)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def primitives():
    """agree() carries rank 1's error to rank 0; a stuck rank 1 makes rank 0 time out."""
    ctx = distributed.setup(torch.device("cpu"))
    try:
        with distributed.agree(ctx, "setup"):
            if ctx.rank == 1:
                raise DataError("injected: fashion-mnist files missing on this node")
    except Exception as exc:
        log["agree"] = f"{type(exc).__name__}: {exc}"
    if ctx.rank == 1:
        dump()
        time.sleep(600)  # stuck: never joins the next collective
    try:
        with distributed.lost_contact(ctx, "training"):
            distributed.all_reduce_sum(torch.ones(1), ctx)
    except distributed.DistributedError as exc:
        log["stuck"] = str(exc)
        dump()
        print(f"vaelab: error: {exc}", file=sys.stderr)
        return 2
    return 0


def command(argv):
    for module, name in [(checkpoint, "save_checkpoint"), (train_mod, "atomic_write_text"),
                         (grids, "save_image_grid"), (evaluate, "write_report")]:
        recorded(module, name)
    experiment.Experiment._figures = (
        lambda self, report, echo: log["writes"].append("_figures"))
    real_terms, real_evaluate = objectives.elbo_terms, evaluate.evaluate
    calls = {"n": 0}

    def elbo_terms(model, x, **kwargs):
        terms = real_terms(model, x, **kwargs)
        if model.training:
            calls["n"] += 1
            log["rows"].append([hashlib.blake2b(r.numpy().tobytes(), digest_size=8).hexdigest()
                                for r in x])
            kind, rank, call = FAULT.split(":") if FAULT else ("", "-1", "0")
            if kind == "nan" and RANK == int(rank) and calls["n"] == int(call):
                terms = type(terms)(recon=terms.recon * float("nan"), kl=terms.kl,
                                    kl_per_dim=terms.kl_per_dim, elbo=terms.elbo)
        return terms

    def evaluate_probe(model, *args, **kwargs):
        result = real_evaluate(model, *args, **kwargs)
        log["report"] = result
        log["weights"] = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                          for k, v in model.state_dict().items()}
        return result

    objectives.elbo_terms, evaluate.evaluate = elbo_terms, evaluate_probe
    try:
        return cli.main(argv)
    finally:
        log["threads"] = torch.get_num_threads()
        dump()


if __name__ == "__main__":
    sys.exit(primitives() if sys.argv[1:] == ["primitives"] else command(sys.argv[1:]))
'''


# --------------------------------------------------------------------------- helpers


def _settings(epochs: int) -> list[str]:
    return tiny_overrides(**CFG, **{"train.epochs": epochs})


def _set_flags(epochs: int) -> list[str]:
    return [part for item in _settings(epochs) for part in ("--set", item)]


def _torchrun(args: list[str], cwd: Path, timeout: float = LAUNCH_TIMEOUT,
              **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port; bounded in time)."""
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environ.update({"VAELAB_DIST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1", **env})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _worker(directory: Path) -> Path:
    path = directory / "worker.py"
    path.write_text(WORKER)
    (directory / "probes").mkdir(exist_ok=True)
    return path


def _probes(directory: Path) -> list[dict]:
    return [json.loads((directory / "probes" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
        row.pop("examples_per_second")
    return rows


def _assert_rows_close(got: list[dict], want: list[dict], rtol: float) -> float:
    """Same keys and integers; floats within ``rtol``; returns the largest relative gap."""
    worst = 0.0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float):
                gap = abs(g[key] - value) / max(abs(value), 1e-12)
                worst = max(worst, gap)
                assert gap <= rtol, (g["epoch"], key, g[key], value)
            else:
                assert g[key] == value, (key, g[key], value)
    return worst


def _digests(x: torch.Tensor) -> list[str]:
    return [hashlib.blake2b(r.numpy().tobytes(), digest_size=8).hexdigest() for r in x]


def _console_script() -> str:
    """The real ``vaelab`` entry-point script (what ``which vaelab`` gives in a venv)."""
    script = Path(sys.executable).with_name("vaelab")
    if not script.is_file() or "python" not in script.read_text(errors="replace")[:200]:
        pytest.skip("no vaelab console script next to the interpreter")
    return str(script)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, fashion_available):
    """The reference: 3 epochs in this process, with the rows each training step used."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    cfg = config.resolve(overrides=_settings(3))
    rows: list[list[str]] = []
    real = objectives.elbo_terms

    def elbo_terms(model, x, **kwargs):
        if model.training:
            rows.append(_digests(x))
        return real(model, x, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objectives, "elbo_terms", elbo_terms)
        patch.setattr(experiment.Experiment, "_figures", lambda self, report, echo: None)
        summary = cli.run_training(cfg, run_dir, echo=lambda _line: None)
    return {"run_dir": run_dir, "rows": rows, "report": summary["report"]}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, fashion_available):
    """``torchrun -m vaelab train``: 2 epochs, then the fixture below resumes it."""
    directory = tmp_path_factory.mktemp("two")
    result = _torchrun(["-m", "vaelab", "train", *_set_flags(2), "--out", "run",
                        "--no-report"], cwd=directory)
    _check(result)
    return {"directory": directory, "run_dir": directory / "run", "first": result,
            "metrics_after_2": _metrics(directory / "run")}


@pytest.fixture(scope="module")
def resumed(two_processes):
    """Resume the 2-process run to epoch 3 under torchrun, with per-rank probes."""
    directory = two_processes["directory"]
    worker = _worker(directory)
    result = _torchrun([str(worker), "train", "--resume", "run", "--set", "train.epochs=3"],
                       cwd=directory, PROBE_DIR=str(directory / "probes"))
    _check(result)
    return {**two_processes, "second": result, "probes": _probes(directory)}


# --------------------------------------------------------------------------- 2-process tests


def test_two_processes_match_one_process_per_epoch(one_process, two_processes):
    want = _metrics(one_process["run_dir"])
    assert want[0]["train_objective"] > want[0]["train_nelbo"] + 0.01  # free bits active
    worst = _assert_rows_close(two_processes["metrics_after_2"], want[:2], RTOL)
    print(f"2 vs 1 process, epochs 1-2: largest relative metric gap {worst:.2e}")
    out = two_processes["first"].stdout
    assert "epoch 2/2" in out and out.count("epoch 1/2 ") == 1  # only rank 0 echoes


def test_resume_under_torchrun_only_rank0_writes_and_shards_are_disjoint(one_process, resumed):
    run_dir = resumed["run_dir"]
    worst = _assert_rows_close(_metrics(run_dir), _metrics(one_process["run_dir"]), RTOL)
    print(f"2 (resumed) vs 1 process, epochs 1-3: largest relative metric gap {worst:.2e}")
    rank0, rank1 = resumed["probes"]

    # Each step's shards are disjoint and together are exactly the one-process batch
    # (same permutation, same binarisation draw); epoch 3 = one-process steps 16..23.
    assert len(rank0["rows"]) == len(rank1["rows"]) == STEPS_PER_EPOCH
    for step, (a, b) in enumerate(zip(rank0["rows"], rank1["rows"])):
        assert a + b == one_process["rows"][2 * STEPS_PER_EPOCH + step], step
        assert not set(a) & set(b)
    assert [len(r) for r in rank1["rows"]][-1] == 0  # the 1-example batch left rank 1 empty

    # Only rank 0 writes checkpoints, metrics, figures and the report.
    assert rank1["writes"] == []
    assert rank0["writes"].count("save_checkpoint") >= 1
    # (atomic_write_text: config.toml and metrics.jsonl; save_image_grid: epoch samples)
    for name in ["atomic_write_text", "save_image_grid", "write_report", "_figures"]:
        assert name in rank0["writes"], name
    assert rank0["threads"] == rank1["threads"] == 1  # 2 ranks share 2 cores

    # Every rank evaluated the test split with the *best* weights and got the same report.
    best = load_file(run_dir / "checkpoints" / checkpoint.read_meta(
        run_dir / "checkpoints" / "best")["tensor_file"])
    for probe in (rank0, rank1):
        assert probe["weights"].keys() == {k[6:] for k in best if k.startswith("model.")}
        for key, digest in probe["weights"].items():
            tensor = best[f"model.{key}"].contiguous()
            assert digest == hashlib.sha256(tensor.numpy().tobytes()).hexdigest(), key
    assert rank0["report"] == rank1["report"]
    report = json.loads((run_dir / "report.json").read_text())
    want = one_process["report"]
    assert report["n_examples"] == want["n_examples"] == 200
    for key in ["nelbo", "recon", "kl", "nll", "nelbo_stderr", "nll_stderr"]:
        assert report[key] == pytest.approx(want[key], rel=RTOL), key


def test_vaelab_eval_two_processes_equals_one(resumed, tmp_path):
    run_dir = resumed["run_dir"]
    # 1200 test examples: 3 ELBO batches of 500 and 12 NLL batches of 100 to share.
    args = ["eval", str(run_dir), "--split", "test", "--limit", "1200", "--iw-samples", "10",
            "--batch-size", "100"]
    assert cli.main([*args, "--json", str(tmp_path / "one.json")]) == 0
    result = _torchrun([_console_script(), *args, "--json", str(tmp_path / "two.json")],
                       cwd=tmp_path)
    _check(result)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one.keys() == two.keys() and one["n_examples"] == two["n_examples"] == 1200
    # the AIS check went on past its first 8 examples (groups on both ranks), as in one
    assert one["estimator"]["correction"]["examples"] == 16
    for key, value in one.items():
        # The effective sample size is made of the weights exp(log w): a float32 log-weight
        # near -nll nats carries |nll| * 2^-24 nats per unit in the last place, which is a
        # relative error of the weight itself.
        rtol = EVAL_RTOL * one["nll"] if key == "ess_median" else EVAL_RTOL
        if isinstance(value, (float, list)):
            assert two[key] == pytest.approx(value, rel=rtol, abs=1e-12), key
        else:
            assert two[key] == value, key
    assert "NELBO (nats)" in result.stdout


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path, fashion_available):
    # Rank 1's loss turns NaN in epoch 2 (its 11th training step): rank 1 stops with the
    # NaN-guard message, rank 0 is stopped (by torchrun, or its collective fails), and
    # the epoch-1 checkpoint is intact.
    worker = _worker(tmp_path)
    result = _torchrun([str(worker), "train", *_set_flags(2), "--out", "run", "--no-report"],
                       cwd=tmp_path, PROBE_DIR=str(tmp_path / "probes"),
                       FAULT=f"nan:1:{STEPS_PER_EPOCH + 3}", VAELAB_DIST_TIMEOUT="20")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "vaelab: error: training diverged on rank 1 of 2 at step 10 (epoch 2, batch 2)" \
        in output
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "last")
    assert meta["train_state"]["epoch"] == 1 and meta["world_size"] == 2


def test_errors_reach_every_rank_and_a_stuck_rank_times_out(tmp_path):
    worker = _worker(tmp_path)
    result = _torchrun([str(worker), "primitives"], cwd=tmp_path,
                       PROBE_DIR=str(tmp_path / "probes"), VAELAB_DIST_TIMEOUT="3")
    assert result.returncode != 0
    rank0, rank1 = _probes(tmp_path)
    assert rank1["agree"] == "DataError: injected: fashion-mnist files missing on this node"
    assert rank0["agree"] == ("DistributedError: rank 1 failed during setup, so rank 0 stops "
                              "too: injected: fashion-mnist files missing on this node")
    stuck = rank0["stuck"]
    assert stuck.startswith("rank 0 lost contact with the other ranks during training")
    assert "timed out" in stuck.lower() and "within 3 s (VAELAB_DIST_TIMEOUT)" in stuck
    assert "\n" not in stuck
    assert f"vaelab: error: {stuck}" in result.stderr


# --------------------------------------------------------------------------- in-process tests


def _toy_model(dtype: torch.dtype = torch.float64):
    cfg = config.resolve(overrides=["model.hidden=16", "model.latent_dim=3"])
    torch.manual_seed(0)
    return models.build_from_config(cfg, (1, 4, 4)).to(dtype)


@pytest.mark.parametrize("kind", ["elbo", "iwae"])
@pytest.mark.parametrize("world", [2, 3])
def test_sliced_global_noise_gives_each_example_its_one_process_draws(kind, world):
    model = _toy_model()
    x = (torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    samples, gen = 3, lambda: seeded_generator(5, 0, 3)
    eps = train_mod.global_batch_noise(samples, 10, 3, gen(), dtype=torch.float64)
    shards = zip(x.tensor_split(world), eps.tensor_split(world, dim=1))
    if kind == "elbo":
        whole = objectives.elbo_terms(model, x, samples, generator=gen()).elbo
        parts = [objectives.elbo_terms(model, xs, samples, eps=es).elbo for xs, es in shards]
    else:
        whole = objectives.iwae_bound(model, x, samples, generator=gen())
        parts = [objectives.iwae_bound(model, xs, samples, eps=es) for xs, es in shards]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-10)


def test_eps_is_checked():
    model = _toy_model()
    x = torch.zeros(4, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"eps has shape \(2, 4, 3\) but 3 samples .* need "
                                          r"\(3, 4, 3\)"):
        objectives.elbo_terms(model, x, 3, eps=torch.zeros(2, 4, 3, dtype=torch.float64))

    class FullCovariance:
        def encode(self, x):
            return torch.distributions.MultivariateNormal(torch.zeros(len(x), 2),
                                                          torch.eye(2))

        def prior(self, device):
            return self.encode(torch.zeros(1))

    with pytest.raises(ConfigError, match="needs a diagonal Gaussian q.z.x., got "
                                          "MultivariateNormal"):
        objectives.iwae_bound(FullCovariance(), x, 1, eps=torch.zeros(1, 4, 2))


def test_free_bits_objective_matches_training_loss_in_one_process():
    model = _toy_model()
    x = (torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    for free_bits, weight in [(0.0, 1.0), (0.3, 0.7), (5.0, 1.0)]:
        cfg = config.resolve(overrides=[f"objective.free_bits={free_bits}"]).objective
        objective = objectives.build_objective(model, cfg)
        per_example, terms = objective(x, weight, seeded_generator(0, 1))
        want = objectives.training_loss(terms, beta=weight, free_bits=free_bits)
        assert per_example.mean().item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("threads, local_world, omp, expected", [
    (3, 2, "1", 3),      # train.threads wins
    (None, 2, None, 1),  # 2 ranks share the cores: cpu_count // 2 (2 cores here)
    (None, 2, "1", 1),   # what torchrun sets
    (None, 2, "2", 2),   # the user's OMP_NUM_THREADS
])
def test_threads_per_rank(monkeypatch, threads, local_world, omp, expected):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    try:
        assert runtime.configure_threads(threads, torch.device("cpu"), local_world) == expected
    finally:
        torch.set_num_threads(before)


def test_one_process_follows_the_thread_rule(monkeypatch, tmp_path):
    """One process: vaelab.threads' choice for the free cores (tests/test_threads.py)."""
    from vaelab import threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.REGISTRY_ENV, str(tmp_path))
    monkeypatch.setattr(threads, "measure", lambda exclude=tuple: threads.Machine(
        cores=2, machine_cores=2, busy=1.9))
    threads.reset()
    try:
        assert runtime.configure_threads(None, torch.device("cpu")) == 1  # a core is busy
    finally:
        threads.reset()
        torch.set_num_threads(before)


@pytest.mark.parametrize("value, expected", [
    (None, distributed.DEFAULT_TIMEOUT_SECONDS), ("", distributed.DEFAULT_TIMEOUT_SECONDS),
    ("2.5", 2.5), ("600", 600.0), ("0", None), ("-1", None), ("soon", None), ("nan", None),
])
def test_timeout_from_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("VAELAB_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("VAELAB_DIST_TIMEOUT", value)
    if expected is None:
        with pytest.raises(ConfigError, match="VAELAB_DIST_TIMEOUT = .* is not a positive"):
            distributed.timeout_seconds()
    else:
        assert distributed.timeout_seconds() == expected


def test_setup_outside_torchrun_is_one_process(monkeypatch):
    for name in ["WORLD_SIZE", "RANK", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    total = distributed.all_reduce_sum(torch.tensor([2.0]), ctx)
    assert float(total) == 2.0 and distributed.sum_over_ranks(total, ctx) is total
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE is 2 but RANK is not set"):
        distributed.setup(torch.device("cpu"))
