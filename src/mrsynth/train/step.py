"""The step path: a model ready to train, and one training iteration.

:func:`setup_training` puts a model on its device in the run's memory format, builds its
optimisers with the run's Adam kernels and compiles its networks (:mod:`mrsynth.train.speed`);
:class:`TrainStepper` is one iteration as the trainer runs it: gather the batch from the
slices resident on the device, ``model.train_step``, accumulate the losses without a host
sync (:class:`LossAccumulator`). The trainer (:mod:`mrsynth.train.trainer`) and the speed
benchmark (``benchmarks/train_speed.py``) step through this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mrsynth.train.speed import (
    CompileReport,
    FastOptions,
    adam_options,
    adam_report,
    channels_last_supported,
    compile_networks,
    step_begin,
    to_channels_last,
)


class LossAccumulator:
    """Running sums of a step's losses kept on the device: no host sync per step.

    ``add`` stacks the step's scalar losses into one tensor and adds it in place (two small
    kernels per step whatever the number of losses); ``means`` reads all of them with one
    device-to-host copy. ``reduce`` (e.g. :func:`mrsynth.train.distributed.all_mean`) is
    applied to the stacked sums before the copy, so averaging over ranks costs one collective
    per interval.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.total: Tensor | None = None
        self.count = 0

    def add(self, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        vals = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        if self.total is None:
            self.names, self.total = names, vals
        else:
            if names != self.names:
                raise ValueError(f"loss names changed from {self.names} to {names}")
            self.total.add_(vals)
        self.count += 1

    def means(self, reduce: Any = None, *, reset: bool = True) -> dict[str, float]:
        """Mean of each loss over the added steps (one host sync); resets unless told not to."""
        if self.total is None or self.names is None or self.count == 0:
            return {}
        t = self.total / self.count
        if reduce is not None:
            t = reduce(t)
        out = dict(zip(self.names, t.cpu().tolist(), strict=True))
        if reset:
            self.names, self.total, self.count = None, None, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        """The running sums as they are (for a checkpoint taken between two log rows)."""
        total = None if self.total is None else self.total.detach().cpu().clone()
        return {"names": self.names, "total": total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        total = state.get("total")
        self.names = list(state["names"]) if state.get("names") is not None else None
        self.total = None if total is None else total.to(device)
        self.count = int(state.get("count", 0))


@dataclass
class TrainingSetup:
    """A model ready to step: on its device, in its memory format, compiled, optimisers made."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    ctx: Any
    device: torch.device
    options: FastOptions
    compile_report: CompileReport
    adam: dict[str, str]


def setup_training(
    model: nn.Module, device: torch.device | str, options: FastOptions,
    *, distributed: bool = False, scaler: Any = None,
) -> TrainingSetup:
    """Move ``model`` to ``device`` and apply ``options``; build optimisers and the context.

    The order matters: memory format before the optimisers are made (they hold the
    parameters; ``model.adam`` reads ``model.adam_kernels``), compilation after (it does not
    change parameters), DDP wrapping last (done by the caller with
    :func:`mrsynth.train.distributed.wrap_model`).
    """
    from mrsynth.models.base import StepContext

    dev = torch.device(device)
    model.to(dev)
    if options.channels_last and channels_last_supported(dev):
        to_channels_last(model)
    model.train()
    # the optimisers are built once, with this run's Adam kernels (fused or foreach)
    model.adam_kernels = adam_options(dev, options.fused_adam)  # type: ignore[assignment]
    optimizers = model.build_optimizers()  # type: ignore[operator]
    adam = adam_report(optimizers)
    report = compile_networks(model, options.compile, dev, distributed=distributed)
    ctx = StepContext(optimizers, dev.type, options.precision, scaler)
    return TrainingSetup(model, optimizers, ctx, dev, options, report, adam)


class TrainStepper:
    """One training iteration as the trainer runs it.

    The slices live on the device; a batch is a gather with index tensors (no DataLoader, no
    host-to-device copy per step), or with ``patch`` (h, w) a crop at the given windows (one
    indexing op, :func:`mrsynth.data.patches.crop`); losses go into a
    :class:`LossAccumulator` (no host sync).
    """

    def __init__(self, setup: TrainingSetup, A: Tensor | None, B: Tensor | None,
                 patch: tuple[int, int] | None = None,
                 tables: tuple[Tensor, Tensor] | None = None,
                 augment: tuple[bool, bool] = (False, False)) -> None:
        self.setup = setup
        #: (flip on, gamma on): the step's augmentation parameters are applied when given
        self.augment = augment
        self.fmt = torch.channels_last if setup.options.channels_last else torch.contiguous_format
        # None when streaming: batches then come whole from the loader (:meth:`step_batch`)
        self.A = None if A is None else A.to(setup.device).contiguous(memory_format=self.fmt)
        self.B = None if B is None else B.to(setup.device).contiguous(memory_format=self.fmt)
        self.patch = patch
        #: 2.5-D: neighbour tables of A's and B's rows; batches then also hold the stacks
        self.tables = None if tables is None else tuple(t.to(setup.device) for t in tables)
        self.losses = LossAccumulator()

    def batch(self, ia: Tensor, ib: Tensor, wa: Tensor | None = None,
              wb: Tensor | None = None) -> dict[str, Tensor]:
        """The step's inputs: whole slices, or crops at windows ``wa``/``wb`` (batch, 2);
        2.5-D runs also get ``A_stack``/``B_stack``, each row with its neighbours cropped at
        the row's window (:func:`mrsynth.data.context.gather_stack`)."""
        assert self.A is not None and self.B is not None, "streamed runs use step_batch"
        if wa is None or wb is None or self.patch is None:
            out = {"A": self.A.index_select(0, ia), "B": self.B.index_select(0, ib)}
        else:
            from mrsynth.data.patches import crop

            out = {"A": crop(self.A, ia, wa, self.patch).contiguous(memory_format=self.fmt),
                   "B": crop(self.B, ib, wb, self.patch).contiguous(memory_format=self.fmt)}
        if self.tables is not None:
            from mrsynth.data.context import STACK_SUFFIX, gather_stack

            patch = None if wa is None or wb is None else self.patch
            nxt = self.setup.model.wants_next_slice
            for key, images, table, rows, win in (("A", self.A, self.tables[0], ia, wa),
                                                  ("B", self.B, self.tables[1], ib, wb)):
                out[key + STACK_SUFFIX] = gather_stack(images, table, rows, win, patch) \
                    .contiguous(memory_format=self.fmt)
                if nxt:  # each row's next slice (its own, at an edge) and its stack
                    k = (table.shape[1] - 1) // 2
                    after = table.index_select(0, rows.to(table.device))[:, k + 1]
                    if win is None or patch is None:
                        one = images.index_select(0, after)
                    else:
                        from mrsynth.data.patches import crop

                        one = crop(images, after, win, patch)
                    out[key + "_next"] = one.contiguous(memory_format=self.fmt)
                    out[key + "_next" + STACK_SUFFIX] = gather_stack(
                        images, table, after, win, patch).contiguous(memory_format=self.fmt)
        return out

    def step(self, ia: Tensor, ib: Tensor, wa: Tensor | None = None,
             wb: Tensor | None = None, augment: Tensor | None = None) -> dict[str, Tensor]:
        """One iteration on rows ``ia``/``ib`` (at windows ``wa``/``wb``), augmented with
        the step's parameters (:mod:`mrsynth.data.augment`) when given."""
        step_begin(self.setup.compile_report)
        return self._run(self.batch(ia, ib, wa, wb), augment)

    def step_batch(self, batch: dict[str, Tensor],
                   augment: Tensor | None = None) -> dict[str, Tensor]:
        """One iteration on a batch streamed from the store (on the host, maybe pinned).

        It gets the strides the resident path's batch has: a crop is laid out as
        :func:`~mrsynth.data.patches.crop` lays it out ((B,1,h,w) with channel stride 1, which
        the convolutions take for channels-last); the kernels, and so the bits of the
        result, follow the strides."""
        s = self.setup
        step_begin(s.compile_report)
        out = {}
        for k, v in batch.items():
            v = v.to(s.device, non_blocking=True)
            if self.patch is not None and v.shape[1] == 1:  # (a 2.5-D stack is contiguous)
                v = v.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format) \
                    .permute(0, 3, 1, 2)
            out[k] = v.contiguous(memory_format=self.fmt)
        return self._run(out, augment)

    def _run(self, batch: dict[str, Tensor], augment: Tensor | None = None
             ) -> dict[str, Tensor]:
        s = self.setup
        if augment is not None and any(self.augment):
            from mrsynth.data.augment import augment_batch

            batch = augment_batch(batch, augment.to(s.device), flip=self.augment[0],
                                  gamma=self.augment[1])
        losses = s.model.train_step(batch, s.ctx)  # type: ignore[operator]
        s.ctx.end_iteration()
        self.losses.add(losses)
        return losses
