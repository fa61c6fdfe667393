"""Whole-volume metrics: how good a synthetic volume is in 3-D, not one slice at a time.

Slice-wise metrics (:mod:`mrsynth.eval.metrics`) cannot see what a slice-by-slice
translator gets wrong between slices: stripes and intensity jumps that show in
coronal and sagittal views. These metrics compare a synthetic volume with the real
one over the whole brain (definitions in ``docs/evaluation.md``, "Volume metrics"):

* Both volumes are **z-scored over the brain mask** (mean and standard deviation of
  the voxels inside ``mask``), so the metrics do not depend on either volume's units
  and agree with the study's per-image z-scoring; errors are in standard deviations.
* **MAE** = mean ``|syn_z - real_z|`` inside the mask.
* **PSNR** = ``10 log10(peak^2 / MSE)`` inside the mask, ``peak`` = the range of
  ``real_z`` inside the mask (scikit-image's ``peak_signal_noise_ratio``).
* **SSIM** = scikit-image's ``structural_similarity`` in 3-D (7x7x7 uniform window,
  ``data_range`` = the same peak), its map averaged inside the mask. Outside the
  mask both volumes are set to the same constant (the real brain's z-scored
  minimum, i.e. dark background) so that background differences do not count but
  windows at the brain's edge still see an edge.
* **Through-plane error** = mean ``|(syn_z[k+1] - syn_z[k]) - (real_z[k+1] - real_z[k])|``
  over neighbouring slices ``k, k+1`` along the slice axis (axial: axis 2 of a
  canonical RAS volume), at voxels inside the mask in both slices. It is zero
  when the synthetic volume changes from slice to slice exactly as the real one
  does, whatever its error within each slice, and grows with slice-to-slice
  jumps. **In-plane error** is the same along the two in-plane axes (their mean),
  and the **through-plane ratio** = through-plane / in-plane error: about 1 when
  errors are as smooth across slices as within them, above 1 for stripes.

``mrsynth evaluate`` has slices, not volumes: :func:`slice_stacks` puts each test
subject's kept slices back in axial order (a gap in the kept indices becomes one plane
with an empty mask, so nothing is compared across it), :func:`score_stacks` scores them,
and :func:`through_plane_tests` compares models with a baseline per neighbouring pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Metric keys of :func:`volume_metrics`, in table order, with display names.
VOLUME_METRICS: dict[str, str] = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "mae": "MAE",
    "through_plane_mae": "through-plane error",
    "in_plane_mae": "in-plane error",
    "through_plane_ratio": "through/in-plane",
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True, "ssim": True, "mae": False, "through_plane_mae": False,
    "in_plane_mae": False, "through_plane_ratio": False,
}
#: SSIM window (voxels per side).
SSIM_WINDOW = 7


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with mean and std from the voxels inside ``mask`` (float64).

    A volume constant inside the mask becomes zeros (not NaN)."""
    x = np.asarray(x, dtype=np.float64)
    vals = x[mask]
    mu, sd = float(vals.mean()), float(vals.std())
    return (x - mu) / sd if sd > 0 else x - mu


def neighbour_difference_mae(syn_z: np.ndarray, real_z: np.ndarray, mask: np.ndarray,
                             axis: int) -> float:
    """Mean ``|diff(syn_z) - diff(real_z)|`` along ``axis`` where both neighbours are in the
    mask (NaN when no pair is)."""
    ds = np.diff(syn_z, axis=axis)
    dr = np.diff(real_z, axis=axis)
    n = mask.shape[axis]
    pair = np.take(mask, range(1, n), axis=axis) & np.take(mask, range(n - 1), axis=axis)
    if not pair.any():
        return float("nan")
    return float(np.abs(ds[pair] - dr[pair]).mean())


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin,
                                                           mask.shape[ax])))
    return tuple(box)


