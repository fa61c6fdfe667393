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
``GET  /favicon.ico``                     204 (no icon)

Each request gets its own connection from the ``get_db`` dependency (``db.connect``:
``mode=rw``, so a study file deleted while serving is never re-created); queries live
in ``study/db.py``. A study file that cannot be opened or written gives 503 with a JSON
``detail`` (an HTML page outside ``/api``), logged once per distinct problem. Request
bodies over :data:`MAX_BODY_BYTES` get 413 before routing, parsing or the token check.

Timing: the first image sent for a trial sets ``shown_at``; the answer's ``server_ms``
runs from it. Asking again for an image already sent (a reloaded page) counts in the
trial's ``reloads``, never restarts ``shown_at``, and the page's own ``response_ms`` of
such a trial is not stored (it would count only from the reload). With an exposure
time, images are refused (410) once ``exposure_ms`` + :data:`EXPOSURE_GRACE_S` have
passed since ``shown_at``.

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
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from mrsynth.errors import MrsynthError
from mrsynth.study import db as sdb

log = logging.getLogger("mrsynth.study")

#: Largest request body accepted (an answer is ~150 bytes); larger ones get 413 unread.
MAX_BODY_BYTES = 4096
#: Time allowed between sending an image and the end of its exposure beyond
#: ``exposure_ms`` (download and decoding); after it the image is refused (410).
EXPOSURE_GRACE_S = 1.0

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


class StudyUnavailable(Exception):
    """The study file cannot be opened (deleted, replaced, unreadable): 503, not 500."""


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before routing, parsing or auth.

    A declared ``Content-Length`` over the limit is refused without reading; a body
    without one (chunked) is read up to the limit and refused as soon as it passes it.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"Request body too large (the limit is {self.limit} bytes)."}
        ).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def get_db(request: Request) -> Iterator[sqlite3.Connection]:
    """One connection per request, from ``db.connect`` (mode=rw: never creates the file)."""
    try:
        c = sdb.connect(request.app.state.db_path)
    except MrsynthError as exc:
        raise StudyUnavailable(str(exc)) from exc
    try:
        yield c
    finally:
        c.close()


Db = Annotated[sqlite3.Connection, Depends(get_db)]


