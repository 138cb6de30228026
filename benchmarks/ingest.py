"""Ingest benchmark: DCMTK storescu to pacs-agent, Orthanc and storescp - CT series by 1 and 4 senders, small instances.

Each receiver runs on loopback, freshly started for every measurement, and stores to disk under
benchmarks/work/. pacs-agent (``pacs-agent scp``, ``[node] receive_processes = "auto"``) keeps its
durability: every file fsync'ed with its directory entry, its Instance row committed
(``synchronous=FULL``), then Success. Orthanc uses its defaults (SQLite index + file storage, no
fsync); DCMTK storescp writes files without fsync, a child process per association (--fork).
Both peers are measured with ``TCP_NODELAY=1`` (Nagle off - the first table and the targets) and
with their defaults (Nagle on, Debian's DCMTK default - the second table). The senders always run
with ``TCP_NODELAY=1``.

Cases:
- ``ct_1``: one storescu sends one 300-slice 512 x 512 CT series (526 KB an instance) over one association;
- ``ct_4``: four storescu at once, each a distinct study; the rate is all instances / wall time
  until the last one finished;
- ``small_1``: one storescu sends 2,000 instances of about 64 KB (181 x 181 CT slices), where
  the per-instance overhead dominates.

Per measurement: instances/s, MB/s and the receiver's CPU seconds per instance (user + system of
the receiver's processes, children included - storescp's per-association children, pacs-agent's
receiving processes). Rounds are interleaved (every receiver, every case, then the next round;
the receiver order rotates) so that machine noise hits all alike; medians, min and max, the ratios
pacs-agent / peer of the medians, and the issue's targets: one sender >= 1x Orthanc, four senders
>= 1x Orthanc and >= 1.5x pacs-agent's own one-sender rate, small instances >= 1x Orthanc (all
with ``TCP_NODELAY=1``). After every measurement the receiver's stored count is checked.

Usage:  .venv/bin/python benchmarks/ingest.py [--slices 300] [--small 2000] [--rounds 2] [--cases ct_1 ct_4 small_1]
Writes: benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from common import (
    NODELAY,
    WORK_ROOT,
    NodeProcess,
    OrthancProcess,
    StorescpProcess,
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
from pydicom import dcmread
from pydicom.uid import generate_uid

from inference.phantom import generate_study
from pacs_agent.receive.processes import process_count

WORK = WORK_ROOT / "ingest"
SMALL_SIDE = 181
"""181 x 181 x 16 bit = 64 KB of pixel data per small instance."""


class Receiver(Protocol):
    """What a receiver under test offers."""

    port: int
    ae_title: str

    def stop(self) -> None: ...


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, with those of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (exited, waited-for children are in ``pid``'s)."""
    return process_cpu(pid) + sum(process_cpu(child) for child in descendants(pid))


def settled(pid: int, expected_processes: int) -> bool:
    """True once ``pid`` has its receiving processes and none of the tree uses CPU (they finished starting)."""
    tree = [pid, *descendants(pid)]
    if len(tree) < expected_processes:
        return False
    before = tree_cpu(pid)
    time.sleep(0.5)
    return tree_cpu(pid) - before < 0.02


def start_pacs_agent(work: Path) -> tuple[Receiver, Callable[[], int], int]:
    node = NodeProcess(work, command="scp", config_options={"receive_processes": "auto"})
    node.start()
    assert node.process is not None
    pid = node.process.pid
    wait_until(lambda: settled(pid, process_count("auto")), 90, "the receiving processes to start")
    return node, node.stored, pid


def start_orthanc(work: Path, env: dict[str, str] | None = None) -> tuple[Receiver, Callable[[], int], int]:
    orthanc = OrthancProcess(work / "orthanc")
    orthanc.start(env=env)

    class View:
        port = orthanc.dicom_port
        ae_title = orthanc.ae_title

        def stop(self) -> None:
            orthanc.stop()

    assert orthanc.process is not None
    return View(), orthanc.count_instances, orthanc.process.pid


def start_storescp(work: Path, env: dict[str, str] | None = None) -> tuple[Receiver, Callable[[], int], int]:
    scp = StorescpProcess(work, env=env or {})
    scp.start()
    assert scp.process is not None
    return scp, scp.stored, scp.process.pid


