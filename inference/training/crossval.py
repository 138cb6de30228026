"""Repeated, patient-grouped, label-stratified k-fold cross-validation with a permutation test.

The evaluation scheme for small cohorts (``[split] scheme = "repeated-cv"``, the default below
:data:`REPEATED_CV_BELOW` patients). One 39/9/12 split of a 60-patient cohort gives a test AUC
whose 95% CI spans most of [0, 1]; repeating a patient-grouped k-fold uses every patient as test
data once per repeat and reports how much the estimate moves with the split.

:func:`repeated_cv` runs ``repeats`` x ``folds`` fits through a caller-supplied
``fit_predict(train_items, test_items) -> probabilities``. Whatever model selection the method
does (the comparator's LASSO penalty by its inner 10-fold CV, the networks' early stopping on an
inner validation split) happens inside ``fit_predict`` on the outer training part only: the CV is
nested, and no outer test patient ever influences its own prediction.

Per label it reports (:class:`CVLabelResult`):

- **pooled out-of-fold AUC**: every item's out-of-fold probability, averaged over the repeats (each
  item once), gives one ROC; its AUC has a DeLong 95% CI (items treated as independent; with
  several lesions per patient the interval is somewhat too narrow);
- **spread across repeats**: the pooled AUC of each single repeat (mean, SD, min, max) and the
  per-fold AUCs;
- **calibration** (Brier, reliability bins) of the averaged out-of-fold probabilities, and the
  Youden threshold on them (that threshold is the package's; metrics at it are optimistic because it
  was chosen on the same predictions - the report says so);
- **permutation test**: labels are permuted between patients (a patient's lesions share one label
  vector, labels of several outputs move together) and the whole CV is rerun ``permutations``
  times with ``permutation_repeats`` repeats; the statistic is the mean single-repeat pooled AUC
  over the first ``permutation_repeats`` repeats, the same for the observed labels;
  ``p = (1 + #{null >= observed}) / (1 + permutations)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.training.evaluate import LabelEvaluation, evaluate_label, roc_auc, youden_threshold
from inference.training.splits import assert_patient_disjoint, patient_kfold, patient_strata

__all__ = [
    "REPEATED_CV_BELOW",
    "CVLabelResult",
    "CVPlan",
    "CVResult",
    "permute_patient_labels",
    "repeated_cv",
]

REPEATED_CV_BELOW = 200
"""``scheme = "auto"`` uses repeated cross-validation below this many patients, a held-out split above."""

FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``fit_predict(train_items, test_items, y)``: fit on ``y[train_items]``, return (len(test_items), labels)
probabilities. ``y`` is the label matrix to use (permuted in the permutation test)."""
Progress = Callable[[str, int, int, str], None]


def _no_progress(stage: str, done: int, total: int, note: str = "") -> None:
    return None


@dataclass(frozen=True)
class CVPlan:
    """How many folds, repeats and permutations; the seed of all of them."""

    folds: int = 5
    repeats: int = 10
    permutations: int = 100
    permutation_repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2 or self.repeats < 1 or self.permutations < 0:
            raise ValueError("cross-validation needs folds >= 2, repeats >= 1 and permutations >= 0")
        if not 1 <= self.permutation_repeats <= self.repeats:
            raise ValueError("permutation_repeats must be between 1 and repeats")


