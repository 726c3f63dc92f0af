"""Every generated image kept on disk with its settings: one SQLite database and one PNG file per image, per owner.

Layout under `directory`: `history.sqlite3` (WAL mode) and `images/<owner key>/<image id>.png`. The owner key is the
SHA-256 of the owner string, so no e-mail address is written anywhere on disk; the image id is random, so no file
name comes from user input.

Invariant: a row exists only while its file does. A file is written (and synced) before its row is committed and
removed only after its row's deletion is committed, so a crash at any point leaves at worst a file without a row.
Opening the store repairs both directions anyway (a row whose file went missing is dropped, a file without a row
is deleted), under the database's write lock, so it never races another process's add. Sizes and counts are read
from the rows, so they are never wrong.

One instance is shared by every session of a process (a lock around its one connection); any number of processes
may open the same directory (SQLite's locking, with a busy timeout).
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.errors import BadInputError

DATABASE_NAME = "history.sqlite3"
IMAGES_DIR = "images"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Another process holding the write lock (an add, its eviction, an open's repair) keeps it for milliseconds;
# 30 s is for a disk that stalls, not for normal contention.
BUSY_TIMEOUT_MS = 30_000
# The trigram index finds any substring of three characters or more; shorter queries scan the owner's rows.
TRIGRAM_CHARS = 3
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: eviction follows it, never a clock that may jump
        id TEXT NOT NULL UNIQUE,
        owner_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL,
        model TEXT NOT NULL,
        seed INTEGER,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        byte_size INTEGER NOT NULL,
        parameters TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS images_by_owner ON images (owner_key, seq)",
)
# An external-content index: the prompt text stays in `images` only; the triggers keep the index in the same
# transaction as the row. Built once, by the first instance whose SQLite has FTS5; 'rebuild' indexes older rows.
_FULL_TEXT_SCHEMA = (
    "CREATE VIRTUAL TABLE prompts USING fts5 (prompt, content='images', content_rowid='seq', tokenize='trigram')",
    """CREATE TRIGGER images_indexed AFTER INSERT ON images BEGIN
        INSERT INTO prompts (rowid, prompt) VALUES (new.seq, new.prompt);
    END""",
    """CREATE TRIGGER images_unindexed AFTER DELETE ON images BEGIN
        INSERT INTO prompts (prompts, rowid, prompt) VALUES ('delete', old.seq, old.prompt);
    END""",
    "INSERT INTO prompts (prompts) VALUES ('rebuild')",
)
_COLUMNS = "id, created_at, prompt, negative_prompt, model, seed, width, height, steps, byte_size, parameters"


@dataclass(frozen=True)
class ImageRecord:
    """What the caller knows about one image; `parameters` is the PNG's full `parameters` text (core.tasks.pnginfo)."""

    prompt: str
    negative_prompt: str
    model: str
    seed: int | None
    width: int
    height: int
    steps: int
    parameters: str


@dataclass(frozen=True)
class HistoryEntry:
    id: str
    created_at: float  # time.time() when it was added
    byte_size: int  # the PNG file's size
    record: ImageRecord


@dataclass(frozen=True)
class HistoryImage:
    entry: HistoryEntry
    png_bytes: bytes


@dataclass(frozen=True)
class HistoryUsage:
    image_count: int
    total_bytes: int  # the PNG files; the database adds its rows and prompt index on top
    max_bytes: int


def user_owner(email: str) -> str:
    """The owner string of a logged-in user (case-folded: the same mailbox however it is typed)."""
    return f"user:{email.strip().casefold()}"


def browser_owner(browser_id: str) -> str:
    """The owner string of an anonymous browser; the prefix keeps it apart from every user_owner."""
    return f"browser:{browser_id}"


def _owner_key(owner: str) -> str:
    if not owner:
        raise ValueError("owner must be a non-empty string")
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()


