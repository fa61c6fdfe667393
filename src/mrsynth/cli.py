"""The ``mrsynth`` command line.

Each area of the package owns its commands in a ``commands`` module with a
``register(app)`` function; this file only assembles them and turns every way a
command can fail into a message and an exit code, never a traceback (unless
``--debug``):

* usage errors (unknown option, missing or bad value): the usage line and the
  problem, exit 2;
* :class:`~mrsynth.errors.MrsynthError`: one paragraph, its ``exit_code``;
* an ``OSError`` naming a file (a last resort; outputs are checked up front):
  the file and the problem, exit 1;
* Ctrl-C, SIGTERM and SIGHUP: the same path (``KeyboardInterrupt``, so partial
  outputs are removed), exit 130, 143 and 129 (128 + signal number, the shell's
  convention, so a scheduler can tell "killed" from "failed").

Heavy imports (torch) happen inside the commands so ``mrsynth --help`` stays fast.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from mrsynth import __version__
from mrsynth.errors import MrsynthError
from mrsynth.utils import interrupt_on_signals

app = typer.Typer(
    name="mrsynth",
    help="Translate brain MR images between contrasts (T1w <-> T2w) with GANs, "
    "evaluate them and run perceptual studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
    """``--debug`` is read by :func:`main` from the arguments (it must act on errors raised
    while parsing, before this callback runs)."""


for _mod in _COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def _cli_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort, Exit) classes of click *and* of typer's private copy.

    typer >= 0.29 raises its own copies of click's exceptions (``typer._click``), which
    do not inherit from click's; a command may still raise click's own (click is not
    necessarily installed). Handle whichever exist.
    """
    click_exc: list[type] = []
    abort: list[type] = [typer.Abort]
    exit_: list[type] = [typer.Exit]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        click_exc.append(mod.ClickException)
        abort += [mod.Abort] if hasattr(mod, "Abort") else []
        exit_ += [mod.Exit] if hasattr(mod, "Exit") else []
    return tuple(click_exc), tuple(abort), tuple(exit_)


def _exit_code(exc: Any, default: int = 0) -> int:
    code = getattr(exc, "exit_code", getattr(exc, "code", default))
    return code if isinstance(code, int) else (default if code is None else 1)


def _context_for(args: list[str]) -> Any:
    """A context for the (sub)command named in ``args``, so its usage line can be shown."""
    try:
        cmd = typer.main.get_command(app)
    except Exception:  # the app cannot be built (or was replaced): no usage line then
        return None
    ctx = cmd.context_class(cmd, info_name="mrsynth")
    for token in args:
        sub = (getattr(cmd, "commands", None) or {}).get(token)
        if sub is None:
            continue
        cmd = sub
        ctx = cmd.context_class(cmd, parent=ctx, info_name=token)
    return ctx


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    click_exc, abort_exc, exit_exc = _cli_exception_types()
    with interrupt_on_signals() as signals:
        try:
            rc = app(args=args, prog_name="mrsynth", standalone_mode=False)
        except MrsynthError as exc:
            if debug:
                raise
            err_console.print(f"[bold red]Error:[/bold red] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            return exc.exit_code
        except KeyboardInterrupt:  # typer turns most into Exit(130); see below
            rc = 130
        except SystemExit as exc:
            return _exit_code(exc)
        except click_exc as exc:  # usage errors: usage line, "Error: ...", exit 2
            if hasattr(exc, "ctx") and exc.ctx is None:  # some parser errors carry no context
                exc.ctx = _context_for(args)
            exc.show()  # type: ignore[attr-defined]
            return _exit_code(exc, 1)
        except exit_exc as exc:
            return _exit_code(exc)
        except abort_exc:
            err_console.print("Aborted.")
            return 1
        except OSError as exc:
            if debug or exc.filename is None:
                raise
            err_console.print(
                f"[bold red]Error:[/bold red] {escape(str(exc.filename))}: "
                f"{escape(str(exc.strerror or exc))}. Check the "
                "path, its permissions and the free space.", highlight=False, soft_wrap=True)
            return 1
    if signals.signum is not None:  # Ctrl-C or SIGTERM: outputs in progress were removed
        name = signal.Signals(signals.signum).name
        err_console.print(f"Interrupted ({name}): files being written were removed; finished "
                          "ones are kept (train, data prepare, complete and demo continue where "
                          "they stopped when the same command is run again).")
        return 128 + signals.signum
    return int(rc) if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
