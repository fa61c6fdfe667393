"""Training state across a change of layout, precision, Adam implementation or compile mode.

A run may be resumed with another device (a GPU run finished on a CPU), another
``--precision`` or other speed options; these are the states that used to carry the old
setting with them. Each case is reproduced on CPU with the same code path the GPU takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY, norm_cancelled_biases
from mrsynth.errors import ConfigError
from mrsynth.models import build_model
from mrsynth.models.base import StepContext
from mrsynth.models.blocks import ImagePool
from mrsynth.train import checkpoint as ckpt
from mrsynth.train import resume, speed, step
from mrsynth.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _stepper(cfg, channels_last: bool, a, b, fused: bool = True
             ) -> tuple[step.TrainingSetup, step.TrainStepper]:
    torch.manual_seed(0)
    opts = speed.FastOptions(channels_last=channels_last, compile="none", fused_adam=fused)
    setup = step.setup_training(build_model(cfg), "cpu", opts)
    return setup, step.TrainStepper(setup, a, b)


def test_resume_into_another_layout_continues_the_same_adam_update(
    paired_train_slices, tmp_path: Path
) -> None:
    """A channels_last run (every compiled CUDA run) checkpointed through the real save path
    and resumed with contiguous weights and fused Adam (a CPU resume): the moments must be
    re-laid out, or the fused kernel pairs each weight with another element's moments."""
    a, b = paired_train_slices
    cfg = resolve_config("generators_s", "cpu-small", TINY["generators_s"])
    idx = torch.arange(a.shape[0])
    s1, st1 = _stepper(cfg, True, a, b)
    for i in range(3):
        st1.step(idx[i : i + 1], idx[i : i + 1])
    w = next(p for p in s1.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    state = {"optimizers": {n: o.state_dict() for n, o in s1.optimizers.items()}}
    meta = {"model": "generators_s", "contrasts": ["T1w", "T2w"], "epoch": 0, "iteration": 3}
    path = ckpt.save_checkpoint(tmp_path, "latest", s1.model, state, meta)

    def resume(fused: bool) -> tuple[dict[str, torch.Tensor], step.TrainingSetup]:
        s2, st2 = _stepper(cfg, False, a, b, fused)
        tensors, _ = ckpt.load_weights(path, "cpu")
        ckpt.load_model_weights(s2.model, tensors, path)
        saved = ckpt.load_state(path)
        for n, o in s2.optimizers.items():
            o.load_state_dict(saved["optimizers"][n])
        speed.use_adam_options(s2.optimizers, "cpu", fused)  # what the trainer does
        for i in range(3, 5):
            st2.step(idx[i : i + 1], idx[i : i + 1])
        return {k: v.detach().clone() for k, v in s2.model.state_dict().items()}, s2

    ref, _ = resume(fused=False)  # foreach reads each tensor by its own strides: correct
    got, s2 = resume(fused=True)
    for opt in s2.optimizers.values():
        for p, st in opt.state.items():
            assert st["exp_avg"].stride() == p.stride() == st["exp_avg_sq"].stride()
            assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32
    skip = norm_cancelled_biases(s2.model)
    checked = 0
    for k, v in ref.items():
        if k not in skip and v.ndim == 4:
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
            checked += 1
    assert checked >= 4


def test_fused_adam_step_counters_live_on_the_parameter_device() -> None:
    """A foreach checkpoint keeps ``step`` on the CPU; the fused CUDA kernel reads it on the
    GPU without a check. ``meta`` stands in for the GPU."""
    net = torch.nn.Conv2d(1, 2, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
    net(torch.randn(1, 1, 5, 5)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    remote = torch.nn.Conv2d(1, 2, 3, device="meta")
    opt2 = torch.optim.Adam(remote.parameters(), lr=1e-3, foreach=True)
    opt2.load_state_dict(saved)
    st = next(iter(opt2.state.values()))
    assert st["exp_avg"].device.type == "meta" and st["step"].device.type == "cpu"
    for group in opt2.param_groups:
        group["fused"], group["foreach"] = True, None
    speed.align_adam_state(opt2)
    for st in opt2.state.values():
        assert st["step"].device.type == "meta" and st["step"].dtype == torch.float32
    # a foreach counter keeps its dtype (float64 where that is the default dtype)
    opt.state[net.weight]["step"] = torch.tensor(1.0, dtype=torch.float64)
    speed.align_adam_state(opt)
    assert opt.state[net.weight]["step"].dtype == torch.float64


def test_grad_scaler_follows_the_adam_implementation() -> None:
    """fp16 with ``train.fused_adam=false`` resumed from a fused checkpoint: the optimiser is
    built foreach (it must not receive the scaler's inv-scale) and stays so after loading."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    fused = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, **speed.adam_options("cpu", False))
    opt.load_state_dict(fused.state_dict())
    assert opt.param_groups[0]["fused"]  # the saved implementation came back with the state
    speed.use_adam_options({"G": opt}, "cpu", fused=False)
    assert speed.adam_report({"G": opt}) == {"G": "foreach"}
    assert not getattr(opt, "_step_supports_amp_scaling", False)  # what GradScaler reads
    ctx = StepContext({"G": opt}, "cpu", "fp16", torch.amp.GradScaler("cpu"))
    before = net.weight.detach().clone()
    ctx.step("G", net(torch.randn(8, 4)).pow(2).mean())
    ctx.end_iteration()
    assert not torch.equal(before, net.weight)


def test_image_pool_stores_fp32_and_answers_in_the_callers_dtype_and_layout() -> None:
    pool = ImagePool(2, seed=0)
    x = torch.randn(1, 2, 8, 8)[:, :1]  # strides (128, 64, 8, 1): not the default for C=1
    got = pool.query(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and pool.buffer.dtype == torch.float32
    y = torch.randn(1, 1, 8, 8).to(memory_format=torch.channels_last)
    for _ in range(6):  # full after two: swaps return stored images in y's layout
        got = pool.query(y)
        assert got.dtype == torch.float32 and got.stride() == y.stride()
    loaded = ImagePool(2)
    loaded.load_state_dict(pool.state_dict(), "cpu")
    assert loaded.buffer.dtype == torch.float32
    torch.testing.assert_close(loaded.buffer, pool.buffer)


def test_bf16_cyclegan_resumes_in_fp32() -> None:
    """Pools written by a bf16 run feed an fp32 discriminator after a resume."""
    cfg = resolve_config("cyclegan", "cpu-small", {**TINY["cyclegan"], "loss.pool_size": 2})
    torch.manual_seed(0)
    a, b = torch.rand(6, 1, 32, 32) * 2 - 1, torch.rand(6, 1, 32, 32) * 2 - 1
    m = build_model(cfg)
    ctx = StepContext(m.build_optimizers(), "cpu", "bf16")
    for i in range(4):
        m.train_step({"A": a[i : i + 1], "B": b[i : i + 1]}, ctx)
    m2 = build_model(cfg)
    m2.load_state_dict(m.state_dict())
    m2.load_aux_state_dict(m.aux_state_dict(), "cpu")
    ctx2 = StepContext(m2.build_optimizers(), "cpu", "fp32")
    for i in range(12):  # once full, each step swaps with probability 1/2
        losses = m2.train_step({"A": a[i % 6 : i % 6 + 1], "B": b[i % 6 : i % 6 + 1]}, ctx2)
        assert all(torch.isfinite(v) for v in losses.values())


def test_every_cuda_graph_mode_marks_its_steps(monkeypatch) -> None:
    """``max-autotune`` turns on CUDA graphs as ``reduce-overhead`` does: both need step marks
    on one GPU and both drop the graphs under DDP. (``nn.Module.compile`` is lazy, so no
    code is generated here; Triton is reported present.)"""
    monkeypatch.setattr(speed, "compile_support", lambda dev: (True, ""))
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = build_model(resolve_config("generators_s", "cpu-small", TINY["generators_s"]))
    cases = [("reduce-overhead", False, "reduce-overhead", True),
             ("max-autotune", False, "max-autotune", True),
             ("reduce-overhead", True, "default", False),
             ("max-autotune", True, "max-autotune-no-cudagraphs", False),
             ("default", False, "default", False)]
    for asked, distributed, mode, graphs in cases:
        report = speed.compile_networks(model, asked, "cuda", distributed=distributed)
        assert (report.mode, report.cudagraphs) == (mode, graphs), (asked, distributed)
        assert (report.reason != "") == (asked != mode)
        n = len(marks)
        speed.step_begin(report)
        assert len(marks) == n + graphs


def test_channels_last_auto_means_compiled_networks_on_cuda() -> None:
    def opts(device: str, **over):
        cfg = resolve_config("cyclegan", "cpu-small", over)
        return speed.FastOptions.from_config(cfg, device).channels_last

    assert resolve_config("cyclegan", "paper")["train"]["channels_last"] == "auto"
    assert opts("cuda") is False  # eager: instance norm would undo the layout at every block
    assert opts("cuda", **{"train.compile": "default"}) is True
    assert opts("cuda", **{"train.channels_last": True}) is True
    assert opts("cuda", **{"train.channels_last": False, "train.compile": "default"}) is False
    assert opts("cpu", **{"train.channels_last": True, "train.compile": "default"}) is False
    with pytest.raises(ConfigError, match="train.channels_last must be true, false or auto"):
        resolve_config("cyclegan", "cpu-small", {"train.channels_last": "maybe"})


def test_cuda_rng_state_is_this_devices_only(monkeypatch) -> None:
    """Checkpoints hold the training GPU's RNG stream; older ones hold one per visible GPU and
    a resume on a node with fewer GPUs must not index past them."""
    calls: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: torch.full((4,), d.index))
    dev = torch.device("cuda", 1)
    state = resume.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    state["cuda"] = torch.cuda.get_rng_state(dev)
    resume.set_rng_state(state, dev)
    assert torch.equal(calls[-1][0], torch.full((4,), 1)) and calls[-1][1] == dev
    old = [torch.full((4,), i) for i in range(8)]
    resume.set_rng_state({**state, "cuda": old}, dev)
    assert torch.equal(calls[-1][0], old[1])
    n = len(calls)
    resume.set_rng_state({**state, "cuda": old[:1]}, dev)  # fewer GPUs saved than index
    assert len(calls) == n
