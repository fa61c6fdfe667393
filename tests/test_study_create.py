"""`mrsynth study create`: reading sources, balanced disjoint sampling, identical rendering.

Real images are slices of the shared BIDS data set; "synthetic" ones are a fixed
blur/noise of real slices written with the `evaluate` naming rule (the study only
needs image files). Built once per session by benchmarks/study_load.py.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrsynth.cli import main
from mrsynth.data.volumes import brain_mask
from mrsynth.errors import ConfigError, DataError, OutputExistsError
from mrsynth.study import db as sdb
from mrsynth.study.create import create_study, parse_synthetic
from mrsynth.study.render import png_chunks, render_png, to_display
from mrsynth.study.sources import parse_name, scan_source


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _images(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM images")]
    finally:
        conn.close()


def _items(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM items")]
    finally:
        conn.close()


# --------------------------------------------------------------------------- names, rendering
def test_parse_name_conventions():
    assert parse_name("sub-ms19_slice-088_T2w.npy") == ("ms19", 88, "T2w")
    assert parse_name("sub-ms19_desc-cyclegan_T2w.nii.gz") == ("ms19", None, "T2w")
    assert parse_name("sub-a_ses-1_slice-7_T1w.png") == ("a", 7, "T1w")
    assert parse_name("image_T1w.tiff") == (None, None, "T1w")
    assert parse_name("ms19_slice-12_T1w.npy") == ("ms19", 12, "T1w")  # bare subject id
    assert parse_name("slice-12_T1w.npy") == (None, 12, "T1w")


def test_rendering_windows_and_encodes_without_metadata(study_inputs):
    real_dir, _ = study_inputs
    x = np.load(next(iter(sorted(real_dir.glob("*_T2w.npy")))))
    assert x.shape == (64, 64)
    # Robust window written out independently: foreground above min + 2 % of (p99.5 - min),
    # its 0.5 / 99.5 percentiles to black / white. No resize at display size 64.
    lo0 = x.min()
    fg = x > lo0 + 0.02 * (np.percentile(x, 99.5) - lo0)
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    expected = np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    got = to_display(x, size=64, window_method="robust", rotate=0)
    assert np.array_equal(got, expected)
    assert (got[x == lo0] == 0).all()  # background black
    assert got.max() == 255
    # Fixed window for normalised units: -1 -> 0, 1 -> 255.
    ramp = np.linspace(-1, 1, 64 * 64).reshape(64, 64)
    fixed = to_display(ramp, size=64, window_method="fixed")
    assert fixed[0, 0] == 0 and fixed[-1, -1] == 255
    # A quarter turn puts array row 0 on the left column.
    marked = np.zeros((64, 64))
    marked[0, 5] = 1.0
    marked[10:40, 10:40] = 0.5
    turned = to_display(marked, size=64, window_method="fixed", rotate=1)
    assert turned[64 - 1 - 5, 0] == 255

    # Padding to a square keeps the content centred: a 32 x 64 image gets 16 black rows above.
    wide = np.full((32, 64), 1.0)
    pad = to_display(wide, size=64, window_method="fixed")
    assert (pad[:16] == 0).all() and (pad[16:48] == 255).all() and (pad[48:] == 0).all()

    # Encoding: only IHDR/IDAT/IEND, 8-bit grey, and the same byte length for any content.
    a = render_png(x, size=96)
    b = render_png(np.random.default_rng(0).normal(size=(40, 70)), size=96)
    for png in (a, b):
        kinds = {k for k, _ in png_chunks(png)}
        assert kinds == {"IHDR", "IDAT", "IEND"}
        assert png[16:26] == (96).to_bytes(4, "big") + (96).to_bytes(4, "big") + bytes([8, 0])
    assert len(a) == len(b)
    assert png_chunks(a) == png_chunks(b)


# --------------------------------------------------------------------------- sampling
def test_create_single_is_balanced_disjoint_and_identically_rendered(study_inputs, tmp_path):
    real_dir, syn = study_inputs
    settings = sdb.StudySettings(n_real=12, n_synthetic=8, n_practice=4, display_size=64, seed=5)
    made = create_study(real_dir, syn, tmp_path / "s.db", settings)
    assert made.counts == {
        ("real", None, "T1w"): 6, ("real", None, "T2w"): 6,
        ("synthetic", "blur", "T1w"): 2, ("synthetic", "blur", "T2w"): 2,
        ("synthetic", "noise", "T1w"): 2, ("synthetic", "noise", "T2w"): 2,
    }
    images = _images(made.path)
    items = _items(made.path)
    scored = [i for i in items if not i["practice"]]
    assert len(scored) == 20 and len(items) == 24
    by_id = {im["id"]: im for im in images}
    groups = Counter(
        (by_id[i["real_image"] or i["synthetic_image"]]["kind"],
         by_id[i["real_image"] or i["synthetic_image"]]["model"],
         by_id[i["real_image"] or i["synthetic_image"]]["contrast"])
        for i in scored
    )
    assert groups == Counter({(k, m, c): n for (k, m, c), n in made.counts.items()})
    practice_kinds = Counter(by_id[i["real_image"] or i["synthetic_image"]]["kind"]
                             for i in items if i["practice"])
    assert practice_kinds == {"real": 2, "synthetic": 2}
    # No (subject, slice, contrast) twice in the study: never real and synthetic of one slice.
    keys = [(im["subject"], im["slice"], im["contrast"]) for im in images]
    assert len(set(keys)) == len(keys) == 24
    # Sources: real from the real directory, synthetic from the model's directory.
    for im in images:
        src = Path(im["source"])
        assert src.parent == (real_dir if im["kind"] == "real" else syn[im["model"]])
        assert parse_name(src.name) == (im["subject"], im["slice"], im["contrast"])
        # Every PNG is the one rendering path applied to the source file (RAS arrays turned),
        # masked with the head mask of the real slice of the same name.
        twin_mask = brain_mask(np.load(real_dir / src.name))
        expected = to_display(np.load(src), size=64, window_method="robust", rotate=1,
                              mask=twin_mask)
        assert np.array_equal(_decode(im["png"]), expected)
        assert im["sha256"] == hashlib.sha256(im["png"]).hexdigest()
    # Blinding at the byte level: identical length and chunk layout for every image.
    assert len({len(im["png"]) for im in images}) == 1
    assert len({tuple(png_chunks(im["png"])) for im in images}) == 1
    # WAL mode is stored in the file; the admin token only as a hash.
    conn = sdb.connect(made.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sdb.check_admin_token(conn, made.admin_token)
    assert not sdb.check_admin_token(conn, made.admin_token + "x")
    conn.close()
    assert made.admin_token.encode() not in made.path.read_bytes()
    # The same seed gives the same sample.
    again = create_study(real_dir, syn, tmp_path / "t.db", settings)
    assert sorted(im["source"] for im in _images(again.path)) == sorted(
        im["source"] for im in images
    )


def test_readers_get_own_shuffled_orders(study_inputs, tmp_path):
    real_dir, syn = study_inputs
    settings = sdb.StudySettings(n_real=8, n_synthetic=8, n_practice=2, display_size=32, seed=1)
    made = create_study(real_dir, syn, tmp_path / "s.db", settings)
    conn = sdb.connect(made.path)
    tokens = [sdb.add_reader(conn, f"r{i}") for i in range(3)]
    assert len(set(tokens)) == 3
    orders = []
    for i in range(3):
        rows = conn.execute(
            "SELECT t.item_id, t.practice, t.uid FROM trials t "
            "JOIN readers r ON r.id = t.reader_id WHERE r.name = ? ORDER BY t.position",
            (f"r{i}",),
        ).fetchall()
        assert [r["practice"] for r in rows] == [1, 1] + [0] * 16  # practice first
        orders.append([r["item_id"] for r in rows])
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # 18! orders: equal would be a bug
    uids = [r[0] for r in conn.execute("SELECT uid FROM trials")]
    assert len(set(uids)) == len(uids) == 54 and min(len(u) for u in uids) >= 32
    with pytest.raises(sdb.MrsynthError, match="already exists"):
        sdb.add_reader(conn, "r0")
    new = sdb.reset_reader_token(conn, "r0")
    assert sdb.reader_by_token(conn, new)["name"] == "r0"
    assert sdb.reader_by_token(conn, tokens[0]) is None
    conn.close()


def test_create_2afc_matched_pairs(study_inputs, tmp_path):
    real_dir, syn = study_inputs
    settings = sdb.StudySettings(mode="2afc", n_synthetic=8, n_practice=2, display_size=32)
    made = create_study(real_dir, syn, tmp_path / "p.db", settings)
    by_id = {im["id"]: im for im in _images(made.path)}
    items = _items(made.path)
    assert len(items) == 10
    for it in items:
        r, s = by_id[it["real_image"]], by_id[it["synthetic_image"]]
        assert r["kind"] == "real" and s["kind"] == "synthetic"
        assert [r[k] for k in ("subject", "slice", "contrast")] == [
            s[k] for k in ("subject", "slice", "contrast")
        ]
    keys = [(by_id[it["synthetic_image"]]["subject"], by_id[it["synthetic_image"]]["slice"],
             by_id[it["synthetic_image"]]["contrast"]) for it in items]
    assert len(set(keys)) == len(keys)
    conn = sdb.connect(made.path)
    sdb.add_reader(conn, "a")
    slots = [r[0] for r in conn.execute("SELECT real_slot FROM trials WHERE practice = 0")]
    assert sorted(slots) == [0] * 4 + [1] * 4  # sides balanced
    conn.close()
    # Unmatched pairing: real partner from another slice.
    settings = sdb.StudySettings(mode="2afc", n_synthetic=8, pairing="unmatched", display_size=32)
    made = create_study(real_dir, syn, tmp_path / "u.db", settings)
    by_id = {im["id"]: im for im in _images(made.path)}
    keys = [(by_id[i]["subject"], by_id[i]["slice"], by_id[i]["contrast"])
            for it in _items(made.path) for i in (it["real_image"], it["synthetic_image"])]
    assert len(set(keys)) == 16


def test_create_from_prepared_file_uses_test_split(study_inputs, tmp_path):
    from mrsynth.data.prepared import PreparedData

    real_dir, syn = study_inputs
    files = sorted(real_dir.glob("*_T1w.npy"))
    n = len(files)
    t1 = np.stack([np.load(f) for f in files])
    t2 = np.stack([np.load(str(f).replace("_T1w", "_T2w")) for f in files])
    names = [parse_name(f.name) for f in files]
    subject = np.array([f"sub-{s}" for s, _, _ in names])
    data = PreparedData(
        images={"T1w": t1, "T2w": t2},
        available={"T1w": np.ones(n, bool), "T2w": np.ones(n, bool)},
        offset={"T1w": np.zeros(n), "T2w": np.zeros(n)},
        scale={"T1w": np.ones(n), "T2w": np.ones(n)},
        mask=t1 > -1,
        subject=subject,
        slice_index=np.array([k for _, k, _ in names], dtype=np.int32),
        crop=np.zeros((n, 2), np.int32),
        split=np.where(subject == "sub-ms19", "test", "train"),
        paired=np.ones(n, bool),
        settings={"size": [64, 64]},
    )
    prepared = data.save(tmp_path / "prep.npz")
    refs = scan_source(prepared, "real", None, ["T1w", "T2w"])
    assert {r.subject for r in refs} == {"ms19"}
    assert len(refs) == 2 * int((subject == "sub-ms19").sum())
    settings = sdb.StudySettings(n_real=6, n_synthetic=4, display_size=64, window="fixed")
    made = create_study(prepared, {"blur": syn["blur"]}, tmp_path / "s.db", settings)
    reals = [im for im in _images(made.path) if im["kind"] == "real"]
    assert len(reals) == 6
    for im in reals:
        assert im["subject"] == "ms19" and "#row=" in im["source"]
        row = int(im["source"].split("#row=")[1])
        expected = to_display(data.images[im["contrast"]][row], size=64, window_method="fixed",
                              rotate=1, mask=data.mask[row])
        assert np.array_equal(_decode(im["png"]), expected)


def test_nifti_volumes_never_show_both_versions(study_inputs, mrpaired, tmp_path):
    _, syn = study_inputs
    real_dir = tmp_path / "bids"
    real_dir.mkdir()
    src = mrpaired / "sub-ms19" / "anat" / "sub-ms19_T1w.nii.gz"
    (real_dir / src.name).symlink_to(src)
    ms19 = tmp_path / "syn"
    ms19.mkdir()
    for f in syn["blur"].glob("sub-ms19_*_T1w.npy"):
        (ms19 / f.name).symlink_to(f)
    n_syn = len(list(ms19.iterdir()))
    settings = sdb.StudySettings(n_real=40, n_synthetic=n_syn, contrasts=["T1w"],
                                 display_size=32, seed=2)
    made = create_study(real_dir, {"blur": ms19}, tmp_path / "n.db", settings)
    images = _images(made.path)
    real_slices = {im["slice"] for im in images if im["kind"] == "real"}
    syn_slices = {im["slice"] for im in images if im["kind"] == "synthetic"}
    assert len(real_slices) == 40 and len(syn_slices) == n_syn
    assert not real_slices & syn_slices  # every synthetic slice's real twin was excluded
    assert all(im["native_h"] == 182 and im["native_w"] == 218
               for im in images if im["kind"] == "real")
    assert any("native sizes" in w for w in made.warnings)


def test_create_errors(study_inputs, tmp_path):
    real_dir, syn = study_inputs
    out = tmp_path / "s.db"
    with pytest.raises(DataError, match="Not enough real T1w"):
        create_study(real_dir, syn, out, sdb.StudySettings(n_real=1000, n_synthetic=4))
    assert not out.exists()
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_synthetic(["justapath"])
    with pytest.raises(ConfigError, match="six-point"):
        create_study(real_dir, syn, out, sdb.StudySettings(mode="2afc", scale="six"))
    with pytest.raises(DataError, match="does not exist"):
        create_study(tmp_path / "nope", syn, out, sdb.StudySettings())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        create_study(real_dir, {"x": empty}, out, sdb.StudySettings())
    create_study(real_dir, syn, out, sdb.StudySettings(n_real=4, n_synthetic=4, display_size=32))
    with pytest.raises(OutputExistsError):
        create_study(real_dir, syn, out, sdb.StudySettings(n_real=4, n_synthetic=4))
    not_db = tmp_path / "x.db"
    not_db.write_text("hello")
    with pytest.raises(DataError, match="not"):
        sdb.connect(not_db)
    with pytest.raises(DataError, match="does not exist"):
        sdb.connect(tmp_path / "missing.db")


def test_cli_create_and_add_reader(study_inputs, tmp_path, capsys):
    real_dir, syn = study_inputs
    out = tmp_path / "cli.db"
    args = ["study", "create", "--real", str(real_dir), "--synthetic", f"blur={syn['blur']}",
            "--n-real", "4", "--n-synthetic", "4", "--display-size", "32", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    token = text.split("Admin token")[1].split("\n")[1].strip()
    conn = sdb.connect(out)
    assert sdb.check_admin_token(conn, token)
    conn.close()
    assert main(args) == OutputExistsError.exit_code  # refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["study", "add-reader", str(out), "ann", "--base-url", "http://host:9/"]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link.startswith("http://host:9/r/")
    conn = sdb.connect(out)
    assert sdb.reader_by_token(conn, link.rsplit("/", 1)[1])["name"] == "ann"
    conn.close()
    assert main(["study", "add-reader", str(out), "ann"]) != 0
    assert main(["study", "results", str(tmp_path / "none.db")]) != 0


def test_study_from_prepare_dataset_and_evaluate_style_slices(prepared_small, tmp_path):
    """The real pipeline's inputs: `data prepare` output + slices named like `evaluate`'s."""
    from scipy import ndimage

    from mrsynth.data.prepared import load_prepared

    test = load_prepared(prepared_small).split_view("test")
    syn_dir = tmp_path / "synthetic" / "blurnet"
    syn_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(len(test)):
        subj, k = str(test.subject[i]), int(test.slice_index[i])
        for c in ("T1w", "T2w"):
            fake = ndimage.gaussian_filter(test.images[c][i], 1.2) + rng.normal(0, 0.02, (64, 64))
            np.save(syn_dir / f"{subj}_slice-{k:03d}_{c}.npy", fake.astype(np.float32))
    settings = sdb.StudySettings(n_real=16, n_synthetic=16, n_practice=2, display_size=64)
    made = create_study(prepared_small, {"blurnet": syn_dir}, tmp_path / "s.db", settings)
    assert made.warnings == []  # same size and kind of file: nothing for readers to notice
    images = _images(made.path)
    pairs = zip(test.subject, test.slice_index, strict=True)
    test_keys = {(str(s).removeprefix("sub-"), int(k)) for s, k in pairs}
    keys = [(im["subject"], im["slice"], im["contrast"]) for im in images]
    assert len(set(keys)) == len(keys) == 34
    assert all((s, k) in test_keys for s, k, _ in keys)
    by_id = {im["id"]: im for im in images}
    scored = Counter(
        (by_id[i["real_image"] or i["synthetic_image"]]["kind"],
         by_id[i["real_image"] or i["synthetic_image"]]["contrast"])
        for i in _items(made.path) if not i["practice"]
    )
    assert scored == {(k, c): 8 for k in ("real", "synthetic") for c in ("T1w", "T2w")}
    assert len({len(im["png"]) for im in images}) == 1


# --------------------------------------------------------------------------- blinding (item 11)
def test_threshold_accuracy_by_hand():
    from mrsynth.study.blinding import threshold_accuracy

    assert threshold_accuracy([0, 0, 0], [1, 2, 3]) == (1.0, 0.0)
    assert threshold_accuracy([5, 6, 7], [1, 2, 3]) == (1.0, 3.0)  # either direction
    assert threshold_accuracy([1, 2], [1, 2])[0] == 0.5
    # 3 of 4 real below 2.5, all synthetic above: (3/4 + 1) / 2
    assert threshold_accuracy([1, 2, 3, 2], [3, 4, 5])[0] == pytest.approx(0.875)


def test_grey_background_is_masked_away_and_detected(study_inputs, tmp_path):
    """A model that leaves grey corners (like UNIT) is told apart by "corner above 0" unless
    every image is rendered with the real slice's mask; `study create` checks for it."""
    from mrsynth.study.blinding import separability_warnings

    real_dir, syn = study_inputs
    unit = tmp_path / "unit"
    unit.mkdir()
    rng = np.random.default_rng(3)
    for f in sorted(syn["blur"].glob("*.npy")):
        x = np.load(f)
        head = brain_mask(np.load(real_dir / f.name))
        grey = -1 + rng.uniform(0.03, 0.23) + rng.normal(0, 0.01, x.shape)  # 4-29 of 255
        np.save(unit / f.name, np.where(head, x, grey).astype(np.float32))
    settings = sdb.StudySettings(n_real=12, n_synthetic=12, display_size=64, window="fixed")
    made = create_study(real_dir, {"unit": unit}, tmp_path / "s.db", settings)
    images = _images(made.path)
    # Without the mask the corners give the model away, and the check says so.
    raw = {kind: [to_display(np.load(im["source"]), size=64, window_method="fixed", rotate=1)
                  for im in images if im["kind"] == kind] for kind in ("real", "synthetic")}
    assert all(d[:6, :6].min() > 0 for d in raw["synthetic"])
    assert all(d[:6, :6].max() == 0 for d in raw["real"])
    warned = separability_warnings(raw["real"], {"unit": raw["synthetic"]})
    assert any("unit" in w and "corner_level" in w for w in warned)
    # Rendered for the study: identical (black) corners, nothing separates the sets.
    k = 6
    for im in images:
        d = _decode(im["png"])
        for corner in (d[:k, :k], d[:k, -k:], d[-k:, :k], d[-k:, -k:]):
            assert (corner == 0).all(), (im["kind"], im["source"])
    assert not any(w.startswith("Blinding") for w in made.warnings)


