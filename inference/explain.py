"""Grad-CAM heat maps for the CNN methods, registered back onto the CT slice they explain.

Grad-CAM (Selvaraju et al. 2017): for a feature map ``A`` (channels ``k``) of the last
convolutional block and a score ``y`` (the logit of the explained label), the channel weights are
the spatially averaged gradients ``w_k = mean_ij dy / dA_k[i, j]`` and the map is
``ReLU(sum_k w_k A_k)``. It is upsampled (bilinear, pixel centres aligned) to the model input,
scaled to [0, 1] by its maximum (an all-zero map stays zero), and then
**registered onto the CT slice**: every slice pixel is mapped to the model-input pixel it came from
by undoing the crop and resize of :mod:`inference.imaging.roi` exactly, and sampled bilinearly;
pixels outside the crop are 0 (:func:`to_slice`). :func:`register` then scales the slice map to a
maximum of 1 for display.

The model input and the CT slice are related by a separable affine map per axis,
``u = scale * r + offset`` (:class:`AxisMap`), because every ROI function crops an axis-aligned box
and resizes it with scikit-image's pixel-centre convention (output pixel ``u`` samples input
coordinate ``(u + 0.5) * in / out - 0.5``):

- M1 and M3: a box ``[r0, r1)`` of the slice resized to ``S``: ``u = (r - r0 + 0.5) * S / (r1 - r0) - 0.5``
  (:func:`box_maps`);
- M4: the patch is not resized: ``u = r - r0``;
- M2 (the axial view): the 1 mm cube centred on the mask centroid, resized to ``S``
  (:func:`cube_view_maps`). The axial view is the cube's central plane, i.e. the plane through the
  lesion centroid, which can lie a few mm from the key slice it is drawn on.

The explained label is the package's first label (``KRAS`` for M1, ``EGFR`` for the paper's M2,
``KRAS`` / ``RAS`` for M3, the first endpoint for M4); for M1 the score is the log-odds
``logit(mutant) - logit(wild type)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = ["AxisMap", "box_maps", "cube_view_maps", "grad_cam", "register", "to_slice"]

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Network output (N, ...) -> one score per item (N,) whose gradient Grad-CAM follows."""


