"""Volume metrics (mrsynth.eval.volume) against independent computations, on a real volume."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from mrsynth.eval.volume import volume_metrics, volume_ssim, zscore


@pytest.fixture(scope="module")
def real(mini_bids: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real T2w volume (half resolution) and its brain (non-zero voxels: skull-stripped)."""
    img = nib.load(mini_bids / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float64)
    return data, data != 0


def _z(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    v = x[m]
    return (x - v.mean()) / v.std()


def _ssim_by_hand(a: np.ndarray, b: np.ndarray, data_range: float, win: int = 7) -> np.ndarray:
    """Wang et al.'s SSIM map with a uniform window and sample covariances."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win ** a.ndim
    cov = n / (n - 1)
    ua, ub = uniform_filter(a, win), uniform_filter(b, win)
    vaa = cov * (uniform_filter(a * a, win) - ua * ua)
    vbb = cov * (uniform_filter(b * b, win) - ub * ub)
    vab = cov * (uniform_filter(a * b, win) - ua * ub)
    return ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua ** 2 + ub ** 2 + c1) * (vaa + vbb + c2))


def test_metrics_match_an_independent_computation(real):
    data, m = real
    rng = np.random.default_rng(0)
    syn = data + rng.normal(0, 0.1 * data[m].std(), data.shape) + 0.05 * data.mean()
    got = volume_metrics(syn, data, m)
    s, r = _z(syn, m), _z(data, m)
    mae = np.abs(s[m] - r[m]).mean()
    peak = r[m].max() - r[m].min()
    psnr = 10 * np.log10(peak ** 2 / np.mean((s[m] - r[m]) ** 2))
    fill = r[m].min()
    smap = _ssim_by_hand(np.where(m, r, fill), np.where(m, s, fill), peak)
    # through-plane: slice by slice, only voxels inside the brain in both slices
    errs = []
    for k in range(data.shape[2] - 1):
        both = m[:, :, k] & m[:, :, k + 1]
        ds = s[:, :, k + 1] - s[:, :, k]
        dr = r[:, :, k + 1] - r[:, :, k]
        errs.append(np.abs(ds - dr)[both])
    through = np.concatenate(errs).mean()
    assert got["mae"] == pytest.approx(mae, rel=1e-10)
    assert got["psnr"] == pytest.approx(psnr, rel=1e-10)
    assert got["ssim"] == pytest.approx(smap[m].mean(), rel=1e-6)
    assert got["through_plane_mae"] == pytest.approx(through, rel=1e-10)
    assert got["n_voxels"] == int(m.sum())
    # i.i.d. noise is as rough across slices as within them
    assert 0.8 < got["through_plane_ratio"] < 1.25


def test_ssim_on_the_brain_box_equals_ssim_on_the_whole_volume(real):
    from skimage.metrics import structural_similarity

    data, m = real
    syn = np.sqrt(np.abs(data)) * 10
    s, r = zscore(syn, m), zscore(data, m)
    peak = float(r[m].max() - r[m].min())
    fill = r[m].min()
    _, full = structural_similarity(np.where(m, r, fill), np.where(m, s, fill), win_size=7,
                                    data_range=peak, full=True)
    assert volume_ssim(s, r, m, peak) == pytest.approx(full[m].mean(), rel=1e-9)


def test_metrics_do_not_depend_on_units(real):
    data, m = real
    syn = np.sqrt(np.abs(data)) * 10
    a = volume_metrics(syn, data, m)
    b = volume_metrics(3.0 * syn - 50.0, 0.01 * data + 7.0, m)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-9), k
    ident = volume_metrics(data, data, m)
    assert ident["mae"] == 0 and ident["psnr"] == float("inf")
    assert ident["ssim"] == pytest.approx(1.0) and ident["through_plane_mae"] == 0


def test_slice_wise_jumps_score_worse_through_plane_than_a_smooth_error(real):
    """The same in-plane error pattern in every slice, once with a random sign per slice
    (jumps between slices) and once with one sign (smooth across slices): the same error
    at every voxel in size, very different through-plane error."""
    data, m = real
    rng = np.random.default_rng(1)
    nx, _, nz = data.shape
    pattern = 0.3 * data[m].std() * np.sin(2 * np.pi * np.arange(nx) / 17.0)[:, None, None]
    signs = rng.choice([-1.0, 1.0], nz)[None, None, :]
    jumpy = data + pattern * signs
    smooth = data + pattern * np.ones_like(signs)
    np.testing.assert_allclose(np.abs(jumpy - data), np.abs(smooth - data), atol=1e-9)
    j = volume_metrics(jumpy, data, m)
    s = volume_metrics(smooth, data, m)
    # in-plane quality alike
    assert j["mae"] == pytest.approx(s["mae"], rel=0.05)
    assert j["in_plane_mae"] == pytest.approx(s["in_plane_mae"], rel=0.15)
    # across slices the jumps are much worse
    assert j["through_plane_mae"] > 5 * s["through_plane_mae"]
    assert j["through_plane_ratio"] > 5 * s["through_plane_ratio"]


def test_bad_shapes_and_empty_masks_are_errors(real):
    data, m = real
    with pytest.raises(ValueError, match="same shape|one shape"):
        volume_metrics(data[:-1], data, m)
    with pytest.raises(ValueError, match="empty"):
        volume_metrics(data, data, np.zeros_like(m))
