"""Run configuration: one frozen dataclass per component, TOML in and out, presets.

A run is described by a :class:`RunConfig`. It is built from defaults, then a
preset, then a TOML file, then ``--set section.key=value`` overrides, each
layer validated: an unknown section or key is a :class:`~vaelab.errors.ConfigError`
that lists the valid ones. The resolved config is saved with every run and
checkpoint (``config.toml``), so a run can always be rebuilt.

Example::

    cfg = resolve(preset="pytorch-example", overrides=["train.epochs=3"])
    cfg.model.latent_dim  # 20
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BINARIZE_MODES",
    "KL_MODES",
    "OUTPUT_BIAS_MODES",
    "VALIDATION_SPLITS",
    "SELECTIONS",
    "DataConfig",
    "LikelihoodConfig",
    "ModelConfig",
    "PriorConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "PRESETS",
    "PRESET_SOURCES",
    "resolve",
    "from_dict",
    "to_dict",
    "to_toml",
    "load_toml",
    "parse_override",
    "given_keys",
]


#: How grey levels become model inputs (see :func:`vaelab.data.load`).
BINARIZE_MODES = ("none", "dynamic", "static")
#: How the KL term is computed (see :func:`vaelab.objectives.elbo_terms`).
KL_MODES = ("auto", "analytic", "mc")
#: How the decoder's output bias starts (see :class:`ModelConfig`).
OUTPUT_BIAS_MODES = ("data-mean", "none")
#: Which split the trainer evaluates after every epoch, and which checkpoint is "best".
VALIDATION_SPLITS = ("validation", "test")
SELECTIONS = ("best", "last")


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how they are turned into model inputs."""

    dataset: str = "fashion-mnist"
    """A registered name (mnist, fashion-mnist, kmnist, binarized-mnist), a .npz/.npy file or a PNG folder."""
    data_dir: str | None = None
    binarize: str = "dynamic"
    """none | dynamic (fresh Bernoulli draw per example per epoch) | static (one fixed draw)."""
    validation_size: int = 5000
    train_limit: int | None = None
    """Use only the first N training examples (quick runs and tests); None = all."""
    test_limit: int | None = None
    """Evaluate on only the first N test examples; None = all."""
    image_size: str | None = None
    """Your own images: resize to N x N or HxW (shorter side, antialiased, then centre crop)."""
    channels: str = "auto"
    """Your own images: auto (colour if any image is colour, else grey) | 1 | 3."""
    layout: str = "auto"
    """.npy/.npz arrays: auto (detected when unambiguous) | nchw | nhwc."""
    test_size: float | None = None
    """Your own data: the held-out test part, a fraction < 1 or a count (default 10%, at
    most 10,000; 0 = none); ignored with test_dataset."""
    test_dataset: str | None = None
    """Your own data: a separate file or folder for the test split."""
    cache: bool = True
    """Folders of images: reuse the cache of decoded images (keyed by files, sizes, mtimes)."""


