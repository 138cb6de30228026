"""A bounded fault soak: studies keep arriving while a chaos loop breaks the node, its worker, its PACS and its disk.

Run by hand (not part of the test suite), loopback only. A pool of small random phantom studies
(different seeds, sizes, lesion counts, SEG or RTSTRUCT) is generated before the clock starts.
Four sender threads (pynetdicom C-STORE SCU, like ``sender`` in tests/integration/test_chaos.py)
each take a new study every few seconds and re-send whatever was not acknowledged, appending it at
the end of their list (so a SEG can arrive before the slices it was drawn on). The node is
``pacs-agent serve`` (scp + one worker) in its own process group, with an Orthanc of its own as the
destination (the PACS). Its state directory lives on a dedicated tmpfs, so that "disk full" is a
real full file system. For ``--minutes`` a seeded chaos loop, at random intervals, does one of:

- ``worker_kill``: SIGKILL of the worker child of ``serve`` only (``serve`` restarts it);
- ``serve_kill``: SIGKILL of the whole process group of ``serve``, then a new ``serve``;
- ``orthanc_kill``: SIGKILL of Orthanc, a pause, Orthanc again on the same storage and ports;
- ``disk_full``: the tmpfs is shrunk (remount) to what it holds plus a little, under ``[storage]
  min_free_mb``, for a while, then given its size back
  (without root or tmpfs: ``serve`` is restarted with a watermark above the free space and back;
  the results file says which was used, ``disk_mode``).

Then the senders finish their lists, the node drains (``--drain-minutes`` at most), ``serve`` is
stopped with SIGTERM, and the checks run:

1. every acknowledged instance is stored: an Instance row and its spool file, which reads back
   with the same SOP Instance UID;
2. every ready study is processed exactly once: each study sent is ``done``, has exactly one job per
   method and it is ``done``, one SR per method in Orthanc, no SOP Instance UID twice in Orthanc;
3. every result is delivered exactly once: every delivery ``done`` with one ``delivered`` event,
   Orthanc holds exactly the results (same SOP Instance UIDs, same count);
4. nothing is left behind: no temp file in the spool or the results, no worker process running.

A Lua ``ReceivedInstanceFilter`` in Orthanc writes down every result it receives, so the figures also
say how often a result crossed the wire again after a kill (Orthanc keeps one copy: the result UIDs are
deterministic, which is what makes re-sending safe).

Usage:  .venv/bin/python benchmarks/soak.py [--minutes 10] [--seed 1] [--senders 4] [--interval 20]
            [--methods radiomics m1] [--drain-minutes 15]
Writes: benchmarks/results/soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    children,
    free_port,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    require_tools,
    wait_port,
    write_results,
)
from pydicom import dcmread

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.config import Destination
from pacs_agent.send.scu import store_files
from tests.integration.peers import Orthanc

WORK = WORK_ROOT / "soak"
TMPFS_MB = 4096
MIN_FREE_MB = 64
"""The node's ``[storage] min_free_mb`` during the soak."""
FULL_FREE_MB = 24
"""How much the filler leaves free during ``disk_full`` (under the watermark, enough for SQLite)."""
BATCH = 25
"""Instances per association of a sender (as in test_chaos)."""
KINDS = ("worker_kill", "serve_kill", "orthanc_kill", "disk_full")

RECORD_RECEIVED = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open({path}, "a")
  log:write((dicom["SOPInstanceUID"] or "?") .. "\\n")
  log:close()
  return true
