"""vaelab: variational autoencoders whose numbers can be trusted.

Submodules are imported on first use so that ``vaelab --help`` stays fast::

    import vaelab
    family = vaelab.likelihoods.get("bernoulli")
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# MKL's conditional numerical reproducibility: float32 matrix products give the same bits
# whatever the thread count, so a seed determines a run's numbers whatever else the machine
# is doing (vaelab chooses its thread count from the load). MKL reads this once, at its
# first call, so it is set on import, before any matrix product; an explicit MKL_CBWR is
# kept. See vaelab.runtime.blas_reproducibility and docs/reliability.md.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

_SUBMODULES = {
    "rng", "config", "schedules", "errors", "registry", "runtime", "distributed", "data",
    "likelihoods", "priors", "posteriors", "estimators", "experiment", "options", "models",
    "objectives", "metrics", "checkpoint", "train", "runs",
    "evaluate", "grids", "plots", "audit", "compat", "hub", "onnx_export", "explore", "keras",
}

__all__ = ["__version__", "from_pretrained", *sorted(_SUBMODULES)]


def from_pretrained(*args: Any, **kwargs: Any) -> Any:
    """:func:`vaelab.hub.from_pretrained`: a trained model from a folder or a Hub repo."""
    return importlib.import_module(".hub", __name__).from_pretrained(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
