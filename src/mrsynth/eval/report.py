"""One self-contained HTML report from an evaluation directory.

Everything is inside the file: figures are base64-embedded PNGs, styles are
inline, no scripts or web fonts, so it opens offline and can be mailed or
archived as is. It is built only from what ``mrsynth evaluate`` wrote
(``eval.json`` and the CSV/PNG files), so it can be rebuilt any time.

It opens with the verdict (which trained models beat ``baseline_intensity``
inside the brain, from ``verdict.csv``), then the summary tables and the
volume table (each test subject's slices stacked back into a volume,
:mod:`mrsynth.eval.volume`), figures, realism, paired tests, the study's
claims (``findings.csv``), timing and provenance. Baselines are listed with
``kind`` = ``baseline`` and shown in grey italics.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrsynth.errors import DataError
from mrsynth.eval.findings import findings_from_rows
from mrsynth.eval.metrics import METRIC_LABELS, METRICS, RELATIVE_ERROR_EPS
from mrsynth.eval.stats import BASELINE, fmt, fmt_p, summary_table, verdict_lines
from mrsynth.eval.volume import VOLUME_NOTE, volume_table
from mrsynth.utils import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.8em;max-height:30em}
.sig{font-weight:bold}.note{color:#555;font-size:.9em}
.base{color:#666;font-style:italic}.verdict{background:#f3f7ff;border:1px solid #b8c8e8;
padding:.6em 1em}.ok{color:#17622a;font-weight:bold}.bad{color:#9a1c1c;font-weight:bold}
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], raw: bool = False) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for r in rows:
        tds = "".join(f"<td>{c if raw else html.escape(str(c))}</td>" for c in r)
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p class='note'>({html.escape(path.name)} missing)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"


def _pre(obj: Any) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, default=str))}</pre>"


def _human(c: dict[str, str]) -> str:
    acc = _f(c.get("human_accuracy"))
    if not math.isfinite(acc):
        return "n/a"
    return (f"{fmt(acc)} [{fmt(_f(c.get('human_ci_low')))}, {fmt(_f(c.get('human_ci_high')))}]"
            f" ({c.get('human_n', '')})")


def _optional_csv(path: Path) -> list[dict[str, str]] | None:
    """A CSV that evaluations written before it existed lack (None then)."""
    return read_csv(path) if path.is_file() else None


def _name(label: str, kinds: dict[str, str]) -> str:
    """A model label as HTML, baselines marked."""
    if kinds.get(label) == BASELINE:
        return f"<span class='base'>{html.escape(label)} (baseline)</span>"
    return html.escape(label)


def _verdict_html(verdict: list[dict[str, str]] | None, directions: list[str]) -> str:
    if verdict is None:
        return ("<div class='verdict'><p>No verdict: this evaluation predates the baselines "
                "(no verdict.csv). Run <code>mrsynth evaluate</code> again.</p></div>")
    lines = verdict_lines(verdict, directions)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return (
        "<div class='verdict'><p><b>Verdict.</b> Which trained models have a lower in-brain "
        "MAE than <i>baseline_intensity</i> (a per-pixel lookup table from source to target "
        "intensity fitted on the training split): one-sided Wilcoxon signed-rank test on "
        "per-slice MAE inside the brain mask, Holm-corrected over the models of a direction, "
        "beating = p_holm &lt; 0.05. A model that does not beat it has not shown that it "
        f"learned more than an intensity mapping.</p><ul>{items}</ul></div>"
    )


def _findings_html(rows: list[dict[str, str]] | None) -> str:
    if rows is None:
        return "<p class='note'>Not available (no findings.csv): run evaluate again.</p>"
    parts = [
        "<p class='note'>Each claim of the study, tested on this evaluation's test slices "
        "(primary region) with paired comparisons: mean paired difference (first − second) "
        "with its 95 % bootstrap CI and a Wilcoxon signed-rank p-value, Holm-corrected over "
        "the comparisons of the claim. Directional claims: one-sided; a comparison supports "
        "the claim when p_holm &lt; 0.05 in the claimed direction and contradicts it when the "
        "opposite direction is significant. The equality claim: two-sided; no significant "
        "difference counts as support (not proof of equality: read the CIs). Reproduced = "
        "every comparison supports it; not reproduced = at least one contradicts it.</p>"
    ]
    for f in findings_from_rows(rows):
        status = f["status"]
        cls = "ok" if status == "reproduced" else "bad" if status == "not reproduced" else ""
        parts.append(
            f"<h3>{html.escape(f['claim_text'])}: <span class='{cls}'>{html.escape(status)}"
            f"</span></h3><p class='note'>{html.escape(f['note'])}</p>"
        )
        if f["comparisons"]:
            parts.append(_table(
                ["direction", "metric", "first", "second", "n", "mean diff", "95 % CI", "test",
                 "p", "p_holm", "outcome"],
                [[c["direction"], METRIC_LABELS.get(c["metric"], c["metric"]), c["first"],
                  c["second"], c["n"], fmt(_f(c["mean_diff"]), 4),
                  f"[{fmt(_f(c['ci_low']), 4)}, {fmt(_f(c['ci_high']), 4)}]", c["test"],
                  fmt_p(_f(c["p_value"])), fmt_p(_f(c["p_holm"])), c["outcome"]]
                 for c in f["comparisons"]],
            ))
    return "".join(parts)


def build_report(eval_dir: str | Path, out: str | Path) -> Path:
    """Write the HTML report for ``eval_dir`` to ``out`` (atomically); return ``out``."""
    ev = Path(eval_dir)
    manifest_path = ev / "eval.json"
    if not manifest_path.is_file():
        raise DataError(
            f"{ev} is not an evaluation directory (no eval.json). Create one with "
            "`mrsynth evaluate --runs RUN_DIR ... --data PREPARED.npz --out EVAL_DIR`."
        )
    try:
        man = json.loads(manifest_path.read_text(encoding="utf-8"))
        summary = [
            {**r, **{k: _f(r[k]) for k in ("mean", "std", "median", "ci_low", "ci_high")}}
            for r in read_csv(ev / "summary.csv")
        ]
        wilcoxon = read_csv(ev / "wilcoxon.csv")
        timing = read_csv(ev / "timing.csv")
        c2st = read_csv(ev / "c2st.csv")
        verdict = _optional_csv(ev / "verdict.csv")
        found = _optional_csv(ev / "findings.csv")
        volumes = _optional_csv(ev / "volume.csv")
        volume_tests = _optional_csv(ev / "volume_tests.csv") or []
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"Cannot read the evaluation in {ev}: {exc}. Run `mrsynth evaluate` again "
            "with --overwrite."
        ) from exc

    primary = man.get("primary_region", "image")
    regions = man.get("regions", [primary])
    dir_info = man.get("directions", {})
    models = man.get("models") or [{"label": r["label"], "kind": "model"} for r in man["runs"]]
    kinds = {m["label"]: m["kind"] for m in models}
    order = [m["label"] for m in models]
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>mrsynth evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>mrsynth evaluation report</h1>",
        "<p>Models: " + ", ".join(_name(m, kinds) for m in order) + ". "
        "Directions: " + ", ".join(html.escape(d) for d in dir_info) + ". "
        f"Test images: {man.get('n_test_slices', 'n/a')} slices of "
        f"{len(man.get('test_subjects', []))} subjects "
        f"({html.escape(', '.join(man.get('test_subjects', [])))}). "
        f"Created {html.escape(str(man.get('created', '')))}.</p>",
        f"<p class='note'>Data: {html.escape(str(man.get('data', {}).get('path', '')))}</p>",
        _verdict_html(verdict, list(dir_info)),
    ]

    # ---------------------------------------------------------------- summary tables
    parts.append("<h2>Summary</h2>")
    parts.append(
        "<p class='note'>Each cell: mean ± standard deviation, median [95 % bootstrap CI of the "
        "mean]. Metrics on per-image z-scored images; "
        f"MI in nats with {man.get('bins', 256)} bins; PSNR peak = data range (max − min) of the "
        "z-scored real image; SSIM with the same data range. NMI is scikit-image's normalised "
        "mutual information (1 to 2). Baselines: baseline_identity = the source image; "
        "baseline_intensity = per-bin median target intensity of the training brains; "
        "baseline_mean = the real brain's mean inside the brain (its in-brain MAE is the "
        "mean |z| of the real image).</p>"
    )
    for region in [primary] + [r for r in regions if r != primary]:
        label = "whole image" if region == "image" else "inside the brain mask"
        header, body = summary_table(summary, region, models=order)
        parts.append(f"<h3>Region: {label}{' (primary)' if region == primary else ''}</h3>")
        parts.append(_table(header, body))

    parts.append("<h3>Volumes: consistent in 3-D</h3>")
    if volumes is None:
        parts.append("<p class='note'>Not available (no volume.csv): this evaluation predates "
                     "the volume metrics. Run <code>mrsynth evaluate</code> again.</p>")
    else:
        parts.append(f"<p class='note'>{html.escape(VOLUME_NOTE)} Per subject: volume.csv."
                     "</p>")
        parts.append(_table(*volume_table(volumes, volume_tests, models=order)))

    # ---------------------------------------------------------------- figures
    parts.append("<h2>Figure 1</h2>")
    parts.append(_img(ev / "figure1.png", "Figure 1"))
    for region in regions:
        if region != primary:
            parts.append(_img(ev / f"figure1-{region}.png", f"Figure 1 ({region})"))
    parts.append("<h2>Figure 2</h2>")
    fig2 = man.get("figure2", {})
    parts.append(
        f"<p class='note'>Subject {html.escape(str(fig2.get('subject', '')))}, slice "
        f"{html.escape(str(fig2.get('slice', '')))}. Relative error |syn − real| / "
        f"max(|real|, {RELATIVE_ERROR_EPS:g}) on images z-scored inside the brain mask; "
        "transparent outside the brain; colour scale capped at 1 (100 %).</p>"
    )
    parts.append(_img(ev / "figure2.png", "Figure 2"))
    from mrsynth.eval.curves import learning_curves_html  # each run's validation curve

    parts.append(learning_curves_html(man["runs"]))

    # ---------------------------------------------------------------- realism
    parts.append("<h2>Realism: classifier two-sample test</h2>")
    parts.append(
        "<p class='note'>A small CNN trained on half of the test slices to tell real from one "
        "model's synthetic images, scored on the other half. 50 % = indistinguishable to it. "
        "p: one-sided binomial test of accuracy &gt; 50 %. The human column is the perceptual "
        "study's accuracy (`mrsynth study results`) when a study was given.</p>"
    )
    parts.append(_table(
        ["model", "kind", "direction", "C2ST accuracy", "95 % CI", "p", "n test",
         "human accuracy [95 % CI] (n)"],
        [[c["model"], c.get("kind", ""), c["direction"], fmt(_f(c["accuracy"])),
          f"[{fmt(_f(c['ci_low']))}, {fmt(_f(c['ci_high']))}]", fmt_p(_f(c["p_value"])),
          c["n_test"], _human(c)] for c in c2st],
    ))

    # ---------------------------------------------------------------- tests
    parts.append("<h2>Paired Wilcoxon signed-rank tests</h2>")
    parts.append(
        "<p class='note'>Two-sided, on the same test images; p_holm corrects for the model "
        "pairs within each region, direction and metric; median diff = median(a − b). "
        "Bold: p_holm &lt; 0.05.</p>"
    )
    rows = []
    for w in wilcoxon:
        if w["region"] != primary:
            continue
        sig = _f(w["p_holm"]) < 0.05
        cells = [w["direction"], METRIC_LABELS.get(w["metric"], w["metric"]), w["model_a"],
                 w["model_b"], w["n"], fmt(_f(w["median_diff"]), 4), fmt_p(_f(w["p_value"])),
                 fmt_p(_f(w["p_holm"]))]
        cells = [_name(c, kinds) if i in (2, 3) else html.escape(str(c))
                 for i, c in enumerate(cells)]
        if sig:
            cells = [f"<span class='sig'>{c}</span>" for c in cells]
        rows.append(cells)
    parts.append(_table(["direction", "metric", "model a", "model b", "n", "median diff", "p",
                         "p_holm"], rows, raw=True))
    parts.append("<p class='note'>All regions: wilcoxon.csv in the evaluation directory.</p>")

    # ---------------------------------------------------------------- the study's claims
    parts.append("<h2>Findings versus the study</h2>")
    parts.append(_findings_html(found))

    # ---------------------------------------------------------------- timing
    parts.append("<h2>Timing</h2>")
    parts.append(_table(
        ["model", "kind", "direction", "train s/epoch", "epochs", "train device",
         "inference ms/slice", "inference device", "batch size"],
        [[t["model"], t.get("kind", ""), t["direction"], fmt(_f(t["train_s_per_epoch"]), 2),
          t["epochs"],
          t["train_device"], fmt(_f(t["inference_ms_per_slice"]), 2), t["inference_device"],
          t["batch_size"]] for t in timing],
    ))

    # ---------------------------------------------------------------- runs and env
    parts.append("<h2>Runs</h2>")
    for r in man["runs"]:
        parts.append(
            f"<details><summary>{html.escape(r['label'])} ({html.escape(r['model'])}, "
            f"{html.escape(str(r['run_dir']))})</summary>{_pre(r.get('config', {}))}</details>"
        )
    parts.append("<h2>Data preparation settings</h2>")
    parts.append(_pre(man.get("data", {}).get("settings", {})))
    parts.append("<h2>Environment</h2>")
    parts.append(_pre(man.get("environment", {})))
    parts.append("<h2>Metric definitions</h2><ul>")
    for m in METRICS:
        parts.append(f"<li>{html.escape(METRIC_LABELS[m])}: "
                     f"{html.escape(man.get('metric_definitions', {}).get(m, ''))}</li>")
    parts.append("</ul></body></html>\n")
    dest = Path(out)
    atomic_write_text(dest, "\n".join(parts))
    return dest
