"""STOW-RS sender against a small in-process HTTP server, response parsing, settings of a STOW-RS destination."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.config import Destination, settings_from_mapping
from pacs_agent.errors import ConfigError
from pacs_agent.send.stow import StowResponse, decide, multipart_body, parse_stow_response, stow_files
from tests.dicom_factory import write_ct_series
from tests.ports import free_port

SECRET = "Bearer s3cr3t-token-value"


def stow(url: str, **extra: Any) -> Destination:
    return Destination(name="web", type="stowrs", url=url, **extra)


# ---------------------------------------------------------------- settings


def test_stowrs_destination_parses() -> None:
    settings = settings_from_mapping(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
                {
                    "name": "web",
                    "type": "stowrs",
                    "url": "https://pacs.example.org/dicom-web",
                    "auth_header_env": "PACS_STOW_AUTH",
                    "timeout_seconds": 5,
                },
            ]
        }
    )
    dimse, web = settings.destinations
    assert dimse.type == "dimse" and dimse.peer == "h:104"
    assert web.type == "stowrs" and web.peer == "pacs.example.org:443" and web.timeout_seconds == 5
    assert stow("http://10.1.2.3:8042/dicom-web").peer == "10.1.2.3:8042"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "stowrs"}, "a STOW-RS destination needs url"),
        ({"type": "stowrs", "url": "ftp://x/dicom-web"}, "is not an http:// or https:// URL"),
        ({"type": "stowrs", "url": "https://user:pw@x/dicom-web"}, "url must not hold credentials"),
        ({"type": "stowrs", "url": "https://x/dw", "ae_title": "A", "port": 1}, "ae_title, port: not used by type"),
        ({"type": "stowrs", "url": "https://x/dw", "auth_header_env": "not a name"}, "not an environment variable"),
        ({"type": "stowrs", "url": "https://x/dw", "timeout_seconds": 0}, "timeout_seconds"),
        ({"ae_title": "A", "host": "h", "port": 1, "url": "https://x"}, "url and auth_header_env belong to"),
        ({"host": "h", "port": 1}, "missing: ae_title"),
        ({"type": "wado", "url": "https://x"}, "destinations.0.type"),
    ],
)
def test_invalid_destinations_are_reported(entry: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"destinations": [{"name": "d", **entry}]})
    assert any(expected in problem for problem in info.value.problems), info.value.problems


# ---------------------------------------------------------------- response parsing

ORTHANC_LIKE = {
    "00081190": {"vr": "UR", "Value": ["http://h/dicom-web/studies/1.2"]},
    "00081198": {
        "vr": "SQ",
        "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.9"]}, "00081197": {"vr": "US", "Value": [0xA900]}}],
    },
    "00081199": {
        "vr": "SQ",
        "Value": [
            {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
                "00081155": {"vr": "UI", "Value": ["1.2.3.1"]},
            },
            {"00081155": {"vr": "UI", "Value": ["1.2.3.2"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
        ],
    },
}


def test_json_response() -> None:
    response = parse_stow_response(json.dumps(ORTHANC_LIKE).encode(), "application/dicom+json")
    assert response == StowResponse(stored={"1.2.3.1": None, "1.2.3.2": 0xB000}, failed={"1.2.3.9": 0xA900})
    assert parse_stow_response(json.dumps([ORTHANC_LIKE]).encode()) == response


def test_xml_response() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel>
  <DicomAttribute tag="00081198" vr="SQ">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.9</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">49152</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>"""
    assert parse_stow_response(body, "application/dicom+xml") == StowResponse(
        stored={"1.2.3.1": None}, failed={"1.2.3.9": 0xC000}
    )


@pytest.mark.parametrize("body", [b"", b"   ", b"not json", b"<html><body>bad gateway</body>", b"[1, 2]", b'"x"'])
def test_unparseable_bodies_say_nothing_per_instance(body: bytes) -> None:
    assert parse_stow_response(body, "text/html") == StowResponse()


