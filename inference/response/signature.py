"""The response signature: a random forest on the four feature deltas -> P(treatment insensitive).

As in Dercle et al. 2020: a random forest (scikit-learn ``RandomForestClassifier``) takes the deltas of
SI4, LoG-z entropy, LoG-x entropy and NGTDM contrast (in :data:`inference.radiomics.delta.FEATURE_NAMES`
order) and gives the probability that the patient's metastases are *insensitive* to treatment; above the
package threshold (0.5 by default, the paper's) the patient is in the high-risk group.

The model travels as a ``radiomics-response`` model package (:mod:`inference.registry`: ``model.toml``,
``method = "response"``, one label ``treatment_insensitive``, ``[weights.classifier]`` a ``.skops``
file with its sha256). skops loads only trusted types: skops' defaults (scikit-learn estimators, numpy
arrays) plus :data:`inference.registry.TRUSTED_SKOPS_TYPES` (``sklearn.tree._tree.Tree``, which every
tree of the forest needs); pickle is never used.

Training data: a CSV with one row per patient, columns ``delta_si4``, ``delta_log_z_entropy``,
``delta_log_x_entropy``, ``delta_ngtdm_contrast`` and ``label`` (1 / ``insensitive`` = treatment
insensitive, 0 / ``sensitive``); other columns (e.g. a pseudonymous patient key) are ignored.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import InputError, ModelPackageError
from inference.radiomics.delta import DEFAULT_DELTA, DELTA_DEFINITIONS, DELTA_EPSILON, FEATURE_NAMES, FeatureDeltas
from inference.registry import TRUSTED_SKOPS_TYPES, load_package, write_package
from inference.response.quality import HIGH, TIERS, QualityTier, TierRule, TierRuleError
from inference.response.results import SignatureScore
from inference.results import AlgorithmInfo, ValidationStatus

logger = logging.getLogger(__name__)

METHOD = "response"
LABEL = "treatment_insensitive"
DEFAULT_THRESHOLD = 0.5
CSV_COLUMNS: tuple[str, ...] = tuple(f"delta_{name}" for name in FEATURE_NAMES)
LABEL_COLUMN = "label"
TRUSTED_TYPES: tuple[str, ...] = TRUSTED_SKOPS_TYPES
"""Types trusted beyond skops' defaults when loading the forest (the registry's list)."""
INTENDED_USE = (
    "Research use: probability that colorectal-cancer liver metastases are insensitive to the ongoing "
    "(anti-EGFR) therapy, from the change of four radiomic features between the baseline CT and the CT "
    "about 8 weeks into treatment (Dercle et al., JNCI 2020). Not a diagnosis; read beside RECIST."
)
_LABEL_VALUES = {"1": 1, "0": 0, "insensitive": 1, "sensitive": 0, "true": 1, "false": 0}
TIER_COLUMN = "tier"
"""Optional training-CSV column: the pair's quality tier (``high`` / ``standard``), for ``--tiers``."""
TIER_REFERENCES: tuple[str, ...] = (*TIERS, "all")
"""Which patients train the forest of a tiered package: one tier's (the paper: ``high``) or all."""
_PROBABILITY_CLIP = 1e-3
"""Forest probabilities are clipped to [clip, 1 - clip] before the logit of the recalibration."""


class TrainingDataError(InputError):
    """The training CSV cannot be used (missing columns, non-numeric values, one class only)."""


