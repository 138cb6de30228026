"""M3 pipeline: RAS-family mutations in CRC liver metastases, multi-label, per-slice crops.

Data flow (METHODS.md M3)::

    CT + SEG / RTSTRUCT -> volume, lesions                               (study.load_study)
    each lesion -> every slice with area > 0.4 x its mean slice area: opened mask,
                   crop + 1 cm border, window 40 / 400 HU -> [0, 255], resize        (roi.m3_input)
    all slices of all lesions, one batch -> sigmoid per label           (package.model: M3Model)
    each lesion -> mean over its slices                                  (the lesion's probability)
    each lesion -> Grad-CAM of its key-slice crop at the last conv block, back on the key slice
    -> predictions per lesion + patient level                            (model_methods.assemble)

``[input]`` keys read from the package: ``shape`` (paper 128 x 128), ``area_fraction`` (0.4),
``opening_radius_px`` (1), ``border_mm`` (10), ``window_centre`` (40), ``window_width`` (400),
``order`` (resize spline order, 1). The key slice (largest area) is always among the selected
slices, so its crop is the one explained.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from inference.explain import box_maps, grad_cam, register
from inference.imaging.roi import M3Slice, m3_input
from inference.networks import EfficientNetAttention, M3Model
from inference.pipelines.model_methods import assemble, device_name, input_size, resolve_package, spec_value, stack
from inference.pipelines.study import LoadedStudy, load_study
from inference.registry import ModelPackage
from inference.results import PipelineOutput
from inference.structures import StructureSelection

__all__ = ["METHOD", "RESULT_KIND", "lesion_means", "m3_heatmaps", "run_m3"]

METHOD = "m3"
RESULT_KIND = "RAS"


def run_m3(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    model: ModelPackage | str | os.PathLike[str],
    explain: bool = True,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Predict RAS-family mutation status per lesion with an M3 model package.

    Parameters
    ----------
    ct_paths
        Files of the CT series.
    segmentation_path
        The SEG or RTSTRUCT drawn on it.
    model
        The M3 model package (loaded object or path).
    explain
        Compute Grad-CAM heat maps for the Secondary Captures.
    structures
        Which segments / ROIs are tumours (routing's choice); None: the default rules.
    study
        The study as the worker's loader already loaded it (read-only); None: loaded here.

    Returns
    -------
    PipelineOutput
        One prediction per lesion and package label; a lesion's probability is the mean of its
        slices' probabilities.

    Raises
    ------
    InputError
        Unusable CT or segmentation, no lesion, or a package that fails verification.
    """
    package = resolve_package(model, METHOD)
    study = study or load_study(ct_paths, segmentation_path, structures)
    size = input_size(package)
    options = {
        "area_fraction": spec_value(package, "area_fraction", 0.4),
        "opening_radius_px": spec_value(package, "opening_radius_px", 1, int),
        "border_mm": spec_value(package, "border_mm", 10.0),
        "window_centre": spec_value(package, "window_centre", 40.0),
        "window_width": spec_value(package, "window_width", 400.0),
        "order": spec_value(package, "order", 1, int),
    }
    per_lesion = [
        m3_input(study.volume.array, item.lesion.mask, study.spacing_zyx, size=size, **options)
        for item in study.lesions
    ]
    net = package.model
    crops = stack([s.image for slices in per_lesion for s in slices])
    probabilities = lesion_means(net(crops), [len(slices) for slices in per_lesion])
    slice_counts = ", ".join(str(len(slices)) for slices in per_lesion)
    return assemble(
        method=METHOD,
        result_kind=RESULT_KIND,
        package=package,
        study=study,
        probabilities=probabilities,
        heatmaps=m3_heatmaps(net, per_lesion, study) if explain else None,
        provenance={
            "input": (
                f"slices with area > {options['area_fraction']:g} x mean, opening radius "
                f"{options['opening_radius_px']} px, border {options['border_mm']:g} mm, window "
                f"{options['window_centre']:g}/{options['window_width']:g} HU, resized to {size[0]}x{size[1]}"
            ),
            "slices_per_lesion": slice_counts,
            "lesion_rule": "mean of the lesion's slice probabilities",
            "device": device_name(net),
            "heatmap": f"Grad-CAM at the last conv block for {package.labels[0]} on the key-slice crop"
            if explain
            else "none",
        },
    )


def lesion_means(slice_probabilities: Sequence[dict[str, float]], counts: Sequence[int]) -> list[dict[str, float]]:
    """Mean of consecutive runs of slice probabilities: one dict per lesion.

    Parameters
    ----------
    slice_probabilities
        ``{label: p}`` per slice, the slices of lesion 0 first, then lesion 1, ...
    counts
        Number of slices of each lesion (each >= 1).

    Returns
    -------
    list of dict
        ``{label: mean p}`` per lesion.
    """
    if sum(counts) != len(slice_probabilities) or min(counts, default=1) < 1:
        raise ValueError(f"slice counts {list(counts)} do not partition {len(slice_probabilities)} slices")
    out, start = [], 0
    for count in counts:
        chunk = slice_probabilities[start : start + count]
        out.append({label: float(np.mean([p[label] for p in chunk])) for label in chunk[0]})
        start += count
    return out


def m3_heatmaps(net: M3Model, per_lesion: Sequence[Sequence[M3Slice]], study: LoadedStudy) -> list[np.ndarray | None]:
    """Grad-CAM of each lesion's key-slice crop (first label), registered onto the key slice.

    Parameters
    ----------
    net
        The package's :class:`~inference.networks.M3Model`.
    per_lesion
        The M3 slices of each lesion (:func:`~inference.imaging.roi.m3_input`).
    study
        The loaded study (lesions in the same order).

    Returns
    -------
    list of numpy.ndarray or None
        One (rows, columns) map in [0, 1] per lesion; None when the key slice was not selected.
    """
    chosen: list[M3Slice | None] = []
    for slices, item in zip(per_lesion, study.lesions, strict=True):
        chosen.append(next((s for s in slices if s.slice_index == item.lesion.key_slice_index), None))
    present = [s for s in chosen if s is not None]
    if not present:
        return [None] * len(chosen)
    network = cast(EfficientNetAttention, net.network)
    tensors = [t.to(net.device) for t in net.pre_process(stack([s.image for s in present]))]

    def first_label(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]

    cams = iter(grad_cam(network, tensors, network.backbone.head, first_label, batch_size=net.batch_size))
    shape = study.volume.shape[1:]
    out: list[np.ndarray | None] = []
    for s in chosen:
        if s is None:
            out.append(None)
            continue
        cam = next(cams)
        out.append(register(cam, *box_maps(s.box, cam.shape), shape))
    return out
