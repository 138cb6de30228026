"""Shared helpers of the benchmarks: peers as real processes, timing, machine facts, results files.

Every benchmark measures pacs-agent against a peer in the same run (the machine is shared, so only
ratios taken under the same load mean something), interleaves rounds, reports medians with the
spread, and records the load average at its start and end.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# First, so that the ``inference`` package wins over benchmarks/inference.py (the script's folder).
sys.path.insert(0, str(ROOT))

from pacs_agent import __version__  # noqa: E402
from tests.integration.peers import Orthanc, wait_for  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
WORK_ROOT = ROOT / "benchmarks" / "work"

NODELAY = {"TCP_NODELAY": "1"}
"""Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment; with it on,
every C-STORE response waits ~40 ms for a delayed ACK. Senders always run with it off."""


# -- small utilities --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; RuntimeError naming ``what`` after ``timeout``."""
    try:
        return wait_for(predicate, timeout, what, interval)
    except AssertionError as exc:  # the tests' helper fails a test; a benchmark stops with an error
        raise RuntimeError(str(exc)) from None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def utc_now() -> str:
    """Now, ISO 8601 UTC to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """CPU count, platform, CPU model and memory of this machine."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    """Versions of pacs-agent, the peers and the main Python libraries."""

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30).stdout
            return out.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    found = {
        "pacs-agent": __version__,
        "orthanc": first_line([shutil.which("Orthanc") or "/usr/sbin/Orthanc", "--version"]),
        "dcmtk": first_line(["storescp", "--version"]),
        "python": platform.python_version(),
    }
    for module in ("pynetdicom", "pydicom", "sqlalchemy", "torch"):
        with contextlib.suppress(Exception):
            found[module] = str(__import__(module).__version__)
    return found


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "all": [round(v, digits) for v in values],
    }


def header(benchmark: str, parameters: dict[str, Any], load_start: list[float]) -> dict[str, Any]:
    """The common head of every results file."""
    return {
        "benchmark": benchmark,
        "date": utc_now(),
        "machine": machine(),
        "load_average_start": load_start,
        "versions": versions(),
        "parameters": parameters,
    }


def write_results(name: str, result: dict[str, Any]) -> Path:
    """Add the end load average and write ``benchmarks/results/<name>.json``."""
    result["load_average_end"] = load_average()
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fresh_dir(path: Path) -> Path:
    """Delete and recreate ``path``."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def require_tools(*tools: str) -> None:
    """Exit with a message when a peer tool is missing."""
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"benchmark needs {tool} (make system-deps)")


# -- senders ----------------------------------------------------------------------------------


def storescu_command(port: int, aec: str, files: Sequence[Path], aet: str = "BENCH") -> list[str]:
    """DCMTK storescu proposing only the SOP classes of the files (-R), one association."""
    return ["storescu", "-R", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)]


def send_concurrently(port: int, aec: str, batches: Sequence[Sequence[Path]]) -> tuple[float, list[float]]:
    """Start one storescu per batch at once (TCP_NODELAY=1); returns (wall seconds, seconds per sender)."""
    env = {**os.environ, **NODELAY}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_command(port, aec, batch, aet=f"BENCH{n}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for n, batch in enumerate(batches)
    ]
    ends: list[float] = [0.0] * len(procs)
    errors = []
    pending = dict(enumerate(procs))
    while pending:
        for n, proc in list(pending.items()):
            if proc.poll() is not None:
                ends[n] = time.perf_counter() - start
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                if proc.returncode != 0:
                    errors.append(f"storescu {n} to {aec} exited {proc.returncode}: {err[-1500:]}")
                del pending[n]
        time.sleep(0.005)
    wall = max(ends)
    if errors:
        raise RuntimeError("\n".join(errors))
    return wall, ends


# -- receivers as real processes --------------------------------------------------------------


def node_config(
    work: Path,
    port: int,
    *,
    quiet_seconds: float = 30.0,
    methods: Sequence[str] = ("radiomics",),
    destination: tuple[str, int] | None = None,
    models_dir: Path | None = None,
    log_level: str = "WARNING",
    any_region: bool = True,
    receive_processes: int | str = 1,
) -> Path:
    """Write a pacs-agent TOML for a benchmark node; returns its path.

    ``any_region``: ``[routing] method_regions = {}``, every enabled method runs on every study (the
    phantom is an abdominal CT; M2 and M4 are chest methods and would be skipped otherwise).
    """
    lines = [
        "[node]",
        'ae_title = "PACS_AGENT"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f"receive_processes = {receive_processes!r}".replace("'", '"'),
        "[storage]",
        f'state_dir = "{work / "state"}"',
        "min_free_mb = 100",
        "[readiness]",
        f"quiet_seconds = {quiet_seconds}",
        "[jobs]",
        "methods = [" + ", ".join(f'"{m}"' for m in methods) + "]",
        "[delivery]",
        "initial_backoff_seconds = 1",
        "max_backoff_seconds = 2",
        "[routing]",
        "method_regions = {}" if any_region else "",
        "[logging]",
        f'level = "{log_level}"',
        "[observability]",
        f"http_port = {free_port()}",
    ]
    if models_dir is not None:
        lines += ["[models]", f'dir = "{models_dir}"']
    if destination is not None:
        ae_title, dest_port = destination
        lines += [
            "[[destinations]]",
            'name = "pacs"',
            f'ae_title = "{ae_title}"',
            'host = "127.0.0.1"',
            f"port = {dest_port}",
        ]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pacs-agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class NodeProcess:
    """``pacs-agent scp`` or ``serve`` as a real process on a free port, with its own state directory."""

    work: Path
    command: str = "scp"
    config_options: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ae_title: str = "PACS_AGENT"

    @property
    def database(self) -> Path:
        """The node's SQLite file."""
        return self.work / "state" / "pacs-agent.db"

    def start(self) -> None:
        """Start and wait until the DICOM port listens."""
        config = node_config(self.work, self.port, **self.config_options)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}
        with (self.work / "node.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent", self.command, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_port(self.port, 90, self.process)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read the node's database (a short read-only connection; WAL lets it run beside the node)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)) as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    def stored(self) -> int:
        """How many instances the node has recorded."""
        return int(self.query("SELECT count(*) FROM instances")[0][0])


class OrthancProcess(Orthanc):
    """The tests' Orthanc helper, with an environment that actually reaches the Orthanc process.

    ``tests.integration.peers.Orthanc.start(env=...)`` does not pass ``env`` to the child, so a
    ``TCP_NODELAY=1`` given there has no effect; here the variables are put into this process's
    environment for the moment of the start (the child inherits them).
    """

    def start(self, env: dict[str, str] | None = None) -> None:
        with patched_environ(env or {}):
            super().start()

    def count_instances(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class StorescpProcess:
    """DCMTK storescp writing plain files (no fsync) into ``work/out``, one child process per association."""

    work: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    ae_title: str = "STORESCP"
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it listens."""
        out = self.work / "out"
        out.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", "--fork", "--output-directory", str(out), "--aetitle", self.ae_title, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        wait_port(self.port, 30, self.process)

    def stop(self) -> None:
        """Terminate and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None

    def stored(self) -> int:
        """How many files it wrote."""
        return sum(1 for _ in (self.work / "out").iterdir())


# -- memory of processes ----------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/<pid>/status in kB (empty when the process is gone)."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") or key.startswith("Rss"):
            with contextlib.suppress(ValueError, IndexError):
                values[key] = int(rest.split()[0])
    return values


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    todo, found = [pid], []
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
