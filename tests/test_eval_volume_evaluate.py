"""Volume metrics in ``mrsynth evaluate``: test subjects' slices stacked back into volumes.

Checked against independent numpy stacking of the same slices (also read back from the
synthetic slices evaluate saves), gaps between kept slices, and, through evaluate's own
code path with fabricated translations, that slice-wise intensity jumps the per-slice
metrics cannot see raise the through-plane error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import one_torch_thread
from mrsynth.data.prepared import load_prepared
from mrsynth.eval import evaluate as ev
from mrsynth.eval.baselines import BASELINES
from mrsynth.eval.report import build_report, read_csv
from mrsynth.eval.volume import (
    VOLUME_METRICS,
    neighbour_pair_errors,
    score_stack,
    slice_stacks,
    volume_metrics,
    zscore,
)
from test_eval_fixtures import tiny_run

PAIR = ("T1w", "T2w")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def test_split(prepared_small):
    data = load_prepared(prepared_small)
    return data, ev._paired_test(data, PAIR)[0]


def _by_hand(test, subject: str, arr: np.ndarray) -> np.ndarray:
    """The subject's slices of ``arr`` stacked along a last axis in axial order, by numpy."""
    idx = [(int(test.slice_index[i]), i) for i in range(len(test))
           if str(test.subject[i]) == subject]
    return np.stack([arr[i] for _, i in sorted(idx)], axis=-1)


def test_assembled_volume_equals_numpy_stacking_of_the_subjects_slices(test_split):
    data, test = test_split
    step = data.settings["slice_step"]
    stacks = slice_stacks(test.subject, test.slice_index, test.crop, test.size, step)
    assert [s.subject for s in stacks] == sorted(set(test.subject.tolist()))
    for st in stacks:
        rows = np.flatnonzero(test.subject == st.subject)
        idx = np.sort(test.slice_index[rows])
        assert np.all(np.diff(idx) == step)  # the fixture keeps every 4th brain slice
        assert st.runs == ((int(idx[0]), int(idx[-1])),) and st.shape == (64, 64, idx.size)
        for arr in (test.images["T1w"], test.images["T2w"], test.mask):
            np.testing.assert_array_equal(st.assemble(arr), _by_hand(test, st.subject, arr))
        # the metrics of the reassembled slices are volume_metrics of the numpy stack
        rng = np.random.default_rng(1)
        syn = test.images["T2w"] + rng.normal(0, 0.05, test.images["T2w"].shape)
        got, pairs = score_stack(st, syn, test.images["T2w"], test.mask)
        want = volume_metrics(_by_hand(test, st.subject, syn),
                              _by_hand(test, st.subject, test.images["T2w"]),
                              _by_hand(test, st.subject, test.mask))
        for k in VOLUME_METRICS:
            assert got[k] == pytest.approx(want[k], rel=1e-12), k
        assert [p["slice"] for p in pairs] == idx[:-1].tolist()
        assert got["n_slices"] == idx.size and got["n_runs"] == 1