RECEIVERS: dict[str, Callable[[Path], tuple[Receiver, Callable[[], int], int]]] = {
    "pacs-agent": start_pacs_agent,
    "orthanc-nodelay": lambda w: start_orthanc(w, NODELAY),
    "dcmtk-storescp-nodelay": lambda w: start_storescp(w, NODELAY),
    "orthanc": start_orthanc,
    "dcmtk-storescp": start_storescp,
}
DURABILITY = {
    "pacs-agent": "receive_processes = auto; file fsync'ed with its directory entry (rename then fsync on "
    "ext4/XFS), Instance row committed (SQLite WAL synchronous=FULL, grouped across associations), then Success",
    "orthanc": "defaults (SQLite index, file storage, no fsync); Nagle on (Debian DCMTK default)",
    "orthanc-nodelay": "as orthanc, with TCP_NODELAY=1 in its environment (Nagle off)",
    "dcmtk-storescp": "plain file write, no fsync, --fork (a process per association); Nagle on (Debian DCMTK default)",
    "dcmtk-storescp-nodelay": "plain file write, no fsync, --fork; TCP_NODELAY=1 (Nagle off)",
}
NODELAY_PEERS = ("orthanc-nodelay", "dcmtk-storescp-nodelay")
DEFAULT_PEERS = ("orthanc", "dcmtk-storescp")


def measure(name: str, batches: list[list[Path]], work: Path) -> dict[str, Any]:
    receiver, stored, pid = RECEIVERS[name](work)
    try:
        cpu_before = tree_cpu(pid)
        wall, per_sender = send_concurrently(receiver.port, receiver.ae_title, batches)
        cpu = tree_cpu(pid) - cpu_before
        count = stored()
    finally:
        receiver.stop()
    expected = sum(len(b) for b in batches)
    if count != expected:
        raise RuntimeError(f"{name} stored {count} of {expected} instances")
    return {"seconds": wall, "per_sender_seconds": per_sender, "cpu_seconds": cpu}


