"""M4's last step: the last FC layer replaced by the best of seven classical classifiers (Zhang et al. 2024).

"the last FC layer is replaced with a combined classifier comprising seven machine learning
classification algorithms at the end of the training process ... A 5-fold cross-validation with ten
repetitions was implemented during the training ... This methodology identifies the best classifiers
for each situation and evaluates performance metrics based on the average area under the curve."
The seven, as the paper's tables name them: LDA, SVM, RF, NB, LR, KNN, MLP.

Per endpoint, on the **training split** only: the Deep-RadScore feature vector of every lesion
(the penultimate FC layer's output, RadScores fused), each candidate (z-scored inputs, scikit-learn
defaults where the paper gives none) scored by the mean AUC of a repeated, patient-grouped,
label-stratified k-fold cross-validation; the best is refit on the whole training split. The
hyper-parameter search of the paper's Appendix E6 is not in the seed and not done here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CLASSIFIERS", "ClassifierChoice", "make_classifier", "select_classifier"]

CLASSIFIERS: tuple[str, ...] = ("LDA", "SVM", "RF", "NB", "LR", "KNN", "MLP")
"""The paper's seven classifiers."""


def make_classifier(name: str, seed: int = 0, n_items: int | None = None) -> Any:
    """A scikit-learn pipeline (z-score, classifier) for one of :data:`CLASSIFIERS`.

    ``n_items`` (the training items it will see) caps KNN's 5 neighbours on tiny training sets.

    Raises
    ------
    ValueError
        Unknown name.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    factories: dict[str, Any] = {
        "LDA": lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
        # Platt-scaled SVM (sigmoid on the decision function, fitted by internal 3-fold CV)
        "SVM": lambda: CalibratedClassifierCV(SVC(random_state=seed), method="sigmoid", cv=3, ensemble=False),
        "RF": lambda: RandomForestClassifier(n_estimators=100, random_state=seed),
        "NB": GaussianNB,
        "LR": lambda: LogisticRegression(max_iter=2000),
        "KNN": lambda: KNeighborsClassifier(n_neighbors=min(5, max(1, n_items or 5)), algorithm="brute"),
        "MLP": lambda: MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed),
    }
    if name not in factories:
        raise ValueError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), factories[name]())


@dataclass(frozen=True)
class ClassifierChoice:
    """The classifier chosen for one endpoint."""

    name: str
    cv_auc: dict[str, float]
    estimator: Any
    folds: int
    repeats: int


def _splits(y: np.ndarray, groups: Sequence[str], folds: int, repeats: int, seed: int) -> list[tuple[Any, Any]]:
    from sklearn.model_selection import StratifiedGroupKFold

    positive_patients = len({g for g, v in zip(groups, y, strict=True) if v == 1})
    negative_patients = len({g for g, v in zip(groups, y, strict=True) if v == 0})
    k = max(2, min(folds, positive_patients, negative_patients))
    out = []
    for r in range(repeats):
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        out += list(cv.split(np.zeros(len(y)), y, groups))
    return out


def select_classifier(
    features: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    *,
    candidates: Sequence[str] = CLASSIFIERS,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
) -> ClassifierChoice:
    """Pick the candidate with the best mean cross-validated AUC and refit it on all items.

    Parameters
    ----------
    features
        (items, d) deep feature vectors.
    y
        0 / 1 labels.
    groups
        Patient of each item (folds never split a patient).
    candidates
        Names from :data:`CLASSIFIERS`; one name skips the cross-validation.
    folds, repeats
        Repeated k-fold (paper: 5 x 10); fewer folds when a class has fewer patients.
    seed
        Random state of the folds and of the stochastic classifiers.

    Returns
    -------
    ClassifierChoice

    Raises
    ------
    ValueError
        A label with a single class, or an unknown candidate.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=int)
    if len(set(y.tolist())) != 2:
        raise ValueError("the final classifier needs both classes in the training split")
    for name in candidates:
        make_classifier(name)
    scores: dict[str, float] = {}
    n_folds = 0
    if len(candidates) > 1:
        splits = _splits(y, groups, folds, repeats, seed)
        n_folds = len(splits)
        for name in candidates:
            aucs = []
            for train_idx, test_idx in splits:
                if len(set(y[train_idx].tolist())) < 2 or len(set(y[test_idx].tolist())) < 2:
                    continue
                try:
                    model = make_classifier(name, seed, len(train_idx)).fit(features[train_idx], y[train_idx])
                    p = model.predict_proba(features[test_idx])[:, 1]
                except ValueError as exc:  # e.g. too few items of a class for the SVM's calibration folds
                    logger.info("final classifier %s skipped on a fold: %s", name, exc)
                    continue
                aucs.append(roc_auc_score(y[test_idx], p))
            scores[name] = float(np.mean(aucs)) if aucs else math.nan
    best = max(candidates, key=lambda n: -math.inf if math.isnan(scores.get(n, math.nan)) else scores[n])
    if len(candidates) == 1:
        best = candidates[0]
    estimator = make_classifier(best, seed, len(y)).fit(features, y)
    return ClassifierChoice(best, scores, estimator, n_folds, repeats if len(candidates) > 1 else 0)
