"""Cost of the completeness and UID checks on the C-STORE hot path: ``read_header`` before and after.

``read_header`` is what the C-STORE handler runs on every received instance. Since issue 15 it also
walks the element headers once (every declared length present, sequences and encapsulated Pixel
Data terminated), compares native Pixel Data with Rows x Columns x ..., and checks every UID the
node records. This script times ``read_header`` on the objects of one phantom study (a 512x512 CT
slice, the SEG, the RTSTRUCT), in a fresh interpreter per code tree: this checkout ("after") and a
checkout of the code before (``--baseline``, e.g. ``git worktree add /tmp/before <commit>``). Each
object is read ``--repeat`` times per batch, ``--batches`` batches per interpreter, ``--rounds``
interpreters per tree, alternating; the fastest batch mean is reported (the machine is shared),
with the ratio after / before and the added time as a share of one instance's receive time in
benchmarks/results/ingest.json (pacs-agent, one sender), if that file exists.

Usage:  .venv/bin/python benchmarks/header_check.py --baseline /tmp/before [--repeat 200] [--batches 7] [--rounds 5]
Writes: benchmarks/results/header_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, ROOT, WORK_ROOT, fresh_dir, header, load_average, markdown_table, write_results

WORK = WORK_ROOT / "header_check"


MEASURE = """
import json, sys, time
from pathlib import Path
from pacs_agent.receive import header as module

files, repeat, batches = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
result = {"module": module.__file__}
for kind, path in files.items():
    data = Path(path).read_bytes()
    module.read_header(data)  # warm-up (imports, caches)
    means = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(repeat):
            module.read_header(data)
        means.append((time.perf_counter() - start) / repeat * 1e6)
    result[kind] = round(min(means), 1)
print(json.dumps(result))
"""
"""Run in a fresh interpreter per code tree: the fastest batch's mean microseconds of ``read_header`` per object."""


def run_tree(tree: Path, files: dict[str, Path], repeat: int, batches: int) -> dict[str, float]:
    """Time ``read_header`` of the pacs_agent in ``tree`` (a fresh interpreter, ``PYTHONPATH=tree``)."""
    argv = [sys.executable, "-c", MEASURE, json.dumps({k: str(v) for k, v in files.items()}), str(repeat), str(batches)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, cwd=tree)
    if out.returncode != 0:
        raise SystemExit(f"timing in {tree} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result.pop("module")).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"timing in {tree} imported pacs_agent from elsewhere")
    return {k: float(v) for k, v in result.items()}


def per_instance_ms() -> float | None:
    """One instance's receive time (ms) of pacs-agent with one sender, from the ingest benchmark's results."""
    path = RESULTS_DIR / "ingest.json"
    if not path.exists():
        return None
    rate = json.loads(path.read_text())["receivers"]["pacs-agent"]["senders_1"]["instances_per_second"]["median"]
    return 1000.0 / float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code before the checks")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if args.baseline is None:
        parser.error("--baseline is required (a checkout of the code before)")
    load_start = load_average()
    from inference.phantom import generate_study

    study = generate_study(fresh_dir(WORK) / "study", seed=7, lesions=2, slices=40, rows=args.size, columns=args.size)
    files = {"CT slice": study.ct_files[0], "SEG": study.seg_file, "RTSTRUCT": study.rtstruct_file}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved, so that load from elsewhere hits both alike
        for tree, best in ((args.baseline.resolve(), before), (ROOT, after)):
            for kind, us in run_tree(tree, files, args.repeat, args.batches).items():
                best[kind] = min(us, best.get(kind, us))
    instance_ms = per_instance_ms()
    rows: list[list[Any]] = []
    kinds: dict[str, Any] = {}
    for kind, path in files.items():
        added_us = after[kind] - before[kind]
        share = round(added_us / 1000 / instance_ms * 100, 2) if instance_ms else None
        kinds[kind] = {
            "bytes": path.stat().st_size,
            "before_us": before[kind],
            "after_us": after[kind],
            "ratio_after_before": round(after[kind] / before[kind], 3),
            "added_us": round(added_us, 1),
            "added_share_of_instance_receive_percent": share,
        }
        rows.append([kind, path.stat().st_size, before[kind], after[kind], kinds[kind]["ratio_after_before"], share])
    result = header(
        "header_check",
        {
            "repeat": args.repeat,
            "batches": args.batches,
            "rounds": args.rounds,
            "size": args.size,
            "baseline": str(args.baseline),
            "statistic": "minimum over rounds and batches of the mean time per read (robust to load from elsewhere)",
        },
        load_start,
    )
    result["per_instance_receive_ms"] = round(instance_ms, 2) if instance_ms else None
    result["objects"] = kinds
    path = write_results("header_check", result)
    print(
        markdown_table(
            ["object", "bytes", "read_header before (us)", "after (us)", "ratio", "added, % of one instance's receive"],
            rows,
        )
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
