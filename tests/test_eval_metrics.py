"""Metrics and statistics against independent computations on crafted images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from skimage.metrics import normalized_mutual_information, structural_similarity

from mrsynth.eval import metrics as M
from mrsynth.eval import stats as S


def _crafted(shape=(48, 40), seed=0) -> np.ndarray:
    """A smooth 'anatomy' with a few blobs plus texture: not symmetric, many grey levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = 100 + 50 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 80.0)
    img += 30 * np.sin(xx / 5.0) + rng.normal(0, 5, shape)
    return img


def _mask(shape=(48, 40)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - shape[0] / 2) ** 2 / 300 + (xx - shape[1] / 2) ** 2 / 200 < 1


def test_zscore_has_zero_mean_unit_std_in_region():
    img, mask = _crafted(), _mask()
    z = M.zscore(img)
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    zm = M.zscore(img, mask)
    assert abs(zm[mask].mean()) < 1e-12 and abs(zm[mask].std() - 1) < 1e-12
    assert np.all(M.zscore(np.full((5, 5), 3.0)) == 0)  # constant image: zeros, not NaN


def test_identical_images_mae_zero_and_mi_equals_entropy():
    # 8 grey levels with unequal, known frequencies: the entropy has a closed form.
    counts = np.array([1, 2, 3, 5, 8, 13, 21, 27])  # 80 pixels
    img = np.repeat(np.arange(8, dtype=float) * 7.0 + 3.0, counts)
    img = np.random.default_rng(1).permutation(img).reshape(8, 10)
    p = counts / counts.sum()
    entropy = -(p * np.log(p)).sum()
    m = M.image_metrics(img, img.copy())
    assert m["mae"] == 0.0
    assert m["psnr"] == math.inf
    assert m["mi"] == pytest.approx(entropy, rel=1e-12)
    assert m["nmi"] == pytest.approx(2.0, rel=1e-12)
    # also through scipy's entropy of the discretised image
    assert m["mi"] == pytest.approx(st.entropy(np.unique(img, return_counts=True)[1]), rel=1e-12)


def test_mi_cross_checks_with_skimage_nmi():
    real = _crafted(seed=2)
    syn = 0.7 * real + np.random.default_rng(3).normal(0, 20, real.shape)
    bins = 32
    rz, sz = M.zscore(real), M.zscore(syn)
    mi = M.mutual_information(rz, sz, bins=bins)
    # independent joint entropy from histogramdd: NMI = (Hx + Hy) / Hxy and MI = Hx + Hy - Hxy
    hist, _ = np.histogramdd([rz.ravel(), sz.ravel()], bins=bins)
    hxy = st.entropy(hist.ravel())
    nmi = normalized_mutual_information(rz, sz, bins=bins)
    assert mi == pytest.approx((nmi - 1.0) * hxy, rel=1e-9)
    assert M.normalized_mutual_information(rz, sz, bins=bins) == pytest.approx(nmi, rel=1e-12)
    assert 0 < mi < st.entropy(np.histogram(rz, bins=bins)[0])


