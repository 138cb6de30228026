"""Radiomic features of one lesion with pyradiomics, on the exact CT geometry.

The image handed to pyradiomics is the CT cropped to the lesion's bounding box plus a margin
(same spacing, direction and physical position), which gives the same values as the full image
in a fraction of the time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from inference.errors import InputError
from inference.imaging.volume import CTVolume

logger = logging.getLogger(__name__)
# pyradiomics logs every step at INFO and "GLCM is symmetrical..." at WARNING: keep errors only, both
# on its own stderr handler and for whatever the service attaches to the root logger.
radiomics.setVerbosity(logging.ERROR)
logging.getLogger("radiomics").setLevel(logging.ERROR)

DEFAULT_PARAMS = Path(__file__).resolve().parents[2] / "config" / "radiomics" / "default.yaml"
"""The node's default parameter file (in the source tree; see DEFAULT_SETTINGS when installed)."""

DEFAULT_SETTINGS: dict[str, Any] = {
    "setting": {"binWidth": 25, "label": 1, "additionalInfo": True, "minimumROIDimensions": 2, "padDistance": 5},
    "imageType": {"Original": {}},
    "featureClass": {
        "shape": [
            "VoxelVolume",
            "MeshVolume",
            "SurfaceArea",
            "Sphericity",
            "Maximum2DDiameterSlice",
            "Maximum3DDiameter",
        ],
        "firstorder": ["Mean", "Variance", "RootMeanSquared", "Entropy", "Kurtosis", "Skewness"],
        "glcm": ["Contrast", "JointEntropy"],
        "ngtdm": ["Contrast"],
    },
}
"""The settings of ``config/radiomics/default.yaml``, embedded for installs without the file."""

COMPARATOR_PARAMS = DEFAULT_PARAMS.with_name("comparator.yaml")
"""The radiomics comparator's default parameter file: Original + LoG (1, 3, 5 mm) + wavelet, every class."""

COMPARATOR_SETTINGS: dict[str, Any] = {
    "setting": {"binWidth": 25, "label": 1, "additionalInfo": True, "minimumROIDimensions": 2, "padDistance": 5},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0, 5.0]}, "Wavelet": {}},
    "featureClass": dict.fromkeys(("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")),
}
"""The settings of ``config/radiomics/comparator.yaml``, embedded for installs without the file."""

CROP_MARGIN_VOXELS = 10
"""Margin around the lesion bounding box for unfiltered features (>= pyradiomics' padDistance)."""

_PROVENANCE_DIAGNOSTICS = {
    "diagnostics_Versions_PyRadiomics": "pyradiomics_version",
    "diagnostics_Versions_Numpy": "numpy_version",
    "diagnostics_Versions_SimpleITK": "simpleitk_version",
    "diagnostics_Versions_PyWavelet": "pywavelet_version",
    "diagnostics_Versions_Python": "python_version",
    "diagnostics_Mask-original_VoxelNum": "mask_voxel_count",
}


class FeatureError(InputError):
    """pyradiomics cannot compute features for this lesion (too small, flat, ...)."""


@dataclass(frozen=True)
class FeatureSet:
    """Features of one lesion and how they were computed.

    ``features`` maps pyradiomics names (``original_shape_VoxelVolume``) to values;
    ``provenance`` holds ``pyradiomics_version``, ``parameter_hash`` (sha256 of the canonical
    settings), ``settings`` (that canonical JSON), ``parameter_source`` and a few diagnostics.
    """

    features: dict[str, float]
    provenance: dict[str, str]


_extractors: dict[str, tuple[RadiomicsFeatureExtractor, str]] = {}


