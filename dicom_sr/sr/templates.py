r"""Small SR template classes for the content pacs-agent writes (TID 1500 and its sub-templates).

Each class validates its arguments in ``__init__`` (``TypeError`` naming the argument for a wrong
type, ``ValueError`` for a bad value) and builds highdicom content items; :mod:`dicom_sr.sr.lesions`
assembles them into a TID 1500 Measurement Report and :mod:`dicom_sr.sr.reader` parses them back.

=================================  =========================================================
Class                              Content (PS3.16)
=================================  =========================================================
:class:`ResultAlgorithm`           TID 4019 Algorithm Identification (name, version, weights
                                   SHA-256 as the first parameter)
:class:`PredictionEvaluation`      TID 1411 row "Qualitative Evaluation" (CODE): the predicted
                                   status, e.g. "KRAS status (predicted)" = "Mutant"
:class:`PredictionMeasurements`    Two TID 300 NUM items: the probability of the positive
                                   class and the decision threshold, UCUM ``1``
:class:`LesionMeasurementGroup`    TID 1411 Volumetric ROI (TID 1410 Planar ROI for a lesion
                                   outlined by one polygon) measurement group of one lesion
:class:`KeySliceOutlineGroup`      TID 1410 Planar ROI measurement group: the lesion's outline
                                   on its key slice (SCOORD POLYLINE), volume and long axis - the
                                   copy of the lesion that viewers (OHIF) draw
:class:`UsageWarning`              TEXT "Usage warning" = "DEMO MODEL - NOT FOR CLINICAL USE"
:class:`ReportEvaluations`         TID 1500 rows 12-14 "Qualitative Evaluations" container
=================================  =========================================================

Coding of predictions (private scheme ``99PACSAGENT``, declared in every SR, see
:mod:`dicom_sr.codes`; standard codes where DICOM PS3.16 has one):

==========================  ================  ==============================================
Concept                     Scheme / value    Meaning
==========================  ================  ==============================================
status concept name         99PACSAGENT       ``<LABEL>-STATUS`` "<LABEL> status (predicted)"
probability concept name    99PACSAGENT       ``<LABEL>-PROB`` "<LABEL> probability"
threshold concept name      99PACSAGENT       ``<LABEL>-THRESH`` "<LABEL> decision threshold"
status "mutant"             99PACSAGENT       ``MUTANT`` "Mutant"
status "wild type"          99PACSAGENT       ``WILD-TYPE`` "Wild type"
status "high risk"          SCT 15508007      "High risk"
status "low risk"           SCT 75976002      "Low risk"
status "positive"           SCT 10828004      "Positive"
status "negative"           SCT 260385009     "Negative"
==========================  ================  ==============================================

``<LABEL>`` is the prediction label in upper case (``KRAS``, ``EGFR``, ``NRAS``, ``BRAF``,
``PIK3CA``, ``RAS``, ...; 1-9 characters ``A-Z0-9``, so every code value fits the 16 characters of
an SH). DICOM PS3.16 has no codes for "mutant" / "wild type" or for per-gene mutation status
(SNOMED CT's "<gene> mutation positive" findings are not part of PS3.16 and their value set does
not cover "wild type"), hence the private codes; risk and positive / negative use SNOMED CT codes
listed in PS3.16.

Further private concepts written so that :mod:`dicom_sr.sr.reader` can rebuild the Result
dataclasses exactly (TEXT items; TID 1411 and TID 1500 allow TEXT qualitative evaluations):

==================  ======================================================================
Code value          Code meaning
==================  ======================================================================
METHOD              Analysis method (report level: the pacs-agent method identifier)
SOURCE-UID          Segmentation SOP Instance UID (per lesion: the SEG or RTSTRUCT)
SOURCE-NUMBER       Segment or ROI number (per lesion)
SOURCE-LABEL        Segment or ROI label (per lesion)
CENTROID-MM         Lesion centroid (patient, mm), ``x\y\z`` as exact decimal floats
KEY-SLICE-INDEX     Key slice index (0-based, in sorted CT order)
KEY-SLICE-UID       Key slice SOP Instance UID
==================  ======================================================================

The Frame of Reference UID is written at report level as TEXT with the standard concept name
DCM 112227 "Frame of Reference UID".
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_sr import codes
from dicom_sr.codes import (
    FRAME_OF_REFERENCE_UID,
    LESION_CONCEPTS,
    METHOD,
    POSITIVE_STATUSES,
    STATUS_CODES,
)
from dicom_sr.common import require
from inference.results import DEMO_WARNING, AlgorithmInfo, LesionResult, Prediction, SegmentationSource

__all__ = [
    "FRAME_OF_REFERENCE_UID",
    "LESION_CONCEPTS",
    "METHOD",
    "POSITIVE_STATUSES",
    "STATUS_CODES",
    "KeySliceOutlineGroup",
    "LesionMeasurementGroup",
    "Prediction",
    "PredictionEvaluation",
    "PredictionMeasurements",
    "ReportEvaluations",
    "ResultAlgorithm",
    "UsageWarning",
    "patient_level_container",
    "prediction_concepts",
    "viewer_label",
]

logger = logging.getLogger(__name__)

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_LABEL_PATTERN = re.compile(r"[A-Z0-9]{1,9}")


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


def _source_items(source: SegmentationSource) -> list[hd.sr.TextContentItem]:
    """SOURCE-UID, SOURCE-NUMBER and SOURCE-LABEL TEXT items of a segmentation source."""
    return [
        _text(LESION_CONCEPTS["source_uid"], source.sop_instance_uid),
        _text(LESION_CONCEPTS["source_number"], str(int(source.number))),
        _text(LESION_CONCEPTS["source_label"], source.label or "-"),
    ]


def prediction_concepts(label: str, name: str = "") -> tuple[CodedConcept, CodedConcept, CodedConcept]:
    """Concept names of the status, probability and threshold items of a prediction label.

    Parameters
    ----------
    label: str
        Upper-case prediction label, 1-9 characters ``A-Z0-9`` (``"KRAS"``): the code values.
    name: str, optional
        How readers see the label (``"PIK3CA or BRAF"``): the code meanings; default ``label``.

    Returns
    -------
    tuple[highdicom.sr.CodedConcept, highdicom.sr.CodedConcept, highdicom.sr.CodedConcept]
        ``<LABEL>-STATUS``, ``<LABEL>-PROB`` and ``<LABEL>-THRESH`` in scheme ``99PACSAGENT``.

    Raises
    ------
    TypeError
        When ``label`` is not a ``str``.
    ValueError
        When ``label`` does not match ``[A-Z0-9]{1,9}``.
    """
    require(label, str, "label", "str")
    if not _LABEL_PATTERN.fullmatch(label):
        raise ValueError(f'Prediction label "{label}" must be 1-9 characters A-Z or 0-9 (e.g. "KRAS").')
    require(name, str, "name", "str")
    shown = name.strip() or label
    return (
        codes.private_concept(f"{label}-STATUS", f"{shown} status (predicted)"),
        codes.private_concept(f"{label}-PROB", f"{shown} probability"),
        codes.private_concept(f"{label}-THRESH", f"{shown} decision threshold"),
    )


def check_prediction(prediction: Prediction, name: str = "prediction") -> Prediction:
    """Validate a :class:`Prediction` (type, label, status, probability range, consistency).

    Parameters
    ----------
    prediction: Prediction
        The prediction to check.
    name: str, optional
        Argument name used in error messages.

    Returns
    -------
    Prediction
        ``prediction`` unchanged.

    Raises
    ------
    TypeError
        When ``prediction`` is not a :class:`Prediction` or a field has the wrong type.
    ValueError
        Unknown status or label, probability / threshold outside [0, 1] or not finite, or a
        status that contradicts ``probability >= threshold``.
    """
    require(prediction, Prediction, name, "Prediction")
    prediction_concepts(prediction.label)
    if prediction.status not in STATUS_CODES:
        raise ValueError(f'Unknown prediction status "{prediction.status}"; known: {", ".join(STATUS_CODES)}.')
    for field in ("probability", "threshold"):
        value = getattr(prediction, field)
        require(value, (int, float), f"{name}.{field}", "float")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f'"{name}.{field}" must be a number in [0, 1], not {value!r}.')
    positive = prediction.probability >= prediction.threshold
    if positive != (prediction.status in POSITIVE_STATUSES):
        raise ValueError(
            f'{prediction.label}: status "{prediction.status}" contradicts probability '
            f"{prediction.probability} and threshold {prediction.threshold}."
        )
    return prediction


class ResultAlgorithm(hd.sr.AlgorithmIdentification):
    """TID 4019 Algorithm Identification of a pacs-agent algorithm.

    The weights checksum (when the algorithm has weights) is the first Algorithm Parameter,
    written as ``weights-sha256=<hex>``; further parameters follow.
    """

    def __init__(self, algorithm: AlgorithmInfo, parameters: Sequence[str] = ()) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        algorithm: inference.results.AlgorithmInfo
            Name, version and weights checksum of the algorithm.
        parameters: Sequence[str], optional
            Further Algorithm Parameters (``key=value``).

        Raises
        ------
        TypeError
            When an argument has the wrong type.
        ValueError
            When the name or version is empty.
        """
        require(algorithm, AlgorithmInfo, "algorithm", "AlgorithmInfo")
        if isinstance(parameters, str) or not isinstance(parameters, Sequence):
            raise TypeError('Argument "parameters" must be a sequence of str.')
        if any(not isinstance(p, str) for p in parameters):
            raise TypeError('Items of argument "parameters" must have type str.')
        if not algorithm.name or not algorithm.version:
            raise ValueError('Argument "algorithm" must have a non-empty name and version.')
        params = [f"weights-sha256={algorithm.weights_sha256}"] if algorithm.weights_sha256 else []
        params.extend(parameters)
        super().__init__(name=algorithm.name, version=algorithm.version, parameters=params or None)


class PredictionEvaluation(hd.sr.QualitativeEvaluation):
    """TID 1411 qualitative evaluation (CODE): ``<LABEL> status (predicted)`` = coded status."""

    def __init__(self, prediction: Prediction) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        prediction: Prediction
            The prediction; see :func:`check_prediction` for what is validated.

        Raises
        ------
        TypeError
            When ``prediction`` is not a :class:`Prediction`.
        ValueError
            When the prediction is invalid.
        """
        check_prediction(prediction)
        status_name, _, _ = prediction_concepts(prediction.label, prediction.name)
        super().__init__(name=status_name, value=STATUS_CODES[prediction.status])


class PredictionMeasurements(list[hd.sr.Measurement]):
    """The probability (of the positive class) and the decision threshold as TID 300 NUM items.

    A list of two ``highdicom.sr.Measurement`` (``<LABEL>-PROB`` then ``<LABEL>-THRESH``),
    both in UCUM ``1`` and both carrying the TID 4019 algorithm identification.
    """

    def __init__(self, prediction: Prediction, algorithm: AlgorithmInfo) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        prediction: Prediction
            The prediction.
        algorithm: inference.results.AlgorithmInfo
            The model that made it.

        Raises
        ------
        TypeError
            When an argument has the wrong type.
        ValueError
            When the prediction is invalid.
        """
        check_prediction(prediction)
        require(algorithm, AlgorithmInfo, "algorithm", "AlgorithmInfo")
        _, probability_name, threshold_name = prediction_concepts(prediction.label, prediction.name)
        unity = codes.ucum("1")
        super().__init__(
            hd.sr.Measurement(name=name, value=float(value), unit=unity, algorithm_id=ResultAlgorithm(algorithm))
            for name, value in (
                (probability_name, prediction.probability),
                (threshold_name, prediction.threshold),
            )
        )


class UsageWarning(hd.sr.TextContentItem):
    """TEXT "Usage warning" (99PACSAGENT USAGE-WARNING); default "DEMO MODEL - NOT FOR CLINICAL USE"."""

    def __init__(self, text: str = DEMO_WARNING) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        text: str, optional
            The warning.

        Raises
        ------
        TypeError
            When ``text`` is not a ``str``.
        ValueError
            When ``text`` is empty.
        """
        require(text, str, "text", "str")
        if not text.strip():
            raise ValueError('Argument "text" must not be empty.')
        super().__init__(name=codes.USAGE_WARNING, value=text, relationship_type=_CONTAINS)


class ReportEvaluations(hd.sr.ContainerContentItem):
    """TID 1500 rows 12-14: CONTAINER "Qualitative Evaluations" (UMLS C0034375) of the report.

    Children, in this order: usage warning (DEMO only), validation status, intended use,
    weights SHA-256, one ``key=value`` TEXT per provenance entry (sorted by key), the method
    identifier, the Frame of Reference UID and the segmentation object of the study (SOURCE-UID,
    SOURCE-NUMBER, SOURCE-LABEL; all optional).
    """

    def __init__(
        self,
        algorithm: AlgorithmInfo,
        provenance: Mapping[str, str] | None = None,
        *,
        method: str | None = None,
        frame_of_reference_uid: str | None = None,
        segmentation: SegmentationSource | None = None,
    ) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        algorithm: inference.results.AlgorithmInfo
            Algorithm whose validation status, intended use and weights are stated.
        provenance: Mapping[str, str] | None, optional
            Reproducibility facts (library versions, parameter hash).
        method: str | None, optional
            pacs-agent method identifier (``"radiomics"``, ``"M1"`` ...).
        frame_of_reference_uid: str | None, optional
            Frame of Reference of the CT the measurements were made on.
        segmentation: inference.results.SegmentationSource | None, optional
            The segmentation object (``StudyResult.segmentation``).

        Raises
        ------
        TypeError
            When an argument has the wrong type.
        ValueError
            When a provenance key is empty or contains ``=``.
        """
        require(algorithm, AlgorithmInfo, "algorithm", "AlgorithmInfo")
        provenance = {} if provenance is None else provenance
        require(provenance, Mapping, "provenance", "Mapping[str, str]")
        for key, value in provenance.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError('Argument "provenance" must map str to str.')
            if not key or "=" in key:
                raise ValueError(f'Provenance key "{key}" must be non-empty and contain no "=".')
        for name, text in (("method", method), ("frame_of_reference_uid", frame_of_reference_uid)):
            if text is not None:
                require(text, str, name, "str")
                if not text:
                    raise ValueError(f'Argument "{name}" must not be empty.')
        if segmentation is not None:
            require(segmentation, SegmentationSource, "segmentation", "SegmentationSource")
        super().__init__(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
        items: list[hd.sr.ContentItem] = []
        if algorithm.is_demo:
            items.append(UsageWarning())
        items.append(_text(codes.VALIDATION_STATUS, algorithm.validation_status))
        if algorithm.intended_use:
            items.append(_text(codes.INTENDED_USE, algorithm.intended_use))
        if algorithm.weights_sha256:
            items.append(_text(codes.WEIGHTS_SHA256, algorithm.weights_sha256))
        items.extend(_text(codes.PIPELINE_PROVENANCE, f"{k}={v}") for k, v in sorted(provenance.items()))
        if method is not None:
            items.append(_text(METHOD, method))
        if frame_of_reference_uid is not None:
            items.append(_text(FRAME_OF_REFERENCE_UID, frame_of_reference_uid))
        if segmentation is not None:
            items.extend(_source_items(segmentation))
        self.ContentSequence = hd.sr.ContentSequence(items)


def _size_measurements(
    lesion: LesionResult, algorithm: AlgorithmInfo, key_slice: Dataset | None
) -> list[hd.sr.Measurement]:
    """TID 300 Volume (ml) and Long Axis (mm, source image: the key slice when given) of a lesion."""
    for name in ("volume_ml", "longest_axial_diameter_mm"):
        if not math.isfinite(getattr(lesion, name)):
            raise ValueError(f'Lesion "{lesion.tracking_id}": "{name}" must be a finite number.')
    referenced = (
        [
            hd.sr.SourceImageForMeasurement(
                referenced_sop_class_uid=key_slice.SOPClassUID, referenced_sop_instance_uid=key_slice.SOPInstanceUID
            )
        ]
        if key_slice is not None
        else None
    )
    return [
        hd.sr.Measurement(
            name=codes.VOLUME,
            value=float(lesion.volume_ml),
            unit=codes.ucum("ml"),
            algorithm_id=ResultAlgorithm(algorithm),
        ),
        hd.sr.Measurement(
            name=codes.LONG_AXIS,
            value=float(lesion.longest_axial_diameter_mm),
            unit=codes.ucum("mm"),
            algorithm_id=ResultAlgorithm(algorithm, ["longest axial diameter"]),
            referenced_images=referenced,
        ),
    ]


_GroupType = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def _closed_polygon(points: Sequence[Sequence[float]], tracking_id: str) -> np.ndarray:
    polygon = np.asarray(points, dtype=np.float64)
    if polygon.ndim != 2 or polygon.shape[1] != 3 or len(np.unique(polygon, axis=0)) < 3:
        raise ValueError(
            f'Lesion "{tracking_id}": each polygon of "outline_mm" needs at least 3 distinct (x, y, z) points.'
        )
    if not np.array_equal(polygon[0], polygon[-1]):
        polygon = np.vstack([polygon, polygon[:1]])
    return polygon


class LesionMeasurementGroup:
    """TID 1411 (or TID 1410) measurement group of one lesion.

    Content: TID 4108 tracking identifier + UID, finding "Neoplasm" (SCT 108369006), finding
    site (optional), the reference to the lesion's source - the SEG segment (TID 1411 row 7),
    the RTSTRUCT outline as a Volume Surface (SCOORD3D polygons, row 9), or, for an RTSTRUCT
    lesion outlined by a single polygon, a TID 1410 Planar ROI with an SCOORD3D image region -
    TID 300 measurements, each with TID 4019 algorithm identification, in this order: the
    predictions' probability and threshold (:class:`PredictionMeasurements`), the radiomic
    features coded per :mod:`dicom_sr.codes`, the volume in ml and the longest axial diameter
    in mm; the predicted statuses (:class:`PredictionEvaluation`) and the per-lesion TEXT
    items of :data:`LESION_CONCEPTS`. It is the complete record of the lesion; a
    :class:`KeySliceOutlineGroup` may precede it as the copy viewers draw.

    The highdicom class depends on the kind of reference, so this class holds the built group
    in :attr:`group` instead of inheriting from one of them.
    """

    def __init__(
        self,
        lesion: LesionResult,
        *,
        algorithm: AlgorithmInfo,
        ct_series_instance_uid: str,
        frame_of_reference_uid: str,
        predictions: Sequence[Prediction] = (),
        finding_site: Code | CodedConcept | None = None,
        source_images: Mapping[str, Dataset] | None = None,
    ) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        lesion: inference.results.LesionResult
            The lesion's measurements and source.
        algorithm: inference.results.AlgorithmInfo
            Algorithm identified on every measurement.
        ct_series_instance_uid: str
            Source series for segmentation (the CT).
        frame_of_reference_uid: str
            Frame of Reference of SCOORD3D outlines.
        predictions: Sequence[Prediction], optional
            Model predictions for this lesion, at most one per label.
        finding_site: pydicom.sr.coding.Code | highdicom.sr.CodedConcept | None, optional
            Anatomic site (e.g. ``codes.SCT.Liver``).
        source_images: Mapping[str, pydicom.Dataset] | None, optional
            Evidence by SOP Instance UID; when the key slice is among them, the long axis
            references it as its source image.

        Raises
        ------
        TypeError
            When an argument has the wrong type.
        ValueError
            Non-finite volume or diameter, unknown feature or segmentation kind, missing or
            degenerate RTSTRUCT outline, invalid or duplicate predictions.
        """
        require(lesion, LesionResult, "lesion", "LesionResult")
        require(algorithm, AlgorithmInfo, "algorithm", "AlgorithmInfo")
        require(ct_series_instance_uid, str, "ct_series_instance_uid", "str")
        require(frame_of_reference_uid, str, "frame_of_reference_uid", "str")
        if isinstance(predictions, (str, Prediction)) or not isinstance(predictions, Sequence):
            raise TypeError('Argument "predictions" must be a sequence of Prediction.')
        for prediction in predictions:
            check_prediction(prediction, "predictions[]")
        labels = [p.label for p in predictions]
        if len(set(labels)) != len(labels):
            raise ValueError(f'Lesion "{lesion.tracking_id}": more than one prediction per label ({labels}).')
        if finding_site is not None:
            require(finding_site, (Code, CodedConcept), "finding_site", "Code or CodedConcept")
        images = {} if source_images is None else source_images
        require(images, Mapping, "source_images", "Mapping[str, pydicom.Dataset]")
        self.tracking_uid = lesion.tracking_uid
        self.predictions = tuple(predictions)

        # Order of the TID 300 items (free within the row): predictions, features, then volume and
        # long axis. OHIF merges this group with the viewer copy that precedes it (same tracking
        # UID) and labels the outline with the first five NUMs: volume and long axis of the copy,
        # then the probabilities and features - not the same size twice.
        measurements: list[hd.sr.Measurement] = [
            item for prediction in predictions for item in PredictionMeasurements(prediction, algorithm)
        ]
        measurements.extend(self._measurements(lesion, algorithm, images))
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=lesion.tracking_uid, identifier=lesion.tracking_id),
            "finding_type": codes.NEOPLASM,
            "finding_sites": [hd.sr.FindingSite(anatomic_location=finding_site)] if finding_site else None,
            "measurements": measurements,
            "qualitative_evaluations": [PredictionEvaluation(p) for p in predictions] or None,
        }
        self.group: _GroupType = self._group(lesion, common, ct_series_instance_uid, frame_of_reference_uid)
        self.group[0].ContentSequence.extend(_source_items(lesion.source))
        x, y, z = (float(c) for c in lesion.centroid_mm)
        for key, value in (
            ("centroid_mm", f"{x!r}\\{y!r}\\{z!r}"),
            ("key_slice_index", str(int(lesion.key_slice_index))),
            ("key_slice_uid", lesion.key_slice_sop_instance_uid),
        ):
            self.group[0].ContentSequence.append(_text(LESION_CONCEPTS[key], value))

    @staticmethod
    def _measurements(
        lesion: LesionResult, algorithm: AlgorithmInfo, images: Mapping[str, Dataset]
    ) -> list[hd.sr.Measurement]:
        """TID 300 measurements: radiomic features (finite only), then volume and longest axial diameter."""
        measurements: list[hd.sr.Measurement] = []
        for feature in lesion.features:
            concept = codes.feature_concept(feature.name)
            unit = codes.ucum(feature.unit)
            if not math.isfinite(feature.value):  # a NUM cannot hold NaN / inf
                logger.warning("feature %s of %s is not finite; left out of the SR", feature.name, lesion.tracking_uid)
                continue
            measurements.append(
                hd.sr.Measurement(
                    name=concept,
                    value=float(feature.value),
                    unit=unit,
                    algorithm_id=ResultAlgorithm(algorithm, [f"pyradiomics-feature={feature.name}"]),
                )
            )
        measurements.extend(_size_measurements(lesion, algorithm, images.get(lesion.key_slice_sop_instance_uid)))
        return measurements

    @staticmethod
    def _group(
        lesion: LesionResult, common: dict[str, Any], ct_series_instance_uid: str, frame_of_reference_uid: str
    ) -> _GroupType:
        source_series = hd.sr.SourceSeriesForSegmentation(ct_series_instance_uid)
        if lesion.source.kind == "seg":
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=lesion.source.sop_class_uid,
                sop_instance_uid=lesion.source.sop_instance_uid,
                segment_number=lesion.source.number,
                source_series=source_series,
            )
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)
        if lesion.source.kind != "rtstruct":
            raise ValueError(f'Lesion "{lesion.tracking_id}": unknown segmentation kind "{lesion.source.kind}".')
        if not lesion.outline_mm:
            raise ValueError(
                f'Lesion "{lesion.tracking_id}" comes from an RTSTRUCT but has no "outline_mm" to reference.'
            )
        polygons = [_closed_polygon(p, lesion.tracking_id) for p in lesion.outline_mm]
        if len(polygons) == 1:  # a one-slice lesion: planar ROI (TID 1410) with a 3D image region
            region = hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                graphic_data=polygons[0],
                frame_of_reference_uid=frame_of_reference_uid,
            )
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
            graphic_data=polygons,
            frame_of_reference_uid=frame_of_reference_uid,
            source_series=source_series,
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_volume_surface=surface, **common)


def _key_outline(lesion: LesionResult, key_slice: Dataset) -> np.ndarray:
    """``lesion.key_outline_px`` as a closed (n, 2) array, checked against the key slice's size."""
    what = f'Lesion "{lesion.tracking_id}"'
    try:
        polygon = np.asarray(lesion.key_outline_px, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f'{what}: "key_outline_px" must be a sequence of (column, row) numbers.') from None
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(np.unique(polygon, axis=0)) < 3:
        raise ValueError(f'{what}: "key_outline_px" needs at least 3 distinct (column, row) points.')
    if not np.all(np.isfinite(polygon)):
        raise ValueError(f'{what}: "key_outline_px" must hold finite numbers.')
    columns, rows = key_slice.get("Columns"), key_slice.get("Rows")
    upper = np.array([np.inf if columns is None else float(columns), np.inf if rows is None else float(rows)])
    if np.any(polygon < 0.0) or np.any(polygon > upper):
        raise ValueError(f'{what}: "key_outline_px" leaves the key slice (0..Columns, 0..Rows).')
    if not np.array_equal(polygon[0], polygon[-1]):
        polygon = np.vstack([polygon, polygon[:1]])
    return polygon


class KeySliceOutlineGroup(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    """TID 1410 Planar ROI measurement group: the lesion outlined on its key slice, for viewers.

    The same lesion as its TID 1411 group (:class:`LesionMeasurementGroup`): same TID 4108 tracking
    UID, finding "Neoplasm" (SCT 108369006), finding site (optional). Laid out as OHIF's
    Cornerstone3D adapters read a planar freehand ROI, so OHIF loads it as a measurement it can
    display, list and track (no "not compatible" badge):

    - Tracking Identifier ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI:<tracking id>``
      (:data:`dicom_sr.codes.OHIF_FREEHAND_TOOL`; OHIF picks its tool by this prefix);
    - first NUM: Area (SCT 42798000, mm2) of the key-slice outline, INFERRED FROM an SCOORD
      POLYLINE, closed (first point = last, PS3.3 C.18.6.1.2), in pixel coordinates of the key
      slice, SELECTED FROM it (OHIF draws this graphic);
    - then, per prediction, the probability of the positive class in percent (``<LABEL>
      probability``, UCUM ``%``), then the lesion's Volume (ml) and Long Axis (mm), each with TID
      4019 algorithm identification: the labels OHIF writes next to the outline;
    - TEXT Comment (DCM 121106): one line naming the lesion and its result, e.g. "[DEMO] Liver
      lesions lesion 1: KRAS mutant (87 %)" - OHIF's label of the measurement in its panel;
    - the Image Region (TID 1410 row 7): the same POLYLINE, SELECTED FROM the key slice.

    The TID 1411 group stays the complete record; :mod:`dicom_sr.sr.reader` reads this group as the
    viewer copy of the same lesion (by tracking UID) and checks that they agree.
    """

    def __init__(
        self,
        lesion: LesionResult,
        *,
        algorithm: AlgorithmInfo,
        key_slice: Dataset,
        finding_site: Code | CodedConcept | None = None,
        predictions: Sequence[Prediction] = (),
        comment: str | None = None,
    ) -> None:
        """Validate the arguments and build the content.

        Parameters
        ----------
        lesion: inference.results.LesionResult
            The lesion; its ``key_outline_px`` must not be empty.
        algorithm: inference.results.AlgorithmInfo
            Algorithm identified on the measurements.
        key_slice: pydicom.Dataset
            The key slice instance (``lesion.key_slice_sop_instance_uid``; pixel data not needed):
            its SOP Class UID is referenced, its Rows / Columns bound the outline, its Pixel
            Spacing scales the area.
        finding_site: pydicom.sr.coding.Code | highdicom.sr.CodedConcept | None, optional
            Anatomic site (e.g. ``codes.SCT.Liver``).
        predictions: Sequence[Prediction], optional
            The lesion's predictions; their probabilities are shown next to the outline.
        comment: str | None, optional
            The label of the measurement (TEXT Comment), at most 1024 characters.

        Raises
        ------
        TypeError
            When an argument has the wrong type.
        ValueError
            Empty, degenerate, non-finite or out-of-image outline; ``key_slice`` is not the
            lesion's key slice or has no Pixel Spacing; non-finite volume or diameter; an invalid
            prediction; an empty or over-long comment.
        """
        require(lesion, LesionResult, "lesion", "LesionResult")
        require(algorithm, AlgorithmInfo, "algorithm", "AlgorithmInfo")
        require(key_slice, Dataset, "key_slice", "pydicom.Dataset")
        if finding_site is not None:
            require(finding_site, (Code, CodedConcept), "finding_site", "Code or CodedConcept")
        if isinstance(predictions, (str, Prediction)) or not isinstance(predictions, Sequence):
            raise TypeError('Argument "predictions" must be a sequence of Prediction.')
        for prediction in predictions:
            check_prediction(prediction, "predictions")
        if comment is not None:
            require(comment, str, "comment", "str")
            if not comment.strip() or len(comment) > 1024:
                raise ValueError('Argument "comment" must be 1 to 1024 characters.')
        if not lesion.key_outline_px:
            raise ValueError(f'Lesion "{lesion.tracking_id}" has no "key_outline_px" to draw.')
        if str(key_slice.get("SOPInstanceUID", "")) != lesion.key_slice_sop_instance_uid:
            raise ValueError(
                f'Argument "key_slice" is not the key slice of lesion "{lesion.tracking_id}" '
                f"({lesion.key_slice_sop_instance_uid})."
            )
        if "SOPClassUID" not in key_slice:
            raise ValueError('Argument "key_slice" has no SOP Class UID.')
        outline = _key_outline(lesion, key_slice)

        def source() -> hd.sr.SourceImageForRegion:
            return hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(key_slice.SOPClassUID),
                referenced_sop_instance_uid=str(key_slice.SOPInstanceUID),
            )

        area = hd.sr.Measurement(
            name=codes.AREA,
            value=_outline_area_mm2(outline, key_slice, lesion.tracking_id),
            unit=codes.ucum("mm2"),
            algorithm_id=ResultAlgorithm(algorithm, ["key-slice outline"]),
        )
        percentages = [
            hd.sr.Measurement(
                name=prediction_concepts(prediction.label, prediction.name)[1],
                value=round(100.0 * float(prediction.probability), 6),
                unit=codes.ucum("%"),
                algorithm_id=ResultAlgorithm(algorithm),
            )
            for prediction in predictions
        ]
        super().__init__(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=lesion.tracking_uid, identifier=f"{codes.OHIF_FREEHAND_TOOL}:{lesion.tracking_id}"
            ),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=source()
            ),
            finding_type=codes.NEOPLASM,
            finding_sites=[hd.sr.FindingSite(anatomic_location=finding_site)] if finding_site else None,
            measurements=[area, *percentages, *_size_measurements(lesion, algorithm, key_slice)],
        )
        # The outline the area was measured on, INFERRED FROM under the area NUM: where OHIF's
        # adapters look for the graphic of a freehand ROI (highdicom refuses it in the
        # constructor of a TID 1410 group, so it is added to the built NUM).
        area_item = next(item for item in self[0].ContentSequence if item.ValueType == "NUM")
        area_item.ContentSequence.append(
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=source()
            )
        )
        if comment is not None:
            self[0].ContentSequence.append(_text(codes.COMMENT, comment.strip()))


