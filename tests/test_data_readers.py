"""Readers: BIDS (the shared data), HCP-style, sessions, folders of 2-D images, `data info`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from mrsynth.cli import main
from mrsynth.data.normalise import normalise_volume
from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.data.readers import detect_layout, index_dataset, load_image_2d
from mrsynth.data.volumes import brain_mask, load_volume
from mrsynth.errors import DataError

# From ../shared/README.md: subject -> (grid, dtype on disk)
SHARED = {
    "sub-gli00001": ((240, 240, 155), "int16"),
    "sub-met00110": ((240, 240, 155), "int16"),
    "sub-fg6692": ((240, 240, 155), "int16"),
    "sub-bratscase": ((240, 240, 155), "float64"),
    "sub-ms07": ((182, 218, 182), "float32"),
    "sub-ms19": ((182, 218, 182), "float32"),
    "sub-mni152": ((182, 218, 182), "int16"),
}


def test_bids_reader_on_shared_data(mrpaired: Path):
    idx = index_dataset(mrpaired)
    assert idx.layout == "bids"
    assert sorted(s.id for s in idx.subjects) == sorted(SHARED)
    assert idx.contrasts == ["T1w", "T2w", "FLAIR"]
    for rec in idx.subjects:
        expected = {"T1w", "T2w"} | ({"FLAIR"} if rec.id != "sub-mni152" else set())
        assert set(rec.files) == expected
        grid, dtype = SHARED[rec.id]
        for c, f in rec.files.items():
            assert Path(f).name == f"{rec.id}_{c}.nii.gz"
            img = nib.load(f)
            assert img.shape == grid
            assert np.allclose(img.header.get_zooms(), 1.0)
            assert str(img.get_data_dtype()) == dtype


def test_data_info_on_shared_data(mrpaired: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "info", str(mrpaired)]) == 0
    out = capsys.readouterr().out
    for sub in SHARED:
        assert sub in out
    assert out.count("240x240x155") == 4 * 3  # four SRI24 subjects, three contrasts each
    assert out.count("182x218x182") == 2 * 3 + 2  # ms07/ms19 with FLAIR, mni152 without
    assert "float64" in out and "int16" in out and "float32" in out
    assert "-60.5" in out  # ms19 T2w minimum: negative intensities are reported
    assert "No problems found" in out


def test_bids_sessions_stay_in_one_split(mini_bids: Path, tmp_path: Path):
    root = tmp_path / "sessions"
    src = {s: mini_bids / s / "anat" for s in ("sub-ms19", "sub-met00110")}
    for ses in ("ses-1", "ses-2"):
        anat = root / "sub-a" / ses / "anat"
        anat.mkdir(parents=True)
        for c in ("T1w", "T2w"):
            (anat / f"sub-a_{ses}_{c}.nii.gz").symlink_to(src["sub-ms19"] / f"sub-ms19_{c}.nii.gz")
    anat = root / "sub-b" / "anat"
    anat.mkdir(parents=True)
    for c in ("T1w", "T2w"):
        (anat / f"sub-b_{c}.nii.gz").symlink_to(src["sub-met00110"] / f"sub-met00110_{c}.nii.gz")
    idx = index_dataset(root)
    assert [(s.id, s.participant) for s in idx.subjects] == [
        ("sub-a_ses-1", "sub-a"), ("sub-a_ses-2", "sub-a"), ("sub-b", "sub-b")]
    for seed in range(4):
        out = prepare_dataset(root, tmp_path / f"s{seed}.npz", size=(128, 128), slice_step=8,
                              test_fraction=0.5, seed=seed)
        d = load_prepared(out)
        a_splits = set(d.split[np.char.startswith(d.subject.astype(str), "sub-a")].tolist())
        assert len(a_splits) == 1
        assert d.settings["test_subjects"] in (["sub-a"], ["sub-b"])


def test_hcp_layout(mini_bids: Path, tmp_path: Path):
    root = tmp_path / "hcp"
    for sub, hcp_id in (("sub-ms19", "100307"), ("sub-met00110", "100408")):
        d = root / hcp_id / "T1w"
        d.mkdir(parents=True)
        for c in ("T1w", "T2w"):
            shutil.copy(mini_bids / sub / "anat" / f"{sub}_{c}.nii.gz",
                        d / f"{c}_acpc_dc_restore_brain.nii.gz")
    (root / "100408" / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz").unlink()  # T2w only
    assert detect_layout(root) == "hcp"
    idx = index_dataset(root)
    assert [(s.id, sorted(s.files)) for s in idx.subjects] == [
        ("100307", ["T1w", "T2w"]), ("100408", ["T2w"])]
    out = prepare_dataset(root, tmp_path / "hcp.npz", size=(128, 128), slice_step=4,
                          unpaired=True, test_subjects=["100408"])
    d = load_prepared(out)
    assert d.settings["layout"] == "hcp"
    assert set(d.subject.tolist()) == {"100307", "100408"}
    sel = d.subject == "100408"
    assert not d.available["T1w"][sel].any() and d.available["T2w"][sel].all()
    assert (d.split[sel] == "test").all()


# --------------------------------------------------------------------------- 2-D folders
def _real_slices(mini_bids: Path, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n real (T1w, T2w) axial slices, 64x64, from the mini data set."""
    t1 = load_volume(mini_bids / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz").data
    t2 = load_volume(mini_bids / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz").data
    ks = np.linspace(35, 55, n).astype(int)
    return [(t1[14:78, 22:86, k], t2[14:78, 22:86, k]) for k in ks]


def _to_uint(a: np.ndarray, bits: int) -> np.ndarray:
    a = a - a.min()
    return np.round(a / a.max() * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)


def _expected(img: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Independent normalisation of one 2-D image with the pair's joint mask."""
    mask = brain_mask(img) & brain_mask(other)
    out, _, _ = normalise_volume(img.astype(np.float64), mask)
    return out


def test_folders_layout_formats_and_pairing(mini_bids: Path, tmp_path: Path):
    root = tmp_path / "folders"
    pairs = _real_slices(mini_bids, 6)
    writers = {
        ".png": lambda p, a: Image.fromarray(_to_uint(a, 16)).save(p),
        ".tif": lambda p, a: tifffile.imwrite(p, a.astype(np.float32)),
        ".npy": lambda p, a: np.save(p, a.astype(np.float32)),
    }
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    # write B before A and in reverse order: pairing must not depend on directory order
    for i in reversed(range(len(pairs))):
        split = "test" if i >= 4 else "train"
        sfx = list(writers)[i % 3]
        name = f"sub-ms19_slice{i:02d}"
        for letter, arr in (("B", pairs[i][1]), ("A", pairs[i][0])):
            d = root / f"{split}{letter}"
            d.mkdir(parents=True, exist_ok=True)
            writers[sfx](d / f"{name}{sfx}", arr)
        written[f"{split}/{name}"] = (load_image_2d(root / f"{split}A" / f"{name}{sfx}"),
                                      load_image_2d(root / f"{split}B" / f"{name}{sfx}"))
    assert detect_layout(root) == "folders"
    # the participant parsed from the names (sub-ms19) is in both folders: a leak warning
    with pytest.warns(UserWarning, match="both train and test"):
        out = prepare_dataset(root, tmp_path / "f.npz", size=(64, 64))
    d = load_prepared(out)
    assert d.settings["layout"] == "folders"
    assert len(d) == 6
    assert (d.crop == 0).all()
    assert sorted(d.split.tolist()) == ["test"] * 2 + ["train"] * 4
    for row, sid in enumerate(d.subject.tolist()):
        a, b = written[sid]
        assert d.split[row] == sid.split("/")[0]
        np.testing.assert_allclose(d.images["T1w"][row], _expected(a, b), atol=1e-5)
        np.testing.assert_allclose(d.images["T2w"][row], _expected(b, a), atol=1e-5)
    assert any("both train and test" in w for w in d.settings["warnings"])


def test_folders_pair_by_sorted_position_and_bit_depths(mini_bids: Path, tmp_path: Path):
    root = tmp_path / "pos"
    (root / "trainA").mkdir(parents=True)
    (root / "trainB").mkdir(parents=True)
    pairs = _real_slices(mini_bids, 3)
    for i in (2, 0, 1):
        Image.fromarray(_to_uint(pairs[i][0], 8)).save(root / "trainA" / f"t1_{i}.png")
        Image.fromarray(_to_uint(pairs[i][1], 16)).save(root / "trainB" / f"t2_{i}.png")
    a8 = load_image_2d(root / "trainA" / "t1_0.png")
    assert a8.max() == 255 and a8.dtype == np.float32
    assert load_image_2d(root / "trainB" / "t2_0.png").max() == 65535
    with pytest.warns(UserWarning, match="paired by position"):
        out = prepare_dataset(root, tmp_path / "p.npz", size=(64, 64))
    d = load_prepared(out)
    assert d.subject.tolist() == ["train/t1_0", "train/t1_1", "train/t1_2"]
    for row in range(3):
        # t1_i is paired with t2_i: the stored T2w is slice i's, not another slice's
        corr = [np.corrcoef(d.images["T2w"][row].ravel(),
                            _expected(pairs[j][1], pairs[j][0]).ravel())[0, 1] for j in range(3)]
        assert int(np.argmax(corr)) == row and corr[row] > 0.99


def test_colour_image_is_rejected(tmp_path: Path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="colour"):
        load_image_2d(tmp_path / "c.png")
    grey_rgb = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image_2d(tmp_path / "g.png"), grey_rgb[..., 0])


def test_unknown_layout_is_a_clear_error(tmp_path: Path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="Cannot tell the layout"):
        index_dataset(tmp_path / "random")


def test_data_info_on_one_file(mrpaired: Path, capsys: pytest.CaptureFixture[str]):
    f = mrpaired / "sub-met00110" / "anat" / "sub-met00110_T2w.nii.gz"
    assert main(["data", "info", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (sub,) = info["subjects"]
    (c,) = sub["contrasts"]
    assert (sub["id"], c["contrast"], c["shape"], c["dtype"]) == (
        "sub-met00110", "T2w", [240, 240, 155], "int16")
    raw = np.asanyarray(nib.load(f).dataobj)
    assert (c["min"], c["max"]) == (float(raw.min()), float(raw.max()))
    assert c["orientation"] == "RAS" and info["n_problems"] == 0
