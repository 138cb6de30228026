"""Access control of the receiving node, as real processes: AE titles bound to hosts, the called AE
title, association limits, the largest instance, and file modes of everything a receive run writes.

Every refusal must reach the sender as the right DICOM answer and be recorded with its reason.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Instance
from tests.integration.peers import Node, Nodes, storescu, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(module_nodes: Nodes) -> Node:
    """One receiving node for the module's tests; its counts and events add up from test to test."""
    return module_nodes.start(
        "scp",
        extra_config=(
            "[security]\n"
            'allowed_calling_aets = ["ECHOSCU", "PYNETDICOM", "BUSY"]\n'
            'peers = [{ ae_title = "PACS_MAIN", hosts = ["127.0.0.1", "10.1.2.3"] },\n'
            '         { ae_title = "CT_FAR", hosts = ["10.99.0.0/16"] }]\n'
            "max_associations = 3\n"
            "max_associations_per_aet = 2\n"
            "max_instance_mb = 1\n"
        ),
    )


def rejections(node: Node) -> list[Event]:
    return node.scalars(select(Event).where(Event.kind == "association_rejected").order_by(Event.id))


def rejection_after(node: Node, before: int) -> Event:
    """The first association_rejected event after the first ``before`` ones (it is written just after the answer)."""
    return wait_for(lambda: rejections(node)[before:], 10, "an association_rejected event")[0]


def instances(node: Node) -> int:
    return int(node.scalar(select(func.count(Instance.id))))


def open_association(node: Node, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def test_peer_ae_titles_only_from_their_hosts(node: Node, phantom: PhantomStudy) -> None:
    assert storescu(node.port, phantom.ct_files[:2], aet="PACS_MAIN").returncode == 0
    assert instances(node) == 2
    before = len(rejections(node))
    result = storescu(node.port, phantom.ct_files[2:3], aet="CT_FAR")
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
    event = rejection_after(node, before)
    assert (event.ae_title, event.peer) == ("CT_FAR", "127.0.0.1")
    assert event.detail == (
        "calling AE title 'CT_FAR' may only connect from 10.99.0.0/16 ([security] peers), not from 127.0.0.1"
    )
    result = storescu(node.port, phantom.ct_files[2:3], aet="STRANGER")
    assert result.returncode != 0
    assert rejection_after(node, before + 1).detail == (
        "calling AE title 'STRANGER' is not in [security] allowed_calling_aets or peers"
    )
    assert instances(node) == 2


def test_wrong_called_ae_title_is_rejected(node: Node, phantom: PhantomStudy) -> None:
    before = len(rejections(node))
    result = storescu(node.port, phantom.ct_files[3:4], aet="PACS_MAIN", aec="SOMEONE_ELSE")
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr
    assert rejection_after(node, before).detail == (
        "called AE title not recognised: 'SOMEONE_ELSE' (this node is 'PACS_AGENT'; [security] require_called_aet)"
    )


def test_association_limits_total_and_per_calling_ae(node: Node) -> None:
    before = len(rejections(node))
    held = [open_association(node, "BUSY"), open_association(node, "BUSY")]
    try:
        assert all(a.is_established for a in held)
        third = open_association(node, "BUSY")  # a third one of the same AE title
        assert third.is_rejected
        answer = third.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (2, 3, 2)  # transient, local limit
        assert rejection_after(node, before).detail == (
            "local limit exceeded: calling AE title 'BUSY' has 2 associations open "
            "([security] max_associations_per_aet = 2)"
        )
        held.append(open_association(node, "PYNETDICOM"))
        assert held[-1].is_established
        fourth = open_association(node, "ECHOSCU")  # a fourth in total
        assert fourth.is_rejected
        assert rejection_after(node, before + 1).detail == (
            "local limit exceeded: 3 associations are open ([security] max_associations = 3)"
        )
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()

    def accepted_again() -> bool:  # the slots are given back when the associations end
        assoc = open_association(node, "BUSY")
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    wait_for(accepted_again, 10, "the freed slots")


def big_ct(phantom: PhantomStudy, megabytes: float) -> object:
    ds = dcmread(phantom.ct_files[0])
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5) + 1
    ds.Rows = ds.Columns = side
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_instance_larger_than_max_instance_mb_is_refused_before_writing(node: Node, phantom: PhantomStudy) -> None:
    before = instances(node)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        large = big_ct(phantom, 1.5)
        assert int(assoc.send_c_store(large).Status) == 0xA700
        assert int(assoc.send_c_store(big_ct(phantom, 0.5)).Status) == 0x0000  # a smaller one still goes in
    finally:
        assoc.release()
    refused = node.scalars(select(Event).where(Event.kind == "store_refused").order_by(Event.id))[-1]
    assert refused.status == 0xA700 and refused.sop_instance_uid == large.SOPInstanceUID  # type: ignore[attr-defined]
    assert refused.detail.startswith("instance of 1.5 MB is larger than [security] max_instance_mb = 1")
    assert instances(node) == before + 1
    spooled = [p.name for p in (node.state_dir / "spool").rglob("*") if p.is_file()]
    assert f"{large.SOPInstanceUID}.dcm" not in spooled  # type: ignore[attr-defined]
    assert not list((node.state_dir / "spool" / "tmp").iterdir())  # nothing half-written either


def test_nothing_the_node_writes_is_readable_by_others(node: Node, phantom: PhantomStudy) -> None:
    """After a full receive run (CT + SEG + RTSTRUCT, readiness), no file or directory is open to others."""
    files = [*phantom.ct_files, phantom.seg_file, phantom.rtstruct_file]
    assert storescu(node.port, files, aet="PACS_MAIN").returncode == 0
    wait_for(
        lambda: node.scalars(select(Event).where(Event.kind.in_(["job_scheduled", "study_incomplete"]))),
        30,
        "the study to be evaluated",
    )
    checked = 0
    for path in [node.state_dir, *node.state_dir.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(node.state_dir.parent)} has mode {mode:04o}"
        if path.is_file() and path.suffix == ".dcm":
            assert mode == 0o600, path
            checked += 1
    assert checked >= len(files)
    assert stat.S_IMODE(node.state_dir.stat().st_mode) == 0o700
