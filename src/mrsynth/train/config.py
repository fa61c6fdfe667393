"""Training configuration: presets, ``--set key=value`` overrides and validation.

A resolved config is a plain JSON-able dict (it is written to ``RUN_DIR/config.json``)::

    model, preset, seed, device, precision,
    data.{contrasts, image_size},
    train.{epochs, batch_size, decay_start_epoch, max_steps_per_epoch, patch_size,
           patch_brain_fraction, augment_flip, augment_gamma, ema, val_slices, log_every,
           samples, checkpoint_every_minutes, keep_every_epochs, deterministic, channels_last,
           compile, fused_adam, num_threads, progress},
    arch.*, loss.*, optim.*   (model-specific, from the model's ``preset_config``; every
                              model has ``arch.context_slices``, 2.5-D input, 0..8,
                              checked by ``TranslationModel.config_problems``)

Presets: ``paper`` reproduces the study's settings (whole slices); ``cpu-small`` is the same
code path with a model a 2-core CPU trains in minutes (fewer filters and blocks, few epochs)
that learns from random 64 x 64 patches of the full-resolution slices and translates whole
slices (downsampling whole slices instead lost the detail the models need to beat an intensity
lookup table; see docs/evaluation.md). Any key can be overridden; unknown keys and values of
the wrong type are refused with the list of valid keys.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from mrsynth.errors import ConfigError

PRESETS = ("paper", "cpu-small")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
#: ``train.compile``: off, torch.compile (inductor), + CUDA graphs, + autotuned kernels.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

_BASE: dict[str, Any] = {
    "model": None,
    "preset": None,
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "data": {
        # Source (A) and target (B) contrast of the run.
        "contrasts": ["T1w", "T2w"],
        # None: train at the prepared size; N: downsample so the longer side is <= N pixels.
        "image_size": None,
    },
    "train": {
        "epochs": 200,
        "batch_size": 1,
        # Learning-rate schedule: "linear" decays linearly to 0 after the last epoch, starting
        # at decay_start_epoch (None: the second half, epoch epochs // 2 + 1); "none" = flat.
        "lr_decay": "none",
        "decay_start_epoch": None,
        "max_steps_per_epoch": None,
        # Train on random patch_size x patch_size crops of the slices (None: whole slices).
        # The networks are fully convolutional: inference still translates whole slices.
        "patch_size": None,
        # Share of patches centred on a brain voxel (the rest: anywhere in the slice).
        "patch_brain_fraction": 0.9,
        # Augmentation (mrsynth.data.augment): probability of a left-right flip of each
        # example, and the std of ln(gamma) of a random gamma of the generators' inputs.
        "augment_flip": 0.0,
        "augment_gamma": 0.0,
        # Moving average of the weights (mrsynth.train.ema): its decay per step, 0 = off. The
        # average is what validation, translate, evaluate and export use.
        "ema": 0.0,
        # Validation slices scored after every epoch (the prepared file's val split; 0: off).
        "val_slices": 8,
        "log_every": 50,
        "samples": 4,
        "checkpoint_every_minutes": 10.0,
        "keep_every_epochs": 50,
        "deterministic": False,
        # channels_last memory format, CUDA only (on CPU it gained nothing measurable). "auto":
        # with torch.compile only — eager instance norm returns the default layout, so an eager
        # network would convert twice around every conv-norm pair; true: also eager.
        "channels_last": "auto",
        # torch.compile the networks (see docs/performance.md); "reduce-overhead" adds CUDA
        # graphs on a single GPU. Compiling costs seconds (GPU) to minutes (small CPU).
        "compile": "none",
        # Fused Adam kernels (CUDA and CPU): same update rule, fewer kernel launches.
        "fused_adam": True,
        "num_threads": None,
        "progress": True,
        # Training slices resident on the device (true), read batch by batch from the prepared
        # store by a DataLoader (false), or "auto": resident when they take at most a quarter
        # of the free device memory (on CPU: of the available RAM).
        "data_on_device": "auto",
        # DataLoader worker processes when streaming (None: 0 on a CPU, min(4, cores - 1) on
        # CUDA; 0: read in the training process).
        "loader_workers": None,
    },
}

_PRESET_BASE: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu-small": {
        # 16 validation slices: the best epoch and benchmarks/tune_cpu_small.py's choice of
        # these presets rest on them (8 made the choice noisier; each costs one translation)
        "train": {"patch_size": 64, "log_every": 10, "keep_every_epochs": 0,
                  "checkpoint_every_minutes": 2.0, "val_slices": 16},
    },
}


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_config(model: str, preset: str = "paper") -> dict[str, Any]:
    """The preset's config for ``model`` before overrides."""
    from mrsynth.models.base import get_model_class

    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    cls = get_model_class(model)
    cfg = copy.deepcopy(_BASE)
    cfg["model"] = model
    cfg["preset"] = preset
    _merge(cfg, _PRESET_BASE[preset])
    sections = cls.preset_config(preset)
    for name in ("arch", "loss", "optim"):
        cfg[name] = copy.deepcopy(sections.get(name, {}))
    _merge(cfg, {k: v for k, v in sections.items() if k not in ("arch", "loss", "optim")})
    return cfg


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false/null, lists) or else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.strip().lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.epochs=3", "loss.cycle=5"]`` -> ``{"train.epochs": 3, "loss.cycle": 5.0}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"Cannot read the override {item!r}: write it as key=value, e.g. "
                "--set train.epochs=3 or --set loss.cycle=5."
            )
        out[key.strip()] = parse_value(value.strip())
    return out


