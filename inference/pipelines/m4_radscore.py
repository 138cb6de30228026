"""M4 pipeline: Deep-RadScore, NSCLC multi-endpoint (DenseNet121 patch + tumour / peritumoral RadScores).

Data flow (METHODS.md M4)::

    CT + SEG / RTSTRUCT -> volume, lesions                                 (study.load_study)
    each lesion -> 160 x 160 patch at the tumour centroid of the largest slice,
                   3 mm peritumoral ring                                   (roi.m4_input)
    each lesion -> pyradiomics features of the tumour and of the ring      (radiomics.features)
                -> RadScore = intercept + sum_i c_i (f_i - mean_i) / std_i, one per region
    all lesions, one batch -> sigmoid per endpoint                         (package.model: M4Model)
    each lesion -> Grad-CAM at the last dense block, back on the key slice (explain)
    -> predictions per lesion + patient level                              (model_methods.assemble)

The RadScores come from the package, never from the study, in the format training writes
(:class:`inference.comparator.RadScore`): per endpoint, as the paper, ``[input.radscore.<label>.tumour]``
and ``[input.radscore.<label>.peritumoral]`` (or one shared pair ``[input.radscore.tumour]`` /
``[input.radscore.peritumoral]`` in older packages), each list the selected pyradiomics ``features``, their LASSO
``coefficients``, the training-set z-score ``mean`` / ``std`` of each feature and an ``intercept``;
``[input] radiomics_settings`` is the canonical pyradiomics settings JSON the features were
computed with at training (default: the node's radiomics defaults). The network z-scores the raw
RadScores with ``[normalisation] radscore_mean`` / ``radscore_std`` when the package gives them.
Other ``[input]`` keys: ``shape`` (the patch, paper 160 x 160) and ``ring_mm`` (paper 3). A network
built without RadScores (``[architecture] radscores = 0``) needs no ``[input.radscore]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from inference.comparator import RadScore, radiomics_params
from inference.explain import box_maps, grad_cam, register
from inference.imaging.roi import M4Input, m4_input
from inference.networks import DeepRadInput, DeepRadScoreNet, M4Model, Probabilities
from inference.networks.m4_deep_radscore import RADSCORES as REGIONS
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
from inference.radiomics.features import compute_features
from inference.registry import ModelPackage
from inference.results import PipelineOutput
from inference.structures import StructureSelection

__all__ = ["METHOD", "REGIONS", "RESULT_KIND", "m4_explained", "radscore_columns", "radscores_of", "run_m4"]

METHOD = "m4"
RESULT_KIND = "Deep-RadScore"


def radscore_columns(package: ModelPackage) -> list[tuple[str, RadScore]]:
    """The package's RadScores in network input order, each with its column key.

    Two layouts of ``[input.radscore]``: per endpoint (the paper; what training writes by default)
    ``[input.radscore.<label>.tumour]`` and ``[input.radscore.<label>.peritumoral]`` for every label,
    keys ``"<label>/<region>"``; or one shared pair ``[input.radscore.tumour]`` /
    ``[input.radscore.peritumoral]`` (older packages, ``radscore_label``), keys ``"<region>"``.

    Raises
    ------
    ModelUnavailableError
        A malformed table.
    """
    table = package.input_spec.get("radscore")
    if table is None:
        return []
    try:
        if not isinstance(table, Mapping):
            raise TypeError("must be a table")
        if set(table) & set(REGIONS):
            unknown = set(table) - set(REGIONS)
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            missing = [region for region in REGIONS if region not in table]
            if missing:
                raise ValueError(f"missing table(s) {missing}")
            return [(region, RadScore.from_table(table[region])) for region in REGIONS]
        unknown = set(table) - set(package.labels)
        missing = [label for label in package.labels if label not in table]
        if unknown or missing:
            raise ValueError(
                f"per-endpoint tables must be the labels {list(package.labels)} "
                f"(unknown {sorted(unknown)}, missing {missing})"
            )
        out = []
        for label in package.labels:
            regions = table[label]
            if not isinstance(regions, Mapping) or any(r not in regions for r in REGIONS):
                raise ValueError(f"[input.radscore.{label}] needs tables {list(REGIONS)}")
            out += [(f"{label}/{region}", RadScore.from_table(regions[region])) for region in REGIONS]
        return out
    except (TypeError, ValueError) as exc:
        raise ModelUnavailableError(f"model package {package.name}: [input] radscore is not usable: {exc}") from exc


def radscores_of(package: ModelPackage) -> tuple[tuple[RadScore, ...], dict[str, Any] | None]:
    """The package's RadScores (network input order, see :func:`radscore_columns`) and their pyradiomics parameters.

    Parameters
    ----------
    package
        An M4 model package.

    Returns
    -------
    tuple
        ``(radscores, params)``: no RadScores when ``[input.radscore]`` is absent; ``params`` None
        means the node's radiomics defaults.

    Raises
    ------
    ModelUnavailableError
        ``[input.radscore]`` or ``[input] radiomics_settings`` is malformed.
    """
    settings = package.input_spec.get("radiomics_settings")
    try:
        params = radiomics_params(settings) if settings else None
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelUnavailableError(
            f"model package {package.name}: [input] radscore is not usable: radiomics_settings: {exc}"
        ) from exc
    return tuple(score for _, score in radscore_columns(package)), params


def run_m4(
    ct_paths: Sequence[Path],
    segmentation_path: Path,
    *,
    model: ModelPackage | str | os.PathLike[str],
    explain: bool = True,
    structures: StructureSelection | None = None,
    study: LoadedStudy | None = None,
) -> PipelineOutput:
    """Predict the package's endpoints per lesion with an M4 (Deep-RadScore) model package.

    Parameters
    ----------
    ct_paths
        Files of the CT series.
    segmentation_path
        The SEG or RTSTRUCT drawn on it.
    model
        The M4 model package (loaded object or path).
    explain
        Compute Grad-CAM heat maps for the Secondary Captures.
    structures
        Which segments / ROIs are tumours (routing's choice); None: the default rules.
    study
        The study as the worker's loader already loaded it (read-only); None: loaded here.

    Returns
    -------
    PipelineOutput
        One prediction per lesion and endpoint; the RadScores of each lesion in the provenance.

    Raises
    ------
    InputError
        Unusable CT or segmentation, no lesion, features pyradiomics cannot compute, or a package
        that fails verification or lacks the RadScore definition its network needs.
    """
    package = resolve_package(model, METHOD)
    net = package.model
    network = cast(DeepRadScoreNet, net.network)
    columns = radscore_columns(package)
    _, params = radscores_of(package)
    if network.radscores and len(columns) != network.radscores:
        raise ModelUnavailableError(
            f"model package {package.name}: the network fuses {network.radscores} RadScores but the package "
            f"defines {len(columns) or 'none'} ([input.radscore.<label>.tumour] / [input.radscore.<label>.peritumoral])"
        )
    study = study or load_study(ct_paths, segmentation_path, structures)
    size = input_size(package)
    ring_mm = spec_value(package, "ring_mm", 3.0)
    inputs = [
        m4_input(study.volume.array, item.lesion.mask, study.spacing_zyx, patch_size=size, ring_mm=ring_mm)
        for item in study.lesions
    ]
    values = np.zeros((len(inputs), network.radscores), dtype=np.float32)
    if network.radscores:
        for i, (item, x) in enumerate(zip(study.lesions, inputs, strict=True)):
            values[i] = _radscores(study, item.lesion.mask, x.ring_mask, columns, params)
    batch = DeepRadInput(patches=stack([x.patch_hu for x in inputs]), radscores=values)
    if explain:  # one forward pass gives both the probabilities and the Grad-CAM maps
        probabilities, heatmaps = m4_explained(net, batch, inputs, study)
    else:
        probabilities, heatmaps = net(batch), None
    provenance = {
        "input": f"{size[0]}x{size[1]} patch at the tumour centroid of the largest slice, ring {ring_mm:g} mm",
        "device": device_name(net),
        "heatmap": f"Grad-CAM at the last dense block for {package.labels[0]}" if explain else "none",
    }
    if network.radscores:
        provenance["radscores"] = "; ".join(
            f"{item.lesion.tracking_id}: "
            + ", ".join(f"{key} {v:.4f}" for (key, _), v in zip(columns, row, strict=True))
            for item, row in zip(study.lesions, values, strict=True)
        )
    return assemble(
        method=METHOD,
        result_kind=RESULT_KIND,
        package=package,
        study=study,
        probabilities=probabilities,
        heatmaps=heatmaps,
        provenance=provenance,
    )


def _radscores(
    study: LoadedStudy,
    tumour: np.ndarray,
    ring: np.ndarray,
    columns: Sequence[tuple[str, RadScore]],
    params: Mapping[str, Any] | None,
) -> list[float]:
    masks = {"tumour": tumour, "peritumoral": ring}
    features = {region: compute_features(study.volume, mask, params=params).features for region, mask in masks.items()}
    out = []
    for key, radscore in columns:
        region = key.rsplit("/", 1)[-1]
        missing = [name for name in radscore.features if name not in features[region]]
        if missing:
            raise ModelUnavailableError(
                f"{key} RadScore: the radiomics settings of the package do not compute {missing}"
            )
        out.append(radscore.score(features[region]))
    return out


def m4_explained(
    net: M4Model, batch: DeepRadInput, inputs: Sequence[M4Input], study: LoadedStudy
) -> tuple[Probabilities, list[np.ndarray | None]]:
    """Probabilities and Grad-CAM of each lesion's patch (first endpoint) from one forward pass.

    Parameters
    ----------
    net
        The package's :class:`~inference.networks.M4Model`.
    batch
        The model input (patches and RadScores) of every lesion.
    inputs
        The :class:`~inference.imaging.roi.M4Input` of each lesion (patch boxes).
    study
        The loaded study (lesions in the same order).

    Returns
    -------
    tuple
        ``net``'s probabilities (``post_process`` of the same forward pass) and one (rows, columns)
        map in [0, 1] per lesion, registered onto its key slice.
    """
    network = cast(DeepRadScoreNet, net.network)
    tensors = [t.to(net.device) for t in net.pre_process(batch)]

    def first_label(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]

    cams, logits = grad_cam(
        network, tensors, network.backbone, first_label, batch_size=net.batch_size, with_outputs=True
    )
    shape = study.volume.shape[1:]
    out: list[np.ndarray | None] = []
    for cam, x, item in zip(cams, inputs, study.lesions, strict=True):
        if x.slice_index != item.lesion.key_slice_index:
            out.append(None)
            continue
        out.append(register(cam, *box_maps(x.box, cam.shape), shape))
    # with final classifiers (the paper's last step) the probabilities are theirs; the map stays the network's
    return (net(batch) if net.final_classifiers else net.post_process(logits)), out
