"""The web console's access rules on a real SQLite node database: login, sessions, CSRF, rate limit, roles, audit."""

from __future__ import annotations

import io
import re
import shutil
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from inference.phantom.study import PhantomStudy, generate_study
from pacs_agent.checks import check_settings, console_problems
from pacs_agent.config import Settings, load_settings
from pacs_agent.console.app import CSP, create_app
from pacs_agent.console.auth import LoginLimiter, Sessions, load_secret
from pacs_agent.console.users import (
    UserError,
    add_one_time_user,
    add_user,
    authenticate,
    change_password,
    find_user,
    hash_password,
)
from pacs_agent.db import Database
from pacs_agent.db.tables import ConsoleUser, Event, Instance, Job, Series, Study, WorkerProcess, utcnow
from pacs_agent.errors import ConfigError
from pacs_agent.jobs.worker import Worker
from pacs_agent.pause import pause_processing, resume_processing
from pacs_agent.receive.header import read_header
from pacs_agent.status import collect_status, format_status
from pacs_agent.studies.scheduler import readiness_rules, run_once
from pacs_agent.studies.store import record_instance

PASSWORD = "correct horse battery"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
PATIENT_ID = "PAT-SECRET-4711"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[TestClient, Database, Clock]]:
    settings = load_settings(
        None,
        {
            "PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state"),
            "PACS_AGENT__CONSOLE__VIEWER_URL": "https://ohif.example.org/viewer?StudyInstanceUIDs={study_instance_uid}",
        },
    )
    db = Database(settings.database_url)
    with db.session() as session, session.begin():
        add_user(session, "vera", "viewer", PASSWORD)
        add_user(session, "otto", "operator", PASSWORD)
        study = Study(study_instance_uid=STUDY_UID, patient_id=PATIENT_ID, accession_number="ACC1", state="failed")
        session.add(study)
        session.flush()
        session.add(
            Job(study_id=study.id, method="radiomics", inputs="{}", state="failed", attempts=3, last_error="boom")
        )
    clock = Clock()
    app = create_app(settings, db, load_secret(settings.console_secret_file), LoginLimiter(5, 300, clock))
    with TestClient(app, follow_redirects=False) as client:
        yield client, db, clock
    db.dispose()


def login(client: TestClient, user: str, password: str = PASSWORD) -> int:
    page = client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    response = client.post("/login", data={"login_token": token.group(1), "username": user, "password": password})
    return response.status_code


def csrf(client: TestClient) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
    assert match is not None
    return match.group(1)


def job_state(db: Database) -> str:
    with db.session() as session:
        return session.execute(select(Job.state)).scalar_one()


def events(db: Database, kind: str) -> list[Event]:
    with db.session() as session:
        return list(session.execute(select(Event).where(Event.kind == kind).order_by(Event.id)).scalars())


# -- users ------------------------------------------------------------------------------------


def test_passwords_are_stored_as_argon2_hashes_and_checked(node: tuple[TestClient, Database, Clock]) -> None:
    _, db, _ = node
    with db.session() as session, session.begin():
        stored = session.execute(select(ConsoleUser.password_hash).where(ConsoleUser.name == "vera")).scalar_one()
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert authenticate(session, "vera", PASSWORD) is not None
        assert authenticate(session, "vera", PASSWORD + "x") is None
        assert authenticate(session, "nobody", PASSWORD) is None


@pytest.mark.parametrize(
    ("name", "role", "password", "says"),
    [
        ("ann", "viewer", "short", "at least 12"),
        ("ann", "superuser", PASSWORD, "unknown role"),
        ("<script>", "viewer", PASSWORD, "not a valid user name"),
    ],
)
def test_bad_users_are_refused_with_the_reason(
    sqlite_db: Database, name: str, role: str, password: str, says: str
) -> None:
    with sqlite_db.session() as session, pytest.raises(UserError, match=says):
        add_user(session, name, role, password)


def test_hash_password_refuses_a_short_password() -> None:
    with pytest.raises(UserError):
        hash_password("x" * 11)
    assert hash_password("x" * 12).startswith("$argon2id$")


# -- sessions and secrets ---------------------------------------------------------------------


def test_the_session_key_file_is_created_private_and_a_readable_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "console-secret"
    key = load_secret(path)
    assert len(key) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_secret(path) == key
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_secret(path)


def test_a_forged_or_expired_session_is_no_session() -> None:
    sessions = Sessions(b"k" * 32, max_age_seconds=3600)
    cookie, session = sessions.issue("otto")
    assert sessions.read(cookie) == session
    assert sessions.read(cookie[:-2] + "xx") is None
    assert Sessions(b"other" * 8, 3600).read(cookie) is None
    assert Sessions(b"k" * 32, max_age_seconds=-1).read(cookie) is None


# -- one-time passwords ----------------------------------------------------------------------


def change_form(client: TestClient, **fields: str) -> dict[str, str]:
    page = client.get("/password")
    assert page.status_code == 200, page.text
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    return {"csrf": token.group(1), **fields}


