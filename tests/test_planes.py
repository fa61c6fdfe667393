"""Slices in other planes (``data prepare --plane``) and multi-view fusion, on real volumes.

The checks use what each plane must mean on the (X, Y, Z) grid, not the code's own
helpers: a stand-in translator that moves every pixel one row or one column down shows,
in the output volume, which axes a plane's rows and columns are; the slices of a coronal
or sagittal preparation are the axial preparation's volume cut across another axis.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import one_torch_thread
from mrsynth.cli import main
from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.data.volumes import brain_mask, load_volume
from mrsynth.errors import ConfigError
from mrsynth.eval.common import Direction, check_compatible, load_run_checked
from mrsynth.eval.translate import Geometry, translate_array_volume
from test_eval_fixtures import TINY_OVERRIDES

D = Direction("A2B", "T1w", "T2w")
PCT = (0.5, 99.5)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


class _Shift:
    """A stand-in translator that moves every pixel of a slice one row (``axis=-2``) or one
    column (``axis=-1``) on: the output at (r, c) is the input at (r - 1, c) or (r, c - 1)."""

    model_name = "shift"

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def translate(self, x, direction):
        return torch.roll(x.float().cpu(), 1, dims=self.axis)


class _Identity:
    model_name = "identity"

    def translate(self, x, direction):
        return x.float().cpu()


def _volume(mini_bids: Path, sub: str = "sub-ms19", c: str = "T1w") -> np.ndarray:
    return load_volume(mini_bids / sub / "anat" / f"{sub}_{c}.nii.gz").data


#: (plane, the stand-in's axis) -> the volume axis that one step of it moves along
MOVES = {("axial", -2): 0, ("axial", -1): 1, ("coronal", -2): 0, ("coronal", -1): 2,
         ("sagittal", -2): 1, ("sagittal", -1): 2}


@pytest.mark.parametrize(("plane", "axis"), sorted(MOVES))
def test_a_plane_s_rows_and_columns_are_the_documented_axes(mini_bids, plane, axis):
    data = _volume(mini_bids)
    fg = brain_mask(data)
    lo, hi = np.percentile(data[fg].astype(np.float64), PCT)
    out, _ = translate_array_volume(data, _Shift(axis), D, Geometry((128, 128), 1, PCT, plane))
    moved = MOVES[(plane, axis)]
    # the output at v equals the (clipped) input one voxel back along `moved`, wherever both
    # voxels are brain: the plane's rows/columns are the volume axes the docs name
    prev = np.roll(data, 1, axis=moved)
    both = fg & np.roll(fg, 1, axis=moved)
    np.testing.assert_allclose(out[both], np.clip(prev[both], lo, hi), atol=1e-4 * (hi - lo))
    # and not along any other axis
    for other in {0, 1, 2} - {moved}:
        wrong = np.roll(data, 1, axis=other)
        assert np.median(np.abs(out[both] - np.clip(wrong[both], lo, hi))) > 1e-3 * (hi - lo)


def test_translated_slice_counts_follow_the_plane(mini_bids):
    data = _volume(mini_bids)
    fg = brain_mask(data)
    for plane, across in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        _, n = translate_array_volume(data, _Identity(), D, Geometry((128, 128), 1, PCT, plane))
        others = tuple(a for a in range(3) if a != across)
        assert n == int(fg.any(axis=others).sum()), plane


def test_fusion_is_the_voxelwise_mean_and_fills_what_one_run_left_out(mini_bids):
    data = _volume(mini_bids)
    fg = brain_mask(data)
    a = (_Shift(-2), Geometry((128, 128), 1, PCT, "axial"))
    # a coronal crop too small for the brain: this run leaves voxels out
    b = (_Shift(-1), Geometry((32, 128), 1, PCT, "coronal"))
    with pytest.warns(Warning, match="coronal plane"):
        ya, _ = translate_array_volume(data, a[0], D, a[1])
        yb, _ = translate_array_volume(data, b[0], D, b[1])
        fused, n = translate_array_volume(data, [a, b], D)
        assert n == (translate_array_volume(data, a[0], D, a[1])[1]
                     + translate_array_volume(data, b[0], D, b[1])[1])
    bg = data[~fg].flat[0]
    left_out = fg & (yb == bg)
    assert left_out.sum() > 1000 and (fg & ~left_out).sum() > 1000
    both = fg & ~left_out
    np.testing.assert_allclose(fused[both], (ya[both].astype(np.float64) + yb[both]) / 2,
                               rtol=1e-6, atol=1e-6 * float(np.abs(ya[fg]).max()))
    np.testing.assert_array_equal(fused[left_out], ya[left_out])
    np.testing.assert_array_equal(fused[~fg], ya[~fg])


@pytest.fixture(scope="module")
def plane_files(mini_bids, tmp_path_factory) -> dict[str, Path]:
    """mini_bids prepared in every plane (2 mm voxels; every axial slice, the other planes'
    slices with at least 1 % brain), one test subject."""
    root = tmp_path_factory.mktemp("planes")
    files = {}
    for plane, size in (("axial", (64, 64)), ("coronal", (64, 96)), ("sagittal", (64, 96))):
        files[plane] = prepare_dataset(
            mini_bids, root / f"{plane}.npz", size=size, downsample=2,
            slices="0:" if plane == "axial" else "brain:0.01", test_subjects=("sub-ms19",),
            seed=0, plane=plane)
    return files


def test_other_planes_cut_the_axial_grid_across_another_axis(plane_files):
    ax = load_prepared(plane_files["axial"])
    for plane, perm in (("coronal", (0, 2, 1)), ("sagittal", (1, 2, 0))):
        d = load_prepared(plane_files[plane])
        assert d.settings["plane"] == plane and d.settings["downsample"] == 2
        for sub in sorted(set(d.subject)):
            # the axial file's slices of this subject, put back on the grid
            rows = np.flatnonzero(ax.subject == sub)
            grid = ax.subjects[sub]["grid_shape"]
            vols = {c: np.full(grid, -1.0, np.float32) for c in ("T1w", "T2w")}
            m = np.zeros(grid, bool)
            r0, c0 = (int(v) for v in ax.crop[rows[0]])
            for i, k in zip(rows, ax.slice_index[rows], strict=True):
                for c in vols:
                    vols[c][max(r0, 0):r0 + 64, max(c0, 0):c0 + 64, k] = \
                        ax.images[c][i][max(-r0, 0):grid[0] - r0, max(-c0, 0):grid[1] - c0]
                m[max(r0, 0):r0 + 64, max(c0, 0):c0 + 64, k] = \
                    ax.mask[i][max(-r0, 0):grid[0] - r0, max(-c0, 0):grid[1] - c0]
            prow = np.flatnonzero(d.subject == sub)
            pr0, pc0 = (int(v) for v in d.crop[prow[0]])
            h, w = d.size
            for i, k in zip(prow, d.slice_index[prow], strict=True):
                for c in vols:
                    want = np.transpose(vols[c], perm)[:, :, k]
                    got = d.images[c][i]
                    # the stored slice is the plane's slice k at the crop origin (padding -1)
                    rr = np.arange(h) + pr0
                    cc = np.arange(w) + pc0
                    ok_r = (rr >= 0) & (rr < want.shape[0])
                    ok_c = (cc >= 0) & (cc < want.shape[1])
                    inside = got[np.ix_(ok_r, ok_c)]
                    np.testing.assert_allclose(inside, want[np.ix_(rr[ok_r], cc[ok_c])],
                                               atol=1e-6)
                    assert np.all(got[~ok_r] == -1) and np.all(got[:, ~ok_c] == -1)
                assert d.mask[i].sum() == np.transpose(m, perm)[:, :, k].sum()
        # every slice kept has brain, none with brain is missing (brain:0.01 of the plane)
        assert len(d) > 0 and d.mask.reshape(len(d), -1).any(axis=1).all()


def test_plane_errors(mini_bids, tmp_path):
    with pytest.raises(ConfigError, match="--plane 'oblique'"):
        prepare_dataset(mini_bids, tmp_path / "x.npz", size=(64, 64), plane="oblique")
    folders = tmp_path / "folders"
    for part in ("trainA", "trainB", "testA", "testB"):
        (folders / part).mkdir(parents=True)
        np.save(folders / part / "a.npy", np.random.default_rng(0).random((16, 16)))
    with pytest.raises(ConfigError, match="2-D images"):
        prepare_dataset(folders, tmp_path / "f.npz", size=(16, 16), plane="coronal")


@pytest.fixture(scope="module")
def plane_runs(plane_files, tmp_path_factory) -> dict[str, Path]:
    """A tiny ``simple`` run per plane."""
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    root = tmp_path_factory.mktemp("plane-runs")
    over = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("data.")}
    return {p: train(resolve_config("simple", "cpu-small", over), f, root / p, overwrite=True)
            for p, f in plane_files.items()}


def test_runs_refuse_data_of_another_plane_and_2d_images(plane_runs, plane_files, tmp_path,
                                                        capsys):
    run = load_run_checked(plane_runs["coronal"])
    check_compatible(run, plane_runs["coronal"], load_prepared(plane_files["coronal"]))
    with pytest.raises(ConfigError, match="plane"):
        check_compatible(run, plane_runs["coronal"], load_prepared(plane_files["axial"]))
    np.save(tmp_path / "img.npy", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    assert main(["translate", "--run", str(plane_runs["coronal"]), "--direction", "T1w2T2w",
                 "--input", str(tmp_path / "img.npy"), "--output", str(tmp_path / "o.npy")]) != 0
    assert "trained on coronal slices" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def _cli(*args: str) -> None:
    assert main(list(args)) == 0, args


def test_translate_with_several_runs_writes_their_mean(plane_runs, mini_bids, tmp_path):
    src = mini_bids / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    outs = {}
    for p, rd in plane_runs.items():
        outs[p] = tmp_path / f"{p}.nii.gz"
        _cli("translate", "--run", str(rd), "--direction", "T1w2T2w", "--input", str(src),
             "--output", str(outs[p]))
    fused = tmp_path / "fused.nii.gz"
    _cli("translate", *[a for rd in plane_runs.values() for a in ("--run", str(rd))],
         "--direction", "T1w2T2w", "--input", str(src), "--output", str(fused))
    img = nib.load(fused)
    assert img.shape == nib.load(src).shape
    np.testing.assert_allclose(img.affine, nib.load(src).affine)
    y = np.asarray(img.dataobj, dtype=np.float64)
    each = np.stack([np.asarray(nib.load(o).dataobj, dtype=np.float64) for o in outs.values()])
    fg = np.asarray(nib.load(src).dataobj) != 0
    # the mean of the runs that predicted a voxel (a run leaves the background value, 0
    # here, where it predicted nothing: a few brain-edge voxels after upsampling)
    made = each != 0
    assert made.all(axis=0)[fg].mean() > 0.99
    want = (each * made).sum(axis=0) / np.maximum(made.sum(axis=0), 1)
    np.testing.assert_allclose(y[fg], want[fg], rtol=1e-5, atol=1e-5 * float(np.abs(each).max()))
    # the planes' runs do differ (else the mean would prove nothing)
    assert np.abs(each[0][fg] - each[1][fg]).mean() > 1e-3 * float(np.abs(each).max())
    # a folder input gets the fusion's BIDS name
    _cli("translate", "--run", str(plane_runs["axial"]), "--run", str(plane_runs["coronal"]),
         "--direction", "T1w2T2w", "--input", str(src.parent), "--output", str(tmp_path / "f"))
    assert (tmp_path / "f" / "sub-ms19_desc-simplefused_T2w.nii.gz").is_file()
    # one run twice (the second time by a path through '..') is not a fusion: refused
    axial = plane_runs["axial"]
    again = axial.parent / ".." / axial.parent.name / axial.name
    assert main(["translate", "--run", str(axial), "--run", str(again), "--direction",
                 "T1w2T2w", "--input", str(src), "--output", str(tmp_path / "twice.nii.gz")]) != 0
    assert not (tmp_path / "twice.nii.gz").exists()


def test_complete_fuses_runs_of_one_model_in_different_planes(plane_runs, mini_bids, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(mini_bids, raw)
    (raw / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz").unlink()
    _cli("complete", str(raw), *[a for rd in plane_runs.values() for a in ("--run", str(rd))],
         "--validate")
    anat = raw / "derivatives" / "mrsynth" / "sub-ms19" / "anat"
    made = anat / "sub-ms19_desc-simplefused_T2w.nii.gz"
    assert made.is_file()
    side = json.loads((anat / "sub-ms19_desc-simplefused_T2w.json").read_text())
    assert side["SynthesisModel"] == "simple-fused"
    assert sorted(m["Plane"] for m in side["FusedRuns"]) == ["axial", "coronal", "sagittal"]
    # the fused volume is the mean of the three runs' own translations
    src = raw / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    each = []
    for p, rd in plane_runs.items():
        _cli("translate", "--run", str(rd), "--direction", "T1w2T2w", "--input", str(src),
             "--output", str(tmp_path / f"{p}.nii.gz"))
        each.append(np.asarray(nib.load(tmp_path / f"{p}.nii.gz").dataobj, dtype=np.float64))
    # complete writes target units (an affine map of translate's source units), so compare
    # after fitting that map on the brain
    y = np.asarray(nib.load(made).dataobj, dtype=np.float64)
    fg = np.asarray(nib.load(src).dataobj) != 0
    each_a = np.stack(each)
    fg &= (each_a != 0).all(axis=0)  # voxels every run predicted
    mean = each_a.mean(axis=0)
    coef = np.polyfit(mean[fg], y[fg], 1)
    np.testing.assert_allclose(np.polyval(coef, mean[fg]), y[fg], rtol=1e-4,
                               atol=1e-4 * float(np.abs(y[fg]).max()))
    # validation subjects are scored too, under the fusion's label
    tsv = (raw / "derivatives" / "mrsynth" / "validation.tsv").read_text()
    assert "simple-fused" in tsv
    # two runs of one model in one plane are still refused
    assert main(["complete", str(raw), "--run", str(plane_runs["axial"]), "--run",
                 str(plane_runs["axial"]), "--dry-run"]) != 0


def test_evaluate_scores_a_plane_s_run_on_its_own_slices(plane_runs, plane_files, tmp_path):
    """``evaluate`` stacks a sagittal file's test slices along x and names the plane."""
    import csv

    from mrsynth.eval import evaluate as ev

    out = tmp_path / "eval"
    ev.evaluate([plane_runs["sagittal"]], plane_files["sagittal"], out, c2st_steps=2)
    test = load_prepared(plane_files["sagittal"]).split_view("test")
    with open(out / "volume.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] == "simple"]
    assert {r["direction"] for r in rows} == {"T1w2T2w", "T2w2T1w"}
    for r in rows:
        assert int(r["n_slices"]) == len(test)
        assert r["slices"] == f"{test.slice_index.min()}-{test.slice_index.max()}"
        assert float(r["through_plane_mae"]) > 0
    assert (out / "figure2.png").is_file()


# --------------------------------------------------------------------------- --mirror
def test_mirror_averages_with_the_mirrored_slice_s_translation(plane_runs, plane_files):
    run = load_run_checked(plane_runs["coronal"])
    # the tiny run's network is nearly constant; an asymmetric 3x3 filter shows the mirroring
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).reshape(1, 1, 3, 3) / 36)
    run.generator = lambda direction, stochastic=False: conv
    d = load_prepared(plane_files["coronal"])
    rows = np.argsort(d.mask.reshape(len(d), -1).sum(axis=1))[-5:]  # the most brain
    x = torch.from_numpy(d.images["T1w"][rows][:, None])
    plain = run.translate(x, "A2B")
    flipped = run.translate(x.flip(-2), "A2B")
    run.mirror = True
    both = run.translate(x, "A2B")
    torch.testing.assert_close(both, (plain + flipped.flip(-2)) / 2, rtol=1e-5, atol=1e-6)
    assert (both - plain).abs().mean() > 1e-4  # the model is not mirror-symmetric
    sag = load_run_checked(plane_runs["sagittal"])
    with pytest.raises(ConfigError, match="no left-right axis"):
        sag.mirror = True


