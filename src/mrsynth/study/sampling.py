"""Choosing the study's images: balanced per contrast and model, no slice shown twice.

Single-image mode: ``n_real`` real images split evenly over the contrasts and
``n_synthetic`` synthetic images split evenly over models x contrasts (a remainder
goes to randomly chosen groups). Each (subject, slice, contrast) is used at most
once in the whole study, so no reader sees the real and a synthetic version of the
same slice (nor two models' versions of it). Groups are filled scarcest first, each
drawing uniformly from what is left.

2AFC mode: ``n_synthetic`` pairs; each synthetic image is paired with a real image
of the same contrast, from the same subject and slice (``matched``, the default:
the reader compares like with like) or from a slice not used elsewhere
(``unmatched``).

Practice items (shown first, with feedback, not scored) come from slices not used
by any scored item, so feedback can never teach the answer of a scored trial.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import cycle

import numpy as np

from mrsynth.errors import DataError
from mrsynth.study.sources import ImageRef


@dataclass
class Item:
    real: ImageRef | None
    synthetic: ImageRef | None
    practice: bool = False


@dataclass
class Sample:
    items: list[Item]
    counts: dict[tuple[str, str | None, str], int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def split_quota(n: int, groups: list, rng: np.random.Generator) -> dict:
    """``n`` spread over ``groups`` as evenly as possible; extras go to random groups."""
    if not groups:
        return {}
    base, extra = divmod(n, len(groups))
    lucky = set(rng.choice(len(groups), size=extra, replace=False).tolist()) if extra else set()
    return {g: base + (1 if i in lucky else 0) for i, g in enumerate(groups)}


class _Picker:
    """Draws refs while keeping keys unique across the whole study."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.used_keys: set[tuple[str, int, str]] = set()
        self.used_refs: set[ImageRef] = set()

    def free(self, refs: list[ImageRef]) -> list[ImageRef]:
        return [
            r
            for r in refs
            if r not in self.used_refs and (r.key is None or r.key not in self.used_keys)
        ]

    def take(self, ref: ImageRef) -> None:
        self.used_refs.add(ref)
        if ref.key is not None:
            self.used_keys.add(ref.key)

    def draw(self, refs: list[ImageRef], n: int) -> list[ImageRef] | None:
        """Up to ``n`` refs with distinct unused keys, uniformly at random; None if too few."""
        cand = self.free(refs)
        chosen: list[ImageRef] = []
        seen: set = set()
        for i in self.rng.permutation(len(cand)):
            r = cand[int(i)]
            if r.key is not None and r.key in seen:
                continue
            chosen.append(r)
            if r.key is not None:
                seen.add(r.key)
            if len(chosen) == n:
                break
        if len(chosen) < n:
            return None
        for r in chosen:
            self.take(r)
        return chosen


def _group_name(kind: str, model: str | None, contrast: str) -> str:
    return f"real {contrast}" if kind == "real" else f"synthetic {contrast} from {model}"


def sample_items(
    real: list[ImageRef],
    synthetic: dict[str, list[ImageRef]],
    *,
    contrasts: list[str],
    mode: str,
    n_real: int,
    n_synthetic: int,
    n_practice: int,
    pairing: str,
    seed: int,
) -> Sample:
    rng = np.random.default_rng(seed)
    pools: dict[tuple[str, str | None, str], list[ImageRef]] = defaultdict(list)
    for r in real:
        if r.contrast in contrasts:
            pools[("real", None, r.contrast)].append(r)
    for model, refs in synthetic.items():
        for r in refs:
            if r.contrast in contrasts:
                pools[("synthetic", model, r.contrast)].append(r)
    models = list(synthetic)
    syn_groups = [("synthetic", m, c) for m in models for c in contrasts]
    real_groups = [("real", None, c) for c in contrasts]
    for g in syn_groups + real_groups:
        if not pools[g]:
            raise DataError(
                f"No {_group_name(*g)} images were found. Check the --real/--synthetic "
                "directories and that file names end in _<contrast> (e.g. _T1w.npy), or "
                "restrict the study with --contrasts."
            )
    warnings = []
    keyless = sum(1 for refs in pools.values() for r in refs if r.key is None)
    if keyless:
        warnings.append(
            f"{keyless} candidate images have no subject and slice in their names "
            "(sub-<id>_slice-<k>_<contrast>); the study cannot make sure a reader never sees "
            "both the real and a synthetic version of those slices."
        )
    picker = _Picker(rng)
    if mode == "single":
        items, counts = _sample_single(
            pools, picker, real_groups, syn_groups, n_real, n_synthetic, rng
        )
    else:
        items, counts = _sample_pairs(pools, picker, syn_groups, n_synthetic, pairing, rng)
    if n_practice:
        items += _sample_practice(
            pools, picker, real_groups, syn_groups, mode, pairing, n_practice, rng
        )
    return Sample(items=items, counts=counts, warnings=warnings)


