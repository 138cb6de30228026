"""The same phantom written differently gives the same masks and the same radiomic features.

Variants of one phantom study (CT + SEG + RTSTRUCT):
- ``reversed``: InstanceNumber 1 is the most inferior slice instead of the most superior, and the
  files are listed in that order;
- ``shuffled``: InstanceNumber is a random permutation, files listed in a random order;
- ``tilted``: the whole study is rotated in patient space (about two axes), so the slices are
  oblique; ImageOrientationPatient / ImagePositionPatient of the CT, the plane positions and
  orientation of the SEG and every RTSTRUCT contour point are rotated consistently;
- ``coronal``: the same rotation idea with 90 degrees about x, so the CT slices are coronal.

The pixel data never changes, so the volume and the masks on the CT's own grid must be identical
and so must every feature: exactly for the re-ordered copies, within a relative 1e-9 for the
rotated ones (their DICOM decimal strings are rounded to 16 characters).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.valuerep import DS

from inference.imaging.masks import SegmentationError, load_segmentation
from inference.imaging.volume import load_ct_series
from inference.phantom import PhantomStudy, generate_study
from inference.radiomics.cli import radiomics_report

ALL_CLASSES = {
    "setting": {"binWidth": 25, "label": 1, "minimumROIDimensions": 2},
    "imageType": {"Original": {}},
    "featureClass": {c: None for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")},
}


def _rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def _ds(values: np.ndarray) -> list[DS]:
    return [DS(float(v), auto_format=True) for v in np.ravel(values)]


def _copy_ordered(study: PhantomStudy, out: Path, numbers: list[int]) -> list[Path]:
    """CT files with new InstanceNumbers (``numbers[i]`` for ``study.ct_files[i]``), listed by number."""
    (out / "CT").mkdir(parents=True)
    paths = []
    for path, number in zip(study.ct_files, numbers, strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        target = out / "CT" / f"ct_{number:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return sorted(paths)


def _copy_rotated(study: PhantomStudy, out: Path, rotation: np.ndarray) -> list[Path]:
    """The whole study rotated by ``rotation`` about the first slice's position."""
    centre = np.asarray([float(v) for v in pydicom.dcmread(study.ct_files[0]).ImagePositionPatient])

    def move(points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, float).reshape(-1, 3) - centre) @ rotation.T + centre

    def turn(iop: object) -> list[DS]:
        cosines = np.asarray([float(v) for v in iop], float).reshape(2, 3)  # type: ignore[attr-defined]
        return _ds(cosines @ rotation.T)

    (out / "CT").mkdir(parents=True)
    paths = []
    for path in study.ct_files:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = _ds(move([float(v) for v in ds.ImagePositionPatient]))
        ds.ImageOrientationPatient = turn(ds.ImageOrientationPatient)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        del ds.SliceLocation
        target = out / "CT" / path.name
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    assert study.seg_file is not None and study.rtstruct_file is not None
    seg = pydicom.dcmread(study.seg_file)
    for item in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence:
        item.ImageOrientationPatient = turn(item.ImageOrientationPatient)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for item in frame.PlanePositionSequence:
            item.ImagePositionPatient = _ds(move([float(v) for v in item.ImagePositionPatient]))
    (out / "SEG").mkdir()
    seg.save_as(out / "SEG" / "seg.dcm", enforce_file_format=True)
    rtstruct = pydicom.dcmread(study.rtstruct_file)
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.ContourSequence:
            contour.ContourData = _ds(move([float(v) for v in contour.ContourData]))
    (out / "RTSTRUCT").mkdir()
    rtstruct.save_as(out / "RTSTRUCT" / "rtstruct.dcm", enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("phantom"), seed=7, lesions=2, slices=36, rows=96, columns=96, lesion_scale=1.2
    )


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "all.yaml"
    path.write_text(json.dumps(ALL_CLASSES))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def reference(study: PhantomStudy, params_file: Path) -> dict[str, dict]:
    assert study.seg_file is not None and study.rtstruct_file is not None
    return {
        kind: radiomics_report(list(study.ct_files), seg, params=params_file, per_lesion=True)
        for kind, seg in (("seg", study.seg_file), ("rtstruct", study.rtstruct_file))
    }


