"""Fully connected encoder and decoder, and the activation registry.

The encoder flattens ``x`` (``D = prod(event_shape)`` inputs) and maps it
through the hidden sizes to ``2 L`` outputs (location, raw scale). The decoder
mirrors the hidden sizes in reverse and outputs ``P * D`` numbers, reshaped
parameter-major to ``(N, P * C, *rest)`` for the likelihood family.

Well-known setups this expresses exactly (sizes are input-hidden-latent):

- PyTorch's ``examples/vae``: 784-400-20, ReLU (``hidden=(400,)``).
- Keras' ``variational_autoencoder.py``: 784-512-2, ReLU (``hidden=(512,)``).
- IWAE (Burda et al. 2016, sec. 5): encoder 784-200-200-50, decoder
  50-200-200-784, tanh (``hidden=(200, 200)``, ``activation="tanh"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..registry import Registry

__all__ = [
    "ACTIVATIONS",
    "make_activation",
    "dense_layers",
    "GatedDense",
    "check_sizes",
    "MLPEncoder",
    "MLPDecoder",
]

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
for _name, _factory in {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "leaky-relu": nn.LeakyReLU,
}.items():
    ACTIVATIONS.register(_name)(_factory)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by registry name; unknown names raise ConfigError."""
    return ACTIVATIONS[name]()


def check_sizes(what: str, sizes: Sequence[int], *, allow_empty: bool = True) -> tuple[int, ...]:
    """Return ``sizes`` as a tuple of positive ints or raise ConfigError naming ``what``."""
    sizes = tuple(sizes)
    bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s <= 0]
    if bad:
        raise ConfigError(
            f"model.{what} must be positive integers: {len(bad)} bad entries, e.g. {bad[0]!r}"
        )
    if not sizes and not allow_empty:
        raise ConfigError(f"model.{what} is empty: give at least one size")
    return sizes


class GatedDense(nn.Module):
    r"""A gated dense layer :math:`h(x) \odot \sigma(g(x))` with two ``nn.Linear`` maps
    (Dauphin et al. 2017; the encoder and decoder of Tomczak & Welling's VampPrior)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.h = nn.Linear(fan_in, fan_out)
        self.g = nn.Linear(fan_in, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def dense_layers(sizes: Sequence[int], activation: str, gated: bool = False) -> list[nn.Module]:
    """``Linear(sizes[i], sizes[i+1])`` each followed by the activation (also the last), or
    with ``gated`` a :class:`GatedDense` layer each (its gate is the non-linearity)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        if gated:
            layers.append(GatedDense(fan_in, fan_out))
        else:
            layers += [nn.Linear(fan_in, fan_out), make_activation(activation)]
    return layers


class MLPEncoder(nn.Sequential):
    """``x (B, *event_shape) -> (B, 2 L + extra)``: flatten, hidden layers, linear head
    (``extra``: a posterior flow's parameters)."""

    def __init__(
        self, event_shape: tuple[int, ...], latent_dim: int, hidden: Sequence[int],
        activation: str, gated: bool = False, extra: int = 0,
    ) -> None:
        d = math.prod(event_shape)
        super().__init__(
            nn.Flatten(),
            *dense_layers((d, *hidden), activation, gated),
            nn.Linear(hidden[-1] if hidden else d, 2 * latent_dim + extra),
        )


class MLPDecoder(nn.Sequential):
    """``z (N, L) -> params (N, P * C, *rest)``, parameter-major (see docs/design.md)."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        params_per_channel: int,
        hidden: Sequence[int],
        activation: str,
        gated: bool = False,
    ) -> None:
        rev = tuple(reversed(tuple(hidden)))
        d = math.prod(event_shape)
        out_shape = (params_per_channel * event_shape[0], *event_shape[1:])
        super().__init__(
            *dense_layers((latent_dim, *rev), activation, gated),
            nn.Linear(rev[-1] if rev else latent_dim, params_per_channel * d),
            nn.Unflatten(1, out_shape),
        )
        self.out_shape = out_shape

    @property
    def output_layer(self) -> nn.Linear:
        """The last Linear layer; its bias is the decoder's output bias."""
        return self[-2]

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Copy ``bias (P * C, *rest)`` into the last layer's bias (flattened, same order)."""
        if tuple(bias.shape) != self.out_shape:
            raise DataError(
                f"output bias has shape {tuple(bias.shape)}, the decoder needs {self.out_shape}"
            )
        self.output_layer.bias.copy_(bias.reshape(-1))
