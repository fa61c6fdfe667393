"""pyproject declares compatible ranges; constraints.txt pins what is tested (issue 10 item 17)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


#: Extras that `make` does not install, so nothing pins or tests them.
UNTESTED_EXTRAS = {"tensorboard"}


def _requirements(tested_only: bool = False) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name, extra in project["optional-dependencies"].items():
        if not (tested_only and name in UNTESTED_EXTRAS):
            reqs += [Requirement(r) for r in extra]
    return reqs


def test_dependencies_are_ranges_that_the_tested_pins_satisfy():
    pins = _pins()
    for req in _requirements():
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops and "===" not in ops, f"{req} is an exact pin"
        assert ">=" in ops, f"{req} has no lower bound"
    for req in _requirements(tested_only=True):
        lower = [s for s in req.specifier if s.operator == ">="]
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req} excludes the tested {pins[name]}"
        # the lower bound is a tested version: the pin, not something older nobody ran
        assert Version(lower[0].version) == pins[name], f"{req}: lower bound is not the pin"


def test_torch_range_keeps_the_tested_minor_and_its_cuda_builds():
    (torch,) = [r for r in _requirements() if r.name == "torch"]
    assert torch.specifier.contains(Version("2.13.0+cu128"))  # a user's CUDA build of 2.13
    assert torch.specifier.contains(Version("2.13.1"))
    assert not torch.specifier.contains(Version("2.14.0"))  # pip must not pull a newer torch
    assert not torch.specifier.contains(Version("2.12.0"))  # never tested


def test_license_is_an_spdx_string_and_setuptools_can_read_it():
    data = _pyproject()
    assert data["project"]["license"] == "MIT"
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"]
                     if r.startswith("setuptools")]
    assert not setuptools.specifier.contains(Version("76.1"))  # PEP 639 strings need >= 77
    assert setuptools.specifier.contains(Version("77.0.3"))
