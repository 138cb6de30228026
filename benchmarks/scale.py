"""Scaling out: 12 phantom studies through 1, 2 and 3 worker processes on PostgreSQL.

Each configuration runs on a fresh PostgreSQL database of the local server: one receiver
(``pacs-agent scp``, the several-hosts set-up: ``[database] url`` on PostgreSQL, ``[storage]
shared_dir``) and N ``pacs-agent worker`` processes with their own state directories, as separate
hosts would be. The studies (distinct phantoms of the size the README's per-worker figures are
for: 300 slices of 512 x 512, 3 lesions, SEG; methods m1 + radiomics, two jobs per study) are
stored first, with no worker running; then the benchmark holds the queue shut (``LOCK TABLE
procrastinate_jobs IN EXCLUSIVE MODE`` in a transaction of its own: every worker's first fetch
waits on it), starts the N workers, waits until each has registered with the queue (a worker
registers only once its pipeline is loaded, so imports are not in the figure) and opens the gate
by ending that transaction. The time from the gate to the last job's ``finished_at`` is the
processing time of the queue (store, readiness and start-up are not in it); studies/hour is
``studies * 3600 / that time``. Rounds interleave the worker counts (1, 2, 3, 1, 2, 3, ...) so
that a change of load on the shared machine touches each alike; the figures are medians with
their spread, the ratios are to 1 worker in the same run, and every run records the load average.

Where the ceiling is: this machine has 2 cores, so 3 workers (each a whole pipeline on one core)
compete for 2 cores with PostgreSQL; the ratio flattens at about the number of cores. On
separate hosts each worker brings its own cores.

Clean-up: each run's database is dropped (``WITH (FORCE)``) and its processes stopped (SIGTERM,
then SIGKILL) in a ``finally``, also on Ctrl-C or SIGTERM of the benchmark; each run's
directories (spool, results, logs) are deleted after a successful run (kept for a failed one),
and the generated studies at the end.

Usage:  .venv/bin/python benchmarks/scale.py [--rounds 2] [--studies 12] [--workers 1 2 3]
        [--slices 300] [--size 512] [--methods m1 radiomics]
Writes: benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from common import (
    NODELAY,
    ROOT,
    WORK_ROOT,
    free_port,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    node_config,
    require_tools,
    spread,
    storescu_command,
    wait_port,
    wait_until,
    write_results,
)
from sqlalchemy import create_engine, text

from inference.phantom import PhantomStudy, generate_study

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def create_database() -> str:
    """A fresh database on the local PostgreSQL; its SQLAlchemy URL."""
    name = f"pacs_agent_scale_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (its sessions are ended first: ``WITH (FORCE)``)."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the database of ``url`` (a short connection of its own)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql)).all()]
    finally:
        engine.dispose()


def host_config(host: Path, port: int, url: str, shared: Path, methods: list[str]) -> Path:
    """The TOML of one "host": its own state dir, the shared database and storage."""
    path = node_config(host, port, quiet_seconds=1, methods=methods)
    toml = path.read_text().replace("[storage]\n", f'[storage]\nshared_dir = "{shared}"\n', 1)
    path.write_text(toml + f'[database]\nurl = "{url}"\n')
    return path


def start(host: Path, command: str, config: Path) -> subprocess.Popen[bytes]:
    """``pacs-agent <command>`` of one host, with a temp dir of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")} | {"TMPDIR": str(host)}
    with (host / "node.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pacs_agent", command, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process (workers finish the job they run), SIGKILL what is left after 120 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 120
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_run(work: Path, studies: list[PhantomStudy], workers: int, methods: list[str]) -> dict[str, Any]:
    """Store ``studies`` on a receiver, then run them through ``workers`` workers behind a gate; the times."""
    fresh_dir(work)
    procs: list[subprocess.Popen[bytes]] = []
    url: str | None = None
    expected_jobs = len(studies) * len(methods)
    load_at_start = load_average()
    try:
        url = create_database()
        shared = work / "shared"
        shared.mkdir()
        port = free_port()
        receiver = fresh_dir(work / "receiver")
        procs.append(start(receiver, "scp", host_config(receiver, port, url, shared, methods)))
        wait_port(port, 120, procs[0])
        for study in studies:
            assert study.seg_file is not None
            subprocess.run(
                storescu_command(port, "PACS_AGENT", [*study.ct_files, study.seg_file]),
                check=True,
                capture_output=True,
                env={**os.environ, **NODELAY},
            )

        def scheduled() -> bool:
            return query(url, "SELECT count(*) FROM jobs")[0][0] == expected_jobs

        wait_until(scheduled, 600, "every study to be scheduled", interval=0.5)
        gate_engine = create_engine(url)
        try:
            with gate_engine.connect() as gate:
                gate.execute(text("LOCK TABLE procrastinate_jobs IN EXCLUSIVE MODE"))
                started = time.monotonic()
                for n in range(workers):
                    host = fresh_dir(work / f"worker-{n + 1}")
                    procs.append(start(host, "worker", host_config(host, free_port(), url, shared, methods)))

                def ready() -> bool:
                    sql = "SELECT count(*) FROM workers WHERE queue_worker_id IS NOT NULL"
                    return query(url, sql)[0][0] == workers

                wait_until(ready, 600, f"{workers} worker(s) to register", interval=0.2)
                start_up = time.monotonic() - started
                gate.rollback()  # the gate opens: every worker's waiting fetch goes on
                opened = datetime.now(UTC)
        finally:
            gate_engine.dispose()

        def done() -> bool:
            states = dict(query(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
            if states.get("failed") or states.get("dead"):
                raise RuntimeError(f"a job failed: {states}; see the node.log files under {work}")
            return states.get("done", 0) == expected_jobs

        wait_until(done, 3600, "every job to be done", interval=1.0)
        rows = query(url, "SELECT worker_id, method, started_at, finished_at FROM jobs")
        first, last = (
            t if t.tzinfo else t.replace(tzinfo=UTC) for t in (min(r[2] for r in rows), max(r[3] for r in rows))
        )
        seconds = (last - opened).total_seconds()
        per_worker: dict[str, int] = {}
        for r in rows:
            per_worker[r[0]] = per_worker.get(r[0], 0) + 1
        run_seconds = {m: statistics.median((r[3] - r[2]).total_seconds() for r in rows if r[1] == m) for m in methods}
        return {
            "workers": workers,
            "seconds": round(seconds, 2),
            "start_up_seconds": round(start_up, 2),
            "first_job_started_after_gate_seconds": round((first - opened).total_seconds(), 2),
            "studies_per_hour": round(len(studies) * 3600 / seconds, 1),
            "jobs_per_worker": sorted(per_worker.values(), reverse=True),
            "job_run_seconds_median": {m: round(s, 2) for m, s in run_seconds.items()},
            "load_average_start": load_at_start,
            "load_average_end": load_average(),
        }
    finally:
        stop(procs)
        if url is not None:
            drop_database(url)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the ``finally`` blocks stop the processes and drop the databases


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["m1", "radiomics"])
    args = parser.parse_args(argv)
    require_tools("storescu")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load_start = load_average()
    work = fresh_dir(WORK_ROOT / "scale")
    runs: list[dict[str, Any]] = []
    try:
        studies = [
            generate_study(
                work / "studies" / f"s{n}",
                seed=900 + n,
                lesions=args.lesions,
                slices=args.slices,
                rows=args.size,
                columns=args.size,
                segmentation="seg",
            )
            for n in range(args.studies)
        ]
        for round_ in range(args.rounds):
            for workers in args.workers:
                run_dir = work / f"r{round_}-w{workers}"
                run = one_run(run_dir, studies, workers, args.methods)
                shutil.rmtree(run_dir)
                print(
                    f"round {round_ + 1}: {workers} worker(s): {run['studies_per_hour']} studies/h"
                    f" ({run['seconds']} s, jobs per worker {run['jobs_per_worker']},"
                    f" load {run['load_average_start']})",
                    flush=True,
                )
                runs.append(run)
    finally:
        shutil.rmtree(work / "studies", ignore_errors=True)
    by_count = {w: [r["studies_per_hour"] for r in runs if r["workers"] == w] for w in args.workers}
    base = statistics.median(by_count[args.workers[0]])
    summary = [
        {
            "workers": w,
            "studies_per_hour": spread(values, 1),
            "ratio_to_1_worker": round(statistics.median(values) / base, 2),
        }
        for w, values in by_count.items()
    ]
    job_seconds = {
        m: spread([r["job_run_seconds_median"][m] for r in runs if r["workers"] == args.workers[0]], 2)
        for m in args.methods
    }
    result = header(
        "scale",
        {
            "studies": args.studies,
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": args.lesions,
            "segmentation": "seg",
            "methods": args.methods,
            "rounds": args.rounds,
            "workers": args.workers,
        },
        load_start,
    )
    result |= {
        "runs": runs,
        "summary": summary,
        "job_run_seconds_one_worker": job_seconds,
    }
    path = write_results("scale", result)
    print(
        markdown_table(
            ["workers", "studies/h (median, min-max)", "ratio to 1 worker"],
            [
                [
                    s["workers"],
                    f"{s['studies_per_hour']['median']} ({s['studies_per_hour']['min']}-"
                    f"{s['studies_per_hour']['max']})",
                    s["ratio_to_1_worker"],
                ]
                for s in summary
            ],
        )
    )
    print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