@dataclass(frozen=True)
class TierCalibration:
    """Per-tier recalibration of the forest's probability (``[input.quality_tiers]`` of a package).

    As the paper: the forest is developed on one tier's patients (``reference``, the paper's
    high-quality CT; ``"all"``: every tier) and its probability is calibrated per tier. Each tier has a
    Platt map ``p' = 1 / (1 + exp(-(slope * logit(p) + intercept)))`` fitted on that tier's training
    patients (out-of-bag probabilities for the patients the forest was trained on). ``rule`` decides a
    study pair's tier (:func:`inference.response.quality.decide_tier`).
    """

    rule: TierRule
    reference: str
    maps: Mapping[str, tuple[float, float]]
    """tier -> (slope, intercept) on the logit of the forest's probability."""
    counts: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """tier -> (training patients, of them insensitive), for the record."""

    def calibrate(self, probabilities: np.ndarray, tier: str) -> np.ndarray:
        """The tier's recalibrated probabilities (KeyError for a tier without a map)."""
        slope, intercept = self.maps[tier]
        return _platt(np.asarray(probabilities, dtype=float), slope, intercept)

    def as_table(self) -> dict[str, Any]:
        """The ``[input.quality_tiers]`` table."""
        table: dict[str, Any] = {
            "reference": self.reference,
            "recalibration": "platt",
            "rule": self.rule.as_table(),
        }
        for tier, (slope, intercept) in self.maps.items():
            entry: dict[str, Any] = {"slope": float(slope), "intercept": float(intercept)}
            if tier in self.counts:
                entry["patients"], entry["insensitive"] = (int(v) for v in self.counts[tier])
            table[tier] = entry
        return table

    @classmethod
    def from_table(cls, table: Any, where: str) -> TierCalibration:
        """Read ``[input.quality_tiers]``; :class:`ModelPackageError` naming the bad key."""
        if not isinstance(table, Mapping):
            raise ModelPackageError(f"{where}: [input.quality_tiers] must be a table")
        if table.get("recalibration", "platt") != "platt":
            raise ModelPackageError(f'{where}: [input.quality_tiers] recalibration must be "platt"')
        reference = table.get("reference", HIGH)
        if reference not in TIER_REFERENCES:
            raise ModelPackageError(f"{where}: [input.quality_tiers] reference must be one of {TIER_REFERENCES}")
        try:
            rule = TierRule.from_table(table.get("rule", {}))
        except (TierRuleError, TypeError) as exc:
            raise ModelPackageError(f"{where}: [input.quality_tiers.rule]: {exc}") from None
        maps: dict[str, tuple[float, float]] = {}
        counts: dict[str, tuple[int, int]] = {}
        for tier in TIERS:
            entry = table.get(tier)
            if not isinstance(entry, Mapping):
                raise ModelPackageError(f"{where}: [input.quality_tiers.{tier}] is missing: every tier needs its map")
            try:
                slope, intercept = float(entry["slope"]), float(entry["intercept"])
            except (KeyError, TypeError, ValueError):
                raise ModelPackageError(
                    f"{where}: [input.quality_tiers.{tier}] needs numeric slope and intercept"
                ) from None
            if not (math.isfinite(slope) and math.isfinite(intercept)):
                raise ModelPackageError(f"{where}: [input.quality_tiers.{tier}] slope and intercept must be finite")
            maps[tier] = (slope, intercept)
            if "patients" in entry:
                counts[tier] = (int(entry["patients"]), int(entry.get("insensitive", 0)))
        unknown = sorted(set(table) - {"reference", "recalibration", "rule", *TIERS})
        if unknown:
            raise ModelPackageError(f"{where}: [input.quality_tiers] unknown key(s) {', '.join(unknown)}")
        return cls(rule=rule, reference=str(reference), maps=maps, counts=counts)


def _platt(p: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    clipped = np.clip(p, _PROBABILITY_CLIP, 1.0 - _PROBABILITY_CLIP)
    z = slope * np.log(clipped / (1.0 - clipped)) + intercept
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=float)