@dataclass(frozen=True)
class CVLabelResult:
    """Everything the report says about one label under repeated cross-validation."""

    label: str
    pooled: LabelEvaluation
    """Evaluation of the repeat-averaged out-of-fold probabilities (AUC + DeLong CI, calibration)."""
    repeat_aucs: tuple[float, ...]
    fold_aucs: tuple[float, ...]
    threshold: float
    statistic: float
    """Mean single-repeat pooled AUC over the first ``permutation_repeats`` repeats."""
    null: tuple[float, ...] = ()
    permutation_p: float = math.nan

    @property
    def repeat_mean(self) -> float:
        """Mean of the single-repeat pooled AUCs."""
        return float(np.mean(self.repeat_aucs)) if self.repeat_aucs else math.nan

    @property
    def repeat_sd(self) -> float:
        """SD of the single-repeat pooled AUCs (0 with one repeat)."""
        return float(np.std(self.repeat_aucs, ddof=1)) if len(self.repeat_aucs) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        """Flat numbers for ``model.toml`` ``[metrics.<label>]`` (undefined values left out)."""
        values: dict[str, Any] = {
            "split": "repeated cross-validation (pooled out-of-fold)",
            **self.pooled.summary(),
            "cv_auc_repeat_mean": self.repeat_mean,
            "cv_auc_repeat_sd": self.repeat_sd,
            "cv_auc_repeat_min": min(self.repeat_aucs) if self.repeat_aucs else math.nan,
            "cv_auc_repeat_max": max(self.repeat_aucs) if self.repeat_aucs else math.nan,
            "cv_repeats": len(self.repeat_aucs),
            "permutations": len(self.null),
            "permutation_p": self.permutation_p,
        }
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items() if not _nan(v)}

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "label": self.label,
            "pooled": self.pooled.as_dict(),
            "repeat_aucs": list(self.repeat_aucs),
            "fold_aucs": list(self.fold_aucs),
            "threshold": self.threshold,
            "statistic": self.statistic,
            "null": list(self.null),
            "permutation_p": None if math.isnan(self.permutation_p) else self.permutation_p,
        }


