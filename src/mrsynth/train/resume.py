"""Resuming a run: the merged config, and the training state a checkpoint holds.

A checkpoint's ``state.pt`` holds everything beyond the weights that the next step depends on
(optimisers, schedulers, grad scaler, image pools, every RNG state, the sampler) plus the
:class:`Position` and the loss-log accumulators, so a resumed run continues bit for bit, and
its ``losses.csv`` and ``metrics.json`` equal those of an uninterrupted run (wall times
aside: they exclude the downtime).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsynth.errors import ConfigError, RunError
from mrsynth.train import checkpoint as ckpt
from mrsynth.train.config import (
    RESUMABLE_KEYS,
    apply_overrides,
    flatten,
    upgrade_config,
    validate_config,
)
from mrsynth.train.rundir import read_run_config


@dataclass
class Position:
    """Where training stands: ``epoch`` epochs completed, ``step`` steps into the next one,
    ``iteration`` steps in all, ``elapsed`` seconds spent in the current epoch so far."""

    epoch: int = 0
    step: int = 0
    iteration: int = 0
    elapsed: float = 0.0

    @property
    def current_epoch(self) -> int:
        """The 1-based epoch being trained (the last completed one at an epoch boundary)."""
        return self.epoch + 1 if self.step else self.epoch


# ---------------------------------------------------------------------- the config
def merge_resume_config(stored: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """The stored config with the settings of ``given`` that may change on resume
    (:data:`~mrsynth.train.config.RESUMABLE_KEYS`); any other difference is refused."""
    if given is None:
        return copy.deepcopy(stored)
    a, b = flatten(stored), flatten(given)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    bad = [k for k in changed if k not in RESUMABLE_KEYS and k != "preset"]
    if bad:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in bad)
        raise ConfigError(
            f"Cannot resume with different settings ({detail}). Only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change on --resume; start a new run "
            "directory for other changes."
        )
    merged = copy.deepcopy(stored)
    for k in changed:
        if k in RESUMABLE_KEYS:
            node = merged
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = b[k]
    return validate_config(merged)


def resume_config(
    run_dir: Path, given: dict[str, Any] | None = None, *,
    overrides: dict[str, Any] | None = None, model: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run document of ``run_dir`` (config upgraded) and the config to resume with.

    ``given`` is a full config (the Python API), ``overrides`` dotted settings applied to the
    stored config (the command line); either may change only the resumable settings.
    ``model``, when given, must be the run's model.
    """
    doc = read_run_config(run_dir)
    doc["config"] = upgrade_config(doc["config"])
    stored = doc["config"]
    if model is not None and model != stored["model"]:
        raise ConfigError(
            f"Run {run_dir} trains {stored['model']!r}, not {model!r}; drop --model or "
            "choose another --out to start a new run."
        )
    if overrides:
        given = validate_config(apply_overrides(stored, overrides))
    return doc, merge_resume_config(stored, given)


# ---------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":  # this device's stream only: the run may resume on another node
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per visible GPU
            idx = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[idx] if idx < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# ---------------------------------------------------------------------- training state
@dataclass
class TrainingParts:
    """What a checkpoint's training state is saved from and restored into."""

    model: Any
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    scaler: Any
    sampler: Any
    device: torch.device
    ema: Any = None  # mrsynth.train.ema.WeightAverage, with train.ema


def training_state(parts: TrainingParts, pos: Position, sampler_state: torch.Tensor,
                   log: dict[str, Any]) -> dict[str, Any]:
    """``state.pt`` of a checkpoint. ``log``: the loss accumulators of the current epoch."""
    return {
        "epoch": pos.epoch,
        "step_in_epoch": pos.step,
        "iteration": pos.iteration,
        "epoch_elapsed_s": pos.elapsed,
        "optimizers": {n: o.state_dict() for n, o in parts.optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in parts.schedulers.items()},
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "aux": parts.model.aux_state_dict(),
        "rng": rng_state(parts.device),
        "sampler": sampler_state,
        "log": log,
    }


def restore_training_state(path: Path, parts: TrainingParts, model_name: str,
                           contrasts: tuple[str, str]) -> tuple[Position, dict[str, Any]]:
    """Load checkpoint ``path`` into ``parts``; return its position and loss accumulators
    (empty for checkpoints written before they were saved)."""
    from mrsynth.train.ema import split_average

    tensors, meta = ckpt.load_weights(path, parts.device)
    ckpt.check_identity(path, meta, model_name, contrasts)
    live, averaged = split_average(tensors)
    ckpt.load_model_weights(parts.model, live, path)
    if (averaged is None) != (parts.ema is None):
        raise RunError(
            f"The checkpoint {path} {'holds no' if averaged is None else 'holds a'} weight "
            f"average but the run's train.ema is {'on' if parts.ema is not None else 'off'}; "
            "resume with the setting the run was started with.")
    if parts.ema is not None and averaged is not None:
        try:
            parts.ema.load(averaged)
        except ValueError as exc:
            raise RunError(f"{path}: {exc}. The checkpoint belongs to another run.") from exc
    state = ckpt.load_state(path)
    try:
        for n, o in parts.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in parts.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        parts.model.load_aux_state_dict(state["aux"], parts.device)
        set_rng_state(state["rng"], parts.device)
        parts.sampler.set_state(state["sampler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise RunError(
            f"The training state in {path} does not fit this run ({exc}); it was written "
            "by another model or mrsynth version. Start a new run."
        ) from exc
    pos = Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["iteration"]),
                   float(state.get("epoch_elapsed_s", 0.0)))
    return pos, dict(state.get("log") or {})
