"""M2: EGFR + KRAS in NSCLC, multi-channel multi-task network (Dong et al. 2021, seed 001).

Nine planar views of a 64 mm cube around the nodule each enter their own
"inception-resnet-attention" model: a learned 3x3 convolution 1 -> 3 channels, the
Inception-ResNet-v2 stem, three inception-resnet-attention modules (block types A, B, C) with the two
reduction modules between them, average pooling, dropout (keep 0.8). Each attention module is a
trunk of stacked inception-resnet blocks T and an hourglass mask branch M (max-pool down, bilinear
up, skip connections, two 1x1 convolutions, sigmoid S), combined as ``A = T * (1 + S)`` (paper
eq. 4). Each view has two task heads (EGFR, KRAS): FC256 -> FC128 -> FC2 with age, sex and smoking
concatenated to the FC256 input; the FC2 outputs pass a sigmoid (``O``, eq. 5-6) and a learned
weighted sum over 9 views x 2 neurons per task gives the final sigmoid output (eq. 7-8).

Parameterised (``width``, ``repeats``, ``mask_depths``) so that ``width=1, repeats=(10, 20, 10),
attention=False`` is exactly the Inception-ResNet-v2 feature extractor (54,306,464 parameters with
3 input channels; see tests). Deviations (docs/models.md): the paper gives neither the number of
blocks in each attention trunk nor the mask depth - we use the Inception-ResNet-v2 repeats for the
trunks and mask depths 2/1/1 (Wang et al. 2017 use one pooling level fewer per halving of the
resolution); one inception-resnet unit per mask level; a bias in the fusion layer (the paper's
eq. 7-8 have none); ``shared_views=True`` optionally runs one branch over all views (small demos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.networks.base import MethodModel, Probabilities, ZScore, check_array
from inference.networks.blocks import conv_bn_act, init_weights, scaled

__all__ = [
    "COVARIATE_FEATURES",
    "MIN_VIEW_SIZE",
    "AttentionModule",
    "Covariates",
    "HourglassMask",
    "InceptionAttentionTrunk",
    "M2Model",
    "MultiViewInput",
    "MultiViewMultiTask",
    "encode_covariates",
]

BN_EPS = 1e-3  # Inception-ResNet-v2
MIN_VIEW_SIZE = 75
"""Smallest view (pixels) the Inception-ResNet-v2 stem and reductions accept (paper: 299)."""

COVARIATE_FEATURES = (
    "age_z",
    "age_unknown",
    "sex_male",
    "sex_female",
    "sex_unknown",
    "smoker",
    "non_smoker",
    "smoking_unknown",
)
"""Columns of the covariate vector concatenated at each FC256 input."""


def _bc(
    cin: int, cout: int, k: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
) -> nn.Sequential:
    """``BasicConv2d`` of Inception-ResNet-v2: conv (no bias), BN (eps 1e-3), ReLU."""
    return conv_bn_act(cin, cout, k, stride=stride, padding=padding, eps=BN_EPS)


class _Concat(nn.Module):
    """Parallel branches concatenated along channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class Stem(nn.Module):
    """Inception-ResNet-v2 stem up to and including Mixed_5b (320 channels at width 1)."""

    def __init__(self, in_channels: int, width: float) -> None:
        super().__init__()

        def c(n: int) -> int:
            return scaled(n, width)

        self.layers = nn.Sequential(
            _bc(in_channels, c(32), 3, stride=2),
            _bc(c(32), c(32), 3),
            _bc(c(32), c(64), 3, padding=1),
            nn.MaxPool2d(3, stride=2),
            _bc(c(64), c(80), 1),
            _bc(c(80), c(192), 3),
            nn.MaxPool2d(3, stride=2),
        )
        cin = c(192)
        self.mixed_5b = _Concat(
            _bc(cin, c(96), 1),
            nn.Sequential(_bc(cin, c(48), 1), _bc(c(48), c(64), 5, padding=2)),
            nn.Sequential(_bc(cin, c(64), 1), _bc(c(64), c(96), 3, padding=1), _bc(c(96), c(96), 3, padding=1)),
            nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), _bc(cin, c(64), 1)),
        )
        self.out_channels = c(96) + c(64) + c(96) + c(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed_5b(self.layers(x))


class _InceptionResNetBlock(nn.Module):
    """``x + scale * conv1x1(concat(branches))`` then ReLU (unless ``relu=False``)."""

    def __init__(self, channels: int, branches: nn.Module, branch_channels: int, scale: float, relu: bool) -> None:
        super().__init__()
        self.branches = branches
        self.up = nn.Conv2d(branch_channels, channels, 1)
        self.scale = scale
        self.act: nn.Module = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.scale * self.up(self.branches(x)))


