"""Checkpoints and resume: exact continuation, interrupted and killed runs, load_run errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import signal_during_step
from mrsynth.cli import main
from mrsynth.errors import RunError
from mrsynth.train import checkpoint as ckpt
from mrsynth.train.config import resolve_config
from mrsynth.train.runs import direction_name, load_run, parse_direction
from mrsynth.train.trainer import train

MRSYNTH = Path(sys.executable).parent / "mrsynth"


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "latest" / "weights.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"weights differ: {diff}"


def loss_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "losses.csv") as fh:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(fh)]


#: metrics.json fields of an epoch that may differ after a resume: wall times (they exclude
#: the downtime) and the throughput derived from them, and the flag that says it happened.
RESUME_FREE = ("wall_s", "images_per_s", "resumed_mid_epoch")


def epoch_rows(run_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in e.items() if k not in RESUME_FREE} for e in doc["epochs"]]


RESUME_ARCH = {
    # pool of 3 so that pool swaps (and their RNG) happen within the run
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8, "loss.pool_size": 3},
    # latent noise and dropout draw from the global RNG
    "unit": {"arch.nef": 4, "arch.ndf": 4},
}


def resume_config(model: str, epochs: int) -> dict[str, Any]:
    return resolve_config(model, "cpu-small", {
        "train.epochs": epochs, "train.max_steps_per_epoch": 6, "train.batch_size": 2,
        "train.lr_decay": "linear", "train.decay_start_epoch": 2, "train.log_every": 2,
        "train.progress": False, "train.checkpoint_every_minutes": 0,
        "train.deterministic": True, "data.image_size": 32, **RESUME_ARCH[model],
    })


@pytest.mark.parametrize("model", ["cyclegan", "unit"])
def test_two_epochs_equal_one_epoch_resume_one_epoch(
    model: str, prepared_small: Path, tmp_path: Path
) -> None:
    straight = train(resume_config(model, 2), prepared_small, tmp_path / "straight")
    split = train(resume_config(model, 1), prepared_small, tmp_path / "split")
    assert json.loads((split / "metrics.json").read_text())["epochs_completed"] == 1
    # Resume with more epochs (an allowed change): the stored config is used otherwise.
    train(resume_config(model, 2), None, split, resume=True)
    assert_same_weights(straight, split)
    assert loss_rows(straight) == loss_rows(split)
    ms = json.loads((straight / "metrics.json").read_text())
    mr = json.loads((split / "metrics.json").read_text())
    assert [e["lr"] for e in ms["epochs"]] == [e["lr"] for e in mr["epochs"]]
    lr = ms["epochs"][1]["lr"]["G"]
    assert lr == pytest.approx(0.5 * ms["epochs"][0]["lr"]["G"])  # decay 2 of 2: (2-2+1)/2
    hist = json.loads((split / "config.json").read_text())["history"]
    assert [h["event"] for h in hist] == ["start", "resume"]


# ------------------------------------------------------------------------- interrupted runs
INTERRUPT_ARGS = [
    "--model", "cyclegan", "--preset", "cpu-small", "--epochs", "2", "--seed", "3",
    "--max-steps-per-epoch", "50",
    "--set", "arch.ngf=4", "--set", "arch.n_blocks=1", "--set", "arch.ndf=8",
    "--set", "loss.pool_size=3", "--set", "data.image_size=32", "--set", "train.num_threads=1",
    "--set", "train.deterministic=true", "--set", "train.progress=false",
    "--set", "train.log_every=5",
    # a timed checkpoint every ~0.1 s, so a kill lands mid-epoch after one exists
    "--set", "train.checkpoint_every_minutes=0.0015",
]


@pytest.fixture(scope="module")
def reference_run(prepared_small: Path, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--data", str(prepared_small), "--out", str(out),
                 *INTERRUPT_ARGS]) == 0
    return out


def _start_and_stop(prepared_small: Path, out: Path, sig: int) -> int:
    proc = subprocess.Popen(
        [str(MRSYNTH), "train", "--data", str(prepared_small), "--out", str(out),
         *INTERRUPT_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    meta = out / "checkpoints" / "latest" / "meta.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if meta.is_file():
                try:
                    m = json.loads(meta.read_text())
                except (OSError, json.JSONDecodeError):
                    m = {}
                if m.get("step_in_epoch", 0) > 0:  # a mid-epoch checkpoint exists
                    proc.send_signal(sig)
                    break
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, f"the run finished before it could be stopped:\n{output}"
    return proc.returncode


def test_sigterm_saves_mid_epoch_and_resume_matches(
    prepared_small: Path, reference_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    rc = _start_and_stop(prepared_small, out, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM  # clean exit after saving
    meta = json.loads((out / "checkpoints/latest/meta.json").read_text())
    assert meta["epoch"] < 2
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "Resuming cyclegan" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2
    assert_same_weights(reference_run, out)
    assert loss_rows(out) == loss_rows(reference_run)
    assert epoch_rows(out) == epoch_rows(reference_run)


def test_sigkill_mid_epoch_resumes_from_the_timed_checkpoint(
    prepared_small: Path, reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    rc = _start_and_stop(prepared_small, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert ckpt.is_complete(ckpt.find_checkpoint(out))
    train(None, None, out, resume=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_weights(reference_run, out)
    assert loss_rows(out) == loss_rows(reference_run)
    assert epoch_rows(out) == epoch_rows(reference_run)


@pytest.mark.parametrize("stop_at", [5, 12])
def test_logs_of_a_run_resumed_between_log_rows_equal_the_uninterrupted_ones(
    stop_at: int, prepared_small: Path, tmp_path: Path, monkeypatch
) -> None:
    """SIGTERM after iteration 5 (epoch 1) or 12 (epoch 2) of 2 x 7 steps, rows every 3: the
    resumed run's losses.csv has the same rows (iterations 3, 6, 7, 10, 13, 14) with the same
    values, and each epoch's mean losses in metrics.json cover the whole epoch."""
    from mrsynth.models.cyclegan import CycleGAN
    from mrsynth.train.trainer import TrainingInterrupted

    cfg = resolve_config("cyclegan", "cpu-small", {
        "train.epochs": 2, "train.max_steps_per_epoch": 7, "train.batch_size": 2,
        "train.log_every": 3, "train.progress": False, "train.checkpoint_every_minutes": 0,
        "train.deterministic": True, "data.image_size": 32, **RESUME_ARCH["cyclegan"],
    })
    straight = train(cfg, prepared_small, tmp_path / "straight")
    assert [int(r["iteration"]) for r in loss_rows(straight)] == [3, 6, 7, 10, 13, 14]

    step = signal_during_step(monkeypatch, CycleGAN, stop_at)
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted):
        train(cfg, prepared_small, split)
    monkeypatch.setattr(CycleGAN, "train_step", step)
    meta = json.loads((split / "checkpoints/latest/meta.json").read_text())
    assert meta["iteration"] == stop_at and meta["step_in_epoch"] == stop_at % 7
    train(None, None, split, resume=True)
    assert_same_weights(straight, split)
    assert loss_rows(split) == loss_rows(straight)
    assert epoch_rows(split) == epoch_rows(straight)