def test_a_one_time_password_is_random_hashed_and_must_be_replaced_before_anything_else(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, db, _ = node
    with db.session() as session, session.begin():
        user, password, until = add_one_time_user(session, "admin", "admin")
        _, other, _ = add_one_time_user(session, "admin2", "admin")
    assert user.must_change_password and len(password) >= 16 and password != other
    assert timedelta(hours=23) < until - utcnow() <= timedelta(hours=24)
    with db.session() as session:
        row = session.execute(select(ConsoleUser).where(ConsoleUser.name == "admin")).scalar_one()
        assert row.password_hash.startswith("$argon2id$") and password not in row.password_hash
    assert login(client, "admin", password) == 303
    # every page and API leads to the password form first
    page = client.get("/studies")
    assert page.status_code == 303 and page.headers["location"] == "/password?next=/studies"
    assert client.get("/api/studies").status_code == 403
    assert "one-time password" in client.get("/password").text
    # a wrong current password, two differing new ones, or a short one change nothing
    for fields, says in (
        ({"current": "wrong password!", "new": "my own password", "again": "my own password"}, "current password"),
        ({"current": password, "new": "my own password", "again": "my own passw0rd"}, "differ"),
        ({"current": password, "new": "short", "again": "short"}, "at least 12"),
        ({"current": password, "new": password, "again": password}, "differ from the current"),
    ):
        refused = client.post("/password", data=change_form(client, **fields))
        assert refused.status_code == 400 and says in refused.text, refused.text
    assert client.get("/").status_code == 303
    changed = client.post(
        "/password",
        data=change_form(client, current=password, new="my own password", again="my own password", next="/studies"),
    )
    assert changed.status_code == 303 and changed.headers["location"] == "/studies"
    assert client.get("/studies").status_code == 200
    assert [e.detail for e in events(db, "console_password_changed")] == ["user admin (one-time password replaced)"]
    client.cookies.clear()
    assert login(client, "admin", password) == 401  # the one-time password is gone
    assert login(client, "admin", "my own password") == 303
    assert client.get("/").status_code == 200


def test_an_expired_one_time_password_is_refused(sqlite_db: Database) -> None:
    with sqlite_db.session() as session, session.begin():
        _, password, _ = add_one_time_user(session, "admin", "admin", hours=-1)
    with sqlite_db.session() as session, session.begin():
        assert authenticate(session, "admin", password) is None
        with pytest.raises(UserError, match="expired"):
            change_password(session, "admin", password, "my own password")
        add_user(session, "admin", "admin", "a new password")  # resetting it ends the one-time state
    with sqlite_db.session() as session, session.begin():
        user = find_user(session, "admin")
        assert user is not None and not user.must_change_password
        assert authenticate(session, "admin", "a new password") is not None


def test_console_user_add_one_time_prints_the_password_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pacs_agent.cli import main

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["console", "user", "add", "root", "--role", "admin", "--one-time", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    password = re.search(r"one-time password: (\S+) \(valid until", out)
    assert password is not None
    assert main(["console", "user", "list", "--config", str(config)]) == 0
    listed = capsys.readouterr().out
    assert "one-time password not yet replaced" in listed and password.group(1) not in listed
    db = Database(f"sqlite:///{tmp_path / 'state' / 'pacs-agent.db'}")
    try:
        with db.session() as session, session.begin():
            assert authenticate(session, "root", password.group(1)) is not None
    finally:
        db.dispose()


# -- no anonymous access ----------------------------------------------------------------------


def test_every_route_without_a_session_gets_the_login_page_or_401(node: tuple[TestClient, Database, Clock]) -> None:
    client, _, _ = node
    checked = 0
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Mount) or route.path == "/login":
            continue
        assert isinstance(route, Route)
        path = route.path.replace("{uid}", STUDY_UID).replace("{result_id:int}", "1")
        path = path.replace("{index:int}", "1").replace("{name}", "m1-kras-crc-demo").replace("{file}", "roc-test.png")
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            response = client.request(method, path)
            if path.startswith("/api/"):
                assert response.status_code == 401, path
            else:
                assert response.status_code == 303, path
                assert response.headers["location"].startswith("/login?next="), path
            assert PATIENT_ID not in response.text
            checked += 1
    assert checked >= 20


def test_a_tampered_session_cookie_is_sent_to_the_login_page(node: tuple[TestClient, Database, Clock]) -> None:
    client, _, _ = node
    assert login(client, "vera") == 303
    cookie = client.cookies["pacs_console"]
    client.cookies.clear()
    client.cookies.set("pacs_console", cookie)
    assert client.get("/studies").status_code == 200
    client.cookies.clear()
    client.cookies.set("pacs_console", cookie[:-3] + "abc")
    assert client.get("/studies").status_code == 303


def test_a_removed_user_loses_access_at_once(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    assert login(client, "vera") == 303
    assert client.get("/api/studies").status_code == 200
    with db.session() as session, session.begin():
        session.delete(session.execute(select(ConsoleUser).where(ConsoleUser.name == "vera")).scalar_one())
    assert client.get("/api/studies").status_code == 401


# -- login ------------------------------------------------------------------------------------


def test_login_sets_a_strict_session_cookie_and_pages_carry_the_csp(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    page = client.get("/login")
    assert page.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
    assert login(client, "vera") == 303
    cookie = next(h for h in client.cookies.jar if h.name == "pacs_console")
    assert cookie.has_nonstandard_attr("HttpOnly")
    overview = client.get("/")
    assert overview.status_code == 200 and "vera (viewer)" in overview.text
    assert [e.detail for e in events(db, "console_login")] == ["user vera (viewer)"]


def test_a_login_without_the_form_token_is_refused(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    response = client.post("/login", data={"username": "vera", "password": PASSWORD})
    assert response.status_code == 403
    assert "pacs_console" not in client.cookies
    assert events(db, "console_login") == []


def test_a_wrong_password_is_refused_and_recorded(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    assert login(client, "vera", "wrong password!") == 401
    assert client.get("/").status_code == 303
    failed = events(db, "console_login_failed")
    assert len(failed) == 1 and failed[0].level == "WARNING" and "wrong" not in (failed[0].detail or "")


def test_logins_are_rate_limited_per_address(node: tuple[TestClient, Database, Clock]) -> None:
    client, _, clock = node
    for _ in range(5):
        assert login(client, "vera", "wrong password!") == 401
    assert login(client, "vera") == 429  # even the right password waits
    clock.now += 301
    assert login(client, "vera") == 303


# -- CSRF and roles ---------------------------------------------------------------------------


def test_a_form_without_the_csrf_token_is_refused(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    assert login(client, "otto") == 303
    for data in ({"job_id": "1", "confirmed": "yes"}, {"job_id": "1", "confirmed": "yes", "csrf": "forged"}):
        response = client.post("/actions/retry-job", data=data)
        assert response.status_code == 403
    assert client.post("/logout").status_code == 403
    assert job_state(db) == "failed"


def test_a_viewer_cannot_act(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    assert login(client, "vera") == 303
    token = csrf(client)
    for action, data in (
        ("retry-job", {"job_id": "1"}),
        ("rerun-study", {"study": STUDY_UID}),
        ("requeue-deliveries", {"destination": ""}),
    ):
        response = client.post(f"/actions/{action}", data={**data, "csrf": token, "confirmed": "yes"})
        assert response.status_code == 403
        assert "may look but not act" in response.text
    assert job_state(db) == "failed"
    assert len(events(db, "console_action_refused")) == 3
    assert events(db, "console_action") == []


def test_an_operator_confirms_then_the_job_is_retried_and_audited(node: tuple[TestClient, Database, Clock]) -> None:
    client, db, _ = node
    assert login(client, "otto") == 303
    token = csrf(client)
    confirm = client.post("/actions/retry-job", data={"job_id": "1", "csrf": token})
    assert confirm.status_code == 200 and 'name="confirmed" value="yes"' in confirm.text
    assert job_state(db) == "failed"
    done = client.post("/actions/retry-job", data={"job_id": "1", "csrf": token, "confirmed": "yes"})
    assert done.status_code == 200 and "pending again" in done.text
    assert job_state(db) == "pending"
    assert "by console user otto" in (events(db, "job_retry_requested")[0].detail or "")
    action = events(db, "console_action")
    assert len(action) == 1 and (action[0].detail or "").startswith("by otto (operator): Retry job 1")
    again = client.post("/actions/retry-job", data={"job_id": "1", "csrf": token, "confirmed": "yes"})
    assert again.status_code == 409 and "pending already" in again.text


# -- patient data and audit of study views ----------------------------------------------------


def test_the_patient_id_is_only_on_the_study_page_and_each_view_is_audited(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, db, _ = node
    assert login(client, "vera") == 303
    for path in ("/", "/studies", "/api/studies", "/queue", "/api/queue", "/events", "/api/events", "/config"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert PATIENT_ID not in response.text, path
    assert STUDY_UID in client.get("/studies").text
    assert client.get("/studies?q=ACC1").text.count(f"/studies/{STUDY_UID}") == 1
    assert f"/studies/{STUDY_UID}" not in client.get("/studies?q=ACC2").text
    page = client.get(f"/studies/{STUDY_UID}")
    assert page.status_code == 200 and PATIENT_ID in page.text
    assert "https://ohif.example.org/viewer?StudyInstanceUIDs=1.2.826.0.1.3680043.8.498.1" in page.text
    assert client.get(f"/api/studies/{STUDY_UID}").json()["patient_id"] == PATIENT_ID
    viewed = events(db, "console_study_viewed")
    assert [(e.study_instance_uid, e.detail) for e in viewed] == [(STUDY_UID, "by vera"), (STUDY_UID, "by vera (api)")]
    assert all(PATIENT_ID not in (e.detail or "") for e in viewed)
    assert client.get("/studies/1.2.3.404").status_code == 404


def test_the_console_writes_no_patient_id_to_the_log(
    node: tuple[TestClient, Database, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = node
    caplog.set_level("DEBUG")
    assert login(client, "vera") == 303
    client.get(f"/studies/{STUDY_UID}")
    client.get(f"/api/studies/{STUDY_UID}")
    assert PATIENT_ID not in caplog.text


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("VIEWER_URL", "https://ohif/viewer", "{study_instance_uid}"),
        ("VIEWER_URL", "javascript:alert(1)//{study_instance_uid}", "http"),
        ("BASE_URL", "node.example.org/console", "http:// or https://"),
        ("CERT_FILE", "/etc/cert.pem", "go together"),
        ("PORT", "0", "greater than or equal to 1"),
    ],
)
def test_bad_console_settings_are_refused(key: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_settings(None, {f"PACS_AGENT__CONSOLE__{key}": value})


def test_the_console_defaults_are_off_and_local() -> None:
    console = load_settings(None, {}).console
    assert (console.enabled, console.host, console.port) == (False, "127.0.0.1", 8080)
    assert load_settings(
        None, {"PACS_AGENT__CONSOLE__BASE_URL": "https://n.example.org/console/"}
    ).console.root_path == ("/console")


# -- rule tester ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("phantom"), seed=3, lesions=2, slices=16, rows=64, columns=64, clinical_structures=True
    )


def phantom_zip(study: PhantomStudy) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(study.study_dir.rglob("*.dcm")):
            archive.write(path, str(path.relative_to(study.study_dir)))
    return buffer.getvalue()


def receive(db: Database, settings: Settings, study: PhantomStudy) -> None:
    """Spool and record the phantom's files as the receiver does, then let the scheduler evaluate it."""
    for path in sorted(study.study_dir.rglob("*.dcm")):
        relative = Path("received") / path.relative_to(study.study_dir)
        (settings.storage.spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, settings.storage.spool_dir / relative)
        with db.session() as session, session.begin():
            record_instance(
                session, read_header(path), path=str(relative), size_bytes=path.stat().st_size, calling_ae_title="CT"
            )
    with db.session() as session, session.begin():
        run_once(
            session,
            readiness_rules(settings),
            settings.jobs.methods,
            3,
            now=utcnow() + timedelta(hours=1),
            settings=settings,
        )


def rules_form(client: TestClient, **fields: str) -> dict[str, str]:
    page = client.get("/rules")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert page.status_code == 200 and token is not None
    return {"csrf": token.group(1), **fields}


NOT_VENOUS = "[routing]\nexclude_patterns = ['venous']\n"


def test_the_rule_tester_shows_the_decision_on_an_uploaded_zip_and_how_edited_rules_change_it(
    node: tuple[TestClient, Database, Clock], phantom_study: PhantomStudy
) -> None:
    client, db, _ = node
    assert login(client, "vera") == 303  # looking only: a viewer may
    upload = {"file": ("study.zip", phantom_zip(phantom_study), "application/zip")}
    result = client.post("/api/rules", data=rules_form(client), files=upload)
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["rules"] == "the node's" and body["files"] == len(phantom_study.ct_files) + 2
    (study,) = body["studies"]
    assert study["study_instance_uid"] == phantom_study.study_instance_uid
    assert study["decision"]["state"] == "ready"
    assert study["decision"]["ct_series_instance_uid"] == phantom_study.ct_series_instance_uid
    roles = {s["label"]: s["role"] for s in study["structures"] if s["chosen_segmentation"]}
    assert roles == {"Liver": "organ", "Spleen": "organ", "Liver lesions": "tumour"}
    assert [m["method"] for m in study["methods"] if m["runs"]] == ["radiomics"]

    edited = client.post("/api/rules", data=rules_form(client, rules=NOT_VENOUS), files=upload).json()
    (study,) = edited["studies"]
    assert edited["rules"] == "edited (not saved)"
    assert study["decision"]["state"] == "incomplete" and study["methods"] == []
    assert "matches exclusion pattern 'venous'" in study["decision"]["reason"]
    with db.session() as session:  # the upload went to a throw-away database, not the node's
        assert (
            session.execute(
                select(Study.id).where(Study.study_instance_uid == phantom_study.study_instance_uid)
            ).first()
            is None
        )


def test_the_rule_tester_on_a_received_study_compares_with_what_the_node_decided_and_changes_nothing(
    tmp_path: Path, phantom_study: PhantomStudy
) -> None:
    settings = load_settings(None, {"PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state")})
    db = Database(settings.database_url)
    with db.session() as session, session.begin():
        add_user(session, "vera", "viewer", PASSWORD)
    receive(db, settings, phantom_study)
    uid = phantom_study.study_instance_uid
    with db.session() as session:
        before = session.execute(select(Study.state, Study.state_reason, Study.ct_series_instance_uid)).one()
        jobs = session.execute(select(func.count(Job.id))).scalar_one()
    assert before[0] == "queued" and jobs == 1
    app = create_app(settings, db, load_secret(settings.console_secret_file))
    with TestClient(app, follow_redirects=False) as client:
        assert login(client, "vera") == 303
        form = client.get(f"/rules?study={uid}")
        assert f'value="{uid}"' in form.text and "[routing.tumour]" in form.text
        same = client.post("/rules", data=rules_form(client, study=uid))
        assert same.status_code == 200 and "Same choices as the node made" in same.text
        assert "the node&#39;s" in same.text or "the node's" in same.text
        changed = client.post("/rules", data=rules_form(client, study=uid, rules=NOT_VENOUS))
        assert changed.status_code == 200
        assert "Differs from what the node decided" in changed.text
        assert f"CT series: none instead of {phantom_study.ct_series_instance_uid}" in changed.text
        tumour_rule = "[routing.tumour]\ninclude_labels = ['spleen']\norgan_labels = ['liver']\n"
        api = client.post("/api/rules", data=rules_form(client, study=uid, rules=tumour_rule)).json()
        (study,) = api["studies"]
        chosen = {s["label"]: s["role"] for s in study["structures"] if s["chosen_segmentation"]}
        assert chosen["Spleen"] == "tumour" and study["recorded"]["state"] == "queued"
        for bad, says in (
            ("[routing", "not valid TOML"),
            ("[jobs]\nmethods = ['m1']", "remove jobs"),
            ("[routing]\nexclude_patterns = ['(']", "not a valid regular expression"),
        ):
            refused = client.post("/rules", data=rules_form(client, study=uid, rules=bad))
            assert refused.status_code == 400 and says in refused.text, bad
        assert client.post("/rules", data=rules_form(client, study="1.2.3.404")).status_code == 400
    with db.session() as session:
        assert session.execute(select(Study.state, Study.state_reason, Study.ct_series_instance_uid)).one() == before
        assert session.execute(select(func.count(Job.id))).scalar_one() == jobs
        tested = session.execute(select(Event.detail).where(Event.kind == "console_rules_tested")).scalars().all()
    assert tested[0] == "by vera: a received study under the node's rules"
    assert tested[1] == "by vera: a received study under edited (not saved) rules"
    db.dispose()


# -- pause / resume ---------------------------------------------------------------------------


def test_pause_stops_new_jobs_until_resumed_survives_a_restart_and_is_shown(tmp_path: Path) -> None:
    settings = load_settings(None, {"PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state")})
    db = Database(settings.database_url)
    with db.session() as session, session.begin():
        study = Study(study_instance_uid=STUDY_UID, patient_id=PATIENT_ID, state="queued")
        session.add(study)
        session.flush()
        session.add(Job(study_id=study.id, method="radiomics", inputs="{}", state="pending", attempts=0))
    with db.session() as session, session.begin():
        assert "paused" in pause_processing(session, by="command line (root)", reason="model update")
    db.dispose()

    db = Database(settings.database_url)  # a restart: the pause is in the database
    worker = Worker(settings, db)
    assert worker.run_one() is False
    with db.session() as session:
        assert session.execute(select(Job.state, Job.attempts)).one() == ("pending", 0)
        assert "already paused" in pause_processing(session, by="x")
    status = collect_status(db)
    assert status["paused"]["by"] == "command line (root)" and status["paused"]["reason"] == "model update"
    assert format_status(status).startswith("PROCESSING PAUSED since ")

    with db.session() as session, session.begin():
        assert resume_processing(session, by="command line (root)").startswith("processing resumed")
    assert collect_status(db)["paused"] is None
    assert worker.run_one() is True  # claimed and run (its empty inputs make it fail: it did start)
    with db.session() as session:
        assert session.execute(select(Job.attempts)).scalar_one() == 1
        kinds = session.execute(select(Event.kind).where(Event.kind.like("processing_%")).order_by(Event.id))
        assert list(kinds.scalars()) == ["processing_paused", "processing_resumed"]
    db.dispose()


def test_an_operator_pauses_and_resumes_from_the_overview_a_viewer_cannot(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, db, _ = node
    assert login(client, "vera") == 303
    assert "Pause processing" not in client.get("/").text
    refused = client.post("/actions/pause-processing", data={"csrf": csrf(client), "confirmed": "yes", "reason": "x"})
    assert refused.status_code == 403 and client.get("/api/overview").json()["paused"] is None
    client.post("/logout", data={"csrf": csrf(client)})

    assert login(client, "otto") == 303
    token = csrf(client)
    assert 'action="/actions/pause-processing"' in client.get("/").text
    confirm = client.post("/actions/pause-processing", data={"csrf": token, "reason": "model update"})
    assert confirm.status_code == 200 and 'name="confirmed" value="yes"' in confirm.text
    assert client.get("/api/overview").json()["paused"] is None  # not before it is confirmed
    done = client.post("/actions/pause-processing", data={"csrf": token, "reason": "model update", "confirmed": "yes"})
    assert done.status_code == 200 and "no new job starts until resumed" in done.text
    overview = client.get("/")
    assert "Processing of new studies is PAUSED" in overview.text and "console user otto: model update" in overview.text
    assert client.get("/api/overview").json()["paused"]["by"] == "console user otto"
    resumed = client.post("/actions/resume-processing", data={"csrf": token, "confirmed": "yes"})
    assert resumed.status_code == 200 and "processing resumed" in resumed.text
    assert "PAUSED" not in client.get("/").text
    details = [e.detail for e in events(db, "console_action")]
    assert details[0].startswith(
        "by otto (operator): Pause processing of new studies: processing of new studies paused"
    )
    assert details[1].startswith("by otto (operator): Resume processing: processing resumed")


# -- single sign-on through a trusted reverse proxy -------------------------------------------


def sso_client(tmp_path: Path, peer: str, **console: str) -> tuple[TestClient, Database]:
    environ = {
        "PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state"),
        "PACS_AGENT__CONSOLE__TRUSTED_PROXY_HEADER": "X-Remote-User",
        "PACS_AGENT__CONSOLE__TRUSTED_PROXIES": '["10.9.0.0/24"]',
        **{f"PACS_AGENT__CONSOLE__{k.upper()}": v for k, v in console.items()},
    }
    settings = load_settings(None, environ)
    db = Database(settings.database_url)
    with db.session() as session, session.begin():
        if session.execute(select(ConsoleUser.id)).first() is None:
            add_user(session, "otto", "operator", PASSWORD)
            add_user(session, "vera", "viewer", PASSWORD)
            study = Study(study_instance_uid=STUDY_UID, patient_id=PATIENT_ID, state="failed")
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, method="radiomics", inputs="{}", state="failed", attempts=3))
    app = create_app(settings, db, load_secret(settings.console_secret_file))
    return TestClient(app, follow_redirects=False, client=(peer, 40000)), db


def test_the_proxy_header_logs_in_a_local_user_with_their_role_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    trusted, db = sso_client(tmp_path, "10.9.0.7")
    with trusted:
        page = trusted.get("/", headers={"X-Remote-User": "otto"})
        assert page.status_code == 200 and "otto (operator)" in page.text
        assert "pacs_console" not in trusted.cookies  # no cookie: every request carries the proxy's word
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        form = {"job_id": "1", "csrf": token.group(1), "confirmed": "yes"}
        assert trusted.post("/actions/retry-job", data=form, headers={"X-Remote-User": "vera"}).status_code == 403
        forged = trusted.post("/actions/retry-job", data={**form, "csrf": "forged"}, headers={"X-Remote-User": "otto"})
        assert forged.status_code == 403
        assert job_state(db) == "failed"
        done = trusted.post("/actions/retry-job", data=form, headers={"X-Remote-User": "otto"})
        assert done.status_code == 200 and "pending again" in done.text
        assert trusted.get("/api/studies", headers={"X-Remote-User": "vera"}).status_code == 200
        assert trusted.get("/api/studies", headers={"X-Remote-User": "mallory"}).status_code == 401  # not local
        assert trusted.get("/api/studies").status_code == 401  # no header, no cookie
        trusted.get(f"/studies/{STUDY_UID}", headers={"X-Remote-User": "vera", "X-Forwarded-For": "192.0.2.1"})
    untrusted, _ = sso_client(tmp_path, "10.9.1.7")
    with untrusted:
        for path in ("/", "/studies", f"/studies/{STUDY_UID}", "/rules"):
            response = untrusted.get(path, headers={"X-Remote-User": "otto"})
            assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
        assert untrusted.get("/api/queue", headers={"X-Remote-User": "otto"}).status_code == 401
        forged = untrusted.post(
            "/actions/retry-job",
            data={"job_id": "1", "csrf": "x", "confirmed": "yes"},
            headers={"X-Remote-User": "otto"},
        )
        assert forged.status_code == 303
        assert login(untrusted, "vera") == 303  # a local login still works from anywhere
        untrusted.get(f"/studies/{STUDY_UID}", headers={"X-Forwarded-For": "192.0.2.2"})
    viewed = events(db, "console_study_viewed")
    # X-Forwarded-For is believed from the trusted proxy only
    assert [(e.detail, e.peer) for e in viewed] == [("by vera", "192.0.2.1"), ("by vera", "10.9.1.7")]
    db.dispose()


def test_a_proxy_user_who_is_not_local_gets_the_default_role_when_one_is_set(tmp_path: Path) -> None:
    client, db = sso_client(tmp_path, "10.9.0.7", proxy_default_role="viewer")
    with client:
        page = client.get("/", headers={"X-Remote-User": "mallory@example.org"})
        assert page.status_code == 200 and "mallory@example.org (viewer)" in page.text
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        refused = client.post(
            "/actions/retry-job",
            data={"job_id": "1", "csrf": token.group(1), "confirmed": "yes"},
            headers={"X-Remote-User": "mallory@example.org"},
        )
        assert refused.status_code == 403 and "may look but not act" in refused.text
        assert client.get("/", headers={"X-Remote-User": "<script>"}).status_code == 303  # not a user name
    db.dispose()


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"TRUSTED_PROXY_HEADER": "X-Remote-User"}, "needs trusted_proxies"),
        ({"TRUSTED_PROXY_HEADER": "X Remote", "TRUSTED_PROXIES": '["127.0.0.1"]'}, "not an HTTP header name"),
        ({"TRUSTED_PROXIES": '["proxy.example.org"]'}, "not an IP address or network"),
        ({"PROXY_DEFAULT_ROLE": "root"}, "proxy_default_role"),
    ],
)
def test_bad_proxy_settings_are_refused(environ: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_settings(None, {f"PACS_AGENT__CONSOLE__{k}": v for k, v in environ.items()})


def test_config_check_names_the_console_files_that_will_not_do(tmp_path: Path) -> None:
    secret = tmp_path / "console-secret"
    environ = {
        "PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state"),
        "PACS_AGENT__CONSOLE__SESSION_SECRET_FILE": str(secret),
        "PACS_AGENT__CONSOLE__CERT_FILE": str(tmp_path / "missing.pem"),
        "PACS_AGENT__CONSOLE__KEY_FILE": str(tmp_path / "missing.key"),
    }
    settings = load_settings(None, environ)
    assert [p.split(":")[0] for p in console_problems(settings)] == ["console.cert_file", "console.key_file"]
    load_secret(secret)  # a good key: no problem
    assert len(console_problems(settings)) == 2
    secret.chmod(0o644)
    assert any("readable by others; chmod 600" in p for p in check_settings(settings))
    secret.chmod(0o600)
    secret.write_text("short\n")
    assert any("fewer than 32 characters" in p for p in console_problems(settings))


# -- overview charts --------------------------------------------------------------------------


def test_the_overview_charts_job_run_times_per_method_and_delivery_failures_per_hour(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, db, _ = node
    now = utcnow()
    with db.session() as session, session.begin():
        study_id = session.execute(select(Study.id)).scalar_one()
        for method, seconds, hours_ago in (
            ("radiomics", 10, 1),
            ("radiomics", 60, 2),
            ("radiomics", 20, 3),
            ("m1", 5, 1),
        ):
            finished = now - timedelta(hours=hours_ago)
            session.add(
                Job(
                    study_id=study_id,
                    method=method,
                    inputs="{}",
                    state="done",
                    started_at=finished - timedelta(seconds=seconds),
                    finished_at=finished,
                )
            )
        old = now - timedelta(hours=30)  # outside the 24 h
        session.add(Job(study_id=study_id, method="m3", inputs="{}", state="done", started_at=old, finished_at=old))
        for kind, at in (
            ("delivery_retry", now),
            ("delivery_retry", now),
            ("delivery_dead", now - timedelta(hours=2)),
            ("delivery_dead", old),
            ("delivered", now),
        ):
            session.add(Event(kind=kind, at=at, level="WARNING"))
    assert login(client, "vera") == 303
    overview = client.get("/api/overview").json()
    assert overview["job_durations"] == [
        {"method": "m1", "jobs": 1, "median_seconds": 5.0, "max_seconds": 5.0},
        {"method": "radiomics", "jobs": 3, "median_seconds": 20.0, "max_seconds": 60.0},
    ]
    failures = overview["delivery_failures_per_hour"]
    assert len(failures) == 24
    assert failures[-1]["retry"] == 2 and failures[-1]["dead"] == 0
    assert failures[-3] == {"hour": failures[-3]["hour"], "retry": 0, "dead": 1}
    assert sum(p["retry"] + p["dead"] for p in failures) == 3
    page = client.get("/").text
    chart = page[page.index('id="failures-chart"') : page.index("</svg>", page.index('id="failures-chart"'))]
    assert chart.count("<rect") == 2 and 'class="dead"' in chart and 'class="retry"' in chart
    durations = page[page.index('id="durations-chart"') : page.index("</svg>", page.index('id="durations-chart"'))]
    assert (
        durations.count('<g class="method">') == 2 and "radiomics: 3 job(s), median 20.0 s, longest 60.0 s" in durations
    )
    assert "<script" not in page and " style=" not in page  # the CSP allows neither


# -- workers on every host --------------------------------------------------------------------


def test_the_overview_lists_the_workers_of_every_host_and_warns_of_a_queue_no_running_worker_takes(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, db, _ = node
    now = utcnow()
    with db.session() as session, session.begin():
        study_id = session.execute(select(Study.id)).scalar_one()
        running = Job(study_id=study_id, method="radiomics", inputs="{}", state="running", queue="cpu")
        session.add(running)
        for method, queue in (("m2", "gpu"), ("m2", "gpu"), ("radiomics", "cpu")):
            session.add(Job(study_id=study_id, method=method, inputs="{}", state="pending", queue=queue))
        session.flush()
        common = {"concurrency": 1, "backend": "sqlite", "started_at": now - timedelta(hours=2)}
        session.add_all(
            [
                WorkerProcess(
                    name="recv-host:101",
                    host="recv-host",
                    pid=101,
                    device="cpu",
                    queues="cpu default",
                    state="running",
                    heartbeat_at=now - timedelta(seconds=5),
                    current_job_id=running.id,
                    **common,
                ),
                WorkerProcess(
                    name="gpu-host:202",
                    host="gpu-host",
                    pid=202,
                    device="cuda:0",
                    queues="gpu",
                    state="running",
                    heartbeat_at=now - timedelta(hours=1),
                    **common,
                ),
                WorkerProcess(
                    name="old-host:303",
                    host="old-host",
                    pid=303,
                    device="cpu",
                    queues="*",
                    state="stopped",
                    stopped_at=now - timedelta(hours=1),
                    **common,
                ),
                WorkerProcess(
                    name="gone-host:404",
                    host="gone-host",
                    pid=404,
                    device="cpu",
                    queues="*",
                    state="stopped",
                    stopped_at=now - timedelta(hours=30),
                    **common | {"started_at": now - timedelta(hours=31)},
                ),
            ]
        )
    assert login(client, "vera") == 303
    overview = client.get("/api/overview").json()
    workers = {w["name"]: w for w in overview["workers"]}
    assert set(workers) == {"recv-host:101", "gpu-host:202", "old-host:303"}  # stopped 30 h ago: no longer listed
    cpu, gpu, old = workers["recv-host:101"], workers["gpu-host:202"], workers["old-host:303"]
    assert (cpu["host"], cpu["device"], cpu["queues"], cpu["state"]) == (
        "recv-host",
        "cpu",
        ["cpu", "default"],
        "running",
    )
    assert cpu["current_job_id"] == running.id and 5 <= cpu["heartbeat_age_seconds"] < 3600
    assert (gpu["host"], gpu["device"], gpu["queues"], gpu["state"]) == ("gpu-host", "cuda:0", ["gpu"], "silent")
    assert gpu["heartbeat_age_seconds"] >= 3600 and gpu["current_job_id"] is None
    assert (old["state"], old["queues"]) == ("stopped", ["*"])
    assert overview["pending_by_queue"] == {"gpu": 2, "cpu": 1}
    warning = "queue gpu: 2 job(s) pending and no running worker takes it"
    assert overview["queue_warnings"] == [warning]
    assert warning in format_status(collect_status(db)).splitlines()  # the same story as pacs-agent status

    page = client.get("/").text
    card = page[page.index('id="workers"') : page.index("</section>", page.index('id="workers"'))]
    assert warning in card and "gone-host" not in card
    rows = re.findall(r'<tr class="worker">(.*?)</tr>', card, re.S)
    assert len(rows) == 3
    gpu_row = next(r for r in rows if "gpu-host:202" in r)
    assert "cuda:0" in gpu_row and "state-silent" in gpu_row
    cpu_row = next(r for r in rows if "recv-host:101" in r)
    assert "cpu, default" in cpu_row and f"job {running.id}" in cpu_row and "state-running" in cpu_row
    assert "every queue" in next(r for r in rows if "old-host:303" in r)
    assert re.search(r"gpu\s+2</span>", card) and re.search(r"cpu\s+1</span>", card)

    with db.session() as session, session.begin():  # the gpu worker beats again: it takes its queue
        gpu_worker = session.execute(select(WorkerProcess).where(WorkerProcess.host == "gpu-host")).scalar_one()
        gpu_worker.heartbeat_at = utcnow()
    overview = client.get("/api/overview").json()
    assert overview["queue_warnings"] == [] and "no running worker takes it" not in client.get("/").text
    assert "no running worker takes it" not in format_status(collect_status(db))


# -- studies filters --------------------------------------------------------------------------


def test_studies_filter_by_arrival_days_method_and_calling_ae_on_the_page_and_the_api(
    node: tuple[TestClient, Database, Clock],
) -> None:
    from datetime import UTC, datetime

    client, db, _ = node
    with db.session() as session, session.begin():
        for n, (day, ae, method) in enumerate(
            (
                ("2026-11-02", "CT_SCANNER_A", "m1"),
                ("2026-11-05", "PACS_B", "radiomics"),
                ("2026-11-07", "PACS_B", "m3"),
            )
        ):
            at = datetime.fromisoformat(f"{day}T10:00:00").replace(tzinfo=UTC)
            study = Study(study_instance_uid=f"1.2.3.{n}", state="done", first_received_at=at, last_received_at=at)
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"1.2.3.{n}.1", modality="CT")
            session.add(series)
            session.flush()
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=f"1.2.3.{n}.1.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"x/{n}.dcm",
                    size_bytes=1,
                    calling_ae_title=ae,
                    received_at=at,
                )
            )
            session.add(Job(study_id=study.id, method=method, inputs="{}", state="done"))
    assert login(client, "vera") == 303

    def uids(**params: str) -> list[str]:
        response = client.get("/api/studies", params=params)
        assert response.status_code == 200, response.text
        return sorted(r["study_instance_uid"] for r in response.json())

    assert uids(**{"from": "2026-11-05"}) == ["1.2.3.1", "1.2.3.2", STUDY_UID]  # the fixture's study arrived today
    assert uids(**{"from": "2026-11-02", "to": "2026-11-05"}) == ["1.2.3.0", "1.2.3.1"]  # both days included
    assert uids(calling_ae="PACS_B") == ["1.2.3.1", "1.2.3.2"]
    assert uids(method="m1") == ["1.2.3.0"]
    assert uids(method="radiomics", calling_ae="PACS_B") == ["1.2.3.1"]
    row = next(r for r in client.get("/api/studies").json() if r["study_instance_uid"] == "1.2.3.2")
    assert row["calling_ae_titles"] == ["PACS_B"] and row["methods"] == ["m3"]
    bad = client.get("/api/studies", params={"from": "5.11.2026"})
    assert bad.status_code == 400 and "not a date (YYYY-MM-DD)" in bad.json()["error"]
    page = client.get("/studies", params={"calling_ae": "PACS_B", "to": "2026-11-06"})
    assert page.status_code == 200
    assert "1.2.3.1" in page.text and "1.2.3.2" not in page.text and "1.2.3.0" not in page.text
    assert "<option selected>PACS_B</option>" in page.text and 'value="2026-11-06"' in page.text


