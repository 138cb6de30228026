"""The response pipeline on phantom pairs with planted change, and the signature's model package."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

from inference.imaging import load_ct_series, load_segmentation
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.phantom.segmentation import write_seg
from inference.pipelines.response import NoLesionError, run_response
from inference.radiomics.delta import FEATURE_NAMES, FeatureDeltas, feature_delta
from inference.response import ResponseResult
from inference.response.signature import (
    CSV_COLUMNS,
    DEFAULT_THRESHOLD,
    TrainingDataError,
    load_signature,
    read_training_csv,
    train_from_csv,
    train_signature,
    write_signature_package,
)
from pacs_agent.errors import InputError, ModelPackageError


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("response")


@pytest.fixture(scope="module")
def baseline(work: Path) -> PhantomStudy:
    # one segment per lesion, so single lesions can be blanked at one time point
    return generate_study(
        work / "b", seed=5, lesions=3, slices=40, rows=160, columns=160, lesion_scale=1.5, seg_per_lesion=True
    )


@pytest.fixture(scope="module")
def homogenised(baseline: PhantomStudy, work: Path) -> PhantomStudy:
    return generate_follow_up(baseline, work / "h", shrink=0.5, texture_change="homogenise")


@pytest.fixture(scope="module")
def homogenised_result(baseline: PhantomStudy, homogenised: PhantomStudy) -> ResponseResult:
    return run(baseline, homogenised)


@pytest.fixture(scope="module")
def package(work: Path) -> Path:
    """A DEMO signature trained on synthetic deltas: falling entropy / contrast = sensitive."""
    rng = np.random.default_rng(0)
    path = work / "train.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", *CSV_COLUMNS, "label"])
        for i in range(40):
            insensitive = i % 2
            shift = 0.05 if insensitive else -0.3
            row = [0.0, *(rng.normal(shift, 0.08, 3))]
            writer.writerow([f"case{i}", *row, "insensitive" if insensitive else "sensitive"])
    out, _ = train_from_csv(
        path, work / "pkg", name="response-demo", version="0.0.1", validation_status="DEMO", n_estimators=50
    )
    return out


def run(baseline: PhantomStudy, follow: PhantomStudy, **kwargs: object) -> ResponseResult:
    return run_response(baseline.ct_files, baseline.seg_file, follow.ct_files, follow.seg_file, **kwargs)  # type: ignore[arg-type]


def blank_segments(study: PhantomStudy, segments: set[int], out: Path) -> Path:
    """A copy of the study's SEG with the frames of ``segments`` set to zero."""
    ds = pydicom.dcmread(study.seg_file)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns).copy()
    for i, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber) in segments:
            frames[i] = 0
    ds.PixelData = pack_bits(frames.ravel())
    ds.save_as(out)
    return out


