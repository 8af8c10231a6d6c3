"""probe(): a loss function's behaviour read back as the explain() of its description.

The property test writes losses the way people do (NumPy or PyTorch, BCE or squared
error, means and sums, clipping styles, logits) from a random description and checks that
probing the code recovers the audit of that description. The rest covers each refusal,
the argument plumbing and the CLI's --loss.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vaelab.audit import explain, probe
from vaelab.audit.load import infer_roles, load_loss, parse_fixed_kwargs
from vaelab.cli import main
from vaelab.errors import ConfigError

# --------------------------------------------------------------------------- generated losses


@dataclass(frozen=True)
class Description:
    """A loss as people write it; ``code()`` writes it, ``audit()`` explains it."""

    squared: bool  # False: BCE
    from_logits: bool
    guard: str  # for BCE: none, stable, log-clamp, clip, clip+log, log
    eps: float
    recon_reduction: str
    recon_multiplier: float
    kl_reduction: str
    kl_weight: float
    batch_reduction: str
    batch_size: int
    data_shape: tuple[int, ...]
    latent_dim: int
    framework: str

    def code(self):
        xp = np if self.framework == "numpy" else torch

        def bce(x, x_hat):
            if self.guard == "stable":
                return xp.maximum(x_hat, 0 * x_hat) - x * x_hat + xp.log1p(xp.exp(-abs(x_hat)))
            p = 1 / (1 + xp.exp(-x_hat)) if self.from_logits else x_hat
            eps = self.eps
            if self.guard in ("clip", "clip+log"):
                p = xp.clip(p, eps, 1 - eps)
            shift = eps if self.guard in ("log", "clip+log") else 0.0
            log_p, log_q = xp.log(p + shift), xp.log(1 - p + shift)
            if self.guard == "log-clamp":
                floor = math.log(eps)
                clamp = (lambda v: np.maximum(v, floor)) if xp is np else \
                    (lambda v: torch.clamp(v, min=floor))
                log_p, log_q = clamp(log_p), clamp(log_q)
            return -(x * log_p + (1 - x) * log_q)

        def squared(x, x_hat):
            mean = 1 / (1 + xp.exp(-x_hat)) if self.from_logits else x_hat
            return (x - mean) ** 2

        def reduce(values, how, axes):
            if self.framework == "numpy":
                return values.sum(axis=axes) if how == "sum" else values.mean(axis=axes)
            return values.sum(dim=axes) if how == "sum" else values.mean(dim=axes)

        def loss(x, x_hat, mu, logvar):
            data_axes = tuple(range(1, x.ndim))
            recon = reduce(squared(x, x_hat) if self.squared else bce(x, x_hat),
                           self.recon_reduction, data_axes)
            kl = reduce(-0.5 * (1 + logvar - mu**2 - xp.exp(logvar)), self.kl_reduction, (1,))
            per_example = self.recon_multiplier * recon + self.kl_weight * kl
            if self.batch_reduction == "none":
                return per_example
            return reduce(per_example, self.batch_reduction, (0,))

        return loss

    def audit(self):
        guarded = not self.squared and self.guard in ("clip", "clip+log", "log", "log-clamp")
        return explain("mse" if self.squared else "bce", self.recon_reduction,
                       self.recon_multiplier, self.kl_reduction, self.kl_weight,
                       self.batch_reduction, self.data_shape, self.latent_dim,
                       batch_size=self.batch_size if self.batch_reduction == "sum" else None,
                       from_logits=self.from_logits,
                       epsilon=self.eps if guarded else None,
                       epsilon_where=None if self.squared else self.guard)


@st.composite
def descriptions(draw) -> Description:
    squared = draw(st.booleans())
    from_logits = draw(st.booleans())
    guards = ["stable", "none", "clip", "log-clamp"] if from_logits else \
        ["none", "clip", "clip+log", "log", "log-clamp"]
    return Description(
        squared=squared, from_logits=from_logits,
        guard="none" if squared else draw(st.sampled_from(guards)),
        eps=draw(st.sampled_from([1e-7, 1e-5, 1e-3])),
        recon_reduction=draw(st.sampled_from(["sum", "mean"])),
        recon_multiplier=draw(st.sampled_from([1.0, 2.0, 784.0, 0.5, 1 / 3])),
        kl_reduction=draw(st.sampled_from(["sum", "mean"])),
        kl_weight=draw(st.sampled_from([1.0, 0.0, 0.5, 0.00025, 4.0])),
        batch_reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        batch_size=draw(st.sampled_from([3, 16])),
        data_shape=draw(st.sampled_from([(1,), (5,), (2, 3), (4, 4, 2), (784,)])),
        latent_dim=draw(st.sampled_from([1, 2, 5])),
        framework=draw(st.sampled_from(["numpy", "torch"])),
    )


IDENTIFIABLE = ("scale", "scale_per_example", "beta_effective", "gaussian_sigma",
                "sigma_at_beta_one", "missing_constant_nats")


def assert_same_objective(found, expected):
    """Every field the behaviour determines; multipliers and reductions are only known up
    to ``multiplier / D^[mean]``, which the scale and beta already pin down."""
    for name in IDENTIFIABLE:
        got, want = getattr(found, name), getattr(expected, name)
        if want is None:
            assert got is None, name
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), name
    for name in ("normalized", "data", "data_dims", "data_shape", "latent_dim",
                 "batch_reduction", "batch_size", "from_logits", "epsilon_where", "kl_term"):
        assert getattr(found, name) == getattr(expected, name), name
    assert (found.recon == "bce") == (expected.recon == "bce")
    if expected.epsilon is None:
        assert found.epsilon is None
    else:
        assert found.epsilon == pytest.approx(expected.epsilon, rel=1e-5)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(descriptions())
def test_probe_of_generated_code_equals_explain_of_its_description(d):
    found = probe(d.code(), data_shape=d.data_shape, latent_dim=d.latent_dim,
                  batch_size=d.batch_size if d.batch_reduction == "sum" else None)
    assert_same_objective(found, d.audit())
    assert found.observations and f"framework {d.framework}" in found.observations[0]


def test_canonical_description_reproduces_the_text_exactly():
    # 784 x mean BCE is read back as written; the whole text then matches explain()
    d = Description(False, False, "clip", 1e-7, "mean", 784.0, "sum", 1.0, "mean", 4,
                    (784,), 2, "numpy")
    found = probe(d.code(), data_shape=(784,), latent_dim=2)
    expected = explain("bce", "sum", 1.0, "sum", 1.0, "mean", (784,), 2,
                       epsilon=1e-7, epsilon_where="clip")
    assert found.text == expected.text
    assert found.to_dict() | {"observations": []} == expected.to_dict()


# --------------------------------------------------------------------------- what is read


def test_mean_over_data_dims_is_read_as_a_mean_and_a_multiple_as_written():
    def keras_like(x, x_hat, mu, logvar):
        return ((x - x_hat) ** 2).mean(-1) * 2 + 0.5 * (mu**2 + np.exp(logvar) - 1 - logvar).sum(-1)

    a = probe(keras_like, data_shape=(10,), latent_dim=3)
    assert (a.recon, a.recon_reduction, a.recon_multiplier) == ("mse", "mean", 2.0)
    assert (a.kl_reduction, a.kl_weight, a.batch_reduction) == ("sum", 1.0, "none")
    assert a.beta_effective == pytest.approx(5.0)


def test_roles_in_another_order_dict_output_and_fixed_kwargs():
    def antixk_style(*args, **kwargs):
        recons, inputs, mu, log_var = args
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
        return {"loss": F.mse_loss(recons, inputs) + kwargs["M_N"] * kld, "KLD": -kld}

    a = probe(antixk_style, data_shape=(3, 4, 4), latent_dim=8,
              roles=("x_hat", "x", "mu", "logvar"), M_N=0.5)
    assert a.beta_effective == pytest.approx(0.5 * 48) and a.scale == pytest.approx(1 / 48)
    assert any("'loss' entry" in line for line in a.observations)


def test_tuple_output_and_an_unused_z():
    def pythae_style(recon_x, x, mu, log_var, z):
        recon = F.binary_cross_entropy(recon_x, x, reduction="none").sum(-1)
        kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
        return (recon + kld).mean(), recon.mean(), kld.mean()

    a = probe(pythae_style, data_shape=(6,), latent_dim=2,
              roles=("x_hat", "x", "mu", "logvar", "z"))
    assert a.beta_effective == pytest.approx(1.0) and a.epsilon_where == "log-clamp"
    assert a.epsilon == pytest.approx(math.exp(-100), rel=1e-5)
    assert any("z is passed but not used" in line for line in a.observations)


def test_a_summed_batch_is_audited_without_the_batch_size():
    """PyTorch's VAE example (reduction='sum' over batch and pixels, the KL summed too): its
    beta, likelihood, per-example scale and batch reduction do not depend on B, so the audit
    reports them and says the batch scale is B (a number when the batch size is given)."""
    def summed(recon_x, x, mu, logvar):
        bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
        return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    roles = ("x_hat", "x", "mu", "logvar")
    a = probe(summed, data_shape=(784,), latent_dim=20, roles=roles)
    assert a.batch_reduction == "sum" and a.batch_size is None and a.scale is None
    assert a.scale_per_example == 1 and a.beta_effective == pytest.approx(1.0)
    assert "summed over the batch." in a.text and "Scale B per batch of B" in a.text
    nll, kl = torch.tensor([100.0, 90.0]), torch.tensor([5.0, 3.0])
    assert float(a.predicted_loss(nll, kl)) == pytest.approx(198.0)  # the batch's sum
    b = probe(summed, data_shape=(784,), latent_dim=20, roles=roles, batch_size=32)
    assert b.scale == 32 and b.batch_size == 32 and b.beta_effective == pytest.approx(1.0)
    assert "Scale 32 per batch of 32" in b.text
    assert (a.beta_effective, a.normalized, a.recon) == (b.beta_effective, b.normalized, b.recon)


def test_kl_summed_over_the_batch_is_a_batch_size_dependent_beta():
    def ported(recon_x, x, mu, logvar):  # mean BCE over batch and pixels, KL summed over all
        return 10 * F.binary_cross_entropy(recon_x, x) - 0.5 * torch.sum(
            1 + logvar - mu.pow(2) - logvar.exp())

    roles = ("x_hat", "x", "mu", "logvar")
    with pytest.raises(ConfigError, match=r"depends on the batch size.*proportional to B"):
        probe(ported, data_shape=(10,), latent_dim=2, roles=roles)
    a = probe(ported, data_shape=(10,), latent_dim=2, roles=roles, batch_size=64)
    assert a.beta_effective == pytest.approx(64.0) and a.batch_reduction == "mean"
    assert any("the audit is for batch_size = 64" in line for line in a.observations)


def test_reconstruction_loss_without_kl_says_what_weight_makes_an_elbo():
    def keras_mse(y_true, y_pred):
        return np.mean((y_true - y_pred) ** 2, axis=-1)

    a = probe(keras_mse, data_shape=(784,), latent_dim=2, roles=("x", "x_hat"))
    assert not a.kl_term and a.kl_weight == 0 and a.batch_reduction == "none"
    assert "the ELBO needs w = 1/784" in a.text and "plain autoencoder" not in a.text


def test_float32_result_is_matched_to_low_precision_and_says_so():
    def float32_loss(x, x_hat, mu, logvar):
        x, x_hat, mu, logvar = (t.float() for t in (x, x_hat, mu, logvar))
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)
        return (F.binary_cross_entropy_with_logits(x_hat, x, reduction="none").sum(-1)
                + kl).mean()

    a = probe(float32_loss, data_shape=(20,), latent_dim=2)
    assert a.from_logits and a.epsilon_where == "stable" and a.beta_effective == 1.0
    assert any("returns float32" in line for line in a.observations)


def test_precision_lost_inside_falls_back_to_1e_5_and_says_so():
    def mean_in_float32(x, x_hat, mu, logvar):  # what Keras' ops.mean does to float64
        bce = F.binary_cross_entropy(x_hat.clamp(1e-7, 1 - 1e-7), x, reduction="none")
        return bce.float().mean(-1).double() - 0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)

    a = probe(mean_in_float32, data_shape=(784,), latent_dim=2)
    assert a.epsilon_where == "clip" and a.epsilon == pytest.approx(1e-7)
    assert a.beta_effective == pytest.approx(784.0, rel=1e-4)
    assert any(line.startswith("precision: everything holds to 1e-05")
               for line in a.observations)


# --------------------------------------------------------------------------- refusals


def _kl(mu, logvar):
    return -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(-1)


def _sse(x, x_hat):
    return ((x - x_hat) ** 2).sum(-1)


@pytest.mark.parametrize("fn, message", [
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) - _kl(mu, logvar)).mean(),
     "KL enters with the wrong sign.*rewards a larger KL"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) * (1 + _kl(mu, logvar))).mean(),
     "not of the form a \\* recon \\+ w \\* KL"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) + x.mean(-1) * _kl(mu, logvar)).mean(),
     "not of the form a \\* recon \\+ w \\* KL"),
    (lambda x, x_hat, mu, logvar: (np.abs(x - x_hat).sum(-1) + _kl(mu, logvar)).mean(),
     "absolute error .*Laplace"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) + _kl(mu, logvar) + 3.0).mean(),
     "adds a constant of 3 per example"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) + 0.5 * (mu**2 + np.exp(logvar)).sum(-1)).mean(),
     "adds a constant of 1 per example .*a KL without its -1"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) + 0.5 * (mu**2 + np.exp(2 * logvar) - 1
                                                           - 2 * logvar).sum(-1)).mean(),
     "not a multiple of the Gaussian KL.*log sigma"),
    (lambda x, x_hat, mu, logvar: (np.sqrt(_sse(x, x_hat)) + _kl(mu, logvar)).mean(),
     "not a sum over data elements"),
    (lambda x, x_hat, mu, logvar: (np.max((x - x_hat) ** 2, -1) + _kl(mu, logvar)).mean(),
     "not a sum over data elements"),
    (lambda x, x_hat, mu, logvar: ((x - x_hat) ** 2 * np.array([1, 1, 1, 1, 2])).sum(-1).mean(),
     "data elements weigh differently: .* element 4 by"),
    (lambda x, x_hat, mu, logvar: (np.log(x_hat) ** 2).sum(-1).mean(),
     "none of BCE, squared or absolute error.*pass roles"),
    (lambda x, x_hat, mu, logvar: np.median(_sse(x, x_hat) + _kl(mu, logvar)),
     "interact within the batch"),
    (lambda x, x_hat, mu, logvar: (_sse(x, x_hat) + _kl(mu, logvar)).mean() * len(x) ** 2,
     "neither averaged nor summed"),
    (lambda x, x_hat, mu, logvar: (x - x_hat) ** 2,
     "returns shape \\(4, 5\\).*neither one number nor one per example"),
    (lambda x, x_hat, mu, logvar: -_sse(x, x_hat).mean(),
     "falls as the reconstruction gets worse"),
    (lambda x, x_hat, mu, logvar: _kl(mu, logvar).mean(),
     "does not respond to x or x_hat"),
])
def test_refusals_name_what_was_observed(fn, message):
    with pytest.raises(ConfigError, match=message) as info:
        probe(fn, data_shape=(5,), latent_dim=2)
    assert "\n" not in str(info.value)


def test_a_loss_that_ignores_mu_and_logvar_is_audited_without_kl():
    a = probe(lambda x, x_hat, mu, logvar: _sse(x, x_hat).mean(), data_shape=(5,), latent_dim=2)
    assert a.kl_weight == 0 and a.kl_term and a.beta_effective == 0
    assert any("does not change with mu or logvar" in line for line in a.observations)


def test_stochastic_function_is_refused_with_the_fix():
    def sampled(x, x_hat, mu, logvar):
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return F.mse_loss(x_hat, x) + (z**2).mean()

    with pytest.raises(ConfigError, match="two identical calls returned different values.*"
                                          "pass the noise in as an argument.*manual_seed"):
        probe(sampled, data_shape=(5,), latent_dim=2)


def test_function_that_fails_shows_its_exception_in_one_line():
    def broken(x, x_hat, mu, logvar):
        return F.mse_loss(x_hat.view(-1, 7), x)

    with pytest.raises(ConfigError, match="fails on the probe inputs.*RuntimeError: shape "
                                          "'\\[-1, 7\\]' is invalid") as info:
        probe(broken, data_shape=(5,), latent_dim=2, framework="torch")
    assert "\n" not in str(info.value)


def test_z_that_matters_is_refused():
    def monte_carlo(x, x_hat, mu, logvar, z):
        return ((x - x_hat) ** 2).sum(-1).mean() + (z**2).sum(-1).mean()

    with pytest.raises(ConfigError, match="changes with z"):
        probe(monte_carlo, data_shape=(5,), latent_dim=2,
              roles=("x", "x_hat", "mu", "logvar", "z"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(roles=("x", "y")), "unknown role 'y'"),
    (dict(roles=("x", "x")), "name one argument twice"),
    (dict(roles=("x", "mu", "logvar")), "lack x or x_hat"),
    (dict(roles=("x", "x_hat", "mu")), "only one of mu and logvar"),
    (dict(framework="jax"), "unknown framework 'jax'"),
    (dict(data_shape=(0,)), "every data_shape entry"),
    (dict(latent_dim=0), "latent_dim must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_probe_arguments(kwargs, message):
    args = dict(data_shape=(5,), latent_dim=2) | kwargs
    with pytest.raises(ConfigError, match=message):
        probe(lambda x, x_hat, mu, logvar: 0.0, **args)


# --------------------------------------------------------------------------- loading, CLI

USER_FILE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    def loss_function(recon_x, x, mu, logvar):
        bce = 784 * F.binary_cross_entropy(recon_x, x)
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1).mean()
        return bce + kld

    def weighted(x, x_hat, mu, logvar, beta=1.0):
        return ((x - x_hat) ** 2).flatten(1).sum(-1).mean() + beta * (
            -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)).mean()
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_vae.py"
    path.write_text(USER_FILE)
    yield path
    sys.modules.pop("vaelab_audited_my_vae", None)


def test_cli_loss_from_a_file_answers_from_the_code(user_file, capsys):
    assert main(["audit", "--loss", f"{user_file}:loss_function"]) == 0
    out = capsys.readouterr().out
    assert "loss_function(x_hat, x, mu, logvar) [roles from the parameter names]" in out
    assert "What was measured:" in out and "a mean over the batch" in out
    assert "beta = 1: this is the ELBO" in out
    assert "vaelab train --likelihood bernoulli --latent-dim 2 --beta 1\n" in out
    assert out.rstrip().endswith(
        '  x_hat = ELBOLoss(Bernoulli(output="probs"))([x, x_hat, z_mean, z_log_var])')


def test_cli_loss_json_roles_and_fixed_arguments(user_file, capsys):
    assert main(["audit", "--loss", f"{user_file}:weighted", "--roles", "x,x_hat,mu,logvar",
                 "--set", "beta=0.25", "--data-shape", "4,4", "--latent-dim", "3",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["roles"] == ["x", "x_hat", "mu", "logvar"] and d["recon"] == "sse"
    assert d["beta_effective"] == pytest.approx(0.25) and d["data_shape"] == [4, 4]
    assert d["observations"] and d["text"].startswith("Your loss:")


def test_cli_loss_from_a_module(capsys):
    assert main(["audit", "--loss", "torch.nn.functional:mse_loss", "--roles", "x_hat,x",
                 "--data-shape", "8"]) == 0
    out = capsys.readouterr().out
    assert "1 x squared error averaged over 8 data dims, no KL term" in out


@pytest.mark.parametrize("argv, message", [
    (["--loss", "nowhere.py:f"], "no file nowhere.py"),
    (["--loss", "no_colon"], "give FILE.py:FUNCTION or package.module:FUNCTION"),
    (["--loss", "{file}:missing"], "has no 'missing' \\(callables there: loss_function, weighted"),
    (["--loss", "vaelab_no_such_module:f"], "importing vaelab_no_such_module failed: "
                                            "ModuleNotFoundError"),
    (["--loss", "{file}:loss_function", "--recon", "mse"], "--recon describes a loss by flags"),
    (["--roles", "x,x_hat"], "--roles applies to --loss only"),
    (["--loss", "{file}:weighted", "--set", "beta"], "give NAME=VALUE"),
    (["--loss", "{file}:weighted", "--roles", "x,x_hat,mu"], "only one of mu and logvar"),
])
def test_cli_loss_errors_are_one_line_with_status_2(user_file, capsys, argv, message):
    argv = [a.replace("{file}", str(user_file)) for a in argv]
    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


def test_a_file_that_raises_on_import_is_reported_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad_loss.py"
    bad.write_text("raise RuntimeError('no GPU here')\n")
    assert main(["audit", "--loss", f"{bad}:f"]) == 2
    err = capsys.readouterr().err
    assert f"importing {bad} failed: RuntimeError: no GPU here" in err


def test_infer_roles_and_parse_fixed_kwargs():
    def pytorch_example(recon_x, x, mu, logvar):
        return 0

    def keras_loss(y_true, y_pred, from_logits=False):
        return 0

    def unknown(a, b):
        return 0

    assert infer_roles(pytorch_example) == ("x_hat", "x", "mu", "logvar")
    assert infer_roles(keras_loss) == ("x", "x_hat")
    assert infer_roles(unknown) is None and infer_roles(lambda *args: 0) is None
    assert parse_fixed_kwargs(["M_N=0.00025", "kind=bce", "flag=True", "s='a b'"]) == {
        "M_N": 0.00025, "kind": "bce", "flag": True, "s": "a b"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_fixed_kwargs(["=3"])
    assert callable(load_loss("math:sqrt"))


@pytest.mark.parametrize("reduce, reduction", [(np.mean, "mean"), (np.sum, "sum"),
                                               (lambda v: v, "none")])
def test_batch_size_one(reduce, reduction):
    def loss(x, x_hat, mu, logvar):
        return reduce(_sse(x, x_hat) + _kl(mu, logvar))

    a = probe(loss, data_shape=(5,), latent_dim=2, batch_size=1)
    assert a.batch_reduction == reduction and a.scale == 1.0 and a.beta_effective == 1.0
