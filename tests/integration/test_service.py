"""The node as a systemd service: unit files, the notify protocol, health and metrics of real processes.

The test plays systemd's role: it binds an AF_UNIX datagram socket (with SO_PASSCRED, so every
message names the process that sent it), starts ``python -m pacs_agent scp|worker|serve`` with
``$NOTIFY_SOCKET`` and a short ``$WATCHDOG_USEC``, and checks READY, periodic WATCHDOG, STOPPING
and a clean exit 0 after SIGTERM.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from inference.phantom import PhantomStudy, generate_study
from tests.integration.peers import Node, Nodes, Receiver, storescu, wait_for
from tests.unit.test_health import parse_prometheus, value

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
UNITS = ROOT / "systemd"
INSTALLED_BINARY = "/opt/pacs-agent/venv/bin/pacs-agent"
WATCHDOG_USEC = "600000"  # pings every 0.3 s
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Message:
    pid: int
    text: str


class FakeSystemd:
    """systemd's notification socket: a bound datagram socket that records who sent what.

    Like systemd, it reads every message as it arrives (a thread of its own): a socket nobody reads fills
    up (``net.unix.max_dgram_qlen`` datagrams) and then blocks the sender.
    """

    def __init__(self, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._dir = None if abstract else tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp")
        if self._dir is None:
            name = f"pacs-agent-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            self.address = str(Path(self._dir.name) / "notify")  # short: sun_path holds 107 bytes
            self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self._next = 0  # messages before this one were handed out by wait_for / wait_for_count
        self._empty_reads = 0
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
            except TimeoutError:
                with self._changed:
                    self._empty_reads += 1
                    self._changed.notify_all()
                continue
            except OSError:  # closed
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            with self._changed:
                self.messages.append(Message(pid, data.decode()))
                self._changed.notify_all()

    def _wait(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        with self._changed:
            result = self._changed.wait_for(found, timeout)  # the predicate's last (truthy) value
            if not result:
                raise AssertionError(f"no {what} within {timeout:.0f} s; got {[m.text for m in self.messages]}")
            return result

    def wait_for(self, line: str, timeout: float) -> Message:
        """The first message holding ``line`` not handed out before; fails after ``timeout`` seconds."""

        def found() -> Message | None:
            for n in range(self._next, len(self.messages)):
                if line in self.messages[n].text.splitlines():
                    self._next = n + 1
                    return self.messages[n]
            return None

        return self._wait(found, timeout, line)

    def wait_for_count(self, text: str, count: int, timeout: float) -> list[Message]:
        """The next ``count`` messages that are exactly ``text``; fails after ``timeout`` seconds."""

        def found() -> list[Message] | None:
            matching = [n for n in range(self._next, len(self.messages)) if self.messages[n].text == text]
            if len(matching) < count:
                return None
            self._next = matching[count - 1] + 1
            return [self.messages[n] for n in matching[:count]]

        return self._wait(found, timeout, f"{count} x {text}")

    def settle(self) -> list[Message]:
        """Every message sent so far (the socket was read empty after this call); for after the senders exited."""
        with self._changed:
            reads = self._empty_reads
        self._wait(lambda: self._empty_reads >= reads + 2, 30, "empty socket")
        with self._changed:
            return list(self.messages)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()
        if self._dir is not None:
            self._dir.cleanup()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(abstract=True)
    yield fake
    fake.close()


def make_node(nodes: Nodes, extra: str = "") -> tuple[Node, str]:
    """A node (not started) with its health endpoint on a free port; returns it and the endpoint's base URL."""
    node = nodes.new(extra_config=f"[jobs]\nlease_seconds = 20\n{extra}")
    return node, f"http://127.0.0.1:{node.http_port}"


