"""Plain helpers shared by test modules (fixtures live in conftest.py).

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` (rootdir
``tests`` has no ``__init__.py``), and worker processes started by ``torch.multiprocessing``
inherit that path, so they can import it too.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mrsynth.models import build_model
from mrsynth.train.config import resolve_config
from mrsynth.train.speed import FastOptions, step_begin
from mrsynth.train.step import setup_training


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from two threads, and on a shared 2-core machine OpenMP
    threads competing with other processes slow them down many-fold (the reduced demo:
    14 s with one thread, 91 s with two under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def first_conv(net: nn.Module) -> nn.Conv2d:
    """A network's first convolution (the one that reads its input channels)."""
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d))


def norm_cancelled_biases(model: nn.Module) -> set[str]:
    """Names of biases an instance norm cancels (their gradient is zero).

    Conv biases directly followed by an instance norm, and in a U-Net the residual blocks'
    last norm biases: they add a constant per channel to the bottleneck's output, which the
    upsampling (nearest, reflect pad, conv) keeps constant and its instance norm removes
    (found numerically: a float64 gradient below 1e-12 on a random input). Adam moves such a
    bias by +-lr along rounding noise, differently in any two implementations; weight
    comparisons leave these out.
    """
    from mrsynth.models.blocks import UnetGenerator

    out = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, UnetGenerator):
            probe = copy.deepcopy(mod).double()
            x = torch.rand(2, first_conv(probe).in_channels, 24, 24, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))
            (probe(x) * torch.rand_like(x[:, :1])).sum().backward()
            out |= {f"{prefix}.{n}" for n, p in probe.named_parameters()
                    if p.grad is not None and float(p.grad.abs().max()) < 1e-12}
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (name, m), (_, nxt) in zip(kids, kids[1:], strict=False):
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and isinstance(
                    nxt, nn.InstanceNorm2d
                ) and m.bias is not None:
                    out.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return out


# ---------------------------------------------------------------------- the models under test
#: The one per-model table of the model tests: ``--set`` overrides that shrink a model to a
#: tiny network on the same code path. The tests parametrise over the registry
#: (``model_names()``); a model without an entry (a new model file) is tested at its
#: ``cpu-small`` preset, so it is covered without touching the tests.
TINY_ARCH: dict[str, dict[str, Any]] = {
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "cyclegan_s": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "pix2pix": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "generators_s": {"arch.ngf": 4, "arch.n_blocks": 1},
    "unit": {"arch.nef": 4, "arch.ndf": 4},
    "simple": {"arch.hidden": 16},
}


def tiny_arch(model: str) -> dict[str, Any]:
    """The overrides of :data:`TINY_ARCH` for ``model`` ({} for a model not listed)."""
    return dict(TINY_ARCH.get(model, {}))


# ---------------------------------------------------------------------- fast-path comparisons
#: Tiny networks of the three benchmarked models, for comparing speed options with eager.
TINY: dict[str, dict[str, Any]] = {
    # At the study's learning rate: with cpu-small's 5e-4 the fused and foreach CPU Adam
    # kernels give generator weights up to ~lr apart after two steps of this tiny CycleGAN
    # (losses still agree to 1e-7; at 2e-4 and 1e-3 the weights agree to 3e-7). Not yet
    # understood; see the note on issue 12. generators_s (its cpu-small U-Net) did the same
    # on a 2026-12 CI machine (AMD EPYC): at 5e-4 one weight of 4,608 was 4.6e-6 apart
    # after two steps, every other within 1.2e-7; at 2e-4 all within 2.4e-8. Adam's first
    # steps move a weight by about lr whatever its gradient's size, so a gradient that is
    # rounding noise in both kernels can move it in opposite directions.
    "cyclegan": {"arch.ngf": 8, "arch.n_blocks": 2, "arch.ndf": 8, "optim.lr": 2e-4},
    # no dropout or latent noise: the paths must see the same random numbers
    "unit": {"arch.nef": 8, "arch.ndf": 8, "arch.dropout": 0.0, "arch.noise_std": 0.0},
    "generators_s": {"arch.ngf": 8, "arch.n_blocks": 2, "optim.lr": 2e-4},
}
EAGER = FastOptions(channels_last=False, compile="none", fused_adam=False, precision="fp32")


def run_path(name: str, options: FastOptions, a: torch.Tensor, b: torch.Tensor,
             steps: int = 2, arch: dict[str, Any] | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Same init, same batches: generator output, losses of ``steps`` steps, final weights
    (all returned on the CPU, so that CUDA graph replays cannot overwrite them)."""
    cfg = resolve_config(name, "cpu-small", arch or TINY[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    setup = setup_training(model, device, options)
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    a = a.to(device).contiguous(memory_format=fmt)
    b = b.to(device).contiguous(memory_format=fmt)
    # Same mode and grad state as the training step's first call (compiled graphs are reused).
    step_begin(setup.compile_report)
    with setup.ctx.autocast():
        out = model.generator("A2B")(a[:2]).detach().float().cpu()
    losses = []
    for i in range(steps):
        step_begin(setup.compile_report)
        batch = {"A": a[2 * i: 2 * i + 2], "B": b[2 * i: 2 * i + 2]}
        losses.append({k: float(v) for k, v in model.train_step(batch, setup.ctx).items()})
        setup.ctx.end_iteration()
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"out": out, "losses": losses, "weights": weights, "setup": setup,
            "skip": norm_cancelled_biases(model)}


def assert_close_losses(got: list[dict[str, float]], ref: list[dict[str, float]],
                        rtol: list[float]) -> None:
    """Loss by loss and step by step, relative to the reference (absolute near zero)."""
    for step, (g, r, tol) in enumerate(zip(got, ref, rtol, strict=True)):
        assert g.keys() == r.keys()
        for k in r:
            assert abs(g[k] - r[k]) <= tol * max(abs(r[k]), 1e-3), (step, k, g[k], r[k])


def straight_and_resumed(monkeypatch: Any, model_cls: type, cfg: dict[str, Any], data: Any,
                         root: Any, at: int = 8,
                         where: tuple[int, int] | None = (1, 3)) -> tuple[Any, Any]:
    """Train ``cfg`` uninterrupted (``root/straight``) and again with SIGTERM during step
    ``at`` then ``--resume`` (``root/split``); ``where``: the (epoch, step in epoch) the
    interrupted run's checkpoint must be at. Returns both run directories (one torch thread)."""
    import json

    import pytest

    from mrsynth.train.trainer import TrainingInterrupted, train

    with one_torch_thread():
        straight = train(cfg, data, root / "straight")
        step = signal_during_step(monkeypatch, model_cls, at)
        split = root / "split"
        with pytest.raises(TrainingInterrupted):
            train(cfg, data, split)
        monkeypatch.setattr(model_cls, "train_step", step)
        if where is not None:
            meta = json.loads((split / "checkpoints/latest/meta.json").read_text())
            assert (meta["epoch"], meta["step_in_epoch"]) == where
        train(None, None, split, resume=True)
    return straight, split


def signal_during_step(monkeypatch: Any, model_cls: type, n: int) -> Any:
    """Make the process receive SIGTERM during the ``n``-th training step of ``model_cls``
    (counted from now), as ``kill`` from outside would: the trainer then checkpoints and
    stops. Returns the original step, to put back with ``monkeypatch.setattr``."""
    import os
    import signal

    step = model_cls.train_step
    calls = []

    def step_then_signal(self: Any, batch: Any, ctx: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, ctx)

    monkeypatch.setattr(model_cls, "train_step", step_then_signal)
    return step