def block35(channels: int, width: float) -> nn.Module:
    """Inception-ResNet-A (Block35, 35x35 grid at 299 px input), residual scale 0.17."""

    def c(n: int) -> int:
        return scaled(n, width)

    branches = _Concat(
        _bc(channels, c(32), 1),
        nn.Sequential(_bc(channels, c(32), 1), _bc(c(32), c(32), 3, padding=1)),
        nn.Sequential(_bc(channels, c(32), 1), _bc(c(32), c(48), 3, padding=1), _bc(c(48), c(64), 3, padding=1)),
    )
    return _InceptionResNetBlock(channels, branches, c(32) + c(32) + c(64), 0.17, True)


def block17(channels: int, width: float) -> nn.Module:
    """Inception-ResNet-B (Block17, 1x7 / 7x1 factorised), residual scale 0.10."""

    def c(n: int) -> int:
        return scaled(n, width)

    branches = _Concat(
        _bc(channels, c(192), 1),
        nn.Sequential(
            _bc(channels, c(128), 1),
            _bc(c(128), c(160), (1, 7), padding=(0, 3)),
            _bc(c(160), c(192), (7, 1), padding=(3, 0)),
        ),
    )
    return _InceptionResNetBlock(channels, branches, 2 * c(192), 0.10, True)


def block8(channels: int, width: float, *, last: bool = False) -> nn.Module:
    """Inception-ResNet-C (Block8, 1x3 / 3x1), scale 0.20; the network's last one: scale 1, no ReLU."""

    def c(n: int) -> int:
        return scaled(n, width)

    branches = _Concat(
        _bc(channels, c(192), 1),
        nn.Sequential(
            _bc(channels, c(192), 1),
            _bc(c(192), c(224), (1, 3), padding=(0, 1)),
            _bc(c(224), c(256), (3, 1), padding=(1, 0)),
        ),
    )
    return _InceptionResNetBlock(channels, branches, c(192) + c(256), 1.0 if last else 0.20, not last)


def reduction_a(cin: int, width: float) -> tuple[nn.Module, int]:
    """Mixed_6a (reduction A, 35 -> 17): returns the module and its output channels."""

    def c(n: int) -> int:
        return scaled(n, width)

    module = _Concat(
        _bc(cin, c(384), 3, stride=2),
        nn.Sequential(_bc(cin, c(256), 1), _bc(c(256), c(256), 3, padding=1), _bc(c(256), c(384), 3, stride=2)),
        nn.MaxPool2d(3, stride=2),
    )
    return module, 2 * c(384) + cin


def reduction_b(cin: int, width: float) -> tuple[nn.Module, int]:
    """Mixed_7a (reduction B, 17 -> 8): returns the module and its output channels."""

    def c(n: int) -> int:
        return scaled(n, width)

    module = _Concat(
        nn.Sequential(_bc(cin, c(256), 1), _bc(c(256), c(384), 3, stride=2)),
        nn.Sequential(_bc(cin, c(256), 1), _bc(c(256), c(288), 3, stride=2)),
        nn.Sequential(_bc(cin, c(256), 1), _bc(c(256), c(288), 3, padding=1), _bc(c(288), c(320), 3, stride=2)),
        nn.MaxPool2d(3, stride=2),
    )
    return module, c(384) + c(288) + c(320) + cin


