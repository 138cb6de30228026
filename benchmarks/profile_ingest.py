"""Where pacs-agent's receive time goes: py-spy samples of ``pacs-agent scp`` while one storescu sends a series.

The node runs as in benchmarks/ingest.py (fsync durability, SQLite); py-spy (``.venv/bin/py-spy``)
samples every thread of the process 100 times a second, idle threads included, while one storescu
sends a 300-slice 512x512 CT series. storescu waits for each C-STORE response before it sends
the next instance, so the time of one instance is the sum along one path: the DUL thread reads and
decodes the PDUs, the association thread assembles the message and runs the C-STORE handler, the
response goes back. The report shows, per thread, where the samples are:

- the handler (``ReceiveHandlers.on_store``) split by the line of pacs-agent code it was on, with
  the library below it named (e.g. ``spool.py:67 os.fsync(fd)``, ``handlers.py:244 ... [sqlalchemy]``);
- pynetdicom's own work outside the handler (PDU decoding, DIMSE message assembly, encoding);
- waiting (queue / socket / event waits), which on the critical path means the other thread works.

Also reported: the scp process's CPU seconds per wall second during the send (at 1.0 one core is
saturated - the GIL makes the receive path effectively single-core).

Usage:  .venv/bin/python benchmarks/profile_ingest.py [--slices 300] [--rate 250]
Writes: benchmarks/results/profile_ingest.json
"""

from __future__ import annotations

import argparse
import collections
import linecache
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    WORK_ROOT,
    NodeProcess,
    cpu_seconds,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    require_tools,
    send_concurrently,
    write_results,
)

from inference.phantom import generate_study

WORK = WORK_ROOT / "profile_ingest"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
WAIT_FUNCTIONS = {"wait", "get", "_wait_for_tstate_lock", "select", "sleep", "recv", "accept", "poll", "join"}
LIBRARIES = ("sqlalchemy", "pynetdicom", "pydicom", "sqlite3", "threading", "queue", "socket", "selectors")


def parse_frame(text: str) -> tuple[str, str, int]:
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), "", 0
    return match["func"], match["file"], int(match["line"] or 0)


def library_of(path: str) -> str:
    path = path if path.startswith("/") else f"/{path}"  # py-spy shortens site-packages paths
    for name in LIBRARIES:
        if f"/{name}/" in path or path.endswith(f"/{name}.py"):
            return name
    if "pacs_agent" in path:
        return "pacs_agent"
    return Path(path).stem


def source_line(path: str, line: int) -> str:
    for candidate in (Path(path), ROOT / path):
        text = linecache.getline(str(candidate), line).strip()
        if text:
            return text[:70]
    return ""


def short(func: str) -> str:
    """``Class.method`` -> ``method``."""
    return func.rsplit(".", 1)[-1]


def describe(frame: tuple[str, str, int]) -> str:
    func, file, line = frame
    src = source_line(file, line)
    return f"{library_of(file)} {func} ({Path(file).name}:{line}{' `' + src + '`' if src else ''})"


