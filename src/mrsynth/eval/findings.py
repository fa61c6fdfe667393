"""Findings versus the study: does this evaluation reproduce the study's claims?

The study (T1w <-> T2w with Simple, CycleGAN, CycleGAN_s, UNIT and
Generators_s, metrics on z-scored whole images) made four claims. Each is
turned into paired comparisons on the per-image rows of one region (the
evaluation's primary region; the study's choice is the whole image):

========================  ==========================================================
claim                     comparisons (each direction; MAE, PSNR, MI)
========================  ==========================================================
``generators_s_best``     Generators_s better than every other study model present
``simple_worst``          every other study model better than Simple, except MI of
                          synthetic T2 (the study's exception: not tested)
``cyclegan_unit_equal``   CycleGAN, CycleGAN_s and UNIT pairwise not different
``t1_better_than_t2``     per study model: synthetic T1 (T2w2T1w) better than
                          synthetic T2 (T1w2T2w), paired on the same slices
========================  ==========================================================

Every comparison reports the mean paired difference (first - second, in the
metric's units) with its 95 % bootstrap CI and a Wilcoxon signed-rank p-value
on per-image values, Holm-corrected over the comparisons of the claim.
Directional claims use one-sided tests: a comparison *supports* the claim
when the claimed direction is significant (``p_holm < ALPHA``), *contradicts*
it when the opposite direction is, and is *inconclusive* otherwise. The
equality claim uses two-sided tests: *supports* when no pair differs
significantly (absence of evidence, so read the CIs for how close they are),
*contradicts* when one does.

A claim is ``reproduced`` when every comparison supports it, ``not
reproduced`` when any contradicts it, ``inconclusive`` otherwise, and ``not
evaluated`` when the models it needs are absent (models are recognised by
the run's model name; the first run of a model name counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mrsynth.eval.metrics import HIGHER_IS_BETTER, METRIC_LABELS
from mrsynth.eval.stats import ALPHA, holm, paired_difference, paired_values, wilcoxon_test

#: The study's models (mrsynth model names).
STUDY_MODELS: tuple[str, ...] = ("simple", "cyclegan", "cyclegan_s", "unit", "generators_s")
#: The study's metrics.
CLAIM_METRICS: tuple[str, ...] = ("mae", "psnr", "mi")
CLAIMS: dict[str, str] = {
    "generators_s_best": "Generators_s is best on MAE, PSNR and MI",
    "simple_worst": "Simple is worst, except on MI of synthetic T2",
    "cyclegan_unit_equal": "CycleGAN, CycleGAN_s and UNIT perform alike",
    "t1_better_than_t2": "T1 is synthesised better than T2",
}
REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"
INCONCLUSIVE, NOT_EVALUATED = "inconclusive", "not evaluated"
SUPPORTS, CONTRADICTS, UNDECIDED = "supports", "contradicts", "inconclusive"

FINDINGS_FIELDS = ("claim", "claim_text", "status", "note", "region", "direction", "metric",
                   "first", "second", "test", "n", "mean_diff", "ci_low", "ci_high", "p_value",
                   "p_holm", "outcome")


def _better_alternative(metric: str) -> str:
    """scipy ``alternative`` for "first is better than second"."""
    return "greater" if HIGHER_IS_BETTER[metric] else "less"


def _flip(alternative: str) -> str:
    return "less" if alternative == "greater" else "greater"


def _compare(
    rows: Sequence[dict[str, Any]], metric: str, first: dict[str, str], second: dict[str, str],
    seed: int,
) -> dict[str, Any]:
    x, y = paired_values(rows, metric, first, second)
    return {"metric": metric, **paired_difference(x, y, seed), "_x": x, "_y": y}


def _directional(comps: list[dict[str, Any]]) -> None:
    """Fill p-values and outcomes of "first better than second" comparisons (Holm per side)."""
    p_for, p_against = [], []
    for c in comps:
        alt = _better_alternative(c["metric"])
        p_for.append(wilcoxon_test(c["_x"], c["_y"], alt)[1])
        p_against.append(wilcoxon_test(c["_x"], c["_y"], _flip(alt))[1])
    for c, p, adj, adj_against in zip(comps, p_for, holm(p_for), holm(p_against), strict=True):
        c.update(test="one-sided", p_value=p, p_holm=adj)
        c["outcome"] = (SUPPORTS if adj < ALPHA else CONTRADICTS if adj_against < ALPHA
                        else UNDECIDED)


def _equality(comps: list[dict[str, Any]]) -> None:
    ps = [wilcoxon_test(c["_x"], c["_y"])[1] for c in comps]
    for c, p, adj in zip(comps, ps, holm(ps), strict=True):
        c.update(test="two-sided", p_value=p, p_holm=adj)
        c["outcome"] = CONTRADICTS if adj < ALPHA else SUPPORTS


def _status(comps: list[dict[str, Any]]) -> str:
    outcomes = [c["outcome"] for c in comps]
    if not outcomes:
        return NOT_EVALUATED
    if all(o == SUPPORTS for o in outcomes):
        return REPRODUCED
    if any(o == CONTRADICTS for o in outcomes):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def findings(
    rows: Sequence[dict[str, Any]],
    models: Mapping[str, str],
    contrasts: Sequence[str],
    *,
    region: str = "image",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each claim: ``{"claim", "claim_text", "status", "note", "comparisons": [...]}``.

    ``rows`` are per-image metric rows, ``models`` maps evaluation labels to model names
    (baselines and non-study models are ignored), ``contrasts`` is the pair (A, B).
    """
    sel = [r for r in rows if r["region"] == region]
    label: dict[str, str] = {}
    for lab, name in models.items():
        if name in STUDY_MODELS and name not in label and any(r["model"] == lab for r in sel):
            label[name] = lab
    a, b = contrasts
    dirs = [f"{a}2{b}", f"{b}2{a}"]
    t1t2 = {a, b} == {"T1w", "T2w"}
    to_t1, to_t2 = "T2w2T1w", "T1w2T2w"

    def vs(m1: str, m2: str, d: str, metric: str) -> dict[str, Any]:
        c = _compare(sel, metric, {"model": label[m1], "direction": d},
                     {"model": label[m2], "direction": d}, seed)
        return {**c, "direction": d, "first": label[m1], "second": label[m2]}

    out: list[dict[str, Any]] = []

    def add(claim: str, comps: list[dict[str, Any]], note: str) -> None:
        for c in comps:
            c.pop("_x", None)
            c.pop("_y", None)
        out.append({"claim": claim, "claim_text": CLAIMS[claim], "region": region,
                    "status": _status(comps), "note": note, "comparisons": comps})

    present = [m for m in STUDY_MODELS if m in label]
    missing = [m for m in STUDY_MODELS if m not in label]
    absent = f" (absent: {', '.join(missing)})" if missing else ""

    # 1. Generators_s best
    others = [m for m in present if m != "generators_s"]
    comps: list[dict[str, Any]] = []
    note = "needs generators_s and another study model"
    if "generators_s" in label and others:
        comps = [vs("generators_s", o, d, m) for d in dirs for m in CLAIM_METRICS
                 for o in others]
        _directional(comps)
        note = f"generators_s against {', '.join(others)}{absent}"
    add("generators_s_best", comps, note)

    # 2. Simple worst, except MI of synthetic T2
    others = [m for m in present if m != "simple"]
    comps = []
    note = "needs simple and another study model"
    if "simple" in label and others:
        comps = [vs(o, "simple", d, m) for d in dirs for m in CLAIM_METRICS for o in others
                 if not (m == "mi" and d.endswith("2T2w"))]
        _directional(comps)
        note = (f"{', '.join(others)} against simple{absent}; MI of synthetic T2 not tested "
                "(the study's exception)")
    add("simple_worst", comps, note)

    # 3. CycleGAN ~ CycleGAN_s ~ UNIT
    trio = [m for m in ("cyclegan", "cyclegan_s", "unit") if m in label]
    comps = []
    note = "needs two of cyclegan, cyclegan_s, unit"
    if len(trio) >= 2:
        comps = [vs(m1, m2, d, m) for d in dirs for m in CLAIM_METRICS
                 for i, m1 in enumerate(trio) for m2 in trio[i + 1:]]
        _equality(comps)
        note = (f"pairs of {', '.join(trio)}; 'supports' means no significant difference, "
                "not proven equality: read the CIs")
    add("cyclegan_unit_equal", comps, note)

    # 4. T1 synthesised better than T2
    comps = []
    note = "needs a T1w/T2w pair and a study model"
    if t1t2 and present:
        for mod in present:
            for m in CLAIM_METRICS:
                c = _compare(sel, m, {"model": label[mod], "direction": to_t1},
                             {"model": label[mod], "direction": to_t2}, seed)
                comps.append({**c, "direction": f"{to_t1} vs {to_t2}", "first": label[mod],
                              "second": label[mod]})
        _directional(comps)
        note = f"synthetic T1 minus synthetic T2 per model ({', '.join(present)}){absent}"
    add("t1_better_than_t2", comps, note)
    return out


def findings_rows(found: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows for ``findings.csv``: one per comparison (one per claim without any)."""
    rows: list[dict[str, Any]] = []
    for f in found:
        head = {k: f[k] for k in ("claim", "claim_text", "status", "note", "region")}
        if not f["comparisons"]:
            rows.append(head)
        rows.extend({**head, **c} for c in f["comparisons"])
    return rows


def findings_from_rows(rows: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Regroup ``findings.csv`` rows (as read back) into claims, in file order."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        f = out.setdefault(r["claim"], {k: r.get(k, "") for k in
                                        ("claim", "claim_text", "status", "note", "region")}
                           | {"comparisons": []})
        if r.get("metric"):
            f["comparisons"].append(dict(r))
    return list(out.values())


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)
