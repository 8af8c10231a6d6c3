"""Weight initialisations (a registry): what a layer holds before training.

Each entry takes a module and re-initialises the weights of its ``nn.Linear`` and
convolution layers in place (draws from torch's global RNG, which the trainer seeds
before building the model):

==========  ==========================================================================
``torch``   leave PyTorch's defaults (``kaiming_uniform_(a=sqrt(5))`` weights, uniform
            biases in :math:`\\pm 1/\\sqrt{\\text{fan\\_in}}`): the PyTorch examples, pythae
``glorot``  Keras' defaults: ``glorot_uniform`` weights (:math:`U(\\pm\\sqrt{6 /
            (\\text{fan\\_in} + \\text{fan\\_out})})`) and zero biases
``he``      :math:`N(0, 2 / \\text{fan\\_in})` weights, biases left at PyTorch's default:
            ``he_init`` of Tomczak & Welling's VampPrior code (and pythae's vamp.py)
==========  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..registry import Registry

__all__ = ["INITS", "initialise"]

INITS: Registry[Callable[[nn.Module], None]] = Registry("init")
_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _layers(module: nn.Module):
    return (m for m in module.modules() if isinstance(m, _LAYERS))


@INITS.register("torch")
def _torch(module: nn.Module) -> None:
    """PyTorch's own initialisation, as the layers were built."""


@INITS.register("glorot")
def _glorot(module: nn.Module) -> None:
    for layer in _layers(module):
        nn.init.xavier_uniform_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


@INITS.register("he")
def _he(module: nn.Module) -> None:
    for layer in _layers(module):
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_in))


def initialise(module: nn.Module, name: str) -> None:
    """Apply the registered initialisation ``name`` to ``module``'s layers in place.

    Raises:
        ConfigError: an unknown name (the message lists the registered ones).
    """
    INITS[name](module)