# -- training reports on the Models page ------------------------------------------------------


def test_the_models_page_links_each_training_report_with_its_roc_plots(
    node: tuple[TestClient, Database, Clock],
) -> None:
    client, _, _ = node
    assert login(client, "vera") == 303
    models = client.get("/api/models").json()
    m1 = next(m for m in models if m["name"] == "m1-kras-crc-demo")
    assert m1["training_report"] and m1["key"] == "1/m1-kras-crc-demo"  # 0: [models] dir, 1: the demo packages
    assert 'href="/models/1/m1-kras-crc-demo/report"' in client.get("/models").text
    page = client.get("/models/1/m1-kras-crc-demo/report")
    assert page.status_code == 200
    assert "<h2>Training report: m1-kras-crc-demo 0.1.0</h2>" in page.text
    assert "<th>AUC (95% CI, DeLong)</th>" in page.text and "<strong>validation status</strong>: DEMO" in page.text
    images = re.findall(r'<img class="report" src="([^"]+)"', page.text)
    assert images == [
        "/models/1/m1-kras-crc-demo/report/roc-test.png",
        "/models/1/m1-kras-crc-demo/report/roc-validation.png",
    ]
    for src in images:
        png = client.get(src)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    api = client.get("/api/models/1/m1-kras-crc-demo/report").json()
    assert api["markdown"].startswith("# Training report: m1-kras-crc-demo")
    assert client.get("/models/1/no-such-package/report").status_code == 404
    assert client.get("/models/7/m1-kras-crc-demo/report").status_code == 404
    client.cookies.clear()
    assert client.get(images[0]).status_code == 303  # no image without a session


