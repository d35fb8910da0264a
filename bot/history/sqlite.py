"""History in an SQLite file: bounded, persistent, and safe across crashes; one process at a time.

WAL mode with `synchronous=NORMAL` keeps every committed turn through a process crash (`kill -9`);
each append is one transaction, so a file is never left half-written. The schema version lives in
`PRAGMA user_version`; an older file is migrated in place when it is opened (one transaction), a
newer one is refused.

Every call runs on one worker thread of the store's own (a single-thread executor): the event loop
never waits on the disk, and the connection is only ever used by one thread at a time, so a
transaction is never interleaved with another call.

Faults (a full disk, a read-only one, I/O errors) are `HistoryError`, and a failed call leaves the
file as it was (its transaction rolled back) and the store usable: no call leaves the connection
inside a transaction, and after a failure that can stick to the connection itself the store opens a
new one on its next call. That matters for a read-only disk: SQLite opens a file it may not write
read-only without saying so, and such a connection stays read-only after the disk is writable again.
A full disk needs no new connection: the next write after space is freed succeeds on the same one.

Versions: 1 is the first schema; 2 adds `speaker`, the display name of whoever said a user turn in a
server channel (turns stored by version 1 read back with no speaker); 3 adds `epochs`, how often
each channel, server and user has been cleared (see `bot.history`); 4 adds `guild_settings`, what
a server's admins set with `/bot` and `/persona` (see `bot.core.guild_settings`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from bot.core.types import Conversation, Turn
from bot.history import (
    Epochs,
    HistoryError,
    HistoryUnavailable,
    NewerSchema,
    SettingChange,
    Snapshot,
    most_turns,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   INTEGER NOT NULL,
    guild_id     INTEGER,
    user_id      INTEGER,          -- the person the turn belongs to: its author, or whom the bot answered
    role         TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    text         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    speaker      TEXT              -- display name of whoever said a user turn in a server channel, else NULL
);
CREATE INDEX IF NOT EXISTS turns_by_channel ON turns (channel_id, id);
CREATE INDEX IF NOT EXISTS turns_by_guild ON turns (guild_id);
CREATE INDEX IF NOT EXISTS turns_by_user ON turns (user_id);
"""

_EPOCHS = """
CREATE TABLE IF NOT EXISTS epochs (
    scope  TEXT NOT NULL CHECK (scope IN ('channel', 'guild', 'user')),
    id     INTEGER NOT NULL,
    epoch  INTEGER NOT NULL,
    PRIMARY KEY (scope, id)
) WITHOUT ROWID
"""

# A server's settings, one row each: `kind` says what (see bot.core.guild_settings), `target` which
# channel, category, user or role it is about (0: the server itself), `value` the rest.
_GUILD_SETTINGS = """
CREATE TABLE IF NOT EXISTS guild_settings (
    guild_id  INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    target    INTEGER NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (guild_id, kind, target)
) WITHOUT ROWID
"""

# version -> the statements that bring a file of the version before it up to it
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE turns ADD COLUMN speaker TEXT",),
    3: (_EPOCHS,),
    4: (_GUILD_SETTINGS,),
}

# A missing row is epoch 0; a NULL id (a DM has no server, the console no user) matches no row.
_READ_EPOCHS = (
    "SELECT COALESCE((SELECT epoch FROM epochs WHERE scope = 'channel' AND id = ?), 0),"
    " COALESCE((SELECT epoch FROM epochs WHERE scope = 'guild' AND id = ?), 0),"
    " COALESCE((SELECT epoch FROM epochs WHERE scope = 'user' AND id = ?), 0)"
)
_BUMP = "INSERT INTO epochs (scope, id, epoch) VALUES (?, ?, 1) ON CONFLICT (scope, id) DO UPDATE SET epoch = epoch + 1"

# Primary SQLite result codes after which the connection is replaced before the next call: the file
# may be fine again by then, but this connection's view of it may not be (opened read-only, a file
# moved or replaced, an I/O error). SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_NOTADB, and
# SQLITE_READONLY, after which a write is also tried once more at once, on a new connection.
_SQLITE_READONLY = 8
_REOPEN_AFTER = frozenset({_SQLITE_READONLY, 10, 11, 14, 26})
# The same, by message, for Pythons before 3.11 (whose exceptions carry no result code).
_READONLY_WORDS = ("readonly", "read-only")
_REOPEN_AFTER_WORDS = (*_READONLY_WORDS, "disk i/o error", "unable to open", "malformed", "not a database")


