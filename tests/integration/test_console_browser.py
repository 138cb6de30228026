"""The web console in a real browser (Debian's Chromium, headless, driven by Playwright) against a
running node (``pacs-agent serve`` with ``[console] enabled``) and Orthanc as the PACS.

Log in, see a phantom study reach ``done``, open its study page with the Secondary Capture
thumbnails and the SR text, run the rule tester on it, retry a job that really failed (a second
study whose segmentation is empty fails at the job stage) as operator and be refused as viewer,
and meet the login page on every page without a session. Screenshots of the overview and the study page go to
the test's temporary folder, and to ``$PACS_AGENT_CONSOLE_SCREENSHOTS`` when set (e.g. ``docs/images``
to refresh the README's ``console-*.png``): a test run never changes the source tree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.db.tables import Delivery, Event, Job, Study
from tests.integration.peers import Node, Orthanc, storescu, wait_for
from tests.ports import free_port

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=11, lesions=2, slices=36, rows=128, columns=128)]

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "browser-test-password"
CONSOLE_PORT = free_port()
PAGES = ("/", "/studies", "/queue", "/deliveries", "/events", "/rules", "/models", "/config")


@pytest.fixture
def pacs_node_config(orthanc: Orthanc) -> str:
    return (
        orthanc.destination_toml()
        + f"\n[console]\nenabled = true\nport = {CONSOLE_PORT}\n"
        + 'viewer_url = "http://127.0.0.1:3000/viewer?StudyInstanceUIDs={study_instance_uid}"\n'
    )


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def add_user(node: Node, name: str, role: str, tmp_path: Path) -> None:
    secret = tmp_path / f"{name}.password"
    secret.write_text(PASSWORD + "\n")
    command = [sys.executable, "-m", "pacs_agent", "console", "user", "add", name, "--role", role]
    subprocess.run(
        [*command, "--password-file", str(secret), "--config", str(node.config)],
        check=True,
        capture_output=True,
    )


def console_listening(node: Node) -> bool:
    assert node.listening()  # raises with the node's log when it died
    try:
        with socket.create_connection(("127.0.0.1", CONSOLE_PORT), timeout=1):
            return True
    except OSError:
        return False


def study_state(node: Node, uid: str) -> str | None:
    return node.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def failing_study(folder: Path) -> PhantomStudy:
    """A small phantom study whose segmentation is empty: received and routed, its job fails (bad input)."""
    study = generate_study(folder, seed=4, lesions=1, slices=24, rows=64, columns=64)
    assert study.seg_file is not None
    seg = dcmread(study.seg_file)
    seg.PixelData = b"\x00" * len(seg.PixelData)  # every segment empty
    seg.save_as(study.seg_file)
    return study


def log_in(browser: object, base: str, name: str) -> object:
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.goto(f"{base}/studies")
    assert "/login" in page.url
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    assert page.url == f"{base}/studies"  # back where the login began
    return page


def test_console_in_a_browser(
    pacs_and_node: tuple[Orthanc, Node], phantom: PhantomStudy, browser: object, tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    node.write_config()
    add_user(node, "otto", "operator", tmp_path)
    add_user(node, "vera", "viewer", tmp_path)
    node.start("serve")
    base = f"http://127.0.0.1:{CONSOLE_PORT}"
    wait_for(lambda: console_listening(node), 30, "the console to listen")

    # no session: every page is the login page
    anonymous = browser.new_page()  # type: ignore[attr-defined]
    for path in (*PAGES, f"/studies/{phantom.study_instance_uid}"):
        anonymous.goto(base + path)
        assert anonymous.url.startswith(f"{base}/login?next="), path
        assert anonymous.locator("input[name=password]").count() == 1

    operator = log_in(browser, base, "otto")
    ids = orthanc.upload([*phantom.ct_files, phantom.seg_file])
    study_id = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    orthanc.post("/modalities/pacsagent/store", {"Resources": [study_id], "Synchronous": True})
    bad = failing_study(tmp_path / "bad")
    assert bad.seg_file is not None
    sent = storescu(node.port, [*bad.ct_files, bad.seg_file])
    assert sent.returncode == 0, sent.stderr

    def done_in_the_list() -> bool:
        operator.goto(f"{base}/studies")
        row = operator.locator("tr", has_text=phantom.study_instance_uid)
        return row.count() == 1 and row.locator(".state-done").count() == 1

    wait_for(done_in_the_list, 240, "the study to be done on the Studies page")
    wait_for(
        lambda: node.scalars(select(Delivery.state)) and set(node.scalars(select(Delivery.state))) == {"done"},
        60,
        "every result delivered",
    )
    wait_for(lambda: study_state(node, bad.study_instance_uid) == "failed", 120, "the empty segmentation's job to fail")
    operator.goto(f"{base}/")
    assert operator.locator("#instances-chart rect").count() == 24
    assert "radiomics" in (operator.locator("#durations-chart").text_content() or "")
    assert operator.locator("h1 .health").inner_text() in ("ok", "unhealthy")
    images = Path(os.environ.get("PACS_AGENT_CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    images.mkdir(parents=True, exist_ok=True)
    operator.screenshot(path=str(images / "console-overview.png"), full_page=True)

    operator.goto(f"{base}/studies")
    operator.click(f"a:has-text('{phantom.study_instance_uid}')")
    operator.wait_for_load_state("load")  # every thumbnail fetched
    thumbs = operator.locator("img.thumb")
    assert thumbs.count() == len(phantom.lesions) + 1  # summary page + one per lesion
    for i in range(thumbs.count()):
        png = operator.request.get(base + thumbs.nth(i).get_attribute("src"))
        assert png.status == 200 and png.headers["content-type"] == "image/png", png.text()[:300]
        assert thumbs.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
    sr_text = operator.locator("pre.sr").first.inner_text()
    assert phantom.study_instance_uid in sr_text and "lesion" in sr_text.lower()
    viewer_link = operator.locator("a", has_text="Open in viewer").get_attribute("href")
    assert viewer_link == f"http://127.0.0.1:3000/viewer?StudyInstanceUIDs={phantom.study_instance_uid}"
    operator.screenshot(path=str(images / "console-study.png"), full_page=True)
    viewed = node.scalars(select(Event.detail).where(Event.kind == "console_study_viewed"))
    assert "by otto" in viewed

    # the Studies filters: by the AE title that sent it
    operator.goto(f"{base}/studies")
    operator.select_option("select[name=calling_ae]", "STORESCU")
    operator.click("form.filters button[type=submit]")
    listed = operator.locator("table.list tbody").inner_text()
    assert bad.study_instance_uid in listed and phantom.study_instance_uid not in listed

    # a demo package's training report with its ROC plots
    operator.goto(f"{base}/models")
    operator.click("tr:has-text('m1-kras-crc-demo') a:has-text('report')")
    operator.wait_for_load_state("load")
    assert "Training report: m1-kras-crc-demo" in operator.locator("h1").inner_text()
    plots = operator.locator("img.report")
    assert plots.count() >= 1
    for i in range(plots.count()):
        assert plots.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
    operator.goto(f"{base}/studies/{phantom.study_instance_uid}")

    # the rule tester on the study: the node's rules give its decision, an edited rule changes it
    operator.click("a:has-text('Test the rules on it')")
    assert operator.input_value("input[name=study]") == phantom.study_instance_uid
    operator.click("form.ruletest button[type=submit]")
    result = operator.locator("section.result")
    assert "Same choices as the node made" in result.inner_text()
    assert result.locator(".decision").inner_text() == "ready"
    assert result.locator("tr.chosen").inner_text().startswith(phantom.ct_series_instance_uid)
    rules = operator.input_value("#rules-text")
    assert "exclude_patterns = [" in rules
    operator.fill("#rules-text", rules.replace("exclude_patterns = [", "exclude_patterns = ['venous', ", 1))
    operator.click("form.ruletest button[type=submit]")
    result = operator.locator("section.result")
    assert operator.locator("#rules-used").inner_text() == "edited (not saved)"
    assert result.locator(".decision").inner_text() == "incomplete"
    assert "matches exclusion pattern 'venous'" in result.locator(".reason").inner_text()
    assert f"CT series: none instead of {phantom.ct_series_instance_uid}" in result.locator(".changed").inner_text()
    assert study_state(node, phantom.study_instance_uid) == "done"  # nothing saved
    tested = node.scalars(select(Event.detail).where(Event.kind == "console_rules_tested").order_by(Event.id))
    assert tested == [
        "by otto: a received study under the node's rules",
        "by otto: a received study under edited (not saved) rules",
    ]

    # the job that really failed (empty segmentation), retried from its study page
    job_id, error = node.rows(
        select(Job.id, Job.last_error)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == bad.study_instance_uid, Job.state == "failed")
        .order_by(Job.id)
    )[0]
    assert "empty" in (error or "").lower()
    viewer = log_in(browser, base, "vera")
    viewer.goto(f"{base}/studies/{bad.study_instance_uid}")
    assert "empty" in viewer.locator("main").inner_text().lower()  # the job's error is on the page
    viewer.click(f"button:has-text('Retry job {job_id}')")
    assert "may look but not act" in viewer.locator("main").inner_text()
    assert node.scalar(select(Job.state).where(Job.id == job_id)) == "failed"

    operator.goto(f"{base}/studies/{bad.study_instance_uid}")
    operator.click(f"button:has-text('Retry job {job_id}')")
    assert operator.locator("h1").inner_text() == f"Retry job {job_id}?"
    assert node.scalar(select(Job.state).where(Job.id == job_id)) == "failed"  # not before it is confirmed
    operator.click("button.danger")
    assert "pending again" in operator.locator("main").inner_text()

    def failed_twice() -> bool:
        failures = node.scalars(select(Event.id).where(Event.kind == "job_failed", Event.job_id == job_id))
        return len(failures) == 2 and node.scalar(select(Job.state).where(Job.id == job_id)) == "failed"

    wait_for(failed_twice, 120, "the retried job to run (and fail again: the segmentation is still empty)")
    assert node.scalar(select(Job.attempts).where(Job.id == job_id)) == 1  # attempts reset by the retry
    requested = node.scalars(select(Event.detail).where(Event.kind == "job_retry_requested", Event.job_id == job_id))
    assert len(requested) == 1 and requested[0].startswith("by console user otto:")
    actions = node.scalars(select(Event.detail).where(Event.kind == "console_action"))
    assert len(actions) == 1 and actions[0].startswith(f"by otto (operator): Retry job {job_id}")
    refused = node.scalars(select(Event.detail).where(Event.kind == "console_action_refused"))
    assert refused == [f"vera (viewer) may not: Retry job {job_id}"]
    assert study_state(node, phantom.study_instance_uid) == "done"
    assert study_state(node, bad.study_instance_uid) == "failed"