@dataclass(frozen=True)
class AxisMap:
    """Slice pixel index ``r`` -> model-input pixel coordinate ``u = scale * r + offset`` (one axis)."""

    scale: float
    offset: float

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Model-input coordinates of slice indices."""
        return self.scale * np.asarray(index, dtype=np.float64) + self.offset


def box_maps(box: tuple[int, int, int, int], size: Sequence[int]) -> tuple[AxisMap, AxisMap]:
    """Row and column maps of a crop ``box`` of the slice resized to ``size`` (M1, M3, M4).

    Parameters
    ----------
    box
        ``(row_start, row_stop, col_start, col_stop)`` of the crop in the slice, half-open; may reach
        outside the slice (as the ROI functions report it).
    size
        (rows, cols) of the model input.

    Returns
    -------
    tuple of AxisMap
        (rows, cols).
    """
    r0, r1, c0, c1 = (int(v) for v in box)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"empty crop box {box}")
    rows, cols = (int(v) for v in size)

    def axis(start: int, stop: int, out: int) -> AxisMap:
        scale = out / (stop - start)
        return AxisMap(scale=scale, offset=(0.5 - start) * scale - 0.5)

    return axis(r0, r1, rows), axis(c0, c1, cols)


def cube_view_maps(
    centroid_index: Sequence[float],
    spacing_zyx: Sequence[float],
    *,
    cube_voxels: int,
    spacing_mm: float,
    view_size: Sequence[int],
) -> tuple[AxisMap, AxisMap]:
    """Row and column maps of M2's axial view (cube rows = CT y, cube columns = CT x), resized.

    The cube of :func:`inference.imaging.roi.m2_cube` has ``n`` voxels a side whose centres lie at
    ``centroid + (i - (n - 1) / 2) * spacing_mm`` (mm, in the index-aligned frame); its views are
    resized from ``n`` to ``view_size``.

    Parameters
    ----------
    centroid_index
        Mask centroid as continuous (z, y, x) CT indices (``M2Input.centroid_index``).
    spacing_zyx
        CT voxel spacing (mm).
    cube_voxels
        ``n``, voxels per cube side.
    spacing_mm
        Isotropic cube spacing.
    view_size
        (rows, cols) of the views.

    Returns
    -------
    tuple of AxisMap
        (rows, cols).
    """
    n = int(cube_voxels)

    def axis(centre: float, spacing: float, out: int) -> AxisMap:
        # cube index i = (r * spacing - centre * spacing) / spacing_mm + (n - 1) / 2; view u = (i + 0.5) * out / n - 0.5
        per_index = spacing / spacing_mm
        return AxisMap(
            scale=per_index * out / n,
            offset=(-centre * per_index + (n - 1) / 2 + 0.5) * out / n - 0.5,
        )

    _, cy, cx = (float(v) for v in centroid_index)
    _, sy, sx = (float(v) for v in spacing_zyx)
    rows, cols = (int(v) for v in view_size)
    return axis(cy, sy, rows), axis(cx, sx, cols)


def to_slice(heatmap: np.ndarray, rows_map: AxisMap, cols_map: AxisMap, slice_shape: Sequence[int]) -> np.ndarray:
    """Register a map on the model-input grid back onto the CT slice grid.

    Parameters
    ----------
    heatmap
        2D map on the model-input grid (rows, cols).
    rows_map, cols_map
        Slice index -> model-input coordinate, per axis (:func:`box_maps`, :func:`cube_view_maps`).
    slice_shape
        (rows, columns) of the CT slice.

    Returns
    -------
    numpy.ndarray
        float32 (rows, columns): bilinear samples of ``heatmap`` where the slice pixel maps inside
        the model input (pixel extents included: ``-0.5 <= u <= size - 0.5``), 0 elsewhere.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heat map must be 2D, got shape {heatmap.shape}")
    rows, cols = (int(v) for v in slice_shape)
    u = rows_map(np.arange(rows))
    v = cols_map(np.arange(cols))
    h, w = heatmap.shape
    inside_u = (u >= -0.5) & (u <= h - 0.5)
    inside_v = (v >= -0.5) & (v <= w - 0.5)
    out = np.zeros((rows, cols), dtype=np.float32)
    if not inside_u.any() or not inside_v.any():
        return out
    uu, vv = np.meshgrid(np.clip(u[inside_u], 0, h - 1), np.clip(v[inside_v], 0, w - 1), indexing="ij")
    sampled = ndimage.map_coordinates(heatmap, [uu, vv], order=1, mode="nearest")
    out[np.ix_(inside_u, inside_v)] = sampled.astype(np.float32)
    return out


def register(heatmap: np.ndarray, rows_map: AxisMap, cols_map: AxisMap, slice_shape: Sequence[int]) -> np.ndarray:
    """:func:`to_slice`, then scaled so that the slice's maximum is 1 (the key image shows it).

    Parameters
    ----------
    heatmap, rows_map, cols_map, slice_shape
        As for :func:`to_slice`.

    Returns
    -------
    numpy.ndarray
        float32 (rows, columns) in [0, 1]; all zero when nothing of the map reaches the slice.
    """
    out = to_slice(heatmap, rows_map, cols_map, slice_shape)
    peak = float(out.max())
    return (out / peak).astype(np.float32) if peak > 0 else out


