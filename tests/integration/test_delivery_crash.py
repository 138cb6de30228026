"""The PACS crashes (SIGKILL) in the middle of the association that delivers a study's results.

Orthanc stands in for the PACS. A Lua ``ReceivedInstanceFilter`` holds the second C-STORE of the
results association (the first result is already stored and acknowledged) and writes a marker;
the test SIGKILLs Orthanc at that moment, so the crash falls inside the association every time.
Orthanc then restarts on the same storage and ports without the filter. What is proved:

* the node records the failure of each result that was not confirmed (in flight: no response;
  after it: the association ended) and retries them with backoff;
* the result Orthanc had acknowledged before the crash is not sent again;
* after the restart every result is in Orthanc exactly once (no missing, no duplicate SOP Instance
  UID), every delivery is ``done`` and has exactly one ``delivered`` event.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Delivery, Event, Result
from tests.integration.peers import Nodes, Orthanc, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=41, lesions=4, slices=30, rows=96, columns=96)]

HOLD_SECOND_INSTANCE = """
received = 0
function ReceivedInstanceFilter(dicom, origin, info)
  received = received + 1
  if received == 2 then
    local marker = io.open({marker}, "w")
    marker:write(dicom["SOPInstanceUID"] or "")
    marker:close()
    for _ = 1, 900 do  -- hold this C-STORE (at most 3 minutes) until the test kills Orthanc
      os.execute("sleep 0.2")
    end
  end
  return true
end
"""


def stored_in(orthanc: Orthanc) -> list[str]:
    """SOP Instance UIDs of every instance Orthanc holds (one entry per stored instance)."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    uids = [item["MainDicomTags"]["SOPInstanceUID"] for item in found]
    assert len(uids) == orthanc.get("/statistics")["CountInstances"]
    return uids


def test_pacs_killed_mid_association_every_result_delivered_exactly_once(
    orthanc: Orthanc, nodes: Nodes, phantom: PhantomStudy, tmp_path: Path
) -> None:
    marker = tmp_path / "holding-second-instance"
    script = tmp_path / "hold.lua"
    script.write_text(HOLD_SECOND_INSTANCE.replace("{marker}", json.dumps(str(marker))))
    orthanc.lua_scripts = [script]
    node = nodes.new(extra_config=orthanc.destination_toml())
    orthanc.start()
    node.start("serve")
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0

    # the results association is open: the first result is stored, the second is held inside Orthanc
    wait_for(marker.exists, 300, "the second result to reach Orthanc")
    in_flight = wait_for(lambda: marker.read_text(), 10, "the marker's SOP Instance UID")
    [first] = stored_in(orthanc)
    orthanc.kill()

    def deliveries() -> list[tuple[int, str, int, str | None, str]]:
        rows = node.rows(
            select(Delivery.id, Delivery.state, Delivery.attempts, Delivery.last_error, Result.sop_instance_uid)
            .join(Result, Result.id == Delivery.result_id)
            .order_by(Delivery.id)
        )
        return [tuple(row) for row in rows]

    rows = wait_for(lambda: (r := deliveries()) and all(d[2] >= 1 for d in r) and r, 60, "the first attempt's outcome")
    expected = {row[4] for row in rows}
    assert len(rows) == len(expected) == len(phantom.lesions) + 2  # SR, summary SC, one SC per lesion
    by_uid = {row[4]: row for row in rows}
    assert by_uid[first][1:4] == ("done", 1, None)  # acknowledged before the crash
    assert by_uid[in_flight][1] == "pending"
    assert by_uid[in_flight][3] == "no response (timeout or connection lost)"
    after = [row for row in rows if row[4] not in (first, in_flight)]
    assert after and all(row[3] == "association ended before this object was sent" for row in after)

    # Orthanc is back (same storage, same ports, without the filter): the node's retry completes the delivery
    orthanc.lua_scripts = []
    orthanc.start()
    rows = wait_for(lambda: (r := deliveries()) and all(d[1] == "done" for d in r) and r, 120, "every delivery")
    assert {row[4] for row in rows} == expected
    assert Counter(stored_in(orthanc)) == Counter({uid: 1 for uid in expected})  # none missing, none twice
    assert {row[4]: row[2] for row in rows}[first] == 1  # the acknowledged result was not sent again
    assert all(row[2] >= 2 for row in rows if row[4] != first)

    # the events say what failed and why, that it was retried, and each result was delivered once
    events = node.rows(select(Event.kind, Event.detail).where(Event.kind.startswith("deliver")).order_by(Event.id))
    delivered = Counter(detail.split(": ")[1] for kind, detail in events if kind == "delivered")
    assert delivered == Counter({f"{uid}.dcm": 1 for uid in expected})
    retries = [detail for kind, detail in events if kind == "delivery_retry"]
    assert f"pacs: {in_flight}.dcm: attempt 1: no response (timeout or connection lost)" in retries
    for row in after:
        assert f"pacs: {row[4]}.dcm: attempt 1: association ended before this object was sent" in retries
    assert not any(first in detail for detail in retries)
    assert [kind for kind, _ in events].count("delivery_dead") == 0
