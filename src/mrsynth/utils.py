"""Small shared helpers: atomic writes, output checks, signals and run provenance.

Outputs are always written to a temporary file in the destination directory
and renamed into place, so an interrupted command never leaves a truncated
file where a good one (or none) should be. :func:`interrupt_on_signals` makes
SIGTERM behave like Ctrl-C, so that holds for a polite ``kill`` too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from mrsynth.errors import ConfigError, OutputError, OutputExistsError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so libraries that
    infer the format from the extension (numpy, matplotlib, nibabel) still work.
    On any exception the temporary file is removed and ``path`` is untouched. An
    ``OSError`` creating, writing or renaming the output becomes an
    :class:`~mrsynth.errors.OutputError` naming ``path``.
    """
    dest = Path(path)
    sfx = suffix if suffix is not None else "".join(dest.suffixes)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{sfx}",
                                   dir=dest.parent)
    except OSError as exc:
        raise _output_error(dest, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give them the usual umask mode
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and _is_output_failure(exc, tmp_path, dest):
            raise _output_error(dest, exc) from exc
        raise


#: errno values that mean "this output cannot be written", whatever file the library names.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _is_output_failure(exc: OSError, tmp: Path, dest: Path) -> bool:
    names = {str(tmp), str(dest)}
    return exc.errno in _OUTPUT_ERRNOS or str(exc.filename) in names or (
        exc.filename2 is not None and str(exc.filename2) in names)


def os_reason(dest: Path, exc: OSError) -> str:
    """Why writing ``dest`` failed: the OS's reason, plus the file it names when that is not
    ``dest`` itself (the temp file of an atomic write, a file inside a checkpoint)."""
    why = exc.strerror or str(exc)
    return why + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(dest)
                  else "")


def _output_error(dest: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"Cannot write the output {dest}: {os_reason(dest, exc)}. Choose another output "
        f"path, or fix the permissions or free space of {dest.parent}."
    )


def check_writable(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """Fail early, before any work, when ``path`` cannot be created.

    Finds the nearest existing ancestor of ``path`` (``path`` itself for an existing
    ``directory``) and creates and removes a probe file there: unlike ``os.access``
    this also catches immutable directories, read-only mounts and root-owned
    folders seen by root. Raises :class:`~mrsynth.errors.OutputError` naming the path.
    """
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise OutputError(f"Output directory {p} is an existing file; choose another path.")
    base = p if directory and p.is_dir() else p.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(
            f"Cannot create the output {p}: {base} is a file, not a directory. Choose another "
            "output path."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".mrsynth-write-check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"Cannot write the output {p}: {base} is not writable ({exc.strerror or exc}). "
            "Choose another output path or fix the folder's permissions."
        ) from exc
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=json_default)
    atomic_write_text(path, text + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for paths and numpy values in configs and provenance."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_can_write(path: str | os.PathLike[str], overwrite: bool,
                    example: str | None = None) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` is set. ``example`` (a file
    name such as ``report.html``) marks a single-file output: an existing folder there is
    refused with a plain message (the atomic write would fail on a temp name instead)."""
    p = Path(path)
    if example is not None and p.is_dir():
        raise ConfigError(f"Output {p} is a folder; give the file to write, e.g. "
                          f"{p / example}.")
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"Output {p} already exists. Choose another path, or pass --overwrite to replace it "
            "(the old file is only replaced once the new one is complete)."
        )
    return p


@dataclass
class SignalState:
    """Which signal (if any) interrupted the command: the CLI's exit code is 128 + it."""

    signum: int | None = None


#: Signals that stop a command like Ctrl-C: kill's default, Ctrl-C, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupt_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[SignalState]:
    """While active, SIGTERM and SIGHUP (and SIGINT) raise ``KeyboardInterrupt`` in the
    main thread.

    Python's default SIGTERM kills the process on the spot, skipping every ``finally``:
    :func:`atomic_path` then leaves its hidden temporary file behind. Raising the same
    exception as Ctrl-C makes every command clean up alike; the state records the signal
    so the CLI can exit with 128 + signal number. A signal the parent set to be ignored
    (``nohup``, a background job of a shell without job control) stays ignored. Code that
    needs its own behaviour (the trainer saves a checkpoint) installs its handlers inside
    this block and restores ours afterwards. A no-op outside the main thread.
    """
    state = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        state.signum = signum
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handle) for sig in signals
           if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield state
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the mrsynth source tree (None outside a checkout)."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    )
    if dirty.returncode == 0 and dirty.stdout.strip():
        commit += "-dirty"
    return commit


_PACKAGES = (
    "mrsynth", "torch", "numpy", "scipy", "nibabel", "nilearn", "scikit-image",
    "safetensors", "matplotlib", "typer", "rich", "fastapi", "onnx", "onnxruntime",
)


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded next to every output (provenance)."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and batch
    schedulers set), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent() -> None:
    """Worker-process initializer: on Linux, be killed when the parent dies (kill -9
    included), so no worker outlives the command that started it."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
