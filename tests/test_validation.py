"""The validation split (``data prepare --val-fraction/--val-subjects``) and the per-epoch
validation scores the trainer records (:mod:`mrsynth.eval.validation`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from mrsynth.cli import main
from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError
from mrsynth.eval.validation import (
    SCORE_KEY,
    best_epoch,
    pick_validation_slices,
    score_slices,
    validate,
)

KW = {"size": (128, 128), "slice_step": 6}


@pytest.fixture(scope="module")
def with_val(mini_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real subjects: one test, one validation, one training."""
    out = tmp_path_factory.mktemp("val") / "val.npz"
    return prepare_dataset(mini_bids, out, test_subjects=["sub-ms19"], val_fraction=0.5,
                           seed=0, **KW)


# --------------------------------------------------------------------------- the split
def test_val_split_is_kept_out_of_training_and_test(with_val: Path, mini_bids: Path,
                                                    tmp_path: Path):
    d = load_prepared(with_val)
    st = d.settings
    assert st["test_subjects"] == ["sub-ms19"]
    assert len(st["val_subjects"]) == 1 and len(st["train_subjects"]) == 1
    assert {*st["val_subjects"], *st["train_subjects"]} == {"sub-met00110", "sub-bratscase"}
    assert st["val_method"] == "seed" and st["val_fraction"] == 0.5
    for sub in set(d.subject.tolist()):  # one split per subject
        splits = set(d.split[d.subject == sub].tolist())
        want = ("test" if sub in st["test_subjects"] else
                "val" if sub in st["val_subjects"] else "train")
        assert splits == {want}, sub
        assert d.subjects[sub]["split"] == want
    assert d.has_split("val") and d.has_split("train") and d.has_split("test")
    # reproducible, and taking a validation split never changes the test split
    again = load_prepared(prepare_dataset(mini_bids, tmp_path / "again.npz",
                                          test_subjects=["sub-ms19"], val_fraction=0.5, **KW))
    np.testing.assert_array_equal(again.split, d.split)
    no_val = load_prepared(prepare_dataset(mini_bids, tmp_path / "noval.npz", test_fraction=0.34,
                                           seed=5, **KW))
    with_v = load_prepared(prepare_dataset(mini_bids, tmp_path / "v.npz", test_fraction=0.34,
                                           val_fraction=0.5, seed=5, **KW))
    assert no_val.settings["test_subjects"] == with_v.settings["test_subjects"]
    assert not no_val.has_split("val") and no_val.settings["val_subjects"] == []
    np.testing.assert_array_equal(no_val.split == "test", with_v.split == "test")


def test_val_subjects_given_on_the_command_line(mini_bids: Path, tmp_path: Path, capsys):
    out = tmp_path / "given.npz"
    rc = main(["data", "prepare", str(mini_bids), "--out", str(out), "--size", "128", "128",
               "--slice-step", "6", "--test-subjects", "sub-ms19", "--val-subjects",
               "bratscase"])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())
    d = load_prepared(out)
    assert d.settings["val_subjects"] == ["sub-bratscase"]
    assert d.settings["val_method"] == "given"
    assert set(d.subject[d.split == "val"].tolist()) == {"sub-bratscase"}
    n_val = int((d.split == "val").sum())
    assert n_val > 0 and f"{n_val} val" in text and "val (sub-bratscase)" in text


@pytest.mark.parametrize(("val", "message"), [
    (["sub-ms19"], "in the test split"),
    (["sub-nobody"], "Validation subject(s) sub-nobody are not in"),
    (["sub-met00110", "sub-bratscase"], "leave at least one subject to train on"),
])
def test_bad_val_subjects_are_refused(mini_bids: Path, tmp_path: Path, val, message):
    with pytest.raises(ConfigError) as err:
        prepare_dataset(mini_bids, tmp_path / "bad.npz", test_subjects=["sub-ms19"],
                        val_subjects=val, **KW)
    assert message in str(err.value)
    assert not (tmp_path / "bad.npz").exists()