def test_a_training_report_is_escaped_and_its_images_cannot_leave_the_report_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    package = models / "evil-0.1"
    (package / "report").mkdir(parents=True)
    shutil.copy(Path("config/models/m1-kras-crc-demo/model.toml"), package / "model.toml")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\nSECRET")
    (package / "report" / "link.png").symlink_to(tmp_path / "secret.png")
    (package / "report" / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\nROC")
    (package / "report" / "report.md").write_text(
        "# Report <script>alert(1)</script>\n\n"
        '- **x**: <img src=x onerror="alert(2)">\n\n'
        "![ROC](roc.png)\n\n![up](../model.toml)\n\n![link](link.png)\n\n![missing](none.png)\n\n"
        "| a | b |\n|---|---|\n| <b>1</b> | `2` |\n",
        encoding="utf-8",
    )
    settings = load_settings(
        None,
        {"PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path / "state"), "PACS_AGENT__MODELS__DIR": str(models)},
    )
    db = Database(settings.database_url)
    try:
        with db.session() as session, session.begin():
            add_user(session, "vera", "viewer", PASSWORD)
        app = create_app(settings, db, load_secret(settings.console_secret_file))
        with TestClient(app, follow_redirects=False) as client:
            assert login(client, "vera") == 303
            page = client.get("/models/0/evil-0.1/report").text
            report = page[page.index('<article class="report">') :]
            assert "<script" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report
            assert "<img src=x" not in report and "&lt;img src=x onerror=" in report
            assert "&lt;b&gt;1&lt;/b&gt;" in report and "<code>2</code>" in report
            assert re.findall(r'<img class="report" src="([^"]+)"', report) == ["/models/0/evil-0.1/report/roc.png"]
            assert "link.png" not in report.split("</article>")[1]  # a link out of the folder is not listed
            assert "![up](../model.toml)" in report and "![missing](none.png)" in report  # left as text
            assert client.get("/models/0/evil-0.1/report/roc.png").content.endswith(b"ROC")
            for bad in ("link.png", "..%2Fmodel.toml", "..%2F..%2Fsecret.png", "report.md", "model.toml", "none.png"):
                response = client.get(f"/models/0/evil-0.1/report/{bad}")
                assert response.status_code == 404, bad
                assert b"SECRET" not in response.content
    finally:
        db.dispose()
