"""The trainer on real shared slices: every model trains, loads and translates; losses fall;
paired models refuse unpaired data; overrides reach the model; non-finite losses stop."""

from __future__ import annotations

import csv
import io
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helpers import TINY_ARCH
from mrsynth.cli import main
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import ConfigError, DataError, OutputExistsError
from mrsynth.models import build_model, get_model_class, model_names
from mrsynth.models.base import StepContext
from mrsynth.models.blocks import count_parameters
from mrsynth.models.simple import Simple
from mrsynth.train.config import (
    apply_overrides,
    default_config,
    parse_overrides,
    resolve_config,
    valid_keys,
)
from mrsynth.train.dataset import EpochSampler, internal_size, resample
from mrsynth.train.logging import EpochProgress
from mrsynth.train.runs import load_run
from mrsynth.train.trainer import TrainingDiverged, lr_factor, train

#: Every registered model (a new model file is tested without editing this list); tiny
#: networks from the one per-model override table ``helpers.TINY_ARCH``.
MODELS = model_names()
PAIRED = [m for m in MODELS if get_model_class(m).needs_paired]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_config(model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    over = {
        "train.epochs": 1, "train.max_steps_per_epoch": 3, "train.log_every": 2,
        "train.samples": 2, "train.progress": False, "train.checkpoint_every_minutes": 0,
        "data.image_size": 32, **TINY_ARCH.get(model, {}), **(extra or {}),
    }
    return resolve_config(model, "cpu-small", over)


@pytest.fixture(scope="module")
def real(prepared_small: Path):
    return load_prepared(prepared_small)


@pytest.fixture(scope="module")
def unpaired_file(real, tmp_path_factory) -> Path:
    """The real slices with T1w kept on half the training slices and T2w on the other half."""
    d = real.select(np.arange(len(real)))
    d.images = {c: v.copy() for c, v in d.images.items()}
    d.available = {c: v.copy() for c, v in d.available.items()}
    train_rows = np.flatnonzero(d.split == "train")
    only_a, only_b = train_rows[::2], train_rows[1::2]
    d.available["T2w"][only_a] = False
    d.images["T2w"][only_a] = -1
    d.available["T1w"][only_b] = False
    d.images["T1w"][only_b] = -1
    d.paired = d.available["T1w"] & d.available["T2w"]
    return d.save(tmp_path_factory.mktemp("unpaired") / "split.npz")


@pytest.fixture(scope="module")
def flagged_unpaired_file(real, tmp_path_factory) -> Path:
    """Complete slices, but prepared with --unpaired (the file says so)."""
    d = real.select(np.arange(len(real)))
    d.settings = {**real.settings, "unpaired": True}
    return d.save(tmp_path_factory.mktemp("unpaired") / "flagged.npz")


# ------------------------------------------------------------------------- every model
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_writes_a_run_and_translates(
    model: str, prepared_small: Path, real, tmp_path: Path
) -> None:
    run_dir = train(tiny_config(model), prepared_small, tmp_path / "run")
    for name in ("config.json", "metrics.json", "losses.csv", "samples/epoch_0001.png",
                 "checkpoints/latest/weights.safetensors", "checkpoints/latest/state.pt"):
        assert (run_dir / name).is_file(), name
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["config"]["model"] == model
    assert doc["data"]["settings"] == real.settings
    assert doc["environment"]["packages"]["torch"] == metadata.version("torch")
    assert "git_commit" in doc and doc["device"] == "cpu"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert metrics["epochs"][0]["steps"] == 3 and metrics["mean_s_per_epoch"] > 0
    with open(run_dir / "losses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in rows] == [2, 3]  # log_every 2, then the epoch end

    run = load_run(run_dir)
    assert run.model_name == model and run.contrasts == ("T1w", "T2w")
    assert run.data_settings == real.settings
    assert run.metrics["epochs_completed"] == 1
    test_rows = np.flatnonzero(real.split == "test")[:3]
    x = torch.from_numpy(real.images["T1w"][test_rows])[:, None]
    y = run.translate(x, "T1w2T2w")
    assert y.shape == (3, 1, 64, 64) and torch.isfinite(y).all()
    assert torch.equal(y, run.translate(x, "A2B"))  # deterministic
    gen = run.generator("B2A")
    assert not gen.training
    # translate() = resample to the run's internal size (32), network, resample back.
    with torch.no_grad():
        manual = resample(gen(resample(x, (32, 32))), (64, 64))
    torch.testing.assert_close(run.translate(x, "T2w2T1w"), manual)


# Learning rates that show learning within 20 steps (Simple's 1x1 output layer, started at
# N(0, 0.02), moves too little at Keras' 1e-3 in that time).
FAST_LR = {"unit": 5e-4, "simple": 5e-3}

# Which loss must fall when a model learns (adversarial terms need not).
KEY_LOSS = {"cyclegan": "cycle", "cyclegan_s": "supervised", "unit": "recon",
            "generators_s": "G", "simple": "G", "pix2pix": "mae_A2B"}


@pytest.mark.parametrize("model", MODELS)
def test_loss_falls_in_a_few_cpu_steps_on_real_slices(model: str, real) -> None:
    torch.manual_seed(0)
    cfg = resolve_config(model, "cpu-small")
    if model in FAST_LR:
        cfg = apply_overrides(cfg, {"optim.lr": FAST_LR[model]})
    m = build_model(cfg).train()
    ctx = StepContext(m.build_optimizers())
    rows = np.flatnonzero((real.split == "train") & real.paired)
    a = resample(torch.from_numpy(real.images["T1w"][rows])[:, None], (32, 32))
    b = resample(torch.from_numpy(real.images["T2w"][rows])[:, None], (32, 32))
    sampler = EpochSampler(len(rows), len(rows), True, 2, seed=0, max_steps=20)
    ia, _ = sampler.draw()
    key = KEY_LOSS.get(model, "G")
    trace = [float(m.train_step({"A": a[i], "B": b[i]}, ctx)[key]) for i in ia]
    first, last = np.mean(trace[:5]), np.mean(trace[-5:])
    print(model, key, f"{first:.4f} -> {last:.4f}")
    assert last < 0.8 * first


# ------------------------------------------------------------------------- data checks
@pytest.mark.parametrize("model", PAIRED)
def test_paired_models_refuse_unpaired_data(
    model: str, unpaired_file: Path, flagged_unpaired_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=f"Model '{model}' learns from aligned T1w/T2w pairs"):
        train(tiny_config(model), unpaired_file, tmp_path / "a")
    with pytest.raises(DataError, match="prepared as unpaired data"):
        train(tiny_config(model), flagged_unpaired_file, tmp_path / "b")
    assert not (tmp_path / "a").exists()  # nothing is created before the data is accepted


def test_unpaired_model_uses_each_contrast_where_available(
    unpaired_file: Path, capsys, tmp_path: Path
) -> None:
    d = load_prepared(unpaired_file)
    train_rows = d.split == "train"
    code = main(["train", "--model", "cyclegan", "--preset", "cpu-small", "--data",
                 str(unpaired_file), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--set", "arch.ngf=4", "--set", "arch.n_blocks=1",
                 "--set", "data.image_size=32", "--set", "train.progress=false"])
    assert code == 0
    info = json.loads((tmp_path / "r" / "config.json").read_text())["data"]
    assert info["paired"] is False
    assert info["n_train_A"] == int((train_rows & d.available["T1w"]).sum())
    assert info["n_train_B"] == int((train_rows & d.available["T2w"]).sum())
    code = main(["train", "--model", "simple", "--data", str(unpaired_file), "--out",
                 str(tmp_path / "s")])
    assert code == 2
    assert "learns from aligned" in capsys.readouterr().err


def test_sampler_pairs_or_shuffles_independently() -> None:
    s = EpochSampler(6, 6, paired=True, batch_size=2, seed=0)
    ia, ib = s.draw()
    assert ia.shape == (3, 2) and torch.equal(ia, ib)
    assert sorted(ia.flatten().tolist()) == list(range(6))
    u = EpochSampler(5, 8, paired=False, batch_size=1, seed=0)
    epochs = [u.draw() for _ in range(3)]
    for ia, ib in epochs:
        assert ia.shape == (8, 1)
        assert set(ia.flatten().tolist()) == set(range(5))  # the smaller set is repeated
        assert sorted(ib.flatten().tolist()) == list(range(8))
    assert not torch.equal(epochs[0][1], epochs[1][1])  # reshuffled every epoch
    pairs = {(a, b) for ia, ib in epochs for a, b in zip(ia.flatten().tolist(),
                                                         ib.flatten().tolist(), strict=True)}
    assert len(pairs) > 12  # A and B are not drawn in lockstep
    state = u.get_state()
    nxt = u.draw()
    u.set_state(state)
    assert all(torch.equal(p, q) for p, q in zip(nxt, u.draw(), strict=True))
    with pytest.raises(ConfigError, match="Batch size 9"):
        EpochSampler(5, 8, paired=False, batch_size=9, seed=0)


def test_internal_size_keeps_aspect_and_never_upsamples() -> None:
    assert internal_size((64, 64), 64) == (64, 64)
    assert internal_size((64, 64), None) == (64, 64)
    assert internal_size((256, 256), 64) == (64, 64)
    assert internal_size((304, 256), 64) == (64, 52)
    assert internal_size((48, 40), 64) == (48, 40)


# ------------------------------------------------------------------------- config
def test_overrides_parse_validate_and_list_valid_keys() -> None:
    assert parse_overrides(["train.epochs=3", "loss.cycle=5", "data.contrasts=[\"T2w\",\"T1w\"]",
                            "train.progress=false", "data.image_size=null"]) == {
        "train.epochs": 3, "loss.cycle": 5, "data.contrasts": ["T2w", "T1w"],
        "train.progress": False, "data.image_size": None}
    cfg = resolve_config("cyclegan", "paper", ["loss.cycle=5", "optim.lr=1e-3"])
    assert cfg["loss"]["cycle"] == 5.0 and isinstance(cfg["loss"]["cycle"], float)
    assert cfg["optim"]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="Unknown setting 'loss.cycel'.*loss.cycle"):
        resolve_config("cyclegan", "paper", ["loss.cycel=5"])
    with pytest.raises(ConfigError, match="arch.ngf must be a int"):
        resolve_config("cyclegan", "paper", ["arch.ngf=wide"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="--model"):
        resolve_config("cyclegan", "paper", ["model=unit"])
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_config("cyclegan", "paper", {"precision": "fp8"})
    with pytest.raises(ConfigError, match="Unknown preset"):
        resolve_config("cyclegan", "huge")
    assert "loss.cycle" in valid_keys("cyclegan") and "loss.cycle" not in valid_keys("simple")


@pytest.mark.parametrize(("model", "setting", "message"), [
    ("generators_s", "optim.lr=NaN", "optim.lr must be a finite number, not nan"),
    ("generators_s", "optim.lr=1e400", "optim.lr must be a finite number, not inf"),
    ("cyclegan", "train.checkpoint_every_minutes=Infinity",
     "train.checkpoint_every_minutes must be a finite number"),
    ("generators_s", "optim.lr=0", "optim.lr must be > 0"),
    ("pix2pix", "optim.lr=-2e-4", "optim.lr must be > 0"),
    ("cyclegan", "optim.beta1=1", r"optim.beta1 must be in \[0, 1\)"),
    ("unit", "optim.beta2=-0.1", r"optim.beta2 must be in \[0, 1\)"),
    ("simple", "optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
    ("cyclegan", "loss.cycle=-10", "loss.cycle must be >= 0 .a weight"),
    ("unit", "loss.kl=-0.1", "loss.kl must be >= 0"),
    ("pix2pix", "loss.l1=-100", "loss.l1 must be >= 0"),
    ("cyclegan_s", "loss.pool_size=-1", "loss.pool_size must be >= 0 .0: no image pool"),
    ("cyclegan", "arch.ngf=0", "arch.ngf must be at least 1"),
    ("simple", "arch.hidden=0", "arch.hidden must be at least 1"),
    ("unit", "arch.d_scales=0", "arch.d_scales must be at least 1"),
    ("cyclegan", "arch.n_blocks=-1", "arch.n_blocks must be at least 0"),
    ("unit", "arch.dropout=1", r"arch.dropout must be in \[0, 1\)"),
    ("unit", "arch.noise_std=-1", "arch.noise_std must be >= 0"),
])
def test_meaningless_numbers_are_refused_before_any_data_is_read(model, setting, message) -> None:
    """A typo such as a negative weight, a NaN/overflowing learning rate (JSON allows NaN,
    Infinity and 1e400 -> inf) or a zero width is refused with the setting's name, instead of
    a crash in the first step or a run that learns nothing."""
    with pytest.raises(ConfigError, match=message):
        resolve_config(model, "cpu-small", [setting])


def test_boundary_numbers_are_accepted() -> None:
    """The edges that mean something stay allowed: a term switched off, no residual blocks,
    beta1 = 0, no weight decay, no dropout or latent noise."""
    resolve_config("cyclegan", "cpu-small", ["loss.cycle=0", "arch.n_blocks=0", "optim.beta1=0",
                                             "loss.pool_size=0", "arch.d_layers=0"])
    resolve_config("unit", "cpu-small", ["arch.dropout=0", "arch.noise_std=0", "loss.gan=0"])


def test_cli_refuses_a_nan_setting_with_its_name(prepared_small: Path, tmp_path: Path,
                                                 capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", "--model", "simple", "--preset", "cpu-small", "--data",
                 str(prepared_small), "--out", str(out), "--set", "optim.lr=NaN"])
    assert code != 0
    err = capsys.readouterr().err
    assert "optim.lr must be a finite number" in err
    assert not out.exists()


def test_paper_presets_are_the_study_settings() -> None:
    cg = default_config("cyclegan", "paper")
    assert cg["arch"]["ngf"] == 32 and cg["arch"]["n_blocks"] == 9
    assert cg["train"]["epochs"] == 200 and cg["train"]["batch_size"] == 1
    assert (cg["optim"]["lr"], cg["optim"]["beta1"]) == (2e-4, 0.5)
    assert cg["loss"]["cycle"] == 10 and cg["loss"]["pool_size"] == 50
    assert default_config("cyclegan_s")["loss"]["supervised"] == 10
    un = default_config("unit", "paper")
    assert un["train"]["epochs"] == 100 and un["optim"]["lr"] == 1e-4
    assert (un["loss"]["gan"], un["loss"]["kl"], un["loss"]["recon"]) == (10, 0.1, 100)
    assert default_config("simple")["optim"]["lr"] == 1e-3
    assert default_config("pix2pix")["loss"]["l1"] == 100
    assert (default_config("simple")["arch"]["init"],
            default_config("simple")["train"]["lr_decay"]) == ("normal", "none")


def test_cpu_small_presets_are_the_recipe_chosen_on_validation() -> None:
    """The cpu-small presets (with the demo's steps per epoch) equal the candidate
    benchmarks/tune_cpu_small.py chose for each model on the validation split."""
    import importlib.util

    from mrsynth.demo import _config
    from mrsynth.train.config import flatten

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_cpu_small.py"
    spec = importlib.util.spec_from_file_location("tune_cpu_small", path)
    assert spec is not None and spec.loader is not None
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    assert sorted(tune.CHOSEN) == sorted(model_names())
    for model, name in tune.CHOSEN.items():
        chosen_model, over = tune.CANDIDATES[name]
        assert chosen_model == model
        got = flatten(_config(model, None, None, "cpu", 0))
        assert {k: got[k] for k in over} == over, model
        assert got["train.val_slices"] == 16
    # changed for cpu-small only: the paper preset keeps the study's step
    assert default_config("pix2pix", "cpu-small")["optim"]["lr"] == 5e-4
    assert default_config("pix2pix", "paper")["optim"]["lr"] == 2e-4


def test_linear_decay_from_epoch_101_of_200() -> None:
    from mrsynth.train.config import decay_start

    start = decay_start(default_config("cyclegan", "paper")["train"])
    assert start == 101
    f = [lr_factor(e, 200, start) for e in range(1, 201)]
    assert f[:100] == [1.0] * 100
    assert f[100] == pytest.approx(100 / 101) and f[199] == pytest.approx(1 / 101)
    assert all(x > y for x, y in zip(f[100:], f[101:], strict=False))
    assert decay_start(default_config("unit", "paper")["train"]) is None


def test_cli_overrides_reach_the_model_and_optimiser(prepared_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["train", "--model", "simple", "--preset", "cpu-small", "--data",
                 str(prepared_small), "--out", str(out), "--epochs", "1", "--batch-size", "2",
                 "--max-steps-per-epoch", "2", "--seed", "7", "--set", "arch.hidden=8",
                 "--set", "arch.out_kernel=3", "--set", "optim.lr=0.005",
                 "--set", "train.progress=false",
                 "--set", "train.lr_decay=none"])  # cpu-small Simple decays from epoch 1 of 1
    assert code == 0
    run = load_run(out)
    # 1x1 conv 1->8 (+bias), 3x3 conv 8->1 (+bias)
    assert count_parameters(run.generator("A2B")) == (8 + 8) + (9 * 8 + 1)
    assert run.config["seed"] == 7
    state = torch.load(out / "checkpoints/latest/state.pt", weights_only=True)
    assert state["optimizers"]["G"]["param_groups"][0]["lr"] == 0.005
    assert json.loads((out / "metrics.json").read_text())["batch_size"] == 2
    # Existing runs are refused unless --overwrite (or continued with --resume).
    args = ["train", "--model", "simple", "--data", str(prepared_small), "--out", str(out)]
    assert main(args) == 2
    with pytest.raises(OutputExistsError):
        train(resolve_config("simple", "cpu-small"), prepared_small, out)
    # A finished run resumes to a no-op; changing what is learnt on resume is refused.
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--set", "arch.hidden=16"]) == 2
    assert main(["train", "--model", "unit", "--out", str(out), "--resume"]) == 2
    assert main(["train", "--model", "simple", "--data", str(prepared_small), "--out", str(out),
                 "--set", "nope.key=1"]) == 2


def test_cpu_rejects_fp16_and_missing_cuda_but_runs_bf16(prepared_small, tmp_path) -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(tiny_config("simple", {"precision": "fp16"}), prepared_small, tmp_path / "a")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            train(tiny_config("simple", {"device": "cuda"}), prepared_small, tmp_path / "b")
    run = train(tiny_config("cyclegan", {"precision": "bf16"}), prepared_small, tmp_path / "c")
    losses = json.loads((run / "metrics.json").read_text())["epochs"][0]["losses"]
    assert all(np.isfinite(v) for v in losses.values())
    w = load_file(run / "checkpoints/latest/weights.safetensors")
    assert all(v.dtype == torch.float32 for v in w.values())  # weights stay fp32 under autocast


# ------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    prepared_small: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = {"n": 0}
    original = Simple.train_step

    def poisoned(self, batch, ctx):  # from the 6th step on the weights blow up
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                self.G_A2B.model[0].weight.fill_(float("nan"))
        return original(self, batch, ctx)

    monkeypatch.setattr(Simple, "train_step", poisoned)
    cfg = tiny_config("simple", {"train.epochs": 3, "train.max_steps_per_epoch": 4})
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch 2, iteration 6: non-finite loss"):
        train(cfg, prepared_small, out)
    meta = json.loads((out / "checkpoints/latest/meta.json").read_text())
    assert meta["epoch"] == 1 and meta["iteration"] == 4
    weights = load_file(out / "checkpoints/latest/weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert json.loads((out / "metrics.json").read_text())["status"] == "diverged"



def test_weights_broken_by_the_last_step_are_never_checkpointed(
    prepared_small: Path, tmp_path: Path, monkeypatch
) -> None:
    """The epoch's last step leaves NaN weights while its own loss was finite."""
    calls = {"n": 0}
    original = Simple.train_step

    def poisoned_after(self, batch, ctx):
        losses = original(self, batch, ctx)
        calls["n"] += 1
        if calls["n"] == 4:  # the last step of epoch 1, after its loss was computed
            with torch.no_grad():
                self.G_B2A.model[0].bias.fill_(float("inf"))
        return losses

    monkeypatch.setattr(Simple, "train_step", poisoned_after)
    cfg = tiny_config("simple", {"train.epochs": 2, "train.max_steps_per_epoch": 4})
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite weights \(G_B2A\.model\.0\.bias\)"):
        train(cfg, prepared_small, out)
    assert not (out / "checkpoints/latest").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "diverged"

def test_progress_bar_shows_losses_and_speed_only_on_a_terminal() -> None:
    buf = io.StringIO()
    bar = EpochProgress(Console(file=buf, force_terminal=True, width=160), enabled=True)
    bar.start(2, 5, 10, 0)
    bar.advance(4)
    bar.show(12.5, {"G": 1.25, "D_A": 0.5})
    bar.stop()
    out = buf.getvalue()
    assert "epoch 2/5" in out and "4/10" in out and "12.5 img/s" in out and "G 1.25" in out
    quiet = io.StringIO()
    bar = EpochProgress(Console(file=quiet, force_terminal=False), enabled=True)
    bar.start(1, 1, 3, 0)
    bar.advance()
    bar.show(1.0, {"G": 1.0})
    bar.stop()
    assert not bar.enabled and quiet.getvalue() == ""
