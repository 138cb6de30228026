"""``pacs-agent train response --csv DELTAS.csv --out PKG_DIR``: train the 8-week response signature.

The CSV holds one row per patient: the four feature deltas (:data:`signature.CSV_COLUMNS`) and a
``label`` (1 / insensitive, 0 / sensitive). The patients are split once, stratified, into a
training part and a held-out test part; the forest is trained on the training part only and
evaluated on the test part with the same report as the mutation models (AUC with DeLong CI,
metrics at the package threshold, calibration, ROC plot), written to ``PKG_DIR/report/``. The
package records the test metrics, so its numbers are never training-set numbers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import cross_val_predict, train_test_split

from inference.errors import PacsAgentError
from inference.response.signature import (
    DEFAULT_THRESHOLD,
    read_training_csv,
    train_signature,
    write_signature_package,
)
from inference.training.evaluate import evaluate_label
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pacs-agent train response``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        x, y = read_training_csv(args.csv)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=args.test_fraction, stratify=y, random_state=args.seed
        )
        estimator, training = train_signature(x_train, y_train, random_state=args.seed)
        folds = int(max(2, min(5, np.bincount(y_train.astype(int)).min())))
        validation_p = cross_val_predict(estimator, x_train, y_train, cv=folds, method="predict_proba")[:, 1]
        test_p = estimator.predict_proba(x_test)[:, 1]
        test = evaluate_label(LABEL, y_test, test_p, args.threshold)
        validation = evaluate_label(LABEL, y_train, validation_p, args.threshold)
        description = (
            f"{args.csv.name}: {len(y)} patients ({int(y.sum())} insensitive); trained on {len(y_train)}, "
            f"evaluated on {len(y_test)} held out"
        )
        package = write_signature_package(
            args.out,
            estimator,
            name=args.name,
            version=args.version,
            validation_status=args.validation_status,
            training_description=description,
            metrics={**training.as_metrics(), "test": test.summary(), "validation": validation.summary()},
            threshold=args.threshold,
            delta_definition=args.delta_definition,
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
            test=[test],
            validation=[validation],
        )
    except (PacsAgentError, ValueError) as exc:
        print(f"pacs-agent train response: {exc}", file=sys.stderr)
        return EXIT_INVALID
    lo, hi = test.auc_ci
    print(f"package: {package}")
    print(f"  held-out AUC {test.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {test.n} patients; report in {package}/report")
    return EXIT_OK
