"""Peak resident memory of each pacs-agent process for a 600-slice 512x512 study, with Orthanc as the peer.

A fresh node (``pacs-agent serve``: the scp process and its worker child) receives a 600-slice
512x512 CT + SEG with 3 liver lesions, runs the configured methods and delivers the results to
Orthanc. Every 0.2 s the benchmark reads ``/proc/<pid>/status`` of the serve process and all its
descendants: ``VmHWM`` (the kernel's peak resident set size of the process) and ``VmRSS`` (now).
The peak of each process is its last ``VmHWM`` before it exits; the phase in which the RSS was
highest is recorded too. As the peer in the same run, the same study is sent to Orthanc (defaults)
first and Orthanc's ``VmHWM`` is read after it stored it. Target: every pacs-agent process < 2 GB.

Model packages and routing: as benchmarks/latency.py (config/models demo packages when present,
else a small package from tests/model_packages.py, recorded as ``package_source``;
``[routing] method_regions = {}`` so that the chest methods M2 and M4 run on the abdominal phantom).

Usage:  .venv/bin/python benchmarks/memory.py [--slices 600] [--rounds 2] [--methods radiomics m1 m2 m3 m4]
Writes: benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    WORK_ROOT,
    NodeProcess,
    OrthancProcess,
    descendants,
    fresh_dir,
    header,
    load_average,
    markdown_table,
    proc_status,
    require_tools,
    send_concurrently,
    spread,
    wait_until,
    write_results,
)
from latency import prepare_models, study_facts

from inference.phantom import generate_study

WORK = WORK_ROOT / "memory"
TARGET_MB = 2048
KB_PER_MB = 1024


class Sampler:
    """Samples VmHWM / VmRSS of a process tree every ``interval`` seconds in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.phase = "start"
        self.hwm_kb: dict[int, int] = {}
        self.rss_peak: dict[int, tuple[int, str]] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _name(self, pid: int) -> str:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return "?"
        words = [a.decode(errors="replace") for a in args if a]
        if "pacs_agent" in words:
            rest = words[words.index("pacs_agent") + 1 :]
            return f"pacs-agent {rest[0] if rest else ''}".strip()
        return Path(words[0]).name if words else "?"

    def sample(self) -> None:
        for pid in [self.root_pid, *descendants(self.root_pid)]:
            status = proc_status(pid)
            if not status:
                continue
            self.names.setdefault(pid, self._name(pid))
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status.get("VmHWM", 0))
            rss = status.get("VmRSS", 0)
            if rss > self.rss_peak.get(pid, (0, ""))[0]:
                self.rss_peak[pid] = (rss, self.phase)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def report(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for pid, hwm in self.hwm_kb.items():
            name = self.names.get(pid, "?")
            key = name if name not in found else f"{name} ({pid})"
            found[key] = {
                "pid": pid,
                "vm_hwm_mb": round(hwm / KB_PER_MB, 1),
                "peak_rss_sampled_mb": round(self.rss_peak.get(pid, (0, ""))[0] / KB_PER_MB, 1),
                "peak_rss_phase": self.rss_peak.get(pid, (0, ""))[1],
            }
        return found


def orthanc_peak(work: Path, files: list[Path]) -> dict[str, Any]:
    orthanc = OrthancProcess(work)
    orthanc.start()
    try:
        assert orthanc.process is not None
        seconds, _ = send_concurrently(orthanc.dicom_port, orthanc.ae_title, [files])
        status = proc_status(orthanc.process.pid)
        stored = orthanc.count_instances()
    finally:
        orthanc.stop()
    return {"vm_hwm_mb": round(status.get("VmHWM", 0) / KB_PER_MB, 1), "stored": stored, "send_seconds": seconds}


def node_peak(
    work: Path, files: list[Path], study_uid: str, methods: list[str], dest: OrthancProcess
) -> dict[str, Any]:
    node = NodeProcess(
        work,
        command="serve",
        config_options={
            "quiet_seconds": 2.0,
            "methods": methods,
            "destination": (dest.ae_title, dest.dicom_port),
            "models_dir": WORK / "models",
        },
    )
    node.start()
    assert node.process is not None
    sampler = Sampler(node.process.pid)
    sampler.start()
    try:
        wait_until(lambda: descendants(node.process.pid) if node.process else None, 60, "the worker process")  # type: ignore[union-attr]
        time.sleep(3)  # the worker imports torch and the pipelines at start
        sampler.phase = "receiving"
        started = time.monotonic()
        send_seconds, _ = send_concurrently(node.port, node.ae_title, [files])
        sampler.phase = "processing + delivering"
        wait_until(lambda: study_facts(node, study_uid), 900, "the results", interval=0.5)
        sampler.phase = "idle after"
        time.sleep(1)
        sampler.sample()
        total = time.monotonic() - started
    finally:
        sampler.stop()
        node.stop()
    return {"processes": sampler.report(), "send_seconds": round(send_seconds, 2), "total_seconds": round(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["radiomics", "m1", "m2", "m3", "m4"])
    args = parser.parse_args()
    require_tools("storescu", "Orthanc")
    load_start = load_average()
    fresh_dir(WORK)
    package_source = prepare_models(set(args.methods), WORK / "models")
    print(f"generating a {args.slices}-slice {args.size}x{args.size} CT + SEG ...", flush=True)
    study = generate_study(
        WORK / "study", seed=7, lesions=3, slices=args.slices, rows=args.size, columns=args.size, segmentation="seg"
    )
    assert study.seg_file is not None
    files = [*study.ct_files, study.seg_file]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    destination = OrthancProcess(WORK / "destination", ae_title="DEST")
    destination.start()
    rounds: list[dict[str, Any]] = []
    try:
        for round_no in range(args.rounds):
            peer = orthanc_peak(fresh_dir(WORK / f"orthanc-{round_no}"), files)
            node = node_peak(
                fresh_dir(WORK / f"node-{round_no}"), files, study.study_instance_uid, args.methods, destination
            )
            rounds.append({"orthanc": peer, "pacs-agent": node, "load_average_1min": load_average()[0]})
            shutil.rmtree(WORK / f"orthanc-{round_no}", ignore_errors=True)
            shutil.rmtree(WORK / f"node-{round_no}", ignore_errors=True)
            summary = ", ".join(f"{k} {v['vm_hwm_mb']:.0f} MB" for k, v in node["processes"].items())
            print(f"round {round_no + 1}: orthanc {peer['vm_hwm_mb']:.0f} MB; {summary}", flush=True)
    finally:
        destination.stop()

    processes: dict[str, Any] = {}
    for name in rounds[0]["pacs-agent"]["processes"]:
        values = [
            r["pacs-agent"]["processes"][name]["vm_hwm_mb"] for r in rounds if name in r["pacs-agent"]["processes"]
        ]
        phases = [
            r["pacs-agent"]["processes"][name]["peak_rss_phase"] for r in rounds if name in r["pacs-agent"]["processes"]
        ]
        processes[name] = {"vm_hwm_mb": spread(values, 1), "peak_phase": phases}
    orthanc_values = [r["orthanc"]["vm_hwm_mb"] for r in rounds]
    processes["orthanc (peer, receiving the same study)"] = {"vm_hwm_mb": spread(orthanc_values, 1)}
    targets = {
        f"{name}_<_{TARGET_MB}_MB": {
            "vm_hwm_mb_max": entry["vm_hwm_mb"]["max"],
            "met": entry["vm_hwm_mb"]["max"] < TARGET_MB,
        }
        for name, entry in processes.items()
        if name.startswith("pacs-agent")
    }
    result = header(
        "memory",
        {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "lesions": 3,
            "study_megabytes": round(megabytes, 1),
            "methods": args.methods,
            "rounds": args.rounds,
            "sampling": "VmHWM and VmRSS of /proc/<pid>/status every 0.2 s, serve process and descendants",
            "package_source": package_source,
            "routing": "[routing] method_regions = {} (every method runs on the abdominal phantom)",
        },
        load_start,
    )
    result |= {"processes": processes, "rounds": rounds, "targets": targets}
    path = write_results("memory", result)
    rows = [
        [
            name,
            f"{e['vm_hwm_mb']['median']:.0f}",
            f"{e['vm_hwm_mb']['max']:.0f}",
            ", ".join(sorted(set(e.get("peak_phase", [])))),
        ]
        for name, e in processes.items()
    ]
    print(markdown_table(["process", "peak RSS (VmHWM) MB, median", "max", "phase of the peak"], rows))
    print(f"targets: {targets}")
    print(f"load average start {load_start}, end {result['load_average_end']}; written {path}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
