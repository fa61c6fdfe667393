"""Per-epoch validation: a fixed handful of validation slices scored cheaply while training.

Why: choosing a checkpoint (``evaluate --checkpoint best``) or a setting must not look at
the test split, and a learning curve shows whether a model is still improving or is no
better than a trivial intensity mapping. The trainer translates the same few slices of the
prepared file's ``val`` split (``data prepare --val-fraction``) after every epoch and stores
the scores in ``metrics.json``.

Scores are the evaluation's own definitions (:mod:`mrsynth.eval.metrics`) restricted to
what is cheap: in-brain MAE and in-brain SSIM of images z-scored inside the brain mask, per
slice, averaged over the slices, for both directions. The **validation score** used to pick
the best epoch is the mean of the two directions' in-brain MAE (lower is better): MAE is
the metric the baselines are judged by, and averaging the directions picks one checkpoint
for a run that translates both ways.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrsynth.data.prepared import PreparedData
from mrsynth.eval.metrics import mae, ssim, zscore

#: Metrics scored per direction (both inside the brain mask).
VAL_METRICS: tuple[str, ...] = ("mae", "ssim")
#: Key of the number the best epoch minimises.
SCORE_KEY = "score"

#: ``translate(x, direction)``: normalised slices (n, 1, H, W) float32 -> same shape.
TranslateFn = Callable[[Any, str], Any]


@dataclass
class ValidationSlices:
    """The fixed validation slices of a run: paired A/B images and their brain masks."""

    rows: np.ndarray  # row indices in the prepared file
    A: np.ndarray  # (n, H, W) float32, normalised
    B: np.ndarray
    mask: np.ndarray  # (n, H, W) bool
    subjects: list[str]
    contrasts: tuple[str, str]
    #: 2.5-D runs: the generators' inputs, each slice with its neighbours (n, 2k+1, H, W)
    A_in: np.ndarray | None = None
    B_in: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rows.size)

    def info(self) -> dict[str, Any]:
        return {"n_slices": len(self), "rows": self.rows.tolist(), "subjects": self.subjects}


def pick_validation_slices(
    data: PreparedData, contrasts: tuple[str, str], k: int, context: int = 0
) -> ValidationSlices | None:
    """``k`` slices spread evenly over the ``val`` split (paired, with brain); None when the
    file has no such slice (no validation split, e.g. a file prepared before it existed) or
    ``k`` is 0. The choice depends only on the file, so every run on it scores the same
    slices. ``context`` > 0 (a 2.5-D run) adds each slice's stack of neighbours, looked up
    among its subject's validation slices (:mod:`mrsynth.data.context`)."""
    a, b = contrasts
    if k <= 0 or a not in data.images or b not in data.images:
        return None
    cand = np.flatnonzero((data.split == "val") & data.available[a].astype(bool)
                          & data.available[b].astype(bool))
    if cand.size == 0:
        return None
    # only the validation split's masks are read (a store's masks stay on disk)
    masks = np.asarray(data.mask[cand], dtype=bool)
    sel = cand[masks.reshape(cand.size, -1).sum(axis=1) >= 2]
    if sel.size == 0:
        return None
    rows = sel[np.unique(np.linspace(0, sel.size - 1, min(k, sel.size)).round().astype(int))]
    stacks: dict[str, np.ndarray | None] = {"A_in": None, "B_in": None}
    if context:
        from mrsynth.data.context import prepared_table

        pool = np.flatnonzero((data.split == "val") & data.available[a].astype(bool)
                              & data.available[b].astype(bool))
        table = prepared_table(data.subject[pool], data.slice_index[pool], context)
        at = np.searchsorted(pool, rows)  # rows are in pool, which is sorted
        for key, c in (("A_in", a), ("B_in", b)):
            stacks[key] = np.ascontiguousarray(data.images[c][pool[table[at]]],
                                               dtype=np.float32)
    return ValidationSlices(
        rows=rows,
        A=np.ascontiguousarray(data.images[a][rows], dtype=np.float32),
        B=np.ascontiguousarray(data.images[b][rows], dtype=np.float32),
        mask=np.asarray(data.mask[rows], dtype=bool),
        subjects=sorted(set(data.subject[rows].tolist())),
        contrasts=(a, b),
        **stacks,
    )


