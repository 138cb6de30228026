"""Several hosts on one PostgreSQL: a receiver and workers as separate processes with nothing in common but
the database URL and the shared storage.

Each "host" is a process of its own with its own working directory, state directory (heartbeat
file, logs), temp directory and identity (``host:pid``); the receiver (``pacs-agent scp``) and the
workers (``pacs-agent worker``) meet only in PostgreSQL (the jobs, through procrastinate) and in
``[storage] shared_dir`` (the spool the receiver writes and the workers read, the results the
workers write and the receiver sends). Orthanc is the PACS.

- Six phantom studies are processed exactly once each, the jobs spread over two workers; one
  worker is SIGKILLed mid-job and its job completes on the other (no duplicate result in Orthanc);
  every PostgreSQL connection is dropped mid-run (``pg_terminate_backend``) and nothing is lost.
- A method mapped to the ``gpu`` queue waits while only a CPU worker runs, and runs once a worker
  of that queue starts; ``pacs-agent status`` and the web console's overview (``/api/overview``) of
  the receiver's node list the workers of both hosts and warn of the waiting queue.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, func, make_url, select, text
from starlette.testclient import TestClient

from inference.phantom import PhantomStudy
from pacs_agent.config import load_settings
from pacs_agent.console.app import create_app
from pacs_agent.console.auth import load_secret
from pacs_agent.console.users import add_user
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Instance, Job, Result, Study, WorkerProcess
from pacs_agent.jobs.engine import defer
from pacs_agent.receive.spool import Spool
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.peers import Node, Nodes, Orthanc, storescu, wait_for
from tests.integration.phantoms import Phantoms
from tests.model_packages import write_test_package

pytestmark = pytest.mark.integration

STUDIES = 6
LEASE_SECONDS = 4
"""procrastinate's stalled-worker timeout in these tests (heartbeat every second)."""


class Host(Node):
    """A node process on a "host" of its own: own folder, state and temp dirs; shared database and storage."""

    def __init__(self, workdir: Path, *, database_url: str, shared_dir: Path, common: str, queues: str = "") -> None:
        super().__init__(workdir, extra_config=common)
        self.url = database_url
        self.shared_dir = shared_dir
        self.queues = queues

    def write_config(self) -> None:
        """The node's TOML, with the shared database and storage (given as the environment would)."""
        super().write_config()
        text_ = self.config.read_text().replace("[storage]\n", f'[storage]\nshared_dir = "{self.shared_dir}"\n', 1)
        self.config.write_text(text_ + f'\n[database]\nurl = "{self.url}"\n')

    def start(self, command: str = "scp", env: dict[str, str] | None = None) -> None:
        """Start the process with a temp dir of its own (and ``[worker] queues`` from the environment)."""
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        own = {"TMPDIR": str(tmp)}
        if self.queues:
            own["PACS_AGENT__WORKER__QUEUES"] = json.dumps(self.queues.split())
        super().start(command, env={**own, **(env or {})})

    def database_url(self) -> str:
        """The shared PostgreSQL database."""
        return self.url

    @property
    def identity(self) -> str:
        """``host:pid`` of the running process, as recorded on its jobs."""
        assert self.process is not None
        return f"{socket.gethostname()}:{self.process.pid}"

    def worker_ready(self) -> bool:
        """True once this worker is registered with procrastinate (its heartbeat runs)."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        row = self.scalar(select(WorkerProcess.queue_worker_id).where(WorkerProcess.name == self.identity))
        return row is not None


@pytest.fixture
def hosts(tmp_path: Path, postgres_url: str, nodes: Nodes, orthanc: Orthanc) -> HostSet:
    """The hosts of one test; the database (requested first) outlives every process that uses it."""
    return HostSet(tmp_path, nodes, orthanc, postgres_url)


class HostSet:
    """Makes the receiver and worker hosts of one test around one Orthanc and one PostgreSQL database."""

    def __init__(self, root: Path, nodes: Nodes, orthanc: Orthanc, url: str) -> None:
        self.root, self.nodes, self.orthanc, self.url = root, nodes, orthanc, url
        self.shared = root / "shared"
        self.shared.mkdir()
        self.common = ""

    def receiver(self, common: str) -> Host:
        self.common = common + "\n" + self.orthanc.destination_toml()  # every host: same settings but its own
        host = self.nodes.add(self._host("receiver"))
        self.orthanc.add_modality("pacsagent", host.ae_title, host.port)
        self.orthanc.start()
        host.start("scp")
        return host

    def worker(self, name: str, queues: str = "") -> Host:
        host = self.nodes.add(self._host(name, queues))
        host.start("worker")
        wait_for(host.worker_ready, 180, f"worker {name} to load its pipeline and register with the queue")
        return host

    def _host(self, name: str, queues: str = "") -> Host:
        workdir = self.nodes.workdir(name)
        return Host(workdir, database_url=self.url, shared_dir=self.shared, common=self.common, queues=queues)

    def status(self, host: Host) -> str:
        """``pacs-agent status`` of ``host``'s configuration, as an operator on that host would run it."""
        run = subprocess.run(
            [sys.executable, "-m", "pacs_agent", "status", "--config", str(host.config)],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")},
            check=False,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout


def console_overview(host: Host) -> dict[str, Any]:
    """``/api/overview`` of a web console over ``host``'s configuration (its PostgreSQL database), logged in."""
    settings = load_settings(host.config, {})
    db = Database(settings.database_url)
    try:
        name = f"viewer-{uuid.uuid4().hex[:8]}"
        with db.session() as session, session.begin():
            add_user(session, name, "viewer", "a long enough password")
        app = create_app(settings, db, load_secret(settings.console_secret_file))
        with TestClient(app, follow_redirects=False) as client:
            token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text)
            assert token is not None
            form = {"login_token": token.group(1), "username": name, "password": "a long enough password"}
            assert client.post("/login", data=form).status_code == 303
            return dict(client.get("/api/overview").json())
    finally:
        db.dispose()


