"""The result types of the response method (M5), light: no SimpleITK, pyradiomics or scikit-learn.

What :func:`inference.pipelines.response.run_response` returns and :mod:`dicom_sr` writes: the
lesions at both time points and their pairs, the four signature features and their deltas, the
alignment, the RECIST-like comparator and the score. Frozen dataclasses; the modules that compute
them (:mod:`inference.radiomics.delta`, :mod:`inference.response.matching`,
:mod:`inference.response.recist`, :mod:`inference.response.signature`) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from inference.response.quality import QualityTier
from inference.results import AlgorithmInfo, FeatureValue, SegmentationSource

__all__ = [
    "CATEGORY_NAMES",
    "FEATURE_LABELS",
    "FEATURE_NAMES",
    "Alignment",
    "AlignmentMethod",
    "Category",
    "FeatureDelta",
    "FeatureDeltas",
    "LesionFeatures",
    "LesionMeasurement",
    "LesionPair",
    "MeasuredLesion",
    "PatientFeatures",
    "RecistResult",
    "ResponseResult",
    "SignatureScore",
    "TimePoint",
]


FEATURE_NAMES: tuple[str, ...] = ("si4", "log_z_entropy", "log_x_entropy", "ngtdm_contrast")
"""The four signature features, in the order the model takes their deltas."""


FEATURE_LABELS: dict[str, str] = {
    "si4": "Shape SI4 (surface fraction with shape index in [-1/3, -1/9))",
    "log_z_entropy": "Entropy after LoG filtering along z",
    "log_x_entropy": "Entropy after LoG filtering along x",
    "ngtdm_contrast": "NGTDM (GTDM) contrast",
}


@dataclass(frozen=True)
class LesionFeatures:
    """The four signature features of one lesion at one time point, and its volume.

    ``reference`` holds pyradiomics values computed beside them (3D LoG entropy at the same sigma,
    unfiltered entropy, mesh volume) for comparison with other tools; they do not enter the model.
    """

    si4: float
    log_z_entropy: float
    log_x_entropy: float
    ngtdm_contrast: float
    volume_ml: float
    reference: tuple[FeatureValue, ...] = ()

    def values(self) -> dict[str, float]:
        """The four features by name, in :data:`FEATURE_NAMES` order."""
        return {name: float(getattr(self, name)) for name in FEATURE_NAMES}


@dataclass(frozen=True)
class PatientFeatures:
    """Volume-weighted average of the four features over the lesions of one time point."""

    si4: float
    log_z_entropy: float
    log_x_entropy: float
    ngtdm_contrast: float
    total_volume_ml: float
    lesion_count: int

    def values(self) -> dict[str, float]:
        """The four features by name, in :data:`FEATURE_NAMES` order."""
        return {name: float(getattr(self, name)) for name in FEATURE_NAMES}


@dataclass(frozen=True)
class FeatureDelta:
    """Change of one feature between baseline and follow-up.

    ``relative`` is ``(follow_up - baseline) / |baseline|`` or None when ``|baseline|`` is below the
    feature's epsilon. ``value`` is what the signature uses, by ``definition``:

    - ``"symmetric"`` (default of new packages, continuous everywhere): ``(follow_up - baseline) /
      ((|baseline| + |follow_up|) / 2 + floor)``, in (-2, 2); close to the relative change for small
      changes of a feature well above its ``floor``, and no jump when the baseline crosses 0;
    - ``"relative"`` (packages trained before; discontinuous near a zero baseline): ``relative`` if
      defined, else ``absolute``.
    """

    name: str
    baseline: float
    follow_up: float
    absolute: float
    relative: float | None
    definition: str = "relative"
    floor: float = 0.0

    @property
    def value(self) -> float:
        """The delta by :attr:`definition`."""
        if self.definition == "symmetric":
            return self.absolute / ((abs(self.baseline) + abs(self.follow_up)) / 2 + self.floor)
        return self.absolute if self.relative is None else self.relative

    @property
    def is_relative(self) -> bool:
        """True when ``value`` is a ratio (shown as a percentage)."""
        return self.definition == "symmetric" or self.relative is not None


@dataclass(frozen=True)
class FeatureDeltas:
    """The deltas of the four features, in :data:`FEATURE_NAMES` order."""

    deltas: tuple[FeatureDelta, ...]

    def __getitem__(self, name: str) -> FeatureDelta:
        for delta in self.deltas:
            if delta.name == name:
                return delta
        raise KeyError(name)

    def vector(self) -> tuple[float, ...]:
        """The delta values in :data:`FEATURE_NAMES` order (the signature's input)."""
        return tuple(self[name].value for name in FEATURE_NAMES)

    def as_dict(self) -> dict[str, float]:
        """Delta values by feature name."""
        return {name: self[name].value for name in FEATURE_NAMES}


AlignmentMethod = Literal["frame-of-reference", "rigid-registration"]


@dataclass(frozen=True)
class Alignment:
    """How follow-up coordinates were brought into the baseline's.

    ``parameters`` are the Euler3DTransform parameters (rotation x, y, z in radians; translation x, y,
    z in mm) of the transform that maps a baseline point to the follow-up point at the same anatomy,
    about ``centre_mm``. For ``frame-of-reference`` it is the identity.
    """

    method: AlignmentMethod
    parameters: tuple[float, float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    metric_start: float | None = None
    metric_final: float | None = None
    iterations: int = 0
    seconds: float = 0.0
    region: str = ""
    start: str = ""
    stop_condition: str = ""

    def transform(self) -> Any:
        """The baseline -> follow-up transform as a SimpleITK ``Euler3DTransform``."""
        import SimpleITK as sitk

        t = sitk.Euler3DTransform()
        t.SetCenter(self.centre_mm)
        t.SetParameters(self.parameters)
        return t

    def to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        """Map follow-up patient coordinates (n, 3) to baseline patient coordinates."""
        inverse = self.transform().GetInverse()
        pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
        return np.array([inverse.TransformPoint(tuple(float(v) for v in p)) for p in pts]).reshape(-1, 3)

    @property
    def rotation_degrees(self) -> float:
        """Angle of the rotation part (degrees)."""
        matrix = np.asarray(self.transform().GetMatrix()).reshape(3, 3)
        return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0))))

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        """Translation part (mm)."""
        return (float(self.parameters[3]), float(self.parameters[4]), float(self.parameters[5]))


