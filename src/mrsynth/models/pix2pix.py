"""pix2pix (Isola et al. 2017) in both directions: a paired conditional GAN.

Beyond the study: the supervised GAN its related work used. Each direction has the ResNet
generator of the CycleGAN and a PatchGAN that judges the (input, output) pair stacked as two
channels; generator loss = GAN + 100 * L1 to the aligned target, discriminator loss halved.
In 2.5-D (``arch.context_slices`` = k) the condition is the generator's whole input, the
2k + 1 neighbouring source slices, so the discriminator has 2k + 2 channels: it can then
reject an output that contradicts the neighbours (a structure no neighbouring slice shows),
which is the through-plane error 2.5-D is for; judged against the centre slice alone, the
generator would know more than its critic.
The original paper's non-saturating (BCE) GAN loss is the default (``loss.gan_mode``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mrsynth.models.base import (
    StepContext,
    gan_loss,
    gradient_l1,
    gradient_problems,
    l1,
    preset_gradient,
    register_model,
    set_requires_grad,
)
from mrsynth.models.blocks import PatchDiscriminator
from mrsynth.models.cyclegan import ResnetGanPair, resnet_preset


@register_model
class Pix2Pix(ResnetGanPair):
    """Conditional GAN per direction with L1 x100 to the paired target."""

    name = "pix2pix"
    needs_paired = True
    summary = "pix2pix both ways: ResNet G, conditional PatchGAN, L1 x100 (beyond the study)"
    order = 60
    discriminator_names = ("D_A2B", "D_B2A")
    conditional = True
    D_A2B: PatchDiscriminator
    D_B2A: PatchDiscriminator

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        return resnet_preset(preset, {"gan_mode": "vanilla", "l1": 100.0,
                                      "gradient": preset_gradient(preset, 100.0)},
                             paired=True)

    @classmethod
    def config_problems(cls, cfg: dict[str, Any]) -> list[str]:
        return super().config_problems(cfg) + gradient_problems(cfg["loss"], paired=True)

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        real_A, real_B = batch["A"], batch["B"]
        # the condition is the generator's whole input (the stack in 2.5-D)
        in_A, in_B = self.source(batch, "A"), self.source(batch, "B")
        mode, w = self.loss_cfg["gan_mode"], self.loss_cfg["l1"]
        set_requires_grad((self.D_A2B, self.D_B2A), False)
        with ctx.autocast():
            fake_B = self.G_A2B(in_A)
            fake_A = self.G_B2A(in_B)
            adv = (gan_loss(self.D_A2B(torch.cat((in_A, fake_B), 1)), True, mode)
                   + gan_loss(self.D_B2A(torch.cat((in_B, fake_A), 1)), True, mode))
            mae_A2B = l1(fake_B, real_B)
            mae_B2A = l1(fake_A, real_A)
            loss_G = adv + w * (mae_A2B + mae_B2A)
            w_grad = float(self.loss_cfg.get("gradient", 0.0))
            if w_grad > 0:
                grad = gradient_l1(fake_B, real_B) + gradient_l1(fake_A, real_A)
                loss_G = loss_G + w_grad * grad
        ctx.step("G", loss_G)

        set_requires_grad((self.D_A2B, self.D_B2A), True)
        fake_A, fake_B = fake_A.detach(), fake_B.detach()
        with ctx.autocast():
            d_A2B = 0.5 * (gan_loss(self.D_A2B(torch.cat((in_A, real_B), 1)), True, mode)
                           + gan_loss(self.D_A2B(torch.cat((in_A, fake_B), 1)), False, mode))
            d_B2A = 0.5 * (gan_loss(self.D_B2A(torch.cat((in_B, real_A), 1)), True, mode)
                           + gan_loss(self.D_B2A(torch.cat((in_B, fake_A), 1)), False, mode))
        ctx.step("D", d_A2B + d_B2A)
        losses = {"G": loss_G, "G_adv": adv, "mae_A2B": mae_A2B, "mae_B2A": mae_B2A,
                  "D_A2B": d_A2B, "D_B2A": d_B2A}
        if w_grad > 0:
            losses["gradient"] = grad
        return {k: v.detach().float() for k, v in losses.items()}
