"""``mrsynth export``: the ONNX graph gives PyTorch's output on real slices, any batch size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from helpers import one_torch_thread
from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.eval.export import ONNX_TOLERANCE
from test_eval_fixtures import tiny_run


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def cyclegan_run(tmp_path_factory, prepared_small):
    return tiny_run(tmp_path_factory, prepared_small, "cyclegan")


def test_onnx_matches_pytorch_on_real_slices(cyclegan_run, prepared_small, tmp_path, capsys):
    from mrsynth.train.runs import load_run

    out = tmp_path / "t2_to_t1.onnx"
    assert main(["export", "--run", str(cyclegan_run), "--direction", "T2w2T1w",
                 "--out", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mrsynth_model"] == "cyclegan" and meta["mrsynth_direction"] == "T2w2T1w"
    assert json.loads(meta["mrsynth_normalisation"])["method"] == "percentile"
    assert meta["mrsynth_plane"] == "axial" and meta["mrsynth_downsample"] == "4"
    assert meta["mrsynth_geometry"].startswith("slice[r, c] = canonical_downsampled")
    test = load_prepared(prepared_small).split_view("test")
    x = test.images["T2w"][:5, None].astype(np.float32)  # real normalised T2w slices
    run = load_run(cyclegan_run)
    want = run.translate(x, "B2A").numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 64, 64]
    for batch in (x[:1], x):  # dynamic batch axis: 1 and 5
        got = sess.run(None, {"input": batch})[0]
        assert got.shape == batch.shape
        diff = np.abs(got - want[: batch.shape[0]]).max()
        assert diff <= ONNX_TOLERANCE
    # the network is not trivial: the output differs from the input
    assert np.abs(want - x).mean() > 1e-3


def test_onnx_of_a_unet_run_matches_pytorch(tmp_path_factory, prepared_small, tmp_path):
    """cpu-small's generators_s has a U-Net (skip concatenations, nearest upsampling, reflect
    padding): its ONNX export gives the run's translations, for a batch of real slices."""
    from mrsynth.models.blocks import UnetGenerator
    from mrsynth.train.runs import load_run

    rd = tiny_run(tmp_path_factory, prepared_small, "generators_s")
    run = load_run(rd)
    assert isinstance(run.model.G_A2B, UnetGenerator)
    out = tmp_path / "unet.onnx"
    assert main(["export", "--run", str(rd), "--direction", "T1w2T2w", "--out", str(out)]) == 0
    x = load_prepared(prepared_small).split_view("test").images["T1w"][:4, None]
    x = x.astype(np.float32)
    want = run.translate(x, "A2B").numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert got.shape == x.shape and np.abs(got - want).max() <= ONNX_TOLERANCE
    assert np.abs(want - x).mean() > 1e-3


def test_export_bad_direction_writes_nothing(cyclegan_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["export", "--run", str(cyclegan_run), "--direction", "T1w2FLAIR",
               "--out", str(out)])
    assert rc != 0
    assert "T1w2T2w" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_opset_the_exporter_cannot_write_is_refused_and_the_opset_is_recorded(
        cyclegan_run, tmp_path, capsys):
    """torch's exporter writes its lowest opset instead of a lower one asked for, silently:
    ``--opset 13`` must fail with nothing written, and the opset written is reported and
    stored in the file's metadata."""
    out = tmp_path / "g.onnx"
    args = ["export", "--run", str(cyclegan_run), "--direction", "T1w2T2w", "--out", str(out)]
    assert main([*args, "--opset", "13"]) != 0
    err = capsys.readouterr().err
    assert "--opset 13" in err and "Nothing was written" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(args) == 0
    written = {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")}
    assert len(written) == 1
    opset = written.pop()
    assert f"opset {opset}" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["mrsynth_onnx_opset"] == str(opset)
    # a folder as --out gets a plain message, with or without --overwrite
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--run", str(cyclegan_run), "--direction", "T1w2T2w", "--out",
                     str(tmp_path), *extra]) != 0
        assert "is a folder; give the file to write, e.g." in capsys.readouterr().err
    # asking for the opset it writes works
    assert main([*args, "--opset", str(opset), "--overwrite"]) == 0
