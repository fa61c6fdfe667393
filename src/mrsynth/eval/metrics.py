"""Image-similarity metrics of the study, on per-image z-scored images.

The study compared synthetic and real slices after z-scoring each image
(subtract its mean, divide by its standard deviation) and reported MAE, PSNR
and mutual information. Its code holds no metric code, so the exact
definitions are ours; they are fixed here and in ``docs/evaluation.md``:

* **Region.** ``mask=None`` ("image", the study's choice): mean/std and every
  metric use the whole slice. With a boolean ``mask`` ("brain"): mean/std come
  from the pixels inside the mask and the metrics use only those pixels (SSIM:
  its local map is computed on the whole z-scored slice and averaged inside the
  mask, because SSIM needs 2-D windows).
* **Z-scoring.** ``z = (x - mean) / std`` in float64. A constant image
  (std 0) becomes all zeros rather than NaN.
* **MAE** = mean ``|syn_z - real_z|`` (in units of standard deviations).
* **PSNR** = ``10 log10(peak^2 / MSE)`` dB with ``peak = max(real_z) - min(real_z)``
  over the region. Why: z-scored images have no nominal range such as [0, 1]
  or [0, 255]; the data range of the *reference* image is the peak-to-peak
  signal it actually carries, is invariant to the input's units (as z-scoring
  intends), and is what scikit-image would use for ``data_range`` on that
  image. Identical images give ``inf``.
* **MI** = plain mutual information ``H(real) + H(syn) - H(real, syn)`` in
  **nats** (natural log) from the joint histogram ``numpy.histogram2d`` counts with
  ``bins`` (default 256) equal-width bins spanning each image's own min..max in the
  region (:func:`joint_histogram`).
  For identical images it equals the entropy of the discretised image.
* **NMI** = Studholme's ``(H(real) + H(syn)) / H(real, syn)`` from the same joint
  histogram, between 1 (independent) and 2 (identical): what scikit-image's
  ``normalized_mutual_information`` returns with the same bins (tested), computed
  from the one histogram MI uses because the two library calls took about a sixth
  of an evaluation's time. A different quantity from MI, reported in its own column.
* **SSIM** = scikit-image's ``structural_similarity`` (7x7 uniform window) with
  ``data_range`` = the same peak as PSNR.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity as _sk_ssim

#: Metric names in the order they appear in tables.
METRICS: tuple[str, ...] = ("mae", "psnr", "mi", "nmi", "ssim")
#: Display names and whether higher is better.
METRIC_LABELS: dict[str, str] = {
    "mae": "MAE",
    "psnr": "PSNR (dB)",
    "mi": "MI (nats)",
    "nmi": "NMI",
    "ssim": "SSIM",
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "mae": False, "psnr": True, "mi": True, "nmi": True, "ssim": True,
}
#: Regions over which z-scoring and metrics are computed.
REGIONS: tuple[str, ...] = ("image", "brain")
DEFAULT_BINS = 256
#: Denominator floor of the relative error map, in z units (standard deviations).
RELATIVE_ERROR_EPS = 0.1


def _region(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if mask is None:
        return x.ravel()
    m = np.asarray(mask, dtype=bool)
    if m.shape != x.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {x.shape}")
    return x[m]


def zscore(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Whole image ``(x - mean) / std`` with mean/std taken inside ``mask`` (or everywhere)."""
    x = np.asarray(x, dtype=np.float64)
    vals = _region(x, mask)
    if vals.size == 0:
        raise ValueError("cannot z-score over an empty region")
    mean = float(vals.mean())
    std = float(vals.std())
    return (x - mean) / std if std > 0 else x - mean