def test_joint_histogram_counts_what_numpy_histogram2d_counts():
    """MI and NMI share one joint histogram made by a bincount; it must put every pair in
    numpy's bin: values on the inner edges (rounded data), the closed last bin, a constant
    image (numpy widens its range by 0.5), several bin counts. NMI from it equals
    scikit-image's on the same pairs."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(2, 3000))
        a = rng.normal(size=n) * rng.uniform(0.1, 10)
        b = 0.5 * a + rng.normal(size=n)
        if trial % 3 == 0:
            a = np.round(a * 2) / 2  # many values exactly on bin edges
        if trial % 5 == 0:
            b = np.full(n, 3.0)
        bins = int(rng.integers(2, 300))
        expected, _, _ = np.histogram2d(a, b, bins=bins)
        assert np.array_equal(M.joint_histogram(a, b, bins), expected), trial
        if trial % 5:
            assert M.normalized_mutual_information(a, b, bins=bins) == pytest.approx(
                normalized_mutual_information(a, b, bins=bins), rel=1e-12)
    img = _crafted()
    m = M.image_metrics(img, img + np.random.default_rng(8).normal(0, 9, img.shape), _mask())
    rz = M.zscore(img, _mask())[_mask()]
    sz = M.zscore(img + np.random.default_rng(8).normal(0, 9, img.shape), _mask())[_mask()]
    assert m["nmi"] == pytest.approx(normalized_mutual_information(rz, sz, bins=256), rel=1e-12)


def test_psnr_matches_closed_form_for_known_additive_noise():
    rng = np.random.default_rng(4)
    real_z = M.zscore(_crafted(seed=5))
    noise = rng.normal(0, 1, real_z.shape)
    sigma = 0.3
    noise = sigma * noise / np.sqrt(np.mean(noise**2))  # exact mean square sigma^2
    peak = real_z.max() - real_z.min()
    expected = 10 * np.log10(peak**2 / sigma**2)
    assert M.psnr(real_z, real_z + noise) == pytest.approx(expected, rel=1e-12)

    # Through the full pipeline: zero-mean noise orthogonal to the z-scored real image.
    n = rng.normal(0, 1, real_z.shape)
    n -= n.mean()
    n -= (n * real_z).mean() * real_z  # E[r n] = 0 since E[r^2] = 1
    n *= sigma / n.std()
    s = math.sqrt(1 + sigma**2)  # std of real_z + n
    mse = (1 - 1 / s) ** 2 + sigma**2 / s**2
    got = M.image_metrics(real_z * 12.0 + 40.0, real_z + n)["psnr"]
    assert got == pytest.approx(10 * np.log10(peak**2 / mse), rel=1e-9)


def test_metrics_invariant_to_positive_affine_intensity_change():
    real = _crafted(seed=6)
    syn = real + np.random.default_rng(7).normal(0, 15, real.shape)
    mask = _mask()
    for region_mask in (None, mask):
        base = M.image_metrics(real, syn, region_mask)
        changed = M.image_metrics(3.5 * real - 200.0, 0.02 * syn + 7.0, region_mask)
        for k in M.METRICS:
            assert changed[k] == pytest.approx(base[k], rel=1e-9, abs=1e-12), k
    # but not invariant to a non-affine change: sanity check the test can fail
    squared = M.image_metrics(real, syn**2)["mae"]
    assert squared != pytest.approx(M.image_metrics(real, syn)["mae"])


def test_brain_mask_uses_only_masked_pixels():
    real, mask = _crafted(seed=8), _mask()
    syn = real.copy()
    syn[~mask] = np.random.default_rng(9).normal(0, 1000, (~mask).sum())  # garbage outside
    inside = M.image_metrics(real, syn, mask)
    assert inside["mae"] == pytest.approx(0.0, abs=1e-12)
    assert inside["psnr"] == math.inf
    whole = M.image_metrics(real, syn)
    assert whole["mae"] > 0.1
    # independent: MAE of masked z-scored pixels
    rz = (real[mask] - real[mask].mean()) / real[mask].std()
    syn2 = real * 1.0
    syn2[mask] += np.linspace(0, 1, mask.sum())
    sz = (syn2[mask] - syn2[mask].mean()) / syn2[mask].std()
    assert M.image_metrics(real, syn2, mask)["mae"] == pytest.approx(np.abs(sz - rz).mean())


def test_ssim_uses_reference_range_and_mask_average():
    real = _crafted(seed=10)
    syn = real + np.random.default_rng(11).normal(0, 10, real.shape)
    rz, sz = M.zscore(real), M.zscore(syn)
    want = structural_similarity(rz, sz, data_range=rz.max() - rz.min())
    assert M.image_metrics(real, syn)["ssim"] == pytest.approx(want, rel=1e-12)
    assert M.image_metrics(real, real)["ssim"] == pytest.approx(1.0)
    mask = _mask()
    rzm, szm = M.zscore(real, mask), M.zscore(syn, mask)
    _, smap = structural_similarity(rzm, szm, data_range=np.ptp(rzm[mask]), full=True)
    assert M.image_metrics(real, syn, mask)["ssim"] == pytest.approx(smap[mask].mean())


def test_relative_error_map():
    real, mask = _crafted(seed=12), _mask()
    syn = real + 5.0 * np.random.default_rng(13).normal(size=real.shape)
    rel = M.relative_error_map(real, syn, mask, eps=0.1)
    assert np.isnan(rel[~mask]).all() and np.isfinite(rel[mask]).all()
    rz, sz = M.zscore(real, mask), M.zscore(syn, mask)
    want = np.abs(sz - rz)[mask] / np.maximum(np.abs(rz[mask]), 0.1)
    np.testing.assert_allclose(rel[mask], want)
    assert np.nanmax(rel) <= np.abs(sz - rz)[mask].max() / 0.1 + 1e-12
    assert np.all(M.relative_error_map(real, real, mask)[mask] == 0)


def test_bootstrap_ci_covers_mean_and_is_deterministic():
    x = np.random.default_rng(14).normal(5.0, 2.0, 200)
    lo, hi = S.bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi
    # normal-theory interval of the mean as an independent check (within 15 %)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert (hi - lo) == pytest.approx(2 * half, rel=0.15)
    assert S.bootstrap_ci(x, seed=3) == (lo, hi)
    assert S.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in S.bootstrap_ci([math.inf]))


def _rows(values_by_model: dict[str, np.ndarray], direction="A2B", region="image"):
    rows = []
    for model, vals in values_by_model.items():
        for i, v in enumerate(vals):
            r = {"subject": f"s{i % 3}", "slice": i, "model": model, "direction": direction,
                 "region": region}
            r.update({m: float(v) for m in M.METRICS})
            rows.append(r)
    return rows


def test_summary_and_paired_wilcoxon_match_scipy():
    rng = np.random.default_rng(15)
    a = rng.normal(1.0, 0.2, 30)
    b = a + rng.normal(0.15, 0.05, 30)  # consistently worse
    c = a.copy()
    rows = _rows({"a": a, "b": b, "c": c})
    rows[0]["psnr"] = math.inf  # excluded from statistics
    summ = {(s["model"], s["metric"]): s for s in S.summarize(rows)}
    assert summ[("a", "mae")]["mean"] == pytest.approx(a.mean())
    assert summ[("a", "mae")]["std"] == pytest.approx(a.std(ddof=1))
    assert summ[("a", "mae")]["median"] == pytest.approx(np.median(a))
    assert summ[("a", "psnr")]["n"] == 29 and summ[("a", "psnr")]["n_excluded"] == 1
    tests = {(t["model_a"], t["model_b"], t["metric"]): t for t in S.paired_wilcoxon(rows)}
    ab = tests[("a", "b", "mae")]
    assert ab["p_value"] == pytest.approx(st.wilcoxon(a, b).pvalue)
    assert ab["median_diff"] == pytest.approx(np.median(a - b))
    assert ab["p_value"] < 1e-5 and ab["n"] == 30
    assert tests[("a", "c", "mae")]["p_value"] == 1.0
    assert tests[("a", "b", "psnr")]["n"] == 29  # the inf image is dropped from the pair
    # Holm: three tests in the family, smallest p multiplied by 3
    fam = [t for t in tests.values() if t["metric"] == "mae"]
    pmin = min(t["p_value"] for t in fam)
    assert min(t["p_holm"] for t in fam) == pytest.approx(min(1.0, 3 * pmin))


def test_holm_matches_definition():
    p = [0.01, 0.04, 0.03, float("nan"), 0.5]
    adj = S.holm(p)
    # sorted: 0.01*4, 0.03*3, 0.04*2, 0.5*1 with monotonicity
    assert adj[0] == pytest.approx(0.04)
    assert adj[2] == pytest.approx(0.09)
    assert adj[1] == pytest.approx(0.09)
    assert adj[4] == pytest.approx(0.5)
    assert math.isnan(adj[3])


def test_markdown_table_escapes_and_formats():
    summ = S.summarize(_rows({"m|x": np.array([1.0, 2.0, 3.0])}))
    header, body = S.summary_table(summ, "image")
    md = S.markdown_table(header, body)
    assert md.splitlines()[0].startswith("| model | kind | direction | MAE")
    assert md.splitlines()[2].startswith("| m\\|x | model | ")  # rows without kind: models
    assert "m\\|x" in md and "2.000 ± 1.000, median 2.000" in md
