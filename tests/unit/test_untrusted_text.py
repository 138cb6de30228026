"""Untrusted text is printed as one line with visible escapes: the helper, the log formatter, CLI renderers."""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacs_agent.events_cli import format_event
from pacs_agent.logs import CONTINUATION, FORMAT, QUIET_LIBRARIES, EscapingFormatter, configure_logging
from pacs_agent.send.cli import _format_table
from pacs_agent.status import format_status
from pacs_agent.text import printable

EVIL_UID = "1.2.3\x1b[31m\n2026-12-02 10:00:00 INFO forged: all good\x00.4"
RAW_CONTROLS = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} | {"\u2028", "\u2029", "\u202e"}


def assert_clean(text: str) -> None:
    """No control character (other than the newline between lines), no line separator, no override."""
    found = {c for c in text.replace("\n", "") if c in RAW_CONTROLS}
    assert not found, f"raw control characters {sorted(map(hex, map(ord, found)))} in {text!r}"


def test_printable_shows_escape_newline_and_nul_visibly() -> None:
    assert printable(EVIL_UID) == "1.2.3\\x1b[31m\\n2026-12-02 10:00:00 INFO forged: all good\\x00.4"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\rb\tc", "a\\rb\\tc"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # the one-byte C1 form of ESC [
        ("line\u2028sep", "line\\u2028sep"),
        ("abc\u202edcba", "abc\\u202edcba"),  # right-to-left override
        ("bytes\udcff", "bytes\\udcff"),  # an undecodable byte kept by surrogateescape
    ],
)
def test_printable_escapes_every_kind_of_control(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_keeps_ordinary_text_of_any_script_unchanged() -> None:
    text = "Zürich CT 1.2.840.10008 胸部 Ωμέγα path\\x1b (a literal backslash) ,;:'\""
    assert printable(text) is text


def test_printable_of_a_non_string_uses_its_text() -> None:
    assert printable(ValueError("bad\nuid")) == "bad\\nuid"
    assert printable(42) == "42"


@given(st.text())
def test_printable_is_always_one_clean_line(text: str) -> None:
    shown = printable(text)
    assert "\n" not in shown
    assert_clean(shown)
    shown.encode("utf-8")  # never a lone surrogate left


def configure_into(buffer: io.StringIO) -> None:
    """``configure_logging`` with its stdout handler writing into ``buffer``."""
    old_stdout = sys.stdout
    sys.stdout = buffer  # configure_logging binds its handler to sys.stdout
    try:
        configure_logging("INFO")
    finally:
        sys.stdout = old_stdout


@pytest.fixture
def stream_root_logging() -> Iterator[io.StringIO]:
    """The node's logging set-up writing into a buffer; the old logging set-up restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_hook, saved_showwarning = threading.excepthook, warnings.showwarning
    libraries = [logging.getLogger(name) for name in QUIET_LIBRARIES]
    saved_libraries = [(lg.level, list(lg.handlers), lg.propagate) for lg in libraries]
    buffer = io.StringIO()
    configure_into(buffer)
    try:
        yield buffer
    finally:
        logging.captureWarnings(False)
        warnings.showwarning = saved_showwarning
        threading.excepthook = saved_hook
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for lg, (level, handlers, propagate) in zip(libraries, saved_libraries, strict=True):
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate


def test_a_pynetdicom_record_with_escape_newline_and_nul_is_one_escaped_line(
    stream_root_logging: io.StringIO,
) -> None:
    # the very message pynetdicom logs when it decodes a C-STORE-RQ with a non-conformant UID
    logging.getLogger("pynetdicom.utils").warning("Non-conformant 'Affected SOP Instance UID' value '%s'", EVIL_UID)
    output = stream_root_logging.getvalue()
    assert output.count("\n") == 1
    assert_clean(output)
    assert "value '1.2.3\\x1b[31m\\n2026-12-02 10:00:00 INFO forged: all good\\x00.4'" in output
    assert " WARNING " in output and "pynetdicom.utils: Non-conformant" in output


def test_a_library_s_own_stream_handler_is_removed_so_its_records_are_escaped_too(
    stream_root_logging: io.StringIO,
) -> None:
    from pynetdicom import debug_logger

    debug_logger()  # pynetdicom adds a StreamHandler of its own, which would write records raw
    own = [h for h in logging.getLogger("pynetdicom").handlers if not isinstance(h, logging.NullHandler)]
    assert own
    raw = io.StringIO()
    for handler in own:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(raw)
    buffer = io.StringIO()
    configure_into(buffer)  # the node's start-up, after whatever a library did
    logging.getLogger("pynetdicom.dimse").warning("bad AE %s", "X\x1b[2J")
    assert raw.getvalue() == ""
    assert buffer.getvalue().endswith("pynetdicom.dimse: bad AE X\\x1b[2J\n")


def test_a_python_warning_is_logged_escaped_instead_of_raw_on_stderr(stream_root_logging: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings restored showwarning on entry: capture again inside
        warnings.warn(f"Invalid value for VR UI: '{EVIL_UID}'", UserWarning, stacklevel=1)
    output = stream_root_logging.getvalue()
    assert "py.warnings" in output
    assert "\\x1b[31m\\n" in output
    assert output.count("\n") == 1
    assert_clean(output)


def test_a_traceback_keeps_its_lines_but_each_is_indented_and_escaped() -> None:
    formatter = EscapingFormatter(FORMAT)
    try:
        raise ValueError(f"cannot use UID {EVIL_UID}")
    except ValueError:
        record = logging.LogRecord(
            "pacs_agent.receive", logging.ERROR, __file__, 1, "store of %s failed", (EVIL_UID,), sys.exc_info()
        )
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert "store of 1.2.3\\x1b[31m\\n2026" in first
    assert rest and all(line.startswith(CONTINUATION) for line in rest)
    assert any("ValueError: cannot use UID 1.2.3\\x1b[31m" in line for line in rest)
    assert_clean(text)


EVENT = {
    "id": 1,
    "at": "2026-12-02T10:00:00+00:00",
    "level": "WARNING",
    "kind": "store_refused",
    "study_instance_uid": None,
    "sop_instance_uid": EVIL_UID,
    "job_id": None,
    "ae_title": "EVIL\x1b]0;title\x07",
    "peer": "127.0.0.1",
    "status": 0xA900,
    "detail": f"SOP Instance UID {EVIL_UID!s} is not a valid UID",
    "duration_seconds": None,
}


def test_an_event_line_shows_network_text_escaped() -> None:
    line = format_event(EVENT)
    assert "\n" not in line
    assert_clean(line)
    assert "sop=1.2.3\\x1b[31m\\n2026" in line and "aet=EVIL\\x1b]0;title\\x07" in line


def test_status_text_shows_stored_text_escaped_one_item_per_line() -> None:
    study = {
        "study_instance_uid": EVIL_UID,
        "state": "failed",
        "reason": "bad\ninput\x00",
        "series_notes": [],
        "series": [{"series_instance_uid": "1.2\x1b[1m", "modality": "CT", "instances": 1}],
        "jobs": [
            {
                "id": 3,
                "method": "m1",
                "state": "dead",
                "attempts": 3,
                "max_attempts": 3,
                "last_error": "Traceback (most recent call last):\n  File x\nOSError: \x1b[31mdisk",
                "finished_at": None,
            }
        ],
        "deliveries": [
            {
                "destination": "pacs",
                "state": "pending",
                "attempts": 1,
                "last_error": "refused\n\x1b[0m",
                "next_attempt_at": None,
            }
        ],
    }
    status = {
        "jobs_by_state": {"dead": 1},
        "studies": [study],
        "recent_problems": [{k: EVENT[k] for k in ("at", "kind", "ae_title", "peer", "status", "detail")}],
    }
    text = format_status(status)
    assert_clean(text)
    lines = text.split("\n")
    assert any(line.startswith("study 1.2.3\\x1b[31m\\n2026") for line in lines)
    assert "  why: bad\\ninput\\x00" in lines
    assert not any(line.startswith(("2026-12-02 10:00:00 INFO forged", "  File x", "OSError")) for line in lines)


def test_send_list_table_shows_stored_text_escaped() -> None:
    row = {
        "id": 7,
        "destination": "pacs",
        "state": "dead",
        "attempts": 5,
        "kind": "sr",
        "sop_instance_uid": EVIL_UID,
        "created_at": "2026-12-02T10:00:00",
        "next_attempt_at": None,
        "delivered_at": None,
        "last_status": 0xA700,
        "last_error": "status 0xA700\n\x1b[2Jforged",
    }
    text = _format_table([row])
    assert_clean(text)
    assert text.count("\n") == 1  # the table's own second line for the error
    assert text.endswith("        status 0xA700\\n\\x1b[2Jforged")


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")  # pydicom, about the ESC: expected here
def test_show_prints_an_sr_s_hostile_text_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pacs_agent.show import show

    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [concept]
    item.TextValue = "lesion\x1b]0;pwned\x07 \x1b[2J"
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [title]
    ds.ContentSequence = [item]
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)

    assert show(tmp_path / "sr.dcm") == 0
    output = capsys.readouterr().out
    assert_clean(output)
    assert "lesion\\x1b]0;pwned\\x07 \\x1b[2J" in output
