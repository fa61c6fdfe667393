"""Building blocks shared by the models: ResNet and U-Net generators, PatchGAN, init, pool.

The layer choices follow the study's Keras code (simontomaskarlsson/GAN-MRI): convolutions
keep their bias (Keras' default) even before instance norm, instance norm has a learnable
affine, and the discriminators pad like Keras' ``padding='same'`` so a 304x256 slice gives a
38x32 patch map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Normalisation by name; instance norm (per image) is the default of every model here.

    Instance norm keeps no running statistics, so train and eval mode compute the same thing
    and batch size or DistributedDataParallel sharding never change the result.
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True, eps=1e-5)
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (instance, batch, none)")


#: ``arch.init``: how every model's weights start (see :func:`init_weights`).
INITS = ("normal", "glorot")


def init_weights(module: nn.Module, kind: str = "normal", std: float = 0.02) -> None:
    """Initialise conv weights, zero their biases and set the norm affines.

    ``normal``: N(0, std) weights and norm scales N(1, std), the init of the CycleGAN and
    pix2pix reference code (Zhu et al.), not of the study. ``glorot``: Glorot (Xavier)
    uniform weights, U(+-sqrt(6 / (fan_in + fan_out))), and norm scales 1: Keras' defaults,
    which is what the study's Keras code ran with (its UNIT file's N(0, 0.02) was applied
    to layers already built, so most likely never took effect). See docs/models.md.
    """
    if kind not in INITS:
        raise ValueError(f"unknown init {kind!r} ({', '.join(INITS)})")
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            if kind == "glorot":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d | nn.BatchNorm2d) and m.affine:
            if kind == "glorot":
                nn.init.ones_(m.weight)
            else:
                nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_conv_layers(module: nn.Module) -> int:
    """Convolution layers (transposed included): how the study counted generator depth."""
    return sum(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in module.modules())


def pad_to_multiple(x: Tensor, multiple: int, value: float = -1.0) -> tuple[Tensor, int, int]:
    """Pad bottom/right with background (-1) so strided encoders and decoders round-trip.

    Returns the padded tensor and the original height and width for cropping back.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, h, w


class ResidualBlock(nn.Module):
    """conv3-norm-act-conv3-norm (+ optional dropout) with an additive skip."""

    def __init__(
        self,
        channels: int,
        norm: str = "instance",
        act: nn.Module | None = None,
        dropout: float = 0.0,
        pad: str = "zeros",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode=pad),
            norm_layer(norm, channels),
            act if act is not None else nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode=pad),
            norm_layer(norm, channels),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


#: ``arch.upsample`` of the ResNet generators: transposed convolutions (the study's
#: default) or resize convolutions.
UPSAMPLING = ("transpose", "resize")


class ResnetGenerator(nn.Module):
    """The study's CycleGAN generator (24 conv layers with 9 blocks).

    reflect-pad 3, c7 ngf, two stride-2 c3 (2ngf, 4ngf), ``n_blocks`` residual blocks at 4ngf,
    two stride-2 transposed c3 (2ngf, ngf), reflect-pad 3, c7 to ``out_channels``, tanh.
    Inputs whose sides are not multiples of 4 are padded with background and cropped back.

    ``upsample="resize"`` replaces each transposed convolution by nearest-neighbour
    upsampling and a reflect-padded c3 ("resize convolution", the study's code's
    ``use_resize_convolution``, off there by default): a stride-2 transposed 3x3
    convolution covers output pixels unevenly, which leaves a checkerboard.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 32,
        n_blocks: int = 9,
        norm: str = "instance",
        upsample: str = "transpose",
    ) -> None:
        super().__init__()

        def down(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), norm_layer(norm, cout),
                    nn.ReLU(inplace=True)]

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [*_upsampling(cin, cout, upsample), norm_layer(norm, cout),
                    nn.ReLU(inplace=True)]

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
            *down(ngf, 2 * ngf),
            *down(2 * ngf, 4 * ngf),
            *[ResidualBlock(4 * ngf, norm) for _ in range(n_blocks)],
            *up(4 * ngf, 2 * ngf),
            *up(2 * ngf, ngf),
            nn.ReflectionPad2d(3),
            nn.Conv2d(ngf, out_channels, 7),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = pad_to_multiple(x, 4)
        return self.model(x)[..., :h, :w]


def _upsampling(cin: int, cout: int, upsample: str) -> list[nn.Module]:
    """Double the resolution: a transposed 3x3 convolution at stride 2 or a resize convolution
    (nearest-neighbour upsampling, then a reflect-padded 3x3 convolution)."""
    if upsample not in UPSAMPLING:
        raise ValueError(f"unknown upsample {upsample!r} ({', '.join(UPSAMPLING)})")
    if upsample == "resize":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                nn.Conv2d(cin, cout, 3)]
    return [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)]


#: ``arch.generator`` of the ResNet-generator models: the study's ResNet or a U-Net.
GENERATORS = ("resnet", "unet")


class IntensityBranch(nn.Module):
    """A per-voxel function of the raw input: one hidden layer of ``hidden`` 1x1 units with
    ReLUs, no normalisation, ``out_channels`` outputs that :class:`UnetGenerator` adds to
    its output layer's pre-activation.

    It keeps its own init, which :func:`init_weights` leaves alone (its weights are plain
    parameters, not ``Conv2d`` layers): Glorot-uniform hidden weights with biases that put
    each hinge (where its ReLU turns on) at a point drawn uniformly from the data's range
    [-1, 1], so the hidden units span every intensity, and a zero output layer, so a new
    generator computes what it would without the branch and the branch grows from the
    first step at Adam's rate.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int = 1) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, in_channels, 1, 1))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.zeros(out_channels, hidden, 1, 1))
        self.b2 = nn.Parameter(torch.zeros(out_channels))
        nn.init.xavier_uniform_(self.w1)
        with torch.no_grad():
            kinks = torch.empty(hidden).uniform_(-1.0, 1.0)
            self.b1.copy_(-self.w1.sum(dim=(1, 2, 3)) * kinks)

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.relu(F.conv2d(x, self.w1, self.b1)), self.w2, self.b2)


