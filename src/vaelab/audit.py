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

Summing over the batch multiplies everything by ``B``.

Example (the Keras blog VAE: mean BCE over 784 pixels + mean KL over 2 latents)::

    >>> a = explain("bce", "mean", kl_reduction="mean", data_shape=(784,), latent_dim=2)
    >>> round(1 / a.scale), round(a.beta_effective, 9)
    (784, 392.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError
from .registry import Registry

__all__ = ["RECON_LOSSES", "Audit", "ReconLoss", "explain"]

REDUCTIONS = ("sum", "mean")
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
    - missing_constant_nats)`` (for BCE on grey levels, read ``-log p`` as the BCE).

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
        text: the explanation in plain words, several lines.
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
    scale: float
    scale_per_example: float
    beta_effective: float
    gaussian_sigma: float | None
    sigma_at_beta_one: float | None
    missing_constant_nats: float | None
    normalized: bool
    text: str

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["data_shape"] = list(self.data_shape)
        return out

    def predicted_loss(self, nll: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """The user's loss rebuilt from per-example ``nll`` ``(B,)`` and ``kl`` ``(B,)``, nats.

        ``nll`` is ``-log p(x|z)`` under the implied likelihood (the summed BCE for BCE).
        """
        constant = self.missing_constant_nats or 0.0
        return self.scale * (nll + self.beta_effective * kl - constant).mean()


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
            batch_size: int | None = None) -> Audit:
    r"""Explain ``recon_multiplier * recon + kl_weight * KL`` as a scaled beta-VAE objective.

    Args:
        recon: ``"bce"`` (binary cross-entropy), ``"mse"`` (squared error) or ``"sse"``
            (squared error summed over data dimensions).
        recon_reduction: ``"mean"`` or ``"sum"`` over the D data dimensions; default
            ``"mean"`` (what Keras' losses and ``F.mse_loss`` do), ``"sum"`` for ``"sse"``.
        recon_multiplier: factor on the reconstruction term (e.g. ``original_dim``), > 0.
        kl_reduction: ``"sum"`` or ``"mean"`` over the ``latent_dim`` latent dimensions.
        kl_weight: factor on the KL term, >= 0.
        batch_reduction: ``"mean"`` or ``"sum"`` over the batch.
        data_shape: per-example data shape, e.g. ``(784,)`` or ``(64, 64, 3)``.
        latent_dim: L.
        data: ``"binary"`` (0/1), ``"grey"`` (grey levels scaled to [0, 1]) or
            ``"continuous"``; default ``"binary"`` for BCE, ``"continuous"`` for squared
            error. BCE on grey or continuous data is not a normalised likelihood; a
            Gaussian on binary data is a density, not a probability of 0/1 values.
        batch_size: B, needed only with ``batch_reduction="sum"``.

    Returns:
        :class:`Audit`.

    Raises:
        ConfigError: unknown names, non-positive sizes or multipliers, a negative KL
            weight, or a summed batch without ``batch_size``.
    """
    form = RECON_LOSSES[recon]
    recon_reduction = _resolve_recon_reduction(form, recon_reduction)
    _check_choice("kl_reduction", kl_reduction, REDUCTIONS)
    _check_choice("batch_reduction", batch_reduction, ("mean", "sum"))
    data = form.default_data if data is None else data
    _check_choice("data kind", data, DATA_KINDS)
    recon_multiplier = _check_number("recon_multiplier", recon_multiplier, allow_zero=False)
    kl_weight = _check_number("kl_weight", kl_weight, allow_zero=True)
    shape = _data_shape(data_shape)
    latent_dim = _check_positive_int("latent_dim", latent_dim)
    if batch_reduction == "sum":
        if batch_size is None:
            raise ConfigError("batch_reduction='sum' scales the loss by B: pass batch_size")
        _check_positive_int("batch_size", batch_size)
    dims = math.prod(shape)

    per_example = recon_multiplier / (dims if recon_reduction == "mean" else 1)
    kl_factor = kl_weight / (latent_dim if kl_reduction == "mean" else 1)
    beta = kl_factor / per_example
    scale = per_example * (batch_size if batch_reduction == "sum" else 1)
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
    inverse = 1 / value
    if value < 1 and abs(inverse - round(inverse)) < 1e-9 * inverse:
        return f"1/{int(round(inverse))}"
    return _num(value)


def _text(form: ReconLoss, f: dict) -> str:
    dims, latent, beta, s = f["data_dims"], f["latent_dim"], f["beta_effective"], f["scale"]
    recon_part = (f"{_num(f['recon_multiplier'])} x {form.words} "
                  + (f"averaged over {dims} data dims" if f["recon_reduction"] == "mean"
                     else f"summed over {dims} data dims"))
    kl_part = (f"{_num(f['kl_weight'])} x KL "
               + (f"averaged over {latent} latent dims" if f["kl_reduction"] == "mean"
                  else f"summed over {latent} latent dims"))
    batch = ("averaged over the batch" if f["batch_reduction"] == "mean"
             else f"summed over a batch of {f['batch_size']}")
    lines = [f"Your loss: {recon_part} + {kl_part}, {batch}."]
    nll = "-log p(x|z)" if f["normalized"] or form.squared_error else "BCE(x, mu)"
    constant = f["missing_constant_nats"]
    minus_c = f" - {_num(constant)}" if constant else ""
    lines.append(f"Per example it is {_factor(f['scale_per_example'])} x "
                 f"[ {nll} + {_num(beta)} x KL(q(z|x) || p(z)){minus_c} ]: "
                 "a scaled beta-VAE objective.")
    lines += _likelihood_lines(form, f)
    lines += _beta_lines(beta, likelihood=f["normalized"] or form.squared_error)
    lines += _scale_lines(s, f)
    lines += _fix_lines(form, f)
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


def _scale_lines(scale: float, f: dict) -> list[str]:
    per = (f" per batch of {f['batch_size']}" if f["batch_reduction"] == "sum"
           else " (the batch is averaged)")
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
