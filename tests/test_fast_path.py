"""The fast paths give the numbers of the straightforward code.

- Training: :func:`vaelab.train.train_and_evaluate` (fused optimizer, validation off in the loop, the
  likelihood's broadcast path, in-place noise) against a plain reference loop written here
  with ``torch.distributions`` and single-tensor Adam, same seed, same data order, same
  noise: the per-epoch metrics agree to float32 rounding (rel 1e-5 after 2 epochs), and so
  do the final weights.
- ``ObservationDistribution.log_prob_samples`` (x validated once and broadcast, not copied
  S times) against ``log_prob`` on the repeated data, for every registered family.
- ``objectives._standard_normal`` (one buffer filled in place) against separate ``randn``
  calls: bitwise equal, which is what makes draws independent of the chunk size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributions import Bernoulli, Normal, kl_divergence

from conftest import train
from likelihood_examples import CASES as FAMILY_CASES
from likelihood_examples import EXAMPLES, IDS
from vaelab import checkpoint, config, likelihoods, objectives
from vaelab.data import dynamic_binarize
from vaelab.errors import DataError
from vaelab.models import build_from_config
from vaelab.rng import Purpose, seeded_generator

N_IMAGES = 192


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    # smooth-ish grey images with exact 0 and 255 pixels, like real digits
    base = rng.integers(0, 256, size=(N_IMAGES, 28, 28))
    base[:, :4] = 0
    base[:, -2:] = 255
    np.savez(path, images=base.astype(np.uint8))
    return path


CASES = {
    # The PyTorch example: BCE on grey levels, exp encoder scale, 784-400-20.
    "pytorch-example": ("pytorch-example", ["train.batch_size=64"]),
    # The default recipe: dynamic binarisation, normalised Bernoulli, softplus scale.
    "dynamic-bernoulli": ("default", ["model.hidden=64", "model.latent_dim=8",
                                      "train.batch_size=48"]),
}


def _config(case: str, path) -> config.RunConfig:
    preset, extra = CASES[case]
    return config.resolve(preset=preset, overrides=[
        f"data.dataset={path}", "data.validation_size=0", "train.epochs=2",
        "train.device=cpu", *extra])


def _encoder_scale(cfg: config.RunConfig, raw: torch.Tensor) -> torch.Tensor:
    if cfg.model.encoder_scale == "exp":
        return torch.exp(0.5 * raw.clamp(-30.0, 30.0))
    return F.softplus(raw) + 1e-6


def reference_loop(cfg: config.RunConfig, images: torch.Tensor):
    """Straightforward training with the trainer's seeds; returns (metrics, model)."""
    seed, batch_size = cfg.train.seed, cfg.train.batch_size
    torch.manual_seed(seed)
    model = build_from_config(cfg, tuple(images.shape[1:]))
    if cfg.model.output_bias == "data-mean":
        model.init_output_bias((images.double().sum(0) / (len(images) * 255.0)).float())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=False)
    history = []
    for epoch in range(cfg.train.epochs):
        perm = torch.randperm(len(images), generator=seeded_generator(seed, epoch, Purpose.PERMUTATION))
        binarize = seeded_generator(seed, epoch, Purpose.BINARIZE)
        noise = seeded_generator(seed, epoch, Purpose.NOISE)
        n = objective = recon_sum = kl_sum = 0.0
        for start in range(0, len(images), batch_size):
            grey = images[perm[start:start + batch_size]]
            if cfg.data.binarize == "dynamic":  # the documented exact draw (test_data_imageset)
                x = dynamic_binarize(grey, binarize)
            else:
                x = grey.float() / 255.0
            loc, raw = model.encoder(x).chunk(2, dim=-1)
            scale = _encoder_scale(cfg, raw)
            z = loc + scale * torch.randn(loc.shape, generator=noise)
            logits = model.decoder(z)
            if cfg.likelihood.options.output == "torch-probs":  # the PyTorch example's sigmoid + BCE
                recon = -F.binary_cross_entropy(torch.sigmoid(logits), x,
                                                reduction="none").sum((1, 2, 3))
            else:
                recon = Bernoulli(logits=logits, validate_args=False).log_prob(x).sum((1, 2, 3))
            kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
            per_example = -(recon - kl)
            optimizer.zero_grad()
            per_example.mean().backward()
            optimizer.step()
            n += len(x)
            objective += float(per_example.detach().double().sum())
            recon_sum += float(recon.detach().double().sum())
            kl_sum += float(kl.detach().double().sum())
        history.append({"train_objective": objective / n, "train_nelbo": objective / n,
                        "train_recon": -recon_sum / n, "train_kl": kl_sum / n})
    return history, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_matches_reference_loop(case, tiny_npz, tmp_path):
    from vaelab import data

    cfg = _config(case, tiny_npz)
    images = data.load(str(tiny_npz), "train", validation_size=0).images
    expected, ref_model = reference_loop(cfg, images)
    train(cfg, tmp_path / "run", progress=False, report=False, echo=lambda _line: None)
    rows = [json.loads(line)
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(expected) == 2
    keys = ("train_objective", "train_nelbo", "train_recon", "train_kl")
    for got, want in zip(rows, expected):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    # the loop moved: epoch 2 differs from epoch 1 far beyond the tolerance
    assert abs(rows[1]["train_objective"] - rows[0]["train_objective"]) > 1e-2
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "last")
    tensors = load_file(tmp_path / "run" / "checkpoints" / meta["tensor_file"])
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(tensors[f"model.{name}"], value, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- log_prob_samples

@pytest.mark.parametrize("name,i", FAMILY_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_samples_equals_log_prob_on_repeated_data(name, i, dtype):
    """Every case of the family table (tests/likelihood_examples.py)."""
    example = EXAMPLES[name][i]
    family = likelihoods.get(name, **example.options).to(dtype)
    num, batch, event = 5, 3, (2, 4, 4)
    gen = torch.Generator().manual_seed(0)
    x = example.make_x(gen, (batch, *event))
    x = x.to(dtype) if x.is_floating_point() else x
    p = family.params_per_channel
    params = 2.0 * torch.randn(num * batch, p * event[0], *event[1:], generator=gen,
                               dtype=dtype)
    px = family(params)
    got = px.log_prob_samples(x, num)
    x_rep = x.unsqueeze(0).expand(num, *x.shape).reshape(num * batch, *event)
    want = px.log_prob(x_rep).reshape(num, batch)
    assert got.shape == (num, batch) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 0)
    # and against float64 math for one example
    ref = family.to(torch.float64)(params.double()).log_prob(x_rep.to(
        x.dtype if x.dtype == torch.uint8 else torch.float64))
    torch.testing.assert_close(got.double(), ref.reshape(num, batch),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-3)


def test_log_prob_samples_validates_once_and_checks_shapes():
    family = likelihoods.get("bernoulli")
    params = torch.zeros(6, 1, 2, 2)
    grey = torch.full((3, 1, 2, 2), 0.5)
    with pytest.raises(DataError, match="needs 0/1 data"):
        family(params).log_prob_samples(grey, 2)
    assert family(params, validate=False).log_prob_samples(grey, 2).shape == (2, 3)
    with pytest.raises(DataError, match="do not hold 4 draws"):
        family(params).log_prob_samples(torch.ones(3, 1, 2, 2), 4)
    with pytest.raises(DataError, match="do not hold"):
        family(params).log_prob_samples(torch.ones(3, 1, 2, 3), 2)


def test_decoder_log_prob_uses_the_broadcast_path_with_equal_results():
    torch.manual_seed(0)
    cfg = config.resolve(overrides=["model.hidden=16", "model.latent_dim=3"])
    model = build_from_config(cfg, (1, 6, 6))
    x = (torch.rand(4, 1, 6, 6) > 0.5).float()
    z = torch.randn(7, 4, 3)
    got = objectives._decoder_log_prob(model, x, z)
    x_rep = x.unsqueeze(0).expand(7, *x.shape).reshape(28, 1, 6, 6)
    want = model.decode(z.reshape(28, 3)).log_prob(x_rep).reshape(7, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("num", [1, 2, 9])
def test_standard_normal_blocks_are_separate_randn_calls(num):
    like = torch.zeros(1, dtype=torch.float64)
    got = objectives._standard_normal(num, torch.Size((5, 3)), like,
                                      torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    want = torch.stack([torch.randn(5, 3, generator=gen, dtype=torch.float64)
                        for _ in range(num)])
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- closed forms

def _bce_reference(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 log Bernoulli(x; sigmoid(l)) = -(max(l, 0) - l x + log1p(e^-|l|))."""
    lg, x = logits.double(), x.double()
    return -(lg.clamp(min=0) - lg * x + torch.log1p(torch.exp(-lg.abs())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_evaluation_path_equals_training_path(dtype):
    # evaluation (no autograd) uses x l - softplus(l) in place; training BCE-with-logits
    logits = torch.tensor([-80.0, -50.0, -39.9, -20.0, -1e-3, 0.0, 1e-3, 3.0, 20.0, 39.9,
                           40.1, 50.0, 80.0], dtype=dtype)
    family = likelihoods.get("bernoulli", unnormalized=True)
    for x in (torch.zeros_like(logits), torch.ones_like(logits), torch.full_like(logits, 0.3)):
        params = logits.reshape(1, -1)
        with torch.no_grad():
            fast = family(params).elementwise_log_prob(x.reshape(1, -1))
        slow = family(params.clone().requires_grad_()).elementwise_log_prob(x.reshape(1, -1))
        ref = _bce_reference(params, x.reshape(1, -1))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(fast.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(slow.detach().double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(fast, slow.detach(), rtol=4 * torch.finfo(dtype).eps,
                                   atol=4 * torch.finfo(dtype).eps * 80)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_kl_closed_form_equals_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    loc = 3 * torch.randn(64, 5, generator=gen, dtype=dtype)
    scale = torch.exp(4 * torch.randn(64, 5, generator=gen, dtype=dtype))  # e^-12 .. e^12
    q = torch.distributions.Independent(Normal(loc, scale), 1)
    torch.manual_seed(0)
    prior = build_from_config(config.resolve(overrides=["model.latent_dim=5"]),
                              (1, 2, 2)).prior("cpu", dtype)
    assert prior.base_dist.standard is True
    kl, per_dim = objectives._analytic_kl(q, prior)
    want = kl_divergence(Normal(loc.double(), scale.double()), Normal(0.0, 1.0))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(per_dim.double(), want, rtol=rtol, atol=rtol)
    torch.testing.assert_close(kl.double(), want.sum(-1), rtol=rtol, atol=rtol * 10)
    # a prior without the marker takes torch's general formula: the same numbers
    general = torch.distributions.Independent(Normal(torch.zeros(5, dtype=dtype),
                                                     torch.ones(5, dtype=dtype)), 1)
    torch.testing.assert_close(objectives._analytic_kl(q, general)[1], per_dim,
                               rtol=rtol, atol=rtol)
