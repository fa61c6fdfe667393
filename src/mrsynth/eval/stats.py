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

from mrsynth.eval.metrics import HIGHER_IS_BETTER, METRIC_LABELS, METRICS

#: Bootstrap resamples for the 95 % CI of the mean (percentile method).
N_BOOTSTRAP = 9999
#: The ``kind`` of a row: a trained run or one of :mod:`mrsynth.eval.baselines`.
MODEL, BASELINE = "model", "baseline"
#: Significance level of the report's verdict and findings (after Holm's correction).
ALPHA = 0.05


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
    """One row per (region, model, direction, metric): kind, n, mean, std, median, 95 % CI."""
    out = []
    for (region, model, direction), grp in _groups(rows, ("region", "model", "direction")).items():
        kind = grp[0].get("kind", MODEL)
        for m in metrics:
            v = np.asarray([float(r[m]) for r in grp], dtype=np.float64)
            fin = v[np.isfinite(v)]
            lo, hi = bootstrap_ci(fin, seed=seed)
            out.append(
                {
                    "region": region,
                    "model": model,
                    "kind": kind,
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
        kinds = {k[0]: v[0].get("kind", MODEL) for k, v in by_model.items()}
        for m in metrics:
            family: list[dict[str, Any]] = []
            for a, b in itertools.combinations(models, 2):
                x, y = _matched(by_model[(a,)], by_model[(b,)], m)
                stat, pval = wilcoxon_test(x, y)
                family.append(
                    {
                        "region": region,
                        "direction": direction,
                        "metric": m,
                        "model_a": a,
                        "model_b": b,
                        "kind_a": kinds[a],
                        "kind_b": kinds[b],
                        "n": int(x.size),
                        "median_diff": float(np.median(x - y)) if x.size else float("nan"),
                        "statistic": stat,
                        "p_value": pval,
                    }
                )
            for row, adj in zip(family, holm([r["p_value"] for r in family]), strict=True):
                row["p_holm"] = adj
            out.extend(family)
    return out


def _matched(
    rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``metric`` for the images both row sets scored finitely, in (subject, slice)
    order: the pairs a paired test compares."""
    va = {(r["subject"], int(r["slice"])): float(r[metric]) for r in rows_a}
    vb = {(r["subject"], int(r["slice"])): float(r[metric]) for r in rows_b}
    keys = sorted(k for k in va.keys() & vb.keys()
                  if math.isfinite(va[k]) and math.isfinite(vb[k]))
    return (np.asarray([va[k] for k in keys], dtype=np.float64),
            np.asarray([vb[k] for k in keys], dtype=np.float64))


def wilcoxon_test(x: np.ndarray, y: np.ndarray,
                  alternative: str = "two-sided") -> tuple[float, float]:
    """Wilcoxon signed-rank statistic and p-value of ``x - y`` (``alternative`` as in scipy:
    ``less`` tests whether x tends to be smaller). Identical pairs: p = 1, no evidence."""
    if x.size == 0:
        return float("nan"), float("nan")
    if not np.any(x != y):
        return float("nan"), 1.0
    res = _st.wilcoxon(x, y, zero_method="wilcox", alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def paired_values(
    rows: Iterable[dict[str, Any]], metric: str, a: dict[str, str], b: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Matched per-image values of two row selections, e.g. ``a={"model": "unit",
    "direction": "T1w2T2w", "region": "brain"}`` (every key must equal the row's value)."""
    rows = list(rows)
    ra = [r for r in rows if all(r.get(k) == v for k, v in a.items())]
    rb = [r for r in rows if all(r.get(k) == v for k, v in b.items())]
    return _matched(ra, rb, metric)


def paired_difference(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean of ``x - y`` with its 95 % percentile bootstrap CI, and n."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else float("nan"),
            "ci_low": lo, "ci_high": hi}


def verdict(
    rows: Sequence[dict[str, Any]],
    directions: Sequence[str],
    *,
    baseline: str = "baseline_intensity",
    region: str = "brain",
    metric: str = "mae",
    alpha: float = ALPHA,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Does each trained model beat ``baseline`` on ``metric`` inside ``region``?

    One row per (direction, model of kind ``model``): means, the paired mean
    difference (model - baseline) with its bootstrap CI, the one-sided Wilcoxon
    signed-rank p-value on per-image values (alternative: the model is better),
    Holm's correction over the models of that direction, and ``beats`` =
    ``p_holm < alpha``. No rows when the baseline is absent.
    """
    better = "greater" if HIGHER_IS_BETTER[metric] else "less"
    sel = [r for r in rows if r["region"] == region]
    models: list[str] = []
    for r in sel:
        if r.get("kind", MODEL) == MODEL and r["model"] not in models:
            models.append(r["model"])
    out: list[dict[str, Any]] = []
    if not any(r["model"] == baseline for r in sel):
        return out
    for d in directions:
        family = []
        for m in models:
            x, y = paired_values(sel, metric, {"model": m, "direction": d},
                                 {"model": baseline, "direction": d})
            _, p = wilcoxon_test(x, y, better)
            family.append({"direction": d, "model": m, "baseline": baseline, "region": region,
                           "metric": metric, "model_mean": float(x.mean()) if x.size else
                           float("nan"), "baseline_mean": float(y.mean()) if y.size else
                           float("nan"), **paired_difference(x, y, seed), "p_value": p})
        for row, adj in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = adj
            row["beats"] = bool(math.isfinite(adj) and adj < alpha)
        out.extend(family)
    return out


def verdict_lines(verdict_rows: Sequence[dict[str, Any]], directions: Sequence[str],
                  baseline: str = "baseline_intensity") -> list[str]:
    """One sentence per direction: which models beat the baseline inside the brain."""
    if not verdict_rows:
        return [f"No verdict: {baseline} was not evaluated (the prepared file has no paired "
                "training slices to fit it on), or no trained model was evaluated."]
    lines = []
    for d in directions:
        vr = [v for v in verdict_rows if v["direction"] == d]
        if not vr:
            continue
        def item(v: dict[str, Any]) -> str:
            return (f"{v['model']} ({METRIC_LABELS[v['metric']]} {fmt(_num(v['model_mean']))} "
                    f"vs {fmt(_num(v['baseline_mean']))}, {p_clause('p', _num(v['p_value']))}, "
                    f"{p_clause('Holm', _num(v['p_holm']))})")
        win = [item(v) for v in vr if _truthy(v["beats"])]
        lose = [item(v) for v in vr if not _truthy(v["beats"])]
        where = "inside the brain" if vr[0]["region"] == "brain" else "on the whole image"
        lines.append(
            f"{d}: " + (f"beat {baseline} {where}: " + "; ".join(win) if win
                        else f"no model beats {baseline} {where}")
            + ("." if not lose else f". Not better: {'; '.join(lose)}.")
        )
    return lines


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _truthy(x: Any) -> bool:
    """A boolean that may have gone through a CSV file ("True"/"False")."""
    return x is True or str(x).lower() == "true"


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


def p_clause(name: str, p: float) -> str:
    """``p = 0.012`` or ``p < 0.001`` for a sentence (``fmt_p`` is for table cells)."""
    text = fmt_p(p)
    return f"{name} < {text[1:]}" if text.startswith("<") else f"{name} = {text}"


def summary_table(
    summary: Sequence[dict[str, Any]],
    region: str,
    metrics: Sequence[str] = METRICS,
    models: Sequence[str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per model and direction) of 'mean ± std, median [CI]' cells.

    Rows follow ``models`` (e.g. the runs in the order given, then the baselines) and then
    the direction name; the ``kind`` column says ``model`` or ``baseline``.
    """
    cells: dict[tuple[str, str], dict[str, str]] = {}
    kinds: dict[str, str] = {}
    for s in summary:
        if s["region"] != region or s["metric"] not in metrics:
            continue
        kinds[s["model"]] = s.get("kind") or MODEL
        cells.setdefault((s["model"], s["direction"]), {})[s["metric"]] = (
            f"{fmt(s['mean'])} ± {fmt(s['std'])}, median {fmt(s['median'])} "
            f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"
        )
    header = ["model", "kind", "direction"] + [METRIC_LABELS[m] for m in metrics]
    rank = {m: i for i, m in enumerate(models or [])}
    body = [
        [model, kinds[model], direction] + [c.get(m, "n/a") for m in metrics]
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
