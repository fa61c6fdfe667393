"""``mrsynth data info`` and ``mrsynth data prepare``."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mrsynth.data import DataWarning
from mrsynth.data.slicing import DEFAULT_SLICES
from mrsynth.errors import DataError

if TYPE_CHECKING:
    from mrsynth.data.info import DatasetInfo

data_app = typer.Typer(
    help="Inspect data sets and prepare normalised training slices.",
    no_args_is_help=True,
)

console = Console()
err_console = Console(stderr=True)

_LAYOUT_HELP = "Force the layout: bids, hcp or folders (default: detect)."


@contextlib.contextmanager
def print_data_warnings(to: Console | None = None) -> Iterator[None]:
    """Show DataWarnings as one-line notices on ``to`` (default stderr) instead of Python's
    warning format."""
    out = to or err_console
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, DataWarning):
                out.print(f"[yellow]Warning:[/yellow] {escape(str(message))}",
                                  highlight=False, soft_wrap=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _split_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def _fmt_range(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return "-"
    return f"{lo:.4g} .. {hi:.4g}"


@data_app.command("info")
def info_cmd(
    path: str = typer.Argument(..., help="Data set directory, `builtin`, or prepared data (a "
                               ".npz file or a store directory)."),
    layout: str | None = typer.Option(None, "--layout", help=_LAYOUT_HELP),
    contrasts: list[str] | None = typer.Option(
        None, "--contrasts", help="Contrasts every subject should have (repeat or comma-separate); "
        "for the folders layout, the names of A and B."),
    n_subjects: int | None = typer.Option(None, "--n-subjects", help="builtin: how many subjects."),
    seed: int = typer.Option(0, "--seed", help="builtin: simulation seed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print each subject's contrasts, grid, voxel size, dtype, intensity range and problems.

    Exits with status 1 when a problem was found (so scripts can check a data set).
    """
    from mrsynth.data.info import inspect_dataset
    from mrsynth.data.store import is_store

    p = Path(path)
    if path != "builtin" and ((p.is_file() and p.suffix == ".npz") or is_store(p)):
        _prepared_info(p, as_json)
        return
    with print_data_warnings():
        info = inspect_dataset(path, layout=layout, contrasts=_split_list(contrasts),
                               n_subjects=n_subjects, seed=seed)
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
    else:
        _print_info_table(info)
    if info.n_problems:
        raise DataError(
            f"{info.n_problems} problem(s) found in {info.source} (listed above). Fix or remove "
            "the files named there: `mrsynth data prepare` skips the subjects they belong to "
            "(with --strict it stops at the first).",
            exit_code=1,
        )


def _print_info_table(info: DatasetInfo) -> None:
    out = _wide(console)
    table = Table(
        title=f"{escape(str(info.source))}: {info.layout} layout, {len(info.subjects)} subject(s), "
        f"contrasts {', '.join(info.contrasts)}",
        title_justify="left",
    )
    for col in ("subject", "contrast", "grid", "voxel (mm)", "dtype", "orient.", "range",
                "brain slices", "status"):
        table.add_column(col, overflow="fold")
    messages: list[str] = []

    def ref(msg: str) -> str:
        messages.append(msg)
        return f"[red]problem [{len(messages)}][/red]"

    for s in info.subjects:
        subj_status = [ref(p) for p in s.problems] + [f"({escape(n)})" for n in s.notes]
        for i, c in enumerate(s.contrasts):
            status = [ref(c.problem)] if c.problem else []
            if i == 0:
                status += subj_status
            table.add_row(
                escape(s.id) if i == 0 else "",
                c.contrast,
                "x".join(map(str, c.shape)) if c.shape else "-",
                "x".join(f"{v:g}" for v in c.voxel_size) if c.voxel_size else "-",
                c.dtype or "-",
                c.orientation or "-",
                _fmt_range(c.min, c.max),
                str(s.brain_slices) if i == 0 and s.brain_slices is not None else "",
                "; ".join(status) or "ok",
            )
        if not s.contrasts:
            table.add_row(escape(s.id), "-", "-", "-", "-", "-", "-", "",
                          "; ".join(subj_status))
        table.add_section()
    out.print(table)
    for i, m in enumerate(messages, 1):
        out.print(f"[red][{i}][/red] {escape(m)}", highlight=False, soft_wrap=True)
    for n in info.notes:
        out.print(f"[yellow]Note:[/yellow] {escape(n)}", highlight=False, soft_wrap=True)
    if not info.n_problems:
        out.print("[green]No problems found.[/green]")


def _wide(con: Console) -> Console:
    """Tables are wide; when writing to a file or pipe use 150 columns instead of 80."""
    if con.is_terminal:
        return con
    return Console(file=con.file, width=150)