def test_val_fraction_needs_enough_training_subjects(mini_bids: Path, tmp_path: Path):
    """``val_min_subjects`` (the demo's rule): a drawn validation split only when that many
    subjects are left after the test split; named validation subjects are kept anyway."""
    from mrsynth.data import DataWarning

    with pytest.warns(DataWarning, match="Only 2 participant\\(s\\) outside the test split"):
        d = load_prepared(prepare_dataset(mini_bids, tmp_path / "few.npz",
                                          test_subjects=["sub-ms19"], val_fraction=0.5,
                                          val_min_subjects=3, **KW))
    assert not d.has_split("val") and d.settings["val_method"] == "none"
    assert d.settings["train_subjects"] == ["sub-bratscase", "sub-met00110"]
    assert any("--val-subjects" in w for w in d.settings["warnings"])
    # enough subjects: the same split as without the rule
    d2 = load_prepared(prepare_dataset(mini_bids, tmp_path / "enough.npz",
                                       test_subjects=["sub-ms19"], val_fraction=0.5,
                                       val_min_subjects=2, **KW))
    assert d2.settings["val_method"] == "seed" and len(d2.settings["val_subjects"]) == 1
    named = load_prepared(prepare_dataset(mini_bids, tmp_path / "named.npz",
                                          test_subjects=["sub-ms19"],
                                          val_subjects=["sub-bratscase"], val_min_subjects=3,
                                          **KW))
    assert named.settings["val_subjects"] == ["sub-bratscase"]


def test_bad_val_fraction_is_refused(mini_bids: Path, tmp_path: Path, capsys):
    rc = main(["data", "prepare", str(mini_bids), "--out", str(tmp_path / "x.npz"),
               "--val-fraction", "1.5"])
    text = " ".join(capsys.readouterr().err.split())
    assert rc != 0 and "--val-fraction must be in [0, 1)" in text and "Traceback" not in text


def test_file_without_a_val_split_still_loads(with_val: Path, tmp_path: Path):
    """Files written before the validation split existed: no ``val`` slices, no settings."""
    d = load_prepared(with_val)
    d.split = np.where(d.split == "val", "train", d.split)
    for key in ("val_fraction", "val_method", "val_subjects"):
        d.settings.pop(key)
    old = load_prepared(d.save(tmp_path / "old.npz"))
    assert not old.has_split("val")
    assert pick_validation_slices(old, ("T1w", "T2w"), 4) is None


# --------------------------------------------------------------------------- the scores
def test_pick_validation_slices(with_val: Path):
    d = load_prepared(with_val)
    val = pick_validation_slices(d, ("T1w", "T2w"), 4)
    assert val is not None and len(val) == 4
    assert (d.split[val.rows] == "val").all() and d.paired[val.rows].all()
    assert val.subjects == d.settings["val_subjects"]
    np.testing.assert_array_equal(val.A, d.images["T1w"][val.rows])
    np.testing.assert_array_equal(val.mask, d.mask[val.rows])
    rows = np.flatnonzero(d.split == "val")
    assert val.rows[0] == rows[0] and val.rows[-1] == rows[-1]  # spread over the split
    assert len(pick_validation_slices(d, ("T1w", "T2w"), 10_000)) == rows.size
    assert pick_validation_slices(d, ("T1w", "T2w"), 0) is None


def _independent_scores(real: np.ndarray, syn: np.ndarray, mask: np.ndarray) -> tuple[float,
                                                                                       float]:
    maes, ssims = [], []
    for r, s, m in zip(real.astype(np.float64), syn.astype(np.float64), mask, strict=True):
        rz = (r - r[m].mean()) / r[m].std()
        sz = (s - s[m].mean()) / s[m].std()
        maes.append(np.abs(rz - sz)[m].mean())
        peak = rz[m].max() - rz[m].min()
        _, smap = structural_similarity(rz, sz, data_range=peak, full=True)
        ssims.append(smap[m].mean())
    return float(np.mean(maes)), float(np.mean(ssims))


