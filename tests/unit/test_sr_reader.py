"""SR reader (dicom_sr.reader): StudyResult -> SR -> bytes -> read -> the same values.

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

from dicom_sr.reader import read_measurement_report, read_predictions
from dicom_sr.sr import build_measurement_report, write_dataset
from dicom_sr.templates import Prediction
from inference.pipelines.radiomics import run_radiomics
from inference.results import AlgorithmInfo, StudyResult
from pacs_agent.phantom import PhantomStudy, generate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("reader"), seed=4, slices=24, lesions=2)


@pytest.fixture(scope="module")
def ct(study: PhantomStudy) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in study.ct_files]


@pytest.fixture(scope="module")
def results(study: PhantomStudy) -> dict[str, tuple[StudyResult, Dataset]]:
    """The radiomics pipeline's result for the SEG and for the RTSTRUCT, with that object."""
    assert study.seg_file is not None and study.rtstruct_file is not None
    return {
        kind: (run_radiomics(study.ct_files, path).result, pydicom.dcmread(path))
        for kind, path in (("seg", study.seg_file), ("rtstruct", study.rtstruct_file))
    }


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
