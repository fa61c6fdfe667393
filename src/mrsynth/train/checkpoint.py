"""Checkpoints: weights as safetensors, the rest of the training state beside them.

Layout of one checkpoint directory (``RUN_DIR/checkpoints/latest``, ``.../epoch_0050``)::

    weights.safetensors   every network's weights (model.state_dict()), with metadata
                          (model name, contrasts, epoch, iteration); with ``train.ema``
                          also their moving average (``ema.<name>``, mrsynth.train.ema)
    state.pt              optimisers, schedulers, grad scaler, image pools, all RNG states,
                          epoch / step-in-epoch / iteration (torch.save, loads weights_only)
    meta.json             written last: a checkpoint without it is incomplete; holds the
                          sha256 of the two files above (``sha256``)

Loading verifies a checkpoint before using it: the files' sha256 against ``meta.json`` and
every weight finite (training never writes non-finite weights). A damaged checkpoint is a
:class:`CheckpointError` naming the file and the run's previous kept checkpoint. Checkpoints
written before the hashes existed load with the finite check alone and a
:class:`CheckpointWarning`.

A checkpoint is written into a temporary directory beside its destination and renamed into
place; the previous one is moved aside first and deleted only after the rename, so a crash at
any moment leaves either the old or the new checkpoint complete (``find_checkpoint`` falls back
to the moved-aside one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrsynth.errors import OutputError, RunError
from mrsynth.utils import os_reason

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
META = "meta.json"
FORMAT = "mrsynth-checkpoint-1"
LATEST = "latest"


class CheckpointError(RunError):
    """A checkpoint whose files changed after training wrote them (bit rot, a bad copy, an
    edit): a hash mismatch, non-finite weights or unreadable files."""


class CheckpointWarning(UserWarning):
    """A checkpoint that can only be checked partly (written before hashes were stored)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (a paper-size checkpoint is hundreds of MB)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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


@contextlib.contextmanager
def _staged(root: Path, name: str) -> Iterator[Path]:
    """A temporary directory beside ``root/name`` to build a checkpoint in (the block swaps
    it into place). If the block fails the directory is removed, and an ``OSError`` (disk
    full, permissions) becomes an :class:`OutputError` that names the checkpoint."""
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        yield tmp
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(root / name, exc) from exc
        raise


