"""Streaming training batches from the prepared store (``train.data_on_device`` false).

When the training slices do not fit on the device, each step's batch is read from the store
(lazy, memory-mapped shards) by a ``torch.utils.data.DataLoader``: worker processes, pinned
memory on CUDA, prefetching. The loader only maps *step -> batch*: the epoch's row and
window tables come from the same seeded :class:`~mrsynth.train.dataset.EpochDraws` as the
in-memory path (already sharded to this rank), so a streamed batch holds exactly the values
the in-memory gather would, and a resumed epoch starts the loader at the saved step.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mrsynth.train.dataset import TrainingSlices, resample

#: ``auto`` keeps the slices resident when they take at most this share of the free memory
AUTO_FRACTION = 0.25


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: available RAM); None unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil  # optional

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def decide_on_device(setting: bool | str, needed_bytes: int, device: torch.device) -> bool:
    """``train.data_on_device`` resolved: auto = the slices fit in :data:`AUTO_FRACTION` of
    the free memory (assumed to fit where the free memory cannot be read)."""
    if setting != "auto":
        return bool(setting)
    free = free_memory(device)
    return free is None or needed_bytes <= AUTO_FRACTION * free


def default_workers(device: torch.device) -> int:
    """``train.loader_workers`` null: on CUDA, min(4, cores - 1) processes read ahead while
    the GPU computes; on a CPU, 0 (read in the training process), since the training step
    already keeps every core busy and a reader process only takes cores from it (measured
    in ``benchmarks/data_scale.py``: 2 workers ran at 84 % of the resident speed, 0 at 97 %)."""
    if device.type == "cpu":
        return 0
    from mrsynth.utils import available_cores

    return max(1, min(4, available_cores() - 1))


class StepBatches(Dataset):
    """Item ``s`` = the (local) batch of step ``s``: rows ``ia[s]``/``ib[s]`` of the training
    rows, cropped at windows ``wa[s]``/``wb[s]`` when training on patches. Reads only those
    slices (and, at the prepared size, only the windows) from the store."""

    def __init__(self, slices: TrainingSlices, contrasts: tuple[str, str], ia: Tensor,
                 ib: Tensor, wa: Tensor | None, wb: Tensor | None,
                 patch: tuple[int, int] | None, next_slice: bool = False) -> None:
        assert slices.data is not None and slices.rows_A is not None and slices.rows_B is not None
        self.images = {k: slices.data.images[c] for k, c in zip("AB", contrasts, strict=True)}
        self.rows = {"A": slices.rows_A, "B": slices.rows_B}
        # 2.5-D: each training row's 2k+1 neighbours (indices into the training rows)
        self.tables = None if slices.table_A is None or slices.table_B is None else {
            "A": slices.table_A.cpu().numpy(), "B": slices.table_B.cpu().numpy()}
        self.next_slice = next_slice and self.tables is not None
        self.idx = {"A": ia.cpu().numpy(), "B": ib.cpu().numpy()}
        self.win = None if wa is None or wb is None or patch is None else {
            "A": wa.cpu().numpy(), "B": wb.cpu().numpy()}
        self.patch = patch
        self.size = tuple(slices.size)
        self.resized = tuple(slices.size) != tuple(slices.source_size)

    def __len__(self) -> int:
        return int(self.idx["A"].shape[0])

    def _read(self, key: str, s: int, local: np.ndarray | None = None) -> Tensor:
        """(B, C, h, w): the step's rows (C = 1), or with ``local`` (B, C) training-row
        indices, each row's stack of neighbours, all cropped at the row's window."""
        local = self.idx[key][s][:, None] if local is None else local
        rows = self.rows[key][local]  # (B, C) store rows
        images = self.images[key]
        b, c = rows.shape
        if self.win is not None and self.patch is not None and not self.resized:
            ph, pw = self.patch  # windows are in the prepared grid: read only the windows
            out = np.stack([np.asarray(images[int(r), y:y + ph, x:x + pw], dtype=np.float32)
                            for stack, (y, x) in zip(rows, self.win[key][s], strict=True)
                            for r in stack])
            return torch.from_numpy(out).reshape(b, c, ph, pw)
        # the same conversion and resampling as the resident slices (per slice, so the same
        # values whatever the batch)
        x = torch.from_numpy(np.ascontiguousarray(images[rows.reshape(-1)], dtype=np.float32))
        x = torch.cat([resample(x[i:i + 1, None], self.size) for i in range(x.shape[0])])
        x = x.reshape(b, c, *x.shape[-2:])
        if self.win is not None and self.patch is not None:
            ph, pw = self.patch
            x = torch.stack([x[i, :, y:y + ph, xx:xx + pw] for i, (y, xx) in
                             enumerate(self.win[key][s].tolist())])
        return x.contiguous()

    def __getitem__(self, s: int) -> dict[str, Tensor]:
        out = {"A": self._read("A", s), "B": self._read("B", s)}
        if self.tables is not None:
            from mrsynth.data.context import STACK_SUFFIX

            for key in "AB":
                table = self.tables[key]
                stack = self._read(key, s, table[self.idx[key][s]])
                out[key + STACK_SUFFIX] = stack
                if self.next_slice:  # each row's next slice (in its stack) and that one's stack
                    k = (table.shape[1] - 1) // 2
                    out[key + "_next"] = stack[:, k + 1:k + 2].contiguous()
                    out[key + "_next" + STACK_SUFFIX] = self._read(
                        key, s, table[table[self.idx[key][s], k + 1]])
        return out


def step_loader(dataset: StepBatches, start: int, workers: int,
                device: torch.device) -> DataLoader:
    """Batches of steps ``start``.. in order (one dataset item per step), ``workers``
    processes prefetching two steps each, pinned when the device is CUDA. The loader's own
    generator seeds its workers: making an iterator must not draw from the global RNG,
    which dropout, latent noise and the image pools of the run draw from."""
    extra: dict[str, Any] = {"prefetch_factor": 2} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                      num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0), **extra)