@dataclass(frozen=True)
class CVResult:
    """Repeated cross-validation of all labels."""

    plan: CVPlan
    folds: int
    labels: tuple[CVLabelResult, ...]
    oof: np.ndarray = field(repr=False)
    """(repeats, items, labels) out-of-fold probabilities."""

    def __getitem__(self, label: str) -> CVLabelResult:
        for result in self.labels:
            if result.label == label:
                return result
        raise KeyError(label)

    @property
    def thresholds(self) -> dict[str, float]:
        """Youden thresholds on the pooled out-of-fold probabilities, per label."""
        return {r.label: r.threshold for r in self.labels}


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def permute_patient_labels(patients: Sequence[str], y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted between patients: every lesion of a patient gets another patient's label vector.

    Each patient's label vector is its lesions' majority per label (NaN when all are missing); the
    vectors are shuffled over the patients, so class counts (per patient) and the correlation
    between labels are kept.

    Parameters
    ----------
    patients
        Patient id of each item.
    y
        (items, labels) 0 / 1 / NaN.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        (items, labels) permuted labels.
    """
    y = np.asarray(y, dtype=float).reshape(len(patients), -1)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        rows[p].append(i)
    ids = sorted(rows)
    vectors = []
    for p in ids:
        block = y[rows[p]]
        vec = np.full(y.shape[1], np.nan)
        for j in range(y.shape[1]):
            known = block[~np.isnan(block[:, j]), j]
            if known.size:
                vec[j] = float(round(float(known.mean()) + 1e-9))
        vectors.append(vec)
    order = rng.permutation(len(ids))
    out = np.empty_like(y)
    for k, p in enumerate(ids):
        out[rows[p]] = vectors[order[k]]
    return out


def _folds(patients: Sequence[str], y: np.ndarray, plan: CVPlan, repeats: int, seed: int) -> list[Any]:
    strata = patient_strata(patients, y)
    k = min(plan.folds, len(strata))
    return list(patient_kfold(patients, y, k=k, repeats=repeats, seed=seed))


def _run(
    patients: Sequence[str],
    y: np.ndarray,
    fit_predict: FitPredict,
    plan: CVPlan,
    repeats: int,
    seed: int,
    progress: Progress,
    stage: str,
) -> tuple[np.ndarray, list[list[float]], int]:
    """Out-of-fold probabilities (repeats, items, labels) and per-label fold AUCs."""
    folds = _folds(patients, y, plan, repeats, seed)
    n_labels = y.shape[1]
    oof = np.full((repeats, len(patients), n_labels), np.nan)
    fold_aucs: list[list[float]] = [[] for _ in range(n_labels)]
    for n, fold in enumerate(folds, start=1):
        assert_patient_disjoint(patients, fold.train, fold.test)
        p = np.asarray(fit_predict(fold.train, fold.test, y), dtype=float).reshape(len(fold.test), n_labels)
        oof[fold.repeat, fold.test] = p
        for j in range(n_labels):
            known = ~np.isnan(y[fold.test, j])
            yj = y[fold.test[known], j]
            if 0 < yj.sum() < yj.size:
                fold_aucs[j].append(roc_auc(yj, p[known, j]))
        progress(stage, n, len(folds), f"repeat {fold.repeat + 1} fold {fold.fold + 1}")
    k = max((f.fold for f in folds), default=0) + 1
    return oof, fold_aucs, k


def _repeat_aucs(y: np.ndarray, oof: np.ndarray, j: int, repeats: int) -> list[float]:
    known = ~np.isnan(y[:, j])
    return [roc_auc(y[known, j], oof[r, known, j]) for r in range(repeats)]


def repeated_cv(
    patients: Sequence[str],
    y: np.ndarray,
    labels: Sequence[str],
    fit_predict: FitPredict,
    plan: CVPlan,
    *,
    progress: Progress | None = None,
) -> CVResult:
    """Repeated patient-grouped stratified k-fold CV of one model recipe, with a permutation test.

    Parameters
    ----------
    patients
        Patient id of each item.
    y
        (items, labels) 0 / 1 / NaN.
    labels
        Label names (columns of ``y``).
    fit_predict
        ``fit_predict(train_items, test_items, y)`` -> (len(test_items), labels) probabilities, fitted
        on ``train_items`` only (all model selection inside).
    plan
        Folds, repeats, permutations, seed.
    progress
        ``progress(stage, done, total, note)``.

    Returns
    -------
    CVResult

    Raises
    ------
    ValueError
        A label with fewer than two patients of a class (no fold can hold both classes).
    """
    progress = progress or _no_progress
    y = np.asarray(y, dtype=float).reshape(len(patients), -1)
    if y.shape[1] != len(labels):
        raise ValueError(f"{len(labels)} label names for {y.shape[1]} label columns")
    oof, fold_aucs, k = _run(patients, y, fit_predict, plan, plan.repeats, plan.seed, progress, "cross-val")
    observed = []
    for j in range(len(labels)):
        observed.append(float(np.mean(_repeat_aucs(y, oof, j, plan.permutation_repeats))))
    null: list[list[float]] = [[] for _ in labels]
    rng = np.random.default_rng([plan.seed, 7919])
    for n in range(plan.permutations):
        y_perm = permute_patient_labels(patients, y, rng)
        oof_perm, _, _ = _run(
            patients, y_perm, fit_predict, plan, plan.permutation_repeats, plan.seed + 1 + n, _no_progress, ""
        )
        for j in range(len(labels)):
            try:
                null[j].append(float(np.mean(_repeat_aucs(y_perm, oof_perm, j, plan.permutation_repeats))))
            except ValueError:  # a permutation left one class only for this label: not counted
                continue
        progress("permutations", n + 1, plan.permutations, "labels shuffled between patients")
    results = []
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        pooled_p = oof[:, known, j].mean(axis=0)
        yj = y[known, j]
        threshold = round(float(youden_threshold(yj, pooled_p)), 6)
        pooled = evaluate_label(label, yj, pooled_p, threshold)
        nul = np.asarray(null[j])
        p_value = float((1 + np.sum(nul >= observed[j] - 1e-12)) / (1 + nul.size)) if nul.size else math.nan
        results.append(
            CVLabelResult(
                label=label,
                pooled=pooled,
                repeat_aucs=tuple(float(a) for a in _repeat_aucs(y, oof, j, plan.repeats)),
                fold_aucs=tuple(float(a) for a in fold_aucs[j]),
                threshold=threshold,
                statistic=observed[j],
                null=tuple(float(v) for v in nul),
                permutation_p=p_value,
            )
        )
    return CVResult(plan=plan, folds=k, labels=tuple(results), oof=oof)