def small_instances(work: Path, count: int) -> list[Path]:
    """``count`` CT slices of about 64 KB: one phantom slice, written again with new UIDs."""
    study = generate_study(
        work / "small-source", seed=7, lesions=1, slices=40, rows=SMALL_SIDE, columns=SMALL_SIDE, segmentation="none"
    )
    ds = dcmread(study.ct_files[0])
    ds.SeriesInstanceUID = generate_uid()
    out = work / "small"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n + 1
        path = out / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    shutil.rmtree(work / "small-source", ignore_errors=True)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["ct_1", "ct_4", "small_1"], choices=["ct_1", "ct_4", "small_1"])
    parser.add_argument("--receivers", nargs="+", default=list(RECEIVERS), choices=list(RECEIVERS))
    args = parser.parse_args()
    require_tools("storescu", "storescp", "Orthanc")
    load_start = load_average()
    fresh_dir(WORK)
    studies = []
    for n in range(4 if "ct_4" in args.cases else 1):
        print(f"generating CT series {n + 1}: {args.slices} slices {args.size}x{args.size} ...", flush=True)
        study = generate_study(
            WORK / f"study{n}",
            seed=100 + n,
            lesions=3,
            slices=args.slices,
            rows=args.size,
            columns=args.size,
            segmentation="none",
        )
        studies.append(list(study.ct_files))
    small = small_instances(WORK, args.small) if "small_1" in args.cases else []
    batches = {"ct_1": studies[:1], "ct_4": studies[:4], "small_1": [small]}
    megabytes = {case: sum(f.stat().st_size for b in batches[case] for f in b) / 1e6 for case in args.cases}
    names = ["pacs-agent", *(n for n in args.receivers if n != "pacs-agent")]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {n: {c: [] for c in args.cases} for n in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for case in args.cases:
            for name in order:
                work = fresh_dir(WORK / f"{name}-{case}-{round_no}")
                result = measure(name, batches[case], work)
                shutil.rmtree(work, ignore_errors=True)
                count = sum(len(b) for b in batches[case])
                result["instances_per_second"] = count / result["seconds"]
                result["cpu_ms_per_instance"] = 1000 * result["cpu_seconds"] / count
                result["load_average_1min"] = load_average()[0]
                raw[name][case].append(result)
                print(
                    f"round {round_no + 1} {case:8s} {name:24s} {result['seconds']:6.2f} s "
                    f"{result['instances_per_second']:7.1f} instances/s  CPU {result['cpu_ms_per_instance']:.2f} ms"
                    f"/instance  load {result['load_average_1min']}",
                    flush=True,
                )

    receivers: dict[str, Any] = {}
    rate: dict[str, dict[str, float]] = {}
    for name in names:
        receivers[name] = {"durability": DURABILITY[name]}
        rate[name] = {}
        for case in args.cases:
            rounds = raw[name][case]
            count = sum(len(b) for b in batches[case])
            rates = [r["instances_per_second"] for r in rounds]
            rate[name][case] = spread(rates, 1)["median"]
            receivers[name][case] = {
                "instances": count,
                "megabytes": round(megabytes[case], 1),
                "seconds": spread([r["seconds"] for r in rounds]),
                "instances_per_second": spread(rates, 1),
                "megabytes_per_second_median": round(megabytes[case] * rate[name][case] / count, 1),
                "cpu_ms_per_instance": spread([r["cpu_ms_per_instance"] for r in rounds], 2),
                "per_sender_seconds": [[round(s, 3) for s in r["per_sender_seconds"]] for r in rounds],
                "load_average_1min": [r["load_average_1min"] for r in rounds],
            }
    ratios = {
        case: {f"pacs-agent_vs_{n}": round(rate["pacs-agent"][case] / rate[n][case], 2) for n in names[1:]}
        for case in args.cases
    }
    targets: dict[str, Any] = {}
    if "orthanc-nodelay" in names:
        for case in args.cases:
            value = ratios[case]["pacs-agent_vs_orthanc-nodelay"]
            targets[f"{case}_>=1x_orthanc-nodelay"] = {"ratio": value, "met": value >= 1.0}
    if "ct_1" in args.cases and "ct_4" in args.cases:
        value = round(rate["pacs-agent"]["ct_4"] / rate["pacs-agent"]["ct_1"], 2)
        targets["ct_4_>=1.5x_own_ct_1"] = {"ratio": value, "met": value >= 1.5}

    result = header(
        "ingest",
        {
            "instances_per_series": args.slices,
            "rows": args.size,
            "columns": args.size,
            "small_instances": args.small,
            "small_rows_columns": SMALL_SIDE,
            "megabytes": {case: round(mb, 1) for case, mb in megabytes.items()},
            "rounds": args.rounds,
            "cases": args.cases,
            "sender": "DCMTK storescu -R (TCP_NODELAY=1), one association per sender, distinct studies, loopback",
            "cpu": "user + system seconds of the receiver's process tree during the send, per instance",
        },
        load_start,
    )
    result |= {"receivers": receivers, "ratios": ratios, "targets": targets}
    path = write_results("ingest", result)

    for title, peers in (("TCP_NODELAY=1", NODELAY_PEERS), ("peers with their defaults", DEFAULT_PEERS)):
        rows = []
        for name in ["pacs-agent", *(p for p in peers if p in names)]:
            row: list[Any] = [name]
            for case in args.cases:
                entry = receivers[name][case]
                ips = entry["instances_per_second"]
                ratio = "1" if name == "pacs-agent" else f"{ratios[case][f'pacs-agent_vs_{name}']:.2f}"
                row += [
                    f"{ips['median']:.0f} ({ips['min']:.0f}-{ips['max']:.0f})",
                    f"{entry['megabytes_per_second_median']:.0f}",
                    f"{entry['cpu_ms_per_instance']['median']:.2f}",
                    ratio,
                ]
            rows.append(row)
        cols = ["receiver"]
        for case in args.cases:
            cols += [f"{case} instances/s", "MB/s", "CPU ms/instance", "pacs-agent / peer"]
        print(f"\n{title}")
        print(markdown_table(cols, rows))
    print(f"\ntargets: {targets}")
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    with contextlib.suppress(OSError):
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
