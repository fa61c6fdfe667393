"""Shared fixtures: the real BIDS data set in ../shared and small prepared files made from it."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MRSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mrpaired() -> Path:
    """The seven-subject BIDS data set every test and benchmark uses."""
    path = SHARED_DATA / "mrpaired"
    if not (path / "dataset_description.json").is_file():
        pytest.fail(f"shared data set not found at {path}; set MRSYNTH_SHARED_DATA")
    return path


#: Subjects held out as the test split in the small prepared fixture.
SMALL_TEST_SUBJECTS = ("sub-ms19", "sub-met00110")


@pytest.fixture(scope="session")
def prepared_small(mrpaired: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shared slices, T1w/T2w, downsampled x4 to 64x64, every 4th brain slice.

    Small enough for CPU model tests (a few hundred slices) yet real data.
    """
    from mrsynth.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "small.npz"
    return prepare_dataset(
        mrpaired,
        out,
        contrasts=("T1w", "T2w"),
        size=(64, 64),
        downsample=4,
        slice_step=4,
        test_subjects=SMALL_TEST_SUBJECTS,
        seed=0,
    )


@pytest.fixture(scope="session")
def small_with_val(prepared_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepared_small`` with one of its training subjects moved to a validation split."""
    import numpy as np

    from mrsynth.data.prepared import load_prepared

    d = load_prepared(prepared_small)
    d.split = np.where(d.subject == "sub-ms07", "val", d.split)
    d.settings = {**d.settings, "val_subjects": ["sub-ms07"],
                  "train_subjects": [s for s in d.settings["train_subjects"] if s != "sub-ms07"]}
    return d.save(tmp_path_factory.mktemp("smallval") / "small_val.npz")


@pytest.fixture(scope="session")
def prepared_context(mrpaired: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every brain slice of the real shared volumes (neighbours kept), 64x64, with a
    validation subject: what a 2.5-D model needs (``prepared_small`` keeps every 4th)."""
    from mrsynth.data.prepare import prepare_dataset

    return prepare_dataset(mrpaired, tmp_path_factory.mktemp("ctx") / "ctx64.npz",
                           contrasts=("T1w", "T2w"), size=(64, 64), downsample=4,
                           test_subjects=SMALL_TEST_SUBJECTS, val_fraction=0.2, seed=0)


def _write_halved(src: Path, dest: Path) -> None:
    """Save ``src`` at half resolution (every 2nd voxel), keeping its orientation and dtype."""
    import nibabel as nib
    import numpy as np

    img = nib.load(src)
    data = np.asanyarray(img.dataobj)[::2, ::2, ::2]
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    out = nib.Nifti1Image(data, affine)
    out.set_data_dtype(img.get_data_dtype())
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dest)


#: Real subjects in the mini data set: LAS float32, RAS int16, LPS float64.
MINI_SUBJECTS = ("sub-ms19", "sub-met00110", "sub-bratscase")


@pytest.fixture(scope="session")
def mini_bids(mrpaired: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BIDS copy of three real shared subjects (T1w, T2w) at half resolution.

    Read-only for tests: copy it (``shutil.copytree``) before changing anything.
    """
    root = tmp_path_factory.mktemp("mini") / "bids"
    for sub in MINI_SUBJECTS:
        for c in ("T1w", "T2w"):
            name = f"{sub}_{c}.nii.gz"
            _write_halved(mrpaired / sub / "anat" / name, root / sub / "anat" / name)
    (root / "dataset_description.json").write_text('{"Name": "mini", "BIDSVersion": "1.9.0"}\n')
    return root


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): the
    networks in tests are tiny, and on a shared 2-core machine two spinning OpenMP threads
    per process slow training down by an order of magnitude."""
    from helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def paired_train_slices(prepared_small: Path) -> tuple[Any, Any]:
    """Paired real training slices (T1w, T2w) of ``prepared_small`` at 32x32, as tensors."""
    import numpy as np
    import torch

    from mrsynth.data.prepared import load_prepared
    from mrsynth.train.dataset import resample

    d = load_prepared(prepared_small)
    rows = np.flatnonzero((d.split == "train") & d.paired)
    a = resample(torch.from_numpy(d.images["T1w"][rows])[:, None], (32, 32))
    b = resample(torch.from_numpy(d.images["T2w"][rows])[:, None], (32, 32))
    return a.contiguous(), b.contiguous()


@pytest.fixture(scope="session")
def study_load() -> ModuleType:
    """benchmarks/study_load.py as a module: study inputs, free ports, the load benchmark."""
    path = str(REPO / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("study_load")


@pytest.fixture(scope="module")
def study_inputs(mrpaired: Path, study_load: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    """Real slice files and fake "model" outputs for study tests: ``(real_dir, {model: dir})``.

    Built on first use under the session's base temp folder and reused by later modules.
    """
    return study_load.build_inputs(mrpaired, tmp_path_factory.getbasetemp() / "study_inputs")
