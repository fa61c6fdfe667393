"""``mrsynth study create | add-reader | serve | results``."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from mrsynth.errors import ConfigError

study_app = typer.Typer(
    help="Perceptual study: readers label images as real or synthetic in a web browser.",
    no_args_is_help=True,
)
console = Console()


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")


@study_app.command("create")
def create(
    real: Path = typer.Option(
        ..., "--real", help="Prepared data (a store or a .npz file; its test split) or a "
        "directory of real images."
    ),
    synthetic: list[str] = typer.Option(
        ..., "--synthetic", help="NAME=DIR of one model's synthetic images; repeat per model."
    ),
    out: Path = typer.Option(..., "--out", help="The study file to write (SQLite, e.g. study.db)."),
    n_real: int = typer.Option(
        96, "--n-real", help="Real images (single mode), split evenly over contrasts."
    ),
    n_synthetic: int = typer.Option(
        72,
        "--n-synthetic",
        help="Synthetic images (2AFC: pairs), split evenly over models x contrasts.",
    ),
    n_practice: int = typer.Option(
        0, "--n-practice", help="Practice trials shown first with feedback, not scored."
    ),
    mode: str = typer.Option(
        "single",
        "--mode",
        help="single (one image: real or synthetic?) or 2afc (pick the real one of two).",
    ),
    scale: str = typer.Option(
        "confidence",
        "--scale",
        help="confidence (Real/Synthetic + optional 1-5), binary, or six "
        "(6-point scale, surely real .. surely synthetic).",
    ),
    exposure_ms: int = typer.Option(
        0, "--exposure-ms", help="Show each image this long, then hide it (0 = unlimited)."
    ),
    pairing: str = typer.Option(
        "matched",
        "--pairing",
        help="2AFC: pair with the real image of the same slice (matched) "
        "or of another slice (unmatched).",
    ),
    contrast: list[str] = typer.Option(
        [], "--contrast", help="Contrasts to use (repeat); default: those of the synthetic images."
    ),
    display_size: int = typer.Option(
        512, "--display-size", help="Every image is rendered to this many pixels square."
    ),
    window: str = typer.Option(
        "robust",
        "--window",
        help="robust (per-image 0.5-99.5 percentile of the foreground) "
        "or fixed ([-1, 1] normalised units).",
    ),
    rotate: str = typer.Option(
        "auto",
        "--rotate",
        help="Quarter turns for display: auto (arrays in RAS layout turned so anterior is "
        "up), 0, 90, 180, 270.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling and of each reader's order."),
    title: str = typer.Option("Real or synthetic?", "--title", help="Title shown to readers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing study file."),
) -> None:
    """Sample balanced trials, render every image once, and write the study file."""
    from mrsynth.study.create import create_study, parse_synthetic
    from mrsynth.study.db import StudySettings

    settings = StudySettings(
        mode=mode,
        scale=scale,
        exposure_ms=exposure_ms,
        n_real=n_real,
        n_synthetic=n_synthetic,
        n_practice=n_practice,
        pairing=pairing,
        display_size=display_size,
        window=window,
        rotate=rotate,
        seed=seed,
        contrasts=list(contrast),
        title=title,
    )
    made = create_study(real, parse_synthetic(synthetic), out, settings, overwrite=overwrite)
    t = Table(title=f"Study {escape(str(made.path))}")
    t.add_column("images")
    t.add_column("model")
    t.add_column("contrast")
    t.add_column("count", justify="right")
    for (kind, model, c), n in made.counts.items():
        kind_text = "pairs" if settings.mode == "2afc" else kind
        t.add_row(kind_text, escape(model or ""), escape(c), str(n))
    console.print(t)
    if made.n_practice:
        console.print(f"Plus {made.n_practice} practice trials (with feedback, not scored).")
    for w in made.warnings:
        console.print(f"[yellow]Warning:[/yellow] {escape(w)}", soft_wrap=True, highlight=False)
    console.print(
        "\n[bold]Admin token[/bold] (shown only this once; keep it to see results on the admin "
        f"page):\n  {escape(made.admin_token)}\n",
        soft_wrap=True,
    )
    console.print(
        f"Next: `mrsynth study add-reader {escape(str(made.path))} NAME` for each reader, then "
        f"`mrsynth study serve {escape(str(made.path))}`.",
        soft_wrap=True,
    )


@study_app.command("add-reader")
def add_reader(
    study: Path = typer.Argument(..., help="The study file."),
    name: str = typer.Argument(..., help="Reader name (shown only to the admin)."),
    base_url: str = typer.Option(
        "http://127.0.0.1:8000", "--base-url", help="Address readers reach the server at."
    ),
    new_link: bool = typer.Option(
        False,
        "--new-link",
        help="Give an existing reader a new link (the old one stops working; answers are kept).",
    ),
) -> None:
    """Add a reader with a shuffled trial order and print their private link."""
    from mrsynth.study import db as sdb

    conn = sdb.connect(study)
    try:
        token = sdb.reset_reader_token(conn, name) if new_link else sdb.add_reader(conn, name)
    finally:
        conn.close()
    console.print(f"Private link for {escape(name)} (shown once):", highlight=False)
    typer.echo(f"{base_url.rstrip('/')}/r/{token}")


@study_app.command("serve")
def serve(
    study: Path = typer.Argument(..., help="The study file."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (default: this machine only)."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    access_log: bool = typer.Option(
        False, "--access-log", help="Log every request (the log then holds readers' links)."
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Run the study web app (stop with Ctrl+C; answers are saved as they come)."""
    import uvicorn

    from mrsynth.study.app import create_app

    app = create_app(study)
    if not _is_loopback(host):
        console.print(
            f"[yellow]Warning:[/yellow] listening on {escape(host)}: other machines can reach the "
            "study. Serve it behind HTTPS (a reverse proxy) so reader and admin tokens are not "
            "sent in clear text.",
            soft_wrap=True,
        )
    console.print(
        f"Serving {escape(str(study))} at http://{escape(host)}:{port}/  (admin page: /admin)",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=log_level, workers=1)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fmt_frac(k: int, n: int, f: float, lo: float, hi: float) -> str:
    if not n:
        return "–"
    return f"{k}/{n} {100 * f:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


