"""Training-time augmentation (:mod:`mrsynth.data.augment`): the maps against numpy, which
images each touches, the random stream, the config, and the trainer (a run that always flips
equals a run on mirrored data; resume stays bit-exact)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import one_torch_thread, straight_and_resumed, tiny_arch
from mrsynth.data.augment import Augmenter, apply_gamma, augment_batch
from mrsynth.errors import ConfigError
from mrsynth.train.config import resolve_config, upgrade_config


def _images(n: int, c: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, 6, 7, generator=g) * 2 - 1
    x[:, :, 0, 0], x[:, :, 0, 1] = -1.0, 1.0  # background and the brightest voxel
    return x


def test_gamma_equals_numpy_and_keeps_background_and_peak() -> None:
    x = _images(3)
    lg = torch.tensor([0.0, 0.4, -0.7])
    got = apply_gamma(x, lg).numpy()
    ref = np.stack([2 * ((x[i].numpy() + 1) / 2) ** np.exp(float(lg[i])) - 1 for i in range(3)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got[:, :, 0, 0], -1.0)
    np.testing.assert_allclose(got[:, :, 0, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(got[0], x[0].numpy(), atol=2e-6)  # ln g = 0: unchanged
    # gamma > 1 darkens mid-grey, < 1 brightens; the order of intensities is kept
    mid = torch.zeros(1, 1, 1, 1)
    assert apply_gamma(mid, torch.tensor([0.5])).item() < 0 < apply_gamma(
        mid, torch.tensor([-0.5])).item()
    flat = x[1].flatten()
    assert torch.equal(torch.argsort(flat), torch.argsort(torch.from_numpy(got[1]).flatten()))


def test_flip_moves_every_image_of_a_flagged_example_together() -> None:
    A, B = _images(4, seed=1), _images(4, seed=2)
    params = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    out = augment_batch({"A": A, "B": B}, params, flip=True, gamma=False)
    for i in range(4):
        for key, x in (("A", A), ("B", B)):
            want = x[i].numpy()[..., ::-1] if params[i, 0] else x[i].numpy()
            np.testing.assert_array_equal(out[key][i].numpy(), want)
    assert set(out) == {"A", "B"}  # no gamma: no separate generator inputs


def test_gamma_maps_only_the_generator_inputs() -> None:
    A, B = _images(2, seed=3), _images(2, seed=4)
    params = torch.tensor([[0, 0.3, -0.2], [1, -0.5, 0.6]], dtype=torch.float32)
    out = augment_batch({"A": A, "B": B}, params, flip=True, gamma=True)
    for key, col in (("A", 1), ("B", 2)):
        x = A if key == "A" else B
        flipped = torch.where(params[:, :1, None, None] > 0.5, x.flip(-1), x)
        assert torch.equal(out[key], flipped)  # the target: flipped, not gamma-mapped
        assert torch.allclose(out[key + "_source"], apply_gamma(flipped, params[:, col]))
    # 2.5-D: the stacks are inputs only and are mapped in place; the centre slice is a target
    stack = _images(2, c=3, seed=5)
    nxt = _images(2, c=3, seed=6)
    out = augment_batch({"A": A, "B": B, "A_stack": stack, "B_stack": stack,
                         "A_next_stack": nxt, "A_next": A}, params, flip=False, gamma=True)
    assert "A_source" not in out and "B_source" not in out
    assert torch.equal(out["A"], A) and torch.equal(out["A_next"], A)
    assert torch.allclose(out["A_stack"], apply_gamma(stack, params[:, 1]))
    assert torch.allclose(out["B_stack"], apply_gamma(stack, params[:, 2]))
    assert torch.allclose(out["A_next_stack"], apply_gamma(nxt, params[:, 1]))


def test_models_read_the_mapped_input() -> None:
    from mrsynth.models.base import build_model

    model = build_model(resolve_config("generators_s", "cpu-small", tiny_arch("generators_s")))
    A = _images(1)
    src = apply_gamma(A, torch.tensor([0.5]))
    assert model.source({"A": A, "A_source": src}, "A") is src
    assert model.source({"A": A}, "A") is A


def test_draws_follow_the_settings_and_the_stream_is_reproducible() -> None:
    aug = Augmenter(0.3, 0.25, seed=4)
    state = aug.get_state()
    p = aug.draw(400, 50)
    assert p.shape == (400, 50, 3) and p.dtype == torch.float32
    assert set(p[..., 0].unique().tolist()) == {0.0, 1.0}
    assert abs(p[..., 0].mean().item() - 0.3) < 0.01  # 20,000 flips: sd 0.003
    assert abs(p[..., 1:].std().item() - 0.25) < 0.005
    assert abs(p[..., 1:].mean().item()) < 0.005
    aug.set_state(state)
    assert torch.equal(aug.draw(400, 50), p)
    # the number of draws does not depend on the values: other settings, same later stream
    other = Augmenter(0.9, 0.0, seed=4)
    other.draw(400, 50)
    assert torch.equal(other.get_state(), aug.get_state())
    off = Augmenter(0.0, 0.0, seed=4).draw(10, 2)
    assert not off.any()
    for bad in ({"flip": -0.1, "gamma": 0}, {"flip": 1.5, "gamma": 0},
                {"flip": 0, "gamma": -1}, {"flip": 0, "gamma": 3}):
        with pytest.raises(ConfigError, match="augment"):
            Augmenter(bad["flip"], bad["gamma"], seed=0)


def test_config_checks_and_older_runs_load_without_augmentation() -> None:
    for key, bad in (("train.augment_flip", 1.2), ("train.augment_gamma", -0.1),
                     ("train.augment_gamma", 2.5)):
        with pytest.raises(ConfigError, match=key):
            resolve_config("generators_s", "cpu-small", {key: bad})
    for preset in ("paper", "cpu-small"):
        cfg = resolve_config("cyclegan", preset)
        stored = json.loads(json.dumps(cfg))
        del stored["train"]["augment_flip"], stored["train"]["augment_gamma"]
        up = upgrade_config(stored)
        assert (up["train"]["augment_flip"], up["train"]["augment_gamma"]) == (0.0, 0.0)
    assert resolve_config("generators_s", "paper")["train"]["augment_flip"] == 0.0


# --------------------------------------------------------------------------- in the trainer
def _mirrored_copy(src: Path, dest: Path) -> Path:
    """The prepared file with every image and mask mirrored left-right (checksums renewed)."""
    from mrsynth.data.prepared import array_checksums

    with np.load(src, allow_pickle=False) as z:
        files = {k: z[k] for k in z.files}
    for k in files:
        if k.startswith("image__") or k == "mask":
            files[k] = np.ascontiguousarray(files[k][..., ::-1])
    body = {k: v for k, v in files.items() if k != "checksums"}
    files["checksums"] = np.asarray(json.dumps(array_checksums(body), sort_keys=True))
    np.savez(dest, **files)
    return dest


def _config(model: str, **over):
    return resolve_config(model, "cpu-small", {
        "train.epochs": 1, "train.max_steps_per_epoch": 4, "train.batch_size": 2,
        "train.patch_size": None, "train.progress": False, "train.val_slices": 0,
        "train.checkpoint_every_minutes": 0, "train.num_threads": 1, "device": "cpu",
        "train.deterministic": True, **tiny_arch(model), **over})


@pytest.mark.parametrize("model", ["generators_s", "cyclegan"])
def test_always_flipping_equals_training_on_mirrored_slices(
        model: str, prepared_small: Path, tmp_path: Path) -> None:
    """augment_flip=1 must train exactly what a run without augmentation trains on the
    mirrored data set: the same rows, the same images, the same weights to the bit."""
    from mrsynth.train.trainer import train

    mirrored = _mirrored_copy(prepared_small, tmp_path / "mirrored.npz")
    with one_torch_thread():
        flipped = train(_config(model, **{"train.augment_flip": 1.0}), prepared_small,
                        tmp_path / "flipped")
        plain = train(_config(model), mirrored, tmp_path / "plain")
        unflipped = train(_config(model), prepared_small, tmp_path / "unflipped")
    wa, wb, wc = (load_file(r / "checkpoints/latest/weights.safetensors")
                  for r in (flipped, plain, unflipped))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the flip did change something
    assert json.loads((flipped / "config.json").read_text())["config"]["train"][
        "augment_flip"] == 1.0


def test_resume_mid_epoch_with_augmentation_is_bit_exact(prepared_small: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    """SIGTERM in epoch 2 of 3 with flips and gamma on (and patches): the resumed run draws
    the interrupted epoch's augmentation again from the checkpointed state."""
    from mrsynth.models.supervised import GeneratorsSupervised
    from mrsynth.train.trainer import train

    cfg = _config("generators_s", **{
        "train.epochs": 3, "train.max_steps_per_epoch": 5, "train.log_every": 2,
        "train.patch_size": 32, "train.augment_flip": 0.5, "train.augment_gamma": 0.3})
    straight, split = straight_and_resumed(monkeypatch, GeneratorsSupervised, cfg,
                                           prepared_small, tmp_path)
    with one_torch_thread():  # without augmentation the same seed trains other weights
        off = train({**cfg, "train": {**cfg["train"], "augment_flip": 0.0,
                                      "augment_gamma": 0.0}}, prepared_small, tmp_path / "off")
    wa, wb, wo = (load_file(r / "checkpoints/latest/weights.safetensors")
                  for r in (straight, split, off))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wo[k]) for k in wa)