def test_complete_records_mirror_and_will_not_mix_it_silently(plane_runs, mini_bids, tmp_path,
                                                             capsys):
    raw = tmp_path / "raw"
    shutil.copytree(mini_bids, raw)
    (raw / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz").unlink()
    side = raw / "derivatives" / "mrsynth" / "sub-ms19" / "anat" / "sub-ms19_desc-simple_T2w.json"
    _cli("complete", str(raw), "--run", str(plane_runs["axial"]), "--no-qc")
    plain = nib.load(side.with_name(side.name.replace(".json", ".nii.gz"))).get_fdata()
    assert json.loads(side.read_text())["MirrorAveraged"] is False
    capsys.readouterr()
    # the same checkpoint with --mirror would write something else: refused, not skipped
    assert main(["complete", str(raw), "--run", str(plane_runs["axial"]), "--mirror",
                 "--no-qc"]) != 0
    said = capsys.readouterr()
    assert "this checkpoint without --mirror" in said.out + said.err
    _cli("complete", str(raw), "--run", str(plane_runs["axial"]), "--mirror", "--overwrite",
         "--no-qc")
    meta = json.loads(side.read_text())
    assert meta["MirrorAveraged"] is True and "--mirror" in meta["Command"]
    # (the tiny run's output is nearly constant, so the volumes themselves barely differ;
    # the mirroring arithmetic is checked above)
    mirrored = nib.load(side.with_name(side.name.replace(".json", ".nii.gz"))).get_fdata()
    assert mirrored.shape == plain.shape and np.isfinite(mirrored).all()


def test_evaluate_with_mirror_records_it_and_refuses_a_sagittal_run(plane_runs, plane_files,
                                                                   tmp_path):
    from mrsynth.eval import evaluate as ev

    out = tmp_path / "eval"
    ev.evaluate([plane_runs["coronal"]], plane_files["coronal"], out, c2st_steps=2,
                mirror=True)
    assert json.loads((out / "eval.json").read_text())["runs"][0]["mirror"] is True
    with pytest.raises(ConfigError, match="no left-right axis"):
        ev.evaluate([plane_runs["sagittal"]], plane_files["sagittal"], tmp_path / "e2",
                    c2st_steps=2, mirror=True)
    assert not (tmp_path / "e2").exists()
