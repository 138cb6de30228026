"""Evaluation for small cohorts: feature-column choice, repeated CV with a permutation test, M3 metrics,
and the published pattern end to end: a 60-patient KRAS/EGFR feature table -> KRAS comparator by
repeated CV (EGFR never a feature) -> the package runs on a DICOM phantom study through the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.errors import InputError
from inference.training.columns import FeatureColumnError, looks_like_label, select_feature_columns
from inference.training.config import config_from_mapping
from inference.training.crossval import CVPlan, permute_patient_labels, repeated_cv
from inference.training.datasets import read_features_csv
from inference.training.evaluate import hamming_loss, multilabel_f1, weighted_ovr_auc
from tests.kras_cohort import PLANTED, write_kras_cohort

ROOT = Path(__file__).resolve().parents[2]
COMPARATOR_YAML = ROOT / "config" / "radiomics" / "comparator.yaml"

# ---------------------------------------------------------------------------------- feature columns

COLUMNS = ["patient_id", "study_uid", "KRAS", "EGFR", "age", "original_glcm_Contrast", "wavelet-HLL_glszm_ZoneEntropy"]


def test_default_takes_pyradiomics_columns_and_never_another_label() -> None:
    sel = select_feature_columns(COLUMNS, ["KRAS"])
    assert sel.features == ("original_glcm_Contrast", "wavelet-HLL_glszm_ZoneEntropy")
    assert sel.label_like == ("EGFR",)


def test_default_refuses_an_unknown_column_by_name() -> None:
    with pytest.raises(FeatureColumnError, match="scanner_model"):
        select_feature_columns([*COLUMNS, "scanner_model"], ["KRAS"])
    sel = select_feature_columns([*COLUMNS, "scanner_model"], ["KRAS"], ignore_columns=["scanner_model"])
    assert "scanner_model" not in sel.features


def test_explicit_choice_by_prefix_regex_or_names() -> None:
    assert select_feature_columns(COLUMNS, ["KRAS"], feature_prefixes=["wavelet-"]).features == (
        "wavelet-HLL_glszm_ZoneEntropy",
    )
    assert select_feature_columns(COLUMNS, ["KRAS"], feature_regex=r"original_.*").features == (
        "original_glcm_Contrast",
    )
    with pytest.raises(FeatureColumnError, match="EGFR"):
        select_feature_columns(COLUMNS, ["KRAS"], feature_columns=["EGFR", "original_glcm_Contrast"])
    with pytest.raises(FeatureColumnError, match="not a valid regular expression"):
        select_feature_columns(COLUMNS, ["KRAS"], feature_regex="(")
    with pytest.raises(FeatureColumnError, match="lacks the label"):
        select_feature_columns(COLUMNS, ["NRAS"])


@pytest.mark.parametrize(
    ("name", "label_like"),
    [
        ("EGFR", True),
        ("egfr_status", True),
        ("PD-L1", True),
        ("KRASmutation", True),
        ("TP53", True),
        ("response", True),
        ("log-sigma-3-0-mm-3D_firstorder_Entropy", False),
        ("scanner_model", False),
        ("dose_mGy", False),
    ],
)
def test_looks_like_label(name: str, label_like: bool) -> None:
    assert looks_like_label(name) is label_like


def test_config_checks_the_column_keys(tmp_path: Path) -> None:
    from inference.errors import ConfigError

    raw = {
        "method": "radiomics",
        "labels": ["KRAS"],
        "package": {"name": "k", "version": "1", "intended_use": "test"},
        "data": {"features": "f.csv", "feature_prefixes": "original_", "feature_regex": "("},
        "split": {"scheme": "sometimes"},
        "radiomics": {"selection": "boruta"},
    }
    with pytest.raises(ConfigError) as err:
        config_from_mapping(raw, base=tmp_path)
    text = str(err.value)
    for fragment in ("feature_prefixes", "feature_regex", "split.scheme", "radiomics.selection"):
        assert fragment in text


# ------------------------------------------------------------------------ repeated CV, permutations


def _logistic_fit_predict(X: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    def fit_predict(train: np.ndarray, test: np.ndarray, y: np.ndarray) -> np.ndarray:
        model = LogisticRegression(max_iter=500).fit(X[train], y[train, 0])
        return model.predict_proba(X[test])[:, [1]]

    return fit_predict


def _cohort(seed: int, effect: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(15), np.zeros(45)]
    X = rng.normal(size=(60, 5))
    X[:, 0] += effect * y
    return [f"p{i}" for i in range(60)], y[:, None], X


def test_permutation_test_separates_a_planted_signal_from_shuffled_labels() -> None:
    plan = CVPlan(folds=5, repeats=3, permutations=39, seed=1)
    patients, y, X = _cohort(3, 1.5)
    planted = repeated_cv(patients, y, ["KRAS"], _logistic_fit_predict(X), plan)["KRAS"]
    assert planted.pooled.auc_ci[0] > 0.6
    assert planted.permutation_p <= 1 / 40 + 1e-9
    assert len(planted.repeat_aucs) == 3 and len(planted.fold_aucs) == 15
    shuffled_y = y[np.random.default_rng(5).permutation(60)]
    null = repeated_cv(patients, shuffled_y, ["KRAS"], _logistic_fit_predict(X), plan)["KRAS"]
    assert null.pooled.auc_ci[0] < 0.5 < null.pooled.auc_ci[1]
    assert null.permutation_p > 0.1


def test_cv_never_tests_a_patient_it_trained_on() -> None:
    patients = [f"p{i // 2}" for i in range(40)]  # two lesions per patient
    y = np.array([[float((i // 2) % 3 == 0)] for i in range(40)])
    seen: list[tuple[set[str], set[str]]] = []

    def fit_predict(train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> np.ndarray:
        seen.append(({patients[i] for i in train}, {patients[i] for i in test}))
        return np.full((len(test), 1), 0.5)

    repeated_cv(patients, y, ["L"], fit_predict, CVPlan(folds=4, repeats=2, permutations=0))
    assert len(seen) == 8
    assert all(not (a & b) for a, b in seen)


def test_permuted_labels_keep_patients_whole_and_class_counts() -> None:
    patients = ["a", "a", "b", "c", "c", "d"]
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [0, 0], [1, 1]], dtype=float)
    out = permute_patient_labels(patients, y, np.random.default_rng(0))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[3], out[4])
    per_patient = sorted(tuple(out[i]) for i in (0, 2, 3, 5))
    assert per_patient == sorted(tuple(y[i]) for i in (0, 2, 3, 5))


def test_cv_plan_validation() -> None:
    with pytest.raises(ValueError, match="folds"):
        CVPlan(folds=1)
    with pytest.raises(ValueError, match="permutation_repeats"):
        CVPlan(repeats=2, permutation_repeats=3)


# ---------------------------------------------------------------------------------- M3 metrics


def test_multilabel_metrics_agree_with_scikit_learn() -> None:
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.metrics import hamming_loss as sk_hamming

    rng = np.random.default_rng(0)
    y = (rng.random((50, 3)) < [0.5, 0.3, 0.2]).astype(float)
    p = np.clip(0.6 * y + rng.random((50, 3)) * 0.6, 0, 1)
    pred = (p >= 0.5).astype(int)
    for average in ("macro", "micro", "weighted", "samples"):
        assert multilabel_f1(y, p, average=average) == pytest.approx(
            f1_score(y, pred, average=average, zero_division=1 if average == "samples" else 0)
        )
    assert weighted_ovr_auc(y, p) == pytest.approx(roc_auc_score(y, p, average="weighted"))
    assert hamming_loss(y, p) == pytest.approx(sk_hamming(y, pred))


def test_multilabel_metrics_skip_unknown_labels() -> None:
    y = np.array([[1, np.nan], [0, 1], [1, 0], [0, np.nan]])
    p = np.array([[0.9, 0.9], [0.2, 0.8], [0.7, 0.1], [0.4, 0.9]])
    assert hamming_loss(y, p) == 0.0
    assert multilabel_f1(y, p) == 1.0
    assert weighted_ovr_auc(y, p) == 1.0
    with pytest.raises(ValueError, match="average"):
        multilabel_f1(y, p, average="median")


# ------------------------------------------------------------- the published pattern, end to end


def _kras_config(csv_path: Path, **radiomics: object) -> object:
    return config_from_mapping(
        {
            "method": "radiomics",
            "labels": ["KRAS"],
            "package": {"name": "radiomics-kras-60", "version": "1.0.0", "intended_use": "test cohort"},
            "data": {"features": str(csv_path)},
            "radiomics": {"params": str(COMPARATOR_YAML), "cv_folds": 5, "n_trees": 60, **radiomics},
            "split": {"cv_repeats": 2, "permutations": 19},
        }
    )


@pytest.mark.slow
def test_kras_table_trains_by_repeated_cv_and_the_package_runs_on_dicom(tmp_path: Path) -> None:
    from inference.phantom import generate_study
    from inference.pipelines.comparator import run_comparator
    from inference.registry import load_package
    from inference.training.train import train

    csv_path = write_kras_cohort(tmp_path / "kras.csv")
    result = train(_kras_config(csv_path), tmp_path / "pkg")  # 60 patients: scheme auto -> repeated-cv
    assert result.cross_validation is not None and not result.test
    kras = result.cross_validation["KRAS"]
    assert kras.pooled.n == 60 and kras.pooled.positives == 15
    assert kras.pooled.auc_ci[0] > 0.6 and kras.permutation_p <= 0.05
    package = load_package(result.package)
    features = package.input_spec["features"]
    assert "EGFR" not in features and set(features) <= {*PLANTED, *features}
    assert set(PLANTED) & set(features)
    assert package.metrics["KRAS"]["permutation_p"] <= 0.05
    assert json.loads(package.input_spec["radiomics_settings"])["imageType"].keys() >= {"LoG", "Wavelet"}
    report = (result.package / "report" / "report.md").read_text()
    assert "Repeated cross-validation" in report and "fit on all 60 patients" in report and "EGFR" in report
    study = generate_study(tmp_path / "study", seed=5, lesions=2, slices=36, rows=128, columns=128)
    out = run_comparator(study.ct_files, study.seg_file, model=result.package)
    assert len(out.result.lesions) == 2
    predictions = [p for per_lesion in out.result.predictions.values() for p in per_lesion]
    assert {p.label for p in predictions} == {"KRAS"} and len(predictions) == 2
    assert all(0.0 <= p.probability <= 1.0 for p in predictions)


def test_a_csv_trained_package_without_params_is_refused_on_dicom_with_a_reason(tmp_path: Path) -> None:
    from inference.comparator import RadiomicsComparator
    from inference.pipelines.comparator import deployable_params

    cases = read_features_csv(write_kras_cohort(tmp_path / "k.csv"), ["KRAS"])
    comparator = RadiomicsComparator(cv_folds=3, n_trees=10).fit(
        cases.features["tumour"], cases.y[:, 0], cases.feature_names["tumour"]
    )

    class Package:
        name = "csv-only"

        def __init__(self, settings: str) -> None:
            self.input_spec = comparator.input_table(settings)

    with pytest.raises(InputError, match="--params"):
        deployable_params(Package(""), comparator.features)  # type: ignore[arg-type]
    from inference.radiomics.features import DEFAULT_SETTINGS, canonical_settings

    with pytest.raises(InputError, match="do not compute"):
        deployable_params(Package(canonical_settings(DEFAULT_SETTINGS)), comparator.features)  # type: ignore[arg-type]


def test_params_disagreeing_with_the_csv_diagnostics_are_refused(tmp_path: Path) -> None:
    from inference.training.datasets import TrainingDataError
    from inference.training.train import train

    params = tmp_path / "other.yaml"
    params.write_text(COMPARATOR_YAML.read_text().replace("binWidth: 25", "binWidth: 10"))
    with pytest.raises(TrainingDataError, match="binWidth"):
        train(_kras_config(write_kras_cohort(tmp_path / "k.csv"), params=str(params)), tmp_path / "pkg")


# ------------------------------------------------------------------------------------- M5 delta


def test_symmetric_delta_is_continuous_through_a_zero_baseline() -> None:
    from inference.radiomics.delta import feature_delta

    values = [feature_delta("si4", b, 0.05).value for b in (-1e-4, -1e-9, 0.0, 1e-9, 1e-4)]
    assert max(values) - min(values) < 0.05  # no jump
    legacy = [feature_delta("si4", b, 0.05, definition="relative").value for b in (0.0, 2e-6)]
    assert abs(legacy[0] - legacy[1]) > 100  # the old definition jumps from 0.05 to ~25,000
    small = feature_delta("log_z_entropy", 4.0, 4.2)
    assert small.value == pytest.approx(small.relative, rel=0.06)  # ~ the relative change
    assert -2 < feature_delta("ngtdm_contrast", 0.0, 1e6).value < 2
    with pytest.raises(ValueError, match="definition"):
        feature_delta("si4", 0.1, 0.2, definition="log")


def test_response_package_records_its_delta_definition(tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    from inference.response.signature import load_signature, write_signature_package

    rng = np.random.default_rng(0)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(rng.normal(size=(20, 4)), [0, 1] * 10)
    new = write_signature_package(
        tmp_path / "new", forest, name="r", version="1", validation_status="DEMO", training_description="t"
    )
    assert load_signature(new).delta_definition == "symmetric"
    old = write_signature_package(
        tmp_path / "old",
        forest,
        name="r",
        version="1",
        validation_status="DEMO",
        training_description="t",
        delta_definition="relative",
    )
    assert load_signature(old).delta_definition == "relative"
    demo = ROOT / "config" / "models" / "response-demo"
    assert load_signature(demo).delta_definition == "relative"  # trained before: no key, the old definition


# ----------------------------------------------------------------------------- comparator options


def test_comparator_parameter_file_and_embedded_settings_agree() -> None:
    from inference.radiomics.features import COMPARATOR_PARAMS, COMPARATOR_SETTINGS, canonical_settings

    settings = json.loads(canonical_settings(COMPARATOR_PARAMS))
    assert settings == json.loads(canonical_settings(COMPARATOR_SETTINGS))
    assert {"Original", "LoG", "Wavelet"} <= set(settings["imageType"])


def test_rfe_variant_selects_the_planted_features_and_round_trips(tmp_path: Path) -> None:
    from inference.comparator import RadiomicsComparator

    cases = read_features_csv(write_kras_cohort(tmp_path / "k.csv", effect=2.5), ["KRAS"])
    X, y, names = cases.features["tumour"], cases.y[:, 0], cases.feature_names["tumour"]
    model = RadiomicsComparator(selection_method="rfe", rfe_features=2, n_trees=100, max_depth=0).fit(X, y, names)
    assert set(model.features) == set(PLANTED)
    table = model.input_table("{}")
    assert table["selection"]["method"] == "rfe" and table["selection"]["max_depth"] == 0
