"""The reader and admin pages in a real browser (Debian's Chromium driven by Playwright).

A real uvicorn server runs on 127.0.0.1 in a thread; the page is answered by mouse
and keyboard, reloaded (resume), and the stored answers are read back from SQLite.
Every request the browser makes is checked to stay on the loopback server.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from mrsynth.study import db as sdb
from mrsynth.study.app import create_app
from mrsynth.study.create import create_study

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
        "--disable-gpu", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 10_000


class _Server:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, db: Path, port: int) -> None:
        import uvicorn

        self.port = port
        config = uvicorn.Config(create_app(db), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:  # bounded wait
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}; the browser tests need it. Install it "
            "with `sudo apt-get install chromium` (`make test` does this on Debian/Ubuntu)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def _page(browser, requests: list[str]):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    def guard(route):
        requests.append(route.request.url)
        if urlsplit(route.request.url).hostname != "127.0.0.1":
            route.abort()
        else:
            route.continue_()

    page.route("**/*", guard)
    return page


def _wait_phase(page, phase: str) -> None:
    page.wait_for_selector(f'body[data-phase="{phase}"]', timeout=TIMEOUT_MS)


def _rows(db: Path, reader: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            """SELECT t.position, t.practice, a.label, a.choice, a.confidence, a.response_ms,
                      t.real_slot
               FROM answers a JOIN trials t ON t.id = a.trial_id
               JOIN readers r ON r.id = t.reader_id
               WHERE r.name = ? ORDER BY t.position""",
            (reader,),
        ).fetchall()
    finally:
        conn.close()


def test_reader_page_click_keyboard_reload_resume(browser, study_inputs, study_load, tmp_path):
    from playwright.sync_api import expect

    real_dir, syn = study_inputs
    settings = sdb.StudySettings(n_real=4, n_synthetic=4, n_practice=2, display_size=64, seed=3)
    made = create_study(real_dir, syn, tmp_path / "b.db", settings)
    conn = sdb.connect(made.path)
    token = sdb.add_reader(conn, "browser")
    conn.close()
    requests: list[str] = []
    with _Server(made.path, study_load.free_port()) as base:
        page = _page(browser, requests)
        page.goto(f"{base}/r/{token}")
        _wait_phase(page, "instructions")
        expect(page.locator("#instructions")).to_contain_text("8 brain MR images")
        expect(page.locator("#instructions")).to_contain_text("first 2 trials are practice")
        page.keyboard.press("Enter")

        # Practice 1: click "Real"; feedback appears; continue with a click.
        _wait_phase(page, "answer")
        expect(page.locator("#phase")).to_be_visible()
        expect(page.locator("#progress")).to_have_text("1 / 2")
        page.click("#answer-real")
        _wait_phase(page, "feedback")
        expect(page.locator("#feedback-text")).to_contain_text("this image was")
        page.click("#continue")
        # Practice 2: key S, continue with Enter.
        _wait_phase(page, "answer")
        expect(page.locator("#progress")).to_have_text("2 / 2")
        page.keyboard.press("s")
        _wait_phase(page, "feedback")
        page.keyboard.press("Enter")

        # Scored 1: confidence 4 by click, then "Synthetic" by click.
        _wait_phase(page, "answer")
        expect(page.locator("#phase")).to_be_hidden()
        expect(page.locator("#progress")).to_have_text("1 / 8")
        expect(page.locator("#img0")).to_be_visible()
        page.click('button.conf[data-conf="4"]')
        page.click("#answer-synthetic")
        # Scored 2: confidence 2 by key, R by key.
        expect(page.locator("#progress")).to_have_text("2 / 8")
        _wait_phase(page, "answer")
        page.keyboard.press("2")
        expect(page.locator('button.conf[data-conf="2"]')).to_have_class("conf selected")
        page.keyboard.press("r")
        # Scored 3: S without confidence.
        expect(page.locator("#progress")).to_have_text("3 / 8")
        _wait_phase(page, "answer")
        page.keyboard.press("S")
        expect(page.locator("#progress")).to_have_text("4 / 8")
        _wait_phase(page, "answer")

        # Reload: straight back to the next unanswered image, no instructions.
        page.reload()
        _wait_phase(page, "answer")
        expect(page.locator("#progress")).to_have_text("4 / 8")
        expect(page.locator("#instructions")).to_be_hidden()
        page.keyboard.press("r")
        expect(page.locator("#progress")).to_have_text("5 / 8")

        rows = _rows(made.path, "browser")
        assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
            (0, 1, "real", None),
            (1, 1, "synthetic", None),
            (2, 0, "synthetic", 4),
            (3, 0, "real", 2),
            (4, 0, "synthetic", None),
            (5, 0, "real", None),
        ]
        # The trial answered after the reload keeps no page time (it restarted at the reload).
        assert [r[0] for r in rows if r[5] is None] == [5]
        assert all(r[5] >= 0 for r in rows if r[5] is not None)

        # A fresh browser context (closed browser, link opened again) also resumes.
        page.close()
        page = _page(browser, requests)
        page.goto(f"{base}/r/{token}")
        _wait_phase(page, "answer")
        expect(page.locator("#progress")).to_have_text("5 / 8")
        for k in range(5, 9):  # finish: thank-you page
            _wait_phase(page, "answer")
            expect(page.locator("#progress")).to_have_text(f"{k} / 8")
            page.keyboard.press("r")
        _wait_phase(page, "done")
        expect(page.locator("#done")).to_contain_text("Thank you")
        page.reload()
        _wait_phase(page, "done")
        assert len(_rows(made.path, "browser")) == 10

        # Admin page: token in the fragment, results table and figure rendered.
        page.goto(f"{base}/admin#{made.admin_token}")
        expect(page.locator("#results")).to_be_visible()
        expect(page.locator("#readers")).to_contain_text("8 / 8")
        expect(page.locator("#stats")).to_contain_text("all readers")
        expect(page.locator("#figure")).to_be_visible()
        width = page.locator("#figure").evaluate("el => el.decode().then(() => el.naturalWidth)")
        assert width > 500
        page.close()
        page = _page(browser, requests)
        page.goto(f"{base}/admin")
        page.fill("#token", "wrong-token")
        page.click("#login-form button")
        expect(page.locator("#login-error")).to_have_text("Wrong admin token.")
        page.close()
    assert requests and all(urlsplit(u).hostname == "127.0.0.1" for u in requests)


def test_2afc_arrows_and_exposure_in_browser(browser, study_inputs, study_load, tmp_path):
    from playwright.sync_api import expect

    real_dir, syn = study_inputs
    settings = sdb.StudySettings(mode="2afc", n_synthetic=4, exposure_ms=300, display_size=64,
                                 scale="binary")
    made = create_study(real_dir, syn, tmp_path / "a.db", settings)
    conn = sdb.connect(made.path)
    token = sdb.add_reader(conn, "afc")
    conn.close()
    requests: list[str] = []
    with _Server(made.path, study_load.free_port()) as base:
        page = _page(browser, requests)
        page.goto(f"{base}/r/{token}")
        _wait_phase(page, "instructions")
        page.click("#start")
        _wait_phase(page, "answer")
        expect(page.locator("#img1")).to_be_visible()
        expect(page.locator("#confidence")).to_be_hidden()
        # After the 300 ms exposure both images are masked; answering still works.
        expect(page.locator("#slot0 .mask")).to_be_visible()
        expect(page.locator("#slot1 .mask")).to_be_visible()
        expect(page.locator("#img0")).to_be_hidden()
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#progress")).to_have_text("2 / 4")
        _wait_phase(page, "answer")
        expect(page.locator("#slot0 .mask")).to_be_hidden()  # unmasked for the next pair
        page.keyboard.press("ArrowRight")
        expect(page.locator("#progress")).to_have_text("3 / 4")
        _wait_phase(page, "answer")
        page.click("#answer-right")
        expect(page.locator("#progress")).to_have_text("4 / 4")
        page.close()
    rows = _rows(made.path, "afc")
    assert [r[3] for r in rows] == [0, 1, 1]
    assert all(r[2] is None for r in rows)


def _box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def test_small_screen_feedback_expired_reload_and_admin_hash(browser, study_inputs, study_load,
                                                             tmp_path):
    """1024x600: everything answerable without scrolling; practice feedback beside, not over,
    a visible image; a reload after the exposure is refused by the server; /admin#TOKEN in an
    open admin tab logs in (item 16, 15)."""
    from playwright.sync_api import expect

    real_dir, syn = study_inputs
    settings = sdb.StudySettings(n_real=4, n_synthetic=4, n_practice=2, display_size=512,
                                 exposure_ms=400, seed=1)
    made = create_study(real_dir, syn, tmp_path / "small.db", settings)
    conn = sdb.connect(made.path)
    token = sdb.add_reader(conn, "small")
    conn.close()
    requests: list[str] = []
    with _Server(made.path, study_load.free_port()) as base:
        page = _page(browser, requests)
        page.set_viewport_size({"width": 1024, "height": 600})
        page.goto(f"{base}/r/{token}")
        _wait_phase(page, "instructions")
        page.keyboard.press("Enter")
        _wait_phase(page, "answer")
        expect(page.locator("#slot0 .mask")).to_be_visible()  # after the 400 ms exposure
        page.screenshot(path=str(tmp_path / "answer-1024x600.png"))
        for sel in ("#img0", "#answer-real", "#answer-synthetic", 'button.conf[data-conf="5"]'):
            box = _box(page, sel)
            assert box["y"] >= 0 and box["y"] + box["height"] <= 600, (sel, box)
        assert page.evaluate("document.documentElement.scrollHeight") <= 600

        page.click("#answer-real")  # practice: feedback
        _wait_phase(page, "feedback")
        page.screenshot(path=str(tmp_path / "feedback-1024x600.png"))
        expect(page.locator("#img0")).to_be_visible()  # the image the feedback explains
        expect(page.locator("#slot0 .mask")).to_be_hidden()
        img, fb = _box(page, "#img0"), _box(page, "#feedback")
        assert fb["y"] >= img["y"] + img["height"]  # below the image, not over it
        assert fb["y"] + fb["height"] <= 600
        page.keyboard.press("Enter")

        # Second practice trial; wait past exposure + grace, reload: the server refuses the
        # image, the page says so and still takes the answer.
        _wait_phase(page, "answer")
        page.wait_for_timeout(400 + 1000 + 300)
        page.reload()
        _wait_phase(page, "answer")
        expect(page.locator("#expired")).to_be_visible()
        expect(page.locator("#img0")).to_be_hidden()
        page.keyboard.press("s")
        _wait_phase(page, "feedback")
        page.keyboard.press("Enter")
        _wait_phase(page, "answer")
        expect(page.locator("#expired")).to_be_hidden()
        rows = _rows(made.path, "small")
        assert [(r[0], r[2]) for r in rows] == [(0, "real"), (1, "synthetic")]
        assert rows[0][5] is not None and rows[1][5] is None  # reloaded: no page time kept
        conn = sqlite3.connect(made.path)
        reloads = [r[0] for r in conn.execute("SELECT reloads FROM trials t JOIN readers r ON "
                                              "r.id = t.reader_id WHERE r.name = 'small' "
                                              "ORDER BY position LIMIT 2")]
        conn.close()
        assert reloads == [0, 1]

        # An admin tab open without a token logs in when the address gets #TOKEN.
        page.goto(f"{base}/admin")
        expect(page.locator("#login")).to_be_visible()
        page.evaluate("t => { location.hash = t; }", made.admin_token)
        expect(page.locator("#results")).to_be_visible()
        expect(page.locator("#readers")).to_contain_text("small")
        assert "#" not in page.url  # the token does not stay in the address bar
        page.close()
    assert requests and all(urlsplit(u).hostname == "127.0.0.1" for u in requests)
