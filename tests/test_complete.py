"""``mrsynth complete`` on a copy of real shared subjects (half resolution) with a tiny run.

The data set: sub-ms19 (T1w only), sub-bratscase/ses-01 (T1w only) and sub-met00110 (T1w
and T2w: validation, and the data set's T2w intensity reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import one_torch_thread
from mrsynth.cli import main
from test_eval_fixtures import tiny_run

MODEL = "simple"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_small) -> Path:
    return tiny_run(tmp_path_factory, prepared_small, MODEL)


def make_raw(mini_bids: Path, dest: Path) -> Path:
    """The test data set (see the module docstring) at ``dest``."""
    shutil.copytree(mini_bids, dest)
    (dest / "sub-ms19" / "anat" / "sub-ms19_T2w.nii.gz").unlink()
    old = dest / "sub-bratscase" / "anat"
    new = dest / "sub-bratscase" / "ses-01" / "anat"
    new.mkdir(parents=True)
    (old / "sub-bratscase_T1w.nii.gz").rename(new / "sub-bratscase_ses-01_T1w.nii.gz")
    shutil.rmtree(old)
    return dest


def tree_hash(root: Path, skip: str = "derivatives") -> dict[str, str]:
    """SHA-256 of every file below ``root`` (except ``skip``), and the folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == skip:
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["complete", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def brain_range(path: Path) -> tuple[float, float]:
    x = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    return tuple(np.percentile(x[x != 0], [0.5, 99.5]))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def completed(mini_bids, run_dir, tmp_path_factory):
    """One ``complete --validate`` run: (raw, out, rc, stdout, stderr, raw hash before)."""
    raw = make_raw(mini_bids, tmp_path_factory.mktemp("complete") / "bids")
    before = tree_hash(raw)
    rc, out, err = cli(raw, "--run", run_dir, "--validate", "--device", "cpu",
                       "--batch-size", "16")
    return raw, raw / "derivatives" / "mrsynth", rc, out, err, before


EXPECTED = {
    # (source, output) relative to raw / out
    ("sub-ms19/anat/sub-ms19_T1w.nii.gz", f"sub-ms19/anat/sub-ms19_desc-{MODEL}_T2w.nii.gz"),
    ("sub-bratscase/ses-01/anat/sub-bratscase_ses-01_T1w.nii.gz",
     f"sub-bratscase/ses-01/anat/sub-bratscase_ses-01_desc-{MODEL}_T2w.nii.gz"),
    ("sub-met00110/anat/sub-met00110_T1w.nii.gz",
     f"sub-met00110/anat/sub-met00110_desc-{MODEL}Validation_T2w.nii.gz"),
    ("sub-met00110/anat/sub-met00110_T2w.nii.gz",
     f"sub-met00110/anat/sub-met00110_desc-{MODEL}Validation_T1w.nii.gz"),
}


def test_writes_every_missing_contrast_and_touches_no_raw_file(completed):
    raw, out, rc, stdout, err, before = completed
    assert rc == 0, err
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")}
    assert written == {o for _, o in EXPECTED}
    assert tree_hash(raw) == before  # raw data untouched, nothing added outside derivatives
    assert "written" in stdout and "Validation" in stdout
    # the status column is rendered, not printed as literal markup
    assert "[green]" not in stdout and "[/" not in stdout
    # no temporary files left anywhere
    assert not [p for p in raw.rglob(".*tmp*")]


def test_outputs_keep_the_source_grid_and_use_the_target_units(completed):
    raw, out, *_ = completed
    t2_lo, t2_hi = brain_range(raw / "sub-met00110/anat/sub-met00110_T2w.nii.gz")
    for src_rel, out_rel in EXPECTED:
        src, dst = nib.load(raw / src_rel), nib.load(out / out_rel)
        assert dst.shape == src.shape
        np.testing.assert_array_equal(dst.affine, src.affine)
        np.testing.assert_array_equal(dst.header.get_zooms(), src.header.get_zooms())
        assert dst.get_data_dtype() == np.float32
        x = np.asarray(src.dataobj, dtype=np.float64)
        y = np.asarray(dst.dataobj, dtype=np.float64)
        brain = x != 0
        assert np.mean(y[~brain] == 0) > 0.99  # background: the reference's value, 0
        assert np.std(y[brain]) > 0
        if out_rel.endswith("_T2w.nii.gz"):
            # the data set's only real T2w is the intensity reference: its robust range
            tol = 0.02 * (t2_hi - t2_lo)
            assert y[brain].min() >= t2_lo - tol and y[brain].max() <= t2_hi + tol
            side = json.loads((out / out_rel.replace(".nii.gz", ".json")).read_text())
            sc = side["IntensityScale"]
            assert sc["Method"] == "dataset" and sc["NumberOfVolumes"] == 1
            assert sc["Offset"] == pytest.approx((t2_lo + t2_hi) / 2, rel=0.02)
            assert sc["Scale"] == pytest.approx((t2_hi - t2_lo) / 2, rel=0.02)
        else:  # T1w: the median scale of the three real T1w volumes
            ranges = [brain_range(p) for p in sorted(raw.rglob("*_T1w.nii.gz"))]
            med_lo = np.median([r[0] for r in ranges])
            med_hi = np.median([r[1] for r in ranges])
            tol = 0.05 * (med_hi - med_lo)
            assert y[brain].min() >= med_lo - tol and y[brain].max() <= med_hi + tol


def test_sidecars_and_dataset_description(completed, run_dir):
    raw, out, *_ = completed
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "mrsynth" and desc["GeneratedBy"][0]["Version"]
    assert desc["SourceDatasets"][0]["URL"] == "../.."
    assert desc["DatasetLinks"]["raw"] == "../.."
    assert (out / "../..").resolve() == raw.resolve()
    for src_rel, out_rel in EXPECTED:
        side = json.loads((out / out_rel.replace(".nii.gz", ".json")).read_text())
        assert side["Sources"] == [f"bids:raw:{src_rel}"]
        assert side["SynthesisModel"] == MODEL
        assert side["CheckpointSHA256"] == sha256(
            run_dir / "checkpoints" / side["Checkpoint"] / "weights.safetensors")
        assert side["Command"].startswith("mrsynth complete ")
        assert "--validate" in side["Command"]
        assert side["MrsynthVersion"]
        assert side["Warnings"] == []  # a real brain, inside the training crop
        assert side["TargetContrast"] == out_rel.split("_")[-1].split(".")[0]
        assert side["Validation"] is ("Validation" in out_rel)


def test_pybids_indexes_the_derivative(completed):
    import bids  # a test dependency (pyproject: test extra)
    raw, out, *_ = completed
    layout = bids.BIDSLayout(raw, derivatives=out)
    for desc, suffix in ((MODEL, "T2w"), (f"{MODEL}Validation", "T2w"),
                         (f"{MODEL}Validation", "T1w")):
        got = {Path(f).resolve() for f in layout.get(
            scope="derivatives", desc=desc, suffix=suffix, extension=".nii.gz",
            return_type="filename")}
        want = {(out / o).resolve() for _, o in EXPECTED
                if f"desc-{desc}_{suffix}." in o}
        assert got == want and want
    ses = layout.get(scope="derivatives", subject="bratscase", session="01", desc=MODEL,
                     suffix="T2w", extension=".nii.gz")
    assert len(ses) == 1
    # the sidecar is the file's metadata
    meta = ses[0].get_metadata()
    assert meta["SynthesisModel"] == MODEL and meta["TargetContrast"] == "T2w"


def test_validation_metrics_match_a_recomputation(completed):
    raw, out, *_ = completed
    rows = (out / "validation.tsv").read_text().splitlines()
    head = rows[0].split("\t")
    table = [dict(zip(head, r.split("\t"), strict=True)) for r in rows[1:]]
    assert {(r["subject"], r["direction"]) for r in table} == {
        ("sub-met00110", "T1w2T2w"), ("sub-met00110", "T2w2T1w")}
    for r in table:
        target = r["direction"][-3:]
        syn = np.asarray(nib.load(out / r["output"]).dataobj, dtype=np.float64)
        real = np.asarray(nib.load(raw / f"sub-met00110/anat/sub-met00110_{target}.nii.gz")
                          .dataobj, dtype=np.float64)
        m = (syn != 0) & (real != 0)  # skull-stripped data: brain = non-zero
        s = (syn - syn[m].mean()) / syn[m].std()
        q = (real - real[m].mean()) / real[m].std()
        mae = np.abs(s[m] - q[m]).mean()
        peak = q[m].max() - q[m].min()
        psnr = 10 * np.log10(peak ** 2 / np.mean((s[m] - q[m]) ** 2))
        assert float(r["mae"]) == pytest.approx(mae, rel=0.02)
        assert float(r["psnr"]) == pytest.approx(psnr, rel=0.02)
        # SSIM lies in [-1, 1]; this barely trained tiny run can score below 0
        assert -1 < float(r["ssim"]) < 1 and float(r["through_plane_mae"]) > 0
        side = json.loads((out / r["output"].replace(".nii.gz", ".json")).read_text())
        assert side["ValidationMetrics"]["mae"] == pytest.approx(float(r["mae"]))
        # sub-met00110 is in the run's test split: an unseen subject
        assert r["run_split"] == "test" and side["RunDataSplit"] == "test"
    _, _, _, stdout, *_ = completed
    assert "unseen" in stdout and "seen in training" not in stdout
    # the summary file: the mean and sample SD over the rows above (one subject: no SD)
    lines = (out / "validation_summary.tsv").read_text().splitlines()
    summary = [dict(zip(lines[0].split("\t"), r.split("\t"), strict=True)) for r in lines[1:]]
    assert [(r["direction"], r["subjects"], r["n"]) for r in summary] == [
        ("T1w2T2w", "unseen", "1"), ("T2w2T1w", "unseen", "1")]
    for r in summary:
        row = next(t for t in table if t["direction"] == r["direction"])
        for k in ("mae", "psnr", "ssim", "through_plane_mae"):
            assert float(r[f"{k}_mean"]) == pytest.approx(float(row[k]))
            assert r[f"{k}_sd"] == "n/a"
    assert "validation_summary.tsv" in (out / ".bidsignore").read_text().split()


def test_validation_of_subjects_the_run_trained_on_is_flagged(mini_bids, run_dir, tmp_path):
    """A run whose data had sub-met00110 in its training split: the validation rows, the
    sidecars and the summary say so, and the command warns that the error is no estimate;
    the split comes from the run's config.json, matched by participant (sessions too)."""
    seen_run = tmp_path / "run-seen"
    shutil.copytree(run_dir, seen_run)
    cfg = json.loads((seen_run / "config.json").read_text())
    settings = cfg["data"]["settings"]
    assert "sub-met00110" in settings["test_subjects"]
    settings["test_subjects"] = ["sub-ms19"]
    settings["train_subjects"] = sorted({*settings["train_subjects"], "sub-met00110"})
    (seen_run / "config.json").write_text(json.dumps(cfg))
    raw = make_raw(mini_bids, tmp_path / "bids")
    rc, stdout, err = cli(raw, "--run", seen_run, "--validate", "--device", "cpu")
    assert rc == 0, err
    out = raw / "derivatives" / "mrsynth"
    rows = (out / "validation.tsv").read_text().splitlines()
    head = rows[0].split("\t")
    table = [dict(zip(head, r.split("\t"), strict=True)) for r in rows[1:]]
    assert [r["run_split"] for r in table] == ["train", "train"]
    lines = (out / "validation_summary.tsv").read_text().splitlines()
    assert [r.split("\t")[2] for r in lines[1:]] == ["seen", "seen"]
    text = " ".join(stdout.split())
    assert "seen in training" in text and "their error is no estimate for new data" in text
    assert "none here" in text  # every validated subject was seen
    # the run was trained on the shared data set, this is a copy elsewhere: labels may differ
    assert "matched by label" in text and "may name other people" in text
    qc_page = (out / "qc.html").read_text()
    assert qc_page.count("seen by the run (train split): no estimate for new data") == 2
    sides = {p.name: json.loads(p.read_text()) for p in out.rglob("sub-*.json")}
    assert {v["RunDataSplit"] for k, v in sides.items() if "Validation" in k} == {"train"}
    # sub-ms19 is still in the run's test split; sub-bratscase (a session) is in its
    # training split: split_of matches the participant, not the session's record
    assert sides[f"sub-ms19_desc-{MODEL}_T2w.json"]["RunDataSplit"] == "test"
    assert sides[f"sub-bratscase_ses-01_desc-{MODEL}_T2w.json"]["RunDataSplit"] == (
        "train" if "sub-bratscase" in settings["train_subjects"] else "none")


def test_qc_figures_and_page(completed):
    from PIL import Image

    raw, out, *_ = completed
    page = (out / "qc.html").read_text()
    pngs = sorted((out / "qc").glob("*.png"))
    assert len(pngs) == len(EXPECTED)
    for p in pngs:
        assert f'src="qc/{p.name}"' in page
        w, h = Image.open(p).size
        assert w > 100 and h > 100
    # validation figures have two more columns (real, error) than completion figures
    val = Image.open(out / "qc" / f"sub-met00110_desc-{MODEL}Validation_T2w.png").size[0]
    miss = Image.open(out / "qc" / f"sub-ms19_desc-{MODEL}_T2w.png").size[0]
    assert val > 1.5 * miss


def test_rerun_skips_and_another_checkpoint_is_refused_unless_overwrite(mini_bids, run_dir,
                                                                        tmp_path):
    raw = make_raw(mini_bids, tmp_path / "bids")
    out = tmp_path / "deriv"
    assert cli(raw, "--run", run_dir, "--out", out, "--device", "cpu", "--no-qc")[0] == 0
    files = sorted(out.rglob("*.nii.gz"))
    assert len(files) == 2
    stamp = {p: (p.stat().st_mtime_ns, sha256(p)) for p in files}
    rc, stdout, _ = cli(raw, "--run", run_dir, "--out", out, "--device", "cpu", "--no-qc")
    assert rc == 0 and "skipped" in stdout
    assert {p: (p.stat().st_mtime_ns, sha256(p)) for p in files} == stamp

    other = perturbed_copy(run_dir, tmp_path / "other-run")
    rc, _, err = cli(raw, "--run", other, "--out", out, "--device", "cpu", "--no-qc")
    assert rc != 0 and "another checkpoint" in err and "--overwrite" in err
    assert {p: (p.stat().st_mtime_ns, sha256(p)) for p in files} == stamp
    rc, _, err = cli(raw, "--run", other, "--out", out, "--device", "cpu", "--no-qc",
                     "--overwrite")
    assert rc == 0, err
    new_sha = sha256(other / "checkpoints" / "latest" / "weights.safetensors")
    for p in files:
        assert sha256(p) != stamp[p][1]
        side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        assert side["CheckpointSHA256"] == new_sha


def perturbed_copy(run_dir: Path, dest: Path) -> Path:
    """The run with slightly different weights (same model, contrasts and metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(run_dir, dest)
    for w in (dest / "checkpoints").glob("*/weights.safetensors"):
        with safe_open(str(w), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        tensors = {k: (v + 0.05 if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(tensors, str(w), metadata=meta)
        doc = json.loads((w.parent / "meta.json").read_text())
        if "sha256" in doc:  # checkpoints that record their files' hashes
            doc["sha256"]["weights.safetensors"] = sha256(w)
            (w.parent / "meta.json").write_text(json.dumps(doc))
    return dest


def test_dry_run_prints_the_plan_and_writes_nothing(mini_bids, run_dir, tmp_path):
    raw = make_raw(mini_bids, tmp_path / "bids")
    before = tree_hash(raw, skip="")
    rc, stdout, _ = cli(raw, "--run", run_dir, "--dry-run", "--validate", "--device", "cpu")
    assert rc == 0
    assert "dry run" in stdout
    for sub in ("sub-ms19", "sub-bratscase_ses-01", "sub-met00110"):
        assert sub in stdout
    assert stdout.count("to write") == len(EXPECTED) and "[cyan]" not in stdout
    assert tree_hash(raw, skip="") == before and not (raw / "derivatives").exists()


def _t2_scale(out: Path) -> dict:
    side = json.loads((out / f"sub-ms19/anat/sub-ms19_desc-{MODEL}_T2w.json").read_text())
    return side["IntensityScale"]


def test_without_a_real_target_the_units_come_from_the_training_data(mini_bids, run_dir,
                                                                     prepared_small, tmp_path):
    raw = make_raw(mini_bids, tmp_path / "bids")
    (raw / "sub-met00110" / "anat" / "sub-met00110_T2w.nii.gz").unlink()  # no T2w left
    out = tmp_path / "d1"
    assert cli(raw, "--run", run_dir, "--out", out, "--device", "cpu", "--no-qc")[0] == 0
    sc = _t2_scale(out)
    # independently: one offset/scale per training volume of the prepared file's T2w
    with np.load(prepared_small) as z:
        rows = (z["split"] == "train") & z["available__T2w"]
        subj = z["subject"][rows]
        _, first = np.unique(subj, return_index=True)
        off = np.median(z["offset__T2w"][rows][first])
        scale = np.median(z["scale__T2w"][rows][first])
    assert sc["Method"] == "training" and sc["NumberOfVolumes"] == first.size
    assert sc["Offset"] == pytest.approx(off) and sc["Scale"] == pytest.approx(scale)
    y = np.asarray(nib.load(out / f"sub-ms19/anat/sub-ms19_desc-{MODEL}_T2w.nii.gz").dataobj)
    brain = np.asarray(nib.load(raw / "sub-ms19/anat/sub-ms19_T1w.nii.gz").dataobj) != 0
    assert y[brain].min() >= off - scale - 1e-3 * scale
    assert y[brain].max() <= off + scale + 1e-3 * scale

    # the training data moved away as well: normalised units, and the user is told
    moved = tmp_path / "run-moved"
    shutil.copytree(run_dir, moved)
    doc = json.loads((moved / "config.json").read_text())
    doc["data"]["path"] = str(tmp_path / "gone.npz")
    (moved / "config.json").write_text(json.dumps(doc))
    rc, _, err = cli(raw, "--run", moved, "--out", tmp_path / "d2", "--device", "cpu",
                     "--no-qc")
    assert rc == 0 and "normalised units" in err
    sc = _t2_scale(tmp_path / "d2")
    assert sc["Method"] == "normalised" and (sc["Offset"], sc["Scale"]) == (0.0, 1.0)


def test_dry_run_with_two_models_plans_one_desc_each(mini_bids, run_dir, tmp_path_factory,
                                                     prepared_small, tmp_path):
    other = tiny_run(tmp_path_factory, prepared_small, "cyclegan")
    raw = make_raw(mini_bids, tmp_path / "bids")
    rc, stdout, _ = cli(raw, "--run", run_dir, "--run", other, "--dry-run", "--device", "cpu")
    assert rc == 0
    for m in (MODEL, "cyclegan"):
        assert f"sub-ms19_desc-{m}_T2w.nii.gz" in stdout
        assert f"sub-bratscase_ses-01_desc-{m}_T2w.nii.gz" in stdout
    assert stdout.count("to write") == 4 and not (raw / "derivatives").exists()


def test_paths_with_square_brackets_are_printed_verbatim(mini_bids, run_dir, tmp_path):
    """A data set folder named like rich markup is printed as it is, not parsed (no crash)."""
    raw = tmp_path / "b[" / "]ids [bold]"
    shutil.copytree(mini_bids, raw)  # every subject has both contrasts: nothing to do
    rc, stdout, err = cli(raw, "--run", run_dir, "--dry-run", "--device", "cpu")
    assert rc == 0, err
    assert "Nothing to do" in stdout and "]ids [bold]" in " ".join(stdout.split())


def test_validation_summary_uses_the_sample_sd_and_none_for_one_subject():
    """Two subjects: mean and sample SD (ddof 1) of each metric; one subject: the mean and an
    undefined SD, shown as the mean alone (a 0.000 would claim no variability)."""
    from types import SimpleNamespace

    from mrsynth.eval.complete import validation_summary
    from mrsynth.eval.complete_commands import _pm

    def job(model, direction, mae, split="test"):
        return SimpleNamespace(validation=True, metrics={"mae": mae},
                               run=SimpleNamespace(model=model), run_split=split,
                               direction=SimpleNamespace(label=direction))

    rows = validation_summary([job("m", "T1w2T2w", 0.5), job("m", "T1w2T2w", 0.7),
                               job("m", "T2w2T1w", 0.4)])
    two, one = rows
    assert two["n"] == 2 and one["n"] == 1
    assert not two["seen"] and not one["seen"]
    # subjects the run trained on (or was validated on) are never pooled with unseen ones
    split = validation_summary([job("m", "T1w2T2w", 0.5), job("m", "T1w2T2w", 0.1, "train"),
                                job("m", "T1w2T2w", 0.2, "val"),
                                job("m", "T1w2T2w", 0.7, "none")])
    assert [(r["seen"], r["n"]) for r in split] == [(False, 2), (True, 2)]
    assert split[0]["mae"][0] == pytest.approx(0.6)
    assert split[1]["mae"][0] == pytest.approx(0.15)
    from mrsynth.eval.complete_commands import seen_note

    assert seen_note(rows) is None  # nothing seen, nothing to say
    note = seen_note(split)
    assert "optimistic" in note and "none here" not in note and "other people" not in note
    assert two["mae"][0] == pytest.approx(0.6)
    assert two["mae"][1] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert one["mae"][0] == pytest.approx(0.4) and np.isnan(one["mae"][1])
    assert _pm(two["mae"]) == "0.600 ± 0.141" and _pm(one["mae"]) == "0.400"


def test_bidsignore_gains_what_an_older_one_lacks_and_keeps_the_rest(mini_bids, tmp_path):
    from mrsynth.eval.complete import NON_BIDS, write_dataset_description

    out = tmp_path / "deriv"
    out.mkdir()
    (out / ".bidsignore").write_text("qc/\nqc.html\nvalidation.tsv\nnotes/\n")
    write_dataset_description(mini_bids, out)
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines[:4] == ["qc/", "qc.html", "validation.tsv", "notes/"]  # kept, in order
    assert set(lines) == {*NON_BIDS, "notes/"} and len(lines) == len(set(lines))
    write_dataset_description(mini_bids, out)  # nothing missing: unchanged
    assert (out / ".bidsignore").read_text().splitlines() == lines
