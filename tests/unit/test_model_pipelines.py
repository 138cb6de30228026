"""The M1-M4 pipelines on a phantom with small model packages: shapes, ranges, determinism, identity, refusals."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread

from dicom_sr.sr.lesions import build_measurement_report
from dicom_sr.sr.text import render_sr_text
from inference.imaging.lesions import key_outline_px
from inference.imaging.roi import m1_input, m3_input
from inference.networks import Covariates
from inference.phantom import PhantomStudy, generate_study
from inference.pipelines import MODEL_METHODS, PIPELINES
from inference.pipelines.m2_egfr_kras import covariates_from_header
from inference.pipelines.m3_ras import lesion_means
from inference.pipelines.m4_radscore import radscores_of
from inference.pipelines.model_methods import (
    PATIENT_RULE,
    ModelUnavailableError,
    clear_cache,
    installed_package,
    make_prediction,
    patient_predictions,
    report_label,
    resolve_package,
)
from inference.pipelines.study import load_study
from inference.radiomics.features import compute_features
from inference.registry import load_package
from inference.results import StudyResult
from pacs_agent.cli import main
from pacs_agent.config import DEMO_MODELS_DIR, KNOWN_METHODS, load_settings, settings_from_mapping
from pacs_agent.errors import ConfigError, InputError
from tests.model_packages import LABELS, write_test_package

RESULT_KINDS = {"m1": "KRAS", "m2": "EGFR/KRAS", "m3": "RAS", "m4": "Deep-RadScore"}
REPORT_LABELS = {
    "m1": ("KRAS",),
    "m2": ("EGFR", "KRAS"),
    "m3": ("RAS", "PIK3CABRA", "OTHER"),
    "m4": ("EGFR", "KRAS", "LVI"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    clear_cache()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("p"), seed=21, lesions=3, slices=40, rows=128, columns=128)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {method: write_test_package(root / method, method) for method in MODEL_METHODS}


@pytest.fixture(scope="module")
def outputs(phantom: PhantomStudy, packages: dict[str, Path]) -> dict[str, object]:
    return {m: PIPELINES[m](phantom.ct_files, phantom.seg_file, model=packages[m]) for m in MODEL_METHODS}


def test_every_model_method_is_configurable_and_registered() -> None:
    assert set(MODEL_METHODS) <= set(KNOWN_METHODS) == set(PIPELINES)
    settings = settings_from_mapping({"jobs": {"methods": ["radiomics", "m1", "m2", "m3", "m4"]}})
    assert settings.jobs.methods == ("radiomics", "m1", "m2", "m3", "m4")
    with pytest.raises(ConfigError, match="unknown method"):
        settings_from_mapping({"jobs": {"methods": ["m5"]}})


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_pipeline_output(method: str, phantom: PhantomStudy, packages: dict[str, Path], outputs: dict) -> None:
    output = outputs[method]
    result = output.result
    package = load_package(packages[method])
    study = load_study(phantom.ct_files, phantom.seg_file)
    # the same lesions, tracking UIDs and key slices as every other method sees
    assert [lesion.tracking_uid for lesion in result.lesions] == [item.tracking_uid for item in study.lesions]
    assert len(result.lesions) == len(phantom.lesions) == 3
    assert result.method == method and output.result_kind == RESULT_KINDS[method]
    assert result.algorithm == package.algorithm_info()
    assert result.algorithm.weights_sha256 == package.weights_sha256 and result.algorithm.is_demo
    assert result.study_instance_uid == phantom.study_instance_uid
    assert set(result.predictions) == set(output.key_images) == {lesion.tracking_uid for lesion in result.lesions}
    for lesion in result.lesions:
        predictions = result.predictions[lesion.tracking_uid]
        assert tuple(p.label for p in predictions) == REPORT_LABELS[method]
        for p in predictions:
            assert 0.0 <= p.probability <= 1.0 and p.threshold == 0.5
            assert (p.probability >= p.threshold) == (p.status in ("mutant", "positive"))
        image = output.key_images[lesion.tracking_uid]
        assert image.hu.shape == image.mask.shape == image.heatmap.shape == (128, 128)
        assert image.mask.any()
        assert np.isfinite(image.heatmap).all() and image.heatmap.min() >= 0.0 and image.heatmap.max() <= 1.0
        # the key-slice outline the SR's viewer copy (TID 1410) draws, for every method
        assert lesion.key_outline_px == key_outline_px(image.mask) and len(lesion.key_outline_px) >= 4
    assert result.provenance["patient_level_rule"] == PATIENT_RULE
    for p in patient_predictions(result):
        assert result.provenance[f"patient_{p.label}"].startswith(f"{p.status} (probability {p.probability:.3f}")


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_pipeline_is_deterministic(
    method: str, phantom: PhantomStudy, packages: dict[str, Path], outputs: dict
) -> None:
    again = PIPELINES[method](list(reversed(phantom.ct_files)), phantom.seg_file, model=packages[method])
    first = outputs[method]
    assert again.result.predictions == first.result.predictions
    for uid, image in first.key_images.items():
        np.testing.assert_array_equal(again.key_images[uid].heatmap, image.heatmap)


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_without_gradcam_the_same_probabilities(
    method: str, phantom: PhantomStudy, packages: dict[str, Path], outputs: dict
) -> None:
    """The Grad-CAM pass doubles as the prediction pass: it must give what the wrapper's predict gives."""
    plain = PIPELINES[method](phantom.ct_files, phantom.seg_file, model=packages[method], explain=False)
    assert all(image.heatmap is None for image in plain.key_images.values())
    assert plain.result.provenance["heatmap"] == "none"
    for uid, predictions in outputs[method].result.predictions.items():
        for a, b in zip(predictions, plain.result.predictions[uid], strict=True):
            assert (a.label, a.threshold) == (b.label, b.threshold)
            assert a.probability == pytest.approx(b.probability, abs=1e-5)


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_sr_carries_predictions_and_model_identity(method: str, phantom: PhantomStudy, outputs: dict) -> None:
    result: StudyResult = outputs[method].result
    headers = [dcmread(p, stop_before_pixels=True) for p in phantom.ct_files]
    segmentation = dcmread(phantom.seg_file)
    sr = build_measurement_report(result, [*headers, segmentation], segmentation_dataset=segmentation,
                                  predictions=result.predictions)  # fmt: skip
    text = render_sr_text(sr)
    algorithm = result.algorithm
    for needle in (algorithm.name, algorithm.version, algorithm.weights_sha256, "DEMO MODEL - NOT FOR CLINICAL USE"):
        assert needle in text
    first = result.predictions[result.lesions[0].tracking_uid][0]
    assert first.label in text and first.status in text.lower()
    assert "patient_level_rule" in text


def test_m1_batch_equals_one_lesion_at_a_time(phantom: PhantomStudy, packages: dict[str, Path], outputs: dict) -> None:
    package = resolve_package(packages["m1"], "m1")
    study = load_study(phantom.ct_files, phantom.seg_file)
    result = outputs["m1"].result
    for item in study.lesions:
        x = m1_input(study.volume.array, item.lesion.mask, None, margin_px=10, size=(40, 40))
        alone = package.model(x.image[None])[0]["KRAS"]
        assert result.predictions[item.tracking_uid][0].probability == pytest.approx(alone, abs=1e-5)


def test_m3_lesion_is_the_mean_of_its_slices(phantom: PhantomStudy, packages: dict[str, Path], outputs: dict) -> None:
    package = resolve_package(packages["m3"], "m3")
    study = load_study(phantom.ct_files, phantom.seg_file)
    item = study.lesions[0]
    slices = m3_input(study.volume.array, item.lesion.mask, study.spacing_zyx, size=(48, 48))
    assert len(slices) > 1
    per_slice = package.model(np.stack([s.image for s in slices]))
    predictions = outputs["m3"].result.predictions[item.tracking_uid]
    for label, p in zip(LABELS["m3"], predictions, strict=True):
        assert p.probability == pytest.approx(float(np.mean([s[label] for s in per_slice])), abs=1e-6)
    assert lesion_means([{"A": 0.2}, {"A": 0.4}, {"A": 1.0}], [2, 1]) == [{"A": pytest.approx(0.3)}, {"A": 1.0}]
    with pytest.raises(ValueError, match="partition"):
        lesion_means([{"A": 0.2}], [2])


