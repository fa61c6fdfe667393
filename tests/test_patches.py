"""Random training patches (:mod:`mrsynth.data.patches`): shapes, brain content, pairing,
reproducibility from the generator state."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import one_torch_thread, straight_and_resumed, tiny_arch
from mrsynth.data.patches import PatchSampler, crop, patch_shape
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError
from mrsynth.models.base import model_names
from mrsynth.train.config import resolve_config


@pytest.fixture(scope="module")
def train(prepared_small: Path):
    d = load_prepared(prepared_small)
    rows = np.flatnonzero(d.split == "train")
    return d.images["T1w"][rows], d.images["T2w"][rows], d.mask[rows]


def _brain_share(masks: np.ndarray, rows: torch.Tensor, win: torch.Tensor, p: int) -> np.ndarray:
    r, w = rows.reshape(-1).numpy(), win.reshape(-1, 2).numpy()
    return np.array([masks[i, t:t + p, c:c + p].mean() for i, (t, c) in zip(r, w, strict=True)])


def test_windows_lie_inside_and_crop_is_plain_slicing(train):
    a, b, masks = train
    s = PatchSampler(masks, None, 24, 0.9, seed=0)
    assert s.patch == (24, 24) and s.paired
    rows = torch.randint(0, len(masks), (5, 3), generator=torch.Generator().manual_seed(1))
    wa, wb = s.draw(rows)
    assert wa.shape == (5, 3, 2) and wa.dtype == torch.int64
    assert torch.equal(wa, wb)  # paired: the same window in source and target
    assert (wa >= 0).all() and (wa <= 64 - 24).all()
    x = torch.from_numpy(a)[:, None]
    got = crop(x, rows[0], wa[0], s.patch)
    assert got.shape == (3, 1, 24, 24) and got.is_contiguous()
    for k in range(3):
        t, c = wa[0, k].tolist()
        np.testing.assert_array_equal(got[k, 0].numpy(), a[rows[0, k], t:t + 24, c:c + 24])


def test_most_patches_contain_brain(train):
    _, _, masks = train
    p = 24
    rows = torch.arange(len(masks)).repeat(20)
    share = {}
    for frac in (0.0, 0.9, 1.0):
        win, _ = PatchSampler(masks, None, p, frac, seed=3).draw(rows)
        share[frac] = _brain_share(masks, rows, win, p)
    # centred on a brain voxel: every patch holds brain, and most of them mostly brain
    has_brain = masks.reshape(len(masks), -1).any(1)[rows.numpy()]
    assert (share[1.0][has_brain] > 0).all()
    assert (share[0.9] > 0).mean() > 0.9
    assert share[0.9].mean() > share[0.0].mean() + 0.05
    # uniform windows: every position equally likely (top-left over 0..64-p)
    uni, _ = PatchSampler(masks, None, p, 0.0, seed=4).draw(torch.zeros(20000, dtype=torch.long))
    counts = np.bincount(uni[:, 0].numpy(), minlength=64 - p + 1)
    assert counts.size == 64 - p + 1 and counts.min() > 0.7 * counts.mean()


def test_brain_centres_follow_the_mask(train):
    """With brain_fraction 1 and a 1-pixel patch the window is the drawn voxel itself: every
    one is a brain voxel, and they are spread uniformly over the slice's brain."""
    _, _, masks = train
    i = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))
    rows = torch.full((40000,), i, dtype=torch.long)
    win, _ = PatchSampler(masks, None, 1, 1.0, seed=5).draw(rows)
    t, c = win[:, 0].numpy(), win[:, 1].numpy()
    assert masks[i, t, c].all()
    hits = np.zeros(masks[i].shape, int)
    np.add.at(hits, (t, c), 1)
    n_brain = int(masks[i].sum())
    expected = rows.numel() / n_brain
    assert hits[masks[i]].min() > 0  # every brain voxel reachable
    assert abs(hits[masks[i]].mean() - expected) < 1e-9
    assert hits[masks[i]].std() < 3 * np.sqrt(expected)  # ~ Poisson spread, no bias


def test_unpaired_windows_follow_each_sides_rows(train):
    _, _, masks = train
    empty = np.zeros_like(masks[:4])
    s = PatchSampler(masks, empty, 16, 1.0, seed=0)
    assert not s.paired
    ra = torch.arange(4)
    wa, wb = s.draw(ra, ra)
    assert not torch.equal(wa, wb)
    # B's slices have no brain: their windows are uniform, A's are centred on brain
    assert (_brain_share(masks, ra, wa, 16) > 0).all()
    with pytest.raises(ValueError, match="B rows"):
        s.draw(ra)


