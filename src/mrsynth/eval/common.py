"""Helpers shared by evaluate, translate and export: directions, runs and data checks."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrsynth.data.prepared import COMPATIBILITY_KEYS, PreparedData
from mrsynth.errors import ConfigError, RunError
from mrsynth.utils import atomic_path

if TYPE_CHECKING:
    from mrsynth.train.runs import LoadedRun


@dataclass(frozen=True)
class Direction:
    """One translation direction of a run: internal name and contrasts."""

    internal: str  # "A2B" or "B2A"
    source: str  # e.g. "T1w"
    target: str  # e.g. "T2w"

    @property
    def label(self) -> str:
        """The command-line spelling, e.g. ``T1w2T2w``."""
        return f"{self.source}2{self.target}"


def directions(contrasts: Sequence[str]) -> list[Direction]:
    """Both directions of a contrast pair (A, B), A->B first."""
    a, b = contrasts
    return [Direction("A2B", a, b), Direction("B2A", b, a)]


def parse_direction(text: str, contrasts: Sequence[str], run_dir: Path | str = "") -> Direction:
    """A run's direction for ``T1w2T2w``, ``t1w->t2w``, ``A2B``... by the one rule of
    :func:`mrsynth.models.directions.parse_direction`; the error also names the run."""
    from mrsynth.models.directions import parse_direction as internal

    try:
        name = internal(text, contrasts)
    except ConfigError as exc:
        raise ConfigError(f"{exc} Run directory: {run_dir}." if run_dir else str(exc)) from exc
    return directions(contrasts)[0 if name == "A2B" else 1]


def refuse_repeated_runs(run_dirs: Sequence[str | Path]) -> None:
    """A run directory named twice (perhaps by two paths) would be scored or fused twice
    as if it were two runs: refuse it, naming both spellings."""
    seen: dict[Path, Path | str] = {}
    for rd in run_dirs:
        key = Path(rd).resolve()
        if key in seen:
            raise ConfigError(f"Run {rd} is given twice (also as {seen[key]}); list each run "
                              "directory once.")
        seen[key] = rd


def load_run_checked(run_dir: str | Path, device: str = "cpu",
                     checkpoint: str | int = "latest") -> LoadedRun:
    """``mrsynth.train.runs.load_run`` with a clear error for a path that is not a run.

    ``checkpoint``: ``latest``, ``best`` (the epoch with the best validation score, kept
    by the trainer when the data had a validation split) or an epoch number."""
    from mrsynth.train.runs import load_run

    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise RunError(
            f"{p} is a file, not a run directory. A run directory is the --out folder of "
            "`mrsynth train` (it holds config.json, metrics.json, losses.csv and "
            "checkpoints/); pass that folder."
        )
    if not p.is_dir():
        raise RunError(
            f"Run directory {p} does not exist. Pass the output directory of `mrsynth train`."
        )
    if str(checkpoint) == "best" and not (p / "checkpoints" / "best").is_dir():
        raise RunError(
            f"Run {p} has no 'best' checkpoint: it recorded no validation scores (its prepared "
            "data had no validation split). Prepare the data with --val-fraction (or "
            "--val-subjects) and train again, or use --checkpoint latest."
        )
    return load_run(p, device=device, checkpoint=checkpoint)


def check_compatible(run: LoadedRun, run_dir: Path | str, data: PreparedData) -> None:
    """Refuse data prepared differently (size, normalisation, orientation) from the run's."""
    from mrsynth.train.rundir import preparation_differences

    diff = preparation_differences(run.data_settings, data.settings, COMPATIBILITY_KEYS)
    if diff:
        details = "; ".join(f"{k}: run {a!r}, data {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"The prepared data {data.path} was prepared with settings that differ from those "
            f"the run {run_dir} was trained on ({details}). Prepare the evaluation data with "
            "the run's settings (see its config.json, section data) and try again."
        )
    missing = [c for c in run.contrasts if c not in data.images]
    if missing:
        raise ConfigError(
            f"The run {run_dir} translates {run.contrasts[0]} <-> {run.contrasts[1]} but the "
            f"prepared data {data.path} has no {', '.join(missing)} images (it has "
            f"{', '.join(data.contrasts)}). Prepare data with both contrasts."
        )
    seen = seen_test_subjects(run.data_settings or {}, data.settings)
    if seen:
        raise ConfigError(
            f"The test split of {data.path} holds {', '.join(seen)}, which the run {run_dir} "
            "was trained on (or chose its checkpoint on): both were prepared from "
            f"{data.settings.get('source')}, so its test scores would be optimistic. Prepare "
            "the evaluation data with the run's split (`mrsynth data prepare ... --split-from "
            "RUN_DATA`, the file named in the run's config.json) or with other test subjects."
        )


def seen_test_subjects(run_settings: dict[str, Any], data_settings: dict[str, Any]
                       ) -> list[str]:
    """Test subjects of ``data_settings`` that were in the training or validation split of
    the data the run was trained on, when both were prepared from the same data set (one
    source directory, or the built-in set with the same settings); else none: a label of
    another data set names another person."""
    src_run, src_data = run_settings.get("source"), data_settings.get("source")
    if not src_run or not src_data:
        return []
    if src_run == "builtin" or src_data == "builtin":
        if src_run != src_data or run_settings.get("builtin") != data_settings.get("builtin"):
            return []
    elif Path(src_run).resolve() != Path(src_data).resolve():
        return []
    used = {*(run_settings.get("train_subjects") or ()),
            *(run_settings.get("val_subjects") or ())}
    # a participant in the run's own test split as well (2-D folders split by folder, not
    # by participant) is the user's split, not a re-split
    used -= set(run_settings.get("test_subjects") or ())
    return sorted(used & set(data_settings.get("test_subjects") or ()))


_SAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def safe_name(name: str) -> str:
    """A file-name-safe label (model names go into paths)."""
    return _SAFE.sub("-", name).strip("-") or "model"


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Atomic CSV with a fixed column order (missing values empty, floats in full precision)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path
