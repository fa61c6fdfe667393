"""Plain helpers shared by test modules (fixtures live in conftest.py).

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` (rootdir
``tests`` has no ``__init__.py``), and worker processes started by ``torch.multiprocessing``
inherit that path, so they can import it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from two threads, and on a shared 2-core machine OpenMP
    threads competing with other processes slow them down many-fold (the reduced demo:
    14 s with one thread, 91 s with two under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def norm_cancelled_biases(model: nn.Module) -> set[str]:
    """Names of conv biases directly followed by an instance norm (their gradient is zero).

    The norm subtracts such a bias again, so Adam moves it by +-lr along rounding noise,
    differently in any two implementations; weight comparisons leave these out.
    """
    out = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (name, m), (_, nxt) in zip(kids, kids[1:], strict=False):
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and isinstance(
                    nxt, nn.InstanceNorm2d
                ) and m.bias is not None:
                    out.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return out
