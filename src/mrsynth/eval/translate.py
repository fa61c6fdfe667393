"""``mrsynth translate``: apply a trained run to NIfTI volumes or 2-D images.

A volume goes through the same steps ``mrsynth data prepare`` applies to a
subject (the data package's own functions, in the same order), then back:

1. load, validate and reorient to canonical RAS+ (:func:`~mrsynth.data.volumes.load_volume`;
   not 3-D, NaN/Inf, unreadable: a clear error);
2. brain mask (:func:`~mrsynth.data.volumes.brain_mask`), per-volume ``offset``/``scale``
   from the brain's robust percentiles recorded in the run's preparation settings
   (:func:`~mrsynth.data.normalise.fit_scale`), in-plane block averaging by the
   run's ``downsample``, clip to [-1, 1], background -1, crop/pad every axial slice
   with brain to the training size around the brain
   (:func:`~mrsynth.data.slicing.brain_origin`, :func:`~mrsynth.data.slicing.crop_or_pad`);
3. translate in batches (``LoadedRun.translate``); a 2.5-D run (``arch.context_slices`` = k)
   gets each slice with its k neighbours on each side as channels, looked up among the
   slices with brain by the rule training used (:mod:`mrsynth.data.context`: beyond the
   first and last slice with brain, the outermost one is repeated);
4. undo the crop (:func:`~mrsynth.data.slicing.uncrop`), undo the downsampling
   (bilinear, block centres to voxel centres), map back to the **input's** units
   with the input's own ``offset``/``scale`` (``y * scale + offset``), and
   put the array back in the input's voxel order
   (:func:`~mrsynth.data.volumes.from_canonical`).

The output is float32 NIfTI with the input's header: the same shape, affine,
qform/sform (codes included) and zooms; only the data type, scaling and
display range (``cal_min``/``cal_max``) change. **Background**: voxels outside
the input's brain mask, outside the translated crop, or in slices without brain
get the input's background value (the exact fill value of skull-stripped data,
e.g. 0; the input's minimum when the background is noisy).

2-D images (PNG, TIFF, NPY) follow the preparation of 2-D folders (the image is
centred rather than the brain); the output format follows the output's suffix:
NPY and TIFF as float32 in the input's units, PNG rounded and clipped to
8-bit (or 16-bit when the input's values exceed 255). A 2.5-D run refuses them
(a 2-D image has no neighbouring slices).

A folder input translates every NIfTI/2-D image below it into the output
folder (same relative paths) with BIDS names: the source contrast, the last
entity of the name, becomes ``desc-<model>_<target>``, e.g. ``sub-ms19_T1w.nii.gz``
-> ``sub-ms19_desc-cyclegan_T2w.nii.gz`` (``<model>`` alphanumeric only, as BIDS
labels must be). Files named for another contrast (``..._T2w`` when
translating T1w2T2w) are left out.

Before any work, every output's suffix is checked (a NIfTI input needs a ``.nii``
or ``.nii.gz`` output, a 2-D image ``.png``, ``.tif``/``.tiff`` or ``.npy``) and its
folder is probed for writing. An input that does not look like a brain (the mask
is a tiny or speckled part of the field of view, fills its bounding box like a
box, runs off the image's edge, or has no contrast inside: noise, a phantom, a
photo) is translated anyway, with a :class:`~mrsynth.data.DataWarning`: the model
only learnt brains.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from mrsynth.data import warn
from mrsynth.data.context import run_context_slices, volume_table
from mrsynth.data.normalise import (
    BACKGROUND,
    DEFAULT_PERCENTILES,
    denormalise,
    fit_scale,
)
from mrsynth.data.readers import IMAGE_SUFFIXES, KNOWN_CONTRASTS, load_image_2d
from mrsynth.data.slicing import (
    brain_origin,
    crop_or_pad,
    downsample_mask,
    from_plane,
    image_origin,
    outline_outside_crop,
    plane_of,
    slices_first,
    to_plane,
    to_training_grid,
    uncrop,
)
from mrsynth.data.volumes import (
    NIFTI_SUFFIXES,
    background_value,
    brain_mask,
    check_data,
    from_canonical,
    load_volume,
    open_image,
)
from mrsynth.errors import ConfigError, DataError
from mrsynth.eval.common import (
    Direction,
    load_run_checked,
    parse_direction,
    refuse_repeated_runs,
)
from mrsynth.utils import atomic_path, check_can_write, check_writable

if TYPE_CHECKING:
    from mrsynth.train.runs import LoadedRun

Log = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass
class Geometry:
    """What translation needs from the run's preparation settings."""

    size: tuple[int, int]
    downsample: int
    percentiles: tuple[float, float]
    plane: str = "axial"

    @classmethod
    def from_settings(cls, settings: dict[str, Any], run_dir: Path | str) -> Geometry:
        size = settings.get("size")
        if not size or len(size) != 2:
            raise ConfigError(
                f"The run {run_dir} records no prepared slice size in config.json (data "
                "settings); it cannot place new volumes on its training grid. Retrain it with "
                "this mrsynth version."
            )
        norm = settings.get("normalisation") or {}
        if norm and norm.get("method", "percentile") != "percentile":
            raise ConfigError(
                f"The run {run_dir} was trained on data normalised with method "
                f"{norm.get('method')!r}, which translate does not know how to reproduce."
            )
        pct = norm.get("percentiles", DEFAULT_PERCENTILES)
        return cls((int(size[0]), int(size[1])), int(settings.get("downsample", 1) or 1),
                   (float(pct[0]), float(pct[1])), plane_of(settings))


