"""The study file: one SQLite database holding settings, pre-rendered images, readers and answers.

Why SQLite in WAL mode: one file to copy or archive, readers (the web app's
requests, ``study results``) never block the single writer, and each answer is
one short ``BEGIN IMMEDIATE`` transaction. ``answers.trial_id`` is UNIQUE, so a
repeated submission of the same trial is a no-op and the first answer stands.

Tables
------
``meta``     key/value: schema version, settings (JSON), admin-token hash, provenance
``images``   one pre-rendered PNG per sampled image plus its truth (kind, model, contrast,
             subject, slice, source) -- never sent to a reader except as PNG bytes
``items``    what is judged: one image (single mode) or a real + synthetic pair (2AFC);
             ``practice`` items are shown first with feedback and not scored
``readers``  name, SHA-256 of the private token (the token itself is never stored)
``trials``   per reader: a shuffled order of all items, an opaque random ``uid`` used in
             URLs and, in 2AFC mode, which side (slot 0 = left, 1 = right) holds the real image;
             ``shown_at`` (first image sent), ``served`` (bit per slot sent) and ``reloads``
             (images asked for again: a reloaded page)
``answers``  at most one row per trial
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import io
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.errors import DataError, MrsynthError

SCHEMA_VERSION = 2

MODES = ("single", "2afc")
SCALES = ("binary", "confidence", "six")

#: Labels of the six-point scale (rating 1..6); ratings 1-3 count as "real".
SIX_POINT_LABELS = (
    "Surely real",
    "Probably real",
    "Possibly real",
    "Possibly synthetic",
    "Probably synthetic",
    "Surely synthetic",
)

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE images (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('real', 'synthetic')),
    model       TEXT,
    contrast    TEXT NOT NULL,
    subject     TEXT,
    slice       INTEGER,
    source      TEXT NOT NULL,
    native_h    INTEGER NOT NULL,
    native_w    INTEGER NOT NULL,
    png         BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    CHECK ((kind = 'real') = (model IS NULL))
);
CREATE TABLE items (
    id              INTEGER PRIMARY KEY,
    practice        INTEGER NOT NULL CHECK (practice IN (0, 1)),
    real_image      INTEGER REFERENCES images(id),
    synthetic_image INTEGER REFERENCES images(id),
    CHECK (real_image IS NOT NULL OR synthetic_image IS NOT NULL)
);
CREATE TABLE readers (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    started_at  REAL
);
CREATE TABLE trials (
    id          INTEGER PRIMARY KEY,
    uid         TEXT NOT NULL UNIQUE,
    reader_id   INTEGER NOT NULL REFERENCES readers(id),
    item_id     INTEGER NOT NULL REFERENCES items(id),
    position    INTEGER NOT NULL,
    practice    INTEGER NOT NULL CHECK (practice IN (0, 1)),
    real_slot   INTEGER CHECK (real_slot IN (0, 1)),
    shown_at    REAL,
    served      INTEGER NOT NULL DEFAULT 0,
    reloads     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (reader_id, position),
    UNIQUE (reader_id, item_id)
);
CREATE TABLE answers (
    id          INTEGER PRIMARY KEY,
    trial_id    INTEGER NOT NULL UNIQUE REFERENCES trials(id),
    reader_id   INTEGER NOT NULL REFERENCES readers(id),
    label       TEXT CHECK (label IN ('real', 'synthetic')),
    choice      INTEGER CHECK (choice IN (0, 1)),
    confidence  INTEGER CHECK (confidence BETWEEN 1 AND 5),
    rating      INTEGER CHECK (rating BETWEEN 1 AND 6),
    correct     INTEGER NOT NULL CHECK (correct IN (0, 1)),
    response_ms REAL,
    server_ms   REAL,
    answered_at REAL NOT NULL
);
CREATE INDEX trials_reader ON trials(reader_id, position);
CREATE INDEX answers_reader ON answers(reader_id);
"""