def test_state_round_trip_reproduces_the_windows(train):
    _, _, masks = train
    rows = torch.arange(len(masks)).view(-1, 1)
    s = PatchSampler(masks, None, 32, 0.8, seed=11)
    s.draw(rows)
    state = s.get_state()
    first = s.draw(rows)[0]
    s.draw(rows)
    s.set_state(state)
    assert torch.equal(s.draw(rows)[0], first)
    fresh = PatchSampler(masks, None, 32, 0.8, seed=11)
    fresh.set_state(state)
    assert torch.equal(fresh.draw(rows)[0], first)
    other = PatchSampler(masks, None, 32, 0.8, seed=12)
    assert not torch.equal(other.draw(rows)[0], PatchSampler(masks, None, 32, 0.8, 11).draw(
        rows)[0])


def test_patch_larger_than_the_slice_and_bad_settings(train):
    _, _, masks = train
    assert patch_shape((64, 48), 100) == (64, 48) and patch_shape((64, 48), None) == (64, 48)
    s = PatchSampler(masks[:, :, :48], None, 100, 0.9, seed=0)
    win, _ = s.draw(torch.arange(3))
    assert s.patch == (64, 48) and (win == 0).all()
    with pytest.raises(ConfigError, match="patch_size"):
        PatchSampler(masks, None, 0, 0.9, seed=0)
    with pytest.raises(ConfigError, match="patch_brain_fraction"):
        PatchSampler(masks, None, 16, 1.5, seed=0)


# --------------------------------------------------------------------------- in the trainer
def _patch_config(model: str, **over):
    return resolve_config(model, "cpu-small", {
        "train.epochs": 1, "train.max_steps_per_epoch": 2, "train.batch_size": 2,
        "train.patch_size": 32, "train.progress": False, "train.checkpoint_every_minutes": 0,
        "train.num_threads": 1, "device": "cpu", **tiny_arch(model), **over})


def test_cpu_small_trains_patches_of_full_resolution_slices():
    """cpu-small trains 64-px patches of full-resolution slices (simple, UNIT), except the
    ResNet-generator family: the paired U-Net models and unpaired CycleGAN train whole slices
    (their instance norms then see what they see when translating); paper trains whole
    slices."""
    for m in model_names():
        cpu, paper = resolve_config(m, "cpu-small"), resolve_config(m, "paper")
        unet = cpu["arch"].get("generator") == "unet"
        assert unet == (m in ("generators_s", "pix2pix", "cyclegan_s")), m
        assert cpu["data"]["image_size"] is None
        whole = unet or m == "cyclegan"
        assert cpu["train"]["patch_size"] == (None if whole else 64), m
        assert paper["data"]["image_size"] is None and paper["train"]["patch_size"] is None
    for bad in (15, 30, 0, True):
        with pytest.raises(ConfigError, match="patch_size"):
            resolve_config("simple", "cpu-small", {"train.patch_size": bad})
    with pytest.raises(ConfigError, match="patch_brain_fraction"):
        resolve_config("simple", "cpu-small", {"train.patch_brain_fraction": 1.2})


def test_every_model_trains_on_patches_and_translates_whole_slices(
        prepared_small: Path, tmp_path: Path, monkeypatch):
    """Every network of every registered model (generators and PatchGAN / UNIT
    discriminators) sees 32 x 32 inputs while training on 64 x 64 slices; paired models get
    the same window of source and target; the run translates whole slices."""
    from mrsynth.train import step as step_mod
    from mrsynth.train.runs import load_run
    from mrsynth.train.trainer import train

    seen: dict[str, set[tuple[int, int]]] = {}
    nets: list[str] = []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    init, batch = step_mod.TrainStepper.__init__, step_mod.TrainStepper.batch

    def init_hooked(self, setup, *args, **kwargs):
        init(self, setup, *args, **kwargs)
        for name, net in setup.model.named_children():  # networks taking images (1-2 ch.)
            nets.append(name)
            net.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, set()).add(
                    tuple(args[0].shape[-2:])) if args[0].shape[1] <= 2 else None)

    def batch_recorded(self, ia, ib, wa=None, wb=None):
        out = batch(self, ia, ib, wa, wb)
        pairs.append((out["A"], out["B"]))
        return out

    monkeypatch.setattr(step_mod.TrainStepper, "__init__", init_hooked)
    monkeypatch.setattr(step_mod.TrainStepper, "batch", batch_recorded)
    d = load_prepared(prepared_small)
    rows = np.flatnonzero(d.split == "train")
    with one_torch_thread():
        for m in model_names():
            seen.clear()
            pairs.clear()
            nets.clear()
            run = train(_patch_config(m), prepared_small, tmp_path / m)
            doc = json.loads((run / "metrics.json").read_text())
            assert doc["patch_size"] == [32, 32] and doc["image_size"] == [64, 64]
            assert doc["status"] == "completed"
            assert all(np.isfinite(v) for v in doc["epochs"][0]["losses"].values())
            # every network's training inputs were patches (the sample grid and validation
            # run the generators on whole slices, in eval mode, after the steps)
            assert len(pairs) == 2
            assert {n for n in nets if n.startswith("D")} <= set(seen), (m, nets, seen)
            for name, shapes in seen.items():
                assert (32, 32) in shapes, (m, name, shapes)
                assert shapes <= {(32, 32), (64, 64)}, (m, name, shapes)
                if name.startswith("D"):
                    assert shapes == {(32, 32)}, (m, name, shapes)
            for a, b in pairs:
                assert a.shape == b.shape == (2, 1, 32, 32)
                if m not in ("cyclegan", "unit"):  # paired: the same window of the same slice
                    _assert_same_window(d, rows, a, b)
            loaded = load_run(run)
            x = torch.from_numpy(d.images["T1w"][:3])[:, None]
            assert loaded.translate(x, "A2B").shape == (3, 1, 64, 64)


