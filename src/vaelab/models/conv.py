r"""Convolutional encoder and decoder, with residual blocks, for any image size divisible
by :math:`2^n` (``n = len(channels)`` stride-2 stages: 28 = 4 x 7 takes 2 stages; 32, 64,
128 ... take more).

Encoder, ``x (B, C, H, W) -> (B, 2 L)``, one stage per entry ``c_i`` of ``channels``::

    Conv2d(c_{i-1}, c_i, kernel 4, stride 2, padding 1)     # halves H and W exactly
    ResidualBlock(c_i) x blocks
    activation
    ... then Flatten, the dense layers ``hidden`` (each + activation), Linear(-> 2 L)

Decoder, ``z (N, L) -> params (N, P * C, H, W)``, the mirror::

    the dense layers ``reversed(hidden)`` (each + activation), Linear(-> c_n h w), Unflatten
    per stage i = n .. 1:  ResidualBlock(c_i) x blocks, activation,
                           ConvTranspose2d(c_i, c_{i-1} (c_1 for the last), kernel 4,
                                           stride 2, padding 1)   # doubles H and W exactly
    activation, Conv2d(c_1, P * C, kernel 3 (blocks = 0) or 1 (blocks > 0)), + pixel_bias

:class:`ResidualBlock` (pre-activation, He et al. 2016 "Identity mappings"; no
normalisation, so every example's log-likelihood is a function of that example alone)::

    x + Conv3x3(act(Conv3x3(act(x))))

With ``blocks = 0`` the layers are exactly the former 28/32-only conv model (same
``state_dict`` keys). With residual blocks the output convolution is 1x1: the blocks give
the spatial context, and a 3x3 convolution to ``P * C`` channels at full resolution (120 for
the 10-component logistic mixture on RGB) would cost as much as the rest of the decoder.

Output bias: a convolution's bias is one number per channel, but the data mean differs
per pixel. The decoder therefore adds a learned per-pixel bias ``pixel_bias (P * C, H,
W)`` (zeros until :meth:`ConvDecoder.set_output_bias`) after the last convolution, so the
initial decoded mean can equal the data mean exactly.

Memory layout (``memory_format``, default ``auto``). On CPU the convolutions run in
``torch.channels_last`` (NHWC, oneDNN's direct convolutions: measured 8% faster than NCHW
for the 28x28 model, a wash for the residual colour model); inputs are converted once at
the encoder's entry. Residual decoders run their last (full-resolution) stage in NCHW, where
the 1x1 output layer is one batched matrix product that adds the per-pixel bias in the same
call and writes the NCHW layout the likelihoods index (no separate bias pass, no layout
copy of the ``P * C``-channel output: a fifth of the model's own step, 9-11% of a
training step, for the 120-channel mixture output). On other devices ``auto`` keeps NCHW. Parameters keep PyTorch's default
layout, so checkpoints, optimizer states and fused optimizers see plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .mlp import dense_layers, make_activation

__all__ = [
    "MEMORY_FORMATS",
    "max_stages",
    "conv_feature_size",
    "sized_for",
    "ResidualBlock",
    "ConvEncoder",
    "ConvDecoder",
]

_KERNEL, _STRIDE, _PADDING = 4, 2, 1
_RESULT_BACKWARD = (nn.ReLU, nn.LeakyReLU, nn.ELU)

#: Layouts the convolutions can run in: ``auto`` (channels_last on CPU, contiguous on other
#: devices), ``channels_last`` (NHWC) or ``contiguous`` (NCHW).
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def max_stages(size: int) -> int:
    """How many times ``size`` halves exactly (28 -> 2, 32 -> 5, 48 -> 4, 7 -> 0)."""
    count = 0
    while size > 0 and size % 2 == 0:
        size //= 2
        count += 1
    return count


def conv_feature_size(event_shape: Sequence[int], channels: Sequence[int]) -> tuple[int, int]:
    """``(h, w) = (H / 2^n, W / 2^n)`` after ``n = len(channels)`` stride-2 stages.

    Raises:
        ConfigError: ``event_shape`` is not ``(C, H, W)``, or ``H`` or ``W`` is not divisible
            by ``2^n`` (the message names the largest ``n`` that fits and a size that would).
    """
    if len(event_shape) != 3:
        raise ConfigError(
            f"the conv model needs images shaped (C, H, W), got event shape {tuple(event_shape)}: "
            "use model.kind = 'mlp' for other data"
        )
    _, h, w = event_shape
    n = len(channels)
    factor = 2**n
    if h % factor or w % factor:
        fits = min(max_stages(h), max_stages(w))
        fewer = (f"use at most {fits} {'entry' if fits == 1 else 'entries'} in model.channels, "
                 if fits else "")
        near = -(-max(h, w) // factor) * factor
        raise ConfigError(
            f"the conv model halves the image once per entry of model.channels ({n}), so H and "
            f"W must be divisible by {factor}, got {h}x{w}: {fewer}resize the images "
            f"(--image-size {near}) or use model.kind = 'mlp'"
        )
    return h // factor, w // factor


def sized_for(event_shape: Sequence[int]) -> dict[str, Any]:
    """``[model]`` settings of a conv model sized for images of ``event_shape (C, H, W)``.

    One stride-2 stage per halving while the feature map stays at least 4 x 4 and its size
    an integer (32 -> 16 -> 8 -> 4: three stages; 28 -> 14 -> 7: two; 64: four), 32 channels
    doubling per stage up to 256, two residual blocks per stage, no dense layers, and a
    latent of 32 dimensions (grey images of at most 28 x 28) or 128. For 32x32 RGB this is
    the ``cifar10`` preset's model (0.45 GFLOP per example for a training step).

    Raises:
        ConfigError: not ``(C, H, W)``, or ``H`` or ``W`` cannot be halved to at least 4.
    """
    if len(event_shape) != 3:
        raise ConfigError(
            f"the conv model needs images shaped (C, H, W), got event shape {tuple(event_shape)}: "
            "use model.kind = 'mlp' for other data"
        )
    c, h, w = (int(s) for s in event_shape)
    stages = 0
    while h % 2 ** (stages + 1) == 0 and w % 2 ** (stages + 1) == 0 \
            and min(h, w) // 2 ** (stages + 1) >= 4:
        stages += 1
    if stages == 0:
        raise ConfigError(
            f"images of {h}x{w} cannot be halved by a stride-2 conv to at least 4x4: resize "
            "them (e.g. --image-size 32) or use model.kind = 'mlp'"
        )
    return {"kind": "conv", "latent_dim": 32 if c == 1 and max(h, w) <= 28 else 128,
            "conv": {"channels": [min(32 * 2**i, 256) for i in range(stages)], "blocks": 2,
                     "hidden": []}}


class ResidualBlock(nn.Module):
    r"""Pre-activation residual block: ``x + conv2(act(conv1(act(x))))``, two 3x3 convs.

    ``(B, c, h, w) -> (B, c, h, w)``. With :attr:`conv2`'s weight and bias zero the block is
    the identity.
    """

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = _inplace(make_activation(activation))  # conv1's output is not kept
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the residual is a fresh tensor that its convolution does not keep for backward,
        # so the sum can be formed in place (one pass, no new allocation)
        return self.conv2(self.act2(self.conv1(self.act1(x)))).add_(x)


def _inplace(act: nn.Module) -> nn.Module:
    """The activation computing in place where its backward needs only its result (ReLU,
    leaky ReLU, ELU): no new tensor; the others are returned as they are."""
    if isinstance(act, _RESULT_BACKWARD):
        act.inplace = True
    return act


def _check_blocks(blocks: int) -> int:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ConfigError(f"model.blocks must be an integer >= 0, got {blocks!r}")
    return blocks


def _check_layout(memory_format: str) -> str:
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format {memory_format!r} is not one of "
                          + ", ".join(MEMORY_FORMATS))
    return memory_format


def _resolve_layout(memory_format: str, device: torch.device) -> torch.memory_format:
    """The layout for tensors on ``device``: ``auto`` is channels_last on CPU only."""
    if memory_format == "auto":
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format
    return torch.channels_last if memory_format == "channels_last" else torch.contiguous_format


class ConvEncoder(nn.Sequential):
    """``x (B, C, H, W) -> (B, 2 L)``: stride-2 stages with residual blocks, dense head.

    Args:
        event_shape: ``(C, H, W)``, ``H`` and ``W`` divisible by ``2 ** len(channels)``.
        latent_dim: ``L``.
        channels: output channels of each stride-2 stage.
        hidden: dense layer sizes after the convolutions (may be empty).
        activation: a name in :data:`~vaelab.models.mlp.ACTIVATIONS`.
        gated: gated dense layers.
        blocks: residual blocks per stage.
        memory_format: ``"auto"``, ``"channels_last"`` or ``"contiguous"`` (see the module
            docstring).
        extra: more outputs after the ``2 L`` (a posterior flow's parameters).
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        activation: str,
        gated: bool = False,
        blocks: int = 0,
        memory_format: str = "auto",
        extra: int = 0,
    ) -> None:
        h, w = conv_feature_size(event_shape, channels)
        blocks = _check_blocks(blocks)
        layers: list[nn.Module] = []
        for c_in, c_out in zip((event_shape[0], *channels[:-1]), channels):
            layers.append(nn.Conv2d(c_in, c_out, _KERNEL, _STRIDE, _PADDING))
            layers += [ResidualBlock(c_out, activation) for _ in range(blocks)]
            layers.append(_inplace(make_activation(activation)))
        flat = channels[-1] * h * w
        layers += [nn.Flatten(), *dense_layers((flat, *hidden), activation, gated)]
        layers.append(nn.Linear(hidden[-1] if hidden else flat, 2 * latent_dim + extra))
        super().__init__(*layers)
        self.memory_format = _check_layout(memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` floats -> ``(B, 2 L)``."""
        layout = _resolve_layout(self.memory_format, x.device)
        return super().forward(x.contiguous(memory_format=layout))


class ConvDecoder(nn.Module):
    """``z (N, L) -> params (N, P * C, H, W)``, parameter-major, plus a per-pixel bias.

    Args as :class:`ConvEncoder`, plus ``params_per_channel`` (``P``). The output is
    contiguous (NCHW) whatever ``memory_format`` the convolutions ran in.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        params_per_channel: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        activation: str,
        gated: bool = False,
        blocks: int = 0,
        memory_format: str = "auto",
    ) -> None:
        super().__init__()
        h, w = conv_feature_size(event_shape, channels)
        blocks = _check_blocks(blocks)
        rev = tuple(reversed(tuple(channels)))
        rev_hidden = tuple(reversed(tuple(hidden)))
        layers: list[nn.Module] = dense_layers((latent_dim, *rev_hidden), activation, gated)
        layers += [nn.Linear(rev_hidden[-1] if rev_hidden else latent_dim, rev[0] * h * w),
                   nn.Unflatten(1, (rev[0], h, w))]
        for c_in, c_out in zip(rev, (*rev[1:], rev[-1])):
            layers += [ResidualBlock(c_in, activation) for _ in range(blocks)]
            layers += [_inplace(make_activation(activation)),
                       nn.ConvTranspose2d(c_in, c_out, _KERNEL, _STRIDE, _PADDING)]
        out_channels = params_per_channel * event_shape[0]
        kernel = 1 if blocks else 3
        layers += [_inplace(make_activation(activation)),
                   nn.Conv2d(rev[-1], out_channels, kernel, padding=kernel // 2)]
        self.net = nn.Sequential(*layers)
        self.out_shape = (out_channels, *event_shape[1:])
        self.pixel_bias = nn.Parameter(torch.zeros(self.out_shape))
        self.memory_format = _check_layout(memory_format)
        # the image layers start after the Unflatten; with a 1x1 output layer (a matrix
        # product writing NCHW) the last stage runs in NCHW (see the module docstring)
        self._image_start = next(i for i, m in enumerate(layers) if isinstance(m, nn.Unflatten))
        self._nchw_from = (max(i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d))
                           if kernel == 1 else len(layers))

    @property
    def output_layer(self) -> nn.Conv2d:
        """The final convolution (its weights and per-channel bias)."""
        return self.net[-1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` -> ``(N, P * C, H, W)``, contiguous (NCHW)."""
        layout = _resolve_layout(self.memory_format, z.device)
        x = z
        *body, out = self.net
        for i, layer in enumerate(body):
            if i == self._nchw_from:
                x = x.contiguous()
            x = layer(x)
            if i == self._image_start:
                x = x.contiguous(memory_format=layout)
        if out.kernel_size == (1, 1):
            # a 1x1 conv is one matrix product per example, (P*C, c) @ (c, H*W); the
            # per-pixel and per-channel biases are added by the same call, which writes NCHW
            n, c = x.shape[:2]
            bias = (self.pixel_bias + out.bias[:, None, None]).flatten(1)
            y = torch.baddbmm(bias, out.weight.flatten(1).expand(n, -1, -1),
                              x.contiguous().flatten(2))
            return y.unflatten(2, self.out_shape[1:])
        return out(x).contiguous() + self.pixel_bias

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Set ``pixel_bias`` to ``bias (P * C, H, W)`` and zero the last conv's bias."""
        if tuple(bias.shape) != self.out_shape:
            raise DataError(
                f"output bias has shape {tuple(bias.shape)}, the decoder needs {self.out_shape}"
            )
        self.pixel_bias.copy_(bias)
        self.output_layer.bias.zero_()
