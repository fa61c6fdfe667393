"""CycleGAN (unpaired) and CycleGAN_s (CycleGAN plus a supervised MAE term), as in the study.

Two ResNet generators (A->B, B->A) and two 70x70 PatchGAN discriminators, LSGAN losses,
cycle-consistency L1 with weight 10 each way, discriminator loss halved, image pools of 50.
``arch.discriminator=study2018`` swaps in the discriminator of the study's code at the
paper's time (receptive field 94, sigmoid before the least-squares loss); docs/models.md
says why the 70x70 PatchGAN stays the default.

One deliberate difference from the study's Keras loop: the generators are updated first and
the discriminators then see the same (detached) synthetic images, so each iteration runs
the generators forward once instead of twice. The study also stepped each discriminator
separately on real and synthetic batches; here one step sees ``0.5 * (real + fake)``.

2.5-D (``arch.context_slices`` = k): the generators take the 2k + 1 neighbouring slices
and output one; the discriminators judge that one slice as in 2-D; the cycle's second
pass gets the translated slice repeated in every channel and the identity term the other
domain's real stack.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mrsynth.models.base import (
    GeneratorPairModel,
    StepContext,
    gan_loss,
    gradient_l1,
    gradient_problems,
    l1,
    preset_gradient,
    register_model,
    set_requires_grad,
)
from mrsynth.models.blocks import (
    DISCRIMINATORS,
    ImagePool,
    PatchDiscriminator,
    build_generator,
    init_weights,
    make_discriminator,
)

#: Architecture and optimiser settings shared by the ResNet-generator models.
RESNET_ARCH = {
    "paper": {"ngf": 32, "n_blocks": 9, "ndf": 64, "d_layers": 3, "norm": "instance",
              "init": "normal", "context_slices": 0, "upsample": "transpose",
              "generator": "resnet", "intensity_channels": 0},
    "cpu-small": {"ngf": 16, "n_blocks": 3, "ndf": 16, "d_layers": 3, "norm": "instance",
                  "init": "normal", "context_slices": 0, "upsample": "transpose",
                  "generator": "resnet", "intensity_channels": 0},
}
#: Adam: the study's step for ``paper``; ``cpu-small``'s short runs (1,000 steps in the demo)
#: learn faster at 5e-4, chosen on a validation split (benchmarks/tune_cpu_small.py).
GAN_OPTIM = {
    "paper": {"lr": 2e-4, "beta1": 0.5, "beta2": 0.999, "weight_decay": 0.0},
    "cpu-small": {"lr": 5e-4, "beta1": 0.5, "beta2": 0.999, "weight_decay": 0.0},
}
#: 200 epochs, linear decay to zero over the second half (from epoch 101, the study).
GAN_TRAIN = {
    "paper": {"epochs": 200, "lr_decay": "linear", "decay_start_epoch": None},
    "cpu-small": {"epochs": 10, "lr_decay": "linear", "decay_start_epoch": None},
}


#: ``cpu-small``'s generator for the paired models: a U-Net with resize convolutions, trained
#: on whole slices. At the demo's budget the ResNet's outputs stay blurred; the U-Net lowered
#: the validation MAE of generators_s, pix2pix and cyclegan_s (round 9 of
#: benchmarks/tune_cpu_small.py, docs/evaluation.md). Trained on 64 px patches and applied to
#: whole slices it painted the background grey: its instance norms' statistics over a slice
#: that is mostly background differ from those over a brain-centred patch; on whole slices
#: (the same pixels per run) they agree. Unpaired CycleGAN did far worse with the U-Net (its
#: validation MAE 45-65 % above the intensity lookup table), so it keeps the study's ResNet.
PAIRED_CPU_SMALL_GENERATOR = {"generator": "unet", "upsample": "resize"}


def resnet_preset(preset: str, loss: dict[str, Any],
                  paired: bool = False) -> dict[str, dict[str, Any]]:
    """The ResNet-generator models' preset sections; ``paired``: the model learns from an
    aligned target (at ``cpu-small`` it then gets :data:`PAIRED_CPU_SMALL_GENERATOR`).

    At ``cpu-small`` every one of them trains on whole slices instead of 64-px patches: the
    paired U-Nets since round 9, unpaired CycleGAN since round 10 of
    benchmarks/tune_cpu_small.py. On patches its synthetic background came out wrong on
    whole slices (whole-image MAE 1.3-1.5 on the demo's test subjects, for the instance-norm
    reason above); on whole slices at the same pixels per run it scored better inside the
    brain on the validation subject with both seeds tried, and its whole-image MAE fell to
    0.18-0.29."""
    arch, train = dict(RESNET_ARCH[preset]), dict(GAN_TRAIN[preset])
    if preset == "cpu-small":
        train["patch_size"] = None
        if paired:
            arch.update(PAIRED_CPU_SMALL_GENERATOR)
    return {"arch": arch, "loss": dict(loss), "optim": dict(GAN_OPTIM[preset]), "train": train}


class ResnetGanPair(GeneratorPairModel):
    """Two ResNet generators and two PatchGANs, one optimiser for each pair.

    The layout CycleGAN and pix2pix share; they differ in what a discriminator judges.
    Subclasses name the discriminators (the names key the checkpoints) and say whether they
    are conditional: an unconditional one judges an image alone (1 channel), a conditional
    one an (input, output) pair stacked as channels (the generator's input channels + 1).
    The generators take :attr:`in_channels` (2k + 1 in 2.5-D).
    """

    discriminator_names: ClassVar[tuple[str, str]]
    conditional: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        a = self.arch
        c = self.in_channels
        self.G_A2B = build_generator(a, c)
        self.G_B2A = build_generator(a, c)
        # Only the CycleGAN family has the setting (pix2pix's BCE needs logits, no sigmoid).
        kind = a.get("discriminator", "patchgan")
        d_in = c + 1 if self.conditional else 1
        for name in self.discriminator_names:
            d = make_discriminator(kind, d_in, a["ndf"], a["d_layers"], a["norm"])
            self.add_module(name, d)
        init_weights(self, a["init"])

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        nets = [self.get_submodule(name) for name in self.discriminator_names]
        return {
            "G": self.adam(self.generator_parameters()),
            "D": self.adam([p for d in nets for p in d.parameters()]),
        }


@register_model
class CycleGAN(ResnetGanPair):
    """Unpaired CycleGAN with the study's generator (24 conv layers) and PatchGAN."""

    name = "cyclegan"
    needs_paired = False
    summary = "CycleGAN, unpaired: cycle L1 x10, LSGAN, image pool 50 (the study)"
    order = 10
    supervised_default = 0.0
    discriminator_names = ("D_A", "D_B")
    D_A: PatchDiscriminator
    D_B: PatchDiscriminator

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        loss = {
            "gan_mode": "lsgan",
            "cycle": 10.0,
            "identity": 0.0,
            "supervised": cls.supervised_default,
            # gradient-difference term against the paired target (cyclegan_s at cpu-small)
            "gradient": preset_gradient(preset, cls.supervised_default),
            "pool_size": 50,
        }
        cfg = resnet_preset(preset, loss, paired=cls.supervised_default > 0)
        cfg["arch"]["discriminator"] = "patchgan"
        return cfg

    @classmethod
    def config_problems(cls, cfg: dict[str, Any]) -> list[str]:
        problems = super().config_problems(cfg)
        # types are checked before the values (validate_config): supervised is a number
        problems += gradient_problems(cfg["loss"], paired=cfg["loss"]["supervised"] > 0)
        kind, mode = cfg["arch"]["discriminator"], cfg["loss"]["gan_mode"]
        if kind not in DISCRIMINATORS:
            problems.append(f"arch.discriminator must be one of {', '.join(DISCRIMINATORS)}")
        elif kind == "study2018" and mode != "lsgan":
            problems.append("arch.discriminator=study2018 ends in a sigmoid and so needs "
                            "loss.gan_mode=lsgan (the study's least-squares loss)")
        return problems

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        seed = int(config.get("seed", 0))
        pool = int(self.loss_cfg["pool_size"])
        self.pool_A = ImagePool(pool, seed=seed + 1)
        self.pool_B = ImagePool(pool, seed=seed + 2)

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        real_A, real_B = batch["A"], batch["B"]
        w = self.loss_cfg
        mode = w["gan_mode"]
        in_A, in_B = self.source(batch, "A"), self.source(batch, "B")
        set_requires_grad((self.D_A, self.D_B), False)
        with ctx.autocast():
            fake_B = self.G_A2B(in_A)
            fake_A = self.G_B2A(in_B)
            rec_A = self.G_B2A(self.flat_stack(fake_B))
            rec_B = self.G_A2B(self.flat_stack(fake_A))
            adv_A2B = gan_loss(self.D_B(fake_B), True, mode)
            adv_B2A = gan_loss(self.D_A(fake_A), True, mode)
            cycle = l1(rec_A, real_A) + l1(rec_B, real_B)
            loss_G = adv_A2B + adv_B2A + w["cycle"] * cycle
            losses = {"G_adv_A2B": adv_A2B, "G_adv_B2A": adv_B2A, "cycle": cycle}
            if w["identity"] > 0:
                ident = l1(self.G_A2B(in_B), real_B) + l1(self.G_B2A(in_A), real_A)
                loss_G = loss_G + w["identity"] * ident
                losses["identity"] = ident
            if w["supervised"] > 0:
                sup = l1(fake_B, real_B) + l1(fake_A, real_A)
                loss_G = loss_G + w["supervised"] * sup
                losses["supervised"] = sup
            if w.get("gradient", 0.0) > 0:
                grad = gradient_l1(fake_B, real_B) + gradient_l1(fake_A, real_A)
                loss_G = loss_G + w["gradient"] * grad
                losses["gradient"] = grad
        ctx.step("G", loss_G)

        set_requires_grad((self.D_A, self.D_B), True)
        pooled_A = self.pool_A.query(fake_A)
        pooled_B = self.pool_B.query(fake_B)
        with ctx.autocast():
            loss_D_A = 0.5 * (gan_loss(self.D_A(real_A), True, mode)
                              + gan_loss(self.D_A(pooled_A), False, mode))
            loss_D_B = 0.5 * (gan_loss(self.D_B(real_B), True, mode)
                              + gan_loss(self.D_B(pooled_B), False, mode))
        ctx.step("D", loss_D_A + loss_D_B)
        losses.update(G=loss_G, D_A=loss_D_A, D_B=loss_D_B)
        return {k: v.detach().float() for k, v in losses.items()}

    def aux_state_dict(self) -> dict[str, Any]:
        return {"pool_A": self.pool_A.state_dict(), "pool_B": self.pool_B.state_dict()}

    def load_aux_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        self.pool_A.load_state_dict(state["pool_A"], device)
        self.pool_B.load_state_dict(state["pool_B"], device)


@register_model
class CycleGANSupervised(CycleGAN):
    """CycleGAN_s: CycleGAN plus MAE against the aligned ground truth (weight 10 each way)."""

    name = "cyclegan_s"
    needs_paired = True
    summary = "CycleGAN + supervised MAE x10 against the paired target (the study)"
    order = 20
    supervised_default = 10.0
