"""M5 quality tiers (Dercle 2020: high-quality vs standard CT, signature recalibrated per tier).

The tier of a pair is decided from the CTs' acquisition attributes by the package's rule; training
fits the forest on the reference tier and a recalibration per tier; the node scores a pair with its
tier's calibration and says so in the SR and the SC; packages without tiers keep working.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_sr.codes import QUALITY_TIER
from dicom_sr.sc.response import _score_lines, build_response_capture
from dicom_sr.sr.response import build_response_report
from inference.errors import ModelPackageError
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.pipelines.response import run_response
from inference.radiomics.delta import FEATURE_NAMES, FeatureDeltas, feature_delta
from inference.registry import load_package, verify_package
from inference.response.quality import (
    HIGH,
    STANDARD,
    Acquisition,
    QualityTier,
    TierRule,
    TierRuleError,
    decide_tier,
)
from inference.response.signature import (
    CSV_COLUMNS,
    TierCalibration,
    TrainingDataError,
    load_signature,
    train_tiered_signature,
    write_signature_package,
)
from pacs_agent.cli import main
from tests.unit.response_helpers import DEMO_PACKAGE, evidence, find_key_image

GOOD = Acquisition(slice_thickness_mm=2.5, kernel="B30f", contrast=True)


# --- the tier rule ------------------------------------------------------------------------------------


def test_two_soft_kernel_thin_slice_contrast_ct_are_high_quality() -> None:
    tier = decide_tier(GOOD, Acquisition(3.0, "b30f", True))
    assert tier == QualityTier(HIGH, ())
    assert "every criterion" in tier.describe()


@pytest.mark.parametrize(
    ("follow_up", "reason"),
    [
        (Acquisition(7.5, "B30f", True), "follow-up slice thickness 7.5 mm > 5 mm"),
        (Acquisition(2.5, "LUNG", True), "follow-up reconstruction kernel 'LUNG' is a sharp kernel"),
        (Acquisition(2.5, "B70f", True), "sharp kernel"),
        (Acquisition(2.5, "FC52", True), "sharp kernel"),
        (Acquisition(2.5, "STANDARD", True), "kernels differ ('B30f' vs 'STANDARD')"),
        (Acquisition(2.5, "B30f", False), "follow-up without contrast"),
        (Acquisition(None, "B30f", True), "follow-up slice thickness unknown"),
        (Acquisition(2.5, "", True), "follow-up reconstruction kernel not recorded"),
        (Acquisition(2.5, "B30f", None), "follow-up contrast not recorded"),
        (Acquisition(4.0, "B30f", True), "slice thickness differs by 1.5 mm"),
    ],
)
def test_each_failed_criterion_makes_the_pair_standard_and_names_itself(follow_up: Acquisition, reason: str) -> None:
    tier = decide_tier(GOOD, follow_up)
    assert tier.tier == STANDARD
    assert any(reason in r for r in tier.reasons), tier.reasons
    assert reason in tier.describe() or any(reason in r for r in tier.reasons)


def test_the_rule_is_configurable() -> None:
    thick = Acquisition(7.5, "B30f", True)
    assert decide_tier(thick, thick).tier == STANDARD
    assert decide_tier(thick, thick, TierRule(max_slice_thickness_mm=8.0)).tier == HIGH
    unknown = Acquisition(None, "", None)
    assert decide_tier(unknown, unknown).tier == STANDARD
    assert decide_tier(unknown, unknown, TierRule(missing="ignore")).tier == HIGH
    assert decide_tier(GOOD, Acquisition(2.5, "B30f", False), TierRule(require_contrast=False)).tier == HIGH
    lung = Acquisition(2.5, "LUNG", True)
    assert decide_tier(lung, lung, TierRule(sharp_kernel_pattern="^$never")).tier == HIGH


def test_bad_rules_are_refused_by_key() -> None:
    with pytest.raises(TierRuleError, match=r"unknown key.*max_thickness"):
        TierRule.from_table({"max_thickness": 3})
    with pytest.raises(TierRuleError, match="max_slice_thickness_mm must be a number"):
        TierRule.from_table({"max_slice_thickness_mm": "thin"})
    with pytest.raises(TierRuleError, match="sharp_kernel_pattern is not a valid regular expression"):
        TierRule(sharp_kernel_pattern="(")
    with pytest.raises(TierRuleError, match='missing must be "standard" or "ignore"'):
        TierRule(missing="high")
    with pytest.raises(TierRuleError, match="require_contrast must be true or false"):
        TierRule.from_table({"require_contrast": "yes"})
    assert TierRule.from_table({"max_slice_thickness_mm": 3}) == TierRule(max_slice_thickness_mm=3.0)


def test_acquisition_is_read_from_the_ct_headers() -> None:
    ds = Dataset()
    ds.SliceThickness = "1.25"
    ds.ConvolutionKernel = ["I30f", "3"]
    ds.ContrastBolusAgent = "IOPAMIDOL"
    assert Acquisition.from_headers([ds]) == Acquisition(1.25, "I30f\\3", True)
    bare = Dataset()
    bare.ContrastBolusAgent = ""
    assert Acquisition.from_headers([bare], slice_spacing_mm=5.0) == Acquisition(5.0, "", False)
    assert Acquisition.from_headers([]) == Acquisition(None, "", None)


# --- training and scoring -----------------------------------------------------------------------------


def cohort(n_per_tier: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Deltas whose distribution differs between tiers, as the paper's HQ and SD features did.

    Standard-quality CT: every delta 0.3 lower (and noisier) than high-quality CT for the same label,
    so a forest developed on high-quality CT calls most standard-quality patients sensitive.
    """
    rng = np.random.default_rng(seed)
    xs, ys, tiers = [], [], []
    for tier, offset, sd in ((HIGH, 0.0, 0.08), (STANDARD, -0.3, 0.12)):
        for i in range(n_per_tier):
            label = i % 2
            centre = (0.05 if label else -0.35) + offset
            xs.append([0.0, *rng.normal(centre, sd, 3)])
            ys.append(label)
            tiers.append(tier)
    return np.asarray(xs), np.asarray(ys), tiers


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def test_per_tier_recalibration_corrects_the_standard_tier_on_new_patients() -> None:
    x, y, tiers = cohort(40, seed=1)
    forest, report, calibration = train_tiered_signature(x, y, tiers, n_estimators=100)
    assert report.patients == 40  # the forest saw the high-quality patients only (the paper's reference)
    assert calibration.counts == {HIGH: (40, 20), STANDARD: (40, 20)}
    x_new, y_new, tiers_new = cohort(40, seed=2)
    standard = np.asarray(tiers_new) == STANDARD
    raw = forest.predict_proba(x_new[standard])[:, 1]
    recalibrated = calibration.calibrate(raw, STANDARD)
    # the forest alone calls most insensitive standard-tier patients sensitive ...
    assert np.mean(raw[y_new[standard] == 1] > 0.5) < 0.5
    # ... its standard-tier recalibration classifies the tier's new patients better and is better calibrated
    accuracy_raw = np.mean((raw > 0.5) == y_new[standard])
    accuracy = np.mean((recalibrated > 0.5) == y_new[standard])
    assert accuracy > accuracy_raw + 0.15, (accuracy_raw, accuracy)
    assert brier(recalibrated, y_new[standard]) < brier(raw, y_new[standard]) / 2
    # the high tier's map stays close to the forest on the tier it was trained on
    high = ~standard
    raw_high = forest.predict_proba(x_new[high])[:, 1]
    assert np.mean((calibration.calibrate(raw_high, HIGH) > 0.5) == y_new[high]) >= 0.9


