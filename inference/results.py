"""Result dataclasses: what a pipeline hands to ``dicom_sr``.

Frozen, no pydicom inside: a pipeline computes these from a volume and masks; ``dicom_sr`` turns
them into DICOM objects; the SR reader turns our own SRs back into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SegmentationKind = Literal["seg", "rtstruct"]
ValidationStatus = Literal["DEMO", "RESEARCH", "VALIDATED"]

DEMO_WARNING = "DEMO MODEL - NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the algorithm (and model, if any) that produced a result.

    ``weights_sha256`` is None for methods without trained weights (plain radiomics).
    """

    name: str
    version: str
    validation_status: ValidationStatus = "RESEARCH"
    weights_sha256: str | None = None
    intended_use: str = ""

    @property
    def is_demo(self) -> bool:
        """True when outputs must carry the DEMO / NOT FOR CLINICAL USE warning."""
        return self.validation_status == "DEMO"


@dataclass(frozen=True)
class SegmentationSource:
    """Where a lesion came from: a SEG segment or an RTSTRUCT ROI."""

    kind: SegmentationKind
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    number: int
    """Segment Number (SEG) or ROI Number (RTSTRUCT)."""
    label: str
    """Segment Label (SEG) or ROI Name (RTSTRUCT)."""


@dataclass(frozen=True)
class FeatureValue:
    """One radiomic feature, named as pyradiomics names it (e.g. ``original_shape_VoxelVolume``)."""

    name: str
    value: float
    unit: str = "1"
    """UCUM unit code (``mm3``, ``mm``, ``[hnsf'U]``, ``1``)."""


@dataclass(frozen=True)
class LesionResult:
    """Measurements of one lesion (one 3D connected component of a segment)."""

    tracking_id: str
    """Human-readable, stable within the segmentation: ``<label> lesion <n>``, n ordered by volume."""
    tracking_uid: str
    source: SegmentationSource
    volume_ml: float
    longest_axial_diameter_mm: float
    centroid_mm: tuple[float, float, float]
    key_slice_index: int
    """Index (0-based, in sorted CT order) of the axial slice with the largest cross-section."""
    key_slice_sop_instance_uid: str
    features: tuple[FeatureValue, ...] = ()
    outline_mm: tuple[tuple[tuple[float, float, float], ...], ...] = ()
    """Closed polygons (patient coordinates, mm) outlining the lesion on its slices; used to
    reference an RTSTRUCT-derived lesion as SCOORD3D regions."""
    key_outline_px: tuple[tuple[float, float], ...] = ()
    """Closed outline (first point = last) of the lesion's largest part on its key slice, in image
    pixel coordinates ``(column, row)`` as DICOM SCOORD counts them (PS3.3 C.18.6.1.1: (0, 0) is
    the top-left corner of the top-left pixel, so pixel centres are at ``+0.5``). The SR draws it
    as a TID 1410 planar ROI that viewers (OHIF) display; empty when not computed."""


@dataclass(frozen=True)
class Prediction:
    """What a model predicted for one lesion (or the patient) and one label.

    ``probability`` is the calibrated probability of the *positive* class (mutant, high risk,
    positive); ``status`` is the positive status when ``probability >= threshold``.
    """

    label: str
    """Upper-case label: ``KRAS``, ``EGFR``, ``RAS``, ... (1-9 characters ``A-Z0-9``)."""
    status: str
    """``mutant``, ``wild type``, ``high risk``, ``low risk``, ``positive`` or ``negative``."""
    probability: float
    threshold: float = 0.5
    name: str = ""
    """How readers see the label (the package's ``[label_names]``, e.g. ``PIK3CA or BRAF``); empty: the label."""

    @property
    def display(self) -> str:
        """``name``, else ``label``."""
        return self.name or self.label


@dataclass(frozen=True)
class StudyResult:
    """Everything one method produced for one study (CT series + one segmentation object)."""

    method: str
    study_instance_uid: str
    ct_series_instance_uid: str
    frame_of_reference_uid: str
    segmentation: SegmentationSource | None
    algorithm: AlgorithmInfo
    lesions: tuple[LesionResult, ...]
    provenance: dict[str, str] = field(default_factory=dict)
    """Reproducibility facts (library versions, parameter-file hash)."""
    predictions: Mapping[str, tuple[Prediction, ...]] = field(default_factory=dict)
    """Model predictions per lesion, keyed by tracking UID (empty for plain radiomics)."""
    patient_predictions: tuple[Prediction, ...] = ()
    """Patient-level predictions (one per label, from the lesions' by the method's rule), if any."""

    def __hash__(self) -> int:  # dict field: hash by identity-relevant fields only
        return hash((self.method, self.study_instance_uid, self.ct_series_instance_uid, self.lesions))


@dataclass(frozen=True, eq=False)
class KeyImage:
    """The pixels a Secondary Capture shows for one lesion: its key slice, contour and heat map."""

    hu: np.ndarray
    """The key axial slice in HU, (rows, columns)."""
    mask: np.ndarray
    """The lesion on that slice, bool, same shape."""
    pixel_spacing_mm: tuple[float, float]
    """(row spacing, column spacing) in mm."""
    heatmap: np.ndarray | None = None
    """Grad-CAM map on the slice grid in [0, 1], or None."""


@dataclass(frozen=True, eq=False)
class PipelineOutput:
    """What a pipeline returns: the result, plus key images per lesion tracking UID for the SCs."""

    result: StudyResult
    key_images: Mapping[str, KeyImage] = field(default_factory=dict)
    result_kind: str = "Radiomics"
    """Stable name of the result kind: Series Description ``AI <kind> <method>``; feeds the UIDs."""