@dataclass
class StudySettings:
    """Protocol options fixed at ``study create`` (stored as JSON in ``meta``)."""

    mode: str = "single"
    scale: str = "confidence"
    exposure_ms: int = 0
    n_real: int = 96
    n_synthetic: int = 72
    n_practice: int = 0
    pairing: str = "matched"
    display_size: int = 512
    window: str = "robust"
    rotate: str = "auto"
    seed: int = 0
    contrasts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    title: str = "Real or synthetic?"

    def validate(self) -> None:
        from mrsynth.errors import ConfigError

        if self.mode not in MODES:
            raise ConfigError(f"Unknown study mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.scale not in SCALES:
            raise ConfigError(
                f"Unknown answer scale {self.scale!r}; use one of {', '.join(SCALES)}."
            )
        if self.mode == "2afc" and self.scale == "six":
            raise ConfigError(
                "The six-point real/synthetic scale rates one image; it cannot be used in 2AFC "
                "mode. Use --scale confidence or --scale binary with --mode 2afc."
            )
        if self.exposure_ms < 0:
            raise ConfigError("--exposure-ms must be 0 (unlimited) or a positive time in ms.")
        if self.n_practice < 0 or self.n_real < 0 or self.n_synthetic < 1:
            raise ConfigError("--n-real/--n-practice must be >= 0 and --n-synthetic >= 1.")
        if not 32 <= self.display_size <= 2048:
            raise ConfigError("--display-size must be between 32 and 2048 pixels.")
        if self.window not in ("robust", "fixed"):
            raise ConfigError("--window must be 'robust' or 'fixed'.")
        if self.rotate not in ("auto", "0", "90", "180", "270"):
            raise ConfigError("--rotate must be auto, 0, 90, 180 or 270.")
        if self.pairing not in ("matched", "unmatched"):
            raise ConfigError("--pairing must be 'matched' or 'unmatched'.")


# --------------------------------------------------------------------------- connections
def connect(path: str | Path, *, must_exist: bool = True) -> sqlite3.Connection:
    """Open a study database in autocommit mode (transactions are explicit).

    ``synchronous=FULL`` so that an answer acknowledged to the browser survives a
    power cut, not only a crash of the server process.
    """
    p = Path(path)
    if must_exist and not p.is_file():
        raise DataError(
            f"Study file {p} does not exist. Create one with `mrsynth study create ... "
            f"--out {p.name}`."
        )
    # An existing study is opened with mode=rw (read-only if the file is write-protected):
    # a file deleted while serving is an error, never silently re-created empty.
    target = f"{p.resolve().as_uri()}?mode=rw" if must_exist else str(p)
    try:
        conn = sqlite3.connect(
            target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=must_exist
        )
    except sqlite3.OperationalError as exc:
        raise DataError(
            f"Cannot open study file {p} ({exc}). Check that it exists and that this user may "
            "read and write it and its folder."
        ) from exc
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")
        if must_exist:
            _check_schema(conn, p)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DataError(
            f"{p} is not a readable mrsynth study database ({exc}). Pass the .db file written "
            "by `mrsynth study create`."
        ) from exc
    except MrsynthError:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, p: Path) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is None:
        raise DataError(
            f"{p} is not an mrsynth study database (no study metadata). Pass the .db file "
            "written by `mrsynth study create`."
        )
    if int(row[0]) == 1:
        try:
            _migrate_v1(conn)
        except sqlite3.OperationalError as exc:
            raise DataError(
                f"{p} is a study file of schema version 1; it needs a small upgrade that could "
                f"not be written ({exc}). Make it writable and run `mrsynth study results` once."
            ) from exc
    elif int(row[0]) != SCHEMA_VERSION:
        raise DataError(
            f"{p} is a study database of schema version {row[0]}; this mrsynth reads version "
            f"{SCHEMA_VERSION}. Use the mrsynth version that created it."
        )


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Version 1 files lack the reload bookkeeping of ``trials``; add it (no data changes)."""
    with transaction(conn):
        if int(get_meta(conn, "schema_version")) == 1:
            conn.execute("ALTER TABLE trials ADD COLUMN served INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE trials ADD COLUMN reloads INTEGER NOT NULL DEFAULT 0")
            set_meta(conn, "schema_version", str(SCHEMA_VERSION))


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: take the write lock up front, roll back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
    )


def set_meta(conn: sqlite3.Connection, key: str, value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, text),
    )


def get_meta(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def load_settings(conn: sqlite3.Connection) -> StudySettings:
    raw = get_meta(conn, "settings")
    if raw is None:
        raise DataError("The study database has no settings; create it again.")
    return StudySettings(**json.loads(raw))


def store_settings(conn: sqlite3.Connection, settings: StudySettings) -> None:
    set_meta(conn, "settings", asdict(settings))


# --------------------------------------------------------------------------- tokens
def new_token() -> str:
    """A 192-bit URL-safe random token (readers' links, the admin token, trial ids)."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    """SHA-256 hex digest. Tokens are 192-bit random, so a plain hash cannot be brute-forced."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_admin_token(conn: sqlite3.Connection, token: str | None) -> bool:
    stored = get_meta(conn, "admin_token_sha256")
    if not token or stored is None:
        return False
    return hmac.compare_digest(hash_token(token), stored)


# --------------------------------------------------------------------------- readers
def add_reader(conn: sqlite3.Connection, name: str) -> str:
    """Create a reader with a per-reader shuffled trial list; return the private token.

    The order is drawn from ``(study seed, reader number)`` so it can be reproduced
    from the study file; trial ids are independent cryptographic random tokens.
    """
    name = name.strip()
    if not name or len(name) > 200:
        raise MrsynthError("A reader name must be 1-200 characters.")
    settings = load_settings(conn)
    token = new_token()
    with transaction(conn):
        if conn.execute("SELECT 1 FROM readers WHERE name = ?", (name,)).fetchone():
            raise MrsynthError(
                f"A reader named {name!r} already exists in this study. Choose another name, "
                "or pass --new-link to give that reader a new link (answers are kept)."
            )
        cur = conn.execute(
            "INSERT INTO readers(name, token_hash, created_at) VALUES (?, ?, ?)",
            (name, hash_token(token), time.time()),
        )
        reader_id = int(cur.lastrowid or 0)
        rng = np.random.default_rng([settings.seed, reader_id])
        position = 0
        for practice in (1, 0):
            items = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM items WHERE practice = ? ORDER BY id", (practice,)
                )
            ]
            order = rng.permutation(len(items))
            slots: list[int | None] = [None] * len(items)
            if settings.mode == "2afc":
                # Balanced sides: as many real-left as real-right trials, in random order.
                sides = np.arange(len(items)) % 2
                slots = [int(s) for s in rng.permutation(sides)]
            for k, idx in enumerate(order):
                conn.execute(
                    "INSERT INTO trials(uid, reader_id, item_id, position, practice, real_slot) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (new_token(), reader_id, items[idx], position, practice, slots[k]),
                )
                position += 1
    return token


