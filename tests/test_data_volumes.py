"""Volumes: loading, validation, canonical orientation, masks, normalisation, crop/pad."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mrsynth.data.normalise import denormalise, fit_scale, normalise, normalise_volume
from mrsynth.data.slicing import (
    SliceSpec,
    block_average,
    brain_origin,
    crop_or_pad,
    to_display,
    uncrop,
)
from mrsynth.data.volumes import brain_mask, from_canonical, load_volume, same_grid
from mrsynth.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def ms19_t1(mrpaired: Path) -> Path:
    return mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"


# --------------------------------------------------------------------------- orientation
def test_flipped_and_permuted_volume_give_the_same_canonical_volume(ms19_t1: Path, tmp_path: Path):
    img = nib.load(ms19_t1)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    ref = load_volume(ms19_t1)
    assert "".join(nib.aff2axcodes(ref.canonical.affine)) == "RAS"

    data = np.asanyarray(img.dataobj)
    nx = data.shape[0]
    # flip the x axis of the array and compensate in the affine: same image in world space
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, nx - 1
    flipped = nib.Nifti1Image(data[::-1].copy(), img.affine @ flip)
    assert nib.aff2axcodes(flipped.affine) == ("R", "A", "S")
    # and permute axes (x, y, z) -> (z, x, y): a sagittal-first storage order
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
    permuted = nib.Nifti1Image(np.transpose(data, (2, 0, 1)).copy(), img.affine @ perm)
    assert nib.aff2axcodes(permuted.affine) == ("S", "L", "A")

    for variant, name in ((flipped, "flip.nii.gz"), (permuted, "perm.nii.gz")):
        nib.save(variant, tmp_path / name)
        vol = load_volume(tmp_path / name)
        np.testing.assert_array_equal(vol.data, ref.data)
        np.testing.assert_allclose(vol.canonical.affine, ref.canonical.affine, atol=1e-6)
        assert same_grid(vol.canonical, ref.canonical)
        # and back to the file's own voxel order
        np.testing.assert_array_equal(from_canonical(vol.data, vol.original),
                                      np.asanyarray(variant.dataobj).astype(np.float32))


def test_canonical_volume_matches_world_coordinates(ms19_t1: Path):
    vol = load_volume(ms19_t1)
    # axis 0 runs to the right, axis 1 anterior, axis 2 superior
    aff = vol.canonical.affine
    assert aff[0, 0] > 0 and aff[1, 1] > 0 and aff[2, 2] > 0
    # a voxel's world position is the same before and after reorientation
    orig = vol.original
    i, j, k = 40, 100, 90
    world = orig.affine @ [i, j, k, 1]
    ijk = np.linalg.solve(aff, world).round().astype(int)[:3]
    assert vol.data[tuple(ijk)] == np.float32(np.asanyarray(orig.dataobj)[i, j, k])


# --------------------------------------------------------------------------- bad volumes
def _save(tmp_path: Path, data: np.ndarray, name: str, affine: np.ndarray | None = None) -> Path:
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), p)
    return p


def test_truncated_file_is_a_clear_error(ms19_t1: Path, tmp_path: Path):
    raw = ms19_t1.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="truncated") as exc:
        load_volume(bad)
    assert str(bad) in str(exc.value)


def test_garbage_file_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match="x.nii.gz"):
        load_volume(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")


def test_4d_volumes(tmp_path: Path):
    rng = np.random.default_rng(0)
    many = _save(tmp_path, rng.random((8, 9, 10, 3), dtype=np.float32), "many.nii.gz")
    with pytest.raises(DataError, match=r"4-D.*3 volumes") as exc:
        load_volume(many)
    assert "many.nii.gz" in str(exc.value)
    one = _save(tmp_path, rng.random((8, 9, 10, 1), dtype=np.float32), "one.nii.gz")
    vol = load_volume(one)
    assert vol.data.shape == (8, 9, 10)


def test_nan_inf_and_constant_volumes(tmp_path: Path):
    data = np.random.default_rng(1).random((10, 10, 10), dtype=np.float32)
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(DataError, match=r"2 NaN or infinite") as exc:
        load_volume(_save(tmp_path, data, "nan.nii.gz"))
    assert "nan.nii.gz" in str(exc.value)
    with pytest.raises(DataError, match="all zero"):
        load_volume(_save(tmp_path, np.zeros((5, 5, 5), np.int16), "zero.nii.gz"))
    with pytest.raises(DataError, match="constant"):
        load_volume(_save(tmp_path, np.full((5, 5, 5), 7.0, np.float32), "seven.nii.gz"))


def test_singular_affine_is_rejected(tmp_path: Path):
    data = np.random.default_rng(2).random((5, 5, 5), dtype=np.float32)
    p = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    raw = bytearray(p.read_bytes())
    # NIfTI-1 header: qform_code at byte 252, srow_x at 280; zero the sform's x scale and
    # drop the qform, so the only orientation left is a singular matrix
    raw[252:254] = struct.pack("<h", 0)
    raw[280:284] = struct.pack("<f", 0.0)
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="invalid affine") as exc:
        load_volume(p)
    assert "flat.nii" in str(exc.value)


# --------------------------------------------------------------------------- masks
def test_brain_mask_on_skull_stripped_real_data(ms19_t1: Path):
    data = load_volume(ms19_t1).data
    mask = brain_mask(data)
    expected = ndi.binary_fill_holes(data != 0)
    assert (mask != expected).sum() <= 0.001 * expected.sum()
    assert 0.1 < mask.mean() < 0.3


def test_brain_mask_with_noisy_background():
    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[:48, :48, :48]
    ball = (xx - 24) ** 2 + (yy - 22) ** 2 + (zz - 25) ** 2 < 15**2
    data = np.where(ball, 100.0, 0.0) + np.abs(rng.normal(0, 8, ball.shape))
    data[24, 22, 25] = 0.0  # a dark hole inside stays inside
    mask = brain_mask(data.astype(np.float32))
    dice = 2 * (mask & ball).sum() / (mask.sum() + ball.sum())
    assert dice > 0.97
    assert mask[24, 22, 25]


# --------------------------------------------------------------------------- normalisation
def test_normalisation_round_trip_on_real_volume(ms19_t1: Path):
    data = load_volume(ms19_t1).data
    mask = brain_mask(data)
    offset, scale = fit_scale(data, mask)
    lo, hi = np.percentile(data[mask].astype(np.float64), [0.5, 99.5])
    # the brain's robust range maps to [-1, 1]
    np.testing.assert_allclose(normalise(np.array([lo, hi]), offset, scale), [-1, 1], atol=1e-12)
    back = denormalise(normalise(data, offset, scale), offset, scale)
    assert np.abs(back - data).max() < 1e-5
    # data with negative values (bias correction) is handled like any other
    assert data.min() < 0


def test_normalise_volume_background_and_clip():
    rng = np.random.default_rng(4)
    data = rng.normal(500, 100, (20, 20, 4)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[4:16, 4:16] = True
    out, offset, scale = normalise_volume(data, mask)
    assert out.dtype == np.float32
    assert (out[~mask] == -1).all()
    assert out.min() >= -1 and out.max() <= 1
    inside = mask & (np.abs((data - offset) / scale) < 1)
    np.testing.assert_allclose(out[inside], (data[inside] - offset) / scale, atol=1e-6)


def test_constant_brain_cannot_be_normalised():
    data = np.zeros((10, 10, 3), np.float32)
    mask = np.zeros_like(data, bool)
    mask[2:8, 2:8] = True
    data[mask] = 5.0
    with pytest.raises(DataError, match="constant"):
        fit_scale(data, mask)


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("origin", [(-7, -3), (5, 11), (0, 0), (-20, 30)])
def test_crop_or_pad_and_uncrop_invert_each_other(origin: tuple[int, int]):
    rng = np.random.default_rng(5)
    vol = rng.random((50, 60, 4)).astype(np.float32)
    size = (40, 64)
    out = crop_or_pad(vol, size, origin, fill=-1.0)
    assert out.shape == (40, 64, 4)
    # out[r, c] = vol[r + row0, c + col0] where that exists, fill elsewhere
    for r, c in ((0, 0), (39, 63), (13, 17)):
        rr, cc = r + origin[0], c + origin[1]
        inside = 0 <= rr < 50 and 0 <= cc < 60
        assert np.array_equal(out[r, c], vol[rr, cc] if inside else np.full(4, -1.0))
    back = uncrop(out, (50, 60), origin, fill=np.nan)
    kept = ~np.isnan(back)
    np.testing.assert_array_equal(back[kept], vol[kept])
    # every voxel inside the window comes back
    rows = slice(max(origin[0], 0), min(origin[0] + 40, 50))
    cols = slice(max(origin[1], 0), min(origin[1] + 64, 60))
    assert kept[rows, cols].all()


def test_brain_origin_centres_the_brain():
    mask = np.zeros((100, 120, 3), bool)
    mask[10:50, 70:110, 1] = True
    r0, c0 = brain_origin(mask, (64, 64))
    window = crop_or_pad(mask, (64, 64), (r0, c0), fill=False)
    rows = np.flatnonzero(window.any(axis=(1, 2)))
    cols = np.flatnonzero(window.any(axis=(0, 2)))
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 0.5
    assert abs((cols[0] + cols[-1]) / 2 - 31.5) <= 0.5
    assert window.sum() == mask.sum()


def test_block_average_matches_direct_mean():
    rng = np.random.default_rng(6)
    a = rng.random((9, 7, 2)).astype(np.float32)
    out = block_average(a, 4)
    assert out.shape == (3, 2, 2)
    np.testing.assert_allclose(out[0, 0], a[0:4, 0:4].mean(axis=(0, 1)), rtol=1e-6)
    # edge blocks are padded by repeating the last row/column
    padded = np.pad(a, ((0, 3), (0, 1), (0, 0)), mode="edge")
    np.testing.assert_allclose(out[2, 1], padded[8:12, 4:8].mean(axis=(0, 1)), rtol=1e-6)


def test_to_display_puts_anterior_on_top():
    s = np.zeros((5, 6))
    s[:, -1] = 1  # the most anterior column (largest y)
    s[0, :] = 2  # the subject's left (smallest x), overrides one corner
    d = to_display(s)
    assert (d[0, 1:] == 1).all()  # top row is anterior
    assert (d[:, 0] == 2).all()  # left column is the subject's left


# --------------------------------------------------------------------------- slice specs
def test_slice_specs():
    mask = np.zeros((10, 10, 30), bool)
    mask[:, :5, 10:20] = True  # 50 % brain in slices 10..19
    mask[:, :1, 20:25] = True  # 10 % in 20..24
    assert SliceSpec.parse("brain:0.2").select(mask).tolist() == list(range(10, 20))
    assert SliceSpec.parse("brain:10%").select(mask).tolist() == list(range(10, 25))
    assert SliceSpec.parse("brain:0.10").select(mask, step=5).tolist() == [10, 15, 20]
    assert SliceSpec.parse("12").select(mask).tolist() == [12]
    assert SliceSpec.parse("3,1").select(mask).tolist() == [1, 3]
    assert SliceSpec.parse("5:8").select(mask).tolist() == [5, 6, 7]
    assert SliceSpec.parse("28:").select(mask).tolist() == [28, 29]
    with pytest.raises(DataError, match="30 axial slices"):
        SliceSpec.parse("120").select(mask, name="vol.nii.gz")
    for bad in ("middle", "brain:2", "8:3"):
        with pytest.raises(ConfigError):
            SliceSpec.parse(bad)
