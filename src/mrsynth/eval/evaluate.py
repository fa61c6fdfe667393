"""``mrsynth evaluate``: score trained runs on the test split of a prepared file.

For every run and both directions it translates each paired test slice,
scores it against the real slice (:mod:`mrsynth.eval.metrics`, in both regions:
whole image and brain mask), and writes into ``EVAL_DIR``:

==============================  ====================================================
``per_image.csv``               subject, slice, model, kind, direction, source, target,
                                region, mae, psnr, mi, nmi, ssim
``summary.csv`` / ``summary.md`` mean ± std, median, 95 % bootstrap CI per model,
                                direction, region and metric (``summary.md`` opens
                                with the verdict)
``wilcoxon.csv``                paired Wilcoxon signed-rank tests between models
``verdict.csv``                 per trained model and direction: does it beat
                                ``baseline_intensity`` inside the brain (one-sided
                                Wilcoxon on per-slice MAE, Holm over models)
``findings.csv``                the study's claims, reproduced or not
                                (:mod:`mrsynth.eval.findings`)
``volume.csv``                  per test subject, model, kind and direction: the metrics of
                                :mod:`mrsynth.eval.volume` (PSNR, 3-D SSIM, MAE, through-plane
                                and in-plane error) on the subject's reassembled slices
``volume_tests.csv``            per trained model and direction: through-plane error against
                                ``baseline_intensity`` (one-sided Wilcoxon on neighbouring
                                slice pairs, Holm over models)
``timing.csv``                  training s/epoch (from each run) and inference ms/slice
``c2st.csv``                    classifier two-sample test accuracy per model/direction
``figure1[-brain].png/.pdf``    Figure 1 (primary region; the other region too)
``figure2.png/.pdf``            Figure 2
``synthetic/<model>/``          ``<subject>_slice-<k:03d>_<contrast>.npy``: every synthetic
                                test slice, float32, normalised units (the perceptual
                                study reads these)
``eval.json``                   manifest: runs and their configs, baselines (with the
                                fitted lookup tables), data settings, definitions,
                                environment
==============================  ====================================================

Beside the runs (``kind`` = ``model``), every output holds the three baselines
of :mod:`mrsynth.eval.baselines` (``kind`` = ``baseline``): ``baseline_identity``,
``baseline_intensity`` (fitted on the prepared file's training split only; left
out, with a note in ``eval.json``, when that split has no paired slices) and
``baseline_mean``.

The whole directory is built in a temporary sibling and renamed into place at
the end, so a failed or interrupted evaluation leaves nothing behind and a
directory named ``EVAL_DIR`` is always complete (``eval.json`` marks it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mrsynth.data.context import exact_fraction, prepared_table, run_context_slices
from mrsynth.data.naming import format_slice_name
from mrsynth.data.prepared import PreparedData, load_prepared
from mrsynth.data.slicing import plane_of
from mrsynth.errors import ConfigError, DataError
from mrsynth.eval import baselines as bl
from mrsynth.eval import stats
from mrsynth.eval import volume as vol
from mrsynth.eval.c2st import c2st
from mrsynth.eval.common import (
    Direction,
    check_compatible,
    directions,
    load_run_checked,
    refuse_repeated_runs,
    safe_name,
    write_csv,
)
from mrsynth.eval.figures import figure1, figure2
from mrsynth.eval.findings import FINDINGS_FIELDS, findings, findings_rows
from mrsynth.eval.metrics import DEFAULT_BINS, METRICS, REGIONS, image_metrics
from mrsynth.eval.stats import BASELINE, MODEL
from mrsynth.utils import atomic_write_json, atomic_write_text, check_can_write, environment_info

if TYPE_CHECKING:
    from mrsynth.train.runs import LoadedRun

PER_IMAGE_FIELDS = ("subject", "slice", "model", "kind", "direction", "source", "target",
                    "region", *METRICS)
SUMMARY_FIELDS = ("region", "model", "kind", "direction", "metric", "n", "n_excluded", "mean",
                  "std", "median", "ci_low", "ci_high")
WILCOXON_FIELDS = ("region", "direction", "metric", "model_a", "model_b", "kind_a", "kind_b",
                   "n", "median_diff", "statistic", "p_value", "p_holm")
VERDICT_FIELDS = ("direction", "model", "baseline", "region", "metric", "n", "model_mean",
                  "baseline_mean", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
                  "beats")
TIMING_FIELDS = ("model", "kind", "direction", "train_s_per_epoch", "epochs", "train_device",
                 "inference_ms_per_slice", "n_slices", "inference_device", "batch_size")
VOLUME_FIELDS = ("subject", "model", "kind", "direction", "source", "target", "n_slices",
                 "n_runs", "slices", "n_pairs", "n_voxels", *vol.VOLUME_METRICS)
VOLUME_TEST_FIELDS = ("direction", "model", "baseline", "metric", "n", "model_mean",
                      "baseline_mean", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm")
HUMAN_KEYS = ("accuracy", "ci_low", "ci_high", "n")
C2ST_FIELDS = ("model", "kind", "direction", "accuracy", "ci_low", "ci_high", "p_value",
               "n_train", "n_test", "steps", "seed", *(f"human_{k}" for k in HUMAN_KEYS))

METRIC_DEFINITIONS = {
    "mae": "mean |syn_z - real_z| over the region (standard deviations)",
    "psnr": "10 log10(peak^2 / MSE) dB, peak = max - min of the z-scored real image in the "
            "region (z-scored images have no nominal range; the reference's own range is "
            "unit-free and what it actually spans)",
    "mi": "H(real) + H(syn) - H(real, syn) in nats from numpy.histogram2d, equal-width bins "
          "over each image's range",
    "nmi": "scikit-image normalized_mutual_information, (H(real)+H(syn))/H(real,syn), 1 to 2",
    "ssim": "scikit-image structural_similarity, 7x7 uniform window, data_range = PSNR peak; "
            "brain region: mean of the SSIM map inside the mask",
}

Log = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def train_timing(metrics: dict[str, Any] | None) -> tuple[float, int | None, str]:
    """Mean training seconds per epoch, epochs and device from a run's ``metrics.json``.

    The trainer writes ``device`` and one ``{"wall_s": ...}`` per finished epoch;
    a run without finished epochs gives NaN and no epoch count.
    """
    m = metrics or {}
    device = str(m.get("device") or "n/a")
    walls = [float(e["wall_s"]) for e in m.get("epochs") or []
             if isinstance(e, dict) and "wall_s" in e]
    if not walls:
        return float("nan"), None, device
    return float(np.mean(walls)), len(walls), device


#: Bytes per test pixel while evaluating: both contrasts, one synthetic direction and the
#: mask resident (float32 x 3 + bool), with headroom for the metrics' temporaries.
EVAL_BYTES_PER_PIXEL = 24


def _paired_test(data: PreparedData, contrasts: Sequence[str], max_subjects: int | None = None,
                 seed: int = 0) -> tuple[PreparedData, dict[str, Any]]:
    """The paired test slices in (subject, slice) order, read from the (lazy) store only
    now: with ``max_subjects``, those of a seeded sample of the test subjects. Also says
    which subjects were kept out of how many."""
    if not data.has_split("test"):
        data.split_view("test")  # raises the usual message
    sel = data.split == "test"
    for c in contrasts:
        sel = sel & data.available[c].astype(bool)
    rows = np.flatnonzero(sel)
    if rows.size == 0:
        raise DataError(
            f"The prepared data {data.path} has no test slices with both {contrasts[0]} and "
            f"{contrasts[1]}; evaluation needs paired test images. Prepare paired data."
        )
    subjects = np.unique(data.subject[rows])
    sample = {"test_subjects_available": int(subjects.size), "max_subjects": max_subjects}
    if max_subjects is not None and subjects.size > max_subjects:
        keep = np.sort(np.random.default_rng(seed).choice(subjects, max_subjects,
                                                          replace=False))
        rows = rows[np.isin(data.subject[rows], keep)]
    rows = rows[np.lexsort((data.slice_index[rows], data.subject[rows]))]  # deterministic
    _check_fits(data, rows, max_subjects)
    return data.select(rows), sample


def _check_fits(data: PreparedData, rows: np.ndarray, max_subjects: int | None) -> None:
    """Refuse, before reading it, a test split that cannot be held in memory."""
    import torch

    from mrsynth.train.loader import free_memory

    need = int(rows.size) * int(np.prod(data.size)) * EVAL_BYTES_PER_PIXEL
    free = free_memory(torch.device("cpu"))
    if free is not None and need > free:
        n_subj = len(set(data.subject[rows].tolist()))
        per = max(1, need // max(1, n_subj))
        raise DataError(
            f"The {'sampled ' if max_subjects else ''}test split of {data.path} ({rows.size} "
            f"slices of {n_subj} subjects) needs about {need / 1e9:.1f} GB to evaluate, more "
            f"than the {free / 1e9:.1f} GB of memory available. Evaluate a seeded sample of "
            f"its subjects with --max-subjects {max(1, int(free // per) // 2)} (the paired "
            "tests need tens of subjects, not thousands)."
        )


def _translate_all(
    run: LoadedRun, x: np.ndarray, direction: str, batch_size: int, device: str,
    table: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Synthetic slices (N,H,W) float32 and inference ms/slice (warm-up batch excluded).

    ``table`` (N, 2k+1): a 2.5-D run's inputs are the stacks of neighbouring slices it
    indexes in ``x`` (:mod:`mrsynth.data.context`)."""
    import torch

    def run_batch(i: int) -> np.ndarray:
        rows = x[i : i + batch_size, None] if table is None else x[table[i : i + batch_size]]
        xb = torch.from_numpy(np.ascontiguousarray(rows))
        yb = run.translate(xb.to(device), direction)
        return yb.detach().float().cpu().numpy()[:, 0]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run_batch(0)  # warm-up: allocations, lazy init, cudnn autotune
    sync()
    outs = []
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        outs.append(run_batch(i))
    sync()
    ms = (time.perf_counter() - t0) * 1000.0 / x.shape[0]
    return np.concatenate(outs).astype(np.float32), ms


