"""UNIT (Liu, Breuel and Kautz 2017) as the study built it.

Per-domain encoders (c7 64, stride-2 c3 to 128 and 256, LeakyReLU 0.01, 3 residual blocks),
a shared residual block whose output is the latent code (Gaussian noise with sigma 1 is added
while training), a shared residual block on the decoder side, per-domain decoders (3 residual
blocks, stride-2 transposed c3 to 128 and 64, a 1x1 transposed conv to one channel, tanh)
and 3-scale discriminators (the image, and average-pooled by 2 and 4; each c3 stride-2
64-128-256-512 with LeakyReLU 0.01 and a 1x1 conv to one logit map). Losses: GAN (BCE) x10,
KL x0.1 (mean of the squared latent mean, on the codes of the images and of their
translations), within-domain and cycle reconstruction L1 x100. In 2.5-D
(``arch.context_slices`` = k) the encoders take the 2k + 1 neighbouring slices; the
decoders and discriminators still see one slice, and the cycle re-encodes a translated
slice repeated in every channel (:meth:`TranslationModel.flat_stack`).

Departures from the study's Keras port, on purpose:

* Instance norm (learnable affine) where the port used batch norm in training mode at all
  times, which made its outputs depend on the batch and vary between runs.
* Inference is deterministic by default: no latent noise and no dropout in ``eval()`` mode.
  The port kept both on at test time; ``generator(direction, stochastic=True)`` (``mrsynth
  translate/evaluate --stochastic``) does the same, so every call draws a new output.
  Dropout 0.5 in the residual blocks stays on while training.
* The discriminators output logits and use ``BCEWithLogits`` (numerically the port's sigmoid
  + BCE, but stable under mixed precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrsynth.models.base import (
    StepContext,
    TranslationModel,
    check_direction,
    gan_loss,
    l1,
    register_model,
    set_requires_grad,
)
from mrsynth.models.blocks import ResidualBlock, init_weights, pad_to_multiple


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


class UnitEncoder(nn.Module):
    """Image (or 2.5-D stack of ``in_channels`` slices) -> feature map at 1/4 resolution with
    ``4 * nef`` channels."""

    def __init__(self, nef: int, n_blocks: int, norm: str, dropout: float,
                 in_channels: int = 1) -> None:
        super().__init__()
        c = 4 * nef
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, nef, 7, padding=3),
            _lrelu(),
            nn.Conv2d(nef, 2 * nef, 3, stride=2, padding=1),
            _lrelu(),
            nn.Conv2d(2 * nef, c, 3, stride=2, padding=1),
            _lrelu(),
            *[ResidualBlock(c, norm, dropout=dropout) for _ in range(n_blocks)],
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class UnitDecoder(nn.Module):
    """Feature map at 1/4 resolution -> image (tanh)."""

    def __init__(self, nef: int, n_blocks: int, norm: str, dropout: float) -> None:
        super().__init__()
        c = 4 * nef
        self.model = nn.Sequential(
            *[ResidualBlock(c, norm, dropout=dropout) for _ in range(n_blocks)],
            nn.ConvTranspose2d(c, 2 * nef, 3, stride=2, padding=1, output_padding=1),
            _lrelu(),
            nn.ConvTranspose2d(2 * nef, nef, 3, stride=2, padding=1, output_padding=1),
            _lrelu(),
            nn.ConvTranspose2d(nef, 1, 1),
            nn.Tanh(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class MultiScaleDiscriminator(nn.Module):
    """The same small discriminator applied to the image and its 2x, 4x average pools.

    No normalisation, as in the study (each scale has its own weights).
    """

    def __init__(self, ndf: int, n_layers: int, n_scales: int) -> None:
        super().__init__()

        def one() -> nn.Sequential:
            layers: list[nn.Module] = []
            ch = 1
            for i in range(n_layers):
                nxt = ndf * 2**i
                layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), _lrelu()]
                ch = nxt
            layers.append(nn.Conv2d(ch, 1, 1))
            return nn.Sequential(*layers)

        self.scales = nn.ModuleList(one() for _ in range(n_scales))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 2)
            outs.append(d(x))
        return outs


@contextlib.contextmanager
def dropout_on(module: nn.Module) -> Iterator[None]:
    """Dropout layers of ``module`` in training mode for the block, then as they were.

    Only the dropout layers change (norm layers keep their mode), and the modes are restored,
    so translators sharing these modules are unaffected after the call.
    """
    drops = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    modes = [m.training for m in drops]
    for m in drops:
        m.train(True)
    try:
        yield
    finally:
        for m, mode in zip(drops, modes, strict=True):
            m.train(mode)


class UnitTranslator(nn.Module):
    """Encoder of the source domain -> shared blocks -> decoder of the target domain.

    Built on demand around the model's own modules (it shares their parameters), so it can be
    exported or run on its own. Deterministic unless ``stochastic``: then Gaussian noise of
    ``noise_std`` is added to the latent code and dropout is on, as in training and as the
    study's Keras port translated (whatever the module's train/eval mode).
    """

    def __init__(
        self, encoder: nn.Module, shared_enc: nn.Module, shared_dec: nn.Module, decoder: nn.Module,
        noise_std: float = 0.0, stochastic: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.shared_enc = shared_enc
        self.shared_dec = shared_dec
        self.decoder = decoder
        self.noise_std = float(noise_std)
        self.stochastic = bool(stochastic)

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = pad_to_multiple(x, 4)
        if not self.stochastic:
            mu = self.shared_enc(self.encoder(x))
            return self.decoder(self.shared_dec(mu))[..., :h, :w]
        with dropout_on(self):
            z = self.shared_enc(self.encoder(x))
            if self.noise_std > 0:
                z = z + self.noise_std * torch.randn_like(z)
            return self.decoder(self.shared_dec(z))[..., :h, :w]


@register_model
class UNIT(TranslationModel):
    """UNIT with a shared latent space; see the module docstring for the study's settings."""

    name = "unit"
    needs_paired = False
    summary = "UNIT, unpaired: shared latent (VAE-GAN), GAN x10, KL x0.1, L1 x100 (the study)"
    order = 30
    stochastic_inference = True

    @classmethod
    def preset_config(cls, preset: str) -> dict[str, dict[str, Any]]:
        arch = {
            "paper": {"nef": 64, "enc_blocks": 3, "dec_blocks": 3, "ndf": 64, "d_layers": 4,
                      "d_scales": 3, "norm": "instance", "dropout": 0.5, "noise_std": 1.0,
                      "init": "normal", "context_slices": 0},
            "cpu-small": {"nef": 16, "enc_blocks": 1, "dec_blocks": 1, "ndf": 16, "d_layers": 3,
                          "d_scales": 3, "norm": "instance", "dropout": 0.5, "noise_std": 1.0,
                          "init": "normal", "context_slices": 0},
        }[preset]
        train = {
            "paper": {"epochs": 100, "lr_decay": "none"},
            "cpu-small": {"epochs": 10, "lr_decay": "none"},
        }[preset]
        return {
            "arch": arch,
            "loss": {"gan": 10.0, "kl": 0.1, "recon": 100.0, "cycle": 100.0, "cycle_kl": 0.1},
            "optim": {"lr": 1e-4, "beta1": 0.5, "beta2": 0.999, "weight_decay": 0.0},
            "train": train,
        }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        a = self.arch
        nef, norm, drop = a["nef"], a["norm"], float(a["dropout"])
        self.enc_A = UnitEncoder(nef, a["enc_blocks"], norm, drop, self.in_channels)
        self.enc_B = UnitEncoder(nef, a["enc_blocks"], norm, drop, self.in_channels)
        self.enc_shared = ResidualBlock(4 * nef, norm, dropout=drop)
        self.dec_shared = ResidualBlock(4 * nef, norm, dropout=drop)
        self.dec_A = UnitDecoder(nef, a["dec_blocks"], norm, drop)
        self.dec_B = UnitDecoder(nef, a["dec_blocks"], norm, drop)
        self.D_A = MultiScaleDiscriminator(a["ndf"], a["d_layers"], a["d_scales"])
        self.D_B = MultiScaleDiscriminator(a["ndf"], a["d_layers"], a["d_scales"])
        init_weights(self, a["init"])

    def generator(self, direction: str, stochastic: bool = False) -> nn.Module:
        std = float(self.arch["noise_std"])
        if check_direction(direction) == "A2B":
            return UnitTranslator(self.enc_A, self.enc_shared, self.dec_shared, self.dec_B,
                                  std, stochastic)
        return UnitTranslator(self.enc_B, self.enc_shared, self.dec_shared, self.dec_A,
                              std, stochastic)

    def networks(self) -> dict[str, nn.Module]:
        """The parts, preceded by the whole A->B translator (what inference runs)."""
        nets = super().networks()
        return {"translator A2B": self.generator("A2B"), **nets}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        gen = [self.enc_A, self.enc_B, self.enc_shared, self.dec_shared, self.dec_A, self.dec_B]
        return {
            "G": self.adam([p for m in gen for p in m.parameters()]),
            "D": self.adam([*self.D_A.parameters(), *self.D_B.parameters()]),
        }

    def _encode(self, enc: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean and the (noisy while training) code that is decoded."""
        mu = self.enc_shared(enc(x))
        std = float(self.arch["noise_std"])
        z = mu + std * torch.randn_like(mu) if self.training and std > 0 else mu
        return mu, self.dec_shared(z)

    def train_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        # The two stride-2 stages need sides divisible by 4; pad with background as the
        # inference path does, so every loss compares tensors of one shape.
        real_A = pad_to_multiple(batch["A"], 4)[0]
        real_B = pad_to_multiple(batch["B"], 4)[0]
        # the encoders' inputs: the slices, or in 2.5-D their stacks of neighbours
        in_A = pad_to_multiple(self.source(batch, "A"), 4)[0]
        in_B = pad_to_multiple(self.source(batch, "B"), 4)[0]
        w = self.loss_cfg

        def adv(outs: list[Tensor], real: bool) -> Tensor:
            return torch.stack([gan_loss(o, real, "vanilla") for o in outs]).sum()

        # Discriminators first, on the current translations (as the study did).
        with ctx.autocast(), torch.no_grad():
            _, h_A = self._encode(self.enc_A, in_A)
            _, h_B = self._encode(self.enc_B, in_B)
            fake_B = self.dec_B(h_A)
            fake_A = self.dec_A(h_B)
        with ctx.autocast():
            loss_D_A = adv(self.D_A(real_A), True) + adv(self.D_A(fake_A), False)
            loss_D_B = adv(self.D_B(real_B), True) + adv(self.D_B(fake_B), False)
            loss_D = w["gan"] * (loss_D_A + loss_D_B)
        ctx.step("D", loss_D)

        set_requires_grad((self.D_A, self.D_B), False)
        with ctx.autocast():
            mu_A, h_A = self._encode(self.enc_A, in_A)
            mu_B, h_B = self._encode(self.enc_B, in_B)
            rec_A, fake_B = self.dec_A(h_A), self.dec_B(h_A)
            rec_B, fake_A = self.dec_B(h_B), self.dec_A(h_B)
            mu_BA, h_BA = self._encode(self.enc_A, self.flat_stack(fake_A))
            mu_AB, h_AB = self._encode(self.enc_B, self.flat_stack(fake_B))
            cyc_A = self.dec_A(h_AB)
            cyc_B = self.dec_B(h_BA)
            kl = mu_A.float().pow(2).mean() + mu_B.float().pow(2).mean()
            kl_cyc = mu_AB.float().pow(2).mean() + mu_BA.float().pow(2).mean()
            recon = l1(rec_A, real_A) + l1(rec_B, real_B)
            cycle = l1(cyc_A, real_A) + l1(cyc_B, real_B)
            g_adv = adv(self.D_A(fake_A), True) + adv(self.D_B(fake_B), True)
            loss_G = (w["gan"] * g_adv + w["kl"] * kl + w["cycle_kl"] * kl_cyc
                      + w["recon"] * recon + w["cycle"] * cycle)
        ctx.step("G", loss_G)
        set_requires_grad((self.D_A, self.D_B), True)
        losses = {"G": loss_G, "G_adv": g_adv, "kl": kl, "kl_cycle": kl_cyc, "recon": recon,
                  "cycle": cycle, "D": loss_D, "D_A": loss_D_A, "D_B": loss_D_B}
        return {k: v.detach().float() for k, v in losses.items()}
