"""What verifying checkpoints costs: sha256 of a paper-size checkpoint on save and on load.

Every checkpoint stores the sha256 of ``weights.safetensors`` and ``state.pt`` in its
``meta.json`` (issue 10 item 6); saving hashes both files, ``load_weights`` (translate,
evaluate, export, resume) re-hashes the weights and ``load_state`` (resume) the state. This
builds each model at the ``paper`` preset on the CPU, gives its Adam optimisers their moment
buffers (one step on zero gradients), saves a checkpoint and times, with the files in the page
cache (right after a save, the usual case):

* ``save`` (the whole ``save_checkpoint``) and the part of it spent hashing,
* ``load`` (``load_weights`` + ``load_state``, verified) and the part spent hashing.

    .venv/bin/python benchmarks/checkpoint_hash.py      # writes results/checkpoint_hash.json
    .venv/bin/python benchmarks/checkpoint_hash.py --models cyclegan --repeats 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "checkpoint_hash.json"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_name: str, repeats: int) -> dict:
    import torch

    from mrsynth.models.base import build_model
    from mrsynth.train import checkpoint as ckpt
    from mrsynth.train.config import resolve_config

    model = build_model(resolve_config(model_name, "paper"))
    optimizers = model.build_optimizers()
    for o in optimizers.values():  # Adam's exp_avg / exp_avg_sq, as in a real checkpoint
        for group in o.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        o.step()
    state = {"optimizers": {n: o.state_dict() for n, o in optimizers.items()},
             "aux": model.aux_state_dict(), "epoch": 1}
    meta = {"model": model_name, "contrasts": ["T1w", "T2w"], "epoch": 1, "iteration": 1}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = ckpt.save_checkpoint(root, "latest", model, state, meta)
        files = {f: path / f for f in (ckpt.WEIGHTS, ckpt.STATE)}
        sizes = {f: p.stat().st_size for f, p in files.items()}
        save_s = _median_time(lambda: ckpt.save_checkpoint(root, "latest", model, state, meta),
                              repeats)
        hash_s = {f: _median_time(lambda p=p: ckpt.sha256_file(p), repeats)
                  for f, p in files.items()}

        def load() -> None:
            ckpt.load_weights(path)
            ckpt.load_state(path)

        load_s = _median_time(load, repeats)
    total_mb = sum(sizes.values()) / 1e6
    hashing = sum(hash_s.values())
    return {
        "model": model_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mb": round(sizes[ckpt.WEIGHTS] / 1e6, 2),
        "state_mb": round(sizes[ckpt.STATE] / 1e6, 2),
        "save_s": round(save_s, 4),
        "load_verified_s": round(load_s, 4),
        "sha256_weights_s": round(hash_s[ckpt.WEIGHTS], 4),
        "sha256_state_s": round(hash_s[ckpt.STATE], 4),
        "sha256_mb_per_s": round(total_mb / hashing, 1),
        "hash_share_of_save": round(hashing / save_s, 3),
        "hash_share_of_load": round(hashing / load_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cyclegan", "unit", "pix2pix"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import torch

    from mrsynth.utils import atomic_write_json, environment_info

    torch.set_num_threads(1)
    rows = [measure(m, args.repeats) for m in args.models]
    cols = ("model", "parameters", "weights_mb", "state_mb", "save_s", "load_verified_s",
            "sha256_weights_s", "sha256_state_s", "sha256_mb_per_s", "hash_share_of_save",
            "hash_share_of_load")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    doc = {"benchmark": "checkpoint_hash", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "repeats": args.repeats, "rows": rows, "environment": environment_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