def _like_pattern(query: str) -> str:
    """A LIKE pattern matching `query` anywhere, with its own % and _ (and the escape character) taken literally."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _fts_phrase(query: str) -> str:
    """`query` as one FTS5 string: with the trigram tokenizer, a substring match whatever characters it holds."""
    return '"' + query.replace('"', '""') + '"'


def _fts5_trigram_available() -> bool:
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("CREATE VIRTUAL TABLE probe USING fts5 (text, tokenize='trigram')")
        return True
    except sqlite3.OperationalError:  # SQLite built without FTS5, or older than 3.34 (no trigram tokenizer)
        return False
    finally:
        probe.close()


class ImageHistory:
    """The images of every owner under `directory`, at most `max_bytes` of PNG files in all, oldest evicted first.

    Owners never see each other's images: every read and delete takes the owner and matches it.
    """

    def __init__(self, directory: Path, max_bytes: int, *, full_text: bool | None = None) -> None:
        """`full_text`: search through an FTS5 trigram index (None: when this SQLite has one) or by LIKE."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be above 0, not {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._images_dir = self.directory / IMAGES_DIR
        self._images_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below, never implicit ones.
        self._db = sqlite3.connect(
            self.directory / DATABASE_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False,
        )
        self._db.execute("PRAGMA journal_mode=WAL")  # readers in other processes never wait for a writer
        self._db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last commits: the repair covers it
        self.full_text = _fts5_trigram_available() if full_text is None else full_text
        with self._lock, self._write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            if self.full_text and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'prompts'").fetchone() is None:
                for statement in _FULL_TEXT_SCHEMA:
                    db.execute(statement)
            self._repair(db)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: it holds the database's write lock, across processes, until it commits."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ImageHistory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Adding and evicting

    def add(self, owner: str, png_bytes: bytes, record: ImageRecord) -> str:
        """Keep one PNG (its bytes as they are) and return its new id; the oldest images of any owner go first
        when the store would pass `max_bytes`. BadInputError for bytes that are not a PNG or one larger than the
        whole store may hold."""
        owner_key = _owner_key(owner)
        if not png_bytes.startswith(PNG_SIGNATURE):
            raise BadInputError("Only PNG images are kept in the history.", remedy="Save the image as a PNG first.")
        if len(png_bytes) > self.max_bytes:
            raise BadInputError(
                f"The image is {len(png_bytes):,} bytes, more than the whole history may hold ({self.max_bytes:,} bytes).",
                remedy="Raise DASH_HISTORY_MAX_BYTES, or download the image instead.",
            )
        image_id = secrets.token_hex(16)
        path = self._path(owner_key, image_id)
        evicted: list[Path] = []
        with self._lock:
            try:
                with self._write() as db:
                    # Written under the write lock, so another process's repair never sees it without its row.
                    _write_file(path, png_bytes)
                    db.execute(
                        f"INSERT INTO images (owner_key, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (owner_key, image_id, time.time(), record.prompt, record.negative_prompt, record.model, record.seed,
                         record.width, record.height, record.steps, len(png_bytes), record.parameters),
                    )
                    evicted = self._evict(db)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        for old_path in evicted:  # after the commit: until then the rows still needed their files
            old_path.unlink(missing_ok=True)
        return image_id

    def _evict(self, db: sqlite3.Connection) -> list[Path]:
        """Delete the oldest rows until the total fits `max_bytes`; their files, for the caller to remove after commit."""
        (total_bytes,) = db.execute("SELECT COALESCE(SUM(byte_size), 0) FROM images").fetchone()
        excess_bytes = total_bytes - self.max_bytes
        evicted_seqs, evicted_paths = [], []
        for seq, owner_key, image_id, byte_size in db.execute("SELECT seq, owner_key, id, byte_size FROM images ORDER BY seq"):
            if excess_bytes <= 0:
                break
            evicted_seqs.append((seq,))
            evicted_paths.append(self._path(owner_key, image_id))
            excess_bytes -= byte_size
        db.executemany("DELETE FROM images WHERE seq = ?", evicted_seqs)
        return evicted_paths

    # Reading

    def list(self, owner: str, query: str | None = None, limit: int = 50, offset: int = 0) -> tuple[HistoryEntry, ...]:
        """The owner's images, newest first; with `query`, only those whose prompt contains it (any case)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be 0 or more, not {limit} and {offset}")
        where, arguments = self._filter(owner, query)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM images WHERE {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*arguments, limit, offset),
            ).fetchall()
        return tuple(_entry(row) for row in rows)

    def count(self, owner: str, query: str | None = None) -> int:
        """How many images `list` would give without its limit."""
        where, arguments = self._filter(owner, query)
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM images WHERE {where}", arguments).fetchone()[0]

    def _filter(self, owner: str, query: str | None) -> tuple[str, tuple[str, ...]]:
        """The WHERE clause for one owner's images, and its arguments: every value is a bound parameter."""
        owner_key = _owner_key(owner)
        text = (query or "").strip()
        if not text:
            return "owner_key = ?", (owner_key,)
        if self.full_text and len(text) >= TRIGRAM_CHARS:
            return "owner_key = ? AND seq IN (SELECT rowid FROM prompts WHERE prompts MATCH ?)", (owner_key, _fts_phrase(text))
        return "owner_key = ? AND prompt LIKE ? ESCAPE '\\'", (owner_key, _like_pattern(text))

    def get(self, owner: str, image_id: str) -> HistoryImage | None:
        """One of the owner's images with its bytes; None when it is not theirs, not there (any more) or not an id."""
        owner_key = _owner_key(owner)
        if not _IMAGE_ID.match(image_id):
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE owner_key = ? AND id = ?", (owner_key, image_id)).fetchone()
            if row is None:
                return None
            try:
                png_bytes = self._path(owner_key, image_id).read_bytes()
            except FileNotFoundError:  # another process deleted it since the row was read
                return None
        return HistoryImage(_entry(row), png_bytes)

    def usage(self, owner: str | None = None) -> HistoryUsage:
        """Images and bytes of the whole store, or of one owner."""
        where, arguments = ("owner_key = ?", (_owner_key(owner),)) if owner is not None else ("1", ())
        with self._lock:
            count, total_bytes = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(byte_size), 0) FROM images WHERE {where}", arguments).fetchone()
        return HistoryUsage(count, total_bytes, self.max_bytes)

    # Deleting

    def delete(self, owner: str, image_id: str) -> bool:
        """Delete one of the owner's images; False when there was no such image of theirs."""
        owner_key = _owner_key(owner)
        if not _IMAGE_ID.match(image_id):
            return False
        with self._lock:
            with self._write() as db:
                deleted = db.execute("DELETE FROM images WHERE owner_key = ? AND id = ?", (owner_key, image_id)).rowcount
            if deleted:
                self._path(owner_key, image_id).unlink(missing_ok=True)
        return bool(deleted)

    def delete_all(self, owner: str) -> int:
        """Delete every image of the owner; returns how many."""
        owner_key = _owner_key(owner)
        with self._lock:
            with self._write() as db:
                ids = [image_id for (image_id,) in db.execute("SELECT id FROM images WHERE owner_key = ?", (owner_key,))]
                db.execute("DELETE FROM images WHERE owner_key = ?", (owner_key,))
            for image_id in ids:
                self._path(owner_key, image_id).unlink(missing_ok=True)
        return len(ids)

    # Files

    def _path(self, owner_key: str, image_id: str) -> Path:
        return self._images_dir / owner_key / f"{image_id}.png"

    def _repair(self, db: sqlite3.Connection) -> None:
        """Drop rows whose file is missing, delete files (and half-written ones) without a row: the store after a
        crash, a full disk or a hand-deleted file. Runs inside the write transaction, while no add can be half done."""
        kept: set[Path] = set()
        missing: list[tuple[int]] = []
        for seq, owner_key, image_id in db.execute("SELECT seq, owner_key, id FROM images"):
            path = self._path(owner_key, image_id)
            if path.is_file():
                kept.add(path)
            else:
                missing.append((seq,))
        db.executemany("DELETE FROM images WHERE seq = ?", missing)
        for owner_dir in self._images_dir.iterdir():
            for path in owner_dir.iterdir() if owner_dir.is_dir() else (owner_dir,):
                if path not in kept:
                    path.unlink(missing_ok=True)
            if owner_dir.is_dir() and not any(owner_dir.iterdir()):
                owner_dir.rmdir()


def _write_file(path: Path, data: bytes) -> None:
    """Write to a temporary name, sync, then rename: the final name never holds a partial PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _entry(row: tuple) -> HistoryEntry:
    image_id, created_at, prompt, negative_prompt, model, seed, width, height, steps, byte_size, parameters = row
    return HistoryEntry(image_id, created_at, byte_size, ImageRecord(prompt, negative_prompt, model, seed, width, height, steps, parameters))
