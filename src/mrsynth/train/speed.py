"""Speed switches of the training path: compilation, memory format, Adam kernels, device.

Batch-1 GAN training on a GPU is bound by per-op launch overhead, not arithmetic: an eager
CycleGAN iteration dispatches about 2,700 ops. What removes that overhead, in the order it pays
off (each measured by ``benchmarks/train_speed.py``; see docs/performance.md):

* ``torch.compile`` of every network (:func:`compile_networks`): fuses the instance-norm /
  activation / residual chains and, with ``mode="reduce-overhead"``, replays each network as a
  CUDA graph (one launch per network call). Losses stay eager and in fp32.
* ``channels_last`` weights and images (:func:`to_channels_last`): cuDNN's and oneDNN's
  preferred layout for convolutions, no transposes around each conv.
* fused Adam (:func:`adam_options`): one kernel per optimiser step instead of one per tensor.
* bf16 autocast (the trainer's ``--precision bf16``; :class:`~mrsynth.models.base.StepContext`).

The step that uses them is :mod:`mrsynth.train.step`. Everything here is optional and falls
back to the eager path when unavailable (no C++ compiler for the CPU backend, no Triton for
CUDA, Windows): training still runs, only slower.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mrsynth.errors import ConfigError
from mrsynth.train.config import COMPILE_MODES

#: torch.compile modes that replay CUDA graphs on a CUDA device.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda[:N]`` without a GPU and unknown
    names are clear errors. The one device rule of training, evaluation and the demo."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for but this torch has no usable CUDA GPU "
            f"(torch {torch.__version__}). Use --device cpu or auto, or install a CUDA build."
        )
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"Unknown --device {name!r}; use auto, cpu or cuda.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown --device {name!r} ({exc}); use auto, cpu or cuda.") from exc


@dataclass
class CompileReport:
    """What :func:`compile_networks` did, for the run's config.json and the benchmark."""

    mode: str
    compiled: list[str]
    reason: str = ""
    #: whether the compiled networks replay CUDA graphs (iterations must then be marked)
    cudagraphs: bool = False

    @property
    def active(self) -> bool:
        return bool(self.compiled)


def compile_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``torch.compile`` can generate code for ``device`` here, and why not.

    The CPU backend needs a C++ compiler (``CXX``, g++, c++ or clang++); the CUDA backend needs
    Triton. Checked up front so a missing tool gives a clear fallback, not a crash mid-step.
    """
    dev = torch.device(device)
    if sys.platform == "win32":
        return False, "torch.compile's inductor backend is not supported on Windows"
    if dev.type == "cpu":
        cands = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in cands):
            return False, "no C++ compiler found (install g++ or set CXX)"
        return True, ""
    if dev.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "Triton is not installed (it comes with the CUDA builds of torch)"
        return True, ""
    return False, f"no compile backend for device type {dev.type!r}"


def check_compile_mode(mode: str | None) -> str:
    mode = "none" if mode in (None, "", False) else str(mode)
    if mode not in COMPILE_MODES:
        raise ConfigError(
            f"Unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)} "
            "(--set train.compile=...)."
        )
    return mode


def trainable_networks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's top-level networks that have parameters (what gets compiled / wrapped)."""
    return {n: m for n, m in model.named_children() if any(True for _ in m.parameters())}


def compile_networks(
    model: nn.Module,
    mode: str | None,
    device: torch.device | str,
    *,
    distributed: bool = False,
) -> CompileReport:
    """Compile each network of ``model`` in place (``nn.Module.compile``).

    In-place compilation keeps the module objects and their ``state_dict`` keys, so
    checkpoints of compiled and eager runs are interchangeable. Shapes are static (batch and
    image size are fixed during training). CUDA graphs (``reduce-overhead``, and
    ``max-autotune``, which turns them on too) are used only on a single CUDA device: on CPU
    they do not exist, and with DistributedDataParallel the gradient all-reduce runs between
    graph replays, so those modes become ``default`` / ``max-autotune-no-cudagraphs``.
    """
    mode = check_compile_mode(mode)
    if mode == "none":
        return CompileReport(mode, [], "compile off")
    dev = torch.device(device)
    ok, why = compile_support(dev)
    if not ok:
        return CompileReport("none", [], f"torch.compile unavailable: {why}; eager fallback")
    reason = ""
    graphs = mode in CUDAGRAPH_MODES
    if graphs and (dev.type != "cuda" or distributed):
        fallback = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        reason = (f"CUDA graphs need a single CUDA device; compiled with mode {fallback!r}"
                  if dev.type == "cuda" else
                  f"no CUDA graphs on CPU; compiled with mode {fallback!r}")
        mode, graphs = fallback, False
    nets = trainable_networks(model)
    for net in nets.values():
        net.compile(mode=None if mode == "default" else mode, dynamic=False)
    return CompileReport(mode, sorted(nets), reason, cudagraphs=graphs)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled networks eagerly inside the block.

    For the odd call with another shape or mode (sample grids at the end of an epoch, a
    translation for a figure): compiling those would cost seconds and could make the compiler
    switch the training graphs to dynamic shapes.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # older torch: nothing is forced, only slower
        yield
        return
    with set_stance("force_eager"):
        yield


