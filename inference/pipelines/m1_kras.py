"""M1 pipeline: KRAS status in colorectal cancer from the largest axial slice (2D ResNet).

Data flow (METHODS.md M1)::

    CT + SEG / RTSTRUCT -> volume, lesions                      (study.load_study)
    each lesion -> largest slice, bounding box + margin, resize (roi.m1_input; HU, z-scored by the model)
    all lesions, one batch -> P(mutant)                         (package.model: M1Model)
    each lesion -> Grad-CAM at the last residual block, back on its key slice   (explain;
                   the same forward pass gives the probabilities)
    -> predictions per lesion + patient level                   (model_methods.assemble)

``[input]`` keys read from the package: ``shape`` (rows, cols; paper 80 x 80), ``margin_px``
(pixels on each side; the paper's A2 set is 10, i.e. "ROI and 20-pixel" in all; a package without
the key crops with 20 per side, as packages written before that default were trained), ``square``
(false: the paper stretches the rectangle), ``order`` (resize spline order, 3). The largest slice
is the lesion's key slice, so the heat map needs no other slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from inference.explain import box_maps, grad_cam, register
from inference.imaging.roi import M1_LEGACY_MARGIN_PX, M1Input, m1_input
from inference.networks import M1Model, Probabilities, ResNetKRAS
from inference.pipelines.model_methods import assemble, device_name, input_size, resolve_package, spec_value, stack
from inference.pipelines.study import LoadedStudy, load_study
from inference.registry import ModelPackage
from inference.results import PipelineOutput
from inference.structures import StructureSelection

__all__ = ["METHOD", "m1_explained", "run_m1"]

METHOD = "m1"


def run_m1(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    model: ModelPackage | str | os.PathLike[str],
    explain: bool = True,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Predict KRAS status per lesion with an M1 model package.

    Parameters
    ----------
    ct_paths
        Files of the CT series.
    segmentation_path
        The SEG or RTSTRUCT drawn on it.
    model
        The M1 model package (loaded object or path).
    explain
        Compute Grad-CAM heat maps for the Secondary Captures.
    structures
        Which segments / ROIs are tumours (routing's choice); None: the default rules.
    study
        The study as the worker's loader already loaded it (read-only); None: loaded here.

    Returns
    -------
    PipelineOutput
        ``result_kind`` is the package's label (``KRAS``).

    Raises
    ------
    InputError
        Unusable CT or segmentation, no lesion, or a package that fails verification
        (:class:`~inference.pipelines.model_methods.ModelUnavailableError`).
    """
    package = resolve_package(model, METHOD)
    study = study or load_study(ct_paths, segmentation_path, structures)
    size = input_size(package)
    margin_px = spec_value(package, "margin_px", M1_LEGACY_MARGIN_PX, int)
    square = spec_value(package, "square", False, bool)
    order = spec_value(package, "order", 3, int)
    inputs = [
        m1_input(study.volume.array, item.lesion.mask, None, margin_px=margin_px, size=size, order=order, square=square)
        for item in study.lesions
    ]
    net = package.model
    crops = stack([x.image for x in inputs])
    if explain:  # one forward pass gives both the probabilities and the Grad-CAM maps
        probabilities, heatmaps = m1_explained(net, crops, inputs, study)
    else:
        probabilities, heatmaps = net(crops), None
    return assemble(
        method=METHOD,
        result_kind=package.labels[0],
        package=package,
        study=study,
        probabilities=probabilities,
        heatmaps=heatmaps,
        provenance={
            "input": f"largest slice, bounding box + {margin_px} px per side, resized to {size[0]}x{size[1]} "
            f"(order {order})" + (", squared" if square else ""),
            "device": device_name(net),
            "heatmap": f"Grad-CAM at the last residual block for {package.labels[0]} (log-odds mutant)"
            if explain
            else "none",
        },
    )


def m1_explained(
    net: M1Model, crops: np.ndarray, inputs: Sequence[M1Input], study: LoadedStudy
) -> tuple[Probabilities, list[np.ndarray | None]]:
    """Probabilities and Grad-CAM of each lesion's crop (one pass), the maps registered onto the key slices.

    Parameters
    ----------
    net
        The package's :class:`~inference.networks.M1Model`.
    crops
        (N, rows, cols) HU crops as given to the model.
    inputs
        The :class:`~inference.imaging.roi.M1Input` of each lesion (boxes and slices).
    study
        The loaded study (lesions in the same order).

    Returns
    -------
    tuple
        ``net``'s probabilities (``post_process`` of the same forward pass) and one (rows, columns)
        map in [0, 1] per lesion on the CT slice grid.
    """
    network = cast(ResNetKRAS, net.network)
    tensors = [t.to(net.device) for t in net.pre_process(crops)]

    def log_odds(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1] - logits[:, 0]

    cams, logits = grad_cam(network, tensors, network.blocks, log_odds, batch_size=net.batch_size, with_outputs=True)
    shape = study.volume.shape[1:]
    out: list[np.ndarray | None] = []
    for cam, x, item in zip(cams, inputs, study.lesions, strict=True):
        if x.slice_index != item.lesion.key_slice_index:  # both are the first largest slice: never expected
            out.append(None)
            continue
        out.append(register(cam, *box_maps(x.box, cam.shape), shape))
    return net.post_process(logits), out
