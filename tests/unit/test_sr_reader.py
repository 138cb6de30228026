"""SR reader (dicom_sr.sr.reader): StudyResult -> SR -> bytes -> read -> the same values.

The results come from the real radiomics pipeline on a small synthetic phantom (SEG and RTSTRUCT),
so the round trip covers what the worker actually writes. DCMTK / dicom3tools checks skip when the
tool is not installed.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_sr.sr.lesions import build_measurement_report, write_dataset
from dicom_sr.sr.reader import read_measurement_report, read_predictions
from dicom_sr.sr.templates import Prediction
from inference.imaging.lesions import key_outline_px
from inference.phantom import PhantomStudy, generate_study
from inference.pipelines.radiomics import run_radiomics
from inference.results import AlgorithmInfo, PipelineOutput, StudyResult


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("reader"), seed=4, slices=24, lesions=2)


@pytest.fixture(scope="module")
def ct(study: PhantomStudy) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in study.ct_files]


@pytest.fixture(scope="module")
def outputs(study: PhantomStudy) -> dict[str, tuple[PipelineOutput, Dataset]]:
    """The radiomics pipeline's output for the SEG and for the RTSTRUCT, with that object."""
    assert study.seg_file is not None and study.rtstruct_file is not None
    return {
        kind: (run_radiomics(study.ct_files, path), pydicom.dcmread(path))
        for kind, path in (("seg", study.seg_file), ("rtstruct", study.rtstruct_file))
    }


@pytest.fixture(scope="module")
def results(outputs: dict[str, tuple[PipelineOutput, Dataset]]) -> dict[str, tuple[StudyResult, Dataset]]:
    """The radiomics pipeline's result for the SEG and for the RTSTRUCT, with that object."""
    return {kind: (output.result, segmentation) for kind, (output, segmentation) in outputs.items()}


@pytest.fixture(params=["seg", "rtstruct"])
def case(
    request: pytest.FixtureRequest, results: dict[str, tuple[StudyResult, Dataset]]
) -> tuple[StudyResult, Dataset]:
    return results[request.param]


def to_bytes_and_back(sr: Dataset) -> Dataset:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def assert_same(expected: StudyResult, actual: StudyResult) -> None:
    """Equal, except outlines: SCOORD3D Graphic Data is float32 (FL), so compare those to 1e-3 mm."""
    for mine, theirs in zip(expected.lesions, actual.lesions, strict=True):
        assert len(mine.outline_mm) == len(theirs.outline_mm)
        for a, b in zip(mine.outline_mm, theirs.outline_mm, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-3, rtol=0)
    strip = tuple(dataclasses.replace(lesion, outline_mm=()) for lesion in expected.lesions)
    stripped = tuple(dataclasses.replace(lesion, outline_mm=()) for lesion in actual.lesions)
    assert dataclasses.replace(actual, lesions=stripped) == dataclasses.replace(expected, lesions=strip)


