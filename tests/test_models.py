"""The six models: construction, shapes at the paper preset, pinned sizes, registry, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mrsynth.cli import main
from mrsynth.errors import ConfigError
from mrsynth.models import build_model, get_model_class, model_names
from mrsynth.models.base import StepContext
from mrsynth.models.blocks import ImagePool, count_conv_layers, count_parameters
from mrsynth.train.commands import model_table
from mrsynth.train.config import resolve_config

MODELS = ["cyclegan", "cyclegan_s", "unit", "generators_s", "simple", "pix2pix"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------- hand formulas
def conv(cin: int, cout: int, k: int) -> int:
    """Weights + bias of a k x k convolution (bias kept, as in the study's Keras code)."""
    return cin * cout * k * k + cout


def inorm(c: int) -> int:
    return 2 * c  # learnable scale and shift


def res(c: int) -> int:
    return 2 * conv(c, c, 3) + 2 * inorm(c)


def resnet_generator(ngf: int = 32, blocks: int = 9) -> int:
    return (conv(1, ngf, 7) + inorm(ngf) + conv(ngf, 2 * ngf, 3) + inorm(2 * ngf)
            + conv(2 * ngf, 4 * ngf, 3) + inorm(4 * ngf) + blocks * res(4 * ngf)
            + conv(4 * ngf, 2 * ngf, 3) + inorm(2 * ngf) + conv(2 * ngf, ngf, 3) + inorm(ngf)
            + conv(ngf, 1, 7))


def patchgan(cin: int = 1) -> int:
    return (conv(cin, 64, 4) + conv(64, 128, 4) + inorm(128) + conv(128, 256, 4) + inorm(256)
            + conv(256, 512, 4) + inorm(512) + conv(512, 1, 4))


def unit_parts() -> dict[str, int]:
    enc = conv(1, 64, 7) + conv(64, 128, 3) + conv(128, 256, 3) + 3 * res(256)
    dec = 3 * res(256) + conv(256, 128, 3) + conv(128, 64, 3) + conv(64, 1, 1)
    disc = 3 * (conv(1, 64, 3) + conv(64, 128, 3) + conv(128, 256, 3) + conv(256, 512, 3)
                + conv(512, 1, 1))
    return {"enc_A": enc, "enc_B": enc, "enc_shared": res(256), "dec_shared": res(256),
            "dec_A": dec, "dec_B": dec, "D_A": disc, "D_B": disc,
            "translator A2B": enc + 2 * res(256) + dec}


def expected_parameters(model: str) -> dict[str, int]:
    g, d = resnet_generator(), patchgan()
    if model in ("cyclegan", "cyclegan_s"):
        return {"G_A2B": g, "G_B2A": g, "D_A": d, "D_B": d}
    if model == "generators_s":
        return {"G_A2B": g, "G_B2A": g}
    if model == "pix2pix":
        return {"G_A2B": g, "G_B2A": g, "D_A2B": patchgan(2), "D_B2A": patchgan(2)}
    if model == "simple":
        s = conv(1, 256, 1) + conv(256, 1, 5)
        return {"G_A2B": s, "G_B2A": s}
    return unit_parts()


@pytest.fixture(scope="module")
def paper_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {m: build_model(resolve_config(m, "paper")).eval() for m in MODELS}


def test_registry_lists_the_six_models_in_the_study_order() -> None:
    assert model_names() == MODELS
    with pytest.raises(ConfigError, match="Available models: cyclegan, cyclegan_s"):
        get_model_class("cyclegann")


@pytest.mark.parametrize("model", MODELS)
def test_parameter_counts_match_hand_formulas(model: str, paper_models) -> None:
    nets = paper_models[model].networks()
    got = {name: count_parameters(net) for name, net in nets.items()}
    print(model, got)
    assert got == expected_parameters(model)


def test_pinned_sizes_and_generator_depth(paper_models) -> None:
    cg = paper_models["cyclegan"]
    # Pinned after checking by hand: 1,600 + 18,496 + 73,856 (down) + 9 x 295,680 (blocks)
    # + 73,792 + 18,464 (up) + 1,569 (out) + 1,152 instance-norm affines = 2,849,537.
    assert count_parameters(cg.G_A2B) == 2_849_537
    assert count_parameters(cg.D_A) == 2_764_481
    assert count_conv_layers(cg.G_A2B) == 24  # the study's "24 convolutional layers"
    assert count_conv_layers(cg.D_A) == 5
    assert count_conv_layers(paper_models["generators_s"].G_B2A) == 24
    assert count_conv_layers(paper_models["pix2pix"].G_A2B) == 24
    assert count_conv_layers(paper_models["simple"].G_A2B) == 2
    # UNIT translator: encoder 3 + 3 blocks, shared enc/dec blocks, decoder 3 blocks + 3.
    assert count_conv_layers(paper_models["unit"].generator("A2B")) == 22


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", [(256, 256), (304, 256)])
@torch.inference_mode()
def test_forward_shapes_at_paper_preset(model: str, size: tuple[int, int], paper_models) -> None:
    m = paper_models[model]
    x = torch.rand(1, 1, *size) * 2 - 1
    direction = "A2B" if size == (256, 256) else "B2A"
    y = m.generator(direction)(x)
    assert y.shape == (1, 1, *size)
    assert torch.isfinite(y).all()
    if model != "simple":  # tanh output
        assert y.abs().max() <= 1
    if model in ("cyclegan", "cyclegan_s") and size == (304, 256):
        # 70x70 PatchGAN with Keras 'same' padding: 304x256 -> 38x32 patch scores.
        assert m.D_A(x).shape == (1, 1, 38, 32)
    if model == "pix2pix" and size == (304, 256):
        assert m.D_A2B(torch.cat((x, y), 1)).shape == (1, 1, 38, 32)
    if model == "unit" and size == (304, 256):
        assert [o.shape[-2:] for o in m.D_A(x)] == [(19, 16), (10, 8), (5, 4)]


def test_generators_accept_sizes_that_are_not_multiples_of_four() -> None:
    cfg = resolve_config("cyclegan", "cpu-small", {"arch.ngf": 4, "arch.n_blocks": 1})
    g = build_model(cfg).eval().generator("A2B")
    ucfg = resolve_config("unit", "cpu-small", {"arch.nef": 4})
    u = build_model(ucfg).eval().generator("B2A")
    x = torch.rand(2, 1, 37, 50) * 2 - 1
    with torch.no_grad():
        assert g(x).shape == x.shape
        assert u(x).shape == x.shape



@pytest.mark.parametrize("model", ["cyclegan", "unit", "generators_s", "pix2pix"])
def test_training_steps_accept_sizes_that_are_not_multiples_of_four(model: str) -> None:
    """A prepared --size like 30x42 must train, not only translate (UNIT pads internally)."""
    torch.manual_seed(0)
    small_d = {} if model == "generators_s" else {"arch.ndf": 4}
    m = build_model(resolve_config(model, "cpu-small", small_d))
    opts = m.build_optimizers()
    batch = {"A": torch.rand(1, 1, 30, 42) * 2 - 1, "B": torch.rand(1, 1, 30, 42) * 2 - 1}
    losses = m.train_step(batch, StepContext(opts))
    assert losses and all(torch.isfinite(v).all() for v in losses.values())

def test_unit_translation_is_deterministic_in_eval_and_noisy_in_training() -> None:
    torch.manual_seed(0)
    m = build_model(resolve_config("unit", "cpu-small", {"arch.nef": 4, "arch.ndf": 4}))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        m.eval()
        a, b = m.translate(x, "A2B"), m.translate(x, "A2B")
        assert torch.equal(a, b)
        m.train()
        c = m.generator("A2B")(x)
        _, h = m._encode(m.enc_A, x)  # training: noise on the latent, dropout on
        d = m.dec_B(h)
    assert not torch.equal(c, a)
    assert not torch.equal(c, d)


def test_init_is_normal_002() -> None:
    torch.manual_seed(0)
    m = build_model(resolve_config("cyclegan", "paper"))
    w = torch.cat([blk.weight.flatten() for blk in m.G_A2B.modules()
                   if isinstance(blk, torch.nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)


def test_image_pool_fills_then_swaps_half_the_time() -> None:
    pool = ImagePool(4, seed=0)
    first = [torch.full((1, 1, 2, 2), float(i)) for i in range(4)]
    for img in first:  # filling phase: returns what it stores
        assert torch.equal(pool.query(img), img)
    returned_old = 0
    for i in range(4, 404):
        out = pool.query(torch.full((1, 1, 2, 2), float(i)))
        returned_old += int(out[0, 0, 0, 0].item() != i)
    assert 150 < returned_old < 250  # about 50 % swaps
    # Round trip of the pool state reproduces the same future decisions.
    state = pool.state_dict()
    clone = ImagePool(1)
    clone.load_state_dict(state, "cpu")
    x = torch.full((3, 1, 2, 2), -5.0)
    assert torch.equal(pool.query(x), clone.query(x))


def test_models_cli_lists_parameters_and_conv_layers(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == MODELS
    assert rows["cyclegan"]["networks"]["G_A2B"] == {"parameters": 2_849_537, "conv_layers": 24}
    assert rows["simple"]["paired"] and not rows["unit"]["paired"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "2,849,537" in out and "cyclegan_s" in out
    small = {r["model"]: r for r in model_table("cpu-small")}
    assert small["cyclegan"]["networks"]["G_A2B"]["parameters"] == resnet_generator(16, 3)