def fit_tier_calibration(
    probabilities: np.ndarray,
    y: np.ndarray,
    tiers: Sequence[str],
    *,
    rule: TierRule,
    reference: str,
) -> TierCalibration:
    """Fit one Platt map per tier on the forest's (out-of-bag) probabilities of that tier's patients.

    Raises
    ------
    TrainingDataError
        A tier has fewer than two patients of a class (it cannot be calibrated).
    """
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(y, dtype=int)
    tier_array = np.asarray(list(tiers), dtype=object)
    maps: dict[str, tuple[float, float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for tier in TIERS:
        rows = tier_array == tier
        yt = y[rows]
        n_pos, n_neg = int(yt.sum()), int((yt == 0).sum())
        if min(n_pos, n_neg) < 2:
            raise TrainingDataError(
                f"quality tier {tier!r} has {n_pos} insensitive and {n_neg} sensitive training patients; its "
                "recalibration needs at least two of each (train without --tiers, or add patients of that tier)"
            )
        clipped = np.clip(p[rows], _PROBABILITY_CLIP, 1.0 - _PROBABILITY_CLIP)
        logit = np.log(clipped / (1.0 - clipped)).reshape(-1, 1)
        model = LogisticRegression(C=1.0).fit(logit, yt)
        maps[tier] = (float(model.coef_[0, 0]), float(model.intercept_[0]))
        counts[tier] = (int(rows.sum()), n_pos)
    return TierCalibration(rule=rule, reference=reference, maps=maps, counts=counts)


def train_tiered_signature(
    x: np.ndarray,
    y: np.ndarray,
    tiers: Sequence[str],
    *,
    reference: str = HIGH,
    rule: TierRule | None = None,
    n_estimators: int = 500,
    random_state: int = 0,
) -> tuple[Any, TrainingReport, TierCalibration]:
    """Fit the forest on the reference tier's patients (or all) and a recalibration per tier.

    Parameters
    ----------
    x, y
        Deltas (n, 4) and labels (1 = insensitive).
    tiers
        Each patient's quality tier (``high`` / ``standard``).
    reference
        Whose patients train the forest: ``"high"`` (the paper: the signature was developed on
        high-quality CT), ``"standard"``, or ``"all"``.
    rule
        The tier rule recorded with the calibration (the node applies it to decide a pair's tier).
    n_estimators, random_state
        Forest settings.

    Returns
    -------
    tuple
        The forest, its :class:`TrainingReport` (on the patients it was fitted on) and the calibration.

    Raises
    ------
    TrainingDataError
        An unknown tier value, or a tier (or the reference) without two patients of each class.
    """
    tier_list = [str(t).strip().lower() for t in tiers]
    unknown = sorted(set(tier_list) - set(TIERS))
    if unknown:
        raise TrainingDataError(f"unknown quality tier(s) {unknown}; use {' / '.join(TIERS)}")
    if reference not in TIER_REFERENCES:
        raise ValueError(f'Argument "reference" must be one of {TIER_REFERENCES}.')
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=int)
    in_forest = np.ones(len(y), dtype=bool) if reference == "all" else np.asarray(tier_list) == reference
    y_ref = y[in_forest]
    if min(int(y_ref.sum()), int((y_ref == 0).sum())) < 2:
        raise TrainingDataError(
            f"the reference tier {reference!r} needs at least two training patients of each class to train the "
            f"forest, got {np.bincount(y_ref, minlength=2).tolist()}"
        )
    estimator, report = train_signature(x[in_forest], y_ref, n_estimators=n_estimators, random_state=random_state)
    raw = np.empty(len(y), dtype=float)
    if (~in_forest).any():
        raw[~in_forest] = estimator.predict_proba(x[~in_forest])[:, 1]
    oob = getattr(estimator, "oob_decision_function_", None)
    if oob is not None and np.all(np.isfinite(oob)):
        raw[in_forest] = oob[:, 1]
    else:  # a patient never out of bag (few trees): cross-validated probabilities instead
        from sklearn.base import clone
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = StratifiedKFold(n_splits=int(max(2, min(5, np.bincount(y_ref).min()))), shuffle=True, random_state=0)
        unbagged = clone(estimator).set_params(oob_score=False)
        raw[in_forest] = cross_val_predict(unbagged, x[in_forest], y_ref, cv=folds, method="predict_proba")[:, 1]
    calibration = fit_tier_calibration(raw, y, tier_list, rule=rule or TierRule(), reference=reference)
    return estimator, report, calibration


@dataclass(frozen=True, eq=False)
class ResponseSignature:
    """A loaded signature: the forest, its decision threshold and its identity."""

    estimator: Any
    threshold: float
    algorithm: AlgorithmInfo
    feature_names: tuple[str, ...] = FEATURE_NAMES
    delta_definition: str = "relative"
    """How the deltas it was trained on were computed (``[input] delta_definition``; absent = ``"relative"``)."""
    tiers: TierCalibration | None = None
    """Per-quality-tier recalibration (``[input.quality_tiers]``); None for packages without tiers."""

    def probability(self, vectors: np.ndarray) -> np.ndarray:
        """P(treatment insensitive) for rows of deltas in :data:`FEATURE_NAMES` order."""
        x = np.asarray(vectors, dtype=float).reshape(-1, len(self.feature_names))
        classes = list(self.estimator.classes_)
        return self.estimator.predict_proba(x)[:, classes.index(1)]

    def score(self, deltas: FeatureDeltas, quality: QualityTier | None = None) -> SignatureScore:
        """Score one patient.

        Parameters
        ----------
        deltas
            The patient-level deltas.
        quality
            The pair's quality tier; required when the package has tiers (its calibration is used),
            ignored otherwise.

        Returns
        -------
        SignatureScore
            ``high_risk`` when the (recalibrated) probability is above the threshold (strictly, as in
            the paper); ``tier`` names the calibration used.

        Raises
        ------
        ValueError
            A delta is not finite, or a tiered package is given no tier.
        """
        vector = deltas.vector()
        if not all(math.isfinite(v) for v in vector):
            raise ValueError(f"the feature deltas must be finite, got {vector}")
        p = float(self.probability(np.asarray([vector]))[0])
        if self.tiers is None:
            return SignatureScore(probability=p, threshold=self.threshold, high_risk=p > self.threshold)
        if quality is None:
            raise ValueError("this signature recalibrates per quality tier: the pair's tier is needed")
        calibrated = float(self.tiers.calibrate(np.asarray([p]), quality.tier)[0])
        return SignatureScore(
            probability=calibrated,
            threshold=self.threshold,
            high_risk=calibrated > self.threshold,
            tier=quality.tier,
            tier_reason=quality.describe(),
            uncalibrated_probability=p,
        )


@dataclass(frozen=True)
class TrainingReport:
    """How a freshly trained forest did on its training data."""

    patients: int
    insensitive: int
    oob_auc: float | None
    cv_auc_mean: float | None
    cv_auc_std: float | None
    feature_importances: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, Any]:
        """The ``[metrics]`` table of the model package (None values left out)."""
        metrics: dict[str, Any] = {"training_patients": self.patients, "training_insensitive": self.insensitive}
        for key in ("oob_auc", "cv_auc_mean", "cv_auc_std"):
            value = getattr(self, key)
            if value is not None:
                metrics[key] = round(float(value), 4)
        metrics["feature_importances"] = {k: round(v, 4) for k, v in self.feature_importances.items()}
        return metrics


