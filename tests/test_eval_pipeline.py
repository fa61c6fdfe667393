"""``mrsynth evaluate`` and ``mrsynth report`` end to end on real slices and tiny trained runs."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from helpers import one_torch_thread
from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.eval.baselines import BASELINES
from mrsynth.eval.metrics import METRICS, image_metrics
from mrsynth.eval.report import read_csv
from test_eval_fixtures import tiny_run

MODELS = ("cyclegan", "simple")
#: Every evaluation scores the baselines beside the runs.
ALL = MODELS + BASELINES
DIRECTIONS = ("T1w2T2w", "T2w2T1w")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_small) -> dict[str, Path]:
    return {m: tiny_run(tmp_path_factory, prepared_small, m) for m in MODELS}


@pytest.fixture(scope="module")
def evaluation(runs, prepared_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    rc = main(["evaluate", "--runs", str(runs["cyclegan"]), str(runs["simple"]),
               "--data", str(prepared_small), "--out", str(out), "--device", "cpu",
               "--c2st-steps", "20"])
    assert rc == 0
    return out


def test_per_image_metrics_match_an_independent_recomputation(evaluation, prepared_small):
    data = load_prepared(prepared_small)
    test = data.split_view("test")
    n_test = len(test)
    rows = read_csv(evaluation / "per_image.csv")
    assert len(rows) == n_test * len(ALL) * len(DIRECTIONS) * 2  # two regions
    assert {r["model"] for r in rows} == set(ALL)
    assert {(r["model"], r["kind"]) for r in rows} == {
        *((m, "model") for m in MODELS), *((b, "baseline") for b in BASELINES)}
    assert {r["direction"] for r in rows} == set(DIRECTIONS)
    assert {r["region"] for r in rows} == {"image", "brain"}
    assert {r["subject"] for r in rows} == set(test.subject.tolist())
    by_key = {(str(s), int(k)): i for i, (s, k) in enumerate(zip(test.subject, test.slice_index,
                                                                   strict=True))}
    checked = 0
    for r in rows[:: max(1, len(rows) // 25)]:
        i = by_key[(r["subject"], int(r["slice"]))]
        syn = np.load(evaluation / "synthetic" / r["model"]
                      / f"{r['subject']}_slice-{int(r['slice']):03d}_{r['target']}.npy")
        assert syn.dtype == np.float32 and syn.shape == data.size
        real = test.images[r["target"]][i].astype(np.float64)
        mask = test.mask[i] if r["region"] == "brain" else np.ones(real.shape, bool)
        # independent MAE: z-score the region with numpy and average |difference|
        rv, sv = real[mask], syn.astype(np.float64)[mask]
        mae = np.abs((sv - sv.mean()) / sv.std() - (rv - rv.mean()) / rv.std()).mean()
        assert float(r["mae"]) == pytest.approx(mae, rel=1e-9)
        full = image_metrics(real, syn, test.mask[i] if r["region"] == "brain" else None)
        for m in METRICS:
            assert float(r[m]) == pytest.approx(full[m], rel=1e-9, abs=1e-12), m
        checked += 1
    assert checked >= 20


def test_synthetic_slices_are_the_runs_translations(evaluation, runs, prepared_small):
    from mrsynth.train.runs import load_run

    test = load_prepared(prepared_small).split_view("test")
    run = load_run(runs["cyclegan"])
    want = run.translate(test.images["T2w"][:4, None], "B2A").numpy()[:, 0]
    for i in range(4):
        name = f"{test.subject[i]}_slice-{int(test.slice_index[i]):03d}_T1w.npy"
        got = np.load(evaluation / "synthetic" / "cyclegan" / name)
        np.testing.assert_allclose(got, want[i], atol=1e-6)
    n = len(test)
    for m in ALL:
        files = sorted((evaluation / "synthetic" / m).glob("*.npy"))
        assert len(files) == 2 * n  # both contrasts for every test slice


def test_summary_and_wilcoxon_agree_with_the_per_image_rows(evaluation):
    rows = read_csv(evaluation / "per_image.csv")
    summary = read_csv(evaluation / "summary.csv")
    assert len(summary) == len(ALL) * len(DIRECTIONS) * 2 * len(METRICS)
    for s in summary:
        vals = np.array([float(r[s["metric"]]) for r in rows if r["model"] == s["model"]
                         and r["direction"] == s["direction"] and r["region"] == s["region"]])
        vals = vals[np.isfinite(vals)]
        assert float(s["mean"]) == pytest.approx(vals.mean(), rel=1e-9)
        assert float(s["median"]) == pytest.approx(np.median(vals), rel=1e-9)
        assert float(s["ci_low"]) <= float(s["mean"]) <= float(s["ci_high"])
    tests = read_csv(evaluation / "wilcoxon.csv")
    t = next(t for t in tests if t["region"] == "image" and t["direction"] == "T1w2T2w"
             and t["metric"] == "mae")
    a = {(r["subject"], r["slice"]): float(r["mae"]) for r in rows if r["model"] == t["model_a"]
         and r["direction"] == "T1w2T2w" and r["region"] == "image"}
    b = {(r["subject"], r["slice"]): float(r["mae"]) for r in rows if r["model"] == t["model_b"]
         and r["direction"] == "T1w2T2w" and r["region"] == "image"}
    keys = sorted(a)
    p = st.wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue
    assert float(t["p_value"]) == pytest.approx(p, rel=1e-9)
    md = (evaluation / "summary.md").read_text()
    slices, volumes = md.split("## Volumes")  # the region tables, then the volume table
    assert slices.count("| cyclegan |") == 4 and "95 % bootstrap CI" in slices
    assert volumes.count("| cyclegan |") == 2


def test_timing_c2st_figures_and_manifest(evaluation, runs):
    timing = read_csv(evaluation / "timing.csv")
    assert {(t["model"], t["direction"]) for t in timing} == {
        (m, d) for m in ALL for d in DIRECTIONS}
    for t in timing:
        if t["kind"] == "baseline":
            assert t["train_s_per_epoch"] == "" and float(t["inference_ms_per_slice"]) > 0
            continue
        walls = [e["wall_s"] for e in json.loads((runs[t["model"]] / "metrics.json").read_text())
                 ["epochs"]]
        assert float(t["train_s_per_epoch"]) == pytest.approx(np.mean(walls))
        assert float(t["inference_ms_per_slice"]) > 0
    c2st = read_csv(evaluation / "c2st.csv")
    assert len(c2st) == len(ALL) * len(DIRECTIONS)
    for c in c2st:
        assert 0.0 <= float(c["ci_low"]) <= float(c["accuracy"]) <= float(c["ci_high"]) <= 1.0
        assert int(c["n_test"]) > 0 and c["human_accuracy"] == ""  # no --study given
    from PIL import Image

    for stem in ("figure1", "figure1-brain", "figure2"):
        with Image.open(evaluation / f"{stem}.png") as im:
            assert im.size[0] > 400 and im.size[1] > 200
        assert (evaluation / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    man = json.loads((evaluation / "eval.json").read_text())
    assert [r["label"] for r in man["runs"]] == list(MODELS)
    assert set(man["directions"]) == set(DIRECTIONS)
    assert man["environment"]["packages"]["torch"]
    assert not list(evaluation.parent.glob(".*tmp*"))  # no temporary directory left


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        d = dict(attrs)
        if "src" in d:
            self.srcs.append(d["src"])
        if "href" in d:
            self.hrefs.append(d["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_names_every_model_and_direction(evaluation, tmp_path,
                                                                     capsys):
    out = tmp_path / "report.html"
    # a folder as --out: a plain refusal, and --overwrite never replaces the folder
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert main(["report", "--eval", str(evaluation), "--out", str(folder), *extra]) != 0
        assert f"e.g. {folder / 'report.html'}" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "x"
    assert main(["report", "--eval", str(evaluation), "--out", str(out)]) == 0
    html = out.read_text()
    p = _Collector()
    p.feed(html)
    text = " ".join(p.text)
    for m in MODELS:
        assert m in text
    for d in DIRECTIONS:
        assert d in text
    # every model appears with both directions in the summary table rows
    for m in MODELS:
        for d in DIRECTIONS:
            assert f"<td>{m}</td><td>model</td><td>{d}</td>" in html
    assert "script" not in p.tags and not p.hrefs  # nothing to fetch, nothing to run
    assert len(p.srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in p.srcs)
    from PIL import Image

    for s in p.srcs:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
    assert "Environment" in text and "cpu-small" in html  # run configs and environment
    # refusing to overwrite without --overwrite
    assert main(["report", "--eval", str(evaluation), "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err


def test_evaluate_refuses_incompatible_data_without_partial_output(runs, prepared_small,
                                                                   tmp_path, capsys):
    data = load_prepared(prepared_small)
    data.settings = json.loads(json.dumps(data.settings))
    data.settings["normalisation"]["percentiles"] = [1.0, 99.0]
    other = data.save(tmp_path / "other.npz")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(runs["simple"]), "--data", str(other),
               "--out", str(out), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "normalisation" in err and str(runs["simple"]) in err.replace("\n", "")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.npz"]


def test_evaluate_refuses_test_subjects_the_run_trained_on(runs, prepared_small, tmp_path,
                                                          capsys, mrpaired):
    """Data prepared from the run's data set with another split, whose test split holds a
    subject the run trained on: refused (its scores would be optimistic), nothing written.
    The same labels from another data set, or the run's own split, are fine."""
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.eval.common import seen_test_subjects

    run_settings = load_prepared(prepared_small).settings
    trained = run_settings["train_subjects"]
    assert "sub-bratscase" in trained
    other = prepare_dataset(mrpaired, tmp_path / "resplit.npz", contrasts=("T1w", "T2w"),
                            size=(64, 64), downsample=4, slice_step=4,
                            test_subjects=["sub-ms19", "sub-bratscase"], seed=0)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(runs["simple"]), "--data", str(other),
               "--out", str(out), "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc != 0 and "Traceback" not in err
    assert "holds sub-bratscase, which the run" in err and "--split-from" in err
    assert not out.exists()
    data_settings = load_prepared(other).settings
    assert seen_test_subjects(run_settings, data_settings) == ["sub-bratscase"]
    assert seen_test_subjects(run_settings, run_settings) == []  # its own test split
    elsewhere = {**data_settings, "source": str(tmp_path / "another-data-set")}
    assert seen_test_subjects(run_settings, elsewhere) == []
    builtin = {**run_settings, "source": "builtin", "builtin": {"seed": 0}}
    assert seen_test_subjects(builtin, {**data_settings, "source": "builtin",
                                        "builtin": {"seed": 0}}) == ["sub-bratscase"]
    assert seen_test_subjects(builtin, {**data_settings, "source": "builtin",
                                        "builtin": {"seed": 1}}) == []
    # a participant the run's own split has in training and test (2-D folders are split by
    # folder) is not a leak of a re-split
    both = {**run_settings, "test_subjects": [*run_settings["test_subjects"], "sub-bratscase"]}
    assert seen_test_subjects(both, data_settings) == []


