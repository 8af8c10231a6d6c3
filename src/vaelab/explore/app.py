r"""What the explorer computes: the scatter of encoded test images, decoded images at any
latent point, and one test example's reconstruction, NELBO and NLL.

An :class:`Explorer` holds a model and its test split, encodes up to ``points`` test
images once (:func:`vaelab.plots.encode_images`, the same draw of any dynamic
binarisation as the figures) and places them on the plane of ``latent_scatter.png``
(:func:`vaelab.plots.scatter_points`: the latent coordinates for L <= 2, principal axes of
the encoder means for L > 2). A point ``u`` of that coordinate system is the latent
``z = c + u B`` (:class:`vaelab.plots.LatentPlane`); the page moves ``u_0, u_1`` with the
dragged point and ``u_2 .. u_{L-1}`` with sliders, and asks for the decoder mean
:math:`\mathrm{E}[x|z]` at ``z`` (:func:`vaelab.plots.decode_means`, what every figure
shows), computed here in Python, so every likelihood and model vaelab trains works.

Per test example (:meth:`Explorer.point`): the model input, the reconstruction (decoder
mean at :math:`\mathrm{E}_q[z|x]`) and

- the NELBO (beta = 1) as the mean of ``nelbo_samples`` one-sample ELBOs
  (:func:`vaelab.objectives.elbo_terms`) with its Monte-Carlo standard error;
- the NLL :math:`-\log p(x)` by importance sampling with ``q(z|x)`` and ``nll_samples``
  samples (:func:`vaelab.objectives.log_likelihood`) with its Monte-Carlo standard error,
  Pareto k-hat and effective sample size; none when the likelihood is not normalised for
  the data (BCE on grey levels).

Draws are seeded by ``(seed, index, Purpose.EXPLORE)``: the same example gives the same
numbers. Every input is checked (:class:`RequestError`) before the model sees it.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import grids, metrics, objectives, plots
from ..data import ImageSet
from ..errors import VaelabError
from ..psis import pareto_k_threshold
from ..rng import Purpose, seeded_generator

__all__ = ["Explorer", "RequestError", "Z_LIMIT", "NELBO_SAMPLES", "NLL_SAMPLES", "POINTS"]

#: Largest |z_j| the explorer decodes (100 prior standard deviations of N(0, I)).
Z_LIMIT = 100.0
#: One-sample ELBO draws averaged for a test example's NELBO.
NELBO_SAMPLES = 100
#: Importance samples K for a test example's NLL.
NLL_SAMPLES = 1000
#: Test images on the scatter by default (as many as ``latent_scatter.png``).
POINTS = 2000


class RequestError(VaelabError):
    """A request the explorer refuses: ``status`` (400 or 404) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return float(value) if math.isfinite(value) else None


def _image(pixels: Tensor) -> dict[str, Any]:
    """One image ``(C, H, W)`` in [0, 1] as JSON: ``round(255 x)`` per sub-pixel, row-major
    ``(H, W, C)`` in ``pixels``."""
    channels, height, width = pixels.shape
    array = grids.to_uint8(pixels.float())
    return {"height": int(height), "width": int(width), "channels": int(channels),
            "pixels": array.reshape(-1).tolist()}


def _padded(lo: float, hi: float, fraction: float = 0.1, min_half_width: float = 1.0
            ) -> list[float]:
    """``[lo, hi]`` widened by ``fraction`` of its span on each side, at least
    ``min_half_width`` either side of its middle."""
    middle, half = (lo + hi) / 2, max((hi - lo) / 2 * (1 + 2 * fraction), min_half_width)
    return [middle - half, middle + half]


