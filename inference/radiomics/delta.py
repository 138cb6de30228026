"""The four delta-radiomics features of the 8-week response signature (M5, Dercle et al. 2020).

Per lesion and time point (:func:`lesion_features`):

``si4``
    Shape curvature: the fraction of the lesion surface whose Koenderink shape index lies in bin 4 of
    9, i.e. in [-1/3, -1/9) (see :mod:`inference.radiomics.shape`). No pyradiomics equivalent.
``log_z_entropy`` / ``log_x_entropy``
    Entropy (bits) of the lesion's voxel values after a one-dimensional Laplacian-of-Gaussian filter
    along the image z axis (slice normal, cranio-caudal on axial CT) / the image x axis (along the
    image rows, patient left-right on axial CT). The filter is SimpleITK's
    ``RecursiveGaussianImageFilter`` with order 2 (second derivative of a Gaussian) along that one axis
    only, sigma in mm, per mm (divided by the spacing squared) and normalised across scale (multiplied
    by sigma^2, as pyradiomics' 3D LoG is), so the output is in HU. The histogram uses the fixed bin
    width of the parameter file, with bin edges at multiples of the width (pyradiomics'
    discretisation), and ``entropy = -sum p log2 p``. pyradiomics
    has only the 3D LoG (sum over the three axes); its entropy at the same sigma
    (``log-sigma-<s>-mm-3D_firstorder_Entropy``) is kept in ``LesionFeatures.reference``.
``ngtdm_contrast``
    pyradiomics ``original_ngtdm_Contrast`` (neighbouring grey-tone difference matrix, the paper's
    "GTDM contrast"), with the settings of ``config/radiomics/response.yaml`` (bin width 5 HU).

Per patient and time point (:func:`patient_features`): the average of each feature over all lesions
segmented at that time point, weighted by lesion volume.

Delta (:func:`feature_deltas`), by ``definition`` (the seed does not state its formula - it is in
the paper's supplement, which the seed lacks - so the default is a continuous one):

- ``"symmetric"`` (default): ``(follow_up - baseline) / ((|baseline| + |follow_up|) / 2 + floor)``
  with a small per-feature ``floor`` (:data:`DELTA_FLOORS`): continuous everywhere, bounded in
  (-2, 2), about the relative change for small changes of a feature well above its floor; SI4 going
  from 0 to a small value no longer jumps from a relative to an absolute scale.
- ``"relative"`` (packages trained before, whose ``[input]`` has no ``delta_definition``):
  ``(follow_up - baseline) / |baseline|``; when ``|baseline|`` is below ``DELTA_EPSILON x
  FEATURE_SCALES[name]`` the absolute change ``follow_up - baseline`` instead - discontinuous at a zero
  baseline (e.g. SI4 = 0 for a convex lesion).

Both the relative and the absolute change are kept in :class:`FeatureDelta`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from inference.imaging.volume import CTVolume
from inference.radiomics.features import compute_features, feature_unit
from inference.radiomics.shape import SMOOTHING_MM, SMOOTHING_VOXELS, si4
from inference.response.results import (  # noqa: F401 - the types live there
    FEATURE_LABELS,
    FEATURE_NAMES,
    FeatureDelta,
    FeatureDeltas,
    LesionFeatures,
    PatientFeatures,
)
from inference.results import FeatureValue

RESPONSE_PARAMS = Path(__file__).resolve().parents[2] / "config" / "radiomics" / "response.yaml"
"""The M5 parameter file (in the source tree; see RESPONSE_SETTINGS when installed)."""

RESPONSE_SETTINGS: dict[str, Any] = {
    "setting": {"binWidth": 5, "label": 1, "additionalInfo": True, "minimumROIDimensions": 2, "padDistance": 5},
    "imageType": {"Original": {}, "LoG": {"sigma": [3.0]}},
    "featureClass": {"shape": ["VoxelVolume", "MeshVolume"], "firstorder": ["Entropy"], "ngtdm": ["Contrast"]},
}
"""The settings of ``config/radiomics/response.yaml``, embedded for installs without the file."""

DELTA_EPSILON = 1e-6
"""Relative threshold below which a baseline counts as zero (times the feature's scale)."""
FEATURE_SCALES: dict[str, float] = dict.fromkeys(FEATURE_NAMES, 1.0)
"""Typical magnitude of each feature; ``DELTA_EPSILON x scale`` is its zero threshold."""

DELTA_DEFINITIONS = ("symmetric", "relative")
"""Delta definitions; a response package records its own in ``[input] delta_definition``."""
DEFAULT_DELTA = "symmetric"
DELTA_FLOORS: dict[str, float] = {
    "si4": 0.2,
    "log_z_entropy": 0.01,
    "log_x_entropy": 0.01,
    "ngtdm_contrast": 0.001,
}
"""Per-feature floor of the symmetric delta's denominator: small against the feature's usual values
(entropies a few bits, NGTDM contrast at 5 HU bins 0.01-1) and, for SI4 (a fraction of the surface,
0 for a convex lesion, moving by ~0.01 between rigid resamplings), a typical magnitude, so the
delta of a near-zero SI4 stays small."""

Axis = Literal["x", "y", "z"]
_AXIS_INDEX = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class LogSettings:
    """Sigma (mm) and histogram bin width of the LoG entropies, read from the parameter file."""

    sigma_mm: float
    bin_width: float


def log_settings(params: Path | Mapping[str, Any] | None = None) -> LogSettings:
    """The LoG sigma (first of ``imageType.LoG.sigma``) and ``setting.binWidth`` of a parameter set.

    Parameters
    ----------
    params
        pyradiomics parameter file or mapping; None for :data:`RESPONSE_PARAMS` (or the embedded copy).

    Returns
    -------
    LogSettings

    Raises
    ------
    ValueError
        The parameters enable no LoG image type with a sigma, or no positive bin width.
    """
    data = _params_mapping(params)
    sigmas = (data.get("imageType") or {}).get("LoG", {}) or {}
    sigma_list = sigmas.get("sigma") or (data.get("setting") or {}).get("sigma") or []
    if not sigma_list:
        raise ValueError("the response parameters must enable imageType LoG with a sigma (mm)")
    bin_width = float((data.get("setting") or {}).get("binWidth", 0) or 0)
    if bin_width <= 0:
        raise ValueError("the response parameters must set a positive setting.binWidth")
    return LogSettings(sigma_mm=float(sigma_list[0]), bin_width=bin_width)


def _params_mapping(params: Path | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if params is None:
        if not RESPONSE_PARAMS.is_file():
            return RESPONSE_SETTINGS
        params = RESPONSE_PARAMS
    if isinstance(params, Path):
        from ruamel.yaml import YAML  # installed with pyradiomics (pykwalify)

        loaded = YAML(typ="safe", pure=True).load(params.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{params} is not a pyradiomics parameter mapping")
        return loaded
    return params


def log_axis_entropy(volume: CTVolume, mask: np.ndarray, axis: Axis, *, sigma_mm: float, bin_width: float) -> float:
    """Entropy of a lesion after a 1D Laplacian-of-Gaussian filter along one image axis.

    Parameters
    ----------
    volume
        CT volume in HU.
    mask
        Bool (z, y, x) lesion mask on the grid of ``volume``.
    axis
        ``"x"`` (image columns), ``"y"`` (image rows) or ``"z"`` (slice normal).
    sigma_mm
        Width of the Gaussian (mm, physical: the filter uses the voxel spacing).
    bin_width
        Histogram bin width (HU of the scale-normalised filter output).

    Returns
    -------
    float
        ``-sum p log2 p`` over the non-empty bins (bits); 0 for a single-voxel lesion.

    Raises
    ------
    ValueError
        Mask not on the grid of ``volume``, empty mask, unknown axis, or non-positive sigma / bin width.
    """
    values = log_axis_values(volume, mask, axis, sigma_mm=sigma_mm)
    return histogram_entropy(values, bin_width)


def log_axis_values(volume: CTVolume, mask: np.ndarray, axis: Axis, *, sigma_mm: float) -> np.ndarray:
    """Values inside the mask of the 1D LoG (scale-normalised 2nd Gaussian derivative) along ``axis``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} is not the volume shape {volume.shape}")
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    if axis not in _AXIS_INDEX:
        raise ValueError(f'axis must be "x", "y" or "z", got {axis!r}')
    if sigma_mm <= 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
    zz, yy, xx = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    nz, ny, nx = volume.shape
    lo, size = [], []
    for idx, n, spacing in zip((xx, yy, zz), (nx, ny, nz), volume.spacing_xyz, strict=True):
        margin = math.ceil(4.0 * sigma_mm / spacing) + 2
        start, stop = max(0, int(idx[0]) - margin), min(n, int(idx[-1]) + margin + 1)
        lo.append(start)
        size.append(stop - start)
    region = sitk.RegionOfInterest(volume.image, size, lo)
    region = sitk.Cast(region, sitk.sitkFloat32)
    filt = sitk.RecursiveGaussianImageFilter()
    filt.SetDirection(_AXIS_INDEX[axis])
    filt.SetOrder(sitk.RecursiveGaussianImageFilter.SecondOrder)
    filt.SetSigma(float(sigma_mm))
    filt.SetNormalizeAcrossScale(True)
    filtered = sitk.GetArrayFromImage(filt.Execute(region))
    # The recursive filter differentiates per voxel: divide by spacing^2 for a derivative per mm (as
    # LaplacianRecursiveGaussianImageFilter, pyradiomics' 3D LoG, does).
    spacing = volume.spacing_xyz[_AXIS_INDEX[axis]]
    local = mask[lo[2] : lo[2] + size[2], lo[1] : lo[1] + size[1], lo[0] : lo[0] + size[0]]
    return filtered[local].astype(np.float64) / spacing**2


def histogram_entropy(values: np.ndarray, bin_width: float) -> float:
    """Shannon entropy (bits) of values binned with a fixed width, edges at multiples of the width.

    Parameters
    ----------
    values
        1D array of values.
    bin_width
        Bin width (> 0).

    Returns
    -------
    float
        ``-sum p log2 p`` over non-empty bins; 0 for fewer than 2 distinct bins.
    """
    if bin_width <= 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to bin")
    bins = np.floor(values / bin_width).astype(np.int64)
    _, counts = np.unique(bins, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) if len(p) > 1 else 0.0


def lesion_features(
    volume: CTVolume,
    mask: np.ndarray,
    *,
    params: Path | Mapping[str, Any] | None = None,
    smoothing_mm: float = SMOOTHING_MM,
    smoothing_voxels: float = SMOOTHING_VOXELS,
) -> tuple[LesionFeatures, dict[str, str]]:
    """The four signature features of one lesion at one time point.

    Parameters
    ----------
    volume
        CT volume in HU.
    mask
        Bool (z, y, x) lesion mask on the grid of ``volume``.
    params
        pyradiomics parameter file or mapping; None for ``config/radiomics/response.yaml``.
    smoothing_mm, smoothing_voxels
        SI4 mask smoothing (see :func:`inference.radiomics.shape.shape_index_surface`).

    Returns
    -------
    tuple of LesionFeatures and dict
        The features, and the provenance of the computation (pyradiomics provenance, LoG sigma and
        bin width, SI4 smoothing, and which pyradiomics feature each one corresponds to).

    Raises
    ------
    ValueError
        The mask is not on the grid of ``volume`` or is empty.
    inference.radiomics.features.FeatureError
        pyradiomics rejects the lesion (e.g. smaller than ``minimumROIDimensions``).
    """
    if params is None and not RESPONSE_PARAMS.is_file():
        params = RESPONSE_SETTINGS
    feature_set = compute_features(volume, mask, params=params if params is not None else RESPONSE_PARAMS)
    settings = log_settings(_settings_from_provenance(feature_set.provenance) or params)
    pyrad = feature_set.features
    sigma_tag = str(settings.sigma_mm).replace(".", "-")
    log3d = f"log-sigma-{sigma_tag}-mm-3D_firstorder_Entropy"
    ngtdm = pyrad.get("original_ngtdm_Contrast")
    if ngtdm is None:
        raise ValueError("the response parameters must enable ngtdm Contrast on the original image")
    mask = np.asarray(mask, dtype=bool)
    features = LesionFeatures(
        si4=si4(mask, volume.spacing_xyz, smoothing_mm=smoothing_mm, smoothing_voxels=smoothing_voxels),
        log_z_entropy=log_axis_entropy(volume, mask, "z", sigma_mm=settings.sigma_mm, bin_width=settings.bin_width),
        log_x_entropy=log_axis_entropy(volume, mask, "x", sigma_mm=settings.sigma_mm, bin_width=settings.bin_width),
        ngtdm_contrast=float(ngtdm),
        volume_ml=float(mask.sum()) * volume.voxel_volume_mm3 / 1000.0,
        reference=tuple(
            FeatureValue(name, float(value), feature_unit(name))
            for name, value in sorted(pyrad.items())
            if name != "original_ngtdm_Contrast"
        ),
    )
    provenance = {
        **feature_set.provenance,
        "log_sigma_mm": repr(settings.sigma_mm),
        "log_bin_width": repr(settings.bin_width),
        "log_filter": "SimpleITK RecursiveGaussianImageFilter, order 2, one axis, NormalizeAcrossScale",
        "si4_smoothing_mm": repr(max(smoothing_mm, smoothing_voxels * max(volume.spacing_xyz))),
        "equivalent_si4": "none in pyradiomics",
        "equivalent_log_z_entropy": f"{log3d} (3D LoG, all axes)",
        "equivalent_log_x_entropy": f"{log3d} (3D LoG, all axes)",
        "equivalent_ngtdm_contrast": "original_ngtdm_Contrast (identical)",
    }
    return features, provenance


def _settings_from_provenance(provenance: Mapping[str, str]) -> Mapping[str, Any] | None:
    """The extractor's canonical settings as a parameter mapping (None if absent)."""
    try:
        canonical = json.loads(provenance["settings"])
    except (KeyError, ValueError):
        return None
    return {"setting": canonical.get("setting", {}), "imageType": canonical.get("imageType", {})}


def patient_features(lesions: Sequence[LesionFeatures]) -> PatientFeatures:
    """Volume-weighted average of the four features over the lesions of one time point.

    Parameters
    ----------
    lesions
        Features of every lesion segmented at that time point.

    Returns
    -------
    PatientFeatures

    Raises
    ------
    ValueError
        No lesion, or a total volume of zero.
    """
    if not lesions:
        raise ValueError("no lesion to average")
    weights = np.array([lesion.volume_ml for lesion in lesions], dtype=float)
    if weights.sum() <= 0:
        raise ValueError("the lesions have no volume")
    averaged = {
        name: float(np.average([getattr(lesion, name) for lesion in lesions], weights=weights))
        for name in FEATURE_NAMES
    }
    return PatientFeatures(**averaged, total_volume_ml=float(weights.sum()), lesion_count=len(lesions))


def feature_delta(
    name: str,
    baseline: float,
    follow_up: float,
    *,
    epsilon: float | None = None,
    definition: str = DEFAULT_DELTA,
) -> FeatureDelta:
    """The change of one feature (``definition``: ``"symmetric"`` or ``"relative"``, see the module).

    Parameters
    ----------
    name
        Feature name (one of :data:`FEATURE_NAMES`, or any name when ``epsilon`` is given).
    baseline, follow_up
        The feature at both time points.
    epsilon
        Zero threshold for ``|baseline|`` of the relative change; default ``DELTA_EPSILON x FEATURE_SCALES[name]``.
    definition
        Which value :attr:`FeatureDelta.value` gives.

    Returns
    -------
    FeatureDelta
    """
    if definition not in DELTA_DEFINITIONS:
        raise ValueError(f"delta definition must be one of {DELTA_DEFINITIONS}, got {definition!r}")
    if epsilon is None:
        epsilon = DELTA_EPSILON * FEATURE_SCALES.get(name, 1.0)
    baseline, follow_up = float(baseline), float(follow_up)
    absolute = follow_up - baseline
    relative = None if abs(baseline) < epsilon else absolute / abs(baseline)
    return FeatureDelta(
        name=name,
        baseline=baseline,
        follow_up=follow_up,
        absolute=absolute,
        relative=relative,
        definition=definition,
        floor=DELTA_FLOORS.get(name, 1e-3),
    )


def feature_deltas(
    baseline: LesionFeatures | PatientFeatures,
    follow_up: LesionFeatures | PatientFeatures,
    *,
    definition: str = DEFAULT_DELTA,
) -> FeatureDeltas:
    """Deltas of the four features between two time points (patient level or one lesion).

    Parameters
    ----------
    baseline, follow_up
        Features at baseline and at follow-up.
    definition
        ``"symmetric"`` (default) or ``"relative"`` (a package's ``[input] delta_definition``).

    Returns
    -------
    FeatureDeltas
        In :data:`FEATURE_NAMES` order.
    """
    b, f = baseline.values(), follow_up.values()
    return FeatureDeltas(tuple(feature_delta(name, b[name], f[name], definition=definition) for name in FEATURE_NAMES))
