"""The prepared-slice *store*: a directory that need not fit in memory.

``mrsynth data prepare --out DIR`` writes it subject by subject (see
:mod:`mrsynth.data.prepare_parallel`); :func:`open_store` reads it as a
:class:`~mrsynth.data.prepared.PreparedData` whose images and mask are lazy
:class:`ShardedArray` views, so training, evaluation, translation and the study
read it like the single-file ``.npz``. Layout::

    DIR/store.json                  the index (written last: a store without it is
                                    unfinished and is not read)
    DIR/plan.json                   options, subjects and split fixed at the first start
    DIR/shards/<key>/image__<C>.npy (n, H, W) float16 (or float32) normalised images
    DIR/shards/<key>/mask.npy       (n, H, W) bool brain mask
    DIR/shards/<key>/meta.json      the subject's provenance, per-slice scalars and the
                                    sha256 of each array; written last, so it marks the
                                    shard done (the shard directory is renamed into place)
    DIR/failed/<key>.json           a subject that could not be prepared, and why

One shard per subject (or per 2-D image of the folders layout): each slice is a
contiguous block of one ``.npy`` file, read through ``numpy.load(mmap_mode="r")``.
Why this format and float16: ``docs/data.md`` ("The store") and
``benchmarks/store_formats.py`` -- fastest random slice reads of the candidates
(about 2x HDF5, 100x Zarr with its default codec) and no dependency; float16 changes
normalised intensities by at most 2.4e-4 and the z-scored MAE by < 4e-5.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mrsynth.data.prepared import sha256_array
from mrsynth.errors import DataError
from mrsynth.utils import json_default

if TYPE_CHECKING:
    from mrsynth.data.prepared import PreparedData

STORE_FORMAT = "mrsynth-store"
STORE_VERSION = 1
INDEX_NAME = "store.json"
PLAN_NAME = "plan.json"
SHARDS = "shards"
FAILED = "failed"
META_NAME = "meta.json"
IMAGE_DTYPES = ("float16", "float32")
DEFAULT_IMAGE_DTYPE = "float16"

#: Stores up to this many bytes are hashed in full when opened (like the ``.npz``);
#: larger ones only have their files' presence and sizes checked (``data info`` hashes all).
VERIFY_ON_OPEN_BYTES = 2 * 1024**3

#: Memory maps kept open per array: a process may hold at most ``vm.max_map_count``
#: (65,530 by default on Linux) maps, fewer than the shards of a 40,000-subject store.
OPEN_SHARDS = 256

_REPAIR = "Re-run `mrsynth data prepare` (with the same options it resumes) or prepare it again."


# ----------------------------------------------------------------------------- helpers
def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a store directory (finished or not)."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX_NAME).is_file() or (p / PLAN_NAME).is_file())


def shard_key(record_id: str) -> str:
    """File-system-safe, collision-free directory name of a subject's shard."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._")[:80] or "subject"
    return f"{safe}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename) that never leaves half a file."""
    from mrsynth.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=json_default))


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {what} {path}: {exc}. The store is damaged; "
                        f"{_REPAIR}") from exc


def _tmp_name(key: str) -> str:
    return f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"


def clean_stale_tmp(root: Path, *, everything: bool = False) -> None:
    """Remove shard directories left half-written by a killed process of this host.

    Other hosts' temporaries (a shared file system) are left alone unless ``everything``
    (at finalisation, when every shard is done and nobody is writing).
    """
    shards = root / SHARDS
    if not shards.is_dir():
        return
    host = socket.gethostname()
    for p in shards.glob(".tmp-*"):
        parts = p.name.rsplit("-", 2)
        mine = len(parts) == 3 and parts[1] == host and parts[2].isdigit()
        alive = mine and _pid_alive(int(parts[2]))
        if everything or (mine and not alive):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- writing
def write_shard(root: Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict:
    """Write one subject's arrays and meta atomically as ``root/shards/key``.

    The arrays go into a temporary directory with the meta (sha256 of each array) last,
    then the directory is renamed into place: a shard is either complete or absent. If
    another process finished the same shard first, its copy is kept. Returns the meta.
    """
    shards = root / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    tmp = shards / _tmp_name(key)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = dict(meta)
    meta["checksums"] = {}
    meta["shapes"] = {}
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        meta["checksums"][name] = sha256_array(arr)
        meta["shapes"][name] = [int(s) for s in arr.shape]
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True,
                                            default=json_default))
    final = shards / key
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / META_NAME).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # done by another process meanwhile
    return meta


