"""Do the demo's models beat the intensity lookup table? (issue 12's targets)

Runs (or resumes: finished stages are reused) ``mrsynth demo`` on the shared data with the
two fixed test subjects, then prints, per model and direction, the in-brain z-scored MAE
and SSIM on the test split beside ``baseline_intensity``'s, the relative MAE difference,
the one-sided paired Wilcoxon p-value of the verdict, and the epoch each run was evaluated
at (its best validation epoch). Writes ``benchmarks/results/demo_quality[-TAG].json`` with the
table, the wall time of this invocation and the demo's per-stage times.

    .venv/bin/python benchmarks/demo_quality.py [--out DIR] [--data ../shared/data/mrpaired]
        [--models cyclegan,generators_s,...] [--val-subjects sub-ms07 | --val-fraction 0.2]
        [--tag NAME]

The table also gives each model's in-brain C2ST accuracy (a classifier telling synthetic
from real slices; 0.5: indistinguishable), the number issue 12 compares between the
unpaired models and ``generators_s``, and the load average while it ran.

A measurement, not a test: the 2-core machine is shared, so wall times vary with its load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from mrsynth.utils import atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
TEST_SUBJECTS = ("sub-ms19", "sub-fg6692")
BASELINE = "baseline_intensity"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def quality_table(eval_dir: Path) -> list[dict[str, Any]]:
    """In-brain MAE/SSIM of every model and baseline_intensity, per direction."""
    summary = [r for r in _rows(eval_dir / "summary.csv") if r["region"] == "brain"]
    mean = {(r["model"], r["direction"], r["metric"]): float(r["mean"]) for r in summary}
    verdict = {(r["model"], r["direction"], r["metric"]): r
               for r in _rows(eval_dir / "verdict.csv")} if (
        eval_dir / "verdict.csv").is_file() else {}
    c2st = {(r["model"], r["direction"]): float(r["accuracy"])
            for r in _rows(eval_dir / "c2st.csv") if r.get("accuracy")} if (
        eval_dir / "c2st.csv").is_file() else {}
    man = json.loads((eval_dir / "eval.json").read_text())
    epochs = {r["label"]: (r.get("checkpoint"), r.get("epoch")) for r in man["runs"]}
    out = []
    for (model, direction, metric), value in sorted(mean.items()):
        if metric != "mae" or model.startswith("baseline_"):
            continue
        base = mean[(BASELINE, direction, "mae")]
        v = verdict.get((model, direction, "mae"), {})
        out.append({
            "model": model, "direction": direction,
            "checkpoint": epochs.get(model, (None, None))[0],
            "epoch": epochs.get(model, (None, None))[1],
            "mae_brain": value, "ssim_brain": mean.get((model, direction, "ssim")),
            "baseline_mae_brain": base,
            "baseline_ssim_brain": mean.get((BASELINE, direction, "ssim")),
            "mae_vs_baseline_pct": 100.0 * (value - base) / base,
            "p_beats_baseline": float(v["p_value"]) if v.get("p_value") else None,
            "p_holm": float(v["p_holm"]) if v.get("p_holm") else None,
            "c2st_accuracy": c2st.get((model, direction)),
            "baseline_c2st_accuracy": c2st.get((BASELINE, direction)),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mrpaired"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mrsynth-demo-quality"))
    ap.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--val-subjects", default="sub-ms07",
                    help="validation subjects (comma-separated; '' uses --val-fraction)")
    ap.add_argument("--tag", default="", help="result file suffix (demo_quality-TAG.json)")
    ap.add_argument("--test-subjects", default=",".join(TEST_SUBJECTS),
                    help="comma-separated test subjects (default: issue 12's)")
    args = ap.parse_args()
    from mrsynth.demo import run_demo

    vals = [s.strip() for s in args.val_subjects.split(",") if s.strip()] or None
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    tests = [t.strip() for t in args.test_subjects.split(",") if t.strip()]
    res = run_demo(args.out, data=args.data, test_subjects=tests,
                   val_fraction=args.val_fraction, val_subjects=vals, device="cpu",
                   models=args.models.split(",") if args.models else None)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    table = quality_table(res["eval"])
    print(f"\n{'model':<14}{'direction':<10}{'epoch':>6}{'MAE brain':>11}{'table':>8}"
          f"{'vs table':>10}{'p':>10}{'SSIM brain':>12}{'table':>8}{'C2ST':>7}")
    for r in table:
        p, acc = r["p_beats_baseline"], r["c2st_accuracy"]
        print(f"{r['model']:<14}{r['direction']:<10}{r['epoch'] or '':>6}"
              f"{r['mae_brain']:>11.3f}{r['baseline_mae_brain']:>8.3f}"
              f"{r['mae_vs_baseline_pct']:>+9.1f}%{'' if p is None else f'{p:.2g}':>10}"
              f"{r['ssim_brain']:>12.3f}{r['baseline_ssim_brain']:>8.3f}"
              f"{'' if acc is None else f'{acc:.3f}':>7}")
    history = json.loads((args.out / "demo.json").read_text())["invocations"]
    print(f"\nthis invocation: {wall:.0f} s wall, {ru.ru_utime + ru.ru_stime:.0f} s CPU, load "
          f"{load0[0]:.1f} -> {load1[0]:.1f}; demo stages (first invocation): "
          f"{json.dumps({k: round(v) for k, v in history[0]['timings_s'].items()})}")
    dest = REPO / "benchmarks" / "results" / (
        f"demo_quality-{args.tag}.json" if args.tag else "demo_quality.json")
    atomic_write_json(dest, {
        "command": "mrsynth demo --data ../shared/data/mrpaired --test-subjects "
                   f"{','.join(tests)} "
                   + (f"--val-subjects {','.join(vals)}" if vals
                      else f"--val-fraction {args.val_fraction}")
                   + (f" --models {args.models}" if args.models else ""),
        "table": table, "wall_s_this_invocation": round(wall, 1),
        "cpu_s_this_process": round(ru.ru_utime + ru.ru_stime, 1),
        "load_average_before": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in load1],
        "demo_invocations": history, "environment": environment_info()})
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
