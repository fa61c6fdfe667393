"""Tiny trained runs shared by the evaluation, translate and export tests.

Pytest fixtures cannot be shared between test modules without conftest.py, so
:func:`tiny_run` trains into the session's base temporary directory once and
every module's fixture calls it (later calls find the finished run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import one_torch_thread

#: Test settings: real 64x64 slices, one epoch of four steps at a 32-pixel internal size.
TINY_OVERRIDES = {
    "train.epochs": 1,
    "train.decay_start_epoch": None,
    "train.max_steps_per_epoch": 4,
    "train.progress": False,
    "train.samples": 1,
    "data.image_size": 32,
    "device": "cpu",
    "seed": 0,
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def tiny_run(tmp_path_factory: pytest.TempPathFactory, prepared: Path, model: str) -> Path:
    """Train ``model`` (cpu-small, tiny) on ``prepared`` once per session; return the run dir."""
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    root = tmp_path_factory.getbasetemp() / "eval-tiny-runs"
    run_dir = root / model
    done = run_dir / "metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        return run_dir
    cfg = resolve_config(model, "cpu-small", TINY_OVERRIDES)
    return train(cfg, prepared, run_dir, overwrite=True)


def test_tiny_run_meets_the_contract_evaluation_relies_on(tmp_path_factory, prepared_small):
    from mrsynth.data.prepared import load_prepared
    from mrsynth.eval.common import check_compatible, load_run_checked

    rd = tiny_run(tmp_path_factory, prepared_small, "simple")
    run = load_run_checked(rd)
    data = load_prepared(prepared_small)
    check_compatible(run, rd, data)  # the data the run was trained on is compatible
    assert tuple(run.contrasts) == ("T1w", "T2w")
    test = data.split_view("test")
    x = test.images["T1w"][:3]
    y = run.translate(x[:, None], "A2B").numpy()
    assert y.shape == (3, 1, 64, 64) and np.isfinite(y).all()
    # deterministic: the same input gives the same output
    np.testing.assert_array_equal(y, run.translate(x[:, None], "A2B").numpy())
