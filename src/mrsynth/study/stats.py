"""Statistics of a reader study: error fractions, accuracy with CI, d', AUC, Fleiss' kappa.

Conventions (single-image mode): "synthetic" is the signal, so a *hit* is a
synthetic image labelled synthetic and a *false alarm* a real image labelled
synthetic. The study's headline number is the fraction of synthetic images
labelled real (1 - hit rate).

* Accuracy and every fraction carry a binomial 95 % interval (Wilson by default,
  Clopper-Pearson "exact" on request) from ``scipy.stats.binomtest``. Pooled rows
  treat all readers' answers as independent trials.
* d' = z(H) - z(F) with the log-linear correction H = (hits + 0.5) / (n_syn + 1),
  F = (fa + 0.5) / (n_real + 1) (Hautus 1995), finite even at 0 % or 100 %.
* AUC: the Mann-Whitney probability that a synthetic image gets a more "synthetic"
  rating than a real one (ties count half). Ratings: the six-point scale as is; with
  the 1-5 confidence, real answers map to 6 - confidence (1..5) and synthetic ones to
  5 + confidence (6..10), a missing confidence counting as the least confident; with
  binary answers the AUC equals the balanced accuracy.
* Per-model rows compare the model's synthetic images with all real images (of the
  same contrast in model x contrast rows).
* 2AFC mode: accuracy is the fraction of pairs where the real image was picked; it
  estimates the AUC directly, and d' = sqrt(2) z(Pc) (log-linear corrected).
* Fleiss' kappa over the items answered by at least two readers, with the
  per-item number of raters allowed to vary (the usual formula when it is constant).
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sst

from mrsynth.study import db as sdb

POOLED = "all readers"


# --------------------------------------------------------------------------- primitives
def proportion_ci(k: int, n: int, method: str = "wilson") -> tuple[float, float]:
    """95 % binomial confidence interval of k/n (NaN for n = 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    ci = sst.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method=method)
    return (float(ci.low), float(ci.high))


def dprime(hits: int, n_signal: int, false_alarms: int, n_noise: int) -> float:
    """Yes/no d' with the log-linear correction (NaN when either class is empty)."""
    if n_signal <= 0 or n_noise <= 0:
        return math.nan
    h = (hits + 0.5) / (n_signal + 1.0)
    f = (false_alarms + 0.5) / (n_noise + 1.0)
    return float(sst.norm.ppf(h) - sst.norm.ppf(f))


