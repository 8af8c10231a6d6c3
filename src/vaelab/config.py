"""Run configuration: one frozen dataclass per section, components that own their options.

A run is described by a :class:`RunConfig`, built from defaults, then a preset
(``configs/<name>.toml``), then a TOML file, then named flags, then ``--set
section.key=value`` overrides. The resolved config is saved with every run and checkpoint
(``config.toml``), so a run can always be rebuilt.

Components own their options. Four sections choose a registered kind and hold that kind's
own options in a sub-section, declared beside the kind as a frozen dataclass with its
constraints (:mod:`vaelab.options`)::

    [prior]
    name = "vampprior"          # the chosen kind
    [prior.vampprior]           # its options: vaelab.priors.VampPriorOptions
    components = 500

==============  ==============  ============================================================
section         kind key        kinds (registry)
==============  ==============  ============================================================
``likelihood``  ``name``        :data:`vaelab.likelihoods.LIKELIHOODS`
``prior``       ``name``        :data:`vaelab.priors.PRIORS`
``model``       ``kind``        :data:`vaelab.models.MODELS`
``posterior``   ``flow``        :data:`vaelab.posteriors.FLOWS`
``eval``        ``estimator``   :data:`vaelab.estimators.ESTIMATORS`
==============  ==============  ============================================================

Only the chosen kind's options are used and their values checked, so switching kinds never
needs the old kind's options unset (``--preset mnist-vampprior --set prior.name=normal``
works). Option names of other kinds are still checked, so a typo is an error. A flat
``section.option`` (``--set model.hidden=400``, ``--set prior.components=50``) is shorthand
for the chosen kind's option; it is an error when that kind has no such option. Configs
written by vaelab before components owned their options (flat keys) are migrated when read
(:func:`from_dict` with ``saved=True``).

Unknown sections and keys are errors listing the valid ones. Example::

    cfg = resolve(preset="pytorch-example", overrides=["train.epochs=3"])
    cfg.model.latent_dim            # 20
    cfg.model.options.hidden        # (400,)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .options import (
    boolean,
    build,
    check_keys,
    non_negative,
    one_of,
    option,
    optional,
    positive,
    to_plain,
)
from .schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BINARIZE_MODES",
    "KL_MODES",
    "OUTPUT_BIAS_MODES",
    "PRECISIONS",
    "VALIDATION_SPLITS",
    "SELECTIONS",
    "COMPONENTS",
    "DataConfig",
    "LikelihoodConfig",
    "ModelConfig",
    "PriorConfig",
    "PosteriorConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "PRESETS",
    "PRESET_SOURCES",
    "PRESETS_DIR",
    "defaults",
    "resolve",
    "from_dict",
    "to_dict",
    "to_toml",
    "load_toml",
    "parse_override",
    "merge",
    "given_keys",
    "kind_options",
]


#: How grey levels become model inputs (see :func:`vaelab.data.load`).
BINARIZE_MODES = ("none", "dynamic", "static")
#: How the KL term is computed (:data:`vaelab.objectives.KL_MODES`, repeated here so that
#: reading a config needs no torch; a test keeps the two equal).
KL_MODES = ("auto", "analytic", "mc")
#: How the decoder's output bias starts (see :class:`ModelConfig`).
OUTPUT_BIAS_MODES = ("data-mean", "none")
#: The arithmetic of the training step's forward and backward (see :class:`TrainConfig`).
PRECISIONS = ("fp32", "bf16", "fp16")
#: Which split the trainer evaluates after every epoch, and which checkpoint is "best".
VALIDATION_SPLITS = ("validation", "test")
SELECTIONS = ("best", "last")


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how they are turned into model inputs."""

    dataset: str = option("fashion-mnist", None, "a registered name (mnist, fashion-mnist, "
                          "kmnist, binarized-mnist, cifar10, svhn), a .npz/.npy file or a "
                          "folder of images")
    data_dir: str | None = option(None, None, "a folder holding the dataset's files")
    binarize: str = option("dynamic", one_of(*BINARIZE_MODES), "none | dynamic (a fresh "
                           "Bernoulli draw per example per epoch) | static (one fixed draw)")
    validation_size: int = option(5000, non_negative, "training examples held out for "
                                  "validation")
    train_limit: int | None = option(None, optional(positive), "use only the first N "
                                     "training examples (quick runs and tests); unset = all")
    test_limit: int | None = option(None, optional(positive), "evaluate only the first N "
                                    "test examples; unset = all")
    image_size: str | None = option(None, None, "your own images: resize to N x N or HxW "
                                    "(shorter side, antialiased, then centre crop)")
    channels: str = option("auto", None, "your own images: auto (colour if any image is, "
                           "else grey) | 1 | 3")
    layout: str = option("auto", None, ".npy/.npz arrays: auto (detected when unambiguous) | "
                         "nchw | nhwc")
    test_size: float | None = option(None, None, "your own data: the held-out test part, a "
                                     "fraction < 1 or a count (default 10%, at most 10,000; "
                                     "0 = none); ignored with test_dataset")
    test_dataset: str | None = option(None, None, "your own data: a separate file or folder "
                                      "for the test split")
    cache: bool = option(True, boolean, "folders of images: reuse the cache of decoded images")