# ------------------------------------------------------------------------- checkpoint files
def test_checkpoint_swap_survives_a_crash_between_renames(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    meta = {"model": "m", "contrasts": ["T1w", "T2w"], "epoch": 1, "iteration": 5}
    root = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(root, "latest", model, {"epoch": 1}, meta)
    with torch.no_grad():
        model.weight.add_(1)
    ckpt.save_checkpoint(root, "latest", model, {"epoch": 2}, {**meta, "epoch": 2})
    assert ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "run"))["epoch"] == 2
    assert not list(root.glob(".old-*")) and not list(root.glob(".tmp-*"))
    # A crash after moving the old one aside, before the new one is in place:
    os.rename(root / "latest", root / ".old-latest")
    (root / ".tmp-latest-x").mkdir()
    found = ckpt.find_checkpoint(tmp_path / "run")
    assert found.name == ".old-latest" and ckpt.read_meta(found)["epoch"] == 2
    ckpt.clean_stale(root)
    assert not (root / ".tmp-latest-x").exists()
    # The next save starts from the restored checkpoint and completes the swap.
    ckpt.save_checkpoint(root, "latest", model, {}, {**meta, "epoch": 3})
    assert ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "run"))["epoch"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest"]
    # A half-written checkpoint (no meta.json) is never used.
    (root / "latest" / "meta.json").unlink()
    with pytest.raises(RunError, match="no complete checkpoint"):
        ckpt.find_checkpoint(tmp_path / "run")


# ------------------------------------------------------------------------- load_run errors
@pytest.fixture(scope="module")
def small_run(prepared_small: Path, tmp_path_factory) -> Path:
    cfg = resolve_config("simple", "cpu-small", {
        "arch.hidden": 8, "train.epochs": 2, "train.max_steps_per_epoch": 2,
        "train.keep_every_epochs": 1, "train.progress": False,
    })
    return train(cfg, prepared_small, tmp_path_factory.mktemp("runs") / "simple")


def test_load_run_checkpoints_and_directions(small_run: Path) -> None:
    assert sorted(p.name for p in (small_run / "checkpoints").iterdir()) == [
        "epoch_0001", "epoch_0002", "latest"]
    first = load_run(small_run, checkpoint=1)
    last = load_run(small_run)
    assert (first.epoch, last.epoch) == (1, 2)
    x = torch.zeros(1, 1, 64, 64) - 1
    assert not torch.equal(first.translate(x, "A2B"), last.translate(x, "A2B"))
    assert parse_direction("t1w2t2w", ("T1w", "T2w")) == "A2B"
    assert parse_direction("T2w->T1w", ("T1w", "T2w")) == "B2A"
    assert parse_direction("B2A", ("T1w", "T2w")) == "B2A"
    assert direction_name("B2A", ("T1w", "T2w")) == "T2w2T1w"
    with pytest.raises(Exception, match="use T1w2T2w or T2w2T1w"):
        parse_direction("FLAIR2T1w", ("T1w", "T2w"))
    with pytest.raises(RunError, match="Available: epoch_0001, epoch_0002, latest"):
        load_run(small_run, checkpoint=7)


def test_load_run_refuses_bad_run_directories(small_run: Path, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not an mrsynth run directory"):
        load_run(tmp_path)
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(small_run / "config.json", no_ckpt / "config.json")
    with pytest.raises(RunError, match="no complete checkpoint"):
        load_run(no_ckpt)

    broken = tmp_path / "broken"
    shutil.copytree(small_run, broken)
    (broken / "checkpoints/latest/weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RunError, match="Cannot read the weights"):
        load_run(broken)

    other_pair = tmp_path / "other_pair"
    shutil.copytree(small_run, other_pair)
    doc = json.loads((other_pair / "config.json").read_text())
    doc["config"]["data"]["contrasts"] = ["T1w", "FLAIR"]
    (other_pair / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="another run"):
        load_run(other_pair)

    other_model = tmp_path / "other_model"
    shutil.copytree(small_run, other_model)
    doc = json.loads((other_model / "config.json").read_text())
    doc["config"] = resolve_config("generators_s", "cpu-small")
    (other_model / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="holds a 'simple' model"):
        load_run(other_model)


def test_resume_before_the_first_checkpoint_starts_over(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    out.mkdir()
    shutil.copy(small_run / "config.json", out / "config.json")  # killed before any checkpoint
    train(None, None, out, resume=True)
    assert_same_weights(small_run, out)  # same seed, same stored settings: the same run
