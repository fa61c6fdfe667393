"""Multi-GPU and multi-node training: torchrun environment, process group, sharding, DDP.

``torchrun --nproc-per-node N -m mrsynth train ...`` starts N copies of the trainer; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment (:func:`detect`), joins the
process group (:func:`init`: NCCL on CUDA, gloo on CPU) and trains on its share of every
batch. The pieces, and why they are shaped like this:

* **Global batch.** ``train.batch_size`` is the *global* batch: every step each of the N ranks
  takes ``batch_size / N`` rows of the same sampler draw (:func:`shard_batch`). A run therefore
  learns the same thing whatever the number of ranks (gradients are averaged, the losses are
  means over the batch), steps per epoch do not depend on N, and a checkpoint can be resumed
  with a different N. The cost: the batch size must be a multiple of N.
* **Two DDP modules.** The networks a model steps with one optimiser (its generators, or its
  discriminators) are wrapped together in one ``DistributedDataParallel``; generators and
  discriminators are never in one DDP module (:func:`wrap_model`). Models call their networks
  directly (``self.G_A2B(x)``), several times per step; :func:`wrap_model` routes those calls
  through the DDP module, so the model code is unchanged and its ``state_dict`` keys stay the
  same. A network whose parameters are all frozen (the discriminator during the generator
  step) is called directly: no gradient reaches it, so it must not arm DDP's reducer.
* **Rank 0 writes.** Checkpoints, logs, samples and ``config.json`` are written by rank 0;
  losses are averaged over ranks at each log interval (one collective per interval), so every
  rank takes the same decisions (divergence, stop signals) and none waits forever.
* **Per-rank randomness.** Each rank keeps its own image pool and its own torch RNG stream
  (:func:`rank_seed`) for dropout and latent noise; the sampler uses the run's seed on every
  rank so that all ranks agree on each epoch's order.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mrsynth.errors import ConfigError

#: Environment variables torchrun sets for every worker.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0


SINGLE = DistInfo()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"Environment variable {name}={raw!r} is not an integer. It is set by torchrun; "
            "launch with `torchrun --nproc-per-node N -m mrsynth train ...` or unset it."
        ) from None


def detect() -> DistInfo:
    """Rank and world size from torchrun's environment (a single process without it)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"Inconsistent torchrun environment (RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local}). Launch with torchrun, or unset these variables."
        )
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} but {', '.join(missing)} is not set: the processes cannot "
                "find each other. Launch with `torchrun --nproc-per-node N -m mrsynth train ...` "
                "(multi-node: add --nnodes, --node-rank/--rdzv-endpoint)."
            )
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """One GPU per rank: ``cuda:LOCAL_RANK`` on CUDA; the CPU is shared."""
    if device.type != "cuda" or not info.distributed:
        return device
    n = torch.cuda.device_count()
    if info.local_rank >= n:
        raise ConfigError(
            f"Rank {info.rank} has LOCAL_RANK {info.local_rank} but this node has {n} GPU(s). "
            f"Use --nproc-per-node {n} or fewer."
        )
    return torch.device("cuda", info.local_rank)