def viewer_label(lesion: LesionResult, predictions: Sequence[Prediction], algorithm: AlgorithmInfo) -> str:
    """One line naming a lesion and its result, for viewers (the Comment of :class:`KeySliceOutlineGroup`).

    ``[DEMO] Liver lesions lesion 1: KRAS mutant (87 %)``; without predictions the size
    (``Liver lesions lesion 1: 12.9 ml, long axis 30.8 mm``). DEMO models are named first, so a
    viewer that shows only the start of the label still shows it.
    """
    if predictions:
        result = "; ".join(f"{p.display} {p.status} ({100 * p.probability:.0f} %)" for p in predictions)
    else:
        result = f"{lesion.volume_ml:.1f} ml, long axis {lesion.longest_axial_diameter_mm:.1f} mm"
    return f"{'[DEMO] ' if algorithm.is_demo else ''}{lesion.tracking_id}: {result}"[:1024]


def _outline_area_mm2(outline: np.ndarray, key_slice: Dataset, tracking_id: str) -> float:
    """Area (mm2) enclosed by a closed outline in (column, row) pixel coordinates of ``key_slice``."""
    spacing = key_slice.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise ValueError(f'Lesion "{tracking_id}": the key slice has no Pixel Spacing to measure the area.')
    row_spacing, column_spacing = (float(v) for v in spacing)
    x, y = outline[:, 0], outline[:, 1]
    pixels = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return pixels * row_spacing * column_spacing