def read_training_tiers(path: str | os.PathLike[str]) -> list[str]:
    """The ``tier`` column of a training CSV, row by row (``high`` / ``standard``).

    Raises
    ------
    TrainingDataError
        No ``tier`` column, or a value that is not a tier (rows named by number).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if TIER_COLUMN not in header:
            raise TrainingDataError(
                f"{path.name}: --tiers needs a column {TIER_COLUMN!r} ({' / '.join(TIERS)} per patient); "
                f"found {', '.join(header)}"
            )
        tiers = []
        for number, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            value = row[TIER_COLUMN].lower()
            if value not in TIERS:
                raise TrainingDataError(
                    f"{path.name} row {number}: {TIER_COLUMN} must be {' or '.join(TIERS)}, got {row[TIER_COLUMN]!r}"
                )
            tiers.append(value)
    return tiers


def read_training_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient deltas and labels from a CSV.

    Parameters
    ----------
    path
        CSV with a header row holding :data:`CSV_COLUMNS` and ``label``.

    Returns
    -------
    tuple of numpy.ndarray
        ``X`` (n, 4) in :data:`FEATURE_NAMES` order and ``y`` (n,) with 1 = insensitive.

    Raises
    ------
    TrainingDataError
        Missing columns, a non-numeric or non-finite delta, an unknown label, or fewer than two
        patients per class. Messages name rows by number, never by patient.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in (*CSV_COLUMNS, LABEL_COLUMN) if c not in header]
        if missing:
            raise TrainingDataError(f"{path.name}: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
        rows, labels = [], []
        for number, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                values = [float(row[c]) for c in CSV_COLUMNS]
            except ValueError:
                raise TrainingDataError(f"{path.name} row {number}: a delta is not a number") from None
            if not all(math.isfinite(v) for v in values):
                raise TrainingDataError(f"{path.name} row {number}: a delta is not finite")
            label = _LABEL_VALUES.get(row[LABEL_COLUMN].lower())
            if label is None:
                raise TrainingDataError(
                    f"{path.name} row {number}: label must be 1/insensitive or 0/sensitive, got {row[LABEL_COLUMN]!r}"
                )
            rows.append(values)
            labels.append(label)
    y = np.asarray(labels, dtype=int)
    if min(int((y == 1).sum()), int((y == 0).sum())) < 2:
        raise TrainingDataError(
            f"{path.name}: need at least two patients of each class, got {np.bincount(y, minlength=2).tolist()}"
        )
    return np.asarray(rows, dtype=float), y


def train_signature(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_estimators: int = 500,
    max_depth: int | None = None,
    min_samples_leaf: int = 2,
    random_state: int = 0,
    cv_folds: int = 3,
) -> tuple[Any, TrainingReport]:
    """Fit the random forest on deltas and labels, with out-of-bag and cross-validated AUC.

    Parameters
    ----------
    x
        (n, 4) deltas in :data:`FEATURE_NAMES` order.
    y
        (n,) labels, 1 = treatment insensitive.
    n_estimators, max_depth, min_samples_leaf, random_state
        Forest settings (deterministic for a given ``random_state``).
    cv_folds
        Stratified folds for the cross-validated AUC (the paper used threefold cross-validation); the
        AUC is left out when a class has fewer patients than folds.

    Returns
    -------
    tuple
        The fitted ``RandomForestClassifier`` (classes 0, 1) and a :class:`TrainingReport`.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=int)
    if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES) or len(x) != len(y):
        raise ValueError(f"x must be (n, {len(FEATURE_NAMES)}) and y (n,), got {x.shape} and {y.shape}")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("y must hold both classes 0 and 1")

    def forest(**extra: Any) -> Any:
        return RandomForestClassifier(
            n_estimators=n_estimators,
            max_depth=max_depth,
            min_samples_leaf=min_samples_leaf,
            random_state=random_state,
            n_jobs=1,
            **extra,
        )

    estimator = forest(oob_score=True, bootstrap=True).fit(x, y)
    oob = None
    oob_prob = getattr(estimator, "oob_decision_function_", None)
    if oob_prob is not None and np.all(np.isfinite(oob_prob)):
        oob = float(roc_auc_score(y, oob_prob[:, 1]))
    cv_mean = cv_std = None
    if int(np.bincount(y).min()) >= cv_folds >= 2:
        folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=random_state)
        scores = cross_val_score(forest(), x, y, cv=folds, scoring="roc_auc")
        cv_mean, cv_std = float(scores.mean()), float(scores.std())
    report = TrainingReport(
        patients=len(y),
        insensitive=int(y.sum()),
        oob_auc=oob,
        cv_auc_mean=cv_mean,
        cv_auc_std=cv_std,
        feature_importances={
            name: float(v) for name, v in zip(FEATURE_NAMES, estimator.feature_importances_, strict=True)
        },
    )
    return estimator, report