def test_scores_match_an_independent_computation(with_val: Path):
    d = load_prepared(with_val)
    val = pick_validation_slices(d, ("T1w", "T2w"), 3)
    rng = np.random.default_rng(0)
    syn = (val.B + rng.normal(0, 0.2, val.B.shape)).astype(np.float32)
    got = score_slices(val.B, syn, val.mask)
    want_mae, want_ssim = _independent_scores(val.B, syn, val.mask)
    assert got["mae"] == pytest.approx(want_mae, rel=1e-9)
    assert got["ssim"] == pytest.approx(want_ssim, rel=1e-9)
    assert 0 < got["mae"] < 1 and 0 < got["ssim"] < 1


def test_validate_translates_both_directions(with_val: Path):
    import torch

    d = load_prepared(with_val)
    val = pick_validation_slices(d, ("T1w", "T2w"), 3)
    calls = []

    def oracle(x: torch.Tensor, direction: str) -> torch.Tensor:
        calls.append((direction, tuple(x.shape)))
        return torch.from_numpy(val.B if direction == "A2B" else val.A)[:, None]

    perfect = validate(oracle, val)
    assert calls == [("A2B", (3, 1, 128, 128)), ("B2A", (3, 1, 128, 128))]
    for label in ("T1w2T2w", "T2w2T1w"):
        assert perfect[label]["mae"] == 0.0 and perfect[label]["ssim"] == pytest.approx(1.0)
    assert perfect[SCORE_KEY] == 0.0

    ident = validate(lambda x, direction: x, val)
    mae_ab, _ = _independent_scores(val.B, val.A, val.mask)
    mae_ba, _ = _independent_scores(val.A, val.B, val.mask)
    assert ident["T1w2T2w"]["mae"] == pytest.approx(mae_ab, abs=1e-6)
    assert ident[SCORE_KEY] == pytest.approx((mae_ab + mae_ba) / 2, abs=1e-6)


def test_baselines_on_the_validation_slices(with_val: Path):
    from mrsynth.eval import baselines as bl
    from mrsynth.eval.validation import baseline_scores

    d = load_prepared(with_val)
    val = pick_validation_slices(d, ("T1w", "T2w"), 4)
    base = baseline_scores(d, val)
    assert set(base) == set(bl.BASELINES)
    # the brain's mean everywhere: in-brain MAE = mean |z| of the real slice
    mean_abs_z = np.mean([np.abs((b[m] - b[m].mean()) / b[m].std()).mean()
                          for b, m in zip(val.B.astype(np.float64), val.mask, strict=True)])
    assert base[bl.BASELINE_MEAN]["T1w2T2w"]["mae"] == pytest.approx(mean_abs_z, abs=1e-6)
    assert base[bl.BASELINE_IDENTITY] == validate(lambda x, direction: x, val)
    # the lookup table is fitted on the training slices only, and applied inside the brain
    tr = np.flatnonzero(d.split == "train")
    lut = bl.fit_intensity_lut(d.images["T1w"][tr], d.images["T2w"][tr], d.mask[tr])
    pred = np.where(val.mask, lut.table[bl.lut_bin(val.A)], -1.0)
    want, _ = _independent_scores(val.B, pred, val.mask)
    assert base[bl.BASELINE_INTENSITY]["T1w2T2w"]["mae"] == pytest.approx(want, abs=1e-6)
    # and fitting it on the training split only: changing val/test images does not move it
    d2 = load_prepared(with_val)
    d2.images["T2w"][d2.split != "train"] = 0.0
    assert baseline_scores(d2, pick_validation_slices(d, ("T1w", "T2w"), 4))[
        bl.BASELINE_INTENSITY] == base[bl.BASELINE_INTENSITY]


def test_best_epoch_is_the_argmin():
    eps = [{"epoch": 1, "validation": {SCORE_KEY: 0.9}},
           {"epoch": 2, "validation": {SCORE_KEY: 0.7}},
           {"epoch": 3, "validation": {SCORE_KEY: math.nan}},
           {"epoch": 4},
           {"epoch": 5, "validation": {SCORE_KEY: 0.7}},
           {"epoch": 6, "validation": {SCORE_KEY: 0.8}}]
    assert best_epoch(eps) == 2
    assert best_epoch([{"epoch": 1}, {"epoch": 2, "validation": None}]) is None
    assert best_epoch(json.loads(json.dumps(eps))[::-1]) == 2


