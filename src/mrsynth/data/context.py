"""2.5-D input: every axial slice together with its ``k`` neighbours on each side.

With ``arch.context_slices = k`` a model's generators (UNIT: its encoders) take
``2k + 1`` channels, the slices ``s - k .. s + k`` of the same volume in that order
(the slice itself in the middle channel ``k``), and still output the one slice ``s``.
Nothing is added to the prepared file: it holds each slice's ``subject`` and
``slice_index``, so the neighbours are looked up when the data are loaded
(:func:`neighbour_table`) and each batch gathers its stacks from the slices already
in memory (:func:`gather_stack`). Whole-volume translation builds the same table over
the volume's slices with brain (:func:`volume_table`).

**Edge rule.** Channel ``d`` (offset ``-k <= d <= k``) of slice ``s`` is the same
subject's slice ``s + d`` when it was kept; when it was not (beyond the first or last
kept slice, or in a gap left by ``--slice-step``) it is the kept slice nearest to
``s + d`` *between* ``s`` and ``s + d`` (``s`` itself at worst). At the ends of the kept
range this repeats the outermost slice (replicate padding), and the channels' slice
indices never decrease from channel 0 to ``2k``: a stack never shows anatomy out of
order. Slices kept without their neighbours (``--slices 120``, ``--slice-step 4``,
folders of 2-D images) therefore give stacks of one repeated slice, which carry no
through-plane information; :func:`exact_fraction` measures how many entries are real
neighbours and the trainer refuses data with none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mrsynth.errors import DataError

#: Largest ``arch.context_slices`` accepted (17 input channels).
MAX_CONTEXT_SLICES = 8
#: Key suffix of a batch's stacked generator inputs (``"A" + STACK_SUFFIX``).
STACK_SUFFIX = "_stack"


def context_slices(config: Mapping[str, Any]) -> int:
    """``arch.context_slices`` of a resolved run config (0 when absent: older runs)."""
    return int((config.get("arch") or {}).get("context_slices", 0) or 0)


def run_context_slices(run: Any) -> int:
    """``arch.context_slices`` of a loaded run (0 for objects without a config: stand-ins
    that translate single slices)."""
    return context_slices(getattr(run, "config", None) or {})


def in_channels(k: int) -> int:
    """Generator input channels for ``k`` context slices on each side."""
    return 2 * int(k) + 1


def neighbour_table(groups: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Row indices ``(N, 2k + 1)`` of each row's neighbours by the module's edge rule.

    ``groups`` (N,) says which rows share a volume (the subject), ``positions`` (N,) are
    the slice indices in it; the rows may be in any order. Column ``k`` is the row
    itself. Two rows of one group at the same position are an error (they would make
    the neighbours ambiguous).
    """
    groups = np.asarray(groups)
    pos = np.asarray(positions, dtype=np.int64)
    n = pos.shape[0]
    if groups.shape != (n,):
        raise ValueError(f"groups {groups.shape} and positions {pos.shape} differ in length")
    k = int(k)
    cols = np.arange(-k, k + 1)
    if n == 0:
        return np.zeros((0, cols.size), np.int64)
    _, code = np.unique(groups, return_inverse=True)
    lo = int(pos.min())
    span = int(pos.max()) - lo + 2 * k + 1
    # one sorted key per row: groups never overlap, and every target s + d of a row stays
    # inside its own group's key range (positions are shifted by k)
    key = code.astype(np.int64) * span + (pos - lo + k)
    order = np.argsort(key, kind="stable")
    skey = key[order]
    dup = np.flatnonzero(skey[1:] == skey[:-1])
    if dup.size:
        row = int(order[dup[0]])
        raise DataError(
            f"Two slices of subject {groups[row]} have the slice index {int(pos[row])}; the "
            "neighbouring slices of a 2.5-D model (arch.context_slices) are ambiguous. "
            "Prepare the data again (one volume per subject)."
        )
    table = np.empty((n, cols.size), np.int64)
    for j, d in enumerate(cols):
        target = key + d
        if d > 0:  # the largest kept key <= target (the row itself at worst)
            at = np.searchsorted(skey, target, side="right") - 1
        elif d < 0:  # the smallest kept key >= target
            at = np.searchsorted(skey, target, side="left")
        else:
            table[:, j] = np.arange(n)
            continue
        table[:, j] = order[at]
    return table


def exact_fraction(table: np.ndarray, positions: np.ndarray) -> float:
    """Share of the non-centre entries that are the true neighbour ``s + d`` (1.0 when
    every slice has all its neighbours; 0.0 when no slice has any; NaN for k = 0)."""
    pos = np.asarray(positions, dtype=np.int64)
    k = (table.shape[1] - 1) // 2
    if k == 0 or table.shape[0] == 0:
        return float("nan")
    offsets = np.arange(-k, k + 1)
    exact = pos[table] == pos[:, None] + offsets[None, :]
    exact = np.delete(exact, k, axis=1)
    return float(exact.mean())


def volume_table(index: np.ndarray, k: int) -> np.ndarray:
    """The neighbour table of one volume's translated slices (positions ``index``, sorted).

    The same rule as for prepared data, with the volume's slices with brain as the
    kept ones: translation sees stacks built exactly as training did."""
    index = np.asarray(index)
    return neighbour_table(np.zeros(index.shape[0], np.int64), index, k)


def stack_array(images: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Stacks ``(M, 2k + 1, H, W)`` from slices ``images`` (N, H, W) and a table (M, 2k + 1)
    of row indices into them."""
    return np.ascontiguousarray(np.asarray(images)[np.asarray(table)])


def gather_stack(
    images: Tensor, table: Tensor, rows: Tensor, windows: Tensor | None = None,
    patch: tuple[int, int] | None = None,
) -> Tensor:
    """A batch of stacks from slices resident on the device.

    ``images`` (N, 1, H, W), ``table`` (N, C) row indices into them, ``rows`` (B,) the
    batch's rows; with ``windows`` (B, 2) and ``patch`` (h, w) every channel is cropped at
    its row's window (:func:`mrsynth.data.patches.crop`). Returns (B, C, H, W) or
    (B, C, h, w): one gather, no Python loop over the batch.
    """
    idx = table.index_select(0, rows.to(table.device)).reshape(-1)  # (B * C,)
    b, c = rows.shape[0], table.shape[1]
    if windows is None or patch is None:
        out = images.index_select(0, idx)  # (B * C, 1, H, W)
        return out.reshape(b, c, *out.shape[-2:])
    from mrsynth.data.patches import crop

    win = windows.to(images.device).repeat_interleave(c, dim=0)
    out = crop(images, idx, win, patch)
    return out.reshape(b, c, *out.shape[-2:])


def prepared_table(subjects: np.ndarray, slice_index: np.ndarray, k: int) -> np.ndarray:
    """:func:`neighbour_table` of prepared rows (``data.subject[rows]``,
    ``data.slice_index[rows]``): indices into those rows."""
    return neighbour_table(np.asarray(subjects).astype(str), slice_index, k)


def as_tensor_table(table: np.ndarray, device: torch.device | str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64)).to(device)