def classify(frames: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(thread role, bucket) of one sample; frames root first."""
    names = [short(f) for f, _, _ in frames]
    files = " ".join(f[1] for f in frames)
    if "on_store" in names:
        index = names.index("on_store")
        own = [(i, f) for i, f in enumerate(frames) if "pacs_agent" in f[1] and i >= index]
        i, (_func, file, line) = own[-1]
        where = f"handler {Path(file).name}:{line} `{source_line(file, line)}`"
        if i + 1 < len(frames):
            where += f" -> {library_of(frames[-1][1])} {frames[-1][0]}"
        return "association", where
    if "_run_reactor" in names or "_serve_request" in names or "association.py" in files:
        role = "association"
    elif "run_reactor" in names:
        role = "dul"
    elif "_schedule_forever" in names:
        role = "scheduler"
    else:
        role = "other"
    leaf = frames[-1]
    if short(leaf[0]) in WAIT_FUNCTIONS or library_of(leaf[1]) in ("threading", "queue", "selectors"):
        return role, "waiting (blocked on a queue, lock or socket)"
    return role, describe(leaf)


CATEGORIES = (
    # (category, predicate on the bucket text of classify())
    (
        "handler: fsync of the spooled file",
        lambda b: b.startswith("handler spool.py") and "fsync(fd)" in b and ":6" in b,
    ),
    ("handler: fsync of the spool directory", lambda b: b.startswith("handler spool.py:4") and "fsync(fd)" in b),
    ("handler: SQLite COMMIT (WAL fsync, synchronous=FULL)", lambda b: b.startswith("handler") and "do_commit" in b),
    (
        "handler: SQLite statements (BEGIN IMMEDIATE, SELECT, INSERT, UPDATE, pre-ping)",
        lambda b: b.startswith("handler") and ("do_execute" in b or "do_ping" in b),
    ),
    ("handler: free-space check (statvfs)", lambda b: b.startswith("handler") and "disk_usage" in b),
    ("handler: header parse (pydicom dcmread)", lambda b: b.startswith("handler header.py")),
    ("handler: encoded_dataset (file meta + bytes copy)", lambda b: b.startswith("handler") and "encoded_dataset" in b),
    (
        "handler: SQLAlchemy in Python (statement building, compile cache, session, pool)",
        lambda b: (
            b.startswith("handler")
            and any(x in b for x in ("store.py", "db.py", "handlers.py:2", "-> session", "-> base", "-> elements"))
        ),
    ),
    ("handler: other (open, write, rename, mkdir, checks)", lambda b: b.startswith("handler")),
    ("pynetdicom reactor sleep(0.001) polling", lambda b: "time.sleep" in b),
    ("waiting (queue, lock, socket)", lambda b: b.startswith("waiting")),
    ("pynetdicom PDU / DIMSE work", lambda b: True),
)


def categorise(buckets: collections.Counter[str]) -> dict[str, float]:
    """Shares of coarse categories (first matching rule wins)."""
    total = sum(buckets.values())
    found: collections.Counter[str] = collections.Counter()
    for bucket, count in buckets.items():
        for name, rule in CATEGORIES:
            if rule(bucket):
                found[name] += count
                break
    return {name: round(count / total, 4) for name, count in found.most_common()}


def analyse(raw: Path) -> dict[str, Any]:
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    roles: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        parts = stack.split(";")
        thread = re.sub(r"^thread \((\w+)\).*$", r"thread \1", parts[0].strip())
        frames = [parse_frame(p) for p in parts[1:] if p]
        if not frames:
            continue
        role, bucket = classify(frames)
        per_thread[thread][bucket] += int(count)
        roles[thread][role] += int(count)
    threads = {}
    for thread, buckets in per_thread.items():
        role = max((r for r in roles[thread] if r != "other"), key=lambda r: roles[thread][r], default="other")
        total = sum(buckets.values())
        threads[thread] = {
            "role": role,
            "samples": total,
            "categories": categorise(buckets),
            "buckets": {b: round(c / total, 4) for b, c in buckets.most_common(25)},
        }
    return threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rate", type=int, default=100)
    args = parser.parse_args()
    require_tools("storescu")
    if not PY_SPY.exists():
        sys.exit("py-spy is not installed in .venv (pip install py-spy)")
    load_start = load_average()
    fresh_dir(WORK)
    study = generate_study(
        WORK / "study", seed=1, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="none"
    )
    files = list(study.ct_files)
    node = NodeProcess(WORK / "node", command="scp")
    node.start()
    assert node.process is not None
    raw = WORK / "profile.txt"
    spy = subprocess.Popen(
        [
            *(str(PY_SPY), "record", "--pid", str(node.process.pid), "--rate", str(args.rate)),
            *("--format", "raw", "--threads", "--idle", "--output", str(raw)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # py-spy attaches
    cpu_before = cpu_seconds(node.process.pid)
    seconds, _ = send_concurrently(node.port, node.ae_title, [files])
    cpu = cpu_seconds(node.process.pid) - cpu_before
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    node.stop()
    if not raw.exists():
        sys.exit(f"py-spy wrote nothing: {err.decode()[-2000:]}")
    threads = analyse(raw)
    result = header(
        "profile_ingest",
        {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "py_spy_rate_hz": args.rate,
            "sender": "DCMTK storescu -R (TCP_NODELAY=1), one association",
            "node": "pacs-agent scp, fsync durability, SQLite; sampled with py-spy (slows it a little)",
        },
        load_start,
    )
    result |= {
        "send_seconds": round(seconds, 2),
        "instances_per_second": round(args.slices / seconds, 1),
        "scp_cpu_seconds_per_wall_second": round(cpu / seconds, 2),
        "scp_cpu_ms_per_instance": round(1000 * cpu / args.slices, 2),
        "threads": {t: v for t, v in threads.items() if v["role"] in ("association", "dul")},
        "other_threads": {
            t: {"role": v["role"], "samples": v["samples"]}
            for t, v in threads.items()
            if v["role"] not in ("association", "dul")
        },
    }
    path = write_results("profile_ingest", result)
    print(
        f"{args.slices / seconds:.1f} instances/s under py-spy; scp CPU {cpu / seconds:.2f} s per s, "
        f"{1000 * cpu / args.slices:.1f} ms per instance"
    )
    per_instance_ms = 1000 * seconds / args.slices
    for thread, entry in result["threads"].items():
        print(f"\n{entry['role']} thread {thread} ({entry['samples']} samples)")
        print(
            markdown_table(
                ["category", "share of the thread's wall time", "ms per instance"],
                [[c, f"{v:.1%}", f"{v * per_instance_ms:.1f}"] for c, v in entry["categories"].items()],
            )
        )
        print(
            markdown_table(
                ["where", "share of the thread's wall time"], [[b, f"{s:.1%}"] for b, s in entry["buckets"].items()]
            )
        )
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