def test_a_tier_without_both_classes_cannot_be_calibrated() -> None:
    x, y, tiers = cohort(20, seed=3)
    tiers = [HIGH if (t == STANDARD and label == 1) else t for t, label in zip(tiers, y, strict=True)]
    with pytest.raises(TrainingDataError, match="quality tier 'standard' has 0 insensitive"):
        train_tiered_signature(x, y, tiers, n_estimators=20)
    with pytest.raises(TrainingDataError, match="unknown quality tier"):
        train_tiered_signature(x, y, ["hq"] * len(y), n_estimators=20)


@pytest.fixture(scope="module")
def tiered_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y, tiers = cohort(30, seed=4)
    rule = TierRule(max_slice_thickness_mm=3.0)
    forest, report, calibration = train_tiered_signature(x, y, tiers, rule=rule, n_estimators=60)
    return write_signature_package(
        tmp_path_factory.mktemp("tiers") / "pkg",
        forest,
        name="response-tiered",
        version="1.2.0",
        validation_status="DEMO",
        training_description="synthetic deltas of two quality tiers",
        metrics=report.as_metrics(),
        tiers=calibration,
    )


def deltas(value: float) -> FeatureDeltas:
    return FeatureDeltas(tuple(feature_delta(n, 1.0, 1.0 + value) for n in FEATURE_NAMES))


