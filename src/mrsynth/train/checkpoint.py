"""Checkpoints: weights as safetensors, the rest of the training state beside them.

Layout of one checkpoint directory (``RUN_DIR/checkpoints/latest``, ``.../epoch_0050``)::

    weights.safetensors   every network's weights (model.state_dict()), with metadata
                          (model name, contrasts, epoch, iteration)
    state.pt              optimisers, schedulers, grad scaler, image pools, all RNG states,
                          epoch / step-in-epoch / iteration (torch.save, loads weights_only)
    meta.json             written last: a checkpoint without it is incomplete

A checkpoint is written into a temporary directory beside its destination and renamed into
place; the previous one is moved aside first and deleted only after the rename, so a crash at
any moment leaves either the old or the new checkpoint complete (``find_checkpoint`` falls back
to the moved-aside one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrsynth.errors import RunError

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
META = "meta.json"
FORMAT = "mrsynth-checkpoint-1"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.parent / f".old-{final.name}"
    if old.exists() and not final.exists():  # an earlier swap was cut short: restore first
        os.rename(old, final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path, name: str, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write ``root/name`` atomically; returns its path."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(
            tensors,
            str(tmp / WEIGHTS),
            metadata={
                "format": FORMAT,
                "model": str(meta["model"]),
                "contrasts": ",".join(meta["contrasts"]),
                "epoch": str(meta["epoch"]),
                "iteration": str(meta["iteration"]),
            },
        )
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
        for f in (WEIGHTS, STATE, META):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        final = root / name
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def copy_checkpoint(root: Path, src: str, dst: str) -> Path:
    """Keep a copy of a checkpoint under another name (e.g. ``epoch_0050``), atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst}-", dir=root))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(root / src, tmp)
        _swap_into_place(tmp, root / dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / dst


def clean_stale(root: Path) -> None:
    """Remove temporary directories left by a run killed while writing a checkpoint."""
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (WEIGHTS, STATE, META))


def find_checkpoint(run_dir: Path, which: str | int = LATEST) -> Path:
    """Resolve ``latest``, ``epoch_0050``, an epoch number or a path to a complete checkpoint."""
    root = Path(run_dir) / "checkpoints"
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        which = f"epoch_{int(which):04d}"
    cand = Path(which) if Path(str(which)).is_absolute() else root / str(which)
    if is_complete(cand):
        return cand
    backup = cand.parent / f".old-{cand.name}"
    if is_complete(backup):
        return backup
    available = sorted(p.name for p in root.iterdir() if is_complete(p)) if root.is_dir() else []
    if not available:
        raise RunError(
            f"Run directory {run_dir} has no complete checkpoint (nothing in {root}). The run "
            "never finished an epoch or a timed checkpoint; continue it with "
            "`mrsynth train --out RUN_DIR --resume` or start it again."
        )
    raise RunError(
        f"Checkpoint {which!r} not found in {root}. Available: {', '.join(available)}."
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"Cannot read checkpoint metadata {ckpt / META}: {exc}.") from exc


def load_weights(ckpt: Path, device: torch.device | str = "cpu") -> tuple[dict, dict[str, str]]:
    """The weights and safetensors metadata of a checkpoint; unreadable files are RunError."""
    from safetensors import SafetensorError, safe_open

    path = ckpt / WEIGHTS
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunError(
            f"Cannot read the weights {path}: {exc}. The checkpoint is damaged or not an "
            "mrsynth checkpoint; use another checkpoint of the run or train again."
        ) from exc
    if meta.get("format") != FORMAT:
        raise RunError(f"{path} is not an mrsynth checkpoint (format {meta.get('format')!r}).")
    return tensors, meta


def load_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise RunError(
            f"Cannot read the training state {path}: {exc}. The checkpoint is damaged; resume "
            "from another checkpoint of the run or train again."
        ) from exc


def check_identity(
    ckpt: Path, meta: dict[str, str], model: str, contrasts: list[str] | tuple[str, ...]
) -> None:
    """Refuse weights saved by another model or for another contrast pair."""
    got_model, got_c = meta.get("model"), meta.get("contrasts", "")
    if got_model != model or got_c != ",".join(contrasts):
        raise RunError(
            f"Checkpoint {ckpt} holds a {got_model!r} model for contrasts {got_c!r}, but the "
            f"run is a {model!r} model for {','.join(contrasts)!r}. The checkpoint belongs to "
            "another run; point to the right run directory."
        )


def load_model_weights(model: nn.Module, tensors: dict[str, torch.Tensor], ckpt: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise RunError(
            f"The weights in {ckpt} do not fit the model described by the run's config.json "
            f"({str(exc).splitlines()[0]}). The checkpoint belongs to another run or "
            "config.json was edited."
        ) from exc
