"""2.5-D versus 2-D: the same model with ``arch.context_slices=k`` and without, same budget.

Prepares the shared set as the demo does on real data (128 px, ``--downsample 2``, every
brain slice, test subjects sub-ms19 and sub-fg6692 fixed, a validation fifth of the
others), trains ``generators_s`` at the ``cpu-small`` preset with the demo's budget (its
10 epochs x ``--steps`` iterations, one torch thread) once per seed with
``context_slices=0`` and once with each of ``--ks``, and scores the latest checkpoints on the test
subjects, both directions: each subject's test slices stacked back into a volume
(:func:`mrsynth.eval.volume.slice_stacks`, as ``evaluate`` does) and scored with
:func:`mrsynth.eval.volume.score_stacks` (through-plane error, in-plane error, volume
MAE, PSNR, SSIM), plus the mean per-slice in-brain MAE of per-image z-scored slices
(``evaluate``'s slice metric). Nothing is chosen on the test subjects. Writes
``benchmarks/results/context_slices.json`` and a coronal/sagittal figure
(``docs/images/context_slices_views.png``).

    .venv/bin/python benchmarks/context_slices.py [--seeds 0 1 2] [--steps 100] [--ks 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsynth.data.context import prepared_table
from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import load_prepared
from mrsynth.eval import baselines as bl
from mrsynth.eval import volume as vol
from mrsynth.eval.validation import score_slices
from mrsynth.train.config import resolve_config
from mrsynth.train.runs import load_run
from mrsynth.train.trainer import train
from mrsynth.utils import atomic_path, atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
TEST_SUBJECTS = ("sub-ms19", "sub-fg6692")
MODEL = "generators_s"
METRICS = ("through_plane_mae", "in_plane_mae", "mae", "slice_mae", "psnr", "ssim")


def translate_test(run_dir: Path, test: Any, src: str, direction: str) -> np.ndarray:
    run = load_run(run_dir)
    k = int(run.config["arch"].get("context_slices", 0))
    x = test.images[src]
    table = prepared_table(test.subject, test.slice_index, k) if k else None
    outs = []
    for i in range(0, x.shape[0], 32):
        xb = x[i:i + 32, None] if table is None else x[table[i:i + 32]]
        outs.append(run.translate(torch.from_numpy(np.ascontiguousarray(xb)), direction)
                    .numpy()[:, 0])
    return np.concatenate(outs)


def score(syn: np.ndarray, test: Any, tgt: str, stacks: list[Any]) -> dict[str, Any]:
    subj, _ = vol.score_stacks(stacks, syn, test.images[tgt], test.mask)
    per_subject = {r["subject"]: {m: float(r[m]) for m in METRICS if m in r} for r in subj}
    for s in per_subject:
        rows = test.subject == s
        per_subject[s]["slice_mae"] = score_slices(test.images[tgt][rows], syn[rows],
                                                   test.mask[rows])["mae"]
    mean = {m: float(np.mean([v[m] for v in per_subject.values()])) for m in METRICS}
    return {"mean": mean, "subjects": per_subject}


def views_figure(dest: Path, test: Any, syn: dict[str, np.ndarray], tgt: str,
                 stacks: list[Any], subject: str, aspect: float) -> None:
    """Coronal and sagittal planes through one test subject's stacked slices."""
    st = next(s for s in stacks if s.subject == subject)
    vols = {f"real {tgt}": st.assemble(test.images[tgt], -1.0),
            **{k: st.assemble(v, -1.0) for k, v in syn.items()}}
    mask = st.assemble(test.mask, False)
    cx, cy, _ = (int(np.median(np.nonzero(mask)[i])) for i in range(3))
    # in-plane: the brain's extent plus a margin (the slices' field of view is mostly empty)
    box = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
           for ax in (0, 1)]
    x0, x1, y0, y1 = (max(int(box[0][0]) - 4, 0), int(box[0][-1]) + 5,
                      max(int(box[1][0]) - 4, 0), int(box[1][-1]) + 5)
    plane_views_png(dest, vols, (cx, cy), (slice(x0, x1), slice(y0, y1), slice(None)),
                    aspect, f"{subject} (test), T1w2{tgt}: planes across the stacked axial "
                    "slices", panel=(2.6, 4.4))


