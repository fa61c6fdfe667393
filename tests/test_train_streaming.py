"""Training that streams (issue 13 item 3): batches read from the prepared store by a
DataLoader equal the resident path's bit for bit, also across a mid-epoch resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import signal_during_step
from mrsynth.data import store as st
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError
from mrsynth.train.config import resolve_config
from mrsynth.train.dataset import (
    EpochDraws,
    EpochSampler,
    load_training_slices,
    patch_sampler,
)
from mrsynth.train.loader import StepBatches, decide_on_device, step_loader
from mrsynth.train.trainer import train
from test_train_resume import assert_same_weights, loss_rows

TINY = {
    "generators_s": {"arch.ngf": 4, "arch.n_blocks": 1},
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8, "loss.pool_size": 3},
}


@pytest.fixture(scope="module")
def store(prepared_small: Path, tmp_path_factory) -> Path:
    """The shared small data as a (float16) store: the lazy, sharded reader."""
    out = tmp_path_factory.mktemp("store") / "small.mrs"
    return st.write_store_from(load_prepared(prepared_small), out)


@pytest.fixture(scope="module")
def context_store(prepared_context: Path, tmp_path_factory) -> Path:
    """Every slice (neighbours kept, for 2.5-D) as a store."""
    out = tmp_path_factory.mktemp("store") / "ctx.mrs"
    return st.write_store_from(load_prepared(prepared_context), out)


def config(model: str, on_device: Any, workers: int | None = 0, image_size: int | None = None,
           patch: int = 32, **extra: Any) -> dict[str, Any]:
    return resolve_config(model, "cpu-small", {
        "train.epochs": 2, "train.max_steps_per_epoch": 4, "train.batch_size": 2,
        "train.patch_size": patch, "data.image_size": image_size, "train.log_every": 2,
        "train.progress": False, "train.checkpoint_every_minutes": 0,
        "train.deterministic": True, "train.val_slices": 2, "train.num_threads": 1,
        "train.data_on_device": on_device, "train.loader_workers": workers,
        **TINY[model], **extra,
    })


def execution(run: Path) -> dict[str, Any]:
    """How the run's last start was executed (config.json's history entry)."""
    return json.loads((run / "config.json").read_text())["history"][-1]


@pytest.mark.parametrize("model,image_size,patch,context,tp", [
    ("generators_s", None, 32, 0, 0.0), ("cyclegan", 32, 16, 0, 0.0),
    ("generators_s", None, 32, 1, 0.0), ("cyclegan", 32, 16, 1, 0.0),
    ("generators_s", None, 32, 1, 0.5)])
def test_streamed_batches_train_the_same_weights_as_resident_slices(
    model: str, image_size: int | None, patch: int, context: int, tp: float, store: Path,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """generators_s at the prepared size (only the patch windows are read) and cyclegan
    downsampled (whole slices read, resampled, cropped), in 2-D and 2.5-D (each row's
    neighbours read and cropped at its window; with the through-plane loss also each row's
    next slice and its stack): 0 and 2 loader workers give the resident run's weights and
    losses exactly."""
    extra: dict[str, Any] = {"arch.context_slices": context}
    if tp:
        extra["loss.through_plane"] = tp
    if context:
        store = request.getfixturevalue("context_store")
    resident = train(config(model, True, image_size=image_size, patch=patch, **extra), store,
                     tmp_path / "resident")
    assert execution(resident)["data_on_device"] is True
    for workers in (0, 2):
        out = train(config(model, False, workers, image_size, patch, **extra), store,
                    tmp_path / f"stream{workers}")
        assert execution(out)["data_on_device"] is False
        assert execution(out)["loader_workers"] == workers
        assert_same_weights(resident, out)
        assert loss_rows(out) == loss_rows(resident)


def test_streamed_batch_equals_the_resident_crop(store: Path) -> None:
    """The loader's items are the resident path's crops at the sampler's windows."""
    data = load_prepared(store)
    args = (data, ("T1w", "T2w"), "cyclegan", False, None, torch.device("cpu"))
    resident = load_training_slices(*args)
    streamed = load_training_slices(*args, on_device=False)
    assert streamed.A is None and streamed.n_A == resident.A.shape[0]
    draws = EpochDraws(EpochSampler(streamed.n_A, streamed.n_B, False, 3, seed=5),
                       patch_sampler(streamed, 24, 0.9, seed=5))
    ia, ib, wa, wb, _ = draws.draw()
    from mrsynth.data.patches import crop

    batches = list(step_loader(StepBatches(streamed, ("T1w", "T2w"), ia, ib, wa, wb,
                                           (24, 24)), 1, 0, torch.device("cpu")))
    assert len(batches) == ia.shape[0] - 1  # started at step 1
    for s, b in enumerate(batches, start=1):
        assert torch.equal(b["A"], crop(resident.A, ia[s], wa[s], (24, 24)))
        assert torch.equal(b["B"], crop(resident.B, ib[s], wb[s], (24, 24)))