def test_m4_radscores_follow_the_package(phantom: PhantomStudy, packages: dict[str, Path], outputs: dict) -> None:
    package = resolve_package(packages["m4"], "m4")
    (tumour, ring), params = radscores_of(package)
    assert params is None  # no [input] radiomics_settings: the node's radiomics defaults
    study = load_study(phantom.ct_files, phantom.seg_file)
    lesion = study.lesions[0].lesion
    features = compute_features(study.volume, lesion.mask).features
    expected = 0.1 + 0.8 * (features["original_firstorder_Mean"] - 60.0) / 20.0
    expected += -0.3 * (features["original_shape_VoxelVolume"] - 5000.0) / 4000.0
    assert tumour.score(features) == pytest.approx(expected)
    shown = outputs["m4"].result.provenance["radscores"].split(";")[0]
    assert shown.startswith(f"{lesion.tracking_id}: tumour {expected:.4f}, peritumoral ")
    assert ring.features == ("original_firstorder_Mean",)


def test_m4_uses_the_packages_radiomics_settings(tmp_path: Path, phantom: PhantomStudy) -> None:
    study = load_study(phantom.ct_files, phantom.seg_file)
    params = {
        "setting": {"binWidth": 10, "label": 1},
        "imageType": {"Original": {}},
        "featureClass": {"firstorder": []},
    }
    settings = compute_features(study.volume, study.lesions[0].lesion.mask, params=params).provenance["settings"]
    radscore = {"features": ["original_firstorder_Mean"], "coefficients": [1.0], "mean": [0.0], "std": [1.0]}
    spec = {
        "shape": [48, 48],
        "radiomics_settings": settings,
        "radscore": {"tumour": radscore, "peritumoral": radscore},
    }
    output = PIPELINES["m4"](
        phantom.ct_files, phantom.seg_file, model=write_test_package(tmp_path / "a", "m4", input=spec)
    )
    assert output.result.provenance["radscores"].count("tumour") == 3
    spec["radscore"] = {"tumour": {**radscore, "features": ["original_glcm_Contrast"]}, "peritumoral": radscore}
    other = write_test_package(tmp_path / "b", "m4", input=spec)
    with pytest.raises(ModelUnavailableError, match="do not compute"):
        PIPELINES["m4"](phantom.ct_files, phantom.seg_file, model=other)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"tumour": {"features": ["original_firstorder_Mean"], "coefficients": [1.0], "mean": [0.0], "std": [1.0]}},
         "missing table"),
        ({"tumour": {"features": ["original_firstorder_Mean"], "coefficients": [1.0], "mean": [0.0], "std": [0.0]},
          "peritumoral": {}}, "std"),
        ({"tumour": {}, "peritumoral": {}, "extra": {}}, "unknown key"),
        ({"tumour": {"coefficients": [1.0]}, "peritumoral": {}}, "missing"),
    ],
)  # fmt: skip
def test_malformed_radscores_are_refused(tmp_path: Path, phantom: PhantomStudy, table: dict, message: str) -> None:
    bad = write_test_package(tmp_path / "bad", "m4", input={"shape": [48, 48], "radscore": table})
    with pytest.raises(ModelUnavailableError, match=message):
        PIPELINES["m4"](phantom.ct_files, phantom.seg_file, model=bad)
    broken = write_test_package(tmp_path / "json", "m4", input={"shape": [48, 48], "radiomics_settings": "{not json"})
    with pytest.raises(ModelUnavailableError, match="radscore is not usable"):
        PIPELINES["m4"](phantom.ct_files, phantom.seg_file, model=broken)


@pytest.mark.parametrize(
    ("method", "spec", "message"),
    [
        ("m1", {"shape": [40, 40], "margin_px": "20"}, r"\[input\] margin_px must be int"),
        ("m1", {"shape": [40, 40], "square": 1}, r"\[input\] square must be bool"),
        ("m3", {"shape": [48, 48], "border_mm": True}, r"\[input\] border_mm must be float"),
        ("m2", {"shape": [8, 75, 75]}, r"\[input\] shape must be \[9, S, S\]"),
        ("m2", {"shape": [9, 75, 80]}, r"\[input\] shape must be \[9, S, S\]"),
    ],
)
def test_bad_input_settings_are_refused(
    tmp_path: Path, phantom: PhantomStudy, method: str, spec: dict, message: str
) -> None:
    package = write_test_package(tmp_path / method, method, input=spec)
    with pytest.raises(ModelUnavailableError, match=message):
        PIPELINES[method](phantom.ct_files, phantom.seg_file, model=package)


