"""The run directory's own files: ``config.json`` (settings, data, environment, history) and
the checks made before a run starts or resumes in it.

The other files of a run are written by their owners: ``losses.csv``, ``metrics.json`` and
``samples/`` by :mod:`mrsynth.train.logging`, ``checkpoints/`` by
:mod:`mrsynth.train.checkpoint`.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mrsynth.errors import OutputExistsError, RunError
from mrsynth.utils import atomic_write_json, environment_info

CONFIG_JSON = "config.json"
RUN_FORMAT = 1


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's ``config.json``; a missing or damaged one is a :class:`RunError`."""
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise RunError(
            f"{run_dir} is not an mrsynth run directory (no {CONFIG_JSON}). Give the --out "
            "directory of a `mrsynth train` run."
        )
    try:
        doc = json.loads(path.read_text())
        doc["config"]["model"]  # noqa: B018 - validates the layout
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"Cannot read {path}: {exc}. The run directory is damaged.") from exc
    return doc


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to start over an existing run (or a foreign non-empty directory)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a directory for the run.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / CONFIG_JSON).is_file():
            raise OutputExistsError(
                f"Output directory {out} exists, is not empty and is not an mrsynth run. "
                "Choose another --out directory."
            )
        if not overwrite:
            raise OutputExistsError(
                f"Run directory {out} already holds a run. Pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out directory."
            )


def make_fresh(out: Path) -> None:
    """An empty run directory (an old run in it was allowed by :func:`check_out_dir`)."""
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _canon(v: Any) -> Any:
    """JSON round trip so tuples and lists (and numpy scalars) compare equal."""
    return json.loads(
        json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def preparation_differences(
    run_settings: Mapping[str, Any] | None, data_settings: Mapping[str, Any],
    keys: Sequence[str],
) -> dict[str, tuple[Any, Any]]:
    """The preparation settings among ``keys`` in which prepared data differs from the data
    a run was trained on, as ``{key: (run's, data's)}`` (values compared as JSON). Resume
    and evaluation both refuse such data."""
    run_settings = run_settings or {}
    pairs = {k: (run_settings.get(k, _UNSET.get(k)), data_settings.get(k, _UNSET.get(k)))
             for k in keys}
    return {k: (a, b) for k, (a, b) in pairs.items() if _canon(a) != _canon(b)}


#: What a preparation setting means where it is not recorded.
_UNSET: dict[str, Any] = {"plane": "axial"}


def write_run_config(
    out: Path, cfg: dict[str, Any], *, stored: dict[str, Any] | None, resumed_at: int,
    device: torch.device, data: dict[str, Any], execution: dict[str, Any],
) -> None:
    """Write ``config.json``: a new document for a new run; for a resumed one the stored
    document with the (merged) config and a ``resume`` event appended to its history.
    ``data`` describes the prepared file, ``execution`` how the run is executed."""
    env = environment_info()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    event = {"event": "resume" if stored is not None else "start",
             "time_utc": env["time_utc"], "device": str(device),
             "device_name": device_name, "precision": cfg["precision"],
             "argv": env["argv"], "git_commit": env["git_commit"], **execution}
    if stored is not None:
        doc = copy.deepcopy(stored)
        doc["config"] = cfg
        event["epoch"] = resumed_at
        doc.setdefault("history", []).append(event)
    else:
        doc = {
            "mrsynth_run": RUN_FORMAT,
            "model": cfg["model"],
            "contrasts": list(cfg["data"]["contrasts"]),
            "config": cfg,
            "data": data,
            "device": str(device),
            "device_name": device_name,
            "git_commit": env["git_commit"],
            "environment": env,
            "history": [event],
        }
    atomic_write_json(out / CONFIG_JSON, doc)
