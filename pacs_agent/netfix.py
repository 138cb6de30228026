"""A fix for pynetdicom 3.0 leaving TCP sockets open.

``AssociationSocket._shutdown_socket`` calls ``shutdown()`` and then ``close()`` in one ``try``
block, so when ``shutdown()`` fails - the peer refused or reset the connection - the socket is
never closed; pynetdicom then drops its reference and the descriptor is only released by the
garbage collector (with a ResourceWarning). A node that retries an unreachable PACS for days
should not depend on that, so the shutdown here always closes. Imported for its effect by the
modules that open associations.
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.transport import AssociationSocket


def _shutdown_socket(self: AssociationSocket) -> None:
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# A deliberate monkeypatch of pynetdicom's method (see above); mypy refuses assignments to methods.
AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]