def _variant(name: str, study: PhantomStudy, out: Path) -> tuple[list[Path], Path, Path]:
    assert study.seg_file is not None and study.rtstruct_file is not None
    n = len(study.ct_files)
    if name == "reversed":
        paths = _copy_ordered(study, out, [n - i for i in range(n)])
        return paths, study.seg_file, study.rtstruct_file
    if name == "shuffled":
        numbers = list(range(1, n + 1))
        random.Random(11).shuffle(numbers)
        paths = _copy_ordered(study, out, numbers)
        random.Random(12).shuffle(paths)
        return paths, study.seg_file, study.rtstruct_file
    rotation = _rotation(25.0, 15.0) if name == "tilted" else _rotation(90.0, 0.0)
    paths = _copy_rotated(study, out, rotation)
    return paths, out / "SEG" / "seg.dcm", out / "RTSTRUCT" / "rtstruct.dcm"


@pytest.mark.parametrize("name", ["reversed", "shuffled", "tilted", "coronal"])
def test_same_features_whatever_the_order_or_orientation(
    name: str, study: PhantomStudy, reference: dict[str, dict], params_file: Path, tmp_path: Path
) -> None:
    paths, seg, rtstruct = _variant(name, study, tmp_path)
    original = load_ct_series(list(study.ct_files))
    volume = load_ct_series(paths)
    np.testing.assert_array_equal(volume.array, original.array)
    assert volume.spacing_xyz == pytest.approx(original.spacing_xyz, rel=1e-12)
    if name in ("tilted", "coronal"):
        assert abs(volume.direction[2, 2]) < 0.95  # the slices really are not axial any more
        assert not np.allclose(volume.direction, original.direction)
    for kind, path in (("seg", seg), ("rtstruct", rtstruct)):
        masks = load_segmentation(path, volume)
        expected = load_segmentation(study.seg_file if kind == "seg" else study.rtstruct_file, original)  # type: ignore[arg-type]
        assert [m.mask.sum() for m in masks] == [m.mask.sum() for m in expected]
        for got_mask, want_mask in zip(masks, expected, strict=True):
            np.testing.assert_array_equal(got_mask.mask, want_mask.mask)
        report = radiomics_report(paths, path, params=params_file, per_lesion=True)
        want = reference[kind]
        assert set(report["features"]) == set(want["features"]) and len(want["features"]) == 107
        assert len(want["lesions"]) == 2
        rel = 0.0 if name in ("reversed", "shuffled") else 1e-9
        for feature, value in want["features"].items():
            assert report["features"][feature] == pytest.approx(value, rel=rel, abs=1e-12), (kind, feature)
        assert [lesion["tracking_id"] for lesion in report["lesions"]] == [
            lesion["tracking_id"] for lesion in want["lesions"]
        ]
        for got_lesion, want_lesion in zip(report["lesions"], want["lesions"], strict=True):
            assert got_lesion["voxel_count"] == want_lesion["voxel_count"]
            for feature, value in want_lesion["features"].items():
                assert got_lesion["features"][feature] == pytest.approx(value, rel=rel, abs=1e-12)


def test_rotating_the_ct_but_not_the_seg_is_caught(study: PhantomStudy, tmp_path: Path) -> None:
    """The invariance above is not vacuous: a SEG left in the old orientation is refused."""
    paths = _copy_rotated(study, tmp_path, _rotation(25.0, 15.0))
    volume = load_ct_series(paths)
    with pytest.raises(SegmentationError, match="not oriented like the slices"):
        load_segmentation(study.seg_file, volume)  # type: ignore[arg-type]
