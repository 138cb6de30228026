"""`make demo` runs `pacs-agent demo`: it shows the results, then the web console with a one-time admin password.

The test runs it with ``--stay`` (what a person at a terminal gets): after the results the node and
its console keep running; the test logs in with the printed one-time password, is made to choose
its own, finds the demo study on the Studies page, then stops the demo with SIGINT (Ctrl-C).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from tests.integration.peers import wait_for

pytestmark = pytest.mark.integration

CONSOLE_LINE = re.compile(
    r"^Console: (http://127\.0\.0\.1:\d+)/ user admin, one-time password (\S+) \(valid until [^)]+\) - press Ctrl-C",
    re.MULTILINE,
)


def form_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match is not None, html[:2000]
    return match.group(1)


def log_in_and_list_studies(base: str, password: str) -> str:
    """Log in as admin with the one-time password, replace it as the console demands; the Studies page."""
    web = requests.Session()
    login = web.get(f"{base}/login", timeout=30)
    answer = web.post(
        f"{base}/login",
        data={"login_token": form_value(login.text, "login_token"), "username": "admin", "password": password},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.url == f"{base}/password?next=/", answer.text[:2000]
    assert "one-time password" in answer.text
    changed = web.post(
        f"{base}/password",
        data={
            "csrf": form_value(answer.text, "csrf"),
            "next": "/studies",
            "current": password,
            "new": "the demo admin's own password",
            "again": "the demo admin's own password",
        },
        timeout=30,
    )
    assert changed.status_code == 200 and changed.url == f"{base}/studies", changed.text[:2000]
    # the one-time password is spent
    again = requests.Session()
    page = again.get(f"{base}/login", timeout=30)
    refused = again.post(
        f"{base}/login",
        data={"login_token": form_value(page.text, "login_token"), "username": "admin", "password": password},
        timeout=30,
    )
    assert refused.status_code == 401
    return changed.text


def test_demo_prints_the_sr_writes_the_captures_and_opens_the_console(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "pacs_agent", "demo", "--out", str(out), "--timeout", "240", "--stay"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:

        def console_line() -> re.Match[str] | None:
            assert demo.poll() is None, "".join(lines)[-3000:] + demo.stderr.read()[-3000:]  # type: ignore[union-attr]
            return CONSOLE_LINE.search("".join(lines))

        found = wait_for(console_line, 290, "the demo's console line")
        base, password = found.group(1), found.group(2)
        studies = log_in_and_list_studies(base, password)
        study_uid = str(dcmread(next((out / "study").rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        assert study_uid in studies
        assert demo.poll() is None  # still serving until Ctrl-C
        demo.send_signal(signal.SIGINT)
        assert demo.wait(90) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        reader.join(10)
        demo.stdout.close()  # type: ignore[union-attr]
        demo.stderr.close()  # type: ignore[union-attr]
    stdout = "".join(lines)
    assert password in stdout and stdout.count(password) == 1  # shown once
    assert password not in (out / "node.log").read_text(errors="replace")
    # four SRs (radiomics, m1, m3, comparator; m2 and m4 are chest models, skipped on this abdominal
    # study), each with one group per planted lesion plus its key-slice outline copy (TID 1410), and
    # the three model methods' patient-level result
    assert stdout.count("Measurement Group") == 4 * 6 + 3
    assert stdout.count("Tracking Identifier: Patient-level result") == 3
    assert "DEMO MODEL - NOT FOR CLINICAL USE" in stdout
    assert "KRAS status (predicted)" in stdout
    assert "Tracking Identifier: Liver lesions lesion 1" in stdout
    assert "Volume:" in stdout and " ml" in stdout
    assert "PHANTOM" not in stdout  # no patient name in what the demo prints
    pngs = sorted((out / "png").glob("*.png"))
    assert len(pngs) == 4 * 4  # per method: a summary page and one page per lesion
    assert not list((out / "state" / "spool" / "tmp").iterdir())
