"""Data-parallel training on CPU (gloo): torchrun environment, sharding, DDP wrapping.

The key check: two processes with one image each per step end with the same weights as one
process with both images per step (global batch 2), because the losses are batch means and
DDP averages the gradients. It runs in float64, where only the order of additions differs and
the weights agree to ~1e-15. (In float32 Adam divides each gradient by its own size, so
elements whose gradient is rounding noise take +-lr steps in arbitrary directions, and the
adversarial game amplifies that; tests/test_distributed_train.py covers the fp32 trainer.)
Biases of convolutions followed by instance norm are left out of the weight comparison: their
exact gradient is zero, so even in float64 Adam moves them following rounding noise; they do
not change any output, and the generators' outputs are compared too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from helpers import norm_cancelled_biases
from mrsynth.errors import ConfigError
from mrsynth.models import build_model
from mrsynth.train import distributed as dd
from mrsynth.train import speed, step
from mrsynth.train.config import resolve_config

TINY: dict[str, dict[str, Any]] = {
    "cyclegan": {"arch.ngf": 4, "arch.n_blocks": 1, "arch.ndf": 8},
    "generators_s": {"arch.ngf": 4, "arch.n_blocks": 1},
    # no dropout or latent noise here: ranks draw their own random numbers
    "unit": {"arch.nef": 4, "arch.ndf": 4, "arch.dropout": 0.0, "arch.noise_std": 0.0},
}
OPTIONS = speed.FastOptions(channels_last=False, compile="none", fused_adam=False,
                           precision="fp32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- environment
def test_detect_reads_torchrun_environment(monkeypatch) -> None:
    for v in dd.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    assert dd.detect() == dd.DistInfo(0, 1, 0) and not dd.detect().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT is not set"):
        dd.detect()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    info = dd.detect()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert info.distributed and not info.is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="Inconsistent torchrun environment"):
        dd.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        dd.detect()
    assert dd.backend_for("cuda") == "nccl" and dd.backend_for("cpu") == "gloo"
    monkeypatch.setenv("RANK", "0")
    cpu = torch.device("cpu")
    assert dd.device_for(dd.detect(), cpu) == cpu


def test_shards_cover_the_global_batch_once() -> None:
    idx = torch.arange(24).view(6, 4)  # 6 steps, global batch 4
    for world in (1, 2, 4):
        parts = [dd.shard_batch(idx, r, world) for r in range(world)]
        assert all(p.shape == (6, 4 // world) for p in parts)
        # concatenating the ranks' rows gives back every step's global batch, in order
        torch.testing.assert_close(torch.cat(parts, 1), idx)
    with pytest.raises(ConfigError, match="must be a multiple of the 3 ranks"):
        dd.shard_batch(idx, 0, 3)
    with pytest.raises(ConfigError, match="Use --batch-size 2"):
        dd.local_batch_size(1, 2)
    seeds = {dd.rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8 and dd.rank_seed(7, 0) == 7


def test_networks_are_grouped_by_optimiser_never_g_with_d() -> None:
    for name, g, d in (("cyclegan", {"G_A2B", "G_B2A"}, {"D_A", "D_B"}),
                       ("unit", {"enc_A", "enc_B", "enc_shared", "dec_shared", "dec_A", "dec_B"},
                        {"D_A", "D_B"})):
        model = build_model(resolve_config(name, "cpu-small"))
        groups = dd.group_networks(model, model.build_optimizers())
        assert set(groups) == {"G", "D"}
        assert set(groups["G"]) == g and set(groups["D"]) == d
    model = build_model(resolve_config("cyclegan", "cpu-small", TINY["cyclegan"]))
    first_conv = set(map(id, model.G_A2B.model[1].parameters()))
    rest = [p for p in model.parameters() if id(p) not in first_conv]
    split = {"G": torch.optim.Adam(model.G_A2B.model[1].parameters()),
             "D": torch.optim.Adam(rest)}
    with pytest.raises(ConfigError, match="'G_A2B' .* each network must belong to exactly one"):
        dd.group_networks(model, split)
    partial = {"G": torch.optim.Adam(model.G_A2B.parameters())}
    with pytest.raises(ConfigError, match="'G_B2A'"):
        dd.group_networks(model, partial)


def test_collectives_are_identity_in_one_process() -> None:
    t = torch.tensor([1.0, 2.0])
    assert dd.all_mean(t) is t
    assert dd.any_rank(True, False) == (True, False)
    dd.barrier()  # no group: returns at once


# ---------------------------------------------------------------------- DDP vs one process
def _train_worker(rank: int, world: int, port: int, name: str, a: torch.Tensor,
                  b: torch.Tensor, steps: int, out: str) -> None:
    """Train ``steps`` steps with global batch 2 on ``world`` processes; rank 0 saves."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        info, device = dd.init(torch.device("cpu"))
        assert info.world_size == world and info.rank == rank
        assert info.backend == ("gloo" if world > 1 else None)
        torch.manual_seed(dd.rank_seed(0, rank))  # different init per rank: DDP must fix it
        model = build_model(resolve_config(name, "cpu-small", TINY[name])).to(a.dtype)
        setup = step.setup_training(model, device, OPTIONS, distributed=info.distributed)
        keys = list(model.state_dict())
        wrapping = dd.wrap_model(model, setup.optimizers, device) if info.distributed else None
        assert list(model.state_dict()) == keys  # checkpoints do not see the DDP wrapping
        idx = torch.arange(2 * steps).view(steps, 2)
        mine = dd.shard_batch(idx, info.rank, info.world_size)
        for s in range(steps):
            setup.model.train_step({"A": a[mine[s]], "B": b[mine[s]]}, setup.ctx)
        if wrapping is not None:
            assert set(wrapping.groups) == set(setup.optimizers)
            wrapping.unwrap()
        with torch.no_grad():
            outs = {d: model.generator(d)(a[-3:] if d == "A2B" else b[-3:]) for d in
                    ("A2B", "B2A")}
        if info.is_main:
            torch.save({"weights": model.state_dict(), "outs": outs,
                        "skip": norm_cancelled_biases(model)}, out)
        dd.shutdown(wait=True)
    finally:
        dd.shutdown()


