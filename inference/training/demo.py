"""``make demo-models``: train the committed demo packages from scratch, reproducibly, on the CPU.

For every configuration in ``config/training/*-demo.toml``: generate (once) the planted-label
phantom cohort the configurations share, train, write the package to
``config/models/<package name>/`` (replacing the previous one only after the new one verified),
copy its held-out ROC plot to ``docs/images/roc-<package name>.png`` and print a Markdown table
of the held-out numbers for ``docs/models.md``. Seeds are fixed in the configurations and torch
runs one thread per job, so the same code and library versions give the same torch weights, bit for
bit (skops files differ in their zip member names, not in the forest they hold).

Run: ``python -m inference.training.demo [--jobs 2] [--work DIR] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoResult", "main", "make_demo_models"]

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config" / "training"
MODELS_DIR = ROOT / "config" / "models"
IMAGES_DIR = ROOT / "docs" / "images"


@dataclass(frozen=True)
class DemoResult:
    """One trained demo package and its held-out numbers."""

    name: str
    method: str
    path: Path
    size_bytes: int
    seconds: float
    rows: tuple[tuple[str, int, int, float, float, float, float, float, float], ...]
    """Per label: (label, n, positives, auc, ci low, ci high, threshold, sensitivity, specificity)."""


def _package_size(path: Path) -> int:
    """Bytes of ``model.toml`` and the weight files (what ``models install`` copies)."""
    import tomllib

    manifest = tomllib.loads((path / "model.toml").read_text(encoding="utf-8"))
    files = [path / "model.toml", *(path / w["file"] for w in manifest["weights"].values())]
    return sum(f.stat().st_size for f in files)


def _train_one(config_path: Path, models_dir: Path, work: Path, images_dir: Path, quiet: bool) -> DemoResult:
    from inference.training.config import load_train_config
    from inference.training.report import TextProgress
    from inference.training.train import train

    config = load_train_config(config_path)
    name = config.package["name"]
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        progress = None if quiet else TextProgress(interval=30.0)
        result = train(config, staging / name, work_dir=work, progress=progress)
        target = models_dir / name
        if target.exists():
            shutil.rmtree(target)
        (staging / name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    roc = target / "report" / "roc-test.png"
    if roc.exists():
        shutil.copyfile(roc, images_dir / f"roc-{name}.png")
    rows = tuple(
        (
            ev.label,
            ev.n,
            ev.positives,
            ev.auc,
            ev.auc_ci[0],
            ev.auc_ci[1],
            ev.metrics.threshold,
            ev.metrics.sensitivity,
            ev.metrics.specificity,
        )
        for ev in result.test
    )
    return DemoResult(name, config.method, target, _package_size(target), result.seconds, rows)


def make_demo_models(
    *,
    config_dir: Path = CONFIG_DIR,
    models_dir: Path = MODELS_DIR,
    images_dir: Path = IMAGES_DIR,
    work_dir: Path | None = None,
    jobs: int = 1,
    only: Sequence[str] = (),
    quiet: bool = False,
) -> list[DemoResult]:
    """Train every ``*-demo.toml`` configuration into ``models_dir``.

    Parameters
    ----------
    config_dir
        Folder of the demo training configurations.
    models_dir
        Where the packages go (``<package name>/``).
    images_dir
        Where the held-out ROC plots are copied (``roc-<package name>.png``).
    work_dir
        Where the phantom cohorts are generated (kept); default a temporary folder.
    jobs
        Trainings run in parallel (each with one torch thread).
    only
        Configuration stems to train (default: all).
    quiet
        No progress output.

    Returns
    -------
    list of DemoResult
        In configuration order.
    """
    from inference.training.config import load_train_config
    from inference.training.phantom_data import cohort_folder, make_phantom_cohort
    from inference.training.report import TextProgress

    configs = sorted(config_dir.glob("*-demo.toml"))
    if only:
        configs = [c for c in configs if c.stem in only]
    if not configs:
        raise FileNotFoundError(f"no *-demo.toml configuration in {config_dir} (selected: {list(only) or 'all'})")
    with tempfile.TemporaryDirectory(prefix="pacs-agent-demo-") as tmp:
        work = work_dir or Path(tmp)
        progress = TextProgress(interval=30.0)
        specs = {}
        for path in configs:  # generate the shared cohorts once, before any parallel job
            spec = load_train_config(path).data.phantom
            if spec is not None:
                specs[cohort_folder(work, spec)] = spec
        if jobs <= 1:
            for folder, spec in specs.items():
                make_phantom_cohort(folder, spec, progress=None if quiet else lambda d, t: progress("phantoms", d, t))
            return [_train_one(c, models_dir, work, images_dir, quiet) for c in configs]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(make_phantom_cohort, folder, spec) for folder, spec in specs.items()]:
                future.result()
            futures = [pool.submit(_train_one, c, models_dir, work, images_dir, True) for c in configs]
            return [f.result() for f in futures]


def markdown_table(results: Sequence[DemoResult]) -> str:
    """The held-out results as the Markdown table of ``docs/models.md``."""
    lines = [
        "| package | method | label | test lesions (mutant) | AUC (95% CI, DeLong) | threshold | sensitivity | "
        "specificity | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, n, pos, auc, lo, hi, thr, sens, spec in r.rows:
            lines.append(
                f"| `{r.name}` | {r.method} | {label} | {n} ({pos}) | {auc:.3f} ({lo:.3f}-{hi:.3f}) | {thr:.3f} | "
                f"{sens:.3f} | {spec:.3f} | {r.size_bytes / 1e6:.2f} MB |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``make demo-models``."""
    parser = argparse.ArgumentParser(prog="python -m inference.training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="trainings in parallel (default 1)")
    parser.add_argument("--work", type=Path, help="keep the phantom cohorts in this folder")
    parser.add_argument("--only", nargs="*", default=[], help="configuration stems, e.g. m1-kras-demo")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the packages go")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    results = make_demo_models(
        models_dir=args.models_dir, work_dir=args.work, jobs=args.jobs, only=args.only, quiet=args.quiet
    )
    total = sum(r.size_bytes for r in results)
    print(markdown_table(results))
    print(f"\n{len(results)} package(s), {total / 1e6:.2f} MB together, {time.monotonic() - started:.0f} s")
    for r in results:
        print(f"  {r.name}: trained in {r.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