def test_gaps_split_the_stack_and_no_difference_spans_them(test_split):
    """Slices missing in the middle: two runs, an empty plane between them, through-plane
    error over the pairs inside each run only (independent loop)."""
    data, test = test_split
    step = data.settings["slice_step"]
    subj = sorted(set(test.subject.tolist()))[0]
    rows = np.flatnonzero(test.subject == subj)
    rows = rows[np.argsort(test.slice_index[rows])]
    keep = np.delete(rows, [4, 5])  # two neighbours gone: runs 0..3 and 6..end
    part = test.select(keep)
    (st,) = slice_stacks(part.subject, part.slice_index, part.crop, part.size, step)
    idx = part.slice_index
    assert st.runs == ((int(idx[0]), int(idx[3])), (int(idx[4]), int(idx[-1])))
    assert st.shape[2] == keep.size + 1
    m = st.assemble(part.mask, False)
    assert not m[:, :, 4].any()  # the separator plane
    rng = np.random.default_rng(2)
    syn = part.images["T2w"] + rng.normal(0, 0.1, part.images["T2w"].shape)
    real = part.images["T2w"]
    got, pairs = score_stack(st, syn, real, part.mask)
    # independent: z-score over every kept slice's brain, pairs within a run only
    mk = part.mask
    s, r = syn.astype(np.float64), real.astype(np.float64)
    sz = (s - s[mk].mean()) / s[mk].std()
    rz = (r - r[mk].mean()) / r[mk].std()
    errs, per_pair = [], []
    for a in range(len(part) - 1):
        if idx[a + 1] - idx[a] != step:
            continue
        both = mk[a] & mk[a + 1]
        e = np.abs((sz[a + 1] - sz[a]) - (rz[a + 1] - rz[a]))[both]
        errs.append(e)
        per_pair.append((int(idx[a]), e.mean()))
    assert got["through_plane_mae"] == pytest.approx(np.concatenate(errs).mean(), rel=1e-12)
    assert got["mae"] == pytest.approx(np.abs(sz[mk] - rz[mk]).mean(), rel=1e-12)
    assert [(p["slice"], pytest.approx(p["through_plane_mae"], rel=1e-12)) for p in pairs] \
        == [(k, pytest.approx(v, rel=1e-12)) for k, v in per_pair]
    assert len(pairs) == keep.size - 2 and got["n_runs"] == 2


def test_slices_with_different_crops_land_at_their_canonical_positions():
    """slice[r, c] = canonical[r + row0, c + col0]: a slice cropped one row lower sits one
    row lower in the volume."""
    rng = np.random.default_rng(3)
    canonical = rng.normal(size=(12, 10, 3))
    crop = np.array([[2, 1], [3, 1], [2, 0]])
    slices = np.stack([canonical[r0:r0 + 8, c0:c0 + 8, z] for z, (r0, c0) in enumerate(crop)])
    (st,) = slice_stacks(np.array(["s"] * 3), np.array([5, 6, 7]), crop, (8, 8))
    vol = st.assemble(slices, np.nan)
    assert vol.shape == (9, 9, 3)
    for z, (r0, c0) in enumerate(crop):
        np.testing.assert_array_equal(vol[r0 - 2:r0 - 2 + 8, c0:c0 + 8, z], slices[z])
    assert np.isnan(vol[8, :, 0]).all() and np.isnan(vol[:, 8, 2]).all()
    with pytest.raises(ValueError, match="slice 6 more than once"):
        slice_stacks(np.array(["s"] * 3), np.array([5, 6, 6]), crop, (8, 8))


def test_pair_errors_average_to_the_through_plane_error():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(9, 8, 6))
    syn = real + rng.normal(0, 0.3, real.shape)
    mask = rng.random(real.shape) > 0.3
    mask[:, :, 3] = False
    k, err, n = neighbour_pair_errors(zscore(syn, mask), zscore(real, mask), mask)
    assert k.tolist() == [0, 1, 4]  # pairs touching the empty plane have no voxel
    whole = volume_metrics(syn, real, mask)["through_plane_mae"]
    assert np.sum(err * n) / n.sum() == pytest.approx(whole, rel=1e-12)


# --------------------------------------------------------------------------- through evaluate


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory, prepared_small, test_split):
    """An evaluation of two copies of a tiny run whose translations are replaced by the real
    target plus one fixed error field ("smooth") or the same times a random gain and offset
    per slice ("jumpy": equal per-slice metrics, which z-score every slice)."""
    _, test = test_split
    src = tiny_run(tmp_path_factory, prepared_small, "simple")
    root = tmp_path_factory.mktemp("volume-eval")
    smooth, jumpy = root / "smooth", root / "jumpy"
    shutil.copytree(src, smooth)
    shutil.copytree(src, jumpy)
    field = np.random.default_rng(5).normal(0, 0.15, test.size)
    gains = np.random.default_rng(6).uniform(0.6, 1.4, len(test))
    offsets = np.random.default_rng(7).uniform(-0.3, 0.3, len(test))

    def fake_translate(run, x, direction, *args, **kwargs):
        assert x.shape[0] == len(test)
        target = test.images[PAIR[1] if direction == "A2B" else PAIR[0]].astype(np.float64)
        syn = target + field
        if run.run_dir.name == "jumpy":
            syn = gains[:, None, None] * syn + offsets[:, None, None]
        return syn.astype(np.float32), 0.0

    out = root / "eval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "_translate_all", fake_translate)
        ev.evaluate([smooth, jumpy], prepared_small, out, c2st_steps=2)
    labels = {Path(r["run_dir"]).name: r["label"]
              for r in json.loads((out / "eval.json").read_text())["runs"]}
    return out, labels