Category = Literal["CR", "PR", "SD", "PD", "NE"]


CATEGORY_NAMES: dict[str, str] = {
    "CR": "complete response",
    "PR": "partial response",
    "SD": "stable disease",
    "PD": "progressive disease",
    "NE": "not evaluable",
}


@dataclass(frozen=True)
class MeasuredLesion:
    """One baseline lesion with its follow-up measurement (None: it disappeared).

    ``lesion_id`` is any stable identifier (the baseline tracking id); ``organ`` groups lesions for the
    two-per-organ rule.
    """

    lesion_id: str
    organ: str
    baseline_diameter_mm: float
    baseline_volume_ml: float
    follow_up_diameter_mm: float | None
    follow_up_volume_ml: float | None


@dataclass(frozen=True)
class RecistResult:
    """The RECIST-like category, its sums, and the volumetric change."""

    category: Category
    reason: str
    target_ids: tuple[str, ...]
    baseline_sum_mm: float
    follow_up_sum_mm: float
    percent_change: float | None
    absolute_change_mm: float
    new_lesions: int
    baseline_volume_ml: float
    follow_up_volume_ml: float
    volumetric_change_percent: float | None

    @property
    def category_name(self) -> str:
        """The category in words, e.g. ``partial response``."""
        return CATEGORY_NAMES[self.category]


@dataclass(frozen=True)
class SignatureScore:
    """Output of the signature for one patient."""

    probability: float
    """Probability of treatment insensitivity, in [0, 1] (recalibrated for ``tier`` when there is one)."""
    threshold: float
    high_risk: bool
    tier: str | None = None
    """The acquisition quality tier whose calibration was used (None: a package without quality tiers)."""
    tier_reason: str = ""
    """Why the pair is in that tier (the tier rule's findings)."""
    uncalibrated_probability: float | None = None
    """The forest's own probability before the tier's recalibration (None without tiers)."""

    @property
    def risk_group(self) -> str:
        """``high`` (probability > threshold) or ``low``."""
        return "high" if self.high_risk else "low"


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
    quality: QualityTier | None = None
    """The pair's acquisition quality tier by the package's tier rule (the default rule without a
    tiered package); the score used its calibration when ``score.tier`` is set."""

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
