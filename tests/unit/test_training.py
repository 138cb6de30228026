"""Training: patient-level splits, balancing, augmentation, data loading, early stopping, a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from inference.imaging import find_lesions, load_ct_series, load_segmentation
from inference.registry import load_package, verify_package
from inference.training.augment import Augmentation, affine2d, flip_rotate
from inference.training.config import config_from_mapping, load_train_config
from inference.training.datasets import (
    TrainingDataError,
    build_caseset,
    index_studies,
    parse_label,
    read_labels_csv,
)
from inference.training.phantom_data import (
    ATTENUATION_OFFSET_HU,
    PhantomCohortSpec,
    make_phantom_cohort,
)
from inference.training.predict import evaluate_package
from inference.training.splits import assert_patient_disjoint, patient_kfold, patient_split, patient_strata
from inference.training.train import EarlyStopping, epoch_order, train
from pacs_agent.errors import ConfigError, ModelPackageError

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ splits


def _items(seed: int, patients: int = 40):
    """Several items (lesions) per patient, patient-level labels, two labels."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for p in range(patients):
        y = rng.integers(0, 2, 2).astype(float)
        for _ in range(int(rng.integers(1, 5))):
            ids.append(f"P{p:03d}")
            labels.append(y)
    return ids, np.array(labels)


@pytest.mark.parametrize("seed", range(5))
def test_patient_split_never_leaks_a_patient(seed):
    ids, y = _items(seed)
    a, b = patient_split(ids, y, fraction=0.25, seed=seed)
    assert sorted(np.r_[a, b].tolist()) == list(range(len(ids)))
    assert not {ids[i] for i in a} & {ids[i] for i in b}
    assert_patient_disjoint(ids, a, b)
    share = len({ids[i] for i in b}) / len(set(ids))
    assert 0.15 < share < 0.35


@pytest.mark.parametrize("seed", range(3))
def test_patient_kfold_each_patient_tested_once_per_repeat(seed):
    ids, y = _items(seed, patients=50)
    folds = list(patient_kfold(ids, y, k=5, repeats=2, seed=seed))
    assert len(folds) == 10
    for repeat in (0, 1):
        tested = Counter()
        for f in (f for f in folds if f.repeat == repeat):
            assert not {ids[i] for i in f.train} & {ids[i] for i in f.test}
            assert sorted(np.r_[f.train, f.test].tolist()) == list(range(len(ids)))
            tested.update({ids[i] for i in f.test})
        assert set(tested.values()) == {1} and len(tested) == 50
    # the repeats shuffle differently
    assert [f.test.tolist() for f in folds[:5]] != [f.test.tolist() for f in folds[5:]]


def test_stratification_keeps_class_balance():
    ids = [f"P{i}" for i in range(100)]
    y = np.array([1.0] * 20 + [0.0] * 80)
    for f in patient_kfold(ids, y, k=5, seed=1):
        assert y[f.test].sum() == 4  # 20 positives dealt evenly over 5 folds


def test_strata_use_patient_majority_and_missing():
    strata = patient_strata(["a", "a", "a", "b"], np.array([[1, np.nan], [1, np.nan], [0, np.nan], [0, 1]]))
    assert strata == {"a": "1|-", "b": "0|1"}


def test_leak_check_names_no_patient():
    with pytest.raises(ValueError, match="1 patient") as info:
        assert_patient_disjoint(["SECRET-ID", "SECRET-ID", "x"], np.array([0]), np.array([1, 2]))
    assert "SECRET" not in str(info.value)


def test_split_validation():
    with pytest.raises(ValueError, match="fraction"):
        patient_split(["a", "b"], np.array([0, 1]), fraction=1.0)
    with pytest.raises(ValueError, match="k must be"):
        list(patient_kfold(["a", "b"], np.array([0, 1]), k=3))


# --------------------------------------------------------------------------------- balancing, stop


def test_sampler_balances_label_patterns():
    y = np.array([[1.0]] * 10 + [[0.0]] * 90)
    order = epoch_order(y, "sampler", np.random.default_rng(0))
    assert len(order) == 100
    assert 0.35 < y[order, 0].mean() < 0.65  # about half positive instead of 10 %
    assert sorted(epoch_order(y, "none", np.random.default_rng(0)).tolist()) == list(range(100))


def test_median_resampling_oversamples_rare_labels():
    # label counts 40 / 20 / 5 -> median 20: label 3 items drawn 4 x as often, label 1 items not boosted
    y = np.zeros((100, 3))
    y[:40, 0] = 1
    y[40:60, 1] = 1
    y[60:65, 2] = 1
    order = epoch_order(y, "median", np.random.default_rng(0))
    counts = y[order].sum(axis=0)
    assert counts[2] > 10  # 5 items x 4 / 1.2 (total weight 120) ~ 16 draws, not ~5
    assert counts[0] < 40


