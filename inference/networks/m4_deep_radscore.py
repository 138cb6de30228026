"""M4: Deep-RadScore, NSCLC multi-endpoint (Zhang et al. 2024, seed 003).

"we utilize DenseNet121 ... we redesigned the FC layer, transforming it from 1000 nodes into 2 FC
layers with Xavier-initialized weights ... the output of the penultimate FC layer represents the
deep network features ... the two RadScore features are directly input into the penultimate FC
layer of Deep-CT for fusion". Input: a 160x160 patch centred on the tumour centroid on the largest
slice, plus the tumour and peritumoral (3 mm ring) RadScores.

DenseNet121 as Huang et al. 2017 / torchvision: 7x7/2 stem with 64 channels, max pool, dense
blocks of 6/12/24/16 bottleneck layers (BN-ReLU-1x1 conv to 4*32, BN-ReLU-3x3 conv to 32),
transitions halving channels and resolution, final BN; ``width=1, in_channels=3`` is exactly the
torchvision feature extractor (6,953,856 parameters). Head: ReLU, global average pool, then
FC1 (penultimate; input = pooled features ++ the 2 RadScores; output = the deep feature vector,
``hidden`` units, ReLU) and FC2 (one logit per endpoint, sigmoid). The paper's main text gives
no hidden size (its appendix E2 is not in the seed): 128 here. ``fusion="output"`` instead appends
the RadScores to the penultimate output (the other reading of the sentence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.networks.base import MethodModel, Probabilities, ZScore, check_array
from inference.networks.blocks import init_weights, scaled

__all__ = ["RADSCORES", "DeepRadInput", "DeepRadScoreNet", "DenseNetBackbone", "M4Model"]

RADSCORES = ("tumour", "peritumoral")
"""Order of the RadScore columns."""


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bn_size * growth) - BN-ReLU-conv3x3 (growth); output concatenated to the input."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth
        self.layers = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNetBackbone(nn.Module):
    """DenseNet feature extractor (DenseNet121 at the defaults), ending with the final batch norm.

    Parameters
    ----------
    width
        Multiplier on the growth rate and the stem channels.
    blocks
        Layers per dense block (DenseNet121: 6, 12, 24, 16).
    growth
        Growth rate at ``width = 1`` (32).
    init_features
        Stem channels at ``width = 1`` (64).
    bn_size
        Bottleneck factor (4).
    in_channels
        Input channels.
    """

    def __init__(
        self,
        width: float = 1.0,
        *,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        growth: int = 32,
        init_features: int = 64,
        bn_size: int = 4,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if not blocks or min(blocks) < 1:
            raise ValueError(f"blocks must be layer counts >= 1, got {blocks}")
        growth = scaled(growth, width, minimum=2)
        channels = scaled(init_features, width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        for index, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(channels, growth, bn_size))
                channels += growth
            if index < len(blocks) - 1:
                layers.append(_transition(channels, channels // 2))
                channels //= 2
        layers.append(nn.BatchNorm2d(channels))
        self.features = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (N, out_channels, H/32, W/32), after the final batch norm."""
        return self.features(x)