def reset_reader_token(conn: sqlite3.Connection, name: str) -> str:
    """Give an existing reader a new link (the old one stops working; answers are kept)."""
    token = new_token()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE readers SET token_hash = ? WHERE name = ?", (hash_token(token), name)
        )
        if cur.rowcount != 1:
            raise MrsynthError(f"No reader named {name!r} in this study; add one first.")
    return token


def reader_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    if not token or len(token) > 100:
        return None
    return conn.execute(
        "SELECT id, name, started_at FROM readers WHERE token_hash = ?", (hash_token(token),)
    ).fetchone()


def reader_progress(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per reader: scored trials answered / total, practice answered, timestamps."""
    rows = conn.execute(
        """
        SELECT r.id, r.name, r.created_at, r.started_at,
               SUM(t.practice = 0) AS n_scored,
               SUM(t.practice = 1) AS n_practice,
               SUM(t.practice = 0 AND a.id IS NOT NULL) AS answered,
               SUM(t.practice = 1 AND a.id IS NOT NULL) AS practice_answered,
               MAX(a.answered_at) AS last_answer,
               SUM(t.reloads > 0) AS reloaded
        FROM readers r
        JOIN trials t ON t.reader_id = r.id
        LEFT JOIN answers a ON a.trial_id = t.id
        GROUP BY r.id ORDER BY r.id
        """
    ).fetchall()
    return [
        {
            "name": r["name"],
            "answered": int(r["answered"] or 0),
            "total": int(r["n_scored"] or 0),
            "practice_answered": int(r["practice_answered"] or 0),
            "practice_total": int(r["n_practice"] or 0),
            "started": r["started_at"] is not None,
            "finished": int(r["answered"] or 0) == int(r["n_scored"] or 0),
            "last_answer": r["last_answer"],
            "reloaded": int(r["reloaded"] or 0),
        }
        for r in rows
    ]


# --------------------------------------------------------------------------- serving
def item_counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """(scored items, practice items) of the study."""
    row = conn.execute("SELECT SUM(practice = 0), SUM(practice = 1) FROM items").fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def reader_counts(conn: sqlite3.Connection, reader_id: int) -> tuple[int, int, int, int]:
    """(scored total, scored answered, practice total, practice answered) of one reader."""
    row = conn.execute(
        """SELECT SUM(t.practice = 0), SUM(t.practice = 0 AND a.id IS NOT NULL),
                  SUM(t.practice = 1), SUM(t.practice = 1 AND a.id IS NOT NULL)
           FROM trials t LEFT JOIN answers a ON a.trial_id = t.id WHERE t.reader_id = ?""",
        (reader_id,),
    ).fetchone()
    return tuple(int(x or 0) for x in row)  # type: ignore[return-value]


def next_trial(conn: sqlite3.Connection, reader_id: int) -> sqlite3.Row | None:
    """The reader's first unanswered trial (uid, practice), or None when all are answered."""
    return conn.execute(
        """SELECT t.uid, t.practice FROM trials t LEFT JOIN answers a ON a.trial_id = t.id
           WHERE t.reader_id = ? AND a.id IS NULL ORDER BY t.position LIMIT 1""",
        (reader_id,),
    ).fetchone()


def mark_started(conn: sqlite3.Connection, reader_id: int, now: float) -> None:
    """Record when a reader left the instructions (the first time only)."""
    conn.execute(
        "UPDATE readers SET started_at = ? WHERE id = ? AND started_at IS NULL", (now, reader_id)
    )


def reader_trial(conn: sqlite3.Connection, uid: str, reader_id: int) -> sqlite3.Row | None:
    """One of the reader's trials with its item's images (None for another reader's trial)."""
    return conn.execute(
        """SELECT t.id, t.practice, t.real_slot, t.shown_at, t.served, t.reloads,
                  i.real_image, i.synthetic_image
           FROM trials t JOIN items i ON i.id = t.item_id
           WHERE t.uid = ? AND t.reader_id = ?""",
        (uid, reader_id),
    ).fetchone()


def image_png(conn: sqlite3.Connection, image_id: int) -> bytes:
    return bytes(conn.execute("SELECT png FROM images WHERE id = ?", (image_id,)).fetchone()[0])


def record_view(conn: sqlite3.Connection, trial: sqlite3.Row, slot: int, now: float) -> bool:
    """Note that ``slot``'s image of ``trial`` is being sent; True when it was sent before.

    The first image sent starts the trial's clock (``shown_at``); asking again for a
    slot already sent (a reloaded page) counts in ``reloads`` and never restarts it.
    """
    again = bool(trial["served"] >> slot & 1)
    conn.execute(
        """UPDATE trials SET shown_at = COALESCE(shown_at, ?), served = served | ?,
                  reloads = reloads + ? WHERE id = ?""",
        (now, 1 << slot, int(again), trial["id"]),
    )
    return again


def existing_answer(conn: sqlite3.Connection, trial_id: int) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT label, choice, confidence, rating FROM answers WHERE trial_id = ?", (trial_id,)
    ).fetchone()


