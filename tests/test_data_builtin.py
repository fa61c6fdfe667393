"""The built-in simulated data set: offline templates, tissue contrast, determinism, CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from mrsynth.cli import main
from mrsynth.data import builtin
from mrsynth.data.prepared import load_prepared


def test_templates_load_offline(monkeypatch: pytest.MonkeyPatch):
    """The ICBM152 maps come from nilearn's package files: no network is touched."""

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    builtin.templates.cache_clear()
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    t = builtin.templates(2.0)
    brain = t["brain"]
    assert brain.shape == (80, 98, 81)
    assert np.allclose(np.diag(t["affine"])[:3], 2.0)
    # fractions are a partition of the brain
    total = t["GM"] + t["WM"] + t["CSF"]
    assert np.all(total <= brain + 1e-5)
    assert np.abs(total - brain)[brain >= 0.99].max() < 1e-5
    assert t["CSF"][brain > 0.5].mean() > 0.05 and t["WM"].sum() > 0


def test_templates_are_nilearns_maps_read_without_importing_nilearn_datasets(
        tmp_path: Path) -> None:
    """The maps read straight from nilearn's package files equal what nilearn's own loaders
    return (GM/WM scaled to [0, 1]; brain = T1 template > 0.2), and a worker that simulates
    a subject never imports ``nilearn.datasets`` (~135 MB of RAM per prepare worker)."""
    import subprocess
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    assert np.array_equal(builtin._template_file(builtin._GM_FILE), gm.get_fdata())
    assert np.array_equal(builtin._template_file(builtin._WM_FILE), wm.get_fdata())
    t1 = builtin._template_image(builtin._T1_FILE)
    t1_data = np.asarray(t1.dataobj, np.float32) / np.asarray(t1.dataobj).max()
    assert np.array_equal(t1_data > 0.2, mask.get_fdata() > 0)
    assert np.array_equal(t1.affine, mask.affine)
    code = ("import sys\nfrom mrsynth.data import builtin\n"
            "builtin.simulate_subject(0, contrasts=('T1w',))\n"
            "print('nilearn.datasets' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.split() == ["False", "False"]


def test_deformation_in_slabs_equals_the_whole_grid() -> None:
    """The deformation's affine part, computed a few planes at a time to bound a worker's
    memory, equals the whole-volume matrix product bit for bit, whatever the slab size."""
    rng = np.random.default_rng(0)
    shape = (37, 41, 29)
    centre = (np.asarray(shape, np.float64) - 1) / 2.0
    for _ in range(3):
        m = np.linalg.qr(rng.normal(size=(3, 3)))[0] * rng.uniform(0.9, 1.1)
        shift = rng.normal(0, 2.0, 3)
        grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
        whole = (m @ (grid - centre[:, None].astype(np.float32))) + (centre + shift)[:, None]
        whole = whole.reshape(3, *shape).astype(np.float32)
        for slab in (1, 41 * 29 * 5, 10**9):  # one plane, 5 planes (uneven), all at once
            assert np.array_equal(builtin._affine_coords(shape, m, centre, shift, slab), whole)


@pytest.fixture(scope="module")
def subject() -> dict:
    return builtin.simulate_subject(0, seed=0, contrasts=("T1w", "T2w", "PDw", "FLAIR"),
                                    return_tissues=True)


def test_tissue_contrast(subject: dict):
    """CSF darker than WM on T1w and brighter on T2w; GM in between; FLAIR nulls CSF."""
    pure = {k: subject[f"tissue:{k}"] > 0.9 for k in ("CSF", "GM", "WM")}
    for k, m in pure.items():
        assert m.sum() > 200, k  # enough pure voxels of each tissue to compare
    mean = {c: {k: float(np.asarray(subject[c].dataobj)[m].mean()) for k, m in pure.items()}
            for c in ("T1w", "T2w", "PDw", "FLAIR")}
    t1, t2 = mean["T1w"], mean["T2w"]
    assert t1["CSF"] < t1["GM"] < t1["WM"]
    assert t1["WM"] > 1.5 * t1["CSF"]
    assert t2["WM"] < t2["GM"] < t2["CSF"]
    assert t2["CSF"] > 1.5 * t2["WM"]
    assert mean["FLAIR"]["CSF"] < 0.5 * mean["FLAIR"]["WM"]
    # the signal ratios follow the spin-echo equation (noise and bias average out)
    exp = {k: builtin.signal("T1w", *(builtin.TISSUES[k][p] for p in ("T1", "T2", "PD")))
           for k in ("CSF", "WM")}
    assert abs(np.log((t1["CSF"] / t1["WM"]) / (exp["CSF"] / exp["WM"]))) < 0.35


def test_simulation_is_skull_stripped_noisy_and_deterministic(subject: dict):
    t1 = np.asarray(subject["T1w"].dataobj)
    assert t1.dtype == np.float32
    assert (t1 == 0).mean() > 0.3  # background is exactly 0, like the shared data
    # Rician noise: pure-WM voxels are not all equal
    wm = subject["tissue:WM"] > 0.99
    assert t1[wm].std() > 0.01 * t1[wm].mean()
    again = builtin.simulate_subject(0, seed=0, contrasts=("T1w",))
    np.testing.assert_array_equal(np.asarray(again["T1w"].dataobj), t1)
    other = builtin.simulate_subject(1, seed=0, contrasts=("T1w",))
    assert not np.array_equal(np.asarray(other["T1w"].dataobj), t1)
    # subjects differ in anatomy (deformation), not only in noise
    a = np.asarray(again["T1w"].dataobj) > 0
    b = np.asarray(other["T1w"].dataobj) > 0
    assert (a ^ b).sum() > 0.02 * a.sum()


def test_prepare_builtin_cli(tmp_path: Path, capsys):
    out = tmp_path / "b.npz"
    rc = main(["data", "prepare", "builtin", "--out", str(out), "--n-subjects", "4",
               "--size", "96", "96", "--test-fraction", "0.25", "--extra-contrast", "PDw"])
    assert rc == 0, capsys.readouterr().err
    assert "Wrote" in capsys.readouterr().out
    d = load_prepared(out)
    assert d.contrasts == ["T1w", "T2w", "PDw"]
    assert sorted(set(d.subject.tolist())) == ["sim-001", "sim-002", "sim-003", "sim-004"]
    assert len(d.settings["test_subjects"]) == 1
    assert d.settings["source"] == "builtin" and d.settings["builtin"]["n_subjects"] == 4
    assert not (set(d.subject[d.split == "test"].tolist())
                & set(d.subject[d.split == "train"].tolist()))
    # the contrast survives normalisation: ventricles (CSF) are dark on T1w, bright on T2w
    t1, t2 = d.images["T1w"][d.mask], d.images["T2w"][d.mask]
    dark_t1 = t1 < np.percentile(t1, 5)
    assert t2[dark_t1].mean() > np.percentile(t2, 75)
    # each subject is a whole volume sliced like real data: several slices, one crop
    for s in set(d.subject.tolist()):
        rows = d.subject == s
        assert rows.sum() > 20
        assert len({tuple(c) for c in d.crop[rows].tolist()}) == 1


def test_info_builtin(capsys):
    assert main(["data", "info", "builtin", "--n-subjects", "2"]) == 0
    out = capsys.readouterr().out
    assert "sim-001" in out and "sim-002" in out and "PDw" in out and "80x98x81" in out
