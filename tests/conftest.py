"""Shared fixtures: tiny real-data configs and a session-wide trained run."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch starts its thread pool: a fixed thread count, so that in-process trainings do
# not follow the machine's load (vaelab.threads) and bitwise comparisons stay deterministic.
# Under pytest-xdist the cores are shared by the workers: one thread each (children too).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
if "PYTEST_XDIST_WORKER" in os.environ:  # the controller set 2 for itself: not for workers
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
else:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
# Keras 3 picks its backend on first import: the tests (and the docs' blocks) use torch.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

import vaelab  # noqa: E402, F401  (sets MKL_CBWR before any matrix product, as for users)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Two cores: keep torch from oversubscribing them when pytest runs subprocesses too.
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Decoded-folder caches and downloads of the whole session go to a temporary directory
    (subprocesses inherit it), never to the user's ~/.cache/vaelab."""
    if "VAELAB_CACHE_DIR" not in os.environ:
        os.environ["VAELAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("vaelab-cache"))
    yield


def pytest_sessionstart(session):
    """One line first: what the numbers of this run come from (CI logs say which machine:
    float32 kernels, and so the last bits of results, differ between CPUs)."""
    import json

    from vaelab.runtime import describe_machine

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"machine: {json.dumps(describe_machine())}")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def poison_reconstruction(monkeypatch, at_call: int, rows, value: float):
    """Patch ``objectives.elbo_terms`` so that its ``at_call``-th call in training mode
    (1-based) returns a reconstruction term set to ``value`` at ``rows`` (and the ELBO to
    match); returns the real function, for restoring it."""
    import dataclasses

    from vaelab import objectives

    real = objectives.elbo_terms
    calls = {"n": 0}

    def poisoned(model, x, **kwargs):
        terms = real(model, x, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                recon = terms.recon.clone()
                recon[rows] = value
                terms = dataclasses.replace(terms, recon=recon, elbo=recon - terms.kl)
        return terms

    monkeypatch.setattr(objectives, "elbo_terms", poisoned)
    return real


def train(cfg, run_dir, *, resume=False, report=True, progress=False, echo=None):
    """What `vaelab train` does (train, then the test report and figures), quietly."""
    from vaelab.cli import run_training

    return run_training(cfg, run_dir, resume=resume, report=report,
                        echo=echo or (lambda _line: None))


def tiny_overrides(**extra: object) -> list[str]:
    """Overrides for a seconds-long real-data run (Fashion-MNIST subset)."""
    base = {
        "data.train_limit": 512,
        "data.validation_size": 256,
        "data.test_limit": 200,
        "train.epochs": 2,
        "train.batch_size": 64,
        "train.eval_batch_size": 256,
        "eval.auto.samples": 20,  # the default estimator, with a small AIS check
        "eval.auto.check_examples": 8,
        "eval.auto.max_check_examples": 16,  # and its extension, 8 more while uncertain
        "eval.auto.check_steps": 5,
        "eval.auto.check_chains": 4,
        "eval.batch_size": 100,
        "model.hidden": "64",
        "model.latent_dim": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def fashion_available() -> bool:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return True
