"""``mrsynth train`` and ``mrsynth models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mrsynth.errors import ConfigError


def model_table(preset: str = "paper") -> list[dict[str, Any]]:
    """Per model and network: parameter count and conv layers at ``preset`` (no weights
    are allocated: the networks are built on the meta device)."""
    import torch

    from mrsynth.models.base import build_model, get_model_class, model_names
    from mrsynth.models.blocks import count_conv_layers, count_parameters
    from mrsynth.train.config import resolve_config

    rows = []
    for name in model_names():
        cls = get_model_class(name)
        with torch.device("meta"):
            model = build_model(resolve_config(name, preset))
        nets = {n: {"parameters": count_parameters(m), "conv_layers": count_conv_layers(m)}
                for n, m in model.networks().items()}
        rows.append({
            "model": name,
            "paired": cls.needs_paired,
            "summary": cls.summary,
            "networks": nets,
            "total_parameters": count_parameters(model),
        })
    return rows


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_cmd(
        preset: str = typer.Option("paper", "--preset", help="paper or cpu-small."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the models with each network's parameter count and conv layers."""
        rows = model_table(preset)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(title=f"mrsynth models ({preset} preset)")
        for col in ("model", "data", "network", "parameters", "conv layers"):
            table.add_column(col, justify="right" if col in ("parameters", "conv layers")
                             else "left")
        for r in rows:
            first = True
            for net, info in r["networks"].items():
                table.add_row(
                    r["model"] if first else "",
                    ("paired" if r["paired"] else "unpaired") if first else "",
                    net,
                    f"{info['parameters']:,}",
                    str(info["conv_layers"]),
                )
                first = False
            table.add_section()
        console = Console()
        console.print(table)
        for r in rows:
            console.print(f"[bold]{r['model']}[/bold]: {r['summary']}", highlight=False)

    @app.command("train")
    def train_cmd(
        model: str = typer.Option(None, "--model", help="Model name (see `mrsynth models`)."),
        data: Path = typer.Option(None, "--data",
                                  help="Prepared data: a store directory or a .npz file."),
        out: Path = typer.Option(..., "--out", help="Run directory to create (or resume)."),
        preset: str = typer.Option("paper", "--preset", help="paper (the study) or cpu-small."),
        epochs: int = typer.Option(None, "--epochs", help="Number of epochs."),
        batch_size: int = typer.Option(
            None, "--batch-size", help="Images per step (under torchrun: the global batch, "
            "split over the ranks)."
        ),
        device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
        precision: str = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (CUDA)."),
        compile_mode: str = typer.Option(
            None, "--compile",
            help="torch.compile the networks: none, default, reduce-overhead (+ CUDA graphs) or "
            "max-autotune. Fastest on a GPU: --precision bf16 --compile reduce-overhead.",
        ),
        seed: int = typer.Option(None, "--seed", help="Random seed."),
        max_steps: int = typer.Option(
            None, "--max-steps-per-epoch", help="Cap iterations per epoch (quick runs)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run."),
        sets: list[str] = typer.Option(
            None, "--set", help="Override any setting: --set key=value (repeatable)."
        ),
        show_config: bool = typer.Option(
            False, "--show-config", help="Print the resolved settings and exit."
        ),
    ) -> None:
        """Train a model on prepared slices; writes checkpoints, logs and samples to --out."""
        from mrsynth.train.config import parse_overrides, resolve_config
        from mrsynth.train.resume import resume_config
        from mrsynth.train.trainer import train

        overrides: dict[str, Any] = parse_overrides(sets or [])
        for key, value in (
            ("train.epochs", epochs), ("train.batch_size", batch_size), ("device", device),
            ("precision", precision), ("seed", seed), ("train.max_steps_per_epoch", max_steps),
            ("train.compile", compile_mode),
        ):
            if value is not None:
                overrides[key] = value
        if resume:  # the stored config, merged with the allowed changes (refuses others)
            _, config = resume_config(out, overrides=overrides, model=model)
        else:
            if model is None:
                raise ConfigError("Give --model (see `mrsynth models`), or --resume a run.")
            config = resolve_config(model, preset, overrides)
        if show_config:
            typer.echo(json.dumps(config, indent=2))
            return
        if not resume and data is None:
            raise ConfigError("Give --data PREPARED_FILE (made by `mrsynth data prepare`).")
        from mrsynth.utils import check_writable

        check_writable(out, directory=True)  # before loading data and building networks
        from mrsynth.train.distributed import detect

        main_rank = detect().is_main  # under torchrun only rank 0 talks
        if main_rank and config["preset"] == "paper" and config["device"] != "cuda":
            import torch

            if not torch.cuda.is_available():
                Console(stderr=True).print(
                    "[yellow]Note:[/yellow] the paper preset on a CPU takes days; "
                    "--preset cpu-small trains a small model in minutes."
                )
        run = train(config, data, out, resume=resume, overwrite=overwrite)
        if main_rank:
            Console(stderr=True).print(f"Run written to {run}")