def test_early_stopping():
    stop = EarlyStopping(patience=2, mode="min", min_delta=0.01)
    assert stop.step(1.0) and not stop.should_stop
    assert stop.step(0.5)
    assert not stop.step(0.495)  # not better by min_delta
    assert not stop.should_stop
    assert not stop.step(0.6)
    assert stop.should_stop and stop.best_epoch == 2 and stop.best == 0.5
    rising = EarlyStopping(patience=1, mode="max", min_epochs=3)
    rising.step(0.7)
    rising.step(0.6)
    assert not rising.should_stop  # min_epochs not reached
    rising.step(0.6)
    assert rising.should_stop


# ------------------------------------------------------------------------------------ augmentation


def test_affine_shift_and_rotation():
    img = np.zeros((21, 21), dtype=np.float32)
    img[10, 10] = 1.0
    shifted = affine2d(img, (3, -2), 0.0, order=0)
    assert np.argwhere(shifted == 1.0).tolist() == [[13, 8]]
    img2 = np.zeros((21, 21), dtype=np.float32)
    img2[10, 15] = 1.0  # 5 px right of the centre
    rotated = affine2d(img2, (0, 0), 90.0, order=0)
    ((r, c),) = np.argwhere(rotated == 1.0).tolist()
    assert (r, c) in ((5, 10), (15, 10))  # a quarter turn about the centre
    assert rotated.sum() == 1.0