def test_tiered_package_round_trip_scores_with_the_tier_calibration(tiered_package: Path) -> None:
    assert verify_package(tiered_package) == []
    signature = load_signature(tiered_package)
    assert signature.tiers is not None and signature.tiers.rule == TierRule(max_slice_thickness_mm=3.0)
    assert signature.tiers.reference == HIGH
    change = deltas(-0.25)
    raw = float(signature.probability(np.asarray([change.vector()]))[0])
    for tier in (HIGH, STANDARD):
        quality = QualityTier(tier, () if tier == HIGH else ("baseline slice thickness 5 mm > 3 mm",))
        score = signature.score(change, quality)
        assert score.tier == tier and score.uncalibrated_probability == pytest.approx(raw)
        assert score.probability == pytest.approx(float(signature.tiers.calibrate(np.asarray([raw]), tier)[0]))
        assert score.high_risk == (score.probability > score.threshold)
        assert quality.describe() == score.tier_reason
    # a change that is "sensitive" on high-quality CT is "insensitive" on standard CT (lower deltas there)
    assert (
        signature.score(change, QualityTier(STANDARD)).probability
        > signature.score(change, QualityTier(HIGH)).probability
    )
    with pytest.raises(ValueError, match="the pair's tier is needed"):
        signature.score(change)


def test_packages_without_tiers_keep_scoring_as_before() -> None:
    signature = load_signature(DEMO_PACKAGE)
    assert signature.tiers is None
    change = deltas(-0.3)
    plain = signature.score(change)
    with_tier = signature.score(change, QualityTier(STANDARD, ("x",)))
    assert plain == with_tier and plain.tier is None and plain.uncalibrated_probability is None


def test_a_package_with_a_broken_tier_table_is_refused(tiered_package: Path, tmp_path: Path) -> None:
    table = load_package(tiered_package).input_spec["quality_tiers"]
    broken = {k: v for k, v in table.items() if k != STANDARD}
    with pytest.raises(ModelPackageError, match=r"\[input.quality_tiers.standard\] is missing"):
        TierCalibration.from_table(broken, "pkg")
    with pytest.raises(ModelPackageError, match="unknown key"):
        TierCalibration.from_table({**table, "rule": {"thickness": 1}}, "pkg")
    with pytest.raises(ModelPackageError, match="reference must be one of"):
        TierCalibration.from_table({**table, "reference": "hq"}, "pkg")


# --- pacs-agent train response --tiers ----------------------------------------------------------------


def write_tiered_csv(path: Path, *, tier_column: bool = True) -> Path:
    x, y, tiers = cohort(40, seed=5)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, "label", *(["tier"] if tier_column else [])])
        for row, label, tier in zip(x, y, tiers, strict=True):
            writer.writerow([*(f"{v:.5f}" for v in row), label, *([tier] if tier_column else [])])
    return path