class HourglassMask(nn.Module):
    """Mask branch of the attention module (bottom-up / top-down, Wang et al. 2017).

    ``depth`` times: max-pool (3x3, stride 2) then one unit; a skip unit at every level but the
    deepest; on the way up bilinear interpolation back to the size of the level above, plus the
    skip, plus one unit; finally BN-ReLU-conv1x1 twice. Returns the mask logits M (sigmoid
    is applied by :class:`AttentionModule`).

    Parameters
    ----------
    unit
        Factory of one inception-resnet unit of the stage's type (channels in = out).
    channels
        Channels of the feature map.
    depth
        Number of max-pool / interpolation levels (>= 1).
    """

    def __init__(self, unit: Callable[[], nn.Module], channels: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mask depth must be >= 1, got {depth}")
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.ModuleList(unit() for _ in range(depth))
        self.skips = nn.ModuleList(unit() for _ in range(depth - 1))
        self.up = nn.ModuleList(unit() for _ in range(depth - 1))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels, eps=BN_EPS),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits M, same shape as ``x``."""
        sizes: list[tuple[int, int]] = []
        skips: list[torch.Tensor] = []
        h = x
        depth = len(self.down)
        for i in range(depth):
            sizes.append((h.shape[-2], h.shape[-1]))
            h = self.down[i](self.pool(h))
            if i < depth - 1:
                skips.append(self.skips[i](h))
        for i in reversed(range(depth)):
            h = F.interpolate(h, size=sizes[i], mode="bilinear", align_corners=False)
            if i > 0:
                h = self.up[i - 1](h + skips[i - 1])
        return self.head(h)


class AttentionModule(nn.Module):
    """Inception-resnet-attention module: ``A = T * (1 + sigmoid(M))`` (paper eq. 1-4).

    Parameters
    ----------
    trunk
        The trunk branch T (stacked inception-resnet blocks).
    mask
        The mask branch (an :class:`HourglassMask`); ``None`` gives the plain trunk (no attention).
    """

    def __init__(self, trunk: nn.Module, mask: nn.Module | None) -> None:
        super().__init__()
        self.trunk = trunk
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x) * (1 + sigmoid(M(x)))``."""
        t = self.trunk(x)
        if self.mask is None:
            return t
        return t * (1.0 + torch.sigmoid(self.mask(x)))


