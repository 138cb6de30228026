"""Peak resident memory of the receiving process for one 1 GB multi-frame instance (issue 15, item 7).

A fresh ``pacs-agent scp`` receives one Enhanced CT of ``--megabytes`` MB of native Pixel Data
(512 x 512 frames, written frame by frame by tests/integration/large_instance.py and sent from its
file with pynetdicom's chunked send, so the sender holds no copy either). The benchmark reads
``VmHWM`` (the kernel's peak resident set size) of the node process from ``/proc/<pid>/status``
right after start-up and after the C-STORE was answered, checks that the spooled dataset has the
SHA-256 of the sent one, and records the time from the request to the answer. With
``--baseline <tree>`` the same is measured for the code in another checkout (e.g. the commit
before streaming, which held the whole instance in memory). Target: peak RSS < 300 MB.

Usage:  .venv/bin/python benchmarks/memory_receive.py [--megabytes 1024] [--baseline /tmp/before]
Writes: benchmarks/results/memory_receive.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    WORK_ROOT,
    NodeProcess,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    patched_environ,
    write_results,
)

from tests.integration.large_instance import (
    LargeInstance,
    dataset_sha256,
    peak_rss_bytes,
    send_large,
    write_large_ct,
)

WORK = WORK_ROOT / "memory_receive"
MB = 1024 * 1024
TARGET_MB = 300


def measure(tree: Path, instance: LargeInstance, work: Path) -> dict[str, Any]:
    """Start a node of ``tree``, send ``instance``, and read its peak RSS before and after."""
    node = NodeProcess(work, command="scp")
    # ``python -m pacs_agent`` imports from its working directory first: start it in ``tree``.
    with patched_environ({"PYTHONPATH": str(tree)}), contextlib.chdir(tree):
        node.start()
    assert node.process is not None
    try:
        idle = peak_rss_bytes(node.process.pid)
        start = time.perf_counter()
        status = send_large(node.port, instance)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes(node.process.pid)
        stored = list((work / "state" / "spool").rglob(f"{instance.sop_instance_uid}.dcm"))
        intact = len(stored) == 1 and dataset_sha256(stored[0]) == instance.dataset_sha256
    finally:
        node.stop()
    return {
        "tree": str(tree),
        "status": f"0x{status:04X}" if status is not None else None,
        "stored_intact": intact,
        "peak_rss_after_start_mb": round(idle / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "store_seconds": round(seconds, 2),
        "throughput_mb_per_s": round(instance.size / MB / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    args = parser.parse_args()
    load_start = load_average()
    fresh_dir(WORK)
    print(f"writing a {args.megabytes} MB Enhanced CT ...", flush=True)
    instance = write_large_ct(WORK / "large.dcm", args.megabytes)
    trees = {"pacs-agent": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    runs = {}
    for name, tree in trees.items():
        runs[name] = measure(tree, instance, fresh_dir(WORK / name))
        print(name, runs[name], flush=True)
    instance.path.unlink()
    result = header(
        "memory_receive",
        {"megabytes": args.megabytes, "frames": instance.frames, "instance_bytes": instance.size},
        load_start,
    )
    result["runs"] = runs
    ours = runs["pacs-agent"]
    result["target"] = {
        "peak_rss_mb_below": TARGET_MB,
        "met": bool(ours["stored_intact"] and ours["peak_rss_mb"] < TARGET_MB),
    }
    rows = [
        [
            name,
            run["status"],
            run["stored_intact"],
            run["peak_rss_after_start_mb"],
            run["peak_rss_mb"],
            run["store_seconds"],
        ]
        for name, run in runs.items()
    ]
    headers = ["receiver", "status", "intact", "peak RSS after start (MB)", "peak RSS (MB)", "C-STORE (s)"]
    print(markdown_table(headers, rows))
    print(f"target: {result['target']}; written {write_results('memory_receive', result)}")
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