class UnetGenerator(nn.Module):
    """A U-Net with the ResNet generator's two stride-2 stages and residual bottleneck.

    Encoder: two reflect-padded c3-norm-ReLU layers at ``ngf`` (full resolution), then per
    level a stride-2 c3 and a c3 (2ngf, 4ngf); ``n_blocks`` residual blocks at 4ngf; decoder:
    per level an upsampling c3 (``upsample``), concatenation with the encoder's features of
    that resolution and a c3 fusing them; the ResNet's output layer (reflect-padded c7 to
    ``out_channels``, tanh). A 1x1 output layer learned the background level slowly: with
    Adam's step bounded per weight, an output fed by 16 weights moves 49 times slower than
    one fed by 16 x 49.

    ``intensity_channels`` > 0 adds an intensity branch (:class:`IntensityBranch`): a
    per-voxel MLP of the raw input with that many hidden units and no normalisation, added
    to the output layer's pre-activation, so the output is tanh(spatial U-Net + f(voxel)).
    Every other path goes through instance norms, which keep only each slice's relative
    intensities (the network gives the same output for a*x + b, a > 0); the branch sees the
    absolute normalised intensity, from which a per-voxel contrast map (what the
    lookup-table baseline and ``simple`` learn) is one small function.

    Why: the ResNet generator must carry every full-resolution detail through its 1/4
    resolution bottleneck, and at a few thousand steps it has not learned to, so its output
    is blurred (docs/models.md). The skip connections hand the full-resolution features to
    the decoder directly, which is why pix2pix (Isola et al. 2017) and most supervised MR
    synthesis networks use a U-Net. Inputs whose sides are not multiples of 4 are padded
    with background and cropped back.
    """

    levels = 2

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 32,
        n_blocks: int = 9,
        norm: str = "instance",
        upsample: str = "resize",
        intensity_channels: int = 0,
    ) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, stride=stride),
                    norm_layer(norm, cout), nn.ReLU(inplace=True)]

        ch = [ngf * 2**i for i in range(self.levels + 1)]
        self.inc = nn.Sequential(*conv(in_channels, ch[0]), *conv(ch[0], ch[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(*conv(ch[i], ch[i + 1], 2), *conv(ch[i + 1], ch[i + 1]))
            for i in range(self.levels))
        self.bottleneck = nn.Sequential(*[ResidualBlock(ch[-1], norm) for _ in range(n_blocks)])
        self.ups = nn.ModuleList(
            nn.Sequential(*_upsampling(ch[i + 1], ch[i], upsample), norm_layer(norm, ch[i]),
                          nn.ReLU(inplace=True))
            for i in reversed(range(self.levels)))
        self.fuse = nn.ModuleList(nn.Sequential(*conv(2 * ch[i], ch[i]))
                                  for i in reversed(range(self.levels)))
        n = intensity_channels
        self.intensity = IntensityBranch(in_channels, n, out_channels) if n > 0 else None
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ch[0], out_channels, 7))

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = pad_to_multiple(x, 2**self.levels)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = self.bottleneck(skips.pop())
        for up, fuse in zip(self.ups, self.fuse, strict=True):
            y = fuse(torch.cat([up(y), skips.pop()], dim=1))
        y = self.out(y)
        if self.intensity is not None:
            y = y + self.intensity(x)
        return torch.tanh(y)[..., :h, :w]