def test_slice_wise_jumps_raise_the_through_plane_error_not_the_slice_metrics(fabricated):
    out, labels = fabricated
    sm, ju = labels["smooth"], labels["jumpy"]
    per = {(r["model"], r["direction"], r["region"], r["subject"], r["slice"]): float(r["mae"])
           for r in read_csv(out / "per_image.csv")}
    pairs = [(k, (ju, *k[1:])) for k in per if k[0] == sm]
    assert pairs
    for a, b in pairs:  # the same per-slice MAE, both regions
        assert per[b] == pytest.approx(per[a], rel=1e-4, abs=1e-6)
    vol = {(r["model"], r["direction"], r["subject"]): r for r in read_csv(out / "volume.csv")}
    keys = [k for k in vol if k[0] == sm]
    assert len(keys) == 4  # two directions x two test subjects
    for k in keys:
        s, j = vol[k], vol[(ju, *k[1:])]
        assert float(j["through_plane_mae"]) > 3 * float(s["through_plane_mae"])
        assert float(j["through_plane_ratio"]) > 3 * float(s["through_plane_ratio"])
    tests = {(t["model"], t["direction"]): t for t in read_csv(out / "volume_tests.csv")}
    assert {t[0] for t in tests} == {sm, ju}
    for d in ("T1w2T2w", "T2w2T1w"):
        assert float(tests[(ju, d)]["model_mean"]) > 3 * float(tests[(sm, d)]["model_mean"])


def test_volume_csv_with_baselines_matches_stacking_the_saved_synthetic_slices(
        fabricated, test_split):
    out, labels = fabricated
    _, test = test_split
    rows = read_csv(out / "volume.csv")
    models = {*labels.values(), *BASELINES}
    subjects = sorted(set(test.subject.tolist()))
    assert {(r["model"], r["kind"]) for r in rows} == {
        *((m, "model") for m in labels.values()), *((b, "baseline") for b in BASELINES)}
    assert len(rows) == len(models) * 2 * len(subjects)
    for r in rows:
        subj, tgt = r["subject"], r["target"]
        ks = sorted(int(k) for s, k in zip(test.subject, test.slice_index, strict=True)
                    if s == subj)
        syn = np.stack([np.load(out / "synthetic" / r["model"]
                                / f"{subj}_slice-{k:03d}_{tgt}.npy") for k in ks], axis=-1)
        want = volume_metrics(syn, _by_hand(test, subj, test.images[tgt]),
                              _by_hand(test, subj, test.mask))
        assert int(r["n_slices"]) == len(ks) and int(r["n_pairs"]) == len(ks) - 1
        for k in VOLUME_METRICS:
            assert float(r[k]) == pytest.approx(want[k], rel=1e-9), (r["model"], k)
    md = (out / "summary.md").read_text()
    section = md.split("## Volumes: consistent in 3-D")[1]
    for m in models:
        assert f"| {m} |" in section
    assert "through-plane error" in section
    html = build_report(out, out.parent / "report.html").read_text()
    assert "Volumes: consistent in 3-D" in html and "<th>through-plane error</th>" in html
    man = json.loads((out / "eval.json").read_text())
    assert sorted(man["volumes"]["subjects"]) == subjects
