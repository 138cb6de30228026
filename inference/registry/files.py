"""Package files: reading a directory or zip safely, checksums, torch / skops loading, writing.

Every read of a weights file re-checks its sha256. torch weights load with ``weights_only=True``;
skops files load only when every type they need is trusted (skops' defaults plus
:data:`TRUSTED_SKOPS_TYPES`). Zip entries that would land outside the package are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from inference.errors import ModelPackageError

__all__ = [
    "MANIFEST",
    "SKOPS_SUFFIX",
    "TORCH_SUFFIXES",
    "TRUSTED_SKOPS_TYPES",
    "PackageSource",
    "WeightsFile",
    "dump_toml",
    "file_name_problem",
    "load_skops",
    "load_state_dict",
    "open_source",
    "read_checked",
    "save_object",
    "sha256_file",
]

MANIFEST = "model.toml"
TORCH_SUFFIXES = (".pt", ".pth")
SKOPS_SUFFIX = ".skops"
TRUSTED_SKOPS_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.feature_selection._univariate_selection.f_classif",
)
"""Types trusted beyond skops' defaults (which cover scikit-learn estimators and numpy arrays)."""

_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class WeightsFile:
    """One file of a package, as listed under ``[weights.<role>]``."""

    role: str
    file: str
    sha256: str


@dataclass(frozen=True)
class PackageSource:
    """Read access to a package directory, or a zip (``prefix``: folder of ``model.toml`` inside it)."""

    path: Path
    prefix: str = ""

    @property
    def is_zip(self) -> bool:
        """True for a zip file."""
        return self.path.is_file()

    def read(self, name: str) -> bytes:
        """Bytes of a package member; FileNotFoundError when absent."""
        if not self.is_zip:
            return (self.path / name).read_bytes()
        with zipfile.ZipFile(self.path) as zf:
            try:
                return zf.read(self.prefix + name)
            except KeyError:
                raise FileNotFoundError(name) from None


def open_source(path: Path) -> PackageSource:
    """Open a package directory or zip, refusing zips with entries outside the package.

    Raises
    ------
    ModelPackageError
        Not a directory or zip, or a zip entry with an absolute path, ``..`` or a symlink.
    FileNotFoundError
        No ``model.toml`` at the top (or in the zip's single top folder).
    """
    if path.is_dir():
        return PackageSource(path)
    if not zipfile.is_zipfile(path):
        raise ModelPackageError(f"{path} is neither a package directory nor a zip file")
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    unsafe = [i.filename for i in infos if _unsafe_zip_entry(i)]
    if unsafe:
        raise ModelPackageError(
            f"{path}: zip entries escape the package (absolute path, '..' or symlink; path traversal), "
            f"refused: {unsafe}"
        )
    names = {i.filename for i in infos}
    if MANIFEST in names:
        return PackageSource(path)
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
        return PackageSource(path, f"{next(iter(tops))}/")
    raise FileNotFoundError(MANIFEST)


def _unsafe_zip_entry(info: zipfile.ZipInfo) -> bool:
    name = info.filename.replace("\\", "/")
    is_link = stat.S_ISLNK(info.external_attr >> 16)
    return name.startswith("/") or bool(_DRIVE.match(name)) or ".." in PurePosixPath(name).parts or is_link


def file_name_problem(name: object) -> str | None:
    """Why a weights file name is not a safe relative path inside the package (None: it is)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty relative path"
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or _DRIVE.match(name):
        return "must be a relative path inside the package (no absolute path, no '..')"
    if name == MANIFEST:
        return f"cannot be {MANIFEST}"
    return None


def read_checked(source: PackageSource, w: WeightsFile) -> bytes:
    """Bytes of a weights file after checking its sha256.

    Raises
    ------
    ModelPackageError
        The file is missing, or its sha256 differs from ``model.toml`` (the message names the file).
    """
    try:
        data = source.read(w.file)
    except (FileNotFoundError, IsADirectoryError):
        raise ModelPackageError(f"weights file {w.file!r} ([weights.{w.role}]) is missing from the package") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != w.sha256:
        raise ModelPackageError(
            f"weights file {w.file!r} failed its checksum: model.toml says sha256 {w.sha256}, "
            f"the file has {actual} (modified or corrupted; refused)"
        )
    return data


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(data: bytes, name: str) -> dict[str, Any]:
    """A torch state dict from bytes, with ``torch.load(..., weights_only=True)``.

    Raises
    ------
    ModelPackageError
        The file needs anything beyond tensors and containers, or is not a names -> tensors mapping.
    """
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for damaged archives
        raise ModelPackageError(
            f"weights file {name!r} is not a plain torch state dict (weights_only load refused it): {exc}"
        ) from exc
    if not (isinstance(state, Mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ModelPackageError(f"weights file {name!r} must hold a state dict (names -> tensors)")
    return dict(state)


def load_skops(data: bytes, name: str) -> Any:
    """A scikit-learn object from skops bytes, trusting only skops' defaults and :data:`TRUSTED_SKOPS_TYPES`.

    Raises
    ------
    ModelPackageError
        The file is damaged or needs an untrusted type (named in the message; nothing is loaded).
    """
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # skops raises assorted errors on damaged files
        raise ModelPackageError(f"{name!r} is not a readable skops file: {exc}") from exc
    refused = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if refused:
        raise ModelPackageError(
            f"{name!r} contains untrusted type(s) {refused}; accepted beyond skops' defaults: "
            f"{list(TRUSTED_SKOPS_TYPES)} (refused, nothing was loaded)"
        )
    try:
        return sio.loads(data, trusted=list(TRUSTED_SKOPS_TYPES))
    except Exception as exc:
        raise ModelPackageError(f"{name!r} could not be loaded with skops: {exc}") from exc


def save_object(obj: Any, dest: Path) -> None:
    """Write a weights object: bytes as they are, ``.skops`` via skops, ``.pt`` as a CPU state dict."""
    if isinstance(obj, bytes | bytearray):
        dest.write_bytes(bytes(obj))
        return
    if dest.suffix == SKOPS_SUFFIX:
        import skops.io as sio

        sio.dump(obj, dest)
        return
    if dest.suffix in TORCH_SUFFIXES:
        import torch

        state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, dest)
        return
    raise ValueError(f"cannot write {type(obj).__name__} to {dest.name}: use .pt, .skops or pass bytes")


# --- a small TOML writer (tomllib only reads) -----------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if hasattr(value, "item"):  # numpy scalar
        return _toml_value(value.item())
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def _toml_lines(data: Mapping[str, Any], prefix: str) -> Iterator[str]:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if prefix and (scalars or not tables):
        yield f"\n[{prefix}]"
    for k, v in scalars.items():
        yield f"{_toml_key(str(k))} = {_toml_value(v)}"
    for k, v in tables.items():
        yield from _toml_lines(v, f"{prefix}.{_toml_key(str(k))}" if prefix else _toml_key(str(k)))


def dump_toml(data: Mapping[str, Any]) -> str:
    """Serialise nested mappings of str / int / float / bool / lists to TOML text.

    Raises
    ------
    ValueError
        A value TOML (or this writer) cannot represent, e.g. a list of tables.
    """
    return "\n".join(_toml_lines(data, "")) + "\n"