class SQLiteHistoryStore:
    """Turns per conversation in one SQLite file (or `:memory:`), newest `max_turns` kept (cut in steps).

    The constructor opens the file on the calling thread (handy in synchronous test fixtures);
    async code uses `open`, which does it off the event loop.
    """

    def __init__(self, path: str | Path, max_turns: int) -> None:
        self.path = str(path)
        self.max_turns = max_turns
        self._db = self._open_connection()
        self._stale = False  # it failed in a way a new connection may not: replaced before the next call
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-sqlite")
        self._closed = False

    def _open_connection(self) -> sqlite3.Connection:
        """A new connection to the file, its schema created or migrated (`HistoryUnavailable` if it cannot)."""
        self._db = _connect(self.path)
        try:
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise HistoryUnavailable(f"cannot be used: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        return self._db

    @classmethod
    async def open(cls, path: str | Path, max_turns: int) -> SQLiteHistoryStore:
        return await asyncio.to_thread(cls, path, max_turns)

    def _version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise NewerSchema(
                f"cannot be used: {self.path} was written by a newer version of the bot"
                f" (schema {version} > {SCHEMA_VERSION})"
            )
        return version

    def _migrate(self) -> None:
        if self._version() == SCHEMA_VERSION:
            return
        with self._transaction():
            version = self._version()  # again, under the write lock: another process may have just migrated it
            if version < 1:  # a new file: the current schema at once
                for statement in [*_SCHEMA.split(";"), _EPOCHS, _GUILD_SETTINGS]:
                    if statement.strip():
                        self._db.execute(statement)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        self._db.execute(statement)
                log.info("migrated %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the file's write lock from its start: committed or rolled back whole."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # The work or the COMMIT failed (SQLite may have rolled back already, e.g. on a full disk).
            # A ROLLBACK that fails too does not hide why: `_call` sees the connection still inside the
            # transaction and replaces it.
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    async def _run(self, work: Callable[[], T], *, write: bool = False) -> T:
        """Run `work` (one transaction, which `write`s) on the store's thread; an SQLite failure becomes
        `HistoryError`."""
        if self._closed:
            raise HistoryError("the history store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, self._call, work, write)
        except sqlite3.Error as exc:
            raise HistoryError(f"SQLite: {exc}") from exc

    def _call(self, work: Callable[[], T], write: bool) -> T:
        """On the store's thread: `work` on a usable connection, which it leaves outside any transaction.

        A write refused as read-only is tried once more on a new connection: the one it failed on may
        have been opened while the disk was read-only, and would refuse every write after it is
        writable again. Trying again is safe: a refused write did nothing (its transaction is rolled back).
        """
        if self._stale:
            self._reconnect()
        try:
            return work()
        except BaseException as exc:
            self._after_failure(exc)
            if not (write and self._stale and isinstance(exc, sqlite3.Error) and _is_read_only(exc)):
                raise
        self._reconnect()
        try:
            return work()
        except BaseException as exc:
            self._after_failure(exc)
            raise

    def _after_failure(self, exc: BaseException) -> None:
        """Leave no transaction open, and mark the connection for replacement where the failure may stick to it."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as again:
                log.warning("could not roll back on the history database (%s); opening it again", again)
                self._stale = True
        if isinstance(exc, sqlite3.Error) and _sticks_to_connection(exc):
            self._stale = True
        if self.path == ":memory:":  # the data lives in this one connection: it is never replaced
            self._stale = False

    def _reconnect(self) -> None:
        """Replace a connection that failed; if the file cannot be opened yet, the next call tries again."""
        with suppress(sqlite3.Error):
            self._db.close()
        try:
            self._open_connection()
        except HistoryUnavailable as exc:
            raise HistoryError(f"SQLite: {self.path} {exc}") from exc
        self._stale = False
        log.info("opened the history database %s again after a failure", self.path)

    def _get(self, conversation: Conversation) -> list[Turn]:
        rows = self._db.execute(
            "SELECT role, text, speaker FROM"
            " (SELECT id, role, text, speaker FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (conversation.channel_id, most_turns(self.max_turns)),
        ).fetchall()
        return [Turn(role, text, speaker) for role, text, speaker in rows]

    def _epochs(self, conversation: Conversation, user_id: int | None) -> Epochs:
        row = self._db.execute(_READ_EPOCHS, (conversation.channel_id, conversation.guild_id, user_id)).fetchone()
        return Epochs(int(row[0]), int(row[1]), int(row[2]))

    async def get(self, conversation: Conversation) -> list[Turn]:
        return await self._run(lambda: self._get(conversation))

    async def snapshot(self, conversation: Conversation, user_id: int | None) -> Snapshot:
        def read() -> Snapshot:
            self._db.execute("BEGIN")  # one read transaction: turns and epochs from the same moment
            snapshot = Snapshot(self._get(conversation), self._epochs(conversation, user_id))
            self._db.execute("COMMIT")  # on a failure `_call` rolls it back
            return snapshot

        return await self._run(read)

    async def append(
        self, conversation: Conversation, user_id: int | None, *turns: Turn, expected: Epochs | None = None
    ) -> bool:
        now = time.time()

        def write() -> bool:
            with self._transaction():
                if expected is not None and self._epochs(conversation, user_id) != expected:
                    return False
                self._db.executemany(
                    "INSERT INTO turns (channel_id, guild_id, user_id, role, text, created_at, speaker)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (conversation.channel_id, conversation.guild_id, user_id, t.role, t.text, now, t.speaker)
                        for t in turns
                    ],
                )
                self._db.execute(
                    "DELETE FROM turns WHERE channel_id = ? AND id NOT IN"
                    " (SELECT id FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?)"
                    " AND (SELECT COUNT(*) FROM turns WHERE channel_id = ?) > ?",
                    (
                        conversation.channel_id,
                        conversation.channel_id,
                        self.max_turns,
                        conversation.channel_id,
                        most_turns(self.max_turns),
                    ),
                )
                return True

        return await self._run(write, write=True)

    async def replace_last_reply(
        self, conversation: Conversation, user_id: int | None, old: str, new: str, *, expected: Epochs
    ) -> bool:
        def write() -> bool:
            with self._transaction():
                if self._epochs(conversation, user_id) != expected:
                    return False
                row = self._db.execute(
                    "SELECT id, role, text FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT 1",
                    (conversation.channel_id,),
                ).fetchone()
                if row is None or row[1] != "bot" or row[2] != old:
                    return False
                self._db.execute("UPDATE turns SET text = ?, created_at = ? WHERE id = ?", (new, time.time(), row[0]))
                return True

        return await self._run(write, write=True)

    async def _clear(self, scope: str, column: str, ident: int) -> int:
        def clear() -> int:
            with self._transaction():
                self._db.execute(_BUMP, (scope, ident))
                return self._db.execute(f"DELETE FROM turns WHERE {column} = ?", (ident,)).rowcount

        return await self._run(clear, write=True)

    async def reset(self, conversation: Conversation) -> int:
        return await self._clear("channel", "channel_id", conversation.channel_id)

    async def reset_guild(self, guild_id: int) -> int:
        return await self._clear("guild", "guild_id", guild_id)

    async def forget_user(self, user_id: int) -> int:
        return await self._clear("user", "user_id", user_id)

    async def guild_settings(self, guild_id: int) -> list[tuple[str, int, str]]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT kind, target, value FROM guild_settings WHERE guild_id = ? ORDER BY kind, target", (guild_id,)
            ).fetchall()
        )
        return [(str(kind), int(target), str(value)) for kind, target, value in rows]

    async def set_guild_settings(self, guild_id: int, changes: Sequence[SettingChange]) -> int:
        def write() -> int:
            changed = 0
            with self._transaction():
                for kind, target, value in changes:
                    if value is None:
                        changed += self._db.execute(
                            "DELETE FROM guild_settings WHERE guild_id = ? AND kind = ? AND target = ?",
                            (guild_id, kind, target),
                        ).rowcount
                        continue
                    self._db.execute(
                        "INSERT INTO guild_settings (guild_id, kind, target, value) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (guild_id, kind, target) DO UPDATE SET value = excluded.value",
                        (guild_id, kind, target, value),
                    )
                    changed += 1
            return changed

        return await self._run(write, write=True)

    async def delete_guild_settings(self, guild_id: int) -> int:
        def delete() -> int:
            with self._transaction():
                return self._db.execute("DELETE FROM guild_settings WHERE guild_id = ?", (guild_id,)).rowcount

        return await self._run(delete, write=True)

    async def counts(self) -> tuple[int, int]:
        row = await self._run(
            lambda: self._db.execute("SELECT COUNT(DISTINCT channel_id), COUNT(*) FROM turns").fetchone()
        )
        return int(row[0]), int(row[1])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # calls made from now on are refused; those already queued run first
        await asyncio.get_running_loop().run_in_executor(self._worker, self._close)
        self._worker.shutdown(wait=True)

    def _close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not checkpoint the history database: %s", exc)
        self._db.close()


def _is_read_only(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_READONLY
    return any(words in str(exc).lower() for words in _READONLY_WORDS)


def _sticks_to_connection(exc: sqlite3.Error) -> bool:
    """Whether a new connection may succeed where this failure leaves the old one failing."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in _REOPEN_AFTER
    message = str(exc).lower()
    return any(words in message for words in _REOPEN_AFTER_WORDS)


def _connect(path: str) -> sqlite3.Connection:
    """The connection, set up for WAL; a path that cannot hold a database is `HistoryUnavailable`."""
    if path != ":memory:":
        target = Path(path)
        try:
            if target.is_dir():
                raise HistoryUnavailable(f"is a folder; name a file, such as {target / 'history.sqlite3'}")
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a parent folder the bot may not read
            reason = f"{exc.strerror} ({exc.filename})" if exc.strerror else str(exc)
            raise HistoryUnavailable(f"cannot be created: {reason}") from exc
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise HistoryUnavailable(f"cannot be created: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode=WAL")  # the first read: fails here if the file is not a database
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
    except sqlite3.DatabaseError as exc:
        db.close()
        if "not a database" in str(exc):
            raise HistoryUnavailable("is not an SQLite database; name a new file or the bot's own") from exc
        raise HistoryUnavailable(f"cannot be used: {exc}") from exc
    return db
