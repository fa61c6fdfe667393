"""Damage inside a prepared file is found on load: value ranges, masks, checksums (issue 10)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mrsynth.cli import main
from mrsynth.data.prepared import _read_stored_npz, load_prepared
from mrsynth.errors import DataError


def _members(path: Path) -> dict[str, np.ndarray]:
    """Every array, read as ``load_prepared`` reads them: without zip's CRC check (which
    the fast reader skips, so the stored sha256 sums are what finds damage)."""
    arrays = _read_stored_npz(path)
    assert arrays is not None
    return arrays


def _rewrite(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _poke(src: Path, dest: Path, member: str, values: np.ndarray, at: int = 0) -> None:
    """Overwrite bytes of one member in place (the archive stays a valid zip), as damage would."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(member + ".npy")
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = np.frombuffer(raw[info.header_offset + 26: info.header_offset + 30],
                                        "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)  # the .npy member
    npy_header = info.file_size - _members(src)[member].nbytes
    data = bytes(values)
    pos = start + npy_header + at
    raw[pos: pos + len(data)] = data
    dest.write_bytes(bytes(raw))


def test_checksums_are_stored_for_every_array_and_match_an_independent_hash(prepared_small):
    arrays = _members(prepared_small)
    sums = json.loads(str(arrays.pop("checksums")))
    assert set(sums) == set(arrays)
    for name, arr in arrays.items():
        assert sums[name] == hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_finite_garbage_in_images_is_refused_and_data_info_reports_it(prepared_small, tmp_path,
                                                                      capsys):
    bad = tmp_path / "garbage.npz"
    _poke(prepared_small, bad, "image__T2w", np.full(8, 8.5e37, np.float32), at=4 * 1000)
    with pytest.raises(DataError) as err:
        load_prepared(bad)
    msg = str(err.value)
    assert str(bad) in msg and "image__T2w" in msg and "mrsynth data prepare" in msg
    rc = main(["data", "info", str(bad)])
    out = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "image__T2w" in out and "Traceback" not in out


def test_a_tiny_change_is_caught_by_the_checksum(prepared_small, tmp_path):
    bad = tmp_path / "flip.npz"
    d = _members(prepared_small)
    v = d["image__T1w"].reshape(-1)[123]
    _poke(prepared_small, bad, "image__T1w", np.asarray([v * 0.5], np.float32), at=4 * 123)
    assert _members(bad)["image__T1w"].min() >= -1  # still in range: only the sum can tell
    with pytest.raises(DataError, match=r"image__T1w do not match the sha256.*data prepare"):
        load_prepared(bad)


def test_files_without_checksums_still_load_with_the_range_check(prepared_small, tmp_path):
    arrays = _members(prepared_small)
    del arrays["checksums"]
    old = tmp_path / "old.npz"
    _rewrite(old, arrays)
    d = load_prepared(old)  # written before checksums existed: loads
    np.testing.assert_array_equal(d.images["T1w"], arrays["image__T1w"])
    arrays["image__T1w"] = arrays["image__T1w"].copy()
    arrays["image__T1w"][3, 10, 10] = 8.5e37
    _rewrite(old, arrays)
    with pytest.raises(DataError, match=r"old\.npz: image__T1w has values from .* to 8\.5e\+37"):
        load_prepared(old)
    arrays["image__T1w"][3, 10, 10] = np.nan
    _rewrite(old, arrays)
    with pytest.raises(DataError, match="NaN or Inf"):
        load_prepared(old)


def test_a_mask_that_is_not_boolean_is_refused(prepared_small, tmp_path):
    arrays = _members(prepared_small)
    del arrays["checksums"]
    p = tmp_path / "m.npz"
    _rewrite(p, {**arrays, "mask": arrays["mask"].astype(np.float32)})
    with pytest.raises(DataError, match=r"m\.npz: mask has dtype float32, expected bool"):
        load_prepared(p)
    bad = tmp_path / "bytes.npz"  # bool dtype, but a byte that is neither 0 nor 1
    _poke(prepared_small, bad, "mask", np.asarray([7], np.uint8), at=50)
    with pytest.raises(DataError, match=r"mask do not match the sha256"):
        load_prepared(bad)
    _rewrite(bad, {k: v for k, v in _members(bad).items() if k != "checksums"})
    with pytest.raises(DataError, match=r"bytes\.npz: mask holds bytes other than 0 and 1"):
        load_prepared(bad)
