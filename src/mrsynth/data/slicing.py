"""Axial slice selection, in-plane downsampling, and crop/pad to a fixed size (and back).

Geometry contract (also in :mod:`mrsynth.data.prepared`): on a canonical RAS+
volume ``V`` (after optional in-plane block averaging by ``f``), a stored slice
``S`` of size (H, W) with crop origin ``(row0, col0)`` is

    S[r, c] = V[r + row0, c + col0, k]        (outside V: background)

so rows run right-ward (x) and columns anterior-ward (y). :func:`uncrop`
inverts it; :func:`to_display` rotates a slice for viewing (anterior up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrsynth.data.normalise import BACKGROUND, normalise
from mrsynth.errors import ConfigError, DataError

DEFAULT_SLICES = "brain:0.10"

#: The planes a data set can be sliced in: each maps the (X, Y, Z) grid (canonical RAS+,
#: block-averaged in the axial plane by ``downsample``) to the plane's frame, whose last
#: axis runs across the slices: axial slices along z, coronal along y (rows x, columns z),
#: sagittal along x (rows y, columns z). Every plane keeps the one grid, so models trained
#: in different planes predict the same voxels and can be averaged (multi-view fusion).
PLANES: dict[str, tuple[int, int, int]] = {
    "axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def plane_of(settings: dict[str, Any] | None) -> str:
    """The plane recorded in preparation settings (files from before planes: axial)."""
    plane = (settings or {}).get("plane") or "axial"
    if plane not in PLANES:
        raise ConfigError(f"Unknown plane {plane!r} in the preparation settings; mrsynth knows "
                          f"{', '.join(PLANES)}.")
    return str(plane)


def check_plane(plane: str) -> str:
    """``plane`` if known, else a :class:`ConfigError` naming the choices."""
    if plane not in PLANES:
        raise ConfigError(f"--plane {plane!r} is not a plane; choose one of "
                          f"{', '.join(PLANES)}.")
    return plane


def slice_axis(plane: str) -> int:
    """The axis of the (X, Y, Z) grid that ``plane``'s slices are cut across."""
    return PLANES[plane][2]


def to_plane(vol: np.ndarray, plane: str) -> np.ndarray:
    """The (X, Y, Z) grid seen in ``plane``'s frame (a view, not a copy)."""
    return np.transpose(vol, PLANES[plane])


def from_plane(vol: np.ndarray, plane: str) -> np.ndarray:
    """Inverse of :func:`to_plane`."""
    return np.transpose(vol, np.argsort(PLANES[plane]))