def test_m4_network_with_radscores_needs_their_definition(tmp_path: Path, phantom: PhantomStudy) -> None:
    bare = write_test_package(tmp_path / "bare", "m4", input={"shape": [48, 48]})
    with pytest.raises(ModelUnavailableError, match="defines none"):
        PIPELINES["m4"](phantom.ct_files, phantom.seg_file, model=bare)


# --- packages: refused, cached, chosen -------------------------------------------------------------


def test_tampered_package_is_refused(tmp_path: Path, phantom: PhantomStudy, packages: dict[str, Path]) -> None:
    copy = Path(shutil.copytree(packages["m1"], tmp_path / "m1"))
    weights = copy / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="failed its checksum") as info:
        PIPELINES["m1"](phantom.ct_files, phantom.seg_file, model=copy)
    assert isinstance(info.value, InputError)  # the worker fails the job at once with this message


def test_a_package_is_loaded_once_and_reloaded_when_replaced(tmp_path: Path, packages: dict[str, Path]) -> None:
    copy = Path(shutil.copytree(packages["m1"], tmp_path / "m1"))
    first = resolve_package(copy, "m1")
    assert resolve_package(copy, "m1") is first and first.model is resolve_package(copy, "m1").model
    (copy / "model.pt").write_bytes((copy / "model.pt").read_bytes() + b"tampered after loading")
    with pytest.raises(ModelUnavailableError, match="failed its checksum"):
        resolve_package(copy, "m1")


def test_package_of_another_method_is_refused(phantom: PhantomStudy, packages: dict[str, Path]) -> None:
    with pytest.raises(ModelUnavailableError, match="is for method m3, not m1"):
        PIPELINES["m1"](phantom.ct_files, phantom.seg_file, model=packages["m3"])


def test_installed_package_choice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site, demo, empty = tmp_path / "site", tmp_path / "demo", tmp_path / "empty"
    write_test_package(site / "m1-test-0.9.1", "m1", version="0.9.1")
    write_test_package(site / "m1-test-0.10.0", "m1", version="0.10.0", seed=1)
    write_test_package(demo / "m1-demo", "m1", name="m1-demo", version="9.0.0")
    assert installed_package("m1", [site, demo]).version == "0.10.0"  # the site's highest, not the demo
    assert installed_package("m1", [empty, demo]).name == "m1-demo"
    with pytest.raises(ModelUnavailableError) as info:
        installed_package("m3", [site, demo])
    message = str(info.value)
    assert "method m3 is enabled but no m3 model package is installed in" in message
    assert str(site) in message and str(demo) in message and "pacs-agent models install" in message
    weights = site / "m1-test-0.10.0" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelUnavailableError, match="failed its checksum"):
        installed_package("m1", [site, demo])  # the chosen package is broken: never silently another
    (site / "m1-test-0.10.0" / "model.toml").write_text("not toml [")  # unreadable: not an m1 package at all
    with caplog.at_level(logging.WARNING, logger="inference.pipelines.model_methods"):
        assert installed_package("m1", [site, demo]).version == "0.9.1"
    assert "m1-test-0.10.0" in caplog.text and "not valid TOML" in caplog.text


