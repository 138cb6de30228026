"""Shared layers and helpers of the method networks (plain PyTorch, random init, no downloads).

The building blocks here follow their reference implementations layer for layer so that the
paper-sized networks have the reference parameter counts (checked in ``tests/unit/test_models.py``):
``conv_bn_act`` is the ``BasicConv2d`` of Inception-ResNet-v2 and the conv-BN(-SiLU) of EfficientNet,
``SqueezeExcite`` the SE module of EfficientNet (Hu et al. 2018; Tan & Le 2019).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "DropPath",
    "SqueezeExcite",
    "conv_bn_act",
    "default_device",
    "init_weights",
    "scaled",
]


def default_device() -> torch.device:
    """CUDA when available, else CPU.

    Returns
    -------
    torch.device
        ``cuda`` if ``torch.cuda.is_available()``, otherwise ``cpu``.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scaled(channels: int, width: float, *, minimum: int = 4) -> int:
    """Scale a reference channel count by a width multiplier.

    Parameters
    ----------
    channels
        Channel count of the paper-sized network.
    width
        Multiplier; 1.0 reproduces the reference exactly.
    minimum
        Lower bound of the result (keeps tiny demo variants functional).

    Returns
    -------
    int
        ``channels`` exactly when ``width == 1``, else ``max(minimum, round(channels * width))``.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if width == 1.0:
        return channels
    return max(minimum, round(channels * width))


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    *,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    activation: type[nn.Module] | None = nn.ReLU,
    eps: float = 1e-5,
) -> nn.Sequential:
    """Convolution without bias, batch norm, optional activation.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    kernel_size, stride, padding, groups
        As for :class:`torch.nn.Conv2d`.
    activation
        Activation class instantiated after the norm (``None``: no activation).
    eps
        Batch-norm epsilon (Inception-ResNet-v2 uses 1e-3, EfficientNet 1e-3, the rest 1e-5).

    Returns
    -------
    torch.nn.Sequential
        ``conv``, ``bn`` and (if any) ``act`` sub-modules.
    """
    layers: list[tuple[str, nn.Module]] = [
        (
            "conv",
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False
            ),
        ),
        ("bn", nn.BatchNorm2d(out_channels, eps=eps)),
    ]
    if activation is not None:
        layers.append(("act", activation()))
    return nn.Sequential(OrderedDict(layers))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average pool, 1x1 reduce, SiLU, 1x1 expand, sigmoid gate.

    Parameters
    ----------
    channels
        Channels of the feature map that is gated.
    reduced
        Bottleneck channels (EfficientNet: ``int(block_input_channels * 0.25)``).
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``x`` channel-wise."""
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        return x * torch.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample); identity in eval mode.

    Parameters
    ----------
    p
        Probability of dropping the branch during training.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop whole samples of ``x`` with probability ``p`` (training only)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def init_weights(module: nn.Module) -> None:
    """Random initialisation used by every method network (no pretrained weights are ever loaded).

    Convolutions: He (Kaiming) normal, fan-out; linear layers: Xavier uniform (Deep-RadScore
    initialises its FC layers this way); batch norm: weight 1, bias 0. Apply with
    ``network.apply(init_weights)``.

    Parameters
    ----------
    module
        Any sub-module; layers of other types are left as PyTorch initialised them.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` the way EfficientNet does.

    Never goes below ``divisor`` nor more than 10 % below ``value``.
    """
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by a depth multiplier (EfficientNet: ``ceil``)."""
    if depth <= 0:
        raise ValueError(f"depth must be > 0, got {depth}")
    return math.ceil(repeats * depth)
