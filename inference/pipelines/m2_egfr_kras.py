"""M2 pipeline: EGFR + KRAS in NSCLC from 9 planar views of a 64 mm cube, with age / sex / smoking.

Data flow (METHODS.md M2)::

    CT + SEG / RTSTRUCT -> volume, lesions                               (study.load_study)
    CT header -> age (PatientAge, else PatientBirthDate + StudyDate), sex (PatientSex),
                 smoking unknown                                         (covariates_from_header)
    each lesion -> 1 mm isotropic 64 mm cube at the mask centroid (B-spline),
                   9 views in roi.VIEW_NAMES order, resized             (roi.m2_input)
    all lesions, one batch -> sigmoid per task (EGFR, KRAS)             (package.model: M2Model)
    each lesion -> Grad-CAM of the axial view's trunk, back on the key slice grid   (explain)
    -> predictions per lesion + patient level                           (model_methods.assemble)

``[input]`` keys read from the package: ``shape`` (``[9, S, S]``, paper S = 299), ``cube_mm`` (64),
``spacing_mm`` (1), ``order`` (view resize spline order, 3). The axial view is the cube's central
plane, which passes through the lesion centroid; its heat map is drawn on the lesion's key slice
(the largest cross-section), usually within a slice or two of it.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from pydicom import Dataset, dcmread

from inference.explain import cube_view_maps, grad_cam, register
from inference.imaging.roi import VIEW_NAMES, M2Input, m2_input
from inference.networks import Covariates, M2Model, MultiViewInput, MultiViewMultiTask, Probabilities
from inference.pipelines.model_methods import (
    ModelUnavailableError,
    assemble,
    device_name,
    input_size,
    resolve_package,
    spec_value,
    stack,
)
from inference.pipelines.study import LoadedStudy, load_study
from inference.registry import ModelPackage
from inference.results import PipelineOutput
from inference.structures import StructureSelection

__all__ = ["METHOD", "covariates_from_header", "m2_explained", "run_m2"]

METHOD = "m2"
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_PER_YEAR = {"D": 365, "W": 52, "M": 12, "Y": 1}


def covariates_from_header(ds: Dataset) -> Covariates:
    """M2 covariates from a CT header: age, sex; smoking is never in the header (unknown).

    Age is PatientAge (``065Y``; ``018M`` / 12, ``010W`` / 52, ``005D`` / 365) when present, else the
    completed years from PatientBirthDate to StudyDate (or SeriesDate / AcquisitionDate) - the
    convention of PatientAge and of the training datasets (``inference.training.datasets``); ages
    outside 0-130 years count as unknown. Sex is PatientSex ``M`` or ``F``; ``O`` and empty are
    unknown.

    Parameters
    ----------
    ds
        A CT instance (pixel data not needed).

    Returns
    -------
    Covariates
    """
    age: float | None = None
    match = _AGE.match(str(ds.get("PatientAge", "") or "").strip().upper())
    if match:
        age = int(match[1]) / _PER_YEAR[match[2]]
    else:
        birth = _date(ds.get("PatientBirthDate"))
        when = next(
            (d for d in (_date(ds.get(k)) for k in ("StudyDate", "SeriesDate", "AcquisitionDate")) if d is not None),
            None,
        )
        if birth is not None and when is not None:
            age = float(when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day)))
    if age is not None and not 0 <= age <= 130:
        age = None
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return Covariates(age=age, sex="M" if sex == "M" else "F" if sex == "F" else None, smoking=None)


def _date(value: object) -> datetime.date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def run_m2(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    model: ModelPackage | str | os.PathLike[str],
    explain: bool = True,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Predict EGFR and KRAS status per nodule with an M2 model package.

    Parameters
    ----------
    ct_paths
        Files of the CT series.
    segmentation_path
        The SEG or RTSTRUCT drawn on it.
    model
        The M2 model package (loaded object or path).
    explain
        Compute Grad-CAM heat maps (axial view) for the Secondary Captures.
    structures
        Which segments / ROIs are tumours (routing's choice); None: the default rules.
    study
        The study as the worker's loader already loaded it (read-only); None: loaded here.

    Returns
    -------
    PipelineOutput
        One prediction per lesion and task; ``result_kind`` is the labels joined by ``/``
        (``EGFR/KRAS``).

    Raises
    ------
    InputError
        Unusable CT or segmentation, no lesion, or a package that fails verification.
    """
    package = resolve_package(model, METHOD)
    views_count, rows, cols = input_size(package, rank=3)
    if views_count != len(VIEW_NAMES) or rows != cols:
        raise ModelUnavailableError(
            f"model package {package.name}: [input] shape must be [{len(VIEW_NAMES)}, S, S], got "
            f"{list(package.input_spec['shape'])}"
        )
    cube_mm = spec_value(package, "cube_mm", 64.0)
    spacing_mm = spec_value(package, "spacing_mm", 1.0)
    order = spec_value(package, "order", 3, int)
    study = study or load_study(ct_paths, segmentation_path, structures)
    covariates = covariates_from_header(dcmread(ct_paths[0], stop_before_pixels=True))
    inputs = [
        m2_input(
            study.volume.array,
            item.lesion.mask,
            study.spacing_zyx,
            None,
            cube_mm=cube_mm,
            spacing_mm=spacing_mm,
            view_size=(rows, cols),
            order=order,
        )
        for item in study.lesions
    ]
    net = package.model
    batch = MultiViewInput(
        views=stack([stack([x.views[name] for name in VIEW_NAMES]) for x in inputs]),
        covariates=(covariates,) * len(inputs),
    )
    if explain:  # one forward pass gives both the probabilities and the Grad-CAM maps
        probabilities, heatmaps = m2_explained(net, batch, inputs, study, cube_mm=cube_mm, spacing_mm=spacing_mm)
    else:
        probabilities, heatmaps = net(batch), None
    age = "unknown" if covariates.age is None else f"{covariates.age:.1f} years"
    return assemble(
        method=METHOD,
        result_kind="/".join(package.labels),
        package=package,
        study=study,
        probabilities=probabilities,
        heatmaps=heatmaps,
        provenance={
            "input": f"{cube_mm:g} mm cube at {spacing_mm:g} mm, 9 views resized to {rows}x{cols} (order {order})",
            "covariates": f"age {age}, sex {covariates.sex or 'unknown'}, smoking unknown",
            "device": device_name(net),
            "heatmap": f"Grad-CAM of the axial view's last conv layer for {package.labels[0]}" if explain else "none",
        },
    )


