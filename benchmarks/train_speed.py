"""Training speed: a plain PyTorch loop against mrsynth's trainer step path, same networks.

For each model (``cyclegan``, ``unit``, ``generators_s`` by default) at the study's setting
(900 slices per domain, 304x256, batch 1, ``paper`` networks) it measures, in one process:

* ``baseline``: the loop a user would write — the same networks (imported from
  ``mrsynth.models``) and the same losses written out plainly below, eager fp32, a DataLoader
  over CPU tensors with ``.to(device)`` per step, ``torch.optim.Adam`` defaults, image pools
  with Python's ``random`` (as pytorch-CycleGAN-and-pix2pix does), losses read every 100 steps;
* ``mrsynth``: the trainer's step path (:mod:`mrsynth.train.step`: slices resident on the
  device, gathered by index; losses accumulated on the device) with the fastest options for
  the device (CUDA: bf16 autocast, channels_last, fused Adam, ``torch.compile`` with CUDA
  graphs);
* each fast-path feature alone on top of the trainer's eager fp32 path (the ablation table).

Timing: after ``--warmup`` iterations (which include compilation), ``--windows`` windows of
``--iters`` iterations are timed per variant, round-robin across variants so that load from
other processes hits them alike; the device is synchronised around each window. s/iteration is
the median window / iters, s/epoch = s/iteration x (images per domain / batch). Inference
slices/s per generator at batch 1 and 64, eager fp32 and fast.

    .venv/bin/python benchmarks/train_speed.py                     # CPU: reduced size
    .venv/bin/python benchmarks/train_speed.py --device cuda       # GPU: full study size
    .venv/bin/python benchmarks/train_speed.py --models cyclegan --iters 5 --out /tmp/x.json

Writes ``benchmarks/results/train_speed-<device>.json``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("cyclegan", "unit", "generators_s")
FEATURES = ("eager", "channels_last", "fused_adam", "bf16", "compile", "cudagraphs")
#: Targets of issue 5 (H100, study setting): s/epoch and speed-up over the plain loop.
TARGETS = {"cyclegan": 5.0, "unit": 10.0, "speedup": 3.0}
STUDY = {"size": (304, 256), "n_images": 900, "batch": 1}


# ---------------------------------------------------------------------------- data
def make_slices(n: int, size: tuple[int, int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` brain-like slice pairs in [-1, 1]: smooth random tissue inside a jittered
    ellipse (background -1), darker 'ventricles', and B a contrast-inverted map of A."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(-1, 1, h).view(1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, w)
    ry = 0.75 + 0.15 * torch.rand(n, 1, 1, generator=g)
    rx = 0.70 + 0.15 * torch.rand(n, 1, 1, generator=g)
    cy = 0.05 * torch.randn(n, 1, 1, generator=g)
    r = ((yy - cy) / ry) ** 2 + (xx / rx) ** 2
    brain = r < 1.0
    vent = ((yy - cy) / (0.25 * ry)) ** 2 + (xx / (0.12 * rx)) ** 2 < 1.0
    out_a = torch.empty(n, 1, h, w)
    out_b = torch.empty(n, 1, h, w)
    chunk = 64
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        coarse = torch.randn(m, 1, max(2, h // 16), max(2, w // 16), generator=g)
        fine = torch.randn(m, 1, max(2, h // 4), max(2, w // 4), generator=g)
        field = (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
                 + 0.3 * F.interpolate(fine, size=(h, w), mode="bilinear", align_corners=False))
        tissue = torch.tanh(0.5 * field)
        b_, v_ = brain[s : s + m, None], vent[s : s + m, None]
        a = torch.where(b_, 0.3 + 0.5 * tissue, -1.0)
        a = torch.where(v_ & b_, -0.6, a)
        bimg = torch.where(b_, -0.2 - 0.6 * tissue + 0.1 * tissue**2, -1.0)
        bimg = torch.where(v_ & b_, 0.9, bimg)
        out_a[s : s + m] = a.clamp(-1, 1)
        out_b[s : s + m] = bimg.clamp(-1, 1)
    return out_a, out_b


# ---------------------------------------------------------------------------- baselines
class ImagePoolPlain:
    """The image pool as it is usually written: Python random, a list of stored tensors."""

    def __init__(self, size: int) -> None:
        self.size, self.images = size, []

    def query(self, images: Tensor) -> Tensor:
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif random.random() > 0.5:
                j = random.randint(0, self.size - 1)
                out.append(self.images[j].clone())
                self.images[j] = img
            else:
                out.append(img)
        return torch.cat(out, 0)


class PlainLoop:
    """A baseline training loop: DataLoader, ``.to(device)``, eager fp32, default Adam."""

    log_every = 100

    def __init__(self, cfg: dict[str, Any], A: Tensor, B: Tensor, paired: bool, batch: int,
                 device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.loader = torch.utils.data.DataLoader(
            _PairSet(A, B, paired), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=0,
        )
        self._it = iter(self.loader)
        self.n = 0
        self.build()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        try:
            a, b = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            a, b = next(self._it)
        return a.to(self.device), b.to(self.device)

    def step(self) -> None:
        a, b = self.next_batch()
        losses = self.train_step(a, b)
        self.n += 1
        if self.n % self.log_every == 0:
            self.last = {k: v.item() for k, v in losses.items()}

    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class _PairSet(torch.utils.data.Dataset):
    def __init__(self, A: Tensor, B: Tensor, paired: bool) -> None:
        self.A, self.B, self.paired = A, B, paired

    def __len__(self) -> int:
        return self.A.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = i if self.paired else random.randrange(self.B.shape[0])
        return self.A[i], self.B[j]


def _adam(params: Any, lr: float, beta1: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


class PlainCycleGAN(PlainLoop):
    def build(self) -> None:
        from mrsynth.models.blocks import PatchDiscriminator, ResnetGenerator, init_weights

        a, d = self.cfg["arch"], self.device
        self.G_AB = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"]).to(d)
        self.G_BA = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"]).to(d)
        self.D_A = PatchDiscriminator(1, a["ndf"], a["d_layers"], a["norm"]).to(d)
        self.D_B = PatchDiscriminator(1, a["ndf"], a["d_layers"], a["norm"]).to(d)
        for net in (self.G_AB, self.G_BA, self.D_A, self.D_B):
            init_weights(net)
        o = self.cfg["optim"]
        self.opt_G = _adam([*self.G_AB.parameters(), *self.G_BA.parameters()], o["lr"],
                           o["beta1"])
        self.opt_D = _adam([*self.D_A.parameters(), *self.D_B.parameters()], o["lr"],
                           o["beta1"])
        self.pool_A, self.pool_B = ImagePoolPlain(50), ImagePoolPlain(50)
        self.mse, self.l1 = nn.MSELoss(), nn.L1Loss()

    def train_step(self, real_A: Tensor, real_B: Tensor) -> dict[str, Tensor]:
        lam = self.cfg["loss"]["cycle"]
        for p in [*self.D_A.parameters(), *self.D_B.parameters()]:
            p.requires_grad = False
        fake_B = self.G_AB(real_A)
        rec_A = self.G_BA(fake_B)
        fake_A = self.G_BA(real_B)
        rec_B = self.G_AB(fake_A)
        pred_B, pred_A = self.D_B(fake_B), self.D_A(fake_A)
        loss_G = (self.mse(pred_B, torch.ones_like(pred_B))
                  + self.mse(pred_A, torch.ones_like(pred_A))
                  + lam * self.l1(rec_A, real_A) + lam * self.l1(rec_B, real_B))
        self.opt_G.zero_grad()
        loss_G.backward()
        self.opt_G.step()
        for p in [*self.D_A.parameters(), *self.D_B.parameters()]:
            p.requires_grad = True
        self.opt_D.zero_grad()
        losses = {"G": loss_G.detach()}
        for D, real, fake, pool, key in ((self.D_A, real_A, fake_A, self.pool_A, "D_A"),
                                         (self.D_B, real_B, fake_B, self.pool_B, "D_B")):
            fake = pool.query(fake)
            pr, pf = D(real), D(fake.detach())
            loss_D = 0.5 * (self.mse(pr, torch.ones_like(pr)) + self.mse(pf, torch.zeros_like(pf)))
            loss_D.backward()
            losses[key] = loss_D.detach()
        self.opt_D.step()
        return losses


class PlainUNIT(PlainLoop):
    def build(self) -> None:
        from mrsynth.models.blocks import ResidualBlock, init_weights
        from mrsynth.models.unit import MultiScaleDiscriminator, UnitDecoder, UnitEncoder

        a, d = self.cfg["arch"], self.device
        nef, norm, drop = a["nef"], a["norm"], float(a["dropout"])
        self.enc_A = UnitEncoder(nef, a["enc_blocks"], norm, drop).to(d)
        self.enc_B = UnitEncoder(nef, a["enc_blocks"], norm, drop).to(d)
        self.enc_S = ResidualBlock(4 * nef, norm, dropout=drop).to(d)
        self.dec_S = ResidualBlock(4 * nef, norm, dropout=drop).to(d)
        self.dec_A = UnitDecoder(nef, a["dec_blocks"], norm, drop).to(d)
        self.dec_B = UnitDecoder(nef, a["dec_blocks"], norm, drop).to(d)
        self.D_A = MultiScaleDiscriminator(a["ndf"], a["d_layers"], a["d_scales"]).to(d)
        self.D_B = MultiScaleDiscriminator(a["ndf"], a["d_layers"], a["d_scales"]).to(d)
        gens = [self.enc_A, self.enc_B, self.enc_S, self.dec_S, self.dec_A, self.dec_B]
        for net in [*gens, self.D_A, self.D_B]:
            init_weights(net)
        o = self.cfg["optim"]
        self.opt_G = _adam([p for m in gens for p in m.parameters()], o["lr"], o["beta1"])
        self.opt_D = _adam([*self.D_A.parameters(), *self.D_B.parameters()], o["lr"],
                           o["beta1"])
        self.bce = nn.BCEWithLogitsLoss()
        self.l1 = nn.L1Loss()

    def encode(self, enc: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.enc_S(enc(x))
        return mu, self.dec_S(mu + torch.randn_like(mu))

    def adv(self, outs: list[Tensor], real: bool) -> Tensor:
        return sum(self.bce(o, torch.full_like(o, 1.0 if real else 0.0)) for o in outs)

    def train_step(self, real_A: Tensor, real_B: Tensor) -> dict[str, Tensor]:
        w = self.cfg["loss"]
        with torch.no_grad():
            fake_B = self.dec_B(self.encode(self.enc_A, real_A)[1])
            fake_A = self.dec_A(self.encode(self.enc_B, real_B)[1])
        loss_D = w["gan"] * (self.adv(self.D_A(real_A), True) + self.adv(self.D_A(fake_A), False)
                             + self.adv(self.D_B(real_B), True)
                             + self.adv(self.D_B(fake_B), False))
        self.opt_D.zero_grad()
        loss_D.backward()
        self.opt_D.step()
        for p in [*self.D_A.parameters(), *self.D_B.parameters()]:
            p.requires_grad = False
        mu_A, h_A = self.encode(self.enc_A, real_A)
        mu_B, h_B = self.encode(self.enc_B, real_B)
        rec_A, fake_B = self.dec_A(h_A), self.dec_B(h_A)
        rec_B, fake_A = self.dec_B(h_B), self.dec_A(h_B)
        mu_BA, h_BA = self.encode(self.enc_A, fake_A)
        mu_AB, h_AB = self.encode(self.enc_B, fake_B)
        cyc_A, cyc_B = self.dec_A(h_AB), self.dec_B(h_BA)
        loss_G = (w["gan"] * (self.adv(self.D_A(fake_A), True) + self.adv(self.D_B(fake_B), True))
                  + w["kl"] * (mu_A.pow(2).mean() + mu_B.pow(2).mean())
                  + w["cycle_kl"] * (mu_AB.pow(2).mean() + mu_BA.pow(2).mean())
                  + w["recon"] * (self.l1(rec_A, real_A) + self.l1(rec_B, real_B))
                  + w["cycle"] * (self.l1(cyc_A, real_A) + self.l1(cyc_B, real_B)))
        self.opt_G.zero_grad()
        loss_G.backward()
        self.opt_G.step()
        for p in [*self.D_A.parameters(), *self.D_B.parameters()]:
            p.requires_grad = True
        return {"G": loss_G.detach(), "D": loss_D.detach()}


class PlainGeneratorsS(PlainLoop):
    def build(self) -> None:
        from mrsynth.models.blocks import ResnetGenerator, init_weights

        a, d = self.cfg["arch"], self.device
        self.G_AB = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"]).to(d)
        self.G_BA = ResnetGenerator(1, 1, a["ngf"], a["n_blocks"], a["norm"]).to(d)
        init_weights(self.G_AB)
        init_weights(self.G_BA)
        o = self.cfg["optim"]
        self.opt = _adam([*self.G_AB.parameters(), *self.G_BA.parameters()], o["lr"],
                         o["beta1"])
        self.l1 = nn.L1Loss()

    def train_step(self, real_A: Tensor, real_B: Tensor) -> dict[str, Tensor]:
        loss = self.l1(self.G_AB(real_A), real_B) + self.l1(self.G_BA(real_B), real_A)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"G": loss.detach()}


PLAIN: dict[str, type[PlainLoop]] = {
    "cyclegan": PlainCycleGAN, "cyclegan_s": PlainCycleGAN, "unit": PlainUNIT,
    "generators_s": PlainGeneratorsS,
}


# ---------------------------------------------------------------------------- mrsynth path
class TrainerPath:
    """mrsynth's step path: :func:`mrsynth.train.step.setup_training` + ``TrainStepper``,
    indices from the trainer's ``EpochSampler``, losses read every ``log_every`` steps."""

    log_every = 50

    def __init__(self, cfg: dict[str, Any], A: Tensor, B: Tensor, paired: bool, batch: int,
                 device: torch.device, options: Any) -> None:
        from mrsynth.models.base import build_model
        from mrsynth.train.dataset import EpochSampler
        from mrsynth.train.step import TrainStepper, setup_training

        self.setup = setup_training(build_model(cfg), device, options)
        self.stepper = TrainStepper(self.setup, A, B)
        self.sampler = EpochSampler(A.shape[0], B.shape[0], paired, batch, seed=0)
        self.device = device
        self._draw()
        self.n = 0

    def _draw(self) -> None:
        ia, ib = self.sampler.draw()
        self.ia, self.ib, self.pos = ia.to(self.device), ib.to(self.device), 0

    def step(self) -> None:
        if self.pos == self.ia.shape[0]:
            self._draw()
        self.stepper.step(self.ia[self.pos], self.ib[self.pos])
        self.pos += 1
        self.n += 1
        if self.n % self.log_every == 0:
            self.last = self.stepper.losses.means()


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    model: str
    variant: str          # baseline | mrsynth | feature
    label: str
    make: Callable[[], Any]
    options: str = ""
    runner: Any = None
    warmup_s: float = 0.0
    windows: list[float] = field(default_factory=list)
    error: str | None = None


