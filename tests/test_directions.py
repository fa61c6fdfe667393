"""One rule for directions (issue 11): the same spellings are accepted, mapped to the same
network, or refused, by the Python API (``parse_direction``, ``LoadedRun.translate``, the
evaluation helpers, the models' ``translate``) and by ``mrsynth translate/export
--direction``."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mrsynth.cli import main
from mrsynth.errors import ConfigError
from mrsynth.eval import common
from mrsynth.models import directions
from mrsynth.train import runs
from test_eval_fixtures import tiny_run

CONTRASTS = ("T1w", "T2w")

#: spelling -> internal direction, for a T1w/T2w run
ACCEPTED = {
    "A2B": "A2B", "b2a": "B2A", "a2B": "A2B",
    "T1w2T2w": "A2B", "T2w2T1w": "B2A", "t1w2t2w": "A2B", "T2W2T1W": "B2A",
    "T1w->T2w": "A2B", "t2w->t1w": "B2A", " T1w -> T2w ": "A2B", "A->B": "A2B",
}
REFUSED = ["FLAIR2T1w", "T1w2FLAIR", "T1w", "", "A2A", "T1w2T1w", "T1wtoT2w", "T1w_2_T2w",
           "T2w<-T1w", "A2B2A"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_small) -> Path:
    return tiny_run(tmp_path_factory, prepared_small, "simple")


@pytest.fixture(scope="module")
def loaded(run_dir: Path) -> runs.LoadedRun:
    return runs.load_run(run_dir)


@pytest.fixture(scope="module")
def volume(mrpaired: Path, tmp_path_factory) -> Path:
    """Three axial slices through a real T1w brain."""
    img = nib.load(mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz")
    dest = tmp_path_factory.mktemp("dirvol") / "sub-ms19_T1w.nii"
    nib.save(img.slicer[:, :, 70:73], dest)
    return dest


def test_the_models_module_holds_the_rule_and_the_others_use_it() -> None:
    from mrsynth.models import base

    assert runs.parse_direction is directions.parse_direction
    assert base.parse_direction is directions.parse_direction
    assert base.DIRECTIONS == directions.DIRECTIONS == ("A2B", "B2A")


@pytest.mark.parametrize("text", list(ACCEPTED))
def test_python_api_accepts_each_spelling_the_same_way(text: str, loaded: runs.LoadedRun,
                                                       prepared_small: Path) -> None:
    want = ACCEPTED[text]
    assert directions.parse_direction(text, CONTRASTS) == want
    assert loaded.direction(text) == want
    assert common.parse_direction(text, CONTRASTS, "run").internal == want
    # The spelling reaches the right network: same output as the internal name.
    x = torch.linspace(-1, 1, 2 * 64 * 64).reshape(2, 1, 64, 64)
    assert torch.equal(loaded.translate(x, text), loaded.translate(x, want))
    assert not torch.equal(loaded.translate(x, "A2B"), loaded.translate(x, "B2A"))


@pytest.mark.parametrize("text", REFUSED)
def test_python_api_refuses_each_spelling_with_the_accepted_forms(
    text: str, loaded: runs.LoadedRun
) -> None:
    x = torch.zeros(1, 1, 64, 64)
    for call in (lambda: directions.parse_direction(text, CONTRASTS),
                 lambda: loaded.translate(x, text),
                 lambda: common.parse_direction(text, CONTRASTS, "run")):
        with pytest.raises(ConfigError) as exc:
            call()
        msg = str(exc.value)
        assert f"Unknown direction {text!r} for a T1w/T2w run" in msg
        assert ("use T1w2T2w or T2w2T1w (any case; A2B, B2A and, quoted in a shell, "
                "'T1w->T2w', 'T2w->T1w' also work)") in msg


def test_models_translate_takes_the_internal_names_in_any_case(loaded: runs.LoadedRun) -> None:
    """A model knows no contrast names: A2B / B2A (and A->B) by the same rule."""
    x = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    model = loaded.model
    assert torch.equal(model.translate(x, "b2a"), model.translate(x, "B2A"))
    assert torch.equal(model.translate(x, "A->B"), model.generator("A2B")(x))
    with pytest.raises(ConfigError, match="use A2B or B2A"):
        model.translate(x, "T1w2T2w")


def test_cli_translate_accepts_and_refuses_like_the_python_api(
    run_dir: Path, volume: Path, tmp_path: Path, capsys
) -> None:
    outputs: dict[str, np.ndarray] = {}
    # both directions on one file: a name without a contrast suffix (a _T1w file is refused
    # for T2w2T1w, tests/test_translate.py)
    volume = Path(shutil.copy(volume, tmp_path / "scan.nii"))
    for i, text in enumerate(["A2B", "B2A", *ACCEPTED]):
        dest = tmp_path / f"out{i}.nii"
        rc = main(["translate", "--run", str(run_dir), "--direction", text,
                   "--input", str(volume), "--output", str(dest), "--device", "cpu"])
        assert rc == 0, (text, capsys.readouterr().err)
        outputs[text] = np.asarray(nib.load(dest).dataobj)
    for text, want in ACCEPTED.items():
        np.testing.assert_array_equal(outputs[text], outputs[want], err_msg=text)
    assert not np.array_equal(outputs["A2B"], outputs["B2A"])
    capsys.readouterr()
    for text in REFUSED:
        dest = tmp_path / "refused.nii"
        rc = main(["translate", "--run", str(run_dir), "--direction", text,
                   "--input", str(volume), "--output", str(dest), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, (text, err)
        assert f"Unknown direction {text!r} for a T1w/T2w run" in err
        assert f"Run directory: {run_dir}" in err
        assert not dest.exists()


def test_cli_export_accepts_and_refuses_like_the_python_api(run_dir: Path, tmp_path: Path,
                                                            capsys) -> None:
    import onnx

    for text in ("t1w2t2w", "t2w->t1w"):
        out = tmp_path / "g.onnx"
        rc = main(["export", "--run", str(run_dir), "--direction", text, "--out", str(out),
                   "--overwrite"])
        assert rc == 0, (text, capsys.readouterr().err)
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert meta["mrsynth_direction"] == runs.direction_name(ACCEPTED[text], CONTRASTS)
    capsys.readouterr()
    for text in REFUSED:
        out = tmp_path / "refused.onnx"
        rc = main(["export", "--run", str(run_dir), "--direction", text, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"Unknown direction {text!r} for a T1w/T2w run" in err, (text, err)
        assert not out.exists()