class DeepRadScoreNet(nn.Module):
    """The M4 network: DenseNet trunk, FC1 (deep feature vector) with the RadScores fused, FC2.

    Parameters
    ----------
    num_labels
        Endpoints (one sigmoid output each).
    width, blocks, in_channels
        See :class:`DenseNetBackbone`.
    hidden
        Size of the deep feature vector (output of the penultimate FC layer).
    radscores
        Number of RadScores fused (tumour, peritumoral).
    fusion
        ``"input"``: RadScores concatenated to the penultimate FC layer's input (default);
        ``"output"``: to its output, i.e. the last FC layer's input.
    """

    def __init__(
        self,
        num_labels: int = 1,
        width: float = 1.0,
        *,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        in_channels: int = 1,
        hidden: int = 128,
        radscores: int = len(RADSCORES),
        fusion: Literal["input", "output"] = "input",
    ) -> None:
        super().__init__()
        if num_labels < 1 or hidden < 1 or radscores < 0:
            raise ValueError(f"invalid sizes: num_labels={num_labels}, hidden={hidden}, radscores={radscores}")
        if fusion not in ("input", "output"):
            raise ValueError(f'fusion must be "input" or "output", got {fusion!r}')
        self.backbone = DenseNetBackbone(width, blocks=tuple(blocks), in_channels=in_channels)
        self.fusion = fusion
        self.radscores = radscores
        c = self.backbone.out_channels
        self.fc1 = nn.Linear(c + (radscores if fusion == "input" else 0), hidden)
        self.fc2 = nn.Linear(hidden + (radscores if fusion == "output" else 0), num_labels)
        self.apply(init_weights)

    def deep_features(self, x: torch.Tensor, radscores: torch.Tensor) -> torch.Tensor:
        """The penultimate layer's output (N, hidden): the Deep-RadScore feature vector."""
        if radscores.shape != (x.shape[0], self.radscores):
            want = (x.shape[0], self.radscores)
            raise ValueError(f"expected radscores of shape {want}, got {tuple(radscores.shape)}")
        pooled = F.adaptive_avg_pool2d(F.relu(self.backbone(x)), 1).flatten(1)
        if self.fusion == "input":
            pooled = torch.cat([pooled, radscores], dim=1)
        return F.relu(self.fc1(pooled))

    def forward(self, x: torch.Tensor, radscores: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_labels) for patches (N, in_channels, H, W) and RadScores (N, 2)."""
        h = self.deep_features(x, radscores)
        if self.fusion == "output":
            h = torch.cat([h, radscores], dim=1)
        return self.fc2(h)


@dataclass(frozen=True)
class DeepRadInput:
    """M4 input.

    Parameters
    ----------
    patches
        (N, 160, 160) HU patches centred on the tumour centroid, largest slice.
    radscores
        (N, 2) tumour and peritumoral RadScores (see :data:`RADSCORES`).
    """

    patches: np.ndarray
    radscores: np.ndarray


class M4Model(MethodModel[DeepRadInput]):
    """M4 wrapper: patch + RadScores -> ``{endpoint: P}``.

    Parameters
    ----------
    network
        A :class:`DeepRadScoreNet` with ``len(labels)`` outputs.
    labels
        Endpoints in output order (e.g. ``("EGFR", "KRAS")``).
    normalisation
        Training-set statistics of the patches (HU).
    radscore_normalisation
        Per-RadScore training statistics (default: none, RadScores are already sums of z-scored features).
    device, batch_size
        See :class:`~inference.networks.base.MethodModel`.
    """

    method = "m4"

    def __init__(
        self,
        network: DeepRadScoreNet,
        labels: tuple[str, ...],
        *,
        normalisation: ZScore,
        radscore_normalisation: tuple[ZScore, ...] | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 16,
    ) -> None:
        if len(labels) != network.fc2.out_features:
            raise ValueError(f"the network has {network.fc2.out_features} outputs but labels are {list(labels)}")
        if radscore_normalisation is not None and len(radscore_normalisation) != network.radscores:
            raise ValueError(f"{len(radscore_normalisation)} RadScore statistics for {network.radscores} RadScores")
        super().__init__(network, labels, device=device, batch_size=batch_size)
        self.normalisation = normalisation
        self.radscore_normalisation = radscore_normalisation or (ZScore(0.0, 1.0),) * network.radscores
        self.final_classifiers: dict[str, Any] = {}
        """Per endpoint, a fitted classifier on :meth:`features` replacing the last FC layer (the paper's
        final-classifier selection); endpoints without one keep the network's sigmoid."""

    def features(self, inputs: DeepRadInput) -> np.ndarray:
        """The Deep-RadScore feature vectors (penultimate FC output, RadScores fused), (N, hidden)."""
        network = self.network
        assert isinstance(network, DeepRadScoreNet)
        patches, scores = self.pre_process(inputs)
        network.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, patches.shape[0], self.batch_size):
                chunk = slice(start, start + self.batch_size)
                out.append(network.deep_features(patches[chunk].to(self.device), scores[chunk].to(self.device)))
        return torch.cat(out).float().cpu().numpy()

    def __call__(self, inputs: DeepRadInput) -> Probabilities:
        """Network probabilities, replaced per endpoint by its final classifier when the package has one."""
        out = super().__call__(inputs)
        if self.final_classifiers:
            h = self.features(inputs)
            for label, estimator in self.final_classifiers.items():
                p = estimator.predict_proba(h)[:, 1]
                for row, value in zip(out, p, strict=True):
                    row[label] = float(value)
        return out

    def pre_process(self, inputs: DeepRadInput) -> tuple[torch.Tensor, ...]:
        """-> (patches (N, 1, H, W) z-scored float32, radscores (N, 2) float32)."""
        patches = check_array(inputs.patches, "patches", 3)
        scores = check_array(inputs.radscores, "radscores", 2, (len(self.radscore_normalisation),))
        if scores.shape[0] != patches.shape[0]:
            raise ValueError(f"{scores.shape[0]} RadScore rows for {patches.shape[0]} patches")
        normed = np.zeros(scores.shape, dtype=np.float32)
        for i, z in enumerate(self.radscore_normalisation):
            normed[:, i] = z.apply(scores[:, i])
        return (torch.from_numpy(self.normalisation.apply(patches)).unsqueeze(1), torch.from_numpy(normed))

    def post_process(self, outputs: torch.Tensor) -> Probabilities:
        """Independent sigmoid per endpoint."""
        return self._as_dicts(torch.sigmoid(outputs))
