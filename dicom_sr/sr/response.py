r"""Response result (M5) -> Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom only).

One SR per baseline / follow-up pair, stored into the **follow-up** study: Patient and General Study
attributes come from a follow-up CT instance. Both studies are evidence: the follow-up CT and
segmentation in the Current Requested Procedure Evidence Sequence, the baseline CT and
segmentation in the Pertinent Other Evidence Sequence (PS3.3 C.17.2.3).

Content tree written by :func:`build_response_report`::

    CONTAINER (126000, DCM, "Imaging Measurement Report")                 TID 1500
      Language, Observation Context: device observer = pacs-agent         TID 1204, 1001, 1002, 1004
      Procedure reported (default: CT of abdomen)
      CONTAINER Imaging Measurements
        per tracked lesion, first its key-slice group for viewers          TID 1410
          (:class:`dicom_sr.sr.templates.KeySliceOutlineGroup`: outline on the key slice of the lesion as
          shown, area, volume, long axis, a Comment with its change), then:
        CONTAINER Measurement Group, one per tracked lesion               TID 1411 (TID 1410)
          Tracking Identifier + Tracking Unique Identifier (shared by both time points)   TID 4108
          Finding = Neoplasm, Finding Site = Liver
          Referenced Segment | Volume Surface | Image Region: the lesion at follow-up
            (at baseline for a disappeared lesion)
          NUM Volume [ml], Long Axis [mm], SI4, LoG-z entropy, LoG-x entropy, NGTDM contrast   TID 300
            each once per time point, with HAS CONCEPT MOD "Time Point Type" = Baseline | Posttreatment
            and once as the change, with HAS CONCEPT MOD "Derivation" = Fractional Change
            (or "Absolute change from baseline"); each with Algorithm Identification   TID 4019
          NUM match overlap (Dice) [1], centroid distance [mm]           (matched lesions)
          CODE Lesion status between time points = Matched | New | Disappeared
          CODE Baseline Category = Target / Non-Target Lesion at Baseline (RECIST target selection)
          IMAGE / COMPOSITE "Baseline segment or ROI" (matched lesions: the lesion at baseline)
          TEXT Lesion matching rule
      CONTAINER Derived Imaging Measurements                              TID 1500 row 9
        CONTAINER Measurement Group "Patient-level response"               TID 1501
          NUM the four volume-weighted features per time point, and their deltas (as above)
          NUM Total lesion volume per time point [ml] and its change [%] (volumetric change)
          NUM Sum of target lesion diameters per time point [mm] (method RECIST 1.1), its change
              [%] and its absolute change [mm]
          NUM Interval between the studies [d]
          NUM Probability of treatment insensitivity [1], Decision threshold [1]   (with a model;
              their TID 4019 names the model, every other NUM the measuring pipeline)
          CODE Treatment insensitivity risk group = High risk | Low risk (SCT)    (with a model)
          CODE Current Response = Target Lesion CR | PR | SD | PD (DCM) or Not evaluable,
               with HAS CONCEPT MOD Response Evaluation Method = RECIST 1.1
          TEXT Response category reason, Acquisition quality tier (with a package that recalibrates
               per tier: the tier whose calibration the probability used, and why), Result notes (e.g.
               "no response model installed - score not computed", lesions seen at one time point only)
      CONTAINER Qualitative Evaluations                                    TID 1500 rows 12-14
        TEXT Usage warning (DEMO), Validation status, Intended use, weights SHA-256, provenance,
             Analysis method, Frame of Reference UID (follow-up), follow-up segmentation,
             Baseline Study Instance UID, baseline segmentation

Time points and changes
-----------------------
A value measured at one time point carries the concept modifier (DCM 126072, "Time Point Type")
with a value of CID 6146 "Time Point Types": (C1442488, UMLS, "Baseline") for the baseline CT,
(126074, DCM, "Posttreatment") for the follow-up CT, i.e. the CT taken after treatment started
(about 8 weeks into it; TID 1502 uses the same concept as observation context). A change carries
(121401, DCM, "Derivation") = (125314, DCM, "Fractional Change") - ``(follow-up - baseline) /
|baseline|``, in UCUM ``1`` for the four features (the signature's input, e.g. -0.25) and in ``%``
for volumes and diameters - or, for a feature whose baseline value is below the delta epsilon (see
:mod:`inference.radiomics.delta`), (ABS-CHANGE, 99PACSAGENT, "Absolute change from baseline") =
``follow-up - baseline``. TID 300 lists no time point row; the template is extensible and the
Comprehensive 3D SR IOD allows NUM HAS CONCEPT MOD CODE, which ``dciodvfy`` accepts.

RECIST
------
The RECIST 1.1-like category is (112048, DCM, "Current Response") with a value of CID 6144
"RECIST Defined Lesion Response": (112041, DCM, "Target Lesion Complete Response"), 112042 Partial
Response, 112044 Stable Disease, 112043 Progressive Disease; "not evaluable" has no code in CID 6144
and uses (RECIST-NE, 99PACSAGENT, "Not evaluable"). The category is RECIST 1.1-*like* (automatic
diameters, target lesions and new lesions only, baseline as nadir; see ``docs/response.md``): the
response category reason says how it was reached.

Private concepts (scheme ``99PACSAGENT``, declared in the Coding Scheme Identification Sequence)
--------------------------------------------------------------------------------------------------
==================  ==============================================================================
Code value          Code meaning
==================  ==============================================================================
SI4                 Shape index bin 4 fraction (SI4)
LOGZ-ENTROPY        Entropy after LoG filter along z
LOGX-ENTROPY        Entropy after LoG filter along x
ABS-CHANGE          Absolute change from baseline
TOTAL-VOLUME        Total lesion volume
SUM-DIAMETERS       Sum of target lesion diameters
INTERVAL            Interval between baseline and follow-up
INSENS-PROB         Probability of treatment insensitivity
RISK-GROUP          Treatment insensitivity risk group
LESION-STATUS       Lesion status between time points; values MATCHED "Seen at both time points",
                    NEW "New lesion (follow-up only)", DISAPPEARED "Disappeared (baseline only)"
MATCH-DICE          Overlap of matched lesions (Dice)
MATCH-DISTANCE      Centroid distance of matched lesions
MATCH-RULE          Lesion matching rule
BASELINE-SEGMENT    Baseline segment or ROI
RECIST-NE           Not evaluable
RECIST-REASON       Response category reason
RESULT-NOTE         Result note
BASELINE-STUDY      Baseline Study Instance UID
BASELINE-SEG-UID    Baseline segmentation SOP Instance UID
==================  ==============================================================================

NGTDM contrast uses its IBSI code (65HE, "(NGTDM) Contrast"), the decision threshold the shared
(DECISION-THRESH, 99PACSAGENT), the risk groups SNOMED CT "High risk" / "Low risk"
(:data:`dicom_sr.sr.templates.STATUS_CODES`).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code

from dicom_sr import codes
from dicom_sr.codes import (
    ABSOLUTE_CHANGE,
    BASELINE,
    BASELINE_CATEGORY,
    BASELINE_SEGMENT,
    BASELINE_SEGMENTATION,
    BASELINE_STUDY,
    CURRENT_RESPONSE,
    DAY,
    FOLLOW_UP,
    FRACTIONAL_CHANGE,
    INSENSITIVITY_PROBABILITY,
    INTERVAL,
    LESION_STATUS,
    LESION_STATUS_VALUES,
    MATCH_DICE,
    MATCH_DISTANCE,
    MATCH_RULE,
    NON_TARGET_AT_BASELINE,
    QUALITY_TIER,
    RECIST_1_1,
    RECIST_CATEGORY_CODES,
    RECIST_REASON,
    RESPONSE_EVALUATION_METHOD,
    RESULT_NOTE,
    RISK_GROUP,
    SUM_OF_DIAMETERS,
    TARGET_AT_BASELINE,
    TIME_POINT_TYPE,
    TOTAL_VOLUME,
)
from dicom_sr.codes import (
    RESPONSE_FEATURE_CONCEPTS as FEATURE_CONCEPTS,
)
from dicom_sr.common import MANUFACTURER, SOFTWARE_VERSION, device_observer_context, require
from dicom_sr.series import series_description as _series_description
from dicom_sr.series import series_number as _series_number
from dicom_sr.sr.lesions import comprehensive_3d_sr
from dicom_sr.sr.templates import (
    STATUS_CODES,
    KeySliceOutlineGroup,
    LesionMeasurementGroup,
    ReportEvaluations,
    ResultAlgorithm,
)
from dicom_sr.uids import ResultUIDs, derive_uid, result_uids
from inference.response import LesionMeasurement, LesionPair, ResponseResult
from inference.response.results import FEATURE_NAMES, FeatureDeltas, SignatureScore
from inference.results import AlgorithmInfo, LesionResult

__all__ = [
    "BASELINE",
    "CURRENT_RESPONSE",
    "FEATURE_CONCEPTS",
    "FOLLOW_UP",
    "FRACTIONAL_CHANGE",
    "NO_MODEL_NOTE",
    "RECIST_CATEGORY_CODES",
    "RESULT_KIND",
    "TIME_POINT_TYPE",
    "build_response_report",
    "lesion_result",
    "measurement_algorithm",
    "response_input_uids",
    "response_series_description",
    "response_uids",
]

RESULT_KIND = "Response 8w"
"""Stable result kind of the response method: Series Description "AI Response 8w M5"."""
NO_MODEL_NOTE = "no response model installed - score not computed"
PIPELINE_NAME = "pacs-agent response"
"""Name of the measuring pipeline in TID 4019 (see :func:`measurement_algorithm`)."""
_PATIENT_STUDY_KEYWORDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime")
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_MODIFIER = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD


_LesionGroup = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
_PATIENT_LEVEL = "Patient-level response"


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


def _datasets(value: Any, name: str) -> list[Dataset]:
    if isinstance(value, (str, bytes, Dataset)) or not isinstance(value, Sequence):
        raise TypeError(f'Argument "{name}" must be a sequence of pydicom.Dataset.')
    if not value or any(not isinstance(ds, Dataset) for ds in value):
        raise TypeError(f'Argument "{name}" must be a non-empty sequence of pydicom.Dataset.')
    return list(value)


def lesion_result(lesion: LesionMeasurement) -> LesionResult:
    """The :class:`~inference.results.LesionResult` view of a response lesion (no features).

    Parameters
    ----------
    lesion: inference.response.LesionMeasurement
        One lesion at one time point.

    Returns
    -------
    inference.results.LesionResult
        Same tracking identifier and UID, source, size, centroid, key slice and outline.
    """
    require(lesion, LesionMeasurement, "lesion", "LesionMeasurement")
    return LesionResult(
        tracking_id=lesion.tracking_id,
        tracking_uid=lesion.tracking_uid,
        source=lesion.source,
        volume_ml=lesion.volume_ml,
        longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
        centroid_mm=lesion.centroid_mm,
        key_slice_index=lesion.key_slice_index,
        key_slice_sop_instance_uid=lesion.key_slice_sop_instance_uid,
        outline_mm=lesion.outline_mm,
        key_outline_px=lesion.key_outline_px,
    )


def measurement_algorithm(result: ResponseResult) -> AlgorithmInfo:
    """The algorithm that measured sizes, features and comparators: the response pipeline.

    Without a model, ``result.algorithm`` already is the pipeline. With a model, ``result.algorithm``
    is the model (it made the score only); the pipeline is then named ``pacs-agent response``, version
    ``<pacs-agent version>+params.<first 8 hex digits of the radiomics parameter hash>`` (the same
    identity :func:`inference.pipelines.response.run_response` gives it without a model).

    Parameters
    ----------
    result: inference.response.ResponseResult
        The pair's result.

    Returns
    -------
    inference.results.AlgorithmInfo
    """
    require(result, ResponseResult, "result", "ResponseResult")
    if result.score is None and result.algorithm.weights_sha256 is None:
        return result.algorithm
    parameter_hash = result.provenance.get("parameter_hash", "unknown")[:8]
    return AlgorithmInfo(
        name=PIPELINE_NAME,
        version=f"{SOFTWARE_VERSION}+params.{parameter_hash}",
        validation_status="RESEARCH",
        intended_use="Measurement of lesion size, radiomic features and RECIST-like comparators. Not a diagnosis.",
    )


def response_input_uids(result: ResponseResult) -> list[str]:
    """The input UIDs of a pair: both studies, CT series and segmentation objects."""
    require(result, ResponseResult, "result", "ResponseResult")
    uids: list[str] = []
    for point in (result.baseline, result.follow_up):
        uids.extend((point.study_instance_uid, point.ct_series_instance_uid))
        if point.segmentation is not None:
            uids.append(point.segmentation.sop_instance_uid)
    return uids


def _algorithm_version(algorithm: AlgorithmInfo) -> str:
    return f"{algorithm.name}/{algorithm.version}/{algorithm.weights_sha256 or '-'}"


def response_uids(result: ResponseResult, kind: str, instance_part: str | None = None) -> ResultUIDs:
    """Deterministic Series and SOP Instance UIDs of a response result object.

    Parameters
    ----------
    result: inference.response.ResponseResult
        The pair's result: both studies' input UIDs, the method and the algorithm identity (model
        name, version, weights checksum) feed the UIDs (:func:`dicom_sr.uids.result_uids`).
    kind: str
        ``"SR"`` or ``"SC <result kind>"``.
    instance_part: str | None, optional
        Distinguishes several instances of one series (the SOP Instance UID only).

    Returns
    -------
    dicom_sr.uids.ResultUIDs
        The same for the same pair, method and model; different when any of them changes.
    """
    inputs = response_input_uids(result)
    common = {"method": result.method, "algorithm_version": _algorithm_version(result.algorithm), "kind": kind}
    series = result_uids(inputs, **common).series_instance_uid
    parts = inputs if instance_part is None else [*inputs, instance_part]
    return ResultUIDs(series, result_uids(parts, **common).sop_instance_uid)


def response_series_description(result: ResponseResult) -> str:
    """``AI Response 8w M5``, with the DEMO notice for a DEMO model (:func:`dicom_sr.series.series_description`)."""
    require(result, ResponseResult, "result", "ResponseResult")
    return _series_description(result.method, RESULT_KIND, demo=result.algorithm.is_demo)


def _measurement(
    name: CodedConcept,
    value: float,
    unit: CodedConcept,
    algorithm: AlgorithmInfo,
    *,
    time_point: CodedConcept | None = None,
    derivation: CodedConcept | None = None,
    method: CodedConcept | None = None,
    parameters: Sequence[str] = (),
    image: Dataset | None = None,
) -> hd.sr.Measurement:
    """One TID 300 NUM with its time point modifier or derivation and TID 4019 algorithm."""
    referenced = (
        [
            hd.sr.SourceImageForMeasurement(
                referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
            )
        ]
        if image is not None
        else None
    )
    measurement = hd.sr.Measurement(
        name=name,
        value=float(value),
        unit=unit,
        derivation=derivation,
        method=method,
        algorithm_id=ResultAlgorithm(algorithm, list(parameters)),
        referenced_images=referenced,
    )
    if time_point is not None:
        modifier = hd.sr.CodeContentItem(name=TIME_POINT_TYPE, value=time_point, relationship_type=_MODIFIER)
        measurement[0].ContentSequence.insert(0, modifier)
    return measurement


def _finite(values: dict[str, float], notes: list[str], what: str) -> dict[str, float]:
    kept = {k: v for k, v in values.items() if math.isfinite(v)}
    for key in sorted(set(values) - set(kept)):
        notes.append(f"{what}: {key} is not a finite number and is left out")
    return kept


def _feature_measurements(
    values: dict[str, float], time_point: CodedConcept, algorithm: AlgorithmInfo, notes: list[str], what: str
) -> list[hd.sr.Measurement]:
    unity = codes.ucum("1")
    return [
        _measurement(FEATURE_CONCEPTS[name], value, unity, algorithm, time_point=time_point, parameters=[name])
        for name, value in _finite(values, notes, what).items()
    ]


def _delta_measurements(
    deltas: FeatureDeltas, algorithm: AlgorithmInfo, notes: list[str], what: str
) -> list[hd.sr.Measurement]:
    out = []
    for name in FEATURE_NAMES:
        delta = deltas[name]
        if not math.isfinite(delta.value):
            notes.append(f"{what}: the change of {name} is not a finite number and is left out")
            continue
        derivation = FRACTIONAL_CHANGE if delta.is_relative else ABSOLUTE_CHANGE
        form = "(follow-up - baseline) / |baseline|" if delta.is_relative else "follow-up - baseline"
        out.append(
            _measurement(
                FEATURE_CONCEPTS[name],
                delta.value,
                codes.ucum("1"),
                algorithm,
                derivation=derivation,
                parameters=[name, f"delta={form}"],
            )
        )
    return out


def _size_measurements(
    lesion: LesionMeasurement, time_point: CodedConcept, algorithm: AlgorithmInfo, image: Dataset | None
) -> list[hd.sr.Measurement]:
    for name in ("volume_ml", "longest_axial_diameter_mm"):
        if not math.isfinite(getattr(lesion, name)):
            raise ValueError(f'Lesion "{lesion.tracking_id}": "{name}" must be a finite number.')
    return [
        _measurement(codes.VOLUME, lesion.volume_ml, codes.ucum("ml"), algorithm, time_point=time_point),
        _measurement(
            codes.LONG_AXIS,
            lesion.longest_axial_diameter_mm,
            codes.ucum("mm"),
            algorithm,
            time_point=time_point,
            parameters=["longest axial diameter"],
            image=image,
        ),
    ]


def _percent_change(baseline: float, follow_up: float) -> float | None:
    return 100.0 * (follow_up - baseline) / baseline if baseline > 0 else None


class _GroupBuilder:
    """Builds the TID 1411 / TID 1410 measurement group of one tracked lesion."""

    def __init__(
        self,
        result: ResponseResult,
        images: dict[str, Dataset],
        segmentations: dict[str, Dataset],
        notes: list[str],
    ) -> None:
        self.result = result
        self.algorithm = measurement_algorithm(result)
        self.images = images
        self.segmentations = segmentations
        self.notes = notes
        self.targets = set(result.recist.target_ids)

    def _status(self, status: str) -> hd.sr.QualitativeEvaluation:
        return hd.sr.QualitativeEvaluation(name=LESION_STATUS, value=LESION_STATUS_VALUES[status])

    def _baseline_category(self, baseline: LesionMeasurement) -> hd.sr.QualitativeEvaluation:
        target = baseline.tracking_id in self.targets
        return hd.sr.QualitativeEvaluation(
            name=BASELINE_CATEGORY, value=TARGET_AT_BASELINE if target else NON_TARGET_AT_BASELINE
        )

    def _lesion_values(self, lesion: LesionMeasurement, time_point: CodedConcept) -> list[hd.sr.Measurement]:
        measurements = _size_measurements(
            lesion, time_point, self.algorithm, self.images.get(lesion.key_slice_sop_instance_uid)
        )
        if lesion.features is not None:
            what = f"{lesion.tracking_id} ({'baseline' if time_point is BASELINE else 'follow-up'})"
            measurements.extend(
                _feature_measurements(lesion.features.values(), time_point, self.algorithm, self.notes, what)
            )
        return measurements

    def _check_source(self, lesion: LesionMeasurement) -> None:
        if lesion.source.kind == "seg" and lesion.source.sop_instance_uid not in self.segmentations:
            raise ValueError(
                f'Lesion "{lesion.tracking_id}" references SEG {lesion.source.sop_instance_uid}, '
                "which is not one of the segmentation datasets given."
            )

    def group(
        self,
        shown: LesionMeasurement,
        status: str,
        measurements: list[hd.sr.Measurement],
        evaluations: list[hd.sr.QualitativeEvaluation],
        *,
        tracking_id: str,
        time_point_ct_series: str,
        frame_of_reference_uid: str,
    ) -> _LesionGroup:
        """The highdicom group of one lesion, referencing ``shown`` (the lesion at one time point)."""
        self._check_source(shown)
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=shown.tracking_uid, identifier=tracking_id),
            "finding_type": codes.NEOPLASM,
            "finding_sites": [hd.sr.FindingSite(anatomic_location=pydicom_codes.SCT.Liver)],
            "measurements": measurements,
            "qualitative_evaluations": [self._status(status), *evaluations],
        }
        # The reference (SEG segment, RTSTRUCT outline) is built exactly as for the other methods.
        return LesionMeasurementGroup._group(lesion_result(shown), common, time_point_ct_series, frame_of_reference_uid)

    def viewer_copy(self, shown: LesionMeasurement, label: str) -> list[KeySliceOutlineGroup]:
        """The lesion on its key slice as OHIF loads a measurement (:class:`KeySliceOutlineGroup`), if outlined.

        ``label`` names the lesion and its change; DEMO results get "[DEMO] " in front.
        """
        key_slice = self.images.get(shown.key_slice_sop_instance_uid)
        if not shown.key_outline_px or key_slice is None:
            return []
        demo = "[DEMO] " if self.result.algorithm.is_demo else ""
        return [
            KeySliceOutlineGroup(
                lesion_result(shown),
                algorithm=self.algorithm,
                key_slice=key_slice,
                finding_site=pydicom_codes.SCT.Liver,
                comment=f"{demo}{label}",
            )
        ]

    def matched(self, pair: LesionPair) -> _LesionGroup:
        """Group of a lesion seen at both time points: both values, the deltas, the match."""
        base, follow = pair.baseline, pair.follow_up
        measurements = [*self._lesion_values(base, BASELINE), *self._lesion_values(follow, FOLLOW_UP)]
        for concept, b, f in (
            (codes.VOLUME, base.volume_ml, follow.volume_ml),
            (codes.LONG_AXIS, base.longest_axial_diameter_mm, follow.longest_axial_diameter_mm),
        ):
            change = _percent_change(b, f)
            if change is not None:
                measurements.append(
                    _measurement(
                        concept,
                        change,
                        codes.ucum("%"),
                        self.algorithm,
                        derivation=FRACTIONAL_CHANGE,
                        parameters=["change in percent"],
                    )
                )
        if pair.deltas is not None:
            measurements.extend(_delta_measurements(pair.deltas, self.algorithm, self.notes, base.tracking_id))
        measurements.append(_measurement(MATCH_DICE, pair.dice, codes.ucum("1"), self.algorithm))
        if math.isfinite(pair.distance_mm):
            measurements.append(_measurement(MATCH_DISTANCE, pair.distance_mm, codes.ucum("mm"), self.algorithm))
        group = self.group(
            follow,
            "matched",
            measurements,
            [self._baseline_category(base)],
            tracking_id=base.tracking_id,
            time_point_ct_series=self.result.follow_up.ct_series_instance_uid,
            frame_of_reference_uid=self.result.follow_up.frame_of_reference_uid,
        )
        self._check_source(base)
        group[0].ContentSequence.append(self._baseline_reference(base))
        group[0].ContentSequence.append(
            _text(MATCH_RULE, f"{pair.match_rule}; at follow-up: {follow.tracking_id} ({follow.source.label})")
        )
        return group

    def _baseline_reference(self, lesion: LesionMeasurement) -> hd.sr.ContentItem:
        source = lesion.source
        if source.kind == "seg":
            return hd.sr.ImageContentItem(
                name=BASELINE_SEGMENT,
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
                referenced_segment_numbers=int(source.number),
                relationship_type=_CONTAINS,
            )
        return hd.sr.CompositeContentItem(
            name=BASELINE_SEGMENT,
            referenced_sop_class_uid=source.sop_class_uid,
            referenced_sop_instance_uid=source.sop_instance_uid,
            relationship_type=_CONTAINS,
        )

    def new(self, lesion: LesionMeasurement) -> _LesionGroup:
        """Group of a lesion segmented at follow-up only."""
        return self.group(
            lesion,
            "new",
            self._lesion_values(lesion, FOLLOW_UP),
            [],
            tracking_id=lesion.tracking_id,
            time_point_ct_series=self.result.follow_up.ct_series_instance_uid,
            frame_of_reference_uid=self.result.follow_up.frame_of_reference_uid,
        )

    def disappeared(self, lesion: LesionMeasurement) -> _LesionGroup:
        """Group of a lesion segmented at baseline only (it references the baseline segment)."""
        return self.group(
            lesion,
            "disappeared",
            self._lesion_values(lesion, BASELINE),
            [self._baseline_category(lesion)],
            tracking_id=lesion.tracking_id,
            time_point_ct_series=self.result.baseline.ct_series_instance_uid,
            frame_of_reference_uid=self.result.baseline.frame_of_reference_uid,
        )


def _pair_label(pair: LesionPair) -> str:
    """``<lesion>: volume -52 %, long axis -18 % (12.9 -> 6.2 ml)``: a matched lesion's change at a glance."""
    base, follow = pair.baseline, pair.follow_up
    parts = []
    for name, b, f in (
        ("volume", base.volume_ml, follow.volume_ml),
        ("long axis", base.longest_axial_diameter_mm, follow.longest_axial_diameter_mm),
    ):
        change = _percent_change(b, f)
        if change is not None:
            parts.append(f"{name} {change:+.0f} %")
    return f"{base.tracking_id}: {', '.join(parts) or 'matched'} ({base.volume_ml:.1f} -> {follow.volume_ml:.1f} ml)"


