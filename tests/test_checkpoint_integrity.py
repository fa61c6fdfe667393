"""Damaged checkpoints (issue 10 item 6): sha256 in meta.json, finite weights, clear errors.

A real tiny run keeps ``epoch_0002`` and ends at epoch 3 (``latest``); copies of it get NaN
or finite garbage written into their files, and every command that loads a checkpoint
(translate, evaluate, export, train --resume, ``load_run``) must refuse them with a message
that names the damaged file and the previous kept epoch, without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import warnings
from pathlib import Path

import nibabel as nib
import pytest
import torch

from mrsynth.cli import main
from mrsynth.train import checkpoint as ckpt
from mrsynth.train.config import resolve_config
from mrsynth.train.runs import load_run
from mrsynth.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def run3(prepared_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs of the small L1 model, keeping every 2nd epoch: epoch_0002 and latest (3)."""
    cfg = resolve_config("simple", "cpu-small", {
        "arch.hidden": 8, "train.epochs": 3, "train.max_steps_per_epoch": 2,
        "train.keep_every_epochs": 2, "train.progress": False,
    })
    return train(cfg, prepared_small, tmp_path_factory.mktemp("integrity") / "run")


@pytest.fixture
def run_copy(run3: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run3, dest)
    return dest


@pytest.fixture(scope="module")
def volume(mrpaired: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four axial slices through a real T1w brain (nibabel keeps the header)."""
    img = nib.load(mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz")
    dest = tmp_path_factory.mktemp("vol") / "sub-ms19_T1w.nii.gz"
    nib.save(img.slicer[:, :, 70:74], dest)
    return dest


def tensor_spans(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (dtype, start, end) byte offsets in a safetensors file, from its header
    (8-byte little-endian length, then JSON), read independently of the library."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    return {k: (v["dtype"], base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def overwrite_float(path: Path, value: float, count: int = 4) -> str:
    """Write ``value`` over the first ``count`` float32s of the largest F32 tensor; its name."""
    spans = {k: s for k, s in tensor_spans(path).items() if s[0] == "F32"}
    name, (_, start, end) = max(spans.items(), key=lambda kv: kv[1][2] - kv[1][1])
    assert end - start >= 4 * count
    raw = bytearray(path.read_bytes())
    raw[start : start + 4 * count] = struct.pack("<f", value) * count
    path.write_bytes(bytes(raw))
    return name


NAN = "non-finite (NaN or infinite) values in"


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "latest"


def assert_clear_error(rc: int, err: str, damaged_file: Path, problem: str) -> None:
    """Non-zero exit, no traceback, the damaged file, the problem and the previous kept
    epoch named."""
    assert rc != 0, err
    assert "Traceback" not in err
    assert f"Checkpoint file {damaged_file} is damaged: {problem}" in err
    assert "previous kept one is epoch_0002 (epoch 2)" in err


# ------------------------------------------------------------------------------- saving
def test_meta_json_holds_the_sha256_of_every_checkpoint_file(run3: Path) -> None:
    for name in ("latest", "epoch_0002"):
        d = run3 / "checkpoints" / name
        meta = json.loads((d / "meta.json").read_text())
        for f in ("weights.safetensors", "state.pt"):
            assert meta["sha256"][f] == hashlib.sha256((d / f).read_bytes()).hexdigest()
    assert ckpt.kept_checkpoints(run3 / "checkpoints") == [("epoch_0002", 2)]


def test_a_good_checkpoint_loads_without_warnings(run3: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt.CheckpointWarning)
        run = load_run(run3)
        kept = load_run(run3, checkpoint=2)
    assert (run.epoch, kept.epoch) == (3, 2)
    x = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    assert torch.isfinite(run.translate(x, "A2B")).all()


# ------------------------------------------------------------------ NaN bytes in the weights
def test_nan_weights_are_refused_by_translate(run_copy: Path, volume: Path, tmp_path: Path,
                                              capsys) -> None:
    weights = latest(run_copy) / ckpt.WEIGHTS
    overwrite_float(weights, float("nan"))
    out = tmp_path / "t2.nii.gz"
    rc = main(["translate", "--run", str(run_copy), "--direction", "T1w2T2w",
               "--input", str(volume), "--output", str(out), "--device", "cpu"])
    assert_clear_error(rc, capsys.readouterr().err, weights, NAN)
    assert not out.exists()


def test_nan_weights_are_refused_by_evaluate(run_copy: Path, prepared_small: Path,
                                             tmp_path: Path, capsys) -> None:
    weights = latest(run_copy) / ckpt.WEIGHTS
    overwrite_float(weights, float("nan"))
    rc = main(["evaluate", "--runs", str(run_copy), "--data", str(prepared_small),
               "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert_clear_error(rc, capsys.readouterr().err, weights, NAN)


def test_nan_weights_are_refused_by_export(run_copy: Path, tmp_path: Path, capsys) -> None:
    weights = latest(run_copy) / ckpt.WEIGHTS
    overwrite_float(weights, float("nan"))
    rc = main(["export", "--run", str(run_copy), "--direction", "T1w2T2w",
               "--out", str(tmp_path / "g.onnx")])
    assert_clear_error(rc, capsys.readouterr().err, weights, NAN)
    assert not (tmp_path / "g.onnx").exists()


def test_nan_weights_are_refused_by_resume_and_the_advice_works(run_copy: Path,
                                                                capsys) -> None:
    weights = latest(run_copy) / ckpt.WEIGHTS
    overwrite_float(weights, float("nan"))
    before = (run_copy / "metrics.json").read_bytes()
    rc = main(["train", "--out", str(run_copy), "--resume", "--epochs", "4"])
    err = capsys.readouterr().err
    assert_clear_error(rc, err, weights, NAN)
    assert "diverged" not in err and "non-finite loss" not in err
    assert (run_copy / "metrics.json").read_bytes() == before  # the run was not touched
    # The message's advice: replace latest with the kept epoch 2, resume from there.
    shutil.rmtree(latest(run_copy))
    shutil.copytree(run_copy / "checkpoints" / "epoch_0002", latest(run_copy))
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "4"]) == 0
    assert "epoch 2 done" in capsys.readouterr().err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 4


def test_checkpoint_without_hashes_gets_the_finite_check_and_a_warning(run_copy: Path) -> None:
    """Checkpoints written before the hashes existed: loaded with a warning; NaN refused."""
    meta_path = latest(run_copy) / ckpt.META
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(ckpt.CheckpointWarning, match="no stored sha256"):
        assert load_run(run_copy).epoch == 3
    name = overwrite_float(latest(run_copy) / ckpt.WEIGHTS, float("inf"))
    with pytest.raises(ckpt.CheckpointError) as exc:
        load_run(run_copy)
    msg = str(exc.value)
    assert f"non-finite (NaN or infinite) values in {name}" in msg
    assert str(latest(run_copy) / ckpt.WEIGHTS) in msg and "epoch_0002 (epoch 2)" in msg


# ------------------------------------------------------------------------- finite garbage
def test_finite_garbage_in_the_weights_is_a_sha256_mismatch(run_copy: Path) -> None:
    weights = latest(run_copy) / ckpt.WEIGHTS
    good = load_run(run_copy).model.state_dict()
    name = overwrite_float(weights, 0.123)
    assert torch.isfinite(load_file_tensor(weights, name)).all()  # still finite
    assert not torch.equal(load_file_tensor(weights, name), good[name].cpu())
    with pytest.raises(ckpt.CheckpointError) as exc:
        load_run(run_copy)
    assert f"Checkpoint file {weights} is damaged: its sha256 is" in str(exc.value)
    assert "previous kept one is epoch_0002 (epoch 2)" in str(exc.value)


def load_file_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)[name]


def test_changed_training_state_is_refused_on_resume(run_copy: Path, capsys) -> None:
    state = latest(run_copy) / ckpt.STATE
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    state.write_bytes(bytes(raw))
    rc = main(["train", "--out", str(run_copy), "--resume", "--epochs", "4"])
    err = capsys.readouterr().err
    assert_clear_error(rc, err, state, "its sha256 is")
    # inference does not need the training state: load_run still works
    assert load_run(run_copy).epoch == 3


def test_a_damaged_kept_checkpoint_points_to_an_older_one_or_says_there_is_none(
    run_copy: Path,
) -> None:
    kept = run_copy / "checkpoints" / "epoch_0002"
    overwrite_float(kept / ckpt.WEIGHTS, float("nan"))
    with pytest.raises(ckpt.CheckpointError, match="keeps no other checkpoint"):
        load_run(run_copy, checkpoint=2)


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_keeps_the_previous(
        run_copy: Path, prepared_small: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A full disk while a checkpoint is written: exit 2 with a message that names the
    checkpoint, says the previous one is unchanged and how to resume; no temporary directory
    is left and the previous checkpoint still loads and resumes."""
    import errno

    latest = run_copy / "checkpoints" / "latest"
    before = {p.name: p.read_bytes() for p in latest.iterdir()}

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(ckpt.torch, "save", full)
    rc = main(["train", "--out", str(run_copy), "--resume", "--set", "train.epochs=4"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert f"Cannot write the checkpoint {latest}" in err and "No space left" in err
    assert "previous checkpoint is unchanged" in err and "--resume" in err
    assert "Traceback" not in err
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == before
    monkeypatch.undo()
    assert main(["train", "--out", str(run_copy), "--resume", "--set", "train.epochs=4"]) == 0
    assert json.loads((latest / "meta.json").read_text())["epoch"] == 4