def _too_few(group: tuple, need: int, have: int, what: str) -> DataError:
    return DataError(
        f"Not enough {_group_name(*group)} images for the {what}: {need} needed, {have} "
        "available once each (subject, slice, contrast) is used only once. Lower "
        "--n-real/--n-synthetic/--n-practice or give more images."
    )


def _sample_single(pools, picker, real_groups, syn_groups, n_real, n_synthetic, rng):
    quotas = {**split_quota(n_real, real_groups, rng), **split_quota(n_synthetic, syn_groups, rng)}
    # Scarcest groups first, so a small group is not starved by a large one sharing its slices.
    order = sorted(quotas, key=lambda g: (len(pools[g]) - quotas[g], str(g)))
    chosen: dict = {}
    for g in order:
        picked = picker.draw(pools[g], quotas[g])
        if picked is None:
            raise _too_few(g, quotas[g], len(picker.free(pools[g])), "scored trials")
        chosen[g] = picked
    items = []
    for g in real_groups + syn_groups:
        for r in chosen[g]:
            items.append(Item(real=r, synthetic=None) if g[0] == "real" else Item(None, r))
    return items, {g: quotas[g] for g in real_groups + syn_groups}


def _draw_pairs(pools, picker, g, n, pairing, what):
    reals = pools[("real", None, g[2])]
    if pairing == "matched":
        by_key = {r.key: r for r in picker.free(reals) if r.key is not None}
        cands = [s for s in picker.free(pools[g]) if s.key is not None and s.key in by_key]
        picked = picker.draw(cands, n)
        if picked is None:
            raise DataError(
                f"Not enough {_group_name(*g)} images with a real image of the same subject "
                f"and slice for the {what}: {n} needed, {len(cands)} available. Give the real "
                "images of the same test slices, use --pairing unmatched, or lower the counts."
            )
        pairs = []
        for s in picked:
            r = by_key[s.key]
            picker.used_refs.add(r)
            pairs.append(Item(real=r, synthetic=s))
        return pairs
    syn = picker.draw(pools[g], n)
    if syn is None:
        raise _too_few(g, n, len(picker.free(pools[g])), what)
    real = picker.draw(reals, n)
    if real is None:
        raise _too_few(("real", None, g[2]), n, len(picker.free(reals)), what)
    return [Item(real=r, synthetic=s) for r, s in zip(real, syn, strict=True)]


def _sample_pairs(pools, picker, syn_groups, n_synthetic, pairing, rng):
    quotas = split_quota(n_synthetic, syn_groups, rng)
    order = sorted(quotas, key=lambda g: (len(pools[g]) - quotas[g], str(g)))
    per_group = {
        g: _draw_pairs(pools, picker, g, quotas[g], pairing, "scored trials") for g in order
    }
    items = [it for g in syn_groups for it in per_group[g]]
    return items, {g: quotas[g] for g in syn_groups}


def _sample_practice(pools, picker, real_groups, syn_groups, mode, pairing, n, rng):
    items: list[Item] = []
    syn_cycle = cycle([syn_groups[int(i)] for i in rng.permutation(len(syn_groups))])
    if mode == "2afc":
        for _ in range(n):
            g = next(syn_cycle)
            items += [
                Item(it.real, it.synthetic, practice=True)
                for it in _draw_pairs(pools, picker, g, 1, pairing, "practice trials")
            ]
        return items
    real_cycle = cycle([real_groups[int(i)] for i in rng.permutation(len(real_groups))])
    kinds = ["real"] * (n // 2) + ["synthetic"] * (n - n // 2)
    for k in rng.permutation(kinds):
        g = next(real_cycle) if k == "real" else next(syn_cycle)
        picked = picker.draw(pools[g], 1)
        if picked is None:
            raise _too_few(g, 1, 0, "practice trials")
        r = picked[0]
        items.append(Item(r, None, True) if k == "real" else Item(None, r, True))
    return items
