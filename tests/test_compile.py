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

pytestmark = pytest.mark.usefixtures("fashion_available")


@pytest.fixture(scope="module")
def compile_works():
    """Skip (with inductor's reason) where this machine's toolchain cannot build a kernel."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++)")
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


def test_compiled_objective_trains_like_eager(tmp_path, compile_works):
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


def test_a_failed_compilation_is_one_line_naming_the_cause(tmp_path, monkeypatch):
    """No compiler needed: torch.compile is replaced by one whose backend fails as inductor
    does without a C++ compiler (dynamo wraps the cause; its first line says nothing)."""
    import torch._dynamo

    def failing_compile(module, **_options):
        def call(*_args, **_kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(
                failing_compile, RuntimeError("No working C++ compiler found in "
                                              "torch._inductor.config.cpp.cxx"), None)
        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(ConfigError) as err:
        trainer.train_and_evaluate(_cfg(True), tmp_path / "run", **QUIET)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train.compile: torch.compile could not compile the objective "
                              "(RuntimeError: No working C++ compiler found")
    assert "on cpu it needs a working C++ compiler" in message
    assert message.endswith("set train.compile=false")


def test_compile_refuses_a_posterior_whose_noise_it_cannot_draw(tmp_path):
    """The compiled step draws the noise outside; a q(z|x) that is neither a diagonal Gaussian
    nor a flow posterior is refused at set-up, before anything is compiled or written."""
    from types import MethodType

    from torch.distributions import Independent, Laplace

    from vaelab import models

    cfg = _cfg(True)
    model = models.build_from_config(cfg, (1, 28, 28))
    gaussian = model.encode

    def laplace_encode(self, x):
        q = gaussian(x)
        return Independent(Laplace(q.base_dist.loc, q.base_dist.scale), 1)

    model.encode = MethodType(laplace_encode, model)
    with pytest.raises(ConfigError, match="train.compile needs q\\(z\\|x\\) to be a diagonal "
                                          "Gaussian or a flow posterior .* Independent: set "
                                          "train.compile=false"):
        trainer.train_and_evaluate(cfg, tmp_path / "run", model=model, **QUIET)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_compiled_cpu_run_keeps_one_thread_count():
    """Compiled CPU kernels split their work for the thread count they were built for, so a
    compiled run does not follow the machine's load (as for convolutions)."""
    from vaelab import models, runtime

    model = models.build_from_config(_cfg(True), (1, 28, 28))
    cpu = torch.device("cpu")
    assert runtime.threads_change_results(model, cpu, compiled=True) == (
        "kernels compiled by torch.compile (train.compile)")
    assert runtime.threads_change_results(model, torch.device("cuda"), compiled=True) is None
