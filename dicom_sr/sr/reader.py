"""Read pacs-agent's own TID 1500 Measurement Reports back into the Result dataclasses.

The reader mirrors :func:`dicom_sr.sr.build_measurement_report` and the template classes of
:mod:`dicom_sr.sr.templates`: it walks the content tree (PS3.3 C.17.3) of a Comprehensive 3D SR,

- the report-level "Qualitative Evaluations" container (TID 1500 rows 12-14) for the validation
  status, intended use, weights SHA-256, provenance, method and Frame of Reference UID;
- each TID 1411 / TID 1410 measurement group in order for the tracking identifier and UID
  (TID 4108), the referenced segment or the SCOORD3D outline, the TID 300 measurements with
  their TID 4019 algorithm identification, the predictions and the per-lesion TEXT items;
- the TID 1410 "viewer copy" of a lesion (:class:`dicom_sr.sr.templates.KeySliceOutlineGroup`: same
  tracking UID, an SCOORD image region on the key slice, no per-lesion TEXT items) for the
  key-slice outline: it is the same lesion, never a second one;
- the Current Requested Procedure Evidence Sequence for the series and SOP classes of the
  segmentation objects.

Only SRs written by pacs-agent are understood; anything else raises ``ValueError``. Values come
back exactly: NUM items carry the float in Floating Point Value (FD) besides the decimal string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import cast

import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset

from dicom_sr import codes
from dicom_sr.sr.templates import (
    FRAME_OF_REFERENCE_UID,
    LESION_CONCEPTS,
    METHOD,
    STATUS_CODES,
    Prediction,
)
from inference.results import (
    AlgorithmInfo,
    FeatureValue,
    LesionResult,
    SegmentationKind,
    SegmentationSource,
    StudyResult,
    ValidationStatus,
)

__all__ = ["read_measurement_report", "read_predictions"]

_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_SEGMENTATION_KINDS: dict[str, SegmentationKind] = {_SEG_CLASS: "seg", _RTSTRUCT_CLASS: "rtstruct"}
_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
_Key = tuple[str, str]
"""(Code Value, Coding Scheme Designator) of a concept name."""

_REPORT = ("126000", "DCM")
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_ID = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")
_REFERENCED_SEGMENT = ("121191", "DCM")
_VOLUME_SURFACE = ("121231", "DCM")
_IMAGE_REGION = ("111030", "DCM")
_SOURCE_SERIES = ("121232", "DCM")
_SOURCE_OF_MEASUREMENT = ("121112", "DCM")
_ALGORITHM_NAME = ("111001", "DCM")
_ALGORITHM_VERSION = ("111003", "DCM")
_ALGORITHM_PARAMETERS = ("111002", "DCM")
_VOLUME = (str(codes.VOLUME.value), str(codes.VOLUME.scheme_designator))
_LONG_AXIS = (str(codes.LONG_AXIS.value), str(codes.LONG_AXIS.scheme_designator))
_PRIVATE = codes.PRIVATE_SCHEME_DESIGNATOR
_CONCEPT_TO_FEATURE_CLASS = {(c.value, c.scheme_designator): k for k, c in codes.FEATURE_CONCEPTS.items()}


def _key(item: Dataset) -> _Key:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _find(item: Dataset, key: _Key) -> Dataset | None:
    return next((child for child in _children(item) if _key(child) == key), None)


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _texts(item: Dataset, key: _Key) -> list[str]:
    return [str(child.TextValue) for child in _children(item) if _key(child) == key and "TextValue" in child]


def _text(item: Dataset, key: _Key, what: str) -> str:
    values = _texts(item, key)
    if len(values) != 1:
        raise ValueError(f"{what}: expected one TEXT item {key}, found {len(values)}.")
    return values[0]


def _number(item: Dataset) -> float:
    value = item.MeasuredValueSequence[0]
    if "FloatingPointValue" in value:
        return float(value.FloatingPointValue)
    return float(value.NumericValue)


def _unit(item: Dataset) -> str:
    return str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)


def _check_sr(ds: Dataset) -> Dataset:
    if not isinstance(ds, Dataset):
        raise TypeError('Argument "ds" must have type pydicom.Dataset.')
    if ds.get("SOPClassUID") != _COMPREHENSIVE_3D_SR:
        raise ValueError("not a Comprehensive 3D SR: pacs-agent writes its reports as Comprehensive 3D SR.")
    if (str(ds.ConceptNameCodeSequence[0].CodeValue), str(ds.ConceptNameCodeSequence[0].CodingSchemeDesignator)) != (
        _REPORT
    ):
        raise ValueError('not a TID 1500 "Imaging Measurement Report".')
    return ds


def _groups(ds: Dataset) -> list[Dataset]:
    container = _find(ds, _IMAGING_MEASUREMENTS)
    if container is None:
        raise ValueError('the report has no "Imaging Measurements" container.')
    return [item for item in _children(container) if _key(item) == _MEASUREMENT_GROUP]


def _evidence(ds: Dataset) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, Series Instance UID) of every evidence instance."""
    found: dict[str, tuple[str, str]] = {}
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for ref in series.get("ReferencedSOPSequence", []):
                    found[str(ref.ReferencedSOPInstanceUID)] = (
                        str(ref.ReferencedSOPClassUID),
                        str(series.SeriesInstanceUID),
                    )
    return found


