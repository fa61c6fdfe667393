"""The fast path on a CUDA GPU: what tests/test_speed_fast.py checks on CPU, on the GPU.

These tests need a CUDA device and are skipped without one (CI has none). They are the GPU
half of the fast path's checks, run on a GPU machine with ``bash benchmarks/gpu_check.sh``
(docs/performance.md, "Checking a GPU machine"). Until a GPU run of them is recorded in
``benchmarks/results/``, the CUDA-only code (CUDA graphs, bf16 and fused Adam on a GPU,
channels_last through cuDNN) counts as unverified.

Comparisons are made with TF32 off (the trainer turns it on for speed), so that eager fp32 on
the GPU is a float32 reference; tolerances are those of the CPU tests except where cuDNN's
choice of convolution algorithm matters (noted per assertion).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import EAGER, TINY, assert_close_losses, run_path
from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.models.blocks import ImagePool
from mrsynth.train import speed
from mrsynth.train.runs import load_run

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (run bash benchmarks/gpu_check.sh on a GPU machine)",
)

REPO = Path(__file__).resolve().parents[1]
#: The device under test (a module constant so the logic can be dry-run on CPU).
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def strict_fp32():
    """Eager fp32 as the reference: no TF32, deterministic convolution algorithms."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = old


@pytest.mark.parametrize("name", list(TINY))
def test_cuda_options_match_eager_fp32(name: str, paired_train_slices) -> None:
    """channels_last, fused CUDA Adam and bf16 autocast against eager fp32 on the same GPU;
    the GPU's eager fp32 path against the CPU's."""
    a, b = paired_train_slices
    ref = run_path(name, EAGER, a, b, device=DEVICE)
    assert all(np.isfinite(v) for step in ref["losses"] for v in step.values())
    cpu = run_path(name, EAGER, a, b, device="cpu")
    torch.testing.assert_close(ref["out"], cpu["out"], atol=1e-4, rtol=0)
    assert_close_losses(ref["losses"], cpu["losses"], [1e-4, 1e-3])

    cl = run_path(name, speed.FastOptions(channels_last=True, fused_adam=False), a, b,
                  device=DEVICE)
    weight = next(p for p in cl["setup"].model.parameters() if p.ndim == 4)
    assert weight.device.type == DEVICE and weight.is_contiguous(memory_format=torch.channels_last)
    # cuDNN may pick another algorithm for the NHWC layout: a little above the CPU's 1e-5
    torch.testing.assert_close(cl["out"], ref["out"], atol=1e-4, rtol=0)
    assert_close_losses(cl["losses"], ref["losses"], [1e-4, 1e-3])

    fused = run_path(name, speed.FastOptions(fused_adam=True), a, b, device=DEVICE)
    assert set(fused["setup"].adam.values()) == {"fused"}
    assert_close_losses(fused["losses"], ref["losses"], [1e-6, 1e-3])
    for k, w in ref["weights"].items():
        if k not in ref["skip"]:
            torch.testing.assert_close(fused["weights"][k], w, atol=1e-5, rtol=1e-4, msg=k)

    bf = run_path(name, speed.FastOptions(precision="bf16", fused_adam=False), a, b,
                  device=DEVICE)
    assert (bf["out"] - ref["out"]).abs().max().item() <= 0.06
    assert_close_losses(bf["losses"], ref["losses"], [2e-2, 2e-2])


