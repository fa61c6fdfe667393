"""The file-name contract of 2-D slices: ``<subject>_slice-<k:03d>_<contrast>.<ext>``.

``evaluate`` writes every synthetic slice under this name and ``study create``
reads subject, slice and contrast back from it to pair a synthetic image with
its real twin (and never show both to one reader). One module owns both
directions so that the writer and the reader cannot drift apart.

Subject labels are compared without the BIDS ``sub-`` prefix
(:func:`subject_label`), so ``sub-ms19`` (a prepared BIDS subject), ``ms19`` and
the built-in set's ``sim-007`` all round-trip.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: BIDS entity keys that can precede ``slice-`` without being a subject id
#: (``ses-1_slice-7_T1w`` has no subject; ``sim-007_slice-7_T1w`` has ``sim-007``).
BIDS_ENTITIES = frozenset(
    ("ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt",
     "part", "space", "desc", "trc", "sample", "chunk", "res", "den", "label", "seg")
)

_SLICE_RE = re.compile(r"^slice-(\d+)$")


class SliceName(NamedTuple):
    """What a slice file name says: subject label (no ``sub-``), slice index, contrast."""

    subject: str | None
    slice: int | None
    contrast: str


def subject_label(subject: str) -> str:
    """The subject id used for matching: without a leading BIDS ``sub-``."""
    return subject[4:] if subject.startswith("sub-") and len(subject) > 4 else subject


def format_slice_name(subject: str, slice_index: int, contrast: str, ext: str = ".npy") -> str:
    """The file name of one slice, e.g. ``sim-007_slice-037_T2w.npy``.

    ``subject`` is written as given (a prepared file's ``sub-ms19`` keeps its prefix).
    """
    if not subject or "_" in subject or "/" in subject:
        raise ValueError(f"subject {subject!r} cannot be part of a slice file name")
    if "_" in contrast or not contrast:
        raise ValueError(f"contrast {contrast!r} cannot be part of a slice file name")
    if slice_index < 0:
        raise ValueError(f"slice index must be >= 0, not {slice_index}")
    return f"{subject}_slice-{int(slice_index):03d}_{contrast}{ext}"


def parse_slice_name(stem: str) -> SliceName:
    """(subject, slice, contrast) from a file name without its extension.

    The contrast is the last ``_`` entity; the slice the ``slice-<k>`` entity; the
    subject the ``sub-`` entity, or else everything before ``slice-`` unless that
    starts with another BIDS entity (``ses-``, ``desc-`` ...).
    """
    parts = stem.split("_")
    contrast = parts[-1]
    subject: str | None = None
    slice_: int | None = None
    for i, part in enumerate(parts[:-1]):
        if part.startswith("sub-") and len(part) > 4:
            subject = part
        m = _SLICE_RE.match(part)
        if m:
            slice_ = int(m.group(1))
            if subject is None and i > 0 and parts[0].split("-", 1)[0] not in BIDS_ENTITIES:
                subject = "_".join(parts[:i])
    return SliceName(subject_label(subject) if subject else None, slice_, contrast)