def admin_db(request: Request, c: Db) -> sqlite3.Connection:
    """The connection, once the request's ``Authorization: Bearer`` admin token is checked."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not sdb.check_admin_token(c, token.strip()):
        raise HTTPException(401, "Admin token required.", headers={"WWW-Authenticate": "Bearer"})
    return c


AdminDb = Annotated[sqlite3.Connection, Depends(admin_db)]


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


def create_app(db_path: str | Path, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The app for one study file (checked now, so a bad path fails before serving).

    ``clock`` gives the server-side times (``shown_at``, answers); tests pass a fake one.
    """
    path = Path(db_path)
    conn = sdb.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        settings = sdb.load_settings(conn)
        n_scored, n_practice = sdb.item_counts(conn)
    finally:
        conn.close()
    pages = _pages(settings, n_scored, n_practice)
    static = pages.pop("static")
    slots = (0, 1) if settings.mode == "2afc" else (0,)
    exposure_s = settings.exposure_ms / 1000.0

    app = FastAPI(title="mrsynth study", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(_SecurityHeaders)
    app.state.db_path = path
    app.state.settings = settings

    # Writers queue here instead of in SQLite's busy handler, whose sleep-and-retry
    # back-off (up to 100 ms per retry) dominated tail latency under concurrent answers.
    # SQLite still arbitrates against other processes (`add-reader` while serving).
    write_lock = threading.Lock()
    logged: set[str] = set()

    def reader_or_404(c: sqlite3.Connection, token: str) -> sqlite3.Row:
        r = sdb.reader_by_token(c, token)
        if r is None:
            raise HTTPException(404, "Unknown link. Check the address you were given.")
        return r

    def state_of(c: sqlite3.Connection, reader: sqlite3.Row, token: str) -> dict[str, Any]:
        total, answered, p_total, p_answered = sdb.reader_counts(c, reader["id"])
        nxt = sdb.next_trial(c, reader["id"])
        trial = None
        if nxt is not None:
            trial = {
                "id": nxt["uid"],
                "practice": bool(nxt["practice"]),
                "images": [f"/api/r/{token}/image/{nxt['uid']}/{s}" for s in slots],
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

    @app.exception_handler(StudyUnavailable)
    @app.exception_handler(sqlite3.Error)
    async def _unavailable(request: Request, exc: Exception) -> Response:
        # A deleted, replaced, read-only or locked study file: say so (once in the log),
        # answer 503 so the reader's page offers to try again, and create nothing.
        problem = f"{type(exc).__name__}: {exc}"
        if problem not in logged:
            logged.add(problem)
            log.error("Study database %s cannot be used: %s", path, problem)
        detail = (
            "The study is unavailable right now: its database cannot be read or written. "
            "Answers given so far are saved. Try again later, or tell the study's organiser."
        )
        if not request.url.path.startswith("/api/"):
            return HTMLResponse(pages["unavailable"], status_code=503)
        return JSONResponse({"detail": detail}, status_code=503)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(pages["index"])

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in every page's console

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        hit = static.get(name)  # a fixed dict: no path from the request reaches the disk
        if hit is None:
            raise HTTPException(404, "Not found.")
        return Response(hit[0], media_type=hit[1])

    @app.get("/r/{token}", response_class=HTMLResponse)
    def reader_page(token: str, c: Db) -> HTMLResponse:
        if sdb.reader_by_token(c, token) is None:
            return HTMLResponse(pages["unknown"], status_code=404)
        return HTMLResponse(pages["reader"])

    @app.get("/api/r/{token}/state")
    def get_state(token: str, c: Db) -> dict[str, Any]:
        return state_of(c, reader_or_404(c, token), token)

    @app.post("/api/r/{token}/start")
    def start(token: str, c: Db) -> dict[str, Any]:
        reader = reader_or_404(c, token)
        if reader["started_at"] is None:
            with write_lock, sdb.transaction(c):
                sdb.mark_started(c, reader["id"], clock())
            reader = reader_or_404(c, token)
        return state_of(c, reader, token)

    @app.get("/api/r/{token}/image/{trial}/{slot}")
    def image(token: str, trial: str, slot: int, c: Db) -> Response:
        reader = reader_or_404(c, token)
        if slot not in slots:
            raise HTTPException(404, "Not found.")
        now = clock()
        with write_lock, sdb.transaction(c):
            row = sdb.reader_trial(c, trial, reader["id"])
            if row is None:
                raise HTTPException(404, "Not found.")
            sdb.record_view(c, row, slot, now)
        shown = row["shown_at"] if row["shown_at"] is not None else now
        if exposure_s and now > shown + exposure_s + EXPOSURE_GRACE_S:
            raise HTTPException(410, "The viewing time of this image is over. Answer from memory.")
        real = settings.mode != "2afc" or slot == row["real_slot"]
        image_id = row["real_image"] if real and row["real_image"] else row["synthetic_image"]
        return Response(sdb.image_png(c, image_id), media_type="image/png")

    @app.post("/api/r/{token}/answer")
    def answer(token: str, body: AnswerIn, c: Db) -> dict[str, Any]:
        _check_fields(body, settings)
        reader = reader_or_404(c, token)
        now = clock()
        with write_lock, sdb.transaction(c):
            row = sdb.reader_trial(c, body.trial, reader["id"])
            if row is None:
                # Unknown, or another reader's trial: the same answer for both.
                raise HTTPException(404, "No such trial for this reader.")
            old = sdb.existing_answer(c, row["id"])
            if old is None:
                _store_answer(c, row, reader["id"], body, settings, now)
        out: dict[str, Any] = {"stored": old is None, "duplicate": old is not None}
        if old is not None:
            out["answer"] = dict(old)
        if row["practice"]:
            out["feedback"] = _feedback(row, settings, body if old is None else None, old)
        out["state"] = state_of(c, reader_or_404(c, token), token)
        return out

    # ------------------------------------------------------------------ admin
    @app.get("/admin", response_class=HTMLResponse)
    def admin() -> HTMLResponse:
        return HTMLResponse(pages["admin"])

    @app.get("/api/admin/summary")
    def admin_summary(c: AdminDb, ci: Literal["wilson", "exact"] = "wilson") -> JSONResponse:
        from mrsynth.study.stats import summarise

        return JSONResponse(_clean(summarise(c, ci=ci)))

    @app.get("/api/admin/answers.csv")
    def admin_csv(c: AdminDb) -> Response:
        text = answers_csv(sdb.answer_rows(c, include_practice=True))
        return Response(text, media_type="text/csv; charset=utf-8")

    @app.get("/api/admin/figure.png")
    def admin_figure(c: AdminDb) -> Response:
        from mrsynth.study.stats import figure_png, summarise

        summary = summarise(c)
        if not summary["rows"]:
            raise HTTPException(404, "No answers yet.")
        return Response(figure_png(summary), media_type="image/png")

    return app


def _pages(settings: sdb.StudySettings, n_scored: int, n_practice: int) -> dict[str, Any]:
    """Every page the app serves, rendered once (they hold nothing per reader)."""
    static, templates = _load_package_files()
    title = html.escape(settings.title)
    page_vars = {"title": title, "instructions": instructions_html(settings, n_scored, n_practice)}

    def message(title: str, heading: str, text: str) -> str:
        return templates["message.html"].substitute(title=title, heading=heading, message=text)

    return {
        "static": static,
        "reader": templates["reader.html"].substitute(page_vars),
        "admin": templates["admin.html"].substitute(page_vars),
        "index": message(
            title, title,
            "<p>This is an mrsynth reader study. Readers: open the private link you were "
            'given.</p><p>Study organisers: <a href="/admin">admin page</a>.</p>',
        ),
        "unknown": message(
            "Unknown link", "Unknown link",
            "<p>This link is not valid. Check the address, or ask the study's organiser "
            "for your link.</p>",
        ),
        "unavailable": message(
            "Study unavailable", "Study unavailable",
            "<p>The study cannot be reached right now. Answers given so far are saved. "
            "Try again later, or tell the study's organiser.</p>",
        ),
    }


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


def _store_answer(
    c: sqlite3.Connection,
    row: sqlite3.Row,
    reader_id: int,
    body: AnswerIn,
    settings: sdb.StudySettings,
    now: float,
) -> None:
    """Store a first answer with its truth and both response times (inside a transaction)."""
    label, correct = _judge(body, row, settings)
    shown = row["shown_at"]
    sdb.insert_answer(
        c, row["id"], reader_id, label=label, choice=body.choice, confidence=body.confidence,
        rating=body.rating, correct=int(correct),
        # After a reload the page's clock covers only the last view: not stored.
        response_ms=None if row["reloads"] else body.response_ms,
        server_ms=None if shown is None else (now - shown) * 1000.0,
        answered_at=now,
    )
    sdb.mark_started(c, reader_id, now)


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
    "reloads",
    "answered_at",
    "real_source",
    "synthetic_source",
)


def answers_csv(rows: list[dict[str, Any]]) -> str:
    """Every answer with its truth, one row per trial (for one's own analysis)."""
    return sdb.rows_csv(rows, _CSV_FIELDS)
