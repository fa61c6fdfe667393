"""Simple: the study's baseline of two convolutional layers per direction.

A 1x1 conv to 256 channels, ReLU, then a 5x5 conv to one channel (the study's files used 1x1
in one place and 5x5 in another; the 5x5 version can use some neighbourhood). Linear output,
no tanh, as in the study. Trained with MAE and Keras' default Adam (lr 1e-3, betas 0.9/0.999),
200 epochs at a constant rate.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mrsynth.models.base import PairedL1Model, register_model


class SimpleNet(nn.Module):
    def __init__(self, hidden: int = 256, kernel: int = 5) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel, padding=kernel // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@register_model
class Simple(PairedL1Model):
    """Two-layer baseline, one network per direction."""

    name = "simple"
    summary = "Baseline: 1x1 conv 256 + ReLU + 5x5 conv, MAE to the paired target (the study)"
    order = 50

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        return {
            "arch": {"hidden": 256, "kernel": 5},
            "loss": {"l1": 1.0},
            "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0},
            "train": {"epochs": 200 if preset == "paper" else 10, "lr_decay": "none"},
        }

    def make_generator(self) -> nn.Module:
        return SimpleNet(self.arch["hidden"], self.arch["kernel"])