def _algorithm_of(num: Dataset) -> tuple[str, str, list[str]]:
    """TID 4019 name, version and parameters attached to a NUM item."""
    return (
        _text(num, _ALGORITHM_NAME, "Algorithm Identification"),
        _text(num, _ALGORITHM_VERSION, "Algorithm Identification"),
        _texts(num, _ALGORITHM_PARAMETERS),
    )


def _parameter(parameters: list[str], key: str) -> str | None:
    prefix = f"{key}="
    return next((p[len(prefix) :] for p in parameters if p.startswith(prefix)), None)


def _outline(group: Dataset) -> tuple[tuple[tuple[float, float, float], ...], ...]:
    items = [
        c
        for c in _children(group)
        if _key(c) in (_VOLUME_SURFACE, _IMAGE_REGION) and c.ValueType == "SCOORD3D" and "GraphicData" in c
    ]
    outline = []
    for item in items:
        points = np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 3)
        outline.append(tuple((float(x), float(y), float(z)) for x, y, z in points))
    return tuple(outline)


def _tracking_uid(group: Dataset) -> str:
    uid_item = _find(group, _TRACKING_UID)
    if uid_item is None:
        raise ValueError(
            f'Lesion "{_text(group, _TRACKING_ID, "measurement group")}" has no Tracking Unique Identifier.'
        )
    return str(uid_item.UID)


def _is_record(group: Dataset) -> bool:
    """True for a lesion's record group (it has the SOURCE-UID item), False for a viewer copy."""
    return bool(_texts(group, _lesion_key("source_uid")))


def _viewer_copy(group: Dataset) -> tuple[tuple[tuple[float, float], ...], str, dict[_Key, float]]:
    """Key-slice outline (column, row), referenced image UID and NUM values of a viewer copy."""
    what = f'Viewer group of lesion "{_text(group, _TRACKING_ID, "measurement group")}"'
    regions = [c for c in _children(group) if _key(c) == _IMAGE_REGION and c.ValueType == "SCOORD"]
    if len(regions) != 1 or "GraphicData" not in regions[0]:
        raise ValueError(f"{what}: expected one SCOORD image region, found {len(regions)}.")
    region = regions[0]
    images = [c for c in _children(region) if c.ValueType == "IMAGE" and "ReferencedSOPSequence" in c]
    if len(images) != 1:
        raise ValueError(f"{what}: the image region does not reference one image.")
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
    outline = tuple((float(x), float(y)) for x, y in points)
    values = {_key(n): _number(n) for n in _children(group) if n.ValueType == "NUM"}
    return outline, str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID), values


