"""M1: KRAS status in colorectal cancer from one axial slice, 2D ResNet (He et al. 2020, seed 000).

The paper: "six residual learning blocks ... y = sigma(F(x, W_i) + x) ... The kernel size of all the
convolution layers is 5 x 5. Then, a max-pooling layer, a fully connected layer and a soft-max layer"
and (Fig. 2) "six identity blocks ... Each identity block has three convolutional layers ... ReLu are
adopted after every convolutional layer." Input: the ROI bounding box + 20 px in all (10 per side, the
paper's A2 set) resized to 80x80.

What the paper leaves open, and what we chose (documented in docs/models.md):

- channel count: ``base_channels = 32`` at ``width = 1``;
- a 5x5 stem convolution 1 -> C before the first block (identity blocks need C channels);
- batch norm after each convolution (the Keras "identity block" the paper names has it;
  ``batch_norm=False`` gives the bare text);
- the max-pooling layer is a global max pool (keeps the FC layer independent of the input size).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from inference.networks.base import MethodModel, Probabilities, ZScore, check_array
from inference.networks.blocks import init_weights, scaled

__all__ = ["M1Model", "ResNetKRAS", "ResidualBlock5x5"]

KERNEL = 5


def _conv(channels_in: int, channels_out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels_in, channels_out, KERNEL, padding=KERNEL // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(channels_out))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualBlock5x5(nn.Module):
    """Identity block: three 5x5 convolutions, each followed by ReLU; ``y = ReLU(F(x) + x)``.

    Parameters
    ----------
    channels
        Input = output channels.
    convs
        Convolutions in the residual mapping F (paper: 3).
    batch_norm
        Batch norm between each convolution and its ReLU.
    """

    def __init__(self, channels: int, convs: int = 3, *, batch_norm: bool = True) -> None:
        super().__init__()
        if convs < 1:
            raise ValueError(f"convs must be >= 1, got {convs}")
        self.residual = nn.Sequential(*[_conv(channels, channels, batch_norm) for _ in range(convs)])
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(F(x) + x)``."""
        return self.act(self.residual(x) + x)


class ResNetKRAS(nn.Module):
    """The M1 network: 5x5 stem, ``blocks`` identity blocks, global max pool, FC -> 2 logits.

    Parameters
    ----------
    width
        Channel multiplier on ``base_channels``.
    blocks
        Number of residual blocks (paper: 6).
    convs_per_block
        Convolutions per block (paper: 3).
    base_channels
        Channels at ``width = 1``.
    batch_norm
        Batch norm after each convolution.
    in_channels
        Input channels (1: one CT slice).
    num_classes
        Output logits (paper: 2, wild type / mutant).
    """

    def __init__(
        self,
        width: float = 1.0,
        *,
        blocks: int = 6,
        convs_per_block: int = 3,
        base_channels: int = 32,
        batch_norm: bool = True,
        in_channels: int = 1,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        channels = scaled(base_channels, width)
        self.stem = _conv(in_channels, channels, batch_norm)
        self.blocks = nn.Sequential(
            *[ResidualBlock5x5(channels, convs_per_block, batch_norm=batch_norm) for _ in range(blocks)]
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.apply(init_weights)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (for Grad-CAM), shape (N, C, H, W)."""
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, in_channels, H, W); softmax is in post-processing."""
        return self.fc(self.pool(self.features(x)).flatten(1))


class M1Model(MethodModel[np.ndarray]):
    """M1 wrapper: (N, 80, 80) HU crops -> ``{label: P(mutant)}``.

    Parameters
    ----------
    network
        A :class:`ResNetKRAS` with two outputs (wild type, mutant).
    labels
        One label, the gene (e.g. ``("KRAS",)``).
    normalisation
        Training-set z-score statistics in HU.
    device, batch_size
        See :class:`~inference.networks.base.MethodModel`.
    """

    method = "m1"

    def __init__(
        self,
        network: ResNetKRAS,
        labels: tuple[str, ...] = ("KRAS",),
        *,
        normalisation: ZScore,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if len(labels) != 1:
            raise ValueError(f"M1 predicts one gene (wild type / mutant); got labels {list(labels)}")
        super().__init__(network, labels, device=device, batch_size=batch_size)
        self.normalisation = normalisation

    def pre_process(self, inputs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(N, H, W) HU crops -> ((N, 1, H, W) float32 z-scored,)."""
        crops = check_array(inputs, "inputs", 3)
        return (torch.from_numpy(self.normalisation.apply(crops)).unsqueeze(1),)

    def post_process(self, outputs: torch.Tensor) -> Probabilities:
        """Softmax over (wild type, mutant); the label's probability is P(mutant)."""
        return self._as_dicts(torch.softmax(outputs, dim=1)[:, 1:])
