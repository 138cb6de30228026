"""Build the DEMO response model package (``config/models/response-demo``) from phantom pairs.

Reproducible: the same arguments give the same phantoms, the same deltas and the same forest
(fixed seeds; scikit-learn ``random_state=0``, one job). Steps:

1. Phantom pairs (:func:`inference.phantom.generate_study` + :func:`generate_follow_up`, 128 x 128
   x 40 CT with a SEG, 1-3 liver lesions). Pair ``i`` is labelled by what was planted:

   - even ``i``: **treatment-sensitive** (label 0): lesion volume x U(0.30, 0.70) and texture
     homogenised (``texture_change="homogenise"``);
   - odd ``i``: **treatment-insensitive** (label 1, high risk): lesion volume x U(0.85, 1.25) and
     the texture left as it was (a new noise / texture realisation of the same kind).

2. :func:`inference.pipelines.response.run_response` (no model) on each pair -> the four
   patient-level deltas (SI4, LoG-z entropy, LoG-x entropy, NGTDM contrast).
3. The first ``--train`` pairs train the random forest (:func:`train_signature`); the next ``--test``
   pairs (other seeds, never seen in training) give the held-out AUC.
4. :func:`write_signature_package` with ``validation_status = "DEMO"``; the held-out AUC, its
   patient count and accuracy at the threshold go into ``[metrics]``. The deltas are written as
   ``deltas.csv`` in the work directory (the training CSV format of ``pacs-agent train response``).

Run from the repository root::

    .venv/bin/python scripts/make_response_demo.py --out config/models/response-demo --force

The package says what it is: every SR and Secondary Capture it produces carries
"DEMO MODEL - NOT FOR CLINICAL USE". It is trained on synthetic phantoms and knows nothing about
patients.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from inference.phantom import generate_follow_up, generate_study  # noqa: E402
from inference.pipelines.response import run_response  # noqa: E402
from inference.response.signature import CSV_COLUMNS, LABEL_COLUMN, train_signature, write_signature_package  # noqa: E402

NAME = "response-demo"
VERSION = "0.1.0"
N_ESTIMATORS = 32
"""Trees of the forest: enough for phantom deltas, and the package stays below 1 MB (skops, ~18 kB a tree)."""
SENSITIVE_SHRINK = (0.30, 0.70)
INSENSITIVE_SHRINK = (0.85, 1.25)
PHANTOM = {"slices": 40, "rows": 128, "columns": 128, "segmentation": "seg", "lesion_texture": "coarse"}


@dataclass(frozen=True)
class PhantomPair:
    """One phantom pair: what was planted and the deltas the pipeline measured."""

    index: int
    label: int
    """1 = treatment-insensitive (high risk), 0 = sensitive."""
    shrink: float
    texture_change: str
    lesions: int
    deltas: tuple[float, ...]


def make_pair(index: int, work: Path) -> PhantomPair:
    """Generate pair ``index`` in ``work`` and measure its deltas (the files are deleted afterwards).

    Parameters
    ----------
    index
        Pair number: the seeds, the label (odd = insensitive) and the planted change derive from it.
    work
        Scratch directory.

    Returns
    -------
    PhantomPair
    """
    rng = np.random.default_rng(7000 + index)
    label = index % 2
    low, high = INSENSITIVE_SHRINK if label else SENSITIVE_SHRINK
    shrink = float(rng.uniform(low, high))
    texture_change = None if label else "homogenise"
    lesions = 1 + index % 3
    root = work / f"pair{index:03d}"
    try:
        baseline = generate_study(root / "baseline", seed=1000 + index, lesions=lesions, **PHANTOM)  # type: ignore[arg-type]
        follow_up = generate_follow_up(
            baseline, root / "follow-up", shrink=shrink, texture_change=texture_change, seed=5000 + index
        )
        assert baseline.seg_file is not None and follow_up.seg_file is not None
        result = run_response(baseline.ct_files, baseline.seg_file, follow_up.ct_files, follow_up.seg_file)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if result.deltas is None:
        raise RuntimeError(f"pair {index}: no deltas ({'; '.join(result.problems)})")
    return PhantomPair(index, label, shrink, texture_change or "none", lesions, result.deltas.vector())


def write_csv(pairs: Sequence[PhantomPair], path: Path) -> Path:
    """Write the deltas and labels in the training CSV format (plus what was planted)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pair", "shrink", "texture_change", "lesions", *CSV_COLUMNS, LABEL_COLUMN])
        for p in pairs:
            label = "insensitive" if p.label else "sensitive"
            writer.writerow(
                [p.index, f"{p.shrink:.4f}", p.texture_change, p.lesions, *(f"{d:.6f}" for d in p.deltas), label]
            )
    return path


