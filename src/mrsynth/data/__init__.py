"""Reading volumes, slicing, normalising, and the built-in data set.

Modules: :mod:`~mrsynth.data.readers` (BIDS / HCP / 2-D folders),
:mod:`~mrsynth.data.volumes` (load, validate, reorient, brain mask),
:mod:`~mrsynth.data.normalise`, :mod:`~mrsynth.data.slicing`,
:mod:`~mrsynth.data.prepare` (``prepare_dataset``), :mod:`~mrsynth.data.builtin`
(the simulated set), :mod:`~mrsynth.data.prepared` (the file format).
"""

from __future__ import annotations

import warnings


class DataWarning(UserWarning):
    """Something about the input data worth telling the user that does not stop the run
    (a skipped subject, a resampled contrast, brain cut off by the crop)."""


def warn(message: str, sink: list[str] | None = None) -> None:
    """Issue a :class:`DataWarning` and remember it in ``sink`` (recorded in settings)."""
    if sink is not None:
        sink.append(message)
    warnings.warn(message, DataWarning, stacklevel=3)