#: Settings that may change when a run is resumed (they do not change what is learnt per
#: step); anything else differing from the stored config is refused.
RESUMABLE_KEYS = frozenset({
    "device", "precision", "train.epochs", "train.lr_decay", "train.decay_start_epoch",
    "train.log_every",
    "train.samples", "train.checkpoint_every_minutes", "train.keep_every_epochs",
    "train.progress", "train.num_threads", "train.max_steps_per_epoch", "train.channels_last",
    "train.compile", "train.fused_adam", "train.data_on_device", "train.loader_workers",
})

#: Settings that take true, false or "auto".
_BOOL_OR_AUTO = ("train.channels_last", "train.data_on_device")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the default's type; ints are accepted where floats are."""
    if default is None or value is None:
        return value
    if key in _BOOL_OR_AUTO:
        if isinstance(value, bool) or value == "auto":
            return value
        if value in ("true", "false"):  # `--set key=true` keeps text for a text default
            return value == "true"
        raise ConfigError(f"Setting {key} must be true, false or auto, got {value!r}.")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list) and isinstance(value, list):
        return value
    raise ConfigError(
        f"Setting {key} must be a {type(default).__name__} like the default {default!r}, "
        f"got {value!r}."
    )


def apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of ``cfg``; unknown keys raise with the valid ones."""
    cfg = copy.deepcopy(cfg)
    flat = flatten(cfg)
    for key, value in overrides.items():
        if isinstance(value, str) and key not in ("model", "preset", "device", "precision"):
            value = parse_value(value) if not isinstance(flat.get(key), str) else value
        if value is None and isinstance(flat.get(key), str):
            value = "none"  # `--set train.lr_decay=none`: for a text setting "none" is a word
        if key not in flat:
            raise ConfigError(
                f"Unknown setting {key!r} for model {cfg['model']!r}. Valid settings: "
                f"{', '.join(sorted(flat))}."
            )
        if key in ("model", "preset"):
            raise ConfigError(f"Choose the {key} with --{key}, not with --set.")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = _coerce(key, value, flat[key])
    return cfg


#: Lower bounds of the models' integer ``arch`` settings: a width needs at least one channel
#: and UNIT at least one discriminator scale; a number of blocks or layers may be 0.
_ARCH_MIN = {"ngf": 1, "ndf": 1, "nef": 1, "hidden": 1, "d_scales": 1,
             "n_blocks": 0, "enc_blocks": 0, "dec_blocks": 0, "d_layers": 0}
#: ``loss`` settings whose range the models check themselves (with their own advice).
_LOSS_CHECKED_BY_MODEL = ("gradient", "through_plane")


def _number_problems(cfg: dict[str, Any], flat: Mapping[str, Any]) -> list[str]:
    """Ranges of the numbers a typo can make meaningless: NaN or infinity anywhere (JSON
    ``--set`` values may be ``NaN``, ``Infinity`` or overflow like ``1e400``), negative loss
    weights, a learning rate that is not positive, Adam betas outside [0, 1), widths below
    one channel. Caught here, before any data is read, instead of as a crash in the first
    step or a run that silently learns nothing."""
    bad = [f"{k} must be a finite number, not {v}" for k, v in flat.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return bad

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    o, a = cfg.get("optim") or {}, cfg.get("arch") or {}
    problems = []
    if number(o.get("lr")) and o["lr"] <= 0:
        problems.append("optim.lr must be > 0")
    for b in ("beta1", "beta2"):
        if number(o.get(b)) and not 0 <= o[b] < 1:
            problems.append(f"optim.{b} must be in [0, 1)")
    if number(o.get("weight_decay")) and o["weight_decay"] < 0:
        problems.append("optim.weight_decay must be >= 0")
    for k, v in (cfg.get("loss") or {}).items():
        if k not in _LOSS_CHECKED_BY_MODEL and number(v) and v < 0:
            what = "0: no image pool" if k == "pool_size" else "a weight; 0 turns the term off"
            problems.append(f"loss.{k} must be >= 0 ({what})")
    for k, lo in _ARCH_MIN.items():
        if number(a.get(k)) and a[k] < lo:
            problems.append(f"arch.{k} must be at least {lo}")
    if number(a.get("dropout")) and not 0 <= a["dropout"] < 1:
        problems.append("arch.dropout must be in [0, 1)")
    if number(a.get("noise_std")) and a["noise_std"] < 0:
        problems.append("arch.noise_std must be >= 0")
    return problems


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a resolved config (keys, types and ranges); return it."""
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ConfigError("A training config must be a dict with at least a 'model' key.")
    ref = default_config(cfg["model"], cfg.get("preset") or "paper")
    got, want = flatten(cfg), flatten(ref)
    unknown = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if unknown or missing:
        raise ConfigError(
            f"Config for model {cfg['model']!r} has unknown settings {unknown} and lacks "
            f"{missing}. Build it with mrsynth.train.config.resolve_config()."
        )
    for k, v in got.items():
        _coerce(k, v, want[k])
    t, d = cfg["train"], cfg["data"]
    problems = _number_problems(cfg, got)
    if cfg["device"] not in DEVICES:
        problems.append(f"device must be one of {', '.join(DEVICES)}")
    if cfg["precision"] not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
    if t["epochs"] < 1:
        problems.append("train.epochs must be at least 1")
    if t["batch_size"] < 1:
        problems.append("train.batch_size must be at least 1")
    if t["compile"] not in COMPILE_MODES:
        problems.append(f"train.compile must be one of {', '.join(COMPILE_MODES)}")
    if t["lr_decay"] not in ("linear", "none"):
        problems.append("train.lr_decay must be 'linear' or 'none'")
    if t["decay_start_epoch"] is not None and not 1 <= t["decay_start_epoch"] <= t["epochs"] + 1:
        problems.append("train.decay_start_epoch must be between 1 and epochs + 1 (or null for "
                        "the second half)")
    if t["max_steps_per_epoch"] is not None and t["max_steps_per_epoch"] < 1:
        problems.append("train.max_steps_per_epoch must be at least 1 (or null)")
    if t["log_every"] < 1:
        problems.append("train.log_every must be at least 1")
    if t["checkpoint_every_minutes"] is not None and t["checkpoint_every_minutes"] < 0:
        problems.append("train.checkpoint_every_minutes must be >= 0 (0 or null = off)")
    c = d["contrasts"]
    if not (isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)
            and c[0] != c[1]):
        problems.append("data.contrasts must be two different contrast names, e.g. [T1w, T2w]")
    size = d["image_size"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 16):
        problems.append("data.image_size must be an integer >= 16 (or null)")
    patch = t["patch_size"]
    if patch is not None and (not isinstance(patch, int) or isinstance(patch, bool)
                              or patch < 16 or patch % 4):
        problems.append("train.patch_size must be a multiple of 4, at least 16 (or null for "
                        "whole slices): the generators downsample twice")
    if not 0.0 <= t["patch_brain_fraction"] <= 1.0:
        problems.append("train.patch_brain_fraction must be between 0 and 1")
    if not 0.0 <= t["augment_flip"] <= 1.0:
        problems.append("train.augment_flip must be a probability between 0 and 1")
    if not 0.0 <= t["augment_gamma"] <= 2.0:
        problems.append("train.augment_gamma must be between 0 (off) and 2 (the std of "
                        "ln gamma; 0.3 bends the contrast by up to about a factor 1.8)")
    if not 0.0 <= t["ema"] < 1.0:
        problems.append("train.ema must be in [0, 1): the decay of the weights' moving "
                        "average per step (0 = off; 0.95 averages about the last 20 steps)")
    workers = t["loader_workers"]
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 0):
        problems.append("train.loader_workers must be an integer >= 0 (or null: 0 on a CPU, "
                        "min(4, cores - 1) on CUDA)")
    if t["val_slices"] < 0:
        problems.append("train.val_slices must be >= 0 (0: no per-epoch validation)")
    from mrsynth.models.base import get_model_class

    problems += get_model_class(cfg["model"]).config_problems(cfg)  # arch/loss values
    if problems:
        raise ConfigError("Invalid training settings: " + "; ".join(problems) + ".")
    return cfg