def fastest_options(device: torch.device | str) -> Any:
    """The fastest options for ``device`` (the ``mrsynth`` row).

    CUDA: everything (``mrsynth train --precision bf16 --compile reduce-overhead``).
    CPU: the trainer's defaults (fp32, fused Adam): bf16 and compilation are opt-in there
    (bf16 changes numerics; compiling costs minutes on a small CPU; docs/performance.md).
    """
    from mrsynth.train.speed import FastOptions

    if torch.device(device).type == "cuda":
        return FastOptions(channels_last=True, compile="reduce-overhead", fused_adam=True,
                           precision="bf16")
    return FastOptions(channels_last=False, compile="none", fused_adam=True, precision="fp32")


def describe_options(options: Any) -> str:
    """``bf16, channels_last, fused Adam, compile(reduce-overhead)`` for the tables."""
    parts = [options.precision]
    if options.channels_last:
        parts.append("channels_last")
    if options.fused_adam is not False:
        parts.append("fused Adam")
    if options.compile != "none":
        parts.append(f"compile({options.compile})")
    return ", ".join(parts)


def feature_options(feature: str, device: torch.device) -> Any:
    from mrsynth.train.speed import FastOptions

    base = FastOptions(channels_last=False, compile="none", fused_adam=False, precision="fp32")
    if feature == "channels_last":
        base.channels_last = True
    elif feature == "fused_adam":
        base.fused_adam = True
    elif feature == "bf16":
        base.precision = "bf16"
    elif feature == "compile":
        base.compile = "default"
    elif feature == "cudagraphs":
        base.compile = "reduce-overhead"
    return base