def test_cli_prints_user_strings_verbatim(study_inputs, tmp_path, capsys):
    """Rich markup in reader names, model names and paths is printed as text (item 12)."""
    real_dir, syn = study_inputs
    odd = tmp_path / "odd [bold]dir"
    odd.mkdir()
    out = odd / "s.db"
    assert main(["study", "create", "--real", str(real_dir), "--synthetic",
                 f"net[v2]={syn['blur']}", "--n-real", "4", "--n-synthetic", "4",
                 "--display-size", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "net[v2]" in text and "odd [bold]dir" in text.replace("\n", "")
    links = {}
    for name in ("Dr Lee [resident]", "Bad [/] close", "[red]x"):
        assert main(["study", "add-reader", str(out), name]) == 0
        printed = capsys.readouterr().out
        assert f"Private link for {name} (shown once)" in printed
        links[name] = printed.strip().splitlines()[-1].rsplit("/", 1)[1]
    from fastapi.testclient import TestClient

    from mrsynth.study.app import create_app

    client = TestClient(create_app(out))
    for token in links.values():
        s = client.post(f"/api/r/{token}/start").json()
        client.post(f"/api/r/{token}/answer", json={"trial": s["trial"]["id"], "label": "real"})
    assert main(["study", "results", str(out)]) == 0
    text = capsys.readouterr().out
    for name in links:
        assert name in text
