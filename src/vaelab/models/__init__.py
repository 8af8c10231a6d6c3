"""Encoders, decoders and the VAE module (returns q(z|x), p(z) and p(x|z)).

    from vaelab import likelihoods, models
    model = models.build_model("mlp", (1, 28, 28), 20, likelihoods.get("bernoulli"))
    qz = model.encode(x)                  # Independent(Normal (B, L)), 1)
    px = model.decode(qz.rsample())       # the family's distribution, log_prob -> (B,)
"""

from __future__ import annotations

from .conv import ConvDecoder, ConvEncoder, ResidualBlock, conv_feature_size, sized_for
from .init import INITS, initialise
from .mlp import ACTIVATIONS, GatedDense, MLPDecoder, MLPEncoder, make_activation
from .vae import (
    ENCODER_SCALES,
    MODELS,
    VAE,
    build_from_config,
    build_model,
    from_config,
    num_parameters,
)

__all__ = [
    "MODELS",
    "ACTIVATIONS",
    "ENCODER_SCALES",
    "INITS",
    "initialise",
    "build_from_config",
    "GatedDense",
    "ResidualBlock",
    "conv_feature_size",
    "sized_for",
    "VAE",
    "build_model",
    "from_config",
    "num_parameters",
    "make_activation",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
]
