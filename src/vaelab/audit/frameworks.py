"""Handing designed NumPy inputs to a user's loss in its own framework, and reading back.

Frameworks: ``"numpy"`` (arrays in, arrays or floats out), ``"torch"`` (tensors in and
out) and ``"keras"`` (Keras 3 on its torch backend: backend tensors in, torch tensors
out). All inputs are float64, so the probe's arithmetic is exact to rounding.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["FRAMEWORKS", "convert_inputs", "keras_backend", "read_output"]

FRAMEWORKS = ("auto", "numpy", "torch", "keras")


def keras_backend() -> str | None:
    """The backend of an imported Keras 3 (``"torch"``, ``"tensorflow"``, ...), or None."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        return str(keras.backend.backend())
    except AttributeError:  # Keras 2 or a stand-in module
        return None


def _keras_ops():
    try:
        import keras
    except ImportError:
        raise ConfigError("framework 'keras' needs Keras 3: pip install 'vaelab[keras]' "
                          "and set KERAS_BACKEND=torch") from None
    backend = keras_backend()
    if backend != "torch":
        raise ConfigError(f"Keras runs on its {backend!r} backend: the probe needs the torch "
                          "backend (set KERAS_BACKEND=torch before keras is imported)")
    return keras.ops


def convert_inputs(framework: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The float64 ``arrays`` as the framework's own arrays (fresh copies)."""
    if framework == "numpy":
        return {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
    if framework == "torch":
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
    ops = _keras_ops()
    return {k: ops.convert_to_tensor(np.array(v, dtype=np.float64), dtype="float64")
            for k, v in arrays.items()}


def _unwrap(out: Any) -> tuple[Any, str | None]:
    """The loss inside a dict (``'loss'``) or a tuple/list (its first item)."""
    if isinstance(out, dict):
        if "loss" not in out:
            keys = ", ".join(repr(k) for k in list(out)[:6])
            raise ConfigError(f"the function returned a dict without a 'loss' entry "
                              f"(keys {keys}): return the loss itself")
        return out["loss"], "it returns a dict; its 'loss' entry is what was audited"
    if isinstance(out, (tuple, list)) and out:
        return out[0], f"it returns a {type(out).__name__}; its first item is what was audited"
    return out, None


def read_output(out: Any) -> tuple[np.ndarray, str, str | None]:
    """The loss a function returned, as a float64 array.

    Returns:
        ``(values, dtype, note)``: ``values`` of shape ``()`` or ``(B,)`` as returned (not
        checked here), the name of the dtype it was computed in, and a sentence when the
        loss had to be taken out of a dict or tuple (else None).

    Raises:
        ConfigError: anything that is not a number, an array or a tensor.
    """
    out, note = _unwrap(out)
    if isinstance(out, torch.Tensor):
        dtype = str(out.dtype).removeprefix("torch.")
        return out.detach().cpu().to(torch.float64).numpy(), dtype, note
    if isinstance(out, (np.ndarray, np.generic, float, int)) and not isinstance(out, bool):
        array = np.asarray(out)
        if array.dtype.kind not in "fiu":
            raise ConfigError(f"the function returned an array of {array.dtype}, not numbers")
        dtype = "float64" if isinstance(out, (float, int)) else str(array.dtype)
        return array.astype(np.float64), dtype, note
    raise ConfigError(f"the function returned a {type(out).__name__}, not a number, an "
                      "array or a tensor")