def test_round_trip_is_exact(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    sr = build_measurement_report(result, [*ct, segmentation], segmentation_dataset=segmentation)
    read = read_measurement_report(to_bytes_and_back(sr))
    assert_same(result, read)
    assert read.lesions[0].features == result.lesions[0].features  # names, values (exact), units
    assert read.algorithm.validation_status == "RESEARCH"
    assert read.segmentation == result.segmentation
    # a highdicom object is a Dataset too
    assert_same(result, read_measurement_report(sr))


def test_round_trip_of_a_demo_model_with_predictions(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    demo = dataclasses.replace(
        result,
        method="M1",
        algorithm=AlgorithmInfo("kras-resnet2d", "0.1.0", "DEMO", "cd" * 32, "demonstration only"),
    )
    first, second = (lesion.tracking_uid for lesion in demo.lesions)
    predictions = {
        first: (Prediction("KRAS", "mutant", 0.8125, 0.5), Prediction("EGFR", "wild type", 0.125, 0.4)),
        second: (Prediction("KRAS", "wild type", 0.0625, 0.5),),
    }
    sr = build_measurement_report(demo, [*ct, segmentation], segmentation_dataset=segmentation, predictions=predictions)
    back = to_bytes_and_back(sr)
    assert_same(demo, read_measurement_report(back))
    assert read_predictions(back) == predictions
    assert read_predictions(build_measurement_report(result, [*ct, segmentation])) == {}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_sr_with_predictions_passes_validators(
    results: dict[str, tuple[StudyResult, Dataset]], ct: list[Dataset], tmp_path: Path
) -> None:
    result, segmentation = results["seg"]
    demo = dataclasses.replace(result, algorithm=AlgorithmInfo("kras-resnet2d", "0.1.0", "DEMO", "cd" * 32))
    predictions = {demo.lesions[0].tracking_uid: (Prediction("KRAS", "mutant", 0.75, 0.5),)}
    path = write_dataset(
        build_measurement_report(demo, [*ct, segmentation], segmentation_dataset=segmentation, predictions=predictions),
        tmp_path / "sr.dcm",
    )
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = sorted({line for line in lines if line.startswith("Warning")})
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors) + "\nwarnings:\n" + "\n".join(warnings)
    dump = subprocess.run([_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert '"KRAS status (predicted)"' in dump.stdout and '"Mutant"' in dump.stdout
    assert '"KRAS probability"' in dump.stdout and '"KRAS decision threshold"' in dump.stdout


def test_reader_rejects_what_it_cannot_read(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    with pytest.raises(TypeError, match=r'Argument "ds" must have type pydicom\.Dataset\.'):
        read_measurement_report("sr.dcm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a Comprehensive 3D SR"):
        read_measurement_report(ct[0])
    sr = to_bytes_and_back(build_measurement_report(result, [*ct, segmentation]))
    report = sr.ContentSequence
    evaluations = [i for i in report if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(evaluations) == 1
    report.remove(evaluations[0])
    with pytest.raises(ValueError, match="Qualitative Evaluations"):
        read_measurement_report(sr)
    with pytest.raises(ValueError, match="not a Comprehensive 3D SR"):
        read_predictions(ct[0])


def test_invalid_predictions_are_refused(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    uid = result.lesions[0].tracking_uid
    kras = Prediction("KRAS", "mutant", 0.75, 0.5)
    evidence = [*ct, segmentation]
    with pytest.raises(TypeError, match='"predictions"'):
        build_measurement_report(result, evidence, predictions=[kras])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"predictions"'):
        build_measurement_report(result, evidence, predictions={uid: kras})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown Tracking UID"):
        build_measurement_report(result, evidence, predictions={"1.2.3": (kras,)})
    with pytest.raises(ValueError, match="contradicts"):
        build_measurement_report(result, evidence, predictions={uid: (Prediction("KRAS", "wild type", 0.75, 0.5),)})


# --- the key-slice outline and its viewer copy (TID 1410) -------------------------------------------


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_the_pipeline_outlines_every_lesion_on_its_key_slice(
    outputs: dict[str, tuple[PipelineOutput, Dataset]],
) -> None:
    for output, _ in outputs.values():
        for lesion in output.result.lesions:
            outline = np.asarray(lesion.key_outline_px)
            mask = output.key_images[lesion.tracking_uid].mask
            assert 3 < len(outline) < 100, len(outline)  # simplified, not one point per boundary pixel
            np.testing.assert_array_equal(outline[0], outline[-1])  # closed
            assert np.all(outline >= 0) and np.all(outline <= mask.shape[::-1])  # (column, row) in the image
            assert np.all(outline * 2 == np.round(outline * 2))  # multiples of 0.5: exact as FL
            # it encloses the mask: same area up to the cut corners of the boundary tracing
            assert _polygon_area(outline) == pytest.approx(mask.sum(), rel=0.1)
            rows, columns = np.nonzero(mask)
            assert outline[:, 0].min() == pytest.approx(columns.min(), abs=0.5)
            assert outline[:, 1].max() == pytest.approx(rows.max() + 1, abs=0.5)


def test_key_outline_px() -> None:
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:7] = True  # rows 2-4, columns 3-6: pixel edges at x = 3..7, y = 2..5
    assert key_outline_px(mask) == (
        (6.5, 5.0),
        (3.5, 5.0),
        (3.0, 4.5),
        (3.0, 2.5),
        (3.5, 2.0),
        (6.5, 2.0),
        (7.0, 2.5),
        (7.0, 4.5),
        (6.5, 5.0),
    )
    holed = np.zeros((12, 12), dtype=bool)
    holed[1:10, 1:10] = True
    holed[4:6, 4:6] = False  # a hole: ignored
    holed[11, 11] = True  # a smaller part: ignored
    outline = np.asarray(key_outline_px(holed))
    assert (outline.min(axis=0).tolist(), outline.max(axis=0).tolist()) == ([1.0, 1.0], [10.0, 10.0])
    assert key_outline_px(np.zeros((4, 4), dtype=bool)) == ()
    single = key_outline_px(np.pad(np.ones((1, 1), dtype=bool), 2))
    assert len(set(single)) == 4  # one pixel: a diamond around its centre (2.5, 2.5)
    with pytest.raises(ValueError, match="2D"):
        key_outline_px(np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="tolerance"):
        key_outline_px(mask, tolerance=-1.0)


def _groups(sr: Dataset) -> list[Dataset]:
    container = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(container.ContentSequence)


def _is_copy(group: Dataset) -> bool:
    return any(item.ValueType == "SCOORD" for item in group.ContentSequence)


def test_the_viewer_copy_is_the_same_lesion(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    sr = to_bytes_and_back(build_measurement_report(result, [*ct, segmentation]))
    groups = _groups(sr)
    assert len(groups) == 2 * len(result.lesions) and sum(map(_is_copy, groups)) == len(result.lesions)
    read = read_measurement_report(sr)
    assert [lesion.tracking_uid for lesion in read.lesions] == [lesion.tracking_uid for lesion in result.lesions]
    assert [lesion.key_outline_px for lesion in read.lesions] == [lesion.key_outline_px for lesion in result.lesions]


def test_an_sr_without_viewer_copies_still_reads(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case
    plain = dataclasses.replace(
        result, lesions=tuple(dataclasses.replace(lesion, key_outline_px=()) for lesion in result.lesions)
    )
    sr = to_bytes_and_back(build_measurement_report(plain, [*ct, segmentation]))
    assert not any(map(_is_copy, _groups(sr)))
    assert_same(plain, read_measurement_report(sr))


def test_the_reader_checks_the_viewer_copies(case: tuple[StudyResult, Dataset], ct: list[Dataset]) -> None:
    result, segmentation = case

    def fresh() -> tuple[Dataset, list[Dataset]]:
        sr = to_bytes_and_back(build_measurement_report(result, [*ct, segmentation]))
        return sr, _groups(sr)

    sr, groups = fresh()  # a copy without its lesion's record
    container = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    container.ContentSequence.remove(groups[1])
    with pytest.raises(ValueError, match="without a lesion measurement group"):
        read_measurement_report(sr)
    sr, groups = fresh()  # two copies of one lesion
    container = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    container.ContentSequence.insert(0, groups[0])
    with pytest.raises(ValueError, match="two viewer groups"):
        read_measurement_report(sr)
    sr, groups = fresh()  # a copy whose volume differs from the record's
    volume = next(
        i
        for i in groups[0].ContentSequence
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "118565006"
    )
    volume.MeasuredValueSequence[0].FloatingPointValue += 1.0
    with pytest.raises(ValueError, match="differs from the lesion"):
        read_measurement_report(sr)
    sr, groups = fresh()  # a copy on another image than the key slice
    region = next(i for i in groups[0].ContentSequence if i.ValueType == "SCOORD")
    region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="not the key slice"):
        read_measurement_report(sr)
    sr, groups = fresh()  # two records of one lesion
    container = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    container.ContentSequence.append(groups[1])
    with pytest.raises(ValueError, match="share a Tracking UID"):
        read_measurement_report(sr)


def test_named_labels_and_the_patient_level_result_are_coded_and_read_back(
    results: dict[str, tuple[StudyResult, Dataset]], ct: list[Dataset], tmp_path: Path
) -> None:
    """A package's label names are the concept meanings; the patient-level result is a coded group of its own."""
    result, segmentation = results["seg"]
    named = Prediction("PIK3CABRA", "wild type", 0.25, 0.5, name="PIK3CA or BRAF")
    patient = (Prediction("PIK3CABRA", "wild type", 0.3, 0.5, name="PIK3CA or BRAF"),)
    demo = dataclasses.replace(
        result,
        method="m3",
        algorithm=AlgorithmInfo("m3-demo", "0.1.0", "DEMO", "cd" * 32),
        patient_predictions=patient,
        provenance={**result.provenance, "patient_level_rule": "volume-weighted mean"},
    )
    predictions = {lesion.tracking_uid: (named,) for lesion in demo.lesions}
    sr = build_measurement_report(demo, [*ct, segmentation], segmentation_dataset=segmentation, predictions=predictions)
    back = to_bytes_and_back(sr)
    assert read_predictions(back) == predictions  # the name survives the round trip
    assert_same(demo, read_measurement_report(back))
    derived = next(i for i in back.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126011")
    (group,) = derived.ContentSequence
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
    assert items["Tracking Identifier"].TextValue == "Patient-level result"
    assert items["PIK3CA or BRAF status (predicted)"].ConceptCodeSequence[0].CodeMeaning == "Wild type"
    assert float(items["PIK3CA or BRAF probability"].MeasuredValueSequence[0].NumericValue) == 0.3
    assert items["Patient-level rule"].TextValue == "volume-weighted mean"
    path = write_dataset(sr, tmp_path / "sr.dcm")
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
