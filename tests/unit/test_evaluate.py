"""Evaluation metrics: fast DeLong against hand-computed and brute-force references, Youden, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from inference.training.evaluate import (
    auc_ci,
    binary_metrics,
    bootstrap_auc_ci,
    calibration,
    delong_auc_variance,
    delong_test,
    evaluate_label,
    midranks,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from inference.training.report import TextProgress, draw_roc_png, write_report


def brute_force_delong(y, s):
    """DeLong et al. 1988 from the definition: placement values over all (positive, negative) pairs, O(m n)."""
    y, s = np.asarray(y), np.asarray(s, dtype=float)
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size


def test_delong_hand_computed_example():
    # positives 0.8, 0.6, 0.4; negatives 0.6, 0.3, 0.2, 0.1 (one tie at 0.6).
    # V10 = (1, 7/8, 3/4) -> AUC 7/8; V01 = (1/2, 1, 1, 1); S10 = 1/64, S01 = 1/16;
    # var = S10 / 3 + S01 / 4 = 1/192 + 1/64 = 1/48.
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.8, 0.6, 0.4, 0.6, 0.3, 0.2, 0.1]
    auc, var = delong_auc_variance(y, s)
    assert auc == pytest.approx(0.875)
    assert var == pytest.approx(1 / 48)
    auc2, lo, hi = auc_ci(y, s)
    assert auc2 == pytest.approx(0.875)
    assert lo == pytest.approx(0.875 - 1.959964 * math.sqrt(1 / 48), abs=1e-6)
    assert hi == 1.0  # clipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_delong_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    y[:2] = [0, 1]
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties
    auc, var = delong_auc_variance(y, s)
    ref_auc, ref_var = brute_force_delong(y, s)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert var == pytest.approx(ref_var, rel=1e-10)


def test_delong_interval_agrees_with_bootstrap():
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(80), np.zeros(120)]
    s = rng.normal(y * 1.0, 1.0)
    auc, lo, hi = auc_ci(y, s)
    _, blo, bhi = bootstrap_auc_ci(y, s, n_boot=1500, seed=1)
    assert lo < auc < hi
    assert (hi - lo) == pytest.approx(bhi - blo, rel=0.2)
    assert abs(lo - blo) < 0.03 and abs(hi - bhi) < 0.03


def test_auc_matches_sklearn_and_rank_formula():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.random(300)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_midranks():
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_delong_test_of_identical_and_different_scores():
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(60), np.zeros(60)]
    good = rng.normal(y * 2.0, 1.0)
    noise = rng.normal(0, 1.0, 120)
    a, b, p_same = delong_test(y, good, good)
    assert a == b and p_same == 1.0
    _, _, p = delong_test(y, good, noise)
    assert p < 1e-4


def test_roc_curve_points():
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[0] == np.inf and thr[1] == 0.8


def test_youden_threshold_separates_and_lies_between_scores():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    t = youden_threshold(y, s)
    assert t == pytest.approx(0.45)
    m = binary_metrics(y, s, t)
    assert (m.sensitivity, m.specificity, m.accuracy, m.f1) == (1.0, 1.0, 1.0, 1.0)


def test_youden_threshold_picks_maximum_j():
    # J at ">= 0.8": 1/3 - 0; at ">= 0.5": 2/3 - 1/3; at ">= 0.4": 1 - 1/3 = 2/3 (best); lower: worse or equal.
    y = [1, 0, 1, 1, 0, 0]
    s = [0.8, 0.7, 0.5, 0.4, 0.3, 0.2]
    t = youden_threshold(y, s)
    assert 0.3 < t < 0.4
    m = binary_metrics(y, s, t)
    assert m.sensitivity == 1.0 and m.specificity == pytest.approx(2 / 3)


def test_binary_metrics_counts_and_undefined_ratios():
    m = binary_metrics([1, 1, 0, 0, 0], [0.9, 0.2, 0.8, 0.1, 0.3], 0.5)
    assert (m.tp, m.fn, m.fp, m.tn) == (1, 1, 1, 2)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.sensitivity == 0.5 and m.specificity == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(0.5)
    none_positive = binary_metrics([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(none_positive.sensitivity) and math.isnan(none_positive.f1)


def test_calibration_bins_and_brier():
    y = [0, 0, 1, 1, 1, 0, 1]
    p = [0.05, 0.15, 0.15, 0.95, 1.0, 0.55, 0.45]
    cal = calibration(y, p, bins=10)
    assert len(cal.bins) == 10
    assert [b.count for b in cal.bins] == [1, 2, 0, 0, 1, 1, 0, 0, 0, 2]  # 1.0 falls in the last bin
    assert cal.bins[1].mean_predicted == pytest.approx(0.15) and cal.bins[1].observed_rate == 0.5
    assert math.isnan(cal.bins[2].mean_predicted)
    assert cal.brier == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    perfect = calibration([0, 1], [0.0, 1.0])
    assert perfect.brier == 0.0 and perfect.ece == 0.0


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
        ([0, 1], [0.1, float("nan")], "finite"),
        ([1, 1], [0.1, 0.2], "positive and one negative"),
        ([0, 1], [0.1], "labels but"),
    ],
)
def test_invalid_inputs_are_refused(y, s, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(y, s)


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="two positive"):
        delong_auc_variance([0, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration([0, 1], [0.5, 1.5])


def test_evaluate_label_drops_missing_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(30), [np.nan, np.nan]]
    p = np.clip(np.r_[rng.normal(0.7, 0.2, 30), rng.normal(0.3, 0.2, 30), [0.5, 0.5]], 0, 1)
    ev = evaluate_label("KRAS", y, p, threshold=0.5)
    assert ev.n == 60 and ev.positives == 30
    assert ev.auc_ci[0] < ev.auc < ev.auc_ci[1]
    summary = ev.summary()
    assert set(summary) >= {"auc", "auc_ci", "threshold", "sensitivity", "specificity", "f1", "brier"}
    paths = write_report(
        tmp_path, title="demo 1", summary={"method": "m1"}, test=[ev], validation=[ev], history=[{"epoch": 1}]
    )
    assert set(paths) == {"json", "markdown", "roc_test", "roc_validation"}
    text = paths["markdown"].read_text()
    assert "KRAS" in text and f"{ev.auc:.3f}" in text and "roc-test.png" in text
    with Image.open(paths["roc_test"]) as img:
        assert img.size == (560, 560)
        assert (31, 119, 180) in {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert '"auc"' in paths["json"].read_text()


def test_report_json_writes_an_undefined_epoch_auc_as_null(tmp_path):
    import json

    ev = evaluate_label("KRAS", [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.5)
    history = [{"epoch": 1, "val_auc": float("nan"), "val_loss": np.float32(0.5)}]
    paths = write_report(tmp_path, title="t", summary={}, test=[ev], validation=[ev], history=history)
    data = json.loads(paths["json"].read_text())
    assert data["history"] == [{"epoch": 1, "val_auc": None, "val_loss": 0.5}]


def test_roc_png_draws_each_label(tmp_path):
    ev_a = evaluate_label("EGFR", [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.5)
    ev_b = evaluate_label("KRAS", [0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.5)
    path = draw_roc_png({"EGFR": ev_a, "KRAS": ev_b}, tmp_path / "roc.png", title="t")
    with Image.open(path) as img:
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours


def test_text_progress_prints_stage_lines():
    import io

    out = io.StringIO()
    bar = TextProgress(out, width=10, interval=0)
    bar("epochs", 5, 10, "loss 0.1")
    bar("epochs", 10, 10)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epochs") and "[#####.....] 5/10 loss 0.1" in lines[0]
    assert "[##########] 10/10" in lines[1]
