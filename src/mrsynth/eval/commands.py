"""CLI: ``mrsynth translate``, ``export``, ``evaluate`` and ``report``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


STOCHASTIC_HELP = ("Keep latent noise and dropout on at inference (UNIT), as the study's Keras "
                   "code did: outputs vary between calls. Default: deterministic.")
MIRROR_HELP = ("Average every slice's translation with that of the slice mirrored left-right "
               "(test-time mirroring): twice the inference time, a little lower error. "
               "Not for sagittal runs.")


CHECKPOINT_HELP = ("Weights to use: latest, best (the epoch with the best validation score; "
                   "needs data prepared with --val-fraction) or an epoch number.")


def _no_option_names(values: list[Path] | None) -> list[Path] | None:
    """``--runs --data d.npz`` would take ``--data`` as a run; say what is missing instead."""
    for v in values or []:
        if str(v).startswith("--"):
            raise typer.BadParameter(
                f"{str(v)!r} is an option, not a run directory. Give at least one run "
                "directory after --runs, e.g. --runs runs/cyclegan runs/unit."
            )
    return values


def _log(msg: str) -> None:
    console.print(f"[dim]·[/dim] {escape(msg)}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("translate")
    def translate_cmd(
        run: list[Path] = typer.Option(
            ..., "--run", help="Run directory written by `mrsynth train`. Repeat to fuse runs "
            "(e.g. one per plane, `data prepare --plane`): NIfTI outputs are their mean."),
        direction: str = typer.Option(..., "--direction", help="e.g. T1w2T2w or T2w2T1w."),
        input: Path = typer.Option(..., "--input", help="NIfTI volume, 2-D image, or a folder."),
        output: Path = typer.Option(..., "--output",
                                    help="Output file (for a file) or folder (for a folder)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per batch."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
        stochastic: bool = typer.Option(False, "--stochastic", help=STOCHASTIC_HELP),
        mirror: bool = typer.Option(False, "--mirror", help=MIRROR_HELP),
        checkpoint: str = typer.Option("latest", "--checkpoint", help=CHECKPOINT_HELP),
    ) -> None:
        """Translate NIfTI volumes (every slice in the run's plane) or 2-D images with a
        trained run, or with several runs fused."""
        from mrsynth.eval.translate import translate_path
        from mrsynth.train.speed import resolve_device

        res = translate_path(run, direction, input, output, device=str(resolve_device(device)),
                             batch_size=batch_size, overwrite=overwrite, stochastic=stochastic,
                             mirror=mirror, checkpoint=checkpoint, log=_log)
        rate = res["slices"] / res["seconds"] if res["seconds"] > 0 else float("inf")
        typer.echo(
            f"Translated {res['files']} file(s), {res['slices']} slices in "
            f"{res['seconds']:.2f} s ({rate:.1f} slices/s) -> {output}"
        )

    @app.command("export")
    def export_cmd(
        run: Path = typer.Option(..., "--run", help="Run directory written by `mrsynth train`."),
        direction: str = typer.Option(..., "--direction", help="e.g. T1w2T2w."),
        out: Path = typer.Option(..., "--out", help="Output .onnx file."),
        opset: int | None = typer.Option(None, "--opset", min=1,
                                         help="ONNX opset (default: torch's; refused when "
                                         "torch cannot write it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    ) -> None:
        """Export one direction's generator to ONNX (dynamic batch axis)."""
        from mrsynth.eval.export import export_onnx

        info = export_onnx(run, direction, out, overwrite=overwrite, opset=opset)
        typer.echo(
            f"Wrote {info['path']} ({info['model']}, {info['direction']}, input "
            f"{'x'.join(str(s) for s in info['input_shape'])}, opset {info['opset']}); "
            f"onnxruntime vs PyTorch max "
            f"|diff| = {info['max_abs_diff']:.2e}"
        )

    @app.command("evaluate")
    def evaluate_cmd(
        runs: list[Path] = typer.Option(..., "--runs", callback=_no_option_names,
                                        help="Run directories (--runs A B C or repeated)."),
        more_runs: list[Path] | None = typer.Argument(None, hidden=True),
        data: Path = typer.Option(..., "--data",
                                  help="Prepared data, a store or a .npz file (its test split)."),
        out: Path = typer.Option(..., "--out", help="Evaluation directory to create."),
        mask: str = typer.Option("image", "--mask",
                                 help="Primary region: image (whole slice, as the study) or "
                                      "brain. Both are always computed."),
        bins: int = typer.Option(256, "--bins", min=2, help="Histogram bins for MI/NMI."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        batch_size: int = typer.Option(16, "--batch-size", min=1),
        c2st_steps: int = typer.Option(200, "--c2st-steps", min=1,
                                       help="Optimiser steps of the C2ST classifier."),
        seed: int = typer.Option(0, "--seed", help="Seed for bootstrap and C2ST."),
        study: Path | None = typer.Option(
            None, "--study", help="Perceptual study file (`mrsynth study create`): its readers' "
            "accuracy is reported beside the C2ST score (model names = model labels)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing EVAL_DIR."),
        stochastic: bool = typer.Option(False, "--stochastic", help=STOCHASTIC_HELP),
        mirror: bool = typer.Option(False, "--mirror", help=MIRROR_HELP),
        checkpoint: str = typer.Option("latest", "--checkpoint", help=CHECKPOINT_HELP),
        max_subjects: int | None = typer.Option(
            None, "--max-subjects", min=1, help="Evaluate a sample of this many test subjects "
            "drawn with --seed (default: all); for test splits too large for memory."),
    ) -> None:
        """Score runs on the test split: metrics, statistics, timing, C2ST, figures."""
        from mrsynth.eval.evaluate import evaluate, summary_markdown
        from mrsynth.train.speed import resolve_device

        all_runs = list(runs) + list(more_runs or [])
        region = {"none": "image", "whole": "image"}.get(mask, mask)
        ev = evaluate(all_runs, data, out, region=region, bins=bins,
                      batch_size=batch_size, device=str(resolve_device(device)),
                      c2st_steps=c2st_steps, seed=seed, study=study, overwrite=overwrite,
                      stochastic=stochastic, mirror=mirror, checkpoint=checkpoint,
                      max_subjects=max_subjects, log=_log)
        typer.echo(summary_markdown(ev))
        typer.echo(f"Evaluation written to {ev}")

    @app.command("report")
    def report_cmd(
        eval_dir: Path = typer.Option(..., "--eval", help="Directory from `mrsynth evaluate`."),
        out: Path = typer.Option(..., "--out", help="Output HTML file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    ) -> None:
        """Write one self-contained HTML report (figures embedded, readable offline)."""
        from mrsynth.eval.report import build_report
        from mrsynth.utils import check_can_write

        check_can_write(out, overwrite, example="report.html")
        typer.echo(f"Report written to {build_report(eval_dir, out)}")
