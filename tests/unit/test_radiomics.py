"""Radiomics: pyradiomics baseline through compute_features, defaults, units, cropping."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging.volume import CTVolume, volume_from_image
from inference.radiomics.features import (
    DEFAULT_PARAMS,
    DEFAULT_SETTINGS,
    FeatureError,
    compute_features,
    feature_unit,
)

DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
PYRAD = DATA / "pyradiomics" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
CLASSES = ["shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"]


def _nrrd_case(case: str) -> tuple[CTVolume, np.ndarray]:
    """Test adapter: a CTVolume straight from pyradiomics' NRRD image + label."""
    image = sitk.ReadImage(str(PYRAD / f"{case}_image.nrrd"))
    label = sitk.ReadImage(str(PYRAD / f"{case}_label.nrrd"))
    return volume_from_image(image), sitk.GetArrayFromImage(label) == 1


def _baseline(feature_class: str, case: str) -> tuple[dict, dict[str, float]]:
    with (PYRAD / "baseline" / f"baseline_{feature_class}.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index(case)
    values = {r[0]: r[col] for r in rows[1:]}
    settings = ast.literal_eval(values["diagnostics_Configuration_Settings"])
    expected = {k: float(v) for k, v in values.items() if k.startswith("original_")}
    return settings, expected


@pytest.fixture(scope="module")
def lung1() -> tuple[CTVolume, np.ndarray]:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    return _nrrd_case("lung1")


@needs_data
@pytest.mark.parametrize("feature_class", CLASSES)
def test_matches_pyradiomics_baseline(lung1: tuple[CTVolume, np.ndarray], feature_class: str) -> None:
    volume, mask = lung1
    settings, expected = _baseline(feature_class, "lung1")
    params = {
        "setting": {k: v for k, v in settings.items() if v is not None},
        "imageType": {"Original": {}},
        "featureClass": {feature_class: None},
    }
    got = compute_features(volume, mask, params=params).features
    assert set(got) == set(expected)
    rtol = 1e-6 if feature_class in ("shape", "firstorder") else 1e-4
    bad = {k: (got[k], v) for k, v in expected.items() if not np.isclose(got[k], v, rtol=rtol, atol=1e-12)}
    assert not bad, f"{len(bad)} of {len(expected)} {feature_class} features differ: {bad}"


@needs_data
def test_default_parameters_and_provenance(lung1: tuple[CTVolume, np.ndarray]) -> None:
    volume, mask = lung1
    fs = compute_features(volume, mask)
    assert sorted(fs.features) == sorted(
        f"original_{cls}_{name}" for cls, names in DEFAULT_SETTINGS["featureClass"].items() for name in names
    )
    assert not any(k.startswith("diagnostics_") for k in fs.features)
    assert fs.features["original_shape_VoxelVolume"] == pytest.approx(mask.sum() * volume.voxel_volume_mm3)
    p = fs.provenance
    assert p["pyradiomics_version"].lstrip("v").startswith("3.")
    assert len(p["parameter_hash"]) == 64 and '"binWidth":25' in p["settings"]
    assert p["mask_voxel_count"] == str(int(mask.sum()))
    # the embedded dict and the YAML file are the same parameters
    from_dict = compute_features(volume, mask, params=DEFAULT_SETTINGS)
    assert from_dict.provenance["parameter_hash"] == p["parameter_hash"]
    assert from_dict.features == fs.features


def test_yaml_and_embedded_defaults_agree() -> None:
    from ruamel.yaml import YAML

    assert DEFAULT_PARAMS.is_file()
    assert YAML(typ="safe").load(DEFAULT_PARAMS.read_text()) == DEFAULT_SETTINGS


@needs_data
def test_cropping_does_not_change_values(lung1: tuple[CTVolume, np.ndarray]) -> None:
    volume, mask = lung1
    params = {
        "setting": {"binWidth": 25, "label": 1},
        "imageType": {"Original": {}},
        "featureClass": {c: None for c in CLASSES},
    }
    cropped = compute_features(volume, mask, params=params).features
    full = compute_features(volume, mask, params=params, crop=False).features
    assert cropped.keys() == full.keys()
    for name, value in full.items():
        assert cropped[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def _phantom() -> tuple[CTVolume, np.ndarray]:
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 20, (20, 60, 60)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.0))
    z, y, x = np.mgrid[0:20, 0:60, 0:60]
    mask = ((x - 30) * 0.8) ** 2 + ((y - 30) * 0.8) ** 2 + ((z - 10) * 2.0) ** 2 <= 20.0**2  # 40 mm lesion
    return volume_from_image(img), mask