def shard_meta(root: Path, key: str) -> dict | None:
    """A done shard's meta, or None when the subject has not been prepared yet."""
    p = root / SHARDS / key / META_NAME
    if not p.is_file():
        return None
    return read_json(p, "shard meta")


def write_index(root: Path, index: dict[str, Any]) -> None:
    """Write ``store.json`` (with a sha256 of its own content) atomically."""
    body = dict(index)
    body.pop("index_sha256", None)
    body["index_sha256"] = _index_digest(body)
    write_json(root / INDEX_NAME, body)


def _index_digest(body: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in body.items() if k != "index_sha256"}, sort_keys=True,
                      default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def make_index(*, settings: dict[str, Any], subjects: dict[str, Any], contrasts: list[str],
               size: tuple[int, int], image_dtype: str, shards: list[dict[str, Any]]) -> dict:
    """The index: settings, provenance and one entry per non-empty shard, in slice order.

    Each shard entry: ``key``, ``subject``, ``split``, ``n_slices``, ``slice_index``,
    ``crop``, ``available``/``offset``/``scale`` per contrast and ``checksums``.
    """
    return {
        "format": STORE_FORMAT, "format_version": STORE_VERSION,
        "contrasts": list(contrasts), "size": [int(size[0]), int(size[1])],
        "image_dtype": image_dtype, "n_slices": int(sum(s["n_slices"] for s in shards)),
        "settings": settings, "subjects": subjects, "shards": shards,
    }


# ----------------------------------------------------------------------------- reading
class ShardedArray:
    """Read-only ``(N, H, W)`` array over per-subject ``.npy`` shards, read lazily.

    Indexing (an int, a slice, an index or boolean array, optionally followed by more
    axes) reads only the slices asked for, through memory maps opened on first use and
    kept for the :data:`OPEN_SHARDS` most recent shards, and returns an in-memory numpy
    array of :attr:`dtype` (float16 images are read as float32). Anything else numpy
    can do with it (``np.asarray``, ``.reshape``, ``.sum``...) reads the whole array.
    """

    def __init__(self, files: list[Path], lengths: list[int], tail: tuple[int, ...],
                 dtype: np.dtype | str, what: str) -> None:
        self.files = list(files)
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.shape = (int(self.starts[-1]), *(int(t) for t in tail))
        self.dtype = np.dtype(dtype)
        self.what = what
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    # numpy-like attributes
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"ShardedArray({self.what}, shape={self.shape}, dtype={self.dtype}, "
                f"{len(self.files)} shards)")

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: no maps
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def shard(self, i: int) -> np.ndarray:
        """The memory-mapped array of shard ``i``."""
        mm = self._open.get(i)
        if mm is not None:
            self._open.move_to_end(i)
            return mm
        try:
            mm = np.load(self.files[i], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"Cannot read {self.files[i]} ({self.what}): {exc}. {_REPAIR}") from exc
        want = int(self.starts[i + 1] - self.starts[i])
        if mm.shape != (want, *self.shape[1:]):
            raise DataError(f"{self.files[i]} ({self.what}) has shape {mm.shape}, the index says "
                            f"{(want, *self.shape[1:])}; the store is damaged. {_REPAIR}")
        self._open[i] = mm
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return mm

    def _rows(self, key: Any) -> np.ndarray | int:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for {self.what} of length {n}")
            return k % n
        if isinstance(key, slice):
            return np.arange(*key.indices(n))
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {self.what} of "
                                 f"length {n}")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"{self.what}: only integers, slices and integer or boolean "
                             f"arrays are valid indices, not {idx.dtype}")
        if idx.size and (idx.max() >= n or idx.min() < -n):
            raise IndexError(f"index out of bounds for {self.what} of length {n}")
        return idx % n if idx.size else idx.astype(np.int64)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = (key[0] if key else slice(None)), key[1:]
        if key is Ellipsis:
            key = slice(None)
        rows = self._rows(key)
        if isinstance(rows, int):
            s = int(np.searchsorted(self.starts, rows, side="right") - 1)
            out = np.array(self.shard(s)[rows - self.starts[s]], dtype=self.dtype)
            return out[rest] if rest else out
        flat = rows.reshape(-1)
        out = np.empty((flat.size, *self.shape[1:]), self.dtype)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = flat[sel] - self.starts[s]
            mm = self.shard(int(s))
            if local.size == mm.shape[0] and np.array_equal(local, np.arange(local.size)):
                out[sel] = mm  # the whole shard: one sequential read
            else:
                out[sel] = mm[local]
        out = out.reshape(*rows.shape, *self.shape[1:])
        return out[(slice(None),) * rows.ndim + rest] if rest else out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.shape[0]):
            yield self[i]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return self[:].astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("files", "starts", "shape", "dtype", "what"):
            raise AttributeError(name)
        return getattr(self[:], name)  # numpy methods (reshape, sum, min...): whole array


