"""Issue 18, done when: a features CSV trains a KRAS comparator by repeated CV, and the node runs it.

The 60-patient KRAS / EGFR table of ``tests/unit/kras_cohort.py`` (15 KRAS mutant, EGFR mutant only
among KRAS wild type, pyradiomics-named feature columns with a planted signal in two LoG / wavelet
features) is trained with ``pacs-agent train radiomics`` as a site would (repeated cross-validation,
the scheme chosen automatically below 200 patients, a small permutation test; the comparator's
default parameter file recorded with ``--params``). The package is installed in a real node with
``pacs-agent models install``; a phantom study sent with DCMTK storescu is scored by the comparator
and the SR arrives in Orthanc carrying the package's identity and, per lesion, the probability that
the package's forest gives for the features the node computed with the package's recorded settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_sr.sr.reader import read_predictions
from dicom_sr.sr.text import render_sr_text
from inference.comparator import RadiomicsComparator
from inference.phantom import PhantomStudy
from inference.pipelines.comparator import deployable_params
from inference.pipelines.study import load_study
from inference.radiomics.features import compute_features
from inference.registry import ModelPackage, load_package
from pacs_agent.db.tables import Job
from tests.integration.peers import Node, Orthanc, storescu, wait_for
from tests.kras_cohort import PLANTED, write_kras_cohort

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=21, lesions=2, slices=36, rows=128, columns=128)]

REPO = Path(__file__).resolve().parents[2]
COMPARATOR_PARAMS = REPO / "config" / "radiomics" / "comparator.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPackage, dict[str, object], str]:
    """``pacs-agent train radiomics`` on the 60-patient KRAS / EGFR table: the package, its report, stdout."""
    work = tmp_path_factory.mktemp("kras-csv")
    csv_path = write_kras_cohort(work / "kras_egfr.csv")
    config = work / "train.toml"
    config.write_text(
        'method = "radiomics"\nlabels = ["KRAS"]\n'
        '[package]\nname = "radiomics-kras-site"\nversion = "2.1.0"\nvalidation_status = "RESEARCH"\n'
        'intended_use = "Integration test of a CSV-trained comparator"\n'
        f'[data]\nfeatures = "{csv_path}"\n'
        "[radiomics]\ncv_folds = 5\nn_trees = 60\n"
        "[split]\ncv_repeats = 2\npermutations = 19\n"  # p >= 1/20: the smallest test that can reach 0.05
    )
    out = work / "pkg"
    command = [sys.executable, "-m", "pacs_agent", "train", "radiomics", "--config", str(config), "--out", str(out)]
    run = subprocess.run(
        [*command, "--params", str(COMPARATOR_PARAMS), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    return load_package(out), report, run.stdout


def test_the_csv_trains_by_repeated_cv_without_the_other_label(
    trained: tuple[ModelPackage, dict[str, object], str],
) -> None:
    package, report, _ = trained
    features = list(package.input_spec["features"])
    assert "EGFR" not in features and not any("egfr" in name.lower() for name in features)
    assert set(PLANTED) & set(features)  # the planted LoG / wavelet features were selected
    kras = package.metrics["KRAS"]
    # pooled out-of-fold AUC over 2 x 5-fold CV with its CI, and the permutation p (19 shuffles: >= 0.05)
    assert kras["n"] == 60 and kras["positives"] == 15 and kras["cv_repeats"] == 2, kras
    assert kras["auc_ci"][0] > 0.6, kras
    # p = (1 + shuffles at least as good) / 20: 0.05 only when no shuffled-label run matched the real labels
    assert kras["permutations"] == 19 and kras["permutation_p"] == pytest.approx(0.05), kras
    text = json.dumps(report)
    assert "repeated" in text.lower() and "EGFR" in text  # the report names the scheme and the excluded column


@pytest.fixture
def pacs_node_config(orthanc: Orthanc) -> str:
    return orthanc.destination_toml() + '\n[jobs]\nmethods = ["comparator"]\n[models]\nuse_demo = false\n'


def node_probabilities(package: ModelPackage, study: PhantomStudy) -> list[float]:
    """The package's forest on the features of each lesion, computed with the package's recorded settings."""
    comparator = RadiomicsComparator.from_package(package)
    params = deployable_params(package, comparator.features)
    loaded = load_study(study.ct_files, study.seg_file)
    values = [compute_features(loaded.volume, item.lesion.mask, params=params).features for item in loaded.lesions]
    return sorted(float(p) for p in comparator.predict_proba(values))


def test_the_trained_package_runs_in_the_node_and_its_sr_reaches_orthanc(
    trained: tuple[ModelPackage, dict[str, object], str],
    pacs_and_node: tuple[Orthanc, Node],
    phantom: PhantomStudy,
) -> None:
    package, _, _ = trained
    orthanc, node = pacs_and_node
    node.write_config()
    install = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "models", "install", "--config", str(node.config), str(package.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    node.start("serve")
    sent = storescu(node.port, [*phantom.ct_files, phantom.seg_file])
    assert sent.returncode == 0, sent.stderr

    def comparator_sr() -> list[dict[str, object]]:
        srs = orthanc.instances_with_modality("SR")
        return [sr for sr in srs if "RF" in str(sr.get("SeriesDescription", ""))] or srs

    srs = wait_for(comparator_sr, 600, "the comparator SR to arrive in Orthanc")
    jobs = node.rows(select(Job.method, Job.state, Job.last_error))
    assert [tuple(j) for j in jobs] == [("comparator", "done", None)]
    assert len(srs) == 1
    ds = dcmread(BytesIO(orthanc.file(str(srs[0]["ID"]))))
    assert ds.StudyInstanceUID == phantom.study_instance_uid
    text = render_sr_text(ds)
    for needle in (package.name, package.version, package.weights_sha256, "RESEARCH"):
        assert needle in text, needle
    assert "DEMO" not in text
    predictions = [p for per_lesion in read_predictions(ds).values() for p in per_lesion]
    assert {p.label for p in predictions} == {"KRAS"} and len(predictions) == len(phantom.lesions)
    expected = node_probabilities(package, phantom)
    assert sorted(p.probability for p in predictions) == pytest.approx(expected, abs=1e-4)
    threshold = float(package.thresholds["KRAS"])
    for p in predictions:
        assert p.threshold == pytest.approx(threshold)
        assert p.status == ("mutant" if p.probability >= threshold else "wild type")
