"""vaelab.models: shapes, parameter layout, output bias, encoder scale, errors, known setups."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Categorical, Independent, Normal, kl_divergence

from vaelab import config
from vaelab.errors import ConfigError, DataError
from vaelab.models import (
    ACTIVATIONS,
    ENCODER_SCALES,
    MODELS,
    VAE,
    build_model,
    from_config,
    num_parameters,
)
from vaelab.models.vae import MIN_SCALE

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- stand-in families
# Tiny families with the interface of docs/design.md, so these tests do not depend on
# vaelab.likelihoods (tested separately, and with the real families at the end).


class BernoulliLogits(nn.Module):
    """P = 1: logits; output bias = logit of the clipped mean."""

    params_per_channel = 1
    data_kind = "binary"

    def forward(self, params):
        return Independent(Bernoulli(logits=params, validate_args=False), params.dim() - 1)

    def output_bias(self, pixel_mean):
        m = pixel_mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(m) - torch.log1p(-m)


class GaussianLearnedScale(nn.Module):
    """P = 2: (loc, raw log-scale) per channel, plus a learned global log-scale offset."""

    params_per_channel = 2
    data_kind = "unit"

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(-1.0))

    def forward(self, params):
        loc, raw = params.unflatten(1, (2, -1)).unbind(1)
        return Independent(Normal(loc, torch.exp(raw + self.log_scale)), loc.dim() - 1)

    def output_bias(self, pixel_mean):
        return torch.cat([pixel_mean, torch.zeros_like(pixel_mean)], 0)


class Categorical256(nn.Module):
    """P = 256 logits per sub-pixel; uint8 data."""

    params_per_channel = 256
    data_kind = "uint8"

    def forward(self, params):
        logits = params.unflatten(1, (256, -1)).movedim(1, -1)  # (B, C, H, W, 256)
        return Independent(Categorical(logits=logits, validate_args=False), logits.dim() - 2)

    def output_bias(self, pixel_mean):
        k = torch.arange(256, dtype=pixel_mean.dtype).view(256, *[1] * pixel_mean.dim())
        return (-((k / 255 - pixel_mean) ** 2) / (2 * 0.05**2)).flatten(0, 1)


class Params(nn.Module):
    """Returns the decoder output itself, to look at the raw parameters."""

    data_kind = "unit"

    def __init__(self, p):
        super().__init__()
        self.params_per_channel = p

    def forward(self, params):
        return params


SHAPES = [(1, 28, 28), (3, 32, 32)]


def small(kind, shape, family, latent_dim=3, **kw):
    kw.setdefault("hidden", (8,))
    if kind == "conv":
        kw.setdefault("channels", (4, 8))
    return build_model(kind, shape, latent_dim, family, **kw)


# ----------------------------------------------------------------------------- shapes and layout


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2, 256])
def test_decoder_output_is_parameter_major(kind, shape, p):
    torch.manual_seed(0)
    model = small(kind, shape, Params(p))
    c, h, w = shape
    z = torch.randn(5, 3)
    params = model.decode(z)
    assert params.shape == (5, p * c, h, w)
    # Zero the last layer's weights and give a bias whose value encodes (parameter, channel,
    # row, column): the decoder output must reproduce it in that order, for every z.
    bias = torch.arange(p * c * h * w, dtype=torch.float32).reshape(p * c, h, w)
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
    model.decoder.set_output_bias(bias)
    out = model.decode(z)
    assert torch.equal(out, bias.expand(5, -1, -1, -1))
    per_param = out.unflatten(1, (p, c))
    for j in range(p):  # parameter j of channel k at (r, s) is j*C*H*W + k*H*W + r*W + s
        expected = j * c * h * w + torch.arange(c * h * w, dtype=torch.float32).view(c, h, w)
        assert torch.equal(per_param[:, j], expected.expand(5, -1, -1, -1))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_encoder_gives_diagonal_gaussian_with_softplus_scale(kind, shape):
    torch.manual_seed(1)
    model = small(kind, shape, BernoulliLogits(), latent_dim=4)
    x = torch.rand(6, *shape)
    qz = model.encode(x)
    assert isinstance(qz, Independent) and isinstance(qz.base_dist, Normal)
    assert qz.batch_shape == (6,) and qz.event_shape == (4,)
    raw = model.encoder(x).double()
    loc, r = raw[:, :4], raw[:, 4:]
    scale = torch.log1p(torch.exp(r)) + 1e-6  # softplus in float64
    torch.testing.assert_close(qz.mean.double(), loc, rtol=0, atol=1e-6)
    torch.testing.assert_close(qz.stddev.double(), scale, rtol=1e-6, atol=1e-7)
    z = torch.randn(6, 4)
    ref = (-0.5 * ((z.double() - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(qz.log_prob(z).double(), ref.sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "name, raw, expected_scale",
    [
        ("softplus", -1e4, MIN_SCALE),
        ("softplus", 0.0, math.log(2) + MIN_SCALE),
        ("softplus", 1e4, 1e4),
        ("exp", -1e4, math.exp(-15)),
        ("exp", 0.0, 1.0),
        ("exp", 2.0, math.e),
        ("exp", 1e4, math.exp(15)),
    ],
)
def test_encoder_scale_extremes_are_finite(name, raw, expected_scale):
    model = small("mlp", (1, 28, 28), BernoulliLogits(), latent_dim=2, encoder_scale=name)
    head = model.encoder[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.5, -0.5, raw, raw]))
    qz = model.encode(torch.rand(3, 1, 28, 28))
    assert qz.stddev.flatten().tolist() == pytest.approx([expected_scale] * 6, rel=1e-6)
    assert torch.isfinite(qz.log_prob(torch.zeros(3, 2))).all()
    assert torch.isfinite(qz.entropy()).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_decoder_output_size_is_exact(shape):
    model = small("conv", shape, Params(2), channels=(4, 8))
    sizes = []
    x = torch.randn(2, 3)
    for layer in model.decoder.net:
        x = layer(x)
        if isinstance(layer, (nn.ConvTranspose2d, nn.Conv2d)):
            sizes.append(tuple(x.shape[-2:]))
    h = shape[1]
    assert sizes == [(h // 2, h // 2), (h, h), (h, h)]
    assert x.shape == (2, 2 * shape[0], h, h)
    enc_sizes = []
    y = torch.rand(2, *shape)
    for layer in model.encoder:
        y = layer(y)
        if isinstance(layer, nn.Conv2d):
            enc_sizes.append(tuple(y.shape[-2:]))
    assert enc_sizes == [(h // 2, h // 2), (h // 4, h // 4)]  # 28->14->7, 32->16->8


def test_conv_three_layers_on_32x32():
    model = small("conv", (3, 32, 32), Params(1), channels=(4, 8, 16))
    assert model.decode(torch.randn(2, 3)).shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match="at most 2 entries"):
        small("conv", (1, 28, 28), Params(1), channels=(4, 8, 16))


# ----------------------------------------------------------------------------- output bias


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family_cls", [BernoulliLogits, GaussianLearnedScale])
def test_init_output_bias_gives_the_data_mean(kind, shape, family_cls):
    torch.manual_seed(2)
    family = family_cls()
    model = small(kind, shape, family)
    pixel_mean = torch.rand(shape) * 0.9 + 0.05
    pixel_mean.view(-1)[:3] = torch.tensor([0.0, 1.0, 0.5])  # exercise the clipping
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
    model.init_output_bias(pixel_mean)
    mean = model.decode(torch.randn(4, 3) * 3).mean
    expected = pixel_mean.double()
    if family_cls is BernoulliLogits:
        expected = expected.clamp(1e-3, 1 - 1e-3)
    assert mean.shape == (4, *shape)
    err = (mean.double() - expected).abs().max().item()
    assert err < 1e-6, err


def test_init_output_bias_categorical_logits_and_shape_check():
    model = small("mlp", (1, 28, 28), Categorical256())
    pixel_mean = torch.rand(1, 28, 28)
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
    model.init_output_bias(pixel_mean)
    logits = model.decode(torch.randn(2, 3)).base_dist.logits  # (2, 1, 28, 28, 256)
    expected = Categorical256().output_bias(pixel_mean).unflatten(0, (256, 1)).movedim(0, -1)
    torch.testing.assert_close(logits, F.log_softmax(expected, -1).expand(2, -1, -1, -1, -1))
    with pytest.raises(DataError, match=r"pixel_mean has shape \(28, 28\)"):
        model.init_output_bias(torch.rand(28, 28))


# ----------------------------------------------------------------------------- data units


def test_uint8_data_is_divided_by_255_inside_encode():
    torch.manual_seed(3)
    model = small("conv", (3, 32, 32), Categorical256())
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    qz = model.encode(x)
    ref = model.encoder(x.float() / 255)
    assert torch.equal(qz.mean, ref[:, :3])
    assert torch.equal(model.encode(x.long()).mean, qz.mean)  # int64 grey levels too
    lp = model.decode(qz.mean).log_prob(x.long())
    assert lp.shape == (4,) and torch.isfinite(lp).all()


def test_binary_data_is_used_as_is():
    model = small("mlp", (1, 28, 28), BernoulliLogits())
    x = (torch.rand(2, 1, 28, 28) > 0.5).float()
    assert torch.equal(model.encode(x).mean, model.encoder(x)[:, :3])
    assert torch.equal(model.encode(x.to(torch.uint8)).mean, model.encode(x).mean)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kind, shape, bad",
    [
        ("mlp", (1, 28, 28), (2, 784)),
        ("mlp", (1, 28, 28), (2, 1, 28, 27)),
        ("mlp", (1, 28, 28), (2, 3, 28, 28)),
        ("conv", (1, 28, 28), (2, 1, 32, 32)),
        ("conv", (3, 32, 32), (3, 32, 32)),
    ],
)
def test_encode_rejects_wrong_shapes(kind, shape, bad):
    model = small(kind, shape, BernoulliLogits())
    with pytest.raises(DataError) as err:
        model.encode(torch.rand(bad))
    msg = str(err.value)
    assert f"(B, {', '.join(map(str, shape))})" in msg and str(bad) in msg
    assert "\n" not in msg


def test_decode_rejects_wrong_latent_shape():
    model = small("mlp", (1, 28, 28), BernoulliLogits())
    with pytest.raises(DataError, match=r"\(N, 3\), got \(2, 4\)"):
        model.decode(torch.zeros(2, 4))
    with pytest.raises(DataError, match=r"got \(5, 2, 3\)"):
        model.decode(torch.zeros(5, 2, 3))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kind": "resnet"}, "unknown model 'resnet': choose one of conv, mlp"),
        ({"activation": "swish"}, "unknown activation 'swish': choose one of elu, gelu, "
                                  "leaky-relu, relu, silu, softplus, tanh"),
        ({"encoder_scale": "sigmoid"}, "unknown encoder scale 'sigmoid': choose one of exp"),
        ({"hidden": (8, 0)}, r"model.mlp.hidden sizes must be positive, got \[8, 0\]"),
        ({"latent_dim": 0}, "model.latent_dim must be positive"),
        ({"kind": "conv", "shape": (1, 30, 30)}, "H and W must be divisible by 4, got 30x30: "
                                                 "use at most 1 entry in model.channels"),
        ({"kind": "conv", "shape": (28, 28)}, r"needs images shaped \(C, H, W\)"),
        ({"kind": "conv", "channels": ()}, "model.conv.channels is empty"),
        ({"blocks": 2}, "unknown config key model.mlp.blocks: valid keys in \\[model.mlp\\] are "
                        "hidden, gated"),
    ],
)
def test_bad_config_raises_config_error(kwargs, pattern):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind", "mlp")
    shape = kwargs.pop("shape", (1, 28, 28))
    latent = kwargs.pop("latent_dim", 3)
    with pytest.raises(ConfigError, match=pattern):
        build_model(kind, shape, latent, BernoulliLogits(), **kwargs)


#: One row per registered architecture: its options and an event shape it takes.
MODEL_EXAMPLES = {
    "mlp": ({"hidden": (8, 4), "gated": True}, (1, 28, 28)),
    "conv": ({"channels": (4, 8), "blocks": 1, "hidden": (8,)}, (3, 16, 16)),
}


def test_every_model_has_an_example():
    assert sorted(MODEL_EXAMPLES) == MODELS.names()


@pytest.mark.parametrize("kind", sorted(MODEL_EXAMPLES))
def test_every_model_encodes_and_decodes_with_its_options(kind):
    options, shape = MODEL_EXAMPLES[kind]
    model = build_model(kind, shape, 3, BernoulliLogits(), **options)
    x = (torch.rand(2, *shape) > 0.5).float()
    qz = model.encode(x)
    assert qz.mean.shape == (2, 3)
    assert model.decode(qz.rsample()).log_prob(x).shape == (2,)
    with pytest.raises(ConfigError, match=rf"unknown config key model\.{kind}\.width"):
        build_model(kind, shape, 3, BernoulliLogits(), width=3)


def test_registries_have_what_the_docs_promise():
    assert ACTIVATIONS.names() == sorted(
        ["relu", "tanh", "elu", "gelu", "silu", "softplus", "leaky-relu"]
    )
    assert ENCODER_SCALES.names() == ["exp", "logvar-hardtanh", "softplus"]
    for name in ACTIVATIONS:  # every activation builds and runs
        model = small("mlp", (1, 28, 28), BernoulliLogits(), activation=name)
        assert torch.isfinite(model.encode(torch.rand(2, 1, 28, 28)).mean).all()


# ----------------------------------------------------------------------------- known setups


def _linear_shapes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


class PyTorchExampleVAE(nn.Module):
    """The model of PyTorch's examples/vae/main.py, for a parameter count."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)


