"""``mrsynth translate`` on real shared volumes (cropped copies) with a tiny trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import one_torch_thread
from mrsynth.cli import main
from mrsynth.data import DataWarning
from mrsynth.data.volumes import load_volume
from mrsynth.errors import DataError
from mrsynth.eval.common import Direction
from mrsynth.eval.translate import (
    Geometry,
    output_name,
    translate_array_volume,
    translate_image,
    translate_volume,
)
from test_eval_fixtures import tiny_run

SUBJECTS = ("sub-ms19", "sub-gli00001")  # LAS float32 (qform only) and LPS int16 (q+sform)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_small) -> Path:
    return tiny_run(tmp_path_factory, prepared_small, "cyclegan")


@pytest.fixture(scope="module")
def volumes(mrpaired, tmp_path_factory) -> dict[str, Path]:
    """24 axial slices through the brain of two real subjects, headers kept by nibabel."""
    root = tmp_path_factory.mktemp("volumes")
    out = {}
    for sub in SUBJECTS:
        for c in ("T1w", "T2w"):
            img = nib.load(mrpaired / sub / "anat" / f"{sub}_{c}.nii.gz")
            dest = root / sub / "anat" / f"{sub}_{c}.nii.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img.slicer[:, :, 60:84], dest)
            out[f"{sub}_{c}"] = dest
    return out


class _Identity:
    """A translator returning its input: isolates the geometry and intensity mapping."""

    model_name = "identity"

    def translate(self, x, direction):
        return x.float().cpu()


@pytest.mark.parametrize("sub", SUBJECTS)
def test_geometry_and_intensity_mapping_invert_exactly(volumes, sub):
    vol = load_volume(volumes[f"{sub}_T1w"])
    data = vol.data
    fg = data != 0  # skull-stripped: background is exactly 0
    lo, hi = np.percentile(data[fg].astype(np.float64), [0.5, 99.5])
    d = Direction("A2B", "T1w", "T2w")
    out, n = translate_array_volume(data, _Identity(), d, Geometry((256, 256), 1, (0.5, 99.5)))
    assert n == 24 and out.shape == data.shape and out.dtype == np.float32
    # inside the brain the round trip gives the input clipped to the robust range
    np.testing.assert_allclose(out[fg], np.clip(data[fg], lo, hi), atol=1e-4 * (hi - lo))
    assert np.all(out[~fg] == 0) or np.mean(out[~fg] == 0) > 0.99
    # at the run's geometry (x4 block average, 64x64) the brain is blurred, not displaced
    out4, _ = translate_array_volume(data, _Identity(), d, Geometry((64, 64), 4, (0.5, 99.5)))
    err = np.abs(out4[fg] - np.clip(data[fg], lo, hi)) / (hi - lo)
    assert np.median(err) < 0.08
    shifted = np.abs(np.roll(out4, 4, axis=0)[fg] - np.clip(data[fg], lo, hi)) / (hi - lo)
    assert np.median(shifted) > np.median(err)


@pytest.mark.parametrize("sub", SUBJECTS)
def test_identity_translation_of_files_reproduces_the_input(volumes, sub, tmp_path):
    """Through the file path: reorientation back to the input's voxel order and 2-D images."""
    src = volumes[f"{sub}_T1w"]
    d = Direction("A2B", "T1w", "T2w")
    geo = Geometry((256, 256), 1, (0.5, 99.5))
    translate_volume(src, tmp_path / "id.nii.gz", _Identity(), d, geo, batch_size=8,
                     device="cpu")
    x = np.asarray(nib.load(src).dataobj, dtype=np.float64)  # on-disk voxel order
    y = np.asarray(nib.load(tmp_path / "id.nii.gz").dataobj, dtype=np.float64)
    fg = x != 0
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    np.testing.assert_allclose(y[fg], np.clip(x[fg], lo, hi), atol=1e-4 * (hi - lo))
    plane = x[:, :, 5].astype(np.float32)
    np.save(tmp_path / "p.npy", plane)
    translate_image(tmp_path / "p.npy", tmp_path / "q.npy", _Identity(), d, geo, batch_size=1,
                    device="cpu")
    q = np.load(tmp_path / "q.npy")
    f2 = plane != 0
    kept = f2 & (q != 0)  # the brain mask drops specks smaller than 10 % of the brain
    assert kept.sum() > 0.995 * f2.sum()
    lo2, hi2 = np.percentile(plane[f2].astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(q[kept], np.clip(plane[kept], lo2, hi2), atol=1e-4 * (hi2 - lo2))
    assert np.all(q[~f2] == 0)


@pytest.mark.parametrize("sub", SUBJECTS)
def test_translated_nifti_keeps_header_and_maps_to_input_range(run_dir, volumes, sub, tmp_path,
                                                              capsys):
    src = volumes[f"{sub}_T1w"]
    dest = tmp_path / "out.nii.gz"
    assert main(["translate", "--run", str(run_dir), "--direction", "T1w2T2w", "--input",
                 str(src), "--output", str(dest), "--device", "cpu", "--batch-size", "7"]) == 0
    assert "slices/s" in capsys.readouterr().out
    a, b = nib.load(src), nib.load(dest)
    assert b.shape == a.shape
    assert np.array_equal(b.affine, a.affine)
    assert b.get_data_dtype() == np.float32
    assert b.header.get_zooms() == a.header.get_zooms()
    for k in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
              "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(b.header[k], a.header[k], err_msg=k)
    np.testing.assert_array_equal(b.get_qform(), a.get_qform())
    np.testing.assert_array_equal(b.get_sform(), a.get_sform())
    x, y = np.asarray(a.dataobj, dtype=np.float64), np.asarray(b.dataobj, dtype=np.float64)
    fg = x != 0
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    # tanh outputs in [-1, 1] map onto the input's robust brain range, in the input's units
    tol = 1e-4 * (hi - lo)
    assert y[fg].min() >= lo - tol and y[fg].max() <= hi + tol
    assert np.mean(y[fg] != 0) > 0.95  # the brain was translated (not left as background)
    assert np.mean(y[~fg] == 0) > 0.99  # background keeps the input's value (0)
    assert np.std(y[fg]) > 1e-3 * (hi - lo)


def test_folder_input_bids_names_and_2d_images(run_dir, volumes, tmp_path, capsys):
    src = tmp_path / "in"
    sub = src / "sub-ms19" / "anat"
    sub.mkdir(parents=True)
    for c in ("T1w", "T2w"):
        shutil.copy(volumes[f"sub-ms19_{c}"], sub / f"sub-ms19_{c}.nii.gz")
    vol = np.asarray(nib.load(volumes["sub-ms19_T1w"]).dataobj, dtype=np.float32)
    plane = vol[:, :, 12]
    np.save(src / "slice12.npy", plane)
    from PIL import Image

    png = np.clip(plane / plane.max() * 60000, 0, 65535).astype(np.uint16)
    Image.fromarray(png).save(src / "slice12png.png")
    out = tmp_path / "out"
    assert main(["translate", "--run", str(run_dir), "--direction", "T1w2T2w", "--input",
                 str(src), "--output", str(out), "--device", "cpu"]) == 0
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert made == ["slice12_desc-cyclegan_T2w.npy", "slice12png_desc-cyclegan_T2w.png",
                    "sub-ms19/anat/sub-ms19_desc-cyclegan_T2w.nii.gz"]
    y = np.load(out / "slice12_desc-cyclegan_T2w.npy")
    assert y.shape == plane.shape and y.dtype == np.float32
    fg = plane != 0
    lo, hi = np.percentile(plane[fg].astype(np.float64), [0.5, 99.5])
    assert y[fg].min() >= lo - 1e-3 * (hi - lo) and y[fg].max() <= hi + 1e-3 * (hi - lo)
    assert np.all(y[~fg] == 0)
    with Image.open(out / "slice12png_desc-cyclegan_T2w.png") as im:
        assert np.asarray(im).shape == png.shape and np.asarray(im).dtype == np.uint16
    assert "3 file(s)" in capsys.readouterr().out


def test_output_names():
    d = Direction("A2B", "T1w", "T2w")
    assert output_name(Path("sub-ms19_T1w.nii.gz"), d, "cyclegan_s") == (
        "sub-ms19_desc-cyclegans_T2w.nii.gz")
    assert output_name(Path("sub-01_ses-2_acq-fast_run-1_T1w.nii"), d, "unit") == (
        "sub-01_ses-2_acq-fast_run-1_desc-unit_T2w.nii")
    assert output_name(Path("sub-01_desc-brain_T1w.nii.gz"), d, "unit") == (
        "sub-01_desc-unit_T2w.nii.gz")
    assert output_name(Path("sub-01_T2w.nii.gz"), d, "unit") is None
    assert output_name(Path("sub-01_FLAIR.nii.gz"), d, "unit") is None
    assert output_name(Path("scan.nii.gz"), d, "unit") == "scan_desc-unit_T2w.nii.gz"


def test_4d_nifti_is_refused_without_output(run_dir, volumes, tmp_path, capsys):
    img = nib.load(volumes["sub-ms19_T1w"])
    data = np.asarray(img.dataobj)
    four = tmp_path / "sub-ms19_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), four)
    dest = tmp_path / "out.nii.gz"
    rc = main(["translate", "--run", str(run_dir), "--direction", "T1w2T2w", "--input",
               str(four), "--output", str(dest), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "4-D" in err and str(four) in err.replace("\n", "")
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == [four.name]


def test_existing_output_and_missing_checkpoint(run_dir, volumes, tmp_path, capsys):
    src = volumes["sub-gli00001_T2w"]
    dest = tmp_path / "t1.nii.gz"
    args = ["translate", "--run", str(run_dir), "--direction", "T2w2T1w", "--input", str(src),
            "--output", str(dest), "--device", "cpu"]
    assert main(args) == 0
    before = dest.read_bytes()
    assert main(args) != 0 and "--overwrite" in capsys.readouterr().err
    assert dest.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    broken = tmp_path / "run-without-checkpoint"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    other = tmp_path / "other.nii.gz"
    rc = main(["translate", "--run", str(broken), "--direction", "T2w2T1w", "--input", str(src),
               "--output", str(other), "--device", "cpu"])
    assert rc != 0 and "checkpoint" in capsys.readouterr().err.lower()
    assert not other.exists()



def test_a_file_named_as_another_contrast_is_refused(run_dir, volumes, tmp_path, capsys):
    """``sub-x_T1w.nii.gz`` with ``--direction T2w2T1w`` would be read as a T2w image and give
    a meaningless volume: refused before any work, naming the direction to use; a FLAIR file
    is refused too (the run knows only T1w and T2w); an unsuffixed name is not judged."""
    src = volumes["sub-gli00001_T1w"]
    dest = tmp_path / "out.nii.gz"
    base = ["translate", "--run", str(run_dir), "--input", str(src), "--output", str(dest),
            "--device", "cpu"]
    assert main([*base, "--direction", "T2w2T1w"]) != 0
    err = capsys.readouterr().err
    assert "named as a T1w image" in err and "--direction T1w2T2w" in err
    assert not dest.exists()
    flair = tmp_path / "sub-x_FLAIR.nii.gz"
    shutil.copy(src, flair)
    assert main(["translate", "--run", str(run_dir), "--input", str(flair), "--output",
                 str(dest), "--direction", "T1w2T2w", "--device", "cpu"]) != 0
    assert "translates only T1w and T2w" in capsys.readouterr().err
    plain = tmp_path / "scan.nii.gz"
    shutil.copy(src, plain)
    assert main(["translate", "--run", str(run_dir), "--input", str(plain), "--output",
                 str(dest), "--direction", "T1w2T2w", "--device", "cpu"]) == 0
    assert main([*base, "--direction", "T1w2T2w", "--overwrite"]) == 0


def test_brain_larger_than_the_training_grid_is_reported(volumes):
    """A crop that cuts brain off must say so instead of silently writing background there."""
    data = load_volume(volumes["sub-ms19_T1w"]).data
    d = Direction("A2B", "T1w", "T2w")
    with pytest.warns(DataWarning, match=r"larger than the run's training size 64 x 64"):
        out, _ = translate_array_volume(data, _Identity(), d, Geometry((64, 64), 1, (0.5, 99.5)))
    fg = data != 0
    assert np.mean(out[fg] == 0) > 0.2  # the cut-off brain really is background


# --------------------------------------------------------------------------- issue 10
def _translate_args(run_dir, src, dest, *extra):
    return ["translate", "--run", str(run_dir), "--direction", "T1w2T2w", "--input", str(src),
            "--output", str(dest), "--device", "cpu", *extra]


@pytest.mark.parametrize(("name", "suffixes"), [
    ("x.txt", ".nii.gz or .nii"), ("x.png", ".nii.gz or .nii"), ("x", ".nii.gz or .nii")])
def test_an_output_suffix_translate_cannot_write_is_refused_before_the_work(
        run_dir, volumes, tmp_path, capsys, monkeypatch, name, suffixes):
    import mrsynth.eval.translate as tr

    calls = []
    monkeypatch.setattr(tr, "_translate_slices", lambda *a, **k: calls.append(a))
    rc = main(_translate_args(run_dir, volumes["sub-ms19_T1w"], tmp_path / name))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and calls == []
    assert str(tmp_path / name) in err and suffixes in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_2d_image_needs_an_image_output(run_dir, tmp_path, capsys):
    plane = np.random.default_rng(0).uniform(0, 100, (64, 64)).astype(np.float32)
    np.save(tmp_path / "p.npy", plane)
    rc = main(_translate_args(run_dir, tmp_path / "p.npy", tmp_path / "q.nii.gz"))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and ".png, .tif, .tiff or .npy" in err
    assert not (tmp_path / "q.nii.gz").exists()


def test_an_unwritable_output_is_refused_before_the_work(run_dir, volumes, tmp_path, capsys,
                                                         monkeypatch):
    import mrsynth.eval.translate as tr

    calls = []
    monkeypatch.setattr(tr, "_translate_slices", lambda *a, **k: calls.append(a))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    dest = blocker / "out" / "t2.nii.gz"
    rc = main(_translate_args(run_dir, volumes["sub-ms19_T1w"], dest))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and calls == [] and str(dest) in err and "is a file" in err
    assert "Traceback" not in err


def _phantoms(shape=(96, 112, 48)):
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 20, shape).astype(np.float32)
    box = np.zeros(shape, np.float32)
    box[16:80, 20:92, 8:40] = rng.uniform(50, 150, (64, 72, 32))  # a textured box
    z, y, x = np.mgrid[: shape[2], : shape[1], : shape[0]]
    ball = ((((x - 48) / 38) ** 2 + ((y - 56) / 44) ** 2 + ((z - 24) / 20) ** 2) < 1)
    ball = ball.transpose(2, 1, 0).astype(np.float32) * 100.0  # round, but uniform
    ball += rng.normal(0, 1, shape).astype(np.float32) * (ball > 0)
    return {"noise": (noise, "specks"), "box": (box, "like a box"),
            "ball": (ball, "nearly uniform")}


@pytest.mark.parametrize("kind", ["noise", "box", "ball"])
def test_translating_something_that_is_not_a_brain_warns(kind):
    data, why = _phantoms()[kind]
    d = Direction("A2B", "T1w", "T2w")
    with pytest.warns(DataWarning, match=f"does not look like a brain image.*{why}"):
        translate_array_volume(data, _Identity(), d, Geometry((128, 128), 1, (0.5, 99.5)),
                               name=kind)


def test_translating_a_photo_warns(tmp_path):
    from skimage import data as samples

    np.save(tmp_path / "camera.npy", samples.camera().astype(np.float32))  # a real photo
    d = Direction("A2B", "T1w", "T2w")
    with pytest.warns(DataWarning, match=r"camera\.npy does not look like a brain.*border"):
        translate_image(tmp_path / "camera.npy", tmp_path / "out.npy", _Identity(), d,
                        Geometry((256, 256), 1, (0.5, 99.5)), batch_size=1, device="cpu")
    assert (tmp_path / "out.npy").is_file()  # translated anyway: a warning, not an error


def test_an_exactly_constant_phantom_is_refused():
    data = np.zeros((64, 64, 32), np.float32)
    data[16:48, 16:48, 8:24] = 100.0
    d = Direction("A2B", "T1w", "T2w")
    with pytest.warns(DataWarning, match="nearly uniform"), pytest.raises(
            DataError, match="constant inside the brain"):
        translate_array_volume(data, _Identity(), d, Geometry((64, 64), 1, (0.5, 99.5)))


def test_real_brains_and_slabs_give_no_not_a_brain_warning(mrpaired, volumes, tmp_path,
                                                          recwarn):
    from mrsynth.data.volumes import brain_mask
    from mrsynth.eval.translate import brain_doubts

    for sub in ("sub-ms19", "sub-gli00001", "sub-bratscase", "sub-mni152"):
        for c in ("T1w", "T2w"):
            data = load_volume(mrpaired / sub / "anat" / f"{sub}_{c}.nii.gz").data
            assert brain_doubts(data, brain_mask(data)) == [], (sub, c)
    # the whole path, on a real slab and a real 2-D slice: no warning at all
    d = Direction("A2B", "T1w", "T2w")
    slab = load_volume(volumes["sub-ms19_T1w"]).data
    translate_array_volume(slab, _Identity(), d, Geometry((256, 256), 1, (0.5, 99.5)))
    np.save(tmp_path / "s.npy", slab[:, :, 12])
    translate_image(tmp_path / "s.npy", tmp_path / "t.npy", _Identity(), d,
                    Geometry((256, 256), 1, (0.5, 99.5)), batch_size=1, device="cpu")
    assert not [w for w in recwarn if "brain image" in str(w.message)]
