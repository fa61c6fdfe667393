"""Load test of the study web app: concurrent readers answering over loopback HTTP.

Builds a study from real slices of the shared data set (synthetic images are a
deterministic blur + noise of real slices: the app only needs image files),
starts ``mrsynth study serve`` in a subprocess on 127.0.0.1, and lets ``--readers``
concurrent readers each give ``--answers`` answers (state request + answer, as the
reader page does; images are not fetched). Every ``--dup-every``-th answer is sent
twice at the same moment with different labels to exercise idempotency.

Asserts 0 lost and 0 duplicated answers (and that the first stored answer is the one
the server acknowledged), prints answers/s and latency percentiles, and writes
``benchmarks/results/study_load.json``.

    .venv/bin/python benchmarks/study_load.py                 # 20 readers x 100 answers
    .venv/bin/python benchmarks/study_load.py --readers 3 --answers 10 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("MRSYNTH_SHARED_DATA", REPO.parent / "shared" / "data")) / "mrpaired"
)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "study_load.json"


# --------------------------------------------------------------------------- inputs
def _normalise(vol: np.ndarray) -> np.ndarray:
    """Robust per-volume map of the brain to [-1, 1], background -1 (like prepared data)."""
    fg = vol > vol.min() + 0.02 * (np.percentile(vol, 99.5) - vol.min())
    lo, hi = np.percentile(vol[fg], [0.5, 99.5])
    out = np.clip(2.0 * (vol - lo) / (hi - lo) - 1.0, -1.0, 1.0)
    out[~fg] = -1.0
    return out.astype(np.float32)


def build_inputs(
    bids: Path,
    out: Path,
    *,
    subjects: tuple[str, ...] = ("sub-ms19", "sub-met00110"),
    contrasts: tuple[str, ...] = ("T1w", "T2w"),
    step: int = 4,
    size: int = 64,
    models: tuple[str, ...] = ("blur", "noise"),
) -> tuple[Path, dict[str, Path]]:
    """Real slices of ``bids`` as NPY (``sub-X_slice-K_C.npy``) plus fake "model" outputs.

    Real: every ``step``-th axial slice with brain, resampled to ``size`` x ``size``,
    normalised to [-1, 1]. Model ``blur``: Gaussian blur (sigma 1) + noise; model
    ``noise``: stronger noise; both computed from the same slice, as a translation
    would be, with a fixed seed.
    """
    import nibabel as nib
    from scipy import ndimage

    from mrsynth.study.sources import brain_slices

    real_dir = out / "real"
    syn_dirs = {m: out / m for m in models}
    done = out / ".complete"
    if done.is_file() and done.read_text() == repr((subjects, contrasts, step, size, models)):
        return real_dir, syn_dirs  # already built with the same settings (tests share it)
    for d in (real_dir, *syn_dirs.values()):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    for s in subjects:
        keep: list[int] | None = None
        for c in contrasts:
            f = bids / s / "anat" / f"{s}_{c}.nii.gz"
            vol = np.asarray(nib.as_closest_canonical(nib.load(str(f))).get_fdata(dtype=np.float32))
            if keep is None:  # the same slices for every contrast of a subject
                keep = brain_slices(vol)[::step]
            vol = _normalise(vol)
            for k in keep:
                sl = vol[:, :, k]
                sl = ndimage.zoom(sl, (size / sl.shape[0], size / sl.shape[1]), order=1)
                sl = np.clip(sl, -1, 1).astype(np.float32)
                name = f"{s}_slice-{k:03d}_{c}.npy"
                np.save(real_dir / name, sl)
                brain = sl > -0.99
                if "blur" in syn_dirs:
                    b = ndimage.gaussian_filter(sl, 1.0) + rng.normal(0, 0.03, sl.shape)
                    np.save(syn_dirs["blur"] / name, np.where(brain, b, -1).astype(np.float32))
                if "noise" in syn_dirs:
                    n = sl + rng.normal(0, 0.12, sl.shape)
                    np.save(
                        syn_dirs["noise"] / name,
                        np.clip(np.where(brain, n, -1), -1, 1).astype(np.float32),
                    )
    done.write_text(repr((subjects, contrasts, step, size, models)))
    return real_dir, syn_dirs


# --------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db: Path, port: int, timeout: float = 60.0) -> subprocess.Popen:
    """``mrsynth study serve`` on 127.0.0.1 in a subprocess; returns once it answers."""
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mrsynth",
            "study",
            "serve",
            str(db),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded wait for the port
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server did not answer on port {port} within {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


# --------------------------------------------------------------------------- load
async def _reader(
    client: Any,
    base: str,
    token: str,
    n_answers: int,
    dup_every: int,
    latencies: list[float],
    acked: dict[str, str],
) -> int:
    """One reader: get state, answer, repeat. Returns the number of HTTP errors."""
    errors = 0
    r = await client.post(f"{base}/api/r/{token}/start")
    state = r.json()
    for i in range(n_answers):
        trial = state["trial"]
        if trial is None:
            raise RuntimeError("reader ran out of trials; create a larger study")
        label = "real" if (i % 3) else "synthetic"
        body = {"trial": trial["id"], "label": label, "confidence": 1 + i % 5, "response_ms": 500.0}
        t = time.perf_counter()
        if dup_every and i % dup_every == 0:
            other = dict(body, label="synthetic" if label == "real" else "real")
            rs = await asyncio.gather(
                client.post(f"{base}/api/r/{token}/answer", json=body),
                client.post(f"{base}/api/r/{token}/answer", json=other),
            )
            stored = [x for x in rs if x.status_code == 200 and x.json()["stored"]]
            if len(stored) != 1:
                raise AssertionError(f"{len(stored)} of 2 concurrent submissions were stored")
            acked[trial["id"]] = body["label"] if stored[0] is rs[0] else other["label"]
            r = stored[0]
        else:
            r = await client.post(f"{base}/api/r/{token}/answer", json=body)
            acked[trial["id"]] = label
        latencies.append(time.perf_counter() - t)
        if r.status_code != 200:
            errors += 1
            r = await client.get(f"{base}/api/r/{token}/state")
            state = r.json()
            continue
        state = r.json()["state"]
    return errors


async def _run(base: str, tokens: list[str], n_answers: int, dup_every: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    acked: dict[str, str] = {}
    limits = httpx.Limits(max_connections=2 * len(tokens) + 4)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        t0 = time.perf_counter()
        errors = await asyncio.gather(
            *[_reader(client, base, tok, n_answers, dup_every, latencies, acked) for tok in tokens]
        )
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "acked": acked, "errors": int(sum(errors)), "wall_s": wall}


def run_benchmark(
    readers: int,
    answers: int,
    *,
    data: Path,
    out: Path | None,
    dup_every: int = 10,
    workdir: Path | None = None,
) -> dict[str, Any]:
    from mrsynth.study import db as sdb
    from mrsynth.study.create import create_study

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmpd = Path(tmp)
        real_dir, syn_dirs = build_inputs(data, tmpd / "inputs", step=2 if answers > 60 else 4)
        n = max(answers, 8)
        settings = sdb.StudySettings(
            n_real=n // 2, n_synthetic=n - n // 2, display_size=128, seed=0, scale="confidence"
        )
        db_path = tmpd / "load.db"
        create_study(real_dir, syn_dirs, db_path, settings)
        conn = sdb.connect(db_path)
        tokens = [sdb.add_reader(conn, f"reader{i:02d}") for i in range(readers)]
        conn.close()
        port = free_port()
        proc = start_server(db_path, port)
        try:
            res = asyncio.run(_run(f"http://127.0.0.1:{port}", tokens, answers, dup_every))
        finally:
            stop_server(proc)
        conn = sqlite3.connect(db_path)
        try:
            stored = conn.execute(
                "SELECT t.uid, a.label FROM answers a JOIN trials t ON t.id = a.trial_id"
            ).fetchall()
            n_rows = conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            n_distinct = conn.execute("SELECT COUNT(DISTINCT trial_id) FROM answers").fetchone()[0]
        finally:
            conn.close()
    expected = readers * answers
    stored_map = dict(stored)
    lost = sum(1 for uid in res["acked"] if uid not in stored_map)
    lost += max(0, expected - len(res["acked"]))
    mismatched = sum(1 for uid, lab in res["acked"].items() if stored_map.get(uid) != lab)
    lat = np.asarray(res["latencies"]) * 1000.0
    result = {
        "readers": readers,
        "answers_per_reader": answers,
        "expected_answers": expected,
        "stored_answers": int(n_rows),
        "lost_answers": int(lost),
        "duplicated_answers": int(n_rows - n_distinct) + max(0, int(n_rows) - expected),
        "first_answer_mismatches": int(mismatched),
        "http_errors": res["errors"],
        "duplicate_submissions": sum(1 for i in range(answers) if dup_every and i % dup_every == 0)
        * readers,
        "wall_s": round(res["wall_s"], 3),
        "answers_per_s": round(expected / res["wall_s"], 1),
        "latency_ms": {
            "mean": round(float(lat.mean()), 2),
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p95": round(float(np.percentile(lat, 95)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2),
        },
    }
    from mrsynth.utils import atomic_write_json, environment_info

    result["environment"] = environment_info()
    if out is not None:
        atomic_write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", type=int, default=20)
    ap.add_argument("--answers", type=int, default=100, help="answers per reader")
    ap.add_argument(
        "--dup-every", type=int, default=10, help="send every k-th answer twice (0: never)"
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the mrpaired BIDS data set")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = ap.parse_args(argv)
    r = run_benchmark(
        args.readers, args.answers, data=args.data, out=args.out, dup_every=args.dup_every
    )
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"study load: {r['readers']} readers x {r['answers_per_reader']} answers (loopback)"
    )
    for col in (
        "answers",
        "stored",
        "lost",
        "duplicated",
        "answers/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
    ):
        t.add_column(col, justify="right")
    lat = r["latency_ms"]
    t.add_row(
        str(r["expected_answers"]),
        str(r["stored_answers"]),
        str(r["lost_answers"]),
        str(r["duplicated_answers"]),
        f"{r['answers_per_s']:.1f}",
        f"{lat['p50']:.1f}",
        f"{lat['p95']:.1f}",
        f"{lat['p99']:.1f}",
    )
    Console().print(t)
    print(f"wrote {args.out}")
    ok = (
        r["lost_answers"] == 0
        and r["duplicated_answers"] == 0
        and r["first_answer_mismatches"] == 0
        and r["http_errors"] == 0
    )
    if not ok:
        print("FAILED: answers were lost, duplicated or changed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
