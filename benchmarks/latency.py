"""End-to-end latency: last instance received -> SR and SC stored in Orthanc, minus the quiet period, per method.

For each method set (``radiomics``, ``m1``, ``m1`` + ``radiomics``, ``m2``, ``m3``, ``m4``) one
pacs-agent node (``pacs-agent serve``: scp + one worker process) runs with that set in
``[jobs] methods`` and one shared Orthanc as its destination (the PACS). Every round sends each node
a new 300-slice 512x512 CT + SEG with 3 liver lesions (distinct studies, so result UIDs differ),
one node after the other (rounds interleaved over the method sets), and waits until every result
is delivered.

The latency comes from the node's own database: ``max(instances.received_at)`` of the study ->
``max(deliveries.delivered_at)`` of its results, minus ``[readiness] quiet_seconds``. It is
cross-checked with Orthanc: a thread polls Orthanc's ``/changes`` every 0.1 s and notes when each
result instance appeared (same machine clock). The breakdown shows where the time goes: readiness
(quiet period + scheduler tick), queue wait, job run, delivery. Before the rounds every node
processes a small warm-up study (40 slices, 128x128), so that the worker's one-off start-up
(imports, model packages loaded once per worker process) is not in the figures; its latency is
recorded as ``warmup_s``. Target: <= 15 s for M1 + radiomics on 2 cores.

Routing: the nodes run with ``[routing] method_regions = {}`` so that every enabled method runs on
the (abdominal) phantom - M2 and M4 are chest methods and would otherwise be skipped; their timing
does not depend on the body region.

Model packages: the packages of config/models are used when they exist (demo packages); a method
that has none gets a small package written with tests/model_packages.py (random weights; recorded
in the results as ``package_source``).

Usage:  .venv/bin/python benchmarks/latency.py [--rounds 2] [--slices 300] [--quiet 2] [--sets radiomics m1 ...]
Writes: benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    NodeProcess,
    OrthancProcess,
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

from inference.phantom import generate_study
from inference.pipelines.model_methods import find_package
from pacs_agent.config import DEMO_MODELS_DIR

WORK = WORK_ROOT / "latency"
SETS: dict[str, tuple[str, ...]] = {
    "radiomics": ("radiomics",),
    "m1": ("m1",),
    "m1+radiomics": ("m1", "radiomics"),
    "m2": ("m2",),
    "m3": ("m3",),
    "m4": ("m4",),
}
TARGET_SET = "m1+radiomics"
TARGET_SECONDS = 15.0


def parse_time(text: str | None) -> float | None:
    """A timestamp column of the node's SQLite (UTC, naive or aware) as a POSIX time."""
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class OrthancWatcher:
    """Polls Orthanc's change log and notes the time each new instance appeared."""

    def __init__(self, orthanc: OrthancProcess, interval: float = 0.1) -> None:
        self.orthanc = orthanc
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._since = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._since = int(self.orthanc.get("/changes?last")["Last"])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.orthanc.get(f"/changes?since={self._since}&limit=1000")
            except Exception:  # a slow answer under load: try again
                time.sleep(self.interval)
                continue
            now = time.time()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            self._since = int(answer["Last"])
            if answer["Done"]:
                time.sleep(self.interval)

    def arrival_of(self, sop_instance_uids: set[str]) -> dict[str, float]:
        """SOP Instance UID -> when Orthanc had it, for the given UIDs."""
        found = {}
        for orthanc_id, seen_at in list(self.seen.items()):
            tags = self.orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
            uid = tags.get("SOPInstanceUID")
            if uid in sop_instance_uids:
                found[uid] = seen_at
        return found


@dataclass
class MethodNode:
    """One node with one method set."""

    name: str
    methods: tuple[str, ...]
    node: NodeProcess
    rounds: list[dict[str, Any]] = field(default_factory=list)
    warmup_s: float | None = None


