"""The response Secondary Capture (dicom_sr.sc.response): page layout, linkage, UIDs, dciodvfy.

Input: one small phantom pair with planted shrinkage (volume x0.2, texture homogenised) run through
the real response pipeline with the committed DEMO package and without a model. The example page
is written to the test's tmp dir (and to $PACS_AGENT_SC_EXAMPLES when set).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_sr.sc.render import CONTOUR, DEMO_RED, HEADER_GREY, HEADER_HEIGHT
from dicom_sr.sc.response import PANEL_LEFT, PANEL_SIZE, PANEL_TOP, build_response_capture, key_lesions
from dicom_sr.sr.lesions import write_dataset
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.pipelines.response import run_response
from inference.response import ResponseResult
from inference.response.signature import load_signature
from inference.results import AlgorithmInfo, KeyImage
from tests.unit.response_helpers import DEMO_PACKAGE, dciodvfy, find_key_image, green_box

WHEN = datetime.datetime(2025, 3, 4, 10, 30, 15)


@dataclasses.dataclass(frozen=True)
class Case:
    baseline: PhantomStudy
    follow_up: PhantomStudy
    demo: ResponseResult
    plain: ResponseResult
    images: tuple[KeyImage | None, KeyImage | None]
    ref: pydicom.Dataset


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    work = tmp_path_factory.mktemp("response-sc")
    baseline = generate_study(work / "b", seed=21, lesions=2, slices=40, rows=128, columns=128, segmentation="seg")
    follow = generate_follow_up(baseline, work / "f", shrink=0.2, texture_change="homogenise")
    assert baseline.seg_file is not None and follow.seg_file is not None
    demo = run_response(
        baseline.ct_files, baseline.seg_file, follow.ct_files, follow.seg_file, model=load_signature(DEMO_PACKAGE)
    )
    # as without a model: the pipeline's own identity, no score
    pipeline = AlgorithmInfo("pacs-agent response", "0.1.0+params.test", "RESEARCH")
    plain = dataclasses.replace(demo, score=None, algorithm=pipeline)
    base_lesion, follow_lesion = key_lesions(demo)
    images = (
        find_key_image(baseline.ct_files, baseline.seg_file, base_lesion),
        find_key_image(follow.ct_files, follow.seg_file, follow_lesion),
    )
    ref = pydicom.dcmread(follow.ct_files[0], stop_before_pixels=True)
    return Case(baseline, follow, demo, plain, images, ref)


def capture(case: Case, result: ResponseResult | None = None, **kwargs: object) -> pydicom.Dataset:
    options: dict[str, object] = {
        "content_datetime": WHEN,
        "baseline_image": case.images[0],
        "follow_up_image": case.images[1],
        "baseline_date": case.baseline.study_date,
        **kwargs,
    }
    return build_response_capture(result or case.demo, case.ref, **options)  # type: ignore[arg-type]


def panel(index: int) -> tuple[slice, slice]:
    left = PANEL_LEFT[index]
    return slice(PANEL_TOP, PANEL_TOP + PANEL_SIZE), slice(left, left + PANEL_SIZE)


def save_example(pixels: np.ndarray, tmp_path: Path, name: str) -> None:
    Image.fromarray(pixels).save(tmp_path / name)
    target = os.environ.get("PACS_AGENT_SC_EXAMPLES")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(Path(target) / name)


@pytest.mark.parametrize("images", ["both", "baseline only"])
def test_capture_passes_dciodvfy(case: Case, images: str, tmp_path: Path) -> None:
    kwargs = {} if images == "both" else {"follow_up_image": None}
    sc = capture(case, **kwargs)
    errors, warnings = dciodvfy(write_dataset(sc, tmp_path / "sc.dcm"))
    assert not errors, "\n".join(errors + warnings)


def test_capture_is_in_the_follow_up_study_with_a_stable_description(case: Case, tmp_path: Path) -> None:
    sc = capture(case)
    assert sc.StudyInstanceUID == case.follow_up.study_instance_uid
    assert sc.PatientID == case.ref.PatientID
    assert sc.Modality == "OT" and sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert sc.BurnedInAnnotation == "YES"
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (1024, 1024, 3)
    assert (sc.SeriesDescription, sc.SeriesNumber) == ("AI Response 8w M5 - DEMO, not for clinical use", 917)
    assert capture(case, case.plain).SeriesDescription == "AI Response 8w M5"
    assert str(sc.ContentDate) == "20250304"
    save_example(sc.pixel_array, tmp_path, "response_sc.png")


def test_uids_and_pixels_are_deterministic(case: Case) -> None:
    first, again = capture(case), capture(case)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert np.array_equal(first.pixel_array, again.pixel_array)
    plain = capture(case, case.plain)
    assert plain.SOPInstanceUID != first.SOPInstanceUID  # another algorithm identity, another object


def test_demo_banner_only_for_the_demo_model(case: Case) -> None:
    def red_header(pixels: np.ndarray) -> float:
        header = pixels[:HEADER_HEIGHT]
        return float(np.mean(np.all(header == np.asarray(DEMO_RED, dtype=np.uint8), axis=-1)))

    assert red_header(capture(case).pixel_array) > 0.5
    assert red_header(capture(case, case.plain).pixel_array) == 0.0


def test_both_panels_show_the_lesion_at_the_same_scale(case: Case) -> None:
    pixels = capture(case).pixel_array
    base_box = green_box(pixels, *panel(0), CONTOUR)
    follow_box = green_box(pixels, *panel(1), CONTOUR)
    assert base_box is not None and follow_box is not None
    # planted volume x0.2: the follow-up contour is visibly smaller on the same mm-per-pixel scale
    assert follow_box[0] * follow_box[1] < 0.6 * base_box[0] * base_box[1]
    base_lesion, follow_lesion = key_lesions(case.demo)
    assert base_lesion is not None and follow_lesion is not None
    assert base_lesion.tracking_uid == follow_lesion.tracking_uid


def test_missing_follow_up_lesion_leaves_an_empty_panel(case: Case) -> None:
    pixels = capture(case, follow_up_image=None).pixel_array
    assert green_box(pixels, *panel(0), CONTOUR) is not None
    assert green_box(pixels, *panel(1), CONTOUR) is None
    flat = np.all(pixels[panel(1)] == np.asarray(HEADER_GREY, dtype=np.uint8), axis=-1)
    assert flat.mean() > 0.9  # a flat panel with two lines of text saying why


def test_score_panel_differs_with_and_without_a_score(case: Case) -> None:
    with_score = capture(case).pixel_array[700:]
    without = capture(case, case.plain).pixel_array[700:]
    assert not np.array_equal(with_score, without)


def test_key_lesions_prefers_the_largest_matched_lesion(case: Case) -> None:
    base, follow = key_lesions(case.demo)
    assert base is not None and follow is not None
    assert base.volume_ml == max(p.baseline.volume_ml for p in case.demo.pairs)
    only_gone = dataclasses.replace(case.demo, pairs=(), disappeared_lesions=(case.demo.pairs[0].baseline,))
    assert key_lesions(only_gone) == (case.demo.pairs[0].baseline, None)
    only_new = dataclasses.replace(case.demo, pairs=(), new_lesions=(case.demo.pairs[0].follow_up,))
    assert key_lesions(only_new) == (None, case.demo.pairs[0].follow_up)
    assert key_lesions(dataclasses.replace(case.demo, pairs=())) == (None, None)


def test_validation(case: Case) -> None:
    with pytest.raises(TypeError, match='"result"'):
        build_response_capture("x", case.ref, content_datetime=WHEN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"content_datetime"'):
        build_response_capture(case.demo, case.ref, content_datetime="now")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"baseline_image"'):
        capture(case, baseline_image=np.zeros((4, 4)))
    baseline_ref = pydicom.dcmread(case.baseline.ct_files[0], stop_before_pixels=True)
    with pytest.raises(ValueError, match="not from the follow-up study"):
        build_response_capture(case.demo, baseline_ref, content_datetime=WHEN)
    assert case.images[0] is not None
    empty = dataclasses.replace(case.images[0], mask=np.zeros_like(case.images[0].mask))
    with pytest.raises(ValueError, match="mask is empty"):
        capture(case, baseline_image=empty)
    no_name = copy.deepcopy(case.ref)
    del no_name.PatientName
    with pytest.raises(ValueError, match="PatientName"):
        build_response_capture(case.demo, no_name, content_datetime=WHEN)
    with pytest.raises(ValueError, match="positive width"):
        capture(case, window=(40.0, 0.0))