def _entries_files(root: Path, shards: list[dict], name: str) -> list[Path]:
    return [root / SHARDS / s["key"] / f"{name}.npy" for s in shards]


def read_index(root: Path) -> dict[str, Any]:
    """The checked index of a finished store."""
    p = root / INDEX_NAME
    if not p.is_file():
        if (root / PLAN_NAME).is_file():
            raise DataError(
                f"Store {root} is unfinished ({progress_text(root)}): its preparation was "
                "interrupted or other "
                f"--shard parts have not run yet (no {INDEX_NAME}). Re-run the same `mrsynth "
                "data prepare` command to continue, or `mrsynth data prepare --finalize` once "
                "every part has run."
            )
        raw = (root / "dataset_description.json").is_file() or any(root.glob("sub-*"))
        hint = (" It looks like a raw data set: prepare it first with `mrsynth data prepare "
                f"{root} --out PREPARED`, then pass PREPARED." if raw else "")
        raise DataError(f"{root} is not an mrsynth prepared store (no {INDEX_NAME}).{hint}")
    index = read_json(p, "store index")
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        raise DataError(f"{p} is not an mrsynth store index (format {STORE_FORMAT!r}).")
    if index.get("format_version") != STORE_VERSION:
        raise DataError(f"Store {root} has format {index.get('format_version')}; this mrsynth "
                        f"reads format {STORE_VERSION}. Prepare the data again.")
    if index.get("index_sha256") != _index_digest(index):
        raise DataError(f"{p} does not match the sha256 stored in it; the index was changed "
                        f"or damaged. {_REPAIR}")
    return index


