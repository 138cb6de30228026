"""Receiving rate while the worker processes a big study vs idle, with Orthanc under the same load as the peer.

One pacs-agent node (``pacs-agent serve``: scp + one worker process, fsync durability) and one
Orthanc (``TCP_NODELAY=1``, so that Nagle's delayed ACKs do not mask CPU effects) run for the whole
benchmark. Each round:

1. idle: a 300-slice 512x512 CT series (no segmentation, so no job) is sent with storescu to
   pacs-agent and, as the peer, to Orthanc; the worker has nothing to do;
2. loaded: a big study (600-slice CT + SEG, 3 lesions) is sent to pacs-agent, and once its job is
   running another 300-slice CT series is sent to pacs-agent and to Orthanc while the worker
   processes the big study; the benchmark checks from the job rows that the worker was busy for
   the whole send window and records the worker's CPU use during it;
3. the benchmark waits until every job ended (so the next idle phase is idle).

The order pacs-agent / Orthanc alternates per round. Reported: the median rates, the ratio
loaded / idle for pacs-agent and for Orthanc (Orthanc shows what the CPU taken by the worker costs
any receiver on this machine), and whether pacs-agent's loaded / idle ratio is at least Orthanc's
(no starvation beyond CPU sharing). Every series is a distinct study.

Usage:  .venv/bin/python benchmarks/ingest_under_load.py [--rounds 3] [--big-slices 600] [--methods radiomics m1]
Writes: benchmarks/results/ingest_under_load.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    NODELAY,
    WORK_ROOT,
    NodeProcess,
    OrthancProcess,
    cpu_seconds,
    descendants,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    require_tools,
    send_concurrently,
    spread,
    wait_until,
    write_results,
)
from latency import parse_time, prepare_models

from inference.phantom import generate_study

WORK = WORK_ROOT / "ingest_under_load"


def send_timed(port: int, aec: str, files: list[Path]) -> float:
    seconds, _ = send_concurrently(port, aec, [files])
    return seconds


def jobs_of(node: NodeProcess, study_uid: str) -> list[tuple[Any, ...]]:
    return node.query(
        "SELECT j.state, j.started_at, j.finished_at FROM jobs j JOIN studies s ON j.study_id = s.id "
        "WHERE s.study_instance_uid = ?",
        [study_uid],
    )


def busy_fraction(jobs: list[tuple[Any, ...]], start: float, end: float) -> float:
    """Share of [start, end] during which at least one job of the list was running."""
    intervals = []
    for _state, started, finished in jobs:
        s = parse_time(started)
        if s is None:
            continue
        f = parse_time(finished) or time.time()
        intervals.append((max(s, start), min(f, end)))
    covered, cursor = 0.0, start
    for s, f in sorted(intervals):
        s = max(s, cursor)
        if f > s:
            covered += f - s
            cursor = f
    return covered / (end - start) if end > start else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--big-slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["radiomics", "m1"])
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the job started before sending")
    args = parser.parse_args()
    require_tools("storescu", "Orthanc")
    load_start = load_average()
    fresh_dir(WORK)
    package_source = prepare_models(set(args.methods), WORK / "models")
    print("generating the series ...", flush=True)
    series: list[list[Path]] = []
    for n in range(2 * args.rounds):
        study = generate_study(
            WORK / f"ct{n}", seed=2000 + n, lesions=3, slices=args.slices, rows=args.size, columns=args.size,
            segmentation="none",
        )  # fmt: skip
        series.append(list(study.ct_files))
    orthanc = OrthancProcess(WORK / "orthanc")
    orthanc.start(env=NODELAY)
    node = NodeProcess(
        WORK / "node",
        command="serve",
        config_options={"quiet_seconds": 2.0, "methods": args.methods, "models_dir": WORK / "models"},
    )
    node.start()
    assert node.process is not None
    rounds: list[dict[str, Any]] = []
    try:
        for round_no in range(args.rounds):
            order = ["pacs-agent", "orthanc"] if round_no % 2 == 0 else ["orthanc", "pacs-agent"]
            targets = {"pacs-agent": (node.port, node.ae_title), "orthanc": (orthanc.dicom_port, orthanc.ae_title)}
            measured: dict[str, Any] = {"round": round_no + 1, "order": order}
            # idle
            for name in order:
                measured[f"{name}_idle_s"] = send_timed(*targets[name], series[2 * round_no])
            # loaded: a big study, then the sends while its job runs
            big = generate_study(
                WORK / "big", seed=3000 + round_no, lesions=3, slices=args.big_slices, rows=args.size,
                columns=args.size, segmentation="seg",
            )  # fmt: skip
            assert big.seg_file is not None
            send_timed(node.port, node.ae_title, [*big.ct_files, big.seg_file])
            wait_until(
                lambda uid=big.study_instance_uid: any(j[0] == "running" for j in jobs_of(node, uid)),
                120,
                "the big study's job to start",
                interval=0.05,
            )
            time.sleep(args.settle)
            workers = descendants(node.process.pid)
            cpu_before = sum(cpu_seconds(p) for p in workers)
            start = time.time()
            for name in order:
                measured[f"{name}_loaded_s"] = send_timed(*targets[name], series[2 * round_no + 1])
                measured[f"{name}_loaded_window"] = (start, time.time())
                start = time.time()
            cpu_used = sum(cpu_seconds(p) for p in workers) - cpu_before
            window_start = min(measured[f"{n}_loaded_window"][0] for n in order)
            window_end = max(measured[f"{n}_loaded_window"][1] for n in order)
            wait_until(
                lambda uid=big.study_instance_uid: all(j[0] not in ("pending", "running") for j in jobs_of(node, uid)),
                900,
                "the big study's jobs to end",
                interval=0.5,
            )
            jobs = jobs_of(node, big.study_instance_uid)
            measured["jobs"] = [j[0] for j in jobs]
            for name in order:
                s, e = measured.pop(f"{name}_loaded_window")
                measured[f"{name}_worker_busy_fraction"] = round(busy_fraction(jobs, s, e), 3)
            measured["worker_cpu_cores_during_loaded_sends"] = round(cpu_used / (window_end - window_start), 2)
            measured["load_average_1min"] = load_average()[0]
            shutil.rmtree(WORK / "big", ignore_errors=True)
            rounds.append(measured)
            print(
                f"round {round_no + 1}: "
                + ", ".join(
                    f"{n} idle {args.slices / measured[f'{n}_idle_s']:.1f} / loaded "
                    f"{args.slices / measured[f'{n}_loaded_s']:.1f} inst/s "
                    f"(busy {measured[f'{n}_worker_busy_fraction']})"
                    for n in order
                )
                + f"; worker {measured['worker_cpu_cores_during_loaded_sends']} cores",
                flush=True,
            )
        stored = node.stored()
    finally:
        node.stop()
        orthanc.stop()

    rates: dict[str, Any] = {}
    ratio: dict[str, float] = {}
    for name in ("pacs-agent", "orthanc"):
        idle = [args.slices / r[f"{name}_idle_s"] for r in rounds]
        loaded = [args.slices / r[f"{name}_loaded_s"] for r in rounds]
        per_round = [lo / i for lo, i in zip(loaded, idle, strict=True)]
        rates[name] = {
            "idle_instances_per_second": spread(idle, 1),
            "loaded_instances_per_second": spread(loaded, 1),
            "loaded_vs_idle_per_round": spread(per_round, 2),
        }
        ratio[name] = round(
            rates[name]["loaded_instances_per_second"]["median"] / rates[name]["idle_instances_per_second"]["median"], 2
        )
    fully_busy = all(r["pacs-agent_worker_busy_fraction"] >= 0.99 for r in rounds)
    targets = {
        "pacs-agent_loaded_vs_idle_>=_orthanc_loaded_vs_idle": {
            "pacs-agent": ratio["pacs-agent"],
            "orthanc": ratio["orthanc"],
            "met": ratio["pacs-agent"] >= ratio["orthanc"],
        },
        "worker_busy_during_every_pacs-agent_loaded_send": fully_busy,
    }
    result = header(
        "ingest_under_load",
        {
            "rounds": args.rounds,
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "big_study_slices": args.big_slices,
            "methods": args.methods,
            "settle_seconds": args.settle,
            "node": "pacs-agent serve (scp + 1 worker process), fsync durability, SQLite",
            "peer": "Orthanc (defaults, TCP_NODELAY=1)",
            "sender": "DCMTK storescu -R (TCP_NODELAY=1), one association",
            "package_source": package_source,
        },
        load_start,
    )
    result |= {
        "receivers": rates,
        "loaded_vs_idle": ratio,
        "instances_stored_by_node": stored,
        "targets": targets,
        "rounds": rounds,
    }
    path = write_results("ingest_under_load", result)
    rows = [
        [
            name,
            f"{r['idle_instances_per_second']['median']:.0f} ({r['idle_instances_per_second']['min']:.0f}-"
            f"{r['idle_instances_per_second']['max']:.0f})",
            f"{r['loaded_instances_per_second']['median']:.0f} ({r['loaded_instances_per_second']['min']:.0f}-"
            f"{r['loaded_instances_per_second']['max']:.0f})",
            f"{ratio[name]:.2f}",
        ]
        for name, r in rates.items()
    ]
    print(markdown_table(["receiver", "idle instances/s", "while a job runs, instances/s", "loaded / idle"], rows))
    print(f"targets: {targets}")
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
