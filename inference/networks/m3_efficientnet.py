"""M3: RAS-family mutations in CRC liver metastases, multi-label (seed 002).

EfficientNet-B0 backbone (Tan & Le 2019: stem 3x3/2 32 ch, seven MBConv stages with
squeeze-excitation, 1x1 head conv to 1280 ch) followed by "a multihead attention layer, followed by
ReLU activation function, before the classification fully connected layer", multi-label sigmoid
outputs trained with binary cross-entropy. Label sets: ``FIVE_LABELS`` (KRAS, NRAS, BRAF, PIK3CA,
OTHER) or the grouped ``GROUPED_LABELS`` (RAS = KRAS + NRAS, PIK3CA+BRAF, OTHER).

``width=1, depth=1, in_channels=3`` is exactly the EfficientNet-B0 feature extractor (4,007,548
parameters, as torchvision / timm). Choices where the paper is silent (docs/models.md): the
attention runs over the spatial positions of the last feature map (tokens = H*W positions,
embedding = 1280 channels, 8 heads, no positional encoding), then ReLU, mean over tokens, dropout
0.2, FC; one input channel (windowed grey crop) instead of ImageNet RGB.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from inference.networks.base import MethodModel, Probabilities, ZScore, check_array
from inference.networks.blocks import (
    DropPath,
    SqueezeExcite,
    conv_bn_act,
    init_weights,
    make_divisible,
    round_repeats,
)

__all__ = [
    "B0_STAGES",
    "FIVE_LABELS",
    "GROUPED_LABELS",
    "EfficientNetAttention",
    "EfficientNetB0Backbone",
    "M3Model",
    "MBConv",
]

FIVE_LABELS = ("KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER")
GROUPED_LABELS = ("RAS", "PIK3CA+BRAF", "OTHER")

B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    # expand ratio, kernel, stride, output channels, repeats  (EfficientNet-B0, Tan & Le 2019, Table 1)
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
BN_EPS = 1e-3
SE_RATIO = 0.25


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (SiLU activations).

    1x1 expand (skipped when ``expand == 1``), depthwise kxk, SE on ``int(in * 0.25)`` channels,
    1x1 project without activation; identity skip (with stochastic depth) when stride 1 and
    in == out.

    Parameters
    ----------
    cin, cout
        Channels.
    expand
        Expansion ratio.
    kernel, stride
        Depthwise convolution.
    drop_path
        Stochastic-depth probability of the residual branch.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn_act(cin, mid, 1, activation=nn.SiLU, eps=BN_EPS) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn_act(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, activation=nn.SiLU, eps=BN_EPS
        )
        self.se = SqueezeExcite(mid, max(1, int(cin * SE_RATIO)))
        self.project = conv_bn_act(mid, cout, 1, activation=None, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output; ``x + drop_path(branch)`` when it has a skip."""
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + self.drop_path(y) if self.skip else y


class EfficientNetB0Backbone(nn.Module):
    """EfficientNet feature extractor with compound width / depth multipliers (B0 at 1.0 / 1.0).

    Parameters
    ----------
    width
        Channel multiplier (rounded to multiples of 8 as in the reference).
    depth
        Block-count multiplier (``ceil``).
    in_channels
        Input channels.
    drop_path
        Maximum stochastic-depth probability, increasing linearly over the blocks (B0: 0.2).
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, *, in_channels: int = 1, drop_path: float = 0.2) -> None:
        super().__init__()
        stem = make_divisible(32 * width)
        self.stem = conv_bn_act(in_channels, stem, 3, stride=2, padding=1, activation=nn.SiLU, eps=BN_EPS)
        plan = [
            (expand, kernel, stride if i == 0 else 1, make_divisible(cout * width))
            for expand, kernel, stride, cout, repeats in B0_STAGES
            for i in range(round_repeats(repeats, depth))
        ]
        blocks: list[nn.Module] = []
        cin = stem
        for index, (expand, kernel, stride, cout) in enumerate(plan):
            blocks.append(MBConv(cin, cout, expand, kernel, stride, drop_path * index / len(plan)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = make_divisible(1280 * width)
        self.head = conv_bn_act(cin, self.out_channels, 1, activation=nn.SiLU, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (N, out_channels, H/32, W/32)."""
        return self.head(self.blocks(self.stem(x)))


class EfficientNetAttention(nn.Module):
    """The M3 network: backbone, multi-head self-attention over positions, ReLU, pool, FC.

    Parameters
    ----------
    num_labels
        Sigmoid outputs (5 or 3 in the paper).
    width, depth, in_channels, drop_path
        See :class:`EfficientNetB0Backbone`.
    heads
        Attention heads (must divide the feature channels).
    attention
        False: the paper's baseline (no self-attention layer).
    dropout
        Dropout before the classifier (B0: 0.2).
    """

    def __init__(
        self,
        num_labels: int = len(FIVE_LABELS),
        width: float = 1.0,
        depth: float = 1.0,
        *,
        in_channels: int = 1,
        heads: int = 8,
        attention: bool = True,
        dropout: float = 0.2,
        drop_path: float = 0.2,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.backbone = EfficientNetB0Backbone(width, depth, in_channels=in_channels, drop_path=drop_path)
        channels = self.backbone.out_channels
        if attention and channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} feature channels")
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True) if attention else None
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_labels)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_labels) for images (N, in_channels, H, W); sigmoid is in post-processing."""
        tokens = self.backbone(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        if self.attention is not None:
            tokens = self.act(self.attention(tokens, tokens, tokens, need_weights=False)[0])
        return self.classifier(self.dropout(tokens.mean(dim=1)))


class M3Model(MethodModel[np.ndarray]):
    """M3 wrapper: (N, 128, 128) windowed crops (0-255) -> ``{label: P}`` per slice.

    Per-lesion result = mean over the lesion's slices (done by the pipeline).

    Parameters
    ----------
    network
        An :class:`EfficientNetAttention` with ``len(labels)`` outputs.
    labels
        Output labels, e.g. :data:`FIVE_LABELS` or :data:`GROUPED_LABELS`.
    normalisation
        Training-set statistics in grey values (0-255).
    device, batch_size
        See :class:`~inference.networks.base.MethodModel`.
    """

    method = "m3"

    def __init__(
        self,
        network: EfficientNetAttention,
        labels: tuple[str, ...] = FIVE_LABELS,
        *,
        normalisation: ZScore,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if len(labels) != network.classifier.out_features:
            raise ValueError(f"the network has {network.classifier.out_features} outputs but labels are {list(labels)}")
        super().__init__(network, labels, device=device, batch_size=batch_size)
        self.normalisation = normalisation

    def pre_process(self, inputs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(N, H, W) windowed crops in [0, 255] (uint8 or float) -> ((N, 1, H, W) float32 z-scored,).

        Raises
        ------
        ValueError
            Values outside [0, 255] (e.g. HU passed without windowing).
        """
        crops = check_array(inputs, "inputs", 3)
        if crops.dtype != np.uint8 and (crops.min() < 0 or crops.max() > 255):
            raise ValueError(
                f'Argument "inputs" must hold windowed grey values in [0, 255], got [{crops.min()}, {crops.max()}].'
            )
        return (torch.from_numpy(self.normalisation.apply(crops)).unsqueeze(1),)

    def post_process(self, outputs: torch.Tensor) -> Probabilities:
        """Independent sigmoid per label (multi-label)."""
        return self._as_dicts(torch.sigmoid(outputs))
