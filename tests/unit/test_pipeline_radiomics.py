"""The radiomics pipeline on phantoms with exact ground truth."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from inference.imaging.masks import segmentation_phase
from inference.phantom import PhantomStudy, generate_study
from inference.pipelines import PIPELINES
from inference.pipelines.radiomics import run_radiomics
from pacs_agent.config import KNOWN_METHODS
from pacs_agent.errors import InputError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("p"), seed=21, lesions=3, slices=40, rows=128, columns=128)


def test_every_configurable_method_has_a_pipeline() -> None:
    assert set(KNOWN_METHODS) == set(PIPELINES)


def test_lesions_match_the_planted_ground_truth(phantom: PhantomStudy) -> None:
    result = run_radiomics(phantom.ct_files, phantom.seg_file).result
    assert result.study_instance_uid == phantom.study_instance_uid
    assert result.ct_series_instance_uid == phantom.ct_series_instance_uid
    planted = sorted((lesion.volume_ml for lesion in phantom.lesions), reverse=True)
    found = [lesion.volume_ml for lesion in result.lesions]
    assert found == pytest.approx(planted, rel=1e-9)
    assert [lesion.tracking_id for lesion in result.lesions] == [f"Liver lesions lesion {n}" for n in (1, 2, 3)]
    for lesion in result.lesions:
        names = {feature.name for feature in lesion.features}
        assert "original_shape_VoxelVolume" in names
        voxel_volume = next(f.value for f in lesion.features if f.name == "original_shape_VoxelVolume")
        assert voxel_volume == pytest.approx(lesion.volume_ml * 1000, rel=1e-6)
        assert lesion.source.kind == "seg"
        ct_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom.ct_files}
        assert lesion.key_slice_sop_instance_uid in ct_uids


def test_rtstruct_gives_the_same_measurements_as_seg(phantom: PhantomStudy) -> None:
    seg = run_radiomics(phantom.ct_files, phantom.seg_file).result
    rt = run_radiomics(phantom.ct_files, phantom.rtstruct_file).result
    assert [x.volume_ml for x in rt.lesions] == pytest.approx([x.volume_ml for x in seg.lesions], rel=1e-9)
    for a, b in zip(seg.lesions, rt.lesions, strict=True):
        assert {f.name: f.value for f in a.features} == pytest.approx({f.name: f.value for f in b.features})
        assert b.outline_mm  # RTSTRUCT-derived lesions carry their outline for SCOORD3D references
        assert not a.outline_mm


def test_tracking_uids_are_stable(phantom: PhantomStudy) -> None:
    first = run_radiomics(phantom.ct_files, phantom.seg_file).result
    second = run_radiomics(list(reversed(phantom.ct_files)), phantom.seg_file).result
    assert [x.tracking_uid for x in first.lesions] == [x.tracking_uid for x in second.lesions]
    assert len({x.tracking_uid for x in first.lesions}) == 3


def test_key_images_show_each_lesion_on_its_key_slice(phantom: PhantomStudy) -> None:
    output = run_radiomics(phantom.ct_files, phantom.seg_file)
    assert set(output.key_images) == {lesion.tracking_uid for lesion in output.result.lesions}
    for lesion in output.result.lesions:
        image = output.key_images[lesion.tracking_uid]
        assert image.hu.shape == image.mask.shape == (128, 128)
        assert image.mask.any()
        assert -200 < float(image.hu[image.mask].mean()) < 200  # lesion tissue, not air or bone
    assert output.result_kind == "Radiomics"


def test_empty_segmentation_is_an_input_error(phantom: PhantomStudy, tmp_path: Path) -> None:
    seg = dcmread(phantom.seg_file)
    seg.PixelData = b"\x00" * len(seg.PixelData)
    seg.save_as(tmp_path / "empty.dcm")
    with pytest.raises(InputError, match="empty"):
        run_radiomics(phantom.ct_files, tmp_path / "empty.dcm")


def test_missing_slices_are_an_input_error(phantom: PhantomStudy) -> None:
    files = list(phantom.ct_files)
    del files[len(files) // 2 : len(files) // 2 + 3]
    with pytest.raises(InputError, match=r"gap|missing"):
        run_radiomics(files, phantom.seg_file)


def _two_phase_series(phantom: PhantomStudy, folder: Path) -> list[Path]:
    """The phantom's CT as phase 2 of a series whose phase 1 is an 'arterial' copy."""
    folder.mkdir()
    files = []
    for n, path in enumerate(phantom.ct_files):
        portal = dcmread(path)
        portal.AcquisitionNumber = 2
        arterial = dcmread(path)
        arterial.AcquisitionNumber = 1
        arterial.SOPInstanceUID = generate_uid()
        arterial.file_meta.MediaStorageSOPInstanceUID = arterial.SOPInstanceUID
        for ds, name in ((portal, f"pv_{n:03d}.dcm"), (arterial, f"art_{n:03d}.dcm")):
            ds.save_as(folder / name)
            files.append(folder / name)
    return files


def test_multi_phase_series_uses_the_phase_the_segmentation_was_drawn_on(phantom: PhantomStudy, tmp_path: Path) -> None:
    files = _two_phase_series(phantom, tmp_path / "ct")
    for segmentation in (phantom.seg_file, phantom.rtstruct_file):
        assert segmentation_phase(files, dcmread(segmentation)) == "AcquisitionNumber=2"
        result = run_radiomics(files, segmentation).result
        planted = sorted((lesion.volume_ml for lesion in phantom.lesions), reverse=True)
        assert [x.volume_ml for x in result.lesions] == pytest.approx(planted, rel=1e-9)


def test_multi_phase_series_without_referenced_images_is_an_input_error(phantom: PhantomStudy, tmp_path: Path) -> None:
    files = _two_phase_series(phantom, tmp_path / "ct")
    seg = dcmread(phantom.seg_file)
    for series in seg.ReferencedSeriesSequence:
        del series.ReferencedInstanceSequence
    del seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frame.pop("DerivationImageSequence", None)
    with pytest.raises(InputError, match="references images of none of them"):
        segmentation_phase(files, seg)