# --------------------------------------------------------------------------- learning curves
def _metrics_doc(scores: list[float], best: int) -> dict:
    eps = [{"epoch": i + 1, "validation": {"T1w2T2w": {"mae": s, "ssim": 1 - s},
                                           "T2w2T1w": {"mae": s / 2, "ssim": 1 - s / 2},
                                           SCORE_KEY: 0.75 * s}}
           for i, s in enumerate(scores)]
    base = {"baseline_intensity": {"T1w2T2w": {"mae": 0.6, "ssim": 0.5},
                                    "T2w2T1w": {"mae": 0.4, "ssim": 0.6}, SCORE_KEY: 0.5}}
    return {"epochs": eps, "validation": {"baselines": base, "best_epoch": best}}


def test_learning_curves_figure_draws_the_recorded_scores(tmp_path: Path):
    from mrsynth.eval.curves import learning_curves_figure, learning_curves_html

    runs = [("a", _metrics_doc([0.9, 0.5, 0.7], 2)), ("b", _metrics_doc([0.8, 0.6], 2)),
            ("old", {"epochs": [{"epoch": 1, "losses": {}}]})]
    fig = learning_curves_figure(runs)
    axes = fig.axes
    assert len(axes) == 4  # (MAE, SSIM) x (two directions)
    mae_ab = axes[0]
    assert mae_ab.get_title() == "T1w2T2w"
    lines = {ln.get_label(): ln for ln in mae_ab.get_lines()}
    np.testing.assert_allclose(lines["a"].get_ydata(), [0.9, 0.5, 0.7])
    np.testing.assert_allclose(lines["b"].get_xdata(), [1, 2])
    np.testing.assert_allclose(lines["baseline_intensity"].get_ydata(), [0.6, 0.6])
    stars = [ln for ln in mae_ab.get_lines() if ln.get_marker() == "*"]
    assert sorted(float(s.get_ydata()[0]) for s in stars) == [0.5, 0.6]
    assert learning_curves_figure([("old", runs[2][1])]) is None

    for name, doc in runs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(doc))
    entries = [{"label": n, "run_dir": str(tmp_path / n)} for n, _ in runs]
    page = learning_curves_html(entries)
    assert "data:image/png;base64," in page and "a: epoch 2" in page
    none = learning_curves_html([{"label": "gone", "run_dir": str(tmp_path / "nope")}])
    assert "--val-fraction" in none and "<img" not in none


# --------------------------------------------------------------------------- --checkpoint
def test_evaluate_and_translate_take_a_checkpoint(prepared_small: Path, mrpaired: Path,
                                                  tmp_path: Path, capsys):
    """--checkpoint reaches load_run: a run without a 'best' checkpoint is a clear error, a
    kept one is used (eval.json says which)."""
    from helpers import one_torch_thread, tiny_arch
    from mrsynth.train import checkpoint as ckpt
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    cfg = resolve_config("simple", "cpu-small", {
        "train.epochs": 1, "train.max_steps_per_epoch": 1, "train.progress": False,
        "train.checkpoint_every_minutes": 0, "device": "cpu", **tiny_arch("simple")})
    with one_torch_thread():
        run = train(cfg, prepared_small, tmp_path / "run")
    vol = mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    args = ["translate", "--run", str(run), "--direction", "T1w2T2w", "--input", str(vol),
            "--output", str(tmp_path / "out.nii.gz"), "--device", "cpu", "--checkpoint", "best"]
    assert main(args) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "has no 'best' checkpoint" in err and "--val-fraction" in err
    assert "Traceback" not in err and not (tmp_path / "out.nii.gz").exists()
    ckpt.copy_checkpoint(run / "checkpoints", "latest", "best")
    assert main(args) == 0 and (tmp_path / "out.nii.gz").is_file()
    ev = tmp_path / "eval"
    assert main(["evaluate", "--runs", str(run), "--data", str(prepared_small), "--out", str(ev),
                 "--checkpoint", "best", "--c2st-steps", "5", "--device", "cpu"]) == 0
    entry = json.loads((ev / "eval.json").read_text())["runs"][0]
    assert (entry["checkpoint"], entry["epoch"]) == ("best", 1)