def resolve_config(
    model: str,
    preset: str = "paper",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Preset defaults for ``model`` plus overrides (a ``{dotted.key: value}`` mapping or
    ``key=value`` strings), validated."""
    cfg = default_config(model, preset)
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        cfg = apply_overrides(cfg, overrides)
    return validate_config(cfg)


#: Settings added after runs were first stored, with what a run stored without them trained
#: with (its preset's default may have changed since): whole slices before patches, no
#: gradient-difference term, the study's ResNet before the U-Net, no augmentation.
_TRAINED_BEFORE: dict[tuple[str, str], Any] = {
    ("train", "patch_size"): None, ("loss", "gradient"): 0.0, ("arch", "generator"): "resnet",
    ("train", "augment_flip"): 0.0, ("train", "augment_gamma"): 0.0, ("train", "ema"): 0.0}


def upgrade_config(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run config completed with defaults for settings added since it was written
    (so runs of older versions still load and resume), then validated."""
    if not isinstance(stored, Mapping) or "model" not in stored:
        raise ConfigError("The stored config has no 'model'.")
    from mrsynth.models.base import get_model_class

    base = default_config(stored["model"], stored.get("preset") or "paper")
    for (section, key), old in _TRAINED_BEFORE.items():
        if key in base[section] and key not in (stored.get(section) or {}):
            base[section][key] = old
    stored = get_model_class(stored["model"]).upgrade_stored_config(dict(stored))
    return validate_config(_merge(base, stored))


def decay_start(train_cfg: Mapping[str, Any]) -> int | None:
    """First epoch with a decayed learning rate, or None for a flat schedule."""
    if train_cfg["lr_decay"] == "none":
        return None
    start = train_cfg["decay_start_epoch"]
    return int(start) if start is not None else int(train_cfg["epochs"]) // 2 + 1


def valid_keys(model: str, preset: str = "paper") -> list[str]:
    return sorted(flatten(default_config(model, preset)))