PATIENT_LEVEL_RESULT = "Patient-level result"


def patient_level_container(
    predictions: Sequence[Prediction], algorithm: AlgorithmInfo, *, tracking_uid: str, rule: str = ""
) -> hd.sr.ContainerContentItem:
    """TID 1500 "Derived Imaging Measurements" holding the patient-level predictions as one TID 1501 group.

    Per label a coded ``<name> status (predicted)`` qualitative evaluation, its probability and its
    decision threshold (as in the lesions' records), and the aggregation rule as TEXT. Not under
    "Imaging Measurements": it has no image region, and viewers that load every group there as an
    annotation (OHIF 3) would fail on it.

    Raises
    ------
    ValueError
        No prediction, or an invalid one.
    """
    if not predictions:
        raise ValueError('Argument "predictions" must not be empty.')
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    for prediction in predictions:
        evaluations.append(PredictionEvaluation(prediction))
        measurements.extend(PredictionMeasurements(prediction, algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=PATIENT_LEVEL_RESULT),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    if rule:
        group[0].ContentSequence.append(_text(codes.private_concept("PATIENT-RULE", "Patient-level rule"), rule))
    container = hd.sr.ContainerContentItem(name=codes.DERIVED_IMAGING_MEASUREMENTS, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([*group])
    return container