def bench_model(name: str, args: argparse.Namespace, device: torch.device,
                A: Tensor, B: Tensor, log: Callable[[str], None]) -> list[Variant]:
    from mrsynth.models.base import get_model_class
    from mrsynth.train.config import resolve_config

    cfg = resolve_config(name, args.preset, {"train.batch_size": args.batch})
    paired = get_model_class(name).needs_paired
    batch = args.batch
    fastest = args.mrsynth_options or fastest_options(device)

    def trainer(opts: Any) -> Callable[[], Any]:
        def make() -> Any:
            torch.manual_seed(0)
            return TrainerPath(cfg, A, B, paired, batch, device, opts)
        return make

    def plain() -> Any:
        torch.manual_seed(0)
        random.seed(0)
        return PLAIN[name](cfg, A, B, paired, batch, device)

    variants = [Variant(name, "baseline", "plain loop", plain,
                        "eager fp32, DataLoader, default Adam")]
    for feat in args.features:
        if feat == "cudagraphs" and device.type != "cuda":
            continue
        opts = feature_options(feat, device)
        label = "trainer eager" if feat == "eager" else f"trainer +{feat}"
        variants.append(Variant(name, "feature", label, trainer(opts), describe_options(opts)))
    variants.append(Variant(name, "mrsynth", "mrsynth", trainer(fastest),
                            describe_options(fastest)))

    for v in variants:
        try:
            t0 = time.perf_counter()
            v.runner = v.make()
            for _ in range(args.warmup):
                v.runner.step()
            _sync(device)
            v.warmup_s = time.perf_counter() - t0
            log(f"  {name:13s} {v.label:24s} ready (warm-up {v.warmup_s:.1f} s)")
        except Exception as exc:  # a feature that fails here is reported, not fatal
            v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            v.runner = None
            log(f"  {name:13s} {v.label:24s} FAILED: {v.error}")
    for w in range(args.windows):
        for v in variants:
            if v.runner is None:
                continue
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                v.runner.step()
            _sync(device)
            v.windows.append(time.perf_counter() - t0)
        log(f"  {name:13s} window {w + 1}/{args.windows} done")
    for v in variants:
        v.runner = None  # free memory before the next model
    return variants


