"""Mid-epoch resume is bit-exact for UNIT and pix2pix too (issue 10 item 21).

``test_train_resume.py`` checks CycleGAN (image pools and their RNG) stopped by SIGTERM and
killed by SIGKILL in the middle of an epoch. UNIT draws latent noise and dropout masks from
the global torch RNG on every step, and pix2pix conditions its discriminators on the input:
each is stopped (SIGTERM: saves at the next step) or killed (SIGKILL: resumes from the last
timed checkpoint) in the middle of an epoch, resumed, and must end with weights identical to
an uninterrupted run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mrsynth.cli import main
from test_train_resume import MRSYNTH, assert_same_weights

#: Tiny networks; a timed checkpoint every ~0.1 s so a stop lands mid-epoch after one exists.
COMMON = [
    "--preset", "cpu-small", "--epochs", "2", "--seed", "5", "--max-steps-per-epoch", "40",
    "--set", "data.image_size=32", "--set", "train.num_threads=1",
    "--set", "train.deterministic=true", "--set", "train.progress=false",
    "--set", "train.log_every=5", "--set", "train.checkpoint_every_minutes=0.0015",
]
ARGS = {
    # latent noise (noise_std 1) and dropout 0.5 in the cpu-small preset: RNG on every step
    "unit": ["--model", "unit", "--set", "arch.nef=4", "--set", "arch.ndf=4", *COMMON],
    "pix2pix": ["--model", "pix2pix", "--set", "arch.ngf=4", "--set", "arch.n_blocks=1",
                "--set", "arch.ndf=8", *COMMON],
}


@pytest.fixture(scope="module")
def references(prepared_small: Path, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run of each model that the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp("reference-models")
    out = {}
    for model, args in ARGS.items():
        out[model] = root / model
        assert main(["train", "--data", str(prepared_small), "--out", str(out[model]),
                     *args]) == 0
    return out


def stop_mid_epoch(prepared_small: Path, out: Path, args: list[str], sig: int) -> int:
    """Start a run in a child process; send ``sig`` once a mid-epoch checkpoint exists."""
    proc = subprocess.Popen(
        [str(MRSYNTH), "train", "--data", str(prepared_small), "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    meta = out / "checkpoints" / "latest" / "meta.json"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                m = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                m = {}
            if m.get("epoch") == 0 and m.get("step_in_epoch", 0) > 0:
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, f"the run finished before it could be stopped:\n{output}"
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("model", list(ARGS))
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(
    model: str, sig: int, prepared_small: Path, references: dict[str, Path], tmp_path: Path,
    capsys,
) -> None:
    out = tmp_path / "run"
    rc = stop_mid_epoch(prepared_small, out, ARGS[model], sig)
    assert rc == (128 + sig if sig == signal.SIGTERM else -sig)
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["epoch"] == 0 and 0 < meta["step_in_epoch"] < 40, meta  # inside epoch 1
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"epoch 0 done, step {meta['step_in_epoch']} of the next" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2
    assert_same_weights(references[model], out)
