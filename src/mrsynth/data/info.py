"""``mrsynth data info``: what is in a data set, and what is wrong with it.

Unlike ``prepare``, which skips a subject at its first bad file (or stops there with
``--strict``), ``info`` reads every volume, records each problem next to the file it
concerns and carries on, so one run lists everything a user has to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.data.readers import DatasetIndex, SubjectRecord, index_dataset, load_image_2d
from mrsynth.data.slicing import DEFAULT_SLICES, SliceSpec
from mrsynth.data.volumes import (
    NIFTI_SUFFIXES,
    Volume,
    brain_mask,
    check_data,
    grid_difference,
    load_volume,
    orientation,
    same_grid,
    voxel_size,
)
from mrsynth.errors import DataError


@dataclass
class ContrastInfo:
    subject: str
    contrast: str
    file: str
    shape: list[int] | None = None
    voxel_size: list[float] | None = None
    dtype: str | None = None
    orientation: str | None = None
    min: float | None = None
    max: float | None = None
    negative_voxels: int | None = None
    problem: str | None = None


@dataclass
class SubjectInfo:
    id: str
    participant: str
    split: str | None
    contrasts: list[ContrastInfo] = field(default_factory=list)
    brain_slices: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.problem is None for c in self.contrasts)


@dataclass
class DatasetInfo:
    source: str
    layout: str
    contrasts: list[str]
    subjects: list[SubjectInfo]
    notes: list[str]

    @property
    def n_problems(self) -> int:
        return sum(len(s.problems) + sum(c.problem is not None for c in s.contrasts)
                   for s in self.subjects)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"n_problems": self.n_problems}


def _first_line(exc: Exception) -> str:
    return str(exc).strip()


def _inspect_record(rec: SubjectRecord, all_contrasts: list[str],
                    wanted: list[str] | None) -> SubjectInfo:
    info = SubjectInfo(id=rec.id, participant=rec.participant, split=rec.split,
                       notes=list(rec.notes))
    vols: dict[str, Volume] = {}
    arrays: dict[str, np.ndarray] = {}
    images: dict[str, Any] = {}
    if rec.simulate is not None:
        images = rec.simulate()
    for c in all_contrasts:
        if c not in rec.files:
            continue
        ci = ContrastInfo(subject=rec.id, contrast=c, file=rec.describe(c))
        info.contrasts.append(ci)
        try:
            if rec.kind == "image2d":
                arr = load_image_2d(rec.files[c])
                ci.shape, ci.voxel_size, ci.orientation = list(arr.shape), None, None
                ci.dtype = _image_dtype(Path(rec.files[c]))
                ci.min, ci.max = float(np.min(arr)), float(np.max(arr))
                ci.negative_voxels = int(np.count_nonzero(arr < 0))
                check_data(arr, str(rec.files[c]))
                arrays[c] = arr
            else:
                vol = load_volume(images[c] if images else rec.files[c])
                ci.shape = [int(s) for s in vol.original.shape]
                ci.voxel_size = [round(v, 4) for v in voxel_size(vol.original)]
                ci.dtype = str(vol.original.get_data_dtype())
                ci.orientation = orientation(vol.original)
                ci.min, ci.max = float(vol.data.min()), float(vol.data.max())
                ci.negative_voxels = int(np.count_nonzero(vol.data < 0))
                vols[c] = vol
        except DataError as exc:
            ci.problem = _first_line(exc)
            # still report what the header says
            if ci.shape is None and rec.kind != "image2d" and not images:
                try:
                    import nibabel as nib

                    img = nib.load(rec.files[c])
                    ci.shape = [int(s) for s in img.shape]
                    ci.voxel_size = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
                    ci.dtype = str(img.get_data_dtype())
                    ci.orientation = "".join(nib.aff2axcodes(img.affine))
                except Exception:  # noqa: BLE001 - the header itself is unreadable
                    pass
    for c in wanted or []:
        if c not in rec.files:
            info.problems.append(f"no {c}")
    missing_other = [c for c in all_contrasts if c not in rec.files and c not in (wanted or [])]
    if missing_other:
        info.notes.append(f"no {', '.join(missing_other)}")
    names = list(vols)
    for c in names[1:]:
        if not same_grid(vols[c].canonical, vols[names[0]].canonical):
            info.problems.append(
                f"{c} and {names[0]} are on different grids "
                f"({grid_difference(vols[c].canonical, vols[names[0]].canonical)}); "
                "prepare needs --resample"
            )
    names2d = list(arrays)
    for c in names2d[1:]:
        if arrays[c].shape != arrays[names2d[0]].shape:
            info.problems.append(f"{c} and {names2d[0]} differ in size; prepare needs --resample")
    if vols:
        first = vols[names[0]]
        try:
            mask = brain_mask(first.data)
            info.brain_slices = int(SliceSpec.parse(DEFAULT_SLICES).select(mask).size)
        except DataError as exc:  # pragma: no cover - masks do not raise today
            info.problems.append(_first_line(exc))
    return info


def _image_dtype(path: Path) -> str:
    sfx = path.suffix.lower()
    try:
        if sfx == ".npy":
            return str(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
        if sfx in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                return str(tf.pages[0].dtype)
        from PIL import Image

        with Image.open(path) as im:
            return {"L": "uint8", "I;16": "uint16", "I;16B": "uint16", "I": "int32",
                    "F": "float32"}.get(im.mode, im.mode)
    except Exception:  # noqa: BLE001 - dtype is informative only
        return "?"


def inspect_dataset(
    source: str | Path, *, layout: str | None = None, contrasts: list[str] | None = None,
    n_subjects: int | None = None, seed: int = 0, resolution: float | None = None,
) -> DatasetInfo:
    """Read every volume of a data set (or the builtin set) and collect facts and problems."""
    if str(source) == "builtin":
        from mrsynth.data import builtin

        idx, _ = builtin.index(n_subjects=n_subjects, seed=seed,
                               contrasts=contrasts or list(builtin.SEQUENCES),
                               resolution=resolution)
    elif Path(source).is_file() and str(source).endswith(NIFTI_SUFFIXES):
        idx = _single_file_index(Path(source))
    else:
        idx = index_dataset(source, layout, contrasts)
    return _inspect_index(idx, contrasts)


def _single_file_index(path: Path) -> DatasetIndex:
    """One NIfTI file: a one-subject index (contrast from a BIDS-like suffix, else 'volume')."""
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    parts = stem.rsplit("_", 1)
    contrast = parts[1] if len(parts) == 2 and parts[1] else "volume"
    sid = parts[0] if len(parts) == 2 else stem
    rec = SubjectRecord(id=sid, participant=sid, files={contrast: path})
    return DatasetIndex(str(path), "file", [rec])


def _inspect_index(idx: DatasetIndex, wanted: list[str] | None) -> DatasetInfo:
    all_contrasts = idx.contrasts
    subjects = [_inspect_record(rec, all_contrasts, wanted) for rec in idx.subjects]
    return DatasetInfo(source=idx.source, layout=idx.layout, contrasts=all_contrasts,
                       subjects=subjects, notes=list(idx.notes))