def _study_date(ds: Dataset) -> datetime.date | None:
    text = str(ds.get("StudyDate", "") or "")
    try:
        return datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _patient_group(
    result: ResponseResult, interval_days: int | None, notes: list[str]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the patient-level result: features, deltas, comparators, score."""
    algorithm = measurement_algorithm(result)
    measurements: list[hd.sr.Measurement] = []
    for features, time_point, what in (
        (result.baseline_features, BASELINE, "patient-level baseline"),
        (result.follow_up_features, FOLLOW_UP, "patient-level follow-up"),
    ):
        if features is not None:
            measurements.extend(_feature_measurements(features.values(), time_point, algorithm, notes, what))
    if result.deltas is not None:
        measurements.extend(_delta_measurements(result.deltas, algorithm, notes, "patient level"))
    recist = result.recist
    ml, mm, percent = codes.ucum("ml"), codes.ucum("mm"), codes.ucum("%")
    measurements.extend(
        [
            _measurement(TOTAL_VOLUME, recist.baseline_volume_ml, ml, algorithm, time_point=BASELINE),
            _measurement(TOTAL_VOLUME, recist.follow_up_volume_ml, ml, algorithm, time_point=FOLLOW_UP),
        ]
    )
    if recist.volumetric_change_percent is not None:
        measurements.append(
            _measurement(
                TOTAL_VOLUME, recist.volumetric_change_percent, percent, algorithm, derivation=FRACTIONAL_CHANGE
            )
        )
    targets = [f"targets={len(recist.target_ids)}"]

    def diameters(value: float, unit: CodedConcept, **modifiers: CodedConcept) -> hd.sr.Measurement:
        return _measurement(
            SUM_OF_DIAMETERS, value, unit, algorithm, method=RECIST_1_1, parameters=targets, **modifiers
        )

    measurements.append(diameters(recist.baseline_sum_mm, mm, time_point=BASELINE))
    measurements.append(diameters(recist.follow_up_sum_mm, mm, time_point=FOLLOW_UP))
    if recist.percent_change is not None:
        measurements.append(diameters(recist.percent_change, percent, derivation=FRACTIONAL_CHANGE))
        measurements.append(diameters(recist.absolute_change_mm, mm, derivation=ABSOLUTE_CHANGE))
    if interval_days is not None:
        measurements.append(_measurement(INTERVAL, interval_days, DAY, algorithm, parameters=["StudyDate difference"]))
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    score = result.score
    if score is not None:
        if not (math.isfinite(score.probability) and 0.0 <= score.probability <= 1.0):
            raise ValueError(f"the score probability must be in [0, 1], not {score.probability!r}")
        unity = codes.ucum("1")
        model = result.algorithm
        measurements.append(_measurement(INSENSITIVITY_PROBABILITY, score.probability, unity, model))
        measurements.append(_measurement(codes.DECISION_THRESHOLD, score.threshold, unity, model))
        status = "high risk" if score.high_risk else "low risk"
        evaluations.append(hd.sr.QualitativeEvaluation(name=RISK_GROUP, value=STATUS_CODES[status]))
    category = hd.sr.QualitativeEvaluation(name=CURRENT_RESPONSE, value=RECIST_CATEGORY_CODES[recist.category])
    category[0].ContentSequence = hd.sr.ContentSequence(
        [hd.sr.CodeContentItem(name=RESPONSE_EVALUATION_METHOD, value=RECIST_1_1, relationship_type=_MODIFIER)]
    )
    evaluations.append(category)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid("response-patient", *response_input_uids(result)), identifier=_PATIENT_LEVEL
        ),
        finding_type=codes.NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=pydicom_codes.SCT.Liver)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    items = group[0].ContentSequence
    items.append(_text(RECIST_REASON, f"RECIST 1.1-like: {recist.category} ({recist.category_name}): {recist.reason}"))
    if score is not None and score.tier is not None:
        items.append(_text(QUALITY_TIER, quality_tier_text(score)[:1024]))
    for note in notes:
        items.append(_text(RESULT_NOTE, note[:1024]))
    return group


def quality_tier_text(score: SignatureScore) -> str:
    """How the SR and the SC name the quality tier whose calibration a score used."""
    before = "" if score.uncalibrated_probability is None else f" (forest {score.uncalibrated_probability:.3f})"
    return f"{score.tier}: probability recalibrated for this tier{before}; {score.tier_reason}"


def _notes(result: ResponseResult) -> list[str]:
    notes: list[str] = []
    if result.score is None and result.algorithm.weights_sha256 is None:
        notes.append(NO_MODEL_NOTE)
    counts = (
        f"{len(result.pairs)} lesion(s) matched, {len(result.new_lesions)} new, "
        f"{len(result.disappeared_lesions)} disappeared"
    )
    notes.append(counts)
    notes.extend(result.problems)
    return notes


def build_response_report(
    result: ResponseResult,
    follow_up_ct: Sequence[Dataset],
    follow_up_segmentation: Dataset,
    baseline_ct: Sequence[Dataset],
    baseline_segmentation: Dataset,
    *,
    series_number: int | None = None,
    institution_name: str | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    procedure_reported: Code | CodedConcept = codes.CT_OF_ABDOMEN,
    device_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR (TID 1500 Measurement Report) of one baseline / follow-up pair.

    See the module docstring for the content tree and the codes. The SR joins the follow-up study;
    its Series and SOP Instance UIDs derive from both studies' input UIDs, the method and the
    algorithm (model) identity (:func:`response_uids`), so a re-run replaces the copy in the PACS.

    Parameters
    ----------
    result: inference.response.ResponseResult
        The output of :func:`inference.pipelines.response.run_response`.
    follow_up_ct: Sequence[pydicom.Dataset]
        The follow-up CT instances (headers suffice). Patient and study attributes are copied from
        ``follow_up_ct[0]``.
    follow_up_segmentation: pydicom.Dataset
        The follow-up SEG or RTSTRUCT.
    baseline_ct: Sequence[pydicom.Dataset]
        The baseline CT instances (headers suffice).
    baseline_segmentation: pydicom.Dataset
        The baseline SEG or RTSTRUCT.
    series_number: int | None, optional
        Series Number of the SR series; default the response method's (:mod:`dicom_sr.series`).
    institution_name: str | None, optional
        Institution Name of the SR.
    manufacturer: str, optional
        Manufacturer and device observer manufacturer.
    software_version: str, optional
        Software Versions.
    procedure_reported: pydicom.sr.coding.Code | highdicom.sr.CodedConcept, optional
        TID 1500 "Procedure reported" (CID 100); default SCT 169070004 "CT of abdomen".
    device_uid: str | None, optional
        Device Observer UID (TID 1004); default derived from manufacturer and institution.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Ready to write with :func:`dicom_sr.sr.write_dataset`.

    Raises
    ------
    TypeError
        An argument has the wrong type (the message names it).
    ValueError
        The datasets are not of the result's studies (Study Instance UID), belong to different
        patients, lack patient / study attributes, a lesion references a SEG that is not given, a
        size is not finite, or the result has no lesion at all.
    """
    require(result, ResponseResult, "result", "ResponseResult")
    follow_up_ct = _datasets(follow_up_ct, "follow_up_ct")
    baseline_ct = _datasets(baseline_ct, "baseline_ct")
    require(follow_up_segmentation, Dataset, "follow_up_segmentation", "pydicom.Dataset")
    require(baseline_segmentation, Dataset, "baseline_segmentation", "pydicom.Dataset")
    if series_number is None:
        series_number = _series_number(result.method, "SR")
    require(series_number, int, "series_number", "int")
    if institution_name is not None:
        require(institution_name, str, "institution_name", "str")
    require(manufacturer, str, "manufacturer", "str")
    require(software_version, str, "software_version", "str")
    require(procedure_reported, (Code, CodedConcept), "procedure_reported", "Code or CodedConcept")
    if device_uid is not None:
        require(device_uid, str, "device_uid", "str")
    if not (result.pairs or result.new_lesions or result.disappeared_lesions):
        raise ValueError('Argument "result" must contain at least one lesion.')
    for name, datasets, point in (
        ("follow_up", [*follow_up_ct, follow_up_segmentation], result.follow_up),
        ("baseline", [*baseline_ct, baseline_segmentation], result.baseline),
    ):
        for ds in datasets:
            for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                if keyword not in ds:
                    raise ValueError(f'A {name} dataset has no "{keyword}".')
            if str(ds.StudyInstanceUID) != point.study_instance_uid:
                raise ValueError(f"a {name} dataset is not from the {name} study of the result (Study Instance UID).")
    missing = [k for k in _PATIENT_STUDY_KEYWORDS if k not in follow_up_ct[0]]
    if missing:
        raise ValueError(f"follow_up_ct[0] lacks {', '.join(missing)}: patient/study attributes come from it.")
    base_patient, follow_patient = baseline_ct[0].get("PatientID"), follow_up_ct[0].get("PatientID")
    if base_patient and follow_patient and str(base_patient) != str(follow_patient):
        raise ValueError("the baseline and follow-up CTs have different Patient IDs: not one patient.")

    evidence = [*follow_up_ct, follow_up_segmentation, *baseline_ct, baseline_segmentation]
    images = {str(ds.SOPInstanceUID): ds for ds in [*follow_up_ct, *baseline_ct]}
    segmentations = {str(ds.SOPInstanceUID): ds for ds in (follow_up_segmentation, baseline_segmentation)}
    notes = _notes(result)
    builder = _GroupBuilder(result, images, segmentations, notes)
    groups: list[_LesionGroup] = []
    for pair in result.pairs:
        groups.extend([*builder.viewer_copy(pair.follow_up, _pair_label(pair)), builder.matched(pair)])
    for lesion in result.new_lesions:
        groups.extend([*builder.viewer_copy(lesion, f"{lesion.tracking_id}: new lesion, {lesion.volume_ml:.1f} ml"),
                       builder.new(lesion)])  # fmt: skip
    for lesion in result.disappeared_lesions:
        label = f"{lesion.tracking_id}: disappeared (baseline {lesion.volume_ml:.1f} ml)"
        groups.extend([*builder.viewer_copy(lesion, label), builder.disappeared(lesion)])
    base_date, follow_date = _study_date(baseline_ct[0]), _study_date(follow_up_ct[0])
    interval = (follow_date - base_date).days if base_date and follow_date else None
    patient = _patient_group(result, interval, notes)

    context = device_observer_context(manufacturer, institution_name, software_version, device_uid)
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=procedure_reported, imaging_measurements=groups
    )
    # The patient-level group has no image region: under "Imaging Measurements" it would be taken by
    # viewers that load every group there as an annotation (OHIF 3 fails on the whole SR), so it is
    # the content of "Derived Imaging Measurements" (TID 1500 row 9), as measurements derived from
    # all the lesions.
    derived = hd.sr.ContainerContentItem(name=codes.DERIVED_IMAGING_MEASUREMENTS, relationship_type=_CONTAINS)
    derived.ContentSequence = hd.sr.ContentSequence([*patient])
    report[0].ContentSequence.append(derived)
    evaluations = ReportEvaluations(
        result.algorithm,
        result.provenance,
        method=result.method,
        frame_of_reference_uid=result.follow_up.frame_of_reference_uid,
        segmentation=result.follow_up.segmentation,
    )
    evaluations.ContentSequence.append(_text(BASELINE_STUDY, result.baseline.study_instance_uid))
    if result.baseline.segmentation is not None:
        evaluations.ContentSequence.append(_text(BASELINE_SEGMENTATION, result.baseline.segmentation.sop_instance_uid))
    report[0].ContentSequence.append(evaluations)

    uids = response_uids(result, "SR")
    return comprehensive_3d_sr(
        evidence=evidence,
        content=report,
        uids=uids,
        series_number=series_number,
        series_description=response_series_description(result),
        manufacturer=manufacturer,
        software_version=software_version,
        institution_name=institution_name,
    )