def _translate_slices(run: LoadedRun, x: np.ndarray, d: Direction, batch_size: int,
                      device: str, table: np.ndarray | None = None) -> np.ndarray:
    """Translate slices ``x`` (n, H, W); with ``table`` (n, 2k+1) the model's inputs are the
    stacks of neighbouring slices it indexes (2.5-D runs, :mod:`mrsynth.data.context`),
    built batch by batch."""
    import torch

    outs = []
    for i in range(0, x.shape[0], batch_size):
        xa = x[i : i + batch_size, None] if table is None else x[table[i : i + batch_size]]
        xb = torch.from_numpy(np.ascontiguousarray(xa)).to(device)
        outs.append(run.translate(xb, d.internal).float().cpu().numpy()[:, 0])
    return np.concatenate(outs) if outs else np.empty((0, *x.shape[1:]), np.float32)


def _upsample(plane: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Undo :func:`block_average`: bilinear from block centres back to the voxel grid."""
    if factor == 1:
        return plane
    from skimage.transform import resize

    big = resize(plane, (plane.shape[0] * factor, plane.shape[1] * factor, *plane.shape[2:]),
                 order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    return big[: shape[0], : shape[1]]


def _from_training_grid(
    y: np.ndarray, mask: np.ndarray, grid_shape: tuple[int, ...], origin: tuple[int, int],
    f: int, offset: float, scale: float, fill: float,
) -> np.ndarray:
    """Inverse of ``to_training_grid`` for translated planes (H, W[, n]): uncrop, upsample
    and map back to the input's units; voxels outside ``mask`` or the crop get ``fill``."""
    plane = _upsample(uncrop(y, grid_shape, origin, fill=np.nan), f, mask.shape[:2])
    vals = denormalise(plane, offset, scale)
    out = np.full(mask.shape, fill, dtype=np.float64)
    keep = mask & np.isfinite(vals)
    out[keep] = vals[keep]
    return out


#: Plausible brain masks, from the seven shared subjects (whole heads and 24-slice slabs):
#: mask 11-54 % of the field of view, axial slices fill 73-78 % (median) of their bounding
#: box, intensity spread (p99 - p1) / max(|p1|, |p99|) >= 0.5, no mask voxel on the in-plane
#: border. Noise fills 3-5 %, a box phantom 100 %, a uniform phantom has no spread, the
#: objects of photos run off the edge (26-99 % of the border in scikit-image's samples).
#: The bounds leave a wide margin.
PLAUSIBLE_MASK_FRACTION = (0.02, 0.9)
PLAUSIBLE_SLICE_FILL = (0.45, 0.92)
MIN_INTENSITY_SPREAD = 0.1
MAX_BORDER_FRACTION = 0.1
#: A whole brain (or head) foreground: volume in mL and extent in mm along each axis. Only
#: checked when the caller gives voxel sizes because it needs whole volumes (``complete``);
#: translate takes slabs and 2-D images too.
WHOLE_BRAIN_ML = (250.0, 6000.0)
WHOLE_BRAIN_EXTENT_MM = (50.0, 300.0)


def brain_doubts(data: np.ndarray, mask: np.ndarray,
                 zooms: Sequence[float] | None = None) -> list[str]:
    """Reasons why ``mask`` (of a 2-D or 3-D ``data``) does not look like a brain; [] if it does.

    Cheap whole-array statistics, not a classifier: enough to flag noise, phantoms and
    photos, which a model trained on brains translates into confident nonsense. With
    ``zooms`` (a 3-D volume's voxel sizes in mm) the foreground must also have the size of a
    whole brain or head. The one definition: translate warns, complete fails the subject.
    """
    doubts = []
    if zooms is not None and mask.ndim == 3:
        ml = float(mask.sum()) * float(np.prod(zooms[:3])) / 1000.0
        ext = []
        for ax in range(3):
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
            ext.append(0.0 if hit.size == 0 else float(hit[-1] - hit[0] + 1) * float(zooms[ax]))
        (lo_ml, hi_ml), (lo_mm, hi_mm) = WHOLE_BRAIN_ML, WHOLE_BRAIN_EXTENT_MM
        if not lo_ml <= ml <= hi_ml or not all(lo_mm <= e <= hi_mm for e in ext):
            doubts.append(f"its foreground is {ml:.0f} mL and spans {ext[0]:.0f} x {ext[1]:.0f}"
                          f" x {ext[2]:.0f} mm (a whole brain or head: {lo_ml:.0f}-{hi_ml:.0f} "
                          f"mL and {lo_mm:.0f}-{hi_mm:.0f} mm along each axis)")
    frac = float(mask.mean())
    lo_f, hi_f = PLAUSIBLE_MASK_FRACTION
    if not lo_f <= frac <= hi_f:
        doubts.append(f"the brain mask covers {frac:.1%} of the field of view (brains: "
                      f"{lo_f:.0%}-{hi_f:.0%})")
    planes = mask[..., None] if mask.ndim == 2 else mask
    fills = []
    for k in range(planes.shape[2]):
        m = planes[:, :, k]
        n = int(m.sum())
        if n < 0.01 * m.size:  # the tips of the brain say little about its shape
            continue
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        fills.append(n / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
    if fills:
        fill = float(np.median(fills))
        lo_s, hi_s = PLAUSIBLE_SLICE_FILL
        if not lo_s <= fill <= hi_s:
            what = "scattered specks (noise?)" if fill < lo_s else "a box"
            doubts.append(f"the mask fills {fill:.0%} of its bounding box in a typical slice, "
                          f"like {what} (brains: {lo_s:.0%}-{hi_s:.0%})")
    with_brain = planes.any(axis=(0, 1))
    edge = np.concatenate([planes[0], planes[-1], planes[:, 0], planes[:, -1]])[:, with_brain]
    on_border = float(edge.mean()) if edge.size else 0.0
    if on_border > MAX_BORDER_FRACTION:
        doubts.append(f"the mask covers {on_border:.0%} of the image border (a brain lies "
                      "inside the field of view)")
    p1, p99 = np.percentile(data[mask], [1, 99]) if mask.any() else (0.0, 0.0)
    spread = float(p99 - p1) / max(abs(float(p1)), abs(float(p99)), 1e-12)
    if spread < MIN_INTENSITY_SPREAD:
        doubts.append(f"the intensity inside the mask is nearly uniform (spread {spread:.3f}; "
                      f"brains >= {MIN_INTENSITY_SPREAD}), as in a phantom")
    return doubts


def _warn_if_not_brain(data: np.ndarray, mask: np.ndarray, name: str) -> None:
    doubts = brain_doubts(data, mask)
    if doubts:
        warn(f"{name} does not look like a brain image: {'; '.join(doubts)}. It was translated "
             "anyway, but the model only learnt brains: check the input and the result.")


def _fill_value(data: np.ndarray) -> float:
    bg = background_value(data)
    return float(data.min()) if bg is None else float(bg)


# --------------------------------------------------------------------------- volumes
def translate_array_volume(
    data: np.ndarray, run: LoadedRun | Sequence[tuple[LoadedRun, Geometry]], d: Direction,
    geo: Geometry | None = None, *, batch_size: int = 32, device: str = "cpu",
    name: str = "volume",
) -> tuple[np.ndarray, int]:
    """Translate a canonical (X, Y, Z) volume; returns (volume in input units, slices done).

    ``run`` is one run (with its ``geo``) or several ``(run, geo)`` pairs: then every run
    translates the volume in its own plane and the outputs are averaged voxel by voxel
    (multi-view fusion; a voxel one run left out, outside its crop, is the mean of the
    others). All runs share the input's mask, offset and scale, so their outputs are in the
    same units."""
    members = _members(run, geo)
    mask = brain_mask(data)
    if not mask.any():
        raise DataError(f"{name}: no brain/foreground found; the volume looks empty.")
    _warn_if_not_brain(data, mask, name)
    total = np.zeros(data.shape, dtype=np.float64)
    count = np.zeros(data.shape, dtype=np.int32)
    n = 0
    for r, g in members:
        out, k = _predict_volume(data, mask, r, d, g, batch_size=batch_size, device=device,
                                 name=name)
        seen = np.isfinite(out)
        total[seen] += out[seen]
        count += seen
        n += k
    fill = _fill_value(data)
    fused = np.full(data.shape, fill, dtype=np.float64)
    np.divide(total, count, out=fused, where=count > 0)
    return fused.astype(np.float32), n


def _members(run: LoadedRun | Sequence[tuple[LoadedRun, Geometry]],
             geo: Geometry | None) -> list[tuple[LoadedRun, Geometry]]:
    """``(run, geo)`` pairs from one run and its geometry, or from a list of pairs."""
    members = [(run, geo)] if geo is not None else list(run)  # type: ignore[arg-type]
    if not members:
        raise ValueError("translating needs at least one run")
    return members  # type: ignore[return-value]


def _predict_volume(
    data: np.ndarray, mask: np.ndarray, run: LoadedRun, d: Direction, geo: Geometry, *,
    batch_size: int, device: str, name: str,
) -> tuple[np.ndarray, int]:
    """One run's translation of a canonical volume in the input's units, NaN where it
    predicted nothing (outside ``mask``, its crop or its slices); and its slice count."""
    offset, scale = fit_scale(data, mask, geo.percentiles, name=name)
    f = geo.downsample
    mask_ds = downsample_mask(mask, f)
    index = np.flatnonzero(mask.any(axis=(0, 1)))
    out = np.full(data.shape, np.nan, dtype=np.float64)
    if geo.plane != "axial":
        grid = to_training_grid(data, offset, scale, mask_ds, f, mask_ds.shape[:2], (0, 0))
        y_grid, n = predict_grid(run, grid, mask_ds, d, geo, batch_size=batch_size,
                                 device=device, name=name)
        out[:, :, index] = _from_training_grid(
            y_grid[:, :, index], mask[:, :, index], mask_ds.shape[:2], (0, 0), f, offset,
            scale, np.nan)
        return out, n
    origin = _crop_origin(mask_ds, geo, f"{name}: in-plane (after downsample {f})")
    x = slices_first(to_training_grid(
        data[:, :, index], offset, scale, mask_ds[:, :, index], f, geo.size, origin))
    k = run_context_slices(run)  # 2.5-D: neighbours among the slices with brain
    table = volume_table(index, k) if k else None
    y = _translate_slices(run, x, d, batch_size, device, table)  # (n, H, W) normalised
    out[:, :, index] = _from_training_grid(
        np.moveaxis(y, 0, -1), mask[:, :, index], mask_ds.shape[:2], origin, f, offset, scale,
        np.nan)
    return out, int(index.size)


def _crop_origin(mask: np.ndarray, geo: Geometry, where: str) -> tuple[int, int]:
    """The crop origin around the brain (as ``prepare``); warns when the brain overflows
    the run's training size (the brain outside is not translated by this run)."""
    origin = brain_origin(mask, geo.size)
    lost, span_r, span_c = outline_outside_crop(mask, geo.size, origin)
    if lost:
        warn(
            f"{where} the brain spans {span_r} x {span_c} voxels, larger than the run's "
            f"training size {geo.size[0]} x {geo.size[1]}; brain outside the crop ({lost} "
            "voxels of its outline) is not translated by this run and keeps the background "
            "value (unless another run of a fusion covers it). Train on data prepared with a "
            "larger --size to translate the whole brain."
        )
    return origin


def predict_grid(
    run: LoadedRun, grid: np.ndarray, mask: np.ndarray, d: Direction, geo: Geometry, *,
    batch_size: int = 32, device: str = "cpu", name: str = "volume",
) -> tuple[np.ndarray, int]:
    """Translate a normalised volume on the training grid (X, Y, Z: downsampled, background
    -1 outside ``mask``) slice by slice in the run's plane; returns the normalised prediction
    on the same grid (NaN where nothing was predicted: slices without brain, outside the crop)
    and the number of slices translated.

    The plane's slices with brain are cropped around the brain as ``prepare`` crops them
    (:func:`~mrsynth.data.slicing.brain_origin` over the plane's frame), so a run of any
    plane sees its training geometry; 2.5-D stacks come from the plane's neighbours."""
    gp, mp = to_plane(grid, geo.plane), to_plane(mask, geo.plane)
    index = np.flatnonzero(mp.any(axis=(0, 1)))
    origin = _crop_origin(mp, geo, f"{name}: in the {geo.plane} plane")
    x = slices_first(crop_or_pad(np.ascontiguousarray(gp[:, :, index]), geo.size, origin,
                                 BACKGROUND))
    k = run_context_slices(run)
    y = _translate_slices(run, x, d, batch_size, device, volume_table(index, k) if k else None)
    pred = np.full(gp.shape, np.nan, dtype=np.float32)
    pred[:, :, index] = uncrop(np.moveaxis(y, 0, -1), gp.shape[:2], origin, fill=np.nan)
    return np.ascontiguousarray(from_plane(pred, geo.plane)), int(index.size)


def _output_header(img: Any, model: str, d: Direction) -> Any:
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    hdr.set_slope_inter(np.nan, np.nan)
    for k in ("cal_min", "cal_max"):
        if k in hdr:
            hdr[k] = 0
    if "descrip" in hdr:
        hdr["descrip"] = f"mrsynth {model} {d.label}"[:79].encode()
    return hdr


def translate_volume(
    src: Path, dest: Path, run: LoadedRun | Sequence[tuple[LoadedRun, Geometry]],
    d: Direction, geo: Geometry | None, *, batch_size: int, device: str,
) -> int:
    """NIfTI in, NIfTI out (atomically); returns the number of translated slices. Several
    ``(run, geo)`` pairs as ``run`` (``geo`` None) fuse their outputs
    (:func:`translate_array_volume`)."""
    on_disk = open_image(src)
    vol = load_volume(src)
    members = _members(run, geo)
    out, n = translate_array_volume(vol.data, members, d, batch_size=batch_size, device=device,
                                    name=str(src))
    model = fused_name([r for r, _ in members])
    arr = from_canonical(out, vol.original).astype(np.float32)
    if tuple(arr.shape) != tuple(on_disk.shape) and arr.size == int(np.prod(on_disk.shape)):
        arr = arr.reshape(on_disk.shape)  # 2-D NIfTI or a single-volume 4-D file
    cls = type(on_disk) if isinstance(on_disk, nib.Nifti1Image | nib.Nifti2Image) else None
    if cls is None:  # another format nibabel reads (MGH, Analyze): write NIfTI with its affine
        img = nib.Nifti1Image(arr, on_disk.affine)
    else:
        img = cls(arr, None, _output_header(on_disk, model, d))
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)
    return n


# --------------------------------------------------------------------------- 2-D images
def translate_image(
    src: Path, dest: Path, run: LoadedRun, d: Direction, geo: Geometry, *, batch_size: int,
    device: str,
) -> int:
    """A 2-D image, prepared as ``data prepare`` prepares 2-D folders (image centred)."""
    _check_2d_allowed(run, src)
    data = load_image_2d(src)
    check_data(data, str(src))
    mask = brain_mask(data)
    if not mask.any():
        raise DataError(f"{src}: no foreground found (the image is all background).")
    _warn_if_not_brain(data, mask, str(src))
    offset, scale = fit_scale(data, mask, geo.percentiles, name=str(src))
    f = geo.downsample
    mask_ds = downsample_mask(mask, f)
    origin = image_origin(mask_ds.shape, geo.size)
    x = to_training_grid(data, offset, scale, mask_ds, f, geo.size, origin)[None]
    y = _translate_slices(run, x, d, batch_size, device)[0]
    out = _from_training_grid(y, mask, mask_ds.shape, origin, f, offset, scale,
                              _fill_value(data))
    _write_image(dest, out.astype(np.float32), float(data.max()))
    return 1


def fused_name(runs: Sequence[LoadedRun]) -> str:
    """The model name of a fusion: ``<model>-fused`` (``fused`` for mixed models); one
    run's own name when there is one."""
    names = sorted({str(r.model_name) for r in runs})
    if len(runs) == 1:
        return names[0]
    return f"{names[0]}-fused" if len(names) == 1 else "fused"


def _check_2d_allowed(run: LoadedRun, src: Path) -> None:
    """A 2.5-D run needs neighbouring slices, which a 2-D image has not; a coronal or
    sagittal run needs a volume to cut in its plane."""
    plane = plane_of(getattr(run, "data_settings", None))
    if plane != "axial":
        raise ConfigError(
            f"{src} is a 2-D image, but the run {run.run_dir} was trained on {plane} slices: "
            "it needs a volume to cut in that plane. Translate the NIfTI volume instead."
        )
    k = run_context_slices(run)
    if k:
        raise ConfigError(
            f"{src} is a 2-D image, but the run {run.run_dir} is a 2.5-D model "
            f"(arch.context_slices={k}): it needs the {k} neighbouring slice(s) on each side "
            "of every slice, which a 2-D image has not. Translate the NIfTI volume instead."
        )


def _write_image(dest: Path, arr: np.ndarray, input_max: float) -> None:
    sfx = dest.suffix.lower()
    with atomic_path(dest) as tmp:
        if sfx == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        elif sfx in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, arr)
        elif sfx == ".png":
            from PIL import Image

            hi, dt = (255, np.uint8) if input_max <= 255 else (65535, np.uint16)
            Image.fromarray(np.clip(np.rint(arr), 0, hi).astype(dt)).save(tmp, format="PNG")
        else:
            raise ConfigError(f"Output {dest}: unknown image type; use .png, .tif or .npy.")


