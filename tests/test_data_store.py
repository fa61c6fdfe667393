"""The prepared-slice store (issue 13 item 1): lazy sharded arrays, round trips with the
single-file ``.npz``, float16 error bound, damage detection."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mrsynth.data import store as st
from mrsynth.data.prepared import load_prepared
from mrsynth.errors import DataError


# ----------------------------------------------------------------------------- ShardedArray
@pytest.fixture
def sharded(tmp_path: Path) -> tuple[st.ShardedArray, np.ndarray]:
    rng = np.random.default_rng(3)
    parts = [rng.uniform(-1, 1, (n, 5, 4)).astype(np.float16) for n in (3, 1, 6, 2)]
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"{i}.npy")
        np.save(files[-1], p)
    whole = np.concatenate(parts).astype(np.float32)
    return st.ShardedArray(files, [len(p) for p in parts], (5, 4), np.float32, "test"), whole


def test_sharded_array_indexes_like_the_concatenated_array(sharded) -> None:
    arr, whole = sharded
    assert arr.shape == whole.shape and len(arr) == 12 and arr.ndim == 3
    rng = np.random.default_rng(0)
    keys = [0, 3, 11, -1, -12, slice(None), slice(2, 9), slice(None, None, -3),
            np.array([11, 0, 4, 4, 3]), rng.permutation(12)[:7], np.array([], int),
            np.arange(12) % 3 == 0, np.array([[1, 2], [10, 0]]), (5, 2), (np.array([1, 7]), 0, 1),
            (slice(1, 4), slice(None), 3), Ellipsis]
    for key in keys:
        got = arr[key]
        want = whole[key]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=repr(key))
    np.testing.assert_array_equal(np.asarray(arr), whole)
    np.testing.assert_array_equal(arr.reshape(12, -1).sum(axis=1), whole.reshape(12, -1).sum(1))
    assert float(arr.max()) == float(whole.max())
    np.testing.assert_array_equal(np.stack(list(arr)), whole)


def test_sharded_array_rejects_bad_indices_and_pickles_without_maps(sharded) -> None:
    arr, whole = sharded
    for key in (12, -13, np.array([0, 12]), np.ones(5, bool), np.array([0.5])):
        with pytest.raises(IndexError):
            arr[key]
    arr[0]  # opens a map
    clone = pickle.loads(pickle.dumps(arr))
    assert not clone._open
    np.testing.assert_array_equal(clone[[4, 1]], whole[[4, 1]])


def test_sharded_array_keeps_a_bounded_number_of_maps(sharded, monkeypatch) -> None:
    arr, whole = sharded
    monkeypatch.setattr(st, "OPEN_SHARDS", 2)
    np.testing.assert_array_equal(arr[:], whole)
    assert len(arr._open) == 2


def test_shard_keys_are_safe_and_distinct() -> None:
    ids = ["sub-01", "train/a b", "train/a_b", "../x", "sub-01_ses-1"]
    keys = [st.shard_key(i) for i in ids]
    assert len(set(keys)) == len(keys)
    assert all("/" not in k and not k.startswith(".") for k in keys)


# ----------------------------------------------------------------------------- round trips
def test_npz_to_float32_store_and_back_is_exact(prepared_small: Path, tmp_path: Path) -> None:
    old = load_prepared(prepared_small)
    store = st.write_store_from(old, tmp_path / "s.mrs", image_dtype="float32")
    assert not st.partial_dir(store).exists()
    new = st.open_store(store)
    assert isinstance(new.images["T1w"], st.ShardedArray)
    for name in ("subject", "slice_index", "crop", "split", "paired"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name), err_msg=name)
    for c in old.contrasts:
        np.testing.assert_array_equal(new.images[c][:], old.images[c])
        for name in ("available", "offset", "scale"):
            np.testing.assert_array_equal(getattr(new, name)[c], getattr(old, name)[c])
    np.testing.assert_array_equal(new.mask[:], old.mask)
    assert new.settings == old.settings and new.subjects == old.subjects
    # select / split_view materialise what they pick, like the in-memory data
    test = new.split_view("test")
    np.testing.assert_array_equal(test.images["T2w"], old.split_view("test").images["T2w"])

    back = st.store_to_npz(store, tmp_path / "back.npz")
    again = load_prepared(back)  # verifies the streamed checksums
    ref = tmp_path / "ref.npz"
    old.save(ref)
    with np.load(back) as a, np.load(ref) as b:
        assert sorted(a.files) == sorted(b.files)
        ca, cb = json.loads(str(a["checksums"])), json.loads(str(b["checksums"]))
        for k in ("settings", "subjects"):  # the same JSON, its keys sorted in the store
            assert json.loads(str(a[k])) == json.loads(str(b[k]))
            del ca[k], cb[k]
        assert ca == cb  # every array the same, byte for byte
    np.testing.assert_array_equal(again.images["T1w"], old.images["T1w"])


def test_float16_store_error_is_within_half_a_float16_step(prepared_small: Path,
                                                           tmp_path: Path) -> None:
    old = load_prepared(prepared_small)
    new = st.open_store(st.write_store_from(old, tmp_path / "h.mrs"))
    assert json.loads((tmp_path / "h.mrs" / st.INDEX_NAME).read_text())["image_dtype"] == "float16"
    for c in old.contrasts:
        err = np.abs(new.images[c][:] - old.images[c])
        # values in [-1, 1]: float16 spacing is at most 2**-10 there, rounding half of it
        assert err.max() <= 2.0**-11
        assert err.max() > 0  # really stored as float16
        assert new.images[c][:].min() >= -1 and new.images[c][:].max() <= 1
    bytes_16 = st.store_bytes(tmp_path / "h.mrs")
    bytes_32 = st.store_bytes(st.write_store_from(old, tmp_path / "f.mrs", image_dtype="float32"))
    assert bytes_16 < 0.65 * bytes_32


def test_compressed_npz_from_store(prepared_small: Path, tmp_path: Path) -> None:
    old = load_prepared(prepared_small)
    store = st.write_store_from(old, tmp_path / "s.mrs", image_dtype="float32")
    out = st.store_to_npz(store, tmp_path / "c.npz", compress=True)
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    np.testing.assert_array_equal(load_prepared(out).mask, old.mask)


# ----------------------------------------------------------------------------- damage
@pytest.fixture
def small_store(prepared_small: Path, tmp_path: Path) -> Path:
    return st.write_store_from(load_prepared(prepared_small), tmp_path / "d.mrs")


def _first_shard_file(root: Path, name: str) -> Path:
    index = json.loads((root / st.INDEX_NAME).read_text())
    return root / st.SHARDS / index["shards"][0]["key"] / f"{name}.npy"


def test_a_changed_shard_byte_is_found_by_its_checksum(small_store: Path) -> None:
    f = _first_shard_file(small_store, "image__T2w")
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit: still a valid, in-range float16
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"image__T2w\.npy does not match the sha256"):
        st.open_store(small_store)
    st.open_store(small_store, verify=False)  # presence and sizes only: passes


def test_a_truncated_shard_is_found_without_hashing(small_store: Path) -> None:
    f = _first_shard_file(small_store, "mask")
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"mask\.npy has \d+ bytes.*truncated"):
        st.open_store(small_store, verify=False)


def test_out_of_range_images_are_refused(small_store: Path) -> None:
    f = _first_shard_file(small_store, "image__T1w")
    arr = np.load(f)
    arr[0, 0, 0] = 3.0
    np.save(f, arr)
    index = json.loads((small_store / st.INDEX_NAME).read_text())
    index["shards"][0]["checksums"]["image__T1w"] = st.sha256_array(arr)
    st.write_index(small_store, index)  # a consistent index, but the data are out of range
    with pytest.raises(DataError, match="normalised to"):
        st.open_store(small_store)


def test_an_edited_index_and_an_unfinished_store_are_refused(small_store: Path,
                                                             tmp_path: Path) -> None:
    p = small_store / st.INDEX_NAME
    index = json.loads(p.read_text())
    index["shards"][0]["split"] = "train" if index["shards"][0]["split"] == "test" else "test"
    p.write_text(json.dumps(index))
    with pytest.raises(DataError, match="does not match the sha256 stored in it"):
        st.open_store(small_store)
    p.unlink()
    (small_store / st.PLAN_NAME).write_text("{}")
    with pytest.raises(DataError, match="unfinished.*Re-run the same"):
        st.open_store(small_store)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        st.open_store(empty)


# ----------------------------------------------------------------------------- consumers
@pytest.fixture(scope="module")
def store32(prepared_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepared_small`` as a float32 store: the same numbers, read lazily."""
    return st.write_store_from(load_prepared(prepared_small),
                               tmp_path_factory.mktemp("store") / "small.mrs",
                               image_dtype="float32")


