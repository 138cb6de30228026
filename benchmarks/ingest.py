"""Ingest benchmark: the same CT series sent with DCMTK storescu to pacs-agent, Orthanc and storescp.

Each receiver runs on loopback and stores to disk under benchmarks/work/. pacs-agent keeps its
durability (fsync of every file and its directory, fully synchronous SQLite commit per instance);
Orthanc uses its defaults (SQLite index + file storage); DCMTK storescp writes files without fsync.
Every receiver gets the same files in the same run, several rounds, and the median is reported
together with the ratios pacs-agent / peer.

Usage:  .venv/bin/python benchmarks/ingest.py [--slices 300] [--size 512] [--rounds 3]
Writes: benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacs_agent import __version__  # noqa: E402
from pacs_agent.phantom import generate_study  # noqa: E402
from tests.integration.peers import Orthanc  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


# Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is set; with it on, every C-STORE
# waits ~40 ms for a delayed ACK. The sender always runs with it off; DCMTK-based receivers are
# measured both ways.
NODELAY = {"TCP_NODELAY": "1"}


def send(port: int, aec: str, files: list[Path]) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-R", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **NODELAY},
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {result.stderr[-2000:]}")
    return elapsed


def run_pacs_agent(files: list[Path], work: Path) -> float:
    port = free_port()
    config = work / "pacs-agent.toml"
    config.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\n[storage]\nstate_dir = "{work / "state"}"\nmin_free_mb = 100\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_agent", "scp", "--config", str(config)],
        stdout=(work / "node.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port)
        return send(port, "PACS_AGENT", files)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def run_orthanc(files: list[Path], work: Path, env: dict[str, str] | None = None) -> float:
    orthanc = Orthanc(work / "orthanc")
    orthanc.start(env=env)
    try:
        return send(orthanc.dicom_port, orthanc.ae_title, files)
    finally:
        orthanc.stop()


def run_storescp(files: list[Path], work: Path, env: dict[str, str] | None = None) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        ["storescp", "--output-directory", str(out), "--aetitle", "STORESCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_port(port)
        return send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(30)


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "unknown"

    return {
        "pacs-agent": __version__,
        "orthanc": first_line(["Orthanc", "--version"]),
        "dcmtk": first_line(["storescp", "--version"]),
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"benchmark needs {tool} (make system-deps)", file=sys.stderr)
            return 1
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    print(f"generating a {args.slices}-slice {args.size}x{args.size} CT series ...", flush=True)
    study = generate_study(
        WORK / "study", seed=1, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="none"
    )
    files = list(study.ct_files)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    receivers: dict[str, Callable[[list[Path], Path], float]] = {
        "pacs-agent": run_pacs_agent,
        "orthanc": run_orthanc,
        "orthanc-nodelay": lambda f, w: run_orthanc(f, w, env=NODELAY),
        "dcmtk-storescp": run_storescp,
        "dcmtk-storescp-nodelay": lambda f, w: run_storescp(f, w, env=NODELAY),
    }
    seconds: dict[str, list[float]] = {name: [] for name in receivers}
    for round_no in range(args.rounds):
        for name, run in receivers.items():  # interleaved so that machine noise hits all alike
            work = WORK / f"{name}-{round_no}"
            work.mkdir()
            elapsed = run(files, work)
            seconds[name].append(elapsed)
            print(
                f"round {round_no + 1}: {name:15s} {elapsed:6.2f} s  {len(files) / elapsed:7.1f} instances/s",
                flush=True,
            )
            shutil.rmtree(work, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "benchmark": "ingest",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "series": {"instances": len(files), "rows": args.size, "columns": args.size, "megabytes": round(megabytes, 1)},
        "sender": "DCMTK storescu -R, one association, loopback",
        "rounds": args.rounds,
        "receivers": {
            name: {
                "seconds_median": round(median[name], 3),
                "seconds_all": [round(v, 3) for v in seconds[name]],
                "instances_per_second": round(len(files) / median[name], 1),
                "megabytes_per_second": round(megabytes / median[name], 1),
            }
            for name in receivers
        },
        "ratios": {
            f"pacs-agent_vs_{name}": round(median[name] / median["pacs-agent"], 2)
            for name in receivers
            if name != "pacs-agent"
        },
        "durability": {
            "pacs-agent": "fsync file + directory, SQLite WAL synchronous=FULL commit per instance, then Success",
            "orthanc": "defaults (SQLite index, file storage); Nagle on (Debian DCMTK default)",
            "orthanc-nodelay": "as orthanc, with TCP_NODELAY=1 in its environment",
            "dcmtk-storescp": "plain file write, no fsync; Nagle on (Debian DCMTK default)",
            "dcmtk-storescp-nodelay": "plain file write, no fsync; TCP_NODELAY=1",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"]))
    print(f"written {RESULTS}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
