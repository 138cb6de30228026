"""Deterministic DICOM UIDs for the objects pacs-agent creates (see :mod:`inference.uids`, their home).

Re-exported here because the result writers are where most callers look for them.
"""

from inference.uids import ResultUIDs, derive_uid, result_uids

__all__ = ["ResultUIDs", "derive_uid", "result_uids"]
