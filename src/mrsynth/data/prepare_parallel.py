"""Parallel, resumable, shardable ``mrsynth data prepare`` into a store (issue 13).

The work is split in three steps so that memory never grows with the number of
subjects and no finished subject is ever prepared twice:

1. **plan** (:func:`make_plan`): index the data set, drop subjects without the
   requested contrasts, draw the test/val split -- everything that depends only on
   the file names and options. Stored as ``plan.json`` in ``OUT.partial/`` at the
   first start; a later start (a rerun after a kill, another ``--shard``) must
   reach the same plan, or it is refused.
2. **subjects** (:func:`prepare_subjects`): each subject is prepared on its own
   (in ``workers`` processes) and written as one shard directory, atomically, with
   its meta last (:func:`mrsynth.data.store.write_shard`); subjects whose shard
   exists are skipped. ``--shard i/n`` takes every n-th subject of the plan, so n
   machines sharing a file system fill one store. A subject that fails is recorded
   in ``failed/`` and reported; the others go on (``strict`` stops instead).
3. **finalize** (:func:`finalize`): once every subject has a shard (or failed),
   write the index ``store.json`` and move ``OUT.partial`` to ``OUT`` (for an
   ``.npz`` output, stream the shards into the single file instead).

The parent process only holds the plan and counters; each worker holds one
subject at a time. Shards do not depend on the worker count or order, so any
``workers`` and any interruption give bit-identical arrays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth import __version__
from mrsynth.data import DataWarning, warn
from mrsynth.data import store as st
from mrsynth.data.normalise import DEFAULT_PERCENTILES
from mrsynth.data.normalise import settings as normalisation_settings
from mrsynth.data.readers import SubjectRecord, index_dataset
from mrsynth.data.slicing import DEFAULT_SLICES, PLANES, SliceSpec, check_plane
from mrsynth.errors import ConfigError, DataError, MrsynthError, OutputExistsError
from mrsynth.utils import die_with_parent

PLAN_FORMAT = "mrsynth-store-plan"


def default_workers() -> int:
    """The cores this process may use."""
    from mrsynth.utils import available_cores

    return available_cores()


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n) -> (i, n)."""
    if text is None:
        return None
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            a, b = str(text).split("/")
            i, n = int(a), int(b)
        except ValueError as exc:
            raise ConfigError(f"--shard must look like i/n (e.g. 2/8), not {text!r}.") from exc
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {i}/{n}: i must be between 1 and n.")
    return i, n


# ----------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What to prepare: options, subjects in order with their split, and the notes so far."""

    settings: dict[str, Any]
    records: list[SubjectRecord]
    splits: list[str]
    keys: list[str]
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def as_json(self, created_utc: str, image_dtype: str) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "created_utc": created_utc, "image_dtype": image_dtype,
            "settings": self.settings,
            "records": [{"id": r.id, "key": k, "participant": r.participant, "kind": r.kind,
                         "split": s} for r, k, s in zip(self.records, self.keys, self.splits,
                                                        strict=True)],
            "warnings": self.warnings, "skipped": self.skipped,
        }


