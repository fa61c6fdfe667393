"""CLI: ``mrsynth complete`` (the work is in :mod:`mrsynth.eval.complete`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mrsynth.eval.commands import MIRROR_HELP

_STATUS = {
    "todo": "[cyan]to write[/cyan]",
    "skip": "[dim]exists, skipped[/dim]",
    "conflict": "[yellow]exists (other checkpoint)[/yellow]",
    "done": "[green]written[/green]",
    "failed": "[bold red]failed[/bold red]",
}


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def plan_table(res: Any, *, title: str) -> Table:
    """One row per synthetic volume: subject, model, direction, kind, output, status."""
    t = Table(title=title, show_lines=False)
    for col in ("subject", "model", "direction", "kind", "output", "status"):
        t.add_column(col)
    done = any(j.status in ("done", "failed") for j in res.jobs)
    if done:
        t.add_column("s", justify="right")
    for j in res.jobs:
        # the status is this module's own markup; everything else comes from file names
        status = _STATUS.get(j.status, escape(str(j.status)))
        if j.status == "failed":
            status += " (below)"
        row = [escape(str(c)) for c in (j.record, j.run.model, j.direction.label,
                                         "validation" if j.validation else "missing",
                                         _rel(j.output, res.out))]
        row.append(status)
        if done:
            row.append(f"{j.seconds:.1f}" if j.status == "done" else "")
        t.add_row(*row)
    return t


def _pm(v: tuple[float, float]) -> str:
    """``mean ± SD``; the mean alone when the SD is undefined (one subject)."""
    m, s = v
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.3f} ± {s:.3f}" if math.isfinite(s) else f"{m:.3f}"


def validation_table(rows: list[dict[str, Any]]) -> Table:
    from mrsynth.eval.volume import VOLUME_METRICS

    t = Table(title="Validation: synthetic vs real volumes (mean ± SD over subjects)")
    for col in ("model", "direction", "subjects", "n", *VOLUME_METRICS.values()):
        t.add_column(col, justify="left" if col in ("model", "direction", "subjects")
                     else "right")
    for r in rows:
        t.add_row(escape(r["model"]), r["direction"],
                  SEEN_LABEL if r.get("seen") else UNSEEN_LABEL, str(r["n"]),
                  *(_pm(r[k]) for k in VOLUME_METRICS))
    return t


SEEN_LABEL = "seen in training"
UNSEEN_LABEL = "unseen"


def seen_note(rows: list[dict[str, Any]], other_sources: Sequence[str] = ()) -> str | None:
    """A warning when some validated subjects were in a run's training or validation split
    (``other_sources``: the runs' training data sets that are not the one completed, where
    a shared label may name another person)."""
    if not any(r.get("seen") for r in rows):
        return None
    note = (f"Rows '{SEEN_LABEL}': subjects in the run's training or validation split "
            "(validation.tsv, run_split). The run learned from them, so their error is no "
            "estimate for new data (usually an optimistic one); quote the 'unseen' rows as "
            "the error to expect on new data"
            + ("." if any(not r.get("seen") for r in rows) else
               " (none here: validate on subjects the run never saw, e.g. its test split)."))
    if other_sources:
        note += (f" Subjects are matched by label, and the run was trained on "
                 f"{', '.join(other_sources)}: if that is another data set, these labels may "
                 "name other people.")
    return note


def other_training_sources(jobs: Sequence[Any], bids_dir: Path) -> list[str]:
    """The data sets the jobs' runs were trained on that are not ``bids_dir``."""
    here = bids_dir.resolve()
    out = set()
    for j in jobs:
        for m in j.run.parts:
            src = (m.run.data_settings or {}).get("source")
            if src and src != "builtin" and Path(src).resolve() != here:
                out.add(str(src))
            elif src == "builtin":
                out.add(src)
    return sorted(out)


def register(app: typer.Typer) -> None:
    @app.command("complete")
    def complete_cmd(
        bids_dir: Path = typer.Argument(..., help="BIDS data set (its root folder)."),
        run: list[Path] = typer.Option(..., "--run",
                                       help="Run directory from `mrsynth train` (repeatable)."),
        out: Path | None = typer.Option(
            None, "--out", help="Derivative data set to write (default: "
            "BIDS_DIR/derivatives/mrsynth)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
        validate: bool = typer.Option(
            False, "--validate", help="Also synthesise contrasts subjects have "
            "(desc-<model>Validation) and score them against the real volumes."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace outputs written from another checkpoint "
            "(and redo those of the same one)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per batch."),
        qc: bool = typer.Option(True, "--qc/--no-qc", help="QC figures and qc.html."),
        mirror: bool = typer.Option(False, "--mirror", help=MIRROR_HELP),
    ) -> None:
        """Synthesise every subject's missing contrasts as a BIDS derivative (and validate)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from mrsynth.eval.complete import command_line, complete_dataset, validation_summary
        from mrsynth.train.speed import resolve_device  # the one device rule

        err = Console(stderr=True)
        con = Console(width=None if sys.stdout.isatty() else 160)
        dev = str(resolve_device(device))
        cmd = command_line(bids_dir, run, out, validate, overwrite, device, batch_size,
                           mirror)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("subjects", total=None)

            def tick(job: Any, done: int, total: int) -> None:
                bar.update(task, total=total, completed=done,
                           description=f"{job.record} {job.direction.label}")

            def log(msg: str) -> None:
                err.print(f"[dim]·[/dim] {escape(msg)}", highlight=False)

            res = complete_dataset(bids_dir, run, out, dry_run=dry_run, validate=validate,
                                   overwrite=overwrite, device=dev, batch_size=batch_size,
                                   qc=qc, command=cmd, log=log, progress=tick,
                                   mirror=mirror)
        if not res.jobs:
            con.print(f"Nothing to do: no subject of {escape(str(bids_dir))} lacks a contrast "
                      "the runs can produce" + (" or has one to validate." if validate else
                                   " (--validate scores subjects that have it)."))
            return
        title = ("Plan (dry run: nothing written)" if dry_run
                 else f"mrsynth complete -> {escape(str(res.out))}")
        con.print(plan_table(res, title=title))
        if dry_run:
            return
        words = {"done": "written", "skip": "skipped", "failed": "failed"}
        con.print(", ".join(f"{n} {words.get(k, k)}" for k, n in sorted(res.counts().items())))
        for j in res.failed:
            con.print(f"[bold red]Failed[/bold red] {escape(str(j.record))} {j.direction.label} "
                      f"({escape(str(j.source))}): {escape(str(j.message))}",
                      highlight=False, soft_wrap=True)
        rows = validation_summary(res.jobs)
        if rows:
            con.print(validation_table(rows))
            note = seen_note(rows, other_training_sources(res.jobs, bids_dir))
            if note:
                con.print(f"[yellow]Note:[/yellow] {escape(note)}", highlight=False,
                          soft_wrap=True)
        if res.validation_tsv:
            con.print(f"Validation metrics: {escape(str(res.validation_tsv))}")
        if res.validation_summary_tsv:
            con.print(f"Validation summary: {escape(str(res.validation_summary_tsv))}")
        if res.qc_html:
            con.print(f"QC page: {escape(str(res.qc_html))}")
        if res.failed:
            err.print(f"[bold red]{len(res.failed)} volume(s) failed[/bold red]; the others "
                      "were written. See the table above.")
            raise typer.Exit(1)
