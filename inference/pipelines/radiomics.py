"""The radiomics pipeline: per-lesion pyradiomics features of every segmented lesion.

CT series -> volume; SEG / RTSTRUCT -> one mask per segment / ROI; each mask -> lesions (3D
connected components); each lesion -> shape, first-order and texture features. No model, so the
algorithm identity is the pipeline version plus the hash of the radiomics parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from inference.pipelines.study import LoadedStudy, key_image, lesion_result, load_study
from inference.radiomics.features import compute_features, feature_unit
from inference.results import AlgorithmInfo, FeatureValue, KeyImage, LesionResult, PipelineOutput, StudyResult
from inference.structures import StructureSelection
from inference.version import __version__

__all__ = [
    "INTENDED_USE",
    "METHOD",
    "RESULT_KIND",
    "key_image",
    "run_radiomics",
]

logger = logging.getLogger(__name__)

METHOD = "radiomics"
RESULT_KIND = "Radiomics"
INTENDED_USE = (
    "Research use: quantitative description (volume, diameter, intensity and texture) of lesions "
    "segmented by a clinician. Not a diagnosis."
)


def run_radiomics(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Compute per-lesion radiomics for one CT series and one segmentation object.

    ``structures`` says which segments / ROIs are tumours (routing's choice); None: the default rules.
    ``study`` is the study as the worker's loader already loaded it (read-only); None: loaded here.

    Raises
    ------
    InputError
        The CT cannot be assembled into a volume, the segmentation does not fit it, or no
        lesion remains after the minimum-volume filter.
    """
    study = study or load_study(ct_paths, segmentation_path, structures)
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
        lesions.append(lesion_result(volume, item, values))
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
