"""Loading, validating and reorienting 3-D volumes, and the brain mask.

Every volume mrsynth reads goes through :func:`load_volume`, so the same
checks (unreadable/truncated file, 4-D data, NaN/Inf, constant data, a broken
affine) give the same one-paragraph errors in ``data info``, ``data prepare``
and ``translate``. Volumes are reoriented to the closest canonical (RAS+)
orientation so that array axis 2 is always inferior->superior and axial slices
are ``data[:, :, k]`` whatever orientation the scanner wrote.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mrsynth.errors import DataError

#: Largest difference (mm, or unitless for rotations) between two affines that still
#: counts as "the same grid".
AFFINE_TOLERANCE = 1e-3

NIFTI_SUFFIXES = (".nii", ".nii.gz")

VolumeSource = str | os.PathLike[str] | nib.spatialimages.SpatialImage


class Volume(NamedTuple):
    """A validated volume: unpacks as ``data, canonical, original``."""

    #: float32 array (X, Y, Z) in canonical RAS+ orientation (axis 2 = inferior->superior).
    data: np.ndarray
    #: the canonical nibabel image (its ``.affine`` maps canonical voxels to mm).
    canonical: nib.spatialimages.SpatialImage
    #: the image as stored on disk (original orientation, header and dtype).
    original: nib.spatialimages.SpatialImage


def describe_source(source: VolumeSource) -> str:
    """A name for error messages: the path, or the in-memory image's description."""
    if isinstance(source, nib.spatialimages.SpatialImage):
        return str(source.get_filename() or getattr(source, "_mrsynth_name", "in-memory volume"))
    return str(source)


def open_image(source: VolumeSource) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file (header only); raise :class:`DataError` for anything unreadable."""
    if isinstance(source, nib.spatialimages.SpatialImage):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"Volume {path} does not exist. Check the path and the data set layout.")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a NIfTI volume (.nii or .nii.gz).")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise DataError(
            f"Cannot read {path} as a NIfTI volume ({type(exc).__name__}: {exc}). The file is "
            "damaged or not NIfTI; re-export or re-download it, or remove it from the data set."
        ) from exc


def read_canonical(
    img: nib.spatialimages.SpatialImage, name: str
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Reorient to RAS+ and decode the voxels as float32; decoding errors become DataError."""
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.get_fdata(dtype=np.float32, caching="unchanged"))
        return data.astype(np.float32, copy=False), canonical
    except (EOFError, OSError, zlib.error, ValueError, MemoryError) as exc:
        raise DataError(
            f"Cannot read the voxel data of {name}: {exc}. The file is truncated or corrupt "
            "(an interrupted copy or download is the usual cause); copy it again from the "
            "original source, or remove it from the data set."
        ) from exc


def check_affine(affine: np.ndarray, name: str) -> None:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise DataError(
            f"{name} has an invalid affine (voxel-to-world matrix):\n{np.round(affine, 3)}\n"
            "It is singular or not finite, so its orientation is unknown. Fix the header "
            "(sform/qform) with your conversion tool and try again."
        )


def check_data(data: np.ndarray, name: str) -> None:
    """Reject data no normalisation can make sense of: NaN/Inf and constant volumes."""
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        raise DataError(
            f"{name} contains {n_bad} NaN or infinite voxel(s) of {data.size}. mrsynth will not "
            "guess what they mean: replace them (for example with 0 outside the brain) with "
            "your preprocessing tool, or exclude this volume."
        )
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        what = "all zero" if lo == 0 else f"constant (every voxel is {lo:g})"
        raise DataError(
            f"{name} is {what}: it holds no image. The export or skull stripping probably "
            "failed; regenerate it or remove it from the data set."
        )


def load_volume(source: VolumeSource) -> Volume:
    """Load one 3-D volume, validate it and reorient it to canonical RAS+.

    ``source`` is a ``.nii``/``.nii.gz`` path or an in-memory nibabel image.
    4-D files with a single volume are squeezed; any other 4-D file, NaN/Inf or
    constant data, or an unreadable/truncated file raise :class:`DataError`.
    """
    name = describe_source(source)
    img = open_image(source)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3:
        extra = shape[3:]
        if int(np.prod(extra)) != 1:
            raise DataError(
                f"{name} is a {len(shape)}-D image of shape {shape}: it holds "
                f"{int(np.prod(extra))} volumes, but mrsynth needs one 3-D volume per contrast. "
                "Extract the volume you want (e.g. `fslroi in out 0 1`, or "
                "`nibabel.funcs.four_to_three`) and point mrsynth at that file."
            )
        img = nib.funcs.squeeze_image(img)
    elif len(shape) < 2:
        raise DataError(f"{name} has shape {shape}; mrsynth needs a 3-D volume.")
    check_affine(img.affine, name)
    if len(img.shape) == 2:  # a single 2-D slice stored as NIfTI: make it one axial slice
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, img.header)
    data, canonical = read_canonical(img, name)
    check_data(data, name)
    return Volume(data, canonical, img)


