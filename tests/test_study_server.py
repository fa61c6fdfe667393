"""The study server's contract: exact JSON replies, server-side timing, exposure, limits, failures.

Issue 10 items 13-16, 18 and 22. The server's clock is injected (``create_app(clock=...)``)
so times are exact; every study is built from real slices (``study_inputs``).
"""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mrsynth.study import db as sdb
from mrsynth.study.app import EXPOSURE_GRACE_S, MAX_BODY_BYTES, create_app
from mrsynth.study.create import create_study

STATE_KEYS = {"reader", "started", "done", "mode", "scale", "exposure_ms", "total", "answered",
              "practice_total", "practice_answered", "trial"}
TRIAL_KEYS = {"id", "practice", "images"}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _study(study_inputs, tmp_path: Path, **kw) -> tuple[Path, str]:
    real_dir, syn = study_inputs
    settings = sdb.StudySettings(display_size=32, **kw)
    made = create_study(real_dir, syn, tmp_path / "s.db", settings)
    return made.path, made.admin_token


def _reader(path: Path, name: str) -> str:
    conn = sdb.connect(path)
    try:
        return sdb.add_reader(conn, name)
    finally:
        conn.close()


def _trial_row(path: Path, uid: str) -> dict:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute(
            """SELECT t.shown_at, t.served, t.reloads, a.response_ms, a.server_ms, a.answered_at
               FROM trials t LEFT JOIN answers a ON a.trial_id = t.id WHERE t.uid = ?""",
            (uid,)).fetchone())
    finally:
        conn.close()


def _check_state(s: dict, n_images: int) -> None:
    assert set(s) == STATE_KEYS
    if s["trial"] is not None:
        assert set(s["trial"]) == TRIAL_KEYS and len(s["trial"]["images"]) == n_images


# --------------------------------------------------------------------------- item 18
@pytest.mark.parametrize("mode", ["single", "2afc"])
def test_reply_keys_are_exactly_the_protocol(study_inputs, tmp_path, mode):
    kw = {"n_real": 4, "n_synthetic": 4} if mode == "single" else {"n_synthetic": 4}
    path, _ = _study(study_inputs, tmp_path, mode=mode, n_practice=2, **kw)
    client = TestClient(create_app(path))
    token = _reader(path, "keys")
    n_images = 2 if mode == "2afc" else 1
    _check_state(client.get(f"/api/r/{token}/state").json(), n_images)
    s = client.post(f"/api/r/{token}/start").json()
    seen = set()
    while not s["done"]:
        _check_state(s, n_images)
        practice = s["trial"]["practice"]
        body = {"trial": s["trial"]["id"]}
        body.update({"choice": 0} if mode == "2afc" else {"label": "real"})
        r = client.post(f"/api/r/{token}/answer", json=body).json()
        if practice:
            assert set(r) == {"stored", "duplicate", "feedback", "state"}
            fb = {"correct", "real_slot"} if mode == "2afc" else {"correct", "truth"}
            assert set(r["feedback"]) == fb
            again = client.post(f"/api/r/{token}/answer", json=body).json()
            assert set(again) == {"stored", "duplicate", "answer", "feedback", "state"}
            assert set(again["answer"]) == {"label", "choice", "confidence", "rating"}
        else:
            assert set(r) == {"stored", "duplicate", "state"}  # nothing about the truth
            again = client.post(f"/api/r/{token}/answer", json=body).json()
            assert set(again) == {"stored", "duplicate", "answer", "state"}
        seen.add(practice)
        s = r["state"]
    _check_state(s, n_images)
    assert seen == {True, False}