def study_facts(node: NodeProcess, study_uid: str, *, delivered: bool = True) -> dict[str, Any] | None:
    """The node's timestamps of a study once all its jobs ended and (``delivered``) its results were delivered."""
    rows = node.query("SELECT id FROM studies WHERE study_instance_uid = ?", [study_uid])
    if not rows:
        return None
    study_id = rows[0][0]
    jobs = node.query(
        "SELECT id, method, state, created_at, started_at, finished_at, last_error FROM jobs WHERE study_id = ?",
        [study_id],
    )
    if not jobs or any(job[2] in ("pending", "running") for job in jobs):
        return None
    failed = [f"{job[1]}: {job[2]}: {job[6]}" for job in jobs if job[2] != "done"]
    if failed:
        raise RuntimeError(f"job(s) did not succeed: {failed}")
    deliveries = node.query(
        "SELECT r.kind, r.method, r.sop_instance_uid, r.job_id, d.state, d.delivered_at, d.last_error "
        "FROM results r JOIN deliveries d ON d.result_id = r.id WHERE r.study_id = ?",
        [study_id],
    )
    if delivered and (not deliveries or any(d[4] != "done" for d in deliveries)):
        if any(d[4] == "dead" for d in deliveries):
            raise RuntimeError(f"delivery dead: {deliveries}")
        return None
    last_received = node.query(
        "SELECT max(i.received_at), min(i.received_at), count(*) FROM instances i "
        "JOIN series s ON i.series_id = s.id WHERE s.study_id = ?",
        [study_id],
    )[0]
    return {"jobs": jobs, "deliveries": deliveries, "last_received": last_received}


def run_round(
    entry: MethodNode, files: list[Path], study_uid: str, quiet: float, watcher: OrthancWatcher, timeout: float
) -> dict[str, Any]:
    sent_seconds, _ = send_concurrently(entry.node.port, entry.node.ae_title, [files])
    sent_at = time.time()
    facts = wait_until(lambda: study_facts(entry.node, study_uid), timeout, f"{entry.name} results", interval=0.2)
    last_received = parse_time(facts["last_received"][0])
    assert last_received is not None
    delivered = [parse_time(d[5]) for d in facts["deliveries"]]
    done_at = max(t for t in delivered if t is not None)
    jobs = []
    for job_id, method, _state, created, started, finished, _error in facts["jobs"]:
        c, s, f = parse_time(created), parse_time(started), parse_time(finished)
        assert c is not None and s is not None and f is not None
        job_delivered = max(parse_time(d[5]) or 0.0 for d in facts["deliveries"] if d[3] == job_id)
        jobs.append(
            {
                "method": method,
                "ready_after_last_received_s": round(c - last_received, 3),
                "queue_wait_s": round(s - c, 3),
                "run_s": round(f - s, 3),
                "delivered_after_finish_s": round(job_delivered - f, 3),
                "end_to_end_minus_quiet_s": round(job_delivered - last_received - quiet, 3),
            }
        )
    uids = {d[2] for d in facts["deliveries"]}
    arrival: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while len(arrival) < len(uids) and time.monotonic() < deadline:
        time.sleep(0.3)
        arrival = watcher.arrival_of(uids)
    orthanc_last = max(arrival.values()) if len(arrival) == len(uids) else None
    return {
        "instances": facts["last_received"][2],
        "send_seconds": round(sent_seconds, 3),
        "receive_span_s": round(last_received - (parse_time(facts["last_received"][1]) or last_received), 3),
        "sender_end_minus_last_received_s": round(sent_at - last_received, 3),
        "results": sorted(f"{d[1]}:{d[0]}" for d in facts["deliveries"]),
        "end_to_end_minus_quiet_s": round(done_at - last_received - quiet, 3),
        "orthanc_arrival_minus_quiet_s": None
        if orthanc_last is None
        else round(orthanc_last - last_received - quiet, 3),
        "jobs": jobs,
        "load_average_1min": load_average()[0],
    }