# --------------------------------------------------------------------------- in the trainer
def _val_config(**over):
    from helpers import tiny_arch
    from mrsynth.train.config import resolve_config

    return resolve_config("simple", "cpu-small", {
        "train.epochs": 3, "train.max_steps_per_epoch": 3, "train.batch_size": 2,
        "train.patch_size": 32, "train.val_slices": 4, "train.keep_every_epochs": 1,
        "train.progress": False, "train.checkpoint_every_minutes": 0, "train.num_threads": 1,
        "device": "cpu", **tiny_arch("simple"), **over})


def _weights(run: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / name / "weights.safetensors")


def test_training_scores_validation_slices_every_epoch(small_with_val: Path, tmp_path: Path):
    import torch

    from mrsynth.train.runs import load_run
    from mrsynth.train.trainer import train

    run = train(_val_config(), small_with_val, tmp_path / "run")
    doc = json.loads((run / "metrics.json").read_text())
    v = doc["validation"]
    d = load_prepared(small_with_val)
    val = pick_validation_slices(d, ("T1w", "T2w"), 4)
    assert v["n_slices"] == 4 and v["rows"] == val.rows.tolist() and v["subjects"] == ["sub-ms07"]
    assert set(v["baselines"]) == {"baseline_identity", "baseline_intensity", "baseline_mean"}
    scores = {}
    for e in doc["epochs"]:
        ev = e["validation"]
        assert set(ev) == {"T1w2T2w", "T2w2T1w", SCORE_KEY}
        assert ev[SCORE_KEY] == pytest.approx(
            (ev["T1w2T2w"]["mae"] + ev["T2w2T1w"]["mae"]) / 2, abs=2e-6)
        scores[e["epoch"]] = ev[SCORE_KEY]
    best = min(scores, key=lambda k: (scores[k], k))
    assert v["best_epoch"] == best and v["best_score"] == scores[best]
    # the best checkpoint is that epoch's, and reproduces its recorded scores
    loaded = load_run(run, checkpoint="best")
    assert loaded.epoch == best
    wb, we = _weights(run, "best"), _weights(run, f"epoch_{best:04d}")
    assert all(torch.equal(wb[k], we[k]) for k in wb)
    fake_b = loaded.translate(val.A, "A2B").numpy()
    want_mae, _ = _independent_scores(val.B, fake_b, val.mask)
    assert doc["epochs"][best - 1]["validation"]["T1w2T2w"]["mae"] == pytest.approx(
        want_mae, abs=2e-5)
    # a file without a validation split: no scores, no best checkpoint
    plain = train(_val_config(**{"train.epochs": 1}), with_val_removed(small_with_val, tmp_path),
                  tmp_path / "plain")
    doc = json.loads((plain / "metrics.json").read_text())
    assert "validation" not in doc and "validation" not in doc["epochs"][0]
    assert not (plain / "checkpoints" / "best").exists()
    from mrsynth.errors import RunError
    from mrsynth.eval.common import load_run_checked

    with pytest.raises(RunError, match="no 'best' checkpoint.*--val-fraction"):
        load_run_checked(plain, checkpoint="best")


def with_val_removed(path: Path, tmp_path: Path) -> Path:
    d = load_prepared(path)
    d.split = np.where(d.split == "val", "train", d.split)
    return d.save(tmp_path / "noval.npz")