def _figure2_pick(test: PreparedData) -> int:
    """Row of Figure 2: the first test subject's slice with the most brain."""
    first = sorted(set(test.subject.tolist()))[0]
    rows = np.flatnonzero(test.subject == first)
    area = test.mask[rows].reshape(rows.size, -1).sum(axis=1)
    return int(rows[int(np.argmax(area))])


def human_accuracy(study: Path | None) -> dict[tuple[str, str], dict[str, float]]:
    """The perceptual study's pooled accuracy per (model, synthetic contrast), if given.

    Read with the study package's own statistics (``mrsynth study results``): the
    "all readers", "model x contrast" rows, i.e. how often readers were right on that
    model's synthetic images and the real images of that contrast (50 % = chance).
    Study model names must be the evaluation's model labels (``--synthetic NAME=DIR``
    with ``EVAL_DIR/synthetic/NAME``).
    """
    if study is None:
        return {}
    from mrsynth.study import db as sdb
    from mrsynth.study.stats import POOLED, summarise

    conn = sdb.connect(study)
    try:
        summary = summarise(conn)
    finally:
        conn.close()
    return {
        (r["model"], r["contrast"]): {
            "accuracy": float(r["accuracy"]), "ci_low": float(r["accuracy_ci_low"]),
            "ci_high": float(r["accuracy_ci_high"]), "n": int(r["n"]),
        }
        for r in summary["rows"]
        if r["reader"] == POOLED and r["scope"] == "model x contrast"
    }


