"""Parallel, resumable, shardable preparation into a store (issue 13 item 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mrsynth.data import DataWarning
from mrsynth.data import store as st
from mrsynth.data.prepare_parallel import parse_shard, prepare_store
from mrsynth.errors import ConfigError, DataError

#: Small builtin subjects (2 mm, downsampled x4 to 32x32, every 3rd brain slice).
OPTS = {"n_subjects": 6, "size": (32, 32), "downsample": 4, "slice_step": 3,
        "test_fraction": 0.2, "val_fraction": 0.25, "seed": 1}


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a store by relative path (the index without its creation time)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    index = json.loads(out.pop(st.INDEX_NAME))
    index["settings"].pop("created_utc")
    index.pop("index_sha256")
    out["index"] = json.dumps(index, sort_keys=True).encode()
    plan = json.loads(out.pop(st.PLAN_NAME))
    plan.pop("created_utc")
    out["plan"] = json.dumps(plan, sort_keys=True).encode()
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k] == fb[k], k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run with one worker."""
    out = tmp_path_factory.mktemp("ref") / "ref.mrs"
    assert prepare_store("builtin", out, workers=1, **OPTS) == out
    return out


def test_reference_store_holds_every_subject_with_its_split(reference: Path) -> None:
    d = st.open_store(reference)
    s = d.settings
    assert s["n_subjects"] == 6 and len(s["test_subjects"]) == 1 and len(s["val_subjects"]) == 1
    assert sorted(s["train_subjects"] + s["val_subjects"] + s["test_subjects"]) == \
        [f"sim-00{i}" for i in range(1, 7)]
    for split in ("train", "val", "test"):
        subs = set(np.unique(d.subject[d.split == split]).tolist())
        assert subs == set(s[f"{split}_subjects"])
    assert not st.partial_dir(reference).exists()


def test_two_workers_write_the_same_bytes_as_one(reference: Path, tmp_path: Path) -> None:
    out = prepare_store("builtin", tmp_path / "w2.mrs", workers=2, **OPTS)
    _assert_same_store(out, reference)