@dataclass(frozen=True)
class LikelihoodConfig:
    """The decoder's output distribution p(x|z); see :mod:`vaelab.likelihoods`."""

    name: str = option("bernoulli", None, "the family (vaelab.likelihoods.LIKELIHOODS)")
    options: Any = None
    """The family's options ([likelihood.<name>]), filled by :func:`from_dict`."""
    sections: Any = field(default=None, compare=False, repr=False)
    """Every kind's section given so far (for a later switch of kind; not saved)."""


@dataclass(frozen=True)
class ModelConfig:
    """Encoder/decoder architecture; see :mod:`vaelab.models`."""

    kind: str = option("mlp", None, "the architecture (vaelab.models.MODELS): mlp | conv")
    latent_dim: int = option(16, positive, "latent dimensions L")
    activation: str = option("relu", None, "vaelab.models.ACTIVATIONS")
    encoder_scale: str = option("softplus", None, "how the encoder's raw output becomes "
                                "sigma: softplus (stable) | exp | logvar-hardtanh")
    output_bias: str = option("data-mean", one_of(*OUTPUT_BIAS_MODES), "initial decoder "
                              "output bias: data-mean (the likelihood's parameter for the "
                              "training data's per-pixel mean) | none (the layer's own init)")
    init: str = option("torch", None, "weight initialisation (vaelab.models.INITS): torch | "
                       "glorot (Keras) | he (Tomczak & Welling's VampPrior code)")
    options: Any = None
    """The architecture's options ([model.<kind>]), filled by :func:`from_dict`."""
    sections: Any = field(default=None, compare=False, repr=False)
    """Every kind's section given so far (for a later switch of kind; not saved)."""


@dataclass(frozen=True)
class PriorConfig:
    """The prior p(z); see :mod:`vaelab.priors`."""

    name: str = option("normal", None, "normal (N(0, I)) | vampprior (Tomczak & Welling "
                       "2018) | mog (learned mixture)")
    options: Any = None
    """The prior's options ([prior.<name>]), filled by :func:`from_dict`."""
    sections: Any = field(default=None, compare=False, repr=False)
    """Every kind's section given so far (for a later switch of kind; not saved)."""


