"""Where the worker's peak memory comes from: each stage of a job run in-process, with its own peak RSS.

Runs what the worker runs for one study (600-slice 512x512 CT + SEG, 3 lesions), stage by stage,
in this process: the SEG read, the CT volume, the segment rasterisation, the lesion split, then
each method's whole pipeline (which loads the study again, as every job does) and the DICOM result
objects. Before each stage the kernel's peak-RSS counter of the process is reset (``echo 5 >
/proc/self/clear_refs``), so ``VmHWM`` after the stage is that stage's own peak; reported with the
RSS before and after (what the stage keeps). The first stage also shows the imports (torch,
pyradiomics, ...). Model packages as in benchmarks/latency.py.

Usage:  .venv/bin/python benchmarks/profile_memory.py [--slices 600] [--methods radiomics m1 m2 m3 m4]
Writes: benchmarks/results/profile_memory.json
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    proc_status,
    write_results,
)
from latency import prepare_models

from inference.phantom import generate_study

WORK = WORK_ROOT / "profile_memory"


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


def stage(name: str, func: Callable[[], Any], rows: list[dict[str, Any]]) -> Any:
    gc.collect()
    before = proc_status(os.getpid())["VmRSS"]
    reset_peak()
    started = time.perf_counter()
    value = func()
    seconds = time.perf_counter() - started
    status = proc_status(os.getpid())
    rows.append(
        {
            "stage": name,
            "rss_before_mb": mb(before),
            "peak_mb": mb(status["VmHWM"]),
            "peak_above_before_mb": mb(status["VmHWM"] - before),
            "rss_after_mb": mb(status["VmRSS"]),
            "seconds": round(seconds, 2),
        }
    )
    print(f"{name:45s} peak {mb(status['VmHWM']):7.0f} MB (+{mb(status['VmHWM'] - before):6.0f}) {seconds:6.1f} s")
    return value


def loading_stages(ct: list[Path], seg: Path, rows: list[dict[str, Any]]) -> None:
    """What ``load_study`` does, stage by stage (its arrays are freed on return)."""
    from pydicom import dcmread

    from inference.imaging.lesions import find_lesions
    from inference.imaging.masks import load_segmentation, phase_of_segmentation
    from inference.imaging.volume import load_ct_series

    segmentation = stage("read SEG (dcmread)", lambda: dcmread(seg), rows)
    volume = stage(
        "CT volume (load_ct_series)",
        lambda: load_ct_series(ct, choose_phase=lambda phases: phase_of_segmentation(phases, segmentation)),
        rows,
    )
    masks = stage("rasterise segments (load_segmentation)", lambda: load_segmentation(segmentation, volume), rows)
    stage("split lesions (find_lesions)", lambda: [find_lesions(m, volume) for m in masks if m.ok], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["radiomics", "m1", "m2", "m3", "m4"])
    args = parser.parse_args()
    load_start = load_average()
    fresh_dir(WORK)
    package_source = prepare_models(set(args.methods), WORK / "models")
    study = generate_study(
        WORK / "study", seed=7, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="seg"
    )
    assert study.seg_file is not None
    ct, seg = list(study.ct_files), study.seg_file
    rows: list[dict[str, Any]] = []

    def imports() -> Any:
        import pacs_agent.jobs.execute as execute  # what the worker imports (torch, pyradiomics, highdicom)

        return execute

    execute = stage("imports (worker start)", imports, rows)
    from inference.pipelines import MODEL_METHODS, PIPELINES
    from inference.pipelines.model_methods import installed_package
    from pacs_agent.config import DEMO_MODELS_DIR

    loading_stages(ct, seg, rows)
    dirs = [WORK / "models", DEMO_MODELS_DIR]
    evidence = stage(
        "CT headers for the results (_evidence)",
        lambda: execute._evidence(execute.JobInputs(ct_paths=tuple(ct), segmentation_path=seg)),
        rows,
    )
    for method in args.methods:
        options: dict[str, Any] = {}
        if method in MODEL_METHODS:
            options["model"] = stage(f"{method}: model package load", lambda m=method: installed_package(m, dirs), rows)
        output = stage(f"{method}: whole pipeline", lambda m=method, o=options: PIPELINES[m](ct, seg, **o), rows)
        stage(
            f"{method}: SR + SC objects",
            lambda o=output: execute.build_result_objects(o, evidence[0], evidence[1], datetime.now()),
            rows,
        )
        del output
    result = header(
        "profile_memory",
        {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": 3,
            "methods": args.methods,
            "package_source": package_source,
        },
        load_start,
    )
    result |= {"stages": rows}
    path = write_results("profile_memory", result)
    print(
        markdown_table(
            ["stage", "RSS before MB", "stage peak MB", "peak above before MB", "RSS after MB", "s"],
            [
                [
                    r["stage"],
                    r["rss_before_mb"],
                    r["peak_mb"],
                    r["peak_above_before_mb"],
                    r["rss_after_mb"],
                    r["seconds"],
                ]
                for r in rows
            ],
        )
    )
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