def test_decide_per_instance() -> None:
    dest = stow("http://h/dicom-web", auth_header_env="TOKEN")
    response = StowResponse(stored={"ok": None, "warn": 0xB000}, failed={"bad": 0xA700, "why": None})
    uids = ["ok", "warn", "bad", "why", "unlisted"]
    for status in (200, 202, 409):
        decided = dict(zip(uids, decide(uids, status, response, dest), strict=True))
        assert decided["ok"][:2] == (True, 0x0000)
        assert decided["warn"][:2] == (True, 0xB000)
        assert decided["bad"] == (False, 0xA700, f"HTTP {status}: refused 0xA700 (out of resources)")
        assert decided["why"][:2] == (False, None)
        assert decided["unlisted"][0] is (status == 200)
    [(ok, status, reason)] = decide(["x"], 401, StowResponse(), dest)
    assert not ok and status is None and "$TOKEN" in reason
    [(ok, _, reason)] = decide(["x"], 503, StowResponse(), dest)
    assert not ok and reason.startswith("HTTP 503 Service Unavailable")


def test_multipart_body_parses_back() -> None:
    body = multipart_body([b"\x00DICM-one", b"two\r\n--not-a-boundary"], "b0undary")
    message = BytesParser(policy=HTTP).parsebytes(
        b'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary\r\n\r\n' + body
    )
    parts = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert parts == [b"\x00DICM-one", b"two\r\n--not-a-boundary"]
    assert all(part.get_content_type() == "application/dicom" for part in message.iter_parts())


# ---------------------------------------------------------------- against an HTTP server

Behaviour = Callable[[BaseHTTPRequestHandler, bytes, list[str]], None]


