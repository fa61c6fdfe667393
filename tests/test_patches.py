"""Random training patches (:mod:`mrsynth.data.patches`): shapes, brain content, pairing,
reproducibility from the generator state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrsynth.data.patches import PatchSampler, crop, patch_shape
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError


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
