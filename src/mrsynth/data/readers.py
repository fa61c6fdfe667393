"""Finding subjects and their contrast files: BIDS, HCP-style and folders of 2-D images.

A reader turns a directory into a :class:`DatasetIndex`: a list of
:class:`SubjectRecord` (one per subject, or per subject and session), each
naming the file of every contrast it has. Nothing is decoded here, so indexing
is instant; :mod:`mrsynth.data.volumes` and :func:`load_image_2d` read the files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.errors import ConfigError, DataError

LAYOUTS = ("bids", "hcp", "folders")

#: BIDS anatomical suffixes mrsynth knows; any other suffix found is still indexed.
KNOWN_CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "PD")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")

#: HCP minimal-preprocessing outputs (skull-stripped, bias-corrected, AC-PC aligned).
HCP_FILES = {
    "T1w": ("T1w/T1w_acpc_dc_restore_brain.nii.gz", "MNINonLinear/T1w_restore_brain.nii.gz"),
    "T2w": ("T1w/T2w_acpc_dc_restore_brain.nii.gz", "MNINonLinear/T2w_restore_brain.nii.gz"),
}

FOLDER_SPLITS = {"train": "train", "test": "test"}


@dataclass
class SubjectRecord:
    """One subject (or subject+session) and where each of its contrasts lives."""

    id: str
    #: the person: splits keep all records of one participant together.
    participant: str
    #: contrast -> file path (or an in-memory image for the built-in set).
    files: dict[str, Any] = field(default_factory=dict)
    #: "volume" (NIfTI) or "image2d" (PNG/TIFF/NPY from the folders layout).
    kind: str = "volume"
    #: fixed split from the folders layout ("train"/"test"), else None.
    split: str | None = None
    #: the built-in set simulates all contrasts of a subject at once.
    simulate: Callable[[], dict[str, Any]] | None = None
    #: problems found while indexing (duplicate runs, pairing by position, ...).
    notes: list[str] = field(default_factory=list)

    def describe(self, contrast: str) -> str:
        f = self.files.get(contrast)
        return str(f) if isinstance(f, (str, Path)) else f"{self.id} {contrast} (simulated)"


@dataclass
class DatasetIndex:
    source: str
    layout: str
    subjects: list[SubjectRecord]
    notes: list[str] = field(default_factory=list)

    @property
    def contrasts(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.subjects:
            for c in s.files:
                seen.setdefault(c, None)
        known = {c: i for i, c in enumerate(KNOWN_CONTRASTS)}
        return sorted(seen, key=lambda c: (known.get(c, len(known)), c))


# --------------------------------------------------------------------------- detection
def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for sfx in (".nii.gz", ".nii"):
        if name.endswith(sfx):
            return name[: -len(sfx)]
    return None


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root``; raise :class:`DataError` when none fits."""
    if any((root / d).is_dir() for d in ("trainA", "trainB", "testA", "testB")):
        return "folders"
    if (root / "dataset_description.json").is_file() or any(root.glob("sub-*/anat")) or any(
        root.glob("sub-*/ses-*/anat")
    ):
        return "bids"
    for rel in HCP_FILES["T1w"] + HCP_FILES["T2w"]:
        if any(root.glob(f"*/{rel}")):
            return "hcp"
    raise DataError(
        f"Cannot tell the layout of {root}: it has no sub-*/anat folders (BIDS), no "
        "<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz (HCP) and no trainA/trainB/testA/testB "
        "folders. Point mrsynth at the data set's root, or give --layout bids|hcp|folders."
    )


