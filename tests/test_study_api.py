"""The study web app through FastAPI's TestClient: reader flow, reliability, security, blinding."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from mrsynth.cli import main
from mrsynth.study import db as sdb
from mrsynth.study.app import create_app
from mrsynth.study.create import create_study
from mrsynth.study.render import png_chunks
from mrsynth.study.stats import POOLED, dprime, fleiss_kappa

UID = r"[A-Za-z0-9_-]{32}"


def _make(study_inputs, tmp_path_factory, name: str, **kw) -> tuple[Path, str]:
    real_dir, syn = study_inputs
    settings = sdb.StudySettings(display_size=kw.pop("display_size", 48), **kw)
    made = create_study(real_dir, syn, tmp_path_factory.mktemp(name) / "s.db", settings)
    return made.path, made.admin_token


@pytest.fixture(scope="module")
def single(study_inputs, tmp_path_factory):
    path, admin = _make(study_inputs, tmp_path_factory, "single", n_real=8, n_synthetic=8,
                        n_practice=2)
    return path, admin, TestClient(create_app(path))


def _reader(path: Path, name: str) -> str:
    conn = sdb.connect(path)
    try:
        return sdb.add_reader(conn, name)
    finally:
        conn.close()


def _truth(path: Path) -> dict[str, dict]:
    """Per trial uid: reader, position, practice, kind, model, contrast, item (from the DB)."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    rows = conn.execute(
        """SELECT t.uid, r.name AS reader, t.position, t.practice, t.item_id, t.real_slot,
                  i.real_image, i.synthetic_image, s.model, COALESCE(s.contrast, re.contrast) AS c,
                  re.sha256 AS real_sha, s.sha256 AS syn_sha
           FROM trials t JOIN readers r ON r.id = t.reader_id JOIN items i ON i.id = t.item_id
           LEFT JOIN images s ON s.id = i.synthetic_image
           LEFT JOIN images re ON re.id = i.real_image"""
    ).fetchall()
    conn.close()
    out = {}
    for r in rows:
        d = dict(r)
        d["kind"] = "real" if r["synthetic_image"] is None else "synthetic"
        out[r["uid"]] = d
    return out