def drop_connections(url: str) -> int:
    """Terminate every connection to the test's database (the server itself keeps running)."""
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                ).all()
            )
    finally:
        admin.dispose()


def test_six_studies_two_workers_a_killed_worker_and_dropped_connections(hosts: HostSet, phantoms: Phantoms) -> None:
    studies: list[PhantomStudy] = [
        phantoms.study(seed=700 + n, lesions=2, slices=40, rows=128, columns=128, segmentation="seg")
        for n in range(STUDIES)
    ]
    receiver = hosts.receiver(f"[jobs]\nlease_seconds = {LEASE_SECONDS}\nretry_delay_seconds = 1\n")
    workers = [hosts.worker("host-a"), hosts.worker("host-b")]
    for study in studies:
        sent = storescu(receiver.port, [*study.ct_files, study.seg_file])
        assert sent.returncode == 0, sent.stderr

    def first_running() -> tuple[int, Host] | None:
        for host in workers:
            job_id = receiver.scalar(select(Job.id).where(Job.state == "running", Job.worker_id == host.identity))
            if job_id is not None:
                return job_id, host
        return None

    killed_job, victim = wait_for(first_running, 240, "a worker to run a job", interval=0.05)
    survivor = next(host for host in workers if host is not victim)
    killed_identity = victim.identity
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)  # mid-job: no chance to record anything
    victim.process.wait(30)
    victim.process = None

    wait_for(
        lambda: receiver.scalar(select(Job.worker_id).where(Job.id == killed_job)) == survivor.identity,
        120,
        "the other worker to take over the killed worker's job",
    )
    assert drop_connections(hosts.url) > 0  # mid-run: the receiver, host-b and procrastinate lose theirs

    def all_delivered() -> bool:
        states = receiver.scalars(select(Job.state))
        pending = receiver.scalar(select(func.count(Delivery.id)).where(Delivery.state != "done"))
        return len(states) == STUDIES and all(s == "done" for s in states) and pending == 0

    wait_for(all_delivered, 600, "every study processed and its results delivered")

    jobs = receiver.rows(select(Job.id, Job.study_id, Job.attempts, Job.worker_id).order_by(Job.id))
    assert len({j.study_id for j in jobs}) == STUDIES  # one job per study, no second one
    by_id = {j.id: j for j in jobs}
    assert by_id[killed_job].attempts == 2 and by_id[killed_job].worker_id == survivor.identity
    retried = receiver.scalars(select(Event.detail).where(Event.kind == "job_retry", Event.job_id == killed_job))
    assert retried == [
        f"attempt 1 of 3: worker {killed_identity} stopped while running this job (its heartbeat stopped)"
    ]
    started_by = set(receiver.scalars(select(Event.detail).where(Event.kind == "job_started")))
    assert any(killed_identity in d for d in started_by) and any(survivor.identity in d for d in started_by)
    assert receiver.scalar(select(func.count(Event.id)).where(Event.kind == "job_started")) == STUDIES + 1
    assert {j.worker_id for j in jobs} <= {killed_identity, survivor.identity}

    results = receiver.rows(select(Result.study_id, Result.kind, Result.sop_instance_uid))
    srs = [r for r in results if r.kind == "sr"]
    assert len(srs) == STUDIES and {r.study_id for r in srs} == {j.study_id for j in jobs}
    in_orthanc = hosts.orthanc.instances_with_modality("SR")
    assert sorted(i["SOPInstanceUID"] for i in in_orthanc) == sorted(r.sop_instance_uid for r in srs)
    assert receiver.scalar(select(func.count(Delivery.id))) == len(results)  # each result sent once
    assert set(receiver.scalars(select(Study.state))) == {"done"}

    def engine_jobs() -> dict[str, int]:
        rows = receiver.rows(text("SELECT status, count(*) FROM procrastinate_jobs GROUP BY status"))
        return {status: n for status, n in rows}

    # the queue agrees with the jobs table: a worker records a job's end in the queue engine just
    # after the row (on a new connection when the drop took its own), so within moments, not at once
    deadline = time.monotonic() + 60
    while engine_jobs() != {"succeeded": STUDIES} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_jobs() == {"succeeded": STUDIES}
    status = hosts.status(receiver)
    assert f"worker {survivor.identity} [running] cpu, every queue" in status
    assert f"worker {killed_identity} [silent]" in status  # killed: no heartbeat since


