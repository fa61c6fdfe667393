"""Multi-view fusion: axial, coronal and sagittal 2-D models averaged, against axial alone.

Issue 14 names fusion of views as the other route to volumes consistent across slices. On
the demo's grid (the shared set block-averaged 2 x 2 in the axial plane: 2 mm pixels, 1 mm
slices) this prepares the same subjects three times with ``mrsynth data prepare
--downsample 2 --plane P``: axial (128 x 128, as the demo), coronal and sagittal (the
smallest multiple of 32 that holds every brain in the plane), with one split (test sub-ms19
and sub-fg6692 as in issue 12, validation sub-ms07, training the other four), trains
``generators_s`` at the ``cpu-small`` preset with the demo's budget on each (10 epochs x
``--steps`` whole slices, one torch thread), and scores the latest checkpoints on the test
subjects' axial grid, both directions:

* ``axial``: the axial model alone (what ``translate`` with one axial run does);
* ``coronal`` / ``sagittal``: one other-view model alone, restacked onto the axial grid;
* ``fused``: the voxel-wise mean of the three views' predictions (same seed; what
  ``translate``/``complete`` with the three runs write);
* ``coronal+sagittal``: the mean of the two other views only;
* ``axial-ensemble``: the mean of the axial models of all seeds (the control: how much of
  the fusion's gain any average of independent models gives);
* ``axial-mirror``: the axial model with test-time mirroring (``translate --mirror``);
* ``baseline_intensity`` / ``baseline_mean``: ``evaluate``'s trivial baselines (the
  intensity lookup table fitted on the training split; the brain's mean per slice).

Scores: :func:`mrsynth.eval.volume.volume_metrics` over the brain of the axial slices the
axial preparation keeps (through-plane error along z, in-plane error, volume MAE, PSNR,
SSIM) and ``evaluate``'s per-slice in-brain MAE of the axial slices. Nothing is chosen on
the test subjects (the latest checkpoint, no setting varied). Writes
``benchmarks/results/multiview_fusion.json``.

    .venv/bin/python benchmarks/multiview_fusion.py [--seeds 0 1 2] [--steps 25] [--work DIR]
        [--context K]      # every view's model 2.5-D (k = K); the reference: 2-D axial runs
        [--train-only]     # train the runs of --seeds and stop (two processes in parallel)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsynth.data.normalise import BACKGROUND
from mrsynth.data.prepare import prepare_dataset
from mrsynth.data.prepared import PreparedData, load_prepared
from mrsynth.data.slicing import PLANES, crop_or_pad, slices_first
from mrsynth.eval import baselines as bl
from mrsynth.eval import volume as vol
from mrsynth.eval.common import Direction
from mrsynth.eval.translate import Geometry, predict_grid
from mrsynth.eval.validation import score_slices
from mrsynth.train.config import resolve_config
from mrsynth.train.runs import load_run
from mrsynth.train.trainer import train
from mrsynth.utils import atomic_write_json, environment_info

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # context_slices: the shared plane figure
TEST_SUBJECTS = ("sub-ms19", "sub-fg6692")
VAL_SUBJECTS = ("sub-ms07",)
MODEL = "generators_s"
VIEWS = PLANES
METRICS = ("through_plane_mae", "in_plane_mae", "mae", "slice_mae", "psnr", "ssim")


def full_volumes(data: Path, d: PreparedData) -> dict[str, dict[str, Any]]:
    """Every subject's volumes on the axial grid (block-averaged x, y; normalised with the
    offsets the axial preparation fitted; background outside the downsampled brain), via
    the same functions ``prepare`` uses, with no crop and every slice."""
    from mrsynth.data.prepare import _load_record_volumes
    from mrsynth.data.readers import index_dataset
    from mrsynth.data.slicing import downsample_mask, to_training_grid
    from mrsynth.data.volumes import brain_mask

    f = int(d.settings.get("downsample", 1))
    out: dict[str, dict[str, Any]] = {}
    for rec in index_dataset(data).subjects:
        if rec.id not in set(d.subject.tolist()):
            continue
        vols = _load_record_volumes(rec, ["T1w", "T2w"])
        joint = brain_mask(vols["T1w"].data) & brain_mask(vols["T2w"].data)
        mask_ds = downsample_mask(joint, f)
        row = int(np.flatnonzero(d.subject == rec.id)[0])
        entry: dict[str, Any] = {"mask": mask_ds, "split": str(d.split[row])}
        for c in ("T1w", "T2w"):
            off, sc = float(d.offset[c][row]), float(d.scale[c][row])
            entry[c] = to_training_grid(vols[c].data, off, sc, mask_ds, f, mask_ds.shape[:2],
                                        (0, 0))
            entry[f"offset_{c}"], entry[f"scale_{c}"] = off, sc
        out[rec.id] = entry
    return out


def view_size(vols: dict[str, dict[str, Any]], view: str, axial: tuple[int, int]
              ) -> tuple[int, int]:
    """The axial size for ``axial``; for the others the smallest multiple of 32 that holds
    every subject's brain in the view's plane."""
    if view == "axial":
        return axial
    perm = VIEWS[view]
    spans = []
    for e in vols.values():
        m = np.transpose(e["mask"], perm).any(axis=2)
        spans.append([int(np.ptp(np.flatnonzero(m.any(axis=1 - a)))) + 1 for a in (0, 1)])
    return tuple(int(-(-(max(s[a] for s in spans) + 4) // 32) * 32)  # type: ignore[return-value]
                 for a in (0, 1))


def predict_volume(run: Any, x: np.ndarray, mask: np.ndarray, geo: Geometry,
                   direction: str) -> np.ndarray:
    """The run's prediction of a normalised axial-grid volume, cut in its own plane
    (:func:`mrsynth.eval.translate.predict_grid`, what ``translate`` does); background where
    it predicted nothing."""
    src, tgt = ("T1w", "T2w") if direction == "T1w2T2w" else ("T2w", "T1w")
    d = Direction("A2B" if src == "T1w" else "B2A", src, tgt)
    y, _ = predict_grid(run, x, mask, d, geo)
    y = np.where(np.isfinite(y), y, BACKGROUND)
    y[~mask] = BACKGROUND
    return y


def score(syn: np.ndarray, real: np.ndarray, mask: np.ndarray, z: np.ndarray,
          origin: tuple[int, int], size: tuple[int, int]) -> dict[str, float]:
    """Volume metrics over the brain of the axial slices ``z``, and the per-slice MAE."""
    m = np.zeros_like(mask)
    m[:, :, z] = mask[:, :, z]
    out = vol.volume_metrics(syn, real, m)
    cut = [slices_first(crop_or_pad(a[:, :, z], size, origin, fill))
           for a, fill in ((real, BACKGROUND), (syn, BACKGROUND), (mask, False))]
    out["slice_mae"] = score_slices(*cut)["mae"]
    return {k: float(out[k]) for k in METRICS}


def views_figure(dest: Path, subject: str, vols: dict[str, np.ndarray], mask: np.ndarray,
                 z: np.ndarray) -> None:
    """Coronal and sagittal planes through the brain's centre of one subject's volumes (on
    the axial grid: 2 mm pixels in x and y, 1 mm along z, drawn in true proportions)."""
    from context_slices import plane_views_png

    m = mask.copy()
    keep = np.zeros(m.shape[2], bool)
    keep[z] = True
    m[:, :, ~keep] = False
    cx, cy, _ = (int(np.median(np.nonzero(m)[i])) for i in range(3))
    z0, z1 = int(z.min()), int(z.max()) + 1
    box = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in (0, 1)]
    x0, x1 = max(int(box[0][0]) - 3, 0), int(box[0][-1]) + 4
    y0, y1 = max(int(box[1][0]) - 3, 0), int(box[1][-1]) + 4
    plane_views_png(dest, {name: np.where(m, v, -1.0) for name, v in vols.items()}, (cx, cy),
                    (slice(x0, x1), slice(y0, y1), slice(z0, z1)), 0.5,
                    f"{subject} (test), T1w2T2w, generators_s at the demo's budget: planes "
                    "across the axial slices", panel=(2.8, 4.6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrpaired")
    ap.add_argument("--work", type=Path, default=None, help="where to prepare and train "
                    "(default: temp)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=25,
                    help="iterations per epoch (the demo's generators_s: 25 whole slices)")
    ap.add_argument("--context", type=int, default=0,
                    help="arch.context_slices of every view's model (2.5-D views); the 2-D "
                    "axial runs of the same seeds are the reference then")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/multiview_fusion[-kK].json")
    args = ap.parse_args()
    k = int(args.context)
    out_json = args.out or (REPO / "benchmarks" / "results"
                            / f"multiview_fusion{f'-k{k}' if k else ''}.json")
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="mrsynth-multiview-"))
    work.mkdir(parents=True, exist_ok=True)
    axial_file = work / "axial.npz"
    if not axial_file.is_file():
        prepare_dataset(args.data, axial_file, contrasts=("T1w", "T2w"), size=(128, 128),
                        downsample=2, test_subjects=TEST_SUBJECTS, val_subjects=VAL_SUBJECTS,
                        seed=0)
    d = load_prepared(axial_file)
    vols = full_volumes(args.data, d)
    # the rebuilt axial volumes must be what prepare wrote (same functions, same offsets)
    for s in vols:
        rows = np.flatnonzero(d.subject == s)
        origin = tuple(int(v) for v in d.crop[rows[0]])
        again = slices_first(crop_or_pad(vols[s]["T1w"][:, :, d.slice_index[rows]], d.size,
                                         origin, BACKGROUND))
        assert np.abs(again - d.images["T1w"][rows]).max() < 1e-5, s
    sizes = {v: view_size(vols, v, d.size) for v in VIEWS}
    files = {"axial": axial_file}
    for v in ("coronal", "sagittal"):
        files[v] = work / f"{v}.npz"
        if not files[v].is_file():
            prepare_dataset(args.data, files[v], contrasts=("T1w", "T2w"), size=sizes[v],
                            downsample=2, test_subjects=TEST_SUBJECTS,
                            val_subjects=VAL_SUBJECTS, seed=0, plane=v)
    geos = {v: Geometry(sizes[v], 2, (0.5, 99.5), v) for v in VIEWS}
    geos["axial-2d"] = geos["axial"]
    runs: dict[tuple[str, int], Path] = {}
    for seed in args.seeds:
        todo = [(v, v, k) for v in VIEWS] + ([("axial-2d", "axial", 0)] if k else [])
        for name, v, kk in todo:
            rd = work / f"{MODEL}-{v}-seed{seed}-steps{args.steps}{f'-k{kk}' if kk else ''}"
            runs[(name, seed)] = rd
            if not (rd / "checkpoints" / "latest").is_dir():
                cfg = resolve_config(MODEL, "cpu-small", {
                    "seed": seed, "train.max_steps_per_epoch": args.steps,
                    "arch.context_slices": kk,
                    "train.num_threads": 1, "train.progress": False})
                t = time.perf_counter()
                train(cfg, files[v], rd, overwrite=True)
                print(f"trained {rd.name} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.train_only:
        return
    luts = {f"{a}2{b}": bl.fit_on_training_split(d, a, b)
            for a, b in (("T1w", "T2w"), ("T2w", "T1w"))}
    rows: list[dict[str, Any]] = []
    for s in TEST_SUBJECTS + VAL_SUBJECTS:
        e = vols[s]
        arows = np.flatnonzero(d.subject == s)
        z = d.slice_index[arows]
        origin = tuple(int(v) for v in d.crop[arows[0]])
        for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
            direction = f"{src}2{tgt}"
            preds = {(v, seed): predict_volume(load_run(runs[(v, seed)]), e[src], e["mask"],
                                               geos[v], direction)
                     for (v, seed) in runs}
            if not k:  # test-time mirroring of the axial run (translate --mirror)
                for seed in args.seeds:
                    run = load_run(runs[("axial", seed)])
                    run.mirror = True
                    preds[("axial-mirror", seed)] = predict_volume(run, e[src], e["mask"],
                                                                   geos["axial"], direction)
            cands: dict[tuple[str, int], np.ndarray] = {}
            for seed in args.seeds:
                for v in [*VIEWS, *(["axial-2d"] if k else ["axial-mirror"])]:
                    cands[(v, seed)] = preds[(v, seed)]
                cands[("fused", seed)] = np.mean([preds[(v, seed)] for v in VIEWS], axis=0)
                cands[("coronal+sagittal", seed)] = np.mean(
                    [preds[(v, seed)] for v in ("coronal", "sagittal")], axis=0)
            cands[("axial-ensemble", -1)] = np.mean([preds[("axial", sd)] for sd in args.seeds],
                                                    axis=0)
            # the trivial baselines evaluate scores: the lookup table fitted on the training
            # split, and the brain's mean everywhere inside it (per axial slice)
            cands[("baseline_intensity", -1)] = luts[direction].predict(e[src], e["mask"])
            cands[("baseline_mean", -1)] = np.moveaxis(bl.predict_mean(
                np.moveaxis(e[tgt], -1, 0), np.moveaxis(e["mask"], -1, 0)), 0, -1)
            if s == TEST_SUBJECTS[0] and direction == "T1w2T2w" and not k:
                seed0 = args.seeds[0]
                views_figure(REPO / "docs" / "images" / "multiview_fusion_views.png", s,
                             {f"real {tgt}": e[tgt],
                              "axial model": cands[("axial", seed0)],
                              "fused (3 planes)": cands[("fused", seed0)]},
                             e["mask"], z)
            for (name, seed), syn in cands.items():
                r = score(syn, e[tgt], e["mask"], z, origin, d.size)
                rows.append({"subject": s, "split": e["split"], "direction": direction,
                             "prediction": name, "seed": seed, **r})
                print(f"{s} {direction} {name} seed {seed}: " + ", ".join(
                    f"{m} {r[m]:.4f}" for m in METRICS), flush=True)
    table = []
    for split in ("test", "val"):
        for direction in ("T1w2T2w", "T2w2T1w"):
            base: dict[str, float] = {}
            ref = "axial-2d" if k else "axial"
            for name in ([ref] + [n for n in ("axial", "coronal", "sagittal", "fused",
                                              "coronal+sagittal", "axial-ensemble",
                                              "axial-mirror", "baseline_intensity",
                                              "baseline_mean")
                                  if n != ref and (n != "axial-mirror" or not k)]):
                rs = [r for r in rows if r["split"] == split and r["direction"] == direction
                      and r["prediction"] == name]
                row = {"split": split, "direction": direction, "prediction": name,
                       **{m: float(np.mean([r[m] for r in rs])) for m in METRICS}}
                if name == ref:
                    base = row
                else:
                    for m in ("through_plane_mae", "mae", "slice_mae"):
                        row[f"{m}_change"] = row[m] / base[m] - 1
                table.append(row)
    print("| split | direction | prediction | " + " | ".join(METRICS)
          + f" | through-plane vs {ref} | slice MAE vs {ref} | volume MAE vs {ref} |\n|"
          + "---|" * (len(METRICS) + 6))
    for row in table:
        ch = (" | ".join(f"{row[f'{m}_change']:+.1%}" for m in
                         ("through_plane_mae", "slice_mae", "mae"))
              if "mae_change" in row else " | ")
        print(f"| {row['split']} | {row['direction']} | {row['prediction']} | "
              + " | ".join(f"{row[m]:.4f}" for m in METRICS) + f" | {ch} |")
    atomic_write_json(out_json, {
        "command": "benchmarks/multiview_fusion.py", "seeds": args.seeds, "steps": args.steps,
        "context_slices": k, "reference": ref,
        "model": MODEL, "sizes": sizes, "test_subjects": TEST_SUBJECTS,
        "val_subjects": VAL_SUBJECTS, "table": table, "rows": rows,
        "environment": environment_info()})
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