def progress_text(root: Path) -> str:
    """'12 of 40 subjects done, 1 failed' for an unfinished store."""
    try:
        keys = [r["key"] for r in json.loads((root / PLAN_NAME).read_text())["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        return "its plan is unreadable"
    done = sum((root / SHARDS / k / META_NAME).is_file() for k in keys)
    failed = sum((root / FAILED / f"{k}.json").is_file() for k in keys)
    return f"{done} of {len(keys)} subjects done" + (f", {failed} failed" if failed else "")


def verify_store(root: str | os.PathLike[str], *, full: bool = True,
                 index: dict[str, Any] | None = None) -> int:
    """Check every shard: files present with the right size, and (``full``) their sha256,
    images finite and in [-1, 1], masks true booleans. Returns the bytes checked.

    Raises :class:`DataError` naming the shard file and the problem.
    """
    from mrsynth.data.prepared import _check_boolean, _check_image_range

    root = Path(root)
    index = read_index(root) if index is None else index
    h, w = index["size"]
    names = {f"image__{c}": np.dtype(index["image_dtype"]) for c in index["contrasts"]}
    names["mask"] = np.dtype(bool)
    total = 0
    for s in index["shards"]:
        for name, dt in names.items():
            f = root / SHARDS / s["key"] / f"{name}.npy"
            data_bytes = s["n_slices"] * h * w * dt.itemsize
            expect = data_bytes + len(_npy_header((s["n_slices"], h, w), dt))
            try:
                size = f.stat().st_size
            except OSError as exc:
                raise DataError(f"Store {root}: shard file {f} is missing ({exc.strerror}). "
                                f"{_REPAIR}") from exc
            if size != expect:
                raise DataError(f"Store {root}: {f} has {size} bytes, expected {expect} "
                                f"({s['n_slices']} slices); it is truncated or damaged. "
                                f"{_REPAIR}")
            total += size
            if not full:
                continue
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"Cannot read {f}: {exc}. {_REPAIR}") from exc
            if sha256_array(arr) != s["checksums"].get(name):
                raise DataError(f"{f} does not match the sha256 checksum stored when it was "
                                f"written; it was changed or damaged since. {_REPAIR}")
            if name == "mask":
                _check_boolean(np.asarray(arr), f"{f}")
            else:
                _check_image_range(np.asarray(arr), f"{f}")
    return total


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def open_store(path: str | os.PathLike[str], *, verify: bool | None = None) -> PreparedData:
    """Open a finished store as a lazy :class:`~mrsynth.data.prepared.PreparedData`.

    ``verify``: True hashes every shard, False only checks the files' presence and
    sizes, None (default) hashes when the store holds at most :data:`VERIFY_ON_OPEN_BYTES`.
    """
    from mrsynth.data.prepared import PreparedData

    root = Path(path)
    index = read_index(root)
    full = verify if verify is not None else _data_bytes(index) <= VERIFY_ON_OPEN_BYTES
    verify_store(root, full=full, index=index)
    shards = index["shards"]
    if not shards:
        raise DataError(f"Store {root} holds no slices. Re-run `mrsynth data prepare`.")
    cs = index["contrasts"]
    h, w = index["size"]
    n_per = [int(s["n_slices"]) for s in shards]
    lengths = n_per
    images = {c: ShardedArray(_entries_files(root, shards, f"image__{c}"), lengths, (h, w),
                              np.float32, f"image__{c} of {root}") for c in cs}
    mask = ShardedArray(_entries_files(root, shards, "mask"), lengths, (h, w), bool,
                        f"mask of {root}")
    available = {c: np.repeat([bool(s["available"][c]) for s in shards], n_per) for c in cs}
    data = PreparedData(
        images=images,  # type: ignore[arg-type]
        available=available,
        offset={c: np.repeat([float(s["offset"][c]) for s in shards], n_per) for c in cs},
        scale={c: np.repeat([float(s["scale"][c]) for s in shards], n_per) for c in cs},
        mask=mask,  # type: ignore[arg-type]
        subject=np.repeat([s["subject"] for s in shards], n_per),
        slice_index=np.concatenate([np.asarray(s["slice_index"], np.int32) for s in shards]),
        crop=np.repeat(np.asarray([s["crop"] for s in shards], np.int32), n_per, axis=0),
        split=np.repeat([s["split"] for s in shards], n_per),
        paired=np.repeat([all(s["available"][c] for c in cs) for s in shards], n_per),
        settings=index["settings"],
        subjects=index["subjects"],
        path=root,
    )
    return data


def _data_bytes(index: dict[str, Any]) -> int:
    h, w = index["size"]
    per = h * w * (np.dtype(index["image_dtype"]).itemsize * len(index["contrasts"]) + 1)
    return int(index["n_slices"]) * per


# ----------------------------------------------------------------------------- conversion
def subject_runs(subject: np.ndarray) -> list[tuple[str, int, int]]:
    """Consecutive runs ``(subject, start, stop)`` of one subject in slice order."""
    n = len(subject)
    if n == 0:
        return []
    change = np.flatnonzero(subject[1:] != subject[:-1]) + 1
    bounds = [0, *change.tolist(), n]
    return [(str(subject[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write_store_from(data: Any, out: str | os.PathLike[str], *,
                     image_dtype: str = DEFAULT_IMAGE_DTYPE) -> Path:
    """Write an in-memory (or lazy) :class:`PreparedData` as a store, one shard per subject.

    Used by ``mrsynth data convert OLD.npz NEW``. Written into ``NEW.partial`` and renamed,
    so ``out`` only ever appears complete.
    """
    if image_dtype not in IMAGE_DTYPES:
        raise DataError(f"Image dtype {image_dtype!r} is not one of {', '.join(IMAGE_DTYPES)}.")
    dest = Path(out)
    part = partial_dir(dest)
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    entries = []
    seen: set[str] = set()
    for sid, a, b in subject_runs(np.asarray(data.subject)):
        key = shard_key(sid if sid not in seen else f"{sid}@{a}")
        seen.add(sid)
        rows = np.arange(a, b)
        arrays = {f"image__{c}": np.asarray(data.images[c][rows]).astype(image_dtype)
                  for c in data.contrasts}
        arrays["mask"] = np.asarray(data.mask[rows], dtype=bool)
        meta = write_shard(part, key, arrays, {"subject": sid})
        entries.append({
            "key": key, "subject": sid, "split": str(data.split[a]), "n_slices": b - a,
            "slice_index": np.asarray(data.slice_index[a:b]).tolist(),
            "crop": np.asarray(data.crop[a]).tolist(),
            "available": {c: bool(data.available[c][a]) for c in data.contrasts},
            "offset": {c: float(data.offset[c][a]) for c in data.contrasts},
            "scale": {c: float(data.scale[c][a]) for c in data.contrasts},
            "checksums": meta["checksums"],
        })
        per_slice = {f"{c}:{k}": np.asarray(getattr(data, k)[c][a:b])
                     for c in data.contrasts for k in ("available", "offset", "scale")}
        per_slice["crop"] = np.asarray(data.crop[a:b])
        for name, v in per_slice.items():
            if not (v == v[0]).all():
                raise DataError(f"{data.path}: {name} varies within subject {sid}'s slices; "
                                "the store keeps one value per subject. Prepare the data again.")
    write_index(part, make_index(settings=data.settings, subjects=data.subjects,
                                 contrasts=data.contrasts, size=data.size,
                                 image_dtype=image_dtype, shards=entries))
    publish(part, dest)
    return dest


def partial_dir(dest: Path) -> Path:
    """Where an unfinished output is built (``DEST.partial``)."""
    return dest.with_name(dest.name + ".partial")


def publish(part: Path, dest: Path, *, replace: bool = True) -> None:
    """Move a finished store into place.

    ``replace``: an older ``dest`` is moved aside first and removed only afterwards.
    Without it, a ``dest`` that appeared meanwhile is another ``--shard`` part having
    published the same store: that is success, and a stray ``part`` (just an index,
    re-created by a late writer) is removed.
    """
    old = None
    if replace and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(part, dest)
    except OSError:
        if replace or not (dest / INDEX_NAME).is_file():
            raise
        if part.is_dir() and not (part / SHARDS).exists():
            shutil.rmtree(part, ignore_errors=True)
        return
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header for a C-order array (what ``np.save`` writes before the data)."""
    import io

    from numpy.lib import format as npf

    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": npf.dtype_to_descr(dtype),
                                     "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _stream_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
                   blocks: Iterable[np.ndarray]) -> str:
    """Write one ``.npy`` member block by block; returns the sha256 of its data."""
    digest = hashlib.sha256()
    with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
        fh.write(_npy_header(shape, dtype))
        for block in blocks:
            b = np.ascontiguousarray(block, dtype=dtype)
            mv = memoryview(b).cast("B") if b.size else b""
            digest.update(mv)
            fh.write(mv)
    return digest.hexdigest()


def store_to_npz(store: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 compress: bool = False) -> Path:
    """Write a store as the single-file ``.npz``, one shard at a time (bounded memory).

    The file is the one :meth:`PreparedData.save` writes for the same data (float32
    images, sha256 checksums), and is written atomically.
    """
    from mrsynth.data.prepared import FORMAT_VERSION, array_checksums
    from mrsynth.utils import atomic_path

    root = Path(store)
    data = open_store(root, verify=False)
    index = read_index(root)
    small: dict[str, np.ndarray] = {
        "format_version": np.asarray(FORMAT_VERSION),
        "settings": np.asarray(json.dumps(data.settings, default=json_default)),
        "subjects": np.asarray(json.dumps(data.subjects, default=json_default)),
        "subject": data.subject.astype(str),
        "slice_index": data.slice_index.astype(np.int32),
        "crop": data.crop.astype(np.int32),
        "split": data.split.astype(str),
        "paired": data.paired.astype(bool),
    }
    for c in data.contrasts:
        small[f"available__{c}"] = data.available[c].astype(bool)
        small[f"offset__{c}"] = data.offset[c].astype(np.float64)
        small[f"scale__{c}"] = data.scale[c].astype(np.float64)
    checksums = array_checksums(small)
    big: dict[str, tuple[ShardedArray, np.dtype]] = {"mask": (data.mask, np.dtype(bool))}  # type: ignore[dict-item]
    for c in data.contrasts:
        big[f"image__{c}"] = (data.images[c], np.dtype(np.float32))  # type: ignore[assignment]
    dest = Path(out)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(dest, suffix=".npz") as tmp, \
            zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
        for name in sorted(small):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, small[name], allow_pickle=False)
        for name, (arr, dt) in sorted(big.items()):
            blocks = (arr.shard(i) for i in range(len(index["shards"])))
            checksums[name] = _stream_member(zf, name, arr.shape, dt, blocks)
        with zf.open("checksums.npy", "w") as fh:
            np.lib.format.write_array(
                fh, np.asarray(json.dumps(checksums, sort_keys=True)), allow_pickle=False)
    return dest
