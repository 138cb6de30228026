"""Training-time augmentation of method inputs (raw units, before z-scoring), reproducible per seed.

- **M1** (He et al. 2020): translations of 5 / 10 / 15 / 20 px and rotations of 1-15 degrees
  (the paper used 3-15 deg, then 1-5 deg; the demo uses smaller shifts on its smaller input).
  Each augmented image gets one random translation (magnitude from ``translate_px``, random
  direction per axis) and one rotation (uniform magnitude in ``rotate_deg``, random sign); border
  pixels are repeated.
- **M3**: random horizontal / vertical flips and rotations by multiples of 90 degrees - lossless
  on the windowed 0-255 crops.
- **M2** (Dong et al. 2021): "image translation, rotation, and vertical and horizontal flipping ...
  The rotation angle was selected from 90, 180, 270 degrees, and the translation was horizontal or
  vertical", for each slice: each of the nine views gets its own flip / quarter turn / translation
  along one axis (10 or 20 px of the 299 px view; the paper gives no magnitude).
- **M4**: the M1 scheme on the patch (the Deep-RadScore paper gives none).

``Augmentation.apply(batch, rng)`` returns a new array; the input is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_AUGMENTATION", "Augmentation", "affine2d", "flip_rotate"]


def affine2d(
    image: np.ndarray, shift: tuple[float, float], angle_deg: float, *, order: Literal[0, 1, 2, 3, 4, 5] = 1
) -> np.ndarray:
    """Rotate a 2D image about its centre by ``angle_deg`` and shift it by ``shift`` (rows, cols) pixels.

    Parameters
    ----------
    image
        (H, W) array.
    shift
        Translation in pixels (positive: down / right).
    angle_deg
        Counter-clockwise rotation in degrees.
    order
        Spline order of the interpolation (0 to 5).

    Returns
    -------
    numpy.ndarray
        float32 (H, W); pixels from outside take the nearest border value.
    """
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    centre = (np.asarray(image.shape, dtype=float) - 1) / 2
    offset = centre - rotation @ (centre + np.asarray(shift, dtype=float))
    out = ndimage.affine_transform(
        np.asarray(image, dtype=np.float32), rotation, offset=offset, order=order, mode="nearest"
    )
    return out.astype(np.float32)


def flip_rotate(image: np.ndarray, flip_rows: bool, flip_cols: bool, quarter_turns: int) -> np.ndarray:
    """Flip and rotate by multiples of 90 degrees over the last two axes (lossless)."""
    out = image
    if flip_rows:
        out = out[..., ::-1, :]
    if flip_cols:
        out = out[..., :, ::-1]
    return np.ascontiguousarray(np.rot90(out, k=quarter_turns % 4, axes=(-2, -1)))


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings (``[training.augment]``).

    Parameters
    ----------
    probability
        Chance that an item is augmented at all.
    translate_px
        Translation magnitudes to choose from (pixels); empty: none.
    rotate_deg
        ``(min, max)`` rotation magnitude in degrees; ``(0, 0)``: none.
    flips
        Random flips along both in-plane axes.
    quarter_turns
        Random rotations by multiples of 90 degrees (square inputs only).
    translate_axes
        ``"both"``: a translation moves along rows and columns (each -1 / 0 / +1 times the
        magnitude); ``"one"``: along rows or along columns only (M2's "horizontal or vertical").
    independent_views
        For (V, H, W) items: draw the transformation of each view separately (M2: per slice)
        instead of one for all views.
    """

    probability: float = 0.0
    translate_px: tuple[float, ...] = ()
    rotate_deg: tuple[float, float] = (0.0, 0.0)
    flips: bool = False
    quarter_turns: bool = False
    translate_axes: str = "both"
    independent_views: bool = False

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None, default: Augmentation) -> Augmentation:
        """Settings from a TOML table, keys not given taken from ``default``; ``enabled = false`` turns it off."""
        if table is None:
            return default
        known = {*cls.__dataclass_fields__, "enabled"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"[training.augment] has unknown key(s) {unknown}; allowed: {sorted(known)}")
        if not table.get("enabled", True):
            return cls()
        values = {k: table.get(k, getattr(default, k)) for k in cls.__dataclass_fields__}
        values["translate_px"] = tuple(float(v) for v in values["translate_px"])
        values["rotate_deg"] = tuple(float(v) for v in values["rotate_deg"])
        if len(values["rotate_deg"]) != 2:
            raise ValueError("[training.augment] rotate_deg must be [min, max]")
        if values["translate_axes"] not in ("both", "one"):
            raise ValueError(f"[training.augment] translate_axes must be both or one, got {values['translate_axes']!r}")
        return cls(**values)

    @property
    def active(self) -> bool:
        """True when it changes anything."""
        return self.probability > 0 and (
            bool(self.translate_px) or self.rotate_deg[1] > 0 or self.flips or self.quarter_turns
        )

    def _one(self, item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.independent_views and item.ndim == 3:
            return np.stack([self._one(view, rng) for view in item])
        out = item
        if self.flips or self.quarter_turns:
            out = flip_rotate(
                out,
                bool(self.flips and rng.random() < 0.5),
                bool(self.flips and rng.random() < 0.5),
                int(rng.integers(4)) if self.quarter_turns else 0,
            )
        if self.translate_px or self.rotate_deg[1] > 0:
            shift = (0.0, 0.0)
            if self.translate_px:
                magnitude = float(rng.choice(self.translate_px))
                if self.translate_axes == "one":
                    step = magnitude * float(rng.choice([-1, 1]))
                    shift = (step, 0.0) if rng.random() < 0.5 else (0.0, step)
                else:
                    shift = (magnitude * rng.choice([-1, 0, 1]), magnitude * rng.choice([-1, 0, 1]))
            angle = float(rng.uniform(*self.rotate_deg)) * float(rng.choice([-1, 1]))
            views = out if out.ndim == 3 else out[None]
            out = np.stack([affine2d(v, shift, angle) for v in views]).reshape(out.shape)
        return out

    def apply(self, batch: np.ndarray | Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Augment each item of a batch (items along the first axis; an item is (H, W) or (V, H, W)).

        Returns
        -------
        numpy.ndarray
            float32, same shape as ``batch``.
        """
        batch = np.asarray(batch, dtype=np.float32)
        if not self.active:
            return batch.copy()
        out = np.empty_like(batch)
        for i, item in enumerate(batch):
            out[i] = self._one(item, rng) if rng.random() < self.probability else item
        return out


DEFAULT_AUGMENTATION: dict[str, Augmentation] = {
    "m1": Augmentation(probability=0.8, translate_px=(5, 10, 15, 20), rotate_deg=(1.0, 15.0)),
    "m2": Augmentation(
        probability=0.8,
        translate_px=(10, 20),
        flips=True,
        quarter_turns=True,
        translate_axes="one",
        independent_views=True,
    ),
    "m3": Augmentation(probability=0.8, flips=True, quarter_turns=True),
    "m4": Augmentation(probability=0.8, translate_px=(5, 10, 15, 20), rotate_deg=(1.0, 15.0)),
}
"""Per method, what ``[training.augment]`` starts from (the papers' schemes where they give one)."""
