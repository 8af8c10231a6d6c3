r"""Measure what a loss function computes by calling it on designed inputs.

The engine behind :func:`vaelab.audit.probe`. It assumes nothing about the code, only
that the loss is, per example,

.. math:: \ell = a \sum_j g(x_j, \hat x_j) + w \sum_l \mathrm{KL}(\mu_l, \lambda_l)

reduced over the batch by a mean, a sum or not at all, and checks every part of that
assumption with exact float64 arithmetic at chosen points (no curve fitting):

1. the framework (NumPy arrays, torch tensors or Keras tensors) and determinism;
2. the batch reduction: the output's shape, and ``B`` vs ``B + 1`` copies of one example;
3. ``g``: every data element set to designed ``(x, x_hat)`` values; the per-example
   values are proportional to ``g`` for exactly one of BCE, squared or absolute error of
   ``x_hat`` or of ``sigmoid(x_hat)`` (which gives ``a * D``), with no constant added;
4. the guard against ``log(0)`` for BCE: the values at hopeless and perfect predictions
   (``x_hat`` = 0 and 1, or logits of -1000 and 1000);
5. the divisor: one element moved changes the loss by ``1/D`` of moving all of them, the
   same at the first, middle and last element, and two moved elements add;
6. the KL, at a perfect reconstruction: ``mu`` and ``logvar`` moved in one latent
   dimension change the loss by ``w`` times the Gaussian KL (weight, sign, form), the
   same in the last dimension, and two dimensions add;
7. additivity: whole examples with every element and latent moved give exactly
   ``a * sum(g) + w * sum(KL)``, alone and mixed in one batch (no batch statistics);
8. the batch size: per-example terms at ``B`` and ``B + 1`` agree, or the one that moves
   (an M_N computed inside, a KL summed over the batch) is named.

Every equality is checked to 1e-9 relative; if that fails, the whole probe is repeated
to 1e-5 (code that loses precision inside) and says so.

Anything that fails a check is refused with one line saying what was observed.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .forms import EPSILON_STYLES, ReconForm, gaussian_kl, recon_candidates, solve_epsilon
from .frameworks import FRAMEWORKS, convert_inputs, keras_backend, read_output

__all__ = ["ROLES", "Measured", "measure"]

#: Argument roles a probed function may take, in the order it takes them.
ROLES = ("x", "x_hat", "mu", "logvar", "z")

#: Relative tolerances: float64 arithmetic; a function that loses precision inside
#: (Keras' ops.mean computes in float32 even for float64 inputs); a float32 result.
STRICT, LOOSE, LOW_PRECISION = 1e-9, 1e-5, 1e-3

#: Tolerance that tells the reconstruction families apart before the guard is known.
COARSE = 5e-2

#: Base point per data element: a target of 1 and an output of 0.5.
BASE_X, BASE_X_HAT = 1.0, 0.5

#: Interior points (x, x_hat), all x_hat in (0, 1): they tell the forms apart.
INTERIOR = ((1.0, 0.2), (0.0, 0.2), (0.0, 0.7), (0.25, 0.6), (1.0, 0.9), (0.75, 0.35))

#: Hopeless and perfect predictions: (x, x_hat) for probabilities, then for logits.
EXTREMES = {False: ((1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)),
            True: ((1.0, -1000.0), (1.0, 1000.0), (0.0, 1000.0), (0.0, -1000.0))}

BASE = (BASE_X, BASE_X_HAT)

#: (mu, logvar) points in one latent dimension; the first one fixes the KL weight.
KL_POINTS = ((1.0, 0.0), (2.0, 0.0), (0.0, 1.0), (0.0, -1.0), (0.5, -0.5), (-1.0, 2.0))


@dataclass
class Measured:
    """What the probe found, as :func:`vaelab.audit.explain` arguments plus observations.

    ``recon_weight`` is ``a`` (the weight of one data element's error) and ``kl_factor``
    is ``w`` (the weight of one latent dimension's KL); ``kl_factor`` is 0 when the roles
    have no ``mu``/``logvar`` or the loss ignores them. ``precision`` is the relative
    tolerance every equality held to.
    """

    form: ReconForm
    recon_weight: float
    kl_factor: float
    batch_reduction: str
    batch_size: int | None
    framework: str
    precision: float
    observations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Example:
    """One example: ``x``, ``x_hat`` flat ``(D,)``; ``mu``, ``logvar`` ``(L,)``."""

    x: np.ndarray
    x_hat: np.ndarray
    mu: np.ndarray
    logvar: np.ndarray

    def with_data(self, changes: dict[int, tuple[float, float]]) -> _Example:
        x, x_hat = self.x.copy(), self.x_hat.copy()
        for j, (xj, x_hat_j) in changes.items():
            x[j], x_hat[j] = xj, x_hat_j
        return replace(self, x=x, x_hat=x_hat)

    def with_latent(self, changes: dict[int, tuple[float, float]]) -> _Example:
        mu, logvar = self.mu.copy(), self.logvar.copy()
        for j, (m, lv) in changes.items():
            mu[j], logvar[j] = m, lv
        return replace(self, mu=mu, logvar=logvar)


def _num(value: float) -> str:
    return f"{value:.6g}"


def _weight(value: float) -> str:
    """``1/784`` for the reciprocal of a whole number, else six significant digits."""
    if 0 < abs(value) < 1:
        inverse = 1 / value
        if abs(inverse - round(inverse)) < 1e-9 * abs(inverse):
            return f"1/{round(inverse)}"
    return _num(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _Probe:
    """Calls the user's function on batches of designed examples and reads the result."""

    def __init__(self, fn: Callable[..., Any], data_shape: tuple[int, ...], latent_dim: int,
                 roles: tuple[str, ...], batch_size: int | None,
                 fixed_kwargs: dict[str, Any]) -> None:
        self.fn, self.data_shape, self.latent_dim = fn, data_shape, latent_dim
        self.roles, self.fixed_kwargs = roles, fixed_kwargs
        self.dims = math.prod(data_shape)
        self.batch = batch_size or 4
        self.batch_size_given = batch_size is not None
        self.framework = "numpy"
        self.reduction = "mean"
        self.rtol = STRICT  # relative tolerance of every comparison
        self.floor = 1e-6  # values below floor x the reconstruction scale count as zero
        self.z_value = 0.0
        self.notes: list[str] = []
        self.base = _Example(np.full(self.dims, BASE_X), np.full(self.dims, BASE_X_HAT),
                             np.zeros(latent_dim), np.zeros(latent_dim))

    # ----------------------------------------------------------------- calling

    def arrays(self, examples: Sequence[_Example]) -> dict[str, np.ndarray]:
        n = len(examples)
        stack = {"x": np.stack([e.x for e in examples]).reshape(n, *self.data_shape),
                 "x_hat": np.stack([e.x_hat for e in examples]).reshape(n, *self.data_shape),
                 "mu": np.stack([e.mu for e in examples]),
                 "logvar": np.stack([e.logvar for e in examples]),
                 "z": np.full((n, self.latent_dim), self.z_value)}
        return {role: stack[role] for role in self.roles}

    def call_raw(self, framework: str, examples: Sequence[_Example]) -> Any:
        inputs = convert_inputs(framework, self.arrays(examples))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return self.fn(*(inputs[r] for r in self.roles), **self.fixed_kwargs)

    def call_read(self, examples: Sequence[_Example], what: str) -> tuple[np.ndarray, str,
                                                                          str | None]:
        """:func:`read_output` of the call; the user's exceptions become a refusal."""
        try:
            out = self.call_raw(self.framework, examples)
        except ConfigError:
            raise
        except Exception as exc:  # the user's code: any exception is an observation
            raise ConfigError(f"the function fails on the probe inputs ({what}): "
                              f"{_one_line(exc)}") from None
        return read_output(out)

    def call(self, examples: Sequence[_Example], what: str) -> np.ndarray:
        """The loss for a batch of ``examples``, shape ``()`` or ``(len(examples),)``."""
        return self.check_shape(self.call_read(examples, what)[0], len(examples))

    def check_shape(self, values: np.ndarray, n: int) -> np.ndarray:
        if values.ndim == 0 or values.shape == (n,):
            return values
        if values.size == 1:
            return values.reshape(())
        raise ConfigError(f"the function returns shape {tuple(values.shape)} for a batch of "
                          f"{n} examples of shape {self.data_shape}: neither one number nor "
                          "one per example (sum or average the other axes inside it; a Keras "
                          "loss averages only the last axis: probe it on flat data, e.g. "
                          f"data_shape ({self.dims},))")

    def per_example(self, values: np.ndarray, n: int) -> float:
        """One example's value from the output for ``n`` copies of it."""
        if self.reduction == "none":
            return float(values[0])
        return float(values) / (n if self.reduction == "sum" else 1)

    def value(self, example: _Example, what: str, n: int | None = None) -> float:
        """The per-example loss of ``example`` (``n`` copies in a batch, default B)."""
        n = n or self.batch
        return self.per_example(self.call([example] * n, what), n)

    # ----------------------------------------------------------------- tolerances

    def close(self, measured: float, predicted: float, unit: float) -> bool:
        """Equal within the probe's relative tolerance of ``unit`` (inf and NaN: alike)."""
        if not (math.isfinite(measured) and math.isfinite(predicted)):
            return (math.isnan(measured) and math.isnan(predicted)) or measured == predicted
        return abs(measured - predicted) <= self.rtol * abs(unit)


# --------------------------------------------------------------------------- stages


def _detect_framework(p: _Probe, framework: str) -> str:
    """Try NumPy first (a torch function rejects arrays), then torch; say what was seen."""
    base = [p.base] * p.batch
    if framework != "auto":
        p.framework = framework
        p.call(base, "the base batch")
        return f"framework {framework} (as stated)"
    try:
        out = p.call_raw("numpy", base)
    except Exception as exc:  # the user's code: a torch function rejects NumPy arrays
        numpy_error = _one_line(exc)
    else:
        read_output(out)
        if not _is_tensor(out):
            p.framework = "numpy"
            return "framework numpy: NumPy arrays in, NumPy out"
        p.framework = "keras" if keras_backend() == "torch" else "torch"
        return (f"framework {p.framework}: NumPy arrays in, torch tensors out"
                + (" (Keras 3 on its torch backend)" if p.framework == "keras" else ""))
    p.framework = "keras" if _uses_keras(p.fn) else "torch"
    try:
        p.call_raw(p.framework, base)
    except Exception as exc:
        raise ConfigError(f"the function fails on the probe inputs (a batch of {p.batch} "
                          f"examples of shape {p.data_shape}): with NumPy arrays "
                          f"{numpy_error}; with torch tensors {_one_line(exc)}") from None
    return f"framework {p.framework}: NumPy arrays were rejected ({numpy_error})"


def _uses_keras(fn: Callable[..., Any]) -> bool:
    """Keras 3 on torch is loaded and ``fn`` comes from Keras or refers to it."""
    if keras_backend() != "torch":
        return False
    if str(getattr(fn, "__module__", "")).startswith("keras"):
        return True
    names = getattr(fn, "__globals__", {})
    return any(isinstance(v, types.ModuleType) and v.__name__.split(".")[0] == "keras"
               for v in names.values())


def _is_tensor(out: Any) -> bool:
    if isinstance(out, dict):
        out = out.get("loss")
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    return isinstance(out, torch.Tensor)


def _check_deterministic(p: _Probe) -> str:
    first, dtype, note = p.call_read([p.base] * p.batch, "the base batch")
    second, _, _ = p.call_read([p.base] * p.batch, "the base batch again")
    if not np.array_equal(first, second, equal_nan=True):
        raise ConfigError(
            f"two identical calls returned different values ({_num(float(first.ravel()[0]))} "
            f"and {_num(float(second.ravel()[0]))}): the function draws random numbers (a "
            "z sampled inside?); pass the noise in as an argument (fixed_kwargs, or --set) "
            "or seed the generator inside the function, e.g. torch.manual_seed(0)")
    if note:
        p.notes.append(note)
    if dtype != "float64":
        p.rtol, p.floor = LOW_PRECISION, 1e-4
        p.notes.append(f"it returns {dtype}, not float64: values were matched to "
                       f"{LOW_PRECISION:g} only")
    return "deterministic: two identical calls agree bit for bit"


def _check_z(p: _Probe) -> str | None:
    if "z" not in p.roles:
        return None
    before = p.call([p.base] * p.batch, "z = 0")
    p.z_value = 1.0
    after = p.call([p.base] * p.batch, "z = 1")
    p.z_value = 0.0
    if not np.array_equal(before, after):
        raise ConfigError("the loss changes with z (from "
                          f"{_num(float(before.ravel()[0]))} to {_num(float(after.ravel()[0]))} "
                          "when z goes from 0 to 1): a Monte-Carlo KL or a z-dependent term is "
                          "outside a * recon + w * KL; pass the analytic KL instead")
    return "z is passed but not used (the loss is the same at z = 0 and z = 1)"


def _detect_reduction(p: _Probe) -> str:
    """Mean, sum or none over the batch, from B and B + 1 copies of one example."""
    for example in (p.base, p.base.with_latent({0: (1.0, 0.0)})):
        small = p.call([example] * p.batch, f"{p.batch} copies of one example")
        large = p.call([example] * (p.batch + 1), f"{p.batch + 1} copies of one example")
        if np.any(small != 0):
            break
    b, b1 = p.batch, p.batch + 1
    if small.shape == (b,) and large.shape == (b1,):
        p.reduction = "none"
        if not (np.all(small == small[0]) and np.all(large == large[0])):
            raise ConfigError("the function returns one value per example, but copies of one "
                              f"example get different values ({_num(small[0])}, "
                              f"{_num(small[-1])}): it mixes examples within the batch")
        return (f"batch: it returns one value per example (shape ({b},)); Keras and most "
                "training loops average them over the batch")
    if small.shape != () or large.shape != ():
        raise ConfigError(f"the function returns shape {small.shape} for {b} examples but "
                          f"{large.shape} for {b1}: neither one number nor one per example")
    ratio = float(large) / float(small) if small != 0 else math.nan
    if p.close(ratio, 1.0, 1.0):
        p.reduction = "mean"
        return (f"batch: {b} and {b1} copies of one example give the same value "
                f"({_num(float(small))}): a mean over the batch")
    if p.close(ratio, b1 / b, 1.0):
        p.reduction = "sum"
        return (f"batch: {b1} copies of one example give {b1}/{b} times the value of {b} "
                f"({_num(float(large))} vs {_num(float(small))}): a sum over the batch")
    raise ConfigError(f"the batch is neither averaged nor summed: {b} copies of one example "
                      f"give {_num(float(small))}, {b1} copies give {_num(float(large))} "
                      f"(ratio {_num(ratio)}; a mean gives 1, a sum {b1}/{b})")


def _uniform(p: _Probe, point: tuple[float, float]) -> _Example:
    """An example with every data element at ``point = (x, x_hat)`` and mu = logvar = 0."""
    return replace(p.base, x=np.full(p.dims, point[0]), x_hat=np.full(p.dims, point[1]))


def _uniform_values(p: _Probe, points: Sequence[tuple[float, float]]) -> list[float]:
    """Per-example loss with every data element at each ``(x, x_hat)``: ``A * g`` exactly."""
    return [p.value(_uniform(p, pt), f"every element at (x, x_hat) = {pt}") for pt in points]


def _g(form: ReconForm, point: tuple[float, float]) -> float:
    return float(form.value(np.array(point[0]), np.array(point[1])))


def _fits(p: _Probe, form: ReconForm, scale: float, points, measured, rtol: float) -> bool:
    """``measured`` equals ``scale * g`` at every point, relative to each value (values
    below ``floor * scale`` count as zero)."""
    saved, p.rtol = p.rtol, rtol
    try:
        for point, value in zip(points, measured):
            expected = scale * _g(form, point)
            if not p.close(value, expected, abs(expected) + p.floor * abs(scale)):
                return False
        return True
    finally:
        p.rtol = saved


def _identify_form(p: _Probe, values: list[float]) -> tuple[ReconForm, float]:
    """The family whose values at the base and interior points are proportional to the
    measured ones, to 5%: the guard against log(0) is not known yet (an eps of 1e-3 inside
    the logs moves interior values by up to 1.2%), and the families differ by far more."""
    points = (BASE, *INTERIOR)
    coarse = COARSE
    for form in recon_candidates():
        scale = values[0] / _g(form, BASE)
        if scale != 0 and _fits(p, form, scale, points, values, coarse):
            return form, scale
    if all(v == values[0] for v in values):
        raise ConfigError("the loss does not respond to x or x_hat: check the roles, i.e. the "
                          "order of the arguments")
    for form in recon_candidates():  # proportional up to a constant?
        scale = (values[1] - values[0]) / (_g(form, INTERIOR[0]) - _g(form, BASE))
        shifted = [v - values[0] + scale * _g(form, BASE) for v in values]
        if scale > 0 and _fits(p, form, scale, points, shifted, coarse):
            constant = values[0] - scale * _g(form, BASE)
            raise ConfigError(
                f"the loss adds a constant of {_num(constant)} per example to {_weight(scale)} "
                f"x the {form.words()} (e.g. a KL without its -1, or a normalising constant): "
                "outside a * recon + w * KL; remove it and probe again")
    shown = ", ".join(f"{pt} -> {_num(v)}" for pt, v in zip(points[:4], values[:4]))
    raise ConfigError("the reconstruction term is none of BCE, squared or absolute error of "
                      "x_hat or sigmoid(x_hat): with every data element at (x, x_hat) the "
                      f"per-example loss is {shown}; if the arguments come in another order, "
                      "pass roles (e.g. x_hat,x,mu,logvar)")


def _fit_guard(p: _Probe, form: ReconForm, values: list[float],
               extremes: list[float]) -> tuple[ReconForm, float]:
    """The BCE guard against log(0) that reproduces every measured value."""
    points = (BASE, *INTERIOR, *EXTREMES[form.from_logits])
    measured = values + extremes
    for style in EPSILON_STYLES:
        if style == "stable" and not form.from_logits:
            continue
        needs_eps = style not in ("none", "stable")
        candidate = replace(form, style=style, epsilon=None)
        # Start from the unguarded form (a guard moves interior values by ~eps only), then
        # alternate: eps from the hopeless prediction, the scale from the base point.
        # A fixed point: it contracts fast (eps moves the base value by ~eps only).
        start = replace(form, style="none") if needs_eps else candidate
        scale = values[0] / _g(start, BASE)
        for _ in range(100 if needs_eps else 0):
            eps = solve_epsilon(style, extremes[0] / scale)
            if eps is None or eps >= 0.5:
                break
            converged = candidate.epsilon is not None and abs(eps - candidate.epsilon) <= (
                1e-15 * eps)
            candidate = replace(candidate, epsilon=eps)
            scale = values[0] / _g(candidate, BASE)
            if converged:
                break
        if needs_eps and candidate.epsilon is None:
            continue
        if _fits(p, candidate, scale, points, measured, p.rtol):
            return candidate, scale
    x, x_hat = EXTREMES[form.from_logits][0]
    raise ConfigError("the loss looks like binary cross-entropy but matches none of the usual "
                      "guards against log(0) (clip, eps inside the logs, both, a clamped log, "
                      f"none): with every element at (x, x_hat) = ({x:g}, {x_hat:g}) the "
                      f"per-example loss is {_num(extremes[0])}")


def _guard_words(form: ReconForm, extremes: list[float], scale: float) -> str:
    (x, x_hat), (x1, x_hat1) = EXTREMES[form.from_logits][:2]
    seen = (f"a hopeless prediction (x = {x:g}, x_hat = {x_hat:g}) costs "
            f"{_num(extremes[0] / scale)} nats per element, a perfect one (x = {x1:g}, "
            f"x_hat = {x_hat1:g}) {_num(extremes[1] / scale)}")
    eps = form.epsilon or 0.0
    meaning = {
        "none": "nothing guards log(0): x_hat = 0 or 1 give an infinite or NaN loss",
        "stable": "the logits are used stably (no epsilon needed)",
        "log-clamp": f"each log is clamped at log(eps) = {_num(math.log(eps or 1))}",
        "clip": f"probabilities are clipped to [eps, 1 - eps], eps = {_num(eps)}",
        "clip+log": f"probabilities are clipped to [eps, 1 - eps] and eps is added inside the "
                    f"logs, eps = {_num(eps)}",
        "log": f"eps = {_num(eps)} is added inside the logs",
    }[form.style or "none"]
    return f"guard: {seen}: {meaning}"


def _fit_recon(p: _Probe, base_value: float) -> tuple[ReconForm, float, list[str]]:
    """The reconstruction form and its weight per data element, ``a``."""
    values = [base_value, *_uniform_values(p, INTERIOR)]
    form, scale = _identify_form(p, values)
    if scale < 0:
        raise ConfigError(f"the loss falls as the reconstruction gets worse ({form.words()} "
                          f"enters with weight {_num(scale)}): it rewards bad reconstructions")
    if form.kind == "ae":
        _check_elements(p, form, scale / p.dims, base_value)
        raise ConfigError(f"the reconstruction term is the {form.words()} (weight "
                          f"{_weight(scale / p.dims)} per element): a Laplace likelihood, which "
                          "the audit does not cover; it covers BCE and squared error")
    words = []
    if form.kind == "bce":
        extremes = _uniform_values(p, EXTREMES[form.from_logits])
        form, scale = _fit_guard(p, form, values, extremes)
        words.append(_guard_words(form, extremes, scale))
    elif not _fits(p, form, scale, (BASE, *INTERIOR), values, p.rtol):
        raise ConfigError(f"the reconstruction term is close to the {form.words()} but not "
                          f"exactly it (to {COARSE:g} only): values "
                          f"{', '.join(map(_num, values))}")
    shown = ", ".join(str(pt) for pt in (BASE, *INTERIOR[:2]))
    words.insert(0, f"reconstruction: every data element at (x, x_hat) = {shown}, ... gives "
                 f"{', '.join(_num(v) for v in values[:3])}, ... per example: exactly "
                 f"{_weight(scale)} x g(x, x_hat), g the {form.words()} of one element, and "
                 "no constant")
    weight = scale / p.dims
    words.append(_check_elements(p, form, weight, base_value))
    return form, weight, words


def _element_change(p: _Probe, base_value: float, changes: dict[int, tuple[float, float]],
                    n: int | None = None) -> float:
    """Per-example change when the data elements in ``changes`` move to ``(x, x_hat)``."""
    moved = p.base.with_data(changes)
    what = f"(x, x_hat) = {next(iter(changes.values()))} at one element"
    return p.value(moved, what, n) - base_value


def _check_elements(p: _Probe, form: ReconForm, weight: float, base_value: float) -> str:
    """Every element weighs the same, one weighs ``1/D`` of all of them, and they add."""
    point = INTERIOR[0]
    positions = sorted({0, p.dims // 2, p.dims - 1})
    changes = [_element_change(p, base_value, {at: point}) for at in positions]
    first = changes[0]
    unit = abs(first) + abs(base_value)
    for at, other in zip(positions, changes):
        if not p.close(other, first, unit):
            raise ConfigError(f"data elements weigh differently: moving element 0 changes "
                              f"the loss by {_num(first)}, element {at} by {_num(other)} "
                              "(a weighted or masked reconstruction is outside the audit)")
    expected = weight * (_g(form, point) - _g(form, BASE))
    if not p.close(first, expected, unit):
        raise ConfigError(f"the reconstruction is not a sum over data elements: moving one "
                          f"element changes the loss by {_num(first)}, not 1/{p.dims} of moving "
                          f"all of them ({_num(expected)})")
    if p.dims > 1:
        both = _element_change(p, base_value, {0: point, p.dims - 1: point})
        if not p.close(both, 2 * first, unit):
            raise ConfigError(f"moving two data elements changes the loss by {_num(both)}, not "
                              f"twice the change of one ({_num(2 * first)})")
    reduction = ("a mean over them" if math.isclose(weight * p.dims, 1.0, rel_tol=1e-6)
                 else "a sum" if math.isclose(weight, 1.0, rel_tol=1e-6)
                 else f"weight {_weight(weight)} each")
    return (f"divisor: moving one element to {point} changes the loss by {_num(first)}, "
            f"1/{p.dims} of moving all {p.dims}, at elements "
            f"{', '.join(map(str, positions))} alike, and two moved elements add: {reduction}")


def _kl_base(p: _Probe, form: ReconForm) -> _Example:
    """Data at (nearly) perfect reconstruction, so that the KL is not measured as a small
    difference of large numbers: squared error 0 exactly, BCE about 1e-12 per element."""
    if form.kind == "bce":
        return _uniform(p, (1.0, 30.0) if form.from_logits else (1.0, 1.0 - 1e-12))
    return _uniform(p, (0.5, 0.0) if form.from_logits else (0.5, 0.5))


def _kl_deltas(p: _Probe, base: _Example, base_value: float, points,
               at: int = 0) -> list[float]:
    return [p.value(base.with_latent({at: point}), f"(mu, logvar) = {point} in one latent dim")
            - base_value for point in points]


def _fit_kl(p: _Probe, form: ReconForm) -> tuple[float, list[str]]:
    """``w``, the weight of one latent dimension's Gaussian KL, checked at every point."""
    if "mu" not in p.roles:
        return 0.0, ["no mu or logvar among the roles: only the reconstruction was probed "
                     "(the function has no KL term)"]
    base = _kl_base(p, form)
    base_value = p.value(base, "a perfect reconstruction")
    deltas = _kl_deltas(p, base, base_value, KL_POINTS)
    if all(d == 0 for d in deltas):
        return 0.0, ["the loss does not change with mu or logvar: no KL term"]
    weight = deltas[0] / float(gaussian_kl(*KL_POINTS[0]))
    if weight < 0:
        raise ConfigError(f"the KL enters with the wrong sign: mu = 1 in one latent dim "
                          f"lowers the loss by {_num(-deltas[0])} and logvar = 1 changes it by "
                          f"{_num(deltas[2])}, so the loss rewards a larger KL; write the KL as "
                          "-0.5 * sum(1 + logvar - mu**2 - exp(logvar)) and add it")
    for point, delta in zip(KL_POINTS, deltas):
        expected = weight * float(gaussian_kl(*point))
        if not p.close(delta, expected, abs(expected) + abs(base_value)):
            raise ConfigError(
                f"the response to mu and logvar is not a multiple of the Gaussian KL "
                f"0.5 * (mu^2 + exp(logvar) - 1 - logvar): at (mu, logvar) = {point} one latent "
                f"dim changes the loss by {_num(delta)}, {_num(weight)} x KL would be "
                f"{_num(expected)} (logvar read as log sigma? a KL of another form?)")
    words = [f"KL: (mu, logvar) = {', '.join(str(pt) for pt in KL_POINTS[:3])}, ... in one "
             f"latent dim change the loss by {', '.join(_num(d) for d in deltas[:3])}, ...: "
             f"exactly {_weight(weight)} x 0.5 * (mu^2 + exp(logvar) - 1 - logvar)"]
    words.append(_check_latent_positions(p, base, base_value, deltas[0]))
    return weight, words


def _check_latent_positions(p: _Probe, base: _Example, base_value: float,
                            first: float) -> str:
    if p.latent_dim == 1:
        return "one latent dim only: nothing to compare across latent dims"
    last = p.latent_dim - 1
    other = _kl_deltas(p, base, base_value, [KL_POINTS[0]], at=last)[0]
    both = p.value(base.with_latent({0: KL_POINTS[0], last: KL_POINTS[0]}), "two latent dims")
    unit = abs(first) + abs(base_value)
    if not (p.close(other, first, unit) and p.close(both - base_value, 2 * first, unit)):
        raise ConfigError(f"latent dims weigh differently or do not add: mu = 1 in dim 0 "
                          f"changes the loss by {_num(first)}, in dim {last} by {_num(other)}, "
                          f"in both by {_num(both - base_value)}")
    return f"latent dims 0 and {last} weigh the same and add"


def _designed_example(p: _Probe, seed: int) -> _Example:
    """A whole example with every element and latent moved (a fixed pattern, not random)."""
    x_levels, x_hat_levels = (0.0, 1.0, 0.25, 0.75, 1.0), (0.1, 0.35, 0.6, 0.85, 0.45)
    d = np.arange(p.dims) + seed
    l_idx = np.arange(p.latent_dim) + seed
    return _Example(np.array(x_levels)[d % 5], np.array(x_hat_levels)[(3 * d + 1) % 5],
                    np.array([0.5, -1.0, 1.5, 0.0, -0.25])[l_idx % 5],
                    np.array([0.0, 0.5, -1.0, 1.0, -0.5])[(2 * l_idx + 1) % 5])


def _predicted(form: ReconForm, recon_weight: float, kl_factor: float, e: _Example) -> float:
    recon = recon_weight * float(form.value(e.x, e.x_hat).sum())
    return recon + kl_factor * float(gaussian_kl(e.mu, e.logvar).sum())


def _check_additive(p: _Probe, form: ReconForm, recon_weight: float, kl_factor: float) -> str:
    """Whole designed examples, alone and mixed in a batch, match the fitted formula."""
    examples = [_designed_example(p, seed) for seed in (0, 1)]
    predicted = [_predicted(form, recon_weight, kl_factor, e) for e in examples]
    floor = p.floor * recon_weight * p.dims
    for e, want in zip(examples, predicted):
        got = p.value(e, "a whole designed example")
        if not p.close(got, want, abs(want) + floor):
            raise ConfigError(
                f"not of the form a * recon + w * KL: an example with every element and latent "
                f"moved gives {_num(got)}, the parts measured one at a time give {_num(want)} "
                "(a weight that depends on the data, or terms that interact)")
    if p.batch == 1:
        return "additive: whole examples with every element and latent moved match a * recon " \
               "+ w * KL"
    mixed = examples[: p.batch] + [p.base] * (p.batch - 2)
    singles = predicted[: p.batch] + [_predicted(form, recon_weight, kl_factor, p.base)] * (
        p.batch - 2)
    values = p.call(mixed, "a batch of different examples")
    if p.reduction == "none":
        got, want = values, np.array(singles)
    else:
        got = values
        want = np.array(sum(singles) / (len(mixed) if p.reduction == "mean" else 1))
    if not all(p.close(g, w, abs(w) + floor) for g, w in zip(np.ravel(got), np.ravel(want))):
        raise ConfigError(f"examples interact within the batch: a batch of different examples "
                          f"gives {_num(float(np.ravel(got)[0]))}, its examples alone give "
                          f"{_num(float(np.ravel(want)[0]))} (a batch statistic inside the loss?)")
    return ("additive: whole examples with every element and latent moved, alone and mixed "
            "in one batch, match a * recon + w * KL")


def _check_batch_size(p: _Probe, form: ReconForm, base_value: float, recon_step: float,
                      kl_step: float) -> str:
    """Per-example weights at B and B + 1 (an M_N computed inside, a KL summed over B)."""
    n = p.batch + 1
    base_other = p.value(p.base, f"a batch of {n}", n)
    recon_other = _element_change(p, base_other, {0: INTERIOR[0]}, n)
    moved = []
    if not p.close(recon_other, recon_step, abs(recon_step) + abs(base_value)):
        moved.append(f"the reconstruction term of one example with one element moved "
                     f"({_num(recon_step)} at B = {p.batch}, {_num(recon_other)} at B = {n})")
    if kl_step:
        kl_base = _kl_base(p, form)
        kl_base_other = p.value(kl_base, f"a batch of {n}", n)
        kl_other = p.value(kl_base.with_latent({0: KL_POINTS[0]}), f"a batch of {n}", n) \
            - kl_base_other
        if not p.close(kl_other, kl_step, abs(kl_step) + abs(kl_base_other)):
            ratio = kl_other / kl_step
            why = (" (proportional to B: the KL is summed over the batch or weighted by an "
                   "M_N = B/N computed inside)" if p.close(ratio, n / p.batch, 1.0) else "")
            moved.append(f"the KL term of one example at mu = 1 in one latent dim "
                         f"({_num(kl_step)} at B = {p.batch}, {_num(kl_other)} at B = {n}){why}")
    if not moved:
        return (f"batch size: per-example weights are the same at B = {p.batch} and {n} (an "
                "M_N-style weight, if any, comes in through the arguments)")
    if not p.batch_size_given:
        raise ConfigError(f"a weight depends on the batch size: {'; '.join(moved)}; pass "
                          "batch_size (CLI: --batch-size) to audit the loss at your batch size")
    return (f"batch size: {'; '.join(moved)}: the audit is for batch_size = {p.batch}, and "
            "its numbers change with the batch size")


# --------------------------------------------------------------------------- entry point


def _check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    roles = tuple(roles)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ConfigError(f"unknown role {unknown[0]!r}: roles name the function's positional "
                          f"arguments in order, from {', '.join(ROLES)}")
    if len(set(roles)) != len(roles):
        raise ConfigError(f"roles {', '.join(roles)} name one argument twice")
    if "x" not in roles or "x_hat" not in roles:
        raise ConfigError(f"roles {', '.join(roles)} lack x or x_hat: the audit needs the "
                          "data and the reconstruction")
    if ("mu" in roles) != ("logvar" in roles):
        raise ConfigError(f"roles {', '.join(roles)} have only one of mu and logvar: give both "
                          "or neither")
    return roles


def _run(p: _Probe, framework: str) -> Measured:
    words = [_detect_framework(p, framework), _check_deterministic(p)]
    words += [w for w in [_check_z(p)] if w]
    words.append(_detect_reduction(p))
    base_value = p.value(p.base, "the base batch")
    form, recon_weight, recon_words = _fit_recon(p, base_value)
    kl_factor, kl_words = _fit_kl(p, form)
    words += recon_words + kl_words
    words.append(_check_additive(p, form, recon_weight, kl_factor))
    recon_step = recon_weight * (_g(form, INTERIOR[0]) - _g(form, BASE))
    kl_step = kl_factor * float(gaussian_kl(*KL_POINTS[0]))
    words.append(_check_batch_size(p, form, base_value, recon_step, kl_step))
    return Measured(form=form, recon_weight=recon_weight, kl_factor=kl_factor,
                    batch_reduction=p.reduction,
                    batch_size=p.batch if p.reduction == "sum" and p.batch_size_given
                    else None,
                    framework=p.framework, precision=p.rtol, observations=words + p.notes)


def measure(fn: Callable[..., Any], *, data_shape: tuple[int, ...], latent_dim: int,
            roles: Sequence[str], batch_size: int | None, framework: str,
            fixed_kwargs: dict[str, Any]) -> Measured:
    """Run the probe (module docstring) on ``fn``; shapes and sizes are already checked.

    Every comparison is first made to 1e-9 (float64 arithmetic). If that fails, the probe
    runs again to 1e-5 and, if everything then holds, says so in the observations: some
    code loses precision inside (Keras 3's ``ops.mean`` computes in float32 even for
    float64 inputs).

    Raises:
        ConfigError: a refusal, one line naming what was observed.
    """
    if framework not in FRAMEWORKS:
        raise ConfigError(f"unknown framework {framework!r}: choose one of "
                          f"{', '.join(FRAMEWORKS)}")
    if not callable(fn):
        raise ConfigError(f"the loss to probe must be callable, got {type(fn).__name__}")
    roles = _check_roles(roles)

    def attempt(rtol: float) -> Measured:
        p = _Probe(fn, data_shape, latent_dim, roles, batch_size, fixed_kwargs)
        p.rtol = rtol
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny inputs: threads only cost (10x on a busy machine)
        try:
            return _run(p, framework)
        finally:
            torch.set_num_threads(threads)

    try:
        return attempt(STRICT)
    except ConfigError as strict:
        try:
            found = attempt(LOOSE)
        except ConfigError:
            raise strict from None
        if found.precision == LOOSE:
            found.observations.append(
                f"precision: everything holds to {LOOSE:g} but not to {STRICT:g}: the function "
                "loses precision somewhere (Keras 3's ops.mean computes in float32 even for "
                "float64 inputs)")
        return found