def dprime_2afc(correct: int, n: int) -> float:
    """2AFC d' = sqrt(2) z(Pc), Pc log-linear corrected."""
    if n <= 0:
        return math.nan
    return float(math.sqrt(2.0) * sst.norm.ppf((correct + 0.5) / (n + 1.0)))


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = sst.rankdata(s)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (items x categories) table of rating counts.

    Items with fewer than two ratings are dropped; the number of raters may vary
    per item. NaN when nothing is left or all ratings fall in one category.
    """
    c = np.asarray(counts, dtype=np.float64)
    n_i = c.sum(axis=1)
    c, n_i = c[n_i >= 2], n_i[n_i >= 2]
    if c.shape[0] == 0:
        return math.nan
    p_i = ((c**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_bar = p_i.mean()
    p_j = c.sum(axis=0) / n_i.sum()
    p_e = float((p_j**2).sum())
    if p_e >= 1.0:
        return math.nan
    return float((p_bar - p_e) / (1.0 - p_e))


# --------------------------------------------------------------------------- study summary
def synthetic_score(a: dict[str, Any], scale: str) -> float:
    """Ordinal 'how synthetic' rating of a single-image answer (see module docstring)."""
    if scale == "six" and a["rating"] is not None:
        return float(a["rating"])
    said_syn = a["label"] == "synthetic"
    if scale == "confidence":
        conf = a["confidence"] or 1
        return float(5 + conf if said_syn else 6 - conf)
    return 2.0 if said_syn else 1.0


def _row(
    reader: str,
    scope: str,
    model: str | None,
    contrast: str | None,
    answers: list[dict[str, Any]],
    mode: str,
    scale: str,
    ci: str,
) -> dict[str, Any]:
    n = len(answers)
    correct = sum(int(a["correct"]) for a in answers)
    rts = [a["response_ms"] for a in answers if a["response_ms"] is not None]
    row: dict[str, Any] = {
        "reader": reader,
        "scope": scope,
        "model": model or "",
        "contrast": contrast or "",
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else math.nan,
    }
    row["accuracy_ci_low"], row["accuracy_ci_high"] = proportion_ci(correct, n, ci)
    if mode == "2afc":
        n_syn = n_real = n
        syn_as_real = real_as_syn = n - correct
        row["dprime"] = dprime_2afc(correct, n)
        row["auc"] = correct / n if n else math.nan
    else:
        reals = [a for a in answers if a["kind"] == "real"]
        syns = [a for a in answers if a["kind"] == "synthetic"]
        n_real, n_syn = len(reals), len(syns)
        real_as_syn = sum(1 for a in reals if not a["correct"])
        syn_as_real = sum(1 for a in syns if not a["correct"])
        row["dprime"] = dprime(n_syn - syn_as_real, n_syn, real_as_syn, n_real)
        row["auc"] = auc(
            [synthetic_score(a, scale) for a in answers],
            [a["kind"] == "synthetic" for a in answers],
        )
    row.update(
        n_synthetic=n_syn,
        synthetic_as_real=syn_as_real,
        synthetic_as_real_frac=syn_as_real / n_syn if n_syn else math.nan,
        n_real=n_real,
        real_as_synthetic=real_as_syn,
        real_as_synthetic_frac=real_as_syn / n_real if n_real else math.nan,
        median_response_s=float(np.median(rts)) / 1000.0 if rts else math.nan,
    )
    row["synthetic_as_real_ci_low"], row["synthetic_as_real_ci_high"] = proportion_ci(
        syn_as_real, n_syn, ci
    )
    row["real_as_synthetic_ci_low"], row["real_as_synthetic_ci_high"] = proportion_ci(
        real_as_syn, n_real, ci
    )
    return row


def _scoped_rows(
    reader: str, answers: list[dict[str, Any]], settings: sdb.StudySettings, ci: str
) -> list[dict[str, Any]]:
    mode, scale = settings.mode, settings.scale
    out = [_row(reader, "total", None, None, answers, mode, scale, ci)]
    contrasts = [c for c in settings.contrasts if any(a["contrast"] == c for a in answers)]
    models = [m for m in settings.models if any(a["model"] == m for a in answers)]
    for c in contrasts:
        out.append(
            _row(
                reader,
                "contrast",
                None,
                c,
                [a for a in answers if a["contrast"] == c],
                mode,
                scale,
                ci,
            )
        )
    for m in models:
        sel = [a for a in answers if a["model"] == m or a["kind"] == "real"]
        out.append(_row(reader, "model", m, None, sel, mode, scale, ci))
        for c in contrasts:
            sel_c = [a for a in sel if a["contrast"] == c]
            if any(a["model"] == m for a in sel_c):
                out.append(_row(reader, "model x contrast", m, c, sel_c, mode, scale, ci))
    return out


def summarise(conn: sqlite3.Connection, *, ci: str = "wilson") -> dict[str, Any]:
    """Everything `study results` and the admin page show, as plain data."""
    if ci not in ("wilson", "exact"):
        raise ValueError("ci must be 'wilson' or 'exact'")
    settings = sdb.load_settings(conn)
    answers = sdb.answer_rows(conn)
    by_reader: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in answers:
        by_reader[a["reader"]].append(a)
    rows: list[dict[str, Any]] = []
    if answers:
        rows += _scoped_rows(POOLED, answers, settings, ci)
    if len(by_reader) > 1:
        for name, ans in by_reader.items():
            rows += _scoped_rows(name, ans, settings, ci)
    return {
        "settings": {
            "mode": settings.mode,
            "scale": settings.scale,
            "exposure_ms": settings.exposure_ms,
            "contrasts": settings.contrasts,
            "models": settings.models,
            "ci": ci,
        },
        "readers": sdb.reader_progress(conn),
        "n_answers": len(answers),
        "rows": rows,
        "kappa": agreement(answers, settings.mode),
    }


def agreement(answers: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Fleiss' kappa between readers on shared items (category: said real / picked right)."""
    readers = {a["reader"] for a in answers}
    table: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for a in answers:
        if mode == "2afc":
            cat = int(a["correct"])
        else:
            said_real = (a["kind"] == "real") == bool(a["correct"])
            cat = int(said_real)
        table[a["item"]][cat] += 1
    counts = np.array([v for v in table.values() if sum(v) >= 2], dtype=float).reshape(-1, 2)
    kappa = fleiss_kappa(counts) if len(readers) >= 2 else math.nan
    return {"kappa": kappa, "n_items": int(counts.shape[0]), "n_readers": len(readers)}