def read_csv(path: Path) -> list[PhantomPair]:
    """Read pairs back from a ``deltas.csv`` written by :func:`write_csv` (skips the phantoms)."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            PhantomPair(
                index=int(row["pair"]),
                label=1 if row[LABEL_COLUMN] == "insensitive" else 0,
                shrink=float(row["shrink"]),
                texture_change=row["texture_change"],
                lesions=int(row["lesions"]),
                deltas=tuple(float(row[c]) for c in CSV_COLUMNS),
            )
            for row in csv.DictReader(fh)
        ]


def build(out: Path, *, train: int, test: int, work: Path, deltas: Path | None = None) -> dict[str, float]:
    """Generate the pairs, train on the first ``train``, evaluate on the next ``test``, write the package.

    Parameters
    ----------
    out
        New package directory.
    train, test
        Number of training and held-out pairs.
    work
        Scratch directory (receives ``deltas.csv``).
    deltas
        A ``deltas.csv`` of an earlier run: its pairs are used instead of generating them again.

    Returns
    -------
    dict
        The metrics written into the package.
    """
    from sklearn.metrics import roc_auc_score

    started = time.monotonic()
    if deltas is not None:
        pairs = read_csv(deltas)[: train + test]
        if len(pairs) < train + test:
            raise SystemExit(f"{deltas} holds {len(pairs)} pairs, {train + test} are needed")
    else:
        pairs = []
        for index in range(train + test):
            pairs.append(make_pair(index, work))
            print(f"pair {index + 1}/{train + test}: label {pairs[-1].label}, deltas {np.round(pairs[-1].deltas, 3)}")
        write_csv(pairs, work / "deltas.csv")
    x = np.asarray([p.deltas for p in pairs], dtype=float)
    y = np.asarray([p.label for p in pairs], dtype=int)
    estimator, report = train_signature(x[:train], y[:train], n_estimators=N_ESTIMATORS, random_state=0)
    probability = estimator.predict_proba(x[train:])[:, list(estimator.classes_).index(1)]
    heldout_auc = float(roc_auc_score(y[train:], probability))
    accuracy = float(np.mean((probability > 0.5) == (y[train:] == 1)))
    metrics = {
        **report.as_metrics(),
        "heldout_auc": round(heldout_auc, 4),
        "heldout_patients": int(test),
        "heldout_accuracy": round(accuracy, 4),
    }
    description = (
        f"{train} synthetic phantom pairs (inference.phantom, 128 x 128 x 40 CT, 1-3 liver lesions; seeds from "
        f"scripts/make_response_demo.py): label insensitive = volume x {INSENSITIVE_SHRINK[0]}-{INSENSITIVE_SHRINK[1]} "
        f"with texture unchanged, sensitive = volume x {SENSITIVE_SHRINK[0]}-{SENSITIVE_SHRINK[1]} with texture "
        f"homogenised. Held out: {test} further pairs. No patient data."
    )
    write_signature_package(
        out,
        estimator,
        name=NAME,
        version=VERSION,
        validation_status="DEMO",
        training_description=description,
        metrics=metrics,
        description=(
            "DEMO random forest on the 8-week deltas of SI4, LoG-z entropy, LoG-x entropy and NGTDM contrast, "
            "trained on synthetic phantoms. NOT FOR CLINICAL USE."
        ),
    )
    print(f"wrote {out} in {time.monotonic() - started:.0f} s: {metrics}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the package; exit 1 when the held-out AUC is below 0.95."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "config" / "models" / NAME)
    parser.add_argument("--train", type=int, default=40, help="pairs to train on (default 40)")
    parser.add_argument("--test", type=int, default=20, help="held-out pairs (default 20)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--force", action="store_true", help="replace an existing package at --out")
    parser.add_argument("--deltas", type=Path, default=None, help="reuse the deltas.csv of an earlier run")
    args = parser.parse_args(argv)
    if args.out.exists():
        if not args.force:
            parser.error(f"{args.out} exists; pass --force to replace it")
        shutil.rmtree(args.out)
    with tempfile.TemporaryDirectory(prefix="response-demo-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        metrics = build(args.out, train=args.train, test=args.test, work=work, deltas=args.deltas)
    return 0 if metrics["heldout_auc"] >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
