"""The command line's failure modes: usage errors, unwritable outputs, signals (issue 10)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer.main

from mrsynth.cli import app, main
from mrsynth.data.prepare import prepare_dataset
from mrsynth.errors import OutputError


def _command_paths() -> list[tuple[str, ...]]:
    """Every registered command and group, walked from the app (new commands included)."""
    paths: list[tuple[str, ...]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


COMMANDS = _command_paths()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_walk_finds_the_commands():
    assert {("train",), ("data", "prepare"), ("translate",), ("evaluate",)} <= set(COMMANDS)
    assert len(COMMANDS) > 10


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "mrsynth")
def test_every_command_refuses_an_unknown_option_with_usage_and_exit_2(path, capsys):
    rc = main([*path, "--no-such-option-xyz"])
    err = _flat(capsys.readouterr().err)
    assert rc == 2
    assert f"Usage: mrsynth {' '.join(path)}".rstrip() in err
    assert "No such option: --no-such-option-xyz" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--modle", "x"], "No such option: --modle"),
    (["data", "prepare", "base"], "Missing option '--out'"),
    (["data", "prepare", "builtin", "--out", "x.npz", "--size", "a", "b"],
     "Invalid value for '--size'"),
    (["evaluate", "--runs", "--data", "d.npz", "--out", "e"],
     "'--data' is an option, not a run directory"),
    (["--debug", "translate", "--run"], "Option '--run' requires an argument"),
])
def test_usage_errors_print_usage_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(args)
    err = _flat(capsys.readouterr().err)
    assert rc == 2
    assert err.startswith("Usage: mrsynth") and message in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _raising(exc: BaseException):
    def fake_app(**kwargs):
        raise exc
    return fake_app


@pytest.mark.parametrize("source", ["click", "typer._click"])
def test_click_and_typer_exceptions_are_both_handled(source, monkeypatch, capsys):
    import importlib

    import mrsynth.cli as cli

    mod = importlib.import_module(f"{source}.exceptions")
    monkeypatch.setattr(cli, "app", _raising(mod.BadParameter("no good")))
    assert main(["x"]) == 2
    assert "no good" in capsys.readouterr().err
    monkeypatch.setattr(cli, "app", _raising(mod.ClickException("plain failure")))
    assert main(["x"]) == 1
    assert "plain failure" in capsys.readouterr().err
    if hasattr(mod, "Abort"):
        monkeypatch.setattr(cli, "app", _raising(mod.Abort()))
        assert main(["x"]) == 1
    monkeypatch.setattr(cli, "app", _raising(typer.Exit(3)))
    assert main(["x"]) == 3


def test_an_oserror_naming_a_file_is_a_message_not_a_traceback(monkeypatch, capsys):
    import mrsynth.cli as cli

    monkeypatch.setattr(cli, "app", _raising(PermissionError(13, "Permission denied",
                                                             "/data/out/x.npz")))
    assert main(["x"]) == 1
    err = _flat(capsys.readouterr().err)
    assert "/data/out/x.npz: Permission denied" in err
    with pytest.raises(PermissionError):  # --debug keeps the traceback
        main(["--debug", "x"])


def test_user_strings_in_errors_are_printed_verbatim(monkeypatch, capsys):
    """Square brackets in a user's name or path are not rich markup (issue 10 item 12)."""
    import mrsynth.cli as cli
    from mrsynth.errors import MrsynthError

    monkeypatch.setattr(cli, "app", _raising(MrsynthError('Reader "Bad [/] close [v2]" exists')))
    assert main(["x"]) != 0
    assert 'Reader "Bad [/] close [v2]" exists' in _flat(capsys.readouterr().err)
    monkeypatch.setattr(cli, "app", _raising(PermissionError(13, "Denied", "/d/[bold]x[/]")))
    assert main(["x"]) == 1
    assert "/d/[bold]x[/]: Denied" in _flat(capsys.readouterr().err)


def test_data_commands_print_paths_verbatim(mini_bids, prepared_small, tmp_path, capsys):
    """`data info` on a folder and a prepared file whose paths look like rich markup."""
    raw = tmp_path / "d[" / "]x [bold]"
    shutil.copytree(mini_bids, raw)
    assert main(["data", "info", str(raw)]) == 0
    assert "]x [bold]" in _flat(capsys.readouterr().out)
    copy = tmp_path / "p[" / "]q [red].npz"
    copy.parent.mkdir()
    shutil.copy(prepared_small, copy)
    assert main(["data", "info", str(copy)]) == 0
    assert "]q [red].npz" in _flat(capsys.readouterr().out)


