"""Baselines, the verdict against ``baseline_intensity`` and the study's claims (issue 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrsynth.data.prepared import load_prepared
from mrsynth.eval import baselines as bl
from mrsynth.eval.findings import (
    INCONCLUSIVE,
    NOT_EVALUATED,
    NOT_REPRODUCED,
    REPRODUCED,
    findings,
    findings_from_rows,
    findings_rows,
)
from mrsynth.eval.metrics import image_metrics
from mrsynth.eval.stats import verdict, verdict_lines


# ----------------------------------------------------------------------------- lookup table
def _numpy_lut(src: np.ndarray, tgt: np.ndarray, mask: np.ndarray, bins: int) -> np.ndarray:
    """Independent per-bin median: a loop over bins with np.median, then neighbour
    interpolation of the empty bins by hand."""
    x, y = src[mask].astype(np.float64), tgt[mask].astype(np.float64)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    table = np.full(bins, np.nan)
    for i in range(bins):
        last = i == bins - 1
        sel = (x >= edges[i]) & ((x <= edges[i + 1]) if last else (x < edges[i + 1]))
        if sel.any():
            table[i] = np.median(y[sel])
    centres = (edges[:-1] + edges[1:]) / 2
    full = np.flatnonzero(~np.isnan(table))
    for i in np.flatnonzero(np.isnan(table)):
        left, right = full[full < i], full[full > i]
        if not left.size:
            table[i] = table[right[0]]
        elif not right.size:
            table[i] = table[left[-1]]
        else:
            lo, hi = left[-1], right[0]
            w = (centres[i] - centres[lo]) / (centres[hi] - centres[lo])
            table[i] = table[lo] + w * (table[hi] - table[lo])
    return table


def test_lut_equals_a_per_bin_numpy_median_on_a_hand_made_set():
    # 8 bins of width 0.25 over [-1, 1]. Bin 0: -1.0, -0.9 (even count: mean of the middle
    # two); bin 3 (-0.25..0): three values; bins 1, 2 empty (interpolated); bin 7 holds
    # exactly 1.0 (right edge belongs to the last bin); masked-out voxels must not count.
    src = np.array([[-1.0, -0.9, -0.2, -0.1, -0.05, 1.0, 0.3, 0.99]], dtype=np.float32)
    tgt = np.array([[0.1, 0.3, -0.5, 0.7, 0.2, -0.8, 0.4, 9.0]], dtype=np.float32)
    mask = np.array([[True, True, True, True, True, True, True, False]])
    lut = bl.fit_intensity_lut(src, tgt, mask, bins=8)
    want = _numpy_lut(src, tgt, mask, 8)
    np.testing.assert_allclose(lut.table, want, rtol=0, atol=1e-7)
    assert lut.table[0] == pytest.approx(0.2)  # median of 0.1, 0.3
    assert lut.table[3] == pytest.approx(0.2)  # median of -0.5, 0.7, 0.2
    # bins 1, 2 interpolated between bin 0 (0.2) and bin 3 (0.2); bin 4 between 3 and 5
    assert lut.table[4] == pytest.approx((0.2 + 0.4) / 2)
    assert lut.table[7] == pytest.approx(-0.8) and lut.counts.tolist() == [2, 0, 0, 3, 0, 1,
                                                                          0, 1]
    # prediction: table lookup inside the mask, -1 outside
    pred = lut.predict(src, mask)
    assert pred.dtype == np.float32 and pred[0, 7] == -1.0
    np.testing.assert_allclose(pred[0, :7], lut.table[[0, 0, 3, 3, 3, 7, 5]], atol=1e-7)


def test_lut_matches_numpy_on_random_data_with_128_bins():
    rng = np.random.default_rng(3)
    src = np.clip(rng.normal(0, 0.4, (5, 16, 16)), -1, 1).astype(np.float32)
    tgt = (np.tanh(2 * src) + rng.normal(0, 0.1, src.shape)).astype(np.float32)
    mask = rng.random(src.shape) < 0.7
    lut = bl.fit_intensity_lut(src, tgt, mask)
    assert lut.bins == bl.LUT_BINS == 128
    np.testing.assert_allclose(lut.table, _numpy_lut(src, tgt, mask, 128), atol=1e-6)


@pytest.fixture(scope="module")
def data(prepared_small: Path):
    return load_prepared(prepared_small)


def test_lut_is_fitted_on_the_training_split_only(data):
    lut = bl.fit_on_training_split(data, "T1w", "T2w")
    assert lut is not None
    rows = np.flatnonzero((data.split == "train") & data.paired)
    direct = bl.fit_intensity_lut(data.images["T1w"][rows], data.images["T2w"][rows],
                                  data.mask[rows])
    np.testing.assert_array_equal(lut.table, direct.table)
    # changing every test-split image leaves the table unchanged ...
    test = data.split == "test"
    changed = data.select(np.arange(len(data)))
    changed.images = {c: v.copy() for c, v in data.images.items()}
    rng = np.random.default_rng(0)
    for c in changed.images:
        changed.images[c][test] = rng.uniform(-1, 1, changed.images[c][test].shape)
    np.testing.assert_array_equal(bl.fit_on_training_split(changed, "T1w", "T2w").table,
                                  lut.table)
    # ... while changing training images does change it (the check can fail)
    changed.images["T2w"][rows[:10]] = 0.9
    assert not np.array_equal(bl.fit_on_training_split(changed, "T1w", "T2w").table,
                              lut.table)


def test_no_training_split_means_no_lookup_table(data):
    only_test = data.split_view("test")
    assert bl.fit_on_training_split(only_test, "T1w", "T2w") is None


def test_baseline_mean_in_brain_mae_is_the_mean_abs_z_of_the_real_slice(data):
    test = data.split_view("test")
    pred = bl.predict_mean(test.images["T2w"], test.mask)
    checked = 0
    for i in range(0, len(test), max(1, len(test) // 12)):
        m = test.mask[i]
        if m.sum() < 2:
            continue
        real = test.images["T2w"][i].astype(np.float64)
        v = real[m]
        mean_abs_z = np.abs((v - v.mean()) / v.std()).mean()
        assert np.all(pred[i][~m] == -1.0)
        assert np.allclose(pred[i][m], v.mean(), atol=1e-6)
        assert image_metrics(real, pred[i], m)["mae"] == pytest.approx(mean_abs_z, rel=1e-9)
        checked += 1
    assert checked >= 8


def test_identity_is_the_source():
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 4, 4)
    y = bl.predict_identity(x)
    np.testing.assert_array_equal(x, y)
    assert y is not x


# ----------------------------------------------------------------------------- verdict
def _rows(model: str, values: np.ndarray, direction: str = "T1w2T2w", region: str = "brain",
          metric: str = "mae", kind: str = "model", **other: np.ndarray) -> list[dict]:
    out = []
    for i, v in enumerate(values):
        r = {"subject": "sub-1", "slice": i, "model": model, "kind": kind,
             "direction": direction, "region": region, metric: float(v)}
        r.update({k: float(a[i]) for k, a in other.items()})
        out.append(r)
    return out


def test_verdict_a_model_equal_to_the_truth_beats_the_baseline_one_equal_to_it_does_not():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 30)
    rows = []
    for d in ("T1w2T2w", "T2w2T1w"):
        rows += _rows("baseline_intensity", base, d, kind="baseline")
        rows += _rows("truth", np.zeros(30), d)  # a perfect prediction: MAE 0
        rows += _rows("copycat", base, d)  # exactly the baseline's predictions
        rows += _rows("truth", np.zeros(30), d, region="image")  # other region: ignored
    v = verdict(rows, ["T1w2T2w", "T2w2T1w"])
    by = {(r["direction"], r["model"]): r for r in v}
    assert set(by) == {(d, m) for d in ("T1w2T2w", "T2w2T1w") for m in ("truth", "copycat")}
    for d in ("T1w2T2w", "T2w2T1w"):
        assert by[(d, "truth")]["beats"] and by[(d, "truth")]["p_value"] < 1e-6
        assert not by[(d, "copycat")]["beats"] and by[(d, "copycat")]["p_value"] == 1.0
        assert by[(d, "truth")]["mean_diff"] == pytest.approx(-base.mean())
    lines = verdict_lines(v, ["T1w2T2w", "T2w2T1w"])
    assert len(lines) == 2
    for line in lines:
        beat, _, rest = line.partition("Not better:")
        assert "beat baseline_intensity inside the brain: truth" in beat
        assert "copycat" not in beat and "copycat" in rest
        assert "p < 0.001, Holm < 0.001" in beat and "p = 1.000, Holm = 1.000" in rest


def test_verdict_without_the_baseline_says_so():
    rows = _rows("unit", np.ones(5))
    assert verdict(rows, ["T1w2T2w"]) == []
    assert "No verdict" in verdict_lines([], ["T1w2T2w"])[0]


# ----------------------------------------------------------------------------- findings
STUDY = ("simple", "cyclegan", "cyclegan_s", "unit", "generators_s")


def _study_rows(n: int = 40, seed: int = 0, tweak=None) -> list[dict]:
    """Per-slice tables shaped like the study's results: generators_s best, simple worst
    (except MI of synthetic T2, where it beats the CycleGAN family), the CycleGAN family
    identical, synthetic T1 better than synthetic T2. ``tweak(model, direction, err, mi)``
    changes one model's MAE and MI arrays."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.4, 0.6, n)  # how hard each slice is, shared by all models
    quality = {"generators_s": 0.0, "cyclegan": 0.2, "cyclegan_s": 0.2, "unit": 0.2,
               "simple": 0.4}
    rows = []
    for d, t2_penalty in (("T1w2T2w", 0.1), ("T2w2T1w", 0.0)):
        family = base + 0.2 + t2_penalty + rng.normal(0, 0.005, n)
        for m, q in quality.items():
            if m in ("cyclegan", "cyclegan_s", "unit"):
                err = family.copy()  # identical results: "alike"
            else:
                err = base + q + t2_penalty + rng.normal(0, 0.005, n)
            # synthetic T2: lower MI than synthetic T1; simple not worst (the exception)
            mi = 2.0 - err if d == "T2w2T1w" else 1.0 - err + (0.3 if m == "simple" else 0.0)
            if tweak:
                err, mi = tweak(m, d, err, mi)
            rows += [{"subject": "s", "slice": i, "model": m, "kind": "model",
                      "direction": d, "region": "image", "mae": float(err[i]),
                      "psnr": float(30 - 10 * err[i]), "mi": float(mi[i])} for i in range(n)]
    return rows


