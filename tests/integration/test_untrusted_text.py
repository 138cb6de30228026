"""Network text with escape sequences, newlines and NUL reaches no log file and no terminal raw.

Issue 15, finding 4: a SOP Instance UID holding an ANSI escape and a newline made pynetdicom's own
warning forge a log line, ``pacs-agent events`` printed the escape codes to the operator's terminal,
and a NUL made the log file binary. A real node (``pacs-agent scp``, its stdout and stderr in
``node.log``) gets a C-STORE with such a UID from a pynetdicom SCU; the CLI reads the node's database.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, config, dcmread
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from pacs_agent.audit import record_event
from tests.dicom_factory import write_ct_series
from tests.integration.peers import Node, Nodes, wait_for

pytestmark = pytest.mark.integration

EVIL_UID = "1.2.3\x1b[31m\n2026-12-02 10:00:00,000 INFO 1 forged: all good\x00.4"
EVIL_AE = "EVIL\x1b[2J"
RECORD_START = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \d+ [\w.]+: ")
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # every control but tab and newline (checked apart)


@pytest.fixture(scope="module")
def node(module_nodes: Nodes) -> Node:
    return module_nodes.start("scp")


@pytest.fixture
def anything_goes() -> Iterator[None]:
    """pynetdicom and pydicom in this (sending) process let any UID through, as a hostile sender's would."""
    old_validator = _config.VALIDATORS["UI"]
    old_modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    _config.VALIDATORS["UI"] = lambda _value: (True, "")
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        _config.VALIDATORS["UI"] = old_validator
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = old_modes


def evil_instance(tmp_path: Path) -> Dataset:
    series = write_ct_series(tmp_path / "ct", n_slices=1)
    ds = dcmread(next((tmp_path / "ct").rglob("*.dcm")))
    assert series  # the factory wrote the series it describes
    ds.SOPInstanceUID = EVIL_UID
    ds.file_meta.MediaStorageSOPInstanceUID = EVIL_UID
    return ds


def send(node: Node, ds: Dataset, calling: str) -> int | None:
    """C-STORE ``ds``; the status, or None when the node aborted or refused the association."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def assert_one_clean_line_per_record(log: bytes) -> None:
    assert b"\x1b" not in log and b"\x00" not in log
    for line in log.splitlines():
        assert RECORD_START.match(line) or line.startswith(b"  | "), f"not a log record: {line!r}"
    assert not CONTROLS.search(log.decode("utf-8"))


def test_a_c_store_with_escape_newline_and_nul_in_its_uid_logs_one_escaped_line_per_record(
    node: Node, tmp_path: Path, anything_goes: None
) -> None:
    before = node.log.stat().st_size
    send(node, evil_instance(tmp_path), "EVIL")  # its status is the UID check's business (finding 5), not this test's
    assert node.echo()  # the node is still up
    # pynetdicom's own record about the UID arrives in the log, escaped
    wait_for(lambda: b"\\x1b[31m\\n2026-12-02" in node.log.read_bytes()[before:], 30, "the record quoting the UID")
    log = node.log.read_bytes()
    assert_one_clean_line_per_record(log)
    assert b"\n2026-12-02 10:00:00,000 INFO 1 forged" not in log


def cli(node: Node, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}
    result = subprocess.run(
        [sys.executable, "-m", "pacs_agent", *args, "--config", str(node.config)],
        capture_output=True,
        check=False,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode("utf-8")


def test_events_and_status_print_stored_network_text_escaped(node: Node) -> None:
    with node.database() as db, db.session() as session, session.begin():
        record_event(
            session,
            "store_refused",
            level="WARNING",
            sop_instance_uid=EVIL_UID,
            ae_title=EVIL_AE,
            peer="127.0.0.1",
            status=0xA900,
            detail=f"SOP Instance UID {EVIL_UID} is not a valid UID",
            log=False,
        )
    for args in (("events",), ("events", "--kind", "store_refused"), ("status",)):
        output = cli(node, *args)
        assert not CONTROLS.search(output), f"pacs-agent {' '.join(args)}: {output!r}"
        assert "1.2.3\\x1b[31m\\n2026-12-02 10:00:00,000 INFO 1 forged: all good\\x00.4" in output
        assert not any(line.startswith("2026-12-02 10:00:00,000 INFO 1 forged") for line in output.splitlines())
    assert "aet=EVIL\\x1b[2J" in cli(node, "events")
    json_output = cli(node, "events", "--json")
    assert not CONTROLS.search(json_output) and "\\u001b[31m" in json_output