def evaluate(
    run_dirs: Sequence[str | Path],
    data_path: str | Path,
    out_dir: str | Path,
    *,
    region: str = "image",
    bins: int = DEFAULT_BINS,
    batch_size: int = 16,
    device: str = "cpu",
    c2st_steps: int = 200,
    seed: int = 0,
    study: str | Path | None = None,
    overwrite: bool = False,
    stochastic: bool = False,
    checkpoint: str | int = "latest",
    max_subjects: int | None = None,
    log: Log = _noop,
    mirror: bool = False,
) -> Path:
    """Evaluate runs on ``data_path``'s test split; return ``out_dir`` (see module docstring).

    ``checkpoint`` picks each run's weights: ``latest``, ``best`` (the epoch with the best
    score on the validation split, never the test split) or an epoch number.

    ``stochastic`` keeps latent noise and dropout on at inference (UNIT, as the study's Keras
    port did), drawn from ``seed``; the runs' entries in ``eval.json`` record it, and
    ``mirror`` (every run averages each slice's translation with the mirrored slice's,
    :attr:`~mrsynth.train.runs.LoadedRun.mirror`).

    ``max_subjects`` evaluates a sample of that many test subjects drawn with ``seed`` (for
    test splits too large to hold in memory; only their slices are read from a store)."""
    if max_subjects is not None and max_subjects < 1:
        raise ConfigError(f"--max-subjects {max_subjects}: give at least 1 (or leave it out "
                          "to evaluate every test subject).")
    if region not in REGIONS:
        raise ConfigError(f"Unknown mask/region {region!r}; use one of {', '.join(REGIONS)}.")
    if not run_dirs:
        raise ConfigError("Give at least one run directory (--runs RUN_DIR ...).")
    out = Path(out_dir)
    check_can_write(out, overwrite)
    data = load_prepared(data_path)

    # ---- validate every run before any work or output
    runs: list[tuple[str, Path, LoadedRun]] = []
    labels: set[str] = set()
    pair: tuple[str, str] | None = None
    refuse_repeated_runs(list(run_dirs))
    for rd in run_dirs:
        rd = Path(rd)
        run = load_run_checked(rd, device, checkpoint)
        run.stochastic = stochastic
        run.mirror = mirror
        check_compatible(run, rd, data)
        contrasts = tuple(run.contrasts)
        if pair is None:
            pair = contrasts  # type: ignore[assignment]
        elif contrasts != pair:
            raise ConfigError(
                f"Run {rd} translates {contrasts[0]} <-> {contrasts[1]} but the first run "
                f"translates {pair[0]} <-> {pair[1]}; evaluate runs of one contrast pair together."
            )
        label = safe_name(run.model_name)
        if label in labels or label in bl.BASELINES:
            label = safe_name(f"{run.model_name}-{rd.name}")
        if label in labels:
            raise ConfigError(
                f"Run {rd} would be labelled {label!r} like an earlier run (same model, same "
                "directory name); give the run directories distinct names.")
        labels.add(label)
        runs.append((label, rd, run))
    assert pair is not None
    if stochastic:  # reproducible samples for a given --seed
        import torch

        torch.manual_seed(seed)
    human = human_accuracy(Path(study) if study else None)
    test, sample = _paired_test(data, pair, max_subjects, seed)
    dirs = directions(pair)
    n_subj = len(set(test.subject.tolist()))
    log(f"{len(test)} paired test slices from {n_subj} subjects"
        + (f" (a sample of {sample['test_subjects_available']}, --max-subjects)"
           if n_subj < sample["test_subjects_available"] else ""))
    luts = {d.label: bl.fit_on_training_split(data, d.source, d.target) for d in dirs}

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        manifest = _evaluate_into(work, runs, luts, test, dirs, pair, region=region, bins=bins,
                                  batch_size=batch_size, device=device, c2st_steps=c2st_steps,
                                  seed=seed, human=human, study=study, log=log)
        manifest["data"] = {"path": str(Path(data_path).resolve()), "settings": data.settings}
        manifest["test_sample"] = sample
        atomic_write_json(work / "eval.json", manifest)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished directory into place (the old one only goes once the new is there).

    ``mkdtemp`` makes the directory private (0700); give it the permissions a plain
    ``mkdir`` would have under the user's umask before it becomes the output.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def _baseline_predictions(
    luts: dict[str, bl.IntensityLUT | None], test: PreparedData, d: Direction
) -> dict[str, np.ndarray]:
    """Each baseline's synthetic test slices for direction ``d`` (intensity: if fitted)."""
    src = test.images[d.source]
    out = {bl.BASELINE_IDENTITY: bl.predict_identity(src)}
    if all(lut is not None for lut in luts.values()):
        out[bl.BASELINE_INTENSITY] = luts[d.label].predict(src, test.mask)  # type: ignore[union-attr]
    out[bl.BASELINE_MEAN] = bl.predict_mean(test.images[d.target], test.mask)
    return out


