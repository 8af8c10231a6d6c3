"""``train.precision``: bf16 speeds the training step, never the reported numbers.

What is checked (tiny Fashion-MNIST runs, seconds each):

- a bf16 run trains under autocast (the decoder's layers really run in bfloat16) while the
  objective's per-example values, weights, optimizer state and checkpoints stay float32;
- the run says so: ``precision`` in every ``metrics.jsonl`` row, ``training_precision`` in
  the report and a row of report.md;
- its reported numbers (the per-epoch validation NELBO, the test report) equal a float32
  evaluation of the same weights, and an evaluation under autocast would not;
- one bf16 epoch ends within the tolerance derived below of the fp32 epoch;
- resuming a bf16 run is exact, and fp16's gradient scaler is saved and restored;
- fp16 is refused on a CPU, an unknown precision and a change of precision on resume too;
- bf16 on a CPU without bfloat16 instructions says, once, that it is slower than fp32 there.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, train
from vaelab import checkpoint, config, estimators, evaluate, metrics, models, objectives, runs
from vaelab import train as trainer
from vaelab.data import Splits
from vaelab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fashion_available")

QUIET = {"progress": False, "echo": lambda _line: None}

#: bfloat16 keeps 8 significant bits: its unit roundoff is 2^-8.
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(run_dir, name="last"):
    meta = checkpoint.read_meta(run_dir / "checkpoints" / name)
    return load_file(run_dir / "checkpoints" / meta["tensor_file"]), meta


def _timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")}
            for r in rows]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16")
    cfg = config.resolve(overrides=tiny_overrides(**{
        "train.precision": "bf16", "data.train_limit": 256, "data.validation_size": 128,
        "data.test_limit": 100}))
    train(cfg, run_dir, **QUIET)
    return run_dir, cfg


def test_bf16_run_says_which_precision_trained_it(bf16_run):
    run_dir, _ = bf16_run
    rows = _rows(run_dir)
    assert [r["precision"] for r in rows] == ["bf16", "bf16"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training_precision"] == "bf16"
    assert "| trained in | bf16 mixed precision" in (run_dir / "report.md").read_text()
    saved = config.load_toml(run_dir / "config.toml")
    assert saved["train"]["precision"] == "bf16"
    assert "grad_scaler" not in checkpoint.read_meta(run_dir / "checkpoints" / "last")


def test_bf16_keeps_weights_optimizer_state_and_checkpoints_in_float32(bf16_run):
    run_dir, _ = bf16_run
    for name in ("last", "best"):
        tensors, _ = _tensors(run_dir, name)
        floats = {k: v.dtype for k, v in tensors.items()
                  if not k.startswith("rng.") and v.is_floating_point()}
        assert any(k.startswith("model.") for k in floats)
        assert set(floats.values()) == {torch.float32}, floats
    tensors, _ = _tensors(run_dir, "last")
    assert any(k.startswith("optimizer.state.") for k in tensors)  # Adam's moments, float32


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous-bernoulli"])
def test_bf16_step_runs_the_layers_in_bfloat16_and_returns_float32(likelihood):
    """Autocast really applies (the decoder's output is bfloat16 inside the step) while the
    objective's per-example values and the gradients are float32, for likelihoods whose
    log-density autocast would otherwise compute in bfloat16 (gaussian, continuous
    Bernoulli)."""
    cfg = config.resolve(overrides=tiny_overrides(**{"likelihood.name": likelihood,
                                                     "data.binarize": "none"}))
    torch.manual_seed(0)
    model = models.build_from_config(cfg, (1, 28, 28)).train()
    seen = []
    model.decoder.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    objective = objectives.build_objective(model, cfg.objective)
    optimizer = trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    dtype = trainer.autocast_dtype("bf16", torch.device("cpu"))
    per_example, terms = trainer.train_step(objective, optimizer, x, kl_weight=1.0,
                                            autocast=dtype)
    assert seen == [torch.bfloat16]
    assert per_example.dtype == terms.recon.dtype == terms.kl.dtype == torch.float32
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_model_returning_half_precision_is_refused_under_autocast():
    """A model of one's own whose distributions take bfloat16 layer outputs would sum the
    objective in bfloat16: refused, with the fix."""
    def objective(x, *_args):
        return x.flatten(1).sum(1).to(torch.bfloat16), None

    layer = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"came back as torch.bfloat16.*\.float\(\)"):
        trainer.train_step(objective, optimizer, torch.ones(2, 3), kl_weight=1.0,
                           autocast=torch.bfloat16)


def test_bf16_reported_numbers_are_a_float32_evaluation_of_the_same_weights(bf16_run):
    run_dir, cfg = bf16_run
    splits = Splits(cfg.data, cfg.train.seed, "cpu")
    # the last epoch's validation NELBO, from the last weights
    model = runs.open_run(run_dir, "last").model.eval()
    val = metrics.elbo_metrics(model, splits["validation"], batch_size=cfg.train.eval_batch_size,
                               seed=cfg.train.seed)
    assert _rows(run_dir)[-1]["val_nelbo"] == pytest.approx(val["nelbo"], rel=1e-12, abs=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a leaked autocast would report
        leaked = metrics.elbo_metrics(model, splits["validation"],
                                      batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed)
    assert leaked["nelbo"] != pytest.approx(val["nelbo"], rel=1e-9, abs=0)
    # the test report, from the best weights
    model = runs.open_run(run_dir, "best").model.eval()
    fresh = evaluate.evaluate(model, splits["test"],
                              estimator=estimators.get(cfg.eval.estimator, cfg.eval.options),
                              batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                              checkpoint_name="best", progress=False)
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("nelbo", "recon", "kl", "nll", "nll_stderr", "bits_per_dim"):
        assert report[key] == pytest.approx(fresh[key], rel=1e-12, abs=0), key
    assert report["pareto_k"] == fresh["pareto_k"]


def test_bf16_epoch_is_close_to_fp32(tmp_path):
    """Tolerance: bfloat16 rounds every input of a matrix product to 8 significant bits
    (unit roundoff u = 2^-8), accumulating in float32. To first order each product's output,
    and so each term of the objective that depends on it, moves by at most u relative;
    the likelihood and KL are then float32, so the epoch's mean objective of the same
    data and noise moves by at most u x |objective| (1.5 nats at 385 nats). Errors of random
    sign average out, so the difference is far smaller in practice (about 1e-5 relative),
    but the test asserts only the bound."""
    one = {"train.epochs": 1, "data.validation_size": 0, "data.train_limit": 256}
    records = {}
    for precision in ("fp32", "bf16"):
        cfg = config.resolve(overrides=tiny_overrides(**one, **{"train.precision": precision}))
        train(cfg, tmp_path / precision, report=False, **QUIET)
        records[precision] = _rows(tmp_path / precision)[0]
    fp32, bf16 = records["fp32"], records["bf16"]
    for key in ("train_objective", "train_recon"):
        assert bf16[key] == pytest.approx(fp32[key], rel=BF16_UNIT_ROUNDOFF, abs=0)
    assert bf16["train_objective"] != fp32["train_objective"]  # bf16 did run
    weights = (_tensors(tmp_path / "fp32")[0], _tensors(tmp_path / "bf16")[0])
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
               if k.startswith("model."))


def test_bf16_resume_continues_exactly(tmp_path):
    bf16 = {"train.precision": "bf16", "data.validation_size": 0, "data.train_limit": 128}
    cfg4 = config.resolve(overrides=tiny_overrides(**bf16, **{"train.epochs": 4}))
    cfg2 = config.resolve(overrides=tiny_overrides(**bf16, **{"train.epochs": 2}))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg4, straight, report=False, **QUIET)
    train(cfg2, split, report=False, **QUIET)
    train(cfg4, split, resume=True, report=False, **QUIET)
    a, b = _tensors(straight)[0], _tensors(split)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert _timeless(_rows(straight)) == _timeless(_rows(split))
    fp32 = config.resolve(overrides=tiny_overrides(**{**bf16, "train.precision": "fp32",
                                                      "train.epochs": 5}))
    with pytest.raises(ConfigError, match="cannot change train.precision from 'bf16' to 'fp32'"):
        train(fp32, split, resume=True, report=False, **QUIET)


def test_fp16_grad_scaler_state_is_saved_and_resumed(tmp_path, monkeypatch):
    """fp16 trains on CUDA only; its scaler path is exercised here with CPU float16 autocast
    (the refusal bypassed) and a scaler that doubles every 2 clean steps, so its state
    changes every epoch: a resume that dropped it would not continue exactly."""
    monkeypatch.setattr(trainer, "autocast_dtype", lambda precision, device: (
        torch.float16 if precision == "fp16" else None))
    monkeypatch.setattr(trainer, "_grad_scaler", lambda device: torch.amp.GradScaler(
        device.type, init_scale=2.0 ** 4, growth_interval=2))
    fp16 = {"train.precision": "fp16", "data.validation_size": 0, "data.train_limit": 128}
    cfg4 = config.resolve(overrides=tiny_overrides(**fp16, **{"train.epochs": 4}))
    cfg2 = config.resolve(overrides=tiny_overrides(**fp16, **{"train.epochs": 2}))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg4, straight, report=False, **QUIET)
    train(cfg2, split, report=False, **QUIET)
    saved = checkpoint.read_meta(split / "checkpoints" / "last")["grad_scaler"]
    assert saved["scale"] == _rows(split)[-1]["grad_scale"] and saved["growth_interval"] == 2
    assert saved["scale"] != 2.0 ** 4  # it moved: a reset scaler would differ
    train(cfg4, split, resume=True, report=False, **QUIET)
    rows = _timeless(_rows(straight))
    assert rows == _timeless(_rows(split))
    assert len({r["grad_scale"] for r in rows}) > 1
    a, b = _tensors(straight)[0], _tensors(split)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))


def test_fp16_is_refused_on_a_cpu(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*train.precision=bf16"):
        config.resolve(overrides=["train.precision=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*train.precision=bf16"):
        trainer.autocast_dtype("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():  # device auto resolves to the CPU: refused before writing
        cfg = config.resolve(overrides=tiny_overrides(**{"train.precision": "fp16"}))
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            train(cfg, tmp_path / "run", report=False, **QUIET)
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_precision_values_are_checked():
    assert config.defaults().train.precision == "fp32"
    assert trainer.autocast_dtype("fp32", torch.device("cpu")) is None
    assert trainer.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.precision.*fp32.*bf16.*fp16"):
        config.resolve(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown train.precision 'half'"):
        trainer.autocast_dtype("half", torch.device("cpu"))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_says_it_is_slower(tmp_path, monkeypatch,
                                                                   native):
    monkeypatch.setattr(trainer, "_native_bf16", lambda: native)
    cfg = config.resolve(overrides=tiny_overrides(**{
        "train.precision": "bf16", "train.epochs": 1, "data.train_limit": 64,
        "data.validation_size": 0}))
    lines = []
    train(cfg, tmp_path, report=False, progress=False, echo=lines.append)
    warned = [line for line in lines if "without bfloat16 instructions" in line]
    assert len(warned) == (0 if native else 1)
    if warned:
        assert "use train.precision=fp32 here" in warned[0] and "\n" not in warned[0]