def test_bad_slices_say_which_forms_are_accepted(tmp_path, capsys):
    rc = main(["data", "prepare", "builtin", "--out", str(tmp_path / "x.npz"), "--slices", "-5"])
    err = _flat(capsys.readouterr().err)
    assert rc == 2
    for form in ('"120"', '"100,120"', '"60:100"', "brain:F"):
        assert form in err


def test_evaluate_on_a_file_says_it_is_not_a_run_directory(prepared_small, tmp_path, capsys):
    rc = main(["evaluate", "--runs", str(prepared_small), "--data", str(prepared_small),
               "--out", str(tmp_path / "e"), "--device", "cpu"])
    err = _flat(capsys.readouterr().err)
    assert rc == 2
    assert f"{prepared_small} is a file, not a run directory" in err
    assert "config.json" in err and "checkpoints/" in err
    assert "does not exist" not in err


# --------------------------------------------------------------------------- unwritable outputs
@contextlib.contextmanager
def _unwritable(kind: str, tmp_path: Path) -> Iterator[Path]:
    """A folder whose files cannot be created, for real (the tests run as root, so mode 555
    alone stops nobody): under a regular file, or made immutable with ``chattr +i``."""
    if kind == "under-a-file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        yield blocker / "sub"
        return
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


KINDS = ["under-a-file", "read-only"]


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_refuses_an_unwritable_output_before_the_work(kind, mini_bids, tmp_path,
                                                              capsys):
    calls = []
    with _unwritable(kind, tmp_path) as folder:
        out = folder / "x.npz"
        with pytest.raises(OutputError, match=str(out)):
            prepare_dataset(mini_bids, out, size=(64, 64), downsample=4, slice_step=8,
                            progress=lambda *a: calls.append(a))
        assert calls == []  # no subject was processed
        rc = main(["data", "prepare", str(mini_bids), "--out", str(out), "-q"])
        err = _flat(capsys.readouterr().err)
        assert rc == 2 and str(out) in err and "Traceback" not in err
        assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_train_refuses_an_unwritable_run_directory(kind, prepared_small, tmp_path, capsys):
    with _unwritable(kind, tmp_path) as folder:
        out = folder / "run"
        rc = main(["train", "--model", "simple", "--preset", "cpu-small", "--data",
                   str(prepared_small), "--out", str(out), "--epochs", "1", "--device", "cpu"])
        err = _flat(capsys.readouterr().err)
        assert rc == 2 and str(out) in err and "Traceback" not in err
        assert "not writable" in err or "is a file" in err
        assert not out.exists()


def test_an_oserror_while_writing_names_the_output(tmp_path):
    from mrsynth.utils import atomic_path

    dest = tmp_path / "x.bin"
    with pytest.raises(OutputError, match=r"x\.bin.*No space left"), atomic_path(dest) as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- signals
_SLOW_WRITE = textwrap.dedent("""
    import sys, time
    import numpy as np

    def slow_savez(fh, **arrays):  # a write the signal arrives in the middle of
        fh.write(b"PK partial npz")
        fh.flush()
        print("WRITING", flush=True)
        time.sleep(120)

    np.savez = slow_savez
    from mrsynth.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _default_signals() -> None:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_a_signal_during_the_final_write_leaves_no_temporary_file(sig, mini_bids, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITE, "data", "prepare", str(mini_bids), "--out",
         str(out_dir / "x.npz"), "--size", "64", "64", "--downsample", "4", "--slice-step", "8",
         "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: under nohup (or as a background job) the test process itself
        # ignores SIGHUP (SIGINT), and mrsynth rightly keeps a signal its parent ignores
        preexec_fn=_default_signals,
    )
    try:
        line = proc.stdout.readline()  # blocks until the write has started
        assert line.strip() == "WRITING", proc.stderr.read()
        assert [p.name for p in out_dir.iterdir()][0].startswith(".x.npz.")  # the temp file
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig  # 143 for SIGTERM, 130 for Ctrl-C, 129 for SIGHUP
    assert f"Interrupted ({sig.name})" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # neither the temp file nor a partial output


def test_signal_handlers_are_restored_after_main(capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert main(["--version"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_ignored_signal_stays_ignored():
    """``nohup mrsynth ...`` must survive the terminal closing."""
    from mrsynth.utils import interrupt_on_signals

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
