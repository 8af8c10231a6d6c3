"""``train.compile``: the training objective through ``torch.compile``.

What is checked (tiny Fashion-MNIST runs; each compilation takes seconds):

- a compiled run trains the same objective as an eager one: the first epoch's training
  objective and every epoch's validation NELBO agree to float32 rounding (the two runs
  draw the same noise: the compiled run draws it outside the compiled region by the rule
  the objective uses);
- it compiles once per batch shape and KL-weight branch (a step-wise KL warm-up does not
  recompile at every step);
- when torch.compile cannot compile (no C++ compiler), training stops with one line that
  names the option.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_overrides
from vaelab import config
from vaelab import train as trainer
from vaelab.errors import ConfigError

pytestmark = [
    pytest.mark.usefixtures("fashion_available"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile on CPU needs a C++ compiler (g++)"),
]


@pytest.fixture(scope="module", autouse=True)
def compile_works():
    """Skip (with inductor's reason) where this machine's toolchain cannot build a kernel."""
    try:
        torch.compile(lambda t: t.sin() + 1.0)(torch.ones(4))
    except Exception as exc:  # noqa: BLE001 - any toolchain failure means: cannot test here
        pytest.skip(f"torch.compile does not work here: {str(exc).splitlines()[0][:200]}")

QUIET = {"progress": False, "echo": lambda _line: None}


def _cfg(compile_: bool):
    # 200 images in batches of 64: three full batches and one of 8 (two shapes); the KL
    # weight rises over 5 steps (a float that changes at every step) and then stays 1.
    return config.resolve(overrides=tiny_overrides(**{
        "data.train_limit": 200, "data.validation_size": 64, "train.epochs": 2,
        "objective.warmup_steps": 5, "train.compile": str(compile_).lower(),
        "train.threads": 1}))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compiled_objective_trains_like_eager(tmp_path):
    from torch._dynamo.utils import counters

    trainer.train_and_evaluate(_cfg(False), tmp_path / "eager", **QUIET)
    torch._dynamo.reset()
    counters.clear()
    trainer.train_and_evaluate(_cfg(True), tmp_path / "compiled", **QUIET)
    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [4, 8]
    # step 1 is the same objective at the same weights; later steps drift by rounding only
    assert compiled[0]["train_objective"] == pytest.approx(eager[0]["train_objective"],
                                                           rel=1e-5)
    for a, b in zip(compiled, eager):
        assert a["val_nelbo"] == pytest.approx(b["val_nelbo"], rel=1e-4)
        assert a["train_kl"] == pytest.approx(b["train_kl"], rel=1e-3)
    # one graph per batch shape (64 and 8); a weight that recompiled would give one per step
    assert 0 < graphs <= 3, f"{graphs} graphs for 8 steps: the objective recompiled"


def test_a_failed_compilation_is_one_line(tmp_path, monkeypatch):
    def failing_compile(module, **_options):
        def call(*_args, **_kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                failing_compile, RuntimeError("InvalidCxxCompiler: No working C++ compiler "
                                              "found in torch._inductor.config.cpp.cxx"), None)
        return call

    import torch._dynamo  # noqa: F401  (loaded, as torch.compile loads it)

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(ConfigError) as err:
        trainer.train_and_evaluate(_cfg(True), tmp_path / "run", **QUIET)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.compile: torch.compile could not compile the objective")
    assert "set train.compile=false" in message