def _extractor(params: Path | Mapping[str, Any] | None) -> tuple[RadiomicsFeatureExtractor, str, str]:
    """Extractor for ``params`` (cached), its canonical settings JSON and a description of the source."""
    embedded = False
    if params is None:
        embedded = not DEFAULT_PARAMS.is_file()
        params = DEFAULT_SETTINGS if embedded else DEFAULT_PARAMS
    if isinstance(params, Path):
        if not params.is_file():
            raise FileNotFoundError(f"radiomics parameter file {params} does not exist")
        key, source = f"file:{params.resolve()}:{params.stat().st_mtime_ns}", str(params)
    else:
        params = copy.deepcopy(dict(params))
        key = "mapping:" + json.dumps(params, sort_keys=True, default=str)
        source = "embedded default" if embedded else "mapping"
    if key not in _extractors:
        with warnings.catch_warnings():  # pykwalify (parameter validation) uses importlib's load_module
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            extractor = RadiomicsFeatureExtractor(str(params) if isinstance(params, Path) else params)
        canonical = json.dumps(
            {
                "setting": extractor.settings,
                "imageType": extractor.enabledImagetypes,
                "featureClass": extractor.enabledFeatures,
            },
            sort_keys=True,
            default=str,
            separators=(",", ":"),
        )
        _extractors[key] = (extractor, canonical)
    extractor, canonical = _extractors[key]
    return extractor, canonical, source


def comparator_params() -> Path | Mapping[str, Any]:
    """The comparator's default parameters: :data:`COMPARATOR_PARAMS`, else :data:`COMPARATOR_SETTINGS`."""
    return COMPARATOR_PARAMS if COMPARATOR_PARAMS.is_file() else COMPARATOR_SETTINGS


def canonical_settings(params: Path | Mapping[str, Any] | None) -> str:
    """The canonical settings JSON pyradiomics would use for ``params`` (what a package records).

    Raises
    ------
    FileNotFoundError
        A parameter file that does not exist.
    ValueError
        pyradiomics refuses the parameters.
    """
    try:
        return _extractor(params)[1]
    except FileNotFoundError:
        raise
    except Exception as exc:  # pykwalify's SchemaError and friends
        raise ValueError(f"pyradiomics refuses the parameters: {exc}") from exc


