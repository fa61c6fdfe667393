"""`data prepare`: geometry, normalisation, split, unpaired data and every bad-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mrsynth.cli import main
from mrsynth.data.prepare import prepare_dataset, split_participants
from mrsynth.data.prepared import load_prepared
from mrsynth.data.slicing import uncrop

SMALL_TEST = {"sub-ms19", "sub-met00110"}


# --------------------------------------------------------------------------- the shared fixture
def test_prepared_small_content(prepared_small: Path):
    d = load_prepared(prepared_small)
    assert d.contrasts == ["T1w", "T2w"]
    assert d.size == (64, 64)
    assert set(d.subject.tolist()) == {
        "sub-gli00001", "sub-met00110", "sub-fg6692", "sub-bratscase", "sub-ms07", "sub-ms19",
        "sub-mni152"}
    # the split: exactly the requested test subjects, and no subject on both sides
    assert set(d.subject[d.split == "test"].tolist()) == SMALL_TEST
    assert not set(d.subject[d.split == "train"].tolist()) & SMALL_TEST
    st = d.settings
    for key in ("contrasts", "size", "downsample", "orientation", "normalisation", "slices",
                "slice_step", "seed", "test_subjects", "layout", "source", "unpaired",
                "mrsynth_version"):
        assert key in st, key
    assert st["orientation"] == "RAS" and st["downsample"] == 4 and st["slice_step"] == 4
    assert st["normalisation"]["method"] == "percentile"
    assert st["normalisation"]["percentiles"] == [0.5, 99.5]
    assert sorted(st["test_subjects"]) == sorted(SMALL_TEST)
    assert d.paired.all()
    for c in d.contrasts:
        img = d.images[c]
        assert img.dtype == np.float32 and img.min() >= -1 and img.max() <= 1
        assert (img[~d.mask] == -1).all()
        # the brain is not background: most brain voxels are above -1
        assert (img[d.mask] > -1).mean() > 0.9
    # about 100-140 brain slices per subject, every 4th kept
    counts = {s: int((d.subject == s).sum()) for s in set(d.subject.tolist())}
    assert all(15 <= n <= 40 for n in counts.values()), counts
    # every slice index is inside its volume and one subject shares one crop
    for s, info in d.subjects.items():
        rows = d.subject == s
        assert (d.crop[rows] == info["crop"]).all()
        assert d.slice_index[rows].max() < info["canonical_shape"][2]
        for key in ("files", "original_shape", "original_affine", "canonical_affine",
                    "voxel_size", "crop"):
            assert key in info


def _independent_slices(mrpaired: Path, subject: str, factor: int) -> dict:
    """Recompute what prepare should store, without mrsynth's code: flip LAS->RAS by hand,
    mask = non-zero in both contrasts (holes filled), percentiles, block means."""
    vols = {}
    for c in ("T1w", "T2w"):
        img = nib.load(mrpaired / subject / "anat" / f"{subject}_{c}.nii.gz")
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        vols[c] = np.asarray(img.dataobj, dtype=np.float64)[::-1]  # L->R
    mask = ndi.binary_fill_holes((vols["T1w"] != 0) & (vols["T2w"] != 0))

    def down(a: np.ndarray) -> np.ndarray:
        x, y = a.shape[:2]
        a = np.pad(a, ((0, -x % factor), (0, -y % factor), (0, 0)), mode="edge")
        return a.reshape(a.shape[0] // factor, factor, a.shape[1] // factor, factor,
                         a.shape[2]).mean(axis=(1, 3))

    mask_ds = down(mask.astype(np.float64)) >= 0.5
    out = {"mask": mask_ds}
    for c, v in vols.items():
        lo, hi = np.percentile(v[mask], [0.5, 99.5])
        offset, scale = (hi + lo) / 2, (hi - lo) / 2
        norm = np.clip((down(v) - offset) / scale, -1, 1)
        norm[~mask_ds] = -1
        out[c] = (norm, offset, scale, down(v))
    return out


def test_prepared_slices_match_an_independent_computation(prepared_small: Path, mrpaired: Path):
    d = load_prepared(prepared_small)
    ref = _independent_slices(mrpaired, "sub-ms19", 4)
    rows = np.flatnonzero(d.subject == "sub-ms19")
    r0, c0 = d.crop[rows[0]]
    ks = d.slice_index[rows]
    for c in ("T1w", "T2w"):
        norm, offset, scale, raw = ref[c]
        np.testing.assert_allclose(d.offset[c][rows], offset, rtol=1e-9)
        np.testing.assert_allclose(d.scale[c][rows], scale, rtol=1e-9)
        stored = d.images[c][rows]  # (n, 64, 64)
        # put the stored slices back on the (downsampled) canonical grid
        back = uncrop(np.moveaxis(stored, 0, -1), norm.shape[:2], (int(r0), int(c0)), fill=-1)
        np.testing.assert_allclose(back, norm[:, :, ks], atol=1e-5)
        # unscale returns the input's units where nothing was clipped
        units = d.unscale(c, stored, rows)
        units_back = uncrop(np.moveaxis(units, 0, -1), norm.shape[:2], (int(r0), int(c0)),
                            fill=np.nan)
        ok = (np.abs(norm[:, :, ks]) < 1) & ~np.isnan(units_back)
        assert ok.sum() > 1000
        np.testing.assert_allclose(units_back[ok], raw[:, :, ks][ok], atol=1e-5 * scale)
    back_mask = uncrop(np.moveaxis(d.mask[rows], 0, -1), ref["mask"].shape[:2],
                       (int(r0), int(c0)), fill=False)
    np.testing.assert_array_equal(back_mask, ref["mask"][:, :, ks])
    # the brain fills at least 10 % of each selected slice (the default selection)
    frac = ref["mask"].mean(axis=(0, 1))
    assert frac[ks].min() >= 0.09


# --------------------------------------------------------------------------- split
def test_split_is_reproducible_and_leak_free():
    names = [f"sub-{i:02d}" for i in range(20)]
    a = split_participants(names, 0.2, seed=7)
    assert len(a) == 4 and set(a) <= set(names)
    assert split_participants(list(reversed(names)), 0.2, seed=7) == a  # order-independent
    assert split_participants(names, 0.2, seed=7) == a
    others = {tuple(split_participants(names, 0.2, seed=s)) for s in range(10)}
    assert len(others) > 5  # the seed matters
    assert split_participants(names[:2], 0.01, seed=0) != []  # at least one test subject
    assert split_participants(names[:1], 0.5, seed=0) == []  # one subject: all train
    assert split_participants(names, 0.0, seed=0) == []


def test_prepare_is_deterministic_and_split_is_reused(mini_bids: Path, tmp_path: Path):
    kw = {"size": (128, 128), "slice_step": 6, "test_fraction": 0.34}
    a = load_prepared(prepare_dataset(mini_bids, tmp_path / "a.npz", seed=3, **kw))
    b = load_prepared(prepare_dataset(mini_bids, tmp_path / "b.npz", seed=3, **kw))
    assert a.settings["test_subjects"] == b.settings["test_subjects"]
    assert len(a.settings["test_subjects"]) == 1
    np.testing.assert_array_equal(a.split, b.split)
    for c in a.contrasts:
        np.testing.assert_array_equal(a.images[c], b.images[c])
    for sub in set(a.subject.tolist()):
        assert len(set(a.split[a.subject == sub].tolist())) == 1
    tests = {tuple(load_prepared(prepare_dataset(
        mini_bids, tmp_path / f"s{s}.npz", seed=s, **kw)).settings["test_subjects"])
        for s in range(4)}
    assert len(tests) > 1
    # --split-from reuses the written split even with another seed
    rc = main(["data", "prepare", str(mini_bids), "--out", str(tmp_path / "r.npz"), "--size",
               "128", "128", "--slice-step", "6", "--seed", "99", "--split-from",
               str(tmp_path / "a.npz"), "-q"])
    assert rc == 0
    assert load_prepared(tmp_path / "r.npz").settings["test_subjects"] == \
        a.settings["test_subjects"]


# --------------------------------------------------------------------------- bad input
def _copy(mini_bids: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(mini_bids, root)
    return root


def _run_fails(args: list[str], capsys: pytest.CaptureFixture[str], *must: str) -> str:
    """Run the CLI, expect a clean failure; return stderr+stdout."""
    out_path = Path(args[args.index("--out") + 1])
    before = set(out_path.parent.iterdir()) if out_path.parent.exists() else set()
    rc = main(args)
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert rc != 0, text
    assert "Traceback" not in text
    flat = " ".join(text.split())
    for m in must:
        assert m in flat, (m, text)
    after = set(out_path.parent.iterdir()) if out_path.parent.exists() else set()
    assert after == before, f"left behind: {after - before}"
    return text


def _subject_fails(args: list[str], capsys: pytest.CaptureFixture[str], subject: str,
                   *must: str) -> None:
    """A bad subject: an error with --strict; by default reported, skipped, and listed."""
    _run_fails([*args, "--strict"], capsys, subject, "--strict", *must)
    out = Path(args[args.index("--out") + 1])
    assert main(args) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert f"Subject {subject} failed and is skipped" in text
    for m in must:
        assert m in text, (m, text)
    d = load_prepared(out)
    assert subject not in set(d.subject.tolist()) and len(d) > 0
    assert subject in d.settings["failed_subjects"]


def _prep_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", str(root), "--out", str(out), "--size", "128", "128",
            "--slice-step", "6", "-q", *extra]


def test_truncated_volume(mrpaired: Path, mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    bad = root / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    raw = (mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    _subject_fails(_prep_args(root, tmp_path / "out" / "x.npz"), capsys, "sub-ms19", str(bad),
                   "truncated")


def test_nan_volume(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    p = root / "sub-met00110" / "anat" / "sub-met00110_T2w.nii.gz"
    img = nib.load(p)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[40:42, 50, 30] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), p)
    _subject_fails(_prep_args(root, tmp_path / "x.npz"), capsys, "sub-met00110", str(p), "2 NaN")


def test_every_training_subject_failing_is_said(mini_bids: Path, tmp_path: Path, capsys):
    """When every subject planned for training fails, the file still holds the test split
    (a test-only file is useful for evaluation), but the summary says that nothing is left
    to train on, beside the failures, instead of reporting 0 train subjects in passing."""
    root = _copy(mini_bids, tmp_path)
    for s in ("sub-met00110", "sub-bratscase"):
        p = root / s / "anat" / f"{s}_T2w.nii.gz"
        img = nib.load(p)
        data = np.asarray(img.dataobj, dtype=np.float32)
        data[40, 50, 30] = np.inf
        nib.save(nib.Nifti1Image(data, img.affine), p)
    out = tmp_path / "x.npz"
    assert main(_prep_args(root, out, "--test-subjects", "sub-ms19")) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "None of the train subjects produced slices" in text
    assert "nothing to train on" in text and "sub-met00110 failed and is skipped" in text
    d = load_prepared(out)
    assert d.settings["train_subjects"] == [] and d.settings["test_subjects"] == ["sub-ms19"]


def test_4d_volume(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    p = root / "sub-bratscase" / "anat" / "sub-bratscase_T1w.nii.gz"
    img = nib.load(p)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), p)
    _subject_fails(_prep_args(root, tmp_path / "x.npz"), capsys, "sub-bratscase", str(p), "4-D",
                   "2 volumes")


def test_constant_volume(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    p = root / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), p)
    _subject_fails(_prep_args(root, tmp_path / "x.npz"), capsys, "sub-ms19", str(p), "all zero")


def test_empty_dataset(tmp_path: Path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "dataset_description.json").write_text("{}")
    _run_fails(_prep_args(root, tmp_path / "x.npz"), capsys, str(root), "No subjects found")
    _run_fails(_prep_args(tmp_path / "nowhere", tmp_path / "x.npz"), capsys, "does not exist")


def test_existing_output_is_refused_unless_overwrite(mini_bids: Path, tmp_path: Path, capsys):
    out = tmp_path / "x.npz"
    out.write_text("earlier results")
    _run_fails(_prep_args(mini_bids, out), capsys, str(out), "--overwrite")
    assert out.read_text() == "earlier results"
    assert main(_prep_args(mini_bids, out, "--overwrite")) == 0
    assert len(load_prepared(out)) > 0


def test_missing_contrast_skip_strict_unpaired(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    (root / "sub-bratscase" / "anat" / "sub-bratscase_T2w.nii.gz").unlink()
    # default: skipped with a warning
    assert main(_prep_args(root, tmp_path / "skip.npz")) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "sub-bratscase has no T2w; skipped" in err
    d = load_prepared(tmp_path / "skip.npz")
    assert "sub-bratscase" not in set(d.subject.tolist())
    assert d.settings["skipped_subjects"] == ["sub-bratscase"]
    # --strict: an error naming the subject
    _run_fails(_prep_args(root, tmp_path / "strict.npz", "--strict"), capsys,
               "sub-bratscase", "no T2w", "--strict")
    # --unpaired: kept, its T2w marked unavailable
    assert main(_prep_args(root, tmp_path / "unp.npz", "--unpaired")) == 0
    d = load_prepared(tmp_path / "unp.npz")
    sel = d.subject == "sub-bratscase"
    assert sel.any()
    assert d.available["T1w"][sel].all() and not d.available["T2w"][sel].any()
    assert not d.paired[sel].any() and d.paired[~sel].all()
    assert (d.images["T2w"][sel] == -1).all()
    assert d.settings["unpaired"] is True


def test_grid_mismatch_and_resample(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    p = root / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz"
    img = nib.load(p)
    aff = img.affine.copy()
    aff[:3, 3] += [4.0, -2.0, 0.0]  # T2w shifted by 4 and 2 mm: not on the T1w grid
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), p)
    _subject_fails(_prep_args(root, tmp_path / "x.npz"), capsys, "sub-ms19", str(p),
                   "not on the same voxel grid", "--resample")
    assert main(_prep_args(root, tmp_path / "r.npz", "--resample")) == 0
    assert "resampled T2w onto the T1w grid" in " ".join(capsys.readouterr().err.split())
    d = load_prepared(tmp_path / "r.npz")
    info = d.subjects["sub-ms19"]
    assert info["contrasts"]["T2w"]["resampled"] is True
    assert info["contrasts"]["T2w"]["canonical_affine"] == info["contrasts"]["T1w"][
        "canonical_affine"]


def test_flipped_affine_is_a_grid_mismatch(mini_bids: Path, tmp_path: Path, capsys):
    root = _copy(mini_bids, tmp_path)
    p = root / "sub-met00110" / "anat" / "sub-met00110_T1w.nii.gz"
    img = nib.load(p)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flip @ img.affine), p)
    _subject_fails(_prep_args(root, tmp_path / "x.npz"), capsys, "sub-met00110",
                   "not on the same voxel grid")


def test_bad_options(mini_bids: Path, tmp_path: Path, capsys):
    _run_fails(_prep_args(mini_bids, tmp_path / "x.npz", "--slices", "middle"), capsys,
               "--slices")
    _run_fails(_prep_args(mini_bids, tmp_path / "x.npz", "--test-subjects", "sub-nobody"),
               capsys, "sub-nobody")
    _run_fails(_prep_args(mini_bids, tmp_path / "x.npz", "--contrasts", "T1w", "PDw"), capsys,
               "PDw")
    _run_fails(_prep_args(mini_bids, tmp_path / "x.npz", "--slices", "500"), capsys,
               "slice 500 does not exist")


def test_info_on_a_prepared_file_and_a_broken_dataset(prepared_small: Path, mrpaired: Path,
                                                      tmp_path: Path, capsys):
    assert main(["data", "info", str(prepared_small), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["test"] + summary["splits"]["train"] == summary["n_slices"]
    assert summary["subjects"]["sub-ms19"]["split"] == "test"
    # a broken data set: every problem is listed, the exit code says so
    root = tmp_path / "broken"
    anat = root / "sub-x" / "anat"
    anat.mkdir(parents=True)
    raw = (mrpaired / "sub-ms07" / "anat" / "sub-ms07_T1w.nii.gz").read_bytes()
    (anat / "sub-x_T1w.nii.gz").write_bytes(raw[:5000])
    rc = main(["data", "info", str(root), "--contrasts", "T1w,T2w"])
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert rc == 1
    assert "Traceback" not in text
    assert "sub-x_T1w.nii.gz" in text and "truncated" in text and "no T2w" in text
    assert "2 problem(s)" in text


def test_any_contrast_pair_t2w_flair(mrpaired: Path, tmp_path: Path):
    with pytest.warns(UserWarning, match="sub-mni152 has no FLAIR; skipped"):
        out = prepare_dataset(mrpaired, tmp_path / "tf.npz", contrasts=("T2w", "FLAIR"),
                              slices="80", downsample=2, size=(128, 128),
                              test_subjects=["sub-ms07"])
    d = load_prepared(out)
    assert d.contrasts == ["T2w", "FLAIR"]
    assert len(d) == 6 and (d.slice_index == 80).all()
    assert "sub-mni152" not in set(d.subject.tolist())
    assert d.subject[d.split == "test"].tolist() == ["sub-ms07"]
    assert d.subjects["sub-ms07"]["files"]["FLAIR"].endswith("sub-ms07_FLAIR.nii.gz")


def test_compressed_file_loads_the_same_and_damage_is_reported(mini_bids: Path, tmp_path: Path):
    kw = {"size": (128, 128), "slice_step": 6, "seed": 1}
    plain = load_prepared(prepare_dataset(mini_bids, tmp_path / "p.npz", **kw))
    packed = load_prepared(prepare_dataset(mini_bids, tmp_path / "c.npz", compress=True, **kw))
    assert (tmp_path / "c.npz").stat().st_size < 0.5 * (tmp_path / "p.npz").stat().st_size
    for c in plain.contrasts:
        np.testing.assert_array_equal(plain.images[c], packed.images[c])
        np.testing.assert_array_equal(plain.offset[c], packed.offset[c])
    np.testing.assert_array_equal(plain.subject, packed.subject)
    np.testing.assert_array_equal(plain.crop, packed.crop)
    assert plain.subjects == packed.subjects
    raw = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    from mrsynth.errors import DataError

    with pytest.raises(DataError, match="t.npz"):
        load_prepared(tmp_path / "t.npz")
