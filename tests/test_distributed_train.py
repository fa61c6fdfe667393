"""The trainer under torchrun (gloo, 2 CPU processes): same run as one process with the same
global batch, resume with another number of ranks, and only rank 0 writes.

Comparisons are made where fp32 GAN training allows them to be tight (see
tests/test_distributed.py for the near-exact float64 check of the DDP mechanism itself):
``generators_s`` (no adversary) is compared end to end; for ``cyclegan`` the first step after
resuming from one shared checkpoint is compared, because afterwards Adam turns rounding-level
gradient differences of near-zero gradients into +-lr steps and the adversarial game amplifies
them (the same happens between any two implementations that sum in another order).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.train import distributed as dd
from mrsynth.train.config import resolve_config
from mrsynth.train.runs import load_run
from mrsynth.train.trainer import train

TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY_ARGS = ["--preset", "cpu-small", "--max-steps-per-epoch", "3", "--batch-size", "2",
             "--seed", "1", "--set", "arch.ngf=4", "--set", "arch.n_blocks=1",
             "--set", "data.image_size=32", "--set", "train.progress=false",
             "--set", "train.log_every=1", "--set", "train.checkpoint_every_minutes=0",
             "--set", "train.num_threads=1", "--set", "train.samples=2",
             "--set", "train.lr_decay=none",  # a 1-epoch start must not decay the rate
             # the ResNet on patches, as cpu-small's generators_s was when this was written:
             # with the U-Net the DDP epoch matches to 1e-5 too, but the epoch resumed on one
             # process drifts to ~2e-4 (Adam's first steps move each weight by about +-lr
             # whatever the gradient's size, so rounding-level differences show)
             "--set", "arch.generator=resnet", "--set", "arch.upsample=transpose",
             "--set", "train.patch_size=64"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for v in dd.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)


def loss_rows(run: Path) -> list[dict[str, float]]:
    with open(run / "losses.csv") as fh:
        return [{k: float(v) for k, v in r.items() if k != "images_per_s"}
                for r in csv.DictReader(fh)]


def history(run: Path) -> list[tuple[str, int, int]]:
    doc = json.loads((run / "config.json").read_text())
    return [(h["event"], h["world_size"], h["per_rank_batch"]) for h in doc["history"]]


def assert_close_rows(got: dict[str, float], ref: dict[str, float], rtol: float) -> None:
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert abs(got[k] - v) <= rtol * max(abs(v), 1e-3), (k, got[k], v)


# ---------------------------------------------------------------------- torchrun, 2 -> 1
def test_torchrun_two_ranks_then_resume_on_one_matches_one_process(
    prepared_small: Path, tmp_path: Path
) -> None:
    data = str(prepared_small)
    ref, run = tmp_path / "ref", tmp_path / "ddp"
    assert main(["train", "--model", "generators_s", "--data", data, "--out", str(ref),
                 "--epochs", "2", *TINY_ARGS]) == 0

    env = {k: v for k, v in os.environ.items() if k not in dd.TORCHRUN_VARS}
    # A global batch that does not split over the ranks is refused before anything is written.
    bad = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "mrsynth", "train",
         "--model", "generators_s", "--data", data, "--out", str(tmp_path / "bad"),
         *TINY_ARGS, "--batch-size", "3"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert bad.returncode != 0
    assert "batch_size 3 is the global batch and must be a multiple of the 2 ranks" in bad.stderr
    assert not (tmp_path / "bad").exists()

    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "mrsynth", "train",
         "--model", "generators_s", "--data", data, "--out", str(run), "--epochs", "1",
         *TINY_ARGS],
        capture_output=True, text=True, timeout=300, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("Run written to") == 1 and out.count("epoch 1/1") == 1  # rank 0 talks
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["per_rank_batch"], metrics["backend"]) == (2, 1,
                                                                                    "gloo")
    assert metrics["steps_per_epoch"] == 3 and metrics["batch_size"] == 2
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "losses.csv", "metrics.json", "samples"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest"]

    # Resume the 2-rank run in one process: the global batch (2) and the steps stay the same.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert history(run) == [("start", 2, 1), ("resume", 1, 2)]
    assert json.loads((run / "metrics.json").read_text())["epochs_completed"] == 2

    got, want = loss_rows(run), loss_rows(ref)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want, strict=True):  # DDP logs the mean over the global batch
        assert_close_rows(g, w, 1e-5)
    wa = load_file(run / "checkpoints/latest/weights.safetensors")
    wb = load_file(ref / "checkpoints/latest/weights.safetensors")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wb])
    # all but the elements whose gradient is rounding noise (Adam moves those by +-lr)
    assert (diff <= 1e-6).float().mean() > 0.97, (diff > 1e-6).float().mean()
    d = load_prepared(prepared_small)
    x = torch.from_numpy(d.images["T1w"][d.split == "test"][:6])[:, None]
    ya, yb = load_run(run).translate(x, "A2B"), load_run(ref).translate(x, "A2B")
    assert (ya - yb).abs().max() < 1e-5
    assert (yb - x).abs().mean() > 0.1  # the runs learnt something: not a trivial match


# ---------------------------------------------------------------------- spawn, 1 -> 2
def _write_guard(root: Path) -> list[tuple[str, str]]:
    """Record every attempt of this process to create, change or delete files under root."""
    events: list[tuple[str, str]] = []
    prefix = str(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    changing = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree",
                "os.truncate", "os.symlink", "os.link"}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, _mode, flags = args
            if isinstance(path, str | bytes | os.PathLike) and isinstance(flags, int) and (
                    flags & write_flags) and os.fsdecode(path).startswith(prefix):
                events.append((event, os.fsdecode(path)))
        elif (event in changing and args and isinstance(args[0], str | bytes | os.PathLike)
              and os.fsdecode(args[0]).startswith(prefix)):
            # a rename is recorded by its destination: the file it puts in place
            target = args[1] if event == "os.rename" else args[0]
            events.append((event, os.fsdecode(target)))

    sys.addaudithook(hook)
    return events


def _resume_worker(rank: int, world: int, port: int, cfg: dict[str, Any], run: str,
                   report: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    events = _write_guard(Path(run))
    train(cfg, None, run, resume=True)
    assert not dd.initialized()  # train() left the group it joined
    with open(f"{report}.{rank}.json", "w") as fh:  # outside the run directory
        json.dump(events, fh)


def test_resume_one_process_run_on_two_ranks_and_only_rank0_writes(
    prepared_small: Path, tmp_path: Path
) -> None:
    def cfg(epochs: int) -> dict[str, Any]:
        return resolve_config("cyclegan", "cpu-small", {
            "train.epochs": epochs, "train.max_steps_per_epoch": 2, "train.batch_size": 2,
            "train.log_every": 1, "train.progress": False, "train.samples": 2,
            "train.checkpoint_every_minutes": 0, "train.num_threads": 1, "seed": 2,
            "train.lr_decay": "none",
            "arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8, "data.image_size": 32,
        })

    ref = train(cfg(2), prepared_small, tmp_path / "ref")
    run = train(cfg(1), prepared_small, tmp_path / "run")
    mp.spawn(_resume_worker, args=(2, free_port(), cfg(2), str(run), str(tmp_path / "events")),
             nprocs=2, join=True)

    rank0 = json.loads((tmp_path / "events.0.json").read_text())
    rank1 = json.loads((tmp_path / "events.1.json").read_text())
    assert rank1 == []  # rank 1 created, changed and deleted nothing in the run directory
    put_in_place = {Path(p).name for e, p in rank0 if e == "os.rename"}
    assert {"config.json", "losses.csv", "metrics.json", "epoch_0002.png",
            "latest"} <= put_in_place  # ... while rank 0 wrote the run's files

    assert history(run) == [("start", 1, 2), ("resume", 2, 1)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 2
    assert (run / "samples" / "epoch_0002.png").is_file()
    got, want = loss_rows(run), loss_rows(ref)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == [1, 2, 3, 4]
    assert got[:2] == want[:2]  # the one-process epoch is kept as it was
    # Iteration 3 is the first on two ranks, from the checkpoint both runs share: the mean of
    # the ranks' losses is the loss of the global batch.
    assert_close_rows(got[2], want[2], 1e-5)
    assert np.isfinite([v for r in got for v in r.values()]).all()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
