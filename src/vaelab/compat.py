r"""Keras / TensorFlow loss semantics, reproduced exactly in PyTorch.

Use these to reproduce (or audit, see :mod:`vaelab.audit`) a loss written with Keras.
Both losses **average** over ``axis`` (the last one by default), which is why the
original Keras VAE example multiplied ``binary_crossentropy`` by ``original_dim``.

Binary cross-entropy from probabilities clips them to ``[eps, 1 - eps]`` with
``eps = 1e-7`` (``keras.backend.epsilon()``). The formula after the clip depends on the
release (``flavor``); all three were read from the Keras sources:

- ``"keras3"`` (Keras 3, ``keras/src/backend/tensorflow/nn.py``):
  ``-(t log(p) + (1 - t) log(1 - p))``.
- ``"tf_keras"`` (Keras 2 as ``tf.keras`` in TensorFlow 2.x, ``keras/backend.py``):
  ``-(t log(p + eps) + (1 - t) log(1 - p + eps))``.
- ``"keras_legacy"`` (older Keras 2 with the TensorFlow backend): the clipped
  probability is turned back into a logit, ``log(p / (1 - p))``, and passed to the
  sigmoid cross-entropy below.

With ``from_logits=True`` every release uses TensorFlow's stable
``sigmoid_cross_entropy_with_logits``: ``max(x, 0) - x t + log(1 + exp(-|x|))``.

Caveat: in graph mode, Keras notices when ``y_pred`` comes straight out of a sigmoid
layer and uses its logits instead of clipping (``_get_logits``); then the Keras value
is the ``from_logits=True`` value computed on those logits.

Values are computed in the floating dtype of the inputs (Keras uses float32 by default).
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["EPSILON", "FLAVORS", "keras_binary_crossentropy", "keras_mse"]

#: ``keras.backend.epsilon()``.
EPSILON = 1e-7

FLAVORS = ("keras3", "tf_keras", "keras_legacy")


def _as_float(y_true, y_pred) -> tuple[torch.Tensor, torch.Tensor]:
    y_pred = torch.as_tensor(y_pred)
    if not y_pred.is_floating_point():
        y_pred = y_pred.float()
    y_true = torch.as_tensor(y_true, device=y_pred.device).to(y_pred.dtype)
    if y_true.shape != y_pred.shape:
        raise ConfigError(
            f"y_true has shape {tuple(y_true.shape)} but y_pred has shape "
            f"{tuple(y_pred.shape)}: pass tensors of the same shape"
        )
    return y_true, y_pred


def _sigmoid_cross_entropy_with_logits(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``tf.nn.sigmoid_cross_entropy_with_logits``: elementwise, stable for large ``|x|``."""
    return logits.clamp(min=0) - logits * target + torch.log1p(torch.exp(-logits.abs()))


def _bce_from_probabilities(target: torch.Tensor, output: torch.Tensor,
                            flavor: str) -> torch.Tensor:
    output = output.clamp(EPSILON, 1.0 - EPSILON)
    if flavor == "keras3":
        return -(target * torch.log(output) + (1 - target) * torch.log(1 - output))
    if flavor == "tf_keras":
        return -(target * torch.log(output + EPSILON)
                 + (1 - target) * torch.log(1 - output + EPSILON))
    return _sigmoid_cross_entropy_with_logits(target, torch.log(output / (1 - output)))


def keras_binary_crossentropy(y_true, y_pred, from_logits: bool = False, axis: int = -1,
                              flavor: str = "keras3") -> torch.Tensor:
    r"""``keras.losses.binary_crossentropy``: elementwise BCE, then the **mean** over ``axis``.

    Args:
        y_true: targets, same shape as ``y_pred``.
        y_pred: probabilities (clipped to ``[1e-7, 1 - 1e-7]``) or, with
            ``from_logits=True``, logits.
        from_logits: treat ``y_pred`` as logits (stable formula, no clipping).
        axis: the axis averaged over (Keras default: the last one).
        flavor: ``"keras3"``, ``"tf_keras"`` or ``"keras_legacy"`` (module docstring);
            only matters when ``from_logits=False``.

    Returns:
        ``y_pred.shape`` without ``axis``, in nats per element (an average, not a sum).

    Example (Keras 3, float32; -1.1399 is clipped to 1e-7)::

        >>> round(float(keras_binary_crossentropy([1., 1., 0.], [0.2393, 0.7484, -1.1399])), 8)
        0.57328504

    Raises:
        ConfigError: unknown ``flavor`` or shapes that differ.
    """
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown Keras flavor {flavor!r}: choose one of {', '.join(FLAVORS)}")
    y_true, y_pred = _as_float(y_true, y_pred)
    if from_logits:
        elementwise = _sigmoid_cross_entropy_with_logits(y_true, y_pred)
    else:
        elementwise = _bce_from_probabilities(y_true, y_pred, flavor)
    return elementwise.mean(dim=axis)


def keras_mse(y_true, y_pred, axis: int = -1) -> torch.Tensor:
    """``keras.losses.mean_squared_error``: ``mean((y_true - y_pred)**2)`` over ``axis``.

    Raises:
        ConfigError: shapes that differ.
    """
    y_true, y_pred = _as_float(y_true, y_pred)
    return (y_true - y_pred).square().mean(dim=axis)