def _by_claim(found):
    return {f["claim"]: f for f in found}


def test_findings_reproduced_on_a_table_built_like_the_study():
    rows = _study_rows()
    found = _by_claim(findings(rows, {m: m for m in STUDY}, ("T1w", "T2w")))
    for claim in ("generators_s_best", "simple_worst", "cyclegan_unit_equal",
                  "t1_better_than_t2"):
        assert found[claim]["status"] == REPRODUCED, (claim, found[claim])
    g = found["generators_s_best"]["comparisons"]
    assert len(g) == 2 * 3 * 4  # directions x metrics x other models
    for c in g:
        assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
        assert (c["mean_diff"] < 0) == (c["metric"] == "mae")
    # the MI of synthetic T2 is the exception: not among simple's comparisons
    s = found["simple_worst"]["comparisons"]
    assert not any(c["metric"] == "mi" and c["direction"] == "T1w2T2w" for c in s)
    assert len(s) == 2 * 3 * 4 - 4
    # the CSV round trip keeps claims and statuses
    back = _by_claim(findings_from_rows([{k: str(v) for k, v in r.items()}
                                         for r in findings_rows(found.values())]))
    assert {k: v["status"] for k, v in back.items()} == {
        k: v["status"] for k, v in found.items()}


def test_findings_contradicted_and_inconclusive_claims():
    def worse_generators(m, d, err, mi):  # generators_s worst on MAE in one direction
        return (err + 1.0 if m == "generators_s" and d == "T2w2T1w" else err), mi

    found = _by_claim(findings(_study_rows(tweak=worse_generators), {m: m for m in STUDY},
                               ("T1w", "T2w")))
    assert found["generators_s_best"]["status"] == NOT_REPRODUCED
    outcomes = {c["outcome"] for c in found["generators_s_best"]["comparisons"]}
    assert outcomes == {"supports", "contradicts"}

    def unit_differs(m, d, err, mi):
        return (err + 0.3 if m == "unit" else err), mi

    found = _by_claim(findings(_study_rows(tweak=unit_differs), {m: m for m in STUDY},
                               ("T1w", "T2w")))
    assert found["cyclegan_unit_equal"]["status"] == NOT_REPRODUCED

    def t1_equal_t2(m, d, err, mi):  # same error in both directions: no evidence either way
        return (err - 0.1 if d == "T1w2T2w" else err), mi

    rows = _study_rows(tweak=t1_equal_t2)
    found = _by_claim(findings(rows, {m: m for m in STUDY}, ("T1w", "T2w")))
    assert found["t1_better_than_t2"]["status"] in (INCONCLUSIVE, NOT_REPRODUCED)
    assert any(c["outcome"] == "inconclusive"
               for c in found["t1_better_than_t2"]["comparisons"] if c["metric"] == "mae")


