"""The ``mrsynth`` command line.

Each area of the package owns its commands in a ``commands`` module with a
``register(app)`` function; this file only assembles them and turns
:class:`~mrsynth.errors.MrsynthError` into a one-paragraph message and a
non-zero exit code (a traceback only with ``--debug``). Heavy imports (torch)
happen inside the commands so ``mrsynth --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from mrsynth import __version__
from mrsynth.errors import MrsynthError

app = typer.Typer(
    name="mrsynth",
    help="Translate brain MR images between contrasts (T1w <-> T2w) with GANs, "
    "evaluate them and run perceptual studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}
err_console = Console(stderr=True)

# Modules that contribute commands, in the order they appear in --help.
_COMMAND_MODULES = (
    "mrsynth.data.commands",
    "mrsynth.train.commands",
    "mrsynth.eval.commands",
    "mrsynth.eval.complete_commands",
    "mrsynth.study.commands",
    "mrsynth.demo",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mrsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    _state["debug"] = debug


for _mod in _COMMAND_MODULES:
    try:
        _m = importlib.import_module(_mod)
    except ModuleNotFoundError as exc:  # an area not built yet must not break the others
        if exc.name != _mod:
            raise
        continue
    _m.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rc = app(args=args, standalone_mode=False)
    except MrsynthError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]Error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        return 130
    except SystemExit as exc:  # typer.Exit / click usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("Aborted.")
            return 1
        raise
    return int(rc) if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
