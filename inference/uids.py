"""Deterministic DICOM UIDs for the objects pacs-agent creates.

A result object's Series and SOP Instance UIDs derive from what produced it (the input UIDs, the
method and the algorithm version), so a re-run or a re-send of the same result replaces the copy
already in the PACS instead of adding a second one (DESIGN.md, "Idempotent outputs").

UIDs are name-based UUIDs (ISO/IEC 9834-8 / RFC 9562 version 5) under a fixed pacs-agent
namespace, written in the ``2.25.<integer>`` form of DICOM PS3.5 Annex B.2: at most 44 characters,
no organisational root needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import NamedTuple

from pydicom.uid import UID

__all__ = ["ResultUIDs", "derive_uid", "result_uids"]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-agent:dicom-uid")
"""Fixed namespace: changing it would change every UID pacs-agent has ever written."""


class ResultUIDs(NamedTuple):
    """Series Instance UID and SOP Instance UID of one result object."""

    series_instance_uid: UID
    sop_instance_uid: UID


def derive_uid(*parts: str) -> UID:
    """Derive a DICOM UID deterministically from ``parts``.

    Parameters
    ----------
    *parts: str
        Strings that identify the object; their order matters. Each part is length-prefixed
        before hashing, so ``("ab", "c")`` and ``("a", "bc")`` give different UIDs.

    Returns
    -------
    pydicom.uid.UID
        ``2.25.<decimal UUID>`` (PS3.5 Annex B.2), valid and at most 44 characters long.

    Raises
    ------
    TypeError
        When no part is given or a part is not a ``str``.
    """
    if not parts:
        raise TypeError('Argument "parts" must contain at least one string.')
    for part in parts:
        if not isinstance(part, str):
            raise TypeError('Items of argument "parts" must have type str.')
    name = "".join(f"{len(part)}:{part};" for part in parts)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def result_uids(input_uids: Sequence[str], method: str, algorithm_version: str, kind: str) -> ResultUIDs:
    """Series and SOP Instance UIDs of a result object.

    Parameters
    ----------
    input_uids: Sequence[str]
        UIDs of everything the result was computed from (CT series, evidence SOP instances,
        segmentation instance). Order and duplicates do not matter.
    method: str
        Method identifier (e.g. ``"M5"``).
    algorithm_version: str
        Version of the algorithm (include the weights checksum when the weights can change
        without a version bump).
    kind: str
        Kind of object (``"SR"``, ``"SC"``, ``"SEG"``): objects of different kinds go into
        different series, as their Modality differs.

    Returns
    -------
    ResultUIDs
        The same for the same inputs; different when any input changes.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When ``input_uids`` is empty or one of the strings is empty.
    """
    if isinstance(input_uids, str) or not isinstance(input_uids, Sequence):
        raise TypeError('Argument "input_uids" must be a sequence of str.')
    for name, value in (("method", method), ("algorithm_version", algorithm_version), ("kind", kind)):
        if not isinstance(value, str):
            raise TypeError(f'Argument "{name}" must have type str.')
        if not value:
            raise ValueError(f'Argument "{name}" must not be empty.')
    if any(not isinstance(u, str) for u in input_uids):
        raise TypeError('Items of argument "input_uids" must have type str.')
    inputs = sorted({str(u) for u in input_uids})
    if not inputs or "" in inputs:
        raise ValueError('Argument "input_uids" must contain at least one UID and no empty string.')
    common = ("pacs-agent result", method, algorithm_version, kind, *inputs)
    return ResultUIDs(
        series_instance_uid=derive_uid(*common, "series"),
        sop_instance_uid=derive_uid(*common, "instance"),
    )
