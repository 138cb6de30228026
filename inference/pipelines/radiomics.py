"""The radiomics pipeline: per-lesion pyradiomics features of every segmented lesion.

CT series -> volume; SEG / RTSTRUCT -> one mask per segment / ROI; each mask -> lesions (3D
connected components); each lesion -> shape, first-order and texture features. No model, so the
algorithm identity is the pipeline version plus the hash of the radiomics parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from inference.pipelines.study import key_image, lesion_result, load_study
from inference.radiomics.features import compute_features, feature_unit
from inference.results import AlgorithmInfo, FeatureValue, KeyImage, LesionResult, PipelineOutput, StudyResult
from pacs_agent import __version__

__all__ = [
    "INTENDED_USE",
    "METHOD",
    "OUTLINE_TOLERANCE_PX",
    "RESULT_KIND",
    "key_image",
    "key_outline_px",
    "run_radiomics",
]

logger = logging.getLogger(__name__)

METHOD = "radiomics"
RESULT_KIND = "Radiomics"
INTENDED_USE = (
    "Research use: quantitative description (volume, diameter, intensity and texture) of lesions "
    "segmented by a clinician. Not a diagnosis."
)
OUTLINE_TOLERANCE_PX = 0.25
"""Largest distance (pixels) between the simplified key-slice outline and the exact mask boundary."""


def _shoelace_area(contour: np.ndarray) -> float:
    rows, cols = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(rows, np.roll(cols, 1)) - np.dot(cols, np.roll(rows, 1))))


def key_outline_px(mask: np.ndarray, tolerance: float = OUTLINE_TOLERANCE_PX) -> tuple[tuple[float, float], ...]:
    """Outline of the largest part of a key-slice mask, in DICOM SCOORD pixel coordinates.

    The boundary of the largest 8-connected part (holes ignored) is traced along the pixel edges
    (``skimage.measure.find_contours`` at level 0.5 on the zero-padded mask) and simplified with
    the Douglas-Peucker algorithm (``approximate_polygon``), so a lesion of a few hundred boundary
    pixels becomes a few dozen points. This is what the SR's TID 1410 planar ROI (the copy of the
    lesion a viewer such as OHIF draws) holds.

    Parameters
    ----------
    mask
        The lesion on its key slice, (rows, columns), bool.
    tolerance
        Douglas-Peucker tolerance in pixels.

    Returns
    -------
    tuple[tuple[float, float], ...]
        ``(column, row)`` points of a closed polygon (first point = last) with (0, 0) the top-left
        corner of the top-left pixel (PS3.3 C.18.6.1.1), so the centre of pixel ``(r, c)`` is
        ``(c + 0.5, r + 0.5)``; values are multiples of 0.5, exact in the SR's 32-bit Graphic Data.
        Empty for an empty mask.

    Raises
    ------
    ValueError
        ``mask`` is not 2D or ``tolerance`` is negative.
    """
    plane = np.asarray(mask, dtype=bool)
    if plane.ndim != 2:
        raise ValueError(f"the key-slice mask must be 2D, not of shape {plane.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    if not plane.any():
        return ()
    labels, _ = ndimage.label(plane, structure=np.ones((3, 3), dtype=bool))
    largest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    padded = np.pad(largest.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    outer = max(contours, key=_shoelace_area)  # the outer boundary encloses the holes' boundaries
    simplified = approximate_polygon(outer, tolerance=tolerance)
    points = simplified[:, ::-1] - 0.5  # (row, col) of the padded grid -> (column, row), corner origin
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return tuple((float(x), float(y)) for x, y in points)


def run_radiomics(ct_paths: Sequence[Path], segmentation_path: Path) -> PipelineOutput:
    """Compute per-lesion radiomics for one CT series and one segmentation object.

    Raises
    ------
    InputError
        The CT cannot be assembled into a volume, the segmentation does not fit it, or no
        lesion remains after the minimum-volume filter.
    """
    study = load_study(ct_paths, segmentation_path)
    volume = study.volume
    lesions: list[LesionResult] = []
    key_images: dict[str, KeyImage] = {}
    provenance: dict[str, str] = {}
    for item in study.lesions:
        features = compute_features(volume, item.lesion.mask)
        provenance = features.provenance
        key_images[item.tracking_uid] = key_image(volume, item.lesion)
        values = tuple(
            FeatureValue(name, float(value), feature_unit(name)) for name, value in sorted(features.features.items())
        )
        outline = key_outline_px(key_images[item.tracking_uid].mask)
        lesions.append(dataclasses.replace(lesion_result(volume, item, values), key_outline_px=outline))
    if study.skipped:
        provenance = {**provenance, "skipped_segments": "; ".join(study.skipped)}
    param_hash = provenance.get("parameter_hash", "unknown")[:8]
    result = StudyResult(
        method=METHOD,
        study_instance_uid=volume.study_instance_uid,
        ct_series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        segmentation=study.segmentation,
        algorithm=AlgorithmInfo(
            name="pacs-agent radiomics",
            version=f"{__version__}+params.{param_hash}",
            validation_status="RESEARCH",
            weights_sha256=None,
            intended_use=INTENDED_USE,
        ),
        lesions=tuple(lesions),
        provenance=provenance,
    )
    return PipelineOutput(result=result, key_images=key_images, result_kind=RESULT_KIND)
