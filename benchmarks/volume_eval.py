"""What the volume metrics add to ``mrsynth evaluate``, and what the baselines score in 3-D.

Prepares the shared set like ``benchmarks/baselines.py`` (128 px, ``--downsample 2``,
every brain slice, test subjects sub-ms19 and sub-fg6692), stacks each test subject's
slices back into a volume as ``evaluate`` does, and for both directions times scoring
every baseline's volumes (:func:`mrsynth.eval.volume.score_stacks`) and the paired
through-plane test; prints the mean volume metrics over the test subjects. Writes
``benchmarks/results/volume_eval.json``.

    .venv/bin/python benchmarks/volume_eval.py [--data ../shared/data/mrpaired] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.eval import baselines as bl
from mrsynth.eval import volume as vol
from mrsynth.utils import atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
TEST_SUBJECTS = ("sub-ms19", "sub-fg6692")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrpaired")
    ap.add_argument("--work", type=Path, default=None, help="where to prepare (default: temp)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mrsynth-volume-eval-"))
    prepared = work / "real128.npz"
    if not prepared.is_file():
        prepare_dataset(args.data, prepared, contrasts=("T1w", "T2w"), size=(128, 128),
                        downsample=2, test_subjects=TEST_SUBJECTS, seed=0)
    d = load_prepared(prepared)
    test = d.split_view("test")
    test = test.select(test.paired)
    t = time.perf_counter()
    stacks = vol.slice_stacks(test.subject, test.slice_index, test.crop, test.size,
                              d.settings.get("slice_step", 1))
    stack_s = time.perf_counter() - t
    rows, pair_rows, out = [], [], []
    for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
        lut = bl.fit_on_training_split(d, src, tgt)
        assert lut is not None
        preds = {
            bl.BASELINE_IDENTITY: bl.predict_identity(test.images[src]),
            bl.BASELINE_INTENSITY: lut.predict(test.images[src], test.mask),
            bl.BASELINE_MEAN: bl.predict_mean(test.images[tgt], test.mask),
        }
        for name, syn in preds.items():
            t = time.perf_counter()
            subj, pairs = vol.score_stacks(stacks, syn, test.images[tgt], test.mask, model=name,
                                           kind="baseline", direction=f"{src}2{tgt}")
            score_s = time.perf_counter() - t
            rows.extend(subj)
            pair_rows.extend({**p, "kind": "model" if name == bl.BASELINE_IDENTITY else
                              "baseline"} for p in pairs)
            out.append({"direction": f"{src}2{tgt}", "baseline": name, "score_s": score_s,
                        **{m: float(np.mean([r[m] for r in subj]))
                           for m in vol.TABLE_METRICS}})
    t = time.perf_counter()
    # the paired test's cost, with baseline_identity standing in for a trained model
    vol.through_plane_tests(pair_rows, ["T1w2T2w", "T2w2T1w"], bl.BASELINE_INTENSITY)
    test_s = time.perf_counter() - t
    shapes = {st.subject: list(st.shape) for st in stacks}
    print(f"{len(test)} test slices; volumes {shapes}; stacking {stack_s * 1000:.1f} ms; "
          f"paired test {test_s:.2f} s")
    cols = ["direction", "baseline", *vol.TABLE_METRICS, "score_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    res = REPO / "benchmarks" / "results" / "volume_eval.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, {"rows": out, "volumes": shapes, "stack_s": stack_s,
                            "paired_test_s": test_s, "n_test_slices": len(test),
                            "environment": environment_info()})


if __name__ == "__main__":
    main()