def test_load_prepared_reads_a_store_by_its_path(store32: Path, prepared_small: Path) -> None:
    d = load_prepared(store32)
    assert isinstance(d.mask, st.ShardedArray) and d.path == store32
    assert len(d) == len(load_prepared(prepared_small))
    with pytest.raises(DataError, match="does not exist"):
        load_prepared(store32.parent / "missing.mrs")


def test_training_from_a_store_equals_training_from_the_npz(store32: Path, prepared_small: Path,
                                                            tmp_path: Path) -> None:
    import csv

    from safetensors.numpy import load_file

    from helpers import one_torch_thread
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    over = {"train.epochs": 1, "train.max_steps_per_epoch": 4, "train.log_every": 2,
            "train.samples": 2, "train.progress": False, "train.checkpoint_every_minutes": 0,
            "data.image_size": 32}
    cfg = resolve_config("simple", "cpu-small", over)
    with one_torch_thread():
        a = train(cfg, prepared_small, tmp_path / "npz")
        b = train(cfg, store32, tmp_path / "store")
    def losses(run: Path) -> list[dict[str, str]]:  # all but the speed column
        with open(run / "losses.csv", newline="") as fh:
            return [{k: v for k, v in r.items() if k != "images_per_s"}
                    for r in csv.DictReader(fh)]

    assert losses(a) == losses(b) and len(losses(a)) == 2
    wa = load_file(a / "checkpoints" / "latest" / "weights.safetensors")
    wb = load_file(b / "checkpoints" / "latest" / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_evaluate_and_the_study_read_a_store_like_the_npz(store32: Path, prepared_small: Path,
                                                         tmp_path: Path,
                                                         tmp_path_factory) -> None:
    import csv

    from helpers import one_torch_thread
    from mrsynth.cli import main
    from mrsynth.study.sources import load_masks, load_pixels, scan_source
    from test_eval_fixtures import tiny_run

    run = tiny_run(tmp_path_factory, prepared_small, "simple")
    rows = {}
    with one_torch_thread():
        for name, data in (("npz", prepared_small), ("store", store32)):
            out = tmp_path / name
            assert main(["evaluate", "--runs", str(run), "--data", str(data), "--out", str(out),
                         "--device", "cpu", "--c2st-steps", "5"]) == 0
            with open(out / "per_image.csv", newline="") as fh:
                rows[name] = list(csv.DictReader(fh))
    assert rows["npz"] == rows["store"] and len(rows["npz"]) > 0

    ra = scan_source(prepared_small, "real", None, ["T1w", "T2w"])
    rb = scan_source(store32, "real", None, ["T1w", "T2w"])
    assert [(r.contrast, r.index) for r in ra] == [(r.contrast, r.index) for r in rb]
    pa, pb = load_pixels(ra), load_pixels(rb)
    ma, mb = load_masks(ra, pa), load_masks(rb, pb)
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(pa[x], pb[y])
        np.testing.assert_array_equal(ma[x], mb[y])


def test_a_raw_data_set_given_as_prepared_data_gets_the_prepare_command(mrpaired: Path,
                                                                         tmp_path: Path) -> None:
    """Passing the BIDS folder itself where prepared data belong (``evaluate --data``) names
    the step that is missing; an unrelated folder gets the plain message."""
    with pytest.raises(DataError, match="raw data set: prepare it first with `mrsynth data "
                                        "prepare"):
        load_prepared(mrpaired)
    with pytest.raises(DataError, match=r"is not an mrsynth prepared store \(no store.json\)\.$"):
        load_prepared(tmp_path)