def _with_viewer_copy(lesion: LesionResult, copy: Dataset | None) -> LesionResult:
    """``lesion`` with the outline of its viewer copy, after checking that both agree."""
    if copy is None:
        return lesion
    outline, image_uid, values = _viewer_copy(copy)
    what = f'Viewer group of lesion "{lesion.tracking_id}"'
    if image_uid != lesion.key_slice_sop_instance_uid:
        raise ValueError(f"{what} references {image_uid}, not the key slice {lesion.key_slice_sop_instance_uid}.")
    if values.get(_VOLUME) != lesion.volume_ml or values.get(_LONG_AXIS) != lesion.longest_axial_diameter_mm:
        raise ValueError(f"{what}: its volume or long axis differs from the lesion's measurement group.")
    return dataclasses.replace(lesion, key_outline_px=outline)


def _source(item: Dataset, evidence: dict[str, tuple[str, str]], what: str) -> SegmentationSource:
    """Segmentation source from the SOURCE-* TEXT items of ``item`` plus the evidence.

    SOP class and series come from the evidence; a source missing from the evidence is taken to
    be the SEG of a Referenced Segment item, else an RTSTRUCT, with an empty series UID.
    """
    uid = _text(item, _lesion_key("source_uid"), what)
    number = int(_text(item, _lesion_key("source_number"), what))
    label = _text(item, _lesion_key("source_label"), what)
    segment = _find(item, _REFERENCED_SEGMENT)
    if segment is not None:
        ref = segment.ReferencedSOPSequence[0]
        if str(ref.ReferencedSOPInstanceUID) != uid or int(np.atleast_1d(ref.ReferencedSegmentNumber)[0]) != number:
            raise ValueError(f"{what}: the referenced segment disagrees with the segmentation source items.")
        fallback = (str(ref.ReferencedSOPClassUID), "")
    else:
        fallback = (_RTSTRUCT_CLASS, "")
    sop_class, series = evidence.get(uid, fallback)
    kind = _SEGMENTATION_KINDS.get(sop_class)
    if kind is None:
        raise ValueError(f"{what}: segmentation SOP class {sop_class} is neither SEG nor RTSTRUCT.")
    return SegmentationSource(
        kind=kind,
        sop_instance_uid=uid,
        sop_class_uid=sop_class,
        series_instance_uid=series,
        number=number,
        label="" if label == "-" else label,
    )


def _lesion_key(name: str) -> _Key:
    return _concept_key(LESION_CONCEPTS[name])


def _lesion(
    group: Dataset, evidence: dict[str, tuple[str, str]]
) -> tuple[LesionResult, tuple[str, str, str | None], str | None]:
    """Parse one measurement group; also returns the algorithm (name, version, sha) and CT series."""
    tracking_id = _text(group, _TRACKING_ID, "measurement group")
    what = f'Lesion "{tracking_id}"'
    uid_item = _find(group, _TRACKING_UID)
    if uid_item is None:
        raise ValueError(f"{what} has no Tracking Unique Identifier.")
    volume = diameter = None
    features: list[FeatureValue] = []
    key_slice_uid = _text(group, _lesion_key("key_slice_uid"), what)
    algorithm: tuple[str, str, str | None] | None = None
    for num in _children(group):
        if num.ValueType != "NUM":
            continue
        key = _key(num)
        if key == _VOLUME:
            volume = _number(num)
            name, version, parameters = _algorithm_of(num)
            algorithm = (name, version, _parameter(parameters, "weights-sha256"))
        elif key == _LONG_AXIS:
            diameter = _number(num)
        elif key in _CONCEPT_TO_FEATURE_CLASS:
            feature = _parameter(_algorithm_of(num)[2], "pyradiomics-feature")
            if feature is None:
                raise ValueError(f"{what}: feature {key} has no pyradiomics-feature parameter.")
            features.append(FeatureValue(feature, _number(num), _unit(num)))
    if volume is None or diameter is None or algorithm is None:
        raise ValueError(f"{what}: the volume or the long axis is missing.")
    centroid = tuple(float(v) for v in _text(group, _lesion_key("centroid_mm"), what).split("\\"))
    if len(centroid) != 3:
        raise ValueError(f"{what}: the centroid is not x\\y\\z.")
    source_series = next((str(i.UID) for i in _walk(group) if _key(i) == _SOURCE_SERIES), None)
    lesion = LesionResult(
        tracking_id=tracking_id,
        tracking_uid=str(uid_item.UID),
        source=_source(group, evidence, what),
        volume_ml=volume,
        longest_axial_diameter_mm=diameter,
        centroid_mm=(centroid[0], centroid[1], centroid[2]),
        key_slice_index=int(_text(group, _lesion_key("key_slice_index"), what)),
        key_slice_sop_instance_uid=key_slice_uid,
        features=tuple(features),
        outline_mm=_outline(group),
    )
    return lesion, algorithm, source_series


