"""Do the demo's models beat the intensity lookup table? (issue 12's targets)

Runs (or resumes: finished stages are reused) ``mrsynth demo`` on the shared data with the
two fixed test subjects, then prints, per model and direction, the in-brain z-scored MAE
and SSIM on the test split beside ``baseline_intensity``'s, the relative MAE difference,
the one-sided paired Wilcoxon p-value of the verdict, and the epoch each run was evaluated
at (its best validation epoch). Writes ``benchmarks/results/demo_quality[-TAG].json`` with the
table, the wall time of this invocation and the demo's per-stage times.

    .venv/bin/python benchmarks/demo_quality.py [--out DIR] [--data ../shared/data/mrpaired]
        [--models cyclegan,generators_s,...] [--val-fraction 0.2] [--tag NAME]

A measurement, not a test: the 2-core machine is shared, so wall times vary with its load.
"""

from __future__ import annotations

import argparse
import csv
import json
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
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mrpaired"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mrsynth-demo-quality"))
    ap.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--tag", default="", help="result file suffix (demo_quality-TAG.json)")
    args = ap.parse_args()
    from mrsynth.demo import run_demo

    t0 = time.perf_counter()
    res = run_demo(args.out, data=args.data, test_subjects=list(TEST_SUBJECTS),
                   val_fraction=args.val_fraction, device="cpu",
                   models=args.models.split(",") if args.models else None)
    wall = time.perf_counter() - t0
    table = quality_table(res["eval"])
    print(f"\n{'model':<14}{'direction':<10}{'epoch':>6}{'MAE brain':>11}{'table':>8}"
          f"{'vs table':>10}{'p':>10}{'SSIM brain':>12}{'table':>8}")
    for r in table:
        p = r["p_beats_baseline"]
        print(f"{r['model']:<14}{r['direction']:<10}{r['epoch'] or '':>6}"
              f"{r['mae_brain']:>11.3f}{r['baseline_mae_brain']:>8.3f}"
              f"{r['mae_vs_baseline_pct']:>+9.1f}%{'' if p is None else f'{p:.2g}':>10}"
              f"{r['ssim_brain']:>12.3f}{r['baseline_ssim_brain']:>8.3f}")
    history = json.loads((args.out / "demo.json").read_text())["invocations"]
    print(f"\nthis invocation: {wall:.0f} s; demo stages (first invocation): "
          f"{json.dumps({k: round(v) for k, v in history[0]['timings_s'].items()})}")
    dest = REPO / "benchmarks" / "results" / (
        f"demo_quality-{args.tag}.json" if args.tag else "demo_quality.json")
    atomic_write_json(dest, {
        "command": "mrsynth demo --data ../shared/data/mrpaired --test-subjects "
                   f"{','.join(TEST_SUBJECTS)} --val-fraction {args.val_fraction}"
                   + (f" --models {args.models}" if args.models else ""),
        "table": table, "wall_s_this_invocation": round(wall, 1),
        "demo_invocations": history, "environment": environment_info()})
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
