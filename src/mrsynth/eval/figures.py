"""The study's two figures, as PNG (for the report) and PDF (for papers).

* **Figure 1**: MAE, PSNR and MI (mean with 95 % bootstrap CI) per model,
  one bar per direction, plus the C2ST realism accuracy when available.
  Baselines (:mod:`mrsynth.eval.baselines`) are drawn hatched in pale colours
  behind a dotted separator, with italic names, so they cannot pass for models.
* **Figure 2**: one test subject and slice. Top row: the real images of both
  contrasts. One row per model below: its synthetic image and the relative
  absolute error map ``|syn - real| / max(|real|, eps)`` (z-scored inside the
  brain, NaN outside, see :func:`mrsynth.eval.metrics.relative_error_map`) with
  a shared colour bar. Results for contrast A (T1w) on the left, B (T2w) on
  the right, as in the study.

Images are shown in the prepared data's normalised units clipped to [-1, 1]
(the brain's robust range), so every panel uses the same grey scale, rotated
with :func:`mrsynth.data.slicing.to_display` (anterior up, neurological view).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.eval.metrics import METRIC_LABELS, RELATIVE_ERROR_EPS, relative_error_map
from mrsynth.utils import atomic_path

#: Upper end of the relative-error colour scale (values above are shown saturated).
REL_ERROR_VMAX = 1.0


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.pdf`` atomically; close the figure."""
    paths = []
    try:
        for ext, kw in (("png", {"dpi": 150}), ("pdf", {})):
            dest = stem.with_suffix(f".{ext}")
            with atomic_path(dest) as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)
            paths.append(dest)
    finally:
        _plt().close(fig)
    return paths


