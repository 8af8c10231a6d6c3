r"""What a hand-written VAE loss really optimises.

A loss of the form ``recon_multiplier * recon + kl_weight * KL``, each term summed or
averaged over its dimensions and the batch, is always a *scaled beta-VAE objective*:

.. math::
    \ell(x) = m_r \frac{R(x)}{D^{[r=\mathrm{mean}]}} + w \frac{KL}{L^{[k=\mathrm{mean}]}}
            = s \big(-\log p(x|z) + \beta\,KL - c\big),
    \qquad s = \frac{m_r}{D^{[r=\mathrm{mean}]}},\quad
    \beta = \frac{w / L^{[k=\mathrm{mean}]}}{s}

per example, where ``R`` is the reconstruction error summed over the ``D`` data
dimensions and ``p(x|z)`` is the likelihood the error implies:

- BCE is :math:`-\log \mathrm{Bernoulli}(x; \mu)` exactly (``c = 0``) on 0/1 data. On grey
  levels it is the continuous Bernoulli without its normaliser :math:`\log C(\mu)`
  (Loaiza-Ganem & Cunningham 2019), which depends on the outputs: not a likelihood.
- The squared error is :math:`\sum (x - \mu)^2 = -\log N(x; \mu, \tfrac12 I) - \tfrac D2\log\pi`:
  a Gaussian with :math:`\sigma^2 = 1/2` whose constant :math:`c = \tfrac D2 \log(2\pi\sigma^2)
  = \tfrac D2 \log\pi` nats was dropped. At :math:`\beta = 1` the same loss is a Gaussian with
  :math:`\sigma^2 = \beta / 2` (for ``a * SSE + KL``, :math:`\sigma^2 = 1/(2a)`).

Summing over the batch multiplies everything by ``B``; a loss that returns one value per
example (``batch_reduction="none"``, as Keras loss functions do) leaves the batch to the
caller, which averages it.

:func:`explain` takes this description as arguments; :func:`probe` finds it by calling
the loss function itself on designed inputs (see :mod:`vaelab.audit.probe`).

Example (the Keras blog VAE: mean BCE over 784 pixels + mean KL over 2 latents)::

    >>> a = explain("bce", "mean", kl_reduction="mean", data_shape=(784,), latent_dim=2)
    >>> round(1 / a.scale), round(a.beta_effective, 9)
    (784, 392.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import Registry
from .forms import EPSILON_STYLES
from .probe import measure

__all__ = ["RECON_LOSSES", "Audit", "ReconLoss", "explain", "probe"]

REDUCTIONS = ("sum", "mean")
BATCH_REDUCTIONS = ("mean", "sum", "none")
DATA_KINDS = ("binary", "grey", "continuous")


@dataclass(frozen=True)
class ReconLoss:
    """A reconstruction error and the likelihood it implies."""

    name: str
    squared_error: bool  # False: binary cross-entropy
    default_reduction: str  # over data dimensions
    default_data: str
    words: str  # how the error is written, for the report


RECON_LOSSES: Registry[ReconLoss] = Registry("reconstruction loss")
for _entry in [
    ReconLoss("bce", False, "mean", "binary", "binary cross-entropy"),
    ReconLoss("mse", True, "mean", "continuous", "squared error"),
    ReconLoss("sse", True, "sum", "continuous", "squared error"),
]:
    RECON_LOSSES.register(_entry.name)(_entry)


@dataclass(frozen=True)
class Audit:
    r"""The decomposition of a hand-written loss; see the module docstring.

    The user's loss equals ``scale * mean_over_batch(-log p(x|z) + beta_effective * KL
    - missing_constant_nats)`` (for BCE on grey levels, read ``-log p`` as the BCE); with
    ``batch_reduction="none"`` it is that per example, without the mean.

    Attributes:
        recon, recon_reduction, recon_multiplier, kl_reduction, kl_weight,
        batch_reduction, batch_size, data_shape, latent_dim, data: the audited loss.
        data_dims: D, the number of data dimensions per example.
        scale: the overall factor relating the loss to the batch-mean beta-NELBO (per batch
            of ``batch_size`` examples when the batch is summed).
        scale_per_example: ``s``, the factor for one example.
        beta_effective: the KL weight relative to the reconstruction NLL (1 = the ELBO).
        gaussian_sigma: sigma of the implied Gaussian (``sqrt(1/2)``), None for BCE.
        sigma_at_beta_one: sigma of the Gaussian that makes the same loss a beta = 1
            objective, ``sqrt(beta_effective / 2)``; None for BCE or when the KL weight is 0.
        missing_constant_nats: the constant per example dropped from the true NLL (0 for BCE
            on binary data), None when what is missing is not a constant.
        normalized: whether the implied ``p(x|z)`` is a normalised likelihood for this data.
        text: the explanation in plain words, several lines, ending with the vaelab
            command that trains the same objective correctly.
        from_logits: whether ``x_hat`` is read as logits (``sigmoid(x_hat)`` is the
            probability or the Gaussian mean) rather than as probabilities / means.
        epsilon: the epsilon that keeps BCE away from ``log(0)``, None when there is none.
        epsilon_where: how BCE avoids ``log(0)``: ``"clip"`` (probabilities clipped to
            ``[eps, 1 - eps]``), ``"log"`` (eps added inside the logs), ``"clip+log"``,
            ``"log-clamp"`` (each log clamped at ``log(eps)``, PyTorch's ``-100``),
            ``"stable"`` (logits, nothing needed) or ``"none"`` (0 and 1 give inf/NaN);
            None when not known (not stated to :func:`explain`) or not BCE.
        kl_term: False for a reconstruction loss without any KL term (then
            ``kl_weight`` and ``beta_effective`` are 0 and the text says which KL weight
            would make it an ELBO).
        observations: what :func:`probe` measured, one sentence each, so that the
            conclusion can be checked; empty for :func:`explain`.
    """

    recon: str
    recon_reduction: str
    recon_multiplier: float
    kl_reduction: str
    kl_weight: float
    batch_reduction: str
    batch_size: int | None
    data_shape: tuple[int, ...]
    latent_dim: int
    data: str
    data_dims: int
    scale: float | None
    scale_per_example: float
    beta_effective: float
    gaussian_sigma: float | None
    sigma_at_beta_one: float | None
    missing_constant_nats: float | None
    normalized: bool
    text: str
    from_logits: bool = False
    epsilon: float | None = None
    epsilon_where: str | None = None
    kl_term: bool = True
    observations: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["data_shape"] = list(self.data_shape)
        out["observations"] = list(self.observations)
        return out

    def predicted_loss(self, nll: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """The user's loss rebuilt from per-example ``nll`` ``(B,)`` and ``kl`` ``(B,)``, nats.

        ``nll`` is ``-log p(x|z)`` under the implied likelihood (the summed BCE for BCE).
        Returns a scalar, or ``(B,)`` when ``batch_reduction="none"``.
        """
        constant = self.missing_constant_nats or 0.0
        per_example = self.scale_per_example * (nll + self.beta_effective * kl - constant)
        if self.batch_reduction == "none":
            return per_example
        return per_example.sum() if self.batch_reduction == "sum" else per_example.mean()


# --------------------------------------------------------------------------- validation


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _check_positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_number(what: str, value, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{what} must be a finite number {rule}, got {value!r}")
    return float(value)


def _resolve_recon_reduction(form: ReconLoss, recon_reduction: str | None) -> str:
    if recon_reduction is None:
        return form.default_reduction
    _check_choice("recon_reduction", recon_reduction, REDUCTIONS)
    if form.name == "sse" and recon_reduction == "mean":
        raise ConfigError("recon 'sse' is summed over data dimensions: use recon='mse' for a mean")
    return recon_reduction


def _check_guard(form: ReconLoss, from_logits: bool, epsilon, epsilon_where) -> float | None:
    """Validate how BCE avoids log(0); returns the epsilon as a float (or None)."""
    if not isinstance(from_logits, bool):
        raise ConfigError(f"from_logits must be True or False, got {from_logits!r}")
    if epsilon_where is None and epsilon is None:
        return None
    if form.squared_error:
        raise ConfigError("epsilon and epsilon_where describe BCE's guard against log(0): "
                          f"recon {form.name!r} has none")
    _check_choice("epsilon_where", epsilon_where, EPSILON_STYLES)
    if epsilon_where == "stable" and not from_logits:
        raise ConfigError("epsilon_where='stable' means logits computed stably: pass "
                          "from_logits=True")
    needs = epsilon_where not in ("none", "stable")
    if needs != (epsilon is not None):
        rule = "needs an epsilon" if needs else "has no epsilon"
        raise ConfigError(f"epsilon_where={epsilon_where!r} {rule}, got epsilon={epsilon!r}")
    if epsilon is None:
        return None
    value = _check_number("epsilon", epsilon, allow_zero=False)
    if value >= 0.5:
        raise ConfigError(f"epsilon must be below 0.5, got {epsilon!r}")
    return value


def _data_shape(data_shape) -> tuple[int, ...]:
    shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
    if not shape:
        raise ConfigError("data_shape is empty: pass the per-example shape, e.g. (784,)")
    for size in shape:
        _check_positive_int(f"every data_shape entry (got {shape})", size)
    return shape


# --------------------------------------------------------------------------- the audit


def explain(recon: str = "bce", recon_reduction: str | None = None,
            recon_multiplier: float = 1.0, kl_reduction: str = "sum", kl_weight: float = 1.0,
            batch_reduction: str = "mean", data_shape: int | Sequence[int] = (784,),
            latent_dim: int = 2, data: str | None = None,
            batch_size: int | None = None, from_logits: bool = False,
            epsilon: float | None = None, epsilon_where: str | None = None,
            kl_term: bool = True) -> Audit:
    r"""Explain ``recon_multiplier * recon + kl_weight * KL`` as a scaled beta-VAE objective.

    Args:
        recon: ``"bce"`` (binary cross-entropy), ``"mse"`` (squared error) or ``"sse"``
            (squared error summed over data dimensions).
        recon_reduction: ``"mean"`` or ``"sum"`` over the D data dimensions; default
            ``"mean"`` (what Keras' losses and ``F.mse_loss`` do), ``"sum"`` for ``"sse"``.
        recon_multiplier: factor on the reconstruction term (e.g. ``original_dim``), > 0.
        kl_reduction: ``"sum"`` or ``"mean"`` over the ``latent_dim`` latent dimensions.
        kl_weight: factor on the KL term, >= 0.
        batch_reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value
            per example, which the caller averages: Keras loss functions).
        data_shape: per-example data shape, e.g. ``(784,)`` or ``(64, 64, 3)``.
        latent_dim: L.
        data: ``"binary"`` (0/1), ``"grey"`` (grey levels scaled to [0, 1]) or
            ``"continuous"``; default ``"binary"`` for BCE, ``"continuous"`` for squared
            error. BCE on grey or continuous data is not a normalised likelihood; a
            Gaussian on binary data is a density, not a probability of 0/1 values.
        batch_size: B, used only with ``batch_reduction="sum"`` (the scale is then a
            number; without it the scale is None: "B per batch of B").
        from_logits: ``x_hat`` is a logit: the probability (BCE) or the Gaussian mean
            (squared error) is ``sigmoid(x_hat)``.
        epsilon, epsilon_where: BCE's guard against ``log(0)``; see :class:`Audit`.
        kl_term: False for a loss with no KL term at all (``kl_weight`` must be 0).

    Returns:
        :class:`Audit`.

    Raises:
        ConfigError: unknown names, non-positive sizes or multipliers, or a negative KL
            weight.
    """
    form = RECON_LOSSES[recon]
    recon_reduction = _resolve_recon_reduction(form, recon_reduction)
    _check_choice("kl_reduction", kl_reduction, REDUCTIONS)
    _check_choice("batch_reduction", batch_reduction, BATCH_REDUCTIONS)
    data = form.default_data if data is None else data
    _check_choice("data kind", data, DATA_KINDS)
    recon_multiplier = _check_number("recon_multiplier", recon_multiplier, allow_zero=False)
    kl_weight = _check_number("kl_weight", kl_weight, allow_zero=True)
    shape = _data_shape(data_shape)
    latent_dim = _check_positive_int("latent_dim", latent_dim)
    epsilon = _check_guard(form, from_logits, epsilon, epsilon_where)
    if not kl_term and kl_weight != 0:
        raise ConfigError(f"kl_term=False means no KL term: kl_weight must be 0, got {kl_weight}")
    if batch_reduction == "sum" and batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    dims = math.prod(shape)

    per_example = recon_multiplier / (dims if recon_reduction == "mean" else 1)
    kl_factor = kl_weight / (latent_dim if kl_reduction == "mean" else 1)
    beta = kl_factor / per_example
    # A batch sum makes the scale B x the per-example scale: a number when B is known, else
    # None ("B per batch of B"; beta and the likelihood do not depend on B).
    if batch_reduction == "sum":
        scale = per_example * batch_size if batch_size is not None else None
    else:
        scale = per_example
    gaussian = form.squared_error
    fields = dict(
        recon=form.name, recon_reduction=recon_reduction, recon_multiplier=recon_multiplier,
        kl_reduction=kl_reduction, kl_weight=kl_weight, batch_reduction=batch_reduction,
        batch_size=batch_size if batch_reduction == "sum" else None, data_shape=shape,
        latent_dim=latent_dim, data=data, data_dims=dims, scale=scale,
        scale_per_example=per_example, beta_effective=beta,
        gaussian_sigma=math.sqrt(0.5) if gaussian else None,
        sigma_at_beta_one=math.sqrt(beta / 2) if gaussian and beta > 0 else None,
        missing_constant_nats=_missing_constant(gaussian, data, dims),
        normalized=data != "binary" if gaussian else data == "binary",
        from_logits=from_logits, epsilon=epsilon, epsilon_where=epsilon_where,
        kl_term=bool(kl_term),
    )
    return Audit(**fields, text=_text(form, fields))


def _missing_constant(gaussian: bool, data: str, dims: int) -> float | None:
    if gaussian:
        return dims / 2 * math.log(math.pi)  # D/2 log(2 pi sigma^2) with sigma^2 = 1/2
    return 0.0 if data == "binary" else None


# --------------------------------------------------------------------------- the words


def _num(value: float) -> str:
    """A short, exact-looking number: 392, 3.072, 0.0001276."""
    if value == round(value) and abs(value) < 1e15:
        return str(int(round(value)))
    return f"{value:.4g}"


def _factor(value: float) -> str:
    """``1/784`` when the value is the reciprocal of an integer, else a short number."""
    if value == 0:
        return "0"
    inverse = 1 / value
    if value < 1 and abs(inverse - round(inverse)) < 1e-9 * inverse:
        return f"1/{int(round(inverse))}"
    return _num(value)


def _text(form: ReconLoss, f: dict) -> str:
    dims, latent, beta, s = f["data_dims"], f["latent_dim"], f["beta_effective"], f["scale"]
    recon_part = (f"{_factor(f['recon_multiplier'])} x {form.words} "
                  + (f"averaged over {dims} data dims" if f["recon_reduction"] == "mean"
                     else f"summed over {dims} data dims"))
    kl_part = (f" + {_factor(f['kl_weight'])} x KL "
               + (f"averaged over {latent} latent dims" if f["kl_reduction"] == "mean"
                  else f"summed over {latent} latent dims")) if f["kl_term"] else ", no KL term"
    batch = {"mean": "averaged over the batch",
             "sum": (f"summed over a batch of {f['batch_size']}" if f["batch_size"]
                     else "summed over the batch"),
             "none": "returned per example (Keras and most training loops average it over "
                     "the batch)"}[f["batch_reduction"]]
    lines = [f"Your loss: {recon_part}{kl_part}, {batch}."]
    nll = "-log p(x|z)" if f["normalized"] or form.squared_error else "BCE(x, mu)"
    constant = f["missing_constant_nats"]
    minus_c = f" - {_num(constant)}" if constant else ""
    if f["kl_term"]:
        lines.append(f"Per example it is {_factor(f['scale_per_example'])} x "
                     f"[ {nll} + {_num(beta)} x KL(q(z|x) || p(z)){minus_c} ]: "
                     "a scaled beta-VAE objective.")
    else:
        lines.append(f"Per example it is {_factor(f['scale_per_example'])} x "
                     f"[ {nll}{minus_c} ].")
    lines += _likelihood_lines(form, f)
    lines += _output_lines(form, f)
    lines += (_beta_lines(beta, likelihood=f["normalized"] or form.squared_error)
              if f["kl_term"] else _no_kl_lines(f))
    lines += _scale_lines(s, f)
    lines += _fix_lines(form, f)
    lines += _vaelab_lines(form, f)
    lines += _keras_lines(form, f)
    return "\n".join(lines)


def _likelihood_lines(form: ReconLoss, f: dict) -> list[str]:
    dims, data = f["data_dims"], f["data"]
    if not form.squared_error:
        if data == "binary":
            return ["Implied p(x|z): Bernoulli. BCE is its exact negative log-likelihood on 0/1 "
                    "data, so no constant is missing."]
        return [f"Implied p(x|z): none. BCE on {data} data in [0, 1] is the continuous "
                "Bernoulli without its normaliser log C(mu), which depends on the outputs: the "
                "loss is not a negative log-likelihood and no NLL can be reported from it. "
                "Use the continuous Bernoulli likelihood, or binarise the data."]
    lines = [
        "Implied p(x|z): Gaussian N(mu, sigma^2 I) with fixed sigma^2 = 1/2 (sigma = 0.7071) "
        "in the units of x, since sum (x - mu)^2 = -log N(x; mu, 1/2) - D/2 log(pi).",
        f"Missing constant: D/2 log(2 pi sigma^2) = {dims}/2 x log(pi) = "
        f"{f['missing_constant_nats']:.4f} nats per example; -log p(x|z) = SSE + that. "
        "Without it the numbers are not log-likelihoods and not comparable across papers.",
    ]
    if f["sigma_at_beta_one"] is not None:
        sigma = f["sigma_at_beta_one"]
        lines.append(f"Equivalently, at beta = 1 the loss is a Gaussian with sigma^2 = beta/2 = "
                     f"{_num(sigma**2)} (sigma = {sigma:.4g}): for a*SSE + KL, sigma^2 = 1/(2a).")
    if data == "binary":
        lines.append("On 0/1 data a Gaussian is a density, not a probability of the pixel "
                     "values: not a normalised likelihood for this data. Use Bernoulli.")
    elif data == "grey":
        lines.append("On grey levels a Gaussian is a density on [0, 1]-scaled values: compare "
                     "it with discrete NLLs only after uniform dequantisation.")
    return lines


def _beta_lines(beta: float, likelihood: bool) -> list[str]:
    if beta == 0:
        return ["beta = 0: no KL term, so this is a plain autoencoder, not a VAE."]
    if math.isclose(beta, 1.0, rel_tol=1e-9):
        if not likelihood:
            return ["beta = 1, but without a likelihood this is not an ELBO."]
        return ["beta = 1: this is the ELBO (up to the scale and constant above)."]
    if beta > 1:
        return [f"beta = {_num(beta)}: the KL weighs {_num(beta)} times more than in the ELBO; "
                "expect blurry reconstructions and unused (collapsed) latent dimensions."]
    return [f"beta = {_num(beta)}: the KL weighs less than in the ELBO; expect sharp "
            "reconstructions, a poorly matched prior and poor samples."]


def _output_lines(form: ReconLoss, f: dict) -> list[str]:
    """How x_hat is read, and how BCE avoids log(0) (when known)."""
    where, eps = f["epsilon_where"], f["epsilon"]
    if form.squared_error:
        return (["x_hat is read as logits: the Gaussian mean is sigmoid(x_hat)."]
                if f["from_logits"] else [])
    read = ("x_hat is read as logits, p = sigmoid(x_hat)" if f["from_logits"]
            else "x_hat is read as probabilities")
    if where is None:
        return [f"{read}."] if f["from_logits"] else []
    advice = "" if where == "stable" else (
        " Output logits and use a BCE with logits (computed stably) to avoid this.")
    worst = -math.log(2 * eps) if where == "clip+log" else -math.log(eps) if eps else None
    cost = f" at most {_num(worst)} nats per element" if worst else ""
    text = {
        "stable": "and the cross-entropy is computed stably: exact at any logit, no epsilon.",
        "none": "with nothing guarding log(0): an output of exactly 0 or 1 gives an infinite "
                "or NaN loss.",
        "clip": f"clipped to [eps, 1 - eps] with eps = {_num(eps or 0)}: a wrong pixel costs"
                f"{cost} and gets no gradient beyond the clip.",
        "log": f"with eps = {_num(eps or 0)} added inside the logs, log(p + eps): finite "
               f"({cost.strip()}), but not exactly the BCE.",
        "clip+log": f"clipped to [eps, 1 - eps] and with eps added inside the logs, eps = "
                    f"{_num(eps or 0)}: a wrong pixel costs{cost} and gets no gradient "
                    "beyond the clip.",
        "log-clamp": f"with each log clamped at log(eps) = {_num(math.log(eps or 1))} "
                     "(PyTorch's binary_cross_entropy): finite, but a wrong pixel gets no "
                     "gradient where the clamp acts.",
    }[where]
    return [f"{read}, {text}{advice}"]


def _no_kl_lines(f: dict) -> list[str]:
    s = f["scale_per_example"]
    return [f"No KL term: this is a reconstruction loss only. Adding w x KL summed over latent "
            f"dims makes beta = {_factor(1 / s)} x w; the ELBO needs w = {_factor(s)} (or: "
            f"multiply this loss by {_factor(1 / s)} and add the summed KL)."]


def _scale_lines(scale: float | None, f: dict) -> list[str]:
    if scale is None:  # a batch sum, B not given: the scale is B
        each = _factor(f["scale_per_example"])
        times = "B" if math.isclose(f["scale_per_example"], 1.0, rel_tol=1e-9) else f"B x {each}"
        return [f"Scale {times} per batch of B (the batch is summed; pass the batch size for a "
                "number): it does not move the optimum, but with SGD it multiplies the "
                "effective learning rate by it (Adam is nearly scale-invariant). Divide the "
                "loss by it to read nats per example."]
    per = {"sum": f" per batch of {f['batch_size']}", "mean": " (the batch is averaged)",
           "none": " per example"}[f["batch_reduction"]]
    if math.isclose(scale, 1.0, rel_tol=1e-9):
        return [f"Scale 1{per}: the loss is the beta-NELBO itself."]
    return [f"Scale {_factor(scale)}{per}: it does not move the optimum, but with SGD it "
            f"multiplies the effective learning rate by {_factor(scale)} (Adam is nearly "
            "scale-invariant). Divide the loss by it to read nats per example."]


def _fix_lines(form: ReconLoss, f: dict) -> list[str]:
    beta = f["beta_effective"]
    if math.isclose(beta, 1.0, rel_tol=1e-9) and (f["normalized"] or form.squared_error):
        return ["Report the NELBO (beta = 1, constant included), not the loss value."]
    return ["To train the ELBO: sum the reconstruction term over data dims (BCE, or "
            "SSE/(2 sigma^2) plus the constant for a Gaussian), sum the KL over latent dims "
            "with weight 1, and average over the batch."]


def _vaelab_lines(form: ReconLoss, f: dict) -> list[str]:
    """The vaelab command that trains the same objective, and the ELBO, correctly."""
    beta, latent = (f["beta_effective"] if f["kl_term"] else 1.0), f["latent_dim"]
    head = ("In vaelab (log-likelihood summed per example, KL summed over latent dims, batch "
            "averaged once, nats):")
    if not form.squared_error:
        if f["data"] != "binary":
            return [head, f"  the normalised objective for {f['data']} data: vaelab train "
                    f"--likelihood continuous-bernoulli --latent-dim {latent} --beta {_num(beta)}",
                    f"  or binarise the data: vaelab train --likelihood bernoulli --binarize "
                    f"dynamic --latent-dim {latent} --beta {_num(beta)}"]
        if not f["kl_term"]:
            return [head, f"  the ELBO: vaelab train --likelihood bernoulli --latent-dim {latent}"]
        lines = [head, f"  the same objective: vaelab train --likelihood bernoulli "
                 f"--latent-dim {latent} --beta {_num(beta)}"]
        if not math.isclose(beta, 1.0, rel_tol=1e-9):
            lines.append(f"  the ELBO: vaelab train --likelihood bernoulli --latent-dim {latent}")
        return lines
    sigma = f["gaussian_sigma"]
    if not f["kl_term"]:
        lines = [head, f"  the ELBO with this Gaussian: vaelab train --likelihood gaussian "
                 f"--scale {sigma:.6g} --latent-dim {latent}"]
    else:
        lines = [head, f"  the same objective: vaelab train --likelihood gaussian --scale "
                 f"{sigma:.6g} --latent-dim {latent} --beta {_num(beta)}"]
    if f["sigma_at_beta_one"] is not None and not math.isclose(beta, 1.0, rel_tol=1e-9):
        lines.append(f"  the same optimum as an ELBO: vaelab train --likelihood gaussian "
                     f"--scale {f['sigma_at_beta_one']:.6g} --latent-dim {latent}")
    lines.append(f"  or learn sigma: vaelab train --likelihood gaussian --scale learned "
                 f"--latent-dim {latent}")
    return lines


def _keras_lines(form: ReconLoss, f: dict) -> list[str]:
    """The last lines: the :mod:`vaelab.keras` line that replaces the loss in a Keras model
    (the ELBO, per example, with metrics in nats; docs/keras.md)."""
    binary = f["data"] == "binary"
    if form.squared_error and not binary:
        likelihood, note = 'Gaussian(scale="learned")', (
            "a Gaussian with a learned sigma and its constant; the decoder's last layer "
            "outputs the mean" + (", so move the sigmoid into it" if f["from_logits"] else ""))
    else:
        likelihood = "Bernoulli()" if f["from_logits"] else 'Bernoulli(output="probs")'
        note = ("logits read exactly" if f["from_logits"]
                else "sigmoid outputs clipped as Keras clips them; Bernoulli() for logits")
        if not binary:
            note += "; binarise x first: Bernoulli is a likelihood of 0/1 data only"
        elif form.squared_error:
            note += "; on 0/1 data the Bernoulli, not a Gaussian, is the likelihood"
    beta = f["beta_effective"] if f["kl_term"] else 1.0
    keep = (f"; ELBOLoss(..., beta={_num(beta)}) would keep this loss's KL weight"
            if beta > 0 and not math.isclose(beta, 1.0, rel_tol=1e-9) else "")
    name = likelihood.split("(")[0]
    return [f"In Keras 3 (docs/keras.md): from vaelab.keras import ELBOLoss, {name}; the ELBO "
            f"in place of this loss ({note}{keep}):",
            f"  x_hat = ELBOLoss({likelihood})([x, x_hat, z_mean, z_log_var])"]


# --------------------------------------------------------------------------- the probe


def _digits(precision: float) -> int:
    """Significant digits that a measurement to relative ``precision`` supports: 12 for
    float64 arithmetic (held to 1e-9, exact to ~1e-13), else as many as it held to."""
    if precision <= 1e-9:
        return 12
    return max(3, round(-math.log10(precision)))


def _snap(value: float, precision: float) -> float:
    """``value`` as a whole number or the reciprocal of one when it is one to within the
    measurement's precision, else rounded to the digits that precision supports."""
    if value == 0:
        return 0.0
    tol = max(1e-9, 10 * precision)
    if math.isclose(value, round(value), rel_tol=tol) and round(value) != 0:
        return float(round(value))
    inverse = 1 / value
    if math.isclose(inverse, round(inverse), rel_tol=tol) and round(inverse) != 0:
        return 1 / round(inverse)
    return float(f"{value:.{_digits(precision)}g}")


def _canonical_recon(weight: float, dims: int, precision: float) -> tuple[str, float]:
    """``(reduction, multiplier)`` over data dims for a weight ``a`` per element.

    Only ``a = multiplier / D^[mean]`` is observable; the mean is named when ``a * D`` is a
    whole number (``784 * mean`` reads as written), otherwise the sum.
    """
    weight = _snap(weight, precision)
    if weight == 1.0:
        return "sum", 1.0
    per_mean = _snap(weight * dims, precision)
    if weight < 1 and per_mean == round(per_mean) and per_mean >= 1:
        return "mean", per_mean
    return "sum", weight


def _canonical_kl(weight: float, latent_dim: int, precision: float) -> tuple[str, float]:
    """``(reduction, weight)`` over latent dims for a weight ``w`` per latent dim."""
    weight = _snap(weight, precision)
    if latent_dim > 1 and _snap(weight * latent_dim, precision) == 1.0:
        return "mean", 1.0
    return "sum", weight


def probe(fn: Callable[..., Any], *, data_shape: int | Sequence[int], latent_dim: int,
          roles: Sequence[str] = ("x", "x_hat", "mu", "logvar"),
          batch_size: int | None = None, framework: str = "auto",
          data: str | None = None, **fixed_kwargs: Any) -> Audit:
    r"""Call a VAE loss function on designed inputs and explain what it optimises.

    The function is called about 40 times (twice that when it falls back to 1e-5) on
    float64 batches built to isolate each part of ``a * recon + w * KL`` (see
    :mod:`vaelab.audit.probe` for the steps); nothing is fitted to noise: every
    conclusion is an exact equality at chosen points.

    Args:
        fn: the loss, ``fn(*args_in_roles_order, **fixed_kwargs)``, returning one number,
            one value per example ``(B,)``, or a dict with a ``'loss'`` entry / a tuple
            whose first item is the loss.
        data_shape: per-example shape of ``x`` and ``x_hat``, e.g. ``(784,)`` or
            ``(28, 28, 1)``.
        latent_dim: L, the size of ``mu`` and ``logvar`` ``(B, L)``.
        roles: what each positional argument is, in order: ``"x"`` (data in [0, 1]),
            ``"x_hat"`` (the reconstruction: probabilities, means or logits), ``"mu"``,
            ``"logvar"`` and ``"z"`` (passed as zeros; the loss must not depend on it).
            ``("x", "x_hat")`` for a reconstruction loss such as
            ``keras.losses.binary_crossentropy(y_true, y_pred)``.
        batch_size: the batch size you train with. Needed when a weight inside depends
            on B (the probe says so); a loss summed over the batch gets its scale as a
            number with it ("B per batch of B" without). The probe uses B = 4 and 5 when
            it is not given.
        framework: ``"auto"`` (NumPy arrays are tried first, then torch tensors),
            ``"numpy"``, ``"torch"`` or ``"keras"`` (Keras 3 on the torch backend).
        data: what your data is, as in :func:`explain` (default: binary for BCE,
            continuous for squared error).
        **fixed_kwargs: passed to every call unchanged, e.g. ``M_N=0.00025``.

    Returns:
        The :class:`Audit` that :func:`explain` gives for the same description, with
        ``from_logits``, ``epsilon``, ``epsilon_where``, ``batch_reduction`` and the
        ``observations`` measured.

    Raises:
        ConfigError: bad arguments, or a refusal naming what was observed: a function
            that fails on the probe inputs, a stochastic one, one outside the
            ``a * recon + w * KL`` family, or a KL with the wrong sign.

    Example::

        >>> import numpy as np
        >>> def blog_loss(x, x_hat, mu, logvar):  # Keras blog 2016: mean BCE + mean KL
        ...     p = np.clip(x_hat, 1e-7, 1 - 1e-7)
        ...     bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).mean(-1)
        ...     return bce - 0.5 * (1 + logvar - mu**2 - np.exp(logvar)).mean(-1)
        >>> a = probe(blog_loss, data_shape=(784,), latent_dim=2)
        >>> round(a.beta_effective, 9), a.batch_reduction, a.epsilon, a.epsilon_where
        (392.0, 'none', 1e-07, 'clip')
    """
    shape = _data_shape(data_shape)
    latent_dim = _check_positive_int("latent_dim", latent_dim)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    found = measure(fn, data_shape=shape, latent_dim=latent_dim, roles=roles,
                    batch_size=batch_size, framework=framework, fixed_kwargs=fixed_kwargs)
    recon_reduction, multiplier = _canonical_recon(found.recon_weight, math.prod(shape),
                                                   found.precision)
    kl_reduction, kl_weight = _canonical_kl(found.kl_factor, latent_dim, found.precision)
    epsilon = found.form.epsilon
    if epsilon is not None:
        epsilon = float(f"{epsilon:.{min(6, _digits(found.precision))}g}")
    bce = found.form.kind == "bce"
    recon = "bce" if bce else ("mse" if recon_reduction == "mean" else "sse")
    audit = explain(recon, recon_reduction, multiplier, kl_reduction, kl_weight,
                    found.batch_reduction, shape, latent_dim, data, found.batch_size,
                    from_logits=found.form.from_logits,
                    epsilon=epsilon if bce else None, kl_term="mu" in roles,
                    epsilon_where=found.form.style if bce else None)
    return replace(audit, observations=tuple(found.observations))