end
"""


# -- the node ---------------------------------------------------------------------------------


@dataclass
class SoakNode:
    """``pacs-agent serve`` in its own process group, on a state directory of ours."""

    work: Path
    state_dir: Path
    destination_toml: str
    methods: Sequence[str]
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ae_title: str = "PACS_AGENT"

    @property
    def config(self) -> Path:
        return self.work / "pacs-agent.toml"

    @property
    def database(self) -> Path:
        return self.state_dir / "pacs-agent.db"

    def write_config(self, min_free_mb: int) -> None:
        """(Re)write the node's TOML with this watermark."""
        methods = ", ".join(f'"{m}"' for m in self.methods)
        self.config.write_text(
            f'[node]\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[storage]\nstate_dir = "{self.state_dir}"\nmin_free_mb = {min_free_mb}\n'
            "[readiness]\nquiet_seconds = 2\n"
            f"[jobs]\nmethods = [{methods}]\nlease_seconds = 10\nretry_delay_seconds = 1\nmax_attempts = 25\n"
            "[delivery]\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 4\n"
            "[routing]\nmethod_regions = {}\n"
            '[logging]\nlevel = "INFO"\n'
            f"[observability]\nhttp_port = {self.http_port}\n" + self.destination_toml
        )

    def launch(self, min_free_mb: int = MIN_FREE_MB) -> None:
        """Start ``serve`` (a new session, so the group can be killed) and wait until it listens."""
        self.write_config(min_free_mb)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}
        with (self.work / "node.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        wait_port(self.port, 90, self.process)

    def kill_group(self) -> None:
        """SIGKILL ``serve`` and everything of its process group (its worker)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def worker_pid(self) -> int | None:
        """The pid of the worker child of ``serve`` right now (None while it is being restarted)."""
        if self.process is None:
            return None
        for pid in children(self.process.pid):
            with contextlib.suppress(OSError):
                if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return -9
        self.process = None
        return code

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read the node's database beside the running node (WAL)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)) as conn:
            return conn.execute(sql, tuple(params)).fetchall()


class SoakOrthanc(Orthanc):
    """The tests' Orthanc helper; counts its instances."""

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance (one entry per stored instance)."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return [item["MainDicomTags"]["SOPInstanceUID"] for item in found]


# -- the disk ---------------------------------------------------------------------------------


class Disk:
    """Where the state directory lives and how it is made to look full."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mode = "tmpfs"
        self.mounted = False
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "tmpfs", str(root)],
                capture_output=True,
                check=False,
            )
            self.mounted = result.returncode == 0
        if not self.mounted:
            self.mode = "watermark"

    def free_mb(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize // 2**20

    def used_mb(self) -> int:
        st = os.statvfs(self.root)
        return -(-(st.f_blocks - st.f_bfree) * st.f_frsize // 2**20)

    def _resize(self, size_mb: int) -> bool:
        result = subprocess.run(
            ["mount", "-o", f"remount,size={size_mb}m", str(self.root)], capture_output=True, check=False
        )
        return result.returncode == 0

    def fill(self) -> str:
        """Shrink the tmpfs to what it holds plus ``FULL_FREE_MB``: a full disk, without a filler's RAM.

        (A filler file on a tmpfs would take the whole free size in memory.)
        """
        for _ in range(20):  # something may grow between the look and the remount: look again
            if self._resize(self.used_mb() + FULL_FREE_MB):
                size = self.used_mb() + self.free_mb()
                return f"tmpfs shrunk to {size} MB, {self.free_mb()} MB free < min_free_mb {MIN_FREE_MB}"
            time.sleep(0.05)
        raise RuntimeError("could not shrink the tmpfs")

    def release(self) -> None:
        if self.mounted:
            self._resize(TMPFS_MB)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
            self.mounted = False


# -- the senders ------------------------------------------------------------------------------


@dataclass
class SenderStats:
    """What one sender did."""

    studies_started: int = 0
    sent: int = 0
    """C-STORE attempts (first sends and re-sends)."""
    acknowledged: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Failure statuses, by status (hex)."""
    no_response: int = 0
    """Attempts without a status (node down, association refused or aborted)."""
    resent: int = 0


class Sender(threading.Thread):
    """A modality that takes a new study every few seconds and re-sends what was not acknowledged."""

    def __init__(
        self,
        number: int,
        node: SoakNode,
        studies: list[PhantomStudy],
        uid_of: dict[Path, str],
        interval: float,
        rng: random.Random,
        stop_new: threading.Event,
        give_up: threading.Event,
    ) -> None:
        super().__init__(name=f"sender-{number}", daemon=True)
        self.number = number
        self.node = node
        self.queue = list(studies)
        self.uid_of = uid_of
        self.interval = interval
        self.rng = rng
        self.stop_new = stop_new
        self.give_up = give_up
        self.stats = SenderStats()
        self.acknowledged: set[str] = set()
        self.started_studies: list[PhantomStudy] = []
        self.pending: list[Path] = []
        self.tries: Counter[Path] = Counter()
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a sender's own bug must show in the report, not vanish in a thread
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        next_study = time.monotonic() + self.rng.uniform(0, self.interval)
        while not self.give_up.is_set():
            now = time.monotonic()
            if not self.stop_new.is_set() and self.queue and now >= next_study:
                study = self.queue.pop(0)
                self.started_studies.append(study)
                self.stats.studies_started += 1
                self.pending += files_of(study)
                next_study = now + self.rng.uniform(0.5 * self.interval, 1.5 * self.interval)
            if not self.pending:
                if self.stop_new.is_set() or not self.queue:
                    return
                time.sleep(min(0.2, max(next_study - time.monotonic(), 0.01)))
                continue
            batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
            outcomes = store_files(
                Destination(name="node", ae_title=self.node.ae_title, host="127.0.0.1", port=self.node.port),
                batch,
                calling_ae_title=f"SOAK{self.number}",
                timeout_seconds=10,
            )
            for outcome in outcomes:
                self.stats.sent += 1
                if self.tries[outcome.path]:
                    self.stats.resent += 1
                self.tries[outcome.path] += 1
                if outcome.ok:
                    self.stats.acknowledged += 1
                    self.acknowledged.add(self.uid_of[outcome.path])
                    continue
                if outcome.status is None:
                    self.stats.no_response += 1
                else:
                    self.stats.refused[f"0x{outcome.status:04X}"] += 1
                self.pending.append(outcome.path)  # at the end: the rest of the list goes first
            if any(not o.ok for o in outcomes):
                time.sleep(0.5)


# -- the chaos loop ---------------------------------------------------------------------------


@dataclass
class Chaos:
    """Injects one fault at a time at seeded random intervals until ``end``."""

    node: SoakNode
    orthanc: SoakOrthanc
    disk: Disk
    rng: random.Random
    t0: float
    gap: tuple[float, float] = (12.0, 30.0)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def note(self, kind: str, detail: str) -> None:
        self.timeline.append({"t": round(time.monotonic() - self.t0, 1), "kind": kind, "detail": detail})
        print(f"  {time.monotonic() - self.t0:6.1f} s  {kind}: {detail}", flush=True)

    def running_jobs(self) -> int:
        try:
            return int(self.node.query("SELECT count(*) FROM jobs WHERE state = 'running'")[0][0])
        except sqlite3.Error:
            return -1

    def run(self, end: float) -> None:
        while True:
            wait = self.rng.uniform(*self.gap)
            if time.monotonic() + wait >= end:
                time.sleep(max(end - time.monotonic(), 0))
                return
            time.sleep(wait)
            kind = self.rng.choice(KINDS)
            getattr(self, kind)()
            self.counts[kind] += 1

    def worker_kill(self) -> None:
        pid = None
        deadline = time.monotonic() + 15
        while pid is None and time.monotonic() < deadline:  # just restarted by serve: wait for it
            pid = self.node.worker_pid()
            if pid is None:
                time.sleep(0.2)
        if pid is None:
            self.note("worker_kill", "no worker process found (skipped)")
            self.counts["worker_kill_skipped"] += 1
            return
        self.wait_for_a_job(15)
        running = self.running_jobs()
        os.kill(pid, signal.SIGKILL)
        self.note("worker_kill", f"SIGKILL worker pid {pid}, {running} job(s) running")

    def wait_for_a_job(self, seconds: float) -> None:
        """Wait (at most ``seconds``) until a job runs, then a random moment into it (load, compute, write)."""
        deadline = time.monotonic() + seconds
        while self.running_jobs() < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(self.rng.uniform(0, 2.5))

    def serve_kill(self) -> None:
        if self.rng.random() < 0.5:  # half of them in a job, the others wherever they fall (receiving, sending)
            self.wait_for_a_job(15)
        running = self.running_jobs()
        self.node.kill_group()
        pause = self.rng.uniform(0, 3)
        time.sleep(pause)
        self.node.launch()
        self.note(
            "serve_kill", f"SIGKILL of the process group, {running} job(s) running, restarted after {pause:.1f} s"
        )

    def orthanc_kill(self) -> None:
        self.orthanc.kill()
        pause = self.rng.uniform(1, 15)
        time.sleep(pause)
        self.orthanc.start()
        self.note("orthanc_kill", f"SIGKILL, restarted on the same storage after {pause:.1f} s")

    def disk_full(self) -> None:
        hold = self.rng.uniform(5, 20)
        if self.disk.mode == "tmpfs":
            detail = self.disk.fill()
            time.sleep(hold)
            self.disk.release()
        else:  # no tmpfs: a watermark above the free space, then back
            high = self.disk.free_mb() + 10_240
            self.node.stop()
            self.node.launch(min_free_mb=high)
            detail = f"serve restarted with min_free_mb = {high} (free {self.disk.free_mb()} MB)"
            time.sleep(hold)
            self.node.stop()
            self.node.launch()
        self.note("disk_full", f"{detail}, for {hold:.1f} s")


# -- checks -----------------------------------------------------------------------------------


def check(results: list[dict[str, Any]], name: str, ok: bool, detail: str) -> None:
    results.append({"check": name, "ok": ok, "detail": detail})
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def drained(node: SoakNode, orthanc: SoakOrthanc, studies: set[str], methods: int) -> bool:
    """Every study sent is done with its jobs, and every delivery is done and in Orthanc."""
    try:
        rows = node.query("SELECT study_instance_uid, state FROM studies")
        open_jobs = node.query("SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')")[0][0]
        done_jobs = node.query("SELECT count(*) FROM jobs WHERE state = 'done'")[0][0]
        open_deliveries = node.query("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]
        results = node.query("SELECT count(*) FROM results")[0][0]
        in_orthanc = orthanc.count_instances()
    except (sqlite3.Error, OSError, ValueError):
        return False
    states = dict(rows)
    settled = all(states.get(uid) in ("done", "failed", "incomplete") for uid in studies)
    return (
        bool(settled and not open_jobs and done_jobs >= len(studies) * methods and not open_deliveries)
        and in_orthanc >= results
    )


def run_checks(
    node: SoakNode,
    orthanc: SoakOrthanc,
    acknowledged: set[str],
    studies: dict[str, PhantomStudy],
    methods: Sequence[str],
    wire: Counter[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The end checks; returns them and the node's counts."""
    out: list[dict[str, Any]] = []
    spool = node.state_dir / "spool"
    stored = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    missing = sorted(acknowledged - set(stored))
    bad_files = []
    for uid in acknowledged & set(stored):
        path = spool / stored[uid]
        try:
            if path.stat().st_size == 0 or str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) != uid:
                bad_files.append(uid)
        except Exception:
            bad_files.append(uid)
    check(
        out,
        "acknowledged instances stored",
        not missing and not bad_files,
        f"{len(acknowledged)} acknowledged, {len(missing)} without an Instance row, "
        f"{len(bad_files)} whose spool file is missing or unreadable"
        + (f" (e.g. {(missing + bad_files)[0]})" if missing or bad_files else ""),
    )

    study_rows = {
        uid: (sid, state, reason)
        for sid, uid, state, reason in node.query("SELECT id, study_instance_uid, state, state_reason FROM studies")
    }
    not_done = {
        uid: study_rows.get(uid, (0, "absent", ""))[1:] for uid in studies if study_rows.get(uid, ())[1:2] != ("done",)
    }
    check(
        out,
        "every study sent is done",
        not not_done,
        f"{len(studies)} studies sent, {len(studies) - len(not_done)} done"
        + (f"; not done: {dict(list(not_done.items())[:3])}" if not_done else ""),
    )
    jobs = node.query(
        "SELECT s.study_instance_uid, j.method, j.state, j.attempts, j.waits FROM jobs j "
        "JOIN studies s ON s.id = j.study_id"
    )
    per_study_method: Counter[tuple[str, str]] = Counter((uid, method) for uid, method, *_ in jobs)
    expected_pairs = {(uid, m) for uid in studies for m in methods}
    wrong_jobs = {k: v for k, v in per_study_method.items() if v != 1}
    absent_jobs = expected_pairs - set(per_study_method)
    job_states = Counter(state for _, _, state, _, _ in jobs)
    check(
        out,
        "one job per study and method, all done",
        not wrong_jobs and not absent_jobs and set(job_states) <= {"done"},
        f"{len(jobs)} jobs for {len(expected_pairs)} (study, method) pairs; states {dict(job_states)}; "
        f"{len(wrong_jobs)} pairs with more than one job, {len(absent_jobs)} without a job",
    )

    results = node.query(
        "SELECT r.sop_instance_uid, r.kind, r.method, s.study_instance_uid FROM results r "
        "JOIN studies s ON s.id = r.study_id"
    )
    result_uids = {uid for uid, *_ in results}
    orthanc_uids = Counter(orthanc.sop_uids())
    twice = {uid: n for uid, n in orthanc_uids.items() if n > 1}
    srs_in_orthanc: Counter[tuple[str, str]] = Counter(
        (study, method) for uid, kind, method, study in results if kind == "sr" and uid in orthanc_uids
    )
    sr_rows: Counter[tuple[str, str]] = Counter((study, method) for _, kind, method, study in results if kind == "sr")
    wrong_srs = {k: v for k, v in sr_rows.items() if v != 1} | {
        k: srs_in_orthanc.get(k, 0) for k in expected_pairs if srs_in_orthanc.get(k, 0) != 1
    }
    check(
        out,
        "one SR per study and method in Orthanc, no SOP Instance UID twice",
        not wrong_srs and not twice,
        f"{sum(srs_in_orthanc.values())} SRs in Orthanc for {len(expected_pairs)} (study, method) pairs; "
        f"{len(wrong_srs)} pairs with another count, {len(twice)} UIDs stored twice",
    )

    deliveries = node.query(
        "SELECT r.sop_instance_uid, d.state, d.attempts FROM deliveries d JOIN results r ON r.id = d.result_id"
    )
    delivered_events = Counter(
        detail.split(": ")[1].removesuffix(".dcm")
        for (detail,) in node.query("SELECT detail FROM events WHERE kind = 'delivered'")
    )
    delivery_states = Counter(state for _, state, _ in deliveries)
    not_once = {uid: delivered_events.get(uid, 0) for uid in result_uids if delivered_events.get(uid, 0) != 1}
    extra_in_orthanc = set(orthanc_uids) - result_uids
    absent_in_orthanc = result_uids - set(orthanc_uids)
    check(
        out,
        "every result delivered exactly once",
        set(delivery_states) <= {"done"}
        and len(deliveries) == len(results)
        and not not_once
        and not extra_in_orthanc
        and not absent_in_orthanc
        and orthanc.count_instances() == len(results),
        f"{len(results)} results, {len(deliveries)} deliveries {dict(delivery_states)}, "
        f"{len(not_once)} without exactly one 'delivered' event, Orthanc holds {orthanc.count_instances()} "
        f"({len(absent_in_orthanc)} results missing, {len(extra_in_orthanc)} instances that are no result)",
    )

    leftovers = [
        str(p.relative_to(node.state_dir))
        for p in node.state_dir.rglob("*")
        if p.is_file() and (p.suffix in (".part", ".tmp") or p.name.endswith(".part"))
    ]
    check(
        out, "no temp files left", not leftovers, f"{len(leftovers)} left" + (f": {leftovers[:5]}" if leftovers else "")
    )

    strays = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if str(node.config).encode() in (proc / "cmdline").read_bytes():
                strays.append(int(proc.name))
    check(
        out,
        "no node process left after SIGTERM",
        not strays,
        f"{len(strays)} running" + (f": {strays}" if strays else ""),
    )

    events = Counter(kind for (kind,) in node.query("SELECT kind FROM events"))
    counts = {
        "instances_recorded": len(stored),
        "duplicates_recorded": int(node.query("SELECT coalesce(sum(duplicates), 0) FROM instances")[0][0]),
        "studies": len(study_rows),
        "jobs": len(jobs),
        "job_states": dict(job_states),
        "job_attempts": sum(a for *_, a, _ in jobs),
        "job_retries": sum(a - 1 for *_, a, _ in jobs if a > 1),
        "job_waiting_events": events.get("job_waiting", 0),
        "results": len(results),
        "results_by_kind": dict(Counter(kind for _, kind, _, _ in results)),
        "deliveries": len(deliveries),
        "delivery_attempts": sum(a for *_, a in deliveries),
        "delivery_retry_events": events.get("delivery_retry", 0),
        "orthanc_instances": orthanc.count_instances(),
        "orthanc_receipts": sum(wire.values()),
        "results_received_by_orthanc_more_than_once": sum(1 for uid in result_uids if wire.get(uid, 0) > 1),
        "store_refused_events": events.get("store_refused", 0),
        "worker_orphan_stopped_events": events.get("worker_orphan_stopped", 0),
        "events": dict(sorted(events.items())),
    }
    return out, counts


# -- main -------------------------------------------------------------------------------------


def files_of(study: PhantomStudy) -> list[Path]:
    """The CT slices, then the segmentation (SEG or RTSTRUCT) of a study, in the order a modality sends them."""
    return [*study.ct_files, *(p for p in (study.seg_file, study.rtstruct_file) if p is not None)]


def make_pool(folder: Path, count: int, seed: int) -> list[PhantomStudy]:
    """``count`` small random phantom studies (different seeds, sizes, lesions, SEG or RTSTRUCT)."""
    rng = random.Random(seed)
    pool = []
    for n in range(count):
        size = rng.choice((64, 80, 96))
        pool.append(
            generate_study(
                folder / f"s{n:03d}",
                seed=100_000 * seed + n,
                lesions=rng.choice((1, 1, 2)),
                slices=rng.randint(16, 28),
                rows=size,
                columns=size,
                segmentation=rng.choice(("seg", "seg", "rtstruct")),
            )
        )
    return pool


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long studies arrive and faults are injected")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--interval", type=float, default=20.0, help="mean seconds between two studies of a sender")
    parser.add_argument("--methods", nargs="+", default=["radiomics", "m1"])
    parser.add_argument("--drain-minutes", type=float, default=15.0, help="deadline for the node to finish")
    args = parser.parse_args(argv)
    require_tools("Orthanc")
    load_start = load_average()
    if os.path.ismount(WORK / "disk"):  # left by an interrupted run
        subprocess.run(["umount", "-l", str(WORK / "disk")], check=False)
    work = fresh_dir(WORK)
    seconds = args.minutes * 60

    per_sender = int(seconds / args.interval) + 2
    print(f"generating {per_sender * args.senders} phantom studies ...", flush=True)
    pool = make_pool(work / "pool", per_sender * args.senders, args.seed)
    uid_of: dict[Path, str] = {}
    for study in pool:
        for path in files_of(study):
            uid_of[path] = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    disk = Disk(work / "disk")
    wire_log = work / "orthanc-received.txt"
    lua = work / "record.lua"
    lua.write_text(RECORD_RECEIVED.replace("{path}", json.dumps(str(wire_log))))
    orthanc = SoakOrthanc(work / "orthanc", lua_scripts=[lua])
    node = SoakNode(
        work=work, state_dir=disk.root / "state", destination_toml=orthanc.destination_toml(), methods=args.methods
    )
    rng = random.Random(args.seed)
    stop_new, give_up = threading.Event(), threading.Event()
    senders = [
        Sender(
            n + 1,
            node,
            pool[n * per_sender : (n + 1) * per_sender],
            uid_of,
            args.interval,
            random.Random(rng.random()),
            stop_new,
            give_up,
        )
        for n in range(args.senders)
    ]
    checks: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}
    chaos = Chaos(node, orthanc, disk, random.Random(rng.random()), time.monotonic())
    exit_code = 1
    chaos_seconds = drain_seconds = 0.0
    acknowledged: set[str] = set()
    expected_uids: set[str] = set()
    try:
        orthanc.start()
        node.launch()
        print(f"disk mode: {disk.mode}; soak for {args.minutes:g} min, {args.senders} senders", flush=True)
        t0 = time.monotonic()
        chaos.t0 = t0
        for sender in senders:
            sender.start()
        chaos.run(t0 + seconds)
        stop_new.set()
        chaos_seconds = time.monotonic() - t0
        print("chaos over: letting the senders finish and the node drain", flush=True)
        drain_end = time.monotonic() + args.drain_minutes * 60
        for sender in senders:
            sender.join(max(drain_end - time.monotonic(), 1))
        give_up.set()
        sent_studies = {s.study_instance_uid: s for snd in senders for s in snd.started_studies}
        acknowledged = set().union(*(snd.acknowledged for snd in senders))
        expected_uids = {uid_of[p] for s in sent_studies.values() for p in files_of(s)}
        senders_done = all(not snd.is_alive() and not snd.pending for snd in senders)
        while time.monotonic() < drain_end and not drained(node, orthanc, set(sent_studies), len(args.methods)):
            time.sleep(2)
        drain_seconds = time.monotonic() - t0 - chaos_seconds
        time.sleep(3)  # a last scheduler tick and delivery pass
        code = node.stop()
        wire = Counter(line for line in wire_log.read_text().split() if line) if wire_log.exists() else Counter()
        check(
            checks,
            "senders finished",
            senders_done,
            f"every instance acknowledged: {expected_uids <= acknowledged}"
            + "".join(f"; sender {s.number}: {s.errors}" for s in senders if s.errors),
        )
        check(checks, "serve stopped cleanly with SIGTERM", code == 0, f"exit code {code}")
        more, counts = run_checks(node, orthanc, acknowledged, sent_studies, args.methods, wire)
        checks += more
        exit_code = 0 if all(c["ok"] for c in checks) else 1
    finally:
        give_up.set()
        disk.release()
        if node.process is not None:
            node.kill_group()
        orthanc.stop()
        disk_mode = disk.mode
        disk.unmount()

    stats = [s.stats for s in senders]
    refused: Counter[str] = Counter()
    for s in stats:
        refused.update(s.refused)
    result = header(
        "soak",
        {
            "minutes": args.minutes,
            "seed": args.seed,
            "senders": args.senders,
            "interval_seconds": args.interval,
            "methods": args.methods,
            "drain_minutes": args.drain_minutes,
            "min_free_mb": MIN_FREE_MB,
            "disk_mode": disk_mode,
            "tmpfs_mb": TMPFS_MB if disk_mode == "tmpfs" else None,
        },
        load_start,
    )
    result |= {
        "duration_seconds": {"chaos": round(chaos_seconds, 1), "drain": round(drain_seconds, 1)},
        "injected": {kind: chaos.counts.get(kind, 0) for kind in KINDS}
        | {"worker_kill_skipped": chaos.counts.get("worker_kill_skipped", 0)},
        "senders": {
            "studies_sent": sum(s.studies_started for s in stats),
            "instances_in_studies": len(expected_uids),
            "instances_sent": sum(s.sent for s in stats),
            "instances_acknowledged": sum(s.acknowledged for s in stats),
            "distinct_acknowledged": len(acknowledged),
            "refused_by_status": dict(refused),
            "no_response": sum(s.no_response for s in stats),
            "resent": sum(s.resent for s in stats),
        },
        "node": counts,
        "checks": checks,
        "passed": exit_code == 0,
        "timeline": chaos.timeline,
    }
    path = write_results("soak", result)
    print(markdown_table(["injected", "times"], [[kind, result["injected"][kind]] for kind in KINDS]))
    print(json.dumps(result["senders"], indent=2))
    print(json.dumps({k: v for k, v in counts.items() if k != "events"}, indent=2))
    print(f"{'PASSED' if exit_code == 0 else 'FAILED'}; wrote {path}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