# --------------------------------------------------------------------------- items 15, 22
def test_server_response_time_starts_at_first_image_and_survives_reload(study_inputs, tmp_path):
    path, admin = _study(study_inputs, tmp_path, n_real=4, n_synthetic=4)
    clock = Clock()
    client = TestClient(create_app(path, clock=clock))
    token = _reader(path, "timed")
    s = client.post(f"/api/r/{token}/start").json()
    first = s["trial"]
    assert _trial_row(path, first["id"])["shown_at"] is None  # the state alone shows nothing
    assert client.get(first["images"][0]).status_code == 200
    assert _trial_row(path, first["id"])["shown_at"] == 1000.0
    clock.t = 1004.0  # the reader reloads the page: state and image again
    assert client.get(f"/api/r/{token}/state").json()["trial"]["id"] == first["id"]
    assert client.get(first["images"][0]).status_code == 200
    row = _trial_row(path, first["id"])
    assert (row["shown_at"], row["reloads"]) == (1000.0, 1)  # the clock is not restarted
    clock.t = 1007.5
    s = client.post(f"/api/r/{token}/answer",
                    json={"trial": first["id"], "label": "real", "response_ms": 3500}).json()
    row = _trial_row(path, first["id"])
    assert row["server_ms"] == pytest.approx(7500.0)
    assert row["response_ms"] is None  # the page's clock restarted at the reload: not kept
    assert row["answered_at"] == 1007.5

    second = s["state"]["trial"]
    clock.t = 2000.0
    client.get(second["images"][0])
    clock.t = 2001.25
    client.post(f"/api/r/{token}/answer",
                json={"trial": second["id"], "label": "real", "response_ms": 1200})
    row = _trial_row(path, second["id"])
    assert (row["server_ms"], row["response_ms"], row["reloads"]) == (pytest.approx(1250.0),
                                                                      1200.0, 0)
    # Answered without the image ever being fetched: no server time.
    third = client.get(f"/api/r/{token}/state").json()["trial"]
    client.post(f"/api/r/{token}/answer", json={"trial": third["id"], "label": "real"})
    assert _trial_row(path, third["id"])["server_ms"] is None

    # Reloads are counted in the results (summary, CSV of answers).
    auth = {"Authorization": f"Bearer {admin}"}
    progress = {r["name"]: r for r in client.get("/api/admin/summary", headers=auth).json()
                ["readers"]}
    assert progress["timed"]["reloaded"] == 1
    rows = list(csv.DictReader(io.StringIO(client.get("/api/admin/answers.csv",
                                                      headers=auth).text)))
    assert sorted(r["reloads"] for r in rows) == ["0", "0", "1"]


def test_exposure_window_is_enforced_by_the_server(study_inputs, tmp_path):
    path, _ = _study(study_inputs, tmp_path, mode="2afc", n_synthetic=4, exposure_ms=1500)
    clock = Clock(0.0)
    client = TestClient(create_app(path, clock=clock))
    token = _reader(path, "exposed")
    trial = client.post(f"/api/r/{token}/start").json()["trial"]
    left, right = trial["images"]
    assert client.get(left).status_code == 200
    clock.t = 0.2
    assert client.get(right).status_code == 200  # the other slot is not a reload
    assert _trial_row(path, trial["id"])["reloads"] == 0
    clock.t = 1.5 + EXPOSURE_GRACE_S - 0.01  # a quick reload is still inside the window
    assert client.get(left).status_code == 200
    clock.t = 1.5 + EXPOSURE_GRACE_S + 0.01
    for url in (left, right):
        r = client.get(url)
        assert r.status_code == 410 and r.headers["content-type"].startswith("application/json")
        assert "viewing time" in r.json()["detail"] and r.content[:4] != b"\x89PNG"
    row = _trial_row(path, trial["id"])
    assert (row["shown_at"], row["served"], row["reloads"]) == (0.0, 3, 3)
    # The reader can still answer (from memory); the server time runs from the first view.
    clock.t = 9.0
    r = client.post(f"/api/r/{token}/answer", json={"trial": trial["id"], "choice": 1})
    assert r.status_code == 200 and _trial_row(path, trial["id"])["server_ms"] == 9000.0
    # A new trial gets its own window.
    nxt = r.json()["state"]["trial"]
    assert client.get(nxt["images"][0]).status_code == 200


