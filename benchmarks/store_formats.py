"""Which on-disk format for the prepared-slice store (issue 13 item 1)?

Writes the same real prepared slices (subjects of ``../shared/data/mrpaired`` at 256x256,
every slice with >= 10 % brain) subject by subject in each candidate format, then measures:

* ``write_s``: writing every subject's images (two contrasts) and mask;
* ``bytes_per_slice``: bytes on disk per slice (both contrasts and the mask);
* ``random_reads_per_s``: one random slice of each contrast plus its mask per read, from
  a store opened once (what a training DataLoader does), page cache warm;
* ``batch16_reads_per_s``: random batches of 16 slices (index arrays);
* ``dependency``: what the format needs besides numpy.

Candidates: per-subject ``.npy`` files opened with ``numpy.load(mmap_mode="r")`` (float16
and float32), Zarr v3 (chunks of one slice, its default zstd codec), HDF5 via h5py (chunks
of one slice, uncompressed and lzf). It also measures the float16 round trip of the
normalised images: the largest absolute error in [-1, 1] and its effect on the study's
z-scored in-brain MAE (target stored as float16 vs float32, against two predictions).

    .venv/bin/python benchmarks/store_formats.py [--subjects 3] [--reads 3000]

Prints a table and writes ``benchmarks/results/store_formats.json``. The machine is shared
by other engineers (2 cores), so read rates are noisy to about +-20 %.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "store_formats.json"
DATA = ROOT.parent / "shared" / "data" / "mrpaired"


def _subject_arrays(n_subjects: int, tmp: Path) -> list[dict[str, np.ndarray]]:
    """Real prepared slices, one dict of arrays per subject."""
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.data.prepared import load_prepared

    src = tmp / "bids"  # the first n subjects, linked
    src.mkdir()
    for p in sorted(DATA.iterdir()):
        if not p.name.startswith("sub-") or len(list(src.glob("sub-*"))) < n_subjects:
            (src / p.name).symlink_to(p)
    out = prepare_dataset(src, tmp / "src.npz", test_fraction=0.0, progress=False)
    d = load_prepared(out)
    subjects = list(dict.fromkeys(d.subject.tolist()))[:n_subjects]
    return [{"T1w": d.images["T1w"][d.subject == s], "T2w": d.images["T2w"][d.subject == s],
             "mask": d.mask[d.subject == s]} for s in subjects]


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- formats
class Npy:
    dependency = "none (numpy)"

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.name = f"npy shards ({dtype}, mmap)"

    def write(self, root: Path, subjects: list[dict[str, np.ndarray]]) -> None:
        for i, s in enumerate(subjects):
            d = root / f"{i:06d}"
            d.mkdir(parents=True)
            for c in ("T1w", "T2w"):
                np.save(d / f"image__{c}.npy", s[c].astype(self.dtype))
            np.save(d / "mask.npy", s["mask"])

    def open(self, root: Path) -> Any:
        shards = sorted(p for p in root.iterdir())
        arrays = [{k: np.load(p / f"{k if k == 'mask' else 'image__' + k}.npy", mmap_mode="r")
                   for k in ("T1w", "T2w", "mask")} for p in shards]
        starts = np.cumsum([0] + [len(a["mask"]) for a in arrays])

        def read(rows: np.ndarray) -> list[np.ndarray]:
            shard = np.searchsorted(starts, rows, side="right") - 1
            out = []
            for k in ("T1w", "T2w", "mask"):
                out.append(np.stack([arrays[s][k][r - starts[s]] for s, r in zip(shard, rows,
                                                                                 strict=True)]))
            return out

        return read, int(starts[-1])


class Zarr:
    dependency = "zarr 3.1.6 (+ numcodecs, donfig, google-crc32c); zarr >= 3.2 needs Python 3.12"
    name = "zarr v3 (float16, zstd, 1 slice/chunk)"

    def write(self, root: Path, subjects: list[dict[str, np.ndarray]]) -> None:
        import zarr

        h, w = subjects[0]["mask"].shape[1:]
        g = zarr.open_group(str(root), mode="w")
        arrs = {c: g.create_array(c, shape=(0, h, w), chunks=(1, h, w), dtype="float16")
                for c in ("T1w", "T2w")}
        arrs["mask"] = g.create_array("mask", shape=(0, h, w), chunks=(1, h, w), dtype="bool")
        for s in subjects:  # appended subject by subject
            for k, a in arrs.items():
                a.append(s[k].astype(a.dtype), axis=0)

    def open(self, root: Path) -> Any:
        import zarr

        g = zarr.open_group(str(root), mode="r")
        arrs = [g["T1w"], g["T2w"], g["mask"]]

        def read(rows: np.ndarray) -> list[np.ndarray]:
            return [a.get_orthogonal_selection((rows,)) for a in arrs]

        return read, int(arrs[0].shape[0])


class H5:
    dependency = "h5py 3.16 (bundles libhdf5)"

    def __init__(self, compression: str | None) -> None:
        self.compression = compression
        self.name = f"hdf5 (float16, {compression or 'uncompressed'}, 1 slice/chunk)"

    def write(self, root: Path, subjects: list[dict[str, np.ndarray]]) -> None:
        import h5py

        h, w = subjects[0]["mask"].shape[1:]
        root.mkdir(parents=True)
        with h5py.File(root / "store.h5", "w") as f:
            ds = {c: f.create_dataset(c, shape=(0, h, w), maxshape=(None, h, w), chunks=(1, h, w),
                                      dtype="float16", compression=self.compression)
                  for c in ("T1w", "T2w")}
            ds["mask"] = f.create_dataset("mask", shape=(0, h, w), maxshape=(None, h, w),
                                          chunks=(1, h, w), dtype="bool",
                                          compression=self.compression)
            for s in subjects:
                n0, n = ds["mask"].shape[0], len(s["mask"])
                for k, d in ds.items():
                    d.resize(n0 + n, axis=0)
                    d[n0:] = s[k]

    def open(self, root: Path) -> Any:
        import h5py

        f = h5py.File(root / "store.h5", "r")
        arrs = [f["T1w"], f["T2w"], f["mask"]]

        def read(rows: np.ndarray) -> list[np.ndarray]:
            # one read per row: h5py's own fancy indexing (a[sorted rows]) measured ~100x slower
            return [np.stack([a[int(r)] for r in rows]) for a in arrs]

        return read, int(arrs[0].shape[0])


def _rate(read: Any, n: int, batch: int, reads: int, rng: np.random.Generator) -> float:
    draws = [rng.choice(n, size=batch, replace=False) for _ in range(reads)]
    read(draws[0])  # warm
    t0 = time.perf_counter()
    for rows in draws:
        read(rows)
    return reads / (time.perf_counter() - t0)


def _float16_effect(subjects: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Round-trip error of float16 and its effect on the study's z-scored in-brain MAE."""
    from scipy import ndimage as ndi

    from mrsynth.eval.metrics import mae, zscore

    t1 = np.concatenate([s["T1w"] for s in subjects])
    t2 = np.concatenate([s["T2w"] for s in subjects])
    mask = np.concatenate([s["mask"] for s in subjects])
    err = np.abs(t2.astype(np.float16).astype(np.float32) - t2)
    out: dict[str, Any] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                           "slices": int(len(t2))}
    # two predictions of T2w: the T1w image itself (a poor one) and a blurred T2w (a good one)
    preds = {"identity (T1w as T2w)": t1,
             "blurred T2w (sigma 1 px)": ndi.gaussian_filter(t2, (0, 1, 1)).astype(np.float32)}
    for name, pred in preds.items():
        diffs, maes = [], []
        for i in range(len(t2)):
            if mask[i].sum() < 2:
                continue
            m32 = mae(zscore(t2[i], mask[i]), zscore(pred[i], mask[i]), mask[i])
            t16 = t2[i].astype(np.float16).astype(np.float32)
            p16 = pred[i].astype(np.float16).astype(np.float32)
            m16 = mae(zscore(t16, mask[i]), zscore(p16, mask[i]), mask[i])
            diffs.append(abs(m16 - m32))
            maes.append(m32)
        out[name] = {"mean_mae_float32": float(np.mean(maes)),
                     "max_abs_mae_change": float(np.max(diffs)),
                     "mean_abs_mae_change": float(np.mean(diffs))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--reads", type=int, default=3000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        subjects = _subject_arrays(args.subjects, tmp)
        n_slices = sum(len(s["mask"]) for s in subjects)
        for fmt in (Npy("float16"), Npy("float32"), Zarr(), H5(None), H5("lzf")):
            root = tmp / "store"
            t0 = time.perf_counter()
            fmt.write(root, subjects)
            write_s = time.perf_counter() - t0
            read, n = fmt.open(root)
            assert n == n_slices
            got = read(np.array([n - 1, 0]))  # check the round trip
            assert np.allclose(got[1][1], subjects[0]["T2w"][0], atol=1e-3)
            rows.append({
                "format": fmt.name, "dependency": fmt.dependency,
                "write_s": round(write_s, 3),
                "bytes_per_slice": int(_du(root) / n_slices),
                "random_reads_per_s": round(_rate(read, n, 1, args.reads, rng), 1),
                "batch16_reads_per_s": round(_rate(read, n, 16, args.reads // 10, rng), 1),
            })
            print(rows[-1], flush=True)
            shutil.rmtree(root)
        f16 = _float16_effect(subjects)
    result = {"subjects": args.subjects, "slices": n_slices, "size": [256, 256],
              "machine": f"{platform.machine()} {platform.processor()}, shared 2 cores",
              "formats": rows, "float16": f16}
    print(f"\n{n_slices} slices of 256x256 (two contrasts + mask) from {args.subjects} real "
          "subjects")
    print(f"{'format':46} {'B/slice':>9} {'write s':>8} {'1 slice/s':>10} {'16 slices/s':>12}")
    for r in rows:
        print(f"{r['format']:46} {r['bytes_per_slice']:>9} {r['write_s']:>8} "
              f"{r['random_reads_per_s']:>10} {r['batch16_reads_per_s']:>12}")
    print(f"float16 round trip: max abs error {f16['max_abs_error']:.2e} in [-1, 1]")
    for k, v in f16.items():
        if isinstance(v, dict):
            print(f"  z-scored in-brain MAE, {k}: {v['mean_mae_float32']:.4f}; max change "
                  f"{v['max_abs_mae_change']:.2e}, mean change {v['mean_abs_mae_change']:.2e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
