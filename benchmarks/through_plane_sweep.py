"""Issue 14 on the validation split: how much does 2.5-D with the through-plane loss lower the
through-plane error against 2-D, per loss weight? (The test subjects are never scored.)

Prepares the shared data like ``benchmarks/tune_cpu_small.py`` (128 px, ``--downsample 2``,
test subjects sub-ms19 and sub-fg6692 held out and unused, **sub-ms07 the validation
subject**), trains ``generators_s`` at the ``cpu-small`` preset with the demo's budget (10 x
100 single-patch steps with the ResNet generator, 10 x 25 whole slices with the U-Net; one
thread) for each (k, w, seed, gradient, generator) setting, stacks the
validation subject's slices back into a volume and scores it with the volume metrics
(through-plane and in-plane error, volume MAE) and the per-slice in-brain MAE, as
``benchmarks/context_slices.py`` does for the test subjects. Prints each 2.5-D row against
the 2-D run of the same seed, gradient weight and generator; writes
``benchmarks/results/through_plane_sweep.json``.

    .venv/bin/python benchmarks/through_plane_sweep.py [--work /tmp/proto] [--only 1-50-0,...]

Finished runs in ``--work`` are reused when their stored loss settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

#: (k, through-plane weight, seed, gradient weight, generator): the sweep as run, 2-D
#: references first; the U-Net rows came with cpu-small's U-Net (round 9 of the tuning)
SETTINGS: list[tuple[int, float, int, float, str]] = [
    (0, 0, 0, 0, "resnet"), (1, 1, 0, 0, "resnet"), (1, 5, 0, 0, "resnet"),
    (1, 20, 0, 0, "resnet"), (1, 50, 0, 0, "resnet"), (1, 200, 0, 0, "resnet"),
    (2, 20, 0, 0, "resnet"), (2, 50, 0, 0, "resnet"),
    (0, 0, 1, 0, "resnet"), (1, 50, 1, 0, "resnet"),
    (0, 0, 0, 5, "resnet"), (1, 50, 0, 5, "resnet"),
    (0, 0, 0, 5, "unet"), (1, 0, 0, 5, "unet"), (1, 20, 0, 5, "unet"), (1, 50, 0, 5, "unet"),
    (0, 0, 1, 5, "unet"), (1, 20, 1, 5, "unet"), (1, 50, 1, 5, "unet"),
]
METRICS = ("through_plane_mae", "in_plane_mae", "slice_mae", "mae")


def name(k: int, w: float, seed: int, grad: float, gen: str = "resnet") -> str:
    return (f"tp-{k}-{w:g}-{seed}" + (f"-loss.gradient={grad:g}" if grad else "")
            + ("" if gen == "resnet" else f"-{gen}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/proto"))
    ap.add_argument("--tune-work", type=Path, default=Path("/tmp/mrsynth-tune"),
                    help="where tune_cpu_small.py prepares the data (reused)")
    ap.add_argument("--only", default="",
                    help="comma-separated K-W-SEED[-G[-GENERATOR]] settings")
    args = ap.parse_args()
    import torch

    import context_slices as cs
    import tune_cpu_small as tune
    from mrsynth.data.prepared import load_prepared
    from mrsynth.eval import volume as vol
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train
    from mrsynth.utils import atomic_write_json, environment_info

    torch.set_num_threads(1)
    settings = SETTINGS
    if args.only:
        want = set()
        for item in args.only.split(","):  # K-W-SEED (any gradient), K-W-SEED-G (ResNet)
            parts = tuple(float(x) if x[0].isdigit() else x for x in item.split("-"))
            want.add((*parts, "resnet") if len(parts) == 4 else parts)
        settings = [s for s in SETTINGS if s in want or s[:3] in want]
    prepared = tune.prepare(args.tune_work, ["sub-ms07"])
    d = load_prepared(prepared)
    val = d.split_view("val")
    val = val.select(val.paired)
    stacks = vol.slice_stacks(val.subject, val.slice_index, val.crop, val.size,
                              d.settings.get("slice_step", 1))
    rows: list[dict[str, Any]] = []
    for k, w, seed, grad, gen in settings:
        run = args.work / name(k, w, seed, grad, gen)
        cfg_path = run / "config.json"
        stored = json.loads(cfg_path.read_text())["config"] if cfg_path.is_file() else {}
        loss = stored.get("loss", {})
        same = (float(loss.get("gradient", 0.0)) == grad
                and float(loss.get("through_plane", -1)) == w
                and stored.get("arch", {}).get("generator", "resnet") == gen)
        if not (same and (run / "checkpoints" / "latest").is_dir()):
            cfg = resolve_config("generators_s", "cpu-small", {
                "arch.context_slices": k, "loss.through_plane": w, "loss.gradient": grad,
                "arch.generator": gen,
                "arch.upsample": "resize" if gen == "unet" else "transpose",
                # the U-Net as cpu-small trains it: whole slices, a quarter of the steps
                "train.patch_size": None if gen == "unet" else 64,
                "seed": seed, "train.max_steps_per_epoch": 25 if gen == "unet" else 100,
                "train.num_threads": 1,
                "train.progress": False, "train.val_slices": 0})
            train(cfg, prepared, run, overwrite=True)
        row: dict[str, Any] = {"k": k, "through_plane_weight": w, "seed": seed,
                               "gradient_weight": grad, "generator": gen}
        for src, tgt in (("T1w", "T2w"), ("T2w", "T1w")):
            syn = cs.translate_test(run, val, src, f"{src}2{tgt}")
            row[f"{src}2{tgt}"] = cs.score(syn, val, tgt, stacks)["mean"]
        rows.append(row)
    print("| generator | k | weight | seed | gradient | " + " | ".join(
        f"{d} {m}" for d in ("T1w2T2w", "T2w2T1w") for m in ("through-plane", "slice MAE"))
          + " |\n|" + "---|" * 9)
    for r in rows:
        ref = next((x for x in rows if x["k"] == 0 and x["seed"] == r["seed"]
                    and x["gradient_weight"] == r["gradient_weight"]
                    and x["generator"] == r["generator"]), None)
        cells = []
        for dname in ("T1w2T2w", "T2w2T1w"):
            for m in ("through_plane_mae", "slice_mae"):
                v = r[dname][m]
                rel = "" if ref is None or r is ref else f" ({v / ref[dname][m] - 1:+.1%})"
                r[dname][f"{m}_change"] = None if not rel else v / ref[dname][m] - 1
                cells.append(f"{v:.3f}{rel}")
        print(f"| {r['generator']} | {r['k']} | {r['through_plane_weight']:g} | {r['seed']} | "
              f"{r['gradient_weight']:g} | " + " | ".join(cells) + " |")
    dest = REPO / "benchmarks" / "results" / "through_plane_sweep.json"
    atomic_write_json(dest, {"model": "generators_s", "preset": "cpu-small",
                             "steps": "10 x 100", "validation_subject": "sub-ms07",
                             "rows": rows, "environment": environment_info()})
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
