"""Scaling out: 12 phantom studies through 1, 2 and 3 worker processes on PostgreSQL.

Each configuration runs on a fresh PostgreSQL database of the local server: one receiver
(``pacs-agent scp``, the several-hosts set-up: ``[database] url`` on PostgreSQL, ``[storage]
shared_dir``) and N ``pacs-agent worker`` processes with their own state directories, as separate
hosts would be. The studies (distinct phantoms, radiomics) are stored first with the workers not
yet started, then the workers start together: the time from the moment every worker is ready (a
worker registers with the queue only once its pipeline is loaded, so imports are not in it) to the
last job done is the processing time of the queue (store and readiness are not in it either), and
studies/hour is 12 / that time. Rounds interleave the worker counts (1, 2, 3, 1, 2, 3, ...) so that a change of
load on the shared machine touches each alike; the figures are medians with their spread, and the
ratios are to 1 worker in the same run.

Where the ceiling is: this machine has 2 cores, so 3 workers (each a whole radiomics pipeline on
one core) compete for 2 cores with the receiver and PostgreSQL; the ratio flattens at about the
number of cores. On separate hosts each worker brings its own cores.

Usage:  .venv/bin/python benchmarks/scale.py [--rounds 2] [--studies 12] [--workers 1 2 3] [--slices 60]
Writes: benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
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
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    """Drop the database of ``url``."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the database of ``url`` (a short connection of its own)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql)).all()]
    finally:
        engine.dispose()


def host_config(host: Path, port: int, url: str, shared: Path) -> Path:
    """The TOML of one "host": its own state dir, the shared database and storage."""
    path = node_config(host, port, quiet_seconds=1, methods=("radiomics",))
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


def one_run(work: Path, studies: list[PhantomStudy], workers: int) -> dict[str, Any]:
    """Store ``studies`` on a receiver, then start ``workers`` workers; times until every job is done."""
    fresh_dir(work)
    url = create_database()
    shared = work / "shared"
    shared.mkdir()
    port = free_port()
    receiver = fresh_dir(work / "receiver")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start(receiver, "scp", host_config(receiver, port, url, shared)))
        wait_port(port, 120, procs[0])
        for study in studies:
            subprocess.run(
                storescu_command(port, "PACS_AGENT", [*study.ct_files, study.seg_file]), check=True, capture_output=True
            )

        def scheduled() -> bool:
            return query(url, "SELECT count(*) FROM jobs")[0][0] == len(studies)

        wait_until(scheduled, 300, "every study to be scheduled")
        started = time.monotonic()
        for n in range(workers):
            host = fresh_dir(work / f"worker-{n + 1}")
            procs.append(start(host, "worker", host_config(host, free_port(), url, shared)))

        def ready() -> bool:
            return query(url, "SELECT count(*) FROM workers WHERE queue_worker_id IS NOT NULL")[0][0] == workers

        wait_until(ready, 300, f"{workers} worker(s) to register")
        first_ready = time.monotonic()

        def done() -> bool:
            states = query(url, "SELECT state, count(*) FROM jobs GROUP BY state")
            return dict(states).get("done", 0) == len(studies)

        wait_until(done, 3600, "every job to be done", interval=0.2)
        finished = time.monotonic()
        per_worker = dict(query(url, "SELECT worker_id, count(*) FROM jobs GROUP BY worker_id"))
        seconds = finished - first_ready
        return {
            "workers": workers,
            "seconds": round(seconds, 2),
            "start_up_seconds": round(first_ready - started, 2),
            "studies_per_hour": round(len(studies) * 3600 / seconds, 1),
            "jobs_per_worker": sorted(per_worker.values(), reverse=True),
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        drop_database(url)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--slices", type=int, default=60)
    args = parser.parse_args(argv)
    require_tools("storescu")
    load_start = load_average()
    work = fresh_dir(WORK_ROOT / "scale")
    studies = [
        generate_study(work / "studies" / f"s{n}", seed=900 + n, lesions=2, slices=args.slices, rows=256, columns=256)
        for n in range(args.studies)
    ]
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for workers in args.workers:
            run = one_run(work / f"r{round_}-w{workers}", studies, workers)
            print(f"round {round_ + 1}: {workers} worker(s): {run['studies_per_hour']} studies/h ({run['seconds']} s)")
            runs.append(run)
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
    result = header(
        "scale",
        {"studies": args.studies, "slices": args.slices, "rows": 256, "methods": ["radiomics"], "rounds": args.rounds},
        load_start,
    )
    result |= {"runs": runs, "summary": summary}
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
