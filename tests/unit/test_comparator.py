"""Radiomics comparator: univariate filter, LASSO with CV, random forest, RadScore, explanations, packages."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pytest

from inference.comparator import (
    RadiomicsComparator,
    RadScore,
    fit_radscore,
    radiomics_params,
    univariate_p_values,
)
from inference.registry import TRUSTED_SKOPS_TYPES, load_package, verify_package
from inference.training.config import config_from_mapping
from inference.training.datasets import read_features_csv
from inference.training.evaluate import roc_auc
from inference.training.predict import Predictor
from inference.training.splits import patient_split
from inference.training.train import train
from pacs_agent.errors import ModelPackageError


def synthetic(n_patients: int = 80, lesions: int = 2, seed: int = 0):
    """3 informative features (two strong, one weak) and 9 noise features; several lesions per patient."""
    rng = np.random.default_rng(seed)
    names = [f"original_firstorder_F{i}" for i in range(12)]
    X, y, groups = [], [], []
    for p in range(n_patients):
        label = p % 2
        for _ in range(lesions):
            row = rng.normal(0, 1, 12)
            row[0] += 2.5 * label
            row[1] -= 2.0 * label
            row[2] += 0.5 * label
            row[3] = 5.0  # constant
            X.append(row)
            y.append(label)
            groups.append(f"P{p}")
    return np.array(X), np.array(y), names, groups


def test_univariate_filter():
    X, y, _, _ = synthetic()
    p = univariate_p_values(X, y)
    assert p[0] < 1e-10 and p[1] < 1e-10
    assert p[3] == 1.0  # constant column
    assert (p[4:] > 1e-3).all()
    t = univariate_p_values(X, y, test="ttest")
    assert t[0] < 1e-10 and t[3] == 1.0
    with pytest.raises(ValueError, match="mannwhitney"):
        univariate_p_values(X, y, test="anova")  # type: ignore[arg-type]


def test_lasso_selects_the_informative_features():
    X, y, names, groups = synthetic()
    sel = fit_radscore(X, y, names, groups=groups, seed=0)
    assert set(sel.filtered) >= {names[0], names[1]}
    assert {names[0], names[1]} <= set(sel.selected)
    assert names[3] not in sel.filtered
    assert len(sel.selected) <= 5
    assert sel.cv_auc > 0.9
    rs = sel.radscore
    i0, i1 = rs.features.index(names[0]), rs.features.index(names[1])
    assert rs.coefficients[i0] > 0 > rs.coefficients[i1]
    scores = rs.score_matrix(X, names)
    assert roc_auc(y, scores) > 0.95
    row = dict(zip(names, X[7], strict=True))
    assert rs.score(row) == pytest.approx(scores[7])
    assert RadScore.from_table(rs.as_table()) == rs


def test_fallback_when_nothing_passes_the_filter():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 4))
    y = np.array([0, 1] * 20)
    sel = fit_radscore(X, y, ["a", "b", "c", "d"], p_value=1e-12)
    assert "no feature reached" in sel.fallback
    assert len(sel.filtered) == 1 and len(sel.selected) == 1


def test_comparator_predicts_and_explains():
    X, y, names, groups = synthetic(seed=2)
    model = RadiomicsComparator(seed=0).fit(X, y, names, groups=groups)
    assert model.forest is not None and model.forest.n_estimators == 200 and model.forest.max_depth == 4
    Xt, yt, _, _ = synthetic(n_patients=40, seed=3)
    p = model.predict_proba(Xt, names)
    assert p.shape == (80,) and roc_auc(yt, p) > 0.95
    rows = [dict(zip(names, r, strict=True)) for r in Xt[:3]]
    assert np.allclose(model.predict_proba(rows), p[:3])
    contributions = model.contributions(rows[0])
    assert [c.name for c in contributions] and {c.name for c in contributions} == set(model.features)
    assert abs(contributions[0].contribution) >= abs(contributions[-1].contribution)
    assert sum(c.importance for c in contributions) == pytest.approx(1.0)
    c0 = contributions[0]
    assert c0.contribution == pytest.approx(c0.coefficient * c0.z)
    with pytest.raises(KeyError, match="missing"):
        model.predict_proba([{"original_firstorder_F0": 1.0}])
    with pytest.raises(RuntimeError, match="not fitted"):
        RadiomicsComparator().predict_proba(Xt, names)


def _write_features_csv(path, X, y, names, groups):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "study_uid", "lesion", "KRAS", *names])
        for i, (row, label, group) in enumerate(zip(X, y, groups, strict=True)):
            writer.writerow([group, f"1.2.{group[1:]}", i % 2 + 1, label, *row])


def test_train_from_features_csv_writes_a_skops_package(tmp_path):
    X, y, names, groups = synthetic(n_patients=60, seed=4)
    features = tmp_path / "features.csv"
    _write_features_csv(features, X, y, names, groups)
    cases = read_features_csv(features, ["KRAS"])
    assert len(cases) == 120 and cases.feature_names["tumour"] == tuple(names)
    config = config_from_mapping(
        {
            "method": "radiomics",
            "labels": ["KRAS"],
            "package": {"name": "rad-test", "version": "1", "validation_status": "RESEARCH", "intended_use": "test"},
            "data": {"features": str(features)},
            "split": {"scheme": "holdout", "test_fraction": 0.25, "cv_folds": 3},
        }
    )
    result = train(config, tmp_path / "pkg")
    assert result.test[0].auc > 0.9
    assert verify_package(result.package) == []
    package = load_package(result.package)
    assert package.method == "radiomics" and package.labels == ("KRAS",)
    assert package.metrics["KRAS"]["cv_folds"] == 3
    classifier = result.package / "classifier.skops"
    assert zipfile.is_zipfile(classifier)  # skops format, not a pickle
    import skops.io as sio

    assert set(sio.get_untrusted_types(file=classifier)) <= set(TRUSTED_SKOPS_TYPES)
    comparator = RadiomicsComparator.from_package(package)
    assert comparator.features == tuple(package.input_spec["features"])
    # the loaded package reproduces the held-out AUC that training reported
    _, test_idx = patient_split(cases.patients, cases.y, fraction=0.25, seed=config.seed)
    p = Predictor.from_package(package).predict(cases.subset(test_idx))[:, 0]
    assert roc_auc(cases.y[test_idx, 0], p) == pytest.approx(package.metrics["KRAS"]["auc"], abs=1e-4)
    assert comparator.contributions(dict(zip(names, X[0], strict=True)))
    # tampering with the forest is caught
    data = bytearray(classifier.read_bytes())
    data[-30] ^= 0xFF
    classifier.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="checksum"):
        load_package(result.package)


def test_radiomics_settings_round_trip(tmp_path):
    from inference.imaging import find_lesions, load_ct_series, load_segmentation
    from inference.phantom import generate_study
    from inference.radiomics.features import compute_features

    study = generate_study(
        tmp_path / "s", seed=5, lesions=1, rows=96, columns=96, slices=24, pixel_spacing_mm=3.4, segmentation="seg"
    )
    volume = load_ct_series(list(study.ct_files))
    lesion = find_lesions(load_segmentation(study.seg_file, volume)[0], volume)[0]
    default = compute_features(volume, lesion.mask)
    again = compute_features(volume, lesion.mask, params=radiomics_params(default.provenance["settings"]))
    assert again.provenance["parameter_hash"] == default.provenance["parameter_hash"]
    assert again.features == default.features
    with pytest.raises(ValueError, match="setting"):
        radiomics_params('{"setting": {}}')