def from_canonical(data: np.ndarray, original: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Put an array on the canonical grid back into ``original``'s voxel order.

    The inverse of the reorientation in :func:`load_volume`: use it to write a
    translated volume in the same orientation (and with the same affine) as the input.
    """
    orig_ornt = nib.orientations.io_orientation(original.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    back = nib.orientations.ornt_transform(ras, orig_ornt)
    return nib.orientations.apply_orientation(data, back)


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
              tol: float = AFFINE_TOLERANCE) -> bool:
    """Whether two (canonical) images share shape and affine within ``tol``."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and bool(
        np.allclose(a.affine, b.affine, atol=tol, rtol=0)
    )


def grid_difference(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> str:
    """Human-readable description of how two grids differ (for error messages)."""
    parts = []
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        parts.append(f"shape {tuple(a.shape[:3])} vs {tuple(b.shape[:3])}")
    diff = float(np.abs(np.asarray(a.affine) - np.asarray(b.affine)).max())
    if diff > AFFINE_TOLERANCE:
        parts.append(f"affines differ by up to {diff:.3g} (tolerance {AFFINE_TOLERANCE:g})")
    return ", ".join(parts) or "identical"


def resample_to(vol: Volume, target: nib.spatialimages.SpatialImage, *, order: int = 1) -> Volume:
    """Resample ``vol`` onto ``target``'s (canonical) grid with trilinear interpolation.

    Used by ``--resample`` when two contrasts of a subject were not saved on one grid.
    """
    from nibabel.processing import resample_from_to

    img = nib.Nifti1Image(vol.data, vol.canonical.affine)
    out = resample_from_to(img, (tuple(target.shape[:3]), target.affine), order=order,
                           mode="constant", cval=float(background_value(vol.data)))
    data = np.asarray(out.dataobj, dtype=np.float32)
    canon = nib.Nifti1Image(data, np.asarray(target.affine))
    return Volume(data, canon, vol.original)


def voxel_size(img: nib.spatialimages.SpatialImage) -> tuple[float, ...]:
    return tuple(float(z) for z in img.header.get_zooms()[:3])


def affine_list(img: nib.spatialimages.SpatialImage) -> list[list[float]]:
    return np.asarray(img.affine, dtype=float).round(6).tolist()


def orientation(img: nib.spatialimages.SpatialImage) -> str:
    return "".join(nib.aff2axcodes(img.affine))


# --------------------------------------------------------------------------- brain mask
def _border(data: np.ndarray) -> np.ndarray:
    """Voxels on the faces of the array (edges for 2-D data)."""
    parts = []
    for ax in range(data.ndim):
        if data.shape[ax] < 3:
            continue
        parts.append(np.take(data, [0, data.shape[ax] - 1], axis=ax).ravel())
    return np.concatenate(parts) if parts else data.ravel()


def background_value(data: np.ndarray) -> float | None:
    """The exact value filling the background of skull-stripped/zero-padded data, if any.

    Returns the most common value on the array border when it covers at least half
    the border and 5 % of the whole array; ``None`` for data with a noisy background.
    """
    border = _border(data)
    values, counts = np.unique(border, return_counts=True)
    k = int(np.argmax(counts))
    if counts[k] < 0.5 * border.size:
        return None
    value = values[k]
    if np.count_nonzero(data == value) < 0.05 * data.size:
        return None
    return float(value)


def brain_mask(data: np.ndarray, *, min_component: float = 0.1) -> np.ndarray:
    """Boolean brain (or head) mask of a 2-D or 3-D array.

    Skull-stripped data (the usual input, and all of the shared data set) has an
    exact background value, so the mask is "not background". Data with a noisy
    background is thresholded with Otsu's method. Either way holes are filled
    (dark lesions, ventricles stay inside) and specks smaller than
    ``min_component`` of the largest connected component are dropped.
    """
    bg = background_value(data)
    if bg is not None:
        mask = data != bg
    else:
        from skimage.filters import threshold_otsu

        sample = data[:: max(1, data.shape[0] // 64)]
        thr = threshold_otsu(sample)
        mask = data > thr
        mask = ndi.binary_opening(mask, iterations=1)
    if not mask.any():
        return mask
    # work inside the bounding box (plus one voxel) : same result, several times faster
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[ax])))
    sub = mask[tuple(box)]
    labels, n = ndi.label(sub)
    if n > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        sub = (sizes >= min_component * sizes.max())[labels]
    out = np.zeros_like(mask)
    out[tuple(box)] = fill_holes(sub)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not reach the array border (like
    ``scipy.ndimage.binary_fill_holes``, computed by labelling, which is faster)."""
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(_border(labels))] = True
    outside[0] = False
    filled = ~outside[labels]
    return filled
