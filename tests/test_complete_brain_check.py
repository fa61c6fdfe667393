"""``complete`` and ``translate`` share one definition of an implausible brain
(:func:`mrsynth.eval.translate.brain_doubts`): translate warns, complete fails the subject."""

from __future__ import annotations

import numpy as np
import pytest

from mrsynth.data.volumes import brain_mask, load_volume
from mrsynth.errors import DataError
from mrsynth.eval.complete import check_brain
from mrsynth.eval.translate import brain_doubts


def _box(shape=(96, 112, 48)) -> np.ndarray:
    """A textured box the size of a head at 2 mm voxels (128 x 144 x 64 mm, 1180 mL)."""
    rng = np.random.default_rng(0)
    box = np.zeros(shape, np.float32)
    box[16:80, 20:92, 8:40] = rng.uniform(50, 150, (64, 72, 32))
    return box


def test_complete_fails_a_head_sized_box_that_the_size_check_alone_let_through():
    data = _box()
    mask = brain_mask(data)
    zooms = (2.0, 2.0, 2.0)
    ml = mask.sum() * 8 / 1000
    assert 250 <= ml <= 6000  # a whole head's size: complete's old check passed it
    with pytest.raises(DataError, match=r"box\.nii\.gz does not look like a brain: .*like a box"):
        check_brain(data, mask, zooms, "box.nii.gz")


def test_a_real_brain_passes_and_its_size_is_checked_only_with_voxel_sizes(mrpaired):
    vol = load_volume(mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz")
    mask = brain_mask(vol.data)
    zooms = tuple(float(z) for z in vol.canonical.header.get_zooms()[:3])
    check_brain(vol.data, mask, zooms, "ms19")  # no error
    assert brain_doubts(vol.data, mask, zooms) == []
    # wrong voxel sizes in a header (0.1 mm): the same array is a 1.4 mL object
    tiny = tuple(z / 10 for z in zooms)
    (doubt,) = brain_doubts(vol.data, mask, tiny)
    assert "mL" in doubt and "whole brain or head" in doubt
    with pytest.raises(DataError, match="does not look like a brain: its foreground is"):
        check_brain(vol.data, mask, tiny, "ms19")
    # translate gives no voxel sizes: a slab of the same brain raises no doubt
    slab = vol.data[:, :, 80:104]
    assert brain_doubts(slab, brain_mask(slab)) == []
    assert brain_doubts(slab, brain_mask(slab), zooms) != []  # not a whole brain
