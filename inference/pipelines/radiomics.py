"""The radiomics pipeline: per-lesion pyradiomics features of every segmented lesion.

CT series -> volume; SEG / RTSTRUCT -> one mask per segment / ROI; each mask -> lesions (3D
connected components); each lesion -> shape, first-order and texture features. No model, so the
algorithm identity is the pipeline version plus the hash of the radiomics parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_sr.uids import derive_uid
from inference.imaging.lesions import Lesion, find_lesions, outline_mm
from inference.imaging.masks import load_segmentation, segmentation_phase
from inference.imaging.volume import CTVolume, load_ct_series
from inference.radiomics.features import compute_features, feature_unit
from inference.results import AlgorithmInfo, FeatureValue, KeyImage, LesionResult, PipelineOutput, StudyResult
from pacs_agent import __version__
from pacs_agent.errors import InputError

logger = logging.getLogger(__name__)

METHOD = "radiomics"
RESULT_KIND = "Radiomics"
INTENDED_USE = (
    "Research use: quantitative description (volume, diameter, intensity and texture) of lesions "
    "segmented by a clinician. Not a diagnosis."
)


def key_image(volume: CTVolume, lesion: Lesion) -> KeyImage:
    """The key slice of ``lesion`` with its mask, for the Secondary Capture."""
    z = lesion.key_slice_index
    spacing_x, spacing_y, _ = volume.spacing_xyz
    return KeyImage(
        hu=np.asarray(volume.array[z], dtype=np.float32),
        mask=np.asarray(lesion.mask[z], dtype=bool),
        pixel_spacing_mm=(float(spacing_y), float(spacing_x)),
    )


def run_radiomics(ct_paths: Sequence[Path], segmentation_path: Path) -> PipelineOutput:
    """Compute per-lesion radiomics for one CT series and one segmentation object.

    Raises
    ------
    InputError
        The CT cannot be assembled into a volume, the segmentation does not fit it, or no
        lesion remains after the minimum-volume filter.
    """
    segmentation = dcmread(segmentation_path)
    volume = load_ct_series(ct_paths, phase=segmentation_phase(ct_paths, segmentation))
    masks = load_segmentation(segmentation, volume)
    lesions: list[LesionResult] = []
    key_images: dict[str, KeyImage] = {}
    provenance: dict[str, str] = {}
    skipped: list[str] = []
    for label_mask in masks:
        source = label_mask.source
        if not label_mask.ok:  # an empty or unusable segment fails alone, the others go on
            skipped.append(f"{source.label} ({source.kind} {source.number}): {label_mask.problem}")
            logger.warning("segment %d of %s skipped: %s", source.number, source.sop_instance_uid, label_mask.problem)
            continue
        for lesion in find_lesions(label_mask, volume):
            features = compute_features(volume, lesion.mask)
            provenance = features.provenance
            tracking_uid = derive_uid("tracking", source.sop_instance_uid, str(source.number), lesion.tracking_id)
            key_images[tracking_uid] = key_image(volume, lesion)
            lesions.append(
                LesionResult(
                    tracking_id=lesion.tracking_id,
                    tracking_uid=tracking_uid,
                    source=source,
                    volume_ml=lesion.volume_ml,
                    longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
                    centroid_mm=lesion.centroid_mm,
                    key_slice_index=lesion.key_slice_index,
                    key_slice_sop_instance_uid=volume.sop_instance_uids[lesion.key_slice_index],
                    features=tuple(
                        FeatureValue(name, float(value), feature_unit(name))
                        for name, value in sorted(features.features.items())
                    ),
                    outline_mm=outline_mm(lesion, volume) if source.kind == "rtstruct" else (),
                )
            )
    if not lesions:
        raise InputError("the segmentation holds no lesion above the minimum volume")
    if skipped:
        provenance = {**provenance, "skipped_segments": "; ".join(skipped)}
    param_hash = provenance.get("parameter_hash", "unknown")[:8]
    result = StudyResult(
        method=METHOD,
        study_instance_uid=volume.study_instance_uid,
        ct_series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        segmentation=masks[0].source,
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
