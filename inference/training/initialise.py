"""Start a network from weights the site provides: ImageNet-style trunk weights or a SimCLR checkpoint.

pacs-agent ships no pretrained weights and never downloads any. ``[training] init_from`` (or
``pacs-agent train ... --init-from PATH``) names one of:

- a **SimCLR checkpoint folder** written by ``pacs-agent train m3 --pretrain simclr``
  (``simclr.toml`` + ``encoder.pt``; the sha256 in ``simclr.toml`` is checked);
- a **weights file** (``.pt`` / ``.pth``): a torch state dict (or ``{"state_dict": ...}``), read
  with ``weights_only=True``. Tensors are matched **by name** (pacs-agent's own key names, with a
  leading ``module.`` / ``encoder.`` / ``model.`` ignored), only where the shape agrees. When no name
  matches (e.g. torchvision's DenseNet121 or EfficientNet-B0 ImageNet files) they are matched **in
  order** against the network's trunk (``backbone.``): the file's tensors up to its classifier must
  line up one to one with the trunk's, shape by shape; a 3-channel first convolution is summed
  over its colour channels for a 1-channel input. Anything else is refused.

What was loaded (file name, sha256, tensors matched / in the network, how) goes into the package's
``training_data.initialisation`` and the report. Without ``init_from`` that entry says the network
started from random initialisation.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import ConfigError

__all__ = ["RANDOM_INIT", "Initialisation", "load_initial_weights", "read_state_dict"]

RANDOM_INIT = "random initialisation (no pretrained weights were given)"

_PREFIXES = ("module.", "encoder.", "model.")
_HEAD_PREFIXES = ("classifier", "fc", "head.fc", "heads", "projection")


@dataclass(frozen=True)
class Initialisation:
    """What :func:`load_initial_weights` put into a network."""

    source: str
    file: str
    sha256: str
    matched: int
    total: int
    how: str

    def as_table(self) -> dict[str, Any]:
        """For the package's ``training_data.initialisation``."""
        return {
            "source": self.source,
            "file": self.file,
            "sha256": self.sha256,
            "tensors_loaded": self.matched,
            "tensors_in_network": self.total,
            "matched_by": self.how,
        }

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"{self.source} {self.file} (sha256 {self.sha256[:12]}...): {self.matched} of {self.total} tensors "
            f"loaded, matched by {self.how}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, Any], str, Path]:
    """A state dict from a weights file or a SimCLR checkpoint folder.

    Returns
    -------
    tuple
        ``(state dict, source kind, the weights file)``.

    Raises
    ------
    ConfigError
        Missing or unreadable file, or a checkpoint whose checksum fails.
    """
    import torch

    path = Path(path)
    source = "weights file"
    if path.is_dir():
        manifest = path / "simclr.toml"
        if not manifest.is_file():
            raise ConfigError([f"training.init_from: {path} is a folder without simclr.toml (not a SimCLR checkpoint)"])
        meta = tomllib.loads(manifest.read_text(encoding="utf-8"))
        weights = path / str(meta.get("weights", {}).get("file", "encoder.pt"))
        expected = str(meta.get("weights", {}).get("sha256", ""))
        if not weights.is_file():
            raise ConfigError([f"training.init_from: {weights} is missing"])
        if _sha256(weights) != expected:
            raise ConfigError([f"training.init_from: {weights.name} does not match the sha256 in simclr.toml"])
        path, source = weights, "SimCLR checkpoint"
    if not path.is_file():
        raise ConfigError([f"training.init_from: {path} does not exist"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle / zip / runtime errors for a file that is not a state dict
        raise ConfigError([f"training.init_from: {path.name} is not a torch weights file: {exc}"]) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError([f"training.init_from: {path.name} does not hold a state dict of tensors"])
    return dict(state), source, path


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _by_order(target: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any] | None:
    """Trunk tensors matched one to one in order, or None when they do not line up."""
    trunk = [k for k in target if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    given = [
        v
        for k, v in source.items()
        if not k.endswith("num_batches_tracked") and not _strip(k).startswith(_HEAD_PREFIXES)
    ]
    if not trunk or len(trunk) != len(given):
        return None
    out: dict[str, Any] = {}
    for n, (key, value) in enumerate(zip(trunk, given, strict=True)):
        want = tuple(target[key].shape)
        if tuple(value.shape) == want:
            out[key] = value
        elif n == 0 and value.ndim == 4 and want[1] == 1 and value.shape[1] == 3 and value.shape[0] == want[0]:
            out[key] = value.sum(dim=1, keepdim=True)  # RGB stem on a grey input
        else:
            return None
    return out


def load_initial_weights(network: Any, path: str | Path) -> Initialisation:
    """Load matching tensors of ``path`` into ``network`` (in place).

    Parameters
    ----------
    network
        A freshly built method network (:func:`inference.networks.build_network`).
    path
        A weights file or a SimCLR checkpoint folder.

    Returns
    -------
    Initialisation

    Raises
    ------
    ConfigError
        Nothing in the file fits the network.
    """
    state, source, file = read_state_dict(path)
    target = network.state_dict()
    by_name = {_strip(k): v for k, v in state.items()}
    matched = {k: v for k, v in by_name.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    how = "name"
    if not matched:
        matched = _by_order(target, state) or {}
        how = "order (trunk)"
    if not matched:
        raise ConfigError(
            [
                f"training.init_from: no tensor of {file.name} fits the network (names and shapes differ, and its "
                "trunk does not line up with this network's); check the architecture settings it was made with"
            ]
        )
    network.load_state_dict(matched, strict=False)
    total = sum(1 for k in target if not k.endswith("num_batches_tracked"))
    count = sum(1 for k in matched if not k.endswith("num_batches_tracked"))
    return Initialisation(source, file.name, _sha256(file), count, total, how)