def test_best_checkpoint_follows_the_argmin(small_with_val: Path, tmp_path: Path,
                                            monkeypatch):
    """Scripted validation scores 0.5, 0.3, 0.4: the best checkpoint is epoch 2's; resumed
    for a 4th epoch scoring 0.2, it moves to epoch 4."""
    import torch

    import mrsynth.eval.validation as validation
    from mrsynth.train.runs import load_run
    from mrsynth.train.trainer import train

    script = iter([0.5, 0.3, 0.4, 0.2])

    def scripted(translate, val):
        s = next(script)
        return {"T1w2T2w": {"mae": s, "ssim": 1 - s}, "T2w2T1w": {"mae": s, "ssim": 1 - s},
                SCORE_KEY: s}

    monkeypatch.setattr(validation, "validate", scripted)
    run = train(_val_config(), small_with_val, tmp_path / "run")
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["validation"]["best_epoch"] == 2 and doc["validation"]["best_score"] == 0.3
    assert json.loads((run / "checkpoints/best/meta.json").read_text())["epoch"] == 2
    wb, w2 = _weights(run, "best"), _weights(run, "epoch_0002")
    assert all(torch.equal(wb[k], w2[k]) for k in wb)
    assert load_run(run, checkpoint="best").epoch == 2

    train(_val_config(**{"train.epochs": 4}), None, run, resume=True)
    doc = json.loads((run / "metrics.json").read_text())
    assert [e["validation"][SCORE_KEY] for e in doc["epochs"]] == [0.5, 0.3, 0.4, 0.2]
    assert doc["validation"]["best_epoch"] == 4
    assert load_run(run, checkpoint="best").epoch == 4


def test_validation_slices_of_a_store_read_only_the_validation_masks(
        with_val: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a store, choosing the validation slices reads the masks of the validation split
    only (and the same slices as from the single file), not the whole data set's."""
    from mrsynth.data import store as st

    store = st.write_store_from(load_prepared(with_val), tmp_path / "v.mrs")
    data = load_prepared(store)
    n_val = int((data.split == "val").sum())
    assert 0 < n_val < len(data)
    read: list[int] = []
    get = st.ShardedArray.__getitem__

    def counting(self, key):
        out = get(self, key)
        if self.what.startswith("mask"):
            read.append(int(np.prod(out.shape[:-2])) if out.ndim >= 2 else 1)
        return out

    monkeypatch.setattr(st.ShardedArray, "__getitem__", counting)
    val = pick_validation_slices(data, ("T1w", "T2w"), 4)
    whole = pick_validation_slices(load_prepared(with_val), ("T1w", "T2w"), 4)
    assert val is not None and whole is not None
    np.testing.assert_array_equal(val.rows, whole.rows)
    np.testing.assert_array_equal(val.mask, whole.mask)
    assert 0 < sum(read) <= n_val + 4, (read, n_val)


def test_split_from_carries_the_validation_subjects(with_val: Path, mini_bids: Path,
                                                   tmp_path: Path) -> None:
    """``--split-from`` an earlier file (or store, or JSON dict) reuses its validation
    subjects as well as its test subjects, whatever the seed; a validation split given
    anew (--val-fraction / --val-subjects) wins."""
    from mrsynth.data import store as st

    old = load_prepared(with_val).settings
    store = st.write_store_from(load_prepared(with_val), tmp_path / "v.mrs")
    spec = tmp_path / "split.json"
    spec.write_text(json.dumps({"test_subjects": old["test_subjects"],
                                "val_subjects": old["val_subjects"]}))
    for i, src in enumerate((with_val, store, spec)):
        out = tmp_path / f"again{i}.npz"
        assert main(["data", "prepare", str(mini_bids), "--out", str(out), "--size", "128",
                     "128", "--slice-step", "6", "--seed", "99", "--split-from", str(src),
                     "-q"]) == 0
        new = load_prepared(out).settings
        assert new["test_subjects"] == old["test_subjects"], src
        assert new["val_subjects"] == old["val_subjects"], src
    other = sorted(set(old["train_subjects"]))
    out = tmp_path / "given.npz"
    assert main(["data", "prepare", str(mini_bids), "--out", str(out), "--size", "128", "128",
                 "--slice-step", "6", "--split-from", str(with_val), "--val-subjects",
                 other[0], "-q"]) == 0
    assert load_prepared(out).settings["val_subjects"] == [other[0]]