def save_checkpoint(
    root: Path, name: str, model: nn.Module, state: dict[str, Any], meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``root/name`` atomically; returns its path. ``extra``: more tensors for
    ``weights.safetensors`` (the weight average, :mod:`mrsynth.train.ema`)."""
    from safetensors.torch import save_file

    with _staged(root, name) as tmp:
        tensors = {k: v.detach().cpu().contiguous()
                   for k, v in {**model.state_dict(), **(extra or {})}.items()}
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
        hashes = {f: sha256_file(tmp / f) for f in (WEIGHTS, STATE)}
        (tmp / META).write_text(
            json.dumps({"format": FORMAT, **meta, "sha256": hashes}, indent=2) + "\n"
        )
        for f in (WEIGHTS, STATE, META):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        final = root / name
        _swap_into_place(tmp, final)
    return final


def _write_error(dest: Path, exc: OSError) -> OutputError:
    """A checkpoint that cannot be written: which, why, and that the run can resume."""
    return OutputError(
        f"Cannot write the checkpoint {dest}: {os_reason(dest, exc)}. The previous checkpoint "
        f"is unchanged; free space or fix the permissions of {dest.parent}, then continue with "
        f"`mrsynth train --out {dest.parent.parent} --resume`."
    )


def copy_checkpoint(root: Path, src: str, dst: str) -> Path:
    """Keep a copy of a checkpoint under another name (e.g. ``epoch_0050``), atomically."""
    with _staged(root, dst) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(root / src, tmp)
        _swap_into_place(tmp, root / dst)
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
        meta = json.loads((ckpt / META).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise damaged(ckpt, META, f"cannot be read ({exc})") from exc
    return meta


def _epoch_of(ckpt: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads((ckpt / META).read_text())["epoch"])
    return None


def kept_checkpoints(root: Path) -> list[tuple[str, int]]:
    """``(name, epoch)`` of the complete checkpoints in ``root`` other than ``latest``,
    oldest first (the ``epoch_NNNN`` copies ``train.keep_every_epochs`` keeps)."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            epoch = _epoch_of(p) if is_complete(p) else None
            if p.name != LATEST and not p.name.startswith(".") and epoch is not None:
                found.append((p.name, epoch))
    return sorted(found, key=lambda t: (t[1], t[0]))


def damaged(ckpt: Path, file: str, problem: str, lead: str | None = None) -> CheckpointError:
    """The error for a damaged checkpoint file: which file, what is wrong (``problem``, or
    ``lead`` as the whole first sentence), and which of the run's kept checkpoints to fall
    back to (the newest one not after the damaged one)."""
    ckpt = Path(ckpt)
    epoch = _epoch_of(ckpt)
    kept = [(n, e) for n, e in kept_checkpoints(ckpt.parent) if n != ckpt.name]
    msg = lead or (f"Checkpoint file {ckpt / file} is damaged: {problem}. It changed after "
                   "training wrote it (a disk or copy error, or an edit).")
    before = [(n, e) for n, e in kept if epoch is None or e <= epoch]
    if not kept:
        return CheckpointError(
            f"{msg} The run keeps no other checkpoint (train.keep_every_epochs); train it "
            "again, or restore the run directory from a backup."
        )
    listing = ", ".join(f"{n} (epoch {e})" for n, e in kept)
    if not before:
        return CheckpointError(
            f"{msg} Kept checkpoints: {listing}; none is older than the damaged one. Train "
            "the run again or restore it from a backup."
        )
    name, e = before[-1]
    prev = ckpt.parent / name
    if ckpt.name in (LATEST, f".old-{LATEST}"):
        how = (f"To continue from it, replace the damaged checkpoint with a copy of it "
               f"(`rm -r {ckpt} && cp -r {prev} {ckpt.parent / LATEST}`) and run the "
               f"command again (`mrsynth train --out {ckpt.parent.parent} --resume` then "
               f"continues training after epoch {e}).")
    else:
        how = f"Load that one instead (`load_run(RUN_DIR, checkpoint={name!r})`)."
    return CheckpointError(
        f"{msg} Kept checkpoints: {listing}. The previous kept one is {name} (epoch {e}). "
        f"{how}"
    )


def _stored_hash(ckpt: Path, file: str) -> str | None:
    hashes = read_meta(ckpt).get("sha256")
    if hashes is None:
        return None
    if not isinstance(hashes, dict) or not isinstance(hashes.get(file), str):
        raise damaged(ckpt, META, f"its sha256 entry for {file} is missing or malformed")
    return hashes[file]


def _verify_hash(ckpt: Path, file: str, actual: str) -> bool:
    """Compare a file's sha256 with meta.json's; False when meta.json has none (an older
    checkpoint)."""
    expected = _stored_hash(ckpt, file)
    if expected is None:
        return False
    if actual != expected:
        raise damaged(
            ckpt, file, f"its sha256 is {actual[:16]}..., not the {expected[:16]}... "
            f"recorded in {META} when it was written"
        )
    return True


def load_weights(ckpt: Path, device: torch.device | str = "cpu") -> tuple[dict, dict[str, str]]:
    """The verified weights and safetensors metadata of a checkpoint.

    Unreadable files, a sha256 that differs from meta.json's and non-finite weights are a
    :class:`CheckpointError`; a checkpoint without stored hashes gets the finite check and a
    :class:`CheckpointWarning`.
    """
    from safetensors import SafetensorError, safe_open

    path = ckpt / WEIGHTS
    try:
        actual = sha256_file(path)  # first: the read also warms the page cache for safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(ckpt, WEIGHTS, "", lead=(
            f"Cannot read the weights {path}: {exc}. The checkpoint is damaged or not an "
            "mrsynth checkpoint."
        )) from exc
    if meta.get("format") != FORMAT:
        raise RunError(f"{path} is not an mrsynth checkpoint (format {meta.get('format')!r}).")
    # the specific problem first: training never writes non-finite weights
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point()]
    if floats and not torch.stack([torch.isfinite(t).all() for _, t in floats]).all().item():
        bad = [k for k, t in floats if not torch.isfinite(t).all()]
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise damaged(ckpt, WEIGHTS, f"non-finite (NaN or infinite) values in {shown}")
    if not _verify_hash(ckpt, WEIGHTS, actual):
        warnings.warn(
            f"Checkpoint {ckpt} has no stored sha256 (written by an older mrsynth): only "
            "checking that its weights are finite (checkpoints written from now on, e.g. by "
            "`mrsynth train --resume`, store them).",
            CheckpointWarning, stacklevel=2,
        )
    return tensors, meta


def load_state(ckpt: Path) -> dict[str, Any]:
    """The training state, after checking its sha256 against meta.json's (when stored)."""
    path = ckpt / STATE
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise damaged(ckpt, STATE, f"cannot be read ({exc})") from exc
    _verify_hash(ckpt, STATE, actual)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise damaged(ckpt, STATE, "", lead=(
            f"Cannot read the training state {path}: {exc}. The checkpoint is damaged."
        )) from exc


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
