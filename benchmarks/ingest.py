"""Ingest benchmark: CT series sent with DCMTK storescu to pacs-agent, Orthanc and storescp, 1 and 4 senders.

Each receiver runs on loopback, freshly started for every measurement, and stores to disk under
benchmarks/work/. pacs-agent (``pacs-agent scp``) keeps its durability: fsync of every file and
its directory, a fully synchronous SQLite commit per instance, then Success. Orthanc uses its
defaults (SQLite index + file storage); DCMTK storescp writes files without fsync, a child
process per association (--fork; without it storescp serves one association at a time). Orthanc and
storescp are measured with Nagle's algorithm on (Debian's DCMTK default) and off (TCP_NODELAY=1).

With one sender, one storescu sends one 300-slice 512x512 CT series over one association. With
four senders, four storescu processes start at once, each with a distinct study (different
UIDs), and the aggregate rate is all instances / wall time until the last one finished. Rounds
are interleaved (every receiver, both sender counts, then the next round; the receiver order
rotates per round) so that machine noise hits all alike; medians, min and max are reported,
with the ratios pacs-agent / peer of the median rates, and whether the issue's targets are met:
pacs-agent one-sender rate >= 5x Orthanc's and >= 1x storescp's, and pacs-agent's 4-sender
aggregate rate >= its one-sender rate. After every measurement the receiver's stored count is
checked.

Usage:  .venv/bin/python benchmarks/ingest.py [--slices 300] [--size 512] [--rounds 3] [--senders 1 4]
Writes: benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from common import (
    NODELAY,
    WORK_ROOT,
    NodeProcess,
    OrthancProcess,
    StorescpProcess,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    require_tools,
    send_concurrently,
    spread,
    write_results,
)

from inference.phantom import generate_study

WORK = WORK_ROOT / "ingest"


class Receiver(Protocol):
    """What a receiver under test offers."""

    port: int
    ae_title: str

    def stop(self) -> None: ...


def start_pacs_agent(work: Path) -> tuple[Receiver, Callable[[], int]]:
    node = NodeProcess(work, command="scp")
    node.start()
    return node, node.stored


def start_orthanc(work: Path, env: dict[str, str] | None = None) -> tuple[Receiver, Callable[[], int]]:
    orthanc = OrthancProcess(work / "orthanc")
    orthanc.start(env=env)

    class View:
        port = orthanc.dicom_port
        ae_title = orthanc.ae_title

        def stop(self) -> None:
            orthanc.stop()

    return View(), orthanc.count_instances


def start_storescp(work: Path, env: dict[str, str] | None = None) -> tuple[Receiver, Callable[[], int]]:
    scp = StorescpProcess(work, env=env or {})
    scp.start()
    return scp, scp.stored


RECEIVERS: dict[str, Callable[[Path], tuple[Receiver, Callable[[], int]]]] = {
    "pacs-agent": start_pacs_agent,
    "orthanc": start_orthanc,
    "orthanc-nodelay": lambda w: start_orthanc(w, NODELAY),
    "dcmtk-storescp": start_storescp,
    "dcmtk-storescp-nodelay": lambda w: start_storescp(w, NODELAY),
}
DURABILITY = {
    "pacs-agent": "fsync file + directory, SQLite WAL synchronous=FULL commit per instance, then Success",
    "orthanc": "defaults (SQLite index, file storage, no fsync); Nagle on (Debian DCMTK default)",
    "orthanc-nodelay": "as orthanc, with TCP_NODELAY=1 in its environment (Nagle off)",
    "dcmtk-storescp": "plain file write, no fsync, --fork (a process per association); Nagle on (Debian DCMTK default)",
    "dcmtk-storescp-nodelay": "plain file write, no fsync, --fork; TCP_NODELAY=1 (Nagle off)",
}


def measure(name: str, batches: list[list[Path]], work: Path) -> dict[str, Any]:
    receiver, stored = RECEIVERS[name](work)
    try:
        wall, per_sender = send_concurrently(receiver.port, receiver.ae_title, batches)
        count = stored()
    finally:
        receiver.stop()
    expected = sum(len(b) for b in batches)
    if count != expected:
        raise RuntimeError(f"{name} stored {count} of {expected} instances")
    return {"seconds": wall, "per_sender_seconds": per_sender}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--receivers", nargs="+", default=list(RECEIVERS), choices=list(RECEIVERS))
    args = parser.parse_args()
    require_tools("storescu", "storescp", "Orthanc")
    load_start = load_average()
    fresh_dir(WORK)
    studies = []
    for n in range(max(args.senders)):
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
    megabytes = sum(f.stat().st_size for f in studies[0]) / 1e6
    names = ["pacs-agent", *(n for n in args.receivers if n != "pacs-agent")]
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {n: {s: [] for s in args.senders} for n in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for senders in args.senders:
            for name in order:
                work = fresh_dir(WORK / f"{name}-{senders}-{round_no}")
                result = measure(name, studies[:senders], work)
                shutil.rmtree(work, ignore_errors=True)
                count = senders * args.slices
                result["instances_per_second"] = count / result["seconds"]
                result["load_average_1min"] = load_average()[0]
                raw[name][senders].append(result)
                print(
                    f"round {round_no + 1} senders {senders}: {name:24s} {result['seconds']:6.2f} s "
                    f"{result['instances_per_second']:7.1f} instances/s",
                    flush=True,
                )

    receivers: dict[str, Any] = {}
    rate: dict[str, dict[int, float]] = {}
    for name in names:
        receivers[name] = {"durability": DURABILITY[name]}
        rate[name] = {}
        for senders in args.senders:
            rounds = raw[name][senders]
            rates = [r["instances_per_second"] for r in rounds]
            rate[name][senders] = spread(rates, 1)["median"]
            receivers[name][f"senders_{senders}"] = {
                "instances": senders * args.slices,
                "seconds": spread([r["seconds"] for r in rounds]),
                "instances_per_second": spread(rates, 1),
                "megabytes_per_second_median": round(senders * megabytes * rate[name][senders] / args.slices, 1),
                "per_sender_seconds": [[round(s, 3) for s in r["per_sender_seconds"]] for r in rounds],
                "load_average_1min": [r["load_average_1min"] for r in rounds],
            }
    ratios = {
        f"senders_{s}": {
            f"pacs-agent_vs_{name}": round(rate["pacs-agent"][s] / rate[name][s], 2)
            for name in names
            if name != "pacs-agent"
        }
        for s in args.senders
    }
    targets: dict[str, Any] = {}
    if "pacs-agent" in names and 1 in args.senders:
        one = ratios["senders_1"]
        for peer, factor in (("orthanc", 5.0), ("orthanc-nodelay", 5.0), ("dcmtk-storescp", 1.0)):
            if peer in names:
                targets[f"one_sender_>={factor:g}x_{peer}"] = {
                    "ratio": one[f"pacs-agent_vs_{peer}"],
                    "met": one[f"pacs-agent_vs_{peer}"] >= factor,
                }
        if "dcmtk-storescp-nodelay" in names:
            value = one["pacs-agent_vs_dcmtk-storescp-nodelay"]
            targets[">=1x_dcmtk-storescp-nodelay"] = {"ratio": value, "met": value >= 1.0}
        if max(args.senders) > 1:
            s = max(args.senders)
            value = round(rate["pacs-agent"][s] / rate["pacs-agent"][1], 2)
            targets[f"{s}_senders_aggregate_>=_one_sender"] = {"ratio": value, "met": value >= 1.0}

    result = header(
        "ingest",
        {
            "instances_per_series": args.slices,
            "rows": args.size,
            "columns": args.size,
            "megabytes_per_series": round(megabytes, 1),
            "rounds": args.rounds,
            "senders": args.senders,
            "sender": "DCMTK storescu -R (TCP_NODELAY=1), one association per sender, distinct studies, loopback",
        },
        load_start,
    )
    result |= {"receivers": receivers, "ratios": ratios, "targets": targets}
    path = write_results("ingest", result)

    rows = []
    for name in names:
        row: list[Any] = [name]
        for s in args.senders:
            entry = receivers[name][f"senders_{s}"]
            ips = entry["instances_per_second"]
            row += [
                f"{ips['median']:.0f} ({ips['min']:.0f}-{ips['max']:.0f})",
                "1" if name == "pacs-agent" else f"{ratios[f'senders_{s}'][f'pacs-agent_vs_{name}']:.2f}",
            ]
        rows.append(row)
    cols = ["receiver"]
    for s in args.senders:
        cols += [f"{s} sender(s): instances/s median (min-max)", "pacs-agent / peer"]
    print(markdown_table(cols, rows))
    print(f"targets: {targets}")
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