def figure1(
    summary: Sequence[Mapping[str, Any]],
    region: str,
    directions: Mapping[str, str],
    stem: Path,
    *,
    metrics: Sequence[str] = ("mae", "psnr", "mi"),
    c2st: Sequence[Mapping[str, Any]] | None = None,
    models: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
) -> list[Path]:
    """Bars of mean and 95 % CI per model; ``directions`` maps direction -> its label.

    The direction order in ``directions`` is the bar order (synthetic A first); models
    appear in ``models`` order (default: sorted), the names in ``baselines`` last and
    styled as baselines.
    """
    plt = _plt()
    rows = [s for s in summary if s["region"] == region]
    present = {s["model"] for s in rows}
    models = [m for m in models if m in present] if models else sorted(present)
    models = ([m for m in models if m not in baselines]
              + [m for m in models if m in baselines])
    is_base = np.asarray([m in baselines for m in models], dtype=bool)
    dirs = list(directions)
    panels = list(metrics) + (["c2st"] if c2st else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    width = 0.8 / max(1, len(dirs))
    x = np.arange(len(models))
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    pale = ["#B7C7E0", "#F0CBB0", "#BBDCC3", "#E6B9BA"]
    for ax, metric in zip(axes[0], panels, strict=True):
        for j, d in enumerate(dirs):
            if metric == "c2st":
                vals = {c["model"]: c for c in c2st or () if c["direction"] == d}
                mean = [vals.get(m, {}).get("accuracy", np.nan) for m in models]
                lo = [vals.get(m, {}).get("ci_low", np.nan) for m in models]
                hi = [vals.get(m, {}).get("ci_high", np.nan) for m in models]
            else:
                vals = {s["model"]: s for s in rows
                        if s["direction"] == d and s["metric"] == metric}
                mean = [vals.get(m, {}).get("mean", np.nan) for m in models]
                lo = [vals.get(m, {}).get("ci_low", np.nan) for m in models]
                hi = [vals.get(m, {}).get("ci_high", np.nan) for m in models]
            mean_a = np.asarray(mean, dtype=float)
            err = np.vstack([mean_a - np.asarray(lo, float), np.asarray(hi, float) - mean_a])
            err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
            pos = x + (j - (len(dirs) - 1) / 2) * width
            for sel, style in ((~is_base, {"color": colours[j % len(colours)],
                                           "label": directions[d]}),
                               (is_base, {"color": pale[j % len(pale)], "hatch": "//",
                                          "edgecolor": "#555555", "linewidth": 0.6,
                                          "label": f"{directions[d]} (baseline)"})):
                if sel.any():
                    ax.bar(pos[sel], np.nan_to_num(mean_a[sel]), width, yerr=err[:, sel],
                           capsize=3, **style)
        if metric == "c2st":
            ax.axhline(0.5, color="k", ls="--", lw=0.8)
            ax.set_ylim(0, 1.05)
            ax.set_title("C2ST accuracy (50 % = real-looking)")
        else:
            ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.set_xticks(x, models, rotation=30, ha="right")
        for tick, base in zip(ax.get_xticklabels(), is_base, strict=True):
            if base:
                tick.set_fontstyle("italic")
                tick.set_color("#555555")
        if is_base.any() and not is_base.all():
            ax.axvline(int(np.argmax(is_base)) - 0.5, color="#888888", ls=":", lw=1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    where = "whole image" if region == "image" else "brain mask"
    fig.suptitle(f"Figure 1: metrics on z-scored test images ({where}); bars: mean, 95 % CI")
    fig.tight_layout()
    return save_figure(fig, Path(stem))


def figure2(
    real: Mapping[str, np.ndarray],
    synthetic: Mapping[str, Mapping[str, np.ndarray]],
    mask: np.ndarray,
    contrasts: tuple[str, str],
    stem: Path,
    *,
    title: str = "",
    eps: float = RELATIVE_ERROR_EPS,
    baselines: Sequence[str] = (),
) -> list[Path]:
    """``real[contrast]`` and ``synthetic[model][contrast]`` are one slice (H, W).

    Rows follow ``synthetic``'s order with the names in ``baselines`` last, titled
    "(baseline)" in grey.
    """
    from mrsynth.data.slicing import to_display

    plt = _plt()
    models = ([m for m in synthetic if m not in baselines]
              + [m for m in synthetic if m in baselines])
    a, b = contrasts
    real = {c: to_display(v) for c, v in real.items()}
    synthetic = {m: {c: to_display(v) for c, v in d.items()} for m, d in synthetic.items()}
    mask = to_display(mask)
    nrow = 1 + len(models)
    h, w = mask.shape
    cell = 1.9
    fig, axes = plt.subplots(
        nrow, 4, figsize=(4 * cell * w / max(h, w) + 1.0, nrow * cell * h / max(h, w) + 0.6),
        squeeze=False, constrained_layout=True,
    )
    cmap = plt.get_cmap("inferno").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    grey = {"cmap": "gray", "vmin": -1.0, "vmax": 1.0, "interpolation": "nearest"}
    err_im = None
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    for col, c in ((0, a), (2, b)):
        axes[0, col].imshow(real[c], **grey)
        axes[0, col].set_title(f"real {c}", fontsize=9)
        axes[0, col + 1].set_visible(False)
    for i, m in enumerate(models, start=1):
        for col, c in ((0, a), (2, b)):
            syn = synthetic[m].get(c)
            if syn is None:
                axes[i, col].set_visible(False)
                axes[i, col + 1].set_visible(False)
                continue
            axes[i, col].imshow(syn, **grey)
            base = m in baselines
            axes[i, col].set_title(f"{m}{' (baseline)' if base else ''}: synthetic {c}",
                                   fontsize=8, color="#555555" if base else "black",
                                   fontstyle="italic" if base else "normal")
            rel = relative_error_map(real[c], syn, mask, eps=eps)
            err_im = axes[i, col + 1].imshow(rel, cmap=cmap, vmin=0.0, vmax=REL_ERROR_VMAX,
                                             interpolation="nearest")
            axes[i, col + 1].set_title(f"rel. error {c}", fontsize=8)
    if err_im is not None:
        cb = fig.colorbar(err_im, ax=axes[1:, :].ravel().tolist(), shrink=0.6, extend="max")
        cb.set_label(f"|syn - real| / max(|real|, {eps:g}) (z-scored, brain)", fontsize=8)
    fig.suptitle(title or "Figure 2", fontsize=10)
    return save_figure(fig, Path(stem))