class InceptionAttentionTrunk(nn.Module):
    """Stem, attention(A), reduction A, attention(B), reduction B, attention(C), 1x1 conv, pool, dropout.

    Parameters
    ----------
    in_channels
        Input channels (3: after the learned 1 -> 3 convolution).
    width
        Channel multiplier on every Inception-ResNet-v2 channel count.
    repeats
        Inception-resnet blocks in the trunks of the three attention modules (IRv2: 10, 20, 10).
    mask_depths
        Pooling levels of the three mask branches.
    attention
        False: plain Inception-ResNet-v2 stages (no mask branches).
    dropout
        Dropout before the heads (paper: keep 0.8).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        *,
        repeats: Sequence[int] = (10, 20, 10),
        mask_depths: Sequence[int] = (2, 1, 1),
        attention: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(repeats) != 3 or min(repeats) < 1:
            raise ValueError(f"repeats must be three counts >= 1, got {repeats}")
        if len(mask_depths) != 3:
            raise ValueError(f"mask_depths must be three depths, got {mask_depths}")
        self.stem = Stem(in_channels, width)
        ca = self.stem.out_channels
        self.stage_a = self._stage(lambda: block35(ca, width), repeats[0], mask_depths[0], ca, attention)
        self.reduction_a, cb = reduction_a(ca, width)
        self.stage_b = self._stage(lambda: block17(cb, width), repeats[1], mask_depths[1], cb, attention)
        self.reduction_b, cc = reduction_b(cb, width)
        trunk_c = [block8(cc, width) for _ in range(repeats[2] - 1)] + [block8(cc, width, last=True)]
        mask_c = HourglassMask(lambda: block8(cc, width), cc, mask_depths[2]) if attention else None
        self.stage_c = AttentionModule(nn.Sequential(*trunk_c), mask_c)
        self.out_conv = _bc(cc, scaled(1536, width), 1)
        self.out_features = scaled(1536, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _stage(unit: Callable[[], nn.Module], repeats: int, depth: int, channels: int, attention: bool) -> nn.Module:
        mask = HourglassMask(unit, channels, depth) if attention else None
        return AttentionModule(nn.Sequential(*[unit() for _ in range(repeats)]), mask)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (for Grad-CAM / CAM)."""
        x = self.stage_a(self.stem(x))
        x = self.stage_b(self.reduction_a(x))
        x = self.stage_c(self.reduction_b(x))
        return self.out_conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vector (N, out_features) for images (N, in_channels, H >= 75, W >= 75)."""
        return self.dropout(self.pool(self.feature_map(x)).flatten(1))


class _TaskHead(nn.Module):
    """FC256 -> FC128 -> FC2 with the covariates concatenated to the FC256 input."""

    def __init__(self, features: int, covariates: int, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = features + covariates
        for d in dims:
            layers += [nn.Linear(cin, d), nn.ReLU()]
            cin = d
        layers.append(nn.Linear(cin, 2))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([features, covariates], dim=1))


class _TrunkOptions(TypedDict):
    """The keyword arguments of :class:`InceptionAttentionTrunk` that every view branch shares."""

    width: float
    repeats: Sequence[int]
    mask_depths: Sequence[int]
    attention: bool
    dropout: float


class _ViewBranch(nn.Module):
    """One view's model: learned 3x3 conv 1 -> 3, trunk, one head per task."""

    def __init__(self, trunk_kwargs: _TrunkOptions, tasks: int, covariates: int, head_dims: Sequence[int]) -> None:
        super().__init__()
        self.to_rgb = nn.Conv2d(1, 3, 3, padding=1)
        self.trunk = InceptionAttentionTrunk(3, **trunk_kwargs)
        self.heads = nn.ModuleList(_TaskHead(self.trunk.out_features, covariates, head_dims) for _ in range(tasks))

    def forward(self, view: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S), (N, C) -> (N, tasks, 2) logits of FC2."""
        f = self.trunk(self.to_rgb(view))
        return torch.stack([h(f, covariates) for h in self.heads], dim=1)


class MultiViewMultiTask(nn.Module):
    """The M2 network (MMDL): 9 view branches, 2 task heads each, learned fusion.

    Parameters
    ----------
    width
        Channel multiplier of every trunk.
    views
        Number of planar views (paper: 9).
    tasks
        Number of tasks (paper: 2, EGFR and KRAS).
    repeats, mask_depths, attention, dropout
        See :class:`InceptionAttentionTrunk`.
    covariates
        Length of the covariate vector (see :data:`COVARIATE_FEATURES`).
    head_dims
        Hidden FC sizes of each head (paper: 256, 128).
    shared_views
        One branch (trunk + heads) shared by all views instead of one per view.
    """

    def __init__(
        self,
        width: float = 1.0,
        *,
        views: int = 9,
        tasks: int = 2,
        repeats: tuple[int, int, int] = (10, 20, 10),
        mask_depths: tuple[int, int, int] = (2, 1, 1),
        attention: bool = True,
        dropout: float = 0.2,
        covariates: int = len(COVARIATE_FEATURES),
        head_dims: tuple[int, ...] = (256, 128),
        shared_views: bool = False,
    ) -> None:
        super().__init__()
        if views < 1 or tasks < 1:
            raise ValueError(f"views and tasks must be >= 1, got {views}, {tasks}")
        trunk_kwargs: _TrunkOptions = {
            "width": width,
            "repeats": tuple(repeats),
            "mask_depths": tuple(mask_depths),
            "attention": attention,
            "dropout": dropout,
        }
        self.views = views
        self.tasks = tasks
        self.covariates = covariates
        self.shared_views = shared_views
        n_branches = 1 if shared_views else views
        self.branches = nn.ModuleList(
            _ViewBranch(trunk_kwargs, tasks, covariates, head_dims) for _ in range(n_branches)
        )
        self.fusion_weight = nn.Parameter(torch.empty(tasks, views, 2))
        self.fusion_bias = nn.Parameter(torch.zeros(tasks))
        self.apply(init_weights)
        with torch.no_grad():  # start as the mean of (mutant - wild-type) sigmoid outputs over the views
            self.fusion_weight[..., 0] = -1.0 / views
            self.fusion_weight[..., 1] = 1.0 / views

    def branch(self, view: int) -> _ViewBranch:
        """The branch that sees view ``view`` (the one shared branch when ``shared_views``)."""
        return cast(_ViewBranch, self.branches[0 if self.shared_views else view])

    def view_outputs(self, views: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        """Per-view sigmoid outputs O (paper eq. 5-6), shape (N, tasks, views, 2)."""
        n, v = views.shape[0], views.shape[1]
        if v != self.views:
            raise ValueError(f"expected {self.views} views, got input of shape {tuple(views.shape)}")
        if covariates.shape != (n, self.covariates):
            raise ValueError(f"expected covariates of shape ({n}, {self.covariates}), got {tuple(covariates.shape)}")
        if self.shared_views:
            flat = views.reshape(n * v, 1, *views.shape[2:])
            logits = self.branches[0](flat, covariates.repeat_interleave(v, dim=0)).reshape(n, v, self.tasks, 2)
        else:
            logits = torch.stack([b(views[:, j : j + 1], covariates) for j, b in enumerate(self.branches)], dim=1)
        return torch.sigmoid(logits).permute(0, 2, 1, 3)

    def forward(self, views: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        """Fused logits (N, tasks) for views (N, views, S, S) and covariates (N, C); sigmoid -> P (eq. 7-8)."""
        o = self.view_outputs(views, covariates)
        return (o * self.fusion_weight).sum(dim=(2, 3)) + self.fusion_bias


@dataclass(frozen=True)
class Covariates:
    """Patient covariates of M2; ``None`` = unknown.

    Parameters
    ----------
    age
        Age in years at the study date.
    sex
        ``"M"`` or ``"F"`` (DICOM PatientSex; ``"O"`` and empty count as unknown).
    smoking
        True for current or former smokers, False for never-smokers.
    """

    age: float | None = None
    sex: Literal["M", "F"] | None = None
    smoking: bool | None = None


def encode_covariates(items: Sequence[Covariates], age: ZScore) -> np.ndarray:
    """Encode covariates as the (N, 8) float32 matrix of :data:`COVARIATE_FEATURES`.

    Age is z-scored with training statistics (0 and ``age_unknown = 1`` when unknown); sex and
    smoking are one-hot with an explicit "unknown" slot.

    Parameters
    ----------
    items
        One :class:`Covariates` per input item.
    age
        Training-set age statistics (years).

    Returns
    -------
    numpy.ndarray
        Shape (len(items), 8), dtype float32.
    """
    out = np.zeros((len(items), len(COVARIATE_FEATURES)), dtype=np.float32)
    for i, c in enumerate(items):
        if c.age is None or not np.isfinite(c.age):
            out[i, 1] = 1.0
        else:
            out[i, 0] = (c.age - age.mean) / age.std
        out[i, {"M": 2, "F": 3}.get(c.sex or "", 4)] = 1.0
        out[i, 7 if c.smoking is None else (5 if c.smoking else 6)] = 1.0
    return out


@dataclass(frozen=True)
class MultiViewInput:
    """M2 input: the 9 planar views of each nodule (HU) and its patient's covariates.

    Parameters
    ----------
    views
        Shape (N, 9, S, S), S >= 75 (paper: 299).
    covariates
        One :class:`Covariates` per item; empty = all unknown.
    """

    views: np.ndarray
    covariates: tuple[Covariates, ...] = ()


class M2Model(MethodModel[MultiViewInput]):
    """M2 wrapper: views + covariates -> ``{"EGFR": p, "KRAS": p}``.

    Parameters
    ----------
    network
        A :class:`MultiViewMultiTask`.
    labels
        One label per task, in network order (paper: EGFR, KRAS).
    normalisation
        Training-set z-score statistics of the views (HU).
    age
        Training-set age statistics (years).
    device, batch_size
        See :class:`~inference.networks.base.MethodModel`.
    """

    method = "m2"

    def __init__(
        self,
        network: MultiViewMultiTask,
        labels: tuple[str, ...] = ("EGFR", "KRAS"),
        *,
        normalisation: ZScore,
        age: ZScore,
        device: torch.device | str | None = None,
        batch_size: int = 8,
    ) -> None:
        if len(labels) != network.tasks:
            raise ValueError(f"the network has {network.tasks} tasks but labels are {list(labels)}")
        super().__init__(network, labels, device=device, batch_size=batch_size)
        self.normalisation = normalisation
        self.age = age
        self.views = network.views

    def pre_process(self, inputs: MultiViewInput) -> tuple[torch.Tensor, ...]:
        """-> (views (N, 9, S, S) z-scored float32, covariates (N, 8) float32)."""
        views = check_array(inputs.views, "views", 4)
        if views.shape[1] != self.views or views.shape[2] != views.shape[3] or views.shape[2] < MIN_VIEW_SIZE:
            raise ValueError(
                f"views must have shape (N, {self.views}, S, S) with S >= {MIN_VIEW_SIZE}, got {views.shape}"
            )
        covariates = inputs.covariates or (Covariates(),) * views.shape[0]
        if len(covariates) != views.shape[0]:
            raise ValueError(f"{len(covariates)} covariate records for {views.shape[0]} items")
        return (
            torch.from_numpy(self.normalisation.apply(views)),
            torch.from_numpy(encode_covariates(covariates, self.age)),
        )

    def post_process(self, outputs: torch.Tensor) -> Probabilities:
        """Sigmoid of the fused logits: P(mutant) per task."""
        return self._as_dicts(torch.sigmoid(outputs))