@dataclass(frozen=True)
class SliceSpec:
    """A parsed ``--slices`` value.

    ``kind`` is ``"index"`` (explicit indices), ``"range"`` (``start:stop``, stop
    exclusive) or ``"brain"`` (every slice whose brain voxels are at least
    ``fraction`` of the slice's in-plane area).
    """

    kind: str
    indices: tuple[int, ...] = ()
    start: int = 0
    stop: int | None = None
    fraction: float = 0.0
    text: str = ""

    @classmethod
    def parse(cls, text: str | int) -> SliceSpec:
        t = str(text).strip().replace(" ", "")
        m = re.fullmatch(r"brain(?::(\d*\.?\d+)(%)?)?", t)
        if m:
            frac = float(m.group(1)) if m.group(1) else 0.10
            if m.group(2):
                frac /= 100.0
            if not 0.0 <= frac <= 1.0:
                raise ConfigError(
                    f"--slices {text!r}: the brain fraction must be between 0 and 1 "
                    "(or a percentage like brain:10%)."
                )
            return cls("brain", fraction=frac, text=f"brain:{frac:g}")
        m = re.fullmatch(r"(\d*):(\d*)", t)
        if m:
            start = int(m.group(1)) if m.group(1) else 0
            stop = int(m.group(2)) if m.group(2) else None
            if stop is not None and stop <= start:
                raise ConfigError(f"--slices {text!r}: the range is empty (stop <= start).")
            return cls("range", start=start, stop=stop, text=t)
        if re.fullmatch(r"\d+(,\d+)*", t):
            idx = tuple(sorted({int(v) for v in t.split(",")}))
            return cls("index", indices=idx, text=t)
        raise ConfigError(
            f"--slices {text!r} is not understood. Use one index (\"120\"), several "
            "(\"100,120\"), a range (\"60:100\", end exclusive) or \"brain:F\" (every axial slice "
            "with at least a fraction F of brain voxels, e.g. brain:0.10)."
        )

    def select(self, mask: np.ndarray, *, name: str = "volume", step: int = 1,
               plane: str = "axial") -> np.ndarray:
        """Slice indices (into ``mask.shape[2]``, the ``plane``'s slices) this spec picks,
        every ``step``-th."""
        nz = mask.shape[2]
        if self.kind == "index":
            bad = [i for i in self.indices if i >= nz]
            if bad:
                raise DataError(
                    f"{name} has {nz} {plane} slices (0..{nz - 1}), so slice {bad[0]} does not "
                    "exist. Choose indices inside every subject's range, or use --slices "
                    "brain:F to pick slices by brain content."
                )
            idx = np.asarray(self.indices, dtype=np.int64)
        elif self.kind == "range":
            stop = nz if self.stop is None else min(self.stop, nz)
            idx = np.arange(min(self.start, nz), stop, dtype=np.int64)
        else:
            frac = mask.reshape(-1, nz).mean(axis=0)
            idx = np.flatnonzero(frac >= self.fraction) if self.fraction > 0 else np.flatnonzero(
                frac > 0
            )
        return idx[::step]