def test_a_gpu_method_waits_for_a_gpu_worker(hosts: HostSet, phantoms: Phantoms, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_test_package(models / "m1-test-0.1.0", "m1")
    first, second = (
        phantoms.study(seed=800 + n, lesions=1, slices=16, rows=64, columns=64, segmentation="seg") for n in range(2)
    )
    receiver = hosts.receiver(
        f'[jobs]\nmethods = ["m1", "radiomics"]\nlease_seconds = {LEASE_SECONDS}\n'
        f'[jobs.queues]\nradiomics = "gpu"\n[models]\ndir = "{models}"\nuse_demo = false\n'
    )
    cpu = hosts.worker("cpu-host", queues="default")
    assert storescu(receiver.port, [*first.ct_files, first.seg_file]).returncode == 0
    wait_for(lambda: len(receiver.scalars(select(Job.id))) == 2, 120, "the first study's two jobs")
    assert storescu(receiver.port, [*second.ct_files, second.seg_file]).returncode == 0

    def job(study: PhantomStudy, method: str) -> tuple[int, str, str | None, int]:
        row = receiver.rows(
            select(Job.id, Job.state, Job.worker_id, Job.attempts)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == study.study_instance_uid, Job.method == method)
        )
        return tuple(row[0]) if row else (0, "none", None, 0)  # type: ignore[return-value]

    wait_for(lambda: job(second, "m1")[1] == "done", 240, "the second study's m1 job on the CPU worker")
    gpu_job = job(first, "radiomics")
    # The first study's radiomics job was due (its m1 done) before the second study's m1 job, and a
    # worker takes the oldest due job of its queues: the CPU worker passed it over for its queue.
    assert gpu_job[0] < job(second, "m1")[0]
    assert gpu_job[1:] == ("pending", None, 0)
    assert job(first, "m1")[1:3] == ("done", cpu.identity)
    assert "queue gpu: 2 job(s) pending and no running worker takes it" in hosts.status(receiver)
    overview = console_overview(receiver)  # the console tells the same story
    assert overview["queue_warnings"] == ["queue gpu: 2 job(s) pending and no running worker takes it"]
    assert overview["pending_by_queue"] == {"gpu": 2}
    assert [(w["name"], w["queues"], w["state"]) for w in overview["workers"]] == [
        (cpu.identity, ["default"], "running")
    ]

    gpu = hosts.worker("gpu-host", queues="gpu")
    wait_for(lambda: job(second, "radiomics")[1] == "done", 240, "the radiomics jobs on the gpu worker")
    for study in (first, second):
        assert job(study, "radiomics")[1:] == ("done", gpu.identity, 1)
    status = hosts.status(receiver)
    assert f"worker {gpu.identity} [running] cpu, gpu" in status  # a CPU-only host can serve the gpu queue
    assert "no running worker takes it" not in status
    overview = console_overview(receiver)
    listed = {w["name"]: (w["device"], w["queues"], w["state"]) for w in overview["workers"]}
    assert listed == {cpu.identity: ("cpu", ["default"], "running"), gpu.identity: ("cpu", ["gpu"], "running")}
    assert overview["queue_warnings"] == [] and overview["pending_by_queue"] == {}