def make_plan(
    source: str | os.PathLike[str], *, contrasts: Sequence[str] = ("T1w", "T2w"),
    size: Sequence[int] = (256, 256), slices: str | int = DEFAULT_SLICES, slice_step: int = 1,
    downsample: int = 1, test_fraction: float = 0.2, test_subjects: Sequence[str] | None = None,
    split_from: str | os.PathLike[str] | None = None, val_fraction: float = 0.0,
    val_subjects: Sequence[str] | None = None, val_min_subjects: int = 2, seed: int = 0,
    layout: str | None = None, unpaired: bool = False, strict: bool = False,
    resample: bool = False, n_subjects: int | None = None, resolution: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES, plane: str = "axial",
) -> Plan:
    """Index ``source``, choose the subjects and draw the split (no image is processed)."""
    from mrsynth.data.prepare import _check_options, _resolve_test, _resolve_val

    cs, hw = _check_options(contrasts, size, slice_step, downsample, test_fraction, val_fraction)
    check_plane(plane)
    spec = SliceSpec.parse(slices)
    notes: list[str] = []
    is_builtin = str(source) == "builtin"
    builtin_settings: dict[str, Any] | None = None
    if is_builtin:
        from mrsynth.data import builtin

        idx, builtin_settings = builtin.index(n_subjects=n_subjects, seed=seed, contrasts=cs,
                                              resolution=resolution)
    else:
        if n_subjects is not None or resolution is not None:
            raise ConfigError("--n-subjects and --resolution only apply to the builtin data set.")
        idx = index_dataset(source, layout, cs)
    if plane != "axial" and idx.layout == "folders":
        raise ConfigError(
            f"--plane {plane}: {idx.source} holds 2-D images (folders layout), which have only "
            "their own plane. Other planes need NIfTI volumes; leave --plane at axial.")
    for note in idx.notes:
        warn(note, notes)
    missing_everywhere = [c for c in cs if c not in idx.contrasts]
    if missing_everywhere:
        raise DataError(
            f"No subject in {idx.source} has {', '.join(missing_everywhere)} (layout {idx.layout}; "
            f"contrasts found: {', '.join(idx.contrasts) or 'none'}). Choose contrasts that exist "
            "with --contrasts."
        )
    records: list[SubjectRecord] = []
    skipped: list[str] = []
    for rec in idx.subjects:
        for note in rec.notes:
            warn(f"Subject {rec.id}: {note}", notes)
        missing = [c for c in cs if c not in rec.files]
        if not missing:
            records.append(rec)
            continue
        has = [c for c in cs if c in rec.files]
        where = rec.describe(has[0]) if has else rec.id
        if strict:
            raise DataError(
                f"Subject {rec.id} ({where}) has no {', '.join(missing)}, and --strict is set. "
                "Add the missing file(s), remove the subject, or drop --strict to skip it "
                "(--unpaired keeps it for unpaired models)."
            )
        if unpaired and has:
            records.append(rec)
            continue
        skipped.append(rec.id)
        warn(f"Subject {rec.id} has no {', '.join(missing)}; skipped (use --unpaired to keep "
             "its other contrasts, or --strict to make this an error).", notes)
    if not records:
        raise DataError(
            f"No subject in {idx.source} has all of {', '.join(cs)}; nothing to prepare. "
            "Check --contrasts, or pass --unpaired to use subjects with only some of them."
        )
    test, split_method = _resolve_test(idx, records, test_subjects, split_from, test_fraction,
                                       seed, notes)
    if split_from is not None and not val_subjects and val_fraction <= 0:
        from mrsynth.data.prepare import read_split_val

        val_subjects = read_split_val(split_from) or None  # the earlier file's, if any
    val, val_method = _resolve_val(idx, records, test, val_subjects, val_fraction, seed, notes,
                                   val_min_subjects)
    splits = [rec.split or ("test" if rec.participant in test else "train") for rec in records]
    splits = ["val" if s == "train" and rec.participant in val else s
              for rec, s in zip(records, splits, strict=True)]
    keys = [st.shard_key(r.id) for r in records]
    if len(set(keys)) != len(keys):  # a hash collision of two ids: number them instead
        keys = [f"{i:07d}-{k}" for i, k in enumerate(keys)]
    from mrsynth.data.prepared import FORMAT_VERSION

    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "mrsynth_version": __version__,
        "source": "builtin" if is_builtin else str(Path(source).resolve()),
        "layout": idx.layout,
        "contrasts": cs,
        "size": list(hw),
        "downsample": int(downsample),
        "orientation": "RAS",
        "plane": plane,
        "geometry": ("slice[r, c] = canonical_downsampled[r + row0, c + col0, slice_index]"
                     if plane == "axial" else
                     f"slice[r, c] = transpose(canonical_downsampled, {list(PLANES[plane])})"
                     "[r + row0, c + col0, slice_index]"),
        "normalisation": normalisation_settings(percentiles, clip=True),
        "slices": spec.text if idx.layout != "folders" else "all (2-D images)",
        "slice_step": int(slice_step),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "split_method": split_method,
        "val_fraction": float(val_fraction),
        "val_method": val_method,
        "unpaired": bool(unpaired),
        "strict": bool(strict),
        "resample": bool(resample),
    }
    if builtin_settings is not None:
        settings["builtin"] = builtin_settings
    options = {"contrasts": cs, "size": hw, "slices": spec.text, "slice_step": int(slice_step),
               "downsample": int(downsample), "percentiles": tuple(percentiles),
               "resample": bool(resample), "plane": plane}
    return Plan(settings=settings, records=records, splits=splits, keys=keys, warnings=notes,
                skipped=skipped, options=options)


