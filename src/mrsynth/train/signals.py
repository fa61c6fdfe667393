"""Ctrl-C and SIGTERM during training: a flag checked between steps, and the error raised
once the state is saved."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from mrsynth.errors import MrsynthError


class TrainingInterrupted(MrsynthError):
    """Ctrl-C or SIGTERM: the latest state was saved; ``--resume`` continues."""

    exit_code = 130


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: stop now, without saving
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def interrupted(self, where: str, saved_in: str, out: str) -> TrainingInterrupted:
        """The error to raise after saving; exit code 128 + the signal, as a shell reports."""
        signum = self.signum or signal.SIGTERM
        return TrainingInterrupted(
            f"{signal.Signals(signum).name} received: training stopped {where}; the state was "
            f"saved in {saved_in}. Continue with `mrsynth train --out {out} --resume`.",
            exit_code=128 + signum,
        )