@pytest.mark.parametrize(
    "name, kwargs, linears, act, n_act",
    [
        ("pytorch-example", {"latent_dim": 20, "hidden": (400,), "activation": "relu"},
         [(784, 400), (400, 40), (20, 400), (400, 784)], nn.ReLU, 2),
        ("keras-example", {"latent_dim": 2, "hidden": (512,), "activation": "relu"},
         [(784, 512), (512, 4), (2, 512), (512, 784)], nn.ReLU, 2),
        ("iwae-paper", {"latent_dim": 50, "hidden": (200, 200), "activation": "tanh"},
         [(784, 200), (200, 200), (200, 100), (50, 200), (200, 200), (200, 784)], nn.Tanh, 4),
    ],
)
def test_known_architectures_are_expressible(name, kwargs, linears, act, n_act):
    model = build_model("mlp", (1, 28, 28), likelihood=BernoulliLogits(), **kwargs)
    assert _linear_shapes(model) == linears
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Tanh))]
    assert len(acts) == n_act and all(isinstance(m, act) for m in acts)
    expected = sum(i * o + o for i, o in linears)
    assert num_parameters(model) == expected
    if name == "pytorch-example":
        assert expected == num_parameters(PyTorchExampleVAE()) == 652_824


def test_from_config_reads_a_model_config():
    cfg = config.resolve(overrides=["model.latent_dim=5", "model.mlp.hidden=16,8",
                                    "model.activation=tanh"]).model
    model = from_config(cfg, (1, 28, 28), BernoulliLogits())
    assert _linear_shapes(model) == [(784, 16), (16, 8), (8, 10), (5, 8), (8, 16), (16, 784)]
    assert model.latent_dim == 5 and model.event_shape == (1, 28, 28)


