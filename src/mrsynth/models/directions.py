"""Translation directions: the two internal names and the one rule that reads a user's.

Every place that takes a direction from a user (``LoadedRun.translate``/``generator``,
``mrsynth translate --direction``, ``mrsynth export --direction``, the models' own
``translate``) goes through :func:`parse_direction`, so one spelling is accepted or refused
everywhere alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from mrsynth.errors import ConfigError

#: Translation directions: A -> B (e.g. T1w -> T2w) and back.
DIRECTIONS = ("A2B", "B2A")


def _spellings(a: str, b: str) -> dict[str, str]:
    """``<X>2<Y>`` and ``<X>-><Y>`` for both orders, lower case, onto A2B / B2A."""
    return {f"{a}2{b}".lower(): "A2B", f"{b}2{a}".lower(): "B2A",
            f"{a}->{b}".lower(): "A2B", f"{b}->{a}".lower(): "B2A"}


def parse_direction(text: str, contrasts: Sequence[str] | None = None) -> str:
    """``A2B`` or ``B2A`` for a direction as a user writes it.

    Accepted, in any case and ignoring spaces: ``A2B``/``B2A`` (also ``A->B``/``B->A``)
    and, given the run's contrasts (A, B), e.g. (T1w, T2w): ``T1w2T2w``/``T2w2T1w`` and
    ``T1w->T2w``/``T2w->T1w``. Anything else is a :class:`ConfigError` listing these.
    """
    table = _spellings("A", "B")
    if contrasts is not None:
        a, b = contrasts
        table.update(_spellings(a, b))
    key = "".join(text.split()).lower() if isinstance(text, str) else None
    if key in table:
        return table[key]
    if contrasts is None:
        raise ConfigError(
            f"Unknown direction {text!r}; use A2B or B2A (any case; 'A->B' and 'B->A' also "
            "work)."
        )
    a, b = contrasts
    raise ConfigError(
        f"Unknown direction {text!r} for a {a}/{b} run; use {a}2{b} or {b}2{a} (any case; "
        f"A2B, B2A and, quoted in a shell, '{a}->{b}', '{b}->{a}' also work)."
    )