def test_flip_rotate_is_lossless_and_augmentation_reproducible():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert sorted(flip_rotate(x, True, False, 1).ravel()) == sorted(x.ravel())
    batch = np.random.default_rng(0).normal(size=(6, 12, 12)).astype(np.float32)
    aug = Augmentation(probability=1.0, translate_px=(2, 4), rotate_deg=(1, 15))
    a = aug.apply(batch, np.random.default_rng(3))
    b = aug.apply(batch, np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.array_equal(a, batch)
    assert np.array_equal(Augmentation().apply(batch, np.random.default_rng(0)), batch)
    views = np.random.default_rng(1).normal(size=(2, 9, 8, 8)).astype(np.float32)
    flipped = Augmentation(probability=1.0, flips=True).apply(views, np.random.default_rng(0))
    assert flipped.shape == views.shape


# ------------------------------------------------------------------------------------------- data


def test_parse_label_and_labels_csv(tmp_path):
    assert parse_label("Mutant") == 1.0 and parse_label("wild type") == 0.0 and math.isnan(parse_label(""))
    with pytest.raises(TrainingDataError, match="not 1/0"):
        parse_label("maybe")
    path = tmp_path / "labels.csv"
    path.write_text("patient_id,study_uid,KRAS,age,sex,smoking,lesion\np1,1.2.3,1,61,F,former,\np2,1.2.4,wt,,m,,2\n")
    records = read_labels_csv(path, ["KRAS"])
    assert records[0].labels == (1.0,) and records[0].age == 61 and records[0].sex == "F" and records[0].smoking
    assert records[1].labels == (0.0,) and records[1].sex == "M" and records[1].lesion == 2 and records[1].age is None
    with pytest.raises(TrainingDataError, match="lacks column"):
        read_labels_csv(path, ["EGFR"])
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,study_uid,KRAS\nSECRET,1.2.3,perhaps\n")
    with pytest.raises(TrainingDataError, match="row 2") as info:
        read_labels_csv(bad, ["KRAS"])
    assert "SECRET" not in str(info.value)


TINY = {"rows": 96, "slices": 28, "pixel_spacing_mm": 3.4, "lesion_scale": 1.2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    spec = PhantomCohortSpec(
        planted={"KRAS": "texture", "EGFR": "attenuation", "OTHER": "rim"}, patients=8, seed=901, lesions=1, **TINY
    )
    return make_phantom_cohort(tmp_path_factory.mktemp("cohort"), spec)


def test_phantom_cohort_plants_balanced_independent_labels(cohort):
    truth = cohort.truth
    for label in ("KRAS", "EGFR", "OTHER"):
        assert sum(t["labels"][label] for t in truth) == 4
    assert len({tuple(t["labels"].values()) for t in truth}) > 2  # not all equal: independent assignments
    with cohort.labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["KRAS"] for r in rows] == [str(t["labels"]["KRAS"]) for t in truth]
    assert "PHANTOM" in rows[0]["patient_id"] and rows[0]["age"]
    assert "lesion attenuation -60 HU" in cohort.spec.describe()


def test_planted_attenuation_is_in_the_ct(cohort):
    studies = index_studies(cohort.studies_dir)
    assert len(studies) == 8
    assert {s.segmentation_kind for s in studies.values()} == {"seg", "rtstruct"}  # alternating
    means = {}
    for t in cohort.truth:
        files = studies[t["study_uid"]]
        volume = load_ct_series(files.ct_files)
        masks = load_segmentation(files.segmentation, volume)
        lesion = find_lesions(next(m for m in masks if m.ok), volume)[0]
        plane_cross = np.zeros((3, 3, 3), dtype=bool)
        plane_cross[1] = ndimage.generate_binary_structure(2, 1)
        inner = ndimage.binary_erosion(lesion.mask, structure=plane_cross)  # without the rim
        assert inner.sum() > 5
        means[t["patient_id"]] = (t["properties"]["attenuation"], float(volume.array[inner].mean()))
    low = [m for a, m in means.values() if a == 1]
    high = [m for a, m in means.values() if a == 0]
    # lesions have 40-60 HU planted; -60 HU moves them clearly below every unmodified lesion
    assert max(low) < min(high) - 20
    assert np.mean(high) - np.mean(low) == pytest.approx(-ATTENUATION_OFFSET_HU, abs=15)


def test_cohort_folder_is_reused_or_refused(cohort, tmp_path):
    again = make_phantom_cohort(cohort.studies_dir.parent, cohort.spec)
    assert again.truth == cohort.truth
    other = PhantomCohortSpec(planted={"KRAS": "texture"}, patients=8, seed=902, **TINY)
    with pytest.raises(ValueError, match="different phantom cohort"):
        make_phantom_cohort(cohort.studies_dir.parent, other)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        make_phantom_cohort(tmp_path, other)


def test_caseset_inputs_and_subset(cohort):
    cases = build_caseset("m3", ["KRAS", "EGFR"], cohort.studies_dir, cohort.labels_csv, input_spec={"shape": [32, 32]})
    assert len(cases) == 8 and cases.y.shape == (8, 2)
    assert cases.arrays["slices"].shape[1:] == (32, 32) and cases.slice_owner is not None
    assert cases.arrays["slices"].min() >= 0 and cases.arrays["slices"].max() <= 255
    sub = cases.subset([5, 2])
    assert [c.patient_id for c in sub.cases] == [cases.cases[5].patient_id, cases.cases[2].patient_id]
    assert np.array_equal(
        sub.arrays["slices"],
        np.concatenate(
            [cases.arrays["slices"][cases.slice_owner == 5], cases.arrays["slices"][cases.slice_owner == 2]]
        ),
    )
    assert cases.cases[0].covariates.age is not None  # from the labels CSV


# ----------------------------------------------------------------------------------------- config


def _tiny_config(cohort, **training):
    return {
        "method": "m1",
        "labels": ["KRAS"],
        "seed": 3,
        "package": {
            "name": "m1-tiny-test",
            "version": "0.0.1",
            "validation_status": "DEMO",
            "intended_use": "unit test - NOT FOR CLINICAL USE",
        },
        "data": {"studies": str(cohort.studies_dir), "labels": str(cohort.labels_csv)},
        "input": {"shape": [16, 16], "margin_px": 2},
        "architecture": {"width": 0.1, "blocks": 1, "convs_per_block": 1},
        "training": {"epochs": 3, "batch_size": 4, "patience": 5, "augment": {"probability": 0.5}, **training},
        "split": {"scheme": "holdout", "test_fraction": 0.25, "val_fraction": 0.34},
    }


def test_config_validation_lists_every_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        'method = "m1"\nlabels = ["KRAS", "EGFR"]\ncolour = 1\n[package]\nname = "x"\n'
        '[training]\noptimizer = "rmsprop"\n[architecture]\nwdith = 1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_train_config(path, "m1")
    text = str(info.value)
    for expected in ("exactly one label", "colour", "package.version", "optimizer", "wdith", "data:"):
        assert expected in text
    with pytest.raises(ConfigError, match="the file says"):
        load_train_config(path, "m2")


def test_demo_configs_are_valid():
    configs = sorted((ROOT / "config" / "training").glob("*-demo.toml"))
    assert {load_train_config(c).method for c in configs} == {"m1", "m2", "m3", "m4", "radiomics"}
    for c in configs:
        config = load_train_config(c)
        assert config.package["validation_status"] == "DEMO"
        assert "NOT FOR CLINICAL USE" in config.package["intended_use"]
        assert config.data.phantom is not None


# ------------------------------------------------------------------------------------- training run


def test_tiny_training_run_writes_a_valid_package_and_report(cohort, tmp_path):
    config = config_from_mapping(_tiny_config(cohort))
    stages = []
    result = train(config, tmp_path / "pkg", progress=lambda s, d, t, n="": stages.append(s))
    assert verify_package(result.package) == []
    package = load_package(result.package)
    assert package.validation_status == "DEMO" and package.method == "m1" and package.labels == ("KRAS",)
    assert 0.0 <= package.thresholds["KRAS"] <= 1.0
    assert set(package.normalisation) == {"mean", "std"} and package.normalisation["std"] > 0
    data = package.training_data
    assert data["train_patients"] + data["validation_patients"] + data["test_patients"] == 8
    assert package.input_spec["shape"] == [16, 16]
    report = json.loads((result.package / "report" / "report.json").read_text())
    assert report["test"][0]["label"] == "KRAS" and len(report["history"]) == 3
    assert (result.package / "report" / "report.md").read_text().count("| KRAS |") == 2
    assert (result.package / "report" / "roc-test.png").stat().st_size > 1000
    assert "epochs" in stages and "loading" in stages
    assert "PHANTOM-" not in (result.package / "report" / "report.md").read_text()  # no patient ids in reports
    # the package predicts through the same inference path
    _, p, evaluations = evaluate_package(result.package, cohort.studies_dir, cohort.labels_csv)
    assert p.shape == (8, 1) and np.all((p >= 0) & (p <= 1))
    assert evaluations[0].n == 8
    with pytest.raises(ModelPackageError, match="already holds"):
        train(config, result.package)


def test_training_normalisation_comes_from_the_training_split(cohort, tmp_path):
    from inference.training.train import _NetworkFit

    config = config_from_mapping(_tiny_config(cohort))
    cases = build_caseset("m1", ["KRAS"], cohort.studies_dir, cohort.labels_csv, input_spec={"shape": [16, 16]})
    norm = _NetworkFit(config, lambda *a: None)._normalisation(cases.subset([0, 1, 2]))
    images = cases.arrays["image"][:3].astype(np.float64)
    assert norm["mean"] == pytest.approx(images.mean()) and norm["std"] == pytest.approx(images.std())


def test_early_stopping_stops_a_run(cohort, tmp_path):
    # nothing counts as an improvement after the first epoch: training stops after 1 + patience epochs
    config = config_from_mapping(_tiny_config(cohort, epochs=8, patience=2, min_delta=1e9))
    result = train(config, tmp_path / "pkg")
    report = json.loads((result.package / "report" / "report.json").read_text())
    assert len(report["history"]) == 3
    assert "best epoch 1" in (result.package / "report" / "report.md").read_text()


def test_single_class_label_is_refused(cohort, tmp_path):
    labels = tmp_path / "labels.csv"
    with cohort.labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=rows[0].keys())
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "KRAS": "1"})
    raw = _tiny_config(cohort)
    raw["data"]["labels"] = str(labels)
    with pytest.raises(TrainingDataError, match="single class"):
        train(config_from_mapping(raw), tmp_path / "pkg")