@pytest.mark.parametrize("name", ["cyclegan", "unit"])
def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(
    name: str, paired_train_slices, tmp_path: Path, monkeypatch,
) -> None:
    """In float64 nothing but the order of additions differs, so the match is near-exact:
    both optimisers' gradients are synchronised (generators and discriminators in separate
    DDP modules), frozen discriminators bypass DDP, the image pools are per rank."""
    for v in dd.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    dtype, weight_tol, out_tol = torch.float64, 1e-12, 1e-10
    a, b = (x.to(dtype) for x in paired_train_slices)
    steps = 3
    _train_worker(0, 1, free_port(), name, a, b, steps, str(tmp_path / "single.pt"))
    for v in dd.TORCHRUN_VARS:  # the worker set them for the single process
        monkeypatch.delenv(v, raising=False)
    mp.spawn(_train_worker, args=(2, free_port(), name, a, b, steps, str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    ddp = torch.load(tmp_path / "ddp.pt")
    compared, worst = 0, 0.0
    for k, w in single["weights"].items():
        if k not in single["skip"]:
            worst = max(worst, (ddp["weights"][k] - w).abs().max().item())
            compared += 1
    assert compared > 10
    assert worst < weight_tol, worst
    # the weights did move (up to 3 Adam steps): not two untouched inits
    cfg = resolve_config(name, "cpu-small", TINY[name])
    torch.manual_seed(0)
    init = build_model(cfg).to(dtype).state_dict()
    moved = max((single["weights"][k] - init[k]).abs().max().item() for k in init
                if k not in single["skip"])
    assert moved > 1.5 * cfg["optim"]["lr"], moved
    for d in ("A2B", "B2A"):
        err = (ddp["outs"][d] - single["outs"][d]).abs().max().item()
        assert err < out_tol, (d, err)
