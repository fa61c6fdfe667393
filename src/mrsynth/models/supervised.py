"""Generators_s: the CycleGAN generators trained with MAE against the paired target only.

No discriminator, no cycle loss: the study's test of how much the adversarial and cycle
terms add over plain supervised regression with the same 24-layer network.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mrsynth.models.base import PairedL1Model, preset_gradient, register_model
from mrsynth.models.blocks import build_generator
from mrsynth.models.cyclegan import resnet_preset


@register_model
class GeneratorsSupervised(PairedL1Model):
    """Two ResNet generators (A->B, B->A), each trained with L1 to the aligned target."""

    name = "generators_s"
    summary = "CycleGAN generators only, MAE to the paired target, no GAN/cycle (the study)"
    order = 40

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        # cpu-small adds the gradient-difference term; paper keeps the study's MAE alone
        cfg = resnet_preset(preset, {"l1": 1.0, "through_plane": 0.0,
                                     "gradient": preset_gradient(preset, 1.0)},
                            paired=True)
        for key in ("ndf", "d_layers"):
            cfg["arch"].pop(key)
        return cfg

    def make_generator(self) -> nn.Module:
        return build_generator(self.arch, self.in_channels)
