"""Secondary Capture pages (dicom_sr.sc.lesions, dicom_sr.sc.render): pixels, linkage, UIDs, dciodvfy.

Input is a small synthetic phantom (inference.phantom): exact masks, a real CT header. Example PNGs
are written to the test's tmp dir, and also to $PACS_AGENT_SC_EXAMPLES when that is set (the README
example: ``PACS_AGENT_SC_EXAMPLES=docs/img pytest tests/unit/test_sc.py -k examples``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from dicom_sr.sc.lesions import _lesion_lines, build_lesion_capture, build_summary_capture, summary_table
from dicom_sr.sc.render import (
    BACKGROUND,
    CANVAS,
    CONTOUR,
    DEMO_RED,
    HEADER_HEIGHT,
    IMAGE_BOX,
    TEXT_TOP,
    TextLine,
    _font,
    hot_colormap,
    layout_text,
    line_height,
    mask_outline,
    render_lesion_page,
    text_width,
    window_to_uint8,
)
from dicom_sr.series import DEMO_SUFFIX, series_description
from dicom_sr.sr.lesions import write_dataset
from dicom_sr.sr.templates import Prediction
from dicom_sr.uids import derive_uid
from inference.imaging.lesions import find_lesions
from inference.imaging.masks import load_segmentation
from inference.imaging.volume import CTVolume, load_ct_series
from inference.phantom import PhantomStudy, generate_study
from inference.results import AlgorithmInfo, FeatureValue, LesionResult, StudyResult

WHEN = datetime.datetime(2025, 3, 4, 10, 30, 15)
DEMO = AlgorithmInfo("kras-resnet2d", "0.1.0", "DEMO", "ab" * 32, "demonstration only")
RESEARCH = AlgorithmInfo("pacs-agent radiomics", "0.1.0+params.1234", "RESEARCH")
FEATURES = (
    FeatureValue("original_firstorder_Mean", 87.4, "[hnsf'U]"),
    FeatureValue("original_shape_Sphericity", 0.81, "1"),
)


@dataclasses.dataclass(frozen=True)
class Case:
    study: PhantomStudy
    volume: CTVolume
    result: StudyResult
    masks: tuple[np.ndarray, ...]
    """3D mask of each lesion of ``result`` (same order)."""
    headers: dict[str, Dataset]

    def slice_of(self, i: int) -> tuple[np.ndarray, np.ndarray, Dataset]:
        lesion = self.result.lesions[i]
        k = lesion.key_slice_index
        return np.asarray(self.volume.array[k]), self.masks[i][k], self.headers[lesion.key_slice_sop_instance_uid]

    def heatmap(self, i: int) -> np.ndarray:
        _, mask, _ = self.slice_of(i)
        rows, cols = np.nonzero(mask)
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        return np.exp(-((yy - rows.mean()) ** 2 + (xx - cols.mean()) ** 2) / (2 * 10.0**2))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    study = generate_study(tmp_path_factory.mktemp("sc"), seed=3, slices=24, lesions=2, segmentation="seg")
    assert study.seg_file is not None
    volume = load_ct_series(study.ct_files)
    lesions, masks = [], []
    for label_mask in load_segmentation(study.seg_file, volume):
        for found in find_lesions(label_mask, volume):
            masks.append(found.mask)
            lesions.append(
                LesionResult(
                    tracking_id=found.tracking_id,
                    tracking_uid=derive_uid("test sc", found.tracking_id),
                    source=label_mask.source,
                    volume_ml=found.volume_ml,
                    longest_axial_diameter_mm=found.longest_axial_diameter_mm,
                    centroid_mm=found.centroid_mm,
                    key_slice_index=found.key_slice_index,
                    key_slice_sop_instance_uid=volume.sop_instance_uids[found.key_slice_index],
                    features=FEATURES,
                )
            )
    assert len(lesions) == 2
    result = StudyResult(
        method="M1",
        study_instance_uid=volume.study_instance_uid,
        ct_series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        segmentation=lesions[0].source,
        algorithm=DEMO,
        lesions=tuple(lesions),
    )
    headers = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in study.ct_files)
    }
    return Case(study, volume, result, tuple(masks), headers)


def capture(case: Case, i: int = 0, *, result: StudyResult | None = None, **kwargs: object) -> Dataset:
    hu, mask, ref = case.slice_of(i)
    target = case.result if result is None else result
    arguments: dict[str, object] = {"content_datetime": WHEN, **kwargs}
    return build_lesion_capture(target, target.lesions[i], hu, mask, ref, **arguments)  # type: ignore[arg-type]


KRAS = Prediction("KRAS", "mutant", 0.83, 0.5)


# --- pixels ---------------------------------------------------------------------------------------


def test_page_is_1024_rgb(case: Case) -> None:
    sc = capture(case, predictions=[KRAS], heatmap=case.heatmap(0))
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.BitsAllocated) == (CANVAS, CANVAS, 3, 8)
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.pixel_array.shape == (CANVAS, CANVAS, 3)
    assert sc.pixel_array.dtype == np.uint8


def test_contour_is_on_the_mask_boundary(case: Case) -> None:
    hu, mask, ref = case.slice_of(0)
    spacing = (float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1]))
    page, placement = render_lesion_page(
        hu, mask, spacing, window=(40, 400), title="t", lines=[], heatmap=case.heatmap(0)
    )
    left, top, right, bottom = IMAGE_BOX
    image = page[top:bottom, left:right]
    green = np.all(image == CONTOUR, axis=-1)
    assert green.sum() > 50
    # every contour pixel lies within one source pixel of a mask / background edge
    ys, xs = np.nonzero(green)
    rows, cols = placement.to_source(ys + top, xs + left)
    r, c = np.round(rows).astype(int), np.round(cols).astype(int)
    padded = np.pad(mask, 1)
    window = np.stack([padded[r + 1 + dr, c + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
    assert np.all(window.any(axis=0) & ~window.all(axis=0)), "a contour pixel is away from the mask boundary"
    # every boundary pixel of the mask has contour within half a source pixel (+ the line width) of its centre
    br, bc = np.nonzero(mask_outline(mask, thickness=1))
    py, px = placement.to_page(br, bc)
    reach = int(np.ceil(0.5 / min(placement.step_r, placement.step_c))) + 3
    near = [
        green[max(0, y - reach) : y + reach + 1, max(0, x - reach) : x + reach + 1].any()
        for y, x in zip(np.round(py).astype(int) - top, np.round(px).astype(int) - left, strict=True)
    ]
    assert all(near)


def test_aspect_ratio_is_corrected_to_square_pixels() -> None:
    """A 40 mm disc on a grid of 2 mm rows x 1 mm columns is drawn round, not squashed."""
    rows, cols = np.mgrid[:60, :120]
    mask = ((rows - 30) * 2.0) ** 2 + ((cols - 60) * 1.0) ** 2 <= 20.0**2
    hu = np.where(mask, 60.0, 0.0)
    page, placement = render_lesion_page(hu, mask, (2.0, 1.0), window=(40, 400), title="t", lines=[])
    left, top, right, bottom = IMAGE_BOX
    green = np.all(page[top:bottom, left:right] == CONTOUR, axis=-1)
    ys, xs = np.nonzero(green)
    height, width = ys.max() - ys.min(), xs.max() - xs.min()
    assert abs(height / width - 1.0) < 0.05
    assert abs(width * placement.mm_per_pixel - 40.0) < 3.0  # the disc is 40 mm wide


def red_pixels(page: np.ndarray) -> np.ndarray:
    return (page[..., 0] > 150) & (page[..., 1] < 80) & (page[..., 2] < 80)


def test_demo_banner_is_red_only_for_demo(case: Case) -> None:
    demo = capture(case, predictions=[KRAS]).pixel_array[:HEADER_HEIGHT]
    assert np.all(demo == DEMO_RED, axis=-1).mean() > 0.5
    assert (demo != DEMO_RED).any(axis=-1).sum() > 500  # the white text on it
    research = capture(case, result=dataclasses.replace(case.result, algorithm=RESEARCH)).pixel_array
    assert red_pixels(research[:HEADER_HEIGHT]).sum() == 0
    assert red_pixels(research).sum() == 0  # no heat map, no DEMO: no red anywhere


def test_text_regions_are_not_empty(case: Case) -> None:
    page = capture(case, predictions=[KRAS], heatmap=case.heatmap(0)).pixel_array
    text = page[TEXT_TOP + 4 :, :]
    side = page[HEADER_HEIGHT:TEXT_TOP, IMAGE_BOX[2] :]
    assert (text != BACKGROUND).any(axis=-1).sum() > 5000
    assert (side != BACKGROUND).any(axis=-1).sum() > 3000
    # the result line is drawn in the result colour, large
    assert np.all(text[:70] == (255, 220, 90), axis=-1).sum() > 300


PANEL_WIDTH = CANVAS - 48
"""The text panel under the image: x from 24 to CANVAS - 24."""
PANEL_HEIGHT = CANVAS - 4 - (TEXT_TOP + 14)


def assert_fits(lines: list[TextLine], width: float = PANEL_WIDTH, height: float = PANEL_HEIGHT) -> list[TextLine]:
    """Lay ``lines`` out and check that every row fits the width, all fit the height, no word is lost."""
    laid = layout_text(lines, width, height)
    for line in laid:
        assert _font(line.size).getlength(line.text) <= width, (line.size, line.text)
    assert sum(line_height(line.size) for line in laid[:-1]) + laid[-1].size <= height
    assert " ".join(line.text for line in laid).split() == " ".join(line.text for line in lines).split()
    return laid


def test_long_lesion_lines_fit_the_panel(case: Case) -> None:
    """The size line that was cut ("... 30.8 ...") fits at 1:1, and so do longer ones."""
    lesion = dataclasses.replace(
        case.result.lesions[0], tracking_id="Liver lesions lesion 1", volume_ml=12.9, longest_axial_diameter_mm=30.8
    )
    research = dataclasses.replace(case.result, algorithm=RESEARCH, lesions=(lesion, *case.result.lesions[1:]))
    lines = _lesion_lines(research, lesion, (), WHEN, "1.0.0")
    size_line = "Liver lesions lesion 1: volume 12.9 ml, longest axial diameter 30.8 mm"
    assert _font(32).getlength(size_line) > PANEL_WIDTH  # too long at its 32 px ...
    laid = assert_fits(lines)
    assert [line.text for line in laid if line.text.startswith("Liver")] == [size_line]  # ... so a little smaller
    assert 24 <= next(line.size for line in laid if line.text == size_line) < 32

    # a long name and a long model: too long at 24 px, so wrapped or set smaller - nothing lost
    long_lesion = dataclasses.replace(lesion, tracking_id="Segment of the right posterior liver lobe lesion 12")
    long_model = dataclasses.replace(
        DEMO, name="kras-egfr-braf-nras-resnet2d-ensemble-with-a-long-name", version="10.20.30-rc1+build.20250304"
    )
    target = dataclasses.replace(case.result, algorithm=long_model, lesions=(long_lesion, *case.result.lesions[1:]))
    lines = _lesion_lines(target, long_lesion, [KRAS], WHEN, "1.0.0")
    assert max(_font(line.size).getlength(line.text) for line in lines) > PANEL_WIDTH
    assert_fits(lines)
    # three predictions: ten lines, taller than the panel: all set smaller, none dropped
    predictions = (KRAS, Prediction("EGFR", "wild type", 0.2, 0.5), Prediction("NRAS", "wild type", 0.1, 0.5))
    lines = _lesion_lines(target, long_lesion, predictions, WHEN, "1.0.0")
    laid = assert_fits(lines)
    assert min(line.size for line in laid) >= 18


def test_the_rendered_text_stays_inside_the_page(case: Case) -> None:
    lesion = dataclasses.replace(
        case.result.lesions[0], tracking_id="Liver lesions lesion 1", volume_ml=12.9, longest_axial_diameter_mm=30.8
    )
    research = dataclasses.replace(case.result, algorithm=RESEARCH, lesions=(lesion, *case.result.lesions[1:]))
    page = capture(case, result=research).pixel_array
    panel = page[TEXT_TOP + 4 :]
    ink = (panel != BACKGROUND).any(axis=-1)
    columns = np.flatnonzero(ink.any(axis=0))
    assert columns.min() >= 24 and columns.max() < CANVAS - 24  # within the panel's margins
    # the size line is one row of yellow text ending with "mm", not with "..." near the right edge
    yellow = np.all(panel == (255, 220, 90), axis=-1)
    assert np.flatnonzero(yellow.any(axis=0)).max() > CANVAS / 2


def test_layout_text() -> None:
    assert layout_text([TextLine("short", 32)], 500, 100) == [TextLine("short", 32)]
    text = "word " * 30
    laid = layout_text([TextLine(text.strip(), 24)], 300, 1000)  # 24 px: not shrunk, wrapped
    assert len(laid) > 1 and all(line.size == 24 for line in laid)
    assert " ".join(line.text for line in laid) == text.strip()
    long_word = layout_text([TextLine("x" * 200, 24)], 300, 1000)  # broken between characters
    assert "".join(line.text for line in long_word) == "x" * 200
    assert all(_font(24).getlength(line.text) <= 300 for line in long_word)
    tall = layout_text([TextLine("a line", 40)] * 6, 500, 200)  # too tall: every size shrinks
    assert all(line.size < 40 for line in tall)
    assert sum(line_height(line.size) for line in tall[:-1]) + tall[-1].size <= 200
    floor = layout_text([TextLine("a line", 40)] * 50, 500, 200)  # cannot fit: the smallest size, the rest is cut
    assert {line.size for line in floor} == {18}
    assert layout_text([], 500, 200) == []


def test_colour_bar_only_with_a_heat_map(case: Case) -> None:
    side_with = capture(case, predictions=[KRAS], heatmap=case.heatmap(0)).pixel_array[
        HEADER_HEIGHT:TEXT_TOP, IMAGE_BOX[2] :
    ]
    side_without = capture(case, predictions=[KRAS]).pixel_array[HEADER_HEIGHT:TEXT_TOP, IMAGE_BOX[2] :]
    bar_colours = {tuple(c) for c in hot_colormap(np.linspace(0.2, 0.6, 20))}

    def count(side: np.ndarray) -> int:
        return sum(int(np.all(side == colour, axis=-1).sum()) for colour in bar_colours)

    assert count(side_with) > 100
    assert count(side_without) == 0


def test_window_and_colormap_helpers() -> None:
    assert window_to_uint8(np.array([-160.0, 40.0, 240.0, 1000.0]), 40, 400).tolist() == [0, 128, 255, 255]
    assert hot_colormap(np.array([0.0, 1.0])).tolist() == [[0, 0, 0], [255, 255, 255]]
    with pytest.raises(ValueError, match="width"):
        window_to_uint8(np.zeros(2), 40, 0)


# --- DICOM ----------------------------------------------------------------------------------------


def test_linkage_and_header(case: Case) -> None:
    sc = capture(case, predictions=[KRAS], heatmap=case.heatmap(0))
    ref = case.slice_of(0)[2]
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.StudyInstanceUID == case.result.study_instance_uid == ref.StudyInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate"):
        assert str(sc.get(keyword)) == str(ref.get(keyword)), keyword
    assert sc.SeriesInstanceUID != ref.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == "AI KRAS" + DEMO_SUFFIX  # method "M1" is not one of the node's names
    assert sc.SeriesNumber == 910
    assert (str(sc.ContentDate), str(sc.ContentTime)) == ("20250304", "103015")
    assert sc.InstanceNumber == 2
    assert "PixelSpacing" not in sc
    research = capture(case, result=dataclasses.replace(case.result, algorithm=RESEARCH, method="radiomics"))
    assert research.SeriesDescription == "AI Radiomics" == series_description("radiomics", "Radiomics", demo=False)
    assert research.SeriesNumber == 911


def test_uids_are_deterministic(case: Case) -> None:
    first = capture(case, predictions=[KRAS])
    again = capture(case, predictions=[KRAS], heatmap=case.heatmap(0))
    other_lesion = capture(case, 1, predictions=[KRAS])
    summary = build_summary_capture(case.result, case.slice_of(0)[2], content_datetime=WHEN, result_kind="KRAS")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert other_lesion.SeriesInstanceUID == summary.SeriesInstanceUID == first.SeriesInstanceUID
    assert len({first.SOPInstanceUID, other_lesion.SOPInstanceUID, summary.SOPInstanceUID}) == 3
    assert (summary.InstanceNumber, other_lesion.InstanceNumber) == (1, 3)
    newer = dataclasses.replace(case.result, algorithm=dataclasses.replace(DEMO, version="0.2.0"))
    changed = capture(case, result=newer, predictions=[KRAS])
    assert changed.SOPInstanceUID != first.SOPInstanceUID and changed.SeriesInstanceUID != first.SeriesInstanceUID
    radiomics = capture(case)
    assert radiomics.SeriesInstanceUID != first.SeriesInstanceUID  # another result kind, another series
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return (run.stdout + run.stderr).splitlines()


def test_examples_pass_dciodvfy_and_are_saved_as_png(case: Case, tmp_path: Path) -> None:
    predictions = {
        case.result.lesions[0].tracking_uid: [KRAS],
        case.result.lesions[1].tracking_uid: [Prediction("KRAS", "wild type", 0.21, 0.5)],
    }
    research = dataclasses.replace(case.result, algorithm=RESEARCH, method="radiomics")
    ref = case.slice_of(0)[2]
    objects = {
        "kras_lesion_demo": capture(
            case, predictions=predictions[case.result.lesions[0].tracking_uid], heatmap=case.heatmap(0)
        ),
        "kras_summary_demo": build_summary_capture(case.result, ref, content_datetime=WHEN, predictions=predictions),
        "radiomics_lesion": capture(case, 1, result=research),
        "radiomics_summary": build_summary_capture(research, ref, content_datetime=WHEN),
    }
    targets = [tmp_path]
    if os.environ.get("PACS_AGENT_SC_EXAMPLES"):
        targets.append(Path(os.environ["PACS_AGENT_SC_EXAMPLES"]))
    problems = []
    for name, sc in objects.items():
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sc.pixel_array).save(target / f"{name}.png")
        lines = _dciodvfy(write_dataset(sc, tmp_path / f"{name}.dcm"))
        errors = [line for line in lines if line.startswith("Error")]
        warnings = [line for line in lines if line.startswith("Warning")]
        if errors:
            problems.append(f"{name}: errors {errors}; warnings {warnings}")
    assert not problems, "\n".join(problems)
    with Image.open(tmp_path / "kras_lesion_demo.png") as png:
        assert png.size == (CANVAS, CANVAS)


def test_summary_lists_every_lesion(case: Case) -> None:
    many = dataclasses.replace(
        case.result,
        lesions=tuple(
            dataclasses.replace(
                case.result.lesions[0], tracking_id=f"Liver lesion {i}", tracking_uid=derive_uid("m", str(i))
            )
            for i in range(40)
        ),
    )
    page = build_summary_capture(many, case.slice_of(0)[2], content_datetime=WHEN).pixel_array
    assert (page[HEADER_HEIGHT + 100 : CANVAS - 200] != BACKGROUND).any(axis=-1).sum() > 20000


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"content_datetime": "2025-03-04"}, "content_datetime"),
        ({"heatmap": [[0.5]]}, "heatmap"),
        ({"series_number": "910"}, "series_number"),
        ({"manufacturer": None}, "manufacturer"),
        ({"institution_name": 1}, "institution_name"),
        ({"result_kind": 1}, "result_kind"),
        ({"body_part_examined": 1}, "body_part_examined"),
    ],
)
def test_wrong_types_name_the_argument(case: Case, kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(TypeError, match=f'Argument "{argument}" must have type'):
        capture(case, **kwargs)


def test_invalid_inputs(case: Case) -> None:
    hu, mask, ref = case.slice_of(0)
    lesion = case.result.lesions[0]
    with pytest.raises(TypeError, match=r'Argument "result" must have type StudyResult\.'):
        build_lesion_capture("result", lesion, hu, mask, ref, content_datetime=WHEN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='Argument "ct_slice_hu"'):
        build_lesion_capture(case.result, lesion, hu.tolist(), mask, ref, content_datetime=WHEN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not one of the lesions"):
        build_lesion_capture(
            case.result, dataclasses.replace(lesion, volume_ml=1.0), hu, mask, ref, content_datetime=WHEN
        )
    other = copy.deepcopy(ref)
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="Study Instance UID differs"):
        build_lesion_capture(case.result, lesion, hu, mask, other, content_datetime=WHEN)
    with pytest.raises(ValueError, match="empty"):
        build_lesion_capture(case.result, lesion, hu, np.zeros_like(mask), ref, content_datetime=WHEN)
    with pytest.raises(ValueError, match="shape"):
        build_lesion_capture(case.result, lesion, hu, mask[:-1], ref, content_datetime=WHEN)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_lesion_capture(case.result, lesion, hu, mask, ref, content_datetime=WHEN, heatmap=case.heatmap(0) * 2)
    with pytest.raises(ValueError, match="contradicts"):
        capture(case, predictions=[Prediction("KRAS", "mutant", 0.1, 0.5)])
    with pytest.raises(ValueError, match="unknown Tracking UID"):
        build_summary_capture(case.result, ref, content_datetime=WHEN, predictions={"1.2.3": [KRAS]})


def test_a_multi_label_summary_shows_every_label_and_probability_in_full(case: Case, tmp_path: Path) -> None:
    """M3's three grouped labels: one table row per label, each cell fits its column; the patient result too."""
    m3 = [
        Prediction("RAS", "mutant", 0.91, 0.53, name="RAS (KRAS or NRAS)"),
        Prediction("PIK3CABRA", "wild type", 0.02, 0.51, name="PIK3CA or BRAF"),
        Prediction("OTHER", "wild type", 0.11, 0.46, name="Other gene"),
    ]
    predictions = {lesion.tracking_uid: m3 for lesion in case.result.lesions}
    columns, rows = summary_table(case.result, predictions)
    assert len(rows) == 3 * len(case.result.lesions)
    assert [row[3] for row in rows[:3]] == [
        "RAS (KRAS or NRAS) mutant",
        "PIK3CA or BRAF wild type",
        "Other gene wild type",
    ]
    assert [row[4] for row in rows[:3]] == ["0.91", "0.02", "0.11"]
    assert rows[1][:3] == ["", "", ""]  # the lesion is named once, on its first row
    edges = [x for _, x in columns[1:]] + [1024 - 24]
    for row in [[caption for caption, _ in columns], *rows]:
        for cell, (_, left), right in zip(row, columns, edges, strict=True):
            assert text_width(cell, 24) <= right - left - 12, cell  # drawn whole, never cut with "..."
    patient = dataclasses.replace(case.result, patient_predictions=(m3[0],))
    page = build_summary_capture(patient, case.slice_of(0)[2], content_datetime=WHEN, predictions=predictions)
    Image.fromarray(page.pixel_array).save(tmp_path / "m3_summary.png")  # to look at
    assert page.SeriesDescription.startswith("AI RAS")