def score_slices(real: np.ndarray, syn: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean over slices of in-brain MAE and SSIM, both images z-scored inside the brain."""
    maes, ssims = [], []
    for r, s, m in zip(real, syn, mask, strict=True):
        rz, sz = zscore(r, m), zscore(s, m)
        maes.append(mae(rz, sz, m))
        ssims.append(ssim(rz, sz, m))
    return {"mae": float(np.mean(maes)), "ssim": float(np.nanmean(ssims))}


def direction_labels(contrasts: tuple[str, str]) -> tuple[str, str]:
    """``("T1w2T2w", "T2w2T1w")`` for A2B and B2A."""
    a, b = contrasts
    return f"{a}2{b}", f"{b}2{a}"


def combine(per_direction: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``{label: {mae, ssim}, ..., "score": mean MAE over the directions}``."""
    out: dict[str, Any] = {d: {k: round(float(v), 6) for k, v in s.items()}
                           for d, s in per_direction.items()}
    out[SCORE_KEY] = round(float(np.mean([s["mae"] for s in per_direction.values()])), 6)
    return out


def score_predictions(val: ValidationSlices, fake_b: np.ndarray, fake_a: np.ndarray
                      ) -> dict[str, Any]:
    """Scores of given predictions of B (from A) and A (from B) on the validation slices."""
    l_ab, l_ba = direction_labels(val.contrasts)
    return combine({l_ab: score_slices(val.B, fake_b, val.mask),
                    l_ba: score_slices(val.A, fake_a, val.mask)})


def validate(translate: TranslateFn, val: ValidationSlices) -> dict[str, Any]:
    """Translate the validation slices both ways with ``translate`` and score them."""
    import torch

    def run(x: np.ndarray, stack: np.ndarray | None, direction: str) -> np.ndarray:
        y = translate(torch.from_numpy(x[:, None] if stack is None else stack), direction)
        return np.asarray(torch.as_tensor(y).float().cpu().numpy())[:, 0]

    return score_predictions(val, run(val.A, val.A_in, "A2B"), run(val.B, val.B_in, "B2A"))


def baseline_scores(data: PreparedData, val: ValidationSlices) -> dict[str, dict[str, Any]]:
    """The evaluation's baselines scored on the same validation slices (the lines a learning
    curve is drawn against). The lookup table is fitted on the training split only."""
    from mrsynth.eval import baselines as bl

    a, b = val.contrasts
    out: dict[str, dict[str, Any]] = {
        bl.BASELINE_IDENTITY: score_predictions(val, bl.predict_identity(val.A),
                                                bl.predict_identity(val.B)),
        bl.BASELINE_MEAN: score_predictions(val, bl.predict_mean(val.B, val.mask),
                                            bl.predict_mean(val.A, val.mask)),
    }
    lut_ab = bl.fit_on_training_split(data, a, b)
    lut_ba = bl.fit_on_training_split(data, b, a)
    if lut_ab is not None and lut_ba is not None:
        out[bl.BASELINE_INTENSITY] = score_predictions(
            val, lut_ab.predict(val.A, val.mask), lut_ba.predict(val.B, val.mask))
    return out


def best_epoch(epochs: list[Mapping[str, Any]]) -> int | None:
    """The epoch with the lowest finite validation score (the earliest on ties); None when
    no epoch was validated."""
    best: tuple[float, int] | None = None
    for e in epochs:
        v = e.get("validation")
        score = v.get(SCORE_KEY) if isinstance(v, Mapping) else None
        if score is None or not math.isfinite(float(score)):
            continue
        key = (float(score), int(e["epoch"]))
        if best is None or key < best:
            best = key
    return None if best is None else best[1]