@pytest.mark.parametrize("name", ["cyclegan", "unit"])
def test_cuda_graphs_train_like_eager(name: str, paired_train_slices) -> None:
    """``compile reduce-overhead`` (CUDA graph trees) with the whole fast path: several steps
    of a GAN (networks called several times per step, image pools holding generated images
    across steps, discriminators frozen and unfrozen) give the eager losses."""
    a, b = paired_train_slices
    ref = run_path(name, EAGER, a, b, steps=4, device=DEVICE)
    opts = speed.FastOptions(channels_last=True, compile="reduce-overhead", fused_adam=True)
    cg = run_path(name, opts, a, b, steps=4, device=DEVICE)
    report = cg["setup"].compile_report
    assert report.mode == "reduce-overhead" and report.active, report
    torch.testing.assert_close(cg["out"], ref["out"], atol=1e-4, rtol=0)
    assert_close_losses(cg["losses"], ref["losses"], [1e-4, 1e-3, 1e-2, 1e-2])
    # the pool's stored images are copies, not views of graph outputs that the next replay
    # overwrote: each one is still a finite image in [-1, 1]
    pools = [p for p in vars(cg["setup"].model).values() if isinstance(p, ImagePool)]
    assert len(pools) == (2 if name == "cyclegan" else 0)  # UNIT keeps no pool
    for pool in pools:
        kept = pool.buffer[: pool.count].float()
        assert torch.isfinite(kept).all() and kept.abs().max() <= 1.0 + 1e-3
    # an odd shape outside the graphs (sample grids) runs eagerly and does not recompile
    with speed.eager(), torch.no_grad():
        y = cg["setup"].model.generator("A2B")(a[:3].to(DEVICE))
    assert y.shape == (3, 1, 32, 32)


def _train(prepared: Path, out: Path, model: str, *extra: str) -> int:
    arch = {"cyclegan": ["arch.ngf=8", "arch.n_blocks=2", "arch.ndf=8"],
            "unit": ["arch.nef=8", "arch.ndf=8"]}[model]
    args = ["train", "--model", model, "--preset", "cpu-small", "--data", str(prepared),
            "--out", str(out), "--device", DEVICE, "--max-steps-per-epoch", "6",
            "--batch-size", "2", "--set", "data.image_size=64", "--set", "train.progress=false",
            "--set", "train.log_every=2", "--set", "train.samples=2", *extra]
    for s in arch:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("model", ["cyclegan", "unit"])
def test_trainer_fastest_gpu_path_end_to_end(model: str, prepared_small: Path,
                                             tmp_path: Path) -> None:
    """``mrsynth train --device cuda --precision bf16 --compile reduce-overhead``: runs,
    records what it used, resumes, and its checkpoint translates on the CPU as on the GPU."""
    run = tmp_path / model
    assert _train(prepared_small, run, model, "--epochs", "1", "--precision", "bf16",
                  "--compile", "reduce-overhead") == 0
    assert _train(prepared_small, run, model, "--epochs", "2", "--resume") == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["compile"] == "reduce-overhead", m.get("compile_note")
    assert m["channels_last"] is True and set(m["adam"].values()) == {"fused"}
    assert m["epochs_completed"] == 2
    assert (run / "samples" / "epoch_0002.png").is_file()
    x = torch.from_numpy(load_prepared(prepared_small).images["T1w"][:4, None])
    on_cpu = load_run(run, device="cpu").translate(x, "A2B")
    on_gpu = load_run(run, device=DEVICE).translate(x, "A2B")
    assert torch.isfinite(on_cpu).all()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=0)


def test_benchmark_runs_every_gpu_variant(tmp_path: Path) -> None:
    """The benchmark's CUDA rows at a tiny size, every feature including CUDA graphs."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("train_speed_gpu",
                                                  REPO / "benchmarks" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["train_speed_gpu"] = bench
    try:
        spec.loader.exec_module(bench)
        out = tmp_path / "speed.json"
        assert bench.main(["--device", DEVICE, "--size", "64", "64", "--n-images", "16",
                           "--iters", "2", "--windows", "2", "--warmup", "2",
                           "--preset", "cpu-small", "--infer-batches", "1,4",
                           "--infer-iters", "2", "--out", str(out), "--quiet"]) == 0
    finally:
        sys.modules.pop("train_speed_gpu", None)
    doc = json.loads(out.read_text())
    assert doc["device"] == DEVICE
    errors = [r for r in doc["rows"] if r.get("error")]
    assert not errors, errors
    variants = {r["variant"] for r in doc["rows"]}
    assert {"baseline", "mrsynth"} <= variants
