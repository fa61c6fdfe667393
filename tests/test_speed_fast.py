"""The fast training path on CPU: each option computes what the eager fp32 path computes.

Tolerances (documented in docs/performance.md):

* channels_last and fused Adam change only the order of floating-point operations: generator
  outputs within 1e-5, first-step losses within 1e-5 relative, second-step losses (after one
  Adam update) within 1e-3 relative.
* torch.compile (inductor, CPU) fuses kernels and reorders reductions: outputs within 5e-5,
  losses as above.
* bf16 autocast keeps 8 bits of mantissa through ~24 conv layers: generator outputs within
  0.06 (on a [-1, 1] scale), losses within 2e-2 relative; the losses are computed in fp32.

Weights are compared after Adam steps excluding the biases of convolutions followed by
instance norm: the norm subtracts them again, so their exact gradient is zero and Adam moves
them by +-lr in the direction of rounding noise, differently in any two implementations.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import EAGER, TINY, assert_close_losses, run_path
from mrsynth.cli import main
from mrsynth.errors import ConfigError
from mrsynth.models import build_model
from mrsynth.models.base import StepContext
from mrsynth.train import speed, step
from mrsynth.train.config import resolve_config
from mrsynth.train.dataset import EpochSampler
from mrsynth.train.runs import load_run

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("name", list(TINY))
def test_channels_last_bf16_and_fused_adam_match_eager_fp32(name: str, paired_train_slices) -> None:
    a, b = paired_train_slices
    ref = run_path(name, EAGER, a, b)
    assert ref["setup"].adam == {n: "foreach" for n in ref["setup"].optimizers}
    # every loss finite and not trivially zero: the comparison is meaningful
    assert all(np.isfinite(v) for step in ref["losses"] for v in step.values())

    cl = run_path(name, speed.FastOptions(channels_last=True, fused_adam=False), a, b)
    some_weight = next(p for p in cl["setup"].model.parameters() if p.ndim == 4)
    assert some_weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl["out"], ref["out"], atol=1e-5, rtol=0)
    assert_close_losses(cl["losses"], ref["losses"], [1e-5, 1e-3])

    fused = run_path(name, speed.FastOptions(fused_adam=True), a, b)
    assert set(fused["setup"].adam.values()) == {"fused"}
    assert all(g["fused"] for o in fused["setup"].optimizers.values() for g in o.param_groups)
    assert_close_losses(fused["losses"], ref["losses"], [1e-6, 1e-3])
    for k, w in ref["weights"].items():
        if k not in ref["skip"]:
            torch.testing.assert_close(fused["weights"][k], w, atol=1e-6, rtol=1e-5, msg=k)

    bf = run_path(name, speed.FastOptions(precision="bf16", fused_adam=False), a, b)
    err = (bf["out"] - ref["out"]).abs().max().item()
    assert err <= 0.06, err
    assert_close_losses(bf["losses"], ref["losses"], [2e-2, 2e-2])


def test_compiled_networks_match_eager_and_keep_their_state_dict(paired_train_slices) -> None:
    ok, why = speed.compile_support("cpu")
    assert ok, f"torch.compile needs a C++ compiler on this machine: {why}"
    a, b = paired_train_slices
    small = {"arch.ngf": 4, "arch.n_blocks": 1}  # compile time grows with the graph
    ref = run_path("generators_s", EAGER, a, b, arch=small)
    opts = speed.FastOptions(compile="default", fused_adam=False)
    comp = run_path("generators_s", opts, a, b, arch=small)
    report = comp["setup"].compile_report
    assert report.active and report.compiled == ["G_A2B", "G_B2A"] and report.mode == "default"
    model = comp["setup"].model
    assert all(_compiled(m) for m in model.children())
    torch.testing.assert_close(comp["out"], ref["out"], atol=5e-5, rtol=0)
    assert_close_losses(comp["losses"], ref["losses"], [1e-5, 1e-3])
    # In-place compilation: same module objects, same checkpoint keys as an eager model.
    assert list(comp["weights"]) == list(ref["weights"])
    # eager(): compiled networks run without compiling for an odd shape
    with speed.eager(), torch.no_grad():
        y = model.generator("B2A")(b[:3])
    assert y.shape == (3, 1, 32, 32)


def test_reduce_overhead_falls_back_to_default_without_cuda() -> None:
    model = build_model(resolve_config("generators_s", "cpu-small", TINY["generators_s"]))
    report = speed.compile_networks(model, "reduce-overhead", "cpu")
    assert report.mode == "default" and "no CUDA graphs on CPU" in report.reason
    model = build_model(resolve_config("generators_s", "cpu-small", TINY["generators_s"]))
    assert speed.compile_networks(model, "none", "cpu").active is False
    assert not any(_compiled(m) for m in model.children())
    with pytest.raises(ConfigError, match="Unknown compile mode 'fastest'"):
        speed.compile_networks(model, "fastest", "cpu")


def test_missing_compiler_means_eager_fallback(monkeypatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    ok, why = speed.compile_support("cpu")
    assert not ok and "no C++ compiler" in why
    model = build_model(resolve_config("generators_s", "cpu-small", TINY["generators_s"]))
    report = speed.compile_networks(model, "default", "cpu")
    assert not report.active and "eager fallback" in report.reason
    assert not any(_compiled(m) for m in model.children())


def test_loss_accumulator_means_and_one_read() -> None:
    acc = step.LossAccumulator()
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(7, 3))
    for row in vals:
        acc.add({"G": torch.tensor(row[0]), "D": torch.tensor(row[1]),
                 "cycle": torch.tensor(row[2], dtype=torch.float64)})
    assert acc.count == 7
    means = acc.means()
    assert list(means) == ["G", "D", "cycle"]
    np.testing.assert_allclose(list(means.values()), vals.mean(0), rtol=0, atol=1e-6)
    assert acc.means() == {}  # reset after reading
    acc.add({"G": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="loss names changed"):
        acc.add({"D": torch.tensor(1.0)})
    halved = acc.means(reduce=lambda t: t / 2)
    assert halved == {"G": 0.5}


@pytest.mark.parametrize("name,key", [("generators_s", "G"), ("cyclegan", "cycle")])
def test_bf16_training_converges_like_fp32_on_real_slices(
    name: str, key: str, paired_train_slices
) -> None:
    """30 steps on real shared slices: the key loss falls in bf16 as it does in fp32."""
    a, b = paired_train_slices
    cfg = resolve_config(name, "cpu-small", {**TINY[name], "optim.lr": 1e-3})
    finals = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        ctx = StepContext(model.build_optimizers(), "cpu", precision)
        ia, _ = EpochSampler(a.shape[0], b.shape[0], True, 2, seed=0, max_steps=30).draw()
        trace = [float(model.train_step({"A": a[i], "B": b[i]}, ctx)[key]) for i in ia]
        assert all(np.isfinite(trace))
        first, last = np.mean(trace[:5]), np.mean(trace[-5:])
        assert last < 0.8 * first, (precision, first, last)
        finals[precision] = last
    assert abs(finals["bf16"] - finals["fp32"]) <= 0.15 * finals["fp32"], finals


def test_adam_options_and_switching() -> None:
    assert speed.adam_options("cpu") == {"fused": True}
    assert speed.adam_options("cpu", fused=False) == {"foreach": True}
    assert speed.adam_options("meta") == {"foreach": True}
    model = build_model(resolve_config("cyclegan", "cpu-small", TINY["cyclegan"]))
    model.adam_kernels = speed.adam_options("cpu", True)  # what setup_training does
    opts = model.build_optimizers()
    assert speed.adam_report(opts) == {"G": "fused", "D": "fused"}
    assert all(o._step_supports_amp_scaling for o in opts.values())  # built fused: takes scale
    before = copy.deepcopy([o.state_dict()["param_groups"] for o in opts.values()])
    speed.use_adam_options(opts, "cpu", False)  # after loading a checkpoint
    assert speed.adam_report(opts) == {"G": "foreach", "D": "foreach"}
    after = [o.state_dict()["param_groups"] for o in opts.values()]
    for g0, g1 in zip(before, after, strict=True):  # only the implementation changed
        for x, y in zip(g0, g1, strict=True):
            assert {k: v for k, v in x.items() if k not in ("fused", "foreach")} == {
                k: v for k, v in y.items() if k not in ("fused", "foreach")}


def test_trainer_compile_option_trains_like_eager(prepared_small: Path, tmp_path: Path) -> None:
    """``mrsynth train --compile default``: compiled networks in the trainer, recorded in the
    run, checkpoints loadable by load_run, losses as in the eager run."""
    args = ["train", "--model", "generators_s", "--preset", "cpu-small", "--data",
            str(prepared_small), "--epochs", "1", "--max-steps-per-epoch", "3",
            "--batch-size", "2", "--set", "arch.ngf=4", "--set", "arch.n_blocks=1",
            "--set", "data.image_size=32", "--set", "train.progress=false",
            "--set", "train.log_every=1", "--set", "train.samples=2",
            "--set", "train.fused_adam=false"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--out", str(tmp_path / "compiled"), "--compile", "default"]) == 0
    m = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert m["compile"] == "default" and m["adam"] == {"G": "foreach"}
    assert json.loads((tmp_path / "eager" / "metrics.json").read_text())["compile"] == "none"
    rows = {}
    for name in ("eager", "compiled"):
        with open(tmp_path / name / "losses.csv") as fh:
            rows[name] = [{k: float(v) for k, v in r.items() if k != "images_per_s"}
                          for r in csv.DictReader(fh)]
    assert len(rows["eager"]) == len(rows["compiled"]) == 3
    assert_close_losses(rows["compiled"], rows["eager"], [1e-5, 1e-3, 1e-3])
    assert (tmp_path / "compiled" / "samples" / "epoch_0001.png").is_file()
    run = load_run(tmp_path / "compiled")  # eager model from the compiled run's checkpoint
    x = torch.zeros(2, 1, 64, 64) - 1
    assert run.translate(x, "A2B").shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match="train.compile must be one of"):
        resolve_config("generators_s", "cpu-small", {"train.compile": "fastest"})
    cfg = resolve_config("generators_s", "cpu-small", ["train.compile=none"])
    assert cfg["train"]["compile"] == "none"  # the word, not null


def _compiled(net: torch.nn.Module) -> bool:
    """Whether ``nn.Module.compile`` was applied to ``net``."""
    return getattr(net, "_compiled_call_impl", None) is not None
