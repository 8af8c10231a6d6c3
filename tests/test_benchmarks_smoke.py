"""Smoke runs of the benchmark scripts (``--smoke``: tiny sizes, seconds, no timing asserted).

Each script runs as a subprocess on a synthetic 28x28 ``.npz`` dataset (so CI needs no
download) and must write JSON with the documented keys. The numbers checked are the ones
that do not depend on the machine: the matmul FLOP counts of the 784-400-20 model, and the
arithmetic relating the reported ratios.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# 784-400-20 MLP: encoder 784->400->40, decoder 20->400->784; 2 FLOPs per multiply-add.
ENCODER_FLOPS = 2 * (784 * 400 + 400 * 40)  # 659,200
DECODER_FLOPS = 2 * (20 * 400 + 400 * 784)  # 643,200
FORWARD_FLOPS = ENCODER_FLOPS + DECODER_FLOPS  # 1,302,400
# Backward: grad wrt weights for every layer, grad wrt input for all but the first.
EXECUTED_FLOPS = 3 * FORWARD_FLOPS - 2 * 784 * 400  # 3,280,000
#: The benchmarks keep times unrounded and round ratios to 3 decimals: the only slack a
#: recomputed ratio needs, whatever the speed of the machine (issue 22).
ROUNDED = 5e-4 + 1e-12


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """Where the smoke runs write ``<name>.json`` (rendered by the report test)."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, size=(160, 28, 28), dtype=np.uint8))
    return path


def _bench_common():
    """``benchmarks/common.py``, imported from its folder."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    return common


def _run(script: str, out: Path, *args: str, timeout: float = 300) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1]) == result  # printed too
    for key in ("benchmark", "smoke", "machine", "cpu_load"):
        assert key in result, key
    assert result["smoke"] is True
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    return result


def test_train_benchmark(tiny_npz, results_dir):
    r = _run("train.py", results_dir / "train.json", "--dataset", str(tiny_npz))
    assert r["examples_per_epoch"] == 160
    flops = r["flops_per_example"]
    assert flops == {"forward": FORWARD_FLOPS, "training_3x_forward": 3 * FORWARD_FLOPS,
                     "training_executed": EXECUTED_FLOPS}
    assert 3 * FORWARD_FLOPS == pytest.approx(3.9072e6)  # the 3.9 MFLOP per example
    gflops = r["matmul"]["gflops"]
    assert gflops > 0
    assert set(r["results"]) == {"batch_32", "batch_128"}
    for row in r["results"].values():
        ours, loop = row["vaelab"], row["dataloader_loop"]
        for timing in (ours, loop):
            assert timing["seconds"] > 0 and len(timing["all_seconds"]) == 1
            assert timing["examples_per_second"] == pytest.approx(160 / timing["seconds"],
                                                                  rel=1e-12)
        roofline = 160 * 3 * FORWARD_FLOPS / (gflops * 1e9)
        # times are unrounded; ratios are rounded to 3 decimals (ROUNDED), whatever the speed
        # GFLOP/s is rounded to 3 decimals: a relative error of at most 5e-4 / GFLOP/s
        assert row["roofline_seconds"] == pytest.approx(roofline, rel=5.01e-4 / gflops)
        assert row["roofline_fraction"] == pytest.approx(
            row["roofline_seconds"] / ours["seconds"], abs=ROUNDED)
        assert ours["best_seconds"] <= ours["seconds"]  # one repetition in the smoke run
        assert row["roofline_fraction_best"] == pytest.approx(
            row["roofline_seconds"] / ours["best_seconds"], abs=ROUNDED)
        assert row["speedup_vs_dataloader_loop"] == pytest.approx(
            loop["seconds"] / ours["seconds"], abs=ROUNDED)
        assert row["roofline_fraction_executed"] == pytest.approx(
            row["roofline_seconds"] / ours["seconds"] * EXECUTED_FLOPS / (3 * FORWARD_FLOPS),
            abs=ROUNDED)
        # BCE on uniform grey levels with an untrained model: about 784 * 0.69 nats
        assert 400 < row["vaelab_train_objective"] < 700
        # the fastest plain loop, beside the DataLoader loop
        plain = row["plain_loop"]
        assert plain["seconds"] > 0 and len(plain["all_seconds"]) == 1
        assert row["vaelab_vs_plain_loop"] == pytest.approx(plain["seconds"] / ours["seconds"],
                                                            abs=ROUNDED)
        assert (row["preset"], row["precision"]) == ("pytorch-example", "fp32")
        assert 400 < row["plain_loop_train_objective"] < 700
        # the epoch split into train_step and the loop's bookkeeping around it
        split = row["vaelab_in_step"]
        # metrics.jsonl rounds the epoch's seconds to 1 ms; the step time is unrounded
        assert 0 < split["step_seconds"] < ours["seconds"] + 5e-4
        assert split["outside_step_seconds"] == pytest.approx(
            ours["seconds"] - split["step_seconds"], rel=1e-9)
        assert split["step_vs_plain_loop"] == pytest.approx(
            plain["seconds"] / split["step_seconds"], abs=ROUNDED)


def test_train_benchmark_presets_and_precision(tiny_npz, results_dir):
    """``--presets``/``--precision``: rows keyed ``<preset> <precision> batch <B>``, the
    default model's FLOPs, bf16 against fp32, and the same objective to bf16 rounding."""
    r = _run("train.py", results_dir / "train-precision.json", "--dataset", str(tiny_npz),
             "--presets", "default", "--precision", "fp32", "bf16", "--batch-sizes", "64",
             "--note", "smoke")
    assert set(r["results"]) == {"default fp32 batch 64", "default bf16 batch 64"}
    # 784-512-256-(2 x 16) encoder, 16-256-512-784 decoder
    forward = 2 * (784 * 512 + 512 * 256 + 256 * 32) + 2 * (16 * 256 + 256 * 512 + 512 * 784)
    assert r["flops_per_example_by_preset"]["default batch 64"]["forward"] == forward
    assert r["note"] == "smoke" and r["matmul_bf16"]["gflops"] > 0
    fp32, bf16 = r["results"]["default fp32 batch 64"], r["results"]["default bf16 batch 64"]
    assert "dataloader_loop" not in fp32
    assert bf16["speedup_vs_fp32"] == pytest.approx(
        fp32["vaelab"]["seconds"] / bf16["vaelab"]["seconds"], abs=ROUNDED)
    for key in ("vaelab_train_objective", "plain_loop_train_objective"):
        assert bf16[key] == pytest.approx(fp32[key], rel=2.0 ** -8)