def _image_type_names(image_types: Mapping[str, Any], setting: Mapping[str, Any]) -> set[str] | None:
    """Prefixes (``original``, ``log-sigma-3-0-mm-3D``, ``wavelet-HLL``) the image types produce; None = any."""
    names: set[str] = set()
    for kind, custom in image_types.items():
        kind_l = kind.lower()
        if kind_l == "original":
            names.add("original")
        elif kind_l == "log":
            sigmas = (custom or {}).get("sigma") or setting.get("sigma") or []
            for sigma in sigmas:
                names.add("log-sigma-" + str(float(sigma)).replace(".", "-") + "-mm-3D")
        elif kind_l == "wavelet":
            names.update(f"wavelet-{b}" for b in ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL"))
        else:  # square, gradient, lbp ...: their names depend on more settings; accept their prefix
            return None
    return names


def uncomputable_features(settings: str | Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The feature names that pyradiomics with ``settings`` would not compute.

    Parameters
    ----------
    settings
        Canonical settings JSON (as a package records it) or a mapping with ``setting`` / ``imageType``
        / ``featureClass``.
    names
        pyradiomics feature names (``<image type>_<class>_<feature>``).

    Returns
    -------
    list of str
        Names whose image type, class or feature is not enabled (or that are not pyradiomics names).
    """
    params = json.loads(settings) if isinstance(settings, str) else dict(settings)
    image_types = params.get("imageType") or {}
    classes = params.get("featureClass") or {}
    setting = params.get("setting") or {}
    prefixes = _image_type_names(image_types, setting)
    missing = []
    for name in names:
        parts = name.split("_", 2)
        if len(parts) != 3:
            missing.append(name)
            continue
        image, cls, feature = parts
        if prefixes is not None and image not in prefixes:
            missing.append(name)
            continue
        if cls not in classes or (cls in ("shape", "shape2D") and image != "original"):
            missing.append(name)
            continue
        enabled = classes.get(cls)
        if enabled and feature not in enabled:
            missing.append(name)
    return missing


_COMPARED_SETTINGS = (
    "binWidth",
    "binCount",
    "resampledPixelSpacing",
    "interpolator",
    "normalize",
    "normalizeScale",
    "removeOutliers",
    "resegmentRange",
    "force2D",
    "voxelArrayShift",
)


def settings_mismatch(settings: str | Mapping[str, Any], diagnostics: Mapping[str, str]) -> list[str]:
    """Differences between parameters and a features CSV's pyradiomics diagnostics columns.

    Parameters
    ----------
    settings
        Canonical settings JSON or parameter mapping (what the node would compute with).
    diagnostics
        ``diagnostics_Configuration_Settings`` / ``diagnostics_Configuration_EnabledImageTypes`` values
        of the CSV (Python literals, as pyradiomics writes them); absent keys are not compared.

    Returns
    -------
    list of str
        One readable line per difference (empty when they agree or the CSV has no diagnostics).
    """
    import ast

    params = json.loads(settings) if isinstance(settings, str) else dict(settings)
    out = []
    raw = diagnostics.get("diagnostics_Configuration_Settings")
    if raw:
        try:
            csv_settings = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return [f"diagnostics_Configuration_Settings is not readable: {raw[:80]!r}"]
        ours = params.get("setting") or {}
        for key in _COMPARED_SETTINGS:
            a, b = ours.get(key), csv_settings.get(key)
            if isinstance(a, list | tuple) or isinstance(b, list | tuple):
                a = [float(v) for v in a] if a else None
                b = [float(v) for v in b] if b else None
            if a != b and not (a in (None, False) and b in (None, False)):
                out.append(f"setting {key}: the CSV was computed with {b!r}, the parameters say {a!r}")
    raw = diagnostics.get("diagnostics_Configuration_EnabledImageTypes")
    if raw:
        try:
            csv_types = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return [*out, f"diagnostics_Configuration_EnabledImageTypes is not readable: {raw[:80]!r}"]
        ours_types = params.get("imageType") or {}
        if set(csv_types) != set(ours_types):
            out.append(f"image types: the CSV has {sorted(csv_types)}, the parameters {sorted(ours_types)}")
        for kind in set(csv_types) & set(ours_types):
            a = (ours_types.get(kind) or {}).get("sigma")
            b = (csv_types.get(kind) or {}).get("sigma")
            if a and b and [float(v) for v in a] != [float(v) for v in b]:
                out.append(f"{kind} sigma: the CSV has {b}, the parameters {a}")
    return out


def _margin(extractor: RadiomicsFeatureExtractor, volume: CTVolume) -> int:
    """Crop margin in voxels large enough for the enabled filters and pyradiomics' padding."""
    pad = int(extractor.settings.get("padDistance", 5) or 5)
    margin = max(CROP_MARGIN_VOXELS, pad + 5)
    sigmas = extractor.enabledImagetypes.get("LoG", {}).get("sigma") or extractor.settings.get("sigma") or []
    if sigmas:
        margin += math.ceil(4 * max(sigmas) / min(volume.spacing_xyz))
    if set(extractor.enabledImagetypes) - {"Original", "LoG"} or extractor.settings.get("resampledPixelSpacing"):
        margin += 32  # wavelet / gradient / LBP / resampling: look further out
    return margin


def compute_features(
    volume: CTVolume,
    mask: np.ndarray,
    *,
    params: Path | Mapping[str, Any] | None = None,
    crop: bool = True,
) -> FeatureSet:
    """Compute pyradiomics features of one lesion.

    Parameters
    ----------
    volume
        CT volume in HU.
    mask
        Bool (z, y, x) lesion mask on the grid of ``volume``.
    params
        pyradiomics parameter file (YAML/JSON), a parameter mapping in the same structure
        (``setting`` / ``imageType`` / ``featureClass``), or None for the node's defaults
        (:data:`DEFAULT_PARAMS`, else :data:`DEFAULT_SETTINGS`).
    crop
        Crop to the mask's bounding box plus a margin first (same values, much faster).

    Returns
    -------
    FeatureSet
        ``diagnostics_*`` entries are left out of ``features``; versions and the mask voxel
        count go to ``provenance``.

    Raises
    ------
    ValueError
        The mask is not on the volume grid or is empty.
    FeatureError
        pyradiomics rejects the lesion (e.g. smaller than ``minimumROIDimensions``).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} is not the volume shape {volume.shape}")
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    extractor, canonical, source = _extractor(params)
    label = int(extractor.settings.get("label", 1))
    image = volume.image
    if crop:
        zz, yy, xx = (
            np.nonzero(mask.any(axis=(1, 2)))[0],
            np.nonzero(mask.any(axis=(0, 2)))[0],
            np.nonzero(mask.any(axis=(0, 1)))[0],
        )
        m = _margin(extractor, volume)
        nz, ny, nx = volume.shape
        lo = [max(0, int(a[0]) - m) for a in (xx, yy, zz)]
        hi = [min(n, int(a[-1]) + m + 1) for a, n in ((xx, nx), (yy, ny), (zz, nz))]
        image = sitk.RegionOfInterest(image, [h - lo_ for h, lo_ in zip(hi, lo, strict=True)], lo)
        mask = mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8) * np.uint8(label))
    mask_image.CopyInformation(image)
    try:
        result = extractor.execute(image, mask_image, label=label)
    except ValueError as exc:
        raise FeatureError(f"radiomics could not be computed for this lesion: {exc}") from exc
    features: dict[str, float] = {}
    provenance = {
        "parameter_hash": hashlib.sha256(canonical.encode()).hexdigest(),
        "settings": canonical,
        "parameter_source": source,
        "pyradiomics_version": str(radiomics.__version__),
    }
    for name, value in result.items():
        if name.startswith("diagnostics_"):
            if name in _PROVENANCE_DIAGNOSTICS:
                provenance[_PROVENANCE_DIAGNOSTICS[name]] = str(value)
            continue
        features[name] = float(value)
    return FeatureSet(features=features, provenance=provenance)


_SHAPE_UNITS = {
    "VoxelVolume": "mm3",
    "MeshVolume": "mm3",
    "SurfaceArea": "mm2",
    "MeshSurface": "mm2",
    "PixelSurface": "mm2",
    "Perimeter": "mm",
    "SurfaceVolumeRatio": "mm-1",
    "PerimeterSurfaceRatio": "mm-1",
    "Maximum3DDiameter": "mm",
    "Maximum2DDiameterSlice": "mm",
    "Maximum2DDiameterColumn": "mm",
    "Maximum2DDiameterRow": "mm",
    "MaximumDiameter": "mm",
    "MajorAxisLength": "mm",
    "MinorAxisLength": "mm",
    "LeastAxisLength": "mm",
}
_FIRSTORDER_HU = {
    "Mean",
    "Median",
    "Minimum",
    "Maximum",
    "10Percentile",
    "90Percentile",
    "InterquartileRange",
    "Range",
    "MeanAbsoluteDeviation",
    "RobustMeanAbsoluteDeviation",
    "RootMeanSquared",
    "StandardDeviation",
}
_FIRSTORDER_HU2 = {"Variance": "[hnsf'U]2", "Energy": "[hnsf'U]2", "TotalEnergy": "[hnsf'U]2.mm3"}


def feature_unit(name: str) -> str:
    """UCUM unit code of a pyradiomics feature.

    Parameters
    ----------
    name
        Full pyradiomics name, e.g. ``original_shape_VoxelVolume`` or ``log-sigma-1-0-mm-3D_firstorder_Mean``.

    Returns
    -------
    str
        ``mm3`` / ``mm2`` / ``mm`` / ``mm-1`` for shape sizes, ``[hnsf'U]`` for first-order
        intensity statistics of unfiltered CT (``[hnsf'U]2`` for variance and energy), ``1`` for
        unitless features (ratios, texture, entropy, and intensities of filtered images).
    """
    parts = name.split("_")
    if len(parts) < 3:
        raise ValueError(f"not a pyradiomics feature name: {name!r}")
    image_type, feature_class, feature = parts[0], parts[1], "_".join(parts[2:])
    if feature_class in ("shape", "shape2D"):
        return _SHAPE_UNITS.get(feature, "1")
    if feature_class == "firstorder" and image_type == "original":
        if feature in _FIRSTORDER_HU:
            return "[hnsf'U]"
        return _FIRSTORDER_HU2.get(feature, "1")
    return "1"
