"""Whole-volume metrics: how good a synthetic volume is in 3-D, not one slice at a time.

Slice-wise metrics (:mod:`mrsynth.eval.metrics`) cannot see what a slice-by-slice
translator gets wrong between slices: stripes and intensity jumps that show in
coronal and sagittal views. These metrics compare a synthetic volume with the real
one over the whole brain (definitions in ``docs/evaluation.md``, "Volume metrics"):

* Both volumes are **z-scored over the brain mask** (mean and standard deviation of
  the voxels inside ``mask``), so the metrics do not depend on either volume's units
  and agree with the study's per-image z-scoring; errors are in standard deviations.
* **MAE** = mean ``|syn_z - real_z|`` inside the mask.
* **PSNR** = ``10 log10(peak^2 / MSE)`` inside the mask, ``peak`` = the range of
  ``real_z`` inside the mask (scikit-image's ``peak_signal_noise_ratio``).
* **SSIM** = scikit-image's ``structural_similarity`` in 3-D (7x7x7 uniform window,
  ``data_range`` = the same peak), its map averaged inside the mask. Outside the
  mask both volumes are set to the same constant (the real brain's z-scored
  minimum, i.e. dark background) so that background differences do not count but
  windows at the brain's edge still see an edge.
* **Through-plane error** = mean ``|(syn_z[k+1] - syn_z[k]) - (real_z[k+1] - real_z[k])|``
  over neighbouring slices ``k, k+1`` along the slice axis (axial: axis 2 of a
  canonical RAS volume), at voxels inside the mask in both slices. It is zero
  when the synthetic volume changes from slice to slice exactly as the real one
  does, whatever its error within each slice, and grows with slice-to-slice
  jumps. **In-plane error** is the same along the two in-plane axes (their mean),
  and the **through-plane ratio** = through-plane / in-plane error: about 1 when
  errors are as smooth across slices as within them, above 1 for stripes.
"""

from __future__ import annotations

import numpy as np

#: Metric keys of :func:`volume_metrics`, in table order, with display names.
VOLUME_METRICS: dict[str, str] = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "mae": "MAE",
    "through_plane_mae": "through-plane error",
    "in_plane_mae": "in-plane error",
    "through_plane_ratio": "through/in-plane",
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True, "ssim": True, "mae": False, "through_plane_mae": False,
    "in_plane_mae": False, "through_plane_ratio": False,
}
#: SSIM window (voxels per side).
SSIM_WINDOW = 7


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with mean and std from the voxels inside ``mask`` (float64).

    A volume constant inside the mask becomes zeros (not NaN)."""
    x = np.asarray(x, dtype=np.float64)
    vals = x[mask]
    mu, sd = float(vals.mean()), float(vals.std())
    return (x - mu) / sd if sd > 0 else x - mu


def neighbour_difference_mae(syn_z: np.ndarray, real_z: np.ndarray, mask: np.ndarray,
                             axis: int) -> float:
    """Mean ``|diff(syn_z) - diff(real_z)|`` along ``axis`` where both neighbours are in the
    mask (NaN when no pair is)."""
    ds = np.diff(syn_z, axis=axis)
    dr = np.diff(real_z, axis=axis)
    n = mask.shape[axis]
    pair = np.take(mask, range(1, n), axis=axis) & np.take(mask, range(n - 1), axis=axis)
    if not pair.any():
        return float("nan")
    return float(np.abs(ds[pair] - dr[pair]).mean())


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin,
                                                           mask.shape[ax])))
    return tuple(box)


def volume_ssim(syn_z: np.ndarray, real_z: np.ndarray, mask: np.ndarray,
                data_range: float) -> float:
    """3-D SSIM of z-scored volumes averaged inside ``mask`` (see the module docstring).

    Computed on the mask's bounding box plus half a window: the windows centred on mask
    voxels are the same as on the whole volume, at a fraction of the memory."""
    from skimage.metrics import structural_similarity

    box = _bounding_box(mask, SSIM_WINDOW // 2)
    m = mask[box]
    fill = float(real_z[mask].min())
    s = np.where(m, syn_z[box], fill)
    r = np.where(m, real_z[box], fill)
    win = min(SSIM_WINDOW, *(d if d % 2 else d - 1 for d in m.shape))
    if win < 3:
        return float("nan")
    _, smap = structural_similarity(r, s, win_size=win, data_range=data_range, full=True)
    return float(smap[m].mean())


def volume_metrics(synthetic: np.ndarray, real: np.ndarray, mask: np.ndarray, *,
                   slice_axis: int = 2) -> dict[str, float]:
    """PSNR, SSIM, MAE, through-plane and in-plane error of ``synthetic`` vs ``real``.

    Both are 3-D arrays on the same grid; ``mask`` (bool, same shape) is the brain over
    which they are z-scored and compared; ``slice_axis`` is the axis the translator
    worked slice by slice along (2 = axial for canonical RAS volumes).
    """
    from skimage.metrics import peak_signal_noise_ratio

    syn = np.asarray(synthetic)
    ref = np.asarray(real)
    mask = np.asarray(mask, dtype=bool)
    if syn.shape != ref.shape or mask.shape != ref.shape or ref.ndim != 3:
        raise ValueError(
            f"volume_metrics needs three 3-D arrays of one shape, got {syn.shape}, "
            f"{ref.shape} and mask {mask.shape}"
        )
    if not mask.any():
        raise ValueError("volume_metrics: the mask is empty")
    s, r = zscore(syn, mask), zscore(ref, mask)
    rv, sv = r[mask], s[mask]
    peak = float(rv.max() - rv.min())
    mse = float(np.mean((sv - rv) ** 2))
    if mse == 0:
        psnr = float("inf")
    elif peak == 0:
        psnr = float("-inf")
    else:
        psnr = float(peak_signal_noise_ratio(rv, sv, data_range=peak))
    through = neighbour_difference_mae(s, r, mask, slice_axis)
    inplane_axes = [a for a in range(3) if a != slice_axis]
    inplane = float(np.mean([neighbour_difference_mae(s, r, mask, a) for a in inplane_axes]))
    ratio = through / inplane if inplane > 0 else float("nan")
    return {
        "psnr": psnr,
        "ssim": volume_ssim(s, r, mask, peak) if peak > 0 else float("nan"),
        "mae": float(np.mean(np.abs(sv - rv))),
        "through_plane_mae": through,
        "in_plane_mae": inplane,
        "through_plane_ratio": float(ratio),
        "n_voxels": int(mask.sum()),
    }
