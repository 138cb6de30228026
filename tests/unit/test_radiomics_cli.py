"""``pacs-agent radiomics``: output, segment choice, per-lesion features and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.imaging.volume import load_ct_series
from inference.phantom import PhantomStudy, generate_study
from pacs_agent.cli import main


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("phantom"), seed=3, lesions=2, slices=30, rows=96, columns=96, seg_per_lesion=True
    )


def _run(*args: str) -> int:
    return main(["radiomics", *args])


def test_whole_segment_features_and_provenance(study: PhantomStudy, tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    assert (
        _run("--ct", str(study.ct_files[0].parent), "--seg", str(study.seg_file), "--label", "2", "--out", str(out))
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report) == {"features", "provenance"}
    features, provenance = report["features"], report["provenance"]
    assert "original_shape_VoxelVolume" in features and "original_glcm_Contrast" in features
    volume = load_ct_series(list(study.ct_files))
    assert features["original_shape_VoxelVolume"] == pytest.approx(study.lesions[1].voxels * volume.voxel_volume_mm3)
    assert provenance["segment_number"] == 2 and provenance["segmentation_kind"] == "seg"
    assert provenance["ct_series_instance_uid"] == study.ct_series_instance_uid
    assert provenance["mask"].startswith("whole segment")
    assert len(provenance["parameter_hash"]) == 64 and provenance["settings"]["setting"]["binWidth"] == 25
    text = out.read_text()
    assert study.patient_id not in text and study.patient_name not in text  # no PHI in the output


def test_rtstruct_by_roi_name_with_per_lesion(tmp_path: Path) -> None:
    study = generate_study(tmp_path / "s", seed=4, lesions=2, slices=30, rows=96, columns=96, segmentation="rtstruct")
    out = tmp_path / "f.json"
    args = ["--ct", str(study.ct_files[0].parent), "--seg", str(study.rtstruct_file), "--roi", "GTV_Liver_Lesions"]
    assert _run(*args, "--per-lesion", "--out", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["provenance"]["segmentation_kind"] == "rtstruct"
    lesions = report["lesions"]
    assert [lesion["tracking_id"] for lesion in lesions] == ["GTV_Liver_Lesions lesion 1", "GTV_Liver_Lesions lesion 2"]
    assert sorted(lesion["voxel_count"] for lesion in lesions) == sorted(lesion.voxels for lesion in study.lesions)
    whole = report["features"]["original_shape_VoxelVolume"]
    assert sum(lesion["features"]["original_shape_VoxelVolume"] for lesion in lesions) == pytest.approx(whole)


def test_the_one_tumour_among_body_organs_and_planning_volumes_is_the_default(tmp_path: Path) -> None:
    study = generate_study(
        tmp_path / "s", seed=6, lesions=1, slices=24, rows=64, columns=64, segmentation="rtstruct",
        clinical_structures=True,
    )  # fmt: skip
    out = tmp_path / "f.json"
    assert _run("--ct", str(study.ct_files[0].parent), "--seg", str(study.rtstruct_file), "--out", str(out)) == 0
    provenance = json.loads(out.read_text())["provenance"]
    assert (provenance["segment_number"],) == study.structure_numbers("rtstruct")
    assert provenance["segment_label"] == "GTV_Liver_Lesions"


def test_output_to_stdout(study: PhantomStudy, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--ct", str(study.ct_files[0].parent), "--seg", str(study.seg_file), "--label", "1", "--out", "-") == 0
    assert "original_shape_VoxelVolume" in json.loads(capsys.readouterr().out)["features"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            [],
            "holds 2 segments/ROIs (1 (Liver lesion 1), 2 (Liver lesion 2)) and 2 of them look like tumours; "
            "choose one with --label or --roi",
        ),
        (["--label", "9"], "no segment/ROI with number 9; it has: 1 (Liver lesion 1), 2 (Liver lesion 2)"),
        (["--roi", "Liver"], "no segment/ROI with name 'Liver'"),
        (["--label", "1", "--params", "/nonexistent/p.yaml"], "parameter file /nonexistent/p.yaml does not exist"),
        (["--label", "1", "--phase", "AcquisitionNumber=2"], "has no phase 'AcquisitionNumber=2'"),
    ],
)
def test_errors_exit_1_with_a_readable_message(
    study: PhantomStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "f.json"
    assert _run("--ct", str(study.ct_files[0].parent), "--seg", str(study.seg_file), *extra, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("pacs-agent radiomics: ") and message in err
    assert not out.exists()


def test_invalid_parameter_file(study: PhantomStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "bad.yaml"
    params.write_text("setting:\n  binWidth: -3\n")
    args = ["--ct", str(study.ct_files[0].parent), "--seg", str(study.seg_file), "--label", "1"]
    assert _run(*args, "--params", str(params), "--out", str(tmp_path / "f.json")) == 1
    assert "invalid parameter file" in capsys.readouterr().err


def test_bad_ct_folder_and_segmentation(
    study: PhantomStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "f.json")
    assert _run("--ct", str(tmp_path / "missing"), "--seg", str(study.seg_file), "--out", out) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run("--ct", str(tmp_path / "empty"), "--seg", str(study.seg_file), "--out", out) == 1
    assert "holds no files" in capsys.readouterr().err
    # a segmentation of another CT
    other = generate_study(tmp_path / "other", seed=5, lesions=1, slices=30, rows=96, columns=96, segmentation="seg")
    assert _run("--ct", str(study.ct_files[0].parent), "--seg", str(other.seg_file), "--out", out) == 1
    assert "it was not drawn on this CT" in capsys.readouterr().err
    # the CT itself as the segmentation
    assert _run("--ct", str(study.ct_files[0].parent), "--seg", str(study.ct_files[0]), "--out", out) == 1
    assert "not a DICOM SEG or RTSTRUCT" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _run("--ct", "x")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        _run("--ct", "x", "--seg", "y", "--label", "1", "--roi", "a", "--out", "z")
    assert exc.value.code == 2
    capsys.readouterr()
