"""The model interface every translation model implements, and the registry of models.

A model is one file in this package: a :class:`TranslationModel` subclass decorated with
:func:`register_model`. It owns its networks (as submodules, so ``state_dict()`` holds all
weights), builds its optimisers from the config, and performs one training step on a batch
of ``{"A": (B,1,H,W), "B": (B,1,H,W)}`` tensors (2.5-D, ``arch.context_slices`` = k: plus
``"A_stack"``/``"B_stack"`` (B,2k+1,H,W), the generators' inputs, see :meth:`source`).
Everything else (device, precision, epochs, learning-rate schedule, checkpoints, logging,
resume, signals) belongs to the one trainer in :mod:`mrsynth.train.trainer`, which knows
nothing about any particular model.

The step receives a :class:`StepContext` from the trainer: forward passes run inside
``ctx.autocast()`` and each optimiser is stepped with ``ctx.step(name, loss)``, so mixed
precision and gradient scaling stay the trainer's business. Losses are returned as detached
tensors (no ``.item()``), so a step never forces a device synchronisation.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrsynth.data.context import MAX_CONTEXT_SLICES, STACK_SUFFIX
from mrsynth.errors import ConfigError
from mrsynth.models.blocks import GENERATORS, INITS, UPSAMPLING, init_weights

# the direction names and the one rule that reads them (re-exported from here)
from mrsynth.models.directions import DIRECTIONS, parse_direction  # noqa: F401


class StepContext:
    """What the trainer lends a model for one step: autocast and optimiser stepping.

    ``precision`` is ``fp32``, ``bf16`` or ``fp16``; with fp16 a ``torch.amp.GradScaler`` is
    used for every optimiser and updated once per iteration in :meth:`end_iteration`.
    """

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        device_type: str = "cpu",
        precision: str = "fp32",
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.device_type = device_type
        self.precision = precision
        self.scaler = scaler
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision region for forward passes (a no-op in fp32)."""
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self._dtype)

    def step(self, name: str, loss: Tensor) -> None:
        """Zero the grads of optimiser ``name``, back-propagate ``loss`` and step it."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
        else:
            loss.backward()
            opt.step()

    def end_iteration(self) -> None:
        if self.scaler is not None:
            self.scaler.update()


def _int_in(value: Any, lo: int, hi: int) -> bool:
    """An integer setting (not a bool) within [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


class TranslationModel(nn.Module):
    """Base class: networks, optimisers and a training step for one model family.

    Subclasses set ``name``, ``needs_paired`` and ``summary``, implement
    :meth:`preset_config`, ``__init__`` (build the networks from ``config``), :meth:`generator`,
    :meth:`build_optimizers` and :meth:`train_step`; models with extra training state (image
    pools) override :meth:`aux_state_dict` / :meth:`load_aux_state_dict`.
    """

    name: ClassVar[str] = ""
    #: True when the model learns from aligned A/B pairs (refuses unpaired data).
    needs_paired: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: Position in listings (the study's order first).
    order: ClassVar[int] = 100
    #: True when inference can sample (latent noise, dropout): ``--stochastic`` matters.
    stochastic_inference: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.arch: dict[str, Any] = config["arch"]
        self.loss_cfg: dict[str, Any] = config["loss"]
        self.optim_cfg: dict[str, Any] = config["optim"]
        #: ``arch.context_slices`` = k: the generators see 2k + 1 neighbouring slices as
        #: channels (2.5-D, :mod:`mrsynth.data.context`) and still output one slice.
        self.context_slices = int(self.arch.get("context_slices", 0) or 0)
        self.in_channels = 2 * self.context_slices + 1
        #: ``fused`` / ``foreach`` for :meth:`adam`; torch's default until the trainer sets it.
        self.adam_kernels: dict[str, bool] = {}

    # ------------------------------------------------------------------ to implement
    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        """Sections ``arch``, ``loss``, ``optim`` and ``train`` (overrides) for a preset."""
        raise NotImplementedError

    def generator(self, direction: str, stochastic: bool = False) -> nn.Module:
        """The network mapping (N,C,H,W) to (N,1,H,W) in one direction (``A2B`` or ``B2A``);
        C = :attr:`in_channels` (1, or 2k + 1 stacked neighbouring slices in 2.5-D).

        ``stochastic=True`` keeps the training-time randomness (latent noise, dropout) on at
        inference, as the study's Keras code did; models without any ignore it.
        """
        raise NotImplementedError

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """One iteration: forward, losses, optimiser steps; returns detached fp32 losses."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks
    @classmethod
    def config_problems(cls, cfg: dict[str, Any]) -> list[str]:
        """What is wrong with the values of this model's settings (``arch``, ``loss``...).

        :func:`mrsynth.train.config.validate_config` reports these with its own problems,
        so a bad ``--set`` is refused before any data is read. Overrides extend the list.
        """
        problems = []
        init = cfg["arch"].get("init", "normal")
        if init not in INITS:
            problems.append(f"arch.init must be one of {', '.join(INITS)}")
        for key, choices in (("upsample", UPSAMPLING), ("generator", GENERATORS)):
            value = cfg["arch"].get(key)  # absent for models without the setting
            if value is not None and value not in choices:
                problems.append(f"arch.{key} must be one of {', '.join(choices)}")
        n = cfg["arch"].get("intensity_channels", 0)
        if not _int_in(n, 0, 256):
            problems.append("arch.intensity_channels must be an integer from 0 (off) to 256")
        elif n and cfg["arch"].get("generator", "resnet") != "unet":
            problems.append("arch.intensity_channels needs arch.generator=unet: only the "
                            "U-Net has the intensity branch")
        k = cfg["arch"].get("context_slices", 0)
        if not _int_in(k, 0, MAX_CONTEXT_SLICES):
            problems.append(f"arch.context_slices must be an integer from 0 (2-D) to "
                            f"{MAX_CONTEXT_SLICES}: the neighbouring slices on each side given "
                            "to the generators")
        return problems

    @classmethod
    def upgrade_stored_config(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """A run config written by an older version with renamed settings renamed (the
        trainer then adds settings introduced since with their defaults)."""
        return stored

    def aux_state_dict(self) -> dict[str, Any]:
        """Training state that is not weights (image pools), for checkpoints."""
        return {}

    def load_aux_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        del state, device

    @property
    def wants_next_slice(self) -> bool:
        """Whether each batch must also hold every row's next slice (``A_next``, ``B_next``)
        and its stack; only the through-plane loss of 2.5-D paired L1 models does."""
        return False

    # ------------------------------------------------------------------ shared helpers
    def source(self, batch: dict[str, Tensor], key: str) -> Tensor:
        """The generator input of domain ``key`` (``A``/``B``): the slices themselves in
        2-D, their stacks of neighbours (``batch[key + "_stack"]``, (N, 2k+1, H, W)) in
        2.5-D. Targets and discriminator inputs stay ``batch[key]`` (one channel). With
        gamma augmentation a 2-D input is ``batch[key + "_source"]``
        (:mod:`mrsynth.data.augment`)."""
        if self.in_channels == 1:
            return batch.get(key + "_source", batch[key])
        stack = batch.get(key + STACK_SUFFIX)
        if stack is None or stack.shape[1] != self.in_channels:
            got = "none" if stack is None else f"{stack.shape[1]} channels"
            raise ValueError(
                f"{self.name} with arch.context_slices={self.context_slices} needs "
                f"batch[{key + STACK_SUFFIX!r}] with {self.in_channels} channels, got {got}"
            )
        return stack

    def flat_stack(self, x: Tensor) -> Tensor:
        """A generated slice (N, 1, H, W) as a generator input: repeated in every channel.

        What the second pass of a cycle sees in 2.5-D: the translations of the
        neighbouring slices are not computed (2k more generator passes per step), so the
        translated slice stands for its neighbours (docs/models.md)."""
        return x if self.in_channels == 1 else x.repeat(1, self.in_channels, 1, 1)

    def networks(self) -> dict[str, nn.Module]:
        """The named networks (top-level submodules) for listings and checkpoints."""
        return dict(self.named_children())

    @torch.no_grad()
    def translate(self, x: Tensor, direction: str, stochastic: bool = False) -> Tensor:
        check_direction(direction)
        return self.generator(direction, stochastic)(x)

    def adam(self, params: Iterator[nn.Parameter] | list[nn.Parameter]) -> torch.optim.Adam:
        """Adam from the ``optim`` section, with the kernels in ``adam_kernels`` (fused or
        foreach; the trainer sets them, :func:`mrsynth.train.step.setup_training`)."""
        return torch.optim.Adam(
            list(params),
            lr=float(self.optim_cfg["lr"]),
            betas=(float(self.optim_cfg["beta1"]), float(self.optim_cfg["beta2"])),
            weight_decay=float(self.optim_cfg.get("weight_decay", 0.0)),
            **self.adam_kernels,
        )


class GeneratorPairModel(TranslationModel):
    """A model with one network per direction, ``G_A2B`` and ``G_B2A``, set by ``__init__``.

    CycleGAN, pix2pix and the paired L1 models all translate this way and optimise the two
    generators together, so the lookup and the generator parameters live here once.
    """

    G_A2B: nn.Module
    G_B2A: nn.Module

    def generator(self, direction: str, stochastic: bool = False) -> nn.Module:
        del stochastic  # these generators have no noise and no dropout
        return self.G_A2B if check_direction(direction) == "A2B" else self.G_B2A

    def generator_parameters(self) -> list[nn.Parameter]:
        """Both generators' parameters (A->B first): what the ``G`` optimiser steps."""
        return [*self.G_A2B.parameters(), *self.G_B2A.parameters()]


class PairedL1Model(GeneratorPairModel):
    """Two independent generators (A->B, B->A), each regressed onto the aligned target with L1.

    ``generators_s`` and ``simple`` differ only in the network, so they share this step:
    subclasses implement :meth:`make_generator`.
    """

    needs_paired = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.G_A2B = self.make_generator()
        self.G_B2A = self.make_generator()
        init_weights(self, self.arch["init"])

    def make_generator(self) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def config_problems(cls, cfg: dict[str, Any]) -> list[str]:
        problems = super().config_problems(cfg)
        problems += gradient_problems(cfg["loss"], paired=True)
        w = cfg["loss"].get("through_plane", 0.0)
        if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
            problems.append("loss.through_plane must be a number >= 0 (0: off)")
        elif w > 0 and not cfg["arch"].get("context_slices", 0):
            problems.append("loss.through_plane compares each slice's change to the next "
                            "slice with the real one, so it needs the neighbouring slices: "
                            "set arch.context_slices >= 1 (2.5-D) too")
        return problems

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.adam(self.generator_parameters())}

    @property
    def wants_next_slice(self) -> bool:
        return float(self.loss_cfg.get("through_plane", 0.0)) > 0 and self.in_channels > 1

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        real_A, real_B = batch["A"], batch["B"]
        w_tp = float(self.loss_cfg.get("through_plane", 0.0))
        w_grad = float(self.loss_cfg.get("gradient", 0.0))
        out: dict[str, Tensor] = {}
        with ctx.autocast():
            fake_B = self.G_A2B(self.source(batch, "A"))
            fake_A = self.G_B2A(self.source(batch, "B"))
            mae_A2B = l1(fake_B, real_B)
            mae_B2A = l1(fake_A, real_A)
            loss = self.loss_cfg["l1"] * (mae_A2B + mae_B2A)
            if w_grad > 0:
                grad = gradient_l1(fake_B, real_B) + gradient_l1(fake_A, real_A)
                loss = loss + w_grad * grad
                out["gradient"] = grad.detach()
            if w_tp > 0 and self.wants_next_slice:
                # through-plane: the change to the next slice, synthetic against real
                next_B = self.G_A2B(batch["A_next" + STACK_SUFFIX])
                next_A = self.G_B2A(batch["B_next" + STACK_SUFFIX])
                tp = (l1(next_B - fake_B, batch["B_next"] - real_B)
                      + l1(next_A - fake_A, batch["A_next"] - real_A))
                loss = loss + w_tp * tp
                out["through_plane"] = tp.detach()
        ctx.step("G", loss)
        return {"G": loss.detach(), "mae_A2B": mae_A2B.detach(), "mae_B2A": mae_B2A.detach(),
                **out}


def check_direction(direction: str) -> str:
    """``A2B``/``B2A`` by :func:`parse_direction`'s rule (a model knows no contrast names)."""
    return parse_direction(direction)


def set_requires_grad(nets: list[nn.Module] | tuple[nn.Module, ...], flag: bool) -> None:
    """Freeze discriminators during the generator step (saves their weight gradients)."""
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


# ---------------------------------------------------------------------- losses (fp32)
def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error computed in fp32 whatever the autocast dtype."""
    return F.l1_loss(pred.float(), target.float())


def gradient_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Gradient-difference loss: the L1 distance between the in-plane finite differences of
    ``pred`` and ``target`` (rows and columns, each a mean; fp32).

    L1 alone is minimised by a blurred prediction while a network is still unsure where an
    edge lies; matching the images' differences as well rewards edges that are as sharp as
    the target's and in the right place (Mathieu et al., ICLR 2016; for MR/CT synthesis,
    Nie et al., MICCAI 2017). At cpu-small's budget it lowered the validation MAE of the
    paired models (docs/training.md)."""
    p, t = pred.float(), target.float()
    return (F.l1_loss(p[..., 1:, :] - p[..., :-1, :], t[..., 1:, :] - t[..., :-1, :])
            + F.l1_loss(p[..., :, 1:] - p[..., :, :-1], t[..., :, 1:] - t[..., :, :-1]))


#: ``cpu-small``'s gradient-difference weight as a multiple of a paired model's L1 weight
#: (chosen on a validation split: benchmarks/tune_cpu_small.py, round 7); ``paper``: off.
GRADIENT_PER_L1 = 5.0


def preset_gradient(preset: str, l1_weight: float) -> float:
    """``loss.gradient`` of ``preset`` for a model whose paired L1 term weighs ``l1_weight``
    (0 for an unpaired model, whose weight is 0)."""
    return GRADIENT_PER_L1 * l1_weight if preset == "cpu-small" else 0.0


def gradient_problems(loss: dict[str, Any], paired: bool) -> list[str]:
    """What is wrong with ``loss.gradient`` (absent is fine: off); ``paired`` says whether
    the model has an aligned target to compare edges with."""
    w = loss.get("gradient", 0.0)
    if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
        return ["loss.gradient must be a number >= 0 (0: off)"]
    if w > 0 and not paired:
        return ["loss.gradient compares the synthetic image's edges with the paired target's, "
                "so it needs a paired model (or loss.supervised > 0 for cyclegan)"]
    return []


def gan_loss(pred: Tensor, real: bool, mode: str) -> Tensor:
    """Adversarial loss on discriminator outputs: ``lsgan`` (MSE) or ``vanilla`` (BCE on logits)."""
    pred = pred.float()
    target = torch.ones_like(pred) if real else torch.zeros_like(pred)
    if mode == "lsgan":
        return F.mse_loss(pred, target)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, target)
    raise ConfigError(f"Unknown GAN loss {mode!r}; use 'lsgan' or 'vanilla'.")


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[TranslationModel]] = {}
_LOADED = False


def register_model(cls: type[TranslationModel]) -> type[TranslationModel]:
    """Class decorator: make a model available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"model name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of this package once, so their decorators register the models."""
    global _LOADED
    if _LOADED:
        return
    import mrsynth.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "blocks"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def model_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def get_model_class(name: str) -> type[TranslationModel]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"Unknown model {name!r}. Available models: {', '.join(model_names())} "
            "(`mrsynth models` describes them)."
        ) from None


def build_model(config: dict[str, Any]) -> TranslationModel:
    """Instantiate the model named in a resolved config."""
    return get_model_class(config["model"])(config)