def stop_within(node: Node, seconds: float) -> int:
    """SIGTERM the node; fail when it has not exited after ``seconds`` (a deadline); return its exit code."""
    try:
        return node.stop(signal.SIGTERM, timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the node did not exit within {seconds:.0f} s of SIGTERM") from None


def get_json(url: str) -> tuple[int, dict]:
    response = requests.get(url, timeout=10)
    return response.status_code, response.json()


def metrics_of(base: str) -> dict:
    response = requests.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(response.text)


# -- unit files ------------------------------------------------------------------------------------


def require_systemd_tool(name: str) -> None:
    """Skip when a systemd tool is missing (Debian package ``systemd``; no running systemd is needed)."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (apt-get install systemd)")


def _unit_copy(tmp_path: Path) -> Path:
    """The units in a temp dir, ExecStart pointing at an executable that exists here.

    ``systemd-analyze verify`` refuses an ExecStart binary that does not exist; the units name
    the installed path /opt/pacs-agent/venv/bin/pacs-agent, so the copy names this venv's script.
    """
    require_systemd_tool("systemd-analyze")
    binary = Path(sys.executable).parent / "pacs-agent"
    executable = str(binary if binary.exists() else Path(sys.executable))
    out = tmp_path / "units"
    out.mkdir()
    for unit in ("pacs-agent-scp.service", "pacs-agent-worker@.service", "pacs-agent.target"):
        text = (UNITS / unit).read_text()
        assert unit.endswith(".target") or INSTALLED_BINARY in text
        (out / unit).write_text(text.replace(INSTALLED_BINARY, executable))
    dropin = out / "pacs-agent-scp.service.d"
    dropin.mkdir()
    shutil.copy(UNITS / "pacs-agent-scp.service.d" / "low-port.conf.example", dropin / "low-port.conf")
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _unit_copy(tmp_path)
    names = ["pacs-agent-scp.service", "pacs-agent-worker@cpu0.service", "pacs-agent-worker@0.service"]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in [*names, "pacs-agent.target"])],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=units,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "pacs-agent" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], "\n".join(ours)  # unknown keys and bad values are only warnings: none allowed


@pytest.mark.parametrize("unit", ["pacs-agent-scp.service", "pacs-agent-worker@cpu0.service"])
def test_units_are_hardened(tmp_path: Path, unit: str) -> None:
    units = _unit_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(units / unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=units,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout


def test_unit_settings() -> None:
    scp = (UNITS / "pacs-agent-scp.service").read_text()
    worker = (UNITS / "pacs-agent-worker@.service").read_text()
    for text in (scp, worker):
        lines = set(text.splitlines())
        assert {"Type=notify", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"} <= lines
        assert {"ProtectHome=yes", "PrivateTmp=yes", "ReadWritePaths=/var/lib/pacs-agent"} <= lines
        assert {"CapabilityBoundingSet=", "AmbientCapabilities=", "User=pacs-agent"} <= lines
        assert any(line.startswith("WatchdogSec=") for line in lines)
    assert f"ExecStart={INSTALLED_BINARY} scp --config /etc/pacs-agent/pacs-agent.toml" in scp
    assert f"ExecStart={INSTALLED_BINARY} worker --config /etc/pacs-agent/pacs-agent.toml" in worker
    assert "Environment=PACS_AGENT_WORKER_INSTANCE=%i" in worker
    dropin = (UNITS / "pacs-agent-scp.service.d" / "low-port.conf.example").read_text()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in dropin.splitlines()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in dropin.splitlines()


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    require_systemd_tool("systemd-sysusers")
    require_systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for command in (
        ["systemd-sysusers", f"--root={root}", str(UNITS / "sysusers.d" / "pacs-agent.conf")],
        ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "tmpfiles.d" / "pacs-agent.conf")],
    ):
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 0, result.stderr
    [entry] = [line for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("pacs-agent:")]
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert home == "/var/lib/pacs-agent"
    assert shell.endswith("nologin")
    state = (root / "var" / "lib" / "pacs-agent").stat()
    assert (oct(state.st_mode & 0o777), state.st_uid, state.st_gid) == ("0o700", int(uid), int(gid))
    config = (root / "etc" / "pacs-agent").stat()
    assert (oct(config.st_mode & 0o777), config.st_uid, config.st_gid) == ("0o750", 0, int(gid))


# -- the notify protocol, real processes ----------------------------------------------------------


def test_scp_notifies_ready_watchdog_stopping(nodes: Nodes, systemd: FakeSystemd) -> None:
    node, _ = make_node(nodes)
    node.start("scp", env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    assert node.process is not None
    pid = node.process.pid
    ready = systemd.wait_for("READY=1", 30)
    assert ready.pid == pid
    assert f"STATUS=listening as PACS_AGENT on 127.0.0.1:{node.port}" in ready.text.splitlines()
    assert node.listening()
    pings = systemd.wait_for_count("WATCHDOG=1", 3, 30)  # the interval itself: tests/unit/test_notify.py
    assert {m.pid for m in pings} == {pid}
    assert stop_within(node, 30) == 0
    assert systemd.wait_for("STOPPING=1", 10).pid == pid
    assert {m.pid for m in systemd.settle()} == {pid}


def test_worker_notifies_and_keeps_a_heartbeat_file(nodes: Nodes, abstract_systemd: FakeSystemd) -> None:
    node, _ = make_node(nodes)
    env = {
        "NOTIFY_SOCKET": abstract_systemd.address,
        "WATCHDOG_USEC": WATCHDOG_USEC,
        "PACS_AGENT_WORKER_INSTANCE": "cpu0",
        "CUDA_VISIBLE_DEVICES": "0",  # the instance name wins: cpu workers see no GPU
    }
    node.start("worker", env=env)
    assert node.process is not None
    pid = node.process.pid
    ready = abstract_systemd.wait_for("READY=1", 30)
    assert ready.pid == pid
    assert "STATUS=waiting for jobs (cpu; every queue)" in ready.text.splitlines()  # [worker] device, queues
    [beat] = (node.state_dir / "workers").glob("*.alive")
    record = json.loads(beat.read_text())
    assert (record["pid"], record["instance"], record["cuda_visible_devices"]) == (pid, "cpu0", "")
    assert record["activity"] == "idle"
    pings = abstract_systemd.wait_for_count("WATCHDOG=1", 3, 30)
    assert {m.pid for m in pings} == {pid}
    assert stop_within(node, 30) == 0
    assert abstract_systemd.wait_for("STOPPING=1", 10).pid == pid
    assert not beat.exists()


def test_worker_with_a_bad_instance_name_exits_1_without_ready(nodes: Nodes, systemd: FakeSystemd) -> None:
    node, _ = make_node(nodes)
    node.start("worker", env={"NOTIFY_SOCKET": systemd.address, "PACS_AGENT_WORKER_INSTANCE": "tpu0"})
    assert node.process is not None
    assert node.process.wait(30) == 1  # RestartPreventExitStatus=1: systemd does not loop on it
    node.process = None
    assert "a worker instance is a GPU index" in node.log.read_text()
    assert systemd.settle() == []  # it has exited: whatever it sent has arrived


def test_serve_is_healthy_and_only_the_main_process_notifies(nodes: Nodes, systemd: FakeSystemd) -> None:
    node, base = make_node(nodes)
    node.start("serve", env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    assert node.process is not None
    pid = node.process.pid
    assert systemd.wait_for("READY=1", 30).pid == pid
    wait_for(lambda: get_json(f"{base}/healthz")[1].get("workers"), 30, "the worker's heartbeat")
    status, body = get_json(f"{base}/healthz")
    assert status == 200, body
    assert body["status"] == "ok"
    assert body["checks"]["workers"]["detail"] == "1 worker(s) alive"
    assert body["checks"]["database"]["ok"]
    assert body["checks"]["spool"]["ok"]
    assert value(metrics_of(base), "pacs_agent_workers_alive") == 1
    assert stop_within(node, 60) == 0
    messages = systemd.settle()
    assert {m.pid for m in messages} == {pid}  # the worker child was not given NOTIFY_SOCKET
    assert any(m.text.startswith("STOPPING=1") for m in messages)


# -- health and metrics of a real node ---------------------------------------------------------------


def test_full_spool_is_unhealthy_and_refusals_are_counted(nodes: Nodes, phantom: PhantomStudy) -> None:
    node, base = make_node(nodes)
    node.start("scp", env={"PACS_AGENT__STORAGE__MIN_FREE_MB": "100000000"})  # 100 TB must stay free
    try:
        status, body = get_json(f"{base}/healthz")
        assert status == 503
        assert body["status"] == "unhealthy"
        [reason] = body["reasons"]
        assert reason.startswith("spool: ") and "below [storage] min_free_mb = 100000000" in reason
        result = storescu(node.port, phantom.ct_files[:1])
        assert result.returncode != 0
        metrics = metrics_of(base)
        assert value(metrics, "pacs_agent_instances_refused_total", reason="out_of_resources", status="0xA700") == 1
        assert value(metrics, "pacs_agent_instances_received_total", outcome="stored") == 0
        assert value(metrics, "pacs_agent_healthy") == 0
        assert value(metrics, "pacs_agent_health_check", check="spool") == 0
    finally:
        assert stop_within(node, 30) == 0


def test_metrics_count_a_study_sent_with_storescu(nodes: Nodes, phantom: PhantomStudy) -> None:
    node, base = make_node(nodes)
    node.start("scp")
    try:
        assert get_json(f"{base}/healthz")[0] == 200
        files = [*phantom.ct_files, phantom.seg_file]
        assert storescu(node.port, files).returncode == 0
        metrics = metrics_of(base)
        assert value(metrics, "pacs_agent_instances_received_total", outcome="stored") == len(files) == 21
        assert value(metrics, "pacs_agent_instances_received_total", outcome="duplicate") == 0
        studies = {labels: v for (name, labels), v in metrics.items() if name == "pacs_agent_studies"}
        assert sum(studies.values()) == 1
        assert storescu(node.port, phantom.ct_files[:3]).returncode == 0
        assert value(metrics_of(base), "pacs_agent_instances_received_total", outcome="duplicate") == 3
        # quiet_seconds = 1: the study is queued; no worker runs, so health turns 503 naming it.
        wait_for(lambda: value(metrics_of(base), "pacs_agent_jobs", state="pending") == 1, 30, "a pending job")
        status, body = get_json(f"{base}/healthz")
        assert status == 503
        assert body["reasons"] == [body["reasons"][0]]
        assert body["reasons"][0].startswith("workers: 1 job(s) waiting and no worker alive")
        assert value(metrics_of(base), "pacs_agent_oldest_pending_job_age_seconds") >= 0
    finally:
        assert stop_within(node, 30) == 0


def test_full_run_is_measured_and_logs_hold_no_patient_data(tmp_path: Path, nodes: Nodes) -> None:
    """Receive, process and deliver one study at log level DEBUG; then read every log line."""
    study = generate_study(
        tmp_path / "study", seed=5, slices=20, rows=64, columns=64, segmentation="seg", patient_id="PAT-4711-X"
    )
    receiver = Receiver(tmp_path / "pacs")
    receiver.start()
    node, base = make_node(
        nodes,
        '[logging]\nlevel = "DEBUG"\n' + receiver.destination_toml("pacs"),
    )
    try:
        node.start("serve")
        assert storescu(node.port, [*study.ct_files, study.seg_file]).returncode == 0

        def delivered() -> bool:
            metrics = metrics_of(base)
            done = value(metrics, "pacs_agent_deliveries", destination="pacs", state="done")
            return done >= 1 and value(metrics, "pacs_agent_deliveries", destination="pacs", state="pending") == 0

        wait_for(delivered, 120, "the results to be delivered")
        metrics = metrics_of(base)
        assert value(metrics, "pacs_agent_jobs", state="done") == 1
        assert value(metrics, "pacs_agent_studies", state="done") == 1
        assert value(metrics, "pacs_agent_job_duration_seconds_count", method="radiomics") == 1
        assert value(metrics, "pacs_agent_job_duration_seconds_bucket", method="radiomics", le="+Inf") == 1
        assert value(metrics, "pacs_agent_job_duration_seconds_sum", method="radiomics") > 0
        assert value(metrics, "pacs_agent_destination_up", destination="pacs") == 1
        assert value(metrics, "pacs_agent_oldest_pending_job_age_seconds") == 0
        assert len(receiver.files()) == value(metrics, "pacs_agent_deliveries", destination="pacs", state="done")
        status, body = get_json(f"{base}/healthz")
        assert status == 200, body
        assert body["checks"]["destination pacs"]["detail"].startswith("last delivery succeeded at ")
        assert stop_within(node, 60) == 0
    finally:
        receiver.stop()
    log = node.log.read_text()
    assert "job_done" in log and "delivered" in log  # the run was logged at all
    birth = study.patient_birth_date
    secrets = {
        "patient name": str(study.patient_name),
        "patient name (family)": str(study.patient_name).split("^")[0],
        "patient name (given)": str(study.patient_name).split("^")[1],
        "patient ID": study.patient_id,
        "birth date": birth.strftime("%Y%m%d"),
        "birth date (ISO)": birth.isoformat(),
    }
    # "PHANTOM" is also the generator's module name; only match it as a word in upper case.
    for what, secret in secrets.items():
        pattern = rf"(?<![A-Za-z_.]){re.escape(secret)}(?![A-Za-z_])" if secret == "PHANTOM" else re.escape(secret)
        lines = [line for line in log.splitlines() if re.search(pattern, line)]
        assert lines == [], f"{what} appears in the log:\n" + "\n".join(lines[:5])