def test_train_benchmark_vampprior_plain_loop(tiny_npz, results_dir):
    """The VampPrior preset beside its plain loop (RMSprop, the first epoch's KL weight):
    per-example FLOPs at the preset's batch of 100 include the 500 pseudo-inputs' pass, and
    both loops start from the same objective."""
    r = _run("train.py", results_dir / "train-vampprior.json", "--dataset", str(tiny_npz),
             "--presets", "mnist-vampprior", "--batch-sizes", "preset")
    row = r["results"]["mnist-vampprior fp32 batch 100"]
    flops = r["flops_per_example_by_preset"]["mnist-vampprior batch 100"]["forward"]
    gated = 2 * 2 * (784 * 300 + 300 * 300)  # two maps per gated layer
    encoder = gated + 2 * 300 * 80
    decoder = 2 * 2 * (40 * 300 + 300 * 300) + 2 * 300 * 784
    mixture = 2 * 2 * 40 * 500  # float64 (z*z) @ P^T and z @ (P mu)^T, per example
    assert flops == pytest.approx(encoder * 6 + decoder + mixture, rel=1e-12)  # 1 + 500/100
    assert row["plain_loop_train_objective"] == pytest.approx(
        row["vaelab_train_objective"], rel=0.05)


def test_cuda_check_benchmark_on_the_cpu(tiny_npz, tmp_path):
    """The prepared GPU check runs end to end with ``--device cpu`` (no fp16 there): paired
    test NELBO differences, the precision each run recorded, the plain loop's ratio."""
    r = _run("cuda_check.py", tmp_path / "cuda_check.json", "--device", "cpu", "--threads", "1",
             "--dataset", str(tiny_npz))
    assert r["device"] == "cpu" and r["gpu"] is None
    assert set(r["matmul"]) == {"fp32 square", "fp32 batch_128_layer", "bf16 square",
                                "bf16 batch_128_layer"}
    assert all(m["gflops"] > 0 for m in r["matmul"].values())
    assert set(r["runs"]) == {"fp32 eager", "bf16 eager"}  # compile: --compile-smoke
    fp32, bf16 = r["runs"]["fp32 eager"], r["runs"]["bf16 eager"]
    for name, row in r["runs"].items():
        assert row["precision_recorded"] == [name.split()[0]]
        assert len(row["epoch_seconds"]) == 2 and row["test_examples"] == 64
    # the same 64 test images: the mean of the paired differences is the difference of means
    assert bf16["test_nelbo_minus_fp32_eager"] == pytest.approx(
        bf16["test_nelbo"] - fp32["test_nelbo"], abs=1e-9)
    assert abs(bf16["test_nelbo_minus_fp32_eager"]) < 0.5  # two epochs on 256 images
    for precision in ("fp32", "bf16"):
        plain = r["plain_loop"][precision]
        assert plain["vaelab_vs_plain_loop"] == pytest.approx(
            plain["seconds"] / r["runs"][f"{precision} eager"]["steady_epoch_seconds"],
            abs=ROUNDED)


