"""Inference benchmark: CPU time per lesion of M1-M4, against the radiomics pipeline in the same run.

One synthetic study (512 x 512 CT, 3 liver lesions, 2.5 mm slices) goes through every pipeline as the
worker runs it - CT + SEG loading, method input, the model batched over lesions / slices / views,
Grad-CAM heat maps - and, as the peer, through the radiomics pipeline (pyradiomics features, no
model). Each method is measured at two sizes:

- ``paper``: the networks as the papers describe them (M1 80 x 80, 32 channels; M2 Inception-ResNet-v2
  attention trunks at 299 x 299 with ``shared_views`` - the same arithmetic as nine separate trunks,
  one ninth of the memory (70 M instead of 630 M parameters); M3 EfficientNet-B0 at 128 x 128; M4
  DenseNet121 at 160 x 160);
- ``demo``: the demo package of ``config/models`` when one is installed, else a small variant of the
  size the demo packages use (width 0.25 and small inputs).

Random weights (timing does not depend on them). Reported per lesion: the end-to-end pipeline with
and without Grad-CAM, the model alone (``pre_process -> predict -> post_process`` on the prepared
batch), the one-off package load (verify + build, once per worker process), and the ratio to the
radiomics pipeline. The machine is shared, so each round runs the radiomics peer and the method
back to back (same load) and the ratio is taken per round; times are the median (and minimum) of
``--rounds`` rounds after one warm-up, with the load average recorded. Every timed run loads the
study itself, as the first job of a study does (the worker hands the loaded study to the next
method of the same study; that saving is not in these figures).

Usage:  .venv/bin/python benchmarks/inference.py [--rounds 3] [--threads 1] [--sizes paper demo]
Writes: benchmarks/results/inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference.imaging.roi import VIEW_NAMES, m1_input, m2_input, m3_input, m4_input  # noqa: E402
from inference.networks import DeepRadInput, MultiViewInput, build_network  # noqa: E402
from inference.phantom import generate_study  # noqa: E402
from inference.pipelines import PIPELINES  # noqa: E402
from inference.pipelines.m2_egfr_kras import covariates_from_header  # noqa: E402
from inference.pipelines.model_methods import (  # noqa: E402
    clear_cache,
    find_package,
    installed_package,
    resolve_package,
)
from inference.pipelines.study import LoadedStudy, load_study  # noqa: E402
from inference.registry import ModelPackage, write_package  # noqa: E402
from pacs_agent import __version__  # noqa: E402
from pacs_agent.config import DEMO_MODELS_DIR  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "inference.json"
METHODS = ("m1", "m2", "m3", "m4")
LABELS = {"m1": ["KRAS"], "m2": ["EGFR", "KRAS"], "m3": ["KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER"], "m4": ["EGFR"]}
NORMALISATION = {
    "m1": {"mean": 40.0, "std": 100.0},
    "m2": {"mean": -300.0, "std": 400.0, "age_mean": 62.0, "age_std": 10.0},
    "m3": {"mean": 110.0, "std": 60.0},
    "m4": {"mean": 0.0, "std": 300.0},
}
RADSCORE = {
    "tumour": {
        "features": ["original_firstorder_Mean", "original_glcm_Contrast", "original_shape_Sphericity"],
        "coefficients": [0.5, -0.2, 0.3],
        "mean": [60.0, 20.0, 0.8],
        "std": [20.0, 10.0, 0.1],
        "intercept": 0.0,
    },
    "peritumoral": {
        "features": ["original_firstorder_Mean", "original_glcm_Contrast"],
        "coefficients": [0.4, 0.1],
        "mean": [50.0, 30.0],
        "std": [30.0, 15.0],
        "intercept": 0.0,
    },
}
SIZES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    # method -> (architecture, input)
    "paper": {
        "m1": ({}, {"shape": [80, 80], "margin_px": 20}),
        "m2": ({"shared_views": True}, {"shape": [9, 299, 299]}),
        "m3": ({}, {"shape": [128, 128]}),
        "m4": ({}, {"shape": [160, 160], "radscore": RADSCORE}),
    },
    "demo": {
        "m1": ({"width": 0.25}, {"shape": [48, 48], "margin_px": 8}),
        "m2": (
            {
                "width": 0.0625,
                "repeats": [1, 1, 1],
                "mask_depths": [1, 1, 1],
                "head_dims": [32, 16],
                "shared_views": True,
            },
            {"shape": [9, 75, 75], "cube_mm": 48.0},
        ),
        "m3": ({"width": 0.25, "depth": 0.25, "heads": 4}, {"shape": [64, 64]}),
        "m4": ({"width": 0.25, "blocks": [2, 2, 2, 2], "hidden": 32}, {"shape": [64, 64], "radscore": RADSCORE}),
    },
}


def write_random_package(directory: Path, method: str, size: str) -> Path:
    architecture, spec = SIZES[size][method]
    torch.manual_seed(0)
    network = build_network(method, LABELS[method], architecture)
    metadata = {
        "name": f"bench-{method}-{size}",
        "version": "0.0.0",
        "method": method,
        "labels": LABELS[method],
        "validation_status": "RESEARCH",
        "intended_use": "Benchmark only (random weights).",
        "input": spec,
        "architecture": architecture,
        "normalisation": NORMALISATION[method],
        "thresholds": dict.fromkeys(LABELS[method], 0.5),
        "training_data": {"description": "none (random weights)"},
        "metrics": {},
    }
    return write_package(directory, metadata, {"model": ("model.pt", network)})


def model_only(package: ModelPackage, study: LoadedStudy, ct_file: Path) -> Callable[[], object]:
    """The model step alone, on the batch the pipeline would build (inputs prepared beforehand)."""
    spec, net, vol, spacing = package.input_spec, package.model, study.volume.array, study.spacing_zyx
    shape = [int(s) for s in spec["shape"]]
    masks = [item.lesion.mask for item in study.lesions]
    if package.method == "m1":
        batch: Any = np.stack(
            [m1_input(vol, m, None, margin_px=spec.get("margin_px", 20), size=shape).image for m in masks]
        )
    elif package.method == "m2":
        views = [m2_input(vol, m, spacing, None, cube_mm=spec.get("cube_mm", 64.0), view_size=shape[1:]) for m in masks]
        covariates = covariates_from_header(__import__("pydicom").dcmread(ct_file, stop_before_pixels=True))
        batch = MultiViewInput(
            np.stack([np.stack([v.views[n] for n in VIEW_NAMES]) for v in views]), (covariates,) * len(masks)
        )
    elif package.method == "m3":
        batch = np.concatenate([np.stack([s.image for s in m3_input(vol, m, spacing, size=shape)]) for m in masks])
    else:
        patches = np.stack([m4_input(vol, m, spacing, patch_size=shape).patch_hu for m in masks])
        batch = DeepRadInput(patches, np.zeros((len(masks), 2), dtype=np.float32))
    return lambda: net(batch)


def timed(fn: Callable[[], object], rounds: int, *, warm_up: bool = True) -> list[float]:
    if warm_up:
        fn()  # allocator, lazy initialisation
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Run each function once per round, in turn, so that they share the machine's load of that round."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += timed(fn, 1, warm_up=False)
    return times


def comparator_row(ct: list[Path], seg: Path, lesions: int, rounds: int) -> dict[str, Any] | None:
    """The radiomics comparator with its demo package, interleaved with the radiomics peer (None without one)."""
    path = find_package("radiomics", [DEMO_MODELS_DIR])
    if path is None:
        print("comparator: no demo package installed; skipped")
        return None
    clear_cache()
    start = time.perf_counter()
    package = resolve_package(path, "radiomics")
    load_seconds = time.perf_counter() - start
    times = interleaved(
        {
            "peer": lambda: PIPELINES["radiomics"](ct, seg),
            "with_cam": lambda: PIPELINES["comparator"](ct, seg, model=package),
        },
        rounds,
    )
    ratios = [a / b for a, b in zip(times["with_cam"], times["peer"], strict=True)]
    row = {
        "method": "comparator",
        "size": "demo",
        "weights": f"demo package {package.name} {package.version}",
        "input": "pyradiomics features of every lesion, then the package's selected features",
        "package_load_seconds": round(load_seconds, 3),
        "pipeline_seconds_per_lesion": round(statistics.median(times["with_cam"]) / lesions, 4),
        "pipeline_seconds_per_lesion_min": round(min(times["with_cam"]) / lesions, 4),
        "radiomics_seconds_per_lesion": round(statistics.median(times["peer"]) / lesions, 4),
        "ratio_to_radiomics": round(statistics.median(ratios), 2),
        "rounds_seconds": [round(t, 4) for t in times["with_cam"]],
        "radiomics_rounds_seconds": [round(t, 4) for t in times["peer"]],
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(
        f"comparator demo: {row['pipeline_seconds_per_lesion']:.3f} s/lesion = {row['ratio_to_radiomics']:.2f} x "
        f"radiomics ({row['radiomics_seconds_per_lesion']:.3f} s/lesion); load {load_seconds:.1f} s"
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--sizes", nargs="+", default=["paper", "demo"], choices=["paper", "demo"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--no-comparator", action="store_true", help="skip the radiomics comparator (its demo package) row"
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix="pacs-agent-bench-inference-"))
    try:
        study_files = generate_study(
            work / "study", seed=5, lesions=args.lesions, slices=args.slices, rows=args.rows, columns=args.rows
        )
        ct, seg = study_files.ct_files, study_files.seg_file
        study = load_study(ct, seg)
        lesions = len(study.lesions)
        print(f"study: {args.rows}x{args.rows}x{args.slices}, {lesions} lesions; torch threads {args.threads}")
        peer = timed(lambda: PIPELINES["radiomics"](ct, seg), args.rounds)
        peer_per_lesion = statistics.median(peer) / lesions
        load_only = timed(lambda: load_study(ct, seg), args.rounds)
        print(
            f"radiomics (peer): {peer_per_lesion:.3f} s per lesion; study loading {statistics.median(load_only):.3f} s"
        )
        rows = []
        for size in args.sizes:
            for method in args.methods:
                clear_cache()
                source = "random weights"
                demo = None
                if size == "demo":
                    try:
                        demo = installed_package(method, [DEMO_MODELS_DIR])
                        source = f"demo package {demo.name} {demo.version}"
                    except Exception:  # no demo package of the method (yet): the built-in small variant
                        demo = None
                path = demo.path if demo is not None else write_random_package(work / f"{method}-{size}", method, size)
                clear_cache()
                start = time.perf_counter()
                package = resolve_package(path, method)
                _ = package.model
                load_seconds = time.perf_counter() - start
                params = sum(p.numel() for p in package.model.network.parameters())
                times = interleaved(
                    {
                        "peer": lambda: PIPELINES["radiomics"](ct, seg),
                        "with_cam": lambda m=method, p=package: PIPELINES[m](ct, seg, model=p),
                        "without": lambda m=method, p=package: PIPELINES[m](ct, seg, model=p, explain=False),
                        "model": model_only(package, study, ct[0]),
                    },
                    args.rounds,
                )
                with_cam, without, model, peer_here = (times[k] for k in ("with_cam", "without", "model", "peer"))
                ratios = [a / b for a, b in zip(with_cam, peer_here, strict=True)]
                row = {
                    "method": method,
                    "size": size,
                    "weights": source,
                    "architecture": dict(package.architecture),
                    "input_shape": list(package.input_spec["shape"]),
                    "parameters": params,
                    "package_load_seconds": round(load_seconds, 3),
                    "pipeline_seconds_per_lesion": round(statistics.median(with_cam) / lesions, 4),
                    "pipeline_seconds_per_lesion_min": round(min(with_cam) / lesions, 4),
                    "pipeline_no_gradcam_seconds_per_lesion": round(statistics.median(without) / lesions, 4),
                    "pipeline_no_gradcam_seconds_per_lesion_min": round(min(without) / lesions, 4),
                    "model_seconds_per_lesion": round(statistics.median(model) / lesions, 4),
                    "model_seconds_per_lesion_min": round(min(model) / lesions, 4),
                    "radiomics_seconds_per_lesion": round(statistics.median(peer_here) / lesions, 4),
                    "ratio_to_radiomics": round(statistics.median(ratios), 2),
                    "rounds_seconds": [round(t, 4) for t in with_cam],
                    "radiomics_rounds_seconds": [round(t, 4) for t in peer_here],
                    "load_average": round(os.getloadavg()[0], 2),
                }
                rows.append(row)
                print(
                    f"{method} {size:<5} {params:>11,} params: {row['pipeline_seconds_per_lesion']:.3f} s/lesion "
                    f"(min {row['pipeline_seconds_per_lesion_min']:.3f}; no Grad-CAM "
                    f"{row['pipeline_no_gradcam_seconds_per_lesion']:.3f}, "
                    f"model {row['model_seconds_per_lesion']:.3f}; "
                    f"load {load_seconds:.1f} s) = {row['ratio_to_radiomics']:.2f} x radiomics "
                    f"({row['radiomics_seconds_per_lesion']:.3f} s/lesion); load average {row['load_average']}"
                )
        if not args.no_comparator:
            row = comparator_row(ct, seg, lesions, args.rounds)
            if row is not None:
                rows.append(row)
        result = {
            "benchmark": "inference",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "pacs_agent_version": __version__,
            "torch_version": torch.__version__,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": args.threads,
                "device": "cpu",
                "load_average_at_start": load_at_start,
            },
            "study": {"rows": args.rows, "columns": args.rows, "slices": args.slices, "lesions": lesions},
            "rounds": args.rounds,
            "peer": {
                "method": "radiomics",
                "seconds_per_lesion": round(peer_per_lesion, 4),
                "seconds_per_lesion_min": round(min(peer) / lesions, 4),
                "rounds_seconds": [round(t, 4) for t in peer],
                "study_loading_seconds": round(statistics.median(load_only), 4),
                "study_loading_seconds_min": round(min(load_only), 4),
                "note": "measured once at the start; every result row also has the peer of its own rounds",
            },
            "results": rows,
            "notes": (
                "Per lesion = end-to-end pipeline time (CT + SEG loading, method input, model, Grad-CAM) divided "
                "by the number of lesions; median (and min) of the rounds after one warm-up; the peer ran in the "
                "same rounds, ratio = median of the per-round ratios. Shared machine: see load_average. "
                "M2 'paper' uses shared_views=True: the same computation as the paper's nine trunks with one "
                "ninth of the parameters. Random weights except where 'weights' names a demo package."
            ),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
