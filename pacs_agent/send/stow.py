"""STOW-RS: send result files to a DICOMweb server and check the outcome of every instance.

One ``POST {url}/studies`` per chunk of files, as ``multipart/related; type="application/dicom"``
(PS3.18 10.5). The answer is read per instance: the Referenced SOP Sequence (0008,1199) lists what
the server stored (with a Warning Reason (0008,1196) where it coerced something), the Failed SOP
Sequence (0008,1198) what it refused (with the Failure Reason (0008,1197), a DICOM status). An
instance the answer does not mention counts as stored only when the server answered 200 OK.
Network trouble never raises: every file gets a :class:`~pacs_agent.send.scu.SendOutcome`.

The ``Authorization`` header comes from the environment variable named by the destination's
``auth_header_env``; it is sent only to the configured URL (redirects are not followed) and never
appears in a log line, an event or an outcome.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread

from pacs_agent.config import Destination
from pacs_agent.send.scu import WARNING_STATUSES, SendOutcome

logger = logging.getLogger(__name__)

MAX_PARTS = 25
"""Most instances in one request."""
MAX_BYTES = 64 * 1024 * 1024
"""Largest request body (a single larger file is still sent alone)."""

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _failure_text(reason: int) -> str:
    """Meaning of a Failure Reason (PS3.18 Table 10.5.3-2 and the Storage statuses of PS3.4)."""
    if reason == 0x0110:
        return "processing failure"
    if reason == 0x0122:
        return "SOP class not supported"
    if reason == 0xC122:
        return "transfer syntax not supported"
    if reason & 0xFF00 == 0xA700:
        return "out of resources"
    if reason & 0xFF00 == 0xA900:
        return "data set does not match SOP class"
    if reason & 0xF000 == 0xC000:
        return "cannot understand"
    return "failure"


@dataclass(frozen=True)
class StowResponse:
    """What a STOW-RS answer says about each instance, by SOP Instance UID.

    ``stored`` maps to the Warning Reason (None when stored without warning); ``failed`` maps to
    the Failure Reason (None when the server gave none).
    """

    stored: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int | None] = field(default_factory=dict)


def _json_int(element: Mapping[str, Any] | None) -> int | None:
    values = (element or {}).get("Value") or []
    try:
        return int(values[0]) if values else None
    except (TypeError, ValueError):
        return None


def _json_items(body: Mapping[str, Any], tag: str, reason_tag: str) -> dict[str, int | None]:
    items: dict[str, int | None] = {}
    for item in (body.get(tag) or {}).get("Value") or []:
        if not isinstance(item, Mapping):
            continue
        uids = (item.get(_REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        if uids and isinstance(uids[0], str):
            items[uids[0]] = _json_int(item.get(reason_tag))
    return items


def _xml_items(root: ET.Element, tag: str, reason_tag: str) -> dict[str, int | None]:
    items: dict[str, int | None] = {}
    for sequence in root.iter("DicomAttribute"):
        if sequence.get("tag") != tag:
            continue
        for item in sequence.findall("Item"):
            uid = reason = None
            for attribute in item.findall("DicomAttribute"):
                value = attribute.findtext("Value")
                if attribute.get("tag") == _REFERENCED_SOP_INSTANCE_UID:
                    uid = value.strip() if value else None
                elif attribute.get("tag") == reason_tag and value:
                    try:
                        reason = int(value.strip())
                    except ValueError:
                        reason = None
            if uid:
                items[uid] = reason
    return items


def parse_stow_response(body: bytes, content_type: str | None = None) -> StowResponse:
    """Read a STOW-RS response body (``application/dicom+json`` or ``application/dicom+xml``).

    A body that is empty or cannot be parsed yields an empty :class:`StowResponse` (nothing is
    known per instance); the caller then decides by the HTTP status alone.
    """
    text = body.strip()
    if not text:
        return StowResponse()
    if text.startswith(b"<") or "xml" in (content_type or ""):
        try:
            root = ET.fromstring(text)  # noqa: S314 - the configured PACS, no DTD/entities are expanded
        except ET.ParseError:
            return StowResponse()
        return StowResponse(
            stored=_xml_items(root, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON),
            failed=_xml_items(root, _FAILED_SOP_SEQUENCE, _FAILURE_REASON),
        )
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return StowResponse()
    if isinstance(data, list):  # some servers wrap the one response data set in an array
        data = data[0] if data and isinstance(data[0], Mapping) else {}
    if not isinstance(data, Mapping):
        return StowResponse()
    return StowResponse(
        stored=_json_items(data, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON),
        failed=_json_items(data, _FAILED_SOP_SEQUENCE, _FAILURE_REASON),
    )


def _http_reason(status: int, destination: Destination) -> str:
    if status in (401, 403):
        hint = (
            f"check the Authorization value in ${destination.auth_header_env}"
            if destination.auth_header_env
            else "the server wants credentials: set auth_header_env"
        )
        return f"HTTP {status}: not authorised ({hint})"
    if status == 404:
        return f"HTTP 404: {destination.url}/studies not found (is url the DICOMweb base?)"
    if status == 413:
        return "HTTP 413: request too large for the server"
    if status == 415:
        return "HTTP 415: the server does not take application/dicom"
    if 300 <= status < 400:
        return f"HTTP {status}: redirected (not followed; set url to the final address)"
    name = http.client.responses.get(status, "")
    return f"HTTP {status} {name}".rstrip()


def decide(
    uids: Sequence[str], http_status: int, response: StowResponse, destination: Destination
) -> list[tuple[bool, int | None, str]]:
    """Decide per instance (in the order of ``uids``): ``(stored, DICOM status, reason)``.

    Listed in the Referenced SOP Sequence: stored (status 0x0000, or the warning reason). Listed
    in the Failed SOP Sequence: failed with its failure reason. Not listed: stored only when the
    server answered 200 OK, else failed with the HTTP status as the reason.
    """
    decisions: list[tuple[bool, int | None, str]] = []
    for uid in uids:
        if uid in response.stored:
            warning = response.stored[uid]
            if warning:
                known = " (stored)" if warning in WARNING_STATUSES else " (stored with a warning)"
                decisions.append((True, warning, f"HTTP {http_status}: warning 0x{warning:04X}{known}"))
            else:
                decisions.append((True, 0x0000, f"HTTP {http_status}: stored"))
        elif uid in response.failed:
            reason = response.failed[uid]
            if reason is None:
                decisions.append((False, None, f"HTTP {http_status}: refused (no failure reason given)"))
            else:
                text = _failure_text(reason)
                decisions.append((False, reason, f"HTTP {http_status}: refused 0x{reason:04X} ({text})"))
        elif http_status == 200:
            decisions.append((True, 0x0000, "HTTP 200: stored (not listed per instance)"))
        else:
            decisions.append((False, None, _http_reason(http_status, destination) + " - not confirmed as stored"))
    return decisions


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: the Authorization header must go to the configured URL only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class _Part:
    path: Path
    sop_instance_uid: str
    data: bytes


def _chunks(parts: Sequence[_Part]) -> Iterator[list[_Part]]:
    chunk: list[_Part] = []
    size = 0
    for part in parts:
        if chunk and (len(chunk) >= MAX_PARTS or size + len(part.data) > MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(part)
        size += len(part.data)
    if chunk:
        yield chunk


def multipart_body(payloads: Sequence[bytes], boundary: str) -> bytes:
    """``multipart/related`` body with one ``application/dicom`` part per Part 10 file."""
    delimiter = f"--{boundary}".encode()
    pieces: list[bytes] = []
    for payload in payloads:
        pieces += [delimiter, b"\r\nContent-Type: application/dicom\r\n\r\n", payload, b"\r\n"]
    pieces += [delimiter, b"--\r\n"]
    return b"".join(pieces)


def _post(
    destination: Destination, parts: Sequence[_Part], authorization: str | None, timeout_seconds: float
) -> tuple[int | None, bytes, str | None, str]:
    """POST one chunk; returns ``(HTTP status or None, body, content type, transport error)``."""
    boundary = f"pacs-agent-{uuid.uuid4().hex}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json, application/json;q=0.9, application/dicom+xml;q=0.5",
    }
    if authorization is not None:
        headers["Authorization"] = authorization
    body = multipart_body([part.data for part in parts], boundary)
    url = f"{(destination.url or '').rstrip('/')}/studies"  # http(s) only: checked by the settings
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with _OPENER.open(request, timeout=timeout_seconds) as response:
            return response.status, response.read(), response.headers.get("Content-Type"), ""
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                payload = exc.read()
            except (OSError, http.client.HTTPException):
                payload = b""
            return exc.code, payload, exc.headers.get("Content-Type") if exc.headers else None, ""
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError | socket.timeout):
            return None, b"", None, f"no answer from {destination.peer} within {timeout_seconds:g} s"
        return None, b"", None, f"cannot connect to {destination.peer}: {exc.reason}"
    except TimeoutError:
        return None, b"", None, f"no answer from {destination.peer} within {timeout_seconds:g} s"
    except (http.client.HTTPException, OSError) as exc:
        return None, b"", None, f"connection to {destination.peer} lost: {type(exc).__name__}"


def stow_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    timeout_seconds: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> list[SendOutcome]:
    """Send ``paths`` to the STOW-RS ``destination``; one outcome per path, in no fixed order.

    Parameters
    ----------
    destination
        A destination with ``type = "stowrs"``.
    paths
        DICOM Part 10 files, sent as they are.
    timeout_seconds
        Socket timeout of each request.
    environ
        Where ``auth_header_env`` is looked up (default ``os.environ``).

    Returns
    -------
    list of SendOutcome
        ``status`` is the DICOM status the server gave for the instance (0x0000 when stored
        without warning), or None when the answer did not say (network error, HTTP error).
    """
    if destination.type != "stowrs":
        raise ValueError(f'Argument "destination" must be a STOW-RS destination, not type {destination.type!r}.')
    outcomes: list[SendOutcome] = []
    authorization: str | None = None
    if destination.auth_header_env:
        authorization = (os.environ if environ is None else environ).get(destination.auth_header_env)
        if not authorization:
            reason = f"environment variable {destination.auth_header_env} (auth_header_env) is not set"
            return [SendOutcome(path, False, None, reason) for path in paths]
    parts: list[_Part] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            parts.append(_Part(path, str(header.SOPInstanceUID), data))
        except Exception as exc:  # unreadable result file: report, do not stop the others
            outcomes.append(SendOutcome(path, False, None, f"cannot read result file: {exc}"))
    for chunk in _chunks(parts):
        status, body, content_type, error = _post(destination, chunk, authorization, timeout_seconds)
        if status is None:
            outcomes += [SendOutcome(part.path, False, None, error) for part in chunk]
            continue
        response = parse_stow_response(body, content_type)
        decisions = decide([part.sop_instance_uid for part in chunk], status, response, destination)
        outcomes += [SendOutcome(part.path, *decision) for part, decision in zip(chunk, decisions, strict=True)]
        logger.debug("STOW-RS to %s: HTTP %d for %d instance(s)", destination.name, status, len(chunk))
    return outcomes
