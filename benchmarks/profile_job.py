"""Where a job's time goes: py-spy samples of the worker process while it processes one study.

A node (``pacs-agent serve``, methods from ``--methods``, default M1 + radiomics) receives a
300-slice 512x512 CT + SEG with 3 lesions; py-spy (``.venv/bin/py-spy``) samples the worker
process 100 times a second, idle included, from before the study arrives until its jobs ended.
A first, smaller study warms the worker up (model packages loaded) and is not profiled, so the
profile is of a warm worker as in the latency benchmark's warm rounds.

Reported for the worker's busiest thread: the inclusive share of wall time of each function of
pacs-agent's own code (``pacs_agent``, ``inference``, ``dicom_sr``) - a flat call tree - and the
self time by library at the leaf (numpy, torch, radiomics, SimpleITK, pydicom, ...), with the
job run times from the node's database.

Usage:  .venv/bin/python benchmarks/profile_job.py [--methods m1 radiomics] [--slices 300]
Writes: benchmarks/results/profile_job.json
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    NodeProcess,
    cpu_seconds,
    descendants,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    require_tools,
    send_concurrently,
    wait_until,
    write_results,
)
from latency import parse_time, prepare_models, study_facts
from profile_ingest import PY_SPY, parse_frame

from inference.phantom import generate_study

WORK = WORK_ROOT / "profile_job"
OWN = ("pacs_agent/", "inference/", "dicom_sr/")
WAITS = {"wait", "sleep", "select", "poll", "_wait_for_tstate_lock", "get", "join"}


def own_code(path: str) -> str | None:
    for package in OWN:
        if f"/{package}" in path or path.startswith(package):
            rel = path[path.index(package) :]
            return rel
    return None


def leaf_library(path: str) -> str:
    """The top-level package of a frame's file (py-spy shortens site-packages paths to ``pkg/mod.py``)."""
    own = own_code(path)
    if own:
        return own.split("/", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if not path.startswith("/") and "/" in path:
        return path.split("/", 1)[0]
    return "python stdlib" if "/lib/python" in path or "/" not in path else Path(path).stem


def analyse(raw: Path) -> dict[str, Any]:
    threads: dict[str, list[tuple[list[tuple[str, str, int]], int]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        frames = [parse_frame(p) for p in parts[1:] if p]
        if frames:
            threads[parts[0].split(":")[0].strip()].append((frames, int(count)))

    def busy(samples: list[tuple[list[tuple[str, str, int]], int]]) -> int:
        return sum(c for f, c in samples if f[-1][0].rsplit(".", 1)[-1] not in WAITS)

    thread = max(threads, key=lambda t: busy(threads[t]))
    samples = threads[thread]
    total = sum(c for _, c in samples)
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        seen = set()
        for func, file, _line in frames:
            rel = own_code(file)
            if rel and (func, rel) not in seen:
                seen.add((func, rel))
                inclusive[f"{func} ({rel})"] += count
        func, file, _ = frames[-1]
        short = func.rsplit(".", 1)[-1]
        leaf["waiting / idle" if short in WAITS else f"{leaf_library(file)}: {short} ({Path(file).name})"] += count
    by_library: collections.Counter[str] = collections.Counter()
    for name, count in leaf.items():
        by_library[name.split(":", 1)[0]] += count
    return {
        "thread": thread,
        "samples": total,
        "own_functions_inclusive": {k: round(v / total, 4) for k, v in inclusive.most_common(40)},
        "leaf_functions_self": {k: round(v / total, 4) for k, v in leaf.most_common(30)},
        "leaf_library_self": {k: round(v / total, 4) for k, v in by_library.most_common()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["m1", "radiomics"])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rate", type=int, default=100)
    args = parser.parse_args()
    require_tools("storescu")
    if not PY_SPY.exists():
        sys.exit("py-spy is not installed in .venv")
    load_start = load_average()
    fresh_dir(WORK)
    package_source = prepare_models(set(args.methods), WORK / "models")
    warm = generate_study(WORK / "warm", seed=41, lesions=3, slices=40, rows=128, columns=128, segmentation="seg")
    study = generate_study(
        WORK / "study", seed=42, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="seg"
    )
    node = NodeProcess(
        WORK / "node",
        command="serve",
        config_options={"quiet_seconds": 2.0, "methods": args.methods, "models_dir": WORK / "models"},
    )
    node.start()
    assert node.process is not None and warm.seg_file is not None and study.seg_file is not None
    raw = WORK / "profile.txt"
    try:
        send_concurrently(node.port, node.ae_title, [[*warm.ct_files, warm.seg_file]])
        wait_until(lambda: study_facts(node, warm.study_instance_uid, delivered=False), 300, "the warm-up study")
        (worker,) = descendants(node.process.pid)[:1]
        spy = subprocess.Popen(
            [
                *(str(PY_SPY), "record", "--pid", str(worker), "--rate", str(args.rate)),
                *("--format", "raw", "--threads", "--idle", "--output", str(raw)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.5)
        cpu_before = cpu_seconds(worker)
        started = time.monotonic()
        send_concurrently(node.port, node.ae_title, [[*study.ct_files, study.seg_file]])
        facts = wait_until(
            lambda: study_facts(node, study.study_instance_uid, delivered=False), 600, "the results", interval=0.2
        )
        wall = time.monotonic() - started
        cpu = cpu_seconds(worker) - cpu_before
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
    finally:
        node.stop()
    if not raw.exists():
        sys.exit(f"py-spy wrote nothing: {err.decode()[-2000:]}")
    jobs = {
        job[1]: round((parse_time(job[5]) or 0) - (parse_time(job[4]) or 0), 2)  # method: finished - started
        for job in facts["jobs"]
    }
    profile = analyse(raw)
    result = header(
        "profile_job",
        {
            "methods": args.methods,
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": 3,
            "py_spy_rate_hz": args.rate,
            "package_source": package_source,
        },
        load_start,
    )
    result |= {
        "job_run_seconds": jobs,
        "worker_cpu_seconds": round(cpu, 1),
        "wall_seconds_send_to_jobs_done": round(wall, 1),
        "worker_cpu_cores_average": round(cpu / wall, 2),
        "profile": profile,
    }
    path = write_results("profile_job", result)
    print(f"jobs {jobs}; worker CPU {cpu:.1f} s over {wall:.1f} s ({cpu / wall:.2f} cores)")
    print(
        markdown_table(
            ["own function (inclusive)", "share of worker wall time"],
            [[k, f"{v:.1%}"] for k, v in list(profile["own_functions_inclusive"].items())[:30]],
        )
    )
    print(
        markdown_table(
            ["leaf library (self)", "share"], [[k, f"{v:.1%}"] for k, v in profile["leaf_library_self"].items()]
        )
    )
    print(
        markdown_table(
            ["leaf function (self)", "share"], [[k, f"{v:.1%}"] for k, v in profile["leaf_functions_self"].items()]
        )
    )
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
