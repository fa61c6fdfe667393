"""The prepared-slice file: what ``mrsynth data prepare`` writes and every trainer reads.

One ``.npz`` file holds, for N axial slices of size H x W:

==========================  ==============  ==============================================
key                         shape / dtype   meaning
==========================  ==============  ==============================================
``format_version``          () int          :data:`FORMAT_VERSION`
``settings``                () str (JSON)   preparation settings (contrasts, size, slice
                                            selection, split, seed, normalisation, source)
``subjects``                () str (JSON)   per subject: source files, original shape,
                                            affine, canonical shape/affine, voxel size
``image__<C>``              (N,H,W) f32     contrast C, normalised (``(x - offset) / scale``)
``available__<C>``          (N,) bool       whether contrast C exists for the slice (unpaired
                                            data); missing images are all -1
``offset__<C>``/``scale__<C>`` (N,) f64     per-volume linear intensity map, repeated per slice
``mask``                    (N,H,W) bool    brain mask
``subject``                 (N,) str        subject id
``slice_index``             (N,) i32        axial index in the canonical (RAS) volume
``crop``                    (N,2) i32       (row0, col0): ``slice[r,c] = canonical[r+row0, c+col0]``
                                            (negative means the slice was padded there)
``split``                   (N,) str        ``train``, ``val`` (validation: kept out of
                                            training, for choices) or ``test``; files
                                            written before ``val`` existed have none
``paired``                  (N,) bool       every requested contrast is available
``checksums``               () str (JSON)   sha256 of every other array's bytes (C order),
                                            checked on load; files written before it
                                            existed have none and still load
==========================  ==============  ==============================================

Why one file: it loads in well under a second and fits in memory, so training
never decodes NIfTI per epoch, and it travels with its own provenance.

Data sets that do not fit in memory are prepared as a *store* instead, a directory
of per-subject shards (:mod:`mrsynth.data.store`). :func:`load_prepared` reads both
(a directory is a store) into the same :class:`PreparedData`; a store's ``images``
and ``mask`` are lazy :class:`~mrsynth.data.store.ShardedArray` views that read only
the slices indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.errors import DataError
from mrsynth.utils import atomic_path, json_default

FORMAT_VERSION = 1

#: Normalised images lie in [-1, 1]; this much float rounding is tolerated beyond it.
IMAGE_RANGE_TOLERANCE = 1e-4

#: Settings that must agree between the data a run was trained on and the
#: data it is evaluated or applied on (intensity model and geometry).
COMPATIBILITY_KEYS = ("size", "normalisation", "orientation", "plane")


@dataclass
class PreparedData:
    """In-memory prepared slices; see the module docstring for the fields."""

    images: dict[str, np.ndarray]
    available: dict[str, np.ndarray]
    offset: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]
    mask: np.ndarray
    subject: np.ndarray
    slice_index: np.ndarray
    crop: np.ndarray
    split: np.ndarray
    paired: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    subjects: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.subject.shape[0])

    @property
    def contrasts(self) -> list[str]:
        return list(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.mask.shape[1]), int(self.mask.shape[2])

    def validate(self) -> None:
        """Check internal consistency; raise :class:`DataError` naming the file.

        The value checks (images in range, masks boolean) read in-memory arrays only: a
        store's lazy arrays were checked shard by shard when it was opened.
        """
        where = f"Prepared file {self.path}" if self.path else "Prepared data"
        n = len(self)
        if n == 0:
            raise DataError(f"{where} holds no slices. Re-run `mrsynth data prepare`.")
        if self.mask.ndim != 3 or self.mask.shape[0] != n:
            raise DataError(f"{where}: mask has shape {self.mask.shape}, expected ({n}, H, W).")
        for c in self.contrasts:
            for name, arr, shape in (
                ("image", self.images[c], self.mask.shape),
                ("available", self.available[c], (n,)),
                ("offset", self.offset[c], (n,)),
                ("scale", self.scale[c], (n,)),
            ):
                if arr.shape != shape:
                    raise DataError(
                        f"{where}: {name} of {c} has shape {arr.shape}, expected {shape}. "
                        "The file is damaged or from another mrsynth version; prepare it again."
                    )
            if isinstance(self.images[c], np.ndarray):
                _check_image_range(self.images[c], f"{where}: image__{c}")
        if isinstance(self.mask, np.ndarray):
            _check_boolean(self.mask, f"{where}: mask")
        for name in ("slice_index", "split", "paired"):
            if getattr(self, name).shape != (n,):
                raise DataError(f"{where}: {name} has the wrong length.")
        if self.crop.shape != (n, 2):
            raise DataError(f"{where}: crop has shape {self.crop.shape}, expected ({n}, 2).")

    def select(self, index: np.ndarray) -> PreparedData:
        """A new PreparedData with the slices picked by a boolean mask or index array."""
        idx = np.asarray(index)
        return PreparedData(
            images={c: v[idx] for c, v in self.images.items()},
            available={c: v[idx] for c, v in self.available.items()},
            offset={c: v[idx] for c, v in self.offset.items()},
            scale={c: v[idx] for c, v in self.scale.items()},
            mask=self.mask[idx],
            subject=self.subject[idx],
            slice_index=self.slice_index[idx],
            crop=self.crop[idx],
            split=self.split[idx],
            paired=self.paired[idx],
            settings=self.settings,
            subjects=self.subjects,
            path=self.path,
        )

    def split_view(self, split: str) -> PreparedData:
        """Slices of one split (``train``, ``val`` or ``test``)."""
        sel = self.split == split
        if not sel.any():
            raise DataError(
                f"{self.path or 'Prepared data'} has no '{split}' slices "
                f"(splits present: {sorted(set(self.split.tolist()))})."
            )
        return self.select(sel)

    def has_split(self, split: str) -> bool:
        """Whether any slice is in ``split`` (older files have no ``val`` slices)."""
        return bool((self.split == split).any())

    def require_contrasts(self, *contrasts: str) -> None:
        missing = [c for c in contrasts if c not in self.images]
        if missing:
            raise DataError(
                f"{self.path or 'Prepared data'} has contrasts {self.contrasts}, not {missing}. "
                f"Prepare it with `--contrasts {' '.join(contrasts)}`."
            )

    def unscale(self, contrast: str, normalised: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Map normalised slices (N,H,W) back to the source volume's intensity units."""
        o = self.offset[contrast][rows][:, None, None]
        s = self.scale[contrast][rows][:, None, None]
        return normalised.astype(np.float64) * s + o

    def compatibility(self) -> dict[str, Any]:
        """The settings a trained run must share with data it is applied to."""
        return {k: self.settings.get(k) for k in COMPATIBILITY_KEYS}

    # ------------------------------------------------------------------ file I/O
    def save(self, path: str | Path, *, compress: bool = False) -> Path:
        """Write atomically to ``path`` (``.npz``).

        Uncompressed by default: the shared data set (a few hundred MB of float32)
        then loads in well under a second; ``compress=True`` trades that for size.
        """
        self.validate()
        arrays: dict[str, Any] = {
            "format_version": np.asarray(FORMAT_VERSION),
            "settings": np.asarray(json.dumps(self.settings, default=json_default)),
            "subjects": np.asarray(json.dumps(self.subjects, default=json_default)),
            "mask": self.mask.astype(bool),
            "subject": self.subject.astype(str),
            "slice_index": self.slice_index.astype(np.int32),
            "crop": self.crop.astype(np.int32),
            "split": self.split.astype(str),
            "paired": self.paired.astype(bool),
        }
        for c in self.contrasts:
            arrays[f"image__{c}"] = self.images[c].astype(np.float32)
            arrays[f"available__{c}"] = self.available[c].astype(bool)
            arrays[f"offset__{c}"] = self.offset[c].astype(np.float64)
            arrays[f"scale__{c}"] = self.scale[c].astype(np.float64)
        arrays["checksums"] = np.asarray(json.dumps(array_checksums(arrays), sort_keys=True))
        dest = Path(path)
        with atomic_path(dest, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)
        return dest


