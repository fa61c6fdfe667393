"""Refactoring check: tiny fixed-seed CPU runs; prints the sha256 of the final weights (and
of the losses / metrics columns that hold no wall times).

A change meant to keep behaviour (issue 11's reshaping of ``train/`` was checked this way) must
print the same hashes before and after: run it in a checkout of each commit and compare.

    .venv/bin/python benchmarks/refactor_bitcheck.py [WORK_DIR]
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mrsynth.train.config import resolve_config
from mrsynth.train.trainer import train

WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mrsynth-bitcheck")
SHARED = Path(os.environ.get("MRSYNTH_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
ARCH = {
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8, "loss.pool_size": 3},
    "unit": {"arch.nef": 4, "arch.ndf": 4},
    "pix2pix": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
}


def prepared() -> Path:
    out = WORK / "prepared.npz"
    if not out.is_file():
        from mrsynth.data.prepare import prepare_dataset

        WORK.mkdir(parents=True, exist_ok=True)
        prepare_dataset(SHARED / "mrpaired", out, contrasts=("T1w", "T2w"),
                        size=(64, 64), downsample=4, slice_step=4,
                        test_subjects=("sub-ms19", "sub-met00110"), seed=0)
    return out


def config(model: str, epochs: int) -> dict:
    return resolve_config(model, "cpu-small", {
        "train.epochs": epochs, "train.max_steps_per_epoch": 5, "train.batch_size": 2,
        "train.lr_decay": "linear", "train.decay_start_epoch": 2, "train.log_every": 2,
        "train.progress": False, "train.checkpoint_every_minutes": 0, "train.samples": 2,
        "train.deterministic": True, "data.image_size": 32, "seed": 7, **ARCH[model],
    })


def weights_hash(run: Path) -> str:
    w = load_file(run / "checkpoints" / "latest" / "weights.safetensors")
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(w[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def logs_hash(run: Path) -> str:
    with open(run / "losses.csv") as fh:
        rows = [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(fh)]
    m = json.loads((run / "metrics.json").read_text())
    epochs = [{k: v for k, v in e.items() if k not in ("wall_s", "images_per_s")}
              for e in m["epochs"]]
    return hashlib.sha256(json.dumps([rows, epochs], sort_keys=True).encode()).hexdigest()


def main() -> None:
    torch.set_num_threads(1)
    data = prepared()
    for model in ARCH:
        out = WORK / "runs" / model
        shutil.rmtree(out, ignore_errors=True)
        run = train(config(model, 2), data, out)
        print(f"{model:9s} weights {weights_hash(run)}  logs {logs_hash(run)[:16]}")
    # an epoch-boundary resume as well (cyclegan): 1 epoch, then resume to 2
    out = WORK / "runs" / "cyclegan-resumed"
    shutil.rmtree(out, ignore_errors=True)
    train(config("cyclegan", 1), data, out)
    run = train(config("cyclegan", 2), None, out, resume=True)
    print(f"cyclegan-resumed weights {weights_hash(run)}  logs {logs_hash(run)[:16]}")


if __name__ == "__main__":
    main()
