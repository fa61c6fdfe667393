"""Classifier two-sample test (C2ST): an automatic realism score.

The study judged realism with one human reader. As a cheap, repeatable
companion, a small CNN learns to tell real test slices from one model's
synthetic slices on half of the test images and is scored on the other half.
Accuracy near 50 % means the classifier cannot tell them apart (as realistic
as it can judge); near 100 % means obvious artefacts. It is a lower bound on
distinguishability: a better classifier might do better.

Design choices (why):
* Real and synthetic images of one slice always land in the same half, so the
  classifier cannot score by recognising anatomy it saw in training.
* Images stay in the models' normalised units (what the generators output and
  what the perceptual study shows), so intensity-scale errors count.
* Seeded: weight init, split and batch order come from ``seed``, inside
  ``torch.random.fork_rng`` so the global RNG is left alone. Reruns on the
  same machine give the same accuracy.
* ``p_value``: one-sided exact binomial test of accuracy > 50 %; the 95 % CI
  is Wilson's (scipy ``binomtest``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest


@dataclass
class C2STResult:
    accuracy: float
    ci_low: float
    ci_high: float
    p_value: float
    n_train: int
    n_test: int
    steps: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classifier() -> Any:
    import torch.nn as nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]

    return nn.Sequential(
        *block(1, 8), *block(8, 16), *block(16, 32), *block(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1),
    )


def split_pairs(n: int, *, seed: int = 0, train_fraction: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint training and test slice indices (seeded permutation of ``range(n)``).

    A slice's real and synthetic image go to the same half, and each half keeps at
    least two slices (``n >= 4``).
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = min(max(2, int(round(n * train_fraction))), n - 2)
    return perm[:n_tr], perm[n_tr:]


def c2st(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    seed: int = 0,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 2e-3,
    train_fraction: float = 0.5,
) -> C2STResult:
    """Train on ``train_fraction`` of the slice pairs, return accuracy on the rest.

    ``real[i]`` and ``synthetic[i]`` are the same slice (N, H, W). Training runs
    a fixed number of optimiser ``steps`` (reshuffling every pass) rather than
    epochs, so small test sets still get enough updates. Fewer than four pairs
    give NaN (nothing to learn from or to score).
    """
    import torch

    real = np.asarray(real, dtype=np.float32)
    synthetic = np.asarray(synthetic, dtype=np.float32)
    if real.shape != synthetic.shape or real.ndim != 3:
        raise ValueError(f"expected two (N, H, W) stacks of one shape: {real.shape}, "
                         f"{synthetic.shape}")
    n = real.shape[0]
    if n < 4:
        nan = float("nan")
        return C2STResult(nan, nan, nan, nan, 0, 0, steps, seed)
    tr, te = split_pairs(n, seed=seed, train_fraction=train_fraction)

    def stack(idx: np.ndarray) -> tuple[Any, Any]:
        x = np.concatenate([real[idx], synthetic[idx]])[:, None]
        y = np.concatenate([np.zeros(idx.size), np.ones(idx.size)]).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    xtr, ytr = stack(tr)
    xte, yte = stack(te)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _classifier()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(seed)
        net.train()
        done = 0
        while done < steps:
            order = torch.randperm(xtr.shape[0], generator=gen)
            for i in range(0, order.numel(), batch_size):
                if done >= steps:
                    break
                done += 1
                b = order[i : i + batch_size]
                xb = xtr[b]
                # random left-right flips: anatomy is roughly symmetric, artefacts need not be
                flip = torch.rand(b.numel(), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb).squeeze(1), ytr[b])
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xte[i : i + 256]).squeeze(1) for i in range(0, len(xte), 256)])
    correct = int(((pred > 0).float() == yte).sum())
    total = int(yte.numel())
    bt = binomtest(correct, total, 0.5, alternative="greater")
    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return C2STResult(
        accuracy=correct / total,
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        p_value=float(bt.pvalue),
        n_train=int(xtr.shape[0]),
        n_test=total,
        steps=steps,
        seed=seed,
    )
