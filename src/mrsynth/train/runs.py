"""Loading a trained run: the contract the evaluation, translate, export and demo code use.

>>> run = load_run("runs/cyclegan")                  # doctest: +SKIP
>>> fake_t2 = run.translate(t1_slices, "T1w2T2w")    # (N,1,H,W) normalised, at data size

``translate`` is deterministic (eval mode, no noise, no dropout, no grad) unless the run's
``stochastic`` attribute (or argument) is set, which keeps a model's latent noise and dropout
on as the study's Keras UNIT did (``translate/evaluate --stochastic``). It works at the
prepared data's size: when the run trained at a smaller internal size (``data.image_size``,
e.g. the ``cpu-small`` preset) it downsamples the input and upsamples the output itself.
``generator(direction)`` is the raw network (any size; trained at the internal size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mrsynth.errors import ConfigError, RunError
from mrsynth.models.base import DIRECTIONS, TranslationModel, build_model
from mrsynth.models.directions import parse_direction  # the one rule (re-exported)
from mrsynth.train import checkpoint as ckpt
from mrsynth.train.config import upgrade_config
from mrsynth.train.dataset import internal_size, resample
from mrsynth.train.logging import METRICS_JSON
from mrsynth.train.rundir import read_run_config


def direction_name(direction: str, contrasts: tuple[str, str] | list[str]) -> str:
    """``A2B`` -> ``T1w2T2w`` for a T1w/T2w run."""
    a, b = contrasts
    if direction not in DIRECTIONS:
        raise ConfigError(f"Unknown direction {direction!r}; use A2B or B2A.")
    return f"{a}2{b}" if direction == "A2B" else f"{b}2{a}"


class LoadedRun:
    """A run's model on a device, in eval mode, with its provenance."""

    def __init__(self, run_dir: Path, doc: dict[str, Any], model: TranslationModel,
                 checkpoint: Path, checkpoint_meta: dict[str, Any], device: torch.device) -> None:
        self.run_dir = run_dir
        self.doc = doc
        self.config: dict[str, Any] = doc["config"]
        self.model_name: str = self.config["model"]
        self.contrasts: tuple[str, str] = tuple(self.config["data"]["contrasts"])  # type: ignore[assignment]
        self.data_settings: dict[str, Any] = doc.get("data", {}).get("settings", {})
        self.data_path: str | None = doc.get("data", {}).get("path")
        self.model = model
        self.checkpoint = checkpoint
        self.checkpoint_meta = checkpoint_meta
        self.epoch: int = int(checkpoint_meta.get("epoch", 0))
        self.device = device
        #: Default of ``translate(stochastic=...)``: keep latent noise/dropout on at inference.
        self.stochastic = False
        self._mirror = False
        self._generators: dict[tuple[str, bool], nn.Module] = {}

    @property
    def mirror(self) -> bool:
        """Whether ``translate`` averages each output with the translation of the slice
        mirrored left-right (test-time mirroring, as nnU-Net does by default): twice the
        inference, a slightly better estimate (docs/evaluation.md)."""
        return self._mirror

    @mirror.setter
    def mirror(self, on: bool) -> None:
        from mrsynth.data.slicing import plane_of

        if on and plane_of(self.data_settings) == "sagittal":
            raise ConfigError(
                f"--mirror averages with the left-right mirrored slice, but the run "
                f"{self.run_dir} translates sagittal slices, which have no left-right axis. "
                "Leave --mirror off for it.")
        self._mirror = bool(on)

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json (per-epoch wall time, mean s/epoch, losses); {} if absent."""
        path = self.run_dir / METRICS_JSON
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @property
    def image_size(self) -> int | None:
        """The longest side the run trained at (None: the prepared data's size)."""
        return self.config["data"]["image_size"]

    def direction(self, name: str) -> str:
        """``A2B``/``B2A`` for ``T1w2T2w``, ``t1w->t2w``, ``A2B``... (:func:`parse_direction`)."""
        return parse_direction(name, self.contrasts)

    def generator(self, direction: str, stochastic: bool = False) -> nn.Module:
        """The network for ``A2B``/``B2A`` (or ``T1w2T2w``...), eval mode, on the run's device
        (``stochastic``: with the model's inference noise and dropout on, if it has any)."""
        key = (self.direction(direction), bool(stochastic))
        if key not in self._generators:
            self._generators[key] = self.model.generator(*key).eval()
        return self._generators[key]

    @torch.no_grad()
    def translate(self, x: Tensor | np.ndarray, direction: str, batch_size: int = 16,
                  stochastic: bool | None = None) -> Tensor:
        """Translate normalised slices (N,1,H,W) (or (N,H,W)); returns float32 on the CPU,
        same shape. A 2.5-D run takes stacks (N,2k+1,H,W) and returns (N,1,H,W).
        Resamples to the run's internal size and back when needed.
        ``stochastic`` (default: the run's ``stochastic`` attribute) samples a new output
        each call for models with inference noise (UNIT); with :attr:`mirror` each output is
        averaged with the mirrored slice's, mirrored back."""
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        squeeze = t.ndim == 3
        if squeeze:
            t = t[:, None]
        c = self.model.in_channels
        if t.ndim != 4 or t.shape[1] != c:
            shape = "(N,1,H,W) or (N,H,W)" if c == 1 else (
                f"(N,{c},H,W): this 2.5-D run (arch.context_slices={c // 2}) takes each slice "
                "with its neighbours as channels (mrsynth.data.context)")
            raise ConfigError(f"translate() takes slices shaped {shape}, got {tuple(t.shape)}.")
        gen = self.generator(direction, self.stochastic if stochastic is None else stochastic)
        size = tuple(t.shape[-2:])
        inner = internal_size(size, self.image_size)  # type: ignore[arg-type]
        outs = []
        for i in range(0, t.shape[0], batch_size):
            xb = t[i : i + batch_size].to(self.device, torch.float32)
            yb = gen(resample(xb, inner)).float()
            if self._mirror:  # rows run left-right in axial and coronal slices
                yb = (yb + gen(resample(xb.flip(-2), inner)).float().flip(-2)) / 2
            outs.append(resample(yb, size).cpu())  # type: ignore[arg-type]
        out = torch.cat(outs) if outs else torch.empty_like(t[:, :1], dtype=torch.float32)
        return out[:, 0] if squeeze else out


def load_run(
    run_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
    checkpoint: str | int = "latest",
) -> LoadedRun:
    """Load a run's model from a checkpoint (``latest``, an epoch number or ``epoch_0050``).

    Raises :class:`RunError` for a directory that is not a run, a run without a complete
    checkpoint, an unreadable checkpoint, or one saved by another model or contrast pair.
    """
    rd = Path(run_dir)
    if not rd.is_dir():
        raise RunError(f"Run directory {rd} does not exist.")
    doc = read_run_config(rd)
    try:
        config = upgrade_config(doc["config"])
    except ConfigError as exc:
        raise RunError(f"{rd / 'config.json'} holds an invalid config: {exc}") from exc
    dev = torch.device(device)
    path = ckpt.find_checkpoint(rd, checkpoint)
    tensors, meta = ckpt.load_weights(path, dev)
    ckpt.check_identity(path, meta, config["model"], config["data"]["contrasts"])
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device=dev)
    from mrsynth.train.ema import published

    ckpt.load_model_weights(model, published(tensors), path)  # the average, with train.ema
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    doc["config"] = config
    return LoadedRun(rd, doc, model, path, ckpt.read_meta(path), dev)