# --------------------------------------------------------------------------- names and folders
def _split_name(path: Path) -> tuple[str, str]:
    name = path.name
    for sfx in (".nii.gz", ".nii", *IMAGE_SUFFIXES):
        if name.lower().endswith(sfx):
            return name[: -len(sfx)], name[len(name) - len(sfx):]
    return path.stem, path.suffix


def bids_label(model: str) -> str:
    """BIDS labels are alphanumeric: ``cyclegan_s`` -> ``cyclegans``."""
    return re.sub(r"[^A-Za-z0-9]", "", model) or "mrsynth"


def _name_parts(path: Path) -> tuple[list[str], str, str]:
    """A file name's ``_``-separated parts, its BIDS suffix (the last part; "" for a name
    without one) and its extension."""
    stem, ext = _split_name(path)
    parts = stem.split("_")
    return parts, (parts[-1] if len(parts) > 1 else ""), ext


def output_name(path: Path, d: Direction, model: str) -> str | None:
    """BIDS-style output name, or None when the file is another contrast (skip it)."""
    parts, suffix, ext = _name_parts(path)
    label = bids_label(model)
    if suffix == d.source:
        ents = [p for p in parts[:-1] if not p.startswith("desc-")]
    elif suffix in KNOWN_CONTRASTS or suffix == d.target:
        return None
    else:
        ents = [p for p in parts if not p.startswith("desc-")]
    return "_".join([*ents, f"desc-{label}", d.target]) + ext