def init(device: torch.device, timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (info, this rank's device).

    A single process (no torchrun, or ``--nproc-per-node 1``) creates no process group.
    Calling it again in a process that already joined returns the existing group's info.
    """
    info = detect()
    if not info.distributed:
        return info, device
    dev = device_for(info, device)
    backend = backend_for(dev.type)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    elif dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise ConfigError("A process group with another rank/size is already initialised.")
    return DistInfo(info.rank, info.world_size, info.local_rank, dist.get_backend()), dev


def initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group (safe to call when none was created).

    ``wait``: meet the other ranks first. After a normal end every rank should, so that no rank
    tears down its connections while a peer still uses them (gloo aborts the process then);
    after an error the others may never arrive, so the default does not wait.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ---------------------------------------------------------------------- batches and seeds
def local_batch_size(global_batch: int, world_size: int) -> int:
    """Rows per rank of a global batch; refuses batches that do not split evenly."""
    if global_batch % world_size:
        suggest = world_size * max(1, global_batch // world_size)
        raise ConfigError(
            f"train.batch_size {global_batch} is the global batch and must be a multiple of the "
            f"{world_size} ranks. Use --batch-size {suggest} (or another multiple of "
            f"{world_size}); see docs/performance.md for the learning rate to use with a larger "
            "batch."
        )
    return global_batch // world_size


def shard_batch(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's columns of an epoch's ``(steps, global_batch)`` index array.

    Rank r takes the r-th contiguous block of every step's batch, so the ranks together see
    exactly the rows a single process would see with the same global batch.
    """
    if indices.ndim != 2:
        raise ValueError(f"expected (steps, batch) indices, got shape {tuple(indices.shape)}")
    n = local_batch_size(int(indices.shape[1]), world_size)
    return indices[:, rank * n : (rank + 1) * n]


def rank_seed(seed: int, rank: int) -> int:
    """A different but reproducible RNG seed per rank (rank 0 keeps the run's seed)."""
    return (int(seed) + 1_000_003 * int(rank)) % 2**63


# ---------------------------------------------------------------------- collectives
def all_mean(values: Tensor) -> Tensor:
    """Mean over ranks of a tensor (a copy; unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """For each flag: true on every rank when it is true on at least one (stop signals,
    timers), so that all ranks take the same branch. One collective for all flags."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    if dist.get_backend() == "nccl" and torch.device(device).type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


# ---------------------------------------------------------------------- DDP wrapping
class _NetGroup(nn.Module):
    """The networks stepped by one optimiser; ``forward(name, ...)`` runs one of them.

    DDP needs one module whose forward it sees; the networks themselves stay children of the
    model too (a module may have two parents), so no weights are copied.
    """

    def __init__(self, nets: dict[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.nets[name](*args, **kwargs)


class _Routed:
    """Stands in for ``model.<name>``: calls go through the group's DDP module.

    Attribute access (``.parameters()``, ``.training``...) reaches the real network. Calls with
    every parameter frozen, or with gradients off, skip DDP: nothing will be synchronised, and
    arming the reducer for a backward that never reaches these weights would break the next
    iteration.
    """

    def __init__(self, ddp: nn.Module, name: str, net: nn.Module) -> None:
        self.__dict__.update(_ddp=ddp, _name=name, _net=net)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        net = self._net
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in net.parameters()):
            return net(*args, **kwargs)
        return self._ddp(self._name, *args, **kwargs)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._net, item)

    def __setattr__(self, key: str, value: Any) -> None:
        setattr(self._net, key, value)

    def __repr__(self) -> str:
        return f"DDP-routed({self._name}: {type(self._net).__name__})"


@dataclass
class DDPWrapping:
    """The DDP modules of a wrapped model (one per optimiser) and how to undo the routing."""

    model: nn.Module
    groups: dict[str, nn.Module]
    routed: list[str]

    def unwrap(self) -> None:
        """Restore direct calls ``model.<name>(x)`` (the DDP modules are dropped)."""
        for name in self.routed:
            self.model.__dict__.pop(name, None)
        self.routed.clear()
        self.groups.clear()

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.groups.values())


def group_networks(
    model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]
) -> dict[str, dict[str, nn.Module]]:
    """The model's top-level networks grouped by the optimiser that owns their parameters.

    Raises ConfigError when a network's parameters are split over optimisers (it could not be
    wrapped on one side of the generator/discriminator split) or a trainable parameter belongs
    to no network.
    """
    owner: dict[int, str] = {}
    for opt_name, opt in optimizers.items():
        for group in opt.param_groups:
            for p in group["params"]:
                owner[id(p)] = opt_name
    groups: dict[str, dict[str, nn.Module]] = {n: {} for n in optimizers}
    covered: set[int] = set()
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if not params:
            continue
        owners = {owner.get(id(p)) for p in params}
        if len(owners) != 1 or None in owners:
            raise ConfigError(
                f"Network {name!r} of model {type(model).__name__} has parameters in "
                f"optimisers {sorted(str(o) for o in owners)}; DistributedDataParallel wraps the "
                "networks of one optimiser together, so each network must belong to exactly one."
            )
        groups[owners.pop()][name] = child  # type: ignore[index]
        covered.update(id(p) for p in params)
    stray = [i for i in owner if i not in covered]
    if stray:
        raise ConfigError(
            f"{len(stray)} optimised parameter(s) of model {type(model).__name__} belong to no "
            "top-level network, so DistributedDataParallel could not synchronise them."
        )
    return {k: v for k, v in groups.items() if v}


def wrap_model(
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device,
    *,
    bucket_cap_mb: float = 25.0,
) -> DDPWrapping:
    """Wrap each optimiser's networks in one DistributedDataParallel and route calls to it.

    Must be called on every rank, after the model is on its device and the optimisers exist,
    in a process that joined the group (:func:`init`). DDP broadcasts rank 0's weights and
    buffers, so all ranks start identical. Buffers are not re-synchronised at every forward:
    the models use instance norm (no running statistics); a batch-norm network keeps per-rank
    statistics between checkpoints (rank 0's are saved).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
               else {"broadcast_buffers": False})

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_model needs an initialised process group (distributed.init)")
    wrapping = DDPWrapping(model, {}, [])
    for opt_name, nets in group_networks(model, optimizers).items():
        group = _NetGroup(nets)
        ddp = DDP(
            group,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=bucket_cap_mb,
            **buffers,
        )
        wrapping.groups[opt_name] = ddp
        for name, net in nets.items():
            # An instance attribute shadows the registered child for attribute access only:
            # named_children() / state_dict() still see the real network.
            model.__dict__[name] = _Routed(ddp, name, net)
            wrapping.routed.append(name)
    return wrapping