def test_findings_with_absent_models_say_not_evaluated():
    rows = [r for r in _study_rows() if r["model"] in ("cyclegan", "unit")]
    # labels that differ from model names, plus a baseline and a non-study model
    rows = [{**r, "model": f"{r['model']}-run"} for r in rows]
    models = {"cyclegan-run": "cyclegan", "unit-run": "unit", "pix2pix": "pix2pix"}
    found = _by_claim(findings(rows, models, ("T1w", "T2w")))
    assert found["generators_s_best"]["status"] == NOT_EVALUATED
    assert found["simple_worst"]["status"] == NOT_EVALUATED
    assert found["cyclegan_unit_equal"]["status"] == REPRODUCED
    assert {c["first"] for c in found["cyclegan_unit_equal"]["comparisons"]} == {
        "cyclegan-run"}
    assert found["t1_better_than_t2"]["status"] == REPRODUCED
    assert found["generators_s_best"]["comparisons"] == []
    # another contrast pair: the T1/T2 claim is not evaluated
    flair = [{**r, "direction": r["direction"].replace("T2w", "FLAIR")} for r in rows]
    found = _by_claim(findings(flair, models, ("T1w", "FLAIR")))
    assert found["t1_better_than_t2"]["status"] == NOT_EVALUATED


def test_lut_of_a_large_training_split_reads_a_bounded_sample(data, monkeypatch):
    """Past ``max_voxels`` training brain voxels the fit stops reading slices (a seeded
    random order of them, so every subject contributes) and the table stays close to the
    one fitted on every voxel; the whole split is never loaded at once."""
    rows = np.flatnonzero((data.split == "train") & data.paired)
    full = bl.fit_on_training_split(data, "T1w", "T2w")
    per_slice = int(np.asarray(data.mask[rows]).sum()) / rows.size
    cap = int(per_slice * rows.size / 3)  # a third of the training voxels
    monkeypatch.setattr(bl, "LUT_CHUNK_SLICES", 8)
    read: list[int] = []

    class Counting:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, key):
            out = self.arr[key]
            read.append(len(out))
            return out

    sampled = data.select(np.arange(len(data)))
    sampled.mask = Counting(data.mask)
    lut = bl.fit_on_training_split(sampled, "T1w", "T2w", max_voxels=cap)
    assert lut is not None and lut.counts.sum() == cap
    assert sum(read) < rows.size / 2  # about a third of the slices' masks, not all
    assert max(read) <= 8
    subjects = set(data.subject[rows].tolist())
    assert len(subjects) > 1
    # on every training voxel, the sampled table's absolute error is close to the full
    # table's, which is the smallest any per-bin map can have there (per-bin medians)
    m = np.asarray(data.mask[rows])
    x, y = data.images["T1w"][rows][m], data.images["T2w"][rows][m]
    full_err = np.abs(y - full.table[bl.lut_bin(x)]).mean()
    sample_err = np.abs(y - lut.table[bl.lut_bin(x)]).mean()
    assert full_err <= sample_err < 1.03 * full_err, (full_err, sample_err)
    # the sample is a property of the file: the same voxels every time
    again = bl.fit_on_training_split(data, "T1w", "T2w", max_voxels=cap)
    np.testing.assert_array_equal(again.table, lut.table)
