"""2.5-D models (issue 14): neighbouring slices as input channels, from data to export.

The neighbour lookup is checked against a brute-force reading of its documented rule, the
batch gather against numpy indexing, the models' input channels and conditioning, and a
tiny 2.5-D run on real slices end to end: it trains, resumes bit-exactly, translates a
volume with stacks built by the same rule, exports to ONNX, and evaluates.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import first_conv, tiny_arch
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
def tiny(model: str, k: int, **extra: Any) -> dict[str, Any]:
    return resolve_config(model, "cpu-small",
                          {**tiny_arch(model), "arch.context_slices": k, **extra})


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
    assert cg.D_A.model[0].in_channels == 1 and first_conv(cg.G_A2B).in_channels == 5
    p2p = build_model(tiny("pix2pix", 2))  # a U-Net generator at cpu-small
    assert p2p.D_A2B.model[0].in_channels == 6  # 5 source slices + the output
    assert first_conv(p2p.G_A2B).in_channels == 5
    unit = build_model(tiny("unit", 2))
    assert unit.enc_A.model[0].in_channels == 5 and unit.D_A.scales[0][0].in_channels == 1
    two_d = build_model(tiny("pix2pix", 0))
    assert two_d.D_A2B.model[0].in_channels == 2 and first_conv(two_d.G_A2B).in_channels == 1


@pytest.mark.parametrize("bad", [-1, 9, 1.5, True, "one"])
def test_context_slices_setting_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigError, match="context_slices"):
        resolve_config("generators_s", "cpu-small", {"arch.context_slices": bad})


# ---------------------------------------------------------------------- a 2.5-D run end to end
#: the test split of the ``prepared_context`` fixture (conftest)
CONTEXT_TEST_SUBJECTS = ("sub-ms19", "sub-met00110")


def run_config(model: str, epochs: int, k: int = 1) -> dict[str, Any]:
    return resolve_config(model, "cpu-small", {
        **tiny_arch(model), "arch.context_slices": k, "train.epochs": epochs,
        "train.max_steps_per_epoch": 4, "train.batch_size": 2, "train.patch_size": 32,
        "train.log_every": 2, "train.progress": False, "train.checkpoint_every_minutes": 0,
        "train.deterministic": True, "train.val_slices": 3, "train.lr_decay": "none",
    })


@pytest.fixture(scope="module")
def context_run(prepared_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mrsynth.train.trainer import train

    return train(run_config("generators_s", 1), prepared_context,
                 tmp_path_factory.mktemp("ctxrun") / "run")


def stack_by_lookup(data: Any, contrast: str, row: int, k: int, pool: np.ndarray) -> np.ndarray:
    """The stack of prepared row ``row`` found by subject and slice index among the rows
    ``pool`` (an interior slice: every neighbour is there)."""
    out = []
    for d in range(-k, k + 1):
        hit = pool[(data.subject[pool] == data.subject[row])
                   & (data.slice_index[pool] == data.slice_index[row] + d)]
        assert hit.size == 1
        out.append(data.images[contrast][hit[0]])
    return np.stack(out)


def test_training_batches_hold_each_rows_neighbours(prepared_context: Path) -> None:
    from helpers import EAGER
    from mrsynth.data.prepared import load_prepared
    from mrsynth.train.dataset import load_training_slices, select_training_slices
    from mrsynth.train.step import TrainStepper, setup_training

    data = load_prepared(prepared_context)
    cfg = run_config("generators_s", 1)
    sl = load_training_slices(data, ("T1w", "T2w"), "generators_s", True, None,
                              torch.device("cpu"), context=1)
    rows, _, _ = select_training_slices(data, ("T1w", "T2w"), "generators_s", True)
    assert sl.info["context_slices"] == 1 and sl.info["context_exact_fraction_A"] > 0.95
    stepper = TrainStepper(setup_training(build_model(cfg), "cpu", EAGER), sl.A, sl.B, (32, 32),
                           (sl.table_A, sl.table_B))
    interior = [i for i in range(rows.size)
                if ((data.subject[rows] == data.subject[rows[i]])
                    & (np.abs(data.slice_index[rows] - data.slice_index[rows[i]]) == 1)).sum() == 2]
    ia = torch.tensor(interior[::40][:4])
    win = torch.tensor([[0, 0], [32, 32], [10, 20], [5, 31]])
    batch = stepper.batch(ia, ia, win, win)
    for b, i in enumerate(ia.tolist()):
        r, c = win[b].tolist()
        want_a = stack_by_lookup(data, "T1w", rows[i], 1, rows)[:, r:r + 32, c:c + 32]
        want_b = stack_by_lookup(data, "T2w", rows[i], 1, rows)[:, r:r + 32, c:c + 32]
        np.testing.assert_array_equal(batch["A_stack"][b].numpy(), want_a)
        np.testing.assert_array_equal(batch["B_stack"][b].numpy(), want_b)
        np.testing.assert_array_equal(batch["A"][b, 0].numpy(), want_a[1])


@pytest.mark.parametrize("model", ["generators_s", "pix2pix", "cyclegan", "unit"])
def test_2p5d_run_resumes_bit_exactly(model: str, prepared_context: Path,
                                      tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mrsynth.train.trainer import train

    straight = train(run_config(model, 2), prepared_context, tmp_path / "straight")
    train(run_config(model, 1), prepared_context, tmp_path / "split")
    resumed = train(run_config(model, 2), None, tmp_path / "split", resume=True)
    wa = load_file(straight / "checkpoints" / "latest" / "weights.safetensors")
    wb = load_file(resumed / "checkpoints" / "latest" / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert loss_rows(straight) == loss_rows(resumed) and len(loss_rows(straight)) == 4

    doc = json.loads((straight / "config.json").read_text())
    assert doc["config"]["arch"]["context_slices"] == 1
    val = json.loads((straight / "metrics.json").read_text())["epochs"][-1]["validation"]
    assert np.isfinite(val["score"])


def loss_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "losses.csv") as fh:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(fh)]


def test_data_without_neighbours_is_refused(prepared_small: Path, tmp_path: Path) -> None:
    from mrsynth.train.trainer import train

    with pytest.raises(ConfigError, match="slice-step"):
        train(run_config("generators_s", 1), prepared_small, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_loaded_2p5d_run_takes_stacks_only(context_run: Path) -> None:
    from mrsynth.train.runs import load_run

    run = load_run(context_run)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert run.translate(x, "T1w2T2w").shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match=r"\(N,3,H,W\): this 2.5-D run"):
        run.translate(x[:, :1], "T1w2T2w")


def test_translate_volume_feeds_neighbour_stacks(context_run: Path, mrpaired: Path) -> None:
    from mrsynth.data.volumes import load_volume
    from mrsynth.eval.common import parse_direction
    from mrsynth.eval.translate import Geometry, translate_array_volume
    from mrsynth.train.runs import load_run

    run = load_run(context_run)
    seen: list[torch.Tensor] = []
    plain = run.translate

    def spy(x: Any, direction: str, **kw: Any) -> torch.Tensor:
        seen.append(torch.as_tensor(x).clone())
        return plain(x, direction, **kw)

    run.translate = spy  # type: ignore[method-assign]
    vol = load_volume(mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz")
    geo = Geometry.from_settings(run.data_settings, context_run)
    d = parse_direction("T1w2T2w", run.contrasts)
    out, n = translate_array_volume(vol.data, run, d, geo, batch_size=16)
    stacks = torch.cat(seen)
    assert stacks.shape == (n, 3, 64, 64)
    centre = stacks[:, 1]
    # channel 0 is the previous slice with brain, channel 2 the next; the ends repeat
    assert torch.equal(stacks[1:, 0], centre[:-1]) and torch.equal(stacks[:-1, 2], centre[1:])
    assert torch.equal(stacks[0, 0], centre[0]) and torch.equal(stacks[-1, 2], centre[-1])
    assert out.shape == vol.data.shape and np.isfinite(out).all()


def test_translate_refuses_2d_images_for_a_2p5d_run(context_run: Path, tmp_path: Path) -> None:
    from mrsynth.eval.translate import translate_path

    img = tmp_path / "slice_T1w.npy"
    np.save(img, np.random.default_rng(0).random((64, 64)).astype(np.float32))
    with pytest.raises(ConfigError, match="2-D image.*2.5-D model"):
        translate_path(context_run, "T1w2T2w", img, tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


def test_onnx_export_takes_stacks_and_matches_torch(context_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from mrsynth.eval.export import export_onnx
    from mrsynth.train.runs import load_run

    info = export_onnx(context_run, "T1w2T2w", tmp_path / "g.onnx")
    assert info["input_shape"] == ["N", 3, 64, 64]
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1] == 3
    x = (np.random.default_rng(1).random((1, 3, 64, 64)) * 2 - 1).astype(np.float32)
    got = sess.run(None, {"input": x})[0]
    want = load_run(context_run).translate(torch.from_numpy(x), "T1w2T2w").numpy()
    assert got.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_evaluate_translates_test_slices_from_their_neighbours(
    context_run: Path, prepared_context: Path, tmp_path: Path
) -> None:
    from mrsynth.data.naming import format_slice_name
    from mrsynth.data.prepared import load_prepared
    from mrsynth.eval.evaluate import evaluate
    from mrsynth.train.runs import load_run

    out = evaluate([context_run], prepared_context, tmp_path / "eval", c2st_steps=5)
    data = load_prepared(prepared_context)
    test = np.flatnonzero(data.split == "test")
    run = load_run(context_run)
    subj = "sub-ms19"
    rows = test[data.subject[test] == subj]
    row = rows[np.argsort(data.slice_index[rows])][len(rows) // 2]  # an interior slice
    stack = stack_by_lookup(data, "T1w", row, 1, test)
    want = run.translate(torch.from_numpy(stack[None]), "T1w2T2w").numpy()[0, 0]
    got = np.load(out / "synthetic" / "generators_s" /
                  format_slice_name(subj, int(data.slice_index[row]), "T2w"))
    np.testing.assert_allclose(got, want, atol=1e-6)
    with open(out / "volume.csv") as fh:
        vol_rows = [r for r in csv.DictReader(fh) if r["model"] == "generators_s"]
    assert {r["subject"] for r in vol_rows} == set(CONTEXT_TEST_SUBJECTS)
    assert all(np.isfinite(float(r["through_plane_mae"])) for r in vol_rows)


def test_complete_writes_a_2p5d_runs_volumes(context_run: Path, mini_bids: Path,
                                             tmp_path: Path) -> None:
    """complete goes through translate's volume path: its output is translate's, up to the
    linear map into the target contrast's units (complete) instead of the source's."""
    import shutil

    import nibabel as nib

    from mrsynth.eval.complete import complete_dataset
    from mrsynth.eval.translate import translate_path

    raw = tmp_path / "bids"
    shutil.copytree(mini_bids, raw)
    (raw / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz").unlink()
    res = complete_dataset(raw, [context_run], qc=False, validate=True)
    assert not res.failed
    job = next(j for j in res.jobs if j.record == "sub-ms19" and not j.validation)
    assert job.status == "done"
    val = next(j for j in res.jobs if j.validation)
    assert val.metrics is not None and np.isfinite(val.metrics["through_plane_mae"])
    src = raw / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    translate_path(context_run, "T1w2T2w", src, tmp_path / "t.nii.gz")
    a = np.asarray(nib.load(job.output).dataobj, dtype=np.float64)
    b = np.asarray(nib.load(tmp_path / "t.nii.gz").dataobj, dtype=np.float64)
    inside = (a != a.flat[0]) & (b != b.flat[0])
    assert inside.sum() > 1000
    assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.99999


def test_evaluate_says_when_test_slices_lack_neighbours(context_run: Path, prepared_small: Path,
                                                         tmp_path: Path) -> None:
    from mrsynth.eval.evaluate import evaluate

    lines: list[str] = []  # prepared_small keeps every 4th slice
    evaluate([context_run], prepared_small, tmp_path / "eval", c2st_steps=5, log=lines.append)
    assert any("lack their neighbours" in line for line in lines)