def _check_named_contrast(path: Path, d: Direction) -> None:
    """Refuse a file whose BIDS suffix names another contrast than the direction's source
    (``sub-01_T1w.nii.gz`` with ``--direction T2w2T1w``): the model would read a T1w image as
    if it were T2w and write a plausible-looking but meaningless volume. A folder skips
    such files instead (:func:`plan_folder`); unsuffixed names are not judged."""
    _, suffix, _ = _name_parts(path)
    if suffix in KNOWN_CONTRASTS and suffix != d.source:
        advice = (f"use --direction {d.target}2{d.source}" if suffix == d.target else
                  f"this run translates only {d.source} and {d.target}")
        raise ConfigError(
            f"Input {path} is named as a {suffix} image (BIDS suffix _{suffix}), but "
            f"--direction {d.label} translates {d.source} images: {advice}. If the file "
            f"really is {d.source}, give it a name that says so.")


def _is_input(p: Path) -> bool:
    low = p.name.lower()
    return p.is_file() and not p.name.startswith(".") and (
        low.endswith(NIFTI_SUFFIXES) or p.suffix.lower() in IMAGE_SUFFIXES
    )


def plan_folder(src: Path, dest: Path, d: Direction, model: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs for a folder, mirroring sub-folders."""
    dest_res = dest.resolve()
    pairs = []
    for p in sorted(src.rglob("*")):
        if not _is_input(p) or dest_res in p.resolve().parents:
            continue
        name = output_name(p, d, model)
        if name is None:
            continue
        pairs.append((p, dest / p.parent.relative_to(src) / name))
    if not pairs:
        raise DataError(
            f"No {d.source} NIfTI volumes or 2-D images (.nii, .nii.gz, .png, .tif, .npy) "
            f"found under {src}. Files named for another contrast are skipped; check the "
            "folder and --direction."
        )
    return pairs


def _check_output_suffix(src: Path, dest: Path) -> None:
    """The output's format follows its suffix; refuse one translate cannot write, up front."""
    name = dest.name.lower()
    if src.name.lower().endswith(NIFTI_SUFFIXES):
        if not name.endswith(NIFTI_SUFFIXES):
            raise ConfigError(
                f"Output {dest}: a NIfTI volume ({src.name}) is written as NIfTI; give an "
                "output ending in .nii.gz or .nii."
            )
    elif dest.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"Output {dest}: a 2-D image ({src.name}) is written as PNG, TIFF or NPY; give an "
            "output ending in .png, .tif, .tiff or .npy."
        )


