"""Where pacs-agent's receive CPU goes: CPU seconds per instance, per stage, against the floors of its DICOM stacks.

The machine is shared, so this measures CPU time, not wall time: the receiving AE runs in this
process (``ReceiveServer`` with the node's own handlers, spool and SQLite database, as ``pacs-agent
scp`` runs it), one DCMTK storescu (``TCP_NODELAY=1``) sends a CT series over one association, and

- the process CPU (user + system, every thread) per instance is the total;
- the handler's stages are timed with the CPU clock of the thread that runs them
  (``time.thread_time``): header walk + parse, the free-space check, the spool write (open, write,
  rename) and each fsync, the duplicate look-up, the index transaction (statements + COMMIT, on
  the index's committer thread);
- what is left is the upper layer's work outside the handler (``[node] dicom_stack``, native by
  default: PDU reading, the command set, streaming the dataset into the incoming file, the
  response; with pynetdicom also its DUL and DIMSE threads).

Then the floors, what the PDU handling alone costs in this process with the same maximum PDU:
the native upper layer whose C-STORE handler answers Success without touching the data (the
incoming file is still filled, as for every instance), and a bare pynetdicom AE whose handler does
the same (what any receiver built on pynetdicom pays).

Wall time under load is printed for orientation only; compare CPU.

Usage:  .venv/bin/python benchmarks/profile_ingest.py [--slices 300] [--size 512] [--rounds 3] [--stack native]
Writes: benchmarks/results/profile_ingest.json
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    free_port,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    node_config,
    require_tools,
    send_concurrently,
    write_results,
)

from inference.phantom import generate_study
from pacs_agent.config import load_settings
from pacs_agent.db import Database
from pacs_agent.receive import handlers as handlers_module
from pacs_agent.receive import spool as spool_module
from pacs_agent.receive.server import ReceiveServer, build_ae
from pacs_agent.receive.spool import Spool

WORK = WORK_ROOT / "profile_ingest"


class StageClock:
    """CPU seconds (of the calling thread) spent in named stages; nested stages are subtracted from the outer."""

    def __init__(self) -> None:
        self.cpu: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._local = threading.local()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        stack: list[list[float]] = self._local.__dict__.setdefault("stack", [])
        frame = [time.thread_time(), 0.0]  # start, CPU of nested stages
        stack.append(frame)
        try:
            yield
        finally:
            stack.pop()
            spent = time.thread_time() - frame[0]
            self.cpu[name] += spent - frame[1]
            self.calls[name] += 1
            if stack:
                stack[-1][1] += spent

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return function(*args, **kwargs)

        return timed


def instrument(clock: StageClock, server: ReceiveServer) -> None:
    """Time the handler's stages (module attributes and methods of this process only)."""
    h = server.handlers
    for name, stage in (
        ("read_header", "header walk + parse"),
        ("is_known_instance", "duplicate look-up (read connection, only when the file exists)"),
    ):
        setattr(handlers_module, name, clock.wrap(stage, getattr(handlers_module, name)))
    h.spool.has_room = clock.wrap("free-space check (statvfs)", h.spool.has_room)  # type: ignore[method-assign]
    for method in ("write", "commit"):
        setattr(h.spool, method, clock.wrap("spool write (open, write, rename, mkdir)", getattr(h.spool, method)))
    # On the index's committer thread: statements, COMMIT (the WAL write and its fsync).
    h.index._transaction = clock.wrap("durable index write (committer: statements + COMMIT)", h.index._transaction)  # type: ignore[method-assign]
    real_fsync = os.fsync
    spool_module.os = _OsWithTimedFsync(clock.wrap("fsync (file, directory)", real_fsync))  # type: ignore[attr-defined]
    # The native stack calls store(); bindings() hands pynetdicom self.on_store_response: both timed.
    h.store = clock.wrap("handler: the rest (checks, status, bookkeeping)", h.store)  # type: ignore[method-assign]
    h.on_store_response = clock.wrap("handler: the rest (checks, status, bookkeeping)", h.on_store_response)  # type: ignore[method-assign]