@overload
def grad_cam(
    network: nn.Module,
    inputs: Sequence[torch.Tensor],
    layer: nn.Module,
    score: ScoreFn,
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = ...,
    size: Sequence[int] | None = ...,
    batch_size: int | None = ...,
    with_outputs: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def grad_cam(
    network: nn.Module,
    inputs: Sequence[torch.Tensor],
    layer: nn.Module,
    score: ScoreFn,
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = ...,
    size: Sequence[int] | None = ...,
    batch_size: int | None = ...,
    with_outputs: Literal[True],
) -> tuple[np.ndarray, torch.Tensor]: ...


def grad_cam(
    network: nn.Module,
    inputs: Sequence[torch.Tensor],
    layer: nn.Module,
    score: ScoreFn,
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    size: Sequence[int] | None = None,
    batch_size: int | None = None,
    with_outputs: bool = False,
) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM maps of ``layer`` for a batch, scaled to [0, 1] per item.

    The network runs in eval mode; its parameters do not record gradients (only the hooked feature
    map does), so memory stays close to a plain forward pass. The network is left as it was found.

    Parameters
    ----------
    network
        The method network.
    inputs
        Its forward arguments, first dimension = items (on the network's device).
    layer
        The module whose output is the explained feature map (N', C, h, w).
    score
        Network output -> (N,) scores (e.g. one logit column); items are independent in eval mode,
        so the gradient of their sum gives each item's own gradient.
    select
        Picks the items' feature maps out of the layer output when the layer sees more than one
        map per item (M2 with ``shared_views``: the axial view of every item); default: all.
    size
        (rows, cols) to upsample the maps to; default the spatial size of ``inputs[0]``.
    batch_size
        Items per forward / backward pass; default all at once.
    with_outputs
        Also return the network's outputs of the same forward pass (the eval-mode outputs the
        wrapper's ``predict`` would give), so a caller that explains every item needs one pass only.

    Returns
    -------
    numpy.ndarray or tuple
        float32 (N, rows, cols) in [0, 1]; with ``with_outputs``, also the outputs (N, ...) as a
        float32 CPU tensor.
    """
    n = int(inputs[0].shape[0])
    if n == 0 or any(int(t.shape[0]) != n for t in inputs):
        raise ValueError(f"inputs must share a non-zero first dimension, got {[tuple(t.shape) for t in inputs]}")
    target = tuple(int(s) for s in (size if size is not None else inputs[0].shape[-2:]))
    step = n if batch_size is None else max(1, int(batch_size))
    was_training = network.training
    requires = [p.requires_grad for p in network.parameters()]
    try:
        network.eval()
        for p in network.parameters():
            p.requires_grad_(False)
        chunks = [
            _grad_cam_chunk(network, [t[start : start + step] for t in inputs], layer, score, select, target)
            for start in range(0, n, step)
        ]
    finally:
        for p, flag in zip(network.parameters(), requires, strict=True):
            p.requires_grad_(flag)
        network.train(was_training)
    maps = np.concatenate([m for m, _ in chunks]).astype(np.float32)
    if with_outputs:
        return maps, torch.cat([o for _, o in chunks])
    return maps


def _grad_cam_chunk(
    network: nn.Module,
    inputs: Sequence[torch.Tensor],
    layer: nn.Module,
    score: ScoreFn,
    select: Callable[[torch.Tensor], torch.Tensor] | None,
    size: tuple[int, ...],
) -> tuple[np.ndarray, torch.Tensor]:
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            output = network(*inputs)
            if len(captured) != 1:
                raise RuntimeError(f"the explained layer ran {len(captured)} times in one forward pass (expected once)")
            activation = captured[0]
            (gradient,) = torch.autograd.grad(score(output).sum(), activation)
    finally:
        handle.remove()
    activation, gradient = activation.detach(), gradient.detach()
    if select is not None:
        activation, gradient = select(activation), select(gradient)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).float()
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(cam.dtype).tiny)[:, None, None]
    cam = (cam / peak).clamp(0.0, 1.0)  # an all-zero map stays zero
    return cam.cpu().numpy(), output.detach().float().cpu()
