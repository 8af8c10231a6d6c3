"""The conv model with residual blocks: shapes at any 2^n-divisible size, size errors, the
residual block, memory layouts, the output bias, gradients, sizing and the cifar10 preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab import config, likelihoods
from vaelab.errors import ConfigError
from vaelab.models import build_from_config, build_model, num_parameters
from vaelab.models.conv import (
    MEMORY_FORMATS,
    ConvDecoder,
    ConvEncoder,
    ResidualBlock,
    conv_feature_size,
    max_stages,
    sized_for,
)

torch.set_default_dtype(torch.float32)

DLM = "discretized-logistic-mixture"


def small(shape, family, *, latent_dim=3, channels=(4, 8), blocks=1, hidden=(), **kw):
    return build_model("conv", shape, latent_dim, family, hidden=hidden, channels=channels,
                       blocks=blocks, **kw)


def _uint8(shape, n=3, seed=0):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _image_sizes(module, x):
    """``(H, W)`` after every conv layer of ``module`` (walked in order, NCHW)."""
    sizes = []
    for layer in module:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            sizes.append(tuple(x.shape[-2:]))
    return sizes


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape, channels", [
    ((1, 28, 28), (4, 8)),          # 28 = 4 x 7: two stages
    ((3, 28, 28), (4, 8)),
    ((1, 32, 32), (4, 8, 8)),
    ((3, 32, 32), (4, 8, 16)),
    ((1, 64, 64), (4, 8, 8, 16)),
    ((3, 64, 64), (4, 8, 8, 16)),
    ((3, 32, 64), (4, 8, 8)),       # not square
])
@pytest.mark.parametrize("blocks", [0, 2])
def test_shapes_at_every_size(shape, channels, blocks):
    torch.manual_seed(0)
    family = likelihoods.get("bernoulli")
    model = small(shape, family, latent_dim=5, channels=channels, blocks=blocks)
    c, h, w = shape
    n = len(channels)
    x = (torch.rand(4, *shape) > 0.5).float()
    assert model.encoder(x).shape == (4, 10)
    z = torch.randn(6, 5)
    assert model.decoder(z).shape == (6, c, h, w)
    assert model.decode(z).log_prob(torch.zeros(6, *shape)).shape == (6,)
    # every stride-2 conv halves exactly, every transposed conv doubles exactly
    enc = _image_sizes(model.encoder, x)
    down = [(h >> i, w >> i) for i in range(1, n + 1)]
    assert [s for s in enc if s in down] == down
    dec = _image_sizes(model.decoder.net, z)
    assert dec[-1] == (h, w) and dec[-2] == (h, w)  # the last up-conv and the output layer
    ups = [m for m in model.decoder.net if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == n
    assert sum(isinstance(m, ResidualBlock) for m in model.modules()) == 2 * n * blocks
    assert conv_feature_size(shape, channels) == (h >> n, w >> n)


@pytest.mark.parametrize("p", [1, 2, 40])
@pytest.mark.parametrize("blocks", [0, 1])
def test_decoder_output_is_parameter_major(p, blocks):
    class Params(nn.Module):
        params_per_channel = p
        data_kind = "unit"

        def forward(self, params):
            return params

    model = small((3, 32, 32), Params(), channels=(4, 8, 8), blocks=blocks)
    bias = torch.arange(p * 3 * 32 * 32, dtype=torch.float32).reshape(p * 3, 32, 32)
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
    model.decoder.set_output_bias(bias)
    out = model.decode(torch.randn(2, 3))
    assert out.is_contiguous() and torch.equal(out, bias.expand(2, -1, -1, -1))


def test_blocks_zero_is_the_former_model():
    """Same layers and state_dict keys as the 28/32-only model (old checkpoints load)."""
    model = small((1, 28, 28), likelihoods.get("bernoulli"), hidden=(8,), blocks=0)
    enc, dec = model.encoder, model.decoder.net
    assert [type(m).__name__ for m in enc] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in dec] == [
        "Linear", "ReLU", "Linear", "Unflatten", "ReLU", "ConvTranspose2d", "ReLU",
        "ConvTranspose2d", "ReLU", "Conv2d"]
    assert dec[-1].kernel_size == (3, 3)
    keys = [k for k in model.state_dict() if k.startswith(("encoder", "decoder"))]
    assert keys == [
        "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
        "encoder.5.weight", "encoder.5.bias", "encoder.7.weight", "encoder.7.bias",
        "decoder.pixel_bias", "decoder.net.0.weight", "decoder.net.0.bias",
        "decoder.net.2.weight", "decoder.net.2.bias", "decoder.net.5.weight",
        "decoder.net.5.bias", "decoder.net.7.weight", "decoder.net.7.bias",
        "decoder.net.9.weight", "decoder.net.9.bias"]


def test_residual_layers_in_order():
    model = small((3, 32, 32), likelihoods.get("bernoulli"), channels=(4, 8), blocks=2)
    names = [type(m).__name__ for m in model.encoder]
    assert names == ["Conv2d", "ResidualBlock", "ResidualBlock", "ReLU",
                     "Conv2d", "ResidualBlock", "ResidualBlock", "ReLU", "Flatten", "Linear"]
    names = [type(m).__name__ for m in model.decoder.net]
    assert names == ["Linear", "Unflatten", "ResidualBlock", "ResidualBlock", "ReLU",
                     "ConvTranspose2d", "ResidualBlock", "ResidualBlock", "ReLU",
                     "ConvTranspose2d", "ReLU", "Conv2d"]
    assert model.decoder.output_layer.kernel_size == (1, 1)  # residual models: 1x1 output


# ----------------------------------------------------------------------------- size errors


@pytest.mark.parametrize("shape, channels, pattern", [
    ((1, 30, 30), (4, 8), r"divisible by 4, got 30x30: use at most 1 entry in model\.channels, "
                          r"resize the images \(--image-size 32\) or use model\.kind = 'mlp'"),
    ((1, 28, 28), (4, 8, 16), r"divisible by 8, got 28x28: use at most 2 entries"),
    ((3, 36, 36), (4, 8, 16), r"divisible by 8, got 36x36: use at most 2 entries"),
    ((3, 32, 48), (4, 8, 8, 8, 8), r"divisible by 32, got 32x48: use at most 4 entries"),
    ((1, 27, 27), (4,), r"divisible by 2, got 27x27: resize the images \(--image-size 28\)"),
    ((28, 28), (4,), r"needs images shaped \(C, H, W\), got event shape \(28, 28\)"),
])
def test_sizes_the_stages_do_not_divide_are_one_line_config_errors(shape, channels, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        small(shape, likelihoods.get("bernoulli"), channels=channels)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=pattern):
        conv_feature_size(shape, channels)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"blocks": -1}, r"model\.conv\.blocks must be >= 0, got -1"),
    ({"memory_format": "nhwc"}, "memory_format 'nhwc' is not one of auto, channels_last, "
                                "contiguous"),
])
def test_bad_options_are_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        small((1, 28, 28), likelihoods.get("bernoulli"), **kwargs)


def test_blocks_belong_to_the_conv_model():
    with pytest.raises(ConfigError, match=r"unknown config key model\.mlp\.blocks"):
        build_model("mlp", (1, 28, 28), 3, likelihoods.get("bernoulli"), blocks=2)
    with pytest.raises(ConfigError, match=r"model\.blocks is an option of the conv model, not "
                                          r"of 'mlp': set model\.conv\.blocks"):
        config.resolve(overrides=["model.blocks=2"])
    with pytest.raises(ConfigError, match=r"model\.conv\.blocks must be >= 0"):
        config.resolve(overrides=["model.kind=conv", "model.blocks=-1"])
    # another kind's options are kept aside, unused, so switching kinds needs no unsetting
    cfg = config.resolve(overrides=["model.conv.blocks=2"])
    assert cfg.model.kind == "mlp" and not hasattr(cfg.model.options, "blocks")


def test_max_stages():
    assert [max_stages(n) for n in (28, 32, 48, 7, 1, 128)] == [2, 5, 4, 0, 0, 7]


# ----------------------------------------------------------------------------- residual block


def test_residual_block_is_identity_when_its_branch_is_zeroed():
    torch.manual_seed(1)
    block = ResidualBlock(6, "relu")
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    assert torch.equal(block(x), x)
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("activation", ["relu", "elu", "silu", "tanh", "gelu", "leaky-relu"])
def test_residual_block_matches_its_formula_in_float64(activation):
    torch.manual_seed(2)
    block = ResidualBlock(2, activation).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    act = {"relu": F.relu, "elu": F.elu, "silu": F.silu, "tanh": torch.tanh, "gelu": F.gelu,
           "leaky-relu": F.leaky_relu}[activation]
    ref = x + F.conv2d(act(F.conv2d(act(x), block.conv1.weight, block.conv1.bias, padding=1)),
                       block.conv2.weight, block.conv2.bias, padding=1)
    out = block(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # in-place activations keep the gradient exact (checked against finite differences)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("blocks", [0, 1])
def test_memory_formats_compute_the_same_function(blocks):
    """channels_last and NCHW give the same outputs and gradients (float64)."""
    family = likelihoods.get(DLM, components=2)
    x = _uint8((3, 16, 16), n=4)
    grads, outs = [], []
    for fmt in MEMORY_FORMATS:
        torch.manual_seed(3)
        torch.set_default_dtype(torch.float64)  # uint8 data become float64 inside encode
        try:
            model = small((3, 16, 16), family, channels=(4, 8), blocks=blocks,
                          memory_format=fmt)
            qz = model.encode(x)
            lp = model.decode(qz.mean + qz.stddev).log_prob(x)
        finally:
            torch.set_default_dtype(torch.float32)
        assert lp.dtype == torch.float64
        lp.sum().backward()
        outs.append(lp.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    for other, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(other, outs[0], rtol=1e-10, atol=1e-8)
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_one_by_one_output_layer_is_the_convolution_plus_biases():
    """The 1x1 output as a batched product equals conv2d + per-channel + per-pixel bias."""
    torch.manual_seed(4)
    dec = ConvDecoder((3, 8, 8), 5, 4, (6,), (), "relu", blocks=1).double()
    with torch.no_grad():
        dec.pixel_bias.normal_()
    z = torch.randn(7, 5, dtype=torch.float64)
    x = z
    for layer in list(dec.net)[:-1]:
        x = layer(x)
    out = dec.output_layer
    ref = F.conv2d(x, out.weight, out.bias) + dec.pixel_bias
    torch.testing.assert_close(dec(z), ref, rtol=0, atol=1e-12)


def test_auto_layout_is_channels_last_on_cpu_only():
    from vaelab.models.conv import _resolve_layout

    assert _resolve_layout("auto", torch.device("cpu")) is torch.channels_last
    assert _resolve_layout("auto", torch.device("cuda", 0)) is torch.contiguous_format
    assert _resolve_layout("contiguous", torch.device("cpu")) is torch.contiguous_format
    enc = ConvEncoder((3, 8, 8), 2, (4,), (), "relu", blocks=1)
    assert all(p.is_contiguous() for p in enc.parameters())  # parameters keep NCHW


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(5)
    model = small((3, 32, 32), likelihoods.get(DLM), channels=(8, 16, 16), blocks=1)
    x = _uint8((3, 32, 32), n=4)
    z = torch.randn(4, 3)
    cpu = model.decode(z).log_prob(x)
    gpu = model.cuda().decode(z.cuda()).log_prob(x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-2)


# ----------------------------------------------------------------------------- output bias


@pytest.mark.parametrize("name, options, shape", [
    ("bernoulli", {}, (1, 28, 28)),
    ("bernoulli", {}, (3, 32, 32)),
    (DLM, {"components": 3}, (3, 32, 32)),
    (DLM, {"components": 2}, (1, 28, 28)),
])
@pytest.mark.parametrize("blocks", [0, 2])
def test_init_output_bias_gives_the_data_mean_exactly(name, options, shape, blocks):
    torch.manual_seed(6)
    family = likelihoods.get(name, **options)
    model = small(shape, family, channels=(4, 8), blocks=blocks).double()
    if family.data_kind == "uint8":
        pixel_mean = _uint8(shape, n=50).double().mean(0) / 255
    else:
        pixel_mean = torch.rand(shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        model.decoder.output_layer.weight.zero_()
        model.decoder.output_layer.bias.normal_()  # set_output_bias must zero it
    model.init_output_bias(pixel_mean)
    z = torch.randn(4, 3, dtype=torch.float64) * 3
    params = model.decoder(z)
    expected = family.output_bias(pixel_mean)
    assert torch.equal(params, expected.expand(4, *expected.shape))
    mean = model.decode(z).mean
    err = (mean - pixel_mean.clamp(1e-3, 1 - 1e-3)).abs().max().item()
    assert err < 1e-9, err


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("blocks", [0, 2])
def test_every_parameter_gets_a_gradient(blocks):
    torch.manual_seed(7)
    family = likelihoods.get(DLM, components=2)
    model = small((3, 16, 16), family, channels=(4, 8), blocks=blocks, hidden=(6,))
    model.init_output_bias(torch.full((3, 16, 16), 0.4))
    x = _uint8((3, 16, 16), n=5)
    qz = model.encode(x)
    elbo = model.decode(qz.rsample()).log_prob(x) - torch.distributions.kl_divergence(
        qz, model.prior())
    assert torch.isfinite(elbo).all()
    (-elbo.mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith("likelihood"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_pixel_bias_gradient_is_the_sum_of_the_output_gradients():
    torch.manual_seed(8)
    dec = ConvDecoder((3, 8, 8), 4, 2, (4, 4), (), "relu", blocks=1)
    z = torch.randn(5, 4)
    g = torch.randn(5, 6, 8, 8)
    dec(z).backward(g)
    torch.testing.assert_close(dec.pixel_bias.grad, g.sum(0))
    torch.testing.assert_close(dec.output_layer.bias.grad, g.sum((0, 2, 3)))


# ----------------------------------------------------------------------------- sizing


@pytest.mark.parametrize("shape, channels, latent", [
    ((3, 32, 32), [32, 64, 128], 128),
    ((1, 28, 28), [32, 64], 32),
    ((1, 32, 32), [32, 64, 128], 128),
    ((3, 64, 64), [32, 64, 128, 256], 128),
    ((3, 128, 128), [32, 64, 128, 256, 256], 128),
    ((3, 48, 48), [32, 64, 128], 128),        # 48 -> 24 -> 12 -> 6
    ((3, 32, 96), [32, 64, 128], 128),
])
def test_sized_for_halves_down_to_4x4_at_least(shape, channels, latent):
    settings = sized_for(shape)
    assert settings == {"kind": "conv", "latent_dim": latent,
                        "conv": {"channels": channels, "blocks": 2, "hidden": []}}
    cfg = config.from_dict({"model": settings})  # the [model] layer it is used as
    h, w = conv_feature_size(shape, channels)
    assert min(h, w) >= 4
    assert cfg.model.options.channels == tuple(channels) and cfg.model.options.hidden == ()


def test_sized_for_refuses_what_cannot_be_halved():
    with pytest.raises(ConfigError, match="images of 7x7 cannot be halved"):
        sized_for((1, 7, 7))
    with pytest.raises(ConfigError, match=r"needs images shaped \(C, H, W\)"):
        sized_for((784,))


# ----------------------------------------------------------------------------- cifar10 preset


def test_cifar10_preset_builds_the_documented_model(tmp_path):
    cfg = config.resolve(preset="cifar10")
    assert cfg.data.dataset == "cifar10" and cfg.data.binarize == "none"
    assert cfg.likelihood.name == DLM and cfg.likelihood.options.components == 10
    assert config.from_dict({"model": sized_for((3, 32, 32))}).model == cfg.model
    model = build_from_config(cfg, (3, 32, 32))
    assert model.likelihood.components == 10 and model.likelihood.params_per_channel == 40
    assert model.latent_dim == 128
    assert model.decoder.out_shape == (120, 32, 32)
    assert num_parameters(model) == 2_811_608
    x = _uint8((3, 32, 32), n=2)
    model.init_output_bias(x.double().mean(0).float() / 255)
    qz = model.encode(x)
    lp = model.decode(qz.rsample()).log_prob(x)
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    # a normalised likelihood of the 8-bit values: at most 8 bits per sub-pixel at the start
    assert (-lp / (3 * 32 * 32 * math.log(2)) < 8.5).all()
    # round-trips through the TOML saved with every run
    saved = tmp_path / "config.toml"
    saved.write_text(config.to_toml(cfg))
    assert config.resolve(file=saved) == cfg


def test_likelihood_components_reaches_the_family():
    cfg = config.resolve(overrides=[f"likelihood.name={DLM}", "likelihood.components=3",
                                    "model.kind=conv", "model.blocks=1", "model.hidden=[]"])
    assert cfg.likelihood.options.components == 3
    model = build_from_config(cfg, (3, 28, 28))
    assert model.likelihood.components == 3 and model.decoder.out_shape == (36, 28, 28)
    with pytest.raises(ConfigError, match=rf"likelihood\.{DLM}\.components must be positive"):
        config.resolve(overrides=[f"likelihood.name={DLM}", "likelihood.components=0"])
    with pytest.raises(ConfigError, match=f"likelihood.components is an option of the {DLM} "
                                          "likelihood, not of 'bernoulli'"):
        config.resolve(overrides=["likelihood.components=3"])


def test_cifar10_preset_trains_and_reports_bits_per_dim(tmp_path):
    """One epoch of the preset's model on synthetic 32x32 RGB images (CIFAR-10 cannot be
    downloaded here), then the report: bits/dim of the 8-bit data from the NLL."""
    from vaelab.evaluate import evaluate_run
    from vaelab.train import train_and_evaluate

    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    np.savez(path, images=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    cfg = config.resolve(preset="cifar10", overrides=[
        f"data.dataset={path}", "data.validation_size=0", "data.test_size=4",
        "train.epochs=1", "train.batch_size=20", "train.device=cpu", "train.threads=1"])
    train_and_evaluate(cfg, tmp_path / "run", progress=False, echo=lambda _line: None)
    report = evaluate_run(tmp_path / "run", split="test", checkpoint="last", iw_samples=2,
                          device="cpu")
    assert report["likelihood"] == DLM and report["likelihood_options"] == {"components": 10}
    assert report["normalized"] is True and report["n_examples"] == 4
    assert report["data_dims"] == 3 * 32 * 32
    # an exact likelihood of the 8-bit values: nats / (D ln 2), no dequantisation offset
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (3072 * math.log(2)))
    assert "note" not in report
    # uniform random bytes: about 8 bits per sub-pixel for a model near the data mean
    assert 7.5 < report["bits_per_dim"] < 9