def _check_input(p: Path) -> None:
    """Cheap header checks for every input before any output is written."""
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        img = open_image(p)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) > 3 and int(np.prod(shape[3:])) != 1:
            raise DataError(
                f"{p} is a {len(shape)}-D image of shape {shape}, not a 3-D volume; translate "
                "needs one 3-D volume per file. Extract the volume you want first (e.g. "
                "`fslroi in out 0 1`)."
            )
        if len(shape) < 2:
            raise DataError(f"{p} has shape {shape}; translate needs a 3-D volume.")


def translate_path(
    run_dir: str | Path | Sequence[str | Path],
    direction: str,
    src: str | Path,
    dest: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 32,
    overwrite: bool = False,
    stochastic: bool = False,
    checkpoint: str | int = "latest",
    log: Log = _noop,
    mirror: bool = False,
) -> dict[str, Any]:
    """Translate a file or folder; returns counts and timing (slices, files, seconds).

    ``stochastic`` keeps latent noise and dropout on (UNIT, as the study's Keras port did):
    each call then writes a different sample; ``mirror`` averages every slice's translation
    with the mirrored slice's (:attr:`~mrsynth.train.runs.LoadedRun.mirror`). Several
    ``run_dir`` (the same contrasts, usually one run per plane) are fused: every NIfTI
    output is the voxel-wise mean of their translations (:func:`translate_array_volume`)."""
    src, dest = Path(src), Path(dest)
    if not src.exists():
        raise DataError(f"Input {src} does not exist.")
    run_dirs = [run_dir] if isinstance(run_dir, str | Path) else list(run_dir)
    if not run_dirs:
        raise ConfigError("Give at least one --run.")
    refuse_repeated_runs(run_dirs)
    members: list[tuple[LoadedRun, Geometry]] = []
    for rd in run_dirs:
        run = load_run_checked(rd, device, checkpoint)
        run.stochastic = stochastic
        run.mirror = mirror
        if stochastic and not run.model.stochastic_inference:
            log(f"{run.model_name} has no noise or dropout at inference; --stochastic changes "
                "nothing")
        members.append((run, Geometry.from_settings(run.data_settings or {}, rd)))
    run = members[0][0]
    d = parse_direction(direction, run.contrasts, run_dirs[0])
    for other, _ in members[1:]:
        if tuple(other.contrasts) != tuple(run.contrasts):
            raise ConfigError(
                f"Runs to fuse must translate the same contrasts: {run_dirs[0]} translates "
                f"{' <-> '.join(run.contrasts)}, {other.run_dir} "
                f"{' <-> '.join(other.contrasts)}.")
    model = fused_name([r for r, _ in members])
    if src.is_dir():
        if dest.exists() and not dest.is_dir():
            raise ConfigError(f"Input {src} is a folder, so --output {dest} must be a folder.")
        pairs = plan_folder(src, dest, d, model)
    else:
        _check_named_contrast(src, d)
        if dest.is_dir():
            dest = dest / (output_name(src, d, model) or src.name)
        pairs = [(src, dest)]
    for s, o in pairs:
        _check_input(s)
        if not s.name.lower().endswith(NIFTI_SUFFIXES):
            if len(members) > 1:
                raise ConfigError(
                    f"{s} is a 2-D image; fusing several runs needs NIfTI volumes. Translate "
                    "2-D images with one --run.")
            _check_2d_allowed(run, s)
        _check_output_suffix(s, o)
        check_can_write(o, overwrite)
        check_writable(o)
        if s.resolve() == o.resolve():
            raise ConfigError(f"Output {o} is the input file; choose another --output.")
    t0 = time.perf_counter()
    slices = 0
    for s, o in pairs:
        if not s.name.lower().endswith(NIFTI_SUFFIXES):
            n = translate_image(s, o, run, d, members[0][1], batch_size=batch_size,
                                device=device)
        else:
            n = translate_volume(s, o, members, d, None, batch_size=batch_size, device=device)
        slices += n
        log(f"{s} -> {o} ({n} slices)")
    return {"files": len(pairs), "slices": slices, "seconds": time.perf_counter() - t0,
            "direction": d.label, "outputs": [o for _, o in pairs]}
