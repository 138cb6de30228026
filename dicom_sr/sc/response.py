"""Response result (M5) -> one Secondary Capture page: baseline and follow-up side by side, score panel.

The page (1024 x 1024 RGB, highdicom ``SCImage``, stored into the follow-up study)::

    +--------------------------------------------------------------+  y = 0
    | header: red DEMO banner, or the title on dark grey            |
    +------------------------------+-------------------------------+  y = 64
    | BASELINE <date>              | FOLLOW-UP <date> (+n weeks)   |
    | key slice of the lesion,     | key slice of the same lesion, |
    | contour in green, scale bar  | same mm per pixel             |
    | lesion id: diameter, volume  | lesion id: diameter, volume   |
    +------------------------------+-------------------------------+  y = 664
    | score: risk group, probability, threshold (or why there is    |
    | none); RECIST 1.1-like category and % change; volumetric      |
    | change; lesion counts; feature deltas; model, version, date   |
    +--------------------------------------------------------------+  y = 1024

The lesion shown is chosen by :func:`key_lesions`: the matched lesion with the largest baseline
volume; without a matched lesion, the largest disappeared lesion (baseline panel only) or new lesion
(follow-up panel only) - the empty panel says why. Both panels use the same scale (mm per pixel),
so shrinkage is seen as it is; each is centred on its lesion.

Series Description "AI Response 8w M5" (with the DEMO notice for a DEMO model), Series Number
917 (:mod:`dicom_sr.series`), instance 1. Burned In Annotation YES; no patient name or ID is
drawn. Series and SOP Instance UIDs derive from both studies' input UIDs, the method and the model identity
(:func:`dicom_sr.sr.response.response_uids`); Content Date / Time and the date on the page come
from ``content_datetime``, so the pixels are deterministic.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset

from dicom_sr.common import MANUFACTURER, SOFTWARE_VERSION, require
from dicom_sr.sc.lesions import ABDOMEN_WINDOW, sc_image
from dicom_sr.sc.render import (
    BACKGROUND,
    CANVAS,
    CONTOUR,
    GREY,
    HEADER_GREY,
    HEADER_HEIGHT,
    RESULT_YELLOW,
    WHITE,
    Placement,
    TextLine,
    _fit,
    _font,
    _header,
    _lines,
    _sample,
    _scale_bar,
    mask_outline,
    window_to_uint8,
)
from dicom_sr.series import series_number as _series_number
from dicom_sr.sr.response import NO_MODEL_NOTE, RESULT_KIND, response_series_description, response_uids
from inference.response import LesionMeasurement, ResponseResult
from inference.response.results import FEATURE_NAMES
from inference.results import DEMO_WARNING, KeyImage

__all__ = ["PANEL_SIZE", "build_response_capture", "key_lesions"]

PANEL_SIZE = 480
"""Width and height of each key-slice panel (pixels)."""
PANEL_TOP = HEADER_HEIGHT + 44
PANEL_LEFT = (8, CANVAS - 8 - PANEL_SIZE)
TEXT_TOP = 664
MIN_FOV_MM = 80.0
_PATIENT_STUDY_KEYWORDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime")
_FEATURE_LABELS = {
    "si4": "SI4",
    "log_z_entropy": "LoG-z entropy",
    "log_x_entropy": "LoG-x entropy",
    "ngtdm_contrast": "NGTDM contrast",
}


def key_lesions(result: ResponseResult) -> tuple[LesionMeasurement | None, LesionMeasurement | None]:
    """The lesion the page shows, as (baseline measurement, follow-up measurement).

    Parameters
    ----------
    result: inference.response.ResponseResult
        The pair's result.

    Returns
    -------
    tuple
        The matched pair with the largest baseline volume (ties: tracking id); else
        ``(largest disappeared lesion, None)``; else ``(None, largest new lesion)``; else
        ``(None, None)``.
    """
    require(result, ResponseResult, "result", "ResponseResult")
    if result.pairs:
        pair = max(result.pairs, key=lambda p: (p.baseline.volume_ml, p.baseline.tracking_id))
        return pair.baseline, pair.follow_up
    if result.disappeared_lesions:
        return max(result.disappeared_lesions, key=lambda m: (m.volume_ml, m.tracking_id)), None
    if result.new_lesions:
        return None, max(result.new_lesions, key=lambda m: (m.volume_ml, m.tracking_id))
    return None, None


def _check_image(image: KeyImage | None, name: str) -> KeyImage | None:
    if image is None:
        return None
    require(image, KeyImage, name, "KeyImage")
    hu, mask = np.asarray(image.hu), np.asarray(image.mask, dtype=bool)
    if hu.ndim != 2 or mask.shape != hu.shape:
        raise ValueError(
            f'"{name}": the slice must be 2D and its mask of the same shape, not {hu.shape} / {mask.shape}.'
        )
    if not mask.any():
        raise ValueError(f'"{name}": the lesion mask is empty on the key slice.')
    if len(image.pixel_spacing_mm) != 2 or not all(math.isfinite(s) and s > 0 for s in image.pixel_spacing_mm):
        raise ValueError(f'"{name}": pixel spacing must be two positive numbers, not {image.pixel_spacing_mm}.')
    return image


def _extent_mm(image: KeyImage) -> float:
    rows, cols = np.nonzero(np.asarray(image.mask, dtype=bool))
    dr, dc = image.pixel_spacing_mm
    return float(max((rows.max() - rows.min() + 1) * dr, (cols.max() - cols.min() + 1) * dc))


def _full_fov_mm(image: KeyImage) -> float:
    rows, cols = np.asarray(image.hu).shape
    return float(max(rows * image.pixel_spacing_mm[0], cols * image.pixel_spacing_mm[1]))


def _fov_mm(images: Sequence[KeyImage]) -> float:
    """One field of view for both panels: 2.5 x the larger lesion, at least 80 mm, at most the CT."""
    wanted = max(MIN_FOV_MM, 2.5 * max(_extent_mm(i) for i in images))
    return min(wanted, max(_full_fov_mm(i) for i in images))


def _placement(image: KeyImage, mm_per_pixel: float, left: int) -> Placement:
    rows, cols = np.nonzero(np.asarray(image.mask, dtype=bool))
    dr, dc = image.pixel_spacing_mm
    step_r, step_c = mm_per_pixel / dr, mm_per_pixel / dc
    centre_r = (rows.min() + rows.max() + 1) / 2.0
    centre_c = (cols.min() + cols.max() + 1) / 2.0
    return Placement(
        row0=centre_r - PANEL_SIZE * step_r / 2.0,
        col0=centre_c - PANEL_SIZE * step_c / 2.0,
        step_r=step_r,
        step_c=step_c,
        top=PANEL_TOP,
        left=left,
        size=PANEL_SIZE,
        mm_per_pixel=mm_per_pixel,
    )


def _panel_pixels(image: KeyImage, placement: Placement, window: tuple[float, float]) -> np.ndarray:
    """The windowed key slice with the lesion contour, PANEL_SIZE x PANEL_SIZE x 3 uint8."""
    index = np.arange(PANEL_SIZE, dtype=float)
    rows, cols = placement.to_source(index + placement.top, index + placement.left)
    grey = window_to_uint8(_sample(np.asarray(image.hu), rows, cols, linear=True, fill=-1024.0), *window)
    out = np.repeat(grey[..., None], 3, axis=-1)
    mask = np.asarray(image.mask, dtype=np.float64)
    display = _sample(mask, rows, cols, linear=False, fill=0.0) > 0.5
    out[mask_outline(display, thickness=3)] = CONTOUR
    return out


def _date_text(value: datetime.date | None) -> str:
    return value.isoformat() if value is not None else "date unknown"


def _study_date(ds: Dataset) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(ds.get("StudyDate", "") or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _lesion_caption(lesion: LesionMeasurement | None) -> str:
    if lesion is None:
        return ""
    return f"{lesion.tracking_id}: {lesion.longest_axial_diameter_mm:.1f} mm, {lesion.volume_ml:.2f} ml"


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.1f} %"


def _score_lines(result: ResponseResult) -> list[TextLine]:
    score = result.score
    if score is not None:
        group = "HIGH RISK" if score.high_risk else "LOW RISK"
        return [
            TextLine(f"Treatment insensitivity: {group}", 34, RESULT_YELLOW),
            TextLine(f"probability {score.probability:.2f} (decision threshold {score.threshold:.2f})", 26),
            *([TextLine(_tier_line(score.tier, score.tier_reason), 22)] if score.tier is not None else []),
        ]
    if result.algorithm.weights_sha256 is None:
        reason = NO_MODEL_NOTE
    else:
        reason = next((p for p in result.problems if "score" in p), "score not computed")
    return [TextLine(f"No score: {reason}", 28, RESULT_YELLOW)]


def _tier_line(tier: str, reason: str) -> str:
    """The SC line naming the quality tier whose calibration the probability used."""
    return f"Calibration: {tier} quality tier ({reason})"


def _delta_text(result: ResponseResult) -> str:
    if result.deltas is None:
        return "Feature change: not available (no lesion with features at both time points)"
    parts = []
    for name in FEATURE_NAMES:
        delta = result.deltas[name]
        value = f"{100 * delta.value:+.0f} %" if delta.is_relative else f"{delta.value:+.2f}"
        parts.append(f"{_FEATURE_LABELS[name]} {value}")
    return "Feature change: " + ", ".join(parts)


def _result_lines(result: ResponseResult, content_datetime: datetime.datetime, software_version: str) -> list[TextLine]:
    recist = result.recist
    lines = _score_lines(result)
    lines.append(
        TextLine(
            f"RECIST 1.1-like: {recist.category} ({recist.category_name}), sum of diameters "
            f"{recist.baseline_sum_mm:.1f} -> {recist.follow_up_sum_mm:.1f} mm ({_percent(recist.percent_change)})",
            26,
        )
    )
    lines.append(
        TextLine(
            f"Volumetric change: {_percent(recist.volumetric_change_percent)} (total lesion volume "
            f"{recist.baseline_volume_ml:.2f} -> {recist.follow_up_volume_ml:.2f} ml)",
            26,
        )
    )
    lines.append(
        TextLine(
            f"Lesions: {len(result.pairs)} matched, {len(result.new_lesions)} new, "
            f"{len(result.disappeared_lesions)} disappeared",
            26,
        )
    )
    lines.append(TextLine(_delta_text(result), 22, GREY))
    algorithm = result.algorithm
    lines.append(TextLine(f"Model: {algorithm.name} {algorithm.version} ({algorithm.validation_status})", 24))
    details = f"Method: {result.method}"
    if algorithm.weights_sha256:
        details += f" | weights sha256 {algorithm.weights_sha256[:16]}..."
    lines.append(TextLine(details, 22, GREY))
    lines.append(TextLine(f"Date: {content_datetime:%Y-%m-%d %H:%M} | pacs-agent {software_version}", 22, GREY))
    return lines


def _render(
    result: ResponseResult,
    images: tuple[KeyImage | None, KeyImage | None],
    lesions: tuple[LesionMeasurement | None, LesionMeasurement | None],
    dates: tuple[datetime.date | None, datetime.date | None],
    window: tuple[float, float],
    lines: Sequence[TextLine],
) -> np.ndarray:
    page = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    page[...] = BACKGROUND
    present = [i for i in images if i is not None]
    mm_per_pixel = _fov_mm(present) / PANEL_SIZE if present else 1.0
    placements: list[Placement | None] = []
    for image, left in zip(images, PANEL_LEFT, strict=True):
        if image is None:
            placements.append(None)
            continue
        placement = _placement(image, mm_per_pixel, left)
        page[PANEL_TOP : PANEL_TOP + PANEL_SIZE, left : left + PANEL_SIZE] = _panel_pixels(image, placement, window)
        placements.append(placement)
    canvas = Image.fromarray(page)
    draw = ImageDraw.Draw(canvas)
    _header(draw, f"AI {RESULT_KIND} - baseline vs follow-up", DEMO_WARNING if result.algorithm.is_demo else None)
    base_date, follow_date = dates
    weeks = f" (+{(follow_date - base_date).days / 7:.1f} weeks)" if base_date and follow_date else ""
    captions = (f"BASELINE {_date_text(base_date)}", f"FOLLOW-UP {_date_text(follow_date)}{weeks}")
    empty = (
        ("no lesion at baseline", "(new lesion)" if lesions[1] is not None else ""),
        ("no lesion at follow-up", "(disappeared)" if lesions[0] is not None else ""),
    )
    for index, left in enumerate(PANEL_LEFT):
        font = _font(26)
        draw.text((left, HEADER_HEIGHT + 12), _fit(captions[index], font, PANEL_SIZE), font=font, fill=WHITE)
        shown = placements[index]
        if shown is None:
            draw.rectangle((left, PANEL_TOP, left + PANEL_SIZE - 1, PANEL_TOP + PANEL_SIZE - 1), fill=HEADER_GREY)
            centre = (left + PANEL_SIZE / 2, PANEL_TOP + PANEL_SIZE / 2)
            why = empty[index] if lesions[index] is None else ("key slice not available", "")
            draw.text((centre[0], centre[1] - 20), why[0], font=font, fill=GREY, anchor="mm")
            draw.text((centre[0], centre[1] + 20), why[1], font=font, fill=GREY, anchor="mm")
        else:
            _scale_bar(draw, shown)
        caption_font = _font(22)
        caption = _fit(_lesion_caption(lesions[index]), caption_font, PANEL_SIZE)
        draw.text((left, PANEL_TOP + PANEL_SIZE + 10), caption, font=caption_font, fill=WHITE)
    legend_y = PANEL_TOP + PANEL_SIZE + 38
    draw.line((PANEL_LEFT[0], legend_y + 10, PANEL_LEFT[0] + 40, legend_y + 10), fill=CONTOUR, width=4)
    draw.text(
        (PANEL_LEFT[0] + 52, legend_y + 10),
        f"lesion contour | window C {window[0]:g} / W {window[1]:g} | same scale in both panels",
        font=_font(20),
        fill=GREY,
        anchor="lm",
    )
    draw.line((0, TEXT_TOP, CANVAS, TEXT_TOP), fill=HEADER_GREY, width=2)
    _lines(draw, lines, 24, TEXT_TOP + 12, CANVAS - 48, CANVAS - 4)
    return np.asarray(canvas.convert("RGB")).copy()


def build_response_capture(
    result: ResponseResult,
    ref_dataset: Dataset,
    *,
    content_datetime: datetime.datetime,
    baseline_image: KeyImage | None = None,
    follow_up_image: KeyImage | None = None,
    baseline_date: datetime.date | None = None,
    follow_up_date: datetime.date | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    series_number: int | None = None,
    manufacturer: str = MANUFACTURER,
    software_version: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    body_part_examined: str | None = None,
) -> hd.sc.SCImage:
    """Secondary Capture of a response result: both key slices side by side and the score panel.

    Parameters
    ----------
    result: inference.response.ResponseResult
        The pair's result.
    ref_dataset: pydicom.Dataset
        A follow-up CT instance (pixel data not needed): patient and study attributes and the
        Patient Orientation come from it; the SC joins the follow-up study.
    content_datetime: datetime.datetime
        Content Date / Time and the date printed on the page (pass the job's result time).
    baseline_image, follow_up_image: inference.results.KeyImage | None, optional
        The key slice (HU), the lesion's mask on it and the pixel spacing of the lesion
        :func:`key_lesions` names at each time point; None draws an empty panel saying why.
    baseline_date, follow_up_date: datetime.date | None, optional
        Study dates printed above the panels; the follow-up date defaults to
        ``ref_dataset.StudyDate``.
    window: tuple[float, float], optional
        (center, width) in HU; default abdomen 40 / 400.
    series_number: int | None, optional
        Series Number of the SC series; default the response method's (:mod:`dicom_sr.series`).
    manufacturer: str, optional
        Manufacturer (General Equipment).
    software_version: str, optional
        Software Versions.
    institution_name: str | None, optional
        Institution Name.
    body_part_examined: str | None, optional
        Body Part Examined; default copied from ``ref_dataset`` (dciodvfy asks for Laterality
        without it).

    Returns
    -------
    highdicom.sc.SCImage
        1024 x 1024 RGB, 8 bits, Explicit VR Little Endian, instance number 1.

    Raises
    ------
    TypeError
        An argument has the wrong type (the message names it).
    ValueError
        ``ref_dataset`` is not from the follow-up study or lacks patient / study attributes, a
        key image is malformed (shape, empty mask, spacing), or the window width is not positive.
    """
    require(result, ResponseResult, "result", "ResponseResult")
    require(ref_dataset, Dataset, "ref_dataset", "pydicom.Dataset")
    require(content_datetime, datetime.datetime, "content_datetime", "datetime.datetime")
    for name, value in (("baseline_date", baseline_date), ("follow_up_date", follow_up_date)):
        if value is not None:
            require(value, datetime.date, name, "datetime.date")
    images = (_check_image(baseline_image, "baseline_image"), _check_image(follow_up_image, "follow_up_image"))
    missing = [k for k in _PATIENT_STUDY_KEYWORDS if k not in ref_dataset]
    if missing:
        raise ValueError(f"ref_dataset lacks {', '.join(missing)}: patient/study attributes come from it.")
    if str(ref_dataset.StudyInstanceUID) != result.follow_up.study_instance_uid:
        raise ValueError("ref_dataset is not from the follow-up study of the result (Study Instance UID differs).")
    if len(window) != 2 or not float(window[1]) > 0:
        raise ValueError(f"window must be (center, width) with a positive width, not {window}.")
    window = (float(window[0]), float(window[1]))
    follow_up_date = follow_up_date or _study_date(ref_dataset)
    lines = _result_lines(result, content_datetime, software_version)
    pixels = _render(result, images, key_lesions(result), (baseline_date, follow_up_date), window, lines)
    return sc_image(
        pixels,
        ref_dataset,
        response_uids(result, f"SC {RESULT_KIND}", "page"),
        series_number=_series_number(result.method, "SC") if series_number is None else series_number,
        instance_number=1,
        description=response_series_description(result),
        content_datetime=content_datetime,
        manufacturer=manufacturer,
        software_version=software_version,
        institution_name=institution_name,
        body_part_examined=body_part_examined,
    )