class _OsWithTimedFsync:
    """The ``os`` module as the spool sees it, with a timed ``fsync``."""

    def __init__(self, fsync: Callable[[int], None]) -> None:
        self.fsync = fsync

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def process_cpu() -> float:
    """User + system CPU seconds of this process (every thread)."""
    return time.process_time()


OUTSIDE = "upper layer outside the handler (PDUs, command, streaming into the incoming file, response)"


def serve_and_send(server: ReceiveServer, db: Database, ae_title: str, files: list[Path]) -> tuple[float, float]:
    """Start ``server``, send ``files`` over one association, stop it: (seconds, process CPU seconds)."""
    server.start()
    try:
        cpu_before = process_cpu()
        seconds, _ = send_concurrently(server.port, ae_title, [files])
        return seconds, process_cpu() - cpu_before
    finally:
        server.stop()
        db.dispose()


def profile_node(files: list[Path], work: Path, stack: str) -> dict[str, Any]:
    """Send ``files`` to an in-process receiving AE; CPU per instance, per stage."""
    port = free_port()
    config = node_config(work, port)
    settings = load_settings(config, environ={"PACS_AGENT__NODE__DICOM_STACK": stack})
    spool_module.os = os  # type: ignore[attr-defined]
    db = Database(settings.database_url)
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb)
    server = ReceiveServer(settings, db, spool)
    clock = StageClock()
    instrument(clock, server)
    try:
        seconds, cpu = serve_and_send(server, db, settings.node.ae_title, files)
    finally:
        spool_module.os = os  # type: ignore[attr-defined]
    n = len(files)
    stages = {name: 1000 * value / n for name, value in clock.cpu.items()}
    stages[OUTSIDE] = 1000 * cpu / n - sum(stages.values())
    return {"seconds": seconds, "cpu_ms_per_instance": 1000 * cpu / n, "stages_cpu_ms_per_instance": stages}


def profile_floor(files: list[Path], max_pdu: int) -> dict[str, Any]:
    """A bare pynetdicom AE answering Success without touching the data: CPU per instance."""
    from pynetdicom import _config, evt

    from pacs_agent.config import settings_from_mapping

    chunked = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False
    settings = settings_from_mapping({"node": {"ae_title": "FLOOR", "max_pdu_bytes": max_pdu}})
    ae = build_ae(settings)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        cpu_before = process_cpu()
        seconds, _ = send_concurrently(port, "FLOOR", [files])
        cpu = process_cpu() - cpu_before
    finally:
        server.shutdown()
        _config.STORE_RECV_CHUNKED_DATASET = chunked
    return {"seconds": seconds, "cpu_ms_per_instance": 1000 * cpu / len(files)}


