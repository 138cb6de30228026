"""The method registry: every method the node can run, named once, with what it needs.

Configuration (``[jobs] methods``), routing (body regions, the pair method), the worker (which
pipeline, one study or a pair), the model-package look-up and the result series all read this one
table. Adding a method is a row here, its pipeline (``inference/pipelines/``) and, if its results
are not a TID 1500 report of lesions, its writers (``dicom_sr/``) - nothing else.

Light by design (no numpy, no torch): the receiving process reads it to validate the configuration.
Pipelines are named as ``"module:function"`` and imported only by the worker (:func:`load_pipeline`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METHODS",
    "MethodSpec",
    "UnknownMethodError",
    "load_pipeline",
    "method_names",
    "method_spec",
    "pair_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """One method: its name and what it needs.

    Attributes
    ----------
    name:
        The name in ``[jobs] methods``, job rows and results (``m1``).
    title:
        What it computes, for people (``KRAS in colorectal cancer, 2D ResNet``).
    tag:
        Short name in Series Descriptions (``M1``; empty when the result kind says it).
    region:
        Body region it was trained on (``[routing.method_regions]`` default), None: every study.
    package:
        Model-package method it runs (``m1``; the comparator runs ``radiomics`` packages), None: none.
    package_required:
        True when the job fails without an installed package (False: runs without, e.g. response
        reports its comparators without a score).
    pair:
        True for a method on a baseline + follow-up pair (scheduled by the pairing, not per study).
    pipeline:
        ``"module:function"`` of the pipeline.
    series:
        (SR, Secondary Capture) Series Numbers of its results.
    network:
        True when its package holds a torch network (M1-M4; Grad-CAM); False: a scikit-learn classifier.
    """

    name: str
    title: str
    tag: str
    region: str | None
    package: str | None
    package_required: bool
    pair: bool
    pipeline: str
    series: tuple[int, int]
    network: bool = False


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "radiomics", "pyradiomics features of every lesion", "", None, None, False, False,
        "inference.pipelines.radiomics:run_radiomics", (901, 911),
    ),
    MethodSpec(
        "m1", "KRAS in colorectal cancer, 2D ResNet (He 2020)", "M1", "abdomen", "m1", True, False,
        "inference.pipelines.m1_kras:run_m1", (902, 912), network=True,
    ),
    MethodSpec(
        "m2", "EGFR + KRAS in NSCLC, 9-view multi-task CNN (Dong 2021)", "M2", "chest", "m2", True, False,
        "inference.pipelines.m2_egfr_kras:run_m2", (903, 913), network=True,
    ),
    MethodSpec(
        "m3", "RAS family in CRC liver metastases, EfficientNet + attention", "M3", "abdomen", "m3", True, False,
        "inference.pipelines.m3_ras:run_m3", (904, 914), network=True,
    ),
    MethodSpec(
        "m4", "Deep-RadScore, NSCLC multi-endpoint", "M4", "chest", "m4", True, False,
        "inference.pipelines.m4_radscore:run_m4", (905, 915), network=True,
    ),
    MethodSpec(
        "comparator", "radiomics random-forest comparator of the papers", "RF", "abdomen", "radiomics", True,
        False, "inference.pipelines.comparator:run_comparator", (906, 916),
    ),
    MethodSpec(
        "response", "8-week delta-radiomics treatment response (M5)", "M5", None, "response", False, True,
        "inference.pipelines.response:run_response", (907, 917),
    ),
)  # fmt: skip
"""Every method, in the order of their series numbers."""

_BY_NAME = {spec.name: spec for spec in METHODS}


class UnknownMethodError(ValueError):
    """A method name that is not in the registry."""


def method_names(*, pair: bool | None = None) -> tuple[str, ...]:
    """Names of the methods (only single-study ones with ``pair=False``, only pair ones with ``True``)."""
    return tuple(spec.name for spec in METHODS if pair is None or spec.pair == pair)


def method_spec(name: str) -> MethodSpec:
    """The registry row of ``name``.

    Raises
    ------
    UnknownMethodError
        Not a method of the registry (the message lists the known ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(_BY_NAME)}") from None


def pair_method() -> str:
    """The method that runs on a baseline + follow-up pair (the response score)."""
    (name,) = method_names(pair=True)
    return name


def load_pipeline(name: str) -> Callable[..., Any]:
    """Import the pipeline of ``name`` (worker only: this loads numpy, SimpleITK, pyradiomics, torch)."""
    module, _, function = method_spec(name).pipeline.partition(":")
    return getattr(importlib.import_module(module), function)
