"""Result -> Secondary Capture images any viewer shows (highdicom ``SCImage``, RGB, 1024 x 1024).

Per study and result kind one SC series (Series Number and Description by method, e.g. 912 "AI KRAS M1 -
DEMO, not for clinical use": :mod:`dicom_sr.series`):

- instance 1: :func:`build_summary_capture`, one page listing every lesion and its result;
- instance 2 + i: :func:`build_lesion_capture` for lesion ``i`` of ``result.lesions``: the key
  slice windowed for the method, resampled to square pixels, the lesion contour, the Grad-CAM
  heat map with its colour bar, a scale bar and a text panel (method, result, probability,
  decision threshold, model name + version, date, DEMO banner).

Patient and study attributes are copied from a source CT instance (the SC joins the CT's study);
Burned In Annotation is YES. No patient name or ID is drawn into the pixels. Pixel Spacing is not
set: the page mixes image and text, so measurements on it would mislead; the burned-in scale bar
gives the size.

Determinism: Series and SOP Instance UIDs derive from (CT series, segmentation, lesion tracking
UID, method, algorithm name / version / weights checksum, result kind) via
:func:`dicom_sr.uids.result_uids`, so a re-run replaces the images already in the PACS. Content
Date / Time and the date on the page come from ``content_datetime``, so the pixels are
deterministic too. Not deterministic: Instance Creation Date / Time and Date / Time of Secondary
Capture, which highdicom takes from the clock.
"""

from __future__ import annotations

import datetime
import functools
import math
import warnings
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom._standard_utils import get_anatomic_region_map
from pydicom import Dataset

from dicom_sr.codes import split_feature_name
from dicom_sr.common import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION, require
from dicom_sr.sc.render import GREY, RESULT_YELLOW, TextLine, render_lesion_page, render_summary_page
from dicom_sr.series import series_description, series_number
from dicom_sr.source import cleaned_sources
from dicom_sr.sr.lesions import PERSON_NAME_WARNING
from dicom_sr.sr.templates import Prediction, check_prediction
from dicom_sr.uids import ResultUIDs, result_uids
from inference.results import DEMO_WARNING, LesionResult, StudyResult

__all__ = [
    "ABDOMEN_WINDOW",
    "build_lesion_capture",
    "build_summary_capture",
]

ABDOMEN_WINDOW = (40.0, 400.0)
"""(center, width) in HU of the soft-tissue abdomen window (METHODS.md, M3)."""
_PATIENT_STUDY_KEYWORDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime")
_KEY_FEATURES = (
    ("firstorder_Mean", "Mean {:.0f} HU"),
    ("shape_Sphericity", "Sphericity {:.2f}"),
    ("firstorder_Entropy", "Entropy {:.2f}"),
    ("glcm_Contrast", "GLCM contrast {:.2f}"),
)


def _series_number(given: int | None, result: StudyResult) -> int:
    return series_number(result.method, "SC") if given is None else given


def _kind(result_kind: str | None, labels: Sequence[str]) -> str:
    if result_kind is None:
        return "/".join(labels) if labels else "Radiomics"
    require(result_kind, str, "result_kind", "str")
    if not result_kind.strip():
        raise ValueError('Argument "result_kind" must not be empty.')
    return result_kind


def _uids(result: StudyResult, kind: str, instance_part: str) -> ResultUIDs:
    """Series UID from the study-level inputs; SOP Instance UID also from ``instance_part``."""
    algorithm = result.algorithm
    inputs = [result.ct_series_instance_uid]
    if result.segmentation is not None:
        inputs.append(result.segmentation.sop_instance_uid)
    common = {
        "method": result.method,
        "algorithm_version": f"{algorithm.name}/{algorithm.version}/{algorithm.weights_sha256 or '-'}",
        "kind": f"SC {kind}",
    }
    series = result_uids(inputs, **common).series_instance_uid
    instance = result_uids([*inputs, instance_part], **common).sop_instance_uid
    return ResultUIDs(series_instance_uid=series, sop_instance_uid=instance)


