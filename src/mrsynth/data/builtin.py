"""The built-in data set: virtual subjects simulated on the MNI ICBM152 2009 template.

This is a **simulation on a real anatomical template**, meant for demos, tests
and trying mrsynth without data; real studies should use their own scans.

Anatomy: the ICBM152 2009 (symmetric, nonlinear) grey- and white-matter
probability maps and brain mask that the ``nilearn`` package ships in its own
files (no download); CSF = brain - GM - WM. Each virtual subject gets:

* a smooth random deformation (plus a small random rotation, scaling and shift),
* per-subject jitter of every tissue's T1, T2 and PD,
* per-contrast scanner gain, a smooth multiplicative bias field and Rician noise,
* skull stripping with its deformed brain mask (background exactly 0, like the
  shared real data),

and the contrasts are computed with the spin-echo signal equation
``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (FLAIR: inversion recovery) mixed
by tissue fraction. Subjects are returned as in-memory NIfTI volumes and go
through exactly the same validation, masking, slicing and normalisation as
real data.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mrsynth.data.readers import DatasetIndex, SubjectRecord
from mrsynth.errors import ConfigError, DataError

DEFAULT_N_SUBJECTS = 20
DEFAULT_RESOLUTION = 2.0
RESOLUTIONS = (1.0, 2.0)

# Tissue properties at 3 T: T1 and T2 in ms, PD relative to CSF (= 1).
# T1/T2 of grey and white matter: Wansapura JP et al., "NMR relaxation times in the human
#   brain at 3.0 tesla", J Magn Reson Imaging 1999;9:531-538 (GM T1 ~1331, T2 ~110 ms;
#   WM T1 ~832, T2 ~80 ms).
# CSF T1 ~4.2 s: Lu H et al., "Routine clinical brain MRI sequences for use at 3.0 Tesla",
#   J Magn Reson Imaging 2005;22:13-22. CSF T2 ~2 s (free water; 1.5-2.3 s are reported at 3 T).
# PD (water content): Neeb H, Zilles K, Shah NJ, NeuroImage 2006;31:1156-1168
#   (WM ~0.69, GM ~0.80 of pure water).
TISSUES: dict[str, dict[str, float]] = {
    "CSF": {"T1": 4163.0, "T2": 2000.0, "PD": 1.00},
    "GM": {"T1": 1331.0, "T2": 110.0, "PD": 0.80},
    "WM": {"T1": 832.0, "T2": 80.0, "PD": 0.69},
}

# Sequence timing (ms): spin-echo T1w, T2w and PDw; FLAIR with TI nulling CSF.
SEQUENCES: dict[str, dict[str, float]] = {
    "T1w": {"TR": 500.0, "TE": 15.0},
    "T2w": {"TR": 4000.0, "TE": 100.0},
    "PDw": {"TR": 4000.0, "TE": 15.0},
    "FLAIR": {"TR": 9000.0, "TE": 90.0, "TI": 2430.0},
}

#: Random variation between subjects (standard deviations / amplitudes).
VARIATION = {
    "tissue_jitter": 0.05,      # relative SD of each tissue's T1, T2 and PD
    "deform_mm": 2.5,           # SD of the smooth displacement at control points (mm)
    "control_spacing_mm": 24.0,  # spacing of the deformation's control points
    "rotation_deg": 4.0,        # SD of rotation about each axis
    "scale": 0.05,              # SD of isotropic scaling
    "shift_mm": 3.0,            # SD of translation
    "bias": 0.12,               # SD of the log bias-field polynomial coefficients
    "gain_log_sd": 0.5,         # SD of log scanner gain (intensity units vary by subject)
    "noise": 0.02,              # Rician noise SD relative to the mean brain signal
}


def signal(contrast: str, t1: np.ndarray | float, t2: np.ndarray | float,
           pd: np.ndarray | float) -> np.ndarray | float:
    """Noise-free signal of one tissue for ``contrast`` (spin echo, or IR for FLAIR)."""
    seq = SEQUENCES[contrast]
    tr, te = seq["TR"], seq["TE"]
    if "TI" in seq:
        recovery = np.abs(1.0 - 2.0 * np.exp(-seq["TI"] / t1) + np.exp(-tr / t1))
    else:
        recovery = 1.0 - np.exp(-tr / t1)
    return pd * recovery * np.exp(-te / t2)


# ICBM152 2009 files in nilearn's package data: read with nibabel directly, since importing
# nilearn.datasets costs ~135 MB of RAM per process (it pulls in scikit-learn and pandas),
# which every `prepare --workers` process would pay.
_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _template_image(name: str) -> nib.Nifti1Image:
    """One of nilearn's shipped template files, found without importing nilearn."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / name
        if path.is_file():
            try:
                return nib.load(path)
            except Exception as exc:  # pragma: no cover - a damaged installation
                raise DataError(
                    f"Cannot read the MNI ICBM152 template {path} shipped with nilearn "
                    f"({exc}). Reinstall mrsynth's dependencies (`make test` re-creates .venv)."
                ) from exc
    raise DataError(
        f"Cannot find the MNI ICBM152 template {name} that the nilearn package ships "
        f"(looked in {', '.join(map(str, roots)) or 'no nilearn installation'}). Install "
        "mrsynth's dependencies (`make test` re-creates .venv)."
    )


