"""Simple: the study's baseline of two convolutional layers per direction.

A 1x1 conv to 256 channels, ReLU, then a conv to one channel: 1x1 by default, as in the
study's CycleGAN file and as its discussion describes Simple ("only changes the pixel
intensity": a per-pixel intensity map with no spatial context); ``arch.out_kernel=5`` gives
the 5x5 version of the study's UNIT file, which sees a 5x5 neighbourhood. Linear output,
no tanh, as in the study. Trained with MAE and Keras' default Adam (lr 1e-3, betas
0.9/0.999), 200 epochs at a constant rate.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from mrsynth.models.base import PairedL1Model, preset_gradient, register_model


class SimpleNet(nn.Module):
    def __init__(self, hidden: int = 256, kernel: int = 1, in_channels: int = 1) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel, padding=kernel // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@register_model
class Simple(PairedL1Model):
    """Two-layer baseline, one network per direction."""

    name = "simple"
    summary = "Baseline: 1x1 conv 256 + ReLU + 1x1 conv, MAE to the paired target (the study)"
    order = 50

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        paper = preset == "paper"
        # cpu-small: Glorot init, a larger step and a linear decay converge within the demo's
        # budget (chosen on a validation split, benchmarks/tune_cpu_small.py); with paper's
        # settings 1,000 steps left the map far from the intensity lookup table
        return {
            "arch": {"hidden": 256, "out_kernel": 1, "init": "normal" if paper else "glorot",
                     "context_slices": 0},
            # cpu-small: + the gradient-difference term, as every paired model (validation:
            # 0.759 -> 0.637 in-brain MAE, docs/evaluation.md)
            "loss": {"l1": 1.0, "through_plane": 0.0, "gradient": preset_gradient(preset, 1.0)},
            "optim": {"lr": 1e-3 if paper else 3e-3, "beta1": 0.9, "beta2": 0.999,
                      "weight_decay": 0.0},
            "train": {"epochs": 200 if paper else 10,
                      "lr_decay": "none" if paper else "linear"},
        }

    @classmethod
    def config_problems(cls, cfg: dict[str, Any]) -> list[str]:
        problems = super().config_problems(cfg)
        k = cfg["arch"]["out_kernel"]
        if not (isinstance(k, int) and k >= 1 and k % 2 == 1):
            problems.append("arch.out_kernel must be an odd integer >= 1 (1 or 5 in the study)")
        return problems

    @classmethod
    def upgrade_stored_config(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """Runs written before ``out_kernel`` stored ``arch.kernel`` (then 5 by default);
        runs written before ``arch.init`` were initialised N(0, 0.02) ("normal"), whatever
        the preset's default is now (cpu-small's is Glorot)."""
        arch = stored.get("arch")
        if isinstance(arch, dict) and "kernel" in arch and "out_kernel" not in arch:
            stored = copy.deepcopy(dict(stored))
            stored["arch"]["out_kernel"] = stored["arch"].pop("kernel")
        arch = stored.get("arch")
        if isinstance(arch, dict) and "init" not in arch:
            stored = copy.deepcopy(dict(stored))
            stored["arch"]["init"] = "normal"
        return stored

    def make_generator(self) -> nn.Module:
        return SimpleNet(self.arch["hidden"], self.arch["out_kernel"], self.in_channels)
