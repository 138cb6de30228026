"""The committed demo packages: verify, load, say DEMO, and still learn the planted labels on fresh phantoms.

A fresh held-out cohort (a seed no demo package was trained on, smaller volumes count) is generated
here; each package reads it through its own ``[input]`` settings and the same wrappers inference
uses. AUC >= 0.95 for every label shows that training and inference agree end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.registry import ModelPackage, load_package, verify_package
from inference.training.config import load_train_config
from inference.training.phantom_data import PhantomCohort, PhantomCohortSpec, make_phantom_cohort
from inference.training.predict import evaluate_package

ROOT = Path(__file__).parents[2]
MODELS = ROOT / "config" / "models"
CONFIGS = ROOT / "config" / "training"
DEMO_CONFIGS = sorted(CONFIGS.glob("*-demo.toml"))
PACKAGES = [load_train_config(c).package["name"] for c in DEMO_CONFIGS]
"""The packages ``make demo-models`` trains (config/models may hold other methods' demo packages too)."""
FRESH_SEED = 4242
MIN_AUC = 0.95


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fresh_cohort(tmp_path_factory):
    """Per planted-label spec a new cohort: 16 phantom patients (2 lesions each) on a seed no package saw."""
    made: dict[str, PhantomCohort] = {}

    def cohort_for(package: ModelPackage) -> PhantomCohort:
        recorded = dict(package.training_data["phantom"])
        spec = PhantomCohortSpec.from_mapping({**recorded, "patients": 16, "seed": FRESH_SEED})
        key = repr(spec.as_dict())
        if key not in made:
            made[key] = make_phantom_cohort(tmp_path_factory.mktemp("fresh"), spec)
        return made[key]

    return cohort_for


def test_every_method_has_a_demo_package_and_they_fit_in_a_commit():
    methods = {load_package(MODELS / name).method for name in PACKAGES}
    assert methods == {"m1", "m2", "m3", "m4", "radiomics"}
    size = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())  # every committed demo package
    assert size < 25e6, f"demo packages take {size / 1e6:.1f} MB"


def test_demo_packages_were_trained_on_other_seeds():
    for name in PACKAGES:
        phantom = load_package(MODELS / name).training_data["phantom"]
        assert phantom["seed"] != FRESH_SEED


@pytest.mark.parametrize("name", PACKAGES)
def test_demo_package_verifies_says_demo_and_learns_the_planted_labels(name, fresh_cohort):
    path = MODELS / name
    assert verify_package(path) == []
    package = load_package(path)
    assert package.validation_status == "DEMO"
    assert package.algorithm_info().is_demo
    assert "NOT FOR CLINICAL USE" in package.intended_use
    assert "synthetic phantom" in package.training_data["description"]
    for label in package.labels:
        assert package.metrics[label]["auc"] >= MIN_AUC, f"{name} {label}: recorded held-out AUC"
    cohort = fresh_cohort(package)
    cases, probabilities, evaluations = evaluate_package(path, cohort.studies_dir, cohort.labels_csv)
    assert len(cases) == 32 and probabilities.shape == (32, len(package.labels))
    for ev in evaluations:
        assert ev.positives == 16
        assert ev.auc >= MIN_AUC, f"{name} {ev.label}: AUC {ev.auc:.3f} on fresh phantoms"


@pytest.mark.parametrize("name", [n for n in PACKAGES if not n.startswith("radiomics")])
def test_worker_pipeline_gives_the_probabilities_training_evaluated(name, fresh_cohort):
    """The worker's method pipeline and the training evaluation agree on a study, lesion by lesion."""
    from inference.pipelines import PIPELINES
    from inference.training.datasets import index_studies
    from inference.training.predict import Predictor, caseset_for_package

    package = load_package(MODELS / name)
    cohort = fresh_cohort(package)
    uid = cohort.truth[0]["study_uid"]
    cases = caseset_for_package(package, cohort.studies_dir, cohort.labels_csv)
    mine = Predictor.from_package(package).predict(
        cases.subset([i for i, c in enumerate(cases.cases) if c.study_uid == uid])
    )
    files = index_studies(cohort.studies_dir)[uid]
    run = PIPELINES[package.method]
    result = run(files.ct_files, files.segmentation, model=package, explain=False).result
    theirs = [[p.probability for p in result.predictions[lesion.tracking_uid]] for lesion in result.lesions]
    assert np.allclose(mine, theirs, atol=1e-6)
