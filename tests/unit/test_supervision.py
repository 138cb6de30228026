"""Process identities and worker pid files of ``serve`` (pacs_agent.supervision), on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacs_agent.supervision import (
    ProcessIdentity,
    StoppedWorker,
    pid_directory,
    process_start_time,
    read_pid_files,
    stop_stale_workers,
    write_pid_file,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[0]


def test_a_running_process_has_an_identity_that_matches_only_itself() -> None:
    me = ProcessIdentity.of(os.getpid())
    assert me is not None and me.running()
    assert not ProcessIdentity(me.pid, me.start_time + 1).running()  # same pid, another start: pid reuse


def test_a_zombie_counts_as_gone() -> None:
    process = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while _state(process.pid) != "Z":  # exited, not reaped yet
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert process_start_time(process.pid) is None
    finally:
        process.wait()
    assert process_start_time(process.pid) is None


def test_pid_files_round_trip_and_unreadable_ones_are_removed(tmp_path: Path) -> None:
    worker, supervisor = ProcessIdentity(4242, 1000), ProcessIdentity(4241, 990)
    path = write_pid_file(tmp_path, worker, supervisor)
    broken = pid_directory(tmp_path) / "worker-1.json"
    broken.write_text("{not json")
    [record] = read_pid_files(tmp_path)
    assert (record.worker, record.supervisor, record.path) == (worker, supervisor, path)
    assert not broken.exists()


def test_a_pid_file_of_ended_processes_is_removed_and_nothing_is_signalled(tmp_path: Path) -> None:
    process = subprocess.Popen(["sleep", "60"])
    identity = ProcessIdentity.of(process.pid)
    process.kill()
    process.wait()
    assert identity is not None
    path = write_pid_file(tmp_path, identity, identity)
    assert stop_stale_workers(tmp_path, grace_seconds=1) == []
    assert not path.exists()


def test_a_live_process_that_is_not_a_pacs_agent_worker_is_never_signalled(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        identity = ProcessIdentity.of(bystander.pid)
        assert identity is not None
        write_pid_file(tmp_path, identity, ProcessIdentity(gone.pid, 1))
        assert stop_stale_workers(tmp_path, grace_seconds=1) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_audit_text_says_which_worker_was_stopped_and_how() -> None:
    assert (
        StoppedWorker(12, 10, killed=False)
        .detail()
        .endswith(
            "pacs-agent worker pid 12 of this state directory was left running by pacs-agent serve pid 10, "
            "which is gone: stopped with SIGTERM"
        )
    )
    assert "was killed (SIGKILL)" in StoppedWorker(12, 10, killed=True).detail()


def test_a_stale_worker_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    # A stand-in worker: its command line names pacs_agent and worker; it ignores SIGTERM (a stuck job).
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", code, "pacs_agent", "worker"], stdout=subprocess.PIPE) as stuck:
        try:
            assert stuck.stdout is not None and stuck.stdout.readline()  # the SIGTERM handler is in place
            identity = ProcessIdentity.of(stuck.pid)
            assert identity is not None
            path = write_pid_file(tmp_path, identity, ProcessIdentity(gone.pid, 1))
            [stopped] = stop_stale_workers(tmp_path, grace_seconds=0.5)
            assert (stopped.pid, stopped.supervisor_pid, stopped.killed) == (stuck.pid, gone.pid, True)
            assert stuck.wait(10) == -signal.SIGKILL
            assert not path.exists()
        finally:
            if stuck.poll() is None:
                stuck.kill()