def volume_ssim(syn_z: np.ndarray, real_z: np.ndarray, mask: np.ndarray,
                data_range: float) -> float:
    """3-D SSIM of z-scored volumes averaged inside ``mask`` (see the module docstring).

    Computed on the mask's bounding box plus half a window: the windows centred on mask
    voxels are the same as on the whole volume, at a fraction of the memory."""
    from skimage.metrics import structural_similarity

    box = _bounding_box(mask, SSIM_WINDOW // 2)
    m = mask[box]
    fill = float(real_z[mask].min())
    s = np.where(m, syn_z[box], fill)
    r = np.where(m, real_z[box], fill)
    win = min(SSIM_WINDOW, *(d if d % 2 else d - 1 for d in m.shape))
    if win < 3:
        return float("nan")
    _, smap = structural_similarity(r, s, win_size=win, data_range=data_range, full=True)
    return float(smap[m].mean())


def volume_metrics(synthetic: np.ndarray, real: np.ndarray, mask: np.ndarray, *,
                   slice_axis: int = 2) -> dict[str, float]:
    """PSNR, SSIM, MAE, through-plane and in-plane error of ``synthetic`` vs ``real``.

    Both are 3-D arrays on the same grid; ``mask`` (bool, same shape) is the brain over
    which they are z-scored and compared; ``slice_axis`` is the axis the translator
    worked slice by slice along (2 = axial for canonical RAS volumes).
    """
    from skimage.metrics import peak_signal_noise_ratio

    syn = np.asarray(synthetic)
    ref = np.asarray(real)
    mask = np.asarray(mask, dtype=bool)
    if syn.shape != ref.shape or mask.shape != ref.shape or ref.ndim != 3:
        raise ValueError(
            f"volume_metrics needs three 3-D arrays of one shape, got {syn.shape}, "
            f"{ref.shape} and mask {mask.shape}"
        )
    if not mask.any():
        raise ValueError("volume_metrics: the mask is empty")
    s, r = zscore(syn, mask), zscore(ref, mask)
    rv, sv = r[mask], s[mask]
    peak = float(rv.max() - rv.min())
    mse = float(np.mean((sv - rv) ** 2))
    if mse == 0:
        psnr = float("inf")
    elif peak == 0:
        psnr = float("-inf")
    else:
        psnr = float(peak_signal_noise_ratio(rv, sv, data_range=peak))
    through = neighbour_difference_mae(s, r, mask, slice_axis)
    inplane_axes = [a for a in range(3) if a != slice_axis]
    inplane = float(np.mean([neighbour_difference_mae(s, r, mask, a) for a in inplane_axes]))
    ratio = through / inplane if inplane > 0 else float("nan")
    return {
        "psnr": psnr,
        "ssim": volume_ssim(s, r, mask, peak) if peak > 0 else float("nan"),
        "mae": float(np.mean(np.abs(sv - rv))),
        "through_plane_mae": through,
        "in_plane_mae": inplane,
        "through_plane_ratio": float(ratio),
        "n_voxels": int(mask.sum()),
    }


# --------------------------------------------------------------------------- slices -> volumes
# ``mrsynth evaluate`` works on a prepared file's slices, which keep each slice's subject,
# axial index and crop origin; these put a subject's kept slices back into a volume.


@dataclass(frozen=True)
class SliceStack:
    """Where each of one subject's kept slices goes in its reassembled volume.

    The volume is (rows, columns, slices), the slice axis last as in the canonical RAS
    volume the slices were cut from. Consecutive kept indices (``slice_index`` differing
    by the prepared file's slice step) are neighbours; where kept indices jump further,
    one **separator** plane with an empty mask is put between the runs, so every metric
    ignores it and no through-plane difference spans a gap (see ``docs/evaluation.md``).
    """

    subject: str
    #: Rows of the slice arrays, in slice-index order.
    rows: np.ndarray
    #: Their axial indices in the canonical volume.
    slice_index: np.ndarray
    #: Their positions along the volume's slice axis (separators in between runs).
    z: np.ndarray
    #: (n, 2) their in-plane position: crop origin minus the subject's smallest origin.
    offsets: np.ndarray
    shape: tuple[int, int, int]
    #: (first, last) slice index of each run of neighbouring slices.
    runs: tuple[tuple[int, int], ...]

    def assemble(self, slices: np.ndarray, fill: float | bool = 0) -> np.ndarray:
        """The (H', W', depth) volume of this subject's ``slices`` (N, H, W) rows; voxels
        no slice covers (separators, or outside a slice whose crop differs) get ``fill``."""
        vol = np.full(self.shape, fill, dtype=slices.dtype)
        h, w = slices.shape[1:]
        for row, z, (r0, c0) in zip(self.rows, self.z, self.offsets, strict=True):
            vol[r0 : r0 + h, c0 : c0 + w, z] = slices[row]
        return vol


def slice_stacks(subject: np.ndarray, slice_index: np.ndarray, crop: np.ndarray,
                 size: tuple[int, int], step: int = 1) -> list[SliceStack]:
    """One :class:`SliceStack` per subject (sorted by id) of a prepared file's slices.

    ``subject``, ``slice_index`` and ``crop`` are the file's per-slice arrays (or a
    selection of them), ``size`` the slices' (H, W) and ``step`` the file's slice step.
    A subject with the same axial index twice cannot be stacked (ValueError)."""
    subject = np.asarray(subject).astype(str)
    slice_index = np.asarray(slice_index, dtype=np.int64)
    crop = np.asarray(crop, dtype=np.int64).reshape(-1, 2)
    step = max(int(step), 1)
    out = []
    for subj in sorted(set(subject.tolist())):
        rows = np.flatnonzero(subject == subj)
        rows = rows[np.argsort(slice_index[rows], kind="stable")]
        idx = slice_index[rows]
        if np.any(np.diff(idx) == 0):
            dup = int(idx[np.flatnonzero(np.diff(idx) == 0)[0]])
            raise ValueError(f"Subject {subj} has axial slice {dup} more than once; its slices "
                             "cannot be stacked into one volume.")
        breaks = np.diff(idx) != step  # a jump: a new run starts after a separator
        z = np.arange(rows.size) + np.concatenate([[0], np.cumsum(breaks)])
        starts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
        ends = np.concatenate([starts[1:] - 1, [rows.size - 1]])
        origin = crop[rows]
        offsets = origin - origin.min(axis=0)
        span = offsets.max(axis=0)
        shape = (int(size[0] + span[0]), int(size[1] + span[1]), int(z[-1] + 1))
        out.append(SliceStack(
            subject=subj, rows=rows, slice_index=idx, z=z, offsets=offsets, shape=shape,
            runs=tuple((int(idx[a]), int(idx[b])) for a, b in zip(starts, ends, strict=True)),
        ))
    return out


def neighbour_pair_errors(syn_z: np.ndarray, real_z: np.ndarray, mask: np.ndarray,
                          axis: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The through-plane error of each neighbouring pair ``(k, k+1)`` along ``axis``.

    Returns ``(k, error, voxels)`` for the pairs with at least one voxel inside the mask in
    both planes: the mean ``|diff(syn_z) - diff(real_z)|`` over those voxels, and their
    number. The voxel-weighted mean of ``error`` is :func:`neighbour_difference_mae`; the
    per-pair values are the units of the paired test against a baseline."""
    s, r, m = (np.moveaxis(np.asarray(a), axis, -1) for a in (syn_z, real_z, mask))
    pair = m[..., 1:] & m[..., :-1]
    err = np.where(pair, np.abs(np.diff(s, axis=-1) - np.diff(r, axis=-1)), 0.0)
    sums = err.reshape(-1, err.shape[-1]).sum(axis=0)
    counts = pair.reshape(-1, pair.shape[-1]).sum(axis=0)
    k = np.flatnonzero(counts > 0)
    return k, sums[k] / counts[k], counts[k]


def score_stack(stack: SliceStack, synthetic: np.ndarray, real: np.ndarray,
                mask: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]]]:
    """:func:`volume_metrics` of one subject's reassembled synthetic and real slices.

    ``synthetic``, ``real`` and ``mask`` are (N, H, W) slice arrays indexed by
    ``stack.rows``. Returns the metrics (plus ``n_slices``, ``n_runs``, ``n_pairs``) and
    one ``{"slice", "through_plane_mae"}`` per scored neighbouring pair, ``slice`` = the
    lower axial index of the pair."""
    m = stack.assemble(np.asarray(mask, dtype=bool), False)
    if not m.any():
        raise ValueError(f"Subject {stack.subject}: no brain voxel in its slices")
    s = stack.assemble(np.asarray(synthetic, dtype=np.float64))
    r = stack.assemble(np.asarray(real, dtype=np.float64))
    metrics = volume_metrics(s, r, m)
    k, err, _ = neighbour_pair_errors(zscore(s, m), zscore(r, m), m)
    index_at = np.full(stack.shape[2], -1, dtype=np.int64)
    index_at[stack.z] = stack.slice_index
    pairs = [{"slice": int(index_at[kk]), "through_plane_mae": float(e)}
             for kk, e in zip(k, err, strict=True)]
    return ({**metrics, "n_slices": int(stack.rows.size), "n_runs": len(stack.runs),
             "n_pairs": len(pairs)}, pairs)


def score_stacks(stacks: Sequence[SliceStack], synthetic: np.ndarray, real: np.ndarray,
                 mask: np.ndarray, **row: Any) -> tuple[list[dict[str, Any]],
                                                     list[dict[str, Any]]]:
    """:func:`score_stack` for every stack: one row per subject (``row``'s items, e.g. model
    and direction, then ``subject`` and the metrics) and one per scored neighbouring pair.
    Stacks without a brain voxel are left out (their slices have no volume to score)."""
    subjects, pairs = [], []
    for st in stacks:
        if not np.asarray(mask)[st.rows].any():
            continue
        metrics, pair = score_stack(st, synthetic, real, mask)
        subjects.append({"subject": st.subject, **row, **metrics,
                         "slices": " ".join(f"{a}-{b}" if a != b else str(a)
                                            for a, b in st.runs)})
        pairs.extend({"subject": st.subject, **row, **p} for p in pair)
    return subjects, pairs


def through_plane_tests(pair_rows: Sequence[dict[str, Any]], directions: Sequence[str],
                        baseline: str, *, seed: int = 0) -> list[dict[str, Any]]:
    """Is each trained model's through-plane error lower than ``baseline``'s?

    Per direction and model (``kind`` = ``model``) of ``pair_rows`` (one row per subject,
    neighbouring slice pair, model and direction): the one-sided Wilcoxon signed-rank test
    on the matched per-pair errors (alternative: the model's are lower), the paired mean
    difference with its bootstrap CI, and Holm's correction over the models of a
    direction. No rows when the baseline is absent."""
    from mrsynth.eval.stats import MODEL, holm, paired_difference, paired_values, wilcoxon_test

    if not any(r["model"] == baseline for r in pair_rows):
        return []
    models = list(dict.fromkeys(r["model"] for r in pair_rows if r.get("kind") == MODEL))
    out: list[dict[str, Any]] = []
    for d in directions:
        family = []
        for mod in models:
            x, y = paired_values(pair_rows, "through_plane_mae",
                                 {"model": mod, "direction": d},
                                 {"model": baseline, "direction": d})
            _, p = wilcoxon_test(x, y, "less")
            family.append({"direction": d, "model": mod, "baseline": baseline,
                           "metric": "through_plane_mae",
                           "model_mean": float(x.mean()) if x.size else float("nan"),
                           "baseline_mean": float(y.mean()) if y.size else float("nan"),
                           **paired_difference(x, y, seed), "p_value": p})
        for row, adj in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = adj
        out.extend(family)
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


#: What ``mrsynth evaluate`` records in ``eval.json`` about its volume metrics.
VOLUME_DEFINITIONS = {
    "assembly": "each test subject's kept slices stacked in slice order (slice axis last; "
                "axial slices unless the data were prepared in another plane) at their crop "
                "positions; slices whose indices differ by the prepared "
                "file's slice step are neighbours, a larger jump starts a new run with an "
                "empty-mask plane between runs",
    "region": "the prepared brain masks; both volumes z-scored over it",
    "mae": "mean |syn_z - real_z| inside the brain",
    "psnr": "10 log10(peak^2 / MSE) inside the brain, peak = range of real_z there",
    "ssim": "3-D SSIM, 7x7x7 uniform window, outside the brain both set to real_z's minimum, "
            "map averaged inside the brain",
    "through_plane_mae": "mean |diff(syn_z) - diff(real_z)| between neighbouring slices of a "
                         "run, at voxels in the brain in both",
    "in_plane_mae": "the same along the two in-plane axes (mean)",
    "through_plane_ratio": "through-plane / in-plane error",
}
#: The explanation above :func:`volume_table` in ``summary.md`` and the HTML report.
VOLUME_NOTE = (
    "Per test subject, its kept slices stacked back into a volume (runs of neighbouring "
    "slices in the data's plane; no difference is taken across a gap) and scored inside the "
    "brain on volumes z-scored over the brain: mean ± std over subjects. The through-plane error "
    "compares slice-to-slice changes with the real volume's (stripes and intensity jumps "
    "raise it); the in-plane error is the same along the in-plane axes. The comparison "
    "with baseline_intensity: paired mean difference of the through-plane error per "
    "neighbouring slice pair, one-sided Wilcoxon (lower than the baseline), Holm over the "
    "models of a direction (volume_tests.csv)."
)

#: Columns of :func:`volume_table`: metric keys in order, the through-plane error beside MAE.
TABLE_METRICS = ("mae", "through_plane_mae", "in_plane_mae", "through_plane_ratio", "psnr",
                 "ssim")


def volume_table(volume_rows: Sequence[dict[str, Any]], test_rows: Sequence[dict[str, Any]],
                 models: Sequence[str] | None = None, baseline: str = "baseline_intensity",
                 ) -> tuple[list[str], list[list[str]]]:
    """Header and rows (per model and direction) of the volume summary: each metric's mean
    ± standard deviation over the test subjects, then the paired through-plane comparison
    with ``baseline``. Works on rows in memory or read back from the CSV files."""
    from mrsynth.eval.stats import fmt, fmt_p

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    kinds: dict[str, str] = {}
    for r in volume_rows:
        groups.setdefault((r["model"], r["direction"]), []).append(r)
        kinds[r["model"]] = r.get("kind", "")
    tests = {(t["model"], t["direction"]): t for t in test_rows}
    header = ["model", "kind", "direction", "subjects",
              *(VOLUME_METRICS[m] for m in TABLE_METRICS),
              f"through-plane − {baseline} [95 % CI]", "p_holm"]
    rank = {m: i for i, m in enumerate(models or [])}
    body = []
    for (model, direction), rows in sorted(
            groups.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0])):
        cells = []
        for m in TABLE_METRICS:
            v = np.array([_num(r[m]) for r in rows])
            v = v[np.isfinite(v)]
            cells.append("n/a" if v.size == 0 else fmt(float(v.mean())) if v.size == 1
                         else f"{fmt(float(v.mean()))} ± {fmt(float(v.std(ddof=1)))}")
        t = tests.get((model, direction))
        cmp = ("" if t is None else
               f"{fmt(_num(t['mean_diff']), 4)} [{fmt(_num(t['ci_low']), 4)}, "
               f"{fmt(_num(t['ci_high']), 4)}] (n = {t['n']})")
        body.append([model, kinds[model], direction, str(len(rows)), *cells, cmp,
                     "" if t is None else fmt_p(_num(t["p_holm"]))])
    return header, body
