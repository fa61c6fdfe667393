"""Data pipeline speed: preparing the shared data set and the builtin set, and loading them.

The target (issue 2): ``load_prepared`` on the full shared data set prepared at the
default settings (256x256, T1w+T2w, every brain slice) takes under a second, so
trainers never decode NIfTI per epoch. Load times are with the file in the page
cache (the usual case right after preparing; the first load from a cold disk
adds the disk's read time for ~420 MB).

    .venv/bin/python benchmarks/data_load.py              # writes benchmarks/results/data_load.json
    .venv/bin/python benchmarks/data_load.py --repeats 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("MRSYNTH_SHARED_DATA", REPO.parent / "shared" / "data")) / "mrpaired"
)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "data_load.json"


def _time_loads(path: Path, repeats: int) -> list[float]:
    from mrsynth.data.prepared import load_prepared

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = load_prepared(path)
        times.append(time.perf_counter() - t0)
        del d
    return times


def run(data: Path, repeats: int, n_builtin: int) -> dict:
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.data.prepared import load_prepared
    from mrsynth.utils import environment_info

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            ("shared, default (256x256, T1w+T2w)", str(data), {}),
            ("shared, compressed", str(data), {"compress": True}),
            (f"builtin, {n_builtin} subjects, default (256x256)", "builtin",
             {"n_subjects": n_builtin}),
            (f"builtin, {n_builtin} subjects, 112x112 (demo)", "builtin",
             {"n_subjects": n_builtin, "size": (112, 112)}),
        ]
        for i, (name, source, kw) in enumerate(jobs):
            out = Path(tmp) / f"case{i}.npz"
            t0 = time.perf_counter()
            prepare_dataset(source, out, **kw)
            prep_s = time.perf_counter() - t0
            loads = _time_loads(out, repeats)
            d = load_prepared(out)
            cases.append({
                "case": name,
                "prepare_s": round(prep_s, 2),
                "load_s_median": round(statistics.median(loads), 3),
                "load_s_max": round(max(loads), 3),
                "n_slices": len(d),
                "size": list(d.size),
                "file_mb": round(out.stat().st_size / 1e6, 1),
            })
            del d
    return {"cases": cases, "repeats": repeats, "environment": environment_info()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-builtin", type=int, default=20)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    result = run(args.data, args.repeats, args.n_builtin)
    head = f"{'case':44s} {'prepare s':>9s} {'load s (median/max)':>20s} {'slices':>7s} {'MB':>7s}"
    print(head)
    print("-" * len(head))
    for c in result["cases"]:
        print(f"{c['case']:44s} {c['prepare_s']:9.2f} "
              f"{c['load_s_median']:10.3f}/{c['load_s_max']:<9.3f} {c['n_slices']:7d} "
              f"{c['file_mb']:7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = result["cases"][0]["load_s_max"] < 1.0
    print("target load < 1 s (shared, default):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