def listen_backends(url: str) -> list[int]:
    """Process ids of the connections to the test's database that LISTEN (procrastinate's listeners)."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            rows = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :name AND query ILIKE 'LISTEN %'"),
                {"name": make_url(url).database},
            ).all()
            return [int(r[0]) for r in rows]
    finally:
        admin.dispose()


def terminate(pids: list[int]) -> None:
    """``pg_terminate_backend`` of each of ``pids``."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()


def allow_connections(url: str, allowed: bool) -> None:
    """``ALTER DATABASE ... ALLOW_CONNECTIONS``: false refuses every new connection, as a restarting server does."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{make_url(url).database}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
    finally:
        admin.dispose()


def test_a_job_deferred_while_the_listen_connection_is_gone_and_refused_still_runs_and_listening_resumes(
    hosts: HostSet, phantoms: Phantoms
) -> None:
    """A restart as one worker sees it: its LISTEN connection killed while the database refuses new ones."""
    first, second = (
        phantoms.study(seed=820 + n, lesions=1, slices=16, rows=64, columns=64, segmentation="seg") for n in range(2)
    )
    receiver = hosts.receiver(f"[jobs]\nlease_seconds = {LEASE_SECONDS}\nretry_delay_seconds = 1\n")
    worker = hosts.worker("host-a")
    assert worker.process is not None
    pid = worker.process.pid

    def jobs_of(study: PhantomStudy) -> list[Job]:
        return receiver.scalars(
            select(Job)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_instance_uid == study.study_instance_uid)
            .order_by(Job.id)
        )

    assert storescu(receiver.port, [*first.ct_files, first.seg_file]).returncode == 0
    wait_for(lambda: [j.state for j in jobs_of(first)] == ["done"], 180, "the first study's job")
    listening = wait_for(lambda: listen_backends(hosts.url), 60, "the worker's LISTEN connection")
    done = jobs_of(first)[0]

    db = Database(hosts.url)  # the connection that defers below is opened before new ones are refused
    try:
        with db.session() as session:
            try:
                with session.begin():
                    session.connection()
                    allow_connections(hosts.url, False)
                    terminate(listening)
                    wait_for(
                        lambda: "the LISTEN connection to PostgreSQL failed" in worker.log.read_text(),
                        60,
                        "the worker's LISTEN connection to be refused",
                    )
                    # the same job again, deferred as the receiver defers one; its NOTIFY goes at commit
                    again = Job(study_id=done.study_id, method=done.method, inputs=done.inputs, queue=done.queue)
                    session.add(again)
                    session.flush()
                    defer(session, again)
                    again_id = again.id
                assert listen_backends(hosts.url) == []  # the NOTIFY reached no worker
            finally:
                allow_connections(hosts.url, True)
    finally:
        db.dispose()

    wait_for(lambda: receiver.scalar(select(Job.state).where(Job.id == again_id)) == "done", 120, "the deferred job")
    relistening = wait_for(lambda: listen_backends(hosts.url), 60, "the worker to LISTEN again")
    assert not set(relistening) & set(listening)
    assert storescu(receiver.port, [*second.ct_files, second.seg_file]).returncode == 0
    wait_for(lambda: [j.state for j in jobs_of(second)] == ["done"], 180, "the second study's job")
    assert worker.process is not None and worker.process.poll() is None and worker.process.pid == pid
    assert receiver.scalar(select(Job.worker_id).where(Job.id == again_id)) == worker.identity


def test_instances_sent_while_postgresql_refuses_connections_are_acknowledged_and_indexed_later(
    hosts: HostSet, phantoms: Phantoms
) -> None:
    """Nothing acknowledged is lost when the database is away: the spool's journal holds the rows until it is back."""
    study = phantoms.study(seed=860, lesions=1, slices=16, rows=64, columns=64, segmentation="seg")
    receiver = hosts.receiver("")
    spool = Spool(hosts.shared / "spool", min_free_mb=0)  # [storage] shared_dir
    allow_connections(hosts.url, False)
    try:
        drop_connections(hosts.url)  # a PostgreSQL restart as the receiver sees it
        sent = storescu(receiver.port, study.ct_files)
        assert sent.returncode == 0 and "Status" not in sent.stderr, sent.stderr  # every C-STORE answered Success
        assert len(spool.pending()) == len(study.ct_files)  # acknowledged: each durable with its journal entry
        assert "could not be indexed yet" in receiver.log.read_text()
    finally:
        allow_connections(hosts.url, True)
    receiver.stop()
    receiver.start("scp")  # the replay at start; a running scp replays once a minute (tests/unit/test_journal.py)
    uids = receiver.scalars(select(Instance.sop_instance_uid))
    assert sorted(uids) == sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.ct_files)
    assert spool.pending() == []