class FakeStow:
    """A STOW-RS endpoint on a free port; ``behaviour`` answers each POST, every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour: Behaviour = answer(200)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = BytesParser(policy=HTTP).parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
                )
                from io import BytesIO

                from pydicom import dcmread

                uids = [str(dcmread(BytesIO(p.get_payload(decode=True))).SOPInstanceUID) for p in message.iter_parts()]
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "uids": uids})
                fake.behaviour(self, body, uids)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def answer(
    status: int,
    *,
    failed: tuple[str, ...] = (),
    listed: bool = True,
    headers: dict[str, str] | None = None,
    hold: threading.Event | None = None,
) -> Behaviour:
    """Answer ``status``; with ``hold``, only once the test sets it (the server stays silent until then)."""

    def respond(handler: BaseHTTPRequestHandler, _body: bytes, uids: list[str]) -> None:
        if hold is not None:
            hold.wait(30)
        item = lambda uid: {"00081155": {"vr": "UI", "Value": [uid]}}  # noqa: E731
        data = {
            "00081198": {
                "vr": "SQ",
                "Value": [item(u) | {"00081197": {"vr": "US", "Value": [0xC000]}} for u in failed],
            },
            "00081199": {"vr": "SQ", "Value": [item(u) for u in uids if u not in failed and listed]},
        }
        payload = json.dumps(data).encode()
        try:
            handler.send_response(status)
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.send_header("Content-Type", "application/dicom+json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    return respond


@pytest.fixture
def server() -> Iterator[FakeStow]:
    fake = FakeStow()
    yield fake
    fake.close()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ct", n_slices=3).paths


def test_all_stored_with_the_auth_header(server: FakeStow, files: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    outcomes = stow_files(stow(server.url, auth_header_env="STOW_TOKEN"), files, environ={"STOW_TOKEN": SECRET})
    assert [(o.ok, o.status) for o in outcomes] == [(True, 0x0000)] * 3
    [request] = server.requests
    assert request["path"] == "/dicom-web/studies"
    assert request["headers"]["Authorization"] == SECRET
    assert request["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert "application/dicom+json" in request["headers"]["Accept"]
    assert sorted(request["uids"]) == sorted(str(__import__("pydicom").dcmread(f).SOPInstanceUID) for f in files)
    assert SECRET not in caplog.text and "s3cr3t" not in " ".join(o.reason for o in outcomes)


def test_partial_failure_is_per_instance(server: FakeStow, files: list[Path]) -> None:
    from pydicom import dcmread

    bad = str(dcmread(files[1]).SOPInstanceUID)
    server.behaviour = answer(202, failed=(bad,))
    outcomes = {o.path: o for o in stow_files(stow(server.url), files)}
    assert outcomes[files[1]].ok is False and outcomes[files[1]].status == 0xC000
    assert "refused 0xC000 (cannot understand)" in outcomes[files[1]].reason
    assert outcomes[files[0]].ok and outcomes[files[2]].ok


def test_202_without_a_list_is_not_taken_as_stored(server: FakeStow, files: list[Path]) -> None:
    server.behaviour = answer(202, listed=False)
    assert not any(o.ok for o in stow_files(stow(server.url), files))


def test_unauthorised(server: FakeStow, files: list[Path]) -> None:
    server.behaviour = answer(401, listed=False)
    outcomes = stow_files(stow(server.url, auth_header_env="STOW_TOKEN"), files, environ={"STOW_TOKEN": "Bearer x"})
    assert {o.reason for o in outcomes} == {
        "HTTP 401: not authorised (check the Authorization value in $STOW_TOKEN) - not confirmed as stored"
    }


def test_missing_auth_variable_sends_nothing(server: FakeStow, files: list[Path]) -> None:
    outcomes = stow_files(stow(server.url, auth_header_env="STOW_TOKEN"), files, environ={})
    assert {o.reason for o in outcomes} == {"environment variable STOW_TOKEN (auth_header_env) is not set"}
    assert server.requests == []


def test_redirect_is_not_followed(server: FakeStow, files: list[Path]) -> None:
    server.behaviour = answer(307, listed=False, headers={"Location": server.url + "/elsewhere/studies"})
    outcomes = stow_files(stow(server.url, auth_header_env="T"), files, environ={"T": SECRET})
    assert len(server.requests) == 1  # the credentials were not sent on to the new location
    assert all(not o.ok and "redirected (not followed" in o.reason for o in outcomes)


def test_timeout(server: FakeStow, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender gives up after timeout_seconds on a server that holds its answer.

    The server answers Success only when released, after stow_files returned: a sender that waited for the
    answer would report the instances as stored.
    """
    import pacs_agent.send.stow as stow_module

    requested: list[float] = []
    open_url = stow_module._OPENER.open

    def recording_open(request: Any, *args: Any, timeout: float, **kwargs: Any) -> Any:
        requested.append(timeout)
        return open_url(request, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(stow_module._OPENER, "open", recording_open)
    release = threading.Event()
    server.behaviour = answer(200, hold=release)
    try:
        outcomes = stow_files(stow(server.url), files, timeout_seconds=0.5)
    finally:
        release.set()
    assert requested == [0.5]  # the socket timeout is the configured one
    assert len(server.requests) == 1
    assert all(not o.ok and o.reason.startswith("no answer from 127.0.0.1:") for o in outcomes)
    assert all(o.reason.endswith("within 0.5 s") for o in outcomes)


def test_connection_refused(files: list[Path]) -> None:
    port = free_port()
    outcomes = stow_files(stow(f"http://127.0.0.1:{port}/dicom-web"), files)
    assert all(not o.ok and o.reason.startswith(f"cannot connect to 127.0.0.1:{port}") for o in outcomes)


def test_unreadable_file_does_not_stop_the_others(server: FakeStow, files: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    outcomes = {o.path: o for o in stow_files(stow(server.url), [broken, *files])}
    assert not outcomes[broken].ok and outcomes[broken].reason.startswith("cannot read result file")
    assert all(outcomes[f].ok for f in files)


def test_many_files_are_sent_in_chunks(server: FakeStow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pacs_agent.send.stow.MAX_PARTS", 2)
    many = write_ct_series(tmp_path / "many", n_slices=5).paths
    assert all(o.ok for o in stow_files(stow(server.url), many))
    assert [len(r["uids"]) for r in server.requests] == [2, 2, 1]


def test_a_dimse_destination_is_refused() -> None:
    with pytest.raises(ValueError, match='Argument "destination" must be a STOW-RS destination'):
        stow_files(Destination(name="p", ae_title="P", host="h", port=1), [])
