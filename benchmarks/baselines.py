"""What the evaluation's baselines score on the shared data, and what they cost.

Prepares the shared set the way the demo does for real data (128 px, ``--downsample 2``,
test subjects sub-ms19 and sub-fg6692, so a reader can compare with issue 12's table),
then for both directions times fitting ``baseline_intensity`` on the training split,
predicting each baseline, scoring it (both regions) and its C2ST (200 steps), and prints
the mean z-scored MAE. Writes ``benchmarks/results/baselines.json``.

    .venv/bin/python benchmarks/baselines.py [--data ../shared/data/mrpaired] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.eval import baselines as bl
from mrsynth.eval.c2st import c2st
from mrsynth.eval.metrics import REGIONS, image_metrics
from mrsynth.utils import atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
TEST_SUBJECTS = ("sub-ms19", "sub-fg6692")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrpaired")
    ap.add_argument("--work", type=Path, default=None, help="where to prepare (default: temp)")
    ap.add_argument("--c2st-steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="mrsynth-baselines-"))
    prepared = work / "real128.npz"
    t = time.perf_counter()
    if not prepared.is_file():
        prepare_dataset(args.data, prepared, contrasts=("T1w", "T2w"), size=(128, 128),
                        downsample=2, test_subjects=TEST_SUBJECTS, seed=0)
    prepare_s = time.perf_counter() - t
    d = load_prepared(prepared)
    test = d.split_view("test")
    test = test.select(test.paired)
    rows = []
    for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
        t = time.perf_counter()
        lut = bl.fit_on_training_split(d, src, tgt)
        fit_s = time.perf_counter() - t
        assert lut is not None
        predict = {
            bl.BASELINE_IDENTITY: lambda s=src: bl.predict_identity(test.images[s]),
            bl.BASELINE_INTENSITY: lambda s=src, lut=lut: lut.predict(test.images[s], test.mask),
            bl.BASELINE_MEAN: lambda t_=tgt: bl.predict_mean(test.images[t_], test.mask),
        }
        for name, fn in predict.items():
            t = time.perf_counter()
            syn = fn()
            pred_s = time.perf_counter() - t
            t = time.perf_counter()
            mae = {r: float(np.mean([
                image_metrics(test.images[tgt][i], syn[i],
                              test.mask[i] if r == "brain" else None)["mae"]
                for i in range(len(test))])) for r in REGIONS}
            metrics_s = time.perf_counter() - t
            t = time.perf_counter()
            acc = c2st(test.images[tgt], syn, steps=args.c2st_steps).accuracy
            c2st_s = time.perf_counter() - t
            rows.append({"direction": f"{src}2{tgt}", "baseline": name,
                         "mae_image": mae["image"], "mae_brain": mae["brain"],
                         "c2st_accuracy": acc, "fit_s": fit_s if name == bl.BASELINE_INTENSITY
                         else 0.0, "predict_s": pred_s, "metrics_s": metrics_s,
                         "c2st_s": c2st_s})
    print(f"{len(test)} test slices ({', '.join(TEST_SUBJECTS)}), "
          f"{int((d.split == 'train').sum())} training slices; prepare {prepare_s:.1f} s")
    head = ("direction", "baseline", "MAE image", "MAE brain", "C2ST", "fit s", "metrics s",
            "C2ST s")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['direction']} | {r['baseline']} | {r['mae_image']:.3f} | "
              f"{r['mae_brain']:.3f} | {r['c2st_accuracy']:.3f} | {r['fit_s']:.1f} | "
              f"{r['metrics_s']:.1f} | {r['c2st_s']:.1f} |")
    dest = REPO / "benchmarks" / "results" / "baselines.json"
    atomic_write_json(dest, {"n_test": len(test), "test_subjects": list(TEST_SUBJECTS),
                             "settings": {"size": 128, "downsample": 2,
                                          "c2st_steps": args.c2st_steps,
                                          "lut_bins": bl.LUT_BINS},
                             "rows": rows, "environment": environment_info()})
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