def test_index_studies_skips_non_dicom_and_unpaired(tmp_path, cohort):
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert index_studies(tmp_path) == {}
    one = next(iter(index_studies(cohort.studies_dir).values()))
    ds = pydicom.dcmread(one.ct_files[0], stop_before_pixels=True)
    assert ds.Modality == "CT"


def test_cli_train_reports_configuration_problems(tmp_path, capsys):
    from pacs_agent.cli import main

    config = tmp_path / "train.toml"
    config.write_text('method = "m2"\nlabels = ["EGFR"]\n[package]\nname = "x"\nversion = "1"\nintended_use = "t"\n')
    assert main(["train", "m1", "--config", str(config), "--out", str(tmp_path / "pkg")]) == 1
    err = capsys.readouterr().err
    assert "the file says 'm2'" in err and "data:" in err
    assert not (tmp_path / "pkg").exists()
    with pytest.raises(SystemExit) as info:
        main(["train", "m9", "--config", str(config), "--out", str(tmp_path / "pkg")])
    assert info.value.code == 2


def test_cli_train_writes_a_package(cohort, tmp_path, capsys):
    from pacs_agent.cli import main

    config = tmp_path / "train.toml"
    raw = _tiny_config(cohort, epochs=1)
    lines = [
        'method = "m1"',
        'labels = ["KRAS"]',
        "[package]",
        *(f'{k} = "{v}"' for k, v in raw["package"].items()),
        "[data]",
        f'studies = "{cohort.studies_dir}"',
        f'labels = "{cohort.labels_csv}"',
        "[input]",
        "shape = [16, 16]",
        "[architecture]",
        "width = 0.1",
        "blocks = 1",
        "[training]",
        "epochs = 1",
        "batch_size = 4",
        "[split]",
        'scheme = "holdout"',
        "test_fraction = 0.25",
        "val_fraction = 0.34",
    ]
    config.write_text("\n".join(lines) + "\n")
    assert main(["train", "m1", "--config", str(config), "--out", str(tmp_path / "pkg"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "KRAS: test AUC" in out and "report:" in out
    assert verify_package(tmp_path / "pkg") == []