def _same_plan(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of what differs between two stored plans (creation time aside)."""
    diffs = [k for k in ("image_dtype", "records", "skipped") if a.get(k) != b.get(k)]
    sa, sb = a.get("settings", {}), b.get("settings", {})
    diffs += [f"settings.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return diffs


# ----------------------------------------------------------------------------- one subject
def prepare_subject(root: str, rec: SubjectRecord, key: str, split: str,
                    options: dict[str, Any], image_dtype: str) -> dict[str, Any]:
    """Prepare one subject into its shard (or its ``failed/`` note); return a small summary.

    Runs in a worker process or in the caller. DataWarnings are collected (the caller
    shows them) instead of printed, so a worker writes nothing to the terminal.
    """
    from mrsynth.data.prepare import _prepare_image_record, _prepare_volume_record

    out = Path(root)
    sink: list[str] = []
    cs = options["contrasts"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            if rec.kind == "image2d":
                chunk = _prepare_image_record(rec, cs, options["downsample"], options["size"],
                                              options["percentiles"], options["resample"], sink)
            else:
                chunk = _prepare_volume_record(
                    rec, cs, SliceSpec.parse(options["slices"]), options["slice_step"],
                    options["downsample"], options["size"], options["percentiles"],
                    options["resample"], sink, plane=options.get("plane", "axial"))
    except ConfigError:
        raise  # an option that cannot work (--slices 500) fails for every subject: stop
    except Exception as exc:  # a bad subject must not take the others down
        kind = "" if isinstance(exc, MrsynthError) else f"unexpected {type(exc).__name__}: "
        note = {"subject": rec.id, "error": f"{kind}{exc}", "warnings": sink}
        (out / st.FAILED).mkdir(exist_ok=True)
        st.write_json(out / st.FAILED / f"{key}.json", note)
        return {"subject": rec.id, "status": "failed", **note}
    (out / st.FAILED / f"{key}.json").unlink(missing_ok=True)
    meta: dict[str, Any] = {"subject": rec.id, "participant": rec.participant, "kind": rec.kind,
                            "split": split, "warnings": sink}
    arrays: dict[str, np.ndarray] = {}
    if chunk is None:
        meta.update(n_slices=0)
    else:
        meta.update(
            n_slices=int(chunk.slice_index.size), slice_index=chunk.slice_index.tolist(),
            crop=[int(chunk.origin[0]), int(chunk.origin[1])],
            available={c: bool(chunk.available[c]) for c in cs},
            offset={c: float(chunk.offset[c]) for c in cs},
            scale={c: float(chunk.scale[c]) for c in cs}, info=chunk.info)
        arrays = {f"image__{c}": chunk.images[c].astype(image_dtype) for c in cs}
        arrays["mask"] = chunk.mask.astype(bool)
    st.write_shard(out, key, arrays, meta)
    return {"subject": rec.id, "status": "done", "n_slices": meta["n_slices"], "warnings": sink}


# ----------------------------------------------------------------------------- the run
def _report(result: dict[str, Any], strict: bool) -> None:
    for msg in result.get("warnings", []):
        warn(msg)
    if result["status"] == "failed" and not strict:
        warn(f"Subject {result['subject']} failed and is skipped: {result['error']}")


def prepare_subjects(part: Path, plan: Plan, todo: list[int], *, image_dtype: str,
                     workers: int, strict: bool, progress: Any = False) -> list[dict[str, Any]]:
    """Prepare the subjects ``todo`` (positions in the plan) into ``part``.

    ``workers`` > 1 uses that many processes; each result is reported as it arrives.
    With ``strict`` the first failure stops the run (finished shards are kept).
    """
    from mrsynth.data.prepare import _progress_callback

    update, bar = _progress_callback(progress)
    results: list[dict[str, Any]] = []
    total = len(todo)

    def done(res: dict[str, Any]) -> None:
        results.append(res)
        _report(res, strict)
        if update:
            update(len(results), total, res["subject"])
        if strict and res["status"] == "failed":
            raise DataError(f"Subject {res['subject']} could not be prepared, and --strict is "
                            f"set: {res['error']}")

    def args(i: int) -> tuple[Any, ...]:
        return (str(part), plan.records[i], plan.keys[i], plan.splits[i], plan.options,
                image_dtype)

    try:
        if bar is not None:
            bar.start()
        if update:
            update(0, total, f"{total} subject(s), {workers} worker(s)")
        if workers <= 1 or total <= 1:
            for i in todo:
                done(prepare_subject(*args(i)))
        else:
            _run_pool(todo, args, workers, done)
    finally:
        if bar is not None:
            bar.stop()
    return results


#: Environment variables that cap the numeric libraries' threads in a worker process.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _run_pool(todo: list[int], args: Any, workers: int, done: Any,
              fn: Any = prepare_subject) -> None:
    import multiprocessing as mp

    # spawn: a clean interpreter per worker (no forked threads or locks of the parent)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                               mp_context=mp.get_context("spawn"), initializer=die_with_parent)
    pending: set[Future] = set()
    queue = deque(todo)
    # one BLAS/OpenMP thread per worker: the workers are the parallelism, and N workers x
    # N library threads only contend for the cores (workers start with the environment of
    # their first submit, inside this block)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        # at most two tasks per worker in flight: results stream back in bounded memory
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(fn, *args(queue.popleft())))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                done(fut.result())
    except BaseException:
        for f in pending:
            f.cancel()
        for p in list(getattr(pool, "_processes", {}).values()):  # stop work in progress now
            with contextlib.suppress(Exception):
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pool.shutdown(wait=True)


def finalize(part: Path, dest: Path, *, compress: bool = False, replace: bool = False) -> Path:
    """Write the index of a store whose subjects are all done (or failed); publish it.

    ``replace``: an existing ``dest`` (a finished store) is replaced; otherwise a ``dest``
    that appears meanwhile was published by another ``--shard`` part, and that is fine.
    """
    if not (part / st.PLAN_NAME).is_file() and (dest / st.INDEX_NAME).is_file():
        return dest  # another part finished and published the store
    plan = st.read_json(part / st.PLAN_NAME, "store plan")
    metas: list[tuple[dict, dict | None]] = []
    failed: dict[str, str] = {}
    missing: list[str] = []
    for r in plan["records"]:
        meta = st.shard_meta(part, r["key"])
        if meta is None:
            note = part / st.FAILED / f"{r['key']}.json"
            if note.is_file():
                f = st.read_json(note, "failure note")
                failed[r["id"]] = f["error"]
                metas.append((r, {"n_slices": 0, "warnings": f.get("warnings", [])}))
            else:
                missing.append(r["id"])
            continue
        metas.append((r, meta))
    if missing:
        raise DataError(
            f"{len(missing)} of {len(plan['records'])} subjects of {dest} are not prepared yet "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Run the "
            "remaining `--shard i/n` parts (or the same command without --shard) first."
        )
    st.clean_stale_tmp(part, everything=True)
    settings = dict(plan["settings"])
    cs = settings["contrasts"]
    notes = list(plan["warnings"])
    entries: list[dict[str, Any]] = []
    subjects: dict[str, Any] = {}
    for r, meta in metas:
        notes += meta.get("warnings", [])
        if r["id"] in failed:
            notes.append(f"Subject {r['id']} failed and is skipped: {failed[r['id']]}")
        if not meta["n_slices"]:
            continue
        subjects[r["id"]] = {
            "participant": r["participant"], "kind": r["kind"], "split": r["split"],
            "crop": meta["crop"], "n_slices": meta["n_slices"],
            "slice_indices": meta["slice_index"],
            "available": [c for c in cs if meta["available"][c]], **meta["info"],
        }
        entries.append({k: meta[k] for k in ("n_slices", "slice_index", "crop", "available",
                                              "offset", "scale", "checksums")}
                       | {"key": r["key"], "subject": r["id"], "split": r["split"]})
    if not entries:
        shutil.rmtree(part, ignore_errors=True)  # nothing in it is worth resuming
        if failed and len(failed) == len(metas):
            first = next(iter(failed))
            raise DataError(f"Every subject of {settings['source']} failed, so nothing was "
                            f"prepared. The first, {first}: {failed[first]}")
        raise DataError(
            f"No slices were selected from {settings['source']} with --slices "
            f"{settings['slices']}. Lower the brain fraction or choose other slices."
        )

    def who(split: str) -> list[str]:
        return sorted({subjects[e["subject"]]["participant"] for e in entries
                       if e["split"] == split})

    for split, what in (("test", "the test split is empty"),
                        ("train", "the train split is empty: nothing to train on")):
        if any(r["split"] == split for r in plan["records"]) and not who(split):
            notes.append(f"None of the {split} subjects produced slices; {what}.")
            warn(notes[-1])
    settings.update(
        created_utc=plan["created_utc"], test_subjects=who("test"), train_subjects=who("train"),
        val_subjects=who("val"), skipped_subjects=plan["skipped"], failed_subjects=failed,
        n_subjects=len(entries), n_slices=sum(e["n_slices"] for e in entries), warnings=notes,
    )
    st.write_index(part, st.make_index(settings=settings, subjects=subjects, contrasts=cs,
                                       size=tuple(settings["size"]),
                                       image_dtype=plan["image_dtype"], shards=entries))
    if dest.suffix == ".npz":
        # the single file is read whole by load_prepared anyway: gather it in memory and
        # write it with PreparedData.save (the same file as before the store existed)
        data = st.open_store(part, verify=False)
        data.images = {c: np.asarray(v) for c, v in data.images.items()}
        data.mask = np.asarray(data.mask)
        data.path = None
        shutil.rmtree(part, ignore_errors=True)
        data.save(dest, compress=compress)
    else:
        st.publish(part, dest, replace=replace)
    return dest


def prepare_store(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *,
    workers: int | None = 1, shard: str | tuple[int, int] | None = None,
    finalize_only: bool = False, image_dtype: str = st.DEFAULT_IMAGE_DTYPE,
    strict: bool = False, overwrite: bool = False, compress: bool = False,
    progress: Any = False, **options: Any,
) -> Path | None:
    """``mrsynth data prepare``: subjects into ``OUT.partial/`` shards, then the index.

    ``out`` ending in ``.npz`` gets the single file (float32 images); any other path a
    store directory. Returns ``out`` once finished, or None when this ``shard`` is done
    but other parts are still missing (the last part to finish publishes the store).
    """
    from mrsynth.utils import check_writable

    dest = Path(out)
    shard_in = parse_shard(shard)
    npz = dest.suffix == ".npz"
    if npz:
        image_dtype = "float32"  # the .npz format stores float32
    if image_dtype not in st.IMAGE_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(st.IMAGE_DTYPES)}, "
                          f"not {image_dtype!r}.")
    n_workers = default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}.")
    if npz and (shard_in is not None or finalize_only):
        raise ConfigError("--shard and --finalize need a store output (a directory such as "
                          "data.mrs), not a .npz file.")
    # a store is built in DEST.partial and kept when interrupted (a rerun continues); a .npz
    # output uses a hidden temporary directory, removed whatever happens
    part = (dest.with_name(f".{dest.name}.partial-{os.getpid()}") if npz
            else st.partial_dir(dest))
    if dest.exists() and not overwrite:
        raise OutputExistsError(
            f"Output {dest} already exists. Choose another path, or pass --overwrite to replace "
            "it (the old one is only replaced once the new one is complete)."
        )
    if dest.exists() and not npz and not (dest.is_dir() and st.is_store(dest)):
        raise ConfigError(f"Output {dest} exists and is not an mrsynth store; --overwrite only "
                          "replaces a store. Choose another path (a .npz name for one file).")
    if npz and dest.is_dir():
        raise ConfigError(f"Output {dest} is a directory; give a file name like data.npz.")
    check_writable(dest, directory=not npz)  # names the output the user gave

    plan = make_plan(source, strict=strict, **options)
    created = not part.exists()
    try:
        return _run(part, dest, plan, shard_in, finalize_only, image_dtype, n_workers, strict,
                    overwrite, compress, progress)
    except BaseException:
        if created and not _has_work(part):
            shutil.rmtree(part, ignore_errors=True)
        raise
    finally:
        if npz:
            shutil.rmtree(part, ignore_errors=True)


def _has_work(part: Path) -> bool:
    """Whether a partial store holds a finished or failed subject (worth resuming)."""
    return any(part.glob(f"{st.SHARDS}/*/{st.META_NAME}")) or any(part.glob(f"{st.FAILED}/*"))


def _run(part: Path, dest: Path, plan: Plan, shard_in: tuple[int, int] | None,
         finalize_only: bool, image_dtype: str, n_workers: int, strict: bool, overwrite: bool,
         compress: bool, progress: Any) -> Path | None:
    want = plan.as_json(datetime.now(UTC).isoformat(timespec="seconds"), image_dtype)
    plan_file = part / st.PLAN_NAME
    if plan_file.is_file():
        have = st.read_json(plan_file, "store plan")
        diffs = _same_plan(have, want)
        if diffs and not overwrite:
            raise ConfigError(
                f"{part} holds an unfinished preparation with other options or subjects "
                f"({', '.join(diffs[:6])} differ). Re-run it with the same options to continue, "
                "or pass --overwrite to start again."
            )
        if diffs:
            shutil.rmtree(part)
    if not plan_file.is_file():
        part.mkdir(parents=True, exist_ok=True)
        st.write_json(plan_file, want)
    if finalize_only:
        return finalize(part, dest, compress=compress, replace=overwrite)

    mine = list(range(len(plan.records)))
    if shard_in is not None:
        i, n = shard_in
        mine = [j for j in mine if j % n == i - 1]
    st.clean_stale_tmp(part)
    todo = [j for j in mine if st.shard_meta(part, plan.keys[j]) is None]
    if len(todo) < len(mine):
        warn(f"{len(mine) - len(todo)} of {len(mine)} subjects were already prepared in "
             f"{part}; continuing with the other {len(todo)}.")
    prepare_subjects(part, plan, todo, image_dtype=image_dtype, workers=n_workers,
                     strict=strict, progress=progress)
    if not part.is_dir() and (dest / st.INDEX_NAME).is_file():
        return dest  # another part finished the rest and published the store meanwhile
    left = [r.id for r, k in zip(plan.records, plan.keys, strict=True)
            if st.shard_meta(part, k) is None and not (part / st.FAILED / f"{k}.json").is_file()]
    if left:
        return None
    return finalize(part, dest, compress=compress, replace=overwrite)
