"""Who may open an association: host and AE title allow-lists, the called AE title, limits.

:func:`check_request` is a pure function of ``[security]``, the node's AE title and what the
peer sent; :class:`AssociationLimiter` counts the associations that were let in. Each refusal is
a :class:`Refusal` with the A-ASSOCIATE-RJ fields to send and the reason to record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pacs_agent.config import SecuritySettings

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diagnostic.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
NO_REASON_GIVEN, CALLING_AET_NOT_RECOGNISED, CALLED_AET_NOT_RECOGNISED = 0x01, 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02  # with source 3 (service-provider, presentation related)


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, and the A-ASSOCIATE-RJ fields that say so."""

    reason: str
    result: int = REJECTED_PERMANENT
    source: int = SERVICE_USER
    diagnostic: int = NO_REASON_GIVEN


def check_request(
    security: SecuritySettings, node_ae_title: str, calling: str, called: str, address: str
) -> Refusal | None:
    """Decide whether an A-ASSOCIATE-RQ may proceed (the limits are checked afterwards).

    Parameters
    ----------
    security
        ``[security]`` of the node.
    node_ae_title
        ``[node] ae_title``.
    calling, called
        The calling and called AE titles of the request (trailing spaces are ignored).
    address
        The peer's IP address.

    Returns
    -------
    Refusal or None
        None when the association may proceed. Checked in order: ``allowed_hosts``, the calling AE
        title (``allowed_calling_aets`` / ``peers``), the host of a ``peers`` entry, the called AE
        title (``require_called_aet``).
    """
    calling, called = calling.strip(), called.strip()
    if not security.host_allowed(address):
        return Refusal(f"host {address} is not in [security] allowed_hosts")
    if not security.calling_aet_allowed(calling):
        lists = "allowed_calling_aets" + (" or peers" if security.peers else "")
        return Refusal(
            f"calling AE title {calling!r} is not in [security] {lists}", diagnostic=CALLING_AET_NOT_RECOGNISED
        )
    if not security.peer_host_allowed(calling, address):
        hosts = ", ".join(security.peer_hosts(calling) or ())
        return Refusal(
            f"calling AE title {calling!r} may only connect from {hosts} ([security] peers), not from {address}",
            diagnostic=CALLING_AET_NOT_RECOGNISED,
        )
    if security.require_called_aet and called != node_ae_title.strip():
        return Refusal(
            f"called AE title not recognised: {called!r} (this node is {node_ae_title!r}; "
            "[security] require_called_aet)",
            diagnostic=CALLED_AET_NOT_RECOGNISED,
        )
    return None


class AssociationLimiter:
    """Counts admitted associations, in total and per calling AE title (thread-safe).

    An admitted association holds its slot until :meth:`release`; a slot whose association thread
    has ended without a release (``is_alive`` returns False) is reclaimed at the next admission.
    """

    def __init__(self, max_total: int, max_per_aet: int) -> None:
        self.max_total = max_total
        self.max_per_aet = max_per_aet
        self._slots: dict[int, tuple[str, Callable[[], bool]]] = {}
        self._lock = threading.Lock()

    def admit(self, key: int, calling: str, is_alive: Callable[[], bool]) -> Refusal | None:
        """Take a slot for association ``key`` or return the limit it would exceed."""
        calling = calling.strip()
        with self._lock:
            self._slots = {k: v for k, v in self._slots.items() if v[1]()}
            if len(self._slots) >= self.max_total:
                return Refusal(
                    f"local limit exceeded: {len(self._slots)} associations are open "
                    f"([security] max_associations = {self.max_total})",
                    result=REJECTED_TRANSIENT,
                    source=SERVICE_PROVIDER_PRESENTATION,
                    diagnostic=LOCAL_LIMIT_EXCEEDED,
                )
            mine = sum(1 for title, _ in self._slots.values() if title == calling)
            if self.max_per_aet and mine >= self.max_per_aet:
                return Refusal(
                    f"local limit exceeded: calling AE title {calling!r} has {mine} associations open "
                    f"([security] max_associations_per_aet = {self.max_per_aet})",
                    result=REJECTED_TRANSIENT,
                    source=SERVICE_PROVIDER_PRESENTATION,
                    diagnostic=LOCAL_LIMIT_EXCEEDED,
                )
            self._slots[key] = (calling, is_alive)
            return None

    def release(self, key: int) -> None:
        """Give back the slot of association ``key`` (no-op when it holds none)."""
        with self._lock:
            self._slots.pop(key, None)

    def open_count(self) -> int:
        """Associations holding a slot now."""
        with self._lock:
            return len(self._slots)