@dataclass(frozen=True)
class PosteriorConfig:
    """q(z|x) beyond the encoder's diagonal Gaussian; see :mod:`vaelab.posteriors`."""

    flow: str = option("none", None, "none (the diagonal Gaussian) | planar (Rezende & "
                       "Mohamed 2015): a normalizing flow with parameters from the encoder | "
                       "iaf (inverse autoregressive flow, Kingma et al. 2016): MADE steps "
                       "with weights of their own, conditioned on a context from the encoder")
    options: Any = None
    """The flow's options ([posterior.<flow>]), filled by :func:`from_dict`."""
    sections: Any = field(default=None, compare=False, repr=False)
    """Every kind's section given so far (for a later switch of kind; not saved)."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective. The *reported* ELBO always has beta = 1."""

    kind: str = option("elbo", None, "elbo (with beta, warm-up, free bits, `samples` "
                       "Monte-Carlo samples) | iwae (k = `samples`)")
    samples: int = option(1, positive, "z samples per example: L for elbo, k for iwae")
    beta: float = option(1.0, non_negative, "KL weight in the objective (reports use 1)")
    warmup_steps: int = option(0, non_negative, "linear KL warm-up from 0 to beta over this "
                               "many optimizer steps")
    warmup_epochs: int = option(0, non_negative, "linear KL warm-up over epochs: beta * "
                                "min(1, epoch / warmup_epochs), epochs from 1 (Tomczak & "
                                "Welling 2018)")
    free_bits: float = option(0.0, non_negative, "nats per latent dimension below which the "
                              "KL is not penalised (Kingma et al. 2016)")
    kl: str = option("auto", one_of(*KL_MODES), "auto | analytic | mc")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = option(10, positive, "")
    batch_size: int = option(128, positive, "")
    optimizer: str = option("adam", None, "adam | rmsprop (torch.optim, PyTorch's defaults but "
                            "lr and adam_eps)")
    lr: float = option(1e-3, positive, "learning rate")
    adam_eps: float | None = option(None, optional(positive), "Adam's epsilon; unset = 1e-4 "
                                    "with the iwae schedule (Burda et al.), else 1e-8")
    lr_schedule: str = option("constant", None, "constant | iwae | cosine | multistep "
                              "(vaelab.schedules)")
    lr_milestones: tuple[int, ...] = option((), None, "multistep: epochs (0-based counts of "
                                            "finished epochs) at which lr is multiplied by "
                                            "lr_gamma")
    lr_gamma: float = option(0.1, positive, "multistep: the factor applied at each milestone")
    grad_clip: float | None = option(None, optional(positive), "clip the global gradient "
                                     "norm to this value; unset = no clipping")
    patience: int | None = option(None, optional(positive), "early stopping: stop after this "
                                  "many epochs without a better validation ELBO")
    seed: int = option(0, None, "")
    device: str = option("auto", None, "auto (cuda when available) | cpu | cuda | cuda:N")
    threads: int | None = option(None, optional(positive), "torch CPU threads; unset = "
                                 "vaelab's choice from the free cores (vaelab.threads)")
    eval_batch_size: int = option(1000, positive, "batch size of the per-epoch validation")
    validation_split: str = option("validation", one_of(*VALIDATION_SPLITS), "evaluated after "
                                   "every epoch: validation | test (what the Keras and "
                                   "PyTorch examples print; then select must be last)")
    select: str = option("best", one_of(*SELECTIONS), "the checkpoint called best: best "
                         "(lowest validation NELBO, as pythae) | last")
    precision: str = option("fp32", one_of(*PRECISIONS), "the training step's arithmetic: "
                            "fp32 | bf16 (autocast: matrix products in bfloat16; CPU or CUDA) | "
                            "fp16 (CUDA only, with a gradient scaler); weights, optimizer "
                            "state, the objective's sums, evaluation and every reported "
                            "number stay float32")
    compile: bool = option(False, boolean, "run the training objective (the model's forward, "
                           "the likelihood, the KL and their backward) through "
                           "torch.compile: up to 1.2x faster epochs (most MLP presets, 2 CPU "
                           "cores) after 10-25 s of compilation (needs a C++ compiler on "
                           "CPU); the same objective to float32 rounding")


@dataclass(frozen=True)
class EvalConfig:
    """The final report of `vaelab train` (and the defaults of `vaelab eval`)."""

    estimator: str = option("auto", None, "how -log p(x) is estimated "
                            "(vaelab.estimators.ESTIMATORS): auto (exact quadrature for 1-2 "
                            "latent dimensions, else importance sampling corrected by AIS on "
                            "a subsample) | quadrature | is-ais | is | ais")
    batch_size: int = option(100, positive, "examples per evaluation batch")
    seed: int = option(0, None, "seed of the evaluation's draws")
    options: Any = None
    """The estimator's options ([eval.<estimator>]), filled by :func:`from_dict`."""
    sections: Any = field(default=None, compare=False, repr=False)
    """Every kind's section given so far (for a later switch of kind; not saved)."""


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str | None = None


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "likelihood": LikelihoodConfig,
    "model": ModelConfig,
    "prior": PriorConfig,
    "posterior": PosteriorConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