def _prepared_info(path: Path, as_json: bool) -> None:
    import numpy as np

    from mrsynth.data.prepared import load_prepared
    from mrsynth.data.store import read_index, store_bytes

    d = load_prepared(path, verify=True)  # a store: every shard hashed, whatever its size
    names, first, counts = np.unique(d.subject, return_index=True, return_counts=True)
    store = path.is_dir()
    summary = {
        "file": str(path),
        "format": "store" if store else "npz",
        "image_dtype": read_index(path)["image_dtype"] if store else "float32",
        "bytes": store_bytes(path) if store else path.stat().st_size,
        "n_slices": len(d),
        "size": list(d.size),
        "contrasts": d.contrasts,
        "splits": {s: int((d.split == s).sum()) for s in sorted(set(d.split.tolist()))},
        "subjects": {
            str(s): {"split": str(d.split[i]), "n_slices": int(n)}
            for s, i, n in zip(names, first, counts, strict=True)
        },
        "settings": d.settings,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    st = d.settings
    out = _wide(console)
    table = Table(title=f"{escape(str(path))}: {len(d)} slices of {d.size[0]}x{d.size[1]}, "
                  f"contrasts {', '.join(d.contrasts)}", title_justify="left")
    for col in ("subject", "split", "slices", "paired"):
        table.add_column(col)
    for s, v in summary["subjects"].items():
        paired = bool(d.paired[d.subject == s].all())
        table.add_row(escape(s), v["split"], str(v["n_slices"]), "yes" if paired else "no")
    out.print(table)
    out.print(
        f"source {st.get('source')} ({st.get('layout')}), {st.get('plane') or 'axial'} "
        f"slices {st.get('slices')} step "
        f"{st.get('slice_step')}, downsample {st.get('downsample')}, seed {st.get('seed')}, "
        f"normalisation {st.get('normalisation', {}).get('method')} "
        f"{st.get('normalisation', {}).get('percentiles')}", highlight=False)


@data_app.command("prepare")
def prepare_cmd(
    source: str = typer.Argument(..., help="Data set directory (BIDS, HCP-style, or "
                                 "trainA/trainB/testA/testB), or `builtin`."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output: a store directory (e.g. data.mrs; written subject by "
        "subject, resumable, read lazily) or one .npz file (read whole)."),
    contrasts: tuple[str, str] = typer.Option(
        ("T1w", "T2w"), "--contrasts", help="Source and target contrast (A B)."),
    extra_contrast: list[str] | None = typer.Option(
        None, "--extra-contrast", help="Keep another contrast too (repeatable), e.g. FLAIR."),
    size: tuple[int, int] = typer.Option((256, 256), "--size", help="Slice size H W."),
    slices: str = typer.Option(
        DEFAULT_SLICES, "--slices",
        help="Axial slices: an index (120), indices (100,120), a range (60:100, end exclusive) "
        "or brain:F (slices with at least a fraction F of brain voxels)."),
    slice_step: int = typer.Option(1, "--slice-step", help="Keep every k-th selected slice."),
    plane: str = typer.Option(
        "axial", "--plane", help="Slice plane: axial, coronal or sagittal (one grid for all, "
        "block-averaged in the axial plane by --downsample; models of the three planes can "
        "be fused by `translate`/`complete` with several --run)."),
    downsample: int = typer.Option(
        1, "--downsample", help="In-plane block-average factor before crop/pad (fast CPU runs)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction",
                                        help="Fraction of subjects in the test split."),
    test_subjects: list[str] | None = typer.Option(
        None, "--test-subjects", help="Subjects for the test split (repeat or comma-separate); "
        "overrides --test-fraction."),
    split_from: Path | None = typer.Option(
        None, "--split-from", help="Reuse the test subjects of an earlier prepared file (.npz) "
        "or store, a JSON list or a text file; and its validation subjects, unless "
        "--val-fraction or --val-subjects is given."),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Fraction of the non-test subjects kept out of training as "
        "a validation split (per-epoch scores, best checkpoint); 0: none."),
    val_subjects: list[str] | None = typer.Option(
        None, "--val-subjects", help="Subjects for the validation split (repeat or "
        "comma-separate); overrides --val-fraction."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subject split (and the builtin set)."),
    layout: str | None = typer.Option(None, "--layout", help=_LAYOUT_HELP),
    unpaired: bool = typer.Option(
        False, "--unpaired", help="Keep subjects that lack one contrast (for CycleGAN/UNIT)."),
    strict: bool = typer.Option(
        False, "--strict", help="Fail on a subject that cannot be prepared or lacks a contrast "
        "(default: report and skip it)."),
    resample: bool = typer.Option(
        False, "--resample", help="Interpolate contrasts onto the first one's grid when grids "
        "differ."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out (once the new one is complete), "
        "or restart an unfinished store prepared with other options."),
    n_subjects: int | None = typer.Option(
        None, "--n-subjects", help="builtin: number of simulated subjects (default 20)."),
    resolution: float | None = typer.Option(
        None, "--resolution", help="builtin: voxel size in mm, 1 or 2 (default 2)."),
    compress: bool = typer.Option(
        False, "--compress", help="Compressed NPZ (smaller, loads several times slower)."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="Subjects prepared at once, in separate processes "
        "(default: the cores)."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: prepare only part i of n (n machines filling one store on "
        "a shared file system); the last part to finish writes the index."),
    finalize: bool = typer.Option(
        False, "--finalize", help="Only write the index of a store whose --shard parts have "
        "all run."),
    dtype: str = typer.Option(
        "float16", "--dtype", help="Images in a store: float16 (half the disk; changes "
        "intensities by <= 2.4e-4) or float32. A .npz is always float32."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Write normalised, subject-split slices (a store directory, or one .npz file).

    A store's preparation that was interrupted continues when the same command is run
    again; a subject that cannot be prepared is reported and skipped (see --strict).
    """
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.data.prepared import load_prepared

    cs = list(contrasts) + [c for c in (_split_list(extra_contrast) or []) if c not in contrasts]
    t0 = time.perf_counter()
    with print_data_warnings():
        path = prepare_dataset(
            source, out, contrasts=cs, size=size, slices=slices, slice_step=slice_step,
            downsample=downsample, test_fraction=test_fraction,
            test_subjects=_split_list(test_subjects), split_from=split_from,
            val_fraction=val_fraction, val_subjects=_split_list(val_subjects), seed=seed,
            layout=layout, unpaired=unpaired, strict=strict, resample=resample,
            overwrite=overwrite, n_subjects=n_subjects, resolution=resolution, compress=compress,
            progress=not quiet, workers=workers, shard=shard, finalize=finalize,
            image_dtype=dtype, plane=plane,
        )
    elapsed = time.perf_counter() - t0
    if quiet:
        return
    if path is None:  # this --shard part is done, others are not
        from mrsynth.data.store import partial_dir, progress_text

        console.print(
            f"Part {shard} of {escape(str(out))} done in {elapsed:.1f} s "
            f"({progress_text(partial_dir(out))}); "
            "the last part to finish writes the index (or run the same command with "
            "--finalize once every part has run).", highlight=False, soft_wrap=True)
        return
    d = load_prepared(path, verify=False)  # just written and checked
    n_train = int((d.split == "train").sum())
    n_test = int((d.split == "test").sum())
    n_val = int((d.split == "val").sum())
    st = d.settings
    val_txt = (f", {len(st['val_subjects'])} val ({', '.join(st['val_subjects'])})"
               if st.get("val_subjects") else "")
    kind = (f"store, {dtype}" if path.is_dir() else "one .npz file")
    failed = st.get("failed_subjects") or {}
    failed_txt = f"; {len(failed)} subject(s) failed and were skipped" if failed else ""
    console.print(
        f"Wrote {escape(str(path))} ({kind}): {len(d)} slices ({n_train} train, {n_val} val, "
        f"{n_test} test) of "
        f"{d.size[0]}x{d.size[1]}, contrasts {', '.join(d.contrasts)}, "
        f"{len(st['train_subjects'])} train{val_txt} / {len(st['test_subjects'])} test "
        f"subjects (test: {', '.join(st['test_subjects']) or 'none'}){failed_txt} in "
        f"{elapsed:.1f} s.",
        highlight=False, soft_wrap=True,
    )


@data_app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="Prepared data: a .npz file or a store directory."),
    dest: Path = typer.Argument(..., help="Output: a store directory, or a .npz file."),
    dtype: str = typer.Option("float16", "--dtype",
                              help="Images in the store: float16 or float32."),
    compress: bool = typer.Option(False, "--compress", help="Compressed .npz output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary."),
) -> None:
    """Convert prepared data between one .npz file and a store (either way).

    To a store: one shard per subject. To a .npz: the store is verified, then written one
    shard at a time (the file holds the same arrays and checksums `prepare` writes).
    """
    from mrsynth.data.prepared import load_prepared
    from mrsynth.data.store import (
        IMAGE_DTYPES,
        is_store,
        open_store,
        store_to_npz,
        write_store_from,
    )
    from mrsynth.errors import ConfigError
    from mrsynth.utils import check_can_write, check_writable

    if dtype not in IMAGE_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(IMAGE_DTYPES)}, not {dtype!r}.")
    check_can_write(dest, overwrite)
    check_writable(dest, directory=dest.suffix != ".npz")
    t0 = time.perf_counter()
    if dest.suffix == ".npz":
        if not is_store(src):
            raise ConfigError(f"{src} is not a store; `data convert` writes a .npz from a store "
                              "(to copy a .npz, copy the file).")
        open_store(src, verify=True)  # do not copy damage into the new file
        store_to_npz(src, dest, compress=compress)
    else:
        write_store_from(load_prepared(src), dest, image_dtype=dtype)
    if not quiet:
        console.print(f"Wrote {escape(str(dest))} from {escape(str(src))} in "
                      f"{time.perf_counter() - t0:.1f} s.", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
