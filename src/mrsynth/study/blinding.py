"""Can a trivial rule tell the rendered real images from the synthetic ones?

A reader study measures whether anatomy looks real. If something outside the
anatomy differs between the sets -- a grey background, background noise, a
larger black area, clipped highlights -- readers (or one of them, by chance) can
answer from that instead. ``study create`` renders every image, then for each
model compares these simple statistics of the rendered 8-bit images with the real
images' and warns when one threshold on one statistic separates them (balanced
accuracy above :data:`MAX_ACCURACY`, and unlikely by chance: Mann-Whitney p below
:data:`MAX_P`; both sets need :data:`MIN_IMAGES` images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MAX_ACCURACY = 0.75
MAX_P = 0.01
MIN_IMAGES = 6


def _corners(u8: np.ndarray) -> np.ndarray:
    k = max(2, u8.shape[0] // 10)
    return np.concatenate([u8[:k, :k], u8[:k, -k:], u8[-k:, :k], u8[-k:, -k:]], axis=None)


def _corner_level(u8: np.ndarray) -> float:
    return float(_corners(u8).mean())


def _corner_noise(u8: np.ndarray) -> float:
    return float(_corners(u8).astype(np.float64).std())


def _black_fraction(u8: np.ndarray) -> float:
    return float((u8 == 0).mean())


def _white_fraction(u8: np.ndarray) -> float:
    return float((u8 == 255).mean())


#: name -> (description for the warning, statistic of one rendered image)
FEATURES: dict[str, tuple[str, Callable[[np.ndarray], float]]] = {
    "corner_level": ("background brightness in the corners (0-255)", _corner_level),
    "corner_noise": ("background noise in the corners (std, 0-255)", _corner_noise),
    "black_fraction": ("fraction of pure black pixels", _black_fraction),
    "white_fraction": ("fraction of pure white pixels", _white_fraction),
}


def threshold_accuracy(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(best balanced accuracy, its threshold) of one rule ``x > t`` or ``x <= t`` telling a from b.

    Balanced: the mean of the two sets' hit rates, so unequal set sizes do not matter.
    """
    xa, xb = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    cuts = np.unique(np.concatenate([xa, xb]))
    best, best_t = 0.5, float(cuts[0]) if cuts.size else 0.0
    for t in cuts:
        # rule "a is > t": a above t are right, b at or below t are right
        acc = 0.5 * (np.mean(xa > t) + np.mean(xb <= t))
        acc = max(acc, 1.0 - acc)  # or the opposite direction
        if acc > best:
            best, best_t = float(acc), float(t)
    return best, best_t


def separability_warnings(
    real: Sequence[np.ndarray], synthetic: dict[str, Sequence[np.ndarray]]
) -> list[str]:
    """A warning per (model, statistic) that separates that model's images from the real ones."""
    from scipy.stats import mannwhitneyu

    out = []
    if len(real) < MIN_IMAGES:
        return out
    for name, (what, fn) in FEATURES.items():
        r = [fn(x) for x in real]
        for model, images in synthetic.items():
            if len(images) < MIN_IMAGES:
                continue
            s = [fn(x) for x in images]
            if np.ptp(r + s) == 0:
                continue
            acc, t = threshold_accuracy(r, s)
            p = float(mannwhitneyu(r, s, alternative="two-sided").pvalue)
            if acc > MAX_ACCURACY and p < MAX_P:
                side = "above" if np.median(s) > np.median(r) else "at or below"
                out.append(
                    f"Blinding: {model}'s rendered images differ from the real ones in {what} "
                    f"({name}: real median {np.median(r):.3g}, {model} {np.median(s):.3g}); "
                    f"'{name} {side} {t:.3g} = synthetic' is right for {100 * acc:.0f}% "
                    "(balanced) without looking at the anatomy. Make the sets alike (same "
                    "background, masking, noise) before running the study."
                )
    return out
