"""Result -> DICOM Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom only).

Content tree written by :func:`build_measurement_report`::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      Language, Observation Context: device observer = pacs-agent    TID 1204, 1001, 1002, 1004
      Procedure reported (default: CT of abdomen)
      CONTAINER Imaging Measurements
        per lesion with a key-slice outline, first:
        CONTAINER Measurement Group, viewer copy of the lesion         TID 1410
          Tracking Identifier + Tracking Unique Identifier (the lesion's)  TID 4108
          Finding = Neoplasm, Finding Site (optional)
          Image Region: SCOORD POLYLINE (closed) on the key slice, SELECTED FROM it
          NUM Volume [ml], Long Axis [mm] with Algorithm Identification  TID 300, 4019
        then, per lesion:
        CONTAINER Measurement Group, the lesion's record              TID 1411 (TID 1410)
          Tracking Identifier + Tracking Unique Identifier           TID 4108
          Finding = Neoplasm, Finding Site (optional)
          Referenced Segment (SEG lesion) | Volume Surface (RTSTRUCT lesion, >= 2 polygons)
            | Image Region SCOORD3D (RTSTRUCT lesion with one polygon -> planar group, TID 1410)
          NUM Volume [ml], Long Axis [mm], one NUM per radiomic feature  TID 300
            each with Algorithm Identification (name, version, parameters)  TID 4019
          per prediction: CODE "<LABEL> status (predicted)" = Mutant | Wild type | ...
            NUM "<LABEL> probability" [1], NUM "<LABEL> decision threshold" [1]
          TEXT segmentation source UID / number / label, centroid, key slice (for the reader)
      CONTAINER Qualitative Evaluations                               TID 1500 rows 12-14
        TEXT Usage warning (DEMO), Validation status, Intended use, weights SHA-256,
             provenance, Analysis method, Frame of Reference UID

The viewer copy comes first because OHIF (3.13) merges the groups that share a tracking UID and
draws the first SCOORD / SCOORD3D of the merged content: the key-slice POLYLINE then wins over an
RTSTRUCT lesion's SCOORD3D POLYGON volume surface, which OHIF cannot draw.

The content items come from the template classes of :mod:`dicom_sr.sr.templates` (codes documented
there); :func:`dicom_sr.sr.reader.read_measurement_report` parses the SR back.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_sr import codes
from dicom_sr.common import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION, device_observer_context, require
from dicom_sr.series import DEMO_SUFFIX
from dicom_sr.series import series_description as method_series_description
from dicom_sr.series import series_number as method_series_number
from dicom_sr.source import cleaned_sources
from dicom_sr.sr.templates import (
    KeySliceOutlineGroup,
    LesionMeasurementGroup,
    Prediction,
    ReportEvaluations,
    patient_level_container,
    viewer_label,
)
from dicom_sr.uids import ResultUIDs, derive_uid, result_uids
from inference.results import LesionResult, StudyResult

__all__ = [
    "PERSON_NAME_WARNING",
    "SOFTWARE_VERSION",
    "build_measurement_report",
    "comprehensive_3d_sr",
    "separate_items",
    "write_dataset",
]

logger = logging.getLogger(__name__)

PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
"""highdicom's warning about a Patient Name; it quotes the name, so it is always silenced."""
_PATIENT_STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
"""What highdicom copies from ``evidence[0]`` (Patient and General Study modules, Type 2)."""


def _unique_evidence(evidence: Sequence[Dataset], segmentation_dataset: Dataset | None) -> list[Dataset]:
    unique: dict[str, Dataset] = {}
    for ds in [*evidence, *([segmentation_dataset] if segmentation_dataset is not None else [])]:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if keyword not in ds:
                raise ValueError(f'An evidence dataset has no "{keyword}".')
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    return list(unique.values())


