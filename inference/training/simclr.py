"""M3 SimCLR self-supervised pretraining on unlabelled lesion crops (seed 002, section IV-B).

The paper pretrains its EfficientNet-B0 encoder with SimCLR (Chen et al. 2020) on lesion crops of
public liver CT (IRCADb, LiTS17) prepared "with the same algorithm" as its labelled data, then drops
the projection head and fine-tunes the encoder on the mutation labels:

- **Data**: every lesion of every CT + SEG / RTSTRUCT pair under ``[pretrain] studies`` (default:
  ``[data] studies``; labels are not read), cut into M3 slice crops with the package's ``[input]``
  settings (slice inclusion, opening, 1 cm border, window 40 / 400 HU, 128 x 128).
- **Augmentations** (the paper's list): random crop with resize, random flip, random colour
  distortion (on grey crops: brightness and contrast jitter; there is no hue or saturation), random
  Gaussian blur. Two independently augmented views per crop.
- **Encoder**: the M3 network's EfficientNet-B0 backbone *and* its self-attention layer ("in the
  contrastive pretraining scenario, the attention layer is inserted before the model MLP head"),
  mean-pooled: the same modules and key names as :class:`~inference.networks.EfficientNetAttention`,
  so the checkpoint loads into the supervised network by name (``--init-from``).
- **Projection head**: an MLP with one hidden layer (features -> features, ReLU -> ``projection_dim``).
- **Loss**: NT-Xent (normalised temperature-scaled cross-entropy) over the 2N views of a batch.
- The paper trains 1000 epochs (``[pretrain] epochs``); the temperature, batch size and optimiser of
  its pretraining are not given: defaults here are SimCLR's usual 0.5, the M3 batch 16 and M3's SGD
  settings (lr 1e-3, momentum 0.9, weight decay 5e-4).

The checkpoint folder holds ``encoder.pt`` (state dict of the encoder, no projection head) and
``simclr.toml`` (sha256, architecture, input settings, data counts, loss per epoch).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.transform import resize
from torch import nn

from inference.errors import ConfigError, InputError
from inference.training.config import TrainConfig
from inference.training.datasets import TrainingDataError, index_studies, method_inputs, resolve_input_spec

__all__ = [
    "PretrainSettings",
    "SimCLRCheckpoint",
    "SimCLRNet",
    "augment_view",
    "nt_xent",
    "pretrain",
    "pretrain_settings",
    "unlabelled_crops",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class PretrainSettings:
    """``[pretrain]``: the SimCLR stage of M3."""

    studies: Path | None = None
    epochs: int = 1000
    batch_size: int = 16
    temperature: float = 0.5
    projection_dim: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    jitter: float = 0.4
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    min_lesion_ml: float = 0.05


def pretrain_settings(config: TrainConfig, table: Mapping[str, Any] | None) -> PretrainSettings:
    """Validate a ``[pretrain]`` table (relative ``studies`` resolved against the config's folder).

    Raises
    ------
    ConfigError
        Listing every problem.
    """
    table = dict(table or {})
    problems = [f"pretrain.{k}: unknown key" for k in sorted(set(table) - set(PretrainSettings.__dataclass_fields__))]
    base = config.path.parent if config.path else Path.cwd()
    studies = table.pop("studies", None)
    values: dict[str, Any] = {k: v for k, v in table.items() if k in PretrainSettings.__dataclass_fields__}
    for key in ("crop_scale", "blur_sigma"):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    folder = (base / str(studies)).resolve() if studies else config.data.studies
    settings = PretrainSettings(studies=folder, **values) if not problems else PretrainSettings()
    if folder is None or not folder.is_dir():
        problems.append("pretrain.studies: a folder of CT + SEG / RTSTRUCT studies is needed (or [data] studies)")
    if settings.epochs < 1 or settings.batch_size < 2 or settings.temperature <= 0 or settings.projection_dim < 1:
        problems.append("pretrain: epochs >= 1, batch_size >= 2, temperature > 0 and projection_dim >= 1 needed")
    lo, hi = settings.crop_scale
    if not 0 < lo <= hi <= 1:
        problems.append(f"pretrain.crop_scale: 0 < min <= max <= 1, got {settings.crop_scale}")
    if problems:
        raise ConfigError(problems)
    return settings


# ------------------------------------------------------------------------------------------- loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss of SimCLR for two batches of projections of the same N images.

    Each of the 2N projections (L2-normalised) has one positive (the other view of its image)
    and 2N - 2 negatives; the loss is the mean over the 2N anchors of
    ``-log(exp(sim(i, pos) / t) / sum_{k != i} exp(sim(i, k) / t))``.

    Parameters
    ----------
    z1, z2
        torch tensors (N, D), N >= 2.
    temperature
        ``t`` > 0.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs two (N, D) batches with N >= 2, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


# ------------------------------------------------------------------------------------ augmentation


def augment_view(image: np.ndarray, rng: np.random.Generator, settings: PretrainSettings) -> np.ndarray:
    """One SimCLR view of a windowed grey crop (values 0-255): crop + resize, flip, colour jitter, blur.

    Returns
    -------
    numpy.ndarray
        float32, same shape, values in [0, 255].
    """
    h, w = image.shape
    area = rng.uniform(*settings.crop_scale) * h * w
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = round(min(h, max(2, math.sqrt(area / ratio))))
    cw = round(min(w, max(2, math.sqrt(area * ratio))))
    r0 = int(rng.integers(0, h - ch + 1))
    c0 = int(rng.integers(0, w - cw + 1))
    out = resize(
        image[r0 : r0 + ch, c0 : c0 + cw].astype(np.float64), (h, w), order=1, preserve_range=True, anti_aliasing=False
    )
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    if settings.jitter > 0 and rng.random() < 0.8:  # SimCLR applies colour distortion with p = 0.8
        brightness = 1 + rng.uniform(-settings.jitter, settings.jitter)
        contrast = 1 + rng.uniform(-settings.jitter, settings.jitter)
        mean = out.mean()
        out = (out * brightness - mean) * contrast + mean
    if rng.random() < settings.blur_probability:
        out = ndimage.gaussian_filter(out, sigma=rng.uniform(*settings.blur_sigma))
    return np.clip(out, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------ network


class SimCLRNet(nn.Module):
    """The M3 encoder (backbone + self-attention, mean-pooled) with SimCLR's MLP projection head.

    Parameters
    ----------
    architecture
        The M3 ``[architecture]`` table (:class:`~inference.networks.EfficientNetAttention` arguments).
    projection_dim
        Output size of the projection head.
    """

    def __init__(self, architecture: Mapping[str, Any], projection_dim: int = 128) -> None:
        super().__init__()
        from inference.networks import EfficientNetAttention

        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in architecture.items()}
        template = EfficientNetAttention(num_labels=1, **kwargs)
        self.backbone = template.backbone
        self.attention = template.attention
        self.act = template.act
        features = self.backbone.out_channels
        self.projection = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, projection_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Representation (N, features): what the supervised network pools before its classifier."""
        tokens = self.backbone(x).flatten(2).transpose(1, 2)
        if self.attention is not None:
            tokens = self.act(self.attention(tokens, tokens, tokens, need_weights=False)[0])
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projections (N, projection_dim)."""
        return cast(torch.Tensor, self.projection(self.encode(x)))

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The state dict without the projection head (key names of the supervised network)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("projection.")}


# --------------------------------------------------------------------------------------------- data


def unlabelled_crops(
    studies_dir: Path,
    input_spec: Mapping[str, Any],
    *,
    min_volume_ml: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int, int]:
    """M3 crops of every lesion of every CT + segmentation pair under ``studies_dir`` (no labels needed).

    Returns
    -------
    tuple
        ``(crops (n, H, W) in 0-255, lesions, studies)``.

    Raises
    ------
    TrainingDataError
        No lesion could be cut.
    """
    import pydicom

    from inference.imaging.lesions import find_lesions
    from inference.imaging.masks import load_segmentation, phase_of_segmentation
    from inference.imaging.volume import load_ct_series

    studies = index_studies(studies_dir)
    spec = resolve_input_spec("m3", input_spec)
    crops: list[np.ndarray] = []
    lesions = 0
    for done, files in enumerate(studies.values(), start=1):
        try:
            segmentation = pydicom.dcmread(files.segmentation)
            volume = load_ct_series(
                files.ct_files, choose_phase=functools.partial(phase_of_segmentation, segmentation=segmentation)
            )
            for mask in (m for m in load_segmentation(segmentation, volume) if m.ok):
                for lesion in find_lesions(mask, volume, min_volume_ml=min_volume_ml):
                    try:
                        crops.append(method_inputs("m3", spec, volume, lesion.mask)["slices"])
                        lesions += 1
                    except (InputError, ValueError) as exc:
                        logger.warning("a lesion was skipped: %s", exc)
        except InputError as exc:
            logger.warning("study %d of %d was skipped: %s", done, len(studies), exc)
        if progress is not None:
            progress(done, len(studies))
    if not crops:
        raise TrainingDataError(f"no lesion crop could be cut from the studies under {studies_dir}")
    return np.concatenate(crops).astype(np.float32), lesions, len(studies)


# ------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class SimCLRCheckpoint:
    """What :func:`pretrain` wrote."""

    folder: Path
    crops: int
    lesions: int
    epochs: int
    losses: tuple[float, ...] = field(default_factory=tuple)
    probe_before: float = math.nan
    probe_after: float = math.nan

    @property
    def first_loss(self) -> float:
        """NT-Xent of the first epoch."""
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        """NT-Xent of the last epoch."""
        return self.losses[-1]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2:  # NT-Xent needs a negative; batch norm two items
            yield idx


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def pretrain(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> SimCLRCheckpoint:
    """Run SimCLR pretraining of the M3 encoder and write a checkpoint folder.

    ``[pretrain]`` comes from the training configuration (``config.pretrain``); ``[input]`` and
    ``[architecture]`` are the ones the supervised training will use, ``seed`` and ``threads`` too.

    Parameters
    ----------
    config
        A validated M3 training configuration.
    out_dir
        Checkpoint folder to create (must not hold a checkpoint yet).
    work_dir
        Unused (phantom cohorts are not needed: pretraining reads DICOM folders).
    progress
        ``progress(stage, done, total, note)``.

    Returns
    -------
    SimCLRCheckpoint

    Raises
    ------
    ConfigError
        Invalid ``[pretrain]`` table, not an M3 configuration, or ``out_dir`` holds a checkpoint.
    TrainingDataError
        No lesion crop found.
    """
    progress = progress or (lambda *a: None)
    if config.method != "m3":
        raise ConfigError([f"pretrain: SimCLR pretraining is for m3, not {config.method}"])
    settings = pretrain_settings(config, config.pretrain)
    out = Path(out_dir)
    if (out / "simclr.toml").exists():
        raise ConfigError([f"pretrain: {out} already holds a SimCLR checkpoint; choose a new folder"])
    assert settings.studies is not None
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng([config.seed, 202])
    crops, lesions, studies = unlabelled_crops(
        settings.studies,
        config.input,
        min_volume_ml=settings.min_lesion_ml,
        progress=lambda d, t: progress("loading", d, t, "studies (unlabelled)"),
    )
    mean, std = float(crops.mean()), float(max(crops.std(), 1e-6))
    net = SimCLRNet(config.architecture, settings.projection_dim)
    optimiser = torch.optim.SGD(
        net.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    # a fixed set of view pairs, scored before and after: the per-epoch losses move with the augmentation
    probe_rng = np.random.default_rng([config.seed, 303])
    probe_idx = probe_rng.permutation(len(crops))[: max(2, min(len(crops), 4 * settings.batch_size))]
    probe = [
        torch.from_numpy((np.stack([augment_view(crops[i], probe_rng, settings) for i in probe_idx]) - mean) / std)
        .float()
        .unsqueeze(1)
        for _ in range(2)
    ]

    def probe_loss() -> float:
        net.eval()
        with torch.no_grad():
            return float(nt_xent(net(probe[0]), net(probe[1]), settings.temperature))

    probe_before = probe_loss()
    losses: list[float] = []
    for epoch in range(1, settings.epochs + 1):
        net.train()
        epoch_losses = []
        for idx in _batches(len(crops), settings.batch_size, rng):
            views = [np.stack([augment_view(crops[i], rng, settings) for i in idx]) for _ in range(2)]
            x1, x2 = (torch.from_numpy((v - mean) / std).float().unsqueeze(1) for v in views)
            loss = nt_xent(net(x1), net(x2), settings.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            epoch_losses.append(float(loss.detach()))
        if not epoch_losses:
            raise TrainingDataError(f"pretrain: {len(crops)} crop(s) is too few for a batch of two")
        losses.append(float(np.mean(epoch_losses)))
        progress("simclr", epoch, settings.epochs, f"NT-Xent {losses[-1]:.4f}")
    probe_after = probe_loss()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "encoder.pt"
    torch.save(net.encoder_state(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta: dict[str, Any] = {
        "method": "m3",
        "stage": "SimCLR self-supervised pretraining (encoder: EfficientNet-B0 + self-attention)",
        "crops": len(crops),
        "lesions": lesions,
        "studies": studies,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "temperature": settings.temperature,
        "projection_dim": settings.projection_dim,
        "seconds": round(time.monotonic() - started, 1),
        "nt_xent_per_epoch": [round(v, 5) for v in losses],
        "nt_xent_fixed_pairs_before": round(probe_before, 5),
        "nt_xent_fixed_pairs_after": round(probe_after, 5),
    }
    lines = [f"{k} = {_toml_value(v)}" for k, v in meta.items()]
    lines += ["", "[weights]", f'file = "{weights.name}"', f'sha256 = "{digest}"', "", "[architecture]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.architecture.items()]
    lines += ["", "[input]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in resolve_input_spec("m3", config.input).items()]
    (out / "simclr.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("SimCLR pretraining: %d crops, %d epochs", len(crops), settings.epochs)
    return SimCLRCheckpoint(out, len(crops), lesions, settings.epochs, tuple(losses), probe_before, probe_after)