def row(v: Variant, args: argparse.Namespace, base_s: float | None) -> dict[str, Any]:
    steps = args.n_images // args.batch
    out: dict[str, Any] = {"model": v.model, "variant": v.variant, "label": v.label,
                           "options": v.options}
    if v.error or not v.windows:
        out.update(s_per_epoch=None, images_per_s=None, error=v.error or "not run")
        return out
    per_iter = [t / args.iters for t in v.windows]
    s_iter = statistics.median(per_iter)
    out.update(
        s_per_iter=round(s_iter, 6),
        s_per_epoch=round(s_iter * steps, 3),
        images_per_s=round(args.batch / s_iter, 3),
        speedup_vs_baseline=round(base_s / s_iter, 3) if base_s else None,
        window_s_per_iter=[round(x, 6) for x in per_iter],
        warmup_s=round(v.warmup_s, 2),
    )
    return out


# ---------------------------------------------------------------------------- inference
def _generator_key(name: str, preset: str) -> str:
    """Identifies a generator network: its class and the architecture settings it uses."""
    import json

    from mrsynth.models.base import build_model
    from mrsynth.train.config import resolve_config

    cfg = resolve_config(name, preset)
    with torch.device("meta"):
        gen = build_model(cfg).generator("A2B")
    shapes = [tuple(p.shape) for p in gen.parameters()]
    return f"{type(gen).__name__}:{json.dumps(shapes)}"


