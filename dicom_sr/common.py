"""What every result object shares: the argument check, the equipment and the device observer.

One home for what the SR builders (:mod:`dicom_sr.sr`) and the Secondary Capture builders
(:mod:`dicom_sr.sc`) both put into their objects, so they cannot drift apart:

- :func:`require`: highdicom-style argument type check;
- the equipment: :data:`MANUFACTURER` (default Manufacturer), :data:`MODEL_NAME` (Manufacturer's
  Model Name) and :data:`SOFTWARE_VERSION` (Software Versions, the installed pacs-agent);
- :func:`device_observer_context`: the TID 1002 / 1004 device observer of an SR.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes as pydicom_codes

from dicom_sr.uids import derive_uid

__all__ = ["MANUFACTURER", "MODEL_NAME", "SOFTWARE_VERSION", "device_observer_context", "require"]

MANUFACTURER = "pacs-agent"
"""Default Manufacturer (General Equipment) and device observer manufacturer."""
MODEL_NAME = "pacs-agent"
"""Manufacturer's Model Name (General Equipment) and device observer name."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("pacs-agent")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


SOFTWARE_VERSION = _package_version()
"""Version of the installed pacs-agent distribution ("0+unknown" when not installed)."""


def require(value: Any, expected: type | tuple[type, ...], name: str, type_name: str) -> None:
    """Raise highdicom-style ``TypeError('Argument "name" must have type X.')``; bool is never a number here."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f'Argument "{name}" must have type {type_name}.')


def device_observer_context(
    manufacturer: str, institution_name: str | None, software_version: str, device_uid: str | None = None
) -> hd.sr.ObservationContext:
    """The observation context of a pacs-agent SR: the device observer (TID 1002, 1004).

    Parameters
    ----------
    manufacturer
        Device observer manufacturer.
    institution_name
        The node's institution; with ``manufacturer`` it derives the default Device Observer UID.
    software_version
        Put into the device observer model name (``pacs-agent <version>``).
    device_uid
        Device Observer UID; None: derived, the same for every result of the node.
    """
    observer = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid or derive_uid("pacs-agent device", manufacturer, institution_name or ""),
        name=MODEL_NAME,
        manufacturer_name=manufacturer,
        model_name=f"{MODEL_NAME} {software_version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=pydicom_codes.DCM.Device, observer_identifying_attributes=observer
        )
    )
