"""A seed determines a run's numbers whatever the thread count (and so whatever the load).

vaelab chooses torch's CPU thread count from the machine's load, and on some CPUs (Intel
Xeon with AVX-512, measured in issue 22) MKL's float32 matrix products change in the last
bits with the thread count, unless its conditional numerical reproducibility is strict
(``MKL_CBWR=AUTO,STRICT``, set by ``import vaelab``). These tests train the default MLP
(512-256: large enough for MKL to split its products between threads) with 1 and 2
threads, fresh and across a resume, and compare every tensor bit for bit. Models whose
results depend on the count anyway (convolutions) keep one count per run: see
``test_threads.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import train
from vaelab import checkpoint, config, runtime

pytestmark = pytest.mark.usefixtures("fashion_available")


def _overrides(threads: int, epochs: int) -> list[str]:
    return [f"train.threads={threads}", f"train.epochs={epochs}", "data.train_limit=2048",
            "data.validation_size=512", "train.eval_batch_size=512"]


def _state(run_dir):
    meta = checkpoint.read_meta(run_dir / "checkpoints" / "last")
    tensors = load_file(run_dir / "checkpoints" / meta["tensor_file"])  # model and optimizer
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # timings differ; every number computed from the data must not
        row.pop("seconds"), row.pop("examples_per_second")
    return tensors, rows


def _assert_bitwise(a, b) -> None:
    (ta, ra), (tb, rb) = a, b
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    assert ra == rb


def _run(tmp_path, name, threads, epochs, resume=False):
    cfg = config.resolve(overrides=_overrides(threads, epochs))
    train(cfg, tmp_path / name, resume=resume, report=False)
    return tmp_path / name


@pytest.fixture(autouse=True)
def _keep_thread_count():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_matrix_products_do_not_depend_on_the_thread_count():
    blas = runtime.blas_reproducibility()
    if blas["blas"] != "mkl":
        pytest.skip("torch is not built with MKL here: the CNR mode does not apply")
    assert blas["mkl_cbwr"] == "AUTO,STRICT" and blas["thread_invariant_matmul"]


def test_fresh_runs_with_one_and_two_threads_are_bitwise_equal(tmp_path):
    one = _run(tmp_path, "one", threads=1, epochs=2)
    two = _run(tmp_path, "two", threads=2, epochs=2)
    _assert_bitwise(_state(one), _state(two))
    meta = checkpoint.read_meta(two / "checkpoints" / "last")
    assert meta["numerics"]["threads"] == 2 and meta["numerics"]["fixed"] is False


def test_a_resume_with_another_thread_count_is_bitwise(tmp_path):
    straight = _run(tmp_path, "straight", threads=2, epochs=2)
    _run(tmp_path, "split", threads=1, epochs=1)
    split = _run(tmp_path, "split", threads=2, epochs=2, resume=True)
    _assert_bitwise(_state(straight), _state(split))