def write_signature_package(
    directory: str | os.PathLike[str],
    estimator: Any,
    *,
    name: str,
    version: str,
    validation_status: ValidationStatus,
    training_description: str,
    metrics: Mapping[str, Any] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    intended_use: str = INTENDED_USE,
    description: str = "",
    delta_definition: str = DEFAULT_DELTA,
    tiers: TierCalibration | None = None,
) -> Path:
    """Write a ``response`` model package (``model.toml`` + ``classifier.skops``) and verify it.

    Parameters
    ----------
    directory
        New package directory.
    estimator
        A fitted binary scikit-learn classifier with ``classes_ == [0, 1]`` (1 = insensitive).
    name, version, validation_status, intended_use, description
        Package identity (``DEMO`` for phantom-trained models).
    training_description
        What the model was trained on (``[training_data] description``).
    metrics
        ``[metrics]`` table, e.g. :meth:`TrainingReport.as_metrics`.
    threshold
        Decision threshold on the probability (high risk above it).
    delta_definition
        How the training deltas were computed (``"symmetric"`` or ``"relative"``); the pipeline
        computes a study's deltas the same way.
    tiers
        Per-quality-tier recalibration and its tier rule (``[input.quality_tiers]``); None: one
        calibration for every acquisition.

    Returns
    -------
    pathlib.Path
        The package directory.

    Raises
    ------
    ModelPackageError
        The package does not verify (see :func:`inference.registry.write_package`).
    """
    if list(getattr(estimator, "classes_", [])) != [0, 1]:
        raise ValueError('Argument "estimator" must be a fitted binary classifier with classes [0, 1].')
    if delta_definition not in DELTA_DEFINITIONS:
        raise ValueError(f'Argument "delta_definition" must be one of {DELTA_DEFINITIONS}.')
    metadata = {
        "name": name,
        "version": version,
        "method": METHOD,
        "labels": [LABEL],
        "validation_status": validation_status,
        "intended_use": intended_use,
        "description": description
        or "Random forest on the 8-week deltas of SI4, LoG-z entropy, LoG-x entropy and NGTDM contrast.",
        "input": {
            "features": list(CSV_COLUMNS),
            "delta_definition": delta_definition,
            "delta": (
                "(follow-up - baseline) / ((|baseline| + |follow-up|) / 2 + floor)"
                if delta_definition == "symmetric"
                else f"(follow-up - baseline) / |baseline|; follow-up - baseline when |baseline| < {DELTA_EPSILON:g}"
            ),
            "radiomics_parameters": "config/radiomics/response.yaml",
            **({"quality_tiers": tiers.as_table()} if tiers is not None else {}),
        },
        "thresholds": {LABEL: float(threshold)},
        "training_data": {"description": training_description},
        "metrics": dict(metrics or {}),
    }
    return write_package(directory, metadata, {"classifier": ("classifier.skops", estimator)})