def test_evaluate_refuses_run_without_checkpoint(runs, prepared_small, tmp_path, capsys):
    broken = tmp_path / "broken-run"
    shutil.copytree(runs["simple"], broken)
    shutil.rmtree(broken / "checkpoints")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(runs["cyclegan"]), str(broken), "--data",
               str(prepared_small), "--out", str(out), "--device", "cpu"])
    assert rc != 0
    assert "checkpoint" in capsys.readouterr().err.lower()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken-run"]


def test_evaluate_refuses_checkpoint_of_another_model(runs, prepared_small, tmp_path, capsys):
    mixed = tmp_path / "mixed-run"
    shutil.copytree(runs["simple"], mixed)
    shutil.rmtree(mixed / "checkpoints")
    shutil.copytree(runs["cyclegan"] / "checkpoints", mixed / "checkpoints")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(mixed), "--data", str(prepared_small),
               "--out", str(out), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "cyclegan" in err and "simple" in err
    assert not out.exists()


def test_evaluate_refuses_a_run_given_twice(runs, prepared_small, tmp_path, capsys):
    """The same run directory twice (here once through a symbolic link, once plainly; the
    directory is named after its model, the usual layout) is refused before anything is
    written; three different copies whose labels would collide are refused by name."""
    link = tmp_path / "again"
    link.symlink_to(runs["simple"], target_is_directory=True)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(runs["simple"]), str(link), "--data",
               str(prepared_small), "--out", str(out), "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc != 0 and "is given twice" in err and str(runs["simple"]) in err
    assert not out.exists()
    copies = []
    for parent in ("a", "b", "c"):
        copies.append(tmp_path / parent / "simple")
        shutil.copytree(runs["simple"], copies[-1])
    rc = main(["evaluate", "--runs", *map(str, copies), "--data", str(prepared_small),
               "--out", str(out), "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc != 0 and "distinct names" in err and str(copies[2]) in err
    assert not out.exists()


def test_evaluate_refuses_existing_output(evaluation, runs, prepared_small, capsys):
    before = (evaluation / "eval.json").stat().st_mtime_ns
    rc = main(["evaluate", "--runs", str(runs["simple"]), "--data", str(prepared_small),
               "--out", str(evaluation), "--device", "cpu"])
    assert rc != 0 and "--overwrite" in capsys.readouterr().err
    assert (evaluation / "eval.json").stat().st_mtime_ns == before


def test_human_study_accuracy_is_reported_beside_c2st(evaluation, runs, prepared_small,
                                                      tmp_path):
    """A real study file made from this evaluation's synthetic slices, answered by one reader
    who calls every image "real": accuracy per model x contrast = real / (real + synthetic)."""
    from fastapi.testclient import TestClient

    from mrsynth.study import db as sdb
    from mrsynth.study.app import create_app
    from mrsynth.study.create import create_study

    study = tmp_path / "study.db"
    settings = sdb.StudySettings(mode="single", scale="binary", n_real=8, n_synthetic=8,
                                 display_size=64, seed=0)
    create_study(prepared_small, {m: evaluation / "synthetic" / m for m in MODELS}, study,
                 settings)
    conn = sdb.connect(study)
    try:
        token = sdb.add_reader(conn, "reader-1")
    finally:
        conn.close()
    client = TestClient(create_app(study))
    state = client.post(f"/api/r/{token}/start").json()
    answered = 0
    while not state["done"]:
        reply = client.post(f"/api/r/{token}/answer",
                            json={"trial": state["trial"]["id"], "label": "real"})
        assert reply.status_code == 200
        state = reply.json()["state"]
        answered += 1
    assert answered == 16
    out = tmp_path / "eval"
    assert main(["evaluate", "--runs", str(runs["cyclegan"]), str(runs["simple"]),
                 "--data", str(prepared_small), "--out", str(out), "--device", "cpu",
                 "--c2st-steps", "5", "--study", str(study)]) == 0
    rows = {(c["model"], c["direction"]): c for c in read_csv(out / "c2st.csv")}
    # 8 real images over 2 contrasts, 8 synthetic over 2 models x 2 contrasts
    for m in MODELS:
        for d in DIRECTIONS:
            assert float(rows[(m, d)]["human_accuracy"]) == pytest.approx(4 / 6)
            assert int(rows[(m, d)]["human_n"]) == 6
    assert main(["report", "--eval", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert "0.667 [" in (tmp_path / "r.html").read_text()


def test_checkpoint_of_another_contrast_pair_is_refused(runs, prepared_small, tmp_path, capsys):
    """A run directory whose checkpoint was trained for T1w->T2w but whose config now says
    T2w->T1w (e.g. checkpoints copied between runs): refused, nothing written."""
    swapped = tmp_path / "swapped-run"
    shutil.copytree(runs["simple"], swapped)
    doc = json.loads((swapped / "config.json").read_text())
    doc["config"]["data"]["contrasts"] = ["T2w", "T1w"]
    (swapped / "config.json").write_text(json.dumps(doc))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--runs", str(swapped), "--data", str(prepared_small),
               "--out", str(out), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err.replace("\n", "")
    assert "T1w" in err and "T2w" in err and "contrast" in err.lower()
    assert not out.exists()


# ---------------------------------------------------------------------------- baselines
def test_baselines_are_the_documented_predictions(evaluation, prepared_small):
    """The saved baseline slices, recomputed independently from the prepared file."""
    data = load_prepared(prepared_small)
    test = data.split_view("test")
    train = (data.split == "train") & data.paired
    edges = np.linspace(-1, 1, 129)
    for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
        # independent table: np.digitize bins, np.median per bin, np.interp for empty bins
        x = data.images[src][train][data.mask[train]].astype(np.float64)
        y = data.images[tgt][train][data.mask[train]].astype(np.float64)
        b = np.clip(np.digitize(x, edges) - 1, 0, 127)
        med = {i: np.median(y[b == i]) for i in np.unique(b)}
        centres = (edges[:-1] + edges[1:]) / 2
        full = np.array(sorted(med))
        table = np.interp(centres, centres[full], [med[i] for i in full])
        for i in range(0, len(test), max(1, len(test) // 10)):
            name = f"{test.subject[i]}_slice-{int(test.slice_index[i]):03d}_{tgt}.npy"
            m = test.mask[i]
            lut = np.load(evaluation / "synthetic" / "baseline_intensity" / name)
            want = np.where(m, table[np.clip(np.digitize(test.images[src][i], edges) - 1, 0,
                                             127)], -1.0)
            np.testing.assert_allclose(lut, want, atol=1e-6)
            ident = np.load(evaluation / "synthetic" / "baseline_identity" / name)
            np.testing.assert_array_equal(ident, test.images[src][i])
            mean = np.load(evaluation / "synthetic" / "baseline_mean" / name)
            assert np.all(mean[~m] == -1) and np.allclose(mean[m], test.images[tgt][i][m].mean(),
                                                          atol=1e-5)
    # baseline_mean's in-brain MAE is the mean |z| of the real slice inside the brain
    rows = [r for r in read_csv(evaluation / "per_image.csv")
            if r["model"] == "baseline_mean" and r["region"] == "brain"]
    by_key = {(str(s), int(k)): i for i, (s, k) in enumerate(zip(test.subject, test.slice_index,
                                                                   strict=True))}
    for r in rows[:: max(1, len(rows) // 10)]:
        i = by_key[(r["subject"], int(r["slice"]))]
        v = test.images[r["target"]][i][test.mask[i]].astype(np.float64)
        assert float(r["mae"]) == pytest.approx(np.abs((v - v.mean()) / v.std()).mean(),
                                                rel=1e-9)


def test_baselines_are_in_every_output_and_marked(evaluation, tmp_path):
    summary = read_csv(evaluation / "summary.csv")
    assert {(s["model"], s["kind"]) for s in summary} >= {(b, "baseline") for b in BASELINES}
    tests = read_csv(evaluation / "wilcoxon.csv")
    pairs = {frozenset((t["model_a"], t["model_b"])) for t in tests}
    assert {frozenset(p) for p in
            [(a, b) for i, a in enumerate(ALL) for b in ALL[i + 1:]]} == pairs
    assert all((t["kind_a"] == "baseline") == t["model_a"].startswith("baseline_")
               for t in tests)
    for name in ("c2st", "timing"):
        assert {(r["model"], r["kind"]) for r in read_csv(evaluation / f"{name}.csv")} == {
            *((m, "model") for m in MODELS), *((b, "baseline") for b in BASELINES)}
    md = (evaluation / "summary.md").read_text()
    assert md.index("## Verdict") < md.index("## Region")
    for b in BASELINES:
        assert f"| {b} | baseline |" in md
    man = json.loads((evaluation / "eval.json").read_text())
    assert [(m["label"], m["kind"]) for m in man["models"]] == [
        *((m, "model") for m in MODELS), *((b, "baseline") for b in BASELINES)]
    lut = man["baselines"]["intensity_lut"]
    assert set(lut) == set(DIRECTIONS) and all(len(t["table"]) == 128 for t in lut.values())
    out = tmp_path / "report.html"
    assert main(["report", "--eval", str(evaluation), "--out", str(out)]) == 0
    html = out.read_text()
    assert html.index("Verdict") < html.index("<h2>Summary</h2>")
    assert html.index("<h2>Summary</h2>") < html.index("Findings versus the study")
    for b in BASELINES:
        assert f"<td>{b}</td><td>baseline</td>" in html  # summary tables
        assert f"<span class='base'>{b} (baseline)</span>" in html  # Wilcoxon table
    # findings: no study model but cyclegan and simple -> the pairwise claims are evaluated
    claims = {r["claim"]: r["status"] for r in read_csv(evaluation / "findings.csv")}
    assert set(claims) == {"generators_s_best", "simple_worst", "cyclegan_unit_equal",
                           "t1_better_than_t2"}
    assert claims["generators_s_best"] == "not evaluated"
    assert claims["cyclegan_unit_equal"] == "not evaluated"  # only one of the trio
    assert claims["simple_worst"] != "not evaluated"


def test_verdict_is_the_one_sided_test_against_the_lookup_table(evaluation):
    rows = read_csv(evaluation / "per_image.csv")
    verdict = read_csv(evaluation / "verdict.csv")
    assert {(v["model"], v["direction"]) for v in verdict} == {
        (m, d) for m in MODELS for d in DIRECTIONS}
    for v in verdict:
        def mae(model, v=v):
            return {(r["subject"], r["slice"]): float(r["mae"]) for r in rows
                    if r["model"] == model and r["direction"] == v["direction"]
                    and r["region"] == "brain"}
        a, b = mae(v["model"]), mae("baseline_intensity")
        keys = sorted(a)
        x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
        p = st.wilcoxon(x, y, alternative="less").pvalue
        assert float(v["p_value"]) == pytest.approx(p, rel=1e-9)
        assert float(v["model_mean"]) == pytest.approx(x.mean())
        assert float(v["baseline_mean"]) == pytest.approx(y.mean())
        assert (v["beats"] == "True") == (float(v["p_holm"]) < 0.05)


def test_max_subjects_evaluates_a_seeded_sample_read_lazily_from_a_store(
        tmp_path_factory, prepared_small, tmp_path, monkeypatch, capsys):
    """``evaluate --max-subjects 1`` on a store with two test subjects scores the slices of
    one, drawn with --seed and recorded in eval.json, and reads no image of the other; a
    test split that cannot fit in memory is refused before it is read, with that advice."""
    from mrsynth.data import store as stm
    from mrsynth.train import loader

    run = tiny_run(tmp_path_factory, prepared_small, "simple")
    data = load_prepared(prepared_small)
    store = stm.write_store_from(data, tmp_path / "s.mrs")
    tests = sorted(set(data.subject[data.split == "test"].tolist()))
    assert len(tests) == 2
    read_rows: list[np.ndarray] = []
    get = stm.ShardedArray.__getitem__

    def counting(self, key):
        if self.what.startswith("image__") and not isinstance(key, int | tuple):
            read_rows.append(np.atleast_1d(np.arange(self.shape[0])[key]))
        return get(self, key)

    monkeypatch.setattr(stm.ShardedArray, "__getitem__", counting)
    out = tmp_path / "ev"
    assert main(["evaluate", "--runs", str(run), "--data", str(store), "--out", str(out),
                 "--device", "cpu", "--c2st-steps", "2", "--max-subjects", "1",
                 "--seed", "3"]) == 0
    man = json.loads((out / "eval.json").read_text())
    assert len(man["test_subjects"]) == 1 and man["test_subjects"][0] in tests
    assert man["test_sample"] == {"test_subjects_available": 2, "max_subjects": 1}
    other = next(s for s in tests if s not in man["test_subjects"])
    lazy = load_prepared(store)
    other_rows = set(np.flatnonzero(lazy.subject == other).tolist())
    assert read_rows and not other_rows & set(np.concatenate(read_rows).tolist())
    assert {r["subject"] for r in read_csv(out / "per_image.csv")} == set(man["test_subjects"])
    assert "a sample of 2" in capsys.readouterr().err
    # the same seed draws the same subject
    again = tmp_path / "ev2"
    assert main(["evaluate", "--runs", str(run), "--data", str(store), "--out", str(again),
                 "--device", "cpu", "--c2st-steps", "2", "--max-subjects", "1",
                 "--seed", "3"]) == 0
    assert json.loads((again / "eval.json").read_text())["test_subjects"] == \
        man["test_subjects"]
    # too little memory: refused up front, nothing written
    monkeypatch.setattr(loader, "free_memory", lambda device: 10_000)
    capsys.readouterr()
    assert main(["evaluate", "--runs", str(run), "--data", str(store), "--out",
                 str(tmp_path / "ev3"), "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs about" in err and "--max-subjects" in err and "Traceback" not in err
    assert not (tmp_path / "ev3").exists()
