"""The native upper layer's encoders and decoders against pydicom's and pynetdicom's own."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pacs_agent.receive.handlers import _status
from pacs_agent.receive.upper_layer import (
    C_STORE_RSP,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    ProtocolError,
    _abort_pdu,
    _response,
    decode_command,
    file_meta,
)


def test_file_meta_is_what_pydicom_writes_with_the_calling_ae_title() -> None:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = "CT_SCANNER_7"
    buffer = BytesIO()
    write_file_meta_info(buffer, meta)
    ours = file_meta(
        sop_class_uid=CTImageStorage,
        sop_instance_uid=sop_uid,
        transfer_syntax=ExplicitVRLittleEndian,
        source_ae_title="CT_SCANNER_7",
    )
    assert bytes(ours) == buffer.getvalue()


def test_a_c_store_request_encoded_by_pynetdicom_is_decoded() -> None:
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4.5"
    encoded = encode(command, True, True)
    assert encoded is not None
    elements = decode_command(encoded)
    assert elements[0x0100] == b"\x01\x00"
    assert elements[0x0110] == b"\x07\x00"
    assert elements[0x1000].rstrip(b"\0") == b"1.2.3.4.5"


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x01\x04\x00",  # ends inside an element header
        b"\x08\x00\x10\x00\x02\x00\x00\x00AB",  # group 0008 in a command set
        b"\x00\x00\x00\x01\x10\x00\x00\x00AB",  # a length past the end
    ],
)
def test_broken_command_sets_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(data)


def test_a_refusal_response_carries_status_comment_and_offending_element() -> None:
    status = _status(0xC210, "incomplete dataset: (7FE0,0010) is cut short", 0x7FE00010)
    encoded = _response(C_STORE_RSP, CTImageStorage, 9, status, "1.2.3.4.5")
    response = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert response.CommandGroupLength == len(encoded) - 12
    assert response.CommandField == C_STORE_RSP
    assert response.MessageIDBeingRespondedTo == 9
    assert response.CommandDataSetType == 0x0101
    assert response.Status == 0xC210
    assert response.ErrorComment == "incomplete dataset: (7FE0,0010) is cut short"
    assert int(response.OffendingElement) == 0x7FE00010
    assert response.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert response.AffectedSOPClassUID == CTImageStorage
    # pynetdicom encodes the same elements to the same bytes
    assert encode(response, True, True) == encoded


def test_abort_pdu_layout() -> None:
    assert _abort_pdu(0x06) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
    assert _abort_pdu(0x06, source=0x00) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x00, 0x00])
