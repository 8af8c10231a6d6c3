"""Convolutional encoder and decoder for 28x28 and 32x32 images with any channel count.

Encoder: ``Conv2d(kernel 4, stride 2, padding 1)`` layers halve the image
(28 -> 14 -> 7, 32 -> 16 -> 8 with the default ``channels=(32, 64)``), then
dense layers (``hidden``, may be empty) and a linear head to ``2 L``.

Decoder (the mirror): dense layers up to ``channels[-1] x h x w``, then
``ConvTranspose2d(kernel 4, stride 2, padding 1)`` layers that double the size
exactly back to 28 or 32, and a final ``Conv2d(kernel 3, padding 1)`` to
``P * C`` channels.

Output bias: a convolution's bias is one number per channel, but the data
mean differs per pixel. The decoder therefore adds a learned per-pixel bias
``pixel_bias (P * C, H, W)`` (zeros until :meth:`ConvDecoder.set_output_bias`)
after the last convolution, so the initial decoded mean can equal the data
mean exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .mlp import dense_layers, make_activation

__all__ = ["SUPPORTED_SIZES", "conv_feature_size", "ConvEncoder", "ConvDecoder"]

SUPPORTED_SIZES = (28, 32)
"""Image heights and widths the conv model takes; other sizes need the mlp model."""

_KERNEL, _STRIDE, _PADDING = 4, 2, 1


def conv_feature_size(event_shape: tuple[int, ...], channels: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` after ``len(channels)`` halvings; ConfigError for an unsupported shape."""
    if len(event_shape) != 3:
        raise ConfigError(
            f"the conv model needs images shaped (C, H, W), got event shape {tuple(event_shape)}: "
            "use model.kind = 'mlp' for other data"
        )
    _, h, w = event_shape
    if h not in SUPPORTED_SIZES or w not in SUPPORTED_SIZES:
        raise ConfigError(
            f"the conv model supports 28x28 and 32x32 images, got {h}x{w}: "
            "use model.kind = 'mlp' for other sizes"
        )
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise ConfigError(
            f"{len(channels)} stride-2 conv layers do not divide a {h}x{w} image evenly: "
            f"use at most {_max_halvings(min(h, w))} entries in model.channels"
        )
    return h // factor, w // factor


def _max_halvings(n: int) -> int:
    count = 0
    while n % 2 == 0:
        n //= 2
        count += 1
    return count


class ConvEncoder(nn.Sequential):
    """``x (B, C, H, W) -> (B, 2 L)``."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        activation: str,
        gated: bool = False,
    ) -> None:
        h, w = conv_feature_size(event_shape, channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip((event_shape[0], *channels[:-1]), channels):
            layers += [nn.Conv2d(c_in, c_out, _KERNEL, _STRIDE, _PADDING),
                       make_activation(activation)]
        flat = channels[-1] * h * w
        layers += [nn.Flatten(), *dense_layers((flat, *hidden), activation, gated)]
        layers.append(nn.Linear(hidden[-1] if hidden else flat, 2 * latent_dim))
        super().__init__(*layers)


class ConvDecoder(nn.Module):
    """``z (N, L) -> params (N, P * C, H, W)``, parameter-major, plus a per-pixel bias."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        params_per_channel: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        activation: str,
        gated: bool = False,
    ) -> None:
        super().__init__()
        h, w = conv_feature_size(event_shape, channels)
        rev = tuple(reversed(tuple(channels)))
        rev_hidden = tuple(reversed(tuple(hidden)))
        layers: list[nn.Module] = dense_layers(
            (latent_dim, *rev_hidden, rev[0] * h * w), activation, gated
        )
        layers.append(nn.Unflatten(1, (rev[0], h, w)))
        for c_in, c_out in zip(rev, (*rev[1:], rev[-1])):
            layers += [nn.ConvTranspose2d(c_in, c_out, _KERNEL, _STRIDE, _PADDING),
                       make_activation(activation)]
        out_channels = params_per_channel * event_shape[0]
        layers.append(nn.Conv2d(rev[-1], out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.out_shape = (out_channels, *event_shape[1:])
        self.pixel_bias = nn.Parameter(torch.zeros(self.out_shape))

    @property
    def output_layer(self) -> nn.Conv2d:
        """The final convolution (its weights and per-channel bias)."""
        return self.net[-1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) + self.pixel_bias

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Set ``pixel_bias`` to ``bias (P * C, H, W)`` and zero the last conv's bias."""
        if tuple(bias.shape) != self.out_shape:
            raise DataError(
                f"output bias has shape {tuple(bias.shape)}, the decoder needs {self.out_shape}"
            )
        self.pixel_bias.copy_(bias)
        self.output_layer.bias.zero_()
