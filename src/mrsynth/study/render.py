"""Turning a 2-D slice into the PNG a reader sees, identically for real and synthetic images.

Blinding depends on this file: every image, real or synthetic, goes through the
same function with the same parameters, so nothing but the pixels' content can
differ between them.

1. Orientation: ``rotate`` quarter turns (arrays in RAS ``[x, y]`` layout get one,
   so anterior is up).
2. Masking: with a ``mask`` (``study create`` passes the head mask of the *real*
   slice of the same subject and slice, for the real and the synthetic image alike)
   everything outside it is black, and the window below is computed inside it. A
   model's background (UNIT's grey corners, noise) then cannot tell its images apart.
3. Windowing, per image:

   * ``robust`` (default): foreground = the mask, or without one the pixels above
     ``min + 2 %`` of the range ``min .. 99.5th percentile``; the 0.5th and 99.5th
     percentiles of the foreground map to black and white (clipped). It works for any
     intensity units (normalised, scanner units, 8/16-bit pictures).
   * ``fixed``: the normalised range [-1, 1] maps to black..white; only for
     inputs in mrsynth's normalised units (prepared files, ``evaluate`` output).

4. Geometry: centred zero (black) padding to a square, then a Lanczos resize to
   ``size x size`` on the windowed float image, clipped to [0, 1] and rounded to
   8 bits.
5. Encoding: 8-bit grey-scale PNG with only the IHDR, IDAT and IEND chunks (no text,
   time, gamma or resolution chunks), stored without compression so that every
   image of a study has exactly the same byte length: a compressed size would tell
   smooth images from noisy ones.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

WINDOWS = ("robust", "fixed")


def window(x: np.ndarray, method: str = "robust", mask: np.ndarray | None = None) -> np.ndarray:
    """Map intensities to [0, 1], black outside ``mask`` (see the module docstring)."""
    a = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.min(a[finite]) if finite.any() else 0.0)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {a.shape}")
        if mask.sum() < 16:  # nothing to show: treat as unmasked rather than all black
            mask = None
    w = _window(a, method, mask)
    return w if mask is None else np.where(mask, w, 0.0)


def _window(a: np.ndarray, method: str, mask: np.ndarray | None) -> np.ndarray:
    if method == "fixed":
        return np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    if method != "robust":
        raise ValueError(f"unknown window {method!r}")
    if mask is not None:
        lo, hi = np.percentile(a[mask], [0.5, 99.5])
        if hi <= lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        return np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    lo0 = float(a.min())
    top = float(np.percentile(a, 99.5))
    if top <= lo0:
        top = float(a.max())
    if top <= lo0:
        return np.zeros_like(a)
    fg = a > lo0 + 0.02 * (top - lo0)
    if fg.sum() < max(16, 0.01 * a.size):
        fg = np.ones_like(fg)
    lo, hi = np.percentile(a[fg], [0.5, 99.5])
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def to_display(
    x: np.ndarray,
    *,
    size: int,
    window_method: str = "robust",
    rotate: int = 0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Masked, windowed, padded and resized ``uint8`` image of shape ``(size, size)``."""
    a = np.rot90(np.asarray(x, dtype=np.float64), k=rotate % 4)
    m = None if mask is None else np.rot90(np.asarray(mask, dtype=bool), k=rotate % 4)
    w = window(a, window_method, m)
    h, wd = w.shape
    side = max(h, wd)
    canvas = np.zeros((side, side), dtype=np.float32)
    r0, c0 = (side - h) // 2, (side - wd) // 2
    canvas[r0 : r0 + h, c0 : c0 + wd] = w
    im = Image.fromarray(canvas)  # mode "F": resampling happens before quantisation
    if side != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    out = np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def encode_png(u8: np.ndarray) -> bytes:
    """8-bit grey PNG, uncompressed, IHDR/IDAT/IEND only."""
    if u8.dtype != np.uint8 or u8.ndim != 2:
        raise ValueError("encode_png expects a 2-D uint8 array")
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", compress_level=0, optimize=False)
    return buf.getvalue()


def render_png(
    x: np.ndarray,
    *,
    size: int,
    window_method: str = "robust",
    rotate: int = 0,
    mask: np.ndarray | None = None,
) -> bytes:
    """The one rendering path for every image of a study."""
    return encode_png(
        to_display(x, size=size, window_method=window_method, rotate=rotate, mask=mask)
    )


def png_chunks(data: bytes) -> list[tuple[str, int]]:
    """(type, length) of each chunk of a PNG byte string (for blinding checks)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    out = []
    i = 8
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        out.append((data[i + 4 : i + 8].decode("latin-1"), n))
        i += 12 + n
    return out
