"""Where a worker's models run: ``[worker] device`` = ``auto``, ``cpu`` or ``cuda:N``.

Decided once, before any model is loaded: ``cpu`` hides every GPU (``CUDA_VISIBLE_DEVICES=""``),
``cuda:N`` shows only GPU N (which torch then calls ``cuda:0``), ``auto`` takes the first usable GPU
and otherwise the CPU. The models pick their device from torch (:func:`inference.networks.blocks.default_device`).
"""

from __future__ import annotations

import os

from pacs_agent.errors import ConfigError


def _cuda_available() -> bool:
    import torch  # only a worker decides its device; the scp never imports torch

    return bool(torch.cuda.is_available())


def resolve_device(setting: str, *, cuda_available: bool | None = None) -> str:
    """Apply ``setting`` to this process; returns the device its models run on (``cpu`` or ``cuda:N``).

    Parameters
    ----------
    setting
        ``auto``, ``cpu`` or ``cuda:N`` (validated by the settings).
    cuda_available
        Whether torch sees a usable GPU (default: ask torch, after ``CUDA_VISIBLE_DEVICES`` is set).

    Raises
    ------
    ConfigError
        ``cuda:N`` on a host where that GPU is not usable.
    """
    if setting == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if setting.startswith("cuda:"):
        index = setting.split(":", 1)[1]
        os.environ["CUDA_VISIBLE_DEVICES"] = index
        usable = _cuda_available() if cuda_available is None else cuda_available
        if not usable:
            raise ConfigError(
                [
                    f"[worker] device = {setting!r}, but torch sees no usable GPU {index} on this host "
                    '(driver, CUDA build of torch, CUDA_VISIBLE_DEVICES); use device = "cpu" or "auto"'
                ]
            )
        return setting
    usable = _cuda_available() if cuda_available is None else cuda_available
    if not usable:
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return f"cuda:{visible}" if visible.isdigit() else "cuda:0"
