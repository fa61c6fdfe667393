"""The one training loop for every model.

``train(config, data_path, out_dir, resume=False)`` trains the model named in a resolved
config (:func:`mrsynth.train.config.resolve_config`) on a prepared-slice file and writes a run
directory::

    RUN_DIR/config.json    resolved config, data path and settings, environment, git commit
    RUN_DIR/metrics.json   per-epoch wall time, losses, images/s; mean s/epoch; status
    RUN_DIR/losses.csv     losses every ``train.log_every`` iterations
    RUN_DIR/samples/       epoch_0001.png ... : fixed slices, both directions
    RUN_DIR/checkpoints/   latest/ (every epoch and every N minutes), epoch_XXXX/ (every K)
    RUN_DIR/tensorboard/   scalars, only when the optional tensorboard package is installed

The loop is generic: models supply networks, optimisers and a step (:mod:`mrsynth.models`);
this file owns device and precision, the learning-rate schedule, checkpoints, logging,
resume and signals. The per-step work (batch gather, step, loss accumulation without host
syncs) and the speed options (channels_last, fused Adam, ``torch.compile``, CUDA graphs) come
from :mod:`mrsynth.train.fast`; under ``torchrun`` the loop runs data-parallel with
:mod:`mrsynth.train.distributed` (``train.batch_size`` is the global batch, rank 0 writes).

Resuming restores weights, optimisers, schedulers, grad scaler, image pools, every RNG state
and the position inside the epoch, so on CPU with a fixed seed an interrupted and resumed run
ends with the same weights as an uninterrupted one. A data-parallel run may be resumed with
another number of ranks (the global batch, hence the steps, stay the same).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from rich.console import Console

from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError, MrsynthError, OutputExistsError, RunError
from mrsynth.models.base import TranslationModel, build_model, get_model_class
from mrsynth.train import checkpoint as ckpt
from mrsynth.train import distributed as dd
from mrsynth.train import fast
from mrsynth.train.config import decay_start, flatten, upgrade_config, validate_config
from mrsynth.train.dataset import EpochSampler, TrainingSlices, load_training_slices
from mrsynth.train.logging import SAMPLES_DIR, EpochProgress, LossLog, Metrics, save_sample_grid
from mrsynth.utils import atomic_write_json, environment_info

CONFIG_JSON = "config.json"
RUN_FORMAT = 1

#: Settings that may change when a run is resumed (they do not change what is learnt per
#: step); anything else differing from the stored config is refused.
RESUMABLE_KEYS = {
    "device", "precision", "train.epochs", "train.lr_decay", "train.decay_start_epoch",
    "train.log_every",
    "train.samples", "train.checkpoint_every_minutes", "train.keep_every_epochs",
    "train.progress", "train.num_threads", "train.max_steps_per_epoch", "train.channels_last",
    "train.compile", "train.fused_adam",
}


class TrainingInterrupted(MrsynthError):
    """Ctrl-C or SIGTERM: the latest state was saved; ``--resume`` continues."""

    exit_code = 130


class TrainingDiverged(MrsynthError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but this torch has no usable CUDA GPU "
            f"(torch {torch.__version__}). Use --device cpu or auto, or install a CUDA build."
        )
    return torch.device(name)


def lr_factor(epoch: int, epochs: int, decay_start: int | None) -> float:
    """Learning-rate multiplier for 1-based ``epoch``: 1 until ``decay_start``, then linear to
    0 (reached just after the last epoch), as in the study (decay from epoch 101 of 200)."""
    if decay_start is None or epoch < decay_start:
        return 1.0
    return max(0.0, (epochs - epoch + 1) / (epochs - decay_start + 2))


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":  # this device's stream only: the run may resume on another node
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per visible GPU
            idx = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[idx] if idx < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: stop now, without saving
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        raise RunError(
            f"{run_dir} is not an mrsynth run directory (no {CONFIG_JSON}). Give the --out "
            "directory of a `mrsynth train` run."
        )
    try:
        doc = json.loads(path.read_text())
        doc["config"]["model"]  # noqa: B018 - validates the layout
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"Cannot read {path}: {exc}. The run directory is damaged.") from exc
    return doc


def _merge_resume_config(stored: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    if given is None:
        return copy.deepcopy(stored)
    a, b = flatten(stored), flatten(given)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    bad = [k for k in changed if k not in RESUMABLE_KEYS and k != "preset"]
    if bad:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in bad)
        raise ConfigError(
            f"Cannot resume with different settings ({detail}). Only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change on --resume; start a new run "
            "directory for other changes."
        )
    merged = copy.deepcopy(stored)
    for k in changed:
        if k in RESUMABLE_KEYS:
            node = merged
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = b[k]
    return validate_config(merged)


def train(
    config: dict[str, Any] | None,
    data_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    *,
    overwrite: bool = False,
    console: Console | None = None,
) -> Path:
    """Train a model and return the run directory.

    ``config`` is a resolved config (may be None with ``resume``: the stored one is used);
    ``data_path`` a prepared-slice file (None with ``resume``: the stored path). Raises
    :class:`TrainingInterrupted` after saving on Ctrl-C/SIGTERM and :class:`TrainingDiverged`
    on a non-finite loss. Launched by ``torchrun``, every rank calls this; they join one
    process group (left again at the end) and train data-parallel.
    """
    out = Path(out_dir)
    stored: dict[str, Any] | None = None
    if resume:
        stored = read_run_config(out)
        stored["config"] = upgrade_config(stored["config"])
        config = _merge_resume_config(stored["config"], config)
        if data_path is None:
            data_path = stored["data"]["path"]
    else:
        if config is None or data_path is None:
            raise ConfigError("train() needs a config and a data path unless resuming.")
        config = validate_config(copy.deepcopy(config))
    assert data_path is not None and config is not None
    own_group = not dd.initialized()
    info, device = dd.init(resolve_device(config["device"]))
    finished = False
    try:
        if not resume:
            _check_out_dir(out, overwrite)
        run = _Trainer(config, Path(data_path), out, stored, console, overwrite,
                       info=info, device=device).run()
        finished = True
        return run
    finally:
        if own_group:
            dd.shutdown(wait=finished)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to start over an existing run (or a foreign non-empty directory)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a directory for the run.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / CONFIG_JSON).is_file():
            raise OutputExistsError(
                f"Output directory {out} exists, is not empty and is not an mrsynth run. "
                "Choose another --out directory."
            )
        if not overwrite:
            raise OutputExistsError(
                f"Run directory {out} already holds a run. Pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out directory."
            )


class _Trainer:
    def __init__(
        self,
        config: dict[str, Any],
        data_path: Path,
        out: Path,
        stored: dict[str, Any] | None,
        console: Console | None,
        overwrite: bool = False,
        *,
        info: dd.DistInfo = dd.SINGLE,
        device: torch.device | None = None,
    ) -> None:
        self.overwrite = overwrite
        self.dist = info
        self.cfg = config
        self.data_path = data_path
        self.out = out
        self.stored = stored
        # Only rank 0 prints; the others stay quiet (their logs would repeat rank 0's).
        self.console = (console or Console(stderr=True)) if info.is_main else Console(
            stderr=True, quiet=True)
        self.tcfg = config["train"]
        self.contrasts = (config["data"]["contrasts"][0], config["data"]["contrasts"][1])
        self.device = device if device is not None else resolve_device(config["device"])
        self.precision = config["precision"]
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU.")
        if (self.precision == "bf16" and self.device.type == "cuda"
                and not fast.native_bf16(self.device)):
            raise ConfigError(
                f"--precision bf16: the GPU {torch.cuda.get_device_name(self.device)} has no "
                "native bfloat16 support (it needs compute capability 8.0 or newer); use fp32 "
                "(fp16 is possible but unstable for GANs)."
            )
        self.ckpt_root = out / "checkpoints"

    # ------------------------------------------------------------------ set-up
    def _setup_torch(self) -> None:
        self._old_threads = torch.get_num_threads()
        self._old_det = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        if self.tcfg["num_threads"]:
            torch.set_num_threads(int(self.tcfg["num_threads"]))
        if self.tcfg["deterministic"]:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only: some CUDA backward kernels have no deterministic version (the
            # reflection padding of the ResNet generators); they warn instead of stopping the run
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not self.tcfg["deterministic"]
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _restore_torch(self) -> None:
        torch.set_num_threads(self._old_threads)
        torch.use_deterministic_algorithms(self._old_det[0], warn_only=self._old_det[1])

    def _seed(self) -> None:
        seed = int(self.cfg["seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ main
    def run(self) -> Path:
        self._setup_torch()
        stop = _StopFlag()
        try:
            self._seed()
            return self._run(stop)
        finally:
            stop.restore()
            self._restore_torch()

    def _run(self, stop: _StopFlag) -> Path:
        cfg, t = self.cfg, self.tcfg
        cls = get_model_class(cfg["model"])
        data = load_prepared(self.data_path)
        if self.stored is not None:
            self._check_same_data(data.settings)
        options = fast.FastOptions.from_config(cfg, self.device)
        dd.local_batch_size(int(t["batch_size"]), self.dist.world_size)  # splits evenly?
        slices = load_training_slices(
            data, self.contrasts, cls.name, cls.needs_paired, cfg["data"]["image_size"],
            self.device, options.channels_last, int(t["samples"]),
        )
        if self.stored is None:  # data and options are fine: now (re)create the run dir
            _check_out_dir(self.out, self.overwrite)
            dd.barrier()  # every rank has checked before rank 0 changes anything
            if self.dist.is_main:
                if self.out.is_dir() and any(self.out.iterdir()):
                    shutil.rmtree(self.out)
                self.out.mkdir(parents=True, exist_ok=True)
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        setup = fast.setup_training(build_model(cfg), self.device, options,
                                    distributed=self.dist.distributed, scaler=scaler)
        model: TranslationModel = setup.model  # type: ignore[assignment]
        optimizers = setup.optimizers
        epochs, decay = int(t["epochs"]), decay_start(t)
        schedulers = {
            n: torch.optim.lr_scheduler.LambdaLR(
                o, lambda k, e=epochs, d=decay: lr_factor(k + 1, e, d)
            )
            for n, o in optimizers.items()
        }
        # The sampler draws the global batch with the run's seed on every rank; each rank
        # trains on its share (distributed.shard_batch).
        sampler = EpochSampler(
            slices.A.shape[0], slices.B.shape[0], slices.paired, int(t["batch_size"]),
            int(cfg["seed"]), t["max_steps_per_epoch"],
        )

        epoch_done, step_in_epoch, iteration, epoch_elapsed = 0, 0, 0, 0.0
        if self.dist.is_main:
            ckpt.clean_stale(self.ckpt_root)
        has_ckpt = self.stored is not None and self._has_checkpoint()
        if self.stored is not None and not has_ckpt:
            self.console.print(f"Run {self.out} has no checkpoint yet: starting it from the "
                               "beginning with its stored settings.")
        if has_ckpt:
            epoch_done, step_in_epoch, iteration, epoch_elapsed = self._restore(
                model, optimizers, schedulers, scaler, sampler
            )
            # The schedule may have changed (more epochs): set this epoch's rate from it,
            # with the same arithmetic LambdaLR uses (so an unchanged schedule is bit-exact).
            for s in schedulers.values():
                for group, base in zip(s.optimizer.param_groups, s.base_lrs, strict=True):
                    group["lr"] = base * lr_factor(epoch_done + 1, epochs, decay)
            # the checkpoint's optimiser settings include the implementation: use this run's
            fast.set_adam_implementation(optimizers, self.device, options.fused_adam)
        if self.dist.distributed and self.dist.rank > 0:
            # dropout and latent noise: a stream of its own per rank (rank 0 keeps the run's)
            torch.manual_seed(dd.rank_seed(int(cfg["seed"]) + iteration, self.dist.rank))
        self.setup = setup
        keep = None if self.stored is None else epoch_done
        metrics: Metrics | _Silent
        losses_log: LossLog | _Silent
        if self.dist.is_main:
            self._write_config(data, slices, resumed_at=epoch_done if self.stored else None)
            losses_log = LossLog(self.out,
                                 keep_upto_iteration=None if keep is None else iteration)
            metrics = Metrics(self.out, self._metrics_header(slices, sampler),
                              keep_upto_epoch=keep)
        else:
            losses_log, metrics = _Silent(), _Silent()
        if epoch_done >= epochs:
            self.console.print(f"Run {self.out} already completed {epoch_done} epochs.")
            metrics.save("completed")
            losses_log.close()
            return self.out

        # DDP last: it broadcasts rank 0's (restored) weights and routes the model's network
        # calls through one DDP module per optimiser.
        wrapping = (dd.wrap_model(model, optimizers, self.device) if self.dist.distributed
                    else None)
        self.model, self.optimizers, self.schedulers = model, optimizers, schedulers
        self.scaler, self.sampler, self.slices = scaler, sampler, slices
        self.metrics, self.log = metrics, losses_log
        progress = EpochProgress(self.console, bool(t["progress"]) and self.dist.is_main)
        stepper = fast.TrainStepper(setup, slices.A, slices.B)
        stop.install()
        try:
            self._loop(stepper, sampler, losses_log, metrics, progress, stop,
                       epoch_done, step_in_epoch, iteration, epoch_elapsed)
        finally:
            progress.stop()
            losses_log.close()
            if wrapping is not None:
                wrapping.unwrap()
        return self.out

    def _loop(
        self, stepper: fast.TrainStepper, sampler: EpochSampler, log: LossLog | _Silent,
        metrics: Metrics | _Silent, progress: EpochProgress, stop: _StopFlag,
        epoch_done: int, step0: int, iteration: int, elapsed0: float,
    ) -> None:
        t = self.tcfg
        epochs, log_every = int(t["epochs"]), int(t["log_every"])
        every_s = (t["checkpoint_every_minutes"] or 0) * 60.0
        batch = int(t["batch_size"])  # the global batch
        rank, world, distributed = self.dist.rank, self.dist.world_size, self.dist.distributed
        last_ckpt = time.monotonic()
        for epoch in range(epoch_done + 1, epochs + 1):
            sampler_state = sampler.get_state()
            ia, ib = sampler.draw()
            ia = dd.shard_batch(ia, rank, world).to(self.device)
            ib = dd.shard_batch(ib, rank, world).to(self.device)
            steps = sampler.steps
            start = step0 if epoch == epoch_done + 1 else 0
            elapsed_before = elapsed0 if epoch == epoch_done + 1 else 0.0
            progress.start(epoch, epochs, steps, start)
            epoch_sum: dict[str, float] = {}
            n_acc = n_epoch = 0
            t_epoch = t_log = time.perf_counter()
            lr = self._lr()
            for s in range(start, steps):
                stepper.step(ia[s], ib[s])
                n_acc += 1
                iteration += 1
                progress.advance()
                last = s + 1 == steps
                if n_acc == log_every or last:
                    means = self._flush_interval(stepper.losses, epoch, iteration)
                    now = time.perf_counter()  # after the flush's device sync: real time
                    ips = n_acc * batch / max(now - t_log, 1e-9)
                    log.log(epoch, iteration, ips, lr, means)
                    progress.show(ips, means)
                    for k, v in means.items():
                        epoch_sum[k] = epoch_sum.get(k, 0.0) + v * n_acc
                    n_epoch += n_acc
                    n_acc, t_log = 0, now
                if last:
                    break
                if distributed:
                    # Decide together, where all ranks are at the same step (after a log
                    # interval): a rank that stopped alone would leave the others waiting.
                    if n_acc:
                        continue
                    stopping, timed = dd.any_rank(
                        stop.signum is not None,
                        every_s > 0 and time.monotonic() - last_ckpt >= every_s,
                        device=self.device)
                else:
                    stopping = stop.signum is not None
                    timed = every_s > 0 and time.monotonic() - last_ckpt >= every_s
                if stopping or timed:
                    if n_acc:  # make sure nothing non-finite goes into a checkpoint
                        self._check_finite(stepper.losses, epoch, iteration)
                    wall = elapsed_before + time.perf_counter() - t_epoch
                    self._save("latest", epoch - 1, s + 1, iteration, wall, sampler_state)
                    log.flush()
                    last_ckpt = time.monotonic()
                    if stopping:
                        progress.stop()
                        metrics.save("interrupted")
                        signum = stop.signum or signal.SIGTERM
                        name = signal.Signals(signum).name
                        raise TrainingInterrupted(
                            f"{name} received: training stopped at epoch {epoch}, iteration "
                            f"{iteration}; the state was saved in {self.ckpt_root / 'latest'}. "
                            f"Continue with `mrsynth train --out {self.out} --resume`.",
                            exit_code=128 + signum,
                        )
            # ---- end of epoch
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = elapsed_before + time.perf_counter() - t_epoch
            progress.stop()
            done_steps = steps - start
            means = {k: v / max(n_epoch, 1) for k, v in epoch_sum.items()}
            lrs = {n: o.param_groups[0]["lr"] for n, o in self.optimizers.items()}
            for s_ in self.schedulers.values():
                s_.step()
            if self.dist.is_main:
                self._save_samples(epoch)
            ips = done_steps * batch / max(wall - elapsed_before, 1e-9)
            metrics.add_epoch({
                "epoch": epoch,
                "wall_s": round(wall, 4),
                "steps": steps,
                "images": steps * batch,
                "images_per_s": round(ips, 3),
                "lr": lrs,
                "losses": {k: round(v, 6) for k, v in means.items()},
                "resumed_mid_epoch": start > 0,
            })
            # Logs first, then the checkpoint: a crash in between leaves logs ahead of the
            # checkpoint, and resume trims them back to it.
            metrics.save("running")
            log.flush()
            self._save("latest", epoch, 0, iteration, 0.0, sampler.get_state())
            last_ckpt = time.monotonic()
            keep = int(t["keep_every_epochs"] or 0)
            if keep and epoch % keep == 0 and self.dist.is_main:
                ckpt.copy_checkpoint(self.ckpt_root, "latest", f"epoch_{epoch:04d}")
            if epoch == epochs:
                metrics.save("completed")
            loss_txt = "  ".join(f"{k} {v:.4g}" for k, v in means.items())
            self.console.print(
                f"epoch {epoch}/{epochs}  {wall:.1f} s  {ips:.1f} img/s  {loss_txt}",
                highlight=False,
            )
            (stopping,) = dd.any_rank(stop.signum is not None, device=self.device)
            if stopping and epoch < epochs:
                signum = stop.signum or signal.SIGTERM
                name = signal.Signals(signum).name
                metrics.save("interrupted")
                raise TrainingInterrupted(
                    f"{name} received: training stopped after epoch {epoch}; the state was saved "
                    f"in {self.ckpt_root / 'latest'}. Continue with "
                    f"`mrsynth train --out {self.out} --resume`.",
                    exit_code=128 + signum,
                )

    # ------------------------------------------------------------------ helpers
    def _lr(self) -> float:
        return float(next(iter(self.optimizers.values())).param_groups[0]["lr"])

    def _flush_interval(self, acc: fast.LossAccumulator, epoch: int,
                        iteration: int) -> dict[str, float]:
        """One device sync per interval: means of the losses (averaged over ranks: every rank
        gets the same numbers, so all stop together on a non-finite one)."""
        means = acc.means(reduce=dd.all_mean)
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            self._diverged(_loss_problem(bad), epoch, iteration)
        return means

    def _check_finite(self, acc: fast.LossAccumulator, epoch: int, iteration: int) -> None:
        bad = {k: v for k, v in acc.means(reset=False).items() if not math.isfinite(v)}
        if bad:
            self._diverged(_loss_problem(bad), epoch, iteration)

    def _check_weights(self, epoch: int, iteration: int) -> None:
        """Refuse to checkpoint non-finite weights: a step can break the weights while its
        own loss (computed before the update) is still finite. One device sync per save."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if torch.stack([torch.isfinite(p).all() for p in params]).all().item():
            return
        names = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self._diverged(f"non-finite weights ({shown})", epoch, iteration)

    def _diverged(self, problem: str, epoch: int, iteration: int) -> None:
        try:
            good = ckpt.read_meta(ckpt.find_checkpoint(self.out))
            kept = (f"The last good checkpoint (epoch {good['epoch']}, iteration "
                    f"{good['iteration']}) is kept in {self.ckpt_root / 'latest'}.")
        except RunError:
            kept = "No checkpoint had been written yet."
        self.metrics.save("diverged")
        self.log.flush()
        raise TrainingDiverged(
            f"Training stopped at epoch {epoch}, iteration {iteration}: {problem}. {kept} "
            "Lower the learning rate (--set optim.lr=...), use "
            "--precision fp32 if you used fp16/bf16, check the prepared data, then start again "
            "or --resume from the checkpoint."
        )

    def _save(self, name: str, epoch: int, step_in_epoch: int, iteration: int,
              epoch_elapsed: float, sampler_state: torch.Tensor) -> Path | None:
        """Write a checkpoint (rank 0 only: the ranks hold the same weights). Image pools
        and RNG states are rank 0's; every rank resumes from them."""
        self._check_weights(epoch, iteration)  # on every rank, so all stop together
        if not self.dist.is_main:
            return None
        state = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "iteration": iteration,
            "epoch_elapsed_s": epoch_elapsed,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "aux": self.model.aux_state_dict(),
            "rng": _rng_state(self.device),
            "sampler": sampler_state,
        }
        meta = {
            "model": self.cfg["model"],
            "contrasts": list(self.contrasts),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "iteration": iteration,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return ckpt.save_checkpoint(self.ckpt_root, name, self.model, state, meta)

    def _has_checkpoint(self) -> bool:
        try:
            ckpt.find_checkpoint(self.out)
        except RunError:
            return False
        return True

    def _restore(self, model: TranslationModel, optimizers: dict[str, torch.optim.Optimizer],
                 schedulers: dict[str, Any], scaler: Any, sampler: EpochSampler
                 ) -> tuple[int, int, int, float]:
        path = ckpt.find_checkpoint(self.out)
        tensors, meta = ckpt.load_weights(path, self.device)
        ckpt.check_identity(path, meta, self.cfg["model"], self.contrasts)
        ckpt.load_model_weights(model, tensors, path)
        state = ckpt.load_state(path)
        try:
            for n, o in optimizers.items():
                o.load_state_dict(state["optimizers"][n])
            for n, s in schedulers.items():
                s.load_state_dict(state["schedulers"][n])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            model.load_aux_state_dict(state["aux"], self.device)
            _set_rng_state(state["rng"], self.device)
            sampler.set_state(state["sampler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise RunError(
                f"The training state in {path} does not fit this run ({exc}); it was written "
                "by another model or mrsynth version. Start a new run."
            ) from exc
        self.console.print(
            f"Resuming {self.cfg['model']} from {path.name}: epoch {state['epoch']} done, "
            f"step {state['step_in_epoch']} of the next, iteration {state['iteration']}.",
            highlight=False,
        )
        return (int(state["epoch"]), int(state["step_in_epoch"]), int(state["iteration"]),
                float(state.get("epoch_elapsed_s", 0.0)))

    def _check_same_data(self, settings: dict[str, Any]) -> None:
        assert self.stored is not None
        old = self.stored["data"].get("settings", {})
        keys = ("size", "normalisation", "orientation", "contrasts")
        diff = [k for k in keys if old.get(k) != settings.get(k)]
        if diff:
            raise ConfigError(
                f"The prepared file {self.data_path} differs from the one the run started with "
                f"({', '.join(diff)} changed). Resume with the original data "
                f"({self.stored['data']['path']})."
            )

    @torch.no_grad()
    def _save_samples(self, epoch: int) -> None:
        sl, model = self.slices, self.model
        if sl.sample_A.shape[0] == 0:
            return
        was_training = model.training
        model.eval()
        try:
            with fast.eager():  # no compilation for this one-off shape and mode
                fb = model.generator("A2B")(sl.sample_A).float().cpu().numpy()[:, 0]
                fa = model.generator("B2A")(sl.sample_B).float().cpu().numpy()[:, 0]
        finally:
            model.train(was_training)
        ra = sl.sample_A.float().cpu().numpy()[:, 0]
        rb = sl.sample_B.float().cpu().numpy()[:, 0]
        rows = [(ra[i], fb[i], rb[i], fa[i]) for i in range(ra.shape[0])]
        save_sample_grid(
            self.out / SAMPLES_DIR / f"epoch_{epoch:04d}.png", rows, self.contrasts,
            f"{self.cfg['model']}  epoch {epoch}",
        )

    def _metrics_header(self, slices: TrainingSlices, sampler: EpochSampler) -> dict[str, Any]:
        return {
            "model": self.cfg["model"],
            "contrasts": list(self.contrasts),
            "device": str(self.device),
            "precision": self.precision,
            "epochs_planned": int(self.tcfg["epochs"]),
            "steps_per_epoch": sampler.steps,
            "batch_size": int(self.tcfg["batch_size"]),
            "image_size": list(slices.size),
            **self._parallel_info(),
        }

    def _parallel_info(self) -> dict[str, Any]:
        """How the run was executed: ranks, per-rank batch, speed options actually used."""
        setup = self.setup
        return {
            "world_size": self.dist.world_size,
            "per_rank_batch": int(self.tcfg["batch_size"]) // self.dist.world_size,
            "backend": self.dist.backend,
            "compile": setup.compile_report.mode,
            "compile_note": setup.compile_report.reason,
            "channels_last": setup.options.channels_last,
            "adam": setup.adam,
        }

    def _write_config(self, data: Any, slices: TrainingSlices, resumed_at: int | None) -> None:
        env = environment_info()
        device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                       else "cpu")
        event = {"event": "resume" if resumed_at is not None else "start",
                 "time_utc": env["time_utc"], "device": str(self.device),
                 "device_name": device_name, "precision": self.precision,
                 "argv": env["argv"], "git_commit": env["git_commit"],
                 **self._parallel_info()}
        if resumed_at is not None:
            assert self.stored is not None
            doc = copy.deepcopy(self.stored)
            doc["config"] = self.cfg
            event["epoch"] = resumed_at
            doc.setdefault("history", []).append(event)
        else:
            doc = {
                "mrsynth_run": RUN_FORMAT,
                "model": self.cfg["model"],
                "contrasts": list(self.contrasts),
                "config": self.cfg,
                "data": {
                    "path": str(self.data_path.resolve()),
                    "settings": data.settings,
                    "compatibility": data.compatibility(),
                    **slices.info,
                },
                "device": str(self.device),
                "device_name": device_name,
                "git_commit": env["git_commit"],
                "environment": env,
                "history": [event],
            }
        atomic_write_json(self.out / CONFIG_JSON, doc)


class _Silent:
    """Stands in for the loss log and metrics on ranks other than 0: they write nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _loss_problem(bad: dict[str, float]) -> str:
    return "non-finite loss (" + ", ".join(f"{k}={v}" for k, v in bad.items()) + ")"
