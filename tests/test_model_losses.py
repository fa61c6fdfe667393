"""Every model's losses recomputed by hand from its networks' outputs for one fixed batch.

For each model (and with ``--set loss.*`` overrides) one training step runs on two real
slices; a copy of the networks taken before the step then recomputes, with plain tensor
arithmetic and the weights written out here (not read from the config), every loss the step
returns and the loss each optimiser was stepped with: CycleGAN's cycle x10, the supervised
MAE weights (cyclegan_s x10, generators_s and simple x1, pix2pix L1 x100), discriminator
losses halved, LSGAN targets 1 for real and 0 for fake, UNIT's GAN x10, KL x0.1 and
reconstruction/cycle x100. An ignored or wrong weight changes a total and fails here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import tiny_arch
from mrsynth.models import build_model
from mrsynth.models.base import StepContext
from mrsynth.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class RecordingContext(StepContext):
    """A plain fp32 step context that remembers the loss each optimiser was stepped with."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        super().__init__(optimizers)
        self.stepped: dict[str, Tensor] = {}

    def step(self, name: str, loss: Tensor) -> None:
        self.stepped[name] = loss.detach().clone()
        super().step(name, loss)


# ------------------------------------------------------------------ the losses, by hand
def mae(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().mean()


def edges(a: Tensor, b: Tensor) -> Tensor:
    """Gradient difference: MAE of the row differences plus MAE of the column differences."""
    return ((torch.diff(a, dim=-2) - torch.diff(b, dim=-2)).abs().mean()
            + (torch.diff(a, dim=-1) - torch.diff(b, dim=-1)).abs().mean())


def lsgan(scores: Tensor, target: float) -> Tensor:
    return ((scores - target) ** 2).mean()


def bce_logits(logits: Tensor, target: float) -> Tensor:
    """Binary cross-entropy on logits: -log sigmoid(x) for real, -log(1 - sigmoid(x)) fake."""
    return F.softplus(-logits).mean() if target == 1.0 else F.softplus(logits).mean()


def hand_cyclegan(snap: Any, after: Any, A: Tensor, B: Tensor, w: dict[str, float]):
    fake_B, fake_A = snap.G_A2B(A), snap.G_B2A(B)
    rec_A, rec_B = snap.G_B2A(fake_B), snap.G_A2B(fake_A)
    out = {
        "G_adv_A2B": lsgan(snap.D_B(fake_B), 1.0),
        "G_adv_B2A": lsgan(snap.D_A(fake_A), 1.0),
        "cycle": mae(rec_A, A) + mae(rec_B, B),
    }
    G = out["G_adv_A2B"] + out["G_adv_B2A"] + w["cycle"] * out["cycle"]
    if w["identity"] > 0:
        out["identity"] = mae(snap.G_A2B(B), B) + mae(snap.G_B2A(A), A)
        G = G + w["identity"] * out["identity"]
    if w["supervised"] > 0:
        out["supervised"] = mae(fake_B, B) + mae(fake_A, A)
        G = G + w["supervised"] * out["supervised"]
    if w.get("gradient", 0.0) > 0:
        out["gradient"] = edges(fake_B, B) + edges(fake_A, A)
        G = G + w["gradient"] * out["gradient"]
    # The discriminators see the step's synthetic images (the pool is not full yet) and are
    # still the weights from before the step: D = 0.5 * (real -> 1, fake -> 0).
    out["D_A"] = 0.5 * (lsgan(snap.D_A(A), 1.0) + lsgan(snap.D_A(fake_A), 0.0))
    out["D_B"] = 0.5 * (lsgan(snap.D_B(B), 1.0) + lsgan(snap.D_B(fake_B), 0.0))
    out["G"] = G
    return out, {"G": G, "D": out["D_A"] + out["D_B"]}


def hand_pix2pix(snap: Any, after: Any, A: Tensor, B: Tensor, w: dict[str, Any]):
    gan = lsgan if w["gan_mode"] == "lsgan" else bce_logits
    fake_B, fake_A = snap.G_A2B(A), snap.G_B2A(B)
    out = {
        "G_adv": gan(snap.D_A2B(torch.cat((A, fake_B), 1)), 1.0)
        + gan(snap.D_B2A(torch.cat((B, fake_A), 1)), 1.0),
        "mae_A2B": mae(fake_B, B),
        "mae_B2A": mae(fake_A, A),
    }
    out["G"] = out["G_adv"] + w["l1"] * (out["mae_A2B"] + out["mae_B2A"])
    if w.get("gradient", 0.0) > 0:
        out["gradient"] = edges(fake_B, B) + edges(fake_A, A)
        out["G"] = out["G"] + w["gradient"] * out["gradient"]
    out["D_A2B"] = 0.5 * (gan(snap.D_A2B(torch.cat((A, B), 1)), 1.0)
                          + gan(snap.D_A2B(torch.cat((A, fake_B), 1)), 0.0))
    out["D_B2A"] = 0.5 * (gan(snap.D_B2A(torch.cat((B, A), 1)), 1.0)
                          + gan(snap.D_B2A(torch.cat((B, fake_A), 1)), 0.0))
    return out, {"G": out["G"], "D": out["D_A2B"] + out["D_B2A"]}


def hand_paired_l1(snap: Any, after: Any, A: Tensor, B: Tensor, w: dict[str, float]):
    fake_B, fake_A = snap.G_A2B(A), snap.G_B2A(B)
    out = {"mae_A2B": mae(fake_B, B), "mae_B2A": mae(fake_A, A)}
    out["G"] = w["l1"] * (out["mae_A2B"] + out["mae_B2A"])
    if w.get("gradient", 0.0) > 0:
        out["gradient"] = edges(fake_B, B) + edges(fake_A, A)
        out["G"] = out["G"] + w["gradient"] * out["gradient"]
    return out, {"G": out["G"]}


def hand_unit(snap: Any, after: Any, A: Tensor, B: Tensor, w: dict[str, float], seed: int):
    """The step replayed: same seed, so the same latent noise (sigma 1) in the same order."""
    std = 1.0

    def code(enc: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = snap.enc_shared(enc(x))
        return mu, snap.dec_shared(mu + std * torch.randn_like(mu))

    def scores(d: Any, x: Tensor, target: float) -> Tensor:
        return sum(bce_logits(s, target) for s in d(x))  # 3 scales, summed

    torch.manual_seed(seed)
    # 1) discriminators (weights before the step) on the translations of the current G
    _, h_A = code(snap.enc_A, A)
    _, h_B = code(snap.enc_B, B)
    fake_B, fake_A = snap.dec_B(h_A), snap.dec_A(h_B)
    D_A = scores(snap.D_A, A, 1.0) + scores(snap.D_A, fake_A, 0.0)
    D_B = scores(snap.D_B, B, 1.0) + scores(snap.D_B, fake_B, 0.0)
    D = w["gan"] * (D_A + D_B)
    # 2) generators (weights before the step) against the updated discriminators
    mu_A, h_A = code(snap.enc_A, A)
    mu_B, h_B = code(snap.enc_B, B)
    rec_A, fake_B = snap.dec_A(h_A), snap.dec_B(h_A)
    rec_B, fake_A = snap.dec_B(h_B), snap.dec_A(h_B)
    mu_BA, h_BA = code(snap.enc_A, fake_A)
    mu_AB, h_AB = code(snap.enc_B, fake_B)
    out = {
        "kl": mu_A.pow(2).mean() + mu_B.pow(2).mean(),
        "kl_cycle": mu_AB.pow(2).mean() + mu_BA.pow(2).mean(),
        "recon": mae(rec_A, A) + mae(rec_B, B),
        "cycle": mae(snap.dec_A(h_AB), A) + mae(snap.dec_B(h_BA), B),
        "G_adv": scores(after.D_A, fake_A, 1.0) + scores(after.D_B, fake_B, 1.0),
        "D_A": D_A, "D_B": D_B, "D": D,
    }
    out["G"] = (w["gan"] * out["G_adv"] + w["kl"] * out["kl"] + w["cycle_kl"] * out["kl_cycle"]
                + w["recon"] * out["recon"] + w["cycle"] * out["cycle"])
    return out, {"D": D, "G": out["G"]}


# ------------------------------------------------------------------ the cases
CYCLE = {"cycle": 10.0, "identity": 0.0, "supervised": 0.0}
UNIT = {"gan": 10.0, "kl": 0.1, "cycle_kl": 0.1, "recon": 100.0, "cycle": 100.0}
#: (model, --set overrides, the weights the step must use). The first case of each model
#: holds the study's (and pix2pix's) published weights; the others prove overrides apply.
CASES = [
    ("cyclegan", [], CYCLE),
    ("cyclegan", ["loss.cycle=3", "loss.identity=0.5"], {**CYCLE, "cycle": 3.0,
                                                         "identity": 0.5}),
    ("cyclegan", ["arch.discriminator=study2018"], CYCLE),  # LSGAN on sigmoid scores
    # cpu-small adds the gradient-difference term to the paired models (x5 the L1 weight)
    ("cyclegan_s", [], {**CYCLE, "supervised": 10.0, "gradient": 50.0}),
    ("cyclegan_s", ["loss.supervised=2.5", "loss.cycle=0", "loss.gradient=0"],
     {**CYCLE, "cycle": 0.0, "supervised": 2.5}),
    ("cyclegan", ["loss.supervised=1", "loss.gradient=3"], {**CYCLE, "supervised": 1.0,
                                                            "gradient": 3.0}),
    ("generators_s", [], {"l1": 1.0, "gradient": 5.0}),
    ("generators_s", ["loss.l1=4", "loss.gradient=0.5"], {"l1": 4.0, "gradient": 0.5}),
    ("generators_s", ["loss.gradient=0"], {"l1": 1.0}),
    ("simple", [], {"l1": 1.0, "gradient": 5.0}),
    ("simple", ["loss.l1=0.25", "loss.gradient=2"], {"l1": 0.25, "gradient": 2.0}),
    ("simple", ["loss.gradient=0"], {"l1": 1.0}),
    ("pix2pix", [], {"l1": 100.0, "gan_mode": "vanilla", "gradient": 500.0}),
    ("pix2pix", ["loss.l1=7", "loss.gan_mode=lsgan", "loss.gradient=0"],
     {"l1": 7.0, "gan_mode": "lsgan"}),
    ("unit", [], UNIT),
    ("unit", ["loss.gan=2", "loss.kl=0.5", "loss.cycle_kl=0.3", "loss.recon=20",
              "loss.cycle=30"], {"gan": 2.0, "kl": 0.5, "cycle_kl": 0.3, "recon": 20.0,
                                 "cycle": 30.0}),
]
HAND = {"cyclegan": hand_cyclegan, "cyclegan_s": hand_cyclegan, "pix2pix": hand_pix2pix,
        "generators_s": hand_paired_l1, "simple": hand_paired_l1, "unit": hand_unit}


@pytest.fixture(scope="module")
def batch(paired_train_slices) -> tuple[Tensor, Tensor]:
    """Two real paired training slices (T1w as A, T2w as B), 32x32."""
    a, b = paired_train_slices
    return a[3:5].clone(), b[3:5].clone()


@pytest.mark.parametrize(("model", "overrides", "weights"), CASES,
                         ids=[f"{m}-{'+'.join(o) or 'preset'}" for m, o, _ in CASES])
def test_losses_match_a_hand_computation(model, overrides, weights, batch) -> None:
    A, B = batch
    over = [f"{k}={v}" for k, v in tiny_arch(model).items()] + list(overrides)
    if model == "unit":
        over.append("arch.dropout=0")  # keep the latent noise, which the replay redraws
    torch.manual_seed(0)
    m = build_model(resolve_config(model, "cpu-small", over)).train()
    snap = copy.deepcopy(m)  # the networks as the step finds them
    ctx = RecordingContext(m.build_optimizers())
    torch.manual_seed(1234)
    got = m.train_step({"A": A, "B": B}, ctx)
    with torch.no_grad():
        if model == "unit":
            want, stepped = hand_unit(snap, m, A, B, weights, seed=1234)
        else:
            want, stepped = HAND[model](snap, m, A, B, weights)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert set(ctx.stepped) == set(stepped)
    for name, value in stepped.items():
        torch.testing.assert_close(ctx.stepped[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_study2018_scores_are_sigmoids_under_the_least_squares_loss(batch) -> None:
    """With the 2018 discriminator the LSGAN targets apply to scores in (0, 1)."""
    A, _ = batch
    over = [f"{k}={v}" for k, v in tiny_arch("cyclegan").items()]
    torch.manual_seed(0)
    m = build_model(resolve_config("cyclegan", "cpu-small",
                                   [*over, "arch.discriminator=study2018"]))
    with torch.no_grad():
        s = m.D_A(A)
    assert ((s > 0) & (s < 1)).all()
    # The generator's adversarial term for these scores is mean((s - 1)^2) < 1.
    assert lsgan(s, 1.0) < 1


@pytest.mark.parametrize("model", ["generators_s", "simple"])
def test_through_plane_loss_matches_a_hand_computation(model, batch) -> None:
    """``loss.through_plane`` (2.5-D paired L1 models): the step adds w x the mean absolute
    difference between the synthetic and the real change to each row's next slice, both
    directions, each next slice translated from its own stack."""
    A, B = batch
    k = 1
    over = [f"{key}={v}" for key, v in tiny_arch(model).items()] + [
        f"arch.context_slices={k}", "loss.gradient=0", "loss.through_plane=0.7"]
    torch.manual_seed(0)
    m = build_model(resolve_config(model, "cpu-small", over)).train()
    assert m.wants_next_slice
    snap = copy.deepcopy(m)
    g = torch.Generator().manual_seed(5)
    stack = {key: torch.randn(2, 2 * k + 1, *A.shape[-2:], generator=g) for key in "AB"}
    nxt = {key: torch.randn(2, 1, *A.shape[-2:], generator=g) for key in "AB"}
    nxt_stack = {key: torch.randn(2, 2 * k + 1, *A.shape[-2:], generator=g) for key in "AB"}
    batch5 = {"A": A, "B": B, "A_stack": stack["A"], "B_stack": stack["B"],
              "A_next": nxt["A"], "B_next": nxt["B"],
              "A_next_stack": nxt_stack["A"], "B_next_stack": nxt_stack["B"]}
    ctx = RecordingContext(m.build_optimizers())
    got = m.train_step(batch5, ctx)
    with torch.no_grad():
        fb, fa = snap.G_A2B(stack["A"]), snap.G_B2A(stack["B"])
        nb, na = snap.G_A2B(nxt_stack["A"]), snap.G_B2A(nxt_stack["B"])
        tp = mae(nb - fb, nxt["B"] - B) + mae(na - fa, nxt["A"] - A)
        want_G = mae(fb, B) + mae(fa, A) + 0.7 * tp
    torch.testing.assert_close(got["through_plane"], tp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.stepped["G"], want_G, rtol=1e-5, atol=1e-6)
    # off by default, and refused without neighbours
    assert not build_model(resolve_config(model, "cpu-small", over[:-1])).wants_next_slice
    from mrsynth.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the neighbouring slices"):
        resolve_config(model, "cpu-small", ["loss.through_plane=1"])


def test_gradient_loss_is_refused_without_a_paired_target_and_off_in_paper() -> None:
    """``loss.gradient`` compares edges with the aligned target: refused for the unpaired
    CycleGAN (without ``loss.supervised``) and negative weights; the ``paper`` preset keeps
    the study's losses, and configs stored before the term resume without it."""
    from mrsynth.errors import ConfigError
    from mrsynth.train.config import default_config, upgrade_config

    with pytest.raises(ConfigError, match="needs a paired model"):
        resolve_config("cyclegan", "cpu-small", ["loss.gradient=1"])
    with pytest.raises(ConfigError, match="loss.gradient must be a number >= 0"):
        resolve_config("generators_s", "cpu-small", ["loss.gradient=-1"])
    for model in ("cyclegan_s", "generators_s", "pix2pix", "simple"):
        assert default_config(model, "paper")["loss"]["gradient"] == 0.0
    old = resolve_config("generators_s", "cpu-small")
    del old["loss"]["gradient"]
    assert upgrade_config(old)["loss"]["gradient"] == 0.0
    assert upgrade_config(resolve_config("generators_s", "cpu-small"))["loss"]["gradient"] == 5
