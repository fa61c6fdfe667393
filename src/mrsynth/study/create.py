"""``mrsynth study create``: scan sources, sample, pre-render every image, write the study file.

Everything a reader will ever be sent is rendered here, once, into the database,
so serving a real image and serving a synthetic one are the same database read:
no timing difference can depend on the answer.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mrsynth import __version__
from mrsynth.errors import ConfigError, DataError
from mrsynth.study import db as sdb
from mrsynth.study.blinding import separability_warnings
from mrsynth.study.render import encode_png, to_display
from mrsynth.study.sampling import Item, sample_items
from mrsynth.study.sources import ARRAY_FORMATS, ImageRef, load_masks, load_pixels, scan_source
from mrsynth.utils import atomic_path, check_can_write, environment_info


@dataclass
class CreatedStudy:
    path: Path
    admin_token: str
    counts: dict[tuple[str, str | None, str], int]
    n_practice: int
    warnings: list[str]


def parse_synthetic(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` options to an ordered {name: path}."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(
                f"--synthetic {spec!r} is not NAME=DIR. Give each model's images as e.g. "
                "--synthetic cyclegan=out/cyclegan/slices."
            )
        if name in out:
            raise ConfigError(f"--synthetic names must be unique; {name!r} is given twice.")
        if name.lower() == "real":
            raise ConfigError("'real' cannot be a model name; choose another --synthetic NAME.")
        out[name] = Path(path)
    if not out:
        raise ConfigError("Give at least one --synthetic NAME=DIR.")
    return out


def _rotation(ref: ImageRef, setting: str) -> int:
    if setting == "auto":
        return 1 if ref.fmt in ARRAY_FORMATS else 0
    return (int(setting) // 90) % 4


def create_study(
    real: str | Path,
    synthetic: dict[str, Path],
    out: str | Path,
    settings: sdb.StudySettings,
    *,
    overwrite: bool = False,
) -> CreatedStudy:
    settings.validate()
    out = check_can_write(out, overwrite)
    for side in ("-wal", "-shm"):
        if Path(f"{out}{side}").exists():
            raise DataError(
                f"{out}{side} exists: a server may still have the old study open, or it "
                "crashed. Stop any `mrsynth study serve` on it (its answers are in that file), "
                "or choose another --out."
            )
    syn_refs: dict[str, list[ImageRef]] = {}
    wanted = settings.contrasts or None
    for name, path in synthetic.items():
        syn_refs[name] = scan_source(path, "synthetic", name, wanted)
        if not syn_refs[name]:
            raise DataError(
                f"--synthetic {name}={path} holds no images"
                + (f" of contrast {', '.join(wanted)}" if wanted else "")
                + ". Expected NPY/NIfTI/PNG/TIFF files named <subject>_slice-<k>_<contrast>.<ext>."
            )
    if not settings.contrasts:
        settings.contrasts = sorted({r.contrast for refs in syn_refs.values() for r in refs})
    settings.models = list(synthetic)
    real_refs = scan_source(real, "real", None, settings.contrasts)
    if settings.mode == "2afc":
        settings.n_real = settings.n_synthetic
    sample = sample_items(
        real_refs,
        syn_refs,
        contrasts=settings.contrasts,
        mode=settings.mode,
        n_real=settings.n_real,
        n_synthetic=settings.n_synthetic,
        n_practice=settings.n_practice,
        pairing=settings.pairing,
        seed=settings.seed,
    )
    refs = sorted(
        {r for it in sample.items for r in (it.real, it.synthetic) if r is not None},
        key=lambda r: (r.kind, r.model or "", r.contrast, r.source),
    )
    pixels = load_pixels(refs)
    masks = _display_masks(refs, real_refs, pixels)
    displays = {
        r: to_display(
            pixels[r],
            size=settings.display_size,
            window_method=settings.window,
            rotate=_rotation(r, settings.rotate),
            mask=masks[r],
        )
        for r in refs
    }
    warnings = list(sample.warnings) + _blinding_warnings(refs, pixels)
    warnings += separability_warnings(
        [d for r, d in displays.items() if r.kind == "real"],
        {m: [d for r, d in displays.items() if r.model == m] for m in settings.models},
    )
    admin_token = sdb.new_token()
    rng = np.random.default_rng([settings.seed, 1])
    with atomic_path(out) as tmp:
        conn = sdb.connect(tmp, must_exist=False)
        try:
            sdb.init_schema(conn)
            with sdb.transaction(conn):
                sdb.store_settings(conn, settings)
                sdb.set_meta(conn, "admin_token_sha256", sdb.hash_token(admin_token))
                sdb.set_meta(conn, "created_at", str(time.time()))
                sdb.set_meta(
                    conn,
                    "provenance",
                    {
                        "mrsynth": __version__,
                        "real": str(real),
                        "synthetic": {k: str(v) for k, v in synthetic.items()},
                        "settings": asdict(settings),
                        "environment": environment_info(),
                    },
                )
                # Insert in random order so row ids say nothing about the truth.
                image_ids: dict[ImageRef, int] = {}
                for i in rng.permutation(len(refs)):
                    r = refs[int(i)]
                    png = encode_png(displays[r])
                    h, w = pixels[r].shape
                    cur = conn.execute(
                        "INSERT INTO images(kind, model, contrast, subject, slice, source, "
                        "native_h, native_w, png, sha256) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            r.kind,
                            r.model,
                            r.contrast,
                            r.subject,
                            r.slice,
                            r.source,
                            h,
                            w,
                            png,
                            hashlib.sha256(png).hexdigest(),
                        ),
                    )
                    image_ids[r] = int(cur.lastrowid or 0)
                items: list[Item] = sample.items
                for i in rng.permutation(len(items)):
                    it = items[int(i)]
                    conn.execute(
                        "INSERT INTO items(practice, real_image, synthetic_image) VALUES (?,?,?)",
                        (
                            int(it.practice),
                            image_ids[it.real] if it.real else None,
                            image_ids[it.synthetic] if it.synthetic else None,
                        ),
                    )
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
    return CreatedStudy(
        path=Path(out),
        admin_token=admin_token,
        counts=sample.counts,
        n_practice=sum(it.practice for it in sample.items),
        warnings=warnings,
    )


def _display_masks(
    refs: list[ImageRef], real_refs: list[ImageRef], pixels: dict[ImageRef, np.ndarray]
) -> dict[ImageRef, np.ndarray]:
    """The mask each image is rendered with: the head mask of the *real* slice of the same
    subject and slice (same contrast if there is one), so that a real image and its
    synthetic twin get the same black background whatever the model did outside the head.
    A synthetic image without a real twin of its size gets the same rule applied to itself.
    """
    by_key = {r.key: r for r in real_refs if r.key is not None}
    by_slice = {r.key[:2]: r for r in real_refs if r.key is not None}
    twin: dict[ImageRef, ImageRef] = {}
    for r in refs:
        if r.kind == "real":
            twin[r] = r
        elif r.key is not None:
            t = by_key.get(r.key) or by_slice.get(r.key[:2])
            if t is not None:
                twin[r] = t
    extra = load_pixels({t for t in twin.values() if t not in pixels})
    twin_pixels = {**pixels, **extra}
    real_masks = load_masks(set(twin.values()), twin_pixels)
    own = load_masks([r for r in refs if r not in twin], pixels)  # brain_mask rule
    out = {}
    for r in refs:
        m = real_masks.get(twin[r]) if r in twin else None
        if m is None or m.shape != pixels[r].shape:
            m = own[r] if r in own else load_masks([r], pixels)[r]
        out[r] = m
    return out


def _blinding_warnings(refs: list[ImageRef], pixels: dict[ImageRef, np.ndarray]) -> list[str]:
    """Differences between the real and synthetic pipelines that rendering cannot hide."""
    out = []
    shapes: dict[tuple[str, str], set] = defaultdict(set)
    families: dict[str, set] = defaultdict(set)
    for r in refs:
        shapes[(r.contrast, r.kind)].add(pixels[r].shape)
        families[r.kind].add("array" if r.fmt in ARRAY_FORMATS else "picture")
    for c in sorted({r.contrast for r in refs}):
        real, syn = shapes.get((c, "real"), set()), shapes.get((c, "synthetic"), set())
        if real and syn and real != syn:
            out.append(
                f"{c}: real images have native sizes {sorted(real)} but synthetic ones "
                f"{sorted(syn)}; resizing them to one display size blurs them differently, "
                "which readers may notice. Give real images at the synthetic images' size "
                "(e.g. the prepared file the models were evaluated on)."
            )
    if families["real"] and families["synthetic"] and families["real"] != families["synthetic"]:
        out.append(
            "Real and synthetic images come from different file kinds (arrays vs PNG/TIFF "
            "pictures), which are oriented and quantised differently. Use one kind for both."
        )
    return out