def plane_views_png(dest: Path, vols: dict[str, np.ndarray], centre: tuple[int, int],
                    box: tuple[slice, slice, slice], aspect: float, title: str,
                    panel: tuple[float, float]) -> None:
    """One column per volume: the coronal plane at y = ``centre[1]`` and the sagittal plane
    at x = ``centre[0]``, cut to ``box`` (x, y, z), drawn with ``aspect`` (pixel height /
    width after the rotation); written atomically as PNG. ``panel``: (width per column,
    height) in inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cx, cy = centre
    bx, by, bz = box
    fig, axes = plt.subplots(2, len(vols), figsize=(panel[0] * len(vols), panel[1]),
                             squeeze=False)
    for j, (name, v) in enumerate(vols.items()):
        for i, (plane, img) in enumerate((("coronal", v[bx, cy, bz]),
                                          ("sagittal", v[cx, by, bz]))):
            ax = axes[i, j]
            ax.imshow(np.rot90(img), cmap="gray", vmin=-1, vmax=1, aspect=aspect)
            ax.set_title(f"{name}\n{plane}" if i == 0 else plane, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrpaired")
    ap.add_argument("--work", type=Path, default=None, help="where to prepare and train "
                    "(default: temp)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=100, help="iterations per epoch (demo: 100)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's (10)")
    ap.add_argument("--downsample", type=int, default=2,
                    help="in-plane block averaging (the demo: 2, slices 128 px; 1: 256 px)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1],
                    help="context slices of the 2.5-D models (each against k=0)")
    ap.add_argument("--through-plane", type=float, default=0.0,
                    help="loss.through_plane of the 2.5-D models (0: off)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mrsynth-context-"))
    suffix = "" if args.steps == 100 and not args.epochs else f"-steps{args.steps}"
    if args.downsample != 2:
        suffix += f"-downsample{args.downsample}"
    if args.through_plane:
        suffix += f"-tp{args.through_plane:g}"
    side = 256 // args.downsample
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / f"real{side}.npz"
    if not prepared.is_file():
        prepare_dataset(args.data, prepared, contrasts=("T1w", "T2w"), size=(side, side),
                        downsample=args.downsample, test_subjects=TEST_SUBJECTS,
                        val_fraction=0.2, seed=0)
    d = load_prepared(prepared)
    test = d.split_view("test")
    test = test.select(test.paired)
    stacks = vol.slice_stacks(test.subject, test.slice_index, test.crop, test.size,
                              d.settings.get("slice_step", 1))
    results: list[dict[str, Any]] = []
    last: dict[int, Path] = {}
    ks = [0, *[k for k in args.ks if k]]
    for seed in args.seeds:
        for k in ks:
            tp = args.through_plane if k else 0.0
            over = {"arch.context_slices": k, "loss.through_plane": tp, "seed": seed,
                    "train.max_steps_per_epoch":
                    args.steps, "train.num_threads": 1, "train.progress": False}
            if args.epochs:
                over["train.epochs"] = args.epochs
            cfg = resolve_config(MODEL, "cpu-small", over)
            run_dir = work / (f"{MODEL}-k{k}-seed{seed}-steps{args.steps}"
                              + (f"-tp{tp:g}" if tp else "") + (
                f"-downsample{args.downsample}" if args.downsample != 2 else ""))
            if not (run_dir / "checkpoints" / "latest").is_dir():
                train(cfg, prepared, run_dir, overwrite=True)
            # training wall time as the run recorded it (also for a run trained earlier)
            epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
            train_s = float(sum(e["wall_s"] for e in epochs))
            last[k] = run_dir
            for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
                direction = f"{src}2{tgt}"
                t = time.perf_counter()
                syn = translate_test(run_dir, test, src, direction)
                infer_s = time.perf_counter() - t
                res = score(syn, test, tgt, stacks)
                results.append({"k": k, "seed": seed, "direction": direction,
                                "train_s": train_s, "translate_s": infer_s, **res})
                print(f"k={k} seed={seed} {direction}: train {train_s:.0f} s, "
                      + ", ".join(f"{m} {res['mean'][m]:.4f}" for m in METRICS), flush=True)
    # the table: mean over seeds and test subjects, per direction; change of 2.5-D vs 2-D
    # the table: mean over seeds and test subjects per direction and k; change against k=0
    cols = ["through_plane_mae", "in_plane_mae", "mae", "slice_mae", "psnr", "ssim", "train_s"]
    table = []
    for direction in ("T1w2T2w", "T2w2T1w"):
        for k in ks:
            rs = [r for r in results if r["k"] == k and r["direction"] == direction]
            row: dict[str, Any] = {"direction": direction, "k": k, "n_seeds": len(rs),
                                   **{m: float(np.mean([r["mean"][m] for r in rs]))
                                      for m in METRICS},
                                   "train_s": float(np.mean([r["train_s"] for r in rs])),
                                   "through_plane_by_seed": [r["mean"]["through_plane_mae"]
                                                             for r in rs]}
            if k:
                base = next(t for t in table if t["direction"] == direction and t["k"] == 0)
                for m in ("through_plane_mae", "mae", "slice_mae"):
                    row[f"{m}_change"] = row[m] / base[m] - 1
                row["target_met"] = bool(row["through_plane_mae_change"] <= -0.2
                                         and row["slice_mae"] <= base["slice_mae"]
                                         and row["mae"] <= base["mae"])
            table.append(row)
    print("| direction | k | " + " | ".join(cols) + " | through-plane vs k=0 | slice MAE vs "
          "k=0 | target met |\n|" + "---|" * (len(cols) + 5))
    for row in table:
        extra = (f"{row['through_plane_mae_change']:+.1%} | {row['slice_mae_change']:+.1%} | "
                 f"{row['target_met']}" if row["k"] else " | | ")
        print(f"| {row['direction']} | {row['k']} | "
              + " | ".join(f"{row[c]:.4f}" for c in cols) + f" | {extra} |")
    # the figure: the last seed's runs, T1w2T2w, the first test subject; displayed with
    # the voxels' true proportions (slices 1 voxel apart, in-plane pixels `downsample` wide)
    syn = {f"{MODEL} k={k}": translate_test(last[k], test, "T1w", "T1w2T2w") for k in ks}
    fig = REPO / "docs" / "images" / f"context_slices_views{suffix}.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    info = d.subjects[TEST_SUBJECTS[0]]
    aspect = float(info["voxel_size"][2]) / (float(info["voxel_size"][0])
                                             * int(d.settings.get("downsample", 1) or 1))
    views_figure(fig, test, syn, "T2w", stacks, TEST_SUBJECTS[0], aspect)
    # references: no slice-to-slice change at all inside the brain (baseline_mean), the
    # per-voxel intensity map (baseline_intensity), and the real target itself smoothed
    # across slices ([1, 2, 1] / 4) or blurred in-plane (Gaussian, sigma 0.7 pixel): what
    # errors of each kind cost in through-plane error
    from scipy.ndimage import gaussian_filter

    refs = []
    t1 = prepared_table(test.subject, test.slice_index, 1)
    for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
        lut = bl.fit_on_training_split(d, src, tgt)
        real = test.images[tgt]
        preds = {bl.BASELINE_MEAN: bl.predict_mean(real, test.mask),
                 "real_smoothed_through_plane": (real[t1[:, 0]] + 2 * real + real[t1[:, 2]]) / 4,
                 "real_blurred_in_plane": gaussian_filter(real, (0, 0.7, 0.7))}
        if lut is not None:
            preds[bl.BASELINE_INTENSITY] = lut.predict(test.images[src], test.mask)
        for name, syn_b in preds.items():
            refs.append({"direction": f"{src}2{tgt}", "baseline": name,
                         **score(syn_b, test, tgt, stacks)["mean"]})
            print(f"{name} {src}2{tgt}: " + ", ".join(f"{m} {refs[-1][m]:.4f}"
                                                       for m in METRICS))
    res_path = REPO / "benchmarks" / "results" / f"context_slices{suffix}.json"
    atomic_write_json(res_path, {
        "model": MODEL, "preset": "cpu-small", "ks": ks, "seeds": args.seeds,
        "steps_per_epoch": args.steps, "epochs": args.epochs or "preset (10)",
        "downsample": args.downsample, "size": side,
        "test_subjects": list(TEST_SUBJECTS), "n_test_slices": len(test),
        "table": table, "baselines": refs, "runs": results, "figure": str(fig.relative_to(REPO)),
        "environment": environment_info(),
    })
    print(f"wrote {res_path} and {fig}")


if __name__ == "__main__":
    main()
