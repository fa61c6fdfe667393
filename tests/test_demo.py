"""``mrsynth demo`` end to end at a reduced size, and resuming finished stages."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_torch_thread
from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.eval.baselines import BASELINES
from mrsynth.models.base import model_names
from mrsynth.utils import available_cores

SMALL = ["--subjects", "3", "--epochs", "1", "--steps-per-epoch", "2", "--size", "36",
         "--downsample", "3", "--slice-step", "3", "--c2st-steps", "10", "--device", "cpu",
         "--test-subjects", "sim-002", "--val-subjects", "sim-001"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--out", str(out), *SMALL])
    assert rc == 0
    return out, buf.getvalue()


def test_demo_outputs_exist_and_parse(demo):
    out, stdout = demo
    models = model_names()
    assert len(models) == 6
    data = load_prepared(out / "data" / "prepared.npz")
    assert data.size == (36, 36) and len(set(data.subject.tolist())) == 3
    # the given test subject, the given validation subject, one training subject
    assert data.settings["test_subjects"] == ["sim-002"]
    assert set(data.subject[data.split == "test"].tolist()) == {"sim-002"}
    assert data.settings["val_subjects"] == ["sim-001"]
    assert set(data.subject[data.split == "val"].tolist()) == {"sim-001"}
    assert data.settings["train_subjects"] == ["sim-003"]
    assert (data.split == "val").any() and (data.split == "train").any()
    for m in models:
        metrics = json.loads((out / "runs" / m / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs_completed"] == 1
        assert json.loads((out / "runs" / m / "config.json").read_text())["config"]["preset"] == (
            "cpu-small")
    man = json.loads((out / "eval" / "eval.json").read_text())
    assert [r["model"] for r in man["runs"]] == models
    with open(out / "eval" / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert {(s["model"], s["direction"]) for s in summary} == {
        (m, d) for m in (*models, *BASELINES) for d in ("T1w2T2w", "T2w2T1w")}
    assert all(np.isfinite(float(s["mean"])) for s in summary if s["metric"] != "psnr")
    html = (out / "report.html").read_text()
    for m in models:
        for d in ("T1w2T2w", "T2w2T1w"):
            assert f"<td>{m}</td><td>model</td><td>{d}</td>" in html
    timings = json.loads((out / "demo.json").read_text())["invocations"][0]["timings_s"]
    assert set(timings) >= {"prepare_s", "train_s", "evaluate_s", "report_s", "total_s"}
    # the command prints the report's path and the summary table
    assert f"Report: {(out / 'report.html').resolve()}" in stdout
    for m in models:
        assert m in stdout
    assert "MAE" in stdout and "PSNR" in stdout
    # baselines marked as such, and the report's verdict, on the console too
    assert all(re.search(rf"{b}\W+baseline\W", stdout) for b in BASELINES)
    for d in ("T1w2T2w", "T2w2T1w"):
        assert f"Verdict: {d}: " in stdout


def test_demo_rerun_resumes_finished_stages(demo, capsys):
    out, _ = demo
    watched = [out / "data" / "prepared.npz", out / "eval" / "eval.json",
               *[out / "runs" / m / "metrics.json" for m in model_names()]]
    before = {p: p.stat().st_mtime_ns for p in watched}
    (out / "report.html").unlink()  # only the last stage is missing
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing it") >= 1 + len(model_names()) + 1
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert (out / "report.html").is_file()
    assert len(json.loads((out / "demo.json").read_text())["invocations"]) == 2

    # a run that did not finish (no metrics "completed") is resumed and evaluation redone
    m = model_names()[-1]
    metrics = out / "runs" / m / "metrics.json"
    doc = json.loads(metrics.read_text())
    doc["status"] = "running"
    metrics.write_text(json.dumps(doc))
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    err = capsys.readouterr().err
    assert f"{m}: resuming" in err
    assert json.loads(metrics.read_text())["status"] == "completed"
    assert (out / "eval" / "eval.json").stat().st_mtime_ns > before[out / "eval" / "eval.json"]


def test_demo_refuses_to_resume_with_other_data_settings(demo, capsys):
    out, _ = demo
    before = (out / "data" / "prepared.npz").stat().st_mtime_ns
    args = [a if a != "36" else "40" for a in SMALL]  # another --size
    assert main(["demo", "--out", str(out), *args]) != 0
    err = capsys.readouterr().err
    assert "size 36 -> 40" in err and "another --out" in err
    assert (out / "data" / "prepared.npz").stat().st_mtime_ns == before


def test_demo_test_subjects_on_a_bids_subset(mini_bids, tmp_path, capsys):
    """--subjects keeps the given test subjects in the subset; unknown ones are refused."""
    from mrsynth.demo import _subset_bids
    from mrsynth.errors import ConfigError

    view = _subset_bids(mini_bids, tmp_path / "subset", 2, ["sub-ms19"])
    assert sorted(p.name for p in view.glob("sub-*")) == ["sub-bratscase", "sub-ms19"]
    # validation subjects are kept too (else preparing the subset could not find them) and
    # are not training subjects
    view = _subset_bids(mini_bids, tmp_path / "s-val", 3, ["sub-ms19"], ["sub-met00110"])
    assert sorted(p.name for p in view.glob("sub-*")) == [
        "sub-bratscase", "sub-met00110", "sub-ms19"]
    with pytest.raises(ConfigError, match="besides the 1 test and 1 validation subject"):
        _subset_bids(mini_bids, tmp_path / "s-val2", 2, ["sub-ms19"], ["sub-met00110"])
    with pytest.raises(ConfigError, match="--val-subjects sub-nobody not found"):
        _subset_bids(mini_bids, tmp_path / "s3", 3, ["sub-ms19"], ["nobody"])
    with pytest.raises(ConfigError, match="leaves no training subject"):
        _subset_bids(mini_bids, tmp_path / "s2", 1 + 1, ["sub-ms19", "met00110"])
    out = tmp_path / "demo-out"
    args = ["demo", "--out", str(out), "--data", str(mini_bids), "--subjects", "2",
            "--test-subjects", "sub-nobody", "--device", "cpu"]
    assert main(args) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--test-subjects sub-nobody not found" in err and "Traceback" not in err
    assert not (out / "data" / "prepared.npz").exists()


def test_demo_on_few_real_subjects_trains_every_one(mini_bids, tmp_path, capsys,
                                                   monkeypatch):
    """The default --val-fraction keeps no validation split with fewer than VAL_MIN_SUBJECTS
    non-test subjects: every one trains, the last epoch is evaluated, and the demo says so.
    A rerun naming the same data folder by another (relative) path resumes."""
    from mrsynth.demo import VAL_MIN_SUBJECTS

    assert VAL_MIN_SUBJECTS > 2  # mini_bids: three subjects, one of them for the test
    out = tmp_path / "few"
    args = ["demo", "--out", str(out), "--data", str(mini_bids), "--test-subjects", "sub-ms19",
            "--models", "simple", "--epochs", "1", "--steps-per-epoch", "2", "--size", "36",
            "--downsample", "6", "--slice-step", "6", "--c2st-steps", "5", "--device", "cpu"]
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    d = load_prepared(out / "data" / "prepared.npz")
    assert not d.has_split("val")
    assert d.settings["train_subjects"] == ["sub-bratscase", "sub-met00110"]
    assert "no validation split is kept" in err and "checkpoints: latest" in err
    man = json.loads((out / "eval" / "eval.json").read_text())
    assert [r["checkpoint"] for r in man["runs"]] == ["latest"]
    assert json.loads((out / "demo-settings.json").read_text())["data"] == str(
        mini_bids.resolve())

    # the same folder named relative to another working directory resumes (nothing redone)
    before = (out / "eval" / "eval.json").stat().st_mtime_ns
    monkeypatch.chdir(mini_bids.parent)
    args[args.index("--data") + 1] = mini_bids.name
    assert main(args) == 0
    assert "reusing it" in capsys.readouterr().err
    assert (out / "eval" / "eval.json").stat().st_mtime_ns == before


def test_demo_steps_per_epoch_per_model():
    """Simple's steps are cheap, so the demo gives it more; the paired U-Net models and
    unpaired CycleGAN see whole slices (4 x the pixels of a 64-px patch at the demo's 128 px),
    so they get a quarter; --steps-per-epoch N caps every model at N and 0 trains full
    epochs."""
    from mrsynth.demo import DEFAULT_STEPS_PER_EPOCH, _config

    def cap(model, steps):
        return _config(model, None, steps, "cpu", 0)["train"]["max_steps_per_epoch"]

    assert cap("simple", None) == 300 and DEFAULT_STEPS_PER_EPOCH == 100
    unet = {"generators_s", "pix2pix", "cyclegan_s"}
    whole = unet | {"cyclegan"}
    assert {m: cap(m, None) for m in model_names() if m != "simple"} == {
        m: 25 if m in whole else 100 for m in model_names() if m != "simple"}
    for m in model_names():
        cfg = _config(m, None, None, "cpu", 0)
        assert (cfg["train"]["patch_size"] is None) == (m in whole), m
        assert (cfg["arch"].get("generator") == "unet") == (m in unet), m
    assert cap("simple", 7) == cap("unit", 7) == 7
    assert cap("simple", 0) is None and cap("cyclegan", 0) is None


def test_demo_trains_models_in_parallel_processes_with_the_same_weights(tmp_path, capsys):
    """--jobs 2 trains two models at once in spawned processes: the same weights and losses
    as --jobs 1 (one after the other in the demo's process), and demo.json says how."""
    from test_train_resume import assert_same_weights, loss_rows

    small = [*SMALL, "--models", "generators_s,cyclegan"]
    for jobs in (1, 2):
        assert main(["demo", "--out", str(tmp_path / f"j{jobs}"), *small,
                     "--jobs", str(jobs)]) == 0
        inv = json.loads((tmp_path / f"j{jobs}" / "demo.json").read_text())["invocations"]
        assert inv[-1]["jobs"] == jobs
        # evaluation runs alone, with the threads of all training jobs (at most the cores)
        env = json.loads((tmp_path / f"j{jobs}" / "eval" / "eval.json").read_text())[
            "environment"]
        assert env["torch_threads"] == min(jobs, available_cores())
        assert torch.get_num_threads() == 1  # the caller's setting is back
    err = capsys.readouterr().err
    assert "2 models at a time" in err
    for m in ("generators_s", "cyclegan"):
        a, b = tmp_path / "j1" / "runs" / m, tmp_path / "j2" / "runs" / m
        assert_same_weights(a, b)
        assert loss_rows(a) == loss_rows(b)


def test_default_demo_jobs_use_the_cores(monkeypatch):
    from mrsynth import demo, utils

    monkeypatch.setattr(utils, "available_cores", lambda: 2)
    monkeypatch.setattr(demo, "torch_threads", lambda: 1)
    assert demo.default_jobs("cpu") == 2
    monkeypatch.setattr(demo, "torch_threads", lambda: 2)
    assert demo.default_jobs("cpu") == 1
    monkeypatch.setattr(utils, "available_cores", lambda: 64)
    assert demo.default_jobs("cpu") == 4


def test_demo_evaluation_threads_are_the_training_jobs_cores(monkeypatch):
    from mrsynth import demo, utils

    monkeypatch.setattr(utils, "available_cores", lambda: 2)
    monkeypatch.setattr(demo, "torch_threads", lambda: 1)
    assert demo.eval_thread_count("cpu", None, 1) == 2  # two jobs of one thread
    assert demo.eval_thread_count("cpu", 1, 1) == 1  # --jobs 1: what the user asked for
    assert demo.eval_thread_count("cpu", 4, 1) == 2  # never more than the cores
    monkeypatch.setattr(utils, "available_cores", lambda: 16)
    assert demo.eval_thread_count("cpu", None, 1) == 4  # default_jobs caps at 4
    assert demo.eval_thread_count("cpu", 2, 3) == 6


@pytest.mark.parametrize("how", ["SIGTERM to the demo", "Ctrl-C at the terminal"])
def test_a_signal_stops_parallel_training_with_checkpoints_and_a_rerun_resumes(how, tmp_path):
    """SIGTERM to a demo training two models in worker processes, or SIGINT to its whole
    process group as a terminal's Ctrl-C sends it: each worker gets one SIGTERM from the
    demo, checkpoints and stops (none keeps training as an orphan), the demo exits 143 or
    130, and the same command run again resumes both runs to completion."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).parent / "mrsynth"
    out = tmp_path / "d"
    args = [str(exe), "demo", "--out", str(out), *SMALL, "--epochs", "20",
            "--steps-per-epoch", "0", "--models", "cyclegan,unit", "--jobs", "2"]
    metas = [out / "runs" / m / "checkpoints" / "latest" / "meta.json" for m in ("cyclegan",
                                                                              "unit")]
    def as_from_a_terminal() -> None:
        os.setpgrp()  # its own process group, as a shell's foreground job
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if all(json.loads(p.read_text())["epoch"] >= 2 for p in metas):
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, "the demo ended before it could be interrupted"
        if sig == signal.SIGTERM:
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)  # the demo and anything left in its group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"Interrupted ({sig.name})" in err and "Traceback" not in err
    stopped = [json.loads(p.read_text())["epoch"] for p in metas]
    assert all(e < 20 for e in stopped)
    # the workers saved where the signal found them (mid-epoch), not only at an epoch's end:
    # a worker hit by two signals stops without saving
    assert any(json.loads(p.read_text())["step_in_epoch"] > 0 for p in metas)
    time.sleep(2)  # an orphaned worker would still be writing checkpoints
    assert [json.loads(p.read_text())["epoch"] for p in metas] == stopped
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(": resuming 20 epoch(s)") == 2
    for m in ("cyclegan", "unit"):
        metrics = json.loads((out / "runs" / m / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs_completed"] == 20
