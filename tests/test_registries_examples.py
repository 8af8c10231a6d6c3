"""Every registry entry has an example here, checked against numbers: learning-rate
schedules (against torch's own schedulers), weight initialisations, optimizers, objective
kinds, encoder scales. A new entry without an example fails the first test of its table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vaelab import config, objectives
from vaelab.models import ENCODER_SCALES, INITS, GatedDense, build_model, initialise
from vaelab.models.vae import MIN_SCALE
from vaelab.schedules import SCHEDULES, learning_rate
from vaelab.train import OPTIMIZERS, make_optimizer

# --------------------------------------------------------------------------- schedules


def _torch_rates(make_scheduler, epochs: int, lr: float) -> list[float]:
    """The lr torch's scheduler gives during each epoch when stepped once per epoch."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


SCHEDULE_EXAMPLES = {
    "constant": (dict(lr=3e-4), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)),
    "cosine": (dict(lr=1e-3, epochs=20),
               lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)),
    "multistep": (dict(lr=1e-4, lr_milestones=(200, 350, 500, 750, 1000), lr_gamma=10 ** -0.2),
                  lambda opt: torch.optim.lr_scheduler.MultiStepLR(
                      opt, milestones=[200, 350, 500, 750, 1000], gamma=10 ** -0.2)),
    # Burda et al. (2016): 3^i epochs at lr 10^(-i/7), i = 0..7
    "iwae": (dict(lr=1e-3), lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 10 ** (-min(i for i in range(8) if e < (3 ** (i + 1) - 1) // 2) / 7))),
}


def test_every_schedule_has_an_example():
    assert sorted(SCHEDULE_EXAMPLES) == SCHEDULES.names()


@pytest.mark.parametrize("name", sorted(SCHEDULE_EXAMPLES))
def test_schedule_equals_torchs_scheduler_stepped_per_epoch(name):
    fields, make = SCHEDULE_EXAMPLES[name]
    cfg = config.TrainConfig(lr_schedule=name, **{"epochs": 1100, **fields})
    epochs = min(cfg.epochs, 1100)
    want = _torch_rates(make, epochs, cfg.lr)
    got = [learning_rate(cfg, e) for e in range(epochs)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_multistep_milestones_count_finished_epochs():
    cfg = config.resolve(preset="mnist-vae").train
    # 1e-4 for epochs 1-200 (0-based 0..199), x 10^-0.2 from epoch 201, again from 351
    assert learning_rate(cfg, 199) == 1e-4
    assert learning_rate(cfg, 200) == pytest.approx(1e-4 * 10 ** -0.2, rel=1e-12)
    assert learning_rate(cfg, 350) == pytest.approx(1e-4 * 10 ** -0.4, rel=1e-12)


def test_unknown_schedule_is_refused_at_config_time():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step': choose one of "
                                         "constant, cosine, iwae, multistep"):
        config.resolve(overrides=["train.lr_schedule=step"])


# --------------------------------------------------------------------------- initialisations


def _layers(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def _check_torch(model, reference):
    for layer, ref in zip(_layers(model), _layers(reference)):
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)


@torch.no_grad()
def _check_glorot(model, reference):
    for layer in _layers(model):
        fan_out, fan_in = layer.weight.shape
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert float(layer.weight.abs().max()) <= limit
        assert float(layer.weight.abs().max()) > 0.9 * limit  # uniform up to the limit
        assert torch.count_nonzero(layer.bias) == 0


@torch.no_grad()
def _check_he(model, reference):
    big = [m for m in _layers(model) if m.weight.numel() > 10_000]
    for layer in big:
        fan_in = layer.weight.shape[1]
        std = float(layer.weight.std())
        assert std == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    for layer, ref in zip(_layers(model), _layers(reference)):  # biases keep torch's default
        assert torch.equal(layer.bias, ref.bias)


INIT_EXAMPLES = {"torch": _check_torch, "glorot": _check_glorot, "he": _check_he}


def test_every_init_has_an_example():
    assert sorted(INIT_EXAMPLES) == INITS.names()


@pytest.mark.parametrize("name", sorted(INIT_EXAMPLES))
def test_init(name):
    from vaelab import likelihoods

    def build(init):
        torch.manual_seed(0)
        return build_model("mlp", (1, 28, 28), 8, likelihoods.get("bernoulli"), hidden=(300,),
                           init=init)

    INIT_EXAMPLES[name](build(name), build("torch"))


def test_initialise_reaches_gated_layers():
    layer = nn.Sequential(GatedDense(50, 40))
    initialise(layer, "glorot")
    assert torch.count_nonzero(layer[0].h.bias) == 0 and torch.count_nonzero(layer[0].g.bias) == 0


# --------------------------------------------------------------------------- gated layers


def test_gated_dense_is_h_times_sigmoid_g():
    torch.manual_seed(0)
    layer = GatedDense(5, 3)
    x = torch.randn(4, 5, dtype=torch.float64)
    layer = layer.double()
    want = (x @ layer.h.weight.T + layer.h.bias) * torch.sigmoid(x @ layer.g.weight.T
                                                                 + layer.g.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_vampprior_architecture_is_expressible():
    cfg = config.resolve(overrides=["model.gated=true", "model.hidden=300,300",
                                    "model.latent_dim=40", "model.encoder_scale=logvar-hardtanh"])
    from vaelab.models import build_from_config

    model = build_from_config(cfg, (1, 28, 28))
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    # encoder: gated 784-300, 300-300 (h and g each), head 300 -> 2 x 40; decoder mirrored
    assert shapes == [(784, 300), (784, 300), (300, 300), (300, 300), (300, 80),
                      (40, 300), (40, 300), (300, 300), (300, 300), (300, 784)]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


# --------------------------------------------------------------------------- encoder scales

SCALE_EXAMPLES = {  # raw output -> sigma
    "softplus": [(-1e4, MIN_SCALE), (0.0, math.log(2) + MIN_SCALE), (1e4, 1e4 + MIN_SCALE)],
    "exp": [(-1e4, math.exp(-15)), (0.0, 1.0), (2.0, math.e), (1e4, math.exp(15))],
    # log-variance through Hardtanh(-6, 2) (Tomczak & Welling's VampPrior encoder)
    "logvar-hardtanh": [(-1e4, math.exp(-3)), (-2.0, math.exp(-1)), (0.0, 1.0),
                        (1e4, math.e)],
}


def test_every_encoder_scale_has_an_example():
    assert sorted(SCALE_EXAMPLES) == ENCODER_SCALES.names()


@pytest.mark.parametrize("name", sorted(SCALE_EXAMPLES))
def test_encoder_scale_values(name):
    raw, sigma = zip(*SCALE_EXAMPLES[name])
    got = ENCODER_SCALES[name](torch.tensor(raw, dtype=torch.float64))
    assert got.tolist() == pytest.approx(list(sigma), rel=1e-12)


# --------------------------------------------------------------------------- optimizers


OPTIMIZER_EXAMPLES = {
    # name: (config fields, the torch optimizer it must equal)
    "adam": (dict(lr=1e-3, adam_eps=1e-7), lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-7,
                                                                       foreach=False)),
    "rmsprop": (dict(lr=1e-4), lambda p: torch.optim.RMSprop(p, lr=1e-4, foreach=False)),
}


def test_every_optimizer_has_an_example():
    assert sorted(OPTIMIZER_EXAMPLES) == OPTIMIZERS.names()


@pytest.mark.parametrize("name", sorted(OPTIMIZER_EXAMPLES))
def test_optimizer_steps_like_torchs(name):
    fields, reference = OPTIMIZER_EXAMPLES[name]
    cfg = config.TrainConfig(optimizer=name, **fields)
    start = torch.randn(20, generator=torch.Generator().manual_seed(0))
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    mine = make_optimizer(SimpleNamespace(parameters=lambda: [a]), cfg, torch.device("cpu"))
    theirs = reference([b])
    for step in range(5):
        grad = torch.randn(20, generator=torch.Generator().manual_seed(step + 1))
        for p, opt in ((a, mine), (b, theirs)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_rmsprop_foreach_steps_bit_for_bit_like_the_per_tensor_loop():
    """vaelab's RMSprop runs torch's foreach implementation on CPU (faster for many tensors):
    the same updates, bit for bit, as torch's per-parameter loop."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 784), (300,), (40, 300), (40,), (500, 784)]
    mine = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in mine]
    opt = make_optimizer(SimpleNamespace(parameters=lambda: mine),
                         config.TrainConfig(optimizer="rmsprop", lr=5e-4), torch.device("cpu"))
    assert opt.defaults["foreach"] is True
    reference = torch.optim.RMSprop(theirs, lr=5e-4, foreach=False)
    for step in range(4):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn(a.shape, generator=gen) * (step + 1)
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_adam_eps_defaults():
    p = [nn.Parameter(torch.zeros(1))]
    model = SimpleNamespace(parameters=lambda: p)
    cpu = torch.device("cpu")
    assert make_optimizer(model, config.TrainConfig(), cpu).defaults["eps"] == 1e-8
    iwae = config.resolve(preset="iwae-paper").train
    assert make_optimizer(model, iwae, cpu).defaults["eps"] == 1e-4


# --------------------------------------------------------------------------- objectives


def _toy():
    from vaelab import likelihoods

    torch.manual_seed(0)
    model = build_model("mlp", (1, 3, 3), 2, likelihoods.get("bernoulli"), hidden=(8,)).double()
    x = (torch.rand(6, 1, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    return model, x


def _elbo_example(model, x, gen):
    cfg = config.ObjectiveConfig(kind="elbo", samples=2, free_bits=0.1)
    loss, terms = objectives.build_objective(model, cfg)(x, 0.5, gen())
    want = objectives.training_loss(
        objectives.elbo_terms(model, x, num_samples=2, generator=gen()), beta=0.5,
        free_bits=0.1)
    return loss.mean(), want


def _iwae_example(model, x, gen):
    cfg = config.ObjectiveConfig(kind="iwae", samples=3)
    loss, terms = objectives.build_objective(model, cfg)(x, 1.0, gen())
    assert terms is None
    return loss, -objectives.iwae_bound(model, x, 3, generator=gen())


OBJECTIVE_EXAMPLES = {"elbo": _elbo_example, "iwae": _iwae_example}


def test_every_objective_has_an_example():
    assert sorted(OBJECTIVE_EXAMPLES) == objectives.OBJECTIVES.names()


@pytest.mark.parametrize("name", sorted(OBJECTIVE_EXAMPLES))
def test_objective_equals_its_definition(name):
    model, x = _toy()
    got, want = OBJECTIVE_EXAMPLES[name](model, x, lambda: torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_free_bits_per_example_loss_averages_to_the_clamped_kl():
    model, x = _toy()
    terms = objectives.elbo_terms(model, x, generator=torch.Generator().manual_seed(0))
    loss = objectives.per_example_loss(terms, kl_weight=2.0, free_bits=0.3)
    want = -terms.recon.mean() + 2.0 * terms.kl_per_dim.mean(0).clamp(min=0.3).sum()
    torch.testing.assert_close(loss.mean(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epoch, expected", [(0, 0.01), (49, 0.5), (99, 1.0), (300, 1.0)])
def test_warmup_in_epochs_follows_tomczak(epoch, expected):
    # beta = epoch / warmup with 1-based epochs, constant within an epoch, capped at 1
    for step in (0, 17, 10**6):
        assert objectives.kl_weight(step, 1.0, epoch=epoch, warmup_epochs=100) == \
            pytest.approx(expected)


def test_warmup_in_steps_and_epochs_together_is_refused():
    with pytest.raises(ValueError, match="in steps or in epochs, not both"):
        config.resolve(overrides=["objective.warmup_steps=10", "objective.warmup_epochs=5"])
    with pytest.raises(ValueError, match="in steps or in epochs, not both"):
        objectives.kl_weight(3, 1.0, 10, epoch=1, warmup_epochs=5)
