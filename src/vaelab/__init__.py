"""vaelab: variational autoencoders whose numbers can be trusted.

Submodules are imported on first use so that ``vaelab --help`` stays fast::

    import vaelab
    family = vaelab.likelihoods.get("bernoulli")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "rng", "config", "schedules", "errors", "registry", "runtime", "distributed", "data",
    "likelihoods", "models", "objectives", "metrics", "checkpoint", "train", "runs",
    "evaluate", "grids", "plots", "audit", "compat",
}

__all__ = ["__version__", *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
