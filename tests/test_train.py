"""End-to-end training on a small real subset: files, reproducibility, resume, NaN guard."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import poison_reconstruction, tiny_overrides, train
from vaelab import checkpoint, config, objectives
from vaelab.errors import CheckpointError, ConfigError
from vaelab.schedules import learning_rate
from vaelab.train import RunLocked, TrainingDiverged, run_lock

pytestmark = pytest.mark.usefixtures("fashion_available")


def _weights(run_dir, name="last"):
    meta = checkpoint.read_meta(run_dir / "checkpoints" / name)
    tensors = load_file(run_dir / "checkpoints" / meta["tensor_file"])
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # timing is the only thing allowed to differ
        row.pop("seconds")
        row.pop("examples_per_second")
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config.resolve(overrides=tiny_overrides())
    summary = train(cfg, run_dir, progress=False, echo=lambda _line: None)
    return run_dir, summary


def test_run_directory_holds_everything(finished_run):
    run_dir, summary = finished_run
    for name in ["config.toml", "metrics.jsonl", "report.json", "report.md",
                 "checkpoints/last.json", "checkpoints/best.json"]:
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ["step", "train_nelbo", "train_recon", "train_kl", "val_nelbo", "val_recon",
                "val_kl", "lr", "seconds", "examples_per_second"]:
        assert key in rows[0]
    assert rows[1]["step"] == 2 * 512 // 64
    # NELBO = recon + KL, per example, on both splits: up to the one float32 rounding of
    # each example's recon - KL (unit roundoff 2^-24 of |ELBO|; the sums are float64)
    for r in rows:
        assert r["train_nelbo"] == pytest.approx(r["train_recon"] + r["train_kl"], rel=2**-24)
        assert r["val_nelbo"] == pytest.approx(r["val_recon"] + r["val_kl"], rel=2**-24)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["n_examples"] == 200 and report["split"] == "test"
    assert report["normalized"] is True and report["likelihood"] == "bernoulli"
    assert report["nll"] is not None and report["nll"] <= report["nelbo"] + 3 * report[
        "nelbo_stderr"]
    assert report["nelbo"] == pytest.approx(report["recon"] + report["kl"], rel=2**-24)
    assert 0 <= report["active_units"] <= 4 and len(report["kl_per_dim"]) == 4
    assert sum(report["kl_per_dim"]) == pytest.approx(report["kl"], rel=1e-6)
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (784 * 0.6931471805599453))
    assert list((run_dir / "figures" / "samples").glob("epoch-*.png"))


def test_same_seed_gives_identical_weights(finished_run, tmp_path):
    run_dir, _ = finished_run
    cfg = config.resolve(overrides=tiny_overrides())
    train(cfg, tmp_path / "again", progress=False, report=False, echo=lambda _line: None)
    a, b = _weights(run_dir), _weights(tmp_path / "again")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run_dir) == _metrics(tmp_path / "again")


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg4 = config.resolve(overrides=tiny_overrides(**{"train.epochs": 4}))
    cfg2 = config.resolve(overrides=tiny_overrides(**{"train.epochs": 2}))
    quiet = {"progress": False, "report": False, "echo": lambda _line: None}
    train(cfg4, straight, **quiet)
    train(cfg2, split, **quiet)
    train(cfg4, split, resume=True, **quiet)
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight) == _metrics(split)


def test_refuses_to_overwrite_or_mix_runs(finished_run):
    run_dir, _ = finished_run
    cfg = config.resolve(overrides=tiny_overrides())
    with pytest.raises(CheckpointError, match="already holds a run: continue it with --resume"):
        train(cfg, run_dir, report=False, progress=False)
    other = config.resolve(overrides=tiny_overrides(**{"model.latent_dim": 8}))
    with pytest.raises(ConfigError, match="cannot change model.latent_dim from 4 to 8"):
        train(other, run_dir, resume=True, report=False, progress=False)


def test_second_writer_is_locked_out(tmp_path):
    with run_lock(tmp_path):
        cfg = config.resolve(overrides=tiny_overrides())
        with pytest.raises(RunLocked, match="is in use by another vaelab process"):
            train(cfg, tmp_path, report=False, progress=False)


def test_nan_guard_names_term_step_and_batch_and_keeps_last_good(tmp_path, monkeypatch):
    cfg = config.resolve(overrides=tiny_overrides(**{"train.epochs": 3}))
    # epoch 2 (8 steps per epoch), batch 2
    real = poison_reconstruction(monkeypatch, 8 + 3, 1, float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, tmp_path, report=False, progress=False, echo=lambda _line: None)
    message = str(info.value)
    assert "step 10 (epoch 2, batch 2)" in message
    assert "reconstruction term is NaN/Inf for 1 of 64 examples" in message
    assert "--set train.lr=" in message and "\n" not in message
    meta = checkpoint.read_meta(tmp_path / "checkpoints" / "last")
    assert meta["train_state"]["epoch"] == 1
    monkeypatch.setattr(objectives, "elbo_terms", real)
    lower = config.resolve(overrides=tiny_overrides(**{"train.epochs": 3, "train.lr": 1e-4}))
    train(lower, tmp_path, resume=True, report=False, progress=False, echo=lambda _line: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == 1e-4


def test_an_exploding_objective_stops_the_run_and_names_the_learning_rate(tmp_path,
                                                                          monkeypatch):
    """Finite but exploded (issue 22: lr = 1e6 trained to a test NELBO of 7e33 and exited 0):
    a batch 1000x above the first one stops the run before its update; the message names
    the learning rate and the last good checkpoint, which a resume continues."""
    cfg = config.resolve(overrides=tiny_overrides(**{"train.epochs": 3}))
    # epoch 2 (8 steps per epoch), batch 3: reconstruction -1e7 nats (finite, exploded)
    real = poison_reconstruction(monkeypatch, 8 + 4, [0, 1, 2], -1e7)
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, tmp_path, report=False)
    message = str(info.value)
    assert "at step 11 (epoch 2, batch 3): the objective reached" in message
    assert "more than 1000 times its first value" in message and "\n" not in message
    assert "the learning rate is 0.001" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last'} (epoch 1)" in message
    assert checkpoint.read_meta(tmp_path / "checkpoints" / "last")["train_state"]["epoch"] == 1
    monkeypatch.setattr(objectives, "elbo_terms", real)
    train(cfg, tmp_path, resume=True, report=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_a_huge_learning_rate_is_a_one_line_error_from_the_cli(tmp_path, capsys):
    from vaelab import cli

    args = ["train", "--out", str(tmp_path / "run")]
    for item in tiny_overrides(**{"train.lr": 1e6}):
        args += ["--set", item]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vaelab: error: training diverged at step ")
    assert "the learning rate is 1e+06: no checkpoint was written (it diverged in the first " \
           "epoch): start again with a lower learning rate, e.g. --set train.lr=0.001" in err
    assert not (tmp_path / "run" / "report.json").exists()


def test_iwae_schedule_matches_the_paper():
    cfg = config.resolve(preset="iwae-paper").train
    # 3^i epochs at 1e-3 * 10^(-i/7): epoch 0 -> i=0, epochs 1-3 -> i=1, 4-12 -> i=2
    assert learning_rate(cfg, 0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 1) == learning_rate(cfg, 3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert learning_rate(cfg, 4) == learning_rate(cfg, 12) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert learning_rate(cfg, 3279) == pytest.approx(1e-3 * 10 ** (-7 / 7))


def test_resume_uses_this_versions_optimizer_implementation(tmp_path, monkeypatch):
    """foreach / fused are implementation choices, not hyperparameters: a checkpoint saved by
    an RMSprop without foreach (older vaelab) resumes with this version's foreach."""
    from vaelab import train as trainer

    cfg = config.resolve(overrides=tiny_overrides(**{
        "train.optimizer": "rmsprop", "train.lr": 1e-4, "train.epochs": 1}))
    old = trainer.OPTIMIZERS["rmsprop"]
    monkeypatch.setitem(trainer.OPTIMIZERS._entries, "rmsprop",
                        lambda params, c, device: torch.optim.RMSprop(params, lr=c.lr))
    trainer.train_and_evaluate(cfg, tmp_path, progress=False, echo=lambda _line: None)
    monkeypatch.setitem(trainer.OPTIMIZERS._entries, "rmsprop", old)
    seen = []
    real_epoch = trainer.train_epoch

    def spy(loop, epoch, state):
        seen.append([g["foreach"] for g in loop.optimizer.param_groups])
        return real_epoch(loop, epoch, state)

    monkeypatch.setattr(trainer, "train_epoch", spy)
    resumed = config.resolve(overrides=tiny_overrides(**{
        "train.optimizer": "rmsprop", "train.lr": 1e-4, "train.epochs": 2}))
    trainer.train_and_evaluate(resumed, tmp_path, resume=True, progress=False,
                               echo=lambda _line: None)
    assert seen == [[True]]
