"""Small M1-M4 model packages for tests: tiny networks with seeded random weights, written and verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inference.networks import build_network
from inference.registry import write_package

LABELS: dict[str, tuple[str, ...]] = {
    "m1": ("KRAS",),
    "m2": ("EGFR", "KRAS"),
    "m3": ("RAS", "PIK3CA+BRAF", "OTHER"),
    "m4": ("EGFR", "KRAS", "LVI"),
}
ARCHITECTURE: dict[str, dict[str, Any]] = {
    "m1": {"width": 0.125, "blocks": 2},
    "m2": {
        "width": 0.0625,
        "repeats": [1, 1, 1],
        "mask_depths": [1, 1, 1],
        "head_dims": [16, 8],
        "shared_views": True,
    },
    "m3": {"width": 0.25, "depth": 0.25, "heads": 4},
    "m4": {"width": 0.25, "blocks": [1, 1, 1, 1], "hidden": 16},
}
INPUT: dict[str, dict[str, Any]] = {
    "m1": {"shape": [40, 40], "margin_px": 10},
    "m2": {"shape": [9, 75, 75], "cube_mm": 48.0},
    "m3": {"shape": [48, 48]},
    "m4": {
        "shape": [48, 48],
        "ring_mm": 3.0,
        "radscore": {
            "tumour": {
                "features": ["original_firstorder_Mean", "original_shape_VoxelVolume"],
                "coefficients": [0.8, -0.3],
                "mean": [60.0, 5000.0],
                "std": [20.0, 4000.0],
                "intercept": 0.1,
            },
            "peritumoral": {
                "features": ["original_firstorder_Mean"],
                "coefficients": [0.5],
                "mean": [50.0],
                "std": [30.0],
            },
        },
    },
}
NORMALISATION: dict[str, dict[str, float]] = {
    "m1": {"mean": 40.0, "std": 100.0},
    "m2": {"mean": -300.0, "std": 400.0, "age_mean": 62.0, "age_std": 10.0},
    "m3": {"mean": 110.0, "std": 60.0},
    "m4": {"mean": 0.0, "std": 300.0},
}


def network(method: str, seed: int = 0) -> torch.nn.Module:
    """A tiny network of ``method`` with seeded random weights.

    M1's last layer is made to read every channel as evidence for "mutant" (and against "wild
    type"), so that its Grad-CAM maps are dense and never all zero (a random network's often are).
    """
    torch.manual_seed(seed)
    net = build_network(method, LABELS[method], ARCHITECTURE[method])
    if method == "m1":
        with torch.no_grad():
            weight = net.fc.weight.abs().mean(dim=0) * 0.05
            net.fc.weight[1] = weight
            net.fc.weight[0] = -weight
    return net


def write_test_package(
    directory: Path, method: str, *, seed: int = 0, version: str = "0.1.0", name: str | None = None, **over: Any
) -> Path:
    """Write and verify a small package of ``method`` (DEMO) to ``directory``; returns its path."""
    labels = LABELS[method]
    metadata: dict[str, Any] = {
        "name": name or f"{method}-test",
        "version": version,
        "method": method,
        "labels": list(labels),
        "validation_status": "DEMO",
        "intended_use": "Tests only. DEMO MODEL - NOT FOR CLINICAL USE.",
        "description": "tiny network, random weights",
        "input": INPUT[method],
        "architecture": ARCHITECTURE[method],
        "normalisation": NORMALISATION[method],
        "thresholds": {label: 0.5 for label in labels},
        "training_data": {"description": "none (random weights)"},
        "metrics": {},
    }
    metadata.update(over)
    return write_package(directory, metadata, {"model": ("model.pt", network(method, seed))})
