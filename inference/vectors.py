"""Three numbers as a typed ``(x, y, z)`` tuple: points, radii, shifts, centroids.

``tuple(float(v) for v in values)`` has no length a type checker can see; :func:`vector3` says it
is three, and checks it. Light: no numpy needed (numpy scalars and arrays are accepted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import SupportsFloat

__all__ = ["vector3"]


def vector3(values: Iterable[SupportsFloat]) -> tuple[float, float, float]:
    """Exactly three numbers as a tuple of floats.

    Raises
    ------
    ValueError
        If there are not three values.
    """
    x, y, z = values
    return float(x), float(y), float(z)
