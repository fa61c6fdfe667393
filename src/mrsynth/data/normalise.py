"""Per-volume robust intensity scaling to [-1, 1] and its exact inverse.

MR intensities have no absolute unit: the shared data set alone spans an order
of magnitude between subjects, with negative voxels from bias correction. Each
volume is therefore mapped linearly so that its brain's robust range (two
percentiles inside the brain mask, by default 0.5 and 99.5) becomes [-1, 1]:

    x_norm = (x - offset) / scale,   offset = (lo + hi) / 2,   scale = (hi - lo) / 2

``offset`` and ``scale`` are stored with every slice so a generator's output
(tanh, in [-1, 1]) can be put back in the input's units with :func:`denormalise`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrsynth.errors import DataError

#: Percentiles of the brain's intensities mapped to -1 and +1.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)

#: Value given to voxels outside the brain mask in stored images.
BACKGROUND = -1.0


def fit_scale(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    *,
    name: str = "volume",
) -> tuple[float, float]:
    """``(offset, scale)`` mapping the ``percentiles`` of ``data[mask]`` to -1 and +1."""
    p_lo, p_hi = percentiles
    if not 0 <= p_lo < p_hi <= 100:
        raise DataError(
            f"Normalisation percentiles {percentiles} must satisfy 0 <= lo < hi <= 100."
        )
    values = data[mask] if mask is not None else data.ravel()
    if values.size == 0:
        raise DataError(
            f"{name}: the brain mask is empty, so there is nothing to normalise. The volume is "
            "probably all background; check it in a viewer."
        )
    lo, hi = np.percentile(values.astype(np.float64), [p_lo, p_hi])
    if not hi > lo:
        raise DataError(
            f"{name}: the brain's intensities between the {p_lo} and {p_hi} percentiles are all "
            f"{lo:g}, so they cannot be scaled to [-1, 1]. The volume is (nearly) constant inside "
            "the brain; check it, or exclude it."
        )
    return float((hi + lo) / 2.0), float((hi - lo) / 2.0)


def normalise(x: np.ndarray, offset: float | np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """``(x - offset) / scale`` in float64 (cast to float32 when storing)."""
    return (np.asarray(x, dtype=np.float64) - offset) / scale


def denormalise(y: np.ndarray, offset: float | np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`: ``y * scale + offset`` (back to the input's units)."""
    return np.asarray(y, dtype=np.float64) * scale + offset


def normalise_volume(
    data: np.ndarray,
    mask: np.ndarray,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    *,
    clip: bool = True,
    background: float = BACKGROUND,
    name: str = "volume",
) -> tuple[np.ndarray, float, float]:
    """Normalise ``data`` for training: scaled, optionally clipped to [-1, 1], background -1.

    Returns ``(float32 image, offset, scale)``. Clipping limits the few voxels outside
    the percentile range to what a tanh generator can produce.
    """
    offset, scale = fit_scale(data, mask, percentiles, name=name)
    out = normalise(data, offset, scale)
    if clip:
        np.clip(out, -1.0, 1.0, out=out)
    out[~mask] = background
    return out.astype(np.float32), offset, scale


def settings(
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES, clip: bool = True
) -> dict[str, Any]:
    """The ``settings["normalisation"]`` record of a prepared file."""
    return {
        "method": "percentile",
        "percentiles": [float(percentiles[0]), float(percentiles[1])],
        "range": [-1.0, 1.0],
        "formula": "x_norm = (x - offset) / scale",
        "clip": bool(clip),
        "background": BACKGROUND,
        "mask": "brain mask (joint over the contrasts of a subject)",
        "per": "volume",
    }
