"""An exponential moving average of the model's weights (``train.ema``), the weights a run
publishes.

Why: at a small budget the weights after any one step are noisy. On the demo's validation
subject a paired U-Net's in-brain MAE swings by about 0.05 from one epoch to the next, and
by 10 % between seeds, so the best-epoch choice is a lottery over that noise.
An average over the last few dozen steps (Polyak averaging; the weight average StyleGAN and
most diffusion models publish) sits near the low end of the swings at no extra
compute: one ``lerp`` per tensor per step.

After step ``n`` (1, 2, ...) the average moves towards the live weights by ``1 - d`` with
``d = min(decay, n / (n + 9))``. The warm-up keeps the random initial weights from lingering
in short runs. Every floating tensor of ``model.state_dict()`` is averaged (discriminators
too: simpler than knowing which networks translate, and their average is never used). The
average is what validation, the sample grids, ``translate``, ``evaluate`` and ``export`` use. The
live weights are what training continues from: a checkpoint stores both, the average under
the prefix ``ema.`` in ``weights.safetensors`` (:func:`split_average`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: Key prefix of the averaged weights in a checkpoint's ``weights.safetensors``.
PREFIX = "ema."


class WeightAverage:
    """The moving average of ``model``'s floating weights (kept on the model's device)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"train.ema must be in (0, 1), not {decay}")
        self.decay = float(decay)
        # state_dict tensors share storage with the parameters: they see every update
        self.live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.shadow = {k: v.detach().clone() for k, v in self.live.items()}
        # the per-step update's argument lists, built once (same order, same tensors)
        self._pairs = (list(self.shadow.values()), list(self.live.values()))

    def rate(self, iteration: int) -> float:
        """The share of the old average kept after step ``iteration`` (1-based)."""
        n = max(int(iteration), 1)
        return min(self.decay, n / (n + 9))

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Average in the live weights after step ``iteration``."""
        torch._foreach_lerp_(*self._pairs, 1.0 - self.rate(iteration))

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own after it (bit
        for bit)."""
        backup = {k: v.clone() for k, v in self.live.items()}
        try:
            for k, v in self.live.items():
                v.copy_(self.shadow[k])
            yield
        finally:
            for k, v in self.live.items():
                v.copy_(backup[k])

    def tensors(self) -> dict[str, Tensor]:
        """The average as checkpoint entries (``ema.<name>``)."""
        return {PREFIX + k: v for k, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, averaged: dict[str, Tensor]) -> None:
        """Restore the average from a checkpoint's entries (names without the prefix)."""
        if set(averaged) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(averaged))[:3]
            extra = sorted(set(averaged) - set(self.shadow))[:3]
            raise ValueError(f"the averaged weights do not fit the model (missing {missing}, "
                             f"unexpected {extra})")
        for k, v in self.shadow.items():
            v.copy_(averaged[k])


def split_average(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor],
                                                       dict[str, Tensor] | None]:
    """A checkpoint's tensors as (the live weights, the average without its prefix, or None
    for a run without ``train.ema``)."""
    live = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    avg = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return live, (avg or None)


def published(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights a run publishes: the live ones with the average in place where there is
    one (what ``load_run`` loads for translation)."""
    live, avg = split_average(tensors)
    return live if avg is None else {**live, **avg}
