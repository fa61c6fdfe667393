"""The slice file-name contract between `evaluate` (writer) and `study create` (reader).

Issue 10 item 10: the built-in set's subjects (`sim-007`) were written by `evaluate`
but not parsed by the study, so pairing, exclusion and 2AFC silently failed.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mrsynth.data.naming import format_slice_name, parse_slice_name, subject_label
from mrsynth.study import db as sdb
from mrsynth.study.app import create_app
from mrsynth.study.create import create_study
from mrsynth.study.sources import parse_name, scan_source
from test_eval_fixtures import TINY_OVERRIDES


@pytest.mark.parametrize("subject", ["sim-007", "sub-ms19", "ms19", "sub-gli00001", "a-b-c"])
@pytest.mark.parametrize("k", [0, 37, 1234])
def test_format_and_parse_round_trip(subject, k):
    name = format_slice_name(subject, k, "T2w")
    stem = name.removesuffix(".npy")
    assert parse_slice_name(stem) == (subject_label(subject), k, "T2w")
    assert parse_name(name) == (subject_label(subject), k, "T2w")


def test_parse_keeps_bids_entities_out_of_the_subject():
    assert format_slice_name("sim-007", 37, "T2w") == "sim-007_slice-037_T2w.npy"
    assert parse_slice_name("ses-1_slice-7_T1w") == (None, 7, "T1w")
    assert parse_slice_name("desc-x_slice-7_T1w") == (None, 7, "T1w")
    assert parse_slice_name("sub-a_ses-1_slice-7_T1w") == ("a", 7, "T1w")
    assert subject_label("sub-ms19") == "ms19" and subject_label("sim-007") == "sim-007"
    for bad in (("a_b", 1, "T1w"), ("", 1, "T1w"), ("s", -1, "T1w"), ("s", 1, "T_1")):
        with pytest.raises(ValueError):
            format_slice_name(*bad)


@pytest.fixture(scope="module")
def builtin_eval(tmp_path_factory) -> tuple[Path, Path]:
    """The built-in data set prepared (3 subjects, 1 held out) and a real `evaluate` output."""
    from helpers import one_torch_thread
    from mrsynth.data.prepare import prepare_dataset
    from mrsynth.eval.evaluate import evaluate
    from mrsynth.train.config import resolve_config
    from mrsynth.train.trainer import train

    root = tmp_path_factory.mktemp("builtin-study")
    prepared = prepare_dataset("builtin", root / "builtin.npz", n_subjects=3, size=(64, 64),
                               test_fraction=0.34, downsample=2, seed=0)
    with one_torch_thread():
        cfg = resolve_config("simple", "cpu-small", TINY_OVERRIDES)
        run = train(cfg, prepared, root / "run", overwrite=True)
        out = evaluate([run], prepared, root / "eval", c2st_steps=5)
    return prepared, out / "synthetic" / "simple"


def test_study_pairs_builtin_evaluate_output(builtin_eval, tmp_path):
    from mrsynth.data.prepared import load_prepared

    prepared, syn_dir = builtin_eval
    test = load_prepared(prepared).split_view("test")
    test_subjects = {str(s) for s in test.subject}
    assert all(s.startswith("sim-") for s in test_subjects)
    refs = scan_source(syn_dir, "synthetic", "simple", None)
    assert refs and all(r.subject in test_subjects and r.slice is not None for r in refs)
    assert {(r.subject, r.slice) for r in refs} == {
        (str(s), int(k)) for s, k in zip(test.subject, test.slice_index, strict=True)}

    n = len(test) // 4
    settings = sdb.StudySettings(n_real=n, n_synthetic=n, display_size=32, window="fixed")
    made = create_study(prepared, {"simple": syn_dir}, tmp_path / "single.db", settings)
    assert not any("no subject" in w for w in made.warnings), made.warnings
    conn = sqlite3.connect(made.path)
    images = conn.execute("SELECT kind, subject, slice, contrast FROM images").fetchall()
    conn.close()
    assert all(s in test_subjects and k is not None for _, s, k, _ in images)
    keys = [(s, k, c) for _, s, k, c in images]
    assert len(set(keys)) == len(keys)  # no slice shown both real and synthetic

    # 2AFC with matched pairing finds each synthetic slice's real twin.
    settings = sdb.StudySettings(mode="2afc", n_synthetic=n, display_size=32, window="fixed")
    made2 = create_study(prepared, {"simple": syn_dir}, tmp_path / "afc.db", settings)
    conn = sqlite3.connect(made2.path)
    pairs = conn.execute(
        """SELECT r.subject, r.slice, r.contrast, s.subject, s.slice, s.contrast FROM items i
           JOIN images r ON r.id = i.real_image JOIN images s ON s.id = i.synthetic_image"""
    ).fetchall()
    conn.close()
    assert len(pairs) == sum(made2.counts.values()) > 0
    assert all(p[:3] == p[3:] for p in pairs)

    # answers.csv names the subject of synthetic images too.
    conn = sdb.connect(made.path)
    token = sdb.add_reader(conn, "r")
    conn.close()
    client = TestClient(create_app(made.path))
    s = client.post(f"/api/r/{token}/start").json()
    while not s["done"]:
        s = client.post(f"/api/r/{token}/answer",
                        json={"trial": s["trial"]["id"], "label": "real"}).json()["state"]
    text = client.get("/api/admin/answers.csv",
                      headers={"Authorization": f"Bearer {made.admin_token}"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["kind"] for r in rows} == {"real", "synthetic"}
    assert all(r["subject"] in test_subjects and r["slice"] != "" for r in rows)
    assert np.all([r["model"] == "simple" for r in rows if r["kind"] == "synthetic"])
