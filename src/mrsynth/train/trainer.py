"""The one training loop for every model.

``train(config, data_path, out_dir, resume=False)`` trains the model named in a resolved
config (:func:`mrsynth.train.config.resolve_config`) on a prepared-slice file and writes a run
directory::

    RUN_DIR/config.json    resolved config, data path and settings, environment, git commit
    RUN_DIR/metrics.json   per-epoch wall time, losses, images/s; mean s/epoch; status
    RUN_DIR/losses.csv     losses every ``train.log_every`` iterations
    RUN_DIR/samples/       epoch_0001.png ... : fixed slices, both directions
    RUN_DIR/checkpoints/   latest/ (every epoch and every N minutes), epoch_XXXX/ (every K),
                           best/ (the epoch with the best validation score, when validated)
    RUN_DIR/tensorboard/   scalars, only when the optional tensorboard package is installed

The loop is generic: models supply networks, optimisers and a step (:mod:`mrsynth.models`).
Each iteration reads *step -> log -> maybe save*; the pieces live beside this file:
:mod:`~mrsynth.train.step` (batch gather, the step, loss accumulation without host syncs),
:mod:`~mrsynth.train.speed` (device, channels_last, Adam kernels, ``torch.compile``),
:mod:`~mrsynth.train.resume` (resumed config, training state), :mod:`~mrsynth.train.rundir`
(config.json), :mod:`~mrsynth.train.logging` (losses.csv, metrics.json, samples),
:mod:`~mrsynth.train.signals` (Ctrl-C / SIGTERM). Under ``torchrun`` the loop runs
data-parallel with :mod:`mrsynth.train.distributed` (``train.batch_size`` is the global batch,
rank 0 writes).

With ``train.patch_size`` the networks learn from random crops of the full-resolution slices
(mostly centred on brain, :mod:`mrsynth.data.patches`; paired models crop the same window of
source and target). When the prepared file has a validation split, a fixed handful of its
slices is translated after every epoch and scored (in-brain MAE and SSIM, both directions,
:mod:`mrsynth.eval.validation`) into ``metrics.json``, beside the baselines on the same slices;
the epoch with the lowest score is copied to ``checkpoints/best`` (``--checkpoint best``).

Resuming restores weights, optimisers, schedulers, grad scaler, image pools, every RNG state
(the patch sampler's too), the position inside the epoch and the loss accumulators, so on CPU
with a fixed seed an interrupted and resumed run ends with the same weights and logs as an
uninterrupted one. A data-parallel run may be resumed with another number of ranks (the
global batch, hence the steps, stay the same).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from mrsynth.data.context import context_slices
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError, MrsynthError, RunError
from mrsynth.models.base import TranslationModel, build_model, get_model_class
from mrsynth.train import checkpoint as ckpt
from mrsynth.train import distributed as dd
from mrsynth.train.config import decay_start, validate_config
from mrsynth.train.dataset import (
    EpochDraws,
    EpochSampler,
    augmenter,
    load_training_slices,
    patch_sampler,
    resample,
    training_bytes,
)
from mrsynth.train.ema import WeightAverage
from mrsynth.train.loader import StepBatches, decide_on_device, default_workers, step_loader
from mrsynth.train.logging import SAMPLES_DIR, EpochProgress, LossLog, Metrics, save_sample_grid
from mrsynth.train.resume import (
    Position,
    TrainingParts,
    restore_training_state,
    resume_config,
    training_state,
)
from mrsynth.train.rundir import (
    CONFIG_JSON,
    check_out_dir,
    make_fresh,
    preparation_differences,
    read_run_config,
    write_run_config,
)
from mrsynth.train.signals import StopFlag, TrainingInterrupted
from mrsynth.train.speed import (
    FastOptions,
    eager,
    native_bf16,
    resolve_device,
    use_adam_options,
)
from mrsynth.train.step import TrainStepper, setup_training

__all__ = ["CONFIG_JSON", "TrainingDiverged", "TrainingInterrupted", "lr_factor",
           "read_run_config", "train"]

#: Preparation settings a resumed run's data must share with the data it started with.
RESUME_DATA_KEYS = ("size", "normalisation", "orientation", "plane", "contrasts")


class TrainingDiverged(MrsynthError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


def lr_factor(epoch: int, epochs: int, decay_start: int | None) -> float:
    """Learning-rate multiplier for 1-based ``epoch``: 1 until ``decay_start``, then linear to
    0 (reached just after the last epoch), as in the study (decay from epoch 101 of 200)."""
    if decay_start is None or epoch < decay_start:
        return 1.0
    return max(0.0, (epochs - epoch + 1) / (epochs - decay_start + 2))


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
        stored, config = resume_config(out, config)
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
    trainer: Trainer | None = None
    try:
        if not resume:
            check_out_dir(out, overwrite)
        with torch_settings(config["train"], device):
            seed_everything(int(config["seed"]))
            trainer = Trainer(config, Path(data_path), out, stored, console, overwrite,
                              info=info, device=device)
            run = trainer.run()
        finished = True
        return run
    finally:
        trainer = None  # noqa: F841 - the DDP model and its pending gloo work go first
        if own_group:
            if info.distributed:
                import gc

                gc.collect()  # ... while the process group they belong to still exists
            dd.shutdown(wait=finished)


@contextlib.contextmanager
def torch_settings(tcfg: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Threads and determinism for the run (restored afterwards), TF32 and cuDNN autotuning."""
    old_threads = torch.get_num_threads()
    old_det = (torch.are_deterministic_algorithms_enabled(),
               torch.is_deterministic_algorithms_warn_only_enabled())
    if tcfg["num_threads"]:
        torch.set_num_threads(int(tcfg["num_threads"]))
    if tcfg["deterministic"]:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some CUDA backward kernels have no deterministic version (the
        # reflection padding of the ResNet generators); they warn instead of stopping the run
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not tcfg["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det[0], warn_only=old_det[1])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochTally:
    """Loss sums of the epoch so far, weighted by the steps of each logged interval."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0) -> None:
        self.sums: dict[str, float] = dict(sums or {})
        self.count = count

    def add(self, means: dict[str, float], n: int) -> None:
        for k, v in means.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class Trainer:
    """One run: everything is built (or restored) in ``__init__``; :meth:`run` trains."""

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
        cfg = self.cfg = config
        t = self.tcfg = config["train"]
        self.data_path, self.out, self.stored = data_path, out, stored
        self.resuming = stored is not None
        self.dist = info
        self.is_main = info.is_main
        # Only rank 0 prints; the others stay quiet (their logs would repeat rank 0's).
        self.console = (console or Console(stderr=True)) if self.is_main else Console(
            stderr=True, quiet=True)
        self.contrasts = (cfg["data"]["contrasts"][0], cfg["data"]["contrasts"][1])
        self.device = device if device is not None else resolve_device(cfg["device"])
        self.precision = cfg["precision"]
        self._check_precision()
        self.ckpt_root = out / "checkpoints"
        self.epochs, self.batch = int(t["epochs"]), int(t["batch_size"])  # the global batch
        self.log_every = int(t["log_every"])
        self.checkpoint_every_s = (t["checkpoint_every_minutes"] or 0) * 60.0
        self.stop = StopFlag()

        # ---- data and model
        cls = get_model_class(cfg["model"])
        data = load_prepared(data_path)
        if self.resuming:
            self._check_same_data(data.settings)
        options = FastOptions.from_config(cfg, self.device)
        dd.local_batch_size(self.batch, info.world_size)  # splits evenly?
        # resident slices, or batches streamed from the store (train.data_on_device)
        self.on_device = decide_on_device(
            t["data_on_device"],
            training_bytes(data, self.contrasts, cls.name, cls.needs_paired,
                           cfg["data"]["image_size"]), self.device)
        self.loader_workers = (default_workers(self.device) if t["loader_workers"] is None
                               else int(t["loader_workers"]))
        self.slices = load_training_slices(
            data, self.contrasts, cls.name, cls.needs_paired, cfg["data"]["image_size"],
            self.device, options.channels_last, int(t["samples"]),
            context=context_slices(cfg), on_device=self.on_device,
        )
        if not self.resuming:  # data and options are fine: now (re)create the run dir
            check_out_dir(out, overwrite)
            dd.barrier()  # every rank has checked before rank 0 changes anything
            if self.is_main:
                make_fresh(out)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.setup = setup_training(build_model(cfg), self.device, options,
                                    distributed=info.distributed, scaler=self.scaler)
        self.model: TranslationModel = self.setup.model  # type: ignore[assignment]
        self.optimizers = self.setup.optimizers
        #: the weights' moving average (train.ema; None when off), what the run publishes
        self.ema = (WeightAverage(self.model, float(t["ema"])) if float(t["ema"]) > 0
                    else None)
        decay = decay_start(t)
        self.schedulers = {
            n: torch.optim.lr_scheduler.LambdaLR(
                o, lambda k, e=self.epochs, d=decay: lr_factor(k + 1, e, d)
            )
            for n, o in self.optimizers.items()
        }
        # The sampler draws the global batch (and its patch windows) with the run's seed on
        # every rank; each rank trains on its share (distributed.shard_batch).
        self.sampler = EpochDraws(
            EpochSampler(self.slices.n_A, self.slices.n_B, self.slices.paired,
                         self.batch, int(cfg["seed"]), t["max_steps_per_epoch"]),
            patch_sampler(self.slices, t["patch_size"], t["patch_brain_fraction"],
                          int(cfg["seed"])),
            augmenter(t, int(cfg["seed"])),
        )
        self.patch = None if self.sampler.patches is None else self.sampler.patches.patch
        tables = (None if self.slices.table_A is None or self.slices.table_B is None
                  else (self.slices.table_A, self.slices.table_B))  # 2.5-D
        aug = self.sampler.augment
        self.stepper = TrainStepper(self.setup, self.slices.A, self.slices.B, self.patch,
                                    tables, augment=(False, False) if aug is None
                                    else aug.switches)
        # the validation slices and the baselines on them (rank 0 scores, the others wait)
        self.val = self.val_info = None
        if self.is_main:
            from mrsynth.eval.validation import baseline_scores, pick_validation_slices

            self.val = pick_validation_slices(data, self.contrasts, int(t["val_slices"]),
                                              context_slices(cfg))
            if self.val is not None:
                self.val_info = {**self.val.info(), "baselines": baseline_scores(data, self.val),
                                 "score": "mean in-brain MAE of both directions (lower is "
                                          "better)", "best_epoch": None, "best_score": None}

        # ---- where to start: the beginning, or the checkpoint
        self.pos = Position()
        self.tally = EpochTally()
        if self.is_main:
            ckpt.clean_stale(self.ckpt_root)
        if self.resuming:
            self._restore(decay)
        if info.distributed and info.rank > 0:
            # dropout and latent noise: a stream of its own per rank (rank 0 keeps the run's)
            torch.manual_seed(dd.rank_seed(int(cfg["seed"]) + self.pos.iteration, info.rank))

        # ---- run directory files (rank 0 writes)
        if self.is_main:
            write_run_config(
                out, cfg, stored=stored, resumed_at=self.pos.epoch, device=self.device,
                data={"path": str(data_path.resolve()), "settings": data.settings,
                      "compatibility": data.compatibility(), **self.slices.info},
                execution=self._execution_info(),
            )
        self.log = LossLog(out, self.pos.iteration if self.resuming else None,
                           enabled=self.is_main)
        self.metrics = Metrics(out, self._metrics_header(),
                               self.pos.epoch if self.resuming else None, enabled=self.is_main)
        self.progress = EpochProgress(self.console, bool(t["progress"]) and self.is_main)
        self.last_checkpoint = time.monotonic()
        if self.val_info is not None and self.resuming:
            self._keep_best(self._update_best())

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        if self.pos.epoch >= self.epochs:
            self.console.print(f"Run {self.out} already completed {self.pos.epoch} epochs.")
            self.metrics.save("completed")
            self.log.close()
            return self.out
        # DDP last: it broadcasts rank 0's (restored) weights and routes the model's network
        # calls through one DDP module per optimiser.
        wrapping = (dd.wrap_model(self.model, self.optimizers, self.device)
                    if self.dist.distributed else None)
        self.stop.install()
        try:
            for epoch in range(self.pos.epoch + 1, self.epochs + 1):
                self._train_epoch(epoch)
        finally:
            self.stop.restore()
            self.progress.stop()
            self.log.close()
            if wrapping is not None:
                wrapping.unwrap()
        return self.out

    def _train_epoch(self, epoch: int) -> None:
        pos, steps = self.pos, self.sampler.steps
        sampler_state = self.sampler.get_state()
        ia, ib, wa, wb, aug = self.sampler.draw()
        ia, ib = self._shard(ia), self._shard(ib)
        if wa is not None and wb is not None:
            wa, wb = self._shard(wa), self._shard(wb)
        if aug is not None:
            aug = self._shard(aug)
        start, elapsed_before = pos.step, pos.elapsed  # 0, 0.0 unless resumed mid-epoch
        self.progress.start(epoch, self.epochs, steps, start)
        t_epoch = t_log = time.perf_counter()
        lr = self._lr()
        batches = None if self.on_device else iter(step_loader(
            StepBatches(self.slices, self.contrasts, ia, ib, wa, wb, self.patch,
                        next_slice=self.model.wants_next_slice), start,
            self.loader_workers, self.device))
        for s in range(start, steps):
            params = None if aug is None else aug[s]
            if batches is None:
                self.stepper.step(ia[s], ib[s], None if wa is None else wa[s],
                                  None if wb is None else wb[s], params)
            else:
                self.stepper.step_batch(next(batches), params)
            pos.step, pos.iteration = s + 1, pos.iteration + 1
            if self.ema is not None:
                self.ema.update(pos.iteration)
            self.progress.advance()
            if self.stepper.losses.count >= self.log_every or pos.step == steps:
                t_log = self._log_interval(epoch, lr, t_log)
            if pos.step < steps:
                pos.elapsed = elapsed_before + time.perf_counter() - t_epoch
                stop, save = self._decide(end_of_epoch=False)
                if save:
                    self._checkpoint(sampler_state)
                if stop:
                    self._interrupt()
        self._end_epoch(epoch, steps - start, elapsed_before + time.perf_counter() - t_epoch,
                        elapsed_before)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of an epoch's rows (steps, batch), windows (steps, batch, 2) or
        augmentation (steps, batch, 3), on the device."""
        r, w = self.dist.rank, self.dist.world_size
        if x.ndim == 3:
            x = torch.stack([dd.shard_batch(x[..., k], r, w) for k in range(x.shape[-1])], -1)
        else:
            x = dd.shard_batch(x, r, w)
        return x.to(self.device)

    def _log_interval(self, epoch: int, lr: float, t_log: float) -> float:
        """Write one losses.csv row: the mean of the interval's losses (one device sync)."""
        n = self.stepper.losses.count
        means = self._flush_interval(epoch)
        now = time.perf_counter()  # after the flush's device sync: real time
        ips = n * self.batch / max(now - t_log, 1e-9)
        self.log.log(epoch, self.pos.iteration, ips, lr, means)
        self.progress.show(ips, means)
        self.tally.add(means, n)
        return now

    def _decide(self, *, end_of_epoch: bool) -> tuple[bool, bool]:
        """(stop now, checkpoint now): the one place that decides both.

        At the end of an epoch the checkpoint is always written. Within an epoch, on a signal
        or when ``train.checkpoint_every_minutes`` have passed. Data-parallel ranks decide
        together, where all are at the same step (after a log interval): a rank that stopped
        alone would leave the others waiting.
        """
        timed = (self.checkpoint_every_s > 0
                 and time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s)
        if end_of_epoch:
            (stop,) = dd.any_rank(self.stop.requested, device=self.device)
            return stop, True
        if self.dist.distributed:
            if self.stepper.losses.count:
                return False, False
            stop, timed = dd.any_rank(self.stop.requested, timed, device=self.device)
        else:
            stop = self.stop.requested
        return stop, stop or timed

    def _end_epoch(self, epoch: int, done_steps: int, wall: float, elapsed_before: float
                   ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.progress.stop()
        means = self.tally.means()
        lrs = {n: o.param_groups[0]["lr"] for n, o in self.optimizers.items()}
        for s_ in self.schedulers.values():
            s_.step()
        if self.is_main:
            self._save_samples(epoch)
        ips = done_steps * self.batch / max(wall - elapsed_before, 1e-9)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "wall_s": round(wall, 4),
            "steps": self.sampler.steps,
            "images": self.sampler.steps * self.batch,
            "images_per_s": round(ips, 3),
            "lr": lrs,
            "losses": {k: round(v, 6) for k, v in means.items()},
            "resumed_mid_epoch": done_steps < self.sampler.steps,
        }
        if self.val is not None:
            t_val = time.perf_counter()
            entry["validation"] = self._validate()
            entry["validation_s"] = round(time.perf_counter() - t_val, 3)
        self.metrics.add_epoch(entry)
        best = self._update_best()
        self.metrics.save("running")
        self.pos = Position(epoch, 0, self.pos.iteration, 0.0)
        self.tally = EpochTally()
        self._checkpoint(self.sampler.get_state())
        if best == epoch:
            self._keep_best(best)
        keep = int(self.tcfg["keep_every_epochs"] or 0)
        if keep and epoch % keep == 0 and self.is_main:
            ckpt.copy_checkpoint(self.ckpt_root, "latest", f"epoch_{epoch:04d}")
        if epoch == self.epochs:
            self.metrics.save("completed")
        loss_txt = "  ".join(f"{k} {v:.4g}" for k, v in means.items())
        if "validation" in entry:
            loss_txt += f"  val {entry['validation']['score']:.4g}" + (
                " (best)" if best == epoch else "")
        self.console.print(
            f"epoch {epoch}/{self.epochs}  {wall:.1f} s  {ips:.1f} img/s  {loss_txt}",
            highlight=False,
        )
        stop, _ = self._decide(end_of_epoch=True)
        if stop and epoch < self.epochs:
            self._interrupt()

    def _interrupt(self) -> None:
        """Stop after the state was saved: the run's status, then TrainingInterrupted."""
        self.progress.stop()
        self.metrics.save("interrupted")
        pos = self.pos
        where = (f"at epoch {pos.current_epoch}, iteration {pos.iteration}" if pos.step
                 else f"after epoch {pos.epoch}")
        raise self.stop.interrupted(where, str(self.ckpt_root / "latest"), str(self.out))

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> TrainingParts:
        return TrainingParts(self.model, self.optimizers, self.schedulers, self.scaler,
                             ema=self.ema, sampler=self.sampler, device=self.device)

    def _published(self) -> contextlib.AbstractContextManager[None]:
        """The model holds the weights the run publishes: the average with train.ema."""
        return contextlib.nullcontext() if self.ema is None else self.ema.applied()

    def _checkpoint(self, sampler_state: torch.Tensor) -> None:
        """Write ``latest`` at the current position (weights checked on every rank, so all
        stop together; written by rank 0: the ranks hold the same weights). Image pools and
        RNG states are rank 0's; every rank resumes from them.

        Logs first, then the checkpoint: a crash in between leaves logs ahead of the
        checkpoint, and resume trims them back to it."""
        pos = self.pos
        if self.stepper.losses.count:  # nothing non-finite goes into a checkpoint
            self._check_finite()
        self._check_weights()
        self.log.flush()
        if self.is_main:
            log_state = {"losses": self.stepper.losses.state_dict(),
                         "epoch_sums": dict(self.tally.sums), "epoch_count": self.tally.count}
            state = training_state(self._parts(), pos, sampler_state, log_state)
            meta = {
                "model": self.cfg["model"],
                "contrasts": list(self.contrasts),
                "epoch": pos.epoch,
                "step_in_epoch": pos.step,
                "iteration": pos.iteration,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            ckpt.save_checkpoint(self.ckpt_root, "latest", self.model, state, meta,
                                 None if self.ema is None else self.ema.tensors())
        self.last_checkpoint = time.monotonic()

    def _restore(self, decay: int | None) -> None:
        """Continue from the run's latest checkpoint (none yet: start from the beginning)."""
        try:
            path = ckpt.find_checkpoint(self.out)
        except RunError:
            self.console.print(f"Run {self.out} has no checkpoint yet: starting it from the "
                               "beginning with its stored settings.")
            return
        self.pos, log_state = restore_training_state(path, self._parts(), self.cfg["model"],
                                                     self.contrasts)
        if log_state.get("losses"):
            self.stepper.losses.load_state_dict(log_state["losses"], self.device)
        self.tally = EpochTally(log_state.get("epoch_sums"), int(log_state.get("epoch_count", 0)))
        pos = self.pos
        self.console.print(
            f"Resuming {self.cfg['model']} from {path.name}: epoch {pos.epoch} done, "
            f"step {pos.step} of the next, iteration {pos.iteration}.",
            highlight=False,
        )
        # The schedule may have changed (more epochs): set this epoch's rate from it,
        # with the same arithmetic LambdaLR uses (so an unchanged schedule is bit-exact).
        for s in self.schedulers.values():
            for group, base in zip(s.optimizer.param_groups, s.base_lrs, strict=True):
                group["lr"] = base * lr_factor(pos.epoch + 1, self.epochs, decay)
        # the checkpoint's optimiser settings include the implementation: use this run's
        use_adam_options(self.optimizers, self.device, self.setup.options.fused_adam)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        """Translate the validation slices (whole slices, eval mode, the run's own RNG
        untouched) and score them."""
        from mrsynth.eval.validation import validate

        assert self.val is not None
        model, size = self.model, self.slices.size
        source_size = self.slices.source_size

        def translate(x: torch.Tensor, direction: str) -> torch.Tensor:
            gen = model.generator(direction)
            outs = [resample(gen(resample(x[i:i + 8].to(self.device), size)).float(),
                             source_size).cpu() for i in range(0, x.shape[0], 8)]
            return torch.cat(outs)

        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with eager(), torch.random.fork_rng(devices=devices), self._published():
                return validate(translate, self.val)
        finally:
            model.train(was_training)

    def _update_best(self) -> int | None:
        """The best validated epoch so far, recorded in metrics.json's ``validation``."""
        if self.val_info is None:
            return None
        from mrsynth.eval.validation import SCORE_KEY, best_epoch

        epochs = self.metrics.doc["epochs"]
        best = best_epoch(epochs)
        self.val_info["best_epoch"] = best
        self.val_info["best_score"] = next(
            (e["validation"][SCORE_KEY] for e in epochs if e["epoch"] == best), None)
        self.metrics.doc["validation"] = self.val_info
        return best

    def _keep_best(self, best: int | None) -> None:
        """``checkpoints/best`` := ``latest`` when ``latest`` is the best epoch's end (also
        repairs a run stopped between writing the two)."""
        if best is None or not self.is_main or self.pos.epoch != best or self.pos.step:
            return
        try:
            if int(ckpt.read_meta(ckpt.find_checkpoint(self.out, "best"))["epoch"]) == best:
                return
        except (RunError, KeyError, ValueError):
            pass
        ckpt.copy_checkpoint(self.ckpt_root, "latest", "best")

    # ------------------------------------------------------------------ checks
    def _check_precision(self) -> None:
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU.")
        if (self.precision == "bf16" and self.device.type == "cuda"
                and not native_bf16(self.device)):
            raise ConfigError(
                f"--precision bf16: the GPU {torch.cuda.get_device_name(self.device)} has no "
                "native bfloat16 support (it needs compute capability 8.0 or newer); use fp32 "
                "(fp16 is possible but unstable for GANs)."
            )

    def _check_same_data(self, settings: dict[str, Any]) -> None:
        assert self.stored is not None
        diff = preparation_differences(self.stored["data"].get("settings"), settings,
                                       RESUME_DATA_KEYS)
        if diff:
            raise ConfigError(
                f"The prepared file {self.data_path} differs from the one the run started with "
                f"({', '.join(diff)} changed). Resume with the original data "
                f"({self.stored['data']['path']})."
            )

    def _lr(self) -> float:
        return float(next(iter(self.optimizers.values())).param_groups[0]["lr"])

    def _flush_interval(self, epoch: int) -> dict[str, float]:
        """One device sync per interval: means of the losses (averaged over ranks: every rank
        gets the same numbers, so all stop together on a non-finite one)."""
        means = self.stepper.losses.means(reduce=dd.all_mean)
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            self._diverged(_loss_problem(bad), epoch, self.pos.iteration)
        return means

    def _check_finite(self) -> None:
        means = self.stepper.losses.means(reset=False)
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            self._diverged(_loss_problem(bad), self.pos.current_epoch, self.pos.iteration)

    def _check_weights(self) -> None:
        """Refuse to checkpoint non-finite weights: a step can break the weights while its
        own loss (computed before the update) is still finite. One device sync per save."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if torch.stack([torch.isfinite(p).all() for p in params]).all().item():
            return
        names = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self._diverged(f"non-finite weights ({shown})", self.pos.current_epoch,
                       self.pos.iteration)

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

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def _save_samples(self, epoch: int) -> None:
        sl, model = self.slices, self.model
        if sl.sample_A.shape[0] == 0:
            return
        was_training = model.training
        model.eval()
        try:
            with eager(), self._published():  # no compilation for this one-off shape
                in_a = sl.sample_A if sl.sample_in_A is None else sl.sample_in_A  # 2.5-D
                in_b = sl.sample_B if sl.sample_in_B is None else sl.sample_in_B
                fb = model.generator("A2B")(in_a).float().cpu().numpy()[:, 0]
                fa = model.generator("B2A")(in_b).float().cpu().numpy()[:, 0]
        finally:
            model.train(was_training)
        ra = sl.sample_A.float().cpu().numpy()[:, 0]
        rb = sl.sample_B.float().cpu().numpy()[:, 0]
        rows = [(ra[i], fb[i], rb[i], fa[i]) for i in range(ra.shape[0])]
        save_sample_grid(
            self.out / SAMPLES_DIR / f"epoch_{epoch:04d}.png", rows, self.contrasts,
            f"{self.cfg['model']}  epoch {epoch}",
        )

    def _metrics_header(self) -> dict[str, Any]:
        return {
            "model": self.cfg["model"],
            "contrasts": list(self.contrasts),
            "device": str(self.device),
            "precision": self.precision,
            "epochs_planned": self.epochs,
            "steps_per_epoch": self.sampler.steps,
            "batch_size": self.batch,
            "image_size": list(self.slices.size),
            "patch_size": None if self.patch is None else list(self.patch),
            # the published weights: the moving average's decay (0: the live weights)
            "weight_average": 0.0 if self.ema is None else self.ema.decay,
            **({"validation": self.val_info} if self.val_info is not None else {}),
            **self._execution_info(),
        }

    def _execution_info(self) -> dict[str, Any]:
        """How the run was executed: ranks, per-rank batch, speed options actually used."""
        setup = self.setup
        return {
            "world_size": self.dist.world_size,
            "per_rank_batch": self.batch // self.dist.world_size,
            "backend": self.dist.backend,
            "compile": setup.compile_report.mode,
            "compile_note": setup.compile_report.reason,
            "channels_last": setup.options.channels_last,
            "adam": setup.adam,
            "data_on_device": self.on_device,
            "loader_workers": 0 if self.on_device else self.loader_workers,
        }


def _loss_problem(bad: dict[str, float]) -> str:
    return "non-finite loss (" + ", ".join(f"{k}={v}" for k, v in bad.items()) + ")"
