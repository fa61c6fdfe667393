"""Generators_s: the CycleGAN generators trained with MAE against the paired target only.

No discriminator, no cycle loss: the study's test of how much the adversarial and cycle
terms add over plain supervised regression with the same 24-layer network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mrsynth.models.base import StepContext, TranslationModel, check_direction, l1, register_model
from mrsynth.models.blocks import ResnetGenerator, init_weights
from mrsynth.models.cyclegan import resnet_preset


@register_model
class GeneratorsSupervised(TranslationModel):
    """Two ResNet generators (A->B, B->A), each trained with L1 to the aligned target."""

    name = "generators_s"
    needs_paired = True
    summary = "CycleGAN generators only, MAE to the paired target, no GAN/cycle (the study)"
    order = 40

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        cfg = resnet_preset(preset, {"l1": 1.0})
        for key in ("ndf", "d_layers"):
            cfg["arch"].pop(key)
        return cfg

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        a = self.arch
        self.G_A2B = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"])
        self.G_B2A = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"])
        init_weights(self)

    def generator(self, direction: str) -> nn.Module:
        return self.G_A2B if check_direction(direction) == "A2B" else self.G_B2A

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.adam([*self.G_A2B.parameters(), *self.G_B2A.parameters()])}

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        real_A, real_B = batch["A"], batch["B"]
        with ctx.autocast():
            mae_A2B = l1(self.G_A2B(real_A), real_B)
            mae_B2A = l1(self.G_B2A(real_B), real_A)
            loss = self.loss_cfg["l1"] * (mae_A2B + mae_B2A)
        ctx.step("G", loss)
        return {"G": loss.detach(), "mae_A2B": mae_A2B.detach(), "mae_B2A": mae_B2A.detach()}