# ----------------------------------------------------------------------------- prior, gradients


def test_prior_is_standard_normal():
    model = small("mlp", (1, 28, 28), BernoulliLogits(), latent_dim=7)
    prior = model.prior("cpu")
    assert prior.event_shape == (7,) and prior.batch_shape == ()
    assert prior.log_prob(torch.zeros(7)).item() == pytest.approx(-3.5 * math.log(2 * math.pi))
    assert prior.log_prob(torch.ones(2, 7)).tolist() == pytest.approx(
        [-3.5 * math.log(2 * math.pi) - 3.5] * 2, rel=1e-6
    )
    assert model.prior(dtype=torch.float64).mean.dtype == torch.float64


def test_elbo_composes_and_kl_matches_closed_form():
    torch.manual_seed(4)
    model = small("conv", (1, 28, 28), BernoulliLogits(), latent_dim=5)
    x = (torch.rand(3, 1, 28, 28) > 0.5).float()
    qz = model.encode(x)
    kl = kl_divergence(qz, model.prior())
    mu, s = qz.mean.double(), qz.stddev.double()
    ref = 0.5 * (mu**2 + s**2 - 1 - 2 * s.log()).sum(1)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    recon = model.decode(qz.rsample()).log_prob(x)
    assert recon.shape == (3,) and (recon < 0).all()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_gradient_reaches_likelihood_parameters(kind):
    torch.manual_seed(5)
    family = GaussianLearnedScale()
    model = small(kind, (1, 28, 28), family)
    assert model.likelihood is family
    assert any(p is family.log_scale for p in model.parameters())
    assert "likelihood.log_scale" in model.state_dict()
    x = torch.rand(4, 1, 28, 28)
    z = model.encode(x).rsample()
    params = model.decoder(z)
    params.retain_grad()
    model.decode(z).log_prob(x).sum().backward()
    # d/ds sum log N(x | mu, exp(r + s)) = sum((x - mu)^2 / sigma^2 - 1), in float64
    loc, raw = params.detach().double().unflatten(1, (2, -1)).unbind(1)
    sigma = torch.exp(raw + family.log_scale.detach().double())
    ref = (((x.double() - loc) / sigma) ** 2 - 1).sum()
    assert family.log_scale.grad.item() == pytest.approx(ref.item(), rel=1e-4)
    first = next(m for m in model.encoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- real families


@pytest.mark.skipif(importlib.util.find_spec("vaelab.likelihoods") is None,
                    reason="vaelab.likelihoods not written yet")
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize(
    "name, options, p",
    [("bernoulli", {}, 1), ("gaussian", {"scale": "per-pixel"}, 2), ("categorical-256", {}, 256)],
)
def test_real_likelihood_families(kind, name, options, p):
    from vaelab import likelihoods

    torch.manual_seed(6)
    family = likelihoods.get(name, **options)
    assert family.params_per_channel == p
    model = small(kind, (1, 28, 28), family)
    assert isinstance(model, VAE)
    if family.data_kind == "uint8":
        x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
        pixel_mean = x.float().mean(0) / 255
    else:
        x = (torch.rand(3, 1, 28, 28) > 0.5).float()
        pixel_mean = torch.rand(1, 28, 28) * 0.8 + 0.1
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
    model.init_output_bias(pixel_mean)
    px = model.decode(model.encode(x).rsample())
    if name != "categorical-256":  # its mean is exact only up to the bias' discretisation
        assert (px.mean - pixel_mean).abs().max().item() < 1e-5
    lp = px.log_prob(x)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    lp.sum().backward()
    assert all(q.grad is not None for q in model.likelihood.parameters())