def _baseline_info(luts: dict[str, bl.IntensityLUT | None]) -> dict[str, Any]:
    """The manifest's record of the baselines: definitions and the fitted tables."""
    fitted = all(lut is not None for lut in luts.values())
    return {
        "definitions": {
            bl.BASELINE_IDENTITY: "the source slice as the prediction",
            bl.BASELINE_INTENSITY: (
                f"per-bin median of the normalised target inside the training split's brain "
                f"masks, {bl.LUT_BINS} equal bins of the normalised source over [-1, 1], "
                "empty bins interpolated from their neighbours, -1 outside the brain"),
            bl.BASELINE_MEAN: "the real target slice's brain mean inside the brain, -1 outside",
        },
        "intensity_lut": {
            k: {"bins": lut.bins, "range": [-1.0, 1.0], "table": lut.table.tolist(),
                "train_voxels_per_bin": lut.counts.tolist()}
            for k, lut in luts.items() if lut is not None
        },
        "note": "" if fitted else (
            f"{bl.BASELINE_INTENSITY} left out: the prepared file has no paired training "
            "slices with brain voxels to fit it on"),
    }


def _evaluate_into(
    work: Path,
    runs: list[tuple[str, Path, LoadedRun]],
    luts: dict[str, bl.IntensityLUT | None],
    test: PreparedData,
    dirs: list[Direction],
    pair: tuple[str, str],
    *,
    region: str,
    bins: int,
    batch_size: int,
    device: str,
    c2st_steps: int,
    seed: int,
    human: dict[tuple[str, str], dict[str, float]],
    study: str | Path | None,
    log: Log,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    c2st_rows: list[dict[str, Any]] = []
    fig2_row = _figure2_pick(test)
    fig2_syn: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    vol_rows: list[dict[str, Any]] = []
    pair_rows: list[dict[str, Any]] = []
    step = int(test.settings.get("slice_step", 1) or 1)
    stacks = vol.slice_stacks(test.subject, test.slice_index, test.crop, test.size, step)

    def score(label: str, kind: str, d: Direction, syn: np.ndarray, time_row: dict[str, Any]
              ) -> None:
        """Save, score, time and C2ST one model's (or baseline's) slices of one direction."""
        tgt = test.images[d.target]
        syn_dir = work / "synthetic" / label
        syn_dir.mkdir(parents=True, exist_ok=True)
        kinds[label] = kind
        fig2_syn.setdefault(label, {})[d.target] = syn[fig2_row]
        for i in range(len(test)):
            subj, k = str(test.subject[i]), int(test.slice_index[i])
            np.save(syn_dir / format_slice_name(subj, k, d.target), syn[i])
            for reg in REGIONS:
                m = image_metrics(tgt[i], syn[i], test.mask[i] if reg == "brain" else None,
                                  bins=bins)
                rows.append({"subject": subj, "slice": k, "model": label, "kind": kind,
                             "direction": d.label, "source": d.source, "target": d.target,
                             "region": reg, **m})
        subj_rows, pairs = vol.score_stacks(stacks, syn, tgt, test.mask, model=label, kind=kind,
                                            direction=d.label, source=d.source,
                                            target=d.target)
        vol_rows.extend(subj_rows)
        pair_rows.extend(pairs)
        timing.append({"model": label, "kind": kind, "direction": d.label, **time_row,
                       "n_slices": len(test)})
        log(f"{label}: C2ST {d.label}")
        res = c2st(tgt, syn, seed=seed, steps=c2st_steps)
        h = human.get((label, d.target), {})
        c2st_rows.append({"model": label, "kind": kind, "direction": d.label, **res.as_dict(),
                          **{f"human_{k}": h.get(k, "") for k in HUMAN_KEYS}})

    run_info = []
    for label, rd, run in runs:
        s_epoch, n_epochs, train_dev = train_timing(run.metrics)
        k = run_context_slices(run)  # 2.5-D: neighbours among the same subject's test slices
        table = prepared_table(test.subject, test.slice_index, k) if k else None
        if table is not None and exact_fraction(table, test.slice_index) < 0.5:
            log(f"{label}: a 2.5-D run (arch.context_slices={k}), but most test slices lack "
                "their neighbours in the prepared file (--slice-step?): it sees them repeated")
        for d in dirs:
            log(f"{label}: translating {len(test)} slices {d.label}")
            syn, ms = _translate_all(run, test.images[d.source], d.internal, batch_size, device,
                                     table)
            if syn.shape != test.images[d.target].shape:
                raise DataError(
                    f"Run {rd} produced images of shape {syn.shape[1:]} for {d.label}, "
                    f"expected {test.images[d.target].shape[1:]} (the prepared data's size)."
                )
            score(label, MODEL, d, syn, {
                "train_s_per_epoch": s_epoch, "epochs": n_epochs if n_epochs is not None else "",
                "train_device": train_dev, "inference_ms_per_slice": ms,
                "inference_device": device, "batch_size": batch_size})
        run_info.append({"label": label, "model": run.model_name, "run_dir": str(rd.resolve()),
                         "contrasts": list(run.contrasts), "config": run.config,
                         "metrics": run.metrics, "stochastic": run.stochastic,
                         "mirror": run.mirror,
                         "checkpoint": run.checkpoint.name, "epoch": run.epoch})
    for d in dirs:
        t0 = time.perf_counter()
        preds = _baseline_predictions(luts, test, d)
        ms = (time.perf_counter() - t0) * 1000.0 / len(test) / len(preds)
        for name, syn in preds.items():
            log(f"{name}: scoring {d.label}")
            score(name, BASELINE, d, syn, {
                "train_s_per_epoch": "", "epochs": "", "train_device": "",
                "inference_ms_per_slice": ms, "inference_device": "cpu (numpy)",
                "batch_size": ""})

    log("statistics and figures")
    order = list(kinds)  # runs in the order given, then the baselines
    summary = stats.summarize(rows, seed=seed)
    tests = stats.paired_wilcoxon(rows)
    dir_labels = [d.label for d in dirs]
    verdict = stats.verdict(rows, dir_labels, seed=seed)
    found = findings(rows, {r["label"]: r["model"] for r in run_info}, pair, region=region,
                     seed=seed)
    write_csv(work / "per_image.csv", rows, PER_IMAGE_FIELDS)
    write_csv(work / "summary.csv", summary, SUMMARY_FIELDS)
    write_csv(work / "wilcoxon.csv", tests, WILCOXON_FIELDS)
    write_csv(work / "verdict.csv", verdict, VERDICT_FIELDS)
    write_csv(work / "findings.csv", findings_rows(found), FINDINGS_FIELDS)
    vol_tests = vol.through_plane_tests(pair_rows, dir_labels, bl.BASELINE_INTENSITY, seed=seed)
    write_csv(work / "volume.csv", vol_rows, VOLUME_FIELDS)
    write_csv(work / "volume_tests.csv", vol_tests, VOLUME_TEST_FIELDS)
    write_csv(work / "timing.csv", timing, TIMING_FIELDS)
    write_csv(work / "c2st.csv", c2st_rows, C2ST_FIELDS)
    verdict_text = stats.verdict_lines(verdict, dir_labels)
    md = ["# Evaluation summary\n\n## Verdict\n\n"
          + "".join(f"- {line}\n" for line in verdict_text)
          + f"\n{len(test)} paired test slices; metrics on per-image "
          "z-scored images (mean ± std, median [95 % bootstrap CI]). Baselines: "
          + ", ".join(m for m in order if kinds[m] == BASELINE) + ".\n"]
    for reg in [region] + [r for r in REGIONS if r != region]:
        name = "whole image" if reg == "image" else "brain mask"
        md.append(f"\n## Region: {name}{' (primary)' if reg == region else ''}\n\n")
        md.append(stats.markdown_table(*stats.summary_table(summary, reg, models=order)))
    md.append("\n## Volumes: consistent in 3-D\n\n" + vol.VOLUME_NOTE + "\n\n")
    md.append(stats.markdown_table(*vol.volume_table(vol_rows, vol_tests, models=order)))
    atomic_write_text(work / "summary.md", "".join(md))

    a, b = pair
    fig_dirs = {f"{b}2{a}": f"synthetic {a}", f"{a}2{b}": f"synthetic {b}"}
    base = [m for m in order if kinds[m] == BASELINE]
    figure1(summary, region, fig_dirs, work / "figure1", c2st=c2st_rows, models=order,
            baselines=base)
    for reg in REGIONS:
        if reg != region:
            figure1(summary, reg, fig_dirs, work / f"figure1-{reg}", c2st=c2st_rows,
                    models=order, baselines=base)
    subj, k = str(test.subject[fig2_row]), int(test.slice_index[fig2_row])
    figure2({c: test.images[c][fig2_row] for c in pair}, fig2_syn, test.mask[fig2_row], pair,
            work / "figure2", title=f"Figure 2: {subj}, {plane_of(test.settings)} slice {k}",
            baselines=base)
    return {
        "format": "mrsynth-eval",
        "version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "primary_region": region,
        "regions": list(REGIONS),
        "bins": bins,
        "seed": seed,
        "contrasts": list(pair),
        "directions": {d.label: {"internal": d.internal, "source": d.source, "target": d.target}
                       for d in dirs},
        "runs": run_info,
        "models": [{"label": m, "kind": kinds[m]} for m in order],
        "baselines": _baseline_info(luts),
        "verdict": verdict_text,
        "n_test_slices": len(test),
        "test_subjects": sorted(set(test.subject.tolist())),
        "figure2": {"subject": subj, "slice": k},
        "study": str(Path(study).resolve()) if study else None,
        "metric_definitions": METRIC_DEFINITIONS,
        "volumes": {
            "slice_step": step,
            "subjects": {st.subject: [list(r) for r in st.runs] for st in stacks},
            "definitions": vol.VOLUME_DEFINITIONS,
        },
        "environment": environment_info(),
    }


def summary_markdown(eval_dir: str | Path) -> str:
    """The summary table of an evaluation (what the demo prints)."""
    return (Path(eval_dir) / "summary.md").read_text(encoding="utf-8")
