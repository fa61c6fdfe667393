"""``mrsynth data prepare``: volumes -> normalised, subject-split axial slices in one file.

Pipeline per subject: load and validate every contrast (canonical RAS+),
check the contrasts share one grid (or resample onto the first), build a joint
brain mask, pick axial slices, block-average in-plane (``downsample``),
normalise each volume to [-1, 1] with robust brain percentiles, set the
background to -1, and crop/pad to ``size`` around the brain. The split is by
participant, drawn from ``seed`` (or given), so no subject's slices are in two of
train, val and test. The validation split (``val_fraction`` / ``val_subjects``) is
taken out of the subjects left after the test split, with its own random stream, so
adding it never changes the test subjects. The subjects are prepared one by one (in
parallel processes, resumably, on several machines) by
:mod:`mrsynth.data.prepare_parallel` into a store (:mod:`mrsynth.data.store`), or
gathered into one ``.npz`` written atomically with
:meth:`mrsynth.data.prepared.PreparedData.save`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.data import warn
from mrsynth.data.normalise import BACKGROUND, DEFAULT_PERCENTILES, fit_scale
from mrsynth.data.readers import DatasetIndex, SubjectRecord, load_image_2d
from mrsynth.data.slicing import (
    DEFAULT_SLICES,
    SliceSpec,
    brain_origin,
    crop_or_pad,
    downsample_mask,
    image_origin,
    outline_outside_crop,
    slices_first,
    to_plane,
    to_training_grid,
)
from mrsynth.data.volumes import (
    Volume,
    affine_list,
    brain_mask,
    check_data,
    grid_difference,
    load_volume,
    orientation,
    resample_to,
    same_grid,
    voxel_size,
)
from mrsynth.errors import ConfigError, DataError

ProgressFn = Callable[[int, int, str], None]


@dataclass
class _Chunk:
    """The slices of one subject, ready to be concatenated."""

    images: dict[str, np.ndarray]
    available: dict[str, bool]
    offset: dict[str, float]
    scale: dict[str, float]
    mask: np.ndarray
    slice_index: np.ndarray
    origin: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- options
def _check_options(
    contrasts: Sequence[str], size: Sequence[int], slice_step: int, downsample: int,
    test_fraction: float, val_fraction: float = 0.0,
) -> tuple[list[str], tuple[int, int]]:
    cs = [str(c) for c in contrasts]
    if not cs:
        raise ConfigError("No contrasts given; pass at least one, e.g. --contrasts T1w T2w.")
    if len(set(cs)) != len(cs):
        raise ConfigError(f"Contrasts {cs} repeat a name; give each contrast once.")
    for c in cs:
        if not c or "/" in c or "__" in c:
            raise ConfigError(f"Contrast name {c!r} is not valid (no '/', no '__').")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--size must be two integers H W, not {size!r}.") from exc
    if h < 8 or w < 8:
        raise ConfigError(f"--size {h} {w} is too small; use at least 8 x 8.")
    if int(slice_step) < 1:
        raise ConfigError(f"--slice-step must be >= 1, not {slice_step}.")
    if int(downsample) < 1:
        raise ConfigError(f"--downsample must be an integer >= 1, not {downsample}.")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ConfigError(f"--test-fraction must be in [0, 1), not {test_fraction}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), not {val_fraction}.")
    return cs, (h, w)


# --------------------------------------------------------------------------- split
def read_split_file(path: str | os.PathLike[str]) -> list[str]:
    """Test subjects from an earlier prepared file (.npz) or store, a JSON list/dict or a
    text file."""
    p = Path(path)
    if p.is_dir():
        try:
            return [str(s) for s in _prepared_settings(p)["test_subjects"]]
        except (DataError, KeyError, TypeError) as exc:
            raise ConfigError(f"Cannot read the test subjects from the store {p} ({exc}).") \
                from exc
    if not p.is_file():
        raise ConfigError(f"Split file {p} does not exist.")
    try:
        if p.suffix == ".npz":
            return [str(s) for s in _prepared_settings(p)["test_subjects"]]
        text = p.read_text()
        if p.suffix == ".json":
            obj = json.loads(text)
            obj = obj.get("test_subjects", obj.get("test")) if isinstance(obj, dict) else obj
            return [str(s) for s in obj]
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"Cannot read the test subjects from split file {p} ({exc}). Give an mrsynth "
            "prepared file, a JSON list (or {\"test_subjects\": [...]}) or a text file with one "
            "subject per line."
        ) from exc


def split_participants(
    participants: Iterable[str], test_fraction: float, seed: int
) -> list[str]:
    """Test participants drawn reproducibly from ``seed``.

    Participants are sorted first, so the result depends only on the set of names
    and the seed (not on file-system order). At least one participant goes to each
    side when ``test_fraction > 0`` and there are two or more participants.
    """
    names = sorted(set(participants))
    if test_fraction <= 0 or len(names) < 2:
        return []
    n_test = int(round(test_fraction * len(names)))
    n_test = min(max(n_test, 1), len(names) - 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    return sorted(names[i] for i in order[:n_test])


def _prepared_settings(path: Path) -> dict[str, Any]:
    """The settings recorded in a prepared store (a directory) or ``.npz`` file."""
    if path.is_dir():
        from mrsynth.data.store import read_index

        return dict(read_index(path)["settings"])
    with np.load(path, allow_pickle=False) as z:
        return dict(json.loads(str(z["settings"])))


def read_split_val(path: str | os.PathLike[str]) -> list[str]:
    """Validation subjects recorded in an earlier prepared file (.npz), store or JSON dict
    (``val_subjects``); [] when it has none (a JSON list or text file names test subjects
    only). ``--split-from`` reuses them unless the validation split is given anew."""
    p = Path(path)
    try:
        if p.is_dir() or p.suffix == ".npz":
            vals = _prepared_settings(p).get("val_subjects")
        elif p.suffix == ".json":
            obj = json.loads(p.read_text())
            vals = obj.get("val_subjects") if isinstance(obj, dict) else None
        else:
            vals = None
    except (OSError, ValueError, KeyError, TypeError, DataError) as exc:
        raise ConfigError(f"Cannot read the validation subjects from split file {p} ({exc}).") \
            from exc
    return [str(s) for s in vals or []]


def _resolve_test(
    idx: DatasetIndex, records: list[SubjectRecord], test_subjects: Sequence[str] | None,
    split_from: str | os.PathLike[str] | None, test_fraction: float, seed: int,
    warnings_out: list[str],
) -> tuple[set[str], str]:
    participants = sorted({r.participant for r in records})
    if idx.layout == "folders":
        if test_subjects or split_from:
            warn("The folders layout takes its split from trainA/testA; --test-subjects and "
                 "--split-from are ignored.", warnings_out)
        return {r.participant for r in records if r.split == "test"}, "folders"
    given: list[str] | None = None
    method = "seed"
    if split_from is not None:
        given, method = read_split_file(split_from), f"file:{split_from}"
    elif test_subjects is not None:
        given, method = [str(s) for s in test_subjects], "given"
    if given is None:
        test = set(split_participants(participants, test_fraction, seed))
        if test_fraction > 0 and not test:
            warn(f"Only {len(participants)} participant(s): every slice goes to the train split.",
                 warnings_out)
        return test, method
    test, unknown = _match_subjects(given, records, participants)
    if unknown:
        raise ConfigError(
            f"Test subject(s) {', '.join(unknown)} are not in {idx.source} (after dropping "
            f"subjects without the requested contrasts). Subjects: {', '.join(participants)}."
        )
    if set(participants) <= test and participants:
        warn("Every subject is in the test split; nothing is left to train on.", warnings_out)
    return test, method


def _match_subjects(given: Sequence[str], records: list[SubjectRecord],
                    participants: list[str]) -> tuple[set[str], list[str]]:
    """Participants named by ``given`` (participant, record id or bare label); unknown names."""
    by_id = {r.id: r.participant for r in records}
    found: set[str] = set()
    unknown = []
    for s in given:
        if s in participants:
            found.add(s)
        elif s in by_id:
            found.add(by_id[s])
        elif f"sub-{s}" in participants:
            found.add(f"sub-{s}")
        else:
            unknown.append(s)
    return found, unknown


#: Offset of the validation split's random stream from ``seed`` (the test split uses ``seed``).
VAL_SEED_OFFSET = 7919


def _resolve_val(
    idx: DatasetIndex, records: list[SubjectRecord], test: set[str],
    val_subjects: Sequence[str] | None, val_fraction: float, seed: int, warnings_out: list[str],
    val_min_subjects: int = 2,
) -> tuple[set[str], str]:
    """Validation participants, taken out of those not in the test split. A split drawn by
    ``val_fraction`` needs at least ``val_min_subjects`` non-test participants (else none is
    kept, with a warning); named ``val_subjects`` are always kept."""
    if idx.layout == "folders":
        pool = sorted({r.participant for r in records if r.split != "test"})
    else:
        pool = sorted({r.participant for r in records} - test)
    if val_subjects:
        val, unknown = _match_subjects([str(s) for s in val_subjects], records,
                                       sorted({r.participant for r in records}))
        if unknown:
            raise ConfigError(
                f"Validation subject(s) {', '.join(unknown)} are not in {idx.source} (after "
                "dropping subjects without the requested contrasts). Subjects: "
                f"{', '.join(sorted({r.participant for r in records}))}."
            )
        clash = sorted(val - set(pool))
        if clash:
            raise ConfigError(
                f"Subject(s) {', '.join(clash)} are in the test split and cannot also be "
                "validation subjects: the test split is never used for choices. Choose other "
                "--val-subjects."
            )
        if pool and set(pool) <= val:
            raise ConfigError(
                f"--val-subjects takes every training subject ({', '.join(pool)}); leave at "
                "least one subject to train on."
            )
        return val, "given"
    if val_fraction <= 0:
        return set(), "none"
    need = max(2, val_min_subjects)
    if len(pool) < need:
        warn(f"Only {len(pool)} participant(s) outside the test split: no validation split is "
             f"kept (--val-fraction {val_fraction} needs at least {need}); every one trains. "
             "Name validation subjects (--val-subjects) to keep one anyway.", warnings_out)
        return set(), "none"
    return set(split_participants(pool, val_fraction, seed + VAL_SEED_OFFSET)), "seed"


# --------------------------------------------------------------------------- per subject
def _load_record_volumes(rec: SubjectRecord, contrasts: list[str]) -> dict[str, Volume]:
    if rec.simulate is not None:
        imgs = rec.simulate()
        return {c: load_volume(imgs[c]) for c in contrasts if c in imgs}
    return {c: load_volume(rec.files[c]) for c in contrasts if c in rec.files}


def _subject_info(per_contrast: dict[str, dict[str, Any]], ref: str,
                  grid_shape: tuple[int, ...]) -> dict[str, Any]:
    """A subject's metadata: its grid from the reference contrast, and every contrast's."""
    refc = per_contrast[ref]
    return {
        "files": {c: per_contrast[c]["file"] for c in per_contrast},
        "original_shape": refc["original_shape"],
        "original_affine": refc["original_affine"],
        "canonical_shape": refc["canonical_shape"],
        "canonical_affine": refc["canonical_affine"],
        "voxel_size": refc["voxel_size"],
        "grid_shape": [int(s) for s in grid_shape],
        "reference_contrast": ref,
        "contrasts": per_contrast,
    }


def _prepare_volume_record(
    rec: SubjectRecord, contrasts: list[str], spec: SliceSpec, slice_step: int,
    downsample: int, size: tuple[int, int], percentiles: tuple[float, float], resample: bool,
    warnings_out: list[str], *, plane: str = "axial",
) -> _Chunk | None:
    vols = _load_record_volumes(rec, contrasts)
    present = [c for c in contrasts if c in vols]
    ref = present[0]
    resampled: list[str] = []
    for c in present[1:]:
        if not same_grid(vols[c].canonical, vols[ref].canonical):
            diff = grid_difference(vols[c].canonical, vols[ref].canonical)
            if not resample:
                raise DataError(
                    f"Subject {rec.id}: {c} ({rec.describe(c)}) and {ref} ({rec.describe(ref)}) "
                    f"are not on the same voxel grid ({diff}). Paired slices need co-registered "
                    f"volumes: register them first, or pass --resample to interpolate {c} onto "
                    f"the {ref} grid (trilinear; only right if they are already aligned in world "
                    "space)."
                )
            warn(f"Subject {rec.id}: resampled {c} onto the {ref} grid ({diff}).", warnings_out)
            vols[c] = resample_to(vols[c], vols[ref].canonical)
            resampled.append(c)
    masks = {c: brain_mask(vols[c].data) for c in present}
    joint = masks[ref].copy()
    for c in present[1:]:
        joint &= masks[c]
    if not joint.any():
        raise DataError(
            f"Subject {rec.id}: the brain masks of {', '.join(present)} do not overlap, so the "
            "volumes do not show the same brain. Check that they are co-registered."
        )
    mask_ds = downsample_mask(joint, downsample)
    # axial slices are picked on the full-resolution mask (as before planes existed); the
    # other planes cut the downsampled grid, so they are picked on its mask
    mask_p = to_plane(mask_ds, plane)
    index = spec.select(joint if plane == "axial" else mask_p,
                        name=f"Subject {rec.id} ({rec.describe(ref)})", step=slice_step,
                        plane=plane)
    if index.size == 0:
        warn(f"Subject {rec.id}: no {plane} slice matches --slices {spec.text}; subject "
             "skipped.", warnings_out)
        return None

    origin = brain_origin(mask_p, size)
    sel_mask = mask_p[:, :, index]
    lost, span_r, span_c = outline_outside_crop(mask_p, size, origin)
    if lost:
        warn(
            f"Subject {rec.id}: the brain spans {span_r} x "
            f"{span_c} voxels in-plane (after downsample {downsample}), larger "
            f"than --size {size[0]} {size[1]}, so its edges are cut off "
            f"({lost} voxels of its outline). Use a larger --size or "
            "--downsample.", warnings_out)

    images: dict[str, np.ndarray] = {}
    offsets: dict[str, float] = {}
    scales: dict[str, float] = {}
    per_contrast: dict[str, Any] = {}
    for c in contrasts:
        if c not in vols:
            images[c] = np.full((index.size, *size), BACKGROUND, np.float32)
            offsets[c], scales[c] = 0.0, 1.0
            continue
        v = vols[c]
        offset, scale = fit_scale(v.data, joint, percentiles, name=f"{rec.describe(c)}")
        if plane == "axial":
            images[c] = slices_first(to_training_grid(
                v.data[:, :, index], offset, scale, sel_mask, downsample, size, origin))
        else:  # the whole downsampled grid, seen in the plane's frame, then cut
            grid = to_training_grid(v.data, offset, scale, mask_ds, downsample,
                                    mask_ds.shape[:2], (0, 0))
            images[c] = slices_first(crop_or_pad(
                np.ascontiguousarray(to_plane(grid, plane)[:, :, index]), size, origin,
                BACKGROUND))
        offsets[c], scales[c] = offset, scale
        per_contrast[c] = {
            "file": rec.describe(c),
            "original_shape": [int(s) for s in v.original.shape],
            "original_affine": affine_list(v.original),
            "original_orientation": orientation(v.original),
            "original_dtype": str(v.original.get_data_dtype()),
            "canonical_shape": [int(s) for s in v.canonical.shape],
            "canonical_affine": affine_list(v.canonical),
            "voxel_size": list(voxel_size(v.canonical)),
            "resampled": c in resampled,
            "offset": offset,
            "scale": scale,
            "intensity_range": [float(v.data.min()), float(v.data.max())],
        }
    info = _subject_info(per_contrast, ref, mask_p.shape)
    mask = slices_first(crop_or_pad(sel_mask, size, origin, fill=False))
    return _Chunk(
        images=images, available={c: c in vols for c in contrasts}, offset=offsets, scale=scales,
        mask=mask, slice_index=index.astype(np.int32), origin=origin, info=info,
    )


def _prepare_image_record(
    rec: SubjectRecord, contrasts: list[str], downsample: int, size: tuple[int, int],
    percentiles: tuple[float, float], resample: bool, warnings_out: list[str],
) -> _Chunk:
    data: dict[str, np.ndarray] = {}
    for c in contrasts:
        if c in rec.files:
            arr = load_image_2d(rec.files[c])
            check_data(arr, str(rec.files[c]))
            data[c] = arr
    present = list(data)
    ref = present[0]
    for c in present[1:]:
        if data[c].shape != data[ref].shape:
            if not resample:
                raise DataError(
                    f"{rec.files[c]} is {data[c].shape[0]}x{data[c].shape[1]} but its pair "
                    f"{rec.files[ref]} is {data[ref].shape[0]}x{data[ref].shape[1]}. Paired "
                    "images must have one size: fix the export, or pass --resample to resize "
                    f"{c} to the {ref} image."
                )
            from skimage.transform import resize

            warn(f"{rec.files[c]}: resized to {data[ref].shape} to match {rec.files[ref]}.",
                 warnings_out)
            data[c] = resize(data[c], data[ref].shape, order=1, preserve_range=True,
                             anti_aliasing=False).astype(np.float32)
    masks = {c: brain_mask(data[c]) for c in present}
    joint = masks[ref].copy()
    for c in present[1:]:
        joint &= masks[c]
    if not joint.any():
        raise DataError(f"{rec.files[ref]}: no foreground found (the image is all background).")
    mask_ds = downsample_mask(joint, downsample)
    origin = image_origin(mask_ds.shape, size)
    images, offsets, scales, per_contrast = {}, {}, {}, {}
    for c in contrasts:
        if c not in data:
            images[c] = np.full((1, *size), BACKGROUND, np.float32)
            offsets[c], scales[c] = 0.0, 1.0
            continue
        offset, scale = fit_scale(data[c], joint, percentiles, name=str(rec.files[c]))
        images[c] = to_training_grid(
            data[c], offset, scale, mask_ds, downsample, size, origin)[None]
        offsets[c], scales[c] = offset, scale
        per_contrast[c] = {
            "file": str(rec.files[c]),
            "original_shape": list(data[c].shape),
            "original_affine": None,
            "canonical_shape": list(data[c].shape),
            "canonical_affine": np.eye(4).tolist(),
            "voxel_size": [1.0, 1.0],
            "offset": offset,
            "scale": scale,
            "intensity_range": [float(data[c].min()), float(data[c].max())],
        }
    info = _subject_info(per_contrast, ref, mask_ds.shape)
    return _Chunk(
        images=images, available={c: c in data for c in contrasts}, offset=offsets,
        scale=scales, mask=crop_or_pad(mask_ds, size, origin, fill=False)[None],
        slice_index=np.zeros(1, np.int32), origin=origin, info=info,
    )


# --------------------------------------------------------------------------- main entry
def _progress_callback(progress: bool | ProgressFn | None) -> tuple[ProgressFn | None, Any]:
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("preparing", total=None)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=f"preparing {what}")

    return update, bar


def prepare_dataset(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    contrasts: Sequence[str] = ("T1w", "T2w"),
    size: Sequence[int] = (256, 256),
    slices: str | int = DEFAULT_SLICES,
    slice_step: int = 1,
    downsample: int = 1,
    test_fraction: float = 0.2,
    test_subjects: Sequence[str] | None = None,
    split_from: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.0,
    val_subjects: Sequence[str] | None = None,
    val_min_subjects: int = 2,
    seed: int = 0,
    layout: str | None = None,
    unpaired: bool = False,
    strict: bool = False,
    resample: bool = False,
    overwrite: bool = False,
    n_subjects: int | None = None,
    resolution: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    plane: str = "axial",
    compress: bool = False,
    progress: bool | ProgressFn | None = False,
    workers: int | None = 1,
    shard: str | tuple[int, int] | None = None,
    finalize: bool = False,
    image_dtype: str = "float16",
) -> Path | None:
    """Prepare normalised, subject-split slices from ``source`` into ``out``.

    Slices are axial unless ``plane`` is ``coronal`` or ``sagittal``
    (:data:`~mrsynth.data.slicing.PLANES`: the same grid, block-averaged in the axial plane
    by ``downsample``, cut across another axis; for models to fuse with an axial one).

    ``source`` is a data set directory (BIDS, HCP-style, or ``trainA/trainB/testA/testB``)
    or ``"builtin"`` (simulated subjects; ``n_subjects`` and ``resolution`` apply to it).
    ``out`` ending in ``.npz`` is the single file (float32, read whole); any other path a
    store directory (written subject by subject, read lazily, images ``image_dtype``).
    ``workers`` subjects are prepared at once in separate processes (None: the cores; a
    script calling this with more than one must use ``if __name__ == "__main__":``). A
    store's preparation continues where an interrupted one stopped; ``shard="i/n"``
    prepares every n-th subject (n machines, one store) and returns None while other parts
    are missing; ``finalize`` only writes the index once every part ran. A subject that
    cannot be prepared is reported and skipped (``strict``: an error). See ``docs/data.md``.
    Every input problem raises :class:`~mrsynth.errors.MrsynthError`; ``out`` only ever
    appears complete. ``val_fraction`` keeps a validation split only when at least
    ``val_min_subjects`` participants are not in the test split. Returns ``out``.
    """
    from mrsynth.data.prepare_parallel import prepare_store

    return prepare_store(
        source, out, workers=workers, shard=shard, finalize_only=finalize,
        image_dtype=image_dtype, strict=strict, overwrite=overwrite, compress=compress,
        progress=progress, contrasts=contrasts, size=size, slices=slices,
        slice_step=slice_step, downsample=downsample, test_fraction=test_fraction,
        test_subjects=test_subjects, split_from=split_from, val_fraction=val_fraction,
        val_subjects=val_subjects, val_min_subjects=val_min_subjects, seed=seed,
        layout=layout, unpaired=unpaired,
        resample=resample, n_subjects=n_subjects, resolution=resolution,
        percentiles=percentiles, plane=plane,
    )
