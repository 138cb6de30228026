"""Helpers shared by the response SR / SC tests: phantom pairs, headers, key images, SR tree walking."""

from __future__ import annotations

import dataclasses
import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from inference.imaging import find_lesions, load_ct_series, load_segmentation
from inference.phantom import PhantomStudy
from inference.pipelines.study import key_image
from inference.response import LesionMeasurement, ResponseResult
from inference.results import KeyImage

REPO = Path(__file__).resolve().parents[2]
DEMO_PACKAGE = REPO / "config" / "models" / "response-demo"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Headers of both time points, as the worker passes them to the SR builder."""

    follow_up_ct: list[Dataset]
    follow_up_seg: Dataset
    baseline_ct: list[Dataset]
    baseline_seg: Dataset


def segmentation_file(study: PhantomStudy) -> Path:
    path = study.seg_file or study.rtstruct_file
    assert path is not None
    return path


def evidence(baseline: PhantomStudy, follow_up: PhantomStudy, *, follow_seg: Path | None = None) -> Evidence:
    def headers(paths: tuple[Path, ...]) -> list[Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]

    return Evidence(
        headers(follow_up.ct_files),
        pydicom.dcmread(follow_seg or segmentation_file(follow_up)),
        headers(baseline.ct_files),
        pydicom.dcmread(segmentation_file(baseline)),
    )


def find_key_image(ct_paths: tuple[Path, ...], seg_path: Path, lesion: LesionMeasurement | None) -> KeyImage | None:
    if lesion is None:
        return None
    volume = load_ct_series(ct_paths)
    for label_mask in load_segmentation(seg_path, volume):
        if label_mask.source.number == lesion.source.number and label_mask.ok:
            for found in find_lesions(label_mask, volume):
                if found.tracking_id == lesion.tracking_id:
                    return key_image(volume, found)
    raise AssertionError(f"{lesion.tracking_id} not found again")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' dciodvfy; skips when it is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    seq = item.get(keyword)
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else ("", "")


def walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from walk(child)


def all_groups(sr: Dataset) -> list[Dataset]:
    """Every measurement group of the Imaging Measurements container, in order (viewer copies too)."""
    imaging = next(i for i in sr.ContentSequence if code(i) == ("126010", "DCM"))
    return [g for g in imaging.ContentSequence if code(g) == ("125007", "DCM")]


def is_viewer_copy(group: Dataset) -> bool:
    """True for a lesion's key-slice group for viewers (its Tracking Identifier names OHIF's tool)."""
    return any(
        code(i) == ("112039", "DCM") and str(i.TextValue).startswith("Cornerstone3DTools@")
        for i in group.ContentSequence
    )


def groups(sr: Dataset) -> list[Dataset]:
    """The lesion records and the patient-level group, in order (without the viewer copies)."""
    return [g for g in all_groups(sr) if not is_viewer_copy(g)]


@dataclasses.dataclass(frozen=True)
class Num:
    concept: tuple[str, str]
    value: float
    unit: str
    modifiers: dict[tuple[str, str], tuple[str, str]]


def nums(group: Dataset) -> list[Num]:
    """The NUM items directly in ``group`` with their concept modifiers (code -> value code)."""
    out = []
    for item in group.ContentSequence:
        if item.ValueType != "NUM":
            continue
        measured = item.MeasuredValueSequence[0]
        value = float(measured.FloatingPointValue) if "FloatingPointValue" in measured else float(measured.NumericValue)
        modifiers = {
            code(child): code(child, "ConceptCodeSequence")
            for child in item.get("ContentSequence", [])
            if child.RelationshipType == "HAS CONCEPT MOD"
        }
        out.append(Num(code(item), value, str(measured.MeasurementUnitsCodeSequence[0].CodeValue), modifiers))
    return out


def codes_in(group: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    return {code(i): code(i, "ConceptCodeSequence") for i in group.ContentSequence if i.ValueType == "CODE"}


def texts(item: Dataset) -> list[str]:
    return [str(i.TextValue) for i in walk(item) if i.get("ValueType") == "TEXT"]


def tracking_uid(group: Dataset) -> str:
    return next(str(i.UID) for i in group.ContentSequence if code(i) == ("112040", "DCM"))


def lesion_count(result: ResponseResult) -> int:
    return len(result.pairs) + len(result.new_lesions) + len(result.disappeared_lesions)


def green_box(pixels: np.ndarray, rows: slice, cols: slice, colour: tuple[int, int, int]) -> tuple[int, int] | None:
    """Height and width of the bounding box of ``colour`` pixels in a region, or None."""
    region = pixels[rows, cols]
    ys, xs = np.nonzero(np.all(region == np.asarray(colour, dtype=np.uint8), axis=-1))
    if not len(ys):
        return None
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def dsr2html_text(path: Path) -> str:
    """The text DCMTK ``dsr2html`` renders of an SR file (tags dropped, white space collapsed).

    Skips the test when DCMTK is not installed (``make test`` installs it).
    """
    tool = shutil.which("dsr2html")
    if tool is None:
        pytest.skip("dsr2html is not installed (apt-get install dcmtk; `make test` installs it)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", out.stdout)))