def index_dataset(
    source: str | Path, layout: str | None = None, contrasts: Iterable[str] | None = None
) -> DatasetIndex:
    """Index a data set directory with the given (or detected) layout.

    ``contrasts`` is only needed for the folders layout, whose A/B folders have no
    contrast names: A is ``contrasts[0]`` and B ``contrasts[1]``.
    """
    root = Path(source)
    if not root.exists():
        raise DataError(f"Data set {root} does not exist. Check the path.")
    if not root.is_dir():
        raise DataError(
            f"{root} is a file; `mrsynth data` expects a data set directory (BIDS, HCP-style or "
            "trainA/trainB/testA/testB), or `builtin`."
        )
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    lay = layout or detect_layout(root)
    if lay == "bids":
        idx = read_bids(root)
    elif lay == "hcp":
        idx = read_hcp(root)
    else:
        pair = tuple(contrasts or ("T1w", "T2w"))
        if len(pair) != 2:
            raise ConfigError(
                f"The folders layout holds exactly two contrasts (A and B), but {len(pair)} were "
                "asked for. Pass two with --contrasts A B."
            )
        idx = read_folders(root, pair)
    if not idx.subjects:
        raise DataError(
            f"No subjects found in {root} (layout: {lay}). Expected "
            + {
                "bids": "sub-<label>/[ses-<label>/]anat/sub-<label>_<contrast>.nii[.gz] files",
                "hcp": "<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz files",
                "folders": "PNG/TIFF/NPY images in trainA/, trainB/, testA/, testB/",
            }[lay]
            + ". Check the path and --layout."
        )
    return idx


# --------------------------------------------------------------------------- BIDS
_BIDS_RE = re.compile(r"^(?P<sub>sub-[A-Za-z0-9]+)(?P<ents>(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_"
                      r"(?P<suffix>[A-Za-z0-9]+)$")


def read_bids(root: Path) -> DatasetIndex:
    """``sub-*/[ses-*/]anat/sub-*[_ses-*][_acq-*][_run-*]_<contrast>.nii[.gz]``.

    One record per subject and session. When several files share a contrast
    (acquisitions, runs) the first in sorted order is used and a note says so.
    """
    subjects: list[SubjectRecord] = []
    for sub_dir in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in sub_dir.glob("ses-*") if p.is_dir())
        anat_dirs = [(s.name, s / "anat") for s in sessions] or [(None, sub_dir / "anat")]
        for ses, anat in anat_dirs:
            if not anat.is_dir():
                continue
            found: dict[str, list[Path]] = {}
            for f in sorted(anat.iterdir()):
                stem = _nifti_stem(f)
                if stem is None:
                    continue
                m = _BIDS_RE.match(stem)
                if not m or m.group("sub") != sub_dir.name:
                    continue
                found.setdefault(m.group("suffix"), []).append(f)
            if not found:
                continue
            rid = sub_dir.name if ses is None else f"{sub_dir.name}_{ses}"
            rec = SubjectRecord(id=rid, participant=sub_dir.name)
            for c, files in found.items():
                rec.files[c] = files[0]
                if len(files) > 1:
                    rec.notes.append(
                        f"{len(files)} {c} files ({', '.join(f.name for f in files)}); using "
                        f"{files[0].name}"
                    )
            subjects.append(rec)
    return DatasetIndex(str(root), "bids", subjects)


# --------------------------------------------------------------------------- HCP
def read_hcp(root: Path) -> DatasetIndex:
    """``<subject>/T1w/{T1w,T2w}_acpc_dc_restore_brain.nii.gz`` (native AC-PC space),
    falling back to ``<subject>/MNINonLinear/*_restore_brain.nii.gz``."""
    subjects: list[SubjectRecord] = []
    for sub_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        rec = SubjectRecord(id=sub_dir.name, participant=sub_dir.name)
        for c, candidates in HCP_FILES.items():
            for rel in candidates:
                if (sub_dir / rel).is_file():
                    rec.files[c] = sub_dir / rel
                    break
        if rec.files:
            subjects.append(rec)
    return DatasetIndex(str(root), "hcp", subjects)


# --------------------------------------------------------------------------- folders of 2-D images
_PARTICIPANT_RE = re.compile(r"^(sub-[A-Za-z0-9]+)")


