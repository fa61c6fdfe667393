"""Scale of ``mrsynth data prepare`` into a store (issue 13): memory, time, disk vs subjects.

Each row runs ``mrsynth.data.prepare_parallel.prepare_store`` on built-in simulated
subjects in a fresh process and records

* ``peak_rss_mb``: the largest sum of resident memory of the process and its workers,
  sampled every 0.2 s from ``/proc`` (shared pages are counted once per process, so this
  over-states the true total a little); ``parent_peak_rss_mb`` / ``worker_peak_rss_mb``
  are the exact peaks (``getrusage``) of the parent and of the largest worker;
* ``seconds`` (wall clock, including worker start-up) and ``subjects_per_s``;
* ``bytes_on_disk`` of the finished store;
* ``train_images_per_s_streaming`` / ``train_images_per_s_in_memory`` (rows of at most
  ``--train-subjects`` subjects, else null): ``cpu-small`` CycleGAN trained from the
  row's store for ``--train-steps`` steps with ``train.data_on_device`` false (the default
  ``train.loader_workers``, which on a CPU reads in the training process;
  ``..._streaming_2_workers``: two DataLoader worker processes)
  and true, alternated twice side by side in this process; the best epoch images/s of each
  (``metrics.json``; the epoch includes starting the loader's workers). ``--train-only``
  measures just that on a fresh 2 mm, 10-subject store and fills the matching row of the
  existing result file.

    .venv/bin/python benchmarks/data_scale.py                      # the default plan
    .venv/bin/python benchmarks/data_scale.py --rows 1mm:10:1 2mm:200:2

A row is ``RESOLUTION:SUBJECTS:WORKERS[:REPEATS]`` (with repeats, the run of median time
is kept and every run's seconds are listed). The default plan takes about 8 minutes on
an idle 2-core machine; times on a shared machine are noisy (+-20 %).
``--control`` (on by default) also times two independent one-worker runs (2 mm, 10
subjects) side by side against one alone: ``parallel_capacity`` = 2 x alone / together is
about 2 on an idle 2-core machine and says how much a second worker can gain at all.
``--rows`` with no value keeps the rows of the existing result file and redoes the control.
Prints a table and writes ``benchmarks/results/data_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.json"
DEFAULT_ROWS = ("1mm:10:1:3", "1mm:10:2:3", "1mm:40:2", "1mm:200:2", "2mm:10:2:3",
                "2mm:200:2")

CHILD = """
import json, resource, sys, time
from mrsynth.data.prepare_parallel import prepare_store
if __name__ == "__main__":
    res, n, w, out = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    t0 = time.perf_counter()
    prepare_store("builtin", out, n_subjects=n, resolution=res, workers=w, seed=0)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt,
                      "parent_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{t}/children").read_text()
        except OSError:
            continue
        for c in text.split():
            out.append(int(c))
            out.extend(_children(int(c)))
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_row(resolution: float, subjects: int, workers: int, tmp: Path,
            train_steps: int = 0) -> dict[str, Any]:
    out = tmp / f"s{subjects}-{workers}.mrs"
    script = tmp / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(resolution), str(subjects),
                             str(workers), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_rss_kb(p) for p in [proc.pid, *_children(proc.pid)]))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed for {subjects} subjects / {workers} workers")
    got = json.loads(stdout.strip().splitlines()[-1])
    index = json.loads((out / "store.json").read_text())
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    speed = train_speed(out, train_steps, tmp) if train_steps else {}
    shutil.rmtree(out)
    return {
        "resolution_mm": resolution, "subjects": subjects, "slices": index["n_slices"],
        "workers": workers, "peak_rss_mb": round(peak[0] / 1024, 1),
        "parent_peak_rss_mb": round(got["parent_kb"] / 1024, 1),
        "worker_peak_rss_mb": round(got["worker_kb"] / 1024, 1) if workers > 1 else None,
        "seconds": round(got["seconds"], 2),
        "subjects_per_s": round(subjects / got["seconds"], 3),
        "bytes_on_disk": nbytes,
        "train_images_per_s_streaming": None, "train_images_per_s_in_memory": None,
        **speed,
    }


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time (its memory too), with every run's seconds and peak RSS."""
    order = sorted(runs, key=lambda r: r["seconds"])
    row = dict(order[(len(order) - 1) // 2])
    row.update({k: v for r in runs for k, v in r.items() if k.startswith("train_") and v})
    if len(runs) > 1:
        row["seconds_runs"] = [r["seconds"] for r in runs]
        row["peak_rss_mb_runs"] = [r["peak_rss_mb"] for r in runs]
    return row


def train_speed(store: Path, steps: int, tmp: Path) -> dict[str, float]:
    """Best images/s of streamed and resident cpu-small training from ``store``, measured
    alternately (so both see the same machine load)."""
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    best = {"streaming": 0.0, "in_memory": 0.0, "streaming_2_workers": 0.0}
    for rep in range(2):
        for name, on_device, workers in (("in_memory", True, None), ("streaming", False, None),
                                         ("streaming_2_workers", False, 2)):
            cfg = resolve_config("cyclegan", "cpu-small", {
                "train.epochs": 1, "train.max_steps_per_epoch": steps, "train.val_slices": 0,
                "train.progress": False, "train.data_on_device": on_device,
                "train.loader_workers": workers, "train.checkpoint_every_minutes": 0})
            out = train(cfg, store, tmp / f"train_{name}_{rep}", overwrite=True)
            ips = json.loads((out / "metrics.json").read_text())["epochs"][0]["images_per_s"]
            best[name] = max(best[name], float(ips))
            shutil.rmtree(out)
    return {f"train_images_per_s_{k}": round(v, 2) for k, v in best.items()}


def run_control(tmp: Path) -> dict[str, Any]:
    """Two independent one-worker runs side by side vs one alone (2 mm, 10 subjects)."""
    script = tmp / "child.py"
    script.write_text(CHILD)

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), "2", "10", "1", str(tmp / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def secs(p: subprocess.Popen) -> float:
        out, _ = p.communicate()
        return float(json.loads(out.strip().splitlines()[-1])["seconds"])

    alone = secs(start("c0.mrs"))
    pair = [start("c1.mrs"), start("c2.mrs")]
    together = max(secs(p) for p in pair)
    return {"alone_s": round(alone, 2), "together_s": round(together, 2),
            "parallel_capacity": round(2 * alone / together, 3),
            "what": "2 x (one 1-worker prepare alone) / (two independent ones side by side); "
                    "about 2 on an idle 2-core machine"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS),
                    help="RESOLUTION:SUBJECTS:WORKERS, e.g. 1mm:10:2")
    ap.add_argument("--no-control", dest="control", action="store_false")
    ap.add_argument("--train-subjects", type=int, default=10,
                    help="time training from the store for rows of at most this many subjects")
    ap.add_argument("--train-steps", type=int, default=80)
    ap.add_argument("--update", action="store_true",
                    help="keep the result file's other rows (and control, unless redone); "
                         "the rows run replace those of the same resolution/subjects/workers")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each row this many times; the row is the run of median time")
    ap.add_argument("--machine", default="idle development machine",
                    help="how busy the machine was, for the result file")
    ap.add_argument("--train-only", action="store_true",
                    help="only time training on a fresh 2 mm, 10-subject store; keep the rows")
    args = ap.parse_args()
    if args.train_only:
        args.rows, args.control = [], False
        old = json.loads(RESULTS.read_text())
        args.control_kept = old.get("control")
    rows = [] if args.rows and not args.update else json.loads(RESULTS.read_text())["rows"]
    if args.update:
        args.control_kept = json.loads(RESULTS.read_text()).get("control")
    control = getattr(args, "control_kept", None)
    with tempfile.TemporaryDirectory() as tmpd:
        if args.train_only:
            from mrsynth.data.prepare_parallel import prepare_store

            store = Path(tmpd) / "t.mrs"
            prepare_store("builtin", store, n_subjects=10, resolution=2.0, workers=2, seed=0)
            speed = train_speed(store, args.train_steps, Path(tmpd))
            print(speed, flush=True)
            for r in rows:
                if (r["resolution_mm"], r["subjects"]) == (2.0, 10):
                    r.update(speed)
        for spec in args.rows:
            res, n, w, *rep_n = spec.split(":")
            repeats = int(rep_n[0]) if rep_n else args.repeats
            runs = [run_row(float(res.removesuffix("mm")), int(n), int(w), Path(tmpd),
                            args.train_steps if int(n) <= args.train_subjects and rep == 0
                            else 0)
                    for rep in range(repeats)]
            row = median_row(runs)
            rows = [r for r in rows if (r["resolution_mm"], r["subjects"], r["workers"])
                    != (row["resolution_mm"], row["subjects"], row["workers"])]
            rows.append(row)
            print(row, flush=True)
        if args.control:
            control = run_control(Path(tmpd))
            print(control, flush=True)

    rows.sort(key=lambda r: (r["resolution_mm"], r["subjects"], r["workers"]))

    def find(res: float, n: int, w: int) -> dict | None:
        return next((r for r in rows if (r["resolution_mm"], r["subjects"], r["workers"])
                     == (res, n, w)), None)

    summary: dict[str, Any] = {}
    for res in sorted({r["resolution_mm"] for r in rows}):
        for w in (1, 2):
            same = sorted((r for r in rows if r["resolution_mm"] == res and r["workers"] == w),
                          key=lambda r: r["subjects"])
            if len(same) >= 2:
                summary[f"{res:g}mm_workers{w}_rss_growth"] = {
                    "from_subjects": same[0]["subjects"], "to_subjects": same[-1]["subjects"],
                    "peak_rss_ratio": round(same[-1]["peak_rss_mb"] / same[0]["peak_rss_mb"], 3),
                    "parent_rss_ratio": round(same[-1]["parent_peak_rss_mb"]
                                              / same[0]["parent_peak_rss_mb"], 3)}
        for n in sorted({r["subjects"] for r in rows}):
            one, two = find(res, n, 1), find(res, n, 2)
            if one and two:
                summary[f"{res:g}mm_{n}_subjects_speedup_2_workers"] = round(
                    two["subjects_per_s"] / one["subjects_per_s"], 3)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores ({args.machine})",
              "command": "prepare_store('builtin', OUT, n_subjects=N, resolution=R, workers=W) "
                         "at the defaults (256x256, every slice with >= 10 % brain, float16)",
              "train_command": "cpu-small cyclegan, epochs 1, max_steps_per_epoch "
                               f"{args.train_steps}, data_on_device false (default loader "
                               "workers: 0 on a CPU, and 2) vs true, alternated twice, best of "
                               "each; null: not measured",
              "rows": rows, "summary": summary, "control": control}
    print(f"\n{'res':>4} {'subj':>5} {'slices':>7} {'workers':>7} {'peak MB':>8} "
          f"{'parent MB':>9} {'worker MB':>9} {'s':>7} {'subj/s':>7} {'GB disk':>8}")
    for r in rows:
        print(f"{r['resolution_mm']:>4g} {r['subjects']:>5} {r['slices']:>7} {r['workers']:>7} "
              f"{r['peak_rss_mb']:>8} {r['parent_peak_rss_mb']:>9} "
              f"{r['worker_peak_rss_mb'] or '-':>9} {r['seconds']:>7} "
              f"{r['subjects_per_s']:>7} {r['bytes_on_disk'] / 1e9:>8.3f}")
    for k, v in summary.items():
        print(f"{k}: {v}")
    if control:
        print(f"control: one 1-worker run alone {control['alone_s']} s, two side by side "
              f"{control['together_s']} s -> parallel capacity {control['parallel_capacity']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