def _template_file(name: str) -> np.ndarray:
    """A probability map scaled to [0, 1] as nilearn's load_mni152_*_template() does."""
    data = np.asarray(_template_image(name).dataobj).astype(np.float32)
    data /= data.max()
    return data


@functools.lru_cache(maxsize=2)
def templates(resolution: float = DEFAULT_RESOLUTION) -> dict[str, Any]:
    """GM, WM, CSF fractions and brain mask of ICBM152 2009 from nilearn's package files,
    cropped to the brain (plus a margin) and block-averaged to ``resolution`` mm."""
    if resolution not in RESOLUTIONS:
        raise ConfigError(
            f"--resolution {resolution:g} is not available for the builtin set; choose 1 or 2 (mm)."
        )
    gm = _template_file(_GM_FILE)
    wm = _template_file(_WM_FILE)
    t1_img = _template_image(_T1_FILE)
    # nilearn's load_mni152_brain_mask(): the T1 template scaled to [0, 1], above 0.2
    t1 = np.asarray(t1_img.dataobj).astype(np.float32)
    t1 /= t1.max()
    brain = (t1 > 0.2).astype(np.float32)
    del t1
    affine = np.asarray(t1_img.affine, np.float64)
    margin = 8
    idx = np.argwhere(brain > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, brain.shape)
    f = int(resolution)
    hi = lo + ((hi - lo) // f) * f
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    gm, wm, brain = gm[sl], wm[sl], brain[sl]
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    if f > 1:
        def down(a: np.ndarray) -> np.ndarray:
            s = a.shape
            return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))

        gm, wm, brain = down(gm), down(wm), down(brain)
        # voxel centre of the new grid sits between the averaged voxels
        affine[:3, 3] = affine[:3, :3] @ np.full(3, (f - 1) / 2.0) + affine[:3, 3]
        affine[:3, :3] = affine[:3, :3] * f
    tissue = np.clip(gm + wm, 0.0, 1.0)
    gm = np.minimum(gm, tissue)
    wm = tissue - gm
    brain = np.maximum(brain, tissue)  # a little GM/WM lies outside the thresholded mask
    csf = brain - tissue
    return {"GM": gm, "WM": wm, "CSF": csf, "brain": brain, "affine": affine,
            "resolution": float(resolution)}