def test_a_killed_prepare_continues_and_equals_an_uninterrupted_run(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "k.mrs"
    part = st.partial_dir(out)
    code = ("from mrsynth.data.prepare_parallel import prepare_store; "
            f"prepare_store('builtin', {str(out)!r}, workers=1, **{OPTS!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    done: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(part.glob(f"{st.SHARDS}/*/{st.META_NAME}"))
        if len(done) >= 2:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(part.glob(f"{st.SHARDS}/*/{st.META_NAME}"))
    assert 2 <= len(done) < 6, "the kill did not land mid-way"
    assert not out.exists()
    first = {p.parent.name: p.stat().st_ino for p in done}

    with pytest.warns(DataWarning, match=f"{len(done)} of 6 subjects were already prepared"):
        assert prepare_store("builtin", out, workers=1, **OPTS) == out
    _assert_same_store(out, reference)
    for key, ino in first.items():  # finished shards were kept, not prepared again
        assert (out / st.SHARDS / key / st.META_NAME).stat().st_ino == ino
    assert not list((out / st.SHARDS).glob(".tmp-*"))


def test_two_shards_fill_one_store_and_the_last_publishes_it(reference: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "s.mrs"
    assert prepare_store("builtin", out, workers=1, shard="1/2", **OPTS) is None
    assert not out.exists()
    with pytest.raises(DataError, match="3 of 6 subjects .* are not prepared yet"):
        prepare_store("builtin", out, finalize_only=True, **OPTS)
    with pytest.raises(DataError, match="unfinished"):
        st.open_store(st.partial_dir(out))
    assert prepare_store("builtin", out, workers=1, shard="2/2", **OPTS) == out
    _assert_same_store(out, reference)


def test_finalize_writes_the_index_once_every_part_is_done(reference: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "f.mrs"
    part = st.partial_dir(out)
    shutil.copytree(reference, part)  # every shard done, as if the last part died
    (part / st.INDEX_NAME).unlink()
    assert prepare_store("builtin", out, finalize_only=True, **OPTS) == out
    _assert_same_store(out, reference)


def test_shard_option_is_checked() -> None:
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_other_options_on_an_unfinished_store_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.mrs"
    prepare_store("builtin", out, workers=1, shard="1/3", **OPTS)
    other = {**OPTS, "seed": 2}
    with pytest.raises(ConfigError, match="other options or subjects.*settings.seed"):
        prepare_store("builtin", out, workers=1, **other)
    assert prepare_store("builtin", out, workers=1, overwrite=True, **other) == out
    assert st.open_store(out).settings["seed"] == 2


def _broken_bids(mini_bids: Path, tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "bids"
    shutil.copytree(mini_bids, src)
    bad = sorted(src.glob("sub-*"))[1].name
    (src / bad / "anat" / f"{bad}_T2w.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return src, bad


def test_a_bad_subject_is_reported_and_skipped(mini_bids: Path, tmp_path: Path) -> None:
    src, bad = _broken_bids(mini_bids, tmp_path)
    opts = {"size": (64, 64), "downsample": 2, "slice_step": 4, "test_fraction": 0.0}
    with pytest.warns(DataWarning, match=f"Subject {bad} failed and is skipped"):
        out = prepare_store(src, tmp_path / "b.mrs", workers=2, **opts)
    d = st.open_store(out)
    good = sorted({p.name for p in src.glob("sub-*")} - {bad})
    assert sorted(np.unique(d.subject).tolist()) == good
    assert list(d.settings["failed_subjects"]) == [bad]
    assert f"{bad}_T2w.nii.gz" in d.settings["failed_subjects"][bad]
    assert any(bad in w for w in d.settings["warnings"])


def test_strict_stops_at_a_bad_subject_and_keeps_the_others(mini_bids: Path,
                                                            tmp_path: Path) -> None:
    src, bad = _broken_bids(mini_bids, tmp_path)
    out = tmp_path / "strict.mrs"
    opts = {"size": (64, 64), "downsample": 2, "slice_step": 4, "test_fraction": 0.0}
    with pytest.raises(DataError, match=f"Subject {bad} could not be prepared.*--strict"):
        prepare_store(src, out, workers=1, strict=True, **opts)
    assert not out.exists()
    kept = list(st.partial_dir(out).glob(f"{st.SHARDS}/*/{st.META_NAME}"))
    assert len(kept) == 1  # the subject before the bad one (sorted order) is kept


def test_npz_output_uses_a_temporary_store_and_equals_the_store(reference: Path,
                                                                tmp_path: Path) -> None:
    from mrsynth.data.prepared import load_prepared

    out = prepare_store("builtin", tmp_path / "one.npz", workers=2, **OPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz"]  # no partial left
    a, b = load_prepared(out), st.open_store(reference)
    assert a.images["T1w"].dtype == np.float32
    for c in a.contrasts:  # the store's float16 is the .npz's float32 rounded
        np.testing.assert_array_equal(a.images[c].astype(np.float16), b.images[c][:])
    np.testing.assert_array_equal(a.mask, b.mask[:])
    np.testing.assert_array_equal(a.subject, b.subject)
    np.testing.assert_array_equal(a.split, b.split)
    with pytest.raises(ConfigError, match="need a store output"):
        prepare_store("builtin", tmp_path / "two.npz", shard="1/2", **OPTS)


def test_when_every_subject_fails_the_error_says_why_and_nothing_is_left(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Every subject of builtin failed.*slice 500 does not"):
        prepare_store("builtin", tmp_path / "x.mrs", workers=1, **{**OPTS, "slices": "500"})
    assert list(tmp_path.iterdir()) == []


def test_parts_finishing_together_publish_one_store(reference: Path, tmp_path: Path) -> None:
    from mrsynth.data.prepare_parallel import finalize

    out = tmp_path / "r.mrs"
    part = st.partial_dir(out)
    shutil.copytree(reference, part)
    (part / st.INDEX_NAME).unlink()
    assert finalize(part, out) == out
    # the other part arrives a moment later: the store is already there, nothing changes
    assert finalize(part, out) == out
    # ... or it re-created the partial directory with just its index before publishing
    part.mkdir()
    shutil.copy(out / st.INDEX_NAME, part / st.INDEX_NAME)
    st.publish(part, out, replace=False)
    assert not part.exists()
    _assert_same_store(out, reference)
    with pytest.raises(OSError):  # a real failure to publish is not hidden
        st.publish(tmp_path / "nowhere", tmp_path / "elsewhere", replace=False)


# ----------------------------------------------------------------------------- the CLI
def _cli_args(out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "builtin", "--out", str(out), "--n-subjects", "6", "--size", "32",
            "32", "--downsample", "4", "--slice-step", "3", "--test-fraction", "0.2",
            "--val-fraction", "0.25", "--seed", "1", *extra]


def test_cli_prepares_shards_finalizes_inspects_and_converts(reference: Path, tmp_path: Path,
                                                             capsys) -> None:
    from mrsynth.cli import main
    from mrsynth.data.prepared import load_prepared

    out = tmp_path / "c.mrs"
    assert main(_cli_args(out, "--shard", "1/2", "--workers", "1")) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Part 1/2" in text and "3 of 6 subjects done" in text and not out.exists()
    assert main(_cli_args(out, "--finalize")) != 0
    assert "3 of 6 subjects" in " ".join(capsys.readouterr().err.split())
    assert main(_cli_args(out, "--shard", "2/2", "--workers", "1")) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"Wrote {out}" in text and "store" in text
    _assert_same_store(out, reference)

    assert main(["data", "info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "store" and summary["image_dtype"] == "float16"
    assert summary["n_slices"] == len(st.open_store(reference))

    npz = tmp_path / "c.npz"
    assert main(["data", "convert", str(out), str(npz), "-q"]) == 0
    back = tmp_path / "back.mrs"
    assert main(["data", "convert", str(npz), str(back), "-q"]) == 0
    a, b = st.open_store(back), st.open_store(reference)
    for c in a.contrasts:  # float16 -> float32 -> float16 is exact
        np.testing.assert_array_equal(a.images[c][:], b.images[c][:])
    np.testing.assert_array_equal(load_prepared(npz).mask, b.mask[:])
    assert main(["data", "convert", str(npz), str(back), "-q"]) != 0  # exists
    assert "--overwrite" in " ".join(capsys.readouterr().err.split())


def test_workers_run_one_numeric_library_thread_each(monkeypatch) -> None:
    """Each worker process caps OpenMP/OpenBLAS/MKL at one thread (N workers x N library
    threads would only contend for the cores); the parent's environment is restored."""
    from mrsynth.data import prepare_parallel as pp

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    seen: list[str | None] = []
    pp._run_pool([0, 1, 2], lambda i: (pp._THREAD_VARS[i],), 2, seen.append, fn=os.getenv)
    assert seen == ["1", "1", "1"]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ
