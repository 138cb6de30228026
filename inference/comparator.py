"""The radiomics comparator: the seeds' classical route, as its own method (``radiomics``).

Per label (one package per gene, as in the papers), fitted on the training split only:

1. **Univariate filter**: Mann-Whitney U test (or Welch's t-test) of every radiomic feature between
   the two classes; features with p < 0.05 pass. When none passes, the ``min_features`` features
   with the smallest p pass (the package says so in ``[input.selection]``).
2. **LASSO**: L1-penalised logistic regression on the standardised passing features; the penalty C
   is chosen by 10-fold cross-validation (patient-grouped, stratified; mean AUC over folds, largest
   mean wins, ties to the stronger penalty) and the model refitted on all training items. Its
   non-zero coefficients give the selected features and the **RadScore** (the linear predictor,
   :class:`RadScore`), which M4 (Deep-RadScore) reuses for its tumour and peritumoral scores. When
   the LASSO keeps nothing at the chosen C, the feature with the smallest p is kept.
3. **Random forest** (200 trees, depth 4, balanced class weights) on the selected features gives
   the probability.

Option ``selection = "rfe"`` (Dong et al. 2021, the M2 paper's comparator): recursive feature
elimination with a random forest's impurity importances (10% of the remaining features dropped per
step) down to ``rfe_features`` features, then a 100-tree random forest (unlimited depth) on them; no
univariate filter, no LASSO. Its RadScore (for explanations only) is an L2 logistic regression on
the z-scored selected features.

Explanations (:meth:`RadiomicsComparator.contributions`): per selected feature its value, z-score,
LASSO coefficient, contribution to the RadScore (coefficient x z) and the forest's impurity
importance. The package stores the forest as ``classifier.skops`` (skops, only trusted types; no
pickle) and everything else - feature order, z-score statistics, coefficients, p-values - as plain
numbers in ``model.toml`` ``[input]``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier

    from inference.registry import ModelPackage

__all__ = [
    "METHOD",
    "FeatureContribution",
    "RadScore",
    "RadiomicsComparator",
    "Selection",
    "fit_radscore",
    "l1_logistic",
    "radiomics_params",
    "rfe_select",
    "univariate_p_values",
]

logger = logging.getLogger(__name__)

METHOD = "radiomics"
UnivariateTest = Literal["mannwhitney", "ttest"]
SelectionMethod = Literal["lasso", "rfe"]


def univariate_p_values(X: np.ndarray, y: np.ndarray, *, test: UnivariateTest = "mannwhitney") -> np.ndarray:
    """Two-sided p-value of each column between ``y == 1`` and ``y == 0``.

    Parameters
    ----------
    X
        (items, features) matrix.
    y
        0 / 1 labels.
    test
        ``"mannwhitney"`` (Mann-Whitney U, asymptotic) or ``"ttest"`` (Welch).

    Returns
    -------
    numpy.ndarray
        One p-value per column; 1.0 for a column that is constant or not finite.
    """
    from scipy import stats

    X = np.asarray(X, dtype=float)
    y = np.asarray(y).astype(int)
    if test not in ("mannwhitney", "ttest"):
        raise ValueError(f'test must be "mannwhitney" or "ttest", got {test!r}')
    pos, neg = X[y == 1], X[y == 0]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError("the univariate filter needs at least two items of each class")
    p = np.ones(X.shape[1])
    for j in range(X.shape[1]):
        a, b = pos[:, j], neg[:, j]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.ptp(X[:, j]) == 0:
            continue
        if test == "mannwhitney":
            p[j] = float(stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue)
        else:
            if np.ptp(a) == 0 and np.ptp(b) == 0:
                p[j] = 0.0 if a[0] != b[0] else 1.0
                continue
            p[j] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return np.nan_to_num(p, nan=1.0)


def l1_logistic(c: float, seed: int = 0) -> Any:
    """An L1-penalised (LASSO) logistic regression with inverse penalty ``c`` (liblinear).

    scikit-learn 1.8 replaced ``penalty="l1"`` by ``l1_ratio=1``; this picks what the installed
    version understands, without deprecation warnings.
    """
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", random_state=seed, max_iter=1000)
    return LogisticRegression(C=c, penalty="l1", solver="liblinear", random_state=seed, max_iter=1000)


@dataclass(frozen=True)
class RadScore:
    """A RadScore: ``intercept + sum_i c_i (f_i - mean_i) / std_i`` over selected radiomic features.

    The z-score statistics are the training split's. The value is the LASSO's linear predictor
    (log-odds of the positive class).
    """

    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    intercept: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.features)
        if not n or not (len(self.coefficients) == len(self.mean) == len(self.std) == n):
            raise ValueError("a RadScore needs one coefficient, mean and std per feature (at least one)")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("RadScore std values must be finite and > 0")

    def zscores(self, values: Mapping[str, float]) -> np.ndarray:
        """z-scores of the RadScore's features (KeyError names a missing feature)."""
        missing = [f for f in self.features if f not in values]
        if missing:
            raise KeyError(f"RadScore features missing from the input: {missing}")
        x = np.array([float(values[f]) for f in self.features])
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def score(self, values: Mapping[str, float]) -> float:
        """The RadScore of one lesion from its features (name -> value)."""
        return float(self.intercept + self.zscores(values) @ np.asarray(self.coefficients))

    def score_matrix(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """RadScores of the rows of ``X`` whose columns are ``names``."""
        index = {n: i for i, n in enumerate(names)}
        missing = [f for f in self.features if f not in index]
        if missing:
            raise KeyError(f"RadScore features missing from the input: {missing}")
        cols = np.asarray(X, dtype=float)[:, [index[f] for f in self.features]]
        z = (cols - np.asarray(self.mean)) / np.asarray(self.std)
        return self.intercept + z @ np.asarray(self.coefficients)

    def as_table(self) -> dict[str, Any]:
        """The RadScore as a ``model.toml`` table."""
        return {
            "features": list(self.features),
            "coefficients": [float(c) for c in self.coefficients],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "intercept": float(self.intercept),
        }

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> RadScore:
        """Read :meth:`as_table` output back.

        Raises
        ------
        ValueError
            A key is missing or the lists disagree in length.
        """
        try:
            return cls(
                features=tuple(str(f) for f in table["features"]),
                coefficients=tuple(float(c) for c in table["coefficients"]),
                mean=tuple(float(m) for m in table["mean"]),
                std=tuple(float(s) for s in table["std"]),
                intercept=float(table.get("intercept", 0.0)),
            )
        except KeyError as exc:
            raise ValueError(f"RadScore table is missing {exc}") from None


@dataclass(frozen=True)
class Selection:
    """Result of the univariate filter and the LASSO on one training set."""

    p_values: dict[str, float]
    filtered: tuple[str, ...]
    radscore: RadScore
    c: float
    cv_auc: float
    fallback: str = ""

    @property
    def selected(self) -> tuple[str, ...]:
        """Features with a non-zero LASSO coefficient, in input order."""
        return self.radscore.features


def _cv_folds(y: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from inference.training.splits import patient_kfold, patient_strata

    strata = patient_strata(groups, y)
    per_class = min(sum(1 for s in strata.values() if s == c) for c in ("0", "1"))
    k = min(folds, per_class)
    if k < 2:
        return []
    return [(f.train, f.test) for f in patient_kfold(groups, y, k=k, seed=seed)]


def fit_radscore(
    X: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    p_value: float = 0.05,
    test: UnivariateTest = "mannwhitney",
    cv_folds: int = 10,
    cs: Sequence[float] | None = None,
    min_features: int = 1,
    seed: int = 0,
) -> Selection:
    """Univariate filter + LASSO with cross-validated penalty: the selected features and their RadScore.

    Parameters
    ----------
    X
        (items, features) training matrix.
    y
        0 / 1 labels of the items.
    names
        Feature names of the columns.
    groups
        Patient id per item (cross-validation folds never split a patient); default: one per item.
    p_value
        Univariate threshold (p < ``p_value`` passes).
    test
        ``"mannwhitney"`` or ``"ttest"``.
    cv_folds
        Folds of the penalty search (fewer when a class has fewer patients).
    cs
        Inverse penalties tried (default 20 values from 1e-3 to 1e2, log-spaced).
    min_features
        Features kept by smallest p when none passes the filter.
    seed
        Seed of the folds and the solver.

    Returns
    -------
    Selection
    """
    from sklearn.preprocessing import StandardScaler

    from inference.training.evaluate import roc_auc

    X = np.asarray(X, dtype=float)
    y = np.asarray(y).astype(int)
    names = list(names)
    if X.ndim != 2 or X.shape != (len(y), len(names)):
        raise ValueError(f"X must be (items, features) = ({len(y)}, {len(names)}), got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("radiomic features must be finite (drop or impute missing values first)")
    groups = list(groups) if groups is not None else [str(i) for i in range(len(y))]
    p = univariate_p_values(X, y, test=test)
    order = np.argsort(p, kind="mergesort")
    keep = [j for j in range(len(names)) if p[j] < p_value]
    fallback = ""
    if not keep:
        keep = sorted(int(j) for j in order[: max(1, min_features)] if np.ptp(X[:, j]) > 0)
        if not keep:
            raise ValueError("every radiomic feature is constant on the training set")
        fallback = f"no feature reached p < {p_value}; kept the {len(keep)} with the smallest p"
        logger.info("radiomics selection: %s", fallback)
    Xf = X[:, keep]
    scaler = StandardScaler().fit(Xf)
    Z = scaler.transform(Xf)
    grid = list(cs) if cs is not None else list(np.logspace(-3, 2, 20))
    folds = _cv_folds(y, groups, cv_folds, seed)
    best_c, best_auc = grid[-1], math.nan
    if folds:
        for c in sorted(grid):
            aucs = []
            for train, val in folds:
                if len(set(y[train])) < 2 or len(set(y[val])) < 2:
                    continue
                model = l1_logistic(c, seed).fit(Z[train], y[train])
                aucs.append(roc_auc(y[val], model.decision_function(Z[val])))
            mean = float(np.mean(aucs)) if aucs else math.nan
            if aucs and (math.isnan(best_auc) or mean > best_auc + 1e-12):
                best_c, best_auc = c, mean
    model = l1_logistic(best_c, seed).fit(Z, y)
    coef = model.coef_.ravel()
    nonzero = [i for i in range(len(keep)) if coef[i] != 0.0]
    if not nonzero:
        i = int(np.argmin(p[keep]))
        single = l1_logistic(1e6, seed).fit(Z[:, [i]], y)
        coef = np.zeros(len(keep))
        coef[i] = float(single.coef_.ravel()[0])
        nonzero = [i]
        model = single
        note = "the LASSO kept no feature; kept the one with the smallest p"
        fallback = f"{fallback}; {note}" if fallback else note
        logger.info("radiomics selection: %s", note)
    radscore = RadScore(
        features=tuple(names[keep[i]] for i in nonzero),
        coefficients=tuple(float(coef[i]) for i in nonzero),
        mean=tuple(float(scaler.mean_[i]) for i in nonzero),
        std=tuple(float(scaler.scale_[i]) if scaler.scale_[i] > 0 else 1.0 for i in nonzero),
        intercept=float(np.ravel(model.intercept_)[0]),
    )
    return Selection(
        p_values={names[j]: float(p[j]) for j in range(len(names))},
        filtered=tuple(names[j] for j in keep),
        radscore=radscore,
        c=float(best_c),
        cv_auc=best_auc,
        fallback=fallback,
    )


def rfe_select(
    X: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    *,
    n_features: int = 10,
    n_trees: int = 100,
    seed: int = 0,
) -> Selection:
    """Recursive feature elimination by random-forest importance (Dong et al. 2021), with a RadScore.

    Parameters
    ----------
    X
        (items, features) training matrix.
    y
        0 / 1 labels.
    names
        Feature names of the columns.
    n_features
        Features kept (at most the non-constant ones).
    n_trees
        Trees of the ranking forest.
    seed
        Seed of the forest and the logistic regression.

    Returns
    -------
    Selection
        ``filtered`` holds the non-constant features RFE started from; the RadScore is an L2 logistic
        regression on the z-scored selected features (explanations only).
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_selection import RFE
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=float)
    y = np.asarray(y).astype(int)
    names = list(names)
    if X.ndim != 2 or X.shape != (len(y), len(names)):
        raise ValueError(f"X must be (items, features) = ({len(y)}, {len(names)}), got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("radiomic features must be finite (drop or impute missing values first)")
    varying = [j for j in range(len(names)) if np.ptp(X[:, j]) > 0]
    if not varying:
        raise ValueError("every radiomic feature is constant on the training set")
    keep = min(max(1, n_features), len(varying))
    forest = RandomForestClassifier(n_estimators=n_trees, class_weight="balanced", random_state=seed, n_jobs=1)
    rfe = RFE(forest, n_features_to_select=keep, step=0.1).fit(X[:, varying], y)
    chosen = [varying[i] for i in np.flatnonzero(rfe.support_)]
    scaler = StandardScaler().fit(X[:, chosen])
    model = LogisticRegression(C=1.0, random_state=seed, max_iter=1000).fit(scaler.transform(X[:, chosen]), y)
    radscore = RadScore(
        features=tuple(names[j] for j in chosen),
        coefficients=tuple(float(c) for c in model.coef_.ravel()),
        mean=tuple(float(m) for m in scaler.mean_),
        std=tuple(float(s) if s > 0 else 1.0 for s in scaler.scale_),
        intercept=float(np.ravel(model.intercept_)[0]),
    )
    return Selection(
        p_values={names[j]: math.nan for j in varying},
        filtered=tuple(names[j] for j in varying),
        radscore=radscore,
        c=1.0,
        cv_auc=math.nan,
        fallback="",
    )


@dataclass(frozen=True)
class FeatureContribution:
    """How one selected feature speaks for a prediction."""

    name: str
    value: float
    z: float
    coefficient: float
    contribution: float
    """coefficient x z: the feature's share of the RadScore (log-odds)."""
    importance: float
    """Random-forest impurity importance (sums to 1 over the selected features)."""


@dataclass
class RadiomicsComparator:
    """Univariate filter -> LASSO (10-fold CV) -> random forest, for one binary label.

    Parameters
    ----------
    p_value, test, cv_folds, min_features
        See :func:`fit_radscore`.
    n_trees, max_depth
        Random forest size (He 2020: 200 trees, depth 4; Dong 2021: 100 trees; ``max_depth`` 0 = unlimited).
    selection
        ``"lasso"`` (filter + LASSO, He 2020) or ``"rfe"`` (recursive feature elimination, Dong 2021).
    rfe_features
        Features RFE keeps.
    seed
        Seed of folds, solver and forest.
    """

    p_value: float = 0.05
    test: UnivariateTest = "mannwhitney"
    cv_folds: int = 10
    n_trees: int = 200
    max_depth: int = 4
    min_features: int = 1
    seed: int = 0
    selection_method: SelectionMethod = "lasso"
    rfe_features: int = 10
    selection: Selection | None = field(default=None, repr=False)
    forest: RandomForestClassifier | None = field(default=None, repr=False)

    def fit(
        self, X: np.ndarray, y: np.ndarray, names: Sequence[str], *, groups: Sequence[str] | None = None
    ) -> RadiomicsComparator:
        """Fit the three steps on a training set.

        Parameters
        ----------
        X
            (items, features) radiomic features.
        y
            0 / 1 labels.
        names
            Column names of ``X``.
        groups
            Patient id per item (keeps the LASSO's folds patient-level).

        Returns
        -------
        RadiomicsComparator
            ``self``.
        """
        from sklearn.ensemble import RandomForestClassifier

        if self.selection_method == "rfe":
            self.selection = rfe_select(X, y, names, n_features=self.rfe_features, n_trees=self.n_trees, seed=self.seed)
        else:
            self.selection = fit_radscore(
                X,
                y,
                names,
                groups=groups,
                p_value=self.p_value,
                test=self.test,
                cv_folds=self.cv_folds,
                min_features=self.min_features,
                seed=self.seed,
            )
        cols = [list(names).index(f) for f in self.selection.selected]
        self.forest = RandomForestClassifier(
            n_estimators=self.n_trees,
            max_depth=self.max_depth or None,
            class_weight="balanced",
            random_state=self.seed,
            n_jobs=1,
        ).fit(np.asarray(X, dtype=float)[:, cols], np.asarray(y).astype(int))
        return self

    @property
    def features(self) -> tuple[str, ...]:
        """The selected features, in the order the forest reads them."""
        return self._fitted()[0].selected

    def _fitted(self) -> tuple[Selection, RandomForestClassifier]:
        if self.selection is None or self.forest is None:
            raise RuntimeError("the comparator is not fitted")
        return self.selection, self.forest

    def _matrix(self, X: np.ndarray | Sequence[Mapping[str, float]], names: Sequence[str] | None) -> np.ndarray:
        selected = self.features
        if names is None:
            rows = list(X)
            missing = sorted({f for r in rows for f in selected if f not in r})
            if missing:
                raise KeyError(f"features missing from the input: {missing}")
            return np.array([[float(r[f]) for f in selected] for r in rows], dtype=float).reshape(len(rows), -1)
        index = {n: i for i, n in enumerate(names)}
        missing = [f for f in selected if f not in index]
        if missing:
            raise KeyError(f"features missing from the input: {missing}")
        return np.asarray(X, dtype=float)[:, [index[f] for f in selected]]

    def predict_proba(
        self, X: np.ndarray | Sequence[Mapping[str, float]], names: Sequence[str] | None = None
    ) -> np.ndarray:
        """P(positive) per item.

        Parameters
        ----------
        X
            (items, features) matrix with columns ``names``, or one ``{feature: value}`` mapping per item.
        names
            Column names of a matrix; None when ``X`` holds mappings.

        Returns
        -------
        numpy.ndarray
            (items,) probabilities.
        """
        _, forest = self._fitted()
        matrix = self._matrix(X, names)
        if not np.all(np.isfinite(matrix)):
            raise ValueError("radiomic features must be finite")
        proba = forest.predict_proba(matrix)
        positive = list(forest.classes_).index(1)
        return proba[:, positive]

    def contributions(self, values: Mapping[str, float]) -> list[FeatureContribution]:
        """Per selected feature: value, z-score, LASSO coefficient and contribution, forest importance.

        Sorted by absolute contribution, largest first.
        """
        selection, forest = self._fitted()
        rs = selection.radscore
        z = rs.zscores(values)
        importance = forest.feature_importances_
        out = [
            FeatureContribution(
                name=f,
                value=float(values[f]),
                z=float(z[i]),
                coefficient=float(rs.coefficients[i]),
                contribution=float(rs.coefficients[i] * z[i]),
                importance=float(importance[i]),
            )
            for i, f in enumerate(rs.features)
        ]
        return sorted(out, key=lambda c: -abs(c.contribution))

    def input_table(self, radiomics_settings: str, region: str = "tumour") -> dict[str, Any]:
        """The package's ``[input]`` table: feature order, RadScore, selection record, radiomics settings."""
        selection, _ = self._fitted()
        return {
            "features": list(selection.selected),
            "region": region,
            "radiomics_settings": radiomics_settings,
            "radscore": selection.radscore.as_table(),
            "selection": {
                "method": self.selection_method,
                "rfe_features": self.rfe_features,
                "test": self.test,
                "p_threshold": self.p_value,
                "filtered": list(selection.filtered),
                "filtered_p": [
                    selection.p_values[f] if math.isfinite(selection.p_values[f]) else -1.0 for f in selection.filtered
                ],
                "lasso_c": selection.c,
                "lasso_cv_auc": selection.cv_auc if math.isfinite(selection.cv_auc) else -1.0,
                "fallback": selection.fallback,
                "n_trees": self.n_trees,
                "max_depth": self.max_depth,
            },
        }

    @classmethod
    def from_package(cls, package: ModelPackage) -> RadiomicsComparator:
        """Rebuild the comparator from a verified ``radiomics`` package.

        Raises
        ------
        ValueError
            The package is not a radiomics package or its ``[input]`` table is incomplete.
        """
        if package.method != METHOD:
            raise ValueError(f"package {package.name} is method {package.method}, not {METHOD}")
        spec = package.input_spec
        try:
            radscore = RadScore.from_table(spec["radscore"])
            sel = spec.get("selection", {})
            features = [str(f) for f in spec["features"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"package {package.name}: [input] lacks {exc}") from None
        if tuple(features) != radscore.features:
            raise ValueError(f"package {package.name}: [input] features and RadScore features differ")
        filtered = tuple(sel.get("filtered", features))
        p_values = dict(zip(filtered, sel.get("filtered_p", [math.nan] * len(filtered)), strict=False))
        selection = Selection(
            p_values=p_values,
            filtered=filtered,
            radscore=radscore,
            c=float(sel.get("lasso_c", math.nan)),
            cv_auc=float(sel.get("lasso_cv_auc", math.nan)),
            fallback=str(sel.get("fallback", "")),
        )
        forest = package.model
        if getattr(forest, "n_features_in_", len(features)) != len(features):
            raise ValueError(
                f"package {package.name}: the forest reads {forest.n_features_in_} features, not {len(features)}"
            )
        return cls(
            p_value=float(sel.get("p_threshold", 0.05)),
            test=sel.get("test", "mannwhitney"),
            n_trees=int(sel.get("n_trees", 200)),
            max_depth=int(sel.get("max_depth", 4)),
            selection_method="rfe" if sel.get("method") == "rfe" else "lasso",
            rfe_features=int(sel.get("rfe_features", 10)),
            selection=selection,
            forest=forest,
        )


def radiomics_params(settings: str) -> dict[str, Any]:
    """Pyradiomics parameters (``setting`` / ``imageType`` / ``featureClass``) from a package's JSON string.

    The string is the canonical settings :func:`inference.radiomics.features.compute_features`
    records in its provenance, so inference computes features exactly as training did.
    """
    params = json.loads(settings)
    if not isinstance(params, dict) or not {"setting", "imageType", "featureClass"} <= set(params):
        raise ValueError("radiomics settings must be a JSON object with setting, imageType and featureClass")
    return params
