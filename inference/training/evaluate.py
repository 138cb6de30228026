"""Evaluation of binary predictions: ROC, AUC with a DeLong confidence interval, thresholds, calibration.

Everything here is a pure function of labels (0 / 1) and scores (probabilities), with numpy only.

- :func:`delong_auc_variance` is the fast DeLong algorithm (Sun & Xu 2014, "Fast implementation of
  DeLong's algorithm for comparing the areas under correlated ROC curves", IEEE SPL 21(11)): the
  structural components (placement values) of DeLong et al. 1988 computed from mid-ranks in
  O(N log N) instead of O(m n). :func:`auc_ci` turns the variance into a normal-approximation
  interval clipped to [0, 1], as pROC's ``ci.auc(method = "delong")`` does.
- :func:`youden_threshold` picks the threshold maximising sensitivity + specificity - 1 (chosen on
  the validation split, then applied unchanged to the test split).
- :func:`calibration` gives the Brier score and equal-width reliability bins.
- Multi-label metrics of the RAS-family paper (M3): :func:`multilabel_f1`, :func:`weighted_ovr_auc`
  and :func:`hamming_loss`, on (items, labels) arrays with NaN for unknown labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "BinaryMetrics",
    "Calibration",
    "CalibrationBin",
    "LabelEvaluation",
    "auc_ci",
    "binary_metrics",
    "bootstrap_auc_ci",
    "calibration",
    "delong_auc_variance",
    "delong_test",
    "evaluate_label",
    "hamming_loss",
    "midranks",
    "multilabel_f1",
    "roc_auc",
    "roc_curve",
    "weighted_ovr_auc",
    "youden_threshold",
]


def _check(y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1 (drop missing labels first)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return y.astype(np.int8), s


def _both_classes(y: np.ndarray) -> None:
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("AUC needs at least one positive and one negative case")


def midranks(x: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``x`` (1-based; tied values share the mean of their ranks).

    Parameters
    ----------
    x
        1D array.

    Returns
    -------
    numpy.ndarray
        float64 ranks in the order of ``x``.
    """
    x = np.asarray(x, dtype=float).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = x.size
    ranks_sorted = np.empty(n, dtype=float)
    i = 0
    while i < n:
        j = i
        while j < n and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1.0  # mean of 1-based ranks i+1 .. j
        i = j
    ranks = np.empty(n, dtype=float)
    ranks[order] = ranks_sorted
    return ranks