def test_sigterm_mid_epoch_and_resume_while_streaming_equals_uninterrupted(
    store: Path, tmp_path: Path, monkeypatch
) -> None:
    """Stopped during step 6 (epoch 2, step 2 of 4) and resumed: the loader starts at the
    saved step; weights and losses equal the uninterrupted resident run's (augmentation on:
    the streamed batches get the same flips and gamma)."""
    from mrsynth.models.cyclegan import CycleGAN
    from mrsynth.train.trainer import TrainingInterrupted

    aug = {"train.augment_flip": 0.5, "train.augment_gamma": 0.3}
    straight = train(config("cyclegan", True, image_size=32, patch=16, **aug), store,
                     tmp_path / "straight")
    step = signal_during_step(monkeypatch, CycleGAN, 6)
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted):
        train(config("cyclegan", False, 2, image_size=32, patch=16, **aug), store, split)
    monkeypatch.setattr(CycleGAN, "train_step", step)
    meta = json.loads((split / "checkpoints/latest/meta.json").read_text())
    assert meta["iteration"] == 6 and meta["step_in_epoch"] == 2
    train(None, None, split, resume=True)
    assert_same_weights(straight, split)
    assert loss_rows(split) == loss_rows(straight)


def test_auto_keeps_a_small_set_on_the_device(store: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert decide_on_device("auto", 10 << 20, cpu)  # 10 MB: fits any test machine
    assert not decide_on_device("auto", 1 << 60, cpu)  # an exabyte does not
    assert decide_on_device(True, 1 << 60, cpu) and not decide_on_device(False, 1, cpu)
    out = train(config("generators_s", "auto", patch=32, **{"train.epochs": 1}), store,
                tmp_path / "auto")
    assert execution(out)["data_on_device"] is True


def test_data_on_device_and_loader_workers_are_validated(store: Path) -> None:
    cfg = resolve_config("cyclegan", "cpu-small", {"train.data_on_device": "false"})
    assert cfg["train"]["data_on_device"] is False  # `--set train.data_on_device=false`
    with pytest.raises(ConfigError, match="data_on_device must be true, false or auto"):
        resolve_config("cyclegan", "cpu-small", {"train.data_on_device": "sometimes"})
    with pytest.raises(ConfigError, match="loader_workers must be an integer >= 0"):
        resolve_config("cyclegan", "cpu-small", {"train.loader_workers": -1})



def test_default_loader_workers_read_in_the_trainer_on_a_cpu(store: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """``train.loader_workers`` null: a CPU run reads in the training process (worker
    processes only take cores from the training step); CUDA gets min(4, cores - 1)."""
    from mrsynth.train import loader

    out = train(config("generators_s", False, None, **{"train.epochs": 1}), store,
                tmp_path / "default")
    assert execution(out)["loader_workers"] == 0
    from mrsynth import utils

    monkeypatch.setattr(utils, "available_cores", lambda: 16)
    assert loader.default_workers(torch.device("cuda")) == 4
    monkeypatch.setattr(utils, "available_cores", lambda: 2)
    assert loader.default_workers(torch.device("cuda")) == 1
    assert loader.default_workers(torch.device("cpu")) == 0