def build_generator(arch: dict[str, Any], in_channels: int) -> nn.Module:
    """The generator ``arch`` names (``arch.generator``, default the study's ResNet)."""
    if arch.get("generator", "resnet") == "unet":
        return UnetGenerator(in_channels, 1, arch["ngf"], arch["n_blocks"], arch["norm"],
                             arch.get("upsample", "transpose"),
                             arch.get("intensity_channels", 0))
    return ResnetGenerator(in_channels, 1, arch["ngf"], arch["n_blocks"], arch["norm"],
                           arch.get("upsample", "transpose"))


class SamePad(nn.Module):
    """Zero padding like Keras ``padding='same'`` for a k x k kernel at stride 1.

    For even kernels the extra pixel goes bottom/right, as TensorFlow does.
    """

    def __init__(self, kernel: int) -> None:
        super().__init__()
        total = kernel - 1
        self.pad = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad)


#: ``arch.discriminator`` of the CycleGAN family: today's PatchGAN or the study's 2018 one.
DISCRIMINATORS = ("patchgan", "study2018")


class PatchDiscriminator(nn.Module):
    """PatchGAN: C64(no norm)-C128-C256-C512, 4x4 kernels, LeakyReLU 0.2, then a 4x4 conv to 1.

    ``n_layers`` is the number of stride-2 layers before the C512 layer. ``last_stride`` is
    the C512 layer's stride: 1 gives the 70x70 PatchGAN (strides 2,2,2,1; 38x32 scores on
    304x256), 2 the discriminator of the study's code at the paper's time (June 2018: strides
    2,2,2,2, receptive field 94, 19x16 scores). Stride-1 layers pad like Keras ``'same'``.
    ``sigmoid`` squashes the scores into (0, 1) as that 2018 code did before its
    least-squares loss; without it the output is a logit or an LSGAN score.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        last_stride: int = 1,
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = ndf
        for i in range(1, n_layers):
            nxt = ndf * min(2**i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), norm_layer(norm, nxt),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch = nxt
        nxt = ndf * min(2**n_layers, 8)
        if last_stride == 1:
            layers += [SamePad(4), nn.Conv2d(ch, nxt, 4)]
        elif last_stride == 2:
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1)]
        else:
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        layers += [
            norm_layer(norm, nxt),
            nn.LeakyReLU(0.2, inplace=True),
            SamePad(4), nn.Conv2d(nxt, 1, 4),
        ]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def make_discriminator(kind: str, in_channels: int, ndf: int, n_layers: int,
                       norm: str) -> PatchDiscriminator:
    """The discriminator named by ``arch.discriminator`` (see :data:`DISCRIMINATORS`)."""
    if kind == "patchgan":
        return PatchDiscriminator(in_channels, ndf, n_layers, norm)
    if kind == "study2018":
        return PatchDiscriminator(in_channels, ndf, n_layers, norm, last_stride=2, sigmoid=True)
    raise ValueError(f"unknown discriminator {kind!r} ({', '.join(DISCRIMINATORS)})")


class ImagePool:
    """History of generated images fed to the discriminator (Shrivastava et al. 2017).

    Until the pool is full each new image is stored and returned; afterwards, with
    probability 1/2 a random stored image is returned and replaced by the new one. The
    decisions are drawn on the CPU from the pool's own generator, so the pool never forces a
    device synchronisation and its randomness is saved and restored with a checkpoint. Each
    DistributedDataParallel rank keeps its own pool.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = int(size)
        self.count = 0
        self.buffer: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: Tensor) -> Tensor:
        """The images to show the discriminator: ``images`` with some swapped for older ones.

        The pool stores float32 whatever the step's precision, so a run can resume with
        another ``--precision``; the result has the dtype and the strides of ``images`` (a
        compiled discriminator then sees one input layout before and after the pool fills).
        """
        images = images.detach()
        if self.size <= 0:
            return images
        if self.buffer is None:
            self.buffer = torch.empty(
                (self.size, *images.shape[1:]), dtype=torch.float32, device=images.device
            )
        out = torch.empty_like(images)
        for i in range(images.shape[0]):
            img = images[i : i + 1]
            if self.count < self.size:
                self.buffer[self.count : self.count + 1].copy_(img)
                self.count += 1
                out[i : i + 1].copy_(img)
                continue
            swap = torch.rand((), generator=self.generator).item() < 0.5
            if swap:
                j = int(torch.randint(self.size, (), generator=self.generator).item())
                out[i : i + 1].copy_(self.buffer[j : j + 1])
                self.buffer[j : j + 1].copy_(img)
            else:
                out[i : i + 1].copy_(img)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "count": self.count,
            "buffer": None if self.buffer is None else self.buffer[: self.count].cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        self.size = int(state["size"])
        self.count = int(state["count"])
        buf = state["buffer"]
        if buf is None:
            self.buffer = None
        else:
            self.buffer = torch.empty((self.size, *buf.shape[1:]), dtype=torch.float32,
                                      device=device)
            self.buffer[: self.count].copy_(buf.to(device))
        self.generator.set_state(state["generator"])
