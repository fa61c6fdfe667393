"""Finding and reading the images a study samples from.

A source is a prepared ``.npz`` file (its ``test`` split) or a directory searched
recursively for NPY, NIfTI, PNG and TIFF files. File names follow the rule of
:mod:`mrsynth.data.naming`, which ``evaluate`` writes with: the contrast is the
last ``_`` entity (``sim-007_slice-037_T2w.npy``, ``sub-ms19_desc-cyclegan_T2w.nii.gz``),
the slice the ``slice-`` entity, the subject the ``sub-`` entity or the bare id
before ``slice-``, compared without ``sub-``. NIfTI volumes contribute each axial slice
that holds a reasonable amount of brain. The (subject, slice, contrast) key is what
lets sampling keep a reader from seeing both versions of one slice.

Orientation: arrays (prepared files, NPY, NIfTI) are in the canonical RAS layout
``[x, y]`` used by ``mrsynth data prepare`` and are turned a quarter turn so that
anterior is up; PNG/TIFF pictures are shown as stored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrsynth.data.naming import parse_slice_name, subject_label
from mrsynth.errors import DataError

#: File endings a directory source may hold, mapped to a format name.
FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".npy": "npy",
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
}
#: Formats stored as arrays in the RAS [x, y] layout (shown after a quarter turn).
ARRAY_FORMATS = ("prepared", "npy", "nifti")

#: A NIfTI slice is a candidate when its foreground area is at least this
#: fraction of the volume's largest slice (skips the nearly empty top and bottom).
MIN_BRAIN_FRACTION = 0.25

@dataclass(frozen=True)
class ImageRef:
    """One 2-D image a study may show, with its truth; pixels are read on demand."""

    kind: str  # "real" or "synthetic"
    model: str | None
    contrast: str
    subject: str | None
    slice: int | None
    path: Path
    index: int | None  # axial slice (NIfTI) or row (prepared file); None for 2-D files
    fmt: str

    @property
    def key(self) -> tuple[str, int, str] | None:
        """(subject, slice, contrast) when the name says both, else None (no check possible)."""
        if self.subject is None or self.slice is None:
            return None
        return (self.subject, self.slice, self.contrast)

    @property
    def source(self) -> str:
        if self.fmt == "prepared":
            return f"{self.path}#row={self.index}"
        if self.fmt == "nifti" and self.index is not None:
            return f"{self.path}#slice={self.index}"
        return str(self.path)


def split_extension(name: str) -> tuple[str, str | None]:
    """(stem, format) for a supported file name; format None when unsupported."""
    low = name.lower()
    for ext, fmt in FORMATS.items():
        if low.endswith(ext):
            return name[: -len(ext)], fmt
    return name, None


def parse_name(name: str) -> tuple[str | None, int | None, str]:
    """(subject, slice, contrast) from a file name (extension included or not)."""
    stem, _ = split_extension(Path(name).name)
    return tuple(parse_slice_name(stem))  # type: ignore[return-value]


# --------------------------------------------------------------------------- scanning
def scan_source(
    path: str | Path, kind: str, model: str | None, contrasts: Iterable[str] | None
) -> list[ImageRef]:
    """All candidate images of one ``--real`` or ``--synthetic`` source."""
    p = Path(path)
    wanted = set(contrasts) if contrasts is not None else None
    from mrsynth.data.store import is_store

    if (p.is_file() and p.name.lower().endswith(".npz")) or is_store(p):
        return _scan_prepared(p, kind, model, wanted)
    if p.is_dir():
        return _scan_directory(p, kind, model, wanted)
    what = "--real" if kind == "real" else f"--synthetic {model}="
    if not p.exists():
        raise DataError(
            f"{what} source {p} does not exist. Pass a directory of images or a prepared .npz file."
        )
    raise DataError(
        f"{what} source {p} is neither a directory nor a prepared .npz file. Pass a directory "
        "of NPY/NIfTI/PNG/TIFF images named <subject>_slice-<k>_<contrast>.<ext>, or the "
        ".npz file written by `mrsynth data prepare`."
    )


def _scan_prepared(
    p: Path, kind: str, model: str | None, wanted: set[str] | None
) -> list[ImageRef]:
    from mrsynth.data.prepared import load_prepared

    data = load_prepared(p)
    rows = np.flatnonzero(data.split == "test")
    if rows.size == 0:
        raise DataError(
            f"Prepared file {p} has no 'test' slices; a study shows held-out images. "
            "Prepare it with test subjects."
        )
    refs = []
    for c in data.contrasts:
        if wanted is not None and c not in wanted:
            continue
        for r in rows:
            if not bool(data.available[c][r]):
                continue
            refs.append(
                ImageRef(
                    kind=kind,
                    model=model,
                    contrast=c,
                    subject=subject_label(str(data.subject[r])),
                    slice=int(data.slice_index[r]),
                    path=p,
                    index=int(r),
                    fmt="prepared",
                )
            )
    return refs


def _scan_directory(
    root: Path, kind: str, model: str | None, wanted: set[str] | None
) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        _, fmt = split_extension(f.name)
        if fmt is None:
            continue
        subject, slice_, contrast = parse_name(f.name)
        if wanted is not None and contrast not in wanted:
            continue
        if fmt == "nifti":
            refs.extend(_nifti_refs(f, kind, model, subject, slice_, contrast))
        else:
            refs.append(ImageRef(kind, model, contrast, subject, slice_, f, None, fmt))
    return refs


def _load_nifti(f: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(f))
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(f"Cannot read NIfTI file {f}: {exc}. Replace or remove the file.") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise DataError(
            f"NIfTI file {f} has shape {data.shape}; a study needs 2-D slices or 3-D volumes. "
            "Split 4-D series into volumes first."
        )
    return data


def brain_slices(volume: np.ndarray) -> list[int]:
    """Axial slices of a 3-D volume whose foreground area is a fair share of the largest."""
    v = np.nan_to_num(volume.astype(np.float32, copy=False))
    lo = float(v.min())
    hi = float(np.percentile(v, 99.5))
    if hi <= lo:
        return []
    fg = (v > lo + 0.02 * (hi - lo)).sum(axis=(0, 1))
    if fg.max() == 0:
        return []
    return [int(k) for k in np.flatnonzero(fg >= MIN_BRAIN_FRACTION * fg.max())]


def _nifti_refs(
    f: Path, kind: str, model: str | None, subject: str | None, slice_: int | None, contrast: str
) -> list[ImageRef]:
    data = _load_nifti(f)
    if data.ndim == 2 or data.shape[2] == 1:
        return [ImageRef(kind, model, contrast, subject, slice_, f, None, "nifti")]
    return [ImageRef(kind, model, contrast, subject, k, f, k, "nifti") for k in brain_slices(data)]


# --------------------------------------------------------------------------- reading pixels
def load_pixels(refs: Iterable[ImageRef]) -> dict[ImageRef, np.ndarray]:
    """2-D float64 arrays for the given refs, reading each file once."""
    by_file: dict[Path, list[ImageRef]] = defaultdict(list)
    for r in refs:
        by_file[r.path].append(r)
    out: dict[ImageRef, np.ndarray] = {}
    for path, group in by_file.items():
        fmt = group[0].fmt
        if fmt == "prepared":
            from mrsynth.data.prepared import load_prepared

            data = load_prepared(path)
            for r in group:
                out[r] = data.images[r.contrast][r.index].astype(np.float64)
        elif fmt == "nifti":
            vol = _load_nifti(path)
            for r in group:
                arr = vol if vol.ndim == 2 else vol[:, :, r.index if r.index is not None else 0]
                out[r] = np.asarray(arr, dtype=np.float64)
        else:
            arr = _read_2d(path, fmt)
            for r in group:
                out[r] = arr
    return out


def load_masks(
    refs: Iterable[ImageRef], pixels: dict[ImageRef, np.ndarray]
) -> dict[ImageRef, np.ndarray]:
    """Head masks of real images: a prepared file's stored mask, else ``brain_mask`` of the
    pixels (the exact background of skull-stripped data, or Otsu's threshold)."""
    from mrsynth.data.volumes import brain_mask

    out: dict[ImageRef, np.ndarray] = {}
    prepared: dict[Path, np.ndarray] = {}
    for r in refs:
        if r.fmt == "prepared":
            if r.path not in prepared:
                from mrsynth.data.prepared import load_prepared

                prepared[r.path] = load_prepared(r.path).mask
            out[r] = np.asarray(prepared[r.path][r.index], dtype=bool)
        else:
            out[r] = brain_mask(pixels[r])
    return out


def _read_2d(path: Path, fmt: str) -> np.ndarray:
    try:
        if fmt == "npy":
            arr = np.load(path, allow_pickle=False)
        elif fmt == "tiff":
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
                    im = im.convert("L")
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Cannot read image {path}: {exc}. Replace or remove the file.") from exc
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise DataError(
            f"Image {path} has shape {arr.shape}; a study shows 2-D slices. Write one slice "
            "per file (or give a NIfTI volume, whose axial slices are used)."
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"Image {path} has non-numeric dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).any():
        raise DataError(f"Image {path} holds no finite values.")
    return arr
