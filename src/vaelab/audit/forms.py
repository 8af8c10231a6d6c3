r"""The elementwise forms that :func:`vaelab.audit.probe` matches a loss against.

Everything here is plain NumPy in float64, evaluated at the probe's designed points.

Reconstruction, per data element, before any reduction (``m`` is ``x_hat`` or, for
logits, ``sigmoid(x_hat)``):

- squared error :math:`(x - m)^2`;
- absolute error :math:`|x - m|` (recognised only to be refused: a Laplace likelihood);
- binary cross-entropy :math:`-(x \log p + (1 - x) \log(1 - p))`, ``p = m``, kept away
  from ``log(0)`` in one of these ways (``epsilon_where``):

  ``"clip"``       ``p`` clipped to ``[eps, 1 - eps]`` (Keras 3; Keras 2's logit round trip
                   is the same function);
  ``"log"``        ``eps`` added inside the logs, ``log(p + eps)``;
  ``"clip+log"``   both (``tf.keras``);
  ``"log-clamp"``  each log clamped below at ``log(eps)`` (PyTorch's
                   ``binary_cross_entropy``: ``eps = exp(-100)``);
  ``"stable"``     logits only: ``max(x_hat, 0) - x x_hat + log(1 + exp(-|x_hat|))``,
                   exact at any logit;
  ``"none"``       nothing: ``p = 0`` or ``1`` gives ``inf`` or ``NaN``.

KL, per latent dimension: :math:`\tfrac12(\mu^2 + e^{\lambda} - 1 - \lambda)`, the
``KL(N(mu, exp(logvar)) || N(0, 1))`` that VAE code writes as
``-0.5 * (1 + logvar - mu**2 - exp(logvar))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EPSILON_STYLES", "ReconForm", "gaussian_kl", "recon_candidates", "solve_epsilon"]

#: Ways of keeping BCE away from log(0), in the order the probe tries them.
EPSILON_STYLES = ("none", "stable", "log-clamp", "clip", "clip+log", "log")


@dataclass(frozen=True)
class ReconForm:
    """One candidate reconstruction error per data element.

    Attributes:
        kind: ``"bce"``, ``"se"`` (squared error) or ``"ae"`` (absolute error).
        from_logits: ``x_hat`` is a logit and the probability or mean is ``sigmoid(x_hat)``.
        style: for BCE, one of :data:`EPSILON_STYLES`; ``None`` for the others.
        epsilon: the guard's epsilon for ``"clip"``, ``"log"``, ``"clip+log"`` and
            ``"log-clamp"``; ``None`` otherwise.
    """

    kind: str
    from_logits: bool
    style: str | None = None
    epsilon: float | None = None

    def words(self) -> str:
        """How the form is written, e.g. ``BCE on sigmoid(x_hat)``."""
        arg = "sigmoid(x_hat)" if self.from_logits else "x_hat"
        name = {"bce": "binary cross-entropy", "se": "squared error",
                "ae": "absolute error"}[self.kind]
        return f"{name} of x and {arg}"

    def value(self, x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
        """The elementwise error at data ``x`` and output ``x_hat`` (same shapes), nats."""
        x = np.asarray(x, dtype=np.float64)
        x_hat = np.asarray(x_hat, dtype=np.float64)
        with np.errstate(all="ignore"):
            if self.kind == "bce" and self.style == "stable":
                return np.maximum(x_hat, 0) - x * x_hat + np.log1p(np.exp(-np.abs(x_hat)))
            mean = 1.0 / (1.0 + np.exp(-x_hat)) if self.from_logits else x_hat
            if self.kind == "se":
                return (x - mean) ** 2
            if self.kind == "ae":
                return np.abs(x - mean)
            return _bce(x, mean, self.style, self.epsilon)


def _bce(x: np.ndarray, p: np.ndarray, style: str | None, eps: float | None) -> np.ndarray:
    if style in ("clip", "clip+log"):
        p = np.clip(p, eps, 1.0 - eps)
    if style in ("log", "clip+log"):
        log_p, log_q = np.log(p + eps), np.log(1.0 - p + eps)
    else:
        log_p, log_q = np.log(p), np.log(1.0 - p)
    if style == "log-clamp":
        log_p, log_q = np.maximum(log_p, math.log(eps)), np.maximum(log_q, math.log(eps))
    return -(x * log_p + (1.0 - x) * log_q)


def recon_candidates() -> list[ReconForm]:
    """The forms told apart at interior points (``x_hat`` strictly inside (0, 1)), before
    the guard against ``log(0)`` is known: BCE is written unguarded here."""
    return [ReconForm(kind, logits, "none" if kind == "bce" else None)
            for kind in ("bce", "se", "ae") for logits in (False, True)]


def solve_epsilon(style: str, worst: float) -> float | None:
    """The epsilon of a BCE guard from ``worst``, the error of a hopeless prediction.

    ``worst`` is ``g(x=1, p=0)`` in nats: ``-log(eps)`` for ``"clip"``, ``"log"`` and
    ``"log-clamp"``, ``-log(2 eps)`` for ``"clip+log"``.

    Returns:
        The epsilon, or ``None`` for ``"none"`` and ``"stable"`` (no epsilon) or when
        ``worst`` is not finite and positive (then the style cannot be this one).
    """
    if style in ("none", "stable") or not (math.isfinite(worst) and worst > 0):
        return None
    eps = math.exp(-worst) / (2 if style == "clip+log" else 1)
    return eps if eps > 0 else None  # exp(-1000) underflows: not a guard


def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` per latent dimension, nats."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    return 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)
