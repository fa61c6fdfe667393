"""The classifier two-sample test (issue 10 item 19): chance on identical or exchangeable
sets, perfect on shifted sets, and a held-out half that shares no slice with training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import one_torch_thread
from mrsynth.data.prepared import load_prepared
from mrsynth.eval.c2st import c2st, split_pairs


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def real_slices(prepared_small: Path) -> np.ndarray:
    """Real T2w test slices of the shared data (64 x 64)."""
    return load_prepared(prepared_small).split_view("test").images["T2w"]


@pytest.mark.parametrize("n", [4, 5, 17, 40])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_the_halves_share_no_slice_and_cover_all(n, fraction):
    tr, te = split_pairs(n, seed=3, train_fraction=fraction)
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(n))
    assert tr.size >= 2 and te.size >= 2
    a, b = split_pairs(n, seed=3, train_fraction=fraction)
    assert np.array_equal(a, tr) and np.array_equal(b, te)  # seeded


def test_identical_sets_give_chance(real_slices):
    res = c2st(real_slices, real_slices.copy(), seed=0, steps=40)
    # identical inputs get identical scores, so exactly one of each pair is right
    assert res.accuracy == pytest.approx(0.5)
    assert res.p_value > 0.4
    assert res.n_train + res.n_test == 2 * len(real_slices)


def test_shifted_sets_are_told_apart(real_slices):
    res = c2st(real_slices, np.clip(real_slices + 0.5, -1, 1), seed=0, steps=60)
    assert res.accuracy >= 0.95 and res.p_value < 1e-6
    assert res.ci_low <= res.accuracy <= res.ci_high


def test_accuracy_is_measured_on_held_out_slices():
    """Two sets of independent noise images from one distribution: nothing tells them
    apart on new images, but 300 steps memorise the 40 training images. Scoring the
    classifier on its own training half (the planted bug) gives ~1.0 here."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.5, (40, 32, 32)).astype(np.float32)
    b = rng.normal(0, 0.5, (40, 32, 32)).astype(np.float32)
    res = c2st(a, b, seed=0, steps=300)
    assert res.n_test == 40 and res.n_train == 40
    assert res.accuracy <= 0.75


def test_too_few_pairs_and_bad_shapes():
    x = np.zeros((3, 8, 8), np.float32)
    assert np.isnan(c2st(x, x).accuracy)
    with pytest.raises(ValueError, match="shape"):
        c2st(np.zeros((5, 8, 8)), np.zeros((5, 8, 9)))
