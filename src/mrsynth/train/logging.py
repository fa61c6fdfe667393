"""What a run records: losses.csv, metrics.json, sample grids, TensorBoard, progress bar.

Losses are logged every ``train.log_every`` iterations of an epoch as the mean over the
interval (one device synchronisation per interval, not per step). ``losses.csv`` and
``metrics.json`` are rewritten atomically; on resume rows past the checkpoint are dropped and
the checkpoint's loss accumulators restored (:mod:`mrsynth.train.resume`), so the files
describe exactly the training that produced the weights, as an uninterrupted run would.
TensorBoard scalars are written only when the optional ``tensorboard`` package is installed
(``pip install mrsynth[tensorboard]``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mrsynth.utils import atomic_path, atomic_write_json, atomic_write_text

LOSSES_CSV = "losses.csv"
METRICS_JSON = "metrics.json"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"


class LossLog:
    """Rows of (epoch, iteration, images/s, lr, losses...) kept in memory, flushed as CSV.

    ``enabled=False`` (data-parallel ranks other than 0) reads and writes nothing.
    """

    def __init__(self, run_dir: Path, keep_upto_iteration: int | None = None, *,
                 enabled: bool = True) -> None:
        self.path = run_dir / LOSSES_CSV
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if enabled and keep_upto_iteration is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if int(r["iteration"]) <= keep_upto_iteration]
        self._tb = _tensorboard_writer(run_dir / TENSORBOARD_DIR) if enabled else None

    def log(self, epoch: int, iteration: int, images_per_s: float, lr: float,
            losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"epoch": epoch, "iteration": iteration, "images_per_s": round(images_per_s, 3),
               "lr": lr, **{k: v for k, v in losses.items()}}
        for k in row:
            if k not in self.columns:
                self.columns.append(k)
        self.rows.append(row)
        if self._tb is not None:
            for k, v in losses.items():
                self._tb.add_scalar(f"loss/{k}", v, iteration)
            self._tb.add_scalar("train/images_per_s", images_per_s, iteration)
            self._tb.add_scalar("train/lr", lr, iteration)

    def flush(self) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path) -> Any:
    try:
        import tensorboard  # noqa: F401  (optional extra)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class Metrics:
    """metrics.json: per-epoch wall time (the study reported s/epoch), losses, throughput.

    ``enabled=False`` (data-parallel ranks other than 0) reads and writes nothing.
    """

    def __init__(self, run_dir: Path, header: dict[str, Any], keep_upto_epoch: int | None,
                 *, enabled: bool = True) -> None:
        self.path = run_dir / METRICS_JSON
        self.enabled = enabled
        self.doc: dict[str, Any] = {**header, "status": "running", "epochs": []}
        if enabled and keep_upto_epoch is not None and self.path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                old = json.loads(self.path.read_text())
                self.doc["epochs"] = [e for e in old.get("epochs", [])
                                      if e["epoch"] <= keep_upto_epoch]

    def add_epoch(self, entry: dict[str, Any]) -> None:
        self.doc["epochs"].append(entry)

    def save(self, status: str | None = None, **extra: Any) -> None:
        if not self.enabled:
            return
        if status:
            self.doc["status"] = status
        self.doc.update(extra)
        walls = [e["wall_s"] for e in self.doc["epochs"]]
        self.doc["epochs_completed"] = len(walls)
        self.doc["total_train_s"] = round(float(sum(walls)), 3)
        self.doc["mean_s_per_epoch"] = round(float(np.mean(walls)), 3) if walls else None
        self.doc["median_s_per_epoch"] = round(float(np.median(walls)), 3) if walls else None
        # The first epoch includes warm-up (allocator, autotuning, compilation).
        self.doc["mean_s_per_epoch_after_first"] = (
            round(float(np.mean(walls[1:])), 3) if len(walls) > 1 else None
        )
        atomic_write_json(self.path, self.doc)


def save_sample_grid(
    path: Path,
    images: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    contrasts: tuple[str, str],
    title: str,
) -> None:
    """Rows of (real A, A->B, real B, B->A) on the normalised [-1, 1] grey scale, rotated
    for viewing like every other figure of mrsynth (anterior at the top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mrsynth.data.slicing import to_display

    a, b = contrasts
    heads = (f"real {a}", f"{a}->{b}", f"real {b}", f"{b}->{a}")
    n = len(images)
    fig = Figure(figsize=(8, 2.1 * n + 0.4), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 4, squeeze=False)
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(to_display(img), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


class EpochProgress:
    """A rich progress bar per epoch with losses and images/s; silent when not a terminal."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ips]}"),
            TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done, ips="",
                                             losses="")

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def show(self, images_per_s: float, losses: dict[str, float]) -> None:
        if self._progress is not None:
            text = " ".join(f"{k} {v:.3g}" for k, v in losses.items())
            self._progress.update(self._task, ips=f"{images_per_s:.1f} img/s", losses=text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