# --------------------------------------------------------------------------- item 13
def test_large_bodies_are_refused_before_parsing_and_auth(study_inputs, tmp_path):
    path, _ = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    client = TestClient(create_app(path))
    token = _reader(path, "big")
    trial = client.post(f"/api/r/{token}/start").json()["trial"]["id"]
    big = b'{"trial": "' + b"x" * (60 * 1024) + b'"}'
    for who in (token, "not-a-token"):
        r = client.post(f"/api/r/{who}/answer", content=big,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        assert r.headers["cache-control"] == "no-store"  # still goes through the headers

    def chunks():  # no Content-Length: sent chunked
        for _ in range(100):
            yield b" " * 1024

    r = client.post(f"/api/r/{token}/answer", content=chunks(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/api/admin/summary", content=chunks()).status_code == 413
    # Just under the limit is read and handled as usual.
    padded = b'{"trial": "%s", "label": "real"}' % trial.encode()
    padded += b" " * (MAX_BODY_BYTES - len(padded))
    r = client.post(f"/api/r/{token}/answer", content=padded,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["stored"]
    r = client.post(f"/api/r/{token}/answer", content=padded + b" ",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# --------------------------------------------------------------------------- item 14
def test_missing_database_gives_503_and_is_never_created(study_inputs, tmp_path, caplog):
    path, _ = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    token = _reader(path, "gone")
    client = TestClient(create_app(path))
    assert client.get(f"/api/r/{token}/state").status_code == 200
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.ERROR, logger="mrsynth.study"):
        for url in (f"/api/r/{token}/state", f"/api/r/{token}/state", "/api/admin/summary"):
            r = client.get(url)
            assert r.status_code == 503
            assert "unavailable" in r.json()["detail"]
        page = client.get(f"/r/{token}")
        assert page.status_code == 503 and "Study unavailable" in page.text
    assert not path.exists()  # nothing re-created
    assert len([r for r in caplog.records if r.name == "mrsynth.study"]) == 1  # logged once


def test_read_only_database_gives_503_json(study_inputs, tmp_path, monkeypatch):
    path, _ = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    token = _reader(path, "ro")
    client = TestClient(create_app(path))
    state = client.get(f"/api/r/{token}/state").json()
    real_connect = sqlite3.connect

    def read_only(target, *a, **kw):  # what a write-protected file gives (tests run as root)
        kw["uri"] = True
        return real_connect(str(target).replace("mode=rw", "mode=ro"), *a, **kw)

    monkeypatch.setattr(sdb.sqlite3, "connect", read_only)
    assert client.get(f"/api/r/{token}/state").status_code == 200  # reading works
    r = client.get(state["trial"]["images"][0])
    assert r.status_code == 503 and "unavailable" in r.json()["detail"]
    r = client.post(f"/api/r/{token}/answer", json={"trial": state["trial"]["id"],
                                                     "label": "real"})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"


def test_schema_1_files_are_upgraded(study_inputs, tmp_path):
    path, _ = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    token = _reader(path, "old")
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE trials DROP COLUMN served")
    conn.execute("ALTER TABLE trials DROP COLUMN reloads")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    client = TestClient(create_app(path))
    trial = client.post(f"/api/r/{token}/start").json()["trial"]
    assert client.get(trial["images"][0]).status_code == 200
    assert _trial_row(path, trial["id"])["served"] == 1
    conn = sdb.connect(path)
    assert sdb.get_meta(conn, "schema_version") == str(sdb.SCHEMA_VERSION)
    conn.close()


# --------------------------------------------------------------------------- item 16
def test_csv_cells_never_start_a_formula(study_inputs, tmp_path):
    assert sdb.csv_cell("=1+1") == "'=1+1" and sdb.csv_cell("@SUM(A1)") == "'@SUM(A1)"
    for s in ("+1", "-1", "\tx", "\rx"):
        assert sdb.csv_cell(s) == "'" + s
    assert sdb.csv_cell(-1.5) == -1.5 and sdb.csv_cell("ann") == "ann"
    path, admin = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    name = '=HYPERLINK("http://evil.example","x")'
    token = _reader(path, name)
    client = TestClient(create_app(path))
    s = client.post(f"/api/r/{token}/start").json()
    client.post(f"/api/r/{token}/answer", json={"trial": s["trial"]["id"], "label": "real"})
    text = client.get("/api/admin/answers.csv", headers={"Authorization": f"Bearer {admin}"}).text
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["reader"] == "'" + name
    assert not any(line.startswith(("=", "+", "-", "@")) for line in text.splitlines())


def test_favicon_is_not_a_404(study_inputs, tmp_path):
    path, _ = _study(study_inputs, tmp_path, n_real=2, n_synthetic=4)
    r = TestClient(create_app(path)).get("/favicon.ico")
    assert r.status_code == 204 and r.content == b""
