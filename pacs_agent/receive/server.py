"""The receiving AE: which SOP classes and transfer syntaxes it accepts, and its server socket."""

from __future__ import annotations

import logging

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessP14,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.receive.handlers import ReceiveHandlers
from pacs_agent.receive.header import STORAGE_SOP_CLASSES
from pacs_agent.receive.spool import Spool

logger = logging.getLogger(__name__)

# Everything is stored as received; decoding happens in the worker (pydicom + pylibjpeg).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and the storage SOP classes of the node."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    ae.network_timeout = settings.node.network_timeout_seconds
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.node.network_timeout_seconds
    ae.maximum_associations = 32
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


class ReceiveServer:
    """Owns the listening socket of the receiving AE."""

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.handlers = ReceiveHandlers(settings, db, spool)
        self.ae = build_ae(settings)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start listening in background threads."""
        node = self.settings.node
        self._server = self.ae.start_server(
            (node.host, node.port),
            block=False,
            evt_handlers=self.handlers.bindings(),  # type: ignore[arg-type]
        )
        logger.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)

    def stop(self) -> None:
        """Stop accepting, let running associations end, close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
