"""The one example table of the likelihood families (``EXAMPLES``): per registered family,
option sets with data and parameter generators, a float64 reference of the elementwise
log-probability and, where one exists, the equivalent ``torch.distributions`` object.

Every test over families takes its cases from here (tests/test_likelihoods.py,
tests/test_fast_path.py); a family registered without a row fails
``test_every_registered_family_has_an_example``. Adding a family: its file, its import in
``vaelab/likelihoods/__init__.py``, its row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import special, stats
from torch import distributions as td

from vaelab import likelihoods as L

# --------------------------------------------------------------------------- float64 references


def arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def split(params: np.ndarray, p: int) -> np.ndarray:
    """(B, P*C, *rest) -> (B, P, C, *rest), parameter-major."""
    return params.reshape(params.shape[0], p, params.shape[1] // p, *params.shape[2:])


def ref_scale(fam, raw: np.ndarray | None = None):
    if isinstance(fam.scale, float):
        return fam.scale
    if fam.scale == "learned":
        return fam.min_scale + math.exp(fam.log_scale.item())
    return np.logaddexp(0.0, raw) + fam.min_scale


def ref_loc_scale(fam, params):
    if fam.scale == "per-pixel":
        q = split(params, 2)
        return q[:, 0], ref_scale(fam, q[:, 1])
    return params, ref_scale(fam)


def ref_bernoulli(fam, params, x):
    return x * special.log_expit(params) + (1 - x) * special.log_expit(-params)


def ref_cb(fam, params, x):
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(params == 0, 2.0, params / np.tanh(params / 2))
    return ref_bernoulli(fam, params, x) + np.log(c)


def ref_gaussian(fam, params, x):
    loc, scale = ref_loc_scale(fam, params)
    return stats.norm.logpdf(x, loc, scale)


def ref_laplace(fam, params, x):
    loc, scale = ref_loc_scale(fam, params)  # scipy's logpdf underflows to -inf far out
    return -np.abs(x - loc) / scale - np.log(2 * scale)


def ref_categorical(fam, params, x):
    logp = special.log_softmax(split(params, 256), axis=1)
    return np.take_along_axis(logp, x.astype(np.int64)[:, None], axis=1)[:, 0]


def ref_logistic_log_mass(loc, log_s, x):
    """log P(x) of a discretised logistic, location on the [-1, 1] scale (broadcasts)."""
    y = 2 * x / 255 - 1
    a = (y + 1 / 255 - loc) / np.exp(log_s)
    b = (y - 1 / 255 - loc) / np.exp(log_s)
    # sigma(a) - sigma(b), taking the complement on the right so nothing cancels
    mass = np.where(b > 0, special.expit(-b) - special.expit(-a),
                    special.expit(a) - special.expit(b))
    mass = np.where(x == 0, special.expit(a), np.where(x == 255, special.expit(-b), mass))
    return np.log(mass)


def ref_logistic(fam, params, x):
    q = split(params, 2)
    return ref_logistic_log_mass(q[:, 0], np.clip(q[:, 1], -7, 7), x)


def ref_mixture_parts(fam, params, x):
    """(log pi (B, K, *rest), per-component conditional log-masses (B, K, C, *rest)), with the
    PixelCNN++ coupling written out: mu_G += alpha R, mu_B += beta R + gamma G ([-1, 1])."""
    k = fam.components
    q = params.reshape(params.shape[0], 4, k, -1, *params.shape[2:])
    c = q.shape[3]
    logits = q[:, 0].mean(axis=2)
    log_pi = logits - special.logsumexp(logits, axis=1, keepdims=True)
    loc, log_s, coef = q[:, 1].copy(), np.clip(q[:, 2], -7, 7), np.tanh(q[:, 3])
    y = 2 * x[:, None] / 255 - 1  # (B, 1, C, *rest)
    if c > 1:
        loc[:, :, 1] += coef[:, :, 0] * y[:, :, 0]
    if c > 2:
        loc[:, :, 2] += coef[:, :, 1] * y[:, :, 0] + coef[:, :, 2] * y[:, :, 1]
    return log_pi, ref_logistic_log_mass(loc, log_s, x[:, None])


def ref_mixture(fam, params, x):
    """Chain-rule terms log p(x_c | x_<c) = log p(x_<=c) - log p(x_<c), shaped like x."""
    log_pi, lp = ref_mixture_parts(fam, params, x)
    joint = special.logsumexp(log_pi[:, :, None] + np.cumsum(lp, axis=2), axis=1)
    return np.diff(joint, axis=1, prepend=0)


# --------------------------------------------------------------------------- example table


def x_binary(g, shape):
    return torch.randint(0, 2, shape, generator=g).double()


def x_unit(g, shape):
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x.view(-1)[:2] = torch.tensor([0.0, 1.0])[: x.numel()]
    return x


def x_uint8(g, shape):
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)[: x.numel()]
    return x


def p_normal(g, shape):
    return 3 * torch.randn(shape, generator=g, dtype=torch.float64)


def p_logistic(g, shape):
    half = (shape[0], shape[1] // 2, *shape[2:])
    loc = 2.4 * torch.rand(half, generator=g, dtype=torch.float64) - 1.2
    log_s = 6 * torch.rand(half, generator=g, dtype=torch.float64) - 5
    return torch.cat([loc, log_s], 1)


def p_mixture(g, shape):
    """Logit slots, locations, log-scales, raw coefficients: the four groups of dim 1."""
    q = (shape[0], 4, shape[1] // 4, *shape[2:])
    u = torch.rand(q, generator=g, dtype=torch.float64)
    n = torch.randn(q, generator=g, dtype=torch.float64)
    groups = [2 * n[:, 0], 2.4 * u[:, 1] - 1.2, 6 * u[:, 2] - 5, 1.5 * n[:, 3]]
    return torch.stack(groups, 1).flatten(1, 2)


def td_normal(fam, params):
    loc, scale = ref_loc_scale(fam, params.numpy())
    return td.Normal(torch.as_tensor(loc), torch.as_tensor(scale, dtype=torch.float64))


def td_laplace(fam, params):
    loc, scale = ref_loc_scale(fam, params.numpy())
    return td.Laplace(torch.as_tensor(loc), torch.as_tensor(scale, dtype=torch.float64))


def td_categorical(fam, params):
    logits = params.unflatten(1, (256, params.shape[1] // 256)).movedim(1, -1)
    return td.Categorical(logits=logits, validate_args=False)


class Example(NamedTuple):
    options: dict[str, Any]
    make_x: Callable
    make_params: Callable
    reference: Callable  # (family, params np float64, x np float64) -> elementwise log p
    torch_dist: Callable | None = None  # (family, params float64) -> torch Distribution


EXAMPLES: dict[str, list[Example]] = {
    "bernoulli": [
        Example({}, x_binary, p_normal, ref_bernoulli,
                lambda f, p: td.Bernoulli(logits=p)),
        Example({"unnormalized": True}, x_unit, p_normal, ref_bernoulli,
                lambda f, p: td.Bernoulli(logits=p, validate_args=False)),
    ],
    "continuous-bernoulli": [
        Example({}, x_unit, p_normal, ref_cb, lambda f, p: td.ContinuousBernoulli(logits=p)),
    ],
    "gaussian": [
        Example({"scale": 0.1}, x_unit, p_normal, ref_gaussian, td_normal),
        Example({"scale": "learned", "init_scale": 0.3}, x_unit, p_normal, ref_gaussian,
                td_normal),
        Example({"scale": "per-pixel"}, x_unit, p_normal, ref_gaussian, td_normal),
    ],
    "laplace": [
        Example({"scale": 0.2}, x_unit, p_normal, ref_laplace, td_laplace),
        Example({}, x_unit, p_normal, ref_laplace, td_laplace),
        Example({"scale": "per-pixel", "min_scale": 0.01}, x_unit, p_normal, ref_laplace,
                td_laplace),
    ],
    "categorical-256": [Example({}, x_uint8, p_normal, ref_categorical, td_categorical)],
    "discretized-logistic": [Example({}, x_uint8, p_logistic, ref_logistic)],
    "discretized-logistic-mixture": [
        Example({"components": 3}, x_uint8, p_mixture, ref_mixture),
        Example({}, x_uint8, p_mixture, ref_mixture),
    ],
}
#: Families whose channel dim is part of the model (not an elementwise product over it).
CHANNEL_COUPLED = {"discretized-logistic-mixture"}
CASES = [(name, i) for name, examples in EXAMPLES.items() for i in range(len(examples))]
IDS = [f"{name}-{i}" for name, i in CASES]
EVENT_SHAPES = [(3,), (1, 4, 4), (3, 2, 2)]


def make(name: str, i: int, batch: int = 3, event=(2, 3, 3), seed: int = 0,
         dtype=torch.float64):
    """(family, params, x) for one example case."""
    ex = EXAMPLES[name][i]
    fam = L.get(name, **ex.options).to(dtype)
    g = torch.Generator().manual_seed(seed)
    p = fam.params_per_channel
    params = ex.make_params(g, (batch, p * event[0], *event[1:])).to(dtype)
    x = ex.make_x(g, (batch, *event))
    if x.is_floating_point():
        x = x.to(dtype)
    return fam, params, x


def reference(name, i, fam, params, x) -> np.ndarray:
    lp = EXAMPLES[name][i].reference(fam, params.detach().double().numpy(), x.double().numpy())
    return lp.reshape(lp.shape[0], -1).sum(1)