def bench_inference(name: str, args: argparse.Namespace, device: torch.device,
                    A: Tensor, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from mrsynth.models.base import build_model
    from mrsynth.train.config import resolve_config
    from mrsynth.train.speed import (
        channels_last_supported,
        compile_networks,
        native_bf16,
        step_begin,
    )

    rows = []
    mode = args.mrsynth_options.compile
    bf16_ok = native_bf16(device)
    for variant in ("eager fp32", "fast"):
        # fast inference: channels_last, bf16 autocast, and compilation when the mrsynth row
        # compiles (precision matters less here than in training: outputs are compared in
        # tests/test_speed_fast.py to within 0.06 on the [-1, 1] scale)
        fast_on = variant == "fast"
        torch.manual_seed(0)
        model = build_model(resolve_config(name, args.preset)).to(device).eval()
        cl = fast_on and channels_last_supported(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        compiled = fast_on and mode != "none"
        report = compile_networks(model, mode, device) if compiled else None
        options = ", ".join(x for x, on in (("channels_last", cl), ("bf16", fast_on and bf16_ok),
                                            (f"compile({mode})", compiled)) if on) or "fp32"
        gen = model.generator("A2B")
        dtype = torch.bfloat16 if fast_on and bf16_ok else None
        for batch in args.infer_batches:
            x = A[:batch].to(device)
            if x.shape[0] < batch:
                x = x.repeat(math.ceil(batch / x.shape[0]), 1, 1, 1)[:batch]
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            n_rep = max(2, args.infer_iters if batch == 1 else max(2, args.infer_iters // 8))

            def run(gen: nn.Module = gen, x: Tensor = x, dtype: Any = dtype,
                    report: Any = report) -> None:
                # each call is an iteration of its own for CUDA graph trees: UNIT's translator
                # chains compiled networks, which fails unless the step is marked
                step_begin(report)
                with torch.inference_mode():
                    if dtype is not None:
                        with torch.autocast(device.type, dtype=dtype):
                            gen(x)
                    else:
                        gen(x)

            try:
                t0 = time.perf_counter()
                run()
                run()
                _sync(device)
                warm = time.perf_counter() - t0
                times = []
                for _ in range(5):
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(n_rep):
                        run()
                    _sync(device)
                    times.append((time.perf_counter() - t0) / n_rep)
                t = statistics.median(times)
                rows.append({"model": name, "generator": "A2B", "variant": variant,
                             "options": options,
                             "batch": batch, "ms_per_batch": round(1e3 * t, 3),
                             "slices_per_s": round(batch / t, 2), "warmup_s": round(warm, 2)})
            except Exception as exc:
                rows.append({"model": name, "generator": "A2B", "variant": variant,
                             "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:200]})
        log(f"  {name:13s} inference {variant} done")
    return rows


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default).")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="Slice size (default: 304 256 on CUDA, 64 64 on CPU).")
    ap.add_argument("--n-images", type=int, default=STUDY["n_images"],
                    help="Slices per domain; s/epoch is extrapolated to this many (default 900).")
    ap.add_argument("--batch", type=int, default=1, help="Images per step (default 1).")
    ap.add_argument("--iters", type=int, default=None,
                    help="Iterations per timed window (default: 100 on CUDA, 4 on CPU).")
    ap.add_argument("--windows", type=int, default=5, help="Timed windows per variant.")
    ap.add_argument("--warmup", type=int, default=None,
                    help="Untimed iterations first (default: 60 on CUDA, 2 on CPU).")
    ap.add_argument("--models", default=",".join(MODELS), help="Comma-separated model names.")
    ap.add_argument("--preset", default=None,
                    help="Network preset (default: paper on CUDA, cpu-small on CPU).")
    ap.add_argument("--features", default=None,
                    help=f"Ablation rows, comma-separated from {','.join(FEATURES)} or 'none' "
                    "(default: all on CUDA; eager,channels_last,fused_adam,bf16 on CPU).")
    ap.add_argument("--mrsynth", default=None,
                    help="Options of the mrsynth row, e.g. 'channels_last,fused_adam,bf16,"
                    "compile' (default: the fastest known for the device).")
    ap.add_argument("--infer-batches", default="1,64", help="Inference batch sizes.")
    ap.add_argument("--infer-iters", type=int, default=None, help="Inference repeats.")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default benchmarks/results/train_speed-<device>.json).")
    ap.add_argument("--quiet", action="store_true", help="No progress lines.")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but this torch sees no CUDA GPU")
    gpu = args.device.startswith("cuda")
    args.size = tuple(args.size) if args.size else (STUDY["size"] if gpu else (64, 64))
    args.preset = args.preset or ("paper" if gpu else "cpu-small")
    args.iters = args.iters or (100 if gpu else 4)
    # GPU: past the image pool's 50 images, so the timed windows see the pool's steady state
    args.warmup = args.warmup if args.warmup is not None else (60 if gpu else 2)
    args.infer_iters = args.infer_iters or (50 if gpu else 8)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in PLAIN]
    if bad:
        ap.error(f"no plain baseline for {bad}; choose from {', '.join(PLAIN)}")
    feats = args.features or (",".join(FEATURES) if gpu else "eager,channels_last,fused_adam,bf16")
    args.features = [] if feats == "none" else [f.strip() for f in feats.split(",") if f.strip()]
    unknown = [f for f in args.features if f not in FEATURES]
    if unknown:
        ap.error(f"unknown features {unknown}; choose from {', '.join(FEATURES)}")
    args.infer_batches = [int(b) for b in args.infer_batches.split(",") if b.strip()]
    if args.n_images < args.batch:
        ap.error("--n-images must be at least --batch")
    from mrsynth.train.speed import FastOptions

    if args.mrsynth:
        names = {f.strip() for f in args.mrsynth.split(",")}
        args.mrsynth_options = FastOptions(
            channels_last="channels_last" in names,
            compile=("reduce-overhead" if "cudagraphs" in names else
                     "default" if "compile" in names else "none"),
            fused_adam="fused_adam" in names,
            precision="bf16" if "bf16" in names else "fp32",
        )
    else:
        args.mrsynth_options = fastest_options(args.device)
    return args


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    console = Console(width=max(100, Console().width))
    t = Table(title=f"Training speed on {result['device_name']}: {s['preset']} networks, "
                    f"{s['size'][0]}x{s['size'][1]}, batch {s['batch']}, "
                    f"{s['n_images']} images/epoch (torch {result['torch']})",
              caption=f"mrsynth = trainer step path with {s['mrsynth_options']}; s/iter is the "
                      f"median of {s['windows']} windows of {s['iters_per_window']} iterations")
    for col in ("model", "variant", "s/iter", "s/epoch", "images/s", "x baseline", "warm-up s"):
        t.add_column(col, justify="left" if col in ("model", "variant") else "right")
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"] + result["features"]:
        by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        order = {"baseline": 0, "feature": 1, "mrsynth": 2}
        for r in sorted(rows, key=lambda r: order[r["variant"]]):
            if r.get("s_per_epoch") is None:
                t.add_row(model, r["label"], "-", "-", "-", "-",
                          f"[red]{(r.get('error') or '')[:40]}[/red]")
                continue
            sp = r.get("speedup_vs_baseline")
            style = "bold" if r["variant"] == "mrsynth" else ""
            t.add_row(model, r["label"], f"{r['s_per_iter']:.4f}",
                      f"{r['s_per_epoch']:.1f}", f"{r['images_per_s']:.2f}",
                      f"{sp:.2f}x" if sp else "-", f"{r['warmup_s']:.1f}", style=style)
        t.add_section()
    console.print(t)
    if result["inference"]:
        ti = Table(title="Inference (generator A2B, no grad)")
        for col in ("model", "variant", "options", "batch", "ms/batch", "slices/s"):
            ti.add_column(col, justify="right" if col in ("batch", "ms/batch", "slices/s")
                          else "left")
        for r in result["inference"]:
            if "error" in r:
                ti.add_row(r["model"], r["variant"], "", str(r["batch"]), "-", r["error"][:30])
            else:
                same = r.get("same_network_as")
                ti.add_row(r["model"] + (f" (= {same})" if same else ""), r["variant"],
                           r["options"], str(r["batch"]), f"{r['ms_per_batch']:.2f}",
                           f"{r['slices_per_s']:.1f}")
        console.print(ti)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mrsynth.utils import environment_info

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both variants: fixed shapes
    log(f"making {args.n_images} slice pairs at {args.size[0]}x{args.size[1]}")
    A, B = make_slices(args.n_images, args.size)
    rows, feats, infer = [], [], []
    seen_generators: dict[str, str] = {}
    for name in args.models:
        variants = bench_model(name, args, device, A, B, log)
        base = next((v for v in variants if v.variant == "baseline"), None)
        base_s = (statistics.median(t / args.iters for t in base.windows)
                  if base and base.windows else None)
        for v in variants:
            (feats if v.variant == "feature" else rows).append(row(v, args, base_s))
        if args.infer_batches:
            key = _generator_key(name, args.preset)
            if key in seen_generators:  # e.g. generators_s uses CycleGAN's generator
                infer += [{**r, "model": name, "same_network_as": seen_generators[key]}
                          for r in infer if r["model"] == seen_generators[key]]
            else:
                seen_generators[key] = name
                infer += bench_inference(name, args, device, A, log)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "benchmark": "train_speed",
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "preset": args.preset, "size": list(args.size), "n_images": args.n_images,
            "batch": args.batch, "iters_per_window": args.iters, "windows": args.windows,
            "warmup": args.warmup, "features": args.features, "threads": torch.get_num_threads(),
            "mrsynth_options": describe_options(args.mrsynth_options),
            "study_setting": (tuple(args.size) == STUDY["size"] and args.n_images == 900
                              and args.batch == 1 and args.preset == "paper"),
        },
        "targets": {"h100_s_per_epoch": {"cyclegan": TARGETS["cyclegan"],
                                         "unit": TARGETS["unit"]},
                    "speedup_vs_baseline": TARGETS["speedup"]},
        "rows": rows,
        "features": feats,
        "inference": infer,
        "environment": environment_info(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    import platform

    return f"CPU: {platform.processor() or platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_tables(result)
    out = args.out or RESULTS / f"train_speed-{result['device']}.json"
    from mrsynth.utils import atomic_write_json

    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