def prepare_models(methods: set[str], models_dir: Path) -> dict[str, str]:
    """Write small packages for the model methods that have no package in config/models."""
    sources: dict[str, str] = {}
    for method in sorted(m for m in methods if m.startswith("m")):
        found = find_package(method, [DEMO_MODELS_DIR])
        if found is not None:
            sources[method] = f"config/models/{found.name} (demo package)"
            continue
        from tests.model_packages import write_test_package

        models_dir.mkdir(parents=True, exist_ok=True)
        path = write_test_package(models_dir / f"{method}-bench", method)
        sources[method] = f"tests/model_packages.py small package {path.name} (random weights; no demo package)"
    return sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=2.0, help="[readiness] quiet_seconds of the nodes")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    require_tools("storescu", "Orthanc")
    load_start = load_average()
    fresh_dir(WORK)
    wanted = {m for s in args.sets for m in SETS[s]}
    package_source = prepare_models(wanted, WORK / "models")
    orthanc = OrthancProcess(WORK / "orthanc")
    orthanc.start()
    watcher = OrthancWatcher(orthanc)
    watcher.start()
    entries: list[MethodNode] = []
    try:
        for name in args.sets:
            node = NodeProcess(
                WORK / f"node-{name}",
                command="serve",
                config_options={
                    "quiet_seconds": args.quiet,
                    "methods": SETS[name],
                    "destination": (orthanc.ae_title, orthanc.dicom_port),
                    "models_dir": WORK / "models",
                },
            )
            node.start()
            entries.append(MethodNode(name, SETS[name], node))
        warmup = generate_study(
            WORK / "warmup", seed=999, lesions=3, slices=40, rows=128, columns=128, segmentation="seg"
        )  # fmt: skip
        assert warmup.seg_file is not None
        for entry in entries:  # worker start-up (imports, model packages) out of the figures
            done = run_round(
                entry, [*warmup.ct_files, warmup.seg_file], warmup.study_instance_uid, args.quiet, watcher, args.timeout
            )
            entry.warmup_s = done["end_to_end_minus_quiet_s"]
            print(f"warm-up: {entry.name:13s} {entry.warmup_s:6.2f} s", flush=True)
        for round_no in range(args.rounds):
            for n, entry in enumerate(entries):
                seed = 1000 + 100 * round_no + n
                study = generate_study(
                    WORK / "study",
                    seed=seed,
                    lesions=3,
                    slices=args.slices,
                    rows=args.size,
                    columns=args.size,
                    segmentation="seg",
                )
                assert study.seg_file is not None
                files = [*study.ct_files, study.seg_file]
                measured = run_round(entry, files, study.study_instance_uid, args.quiet, watcher, args.timeout)
                measured["round"] = round_no + 1
                entry.rounds.append(measured)
                shutil.rmtree(WORK / "study", ignore_errors=True)
                jobs = ", ".join(f"{j['method']} run {j['run_s']:.1f} s" for j in measured["jobs"])
                print(
                    f"round {round_no + 1}: {entry.name:13s} "
                    f"end-to-end - quiet {measured['end_to_end_minus_quiet_s']:6.2f} s"
                    f" (Orthanc {measured['orthanc_arrival_minus_quiet_s']}) [{jobs}]",
                    flush=True,
                )
    finally:
        watcher.stop()
        for entry in entries:
            entry.node.stop()
        orthanc.stop()

    sets: dict[str, Any] = {}
    rows = []
    for entry in entries:
        warm = entry.rounds
        e2e = [r["end_to_end_minus_quiet_s"] for r in warm]
        orth = [r["orthanc_arrival_minus_quiet_s"] for r in warm if r["orthanc_arrival_minus_quiet_s"] is not None]
        per_method: dict[str, Any] = {}
        for method in entry.methods:
            runs = [j for r in warm for j in r["jobs"] if j["method"] == method]
            per_method[method] = {
                key: round(statistics.median(j[key] for j in runs), 3)
                for key in ("ready_after_last_received_s", "queue_wait_s", "run_s", "delivered_after_finish_s")
            }
        sets[entry.name] = {
            "methods": list(entry.methods),
            "warmup_s": entry.warmup_s,
            "end_to_end_minus_quiet_s": spread(e2e),
            "orthanc_arrival_minus_quiet_s": spread(orth) if orth else None,
            "breakdown_median": per_method,
            "rounds": entry.rounds,
        }
        run_total = sum(v["run_s"] for v in per_method.values())
        rows.append(
            [
                entry.name,
                f"{spread(e2e)['median']:.1f} ({min(e2e):.1f}-{max(e2e):.1f})",
                f"{spread(orth)['median']:.1f}" if orth else "-",
                f"{run_total:.1f}",
                ", ".join(f"{m} {v['run_s']:.1f}" for m, v in per_method.items()),
            ]
        )
    targets: dict[str, Any] = {}
    if TARGET_SET in sets:
        value = sets[TARGET_SET]["end_to_end_minus_quiet_s"]["median"]
        targets[f"{TARGET_SET}_<=_{TARGET_SECONDS:g}_s"] = {"seconds": value, "met": value <= TARGET_SECONDS}
    result = header(
        "latency",
        {
            "rounds": args.rounds,
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": 3,
            "segmentation": "DICOM SEG",
            "quiet_seconds": args.quiet,
            "node": "pacs-agent serve (scp + 1 worker process), SQLite, one node per method set",
            "peer": "Orthanc (defaults) as the destination PACS; arrival polled every 0.1 s via /changes",
            "package_source": package_source,
            "routing": "[routing] method_regions = {} (every method runs on the abdominal phantom)",
            "warmup": "one 40-slice 128x128 CT + SEG per node before the rounds (not in the figures)",
        },
        load_start,
    )
    result |= {"sets": sets, "targets": targets}
    path = write_results("latency", result)
    print(
        markdown_table(
            [
                "methods",
                "end-to-end - quiet, s: median (min-max)",
                "Orthanc arrival - quiet, s",
                "job run total, s",
                "job run per method, s",
            ],
            rows,
        )
    )
    print(f"targets: {targets}")
    print(f"packages: {package_source}")
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
