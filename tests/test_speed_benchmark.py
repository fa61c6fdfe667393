"""Smoke test of benchmarks/train_speed.py at a tiny size: the JSON it writes and its rows.

No timing is asserted (speed targets live in the benchmark's JSON, not in tests); only that
both the plain loop and mrsynth's step path ran for every model and that the numbers it
reports are consistent with each other.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" /
                                                  "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("train_speed", None)


def test_benchmark_writes_both_rows_per_model(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed.json"
    old = torch.get_num_threads()
    try:
        code = bench.main([
            "--device", "cpu", "--size", "32", "32", "--n-images", "8", "--iters", "1",
            "--windows", "2", "--warmup", "1", "--features", "eager,channels_last",
            "--infer-batches", "1,2", "--infer-iters", "2", "--preset", "cpu-small",
            "--threads", "1", "--out", str(out), "--quiet",
        ])
    finally:
        torch.set_num_threads(old)
    assert code == 0
    printed = capsys.readouterr().out
    assert "Training speed on" in printed and "plain loop" in printed and "mrsynth" in printed
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["device_name"].startswith("CPU")
    assert doc["torch"] == torch.__version__
    datetime.fromisoformat(doc["date"])
    assert doc["settings"]["size"] == [32, 32] and doc["settings"]["n_images"] == 8
    assert doc["settings"]["study_setting"] is False
    models = ["cyclegan", "unit", "generators_s"]
    for model in models:
        rows = {r["variant"]: r for r in doc["rows"] if r["model"] == model}
        assert set(rows) == {"baseline", "mrsynth"}, model
        for r in rows.values():
            assert r.get("error") is None, r
            assert r["s_per_epoch"] > 0 and r["images_per_s"] > 0
            assert len(r["window_s_per_iter"]) == 2
            # s/epoch = s/iter x (8 images / batch 1); images/s = batch / (s/iter)
            assert r["s_per_epoch"] == pytest.approx(8 * r["s_per_iter"], rel=1e-3, abs=1e-3)
            assert r["images_per_s"] == pytest.approx(1 / r["s_per_iter"], rel=1e-3)
        assert rows["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
        feats = {r["label"] for r in doc["features"] if r["model"] == model}
        assert feats == {"trainer eager", "trainer +channels_last"}
        inf = {(r["variant"], r["batch"]) for r in doc["inference"] if r["model"] == model}
        assert inf == {(v, b) for v in ("eager fp32", "fast") for b in (1, 2)}
        assert all(r["slices_per_s"] > 0 for r in doc["inference"] if r["model"] == model)


def test_synthetic_slices_look_like_brain_slices(bench) -> None:
    a, b = bench.make_slices(6, (48, 40), seed=3)
    assert a.shape == b.shape == (6, 1, 48, 40)
    assert a.min() >= -1 and a.max() <= 1 and b.min() >= -1 and b.max() <= 1
    # corners are background (-1) in both contrasts, the centre is tissue
    assert torch.all(a[..., 0, 0] == -1) and torch.all(b[..., -1, -1] == -1)
    brain = a > -1
    assert 0.3 < brain.float().mean() < 0.8
    assert torch.equal(brain, b > -1)  # same anatomy in both contrasts
    # contrast differs: inside the brain B is not A (inverted tissue contrast)
    corr = torch.corrcoef(torch.stack([a[brain], b[brain]]))[0, 1]
    assert corr < -0.5
    a2, _ = bench.make_slices(6, (48, 40), seed=3)
    assert torch.equal(a, a2)  # reproducible
    a3, _ = bench.make_slices(6, (48, 40), seed=4)
    assert not torch.equal(a, a3)


def test_bad_options_are_refused(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--models", "simple"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--features", "warp-speed"])
    args = bench.parse_args(["--device", "cpu"])
    assert args.size == (64, 64) and args.preset == "cpu-small" and args.iters == 4
    assert args.features == ["eager", "channels_last", "fused_adam", "bf16"]
    args = bench.parse_args(["--device", "cpu", "--mrsynth", "bf16,compile"])
    assert args.mrsynth_options.precision == "bf16"
    assert args.mrsynth_options.compile == "default"


def test_fastest_options_per_device(bench) -> None:
    gpu = bench.fastest_options("cuda")
    assert (gpu.precision, gpu.compile, gpu.channels_last, gpu.fused_adam) == (
        "bf16", "reduce-overhead", True, True)
    cpu = bench.fastest_options("cpu")
    assert cpu.precision == "fp32" and cpu.compile == "none"
    assert bench.describe_options(gpu) == (
        "bf16, channels_last, fused Adam, compile(reduce-overhead)")
    assert bench.describe_options(cpu) == "fp32, fused Adam"