def read_measurement_report(ds: Dataset) -> StudyResult:
    """Parse a TID 1500 Measurement Report written by pacs-agent into a ``StudyResult``.

    Parameters
    ----------
    ds: pydicom.Dataset
        A Comprehensive 3D SR instance (``pydicom.dcmread`` or a highdicom SR object).

    Returns
    -------
    inference.results.StudyResult
        The method, study / CT series / Frame of Reference UIDs, segmentation source, algorithm
        (name, version, validation status, weights SHA-256, intended use), provenance and the
        lesions in the order of their measurement groups (tracking id and UID, volume, longest
        axial diameter, features with pyradiomics names and UCUM units, source, centroid, key
        slice, outline, key-slice outline from the viewer copy). Predictions are read by
        :func:`read_predictions`.

    Raises
    ------
    TypeError
        When ``ds`` is not a ``pydicom.Dataset``.
    ValueError
        When ``ds`` is not a TID 1500 report written by pacs-agent, an item is missing, or a
        viewer copy (TID 1410 key-slice outline) has no lesion group or disagrees with it.
    """
    _check_sr(ds)
    evaluations = _find(ds, _concept_key(codes.QUALITATIVE_EVALUATIONS))
    if evaluations is None:
        raise ValueError('the report has no "Qualitative Evaluations" container (not written by pacs-agent?).')

    def report_text(concept: CodedConcept, required: bool = True) -> str | None:
        key = _concept_key(concept)
        if not required and not _texts(evaluations, key):
            return None
        return _text(evaluations, key, "Qualitative Evaluations")

    evidence = _evidence(ds)
    records: list[Dataset] = []
    copies: dict[str, Dataset] = {}
    for group in _groups(ds):
        uid = _tracking_uid(group)
        if _is_record(group):
            records.append(group)
        elif uid in copies:
            raise ValueError(f"two viewer groups (TID 1410 key-slice outline) for Tracking UID {uid}.")
        else:
            copies[uid] = group
    parsed = [_lesion(group, evidence) for group in records]
    if not parsed:
        raise ValueError("the report has no measurement group.")
    uids = [lesion.tracking_uid for lesion, _, _ in parsed]
    if len(set(uids)) != len(uids):
        raise ValueError("two lesion measurement groups share a Tracking UID.")
    orphans = set(copies) - set(uids)
    if orphans:
        raise ValueError(f"viewer group(s) without a lesion measurement group: {', '.join(sorted(orphans))}.")
    algorithms = {algorithm for _, algorithm, _ in parsed}
    if len(algorithms) != 1:
        raise ValueError(f"the measurement groups name {len(algorithms)} different algorithms.")
    name, version, sha = algorithms.pop()
    status = report_text(codes.VALIDATION_STATUS)
    if status not in ("DEMO", "RESEARCH", "VALIDATED"):
        raise ValueError(f'unknown validation status "{status}".')
    provenance: dict[str, str] = {}
    for text in _texts(evaluations, _concept_key(codes.PIPELINE_PROVENANCE)):
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f'provenance item "{text}" is not key=value.')
        provenance[key] = value
    ct_series = next((series for _, _, series in parsed if series), None)
    if ct_series is None:  # only planar groups: take the CT series of the evidence
        ct_series = next((series for sop_class, series in evidence.values() if sop_class in _CT_CLASSES), None)
    if ct_series is None:
        raise ValueError("cannot tell the CT series: no source series and no CT in the evidence.")
    lesions = tuple(_with_viewer_copy(lesion, copies.get(lesion.tracking_uid)) for lesion, _, _ in parsed)
    has_source = bool(_texts(evaluations, _lesion_key("source_uid")))
    segmentation = _source(evaluations, evidence, "Qualitative Evaluations") if has_source else None
    return StudyResult(
        method=str(report_text(METHOD)),
        study_instance_uid=str(ds.StudyInstanceUID),
        ct_series_instance_uid=ct_series,
        frame_of_reference_uid=str(report_text(FRAME_OF_REFERENCE_UID)),
        segmentation=segmentation,
        algorithm=AlgorithmInfo(
            name=name,
            version=version,
            validation_status=cast(ValidationStatus, status),  # one of its values: checked above
            weights_sha256=sha,
            intended_use=report_text(codes.INTENDED_USE, required=False) or "",
        ),
        lesions=lesions,
        provenance=provenance,
        patient_predictions=_patient_predictions(ds),
    )