def _placements(y: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the DeLong structural components V10 (per positive) and V01 (per negative)."""
    pos, neg = scores[y == 1], scores[y == 0]
    m, n = pos.size, neg.size
    tz = midranks(np.concatenate([pos, neg]))
    tx, ty = midranks(pos), midranks(neg)
    v10 = (tz[:m] - tx) / n  # fraction of negatives below each positive (ties count 1/2)
    v01 = 1.0 - (tz[m:] - ty) / m  # fraction of positives above each negative
    auc = float(v10.mean())
    return auc, v10, v01


def roc_auc(y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney statistic; ties count 1/2).

    Parameters
    ----------
    y_true
        0 / 1 labels.
    scores
        Higher = more likely positive.

    Returns
    -------
    float
        AUC in [0, 1].
    """
    y, s = _check(y_true, scores)
    _both_classes(y)
    return _placements(y, s)[0]


def delong_auc_variance(
    y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """AUC and its DeLong variance, with the fast mid-rank algorithm of Sun & Xu (2014).

    ``var = S10 / m + S01 / n`` where S10, S01 are the sample variances (denominator m - 1, n - 1)
    of the placement values of the m positives and n negatives.

    Parameters
    ----------
    y_true
        0 / 1 labels (at least two of each class for a variance).
    scores
        Higher = more likely positive.

    Returns
    -------
    tuple of float
        ``(auc, variance)``.
    """
    y, s = _check(y_true, scores)
    _both_classes(y)
    auc, v10, v01 = _placements(y, s)
    if v10.size < 2 or v01.size < 2:
        raise ValueError("the DeLong variance needs at least two positive and two negative cases")
    return auc, float(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)


def auc_ci(
    y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, *, level: float = 0.95
) -> tuple[float, float, float]:
    """AUC with a DeLong confidence interval (normal approximation, clipped to [0, 1]).

    Parameters
    ----------
    y_true
        0 / 1 labels.
    scores
        Higher = more likely positive.
    level
        Confidence level.

    Returns
    -------
    tuple of float
        ``(auc, lower, upper)``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    auc, var = delong_auc_variance(y_true, scores)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    half = z * math.sqrt(max(var, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_test(
    y_true: Sequence[float] | np.ndarray, scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray
) -> tuple[float, float, float]:
    """DeLong test of two correlated AUCs (two scores of the same cases).

    Returns
    -------
    tuple of float
        ``(auc_a, auc_b, two-sided p-value)``.
    """
    y, a = _check(y_true, scores_a)
    _, b = _check(y_true, scores_b)
    _both_classes(y)
    auc_a, v10a, v01a = _placements(y, a)
    auc_b, v10b, v01b = _placements(y, b)
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / v10a.size + s01 / v01a.size
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:
        return auc_a, auc_b, 1.0
    z = abs(auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, 2.0 * (1.0 - NormalDist().cdf(z))


def bootstrap_auc_ci(
    y_true: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Stratified percentile-bootstrap AUC interval (a cross-check of :func:`auc_ci`).

    Returns
    -------
    tuple of float
        ``(auc, lower, upper)``.
    """
    y, s = _check(y_true, scores)
    _both_classes(y)
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    aucs = np.empty(n_boot)
    for i in range(n_boot):
        p = rng.choice(pos, pos.size)
        q = rng.choice(neg, neg.size)
        aucs[i] = _placements(np.r_[np.ones(p.size, np.int8), np.zeros(q.size, np.int8)], np.r_[p, q])[0]
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return roc_auc(y, s), float(lo), float(hi)


def roc_curve(
    y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points, one per distinct score, from (0, 0) to (1, 1).

    Returns
    -------
    tuple of numpy.ndarray
        ``(fpr, tpr, thresholds)``; point ``i`` classifies ``score >= thresholds[i]`` as positive
        (the first threshold is ``+inf``: nothing positive).
    """
    y, s = _check(y_true, scores)
    _both_classes(y)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (y.size - y.sum())]
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thresholds


def youden_threshold(y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    The threshold is placed half-way between the optimal score and the next lower distinct score,
    so that it is robust to small shifts between validation and test scores; positive means
    ``score >= threshold``. Ties in J go to the higher threshold (fewer positives).

    Parameters
    ----------
    y_true
        0 / 1 labels of the validation split.
    scores
        Probabilities in [0, 1].

    Returns
    -------
    float
        Threshold in [0, 1].
    """
    y, s = _check(y_true, scores)
    fpr, tpr, thresholds = roc_curve(y, s)
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = highest threshold
    if best == 0:  # no cut beats "nothing positive"
        return float(min(1.0, thresholds[1]))
    upper = thresholds[best]
    lower = thresholds[best + 1] if best + 1 < thresholds.size else max(0.0, upper - 1e-6)
    return float(np.clip((upper + lower) / 2 if lower < upper else upper, 0.0, 1.0))


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion-matrix metrics at one threshold (positive: ``score >= threshold``)."""

    threshold: float
    accuracy: float
    sensitivity: float
    specificity: float
    f1: float
    tp: int
    fp: int
    tn: int
    fn: int


def binary_metrics(
    y_true: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity and F1 at ``threshold``.

    Undefined ratios (no positives, no predicted positives) are NaN.

    Returns
    -------
    BinaryMetrics
    """
    y, s = _check(y_true, scores)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return BinaryMetrics(
        threshold=float(threshold),
        accuracy=ratio(tp + tn, y.size),
        sensitivity=ratio(tp, tp + fn),
        specificity=ratio(tn, tn + fp),
        f1=ratio(2 * tp, 2 * tp + fp + fn),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


@dataclass(frozen=True)
class CalibrationBin:
    """One reliability bin: predictions in ``[lower, upper)`` (the last bin includes 1)."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float


@dataclass(frozen=True)
class Calibration:
    """Brier score, expected calibration error and the reliability bins."""

    brier: float
    ece: float
    bins: tuple[CalibrationBin, ...]


def calibration(
    y_true: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray, *, bins: int = 10
) -> Calibration:
    """Brier score and equal-width reliability bins over [0, 1].

    Empty bins are kept with NaN means, so every report has the same bin edges. The expected
    calibration error is the count-weighted mean of ``|observed - predicted|`` over non-empty bins.

    Parameters
    ----------
    y_true
        0 / 1 labels.
    probabilities
        Predicted probabilities in [0, 1].
    bins
        Number of bins.

    Returns
    -------
    Calibration
    """
    y, p = _check(y_true, probabilities)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if p.size == 0:
        raise ValueError("calibration needs at least one prediction")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must be in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    ece = 0.0
    for b in range(bins):
        sel = index == b
        count = int(sel.sum())
        mean_p = float(p[sel].mean()) if count else math.nan
        rate = float(y[sel].mean()) if count else math.nan
        if count:
            ece += count * abs(rate - mean_p)
        out.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), count, mean_p, rate))
    brier = float(np.mean((p - y) ** 2))
    return Calibration(brier=brier, ece=ece / p.size, bins=tuple(out))


@dataclass(frozen=True)
class LabelEvaluation:
    """Everything the report says about one label on one split (``auc_ci`` NaN with < 2 cases of a class)."""

    label: str
    n: int
    positives: int
    auc: float
    auc_ci: tuple[float, float]
    metrics: BinaryMetrics
    calibration: Calibration
    roc: tuple[tuple[float, ...], tuple[float, ...]]

    def summary(self) -> dict[str, Any]:
        """Flat numbers for ``model.toml`` ``[metrics.<label>]`` (no NaN: undefined values are left out)."""
        values: dict[str, Any] = {
            "n": self.n,
            "positives": self.positives,
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "threshold": self.metrics.threshold,
            "accuracy": self.metrics.accuracy,
            "sensitivity": self.metrics.sensitivity,
            "specificity": self.metrics.specificity,
            "f1": self.metrics.f1,
            "brier": self.calibration.brier,
            "ece": self.calibration.ece,
        }
        return {k: _round(v) for k, v in values.items() if not _has_nan(v)}

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN as None)."""
        return _json_ready(
            {
                "label": self.label,
                "n": self.n,
                "positives": self.positives,
                "auc": self.auc,
                "auc_ci": list(self.auc_ci),
                "metrics": asdict(self.metrics),
                "calibration": asdict(self.calibration),
                "roc": {"fpr": list(self.roc[0]), "tpr": list(self.roc[1])},
            }
        )


def evaluate_label(
    label: str,
    y_true: Sequence[float] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    *,
    level: float = 0.95,
    bins: int = 10,
) -> LabelEvaluation:
    """AUC with DeLong CI, metrics at ``threshold``, calibration and the ROC curve of one label.

    Cases with a missing (NaN) label are dropped first.

    Returns
    -------
    LabelEvaluation
    """
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(probabilities, dtype=float).ravel()
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if min(y.sum(), y.size - y.sum()) >= 2:
        auc, lo, hi = auc_ci(y, p, level=level)
    else:  # too few cases of a class for a variance: AUC only
        auc, lo, hi = roc_auc(y, p), math.nan, math.nan
    fpr, tpr, _ = roc_curve(y, p)
    return LabelEvaluation(
        label=label,
        n=int(y.size),
        positives=int(y.sum()),
        auc=auc,
        auc_ci=(lo, hi),
        metrics=binary_metrics(y, p, threshold),
        calibration=calibration(y, p, bins=bins),
        roc=(tuple(float(v) for v in fpr), tuple(float(v) for v in tpr)),
    )


def _has_nan(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------ multi-label (M3)


def _multilabel(
    y_true: np.ndarray | Sequence[Any], values: np.ndarray | Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float)
    v = np.asarray(values, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if v.ndim == 1:
        v = v[:, None]
    if y.shape != v.shape:
        raise ValueError(f"labels {y.shape} and predictions {v.shape} differ in shape")
    known = ~np.isnan(y)
    if not np.all((y[known] == 0) | (y[known] == 1)):
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    if not np.all(np.isfinite(v)):
        raise ValueError("predictions must be finite")
    return y, v


def _binarise(probabilities: np.ndarray, thresholds: float | Sequence[float] | np.ndarray) -> np.ndarray:
    t = np.broadcast_to(np.asarray(thresholds, dtype=float), (probabilities.shape[1],))
    return (probabilities >= t).astype(float)


def multilabel_f1(
    y_true: np.ndarray | Sequence[Any],
    probabilities: np.ndarray | Sequence[Any],
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    *,
    average: str = "macro",
) -> float:
    """F1 of multi-label predictions (positive: probability >= the label's threshold).

    Unknown (NaN) labels are left out of every count.

    Parameters
    ----------
    y_true
        (items, labels) 0 / 1 / NaN.
    probabilities
        (items, labels) probabilities.
    thresholds
        One threshold, or one per label.
    average
        ``"macro"`` (mean of per-label F1), ``"micro"`` (pooled counts), ``"weighted"`` (per-label F1
        weighted by the label's positives), or ``"samples"`` (mean per-item F1; an item with no true
        and no predicted positive counts 1).

    Returns
    -------
    float
        F1 in [0, 1]; NaN when undefined (e.g. macro with no positive and no predicted positive at all).
    """
    y, p = _multilabel(y_true, probabilities)
    pred = _binarise(p, thresholds)
    known = ~np.isnan(y)
    yk = np.where(known, y, 0.0)
    pk = np.where(known, pred, 0.0)
    tp = (yk * pk).sum(axis=0)
    fp = ((1 - yk) * pk * known).sum(axis=0)
    fn = (yk * (1 - pk)).sum(axis=0)
    if average == "micro":
        denom = 2 * tp.sum() + fp.sum() + fn.sum()
        return float(2 * tp.sum() / denom) if denom else math.nan
    if average == "samples":
        tp_i = (yk * pk).sum(axis=1)
        denom_i = yk.sum(axis=1) + pk.sum(axis=1)
        return float(np.mean(np.where(denom_i > 0, 2 * tp_i / np.where(denom_i > 0, denom_i, 1), 1.0)))
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
    if average == "macro":
        defined = per_label[~np.isnan(per_label)]
        return float(defined.mean()) if defined.size else math.nan
    if average == "weighted":
        support = yk.sum(axis=0)
        if support.sum() == 0:
            return math.nan
        return float(np.nansum(np.nan_to_num(per_label) * support) / support.sum())
    raise ValueError(f'average must be "macro", "micro", "weighted" or "samples", got {average!r}')


def weighted_ovr_auc(y_true: np.ndarray | Sequence[Any], probabilities: np.ndarray | Sequence[Any]) -> float:
    """One-vs-rest AUC per label, averaged with weights = the label's positives (the M3 paper's AUC).

    Labels whose known items hold one class only are left out (and do not weigh).

    Parameters
    ----------
    y_true
        (items, labels) 0 / 1 / NaN.
    probabilities
        (items, labels) probabilities.

    Returns
    -------
    float
        Weighted mean AUC; NaN when no label has both classes.
    """
    y, p = _multilabel(y_true, probabilities)
    aucs, weights = [], []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        yj = y[known, j]
        if 0 < yj.sum() < yj.size:
            aucs.append(roc_auc(yj, p[known, j]))
            weights.append(float(yj.sum()))
    if not aucs:
        return math.nan
    return float(np.average(aucs, weights=weights))


def hamming_loss(
    y_true: np.ndarray | Sequence[Any],
    probabilities: np.ndarray | Sequence[Any],
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
) -> float:
    """Share of wrong (item, label) decisions among the known ones (positive: probability >= threshold).

    Parameters
    ----------
    y_true
        (items, labels) 0 / 1 / NaN.
    probabilities
        (items, labels) probabilities (or 0 / 1 predictions).
    thresholds
        One threshold, or one per label.

    Returns
    -------
    float
        In [0, 1]; NaN when no label is known.
    """
    y, p = _multilabel(y_true, probabilities)
    pred = _binarise(p, thresholds)
    known = ~np.isnan(y)
    if not known.any():
        return math.nan
    return float(np.mean(pred[known] != y[known]))