def _answers(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM answers ORDER BY id").fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------- reader flow
def test_reader_flow_resume_and_statistics(single, study_inputs, tmp_path):
    path, admin, client = single
    ta, tb = _reader(path, "flow-a"), _reader(path, "flow-b")
    truth = _truth(path)
    assert client.get(f"/r/{ta}").status_code == 200

    s = client.get(f"/api/r/{ta}/state").json()
    assert not s["started"] and not s["done"]
    assert (s["total"], s["answered"], s["practice_total"], s["practice_answered"]) == (16, 0, 2, 0)
    s = client.post(f"/api/r/{ta}/start").json()
    assert s["started"]

    given: dict[str, tuple[str, int]] = {}
    for step in range(18):
        if step == 9:
            # "Close the browser and open the link again": a new client resumes at the next
            # unanswered trial, which is the trial at position 9 of this reader.
            client2 = TestClient(create_app(path))
            s = client2.get(f"/api/r/{ta}/state").json()
            nxt = min((t for t in truth.values() if t["reader"] == "flow-a"
                       and t["position"] >= 9), key=lambda t: t["position"])
            assert s["trial"]["id"] == nxt["uid"] and s["started"]
            assert s["answered"] == 7 and s["practice_answered"] == 2
        trial = s["trial"]
        info = truth[trial["id"]]
        assert info["reader"] == "flow-a" and info["position"] == step
        assert trial["practice"] == bool(info["practice"])
        label = "synthetic" if step % 3 == 0 else "real"
        conf = step % 5 + 1
        r = client.post(f"/api/r/{ta}/answer",
                        json={"trial": trial["id"], "label": label, "confidence": conf,
                              "response_ms": 100.0 + step})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["stored"] and not body["duplicate"]
        if info["practice"]:
            assert body["feedback"] == {"truth": info["kind"], "correct": label == info["kind"]}
        else:
            assert "feedback" not in body
            given[trial["id"]] = (label, conf)
        s = body["state"]
    assert s["done"] and s["trial"] is None and s["answered"] == 16
    assert client.get(f"/api/r/{ta}/state").json()["done"]

    client.post(f"/api/r/{tb}/start")
    s = client.get(f"/api/r/{tb}/state").json()
    given_b = {}
    while not s["done"]:
        r = client.post(f"/api/r/{tb}/answer", json={"trial": s["trial"]["id"], "label": "real"})
        if not s["trial"]["practice"]:
            given_b[s["trial"]["id"]] = "real"
        s = r.json()["state"]

    # Stored rows: one per trial, as sent, with the right correctness.
    conn = sqlite3.connect(path)
    stored = {uid: (lab, conf, corr, ms) for uid, lab, conf, corr, ms in conn.execute(
        "SELECT t.uid, a.label, a.confidence, a.correct, a.response_ms "
        "FROM answers a JOIN trials t ON t.id = a.trial_id")}
    conn.close()
    for uid, (label, conf) in given.items():
        assert stored[uid][:3] == (label, conf, int(label == truth[uid]["kind"]))
        assert stored[uid][3] == 100.0 + truth[uid]["position"]

    # Statistics against an independent count from the truth table.
    r = client.get("/api/admin/summary", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    summary = r.json()
    answers = [(truth[u], lab) for u, (lab, _) in given.items()]
    answers += [(truth[u], lab) for u, lab in given_b.items()]
    rows = {(x["reader"], x["scope"], x["model"], x["contrast"]): x for x in summary["rows"]}
    for model in ("blur", "noise"):
        for contrast in ("T1w", "T2w"):
            syn = [lab for t, lab in answers if t["model"] == model and t["c"] == contrast]
            real = [lab for t, lab in answers if t["kind"] == "real" and t["c"] == contrast]
            row = rows[(POOLED, "model x contrast", model, contrast)]
            assert row["n_synthetic"] == len(syn) == 4  # 2 images x 2 readers
            assert row["synthetic_as_real"] == syn.count("real")
            assert row["real_as_synthetic"] == real.count("synthetic")
            hits = syn.count("synthetic")
            fa = real.count("synthetic")
            assert row["dprime"] == pytest.approx(dprime(hits, len(syn), fa, len(real)))
    total = rows[(POOLED, "total", "", "")]
    n_correct = sum(lab == t["kind"] for t, lab in answers)
    assert total["n"] == 32 and total["correct"] == n_correct
    assert total["accuracy_ci_low"] <= n_correct / 32 <= total["accuracy_ci_high"]
    # AUC from confidence: real answers score 6 - conf, synthetic ones 5 + conf.
    scores = [(5 + c if lab == "synthetic" else 6 - c) for lab, c in given.values()]
    kinds = [truth[u]["kind"] == "synthetic" for u in given]
    assert rows[("flow-a", "total", "", "")]["auc"] == pytest.approx(roc_auc_score(kinds, scores))
    # Fleiss' kappa over the 16 shared images (category: said real).
    items: dict[int, list[int]] = {}
    for t, lab in answers:
        items.setdefault(t["item_id"], [0, 0])[int(lab == "real")] += 1
    table = np.array(list(items.values()))
    assert table.shape == (16, 2) and (table.sum(1) == 2).all()
    assert summary["kappa"]["kappa"] == pytest.approx(fleiss_kappa(table))
    assert summary["kappa"]["n_items"] == 16
    prog = {p["name"]: p for p in summary["readers"]}
    assert prog["flow-a"]["finished"] and prog["flow-a"]["answered"] == 16

    # `study results` writes the same numbers as CSV, all answers and the figure.
    out_csv, out_ans, out_fig = tmp_path / "r.csv", tmp_path / "a.csv", tmp_path / "f.png"
    assert main(["study", "results", str(path), "--csv", str(out_csv), "--answers-csv",
                 str(out_ans), "--figure", str(out_fig)]) == 0
    table_rows = list(csv.DictReader(out_csv.open()))
    t = next(x for x in table_rows if x["reader"] == POOLED and x["scope"] == "total")
    assert int(t["correct"]) == n_correct and float(t["dprime"]) == pytest.approx(total["dprime"])
    ans_rows = list(csv.DictReader(out_ans.open()))
    mine = [x for x in ans_rows if x["reader"] in ("flow-a", "flow-b")]
    assert len(mine) == 36  # 2 x (16 scored + 2 practice)
    with Image.open(out_fig) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert main(["study", "results", str(path), "--csv", str(out_csv)]) != 0  # no overwrite


def test_results_stay_readable_in_an_80_column_terminal(single, capsys, monkeypatch):
    """Narrow terminals get one block per result row instead of columns squeezed to "…"."""
    from mrsynth.study import commands as study_commands

    path, _, client = single
    token = _reader(path, "narrow-reader-with-a-long-name")
    client.post(f"/api/r/{token}/start")
    s = client.get(f"/api/r/{token}/state").json()
    while not s["done"]:
        s = client.post(f"/api/r/{token}/answer",
                        json={"trial": s["trial"]["id"], "label": "real"}).json()["state"]
    monkeypatch.setattr(study_commands.console, "_width", 80)
    assert main(["study", "results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert "narrow-reader-with-a-long-name" in out and "accuracy:" in out
    assert max(len(line) for line in out.splitlines()) <= 80


# --------------------------------------------------------------------------- reliability
def test_repeated_answer_is_idempotent_and_others_rejected(single):
    path, _, client = single
    tc, td = _reader(path, "idem-c"), _reader(path, "idem-d")
    s = client.post(f"/api/r/{tc}/start").json()
    trial = s["trial"]["id"]
    r1 = client.post(f"/api/r/{tc}/answer", json={"trial": trial, "label": "real"})
    assert r1.status_code == 200 and r1.json()["stored"]
    before = _answers(path)
    r2 = client.post(f"/api/r/{tc}/answer",
                     json={"trial": trial, "label": "synthetic", "confidence": 5})
    assert r2.status_code == 200
    assert r2.json()["duplicate"] and not r2.json()["stored"]
    assert r2.json()["answer"]["label"] == "real"  # the first answer stands
    assert _answers(path) == before

    # Another reader's trial, unknown tokens and trials: 404 and nothing changes.
    s_d = client.get(f"/api/r/{td}/state").json()
    other = s_d["trial"]["id"]
    assert client.post(f"/api/r/{tc}/answer",
                       json={"trial": other, "label": "real"}).status_code == 404
    assert client.post(f"/api/r/{td}/answer",
                       json={"trial": trial, "label": "real"}).status_code == 404
    assert client.post("/api/r/not-a-token/answer",
                       json={"trial": trial, "label": "real"}).status_code == 404
    assert client.post(f"/api/r/{tc}/answer",
                       json={"trial": "x" * 32, "label": "real"}).status_code == 404
    assert client.get(f"/api/r/{tc}/image/{other}/0").status_code == 404
    assert client.get(f"/api/r/nope/image/{trial}/0").status_code == 404
    assert client.get(f"/api/r/{tc}/image/{trial}/1").status_code == 404  # single: one slot
    assert client.get(f"/api/r/{tc}/image/{trial}/x").status_code == 422
    assert client.get("/api/r/nope/state").status_code == 404
    unknown = client.get("/r/nope")
    assert unknown.status_code == 404 and "Unknown link" in unknown.text

    # Malformed bodies: 422, nothing stored.
    nxt = client.get(f"/api/r/{tc}/state").json()["trial"]["id"]
    bad = [
        {"label": "real"},
        {"trial": nxt},
        {"trial": nxt, "label": "maybe"},
        {"trial": nxt, "label": "real", "extra": 1},
        {"trial": nxt, "label": "real", "confidence": 0},
        {"trial": nxt, "label": "real", "confidence": 6},
        {"trial": nxt, "label": "real", "confidence": "3"},
        {"trial": nxt, "label": "real", "confidence": 2.5},
        {"trial": nxt, "label": "real", "response_ms": -5},
        {"trial": nxt, "label": "real", "choice": 1},
        {"trial": nxt, "label": "real", "rating": 2},
        {"trial": nxt, "rating": 2},
        {"trial": "y" * 65, "label": "real"},
        {"trial": 123, "label": "real"},
        [nxt, "real"],
    ]
    for body in bad:
        r = client.post(f"/api/r/{tc}/answer", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
    for raw in (b"{not json", b"", b"null"):
        r = client.post(f"/api/r/{tc}/answer", content=raw,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, raw
    assert _answers(path) == before
    assert client.get(f"/api/r/{tc}/state").json()["trial"]["id"] == nxt


def test_admin_needs_token(single):
    path, admin, client = single
    assert client.get("/admin").status_code == 200  # the page itself holds no data
    for url in ("/api/admin/summary", "/api/admin/answers.csv", "/api/admin/figure.png"):
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(url, headers={"Authorization": admin}).status_code == 401
    ok = client.get("/api/admin/answers.csv", headers={"Authorization": f"Bearer {admin}"})
    assert ok.status_code == 200 and ok.text.startswith("reader,position,practice")


# --------------------------------------------------------------------------- blinding
def test_served_trials_carry_nothing_about_the_truth(single):
    path, _, client = single
    token = _reader(path, "blind")
    truth = _truth(path)
    mine = sorted((t for t in truth.values() if t["reader"] == "blind"),
                  key=lambda t: t["position"])
    client.post(f"/api/r/{token}/start")
    seen: dict[str, list] = {"real": [], "synthetic": []}
    pages = set()
    for t in mine:
        state = client.get(f"/api/r/{token}/state")
        page = client.get(f"/r/{token}")
        pages.add(page.content)
        s = state.json()
        assert s["trial"]["id"] == t["uid"]
        assert set(s["trial"]) == {"id", "practice", "images"}
        assert re.fullmatch(rf"/api/r/{re.escape(token)}/image/{UID}/0", s["trial"]["images"][0])
        img = client.get(s["trial"]["images"][0])
        assert img.status_code == 200
        seen[t["kind"]].append((img, state))
        sha = hashlib.sha256(img.content).hexdigest()
        assert sha == (t["real_sha"] if t["kind"] == "real" else t["syn_sha"])
        client.post(f"/api/r/{token}/answer", json={"trial": t["uid"], "label": "real"})
    assert len(pages) == 1  # one page for every trial
    page = pages.pop().decode()
    assert "http://" not in page and "https://" not in page  # nothing from other servers
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == ["/static/study.css", "/static/reader.js"]
    for name in ("study.css", "reader.js"):
        assert client.get(f"/static/{name}").status_code == 200
        assert "http" not in client.get(f"/static/{name}").text
    assert client.get("/static/..%2Fapp.py").status_code == 404

    def fingerprint(resp):
        headers = {k: v for k, v in resp.headers.items() if k != "date"}
        return headers, png_chunks(resp.content), resp.content[:33].hex()

    real_fp = {json.dumps(fingerprint(r)) for r, _ in seen["real"]}
    syn_fp = {json.dumps(fingerprint(r)) for r, _ in seen["synthetic"]}
    assert len(real_fp) == 1 and real_fp == syn_fp  # same headers, sizes, chunk layout, IHDR
    assert {k for k, _ in png_chunks(seen["real"][0][0].content)} == {"IHDR", "IDAT", "IEND"}
    real_state_headers = {json.dumps(sorted(k for k in s.headers if k != "content-length"))
                          for _, s in seen["real"] + seen["synthetic"]}
    assert len(real_state_headers) == 1
    h = seen["real"][0][0].headers
    assert h["cache-control"] == "no-store" and h["referrer-policy"] == "no-referrer"
    assert "default-src 'self'" in h["content-security-policy"]


# --------------------------------------------------------------------------- other protocols
def test_2afc_mode(study_inputs, tmp_path_factory):
    path, admin = _make(study_inputs, tmp_path_factory, "afc", mode="2afc", n_synthetic=8,
                        n_practice=2, exposure_ms=1000)
    client = TestClient(create_app(path))
    token = _reader(path, "pairs")
    truth = _truth(path)
    s = client.post(f"/api/r/{token}/start").json()
    assert s["mode"] == "2afc" and s["exposure_ms"] == 1000
    picks = {}
    while not s["done"]:
        t = truth[s["trial"]["id"]]
        imgs = [client.get(u) for u in s["trial"]["images"]]
        shas = [hashlib.sha256(i.content).hexdigest() for i in imgs]
        assert shas[t["real_slot"]] == t["real_sha"] and shas[1 - t["real_slot"]] == t["syn_sha"]
        assert len(imgs[0].content) == len(imgs[1].content)
        assert client.post(f"/api/r/{token}/answer",
                           json={"trial": t["uid"], "label": "real"}).status_code == 422
        choice = t["position"] % 2
        r = client.post(f"/api/r/{token}/answer", json={"trial": t["uid"], "choice": choice})
        assert r.status_code == 200
        if t["practice"]:
            assert r.json()["feedback"] == {"real_slot": t["real_slot"],
                                            "correct": choice == t["real_slot"]}
        else:
            picks[t["uid"]] = choice == t["real_slot"]
        s = r.json()["state"]
    summary = client.get("/api/admin/summary", headers={"Authorization": f"Bearer {admin}"}).json()
    total = next(r for r in summary["rows"] if r["scope"] == "total")
    assert total["n"] == 8 and total["correct"] == sum(picks.values())
    assert total["synthetic_as_real"] == 8 - sum(picks.values())
    assert total["auc"] == pytest.approx(sum(picks.values()) / 8)


def test_six_point_scale(study_inputs, tmp_path_factory):
    path, admin = _make(study_inputs, tmp_path_factory, "six", scale="six", n_real=6, n_synthetic=8)
    client = TestClient(create_app(path))
    token = _reader(path, "rater")
    truth = _truth(path)
    s = client.post(f"/api/r/{token}/start").json()
    ratings, kinds = [], []
    rng = np.random.default_rng(0)
    while not s["done"]:
        t = truth[s["trial"]["id"]]
        assert client.post(f"/api/r/{token}/answer",
                           json={"trial": t["uid"], "label": "real"}).status_code == 422
        rating = int(rng.integers(1, 7)) + (1 if t["kind"] == "synthetic" else 0)
        rating = min(rating, 6)
        r = client.post(f"/api/r/{token}/answer", json={"trial": t["uid"], "rating": rating})
        assert r.status_code == 200
        ratings.append(rating)
        kinds.append(t["kind"] == "synthetic")
        s = r.json()["state"]
    conn = sqlite3.connect(path)
    labels = [x[0] for x in conn.execute("SELECT label FROM answers ORDER BY id")]
    conn.close()
    assert labels == ["real" if x <= 3 else "synthetic" for x in ratings]
    summary = client.get("/api/admin/summary", headers={"Authorization": f"Bearer {admin}"}).json()
    total = next(r for r in summary["rows"] if r["scope"] == "total")
    assert total["auc"] == pytest.approx(roc_auc_score(kinds, ratings))


def test_serve_defaults_to_loopback():
    import typer

    from mrsynth.cli import app
    from mrsynth.study.commands import _is_loopback

    cmd = typer.main.get_command(app).commands["study"].commands["serve"]
    host = next(p for p in cmd.params if p.name == "host")
    assert host.default == "127.0.0.1"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4")


def test_answers_csv_matches_database(single):
    path, admin, client = single
    r = client.get("/api/admin/answers.csv", headers={"Authorization": f"Bearer {admin}"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(_answers(path))
    for row in rows:
        assert row["kind"] in ("real", "synthetic")
        assert (row["model"] == "") == (row["kind"] == "real")