def insert_answer(conn: sqlite3.Connection, trial_id: int, reader_id: int, **fields: Any) -> None:
    """Store one answer (a repeated one for the same trial is a no-op: the first stands)."""
    cols = ("label", "choice", "confidence", "rating", "correct", "response_ms", "server_ms",
            "answered_at")
    conn.execute(
        f"INSERT INTO answers(trial_id, reader_id, {', '.join(cols)}) "
        f"VALUES (?, ?, {', '.join('?' * len(cols))}) ON CONFLICT(trial_id) DO NOTHING",
        (trial_id, reader_id, *(fields[c] for c in cols)),
    )


# --------------------------------------------------------------------------- answers view
def answer_rows(
    conn: sqlite3.Connection, *, include_practice: bool = False
) -> list[dict[str, Any]]:
    """Every answer joined with its truth (for statistics and CSV export)."""
    sql = """
        SELECT r.name AS reader, t.position, t.practice, t.item_id AS item, t.real_slot,
               a.label, a.choice, a.confidence, a.rating, a.correct, a.response_ms,
               a.server_ms, a.answered_at, t.reloads,
               ri.id AS real_image, ri.contrast AS real_contrast, ri.subject AS real_subject,
               ri.slice AS real_slice, ri.source AS real_source,
               si.id AS synthetic_image, si.model AS model, si.contrast AS synthetic_contrast,
               si.subject AS synthetic_subject, si.slice AS synthetic_slice,
               si.source AS synthetic_source
        FROM answers a
        JOIN trials t ON t.id = a.trial_id
        JOIN readers r ON r.id = t.reader_id
        JOIN items i ON i.id = t.item_id
        LEFT JOIN images ri ON ri.id = i.real_image
        LEFT JOIN images si ON si.id = i.synthetic_image
    """
    if not include_practice:
        sql += " WHERE t.practice = 0"
    sql += " ORDER BY r.id, t.position"
    out = []
    for row in conn.execute(sql):
        d = dict(row)
        single = d["real_image"] is None or d["synthetic_image"] is None
        d["kind"] = ("real" if d["synthetic_image"] is None else "synthetic") if single else "pair"
        d["contrast"] = d["synthetic_contrast"] or d["real_contrast"]
        d["subject"] = d["synthetic_subject"] if d["synthetic_image"] else d["real_subject"]
        d["slice"] = d["synthetic_slice"] if d["synthetic_image"] else d["real_slice"]
        out.append(d)
    return out


def rows_csv(rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> str:
    """CSV text of ``rows`` with the columns ``fields`` (other keys dropped), Unix newlines.

    One writer for the study's tables (answers, results), so their CSV files read alike.
    Text cells that a spreadsheet would run as a formula are neutralised (:func:`csv_cell`).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(v) for k, v in r.items()})
    return buf.getvalue()


#: First characters that make spreadsheet programs treat a cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text value that starts like a formula (``=HYPERLINK(...)``) gets a leading ``'``.

    Reader names, model names and paths are user-supplied; numbers are left as they are.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