def _images_in(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folders(root: Path, contrasts: tuple[str, str]) -> DatasetIndex:
    """``trainA/ trainB/ testA/ testB/`` of 2-D images, paired by sorted file name.

    Files with the same stem in A and B are a pair. If no stems match but both folders
    hold the same number of files, they are paired by position in *sorted* name order
    (never directory order) and a note says so. Each image is its own record; the
    participant is the ``sub-<label>`` prefix of the name when there is one.
    """
    a_name, b_name = contrasts
    subjects: list[SubjectRecord] = []
    notes: list[str] = []
    for split in ("train", "test"):
        fa, fb = _images_in(root / f"{split}A"), _images_in(root / f"{split}B")
        if not fa and not fb:
            continue
        by_a = {p.stem: p for p in fa}
        by_b = {p.stem: p for p in fb}
        common = sorted(set(by_a) & set(by_b))
        pairs: list[tuple[str, Path | None, Path | None]] = []
        if common or not (fa and fb):
            for stem in sorted(set(by_a) | set(by_b)):
                pairs.append((stem, by_a.get(stem), by_b.get(stem)))
        elif len(fa) == len(fb):
            notes.append(
                f"{split}A and {split}B share no file names; paired by position in sorted name "
                f"order ({fa[0].name} with {fb[0].name}, ...)."
            )
            pairs = [(a.stem, a, b) for a, b in zip(fa, fb, strict=True)]
        else:
            for stem in sorted(set(by_a) | set(by_b)):
                pairs.append((stem, by_a.get(stem), by_b.get(stem)))
            notes.append(
                f"{split}A ({len(fa)} files) and {split}B ({len(fb)} files) share no file names "
                "and differ in number, so no image is paired."
            )
        for stem, pa, pb in pairs:
            m = _PARTICIPANT_RE.match(stem)
            rec = SubjectRecord(
                id=f"{split}/{stem}", participant=m.group(1) if m else f"{split}/{stem}",
                kind="image2d", split=split,
            )
            if pa is not None:
                rec.files[a_name] = pa
            if pb is not None:
                rec.files[b_name] = pb
            subjects.append(rec)
    # a participant found in both folders would leak between the splits
    split_of: dict[str, set[str]] = {}
    for s in subjects:
        split_of.setdefault(s.participant, set()).add(s.split or "")
    leaked = sorted(p for p, sp in split_of.items() if len(sp) > 1)
    if leaked:
        notes.append(
            f"participant(s) {', '.join(leaked[:5])} appear in both train and test folders: "
            "the split leaks subjects."
        )
    return DatasetIndex(str(root), "folders", subjects, notes)


def load_image_2d(path: Path) -> np.ndarray:
    """Read a PNG (8/16-bit), TIFF or NPY image as float32 (X, Y); reject anything else."""
    path = Path(path)
    sfx = path.suffix.lower()
    try:
        if sfx == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif sfx in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGB", "RGBA", "LA", "P", "CMYK", "YCbCr"):
                    im = im.convert("RGBA") if im.mode == "P" else im
                    arr = np.asarray(im)
                    arr = arr[..., :3] if arr.ndim == 3 and arr.shape[-1] >= 3 else arr[..., :1]
                else:
                    arr = np.asarray(im)
    except Exception as exc:
        raise DataError(
            f"Cannot read image {path} ({type(exc).__name__}: {exc}). The file is damaged or not "
            "a PNG/TIFF/NPY image; replace or remove it."
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and sfx != ".npy":
        rgb = arr[..., :3].astype(np.float32)
        grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        if not grey:
            raise DataError(
                f"{path} is a colour image; mrsynth works on grey-scale MR slices. Convert it to "
                "grey-scale (8- or 16-bit PNG, TIFF or NPY) first."
            )
        arr = rgb[..., 0]
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DataError(
            f"{path} has shape {arr.shape}; the folders layout needs one 2-D image per file "
            "(multi-page TIFFs and 3-D arrays are not slices). Use a BIDS or HCP layout for "
            "volumes."
        )
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {arr.dtype} data, not numbers.")
    return arr.astype(np.float32)