#: The sections that choose a registered kind: section -> the field naming the kind.
COMPONENTS: dict[str, str] = {"likelihood": "name", "prior": "name", "model": "kind",
                              "posterior": "flow", "eval": "estimator"}


def _registry(section: str) -> Any:
    """The registry of a component section (imported here, when a config is resolved: the
    registries import torch, and ``vaelab --help`` must not)."""
    if section == "likelihood":
        from .likelihoods import LIKELIHOODS

        return LIKELIHOODS
    if section == "prior":
        from .priors import PRIORS

        return PRIORS
    if section == "model":
        from .models import MODELS

        return MODELS
    if section == "posterior":
        from .posteriors import FLOWS

        return FLOWS
    from .estimators import ESTIMATORS

    return ESTIMATORS


def kind_options(section: str, kind: str) -> type:
    """The options dataclass of ``kind`` in the component ``section`` (ConfigError for an
    unknown kind, listing the registered ones)."""
    return _registry(section).options(kind)


# --------------------------------------------------------------------------- presets

#: The preset files: one TOML file per preset, each citing the source it follows.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def _load_presets() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    layers, sources = {}, {}
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        sources[path.stem] = raw.pop("source")
        layers[path.stem] = raw
    return layers, sources


#: name -> the preset's layer (the TOML file's sections); ``default`` is empty.
#: PRESET_SOURCES: name -> the code or paper it follows (the report names it).
PRESETS, PRESET_SOURCES = _load_presets()


# --------------------------------------------------------------------------- resolution

#: Keys that vaelab wrote flat before components owned their options, with the default it
#: wrote for them (dropped from a saved config when the chosen kind has no such option)
#: and the name they have now.
_LEGACY: dict[str, dict[str, tuple[Any, str]]] = {
    "likelihood": {"scale": (None, "scale"), "unnormalized": (False, "unnormalized"),
                   "output": (None, "output"), "components": (None, "components"),
                   "init_scale": (None, "init_scale"), "min_scale": (None, "min_scale")},
    "model": {"hidden": ([512, 256], "hidden"), "channels": ([32, 64], "channels"),
              "blocks": (0, "blocks"), "gated": (False, "gated")},
    "prior": {"components": (None, "components")},
    "eval": {"iw_samples": (None, "samples")},  # saved runs: estimator "is" (see from_dict)
}


def _section_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in ("options", "sections")]


def _shorthand(section: str, values: dict[str, Any], kind: str, saved: bool) -> dict[str, Any]:
    """Move flat option keys (``model.hidden``) into the chosen kind's sub-section; a saved
    config's old defaults for options the kind does not have are dropped."""
    own = set(_section_fields(SECTIONS[section]))
    flat = {k: v for k, v in values.items() if k not in own and not isinstance(v, dict)}
    if not flat:
        return values
    out = {k: v for k, v in values.items() if k not in flat}
    cls = kind_options(section, kind)
    known = {f.name for f in fields(cls)}
    nested = dict(out.get(kind) or {})
    for key, value in flat.items():
        legacy_default, name = _LEGACY.get(section, {}).get(key, (None, key))
        if name in known:
            nested.setdefault(name, value)
        elif saved and key in _LEGACY.get(section, {}) and value in (legacy_default, None):
            continue  # an old config wrote every field; this kind never used it
        else:
            _unknown_option(section, key, kind, own)
    out[kind] = nested
    return out


