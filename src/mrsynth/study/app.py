"""The study web app (FastAPI): reader pages, answer API, admin page.

Routes
------
``GET  /r/{token}``                       the reader page (instructions, trials, thank-you)
``GET  /api/r/{token}/state``             where the reader is: next trial, progress
``POST /api/r/{token}/start``             leave the instructions
``POST /api/r/{token}/answer``            one answer (JSON), stored in one transaction
``GET  /api/r/{token}/image/{trial}/{slot}``  the pre-rendered PNG of one of the reader's trials
``GET  /admin``                           admin page (asks for the admin token)
``GET  /api/admin/summary|answers.csv|figure.png``  need ``Authorization: Bearer <admin token>``
``GET  /static/{name}``                   the page's own JS/CSS (a fixed list, shipped with mrsynth)

Blinding: a trial is known to the browser only by a random id, its images only by
that id and a slot number; every image is a pre-rendered PNG of identical size
and byte length read from the database, so URLs, headers, bytes and timing carry
nothing about the truth. Practice trials alone return feedback.

Every response carries ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer``
(the reader token is in the URL) and a Content-Security-Policy that allows only
this server's own scripts, styles and images: the page needs no network beyond it.
"""

from __future__ import annotations

import html
import math
import sqlite3
import threading
import time
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from mrsynth.study import db as sdb

_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
]


class AnswerIn(BaseModel):
    """One answer. Which fields are required depends on the study's mode and scale."""

    model_config = ConfigDict(extra="forbid")

    trial: Annotated[str, Field(min_length=1, max_length=64)]
    label: Literal["real", "synthetic"] | None = None
    choice: Annotated[StrictInt, Field(ge=0, le=1)] | None = None
    confidence: Annotated[StrictInt, Field(ge=1, le=5)] | None = None
    rating: Annotated[StrictInt, Field(ge=1, le=6)] | None = None
    response_ms: Annotated[float, Field(ge=0, le=86_400_000, allow_inf_nan=False)] | None = None


class _SecurityHeaders:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the answer path)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in _SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _load_package_files() -> tuple[dict[str, tuple[bytes, str]], dict[str, Template]]:
    pkg = resources.files("mrsynth.study")
    static = {}
    for f in pkg.joinpath("static").iterdir():
        suffix = Path(f.name).suffix
        if suffix in _STATIC_TYPES:
            static[f.name] = (f.read_bytes(), _STATIC_TYPES[suffix])
    templates = {
        f.name: Template(f.read_text(encoding="utf-8"))
        for f in pkg.joinpath("templates").iterdir()
        if f.name.endswith(".html")
    }
    return static, templates


def _clean(obj: Any) -> Any:
    """NaN/Inf -> None so the JSON is valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def instructions_html(settings: sdb.StudySettings, n_scored: int, n_practice: int) -> str:
    """The instructions shown before the first trial, from the study's settings."""
    c = " and ".join(settings.contrasts) if settings.contrasts else "MR"
    p: list[str] = []
    if settings.mode == "2afc":
        p.append(
            f"You will see {n_scored} pairs of brain MR images ({html.escape(c)} slices). In each "
            "pair one image is a real scan and the other was generated by a computer program. "
            "Pick the image you think is <b>real</b>."
        )
        keys = "<kbd>&larr;</kbd> left is real, <kbd>&rarr;</kbd> right is real"
    else:
        p.append(
            f"You will see {n_scored} brain MR images ({html.escape(c)} slices), one at a time. "
            "Some are real scans; others were generated by a computer program. For each image, "
            "decide whether it is <b>real</b> or <b>synthetic</b>."
        )
        if settings.scale == "six":
            keys = "keys <kbd>1</kbd> (surely real) to <kbd>6</kbd> (surely synthetic)"
        else:
            keys = "<kbd>R</kbd> real, <kbd>S</kbd> synthetic"
    if settings.scale == "confidence":
        keys += (
            "; optionally, before answering, how sure you are with <kbd>1</kbd> (guessing) to "
            "<kbd>5</kbd> (certain)"
        )
    p.append(f"Answer with the buttons or the keyboard: {keys}.")
    if settings.exposure_ms:
        p.append(
            f"Each image is shown for {settings.exposure_ms / 1000:g} s and then hidden; you "
            "can answer while it is shown or after."
        )
    else:
        p.append("Take the time you need; your response time is recorded.")
    if n_practice:
        p.append(
            f"The first {n_practice} trials are practice: after each one you are told the right "
            "answer. They are not scored."
        )
    p.append(
        "Every answer is saved at once. You can close this page and open your link again "
        "later to continue where you stopped. Please do not share your link."
    )
    return "\n".join(f"<p>{x}</p>" for x in p)