def _patient_orientation(ref: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of the rows and columns of ``ref``'s image plane."""
    if "ImageOrientationPatient" not in ref:
        raise ValueError("the reference CT instance has no Image Orientation (Patient).")
    cosines = np.asarray([float(v) for v in ref.ImageOrientationPatient], dtype=float).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    result = []
    for vector in cosines:
        order = np.argsort(-np.abs(vector))
        text = "".join(letters[i][0 if vector[i] > 0 else 1] for i in order if abs(vector[i]) > 0.25)
        result.append(text or "L")
    return result[0], result[1]


def _check_common(result: StudyResult, ref_dataset: Dataset, content_datetime: datetime.datetime) -> None:
    require(result, StudyResult, "result", "StudyResult")
    require(ref_dataset, Dataset, "ref_dataset", "pydicom.Dataset")
    require(content_datetime, datetime.datetime, "content_datetime", "datetime.datetime")
    missing = [k for k in _PATIENT_STUDY_KEYWORDS if k not in ref_dataset]
    if missing:
        raise ValueError(f"ref_dataset lacks {', '.join(missing)}: patient/study attributes come from it.")
    if str(ref_dataset.StudyInstanceUID) != result.study_instance_uid:
        raise ValueError("ref_dataset is not from the study of the result (Study Instance UID differs).")


def sc_image(
    pixels: np.ndarray,
    ref_dataset: Dataset,
    uids: ResultUIDs,
    *,
    series_number: int,
    instance_number: int,
    description: str,
    content_datetime: datetime.datetime,
    manufacturer: str,
    software_version: str,
    institution_name: str | None,
    body_part_examined: str | None,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture page of a result, joined to the study of ``ref_dataset``.

    Shared by the method captures and the response capture: the patient / study attributes and
    Patient Orientation come from a valid copy of ``ref_dataset``
    (:func:`dicom_sr.source.valid_source`, each fix logged as a warning without the value), the
    page carries burned-in text (``BurnedInAnnotation = YES``), and highdicom's Patient Name
    warning (it quotes the name) is silenced. For a paired body part (PS3.16 Annex L), Laterality
    is the source's (R or L) or empty when unknown (General Series, Type 2C).
    """
    require(series_number, int, "series_number", "int")
    require(manufacturer, str, "manufacturer", "str")
    require(software_version, str, "software_version", "str")
    if institution_name is not None:
        require(institution_name, str, "institution_name", "str")
    if body_part_examined is not None:
        require(body_part_examined, str, "body_part_examined", "str")
    ref_dataset = cleaned_sources([ref_dataset])[0]
    with warnings.catch_warnings():
        # highdicom warns about single-component Patient Names copied from the source; the
        # message quotes the name, which must never reach a log (PHI).
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref_dataset,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            patient_orientation=_patient_orientation(ref_dataset),
            transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
            series_description=description,
            manufacturer_model_name=MODEL_NAME,
            software_versions=software_version,
            institution_name=institution_name,
            content_date=content_datetime.date(),
            content_time=content_datetime.time(),
            specific_character_set="ISO_IR 192",
        )
    image.BurnedInAnnotation = "YES"  # Type 3 in General Image; the page carries burned-in text
    body_part = body_part_examined or ref_dataset.get("BodyPartExamined")
    if body_part:
        # General Series, Type 3. Without it dciodvfy cannot rule out a paired body part and
        # asks for Laterality (Type 2C).
        image.BodyPartExamined = str(body_part)
        if _is_paired(str(body_part)):  # e.g. EXTREMITY: Laterality is Type 2C, empty when unknown
            image.Laterality = str(ref_dataset.get("Laterality", "") or "")
    return image


@functools.cache
def _is_paired(body_part: str) -> bool:
    """Whether a Body Part Examined term names a paired structure (PS3.16 Annex L, via highdicom)."""
    region = get_anatomic_region_map().get(body_part)
    return bool(region and region[1])


def _model_lines(result: StudyResult, content_datetime: datetime.datetime, software_version: str) -> list[TextLine]:
    algorithm = result.algorithm
    lines = [TextLine(f"Model: {algorithm.name} {algorithm.version} ({algorithm.validation_status})", 24)]
    if algorithm.weights_sha256:
        lines.append(TextLine(f"Method: {result.method} | weights sha256 {algorithm.weights_sha256[:16]}...", 24, GREY))
    else:
        lines.append(TextLine(f"Method: {result.method}", 24, GREY))
    lines.append(TextLine(f"Date: {content_datetime:%Y-%m-%d %H:%M} | pacs-agent {software_version}", 24, GREY))
    return lines


def _feature_text(lesion: LesionResult) -> str:
    values: dict[str, float] = {}
    for feature in lesion.features:
        image_type, feature_class, name = split_feature_name(feature.name)
        if image_type == "original" and math.isfinite(feature.value):  # not filtered (LoG, wavelet) images
            values.setdefault(f"{feature_class}_{name}", feature.value)
    parts = [template.format(values[key]) for key, template in _KEY_FEATURES if key in values]
    return " | ".join(parts)


def _lesion_lines(
    result: StudyResult,
    lesion: LesionResult,
    predictions: Sequence[Prediction],
    content_datetime: datetime.datetime,
    software_version: str,
) -> list[TextLine]:
    """The text panel of a lesion page: predictions, size, key features, model, date.

    :func:`dicom_sr.sc.render.layout_text` sets each line smaller or wraps it when it is too
    long for the panel, so none is cut off.
    """
    lines: list[TextLine] = []
    size = 38 if len(predictions) <= 1 else 28
    for prediction in predictions:
        lines.append(TextLine(f"{prediction.display}: {prediction.status}", size, RESULT_YELLOW))
        lines.append(
            TextLine(
                f"probability {prediction.probability:.2f} (decision threshold {prediction.threshold:.2f})",
                26 if len(predictions) <= 1 else 24,
            )
        )
    size_text = f"volume {lesion.volume_ml:.1f} ml, longest axial diameter {lesion.longest_axial_diameter_mm:.1f} mm"
    if predictions:
        lines.append(TextLine(f"{lesion.tracking_id}: {size_text}", 24))
    else:
        lines.append(TextLine(f"{lesion.tracking_id}: {size_text}", 32, RESULT_YELLOW))
        features = _feature_text(lesion)
        if features:
            lines.append(TextLine(features, 26))
    lines.extend(_model_lines(result, content_datetime, software_version))
    return lines


def _check_predictions(predictions: Sequence[Prediction]) -> tuple[Prediction, ...]:
    if isinstance(predictions, (str, Prediction)) or not isinstance(predictions, Sequence):
        raise TypeError('Argument "predictions" must be a sequence of Prediction.')
    return tuple(check_prediction(p, "predictions[]") for p in predictions)


def build_lesion_capture(
    result: StudyResult,
    lesion: LesionResult,
    ct_slice_hu: np.ndarray,
    lesion_mask: np.ndarray,
    ref_dataset: Dataset,
    *,
    content_datetime: datetime.datetime,
    predictions: Sequence[Prediction] = (),
    heatmap: np.ndarray | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    pixel_spacing: tuple[float, float] | None = None,
    result_kind: str | None = None,
    fov_mm: float | None = None,
    series_number: int | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    body_part_examined: str | None = None,
) -> hd.sc.SCImage:
    """Secondary Capture of one lesion for one method: key slice, contour, heat map, result panel.

    Parameters
    ----------
    result: inference.results.StudyResult
        The method's result; ``lesion`` must be one of ``result.lesions``.
    lesion: inference.results.LesionResult
        The lesion shown.
    ct_slice_hu: numpy.ndarray
        The key slice (``CTVolume.array[lesion.key_slice_index]``) in HU, (rows, columns).
    lesion_mask: numpy.ndarray
        The lesion's mask on that slice (bool, same shape); must not be empty.
    ref_dataset: pydicom.Dataset
        A CT instance of the series (ideally the key slice; pixel data not needed): patient and
        study attributes, Pixel Spacing and Image Orientation (Patient) come from it.
    content_datetime: datetime.datetime
        Content Date / Time and the date printed on the page (pass the job's result time).
    predictions: Sequence[dicom_sr.sr.templates.Prediction], optional
        The model's predictions for this lesion (none for plain radiomics).
    heatmap: numpy.ndarray | None, optional
        Grad-CAM map on the slice grid, values in [0, 1]; drawn with a colour bar.
    window: tuple[float, float], optional
        (center, width) in HU of the method; default abdomen 40 / 400.
    pixel_spacing: tuple[float, float] | None, optional
        (row, column) spacing in mm; default ``ref_dataset.PixelSpacing``.
    result_kind: str | None, optional
        Names the series ("AI <kind> <method>", :func:`dicom_sr.series.series_description`);
        default the prediction labels joined by "/" or "Radiomics". Keep it stable per method.
    fov_mm: float | None, optional
        Field of view of the slice panel; default 2.5 x the lesion extent, at least 100 mm.
    series_number: int | None, optional
        Series Number of the SC series; default the method's (:mod:`dicom_sr.series`).
    manufacturer: str, optional
        Manufacturer (General Equipment).
    software_version: str, optional
        Software Versions.
    institution_name: str | None, optional
        Institution Name.
    body_part_examined: str | None, optional
        Body Part Examined (e.g. ``"ABDOMEN"``); default copied from ``ref_dataset``. Give
        it when the CT has none: dciodvfy then asks for Laterality.

    Returns
    -------
    highdicom.sc.SCImage
        1024 x 1024 RGB, 8 bits, Explicit VR Little Endian; instance number 2 + the lesion's
        index in ``result.lesions``.

    Raises
    ------
    TypeError
        When an argument has the wrong type (the message names it).
    ValueError
        The lesion is not in the result, ``ref_dataset`` belongs to another study or lacks
        patient / study / geometry attributes, shapes differ, the mask is empty, the heat map
        leaves [0, 1], a prediction is invalid.
    """
    _check_common(result, ref_dataset, content_datetime)
    require(lesion, LesionResult, "lesion", "LesionResult")
    if lesion not in result.lesions:
        raise ValueError(f'Lesion "{lesion.tracking_id}" is not one of the lesions of "result".')
    require(ct_slice_hu, np.ndarray, "ct_slice_hu", "numpy.ndarray")
    require(lesion_mask, np.ndarray, "lesion_mask", "numpy.ndarray")
    if heatmap is not None:
        require(heatmap, np.ndarray, "heatmap", "numpy.ndarray")
    predictions = _check_predictions(predictions)
    kind = _kind(result_kind, [p.label for p in predictions])
    if pixel_spacing is None:
        if "PixelSpacing" not in ref_dataset:
            raise ValueError('ref_dataset has no Pixel Spacing: pass "pixel_spacing".')
        pixel_spacing = (float(ref_dataset.PixelSpacing[0]), float(ref_dataset.PixelSpacing[1]))
    window = (float(window[0]), float(window[1]))

    algorithm = result.algorithm
    lines = _lesion_lines(result, lesion, predictions, content_datetime, software_version)

    side = [TextLine(f"Key slice: index {lesion.key_slice_index}", 24, GREY)]
    if str(ref_dataset.get("SOPInstanceUID", "")) == lesion.key_slice_sop_instance_uid and "InstanceNumber" in (
        ref_dataset
    ):
        side.append(TextLine(f"(instance {ref_dataset.InstanceNumber})", 24, GREY))
    pixels, _ = render_lesion_page(
        ct_slice_hu,
        lesion_mask,
        pixel_spacing,
        window=window,
        title=f"AI {kind}",
        lines=lines,
        side_lines=side,
        demo_warning=DEMO_WARNING if algorithm.is_demo else None,
        heatmap=heatmap,
        fov_mm=fov_mm,
    )
    index = result.lesions.index(lesion)
    return sc_image(
        pixels,
        ref_dataset,
        _uids(result, kind, lesion.tracking_uid),
        series_number=_series_number(series_number, result),
        instance_number=2 + index,
        description=series_description(result.method, kind, demo=algorithm.is_demo),
        content_datetime=content_datetime,
        manufacturer=manufacturer,
        software_version=software_version,
        institution_name=institution_name,
        body_part_examined=body_part_examined,
    )


def summary_table(
    result: StudyResult, predictions: Mapping[str, Sequence[Prediction]]
) -> tuple[list[tuple[str, int]], list[list[str]]]:
    """Columns (caption, x) and rows of the summary page's table.

    With predictions, one row per label of each lesion, the lesion's name and size on its first
    row, so that every label ("PIK3CA or BRAF wild type") and probability is shown in full; without,
    one row per lesion with its key features.
    """
    by_lesion = predictions
    labels = [p.label for values in by_lesion.values() for p in values]
    rows: list[list[str]] = []
    if labels:
        # one row per label of a lesion, so that every label and probability is shown in full
        columns = [("Lesion", 24), ("Volume ml", 300), ("Diam. mm", 430), ("Result", 560), ("Prob.", 900)]
        for lesion in result.lesions:
            values = by_lesion.get(lesion.tracking_uid, ())
            size = [lesion.tracking_id, f"{lesion.volume_ml:.1f}", f"{lesion.longest_axial_diameter_mm:.1f}"]
            if not values:
                rows.append([*size, "-", "-"])
            for index, p in enumerate(values):
                rows.append(
                    [*(size if index == 0 else ["", "", ""]), f"{p.display} {p.status}", f"{p.probability:.2f}"]
                )
    else:
        columns = [("Lesion", 24), ("Volume ml", 330), ("Diam. mm", 480), ("Key features", 650)]
        for lesion in result.lesions:
            rows.append(
                [
                    lesion.tracking_id,
                    f"{lesion.volume_ml:.1f}",
                    f"{lesion.longest_axial_diameter_mm:.1f}",
                    " | ".join(_feature_text(lesion).split(" | ")[:2]) or "-",
                ]
            )
    return columns, rows


def build_summary_capture(
    result: StudyResult,
    ref_dataset: Dataset,
    *,
    content_datetime: datetime.datetime,
    predictions: Mapping[str, Sequence[Prediction]] | None = None,
    result_kind: str | None = None,
    series_number: int | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    body_part_examined: str | None = None,
) -> hd.sc.SCImage:
    """Secondary Capture summarising one method's result for a study: one row per lesion.

    Parameters
    ----------
    result: inference.results.StudyResult
        The method's result.
    ref_dataset: pydicom.Dataset
        A CT instance of the study (patient / study attributes, orientation).
    content_datetime: datetime.datetime
        Content Date / Time and the date printed on the page.
    predictions: Mapping[str, Sequence[dicom_sr.sr.templates.Prediction]] | None, optional
        Predictions by lesion Tracking UID.
    result_kind: str | None, optional
        As for :func:`build_lesion_capture` (same series); default from the prediction labels.
    series_number: int | None, optional
        Series Number of the SC series; default the method's (:mod:`dicom_sr.series`).
    manufacturer: str, optional
        Manufacturer (General Equipment).
    software_version: str, optional
        Software Versions.
    institution_name: str | None, optional
        Institution Name.
    body_part_examined: str | None, optional
        Body Part Examined (e.g. ``"ABDOMEN"``); default copied from ``ref_dataset``. Give
        it when the CT has none: dciodvfy then asks for Laterality.

    Returns
    -------
    highdicom.sc.SCImage
        1024 x 1024 RGB page, instance number 1 of the SC series.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        ``ref_dataset`` belongs to another study or lacks attributes, invalid predictions or
        predictions for an unknown Tracking UID.
    """
    _check_common(result, ref_dataset, content_datetime)
    predictions = {} if predictions is None else predictions
    require(predictions, Mapping, "predictions", "Mapping[str, Sequence[Prediction]]")
    by_lesion = {uid: _check_predictions(values) for uid, values in predictions.items()}
    unknown = set(by_lesion) - {lesion.tracking_uid for lesion in result.lesions}
    if unknown:
        raise ValueError(f"predictions for unknown Tracking UID(s): {', '.join(sorted(map(str, unknown)))}.")
    labels: list[str] = []
    for values in by_lesion.values():
        labels.extend(p.label for p in values if p.label not in labels)
    kind = _kind(result_kind, labels)
    algorithm = result.algorithm

    columns, rows = summary_table(result, by_lesion)
    thresholds = sorted({f"{p.display} {p.threshold:.2f}" for values in by_lesion.values() for p in values})
    footer = _model_lines(result, content_datetime, software_version)
    if thresholds:
        footer.insert(0, TextLine(f"Decision thresholds: {', '.join(thresholds)}", 24))
    for p in reversed(result.patient_predictions):
        footer.insert(
            0,
            TextLine(
                f"Patient: {p.display} {p.status} (probability {p.probability:.2f}, volume-weighted over the lesions)",
                28,
                RESULT_YELLOW,
            ),
        )
    count = len(result.lesions)
    pixels = render_summary_page(
        title=f"AI {kind} - study summary",
        heading=f"AI {kind}: {count} lesion{'s' if count != 1 else ''}",
        columns=columns,
        rows=rows,
        footer=footer,
        demo_warning=DEMO_WARNING if algorithm.is_demo else None,
    )
    return sc_image(
        pixels,
        ref_dataset,
        _uids(result, kind, "summary"),
        series_number=_series_number(series_number, result),
        instance_number=1,
        description=series_description(result.method, kind, demo=algorithm.is_demo),
        content_datetime=content_datetime,
        manufacturer=manufacturer,
        software_version=software_version,
        institution_name=institution_name,
        body_part_examined=body_part_examined,
    )