SUMMARY_FIELDS = (
    "reader",
    "scope",
    "model",
    "contrast",
    "n",
    "correct",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "n_synthetic",
    "synthetic_as_real",
    "synthetic_as_real_frac",
    "synthetic_as_real_ci_low",
    "synthetic_as_real_ci_high",
    "n_real",
    "real_as_synthetic",
    "real_as_synthetic_frac",
    "real_as_synthetic_ci_low",
    "real_as_synthetic_ci_high",
    "dprime",
    "auc",
    "median_response_s",
)


def summary_csv(rows: list[dict[str, Any]]) -> str:
    from mrsynth.study.db import rows_csv

    blanked = ({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for r in rows)
    return rows_csv(blanked, SUMMARY_FIELDS)


@study_app.command("results")
def results(
    study: Path = typer.Argument(..., help="The study file (may be in use by a running server)."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write the results table as CSV."),
    answers_csv_out: Path | None = typer.Option(
        None, "--answers-csv", help="Write every answer with its truth as CSV."
    ),
    figure_out: Path | None = typer.Option(
        None, "--figure", help="Write the Figure 1d-e style plot (PNG)."
    ),
    ci: str = typer.Option(
        "wilson", "--ci", help="Binomial 95% interval: wilson or exact (Clopper-Pearson)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Per reader and pooled: error fractions, accuracy, d', AUC, Fleiss' kappa."""
    from mrsynth.study import db as sdb
    from mrsynth.study.app import answers_csv
    from mrsynth.study.stats import figure, summarise
    from mrsynth.utils import atomic_path, atomic_write_text, check_can_write

    if ci not in ("wilson", "exact"):
        raise ConfigError("--ci must be 'wilson' or 'exact'.")
    for p in (csv_out, answers_csv_out, figure_out):
        if p is not None:
            check_can_write(p, overwrite)
    conn = sdb.connect(study)
    try:
        summary = summarise(conn, ci=ci)
        rows_all = sdb.answer_rows(conn, include_practice=True)
    finally:
        conn.close()
    st = summary["settings"]
    progress = Table(title="Readers")
    for col in ("reader", "answered", "practice", "finished", "reloaded"):
        progress.add_column(col)
    for r in summary["readers"]:
        progress.add_row(
            escape(r["name"]),
            f"{r['answered']} / {r['total']}",
            f"{r['practice_answered']} / {r['practice_total']}",
            "yes" if r["finished"] else "no",
            str(r["reloaded"]),
        )
    console.print(progress)
    if not summary["rows"]:
        console.print("No scored answers yet.")
    else:
        syn_head = "synthetic picked as real" if st["mode"] == "2afc" else "synthetic → real"
        t = Table(title=f"Results ({st['mode']}; k/n, %, 95% {ci} interval)")
        for col in (
            "reader",
            "scope",
            "model",
            "contrast",
            "n",
            syn_head,
            "real → synthetic",
            "accuracy",
            "d′",
            "AUC",
            "median RT s",
        ):
            t.add_column(
                col,
                justify="right" if col in ("n", "d′", "AUC", "median RT s") else "left",
                no_wrap=col not in ("reader", "scope"),
            )
        for r in summary["rows"]:
            t.add_row(
                escape(r["reader"]),
                r["scope"],
                escape(r["model"]),
                escape(r["contrast"]),
                str(r["n"]),
                _fmt_frac(
                    r["synthetic_as_real"],
                    r["n_synthetic"],
                    r["synthetic_as_real_frac"],
                    r["synthetic_as_real_ci_low"],
                    r["synthetic_as_real_ci_high"],
                ),
                _fmt_frac(
                    r["real_as_synthetic"],
                    r["n_real"],
                    r["real_as_synthetic_frac"],
                    r["real_as_synthetic_ci_low"],
                    r["real_as_synthetic_ci_high"],
                ),
                _fmt_frac(
                    r["correct"], r["n"], r["accuracy"], r["accuracy_ci_low"], r["accuracy_ci_high"]
                ),
                _fmt(r["dprime"], 2),
                _fmt(r["auc"], 3),
                _fmt(r["median_response_s"], 2),
            )
        natural = Measurement.get(console, console.options.update(max_width=10**6), t)
        if natural.maximum <= console.width:
            console.print(t)
        else:  # a narrow terminal would squeeze the columns to "…": one block per row
            console.print(f"[bold]{t.title}[/bold]")
            heads = [str(c.header) for c in t.columns]
            for cells in zip(*(c.cells for c in t.columns), strict=True):
                console.print(" · ".join(str(x) for x in cells[:4] if str(x)), style="bold")
                for h, v in zip(heads[4:], cells[4:], strict=True):
                    console.print(f"    {h}: {v}")
    k = summary["kappa"]
    if k["n_readers"] >= 2:
        console.print(
            f"Fleiss' kappa = {_fmt(k['kappa'], 3)} on {k['n_items']} images answered by at least "
            f"two of {k['n_readers']} readers."
        )
    if csv_out is not None:
        atomic_write_text(csv_out, summary_csv(summary["rows"]))
        console.print(f"Wrote {escape(str(csv_out))}", highlight=False)
    if answers_csv_out is not None:
        atomic_write_text(answers_csv_out, answers_csv(rows_all))
        console.print(f"Wrote {escape(str(answers_csv_out))}", highlight=False)
    if figure_out is not None:
        if not summary["rows"]:
            raise ConfigError("No scored answers yet: there is nothing to plot (--figure).")
        with atomic_path(figure_out, suffix=".png") as tmp:
            figure(summary, str(tmp))
        console.print(f"Wrote {escape(str(figure_out))}", highlight=False)