def step_begin(report: CompileReport | None) -> None:
    """Tell CUDA graph trees that a new iteration starts (outputs of the last one are dead).

    Without the mark, a compiled call made while no backward is pending starts a new graph
    generation and invalidates the previous outputs, which breaks models that chain several
    compiled networks without gradients (UNIT's encoders) or reuse a detached output.
    """
    if report is not None and report.cudagraphs and report.active:
        torch.compiler.cudagraph_mark_step_begin()


# ---------------------------------------------------------------------- memory format
def channels_last_supported(device: torch.device | str) -> bool:
    """channels_last is a win where cuDNN or oneDNN run the convolutions (CUDA, x86 CPUs)."""
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and torch.backends.mkldnn.is_available())


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert 4-D weights to channels_last in place (other parameters are untouched)."""
    return model.to(memory_format=torch.channels_last)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CPUs, and GPUs of compute capability
    8.0+); torch's default check also accepts emulation, which is slower than fp32."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type == "cpu"
    with torch.cuda.device(dev):
        return torch.cuda.is_bf16_supported(including_emulation=False)


# ---------------------------------------------------------------------- optimiser
def adam_options(device: torch.device | str, fused: bool | None = None) -> dict[str, Any]:
    """``fused`` / ``foreach`` keyword for ``torch.optim.Adam`` on ``device``.

    Fused Adam runs the whole update in one kernel per parameter group (CUDA, and CPU since
    torch 2.4); otherwise the multi-tensor ``foreach`` path. ``fused=False`` forces foreach.
    """
    dev = torch.device(device)
    if fused is None:
        fused = dev.type in ("cuda", "cpu")
    if fused and dev.type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}




def use_adam_options(
    optimizers: dict[str, torch.optim.Optimizer], device: torch.device | str,
    fused: bool | None = None,
) -> None:
    """Give optimisers restored from a checkpoint this run's Adam implementation.

    The optimisers are built with this run's options (:meth:`TranslationModel.adam`), but
    ``Optimizer.load_state_dict`` brings back the saved groups' ``fused`` / ``foreach`` flags,
    and a run may resume with another device or implementation; this sets them back and
    re-lays the restored state out (:func:`align_adam_state`).
    """
    opts = adam_options(device, fused)
    for opt in optimizers.values():
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            group["fused"] = opts.get("fused", False) or None
            group["foreach"] = opts.get("foreach", False) or None
        align_adam_state(opt)


def adam_report(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, str]:
    """The Adam implementation each optimiser uses, for config.json and the benchmark."""
    used = {}
    for name, opt in optimizers.items():
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            used[name] = "unchanged"
        else:
            used[name] = "fused" if opt.param_groups[0].get("fused") else "foreach"
    return used


def align_adam_state(opt: torch.optim.Optimizer) -> None:
    """Give restored Adam state its parameter's memory layout, and ``step`` its home device.

    ``Optimizer.load_state_dict`` casts the state to each parameter's dtype and device but
    keeps the saved strides, and places ``step`` by the *saved* group's implementation. A run
    resumed with another layout (channels_last on CUDA, contiguous on CPU), device or Adam
    implementation would otherwise pair each weight with another element's moments (the
    CPU fused kernel walks memory in order) or fail in the CUDA fused kernel, which expects
    ``step`` on the parameter's device (the foreach path expects it on the CPU).
    """
    for group in opt.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = st.get(key)
                if isinstance(t, Tensor) and t.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)
            step = st.get("step")
            if isinstance(step, Tensor):  # fused: float32 on the device; else a CPU scalar
                home, dtype = ((p.device, torch.float32) if on_device
                               else (torch.device("cpu"), step.dtype))
                if step.device != home or step.dtype != dtype:
                    st["step"] = step.to(home, dtype)


# ---------------------------------------------------------------------- options
@dataclass
class FastOptions:
    """The speed settings of a run (``train.channels_last``, ``train.compile``,
    ``train.fused_adam``, ``precision``)."""

    channels_last: bool = False
    compile: str = "none"
    fused_adam: bool | None = None
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str) -> FastOptions:
        """The options a resolved training config asks for, on ``device``.

        channels_last is applied on CUDA only: on CPU the benchmark measured no consistent
        gain (docs/performance.md), and the eager layout keeps CPU runs simple to debug. Its
        default, ``auto``, applies it only to compiled networks: eager ``instance_norm``
        returns the default layout, so an eager channels_last network converts the activations
        back and forth around every conv-norm pair; the compiler chooses layouts itself.
        """
        t = cfg["train"]
        dev = torch.device(device)
        compile_mode = check_compile_mode(t.get("compile", "none"))
        cl = t["channels_last"]
        return cls(
            channels_last=dev.type == "cuda" and (
                cl is True or (cl == "auto" and compile_mode != "none")),
            compile=compile_mode,
            fused_adam=bool(t.get("fused_adam", True)),
            precision=str(cfg["precision"]),
        )
