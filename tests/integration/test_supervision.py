"""A worker started by ``serve`` ends with it; ``serve`` stops workers a killed predecessor left behind.

Issue 15, finding 3: SIGKILL of ``pacs-agent serve`` left its worker running (PPID 1), claiming jobs,
and every restart added one more. Real processes only: ``serve`` and ``worker`` as subprocesses, their
parent/child relation and command lines read from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.tables import Event
from pacs_agent.supervision import ProcessIdentity, pid_directory, write_pid_file
from tests.integration.peers import Node, Nodes, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)"),
]


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def workers_of(node: Node) -> dict[int, int | None]:
    """Running ``pacs-agent worker`` processes of ``node``'s config: pid -> parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in command and str(node.config).encode() in command:
            pid = int(entry.name)
            if ProcessIdentity.of(pid) is not None:  # zombies are gone
                found[pid] = _parent_of(pid)
    return found


def serve_worker(node: Node) -> int:
    """The pid of the worker the running ``serve`` of ``node`` started, once it is ready for jobs."""
    assert node.process is not None
    serve = node.process.pid

    def ready() -> int | None:
        children = [pid for pid, parent in workers_of(node).items() if parent == serve]
        ready_line = f" {children[0]} pacs_agent.jobs.worker: worker " if len(children) == 1 else None
        if ready_line and ready_line in node.log.read_text(errors="replace"):
            return children[0]
        return None

    result: int = wait_for(ready, 60, "serve's worker to be ready")
    return result


def orphan_events(node: Node) -> list[Event]:
    return node.scalars(select(Event).where(Event.kind == "worker_orphan_stopped").order_by(Event.id))


@pytest.fixture
def node(nodes: Nodes) -> Iterator[Node]:
    """A node (not started); a worker of it still running at the end (the test failed) is killed."""
    made = nodes.new()
    try:
        yield made
    finally:
        for pid in workers_of(made):
            if made.process is None or _parent_of(pid) != made.process.pid:
                os.kill(pid, signal.SIGKILL)


def test_sigkill_of_serve_ends_its_worker_and_a_restart_runs_exactly_one(node: Node) -> None:
    node.start("serve")
    first = serve_worker(node)
    identity = ProcessIdentity.of(first)
    assert identity is not None

    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: not identity.running(), 30, "the worker of the killed serve to end")

    def stopped_cleanly() -> str | None:
        log = node.log.read_text(errors="replace")
        # the kernel's death signal (it may come more than once; each is logged, the first one stops it)
        tail = log.split(f" {first} pacs_agent.service: received SIGTERM, stopping", 1)
        return log if len(tail) > 1 and f" {first} pacs_agent.jobs.worker: worker " in tail[1] else None

    wait_for(stopped_cleanly, 30, "the worker's last log lines (received SIGTERM, then stopped)")

    node.start("serve")
    second = serve_worker(node)
    assert second != first
    assert list(workers_of(node)) == [second]
    assert orphan_events(node) == []  # nothing was left to stop
    assert [p.name for p in pid_directory(node.state_dir).iterdir()] == [f"worker-{second}.json"]


def _gone_process_identity() -> ProcessIdentity:
    """The identity of a process that ran and has ended (standing in for a killed serve)."""
    process = subprocess.Popen(["sleep", "60"])
    identity = ProcessIdentity.of(process.pid)
    process.kill()
    process.wait()
    assert identity is not None and not identity.running()
    return identity


def test_serve_stops_a_worker_a_killed_serve_left_and_records_it(node: Node) -> None:
    node.write_config()
    # The orphan: a worker of this state directory whose serve is gone (as before the fix, or when the
    # death signal could not be set), recorded in a pid file as serve records its worker.
    with node.log.open("ab") as out:
        orphan = subprocess.Popen(
            [sys.executable, "-m", "pacs_agent", "worker", "--config", str(node.config)],
            stdout=out,
            stderr=out,
            env={k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")},
        )
    wait_for(lambda: f" {orphan.pid} pacs_agent.jobs.worker: worker " in node.log.read_text(), 60, "the orphan")
    orphan_identity = ProcessIdentity.of(orphan.pid)
    assert orphan_identity is not None
    dead_serve = _gone_process_identity()
    write_pid_file(node.state_dir, orphan_identity, dead_serve)
    # A pid file whose pid now belongs to some other program (pid reuse): that program is not touched.
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        bystander_identity = ProcessIdentity.of(bystander.pid)
        assert bystander_identity is not None
        write_pid_file(node.state_dir, bystander_identity, dead_serve)

        node.start("serve")

        assert orphan.wait(60) == 0  # SIGTERM: the orphan stopped cleanly, before serve listened
        [event] = orphan_events(node)
        assert event.level == "WARNING"
        assert event.detail is not None
        assert f"worker pid {orphan.pid} " in event.detail and f"serve pid {dead_serve.pid}" in event.detail
        assert event.detail.endswith("stopped with SIGTERM")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    own = serve_worker(node)
    assert list(workers_of(node)) == [own]
    assert [p.name for p in pid_directory(node.state_dir).iterdir()] == [f"worker-{own}.json"]


def test_systemd_units_stop_every_process_of_the_unit() -> None:
    kill_modes = {
        unit.name: [
            line.removeprefix("KillMode=") for line in unit.read_text().splitlines() if line.startswith("KillMode=")
        ]
        for unit in (Path(__file__).parents[2] / "systemd").glob("*.service")
    }
    assert kill_modes["pacs-agent-scp.service"] == ["control-group"]  # a serve run from it takes its worker along
    assert kill_modes["pacs-agent-worker@.service"] == ["mixed"]  # SIGTERM the worker, SIGKILL what is left
    assert kill_modes["pacs-agent-console.service"] == ["control-group"]
