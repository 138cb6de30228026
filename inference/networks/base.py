"""The wrapper every method model shares: ``pre_process -> predict -> post_process``.

A wrapper owns one network in eval mode on one device. ``pre_process`` turns the numpy arrays the
ROI functions produce into a tuple of CPU tensors (z-scored with statistics from the model
package, never from the study); ``predict`` runs the network batch by batch without gradients;
``post_process`` turns raw outputs into one ``{label: probability}`` dict per input item.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from inference.networks.blocks import default_device

__all__ = ["MethodModel", "Probabilities", "ZScore", "check_array"]

InputT = TypeVar("InputT")
Probabilities = list[dict[str, float]]
"""One ``{label: probability}`` dict per input item, in input order."""


@dataclass(frozen=True)
class ZScore:
    """Training-set statistics for z-score normalisation: ``(x - mean) / std``.

    Parameters
    ----------
    mean
        Mean of the training inputs, in the units of the input array (HU, or 0-255 grey values).
    std
        Standard deviation of the training inputs; must be finite and > 0.
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean):
            raise ValueError(f"z-score mean must be finite, got {self.mean}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"z-score std must be finite and > 0, got {self.std}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise ``x`` (any shape) to float32."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


def check_array(x: np.ndarray, name: str, ndim: int, tail: tuple[int | None, ...] = ()) -> np.ndarray:
    """Check rank, trailing shape and finiteness of an input array.

    Parameters
    ----------
    x
        The array.
    name
        Its name in error messages.
    ndim
        Required number of dimensions.
    tail
        Required trailing dimensions (``None``: any size).

    Returns
    -------
    numpy.ndarray
        ``x`` as an array.

    Raises
    ------
    ValueError
        Wrong rank, wrong trailing shape, empty batch or non-finite values.
    """
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f'Argument "{name}" must have {ndim} dimensions, got shape {arr.shape}.')
    for want, got in zip(reversed(tail), reversed(arr.shape), strict=False):
        if want is not None and want != got:
            raise ValueError(f'Argument "{name}" must have trailing shape {tail}, got shape {arr.shape}.')
    if arr.shape[0] == 0:
        raise ValueError(f'Argument "{name}" is an empty batch.')
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f'Argument "{name}" contains NaN or infinite values.')
    return arr


class MethodModel(ABC, Generic[InputT]):
    """Base of the M1-M4 wrappers.

    Parameters
    ----------
    network
        The method's ``torch.nn.Module``; moved to ``device`` and put in eval mode.
    labels
        Output labels in network output order.
    device
        Where to run; default :func:`~inference.networks.blocks.default_device`.
    batch_size
        Items per forward pass in :meth:`predict`.
    """

    method: ClassVar[str]

    def __init__(
        self,
        network: nn.Module,
        labels: Sequence[str],
        *,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be non-empty and unique, got {list(labels)}")
        self.device = torch.device(device) if device is not None else default_device()
        self.network = network.to(self.device).eval()
        self.labels = tuple(labels)
        self.batch_size = batch_size

    @abstractmethod
    def pre_process(self, inputs: InputT) -> tuple[torch.Tensor, ...]:
        """Turn ROI-function output into CPU tensors, first dimension = items."""

    def predict(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the network in eval mode without gradients, ``batch_size`` items at a time.

        Parameters
        ----------
        batch
            Tensors from :meth:`pre_process`; all share their first dimension.

        Returns
        -------
        torch.Tensor
            Raw network outputs (logits) on the CPU, first dimension = items.
        """
        n = batch[0].shape[0]
        if any(t.shape[0] != n for t in batch):
            raise ValueError(f"batch tensors disagree on the number of items: {[tuple(t.shape) for t in batch]}")
        self.network.eval()
        outputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                chunk = [t[start : start + self.batch_size].to(self.device) for t in batch]
                outputs.append(self.network(*chunk).float().cpu())
        return torch.cat(outputs)

    @abstractmethod
    def post_process(self, outputs: torch.Tensor) -> Probabilities:
        """Turn raw outputs into one ``{label: probability}`` dict per item."""

    def __call__(self, inputs: InputT) -> Probabilities:
        """``post_process(predict(pre_process(inputs)))``."""
        return self.post_process(self.predict(self.pre_process(inputs)))

    def _as_dicts(self, probabilities: torch.Tensor) -> Probabilities:
        rows = probabilities.detach().cpu().double().numpy()
        return [{label: float(p) for label, p in zip(self.labels, row, strict=True)} for row in rows]