def test_cuda_check_keeps_a_failed_run_as_its_one_line_error(tmp_path):
    """A run that fails (here: its directory already holds a run) becomes ``{"error": ...}``
    and the check goes on, instead of losing the rest of a lent GPU's minutes."""
    sys.path.insert(0, str(BENCH))
    try:
        from cuda_check import _train_one
    finally:
        sys.path.remove(str(BENCH))
    from vaelab import config

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.json").write_text("{}")
    row, nelbo = _train_one(config.resolve(overrides=["train.device=cpu"]), tmp_path, None)
    assert nelbo is None
    assert row["error"].startswith("CheckpointError: ") and "already holds a run" in row["error"]
    assert "\n" not in row["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_check_without_cuda_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "cuda_check.py"), "--smoke"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "Traceback" not in done.stderr


def test_plain_vampprior_kl_is_vaelabs(tmp_path):
    """The benchmark's written-out VampPrior KL (float32, expanded square) is vaelab's
    log q(z|x) - log p(z) (float64 mixture) to float32 rounding."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from train import _vampprior_kl
    finally:
        sys.path.remove(str(BENCH))
    from vaelab import config
    from vaelab.models import ENCODER_SCALES, build_from_config

    cfg = config.resolve(preset="mnist-vampprior")
    torch.manual_seed(0)
    model = build_from_config(cfg, (1, 28, 28))
    x = (torch.rand(8, 1, 28, 28) < 0.3).float()
    with torch.no_grad():
        q = model.encode(x)
        z = q.rsample()
        expected = (q.log_prob(z) - model.prior().log_prob(z)).sum()
        loc, scale = q.base_dist.loc, q.base_dist.scale
        got = _vampprior_kl(model, 40, ENCODER_SCALES[cfg.model.encoder_scale])(z, loc, scale)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_train_benchmark_against_keras(tiny_npz, tmp_path):
    """``--keras``: Keras 3's own fit of the example's model timed beside the keras-example
    preset, in the same process and threads."""
    pytest.importorskip("keras")
    r = _run("train.py", tmp_path / "train-keras.json", "--dataset", str(tiny_npz),
             "--presets", "keras-example", "--batch-sizes", "preset", "--keras")
    row = r["results"]["keras-example fp32 batch 128"]
    assert row["keras_versions"]["backend"] == "torch"
    assert len(row["keras_fit"]["all_seconds"]) == r["repeats"] == 1
    assert row["vaelab_vs_keras"] == pytest.approx(
        row["keras_fit"]["seconds"] / row["vaelab"]["seconds"], abs=ROUNDED)


def test_precision_accuracy_benchmark(tiny_npz, tmp_path):
    """Per seed, an fp32 and a bf16 run, each recorded as trained in its precision; the
    summary's mean difference is the mean of the pairs', with the seeds' spread beside it."""
    r = _run("precision_accuracy.py", tmp_path / "precision_accuracy.json",
             "--dataset", str(tiny_npz), "--seeds", "0", "1", "--threads", "1")
    assert r["seeds"] == [0, 1] and set(r["pairs"]) == {"seed 0", "seed 1"}
    for pair in r["pairs"].values():
        for precision in ("fp32", "bf16"):
            assert pair[precision]["precision_recorded"] == [precision]
            assert math.isfinite(pair[precision]["test_nelbo"])
        assert pair["test_nelbo_bf16_minus_fp32"] == pytest.approx(
            pair["bf16"]["test_nelbo"] - pair["fp32"]["test_nelbo"], rel=1e-6, abs=1e-9)
        assert pair["paired_stderr"] > 0 and pair["median_epoch_speedup"] > 0
    diffs = [p["test_nelbo_bf16_minus_fp32"] for p in r["pairs"].values()]
    assert r["test_nelbo_bf16_minus_fp32"] == pytest.approx(sum(diffs) / 2)
    assert r["seeds_stderr"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    fp32 = [p["fp32"]["test_nelbo"] for p in r["pairs"].values()]
    assert r["fp32_test_nelbo_sd_across_seeds"] == pytest.approx(abs(fp32[0] - fp32[1]) / 2**0.5)
    assert fp32[0] != fp32[1]  # the seed reached the training


def test_precision_step_benchmark(tiny_npz, tmp_path):
    """Three arms per preset, each with its per-round times; fp32's speed-up over itself
    is 1."""
    r = _run("precision_step.py", tmp_path / "precision_step.json", "--dataset", str(tiny_npz),
             "--presets", "pytorch-example", "--threads", "1", "--note", "a quiet machine")
    assert r["note"] == "a quiet machine"  # every benchmark's --note reaches its JSON
    row = r["results"]["pytorch-example"]
    assert row["batch_size"] == 128 and row["steps_per_block"] == 3 and r["rounds"] == 2
    assert list(row["arms"]) == ["fp32", "bf16", "fp32, oneDNN bf16 products"]
    for arm in row["arms"].values():
        assert len(arm["all_step_ms"]) == 2 and arm["step_ms"] > 0
    assert row["arms"]["fp32"]["speedup_vs_fp32"] == 1.0


def test_binarize_benchmark(tmp_path):
    r = _run("binarize.py", tmp_path / "binarize.json", "--threads", "1")
    assert r["pixels_per_batch"] == 128 * 784 and r["rounds"] == 2
    for arm in ("uniform", "bytes"):
        times = r["arms"][arm]["all_ms_per_batch"]
        assert len(times) == 2 and r["arms"][arm]["ms_per_batch"] == statistics.median(times)
    ratios = [u / b for u, b in zip(r["arms"]["uniform"]["all_ms_per_batch"],
                                    r["arms"]["bytes"]["all_ms_per_batch"])]
    assert r["bytes_speedup"] == pytest.approx(statistics.median(ratios), abs=ROUNDED)


def test_write_result_keeps_a_note_only_when_given(tmp_path):
    common = _bench_common()
    common.write_result({"benchmark": "x"}, tmp_path / "a.json", "x", True, echo=False,
                        note="beside a training")
    common.write_result({"benchmark": "x"}, tmp_path / "b.json", "x", True, echo=False)
    assert json.loads((tmp_path / "a.json").read_text())["note"] == "beside a training"
    assert "note" not in json.loads((tmp_path / "b.json").read_text())


def test_profile_step_benchmark(tiny_npz, results_dir):
    r = _run("profile_step.py", results_dir / "profile_step.json", "--dataset", str(tiny_npz),
             "--presets", "pytorch-example", "--top", "8")
    row = r["results"]["pytorch-example fp32"]
    assert row["step_ms"] > 0 and len(row["all_step_ms"]) == 5 and r["steps"] == 10
    ops = row["top_ops"]
    assert 1 <= len(ops) <= 8
    assert [o["self_ms_per_step"] for o in ops] == sorted(
        (o["self_ms_per_step"] for o in ops), reverse=True)
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-3
    # the four products of the forward and the backward's are there
    assert {"aten::addmm", "aten::mm"} & {o["op"] for o in ops}


def test_eval_benchmark(tiny_npz, results_dir):
    r = _run("eval.py", results_dir / "eval.json", "--dataset", str(tiny_npz))
    assert r["examples"] == 20
    for k in (10, 50):
        row = r["speed"][f"k_{k}"]
        assert row["k"] == k and row["seconds"] > 0
        # one encoder pass per example, one decoder pass per importance sample
        assert row["matmul_flops"] == 20 * (ENCODER_FLOPS + k * DECODER_FLOPS)
        assert row["roofline_fraction"] == pytest.approx(
            row["roofline_seconds"] / row["seconds"], abs=ROUNDED)
        assert row["roofline_fraction_best"] >= row["roofline_fraction"]
        # 0/1 pixels, untrained model at the data mean: about -784 * 0.69 nats
        assert -700 < row["mean_log_likelihood"] < -300
    assert set(r["memory"]) == {"k_50"}
    for k in (50,):
        mem = r["memory"][f"k_{k}"]
        assert mem["k"] == k
        assert mem["peak_rss_mb"] >= mem["peak_during_eval_mb"] - 0.2
        assert mem["peak_during_eval_mb"] >= mem["rss_before_eval_mb"] > 50  # torch alone is more
        assert mem["eval_increase_mb"] == pytest.approx(
            mem["peak_during_eval_mb"] - mem["rss_before_eval_mb"], abs=0.2)
        assert mem["method"] in ("VmHWM after clear_refs", "ru_maxrss")
    assert isinstance(r["memory_flat_in_k"], bool)
    fixed = r["memory_fixed_mmap_threshold"]["k_50"]
    assert fixed["k"] == 50 and fixed["peak_during_eval_mb"] >= fixed["rss_before_eval_mb"] > 50
    assert isinstance(r["memory_flat_in_k_fixed_mmap_threshold"], bool)
    kept = r["memory_keep_freed"]["k_50"]
    assert kept["k"] == 50 and kept["peak_during_eval_mb"] >= kept["rss_before_eval_mb"] > 50
    assert isinstance(r["memory_flat_in_k_keep_freed"], bool)


@pytest.mark.slow  # a whole `vaelab train` under a memory monitor: opt-in with --run-slow, to keep the suite near 5 minutes
def test_memory_benchmark(tiny_npz, results_dir):
    r = _run("memory.py", results_dir / "memory.json", "--dataset", str(tiny_npz),
             "--no-report")
    assert r["argv"][:2] == ["vaelab", "train"] and "--no-report" in r["argv"]
    assert r["epochs"] == 1 and r["final_report"] is False
    assert 50 < r["peak_rss_mb"] < 4096
    assert r["meets_target"] == (r["peak_rss_mb"] < 1024)
    assert any("epoch 1/1" in line for line in r["output_tail"])
    # the sampled timeline never exceeds the kernel's high-water mark
    assert all(mb <= r["peak_rss_mb"] + 1 for _, mb in r["rss_timeline"])


def test_startup_benchmark(results_dir):
    r = _run("startup.py", results_dir / "startup.json")
    help_row = r["commands"]["vaelab --help"]
    assert help_row["argv"] == ["vaelab", "--help"] and help_row["seconds"] > 0
    assert help_row["imports_torch"] is False  # the CLI keeps torch out of --help
    assert r["help_meets_target"] == (help_row["seconds"] < 0.5)
    assert set(r["reference"]) == {"python -c pass", "python -c 'import torch'"}



@pytest.mark.slow  # 12 training processes: opt-in with --run-slow, to keep the suite near 5 minutes
def test_threads_benchmark(tiny_npz, tmp_path):
    # not in results_dir: report.py renders train/eval/memory/startup only
    r = _run("threads.py", tmp_path / "threads.json", "--dataset", str(tiny_npz))
    assert r["argv"][:4] == ["vaelab", "train", "--preset", "pytorch-example"]
    assert "--no-report" in r["argv"] and "data.validation_size=0" in r["argv"]
    assert r["repeats"] == 1 and r["torch_default_threads"] >= 1
    assert r["old_defaults_env"]["OMP_NUM_THREADS"] == str(r["torch_default_threads"])
    assert list(r["settings"]) == ["alone_old", "alone_new", "two_old", "two_new"]
    totals = {}
    for name, row in r["settings"].items():
        (trial,) = row["trials"]
        n_runs = 2 if name.startswith("two") else 1
        assert len(trial["runs"]) == len(row["per_run_examples_per_second"]) == n_runs
        assert trial["total_examples_per_second"] == pytest.approx(
            sum(run["examples_per_second"] for run in trial["runs"]), abs=0.2)
        assert row["total_examples_per_second"] == trial["total_examples_per_second"]
        assert 0.0 <= trial["overlap"] <= 1.0 and (n_runs == 2 or trial["overlap"] == 1.0)
        for run in trial["runs"]:
            assert run["examples_per_second"] > 0 and run["seconds"] > 0
            if name.endswith("_old"):  # OMP_NUM_THREADS set: vaelab chooses nothing
                assert run["thread_message"] is None and run["chosen_threads"] is None
        totals[name] = row["total_examples_per_second"]
    ratios = r["ratios"]
    assert ratios["two_new_total_vs_alone_new"] == pytest.approx(
        totals["two_new"] / totals["alone_new"], abs=1e-3)
    assert ratios["alone_new_vs_alone_old"] == pytest.approx(
        totals["alone_new"] / totals["alone_old"], abs=1e-3)
    assert r["meets_target"] == (ratios["two_new_total_vs_alone_new"] >= 1.1
                                 and ratios["alone_new_vs_alone_old"] >= 0.95)
    assert len(r["table"]) == 6 and r["table"][0].startswith("| set-up |")

@pytest.fixture(scope="module")
def full_batches_npz(tmp_path_factory) -> Path:
    """1,280 random 28x28 images: vaelab holds out 128 for the test split and trains on 1,152
    = 9 full batches of 128, so a batch sum and a batch mean train alike under Adam."""
    path = tmp_path_factory.mktemp("data") / "full_batches.npz"
    rng = np.random.default_rng(1)
    np.savez(path, images=rng.integers(0, 256, size=(1280, 28, 28), dtype=np.uint8))
    return path


def _check_source_comparison(r: dict, source: str, preset: str, seeds: list[int]) -> None:
    """The per-epoch statistics of a source check agree with its per-seed runs."""
    assert r["seeds"] == seeds and r["epochs"] == 2 and r["issue"] == 16
    lab_runs, source_runs = r["runs"]["vaelab"], r["runs"][source]
    assert [run["seed"] for run in source_runs] == seeds
    for run in lab_runs:
        assert run["argv"][:4] == ["vaelab", "train", "--preset", preset]
        assert [m["epoch"] for m in run["metrics"]] == [1, 2]
        assert all("test_nelbo" in m and "val_nelbo" not in m for m in run["metrics"])
    for split in ("test", "train"):
        block = r[f"{split}_loss"]
        assert len(block["rows"]) == 2
        for e, row in enumerate(block["rows"]):
            a = [run["per_epoch"][e][f"{split}_loss"] for run in source_runs]
            b = [run["metrics"][e][f"{split}_nelbo"] for run in lab_runs]
            assert row["source_mean"] == pytest.approx(statistics.fmean(a), abs=1e-3)
            assert row["ours_mean"] == pytest.approx(statistics.fmean(b), abs=1e-3)
            assert row["diff"] == pytest.approx(row["ours_mean"] - row["source_mean"], abs=2e-3)
            pooled = ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5
            assert row["spread"] == pytest.approx(pooled, abs=1e-3)
            assert row["agree"] == (abs(row["diff"]) < row["spread"])
            # 784 x BCE on uniform grey levels: about 784 * 0.69 nats, whoever computes it
            assert 400 < row["source_mean"] < 700 and 400 < row["ours_mean"] < 700
        assert block["agree_every_epoch"] == all(row["agree"] for row in block["rows"])
        assert block["table"].startswith("| epoch |")
    assert r["passed"] == (r["test_loss"]["agree_every_epoch"]
                           and r["train_loss"]["agree_every_epoch"])
    # two identical systems with 2 seeds each: P(|t_2| < 1) = 0.577
    assert r["identical_systems_agree_per_epoch_probability"] == pytest.approx(0.577, abs=1e-3)
    # the twin: the source's code from vaelab's weights with vaelab's random streams computes
    # what vaelab computes (to float rounding)
    twin = r["twin"]
    assert twin["seed"] == seeds[0] and len(twin["per_epoch"]) == 2
    assert twin["max_abs_diff_test"] < 0.05 and twin["max_abs_diff_train"] < 0.05
    assert r["timing"]["source_train_seconds_per_epoch"] > 0
    assert r["timing"]["vaelab_train_seconds_per_epoch"] > 0


@pytest.mark.slow  # 5 trainings in fresh processes, Keras imported 3 times: opt-in with --run-slow, to keep the suite near 5 minutes
def test_check_keras_example(full_batches_npz, tmp_path):
    if importlib.util.find_spec("keras") is None:
        pytest.skip("the Keras check runs Keras 3: pip install 'vaelab[keras]'")
    # five trainings in fresh processes (Keras' import alone takes seconds): a longer limit
    r = _run("check_keras_example.py", tmp_path / "keras.json", "--dataset",
             str(full_batches_npz), "--hybrids", "1", timeout=900)
    _check_source_comparison(r, "keras", "keras-example", [0, 1])
    for run in r["runs"]["keras"]:
        assert run["backend"] == "torch" and run["adam_epsilon"] == pytest.approx(1e-7)
        assert (run["n_train"], run["n_test"]) == (1152, 128)
        assert (run["init"], run["streams"]) == ("keras", "keras")
    # the hybrids: Keras' code with one of vaelab's two random sources, for seed 0 only
    hybrid_runs = r["runs"]["hybrids"]
    assert [(h["seed"], h["init"], h["streams"]) for h in hybrid_runs["vaelab-init"]] == [
        (0, "vaelab", "keras")]
    assert [(h["seed"], h["init"], h["streams"]) for h in hybrid_runs["vaelab-streams"]] == [
        (0, "keras", "vaelab")]
    assert r["hybrids"]["seeds"] == [0] and len(r["hybrids"]["rows"]) == 2
    final = r["hybrids"]["rows"][-1]
    assert final["Keras code, vaelab's init"]["mean"] == pytest.approx(
        hybrid_runs["vaelab-init"][0]["per_epoch"][-1]["test_loss"], abs=1e-3)


@pytest.mark.slow  # 5 trainings in fresh processes: opt-in with --run-slow, to keep the suite near 5 minutes
def test_check_pytorch_example(full_batches_npz, tmp_path):
    r = _run("check_pytorch_example.py", tmp_path / "pytorch.json", "--dataset",
             str(full_batches_npz), timeout=900)
    _check_source_comparison(r, "example", "pytorch-example", [1, 2])
    assert all((run["n_train"], run["n_test"]) == (1152, 128) for run in r["runs"]["example"])


def test_matmul_rate_and_flop_counter():
    common = _bench_common()
    import torch

    rate = common.matmul_rate(n=64, repeats=2, min_seconds=0.01)
    assert rate["gflops"] > 0 and len(rate["all_gflops"]) == 2 and rate["n"] == 64
    layer = common.matmul_rate(repeats=1, min_seconds=0.01, shape=(8, 784, 16), per_read=3)
    assert layer["shape"] == [8, 784, 16] and "n" not in layer and layer["gflops"] > 0
    a, b = torch.ones(8, 16), torch.ones(16, 4)
    assert common.linear_matmul_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.summarize([2.0, 1.0, 4.0], examples=10) == {
        "seconds": 2.0, "best_seconds": 1.0, "all_seconds": [2.0, 1.0, 4.0],
        "examples_per_second": 5.0}


def test_report_renders_the_smoke_results(results_dir):
    done = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results",
                           str(results_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = {p.stem for p in results_dir.glob("*.json")}
    text = done.stdout
    assert text.startswith("| benchmark | measured | against |")
    if "train" in names:
        train = json.loads((results_dir / "train.json").read_text())
        row = train["results"]["batch_32"]
        assert f"roofline fraction **{row['roofline_fraction']:.2f}**" in text
    if "startup" in names:
        assert "`vaelab --help`" in text and "no torch import" in text
    for missing in {"train", "eval", "memory", "startup"} - names:
        assert f"| {missing} | not run | |" in text
    assert ("Measured on" in text) == bool(names)


def _pythae_python() -> str | None:
    """An interpreter that imports pythae: this one, or ``$PYTHAE_PYTHON``."""
    import importlib.util
    import os

    if importlib.util.find_spec("pythae") is not None:
        return sys.executable
    candidate = os.environ.get("PYTHAE_PYTHON")
    if candidate and subprocess.run([candidate, "-c", "import pythae"],
                                    capture_output=True).returncode == 0:
        return candidate
    return None


def test_pythae_compare_benchmark(tiny_npz, tmp_path):
    python = _pythae_python()
    if python is None:
        pytest.skip("pythae is not importable (pip install pythae==0.1.2 in a scratch venv "
                    "and set PYTHAE_PYTHON to its python)")
    r = _run("pythae_compare.py", tmp_path / "pythae_compare.json", "--dataset",
             str(tiny_npz), "--pythae-python", python)
    # 160 images: 40 held out for validation, the other 120 trained on (train_limit 200)
    (data,) = r["data"]
    assert data["train"]["n"] == 120 and data["validation"]["n"] == 40 and data["seed"] == 0
    assert r["epochs_per_run"] == 1 and r["repeats"] == 1 and r["threads"] == 1
    assert r["order"] == ["pythae", "vaelab"]
    assert r["versions"]["pythae"] == "0.1.2"
    (p_run,), (v_run,) = r["pythae"]["runs"], r["vaelab"]["runs"]
    assert p_run["n_train"] == 120 and p_run["n_validation"] == 40
    assert p_run["torch_threads"] == v_run["torch_threads"] == 1
    (p,), (v,) = p_run["epochs"], v_run["epochs"]
    for e in (p, v):
        assert e["epoch"] == 1 and e["lr"] == pytest.approx(1e-4)
        assert 0 < e["train_seconds"] and 0 < e["eval_seconds"]
        assert e["epoch_seconds"] >= e["train_seconds"] + e["eval_seconds"] - 1e-3
        # random 28x28 grey images binarised at about half on: about 784 * ln 2 nats at start
        assert 400 < e["eval_loss"] < 700
    ratio = r["ratio_pythae_over_vaelab"]
    assert ratio["train_plus_eval"] == pytest.approx(
        (p["train_seconds"] + p["eval_seconds"]) / (v["train_seconds"] + v["eval_seconds"]),
        rel=0.01)
    assert r["meets_target"] == (ratio["train_plus_eval"] >= 3.0)
    (row,) = r["eval_loss"]["per_epoch"]
    assert row["pythae"] == [p["eval_loss"]] and row["vaelab"] == [v["eval_loss"]]
    # same model, data and optimizer from different initial weights: close after one epoch
    assert row["difference_pythae_minus_vaelab"] == [pytest.approx(
        p["eval_loss"] - v["eval_loss"], abs=2e-3)]
    assert abs(row["mean_difference"]) < 10
    flops = r["roofline"]["flops_per_example"]  # 784-400-40: 2 FLOPs per multiply-add
    assert flops["forward"] == 2 * (784 * 400 + 400 * 80 + 40 * 400 + 400 * 784)
    assert flops["training_executed"] == 3 * flops["forward"] - 2 * 784 * 400


def test_allocator_benchmark(tiny_npz, tmp_path):
    """Both arms evaluate the same run to the same NLL; each process's resources are kept."""
    from conftest import train
    from vaelab import config

    run = tmp_path / "run"
    train(config.resolve(overrides=[f"data.dataset={tiny_npz}", "data.test_size=0",
                                    "data.validation_size=32",
                                    "train.epochs=1", "model.hidden=32", "model.latent_dim=3",
                                    "train.device=cpu"]), run, report=False)
    r = _run("allocator.py", tmp_path / "allocator.json", "--run-dir", str(run), "--threads",
             "1", "--", "--split", "all", "--estimator", "is", "--iw-samples", "20")
    assert r["eval_args"] == ["--split", "all", "--estimator", "is", "--iw-samples", "20"]
    assert [row["arm"] for row in r["runs"]] == ["off", "on"] and r["repeats"] == 1
    assert r["same_nll"] and r["runs"][0]["nll_line"].startswith("NLL")
    for row in r["runs"]:
        assert row["wall_seconds"] > 0 and row["minor_faults"] > 0 and row["max_rss_mb"] > 0
    assert r["wall_speedup_on_vs_off"] == pytest.approx(
        r["runs"][0]["wall_seconds"] / r["runs"][1]["wall_seconds"], abs=ROUNDED)


def test_pythae_compare_vaelab_set_and_steady_epochs():
    """``--vaelab-set`` reaches vaelab's config only, and the steady figures leave each run's
    first epoch (train.compile's compilation) out (no pythae needed)."""
    sys.path.insert(0, str(BENCH))  # _summary imports common when called
    try:
        _check_vaelab_set_and_steady_epochs()
    finally:
        sys.path.remove(str(BENCH))


def _check_vaelab_set_and_steady_epochs():
    from pythae_compare import _summary, _vaelab_config

    spec = {"epochs": 2, "threads": 1, "seed": 0,
            "vaelab_set": ["train.precision=bf16", "train.compile=true"]}
    cfg = _vaelab_config(spec)
    assert (cfg.train.precision, cfg.train.compile, cfg.train.epochs) == ("bf16", True, 2)
    assert _vaelab_config({**spec, "vaelab_set": []}).train.precision == "fp32"
    runs = [{"epochs": [{"train_seconds": 20.0, "eval_seconds": 1.0, "epoch_seconds": 22.0},
                        {"train_seconds": 3.0, "eval_seconds": 0.5, "epoch_seconds": 4.0},
                        {"train_seconds": 2.0, "eval_seconds": 0.5, "epoch_seconds": 3.0}]}]
    summary = _summary(runs)
    assert summary["train_plus_eval"]["seconds"] == pytest.approx(3.5)  # median of 3
    assert summary["train_plus_eval_steady"]["seconds"] == pytest.approx(3.0)  # of 3.5, 2.5
    assert "train_plus_eval_steady" not in _summary([{"epochs": runs[0]["epochs"][:1]}])


def conv_model_flops(shape, channels, blocks, hidden, latent, p):
    """Forward FLOPs per example of vaelab's conv model, layer by layer (2 per multiply-add;
    a transposed conv costs in_c * out_c * k^2 per *input* pixel)."""
    c, h, w = shape
    flops, sizes = 0, []
    for c_in, c_out in zip((c, *channels[:-1]), channels):  # encoder stages
        h, w = h // 2, w // 2
        flops += 2 * c_in * c_out * 16 * h * w + blocks * 2 * (2 * c_out * c_out * 9 * h * w)
        sizes.append((h, w))
    dense = (channels[-1] * h * w, *hidden)
    flops += sum(2 * a * b for a, b in zip(dense, dense[1:])) + 2 * dense[-1] * 2 * latent
    dense = (latent, *reversed(hidden), channels[-1] * h * w)  # decoder
    flops += sum(2 * a * b for a, b in zip(dense, dense[1:]))
    rev = list(reversed(channels))
    for (hh, ww), c_in, c_out in zip(reversed(sizes), rev, [*rev[1:], rev[-1]]):
        flops += blocks * 2 * (2 * c_in * c_in * 9 * hh * ww) + 2 * c_in * c_out * 16 * hh * ww
    kernel = 1 if blocks else 9
    return flops + 2 * channels[0] * p * c * kernel * shape[1] * shape[2]


@pytest.mark.slow  # conv epochs of two models, two loops each: opt-in with --run-slow, to keep the suite near 5 minutes
def test_conv_benchmark(results_dir):
    r = _run("conv.py", results_dir / "conv.json")
    assert set(r["results"]) == {"colour", "grey28"}
    colour, grey = r["results"]["colour"], r["results"]["grey28"]
    # the cifar10 preset's model and the default --model conv, FLOPs checked layer by layer
    assert colour["model"] == {
        "kind": "conv", "channels": [32, 64, 128], "blocks": 2, "hidden": [], "latent_dim": 128,
        "likelihood": "discretized-logistic-mixture", "likelihood_options": {"components": 10},
        "binarize": "none", "event_shape": [3, 32, 32]}
    fwd = conv_model_flops((3, 32, 32), (32, 64, 128), 2, (), 128, 40)
    assert fwd == 148_635_648
    assert colour["flops_per_example"] == {"forward": fwd, "training_3x_forward": 3 * fwd}
    assert grey["model"]["channels"] == [32, 64] and grey["model"]["blocks"] == 0
    fwd28 = conv_model_flops((1, 28, 28), (32, 64), 0, (512, 256), 16, 1)
    assert grey["flops_per_example"]["forward"] == fwd28
    assert 3 * fwd28 == pytest.approx(61e6, rel=0.01)  # the 61 MFLOP per example
    gflops = r["matmul"]["gflops"]
    for row in (colour, grey):
        n = row["examples_per_epoch"]
        assert n == 64 and row["batch_size"] == 32
        ours, loop = row["vaelab"], row["plain_loop"]
        assert ours["seconds"] > 0 and loop["seconds"] > 0
        roofline = n * row["flops_per_example"]["training_3x_forward"] / (gflops * 1e9)
        assert row["roofline_seconds"] == pytest.approx(roofline, rel=5.01e-4 / gflops)
        assert row["roofline_fraction"] == pytest.approx(
            row["roofline_seconds"] / ours["seconds"], abs=ROUNDED)
        assert row["speedup_vs_plain_loop"] == pytest.approx(
            loop["seconds"] / ours["seconds"], abs=ROUNDED)
        # same model, same loss: the epoch's mean objective agrees (different batches)
        assert row["plain_loop_objective"] == pytest.approx(row["vaelab_train_objective"],
                                                            rel=0.02)
    # random bytes under the data-mean mixture: about 8 bits per sub-pixel
    assert 7.5 < colour["vaelab_train_objective"] / (3072 * math.log(2)) < 9
    assert colour["epoch_seconds_50000"]["vaelab"] == pytest.approx(  # rounded to 0.1 s
        colour["vaelab"]["seconds"] * 50000 / 64, abs=0.05 + 1e-9)


def test_source_check_statistics_on_known_runs():
    """The comparison the source checks print (issue 16), on runs whose numbers are known:
    means, pooled SD, t and the agreement flag per epoch, and the twin's differences."""
    common = _bench_common()
    source = [{"per_epoch": [{"test_loss": t, "train_loss": t + 1, "train_seconds": 1.0,
                              "epoch_seconds": 1.5} for t in run], "wall_seconds": 3.0}
              for run in ([10.0, 8.0], [11.0, 9.0], [12.0, 7.0])]
    ours = [{"metrics": [{"test_nelbo": t, "train_nelbo": t + 1, "seconds": 0.5}
                         for t in run], "epoch_wall_seconds": [None, 0.7], "wall_seconds": 2.0}
            for run in ([11.0, 10.0], [12.0, 11.0], [13.0, 12.0])]
    twin = {"seed": 0, "per_epoch": [{"epoch": 1, "test_loss": 10.5, "train_loss": 11.5},
                                     {"epoch": 2, "test_loss": 10.0, "train_loss": 11.0}]}
    out = common.summarize_source_check("src", source, ours, twin)
    epoch1, epoch2 = out["test_loss"]["rows"]
    # epoch 1: means 11 and 12, both SDs 1: pooled 1, diff 1 is not < 1
    assert (epoch1["source_mean"], epoch1["ours_mean"], epoch1["diff"]) == (11.0, 12.0, 1.0)
    assert epoch1["spread"] == pytest.approx(1.0) and not epoch1["agree"]
    assert epoch1["t"] == pytest.approx(1.0 / (1.0 * (2 / 3) ** 0.5), abs=0.01)
    # epoch 2: means 8 and 11, SDs 1 and 1: diff 3 > 1
    assert epoch2["diff"] == 3.0 and not epoch2["agree"]
    assert out["passed"] is False and out["test_loss"]["epochs_not_agreeing"] == [1, 2]
    assert out["twin"]["per_epoch"][0]["diff_test"] == pytest.approx(0.5)
    assert out["twin"]["max_abs_diff_test"] == pytest.approx(0.5)
    assert out["timing"]["train_speedup_vaelab_vs_source"] == pytest.approx(2.0)
    # two identical systems with 3 seeds each pass one epoch with P(|t_4| < x), x =
    # 1 / sqrt(1/3 + 1/3); Student's t with 4 degrees of freedom: x (x^2 + 6) / (x^2 + 4)^1.5
    x = 1.5 ** 0.5
    assert common.agreement_chance(3, 3) == pytest.approx(x * (x * x + 6) / (x * x + 4) ** 1.5,
                                                          abs=5e-4)


def test_keras_hybrids_summary_on_known_runs():
    """``check_keras_example.py --hybrids``' summary (issue 16): per-epoch mean and SD of
    the four (initial weights, random streams) combinations over the seeds the hybrids ran
    for, and a Brown-Forsythe test that groups the runs by whose initial weights they used."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sys.path.insert(0, str(BENCH))
    try:
        import check_keras_example as keras_check
    finally:
        sys.path.remove(str(BENCH))

    def keras_like(finals):
        return [{"seed": i, "per_epoch": [{"test_loss": f + 10}, {"test_loss": f}]}
                for i, f in enumerate(finals)]

    tight, wide = [1.0, 1.1, 0.9, 1.0], [0.0, 2.0, 3.0, -1.0]
    source = keras_like(tight + [50.0])  # a fifth seed without hybrids: left out
    ours = [{"metrics": [{"test_nelbo": f + 10}, {"test_nelbo": f}]} for f in wide + [50.0]]
    hybrids = {"vaelab-init": keras_like(wide), "vaelab-streams": keras_like(tight)}
    out = keras_check.summarize_hybrids(source, ours, hybrids)
    assert out["seeds"] == [0, 1, 2, 3] and [r["epoch"] for r in out["rows"]] == [1, 2]
    last = out["rows"][1]
    assert last["Keras (its init, its streams)"] == {"mean": 1.0, "sd": round(
        statistics.stdev(tight), 3)}
    assert last["vaelab (its init, its streams)"]["mean"] == 1.0
    assert out["rows"][0]["Keras code, vaelab's init"]["mean"] == 11.0
    assert out["last_epoch_sd_keras_init"] == round(statistics.stdev(tight * 2), 3)
    assert out["last_epoch_sd_vaelab_init"] == round(statistics.stdev(wide * 2), 3)
    expected = scipy_stats.levene(tight * 2, wide * 2, center="median").pvalue
    assert out["last_epoch_equal_spread_p_by_init"] == pytest.approx(expected, abs=1e-6)
    assert out["last_epoch_equal_spread_p_by_init"] < 0.01
    # grouped by streams, each group holds two tight and two wide curves: no difference
    assert out["last_epoch_equal_spread_p_by_streams"] == pytest.approx(1.0)
    assert out["table"].splitlines()[0].startswith("| epoch | Keras (its init, its streams)")
    # the source's own fifth seed is compared with its first four only when there are two
    assert "source_other_seeds" not in out
    source.append(keras_like([-50.0])[0] | {"seed": 5})
    out = keras_check.summarize_hybrids(source, ours, hybrids)
    assert out["source_other_seeds"] == [4, 5]
    assert out["source_last_epoch_sd_other_seeds"] == round(statistics.stdev([50.0, -50.0]), 3)
    assert out["source_last_epoch_equal_spread_p_hybrid_vs_other_seeds"] == pytest.approx(
        scipy_stats.levene(tight, [50.0, -50.0], center="median").pvalue, abs=1e-6)


#: Larochelle's binarised MNIST (the .amat.gz files), beside the checkout as on the
#: project's machines.
LAROCHELLE_DIR = ROOT.parent / "shared" / "data" / "binarized-mnist"


def test_reproduce_smoke_run(tmp_path):
    """``reproduce.py --epochs 1``: a smoke run of the mnist-vae protocol (on Larochelle's
    files, as the preset), marked as such."""
    if not (LAROCHELLE_DIR / "binarized_mnist_train.amat.gz").is_file():
        pytest.skip(f"needs Larochelle's binarised MNIST in {LAROCHELLE_DIR}")
    out = tmp_path / "reproduce.json"
    cmd = [sys.executable, str(BENCH / "reproduce.py"), "mnist-vae", "--epochs", "1",
           "--eval-limit", "20", "--set", "data.train_limit=2000", "--data-dir",
           str(LAROCHELLE_DIR), "--run-dir", str(tmp_path / "run"), "--threads", "1",
           "--eval-set", "eval.auto.check_examples=5", "--eval-set", "eval.auto.check_steps=10",
           "--eval-set", "eval.auto.max_check_examples=5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["epochs_trained"] == 1 and r["budget_epochs"] is None
    assert [(t["estimator"], t["iw_samples"]) for t in r["test"]] == [
        ("is", 200), ("is", 5000), ("auto", None)]
    assert r["test"][2]["report"]["estimator"]["correction"]["examples"] == 5
    assert all(t["n_examples"] == 20 and math.isfinite(t["nll"]) for t in r["test"])
    # the importance-sampled NLL is below the NELBO of the same images (Jensen)
    assert all(t["nll"] <= t["nelbo"] + 3 * t["nll_stderr"] for t in r["test"])
    assert r["published"]["value"] == 89.9 and r["pythae"]["value"] == 89.78
    assert r["config"]["data"]["binarize"] == "static" and len(r["curve"]) == 1
    assert any("--epochs 1" in c for c in r["commands"])


def test_estimators_benchmark(tiny_npz, tmp_path):
    """``estimators.py`` on a 2-D latent model trained for one epoch: every row is written,
    quadrature is the reference, and the AIS ladder stops when two rungs agree."""
    run = tmp_path / "run"
    train = [sys.executable, "-m", "vaelab", "train", "--dataset", str(tiny_npz), "--out",
             str(run), "--epochs", "1", "--latent-dim", "2", "--no-report",
             "--set", "model.hidden=32", "--set", "data.validation_size=40"]
    done = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "estimators.json"
    cmd = [sys.executable, str(BENCH / "estimators.py"), str(run), "--examples", "6",
           "--reference-steps", "20", "--max-steps", "80", "--tolerance", "5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    entry = json.loads(out.read_text())["run"]
    names = [row["estimator"] for row in entry["rows"]]
    assert names[:4] == ["default", "quadrature", "is-1000", "is-5000"]
    assert names[4:] == ["ais-20", "ais-40"]  # 20 and 40 steps agree within 5 nats
    assert entry["reference"] == {"estimator": "quadrature", "nll": entry["rows"][1]["nll"],
                                  "converged": "exact"}
    default, exact = entry["rows"][0], entry["rows"][1]
    # the default asks quadrature for 0.01 nats, the reference row for 0.001
    assert default["verdict"]["status"] == "exact"
    assert abs(default["nll"] - exact["nll"]) < 0.01
    for row in entry["rows"]:
        assert row["examples"] == 6 and row["seconds"] > 0
        assert row["minus_reference"] == pytest.approx(row["nll"] - exact["nll"], abs=1e-12)
    # importance sampling on a 2-D latent space is close to exact with 5,000 samples
    assert abs(entry["rows"][3]["minus_reference"]) < 0.5
    assert entry["machine"]["cores"] >= 1