def load_signature(path: str | os.PathLike[str]) -> ResponseSignature:
    """Load and verify a ``response`` model package.

    Parameters
    ----------
    path
        Package directory or zip.

    Returns
    -------
    ResponseSignature

    Raises
    ------
    ModelPackageError
        Checksum or manifest problems, another method, or inputs other than the four deltas.
    """
    package = load_package(path)
    if package.method != METHOD:
        raise ModelPackageError(f"{path}: method is {package.method!r}, the response pipeline needs {METHOD!r}")
    if tuple(package.labels) != (LABEL,):
        raise ModelPackageError(f"{path}: labels must be [{LABEL!r}], got {list(package.labels)}")
    features = package.input_spec.get("features")
    if features is not None and list(features) != list(CSV_COLUMNS):
        raise ModelPackageError(f"{path}: [input] features must be {list(CSV_COLUMNS)}, got {features}")
    estimator = package.model
    if list(getattr(estimator, "classes_", [])) != [0, 1] or not hasattr(estimator, "predict_proba"):
        raise ModelPackageError(f"{path}: the classifier must give probabilities for classes [0, 1]")
    n_features = getattr(estimator, "n_features_in_", len(FEATURE_NAMES))
    if n_features != len(FEATURE_NAMES):
        raise ModelPackageError(f"{path}: the classifier takes {n_features} inputs, not {len(FEATURE_NAMES)}")
    definition = str(package.input_spec.get("delta_definition", "relative"))
    if definition not in DELTA_DEFINITIONS:
        raise ModelPackageError(
            f"{path}: [input] delta_definition must be one of {DELTA_DEFINITIONS}, got {definition!r}"
        )
    tiers = package.input_spec.get("quality_tiers")
    return ResponseSignature(
        estimator=estimator,
        threshold=float(package.thresholds[LABEL]),
        algorithm=package.algorithm_info(),
        delta_definition=definition,
        tiers=None if tiers is None else TierCalibration.from_table(tiers, str(path)),
    )


def train_from_csv(
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    validation_status: ValidationStatus = "RESEARCH",
    training_description: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    n_estimators: int = 500,
    random_state: int = 0,
) -> tuple[Path, TrainingReport]:
    """Train the signature on a CSV of per-patient deltas and write it as a model package.

    The one call behind ``pacs-agent train response``.

    Parameters
    ----------
    csv_path
        Training CSV (see :func:`read_training_csv`).
    out_dir
        New package directory.
    name, version, validation_status, threshold
        Package identity and decision threshold.
    training_description
        Default: the CSV's file name and class counts.
    n_estimators, random_state
        Forest settings.

    Returns
    -------
    tuple
        The package directory and the training report.
    """
    x, y = read_training_csv(csv_path)
    estimator, report = train_signature(x, y, n_estimators=n_estimators, random_state=random_state)
    description = training_description or (
        f"{len(y)} patients from {Path(csv_path).name} ({int(y.sum())} insensitive, {int((y == 0).sum())} sensitive)"
    )
    package = write_signature_package(
        out_dir,
        estimator,
        name=name,
        version=version,
        validation_status=validation_status,
        training_description=description,
        metrics=report.as_metrics(),
        threshold=threshold,
    )
    logger.info("trained response signature %s %s on %d patients: %s", name, version, len(y), report.as_metrics())
    return package, report


def signature_from(model: ResponseSignature | str | os.PathLike[str] | None) -> ResponseSignature | None:
    """A :class:`ResponseSignature` from a loaded signature, a package path, or None."""
    if model is None or isinstance(model, ResponseSignature):
        return model
    return load_signature(model)


def deltas_matrix(rows: Sequence[FeatureDeltas]) -> np.ndarray:
    """Stack patient deltas into an (n, 4) training matrix in :data:`FEATURE_NAMES` order."""
    return np.asarray([row.vector() for row in rows], dtype=float).reshape(-1, len(FEATURE_NAMES))