def mae(real_z: np.ndarray, syn_z: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error of (already z-scored) images over the region."""
    return float(np.mean(np.abs(_region(syn_z, mask) - _region(real_z, mask))))


def psnr_peak(real_z: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The PSNR/SSIM peak: the reference image's data range (max - min) in the region."""
    r = _region(real_z, mask)
    return float(r.max() - r.min())


def psnr(real_z: np.ndarray, syn_z: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB with the reference's data range as peak (see the module docstring)."""
    r, s = _region(real_z, mask), _region(syn_z, mask)
    mse = float(np.mean((s - r) ** 2))
    peak = float(r.max() - r.min())
    if mse == 0.0:
        return float("inf")
    if peak == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(peak * peak / mse))


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def joint_histogram(a: np.ndarray, b: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``bins`` x ``bins`` joint histogram of two equally long arrays, bin for bin what
    ``numpy.histogram2d(a, b, bins)`` counts (equal-width bins over each array's min..max,
    the last bin closed; a constant array spans min - 0.5..max + 0.5), in one ``bincount``:
    histogram2d's general N-d code was most of the time of MI on a 128 x 128 slice."""

    def index(v: np.ndarray) -> np.ndarray:
        lo, hi = float(v.min()), float(v.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        i = np.searchsorted(edges, v, side="right") - 1
        i[v == edges[-1]] = bins - 1
        return i

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    flat = np.bincount(index(a) * bins + index(b), minlength=bins * bins)
    return flat.reshape(bins, bins)


def _entropies(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None,
               bins: int) -> tuple[float, float, float]:
    """H(a), H(b), H(a, b) in nats over ``mask``, from one joint histogram (MI and NMI)."""
    joint = joint_histogram(_region(a, mask), _region(b, mask), bins)
    pxy = joint / joint.sum()
    return _entropy(pxy.sum(axis=1)), _entropy(pxy.sum(axis=0)), _entropy(pxy.ravel())


def mutual_information(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = DEFAULT_BINS
) -> float:
    """Mutual information in nats from a ``bins`` x ``bins`` joint histogram.

    MI is invariant to how each image is scaled, but its value depends on the
    bins; 256 equal-width bins over each image's range is the usual choice for
    8-bit-like images and is what the report states.
    """
    ha, hb, hab = _entropies(a, b, mask, bins)
    return ha + hb - hab


def normalized_mutual_information(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = DEFAULT_BINS
) -> float:
    """Studholme's NMI ``(H(a) + H(b)) / H(a, b)`` (1 to 2), as scikit-image computes it."""
    ha, hb, hab = _entropies(a, b, mask, bins)
    return _nmi(ha, hb, hab)


def _nmi(ha: float, hb: float, hab: float) -> float:
    return (ha + hb) / hab if hab > 0 else float("nan")


def ssim(real_z: np.ndarray, syn_z: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM (scikit-image, 7x7 uniform window) with the PSNR peak as ``data_range``."""
    r = np.asarray(real_z, dtype=np.float64)
    s = np.asarray(syn_z, dtype=np.float64)
    peak = psnr_peak(r, mask)
    if peak == 0.0:
        return float("nan")
    if mask is None:
        return float(_sk_ssim(r, s, data_range=peak))
    _, smap = _sk_ssim(r, s, data_range=peak, full=True)
    return float(smap[np.asarray(mask, dtype=bool)].mean())


def image_metrics(
    real: np.ndarray,
    syn: np.ndarray,
    mask: np.ndarray | None = None,
    bins: int = DEFAULT_BINS,
) -> dict[str, float]:
    """All metrics of one synthetic image against its real counterpart.

    Both images are z-scored over the region first, so any positive affine
    change of either image's intensities (``a * x + b``, ``a > 0``) leaves the
    results unchanged. A region with fewer than two pixels gives NaN metrics.
    """
    real = np.asarray(real, dtype=np.float64)
    syn = np.asarray(syn, dtype=np.float64)
    if real.shape != syn.shape or real.ndim != 2:
        raise ValueError(f"expected two 2-D images of one shape, got {real.shape}, {syn.shape}")
    if mask is not None and int(np.count_nonzero(mask)) < 2:
        return {m: float("nan") for m in METRICS}
    rz, sz = zscore(real, mask), zscore(syn, mask)
    ha, hb, hab = _entropies(rz, sz, mask, bins)
    return {
        "mae": mae(rz, sz, mask),
        "psnr": psnr(rz, sz, mask),
        "mi": ha + hb - hab,
        "nmi": _nmi(ha, hb, hab),
        "ssim": ssim(rz, sz, mask),
    }


def relative_error_map(
    real: np.ndarray,
    syn: np.ndarray,
    mask: np.ndarray | None = None,
    eps: float = RELATIVE_ERROR_EPS,
) -> np.ndarray:
    """``|syn_z - real_z| / max(|real_z|, eps)`` on z-scored images; NaN outside ``mask``.

    Both images are z-scored inside the mask (the brain), so the map shows how
    far each voxel is off relative to the real tissue contrast. Z-scored
    intensities cross zero inside the brain, so the denominator is floored at
    ``eps`` standard deviations (0.1 by default) to keep those voxels finite;
    NaN outside the mask renders as transparent in the figures.
    """
    rz, sz = zscore(real, mask), zscore(syn, mask)
    rel = np.abs(sz - rz) / np.maximum(np.abs(rz), eps)
    if mask is not None:
        rel = np.where(np.asarray(mask, dtype=bool), rel, np.nan)
    return rel