def _unknown_option(section: str, key: str, kind: str, own: set[str]) -> None:
    registry = _registry(section)
    having = [k for k in registry.names() if key in {f.name for f in fields(registry.options(k))}]
    if having:
        raise ConfigError(
            f"{section}.{key} is an option of the {' and '.join(having)} {registry.kind}"
            f"{'s' if len(having) > 1 else ''}, not of {kind!r}: set {section}.{having[0]}.{key} "
            f"(used when {section}.{COMPONENTS[section]} = {having[0]})")
    raise ConfigError(f"unknown config key {section}.{key}: valid keys in [{section}] are "
                      f"{', '.join(sorted(own))} and the [{section}.<{COMPONENTS[section]}>] "
                      f"options of each {registry.kind}")


def _component(section: str, values: dict[str, Any], base: Any, saved: bool) -> Any:
    """The section's dataclass from ``values`` over ``base``, with the chosen kind's options."""
    cls = SECTIONS[section]
    kind_key = COMPONENTS[section]
    if saved and section == "eval" and "iw_samples" in values and "estimator" not in values:
        values = {**values, "estimator": "is"}  # a run saved when importance sampling was all
    kind = str(values.get(kind_key, getattr(base, kind_key)))
    values = _shorthand(section, values, kind, saved)
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in values.items() if isinstance(v, dict)}
    for reserved in ("options", "sections"):
        if reserved in plain:
            raise ConfigError(f"unknown config key {section}.{reserved}: give the chosen kind's "
                              f"options as [{section}.<{kind_key}>], e.g. [{section}.{kind}]")
    resolved = build(_plain_class(cls), plain, section, base=_plain_part(base, cls))
    registry = _registry(section)
    for other, given in nested.items():  # every kind named must exist; its keys are checked
        if other not in registry:
            raise ConfigError(f"[{section}.{other}]: unknown {registry.kind} {other!r}: choose "
                              f"one of {', '.join(registry.names())}")
        check_keys(f"{section}.{other}", given, registry.options(other))
    chosen_kind = getattr(resolved, kind_key)
    sections = {k: dict(v) for k, v in (base.sections or {}).items()}
    for other, given in nested.items():
        sections[other] = {**sections.get(other, {}), **given}
    options_cls = registry.options(chosen_kind)
    if getattr(base, kind_key) == chosen_kind and isinstance(base.options, options_cls):
        start, given = base.options, nested.get(chosen_kind, {})
    else:  # a new kind: its defaults, then everything given for it in any layer
        start, given = None, sections.get(chosen_kind, {})
    chosen = build(options_cls, given, f"{section}.{chosen_kind}", base=start)
    return cls(**dataclasses.asdict(resolved), options=chosen, sections=sections)


_PLAIN_CLASSES: dict[type, type] = {}


def _plain_class(cls: type) -> type:
    """``cls`` without its ``options`` field (what :func:`vaelab.options.build` checks)."""
    if cls not in _PLAIN_CLASSES:
        keep = [(f.name, f.type, f) for f in fields(cls) if f.name not in ("options", "sections")]
        _PLAIN_CLASSES[cls] = dataclasses.make_dataclass(
            cls.__name__, [(name, tp, spec) for name, tp, spec in keep], frozen=True)
    return _PLAIN_CLASSES[cls]


def _plain_part(base: Any, cls: type) -> Any:
    plain = _plain_class(cls)
    return plain(**{name: getattr(base, name) for name in _section_fields(cls)})


_DEFAULTS: list[RunConfig] = []


def defaults() -> RunConfig:
    """The default configuration, every component's options filled in."""
    if not _DEFAULTS:
        _DEFAULTS.append(from_dict({}, RunConfig()))
    return _DEFAULTS[0]