@dataclass(frozen=True)
class LikelihoodConfig:
    """The decoder's output distribution p(x|z); see :mod:`vaelab.likelihoods`."""

    name: str = "bernoulli"
    scale: float | str | None = None
    """gaussian/laplace: a positive number (fixed sigma), "learned" or "per-pixel"."""
    unnormalized: bool = False
    """bernoulli only: accept grey levels (BCE on grey levels, not a likelihood)."""
    output: str | None = None
    """bernoulli only: logits (exact; default) | keras-probs (sigmoid, clipped to
    [1e-7, 1 - 1e-7], as Keras) | torch-probs (sigmoid, F.binary_cross_entropy)."""
    components: int | None = None
    """discretized-logistic-mixture: mixture components per pixel (default 10)."""
    init_scale: float | None = None
    """learned/per-pixel scales: the starting sigma."""
    min_scale: float | None = None
    """learned/per-pixel scales: a floor on sigma."""

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for key in ("scale", "init_scale", "min_scale"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.unnormalized:
            opts["unnormalized"] = True
        for key in ("output", "components"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts


@dataclass(frozen=True)
class ModelConfig:
    """Encoder/decoder architecture; see :mod:`vaelab.models`."""

    kind: str = "mlp"
    latent_dim: int = 16
    hidden: tuple[int, ...] = (512, 256)
    """MLP hidden sizes of the encoder (the decoder mirrors them)."""
    activation: str = "relu"
    channels: tuple[int, ...] = (32, 64)
    """Conv channels of the encoder's stride-2 stages (the decoder mirrors them); H and W
    must be divisible by 2 ** len(channels)."""
    blocks: int = 0
    """Conv: residual blocks (two 3x3 convs and a skip) per stage; 0 = plain stride-2 convs."""
    encoder_scale: str = "softplus"
    """How the encoder's raw output becomes sigma: softplus (stable) | exp (sigma = exp(r/2))."""
    output_bias: str = "data-mean"
    """Initial decoder output bias: data-mean (the likelihood's parameter for the training
    data's per-pixel mean) | none (the layer's own initialisation, as most examples do)."""
    init: str = "torch"
    """Weight initialisation (vaelab.models.INITS): torch (PyTorch's nn.Linear/Conv default) |
    glorot (Keras: glorot-uniform weights, zero biases) | he (N(0, 2 / fan_in) weights,
    Tomczak & Welling's VampPrior code)."""
    gated: bool = False
    """MLP: gated dense layers h(x) * sigmoid(g(x)) (Dauphin et al. 2017; the VampPrior
    paper's architecture) instead of Linear + activation."""


@dataclass(frozen=True)
class PriorConfig:
    """The prior p(z); see :mod:`vaelab.priors`."""

    name: str = "normal"
    """normal (N(0, I)) | vampprior (Tomczak & Welling 2018) | mog (learned mixture)."""
    components: int | None = None
    """Mixture components K: pseudo-inputs of the VampPrior (default 500) or Gaussians of
    mog (default 10)."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective. The *reported* ELBO always has beta = 1."""

    kind: str = "elbo"
    """elbo (with beta, warm-up, free bits, `samples` Monte-Carlo samples) | iwae (k = `samples`)."""
    samples: int = 1
    beta: float = 1.0
    warmup_steps: int = 0
    """Linear KL warm-up from 0 to beta over this many optimizer steps."""
    warmup_epochs: int = 0
    """Linear KL warm-up over epochs: beta * min(1, epoch / warmup_epochs), epochs from 1,
    constant within an epoch (Tomczak & Welling 2018)."""
    free_bits: float = 0.0
    """Nats per latent dimension below which the KL is not penalised (Kingma et al. 2016)."""
    kl: str = "auto"
    """auto | analytic | mc."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    """adam | rmsprop (torch.optim, PyTorch's defaults but lr and adam_eps)."""
    lr: float = 1e-3
    adam_eps: float | None = None
    """Adam's epsilon; None = 1e-4 with the iwae schedule (Burda et al.), else 1e-8
    (PyTorch's default; Keras uses 1e-7)."""
    lr_schedule: str = "constant"
    """constant | iwae (Burda et al.: 3^i epochs at lr * 10^(-i/7)) | cosine | multistep
    (PyTorch's MultiStepLR stepped once per epoch); see :mod:`vaelab.schedules`."""
    lr_milestones: tuple[int, ...] = ()
    """multistep: epochs (0-based counts of finished epochs) at which lr is multiplied by lr_gamma."""
    lr_gamma: float = 0.1
    """multistep: the factor applied at each milestone."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None = no clipping."""
    patience: int | None = None
    """Early stopping: stop after this many epochs without a better validation ELBO."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    threads: int | None = None
    """torch CPU threads; None = vaelab's choice from the free cores (vaelab.threads)."""
    eval_batch_size: int = 1000
    validation_split: str = "validation"
    """Evaluated after every epoch: validation (held out from training) | test (what the
    Keras and PyTorch examples print every epoch; then select must be last)."""
    select: str = "best"
    """The checkpoint called best: best (lowest validation NELBO, as pythae) | last."""


@dataclass(frozen=True)
class EvalConfig:
    """The final report written by `vaelab train` (and defaults of `vaelab eval`)."""

    iw_samples: int = 1000
    """Importance samples for the log-likelihood estimate (5000 = the IWAE paper protocol)."""
    batch_size: int = 100
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str | None = None


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "likelihood": LikelihoodConfig,
    "model": ModelConfig,
    "prior": PriorConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

#: The code or paper each preset follows (the report names it); ``default`` is vaelab's own.
PRESET_SOURCES: dict[str, str] = {
    "default": "vaelab's own defaults",
    "pytorch-example": "pytorch/examples vae/main.py",
    "keras-example": "the Keras VAE example, examples/variational_autoencoder.py (MLP)",
    "mnist-vae": "Rezende & Mohamed (2015) as pythae reproduced it (benchmark_VAE vae.py)",
    "mnist-vampprior": "Tomczak & Welling (2018) as pythae reproduced it (benchmark_VAE "
                       "vamp.py)",
    "iwae-paper": "Burda, Grosse & Salakhutdinov (2016), yburda/iwae",
    "cifar10": "vaelab's conv model with the PixelCNN++ likelihood (Salimans et al. 2017)",
}

PRESETS: dict[str, dict[str, Any]] = {
    # The default run: Fashion-MNIST, Bernoulli likelihood on dynamically binarised images.
    "default": {},
    # The PyTorch examples repository's VAE (pytorch/examples, vae/main.py), as it trains:
    # MNIST grey levels (transforms.ToTensor), all 60,000 training images, 784-400-20 ReLU
    # MLP with PyTorch's default nn.Linear initialisation, sigma = exp(logvar / 2), a
    # sigmoid output and F.binary_cross_entropy summed over pixels (not a likelihood on grey
    # levels), Adam(1e-3, eps 1e-8), batch 128, 10 epochs, the test loss printed after every
    # epoch (the last epoch kept).
    "pytorch-example": {
        "data": {"dataset": "mnist", "binarize": "none", "validation_size": 0},
        "likelihood": {"name": "bernoulli", "unnormalized": True, "output": "torch-probs"},
        "model": {"kind": "mlp", "latent_dim": 20, "hidden": [400], "activation": "relu",
                  "encoder_scale": "exp", "init": "torch", "output_bias": "none"},
        "train": {"batch_size": 128, "lr": 1e-3, "adam_eps": 1e-8, "epochs": 10,
                  "validation_split": "test", "select": "last"},
    },
    # The Keras VAE example (keras-team/keras examples/variational_autoencoder.py, Keras
    # 2.2.4, MLP version) as it trains: MNIST / 255, all 60,000 training images, 784-512-2
    # ReLU with Keras' glorot-uniform weights and zero biases, sigma = exp(z_log_var / 2),
    # 784 * mean binary_crossentropy (sigmoid output clipped to [1e-7, 1 - 1e-7]) + summed
    # KL, Adam (Keras' defaults: 1e-3, eps 1e-7), batch 128, 50 epochs, validation_data =
    # the test set (the last epoch kept).
    "keras-example": {
        "data": {"dataset": "mnist", "binarize": "none", "validation_size": 0},
        "likelihood": {"name": "bernoulli", "unnormalized": True, "output": "keras-probs"},
        "model": {"kind": "mlp", "latent_dim": 2, "hidden": [512], "activation": "relu",
                  "encoder_scale": "exp", "init": "glorot", "output_bias": "none"},
        "train": {"batch_size": 128, "lr": 1e-3, "adam_eps": 1e-7, "epochs": 50,
                  "validation_split": "test", "select": "last"},
    },
    # Rezende & Mohamed (2015, Table 2: 89.9 nats) as pythae reproduced it (89.78 nats with
    # 200 importance samples; clementchadebec/benchmark_VAE,
    # examples/scripts/reproducibility/vae.py): 784-400-40 ReLU MLP, sigma = exp(logvar / 2)
    # with an unbounded log-variance, Bernoulli, PyTorch's default initialisation, Adam
    # 1e-4 (eps 1e-8), batch 100, 500 epochs, MultiStepLR(milestones 200, 350, 500, 750,
    # 1000; gamma 10^(-1/5)) stepped per epoch, the best validation NELBO kept (pythae's
    # BaseTrainer). pythae uses Larochelle's binarized MNIST (50k/10k/10k); here MNIST with
    # one seeded static draw and 10,000 training images held out for validation.
    "mnist-vae": {
        "data": {"dataset": "mnist", "binarize": "static", "validation_size": 10000},
        "likelihood": {"name": "bernoulli"},
        "model": {"kind": "mlp", "latent_dim": 40, "hidden": [400], "activation": "relu",
                  "encoder_scale": "exp", "output_bias": "none"},
        "train": {"batch_size": 100, "lr": 1e-4, "epochs": 500, "lr_schedule": "multistep",
                  "lr_milestones": [200, 350, 500, 750, 1000], "lr_gamma": 10 ** (-1 / 5)},
        "eval": {"iw_samples": 5000},
    },
    # The VampPrior (Tomczak & Welling 2018, Table 1: 85.57 nats) as pythae reproduced it
    # (85.79 with 5000 importance samples; clementchadebec/benchmark_VAE,
    # examples/scripts/reproducibility/vamp.py): gated dense 784-300-300-40 encoder and
    # 40-300-300-784 decoder, log-variance through Hardtanh(-6, 2), He-initialised weights,
    # 500 pseudo-inputs (N(0.05, 0.01) through Hardtanh(0, 1), the paper's code), KL warm-up
    # over 100 epochs, RMSprop 1e-4 (pythae's script uses RMSprop, not Adam), batch 100,
    # 2000 epochs, the same MultiStepLR as mnist-vae, the best validation NELBO kept.
    "mnist-vampprior": {
        "data": {"dataset": "mnist", "binarize": "static", "validation_size": 10000},
        "likelihood": {"name": "bernoulli"},
        "model": {"kind": "mlp", "latent_dim": 40, "hidden": [300, 300], "gated": True,
                  "encoder_scale": "logvar-hardtanh", "init": "he", "output_bias": "none"},
        "prior": {"name": "vampprior", "components": 500},
        "objective": {"warmup_epochs": 100},
        "train": {"batch_size": 100, "optimizer": "rmsprop", "lr": 1e-4, "epochs": 2000,
                  "lr_schedule": "multistep", "lr_milestones": [200, 350, 500, 750, 1000],
                  "lr_gamma": 10 ** (-1 / 5)},
        "eval": {"iw_samples": 5000},
    },
    # Burda, Grosse & Salakhutdinov 2016 (IWAE): MNIST, dynamic binarisation, 400 training
    # images held out (yburda/iwae README), 784-200-200-50 tanh, batch 20, Adam(1e-3, eps
    # 1e-4) with 3^i epochs at lr 1e-3 * 10^(-i/7), i = 0..7 (3280 epochs).
    # `objective.kind` elbo (VAE) or iwae with k = objective.samples.
    "iwae-paper": {
        "data": {"dataset": "mnist", "binarize": "dynamic", "validation_size": 400},
        "likelihood": {"name": "bernoulli"},
        "model": {"kind": "mlp", "latent_dim": 50, "hidden": [200, 200], "activation": "tanh"},
        "objective": {"kind": "iwae", "samples": 5},
        "train": {"batch_size": 20, "lr": 1e-3, "lr_schedule": "iwae", "adam_eps": 1e-4,
                  "epochs": 3280},
        "eval": {"iw_samples": 5000},
    },
    # CIFAR-10 (32x32 RGB, 8-bit; 45,000 training images after the 5,000 held out for
    # validation) with the 10-component discretised logistic mixture of PixelCNN++ (an exact
    # likelihood of the 8-bit values: the report's bits/dim are of the data itself, no
    # dequantisation offset). The conv model of models.conv.sized_for((3, 32, 32)): stages of
    # 32, 64, 128 channels (32 -> 16 -> 8 -> 4) with two pre-activation residual blocks each,
    # its mirror with transposed convs, a 1x1 output layer to 4 * 10 * 3 = 120 channels;
    # latent 128 (a 32x32 colour image holds far more than MNIST's 16-50 dimensions can
    # carry; 4 x 4 x 128 features -> 2 x 128). Adam 1e-3 (PyTorch's default rate; stable
    # without normalisation layers in a 200-step check on synthetic images at 5e-4, 1e-3 and
    # 2e-3), batch 128, 30 epochs: about 4 minutes per epoch on 2 CPU cores (README,
    # Performance). Evaluation: K = 100 importance samples on the 10,000 test images, one
    # image per batch so that a chunk holds its 100 decoded samples (49 MB of mixture
    # parameters; with batches of 100 a chunk of 4,000 decodes took 6 GB and 1.8x the time):
    # 10^6 decoder passes, about half an hour on 2 cores. Validation batches of 250 images
    # (1000 would hold 0.5 GB of mixture parameters and several GB of intermediates).
    "cifar10": {
        "data": {"dataset": "cifar10", "binarize": "none", "validation_size": 5000},
        "likelihood": {"name": "discretized-logistic-mixture", "components": 10},
        "model": {"kind": "conv", "latent_dim": 128, "channels": [32, 64, 128], "blocks": 2,
                  "hidden": [], "activation": "relu"},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 30, "eval_batch_size": 250},
        "eval": {"iw_samples": 100},
    },
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
    """Convert a TOML/CLI value to the field's declared type, or raise ConfigError."""
    where = f"{section}.{key}"
    optional = "None" in annotation
    textual = annotation.startswith(("str", "float | str"))
    if value is None or (
        not textual and isinstance(value, str) and value.lower() in ("none", "null", "")
    ):
        if optional:
            return None
        raise ConfigError(f"{where} cannot be empty: give a value of type {annotation}")
    try:
        if annotation.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(int(v) for v in value)
        if annotation == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation.startswith("float | str"):
            try:
                return float(value)
            except (TypeError, ValueError):
                return str(value)
        if annotation.startswith("float"):
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if annotation.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where} = {value!r} is not a valid {annotation}: give e.g. "
            f"{section}.{key}={_example(annotation)}"
        ) from None
    return value


def _example(annotation: str) -> str:
    if annotation.startswith("tuple"):
        return "512,256"
    return {"bool": "true", "int": "10", "float": "0.5"}.get(annotation.split(" ")[0], "name")


def _check_keys(section: str, given: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in fields(cls)]
    for key in given:
        if key not in valid:
            raise ConfigError(
                f"unknown config key {section}.{key}: valid keys in [{section}] are "
                + ", ".join(valid)
            )


def from_dict(raw: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested dict (TOML layout) on ``base`` and validate the result."""
    base = base or RunConfig()
    updates: dict[str, Any] = {}
    for section, values in raw.items():
        if section == "preset":
            updates["preset"] = values
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{section}]: valid sections are "
                + ", ".join(SECTIONS)
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value pairs")
        cls = SECTIONS[section]
        _check_keys(section, values, cls)
        annotations = {f.name: str(f.type) for f in fields(cls)}
        coerced = {k: _coerce(section, k, v, annotations[k]) for k, v in values.items()}
        updates[section] = dataclasses.replace(getattr(base, section), **coerced)
    cfg = dataclasses.replace(base, **updates)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists, None values dropped) for TOML/JSON."""
    out: dict[str, Any] = {}
    if cfg.preset is not None:
        out["preset"] = cfg.preset
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        out[section] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None
        }
    return out


def to_toml(cfg: RunConfig) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path given to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix the syntax") from None


def parse_override(text: str) -> dict[str, Any]:
    """``"model.latent_dim=32"`` -> ``{"model": {"latent_dim": "32"}}`` (coerced later)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override {text!r} is not of the form section.key=value: e.g. model.latent_dim=32"
        )
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    return {section: {name: value.strip()}}


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
    return out


def resolve(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then ``preset``, then the TOML ``file``, then ``extra`` (named CLI flags),
    then ``section.key=value`` ``overrides``. Later layers win."""
    preset, layers = _layers(preset, file, overrides, extra)
    raw = merge(*layers)
    raw["preset"] = preset
    return from_dict(raw)


def given_keys(preset: str | None = None, file: str | Path | None = None,
               overrides: list[str] | tuple[str, ...] = (),
               extra: dict[str, Any] | None = None) -> set[str]:
    """The ``section.key`` names that :func:`resolve` with these arguments takes from a
    preset, a file, named flags or ``--set`` rather than from the defaults."""
    return {f"{section}.{key}" for layer in _layers(preset, file, overrides, extra)[1]
            for section, values in layer.items() if isinstance(values, dict) for key in values}


def _layers(preset: str | None, file: str | Path | None, overrides: list[str] | tuple[str, ...],
            extra: dict[str, Any] | None) -> tuple[str | None, list[dict[str, Any]]]:
    """The preset's name (given, or named by the file) and the layers over the defaults, in
    the order :func:`resolve` merges them."""
    file_layer = load_toml(file) if file is not None else {}
    preset = preset or file_layer.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    layers = [PRESETS[preset] if preset else {}, file_layer, extra or {}]
    return preset, layers + [parse_override(o) for o in overrides]


# Values that are not registry names (those are checked by their registries: the schedule
# here, as it needs no torch; likelihood, model, activation, encoder scale, init, objective
# kind and optimizer when the run is built, before anything is written).
_CHOICES = {
    ("data", "binarize"): BINARIZE_MODES,
    ("objective", "kl"): KL_MODES,
    ("model", "output_bias"): OUTPUT_BIAS_MODES,
    ("train", "validation_split"): VALIDATION_SPLITS,
    ("train", "select"): SELECTIONS,
}


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for impossible values (names are checked by their registries)."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r} is not one of {', '.join(choices)}")
    positive = {
        "model.latent_dim": cfg.model.latent_dim,
        "objective.samples": cfg.objective.samples,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "eval.iw_samples": cfg.eval.iw_samples,
        "eval.batch_size": cfg.eval.batch_size,
        "train.lr": cfg.train.lr,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}: give a value > 0")
    for name, value in {
        "objective.beta": cfg.objective.beta,
        "objective.free_bits": cfg.objective.free_bits,
        "objective.warmup_steps": cfg.objective.warmup_steps,
        "objective.warmup_epochs": cfg.objective.warmup_epochs,
        "data.validation_size": cfg.data.validation_size,
        "model.blocks": cfg.model.blocks,
    }.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}: give a value >= 0")
    for name, value in {
        "model.hidden": cfg.model.hidden,
        "model.channels": cfg.model.channels,
    }.items():
        if any(v <= 0 for v in value):
            raise ConfigError(f"{name} sizes must be positive, got {list(value)}: give "
                              f"layer sizes > 0, e.g. {name}=512,256")
    for name, value in {
        "data.train_limit": cfg.data.train_limit,
        "data.test_limit": cfg.data.test_limit,
        "train.patience": cfg.train.patience,
        "train.grad_clip": cfg.train.grad_clip,
        "train.threads": cfg.train.threads,
        "train.adam_eps": cfg.train.adam_eps,
        "likelihood.components": cfg.likelihood.components,
    }.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive (or unset), got {value}")
    if cfg.train.validation_split == "test" and (cfg.train.select == "best"
                                                  or cfg.train.patience is not None):
        raise ConfigError(
            "train.validation_split = test evaluates on the test split every epoch, so the "
            "best epoch or early stopping would be chosen on test data: set train.select=last "
            "and unset train.patience, or validate on a held-out split")
    if cfg.train.patience is not None and cfg.data.validation_size == 0:
        raise ConfigError(
            "train.patience needs a validation split to watch: set data.validation_size > 0 "
            "or unset train.patience"
        )
    SCHEDULES[cfg.train.lr_schedule]  # an unknown name lists the registered schedules
    if cfg.objective.warmup_steps and cfg.objective.warmup_epochs:
        raise ConfigError("KL warm-up is in steps or in epochs, not both: set "
                          "objective.warmup_steps or objective.warmup_epochs to 0")
    if not cfg.train.lr_gamma > 0 or any(m < 0 for m in cfg.train.lr_milestones):
        raise ConfigError(f"train.lr_gamma must be > 0 and train.lr_milestones >= 0, got "
                          f"{cfg.train.lr_gamma} and {list(cfg.train.lr_milestones)}")
    if cfg.objective.kind == "iwae" and (cfg.objective.beta != 1.0 or cfg.objective.free_bits):
        raise ConfigError(
            "objective.kind = iwae does not use beta or free bits: leave them at 1 and 0"
        )