# --------------------------------------------------------------------------- figure
def figure_png(summary: dict[str, Any]) -> bytes:
    """:func:`figure` as PNG bytes (the admin page's figure)."""
    import io

    buf = io.BytesIO()
    figure(summary, buf)
    return buf.getvalue()


def figure(summary: dict[str, Any], out: Any) -> None:
    """The study's Figure 1d-e: error fractions per contrast and per model (pooled readers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["reader"] == POOLED]
    fig, (ax_d, ax_e) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)

    def bar(ax, x, row, key, color, label=None):
        f = row[f"{key}_frac"]
        lo, hi = row[f"{key}_ci_low"], row[f"{key}_ci_high"]
        if math.isnan(f):
            return
        ax.bar(
            x,
            f,
            width=0.38,
            color=color,
            label=label,
            yerr=[[f - lo], [hi - f]],
            capsize=3,
            ecolor="0.2",
        )

    groups = [r for r in rows if r["scope"] == "contrast"] + [
        r for r in rows if r["scope"] == "total"
    ]
    for i, r in enumerate(groups):
        bar(
            ax_d,
            i - 0.2,
            r,
            "synthetic_as_real",
            "tab:red",
            "synthetic labelled real" if i == 0 else None,
        )
        bar(
            ax_d,
            i + 0.2,
            r,
            "real_as_synthetic",
            "tab:blue",
            "real labelled synthetic" if i == 0 else None,
        )
    ax_d.set_xticks(range(len(groups)), [r["contrast"] or "all" for r in groups])
    ax_d.set_title("d  Reader errors per contrast")

    mc = [r for r in rows if r["scope"] in ("model x contrast", "model")]
    models = list(dict.fromkeys(r["model"] for r in mc))
    contrasts = list(dict.fromkeys(r["contrast"] for r in mc if r["contrast"]))
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(contrasts) + 1)
    for j, c in enumerate([*contrasts, ""]):
        for i, m in enumerate(models):
            sel = [r for r in mc if r["model"] == m and r["contrast"] == c]
            if sel:
                x = i - 0.4 + width * (j + 0.5)
                f = sel[0]["synthetic_as_real_frac"]
                lo, hi = sel[0]["synthetic_as_real_ci_low"], sel[0]["synthetic_as_real_ci_high"]
                ax_e.bar(
                    x,
                    f,
                    width=width * 0.95,
                    color=colors(j),
                    label=(c or "all contrasts") if i == 0 else None,
                    yerr=[[f - lo], [hi - f]],
                    capsize=3,
                    ecolor="0.2",
                )
    ax_e.set_xticks(range(len(models)), models)
    ax_e.set_title("e  Synthetic images labelled real, per model")
    for ax in (ax_d, ax_e):
        ax.set_ylim(0, 1.25)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("fraction of images")
        ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    if summary["settings"]["mode"] == "2afc":
        fig.suptitle("2AFC: fraction of pairs where the synthetic image was picked as real")
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