def from_dict(raw: dict[str, Any], base: RunConfig | None = None, *,
              saved: bool = False) -> RunConfig:
    """Overlay a nested dict (the TOML layout) on ``base`` (default: :func:`defaults`) and
    validate the result. ``saved``: the dict is a config vaelab wrote (a run's
    ``config.toml`` or a checkpoint), possibly in the flat layout of older versions.

    Raises:
        ConfigError: an unknown section, key or kind (the valid ones listed), or a value
            that breaks its rule.
    """
    base = base if base is not None else RunConfig()
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
        if section in COMPONENTS:
            updates[section] = _component(section, values, getattr(base, section), saved)
        else:
            updates[section] = build(SECTIONS[section], values, section,
                                     base=getattr(base, section))
    for section in COMPONENTS:  # a bare base (RunConfig()) gets its kinds' default options
        current = updates.get(section, getattr(base, section))
        if current.options is None:
            updates[section] = _component(section, {}, current, saved)
    cfg = dataclasses.replace(base, **updates)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists, unset values left out) for TOML/JSON: every
    section, and in each component section the chosen kind's options only."""
    out: dict[str, Any] = {}
    if cfg.preset is not None:
        out["preset"] = cfg.preset
    for section in SECTIONS:
        value = getattr(cfg, section)
        plain = {k: getattr(value, k) for k in _section_fields(type(value))}
        out[section] = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in plain.items() if v is not None}
        options = (to_plain(value.options) if section in COMPONENTS and value.options is not None
                   else {})
        if options:
            out[section][getattr(value, COMPONENTS[section])] = options
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
    """``"model.latent_dim=32"`` -> ``{"model": {"latent_dim": "32"}}``;
    ``"prior.vampprior.components=50"`` -> ``{"prior": {"vampprior": {"components": "50"}}}``
    (values are coerced later)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override {text!r} is not of the form section.key=value: e.g. model.latent_dim=32"
        )
    key, value = text.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if len(parts) > 3 or not all(parts):
        raise ConfigError(f"override {text!r}: give section.key=value or "
                          "section.kind.key=value, e.g. prior.vampprior.components=500")
    layer: dict[str, Any] = {parts[-1]: value.strip()}
    for part in reversed(parts[:-1]):
        layer = {part: layer}
    return layer


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win, key by key, at every depth."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            elif isinstance(value, dict):
                out[key] = merge(value)
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
    """The dotted keys (``model.latent_dim``, ``model.conv.channels``) that :func:`resolve`
    with these arguments takes from a preset, a file, named flags or ``--set`` rather than
    from the defaults."""
    def walk(prefix: str, values: dict[str, Any]) -> set[str]:
        out: set[str] = set()
        for key, value in values.items():
            out |= walk(f"{prefix}.{key}", value) if isinstance(value, dict) else \
                {f"{prefix}.{key}"}
        return out

    return {key for layer in _layers(preset, file, overrides, extra)[1]
            for section, values in layer.items() if isinstance(values, dict)
            for key in walk(section, values)}


def _layers(preset: str | None, file: str | Path | None, overrides: list[str] | tuple[str, ...],
            extra: dict[str, Any] | None) -> tuple[str | None, list[dict[str, Any]]]:
    """The preset's name (given, or named by the file) and the layers over the defaults, in
    the order :func:`resolve` merges them."""
    file_layer = load_toml(file) if file is not None else {}
    preset = preset or file_layer.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} "
                          "(vaelab train --preset list shows them)")
    layers = [PRESETS[preset] if preset else {}, file_layer, extra or {}]
    return preset, layers + [parse_override(o) for o in overrides]


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for combinations that cannot work (single values are checked by
    their fields' rules; names by their registries)."""
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
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        raise ConfigError(
            "train.precision = fp16 needs a CUDA device (float16 autocast on a CPU is slow "
            "and needs a gradient scaler): use train.precision=bf16 on a CPU, or "
            "train.device=cuda")
    if cfg.objective.warmup_steps and cfg.objective.warmup_epochs:
        raise ConfigError("KL warm-up is in steps or in epochs, not both: set "
                          "objective.warmup_steps or objective.warmup_epochs to 0")
    if any(m < 0 for m in cfg.train.lr_milestones):
        raise ConfigError(f"train.lr_milestones must be >= 0, got {list(cfg.train.lr_milestones)}")
    if cfg.objective.kind == "iwae" and (cfg.objective.beta != 1.0 or cfg.objective.free_bits):
        raise ConfigError(
            "objective.kind = iwae does not use beta or free bits: leave them at 1 and 0"
        )

