"""M5: the 8-week delta-radiomics response score, with RECIST-like and volumetric comparators.

Result dataclasses of the response pipeline (:func:`inference.pipelines.response.run_response`): what
``dicom_sr`` turns into one SR per baseline / follow-up pair. Frozen, no pydicom, no images.

Submodules: :mod:`~inference.response.matching` (alignment and lesion matching),
:mod:`~inference.response.recist` (comparators), :mod:`~inference.response.signature` (random forest
and its model package). The features themselves are in :mod:`inference.radiomics.delta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.radiomics.delta import FeatureDeltas, LesionFeatures, PatientFeatures
from inference.response.matching import Alignment, LesionMatch, MatchResult, align, match_lesions
from inference.response.recist import MeasuredLesion, RecistResult, assess_response
from inference.response.signature import ResponseSignature, SignatureScore, load_signature
from inference.results import AlgorithmInfo, SegmentationSource

__all__ = [
    "Alignment",
    "LesionMatch",
    "LesionMeasurement",
    "LesionPair",
    "MatchResult",
    "MeasuredLesion",
    "RecistResult",
    "ResponseResult",
    "ResponseSignature",
    "SignatureScore",
    "TimePoint",
    "align",
    "assess_response",
    "load_signature",
    "match_lesions",
]


@dataclass(frozen=True)
class TimePoint:
    """One of the two studies of a pair: its CT series and segmentation object."""

    study_instance_uid: str
    ct_series_instance_uid: str
    frame_of_reference_uid: str
    segmentation: SegmentationSource | None
    """The first segment / ROI of the segmentation object (identifies the SEG / RTSTRUCT instance)."""
    lesion_count: int


@dataclass(frozen=True)
class LesionMeasurement:
    """One lesion at one time point: size, position, key slice and the four features.

    ``tracking_uid`` is shared by the two time points of a matched pair. ``features`` is None when
    pyradiomics could not compute them for this lesion (too small or flat; the reason is in
    ``ResponseResult.problems``); such a lesion still counts for RECIST and the volumes.
    """

    tracking_id: str
    tracking_uid: str
    source: SegmentationSource
    organ: str
    volume_ml: float
    longest_axial_diameter_mm: float
    centroid_mm: tuple[float, float, float]
    key_slice_index: int
    key_slice_sop_instance_uid: str
    features: LesionFeatures | None
    outline_mm: tuple[tuple[tuple[float, float, float], ...], ...] = ()
    """Closed polygons (patient coordinates) for RTSTRUCT-derived lesions (SCOORD3D references)."""
    key_outline_px: tuple[tuple[float, float], ...] = ()
    """Outline (column, row pixel coordinates) of the lesion on its key slice, for viewers."""


@dataclass(frozen=True)
class LesionPair:
    """A baseline lesion and the follow-up lesion it became."""

    tracking_uid: str
    baseline: LesionMeasurement
    follow_up: LesionMeasurement
    deltas: FeatureDeltas | None
    """Per-lesion deltas of the four features (None when a time point has no features)."""
    dice: float
    """Overlap after alignment (0 when matched by distance)."""
    distance_mm: float
    """Centroid distance after alignment."""
    match_rule: str
    """``overlap`` or ``distance``."""

    @property
    def volume_change_percent(self) -> float:
        """Volume change of this lesion in percent."""
        return 100.0 * (self.follow_up.volume_ml - self.baseline.volume_ml) / self.baseline.volume_ml

    @property
    def diameter_change_percent(self) -> float:
        """Longest axial diameter change of this lesion in percent."""
        b = self.baseline.longest_axial_diameter_mm
        return 100.0 * (self.follow_up.longest_axial_diameter_mm - b) / b if b > 0 else 0.0


@dataclass(frozen=True)
class ResponseResult:
    """Everything the response method produced for one baseline / follow-up pair.

    ``baseline_features`` / ``follow_up_features`` are the volume-weighted patient-level features
    (None when that time point has no lesion with features); ``deltas`` their change (None if either
    is None); ``score`` the signature's output (None without a model, or without deltas - the reason is
    in ``problems``). ``problems`` lists what a reader should know: lesions seen at one time point only,
    skipped segments, features that could not be computed, why there is no score.
    """

    baseline: TimePoint
    follow_up: TimePoint
    pairs: tuple[LesionPair, ...]
    new_lesions: tuple[LesionMeasurement, ...]
    disappeared_lesions: tuple[LesionMeasurement, ...]
    baseline_features: PatientFeatures | None
    follow_up_features: PatientFeatures | None
    deltas: FeatureDeltas | None
    recist: RecistResult
    alignment: Alignment
    score: SignatureScore | None
    algorithm: AlgorithmInfo
    problems: tuple[str, ...] = ()
    method: str = "response"
    provenance: dict[str, str] = field(default_factory=dict)
    """Reproducibility facts (library versions, parameter hash, registration settings)."""

    def __hash__(self) -> int:  # dict field: hash by identity-relevant fields only
        return hash((self.method, self.baseline, self.follow_up, self.pairs))

    @property
    def volumetric_change_percent(self) -> float | None:
        """Change of the total lesion volume in percent (new lesions included)."""
        return self.recist.volumetric_change_percent

    @property
    def risk_group(self) -> str | None:
        """``high`` / ``low`` from the signature, or None without a score."""
        return None if self.score is None else self.score.risk_group
