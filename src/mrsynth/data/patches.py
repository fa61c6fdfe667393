"""Random training patches cropped from full-resolution slices.

Why: the generators and the PatchGAN/UNIT discriminators are fully convolutional, so they
can learn from small windows of full-resolution slices and translate whole slices at
inference. A step then costs what a small image costs without throwing away the detail
that downsampling whole slices loses (which is what kept the ``cpu-small`` models from
beating an intensity lookup table; see docs/evaluation.md).

Most patches should show brain, not background: with probability ``brain_fraction`` a
patch is centred on a brain-mask voxel of its slice drawn uniformly (so larger brain
regions get proportionally more patches), otherwise its position is uniform over the
slice. Windows are clamped inside the slice; a slice without brain voxels always gets a
uniform window.

Every random number comes from one ``torch.Generator`` owned by the sampler, so the
sampler's whole state is :meth:`PatchSampler.get_state` (checkpointed with the run) and a
resumed run crops the same windows. Paired models crop the same window from the source and
target slice (:meth:`PatchSampler.draw` returns one set of windows for aligned rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mrsynth.errors import ConfigError


def patch_shape(size: tuple[int, int], patch_size: int | None) -> tuple[int, int]:
    """The (h, w) of the patches for slices of ``size``: ``patch_size`` a side, never larger
    than the slice (None: the whole slice)."""
    h, w = int(size[0]), int(size[1])
    if patch_size is None:
        return h, w
    return min(int(patch_size), h), min(int(patch_size), w)


class _BrainVoxels:
    """Flat in-slice indices of every slice's brain voxels, concatenated (CSR-like)."""

    def __init__(self, masks: np.ndarray) -> None:
        m = np.asarray(masks, dtype=bool)
        if m.ndim != 3:
            raise ConfigError(f"brain masks must be shaped (N, H, W), got {m.shape}")
        n, h, w = m.shape
        flat = m.reshape(n, h * w)
        rows, cols = np.nonzero(flat)  # row-major: grouped by slice, sorted
        self.index = torch.from_numpy(cols.astype(np.int64))
        counts = np.bincount(rows, minlength=n).astype(np.int64)
        self.count = torch.from_numpy(counts)
        self.start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(
            np.int64))
        self.n, self.h, self.w = n, h, w


class PatchSampler:
    """Crop windows (top, left) for training rows, drawn from a seeded generator.

    ``masks_a``/``masks_b`` are the brain masks (N, H, W) of the A and B training rows (the
    same rows for paired data: pass ``masks_b=None``). ``draw`` takes the rows of one epoch
    (any shape, e.g. (steps, batch)) and returns windows shaped ``rows.shape + (2,)``.
    """

    def __init__(self, masks_a: np.ndarray, masks_b: np.ndarray | None, patch_size: int,
                 brain_fraction: float, seed: int) -> None:
        if int(patch_size) < 1:
            raise ConfigError(f"train.patch_size must be a positive integer, not {patch_size}.")
        if not 0.0 <= float(brain_fraction) <= 1.0:
            raise ConfigError(
                f"train.patch_brain_fraction must be in [0, 1], not {brain_fraction}.")
        self.voxels_a = _BrainVoxels(masks_a)
        self.voxels_b = None if masks_b is None else _BrainVoxels(masks_b)
        if self.voxels_b is not None and (self.voxels_b.h, self.voxels_b.w) != (
                self.voxels_a.h, self.voxels_a.w):
            raise ConfigError("A and B slices must have one size for patch training.")
        self.size = (self.voxels_a.h, self.voxels_a.w)
        self.patch = patch_shape(self.size, int(patch_size))
        self.brain_fraction = float(brain_fraction)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def paired(self) -> bool:
        return self.voxels_b is None

    def _windows(self, vox: _BrainVoxels, rows: Tensor) -> Tensor:
        g, (ph, pw), (h, w) = self.generator, self.patch, self.size
        r = rows.reshape(-1).to(torch.int64)
        n = r.numel()
        # a fixed number of draws per window, whatever the branch: the stream stays aligned
        u_brain = torch.rand(n, generator=g, dtype=torch.float64)
        u_voxel = torch.rand(n, generator=g, dtype=torch.float64)
        top = torch.randint(0, h - ph + 1, (n,), generator=g)
        left = torch.randint(0, w - pw + 1, (n,), generator=g)
        count = vox.count[r]
        use_brain = (u_brain < self.brain_fraction) & (count > 0)
        if bool(use_brain.any()):
            k = torch.minimum((u_voxel * count).to(torch.int64), (count - 1).clamp(min=0))
            flat = vox.index[(vox.start[r] + k).clamp(max=max(vox.index.numel() - 1, 0))]
            cy = torch.div(flat, w, rounding_mode="floor")
            cx = flat - cy * w
            btop = (cy - ph // 2).clamp(0, h - ph)
            bleft = (cx - pw // 2).clamp(0, w - pw)
            top = torch.where(use_brain, btop, top)
            left = torch.where(use_brain, bleft, left)
        return torch.stack([top, left], dim=-1).reshape(*rows.shape, 2)

    def draw(self, rows_a: Tensor, rows_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Windows for A rows and B rows (int64, ``rows.shape + (2,)``). Paired: B's windows
        are A's (the same crop of the aligned target), and ``rows_b`` is ignored."""
        wa = self._windows(self.voxels_a, rows_a)
        if self.voxels_b is None:
            return wa, wa
        if rows_b is None:
            raise ValueError("unpaired patch sampling needs the B rows")
        return wa, self._windows(self.voxels_b, rows_b)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def crop(images: Tensor, rows: Tensor, windows: Tensor, patch: tuple[int, int]) -> Tensor:
    """Gather patches: ``images`` (N, C, H, W), ``rows`` (B,), ``windows`` (B, 2) top-left
    -> (B, C, ph, pw). One indexing op on the device, no Python loop over the batch."""
    ph, pw = patch
    dev = images.device
    rows = rows.to(dev)
    windows = windows.to(dev)
    ar_h = torch.arange(ph, device=dev)
    ar_w = torch.arange(pw, device=dev)
    rr = (windows[:, 0, None] + ar_h[None, :])[:, :, None]  # (B, ph, 1)
    cc = (windows[:, 1, None] + ar_w[None, :])[:, None, :]  # (B, 1, pw)
    out = images[rows[:, None, None], :, rr, cc]  # (B, ph, pw, C)
    return out.permute(0, 3, 1, 2).contiguous()
