"""Summary statistics and paired tests over per-image metric rows.

A *row* is one synthetic image scored against its real counterpart: a dict
with ``subject``, ``slice``, ``model``, ``direction``, ``region`` and one
float per metric (see :mod:`mrsynth.eval.metrics`). Non-finite values (an
``inf`` PSNR of a perfect copy, NaN of an empty mask) are left out of every
statistic and counted in ``n_excluded``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

from mrsynth.eval.metrics import METRIC_LABELS, METRICS

#: Bootstrap resamples for the 95 % CI of the mean (percentile method).
N_BOOTSTRAP = 9999


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (scipy.stats.bootstrap).

    The percentile method rather than BCa: BCa is undefined for constant data
    (all images scoring the same), which happens with tiny test sets, while the
    percentile interval then collapses to that value. Seeded, so reruns agree.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = _st.bootstrap(
        (x,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=level,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _groups(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def summarize(
    rows: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (region, model, direction, metric): n, mean, std, median, 95 % CI."""
    out = []
    for (region, model, direction), grp in _groups(rows, ("region", "model", "direction")).items():
        for m in metrics:
            v = np.asarray([float(r[m]) for r in grp], dtype=np.float64)
            fin = v[np.isfinite(v)]
            lo, hi = bootstrap_ci(fin, seed=seed)
            out.append(
                {
                    "region": region,
                    "model": model,
                    "direction": direction,
                    "metric": m,
                    "n": int(fin.size),
                    "n_excluded": int(v.size - fin.size),
                    "mean": float(fin.mean()) if fin.size else float("nan"),
                    "std": float(fin.std(ddof=1)) if fin.size > 1 else float("nan"),
                    "median": float(np.median(fin)) if fin.size else float("nan"),
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count)."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    adj = np.full(p.shape, np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        adj[idx] = running
    return adj.tolist()


def paired_wilcoxon(
    rows: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Two-sided Wilcoxon signed-rank tests between every pair of models on the same images.

    Images are matched on (subject, slice) within one region and direction;
    only images both models scored with finite values enter. ``p_holm``
    corrects for the model pairs compared within each (region, direction,
    metric). ``median_diff`` is the median of ``model_a - model_b``.
    """
    out: list[dict[str, Any]] = []
    for (region, direction), grp in _groups(rows, ("region", "direction")).items():
        by_model = _groups(grp, ("model",))
        models = sorted(k[0] for k in by_model)
        for m in metrics:
            family: list[dict[str, Any]] = []
            for a, b in itertools.combinations(models, 2):
                va = {(r["subject"], int(r["slice"])): float(r[m]) for r in by_model[(a,)]}
                vb = {(r["subject"], int(r["slice"])): float(r[m]) for r in by_model[(b,)]}
                keys = sorted(k for k in va.keys() & vb.keys()
                              if math.isfinite(va[k]) and math.isfinite(vb[k]))
                x = np.asarray([va[k] for k in keys])
                y = np.asarray([vb[k] for k in keys])
                stat = pval = float("nan")
                if keys and np.any(x != y):
                    res = _st.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
                    stat, pval = float(res.statistic), float(res.pvalue)
                elif keys:
                    pval = 1.0  # identical on every image: no evidence of a difference
                family.append(
                    {
                        "region": region,
                        "direction": direction,
                        "metric": m,
                        "model_a": a,
                        "model_b": b,
                        "n": len(keys),
                        "median_diff": float(np.median(x - y)) if keys else float("nan"),
                        "statistic": stat,
                        "p_value": pval,
                    }
                )
            for row, adj in zip(family, holm([r["p_value"] for r in family]), strict=True):
                row["p_holm"] = adj
            out.extend(family)
    return out


# ---------------------------------------------------------------------------- formatting
def fmt(x: float, digits: int = 3) -> str:
    """Number for tables: NaN as 'n/a', infinities spelled out."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def summary_table(
    summary: Sequence[dict[str, Any]],
    region: str,
    metrics: Sequence[str] = METRICS,
    models: Sequence[str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per model and direction) of 'mean ± std, median [CI]' cells.

    Rows follow ``models`` (e.g. the order runs were given) and then the direction name.
    """
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for s in summary:
        if s["region"] != region or s["metric"] not in metrics:
            continue
        cells.setdefault((s["model"], s["direction"]), {})[s["metric"]] = (
            f"{fmt(s['mean'])} ± {fmt(s['std'])}, median {fmt(s['median'])} "
            f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"
        )
    header = ["model", "direction"] + [METRIC_LABELS[m] for m in metrics]
    rank = {m: i for i, m in enumerate(models or [])}
    body = [
        [model, direction] + [c.get(m, "n/a") for m in metrics]
        for (model, direction), c in sorted(
            cells.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][0], kv[0][1])
        )
    ]
    return header, body


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
