"""C-STORE SCU: send result files to one destination and check every returned status."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_agent import netfix  # noqa: F401  (closes sockets pynetdicom would leak)
from pacs_agent.config import Destination
from pacs_agent.errors import ConfigError
from pacs_agent.tls import RecordingContext, client_context, describe_tls_error

logger = logging.getLogger(__name__)

# Warning statuses of the Storage service: the object was stored (possibly coerced).
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: ``status`` is None when no response came back."""

    path: Path
    ok: bool
    status: int | None
    reason: str


def _describe(status: int) -> str:
    if status == 0x0000:
        return "Success"
    if status in WARNING_STATUSES:
        return f"Warning 0x{status:04X} (stored)"
    if status & 0xFF00 == 0xA700:
        return f"Refused: out of resources (0x{status:04X})"
    if status & 0xFF00 == 0xA900:
        return f"Error: data set does not match SOP class (0x{status:04X})"
    if status & 0xF000 == 0xC000:
        return f"Error: cannot understand (0x{status:04X})"
    return f"Failure status 0x{status:04X}"


def _rejection(destination: Destination, result: int | None, source: int | None, diagnostic: int | None) -> str:
    """Why the destination rejected our association, from its A-ASSOCIATE-RJ fields."""
    who = f"association rejected by {destination.ae_title}"
    if result == 0x02 and source == 0x03 and diagnostic == 0x02:
        return f"{who}: local limit exceeded (it is busy; retried later)"
    if source == 0x01 and diagnostic == 0x03:
        return f"{who}: calling AE title not recognised (declare our AE title in the destination)"
    if source == 0x01 and diagnostic == 0x07:
        return f"{who}: called AE title not recognised (check destinations.{destination.name}.ae_title)"
    return f"{who} (check our AE title in its config)"


def store_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout_seconds: float = 30.0,
) -> list[SendOutcome]:
    """Send ``paths`` to ``destination`` in one association.

    Returns one outcome per path. When the association cannot be established every path gets a
    failed outcome with the reason (refused, unreachable, ...); nothing raises for network
    trouble.
    """
    if (
        destination.type != "dimse"
        or destination.ae_title is None
        or destination.host is None
        or destination.port is None
    ):
        raise ValueError(f'Argument "destination" must be a DIMSE destination, not type {destination.type!r}.')
    datasets = []
    outcomes: list[SendOutcome] = []
    for path in paths:
        try:
            datasets.append((path, dcmread(path)))
        except Exception as exc:  # unreadable result file: report, do not stop the others
            outcomes.append(SendOutcome(path, False, None, f"cannot read result file: {exc}"))
    if not datasets:
        return outcomes
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_seconds
    ae.dimse_timeout = timeout_seconds
    ae.network_timeout = timeout_seconds
    ae.connection_timeout = min(timeout_seconds, 10.0)
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    context: RecordingContext | None = None
    if destination.tls:
        try:  # built per association: renewed certificate files are used without a restart
            context = client_context(destination)
        except ConfigError as exc:
            reason = "TLS configuration: " + "; ".join(exc.problems)
            return outcomes + [SendOutcome(path, False, None, reason) for path, _ in datasets]
    connected: list[bool] = []  # pynetdicom reports a refused TCP connection as an abort: tell them apart
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
        tls_args=(context, destination.host) if context is not None else None,
    )
    if not assoc.is_established:
        if context is not None and context.last_error is not None:
            reason = (
                f"TLS handshake with {destination.host}:{destination.port} failed: "
                f"{describe_tls_error(context.last_error)}"
            )
        elif assoc.is_rejected:
            answer = assoc.acceptor.primitive
            reason = _rejection(
                destination,
                getattr(answer, "result", None),
                getattr(answer, "result_source", None),
                getattr(answer, "diagnostic", None),
            )
        elif assoc.is_aborted and connected:
            reason = f"association aborted by {destination.ae_title}"
        else:
            reason = f"cannot connect to {destination.host}:{destination.port}"
        return outcomes + [SendOutcome(path, False, None, reason) for path, _ in datasets]
    lost = False  # a C-STORE without a response: pynetdicom has aborted, or is aborting, the association
    try:
        for path, ds in datasets:
            # after a lost response the association may still look established for a moment (the abort is
            # handled on pynetdicom's own thread): sending more would only fail the same way
            if lost or not assoc.is_established:
                outcomes.append(SendOutcome(path, False, None, "association ended before this object was sent"))
                continue
            try:
                response = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # e.g. no accepted presentation context
                outcomes.append(SendOutcome(path, False, None, f"not sent: {exc}"))
                continue
            status = response.get("Status") if response else None
            if status is None:
                outcomes.append(SendOutcome(path, False, None, "no response (timeout or connection lost)"))
                lost = True
                continue
            code = int(status)
            ok = code == 0x0000 or code in WARNING_STATUSES
            outcomes.append(SendOutcome(path, ok, code, _describe(code)))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