def _check_image_range(arr: np.ndarray, what: str) -> None:
    """Normalised images lie in [-1, 1]: NaN, Inf and finite garbage (8.5e37) are damage."""
    if arr.size == 0:
        return
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates into min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{what} contains NaN or Inf; the file is damaged. Re-run "
                        "`mrsynth data prepare` to write it again.")
    tol = IMAGE_RANGE_TOLERANCE
    if lo < -1 - tol or hi > 1 + tol:
        raise DataError(
            f"{what} has values from {lo:.4g} to {hi:.4g}, but prepared images are normalised "
            "to [-1, 1]; the file is damaged or was not written by `mrsynth data prepare`. "
            "Re-run `mrsynth data prepare` to write it again."
        )


def _check_boolean(arr: np.ndarray, what: str) -> None:
    """A boolean array (stored as bytes) must hold only 0 and 1."""
    if arr.dtype != np.bool_:
        raise DataError(f"{what} has dtype {arr.dtype}, expected bool; the file is damaged. "
                        "Re-run `mrsynth data prepare` to write it again.")
    if arr.size and int(np.ascontiguousarray(arr).view(np.uint8).max()) > 1:
        raise DataError(f"{what} holds bytes other than 0 and 1 (not a boolean mask); the file "
                        "is damaged. Re-run `mrsynth data prepare` to write it again.")


