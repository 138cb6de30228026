"""``pacs-agent train {m1,m2,m3,m4,radiomics} --config TRAIN.toml --out PKG_DIR`` (and ``train response``).

Trains the method as the configuration says, writes a verified model package to ``PKG_DIR`` (with
its report in ``PKG_DIR/report/``) and prints where everything went. Progress goes to stderr.
Exit codes: 0 trained, 1 invalid configuration or data, 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from inference.errors import ConfigError, PacsAgentError
from inference.training.config import METHODS, TrainConfig

__all__ = ["EXIT_INVALID", "EXIT_OK", "main"]

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-agent train",
        description="Train a mutation-prediction method on labelled data and write a model package "
        "(model.toml, weights with sha256, report with AUC / DeLong CI, thresholds, calibration, ROC plots).",
    )
    parser.add_argument("method", choices=METHODS, help="method to train")
    parser.add_argument("--config", type=Path, required=True, help="training configuration (TOML)")
    parser.add_argument("--out", type=Path, required=True, help="package folder to create")
    parser.add_argument("--work", type=Path, help="folder for generated phantom cohorts (kept and reused)")
    parser.add_argument(
        "--params",
        type=Path,
        help="pyradiomics parameter file the features were / are computed with (overrides [radiomics] params; "
        "with a features CSV it makes the package runnable on DICOM studies)",
    )
    parser.add_argument(
        "--scheme",
        choices=("auto", "holdout", "repeated-cv"),
        help="evaluation scheme (overrides [split] scheme; auto = repeated-cv below 200 patients)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start the network from this weights file or SimCLR checkpoint folder (overrides training.init_from)",
    )
    parser.add_argument(
        "--pretrain",
        choices=("simclr",),
        help="m3 only: SimCLR self-supervised pretraining on unlabelled lesion crops; --out gets a checkpoint folder",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _override(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Apply ``--params`` / ``--scheme`` / ``--init-from`` to a loaded configuration."""
    from dataclasses import replace

    if args.params is not None:
        params = args.params.resolve()
        if not params.is_file():
            raise ConfigError([f"--params: {params} does not exist"])
        config = replace(config, radiomics=replace(config.radiomics, params=params))
    if args.scheme is not None:
        config = replace(config, split=replace(config.split, scheme=args.scheme))
    if args.init_from is not None:
        if not args.init_from.exists():
            raise ConfigError([f"--init-from: {args.init_from} does not exist"])
        config = replace(config, training=replace(config.training, init_from=args.init_from.resolve()))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pacs-agent train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "response":  # trained from a CSV of per-patient deltas, not from images
        from inference.response.train_cli import main as train_response

        return train_response(argv[1:])
    args = _parser().parse_args(argv)
    from inference.training.config import load_train_config
    from inference.training.report import TextProgress
    from inference.training.train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_train_config(args.config, args.method)
        config = _override(config, args)
        if args.pretrain:
            from inference.training.simclr import pretrain

            if config.method != "m3":
                raise ConfigError([f"--pretrain simclr: only m3 has a SimCLR stage, not {config.method}"])
            checkpoint = pretrain(config, args.out, work_dir=args.work, progress=None if args.quiet else TextProgress())
            print(f"checkpoint: {checkpoint.folder}")
            print(
                f"  {checkpoint.crops} crops of {checkpoint.lesions} lesions, {checkpoint.epochs} epochs, "
                f"NT-Xent {checkpoint.first_loss:.3f} -> {checkpoint.last_loss:.3f}"
            )
            print(f"next: pacs-agent train m3 --config ... --init-from {checkpoint.folder} --out PKG_DIR")
            return EXIT_OK
        result = train(config, args.out, work_dir=args.work, progress=None if args.quiet else TextProgress())
    except ConfigError as exc:
        print(f"pacs-agent train: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except PacsAgentError as exc:
        print(f"pacs-agent train: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"package: {result.package}")
    if result.cross_validation is not None:
        cv = result.cross_validation
        for r in cv.labels:
            lo, hi = r.pooled.auc_ci
            p = f", permutation p {r.permutation_p:.3f}" if r.null else ""
            print(
                f"  {r.label}: pooled out-of-fold AUC {r.pooled.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
                f"{cv.folds}-fold x {cv.plan.repeats}: {r.repeat_mean:.3f} +- {r.repeat_sd:.3f}{p}"
            )
        print("  final model fit on all patients with the same recipe")
    for ev in result.test or result.validation:
        lo, hi = ev.auc_ci
        split = "test" if result.test else "validation"
        print(
            f"  {ev.label}: {split} AUC {ev.auc:.3f} (95% CI {lo:.3f}-{hi:.3f}), threshold {ev.metrics.threshold:.3f}"
        )
    print(f"report: {result.report.get('markdown')}")
    print(f"time: {result.seconds:.0f} s")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