def test_train_response_with_tiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_tiered_csv(tmp_path / "deltas.csv")
    rule = tmp_path / "rule.toml"
    rule.write_text('max_slice_thickness_mm = 2.0\nsharp_kernel_pattern = "LUNG|BONE"\n')
    out = tmp_path / "pkg"
    argv = ["train", "response", "--csv", str(data), "--out", str(out), "--tiers", "--tier-rule", str(rule)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "INSENSITIVE high: held-out AUC" in printed and "INSENSITIVE standard: held-out AUC" in printed
    signature = load_signature(out)
    assert signature.tiers is not None
    assert signature.tiers.rule == TierRule(max_slice_thickness_mm=2.0, sharp_kernel_pattern="LUNG|BONE")
    package = load_package(out)
    assert "forest trained on the high tier" in package.training_data["description"]
    assert {"test_high", "test_standard"} <= set(package.metrics)
    report = json.loads((out / "report" / "report.json").read_text())
    labels = [entry["label"] for entry in report["test"]]
    assert labels == ["INSENSITIVE", "INSENSITIVE high", "INSENSITIVE standard"]
    # each tier separates its own held-out patients (the planted signal exists in both tiers)
    assert all(entry["auc"] > 0.8 for entry in report["test"])


def test_train_response_tiers_needs_the_tier_column_and_a_valid_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write_tiered_csv(tmp_path / "plain.csv", tier_column=False)
    assert main(["train", "response", "--csv", str(plain), "--out", str(tmp_path / "a"), "--tiers"]) == 1
    assert "--tiers needs a column 'tier'" in capsys.readouterr().err
    data = write_tiered_csv(tmp_path / "deltas.csv")
    rule = tmp_path / "rule.toml"
    rule.write_text("slice_thickness = 2\n")
    argv = ["train", "response", "--csv", str(data), "--out", str(tmp_path / "b"), "--tiers", "--tier-rule", str(rule)]
    assert main(argv) == 1
    assert "unknown key(s) slice_thickness" in capsys.readouterr().err
    # without --tiers the column is ignored and the package has no tiers
    assert main(["train", "response", "--csv", str(data), "--out", str(tmp_path / "c")]) == 0
    assert load_signature(tmp_path / "c").tiers is None


# --- the pipeline, SR and SC --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomStudy, PhantomStudy]:
    work = tmp_path_factory.mktemp("tier-pair")
    baseline = generate_study(work / "b", seed=11, lesions=1, slices=24, rows=96, columns=96, segmentation="seg")
    return baseline, generate_follow_up(baseline, work / "f", shrink=0.6, texture_change="homogenise")


def with_kernel(study: PhantomStudy, kernel: str) -> None:
    for path in study.ct_files:
        ds = pydicom.dcmread(path)
        ds.ConvolutionKernel = kernel
        ds.save_as(path)


def sr_texts(sr: Dataset, concept_value: str) -> list[str]:
    found: list[str] = []

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodeValue == concept_value and "TextValue" in item:
                found.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_the_node_uses_the_pairs_tier_and_says_so_in_sr_and_sc(
    pair: tuple[PhantomStudy, PhantomStudy], tiered_package: Path
) -> None:
    baseline, follow = pair
    high = run_response(baseline.ct_files, baseline.seg_file, follow.ct_files, follow.seg_file, model=tiered_package)
    assert high.quality == QualityTier(HIGH, ()) and high.score is not None and high.score.tier == HIGH
    with_kernel(follow, "LUNG")
    standard = run_response(
        baseline.ct_files, baseline.seg_file, follow.ct_files, follow.seg_file, model=tiered_package
    )
    assert standard.quality is not None and standard.quality.tier == STANDARD
    assert standard.score is not None and standard.score.tier == STANDARD
    assert "follow-up reconstruction kernel 'LUNG' is a sharp kernel" in standard.score.tier_reason
    # the same forest output, two calibrations
    assert standard.score.uncalibrated_probability == pytest.approx(high.score.uncalibrated_probability, abs=1e-9)
    assert standard.score.probability != pytest.approx(high.score.probability)

    ev = evidence(baseline, follow)
    sr = build_response_report(standard, ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    texts = sr_texts(pydicom.dcmread(io.BytesIO(buffer.getvalue())), QUALITY_TIER.value)
    assert len(texts) == 1
    assert texts[0].startswith("standard: probability recalibrated for this tier")
    assert "sharp kernel" in texts[0]

    # the SC's result panel carries the same line (the capture itself is pixels: it must still render)
    lines = [line.text for line in _score_lines(standard)]
    assert any(t.startswith("Calibration: standard quality tier (standard-quality CT: ") for t in lines), lines
    key = find_key_image(follow.ct_files, follow.seg_file, standard.pairs[0].follow_up)
    base_key = find_key_image(baseline.ct_files, baseline.seg_file, standard.pairs[0].baseline)
    capture = build_response_capture(
        standard,
        ev.follow_up_ct[0],
        content_datetime=datetime.datetime(2024, 5, 1, 12, 0),
        baseline_image=base_key,
        follow_up_image=key,
    )
    assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def test_without_a_tiered_package_the_sr_has_no_tier_item(pair: tuple[PhantomStudy, PhantomStudy]) -> None:
    baseline, follow = pair
    result = run_response(baseline.ct_files, baseline.seg_file, follow.ct_files, follow.seg_file, model=DEMO_PACKAGE)
    assert result.score is not None and result.score.tier is None
    assert result.quality is not None  # the default rule's view of the pair, for the record
    ev = evidence(baseline, follow)
    sr = build_response_report(result, ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)
    assert sr_texts(sr, QUALITY_TIER.value) == []