def _assert_same_window(d, rows: np.ndarray, a: torch.Tensor, b: torch.Tensor) -> None:
    """Find each A patch in the training slices; B must be the T2w patch at the same place."""
    ta, tb = d.images["T1w"][rows], d.images["T2w"][rows]
    for pa, pb in zip(a[:, 0].numpy(), b[:, 0].numpy(), strict=True):
        hits = [(i, t, c) for i in range(len(rows)) for t in range(33) for c in range(33)
                if ta[i, t, c] == pa[0, 0] and np.array_equal(ta[i, t:t + 32, c:c + 32], pa)]
        assert hits, "patch not found in the training slices"
        assert any(np.array_equal(tb[i, t:t + 32, c:c + 32], pb) for i, t, c in hits)


def test_resume_mid_epoch_with_patches_is_bit_exact(prepared_small: Path, tmp_path: Path,
                                                    monkeypatch):
    """SIGTERM in the middle of epoch 2 of 3, then --resume: the same weights, losses and
    per-epoch metrics as an uninterrupted run (the patch windows of the interrupted epoch
    are drawn again from the checkpointed sampler state)."""
    from mrsynth.models.cyclegan import CycleGAN

    cfg = _patch_config("cyclegan", **{
        "train.epochs": 3, "train.max_steps_per_epoch": 5, "train.log_every": 2,
        "train.deterministic": True, "loss.pool_size": 3, "train.patch_brain_fraction": 0.7})
    # SIGTERM during step 3 of epoch 2
    straight, split = straight_and_resumed(monkeypatch, CycleGAN, cfg, prepared_small, tmp_path)
    wa, wb = (load_file(r / "checkpoints/latest/weights.safetensors") for r in (straight, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _loss_rows(split) == _loss_rows(straight)
    assert _epoch_rows(split) == _epoch_rows(straight)


def _loss_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "losses.csv") as fh:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(fh)]


def _epoch_rows(run: Path) -> list[dict]:
    """metrics.json epochs without what a resume may change (times, the resumed flag)."""
    free = ("wall_s", "images_per_s", "resumed_mid_epoch", "validation_s")
    doc = json.loads((run / "metrics.json").read_text())
    return [{k: v for k, v in e.items() if k not in free} for e in doc["epochs"]]


def test_runs_from_before_patches_keep_training_whole_slices():
    """A stored cpu-small config without train.patch_size (it downsampled whole slices to
    64 px) upgrades to patch_size None, so it loads and resumes as it was trained."""
    from mrsynth.train.config import upgrade_config

    old = resolve_config("cyclegan", "cpu-small", {"data.image_size": 64})
    del old["train"]["patch_size"], old["train"]["patch_brain_fraction"]
    del old["train"]["val_slices"]
    up = upgrade_config(old)
    assert up["train"]["patch_size"] is None and up["data"]["image_size"] == 64
    assert up["train"]["val_slices"] == 16  # cpu-small's count
    stored = resolve_config("cyclegan", "cpu-small", {"train.patch_size": 64})
    assert upgrade_config(stored)["train"]["patch_size"] == 64  # a stored value stays


def test_two_ranks_train_on_the_same_patches_as_one_process(prepared_small: Path,
                                                           tmp_path: Path, monkeypatch):
    """torchrun with 2 ranks: each rank crops its share of the global batch's windows, so
    the logged losses (means over the global batch) equal one process's."""
    import subprocess
    import sys

    from mrsynth.cli import main
    from mrsynth.train import distributed as dd

    for v in dd.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    args = ["train", "--model", "pix2pix", "--data", str(prepared_small), "--preset",
            "cpu-small", "--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "2",
            "--seed", "1", "--set", "arch.ngf=4", "--set", "arch.n_blocks=1",
            "--set", "arch.ndf=8", "--set", "train.patch_size=24", "--set",
            "train.progress=false", "--set", "train.log_every=1", "--set",
            "train.num_threads=1", "--set", "train.checkpoint_every_minutes=0"]
    with one_torch_thread():
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in dd.TORCHRUN_VARS}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m",
                           "mrsynth", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = _loss_rows(tmp_path / "one"), _loss_rows(tmp_path / "two")
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == ["1", "2", "3"]
    for a, b in zip(one, two, strict=True):
        for k in a:
            if k not in ("epoch", "iteration", "lr"):
                assert abs(float(a[k]) - float(b[k])) <= 1e-4 * max(abs(float(a[k])), 1e-3), k
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["patch_size"] == [24, 24]
