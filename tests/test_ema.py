"""The weights' moving average (``train.ema``, :mod:`mrsynth.train.ema`): the recursion
against an independent loop, that it never changes training, that runs publish it, and that
resume keeps it bit-exact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import one_torch_thread, straight_and_resumed, tiny_arch
from mrsynth.errors import ConfigError, RunError
from mrsynth.train.config import resolve_config, upgrade_config
from mrsynth.train.ema import PREFIX, WeightAverage, published, split_average


def test_the_average_follows_the_recursion_with_its_warm_up() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    avg = WeightAverage(net, 0.9)
    ref = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    for n in range(1, 41):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        avg.update(n)
        d = min(0.9, n / (n + 9))  # 0.1, 0.18, ... then 0.9 from step 81; here the ramp
        ref = {k: d * ref[k] + (1 - d) * v.detach().double()
               for k, v in net.state_dict().items()}
    assert avg.rate(1) == pytest.approx(0.1) and avg.rate(10_000) == 0.9
    for k, v in avg.shadow.items():
        torch.testing.assert_close(v.double(), ref[k], atol=1e-5, rtol=1e-5)
    # inside `applied` the model holds the average, after it its own weights, bit for bit
    live = {k: v.clone() for k, v in net.state_dict().items()}
    with avg.applied():
        for k, v in net.state_dict().items():
            assert torch.equal(v, avg.shadow[k])
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k])
    # checkpoint entries round-trip; a model of another shape is refused
    live_part, avg_part = split_average({**net.state_dict(), **avg.tensors()})
    assert set(live_part) == set(live) and avg_part is not None
    assert all(torch.equal(avg_part[k], avg.shadow[k]) for k in avg_part)
    assert all(torch.equal(published({**live, **avg.tensors()})[k], avg.shadow[k])
               for k in avg.shadow)
    assert split_average(live)[1] is None and published(live).keys() == live.keys()
    other = WeightAverage(nn.Linear(3, 4), 0.9)
    with pytest.raises(ValueError, match="do not fit"):
        other.load(avg_part)
    with pytest.raises(ValueError, match="train.ema"):
        WeightAverage(net, 1.0)


def test_config_checks_and_older_runs_load_without_an_average() -> None:
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="train.ema"):
            resolve_config("generators_s", "cpu-small", {"train.ema": bad})
    stored = json.loads(json.dumps(resolve_config("pix2pix", "cpu-small")))
    del stored["train"]["ema"]
    assert upgrade_config(stored)["train"]["ema"] == 0.0


def _config(**over):
    return resolve_config("generators_s", "cpu-small", {
        "train.epochs": 2, "train.max_steps_per_epoch": 4, "train.batch_size": 2,
        "train.patch_size": 32, "train.progress": False, "train.val_slices": 4,
        "train.checkpoint_every_minutes": 0, "train.num_threads": 1, "device": "cpu",
        "train.deterministic": True, "train.log_every": 2, **tiny_arch("generators_s"),
        **over})


def test_a_run_publishes_the_average_without_changing_its_training(
        small_with_val: Path, tmp_path: Path, monkeypatch) -> None:
    """Same seed with and without ``train.ema``: the live weights and losses are identical
    (the average only watches); the checkpoint holds the average, equal to an independent
    recursion over the live weights recorded after every step; ``load_run`` (translate,
    evaluate, export) loads it; validation scores it."""
    from mrsynth.train import step as step_mod
    from mrsynth.train.runs import load_run
    from mrsynth.train.trainer import train

    seen: list[dict[str, torch.Tensor]] = []
    run_step = step_mod.TrainStepper._run

    def snapshot(model) -> dict[str, torch.Tensor]:
        return {k: v.detach().double().clone() for k, v in model.state_dict().items()}

    def recorded(self, batch, augment=None):
        if not seen:  # the weights the run starts from
            seen.append(snapshot(self.setup.model))
        out = run_step(self, batch, augment)
        seen.append(snapshot(self.setup.model))
        return out

    with one_torch_thread():
        monkeypatch.setattr(step_mod.TrainStepper, "_run", recorded)
        averaged = train(_config(**{"train.ema": 0.8}), small_with_val, tmp_path / "ema")
        monkeypatch.setattr(step_mod.TrainStepper, "_run", run_step)
        plain = train(_config(), small_with_val, tmp_path / "plain")
    wa = load_file(averaged / "checkpoints/latest/weights.safetensors")
    wp = load_file(plain / "checkpoints/latest/weights.safetensors")
    live, avg = split_average(wa)
    assert avg is not None and live.keys() == wp.keys() == avg.keys()
    assert all(torch.equal(live[k], wp[k]) for k in wp)  # training itself unchanged
    assert _losses(averaged) == _losses(plain)
    # the recursion, recomputed from the recorded live weights (start + 8 steps)
    assert len(seen) == 9
    ref = seen[0]
    for n, w in enumerate(seen[1:], start=1):
        d = min(0.8, n / (n + 9))
        ref = {k: d * ref[k] + (1 - d) * w[k] for k in ref}
    for k in avg:
        torch.testing.assert_close(avg[k].double(), ref[k], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(avg[k], live[k]) for k in avg)
    run = load_run(averaged)
    assert all(torch.equal(v.cpu(), avg[k]) for k, v in run.model.state_dict().items())
    ma = json.loads((averaged / "metrics.json").read_text())
    mp = json.loads((plain / "metrics.json").read_text())
    assert ma["weight_average"] == 0.8 and mp["weight_average"] == 0.0
    va = [e["validation"]["score"] for e in ma["epochs"]]
    vp = [e["validation"]["score"] for e in mp["epochs"]]
    assert va != vp  # validation scored the average, not the (identical) live weights


def _losses(run: Path) -> list[dict[str, str]]:
    with open(run / "losses.csv") as fh:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(fh)]


def test_resume_mid_epoch_keeps_the_average_bit_exact(prepared_small: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    from mrsynth.models.supervised import GeneratorsSupervised
    from mrsynth.train.trainer import train

    cfg = _config(**{"train.ema": 0.9, "train.epochs": 3, "train.max_steps_per_epoch": 5})
    straight, split = straight_and_resumed(monkeypatch, GeneratorsSupervised, cfg,
                                           prepared_small, tmp_path)
    wa, wb = (load_file(r / "checkpoints/latest/weights.safetensors") for r in (straight, split))
    assert any(k.startswith(PREFIX) for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a config edited to turn the average on for a run trained without one is refused
    plain = tmp_path / "plain"
    with one_torch_thread():
        train(_config(**{"train.epochs": 1}), prepared_small, plain)
    doc = json.loads((plain / "config.json").read_text())
    doc["config"]["train"]["ema"] = 0.9
    doc["config"]["train"]["epochs"] = 2
    (plain / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="weight average"):
        train(None, None, plain, resume=True)
