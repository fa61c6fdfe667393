"""Learning curves: each run's per-epoch validation scores against the baselines.

Why: a final test score says nothing about whether a model was still improving, had
overfitted, or never got better than an intensity lookup table. The trainer scores a fixed
handful of validation slices every epoch (:mod:`mrsynth.eval.validation`) and stores, in
``metrics.json``::

    "validation": {"n_slices", "rows", "subjects", "baselines": {name: scores},
                   "best_epoch", "best_score"}
    "epochs": [{"epoch": 1, ..., "validation": {"T1w2T2w": {"mae", "ssim"}, ...,
                "score"}}, ...]

The figure has one column per direction and one row per metric (in-brain MAE, in-brain
SSIM); one line per run, the baselines (scored on the same slices) as horizontal lines, and
each run's best epoch (lowest validation score) marked.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrsynth.eval.validation import VAL_METRICS

_LABELS = {"mae": "in-brain MAE (z)", "ssim": "in-brain SSIM"}
_BASELINE_STYLE = {"baseline_intensity": ("#d62728", "--"), "baseline_mean": ("#7f7f7f", ":"),
                   "baseline_identity": ("#8c564b", "-.")}


def _has_curve(doc: Mapping[str, Any]) -> bool:
    return any(isinstance(e.get("validation"), Mapping) for e in doc.get("epochs", []))


def _directions(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for doc in docs:
        for e in doc.get("epochs", []):
            v = e.get("validation")
            if isinstance(v, Mapping):
                out += [k for k, s in v.items() if isinstance(s, Mapping) and k not in out]
    return out


def learning_curves_figure(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Any | None:
    """A matplotlib Figure of the runs' validation curves (``(label, metrics.json doc)``
    pairs); None when no run has validation scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(label, doc) for label, doc in runs if _has_curve(doc)]
    if not runs:
        return None
    dirs = _directions([doc for _, doc in runs])
    fig = Figure(figsize=(5.2 * len(dirs), 3.4 * len(VAL_METRICS)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(VAL_METRICS), len(dirs), squeeze=False)
    baselines: dict[str, Any] = {}
    for _, doc in runs:  # the baselines of the first run that has them (same slices)
        baselines = dict(doc.get("validation", {}).get("baselines") or {})
        if baselines:
            break
    for j, d in enumerate(dirs):
        for i, metric in enumerate(VAL_METRICS):
            ax = axes[i][j]
            for label, doc in runs:
                pts = [(e["epoch"], e["validation"][d][metric]) for e in doc["epochs"]
                       if isinstance(e.get("validation"), Mapping) and d in e["validation"]]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=label)
                best = doc.get("validation", {}).get("best_epoch")
                if best in xs:
                    ax.plot([best], [ys[xs.index(best)]], marker="*", markersize=11,
                            color=line.get_color(), linestyle="none")
            for name, scores in baselines.items():
                value = (scores.get(d) or {}).get(metric)
                if value is None:
                    continue
                color, style = _BASELINE_STYLE.get(name, ("black", "--"))
                ax.axhline(value, color=color, linestyle=style, linewidth=1.0, label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(_LABELS.get(metric, metric))
            if i == 0:
                ax.set_title(d)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("Validation scores per epoch (★ best epoch); baselines on the same slices",
                 fontsize=10, y=1.04)
    fig.tight_layout()
    return fig


def learning_curves_png(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> bytes | None:
    """The figure as PNG bytes (None when no run has validation scores)."""
    fig = learning_curves_figure(runs)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def read_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json; {} when it is missing or unreadable (the report still builds)."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def learning_curves_html(runs: Sequence[Mapping[str, Any]]) -> str:
    """The report's section: ``runs`` are eval.json's run entries (``label``, ``run_dir``)."""
    docs = [(str(r.get("label", r.get("model", "?"))), read_run_metrics(r.get("run_dir", "")))
            for r in runs]
    png = learning_curves_png(docs)
    head = "<h2>Learning curves (validation split)</h2>"
    if png is None:
        return (head + "<p class='note'>No run recorded validation scores: their data had no "
                "validation split (each run is evaluated at the checkpoint asked for, the last by "
                "default). Prepare the data "
                "with <code>--val-fraction</code> (or <code>--val-subjects</code>) to keep "
                "validation subjects out of training; <code>mrsynth demo</code> keeps them "
                "with <code>--val-subjects</code>, or by <code>--val-fraction</code> with at "
                "least 8 subjects outside the test split.</p>")
    best = ", ".join(
        f"{html.escape(label)}: epoch {doc['validation']['best_epoch']}"
        for label, doc in docs
        if isinstance(doc.get("validation"), Mapping) and doc["validation"].get("best_epoch"))
    data = base64.b64encode(png).decode("ascii")
    return (head + "<p class='note'>Each run's in-brain MAE and SSIM on a fixed handful of "
            "validation slices after every epoch (never the test split); horizontal lines: "
            "the baselines on the same slices, the lookup table fitted on the training "
            f"split. Best epoch (lowest mean MAE of the two directions): {best or 'n/a'}.</p>"
            f"<p><img alt='Learning curves' src='data:image/png;base64,{data}'></p>")