def block_average(stack: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor`` x ``factor`` blocks over the first two axes.

    The array is padded at the far edges by repeating the edge, so no voxel is lost;
    output shape is ``ceil(shape / factor)``. Works on (X, Y) or (X, Y, Z) arrays.
    """
    if factor == 1:
        return stack
    x, y = stack.shape[:2]
    px, py = (-x) % factor, (-y) % factor
    if px or py:
        pad = [(0, px), (0, py)] + [(0, 0)] * (stack.ndim - 2)
        stack = np.pad(stack, pad, mode="edge")
    nx, ny = stack.shape[0] // factor, stack.shape[1] // factor
    rest = stack.shape[2:]
    blocks = stack.reshape(nx, factor, ny, factor, *rest)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(
        stack.dtype if stack.dtype.kind == "f" else np.float32
    )


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Block-average a boolean mask and keep blocks that are at least half brain."""
    if factor == 1:
        return mask
    return block_average(mask.astype(np.float32), factor) >= 0.5


def brain_origin(mask: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Crop origin ``(row0, col0)`` that centres the brain's in-plane bounding box in (H, W).

    ``mask`` is (X, Y) or (X, Y, Z); the bounding box is taken over all slices so a
    subject's slices share one origin (and stack back into a volume).
    """
    proj = mask if mask.ndim == 2 else mask.any(axis=2)
    rows = np.flatnonzero(proj.any(axis=1))
    cols = np.flatnonzero(proj.any(axis=0))
    if rows.size == 0:
        return image_origin(mask.shape[:2], size)
    cr = (rows[0] + rows[-1] + 1) / 2.0
    cc = (cols[0] + cols[-1] + 1) / 2.0
    return int(np.floor(cr - size[0] / 2.0 + 0.5)), int(np.floor(cc - size[1] / 2.0 + 0.5))


def outline_outside_crop(
    mask: np.ndarray, size: tuple[int, int], origin: tuple[int, int]
) -> tuple[int, int, int]:
    """Brain voxels a crop cuts off, so callers can warn instead of losing brain silently.

    ``mask`` is (X, Y[, Z]); its in-plane projection is compared with the crop at ``origin``.
    Returns (voxels of the projected outline outside the crop, brain rows, brain columns).
    """
    proj = mask.any(axis=2) if mask.ndim == 3 else mask.astype(bool)
    kept = int(crop_or_pad(proj, size, origin, fill=False).sum())
    rows = np.flatnonzero(proj.any(axis=1))
    cols = np.flatnonzero(proj.any(axis=0))
    span_r = int(rows[-1] - rows[0] + 1) if rows.size else 0
    span_c = int(cols[-1] - cols[0] + 1) if cols.size else 0
    return int(proj.sum()) - kept, span_r, span_c


def image_origin(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """Crop origin centring the whole (X, Y) plane in (H, W) (0, 0 when sizes match)."""
    return (int(shape[0]) - size[0]) // 2, (int(shape[1]) - size[1]) // 2


def _overlap(n_src: int, n_out: int, o: int) -> tuple[slice, slice]:
    """Slices into (source, output) along one axis for ``out[i] = src[i + o]``."""
    s0, s1 = max(o, 0), min(o + n_out, n_src)
    if s1 <= s0:
        return slice(0, 0), slice(0, 0)
    return slice(s0, s1), slice(s0 - o, s1 - o)


def crop_or_pad(
    arr: np.ndarray, size: tuple[int, int], origin: tuple[int, int], fill: float = -1.0
) -> np.ndarray:
    """Cut (H, W) out of an (X, Y[, ...]) array at ``origin``; pad with ``fill`` outside it.

    ``out[r, c] = arr[r + row0, c + col0]``. Extra trailing axes (slices) are kept,
    so an (X, Y, Z) volume gives (H, W, Z).
    """
    h, w = size
    out = np.full((h, w, *arr.shape[2:]), fill, dtype=arr.dtype)
    sr, orr = _overlap(arr.shape[0], h, origin[0])
    sc, oc = _overlap(arr.shape[1], w, origin[1])
    out[orr, oc] = arr[sr, sc]
    return out


def uncrop(
    arr: np.ndarray, shape: tuple[int, int], origin: tuple[int, int], fill: float = 0.0
) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: place an (H, W[, ...]) array back on an (X, Y) plane.

    Voxels that were cropped away (outside the (H, W) window) get ``fill``.
    """
    h, w = arr.shape[:2]
    out = np.full((int(shape[0]), int(shape[1]), *arr.shape[2:]), fill, dtype=arr.dtype)
    sr, orr = _overlap(out.shape[0], h, origin[0])
    sc, oc = _overlap(out.shape[1], w, origin[1])
    out[sr, sc] = arr[orr, oc]
    return out


def to_training_grid(
    data: np.ndarray,
    offset: float,
    scale: float,
    mask_ds: np.ndarray,
    downsample: int,
    size: tuple[int, int],
    origin: tuple[int, int],
) -> np.ndarray:
    """Full-resolution plane(s) (X, Y[, N]) -> what a network sees (H, W[, N]), float32.

    Block-average by ``downsample``, normalise with the volume's (offset, scale), clip to
    [-1, 1], set everything outside the downsampled brain mask ``mask_ds`` to background and
    crop/pad to ``size`` at ``origin``. ``prepare`` and ``translate`` both call this, so a
    volume is translated on exactly the grid and intensity scale the model was trained on.
    """
    norm = normalise(block_average(data, downsample), offset, scale)
    np.clip(norm, -1.0, 1.0, out=norm)
    norm[~mask_ds] = BACKGROUND
    return crop_or_pad(norm.astype(np.float32), size, origin, BACKGROUND)


def slices_first(stack: np.ndarray) -> np.ndarray:
    """(H, W, N) -> (N, H, W), contiguous."""
    return np.ascontiguousarray(np.moveaxis(stack, -1, 0))


def to_display(img: np.ndarray) -> np.ndarray:
    """Rotate stored slice(s) (..., H, W) for viewing: anterior at the top, subject's left
    on the left of the picture (neurological convention)."""
    return np.rot90(img, k=1, axes=(-2, -1))