def _deformation(shape: tuple[int, ...], rng: np.random.Generator, resolution: float) -> np.ndarray:
    """Sampling coordinates (3, X, Y, Z): random affine plus a smooth displacement field."""
    v = VARIATION
    centre = (np.asarray(shape, np.float64) - 1) / 2.0
    angles = np.deg2rad(rng.normal(0, v["rotation_deg"], 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = (rx @ ry @ rz) / (1.0 + rng.normal(0, v["scale"]))
    shift = rng.normal(0, v["shift_mm"], 3) / resolution
    # coarse random displacements, upsampled smoothly to the grid
    n_ctrl = [max(2, int(round(s * resolution / v["control_spacing_mm"])) + 1) for s in shape]
    coarse = rng.normal(0, v["deform_mm"] / resolution, (3, *n_ctrl))
    # cubic-spline upsampling, one axis at a time (separable, so cheap)
    mats = [_spline_matrix(c, s) for c, s in zip(n_ctrl, shape, strict=True)]
    coords = _affine_coords(shape, m, centre, shift)
    for ax in range(3):
        field = np.einsum("ia,abc->ibc", mats[0], coarse[ax])
        field = np.einsum("jb,ibc->ijc", mats[1], field)
        coords[ax] += np.einsum("kc,ijc->ijk", mats[2], field).astype(np.float32)
    return coords


def _affine_coords(shape: tuple[int, ...], m: np.ndarray, centre: np.ndarray,
                   shift: np.ndarray, slab_voxels: int = 1 << 20) -> np.ndarray:
    """float32 (3, X, Y, Z) coordinates ``m @ (index - centre) + centre + shift``, computed
    a few x-planes (about ``slab_voxels`` voxels) at a time: a whole-volume float64 index
    grid would cost ~0.3 GB at 1 mm in every ``prepare --workers`` process."""
    coords = np.empty((3, *shape), np.float32)
    c32, offset = centre[:, None].astype(np.float32), (centre + shift)[:, None]
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for x0 in range(0, shape[0], step):
        x1 = min(shape[0], x0 + step)
        grid = np.indices((x1 - x0, *shape[1:]), dtype=np.float32).reshape(3, -1)
        grid[0] += x0
        part = (m @ (grid - c32)) + offset
        coords[:, x0:x1] = part.reshape(3, x1 - x0, *shape[1:])
    return coords


def _spline_matrix(n_ctrl: int, n_out: int) -> np.ndarray:
    """(n_out, n_ctrl) matrix interpolating control values (spread over the axis) with a
    natural cubic spline."""
    from scipy.interpolate import CubicSpline

    x_ctrl = np.linspace(0.0, n_out - 1.0, n_ctrl)
    return CubicSpline(x_ctrl, np.eye(n_ctrl), bc_type="natural")(np.arange(n_out, dtype=float))


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic polynomial over the volume."""
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3]
    c = rng.normal(0, VARIATION["bias"], len(terms))
    log_field = sum(ci * t for ci, t in zip(c, terms, strict=True))
    return np.exp(np.broadcast_to(log_field, shape)).astype(np.float32)


def simulate_subject(
    index: int, *, seed: int = 0, contrasts: tuple[str, ...] = ("T1w", "T2w", "PDw"),
    resolution: float = DEFAULT_RESOLUTION, return_tissues: bool = False,
) -> dict[str, nib.Nifti1Image]:
    """Simulate virtual subject ``index`` (deterministic in ``seed`` and ``index``).

    Returns contrast -> float32 NIfTI image (skull-stripped, background 0, RAS affine).
    The subject's anatomy does not depend on which contrasts are asked for. With
    ``return_tissues`` the deformed tissue fractions are added as float32 arrays under
    ``"tissue:CSF"``, ``"tissue:GM"``, ``"tissue:WM"`` (ground truth for tests).
    """
    unknown = [c for c in contrasts if c not in SEQUENCES]
    if unknown:
        raise ConfigError(
            f"The builtin data set has no {', '.join(unknown)}; it simulates "
            f"{', '.join(SEQUENCES)}."
        )
    t = templates(resolution)
    shape = t["brain"].shape
    ss = np.random.SeedSequence([int(seed), int(index), 20091])
    anat_rng, tissue_rng, *contrast_rngs = (np.random.default_rng(s) for s in ss.spawn(
        2 + len(SEQUENCES)))
    coords = _deformation(shape, anat_rng, resolution)
    warp = {k: ndi.map_coordinates(t[k], coords, order=1, mode="constant", cval=0.0,
                                   prefilter=False) for k in ("GM", "WM", "brain")}
    tissue = np.clip(warp["GM"] + warp["WM"], 0.0, 1.0)
    frac = {"GM": np.minimum(warp["GM"], tissue)}
    frac["WM"] = tissue - frac["GM"]
    frac["CSF"] = np.clip(warp["brain"] - tissue, 0.0, 1.0)
    inside = warp["brain"] >= 0.5
    params = {
        name: {k: val * (1.0 + tissue_rng.normal(0, VARIATION["tissue_jitter"]))
               for k, val in props.items()}
        for name, props in TISSUES.items()
    }
    out: dict[str, nib.Nifti1Image] = {}
    for c, rng in zip(SEQUENCES, contrast_rngs, strict=True):
        if c not in contrasts:
            continue
        s = sum(frac[k] * signal(c, params[k]["T1"], params[k]["T2"], params[k]["PD"])
                for k in ("CSF", "GM", "WM"))
        s = s * _bias_field(shape, rng)
        gain = 1000.0 * np.exp(rng.normal(0, VARIATION["gain_log_sd"]))
        s *= gain / max(float(s[inside].mean()), 1e-6)
        sigma = VARIATION["noise"] * gain
        noisy = np.hypot(s + rng.normal(0, sigma, shape).astype(np.float32),
                         rng.normal(0, sigma, shape).astype(np.float32))
        noisy[~inside] = 0.0
        img = nib.Nifti1Image(noisy.astype(np.float32), t["affine"])
        img.header.set_xyzt_units("mm")
        img._mrsynth_name = f"builtin sim-{index + 1:03d} {c}"  # for error messages
        out[c] = img
    if return_tissues:
        for k in ("CSF", "GM", "WM"):
            out[f"tissue:{k}"] = frac[k].astype(np.float32)
    return out


def subject_id(index: int) -> str:
    return f"sim-{index + 1:03d}"


def index(
    *, n_subjects: int | None = None, seed: int = 0, contrasts: list[str] | tuple[str, ...] = (
        "T1w", "T2w"), resolution: float | None = None,
) -> tuple[DatasetIndex, dict[str, Any]]:
    """A :class:`DatasetIndex` of lazily simulated subjects, and the settings to record."""
    n = DEFAULT_N_SUBJECTS if n_subjects is None else int(n_subjects)
    if n < 1:
        raise ConfigError(f"--n-subjects must be at least 1, not {n}.")
    res = DEFAULT_RESOLUTION if resolution is None else float(resolution)
    if res not in RESOLUTIONS:
        raise ConfigError(
            f"--resolution {res:g} is not available for the builtin set; choose 1 or 2 (mm)."
        )
    wanted = tuple(c for c in contrasts if c in SEQUENCES)
    subjects = []
    for i in range(n):
        sid = subject_id(i)
        rec = SubjectRecord(
            id=sid, participant=sid,
            files={c: f"builtin/{sid}/{c}" for c in wanted},
            simulate=functools.partial(simulate_subject, i, seed=seed, contrasts=wanted,
                                       resolution=res),
        )
        subjects.append(rec)
    settings = {
        "n_subjects": n,
        "resolution_mm": res,
        "seed": int(seed),
        "template": "MNI ICBM152 2009a nonlinear symmetric GM/WM/brain mask (nilearn package "
                    "files)",
        "tissues": TISSUES,
        "sequences": SEQUENCES,
        "variation": VARIATION,
        "note": "simulation on a real anatomical template; use real data for real studies",
    }
    return DatasetIndex("builtin", "builtin", subjects), settings