def create_app(db_path: str | Path) -> FastAPI:
    """The app for one study file (checked now, so a bad path fails before serving)."""
    path = Path(db_path)
    conn = sdb.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        settings = sdb.load_settings(conn)
        n_scored = conn.execute("SELECT COUNT(*) FROM items WHERE practice = 0").fetchone()[0]
        n_practice = conn.execute("SELECT COUNT(*) FROM items WHERE practice = 1").fetchone()[0]
    finally:
        conn.close()
    static, templates = _load_package_files()
    page_vars = {
        "title": html.escape(settings.title),
        "instructions": instructions_html(settings, n_scored, n_practice),
    }
    reader_page = templates["reader.html"].substitute(page_vars)
    admin_page = templates["admin.html"].substitute(page_vars)
    index_page = templates["message.html"].substitute(
        title=page_vars["title"],
        heading=page_vars["title"],
        message="<p>This is an mrsynth reader study. Readers: open the private link you were "
        'given.</p><p>Study organisers: <a href="/admin">admin page</a>.</p>',
    )
    unknown_page = templates["message.html"].substitute(
        title="Unknown link",
        heading="Unknown link",
        message="<p>This link is not valid. Check the address, or ask the study's organiser "
        "for your link.</p>",
    )

    app = FastAPI(title="mrsynth study", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_SecurityHeaders)
    app.state.db_path = path
    app.state.settings = settings

    # Writers queue here instead of in SQLite's busy handler, whose sleep-and-retry
    # back-off (up to 100 ms per retry) dominated tail latency under concurrent answers.
    # SQLite still arbitrates against other processes (`add-reader` while serving).
    write_lock = threading.Lock()

    def open_db() -> sqlite3.Connection:
        c = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        c.row_factory = sqlite3.Row
        c.execute("PRAGMA synchronous = FULL")
        c.execute("PRAGMA foreign_keys = ON")
        return c

    def reader_or_404(c: sqlite3.Connection, token: str) -> sqlite3.Row:
        r = sdb.reader_by_token(c, token)
        if r is None:
            raise HTTPException(404, "Unknown link. Check the address you were given.")
        return r

    def state_of(c: sqlite3.Connection, reader: sqlite3.Row, token: str) -> dict[str, Any]:
        counts = c.execute(
            """SELECT SUM(t.practice = 0), SUM(t.practice = 0 AND a.id IS NOT NULL),
                      SUM(t.practice = 1), SUM(t.practice = 1 AND a.id IS NOT NULL)
               FROM trials t LEFT JOIN answers a ON a.trial_id = t.id WHERE t.reader_id = ?""",
            (reader["id"],),
        ).fetchone()
        total, answered, p_total, p_answered = (int(x or 0) for x in counts)
        nxt = c.execute(
            """SELECT t.uid, t.practice FROM trials t LEFT JOIN answers a ON a.trial_id = t.id
               WHERE t.reader_id = ? AND a.id IS NULL ORDER BY t.position LIMIT 1""",
            (reader["id"],),
        ).fetchone()
        trial = None
        if nxt is not None:
            n_slots = 2 if settings.mode == "2afc" else 1
            trial = {
                "id": nxt["uid"],
                "practice": bool(nxt["practice"]),
                "images": [f"/api/r/{token}/image/{nxt['uid']}/{s}" for s in range(n_slots)],
            }
        return {
            "reader": reader["name"],
            "started": reader["started_at"] is not None,
            "done": nxt is None,
            "mode": settings.mode,
            "scale": settings.scale,
            "exposure_ms": settings.exposure_ms,
            "total": total,
            "answered": answered,
            "practice_total": p_total,
            "practice_answered": p_answered,
            "trial": trial,
        }

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "Malformed request.", "errors": errors}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(index_page)

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        hit = static.get(name)  # a fixed dict: no path from the request reaches the disk
        if hit is None:
            raise HTTPException(404, "Not found.")
        return Response(hit[0], media_type=hit[1])

    @app.get("/r/{token}", response_class=HTMLResponse)
    def reader_page_route(token: str) -> HTMLResponse:
        c = open_db()
        try:
            known = sdb.reader_by_token(c, token) is not None
        finally:
            c.close()
        if not known:
            return HTMLResponse(unknown_page, status_code=404)
        return HTMLResponse(reader_page)

    @app.get("/api/r/{token}/state")
    def get_state(token: str) -> dict[str, Any]:
        c = open_db()
        try:
            return state_of(c, reader_or_404(c, token), token)
        finally:
            c.close()

    @app.post("/api/r/{token}/start")
    def start(token: str) -> dict[str, Any]:
        c = open_db()
        try:
            reader = reader_or_404(c, token)
            if reader["started_at"] is None:
                with write_lock, sdb.transaction(c):
                    c.execute(
                        "UPDATE readers SET started_at = ? WHERE id = ? AND started_at IS NULL",
                        (time.time(), reader["id"]),
                    )
                reader = reader_or_404(c, token)
            return state_of(c, reader, token)
        finally:
            c.close()

    @app.get("/api/r/{token}/image/{trial}/{slot}")
    def image(token: str, trial: str, slot: int) -> Response:
        c = open_db()
        try:
            reader = reader_or_404(c, token)
            row = c.execute(
                """SELECT t.id, t.real_slot, t.shown_at, i.real_image, i.synthetic_image
                   FROM trials t JOIN items i ON i.id = t.item_id
                   WHERE t.uid = ? AND t.reader_id = ?""",
                (trial, reader["id"]),
            ).fetchone()
            if row is None or slot not in ((0, 1) if settings.mode == "2afc" else (0,)):
                raise HTTPException(404, "Not found.")
            if settings.mode == "2afc":
                image_id = row["real_image"] if slot == row["real_slot"] else row["synthetic_image"]
            else:
                image_id = row["real_image"] or row["synthetic_image"]
            png = c.execute("SELECT png FROM images WHERE id = ?", (image_id,)).fetchone()[0]
            if row["shown_at"] is None:
                with write_lock, sdb.transaction(c):
                    c.execute(
                        "UPDATE trials SET shown_at = ? WHERE id = ? AND shown_at IS NULL",
                        (time.time(), row["id"]),
                    )
        finally:
            c.close()
        return Response(bytes(png), media_type="image/png")

    @app.post("/api/r/{token}/answer")
    def answer(token: str, body: AnswerIn) -> dict[str, Any]:
        _check_fields(body, settings)
        c = open_db()
        try:
            reader = reader_or_404(c, token)
            with write_lock, sdb.transaction(c):
                row = c.execute(
                    """SELECT t.id, t.practice, t.real_slot, t.shown_at, i.real_image,
                              i.synthetic_image
                       FROM trials t JOIN items i ON i.id = t.item_id
                       WHERE t.uid = ? AND t.reader_id = ?""",
                    (body.trial, reader["id"]),
                ).fetchone()
                if row is None:
                    # Unknown, or another reader's trial: the same answer for both.
                    raise HTTPException(404, "No such trial for this reader.")
                old = c.execute(
                    "SELECT label, choice, confidence, rating FROM answers WHERE trial_id = ?",
                    (row["id"],),
                ).fetchone()
                if old is None:
                    now = time.time()
                    label, correct = _judge(body, row, settings)
                    server_ms = (now - row["shown_at"]) * 1000.0 if row["shown_at"] else None
                    c.execute(
                        """INSERT INTO answers(trial_id, reader_id, label, choice, confidence,
                               rating, correct, response_ms, server_ms, answered_at)
                           VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(trial_id) DO NOTHING""",
                        (
                            row["id"],
                            reader["id"],
                            label,
                            body.choice,
                            body.confidence,
                            body.rating,
                            int(correct),
                            body.response_ms,
                            server_ms,
                            now,
                        ),
                    )
                    if reader["started_at"] is None:
                        c.execute(
                            "UPDATE readers SET started_at = ? WHERE id = ?", (now, reader["id"])
                        )
            out: dict[str, Any] = {"stored": old is None, "duplicate": old is not None}
            if old is not None:
                out["answer"] = dict(old)
            if row["practice"]:
                out["feedback"] = _feedback(row, settings, body if old is None else None, old)
            out["state"] = state_of(c, reader_or_404(c, token), token)
            return out
        finally:
            c.close()

    # ------------------------------------------------------------------ admin
    def admin_or_401(request: Request, c: sqlite3.Connection) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not sdb.check_admin_token(c, token.strip()):
            raise HTTPException(
                401, "Admin token required.", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.get("/admin", response_class=HTMLResponse)
    def admin() -> HTMLResponse:
        return HTMLResponse(admin_page)

    @app.get("/api/admin/summary")
    def admin_summary(request: Request, ci: Literal["wilson", "exact"] = "wilson") -> JSONResponse:
        from mrsynth.study.stats import summarise

        c = open_db()
        try:
            admin_or_401(request, c)
            return JSONResponse(_clean(summarise(c, ci=ci)))
        finally:
            c.close()

    @app.get("/api/admin/answers.csv")
    def admin_csv(request: Request) -> Response:
        c = open_db()
        try:
            admin_or_401(request, c)
            text = answers_csv(sdb.answer_rows(c, include_practice=True))
        finally:
            c.close()
        return Response(text, media_type="text/csv; charset=utf-8")

    @app.get("/api/admin/figure.png")
    def admin_figure(request: Request) -> Response:
        import tempfile

        from mrsynth.study.stats import figure, summarise

        c = open_db()
        try:
            admin_or_401(request, c)
            summary = summarise(c)
        finally:
            c.close()
        if not summary["rows"]:
            raise HTTPException(404, "No answers yet.")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "figure.png"
            figure(summary, str(out))
            data = out.read_bytes()
        return Response(data, media_type="image/png")

    return app


def _check_fields(body: AnswerIn, settings: sdb.StudySettings) -> None:
    """The answer fields the study's protocol needs, and no others (422 otherwise)."""
    problems = []
    if settings.mode == "2afc":
        if body.choice is None:
            problems.append("'choice' (0 = left, 1 = right) is required in 2AFC mode")
        if body.label is not None or body.rating is not None:
            problems.append("'label' and 'rating' are not used in 2AFC mode")
    elif settings.scale == "six":
        if body.rating is None:
            problems.append("'rating' (1-6) is required with the six-point scale")
        if body.label is not None or body.choice is not None or body.confidence is not None:
            problems.append("only 'rating' answers a six-point trial")
    else:
        if body.label is None:
            problems.append("'label' ('real' or 'synthetic') is required")
        if body.choice is not None or body.rating is not None:
            problems.append("'choice' and 'rating' are not used in single-image mode")
    if settings.scale != "confidence" and body.confidence is not None:
        problems.append("this study does not ask for a confidence")
    if problems:
        raise HTTPException(422, "; ".join(problems))


def _judge(
    body: AnswerIn, row: sqlite3.Row, settings: sdb.StudySettings
) -> tuple[str | None, bool]:
    """(stored label, correct) for a validated answer."""
    if settings.mode == "2afc":
        return None, body.choice == row["real_slot"]
    label = body.label
    if settings.scale == "six":
        label = "real" if (body.rating or 0) <= 3 else "synthetic"
    truth = "real" if row["synthetic_image"] is None else "synthetic"
    return label, label == truth


def _feedback(
    row: sqlite3.Row, settings: sdb.StudySettings, body: AnswerIn | None, old: sqlite3.Row | None
) -> dict[str, Any]:
    if settings.mode == "2afc":
        choice = body.choice if body is not None else old["choice"]
        return {"correct": choice == row["real_slot"], "real_slot": row["real_slot"]}
    truth = "real" if row["synthetic_image"] is None else "synthetic"
    if body is not None:
        label, _ = _judge(body, row, settings)
    else:
        label = old["label"]
    return {"correct": label == truth, "truth": truth}


_CSV_FIELDS = (
    "reader",
    "position",
    "practice",
    "item",
    "kind",
    "model",
    "contrast",
    "subject",
    "slice",
    "label",
    "choice",
    "real_slot",
    "confidence",
    "rating",
    "correct",
    "response_ms",
    "server_ms",
    "answered_at",
    "real_source",
    "synthetic_source",
)


def answers_csv(rows: list[dict[str, Any]]) -> str:
    """Every answer with its truth, one row per trial (for one's own analysis)."""
    return sdb.rows_csv(rows, _CSV_FIELDS)