def rigid_copy(study: PhantomStudy, transform: sitk.Transform, out: Path) -> tuple[list[Path], Path]:
    """DICOM copy of a study moved by ``transform`` (B-spline CT, nearest-neighbour SEG), new UIDs.

    ``transform`` maps a copy point to the original point (SimpleITK resampling convention); the copy
    lies in a new frame of reference, on the same grid.
    """
    volume = load_ct_series(study.ct_files)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for mask in load_segmentation(study.seg_file, volume):
        labels[mask.mask] = mask.source.number
    moved = sitk.GetArrayFromImage(
        sitk.Resample(volume.image, volume.image, transform, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    )
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.image)
    moved_labels = sitk.GetArrayFromImage(sitk.Resample(label_image, volume.image, transform, sitk.sitkNearestNeighbor))
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    (out / "CT").mkdir(parents=True)
    files, headers, ordered = [], [], []
    for path in study.ct_files:
        ds = pydicom.dcmread(path)
        k = volume.sop_instance_uids.index(str(ds.SOPInstanceUID))
        stored = (moved[k] - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        info = np.iinfo(ds.pixel_array.dtype)
        ds.PixelData = np.clip(np.round(stored), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(out / "CT" / path.name)
        ds.save_as(files[-1])
        del ds.PixelData
        headers.append(ds)
        ordered.append(moved_labels[k])
    seg = out / "seg.dcm"
    write_seg(
        seg,
        headers,
        np.stack(ordered),
        per_lesion=True,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    return files, seg


def test_a_study_paired_with_itself_gives_zero_deltas(baseline: PhantomStudy) -> None:
    result = run(baseline, baseline)
    assert result.alignment.method == "frame-of-reference"
    assert result.deltas is not None and result.deltas.vector() == (0.0, 0.0, 0.0, 0.0)
    assert len(result.pairs) == 3 and result.new_lesions == result.disappeared_lesions == ()
    assert all(p.deltas is not None and p.deltas.vector() == (0.0,) * 4 for p in result.pairs)
    assert all(p.baseline.tracking_uid == p.follow_up.tracking_uid == p.tracking_uid for p in result.pairs)
    assert result.recist.category == "SD" and result.recist.percent_change == 0.0
    assert result.volumetric_change_percent == 0.0
    assert result.score is None and result.risk_group is None
    assert result.algorithm.name == "pacs-agent response" and result.algorithm.weights_sha256 is None
    assert result.problems == ()


@pytest.mark.parametrize(
    ("rotation_deg", "translation_mm"), [((0.0, 0.0, 0.0), (5.0, -2.5, 5.0)), ((1.0, -1.0, 2.0), (4.1, -2.2, 1.6))]
)
def test_rigidly_moved_copy_changes_no_feature_by_5_percent(
    baseline: PhantomStudy,
    tmp_path: Path,
    rotation_deg: tuple[float, float, float],
    translation_mm: tuple[float, float, float],
) -> None:
    """The study re-sampled through a known rigid transform, written as DICOM with a new frame of reference."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(baseline.lesions[0].centre_mm)
    transform.SetRotation(*np.radians(rotation_deg))
    transform.SetTranslation(translation_mm)
    ct_files, seg = rigid_copy(baseline, transform, tmp_path)
    result = run_response(baseline.ct_files, baseline.seg_file, ct_files, seg)
    assert result.alignment.method == "rigid-registration"
    assert len(result.pairs) == 3 and result.new_lesions == result.disappeared_lesions == ()
    # the copy's content sits at T^-1(p): registration must find T^-1 (baseline point -> copy point)
    inverse = transform.GetInverse()
    for pair in result.pairs:
        expected = inverse.TransformPoint(pair.baseline.centroid_mm)
        found = result.alignment.transform().TransformPoint(pair.baseline.centroid_mm)
        assert np.linalg.norm(np.subtract(found, expected)) < 1.5
    assert result.deltas is not None
    for delta in result.deltas.deltas:
        assert abs(delta.value) < 0.05, (delta.name, delta.value)
    assert abs(result.volumetric_change_percent or 0.0) < 5


def test_retest_with_new_noise_and_a_shifted_body(baseline: PhantomStudy, work: Path) -> None:
    """A new acquisition: same lesions, new noise and texture realisation, body moved, new frame of reference.

    Texture features of these small lesions (20-35 mm) vary with the noise realisation: the entropies by
    a few per cent, NGTDM contrast by up to ~10 %.
    """
    retest = generate_follow_up(baseline, work / "r", shrink=1.0, texture_change=None, body_shift_mm=(7.3, -4.1, 3.2))
    result = run(baseline, retest)
    assert result.alignment.method == "rigid-registration"
    assert len(result.pairs) == 3 and result.new_lesions == result.disappeared_lesions == ()
    assert result.deltas is not None
    for delta in result.deltas.deltas:
        limit = 0.12 if delta.name == "ngtdm_contrast" else 0.05
        assert abs(delta.value) < limit, (delta.name, delta.value)
    assert result.recist.category == "SD"
    assert abs(result.recist.percent_change or 0.0) < 5
    assert abs(result.volumetric_change_percent or 0.0) < 5
    assert result.provenance["registration_region"] == "lesions + 60 mm"


def test_planted_shrinkage_and_homogenisation(homogenised_result: ResponseResult) -> None:
    result = homogenised_result
    assert len(result.pairs) == 3
    assert result.deltas is not None
    deltas = result.deltas.as_dict()
    assert deltas["log_z_entropy"] < -0.1
    assert deltas["log_x_entropy"] < -0.1
    assert deltas["ngtdm_contrast"] < -0.1
    assert deltas["si4"] == 0.0  # ellipsoids stay convex
    for pair in result.pairs:
        assert pair.volume_change_percent == pytest.approx(-50, abs=5)
        assert pair.deltas is not None and pair.deltas["log_z_entropy"].value < 0
    assert result.volumetric_change_percent == pytest.approx(-50, abs=3)
    # half the volume is ~-21 % in diameter for a smooth ellipsoid; on a 2.5 mm grid it lands near -16 %
    assert result.recist.category == "SD"
    assert -30 < (result.recist.percent_change or 0.0) < -10
    assert result.baseline_features is not None and result.follow_up_features is not None
    assert result.follow_up_features.total_volume_ml == pytest.approx(
        result.baseline_features.total_volume_ml / 2, rel=0.05
    )


@pytest.mark.parametrize(("shrink", "category"), [(0.3, "PR"), (2.0, "PD")])
def test_planted_recist_categories(baseline: PhantomStudy, work: Path, shrink: float, category: str) -> None:
    follow = generate_follow_up(baseline, work / f"s{shrink}", shrink=shrink, texture_change=None)
    result = run(baseline, follow)
    assert len(result.pairs) == 3
    assert result.recist.category == category, result.recist.reason
    expected_percent = 100 * (shrink ** (1 / 3) - 1)  # -33 % / +26 %
    assert result.recist.percent_change == pytest.approx(expected_percent, abs=6)
    assert result.volumetric_change_percent == pytest.approx(100 * (shrink - 1), abs=5)


def test_lesion_segmented_at_baseline_only_is_reported_as_disappeared(
    baseline: PhantomStudy, homogenised: PhantomStudy, tmp_path: Path
) -> None:
    seg = blank_segments(homogenised, {2}, tmp_path / "seg.dcm")
    result = run_response(baseline.ct_files, baseline.seg_file, homogenised.ct_files, seg)
    assert len(result.pairs) == 2
    assert [lesion.source.number for lesion in result.disappeared_lesions] == [2]
    assert result.new_lesions == ()
    assert any("baseline only" in p for p in result.problems)
    assert any("skipped" in p and "empty" in p for p in result.problems)
    assert result.deltas is not None  # the patient level still has lesions at both time points


def test_lesion_segmented_at_follow_up_only_is_new_and_progression(
    baseline: PhantomStudy, homogenised: PhantomStudy, tmp_path: Path
) -> None:
    seg = blank_segments(baseline, {3}, tmp_path / "seg.dcm")
    result = run_response(baseline.ct_files, seg, homogenised.ct_files, homogenised.seg_file)
    assert len(result.pairs) == 2
    assert [lesion.source.number for lesion in result.new_lesions] == [3]
    assert result.recist.category == "PD" and "new lesion" in result.recist.reason
    assert any("follow-up only" in p for p in result.problems)


def test_nothing_left_at_follow_up_is_complete_response_without_deltas(
    baseline: PhantomStudy, homogenised: PhantomStudy, package: Path, tmp_path: Path
) -> None:
    seg = blank_segments(homogenised, {1, 2, 3}, tmp_path / "seg.dcm")
    result = run_response(baseline.ct_files, baseline.seg_file, homogenised.ct_files, seg, model=package)
    assert len(result.disappeared_lesions) == 3 and result.pairs == ()
    assert result.recist.category == "CR"
    assert result.volumetric_change_percent == -100.0
    assert result.follow_up_features is None and result.deltas is None
    assert result.score is None
    assert any("no signature score" in p for p in result.problems)
    assert result.follow_up.lesion_count == 0


def test_no_lesion_at_either_time_point_is_an_input_error(baseline: PhantomStudy, tmp_path: Path) -> None:
    seg = blank_segments(baseline, {1, 2, 3}, tmp_path / "seg.dcm")
    with pytest.raises(NoLesionError, match="nothing to compare"):
        run_response(baseline.ct_files, seg, baseline.ct_files, seg)
    assert issubclass(NoLesionError, InputError)


def test_segmentation_of_another_ct_is_still_an_error(baseline: PhantomStudy, homogenised: PhantomStudy) -> None:
    with pytest.raises(InputError, match=r"not drawn on this CT|refers to series"):
        run_response(baseline.ct_files, homogenised.seg_file, homogenised.ct_files, homogenised.seg_file)


def test_score_with_a_model_package(baseline: PhantomStudy, homogenised: PhantomStudy, package: Path) -> None:
    result = run(baseline, homogenised, model=package)
    assert result.score is not None
    assert 0.0 <= result.score.probability <= 1.0
    assert result.score.threshold == DEFAULT_THRESHOLD
    assert result.risk_group == ("high" if result.score.probability > 0.5 else "low")
    # falling entropy and contrast were "sensitive" in the synthetic training data
    assert result.risk_group == "low"
    assert result.algorithm.name == "response-demo" and result.algorithm.is_demo
    assert result.algorithm.weights_sha256 and len(result.algorithm.weights_sha256) == 64


def test_signature_package_round_trip(package: Path) -> None:
    signature = load_signature(package)
    rising = FeatureDeltas(tuple(feature_delta(n, 1.0, 1.1) for n in FEATURE_NAMES))
    falling = FeatureDeltas(tuple(feature_delta(n, 1.0, 0.7) for n in FEATURE_NAMES))
    assert signature.score(rising).high_risk
    assert not signature.score(falling).high_risk
    assert signature.algorithm.validation_status == "DEMO"
    text = (package / "model.toml").read_text()
    assert 'method = "response"' in text and "classifier.skops" in text


def test_tampered_package_is_refused(package: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pkg"
    copy.mkdir()
    for item in package.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    weights = copy / "classifier.skops"
    weights.write_bytes(weights.read_bytes() + b"\x00")
    with pytest.raises(ModelPackageError, match="checksum"):
        load_signature(copy)


def test_training_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("delta_si4,label\n0.1,1\n")
    with pytest.raises(TrainingDataError, match="missing column"):
        read_training_csv(path)
    header = ",".join([*CSV_COLUMNS, "label"])
    path.write_text(f"{header}\n0,0,0,x,1\n")
    with pytest.raises(TrainingDataError, match="row 2"):
        read_training_csv(path)
    path.write_text(f"{header}\n0,0,0,0,maybe\n")
    with pytest.raises(TrainingDataError, match="label"):
        read_training_csv(path)
    path.write_text(f"{header}\n" + "0,0,0,0,1\n" * 5 + "0,0,0,1,0\n")
    with pytest.raises(TrainingDataError, match="two patients of each class"):
        read_training_csv(path)


def test_training_is_deterministic_and_reports_auc() -> None:
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 15)
    x = rng.normal(0, 0.1, (30, 4)) + y[:, None] * 0.3
    first, report = train_signature(x, y, n_estimators=30)
    second, _ = train_signature(x, y, n_estimators=30)
    assert np.array_equal(first.predict_proba(x), second.predict_proba(x))
    assert report.cv_auc_mean is not None and report.cv_auc_mean > 0.8
    assert set(report.feature_importances) == set(FEATURE_NAMES)
    with pytest.raises(ValueError, match="classes"):
        write_signature_package(
            Path("/nonexistent"), object(), name="x", version="1", validation_status="DEMO", training_description="x"
        )


def test_liver_and_planning_structures_are_no_lesions_and_the_liver_focuses_the_registration(work: Path) -> None:
    """Clinical exports: the liver segment is the registration region, BODY / CTV / PTV are ignored."""
    base = generate_study(
        work / "cb", seed=8, lesions=2, slices=32, rows=96, columns=96, lesion_scale=1.5, clinical_structures=True
    )
    follow = generate_follow_up(base, work / "cf", shrink=0.3, texture_change=None)  # a third of the volume
    for kind in ("seg", "rtstruct"):
        b_seg, f_seg = (base.seg_file, follow.seg_file) if kind == "seg" else (base.rtstruct_file, follow.rtstruct_file)
        assert b_seg is not None and f_seg is not None
        result = run_response(base.ct_files, b_seg, follow.ct_files, f_seg)
        assert len(result.pairs) == 2 and result.new_lesions == result.disappeared_lesions == (), kind
        assert {pair.baseline.source.number for pair in result.pairs} <= set(base.structure_numbers(kind)), kind
        assert result.provenance["registration_region"].startswith("liver"), kind
        assert {pair.baseline.organ for pair in result.pairs} == {"liver"}  # held by the liver structure
        assert result.recist.category == "PR", (kind, result.recist.reason)
        assert result.volumetric_change_percent == pytest.approx(-70, abs=5), kind