def profile_native_floor(files: list[Path], work: Path) -> dict[str, Any]:
    """The native upper layer whose C-STORE handler answers Success untouched: CPU per instance."""
    port = free_port()
    settings = load_settings(node_config(work, port), environ={})
    db = Database(settings.database_url)
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb)
    server = ReceiveServer(settings, db, spool)

    def success(peer: Any, request: Any, incoming: Any) -> Any:
        incoming.discard()
        return handlers_module._status(0, "")

    server.handlers.store = success  # type: ignore[method-assign]
    seconds, cpu = serve_and_send(server, db, settings.node.ae_title, files)
    return {"seconds": seconds, "cpu_ms_per_instance": 1000 * cpu / len(files)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stack", choices=["native", "pynetdicom"], default="native")
    args = parser.parse_args()
    require_tools("storescu")
    load_start = load_average()
    fresh_dir(WORK)
    study = generate_study(
        WORK / "study", seed=1, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="none"
    )
    files = list(study.ct_files)
    mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
    nodes, floors, native_floors = [], [], []
    max_pdu = 0
    for round_no in range(args.rounds):
        work = fresh_dir(WORK / f"node{round_no}")
        nodes.append(profile_node(files, work, args.stack))
        max_pdu = load_settings(work / "pacs-agent.toml", environ={}).node.max_pdu_bytes
        shutil.rmtree(work, ignore_errors=True)
        floors.append(profile_floor(files, max_pdu))
        work = fresh_dir(WORK / f"floor{round_no}")
        native_floors.append(profile_native_floor(files, work))
        shutil.rmtree(work, ignore_errors=True)
        print(
            f"round {round_no + 1}: node ({args.stack}) {nodes[-1]['cpu_ms_per_instance']:.2f} ms CPU/instance, "
            f"native floor {native_floors[-1]['cpu_ms_per_instance']:.2f}, "
            f"pynetdicom floor {floors[-1]['cpu_ms_per_instance']:.2f}",
            flush=True,
        )
    stage_names = list(nodes[0]["stages_cpu_ms_per_instance"])
    stages = {
        s: round(statistics.median(n["stages_cpu_ms_per_instance"].get(s, 0.0) for n in nodes), 3) for s in stage_names
    }
    node_cpu = statistics.median(n["cpu_ms_per_instance"] for n in nodes)
    floor_cpu = statistics.median(f["cpu_ms_per_instance"] for f in floors)
    native_floor_cpu = statistics.median(f["cpu_ms_per_instance"] for f in native_floors)
    result = header(
        "profile_ingest",
        {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "megabytes_per_instance": round(mb, 3),
            "rounds": args.rounds,
            "max_pdu_bytes": max_pdu,
            "sender": "DCMTK storescu -R (TCP_NODELAY=1), one association",
            "dicom_stack": args.stack,
            "node": "ReceiveServer in the profiling process (node handlers, spool with fsync, SQLite), stages "
            "timed with the thread CPU clock",
            "floor": "bare pynetdicom AE, same max PDU, C-STORE handler answers Success without touching the data",
            "native_floor": "the native upper layer, same max PDU, C-STORE handler answers Success (incoming "
            "file filled, then discarded)",
        },
        load_start,
    )
    result |= {
        "node_cpu_ms_per_instance": round(node_cpu, 3),
        "pynetdicom_floor_cpu_ms_per_instance": round(floor_cpu, 3),
        "native_floor_cpu_ms_per_instance": round(native_floor_cpu, 3),
        "node_over_floor": round(node_cpu / floor_cpu, 2),
        "stages_cpu_ms_per_instance_median": stages,
        "node_rounds": [
            {"seconds": round(n["seconds"], 3), "cpu_ms_per_instance": round(n["cpu_ms_per_instance"], 3)}
            for n in nodes
        ],
        "native_floor_rounds": [
            {"seconds": round(f["seconds"], 3), "cpu_ms_per_instance": round(f["cpu_ms_per_instance"], 3)}
            for f in native_floors
        ],
        "floor_rounds": [
            {"seconds": round(f["seconds"], 3), "cpu_ms_per_instance": round(f["cpu_ms_per_instance"], 3)}
            for f in floors
        ],
    }
    path = write_results("profile_ingest", result)
    rows = [
        [name, f"{value:.2f}", f"{value / node_cpu:.0%}"]
        for name, value in sorted(stages.items(), key=lambda kv: -kv[1])
    ]
    rows.append(["**total (process CPU)**", f"{node_cpu:.2f}", "100%"])
    rows.append(
        [
            "native floor (own upper layer, handler answers Success)",
            f"{native_floor_cpu:.2f}",
            f"{native_floor_cpu / node_cpu:.0%}",
        ]
    )
    rows.append(
        ["pynetdicom floor (bare AE, handler answers Success)", f"{floor_cpu:.2f}", f"{floor_cpu / node_cpu:.0%}"]
    )
    print(markdown_table(["stage", "CPU ms per instance (median)", "share"], rows))
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