def m2_explained(
    net: M2Model,
    batch: MultiViewInput,
    inputs: Sequence[M2Input],
    study: LoadedStudy,
    *,
    cube_mm: float,
    spacing_mm: float,
) -> tuple[Probabilities, list[np.ndarray | None]]:
    """Probabilities and Grad-CAM of each nodule's axial view (first label) from one forward pass.

    Parameters
    ----------
    net
        The package's :class:`~inference.networks.M2Model`.
    batch
        The model input (views and covariates) of every lesion.
    inputs
        The :class:`~inference.imaging.roi.M2Input` of each lesion (cube centroids).
    study
        The loaded study (lesions in the same order).
    cube_mm, spacing_mm
        The cube the views were cut from.

    Returns
    -------
    tuple
        ``net``'s probabilities (``post_process`` of the same forward pass) and one (rows, columns)
        map in [0, 1] per lesion, registered onto the CT slice grid.
    """
    network = cast(MultiViewMultiTask, net.network)
    axial = VIEW_NAMES.index("axial")
    branch = network.branch(axial)
    views = network.views

    def axial_only(maps: torch.Tensor) -> torch.Tensor:
        return maps[axial::views]

    def first_label(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]

    tensors = [t.to(net.device) for t in net.pre_process(batch)]
    size = tuple(batch.views.shape[-2:])
    cams, logits = grad_cam(
        network,
        tensors,
        branch.trunk.out_conv,
        first_label,
        select=axial_only if network.shared_views else None,
        size=size,
        batch_size=net.batch_size,
        with_outputs=True,
    )
    n = round(cube_mm / spacing_mm)
    shape = study.volume.shape[1:]
    maps: list[np.ndarray | None] = [
        register(
            cam,
            *cube_view_maps(x.centroid_index, study.spacing_zyx, cube_voxels=n, spacing_mm=spacing_mm, view_size=size),
            shape,
        )
        for cam, x in zip(cams, inputs, strict=True)
    ]
    return net.post_process(logits), maps