def _concept_key(concept: CodedConcept) -> _Key:
    return (str(concept.value), str(concept.scheme_designator))


def read_predictions(ds: Dataset) -> dict[str, tuple[Prediction, ...]]:
    """Predictions of a pacs-agent TID 1500 report, by lesion Tracking UID.

    Parameters
    ----------
    ds: pydicom.Dataset
        A Comprehensive 3D SR written by :func:`dicom_sr.sr.build_measurement_report`.

    Returns
    -------
    dict[str, tuple[dicom_sr.sr.templates.Prediction, ...]]
        For each lesion with predictions, in the order of the qualitative evaluations.

    Raises
    ------
    TypeError
        When ``ds`` is not a ``pydicom.Dataset``.
    ValueError
        When ``ds`` is not a pacs-agent report or a prediction lacks its probability or threshold.
    """
    _check_sr(ds)
    found: dict[str, tuple[Prediction, ...]] = {}
    for group in _groups(ds):
        uid_item = _find(group, _TRACKING_UID)
        if uid_item is None:
            continue
        predictions = _group_predictions(group, str(uid_item.UID))
        if predictions:
            found[str(uid_item.UID)] = predictions
    return found


def _group_predictions(group: Dataset, what: str) -> tuple[Prediction, ...]:
    """The predictions of one measurement group: each STATUS code with its PROB and THRESH numbers."""
    by_code = {(c.value, c.scheme_designator): status for status, c in STATUS_CODES.items()}
    numbers = {_key(n): _number(n) for n in _children(group) if n.ValueType == "NUM"}
    predictions = []
    for item in _children(group):
        value, scheme = _key(item)
        if item.ValueType != "CODE" or scheme != _PRIVATE or not value.endswith("-STATUS"):
            continue
        label = value.removesuffix("-STATUS")
        code = item.ConceptCodeSequence[0]
        status = by_code.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
        probability = numbers.get((f"{label}-PROB", _PRIVATE))
        threshold = numbers.get((f"{label}-THRESH", _PRIVATE))
        if status is None or probability is None or threshold is None:
            raise ValueError(f"prediction {label} of {what}: status, probability or threshold missing.")
        name = str(item.ConceptNameCodeSequence[0].CodeMeaning).removesuffix(" status (predicted)")
        predictions.append(
            Prediction(
                label=label,
                status=status,
                probability=probability,
                threshold=threshold,
                name="" if name == label else name,
            )
        )
    return tuple(predictions)


def _patient_predictions(ds: Dataset) -> tuple[Prediction, ...]:
    """The patient-level predictions under "Derived Imaging Measurements", if the report has them."""
    derived = _find(ds, _concept_key(codes.DERIVED_IMAGING_MEASUREMENTS))
    if derived is None:
        return ()
    return tuple(
        prediction
        for group in _children(derived)
        for prediction in _group_predictions(group, "the patient-level result")
    )
