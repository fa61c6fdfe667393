"""``mrsynth demo``: the whole study in one command (what ``make demo`` runs).

Stages, each resumed rather than redone when its final output exists:

1. **prepare** the built-in simulated set (or ``--data PATH``, a BIDS/HCP data
   set) -> ``OUT/data/prepared.npz``, with the test subjects drawn from ``--seed`` or
   given (``--test-subjects``) and a validation split (``--val-fraction`` of at least
   :data:`VAL_MIN_SUBJECTS` non-test subjects, or ``--val-subjects``) kept out of
   training for the per-epoch learning curves and the best-epoch checkpoint;
2. **train** all six models with the ``cpu-small`` preset -> ``OUT/runs/<model>/``
   (done when its ``metrics.json`` says ``completed``; an interrupted run resumes
   from its checkpoint);
3. **evaluate** them on the test split -> ``OUT/eval/`` (done when ``eval.json``
   exists; redone when any run was (re)trained in this invocation), each run at its best
   validation epoch (``--checkpoint best``) when there is a validation split;
4. **report** -> ``OUT/report.html`` (same rule).

Then it prints the report's path and the summary table. ``OUT/demo.json``
records each invocation's stage wall times (a resumed invocation is fast).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mrsynth.errors import ConfigError
from mrsynth.utils import atomic_write_json

#: Prepared slice size and in-plane downsampling per source: the built-in set is
#: simulated at 2 mm (91 x 109 voxels in-plane); real data is usually 1 mm.
BUILTIN_GEOMETRY = {"size": 112, "downsample": 1}
REAL_GEOMETRY = {"size": 128, "downsample": 2}
DEFAULT_SUBJECTS = 10
#: Share of the non-test subjects kept for validation (per-epoch scores, best checkpoint):
#: two of eight on the built-in set.
DEFAULT_VAL_FRACTION = 0.2
#: ``--val-fraction`` keeps a validation split only with at least this many non-test
#: subjects. With fewer, a validation split costs the training set a large share of its
#: subjects (one of five on the shared data) and its best epoch is a noisy draw on one
#: brain (a template, on the shared data), so every subject trains and the last epoch is
#: evaluated; ``--val-subjects`` keeps named subjects out anyway.
VAL_MIN_SUBJECTS = 8
#: Training iterations per epoch in the demo (the cpu-small preset's 10 epochs are kept), per
#: model where it differs from the default: chosen with the presets' other cpu-small settings
#: on a validation split by benchmarks/tune_cpu_small.py, at about the compute of six models x
#: 1,000 single-patch steps (the 10-minute budget on a 2-core CPU; docs/evaluation.md). Simple's
#: steps cost a few milliseconds, so it gets more of them; the paired U-Net models learn from
#: whole slices, so a quarter of the steps sees the pixels of 100 64-px patches.
#: ``--steps-per-epoch N`` caps every model at N instead (0: full epochs).
DEFAULT_STEPS_PER_EPOCH = 100
STEPS_PER_EPOCH: dict[str, int] = {"simple": 300, "generators_s": 25, "pix2pix": 25,
                                   "cyclegan_s": 25, "cyclegan": 25}
#: torch CPU threads in the demo. Its tensors are tiny (64 px, batch 1), so a second thread
#: gains little, while on a busy machine two OpenMP threads per process are ~10x slower than
#: one (measured on the shared 2-core machine: 57 vs 640 ms per CycleGAN step).
DEFAULT_THREADS = 1


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def default_jobs(device: str) -> int:
    """Models trained at once: on a CPU one process per core's worth of torch threads
    (each model's tensors are too small for one process to use more than a thread or
    two well), at most 4; on a GPU one (the models take turns on the device)."""
    from mrsynth.train.speed import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    from mrsynth.utils import available_cores

    return max(1, min(4, available_cores() // max(1, torch_threads())))


def eval_thread_count(device: str, jobs: int | None, threads: int) -> int:
    """Torch threads for the evaluation stage: the cores that ``jobs`` training processes of
    ``threads`` threads each held (evaluation runs alone), at most the available cores; on a
    GPU, ``threads`` (the device does the work)."""
    from mrsynth.train.speed import resolve_device
    from mrsynth.utils import available_cores

    if resolve_device(device).type != "cpu":
        return threads
    n_jobs = jobs if jobs else default_jobs(device)
    return max(1, min(available_cores(), n_jobs * threads))


def _train_worker_init() -> None:
    """A training worker: killed with the demo, and in its own process group, so a Ctrl-C
    at the terminal reaches only the demo, which then sends each worker one SIGTERM (a
    trainer that got both would take the second as "stop without saving")."""
    from mrsynth.utils import die_with_parent

    die_with_parent()
    os.setpgrp()


def _train_job(model: str, cfg: dict[str, Any], prepared: str, run_dir: str, resume: bool,
               threads: int) -> float:
    """One demo model trained in a worker process (no progress bars: several interleave)."""
    import torch

    from mrsynth.train.trainer import train

    torch.set_num_threads(threads)
    cfg = {**cfg, "train": {**cfg["train"], "progress": False}}
    t = time.perf_counter()
    train(cfg, prepared, run_dir, resume=resume, console=Console(stderr=True, quiet=True))
    return time.perf_counter() - t


def train_in_parallel(todo: Sequence[tuple[str, dict[str, Any], Path, bool]], prepared: Path,
                      jobs: int, threads: int) -> Iterator[tuple[str, float]]:
    """Train the demo's models ``jobs`` at a time in spawned processes; yield (model,
    seconds) as each finishes. A model that fails stops the others (their checkpoints stay,
    so rerunning the demo resumes them) and its error is raised here. Each run is the same
    computation as in the demo's own process (same config, seed and thread count), so its
    weights are too."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                               initializer=_train_worker_init)
    try:
        pending = {pool.submit(_train_job, m, cfg, str(prepared), str(rd), resume, threads): m
                   for m, cfg, rd, resume in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                m = pending.pop(fut)
                yield m, fut.result()
    except BaseException:
        # stopped (Ctrl-C, SIGTERM) or a model failed: the running trainers checkpoint on
        # SIGTERM and exit, so a rerun resumes them
        import signal

        for proc in list(getattr(pool, "_processes", {}).values()):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stage(console: Console, i: int, n: int, title: str) -> float:
    console.rule(f"[bold]Stage {i}/{n}: {title}", align="left")
    return time.perf_counter()


def _say(console: Console, text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _done(console: Console, t0: float, what: str) -> float:
    dt = time.perf_counter() - t0
    _say(console, f"[green]✓[/green] {what} ({dt:.1f} s)")
    return dt


def _run_completed(run_dir: Path, epochs: int) -> bool:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("status") == "completed" and int(m.get("epochs_completed", 0)) >= epochs


def demo_steps(model: str, steps: int | None) -> int | None:
    """Steps per epoch the demo trains ``model`` for: ``steps`` when given (0: full epochs,
    returned as None), else the model's demo default."""
    if steps is None:
        return STEPS_PER_EPOCH.get(model, DEFAULT_STEPS_PER_EPOCH)
    return steps or None


def _config(model: str, epochs: int | None, steps: int | None, device: str,
            seed: int) -> dict[str, Any]:
    from mrsynth.train.config import default_config, resolve_config

    base = default_config(model, "cpu-small")
    over: dict[str, Any] = {"device": device, "seed": seed, "train.progress": True}
    if epochs is not None:
        over["train.epochs"] = epochs
        decay = base["train"].get("decay_start_epoch")
        if decay is not None and decay > epochs:
            over["train.decay_start_epoch"] = None
    over["train.max_steps_per_epoch"] = demo_steps(model, steps)
    return resolve_config(model, "cpu-small", over)


def _subset_bids(src: Path, dest: Path, n: int, keep: Sequence[str] = (),
                 val: Sequence[str] = ()) -> Path:
    """A BIDS view of ``n`` subjects (symbolic links), for ``--subjects``: those named in
    ``keep`` (the test subjects) and ``val`` (the validation subjects), then the first
    others in name order."""
    subs = sorted(p for p in src.glob("sub-*") if p.is_dir())
    if not subs:
        raise ConfigError(
            f"--subjects needs a BIDS data set (sub-*/ folders); {src} has none. Leave "
            "--subjects out to use every subject."
        )
    if n < 2:
        raise ConfigError("--subjects must be at least 2 (one to train on, one to test).")
    names = {s.name for s in subs}
    wanted = {k if k.startswith("sub-") else f"sub-{k}" for k in keep}
    vals = {k if k.startswith("sub-") else f"sub-{k}" for k in val} - wanted
    for flag, group in (("--test-subjects", wanted), ("--val-subjects", vals)):
        missing = sorted(group - names)
        if missing:
            raise ConfigError(
                f"{flag} {', '.join(missing)} not found in {src}; subjects: "
                f"{', '.join(s.name for s in subs)}."
            )
    if len(wanted) + len(vals) >= n:
        raise ConfigError(
            f"--subjects {n} leaves no training subject besides the {len(wanted)} test "
            f"and {len(vals)} validation subject(s); raise --subjects."
        )
    first = wanted | vals
    subs = [s for s in subs if s.name in first] + [s for s in subs if s.name not in first]
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name in ("dataset_description.json", "participants.tsv"):
            link = dest / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    for s in subs[:n]:
        link = dest / s.name
        if not link.exists():
            link.symlink_to(s.resolve(), target_is_directory=True)
    return dest


def _same_setting(key: str, old: Any, new: Any) -> bool:
    """Whether a stored demo setting equals this invocation's. The data folder is compared
    as a resolved path: the same folder named relative to another working directory (or
    stored relative by an older version) is the same data."""
    if key == "data" and isinstance(old, str) and old != new and "builtin" not in (old, new):
        return Path(old).resolve() == Path(new).resolve()
    return old == new


def _check_same_settings(root: Path, settings: dict[str, Any]) -> None:
    """Resuming only makes sense with the data settings the directory was started with."""
    path = root / "demo-settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in settings if not _same_setting(k, old.get(k), settings[k])]
        if diff:
            what = ", ".join(f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in diff)
            raise ConfigError(
                f"{root} holds a demo prepared with other settings ({what}). Rerun with the "
                "same options to resume it, or choose another --out (or delete it) to start over."
            )
    else:
        atomic_write_json(path, settings)


def run_demo(
    out: str | Path = "demo-out",
    *,
    data: str = "builtin",
    epochs: int | None = None,
    subjects: int | None = None,
    models: Sequence[str] | None = None,
    size: int | None = None,
    downsample: int | None = None,
    slice_step: int = 1,
    steps: int | None = None,
    device: str = "auto",
    c2st_steps: int = 200,
    seed: int = 0,
    threads: int | None = DEFAULT_THREADS,
    jobs: int | None = None,
    test_subjects: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_subjects: Sequence[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume) the demo in ``out``; returns paths and stage timings.

    ``val_subjects`` names the validation subjects (then ``val_fraction`` is not used).

    ``threads`` sets torch's CPU threads for every stage (None or 0: torch's default, one
    per core); the previous setting is restored afterwards. ``jobs`` models train at once
    in separate processes (None or 0: :func:`default_jobs`; 1: one after the other in this
    process).
    """
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, data=data, epochs=epochs, subjects=subjects, models=models,
                         size=size, downsample=downsample, slice_step=slice_step, steps=steps,
                         device=device, c2st_steps=c2st_steps, seed=seed, jobs=jobs,
                         test_subjects=test_subjects, val_fraction=val_fraction,
                         val_subjects=val_subjects, console=console)
    finally:
        torch.set_num_threads(old_threads)


def _run_demo(
    out: str | Path,
    *,
    data: str,
    epochs: int | None,
    subjects: int | None,
    models: Sequence[str] | None,
    size: int | None,
    downsample: int | None,
    slice_step: int,
    steps: int | None,
    device: str,
    c2st_steps: int,
    seed: int,
    jobs: int | None,
    test_subjects: Sequence[str] | None,
    val_fraction: float,
    val_subjects: Sequence[str] | None,
    console: Console | None,
) -> dict[str, Any]:
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.eval.evaluate import evaluate
    from mrsynth.eval.report import build_report
    from mrsynth.models.base import model_names
    from mrsynth.train.trainer import train

    con = console or Console(stderr=True)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    names = list(models) if models else model_names()
    unknown = [m for m in names if m not in model_names()]
    if unknown:
        raise ConfigError(
            f"Unknown model(s) {', '.join(unknown)}; available: {', '.join(model_names())}."
        )
    builtin = data == "builtin"
    geo = dict(BUILTIN_GEOMETRY if builtin else REAL_GEOMETRY)
    if size is not None:
        geo["size"] = size
    if downsample is not None:
        geo["downsample"] = downsample
    tests = sorted(test_subjects) if test_subjects else None
    vals = sorted(val_subjects) if val_subjects else None
    settings: dict[str, Any] = {"data": "builtin" if builtin else str(Path(data).resolve()),
                                "subjects": subjects, "size": geo["size"],
                                "downsample": geo["downsample"], "slice_step": slice_step,
                                "seed": seed}
    # recorded only when used, so demo directories from before these options still resume
    if tests:
        settings["test_subjects"] = tests
    if vals:
        settings["val_subjects"] = vals
    elif val_fraction:
        settings["val_fraction"] = float(val_fraction)
    _check_same_settings(root, settings)
    timings: dict[str, float] = {}
    n_stages = 4
    t_all = time.perf_counter()

    # ---- 1. prepare
    prepared = root / "data" / "prepared.npz"
    t0 = _stage(con, 1, n_stages, f"prepare data ({'built-in simulated set' if builtin else data})")
    if prepared.is_file():
        _say(con, f"{prepared} exists; reusing it.")
    else:
        source: str | Path = "builtin"
        opts: dict[str, Any] = {}
        if builtin:
            opts["n_subjects"] = subjects or DEFAULT_SUBJECTS
        else:
            source = Path(data)
            if not source.is_dir():
                raise ConfigError(f"--data {data}: no such directory (a BIDS or HCP data set).")
            if subjects is not None:
                source = _subset_bids(source, root / "data" / "subset", subjects, tests or (),
                                      vals or ())
        from mrsynth.data.commands import print_data_warnings

        with print_data_warnings(con):
            prepare_dataset(
                source, prepared, contrasts=("T1w", "T2w"), size=(geo["size"], geo["size"]),
                downsample=geo["downsample"], slice_step=slice_step, seed=seed, progress=True,
                test_subjects=tests, val_fraction=0.0 if vals else val_fraction,
                val_subjects=vals, val_min_subjects=VAL_MIN_SUBJECTS, **opts,
            )
    timings["prepare_s"] = _done(con, t0, f"prepared slices: {prepared}")

    # ---- 2. train
    t0 = _stage(con, 2, n_stages, f"train {len(names)} models (cpu-small preset)")
    run_dirs = []
    todo: list[tuple[str, dict[str, Any], Path, bool]] = []
    for i, m in enumerate(names, start=1):
        rd = root / "runs" / m
        run_dirs.append(rd)
        cfg = _config(m, epochs, steps, device, seed)
        ep = int(cfg["train"]["epochs"])
        if _run_completed(rd, ep):
            _say(con, f"[{i}/{len(names)}] {m}: already trained ({ep} epochs); reusing it.")
            continue
        resume = (rd / "config.json").is_file()
        _say(con, f"[{i}/{len(names)}] {m}: {'resuming' if resume else 'training'} {ep} epoch(s)")
        todo.append((m, cfg, rd, resume))
    trained_now = bool(todo)
    n_jobs = min(jobs if jobs else default_jobs(device), len(todo))
    if n_jobs > 1:
        _say(con, f"  {n_jobs} models at a time, each in its own process "
                  f"({torch_threads()} torch thread(s) each); progress per model as it ends")
        for m, secs in train_in_parallel(todo, prepared, n_jobs, torch_threads()):
            timings[f"train_{m}_s"] = secs
            _say(con, f"[green]✓[/green] {m} trained ({secs:.1f} s)")
    else:
        for m, cfg, rd, resume in todo:
            tm = time.perf_counter()
            train(cfg, prepared, rd, resume=resume, console=con)
            timings[f"train_{m}_s"] = _done(con, tm, f"{m} trained")
    timings["train_s"] = _done(con, t0, "all models trained")

    # ---- 3. evaluate
    ev = root / "eval"
    t0 = _stage(con, 3, n_stages, "evaluate on the test split")
    if (ev / "eval.json").is_file() and not trained_now:
        _say(con, f"{ev} exists; reusing it.")
    else:
        from mrsynth.train.speed import resolve_device

        # each run at its best validation epoch when every run was validated (the test split
        # chooses nothing); else the last epoch
        which = ("best" if all((rd / "checkpoints" / "best").is_dir() for rd in run_dirs)
                 else "latest")
        _say(con, f"  checkpoints: {which}" + (" (the epoch with the best validation score)"
                                               if which == "best" else ""))
        # evaluation runs alone: on a CPU it gets the threads of every training job at once
        # (C2ST and inference are 2.4x faster with two threads than one on 2 cores)
        import torch

        train_threads = torch_threads()
        eval_threads = eval_thread_count(device, jobs, train_threads)
        torch.set_num_threads(eval_threads)
        if eval_threads != train_threads:
            _say(con, f"  {eval_threads} torch thread(s)")
        try:
            evaluate(run_dirs, prepared, ev, device=str(resolve_device(device)),
                     c2st_steps=c2st_steps,
                     seed=seed, overwrite=True, checkpoint=which,
                     log=lambda s: _say(con, f"  {s}"))
        finally:
            torch.set_num_threads(train_threads)
        trained_now = True
    timings["evaluate_s"] = _done(con, t0, f"evaluation: {ev}")

    # ---- 4. report
    report = root / "report.html"
    t0 = _stage(con, 4, n_stages, "report")
    if report.is_file() and not trained_now:
        _say(con, f"{report} exists; reusing it.")
    else:
        build_report(ev, report)
    timings["report_s"] = _done(con, t0, f"report: {report}")
    timings["total_s"] = time.perf_counter() - t_all
    log_path = root / "demo.json"
    try:
        history = json.loads(log_path.read_text()).get("invocations", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        history = []
    import torch

    history.append({"finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                    "timings_s": timings, "torch_threads": torch.get_num_threads(),
                    "models": names, "epochs": epochs, "jobs": n_jobs,
                    "steps_per_epoch": {m: demo_steps(m, steps) for m in names}})
    atomic_write_json(log_path, {"data": data, "geometry": geo, "subjects": subjects,
                                 "invocations": history})
    return {"report": report, "eval": ev, "prepared": prepared, "runs": run_dirs,
            "timings": timings}


def summary_table(eval_dir: Path) -> Table:
    """Mean ± std of MAE, PSNR, MI and SSIM per model and direction (primary region)."""
    from mrsynth.eval.metrics import METRIC_LABELS
    from mrsynth.eval.report import read_csv

    man = json.loads((eval_dir / "eval.json").read_text())
    region = man.get("primary_region", "image")
    rows = [r for r in read_csv(eval_dir / "summary.csv") if r["region"] == region]
    metrics = ("mae", "psnr", "mi", "ssim")
    where = "whole image" if region == "image" else "brain mask"
    table = Table(title=f"Test-set metrics (z-scored, {where}; mean ± std)")
    table.add_column("model")
    table.add_column("kind")
    table.add_column("direction")
    for m in metrics:
        table.add_column(METRIC_LABELS[m], justify="right")
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        if r["metric"] in metrics:
            key = (r["model"], r.get("kind", "model"), r["direction"])
            cells.setdefault(key, {})[r["metric"]] = (
                f"{float(r['mean']):.3f} ± {float(r['std']):.3f}"
            )
    for (model, kind, direction), c in cells.items():
        table.add_row(model, kind, direction, *[c.get(m, "n/a") for m in metrics],
                      style="dim" if kind == "baseline" else None)
    return table


def verdict_text(eval_dir: Path) -> list[str]:
    """The report's opening verdict (which models beat the lookup table inside the brain)."""
    from mrsynth.eval.report import read_csv
    from mrsynth.eval.stats import verdict_lines

    path = eval_dir / "verdict.csv"
    if not path.is_file():
        return []
    man = json.loads((eval_dir / "eval.json").read_text())
    rows = read_csv(path)
    directions = list(man.get("directions", {})) or sorted({r["direction"] for r in rows})
    return verdict_lines(rows, directions)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo-out"), "--out", help="Output directory."),
        data: str = typer.Option("builtin", "--data",
                                 help="builtin (simulated) or a BIDS/HCP data set directory."),
        epochs: int | None = typer.Option(None, "--epochs", min=1,
                                          help="Epochs per model (default: the preset's)."),
        subjects: int | None = typer.Option(None, "--subjects", min=1,
                                            help="Number of subjects to use."),
        models: str | None = typer.Option(None, "--models",
                                          help="Comma-separated subset of models."),
        size: int | None = typer.Option(None, "--size", min=8, help="Prepared slice size."),
        downsample: int | None = typer.Option(None, "--downsample", min=1,
                                              help="In-plane downsampling before cropping."),
        slice_step: int = typer.Option(1, "--slice-step", min=1, help="Use every k-th slice."),
        steps: int | None = typer.Option(
            None, "--steps-per-epoch", min=0,
            help=f"Training iterations per epoch of every model (default: "
            f"{DEFAULT_STEPS_PER_EPOCH}; "
            + ", ".join(f"{m} {n}" for m, n in STEPS_PER_EPOCH.items()) + "; 0: full epochs)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        c2st_steps: int = typer.Option(200, "--c2st-steps", min=1),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(DEFAULT_THREADS, "--threads", min=0,
                                    help="CPU threads for torch (0: one per core)."),
        jobs: int = typer.Option(
            0, "--jobs", min=0, help="Models trained at once, each in its own process (0: "
            "on a CPU, cores / --threads, at most 4; on a GPU 1)."),
        test_subjects: str | None = typer.Option(
            None, "--test-subjects", help="Comma-separated test subjects (default: drawn from "
            "--seed), e.g. sub-ms19,sub-fg6692."),
        val_fraction: float = typer.Option(
            DEFAULT_VAL_FRACTION, "--val-fraction", min=0.0, max=0.99,
            help="Share of the non-test subjects kept out of training for validation "
            f"(learning curves, best epoch), when there are at least {VAL_MIN_SUBJECTS} of "
            "them; 0: none."),
        val_subjects: str | None = typer.Option(
            None, "--val-subjects", help="Comma-separated validation subjects instead of "
            "--val-fraction, e.g. sub-ms07 (real subjects: a template is a poor stand-in)."),
    ) -> None:
        """The whole study in one command: prepare, train all models, evaluate, report."""
        console = Console(stderr=True)
        res = run_demo(
            out, data=data, epochs=epochs, subjects=subjects,
            models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
            size=size, downsample=downsample, slice_step=slice_step, steps=steps,
            device=device, c2st_steps=c2st_steps, seed=seed, threads=threads, jobs=jobs,
            test_subjects=[s.strip() for s in test_subjects.split(",") if s.strip()]
            if test_subjects else None,
            val_fraction=val_fraction,
            val_subjects=[s.strip() for s in val_subjects.split(",") if s.strip()]
            if val_subjects else None,
            console=console,
        )
        out_console = Console() if sys.stdout.isatty() else Console(width=120)
        out_console.print(summary_table(res["eval"]))
        for line in verdict_text(res["eval"]):
            out_console.print(f"Verdict: {escape(line)}", highlight=False, soft_wrap=True)
        typer.echo(f"Report: {res['report'].resolve()}")
        typer.echo(f"Total time: {res['timings']['total_s']:.1f} s")
