"""Training slices as device tensors, and the per-epoch index sampler.

When the prepared slices of a run fit (the study's 900 + 900 slices at 304x256 are 560 MB
in fp32; ``train.data_on_device``) they are moved to the training device once and each batch
is a gather with indices drawn by a ``torch.Generator``: no DataLoader, no copies per step.
Otherwise the same indices select the slices a DataLoader reads from the store
(:mod:`mrsynth.train.loader`). The sampler's generator state is checkpointed, so a resumed
run sees the same order.
With ``train.patch_size`` each batch is a crop of the resident slices at windows drawn by a
:class:`~mrsynth.data.patches.PatchSampler` (:class:`EpochDraws` holds both generators).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mrsynth.data.augment import Augmenter
from mrsynth.data.patches import PatchSampler
from mrsynth.data.prepared import PreparedData
from mrsynth.errors import ConfigError, DataError


def internal_size(size: tuple[int, int], image_size: int | None) -> tuple[int, int]:
    """The size a run trains at: the prepared size, or downsampled so the longer side is at
    most ``image_size`` (sides rounded to multiples of 4 for the strided networks)."""
    h, w = size
    if image_size is None or max(h, w) <= image_size:
        return h, w
    s = image_size / max(h, w)
    return max(4, int(round(h * s / 4)) * 4), max(4, int(round(w * s / 4)) * 4)


def resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (N,C,H,W) slices; antialiased when shrinking so no aliasing enters training."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass
class TrainingSlices:
    """Images of the two contrasts (N,1,h,w) on the device; aligned rows when ``paired``.

    Streaming (``train.data_on_device`` false) leaves ``A``/``B`` None: batches are read from
    ``data`` at the store rows ``rows_A``/``rows_B`` (:mod:`mrsynth.train.loader`)."""

    A: Tensor | None
    B: Tensor | None
    paired: bool
    source_size: tuple[int, int]
    size: tuple[int, int]
    sample_A: Tensor
    sample_B: Tensor
    info: dict[str, Any]
    #: brain masks (N,h,w) of the rows of A and B, on the host: where patches are drawn
    mask_A: np.ndarray | None = None
    mask_B: np.ndarray | None = None
    #: 2.5-D (``arch.context_slices`` = k): each row's 2k+1 neighbouring rows of A and B
    #: (:func:`mrsynth.data.context.neighbour_table`), on the device; None in 2-D
    table_A: Tensor | None = None
    table_B: Tensor | None = None
    #: 2.5-D: the sample slices' stacks (n, 2k+1, h, w), the generators' inputs for the grid
    sample_in_A: Tensor | None = None
    sample_in_B: Tensor | None = None
    #: rows of the prepared data the training rows come from (row i of A is rows_A[i])
    rows_A: np.ndarray | None = None
    rows_B: np.ndarray | None = None
    #: the prepared data the batches are read from when streaming (else None)
    data: PreparedData | None = None

    @property
    def n_A(self) -> int:
        return int(self.rows_A.size) if self.rows_A is not None else int(self.A.shape[0])

    @property
    def n_B(self) -> int:
        return int(self.rows_B.size) if self.rows_B is not None else int(self.B.shape[0])


def training_bytes(data: PreparedData, contrasts: tuple[str, str], model_name: str,
                   needs_paired: bool, image_size: int | None) -> int:
    """Bytes the run's training slices take resident on the device (fp32, internal size)."""
    rows_a, rows_b, _ = select_training_slices(data, contrasts, model_name, needs_paired)
    h, w = internal_size(data.size, image_size)
    return int(rows_a.size + rows_b.size) * h * w * 4


def _describe(data: PreparedData) -> str:
    return str(data.path) if data.path else "the prepared data"