def sha256_array(arr: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (the convention of every checksum we store)."""
    a = np.ascontiguousarray(arr)
    return hashlib.sha256(memoryview(a).cast("B") if a.size else b"").hexdigest()


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of each array's bytes in C order (the ``checksums`` member; itself excluded).

    Hashed in threads (hashlib releases the GIL): about 0.1 s per 100 MB per core.
    """
    names = sorted(k for k in arrays if k != "checksums")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda k: sha256_array(np.asarray(arrays[k])), names))
    return dict(zip(names, digests, strict=True))


def _verify_checksums(files: dict[str, np.ndarray], p: Path) -> None:
    """Compare every array with the checksum stored at write time (files without one pass)."""
    if "checksums" not in files:
        return
    try:
        stored = json.loads(str(files["checksums"]))
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise DataError(f"{p}: the checksums field is unreadable ({exc}); the file is damaged. "
                        "Re-run `mrsynth data prepare` to write it again.") from exc
    missing = sorted(set(stored) - set(files))
    if missing:
        raise DataError(f"{p} lacks the array(s) {', '.join(missing)} its checksums list; the "
                        "file is damaged. Re-run `mrsynth data prepare` to write it again.")
    now = array_checksums({k: files[k] for k in stored})
    bad = sorted(k for k in stored if now[k] != stored[k])
    if bad:
        raise DataError(
            f"{p}: the array(s) {', '.join(bad)} do not match the sha256 checksum stored when "
            "the file was written; the file was changed or damaged since. Re-run "
            "`mrsynth data prepare` to write it again."
        )


def _read_stored_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Read an uncompressed ``.npz`` with one ``np.fromfile`` per member.

    Same arrays as ``np.load``, 2-3x faster for the few hundred MB of a prepared data
    set (no chunked copies, no CRC pass). Returns None when a member is compressed.
    """
    from numpy.lib import format as npf

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        infos = zf.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            return None
        for info in infos:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"bad zip member header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = npf.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npf.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = npf.read_array_header_2_0(fh)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            count = int(np.prod(shape)) if shape else 1
            arr = np.fromfile(fh, dtype=dtype, count=count)
            if arr.size != count:
                raise ValueError(f"member {info.filename} is truncated")
            arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            out[key] = arr
    return out


def load_prepared(path: str | Path, *, verify: bool | None = None) -> PreparedData:
    """Read and validate a prepared file or store; every problem is a :class:`DataError`.

    A directory is a store, opened lazily (``verify``: see
    :func:`mrsynth.data.store.open_store`); a ``.npz`` is read whole and always verified.
    """
    p = Path(path)
    if p.is_dir():
        from mrsynth.data.store import open_store

        data = open_store(p, verify=verify)
        data.validate()
        return data
    if not p.is_file():
        raise DataError(
            f"Prepared data {p} does not exist. Create it with `mrsynth data prepare DATA "
            "--out DIR` (a store) or `--out FILE.npz` (or `mrsynth data prepare builtin`)."
        )
    try:
        files = _read_stored_npz(p)
        if files is None:  # compressed members: let numpy inflate them
            with np.load(p, allow_pickle=False) as z:
                files = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as exc:
        raise DataError(
            f"Cannot read prepared data file {p}: {exc}. It is not an mrsynth prepared file "
            "or it is truncated; prepare it again."
        ) from exc
    if "format_version" not in files:
        raise DataError(f"{p} is not an mrsynth prepared file (no format_version field).")
    version = int(files["format_version"])
    if version != FORMAT_VERSION:
        raise DataError(
            f"{p} has prepared-file format {version}; this mrsynth reads format "
            f"{FORMAT_VERSION}. Prepare the data again with this version."
        )
    _verify_checksums(files, p)
    try:
        contrasts = [k.split("__", 1)[1] for k in files if k.startswith("image__")]
        data = PreparedData(
            images={c: files[f"image__{c}"] for c in contrasts},
            available={c: files[f"available__{c}"] for c in contrasts},
            offset={c: files[f"offset__{c}"] for c in contrasts},
            scale={c: files[f"scale__{c}"] for c in contrasts},
            mask=files["mask"],
            subject=files["subject"],
            slice_index=files["slice_index"],
            crop=files["crop"],
            split=files["split"],
            paired=files["paired"],
            settings=json.loads(str(files["settings"])),
            subjects=json.loads(str(files["subjects"])),
            path=p,
        )
    except KeyError as exc:
        raise DataError(f"{p} lacks the field {exc}; it is damaged, prepare it again.") from exc
    data.validate()
    return data