class Explorer:
    """A model and its test split, encoded once, answering the page's questions.

    Args:
        model: anything with ``encode``, ``decode``, ``prior`` and ``latent_dim`` (a
            vaelab model, or your own); put in eval mode.
        test: the test split (:class:`~vaelab.data.ImageSet`).
        points: encode the first ``min(points, len(test))`` test images for the scatter.
        seed: seeds the binarisation draw (as the figures' ``eval.seed``) and the
            per-example estimates.
        info: what the page says about the run (name, checkpoint, epoch, likelihood, ...);
            JSON-able.
        nelbo_samples, nll_samples: per-example estimates (see the module docstring).

    Raises:
        VaelabError: ``points < 1``, an empty test split, or sample counts below 1.
    """

    def __init__(self, model: nn.Module, test: ImageSet, *, points: int = POINTS,
                 seed: int = 0, info: dict[str, Any] | None = None,
                 nelbo_samples: int = NELBO_SAMPLES, nll_samples: int = NLL_SAMPLES) -> None:
        if points < 1:
            raise VaelabError(f"the number of points must be positive, got {points}: e.g. "
                              f"--points {POINTS}")
        if len(test) == 0:
            raise VaelabError("the test split is empty: nothing to explore")
        if nelbo_samples < 1 or nll_samples < 1:
            raise VaelabError("nelbo_samples and nll_samples must be positive")
        if isinstance(model, nn.Module):
            model.eval()
        self.model, self.test, self.seed = model, test, int(seed)
        self.info = dict(info or {})
        self.nelbo_samples, self.nll_samples = int(nelbo_samples), int(nll_samples)
        self.family = getattr(model, "likelihood", None)
        self.normalized = bool(getattr(self.family, "normalized", True))
        self.latent_dim = int(model.latent_dim)
        n = min(points, len(test))
        self.inputs, loc = plots.encode_images(model, test, n, self.seed)
        self.loc = loc.float()
        self.labels = test.labels[:n].cpu() if test.labels is not None else None
        self.plane, self.xy = plots.scatter_points(self.loc, self.labels)
        self.coords = self.plane.coordinates(self.loc)  # (n, L) float64
        self._lock = threading.Lock()  # one model call at a time (the server is threaded)
        self._points: dict[int, dict[str, Any]] = {}

    @classmethod
    def open(cls, run_dir: str | Path, checkpoint: str = "best", session: Any = None, *,
             points: int = POINTS, data_dir: str | None = None) -> Explorer:
        """The explorer of a run directory: its model with ``checkpoint``'s weights and its
        whole test split, loaded once by :meth:`vaelab.experiment.Experiment.open`.

        Raises:
            CheckpointError: no such run or checkpoint; DataError: its data is missing.
        """
        from ..experiment import Experiment

        exp = Experiment.open(run_dir, checkpoint, session, data_dir=data_dir)
        cfg, test = exp.cfg, exp.data["test"]
        info = {
            "run": Path(run_dir).resolve().name, "checkpoint": checkpoint, "epoch": exp.epoch,
            "dataset": test.name, "likelihood": cfg.likelihood.name,
            "model": cfg.model.kind, "prior": cfg.prior.name, "flow": cfg.posterior.flow,
            "objective": cfg.objective.kind,
        }
        return cls(exp.model, test, points=points, seed=cfg.eval.seed, info=info)

    # ----------------------------------------------------------------------- answers

    def _axis_names(self) -> list[str]:
        if self.plane.kind == "pca":
            return [f"PC {j + 1} ({100 * float(e):.1f}% of variance)"
                    for j, e in enumerate(self.plane.explained)]
        return [f"z{j}" for j in range(self.latent_dim)]

    def meta(self) -> dict[str, Any]:
        """Everything the page needs up front: the run, the plane and the scatter."""
        c, h, w = self.test.event_shape
        lo, hi = self.coords.min(0).values, self.coords.max(0).values
        ranges = [_padded(float(a), float(b)) for a, b in zip(lo, hi)]
        x_lo, y_lo = self.xy.min(0).values.tolist()
        x_hi, y_hi = self.xy.max(0).values.tolist()
        names = self._axis_names()
        one = self.latent_dim == 1
        if one:
            y_name = ("label (rows jittered; not a latent coordinate)"
                      if self.labels is not None else "jitter (not a latent coordinate)")
        else:
            y_name = names[1]
        classes = self.test.metadata.get("classes") or None
        return {
            "info": self.info,
            "split": self.test.split, "n_test": len(self.test), "n_points": len(self.xy),
            "event_shape": [c, h, w], "latent_dim": self.latent_dim,
            "binarize": self.test.binarize,
            "likelihood_normalized": self.normalized,
            "data_kind": getattr(self.family, "data_kind", "unit"),
            "plane": {
                "kind": self.plane.kind,
                "centre": self.plane.centre.tolist(),
                "basis": self.plane.basis.tolist(),
                "explained": self.plane.explained.tolist(),
                "names": names,
                "ranges": ranges,
                "x": {"name": names[0], "range": _padded(x_lo, x_hi, 0.05, 0.5)},
                "y": {"name": y_name, "range": _padded(y_lo, y_hi, 0.05, 0.5)},
            },
            "z_limit": Z_LIMIT,
            "nelbo_samples": self.nelbo_samples,
            "nll_samples": self.nll_samples if self.normalized else None,
            "scatter": {
                "x": [round(v, 5) for v in self.xy[:, 0].tolist()],
                "y": [round(v, 5) for v in self.xy[:, 1].tolist()],
                "labels": self.labels.tolist() if self.labels is not None else None,
                "classes": list(classes) if classes else None,
            },
        }

    def check_z(self, z: Any) -> Tensor:
        """``z`` (a JSON list) as a float32 ``(1, L)`` tensor.

        Raises:
            RequestError: not a list of ``L`` finite numbers within :data:`Z_LIMIT`.
        """
        latent = self.latent_dim
        if not isinstance(z, list):
            raise RequestError(400, f"z must be a list of {latent} numbers, got "
                                    f"{type(z).__name__}")
        if len(z) != latent:
            raise RequestError(400, f"z must have {latent} values (the latent dimension), "
                                    f"got {len(z)}")
        for j, value in enumerate(z):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(400, f"z[{j}] must be a number, got {value!r:.40}")
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise RequestError(400, f"z[{j}] = {value!r:.40} is not a finite number")
            if abs(number) > Z_LIMIT:
                raise RequestError(400, f"z[{j}] = {number:g} is outside [-{Z_LIMIT:g}, "
                                        f"{Z_LIMIT:g}]")
        return torch.tensor([[float(v) for v in z]], dtype=torch.float32)

    def decode(self, z: Any) -> dict[str, Any]:
        """The decoder mean at ``z`` (a JSON list of L numbers) as an image, with ``z``.

        Raises:
            RequestError: a bad ``z`` (:meth:`check_z`), or a decoder mean that is not
                finite there.
        """
        latent = self.check_z(z)
        with self._lock:
            means = plots.decode_means(self.model, latent)
        if not bool(torch.isfinite(means).all()):
            raise RequestError(400, "the decoder mean is not finite at this z: choose a z "
                                    "nearer the data")
        return {"z": latent[0].tolist(), "image": _image(means[0])}

    def check_index(self, text: str) -> int:
        """A test point's index from the URL.

        Raises:
            RequestError: 400 for anything but a decimal integer, 404 outside the points.
        """
        if not (text.isascii() and text.isdigit()) or len(text) > 9:
            raise RequestError(400, f"a test point is a number 0..{len(self.xy) - 1}, got "
                                    f"{text!r:.40}")
        index = int(text)
        if index >= len(self.xy):
            raise RequestError(404, f"no test point {index}: the scatter holds points "
                                    f"0..{len(self.xy) - 1}")
        return index

    def point(self, index: int) -> dict[str, Any]:
        """Test point ``index``: its input, reconstruction, encoder mean, plane coordinates,
        NELBO and (for a normalised likelihood) NLL, in nats (computed once, then kept)."""
        if not 0 <= index < len(self.xy):
            raise RequestError(404, f"no test point {index}")
        with self._lock:
            cached = self._points.get(index)
            if cached is None:
                cached = self._points[index] = self._compute_point(index)
        return cached

    @torch.no_grad()
    def _compute_point(self, index: int) -> dict[str, Any]:
        model = self.model
        device = metrics.model_device(model)
        x = self.inputs[index:index + 1].to(device)
        loc = self.loc[index:index + 1]
        # NELBO: S independent one-sample ELBOs (beta = 1) of this input, and their spread.
        draws = x.expand(self.nelbo_samples, *x.shape[1:])
        gen = seeded_generator(self.seed, index, Purpose.EXPLORE, 0, device=device)
        terms = objectives.elbo_terms(model, draws, num_samples=1, generator=gen)
        nelbo, nelbo_se = objectives.mean_and_stderr(-terms.elbo.double().cpu())
        result: dict[str, Any] = {
            "index": index,
            "label": int(self.labels[index]) if self.labels is not None else None,
            "z": loc[0].tolist(),
            "u": self.coords[index].tolist(),
            "xy": self.xy[index].tolist(),
            "input": _image(plots.unit_images(x.cpu(), self.family)[0]),
            "reconstruction": _image(plots.decode_means(model, loc)[0]),
            "original": None,
            "nelbo": {"value": nelbo, "stderr": _finite(nelbo_se),
                      "recon": float(-terms.recon.double().mean()),
                      "kl": float(terms.kl.double().mean()), "samples": self.nelbo_samples},
            "nll": None,
        }
        grey = self.test.grey if self.test.grey is not None else (
            self.test.images if self.test.levels == 256 else None)
        if self.test.binarize != "none" and grey is not None:
            result["original"] = _image(grey[index].float().cpu() / 255.0)
        if self.normalized:
            gen = seeded_generator(self.seed, index, Purpose.EXPLORE, 1, device=device)
            estimate = objectives.log_likelihood(model, x, self.nll_samples, generator=gen)
            result["nll"] = {
                "value": -float(estimate.per_example[0]),
                "mc_stderr": _finite(float(estimate.mc_stderr[0])),
                "pareto_k": _finite(float(estimate.pareto_k[0])),
                "pareto_k_threshold": _finite(pareto_k_threshold(self.nll_samples)),
                "ess": _finite(float(estimate.ess[0])),
                "samples": self.nll_samples,
                "estimator": "importance sampling with q(z|x)",
            }
        return result
