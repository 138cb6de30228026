"""Model packages: load, verify, install, list and write.

A package is a directory or zip with ``model.toml`` and the weight files it lists. Loading checks
everything before anything is trusted: the manifest, every file's sha256, that torch weights load
with ``weights_only=True`` and fit the network ``[architecture]`` describes with one output per
label, that skops files need only trusted types.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast

from inference.errors import ModelPackageError
from inference.registry.files import (
    MANIFEST,
    SKOPS_SUFFIX,
    TORCH_SUFFIXES,
    PackageSource,
    WeightsFile,
    dump_toml,
    file_name_problem,
    load_skops,
    load_state_dict,
    open_source,
    read_checked,
    save_object,
    sha256_file,
)
from inference.registry.manifest import (
    FORMAT_VERSION,
    NETWORK_METHODS,
    PRIMARY_ROLE,
    SKLEARN_METHODS,
    manifest_problems,
)
from inference.results import AlgorithmInfo, ValidationStatus

__all__ = [
    "ModelPackage",
    "PackageEntry",
    "install_package",
    "list_packages",
    "load_package",
    "verify_package",
    "write_package",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A verified model package (made by :func:`load_package`).

    The tables of ``model.toml`` are kept as read. :attr:`model` builds the method's model the
    first time it is used - a :class:`~inference.networks.MethodModel` for M1-M4, the scikit-learn
    estimator for radiomics / response - re-checking the weights' checksums as it reads them.
    """

    path: Path
    name: str
    version: str
    method: str
    labels: tuple[str, ...]
    validation_status: ValidationStatus
    intended_use: str
    input_spec: Mapping[str, Any]
    normalisation: Mapping[str, Any]
    thresholds: Mapping[str, float]
    training_data: Mapping[str, Any]
    metrics: Mapping[str, Any]
    weights: tuple[WeightsFile, ...]
    architecture: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: PackageSource | None = field(default=None, repr=False)
    label_names: Mapping[str, str] = field(default_factory=dict)
    """Human-readable names of labels (``[label_names]``); a label without one is shown as it is."""

    def label_name(self, label: str) -> str:
        """How results name ``label``: its ``[label_names]`` entry, else the label itself."""
        return self.label_names.get(label, label)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the primary weights file (``[weights.model]`` or ``[weights.classifier]``)."""
        return self.weights_file(PRIMARY_ROLE[self.method]).sha256

    def weights_file(self, role: str) -> WeightsFile:
        """The file listed under ``[weights.<role>]`` (KeyError if none)."""
        for w in self.weights:
            if w.role == role:
                return w
        raise KeyError(role)

    def algorithm_info(self) -> AlgorithmInfo:
        """The identity every result made with this package carries into the SR."""
        return AlgorithmInfo(
            name=self.name,
            version=self.version,
            validation_status=self.validation_status,
            weights_sha256=self.weights_sha256,
            intended_use=self.intended_use,
        )

    def read_file(self, role: str) -> bytes:
        """Bytes of a weights file after checking its sha256.

        Raises
        ------
        ModelPackageError
            The file is missing or no longer matches ``model.toml``.
        """
        if self.source is None:
            raise ModelPackageError(f"{self.name} {self.version}: package has no file source")
        return read_checked(self.source, self.weights_file(role))

    def build_model(self, device: Any = None, batch_size: int | None = None) -> Any:
        """Build a fresh model from the package (the cached :attr:`model` is usually what you want).

        Parameters
        ----------
        device
            torch device for M1-M4 (default: CUDA when available, else CPU).
        batch_size
            Items per forward pass (M1-M4; default: the wrapper's).

        Returns
        -------
        MethodModel or scikit-learn estimator
            The wrapper with the network in eval mode (M1-M4), or the estimator (radiomics, response).

        Raises
        ------
        ModelPackageError
            A weights file changed since loading, or the weights do not fit the network.
        """
        role = PRIMARY_ROLE[self.method]
        if self.method in SKLEARN_METHODS:
            return load_skops(self.read_file(role), self.weights_file(role).file)
        from inference.networks import build_model, build_network

        network = build_network(self.method, self.labels, self.architecture)
        state = load_state_dict(self.read_file(role), self.weights_file(role).file)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelPackageError(f"{self.path}: the weights do not fit the architecture: {exc}") from exc
        model = build_model(self.method, network, self.labels, self.normalisation, device=device, batch_size=batch_size)
        if self.method == "m4" and any(w.role == "final_classifier" for w in self.weights):
            # M4's last FC replaced per endpoint by the classifier training chose (docs/models.md)
            from inference.networks import M4Model

            assert isinstance(model, M4Model)
            model.final_classifiers = dict(load_skops(self.read_file("final_classifier"), "final_classifier"))
        return model

    @cached_property
    def model(self) -> Any:
        """The method's model on the default device, built on first use and kept."""
        logger.info("building model %s %s (%s) from %s", self.name, self.version, self.method, self.path)
        return self.build_model()


@dataclass(frozen=True)
class PackageEntry:
    """One package found by :func:`list_packages` (``problems`` empty when it checked out)."""

    path: Path
    name: str
    version: str
    method: str
    validation_status: str
    labels: tuple[str, ...]
    problems: tuple[str, ...] = ()


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Load and fully verify a model package.

    Parameters
    ----------
    path
        A package directory or zip file.

    Returns
    -------
    ModelPackage
        Metadata plus a lazily built model.

    Raises
    ------
    ModelPackageError
        With every problem :func:`verify_package` finds.
    """
    package, problems = _inspect(Path(path), deep=True)
    if problems or package is None:
        raise ModelPackageError(f"model package {path} refused:\n  " + "\n  ".join(problems))
    return package


def verify_package(path: str | os.PathLike[str]) -> list[str]:
    """List the problems of a model package.

    Checks the manifest (missing keys, unknown method, thresholds per label, ...), every file's
    sha256, that torch weights load with ``weights_only=True`` and fit the architecture with one
    output per label, that skops files need only trusted types, and that zip entries stay inside
    the package.

    Parameters
    ----------
    path
        A package directory or zip file.

    Returns
    -------
    list of str
        One sentence per problem; empty when the package is valid.
    """
    return _inspect(Path(path), deep=True)[1]


def install_package(path: str | os.PathLike[str], models_dir: str | os.PathLike[str]) -> Path:
    """Verify a package and copy it to ``models_dir/<name>-<version>/``.

    Only ``model.toml`` and the files it lists are copied: what was verified is what gets
    installed. Installing the same package again is a no-op; different content under the same
    name and version is refused.

    Parameters
    ----------
    path
        A package directory or zip file.
    models_dir
        Directory of installed packages (created if missing).

    Returns
    -------
    pathlib.Path
        The installed package directory.

    Raises
    ------
    ModelPackageError
        The package is invalid, or another package holds the same name and version.
    """
    package = load_package(path)
    source = package.source
    if source is None:  # _inspect always sets it
        raise ModelPackageError(f"{path}: package has no file source")
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{package.name}-{package.version}"
    if target.exists():
        installed = _inspect(target, deep=False)[0]
        if installed is not None and _fingerprint(installed) == _fingerprint(package):
            logger.info("model package %s is already installed at %s", target.name, target)
            return target
        raise ModelPackageError(f"{target} already exists with different content; remove it or change the version")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        (staging / MANIFEST).write_bytes(source.read(MANIFEST))
        for w in package.weights:
            dest = staging / w.file
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(read_checked(source, w))
        staging.chmod(0o755)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    problems = verify_package(target)
    if problems:  # only if the copy itself was corrupted
        raise ModelPackageError(f"installed copy {target} failed verification: {'; '.join(problems)}")
    logger.info("installed model package %s %s (%s) at %s", package.name, package.version, package.method, target)
    return target


def list_packages(models_dir: str | os.PathLike[str], *, verify: bool = False) -> list[PackageEntry]:
    """The packages (folders and zips with a ``model.toml``) in a models directory.

    Parameters
    ----------
    models_dir
        Directory of installed packages; a missing directory holds none.
    verify
        Also check checksums and weights (reads every file); otherwise only the manifest.

    Returns
    -------
    list of PackageEntry
        Sorted by name and version; unreadable packages are listed with their problems.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return []
    entries = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not ((child / MANIFEST).is_file() or zipfile.is_zipfile(child)):
            continue
        package, problems = _inspect(child, deep=verify)
        if package is None:
            entries.append(PackageEntry(child, child.name, "?", "?", "?", (), tuple(problems)))
            continue
        entries.append(
            PackageEntry(
                child,
                package.name,
                package.version,
                package.method,
                package.validation_status,
                package.labels,
                tuple(problems),
            )
        )
    return sorted(entries, key=lambda e: (e.name, e.version, str(e.path)))


def write_package(
    directory: str | os.PathLike[str], metadata: Mapping[str, Any], weights: Mapping[str, tuple[str, Any]]
) -> Path:
    """Write a package directory: weight files, their sha256 and ``model.toml``; then verify it.

    Parameters
    ----------
    directory
        Target directory (created; must not hold a ``model.toml`` yet).
    metadata
        Every ``model.toml`` key except ``weights`` (``format_version`` defaults to the current one).
    weights
        ``role -> (file name, object)``: a ``torch.nn.Module`` or state dict (``.pt``), a
        scikit-learn object (``.skops``), or ``bytes`` written as they are.

    Returns
    -------
    pathlib.Path
        The package directory.

    Raises
    ------
    ModelPackageError
        The directory already holds a package, or the written package does not verify.
    """
    out = Path(directory)
    if (out / MANIFEST).exists():
        raise ModelPackageError(f"{out / MANIFEST} already exists; write each package to a new directory")
    if "weights" in metadata:
        raise ValueError('Argument "metadata" must not contain "weights"; pass the objects in "weights".')
    for name, _ in weights.values():
        problem = file_name_problem(name)
        if problem:
            raise ValueError(f"weights file {name!r}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, str]] = {}
    for role, (name, obj) in weights.items():
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_object(obj, dest)
        table[role] = {"file": name, "sha256": sha256_file(dest)}
    manifest = {"format_version": FORMAT_VERSION, **dict(metadata), "weights": table}
    (out / MANIFEST).write_text(dump_toml(manifest), encoding="utf-8")
    problems = verify_package(out)
    if problems:
        raise ModelPackageError(f"package written to {out} does not verify:\n  " + "\n  ".join(problems))
    return out


def _inspect(path: Path, *, deep: bool) -> tuple[ModelPackage | None, list[str]]:
    """Parse and check a package; ``deep`` adds checksums, weight loading and network checks."""
    if not path.exists():
        return None, [f"{path} does not exist"]
    try:
        source = open_source(path)
        text = source.read(MANIFEST).decode("utf-8")
    except FileNotFoundError:
        return None, [f"{path} has no {MANIFEST}"]
    except (ModelPackageError, zipfile.BadZipFile, UnicodeDecodeError, OSError) as exc:
        return None, [str(exc)]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{MANIFEST} is not valid TOML: {exc}"]
    problems = manifest_problems(data, network_tables=deep)
    if problems:
        return None, problems
    package = ModelPackage(
        path=path,
        name=data["name"],
        version=data["version"],
        method=data["method"],
        labels=tuple(data["labels"]),
        validation_status=cast(ValidationStatus, data["validation_status"]),
        intended_use=data["intended_use"],
        input_spec=data["input"],
        normalisation=data.get("normalisation", {}),
        thresholds={k: float(v) for k, v in data["thresholds"].items()},
        training_data=data["training_data"],
        metrics=data["metrics"],
        weights=tuple(WeightsFile(role, e["file"], e["sha256"]) for role, e in data["weights"].items()),
        architecture=data.get("architecture", {}),
        description=str(data.get("description", "")),
        source=source,
        label_names={str(k): str(v) for k, v in data.get("label_names", {}).items()},
    )
    if deep:
        problems += _file_problems(package, source)
    return package, problems


def _file_problems(package: ModelPackage, source: PackageSource) -> list[str]:
    problems: list[str] = []
    for w in package.weights:
        try:
            data = read_checked(source, w)
            if w.file.endswith(TORCH_SUFFIXES):
                state = load_state_dict(data, w.file)
                if w.role == "model" and package.method in NETWORK_METHODS:
                    problems += _state_problems(package, state)
            elif w.file.endswith(SKOPS_SUFFIX):
                estimator = load_skops(data, w.file)
                if w.role == "classifier":
                    problems += _estimator_problems(package, estimator)
        except ModelPackageError as exc:
            problems.append(str(exc))
    return problems


def _state_problems(package: ModelPackage, state: Mapping[str, Any]) -> list[str]:
    import torch

    from inference.networks import build_network, label_problem

    problem = label_problem(package.method, package.labels, state)
    if problem:
        return [f"labels do not match the architecture's outputs: {problem}"]
    try:
        with torch.device("meta"):  # shapes only, no memory
            expected = build_network(package.method, package.labels, package.architecture).state_dict()
    except (TypeError, ValueError) as exc:
        return [f"[architecture] cannot build a {package.method} network: {exc}"]
    problems = []
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        problems.append(
            f"the weights do not fit the [architecture] table: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        problems.append(
            f"the weights do not fit the [architecture] table: {len(wrong)} tensors of the wrong shape, "
            f"e.g. {k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        )
    return problems


def _estimator_problems(package: ModelPackage, estimator: Any) -> list[str]:
    classes = getattr(estimator, "classes_", None)
    if classes is not None and getattr(classes, "ndim", 0) == 1 and len(classes) == 2 and len(package.labels) != 1:
        return [f"labels do not match the classifier: a binary classifier takes one label, got {list(package.labels)}"]
    return []


def _fingerprint(package: ModelPackage) -> tuple[str, str, tuple[tuple[str, str, str], ...]]:
    return package.name, package.version, tuple(sorted((w.role, w.file, w.sha256) for w in package.weights))