def test_models_settings_and_cli(tmp_path: Path, packages: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    settings = load_settings(None, environ={"PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state")})
    assert settings.models_dir == tmp_path / "state" / "models"
    assert settings.model_dirs == (tmp_path / "state" / "models", DEMO_MODELS_DIR)
    config = tmp_path / "pacs-agent.toml"
    config.write_text(f'[models]\ndir = "{tmp_path / "models"}"\nuse_demo = false\n')
    assert load_settings(config, environ={}).model_dirs == (tmp_path / "models",)
    assert main(["models", "verify", str(packages["m2"])]) == 0
    assert "OK - m2-test 0.1.0" in capsys.readouterr().out
    assert main(["models", "install", str(packages["m2"]), "--config", str(config)]) == 0
    assert (tmp_path / "models" / "m2-test-0.1.0" / "model.toml").is_file()
    assert main(["models", "list", "--verify", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "m2-test" in listing and "OK" in listing and "demo packages" not in listing
    broken = Path(shutil.copytree(packages["m1"], tmp_path / "broken"))
    (broken / "model.pt").write_bytes(b"x")
    assert main(["models", "verify", str(broken)]) == 1
    assert "failed its checksum" in capsys.readouterr().out


# --- predictions, labels, covariates -------------------------------------------------------------


def test_report_labels_and_statuses() -> None:
    assert report_label("KRAS") == "KRAS" and report_label("PD-L1") == "PDL1"
    assert report_label("PIK3CA+BRAF") == "PIK3CABRA" and report_label("t-stage") == "TSTAGE"
    with pytest.raises(ValueError, match="no letter or digit"):
        report_label("+-")
    assert make_prediction("KRAS", 0.7, 0.5).status == "mutant"
    assert make_prediction("KRAS", 0.3, 0.5).status == "wild type"
    assert make_prediction("LVI", 0.5, 0.5).status == "positive"
    assert make_prediction("T-stage", 0.1, 0.5).status == "negative"
    named = make_prediction("PIK3CA+BRAF", 0.2, 0.5, "PIK3CA or BRAF")
    assert (named.label, named.display) == ("PIK3CABRA", "PIK3CA or BRAF")  # codes stay short, readers see the name
    assert make_prediction("PIK3CA+BRAF", 0.2, 0.5).display == "PIK3CA+BRAF"  # no name: the package label
    assert make_prediction("KRAS", 0.2, 0.5).name == ""  # the label says it all


def test_patient_level_is_volume_weighted(outputs: dict) -> None:
    result: StudyResult = outputs["m2"].result
    volumes = np.array([lesion.volume_ml for lesion in result.lesions])
    egfr = np.array([result.predictions[lesion.tracking_uid][0].probability for lesion in result.lesions])
    (patient_egfr, _) = patient_predictions(result)
    assert patient_egfr.label == "EGFR"
    assert patient_egfr.probability == pytest.approx(float((volumes * egfr).sum() / volumes.sum()))


def header(**values: str) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"PatientAge": "065Y", "PatientSex": "F"}, Covariates(age=65.0, sex="F")),
        ({"PatientAge": "018M", "PatientSex": "M"}, Covariates(age=1.5, sex="M")),
        ({"PatientAge": "026W"}, Covariates(age=0.5)),
        ({"PatientBirthDate": "19500610", "StudyDate": "20240610", "PatientSex": "O"}, Covariates(age=74.0)),
        ({"PatientBirthDate": "19500611", "StudyDate": "20240610"}, Covariates(age=73.0)),  # completed years
        ({"PatientAge": "", "PatientBirthDate": "19600101", "SeriesDate": "20200101"}, Covariates(age=60.0)),
        ({"PatientBirthDate": "20300101", "StudyDate": "20240101"}, Covariates()),  # born after the study
        ({"PatientBirthDate": "18000101", "StudyDate": "20240101"}, Covariates()),  # 224 years: unknown
        ({}, Covariates()),
    ],
)  # fmt: skip
def test_covariates_from_header(values: dict[str, str], expected: Covariates) -> None:
    covariates = covariates_from_header(header(**values))
    assert covariates.smoking is None
    assert covariates.sex == expected.sex
    assert covariates.age == expected.age


def test_phantom_header_gives_age_and_sex(phantom: PhantomStudy) -> None:
    ds = dcmread(phantom.ct_files[0], stop_before_pixels=True)
    covariates = covariates_from_header(ds)
    assert covariates.sex == ds.PatientSex and covariates.age == int(ds.PatientAge[:3])


def test_empty_segmentation_is_an_input_error(tmp_path: Path, phantom: PhantomStudy, packages: dict) -> None:
    seg = dcmread(phantom.seg_file)
    seg.PixelData = b"\x00" * len(seg.PixelData)
    seg.save_as(tmp_path / "empty.dcm")
    for method in MODEL_METHODS:
        with pytest.raises(InputError, match="empty"):
            PIPELINES[method](phantom.ct_files, tmp_path / "empty.dcm", model=packages[method])