def select_training_slices(
    data: PreparedData,
    contrasts: tuple[str, str],
    model_name: str,
    needs_paired: bool,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Row indices of A and B training slices; paired models get aligned rows or an error."""
    a, b = contrasts
    data.require_contrasts(a, b)
    train = data.split == "train"
    if not train.any():
        raise DataError(
            f"{_describe(data)} has no training slices (splits: "
            f"{sorted(set(data.split.tolist()))}). Prepare it with some training subjects."
        )
    unpaired_file = bool(data.settings.get("unpaired", False))
    both = train & data.available[a] & data.available[b]
    if needs_paired:
        if unpaired_file or not both.any():
            why = (
                "was prepared as unpaired data (--unpaired)"
                if unpaired_file
                else f"has no training slice with both {a} and {b}"
            )
            raise DataError(
                f"Model {model_name!r} learns from aligned {a}/{b} pairs, but {_describe(data)} "
                f"{why}. Prepare paired data (co-registered {a} and {b} of the same subjects) "
                "or train an unpaired model (cyclegan or unit)."
            )
        rows = np.flatnonzero(both)
        return rows, rows, True
    rows_a = np.flatnonzero(train & data.available[a])
    rows_b = np.flatnonzero(train & data.available[b])
    for c, rows in ((a, rows_a), (b, rows_b)):
        if rows.size == 0:
            raise DataError(f"{_describe(data)} has no training slices of {c}.")
    return rows_a, rows_b, False


def _sample_rows(data: PreparedData, a: str, b: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed slices for the per-epoch image grid: paired validation slices when there are
    any (so nothing seen while training comes from the test split), else test, else train."""
    for split in ("val", "test", "train"):
        sel = np.flatnonzero((data.split == split) & data.available[a] & data.available[b])
        if sel.size:
            pick = sel[np.linspace(0, sel.size - 1, min(k, sel.size)).round().astype(int)]
            return pick, pick
    ra = np.flatnonzero(data.available[a])
    rb = np.flatnonzero(data.available[b])
    n = min(k, ra.size, rb.size)
    return ra[np.linspace(0, ra.size - 1, n).astype(int)], rb[np.linspace(0, rb.size - 1, n)
                                                              .astype(int)]


def load_training_slices(
    data: PreparedData,
    contrasts: tuple[str, str],
    model_name: str,
    needs_paired: bool,
    image_size: int | None,
    device: torch.device,
    channels_last: bool = False,
    n_samples: int = 4,
    context: int = 0,
    on_device: bool = True,
) -> TrainingSlices:
    """The run's training slices on ``device``; ``context`` > 0 (2.5-D) adds the neighbour
    tables of the rows and the sample slices' stacks (:mod:`mrsynth.data.context`).
    ``on_device`` False: only the masks, samples and row indices (batches are streamed)."""
    rows_a, rows_b, paired = select_training_slices(data, contrasts, model_name, needs_paired)
    a, b = contrasts
    src = data.size
    size = internal_size(src, image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def to_dev(c: str, rows: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(data.images[c][rows], dtype=np.float32))
        x = resample(x[:, None], size)
        return x.to(device).contiguous(memory_format=fmt)

    def masks(rows: np.ndarray) -> np.ndarray:
        m = np.asarray(data.mask[rows], dtype=bool)
        if tuple(m.shape[1:]) == tuple(size):
            return m
        x = resample(torch.from_numpy(m.astype(np.float32))[:, None], size)
        return (x[:, 0] > 0.5).numpy()

    sa, sb = _sample_rows(data, a, b, n_samples)
    info = {
        "n_train_A": int(rows_a.size),
        "n_train_B": int(rows_b.size),
        "paired": paired,
        "source_size": list(src),
        "internal_size": list(size),
        "train_subjects": sorted(set(data.subject[np.union1d(rows_a, rows_b)].tolist())),
    }
    stacks: dict[str, Any] = {}
    if context:
        stacks = _context_stacks(data, rows_a, rows_b, sa, sb, contrasts, context, info,
                                 to_dev, device)
    return TrainingSlices(
        A=to_dev(a, rows_a) if on_device else None,
        B=to_dev(b, rows_b) if on_device else None,
        paired=paired,
        source_size=src,
        size=size,
        sample_A=to_dev(a, sa),
        sample_B=to_dev(b, sb),
        info=info,
        mask_A=masks(rows_a),
        mask_B=masks(rows_b),
        **stacks,
        rows_A=rows_a,
        rows_B=rows_b,
        data=None if on_device else data,
    )


def _context_stacks(data: PreparedData, rows_a: np.ndarray, rows_b: np.ndarray,
                    sa: np.ndarray, sb: np.ndarray, contrasts: tuple[str, str], k: int,
                    info: dict[str, Any], to_dev: Any, device: torch.device) -> dict[str, Any]:
    """2.5-D: neighbour tables of the training rows (indices into them) and the sample
    slices' stacks; data whose slices have no kept neighbour at all are refused."""
    from mrsynth.data.context import as_tensor_table, exact_fraction, prepared_table

    tables = {}
    for key, rows in (("A", rows_a), ("B", rows_b)):
        tables[key] = prepared_table(data.subject[rows], data.slice_index[rows], k)
        exact = exact_fraction(tables[key], data.slice_index[rows])
        info[f"context_exact_fraction_{key}"] = round(exact, 4)
        if exact == 0.0:
            raise ConfigError(
                f"arch.context_slices={k} gives the generators each slice's neighbouring "
                f"slices, but no training slice of {_describe(data)} has a neighbour in the "
                "file (it was prepared with --slice-step > 1, a single --slices index, or from "
                "2-D images). Prepare every slice of the volumes (the default) or train with "
                "arch.context_slices=0."
            )
    info["context_slices"] = k
    everything = prepared_table(data.subject, data.slice_index, k)  # the samples' neighbours
    n = 2 * k + 1

    def sample_stack(c: str, rows: np.ndarray) -> Tensor:
        x = to_dev(c, everything[rows].reshape(-1))
        return x.reshape(rows.size, n, *x.shape[-2:])

    a, b = contrasts
    return {"table_A": as_tensor_table(tables["A"], device),
            "table_B": as_tensor_table(tables["B"], device),
            "sample_in_A": sample_stack(a, sa), "sample_in_B": sample_stack(b, sb)}


class EpochSampler:
    """Per-epoch batch indices.

    Paired: one shuffled order of the aligned rows. Unpaired: A and B shuffled independently,
    the smaller set repeated (reshuffled) to the size of the larger; an epoch has
    ``max(nA, nB) // batch`` steps (incomplete last batches are dropped so every step has the
    same shape), capped by ``max_steps``.
    """

    def __init__(
        self, n_a: int, n_b: int, paired: bool, batch_size: int, seed: int,
        max_steps: int | None = None,
    ) -> None:
        self.n_a, self.n_b, self.paired = n_a, n_b, paired
        self.batch = batch_size
        n = n_a if paired else max(n_a, n_b)
        if n < batch_size:
            raise ConfigError(
                f"Batch size {batch_size} is larger than the {n} training slices; use "
                f"--batch-size {n} or fewer."
            )
        self.steps = n // batch_size
        if max_steps is not None:
            self.steps = min(self.steps, max_steps)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _order(self, n: int, length: int) -> Tensor:
        reps = -(-length // n)
        return torch.cat([torch.randperm(n, generator=self.generator) for _ in range(reps)])[
            :length
        ]

    def draw(self) -> tuple[Tensor, Tensor]:
        """Indices for one epoch, each shaped (steps, batch)."""
        total = self.steps * self.batch
        if self.paired:
            ia = self._order(self.n_a, total)
            ib = ia
        else:
            length = max(self.n_a, self.n_b)
            ia = self._order(self.n_a, length)[:total]
            ib = self._order(self.n_b, length)[:total]
        return ia.view(self.steps, self.batch), ib.view(self.steps, self.batch)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class EpochDraws:
    """What one epoch trains on: batch rows (:class:`EpochSampler`), with patches the crop
    windows of every row (:class:`~mrsynth.data.patches.PatchSampler`), with augmentation
    every example's flip and gamma (:class:`~mrsynth.data.augment.Augmenter`).

    Every generator is drawn from at the start of an epoch, so the state taken before
    :meth:`draw` reproduces the whole epoch on resume. The state is the row sampler's tensor
    alone when there are neither patches nor augmentation (as checkpoints written before
    patches hold), else a dict with ``rows`` and ``patches`` and/or ``augment``.
    """

    def __init__(self, rows: EpochSampler, patches: PatchSampler | None = None,
                 augment: Augmenter | None = None) -> None:
        self.rows = rows
        self.patches = patches
        self.augment = augment

    @property
    def steps(self) -> int:
        return self.rows.steps

    def draw(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(ia, ib, wa, wb, aug): rows (steps, batch), windows (steps, batch, 2) or None,
        augmentation parameters (steps, batch, 3) or None."""
        ia, ib = self.rows.draw()
        wa = wb = aug = None
        if self.patches is not None:
            wa, wb = self.patches.draw(ia, ib)
        if self.augment is not None:
            aug = self.augment.draw(*ia.shape)
        return ia, ib, wa, wb, aug

    def get_state(self) -> Tensor | dict[str, Tensor]:
        if self.patches is None and self.augment is None:
            return self.rows.get_state()
        state = {"rows": self.rows.get_state()}
        for name, part in (("patches", self.patches), ("augment", self.augment)):
            if part is not None:
                state[name] = part.get_state()
        return state

    def set_state(self, state: Tensor | dict[str, Tensor]) -> None:
        parts = {"patches": (self.patches, "patch windows", "trains on patches",
                             "trains whole slices"),
                 "augment": (self.augment, "augmentation", "augments",
                             "does not augment")}
        held = state if isinstance(state, dict) else {}
        for name, (part, what, on, off) in parts.items():
            if (name in held) != (part is not None):
                has = "holds" if name in held else "holds no"
                raise ValueError(f"the checkpoint {has} {what} state but the run "
                                 f"{on if part is not None else off}")
        self.rows.set_state(held["rows"] if isinstance(state, dict) else state)
        for name, (part, *_) in parts.items():
            if part is not None:
                part.set_state(held[name])


def augmenter(train_cfg: dict[str, Any], seed: int) -> Augmenter | None:
    """The run's augmenter (None when both flip and gamma are off)."""
    flip, gamma = float(train_cfg.get("augment_flip", 0.0)), float(
        train_cfg.get("augment_gamma", 0.0))
    return None if flip == 0 and gamma == 0 else Augmenter(flip, gamma, seed)


def patch_sampler(slices: TrainingSlices, patch_size: int | None, brain_fraction: float,
                  seed: int) -> PatchSampler | None:
    """The run's patch sampler (None for whole slices). Its seed is derived from the run's,
    apart from the row sampler's stream."""
    if patch_size is None:
        return None
    assert slices.mask_A is not None and slices.mask_B is not None
    return PatchSampler(slices.mask_A, None if slices.paired else slices.mask_B,
                        int(patch_size), float(brain_fraction), seed=int(seed) + PATCH_SEED_OFFSET)


#: Offset of the patch sampler's seed from the run's seed (the row sampler uses the seed).
PATCH_SEED_OFFSET = 104_729
