"""Model packages: a directory or zip with ``model.toml`` and checksummed weight files.

A package says what it is (name, version, method, labels), what it expects (input spec,
normalisation statistics), how to decide (a threshold per label), what it is for (intended use,
validation status, training data, metrics), and which files hold its weights, each with its
sha256. Nothing in it is trusted before it is checked (see :func:`verify_package`). The format is
documented key by key in ``docs/models.md``.

torch and skops are imported only inside the functions that read weights, so listing packages
and importing this package stay light (``pacs_agent`` imports :mod:`inference.registry.cli`
lazily inside its ``models`` sub-command).
"""

from __future__ import annotations

from inference.registry.files import MANIFEST, TRUSTED_SKOPS_TYPES, WeightsFile, sha256_file
from inference.registry.manifest import FORMAT_VERSION, METHODS, VALIDATION_STATUSES
from inference.registry.package import (
    ModelPackage,
    PackageEntry,
    install_package,
    list_packages,
    load_package,
    verify_package,
    write_package,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "METHODS",
    "TRUSTED_SKOPS_TYPES",
    "VALIDATION_STATUSES",
    "ModelPackage",
    "PackageEntry",
    "WeightsFile",
    "install_package",
    "list_packages",
    "load_package",
    "sha256_file",
    "verify_package",
    "write_package",
]
