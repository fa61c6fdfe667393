"""Trivial predictors every evaluation scores beside the trained runs.

A model is only worth reporting if it beats what needs no learning of
anatomy. Three baselines, named exactly as in every output (``kind`` =
``baseline``):

* ``baseline_identity``: the source slice itself as the prediction (what a
  model that learned nothing outputs; z-scored metrics then measure how alike
  the two contrasts already are).
* ``baseline_intensity``: a lookup table from normalised source intensity to
  the **median normalised target intensity**, fitted on the brain voxels of
  the prepared file's **training split** only (paired slices). No spatial
  context at all: the best any per-pixel intensity map can do for the absolute
  error in normalised units, before z-scoring (the median minimises absolute
  error within each bin). Bins: :data:`LUT_BINS`
  equal-width bins over [-1, 1] (the prepared data's clipped range; values
  outside are clipped into the end bins). Bins without training voxels take
  the value linearly interpolated between the nearest non-empty bins' centres
  (constant beyond the first/last non-empty bin). Outside the test slice's
  brain mask the prediction is -1, the prepared background.
* ``baseline_mean``: inside the brain mask, the real target slice's own brain
  mean everywhere (an oracle constant); -1 outside. After z-scoring inside
  the brain the prediction is all zeros there, so its in-brain MAE equals
  the mean ``|z|`` of the real slice inside the brain: the error of knowing
  only the brain's average brightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mrsynth.data.prepared import PreparedData

BASELINE_IDENTITY = "baseline_identity"
BASELINE_INTENSITY = "baseline_intensity"
BASELINE_MEAN = "baseline_mean"
#: Baseline names in table order.
BASELINES: tuple[str, ...] = (BASELINE_IDENTITY, BASELINE_INTENSITY, BASELINE_MEAN)
#: Number of equal-width lookup-table bins over [-1, 1].
LUT_BINS = 128
#: Prediction outside the brain (the prepared data's background value).
BACKGROUND = -1.0
#: At most this many training brain voxels enter the lookup table (about 0.4 GB while
#: fitting): a training split with more is read in a seeded random order of slices until the
#: cap, so a store of any size is fitted in bounded memory; below it the fit is exact.
LUT_MAX_VOXELS = 20_000_000
#: Training slices read per chunk while collecting the voxels.
LUT_CHUNK_SLICES = 64


def lut_bin(x: np.ndarray, bins: int = LUT_BINS) -> np.ndarray:
    """Bin index 0..bins-1 of normalised intensities (equal bins over [-1, 1], clipped)."""
    idx = np.floor((np.asarray(x, dtype=np.float64) + 1.0) * (bins / 2.0)).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


@dataclass(frozen=True)
class IntensityLUT:
    """Median target intensity per source-intensity bin (``table[i]`` for bin ``i``)."""

    table: np.ndarray  # (bins,) float64
    counts: np.ndarray  # (bins,) int64: training voxels per bin (0: interpolated)

    @property
    def bins(self) -> int:
        return int(self.table.size)

    def predict(self, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Table lookup inside ``mask``, :data:`BACKGROUND` outside; float32 like the models."""
        out = np.full(np.shape(source), BACKGROUND, dtype=np.float32)
        m = np.asarray(mask, dtype=bool)
        out[m] = self.table[lut_bin(np.asarray(source)[m], self.bins)]
        return out


def fit_intensity_lut(
    source: np.ndarray, target: np.ndarray, mask: np.ndarray, bins: int = LUT_BINS
) -> IntensityLUT:
    """Fit the lookup table on the voxels inside ``mask`` (all arrays of one shape).

    Per bin: the median of the target values whose source value falls in it
    (NumPy's median: the mean of the two middle values for an even count).
    """
    m = np.asarray(mask, dtype=bool)
    x = np.asarray(source)[m]
    y = np.asarray(target, dtype=np.float64)[m]
    if x.size == 0:
        raise ValueError("no voxels inside the mask to fit the intensity lookup table on")
    b = lut_bin(x, bins)
    order = np.lexsort((y, b))  # by bin, then by value: each bin's values sorted
    b, y = b[order], y[order]
    counts = np.bincount(b, minlength=bins)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    filled = counts > 0
    lo = starts[filled] + (counts[filled] - 1) // 2
    hi = starts[filled] + counts[filled] // 2
    table = np.full(bins, np.nan)
    table[filled] = (y[lo] + y[hi]) / 2.0
    centres = -1.0 + (np.arange(bins) + 0.5) * (2.0 / bins)
    table[~filled] = np.interp(centres[~filled], centres[filled], table[filled])
    return IntensityLUT(table=table, counts=counts.astype(np.int64))


def fit_on_training_split(
    data: PreparedData, source: str, target: str, bins: int = LUT_BINS,
    max_voxels: int = LUT_MAX_VOXELS,
) -> IntensityLUT | None:
    """The table for ``source -> target`` from the paired training slices; None if there are none.

    Only ``split == "train"`` slices with both contrasts enter, so the test
    split (what the table is scored on) never influences it. The slices are read
    :data:`LUT_CHUNK_SLICES` at a time and only their brain voxels kept; past
    :data:`LUT_MAX_VOXELS` voxels the rest are not read (the slices are taken in a
    random order fixed by the file, so the sample spans the subjects). Below the cap
    the table is exactly the one fitted on every training voxel.
    """
    rows = np.flatnonzero(
        (data.split == "train")
        & data.available[source].astype(bool)
        & data.available[target].astype(bool)
    )
    x, y = _training_voxels(data, source, target, rows, max_voxels)
    if x.size == 0:
        return None
    return fit_intensity_lut(x, y, np.ones(x.shape, bool), bins)


def _training_voxels(data: PreparedData, source: str, target: str, rows: np.ndarray,
                     max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target values (float32) of the brain voxels of ``rows``, chunk by chunk."""
    order = np.random.default_rng(rows.size).permutation(rows)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    n = 0
    for i in range(0, order.size, LUT_CHUNK_SLICES):
        chunk = np.sort(order[i:i + LUT_CHUNK_SLICES])  # sorted: sequential shard reads
        m = np.asarray(data.mask[chunk], dtype=bool)
        if not m.any():
            continue
        xs.append(np.asarray(data.images[source][chunk], dtype=np.float32)[m])
        ys.append(np.asarray(data.images[target][chunk], dtype=np.float32)[m])
        n += xs[-1].size
        if n >= max_voxels:
            break
    if not xs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(xs)[:max_voxels], np.concatenate(ys)[:max_voxels]


def predict_identity(source: np.ndarray) -> np.ndarray:
    """The source slices themselves (float32 copy)."""
    return np.array(source, dtype=np.float32, copy=True)


def predict_mean(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each real slice's brain mean inside its mask, :data:`BACKGROUND` outside (N, H, W)."""
    t = np.asarray(target, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    n_in = m.reshape(m.shape[0], -1).sum(axis=1)
    sums = np.where(m, t, 0.0).reshape(t.shape[0], -1).sum(axis=1)
    means = np.divide(sums, n_in, out=np.full(n_in.shape, BACKGROUND), where=n_in > 0)
    return np.where(m, means[:, None, None], BACKGROUND).astype(np.float32)