def test_lesion_at_the_border() -> None:
    volume, mask = _phantom()
    fs = compute_features(volume, mask)
    assert fs.features["original_shape_Maximum3DDiameter"] == pytest.approx(40.0, abs=2.0)
    edge = np.zeros_like(mask)
    edge[0:3, 0:4, 0:4] = True  # touches the volume corner: the crop must clip, not fail
    assert compute_features(volume, edge).features["original_shape_VoxelVolume"] == pytest.approx(48 * 1.28)


def test_rejects_bad_masks() -> None:
    volume, mask = _phantom()
    with pytest.raises(ValueError, match="not the volume shape"):
        compute_features(volume, mask[1:])
    with pytest.raises(ValueError, match="empty"):
        compute_features(volume, np.zeros_like(mask))
    one_voxel = np.zeros_like(mask)
    one_voxel[5, 5, 5] = True
    with pytest.raises(FeatureError, match="could not be computed"):
        compute_features(volume, one_voxel)
    with pytest.raises(FileNotFoundError):
        compute_features(volume, mask, params=Path("/nonexistent/params.yaml"))


def test_parameter_file_path(tmp_path: Path) -> None:
    volume, mask = _phantom()
    f = tmp_path / "p.yaml"
    f.write_text("setting:\n  binWidth: 10\nimageType:\n  Original: {}\nfeatureClass:\n  firstorder: [Mean]\n")
    fs = compute_features(volume, mask, params=f)
    assert list(fs.features) == ["original_firstorder_Mean"]
    assert fs.provenance["parameter_source"] == str(f)
    assert fs.features["original_firstorder_Mean"] == pytest.approx(float(volume.array[mask].mean()), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("original_shape_VoxelVolume", "mm3"),
        ("original_shape_MeshVolume", "mm3"),
        ("original_shape_SurfaceArea", "mm2"),
        ("original_shape_Maximum3DDiameter", "mm"),
        ("original_shape_Maximum2DDiameterSlice", "mm"),
        ("original_shape_Sphericity", "1"),
        ("original_shape_SurfaceVolumeRatio", "mm-1"),
        ("original_firstorder_Mean", "[hnsf'U]"),
        ("original_firstorder_10Percentile", "[hnsf'U]"),
        ("original_firstorder_Variance", "[hnsf'U]2"),
        ("original_firstorder_Entropy", "1"),
        ("original_firstorder_Kurtosis", "1"),
        ("original_glcm_Contrast", "1"),
        ("original_ngtdm_Contrast", "1"),
        ("log-sigma-1-0-mm-3D_firstorder_Mean", "1"),
        ("wavelet-LLH_shape_VoxelVolume", "mm3"),
    ],
)
def test_feature_unit(name: str, unit: str) -> None:
    assert feature_unit(name) == unit


def test_feature_unit_rejects_non_names() -> None:
    with pytest.raises(ValueError, match="not a pyradiomics feature name"):
        feature_unit("VoxelVolume")


def test_embedded_defaults_used_when_the_yaml_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.radiomics.features as features

    volume, mask = _phantom()
    from_yaml = compute_features(volume, mask)
    monkeypatch.setattr(features, "DEFAULT_PARAMS", tmp_path / "absent.yaml")
    embedded = compute_features(volume, mask)
    assert embedded.provenance["parameter_source"] == "embedded default"
    assert from_yaml.provenance["parameter_source"].endswith("default.yaml")
    assert embedded.provenance["parameter_hash"] == from_yaml.provenance["parameter_hash"]
    assert embedded.features == from_yaml.features
