"""``model.toml``: the keys every package must have and the checks on their values.

The format is documented key by key in ``docs/models.md``. ``manifest_problems`` returns
sentences an operator can act on; an empty list means the manifest is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, get_args

from inference.methods import METHODS as REGISTRY
from inference.registry.files import SKOPS_SUFFIX, TORCH_SUFFIXES, file_name_problem
from inference.results import ValidationStatus

__all__ = [
    "FORMAT_VERSION",
    "INPUT_RANK",
    "METHODS",
    "NETWORK_METHODS",
    "PRIMARY_ROLE",
    "SKLEARN_METHODS",
    "VALIDATION_STATUSES",
    "manifest_problems",
]

FORMAT_VERSION = 1
NETWORK_METHODS = tuple(spec.package for spec in REGISTRY if spec.network and spec.package)
"""Package methods whose weights are a torch network (the registry's M1-M4)."""
SKLEARN_METHODS = tuple(dict.fromkeys(spec.package for spec in REGISTRY if spec.package and not spec.network))
"""Package methods whose weights are a scikit-learn classifier (radiomics comparator, response)."""
METHODS = NETWORK_METHODS + SKLEARN_METHODS
VALIDATION_STATUSES: tuple[str, ...] = get_args(ValidationStatus)
PRIMARY_ROLE = {**dict.fromkeys(NETWORK_METHODS, "model"), **dict.fromkeys(SKLEARN_METHODS, "classifier")}
"""The weights role each method needs: a torch state dict (``model``) or a skops file (``classifier``)."""

INPUT_RANK = {"m1": 2, "m2": 3, "m3": 2, "m4": 2}
"""Rank of ``[input] shape``, the per-item array shape (M2: views, S, S)."""

_REQUIRED = ("format_version", "name", "version", "method", "labels", "validation_status", "intended_use")
_TABLES = ("input", "thresholds", "training_data", "metrics", "weights")
_KNOWN_KEYS = frozenset((*_REQUIRED, *_TABLES, "architecture", "normalisation", "description", "label_names"))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def manifest_problems(data: Mapping[str, Any], *, network_tables: bool = True) -> list[str]:
    """Check a parsed ``model.toml``.

    Parameters
    ----------
    data
        The parsed TOML document.
    network_tables
        Also check ``[architecture]``, ``[normalisation]`` and ``[input] shape`` of M1-M4 (imports torch).

    Returns
    -------
    list of str
        One sentence per problem (missing keys first; value checks only once all keys exist).
    """
    problems = [f"model.toml: missing key {key!r}" for key in (*_REQUIRED, *_TABLES) if key not in data]
    problems += [f"model.toml: unknown key {key!r}" for key in sorted(set(data) - _KNOWN_KEYS)]
    if problems:
        return problems
    if data["format_version"] != FORMAT_VERSION:
        problems.append(f"format_version {data['format_version']!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("name", "version", "intended_use"):
        if not isinstance(data[key], str) or not data[key].strip():
            problems.append(f"{key} must be a non-empty string")
        elif key != "intended_use" and not _NAME.match(data[key]):
            problems.append(f"{key} {data[key]!r} may only use letters, digits and . _ + -")
    method = data["method"]
    if method not in METHODS:
        problems.append(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if data["validation_status"] not in VALIDATION_STATUSES:
        problems.append(f"validation_status must be one of {', '.join(VALIDATION_STATUSES)}")
    labels = data["labels"]
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        problems.append("labels must be a non-empty list of strings")
    elif len(set(labels)) != len(labels):
        problems.append(f"labels must be unique, got {labels}")
    for key in (*_TABLES, "architecture", "normalisation"):
        if key in data and not isinstance(data[key], dict):
            problems.append(f"[{key}] must be a table")
    if problems:
        return problems
    problems += _threshold_problems(data["thresholds"], labels)
    problems += _label_name_problems(data.get("label_names", {}), labels)
    description = data["training_data"].get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append("[training_data] needs a non-empty description")
    problems += _weights_problems(data["weights"], method)
    if method in NETWORK_METHODS and network_tables:
        problems += _network_problems(data, method)
    return problems


def _label_name_problems(names: Any, labels: list[str]) -> list[str]:
    """``[label_names]``: optional human-readable names of labels (e.g. ``"PIK3CA+BRAF" = "PIK3CA or BRAF"``)."""
    if not isinstance(names, dict):
        return ["[label_names] must be a table"]
    problems = [
        f"[label_names] names {key!r}, which is not one of the labels {labels}" for key in names if key not in labels
    ]
    problems += [
        f"[label_names] {key!r} must be a non-empty string of at most 40 characters"
        for key, value in names.items()
        if not (isinstance(value, str) and value.strip() and len(value) <= 40)
    ]
    return problems


def _threshold_problems(thresholds: Mapping[str, Any], labels: list[str]) -> list[str]:
    problems = []
    if set(thresholds) != set(labels):
        problems.append(f"[thresholds] must have exactly one entry per label {labels}, got {sorted(thresholds)}")
    for label, value in thresholds.items():
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            problems.append(f"threshold {label!r} must be a number in [0, 1], got {value!r}")
    return problems


def _weights_problems(weights: Mapping[str, Any], method: str) -> list[str]:
    problems = [] if weights else ["[weights] lists no file"]
    for role, entry in weights.items():
        if not isinstance(entry, dict) or set(entry) != {"file", "sha256"}:
            problems.append(f"[weights.{role}] must have exactly the keys 'file' and 'sha256'")
            continue
        name_problem = file_name_problem(entry["file"])
        if name_problem:
            problems.append(f"[weights.{role}] file {entry['file']!r}: {name_problem}")
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            problems.append(f"[weights.{role}] sha256 must be 64 lower-case hex digits")
    primary = PRIMARY_ROLE.get(method)
    if primary is None:
        return problems
    if primary not in weights:
        problems.append(f"method {method} needs a [weights.{primary}] file")
    elif isinstance(weights[primary], dict):
        suffixes = TORCH_SUFFIXES if method in NETWORK_METHODS else (SKOPS_SUFFIX,)
        if not str(weights[primary].get("file", "")).endswith(suffixes):
            problems.append(f"[weights.{primary}] file must end with {' or '.join(suffixes)}")
    return problems


def _network_problems(data: Mapping[str, Any], method: str) -> list[str]:
    from inference.networks import NORMALISATION_KEYS, architecture_keys

    problems = []
    allowed = architecture_keys(method)
    unknown = set(data.get("architecture", {})) - allowed
    if unknown:
        problems.append(f"[architecture] has unknown key(s) {sorted(unknown)} for {method}; allowed: {sorted(allowed)}")
    required, optional = NORMALISATION_KEYS[method]
    norm = data.get("normalisation")
    if norm is None:
        problems.append(f"model.toml: missing key 'normalisation' (method {method} needs {sorted(required)})")
    else:
        if required - set(norm):
            problems.append(f"[normalisation] is missing {sorted(required - set(norm))}")
        if set(norm) - required - optional:
            problems.append(f"[normalisation] has unknown key(s) {sorted(set(norm) - required - optional)}")
        for key in sorted(required & set(norm)):
            if not _is_number(norm[key]) or not math.isfinite(norm[key]):
                problems.append(f"[normalisation] {key} must be a finite number")
            elif key.endswith("std") and norm[key] <= 0:
                problems.append(f"[normalisation] {key} must be > 0")
    shape = data["input"].get("shape")
    rank = INPUT_RANK[method]
    if not (isinstance(shape, list) and len(shape) == rank and all(_is_int(s) and s > 0 for s in shape)):
        problems.append(f"[input] shape must list {rank} positive integers (the per-item array shape), got {shape!r}")
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
