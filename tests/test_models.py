"""The models: registry, construction, shapes at the paper preset, pinned sizes, options, CLI.

Tests that every model must pass are parametrised over the registry (``model_names()``), with
the one per-model override table ``helpers.TINY_ARCH``: a new model file is tested without
touching this file. Hand-counted sizes and the study's specifics are named per model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from helpers import tiny_arch
from mrsynth.cli import main
from mrsynth.errors import ConfigError
from mrsynth.models import build_model, get_model_class, model_names
from mrsynth.models.base import StepContext
from mrsynth.models.blocks import ImagePool, count_conv_layers, count_parameters
from mrsynth.train.commands import model_table
from mrsynth.train.config import resolve_config, upgrade_config, valid_keys

MODELS = model_names()
#: The study's five models and pix2pix, in the study's order (the registry lists them first).
STUDY_ORDER = ["cyclegan", "cyclegan_s", "unit", "generators_s", "simple", "pix2pix"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny(model: str, **extra) -> nn.Module:
    """``model`` at ``cpu-small`` shrunk by the override table, seeded."""
    torch.manual_seed(0)
    return build_model(resolve_config(model, "cpu-small", {**tiny_arch(model), **extra}))


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


#: Parameter counts at the paper preset, counted by hand (per network).
HAND_COUNTS = {
    "cyclegan": lambda: {"G_A2B": resnet_generator(), "G_B2A": resnet_generator(),
                         "D_A": patchgan(), "D_B": patchgan()},
    "cyclegan_s": lambda: HAND_COUNTS["cyclegan"](),
    "generators_s": lambda: {"G_A2B": resnet_generator(), "G_B2A": resnet_generator()},
    "pix2pix": lambda: {"G_A2B": resnet_generator(), "G_B2A": resnet_generator(),
                        "D_A2B": patchgan(2), "D_B2A": patchgan(2)},
    # 1x1 conv 1->256, 1x1 conv 256->1 (the default output kernel, as in the study's code)
    "simple": lambda: {"G_A2B": conv(1, 256, 1) + conv(256, 1, 1),
                       "G_B2A": conv(1, 256, 1) + conv(256, 1, 1)},
    "unit": unit_parts,
}


@pytest.fixture(scope="module")
def paper_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {m: build_model(resolve_config(m, "paper")).eval() for m in MODELS}


# --------------------------------------------------------------------- registry
def test_registry_lists_the_study_models_in_the_study_order() -> None:
    assert set(STUDY_ORDER) <= set(MODELS)
    assert [m for m in MODELS if m in STUDY_ORDER] == STUDY_ORDER
    with pytest.raises(ConfigError, match="Available models: cyclegan, cyclegan_s"):
        get_model_class("cyclegann")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_declares_itself_and_its_settings(model: str) -> None:
    cls = get_model_class(model)
    assert cls.name == model and cls.summary
    for preset in ("paper", "cpu-small"):
        keys = valid_keys(model, preset)
        assert "arch.init" in keys  # every model offers arch.init=glorot|normal
        assert any(k.startswith("loss.") for k in keys)
        assert any(k.startswith("optim.") for k in keys)
    m = tiny(model)
    nets = m.networks()
    assert nets and all(count_parameters(n) > 0 for n in nets.values())
    assert set(m.build_optimizers()) >= {"G"}


@pytest.mark.parametrize("model", sorted(HAND_COUNTS))
def test_parameter_counts_match_hand_formulas(model: str, paper_models) -> None:
    nets = paper_models[model].networks()
    got = {name: count_parameters(net) for name, net in nets.items()}
    print(model, got)
    assert got == HAND_COUNTS[model]()


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


def ends_in_tanh(net: nn.Module) -> bool:
    return isinstance(list(net.modules())[-1], nn.Tanh)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", [(256, 256), (304, 256)])
@torch.inference_mode()
def test_forward_shapes_at_paper_preset(model: str, size: tuple[int, int], paper_models) -> None:
    m = paper_models[model]
    x = torch.rand(1, 1, *size) * 2 - 1
    direction = "A2B" if size == (256, 256) else "B2A"
    gen = m.generator(direction)
    y = gen(x)
    assert y.shape == (1, 1, *size)
    assert torch.isfinite(y).all()
    if ends_in_tanh(gen):
        assert y.abs().max() <= 1
    assert ends_in_tanh(gen) == (model != "simple") or model not in STUDY_ORDER
    if model in ("cyclegan", "cyclegan_s") and size == (304, 256):
        # 70x70 PatchGAN with Keras 'same' padding: 304x256 -> 38x32 patch scores.
        assert m.D_A(x).shape == (1, 1, 38, 32)
    if model == "pix2pix" and size == (304, 256):
        assert m.D_A2B(torch.cat((x, y), 1)).shape == (1, 1, 38, 32)
    if model == "unit" and size == (304, 256):
        assert [o.shape[-2:] for o in m.D_A(x)] == [(19, 16), (10, 8), (5, 4)]


@pytest.mark.parametrize("model", MODELS)
def test_generators_accept_sizes_that_are_not_multiples_of_four(model: str) -> None:
    m = tiny(model).eval()
    x = torch.rand(2, 1, 37, 50) * 2 - 1
    with torch.no_grad():
        for d in ("A2B", "B2A"):
            assert m.generator(d)(x).shape == x.shape


@pytest.mark.parametrize("model", MODELS)
def test_training_steps_accept_sizes_that_are_not_multiples_of_four(model: str) -> None:
    """A prepared --size like 30x42 must train, not only translate (UNIT pads internally)."""
    m = tiny(model)
    opts = m.build_optimizers()
    batch = {"A": torch.rand(1, 1, 30, 42) * 2 - 1, "B": torch.rand(1, 1, 30, 42) * 2 - 1}
    losses = m.train_step(batch, StepContext(opts))
    assert losses and all(torch.isfinite(v).all() for v in losses.values())
    assert all(not v.requires_grad for v in losses.values())


# --------------------------------------------------------------------- CycleGAN discriminators
def receptive_field(d: nn.Module, size: tuple[int, int], at: tuple[int, int]) -> tuple[int, int]:
    """Height and width of the input pixels one output score depends on (gradient support)."""
    x = torch.randn(1, 1, *size, dtype=torch.float64, requires_grad=True)
    d(x)[0, 0, at[0], at[1]].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(0)).flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


@pytest.mark.parametrize("model", ["cyclegan", "cyclegan_s"])
def test_study2018_discriminator_receptive_field_shape_and_sigmoid(model: str) -> None:
    """The study's June-2018 discriminator: strides 2,2,2,2 (94 px), 19x16 sigmoid scores.

    Instance norm makes every score depend on the whole image through its statistics, so the
    architectural receptive field is measured without normalisation.
    """
    torch.manual_seed(0)
    cfg = resolve_config(model, "paper", ["arch.discriminator=study2018", "arch.norm=none"])
    d18 = build_model(cfg).D_A.double()
    torch.manual_seed(0)
    dpg = build_model(resolve_config(model, "paper", ["arch.norm=none"])).D_A.double()
    # Scores in the middle of the map see a window that padding does not cut.
    assert receptive_field(d18, (304, 256), (9, 8)) == (94, 94)
    assert receptive_field(dpg, (304, 256), (19, 16)) == (70, 70)

    torch.manual_seed(0)
    d = build_model(resolve_config(model, "paper", ["arch.discriminator=study2018"])).D_A
    with torch.no_grad():
        x = torch.rand(2, 1, 304, 256) * 2 - 1
        s = d(x)
    assert s.shape == (2, 1, 19, 16)
    assert ((s > 0) & (s < 1)).all()  # the sigmoid the 2018 code put before its MSE
    assert count_conv_layers(d) == 5


def test_discriminator_setting_is_checked() -> None:
    assert resolve_config("cyclegan")["arch"]["discriminator"] == "patchgan"  # the default
    with pytest.raises(ConfigError, match="arch.discriminator must be one of patchgan"):
        resolve_config("cyclegan", "paper", ["arch.discriminator=study2019"])
    with pytest.raises(ConfigError, match="needs loss.gan_mode=lsgan"):
        resolve_config("cyclegan_s", "paper",
                       ["arch.discriminator=study2018", "loss.gan_mode=vanilla"])
    # pix2pix's discriminator judges pairs with BCE on logits: the option is not offered.
    assert "arch.discriminator" not in valid_keys("pix2pix")


# --------------------------------------------------------------------- Simple
def test_simple_is_a_per_pixel_map_by_default_and_5x5_on_request() -> None:
    """Changing one input pixel changes only that output pixel (1x1), or a 5x5 block (5x5)."""
    x = torch.rand(1, 1, 24, 24) * 2 - 1
    x2 = x.clone()
    x2[0, 0, 10, 13] += 0.5
    support = {}
    for k in (1, 5):
        m = tiny("simple", **{"arch.out_kernel": k}).eval()
        net = m.generator("A2B")
        with torch.no_grad():
            changed = (net(x2) - net(x)).abs()[0, 0] > 0
        rows, cols = torch.nonzero(changed, as_tuple=True)
        support[k] = (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))
    assert support[1] == (10, 10, 13, 13)
    assert support[5] == (8, 12, 11, 15)
    assert resolve_config("simple")["arch"]["out_kernel"] == 1
    with pytest.raises(ConfigError, match="arch.out_kernel must be an odd integer"):
        resolve_config("simple", "paper", ["arch.out_kernel=4"])


def test_simple_runs_stored_with_the_old_kernel_setting_still_load() -> None:
    """Runs written before ``arch.out_kernel`` stored ``arch.kernel`` (5 by default then)."""
    old = resolve_config("simple", "cpu-small")
    old["arch"] = {"hidden": 256, "kernel": 5}  # no out_kernel, no init
    cfg = upgrade_config(old)
    assert cfg["arch"] == {"hidden": 256, "out_kernel": 5, "init": "normal", "context_slices": 0}
    assert count_parameters(build_model(cfg).G_A2B) == conv(1, 256, 1) + conv(256, 1, 5)


# --------------------------------------------------------------------- UNIT inference
def test_unit_translation_is_deterministic_in_eval_and_noisy_in_training() -> None:
    m = tiny("unit")
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


def test_unit_stochastic_inference_samples_and_leaves_the_model_deterministic() -> None:
    m = tiny("unit").eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        det = [m.translate(x, "A2B") for _ in range(2)]
        sto = [m.translate(x, "A2B", stochastic=True) for _ in range(2)]
        after = m.translate(x, "A2B")
    assert torch.equal(det[0], det[1])
    assert not torch.equal(sto[0], sto[1])
    assert not torch.equal(sto[0], det[0])
    assert torch.equal(after, det[0])  # dropout switched back off
    assert all(not mod.training for mod in m.modules())
    # With no noise and no dropout there is nothing to sample: stochastic == deterministic.
    q = tiny("unit", **{"arch.noise_std": 0.0, "arch.dropout": 0.0}).eval()
    with torch.no_grad():
        assert torch.equal(q.translate(x, "B2A", stochastic=True), q.translate(x, "B2A"))
    # Only the noise: samples still differ.
    n = tiny("unit", **{"arch.dropout": 0.0}).eval()
    with torch.no_grad():
        assert not torch.equal(n.translate(x, "B2A", stochastic=True),
                               n.translate(x, "B2A", stochastic=True))
    assert get_model_class("unit").stochastic_inference
    assert not get_model_class("cyclegan").stochastic_inference


def test_stochastic_translate_and_evaluate_through_a_trained_run(
    tmp_path_factory, prepared_small, tmp_path
) -> None:
    """``LoadedRun.translate`` and ``mrsynth evaluate --stochastic`` on a tiny trained UNIT."""
    import numpy as np

    from mrsynth.data.prepared import load_prepared
    from mrsynth.train.runs import load_run
    from test_eval_fixtures import tiny_run

    rd = tiny_run(tmp_path_factory, prepared_small, "unit")
    run = load_run(rd)
    data = load_prepared(prepared_small)
    x = torch.from_numpy(data.images["T1w"][np.flatnonzero(data.split == "test")[:2]])[:, None]
    assert torch.equal(run.translate(x, "A2B"), run.translate(x, "A2B"))
    assert not torch.equal(run.translate(x, "A2B", stochastic=True),
                           run.translate(x, "A2B", stochastic=True))
    run.stochastic = True  # what translate/evaluate --stochastic set
    assert not torch.equal(run.translate(x, "A2B"), run.translate(x, "A2B"))

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["evaluate", "--runs", str(rd), "--data", str(prepared_small), "--out",
                     str(out), "--device", "cpu", "--c2st-steps", "2", "--stochastic"]) == 0
        manifest = json.loads((out / "eval.json").read_text())
        assert [r["stochastic"] for r in manifest["runs"]] == [True]
        outs.append(sorted((out / "synthetic" / "unit").glob("*.npy")))
    # Stochastic, but the samples are drawn from --seed: the same seed gives the same images.
    assert outs[0] and all(np.array_equal(np.load(p), np.load(q))
                           for p, q in zip(*outs, strict=True))


# --------------------------------------------------------------------- weight init
def conv_layers(m: nn.Module) -> list[nn.Module]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d | nn.ConvTranspose2d)]


@pytest.mark.parametrize("model", MODELS)
def test_glorot_init_is_keras_glorot_uniform(model: str) -> None:
    """U(+-sqrt(6 / (fan_in + fan_out))) per layer, fan = channels x kernel area (Keras)."""
    torch.manual_seed(0)
    m = build_model(resolve_config(model, "cpu-small", ["arch.init=glorot"]))
    scaled = []
    for c in conv_layers(m):
        w = c.weight.detach().double()
        area = w.shape[2] * w.shape[3]
        fan_sum = (w.shape[0] + w.shape[1]) * area  # symmetric: same for transposed convs
        bound = math.sqrt(6.0 / fan_sum)
        assert w.abs().max() <= bound
        scaled.append((w / bound).flatten())
        assert c.bias is None or not c.bias.any()
    for n in m.modules():
        if isinstance(n, nn.InstanceNorm2d | nn.BatchNorm2d) and n.affine:
            assert torch.equal(n.weight, torch.ones_like(n.weight)) and not n.bias.any()
    # Every layer scaled by its bound is U(-1, 1): variance 1/3 (here >= 1,000 samples).
    u = torch.cat(scaled)
    assert u.numel() >= 1000
    assert u.var().item() == pytest.approx(1 / 3, rel=0.1)


def test_glorot_init_variance_on_a_large_layer_and_normal_std() -> None:
    torch.manual_seed(0)
    g = build_model(resolve_config("cyclegan", "paper", ["arch.init=glorot"]))
    w = g.G_A2B.model[10].body[0].weight.detach().double()  # a 128->128 3x3 residual conv
    assert w.shape == (128, 128, 3, 3)
    assert w.var().item() == pytest.approx(2.0 / (2 * 128 * 9), rel=0.02)

    torch.manual_seed(0)
    m = build_model(resolve_config("cyclegan", "paper"))  # default: N(0, 0.02)
    w = torch.cat([c.weight.flatten() for c in conv_layers(m.G_A2B)])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    with pytest.raises(ConfigError, match="arch.init must be one of normal, glorot"):
        resolve_config("unit", "paper", ["arch.init=he"])


# --------------------------------------------------------------------- pool, CLI
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
    assert all(rows[m]["paired"] == get_model_class(m).needs_paired for m in MODELS)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "2,849,537" in out and all(m in out for m in MODELS)
    small = {r["model"]: r for r in model_table("cpu-small")}
    assert small["cyclegan"]["networks"]["G_A2B"]["parameters"] == resnet_generator(16, 3)


def _up_path(gen: nn.Module) -> nn.Sequential:
    """The first upsampling step of a ResNet generator (before its norm)."""
    layers = list(gen.model)
    for i, m in enumerate(layers):
        if isinstance(m, nn.ConvTranspose2d):
            return nn.Sequential(m)
        if isinstance(m, nn.Upsample):
            return nn.Sequential(*layers[i:i + 3])
    raise AssertionError("no upsampling layer")


@pytest.mark.parametrize("model", ["cyclegan", "cyclegan_s", "pix2pix", "generators_s"])
def test_resize_convolution_upsamples_without_a_checkerboard(model: str) -> None:
    """``arch.upsample=resize`` (the study's ``use_resize_convolution``): every ResNet model
    upsamples by nearest neighbour + 3x3 convolution instead of a transposed convolution, with
    the same parameter count. On a constant feature map with constant weights the transposed
    convolution's output alternates with period 2 (its taps cover output pixels unevenly);
    the resize convolution's is constant away from the border."""
    from mrsynth.models.blocks import ResnetGenerator

    resnet = {"arch.generator": "resnet"}
    base = resolve_config(model, "cpu-small", {**resnet, "arch.upsample": "transpose"})
    resized = resolve_config(model, "cpu-small", {**resnet, "arch.upsample": "resize"})
    assert resolve_config(model, "paper")["arch"]["upsample"] == "transpose"  # the study's
    a, b = build_model(base), build_model(resized)
    assert count_parameters(a) == count_parameters(b)
    gens = [m for m in b.modules() if isinstance(m, ResnetGenerator)]
    assert gens and not any(isinstance(m, nn.ConvTranspose2d) for g in gens for m in g.modules())
    x = torch.ones(1, 64, 8, 8)  # 4 ngf channels into the first upsampling
    with torch.no_grad():
        for gen, periodic in ((ResnetGenerator(1, 1, 16, 1), True),
                              (ResnetGenerator(1, 1, 16, 1, upsample="resize"), False)):
            up = _up_path(gen)
            for m in up.modules():
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            y = up(x)[0, 0, 2:-2, 2:-2]
            assert y.shape == (12, 12)
            assert bool(y.max() - y.min() > 1.0) is periodic, y
        with pytest.raises(ConfigError, match="arch.upsample must be one of transpose, resize"):
            resolve_config(model, "cpu-small", {"arch.upsample": "bilinear"})


RESNET_MODELS = ["cyclegan", "cyclegan_s", "pix2pix", "generators_s"]


@pytest.mark.parametrize("model", RESNET_MODELS)
def test_unet_generator_is_an_option_of_every_resnet_model(model: str) -> None:
    """``arch.generator=unet`` swaps both generators for U-Nets (2.5-D channels included)
    that keep any slice size; ``paper`` keeps the study's ResNet; other names are refused."""
    from mrsynth.models.blocks import ResnetGenerator, UnetGenerator

    assert resolve_config(model, "paper")["arch"]["generator"] == "resnet"
    cfg = resolve_config(model, "cpu-small", {"arch.generator": "unet",
                                               "arch.context_slices": 1})
    net = build_model(cfg)
    gens = [net.G_A2B, net.G_B2A]
    assert all(isinstance(g, UnetGenerator) for g in gens)
    assert not any(isinstance(m, ResnetGenerator) for m in net.modules())
    x = torch.rand(2, 3, 37, 50) * 2 - 1  # sides not multiples of 4
    with torch.no_grad():
        y = gens[0](x)
    assert y.shape == (2, 1, 37, 50) and float(y.abs().max()) <= 1.0
    with pytest.raises(ConfigError, match="arch.generator must be one of resnet, unet"):
        resolve_config(model, "cpu-small", {"arch.generator": "vnet"})


@pytest.mark.parametrize("upsample", ["resize", "transpose"])
def test_unet_hands_full_resolution_detail_past_its_bottleneck(upsample: str) -> None:
    """The reason for the U-Net: with everything below full resolution cut off (the last
    upsampling's output zeroed), a one-pixel change of the input still changes the output at
    that pixel, and only within the 13 x 13 window of the convolutions of the full-resolution
    path (two 3 x 3 in, one 3 x 3 fusing, the 7 x 7 output layer). Without norm layers:
    instance norm would spread a tiny change everywhere through its image statistics."""
    from mrsynth.models.blocks import UnetGenerator, init_weights

    torch.manual_seed(0)
    gen = UnetGenerator(1, 1, 8, 1, norm="none", upsample=upsample).eval()
    init_weights(gen, "glorot")
    gen.ups[-1].register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    x2 = x.clone()
    x2[0, 0, 16, 16] += 0.5
    with torch.no_grad():
        diff = (gen(x2) - gen(x))[0, 0].abs()
    changed = (diff > 1e-7).nonzero()
    assert diff[16, 16] > 1e-4
    assert int((changed - 16).abs().max()) <= 6


def test_unet_learns_a_per_pixel_map_faster_than_the_resnet() -> None:
    """What the skips buy at a short budget: fitting a map of high-frequency detail (the
    negative of uniform noise), the U-Net's L1 after 100 Adam steps is under half the ResNet
    generator's, from the same init rule, widths and blocks."""
    from mrsynth.models.blocks import ResnetGenerator, UnetGenerator, init_weights

    x = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    final = {}
    for cls in (ResnetGenerator, UnetGenerator):
        torch.manual_seed(0)
        gen = cls(1, 1, 8, 1, "instance", "resize")
        init_weights(gen, "normal")
        opt = torch.optim.Adam(gen.parameters(), 2e-3)
        for _ in range(100):
            loss = (gen(x) + x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[cls.__name__] = float(loss.detach())
    assert final["UnetGenerator"] < 0.5 * final["ResnetGenerator"], final


@pytest.mark.parametrize("model", RESNET_MODELS)
def test_runs_stored_before_the_unet_load_with_the_resnet(model: str) -> None:
    """A stored config without ``arch.generator`` was trained with the ResNet, whatever the
    preset's default is now."""
    stored = resolve_config(model, "cpu-small")
    del stored["arch"]["generator"]
    assert upgrade_config(stored)["arch"]["generator"] == "resnet"
    stored["arch"]["generator"] = "unet"
    assert upgrade_config(stored)["arch"]["generator"] == "unet"


def test_unet_intensity_branch_sees_absolute_intensity() -> None:
    """``arch.intensity_channels``: every other path of the U-Net runs through instance
    norms, so without the branch two slices that differ by a gain and an offset (a > 0)
    give the same output; with it they do not, and fitting a per-voxel map of the absolute
    intensity (x ** 2 on one pattern at four offsets) ends at under half the error of the
    plain U-Net after the same Adam steps. The setting is refused for the ResNet generator
    and for negative or non-integer values, and kept by cyclegan_s, generators_s and pix2pix."""
    from mrsynth.models.blocks import UnetGenerator, init_weights

    x = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.8 - 0.4
    plain = UnetGenerator(1, 1, 8, 1, "instance", "resize").eval()
    branch = UnetGenerator(1, 1, 8, 1, "instance", "resize", intensity_channels=8).eval()
    init_weights(branch, "glorot")
    with torch.no_grad():
        assert torch.equal(branch.intensity(x), torch.zeros_like(x))  # starts as a no-op
        branch.intensity.w2.normal_()
        assert torch.allclose(plain(x), plain(1.7 * x + 0.3), atol=2e-3)  # eps aside
        assert float((branch(x) - branch(1.7 * x + 0.3)).abs().max()) > 1e-2

    base = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.3
    offset = torch.tensor([-0.6, -0.2, 0.2, 0.6]).view(4, 1, 1, 1)
    xs = base + offset  # the same pattern at four brightness levels
    target = xs**2 - 0.5  # inside tanh's range
    final = {}
    for n in (0, 8):
        torch.manual_seed(0)
        gen = UnetGenerator(1, 1, 8, 1, "instance", "resize", intensity_channels=n)
        init_weights(gen, "normal")
        opt = torch.optim.Adam(gen.parameters(), 2e-3)
        for _ in range(150):
            loss = (gen(xs) - target).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[n] = float(loss.detach())
    assert final[8] < 0.5 * final[0], final

    for model in ("cyclegan_s", "generators_s", "pix2pix"):
        cfg = resolve_config(model, "cpu-small", {"arch.generator": "unet",
                                                   "arch.intensity_channels": 4})
        net = build_model(cfg)
        assert net.G_A2B.intensity is not None and net.G_B2A.intensity.hidden == 4
    with pytest.raises(ConfigError, match="intensity_channels needs arch.generator=unet"):
        resolve_config("generators_s", "cpu-small", {"arch.generator": "resnet",
                                                     "arch.intensity_channels": 4})
    with pytest.raises(ConfigError, match="intensity_channels must be an integer"):
        resolve_config("generators_s", "cpu-small", {"arch.intensity_channels": -1})
