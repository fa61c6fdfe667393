"""Training-time augmentation: left-right flips and a random gamma of the generators' inputs.

Why: a demo-sized training set has a handful of subjects, most from one or two scanners, and
a network trained on them a few hundred steps longer gets worse on a subject from another
study (benchmarks/tune_cpu_small.py, docs/evaluation.md). Two cheap, label-preserving changes
widen what it sees:

* **Flip** (``train.augment_flip`` = p): each training example is mirrored left-right with
  probability p, every image of it at once (source, target, 2.5-D neighbours), so a paired
  example stays aligned. Brains are nearly symmetric; the axial slices keep their
  orientation otherwise.
* **Gamma** (``train.augment_gamma`` = s): each example's generator *input* (the source
  slice or its stack of neighbours, never a target or a discriminator's real image) becomes
  ``2 ((x + 1) / 2) ** g - 1`` with ``ln g ~ N(0, s^2)``, one g per example and domain. The
  intensities of the prepared slices run from -1 (background) to 1; the map keeps both ends
  and bends the contrast between, as another scanner or protocol would. The network then
  learns to translate the anatomy rather than one study's intensity curve.

Every random number is drawn up front per epoch from one ``torch.Generator`` (its state is
checkpointed with the row and patch samplers), so a resumed run draws the same
augmentation; each step's parameters are one row of a (steps, batch, 3) tensor: flip flag,
ln g of A, ln g of B. Data-parallel ranks shard it like the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mrsynth.data.context import STACK_SUFFIX
from mrsynth.errors import ConfigError

#: Suffix of the augmented generator input of a 2-D domain (``A_source``): the model reads
#: it instead of ``A`` (the target and the discriminators' real image stay ``A``).
SOURCE_SUFFIX = "_source"

#: Offset of the augmentation generator's seed from the run's seed.
AUGMENT_SEED_OFFSET = 7_919


class Augmenter:
    """Draws each epoch's augmentation parameters from a seeded generator."""

    def __init__(self, flip: float, gamma: float, seed: int) -> None:
        if not 0.0 <= float(flip) <= 1.0:
            raise ConfigError(f"train.augment_flip must be a probability in [0, 1], not {flip}.")
        if not 0.0 <= float(gamma) <= 2.0:
            raise ConfigError(
                f"train.augment_gamma must be in [0, 2] (the std of ln gamma), not {gamma}.")
        self.flip, self.gamma = float(flip), float(gamma)
        self.generator = torch.Generator().manual_seed(int(seed) + AUGMENT_SEED_OFFSET)

    def draw(self, steps: int, batch: int) -> Tensor:
        """(steps, batch, 3) float32: flip flag (0/1), ln gamma of A's input, of B's input.
        Always the same number of draws, so the stream does not depend on the settings'
        values."""
        g = self.generator
        u = torch.rand(steps, batch, generator=g, dtype=torch.float64)
        n = torch.randn(steps, batch, 2, generator=g, dtype=torch.float64)
        flip = (u < self.flip).to(torch.float64)
        return torch.cat([flip[..., None], n * self.gamma], dim=-1).to(torch.float32)

    @property
    def switches(self) -> tuple[bool, bool]:
        """(flip on, gamma on): which maps :func:`augment_batch` applies."""
        return self.flip > 0, self.gamma > 0

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def apply_gamma(x: Tensor, log_gamma: Tensor) -> Tensor:
    """``2 ((x + 1) / 2) ** g - 1`` per example (``log_gamma`` (N,)); -1 and 1 stay put."""
    g = torch.exp(log_gamma.to(x.dtype)).view(-1, 1, 1, 1)
    return ((x + 1) * 0.5).clamp(0.0, 1.0).pow(g) * 2 - 1


def augment_batch(batch: dict[str, Tensor], params: Tensor, *, flip: bool = True,
                  gamma: bool = True) -> dict[str, Tensor]:
    """The batch with one step's augmentation (``params`` (N, 3), see :class:`Augmenter`).

    Flips every image of a flagged example; adds the gamma-mapped generator inputs: a 2.5-D
    stack (``A_stack``, ``A_next_stack``: inputs only) is replaced, a 2-D slice gets a
    separate ``A_source`` (``A`` itself is also a target). ``flip``/``gamma`` say which are on
    (from the config, so the step never waits on the device to find out)."""
    out = dict(batch)
    if flip:
        flagged = (params[:, 0] > 0.5).view(-1, 1, 1, 1)
        out = {k: torch.where(flagged, x.flip(-1), x) for k, x in out.items()}
    if gamma:
        for col, dom in ((1, "A"), (2, "B")):
            lg = params[:, col]
            for k in [k for k in out if k.startswith(dom) and k.endswith(STACK_SUFFIX)]:
                out[k] = apply_gamma(out[k], lg)
            if dom + STACK_SUFFIX not in out:
                out[dom + SOURCE_SUFFIX] = apply_gamma(out[dom], lg)
    return out