def build_measurement_report(
    result: StudyResult,
    evidence: Sequence[Dataset],
    *,
    segmentation_dataset: Dataset | None = None,
    series_number: int | None = None,
    institution_name: str | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    procedure_reported: Code | CodedConcept = codes.CT_OF_ABDOMEN,
    finding_site: Code | CodedConcept | None = None,
    series_description: str | None = None,
    result_kind: str = "Radiomics",
    device_uid: str | None = None,
    predictions: Mapping[str, Sequence[Prediction]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a Comprehensive 3D SR holding a TID 1500 Measurement Report for ``result``.

    One TID 1411 Volumetric ROI measurement group per lesion (TID 1410 Planar ROI for an
    RTSTRUCT lesion outlined by a single polygon) with TID 4108 tracking identifier and UID,
    finding "Neoplasm" (SCT 108369006), the referenced SEG segment or the lesion outline as
    SCOORD3D polygons, and TID 300 measurements (volume, longest axial diameter, radiomic
    features coded per :mod:`dicom_sr.codes`) each carrying TID 4019 algorithm identification.
    A lesion with a ``key_outline_px`` gets, just before it, a TID 1410 Planar ROI group with
    the same tracking identifier and UID: its outline on the key slice as a closed SCOORD
    POLYLINE plus its volume and long axis (:class:`dicom_sr.sr.templates.KeySliceOutlineGroup`),
    the copy of the lesion that viewers such as OHIF draw.
    DEMO algorithms get "DEMO MODEL - NOT FOR CLINICAL USE" in a TEXT item and in the
    Series Description. Series and SOP Instance UIDs derive from the inputs (:mod:`dicom_sr.uids`).

    Parameters
    ----------
    result: inference.results.StudyResult
        What the pipeline computed; must contain at least one lesion.
    evidence: Sequence[pydicom.Dataset]
        Source instances (CT slices, may be read without pixels; the segmentation object).
        Patient and study attributes are copied from ``evidence[0]``; the SR joins its study.
    segmentation_dataset: pydicom.Dataset | None, optional
        The SEG or RTSTRUCT instance; added to the evidence when not already there. A SEG
        referenced by a lesion must be in the evidence.
    series_number: int | None, optional
        Series Number of the SR series; default the method's (:mod:`dicom_sr.series`).
    institution_name: str | None, optional
        Institution Name of the SR.
    manufacturer: str, optional
        Manufacturer (General Equipment) and device observer manufacturer.
    software_version: str, optional
        Software Versions of the SR and version in the observer's model name.
    procedure_reported: pydicom.sr.coding.Code | highdicom.sr.CodedConcept, optional
        TID 1500 "Procedure reported" (CID 100); default SCT 169070004 "CT of abdomen".
    finding_site: pydicom.sr.coding.Code | highdicom.sr.CodedConcept | None, optional
        Anatomic site of all lesions (e.g. ``codes.SCT.Liver``), when known.
    series_description: str | None, optional
        Series Description; default "AI <result_kind> <method>"
        (:func:`dicom_sr.series.series_description`). DEMO algorithms always get the DEMO notice.
    result_kind: str, optional
        What the result is about, for the default Series Description (e.g. the package's label).
    device_uid: str | None, optional
        Device Observer UID (TID 1004); default derived from manufacturer and institution.
    predictions: Mapping[str, Sequence[dicom_sr.sr.templates.Prediction]] | None, optional
        Model predictions by lesion Tracking UID (at most one per label and lesion); each
        becomes a coded qualitative evaluation plus probability and threshold NUM items in the
        lesion's measurement group.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR instance, ready to write with :func:`write_dataset`.

    Raises
    ------
    TypeError
        When an argument has the wrong type (the message names the argument).
    ValueError
        When the result has no lesions, a feature has no code, an RTSTRUCT lesion has no
        outline, a key-slice outline is invalid or its key slice is not part of the evidence,
        a referenced SEG instance is not part of the evidence, ``evidence[0]``
        lacks patient / study attributes or belongs to another study, or a prediction is
        invalid or keyed by an unknown Tracking UID.
    """
    require(result, StudyResult, "result", "StudyResult")
    if isinstance(evidence, (str, bytes, Dataset)) or not isinstance(evidence, Sequence):
        raise TypeError('Argument "evidence" must be a sequence of pydicom.Dataset.')
    if not evidence or any(not isinstance(ds, Dataset) for ds in evidence):
        raise TypeError('Argument "evidence" must be a non-empty sequence of pydicom.Dataset.')
    if segmentation_dataset is not None:
        require(segmentation_dataset, Dataset, "segmentation_dataset", "pydicom.Dataset")
    if series_number is None:
        series_number = method_series_number(result.method, "SR")
    require(series_number, int, "series_number", "int")
    if institution_name is not None:
        require(institution_name, str, "institution_name", "str")
    for name, value in (
        ("manufacturer", manufacturer),
        ("software_version", software_version),
        ("result_kind", result_kind),
    ):
        require(value, str, name, "str")
    require(procedure_reported, (Code, CodedConcept), "procedure_reported", "Code or CodedConcept")
    if finding_site is not None:
        require(finding_site, (Code, CodedConcept), "finding_site", "Code or CodedConcept")
    if device_uid is not None:
        require(device_uid, str, "device_uid", "str")
    predictions = {} if predictions is None else predictions
    require(predictions, Mapping, "predictions", "Mapping[str, Sequence[Prediction]]")
    if any(isinstance(v, (str, Prediction)) or not isinstance(v, Sequence) for v in predictions.values()):
        raise TypeError('Argument "predictions" must map Tracking UIDs to sequences of Prediction.')
    if not result.lesions:
        raise ValueError('Argument "result" must contain at least one lesion.')
    if any(not isinstance(lesion, LesionResult) for lesion in result.lesions):
        raise TypeError('Items of "result.lesions" must have type LesionResult.')
    missing = [k for k in _PATIENT_STUDY_KEYWORDS if k not in evidence[0]]
    if missing:
        raise ValueError(f"evidence[0] lacks {', '.join(missing)}: patient/study attributes come from it.")
    if evidence[0].StudyInstanceUID != result.study_instance_uid:
        raise ValueError("evidence[0] is not from the study of the result (Study Instance UID differs).")

    all_evidence = _unique_evidence(evidence, segmentation_dataset)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in all_evidence}
    for lesion in result.lesions:
        if lesion.source.kind == "seg" and lesion.source.sop_instance_uid not in by_uid:
            raise ValueError(
                f'Lesion "{lesion.tracking_id}" references SEG {lesion.source.sop_instance_uid}, '
                'which is not in the evidence: pass it as "segmentation_dataset".'
            )
        if lesion.key_outline_px and lesion.key_slice_sop_instance_uid not in by_uid:
            raise ValueError(
                f'Lesion "{lesion.tracking_id}" has a key-slice outline, but its key slice '
                f"{lesion.key_slice_sop_instance_uid} is not in the evidence."
            )
    unknown = set(predictions) - {lesion.tracking_uid for lesion in result.lesions}
    if unknown:
        raise ValueError(f"predictions for unknown Tracking UID(s): {', '.join(sorted(map(str, unknown)))}.")

    context = device_observer_context(manufacturer, institution_name, software_version, device_uid)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    for lesion in result.lesions:
        if lesion.key_outline_px:  # the viewer copy first, see the module docstring
            groups.append(
                KeySliceOutlineGroup(
                    lesion,
                    algorithm=result.algorithm,
                    key_slice=by_uid[lesion.key_slice_sop_instance_uid],
                    finding_site=finding_site,
                    predictions=tuple(predictions.get(lesion.tracking_uid, ())),
                    comment=viewer_label(lesion, tuple(predictions.get(lesion.tracking_uid, ())), result.algorithm),
                )
            )
        groups.append(
            LesionMeasurementGroup(
                lesion,
                algorithm=result.algorithm,
                ct_series_instance_uid=result.ct_series_instance_uid,
                frame_of_reference_uid=result.frame_of_reference_uid,
                predictions=tuple(predictions.get(lesion.tracking_uid, ())),
                finding_site=finding_site,
                source_images=by_uid,
            ).group
        )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=procedure_reported,
        imaging_measurements=groups,
    )
    if result.patient_predictions:
        report[0].ContentSequence.append(
            patient_level_container(
                result.patient_predictions,
                result.algorithm,
                tracking_uid=str(derive_uid("patient-level", result.study_instance_uid, result.method)),
                rule=result.provenance.get("patient_level_rule", ""),
            )
        )
    report[0].ContentSequence.append(
        ReportEvaluations(
            result.algorithm,
            result.provenance,
            method=result.method,
            frame_of_reference_uid=result.frame_of_reference_uid,
            segmentation=result.segmentation,
        )
    )

    algorithm = result.algorithm
    input_uids = [result.ct_series_instance_uid, *by_uid]
    if result.segmentation is not None:
        input_uids.append(result.segmentation.sop_instance_uid)
    uids = result_uids(
        input_uids,
        method=result.method,
        algorithm_version=f"{algorithm.name}/{algorithm.version}/{algorithm.weights_sha256 or '-'}",
        kind="SR",
    )
    if series_description is None:
        description = method_series_description(result.method, result_kind, demo=algorithm.is_demo)
    else:
        require(series_description, str, "series_description", "str")
        description = series_description
        if algorithm.is_demo and "DEMO" not in description.upper():
            description = description[: 64 - len(DEMO_SUFFIX)] + DEMO_SUFFIX
    return comprehensive_3d_sr(
        evidence=all_evidence,
        content=report,
        uids=uids,
        series_number=series_number,
        series_description=description[:64],
        manufacturer=manufacturer,
        software_version=software_version,
        institution_name=institution_name,
    )


def comprehensive_3d_sr(
    *,
    evidence: Sequence[Dataset],
    content: hd.sr.MeasurementReport,
    uids: ResultUIDs,
    series_number: int,
    series_description: str,
    manufacturer: str,
    software_version: str,
    institution_name: str | None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR object of every pacs-agent report (method results and response results).

    UTF-8, complete, instance 1 of its series, the private coding scheme declared; highdicom's
    warning about single-component Patient Names is silenced because it quotes the name (PHI must
    never reach a log). highdicom gets valid copies of the evidence
    (:func:`dicom_sr.source.valid_source`): it copies the patient, study and equipment attributes
    of ``evidence[0]`` and the UIDs of all, so no invalid source value reaches the SR; each fix is
    logged as a warning, without the value. Every CONTAINER is ContinuityOfContent SEPARATE
    (:func:`separate_items`), so document-style renderers name each item.
    """
    evidence = cleaned_sources(evidence)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=1,
            manufacturer=manufacturer,
            is_complete=True,
            institution_name=institution_name,
            series_description=series_description,
            manufacturer_model_name=MODEL_NAME,
            software_versions=software_version,
            # UTF-8 holds whatever character set the evidence used (PS3.3 C.12.1.1.2).
            specific_character_set="ISO_IR 192",
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=codes.PRIVATE_SCHEME_DESIGNATOR,
                    name=codes.PRIVATE_SCHEME_NAME,
                    responsible_organization="pacs-agent developers",
                )
            ],
        )
    separate_items(sr)
    return sr


def separate_items(ds: Dataset) -> None:
    """Make every CONTAINER of an SR content tree ContinuityOfContent SEPARATE (in place).

    highdicom writes CONTINUOUS, which tells a document renderer that the items form one running
    text: DCMTK ``dsr2html`` then prints "Neoplasm 12.89 ml 30.78 mm" without the concept names.
    The items of a measurement report are separate statements (PS3.3 C.17.3.2.1), so each gets its
    name. The tree is walked iteratively (a deep tree cannot exhaust the stack).
    """
    pending = [ds]
    while pending:
        item = pending.pop()
        if item.get("ValueType", "CONTAINER") == "CONTAINER" and "ContinuityOfContent" in item:
            item.ContinuityOfContent = "SEPARATE"
        pending.extend(item.get("ContentSequence", []))


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM Part 10 file atomically (temp file, fsync, rename, fsync dir).

    Parameters
    ----------
    ds: pydicom.Dataset
        Dataset with file meta information (highdicom objects have it).
    path: str | os.PathLike
        Target file; parent directories are created. An existing file is replaced.

    Returns
    -------
    pathlib.Path
        The written path. A reader never sees a partly written file at ``path``.
    """
    require(ds, Dataset, "ds", "pydicom.Dataset")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target
