"""``pacs-agent train response --csv DELTAS.csv --out PKG_DIR``: train the 8-week response signature.

The CSV holds one row per patient: the four feature deltas (:data:`signature.CSV_COLUMNS`) and a
``label`` (1 / insensitive, 0 / sensitive). The patients are split once, stratified, into a
training part and a held-out test part; the forest is trained on the training part only and
evaluated on the test part with the same report as the mutation models (AUC with DeLong CI,
metrics at the package threshold, calibration, ROC plot), written to ``PKG_DIR/report/``. The
package records the test metrics, so its numbers are never training-set numbers.

With ``--tiers`` the CSV also holds a ``tier`` column (``high`` / ``standard``: the pair's CT quality
tier, decided by the tier rule of :mod:`inference.response.quality`): as in Dercle et al. 2020 the
forest is trained on the reference tier's patients (``--tier-reference``, default ``high``) and
recalibrated per tier; the split is stratified by tier and label, and the report adds each tier's
held-out evaluation. The package records the tier rule (``--tier-rule RULE.toml``, default rule
otherwise) that the node applies to decide a study pair's tier.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split

from inference.errors import PacsAgentError
from inference.response.quality import TIERS, TierRule, TierRuleError
from inference.response.signature import (
    DEFAULT_THRESHOLD,
    TIER_REFERENCES,
    TierCalibration,
    read_training_csv,
    read_training_tiers,
    train_signature,
    train_tiered_signature,
    write_signature_package,
)
from inference.training.evaluate import LabelEvaluation, evaluate_label
from inference.training.report import write_report

EXIT_OK, EXIT_INVALID = 0, 1
LABEL = "INSENSITIVE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-agent train response",
        description="Train the 8-week delta-radiomics response signature (random forest on 4 deltas) "
        "into a model package, with a held-out evaluation report.",
    )
    parser.add_argument("--csv", type=Path, required=True, help="per-patient deltas and label")
    parser.add_argument("--out", type=Path, required=True, help="package folder to create")
    parser.add_argument("--name", default="response-signature", help="package name")
    parser.add_argument("--version", default="1.0.0", help="package version")
    parser.add_argument(
        "--validation-status", choices=("DEMO", "RESEARCH", "VALIDATED"), default="RESEARCH", help="default RESEARCH"
    )
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out share of patients (0.25)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="high-risk threshold (0.5)")
    parser.add_argument("--seed", type=int, default=0, help="split and forest seed")
    parser.add_argument(
        "--delta-definition",
        choices=("symmetric", "relative"),
        default="symmetric",
        help="how the CSV's deltas were computed (recorded in the package; the node computes a study's deltas "
        "the same way): symmetric (default, continuous) or relative (legacy)",
    )
    parser.add_argument(
        "--tiers",
        action="store_true",
        help="recalibrate per CT quality tier (Dercle 2020): the CSV needs a 'tier' column (high / standard)",
    )
    parser.add_argument(
        "--tier-reference",
        choices=TIER_REFERENCES,
        default="high",
        help="with --tiers: whose patients train the forest (default high, as the paper; 'all': every tier)",
    )
    parser.add_argument(
        "--tier-rule",
        type=Path,
        help="with --tiers: TOML file with the tier rule's keys (max_slice_thickness_mm, ...; recorded in the "
        "package, applied by the node); default: the built-in rule",
    )
    return parser


def _tier_rule(path: Path | None) -> TierRule:
    """The tier rule of ``--tier-rule`` (a TOML file of rule keys), or the default rule."""
    if path is None:
        return TierRule()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TierRuleError(f"--tier-rule {path}: cannot be read as TOML: {exc}") from None
    return TierRule.from_table(table["rule"] if isinstance(table.get("rule"), dict) else table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pacs-agent train response``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        x, y = read_training_csv(args.csv)
        tiers = np.asarray(read_training_tiers(args.csv) if args.tiers else [""] * len(y), dtype=object)
        rule = _tier_rule(args.tier_rule) if args.tiers else None
        strata = np.asarray([f"{t}:{v}" for t, v in zip(tiers, y, strict=True)])
        x_train, x_test, y_train, y_test, t_train, t_test = train_test_split(
            x, y, tiers, test_size=args.test_fraction, stratify=strata, random_state=args.seed
        )
        calibration: TierCalibration | None = None
        if args.tiers:
            estimator, training, calibration = train_tiered_signature(
                x_train, y_train, list(t_train), reference=args.tier_reference, rule=rule, random_state=args.seed
            )
            validation_p = _tiered_cross_val(x_train, y_train, t_train, args, rule)
            test_p = _calibrated(estimator, calibration, x_test, t_test)
        else:
            estimator, training = train_signature(x_train, y_train, random_state=args.seed)
            folds = int(max(2, min(5, np.bincount(y_train.astype(int)).min())))
            validation_p = cross_val_predict(estimator, x_train, y_train, cv=folds, method="predict_proba")[:, 1]
            test_p = estimator.predict_proba(x_test)[:, 1]
        test = evaluate_label(LABEL, y_test, test_p, args.threshold)
        validation = evaluate_label(LABEL, y_train, validation_p, args.threshold)
        per_tier = _per_tier(y_test, test_p, t_test, args.threshold) if args.tiers else []
        description = (
            f"{args.csv.name}: {len(y)} patients ({int(y.sum())} insensitive); trained on {len(y_train)}, "
            f"evaluated on {len(y_test)} held out"
        )
        if calibration is not None:
            counts = ", ".join(f"{t} {int((tiers == t).sum())}" for t in TIERS)
            description += (
                f"; quality tiers ({counts}): forest trained on the {args.tier_reference} tier, "
                "probability recalibrated per tier (Platt)"
            )
        tier_metrics = {f"test_{e.label.split()[-1]}": e.summary() for e in per_tier}
        package = write_signature_package(
            args.out,
            estimator,
            name=args.name,
            version=args.version,
            validation_status=args.validation_status,
            training_description=description,
            metrics={
                **training.as_metrics(),
                "test": test.summary(),
                "validation": validation.summary(),
                **tier_metrics,
            },
            threshold=args.threshold,
            delta_definition=args.delta_definition,
            tiers=calibration,
        )
        write_report(
            Path(package) / "report",
            title=f"{args.name} {args.version}",
            summary={
                "method": "response",
                "labels": [LABEL],
                "data": description,
                "threshold": args.threshold,
                "feature_importances": training.feature_importances,
            },
            test=[test, *per_tier],
            validation=[validation],
        )
    except (PacsAgentError, ValueError) as exc:  # TierRuleError and TrainingDataError are PacsAgentErrors
        print(f"pacs-agent train response: {exc}", file=sys.stderr)
        return EXIT_INVALID
    lo, hi = test.auc_ci
    print(f"package: {package}")
    print(f"  held-out AUC {test.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {test.n} patients; report in {package}/report")
    for evaluation in per_tier:
        print(f"  {evaluation.label}: held-out AUC {evaluation.auc:.3f} on {evaluation.n} patients")
    return EXIT_OK


def _calibrated(estimator: Any, calibration: TierCalibration, x: np.ndarray, tiers: np.ndarray) -> np.ndarray:
    """Each patient's forest probability through its tier's recalibration."""
    raw = estimator.predict_proba(x)[:, 1]
    out = np.empty(len(raw), dtype=float)
    for tier in TIERS:
        rows = tiers == tier
        if rows.any():
            out[rows] = calibration.calibrate(raw[rows], tier)
    return out


def _tiered_cross_val(
    x: np.ndarray, y: np.ndarray, tiers: np.ndarray, args: argparse.Namespace, rule: TierRule | None
) -> np.ndarray:
    """Cross-validated, recalibrated probabilities of the training patients (forest and maps refit per fold)."""
    strata = np.asarray([f"{t}:{v}" for t, v in zip(tiers, y, strict=True)])
    folds = int(max(2, min(5, np.unique(strata, return_counts=True)[1].min())))
    out = np.empty(len(y), dtype=float)
    for train, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=args.seed).split(x, strata):
        estimator, _, calibration = train_tiered_signature(
            x[train], y[train], list(tiers[train]), reference=args.tier_reference, rule=rule, random_state=args.seed
        )
        out[held] = _calibrated(estimator, calibration, x[held], tiers[held])
    return out


def _per_tier(y: np.ndarray, p: np.ndarray, tiers: np.ndarray, threshold: float) -> list[LabelEvaluation]:
    """Held-out evaluation of each tier with both classes among its test patients."""
    out = []
    for tier in TIERS:
        rows = tiers == tier
        if rows.any() and 0 < int(y[rows].sum()) < int(rows.sum()):
            out.append(evaluate_label(f"{LABEL} {tier}", y[rows], p[rows], threshold))
    return out
